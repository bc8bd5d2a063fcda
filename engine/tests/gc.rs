//! Garbage collection against a model: random sequences of backups of
//! changing data, prunes, forgets, collections and collections that fail
//! part-way (a pool that refuses the Nth write or delete: a crash at that
//! point, as far as the pool can tell). After every sequence each snapshot
//! the model calls live restores bit-identical, and after a final
//! collection the packs hold within 10 % of the model's live bytes.
//! Plus: a failed listing of any kind, or an unreadable manifest, before the
//! sweep deletes nothing.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use cairn_engine::bytes::Bytes;
use cairn_engine::sample::SampleRng;
use cairn_engine::{
    BackupDisk, BackupOptions, ChunkingParams, Compression, DynPool, Error, FileKind, GcOptions,
    MemorySource, ObjectWriter, Pool, PoolList, PoolRead, PoolWrapper, PruneOptions, Repository,
    RestoreOptions, Result, RetentionPolicy, SnapshotId, WrappedPool,
};
use cairn_pools::testing::S3Server;
use cairn_pools::{LocalPool, ObjectPool, PoolAddress};

const BLOCK: usize = 64 << 10;

/// A pool that fails exactly the Nth create and/or the Nth delete from now
/// (an I/O error part-way through a collection),
/// and optionally every listing of one kind.
struct Faulty {
    inner: DynPool,
    creates_left: AtomicI64,
    deletes_left: AtomicI64,
    fail_list: Option<FileKind>,
    /// Listings of this kind leave out their last name (cut short).
    cut_list: Option<FileKind>,
}

impl Faulty {
    fn new(inner: DynPool) -> Self {
        Faulty {
            inner,
            creates_left: AtomicI64::new(i64::MAX),
            deletes_left: AtomicI64::new(i64::MAX),
            fail_list: None,
            cut_list: None,
        }
    }
}

fn injected(what: &str) -> Error {
    Error::Io {
        what: format!("injected fault: {what}"),
        source: std::io::Error::other("injected"),
    }
}

impl PoolWrapper for Faulty {
    fn inner(&self) -> &dyn Pool {
        &*self.inner
    }
    fn create(&self, kind: FileKind, name: &str) -> Result<Box<dyn ObjectWriter>> {
        if self.creates_left.fetch_sub(1, Ordering::SeqCst) == 0 {
            return Err(injected("create"));
        }
        self.inner.create(kind, name)
    }
    fn delete(&self, kind: FileKind, name: &str) -> Result<()> {
        if self.deletes_left.fetch_sub(1, Ordering::SeqCst) == 0 {
            return Err(injected("delete"));
        }
        self.inner.delete(kind, name)
    }
    fn list(&self, kind: FileKind) -> Result<Vec<String>> {
        if self.fail_list == Some(kind) {
            return Err(injected("list"));
        }
        let mut names = self.inner.list(kind)?;
        if self.cut_list == Some(kind) {
            names.pop();
        }
        Ok(names)
    }
}

/// Every object in the pool with its size.
fn objects(pool: &DynPool) -> BTreeSet<(FileKind, String, u64)> {
    let mut out = BTreeSet::new();
    for kind in FileKind::ALL {
        for name in pool.list(kind).unwrap() {
            let size = pool.size(kind, &name).unwrap();
            out.insert((kind, name, size));
        }
    }
    out
}

fn pack_bytes(pool: &DynPool) -> u64 {
    pool.list(FileKind::Pack)
        .unwrap()
        .iter()
        .map(|n| pool.size(FileKind::Pack, n).unwrap())
        .sum()
}

fn opts(vm: &str) -> BackupOptions {
    BackupOptions::new(vm)
        .with_chunking(ChunkingParams::Fixed { size: BLOCK as u32 })
        .with_compression(Compression::None)
}

fn backup(repo: &Repository, vm: &str, image: &[u8]) -> Result<SnapshotId> {
    let disk = BackupDisk::image(
        "vda",
        MemorySource::new("vda", Bytes::copy_from_slice(image)),
    );
    Ok(repo.backup(vec![disk], &opts(vm))?.snapshot)
}

