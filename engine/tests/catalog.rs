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
    ChunkId, ChunkingParams, Compression, DiskManifest, DynPool, FileKind, IdScheme, Pool,
    PoolRead, PoolWrapper, PoolWrite, Repository, Result, Snapshot, SnapshotId, SnapshotMode,
    WrappedPool,
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
    let base: DynPool = Arc::new(MemoryPool::new());
    let counted = Arc::new(WrappedPool(Counted {
        inner: base.clone(),
        manifest_reads: AtomicU64::new(0),
        catalog_reads: AtomicU64::new(0),
    }));
    let pool: DynPool = counted.clone();
    let repo = Repository::create(pool.clone()).unwrap();
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
        s.disks[0].extents.len(),
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
