//! The race that made Proxmox Backup Server lose data, forced in every
//! order (docs/DESIGN.md, "Garbage collection beside running backups"):
//! a backup in one process reuses the chunks of a snapshot that another
//! process forgets while a third collects garbage. Pause points
//! (`CAIRN_PAUSE_AT`) stop each process exactly where the protocol's table
//! says the order matters; afterwards the backup's snapshot must restore
//! bit-identical. Also: a backup frozen past its lease expiry is evicted and
//! withdraws its snapshot, and `cairn gc` killed with SIGKILL at any point
//! leaves a pool in which every snapshot restores and the next collection
//! finishes the job. On the local pool and on the S3 pool (s3s-fs).
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_engine::sample::SampleRng;
use cairn_pools::testing::S3Server;
use common::*;
use serde_json::Value;

/// A pool to race on: its address and the environment its processes need.
struct Race {
    dir: tempfile::TempDir,
    pool: String,
    env: Vec<(&'static str, String)>,
    _server: Option<S3Server>,
}

impl Race {
    fn local() -> Race {
        let dir = tempfile::tempdir().unwrap();
        let pool = p(&dir.path().join("pool"));
        let race = Race {
            dir,
            pool,
            env: Vec::new(),
            _server: None,
        };
        race.ok(&["init", &race.pool]);
        race
    }

