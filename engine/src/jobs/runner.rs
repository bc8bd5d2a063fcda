//! Running a job's VMs in parallel within its limits (spec B8): VMs per
//! job (1–32, default 2), VMs per host (1–10, 2), disks per VM (1–5, 1)
//! and streams (connections) per disk (1–5, 1), all at once.
//!
//! [`run_limited`] is the one mechanism: a fixed set of workers takes
//! items from a queue in order, skipping an item whose key (a VM's host)
//! already has its share running, and waits when every queued item is
//! blocked so. A VM's disks go through it again with the disks-per-VM
//! limit; streams per disk are the source's connections.

use std::collections::{HashMap, VecDeque};

use parking_lot::{Condvar, Mutex};

use crate::platform::VmInfo;
use crate::{CancelToken, Error, Result};

/// A job's parallelism limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct Limits {
    /// VMs backed up at once by the job (1–32).
    pub vms_per_job: usize,
    /// VMs of one host backed up at once (1–10).
    pub vms_per_host: usize,
    /// Disks of one VM read at once (1–5).
    pub disks_per_vm: usize,
    /// Connections (streams) per disk (1–5).
    pub streams_per_disk: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            vms_per_job: 2,
            vms_per_host: 2,
            disks_per_vm: 1,
            streams_per_disk: 1,
        }
    }
}

impl Limits {
    /// Limits with every value checked against its range.
    pub fn new(
        vms_per_job: usize,
        vms_per_host: usize,
        disks_per_vm: usize,
        streams_per_disk: usize,
    ) -> Result<Self> {
        let l = Limits {
            vms_per_job,
            vms_per_host,
            disks_per_vm,
            streams_per_disk,
        };
        l.validate()?;
        Ok(l)
    }

    /// Checks every value against its range, naming the first out of it.
    pub fn validate(&self) -> Result<()> {
        for (name, value, max) in [
            ("vms_per_job", self.vms_per_job, 32),
            ("vms_per_host", self.vms_per_host, 10),
            ("disks_per_vm", self.disks_per_vm, 5),
            ("streams_per_disk", self.streams_per_disk, 5),
        ] {
            if !(1..=max).contains(&value) {
                return Err(Error::InvalidArgument(format!(
                    "{name} = {value} is out of range (1–{max})"
                )));
            }
        }
        Ok(())
    }

    /// Runs `work` on each VM, at most `vms_per_job` at once and at most
    /// `vms_per_host` of one host at once (see [`run_limited`]).
    pub fn run_vms<R: Send>(
        &self,
        vms: Vec<VmInfo>,
        cancel: &CancelToken,
        work: impl Fn(&VmInfo) -> R + Sync,
    ) -> Vec<(VmInfo, Option<R>)> {
        run_limited(
            vms,
            self.vms_per_job,
            self.vms_per_host,
            |vm| vm.host.clone(),
            cancel,
            work,
        )
    }

    /// Runs `work` on each of a VM's disks (or anything per disk), at most
    /// `disks_per_vm` at once.
    pub fn run_disks<T: Send + Sync, R: Send>(
        &self,
        disks: Vec<T>,
        cancel: &CancelToken,
        work: impl Fn(&T) -> R + Sync,
    ) -> Vec<(T, Option<R>)> {
        run_limited(
            disks,
            self.disks_per_vm,
            usize::MAX,
            |_| String::new(),
            cancel,
            work,
        )
    }
}

struct Queue<T, R> {
    waiting: VecDeque<(usize, T)>,
    running: HashMap<String, usize>,
    done: Vec<(usize, T, Option<R>)>,
}

