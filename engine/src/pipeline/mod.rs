//! The pipelines that move data: [`backup`] (disks → pool), [`restore`]
//! (pool → disk targets) and [`verify`] (the pool against itself), plus
//! their inputs ([`input`]). Each streams through bounded queues with a
//! fixed number of buffers, so memory does not grow with disk size.
//!
//! The pipelines know nothing of changed-block tracking: an incremental
//! arrives as [`ChangedBlocks`](input::ChangedBlocks) in a disk's input.

pub(crate) mod backup;
pub(crate) mod failure;
pub(crate) mod input;
pub(crate) mod restore;
pub(crate) mod verify;

use std::num::NonZeroUsize;

/// The number of worker threads for a `threads` option (`None`: one per CPU).
pub(crate) fn worker_threads(threads: Option<NonZeroUsize>) -> usize {
    threads
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(2, NonZeroUsize::get)
}
