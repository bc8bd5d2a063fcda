//! The restore pipeline's options, statistics and error mapping, through the
//! library: disk selection, overwriting, exact counters, and which failures
//! count as damage (a pack shorter than its table, a blob that does not
//! decode — named with its exact offset) and which do not (an I/O error);
//! the medium-order restore of sequential media (runs within one pack, its
//! sort spilled to scratch files); the reads both restore paths make, to
//! the byte.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::sync::Arc;

mod failing_reads;
use failing_reads::FailingReads;

use cairn_engine::bytes::Bytes;
use cairn_engine::internals::read_pack_table;
use cairn_engine::sample::SampleRng;
use cairn_engine::{
    BackupDisk, BackupOptions, Compression, DynPool, Error, FileKind, MemorySource, Pool,
    PoolDelete, PoolList, PoolRead, PoolWrapper, PoolWrite, Repository, RestoreOptions,
    WrappedPool,
};
use cairn_pools::MemoryPool;

const CHUNK: usize = 64 << 10;

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    SampleRng::new(seed).fill(&mut v);
    v
}

/// A pool with one snapshot of two disks: `vda` (8 random chunks, then 4
/// zero chunks) and `vdb` (3 random chunks).
fn two_disks(pool: DynPool) -> (Repository, cairn_engine::SnapshotId, Vec<u8>, Vec<u8>) {
    let repo = Repository::open_or_init(pool).unwrap();
    let mut vda = random(8 * CHUNK, 1);
    vda.extend_from_slice(&vec![0u8; 4 * CHUNK]);
    let vdb = random(3 * CHUNK, 2);
    let disks = vec![
        BackupDisk::image("vda", MemorySource::new("vda", vda.clone())),
        BackupDisk::image("vdb", MemorySource::new("vdb", vdb.clone())),
    ];
    let opts = BackupOptions::new("web").with_compression(Compression::None);
    let id = repo.backup(disks, &opts).unwrap().snapshot;
    (repo, id, vda, vdb)
}

