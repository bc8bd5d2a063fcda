//! The storage traits every pool implements, one per capability (as in
//! rustic_core's backends): [`PoolRead`], [`PoolWrite`], [`PoolList`],
//! [`PoolDelete`]. A pool stores opaque bytes under `(FileKind, name)`; every
//! format is the engine's. [`Pool`] is the union, blanket-implemented.
//!
//! Contracts shared by all implementations:
//! - Objects are immutable: a name is written once ([`PoolWrite::create`] fails
//!   with [`Error::AlreadyExists`] rather than overwrite) and then only read or
//!   deleted.
//! - An object becomes visible only after [`ObjectWriter::commit`] returns, and
//!   is then durable (local pools: temp file + fsync + link + directory fsync).
//!   Dropping a writer without committing leaves nothing behind.
//! - A missing object is reported as [`Error::NotFound`].

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::kind::FileKind;

/// Reading objects.
pub trait PoolRead: Send + Sync {
    /// The whole object. Implementations may return memory-mapped bytes.
    fn read(&self, kind: FileKind, name: &str) -> Result<Bytes>;

    /// `len` bytes starting at `offset`. Reading past the end is an error
    /// (the object is shorter than its table says: it is damaged).
    fn read_range(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Bytes>;

    /// The object's size in bytes.
    fn size(&self, kind: FileKind, name: &str) -> Result<u64>;

    /// A human-readable location for messages (a path, a URL). Never
    /// contains secrets.
    fn location(&self) -> String;

    /// Free space where the pool is stored, when its medium can tell (a
    /// local file system); `None` when it cannot (object storage).
    fn free_bytes(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// How many reads to keep in flight at once when latency, not CPU,
    /// bounds them (object storage); `None`: one per worker thread.
    fn preferred_read_concurrency(&self) -> Option<usize> {
        None
    }

    /// Where object `name` lies on sequential media (tape: its media set,
    /// cartridge and tape file, as one increasing key), for readers that
    /// sort what they read so the medium is passed once; `None`: the pool
    /// reads anything anywhere at the same cost (disks, object storage).
    fn read_order(&self, _kind: FileKind, _name: &str) -> Option<u64> {
        None
    }

    /// Whether the pool's packs lie on sequential media (tape), where every
    /// read outside a sorted pass costs a seek or a cartridge load: backups
    /// then keep extent lists in the manifest (version 1) instead of in
    /// extent pages stored in packs, so a restore passes each cartridge
    /// once.
    fn sequential_media(&self) -> bool {
        false
    }
}

/// A streaming, create-only, atomic write of one object.
pub trait ObjectWriter: Write + Send {
    /// Makes the object durable and visible under its name. Until this returns
    /// `Ok`, readers never see the object; dropping the writer aborts it.
    fn commit(self: Box<Self>) -> Result<()>;
}

/// Creating objects.
pub trait PoolWrite: Send + Sync {
    /// Starts writing a new object. Fails with [`Error::AlreadyExists`] if the
    /// name is taken (now or at commit time).
    fn create(&self, kind: FileKind, name: &str) -> Result<Box<dyn ObjectWriter>>;

    /// The stored size packs should grow to in this pool, when it differs
    /// from the engine's default (object storage bills per request and
    /// wants fewer, larger packs). `None`: the default.
    fn preferred_pack_size(&self) -> Option<u64> {
        None
    }

    /// Writes a whole object at once (create + write + commit).
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        let mut w = self.create(kind, name)?;
        w.write_all(data).map_err(|source| Error::PoolIo {
            op: "write",
            kind,
            name: name.to_string(),
            source,
        })?;
        w.commit()
    }
}

/// Listing objects.
pub trait PoolList: Send + Sync {
    /// Names of every committed object of `kind`, in no particular order.
    fn list(&self, kind: FileKind) -> Result<Vec<String>>;

