//! The snapshot catalog at 10 000 snapshots: listing reads the catalog, not
//! the manifests; a CBT parent lookup reads one manifest; forgotten,
//! added and damaged entries are handled by the next listing. Counted in
//! reads per kind (times are for benchmarks: docs/PERFORMANCE.md).
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use cairn_engine::bytes::Bytes;
use cairn_engine::{
    BackupDisk, BackupOptions, ChunkId, ChunkingParams, Compression, DiskInput, DiskManifest,
    DiskSource, DynPool, FileKind, IdScheme, MemorySource, Pool, PoolRead, PoolWrapper, PoolWrite,
    Repository, Result, Snapshot, SnapshotId, SnapshotMode, WrappedPool,
};
use cairn_pools::MemoryPool;

/// Counts reads per kind.
struct Counted {
    inner: DynPool,
    manifest_reads: AtomicU64,
    catalog_reads: AtomicU64,
}

impl PoolWrapper for Counted {
    fn inner(&self) -> &dyn Pool {
        &*self.inner
    }
    fn read(&self, kind: FileKind, name: &str) -> Result<Bytes> {
        match kind {
            FileKind::Snapshot => self.manifest_reads.fetch_add(1, Ordering::SeqCst),
            FileKind::Catalog => self.catalog_reads.fetch_add(1, Ordering::SeqCst),
            _ => 0,
        };
        self.inner.read(kind, name)
    }
}

/// A repository on a memory pool whose reads are counted: the bare pool
/// (to write without counting), the counter, the repository.
fn counted_repo() -> (DynPool, Arc<WrappedPool<Counted>>, Repository) {
    let base: DynPool = Arc::new(MemoryPool::new());
    let counted = Arc::new(WrappedPool(Counted {
        inner: base.clone(),
        manifest_reads: AtomicU64::new(0),
        catalog_reads: AtomicU64::new(0),
    }));
    let pool: DynPool = counted.clone();
    let repo = Repository::create(pool).unwrap();
    (base, counted, repo)
}

fn manifest(i: u64) -> Vec<u8> {
    let mut disk = DiskManifest::new("vda");
    disk.push(65536, Some(ChunkId::of(&i.to_le_bytes())));
    disk.push(1 << 20, None);
    disk.properties
        .insert("source".into(), format!("/images/{i}.img"));
    Snapshot {
        time: UNIX_EPOCH + Duration::from_secs(1_800_000_000 + i),
        vm: format!("vm-{}", i % 100),
        mode: SnapshotMode::Full,
        parent: None,
        id_scheme: IdScheme::Blake3,
        chunking: ChunkingParams::default(),
        compression: Compression::default(),
        properties: BTreeMap::new(),
        disks: vec![disk],
    }
    .encode()
}

fn put(pool: &DynPool, i: u64) -> SnapshotId {
    let bytes = manifest(i);
    let id = SnapshotId::of_manifest(&bytes);
    pool.write(FileKind::Snapshot, &id.to_hex(), &bytes)
        .unwrap();
    id
}

