//! Backup → restore → verify through the real pipelines, on the in-memory and
//! local pools, with generated images (zeros, text, random, duplicates, holes).
#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

mod jobs;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cairn_engine::sample::{fill_text, SampleRng};
use cairn_engine::{
    BackupDisk, BackupOptions, ChunkId, ChunkingParams, DamageKind, DiskInput, DiskSource, DynPool,
    Error, FileKind, NoProgress, PackId, PoolDelete, PoolList, PoolRead, RawFileSource, Repository,
    RestoreOptions, VerifyOptions,
};
use cairn_pools::{LocalPool, MemoryPool};
use jobs::{backup, restore_to_dir, verify};

/// An image held in memory, with optional declared data extents.
struct MemSource {
    data: Vec<u8>,
    fail_after: Option<u64>,
    read: AtomicU64,
}

impl MemSource {
    fn new(data: Vec<u8>) -> Self {
        MemSource {
            data,
            fail_after: None,
            read: AtomicU64::new(0),
        }
    }
}

impl DiskSource for MemSource {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> cairn_engine::Result<()> {
        let done = self.read.fetch_add(buf.len() as u64, Ordering::SeqCst);
        if self.fail_after.is_some_and(|f| done >= f) {
            return Err(Error::io(
                "reading test disk",
                std::io::Error::other("simulated dropped connection"),
            ));
        }
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }
    fn describe(&self) -> String {
        "memory disk".into()
    }
}

/// Mixed content: zeros, text, random, and a duplicated region.
fn mixed_image(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = SampleRng::new(seed);
    let mut v = vec![0u8; size];
    let block = 256 << 10;
    let mut off = 0;
    let mut i = 0;
    while off < size {
        let end = (off + block).min(size);
        match i % 4 {
            0 => {}
            1 => fill_text(&mut rng, &mut v[off..end]),
            2 => rng.fill(&mut v[off..end]),
            _ => {
                let (a, b) = v.split_at_mut(off);
                let n = end - off;
                b[..n].copy_from_slice(&a[off - block..off - block + n]);
            }
        }
        off = end;
        i += 1;
    }
    v
}

fn memory_repo() -> (MemoryPool, Repository) {
    let pool = MemoryPool::new();
    let dynpool: DynPool = Arc::new(pool.clone());
    Repository::init(dynpool.clone()).unwrap();
    (pool, Repository::open(dynpool).unwrap())
}

fn resolve_snapshot(
    repo: &Repository,
    selector: &str,
    vm: Option<&str>,
) -> cairn_engine::Result<cairn_engine::SnapshotId> {
    repo.resolve(&cairn_engine::SnapshotSelector::parse(selector, vm)?)
}

fn image_disk(name: &str, data: Vec<u8>) -> BackupDisk {
    BackupDisk::new(
        name.to_string(),
        DiskInput::Image(Box::new(MemSource::new(data))),
    )
}

/// A full backup of one in-memory disk for VM "vm".
fn backup_image(repo: &Repository, name: &str, data: Vec<u8>) -> cairn_engine::BackupStats {
    backup(
        repo,
        vec![image_disk(name, data)],
        &BackupOptions::new("vm"),
        &NoProgress,
    )
    .unwrap()
}

fn restore_bytes(
    repo: &Repository,
    id: &cairn_engine::SnapshotId,
    dir: &Path,
) -> BTreeMap<String, Vec<u8>> {
    restore_to_dir(repo, id, dir, &RestoreOptions::default(), &NoProgress).unwrap();
    let snap = repo.load_snapshot_with_extents(id).unwrap();
    snap.disks
        .iter()
        .map(|d| (d.name.clone(), std::fs::read(dir.join(&d.name)).unwrap()))
        .collect()
}

