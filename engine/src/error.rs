//! The engine's error type. Every variant names the object (file kind and name,
//! path, chunk or snapshot id) it is about, and [`Error::is_not_found`],
//! [`Error::is_damage`] and [`Error::is_transient`] sort them into what a
//! caller can act on. Messages carry no command-line advice: the CLI adds it.

use std::io;
use std::path::PathBuf;

use crate::id::{ChunkId, PackId, SnapshotId};
use crate::kind::FileKind;
use crate::store::wire::DecodeError;

/// Result alias used across the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine or a pool behind its traits.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A named object is absent from the pool.
    #[error("{kind} {name:?} not found in the pool")]
    NotFound {
        /// The object's kind.
        kind: FileKind,
        /// The object's name.
        name: String,
    },

    /// A create-only write found the name taken.
    #[error("{kind} {name:?} already exists in the pool; objects are never overwritten")]
    AlreadyExists {
        /// The object's kind.
        kind: FileKind,
        /// The object's name.
        name: String,
    },

    /// I/O on a pool object failed.
    #[error("pool {op} of {kind} {name:?} failed: {source}")]
    PoolIo {
        /// What was done (`read`, `write`, `list` …).
        op: &'static str,
        /// The object's kind.
        kind: FileKind,
        /// The object's name.
        name: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A pool could not be opened or created.
    #[error("pool {location}: {reason}")]
    PoolOpen {
        /// The pool's address.
        location: String,
        /// Why.
        reason: String,
        /// The pool's location does not exist.
        missing: bool,
    },

    /// I/O outside the pool (a disk being read, a restore target) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the file or device.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An on-disk structure failed to decode or verify.
    #[error("{what} is damaged: {reason}")]
    Corrupt {
        /// The structure (a pack, a segment, a manifest, with its name).
        what: String,
        /// What is wrong with it.
        reason: DecodeError,
    },

    /// A manifest references a chunk that no index segment or pack holds.
    #[error("chunk {chunk} (needed by {needed_by}) is not in the pool")]
    ChunkMissing {
        /// The chunk.
        chunk: ChunkId,
        /// The snapshot, disk and offset that need it.
        needed_by: String,
    },

    /// The index names a pack that the pool does not hold.
    #[error("pack {pack} (holding chunk {chunk}, needed by {needed_by}) is missing from the pool")]
    PackMissing {
        /// The missing pack.
        pack: PackId,
        /// A chunk the index places in it.
        chunk: ChunkId,
        /// The snapshot, disk and offset that need the chunk.
        needed_by: String,
    },

    /// A blob decoded but its content does not hash to the id it is stored under.
    #[error("chunk {chunk} in pack {pack} is damaged: content hashes to {got}")]
    ChunkHashMismatch {
        /// The chunk's id.
        chunk: ChunkId,
        /// The pack holding it.
        pack: PackId,
        /// What its content hashes to.
        got: ChunkId,
    },

    /// The pool has no configuration: it was never initialised.
    #[error("{location} is not an initialised Cairn pool (no config)")]
    NotInitialized {
        /// The pool's address.
        location: String,
    },

    /// A restore target already exists and overwriting was not allowed.
    #[error("restore target {} already exists", path.display())]
    TargetExists {
        /// The target's path.
        path: PathBuf,
    },

    /// The caller cancelled the job through its
    /// [`CancelToken`](crate::CancelToken).
    #[error("cancelled")]
    Cancelled,

    /// The pool uses a feature or version this build does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A caller-supplied option or argument is out of range or malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A backup's writer lease was evicted by a garbage collection (the
    /// process was frozen or cut off longer than the lease expiry), so the
    /// chunks it reused may have been swept: its manifest was withdrawn.
    #[error("the backup's writer lease {lease} was lost (evicted by a garbage collection); its snapshot was withdrawn")]
    LeaseLost {
        /// The lease's name.
        lease: String,
    },

    /// A listing of the pool left out an object that exists (a listing cut
    /// short by the store): nothing may be decided from it.
    #[error("the pool's listing of {kind}s left out {name:?}, which exists: the listing was cut short; nothing was deleted")]
    ListingIncomplete {
        /// What was listed.
        kind: FileKind,
        /// The object missing from the listing.
        name: String,
    },

    /// Another job holds the pool for what was asked (a garbage collection
    /// running, backups still running after the allowed wait).
    #[error("pool busy: {0}")]
    PoolBusy(String),

    /// The snapshot is protected: it cannot be forgotten or pruned until its
    /// protection is removed.
    #[error("snapshot {0} is protected (remove the protection first)")]
    SnapshotProtected(String),

    /// No snapshot matches the given id, prefix or selector.
    #[error("no snapshot matches {0}")]
    SnapshotNotFound(String),

    /// A snapshot selector matches more than one snapshot (an id prefix, or
    /// `latest` over several VMs).
    #[error("snapshot selector {selector} is ambiguous: it matches {matches}")]
    AmbiguousSnapshot {
        /// The selector as given.
        selector: String,
        /// What it matches (a count of snapshots, or the VMs).
        matches: String,
    },

    /// A snapshot manifest cannot be read or decoded.
    #[error("snapshot {id} cannot be read: {source}")]
    SnapshotUnreadable {
        /// The snapshot.
        id: SnapshotId,
        /// Why.
        #[source]
        source: Box<Error>,
    },

    /// The operating system's random source failed.
    #[error("random source failed: {0}")]
    Random(String),

    /// Changed-block information cannot be trusted for an incremental (disk
    /// resized, chunking changed, bitmap missing or inconsistent …). The
    /// caller's policy decides: fall back to a full read, or skip.
    #[error("changed-block tracking for disk {disk:?} cannot be trusted: {reason}")]
    CbtNotTrusted {
        /// The disk.
        disk: String,
        /// Why not.
        reason: String,
    },

    /// A network peer (an NBD server) broke the protocol or reported an error.
    #[error("{peer}: {detail}")]
    Protocol {
        /// The peer (an NBD URI).
        peer: String,
        /// What went wrong.
        detail: String,
    },

    /// An external program the platform layer drives (qemu-img, qemu-nbd)
    /// failed; `detail` carries its command line and error output.
    #[error("{program}: {detail}")]
    External {
        /// The program.
        program: String,
        /// Its command line and error output.
        detail: String,
    },

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

    /// True when something the caller named does not exist: an object
    /// asked for by name, a snapshot selector that matches nothing, a pool
    /// location that does not exist. Not for damage: a pack or chunk that a
    /// snapshot needs and the pool lost is [`is_damage`](Self::is_damage).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::NotFound { .. }
                | Error::SnapshotNotFound(_)
                | Error::PoolOpen { missing: true, .. }
        )
    }

    /// True when the pool holds damaged or missing data: a corrupt pack,
    /// index segment, blob or manifest, or a chunk or pack a snapshot needs
    /// that is gone. `verify` and `repair` are the tools for it.
    pub fn is_damage(&self) -> bool {
        match self {
            Error::Corrupt { .. }
            | Error::ChunkMissing { .. }
            | Error::PackMissing { .. }
            | Error::ChunkHashMismatch { .. } => true,
            Error::SnapshotUnreadable { source, .. } => {
                source.is_damage() || matches!(**source, Error::NotFound { .. })
            }
            _ => false,
        }
    }

    /// True when retrying the same operation later may succeed: I/O that
    /// timed out, was interrupted or lost its connection, or a peer that
    /// dropped the connection.
    pub fn is_transient(&self) -> bool {
        use io::ErrorKind::*;
        let kind = match self {
            Error::PoolIo { source, .. } | Error::Io { source, .. } => source.kind(),
            Error::SnapshotUnreadable { source, .. } => return source.is_transient(),
            Error::LeaseLost { .. } | Error::PoolBusy(_) => return true,
            _ => return false,
        };
        matches!(
            kind,
            TimedOut
                | Interrupted
                | WouldBlock
                | ConnectionReset
                | ConnectionAborted
                | ConnectionRefused
                | NotConnected
                | BrokenPipe
        )
    }
}
