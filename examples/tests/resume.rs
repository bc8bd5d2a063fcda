//! Resume mid-disk (spec B13) on real processes: `cairn backup
//! --resume-dir` SIGKILLed right after it journaled a sealed pack, run
//! again on the unchanged image, reads only what the journal did not
//! cover (bytes read + bytes resumed = the image's data), restores
//! bit-identical and leaves no journal; a touched image is read whole.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use common::*;

#[test]
fn a_killed_backup_continues_where_its_journal_ends() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("disk.img");
    // Random (incompressible) data: packs seal every 32 MiB.
    let bytes = random_file(&image, 48 << 20, 11);
    let pool = p(&d.join("pool"));
    ok(&["init", &pool]);
    let journals = d.join("journals");
    let args = [
        "backup",
        &pool,
        "--vm",
        "vm1",
        &p(&image),
        "--resume-dir",
        &p(&journals),
        "--json",
    ];
    let mut child = spawn_held(&args, &[], "backup-after-journal", &d.join("pause"))
        .expect("the backup journaled a sealed pack");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(std::fs::read_dir(&journals).unwrap().count(), 1);
    // The killed backup wrote no snapshot.
    assert_eq!(
        json(&["snapshots", &pool, "--json"])
            .as_array()
            .unwrap()
            .len(),
        0
    );

    let stats = json(&args);
    let resumed = stats["bytes_resumed"].as_u64().unwrap();
    let read = stats["bytes_read"].as_u64().unwrap();
    assert!(resumed >= 16 << 20, "{stats}");
    assert_eq!(resumed + read, 48 << 20, "{stats}");
    assert_eq!(std::fs::read_dir(&journals).unwrap().count(), 0);
    let out = d.join("restored");
    ok(&["restore", &pool, "latest", "--vm", "vm1", "--to", &p(&out)]);
    assert!(
        std::fs::read(out.join("disk.img")).unwrap() == bytes,
        "restored image differs"
    );

    // Killed again (into a fresh pool, so there is data to seal), then
    // the image is touched: it is read whole.
    let _ = std::fs::remove_dir_all(d.join("pause"));
    let pool2 = p(&d.join("pool2"));
    ok(&["init", &pool2]);
    let mut args = args;
    args[1] = &pool2;
    let mut child = spawn_held(&args, &[], "backup-after-journal", &d.join("pause"))
        .expect("the backup journaled a sealed pack");
    child.kill().unwrap();
    child.wait().unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    drop(f);
    let stats = json(&args);
    assert_eq!(stats["bytes_resumed"], 0, "{stats}");
    assert_eq!(stats["bytes_read"], 48 << 20, "{stats}");
}
