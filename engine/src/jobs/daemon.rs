//! The daemon: runs each job of the state directory at its scheduled
//! times (spec B6, B20), survives a restart without losing or
//! double-running a run, and reports runs missed while it was down.
//!
//! Per job it keeps `schedule/<job>.json` ([`ScheduleState`]): the
//! schedule it belongs to, when the daemon first saw the job, and the
//! last occurrence it *claimed*. A run is claimed (written atomically)
//! before it starts and marked finished after its record is written, so:
//!
//! - an occurrence claimed and finished never runs again, whatever
//!   restarts follow;
//! - an occurrence claimed but not finished (the daemon was killed, or
//!   cancelled by SIGTERM mid-run) is run again once at the next start
//!   (trigger `resumed`) — unless a finished record of it exists (the
//!   daemon died between the record and the mark);
//! - occurrences that passed while no daemon ran (before this daemon's
//!   first pass, less a grace period) are *missed*: reported to the
//!   notifier, and with the job's `run_missed` run once (trigger
//!   `missed`); otherwise the job waits for its next occurrence.
//!   Occurrences that came while this daemon was busy with the job's
//!   previous run are late, not missed: the latest of them runs.
//!
//! An immediate job runs once when the daemon first sees it, unless it has
//! run already (by hand). A changed schedule or time zone starts the job's
//! state afresh (its occurrences so far are not missed). One daemon per
//! state directory (a lock). Jobs run side by side, each on its own
//! thread; a job never overlaps itself (and its `job:` lock keeps a run by
//! hand apart too); two jobs never work on one VM at once (`vm:` locks).

use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::jobs::definition::Job;
use crate::jobs::execute::JobRunner;
use crate::jobs::lock::ResourceLock;
use crate::jobs::schedule::Schedule;
use crate::jobs::state::{RunRecord, RunStatus, StateDir, Trigger};
use crate::{CancelToken, Error, Result};

/// A job's thread reports its end to the daemon's loop when dropped, so
/// the job is never left "running" whatever happened to its run.
struct Done {
    tx: std::sync::mpsc::Sender<(String, Option<TickOutcome>)>,
    name: Option<String>,
    outcome: Option<TickOutcome>,
}

impl Drop for Done {
    fn drop(&mut self) {
        let Some(name) = self.name.take() else {
            return;
        };
        let _ = self.tx.send((name, self.outcome.take()));
    }
}

/// Occurrences later than this behind "now" are missed, not due.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5 * 60);

/// The daemon's state of one job (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ScheduleState {
    /// The schedule it belongs to, as written.
    pub schedule: String,
    /// The time zone it belongs to (`None`: the system's).
    pub timezone: Option<String>,
    /// When the daemon first saw the job with this schedule (RFC 3339).
    pub since: String,
    /// The last occurrence claimed (RFC 3339).
    pub claimed: Option<String>,
    /// Whether the claimed occurrence's run ended.
    pub finished: bool,
    /// The latest missed occurrence already reported (RFC 3339).
    #[serde(default)]
    pub reported: Option<String>,
}

/// What one pass of the daemon did for a job.
#[derive(Debug)]
#[non_exhaustive]
pub enum TickOutcome {
    /// A run was made.
    Ran(Box<RunRecord>),
    /// Occurrences were missed (how many, at most 1000 counted) and not run.
    Missed(usize),
    /// The job could not be run (bad definition, busy, state unwritable).
    Error(String),
}

/// A pass's outcomes: per job, what was done.
pub type PassOutcomes = Vec<(String, TickOutcome)>;

/// The daemon (see the module docs).
pub struct Daemon<'a> {
    state: &'a StateDir,
    runner: JobRunner<'a>,
    grace: Duration,
    /// The time of this daemon's first pass: occurrences before it (less
    /// the grace) came while no daemon ran.
    started: parking_lot::Mutex<Option<Timestamp>>,
    _lock: ResourceLock,
}

impl std::fmt::Debug for Daemon<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("state", &self.state.root())
            .finish_non_exhaustive()
    }
}

fn parse_time(s: &str, what: &str) -> Result<Timestamp> {
    s.parse()
        .map_err(|e| Error::InvalidArgument(format!("{what} {s:?} is not a time: {e}")))
}

impl<'a> Daemon<'a> {
    /// The daemon of `state`, running jobs with `runner`; fails when
    /// another daemon runs on this state directory.
    pub fn new(state: &'a StateDir, runner: JobRunner<'a>) -> Result<Self> {
        let lock = ResourceLock::acquire(state.root(), "daemon", "daemon")?;
        Ok(Daemon {
            state,
            runner,
            grace: DEFAULT_GRACE,
            started: parking_lot::Mutex::new(None),
            _lock: lock,
        })
    }

    /// Occurrences more than `grace` old are missed rather than due.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// One pass over every job at time `now`: each job due runs (one after
    /// the other, here; [`run`](Self::run) runs them side by side),
    /// interrupted runs are resumed, missed runs reported.
    pub fn tick(&self, now: Timestamp) -> PassOutcomes {
        let names = match self.state.job_names() {
            Ok(n) => n,
            Err(e) => return vec![(String::new(), TickOutcome::Error(e.to_string()))],
        };
        let mut out = Vec::new();
        for name in names {
            // Stopped: no further job starts (each would only record a
            // cancelled run).
            if self.runner.is_cancelled() {
                break;
            }
            if let Some(outcome) = self.tick_job(&name, now) {
                out.push((name, outcome));
            }
        }
        out
    }

