//! The CBT trust matrix end to end on real qcow2 files: after a full and
//! one trusted incremental, each way the chain can break makes the next
//! backup fall back to a full read (saying why) — a disabled bitmap, a
//! shrunk disk, a changed chunk size, a damaged newest manifest — and the
//! backup after that continues with CBT; a backup that fails after it
//! added its new bitmap (its pool's filesystem full) leaves the chain
//! usable. Every snapshot restores bit-identical to the image.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

struct Chain {
    root: std::path::PathBuf,
    pool: String,
    img: std::path::PathBuf,
    n: usize,
}

impl Chain {
    /// A pool and an image with a full backup and one CBT incremental.
    fn new(root: &Path, pool_dir: &Path) -> Chain {
        let pool = p(pool_dir);
        ok(&["init", &pool]);
        let img = root.join("d.qcow2");
        new_qcow2(&img, "32M");
        tool("qemu-io", &["-c", "write -P 1 0 6M", &p(&img)]);
        let mut c = Chain {
            root: root.to_path_buf(),
            pool,
            img,
            n: 0,
        };
        assert_eq!(c.backup(&[])["mode"], "full");
        c.write(2, "10M");
        let inc = c.backup(&[]);
        assert_eq!(inc["mode"], "cbt", "{inc}");
        c
    }

    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "backup",
            &self.pool,
            "--vm",
            "v",
            "--qcow2",
            &p(&self.img),
            "--bitmap",
            "nightly",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// Backs up, then checks the newest snapshot restores to the image.
    fn backup(&mut self, extra: &[&str]) -> Value {
        let v = json(&self.args(extra));
        self.n += 1;
        let out = self.root.join(format!("out-{}", self.n));
        ok(&[
            "restore",
            &self.pool,
            "latest",
            "--vm",
            "v",
            "--to",
            &p(&out),
        ]);
        let raw = raw_of(&self.img, &self.root.join(format!("r{}.raw", self.n)));
        assert!(
            std::fs::read(out.join("d.qcow2")).unwrap() == raw,
            "snapshot {} differs from the image",
            self.n
        );
        std::fs::remove_dir_all(&out).unwrap();
        v
    }

    fn write(&self, pattern: u8, offset: &str) {
        tool(
            "qemu-io",
            &[
                "-c",
                &format!("write -P {pattern} {offset} 64k"),
                &p(&self.img),
            ],
        );
    }

    /// The chain's current bitmap (the newest snapshot's next bitmap).
    fn next_bitmap(&self) -> String {
        let list = json(&["snapshots", &self.pool, "--vm", "v", "--json"]);
        let newest = list.as_array().unwrap().last().unwrap().clone();
        newest["disks"][0]["properties"]["cbt.next-bitmap"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// A full read with the reason given, then CBT again with one 64 KiB
    /// write (`dirty` bytes: one cell of the chunk grid).
    fn falls_back_then_continues(&mut self, extra: &[&str], why: &str, dirty: u64) {
        let fb = self.backup(extra);
        assert_eq!(fb["mode"], "full", "{fb}");
        let reason = fb["cbt_fallback"].as_str().unwrap_or_default().to_string();
        assert!(
            reason.contains(why),
            "fallback reason {reason:?} lacks {why:?}"
        );
        self.write(9, "14M");
        let next = self.backup(extra);
        assert_eq!(next["mode"], "cbt", "{next}");
        assert_eq!(next["bytes_dirty"], dirty, "{next}");
    }
}

#[test]
fn a_disabled_bitmap_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Chain::new(dir.path(), &dir.path().join("pool"));
    let b = c.next_bitmap();
    tool("qemu-img", &["bitmap", "--disable", &p(&c.img), &b]);
    c.write(3, "12M"); // not recorded by the disabled bitmap
    c.falls_back_then_continues(&[], "disabled", 65536);
}

#[test]
fn a_shrunk_disk_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Chain::new(dir.path(), &dir.path().join("pool"));
    tool("qemu-img", &["resize", "--shrink", &p(&c.img), "24M"]);
    c.falls_back_then_continues(&[], "size", 65536);
}

#[test]
fn a_changed_chunk_size_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Chain::new(dir.path(), &dir.path().join("pool"));
    c.write(4, "16M");
    c.falls_back_then_continues(&["--chunking", "fixed:128K"], "chunk", 128 << 10);
}

#[test]
fn a_damaged_newest_manifest_is_passed_over() {
    let dir = tempfile::tempdir().unwrap();
    let pool_dir = dir.path().join("pool");
    let c = Chain::new(dir.path(), &pool_dir);
    let list = json(&["snapshots", &c.pool, "--json"]);
    let newest = list.as_array().unwrap().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = pool_dir.join("snapshots").join(&newest);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    c.write(5, "18M");
    // The parent is the older snapshot, whose bitmap was retired: full.
    let fb = json(&c.args(&[]));
    assert_eq!(fb["mode"], "full", "{fb}");
    assert!(
        fb["cbt_fallback"].as_str().is_some_and(|r| !r.is_empty()),
        "{fb}"
    );
    let out = dir.path().join("out-fb");
    ok(&[
        "restore",
        &c.pool,
        fb["snapshot"].as_str().unwrap(),
        "--to",
        &p(&out),
    ]);
    assert!(
        std::fs::read(out.join("d.qcow2")).unwrap() == raw_of(&c.img, &dir.path().join("fb.raw"))
    );
    c.write(9, "14M");
    let next = json(&c.args(&[]));
    assert_eq!(next["mode"], "cbt", "{next}");
    assert_eq!(next["bytes_dirty"], 65536, "{next}");
}

#[test]
fn a_backup_that_fails_after_adding_its_bitmap_leaves_the_chain_usable() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = SmallFs::mount(dir.path(), 24 << 20) else {
        return;
    };
    let mut c = Chain::new(dir.path(), &fs.path.join("pool"));
    let before = c.next_bitmap();
    c.write(6, "20M");
    c.write(7, "2M");
    // The pool's filesystem full: the backup fails after it added its new
    // bitmap (its packs cannot be written) and must take that bitmap away.
    fs.fill_leaving(16 << 10);
    let out = cairn(&c.args(&["--compression", "none"]));
    assert_ne!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        stderr(&out).contains("No space left on device"),
        "failed writing its data: {}",
        stderr(&out)
    );
    fs.unfill();
    assert_eq!(c.next_bitmap(), before, "no snapshot was added");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", &p(&c.img)])
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    let names: Vec<&str> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec![before.as_str()],
        "the failed run's bitmap was removed"
    );
    // The chain's bitmap still holds both writes: CBT, exactly them.
    let next = c.backup(&[]);
    assert_eq!(next["mode"], "cbt", "{next}");
    assert_eq!(next["bytes_dirty"], 2 * 65536, "{next}");
}
