//! Progress reporting: the pipelines call a [`Progress`] the caller supplies
//! (the CLI draws a bar; embedders log or ignore it).

/// Receives progress from a running pipeline. Calls come from several threads.
pub trait Progress: Send + Sync {
    /// Total bytes the operation expects to process (0 if unknown).
    fn start(&self, _total_bytes: u64) {}
    /// `bytes` more were processed (read, skipped as holes, or written).
    fn advance(&self, _bytes: u64) {}
    /// A short status line (the disk being processed, …).
    fn message(&self, _msg: &str) {}
}

/// Discards all progress.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}