    fn tick_job(&self, name: &str, now: Timestamp) -> Option<TickOutcome> {
        let job = match self.state.job(name).and_then(|d| d.resolve()) {
            Ok(j) => j,
            Err(e) => return Some(TickOutcome::Error(e.to_string())),
        };
        match self.tick_resolved(&job, now) {
            Ok(o) => o,
            Err(e) => Some(TickOutcome::Error(e.to_string())),
        }
    }

    fn tick_resolved(&self, job: &Job, now: Timestamp) -> Result<Option<TickOutcome>> {
        let def = &job.definition;
        let path = self.state.schedule_path(&def.name);
        let mut st: ScheduleState = match self.state.read_json(&path)? {
            Some(st)
                if {
                    let st: &ScheduleState = &st;
                    st.schedule == def.schedule && st.timezone == def.timezone
                } =>
            {
                st
            }
            _ => {
                let fresh = ScheduleState {
                    schedule: def.schedule.clone(),
                    timezone: def.timezone.clone(),
                    since: now.to_string(),
                    claimed: None,
                    finished: true,
                    reported: None,
                };
                self.state.write_json(&path, &fresh)?;
                fresh
            }
        };
        // An occurrence claimed and not finished: resume it once, unless
        // its run did end (the daemon died before marking it).
        if let (Some(claimed), false) = (st.claimed.clone(), st.finished) {
            let t = parse_time(&claimed, "claimed occurrence")?;
            let ended = self.state.runs(&def.name)?.iter().any(|r| {
                r.scheduled.as_deref() == Some(claimed.as_str())
                    && matches!(
                        r.status,
                        RunStatus::Succeeded
                            | RunStatus::Partial
                            | RunStatus::Failed
                            | RunStatus::Skipped
                    )
            });
            if ended {
                st.finished = true;
                self.state.write_json(&path, &st)?;
            } else {
                return self
                    .run_claimed(job, &path, st, t, Trigger::Resumed)
                    .map(Some);
            }
        }
        let since = parse_time(&st.since, "first seen")?;
        if job.schedule == Schedule::Immediate {
            // Runs once, as soon as the daemon sees the job — unless it ran
            // already (by hand); never missed.
            if st.claimed.is_some() {
                return Ok(None);
            }
            // A run by hand since the job was added (a job removed and
            // added again keeps its old history: not those).
            let added = self.state.job_added(&def.name).unwrap_or(since);
            let ran = self.state.runs(&def.name)?.iter().any(|r| {
                r.started
                    .parse::<Timestamp>()
                    .is_ok_and(|started| started >= added)
            });
            if ran {
                st.claimed = Some(since.to_string());
                self.state.write_json(&path, &st)?;
                return Ok(None);
            }
            return self
                .run_claimed(job, &path, st, since, Trigger::Schedule)
                .map(Some);
        }
        let base = match &st.claimed {
            Some(c) => parse_time(c, "claimed occurrence")?,
            None => since,
        };
        let grace = jiff::SignedDuration::try_from(self.grace).unwrap_or_default();
        let started = *self.started.lock().get_or_insert(now);
        let up_since = if started < now { started } else { now };
        let cutoff = up_since.checked_sub(grace).unwrap_or(up_since);
        let occurrences = |from: Timestamp, until: Timestamp, limit: usize| {
            job.schedule.due_between(&job.zone, from, until, limit)
        };
        // Due: within the grace period (the latest of them runs).
        let due_from = if base > cutoff { base } else { cutoff };
        let due = occurrences(due_from, now, 10_000);
        // Missed: counted up to 1000 for the report; the latest of them
        // is the one a catch-up run stands for.
        let (missed, latest_missed) = if base < cutoff {
            let counted = occurrences(base, cutoff, 1000);
            let latest = if counted.len() < 1000 {
                counted.last().copied()
            } else {
                // Search back from the cutoff in growing windows.
                [2i64, 64, 1500, 150_000].iter().find_map(|days| {
                    let from = cutoff
                        .checked_sub(jiff::SignedDuration::from_hours(24 * days))
                        .unwrap_or(base);
                    let from = if from > base { from } else { base };
                    occurrences(from, cutoff, usize::MAX).last().copied()
                })
            };
            (counted, latest)
        } else {
            (Vec::new(), None)
        };
        // Reported once, even when the run they lead to must wait (the
        // job busy with a run by hand).
        let reported = st
            .reported
            .as_deref()
            .and_then(|r| r.parse::<Timestamp>().ok());
        if let Some(last) = latest_missed.filter(|l| reported.is_none_or(|r| *l > r)) {
            let fresh: Vec<Timestamp> = missed
                .iter()
                .copied()
                .filter(|t| reported.is_none_or(|r| *t > r))
                .collect();
            self.runner.report_missed(job, &fresh, missed.len() >= 1000);
            st.reported = Some(last.to_string());
            self.state.write_json(&path, &st)?;
        }
        if let Some(t) = due.last() {
            return self
                .run_claimed(job, &path, st, *t, Trigger::Schedule)
                .map(Some);
        }
        if let Some(t) = latest_missed.as_ref() {
            if def.run_missed {
                return self
                    .run_claimed(job, &path, st, *t, Trigger::Missed)
                    .map(Some);
            }
            st.claimed = Some(t.to_string());
            st.finished = true;
            self.state.write_json(&path, &st)?;
            return Ok(Some(TickOutcome::Missed(missed.len())));
        }
        Ok(None)
    }

