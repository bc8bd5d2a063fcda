//! The object pool behind a fault-injecting HTTP proxy (503 SlowDown,
//! connection resets, stalls past the client timeout, uploads cut halfway)
//! in front of a real s3s-fs server: backups and restores complete through
//! retries; a run whose faults exceed the retry budget fails cleanly; no
//! half-written object is taken as valid and earlier snapshots restore.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use std::time::Duration;

use cairn_pools::testing::{FaultPlan, FaultProxy, S3Server};
use common::*;
use serde_json::Value;

#[test]
fn backups_and_restores_complete_through_ten_percent_faults() {
    let server = S3Server::start();
    server.create_bucket("faulty");
    let env = server.env();
    let direct = server.address("faulty", "p", "part_size=5M&pack_size=16M");
    ok_env(&["init", &direct], &env);
    let proxy = FaultProxy::start(
        server.port(),
        FaultPlan {
            fail_percent: 10,
            stall: Duration::from_millis(2500),
            seed: 7,
        },
    );
    let through = format!(
        "s3://faulty/p?endpoint={}&part_size=5M&pack_size=16M&timeout=2s&retry_timeout=90s",
        proxy.endpoint()
    );
    let dir = tempfile::tempdir().unwrap();
    let mut done = Vec::new();
    for round in 0..3u64 {
        let img = dir.path().join(format!("disk{round}.img"));
        make_image(&img, 24 << 20, 40 + round);
        let b = json_env(
            &["backup", &through, "--vm", "vm", &p(&img), "--json"],
            &env,
        );
        done.push((b["snapshot"].as_str().unwrap().to_string(), img));
    }
    for (id, img) in &done {
        let out = dir.path().join(format!("r-{id}"));
        ok_env(&["restore", &through, id, "--to", &p(&out)], &env);
        let name = img.file_name().unwrap();
        assert!(std::fs::read(out.join(name)).unwrap() == std::fs::read(img).unwrap());
    }
    eprintln!("faults injected: {:?}", proxy.counts());
    assert!(
        proxy.faults() >= 3,
        "the proxy injected too few faults: {:?}",
        proxy.counts()
    );
    // Read back directly: every object the backups made is whole.
    ok_env(&["verify", &direct, "--read-data"], &env);
}

#[test]
fn faults_beyond_the_retry_budget_fail_cleanly_and_lose_nothing() {
    let server = S3Server::start();
    server.create_bucket("broken");
    let env = server.env();
    let direct = server.address("broken", "p", "part_size=5M&pack_size=16M");
    ok_env(&["init", &direct], &env);
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.img");
    make_image(&first, 12 << 20, 1);
    let good = json_env(
        &["backup", &direct, "--vm", "vm", &p(&first), "--json"],
        &env,
    );
    let proxy = FaultProxy::start(
        server.port(),
        FaultPlan {
            fail_percent: 100,
            stall: Duration::from_millis(1500),
            seed: 3,
        },
    );
    let through = format!(
        "s3://broken/p?endpoint={}&part_size=5M&pack_size=16M&timeout=1s&retry_timeout=4s",
        proxy.endpoint()
    );
    let second = dir.path().join("second.img");
    make_image(&second, 24 << 20, 2);
    let started = std::time::Instant::now();
    let out = cairn_env(&["backup", &through, "--vm", "vm", &p(&second)], &env);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("config"),
        "names the object: {}",
        stderr(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(60));

    // A backup whose uploads fail partway (the config and index reads get
    // through, then every pack upload is cut or refused).
    let half = FaultProxy::start(
        server.port(),
        FaultPlan {
            fail_percent: 60,
            stall: Duration::from_millis(1500),
            seed: 11,
        },
    );
    let through_half = format!(
        "s3://broken/p?endpoint={}&part_size=5M&pack_size=16M&timeout=1s&retry_timeout=2s",
        half.endpoint()
    );
    for _ in 0..3 {
        let _ = cairn_env(&["backup", &through_half, "--vm", "vm", &p(&second)], &env);
    }
    // Whatever landed, the earlier snapshot restores and every listed one
    // does; damage, if any partial object was stored, affects no snapshot.
    let list = json_env(&["snapshots", &direct, "--json"], &env);
    for snap in list.as_array().unwrap() {
        let id = snap["id"].as_str().unwrap();
        let to = dir.path().join(format!("r-{id}"));
        ok_env(&["restore", &direct, id, "--to", &p(&to)], &env);
        if id == good["snapshot"].as_str().unwrap() {
            assert!(std::fs::read(to.join("first.img")).unwrap() == std::fs::read(&first).unwrap());
        }
    }
    let out = cairn_env(&["verify", &direct, "--read-data", "--json"], &env);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!(
        "faults injected: {:?}; verify: {}",
        half.counts(),
        report["damage"]
    );
    assert_eq!(
        report["damaged_snapshots"],
        serde_json::json!([]),
        "{report}"
    );
}
