//! The state directory of jobs: definitions, run records and logs, the
//! daemon's schedule state and the resource locks. `CAIRN_STATE_DIR`,
//! else `$XDG_STATE_HOME/cairn`, else `~/.local/state/cairn`.
//!
//! ```text
//! jobs/<job>.toml              a job definition, as added
//! runs/<job>/<run>.json        one record per run (status, times, VMs, bytes, errors)
//! runs/<job>/<run>.log         the run's readable log
//! schedule/<job>.json          the daemon's claim on the job's next run
//! locks/<resource>.lock        resource locks (see `lock`)
//! ```
//!
//! Every file but the logs is written whole and atomically (a temporary
//! file, fsync, rename, fsync of the directory): a crash leaves the old
//! version or the new one. A record still marked running whose process is
//! gone reads as [`RunStatus::Interrupted`]. Run ids sort by start time.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::jobs::definition::{check_job_name, JobDefinition, JobKind, LogLevel};
use crate::{Error, Result};

/// The environment variable naming the state directory.
pub const STATE_DIR_ENV: &str = "CAIRN_STATE_DIR";

/// The state directory (see the module docs).
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

/// How a run was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// By hand (`cairn job run`, an embedding application).
    Manual,
    /// By the daemon at a scheduled time.
    Schedule,
    /// By the daemon for runs missed while it was down.
    Missed,
    /// By the daemon again, after a run of this occurrence was interrupted.
    Resumed,
}

impl Trigger {
    /// The lower-case word used in records and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::Schedule => "schedule",
            Trigger::Missed => "missed",
            Trigger::Resumed => "resumed",
        }
    }
}

/// A run's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Still running.
    Running,
    /// Every VM done.
    Succeeded,
    /// Some VMs done, others failed or skipped.
    Partial,
    /// No VM done (every one failed or was skipped), or the job could not
    /// start (platform, pool, selection).
    Failed,
    /// Not run: the pre-condition said no (the job stays idle).
    Skipped,
    /// Stopped by a cancellation (SIGTERM): what was stored stays.
    Cancelled,
    /// Its process ended while it ran (read from a stale record).
    Interrupted,
}

impl RunStatus {
    /// The lower-case word used in records and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Partial => "partial",
            RunStatus::Failed => "failed",
            RunStatus::Skipped => "skipped",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Interrupted => "interrupted",
        }
    }
}

/// What happened to one VM in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmStatus {
    /// Backed up (or restored).
    Succeeded,
    /// Failed after its retries.
    Failed,
    /// Not attempted: capacity, a failed pre-script, no snapshot to restore.
    Skipped,
    /// Stopped by a cancellation.
    Cancelled,
}

impl VmStatus {
    /// The lower-case word used in records, tables and `CAIRN_RESULT`.
    pub fn as_str(self) -> &'static str {
        match self {
            VmStatus::Succeeded => "succeeded",
            VmStatus::Failed => "failed",
            VmStatus::Skipped => "skipped",
            VmStatus::Cancelled => "cancelled",
        }
    }
}

/// One VM's part of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VmRecord {
    /// The VM's name.
    pub vm: String,
    /// Its host.
    pub host: String,
    /// What happened.
    pub status: VmStatus,
    /// The snapshot written (backup) or restored (restore).
    pub snapshot: Option<String>,
    /// `full`, `incremental`, `cbt` … for backups.
    pub mode: Option<String>,
    /// Logical bytes of its disks.
    pub bytes_logical: u64,
    /// Bytes read from its disks (backup) or written (restore).
    pub bytes_read: u64,
    /// Bytes new to the pool.
    pub bytes_new: u64,
    /// Bytes taken from a resume journal instead of being read again (an
    /// interrupted run of the same source continued).
    #[serde(default)]
    pub bytes_resumed: u64,
    /// Attempts made (1 + retries used).
    pub attempts: u32,
    /// Why it failed or was skipped.
    pub error: Option<String>,
    /// Seconds it took.
    pub seconds: f64,
}

impl VmRecord {
    /// A record for `vm` on `host` with nothing done yet.
    pub fn new(vm: &str, host: &str, status: VmStatus) -> Self {
        VmRecord {
            vm: vm.into(),
            host: host.into(),
            status,
            snapshot: None,
            mode: None,
            bytes_logical: 0,
            bytes_read: 0,
            bytes_new: 0,
            bytes_resumed: 0,
            attempts: 0,
            error: None,
            seconds: 0.0,
        }
    }
}

