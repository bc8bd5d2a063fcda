//! # cairn-pools
//!
//! Storage backends behind `cairn-engine`'s pool traits. A pool stores opaque
//! bytes under the names the engine gives; it defines no format of its own.
//!
//! - [`LocalPool`]: a directory (the embedded default, a dedup pool).
//! - [`StandardPool`]: a directory with one folder per backup set
//!   (`standard:DIR`).
//! - [`tape::TapePool`]: tape cartridges in a library (`tape:DIR` on the
//!   virtual tape library; real drives through [`tape::scsi`]).
//! - [`ObjectPool`]: an S3-compatible bucket (`s3://BUCKET/PREFIX`).
//! - [`MemoryPool`]: in memory, for tests and embedding experiments.
//!
//! [`open`] and [`create`] take a pool address (see [`PoolAddress`]) and
//! return the engine's pool handle; the CLI and embedders parse addresses
//! only through them. [`tape`] also holds the tape drive and library traits
//! and a virtual tape library.

#![warn(missing_docs)]

mod address;
mod cache;
mod local;
mod memory;
mod object;
mod standard;
pub mod tape;
#[cfg(feature = "testing")]
pub mod testing;

pub use address::{
    create, open, open_with, redact, OpenOptions, OpenedPool, PoolAddress, S3Address,
    ACCEPTED_FORMS, DEFAULT_S3_RETRY_TIMEOUT, DEFAULT_S3_TIMEOUT,
};
pub use cache::{default_cache_dir, CachedPool};
pub use local::LocalPool;
pub use memory::MemoryPool;
pub use object::{ObjectPool, RequestStats, S3Settings, PACK_SIZE, PARTS_IN_FLIGHT, PART_SIZE};
pub use standard::{BackupSet, StandardPool, DEFAULT_SET_LENGTH};

/// Errors raised while opening or creating a pool (operations on an open pool
/// use `cairn_engine::Error`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolOpenError {
    /// I/O on the pool directory failed.
    #[error("pool directory {path}: {source}")]
    Io {
        /// The directory or file.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The pool directory does not exist.
    #[error("pool directory {0} does not exist")]
    Missing(std::path::PathBuf),
    /// The pool's path is not a directory.
    #[error("{0} is not a directory")]
    NotADirectory(std::path::PathBuf),
    /// The address is not one of the accepted forms.
    #[error(
        "pool address {address:?}: {reason}; accepted forms: {}",
        address::ACCEPTED_FORMS
    )]
    BadAddress {
        /// The address as given (credentials redacted).
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The pool is in use by another process that must be the only one
    /// (a tape pool: one process drives the tape). Worth trying again later.
    #[error("pool {address}: {reason}")]
    Busy {
        /// The pool's address.
        address: String,
        /// Who holds it.
        reason: String,
    },
    /// The pool's settings or credentials are unusable.
    #[error("pool {address}: {reason}")]
    Settings {
        /// The pool's address (no secrets).
        address: String,
        /// What is wrong.
        reason: String,
    },
}

impl From<PoolOpenError> for cairn_engine::Error {
    fn from(e: PoolOpenError) -> Self {
        // Kept as their kind, so a job retries the network-type and busy
        // ones (an NFS mount timing out, a tape held by another run).
        let e = match e {
            PoolOpenError::Io { path, source } => {
                return cairn_engine::Error::io(
                    format!("pool directory {}", path.display()),
                    source,
                )
            }
            PoolOpenError::Busy { address, reason } => {
                return cairn_engine::Error::PoolBusy(format!("pool {address}: {reason}"))
            }
            e => e,
        };
        let (location, missing) = match &e {
            PoolOpenError::Io { path, .. } | PoolOpenError::NotADirectory(path) => {
                (path.display().to_string(), false)
            }
            PoolOpenError::Missing(path) => (path.display().to_string(), true),
            PoolOpenError::BadAddress { address, .. }
            | PoolOpenError::Settings { address, .. }
            | PoolOpenError::Busy { address, .. } => (address.clone(), false),
        };
        cairn_engine::Error::PoolOpen {
            location,
            reason: e.to_string(),
            missing,
        }
    }
}
