//! `cairn job add|list|show|run|history|log|remove` and `cairn daemon`:
//! jobs kept in the state directory (`--state-dir`, else
//! `CAIRN_STATE_DIR`, else `$XDG_STATE_HOME/cairn` or
//! `~/.local/state/cairn`), run by hand or by the daemon at their times.
//!
//! Jobs name their platform by address: `inventory:PATH` is a KVM host's
//! VMs described by an inventory file (see `cairn_cas::inventory`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_cas::{InventoryPlatform, ReadSettings};
use cairn_engine::jobs::{
    CommandNotifier, Daemon, Job, JobDefinition, JobEnvironment, JobEvent, JobRunner, Notifier,
    RunRecord, RunStatus, StateDir, TickOutcome, Trigger,
};
use cairn_engine::{DynPool, Error, Platform, VmInfo};
use clap::{Args, Subcommand};
use jiff::Timestamp;

use crate::{output, signals, Failure};

/// `--state-dir DIR`.
#[derive(Args, Debug, Clone)]
pub struct StateArg {
    /// The state directory (default: $CAIRN_STATE_DIR, else
    /// $XDG_STATE_HOME/cairn, else ~/.local/state/cairn).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

impl StateArg {
    fn open(&self) -> Result<StateDir, Failure> {
        Ok(match &self.state_dir {
            Some(d) => StateDir::new(d),
            None => StateDir::from_env()?,
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// Add a job from its TOML file (every key checked first).
    Add {
        /// The job's TOML file.
        file: PathBuf,
        /// Replace a job of the same name.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        state: StateArg,
    },
    /// List the jobs: kind, schedule, last run and its status, next run.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArg,
    },
    /// A job's definition, its last run and its next runs.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArg,
    },
    /// Run a job now. Exit 0: every VM done (or the pre-condition said no),
    /// 7: some VMs not done, 1: none done.
    Run {
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArg,
    },
    /// A job's runs, oldest first.
    History {
        name: String,
        /// Only the newest N runs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        state: StateArg,
    },
    /// A run's log (default: the newest run's).
    Log {
        name: String,
        run: Option<String>,
        #[command(flatten)]
        state: StateArg,
    },
    /// Remove a job; its history stays unless --purge.
    Remove {
        name: String,
        #[arg(long)]
        purge: bool,
        #[command(flatten)]
        state: StateArg,
    },
}

/// `cairn daemon`.
#[derive(Args, Debug)]
pub struct DaemonArgs {
    #[command(flatten)]
    state: StateArg,
    /// Look for new or changed jobs at least this often.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    poll: Duration,
    /// Runs due longer ago than this are missed (reported; run once when
    /// the job says run_missed = true).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// One pass, then exit.
    #[arg(long)]
    once: bool,
}

/// Opens platforms and pools by the addresses jobs name.
#[derive(Default)]
struct CliEnvironment {
    /// Tape pools a run opened, by address: a VM's backup goes into the
    /// open media set through the run's own handle (one process drives a
    /// tape, and opening it twice is refused). Weak: the tape closes when
    /// the run ends.
    tapes: std::sync::Mutex<std::collections::HashMap<String, cairn_pools::tape::WeakTapePool>>,
}

impl JobEnvironment for CliEnvironment {
    fn platform(
        &self,
        job: &Job,
        cancel: &cairn_engine::CancelToken,
    ) -> cairn_engine::Result<Arc<dyn Platform>> {
        let address = &job.definition.platform;
        match address.split_once(':') {
            Some(("inventory", path)) if !path.is_empty() => {
                let read = ReadSettings::new(
                    job.definition.limits.streams_per_disk,
                    job.timeout,
                    job.reconnect_window,
                    job.buffer as u32,
                );
                Ok(Arc::new(
                    InventoryPlatform::open(path.as_ref(), read)?.with_cancel(cancel.clone()),
                ))
            }
            _ => Err(Error::InvalidArgument(format!(
                "job {:?}: platform {address:?} is not one this tool knows (inventory:PATH)",
                job.name()
            ))),
        }
    }