#[test]
fn options_select_disks_and_allow_overwriting_and_stats_are_exact() {
    let (repo, id, vda, vdb) = two_disks(Arc::new(MemoryPool::new()));
    let dir = tempfile::tempdir().unwrap();

    // Every disk: exact counters (zero chunks are holes, not written).
    let stats = repo
        .restore_to_dir(&id, dir.path(), &RestoreOptions::default())
        .unwrap();
    assert_eq!(stats.snapshot, id);
    assert_eq!(stats.disks, 2);
    assert_eq!(stats.bytes_logical, (vda.len() + vdb.len()) as u64);
    assert_eq!(stats.bytes_written, (11 * CHUNK) as u64);
    assert_eq!(stats.chunks, 11);
    assert!(std::fs::read(dir.path().join("vda")).unwrap() == vda);
    assert!(std::fs::read(dir.path().join("vdb")).unwrap() == vdb);
    let shown = stats.to_string();
    assert!(
        shown.contains(&format!("{id}"))
            && shown.contains("2 disks")
            && shown.contains(&format!("{} bytes logical", vda.len() + vdb.len()))
            && shown.contains(&format!("{} written", 11 * CHUNK)),
        "{shown}"
    );

    // Again into the same directory: refused without overwrite.
    match repo.restore_to_dir(&id, dir.path(), &RestoreOptions::default()) {
        Err(Error::TargetExists { .. }) => {}
        other => panic!("expected TargetExists, got {other:?}"),
    }
    let opts = RestoreOptions::default().with_overwrite(true);
    assert!(format!("{opts:?}").contains("overwrite: true"));
    repo.restore_to_dir(&id, dir.path(), &opts).unwrap();

    // One disk only: the other is not touched, the counters are its own.
    let one = tempfile::tempdir().unwrap();
    let opts = RestoreOptions::default().with_disks(["vdb"]);
    assert!(format!("{opts:?}").contains("vdb"));
    let stats = repo.restore_to_dir(&id, one.path(), &opts).unwrap();
    assert_eq!((stats.disks, stats.chunks), (1, 3));
    assert_eq!(stats.bytes_logical, vdb.len() as u64);
    assert!(std::fs::read(one.path().join("vdb")).unwrap() == vdb);
    assert!(!one.path().join("vda").exists());

    // An unknown disk is an error naming the disks there are; nothing is
    // written.
    let none = tempfile::tempdir().unwrap();
    let opts = RestoreOptions::default().with_disks(["vdb", "vdz"]);
    match repo.restore_to_dir(&id, none.path(), &opts) {
        Err(Error::InvalidArgument(m)) => {
            assert!(m.contains("vdz") && m.contains("vda, vdb"), "{m}")
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert_eq!(std::fs::read_dir(none.path()).unwrap().count(), 0);
}

/// The pack read errors injected, and whether each is damage: a short
/// read is, a permission error is not.
const FAILURES: [(std::io::ErrorKind, bool); 2] = [
    (std::io::ErrorKind::UnexpectedEof, true),
    (std::io::ErrorKind::PermissionDenied, false),
];

/// A repository on `base` whose pack reads fail with `kind`.
fn failing_repo(base: &DynPool, kind: std::io::ErrorKind) -> Repository {
    let pool: DynPool = Arc::new(WrappedPool(FailingReads {
        inner: base.clone(),
        kind,
    }));
    Repository::open(pool).unwrap()
}

#[test]
fn a_short_pack_is_damage_and_an_io_error_is_not() {
    let base: DynPool = Arc::new(MemoryPool::new());
    let (_, id, _, _) = two_disks(base.clone());
    for (kind, damage) in FAILURES {
        let repo = failing_repo(&base, kind);
        let dir = tempfile::tempdir().unwrap();
        let e = repo
            .restore_to_dir(&id, dir.path(), &RestoreOptions::default())
            .unwrap_err();
        assert_eq!(e.is_damage(), damage, "{kind:?}: {e}");
        if damage {
            assert!(e.to_string().contains("cannot be read"), "{e}");
        } else {
            assert!(matches!(e, Error::PoolIo { .. }), "{kind:?}: {e}");
        }
        // Nothing appears under a disk's name.
        assert!(!dir.path().join("vda").exists() && !dir.path().join("vdb").exists());
    }
}

#[test]
fn a_blob_that_does_not_decode_is_named_with_its_pack_and_offset() {
    let pool: DynPool = Arc::new(MemoryPool::new());
    let (repo, id, _, _) = two_disks(pool.clone());
    // The second blob of vda's run: its header's first byte flipped.
    let packs = pool.list(FileKind::Pack).unwrap();
    let (pack, entry) = packs
        .iter()
        .find_map(|name| {
            let pid = cairn_engine::PackId::from_hex(name).unwrap();
            let table = read_pack_table(&*pool, &pid).unwrap();
            (table.len() >= 8).then(|| (name.clone(), table[1]))
        })
        .unwrap();
    let mut bytes = pool.read(FileKind::Pack, &pack).unwrap().to_vec();
    bytes[entry.offset as usize] ^= 0xff;
    pool.delete(FileKind::Pack, &pack).unwrap();
    pool.write(FileKind::Pack, &pack, &bytes).unwrap();
    drop(repo);
    // Disk by disk, and in medium order (sequential media).
    for sequential in [false, true] {
        let counted: DynPool = Arc::new(WrappedPool(CountedReads {
            inner: pool.clone(),
            sequential,
            reads: Default::default(),
        }));
        let dir = tempfile::tempdir().unwrap();
        let e = Repository::open(counted)
            .unwrap()
            .restore_to_dir(&id, dir.path(), &RestoreOptions::default())
            .unwrap_err();
        assert!(e.is_damage(), "{e}");
        let m = e.to_string();
        assert!(
            m.contains(&format!("at offset {} of pack {pack}", entry.offset))
                && m.contains(&entry.id.to_hex()),
            "sequential {sequential}: {m}"
        );
    }
}

/// The medium-order restore joins blobs into runs only within one pack:
/// two packs each holding one chunk of the snapshot at the same offset
/// (their first blob) are two runs. And its sort of the extents spills to
/// scratch files (16 records a run) and reads them back whole.
#[test]
fn the_medium_order_restore_joins_runs_within_a_pack_and_spills_its_sort() {
    let base: DynPool = Arc::new(MemoryPool::new());
    let repo = Repository::open_or_init(base.clone()).unwrap();
    let opts = BackupOptions::new("web").with_compression(Compression::None);
    let backup = |image: &[u8]| {
        let disk = BackupDisk::image("vda", MemorySource::new("vda", image.to_vec()));
        repo.backup(vec![disk], &opts).unwrap().snapshot
    };
    // The first pack: c0 (its first blob), x1. The second: n1 (its first
    // blob). The snapshot restored needs c0 and n1 only.
    let (c0, n1) = (random(CHUNK, 10), random(CHUNK, 12));
    backup(&[c0.clone(), random(CHUNK, 11)].concat());
    let two_packs = [c0.clone(), n1.clone()].concat();
    let small = backup(&two_packs);
    let packs = base.list(FileKind::Pack).unwrap();
    assert_eq!(packs.len(), 2);
    let mut firsts: Vec<cairn_engine::ChunkId> = packs
        .iter()
        .map(|p| read_pack_table(&*base, &p.parse().unwrap()).unwrap()[0].id)
        .collect();
    firsts.sort();
    let mut wanted = vec![
        cairn_engine::ChunkId::of(&c0),
        cairn_engine::ChunkId::of(&n1),
    ];
    wanted.sort();
    assert_eq!(firsts, wanted);
    // 40 chunks, more than one sort run of 16 records.
    let big_image = random(40 * CHUNK, 13);
    let big = backup(&big_image);

    std::env::set_var("CAIRN_SORT_BUDGET", "0");
    let sequential: DynPool = Arc::new(WrappedPool(CountedReads {
        inner: base.clone(),
        sequential: true,
        reads: Default::default(),
    }));
    let repo = Repository::open(sequential).unwrap();
    for (id, image) in [(small, &two_packs), (big, &big_image)] {
        let dir = tempfile::tempdir().unwrap();
        let stats = repo
            .restore_to_dir(&id, dir.path(), &RestoreOptions::default())
            .unwrap();
        assert_eq!(stats.bytes_written, image.len() as u64);
        assert!(std::fs::read(dir.path().join("vda")).unwrap() == *image);
    }
    std::env::remove_var("CAIRN_SORT_BUDGET");
}

/// Records every read of a pack (name, offset, length); on sequential
/// media when asked (every pack at the same place on the medium: packs
/// sort by id, and restores read in medium order).
struct CountedReads {
    inner: DynPool,
    sequential: bool,
    reads: std::sync::Mutex<Vec<(String, u64, usize)>>,
}

impl PoolWrapper for CountedReads {
    fn inner(&self) -> &dyn Pool {
        &*self.inner
    }
    fn read_range(
        &self,
        kind: FileKind,
        name: &str,
        offset: u64,
        len: usize,
    ) -> cairn_engine::Result<Bytes> {
        if kind == FileKind::Pack {
            self.reads
                .lock()
                .unwrap()
                .push((name.to_string(), offset, len));
        }
        self.inner.read_range(kind, name, offset, len)
    }
    fn read_order(&self, kind: FileKind, name: &str) -> Option<u64> {
        self.sequential
            .then_some(0)
            .or(self.inner.read_order(kind, name))
    }
    fn sequential_media(&self) -> bool {
        self.sequential
    }
}

/// A restore reads blobs lying back to back in one pack with one read, up
/// to 4 MiB a read — of disk data when restoring disk by disk (the run
/// also ends where the disk's extents stop being contiguous), of pack
/// bytes in medium order, where a blob needed at several places is read
/// once. The expected reads are worked out from the packs' tables, not
/// asked of the engine.
#[test]
fn a_restore_reads_each_run_of_blobs_at_once_up_to_4_mib() {
    const RUN_MAX: u64 = 4 << 20;
    let base: DynPool = Arc::new(MemoryPool::new());
    let repo = Repository::open_or_init(base.clone()).unwrap();
    let mut opts = BackupOptions::new("web").with_compression(Compression::None);
    opts.pack_target = 6 << 20;
    // 167 chunks: 100, a hole of 4, 60, then the sixth chunk 3 times
    // again (and two packs).
    let mut image = random(100 * CHUNK, 20);
    image.extend_from_slice(&vec![0u8; 4 * CHUNK]);
    image.extend_from_slice(&random(60 * CHUNK, 21));
    let sixth = image[5 * CHUNK..6 * CHUNK].to_vec();
    for _ in 0..3 {
        image.extend_from_slice(&sixth);
    }
    let disk = BackupDisk::image("vda", MemorySource::new("vda", image.clone()));
    let id = repo.backup(vec![disk], &opts).unwrap().snapshot;
    let page = repo.load_snapshot(&id).unwrap().disks[0].pages[0].id;

    // Where each blob lies: chunk id → (pack, offset, length).
    let mut place = std::collections::HashMap::new();
    let mut packs = base.list(FileKind::Pack).unwrap();
    packs.sort();
    assert!(packs.len() >= 2, "{packs:?}");
    for p in &packs {
        for e in read_pack_table(&*base, &p.parse().unwrap()).unwrap() {
            place.insert(e.id, (p.clone(), e.offset, e.length as u64));
        }
    }
    // The disk's chunks in disk order (offset, blob place), holes left out.
    let chunks: Vec<(u64, (String, u64, u64))> = image
        .chunks(CHUNK)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|b| *b != 0))
        .map(|(i, c)| {
            (
                (i * CHUNK) as u64,
                place[&cairn_engine::ChunkId::of(c)].clone(),
            )
        })
        .collect();

    // Disk by disk: a run grows while the next chunk follows it on the
    // disk and in the same pack, up to 4 MiB of disk data.
    let mut by_disk: Vec<(String, u64, usize)> = Vec::new();
    let mut run: Option<(String, u64, u64, u64, u64)> = None; // pack, offset, len, disk end, disk len
    for (at, (pack, offset, len)) in &chunks {
        if let Some(r) = &mut run {
            if r.0 == *pack && r.1 + r.2 == *offset && r.3 == *at && r.4 + CHUNK as u64 <= RUN_MAX {
                r.2 += len;
                r.3 += CHUNK as u64;
                r.4 += CHUNK as u64;
                continue;
            }
            by_disk.push((r.0.clone(), r.1, r.2 as usize));
        }
        run = Some((pack.clone(), *offset, *len, at + CHUNK as u64, CHUNK as u64));
    }
    let r = run.unwrap();
    by_disk.push((r.0, r.1, r.2 as usize));

    // Medium order: by pack, then offset; a run grows while the next blob
    // follows it in the same pack, up to 4 MiB of pack bytes; a blob needed
    // again right after (a chunk at several places) is not read again.
    let mut sorted: Vec<(String, u64, u64)> = chunks.iter().map(|(_, p)| p.clone()).collect();
    sorted.sort();
    let mut in_order: Vec<(String, u64, usize)> = Vec::new();
    let mut run: Option<(String, u64, u64, u64)> = None; // pack, offset, len, last blob's offset
    for (pack, offset, len) in &sorted {
        if let Some(r) = &mut run {
            if r.0 == *pack && r.3 == *offset {
                continue;
            }
            if r.0 == *pack && r.1 + r.2 == *offset && r.2 + len <= RUN_MAX {
                r.2 += len;
                r.3 = *offset;
                continue;
            }
            in_order.push((r.0.clone(), r.1, r.2 as usize));
        }
        run = Some((pack.clone(), *offset, *len, *offset));
    }
    let r = run.unwrap();
    in_order.push((r.0, r.1, r.2 as usize));
    // Disk by disk, the sixth chunk's copies are read on their own.
    let (p6, o6, l6) = place[&cairn_engine::ChunkId::of(&sixth)].clone();
    let alone = (p6, o6, l6 as usize);
    assert_eq!(by_disk.iter().filter(|r| **r == alone).count(), 3);
    assert!(!in_order.contains(&alone));
    // Both plans have runs of the whole 4 MiB (64 blobs disk by disk, 63
    // by pack bytes) and runs cut short.
    let blob = CHUNK + 12;
    for (plan, full) in [(&by_disk, 64), (&in_order, 63)] {
        assert!(plan.iter().any(|r| r.2 == full * blob));
        assert!(plan.iter().any(|r| r.2 < full * blob && r.2 > blob));
    }

    for (sequential, expected) in [(false, by_disk), (true, in_order)] {
        let counted = Arc::new(WrappedPool(CountedReads {
            inner: base.clone(),
            sequential,
            reads: Default::default(),
        }));
        let pool: DynPool = counted.clone();
        let dir = tempfile::tempdir().unwrap();
        Repository::open(pool)
            .unwrap()
            .restore_to_dir(&id, dir.path(), &RestoreOptions::default())
            .unwrap();
        assert!(std::fs::read(dir.path().join("vda")).unwrap() == image);
        // The page's blob is read on its own; every other read is a run.
        let (page_pack, page_offset, page_len) = place[&page].clone();
        let mut reads = counted.0.reads.lock().unwrap().clone();
        let page_read = (page_pack, page_offset, page_len as usize);
        assert!(reads.contains(&page_read), "sequential {sequential}");
        reads.retain(|r| *r != page_read);
        // Runs are read on several threads: compared as sets of reads.
        let mut expected = expected;
        reads.sort();
        expected.sort();
        assert_eq!(reads, expected, "sequential {sequential}");
    }
}