    /// Names and sizes of every object of `kind`, when the pool learns the
    /// sizes with the listing (object stores do); `None` otherwise (callers
    /// then ask [`PoolRead::size`] per object).
    fn list_sizes(&self, _kind: FileKind) -> Result<Option<Vec<(String, u64)>>> {
        Ok(None)
    }
}

/// Deleting objects.
pub trait PoolDelete: Send + Sync {
    /// Removes an object; removing a missing object is [`Error::NotFound`].
    fn delete(&self, kind: FileKind, name: &str) -> Result<()>;
}

/// A pool with every capability.
pub trait Pool: PoolRead + PoolWrite + PoolList + PoolDelete {}
impl<T: PoolRead + PoolWrite + PoolList + PoolDelete + ?Sized> Pool for T {}

/// A shared, dynamically typed pool handle.
pub type DynPool = Arc<dyn Pool>;

macro_rules! forward_pool {
    ($ty:ty) => {
        impl<P: PoolRead + ?Sized> PoolRead for $ty {
            fn read(&self, kind: FileKind, name: &str) -> Result<Bytes> {
                (**self).read(kind, name)
            }
            fn read_range(
                &self,
                kind: FileKind,
                name: &str,
                offset: u64,
                len: usize,
            ) -> Result<Bytes> {
                (**self).read_range(kind, name, offset, len)
            }
            fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
                (**self).size(kind, name)
            }
            fn location(&self) -> String {
                (**self).location()
            }
            fn free_bytes(&self) -> Result<Option<u64>> {
                (**self).free_bytes()
            }
            fn preferred_read_concurrency(&self) -> Option<usize> {
                (**self).preferred_read_concurrency()
            }
            fn read_order(&self, kind: FileKind, name: &str) -> Option<u64> {
                (**self).read_order(kind, name)
            }
            fn sequential_media(&self) -> bool {
                (**self).sequential_media()
            }
        }

        impl<P: PoolWrite + ?Sized> PoolWrite for $ty {
            fn create(&self, kind: FileKind, name: &str) -> Result<Box<dyn ObjectWriter>> {
                (**self).create(kind, name)
            }
            fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
                (**self).write(kind, name, data)
            }
            fn preferred_pack_size(&self) -> Option<u64> {
                (**self).preferred_pack_size()
            }
        }

        impl<P: PoolList + ?Sized> PoolList for $ty {
            fn list(&self, kind: FileKind) -> Result<Vec<String>> {
                (**self).list(kind)
            }
            fn list_sizes(&self, kind: FileKind) -> Result<Option<Vec<(String, u64)>>> {
                (**self).list_sizes(kind)
            }
        }

        impl<P: PoolDelete + ?Sized> PoolDelete for $ty {
            fn delete(&self, kind: FileKind, name: &str) -> Result<()> {
                (**self).delete(kind, name)
            }
        }
    };
}

forward_pool!(Arc<P>);
forward_pool!(Box<P>);

/// A pool feature that wraps another pool (counting, caching, rate
/// limiting, fault injection …): implement [`inner`](Self::inner) and
/// override only the calls the feature changes; every other call goes to the
/// inner pool. Wrap the value in [`WrappedPool`] to use it as a pool.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use cairn_engine::{bytes::Bytes, DynPool, FileKind, Pool, PoolRead, PoolWrapper, PoolWrite};
/// use cairn_engine::{Result, WrappedPool};
///
/// /// Counts reads.
/// struct CountReads { inner: DynPool, reads: AtomicU64 }
///
/// impl PoolWrapper for CountReads {
///     fn inner(&self) -> &dyn Pool { &*self.inner }
///     fn read(&self, kind: FileKind, name: &str) -> Result<Bytes> {
///         self.reads.fetch_add(1, Ordering::Relaxed);
///         self.inner.read(kind, name)
///     }
/// }
///
/// let base: DynPool = Arc::new(cairn_pools::MemoryPool::new());
/// let counted = Arc::new(WrappedPool(CountReads { inner: base, reads: AtomicU64::new(0) }));
/// counted.write(FileKind::Config, "config", b"x").unwrap();
/// counted.read(FileKind::Config, "config").unwrap();
/// assert_eq!(counted.0.reads.load(Ordering::Relaxed), 1);
/// let as_pool: DynPool = counted; // usable wherever a pool is
/// # drop(as_pool);
/// ```
pub trait PoolWrapper: Send + Sync {
    /// The wrapped pool.
    fn inner(&self) -> &dyn Pool;

