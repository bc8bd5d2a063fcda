//! The daemon's passes at chosen times: a job runs once per occurrence,
//! never twice across restarts; an occurrence whose run never ended is
//! resumed once; runs missed while no daemon ran are reported and, when
//! the job says so, run once; immediate jobs run once; one daemon per
//! state directory.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::sync::Arc;

use cairn_engine::jobs::fake::FakePlatform;
use cairn_engine::jobs::{
    Daemon, EventKind, Job, JobDefinition, JobEnvironment, JobRunner, MemoryNotifier, RunStatus,
    ScheduleState, StateDir, TickOutcome, Trigger,
};
use cairn_engine::{DynPool, Error, Platform, Repository};
use jiff::Timestamp;

struct Env {
    platform: Arc<FakePlatform>,
    pool: DynPool,
}

impl JobEnvironment for Env {
    fn platform(
        &self,
        _: &Job,
        _: &cairn_engine::CancelToken,
    ) -> cairn_engine::Result<Arc<dyn Platform>> {
        Ok(self.platform.clone())
    }
    fn pool(&self, _: &Job) -> cairn_engine::Result<DynPool> {
        Ok(self.pool.clone())
    }
}

fn env() -> Env {
    let platform = FakePlatform::new();
    platform.add_vm("web", "cvk1", "pool", vec![("vda", vec![7u8; 256 << 10])]);
    let pool: DynPool = Arc::new(cairn_pools::MemoryPool::new());
    Repository::create(pool.clone()).unwrap();
    Env {
        platform: Arc::new(platform),
        pool,
    }
}

fn add(state: &StateDir, name: &str, schedule: &str, run_missed: bool) {
    let def = JobDefinition::from_toml(
        &format!(
            "name = \"{name}\"\nkind = \"backup\"\nplatform = \"fake:\"\npool = \"mem\"\n\
             schedule = \"{schedule}\"\ntimezone = \"UTC\"\nrun_missed = {run_missed}\n\
             [select]\nvms = [\"web\"]\n"
        ),
        "t",
    )
    .unwrap();
    state.add_job(&def, true).unwrap();
}

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

/// The (job, trigger, scheduled) of the runs a pass made.
fn ran(outcomes: &[(String, TickOutcome)]) -> Vec<(String, Trigger, String)> {
    outcomes
        .iter()
        .filter_map(|(job, o)| match o {
            TickOutcome::Ran(r) => Some((
                job.clone(),
                r.trigger,
                r.scheduled.clone().unwrap_or_default(),
            )),
            TickOutcome::Error(e) => panic!("{job}: {e}"),
            TickOutcome::Missed(_) => None,
            _ => None,
        })
        .collect()
}

