//! Job scripts (spec B15) and command notifiers: a command run by
//! `sh -c` with variables in its environment, optional bytes on its
//! standard input, its output (standard output and error, line by line)
//! handed to the job's log, and a timeout after which its whole process
//! group is killed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{CancelToken, Error, Result};

/// How a script ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScriptOutcome {
    /// It exited with this code (0: success).
    Exited(i32),
    /// A signal ended it.
    Signalled(i32),
    /// It ran past its timeout and was killed.
    TimedOut,
    /// The job was cancelled while it ran; it was killed.
    Cancelled,
}

impl ScriptOutcome {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        *self == ScriptOutcome::Exited(0)
    }
}

impl std::fmt::Display for ScriptOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScriptOutcome::Exited(c) => write!(f, "exited with code {c}"),
            ScriptOutcome::Signalled(s) => write!(f, "was ended by signal {s}"),
            ScriptOutcome::TimedOut => f.write_str("ran past its timeout and was killed"),
            ScriptOutcome::Cancelled => f.write_str("was killed: the job was cancelled"),
        }
    }
}

/// Runs `command` with `sh -c`, the variables `env` added to its
/// environment and `stdin` on its standard input; each line it prints goes
/// to `output`. Killed (with its process group) after `timeout` or when
/// `cancel` fires. Errors only when it cannot be started.
pub fn run_script(
    command: &str,
    env: &[(&str, String)],
    stdin: Option<&[u8]>,
    timeout: Duration,
    cancel: &CancelToken,
    output: &(dyn Fn(&str) + Sync),
) -> Result<ScriptOutcome> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what it started too.
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("starting script {command:?}"), e))?;
    let pid = child.id() as i32;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let input = child.stdin.take();
    // The pipes are read on threads of their own that hand lines over a
    // channel: a process that left the script's group and still holds a
    // pipe must not keep the job waiting past the script's end.
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    if let (Some(mut pipe), Some(bytes)) = (input, stdin) {
        let bytes = bytes.to_vec();
        std::thread::spawn(move || {
            // A script that does not read its input closes the pipe.
            let _ = pipe.write_all(&bytes);
        });
    }
    for stream in [
        stdout.map(|s| Box::new(s) as Box<dyn Read + Send>),
        stderr.map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = line_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(l) = line else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
    }
    drop(line_tx);
    let drain = |wait: Duration| {
        let end = Instant::now() + wait;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match line_rx.recv_timeout(left) {
                Ok(line) => output(&line),
                Err(_) => break,
            }
        }
    };
    let start = Instant::now();
    let mut nap = Duration::from_millis(2);
    loop {
        drain(Duration::ZERO);
        match child.try_wait() {
            Ok(Some(status)) => {
                use std::os::unix::process::ExitStatusExt;
                // What it started may still hold the pipes open.
                kill_group(pid);
                // The rest of its output, for a moment at most.
                drain(Duration::from_millis(500));
                return Ok(match (status.code(), status.signal()) {
                    (Some(c), _) => ScriptOutcome::Exited(c),
                    (None, Some(s)) => ScriptOutcome::Signalled(s),
                    (None, None) => ScriptOutcome::Exited(-1),
                });
            }
            Ok(None) => {}
            Err(e) => {
                kill_group(pid);
                let _ = child.wait();
                return Err(Error::io(format!("waiting for script {command:?}"), e));
            }
        }
        let over = if cancel.is_cancelled() {
            Some(ScriptOutcome::Cancelled)
        } else if start.elapsed() >= timeout {
            Some(ScriptOutcome::TimedOut)
        } else {
            None
        };
        if let Some(o) = over {
            kill_group(pid);
            let _ = child.wait();
            drain(Duration::from_millis(200));
            return Ok(o);
        }
        std::thread::sleep(nap.min(timeout.saturating_sub(start.elapsed())));
        nap = (nap * 2).min(Duration::from_millis(50));
    }
}

fn kill_group(pid: i32) {
    // SAFETY: sends SIGKILL to the process group the script leads; no
    // memory is passed.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use parking_lot::Mutex;

    fn run(
        cmd: &str,
        env: &[(&str, String)],
        stdin: Option<&[u8]>,
        secs: u64,
    ) -> (ScriptOutcome, Vec<String>) {
        let lines = Mutex::new(Vec::new());
        let o = run_script(
            cmd,
            env,
            stdin,
            Duration::from_secs(secs),
            &CancelToken::new(),
            &|l| lines.lock().push(l.to_string()),
        )
        .unwrap();
        (o, lines.into_inner())
    }

    #[test]
    fn output_exit_codes_environment_and_input() {
        let (o, lines) = run("echo out; echo err >&2; exit 3", &[], None, 10);
        assert_eq!(o, ScriptOutcome::Exited(3));
        assert!(!o.success());
        let mut lines = lines;
        lines.sort();
        assert_eq!(lines, ["err", "out"]);
        let (o, lines) = run(
            "echo \"$CAIRN_VM\"; cat",
            &[("CAIRN_VM", "web 1".into())],
            Some(b"in\n"),
            10,
        );
        assert!(o.success());
        assert_eq!(lines, ["web 1", "in"]);
        let (o, _) = run("kill -TERM $$", &[], None, 10);
        assert_eq!(o, ScriptOutcome::Signalled(libc::SIGTERM));
    }

    /// A script past its timeout is killed with what it started (a
    /// background `sleep` holding the output pipe would otherwise keep the
    /// job waiting).
    #[test]
    fn a_script_past_its_timeout_is_killed_with_its_children() {
        let start = Instant::now();
        let (o, lines) = run("echo started; sleep 30 & sleep 30", &[], None, 1);
        assert_eq!(o, ScriptOutcome::TimedOut);
        assert_eq!(lines, ["started"]);
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
        // A finished script's background child does not hold the job either.
        let start = Instant::now();
        let (o, _) = run("sleep 30 & exit 0", &[], None, 60);
        assert!(o.success());
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
    }

    /// A process that left the script's group (setsid) and holds its
    /// output pipe does not keep the job past the script's timeout.
    #[test]
    fn an_escaped_child_holding_the_pipe_does_not_hold_the_job() {
        let start = Instant::now();
        let (o, lines) = run("echo begun; setsid sleep 30 & sleep 30", &[], None, 1);
        assert_eq!(o, ScriptOutcome::TimedOut);
        assert_eq!(lines, ["begun"]);
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
        let start = Instant::now();
        let (o, _) = run("setsid sleep 30 & exit 0", &[], None, 60);
        assert!(o.success());
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_cancelled_job_kills_its_script() {
        let cancel = CancelToken::new();
        cancel.cancel();
        let o = run_script(
            "sleep 30",
            &[],
            None,
            Duration::from_secs(60),
            &cancel,
            &|_| {},
        )
        .unwrap();
        assert_eq!(o, ScriptOutcome::Cancelled);
    }
}
