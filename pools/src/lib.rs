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

mod local;
mod memory;

pub use local::LocalPool;
pub use memory::MemoryPool;

/// Errors raised while opening or creating a pool (operations on an open pool
/// use `cairn_engine::Error`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolOpenError {
    #[error("pool directory {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pool directory {0} does not exist")]
    Missing(std::path::PathBuf),
    #[error("{0} is not a directory")]
    NotADirectory(std::path::PathBuf),
}