/// The record of one run of a job (spec B20).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunRecord {
    /// The job.
    pub job: String,
    /// The run's id (sorts by start time).
    pub run: String,
    /// Backup or restore.
    pub kind: JobKind,
    /// How it was started.
    pub trigger: Trigger,
    /// The scheduled time it ran for (RFC 3339), if any.
    pub scheduled: Option<String>,
    /// Its outcome.
    pub status: RunStatus,
    /// When it started (RFC 3339).
    pub started: String,
    /// When it ended (RFC 3339).
    pub ended: Option<String>,
    /// The process running it (owner tag).
    pub owner: String,
    /// Per VM.
    pub vms: Vec<VmRecord>,
    /// Sum of the VMs' logical bytes.
    pub bytes_logical: u64,
    /// Sum of the bytes read (backup) or written (restore).
    pub bytes_read: u64,
    /// Sum of the bytes new to the pool.
    pub bytes_new: u64,
    /// Errors and reasons, one line each (a VM's carry its name).
    pub errors: Vec<String>,
}

/// A run in progress: its record and its log, both in the state directory.
#[derive(Debug)]
pub struct RunLog {
    state: StateDir,
    record: Mutex<RunRecord>,
    log: Mutex<File>,
    level: LogLevel,
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::io(path.display().to_string(), e)
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename,
/// fsync of the directory).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::InvalidArgument(format!("{} has no directory", path.display())))?;
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", crate::process::owner_tag()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(path, e)
    })
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Millisecond)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

impl StateDir {
    /// The state directory at `root` (created when first written).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    /// `CAIRN_STATE_DIR`, else `$XDG_STATE_HOME/cairn`, else
    /// `~/.local/state/cairn`.
    pub fn from_env() -> Result<Self> {
        let non_empty = |v: &str| std::env::var_os(v).filter(|s| !s.is_empty());
        if let Some(dir) = non_empty(STATE_DIR_ENV) {
            return Ok(StateDir::new(dir));
        }
        if let Some(dir) = non_empty("XDG_STATE_HOME") {
            return Ok(StateDir::new(PathBuf::from(dir).join("cairn")));
        }
        match non_empty("HOME") {
            Some(home) => Ok(StateDir::new(
                PathBuf::from(home).join(".local/state/cairn"),
            )),
            None => Err(Error::InvalidArgument(format!(
                "no state directory: set {STATE_DIR_ENV} (or XDG_STATE_HOME or HOME)"
            ))),
        }
    }