#[test]
fn each_occurrence_runs_once_across_restarts() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let notes = MemoryNotifier::default();
    add(&state, "nightly", "daily 02:30", false);
    add(&state, "now", "immediate", false);
    let daemon = Daemon::new(&state, JobRunner::new(&state, &env, &notes)).unwrap();
    // A second daemon on the same state directory is refused.
    let e = Daemon::new(&state, JobRunner::new(&state, &env, &notes)).unwrap_err();
    assert!(matches!(e, Error::PoolBusy(_)), "{e}");

    let first = daemon.tick(t("2026-01-01T01:00:00Z"));
    assert_eq!(
        ran(&first),
        [(
            "now".to_string(),
            Trigger::Schedule,
            "2026-01-01T01:00:00Z".to_string()
        )]
    );
    assert!(ran(&daemon.tick(t("2026-01-01T02:00:00Z"))).is_empty());
    assert_eq!(
        daemon.next_wake(t("2026-01-01T02:00:00Z")),
        Some(t("2026-01-01T02:30:00Z"))
    );
    let due = daemon.tick(t("2026-01-01T02:31:00Z"));
    assert_eq!(
        ran(&due),
        [(
            "nightly".to_string(),
            Trigger::Schedule,
            "2026-01-01T02:30:00Z".to_string()
        )]
    );
    assert!(ran(&daemon.tick(t("2026-01-01T02:32:00Z"))).is_empty());
    // A restart: nothing runs again.
    drop(daemon);
    let daemon = Daemon::new(&state, JobRunner::new(&state, &env, &notes)).unwrap();
    assert!(ran(&daemon.tick(t("2026-01-01T02:33:00Z"))).is_empty());
    assert_eq!(state.runs("nightly").unwrap().len(), 1);
    assert_eq!(state.runs("now").unwrap().len(), 1);
    assert!(notes.events().is_empty(), "{:?}", notes.events());

    // Killed mid-run: claimed, not finished, no ended record → resumed once.
    let path = state.schedule_path("nightly");
    let mut st: ScheduleState = state.read_json(&path).unwrap().unwrap();
    st.claimed = Some("2026-01-02T02:30:00Z".into());
    st.finished = false;
    state.write_json(&path, &st).unwrap();
    let resumed = daemon.tick(t("2026-01-02T02:40:00Z"));
    assert_eq!(
        ran(&resumed),
        [(
            "nightly".to_string(),
            Trigger::Resumed,
            "2026-01-02T02:30:00Z".to_string()
        )]
    );
    assert!(ran(&daemon.tick(t("2026-01-02T02:41:00Z"))).is_empty());
    // Killed after its record was written, before the mark: not run again.
    let mut st: ScheduleState = state.read_json(&path).unwrap().unwrap();
    assert!(st.finished);
    st.finished = false;
    state.write_json(&path, &st).unwrap();
    assert!(ran(&daemon.tick(t("2026-01-02T02:42:00Z"))).is_empty());
    let st: ScheduleState = state.read_json(&path).unwrap().unwrap();
    assert!(st.finished);
    let runs = state.runs("nightly").unwrap();
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| r.status == RunStatus::Succeeded));

    // An immediate job run by hand before the daemon saw it is not run again.
    add(&state, "by-hand", "immediate", false);
    let job = state.job("by-hand").unwrap().resolve().unwrap();
    let by_hand = JobRunner::new(&state, &env, &notes)
        .run(&job, Trigger::Manual, None)
        .unwrap();
    assert_eq!(by_hand.status, RunStatus::Succeeded);
    assert!(ran(&daemon.tick(t("2026-01-02T03:00:00Z"))).is_empty());
    assert_eq!(state.runs("by-hand").unwrap().len(), 1);
    // Removed (history kept) and added again: it runs once more.
    state.remove_job("by-hand", false).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    add(&state, "by-hand", "immediate", false);
    assert_eq!(ran(&daemon.tick(t("2026-01-02T03:10:00Z"))).len(), 1);
    assert!(ran(&daemon.tick(t("2026-01-02T03:11:00Z"))).is_empty());
    assert_eq!(state.runs("by-hand").unwrap().len(), 2);
}

#[test]
fn missed_runs_are_reported_and_run_once_when_asked() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let notes = MemoryNotifier::default();
    add(&state, "skip", "daily 02:30", false);
    add(&state, "catch", "daily 02:30", true);
    let daemon = Daemon::new(&state, JobRunner::new(&state, &env, &notes)).unwrap();
    assert!(ran(&daemon.tick(t("2026-01-01T00:00:00Z"))).is_empty());
    drop(daemon);
    // Down from before 01-01 02:30 until 01-04 12:00: 4 runs missed.
    let daemon = Daemon::new(&state, JobRunner::new(&state, &env, &notes)).unwrap();
    let outcomes = daemon.tick(t("2026-01-04T12:00:00Z"));
    assert_eq!(
        ran(&outcomes),
        [(
            "catch".to_string(),
            Trigger::Missed,
            "2026-01-04T02:30:00Z".to_string()
        )]
    );
    let skipped = outcomes.iter().find(|(j, _)| j == "skip").unwrap();
    assert!(
        matches!(skipped.1, TickOutcome::Missed(4)),
        "{:?}",
        skipped.1
    );
    let missed: Vec<_> = notes
        .events()
        .into_iter()
        .filter(|e| e.kind == EventKind::RunsMissed)
        .collect();
    assert_eq!(missed.len(), 2);
    assert!(
        missed[0].message.starts_with(
            "4 scheduled run(s) missed between 2026-01-01T02:30:00Z and 2026-01-04T02:30:00Z"
        ),
        "{}",
        missed[0].message
    );
    // Neither runs again for those; both run at the next occurrence.
    assert!(ran(&daemon.tick(t("2026-01-04T12:01:00Z"))).is_empty());
    let next = ran(&daemon.tick(t("2026-01-05T02:30:10Z")));
    assert_eq!(next.len(), 2, "{next:?}");
    assert!(next
        .iter()
        .all(|(_, trig, at)| *trig == Trigger::Schedule && at == "2026-01-05T02:30:00Z"));
    assert_eq!(state.runs("skip").unwrap().len(), 1);
    assert_eq!(state.runs("catch").unwrap().len(), 2);
    // A changed schedule starts afresh: nothing before it is missed.
    add(&state, "skip", "daily 03:30", false);
    drop(daemon);
    let daemon = Daemon::new(&state, JobRunner::new(&state, &env, &notes)).unwrap();
    let r = ran(&daemon.tick(t("2026-01-09T00:00:00Z")));
    assert_eq!(
        r,
        [(
            "catch".to_string(),
            Trigger::Missed,
            "2026-01-08T02:30:00Z".to_string()
        )]
    );
    // While this daemon runs, a late occurrence is due, not missed.
    let mut r = ran(&daemon.tick(t("2026-01-09T03:31:00Z")));
    r.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        r,
        [
            (
                "catch".to_string(),
                Trigger::Schedule,
                "2026-01-09T02:30:00Z".to_string()
            ),
            (
                "skip".to_string(),
                Trigger::Schedule,
                "2026-01-09T03:30:00Z".to_string()
            )
        ]
    );

    // A long run of another job makes an occurrence late, not missed.
    let late = ran(&daemon.tick(t("2026-01-10T05:00:00Z")));
    assert_eq!(late.len(), 2, "{late:?}");
    assert!(
        late.iter().all(|(_, trig, _)| *trig == Trigger::Schedule),
        "{late:?}"
    );
}