#[test]
fn listing_ten_thousand_snapshots_reads_the_catalog_not_the_manifests() {
    let (base, counted, repo) = counted_repo();
    let ids: Vec<SnapshotId> = (0..10_000).map(|i| put(&base, i)).collect();
    let reads = |c: &Counted| {
        (
            c.manifest_reads.swap(0, Ordering::SeqCst),
            c.catalog_reads.swap(0, Ordering::SeqCst),
        )
    };

    // First listing: every manifest once; the catalog is written.
    let first = repo.snapshots().unwrap();
    assert_eq!(first.snapshots.len(), 10_000);
    assert_eq!(reads(&counted.0), (10_000, 0));
    assert_eq!(base.list(FileKind::Catalog).unwrap().len(), 1);

    // Then: one catalog read, no manifest, the same answer.
    let second = repo.snapshots().unwrap();
    assert_eq!(reads(&counted.0), (0, 1));
    assert_eq!(second.snapshots, first.snapshots);

    // A CBT parent lookup reads the catalog and the one manifest it picks.
    let (id, s) = repo.latest_with_disk("vm-7", "vda").unwrap().unwrap();
    assert_eq!(id, ids[9907]);
    assert_eq!(
        s.disks[0].extent_count(),
        2,
        "the parent comes with its extents"
    );
    assert_eq!(reads(&counted.0), (1, 1));

    // Forgotten snapshots drop out without a manifest read; a new one is
    // read once and then comes from the catalog too.
    repo.forget(&ids[..10]).unwrap();
    reads(&counted.0);
    let new = put(&base, 10_000);
    let third = repo.snapshots().unwrap();
    assert_eq!(third.snapshots.len(), 10_000 - 10 + 1);
    assert!(third.snapshots.iter().any(|s| s.id == new));
    assert!(!third.snapshots.iter().any(|s| s.id == ids[0]));
    assert_eq!(reads(&counted.0), (1, 1));
    assert_eq!(repo.snapshots().unwrap().snapshots, third.snapshots);
    assert_eq!(reads(&counted.0), (0, 1));

    // A damaged catalog object is ignored: the manifests are read again
    // and a good catalog replaces it.
    let name = base.list(FileKind::Catalog).unwrap().pop().unwrap();
    let mut bytes = base.read(FileKind::Catalog, &name).unwrap().to_vec();
    bytes[100] ^= 1;
    base.delete(FileKind::Catalog, &name).unwrap();
    base.write(FileKind::Catalog, &name, &bytes).unwrap();
    assert_eq!(repo.snapshots().unwrap().snapshots, third.snapshots);
    assert_eq!(reads(&counted.0).0, 9_991);
    assert_eq!(repo.snapshots().unwrap().snapshots, third.snapshots);
    assert_eq!(reads(&counted.0), (0, 1));
}

/// `latest` orders snapshots by the time recorded in their manifests (the
/// writing host's clock when the backup finished), then by id — not by
/// when they were written. A snapshot written later by a host whose clock
/// went backwards is therefore older: `latest` and the CBT parent lookup
/// name the one with the newest recorded time, before and after the
/// catalog holds them both (docs/DESIGN.md, "Snapshot catalog").
#[test]
fn latest_follows_recorded_time_not_write_order() {
    let pool: DynPool = Arc::new(cairn_pools::MemoryPool::new());
    let repo = Repository::create(pool.clone()).unwrap();
    // Written first, recorded later (i = 200); then written second with a
    // clock 100 s behind (i = 100). Both of VM vm-0.
    let ahead = put(&pool, 200);
    for round in 0..2 {
        if round == 1 {
            repo.snapshots().unwrap(); // now from the catalog
        }
        let behind = put(&pool, if round == 0 { 100 } else { 0 });
        let latest = repo
            .resolve(&cairn_engine::SnapshotSelector::parse("latest", Some("vm-0")).unwrap())
            .unwrap();
        assert_eq!(latest, ahead, "round {round}");
        let (parent, _) = repo.latest_with_disk("vm-0", "vda").unwrap().unwrap();
        assert_eq!(parent, ahead, "round {round}");
        assert_ne!(behind, ahead);
    }
    // Equal recorded times: the larger id wins, the same every time.
    let twin = {
        let mut bytes = manifest(200);
        // Same time and VM, another chunk: another id.
        let mut s = cairn_engine::Snapshot::decode(&bytes).unwrap();
        s.disks[0] = {
            let mut d = DiskManifest::new("vda");
            d.push(65536, Some(ChunkId::of(b"other")));
            d.push(1 << 20, None);
            d
        };
        bytes = s.encode();
        let id = SnapshotId::of_manifest(&bytes);
        pool.write(FileKind::Snapshot, &id.to_hex(), &bytes)
            .unwrap();
        id
    };
    let latest = repo
        .resolve(&cairn_engine::SnapshotSelector::parse("latest", Some("vm-0")).unwrap())
        .unwrap();
    assert_eq!(latest, ahead.max(twin));
}

