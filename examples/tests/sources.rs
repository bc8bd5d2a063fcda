//! Sources that misbehave: a raw image that shrinks while it is backed up
//! (read path and `--mmap`). The backup must fail — never publish a
//! snapshot of bytes the file no longer has — and leave every earlier
//! snapshot restorable and the pool clean.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use std::path::Path;

use common::*;

/// Backs `img` up with the process held at `point`, truncates the file to
/// `to` bytes there, lets it go on; returns (exit status, stderr).
fn backup_shrinking(
    pool: &str,
    img: &Path,
    extra: &[&str],
    point: &str,
    to: u64,
    pause: &Path,
) -> (std::process::ExitStatus, String) {
    let mut args = vec!["backup", pool, "--vm", "v", img.to_str().unwrap()];
    args.extend_from_slice(extra);
    let child = spawn_held(&args, &[], point, pause).expect("reached the pause");
    std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .unwrap()
        .set_len(to)
        .unwrap();
    release(point, pause);
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_image_that_shrinks_during_the_backup_fails_it_cleanly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pool = p(&root.join("pool"));
    ok(&["init", &pool]);
    let earlier = random_file(&root.join("v.img"), 8 << 20, 1);
    let first = json(&[
        "backup",
        &pool,
        "--vm",
        "v",
        &p(&root.join("v.img")),
        "--json",
    ])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    // Shrunk before its extents are listed, or after (while it is read).
    // The mapped path cannot survive the second: the kernel sends SIGBUS
    // for pages past the new end (documented at `--mmap`); the pool must
    // still be clean.
    for point in ["backup-after-index", "backup-after-extents"] {
        for (mode, extra) in [("read", vec![]), ("mmap", vec!["--mmap"])] {
            let what = format!("{point} {mode}");
            let img = root.join("v.img");
            random_file(&img, 8 << 20, 2);
            let pause = root.join(format!("pause-{point}-{mode}"));
            let (status, err) = backup_shrinking(&pool, &img, &extra, point, 3 << 20, &pause);
            if mode == "mmap" && point == "backup-after-extents" {
                assert_eq!(status.signal(), Some(libc::SIGBUS), "{what}: {status}");
            } else {
                assert_eq!(status.code(), Some(1), "{what}: {err}");
                assert!(
                    err.contains(&p(&img)),
                    "{what}: the error names the file: {err}"
                );
            }
            let list = json(&["snapshots", &pool, "--json"]);
            let ids: Vec<&str> = list
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["id"].as_str().unwrap())
                .collect();
            assert_eq!(ids, vec![first.as_str()], "{what}: no snapshot published");
            let out = root.join(format!("out-{point}-{mode}"));
            ok(&["restore", &pool, &first, "--to", &p(&out)]);
            assert!(std::fs::read(out.join("v.img")).unwrap() == earlier);
            let v = json(&["verify", &pool, "--read-data", "--json"]);
            assert_eq!(v["ok"], true, "{what}: {v}");
        }
    }
}
