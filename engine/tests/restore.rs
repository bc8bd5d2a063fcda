//! The restore pipeline's options, statistics and error mapping, through the
//! library: disk selection, overwriting, exact counters, and which failures
//! count as damage (a pack shorter than its table, a blob that does not
//! decode — named with its exact offset) and which do not (an I/O error);
//! the medium-order restore of sequential media (runs within one pack, its
//! sort spilled to scratch files).
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::sync::Arc;

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

/// Fails pack reads with a chosen I/O error kind.
struct FailingReads {
    inner: DynPool,
    kind: std::io::ErrorKind,
}

impl PoolWrapper for FailingReads {
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
            return Err(Error::PoolIo {
                op: "read",
                kind,
                name: name.to_string(),
                source: std::io::Error::new(self.kind, "injected"),
            });
        }
        self.inner.read_range(kind, name, offset, len)
    }
}

#[test]
fn a_short_pack_is_damage_and_an_io_error_is_not() {
    let base: DynPool = Arc::new(MemoryPool::new());
    let (_, id, _, _) = two_disks(base.clone());
    for (kind, damage) in [
        (std::io::ErrorKind::UnexpectedEof, true),
        (std::io::ErrorKind::PermissionDenied, false),
    ] {
        let pool: DynPool = Arc::new(WrappedPool(FailingReads {
            inner: base.clone(),
            kind,
        }));
        let repo = Repository::open(pool).unwrap();
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
    let dir = tempfile::tempdir().unwrap();
    let e = repo
        .restore_to_dir(&id, dir.path(), &RestoreOptions::default())
        .unwrap_err();
    assert!(e.is_damage(), "{e}");
    let m = e.to_string();
    assert!(
        m.contains(&format!("at offset {} of pack {pack}", entry.offset))
            && m.contains(&entry.id.to_hex()),
        "{m}"
    );
}

/// A pool on sequential media: every pack has a place on the medium (all
/// the same here: packs sort by id), so restores read in medium order.
struct Sequential(DynPool);

impl PoolWrapper for Sequential {
    fn inner(&self) -> &dyn Pool {
        &*self.0
    }
    fn read_order(&self, _kind: FileKind, _name: &str) -> Option<u64> {
        Some(0)
    }
    fn sequential_media(&self) -> bool {
        true
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
    let c0 = random(CHUNK, 10);
    backup(&[c0.clone(), random(CHUNK, 11)].concat());
    let two_packs = [c0, random(CHUNK, 12)].concat();
    let small = backup(&two_packs);
    let packs = base.list(FileKind::Pack).unwrap();
    assert_eq!(packs.len(), 2);
    for p in &packs {
        let table = read_pack_table(&*base, &p.parse().unwrap()).unwrap();
        assert_eq!(table[0].offset, 16, "pack {p}");
    }
    // 40 chunks, more than one sort run of 16 records.
    let big_image = random(40 * CHUNK, 13);
    let big = backup(&big_image);

    std::env::set_var("CAIRN_SORT_BUDGET", "0");
    let sequential: DynPool = Arc::new(WrappedPool(Sequential(base.clone())));
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
