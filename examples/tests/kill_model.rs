//! The GC model with real crashes: random sequences of `cairn backup`
//! (changing data), `cairn prune`, `cairn forget` and `cairn gc`, each run
//! as its own process and, more often than not, SIGKILLed after a random
//! delay — at least 20 real kills of backups alone. The model knows which snapshots
//! must exist (their command finished) and which may (a killed backup may
//! have published its manifest; a killed prune or forget may have removed
//! some). After every step each listed snapshot restores bit-identical to
//! the image it was taken of, and every snapshot that must exist is listed;
//! a killed backup's retry stores no more than a backup of the same image
//! into the pool as it was before the killed run (a copy) — what the
//! killed run sealed is reused;
//! at the end a collection that is not killed leaves packs within 10 % of
//! the live bytes and `verify --read-data` clean.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_engine::sample::SampleRng;
use common::*;
use serde_json::Value;

const BLOCK: usize = 64 << 10;
const BLOCKS: usize = 64;

/// Runs `cairn args`; with `kill_after`, SIGKILLs it then if it still
/// runs. Returns (exit code if it exited on its own, whether it was killed).
fn run(args: &[String], kill_after: Option<Duration>) -> (Option<i32>, bool) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    if let Some(d) = kill_after {
        let start = Instant::now();
        while start.elapsed() < d {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            child.wait().unwrap();
            return (None, true);
        }
    }
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st.code(), false);
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{args:?} hangs");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Every listed snapshot: id → vm.
fn listed(pool: &str) -> BTreeMap<String, String> {
    let v = json(&["snapshots", pool, "--json"]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["vm"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn restored(pool: &str, id: &str, scratch: &Path) -> Vec<u8> {
    let out = scratch.join("out");
    let _ = std::fs::remove_dir_all(&out);
    ok(&["restore", pool, id, "--to", &p(&out)]);
    let data = std::fs::read(out.join("disk.img")).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    data
}

fn pack_bytes(dir: &Path) -> u64 {
    fn walk(d: &Path) -> u64 {
        std::fs::read_dir(d)
            .map(|it| {
                it.map(|e| {
                    let e = e.unwrap();
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        e.metadata().unwrap().len()
                    }
                })
                .sum()
            })
            .unwrap_or(0)
    }
    walk(&dir.join("packs"))
}

#[test]
fn random_sequences_with_real_sigkills_keep_every_snapshot_that_exists_restorable() {
    let dir = tempfile::tempdir().unwrap();
    let mut kills = 0;
    let mut backup_kills = 0;
    // Chunks killed backups had sealed that their retries reused.
    let mut retried_chunks = 0;
    let sequences: u64 = std::env::var("CAIRN_KILL_SEQUENCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    for seq in 0..sequences {
        let root = dir.path().join(format!("seq-{seq}"));
        std::fs::create_dir_all(&root).unwrap();
        let pool_dir = root.join("pool");
        let pool = p(&pool_dir);
        ok(&["init", &pool]);
        let mut rng = SampleRng::new(seq * 7919 + 1);
        let mut images: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        for vm in ["a", "b"] {
            let mut img = vec![0u8; BLOCKS * BLOCK];
            rng.fill(&mut img);
            images.insert(vm, img);
        }
        // Images each snapshot may hold: finished backups map to one; an
        // unknown listed id must match an image some killed backup of its
        // VM was taking.
        let mut must: BTreeSet<String> = BTreeSet::new();
        let mut image_of: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut attempted: Vec<(String, Vec<u8>)> = Vec::new();
        for step in 0..7 {
            let kill = if rng.below(10) < 7 {
                Some(Duration::from_micros(rng.below(25_000)))
            } else {
                None
            };
            match rng.below(7) {
                0..=3 => {
                    let vm = if rng.below(2) == 0 { "a" } else { "b" };
                    let img = images.get_mut(vm).unwrap();
                    for _ in 0..rng.below(6) {
                        let b = rng.below(BLOCKS as u64) as usize;
                        rng.fill(&mut img[b * BLOCK..(b + 1) * BLOCK]);
                    }
                    let file = root.join("disk.img");
                    std::fs::write(&file, &*img).unwrap();
                    attempted.push((vm.to_string(), img.clone()));
                    let before: BTreeSet<String> = listed(&pool).into_keys().collect();
                    let args = s(&[
                        "backup",
                        &pool,
                        "--vm",
                        vm,
                        &p(&file),
                        "--chunking",
                        "fixed:64K",
                        "--lease-renewal",
                        "100ms",
                        "--json",
                    ]);
                    // The pool as it was before this run, to learn what a
                    // backup of this image must store (a killed run's
                    // retry may store no more than that).
                    let copy = root.join("before");
                    let _ = std::fs::remove_dir_all(&copy);
                    let st = Command::new("cp")
                        .args(["-a", &pool, &p(&copy)])
                        .status()
                        .unwrap();
                    assert!(st.success());
                    let (code, killed) = run(&args, kill);
                    kills += killed as usize;
                    backup_kills += killed as usize;
                    if killed {
                        // The retry reuses what the killed run sealed: it
                        // stores at most what was not yet stored.
                        let retry = json(&args);
                        let mut fresh_args = args.clone();
                        fresh_args[1] = p(&copy);
                        let fresh = json(&fresh_args);
                        let (r, f) = (
                            retry["chunks_new"].as_u64().unwrap(),
                            fresh["chunks_new"].as_u64().unwrap(),
                        );
                        assert!(
                            r <= f,
                            "seq {seq} step {step}: retry stored {r} chunks, {f} were missing"
                        );
                        retried_chunks += f - r;
                        let id = retry["snapshot"].as_str().unwrap().to_string();
                        must.insert(id.clone());
                        image_of.insert(id, img.clone());
                    } else {
                        assert_eq!(code, Some(0), "seq {seq} step {step}: backup failed");
                        let new: Vec<String> = listed(&pool)
                            .into_keys()
                            .filter(|id| !before.contains(id))
                            .collect();
                        assert_eq!(new.len(), 1, "seq {seq} step {step}");
                        must.insert(new[0].clone());
                        image_of.insert(new[0].clone(), img.clone());
                    }
                }
                4 => {
                    let args = s(&["prune", &pool, "--keep-last", "1"]);
                    let (code, killed) = run(&args, kill);
                    kills += killed as usize;
                    // What prune removes may be gone whether it finished or
                    // not; it must keep the newest of each VM.
                    must.clear();
                    if !killed {
                        assert_eq!(code, Some(0), "seq {seq} step {step}: prune failed");
                    }
                }
                5 => {
                    let now = listed(&pool);
                    if let Some(id) = now.keys().next().cloned() {
                        let (code, killed) = run(&s(&["forget", &pool, &id]), kill);
                        kills += killed as usize;
                        must.remove(&id);
                        if !killed {
                            assert_eq!(code, Some(0), "seq {seq} step {step}: forget failed");
                        }
                    }
                }
                _ => {
                    let args = s(&["gc", &pool, "--lease-expiry", "1s", "--repack-below", "60"]);
                    let (code, killed) = run(&args, kill);
                    kills += killed as usize;
                    // Busy (5): a killed collection's notice is still fresh.
                    if !killed {
                        assert!(
                            matches!(code, Some(0) | Some(5)),
                            "seq {seq} step {step}: gc exit {code:?}"
                        );
                    }
                }
            }
            // Every snapshot that must exist is listed; every listed one
            // restores to an image it may hold.
            let now = listed(&pool);
            for id in &must {
                assert!(now.contains_key(id), "seq {seq} step {step}: {id} lost");
            }
            for (id, vm) in &now {
                let got = restored(&pool, id, &root);
                let fits = match image_of.get(id) {
                    Some(img) => *img == got,
                    None => attempted.iter().any(|(v, img)| v == vm && *img == got),
                };
                assert!(fits, "seq {seq} step {step}: {id} restores other bytes");
                image_of.entry(id.clone()).or_insert(got);
            }
        }
        // A collection that is not killed (after killed ones' leases and
        // notices expire) reclaims what is garbage.
        let start = Instant::now();
        loop {
            let out = cairn(&[
                "gc",
                &pool,
                "--lease-expiry",
                "1s",
                "--repack-below",
                "95",
                "--json",
            ]);
            if code(&out) == 0 {
                break;
            }
            assert_eq!(code(&out), 5, "seq {seq}: {}", stderr(&out));
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "seq {seq}: gc stays busy"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        let now = listed(&pool);
        let mut blocks = BTreeSet::new();
        for id in now.keys() {
            for b in image_of[id].chunks(BLOCK) {
                blocks.insert(b.to_vec());
            }
        }
        let live = (blocks.len() * BLOCK) as u64;
        let stored = pack_bytes(&pool_dir);
        assert!(
            stored >= live && stored as f64 <= live as f64 * 1.10 + 65536.0,
            "seq {seq}: {stored} bytes of packs for {live} live bytes"
        );
        let v: Value = json(&["verify", &pool, "--read-data", "--json"]);
        assert_eq!(v["ok"], true, "seq {seq}: {v}");
        // What killed writers left in tmp/ is gone (the pool's next opening
        // removes the files of writers that no longer run).
        let left: Vec<_> = std::fs::read_dir(pool_dir.join("tmp"))
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "seq {seq}: tmp/ still holds {left:?}");
        for id in now.keys() {
            assert!(restored(&pool, id, &root) == image_of[id]);
        }
    }
    eprintln!("{kills} real kills, {backup_kills} of backups; retries reused {retried_chunks} chunks the killed runs had sealed");
    assert!(kills >= 20, "only {kills} real kills");
    assert!(backup_kills >= 20, "only {backup_kills} backups killed");
    assert!(retried_chunks > 0, "no kill landed after a pack was sealed");
}
