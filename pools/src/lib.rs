//! # cairn-pools
//!
//! Storage backends behind `cairn-engine`'s pool traits. A pool stores opaque
//! bytes under the names the engine gives; it defines no format of its own.
//!
//! - [`LocalPool`]: a directory (the embedded default, a dedup pool).
//! - [`MemoryPool`]: in memory, for tests and embedding experiments.
//!
//! Later: the standard pool (one directory per backup set), tape (sequential
//! media) and object (S3-compatible) pools plug in here behind the same traits.

#![warn(missing_docs)]

mod local;
mod memory;

pub use local::LocalPool;
pub use memory::MemoryPool;

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
}

impl From<PoolOpenError> for cairn_engine::Error {
    fn from(e: PoolOpenError) -> Self {
        let (location, missing) = match &e {
            PoolOpenError::Io { path, .. } | PoolOpenError::NotADirectory(path) => {
                (path.display().to_string(), false)
            }
            PoolOpenError::Missing(path) => (path.display().to_string(), true),
        };
        cairn_engine::Error::PoolOpen {
            location,
            reason: e.to_string(),
            missing,
        }
    }
}
