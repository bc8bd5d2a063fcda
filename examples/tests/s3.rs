//! The `cairn` binary on the object pool, against a real S3-compatible
//! server (s3s-fs on 127.0.0.1): full and CBT backups, restores, damage
//! found by verify, pool information and request counts, bad addresses and
//! credentials.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use std::path::{Path, PathBuf};

use cairn_pools::testing::{S3Server, TEST_SECRET_KEY};
use common::*;
use serde_json::Value;

struct S3Setup {
    server: S3Server,
    dir: tempfile::TempDir,
    pool: String,
    env: Vec<(&'static str, String)>,
}

fn s3_setup(extra: &str) -> S3Setup {
    let server = S3Server::start();
    server.create_bucket("backups");
    let pool = server.address("backups", "cairn/pool1", extra);
    let env = server.env();
    ok_env(&["init", &pool], &env);
    S3Setup {
        server,
        dir: tempfile::tempdir().unwrap(),
        pool,
        env,
    }
}

impl S3Setup {
    fn root(&self) -> &Path {
        self.dir.path()
    }
    /// Every file the server stores under the pool's `packs/`.
    fn pack_files(&self) -> Vec<PathBuf> {
        let dir = self.server.root().join("backups/cairn/pool1/packs");
        let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            })
            .collect();
        out.sort();
        out
    }
}

#[test]
fn full_and_cbt_backups_restore_bit_identical_and_verify_finds_a_flipped_bit() {
    // Small parts so that packs go up as multipart uploads.
    let s = s3_setup("part_size=5M&pack_size=12M");
    let img = s.root().join("vda.qcow2");
    new_qcow2(&img, "48M");
    tool(
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 20M",
            "-c",
            "write -P 9 30M 1M",
            &p(&img),
        ],
    );
    let backup = |extra: &[&str]| -> Value {
        let mut args = vec!["backup", &s.pool, "--vm", "web", "--json", "--qcow2"];
        args.push(img.to_str().unwrap());
        args.extend_from_slice(&["--bitmap", "nightly", "--compression", "none"]);
        args.extend_from_slice(extra);
        json_env(&args, &s.env)
    };
    let full = backup(&[]);
    assert_eq!(full["mode"], "full");
    // Requests are counted and reported per GiB stored.
    let requests = &full["requests"];
    assert!(requests["total"].as_u64().unwrap() > 0, "{full}");
    assert!(requests["per_gib_stored"].as_f64().unwrap() > 0.0, "{full}");
    let v1 = raw_of(&img, &s.root().join("v1.raw"));

    tool(
        "qemu-io",
        &[
            "-c",
            "write -P 2 1M 64k",
            "-c",
            "write -P 3 40M 128k",
            &p(&img),
        ],
    );
    let inc = backup(&[]);
    assert_eq!(inc["mode"], "cbt");
    assert_eq!(inc["bytes_read"], 3 * 65536, "{inc}");
    let v2 = raw_of(&img, &s.root().join("v2.raw"));

    for (snap, expected) in [(&full, &v1), (&inc, &v2)] {
        let id = snap["snapshot"].as_str().unwrap();
        let out = s.root().join(format!("r-{id}"));
        let r = json_env(
            &["restore", &s.pool, id, "--to", &p(&out), "--json"],
            &s.env,
        );
        assert!(
            r["requests"]["per_gib_restored"].as_f64().unwrap() > 0.0,
            "{r}"
        );
        assert!(std::fs::read(out.join("vda.qcow2")).unwrap() == *expected);
    }
    ok_env(&["verify", &s.pool, "--read-data"], &s.env);

    // One flipped bit in a pack stored on the server is found, and names
    // the pack and both snapshots.
    let packs = s.pack_files();
    assert!(packs.len() >= 2, "{packs:?}");
    let victim = &packs[0];
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[100] ^= 0x10;
    std::fs::write(victim, &bytes).unwrap();
    let out = cairn_env(&["verify", &s.pool, "--read-data", "--json"], &s.env);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(
        report["damage"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["pack"] == name),
        "{report}"
    );
}

