//! The standard pool (`standard:DIR`): each backup set — a full and the CBT
//! incrementals after it — in a folder of its own. A qcow2 VM backed up
//! five times with sets of 1 + 3: the fifth backup starts a new set with a
//! full read; removing the first set (forget its snapshots, gc) deletes
//! exactly its folder and leaves every file of the second untouched, which
//! still restores bit-identical. Copies in and out keep ids; bad options
//! fail clearly.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;

/// Every file under `dir` with its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    walk_files(dir)
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(&f).unwrap();
            (f.strip_prefix(dir).unwrap().display().to_string(), bytes)
        })
        .collect()
}

#[test]
fn a_set_is_a_full_and_its_incrementals_and_goes_away_whole() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("std");
    let pool = format!("standard:{}", root.display());
    ok(&["init", &pool, "--set-length", "3"]);
    let img = dir.path().join("vda.qcow2");
    new_qcow2(&img, "16M");
    tool("qemu-io", &["-c", "write -P 1 0 4M", &p(&img)]);
    let mut modes = Vec::new();
    let mut ids = Vec::new();
    for round in 0..5u32 {
        if round > 0 {
            let cmd = format!("write -P {} {}M 64k", round + 1, round * 2);
            tool("qemu-io", &["-c", &cmd, &p(&img)]);
        }
        let v = json(&[
            "backup",
            &pool,
            "--vm",
            "web",
            "--qcow2",
            &p(&img),
            "--bitmap",
            "nightly",
            "--json",
        ]);
        modes.push(v["mode"].as_str().unwrap().to_string());
        ids.push(v["snapshot"].as_str().unwrap().to_string());
    }
    // A full, three CBT incrementals, then a new set: a full again.
    assert_eq!(modes, ["full", "cbt", "cbt", "cbt", "full"]);
    let sets = json(&["sets", &pool, "--json"]);
    let sets = sets.as_array().unwrap();
    assert_eq!(sets.len(), 2, "{sets:?}");
    assert_eq!(
        (&sets[0]["snapshots"], &sets[1]["snapshots"]),
        (&4.into(), &1.into())
    );
    let (first, second) = (
        sets[0]["set"].as_str().unwrap().to_string(),
        sets[1]["set"].as_str().unwrap().to_string(),
    );
    // The new set holds every chunk itself: its full stored everything.
    let second_dir = root.join("sets").join(&second);
    let before = files(&second_dir);
    assert!(
        before.keys().any(|k| k.starts_with("packs/")),
        "{:?}",
        before.keys()
    );

    // Forget the first set's snapshots and collect: its folder goes whole.
    let mut args = vec!["forget".to_string(), pool.clone()];
    args.extend(ids[..4].iter().cloned());
    ok(&args);
    let v = json(&["gc", &pool, "--json"]);
    assert_eq!(v["sets_removed"][0], first.as_str(), "{v}");
    assert!(!root.join("sets").join(&first).exists());
    // Exactly its files: the second set's are all there, byte for byte
    // (its own collection found nothing to do).
    assert_eq!(files(&second_dir), before);
    let expected = raw_of(&img, &dir.path().join("expected.raw"));
    let out = dir.path().join("out");
    ok(&["restore", &pool, &ids[4], "--to", &p(&out)]);
    assert!(std::fs::read(out.join("vda.qcow2")).unwrap() == expected);
    ok(&["verify", &pool, "--read-data"]);
    // The chain goes on in the second set with CBT.
    tool("qemu-io", &["-c", "write -P 9 8M 64k", &p(&img)]);
    let v = json(&[
        "backup",
        &pool,
        "--vm",
        "web",
        "--qcow2",
        &p(&img),
        "--bitmap",
        "nightly",
        "--json",
    ]);
    assert_eq!(v["mode"], "cbt");
    assert_eq!(
        json(&["sets", &pool, "--json"]).as_array().unwrap().len(),
        1
    );
}

