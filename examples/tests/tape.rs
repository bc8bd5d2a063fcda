//! The `cairn` binary on a tape pool (the virtual tape library): a backup
//! larger than one cartridge spans several and restores bit-identical; the
//! tape catalog, the media state and the local copies are lost and rebuilt
//! by scanning the cartridges, and the restore is bit-identical again;
//! dedup → tape → dedup copies round-trip; bad tape addresses and options
//! fail clearly.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn media(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("media.json")).unwrap()).unwrap()
}

/// `cairn init tape:DIR/NAME --cartridges N --cartridge-size SIZE` (and
/// `extra`); the pool's directory and address.
fn new_tape(
    dir: &Path,
    name: &str,
    cartridges: &str,
    size: &str,
    extra: &[&str],
) -> (PathBuf, String) {
    let root = dir.join(name);
    let pool = format!("tape:{}", root.display());
    let mut args = vec![
        "init",
        &pool,
        "--cartridges",
        cartridges,
        "--cartridge-size",
        size,
    ];
    args.extend_from_slice(extra);
    ok(&args);
    (root, pool)
}

fn restore_equals(pool: &str, id: &str, disk: &str, at: &Path, want: &[u8]) {
    let _ = std::fs::remove_dir_all(at);
    ok(&["restore", pool, id, "--to", &p(at)]);
    assert!(std::fs::read(at.join(disk)).unwrap() == want, "{pool} {id}");
}

#[test]
fn a_backup_spans_cartridges_and_survives_losing_the_catalog() {
    let dir = tempfile::tempdir().unwrap();
    // 16 MiB cartridges with an 8 MiB early-warning zone: 8 MiB each.
    let (root, pool) = new_tape(dir.path(), "tape", "6", "16M", &[]);
    let img = dir.path().join("vda.img");
    let data = random_file(&img, 20 << 20, 1);
    let v = json(&["backup", &pool, "--vm", "web", &p(&img), "--json"]);
    let id = v["snapshot"].as_str().unwrap().to_string();
    let first_chunks = v["chunks_new"].clone();
    assert!(first_chunks.as_u64().unwrap() > 0, "{v}");
    let m = media(&root);
    let carts = m["sets"][0]["cartridges"].as_array().unwrap();
    assert!(carts.len() >= 3, "20 MiB on 8 MiB cartridges: {m}");
    let at = dir.path().join("r");
    restore_equals(&pool, &id, "vda.img", &at, &data);
    ok(&["verify", &pool, "--read-data"]);

    // Everything local is lost: only the cartridges remain.
    for f in ["tape-catalog", "media.json"] {
        std::fs::remove_file(root.join(f)).unwrap();
    }
    std::fs::remove_dir_all(root.join("pool")).unwrap();
    let out = cairn(&["snapshots", &pool]);
    assert_ne!(code(&out), 0, "no configuration without the catalog");
    let v = json(&["repair", &pool, "--tape-catalog", "--json"]);
    assert!(v["objects"].as_u64().unwrap() >= 4, "{v}");
    let listed = json(&["snapshots", &pool, "--json"]);
    assert_eq!(listed[0]["id"], id.as_str());
    restore_equals(&pool, &id, "vda.img", &at, &data);
    ok(&["verify", &pool, "--read-data"]);
    // And backups go on, on a new media set, which holds all it needs:
    // every chunk is written again.
    let v = json(&["backup", &pool, "--vm", "web", &p(&img), "--json"]);
    assert_eq!(v["chunks_new"], first_chunks);
    restore_equals(&pool, "latest", "vda.img", &at, &data);
    assert_eq!(media(&root)["sets"].as_array().unwrap().len(), 2);
}