/// Weeks down with a half-hourly job: more than a thousand runs missed are
/// reported once, and the catch-up run stands for the latest of them —
/// run once, not again at the next pass.
#[test]
fn thousands_of_missed_runs_make_one_report_and_one_run() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let notes = MemoryNotifier::default();
    add(&state, "often", "hourly every 30m", true);
    let daemon = Daemon::new(&state, JobRunner::new(&state, &env, &notes)).unwrap();
    assert!(ran(&daemon.tick(t("2026-01-01T00:10:00Z"))).is_empty());
    drop(daemon);
    let daemon = Daemon::new(&state, JobRunner::new(&state, &env, &notes)).unwrap();
    // 30 days later (1 440 occurrences), at 00:20: the latest missed one
    // (before the 5-minute grace) is 00:00.
    let r = ran(&daemon.tick(t("2026-01-31T00:20:00Z")));
    assert_eq!(
        r,
        [(
            "often".to_string(),
            Trigger::Missed,
            "2026-01-31T00:00:00Z".to_string()
        )]
    );
    assert!(ran(&daemon.tick(t("2026-01-31T00:21:00Z"))).is_empty());
    let reports: Vec<_> = notes
        .events()
        .into_iter()
        .filter(|e| e.kind == EventKind::RunsMissed)
        .collect();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(
        reports[0]
            .message
            .starts_with("at least 1000 scheduled run(s) missed since 2026-01-01T00:30:00Z"),
        "{}",
        reports[0].message
    );
    assert_eq!(state.runs("often").unwrap().len(), 1);
}