#[test]
fn round_trip_fixed_and_cdc_with_exact_dedup() {
    for (chunking, extent_pages) in [
        (ChunkingParams::default(), false),
        (ChunkingParams::cdc(), false),
        (ChunkingParams::Fixed { size: 4096 }, false),
        (ChunkingParams::default(), true),
        (ChunkingParams::cdc(), true),
        (ChunkingParams::Fixed { size: 4096 }, true),
    ] {
        let (_pool, repo) = memory_repo();
        // Sizes that are not multiples of the chunk size, and an empty disk.
        let a = mixed_image(3 * 1024 * 1024 + 12345, 1);
        let b = mixed_image(700_001, 2);
        let mut opts = BackupOptions::new("vm1");
        opts.chunking = chunking;
        opts.batch_size = 1 << 20;
        opts.extent_pages = extent_pages;
        let s1 = backup(
            &repo,
            vec![
                image_disk("a", a.clone()),
                image_disk("b", b.clone()),
                image_disk("empty", vec![]),
            ],
            &opts,
            &NoProgress,
        )
        .unwrap();
        assert_eq!(s1.bytes_logical, (a.len() + b.len()) as u64);
        assert!(
            s1.chunks_new > 0 && s1.chunks_new < s1.chunks_total,
            "{chunking}: duplicates were not deduplicated: {s1:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        let got = restore_bytes(&repo, &s1.snapshot, dir.path());
        assert!(got["a"] == a, "{chunking}: disk a differs");
        assert!(got["b"] == b, "{chunking}: disk b differs");
        assert!(got["empty"].is_empty());

        // Unchanged data: nothing new is stored.
        let s2 = backup(
            &repo,
            vec![image_disk("a", a.clone()), image_disk("b", b.clone())],
            &opts,
            &NoProgress,
        )
        .unwrap();
        assert_eq!(s2.chunks_new, 0);
        assert_eq!(s2.packs_written, 0);
        assert_eq!(s2.chunks_total, s1.chunks_total);

        let report = verify(
            &repo,
            &VerifyOptions::default().with_read_data(true),
            &NoProgress,
        )
        .unwrap();
        assert!(report.is_ok(), "{:?}", report.damage);
        assert_eq!(report.blobs_read, s1.chunks_new + s1.pages_new);

        // Version 2: one page per non-empty disk here, stored once (the
        // unchanged second backup's pages dedup); the pages survive a
        // collection and the snapshots still restore.
        let manifest = repo.load_snapshot(&s2.snapshot).unwrap();
        assert_eq!(manifest.is_paged(), extent_pages, "{chunking}");
        if extent_pages {
            let pages: usize = manifest.disks.iter().map(|d| d.pages.len()).sum();
            assert!(pages >= 2, "{chunking}: {pages} pages");
            assert_eq!(s1.pages_new as usize, pages, "{chunking}");
            assert_eq!(s2.pages_new, 0, "{chunking}");
            let listed = repo.load_snapshot_with_extents(&s2.snapshot).unwrap();
            let chunks: u64 = listed
                .disks
                .iter()
                .map(|d| d.extents.iter().filter(|e| e.chunk.is_some()).count() as u64)
                .sum();
            assert_eq!(chunks, s2.chunks_total);
            repo.forget(&[s1.snapshot]).unwrap();
            repo.gc(&cairn_engine::GcOptions::default()).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let got = restore_bytes(&repo, &s2.snapshot, dir.path());
            assert!(got["a"] == a && got["b"] == b, "{chunking}: after gc");
            let report = verify(&repo, &VerifyOptions::default(), &NoProgress).unwrap();
            assert!(report.is_ok(), "{chunking}: {:?}", report.damage);
        }
    }
}

#[test]
fn zero_chunks_are_never_stored() {
    let (_pool, repo) = memory_repo();
    let s = backup(
        &repo,
        vec![image_disk("z", vec![0u8; 5 << 20])],
        &BackupOptions::new("vm"),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(s.chunks_new, 0);
    assert_eq!(s.chunks_total, 0);
    // Only the disk's extent page (one zero run) is stored.
    assert_eq!(s.pages_new, 1);
    assert_eq!(s.packs_written, 1);
    let snap = repo.load_snapshot_with_extents(&s.snapshot).unwrap();
    assert_eq!(snap.disks[0].extents.len(), 1);
    assert_eq!(snap.disks[0].extents[0].chunk, None);
}

#[test]
fn stream_input_round_trips_with_cdc() {
    let (_pool, repo) = memory_repo();
    let data = mixed_image(2_500_000, 9);
    let mut opts = BackupOptions::new("db");
    opts.chunking = ChunkingParams::cdc();
    let disk = BackupDisk::new(
        "dump.sql",
        DiskInput::Stream(Box::new(std::io::Cursor::new(data.clone()))),
    );
    let s = backup(&repo, vec![disk], &opts, &NoProgress).unwrap();
    assert_eq!(s.bytes_logical, data.len() as u64);
    assert_eq!(s.bytes_read, data.len() as u64);
    let dir = tempfile::tempdir().unwrap();
    assert!(restore_bytes(&repo, &s.snapshot, dir.path())["dump.sql"] == data);
}

#[test]
fn sparse_file_holes_are_skipped_and_restored_as_holes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sparse.img");
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&img)
        .unwrap();
    f.set_len(64 << 20).unwrap();
    let mut rng = SampleRng::new(5);
    let mut data = vec![0u8; 100_000];
    rng.fill(&mut data);
    f.write_all_at(&data, 10 << 20).unwrap();
    f.write_all_at(&data, (40 << 20) + 333).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let pool_dir = dir.path().join("pool");
    let pool: DynPool = Arc::new(LocalPool::create(&pool_dir).unwrap());
    Repository::init(pool.clone()).unwrap();
    let repo = Repository::open(pool).unwrap();
    // The memory-mapped source gives the same snapshot as the read path.
    let mut ids = Vec::new();
    for mapped in [false, true] {
        let src = if mapped {
            RawFileSource::open_mapped(&img)
        } else {
            RawFileSource::open(&img)
        };
        assert_eq!(src.as_ref().unwrap().mapped().is_some(), mapped);
        let disk = BackupDisk::new("sparse.img", DiskInput::Image(Box::new(src.unwrap())));
        // Read each time (the file is unchanged: it would be reused).
        let mut opts = BackupOptions::new("vm");
        opts.reuse_unchanged = false;
        let s = backup(&repo, vec![disk], &opts, &NoProgress).unwrap();
        let snap = repo.load_snapshot_with_extents(&s.snapshot).unwrap();
        ids.push((snap.disks[0].extents.clone(), s.bytes_read));
    }
    assert_eq!(ids[0], ids[1]);
    let disk = BackupDisk::new(
        "sparse.img",
        DiskInput::Image(Box::new(RawFileSource::open(&img).unwrap())),
    );
    let mut opts = BackupOptions::new("vm");
    opts.reuse_unchanged = false;
    let s = backup(&repo, vec![disk], &opts, &NoProgress).unwrap();
    // Only the allocated blocks, rounded out to the 64 KiB grid, are read.
    assert!(
        s.bytes_read <= 4 * (128 << 10) + 2 * 100_000,
        "read {}",
        s.bytes_read
    );
    let out = dir.path().join("out");
    restore_to_dir(
        &repo,
        &s.snapshot,
        &out,
        &RestoreOptions::default(),
        &NoProgress,
    )
    .unwrap();
    let restored = out.join("sparse.img");
    assert_eq!(
        std::fs::read(&restored).unwrap(),
        std::fs::read(&img).unwrap()
    );
    // Restored file is sparse: far fewer blocks allocated than its size.
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(&restored).unwrap().blocks() * 512;
    assert!(blocks < 4 << 20, "restored file allocates {blocks} bytes");
    // Restoring again into the same place is refused without overwrite.
    let again = restore_to_dir(
        &repo,
        &s.snapshot,
        &out,
        &RestoreOptions::default(),
        &NoProgress,
    );
    assert!(matches!(again, Err(Error::TargetExists { .. })));
}

