//! The library API as an embedder uses it: cancellation, long-lived handles
//! that see what other handles and processes write, listing that survives a
//! damaged manifest, and an engine whose modules import each other without
//! cycles.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_engine::{
    BackupDisk, BackupOptions, CancelToken, DiskSource, DynPool, Error, FileKind, MemorySource,
    PoolRead, PoolWrite, Progress, Repository, RestoreOptions, SnapshotSelector, VerifyOptions,
};
use cairn_pools::{LocalPool, MemoryPool};

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn restore(
    repo: &Repository,
    id: &cairn_engine::SnapshotId,
    dir: &Path,
) -> BTreeMap<String, Vec<u8>> {
    let _ = std::fs::remove_dir_all(dir);
    repo.restore_to_dir(id, dir, &RestoreOptions::default())
        .unwrap();
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// A slow source: each read sleeps, so a backup runs long enough to cancel.
struct Slow(MemorySource, AtomicU64);

impl DiskSource for Slow {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> cairn_engine::Result<()> {
        std::thread::sleep(Duration::from_millis(20));
        self.1.fetch_add(buf.len() as u64, Ordering::SeqCst);
        self.0.read_at(offset, buf)
    }
    fn describe(&self) -> String {
        "slow".into()
    }
}

/// Cancels the token once the backup has made some progress.
struct CancelAfter(CancelToken, AtomicU64, Arc<parking_lot_free::Stamp>);

mod parking_lot_free {
    /// When the cancel was triggered.
    #[derive(Default)]
    pub struct Stamp(pub std::sync::Mutex<Option<std::time::Instant>>);
}

impl Progress for CancelAfter {
    fn advance(&self, bytes: u64) {
        if self.1.fetch_add(bytes, Ordering::SeqCst) + bytes >= 8 << 20 && !self.0.is_cancelled() {
            *self.2 .0.lock().unwrap() = Some(Instant::now());
            self.0.cancel();
        }
    }
}

#[test]
fn a_cancelled_backup_stops_within_a_second_and_leaves_earlier_snapshots_restorable() {
    let dir = tempfile::tempdir().unwrap();
    let pool: DynPool = Arc::new(LocalPool::create(dir.path().join("pool")).unwrap());
    let repo = Repository::create(pool.clone()).unwrap();
    let first_data = data(4 << 20, 1);
    let first = repo
        .backup(
            vec![BackupDisk::image(
                "vda",
                MemorySource::new("vda", first_data.clone()),
            )],
            &BackupOptions::new("vm"),
        )
        .unwrap();

    let cancel = CancelToken::new();
    let stamp = Arc::new(parking_lot_free::Stamp::default());
    let progress = Arc::new(CancelAfter(
        cancel.clone(),
        AtomicU64::new(0),
        stamp.clone(),
    ));
    let big = Slow(
        MemorySource::new("big", data(256 << 20, 2)),
        AtomicU64::new(0),
    );
    let opts = BackupOptions::new("vm")
        .with_progress(progress)
        .with_cancel(cancel);
    let err = repo
        .backup(vec![BackupDisk::image("vda", big)], &opts)
        .unwrap_err();
    let stopped = Instant::now();
    assert!(matches!(err, Error::Cancelled), "{err}");
    let cancelled_at = stamp.0.lock().unwrap().expect("the token was triggered");
    assert!(
        stopped.duration_since(cancelled_at) < Duration::from_secs(1),
        "took {:?} to stop",
        stopped.duration_since(cancelled_at)
    );
    // No new snapshot; the earlier one restores and the pool verifies clean.
    assert_eq!(repo.snapshot_ids().unwrap(), vec![first.snapshot]);
    let fresh = Repository::open(pool).unwrap();
    assert!(restore(&fresh, &first.snapshot, &dir.path().join("r"))["vda"] == first_data);
    assert!(fresh
        .verify(&VerifyOptions::default().with_read_data(true))
        .unwrap()
        .is_ok());
}

#[test]
fn two_handles_see_each_others_writes_without_reopening() {
    let pool: DynPool = Arc::new(MemoryPool::new());
    let a = Repository::create(pool.clone()).unwrap();
    let b = Repository::open(pool).unwrap();
    // Both load their index before the other writes.
    a.verify(&VerifyOptions::default()).unwrap();
    b.verify(&VerifyOptions::default()).unwrap();
    let bytes = data(3 << 20, 3);
    let s = a
        .backup(
            vec![BackupDisk::image(
                "vda",
                MemorySource::new("vda", bytes.clone()),
            )],
            &BackupOptions::new("vm"),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // b restores and verifies what a wrote...
    assert!(restore(&b, &s.snapshot, dir.path())["vda"] == bytes);
    assert!(b
        .verify(&VerifyOptions::default().with_read_data(true))
        .unwrap()
        .is_ok());
    // ...and dedups against it: the same data adds no chunk.
    let again = b
        .backup(
            vec![BackupDisk::image("vda", MemorySource::new("vda", bytes))],
            &BackupOptions::new("vm"),
        )
        .unwrap();
    assert_eq!(again.chunks_new, 0, "{again:?}");
    assert_eq!(again.chunks_total, 48);
}

#[test]
fn a_handle_sees_what_another_process_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let pool_dir = dir.path().join("pool");
    let pool: DynPool = Arc::new(LocalPool::create(&pool_dir).unwrap());
    let repo = Repository::create(pool).unwrap();
    repo.verify(&VerifyOptions::default()).unwrap(); // index loaded, empty
    let img = dir.path().join("disk.img");
    let bytes = data(2 << 20, 4);
    std::fs::write(&img, &bytes).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args([
            "backup",
            pool_dir.to_str().unwrap(),
            "--vm",
            "web",
            img.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = repo.resolve(&SnapshotSelector::latest_of("web")).unwrap();
    assert!(restore(&repo, &id, &dir.path().join("r"))["disk.img"] == bytes);
    assert!(repo
        .verify(&VerifyOptions::default().with_read_data(true))
        .unwrap()
        .is_ok());
    let again = repo
        .backup(
            vec![BackupDisk::image("disk.img", MemorySource::new("d", bytes))],
            &BackupOptions::new("web"),
        )
        .unwrap();
    assert_eq!(again.chunks_new, 0);
}

#[test]
fn a_damaged_manifest_does_not_hide_other_snapshots() {
    let pool: DynPool = Arc::new(MemoryPool::new());
    let repo = Repository::create(pool.clone()).unwrap();
    let backup = |vm: &str, seed| {
        repo.backup(
            vec![BackupDisk::image(
                "vda",
                MemorySource::new("vda", data(1 << 20, seed)),
            )],
            &BackupOptions::new(vm),
        )
        .unwrap()
        .snapshot
    };
    let a = backup("a", 5);
    let b = backup("b", 6);
    // B's manifest is replaced by garbage under its name.
    pool.delete(FileKind::Snapshot, &b.to_hex()).unwrap();
    pool.write(FileKind::Snapshot, &b.to_hex(), b"not a manifest")
        .unwrap();
    let list = repo.snapshots().unwrap();
    assert_eq!(
        list.snapshots.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![a]
    );
    assert_eq!(list.damaged.len(), 1);
    assert_eq!(list.damaged[0].0, b);
    assert!(list.damaged[0].1.is_damage());
    assert_eq!(repo.resolve(&SnapshotSelector::latest_of("a")).unwrap(), a);
    assert!(repo
        .resolve(&SnapshotSelector::latest_of("b"))
        .unwrap_err()
        .is_not_found());
    let err = repo.load_snapshot(&b).unwrap_err();
    assert!(err.is_damage(), "{err}");
    assert!(!err.is_not_found(), "{err}");
    assert!(pool.read(FileKind::Snapshot, &b.to_hex()).is_ok());
}

#[test]
fn a_missing_pack_is_damage_not_not_found() {
    let pool: DynPool = Arc::new(MemoryPool::new());
    let repo = Repository::create(pool.clone()).unwrap();
    let s = repo
        .backup(
            vec![BackupDisk::image(
                "vda",
                MemorySource::new("vda", data(1 << 20, 7)),
            )],
            &BackupOptions::new("vm"),
        )
        .unwrap();
    for pack in cairn_engine::PoolList::list(&*pool, FileKind::Pack).unwrap() {
        pool.delete(FileKind::Pack, &pack).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let err = repo
        .restore_to_dir(&s.snapshot, dir.path(), &RestoreOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::PackMissing { .. }), "{err}");
    assert!(err.is_damage() && !err.is_not_found(), "{err}");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing left behind"
    );
}

/// `use crate::…` edges between the engine's source files.
fn engine_imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../engine/src");
    let mut files = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    // Module path of a file: store/index.rs -> store::index, store/mod.rs -> store.
    let module_of = |p: &Path| -> String {
        let rel = p.strip_prefix(&src).unwrap().with_extension("");
        let mut parts: Vec<String> = rel
            .iter()
            .map(|c| c.to_string_lossy().to_string())
            .collect();
        if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
            parts.pop();
        }
        parts.join("::")
    };
    let modules: BTreeSet<String> = files.iter().map(|p| module_of(p)).collect();
    let mut graph = BTreeMap::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        // Only the module's own code, not its unit tests.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let me = module_of(f);
        let mut deps = BTreeSet::new();
        for line in code
            .lines()
            .filter(|l| l.trim_start().starts_with("use crate::"))
        {
            let path = line.trim_start().trim_start_matches("use crate::");
            // The longest module that prefixes the import path.
            let segs: Vec<&str> = path
                .split("::")
                .map(|s| s.trim_matches(|c: char| !c.is_alphanumeric() && c != '_'))
                .collect();
            for n in (1..=segs.len()).rev() {
                let m = segs[..n].join("::");
                if modules.contains(&m) {
                    if m != me && !me.is_empty() {
                        deps.insert(m);
                    }
                    break;
                }
            }
        }
        graph.insert(me, deps);
    }
    graph
}

#[test]
fn engine_modules_import_each_other_without_cycles() {
    let graph = engine_imports();
    assert!(graph.len() > 20, "{graph:?}");
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) {
        match state.get(m) {
            Some(2) => return,
            Some(1) => panic!("import cycle: {} -> {m}", path.join(" -> ")),
            _ => {}
        }
        state.insert(m.to_string(), 1);
        path.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            visit(d, graph, state, path);
        }
        path.pop();
        state.insert(m.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        visit(m, &graph, &mut state, &mut Vec::new());
    }
    // Layering: what lies in a pool knows nothing of sources, CBT, pipelines
    // or the repository; the pipelines know nothing of CBT.
    for (m, deps) in &graph {
        for d in deps {
            let top = |s: &str| s.split("::").next().unwrap_or("").to_string();
            let forbidden: &[&str] = match top(m).as_str() {
                "store" => &["source", "cbt", "pipeline", "repo", "snapshots"],
                "source" => &["cbt", "pipeline", "repo"],
                "pipeline" => &["cbt", "repo"],
                _ => &[],
            };
            assert!(!forbidden.contains(&top(d).as_str()), "{m} imports {d}");
        }
    }
}
