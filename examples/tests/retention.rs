//! `cairn prune`, `forget`, `protect` and `policy` end to end: what each
//! removes, what it keeps and why, what it refuses, and that every snapshot
//! left restores bit-identical — including a CBT chain whose middle was
//! removed and the incremental that follows it.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// Ids of the snapshots listed, oldest first, with their VMs.
fn listed(pool: &str) -> Vec<(String, String)> {
    json(&["snapshots", pool, "--json"])
        .as_array()
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

fn restores_to(pool: &str, id: &str, out: &Path, expected: &[u8]) {
    ok(&["restore", pool, id, "--to", &p(out), "--force"]);
    let got = std::fs::read(out.join("vda.img")).unwrap();
    assert!(got == expected, "snapshot {id} does not restore its image");
}

#[test]
fn prune_forget_protect_and_policy() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pool = p(&root.join("pool"));
    ok(&["init", &pool]);
    let img = root.join("vda.img");
    // Five backups of web, each of different data, and one of db.
    let mut images = Vec::new();
    for seed in 0..5u64 {
        make_image(&img, 4 << 20, seed);
        images.push(std::fs::read(&img).unwrap());
        ok(&["backup", &pool, "--vm", "web", &p(&img)]);
    }
    make_image(&img, 4 << 20, 99);
    let db_image = std::fs::read(&img).unwrap();
    ok(&["backup", &pool, "--vm", "db", &p(&img)]);
    let all = listed(&pool);
    let web: Vec<&str> = all
        .iter()
        .filter(|(_, vm)| vm == "web")
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(web.len(), 5);

    // Protect the oldest web snapshot (by prefix).
    let r = json(&["protect", &pool, &web[0][..12], "--json"]);
    assert_eq!(r["snapshot"], web[0]);
    assert_eq!(r["changed"], true);
    let r = json(&["protect", &pool, web[0], "--json"]);
    assert_eq!(r["changed"], false, "protecting twice changes nothing");

    // A dry run decides and says why, and removes nothing.
    let dry = json(&[
        "prune",
        &pool,
        "--keep-last",
        "2",
        "--vm",
        "web",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["removed"], Value::Array(vec![]));
    let decisions = dry["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 5, "only web's snapshots: {dry}");
    let why = |id: &str| -> (bool, Vec<String>) {
        let d = decisions.iter().find(|d| d["id"] == id).unwrap();
        let reasons = d["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect();
        (d["keep"].as_bool().unwrap(), reasons)
    };
    assert_eq!(why(web[4]), (true, vec!["last #1".to_string()]));
    assert_eq!(why(web[3]), (true, vec!["last #2".to_string()]));
    assert_eq!(why(web[2]), (false, vec![]));
    assert_eq!(why(web[1]), (false, vec![]));
    assert_eq!(why(web[0]), (true, vec!["protected".to_string()]));
    assert_eq!(listed(&pool), all, "a dry run removes nothing");
    let text = ok(&[
        "prune",
        &pool,
        "--keep-last",
        "2",
        "--vm",
        "web",
        "--dry-run",
    ]);
    assert!(text.contains("would be removed"), "{text}");

    // The real run removes exactly web's 2nd and 3rd; db is not considered.
    let run = json(&["prune", &pool, "--keep-last", "2", "--vm", "web", "--json"]);
    let removed: Vec<&str> = run["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(removed.len(), 2);
    assert!(
        removed.contains(&web[1]) && removed.contains(&web[2]),
        "{run}"
    );
    let left: Vec<String> = listed(&pool).into_iter().map(|(id, _)| id).collect();
    assert_eq!(left.len(), 4);
    for gone in [web[1], web[2]] {
        assert!(!left.iter().any(|id| id == gone));
    }

    // Forget refuses a protected snapshot (and then removes nothing of
    // the list), removes an unprotected one, and an unknown id is an error.
    let out = cairn(&["forget", &pool, web[3], web[0]]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("protected"), "{}", stderr(&out));
    assert_eq!(listed(&pool).len(), 4, "a refused forget removes nothing");
    let out = cairn(&["forget", &pool, &"f".repeat(64)]);
    assert_ne!(code(&out), 0);
    ok(&["protect", &pool, web[0], "--off"]);
    ok(&["forget", &pool, web[0]]);
    assert_eq!(listed(&pool).len(), 3);

    // Every snapshot left restores bit-identical, though chunks they shared
    // with the removed ones were never touched by a removal.
    let out = root.join("out");
    restores_to(&pool, web[4], &out, &images[4]);
    restores_to(&pool, web[3], &out, &images[3]);
    let db = listed(&pool)
        .into_iter()
        .find(|(_, vm)| vm == "db")
        .unwrap()
        .0;
    restores_to(&pool, &db, &out, &db_image);
    let v = json(&["verify", &pool, "--read-data", "--json"]);
    assert_eq!(v["ok"], true, "{v}");

    // A stored policy: prune without flags applies it.
    let out = cairn(&["prune", &pool]);
    assert_eq!(
        code(&out),
        2,
        "no rule and no stored policy: {}",
        stderr(&out)
    );
    let shown = json(&["policy", "show", &pool, "--json"]);
    assert_eq!(shown["policy"], Value::Null);
    ok(&["policy", "set", &pool, "--keep-last", "1", "--tz", "UTC"]);
    let shown = json(&["policy", "show", &pool, "--json"]);
    assert_eq!(
        shown["stored"],
        "cairn-retention 1\nkeep-last 1\ntime-zone UTC\n"
    );
    let run = json(&["prune", &pool, "--json"]);
    assert_eq!(run["removed"].as_array().unwrap().len(), 1, "{run}");
    assert_eq!(run["removed"][0], web[3]);
    let left: Vec<String> = listed(&pool).into_iter().map(|(id, _)| id).collect();
    assert_eq!(left, vec![web[4].to_string(), db.clone()]);
    ok(&["policy", "clear", &pool]);
    assert_eq!(
        json(&["policy", "show", &pool, "--json"])["policy"],
        Value::Null
    );
}

#[test]
fn bad_retention_values_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pool = p(&dir.path().join("pool"));
    ok(&["init", &pool]);
    for bad in [
        &["--keep-last", "0"][..],
        &["--keep-last", "-1"][..],
        &["--keep-daily", "x"][..],
        &["--keep-within", "soon"][..],
        &["--keep-within", "0s"][..],
        &["--keep-last", "1", "--tz", "Mars/Olympus"][..],
        &["--tz", "UTC"][..],
    ] {
        let args: Vec<&str> = ["prune", pool.as_str()]
            .iter()
            .copied()
            .chain(bad.iter().copied())
            .collect();
        let out = cairn(&args);
        assert_eq!(code(&out), 2, "{bad:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
    let out = cairn(&["policy", "set", &pool]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

#[test]
fn a_cbt_chain_with_its_middle_removed_stays_restorable_and_continues() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pool = p(&root.join("pool"));
    ok(&["init", &pool]);
    let img = root.join("vda.qcow2");
    new_qcow2(&img, "16M");
    tool("qemu-io", &["-c", "write -P 1 0 4M", &p(&img)]);
    let backup = || -> Value {
        json(&[
            "backup",
            &pool,
            "--vm",
            "web",
            "--json",
            "--qcow2",
            &p(&img),
            "--bitmap",
            "nightly",
        ])
    };
    let full = backup();
    assert_eq!(full["mode"], "full");
    let full_raw = raw_of(&img, &root.join("full.raw"));
    tool("qemu-io", &["-c", "write -P 2 1M 64k", &p(&img)]);
    let inc1 = backup();
    assert_eq!(inc1["mode"], "cbt");
    tool("qemu-io", &["-c", "write -P 3 8M 64k", &p(&img)]);
    let inc2 = backup();
    assert_eq!(inc2["mode"], "cbt");
    let inc2_raw = raw_of(&img, &root.join("inc2.raw"));

    // Remove the middle of the chain: the others restore on their own.
    ok(&["forget", &pool, inc1["snapshot"].as_str().unwrap()]);
    let out = root.join("out");
    ok(&[
        "restore",
        &pool,
        full["snapshot"].as_str().unwrap(),
        "--to",
        &p(&out),
    ]);
    assert!(std::fs::read(out.join("vda.qcow2")).unwrap() == full_raw);
    ok(&[
        "restore",
        &pool,
        inc2["snapshot"].as_str().unwrap(),
        "--to",
        &p(&out),
        "--force",
    ]);
    assert!(std::fs::read(out.join("vda.qcow2")).unwrap() == inc2_raw);

    // Remove the newest, the next incremental's parent: the next backup
    // falls back per the CBT policy (default: a full read against the
    // older parent) and restores bit-identical.
    ok(&["forget", &pool, inc2["snapshot"].as_str().unwrap()]);
    tool("qemu-io", &["-c", "write -P 4 12M 64k", &p(&img)]);
    let next = backup();
    let next_raw = raw_of(&img, &root.join("next.raw"));
    assert_eq!(next["mode"], "full", "{next}");
    assert!(
        next["cbt_fallback"].as_str().is_some_and(|s| !s.is_empty()),
        "the fallback says why: {next}"
    );
    ok(&["restore", &pool, "latest", "--to", &p(&out), "--force"]);
    assert!(std::fs::read(out.join("vda.qcow2")).unwrap() == next_raw);
    // And the chain continues with CBT from there.
    tool("qemu-io", &["-c", "write -P 5 2M 64k", &p(&img)]);
    let after = backup();
    assert_eq!(after["mode"], "cbt", "{after}");
    assert_eq!(after["bytes_dirty"], 65536);
    ok(&["restore", &pool, "latest", "--to", &p(&out), "--force"]);
    assert!(std::fs::read(out.join("vda.qcow2")).unwrap() == raw_of(&img, &root.join("after.raw")));
}

#[test]
fn repair_packs_quarantines_salvages_and_a_new_backup_heals() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pool = p(&root.join("pool"));
    ok(&["init", &pool]);
    let a = root.join("a.img");
    let b = root.join("b.img");
    make_image(&a, 4 << 20, 1);
    make_image(&b, 4 << 20, 2);
    let sa = json(&["backup", &pool, "--vm", "a", &p(&a), "--json"])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let sb = json(&["backup", &pool, "--vm", "b", &p(&b), "--json"])["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    // Flip a byte inside the first blob of b's newest pack.
    let mut packs: Vec<_> = walk_files(&root.join("pool").join("packs"));
    packs.sort_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap());
    let victim = packs.last().unwrap().clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[16 + 40] ^= 0x55;
    std::fs::write(&victim, &bytes).unwrap();
    let out = cairn(&["verify", &pool, "--read-data", "--json"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    // The finding names b and the bytes of b's disk the blob held: one
    // chunk-sized range (the first blob of the pack: a chunk of b.img).
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = &v["damage"][0];
    assert_eq!(d["kind"], "chunk-corrupt", "{v}");
    assert_eq!(d["snapshots"], serde_json::json!([sb]), "{v}");
    let ranges = d["ranges"].as_array().unwrap();
    assert!(!ranges.is_empty(), "{v}");
    for r in ranges {
        assert_eq!(r["snapshot"], sb.as_str());
        assert_eq!(r["disk"], "b.img");
        assert!(r["offset"].as_u64().unwrap() + r["length"].as_u64().unwrap() <= 4 << 20);
    }
    let marked = |id: &str| -> bool {
        json(&["snapshots", &pool, "--json"])
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap()["damaged"]
            .as_bool()
            .unwrap()
    };
    assert!(!marked(&sb), "verify alone marks nothing");

    let out = cairn(&["repair", &pool, "--packs", "--dry-run", "--json"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let dry: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(dry["damaged_packs"].as_object().unwrap().len(), 1, "{dry}");
    assert!(victim.exists(), "a dry run moves nothing");

    let out = cairn(&["repair", &pool, "--packs", "--json"]);
    assert_eq!(code(&out), 3, "b stays damaged: {}", stderr(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["quarantined"].as_array().unwrap().len(), 1, "{r}");
    assert!(r["blobs_salvaged"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["damaged_snapshots"], serde_json::json!([sb]), "{r}");
    assert!(!victim.exists());
    let name = victim.file_name().unwrap();
    assert!(
        root.join("pool").join("quarantine").join(name).exists(),
        "kept in quarantine"
    );
    assert!(
        marked(&sb) && !marked(&sa),
        "the repair marks b, and only b"
    );
    let table = ok(&["snapshots", &pool]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&sb[..16]) && l.contains("DAMAGED")),
        "{table}"
    );
    // a restores; b does not, until a new backup stores the lost chunk.
    let out_dir = root.join("out");
    ok(&["restore", &pool, &sa, "--to", &p(&out_dir)]);
    assert!(std::fs::read(out_dir.join("a.img")).unwrap() == std::fs::read(&a).unwrap());
    assert_ne!(
        code(&cairn(&[
            "restore",
            &pool,
            &sb,
            "--to",
            &p(&root.join("x"))
        ])),
        0
    );
    ok(&["backup", &pool, "--vm", "b", &p(&b)]);
    let v = json(&["verify", &pool, "--read-data", "--json"]);
    assert_eq!(v["ok"], true, "healed: {v}");
    assert!(!marked(&sb), "the backup that healed b cleared its mark");
    ok(&["restore", &pool, &sb, "--to", &p(&out_dir)]);
    assert!(std::fs::read(out_dir.join("b.img")).unwrap() == std::fs::read(&b).unwrap());
}

/// Every object of the pool under `dir` (kind directory / name), `tmp/`
/// left out.
fn pool_objects(dir: &Path) -> std::collections::BTreeSet<String> {
    walk_files(dir)
        .iter()
        .map(|f| f.strip_prefix(dir).unwrap().display().to_string())
        .filter(|f| !f.starts_with("tmp/"))
        .collect()
}

#[test]
fn gc_on_a_full_filesystem_mid_repack_deletes_nothing_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = SmallFs::mount(dir.path(), 48 << 20) else {
        return;
    };
    let pool_dir = fs.path.join("pool");
    let pool = p(&pool_dir);
    ok(&["init", &pool]);
    // A: 12 MiB of random data; B: A with two of every three 64 KiB blocks
    // rewritten. Once A is forgotten its packs are one-third live: repacked.
    let mut rng = cairn_engine::sample::SampleRng::new(3);
    let mut a = vec![0u8; 12 << 20];
    rng.fill(&mut a);
    let mut b = a.clone();
    for (i, block) in b.chunks_mut(64 << 10).enumerate() {
        if i % 3 != 0 {
            rng.fill(block);
        }
    }
    let (a_img, b_img) = (dir.path().join("a.img"), dir.path().join("b.img"));
    std::fs::write(&a_img, &a).unwrap();
    std::fs::write(&b_img, &b).unwrap();
    let backup = |img: &Path| {
        json(&[
            "backup",
            &pool,
            "--vm",
            "v",
            &p(img),
            "--compression",
            "none",
            "--json",
        ])["snapshot"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let sa = backup(&a_img);
    let sb = backup(&b_img);
    ok(&["forget", &pool, &sa]);
    let dry = json(&["gc", &pool, "--dry-run", "--json"]);
    assert!(dry["packs_repacked"].as_u64().unwrap() >= 1, "{dry}");
    let before = pool_objects(&pool_dir);

    // 1 MiB free: the notice and the lease fit, the repacked pack does not.
    fs.fill_leaving(1 << 20);
    let out = cairn(&["gc", &pool, "--json"]);
    assert_ne!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        stderr(&out).contains("pool write of pack")
            && stderr(&out).contains("No space left on device"),
        "a clear error, from the repack's new pack: {}",
        stderr(&out)
    );
    assert_eq!(
        pool_objects(&pool_dir),
        before,
        "nothing deleted, nothing left behind"
    );
    assert_eq!(
        std::fs::read_dir(pool_dir.join("tmp")).map_or(0, |d| d.count()),
        0,
        "no partial object left in tmp/"
    );
    let out_dir = dir.path().join("out");
    ok(&["restore", &pool, &sb, "--to", &p(&out_dir)]);
    assert!(std::fs::read(out_dir.join("b.img")).unwrap() == b);

    // Space again: the collection completes.
    fs.unfill();
    let r = json(&["gc", &pool, "--json"]);
    assert!(r["packs_repacked"].as_u64().unwrap() >= 1, "{r}");
    ok(&["restore", &pool, &sb, "--to", &p(&out_dir), "--force"]);
    assert!(std::fs::read(out_dir.join("b.img")).unwrap() == b);
    assert_eq!(
        json(&["verify", &pool, "--read-data", "--json"])["ok"],
        true
    );
}