/// dedup → S3 → dedup: the copies keep their ids, restore bit-identical
/// from each pool alone, and a second copy moves nothing.
#[test]
fn copies_between_a_local_pool_and_s3_round_trip() {
    let s = s3_setup("part_size=5M&pack_size=12M");
    let local = p(&s.root().join("local"));
    let back = p(&s.root().join("back"));
    ok(&["init", &local]);
    ok(&["init", &back]);
    let img = s.root().join("vda.img");
    make_image(&img, 24 << 20, 5);
    let first = json(&["backup", &local, "--vm", "web", &p(&img), "--json"]);
    random_file(&s.root().join("noise"), 3 << 20, 9);
    let noise = std::fs::read(s.root().join("noise")).unwrap();
    let mut data = std::fs::read(&img).unwrap();
    data[8 << 20..11 << 20].copy_from_slice(&noise);
    std::fs::write(&img, &data).unwrap();
    let second = json(&["backup", &local, "--vm", "web", &p(&img), "--json"]);
    let ids: Vec<String> = [&first, &second]
        .iter()
        .map(|v| v["snapshot"].as_str().unwrap().to_string())
        .collect();

    let up = json_env(&["copy", &local, &s.pool, "--json"], &s.env);
    assert_eq!(up["copied"].as_array().unwrap().len(), 2, "{up}");
    // 12 MiB packs on the server: the blobs went up in more than one.
    assert!(up["packs_written"].as_u64().unwrap() >= 2, "{up}");
    assert!(up["requests"]["total"].as_u64().unwrap() > 0, "{up}");
    let again = json_env(&["copy", &local, &s.pool, "--json"], &s.env);
    assert_eq!(
        (
            &again["chunks_copied"],
            &again["present"].as_array().unwrap().len()
        ),
        (&0.into(), &2)
    );
    // Back down into an empty local pool, from the bucket alone.
    std::fs::remove_dir_all(s.root().join("local")).unwrap();
    let down = json_env(&["copy", &s.pool, &back, "--json"], &s.env);
    assert_eq!(down["chunks_copied"], up["chunks_copied"]);
    for pool in [&s.pool, &back] {
        let at = s.root().join("r");
        let _ = std::fs::remove_dir_all(&at);
        ok_env(&["restore", pool, &ids[1], "--to", &p(&at)], &s.env);
        assert!(std::fs::read(at.join("vda.img")).unwrap() == data);
        ok_env(&["verify", pool, "--read-data"], &s.env);
    }
    let listed = json(&["snapshots", &back, "--json"]);
    let got: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn pool_info_reports_what_the_pool_holds() {
    let s = s3_setup("");
    let img = s.root().join("disk.img");
    make_image(&img, 8 << 20, 3);
    ok_env(&["backup", &s.pool, "--vm", "a", &p(&img)], &s.env);
    ok_env(&["backup", &s.pool, "--vm", "b", &p(&img)], &s.env);
    let info = json_env(&["pool-info", &s.pool, "--json"], &s.env);
    assert_eq!(info["kind"], "s3");
    assert_eq!(info["snapshots"], 2);
    assert_eq!(info["logical_bytes"], 2 * (8u64 << 20));
    assert!(info["packs"].as_u64().unwrap() >= 1);
    assert!(info["dedup_ratio"].as_f64().unwrap() > 2.0, "{info}");
    assert_eq!(info["free_bytes"], Value::Null);
    assert!(!info.to_string().contains(TEST_SECRET_KEY));
    // Listing through a cache directory leaves a verified copy of the
    // snapshot catalog there (pool-info above merged the two manifests
    // into it), and lists the same from it.
    let cache = s.root().join("cache");
    let first = ok_env(&["snapshots", &s.pool, "--cache-dir", &p(&cache)], &s.env);
    let cached: Vec<_> = walk(&cache);
    assert!(
        cached.iter().filter(|f| f.contains("/catalog/")).count() == 1,
        "{cached:?}"
    );
    let again = ok_env(&["snapshots", &s.pool, "--cache-dir", &p(&cache)], &s.env);
    assert_eq!(first, again);
    // verify checks the pool, not the cache: a segment damaged on the
    // server is found although an intact copy is cached.
    ok_env(&["verify", &s.pool, "--cache-dir", &p(&cache)], &s.env);
    let index_dir = s.server.root().join("backups/cairn/pool1/index");
    let segment = std::fs::read_dir(&index_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().len() == 32)
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[40] ^= 1;
    std::fs::write(&segment, &bytes).unwrap();
    let out = cairn_env(&["verify", &s.pool, "--cache-dir", &p(&cache)], &s.env);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    // The local pool knows its free space.
    let local = s.root().join("local");
    ok(&["init", &p(&local)]);
    let info = json(&["pool-info", &p(&local), "--json"]);
    assert_eq!(info["kind"], "local");
    assert_eq!(info["snapshots"], 0);
    assert!(info["free_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn bad_addresses_and_credentials_fail_clearly_without_printing_secrets() {
    let server = S3Server::start();
    server.create_bucket("bkt");
    let good = server.address("bkt", "p", "");
    let mut env = server.env();
    // Malformed addresses: usage errors that show the accepted forms.
    for bad in [
        "s3://UPPER/x",
        "s3://bkt?colour=red",
        "gs://bkt/x",
        "s3://bkt?endpoint=http://user:hunter2@127.0.0.1:1",
    ] {
        let out = cairn_env(&["snapshots", bad], &env);
        assert_eq!(code(&out), 2, "{bad}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("s3://BUCKET"),
            "{bad}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("hunter2"), "{}", stderr(&out));
    }
    // Missing credentials.
    let out = cairn_env(
        &["init", &good],
        &[
            ("AWS_ACCESS_KEY_ID", String::new()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ],
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("AWS_SECRET_ACCESS_KEY"),
        "{}",
        stderr(&out)
    );
    // Wrong secret: refused by the server, named, never printed.
    for e in env.iter_mut() {
        if e.0 == "AWS_SECRET_ACCESS_KEY" {
            e.1 = "wrong-secret-value-xyz".into();
        }
    }
    let out = cairn_env(
        &["init", &format!("{good}&retry_timeout=2s"), "--json"],
        &env,
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let all = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
    assert!(!all.contains("wrong-secret-value-xyz"), "{all}");
    assert!(all.contains("config"), "names the object: {all}");
    // An unreachable server: fails within the retry budget, naming the pool.
    let dead = "s3://bkt/p?endpoint=http://127.0.0.1:9&timeout=1s&retry_timeout=3s";
    let started = std::time::Instant::now();
    let out = cairn_env(&["snapshots", dead], &server.env());
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

/// Every file under `dir`, as strings.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.display().to_string());
            }
        }
    }
    out
}