/// The parents of several disks of one VM: one listing and each manifest
/// read once, each disk given the newest snapshot that holds it.
#[test]
fn the_parents_of_a_vms_disks_are_found_with_one_read_per_manifest() {
    let (base, counted, repo) = counted_repo();
    let put_disks = |secs: u64, names: &[&str]| {
        let disks = names
            .iter()
            .map(|n| {
                let mut d = DiskManifest::new(*n);
                d.push(65536, Some(ChunkId::of(format!("{n}{secs}").as_bytes())));
                d
            })
            .collect();
        let bytes = Snapshot {
            time: UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs),
            vm: "web".into(),
            mode: SnapshotMode::Full,
            parent: None,
            id_scheme: IdScheme::Blake3,
            chunking: ChunkingParams::default(),
            compression: Compression::default(),
            properties: BTreeMap::new(),
            disks,
        }
        .encode();
        let id = SnapshotId::of_manifest(&bytes);
        base.write(FileKind::Snapshot, &id.to_hex(), &bytes)
            .unwrap();
        id
    };
    // vdc only in the oldest snapshot; vda and vdb in the newest.
    let old = put_disks(1, &["vda", "vdc"]);
    let _middle = put_disks(2, &["vda", "vdb"]);
    let new = put_disks(3, &["vda", "vdb"]);
    repo.snapshots().unwrap(); // the catalog
    counted.0.manifest_reads.store(0, Ordering::SeqCst);
    counted.0.catalog_reads.store(0, Ordering::SeqCst);
    let found = repo
        .latest_with_disks("web", &["vda", "vdb", "vdc", "vdz"])
        .unwrap();
    let ids: Vec<Option<SnapshotId>> = found
        .iter()
        .map(|p| p.as_ref().map(|(id, _)| *id))
        .collect();
    assert_eq!(ids, vec![Some(new), Some(new), Some(old), None]);
    assert_eq!(found[1].as_ref().unwrap().1.disks[1].name, "vdb");
    assert_eq!(
        counted.0.manifest_reads.load(Ordering::SeqCst),
        2,
        "the newest manifest once for two disks, the oldest once"
    );
    assert_eq!(
        counted.0.catalog_reads.load(Ordering::SeqCst),
        1,
        "one listing"
    );
    assert_eq!(repo.latest_with_disks("other", &["vda"]).unwrap().len(), 1);
}

/// A file whose recorded state proves its content (as a regular file's
/// does once its change time is 2 s old), without the wait.
struct SettledFile(MemorySource);

impl DiskSource for SettledFile {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read_at(offset, buf)
    }
    fn describe(&self) -> String {
        "settled file".into()
    }
    fn identity(&self) -> Option<String> {
        Some("file:1:2:3".into())
    }
    fn identity_proves_content(&self) -> bool {
        true
    }
}

/// An unchanged file's parent is looked up (one manifest read) only when
/// reuse of unchanged files is on: with it off, a backup reads no
/// manifest, and reads the whole file.
#[test]
fn the_parents_of_unchanged_files_are_read_only_when_reused() {
    let (_base, counted, repo) = counted_repo();
    let data = vec![7u8; 200_000];
    let run = |reuse: bool| {
        let disk = BackupDisk::new(
            "vda",
            DiskInput::Image(Box::new(SettledFile(MemorySource::new(
                "vda",
                data.clone(),
            )))),
        );
        let mut opts = BackupOptions::new("web");
        opts.reuse_unchanged = reuse;
        repo.snapshots().unwrap(); // the catalog, up to date
        counted.0.manifest_reads.store(0, Ordering::SeqCst);
        let stats = repo.backup(vec![disk], &opts).unwrap();
        (
            counted.0.manifest_reads.load(Ordering::SeqCst),
            stats.bytes_read,
        )
    };
    // The first backup has no parent to look up.
    assert_eq!(run(true), (0, 200_000));
    assert_eq!(run(false), (0, 200_000), "reuse off: no lookup, all read");
    assert_eq!(run(true), (1, 0), "reuse on: the parent read, nothing else");
}