    /// Its path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn job_path(&self, name: &str) -> PathBuf {
        self.root.join("jobs").join(format!("{name}.toml"))
    }

    fn runs_dir(&self, job: &str) -> PathBuf {
        self.root.join("runs").join(job)
    }

    /// The path of a run's log.
    pub fn log_path(&self, job: &str, run: &str) -> PathBuf {
        self.runs_dir(job).join(format!("{run}.log"))
    }

    /// Where backups keep their resume journals (spec B13).
    pub fn resume_dir(&self) -> PathBuf {
        self.root.join("resume")
    }

    /// The path of the daemon's schedule state of `job`.
    pub fn schedule_path(&self, job: &str) -> PathBuf {
        self.root.join("schedule").join(format!("{job}.json"))
    }

    /// Adds a job (checked first); a job of that name is replaced only
    /// with `replace`.
    pub fn add_job(&self, def: &JobDefinition, replace: bool) -> Result<()> {
        def.resolve()?;
        let path = self.job_path(&def.name);
        if !replace && path.exists() {
            return Err(Error::InvalidArgument(format!(
                "a job named {:?} exists already (replace it, or remove it first)",
                def.name
            )));
        }
        write_atomic(&path, def.to_toml()?.as_bytes())
    }

    /// The job named `name`.
    pub fn job(&self, name: &str) -> Result<JobDefinition> {
        check_job_name(name)?;
        let path = self.job_path(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::InvalidArgument(format!(
                    "no job named {name:?} in {}",
                    self.root.display()
                )))
            }
            Err(e) => return Err(io_err(&path, e)),
        };
        let def = JobDefinition::from_toml(&text, &path.display().to_string())?;
        if def.name != name {
            return Err(Error::InvalidArgument(format!(
                "{} names job {:?}, not {name:?}",
                path.display(),
                def.name
            )));
        }
        Ok(def)
    }

    /// When job `name` was added or last replaced (its file's time).
    pub fn job_added(&self, name: &str) -> Option<jiff::Timestamp> {
        let modified = std::fs::metadata(self.job_path(name))
            .ok()?
            .modified()
            .ok()?;
        jiff::Timestamp::try_from(modified).ok()
    }

    /// Every job's name, sorted.
    pub fn job_names(&self) -> Result<Vec<String>> {
        let dir = self.root.join("jobs");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&dir, e))?;
            let file = entry.file_name();
            let file = file.to_string_lossy();
            if let Some(name) = file.strip_suffix(".toml") {
                if check_job_name(name).is_ok() {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Removes a job's definition and schedule state; its run records stay
    /// (they are history), unless `purge`.
    pub fn remove_job(&self, name: &str, purge: bool) -> Result<()> {
        self.job(name)?;
        let path = self.job_path(name);
        std::fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
        let sched = self.schedule_path(name);
        match std::fs::remove_file(&sched) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&sched, e)),
        }
        if purge {
            let runs = self.runs_dir(name);
            match std::fs::remove_dir_all(&runs) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&runs, e)),
            }
        }
        Ok(())
    }

    /// Starts the record and log of a new run of `def`.
    pub fn start_run(
        &self,
        def: &JobDefinition,
        trigger: Trigger,
        scheduled: Option<jiff::Timestamp>,
    ) -> Result<RunLog> {
        check_job_name(&def.name)?;
        let dir = self.runs_dir(&def.name);
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let started = jiff::Timestamp::now()
            .round(jiff::Unit::Millisecond)
            .unwrap_or_else(|_| jiff::Timestamp::now());
        let suffix = hex(&crate::random::random_16()?[..3]);
        let run = format!(
            "{}-{suffix}",
            started
                .strftime("%Y%m%dT%H%M%S%.3fZ")
                .to_string()
                .replace('.', "")
        );
        let log_path = self.log_path(&def.name, &run);
        let log = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| io_err(&log_path, e))?;
        let record = RunRecord {
            job: def.name.clone(),
            run,
            kind: def.kind,
            trigger,
            scheduled: scheduled.map(|t| t.to_string()),
            status: RunStatus::Running,
            started: started.to_string(),
            ended: None,
            owner: crate::process::owner_tag(),
            vms: Vec::new(),
            bytes_logical: 0,
            bytes_read: 0,
            bytes_new: 0,
            errors: Vec::new(),
        };
        let run = RunLog {
            state: self.clone(),
            record: Mutex::new(record),
            log: Mutex::new(log),
            level: def.source.log_level,
        };
        run.save()?;
        Ok(run)
    }

    fn record_path(&self, job: &str, run: &str) -> PathBuf {
        self.runs_dir(job).join(format!("{run}.json"))
    }

    /// Reads a record; a running one whose process is gone reads as
    /// interrupted.
    fn read_record(&self, path: &Path) -> Result<RunRecord> {
        let text = std::fs::read(path).map_err(|e| io_err(path, e))?;
        let mut r: RunRecord = serde_json::from_slice(&text).map_err(|e| {
            Error::InvalidArgument(format!("run record {} is damaged: {e}", path.display()))
        })?;
        if r.status == RunStatus::Running && crate::process::owner_is_gone(&r.owner) {
            r.status = RunStatus::Interrupted;
        }
        Ok(r)
    }

    /// A run's record.
    pub fn run_record(&self, job: &str, run: &str) -> Result<RunRecord> {
        check_job_name(job)?;
        if run.is_empty() || !run.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(Error::InvalidArgument(format!("{run:?} is not a run id")));
        }
        let path = self.record_path(job, run);
        if !path.exists() {
            return Err(Error::InvalidArgument(format!(
                "job {job:?} has no run {run:?}"
            )));
        }
        self.read_record(&path)
    }

    /// Every run of `job`, oldest first.
    pub fn runs(&self, job: &str) -> Result<Vec<RunRecord>> {
        check_job_name(job)?;
        let dir = self.runs_dir(job);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir, e)),
        };
        let mut paths = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| io_err(&dir, e))?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| n.ends_with(".json") && !n.starts_with('.')) {
                paths.push(path);
            }
        }
        paths.sort();
        paths.iter().map(|p| self.read_record(p)).collect()
    }

    /// Rewrites a stale running record of `job` as interrupted (the
    /// daemon does this at start, so history shows it).
    pub fn mark_interrupted(&self, record: &RunRecord) -> Result<()> {
        let mut r = record.clone();
        r.status = RunStatus::Interrupted;
        if r.ended.is_none() {
            r.ended = Some(now());
        }
        let bytes = serde_json::to_vec_pretty(&r)
            .map_err(|e| Error::InvalidArgument(format!("run record: {e}")))?;
        write_atomic(&self.record_path(&r.job, &r.run), &bytes)
    }

    /// Reads a JSON state file of the daemon (`None` when absent).
    pub fn read_json<T: serde::de::DeserializeOwned>(&self, path: &Path) -> Result<Option<T>> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| Error::InvalidArgument(format!("{} is damaged: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(path, e)),
        }
    }

    /// Writes a JSON state file atomically.
    pub fn write_json<T: Serialize>(&self, path: &Path, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        write_atomic(path, &bytes)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl RunLog {
    /// The run's id.
    pub fn run_id(&self) -> String {
        self.record.lock().run.clone()
    }

    /// The log file's path.
    pub fn log_path(&self) -> PathBuf {
        let r = self.record.lock();
        self.state.log_path(&r.job, &r.run)
    }

    /// Appends a line to the log when `level` passes the job's log level.
    /// A log that cannot be written does not stop the job.
    pub fn log(&self, level: LogLevel, message: impl AsRef<str>) {
        if level < self.level {
            return;
        }
        let line = format!(
            "{} {:<5} {}\n",
            now(),
            level.to_string().to_uppercase(),
            message.as_ref().trim_end()
        );
        let _ = self.log.lock().write_all(line.as_bytes());
    }

    /// Changes the record in memory (save with [`save`](Self::save)).
    pub fn update(&self, f: impl FnOnce(&mut RunRecord)) {
        f(&mut self.record.lock());
    }

    /// A copy of the record as it stands.
    pub fn record(&self) -> RunRecord {
        self.record.lock().clone()
    }

    /// Writes the record to the state directory.
    pub fn save(&self) -> Result<()> {
        let r = self.record.lock().clone();
        let bytes = serde_json::to_vec_pretty(&r)
            .map_err(|e| Error::InvalidArgument(format!("run record: {e}")))?;
        write_atomic(&self.state.record_path(&r.job, &r.run), &bytes)
    }

    /// Ends the run with `status` (totals summed from the VMs) and saves.
    pub fn finish(&self, status: RunStatus) -> Result<RunRecord> {
        {
            let mut r = self.record.lock();
            r.status = status;
            r.ended = Some(now());
            r.bytes_logical = r.vms.iter().map(|v| v.bytes_logical).sum();
            r.bytes_read = r.vms.iter().map(|v| v.bytes_read).sum();
            r.bytes_new = r.vms.iter().map(|v| v.bytes_new).sum();
        }
        let _ = self.log.lock().sync_data();
        self.save()?;
        Ok(self.record())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn def(name: &str) -> JobDefinition {
        JobDefinition::from_toml(
            &format!(
                "name = \"{name}\"\nkind = \"backup\"\nplatform = \"p\"\npool = \"/p\"\n[select]\nvms = [\"a\"]\n"
            ),
            "t",
        )
        .unwrap()
    }

    /// The words tables and scripts print are the ones records store.
    #[test]
    fn words_match_the_records() {
        let word = |v: serde_json::Value| v.as_str().unwrap().to_string();
        for t in [
            Trigger::Manual,
            Trigger::Schedule,
            Trigger::Missed,
            Trigger::Resumed,
        ] {
            assert_eq!(word(serde_json::to_value(t).unwrap()), t.as_str());
        }
        for v in [
            VmStatus::Succeeded,
            VmStatus::Failed,
            VmStatus::Skipped,
            VmStatus::Cancelled,
        ] {
            assert_eq!(word(serde_json::to_value(v).unwrap()), v.as_str());
        }
        for r in [
            RunStatus::Running,
            RunStatus::Succeeded,
            RunStatus::Partial,
            RunStatus::Failed,
            RunStatus::Skipped,
            RunStatus::Cancelled,
            RunStatus::Interrupted,
        ] {
            assert_eq!(word(serde_json::to_value(r).unwrap()), r.as_str());
        }
        for k in [JobKind::Backup, JobKind::Restore] {
            assert_eq!(word(serde_json::to_value(k).unwrap()), k.as_str());
        }
    }

    #[test]
    fn jobs_are_added_listed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        assert!(state.job_names().unwrap().is_empty());
        state.add_job(&def("b"), false).unwrap();
        state.add_job(&def("a"), false).unwrap();
        let e = state.add_job(&def("a"), false).unwrap_err().to_string();
        assert!(e.contains("exists already"), "{e}");
        state.add_job(&def("a"), true).unwrap();
        assert_eq!(state.job_names().unwrap(), ["a", "b"]);
        assert_eq!(state.job("a").unwrap(), def("a"));
        let e = state.job("c").unwrap_err().to_string();
        assert!(e.contains("no job named \"c\""), "{e}");
        assert!(state.job("../x").is_err());
        // A file whose name and content disagree is refused.
        std::fs::copy(state.job_path("a"), state.job_path("z")).unwrap();
        assert!(state
            .job("z")
            .unwrap_err()
            .to_string()
            .contains("names job \"a\""));
        std::fs::remove_file(state.job_path("z")).unwrap();

        let run = state.start_run(&def("a"), Trigger::Manual, None).unwrap();
        run.log(LogLevel::Info, "hello");
        run.finish(RunStatus::Succeeded).unwrap();
        state.remove_job("a", false).unwrap();
        assert_eq!(state.job_names().unwrap(), ["b"]);
        assert_eq!(state.runs("a").unwrap().len(), 1, "history stays");
        state.add_job(&def("a"), false).unwrap();
        state.remove_job("a", true).unwrap();
        assert!(state.runs("a").unwrap().is_empty());
        // No temporary files are left.
        for sub in ["jobs", "runs"] {
            if let Ok(rd) = std::fs::read_dir(dir.path().join(sub)) {
                for e in rd {
                    let n = e.unwrap().file_name();
                    assert!(!n.to_string_lossy().contains(".tmp-"), "{n:?}");
                }
            }
        }
    }

    #[test]
    fn runs_are_recorded_in_order_with_their_log() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let mut d = def("a");
        d.source.log_level = LogLevel::Warn;
        let first = state.start_run(&d, Trigger::Manual, None).unwrap();
        first.log(LogLevel::Info, "not shown");
        first.log(LogLevel::Warn, "shown");
        first.update(|r| {
            let mut vm = VmRecord::new("a", "h", VmStatus::Succeeded);
            vm.bytes_logical = 10;
            vm.bytes_new = 4;
            r.vms.push(vm.clone());
            vm.bytes_logical = 5;
            r.vms.push(vm);
        });
        let rec = first.finish(RunStatus::Succeeded).unwrap();
        assert_eq!((rec.bytes_logical, rec.bytes_new), (15, 8));
        let log = std::fs::read_to_string(first.log_path()).unwrap();
        assert!(
            log.contains("WARN  shown") && !log.contains("not shown"),
            "{log}"
        );
        let second = state.start_run(&d, Trigger::Schedule, None).unwrap();
        let runs = state.runs("a").unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].run, rec.run);
        assert_eq!(
            runs[1].status,
            RunStatus::Running,
            "this process still runs it"
        );
        assert!(runs[0].run < runs[1].run);
        assert_eq!(state.run_record("a", &rec.run).unwrap(), rec);
        assert!(state.run_record("a", "nope").is_err());
        drop(second);
    }

    /// A record left "running" by a process that is gone reads as
    /// interrupted.
    #[test]
    fn a_dead_owner_makes_a_running_record_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let run = state.start_run(&def("a"), Trigger::Manual, None).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let tag = crate::process::owner_tag();
        let (machine, _) = tag.rsplit_once('.').unwrap();
        run.update(|r| r.owner = format!("{machine}.{pid}"));
        run.save().unwrap();
        let r = &state.runs("a").unwrap()[0];
        assert_eq!(r.status, RunStatus::Interrupted);
        state.mark_interrupted(r).unwrap();
        let raw: RunRecord =
            serde_json::from_slice(&std::fs::read(state.record_path("a", &r.run)).unwrap())
                .unwrap();
        assert_eq!(raw.status, RunStatus::Interrupted);
        assert!(raw.ended.is_some());
    }
}
