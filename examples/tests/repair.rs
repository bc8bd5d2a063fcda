//! `cairn repair` killed with SIGKILL at every step (pause points) and at
//! random times never reduces the set of snapshots that restore, and a
//! second run finishes the job: the damaged pack quarantined, the intact
//! snapshots restoring bit-identical, the damaged one marked, and a new
//! backup of its data healing it.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_engine::sample::SampleRng;
use common::*;
use serde_json::Value;

/// A pool with VMs a and b (4 MiB each), one byte flipped in the first
/// blob of b's newest pack. Returns the snapshot ids (a, b).
fn damaged_pool(root: &Path) -> (String, String, String) {
    let pool = p(&root.join("pool"));
    ok(&["init", &pool]);
    make_image(&root.join("a.img"), 4 << 20, 1);
    make_image(&root.join("b.img"), 4 << 20, 2);
    let snap = |vm: &str| {
        json(&[
            "backup",
            &pool,
            "--vm",
            vm,
            &p(&root.join(format!("{vm}.img"))),
            "--json",
        ])["snapshot"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (sa, sb) = (snap("a"), snap("b"));
    let mut packs = walk_files(&root.join("pool").join("packs"));
    packs.sort_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap());
    let victim = packs.last().unwrap().clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[16 + 40] ^= 0x55;
    std::fs::write(&victim, &bytes).unwrap();
    // VM c: b's image with the damaged bytes rewritten, so c references
    // the damaged pack's other (intact) chunks only: after a repair it must
    // restore and must not be marked.
    let v = json_or_damage(&["verify", &pool, "--read-data", "--json"]);
    let range = v["damage"][0]["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["snapshot"] == sb.as_str())
        .unwrap()
        .clone();
    let (off, len) = (
        range["offset"].as_u64().unwrap() as usize,
        range["length"].as_u64().unwrap() as usize,
    );
    let mut c = std::fs::read(root.join("b.img")).unwrap();
    c[off..off + len].fill(0xc3);
    std::fs::write(root.join("c.img"), &c).unwrap();
    let sc = snap("c");
    (sa, sb, sc)
}

/// `cairn ARGS` parsed as JSON whether it exits 0 or 3 (damage found).
fn json_or_damage(args: &[&str]) -> Value {
    let out = cairn(args);
    assert!(matches!(code(&out), 0 | 3), "{args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .args(["-a", &p(from), &p(to)])
        .status()
        .unwrap();
    assert!(st.success());
}

fn spawn(args: &[&str], pause: &str, dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .env("CAIRN_PAUSE_AT", pause)
        .env("CAIRN_PAUSE_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits for `point` (false: the process exited before reaching it).
fn reached(child: &mut Child, dir: &Path, point: &str) -> bool {
    let flag = dir.join(format!("{point}.reached"));
    let start = Instant::now();
    while !flag.exists() {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never reached {point}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Whether `snap` restores bit-identical to `image`.
fn restores(pool: &str, snap: &str, image: &Path, scratch: &Path) -> bool {
    let out_dir = scratch.join(format!("out-{snap}"));
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = cairn(&["restore", pool, snap, "--to", &p(&out_dir)]);
    let name = image.file_name().unwrap();
    let same = code(&out) == 0
        && std::fs::read(out_dir.join(name)).unwrap() == std::fs::read(image).unwrap();
    let _ = std::fs::remove_dir_all(&out_dir);
    same
}

/// After a kill: a still restores; a second repair completes and leaves the
/// pool as an uninterrupted repair does; a new backup of b heals it.
fn check_after_kill(root: &Path, pool_dir: &Path, (sa, sb, sc): (&str, &str, &str), what: &str) {
    let pool = p(pool_dir);
    let scratch = pool_dir.with_file_name("scratch");
    let intact = [(sa, "a.img"), (sc, "c.img")];
    for (id, img) in intact {
        assert!(
            restores(&pool, id, &root.join(img), &scratch),
            "{what}: {img} lost"
        );
    }
    // The index may name a pack moved aside only until the next load.
    let out = cairn(&["repair", &pool, "--packs", "--json"]);
    assert_eq!(code(&out), 3, "{what}: {}", stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        r["damaged_snapshots"],
        serde_json::json!([sb]),
        "{what}: {r}"
    );
    assert_eq!(
        walk_files(&pool_dir.join("quarantine")).len(),
        1,
        "{what}: one pack quarantined"
    );
    for (id, img) in intact {
        assert!(
            restores(&pool, id, &root.join(img), &scratch),
            "{what}: {img} lost"
        );
    }
    assert!(
        !restores(&pool, sb, &root.join("b.img"), &scratch),
        "{what}"
    );
    let listed = json(&["snapshots", &pool, "--json"]);
    let damaged: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["damaged"] == true)
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(damaged, vec![sb], "{what}");
    ok(&["backup", &pool, "--vm", "b", &p(&root.join("b.img"))]);
    let v = json(&["verify", &pool, "--read-data", "--json"]);
    assert_eq!(v["ok"], true, "{what}: healed: {v}");
    assert!(restores(&pool, sb, &root.join("b.img"), &scratch), "{what}");
    assert!(json(&["snapshots", &pool, "--json"])
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["damaged"] == false));
}

#[test]
fn repair_killed_at_any_step_loses_nothing_and_a_second_run_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (sa, sb, sc) = damaged_pool(root);
    let ids = (sa.as_str(), sb.as_str(), sc.as_str());
    let pristine = root.join("pool");
    let mut killed = 0;
    for point in [
        "repair-after-salvage",
        "repair-after-quarantine",
        "repair-before-index",
        "rebuild-before-delete",
        "repair-before-marks",
    ] {
        let run = root.join(point);
        std::fs::create_dir_all(&run).unwrap();
        let pool_dir = run.join("pool");
        copy_dir(&pristine, &pool_dir);
        let mut child = spawn(&["repair", &p(&pool_dir), "--packs"], point, &run);
        assert!(reached(&mut child, &run, point), "{point}");
        child.kill().unwrap();
        child.wait().unwrap();
        killed += 1;
        check_after_kill(root, &pool_dir, ids, point);
    }
    // `repair --index` killed between writing its segment and deleting
    // the old ones.
    let run = root.join("index-kill");
    std::fs::create_dir_all(&run).unwrap();
    let pool_dir = run.join("pool");
    copy_dir(&pristine, &pool_dir);
    let mut child = spawn(
        &["repair", &p(&pool_dir), "--index"],
        "rebuild-before-delete",
        &run,
    );
    assert!(reached(&mut child, &run, "rebuild-before-delete"));
    child.kill().unwrap();
    child.wait().unwrap();
    killed += 1;
    check_after_kill(root, &pool_dir, ids, "repair --index");

    // Random times: a repair of this pool takes tens of milliseconds.
    let mut rng = SampleRng::new(5);
    for i in 0..8 {
        let run = root.join(format!("random-{i}"));
        std::fs::create_dir_all(&run).unwrap();
        let pool_dir = run.join("pool");
        copy_dir(&pristine, &pool_dir);
        let mut child = spawn(&["repair", &p(&pool_dir), "--packs"], "", &run);
        std::thread::sleep(Duration::from_millis(rng.below(25)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        child.wait().unwrap();
        check_after_kill(root, &pool_dir, ids, &format!("random kill {i}"));
    }
    assert!(killed >= 8, "{killed} kills");
}
