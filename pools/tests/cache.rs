//! The local cache of a remote pool's segments and manifests: used when
//! intact, rebuilt when missing, damaged or truncated, never trusted over
//! the pool, pruned of objects the pool no longer lists.
#![allow(clippy::unwrap_used)] // test code

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cairn_engine::bytes::Bytes;
use cairn_engine::{
    DynPool, FileKind, Pool, PoolDelete, PoolList, PoolRead, PoolWrapper, PoolWrite, Result,
    SnapshotId, WrappedPool,
};
use cairn_pools::{CachedPool, MemoryPool};

/// Counts whole-object reads of the pool it wraps.
struct Counting {
    inner: DynPool,
    reads: AtomicU64,
}

impl PoolWrapper for Counting {
    fn inner(&self) -> &dyn Pool {
        &*self.inner
    }
    fn read(&self, kind: FileKind, name: &str) -> Result<Bytes> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read(kind, name)
    }
}

/// A manifest-like object: its name is the hash of its bytes.
fn manifest(seed: u8) -> (String, Vec<u8>) {
    let bytes = vec![seed; 1000];
    (SnapshotId::of_manifest(&bytes).to_hex(), bytes)
}

/// A segment-like object: bytes followed by their BLAKE3 checksum.
fn segment(seed: u8) -> (String, Vec<u8>) {
    let mut bytes = vec![seed; 500];
    let sum = *blake3_of(&bytes);
    bytes.extend_from_slice(&sum);
    (format!("{:032x}", seed as u128 + 1), bytes)
}

fn blake3_of(b: &[u8]) -> Box<[u8; 32]> {
    Box::new(cairn_engine::ChunkId::of(b).0)
}

#[test]
fn the_cache_is_used_verified_rebuilt_and_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let base: DynPool = Arc::new(MemoryPool::new());
    let counting = Arc::new(WrappedPool(Counting {
        inner: base.clone(),
        reads: AtomicU64::new(0),
    }));
    let cached = WrappedPool(CachedPool::new(counting.clone(), dir.path()));
    let reads = || counting.0.reads.load(Ordering::SeqCst);
    let (m, mbytes) = manifest(1);
    let (s, sbytes) = segment(2);
    base.write(FileKind::Snapshot, &m, &mbytes).unwrap();
    base.write(FileKind::Index, &s, &sbytes).unwrap();
    base.write(FileKind::Pack, "aa", b"pack").unwrap();

    // First reads fetch, later ones are served from the cache.
    for _ in 0..3 {
        assert_eq!(
            &cached.read(FileKind::Snapshot, &m).unwrap()[..],
            &mbytes[..]
        );
        assert_eq!(&cached.read(FileKind::Index, &s).unwrap()[..], &sbytes[..]);
    }
    assert_eq!(reads(), 2);
    // Packs are never cached.
    cached.read(FileKind::Pack, "aa").unwrap();
    cached.read(FileKind::Pack, "aa").unwrap();
    assert_eq!(reads(), 4);

    // A damaged, a truncated and a missing cached file: fetched again.
    let mpath = dir.path().join("snapshots").join(&m);
    let spath = dir.path().join("index").join(&s);
    let mut bad = std::fs::read(&mpath).unwrap();
    bad[10] ^= 1;
    std::fs::write(&mpath, &bad).unwrap();
    assert_eq!(
        &cached.read(FileKind::Snapshot, &m).unwrap()[..],
        &mbytes[..]
    );
    std::fs::write(&spath, &sbytes[..100]).unwrap();
    assert_eq!(&cached.read(FileKind::Index, &s).unwrap()[..], &sbytes[..]);
    assert_eq!(reads(), 6);
    std::fs::remove_file(&mpath).unwrap();
    assert_eq!(
        &cached.read(FileKind::Snapshot, &m).unwrap()[..],
        &mbytes[..]
    );
    assert_eq!(reads(), 7);
    // Rebuilt: served from the cache again.
    cached.read(FileKind::Snapshot, &m).unwrap();
    cached.read(FileKind::Index, &s).unwrap();
    assert_eq!(reads(), 7);

    // An object damaged in the pool is returned as it is (the engine
    // reports it) and not cached.
    let (m2, mut m2bytes) = manifest(3);
    m2bytes[0] ^= 1;
    base.write(FileKind::Snapshot, &m2, &m2bytes).unwrap();
    cached.read(FileKind::Snapshot, &m2).unwrap();
    assert!(!dir.path().join("snapshots").join(&m2).exists());

    // Deleted from the pool: the listing prunes the cached copy.
    base.delete(FileKind::Snapshot, &m).unwrap();
    assert!(!cached.list(FileKind::Snapshot).unwrap().contains(&m));
    assert!(!mpath.exists());
    assert!(cached
        .read(FileKind::Snapshot, &m)
        .unwrap_err()
        .is_not_found());
}
