//! Whole job runs on the fake platform: definitions read from TOML, VMs
//! selected, capacity-checked, scripted, backed up within the limits,
//! retried after network-type failures, recorded with their logs, events
//! sent; restore jobs restore bit-identical; the pool's retention policy
//! applied after a backup.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cairn_engine::jobs::fake::FakePlatform;
use cairn_engine::jobs::{
    EventKind, Job, JobDefinition, JobEnvironment, JobRunner, MemoryNotifier, ResourceLock,
    RunStatus, StateDir, Trigger, VmStatus,
};
use cairn_engine::sample::SampleRng;
use cairn_engine::{CancelToken, DynPool, Error, Platform, Repository, RetentionPolicy};

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; len];
    SampleRng::new(seed).fill(&mut b);
    b
}

struct Env {
    platform: Arc<FakePlatform>,
    pool: DynPool,
}

impl JobEnvironment for Env {
    fn platform(&self, job: &Job, _: &CancelToken) -> cairn_engine::Result<Arc<dyn Platform>> {
        assert_eq!(job.definition.platform, "fake:");
        Ok(self.platform.clone())
    }
    fn pool(&self, job: &Job) -> cairn_engine::Result<DynPool> {
        if job.definition.pool == "missing" {
            return Err(Error::InvalidArgument("pool missing is not there".into()));
        }
        Ok(self.pool.clone())
    }
}

fn env() -> Env {
    let platform = FakePlatform::new();
    for (i, host) in ["cvk1", "cvk1", "cvk2"].iter().enumerate() {
        let store = if i == 2 { "small" } else { "pool" };
        platform.add_vm(
            &format!("web{i}"),
            host,
            store,
            vec![
                ("vda", bytes(1 << 20, i as u64)),
                ("vdb", bytes(300 << 10, 10 + i as u64)),
            ],
        );
    }
    platform.add_vm("db", "cvk2", "pool", vec![("vda", bytes(1 << 19, 99))]);
    // cvk2's "small": 30 GiB free of 1 TiB.
    platform.set_space("cvk2", "small", 1 << 40, 30 << 30);
    let pool: DynPool = Arc::new(cairn_pools::MemoryPool::new());
    Repository::create(pool.clone()).unwrap();
    Env {
        platform: Arc::new(platform),
        pool,
    }
}

fn job(extra_top: &str, tables: &str) -> cairn_engine::jobs::Job {
    JobDefinition::from_toml(
        &format!(
            "name = \"nightly\"\nkind = \"backup\"\nplatform = \"fake:\"\npool = \"mem\"\n{extra_top}\n\
             [select]\nkeywords = [\"web\"]\n[retries]\ninterval = \"0s\"\n{tables}"
        ),
        "nightly.toml",
    )
    .unwrap()
    .resolve()
    .unwrap()
}

