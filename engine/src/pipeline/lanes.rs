//! Lanes: disks of one job run side by side (backup's and restore's
//! `parallel_disks`). A few threads each take the next item and run it;
//! they stop together — on the caller's cancel, on the first failure, or
//! on a panic, which is carried to the caller once every lane has stopped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::progress::CancelToken;

/// Runs `run` on every item, on at most `lanes` threads, and returns the
/// results in the items' order. `lane_cancel` is the token the runs watch
/// (give it to them through their options): it is cancelled when `caller`
/// is, and when a run fails or panics, so the other lanes stop too. The
/// error returned is the first failure's cause (not a sibling's
/// "cancelled"), or [`Error::Cancelled`] when the caller cancelled.
pub(crate) fn run_lanes<T: Send, R: Send>(
    items: Vec<T>,
    lanes: usize,
    caller: &CancelToken,
    lane_cancel: &CancelToken,
    run: impl Fn(T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let n = items.len();
    let queue: Mutex<VecDeque<(usize, T)>> = Mutex::new(items.into_iter().enumerate().collect());
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..n).map(|_| None).collect());
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let panicked: Mutex<Option<Box<dyn std::any::Any + Send>>> = Mutex::new(None);
    let finished = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // The caller's cancel reaches the lanes' token.
        scope.spawn(|| {
            while !finished.load(Ordering::SeqCst) {
                if caller.is_cancelled() {
                    lane_cancel.cancel();
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        let handles: Vec<_> = (0..lanes.clamp(1, n.max(1)))
            .map(|_| {
                scope.spawn(|| loop {
                    let Some((i, item)) = queue.lock().pop_front() else {
                        return;
                    };
                    if lane_cancel.is_cancelled() {
                        return;
                    }
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(item))) {
                        Ok(Ok(r)) => results.lock()[i] = Some(r),
                        Ok(Err(e)) => {
                            let mut first = first_error.lock();
                            if first.is_none() || matches!(*first, Some(Error::Cancelled)) {
                                *first = Some(e);
                            }
                            lane_cancel.cancel();
                            return;
                        }
                        Err(panic) => {
                            // The others stop; the panic goes on once they have.
                            lane_cancel.cancel();
                            *panicked.lock() = Some(panic);
                            return;
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            if let Err(panic) = h.join() {
                *panicked.lock() = Some(panic);
            }
        }
        finished.store(true, Ordering::SeqCst);
    });
    if let Some(panic) = panicked.into_inner() {
        std::panic::resume_unwind(panic);
    }
    caller.check()?;
    if let Some(e) = first_error.into_inner() {
        return Err(e);
    }
    results
        .into_inner()
        .into_iter()
        .map(|r| r.ok_or_else(|| Error::Internal("a lane's item was not run".into())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Waits until `ready` (at most 10 s: a lane that never starts fails
    /// the test's own assertions).
    fn wait_for(ready: impl Fn() -> bool) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !ready() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn results_come_in_item_order_and_lanes_overlap() {
        let (running, peak) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let one_started = AtomicBool::new(false);
        let out = run_lanes(
            (0..6u64).collect(),
            3,
            &CancelToken::new(),
            &CancelToken::new(),
            |i| {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                if i == 1 {
                    one_started.store(true, Ordering::SeqCst);
                }
                // Item 0 waits for item 1 (taken by another lane) to start.
                if i == 0 {
                    wait_for(|| one_started.load(Ordering::SeqCst));
                }
                // Later items finish first.
                std::thread::sleep(std::time::Duration::from_millis(12 - 2 * i));
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(i * 10)
            },
        )
        .unwrap();
        assert_eq!(out, vec![0, 10, 20, 30, 40, 50]);
        assert!(peak.load(Ordering::SeqCst) >= 2, "lanes ran one at a time");
        assert!(peak.load(Ordering::SeqCst) <= 3, "more lanes than asked");
    }

    #[test]
    fn the_first_cause_wins_and_stops_the_others() {
        let lane_cancel = CancelToken::new();
        let started = AtomicUsize::new(0);
        let err = run_lanes(
            (0..20u32).collect(),
            2,
            &CancelToken::new(),
            &lane_cancel,
            |i| {
                started.fetch_add(1, Ordering::SeqCst);
                if i == 0 {
                    // Fails once item 1 runs on the other lane, which then
                    // sees the cancel and reports "cancelled" after the cause.
                    wait_for(|| started.load(Ordering::SeqCst) >= 2);
                    return Err::<u32, _>(Error::InvalidArgument("disk 0 failed".into()));
                }
                while !lane_cancel.is_cancelled() {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(Error::Cancelled)
            },
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(ref m) if m == "disk 0 failed"),
            "{err}"
        );
        assert_eq!(
            started.load(Ordering::SeqCst),
            2,
            "items started after the failure"
        );
    }

    #[test]
    fn the_callers_cancel_stops_every_lane() {
        let (caller, lane_cancel) = (CancelToken::new(), CancelToken::new());
        let err = run_lanes((0..2u32).collect(), 2, &caller, &lane_cancel, |i| {
            if i == 0 {
                caller.cancel();
            }
            while !lane_cancel.is_cancelled() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Ok(i)
        })
        .unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{err}");
    }

    #[test]
    fn a_panic_reaches_the_caller_after_the_lanes_stop() {
        let lane_cancel = CancelToken::new();
        let other_stopped = AtomicBool::new(false);
        let other_running = AtomicBool::new(false);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_lanes(
                (0..2u32).collect(),
                2,
                &CancelToken::new(),
                &lane_cancel,
                |i| {
                    if i == 0 {
                        wait_for(|| other_running.load(Ordering::SeqCst));
                        panic!("lane 0");
                    }
                    other_running.store(true, Ordering::SeqCst);
                    while !lane_cancel.is_cancelled() {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    other_stopped.store(true, Ordering::SeqCst);
                    Ok(i)
                },
            )
        }));
        let panic = caught.expect_err("the panic is carried");
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"lane 0"));
        assert!(other_stopped.load(Ordering::SeqCst));
    }

    #[test]
    fn no_items_is_no_results() {
        let out: Vec<u32> = run_lanes(
            Vec::<u32>::new(),
            4,
            &CancelToken::new(),
            &CancelToken::new(),
            Ok,
        )
        .unwrap();
        assert!(out.is_empty());
    }
}