/// A backup of `data` as disk "d" of VM "vm" that seals a pack every MiB
/// and fails after reading `fail_after` bytes (a dropped connection): the
/// packs it sealed stay, in no segment. Returns its options and error.
fn interrupted_backup(repo: &Repository, data: &[u8], fail_after: u64) -> (BackupOptions, Error) {
    let mut opts = BackupOptions::new("vm");
    opts.pack_max_input = 1 << 20; // seal often
    opts.batch_size = 1 << 20;
    opts.threads = std::num::NonZeroUsize::new(1);
    let failing = BackupDisk::new(
        "d",
        DiskInput::Image(Box::new(MemSource {
            data: data.to_vec(),
            fail_after: Some(fail_after),
            read: AtomicU64::new(0),
        })),
    );
    let err = backup(repo, vec![failing], &opts, &NoProgress).unwrap_err();
    (opts, err)
}

#[test]
fn interrupted_backup_keeps_earlier_snapshots_and_its_packs_are_reused() {
    let (pool, repo) = memory_repo();
    let first = mixed_image(2 << 20, 3);
    let s1 = backup_image(&repo, "d", first.clone());

    let big = mixed_image(8 << 20, 4);
    let (opts, err) = interrupted_backup(&repo, &big, 6 << 20);
    assert!(
        err.to_string().contains("simulated dropped connection"),
        "{err}"
    );
    // No new snapshot; the first one is intact.
    assert_eq!(repo.snapshot_ids().unwrap(), vec![s1.snapshot]);
    let packs_after_failure = pool.list(FileKind::Pack).unwrap().len();
    assert!(
        packs_after_failure > 1,
        "sealed packs of the interrupted run are kept"
    );

    // What the pool holds now, from the packs' own tables.
    let mut stored = std::collections::HashSet::new();
    for name in pool.list(FileKind::Pack).unwrap() {
        let pack = cairn_engine::PackId::from_hex(&name).unwrap();
        for e in cairn_engine::internals::read_pack_table(&pool, &pack).unwrap() {
            stored.insert(e.id);
        }
    }

    // A new process: the sealed packs are indexed from their tables and reused.
    let dynpool: DynPool = Arc::new(pool.clone());
    let repo = Repository::open(dynpool).unwrap();
    assert!(!repo.index().unwrap().uncovered_packs().is_empty());
    let s2 = backup(
        &repo,
        vec![image_disk("d", big.clone())],
        &opts,
        &NoProgress,
    )
    .unwrap();
    // Exactly the chunks not yet stored are new: nothing the interrupted
    // run sealed is stored again.
    let needed: std::collections::HashSet<_> = repo
        .load_snapshot_with_extents(&s2.snapshot)
        .unwrap()
        .disks
        .iter()
        .flat_map(|d| d.extents.iter().filter_map(|e| e.chunk).collect::<Vec<_>>())
        .collect();
    let missing = needed.iter().filter(|c| !stored.contains(*c)).count() as u64;
    assert_eq!(s2.chunks_new, missing, "{s2:?}");
    let reused = needed.len() as u64 - missing;
    assert!(
        reused > missing,
        "most of it was sealed before the failure and is reused: {reused} reused, {s2:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    assert!(restore_bytes(&repo, &s1.snapshot, &dir.path().join("1"))["d"] == first);
    assert!(restore_bytes(&repo, &s2.snapshot, &dir.path().join("2"))["d"] == big);
    assert!(repo.index().unwrap().uncovered_packs().is_empty());
}

/// A first backup interrupted after sealing packs leaves them in no
/// segment. A handle that took them in as uncovered, then saw a collection
/// delete them (no snapshot references them), is not stale: the pool had
/// no segment for the collection to replace. Its next backup must not
/// name the deleted packs in its segment ("no segment may name a pack
/// after the sweep deleted it"): they are told apart by the index's
/// absent packs, not by any notice, which the collection removed.
#[test]
fn uncovered_packs_a_collection_deleted_are_not_named_by_the_next_segment() {
    let (pool, repo) = memory_repo();
    let image = mixed_image(6 << 20, 21);
    let (opts, _) = interrupted_backup(&repo, &image, 4 << 20);
    let sealed: Vec<String> = pool.list(FileKind::Pack).unwrap();
    assert!(!sealed.is_empty(), "the interrupted run sealed packs");
    assert!(pool.list(FileKind::Index).unwrap().is_empty());

    let dynpool: DynPool = Arc::new(pool.clone());
    let writer = Repository::open(dynpool.clone()).unwrap();
    let index = writer.index().unwrap();
    assert_eq!(
        index.uncovered_packs().len(),
        sealed.len(),
        "every sealed pack is taken in from its table"
    );
    let report = Repository::open(dynpool)
        .unwrap()
        .gc(&cairn_engine::GcOptions::default())
        .unwrap();
    assert_eq!(report.packs_deleted, sealed.len(), "{report:?}");
    let left = pool.list(FileKind::Pack).unwrap();
    assert!(sealed.iter().all(|p| !left.contains(p)), "{left:?}");

    let s = backup(
        &writer,
        vec![image_disk("d", image.clone())],
        &opts,
        &NoProgress,
    )
    .unwrap();
    // The backup ran on the index that took the packs in (a reloaded one
    // would hold none of them uncovered, and prove nothing).
    assert!(Arc::ptr_eq(&index, &writer.index().unwrap()));
    let listed: std::collections::BTreeSet<PackId> = pool
        .list(FileKind::Pack)
        .unwrap()
        .iter()
        .map(|n| PackId::from_hex(n).unwrap())
        .collect();
    let mut named = std::collections::BTreeSet::new();
    for name in pool.list(FileKind::Index).unwrap() {
        let seg =
            cairn_engine::internals::Segment::decode(pool.read(FileKind::Index, &name).unwrap())
                .unwrap();
        for pack in seg.packs() {
            assert!(
                listed.contains(pack),
                "segment {name} names pack {pack}, which the collection deleted"
            );
            named.insert(*pack);
        }
    }
    // And the backup's segment covers every pack it wrote.
    assert_eq!(named, listed);
    let dir = tempfile::tempdir().unwrap();
    assert!(restore_bytes(&writer, &s.snapshot, dir.path())["d"] == image);
    let report = verify(
        &writer,
        &VerifyOptions::default().with_read_data(true),
        &NoProgress,
    )
    .unwrap();
    assert!(report.is_ok(), "{:?}", report.damage);
}

#[test]
fn mid_backup_segment_flush_keeps_dedup_and_restores() {
    let (pool, repo) = memory_repo();
    let data = mixed_image(6 << 20, 11);
    let mut opts = BackupOptions::new("vm");
    opts.pack_max_input = 512 << 10;
    opts.segment_flush_entries = 4;
    let s = backup(
        &repo,
        vec![image_disk("d", data.clone())],
        &opts,
        &NoProgress,
    )
    .unwrap();
    assert!(pool.list(FileKind::Index).unwrap().len() > 1);
    let dir = tempfile::tempdir().unwrap();
    assert!(restore_bytes(&repo, &s.snapshot, dir.path())["d"] == data);
    let again = backup(&repo, vec![image_disk("d", data)], &opts, &NoProgress).unwrap();
    assert_eq!(again.chunks_new, 0);
}

fn first_pack(pool: &MemoryPool) -> (String, Vec<u8>) {
    let name = pool
        .list(FileKind::Pack)
        .unwrap()
        .into_iter()
        .next()
        .unwrap();
    let bytes = pool.read(FileKind::Pack, &name).unwrap().to_vec();
    (name, bytes)
}

#[test]
fn flipped_bit_in_pack_is_found_by_verify_and_refused_by_restore() {
    let (pool, repo) = memory_repo();
    let data = mixed_image(1 << 20, 21);
    let s = backup_image(&repo, "d", data);
    let (name, mut bytes) = first_pack(&pool);
    bytes[100] ^= 0x01; // inside the first blob
    pool.tamper(FileKind::Pack, &name, bytes);

    let structural = verify(&repo, &VerifyOptions::default(), &NoProgress).unwrap();
    assert!(
        structural.is_ok(),
        "structural verify does not read blob bodies"
    );
    let report = verify(
        &repo,
        &VerifyOptions::default().with_read_data(true),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(report.damage.len(), 1, "{:?}", report.damage);
    let d = &report.damage[0];
    assert_eq!(d.kind, DamageKind::ChunkCorrupt);
    assert_eq!(d.pack, PackId::from_hex(&name));
    assert_eq!(d.snapshots, vec![s.snapshot]);

    let dir = tempfile::tempdir().unwrap();
    let err = restore_to_dir(
        &repo,
        &s.snapshot,
        dir.path(),
        &RestoreOptions::default(),
        &NoProgress,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::ChunkHashMismatch { .. } | Error::Corrupt { .. }),
        "{err}"
    );
    // The partial file is removed; nothing half-written is left under the disk's name.
    assert!(!dir.path().join("d").exists());
}

#[test]
fn damaged_missing_truncated_packs_are_reported() {
    for case in ["truncate", "empty", "missing", "table"] {
        let (pool, repo) = memory_repo();
        let s = backup_image(&repo, "d", mixed_image(1 << 20, 5));
        let (name, bytes) = first_pack(&pool);
        match case {
            "truncate" => pool.tamper(FileKind::Pack, &name, bytes[..bytes.len() / 2].to_vec()),
            "empty" => pool.tamper(FileKind::Pack, &name, Vec::new()),
            "missing" => pool.delete(FileKind::Pack, &name).unwrap(),
            _ => {
                let mut b = bytes.clone();
                let n = b.len();
                b[n - 70] ^= 0xff; // in the blob table
                pool.tamper(FileKind::Pack, &name, b);
            }
        }
        for read_data in [false, true] {
            let report = verify(
                &repo,
                &VerifyOptions::default()
                    .with_read_data(read_data)
                    .with_threads(std::num::NonZeroUsize::new(1)),
                &NoProgress,
            )
            .unwrap();
            assert!(!report.is_ok(), "{case}/{read_data}: damage not found");
            let kinds: Vec<_> = report.damage.iter().map(|d| d.kind).collect();
            let expected = if case == "missing" {
                DamageKind::PackMissing
            } else {
                DamageKind::PackUnreadable
            };
            assert!(kinds.contains(&expected), "{case}: {kinds:?}");
            assert!(report
                .damage
                .iter()
                .all(|d| d.snapshots == vec![s.snapshot]));
        }
        let dir = tempfile::tempdir().unwrap();
        let err = restore_to_dir(
            &repo,
            &s.snapshot,
            dir.path(),
            &RestoreOptions::default(),
            &NoProgress,
        );
        // "table" damage leaves blobs readable: restore still verifies every chunk.
        if case != "table" {
            let e = err.unwrap_err().to_string();
            assert!(
                e.contains(&name),
                "{case}: error does not name the pack: {e}"
            );
        }
    }
}

#[test]
fn a_damaged_index_segment_loses_nothing_is_reported_and_rebuild_repairs_it() {
    for case in ["truncate", "empty", "flip"] {
        let (pool, repo) = memory_repo();
        let data = mixed_image(1 << 20, 8);
        let s = backup_image(&repo, "d", data.clone());
        let name = pool.list(FileKind::Index).unwrap().pop().unwrap();
        let bytes = pool.read(FileKind::Index, &name).unwrap().to_vec();
        let bad = match case {
            "truncate" => bytes[..bytes.len() - 10].to_vec(),
            "empty" => Vec::new(),
            _ => {
                let mut b = bytes.clone();
                let n = b.len();
                b[n - 100] ^= 1;
                b
            }
        };
        pool.tamper(FileKind::Index, &name, bad);
        let dynpool: DynPool = Arc::new(pool.clone());
        let repo = Repository::open(dynpool.clone()).unwrap();
        // The segment's packs are indexed from their own tables: the
        // snapshot still restores, and verify names the damaged segment.
        let dir = tempfile::tempdir().unwrap();
        assert!(restore_bytes(&repo, &s.snapshot, &dir.path().join("before"))["d"] == data);
        let damaged = repo.index().unwrap().damaged_segments();
        assert_eq!(damaged.len(), 1, "{case}");
        assert_eq!(damaged[0].0, name, "{case}");
        let report = verify(&repo, &VerifyOptions::default(), &NoProgress).unwrap();
        assert_eq!(report.damage.len(), 1, "{case}: {report:?}");
        assert_eq!(report.damage[0].kind, DamageKind::SegmentDamaged, "{case}");
        assert!(report.damage[0].detail.contains(&name), "{case}");
        assert!(report.damage[0].snapshots.is_empty(), "{case}");

        let report = repo.repair_index().unwrap();
        assert_eq!(report.segments_removed, 1);
        let repo = Repository::open(dynpool).unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert!(restore_bytes(&repo, &s.snapshot, dir.path())["d"] == data);
        drop(repo);
    }
}

#[test]
fn damaged_or_missing_manifest_is_reported() {
    for case in ["truncate", "empty", "flip"] {
        let (pool, repo) = memory_repo();
        let keep = backup_image(&repo, "d", mixed_image(1 << 20, 1));
        let s = backup_image(&repo, "d", mixed_image(1 << 20, 2));
        let name = s.snapshot.to_hex();
        let bytes = pool.read(FileKind::Snapshot, &name).unwrap().to_vec();
        let bad = match case {
            "truncate" => bytes[..bytes.len() - 1].to_vec(),
            "empty" => Vec::new(),
            _ => {
                let mut b = bytes;
                b[40] ^= 4;
                b
            }
        };
        pool.tamper(FileKind::Snapshot, &name, bad);
        let err = repo.load_snapshot_with_extents(&s.snapshot).unwrap_err();
        assert!(err.to_string().contains(&name), "{err}");
        let report = verify(&repo, &VerifyOptions::default(), &NoProgress).unwrap();
        assert_eq!(report.damage.len(), 1);
        assert_eq!(report.damage[0].kind, DamageKind::ManifestUnreadable);
        assert_eq!(report.damage[0].snapshots, vec![s.snapshot]);
        // The other snapshot still restores, bit-identical.
        let dir = tempfile::tempdir().unwrap();
        assert!(
            restore_bytes(&repo, &keep.snapshot, dir.path())["d"] == mixed_image(1 << 20, 1),
            "{case}"
        );
    }
    let (pool, repo) = memory_repo();
    let s = backup(
        &repo,
        vec![image_disk("d", vec![1u8; 1000])],
        &BackupOptions::new("vm"),
        &NoProgress,
    )
    .unwrap();
    pool.delete(FileKind::Snapshot, &s.snapshot.to_hex())
        .unwrap();
    assert!(repo
        .load_snapshot_with_extents(&s.snapshot)
        .unwrap_err()
        .is_not_found());
    assert!(matches!(
        resolve_snapshot(&repo, &s.snapshot.to_hex()[..8], None),
        Err(Error::SnapshotNotFound(_))
    ));
}

#[test]
fn selectors_and_validation() {
    let (_pool, repo) = memory_repo();
    let a = backup(
        &repo,
        vec![image_disk("d", vec![1u8; 1000])],
        &BackupOptions::new("a"),
        &NoProgress,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let b = backup(
        &repo,
        vec![image_disk("d", vec![2u8; 1000])],
        &BackupOptions::new("b"),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(
        resolve_snapshot(&repo, &a.snapshot.to_hex(), None).unwrap(),
        a.snapshot
    );
    assert_eq!(
        resolve_snapshot(&repo, &b.snapshot.to_hex()[..8], None).unwrap(),
        b.snapshot
    );
    assert_eq!(
        resolve_snapshot(&repo, "latest", Some("a")).unwrap(),
        a.snapshot
    );
    assert!(matches!(
        resolve_snapshot(&repo, "latest", None),
        Err(Error::AmbiguousSnapshot { .. })
    ));
    assert!(matches!(
        resolve_snapshot(&repo, "abc", None),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        resolve_snapshot(&repo, "latest", Some("zzz")),
        Err(Error::SnapshotNotFound(_))
    ));
    // Bad options are rejected before anything is written.
    let mut opts = BackupOptions::new("a");
    opts.chunking = ChunkingParams::Fixed { size: 1000 };
    assert!(matches!(
        backup(&repo, vec![image_disk("d", vec![1])], &opts, &NoProgress),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        backup(
            &repo,
            vec![image_disk("d", vec![1]), image_disk("d", vec![2])],
            &BackupOptions::new("a"),
            &NoProgress
        ),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        backup(
            &repo,
            vec![image_disk("../x", vec![1])],
            &BackupOptions::new("a"),
            &NoProgress
        ),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn uninitialised_pool_is_refused() {
    let pool: DynPool = Arc::new(MemoryPool::new());
    assert!(matches!(
        Repository::open(pool.clone()),
        Err(Error::NotInitialized { .. })
    ));
    Repository::init(pool.clone()).unwrap();
    assert!(matches!(
        Repository::init(pool),
        Err(Error::AlreadyExists { .. })
    ));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
        /// Any layout of zero / random / repeated runs restores bit-identical.
        #[test]
        fn any_image_round_trips(
            runs in proptest::collection::vec((0u8..3, 1usize..200_000), 0..12),
            cdc in any::<bool>(),
        ) {
            let mut data = Vec::new();
            let mut rng = SampleRng::new(runs.len() as u64);
            for (kind, len) in runs {
                let start = data.len();
                data.resize(start + len, 0);
                match kind {
                    0 => {}
                    1 => rng.fill(&mut data[start..]),
                    _ => data[start..].fill(0xab),
                }
            }
            let (_pool, repo) = memory_repo();
            let mut opts = BackupOptions::new("p");
            if cdc { opts.chunking = ChunkingParams::cdc(); }
            let s = backup(&repo, vec![image_disk("d", data.clone())], &opts, &NoProgress).unwrap();
            let dir = tempfile::tempdir().unwrap();
            prop_assert!(restore_bytes(&repo, &s.snapshot, dir.path())["d"] == data);
        }
    }
}

/// A pool whose pack writes fail after a budget of bytes (a full disk, a
/// dropped object-store connection).
struct FailingPool {
    inner: MemoryPool,
    budget: Arc<AtomicU64>,
}

struct FailingWriter {
    inner: Box<dyn cairn_engine::ObjectWriter>,
    budget: Arc<AtomicU64>,
}

impl std::io::Write for FailingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.budget.load(Ordering::SeqCst);
        if (buf.len() as u64) > left {
            return Err(std::io::Error::other("simulated: no space left on pool"));
        }
        self.budget.fetch_sub(buf.len() as u64, Ordering::SeqCst);
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl cairn_engine::ObjectWriter for FailingWriter {
    fn commit(self: Box<Self>) -> cairn_engine::Result<()> {
        self.inner.commit()
    }
}

impl PoolRead for FailingPool {
    fn read(&self, k: FileKind, n: &str) -> cairn_engine::Result<bytes::Bytes> {
        self.inner.read(k, n)
    }
    fn read_range(
        &self,
        k: FileKind,
        n: &str,
        o: u64,
        l: usize,
    ) -> cairn_engine::Result<bytes::Bytes> {
        self.inner.read_range(k, n, o, l)
    }
    fn size(&self, k: FileKind, n: &str) -> cairn_engine::Result<u64> {
        self.inner.size(k, n)
    }
    fn location(&self) -> String {
        "failing pool".into()
    }
}
impl cairn_engine::PoolWrite for FailingPool {
    fn create(
        &self,
        k: FileKind,
        n: &str,
    ) -> cairn_engine::Result<Box<dyn cairn_engine::ObjectWriter>> {
        Ok(Box::new(FailingWriter {
            inner: self.inner.create(k, n)?,
            budget: self.budget.clone(),
        }))
    }
}
impl PoolList for FailingPool {
    fn list(&self, k: FileKind) -> cairn_engine::Result<Vec<String>> {
        self.inner.list(k)
    }
}
impl PoolDelete for FailingPool {
    fn delete(&self, k: FileKind, n: &str) -> cairn_engine::Result<()> {
        self.inner.delete(k, n)
    }
}

#[test]
fn pool_write_failure_fails_the_backup_cleanly() {
    let inner = MemoryPool::new();
    let budget = Arc::new(AtomicU64::new(u64::MAX));
    let pool: DynPool = Arc::new(FailingPool {
        inner: inner.clone(),
        budget: budget.clone(),
    });
    Repository::init(pool.clone()).unwrap();
    let repo = Repository::open(pool).unwrap();
    let first = mixed_image(1 << 20, 1);
    let s1 = backup_image(&repo, "d", first.clone());
    budget.store(300_000, Ordering::SeqCst);
    let mut opts = BackupOptions::new("vm");
    opts.threads = std::num::NonZeroUsize::new(2);
    let err = backup(
        &repo,
        vec![image_disk("d", mixed_image(16 << 20, 2))],
        &opts,
        &NoProgress,
    )
    .unwrap_err();
    assert!(err.to_string().contains("no space left"), "{err}");
    assert!(
        err.to_string().contains("pack"),
        "error names the object: {err}"
    );
    assert_eq!(repo.snapshot_ids().unwrap(), vec![s1.snapshot]);
    let dir = tempfile::tempdir().unwrap();
    assert!(restore_bytes(&repo, &s1.snapshot, dir.path())["d"] == first);
}

mod incremental {
    use super::*;
    use cairn_engine::cbt::DirtyBitmap;
    use cairn_engine::{ChangedBlocks, SnapshotId};

    /// Backs up `data` as an incremental of `parent` with `bitmap`.
    fn incremental(
        repo: &Repository,
        parent: SnapshotId,
        data: &[u8],
        bitmap: &DirtyBitmap,
    ) -> cairn_engine::Result<cairn_engine::BackupStats> {
        let snap = repo.load_snapshot_with_extents(&parent).unwrap();
        let changed = ChangedBlocks::new(parent, &snap, "d", bitmap.dirty_extents())?;
        backup_changed(repo, changed, data)
    }

    /// Backs up `data` as disk "d" of VM "vm", an incremental by `changed`.
    fn backup_changed(
        repo: &Repository,
        changed: ChangedBlocks,
        data: &[u8],
    ) -> cairn_engine::Result<cairn_engine::BackupStats> {
        let disk = BackupDisk::new(
            "d",
            DiskInput::Incremental {
                source: Box::new(MemSource::new(data.to_vec())),
                changed,
            },
        );
        backup(repo, vec![disk], &BackupOptions::new("vm"), &NoProgress)
    }

    #[test]
    fn chain_of_incrementals_reads_only_dirty_blocks_and_every_point_restores() {
        let (pool, repo) = memory_repo();
        let mut data = mixed_image(8 << 20, 31);
        let full = backup_image(&repo, "d", data.clone());
        let mut points = vec![(full.snapshot, data.clone())];
        let mut rng = SampleRng::new(77);
        for _ in 0..10 {
            let mut bitmap = DirtyBitmap::new(data.len() as u64, 65536).unwrap();
            // The 64 KiB cells the writes touch, counted here, not by the
            // bitmap under test.
            let mut cells = std::collections::BTreeSet::new();
            for _ in 0..5 {
                let len = 512 * (1 + rng.below(16)) as usize;
                let at = rng.below((data.len() - len) as u64) as usize;
                rng.fill(&mut data[at..at + len]);
                bitmap.set_range(at as u64..(at + len) as u64);
                cells.extend(at / 65536..=(at + len - 1) / 65536);
            }
            let parent = points.last().unwrap().0;
            let s = incremental(&repo, parent, &data, &bitmap).unwrap();
            assert_eq!(s.mode.as_str(), "cbt");
            assert_eq!(s.bytes_dirty, cells.len() as u64 * 65536);
            assert!(s.bytes_read <= s.bytes_dirty, "{s:?}");
            assert!(s.bytes_read > 0);
            let snap = repo.load_snapshot_with_extents(&s.snapshot).unwrap();
            assert_eq!(snap.parent, Some(parent));
            assert_eq!(snap.mode.as_str(), "cbt");
            points.push((s.snapshot, data.clone()));
        }
        // Every point restores bit-identical, on its own.
        let dir = tempfile::tempdir().unwrap();
        for (i, (id, expected)) in points.iter().enumerate() {
            assert!(
                restore_bytes(&repo, id, &dir.path().join(i.to_string()))["d"] == *expected,
                "point {i}"
            );
        }
        // Deleting a middle manifest leaves every other point restorable.
        pool.delete(FileKind::Snapshot, &points[5].0.to_hex())
            .unwrap();
        for (i, (id, expected)) in points.iter().enumerate().filter(|(i, _)| *i != 5) {
            assert!(
                restore_bytes(&repo, id, &dir.path().join(format!("after-{i}")))["d"] == *expected
            );
        }
    }

    #[test]
    fn a_copy_of_the_changes_over_a_paged_parent_reads_its_pages() {
        // The parent is version 2 (extent lists in pages); the caller
        // hands the backup a clone of the change set, made before the
        // repository attached its pool.
        let (_pool, repo) = memory_repo();
        let mut data = mixed_image(2 << 20, 5);
        let full = backup_image(&repo, "d", data.clone());
        let parent = repo.load_snapshot(&full.snapshot).unwrap();
        assert!(parent.is_paged() && !parent.disks[0].pages.is_empty());
        data[700_000..700_100].fill(0xab);
        let mut bitmap = DirtyBitmap::new(data.len() as u64, 65536).unwrap();
        bitmap.set_range(700_000..700_100);
        let changed =
            ChangedBlocks::new(full.snapshot, &parent, "d", bitmap.dirty_extents()).unwrap();
        let copy = changed.clone();
        drop(changed);
        let s = backup_changed(&repo, copy, &data).unwrap();
        assert_eq!(s.mode.as_str(), "cbt");
        // Only the dirty block: the parent's page (short, and its disk's
        // last) was read and accepted, not taken for damage.
        assert_eq!(s.bytes_read, 65536);
        assert_eq!(s.parent_pages_damaged, 0);
        let dir = tempfile::tempdir().unwrap();
        assert!(restore_bytes(&repo, &s.snapshot, dir.path())["d"] == data);
    }

    #[test]
    fn a_paged_parent_whose_extents_are_off_the_grid_is_not_spliced() {
        // A version 2 parent chunked with CDC, presented as if chunked on
        // the 64 KiB grid (what a forged or corrupt manifest would say):
        // its extents are only seen page by page, and the first one off
        // the grid stops the incremental.
        let (_pool, repo) = memory_repo();
        let data = mixed_image(2 << 20, 9);
        let mut opts = BackupOptions::new("vm");
        opts.chunking = ChunkingParams::cdc();
        let full = backup(
            &repo,
            vec![image_disk("d", data.clone())],
            &opts,
            &NoProgress,
        )
        .unwrap();
        let mut parent = repo.load_snapshot(&full.snapshot).unwrap();
        assert!(parent.is_paged());
        parent.chunking = ChunkingParams::default();
        let mut bitmap = DirtyBitmap::new(data.len() as u64, 65536).unwrap();
        bitmap.set_range(0..1);
        let changed =
            ChangedBlocks::new(full.snapshot, &parent, "d", bitmap.dirty_extents()).unwrap();
        let err = backup_changed(&repo, changed, &data).unwrap_err();
        assert!(matches!(err, Error::CbtNotTrusted { .. }), "{err}");
        assert!(err.to_string().contains("grid"), "{err}");
    }

    #[test]
    fn untrusted_change_information_is_refused_before_reading() {
        let (_pool, repo) = memory_repo();
        let data = mixed_image(2 << 20, 3);
        let full = backup_image(&repo, "d", data.clone());
        let bitmap = DirtyBitmap::new(data.len() as u64, 65536).unwrap();
        // Resized disk.
        let mut bigger = data.clone();
        bigger.extend_from_slice(&[1u8; 65536]);
        let err = incremental(&repo, full.snapshot, &bigger, &bitmap).unwrap_err();
        assert!(matches!(err, Error::CbtNotTrusted { .. }), "{err}");
        assert!(err.to_string().contains("resized"));
        // Parent chunked differently.
        let mut opts = BackupOptions::new("vm");
        opts.chunking = ChunkingParams::cdc();
        let cdc = backup(
            &repo,
            vec![image_disk("d", data.clone())],
            &opts,
            &NoProgress,
        )
        .unwrap();
        let err = incremental(&repo, cdc.snapshot, &data, &bitmap).unwrap_err();
        assert!(matches!(err, Error::CbtNotTrusted { .. }), "{err}");
        // A clean bitmap against the right parent: nothing read, same content.
        let s = incremental(&repo, full.snapshot, &data, &bitmap).unwrap();
        assert_eq!(s.bytes_read, 0);
        assert_eq!(s.chunks_new, 0);
        let dir = tempfile::tempdir().unwrap();
        assert!(restore_bytes(&repo, &s.snapshot, dir.path())["d"] == data);
    }
}

#[test]
fn hash_mismatch_names_chunk_pack_and_the_damaged_content_id() {
    let (pool, repo) = memory_repo();
    let mut opts = BackupOptions::new("vm");
    opts.compression = cairn_engine::Compression::None;
    let s = backup(
        &repo,
        vec![image_disk("d", mixed_image(1 << 20, 9))],
        &opts,
        &NoProgress,
    )
    .unwrap();
    let (name, mut bytes) = first_pack(&pool);
    let entry = cairn_engine::internals::parse_pack(&bytes).unwrap()[0];
    let body = entry.offset as usize + 12..(entry.offset + entry.length as u64) as usize;
    bytes[body.start] ^= 0x40; // raw blob: the content changes, the header does not
                               // What the damaged content hashes to, by BLAKE3 itself.
    let damaged = ChunkId(*blake3::hash(&bytes[body]).as_bytes());
    pool.tamper(FileKind::Pack, &name, bytes);
    let dir = tempfile::tempdir().unwrap();
    let err = restore_to_dir(
        &repo,
        &s.snapshot,
        dir.path(),
        &RestoreOptions::default(),
        &NoProgress,
    )
    .unwrap_err();
    assert!(err.is_damage(), "{err}");
    match err {
        Error::ChunkHashMismatch { chunk, pack, got } => {
            assert_eq!(chunk, entry.id);
            assert_eq!(pack.to_hex(), name);
            assert_eq!(got, damaged);
        }
        other => panic!("expected a hash mismatch, got {other}"),
    }
}

/// The index loads every stored segment and names them; a refresh takes
/// in exactly the segments written since (counted), and nothing when none
/// was. Segment names and packs are counted from the pool's own listing;
/// the entry count is checked against the segments' own lengths and the
/// rebuild's count from the pack tables.
#[test]
fn an_index_loads_and_refreshes_exactly_the_stored_segments() {
    use cairn_engine::internals::Index;
    use cairn_engine::{FileKind, PoolList};
    let (pool, repo) = memory_repo();
    backup_image(&repo, "d", mixed_image(1 << 20, 1));
    let stored = |pool: &MemoryPool| {
        let mut names = pool.list(FileKind::Index).unwrap();
        names.sort();
        names
    };
    let first = stored(&pool);
    assert_eq!(first.len(), 1);
    let index = Index::load(&pool).unwrap();
    assert_eq!(index.segment_count(), 1);
    let (segments, mut names) = index.segments();
    names.sort();
    assert_eq!((segments.len(), names), (1, first));
    assert!(!segments[0].is_empty());
    assert_eq!(index.refresh(&pool).unwrap(), 0, "nothing new");

    backup_image(&repo, "d", mixed_image(1 << 20, 2));
    let second = stored(&pool);
    assert_eq!(second.len(), 2);
    assert_eq!(index.refresh(&pool).unwrap(), 1, "one new segment");
    assert_eq!(index.segment_count(), 2);
    let (segments, mut names) = index.segments();
    names.sort();
    assert_eq!(names, second);
    let entries: usize = segments.iter().map(|s| s.len()).sum();
    assert_eq!(index.entry_count(), entries);

    // A rebuild from the packs alone says what it did, in numbers counted
    // from the pool: every pack, the same chunks, both old segments gone.
    let packs = pool.list(FileKind::Pack).unwrap().len();
    let report = repo.repair_index().unwrap();
    assert_eq!(
        report.to_string(),
        format!(
            "index rebuilt from {packs} packs: {entries} chunks, 2 old segments removed, \
             0 damaged packs skipped"
        )
    );
}