    /// Claims occurrence `t`, runs it, marks it finished (not when the run
    /// was cancelled: it resumes at the next start).
    fn run_claimed(
        &self,
        job: &Job,
        path: &std::path::Path,
        mut st: ScheduleState,
        t: Timestamp,
        trigger: Trigger,
    ) -> Result<TickOutcome> {
        let previous = st.clone();
        st.claimed = Some(t.to_string());
        st.finished = false;
        self.state.write_json(path, &st)?;
        match self.runner.run(job, trigger, Some(t)) {
            Ok(record) => {
                if record.status != RunStatus::Cancelled {
                    st.finished = true;
                    self.state.write_json(path, &st)?;
                }
                Ok(TickOutcome::Ran(Box::new(record)))
            }
            Err(e) => {
                // Not run (busy, say): the occurrence stays unclaimed.
                self.state.write_json(path, &previous)?;
                Ok(TickOutcome::Error(e.to_string()))
            }
        }
    }

    /// When the next pass has something to do: the earliest next
    /// occurrence of any job after `now` (`None`: no job has one).
    pub fn next_wake(&self, now: Timestamp) -> Option<Timestamp> {
        let names = self.state.job_names().ok()?;
        names
            .iter()
            .filter_map(|n| self.state.job(n).and_then(|d| d.resolve()).ok())
            .filter_map(|j| j.schedule.next_after(&j.zone, now))
            .min()
    }

    /// Runs until `cancel` fires: every job whose turn it is starts on a
    /// thread of its own (jobs run side by side; a job never overlaps
    /// itself), then the daemon sleeps until the next occurrence of any
    /// job, a job's end or `poll` (jobs added or changed are seen within
    /// `poll`). `on_pass` sees each job's outcome as it ends. On `cancel`
    /// no job starts any more and the running ones are waited for (they
    /// stop at their next checkpoint).
    pub fn run(
        &self,
        poll: Duration,
        cancel: &CancelToken,
        on_pass: &mut dyn FnMut(&PassOutcomes),
    ) {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<(String, Option<TickOutcome>)>();
        let mut running = std::collections::HashSet::new();
        std::thread::scope(|scope| {
            loop {
                if !cancel.is_cancelled() && !self.runner.is_cancelled() {
                    let now = Timestamp::now();
                    match self.state.job_names() {
                        Ok(names) => {
                            for name in names {
                                if running.contains(&name) {
                                    continue;
                                }
                                running.insert(name.clone());
                                let done = Done {
                                    tx: done_tx.clone(),
                                    name: Some(name),
                                    outcome: None,
                                };
                                scope.spawn(move || {
                                    let mut done = done;
                                    let name = done.name.clone().unwrap_or_default();
                                    // A panicking run is this job's error,
                                    // not the daemon's end.
                                    let run =
                                        std::panic::AssertUnwindSafe(|| self.tick_job(&name, now));
                                    done.outcome = match std::panic::catch_unwind(run) {
                                        Ok(o) => o,
                                        Err(_) => Some(TickOutcome::Error(
                                            "the job's run panicked".into(),
                                        )),
                                    };
                                    // `done` reports when dropped.
                                });
                            }
                        }
                        Err(e) => {
                            on_pass(&vec![(String::new(), TickOutcome::Error(e.to_string()))])
                        }
                    }
                }
                let now = Timestamp::now();
                let wait = self
                    .next_wake(now)
                    .and_then(|t| Duration::try_from(t.duration_since(now)).ok())
                    .map_or(poll, |d| d.min(poll));
                let end = std::time::Instant::now() + wait;
                // Sleep until then, a job's end or the cancel.
                loop {
                    let left = end.saturating_duration_since(std::time::Instant::now());
                    let stopping = cancel.is_cancelled() || self.runner.is_cancelled();
                    if stopping && running.is_empty() {
                        return;
                    }
                    if left.is_zero() && !stopping {
                        break;
                    }
                    let slice = if stopping {
                        Duration::from_millis(100)
                    } else {
                        left.clamp(Duration::from_millis(1), Duration::from_millis(100))
                    };
                    if let Ok((name, outcome)) = done_rx.recv_timeout(slice) {
                        running.remove(&name);
                        if let Some(o) = outcome {
                            on_pass(&vec![(name, o)]);
                        }
                        // A job ended: others may be due now.
                        if !stopping {
                            break;
                        }
                    }
                }
            }
        });
    }
}
