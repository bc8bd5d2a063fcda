//! qcow2 CBT backups that crash or collide: `cairn backup --qcow2` SIGKILLed
//! while its qemu-nbd export runs leaves no qemu-nbd holding the image (a
//! writer can lock it at once), and the next backup continues the bitmap
//! chain — an incremental holding exactly what was written — and restores
//! bit-identical. Two backups of the same image at once: one refuses
//! cleanly (busy, exit 5) and the other succeeds; afterwards the chain
//! still works.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn backup_args(pool: &str, img: &Path) -> Vec<String> {
    [
        "backup",
        pool,
        "--vm",
        "v",
        "--qcow2",
        &p(img),
        "--bitmap",
        "nightly",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Starts a backup held at `point`; returns the child once it is there.
fn held(args: &[String], point: &str, dir: &Path) -> std::process::Child {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_held(&args, &[], point, dir).expect("reached the pause")
}

/// A write through qemu-io needs qemu's write lock on the image: it fails
/// while any qemu-nbd still holds the image open.
fn writable_within(img: &Path, pattern: u8, offset: &str, secs: u64) {
    let start = Instant::now();
    loop {
        let out = Command::new("qemu-io")
            .args(["-c", &format!("write -P {pattern} {offset} 64k"), &p(img)])
            .output()
            .unwrap();
        if out.status.success() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "the image stays locked: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_qcow2_backup_leaves_the_image_unlocked_and_the_chain_usable() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pool = p(&root.join("pool"));
    ok(&["init", &pool]);
    let img = root.join("d.qcow2");
    new_qcow2(&img, "32M");
    tool("qemu-io", &["-c", "write -P 1 0 8M", &p(&img)]);
    let first = json(&backup_args(&pool, &img));
    assert_eq!(first["mode"], "full", "{first}");

    for (round, point) in ["backup-after-index", "backup-before-manifest"]
        .iter()
        .enumerate()
    {
        // Killed while its export runs.
        let mut child = held(
            &backup_args(&pool, &img),
            point,
            &root.join(format!("k{round}")),
        );
        child.kill().unwrap();
        child.wait().unwrap();
        // No qemu-nbd keeps the image: a writer gets its lock (qemu-nbd
        // is told to exit when its parent dies).
        let offset = format!("{}M", 10 + round * 2);
        writable_within(&img, 7 + round as u8, &offset, 5);
        // The next backup continues the chain: it reads exactly the write.
        let next = json(&backup_args(&pool, &img));
        assert_eq!(next["mode"], "cbt", "{point}: {next}");
        assert_eq!(next["bytes_dirty"], 65536, "{point}: {next}");
        let out = root.join(format!("out-{round}"));
        ok(&["restore", &pool, "latest", "--to", &p(&out)]);
        let raw = raw_of(&img, &root.join(format!("r{round}.raw")));
        assert!(
            std::fs::read(out.join("d.qcow2")).unwrap() == raw,
            "{point}"
        );
    }
    assert_eq!(
        json(&["verify", &pool, "--read-data", "--json"])["ok"],
        true
    );
}

#[test]
fn two_qcow2_backups_of_one_image_at_once_one_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pool = p(&root.join("pool"));
    ok(&["init", &pool]);
    let img = root.join("d.qcow2");
    new_qcow2(&img, "16M");
    tool("qemu-io", &["-c", "write -P 1 0 4M", &p(&img)]);
    ok(&backup_args(&pool, &img));
    tool("qemu-io", &["-c", "write -P 2 8M 64k", &p(&img)]);

    // The first holds the image mid-backup; the second refuses at once.
    let first = held(
        &backup_args(&pool, &img),
        "backup-after-index",
        &root.join("hold"),
    );
    let second = cairn(&backup_args(&pool, &img));
    assert_eq!(code(&second), 5, "{}", stderr(&second));
    assert!(
        stderr(&second).contains("being backed up by another cairn process"),
        "{}",
        stderr(&second)
    );
    release("backup-after-index", &root.join("hold"));
    let out = first.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mode"], "cbt", "{v}");
    assert_eq!(v["bytes_dirty"], 65536, "{v}");

    // The chain goes on.
    tool("qemu-io", &["-c", "write -P 3 12M 64k", &p(&img)]);
    let next = json(&backup_args(&pool, &img));
    assert_eq!(next["mode"], "cbt", "{next}");
    assert_eq!(next["bytes_dirty"], 65536, "{next}");
    let out = root.join("out");
    ok(&["restore", &pool, "latest", "--to", &p(&out)]);
    assert!(std::fs::read(out.join("d.qcow2")).unwrap() == raw_of(&img, &root.join("r.raw")));
}