    /// See [`PoolRead::read`].
    fn read(&self, kind: FileKind, name: &str) -> Result<Bytes> {
        self.inner().read(kind, name)
    }
    /// See [`PoolRead::read_range`].
    fn read_range(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Bytes> {
        self.inner().read_range(kind, name, offset, len)
    }
    /// See [`PoolRead::size`].
    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        self.inner().size(kind, name)
    }
    /// See [`PoolRead::location`].
    fn location(&self) -> String {
        self.inner().location()
    }
    /// See [`PoolRead::free_bytes`].
    fn free_bytes(&self) -> Result<Option<u64>> {
        self.inner().free_bytes()
    }
    /// See [`PoolRead::preferred_read_concurrency`].
    fn preferred_read_concurrency(&self) -> Option<usize> {
        self.inner().preferred_read_concurrency()
    }
    /// See [`PoolRead::read_order`].
    fn read_order(&self, kind: FileKind, name: &str) -> Option<u64> {
        self.inner().read_order(kind, name)
    }
    /// See [`PoolRead::sequential_media`].
    fn sequential_media(&self) -> bool {
        self.inner().sequential_media()
    }
    /// See [`PoolWrite::create`].
    fn create(&self, kind: FileKind, name: &str) -> Result<Box<dyn ObjectWriter>> {
        self.inner().create(kind, name)
    }
    /// See [`PoolWrite::preferred_pack_size`].
    fn preferred_pack_size(&self) -> Option<u64> {
        self.inner().preferred_pack_size()
    }
    /// See [`PoolWrite::write`]. Goes through [`create`](Self::create), so a
    /// wrapper that overrides `create` sees every write.
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        let mut w = self.create(kind, name)?;
        w.write_all(data).map_err(|source| Error::PoolIo {
            op: "write",
            kind,
            name: name.to_string(),
            source,
        })?;
        w.commit()
    }
    /// See [`PoolList::list`].
    fn list(&self, kind: FileKind) -> Result<Vec<String>> {
        self.inner().list(kind)
    }
    /// See [`PoolList::list_sizes`].
    fn list_sizes(&self, kind: FileKind) -> Result<Option<Vec<(String, u64)>>> {
        self.inner().list_sizes(kind)
    }
    /// See [`PoolDelete::delete`].
    fn delete(&self, kind: FileKind, name: &str) -> Result<()> {
        self.inner().delete(kind, name)
    }
}

/// Makes a [`PoolWrapper`] a [`Pool`].
#[derive(Debug, Default, Clone)]
pub struct WrappedPool<W>(pub W);

impl<W: PoolWrapper> PoolRead for WrappedPool<W> {
    fn read(&self, kind: FileKind, name: &str) -> Result<Bytes> {
        self.0.read(kind, name)
    }
    fn read_range(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Bytes> {
        self.0.read_range(kind, name, offset, len)
    }
    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        self.0.size(kind, name)
    }
    fn location(&self) -> String {
        self.0.location()
    }
    fn free_bytes(&self) -> Result<Option<u64>> {
        self.0.free_bytes()
    }
    fn preferred_read_concurrency(&self) -> Option<usize> {
        self.0.preferred_read_concurrency()
    }
    fn read_order(&self, kind: FileKind, name: &str) -> Option<u64> {
        self.0.read_order(kind, name)
    }
    fn sequential_media(&self) -> bool {
        self.0.sequential_media()
    }
}

impl<W: PoolWrapper> PoolWrite for WrappedPool<W> {
    fn create(&self, kind: FileKind, name: &str) -> Result<Box<dyn ObjectWriter>> {
        self.0.create(kind, name)
    }
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> Result<()> {
        self.0.write(kind, name, data)
    }
    fn preferred_pack_size(&self) -> Option<u64> {
        self.0.preferred_pack_size()
    }
}

impl<W: PoolWrapper> PoolList for WrappedPool<W> {
    fn list(&self, kind: FileKind) -> Result<Vec<String>> {
        self.0.list(kind)
    }
    fn list_sizes(&self, kind: FileKind) -> Result<Option<Vec<(String, u64)>>> {
        self.0.list_sizes(kind)
    }
}

impl<W: PoolWrapper> PoolDelete for WrappedPool<W> {
    fn delete(&self, kind: FileKind, name: &str) -> Result<()> {
        self.0.delete(kind, name)
    }
}