#[test]
fn dedup_to_tape_to_dedup_copies_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let local = p(&dir.path().join("local"));
    let back = p(&dir.path().join("back"));
    ok(&["init", &local]);
    ok(&["init", &back]);
    let (_, tape) = new_tape(dir.path(), "tape", "4", "32M", &[]);
    let img = dir.path().join("vda.img");
    make_image(&img, 24 << 20, 3);
    let data = std::fs::read(&img).unwrap();
    let first = json(&["backup", &local, "--vm", "web", &p(&img), "--json"]);
    let id = first["snapshot"].as_str().unwrap().to_string();

    let to_tape = json(&["copy", &local, &tape, "--json"]);
    assert_eq!(to_tape["copied"][0], id.as_str());
    // The drive's side: every stored byte streamed, at a rate it held.
    let streamed = &to_tape["tape"];
    assert!(
        streamed["bytes_written"].as_u64().unwrap() >= to_tape["bytes_written"].as_u64().unwrap(),
        "{to_tape}"
    );
    assert!(
        streamed["rate_held_mb_s"].as_f64().unwrap() > 0.0,
        "{to_tape}"
    );
    let again = json(&["copy", &local, &tape, "--json"]);
    assert_eq!(
        (&again["chunks_copied"], &again["packs_written"]),
        (&0.into(), &0.into())
    );
    std::fs::remove_dir_all(dir.path().join("local")).unwrap();
    let from_tape = json(&["copy", &tape, &back, "--json"]);
    assert_eq!(from_tape["chunks_copied"], to_tape["chunks_copied"]);
    let at = dir.path().join("r");
    restore_equals(&tape, &id, "vda.img", &at, &data);
    restore_equals(&back, &id, "vda.img", &at, &data);
    ok(&["verify", &back, "--read-data"]);
}

#[test]
fn bad_tape_addresses_and_options_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (
            vec!["snapshots".into(), format!("tape:{}", file.display())],
            1,
            "not a directory",
        ),
        (
            vec!["snapshots".into(), "tape:/dev/nst0".into()],
            2,
            "changer",
        ),
        // A device form whose devices are not there (no drive or changer
        // on this machine): a clear error naming the changer.
        (
            vec![
                "snapshots".into(),
                format!(
                    "tape:/dev/nst9?changer=/dev/sg9&dir={}",
                    dir.path().display()
                ),
            ],
            1,
            "/dev/sg9",
        ),
        (
            vec!["snapshots".into(), "tape:".into()],
            2,
            "needs a directory",
        ),
        (
            vec![
                "snapshots".into(),
                format!("tape:{}", dir.path().join("none").display()),
            ],
            1,
            "does not exist",
        ),
        (
            vec![
                "init".into(),
                p(&dir.path().join("d")),
                "--cartridges".into(),
                "3".into(),
            ],
            2,
            "tape:DIR",
        ),
        (
            vec![
                "init".into(),
                format!("tape:{}", dir.path().join("t").display()),
                "--cartridge-size".into(),
                "12q".into(),
            ],
            2,
            "--cartridge-size",
        ),
        (
            vec![
                "init".into(),
                format!("tape:{}", dir.path().join("t").display()),
                "--cartridges".into(),
                "0".into(),
            ],
            2,
            "--cartridges",
        ),
        (
            vec![
                "repair".into(),
                p(&dir.path().join("d")),
                "--tape-catalog".into(),
            ],
            1,
            "",
        ),
    ];
    for (args, want, says) in cases {
        let out = cairn(&args);
        let err = stderr(&out);
        assert_eq!(code(&out), want, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // Initialised twice: refused, the first pool intact.
    let t = format!("tape:{}", dir.path().join("t2").display());
    ok(&["init", &t, "--cartridges", "2", "--cartridge-size", "8M"]);
    let out = cairn(&["init", &t]);
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("already"), "{}", stderr(&out));
    ok(&["snapshots", &t]);
}

