//! `cairn copy` between pools: copies keep their snapshot ids and restore
//! bit-identical from the target alone; only missing chunks move (exact
//! counts on unique random data); damaged sources and bad input fail
//! cleanly with nothing published; SIGKILLed copies leave a target whose
//! listed snapshots all restore, and the next run finishes without moving
//! again what arrived. (The object pool's copies: `s3.rs`.)
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

const BLOCK: usize = 64 << 10;

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        Setup {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
    fn pool(&self, name: &str) -> String {
        let pool = p(&self.path(name));
        ok(&["init", &pool]);
        pool
    }
}

/// Backs up `img` as `vm` into `pool`; returns the snapshot id.
fn backup(pool: &str, vm: &str, img: &Path) -> String {
    let v = json(&["backup", pool, "--vm", vm, &p(img), "--json"]);
    v["snapshot"].as_str().unwrap().to_string()
}

fn snapshot_ids(pool: &str) -> BTreeSet<String> {
    let v = json(&["snapshots", pool, "--json"]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

/// Restores `id` from `pool` and returns disk `disk`'s bytes.
fn restored(pool: &str, id: &str, disk: &str, at: &Path) -> Vec<u8> {
    let _ = std::fs::remove_dir_all(at);
    ok(&["restore", pool, id, "--to", &p(at)]);
    std::fs::read(at.join(disk)).unwrap()
}

fn copy(args: &[&str]) -> Value {
    let mut all = vec!["copy"];
    all.extend_from_slice(args);
    all.push("--json");
    json(&all)
}

fn ids(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn copies_keep_ids_move_only_missing_chunks_and_restore_from_the_target() {
    let s = Setup::new();
    let (a, b, c) = (s.pool("a"), s.pool("b"), s.pool("c"));
    // Random data: every 64 KiB chunk unique, so chunk counts are exact.
    let web = s.path("web.img");
    let web1 = random_file(&web, 32 * BLOCK, 1);
    let first = backup(&a, "web", &web);
    let mut web2 = web1.clone();
    for block in [3usize, 10, 20] {
        web2[block * BLOCK..(block + 1) * BLOCK].copy_from_slice(&[block as u8; BLOCK]);
    }
    std::fs::write(&web, &web2).unwrap();
    let second = backup(&a, "web", &web);
    let db = s.path("db.img");
    let db1 = random_file(&db, 8 * BLOCK, 2);
    let db_snap = backup(&a, "db", &db);

    // The newest of web: all 32 of its chunks move, and its extent page
    // (a chunk too: 12 bytes of header, 37 per chunk extent).
    let page_raw = |extents: usize| (12 + 37 * extents) as u64;
    let v = copy(&[&a, &b, "latest", "--vm", "web"]);
    assert_eq!(ids(&v, "copied"), vec![second.clone()]);
    assert_eq!(v["chunks_copied"], 32 + 1);
    assert_eq!(v["chunks_referenced"], 32 + 1);
    assert_eq!(snapshot_ids(&b), BTreeSet::from([second.clone()]));
    // Everything: web's first snapshot needs only the 3 blocks it had
    // before they changed, db its 8 chunks; oldest first.
    let v = copy(&[&a, &b]);
    assert_eq!(ids(&v, "copied"), vec![first.clone(), db_snap.clone()]);
    assert_eq!(ids(&v, "present"), vec![second.clone()]);
    assert_eq!(v["chunks_copied"], 3 + 8 + 2);
    assert_eq!(
        v["bytes_copied_raw"],
        (11 * BLOCK) as u64 + page_raw(32) + page_raw(8)
    );
    assert_eq!(snapshot_ids(&a), snapshot_ids(&b));
    // A second run moves nothing.
    let v = copy(&[&a, &b]);
    assert!(ids(&v, "copied").is_empty());
    assert_eq!(ids(&v, "present").len(), 3);
    assert_eq!(
        (&v["chunks_copied"], &v["packs_written"]),
        (&0.into(), &0.into())
    );

    // The target alone: the source is gone, and a copy of the copy
    // restores the same bytes under the same ids.
    std::fs::remove_dir_all(s.path("a")).unwrap();
    copy(&[&b, &c]);
    for pool in [&b, &c] {
        let at = s.path("r");
        assert!(restored(pool, &first, "web.img", &at) == web1);
        assert!(restored(pool, &second, "web.img", &at) == web2);
        assert!(restored(pool, &db_snap, "db.img", &at) == db1);
        ok(&["verify", pool, "--read-data"]);
    }
    // Listings agree, VM names and times included.
    let (lb, lc) = (
        json(&["snapshots", &b, "--json"]),
        json(&["snapshots", &c, "--json"]),
    );
    assert_eq!(lb, lc);
}

#[test]
fn a_damaged_source_or_bad_input_fails_cleanly_with_nothing_published() {
    let s = Setup::new();
    let (a, b) = (s.pool("a"), s.pool("b"));
    let img = s.path("vda.img");
    random_file(&img, 16 * BLOCK, 3);
    let snap = backup(&a, "web", &img);

    // Bad input: nothing is written to the target.
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (vec![a.clone(), a.clone()], 2, "same pool"),
        (vec![a.clone(), p(&s.path("nowhere"))], 1, "does not exist"),
        (vec![a.clone(), "tape:/dev/null".into()], 2, "tape"),
        (vec![a.clone(), "ftp://x".into()], 2, "unknown pool kind"),
        (
            vec![a.clone(), b.clone(), "0123456789abcdef".into()],
            1,
            "0123456789abcdef",
        ),
    ];
    for (args, want, says) in cases {
        let mut all = vec!["copy".to_string()];
        all.extend(args.clone());
        let out = cairn(&all);
        let err = stderr(&out);
        assert_eq!(code(&out), want, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let empty = s.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = cairn(&["copy", &a, &p(&empty)]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("cairn init"), "{}", stderr(&out));
    assert!(snapshot_ids(&b).is_empty());

    // Selection errors.
    let out = cairn(&["copy", &a, &b, "--vm", "nosuch"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no snapshot of VM"),
        "{}",
        stderr(&out)
    );
    let out = cairn(&["copy", &a, &b, &snap, "--vm", "db"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("not of \"db\""), "{}", stderr(&out));
    assert!(snapshot_ids(&b).is_empty());

    // Another VM's snapshot in its own pack, and a third whose manifest
    // is cut short.
    let db = s.path("db.img");
    random_file(&db, 4 * BLOCK, 4);
    let db_snap = backup(&a, "db", &db);
    let cut_img = s.path("cut.img");
    random_file(&cut_img, 2 * BLOCK, 5);
    let cut = backup(&a, "cut", &cut_img);
    let manifest = s.path("a/snapshots").join(&cut);
    let len = std::fs::metadata(&manifest).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&manifest)
        .unwrap()
        .set_len(len - 7)
        .unwrap();

    // One flipped byte inside a blob of web's pack: web's copy names the
    // chunk and the pack and publishes nothing; db is copied; the cut
    // manifest is reported; exit 3; the target stays clean.
    let pack = walk_files(&s.path("a/packs"))
        .into_iter()
        .find(|f| std::fs::metadata(f).unwrap().len() > 16 * BLOCK as u64)
        .unwrap();
    let pack_name = pack.file_name().unwrap().to_str().unwrap().to_string();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[5 * BLOCK] ^= 0x40;
    std::fs::write(&pack, &bytes).unwrap();
    let out = cairn(&["copy", &a, &b, "--json"]);
    let err = stderr(&out);
    assert_eq!(code(&out), 3, "{err}");
    assert!(err.contains(&pack_name), "{err}");
    assert!(err.contains(&cut), "{err}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids(&v, "copied"), vec![db_snap.clone()]);
    let failed: BTreeSet<&str> = v["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["snapshot"].as_str().unwrap())
        .collect();
    assert_eq!(failed, BTreeSet::from([snap.as_str(), cut.as_str()]));
    assert_eq!(snapshot_ids(&b), BTreeSet::from([db_snap.clone()]));
    ok(&["verify", &b, "--read-data"]);
    // Repaired (and the cut manifest removed), the source copies what was
    // left: the target only ever saw good blobs.
    std::fs::remove_file(&manifest).unwrap();
    std::fs::write(&pack, {
        bytes[5 * BLOCK] ^= 0x40;
        &bytes
    })
    .unwrap();
    let v = copy(&[&a, &b, "--vm", "web"]);
    assert_eq!(ids(&v, "copied"), vec![snap]);
    ok(&["verify", &b, "--read-data"]);
}

/// A copy frozen (SIGSTOP) after its lease check and before its first
/// manifest, past its lease expiry: a collection of the target evicts it
/// and deletes the pack that snapshot deduplicated against. Resumed, the
/// copy publishes that manifest, then finds its lease lost at the next
/// snapshot's segment — and must withdraw the manifest it published.
#[test]
fn a_copy_evicted_by_a_collection_withdraws_what_it_published() {
    let s = Setup::new();
    let (a, b) = (s.pool("a"), s.pool("b"));
    let img = s.path("vda.img");
    random_file(&img, 16 * BLOCK, 11);
    let s1 = backup(&a, "web", &img);
    // The target holds the same chunks under a snapshot of its own.
    let t = backup(&b, "other", &img);
    let img2 = s.path("vdb.img");
    random_file(&img2, 16 * BLOCK, 12);
    let s2 = backup(&a, "web", &img2);
    let pauses = s.path("pauses");
    std::fs::create_dir_all(&pauses).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["copy", &a, &b, "--lease-renewal", "200ms"])
        .env("CAIRN_PAUSE_AT", "copy-before-manifest")
        .env("CAIRN_PAUSE_DIR", &pauses)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let flag = pauses.join("copy-before-manifest.reached");
    let start = std::time::Instant::now();
    while !flag.exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "never paused");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = child.id().to_string();
    tool("kill", &["-STOP", &pid]);
    ok(&["forget", &b, &t]);
    let report = json(&["gc", &b, "--lease-expiry", "1s", "--json"]);
    assert_eq!(report["writers_evicted"], 1, "{report}");
    assert!(report["packs_deleted"].as_u64().unwrap() > 0, "{report}");
    tool("kill", &["-CONT", &pid]);
    release("copy-before-manifest", &pauses);
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(code(&out), 5, "{err}");
    assert!(err.contains("lease"), "{err}");
    assert!(
        snapshot_ids(&b).is_empty(),
        "the evicted copy withdrew {s1}"
    );
    ok(&["verify", &b]);
    // Run again, it copies both, and they restore.
    let v = copy(&[&a, &b]);
    assert_eq!(ids(&v, "copied"), vec![s1.clone(), s2.clone()]);
    let at = s.path("r");
    assert!(restored(&b, &s1, "vda.img", &at) == std::fs::read(&img).unwrap());
    assert!(restored(&b, &s2, "vdb.img", &at) == std::fs::read(&img2).unwrap());
}

/// Every snapshot `pool` lists restores bit-identical to its image.
fn check_listed(pool: &str, images: &[(String, Vec<u8>)], at: &Path) {
    for id in snapshot_ids(pool) {
        let (_, data) = images
            .iter()
            .find(|(i, _)| *i == id)
            .unwrap_or_else(|| panic!("{pool} lists unknown snapshot {id}"));
        assert!(restored(pool, &id, "vda.img", at) == *data, "{id}");
    }
}

#[test]
fn killed_copies_leave_a_target_that_restores_and_a_rerun_finishes_the_job() {
    let s = Setup::new();
    let (a, b) = (s.pool("a"), s.pool("b"));
    let img = s.path("vda.img");
    // Three snapshots of 64 chunks each, 16 new per snapshot after the first.
    let mut data = random_file(&img, 64 * BLOCK, 7);
    let mut images = Vec::new();
    for round in 0..3u8 {
        if round > 0 {
            let mut noise = vec![0u8; 16 * BLOCK];
            cairn_engine::sample::SampleRng::new(100 + round as u64).fill(&mut noise);
            let at = (round as usize * 16) * BLOCK;
            data[at..at + 16 * BLOCK].copy_from_slice(&noise);
            std::fs::write(&img, &data).unwrap();
        }
        images.push((backup(&a, "web", &img), data.clone()));
    }
    let total_chunks = 64 + 16 + 16;
    // Each snapshot's extent list is one page, a chunk of its own.
    let pages = 3;
    let at = s.path("r");

    // Held right before the first manifest (its 64 chunks durable and
    // indexed), killed: no snapshot listed; the rerun moves only the rest.
    let pauses = s.path("pauses");
    let child = spawn_held(&["copy", &a, &b], &[], "copy-before-manifest", &pauses);
    let mut child = child.expect("the copy reached its first manifest");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(snapshot_ids(&b).is_empty());
    ok(&["verify", &b]);
    let v = copy(&[&a, &b]);
    assert_eq!(ids(&v, "copied").len(), 3);
    assert_eq!(v["chunks_copied"], total_chunks - 64 + pages - 1);
    check_listed(&b, &images, &at);

    // Killed right after the first manifest of a fresh target: that one
    // is listed and whole; the rerun moves the other two snapshots' chunks.
    let fresh = s.pool("fresh");
    let pauses = s.path("pauses-after");
    let mut child = spawn_held(&["copy", &a, &fresh], &[], "copy-after-manifest", &pauses)
        .expect("the copy published its first manifest");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(snapshot_ids(&fresh), BTreeSet::from([images[0].0.clone()]));
    check_listed(&fresh, &images, &at);
    let v = copy(&[&a, &fresh]);
    assert_eq!(ids(&v, "copied").len(), 2);
    assert_eq!(v["chunks_copied"], total_chunks - 64 + pages - 1);

    // Random kills into fresh targets, at delays spread over what a whole
    // copy takes on this machine: whatever is listed restores; the chunks
    // sealed before the kill are not moved again.
    // The fastest of two whole copies (the first may run on a cold page
    // cache and take longer than every later one), and kills within the
    // first three quarters of it, so most land while a copy runs.
    let whole = (0..2)
        .map(|i| {
            let timing = s.pool(&format!("timing{i}"));
            let started = std::time::Instant::now();
            copy(&[&a, &timing]);
            started.elapsed().as_millis() as u64
        })
        .min()
        .unwrap_or(0)
        .max(4);
    let mut rng = cairn_engine::sample::SampleRng::new(42);
    let mut killed = 0;
    for run in 0..6 {
        let target = s.pool(&format!("t{run}"));
        let delay = Duration::from_millis(rng.below(whole * 3 / 4));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["copy", &a, &target])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill();
        let status = child.wait().unwrap();
        killed += usize::from(std::os::unix::process::ExitStatusExt::signal(&status) == Some(9));
        check_listed(&target, &images, &at);
        ok(&["verify", &target]);
        let listed = snapshot_ids(&target).len();
        let v = copy(&[&a, &target]);
        assert_eq!(ids(&v, "copied").len() + listed, 3, "run {run}");
        check_listed(&target, &images, &at);
        ok(&["verify", &target, "--read-data"]);
        // Nothing was stored twice: the target holds each chunk once.
        let blobs = json(&["verify", &target, "--read-data", "--json"]);
        assert_eq!(
            blobs["blobs_read"],
            total_chunks + pages,
            "run {run}: {blobs}"
        );
    }
    // The kills did interrupt copies (not just find them finished).
    assert!(
        killed >= 3,
        "{killed} of 6 copies were killed while running ({whole} ms each)"
    );
}
