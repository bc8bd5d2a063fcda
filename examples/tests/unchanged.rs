//! Unchanged image files are not read again: a raw image whose device,
//! inode, size and modification and change times equal what its disk's
//! newest snapshot recorded reuses that snapshot (mode `unchanged`, 0 bytes
//! read); a touched file, a file rewritten in place with its mtime set
//! back (its ctime still moves), a replaced file (new inode) and
//! `--force-read` are read; every snapshot restores bit-identical.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use std::path::Path;

use common::*;

fn backup(pool: &str, image: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["backup", pool, "--vm", "web", &p(image), "--json"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    json(&args)
}

fn restored(pool: &str, id: &str, at: &Path) -> Vec<u8> {
    let _ = std::fs::remove_dir_all(at);
    ok(&["restore", pool, id, "--to", &p(at)]);
    let files = walk_files(at);
    assert_eq!(files.len(), 1, "{files:?}");
    std::fs::read(&files[0]).unwrap()
}

/// Files changed in the last 2 s are always read (their change time's
/// clock tick may not be over): let that pass.
fn settle() {
    std::thread::sleep(std::time::Duration::from_millis(2100));
}

fn mtime(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    format!("@{}.{:09}", m.mtime(), m.mtime_nsec())
}

#[test]
fn unchanged_files_are_reused_and_every_change_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = p(&d.join("pool"));
    ok(&["init", &pool]);
    let image = d.join("web.img");
    let mut data = random_file(&image, 4 << 20, 7);
    let size = data.len() as u64;
    let out = d.join("out");

    // Just written: read, and read again (too fresh to trust its state).
    let first = backup(&pool, &image, &[]);
    assert_eq!(first["mode"], "full");
    assert_eq!(first["bytes_read"], size);
    assert_eq!(backup(&pool, &image, &[])["bytes_read"], size);
    settle();
    assert_eq!(backup(&pool, &image, &[])["bytes_read"], size);
    // Unchanged: nothing read, the snapshot says so and restores whole.
    let same = backup(&pool, &image, &[]);
    assert_eq!(same["mode"], "unchanged", "{same}");
    assert_eq!(same["bytes_read"], 0);
    assert_eq!(same["unchanged"], serde_json::json!(["web.img"]));
    assert!(restored(&pool, same["snapshot"].as_str().unwrap(), &out) == data);
    let listed = json(&["snapshots", &pool, "--json"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["mode"] == "unchanged"),
        "{listed}"
    );
    // --force-read reads it anyway.
    let forced = backup(&pool, &image, &["--force-read"]);
    assert_eq!(forced["mode"], "full");
    assert_eq!(forced["bytes_read"], size);

    // Touched (a new mtime, same bytes): read again.
    tool("touch", &[&p(&image)]);
    settle();
    let touched = backup(&pool, &image, &[]);
    assert_eq!(touched["bytes_read"], size, "{touched}");
    assert_eq!(backup(&pool, &image, &[])["bytes_read"], 0);

    // Rewritten in place, mtime set back: the ctime moved, read again.
    let before = mtime(&image);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(b"rewritten").unwrap();
        f.sync_all().unwrap();
    }
    data[1 << 20..(1 << 20) + 9].copy_from_slice(b"rewritten");
    tool("touch", &["-d", &before, &p(&image)]);
    assert_eq!(mtime(&image), before, "the mtime is back");
    settle();
    let rewritten = backup(&pool, &image, &[]);
    assert_eq!(rewritten["bytes_read"], size, "{rewritten}");
    assert!(restored(&pool, rewritten["snapshot"].as_str().unwrap(), &out) == data);

    // Replaced by another file (a new inode) of the same size and mtime.
    let before = mtime(&image);
    let other = d.join("other.img");
    let new_data = random_file(&other, 4 << 20, 8);
    tool("touch", &["-d", &before, &p(&other)]);
    std::fs::rename(&other, &image).unwrap();
    settle();
    let replaced = backup(&pool, &image, &[]);
    assert_eq!(replaced["bytes_read"], size, "{replaced}");
    assert!(restored(&pool, replaced["snapshot"].as_str().unwrap(), &out) == new_data);
    let again = backup(&pool, &image, &[]);
    assert_eq!(again["mode"], "unchanged");
    assert!(restored(&pool, again["snapshot"].as_str().unwrap(), &out) == new_data);

    // Content-defined chunking cannot splice a parent: read every time.
    for _ in 0..2 {
        let cdc = backup(&pool, &image, &["--chunking", "cdc"]);
        assert_eq!(cdc["bytes_read"], size, "{cdc}");
    }
}
