//! The pipelines that move data: [`backup`] (disks → pool), [`restore`]
//! (pool → disk targets) and [`verify`] (the pool against itself), plus
//! their inputs ([`input`]). Each streams through bounded queues with a
//! fixed number of buffers, so memory does not grow with disk size.
//!
//! The pipelines know nothing of changed-block tracking: an incremental
//! arrives as [`ChangedBlocks`](input::ChangedBlocks) in a disk's input.

pub(crate) mod backup;
pub(crate) mod extents;
pub(crate) mod failure;
pub(crate) mod input;
pub(crate) mod lanes;
pub(crate) mod restore;
pub(crate) mod verify;

use std::num::NonZeroUsize;

/// The setters every job's options share (`threads`, `progress`,
/// `cancel` fields), written once.
macro_rules! job_control_setters {
    () => {
        /// Sets the number of worker threads (`None`: one per CPU).
        pub fn with_threads(mut self, threads: Option<std::num::NonZeroUsize>) -> Self {
            self.threads = threads;
            self
        }

        /// Sends progress to `progress`.
        pub fn with_progress(mut self, progress: std::sync::Arc<dyn crate::Progress>) -> Self {
            self.progress = progress;
            self
        }

        /// Stops the job when `cancel` is triggered.
        pub fn with_cancel(mut self, cancel: crate::CancelToken) -> Self {
            self.cancel = cancel;
            self
        }
    };
}
pub(crate) use job_control_setters;

/// The number of worker threads for a `threads` option (`None`: one per CPU).
pub(crate) fn worker_threads(threads: Option<NonZeroUsize>) -> usize {
    threads
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(2, NonZeroUsize::get)
}

/// Reads `len` bytes at `offset` of pack `pack` for a job that needs chunk
/// `chunk` there (`needed_by` says who: snapshot, disk, offset). A pack
/// the pool no longer has is [`Error::PackMissing`]; one shorter than its
/// table says is damage ([`Error::Corrupt`]); other errors pass unchanged.
pub(crate) fn read_pack_range(
    pool: &dyn crate::store::pool::Pool,
    pack: crate::id::PackId,
    (offset, len): (u64, u64),
    chunk: Option<crate::id::ChunkId>,
    needed_by: impl FnOnce() -> String,
) -> crate::error::Result<bytes::Bytes> {
    use crate::error::Error;
    pool.read_range(
        crate::kind::FileKind::Pack,
        &pack.to_hex(),
        offset,
        len as usize,
    )
    .map_err(|e| match e {
        Error::NotFound { .. } => Error::PackMissing {
            pack,
            chunk: chunk.unwrap_or(crate::id::ChunkId([0; 32])),
            needed_by: needed_by(),
        },
        Error::PoolIo { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof => {
            Error::corrupt(
                format!("pack {pack}"),
                crate::store::wire::DecodeError::Invalid(format!(
                    "{len} bytes at offset {offset} cannot be read: {source}"
                )),
            )
        }
        e => e,
    })
}
