//! Running a job once (spec B1, B7–B9, B13–B18, B20, R7): the
//! pre-condition, the platform and pool opened through the application's
//! [`JobEnvironment`], the VMs selected and run within the job's limits —
//! each one locked, checked for capacity, its pre-script run, snapshotted,
//! backed up (or restored) under the job's rate limit and compression,
//! retried after network-type failures, its post-script run — then the
//! pool's retention policy applied, and everything recorded in the state
//! directory and sent to the notifier.
//!
//! A run holds the lock `job:<name>` (a job never runs twice at once) and,
//! per VM, `vm:<id>` (two jobs never work on one VM at once); a busy VM is
//! a network-type failure, retried like one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;

use crate::cbt::PreparedVm;
use crate::jobs::definition::{BackupMode, Job, JobKind, LogLevel};
use crate::jobs::lock::ResourceLock;
use crate::jobs::notify::{EventKind, JobEvent, Notifier};
use crate::jobs::rate::{Clock, Direction, SystemClock, Throttle, ThrottledPool};
use crate::jobs::script::run_script;
use crate::jobs::state::{RunLog, RunRecord, RunStatus, StateDir, Trigger, VmRecord, VmStatus};
use crate::platform::{CbtOpen, Platform, PlatformSnapshot, VmDisk, VmInfo};
use crate::{
    BackupDisk, BackupOptions, BackupStats, CancelToken, ChunkingParams, DiskInput, DynPool, Error,
    PruneOptions, Repository, RestoreOptions, Result, SnapshotSelector, WrappedPool,
};

/// A VM left out of a run, and whether that raises an alert.
struct Skipped {
    why: String,
    alert: bool,
}

impl Skipped {
    fn alert(why: String) -> Self {
        Skipped { why, alert: true }
    }
}

/// What a job needs from the application running it: its platform and its
/// pool, by the addresses the job names.
pub trait JobEnvironment: Send + Sync {
    /// The platform the job names (`job.definition.platform`), reading
    /// disks with the job's source options (timeout, streams per disk,
    /// reconnect window); waits it makes (a reconnect) end when `cancel`
    /// fires.
    fn platform(&self, job: &Job, cancel: &CancelToken) -> Result<Arc<dyn Platform>>;
    /// The pool the job names (`job.definition.pool`).
    fn pool(&self, job: &Job) -> Result<DynPool>;
    /// Where a backup of `vm` writes within `pool`, when not the pool
    /// itself: a standard pool's backup set of the VM, a tape pool's open
    /// media set. The default: the pool.
    fn backup_pool(&self, job: &Job, vm: &VmInfo, pool: &DynPool) -> Result<Option<DynPool>> {
        let _ = (job, vm, pool);
        Ok(None)
    }
}

/// Runs jobs (see the module docs).
pub struct JobRunner<'a> {
    state: &'a StateDir,
    environment: &'a dyn JobEnvironment,
    notifier: &'a dyn Notifier,
    cancel: CancelToken,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for JobRunner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRunner")
            .field("state", &self.state.root())
            .finish_non_exhaustive()
    }
}

/// One run's context.
struct Run<'r> {
    job: &'r Job,
    log: &'r RunLog,
    platform: Arc<dyn Platform>,
    repo: Repository,
    /// The pool as opened (throttled when the limit is on its side).
    pool: DynPool,
    /// The throttle of the platform's side (disk reads or restore writes).
    throttle: Option<Arc<Throttle>>,
    /// The throttle of the pool's side (backup writes, restore reads).
    pool_throttle: Option<Arc<Throttle>>,
}

impl<'a> JobRunner<'a> {
    /// A runner keeping its records in `state`, opening platforms and pools
    /// through `environment` and sending events to `notifier`.
    pub fn new(
        state: &'a StateDir,
        environment: &'a dyn JobEnvironment,
        notifier: &'a dyn Notifier,
    ) -> Self {
        JobRunner {
            state,
            environment,
            notifier,
            cancel: CancelToken::new(),
            clock: Arc::new(SystemClock),
        }
    }