/// Media sets from the command line: a closed set makes the next backup
/// a full one in a new set; retiring a set forgets the snapshots only it
/// holds (refused while one is protected), the rest restore; `--empty`
/// retires sets pruned empty; gc and bad options are refused.
#[test]
fn media_sets_close_and_retire_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let out = cairn(&[
        "init",
        &format!("tape:{}", dir.path().join("tape").display()),
        "--media-set-days",
        "3651",
    ]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let (_, pool) = new_tape(dir.path(), "tape", "6", "32M", &["--media-set-days", "30"]);
    let img = dir.path().join("vda.img");
    let data = random_file(&img, 6 << 20, 7);
    let backup = || json(&["backup", &pool, "--vm", "web", &p(&img), "--json"]);
    let a = backup();
    let closed = json(&["tape", "close", &pool, "--json"]);
    let set1 = closed["closed"].as_str().unwrap().to_string();
    let b = backup();
    assert!(a["chunks_new"].as_u64().unwrap() > 0, "{a}");
    assert_eq!(
        b["chunks_new"], a["chunks_new"],
        "a new set gets every chunk"
    );
    let sets = json(&["tape", "sets", &pool, "--json"]);
    assert_eq!(sets["rotation_days"], 30);
    let list = sets["media_sets"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{sets}");
    assert_eq!(
        (&list[0]["id"], &list[0]["state"]),
        (&set1.as_str().into(), &"closed".into())
    );
    assert_eq!(list[1]["state"], "open");
    assert_eq!(list[0]["snapshots"][0], a["snapshot"]);
    assert_eq!(list[1]["snapshots"][0], b["snapshot"]);
    let set2 = list[1]["id"].as_str().unwrap().to_string();
    // The first set's cartridges leave the library (blanked here): the
    // second set's snapshot restores from its own cartridges alone,
    // though the first set holds every one of its chunks too.
    for c in list[0]["cartridges"].as_array().unwrap() {
        let file = dir
            .path()
            .join("tape/library/cartridges")
            .join(c.as_str().unwrap());
        std::fs::write(file, b"").unwrap();
    }
    let at = dir.path().join("r");
    restore_equals(
        &pool,
        b["snapshot"].as_str().unwrap(),
        "vda.img",
        &at,
        &data,
    );

    // Protected: nothing is retired.
    let a_id = a["snapshot"].as_str().unwrap();
    ok(&["protect", &pool, a_id]);
    for dry in [false, true] {
        let mut args = vec!["tape", "retire", &pool, &set1[..8]];
        if dry {
            args.push("--dry-run");
        }
        let out = cairn(&args);
        assert_eq!(code(&out), 2, "{}", stderr(&out));
        assert!(stderr(&out).contains("protected"), "{}", stderr(&out));
    }
    assert_eq!(
        json(&["tape", "sets", &pool, "--json"])["media_sets"],
        sets["media_sets"]
    );
    ok(&["protect", &pool, a_id, "--off"]);
    let dry = json(&["tape", "retire", &pool, &set1, "--dry-run", "--json"]);
    assert_eq!(dry["forgotten"][0], a_id);
    assert_eq!(
        json(&["snapshots", &pool, "--json"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // The open set cannot be retired; an unknown one is named.
    let out = cairn(&["tape", "retire", &pool, &set2]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("tape close"), "{}", stderr(&out));
    let out = cairn(&["tape", "retire", &pool, "0123456789abcdef"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));

    let done = json(&["tape", "retire", &pool, &set1, "--json"]);
    assert_eq!(done["forgotten"][0], a_id);
    assert_eq!(done["retired"][0]["id"], set1.as_str());
    let listed = json(&["snapshots", &pool, "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], b["snapshot"]);
    restore_equals(
        &pool,
        b["snapshot"].as_str().unwrap(),
        "vda.img",
        &at,
        &data,
    );
    ok(&["verify", &pool, "--read-data"]);

    // Pruned empty, then retired with --empty.
    ok(&["tape", "close", &pool]);
    let c = backup();
    ok(&["forget", &pool, b["snapshot"].as_str().unwrap()]);
    let done = json(&["tape", "retire", &pool, "--empty", "--json"]);
    assert_eq!(done["retired"][0]["id"], set2.as_str(), "{done}");
    assert_eq!(done["forgotten"].as_array().unwrap().len(), 0);
    let sets = json(&["tape", "sets", &pool, "--json"]);
    assert_eq!(sets["media_sets"].as_array().unwrap().len(), 1, "{sets}");
    restore_equals(
        &pool,
        c["snapshot"].as_str().unwrap(),
        "vda.img",
        &at,
        &data,
    );

    // Every set retired, the last copy of the configuration with them:
    // the pool stays a pool, and the next backup's new set gets a copy.
    ok(&["tape", "close", &pool]);
    ok(&["forget", &pool, c["snapshot"].as_str().unwrap()]);
    ok(&["tape", "retire", &pool, "--empty"]);
    let sets = json(&["tape", "sets", &pool, "--json"]);
    assert!(sets["media_sets"].as_array().unwrap().is_empty(), "{sets}");
    let d = backup();
    restore_equals(
        &pool,
        d["snapshot"].as_str().unwrap(),
        "vda.img",
        &at,
        &data,
    );
    ok(&["verify", &pool, "--read-data"]);

    // Refused on tape, or for other pools.
    let out = cairn(&["gc", &pool]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("tape retire"), "{}", stderr(&out));
    let local = p(&dir.path().join("local"));
    ok(&["init", &local]);
    let out = cairn(&["tape", "sets", &local]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let out = cairn(&["init", &p(&dir.path().join("l2")), "--media-set-days", "3"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

/// `cairn copy` into a tape pool SIGKILLed at random points — mid-stream
/// to the drive, between objects, before or after a manifest: what the
/// pool lists restores, the catalog rebuilt from the cartridges agrees,
/// and a rerun finishes the job.
#[test]
fn copies_into_tape_killed_at_random_points_leave_a_consistent_pool() {
    let dir = tempfile::tempdir().unwrap();
    let local = p(&dir.path().join("local"));
    ok(&["init", &local]);
    let img = dir.path().join("vda.img");
    let mut data = random_file(&img, 12 << 20, 11);
    let mut images = Vec::new();
    for round in 0..3u8 {
        if round > 0 {
            let at = round as usize * (3 << 20);
            let fresh = random_file(&dir.path().join("noise"), 2 << 20, 50 + round as u64);
            data[at..at + (2 << 20)].copy_from_slice(&fresh);
            std::fs::write(&img, &data).unwrap();
        }
        let v = json(&["backup", &local, "--vm", "web", &p(&img), "--json"]);
        images.push((v["snapshot"].as_str().unwrap().to_string(), data.clone()));
    }
    let new_tape = |name: &str| new_tape(dir.path(), name, "4", "64M", &[]).1;
    let at = dir.path().join("r");
    let check = |pool: &str| {
        let listed = json(&["snapshots", pool, "--json"]);
        let listed: Vec<String> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        for id in &listed {
            let want = &images.iter().find(|(i, _)| i == id).unwrap().1;
            restore_equals(pool, id, "vda.img", &at, want);
        }
        ok(&["verify", pool, "--read-data"]);
        listed
    };
    let timing = new_tape("timing");
    let started = std::time::Instant::now();
    ok(&["copy", &local, &timing]);
    let whole = started.elapsed().as_millis().max(2) as u64;
    let mut rng = cairn_engine::sample::SampleRng::new(7);
    let mut killed = 0;
    for run in 0..5 {
        let pool = new_tape(&format!("t{run}"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["copy", &local, &pool])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(rng.below(whole)));
        let _ = child.kill();
        let status = child.wait().unwrap();
        killed += usize::from(std::os::unix::process::ExitStatusExt::signal(&status) == Some(9));
        let listed = check(&pool);
        // The rerun goes on in the same media set: what is listed there is
        // not copied again.
        let v = json(&["copy", &local, &pool, "--json"]);
        let copied = v["copied"].as_array().unwrap().len();
        let present = v["present"].as_array().unwrap().len();
        assert_eq!(copied + present, 3, "run {run}: {v}");
        assert_eq!(present, listed.len(), "run {run}: {v}");
        let all = check(&pool);
        assert_eq!(all.len(), 3, "run {run}");
        // The cartridges alone tell the same story.
        ok(&["repair", &pool, "--tape-catalog"]);
        assert_eq!(check(&pool), all, "run {run}");
    }
    assert!(
        killed >= 3,
        "{killed} of 5 copies were killed while running ({whole} ms each)"
    );
}
