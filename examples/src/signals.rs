//! SIGINT and SIGTERM stop the running job cleanly: the first one cancels
//! the job's [`CancelToken`] (a restore then removes its `.cairn-partial`
//! files and leaves any existing target untouched, a backup publishes no
//! snapshot, a collection deletes nothing more), and the process exits
//! with 128 + the signal number. A second signal kills at once (the
//! default action is restored after the first).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use cairn_engine::CancelToken;

static RECEIVED: AtomicI32 = AtomicI32::new(0);
static TOKEN: OnceLock<CancelToken> = OnceLock::new();

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    RECEIVED.store(sig, Ordering::SeqCst);
}

/// Installs the handlers and the thread that turns a signal into a
/// cancellation. Call once, first thing in `main`.
pub fn install() {
    let token = TOKEN.get_or_init(CancelToken::new).clone();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` only stores to an atomic, which is
        // async-signal-safe; the sigaction struct is fully initialised.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
    std::thread::spawn(move || loop {
        if RECEIVED.load(Ordering::SeqCst) != 0 {
            token.cancel();
            for sig in [libc::SIGINT, libc::SIGTERM] {
                // SAFETY: restoring the default disposition.
                unsafe { libc::signal(sig, libc::SIG_DFL) };
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    });
}

/// The token every job of this process is cancelled through.
pub fn token() -> CancelToken {
    TOKEN.get_or_init(CancelToken::new).clone()
}

/// The signal that stopped the job, if one arrived.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}
