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

/// The journaled length of the only journal in `dir` (0 without one),
/// read from the file as FORMAT.md lays it out: a 40-byte header, then
/// records of count u32 LE, count × 41-byte entries (length u64 LE first)
/// and a 16-byte checksum.
fn journaled(dir: &std::path::Path) -> u64 {
    let Some(entry) = std::fs::read_dir(dir).ok().and_then(|mut d| d.next()) else {
        return 0;
    };
    let bytes = std::fs::read(entry.unwrap().path()).unwrap();
    let mut total = 0;
    let mut pos = 40;
    while pos + 4 <= bytes.len() {
        let count = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        let end = pos + 4 + count * 41 + 16;
        if count == 0 || end > bytes.len() {
            break;
        }
        for e in bytes[pos + 4..pos + 4 + count * 41].chunks(41) {
            total += u64::from_le_bytes(e[..8].try_into().unwrap());
        }
        pos = end;
    }
    total
}

/// Bytes a running process has read (`rchar` of /proc/PID/io).
fn bytes_read_by(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
}

/// Twenty real kill -9 runs, each at a random point of the part still to
/// read: after each, the next run would read at most 1.1 × what the
/// killed one left unread (its journal covers the rest); the last run
/// completes with exactly the journal resumed and restores bit-identical.
/// (Small packs and batches through test knobs, so a 160 MiB image
/// crosses many seals.)
#[test]
fn twenty_kills_each_resume_close_to_where_they_stopped() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("disk.img");
    let size = 160u64 << 20;
    let bytes = random_file(&image, size as usize, 21);
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
        "--threads",
        "2",
        "--json",
    ];
    let knobs = [("CAIRN_PACK_TARGET", "1M"), ("CAIRN_BATCH_SIZE", "256K")];
    let mut rng = cairn_engine::sample::SampleRng::new(7);
    for kill in 0..20 {
        let start = journaled(&journals);
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(args)
            .envs(knobs)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill after 512 KiB–5 MiB more of the image was read.
        let target = (512 << 10) + rng.below(9 * (512 << 10));
        let read = loop {
            match bytes_read_by(child.id()) {
                Some(r) if r >= target => break r,
                _ => {}
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "run {kill} ended before its kill"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        // SAFETY: signals the child we started.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
        child.wait().unwrap();
        let unread = size.saturating_sub(start + read);
        let next_reads = size - journaled(&journals);
        assert!(
            next_reads * 10 <= unread * 11,
            "kill {kill}: journal at {} MiB after reading to ~{} MiB: the next run reads {next_reads} for {unread} unread",
            journaled(&journals) >> 20,
            (start + read) >> 20
        );
    }
    let resumable = journaled(&journals);
    let out = cairn_env(&args, &knobs.map(|(k, v)| (k, v.to_string())));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["bytes_resumed"], resumable, "{stats}");
    assert_eq!(stats["bytes_read"], size - resumable, "{stats}");
    let restored = d.join("restored");
    ok(&[
        "restore",
        &pool,
        "latest",
        "--vm",
        "vm1",
        "--to",
        &p(&restored),
    ]);
    assert!(
        std::fs::read(restored.join("disk.img")).unwrap() == bytes,
        "restored image differs"
    );
}