    fn s3(name: &str) -> Race {
        let dir = tempfile::tempdir().unwrap();
        let server = S3Server::start();
        server.create_bucket(name);
        let pool = server.address(name, "p", "");
        let env = server.env();
        let race = Race {
            dir,
            pool,
            env,
            _server: Some(server),
        };
        race.ok(&["init", &race.pool]);
        race
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn ok(&self, args: &[&str]) -> String {
        ok_env(args, &self.env)
    }

    fn json(&self, args: &[&str]) -> Value {
        json_env(args, &self.env)
    }

    /// Starts `cairn args…` in the background, stopping at `pause` points.
    fn spawn(&self, args: &[&str], pause: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("CAIRN_PAUSE_AT", pause.join(","))
            .env("CAIRN_PAUSE_DIR", self.root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Waits until a spawned process reached `point` (fails after 60 s or
    /// if the process exits first).
    fn reached(&self, child: &mut Child, point: &str) {
        let flag = self.root().join(format!("{point}.reached"));
        let start = Instant::now();
        while !flag.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("exited ({status}) before reaching {point}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "never reached {point}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::remove_file(flag).unwrap();
    }

    /// Lets a process paused at `point` go on.
    fn go(&self, point: &str) {
        std::fs::write(self.root().join(format!("{point}.go")), b"").unwrap();
    }

    fn backup(&self, vm: &str, image: &Path) -> String {
        let out = self.json(&["backup", &self.pool, "--vm", vm, &p(image), "--json"]);
        out["snapshot"].as_str().unwrap().to_string()
    }

    fn restores(&self, id: &str, image: &Path) {
        let out = self.root().join("out");
        self.ok(&["restore", &self.pool, id, "--to", &p(&out), "--force"]);
        let name = image.file_name().unwrap();
        assert!(
            std::fs::read(out.join(name)).unwrap() == std::fs::read(image).unwrap(),
            "snapshot {id} does not restore its image"
        );
    }

    fn verify_clean(&self) {
        let v = self.json(&["verify", &self.pool, "--read-data", "--json"]);
        assert_eq!(v["ok"], true, "{v}");
    }

    fn snapshots(&self) -> Vec<String> {
        self.json(&["snapshots", &self.pool, "--json"])
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    }
}

fn finished(child: Child) -> (i32, Value, String) {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), json, stderr)
}

fn random_image(path: &Path, seed: u64) {
    let mut data = vec![0u8; 3 << 20];
    SampleRng::new(seed).fill(&mut data);
    std::fs::write(path, data).unwrap();
}

/// Snapshot S of VM `web` is the only holder of its chunks; it is forgotten
/// while backup B of the same data (so B reuses S's chunks) and a garbage
/// collection run, in the order `order` gives. B must restore.
fn pbs_race(race: &Race, order: &str) {
    let image = race.root().join("vda.img");
    random_image(&image, 7);
    let s = race.backup("web", &image);
    let gc_args = ["gc", race.pool.as_str(), "--json"];
    let b_args = [
        "backup",
        race.pool.as_str(),
        "--vm",
        "web",
        &p(&image),
        "--json",
    ];
    let (b, gc) = match order {
        // B loads the index (S's chunks found) before GC announces; GC must
        // wait for B, then see B's manifest in its second mark.
        "backup-first" => {
            let mut b = race.spawn(&b_args, &["backup-after-index"]);
            race.reached(&mut b, "backup-after-index");
            race.ok(&["forget", &race.pool, &s]);
            let mut gc = race.spawn(&gc_args, &[]);
            std::thread::sleep(Duration::from_millis(1500));
            assert!(
                gc.try_wait().unwrap().is_none(),
                "gc did not wait for the backup"
            );
            race.go("backup-after-index");
            (b, gc)
        }
        // GC has announced and waited (for nobody) before B starts; B's
        // lookups run then, its manifest is published after the sweep. B
        // must not have reused the condemned packs.
        "gc-first" => {
            race.ok(&["forget", &race.pool, &s]);
            let mut gc = race.spawn(&gc_args, &["gc-after-wait"]);
            race.reached(&mut gc, "gc-after-wait");
            let mut b = race.spawn(&b_args, &["backup-before-manifest"]);
            race.reached(&mut b, "backup-before-manifest");
            race.go("gc-after-wait");
            let (code, report, err) = finished(gc);
            assert_eq!(code, 0, "{err}");
            assert!(report["packs_deleted"].as_u64().unwrap() > 0, "{report}");
            race.go("backup-before-manifest");
            return check_b(race, finished(b), &image);
        }
        // B starts between GC's announcement and its wait: GC waits for it.
        "between" => {
            race.ok(&["forget", &race.pool, &s]);
            let mut gc = race.spawn(&gc_args, &["gc-after-notice"]);
            race.reached(&mut gc, "gc-after-notice");
            let mut b = race.spawn(&b_args, &["backup-before-manifest"]);
            race.reached(&mut b, "backup-before-manifest");
            race.go("gc-after-notice");
            std::thread::sleep(Duration::from_millis(1500));
            assert!(
                gc.try_wait().unwrap().is_none(),
                "gc did not wait for the backup"
            );
            race.go("backup-before-manifest");
            (b, gc)
        }
        _ => unreachable!(),
    };
    let b_out = finished(b);
    let (code, report, err) = finished(gc);
    assert_eq!(code, 0, "{err}");
    assert_eq!(report["writers_waited"], 1, "{report}");
    check_b(race, b_out, &image);
}

fn check_b(race: &Race, (code, out, err): (i32, Value, String), image: &Path) {
    assert_eq!(code, 0, "{err}");
    let id = out["snapshot"].as_str().unwrap();
    race.restores(id, image);
    race.verify_clean();
    // And once more after everything settled: another collection keeps it.
    race.ok(&["gc", &race.pool]);
    race.restores(id, image);
}

#[test]
fn a_backup_reusing_chunks_of_a_forgotten_snapshot_survives_gc_in_every_order() {
    for order in ["backup-first", "gc-first", "between"] {
        pbs_race(&Race::local(), order);
    }
}

#[test]
fn the_same_on_the_object_pool() {
    for (i, order) in ["backup-first", "gc-first", "between"].iter().enumerate() {
        pbs_race(&Race::s3(&format!("race{i}")), order);
    }
}

#[test]
fn a_frozen_backup_is_evicted_and_publishes_nothing() {
    // Frozen with its packs sealed but no segment covering them, and
    // frozen after its segment, before its manifest.
    for point in ["backup-before-segment", "backup-before-manifest"] {
        frozen_backup(point);
    }
}

fn frozen_backup(point: &str) {
    let race = Race::local();
    let image = race.root().join("vda.img");
    random_image(&image, 8);
    let s = race.backup("web", &image);
    // B renews its lease every 200 ms, then freezes (SIGSTOP: every thread,
    // the renewal too) at `point`.
    let b_args = [
        "backup",
        race.pool.as_str(),
        "--vm",
        "web",
        &p(&image),
        "--json",
        "--lease-renewal",
        "200ms",
    ];
    let mut b = race.spawn(&b_args, &[point]);
    race.reached(&mut b, point);
    let pid = b.id().to_string();
    tool("kill", &["-STOP", &pid]);
    race.ok(&["forget", &race.pool, &s]);
    // The collection sees B's lease unrenewed for its 1 s expiry: evicted.
    let report = race.json(&["gc", &race.pool, "--lease-expiry", "1s", "--json"]);
    assert_eq!(report["writers_evicted"], 1, "{point}: {report}");
    assert!(report["packs_deleted"].as_u64().unwrap() > 0, "{report}");
    tool("kill", &["-CONT", &pid]);
    race.go(point);
    let (code, _, err) = finished(b);
    assert_eq!(code, 5, "{point}: {err}");
    assert!(err.contains("lease"), "{err}");
    assert!(
        race.snapshots().is_empty(),
        "{point}: the evicted backup published nothing"
    );
    race.verify_clean();
    // The next backup stores everything again (nothing names B's deleted
    // packs) and restores.
    let again = race.backup("web", &image);
    race.restores(&again, &image);
    race.ok(&["gc", &race.pool]);
    race.restores(&again, &image);
}

#[test]
fn a_live_backup_is_waited_for_however_long_it_pauses() {
    // B renews every 200 ms while paused at a pause point (only its main
    // thread waits): a collection with a 1 s expiry must wait, not evict.
    let race = Race::local();
    let image = race.root().join("vda.img");
    random_image(&image, 9);
    let s = race.backup("web", &image);
    let b_args = [
        "backup",
        race.pool.as_str(),
        "--vm",
        "web",
        &p(&image),
        "--json",
        "--lease-renewal",
        "200ms",
    ];
    let mut b = race.spawn(&b_args, &["backup-after-index"]);
    race.reached(&mut b, "backup-after-index");
    race.ok(&["forget", &race.pool, &s]);
    let mut gc = race.spawn(&["gc", &race.pool, "--lease-expiry", "1s", "--json"], &[]);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        gc.try_wait().unwrap().is_none(),
        "gc did not wait for a live backup"
    );
    race.go("backup-after-index");
    let b_out = finished(b);
    let (code, report, err) = finished(gc);
    assert_eq!(code, 0, "{err}");
    assert_eq!(report["writers_evicted"], 0, "{report}");
    check_b(&race, b_out, &image);
}

#[test]
fn gc_killed_anywhere_loses_nothing_and_the_next_one_finishes() {
    let race = Race::local();
    let mut images: Vec<(PathBuf, String)> = Vec::new();
    let mut kills = 0;
    for round in 0..12u64 {
        // Garbage to collect: two new snapshots, the older one forgotten.
        let image = race.root().join(format!("vda-{round}.img"));
        random_image(&image, 1000 + round);
        let doomed = race.backup("web", &image);
        random_image(&image, 100 + round);
        let kept = race.backup("web", &image);
        race.ok(&["forget", &race.pool, &doomed]);
        images.push((image, kept));
        // Rounds 0–2 die exactly at a step; the others are let go after
        // their notice is written and die a few milliseconds later, in the
        // wait, the second mark, the copy or the deletions.
        let (point, delay) = match round {
            0 => ("gc-after-notice", None),
            1 => ("gc-after-wait", None),
            2 => ("gc-before-delete", None),
            r => ("gc-after-notice", Some(r * 7 % 40)),
        };
        let mut gc = race.spawn(
            &[
                "gc",
                &race.pool,
                "--repack-below",
                "95",
                "--lease-expiry",
                "1s",
            ],
            &[point],
        );
        race.reached(&mut gc, point);
        if let Some(ms) = delay {
            race.go(point);
            std::thread::sleep(Duration::from_millis(ms));
        }
        if gc.try_wait().unwrap().is_none() {
            kills += 1;
        }
        let _ = gc.kill();
        let _ = gc.wait();
        let _ = std::fs::remove_file(race.root().join(format!("{point}.go")));
        // Everything still restores, killed collection or not.
        for (image, id) in &images {
            race.restores(id, image);
        }
        // A killed collection's lease stops being renewed: after the expiry
        // the next collection takes over and finishes the job.
        std::thread::sleep(Duration::from_millis(1100));
        let report = race.json(&["gc", &race.pool, "--lease-expiry", "1s", "--json"]);
        assert_eq!(report["segments_after"], 1, "{report}");
        for (image, id) in &images {
            race.restores(id, image);
        }
        race.verify_clean();
        let left = std::fs::read_dir(Path::new(&race.pool).join("sweeps"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(left, 0, "a sweep notice was left behind");
    }
    assert!(
        kills >= 3,
        "only {kills} collections were killed while running"
    );
}
