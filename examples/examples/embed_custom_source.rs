//! Embedding Cairn with your own disk source and pool wrapper: a source that
//! generates its bytes (as a platform adapter reading a hypervisor's API
//! would), and a pool wrapper that counts requests — features wrap any pool.
//!
//! `cargo run -p cairn-cli --example embed_custom_source`

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cairn_engine::bytes::Bytes;
use cairn_engine::{
    BackupDisk, BackupOptions, DiskSource, DynPool, FileKind, MemoryTarget, ObjectWriter, Pool,
    PoolWrapper, Repository, RestoreOptions, Result, SnapshotSelector, WrappedPool,
};
use cairn_pools::MemoryPool;

/// A 16 MiB disk whose first and last MiB hold a pattern; the rest is a hole.
struct PatternDisk;

const SIZE: u64 = 16 << 20;

impl DiskSource for PatternDisk {
    fn size(&self) -> u64 {
        SIZE
    }
    fn data_extents(&self) -> Result<Vec<Range<u64>>> {
        Ok(vec![0..1 << 20, SIZE - (1 << 20)..SIZE])
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((offset + i as u64) % 251) as u8;
        }
        Ok(())
    }
    fn describe(&self) -> String {
        "pattern disk".into()
    }
}

/// Counts reads and object creations of the pool it wraps.
struct Counting {
    inner: DynPool,
    reads: AtomicU64,
    creates: AtomicU64,
}

impl PoolWrapper for Counting {
    fn inner(&self) -> &dyn Pool {
        &*self.inner
    }
    fn read_range(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Bytes> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read_range(kind, name, offset, len)
    }
    fn create(&self, kind: FileKind, name: &str) -> Result<Box<dyn ObjectWriter>> {
        self.creates.fetch_add(1, Ordering::Relaxed);
        self.inner.create(kind, name)
    }
}

fn main() -> Result<()> {
    let counting = Arc::new(WrappedPool(Counting {
        inner: Arc::new(MemoryPool::new()),
        reads: AtomicU64::new(0),
        creates: AtomicU64::new(0),
    }));
    let repo = Repository::create(counting.clone())?;
    let stats = repo.backup(
        vec![BackupDisk::image("disk0", PatternDisk)],
        &BackupOptions::new("generated"),
    )?;
    println!("{stats}");
    let id = repo.resolve(&SnapshotSelector::latest_of("generated"))?;
    let target = MemoryTarget::new(SIZE)?;
    let keep = target.clone();
    repo.restore(
        &id,
        &move |_disk| Ok(Box::new(target.clone())),
        &RestoreOptions::default(),
    )?;
    let restored = keep.finished().unwrap_or_default();
    let mut expected = vec![0u8; SIZE as usize];
    PatternDisk.read_at(0, &mut expected[..1 << 20])?;
    let tail = (SIZE - (1 << 20)) as usize;
    PatternDisk.read_at(tail as u64, &mut expected[tail..])?;
    assert!(restored == expected, "restore differs");
    println!(
        "pool requests: {} objects created, {} range reads",
        counting.0.creates.load(Ordering::Relaxed),
        counting.0.reads.load(Ordering::Relaxed)
    );
    Ok(())
}