    fn pool(&self, job: &Job) -> cairn_engine::Result<DynPool> {
        // A tape another run of this process drives: through its handle
        // (opening the tape twice is refused). Held while opening, so two
        // runs starting together share one handle.
        let mut tapes = self
            .tapes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tape) = tapes.get(&job.definition.pool).and_then(|w| w.upgrade()) {
            return Ok(Arc::new(tape));
        }
        let opened =
            crate::open_pool_raw(&job.definition.pool, false, false).map_err(Error::from)?;
        if let Some(tape) = &opened.tape {
            tapes.insert(job.definition.pool.clone(), tape.downgrade());
        }
        Ok(opened.pool)
    }

    fn backup_pool(
        &self,
        job: &Job,
        vm: &VmInfo,
        _pool: &DynPool,
    ) -> cairn_engine::Result<Option<DynPool>> {
        let address = &job.definition.pool;
        if is_tape(address) {
            let tape = self
                .tapes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(address)
                .and_then(|w| w.upgrade());
            if let Some(tape) = tape {
                return Ok(Some(Arc::new(tape.current_set()?)));
            }
        }
        if crate::standard_dir(address).is_some() || is_tape(address) {
            let opened =
                crate::open_repo_for_backup(address, &vm.name).map_err(failure_to_error)?;
            return Ok(Some(opened.repo.pool().clone()));
        }
        Ok(None)
    }
}

fn is_tape(address: &str) -> bool {
    matches!(
        cairn_pools::PoolAddress::parse(address),
        Ok(cairn_pools::PoolAddress::Tape(_) | cairn_pools::PoolAddress::TapeDevice { .. })
    )
}

/// Back to an engine error, keeping whether it is worth a retry.
fn failure_to_error(f: Failure) -> Error {
    if f.transient {
        Error::io(
            f.message,
            std::io::Error::from(std::io::ErrorKind::ConnectionAborted),
        )
    } else {
        Error::InvalidArgument(f.message)
    }
}

/// Events go to the job's `notify.command` when it has one (read from the
/// state directory per event, so the daemon sees changed jobs).
struct StateNotifier {
    state: StateDir,
}

impl Notifier for StateNotifier {
    fn notify(&self, event: &JobEvent) -> Result<(), String> {
        match self.state.job(&event.job) {
            Ok(def) => match &def.notify.command {
                Some(c) => CommandNotifier::new(c.clone(), Duration::from_secs(60)).notify(event),
                None => Ok(()),
            },
            Err(e) => Err(e.to_string()),
        }
    }
}

fn resolve(state: &StateDir, name: &str) -> Result<Job, Failure> {
    Ok(state.job(name)?.resolve()?)
}

fn status_word(r: &RunRecord) -> &'static str {
    r.status.as_str()
}

fn record_json(r: &RunRecord) -> serde_json::Value {
    serde_json::to_value(r).unwrap_or(serde_json::Value::Null)
}

/// The next `count` runs, as RFC 3339 times with the job's zone offset.
fn next_runs(job: &Job, count: usize) -> Vec<String> {
    job.schedule
        .upcoming(&job.zone, Timestamp::now(), count)
        .into_iter()
        .map(|t| {
            t.to_zoned(job.zone.clone())
                .strftime("%Y-%m-%dT%H:%M:%S%:z")
                .to_string()
        })
        .collect()
}

