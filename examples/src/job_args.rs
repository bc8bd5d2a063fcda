//! Job options as `cairn backup` / `cairn restore` flags, with the meaning
//! they have in a job file (spec B15, B17): `--pre-condition CMD` (non-zero:
//! not run, exit 4), `--pre-script CMD` (before data is read; non-zero:
//! not run, exit 4), `--post-script CMD` (after, with `CAIRN_RESULT`),
//! `--script-timeout`, `--retries N --retry-interval D` (network-type
//! failures only; 0 retries by default on the command line, 3 in jobs).

use std::time::Duration;

use cairn_engine::jobs::script::{run_script, ScriptOutcome};

use crate::{signals, Failure};

#[derive(clap::Args, Debug, Clone)]
pub struct JobArgs {
    /// Run CMD (sh -c) first; a non-zero exit means nothing is done
    /// (exit 4).
    #[arg(long = "pre-condition", value_name = "CMD")]
    pre_condition: Option<String>,
    /// Run CMD before any data is read; a non-zero exit means nothing is
    /// done (exit 4).
    #[arg(long = "pre-script", value_name = "CMD")]
    pre_script: Option<String>,
    /// Run CMD afterwards, with CAIRN_RESULT=succeeded|failed and
    /// CAIRN_EXIT (its failure is a warning).
    #[arg(long = "post-script", value_name = "CMD")]
    post_script: Option<String>,
    /// Longest a script may run (1s–24h); then it is killed and counts as
    /// failed.
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    script_timeout: String,
    /// Retries after network-type failures (0–10; dropped connections,
    /// timeouts, a busy pool).
    #[arg(long, value_name = "N", default_value_t = 0)]
    retries: u32,
    /// Time between retries (0–120 min).
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    retry_interval: String,
}

fn duration(
    option: &str,
    value: &str,
    min: Duration,
    max: Duration,
    range: &str,
) -> Result<Duration, Failure> {
    let d = humantime::parse_duration(value).map_err(|e| {
        Failure::usage(format!(
            "{option} {value:?} is not a duration like 90s or 10m: {e}"
        ))
    })?;
    if d < min || d > max {
        return Err(Failure::usage(format!(
            "{option} {value} is out of range ({range})"
        )));
    }
    Ok(d)
}

impl JobArgs {
    /// Whether any option asks for more than one plain run.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// Runs `attempt` (a backup or restore of `vm`) with the scripts and
    /// retries asked for; `what` names it in messages and `CAIRN_KIND`.
    pub fn run(
        &self,
        what: &str,
        vm: &str,
        mut attempt: impl FnMut() -> Result<u8, Failure>,
    ) -> Result<u8, Failure> {
        if self.retries > 10 {
            return Err(Failure::usage(format!(
                "--retries {} is out of range (0–10)",
                self.retries
            )));
        }
        let minute = Duration::from_secs(60);
        let interval = duration(
            "--retry-interval",
            &self.retry_interval,
            Duration::ZERO,
            120 * minute,
            "0–120 min",
        )?;
        let timeout = duration(
            "--script-timeout",
            &self.script_timeout,
            Duration::from_secs(1),
            24 * 60 * minute,
            "1s–24h",
        )?;
        for (option, cmd) in [
            ("--pre-condition", &self.pre_condition),
            ("--pre-script", &self.pre_script),
            ("--post-script", &self.post_script),
        ] {
            if cmd.as_deref().is_some_and(|c| c.trim().is_empty()) {
                return Err(Failure::usage(format!("{option} is empty")));
            }
        }
        let cancel = signals::token();
        let script =
            |phase: &str, cmd: &str, extra: &[(&str, String)]| -> Result<ScriptOutcome, Failure> {
                let mut env = vec![
                    ("CAIRN_PHASE", phase.to_string()),
                    ("CAIRN_KIND", what.to_string()),
                    ("CAIRN_VM", vm.to_string()),
                ];
                env.extend(extra.iter().cloned());
                let outcome = run_script(cmd, &env, None, timeout, &cancel, &|line| {
                    eprintln!("cairn: {phase} script: {line}")
                })?;
                if outcome == ScriptOutcome::Cancelled {
                    return Err(cairn_engine::Error::Cancelled.into());
                }
                Ok(outcome)
            };
        for (phase, cmd) in [
            ("precondition", &self.pre_condition),
            ("pre", &self.pre_script),
        ] {
            if let Some(cmd) = cmd {
                let outcome = script(phase, cmd, &[])?;
                if !outcome.success() {
                    eprintln!("cairn: {phase} script {cmd:?} {outcome}: the {what} is not run");
                    return Ok(4);
                }
            }
        }
        let mut tries = 0;
        let result = loop {
            match attempt() {
                Err(f) if f.transient && tries < self.retries && !cancel.is_cancelled() => {
                    tries += 1;
                    eprintln!(
                        "cairn: {what} failed ({}); retry {tries} of {} in {}",
                        f.message,
                        self.retries,
                        humantime::format_duration(interval)
                    );
                    let end = std::time::Instant::now() + interval;
                    while std::time::Instant::now() < end && !cancel.is_cancelled() {
                        std::thread::sleep(
                            Duration::from_millis(50).min(end - std::time::Instant::now()),
                        );
                    }
                }
                other => break other,
            }
        };
        if let Some(cmd) = &self.post_script {
            let (word, code) = match &result {
                Ok(0) => ("succeeded", 0),
                Ok(c) => ("failed", *c),
                Err(f) => ("failed", f.code),
            };
            let env = [
                ("CAIRN_RESULT", word.to_string()),
                ("CAIRN_EXIT", code.to_string()),
            ];
            match script("post", cmd, &env) {
                Ok(o) if o.success() => {}
                Ok(o) => eprintln!("cairn: warning: post-script {cmd:?} {o}"),
                Err(f) => eprintln!("cairn: warning: post-script {cmd:?}: {}", f.message),
            }
        }
        result
    }
}
