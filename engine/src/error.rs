//! The engine's error type. Every variant names the object (file kind and name,
//! path, chunk or snapshot id) it is about.

use std::io;

use crate::coding::DecodeError;
use crate::id::{ChunkId, PackId};
use crate::pool::FileKind;

/// Result alias used across the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine or a pool behind its traits.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A named object is absent from the pool.
    #[error("{kind} {name:?} not found in the pool")]
    NotFound { kind: FileKind, name: String },

    /// A create-only write found the name taken.
    #[error("{kind} {name:?} already exists in the pool; objects are never overwritten")]
    AlreadyExists { kind: FileKind, name: String },

    /// I/O on a pool object failed.
    #[error("pool {op} of {kind} {name:?} failed: {source}")]
    PoolIo {
        op: &'static str,
        kind: FileKind,
        name: String,
        #[source]
        source: io::Error,
    },

    /// I/O outside the pool (a disk being read, a restore target) failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

    /// An on-disk structure failed to decode or verify.
    #[error("{what} is damaged: {reason}")]
    Corrupt { what: String, reason: DecodeError },

    /// A manifest references a chunk that no index segment or pack holds.
    #[error("chunk {chunk} (needed by {needed_by}) is not in the pool")]
    ChunkMissing { chunk: ChunkId, needed_by: String },

    /// A blob decoded but its content does not hash to the id it is stored under.
    #[error("chunk {chunk} in pack {pack} is damaged: content hashes to {got}")]
    ChunkHashMismatch {
        chunk: ChunkId,
        pack: PackId,
        got: ChunkId,
    },

    /// The pool has no configuration: it was never initialised.
    #[error("{location} is not an initialised Cairn pool (no config); run `cairn init` first")]
    NotInitialized { location: String },

    /// The pool uses a feature or version this build does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A caller-supplied option or argument is out of range or malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// No snapshot matches the given id, prefix or selector.
    #[error("no snapshot matches {0:?}")]
    SnapshotNotFound(String),

    /// A snapshot prefix matches more than one snapshot.
    #[error("snapshot selector {selector:?} is ambiguous: it matches {matches} snapshots")]
    AmbiguousSnapshot { selector: String, matches: usize },

    /// The operating system's random source failed.
    #[error("random source failed: {0}")]
    Random(String),

    /// Changed-block information cannot be trusted for an incremental (disk
    /// resized, chunking changed, bitmap missing or inconsistent …). The
    /// caller's policy decides: fall back to a full read, or skip.
    #[error("changed-block tracking for disk {disk:?} cannot be trusted: {reason}")]
    CbtNotTrusted { disk: String, reason: String },

    /// A network peer (an NBD server) broke the protocol or reported an error.
    #[error("{peer}: {detail}")]
    Protocol { peer: String, detail: String },

    /// An external program the platform layer drives (qemu-img, qemu-nbd)
    /// failed; `detail` carries its command line and error output.
    #[error("{program}: {detail}")]
    External { program: String, detail: String },

    /// A pipeline worker thread panicked (a bug); the operation was aborted.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for [`Error::Corrupt`].
    pub fn corrupt(what: impl Into<String>, reason: DecodeError) -> Self {
        Error::Corrupt {
            what: what.into(),
            reason,
        }
    }

    /// Shorthand for [`Error::Io`].
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// True when the error means "the object does not exist".
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
}
