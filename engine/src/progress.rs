//! How a running job talks to its caller: [`Progress`] (called the same way
//! by backup, restore and verify: `start` once, `advance` as bytes are
//! processed, `message` for status lines) and [`CancelToken`] (the caller
//! stops a job from any thread).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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

/// Stops a running job from another thread. Clones share one flag.
///
/// A cancelled backup stops within a fraction of a second and fails with
/// [`Error::Cancelled`](crate::Error::Cancelled), leaving the pool as a
/// killed backup would: packs sealed so far are kept (and reused by the next
/// backup), no snapshot is written, every earlier snapshot is intact. A
/// cancelled restore removes its partial targets.
///
/// ```
/// let token = cairn_engine::CancelToken::new();
/// let for_other_thread = token.clone();
/// std::thread::spawn(move || for_other_thread.cancel()).join().unwrap();
/// assert!(token.is_cancelled());
/// ```
#[derive(Debug, Default, Clone)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every job holding a clone of this token to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// True once [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Error::Cancelled)` once cancelled.
    pub fn check(&self) -> crate::error::Result<()> {
        if self.is_cancelled() {
            return Err(crate::error::Error::Cancelled);
        }
        Ok(())
    }
}
