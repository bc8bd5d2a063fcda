//! A restore that fails or is stopped leaves no file under any disk's name
//! and no `.cairn-partial` file behind, and `--force` over existing files
//! keeps the old files (with different content) intact: a multi-disk
//! snapshot whose second disk is damaged, a target filesystem that runs
//! out of space (a real tmpfs), and SIGINT / SIGTERM mid-restore (the
//! process exits 130 / 143 after cleaning up).
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_engine::sample::SampleRng;
use common::*;

/// Every file in `dir` (none if it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|it| {
            it.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A pool with snapshot `m` of two disks (d1.img, d2.img) whose second
/// disk's chunks all sit in packs that are then damaged (they were first
/// stored by a backup of d2 alone, so m's own packs hold only d1).
/// Returns (pool, m's id).
fn pool_with_a_damaged_second_disk(root: &Path) -> (String, String) {
    let pool = p(&root.join("pool"));
    ok(&["init", &pool]);
    random_file(&root.join("d1.img"), 3 << 20, 1);
    random_file(&root.join("d2.img"), 3 << 20, 2);
    ok(&["backup", &pool, "--vm", "x", &p(&root.join("d2.img"))]);
    let first_packs = walk_files(&root.join("pool").join("packs"));
    let m = json(&[
        "backup",
        &pool,
        "--vm",
        "m",
        &p(&root.join("d1.img")),
        &p(&root.join("d2.img")),
        "--json",
    ])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    for pack in first_packs {
        let mut bytes = std::fs::read(&pack).unwrap();
        for at in (4096..bytes.len().saturating_sub(4096)).step_by(65536) {
            bytes[at] ^= 0x33;
        }
        std::fs::write(&pack, &bytes).unwrap();
    }
    (pool, m)
}

#[test]
fn a_failing_second_disk_leaves_nothing_and_force_keeps_the_old_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (pool, m) = pool_with_a_damaged_second_disk(root);

    // A fresh target: nothing appears under either name.
    let to = root.join("fresh");
    let out = cairn(&["restore", &pool, &m, "--to", &p(&to)]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("damaged"), "{}", stderr(&out));
    assert_eq!(
        entries(&to),
        Vec::<String>::new(),
        "nothing left in the target"
    );

    // --force over existing files with other content: both kept intact.
    let to = root.join("existing");
    std::fs::create_dir_all(&to).unwrap();
    let old1 = random_file(&to.join("d1.img"), 1 << 20, 3);
    let old2 = random_file(&to.join("d2.img"), 1 << 20, 4);
    let out = cairn(&["restore", &pool, &m, "--to", &p(&to), "--force"]);
    assert_ne!(code(&out), 0);
    assert_eq!(
        entries(&to),
        vec!["d1.img".to_string(), "d2.img".to_string()]
    );
    assert!(
        std::fs::read(to.join("d1.img")).unwrap() == old1,
        "d1.img replaced"
    );
    assert!(
        std::fs::read(to.join("d2.img")).unwrap() == old2,
        "d2.img replaced"
    );
}

#[test]
fn a_target_filesystem_that_fills_up_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = SmallFs::mount(dir.path(), 4 << 20) else {
        return;
    };
    let root = dir.path();
    let pool = p(&root.join("pool"));
    ok(&["init", &pool]);
    let data = random_file(&root.join("big.img"), 8 << 20, 5);
    let snap = json(&[
        "backup",
        &pool,
        "--vm",
        "v",
        &p(&root.join("big.img")),
        "--json",
    ])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let to = fs.path.join("out");
    let out = cairn(&["restore", &pool, &snap, "--to", &p(&to)]);
    assert_ne!(code(&out), 0);
    assert!(
        stderr(&out).contains("No space left on device"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        entries(&to),
        Vec::<String>::new(),
        "nothing left on the full filesystem"
    );
    // The same restore elsewhere is whole.
    let to = root.join("elsewhere");
    ok(&["restore", &pool, &snap, "--to", &p(&to)]);
    assert!(std::fs::read(to.join("big.img")).unwrap() == data);
}