fn restores(repo: &Repository, id: &SnapshotId, image: &[u8], scratch: &std::path::Path) {
    let dir = scratch.join(id.to_hex());
    repo.restore_to_dir(id, &dir, &RestoreOptions::default())
        .unwrap_or_else(|e| panic!("snapshot {id} does not restore: {e}"));
    let got = std::fs::read(dir.join("vda")).unwrap();
    assert!(got == image, "snapshot {id} restores other bytes");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Distinct non-zero blocks of the live images: what a perfect GC keeps.
fn live_bytes(model: &BTreeMap<SnapshotId, (String, Vec<u8>)>) -> u64 {
    let mut blocks = BTreeSet::new();
    for (_, image) in model.values() {
        for b in image.chunks(BLOCK) {
            if b.iter().any(|&x| x != 0) {
                blocks.insert(b.to_vec());
            }
        }
    }
    blocks.iter().map(|b| b.len() as u64).sum()
}

/// `image` with `n` random blocks rewritten with random data.
fn mutate(rng: &mut SampleRng, image: &mut [u8], n: usize) {
    let blocks = image.len() / BLOCK;
    for _ in 0..n {
        let b = (rng.next_u64() as usize) % blocks;
        rng.fill(&mut image[b * BLOCK..(b + 1) * BLOCK]);
    }
}

fn sequences(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn random_sequences_of_backup_prune_and_gc_keep_every_live_snapshot() {
    let scratch = tempfile::tempdir().unwrap();
    // 200 by default; scripts/mutants.sh runs fewer (one build and run per
    // mutant).
    for seq in 0..sequences("CAIRN_GC_SEQUENCES", 200) {
        let dir = tempfile::tempdir().unwrap();
        let local: DynPool = Arc::new(LocalPool::create(dir.path()).unwrap());
        run_sequence(seq, local, scratch.path());
    }
}

/// The same model with every external sort spilled to disk (runs of 16
/// records, several merge rounds): the on-disk paths of the mark, the
/// pack tables, the copy plan and the segment.
#[test]
fn random_sequences_with_every_sort_on_disk_keep_every_live_snapshot() {
    // Process-wide: other tests of this binary may spill too (slower, as
    // correct).
    std::env::set_var("CAIRN_SORT_BUDGET", "0");
    let scratch = tempfile::tempdir().unwrap();
    for seq in 0..sequences("CAIRN_GC_SPILL_SEQUENCES", 30) {
        let dir = tempfile::tempdir().unwrap();
        let local: DynPool = Arc::new(LocalPool::create(dir.path()).unwrap());
        run_sequence(5000 + seq, local, scratch.path());
    }
}

/// The same model on the S3 pool (s3s-fs on 127.0.0.1, a fresh prefix per
/// sequence): 20 sequences by default (`CAIRN_GC_S3_SEQUENCES`), each
/// request a real HTTP round trip.
#[test]
fn random_sequences_on_the_s3_pool_keep_every_live_snapshot() {
    let scratch = tempfile::tempdir().unwrap();
    let server = S3Server::start();
    server.create_bucket("model");
    for seq in 0..sequences("CAIRN_GC_S3_SEQUENCES", 20) {
        let PoolAddress::S3(addr) =
            PoolAddress::parse(&server.address("model", &format!("seq-{seq}"), "")).unwrap()
        else {
            panic!("not an s3 address")
        };
        let pool: DynPool = Arc::new(ObjectPool::open_with(&addr, &server.settings()).unwrap());
        run_sequence(1000 + seq, pool, scratch.path());
    }
}

/// One random sequence of backups, prunes, forgets and collections (some
/// failing part-way) on `local`, checked against the model.
fn run_sequence(seq: u64, local: DynPool, scratch: &std::path::Path) {
    {
        let faulty = Arc::new(WrappedPool(Faulty::new(local.clone())));
        let pool: DynPool = faulty.clone();
        let repo = Repository::create(pool.clone()).unwrap();
        let mut rng = SampleRng::new(seq);
        let mut images: BTreeMap<&str, Vec<u8>> = BTreeMap::new();
        for vm in ["a", "b"] {
            let mut img = vec![0u8; 12 * BLOCK];
            mutate(&mut rng, &mut img, 8);
            images.insert(vm, img);
        }
        // Model: live snapshots, in the order taken.
        let mut model: BTreeMap<SnapshotId, (String, Vec<u8>)> = BTreeMap::new();
        let mut order: Vec<SnapshotId> = Vec::new();
        for _step in 0..10 {
            match rng.next_u64() % 6 {
                0..=2 => {
                    let vm = if rng.next_u64() % 2 == 0 { "a" } else { "b" };
                    let img = images.get_mut(vm).unwrap();
                    let n = (rng.next_u64() % 4) as usize;
                    mutate(&mut rng, img, n);
                    let id = backup(&repo, vm, img).unwrap();
                    model.insert(id, (vm.to_string(), img.clone()));
                    order.push(id);
                }
                3 => {
                    let k = 1 + (rng.next_u64() % 2) as usize;
                    let policy = RetentionPolicy::new().with_keep_last(k as u32).unwrap();
                    repo.prune(&PruneOptions::new().with_policy(policy))
                        .unwrap();
                    for vm in ["a", "b"] {
                        let of_vm: Vec<SnapshotId> = order
                            .iter()
                            .filter(|id| model.get(id).is_some_and(|(v, _)| v == vm))
                            .copied()
                            .collect();
                        for id in &of_vm[..of_vm.len().saturating_sub(k)] {
                            model.remove(id);
                        }
                    }
                }
                4 => {
                    if let Some(&id) = order.iter().find(|id| model.contains_key(id)) {
                        repo.forget(&[id]).unwrap();
                        model.remove(&id);
                    }
                }
                _ => {
                    let repack = [0.0, 0.5, 0.95][(rng.next_u64() % 3) as usize];
                    let gc = GcOptions::default().with_repack_below(repack).unwrap();
                    // One time in two the pool fails part-way: at a write
                    // (a repack running out of space) or a delete (a kill
                    // during the sweep).
                    match rng.next_u64() % 4 {
                        0 => faulty
                            .0
                            .creates_left
                            .store((rng.next_u64() % 3) as i64, Ordering::SeqCst),
                        1 => faulty
                            .0
                            .deletes_left
                            .store((rng.next_u64() % 4) as i64, Ordering::SeqCst),
                        _ => {}
                    }
                    let result = repo.gc(&gc);
                    faulty.0.creates_left.store(i64::MAX, Ordering::SeqCst);
                    faulty.0.deletes_left.store(i64::MAX, Ordering::SeqCst);
                    if let Err(e) = result {
                        assert!(e.to_string().contains("injected"), "seq {seq}: {e}");
                    }
                }
            }
        }
        // Every live snapshot restores; the pool lists exactly the model.
        let listed: BTreeSet<SnapshotId> = repo.snapshot_ids().unwrap().into_iter().collect();
        assert_eq!(listed, model.keys().copied().collect(), "seq {seq}");
        for (id, (_, image)) in &model {
            restores(&repo, id, image, scratch);
        }
        // A final collection that repacks everything sparse leaves the
        // packs within 10 % of the live bytes.
        repo.gc(&GcOptions::default().with_repack_below(0.95).unwrap())
            .unwrap();
        let live = live_bytes(&model);
        let stored = pack_bytes(&local);
        assert!(
            stored as f64 <= live as f64 * 1.10 + 4096.0,
            "seq {seq}: {stored} bytes of packs for {live} live bytes"
        );
        assert!(
            stored >= live,
            "seq {seq}: {stored} < {live}: live data lost"
        );
        for (id, (_, image)) in &model {
            restores(&repo, id, image, scratch);
        }
        let report = repo
            .verify(&cairn_engine::VerifyOptions::default().with_read_data(true))
            .unwrap();
        assert!(report.is_ok(), "seq {seq}: {report}");
        assert!(local.list(FileKind::Sweep).unwrap().is_empty());
        assert!(local.list(FileKind::Lease).unwrap().is_empty());
    }
}

/// A pool with three snapshots, the oldest two forgotten: GC has work.
fn pool_with_garbage() -> (tempfile::TempDir, DynPool, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let local: DynPool = Arc::new(LocalPool::create(dir.path()).unwrap());
    let repo = Repository::create(local.clone()).unwrap();
    let mut rng = SampleRng::new(7);
    let mut img = vec![0u8; 16 * BLOCK];
    let mut ids = Vec::new();
    for _ in 0..3 {
        mutate(&mut rng, &mut img, 10);
        ids.push(backup(&repo, "a", &img).unwrap());
    }
    repo.forget(&ids[..2]).unwrap();
    (dir, local, img)
}

#[test]
fn a_failed_listing_or_unreadable_manifest_deletes_nothing() {
    for kind in [
        FileKind::Snapshot,
        FileKind::Pack,
        FileKind::Index,
        FileKind::Lease,
    ] {
        let (_dir, local, img) = pool_with_garbage();
        let before = objects(&local);
        let mut faulty = Faulty::new(local.clone());
        faulty.fail_list = Some(kind);
        let pool: DynPool = Arc::new(WrappedPool(faulty));
        let repo = Repository::open(pool).unwrap();
        let e = repo.gc(&GcOptions::default()).unwrap_err();
        assert!(e.to_string().contains("injected"), "{kind}: {e}");
        assert_eq!(
            objects(&local),
            before,
            "a failed {kind} listing deleted something"
        );
        // The same collection on the healthy pool reclaims space.
        let repo = Repository::open(local.clone()).unwrap();
        let r = repo.gc(&GcOptions::default()).unwrap();
        assert!(r.packs_deleted + r.packs_repacked > 0, "{r}");
        restores(&repo, &repo.snapshot_ids().unwrap()[0], &img, _dir.path());
    }
    // A manifest that cannot be read: nothing is deleted (its chunks are
    // unknown, so nothing can be called garbage).
    let (dir, local, _) = pool_with_garbage();
    let id = local.list(FileKind::Snapshot).unwrap().pop().unwrap();
    let path = dir.path().join("snapshots").join(&id);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[40] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let before = objects(&local);
    let repo = Repository::open(local.clone()).unwrap();
    let e = repo.gc(&GcOptions::default()).unwrap_err();
    assert!(e.is_damage(), "{e}");
    assert_eq!(objects(&local), before);
}

/// A manifest listing cut short (the store leaves out the only live
/// snapshot without an error) would make every chunk look like garbage:
/// the collection notices (the snapshot catalog names it and it exists)
/// and deletes nothing.
#[test]
fn a_listing_cut_short_deletes_nothing() {
    let (dir, local, img) = pool_with_garbage();
    let repo = Repository::open(local.clone()).unwrap();
    repo.snapshots().unwrap(); // the catalog, as any listing or backup leaves it
    let before = objects(&local);
    let mut faulty = Faulty::new(local.clone());
    faulty.cut_list = Some(FileKind::Snapshot);
    let cut: DynPool = Arc::new(WrappedPool(faulty));
    let e = Repository::open(cut)
        .unwrap()
        .gc(&GcOptions::default())
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ListingIncomplete {
                kind: FileKind::Snapshot,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(objects(&local), before, "nothing deleted");
    restores(&repo, &repo.snapshot_ids().unwrap()[0], &img, dir.path());
}

#[test]
fn dry_run_changes_nothing_and_reports_what_a_real_run_does() {
    let (dir, local, img) = pool_with_garbage();
    let repo = Repository::open(local.clone()).unwrap();
    let before = objects(&local);
    let dry = repo.gc(&GcOptions::default().with_dry_run(true)).unwrap();
    assert_eq!(objects(&local), before);
    let real = repo.gc(&GcOptions::default()).unwrap();
    assert_eq!(
        (dry.packs_deleted, dry.packs_repacked, dry.bytes_deleted),
        (real.packs_deleted, real.packs_repacked, real.bytes_deleted)
    );
    assert!(real.bytes_reclaimed > 0, "{real}");
    let after = pack_bytes(&local);
    let packs_before: u64 = before
        .iter()
        .filter(|(k, _, _)| *k == FileKind::Pack)
        .map(|(_, _, s)| s)
        .sum();
    assert_eq!(
        packs_before - after,
        real.bytes_deleted - real.bytes_written
    );
    assert_eq!(
        local.list(FileKind::Index).unwrap().len(),
        1,
        "index compacted"
    );
    restores(&repo, &repo.snapshot_ids().unwrap()[0], &img, dir.path());
    // A second collection finds nothing to do.
    let again = repo.gc(&GcOptions::default()).unwrap();
    assert_eq!(
        (again.packs_deleted, again.packs_repacked),
        (0, 0),
        "{again}"
    );
}

#[test]
fn bad_gc_options_are_refused() {
    assert!(GcOptions::default().with_repack_below(1.5).is_err());
    assert!(GcOptions::default().with_repack_below(-0.1).is_err());
    assert!(GcOptions::default()
        .with_lease_expiry(std::time::Duration::from_millis(5))
        .is_err());
}

#[test]
fn read_data_subsets_rotate_over_every_pack_once() {
    let dir = tempfile::tempdir().unwrap();
    let local: DynPool = Arc::new(LocalPool::create(dir.path()).unwrap());
    let repo = Repository::create(local.clone()).unwrap();
    let mut img = vec![0u8; 64 * BLOCK];
    SampleRng::new(3).fill(&mut img);
    let mut o = opts("a");
    o.pack_target = 4 * BLOCK as u64; // many small packs
    let disk = BackupDisk::image(
        "vda",
        MemorySource::new("vda", Bytes::copy_from_slice(&img)),
    );
    repo.backup(vec![disk], &o).unwrap();
    let packs = local.list(FileKind::Pack).unwrap().len();
    assert!(packs >= 12, "{packs} packs");
    let full = repo
        .verify(&cairn_engine::VerifyOptions::default().with_read_data(true))
        .unwrap();
    // Four windows of 25 %: together they read every blob exactly once.
    let (mut blobs, mut bytes, mut nonempty) = (0, 0, 0);
    for window in 0..4 {
        let r = repo
            .verify(
                &cairn_engine::VerifyOptions::default()
                    .with_read_data_subset(25, window)
                    .unwrap(),
            )
            .unwrap();
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.packs, full.packs, "every pack still gets its table check");
        blobs += r.blobs_read;
        bytes += r.bytes_read;
        nonempty += (r.blobs_read > 0) as usize;
        assert!(
            r.blobs_read < full.blobs_read,
            "window {window} read everything"
        );
    }
    assert_eq!((blobs, bytes), (full.blobs_read, full.bytes_read));
    assert!(nonempty >= 2, "the windows split the packs");
    // Window 4 is window 0 again (the cycle has four windows).
    let w0 = cairn_engine::VerifyOptions::default()
        .with_read_data_subset(25, 0)
        .unwrap();
    let w4 = cairn_engine::VerifyOptions::default()
        .with_read_data_subset(25, 4)
        .unwrap();
    assert_eq!(
        repo.verify(&w0).unwrap().bytes_read,
        repo.verify(&w4).unwrap().bytes_read
    );
    assert!(cairn_engine::VerifyOptions::default()
        .with_read_data_subset(0, 0)
        .is_err());
    assert!(cairn_engine::VerifyOptions::default()
        .with_read_data_subset(101, 0)
        .is_err());
}
