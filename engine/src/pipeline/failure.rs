//! [`Failure`]: the first error of any pipeline thread, plus an abort flag
//! that the caller's [`CancelToken`] also raises.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use crate::error::Error;
use crate::progress::CancelToken;

/// First error of any pipeline thread, plus an abort flag.
/// Shared by the backup and restore pipelines.
pub(crate) struct Failure {
    abort: AtomicBool,
    error: Mutex<Option<Error>>,
}

impl Failure {
    pub(crate) fn new() -> Self {
        Failure {
            abort: AtomicBool::new(false),
            error: Mutex::new(None),
        }
    }
    /// Records `e` unless an earlier error is recorded, and aborts.
    pub(crate) fn set(&self, e: Error) {
        self.abort.store(true, Ordering::SeqCst);
        let mut slot = self.error.lock();
        if slot.is_none() {
            *slot = Some(e);
        }
    }
    /// Stops the pipeline without recording an error (the caller returns its own).
    pub(crate) fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
    }
    /// True once any thread failed.
    pub(crate) fn aborted(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }
    /// Records [`Error::Cancelled`] if `cancel` was triggered; true if the
    /// pipeline must stop (cancelled now or failed earlier).
    pub(crate) fn check(&self, cancel: &CancelToken) -> bool {
        if cancel.is_cancelled() {
            self.set(Error::Cancelled);
        }
        self.aborted()
    }
    /// The recorded error, if any.
    pub(crate) fn take(&self) -> Option<Error> {
        self.error.lock().take()
    }
}