#[test]
fn sigint_and_sigterm_mid_restore_leave_nothing_and_keep_old_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pool = p(&root.join("pool"));
    ok(&["init", &pool]);
    let d1 = random_file(&root.join("d1.img"), 2 << 20, 6);
    let d2 = random_file(&root.join("d2.img"), 2 << 20, 7);
    let snap = json(&[
        "backup",
        &pool,
        "--vm",
        "m",
        &p(&root.join("d1.img")),
        &p(&root.join("d2.img")),
        "--json",
    ])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    for (sig, name, exit) in [(libc::SIGINT, "int", 130), (libc::SIGTERM, "term", 143)] {
        for force in [false, true] {
            let run = root.join(format!("{name}-{force}"));
            let to = run.join("to");
            std::fs::create_dir_all(&to).unwrap();
            let olds = force.then(|| {
                (
                    random_file(&to.join("d1.img"), 1 << 20, 8),
                    random_file(&to.join("d2.img"), 1 << 20, 9),
                )
            });
            let mut args = vec!["restore".to_string(), pool.clone(), snap.clone()];
            args.extend(["--to".to_string(), p(&to)]);
            if force {
                args.push("--force".into());
            }
            // Stopped between the two disks: d1 is written (as a partial
            // file), d2 not yet.
            let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut child =
                spawn_held(&arg_refs, &[], "restore-after-disk", &run).expect("reached the pause");
            assert!(
                entries(&to).iter().any(|e| e.ends_with(".cairn-partial")),
                "d1 is being written as a partial file: {:?}",
                entries(&to)
            );
            // SAFETY: signalling our own child.
            assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
            std::thread::sleep(Duration::from_millis(100)); // the signal is taken
            release("restore-after-disk", &run);
            let start = Instant::now();
            let status = loop {
                if let Some(st) = child.try_wait().unwrap() {
                    break st;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "{name}: did not stop"
                );
                std::thread::sleep(Duration::from_millis(10));
            };
            assert_eq!(status.code(), Some(exit), "{name} force={force}");
            match &olds {
                None => assert_eq!(entries(&to), Vec::<String>::new(), "{name}"),
                Some((o1, o2)) => {
                    assert_eq!(
                        entries(&to),
                        vec!["d1.img".to_string(), "d2.img".to_string()]
                    );
                    assert!(std::fs::read(to.join("d1.img")).unwrap() == *o1);
                    assert!(std::fs::read(to.join("d2.img")).unwrap() == *o2);
                }
            }
        }
    }
    // Not stopped: both disks whole.
    let to = root.join("whole");
    ok(&["restore", &pool, &snap, "--to", &p(&to)]);
    assert!(std::fs::read(to.join("d1.img")).unwrap() == d1);
    assert!(std::fs::read(to.join("d2.img")).unwrap() == d2);
}

/// `cairn restore` SIGKILLed at random times: a disk's name never holds a
/// partly written file — it holds nothing (or, with `--force`, the old
/// file) or the whole restored disk. The next restore into the same place
/// removes the partial files the killed ones left.
#[test]
fn restore_killed_at_random_times_never_leaves_a_torn_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pool = p(&root.join("pool"));
    ok(&["init", &pool]);
    let d1 = random_file(&root.join("d1.img"), 6 << 20, 11);
    let d2 = random_file(&root.join("d2.img"), 6 << 20, 12);
    let snap = json(&[
        "backup",
        &pool,
        "--vm",
        "m",
        &p(&root.join("d1.img")),
        &p(&root.join("d2.img")),
        "--json",
    ])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let mut rng = SampleRng::new(21);
    let mut kills = 0;
    for i in 0..12 {
        let force = i % 2 == 1;
        let to = root.join(format!("to-{i}"));
        std::fs::create_dir_all(&to).unwrap();
        let olds = force.then(|| {
            (
                random_file(&to.join("d1.img"), 1 << 20, 100 + i),
                random_file(&to.join("d2.img"), 1 << 20, 200 + i),
            )
        });
        let mut args = vec!["restore".to_string(), pool.clone(), snap.clone()];
        args.extend(["--to".to_string(), p(&to)]);
        if force {
            args.push("--force".into());
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(30_000)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        for (name, new, old) in [
            ("d1.img", &d1, olds.as_ref().map(|o| &o.0)),
            ("d2.img", &d2, olds.as_ref().map(|o| &o.1)),
        ] {
            match std::fs::read(to.join(name)) {
                Ok(got) => assert!(
                    got == *new || Some(&got) == old,
                    "run {i}: {name} holds a torn file ({} bytes)",
                    got.len()
                ),
                Err(_) => assert!(old.is_none(), "run {i}: the old {name} vanished"),
            }
        }
        // Restoring again there finishes the job and clears the partials.
        ok(&["restore", &pool, &snap, "--to", &p(&to), "--force"]);
        assert_eq!(
            entries(&to),
            vec!["d1.img".to_string(), "d2.img".to_string()],
            "run {i}"
        );
        assert!(std::fs::read(to.join("d1.img")).unwrap() == d1);
        assert!(std::fs::read(to.join("d2.img")).unwrap() == d2);
    }
    assert!(
        kills >= 6,
        "only {kills} restores were still running when killed"
    );
}