/// `cairn job …`.
pub fn run(command: JobCommand) -> Result<u8, Failure> {
    match command {
        JobCommand::Add {
            file,
            replace,
            state,
        } => {
            let state = state.open()?;
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Failure::usage(format!("reading {}: {e}", file.display())))?;
            let def = JobDefinition::from_toml(&text, &file.display().to_string())?;
            let job = def.resolve()?;
            state.add_job(&def, replace)?;
            println!("added job {} ({})", def.name, def.schedule);
            if let cairn_engine::jobs::Schedule::Once(_) = job.schedule {
                if next_runs(&job, 1).is_empty() {
                    eprintln!("cairn: warning: job {}'s once time has passed; the daemon will not run it (`cairn job run` will)", def.name);
                }
            }
            Ok(0)
        }
        JobCommand::List { json, state } => {
            let state = state.open()?;
            let mut rows = Vec::new();
            for name in state.job_names()? {
                let def = state.job(&name);
                let last = state.runs(&name)?.pop();
                let next = def
                    .as_ref()
                    .ok()
                    .and_then(|d| d.resolve().ok())
                    .and_then(|j| next_runs(&j, 1).pop());
                rows.push((name, def, last, next));
            }
            if json {
                output::print_json(&serde_json::Value::Array(
                    rows.iter()
                        .map(|(name, def, last, next)| {
                            serde_json::json!({
                                "job": name,
                                "kind": def.as_ref().ok().map(|d| d.kind.as_str()),
                                "schedule": def.as_ref().ok().map(|d| d.schedule.clone()),
                                "error": def.as_ref().err().map(|e| e.to_string()),
                                "last_run": last.as_ref().map(|r| r.run.clone()),
                                "last_status": last.as_ref().map(status_word),
                                "last_started": last.as_ref().map(|r| r.started.clone()),
                                "next_run": next,
                            })
                        })
                        .collect(),
                ));
            } else {
                println!(
                    "{:<24} {:<8} {:<28} {:<12} {:<26} next",
                    "job", "kind", "schedule", "last", "last started"
                );
                for (name, def, last, next) in &rows {
                    let (kind, schedule) = match def {
                        Ok(d) => (d.kind.as_str(), d.schedule.clone()),
                        Err(e) => ("?", format!("(unreadable: {e})")),
                    };
                    println!(
                        "{:<24} {:<8} {:<28} {:<12} {:<26} {}",
                        name,
                        kind,
                        schedule,
                        last.as_ref().map_or("never", status_word),
                        last.as_ref().map_or("-", |r| r.started.as_str()),
                        next.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(0)
        }
        JobCommand::Show { name, json, state } => {
            let state = state.open()?;
            let job = resolve(&state, &name)?;
            let last = state.runs(&name)?.pop();
            let next = next_runs(&job, 5);
            if json {
                output::print_json(&serde_json::json!({
                    "job": serde_json::to_value(&job.definition).unwrap_or_default(),
                    "last_run": last.as_ref().map(record_json),
                    "next_runs": next,
                }));
            } else {
                print!("{}", job.definition.to_toml()?);
                println!();
                match &last {
                    Some(r) => print_record(r),
                    None => println!("last run: never"),
                }
                println!(
                    "next runs: {}",
                    if next.is_empty() {
                        "none scheduled".to_string()
                    } else {
                        next.join(", ")
                    }
                );
            }
            Ok(0)
        }
        JobCommand::Run { name, json, state } => {
            let state = state.open()?;
            let job = resolve(&state, &name)?;
            let notifier = StateNotifier {
                state: state.clone(),
            };
            let environment = CliEnvironment::default();
            let runner =
                JobRunner::new(&state, &environment, &notifier).with_cancel(signals::token());
            let record = runner.run(&job, Trigger::Manual, None)?;
            if json {
                output::print_json(&record_json(&record));
            } else {
                print_record(&record);
                println!("log: {}", state.log_path(&name, &record.run).display());
            }
            if let (RunStatus::Cancelled, Some(sig)) = (record.status, signals::received()) {
                return Ok(128 + sig as u8);
            }
            Ok(match record.status {
                RunStatus::Succeeded | RunStatus::Skipped => 0,
                RunStatus::Partial => 7,
                _ => 1,
            })
        }
        JobCommand::History {
            name,
            limit,
            json,
            state,
        } => {
            let state = state.open()?;
            let runs = state.runs(&name)?;
            let runs = &runs[runs.len().saturating_sub(limit)..];
            if json {
                output::print_json(&serde_json::Value::Array(
                    runs.iter().map(record_json).collect(),
                ));
            } else {
                println!(
                    "{:<28} {:<9} {:<12} {:<26} {:>5} {:>12} {:>12}",
                    "run", "trigger", "status", "started", "vms", "logical", "new"
                );
                for r in runs {
                    let done = r
                        .vms
                        .iter()
                        .filter(|v| v.status == cairn_engine::jobs::VmStatus::Succeeded)
                        .count();
                    println!(
                        "{:<28} {:<9} {:<12} {:<26} {:>5} {:>12} {:>12}",
                        r.run,
                        r.trigger.as_str(),
                        status_word(r),
                        r.started,
                        format!("{done}/{}", r.vms.len()),
                        output::human(r.bytes_logical),
                        output::human(r.bytes_new)
                    );
                }
            }
            Ok(0)
        }
        JobCommand::Log { name, run, state } => {
            let state = state.open()?;
            let run = match run {
                Some(r) => state.run_record(&name, &r)?.run,
                None => {
                    state
                        .runs(&name)?
                        .pop()
                        .ok_or_else(|| Failure::new(format!("job {name:?} has not run yet")))?
                        .run
                }
            };
            let path = state.log_path(&name, &run);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Failure::new(format!("reading {}: {e}", path.display())))?;
            print!("{text}");
            Ok(0)
        }
        JobCommand::Remove { name, purge, state } => {
            let state = state.open()?;
            state.remove_job(&name, purge)?;
            println!(
                "removed job {name}{}",
                if purge { " and its history" } else { "" }
            );
            Ok(0)
        }
    }
}

fn print_record(r: &RunRecord) {
    println!(
        "run {} of job {}: {} (started {}, ended {})",
        r.run,
        r.job,
        status_word(r),
        r.started,
        r.ended.as_deref().unwrap_or("-")
    );
    for v in &r.vms {
        let status = v.status.as_str();
        println!(
            "  {:<24} {:<10} {:<14} {:>10} logical {:>10} new{}",
            v.vm,
            status,
            v.snapshot
                .as_deref()
                .map_or("-".to_string(), |s| s.chars().take(12).collect()),
            output::human(v.bytes_logical),
            output::human(v.bytes_new),
            v.error
                .as_deref()
                .map_or(String::new(), |e| format!("  ({e})"))
        );
    }
    for e in &r.errors {
        println!("  error: {e}");
    }
}

/// `cairn daemon`.
pub fn daemon(args: DaemonArgs) -> Result<u8, Failure> {
    let state = args.state.open()?;
    let token = signals::token();
    let names = state.job_names()?;
    let notifier = StateNotifier {
        state: state.clone(),
    };
    let environment = CliEnvironment::default();
    let runner = JobRunner::new(&state, &environment, &notifier).with_cancel(token.clone());
    let daemon = Daemon::new(&state, runner)?.with_grace(args.grace);
    let mut report = |outcomes: &cairn_engine::jobs::PassOutcomes| {
        for (job, o) in outcomes {
            match o {
                TickOutcome::Ran(r) => println!(
                    "{} job {job}: run {} ({}, for {}) {}",
                    Timestamp::now(),
                    r.run,
                    r.trigger.as_str(),
                    r.scheduled.as_deref().unwrap_or("-"),
                    status_word(r)
                ),
                TickOutcome::Missed(n) => {
                    println!("{} job {job}: {n} run(s) missed", Timestamp::now())
                }
                TickOutcome::Error(e) => eprintln!("cairn: job {job}: {e}"),
                _ => {}
            }
        }
    };
    if args.once {
        let outcomes = daemon.tick(Timestamp::now());
        report(&outcomes);
        return Ok(0);
    }
    println!(
        "cairn daemon: {} job(s) in {}",
        names.len(),
        state.root().display()
    );
    daemon.run(args.poll, &token, &mut report);
    // Stopped by SIGINT/SIGTERM: the running job was cancelled (what it
    // stored stays; the next daemon resumes it).
    Ok(signals::received().map_or(0, |sig| 128 + sig as u8))
}