/// A set's length counts the backups that went into it, not the snapshots
/// left: pruning a set does not keep it open for ever.
#[test]
fn pruning_does_not_keep_a_set_open() {
    let dir = tempfile::tempdir().unwrap();
    let pool = format!("standard:{}", dir.path().join("std").display());
    ok(&["init", &pool, "--set-length", "1"]);
    let img = dir.path().join("vda.img");
    let mut data = random_file(&img, 1 << 20, 5);
    let mut backup = |round: usize| {
        data[round * 65536] ^= 1;
        std::fs::write(&img, &data).unwrap();
        json(&["backup", &pool, "--vm", "web", &p(&img), "--json"])
    };
    backup(0);
    backup(1);
    ok(&["prune", &pool, "--keep-last", "1"]);
    // One snapshot left in the first set, but two backups went into it.
    let v = backup(2);
    assert_eq!(v["chunks_new"], 16, "a new set stores everything: {v}");
    let sets = json(&["sets", &pool, "--json"]);
    assert_eq!(sets.as_array().unwrap().len(), 2, "{sets}");
}

#[test]
fn copies_into_and_out_of_a_standard_pool_keep_ids_per_set() {
    let dir = tempfile::tempdir().unwrap();
    let local = p(&dir.path().join("local"));
    let back = p(&dir.path().join("back"));
    let std_pool = format!("standard:{}", dir.path().join("std").display());
    ok(&["init", &local]);
    ok(&["init", &back]);
    ok(&["init", &std_pool, "--set-length", "1"]);
    let img = dir.path().join("vda.img");
    let mut data = random_file(&img, 1 << 20, 1);
    let mut ids = Vec::new();
    for round in 0..3u8 {
        data[round as usize * 65536] ^= 0xff;
        std::fs::write(&img, &data).unwrap();
        let v = json(&["backup", &local, "--vm", "web", &p(&img), "--json"]);
        ids.push(v["snapshot"].as_str().unwrap().to_string());
    }
    let v = json(&["copy", &local, &std_pool, "--json"]);
    assert_eq!(v["copied"].as_array().unwrap().len(), 3, "{v}");
    // Sets of 1 + 1: the third snapshot opened a second set, which holds
    // all of its chunks again (16 of 1 MiB).
    let sets = json(&["sets", &std_pool, "--json"]);
    let counts: Vec<u64> = sets
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["snapshots"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, vec![2, 1]);
    // Plus the three snapshots' extent pages.
    assert_eq!(v["chunks_copied"], 16 + 1 + 16 + 3);
    let again = json(&["copy", &local, &std_pool, "--json"]);
    assert_eq!(again["present"].as_array().unwrap().len(), 3);
    assert_eq!(again["chunks_copied"], 0);
    let out = json(&["copy", &std_pool, &back, "--json"]);
    assert_eq!(out["copied"].as_array().unwrap().len(), 3);
    let at = dir.path().join("r");
    ok(&["restore", &back, &ids[2], "--to", &p(&at)]);
    assert!(std::fs::read(at.join("vda.img")).unwrap() == data);
}

#[test]
fn bad_standard_options_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let local = p(&dir.path().join("local"));
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (
            vec![
                "init".into(),
                local.clone(),
                "--set-length".into(),
                "3".into(),
            ],
            2,
            "standard:DIR",
        ),
        (
            vec![
                "init".into(),
                format!("standard:{}", dir.path().join("s").display()),
                "--set-length".into(),
                "400".into(),
            ],
            2,
            "0–365",
        ),
        (vec!["sets".into(), local.clone()], 2, "not a standard"),
        (
            vec![
                "snapshots".into(),
                format!("standard:{}", dir.path().join("none").display()),
            ],
            1,
            "does not exist",
        ),
        (
            vec!["snapshots".into(), "standard:".into()],
            2,
            "needs a directory",
        ),
    ];
    for (args, want, says) in cases {
        let out = cairn(&args);
        let err = stderr(&out);
        assert_eq!(code(&out), want, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // A directory that is not a standard pool.
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let out = cairn(&["snapshots", &format!("standard:{}", plain.display())]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("cairn init"), "{}", stderr(&out));
}