/// Runs `work` on every item with `workers` threads, never more than
/// `per_key` at once for items of one `key`. Items start in order, except
/// that an item whose key is at its share waits while later items of
/// other keys go first. Once `cancel` is triggered no further item starts
/// (those come back with `None`). Results come back in the items' order.
/// `workers` and `per_key` below 1 count as 1.
pub fn run_limited<T: Send + Sync, R: Send>(
    items: Vec<T>,
    workers: usize,
    per_key: usize,
    key: impl Fn(&T) -> String + Sync,
    cancel: &CancelToken,
    work: impl Fn(&T) -> R + Sync,
) -> Vec<(T, Option<R>)> {
    let n = items.len();
    // Zero would block every item forever: at least one per key.
    let per_key = per_key.max(1);
    let queue = Mutex::new(Queue {
        waiting: items.into_iter().enumerate().collect(),
        running: HashMap::new(),
        done: Vec::with_capacity(n),
    });
    let changed = Condvar::new();
    let worker = || loop {
        let (i, item, k) = {
            let mut q = queue.lock();
            loop {
                if cancel.is_cancelled() {
                    let rest: Vec<(usize, T)> = q.waiting.drain(..).collect();
                    q.done.extend(rest.into_iter().map(|(i, t)| (i, t, None)));
                    changed.notify_all();
                    return;
                }
                let Queue {
                    waiting, running, ..
                } = &mut *q;
                let ready = waiting
                    .iter()
                    .position(|(_, t)| running.get(&key(t)).copied().unwrap_or(0) < per_key);
                match ready {
                    Some(at) => {
                        let Some((i, item)) = q.waiting.remove(at) else {
                            continue;
                        };
                        let k = key(&item);
                        *q.running.entry(k.clone()).or_insert(0) += 1;
                        break (i, item, k);
                    }
                    None if q.waiting.is_empty() => return,
                    None => changed.wait(&mut q),
                }
            }
        };
        // Gives the slot back even if `work` panics (the panic then
        // reaches the caller through the scope), so no worker waits on a
        // key that will never free up.
        struct Slot<'q, T, R> {
            queue: &'q Mutex<Queue<T, R>>,
            changed: &'q Condvar,
            key: String,
        }
        impl<T, R> Drop for Slot<'_, T, R> {
            fn drop(&mut self) {
                let mut q = self.queue.lock();
                if let Some(c) = q.running.get_mut(&self.key) {
                    *c -= 1;
                }
                self.changed.notify_all();
            }
        }
        let slot = Slot {
            queue: &queue,
            changed: &changed,
            key: k,
        };
        let result = work(&item);
        drop(slot);
        queue.lock().done.push((i, item, Some(result)));
        changed.notify_all();
    };
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, n.max(1)) {
            s.spawn(worker);
        }
    });
    let mut done = queue.into_inner().done;
    done.sort_by_key(|(i, _, _)| *i);
    done.into_iter().map(|(_, t, r)| (t, r)).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A gauge: how many are in, and the most ever in at once.
    #[derive(Default)]
    struct Gauge {
        now: AtomicUsize,
        peak: AtomicUsize,
    }

    impl Gauge {
        fn enter(&self) {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(n, Ordering::SeqCst);
        }
        fn leave(&self) {
            self.now.fetch_sub(1, Ordering::SeqCst);
        }
        fn peak(&self) -> usize {
            self.peak.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn forty_vms_on_five_hosts_never_exceed_any_limit() {
        let hosts = 5;
        let vms: Vec<VmInfo> = (0..40)
            .map(|i| VmInfo {
                id: format!("vm{i}"),
                name: format!("vm{i:02}"),
                // Uneven: host 0 has most of the VMs.
                host: format!("cvk{}", if i % 3 == 0 { 0 } else { i % hosts }),
                ..VmInfo::default()
            })
            .collect();
        let limits = Limits::new(8, 2, 2, 1).unwrap();
        let job = Gauge::default();
        let per_host: HashMap<String, Gauge> = (0..hosts)
            .map(|h| (format!("cvk{h}"), Gauge::default()))
            .collect();
        let per_vm: HashMap<String, Gauge> = vms
            .iter()
            .map(|v| (v.id.clone(), Gauge::default()))
            .collect();
        let disk_total = Gauge::default();
        let cancel = CancelToken::new();
        let results = limits.run_vms(vms.clone(), &cancel, |vm| {
            job.enter();
            per_host[&vm.host].enter();
            let disks = limits.run_disks((0..3).collect::<Vec<u32>>(), &cancel, |d| {
                per_vm[&vm.id].enter();
                disk_total.enter();
                std::thread::sleep(std::time::Duration::from_millis(2));
                disk_total.leave();
                per_vm[&vm.id].leave();
                *d
            });
            per_host[&vm.host].leave();
            job.leave();
            disks.len()
        });
        assert_eq!(results.len(), 40);
        assert!(results.iter().all(|(_, r)| *r == Some(3)));
        let order: Vec<&str> = results.iter().map(|(v, _)| v.id.as_str()).collect();
        let want: Vec<String> = (0..40).map(|i| format!("vm{i}")).collect();
        assert_eq!(order, want.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(job.peak() <= 8, "VMs at once: {}", job.peak());
        for (h, g) in &per_host {
            assert!(g.peak() <= 2, "host {h}: {}", g.peak());
        }
        for (v, g) in &per_vm {
            assert!(g.peak() <= 2, "vm {v}: {} disks at once", g.peak());
        }
        assert!(disk_total.peak() <= 16, "{}", disk_total.peak());
        // And it did run in parallel.
        assert!(job.peak() >= 2, "{}", job.peak());
    }

    #[test]
    fn a_panicking_item_does_not_hang_the_others() {
        let ran = AtomicUsize::new(0);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_limited(
                (0..6).collect::<Vec<u32>>(),
                2,
                1,
                |_| "one host".to_string(),
                &CancelToken::new(),
                |i| {
                    ran.fetch_add(1, Ordering::SeqCst);
                    if *i == 0 {
                        panic!("item 0 fails");
                    }
                    *i
                },
            )
        }));
        assert!(outcome.is_err(), "the panic reaches the caller");
        assert_eq!(ran.load(Ordering::SeqCst), 6, "the other items still ran");
    }

    /// Zero workers or zero per key (limits built without `validate`)
    /// run every item, one at a time, instead of hanging.
    #[test]
    fn zero_limits_count_as_one() {
        let gauge = Gauge::default();
        let out = run_limited(
            (0..4).collect::<Vec<u32>>(),
            0,
            0,
            |_| "h".to_string(),
            &CancelToken::new(),
            |i| {
                gauge.enter();
                std::thread::sleep(std::time::Duration::from_millis(5));
                gauge.leave();
                *i * 2
            },
        );
        let results: Vec<Option<u32>> = out.into_iter().map(|(_, r)| r).collect();
        assert_eq!(results, [Some(0), Some(2), Some(4), Some(6)]);
        assert_eq!(gauge.peak(), 1);
    }

    #[test]
    fn a_cancelled_run_starts_nothing_more_and_limits_are_checked() {
        let cancel = CancelToken::new();
        let started = AtomicUsize::new(0);
        let out = run_limited(
            (0..20).collect::<Vec<u32>>(),
            2,
            usize::MAX,
            |_| String::new(),
            &cancel,
            |i| {
                if started.fetch_add(1, Ordering::SeqCst) == 3 {
                    cancel.cancel();
                }
                *i
            },
        );
        assert_eq!(out.len(), 20);
        let ran = out.iter().filter(|(_, r)| r.is_some()).count();
        assert!((4..=5).contains(&ran), "{ran}");
        assert_eq!(ran, started.load(Ordering::SeqCst));
        for (fields, needle) in [
            ((0, 2, 1, 1), "vms_per_job = 0"),
            ((33, 2, 1, 1), "vms_per_job = 33"),
            ((2, 11, 1, 1), "vms_per_host = 11 is out of range (1–10)"),
            ((2, 2, 6, 1), "disks_per_vm = 6"),
            ((2, 2, 1, 0), "streams_per_disk = 0"),
        ] {
            let e = Limits::new(fields.0, fields.1, fields.2, fields.3).unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
        assert_eq!(Limits::default(), Limits::new(2, 2, 1, 1).unwrap());
    }
}
