//! SIGINT and SIGTERM stop the running job cleanly where the command can
//! be cancelled (backup, restore, verify, gc: they take [`token`]): the
//! handler cancels the job's [`CancelToken`] at once (a restore then
//! removes its `.cairn-partial` files and publishes nothing, a backup
//! publishes no snapshot, a collection deletes nothing more) and the
//! process exits with 128 + the signal number. A command that never asked
//! for the token is terminated by the signal as usual. A second signal
//! always takes the default action (`SA_RESETHAND`).

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::OnceLock;

use cairn_engine::CancelToken;

static RECEIVED: AtomicI32 = AtomicI32::new(0);
static TOKEN: OnceLock<CancelToken> = OnceLock::new();
/// Set once a job took the token: only then is a signal a cancellation.
static IN_USE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    // Async-signal-safe only: atomic loads and stores (OnceLock::get and
    // CancelToken::cancel are both that), signal() and raise().
    // The first signal is the one the exit code reports.
    let _ = RECEIVED.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    match TOKEN.get() {
        Some(t) if IN_USE.load(Ordering::SeqCst) => {
            t.cancel();
            // Any second signal (of either kind) ends the process at once.
            for s in [libc::SIGINT, libc::SIGTERM] {
                // SAFETY: signal() is async-signal-safe.
                unsafe { libc::signal(s, libc::SIG_DFL) };
            }
        }
        _ => {
            // Nothing to cancel: die of the signal, as without a handler
            // (SA_RESETHAND restored the default disposition already).
            // SAFETY: raise is async-signal-safe.
            unsafe { libc::raise(sig) };
        }
    }
}

/// Installs the handlers. Call once, first thing in `main`.
pub fn install() {
    TOKEN.get_or_init(CancelToken::new);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` is async-signal-safe (see there); the struct
        // is fully initialised. SA_RESTART: interrupted reads and writes
        // resume; the job notices the cancellation at its next check.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// The token a cancellable job of this process runs with; taking it makes
/// SIGINT/SIGTERM cancel the job instead of ending the process.
pub fn token() -> CancelToken {
    IN_USE.store(true, Ordering::SeqCst);
    TOKEN.get_or_init(CancelToken::new).clone()
}

/// The signal that stopped the job, if one arrived.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}