    /// Stops runs when `cancel` fires: what is stored stays, the run is
    /// recorded as cancelled.
    pub fn with_cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = cancel;
        self
    }

    /// Whether the runner was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The clock of the rate limits (a fake one in tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    fn event(&self, log: &RunLog, kind: EventKind, vm: Option<&str>, message: &str) {
        let record = log.record();
        let level = match kind {
            EventKind::VmSkipped | EventKind::RunsMissed | EventKind::PreconditionFailed => {
                LogLevel::Warn
            }
            _ => LogLevel::Error,
        };
        log.log(level, format!("event {}: {message}", kind.as_str()));
        let event = JobEvent::new(kind, &record.job, &record.run, vm, message.to_string());
        if let Err(why) = self.notifier.notify(&event) {
            log.log(LogLevel::Warn, format!("notifier failed: {why}"));
        }
    }

    /// Reports runs missed while no daemon ran the job (to the notifier;
    /// there is no run to log them in); `more`: there were more than
    /// those counted.
    pub fn report_missed(&self, job: &Job, missed: &[Timestamp], more: bool) {
        if let (Some(first), Some(last)) = (missed.first(), missed.last()) {
            let message = if more {
                format!(
                    "at least {} scheduled run(s) missed since {first}",
                    missed.len()
                )
            } else {
                format!(
                    "{} scheduled run(s) missed between {first} and {last}",
                    missed.len()
                )
            };
            let event = JobEvent::new(EventKind::RunsMissed, job.name(), "", None, message);
            let _ = self.notifier.notify(&event);
        }
    }

    /// Runs `job` now and returns its record. Fails without a record only
    /// when the job is running already (the error names the holder) or its
    /// record cannot be started; a run whose record cannot be completed on
    /// disk still returns it, with that error among its `errors`.
    pub fn run(
        &self,
        job: &Job,
        trigger: Trigger,
        scheduled: Option<Timestamp>,
    ) -> Result<RunRecord> {
        let name = job.name();
        let _lock = ResourceLock::acquire(self.state.root(), &format!("job:{name}"), name)?;
        let log = self.state.start_run(&job.definition, trigger, scheduled)?;
        log.log(
            LogLevel::Info,
            format!(
                "{} job {name}: run {} started ({})",
                job.definition.kind.as_str(),
                log.run_id(),
                trigger.as_str()
            ),
        );
        let status = match self.run_logged(job, &log) {
            Ok(status) => status,
            Err(e) => {
                let cancelled = matches!(e, Error::Cancelled) || self.cancel.is_cancelled();
                log.update(|r| r.errors.push(e.to_string()));
                if cancelled {
                    log.log(LogLevel::Warn, format!("run cancelled: {e}"));
                    RunStatus::Cancelled
                } else {
                    log.log(LogLevel::Error, format!("run failed: {e}"));
                    RunStatus::Failed
                }
            }
        };
        let status = if self.cancel.is_cancelled() && status != RunStatus::Skipped {
            RunStatus::Cancelled
        } else {
            status
        };
        match status {
            RunStatus::Failed => self.event(&log, EventKind::JobFailed, None, &summary(&log)),
            RunStatus::Partial => self.event(&log, EventKind::JobPartial, None, &summary(&log)),
            _ => {}
        }
        log.log(LogLevel::Info, format!("run ended: {}", status.as_str()));
        match log.finish(status) {
            Ok(record) => Ok(record),
            // The run happened: say so (a daemon must not run it again),
            // with why its record on disk is not complete.
            Err(e) => {
                let why = format!("the run's record could not be saved: {e}");
                log.log(LogLevel::Error, why.clone());
                log.update(|r| r.errors.push(why));
                Ok(log.record())
            }
        }
    }

    fn run_logged(&self, job: &Job, log: &RunLog) -> Result<RunStatus> {
        let def = &job.definition;
        if let Some(cmd) = &def.scripts.precondition {
            let outcome = self.script(job, log, "precondition", cmd, &[])?;
            if !outcome.success() {
                let why = format!("pre-condition {cmd:?} {outcome}: the job does not run");
                log.update(|r| r.errors.push(why.clone()));
                self.event(log, EventKind::PreconditionFailed, None, &why);
                return Ok(RunStatus::Skipped);
            }
        }
        self.cancel.check()?;
        let platform = self.with_retries(job, log, "opening the platform", || {
            self.environment.platform(job, &self.cancel)
        })?;
        // A limit on the pool's side wraps the pool itself.
        let throttle = (!job.rate_limit.is_unlimited()).then(|| {
            Arc::new(
                Throttle::new(job.rate_limit.clone(), job.zone.clone(), self.clock.clone())
                    .with_cancel(self.cancel.clone()),
            )
        });
        let pool_side = matches!(
            (def.kind, job.rate_direction),
            (JobKind::Backup, Direction::Writes) | (JobKind::Restore, Direction::Reads)
        );
        let throttled = |pool: DynPool| -> DynPool {
            match (pool_side, &throttle) {
                (true, Some(t)) => Arc::new(WrappedPool(ThrottledPool::new(
                    pool,
                    t.clone(),
                    job.rate_direction,
                ))),
                _ => pool,
            }
        };
        let (pool, repo) = self.with_retries(job, log, "opening the pool", || {
            let pool = self.environment.pool(job)?;
            let repo = Repository::open(throttled(pool.clone()))?;
            Ok((pool, repo))
        })?;
        let inventory = self.with_retries(job, log, "listing the platform's VMs", || {
            platform.list_vms()
        })?;
        let vms = def.select.select(&inventory)?;
        if vms.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "the selection matched none of the platform's {} VMs",
                inventory.len()
            )));
        }
        log.log(
            LogLevel::Info,
            format!(
                "{} VM(s) selected: {}",
                vms.len(),
                vms.iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        let run = Run {
            job,
            log,
            platform,
            repo,
            pool,
            throttle: (!pool_side).then_some(throttle.clone()).flatten(),
            pool_throttle: pool_side.then_some(throttle).flatten(),
        };
        let results = def
            .limits
            .run_vms(vms, &self.cancel, |vm| self.run_vm(&run, vm));
        let records: Vec<VmRecord> = results
            .into_iter()
            .map(|(vm, r)| {
                r.unwrap_or_else(|| VmRecord::new(&vm.name, &vm.host, VmStatus::Cancelled))
            })
            .collect();
        let done = records
            .iter()
            .filter(|r| r.status == VmStatus::Succeeded)
            .count();
        if def.kind == JobKind::Backup && done > 0 {
            self.apply_retention(&run, &records);
        }
        let total = records.len();
        log.update(|r| r.vms = records);
        Ok(if self.cancel.is_cancelled() {
            RunStatus::Cancelled
        } else if done == total {
            RunStatus::Succeeded
        } else if done == 0 {
            RunStatus::Failed
        } else {
            RunStatus::Partial
        })
    }

    /// Runs a script of the job with its variables; its output goes to
    /// the log.
    fn script(
        &self,
        job: &Job,
        log: &RunLog,
        phase: &str,
        cmd: &str,
        extra: &[(&str, String)],
    ) -> Result<crate::jobs::script::ScriptOutcome> {
        let mut env = vec![
            ("CAIRN_JOB", job.name().to_string()),
            ("CAIRN_RUN", log.run_id()),
            ("CAIRN_PHASE", phase.to_string()),
            ("CAIRN_KIND", job.definition.kind.as_str().to_string()),
        ];
        env.extend(extra.iter().cloned());
        log.log(LogLevel::Info, format!("{phase} script: {cmd}"));
        let outcome = run_script(cmd, &env, None, job.script_timeout, &self.cancel, &|line| {
            log.log(LogLevel::Info, format!("{phase} script| {line}"))
        })?;
        if outcome == crate::jobs::script::ScriptOutcome::Cancelled {
            // Not the script's answer: the job was stopped.
            return Err(Error::Cancelled);
        }
        let level = if outcome.success() {
            LogLevel::Info
        } else {
            LogLevel::Warn
        };
        log.log(level, format!("{phase} script {outcome}"));
        Ok(outcome)
    }

    /// `work` with the job's retries on network-type failures.
    fn with_retries<T>(
        &self,
        job: &Job,
        log: &RunLog,
        what: &str,
        mut work: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match work() {
                Ok(v) => return Ok(v),
                Err(e)
                    if e.is_transient()
                        && attempt <= job.retries
                        && !self.cancel.is_cancelled() =>
                {
                    log.log(
                        LogLevel::Warn,
                        format!(
                            "{what}: attempt {attempt} failed ({e}); retry {attempt} of {} in {}",
                            job.retries,
                            humantime::format_duration(job.retry_interval)
                        ),
                    );
                    self.pause(job.retry_interval)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sleeps `d`, waking early (with `Cancelled`) when the job is
    /// cancelled.
    fn pause(&self, d: Duration) -> Result<()> {
        let end = Instant::now() + d;
        loop {
            self.cancel.check()?;
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
    }

    /// One VM: lock, capacity, pre-script, attempts, post-script.
    fn run_vm(&self, run: &Run<'_>, vm: &VmInfo) -> VmRecord {
        let start = Instant::now();
        let log = run.log;
        let job = run.job;
        let def = &job.definition;
        let mut rec = VmRecord::new(&vm.name, &vm.host, VmStatus::Skipped);
        let vm_env = |rec: &VmRecord| {
            vec![
                ("CAIRN_VM", vm.name.clone()),
                ("CAIRN_VM_ID", vm.id.clone()),
                ("CAIRN_HOST", vm.host.clone()),
                ("CAIRN_SNAPSHOT", rec.snapshot.clone().unwrap_or_default()),
            ]
        };
        let skip = |rec: &mut VmRecord, why: String| {
            rec.status = VmStatus::Skipped;
            rec.error = Some(why.clone());
            self.event(
                log,
                EventKind::VmSkipped,
                Some(&vm.name),
                &format!("VM {}: {why}", vm.name),
            );
        };
        let checked = if def.kind == JobKind::Backup {
            job.capacity.check(run.platform.as_ref(), vm)
        } else {
            Ok(None)
        };
        let mut go = match checked {
            Ok(None) => true,
            Ok(Some(why)) => {
                skip(&mut rec, format!("not backed up: {why}"));
                false
            }
            Err(e) => {
                skip(&mut rec, format!("capacity check failed: {e}"));
                false
            }
        };
        if go {
            if let Some(cmd) = &def.scripts.pre {
                match self.script(job, log, "pre", cmd, &vm_env(&rec)) {
                    Ok(o) if o.success() => {}
                    Ok(o) => {
                        skip(&mut rec, format!("pre-script {o}"));
                        go = false;
                    }
                    Err(Error::Cancelled) => {
                        rec.status = VmStatus::Cancelled;
                        rec.error = Some("cancelled during the pre-script".into());
                        go = false;
                    }
                    Err(e) => {
                        skip(&mut rec, format!("pre-script: {e}"));
                        go = false;
                    }
                }
            }
        }
        if go {
            let mut attempt = 0;
            loop {
                attempt += 1;
                rec.attempts = attempt;
                let result = match def.kind {
                    JobKind::Backup => self.backup_vm(run, vm, &mut rec),
                    JobKind::Restore => self.restore_vm(run, vm, &mut rec),
                };
                match result {
                    Ok(None) => {
                        rec.status = VmStatus::Succeeded;
                        rec.error = None;
                        break;
                    }
                    Ok(Some(Skipped { why, alert: true })) => {
                        skip(&mut rec, why);
                        break;
                    }
                    Ok(Some(Skipped { why, alert: false })) => {
                        log.log(LogLevel::Info, format!("VM {}: skipped: {why}", vm.name));
                        rec.status = VmStatus::Skipped;
                        rec.error = Some(why);
                        break;
                    }
                    Err(e) if self.cancel.is_cancelled() || matches!(e, Error::Cancelled) => {
                        rec.status = VmStatus::Cancelled;
                        rec.error = Some(e.to_string());
                        log.log(LogLevel::Warn, format!("VM {}: cancelled", vm.name));
                        break;
                    }
                    Err(e) if e.is_transient() && attempt <= job.retries => {
                        log.log(
                            LogLevel::Warn,
                            format!(
                                "VM {}: attempt {attempt} failed ({e}); retry {attempt} of {} in {}",
                                vm.name,
                                job.retries,
                                humantime::format_duration(job.retry_interval)
                            ),
                        );
                        if self.pause(job.retry_interval).is_err() {
                            rec.status = VmStatus::Cancelled;
                            rec.error = Some(e.to_string());
                            break;
                        }
                    }
                    Err(e) => {
                        rec.status = VmStatus::Failed;
                        let why = format!("{e}");
                        rec.error = Some(why.clone());
                        let tries = if attempt > 1 {
                            format!(" after {attempt} attempts")
                        } else {
                            String::new()
                        };
                        self.event(
                            log,
                            EventKind::VmFailed,
                            Some(&vm.name),
                            &format!("VM {} failed{tries}: {why}", vm.name),
                        );
                        break;
                    }
                }
            }
        }
        if let Some(cmd) = &def.scripts.post {
            let mut env = vm_env(&rec);
            env.push(("CAIRN_RESULT", rec.status.as_str().to_string()));
            env.push(("CAIRN_ERROR", rec.error.clone().unwrap_or_default()));
            match self.script(job, log, "post", cmd, &env) {
                Ok(o) if o.success() => {}
                Ok(o) => log.log(LogLevel::Warn, format!("VM {}: post-script {o}", vm.name)),
                Err(e) => log.log(LogLevel::Warn, format!("VM {}: post-script: {e}", vm.name)),
            }
        }
        rec.seconds = start.elapsed().as_secs_f64();
        rec
    }

    /// Backs up `vm`; `Ok(Some(_))`: skipped.
    fn backup_vm(&self, run: &Run<'_>, vm: &VmInfo, rec: &mut VmRecord) -> Result<Option<Skipped>> {
        let job = run.job;
        let _lock = ResourceLock::acquire(self.state.root(), &vm_resource(vm), job.name())?;
        let own;
        let repo = match self.environment.backup_pool(job, vm, &run.pool)? {
            None => &run.repo,
            Some(pool) => {
                let pool: DynPool = match &run.pool_throttle {
                    Some(t) => Arc::new(WrappedPool(ThrottledPool::new(
                        pool,
                        t.clone(),
                        job.rate_direction,
                    ))),
                    None => pool,
                };
                own = Repository::open(pool)?;
                &own
            }
        };
        run.log.log(
            LogLevel::Info,
            format!(
                "VM {} ({} on {}): taking a snapshot",
                vm.name, vm.id, vm.host
            ),
        );
        let mut snapshot = run.platform.snapshot(vm)?;
        let result = self.backup_snapshot(run, repo, vm, &mut *snapshot);
        let stored = matches!(result, Ok(Ok(_)));
        for warning in snapshot.backup_ended(stored) {
            run.log
                .log(LogLevel::Warn, format!("VM {}: {warning}", vm.name));
        }
        if let Err(e) = snapshot.release() {
            run.log.log(
                LogLevel::Warn,
                format!(
                    "VM {}: releasing the platform snapshot failed: {e}",
                    vm.name
                ),
            );
        }
        let stats = match result? {
            Ok(stats) => stats,
            Err(skipped) => return Ok(Some(skipped)),
        };
        rec.snapshot = Some(stats.snapshot.to_string());
        rec.mode = Some(stats.mode.as_str().to_string());
        rec.bytes_logical = stats.bytes_logical;
        rec.bytes_read = stats.bytes_read;
        rec.bytes_new = stats.bytes_new;
        rec.bytes_resumed = stats.bytes_resumed;
        if stats.bytes_resumed > 0 {
            run.log.log(
                LogLevel::Info,
                format!(
                    "VM {}: resumed an interrupted backup: {} bytes not read again",
                    vm.name, stats.bytes_resumed
                ),
            );
        }
        if stats.parent_pages_damaged > 0 {
            run.log.log(
                LogLevel::Warn,
                format!(
                    "VM {}: extent pages of the parent that could not be read: {}; their spans were read again and stored anew (the pool holds damage: verify with read_data, then repair packs)",
                    vm.name, stats.parent_pages_damaged
                ),
            );
        }
        run.log.log(
            LogLevel::Info,
            format!(
                "VM {}: snapshot {} ({} bytes logical, {} read, {} new) in {:.1}s",
                vm.name,
                stats.snapshot,
                stats.bytes_logical,
                stats.bytes_read,
                stats.bytes_new,
                stats.seconds
            ),
        );
        Ok(None)
    }

    /// The backup of one platform snapshot: each disk opened (through its
    /// dirty bitmap when the job tracks changed blocks and the platform
    /// offers one), the CBT decision made, the snapshot written.
    /// `Ok(Err(_))`: the CBT policy skips the VM.
    fn backup_snapshot(
        &self,
        run: &Run<'_>,
        repo: &Repository,
        vm: &VmInfo,
        snapshot: &mut dyn PlatformSnapshot,
    ) -> Result<std::result::Result<BackupStats, Skipped>> {
        let job = run.job;
        let def = &job.definition;
        let chunking = ChunkingParams::default();
        let latest = match def.mode {
            BackupMode::Full => None,
            BackupMode::Incremental => repo
                .resolve(&SnapshotSelector::latest_of(vm.name.clone()))
                .ok(),
        };
        // Per disk, in the VM's order: its input, or its place among the
        // disks prepared through CBT.
        let mut plain: Vec<Option<BackupDisk>> = Vec::new();
        let mut cbt_disks = Vec::new();
        if let Some(chain) = &job.cbt_chain {
            let pool_id = repo.config().pool_id.to_hex();
            let grid = chunking.max_chunk() as u64;
            let devices: Vec<&str> = vm.disks.iter().map(|d| d.device.as_str()).collect();
            let mut parents = match def.mode {
                BackupMode::Full => Vec::new(),
                BackupMode::Incremental => repo.latest_with_disks(&vm.name, &devices)?,
            }
            .into_iter();
            for d in &vm.disks {
                let parent = parents.next().flatten();
                let request = CbtOpen::new(chain, &pool_id, parent.as_ref(), grid);
                match snapshot.open_cbt(&d.device, &request)? {
                    Some(disk) => {
                        cbt_disks
                            .push(disk.with_parent(parent).with_spot_check(def.cbt.spot_check));
                        plain.push(None);
                    }
                    None => plain.push(Some(BackupDisk::new(
                        d.device.clone(),
                        DiskInput::Image(snapshot.open_disk(&d.device)?),
                    ))),
                }
            }
        } else {
            for d in &vm.disks {
                plain.push(Some(BackupDisk::new(
                    d.device.clone(),
                    DiskInput::Image(snapshot.open_disk(&d.device)?),
                )));
            }
        }
        let mut parent = latest;
        let mut prepared = Vec::new();
        if !cbt_disks.is_empty() {
            match repo.prepare_cbt(&vm.name, cbt_disks, chunking, def.cbt.missing.policy())? {
                PreparedVm::Skip { reason, alert } => {
                    return Ok(Err(Skipped {
                        why: format!("not backed up: changed-block tracking: {reason}"),
                        alert,
                    }));
                }
                PreparedVm::Backup {
                    disks,
                    parent: cbt_parent,
                    fallbacks,
                } => {
                    for (disk, reason) in fallbacks {
                        run.log.log(
                            LogLevel::Warn,
                            format!(
                                "VM {} disk {disk}: changed-block tracking not used ({reason}): \
                                 the disk is read whole",
                                vm.name
                            ),
                        );
                    }
                    parent = cbt_parent.or(parent);
                    prepared = disks;
                }
            }
        }
        let mut prepared = prepared.into_iter();
        let disks: Vec<BackupDisk> = plain
            .into_iter()
            .filter_map(|d| d.or_else(|| prepared.next()))
            .map(|disk| match &run.throttle {
                Some(t) => disk.throttled(t.clone()),
                None => disk,
            })
            .collect();
        let mut opts = BackupOptions::new(vm.name.clone())
            .with_chunking(chunking)
            .with_parallel_disks(def.limits.disks_per_vm)
            .with_compression(job.compression)
            .with_parent(parent)
            .with_property("job", def.name.clone())
            .with_property("vm_id", vm.id.clone())
            .with_property("host", vm.host.clone());
        opts.cancel = self.cancel.clone();
        opts.resume_dir = Some(self.state.resume_dir());
        // A full job reads every disk, unchanged image files too.
        opts.reuse_unchanged = def.mode == BackupMode::Incremental;
        repo.backup(disks, &opts).map(Ok)
    }

    /// Restores `vm`'s snapshot; `Ok(Some(_))`: skipped (none to restore).
    fn restore_vm(
        &self,
        run: &Run<'_>,
        vm: &VmInfo,
        rec: &mut VmRecord,
    ) -> Result<Option<Skipped>> {
        let job = run.job;
        let def = &job.definition;
        let _lock = ResourceLock::acquire(self.state.root(), &vm_resource(vm), job.name())?;
        let selector = SnapshotSelector::parse(&def.restore.snapshot, Some(&vm.name))?;
        let id = match run.repo.resolve(&selector) {
            Ok(id) => id,
            Err(e) if e.is_not_found() => {
                return Ok(Some(Skipped::alert(format!(
                    "no snapshot {:?} of VM {} in the pool",
                    def.restore.snapshot, vm.name
                ))))
            }
            Err(e) => return Err(e),
        };
        let snap = run.repo.load_snapshot(&id)?;
        if snap.vm != vm.name {
            return Ok(Some(Skipped::alert(format!(
                "no snapshot {:?} of VM {} in the pool (snapshot {id} is of VM {})",
                def.restore.snapshot, vm.name, snap.vm
            ))));
        }
        rec.snapshot = Some(id.to_string());
        let mut opts = RestoreOptions {
            cancel: self.cancel.clone(),
            threads: std::num::NonZeroUsize::new(def.restore.channels as usize),
            overwrite: true,
            write_size: Some(job.buffer),
            parallel_disks: def.limits.disks_per_vm,
            ..RestoreOptions::default()
        };
        if let Some(t) = &run.throttle {
            opts = opts.with_write_throttle(t.clone());
        }
        run.log.log(
            LogLevel::Info,
            format!("VM {}: restoring snapshot {id}", vm.name),
        );
        let stats = run.repo.restore(
            &id,
            &|d| {
                run.platform.restore_target(
                    vm,
                    &VmDisk {
                        device: d.name.clone(),
                        size: d.size,
                        ..VmDisk::default()
                    },
                )
            },
            &opts,
        )?;
        rec.bytes_logical = stats.bytes_logical;
        rec.bytes_read = stats.bytes_written;
        run.log
            .log(LogLevel::Info, format!("VM {}: {stats}", vm.name));
        Ok(None)
    }

    /// Applies the pool's retention policy to the VMs backed up (none
    /// stored: nothing to do). Problems are logged, not failures.
    fn apply_retention(&self, run: &Run<'_>, records: &[VmRecord]) {
        match run.repo.retention_policy() {
            Ok(None) => {}
            Ok(Some(policy)) => {
                for r in records.iter().filter(|r| r.status == VmStatus::Succeeded) {
                    match run.repo.prune(&PruneOptions::new().with_vm(r.vm.clone())) {
                        Ok(report) => run.log.log(
                            LogLevel::Info,
                            format!(
                                "retention ({policy}) for VM {}: {} snapshot(s) removed",
                                r.vm,
                                report.removed.len()
                            ),
                        ),
                        Err(e) => run
                            .log
                            .log(LogLevel::Warn, format!("retention for VM {}: {e}", r.vm)),
                    }
                }
            }
            Err(e) => run
                .log
                .log(LogLevel::Warn, format!("reading the retention policy: {e}")),
        }
    }
}

fn vm_resource(vm: &VmInfo) -> String {
    format!("vm:{}", if vm.id.is_empty() { &vm.name } else { &vm.id })
}

/// A one-line summary of a run's VMs and errors.
fn summary(log: &RunLog) -> String {
    let r = log.record();
    let count = |s: VmStatus| r.vms.iter().filter(|v| v.status == s).count();
    let mut parts = vec![format!(
        "{} of {} VM(s) done",
        count(VmStatus::Succeeded),
        r.vms.len()
    )];
    for (s, word) in [
        (VmStatus::Failed, "failed"),
        (VmStatus::Skipped, "skipped"),
        (VmStatus::Cancelled, "cancelled"),
    ] {
        let n = count(s);
        if n > 0 {
            parts.push(format!("{n} {word}"));
        }
    }
    let mut s = parts.join(", ");
    let reasons: Vec<String> = r
        .vms
        .iter()
        .filter_map(|v| v.error.as_ref().map(|e| format!("{}: {e}", v.vm)))
        .chain(r.errors.iter().cloned())
        .collect();
    if !reasons.is_empty() {
        s.push_str(" — ");
        s.push_str(&reasons.join("; "));
    }
    s
}
