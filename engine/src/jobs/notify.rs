//! Job events and where they go (spec B20): a job that failed or only
//! partly succeeded, a VM skipped (capacity, missing CBT, a pre-script) or
//! failed, a pre-condition that kept a job idle, runs missed while the
//! daemon was down. Every event is written to the run's log; a
//! [`Notifier`] sends it further — [`CommandNotifier`] runs a command per
//! event (a webhook is `curl -sf -d @- URL`), an embedding application
//! implements its own.

use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

use crate::jobs::script::run_script;
use crate::CancelToken;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A run ended with no VM done, or could not start.
    JobFailed,
    /// A run ended with some VMs not done.
    JobPartial,
    /// The pre-condition said no: the job did not run.
    PreconditionFailed,
    /// A VM was not attempted (capacity, pre-script, missing CBT …).
    VmSkipped,
    /// A VM failed after its retries.
    VmFailed,
    /// Scheduled runs were missed while no daemon ran them.
    RunsMissed,
}

impl EventKind {
    /// The kebab-case name used in JSON and environment variables.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::JobFailed => "job-failed",
            EventKind::JobPartial => "job-partial",
            EventKind::PreconditionFailed => "precondition-failed",
            EventKind::VmSkipped => "vm-skipped",
            EventKind::VmFailed => "vm-failed",
            EventKind::RunsMissed => "runs-missed",
        }
    }
}

/// An event of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct JobEvent {
    /// What happened.
    pub kind: EventKind,
    /// The job.
    pub job: String,
    /// The run (empty for missed runs).
    pub run: String,
    /// The VM, for VM events.
    pub vm: Option<String>,
    /// Why, in words.
    pub message: String,
    /// When (RFC 3339).
    pub time: String,
}

impl JobEvent {
    /// An event happening now.
    pub fn new(kind: EventKind, job: &str, run: &str, vm: Option<&str>, message: String) -> Self {
        JobEvent {
            kind,
            job: job.into(),
            run: run.into(),
            vm: vm.map(str::to_string),
            message,
            time: jiff::Timestamp::now().to_string(),
        }
    }
}

/// Where job events go besides the run's log. A notifier must not fail
/// the job: it reports its own trouble as a returned message, which the
/// runner logs.
pub trait Notifier: Send + Sync {
    /// Sends `event`; `Err(why)` when it could not.
    fn notify(&self, event: &JobEvent) -> std::result::Result<(), String>;
}

/// Sends nowhere (events are still in the run's log).
#[derive(Debug, Default)]
pub struct NoNotifier;

impl Notifier for NoNotifier {
    fn notify(&self, _: &JobEvent) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// Keeps events in memory (tests, embedding applications that poll).
#[derive(Debug, Default)]
pub struct MemoryNotifier {
    events: Mutex<Vec<JobEvent>>,
}

impl MemoryNotifier {
    /// The events received so far.
    pub fn events(&self) -> Vec<JobEvent> {
        self.events.lock().clone()
    }
}

impl Notifier for MemoryNotifier {
    fn notify(&self, event: &JobEvent) -> std::result::Result<(), String> {
        self.events.lock().push(event.clone());
        Ok(())
    }
}

/// Runs a command (`sh -c`) per event: the event as JSON on its standard
/// input and in `CAIRN_EVENT` (the kind), `CAIRN_JOB`, `CAIRN_RUN`,
/// `CAIRN_VM`, `CAIRN_MESSAGE`; it must exit 0 within its timeout.
#[derive(Debug)]
pub struct CommandNotifier {
    command: String,
    timeout: Duration,
}

impl CommandNotifier {
    /// Runs `command` per event, killed after `timeout`.
    pub fn new(command: impl Into<String>, timeout: Duration) -> Self {
        CommandNotifier {
            command: command.into(),
            timeout,
        }
    }
}

impl Notifier for CommandNotifier {
    fn notify(&self, event: &JobEvent) -> std::result::Result<(), String> {
        let json = serde_json::to_vec(event).map_err(|e| e.to_string())?;
        let env = [
            ("CAIRN_EVENT", event.kind.as_str().to_string()),
            ("CAIRN_JOB", event.job.clone()),
            ("CAIRN_RUN", event.run.clone()),
            ("CAIRN_VM", event.vm.clone().unwrap_or_default()),
            ("CAIRN_MESSAGE", event.message.clone()),
        ];
        let output = Mutex::new(Vec::new());
        let outcome = run_script(
            &self.command,
            &env,
            Some(&json),
            self.timeout,
            &CancelToken::new(),
            &|l| output.lock().push(l.to_string()),
        )
        .map_err(|e| e.to_string())?;
        if outcome.success() {
            Ok(())
        } else {
            let out = output.into_inner().join(" / ");
            Err(format!(
                "notify command {:?} {outcome}{}",
                self.command,
                if out.is_empty() {
                    String::new()
                } else {
                    format!(": {out}")
                }
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_command_gets_the_event_as_json_and_variables() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("events");
        let n = CommandNotifier::new(
            format!(
                "{{ cat; echo; echo \"$CAIRN_EVENT $CAIRN_JOB $CAIRN_VM\"; }} >> {}",
                out.display()
            ),
            Duration::from_secs(10),
        );
        let e = JobEvent::new(
            EventKind::VmSkipped,
            "nightly",
            "r1",
            Some("web1"),
            "full".into(),
        );
        n.notify(&e).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let (json, vars) = text.split_once('\n').unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["kind"], "vm-skipped");
        assert_eq!(v["vm"], "web1");
        assert_eq!(v["message"], "full");
        assert_eq!(vars.trim(), "vm-skipped nightly web1");
        let bad = CommandNotifier::new("echo no such hook; exit 7", Duration::from_secs(10));
        let why = bad.notify(&e).unwrap_err();
        assert!(
            why.contains("exited with code 7") && why.contains("no such hook"),
            "{why}"
        );
    }
}