#[test]
fn a_backup_job_runs_scripts_skips_full_datastores_and_records_everything() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path().join("state"));
    let out = dir.path().join("scripts.txt");
    let notes = MemoryNotifier::default();
    let job = job(
        "",
        &format!(
            "[scripts]\npre = \"echo pre $CAIRN_JOB $CAIRN_VM $CAIRN_HOST >> {out}\"\n\
             post = \"echo post $CAIRN_VM $CAIRN_RESULT $CAIRN_SNAPSHOT >> {out}; echo said post\"\n",
            out = out.display()
        ),
    );
    let runner = JobRunner::new(&state, &env, &notes);
    let rec = runner.run(&job, Trigger::Manual, None).unwrap();
    assert_eq!(rec.status, RunStatus::Partial, "{rec:?}");
    let by_vm = |name: &str| rec.vms.iter().find(|v| v.vm == name).unwrap().clone();
    for name in ["web0", "web1"] {
        let v = by_vm(name);
        assert_eq!(v.status, VmStatus::Succeeded, "{v:?}");
        assert_eq!(v.bytes_logical, (1 << 20) + (300 << 10));
        assert_eq!(v.attempts, 1);
        assert!(v.bytes_new > 0);
    }
    let skipped = by_vm("web2");
    assert_eq!(skipped.status, VmStatus::Skipped);
    assert!(
        skipped
            .error
            .as_deref()
            .unwrap()
            .contains("datastore small on host cvk2"),
        "{skipped:?}"
    );
    assert!(rec.vms.iter().all(|v| v.vm != "db"), "db is not selected");
    assert_eq!(rec.bytes_logical, 2 * ((1 << 20) + (300 << 10)));
    // Scripts: pre for the two backed up, post for all three.
    let text = std::fs::read_to_string(&out).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    assert_eq!(lines.len(), 5, "{text}");
    assert_eq!(lines[3], "pre nightly web0 cvk1");
    assert_eq!(lines[4], "pre nightly web1 cvk1");
    assert!(
        lines[0].starts_with("post web0 succeeded ") && lines[0].len() > 30,
        "{text}"
    );
    assert_eq!(lines[2], "post web2 skipped");
    assert_eq!(env.platform.snapshots_taken.load(Ordering::SeqCst), 2);
    assert_eq!(env.platform.snapshots_released.load(Ordering::SeqCst), 2);
    // The record is on disk, with a log that says what happened.
    let runs = state.runs("nightly").unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0], rec);
    let log = std::fs::read_to_string(state.log_path("nightly", &rec.run)).unwrap();
    for want in [
        "3 VM(s) selected: web0, web1, web2",
        "post script| said post",
        "event vm-skipped: VM web2: not backed up: datastore small",
        "event job-partial: 2 of 3 VM(s) done, 1 skipped",
        "run ended: partial",
    ] {
        assert!(log.contains(want), "{want:?} not in\n{log}");
    }
    let kinds: Vec<EventKind> = notes.events().iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::VmSkipped, EventKind::JobPartial]);
    assert_eq!(notes.events()[0].vm.as_deref(), Some("web2"));

    // The snapshots restore bit-identical through a restore job.
    let restore = JobDefinition::from_toml(
        "name = \"back\"\nkind = \"restore\"\nplatform = \"fake:\"\npool = \"mem\"\n\
         [select]\nvms = [\"web1\", \"db\"]\n",
        "back.toml",
    )
    .unwrap()
    .resolve()
    .unwrap();
    let rec = runner.run(&restore, Trigger::Manual, None).unwrap();
    assert_eq!(rec.status, RunStatus::Partial, "{rec:?}");
    let db = rec.vms.iter().find(|v| v.vm == "db").unwrap();
    assert_eq!(db.status, VmStatus::Skipped);
    assert!(db
        .error
        .as_deref()
        .unwrap()
        .contains("no snapshot \"latest\" of VM db"));
    assert_eq!(
        env.platform.restored("cvk1/web1", "vda").unwrap(),
        bytes(1 << 20, 1)
    );
    assert_eq!(
        env.platform.restored("cvk1/web1", "vdb").unwrap(),
        bytes(300 << 10, 11)
    );
}

#[test]
fn network_failures_are_retried_and_other_failures_are_not() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let notes = MemoryNotifier::default();
    let runner = JobRunner::new(&state, &env, &notes);
    let job_with = |retries: u32| {
        JobDefinition::from_toml(
            &format!(
                "name = \"r\"\nkind = \"backup\"\nplatform = \"fake:\"\npool = \"mem\"\n\
                 [select]\nvms = [\"web0\"]\n[retries]\ncount = {retries}\ninterval = \"0s\"\n"
            ),
            "r.toml",
        )
        .unwrap()
        .resolve()
        .unwrap()
    };
    // Two dropped connections, two retries: the third attempt succeeds.
    env.platform.fail_snapshots(&[true, true]);
    let rec = runner.run(&job_with(2), Trigger::Manual, None).unwrap();
    assert_eq!(rec.status, RunStatus::Succeeded, "{rec:?}");
    assert_eq!(rec.vms[0].attempts, 3);
    let log = std::fs::read_to_string(state.log_path("r", &rec.run)).unwrap();
    assert!(log.contains("VM web0: attempt 2 failed"), "{log}");
    assert!(log.contains("connection reset"), "{log}");
    // Two dropped connections, one retry: failed, and said so.
    env.platform.fail_snapshots(&[true, true]);
    let rec = runner.run(&job_with(1), Trigger::Manual, None).unwrap();
    assert_eq!(rec.status, RunStatus::Failed);
    assert_eq!(rec.vms[0].status, VmStatus::Failed);
    assert_eq!(rec.vms[0].attempts, 2);
    // A refusal is not retried however many retries are allowed.
    env.platform.fail_snapshots(&[false]);
    let rec = runner.run(&job_with(10), Trigger::Manual, None).unwrap();
    assert_eq!(rec.status, RunStatus::Failed);
    assert_eq!(rec.vms[0].attempts, 1);
    assert!(rec.vms[0]
        .error
        .as_deref()
        .unwrap()
        .contains("refuses snapshots"));
    let kinds: Vec<EventKind> = notes.events().iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::VmFailed,
            EventKind::JobFailed,
            EventKind::VmFailed,
            EventKind::JobFailed
        ]
    );
    assert!(
        notes.events()[0].message.contains("after 2 attempts"),
        "{:?}",
        notes.events()[0]
    );
    assert_eq!(state.runs("r").unwrap().len(), 3);
}

