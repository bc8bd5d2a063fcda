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

use std::fmt;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Error, Result};

/// The kinds of object the engine stores. Each kind is a separate namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum FileKind {
    /// The pool's configuration (one object, named `config`).
    Config,
    /// Pack files: many blobs and a trailing blob table.
    Pack,
    /// Dedup index segments.
    Index,
    /// Snapshot manifests.
    Snapshot,
}

impl FileKind {
    /// Every kind, in a stable order.
    pub const ALL: [FileKind; 4] = [
        FileKind::Config,
        FileKind::Pack,
        FileKind::Index,
        FileKind::Snapshot,
    ];

    /// A short lower-case name, usable as a directory or key prefix.
    pub fn dir_name(self) -> &'static str {
        match self {
            FileKind::Config => "config",
            FileKind::Pack => "packs",
            FileKind::Index => "index",
            FileKind::Snapshot => "snapshots",
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Config => "config",
            FileKind::Pack => "pack",
            FileKind::Index => "index segment",
            FileKind::Snapshot => "snapshot manifest",
        })
    }
}

/// Reading objects.
pub trait PoolRead: Send + Sync {
    /// The whole object. Implementations may return memory-mapped bytes.
    fn read(&self, kind: FileKind, name: &str) -> Result<Bytes>;

    /// `len` bytes starting at `offset`. Reading past the end is an error
    /// (the object is shorter than its table says: it is damaged).
    fn read_range(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Bytes>;

    /// The object's size in bytes.
    fn size(&self, kind: FileKind, name: &str) -> Result<u64>;

    /// A human-readable location for messages (a path, a URL).
    fn location(&self) -> String;
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