/// A run whose record cannot be completed on disk (here its file became a
/// directory during the run) still ran: the daemon marks the occurrence
/// finished and never runs it again, and the record it got says why.
#[test]
fn a_run_whose_record_cannot_be_saved_is_not_run_again() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let notes = MemoryNotifier::default();
    let def = JobDefinition::from_toml(
        &format!(
            "name = \"broken\"\nkind = \"backup\"\nplatform = \"fake:\"\npool = \"mem\"\n\
             schedule = \"daily 02:30\"\ntimezone = \"UTC\"\n[select]\nvms = [\"web\"]\n\
             [scripts]\npost = \"r={}/runs/$CAIRN_JOB/$CAIRN_RUN.json; rm -f $r; mkdir -p $r/x\"\n",
            dir.path().display()
        ),
        "t",
    )
    .unwrap();
    state.add_job(&def, true).unwrap();
    let daemon = Daemon::new(&state, JobRunner::new(&state, &env, &notes)).unwrap();
    assert!(ran(&daemon.tick(t("2026-01-01T01:00:00Z"))).is_empty());
    let first = daemon.tick(t("2026-01-01T02:31:00Z"));
    let [(_, TickOutcome::Ran(record))] = &first[..] else {
        panic!("{first:?}");
    };
    assert_eq!(record.status, RunStatus::Succeeded);
    assert!(
        record
            .errors
            .iter()
            .any(|e| e.contains("record could not be saved")),
        "{record:?}"
    );
    assert!(ran(&daemon.tick(t("2026-01-01T02:32:00Z"))).is_empty());
    drop(daemon);
    let daemon = Daemon::new(&state, JobRunner::new(&state, &env, &notes)).unwrap();
    assert!(ran(&daemon.tick(t("2026-01-01T02:33:00Z"))).is_empty());
    assert_eq!(
        env.platform
            .snapshots_taken
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

/// An environment with one small VM per name (the platform returned to
/// set faults on) and a fresh memory pool.
fn env_of(vms: &[&str]) -> Env {
    let platform = FakePlatform::new();
    for (i, vm) in vms.iter().enumerate() {
        platform.add_vm(
            vm,
            "cvk1",
            "pool",
            vec![("vda", vec![i as u8 + 1; 64 << 10])],
        );
    }
    let pool: DynPool = Arc::new(cairn_pools::MemoryPool::new());
    Repository::create(pool.clone()).unwrap();
    Env {
        platform: Arc::new(platform),
        pool,
    }
}

/// Adds immediate backup job `name` of VM `name` (no capacity check),
/// with `tables` after.
fn add_immediate(state: &StateDir, name: &str, tables: &str) {
    let def = JobDefinition::from_toml(
        &format!(
            "name = \"{name}\"\nkind = \"backup\"\nplatform = \"fake:\"\npool = \"mem\"\n\
             [select]\nvms = [\"{name}\"]\n[capacity]\nmin_free_percent = 0\nmin_free = \"0\"\n{tables}"
        ),
        "t",
    )
    .unwrap();
    state.add_job(&def, true).unwrap();
}

/// Runs a daemon over `state` until `count` jobs ended; their outcomes as
/// "job: status" or "job: error …", sorted.
fn run_daemon_until(state: &StateDir, env: &Env, count: usize) -> Vec<String> {
    let notes = MemoryNotifier::default();
    let cancel = cairn_engine::CancelToken::new();
    let runner = JobRunner::new(state, env, &notes).with_cancel(cancel.clone());
    let daemon = Daemon::new(state, runner).unwrap();
    let mut seen = Vec::new();
    daemon.run(
        std::time::Duration::from_millis(100),
        &cancel,
        &mut |pass| {
            for (job, o) in pass {
                seen.push(match o {
                    TickOutcome::Ran(r) => format!("{job}: {}", r.status.as_str()),
                    TickOutcome::Error(e) => format!("{job}: error {e}"),
                    _ => format!("{job}: other"),
                });
            }
            if seen.len() >= count {
                cancel.cancel();
            }
        },
    );
    seen.sort();
    seen
}

/// The daemon runs jobs side by side: two immediate jobs whose
/// pre-scripts each wait for the other's to have started both succeed
/// (one after the other, the first would give up after 20 s and skip its
/// VM).
#[test]
fn the_daemon_runs_jobs_side_by_side() {
    let env = env_of(&["a", "b"]);
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path().join("state"));
    for (me, other) in [("a", "b"), ("b", "a")] {
        add_immediate(
            &state,
            me,
            &format!(
                "[scripts]\npre = \"touch {m}/{me}; i=0; while [ ! -e {m}/{other} ]; do \
                 i=$((i+1)); [ $i -gt 200 ] && exit 1; sleep 0.1; done\"\n",
                m = dir.path().display()
            ),
        );
    }
    assert_eq!(
        run_daemon_until(&state, &env, 2),
        ["a: succeeded", "b: succeeded"]
    );
}

/// A job whose run panics (a buggy platform adapter) is that job's error:
/// the daemon goes on running the others and still stops on request.
#[test]
fn a_panicking_job_does_not_stop_the_daemon() {
    let env = env_of(&["ok", "boom"]);
    env.platform.panic_on_snapshot("boom");
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    for vm in ["ok", "boom"] {
        add_immediate(&state, vm, "");
    }
    assert_eq!(
        run_daemon_until(&state, &env, 2),
        ["boom: error the job's run panicked", "ok: succeeded"]
    );
}
