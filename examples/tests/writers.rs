//! Several `cairn backup` processes writing into one pool at once, with no
//! lock: on the local pool and on the object pool (s3s-fs). Afterwards
//! every snapshot restores bit-identical and verify reads clean; a writer
//! killed with SIGKILL mid-backup leaves a pool in which every listed
//! snapshot restores.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cairn_pools::testing::S3Server;
use common::*;

const WRITERS: usize = 4;

/// An image shared in part by every VM (so writers race to store the same
/// chunks) and in part its own.
fn vm_image(path: &Path, vm: usize, round: u8) {
    make_image(path, 6 << 20, 100 + vm as u64);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let shared: Vec<u8> = (0..1u32 << 20).map(|i| (i % 241) as u8 ^ round).collect();
    std::os::unix::fs::FileExt::write_all_at(&f, &shared, 2 << 20).unwrap();
}

fn spawn_backup(pool: &str, vm: &str, img: &Path, env: &[(&str, String)]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["backup", pool, "--vm", vm, img.to_str().unwrap(), "--json"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Two rounds of WRITERS concurrent backups; returns (snapshot id, image
/// copy) per backup.
fn concurrent_rounds(pool: &str, dir: &Path, env: &[(&str, String)]) -> Vec<(String, PathBuf)> {
    let mut done = Vec::new();
    for round in 0..2u8 {
        let mut children = Vec::new();
        for vm in 0..WRITERS {
            let img = dir.join(format!("vm{vm}-r{round}.img"));
            vm_image(&img, vm, round);
            children.push((spawn_backup(pool, &format!("vm{vm}"), &img, env), img));
        }
        for (child, img) in children {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            done.push((v["snapshot"].as_str().unwrap().to_string(), img));
        }
    }
    done
}

/// Every listed snapshot restores bit-identical to its image (when known)
/// and verify --read-data is clean.
fn check_pool(pool: &str, dir: &Path, env: &[(&str, String)], known: &[(String, PathBuf)]) {
    let list = json_env(&["snapshots", pool, "--json"], env);
    let ids: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    for (id, img) in known {
        assert!(ids.contains(id), "snapshot {id} not listed");
        let out = dir.join(format!("restore-{id}"));
        ok_env(&["restore", pool, id, "--to", out.to_str().unwrap()], env);
        let name = img.file_name().unwrap();
        assert!(
            std::fs::read(out.join(name)).unwrap() == std::fs::read(img).unwrap(),
            "snapshot {id} differs from {}",
            img.display()
        );
    }
    for id in ids.iter().filter(|id| !known.iter().any(|(k, _)| k == *id)) {
        let out = dir.join(format!("restore-{id}"));
        ok_env(&["restore", pool, id, "--to", out.to_str().unwrap()], env);
    }
    ok_env(&["verify", pool, "--read-data"], env);
}

#[test]
fn four_writers_share_a_local_pool() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool").display().to_string();
    ok(&["init", &pool]);
    let done = concurrent_rounds(&pool, dir.path(), &[]);
    assert_eq!(done.len(), 2 * WRITERS);
    check_pool(&pool, dir.path(), &[], &done);
}

#[test]
fn four_writers_share_an_object_pool() {
    let server = S3Server::start();
    server.create_bucket("shared");
    let pool = server.address("shared", "p", "");
    let env = server.env();
    ok_env(&["init", &pool], &env);
    let dir = tempfile::tempdir().unwrap();
    let done = concurrent_rounds(&pool, dir.path(), &env);
    assert_eq!(done.len(), 2 * WRITERS);
    check_pool(&pool, dir.path(), &env, &done);
}

/// Kills one writer with SIGKILL partway while another runs; the pool
/// stays consistent. The victim backs up a stream the test feeds, so it is
/// certainly still running when the signal comes: once early (8 MiB sent,
/// nothing sealed yet) and once late (96 MiB sent, packs sealed).
fn killed_writer(pool: &str, dir: &Path, env: &[(&str, String)]) {
    use std::io::Write as _;
    let mut known = Vec::new();
    for (round, mib) in [(0u8, 8usize), (1, 96)] {
        let mut victim = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["backup", pool, "--vm", "victim", "--stdin", "stream"])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let img = dir.join(format!("other-{round}.img"));
        vm_image(&img, 7, round);
        let other = spawn_backup(pool, "other", &img, env);
        let mut input = victim.stdin.take().unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ round as u64;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            input.write_all(&buf).unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(victim.id() as libc::pid_t, libc::SIGKILL) };
        drop(input);
        let status = victim.wait().unwrap();
        // Killed mid-backup: the stream never ended.
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        let out = other.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        known.push((v["snapshot"].as_str().unwrap().to_string(), img));
    }
    // The other writer's snapshots restore bit-identical, every listed one
    // restores, verify is clean (the victim's sealed packs are indexed from
    // their tables and verified too).
    check_pool(pool, dir, env, &known);
}

#[test]
fn a_killed_writer_leaves_every_listed_snapshot_restorable_local() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool").display().to_string();
    ok(&["init", &pool]);
    killed_writer(&pool, dir.path(), &[]);
}

#[test]
fn a_killed_writer_leaves_every_listed_snapshot_restorable_s3() {
    let server = S3Server::start();
    server.create_bucket("killed");
    let pool = server.address("killed", "p", "part_size=5M&pack_size=20M");
    let env = server.env();
    ok_env(&["init", &pool], &env);
    let dir = tempfile::tempdir().unwrap();
    killed_writer(&pool, dir.path(), &env);
}

/// Two backups of the same VM at once (each of a different version of its
/// image; both held at a pause point until both have stored their packs
/// and segment, so they certainly overlap), twice over: both succeed, both
/// snapshots restore bit-identical to their own image, and verify is clean.
#[test]
fn two_backups_of_the_same_vm_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool").display().to_string();
    ok(&["init", &pool]);
    let mut done = Vec::new();
    for round in 0..2u8 {
        let mut children = Vec::new();
        for copy in 0..2usize {
            let img = dir.path().join(format!("same-r{round}-{copy}.img"));
            vm_image(&img, copy, round);
            let pause = dir.path().join(format!("pause-r{round}-{copy}"));
            std::fs::create_dir_all(&pause).unwrap();
            let env = [
                ("CAIRN_PAUSE_AT", "backup-before-manifest".to_string()),
                ("CAIRN_PAUSE_DIR", pause.display().to_string()),
            ];
            children.push((spawn_backup(&pool, "same", &img, &env), img, pause));
        }
        for (child, _, pause) in &mut children {
            let start = std::time::Instant::now();
            while !pause.join("backup-before-manifest.reached").exists() {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "exited before the pause"
                );
                assert!(start.elapsed() < Duration::from_secs(60));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for (_, _, pause) in &children {
            std::fs::write(pause.join("backup-before-manifest.go"), b"").unwrap();
        }
        for (child, img, _) in children {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            done.push((v["snapshot"].as_str().unwrap().to_string(), img));
        }
    }
    let ids: std::collections::BTreeSet<&String> = done.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 4, "four distinct snapshots");
    check_pool(&pool, dir.path(), &[], &done);
}
