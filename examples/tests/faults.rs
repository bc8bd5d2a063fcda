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
    let direct = server.address("faulty", "p", "part_size=5M&pack_size=8M");
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
        "s3://faulty/p?endpoint={}&part_size=5M&pack_size=8M&timeout=2s&retry_timeout=90s",
        proxy.endpoint()
    );
    let dir = tempfile::tempdir().unwrap();
    let mut done = Vec::new();
    // Enough requests (about 250) that every fault kind occurs at 10 %.
    for round in 0..12u64 {
        let img = dir.path().join(format!("disk{round}.img"));
        make_image(&img, 16 << 20, 40 + round);
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
    use std::sync::atomic::Ordering::Relaxed;
    let c = proxy.counts();
    for (kind, n) in [
        ("503 SlowDown", &c.slow_down),
        ("reset", &c.reset),
        ("stall", &c.stalled),
        ("cut upload", &c.cut),
        ("lost response", &c.lost_response),
    ] {
        assert!(n.load(Relaxed) >= 1, "no {kind} was injected: {c:?}");
    }
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
    // Names the object that could not be read or written.
    let err = stderr(&out);
    assert!(
        [
            "config",
            "pack ",
            "index segment",
            "snapshot manifest",
            "writer lease"
        ]
        .iter()
        .any(|o| err.contains(o)),
        "names the object: {err}"
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
    // Half-written objects as a server without atomic writes, or a copy
    // tool, might leave them: a partial pack, segment and manifest under
    // fresh names. They are refused or ignored, never taken as valid.
    let pool_dir = server.root().join("broken/p");
    let first_file = |sub: &str, len: usize| {
        std::fs::read_dir(pool_dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().len() == len)
            .unwrap()
    };
    let partial = |sub: &str, from: std::path::PathBuf, name: String| {
        let bytes = std::fs::read(from).unwrap();
        std::fs::write(pool_dir.join(sub).join(name), &bytes[..bytes.len() / 2]).unwrap();
    };
    partial("packs", first_file("packs", 32), "ab".repeat(16));
    partial("index", first_file("index", 32), "cd".repeat(16));
    partial("snapshots", first_file("snapshots", 64), "ef".repeat(32));

    // Whatever landed, the earlier snapshot restores and every listed one
    // does; the partial manifest is named beside the list (exit 3).
    let out = cairn_env(&["snapshots", &direct, "--json"], &env);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains(&"ef".repeat(32)), "{}", stderr(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
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
    // Every partial object is reported; the only snapshot "affected" is
    // the partial manifest itself.
    assert_eq!(code(&out), 3, "{report}");
    assert_eq!(
        report["damaged_snapshots"],
        serde_json::json!(["ef".repeat(32)]),
        "{report}"
    );
    let text = report["damage"].to_string();
    for name in ["ab".repeat(16), "cd".repeat(16), "ef".repeat(32)] {
        assert!(text.contains(&name), "{name} not reported: {text}");
    }
}

/// A damaged manifest of VM b does not break `snapshots`, `latest` or a
/// restore for VM a — neither before a snapshot catalog exists nor after
/// one summarised b's manifest while it was still whole.
#[test]
fn a_damaged_manifest_of_one_vm_leaves_the_others_usable() {
    for catalog_first in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let pool = p(&root.join("pool"));
        ok(&["init", &pool]);
        make_image(&root.join("a.img"), 2 << 20, 1);
        make_image(&root.join("b.img"), 2 << 20, 2);
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
        if catalog_first {
            ok(&["snapshots", &pool]); // writes the catalog with b in it
        }
        let path = root.join("pool").join("snapshots").join(&sb);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let what = if catalog_first {
            "with a catalog"
        } else {
            "without one"
        };

        // `snapshots` lists a (b only when the catalog still summarises it).
        let out = cairn(&["snapshots", &pool, "--json"]);
        let list: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            list.as_array()
                .unwrap()
                .iter()
                .any(|s| s["id"] == sa.as_str()),
            "{what}: {list}"
        );
        // `latest --vm a` resolves and restores a.
        let to = root.join("out-a");
        ok(&["restore", &pool, "latest", "--vm", "a", "--to", &p(&to)]);
        assert!(
            std::fs::read(to.join("a.img")).unwrap() == std::fs::read(root.join("a.img")).unwrap()
        );
        // `latest --vm b` names the damage, and so does restoring b by id.
        for sel in [vec!["latest", "--vm", "b"], vec![sb.as_str()]] {
            let mut args = vec!["restore", pool.as_str()];
            args.extend(sel.iter().copied());
            let to = root.join("out-b");
            args.extend(["--to", to.to_str().unwrap()]);
            let out = cairn(&args);
            assert_ne!(code(&out), 0, "{what}: {sel:?}");
            assert!(!to.join("b.img").exists(), "{what}: {sel:?}");
        }
        // A new backup of a (its parent lookup goes through the catalog)
        // works, and verify names b alone.
        let again = snap("a");
        let v: Value = serde_json::from_slice(&cairn(&["verify", &pool, "--json"]).stdout).unwrap();
        assert_eq!(
            v["damaged_snapshots"],
            serde_json::json!([sb]),
            "{what}: {v}"
        );
        ok(&["restore", &pool, &again, "--to", &p(&root.join("again"))]);
    }
}