#[test]
fn a_precondition_that_says_no_keeps_the_job_idle() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let notes = MemoryNotifier::default();
    let runner = JobRunner::new(&state, &env, &notes);
    let job = job("", "[scripts]\nprecondition = \"echo not today; exit 1\"\n");
    let rec = runner.run(&job, Trigger::Schedule, None).unwrap();
    assert_eq!(rec.status, RunStatus::Skipped);
    assert!(rec.vms.is_empty());
    assert!(
        rec.errors[0].contains("exited with code 1"),
        "{:?}",
        rec.errors
    );
    assert_eq!(env.platform.snapshots_taken.load(Ordering::SeqCst), 0);
    assert_eq!(notes.events()[0].kind, EventKind::PreconditionFailed);
    let log = std::fs::read_to_string(state.log_path("nightly", &rec.run)).unwrap();
    assert!(log.contains("precondition script| not today"), "{log}");
    // A pool that cannot be opened fails the run, recorded.
    let mut bad = job.definition.clone();
    bad.pool = "missing".into();
    bad.scripts.precondition = None;
    let rec = runner
        .run(&bad.resolve().unwrap(), Trigger::Manual, None)
        .unwrap();
    assert_eq!(rec.status, RunStatus::Failed);
    assert!(
        rec.errors[0].contains("pool missing is not there"),
        "{:?}",
        rec.errors
    );
}

#[test]
fn one_run_of_a_job_at_a_time_and_cancelled_runs_say_so() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let notes = MemoryNotifier::default();
    let job = job("", "");
    let held = ResourceLock::acquire(dir.path(), "job:nightly", "another").unwrap();
    let e = JobRunner::new(&state, &env, &notes)
        .run(&job, Trigger::Manual, None)
        .unwrap_err();
    assert!(matches!(e, Error::PoolBusy(_)), "{e}");
    assert!(state.runs("nightly").unwrap().is_empty());
    drop(held);
    // A VM another job works on is busy: a network-type failure, retried,
    // then failed.
    let vm_lock = ResourceLock::acquire(dir.path(), "vm:cvk1/web0", "another").unwrap();
    let rec = JobRunner::new(&state, &env, &notes)
        .run(&job, Trigger::Manual, None)
        .unwrap();
    let web0 = rec.vms.iter().find(|v| v.vm == "web0").unwrap();
    assert_eq!(web0.status, VmStatus::Failed);
    assert_eq!(web0.attempts, 4, "3 retries by default");
    assert!(web0
        .error
        .as_deref()
        .unwrap()
        .contains("in use by another job"));
    drop(vm_lock);
    let cancel = CancelToken::new();
    cancel.cancel();
    let rec = JobRunner::new(&state, &env, &notes)
        .with_cancel(cancel)
        .run(&job, Trigger::Manual, None)
        .unwrap();
    assert_eq!(rec.status, RunStatus::Cancelled);
}

#[test]
fn retention_is_applied_after_a_backup_and_incrementals_name_their_parent() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let notes = MemoryNotifier::default();
    let repo = Repository::open(env.pool.clone()).unwrap();
    repo.set_retention_policy(Some(&RetentionPolicy::new().with_keep_last(2).unwrap()))
        .unwrap();
    let job = JobDefinition::from_toml(
        "name = \"k\"\nkind = \"backup\"\nplatform = \"fake:\"\npool = \"mem\"\ncompression = \"none\"\n\
         [select]\nvms = [\"db\"]\n",
        "k.toml",
    )
    .unwrap()
    .resolve()
    .unwrap();
    let runner = JobRunner::new(&state, &env, &notes);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let rec = runner.run(&job, Trigger::Manual, None).unwrap();
        assert_eq!(rec.status, RunStatus::Succeeded);
        ids.push(rec.vms[0].snapshot.clone().unwrap());
    }
    repo.refresh().unwrap();
    let left: Vec<String> = repo
        .snapshot_ids()
        .unwrap()
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(!left.contains(&ids[0]));
    let third = repo
        .load_snapshot(&cairn_engine::SnapshotId::from_hex(&ids[2]).unwrap())
        .unwrap();
    assert_eq!(third.parent.map(|p| p.to_string()).as_ref(), Some(&ids[1]));
    assert_eq!(third.properties.get("job").map(String::as_str), Some("k"));
    assert_eq!(third.compression, cairn_engine::Compression::None);
    // Full mode records no parent.
    let mut full = job.definition.clone();
    full.mode = cairn_engine::jobs::definition::BackupMode::Full;
    let rec = runner
        .run(&full.resolve().unwrap(), Trigger::Manual, None)
        .unwrap();
    let snap = repo
        .load_snapshot(
            &cairn_engine::SnapshotId::from_hex(rec.vms[0].snapshot.as_deref().unwrap()).unwrap(),
        )
        .unwrap();
    assert_eq!(snap.parent, None);
    let log = std::fs::read_to_string(state.log_path("k", &rec.run)).unwrap();
    assert!(log.contains("snapshot(s) removed"), "{log}");
}