/// A spot check reads the parent's extent pages: damage there makes the
/// bitmap untrusted (the policy decides), an I/O error fails the disk's
/// preparation (nothing is decided on a pool that cannot be read).
#[test]
fn a_spot_check_tells_damaged_parent_pages_from_an_io_error() {
    use cairn_engine::cbt::{prepare_disk, CbtDisk, CbtPolicy, PreparedDisk};
    use cairn_engine::format::PROP_NEXT_BITMAP;
    let base: DynPool = Arc::new(MemoryPool::new());
    let (repo, id, vda, _) = two_disks(base.clone());
    let mut parent = repo.load_snapshot(&id).unwrap();
    assert!(parent.is_paged());
    parent.disks[0]
        .properties
        .insert(PROP_NEXT_BITMAP.to_string(), "b1".to_string());
    let parent = (id, parent);
    for (kind, damage) in FAILURES {
        let failing = failing_repo(&base, kind);
        let disk = CbtDisk::new(
            "vda",
            Box::new(MemorySource::new("vda", vda.clone())),
            "b1",
            Ok(Vec::new()),
            "b2",
        )
        .with_spot_check(4)
        .with_pages_from(&failing)
        .unwrap();
        let prepared = prepare_disk(
            Some(&parent),
            disk,
            cairn_engine::ChunkingParams::default(),
            CbtPolicy::Full,
        );
        match (prepared, damage) {
            (
                Ok(PreparedDisk::Backup {
                    fallback: Some(why),
                    ..
                }),
                true,
            ) => assert!(why.contains("extents cannot be read"), "{why}"),
            (Err(e), false) => assert!(matches!(e, Error::PoolIo { .. }), "{e}"),
            (other, _) => panic!("{kind:?}: {other:?}"),
        }
    }
}