/// Stopped while the pre-condition runs: the run is cancelled (the daemon
/// resumes it), not skipped, and no pre-condition event goes out.
#[test]
fn a_run_stopped_during_its_precondition_is_cancelled_not_skipped() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let notes = MemoryNotifier::default();
    let job = job("", "[scripts]\nprecondition = \"sleep 20\"\n");
    let cancel = CancelToken::new();
    let stopper = cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        stopper.cancel();
    });
    let rec = JobRunner::new(&state, &env, &notes)
        .with_cancel(cancel)
        .run(&job, Trigger::Schedule, None)
        .unwrap();
    t.join().unwrap();
    assert_eq!(rec.status, RunStatus::Cancelled, "{rec:?}");
    assert!(notes.events().is_empty(), "{:?}", notes.events());
    assert_eq!(env.platform.snapshots_taken.load(Ordering::SeqCst), 0);
}

/// A job with changed-block tracking: the first run starts a bitmap per
/// CBT disk, the next reads only what the guest wrote since (a disk
/// without CBT is read whole), the snapshot restores bit-identical; a
/// bitmap lost at a power cycle falls back to a full read, or skips the
/// VM with an alert, or silently — as the job's `cbt.missing` says.
#[test]
fn cbt_jobs_read_only_what_changed_and_follow_the_missing_policy() {
    let env = env();
    for (vm, device) in [
        ("cvk1/web0", "vda"),
        ("cvk1/web0", "vdb"),
        ("cvk1/web1", "vda"),
    ] {
        env.platform.enable_cbt(vm, device);
    }
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let notes = MemoryNotifier::default();
    let runner = JobRunner::new(&state, &env, &notes);
    let cbt_job = |missing: &str| {
        JobDefinition::from_toml(
            &format!(
                "name = \"cbt.job\"\nkind = \"backup\"\nplatform = \"fake:\"\npool = \"mem\"\n\
                 [select]\nvms = [\"web0\", \"web1\"]\n[cbt]\nenabled = true\nmissing = \"{missing}\"\n"
            ),
            "cbt.toml",
        )
        .unwrap()
        .resolve()
        .unwrap()
    };
    let (vda, vdb) = (1u64 << 20, 300u64 << 10);
    let vm = |rec: &cairn_engine::jobs::RunRecord, name: &str| {
        rec.vms.iter().find(|v| v.vm == name).unwrap().clone()
    };
    // First run: no parent, every disk read whole; bitmaps start.
    let first = runner.run(&cbt_job("full"), Trigger::Manual, None).unwrap();
    assert_eq!(first.status, RunStatus::Succeeded, "{first:?}");
    assert_eq!(vm(&first, "web0").bytes_read, vda + vdb);
    let started = env.platform.bitmaps("cvk1/web0", "vda");
    assert_eq!(started.len(), 1, "{started:?}");
    assert!(started[0].starts_with("cbt_job."), "{started:?}");
    assert!(env.platform.bitmaps("cvk1/web1", "vdb").is_empty());
    // The guests write; the next run reads one 64 KiB chunk per write.
    env.platform.write("cvk1/web0", "vda", 70_000, b"changed!");
    env.platform.write("cvk1/web0", "vdb", 131_072, &[7u8; 100]);
    env.platform.write("cvk1/web1", "vda", 500_000, b"x");
    let second = runner.run(&cbt_job("full"), Trigger::Manual, None).unwrap();
    assert_eq!(second.status, RunStatus::Succeeded, "{second:?}");
    let web0 = vm(&second, "web0");
    assert_eq!(web0.bytes_read, 2 * 65536, "{web0:?}");
    assert_eq!(web0.mode.as_deref(), Some("cbt"));
    // web1's vdb has no CBT: read whole beside vda's one chunk.
    assert_eq!(vm(&second, "web1").bytes_read, 65536 + vdb);
    // The consumed bitmap is gone, the new one records.
    let now = env.platform.bitmaps("cvk1/web0", "vda");
    assert_eq!(now.len(), 1);
    assert_ne!(now, started);
    // Bit-identical to the disks as they are now.
    let repo = Repository::open(env.pool.clone()).unwrap();
    let id = cairn_engine::SnapshotId::from_hex(web0.snapshot.as_deref().unwrap()).unwrap();
    let out = dir.path().join("restored");
    repo.restore_to_dir(&id, &out, &cairn_engine::RestoreOptions::default())
        .unwrap();
    let mut want_vda = bytes(1 << 20, 0);
    want_vda[70_000..70_008].copy_from_slice(b"changed!");
    let mut want_vdb = bytes(300 << 10, 10);
    want_vdb[131_072..131_172].fill(7);
    assert!(std::fs::read(out.join("vda")).unwrap() == want_vda);
    assert!(std::fs::read(out.join("vdb")).unwrap() == want_vdb);

    // A power cycle loses web0's bitmaps. Policy full: read whole.
    env.platform.lose_cbt("cvk1/web0");
    let third = runner.run(&cbt_job("full"), Trigger::Manual, None).unwrap();
    assert_eq!(third.status, RunStatus::Succeeded, "{third:?}");
    assert_eq!(vm(&third, "web0").bytes_read, vda + vdb);
    assert_eq!(vm(&third, "web1").bytes_read, vdb, "web1 kept its bitmap");
    let log = std::fs::read_to_string(state.log_path("cbt.job", &third.run)).unwrap();
    assert!(
        log.contains("disk vda: changed-block tracking not used") && log.contains("missing"),
        "{log}"
    );
    assert!(notes.events().is_empty(), "{:?}", notes.events());

    // Policy skip-alert: web0 is left out with an event; the bitmap the
    // skipped run started is removed again.
    env.platform.lose_cbt("cvk1/web0");
    let fourth = runner
        .run(&cbt_job("skip-alert"), Trigger::Manual, None)
        .unwrap();
    assert_eq!(fourth.status, RunStatus::Partial, "{fourth:?}");
    let skipped = vm(&fourth, "web0");
    assert_eq!(skipped.status, VmStatus::Skipped);
    assert!(
        skipped
            .error
            .as_deref()
            .unwrap()
            .contains("changed-block tracking"),
        "{skipped:?}"
    );
    assert!(env.platform.bitmaps("cvk1/web0", "vda").is_empty());
    let events = notes.events();
    assert!(
        events.iter().any(|e| e.kind == EventKind::VmSkipped
            && e.vm.as_deref() == Some("web0")
            && e.message.contains("changed-block tracking")),
        "{events:?}"
    );
    // Policy skip: left out without an event.
    let before = notes.events().len();
    let fifth = runner.run(&cbt_job("skip"), Trigger::Manual, None).unwrap();
    assert_eq!(vm(&fifth, "web0").status, VmStatus::Skipped);
    let new_events: Vec<_> = notes.events().into_iter().skip(before).collect();
    assert!(
        new_events.iter().all(|e| e.kind != EventKind::VmSkipped),
        "{new_events:?}"
    );
}

#[test]
fn cbt_settings_are_checked() {
    let def = |cbt: &str| {
        JobDefinition::from_toml(
            &format!(
                "name = \"c\"\nkind = \"backup\"\nplatform = \"fake:\"\npool = \"mem\"\n\
                 [select]\nvms = [\"web0\"]\n[cbt]\n{cbt}\n"
            ),
            "c.toml",
        )
        .and_then(|d| d.resolve())
    };
    let err = |cbt: &str| def(cbt).unwrap_err().to_string();
    assert!(err("enabled = true\nchain = \"a.b\"").contains("cbt.chain"));
    assert!(err("enabled = true\nspot_check = 65")
        .contains("cbt.spot_check: 65 is out of range (0–64)"));
    assert!(err("enabled = true\nmissing = \"maybe\"").contains("missing"));
    assert!(err("enable = true").contains("unknown field"));
    assert_eq!(
        def("enabled = true").unwrap().cbt_chain.as_deref(),
        Some("c")
    );
    assert_eq!(def("").unwrap().cbt_chain, None);
}