/// The change set `prepare_disk` builds over a version 2 parent carries the
/// pool its pages are read from, and says which in its debug output.
#[test]
fn a_prepared_change_set_names_the_pool_of_its_parent_pages() {
    use cairn_engine::cbt::{prepare_disk, CbtDisk, CbtPolicy, PreparedDisk};
    use cairn_engine::format::PROP_NEXT_BITMAP;
    let base: DynPool = Arc::new(MemoryPool::new());
    let (repo, id, vda, _) = two_disks(base);
    let mut parent = repo.load_snapshot(&id).unwrap();
    parent.disks[0]
        .properties
        .insert(PROP_NEXT_BITMAP.to_string(), "b1".to_string());
    let disk = CbtDisk::new(
        "vda",
        Box::new(MemorySource::new("vda", vda)),
        "b1",
        Ok(Vec::new()),
        "b2",
    );
    let debug_of = |disk: CbtDisk| {
        let prepared = prepare_disk(
            Some(&(id, parent.clone())),
            disk,
            cairn_engine::ChunkingParams::default(),
            CbtPolicy::Full,
        );
        match prepared {
            Ok(PreparedDisk::Backup {
                disk:
                    BackupDisk {
                        input: cairn_engine::DiskInput::Incremental { changed, .. },
                        ..
                    },
                fallback: None,
                ..
            }) => format!("{changed:?}"),
            Ok(PreparedDisk::Backup { fallback, .. }) => panic!("not incremental: {fallback:?}"),
            Ok(PreparedDisk::Skip { reason, .. }) => panic!("skipped: {reason}"),
            Err(e) => panic!("{e}"),
        }
    };
    let attached = debug_of(disk.with_pages_from(&repo).unwrap());
    assert!(
        attached.contains("store: Some(PageStore(memory pool))"),
        "{attached}"
    );
}

/// An incremental reads its version 2 parent's pages: a page that cannot
/// be read for damage has its span read again (and is counted), an I/O
/// error fails the backup.
#[test]
fn an_incremental_tells_damaged_parent_pages_from_an_io_error() {
    let base: DynPool = Arc::new(MemoryPool::new());
    let (repo, id, vda, _) = two_disks(base.clone());
    let parent = repo.load_snapshot(&id).unwrap();
    assert!(parent.is_paged());
    for (kind, damage) in FAILURES {
        let failing = failing_repo(&base, kind);
        let changed = cairn_engine::ChangedBlocks::new(id, &parent, "vda", Vec::new()).unwrap();
        let disk = BackupDisk::new(
            "vda",
            cairn_engine::DiskInput::Incremental {
                source: Box::new(MemorySource::new("vda", vda.clone())),
                changed,
            },
        );
        let opts = BackupOptions::new("web").with_compression(Compression::None);
        match (failing.backup(vec![disk], &opts), damage) {
            (Ok(stats), true) => {
                assert_eq!(stats.parent_pages_damaged, 1);
                assert_eq!(stats.bytes_read, vda.len() as u64);
            }
            (Err(e), false) => assert!(matches!(e, Error::PoolIo { .. }), "{e}"),
            (other, _) => panic!("{kind:?}: {other:?}"),
        }
    }
}
