//! Job definitions (spec B1, B6–B9, B12–B17, R7, R8): what a job backs up
//! or restores, from which platform into which pool, when, how fast, with
//! which retries, scripts and notifications — one TOML file per job,
//! written by people, so every key is checked: an unknown key, a value out
//! of its range or a schedule that can never run is refused with an error
//! naming the key and what it allows.
//!
//! [`JobDefinition`] is the file as written (every field serde, defaults
//! from the spec); [`JobDefinition::resolve`] checks it and gives a
//! [`Job`] with typed values (schedule, time zone, rate limit, capacity
//! rule, compression, durations) that the runner uses.
//!
//! ```toml
//! name = "web-nightly"
//! kind = "backup"                # or "restore"
//! mode = "incremental"           # or "full"
//! platform = "inventory:/etc/cairn/vms.toml"
//! pool = "/srv/cairn/pool"
//! schedule = "daily 02:30"
//! timezone = "Europe/Berlin"
//!
//! [select]
//! keywords = ["web"]
//! exclude = ["test"]
//!
//! [limits]
//! vms_per_job = 4
//!
//! [rate_limit]
//! rules = ["08:00-18:00=50MiB/s"]
//!
//! [retries]
//! count = 3
//! interval = "10m"
//! ```

use std::fmt;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::cbt::CbtPolicy;
use crate::chunker::parse_size;
use crate::jobs::capacity::CapacityRule;
use crate::jobs::rate::{Direction, RateLimit};
use crate::jobs::runner::Limits;
use crate::jobs::schedule::Schedule;
use crate::jobs::select::Selection;
use crate::store::blob::Compression;
use crate::{Error, Result};

/// What a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Backs up the selected VMs into the pool.
    Backup,
    /// Restores the selected VMs' snapshots into the platform's targets.
    Restore,
}

impl JobKind {
    /// The lower-case word used in job files, records and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Restore => "restore",
        }
    }
}

/// Full or incremental backups.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupMode {
    /// Each VM's newest snapshot is the parent: unchanged data is not sent
    /// again (and not read again where the platform tracks changes).
    #[default]
    Incremental,
    /// Every disk read whole, with no parent.
    Full,
}

/// Where a job's rate limit applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateTarget {
    /// Reads: the VMs' disks in a backup, the pool in a restore.
    #[default]
    Reads,
    /// Writes: the pool in a backup, the restore targets in a restore.
    Writes,
}

/// Log detail of a job (spec B16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Everything, progress included.
    #[default]
    Info,
    /// Warnings and errors.
    Warn,
    /// Errors only.
    Error,
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        })
    }
}

/// `[rate_limit]`: rules like `08:00-18:00=50MiB/s` and `unlimited`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateOptions {
    /// The rules (see [`RateLimit::parse`]); none: unlimited.
    pub rules: Vec<String>,
    /// Reads or writes.
    pub on: RateTarget,
}

/// `[capacity]`: free space every datastore of a VM keeps (B9).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapacityOptions {
    /// Percent of the datastore to keep free, 1–99; 0: not checked.
    pub min_free_percent: u8,
    /// Bytes to keep free (`500GiB`); `"0"`: not checked.
    pub min_free: String,
}

impl Default for CapacityOptions {
    fn default() -> Self {
        CapacityOptions {
            min_free_percent: 10,
            min_free: "500GiB".into(),
        }
    }
}

/// `[retries]`: how often a VM whose run failed for a network-type reason
/// is tried again (B17), and the reconnect window of a dropped connection
/// (B12).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryOptions {
    /// Retries, 0–10.
    pub count: u32,
    /// Time between them, 0–120 min (`10m`, `90s`).
    pub interval: String,
    /// How long a dropped source or pool connection is re-established
    /// before the attempt fails, 1–60 min.
    pub reconnect_window: String,
}

impl Default for RetryOptions {
    fn default() -> Self {
        RetryOptions {
            count: 3,
            interval: "10m".into(),
            reconnect_window: "10m".into(),
        }
    }
}

/// `[source]`: how disks are read (B16) — or, in a restore, written (R7).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceOptions {
    /// Bytes per read (or write) request, 64 KiB–8 MiB.
    pub buffer: String,
    /// Network timeout, 1–10 min.
    pub timeout: String,
    /// Log detail.
    pub log_level: LogLevel,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            buffer: "1MiB".into(),
            timeout: "10m".into(),
            log_level: LogLevel::Info,
        }
    }
}

/// What a job does when a disk's changed-block tracking is missing or
/// cannot be trusted (spec B4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CbtMissing {
    /// Read the whole disk against its previous snapshot (only changed
    /// chunks are stored). The default.
    #[default]
    Full,
    /// Leave the VM out of this run and raise an alert.
    SkipAlert,
    /// Leave the VM out of this run silently.
    Skip,
}

impl CbtMissing {
    /// The engine's policy.
    pub fn policy(self) -> CbtPolicy {
        match self {
            CbtMissing::Full => CbtPolicy::Full,
            CbtMissing::SkipAlert => CbtPolicy::SkipAlert,
            CbtMissing::Skip => CbtPolicy::Skip,
        }
    }
}

/// `[cbt]`: changed-block tracking (spec B3, B4). Enabled, every backup
/// starts a dirty bitmap on each disk that supports one (qcow2), and an
/// incremental backup reads only what the previous one's bitmap marks
/// dirty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CbtOptions {
    /// Track changed blocks (off by default).
    pub enabled: bool,
    /// When a bitmap is missing or not trusted: `full`, `skip-alert` or
    /// `skip`.
    pub missing: CbtMissing,
    /// The bitmaps' chain name (1–64 of `A-Z a-z 0-9 - _`); the job's name
    /// (other characters as `_`) when absent.
    pub chain: Option<String>,
    /// Clean extents per disk read back and compared with the previous
    /// snapshot before a bitmap is trusted, 0–64 (0: none).
    pub spot_check: u32,
}

/// `[scripts]`: commands run by `sh -c` (B15), each with a timeout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScriptOptions {
    /// Runs before anything else; a non-zero exit means the job does not
    /// run this time and stays idle.
    pub precondition: Option<String>,
    /// Runs before each VM's data is read.
    pub pre: Option<String>,
    /// Runs after each VM, whatever its result.
    pub post: Option<String>,
    /// Longest a script may run, 1 s–24 h (`5m`); then it is killed and
    /// counts as failed.
    pub timeout: String,
}

impl Default for ScriptOptions {
    fn default() -> Self {
        ScriptOptions {
            precondition: None,
            pre: None,
            post: None,
            timeout: "5m".into(),
        }
    }
}

/// `[notify]`: where events (job failed, VM skipped …) go besides the
/// job's log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyOptions {
    /// A command run by `sh -c` per event, the event as JSON on its
    /// standard input and in `CAIRN_EVENT*` variables (a webhook is
    /// `curl -d @- URL`).
    pub command: Option<String>,
}

/// `[restore]`: what a restore job restores (R7, R8).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestoreJobOptions {
    /// Which snapshot of each VM: `latest`, or a snapshot id (prefix).
    pub snapshot: String,
    /// Write channels per disk, 1–64.
    pub channels: u32,
}

impl Default for RestoreJobOptions {
    fn default() -> Self {
        RestoreJobOptions {
            snapshot: "latest".into(),
            channels: 2,
        }
    }
}

/// Compression as written in a job: `"none"`, `"fast"` or a zstd level
/// 1–19 (B7).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CompressionSetting {
    /// `"none"`.
    None,
    /// `"fast"` (zstd level 1).
    #[default]
    Fast,
    /// A zstd level (checked by [`JobDefinition::resolve`]).
    Level(i64),
    /// Any other word (refused by [`JobDefinition::resolve`]).
    Other(String),
}

impl Serialize for CompressionSetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            CompressionSetting::None => s.serialize_str("none"),
            CompressionSetting::Fast => s.serialize_str("fast"),
            CompressionSetting::Level(l) => s.serialize_i64(*l),
            CompressionSetting::Other(w) => s.serialize_str(w),
        }
    }
}

impl<'de> Deserialize<'de> for CompressionSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = CompressionSetting;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"none\", \"fast\" or a zstd level 1–19")
            }
            fn visit_str<E: serde::de::Error>(
                self,
                v: &str,
            ) -> std::result::Result<Self::Value, E> {
                Ok(match v {
                    "none" => CompressionSetting::None,
                    "fast" => CompressionSetting::Fast,
                    other => CompressionSetting::Other(other.to_string()),
                })
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
                Ok(CompressionSetting::Level(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
                Ok(CompressionSetting::Level(
                    i64::try_from(v).unwrap_or(i64::MAX),
                ))
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn immediate() -> String {
    "immediate".into()
}

/// A job as written in its TOML file (see the module docs). Check it with
/// [`resolve`](Self::resolve).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct JobDefinition {
    /// The job's name: 1–64 of `A-Z a-z 0-9 . _ -`, not starting with `.`.
    pub name: String,
    /// Backup or restore.
    pub kind: JobKind,
    /// Incremental (default) or full; backups only.
    #[serde(default)]
    pub mode: BackupMode,
    /// The platform's address, resolved by the application running the
    /// job (the `cairn` CLI knows `inventory:PATH`).
    pub platform: String,
    /// The pool's address.
    pub pool: String,
    /// When it runs (see [`Schedule`]); restore jobs: `immediate` or
    /// `once …` (R8).
    #[serde(default = "immediate")]
    pub schedule: String,
    /// The time zone of the schedule and rate windows (IANA name); the
    /// system's when absent.
    #[serde(default)]
    pub timezone: Option<String>,
    /// After downtime, run once for the runs missed (they are reported
    /// either way).
    #[serde(default)]
    pub run_missed: bool,
    /// Which VMs.
    #[serde(default)]
    pub select: Selection,
    /// Parallelism.
    #[serde(default)]
    pub limits: Limits,
    /// Rate limit.
    #[serde(default)]
    pub rate_limit: RateOptions,
    /// Free space to keep on the VMs' datastores (backups).
    #[serde(default)]
    pub capacity: CapacityOptions,
    /// Retries and reconnects.
    #[serde(default)]
    pub retries: RetryOptions,
    /// Compression of new chunks (backups): `"none"`, `"fast"` or 1–19.
    #[serde(default)]
    pub compression: CompressionSetting,
    /// How disks are read or written.
    #[serde(default)]
    pub source: SourceOptions,
    /// Pre-condition, pre- and post-scripts.
    #[serde(default)]
    pub scripts: ScriptOptions,
    /// Event notifications.
    #[serde(default)]
    pub notify: NotifyOptions,
    /// Restore jobs: what to restore.
    #[serde(default)]
    pub restore: RestoreJobOptions,
    /// Changed-block tracking (backups).
    #[serde(default)]
    pub cbt: CbtOptions,
}

/// A checked job: the definition and its typed values.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Job {
    /// The definition as written.
    pub definition: JobDefinition,
    /// Its schedule.
    pub schedule: Schedule,
    /// The zone of the schedule and the rate windows.
    pub zone: TimeZone,
    /// The rate limit (unlimited when no rule is given).
    pub rate_limit: RateLimit,
    /// What it limits.
    pub rate_direction: Direction,
    /// The capacity rule (backups).
    pub capacity: CapacityRule,
    /// Retries of a VM after a network-type failure.
    pub retries: u32,
    /// Time between retries.
    pub retry_interval: Duration,
    /// How long a dropped connection is re-established.
    pub reconnect_window: Duration,
    /// Compression of new chunks.
    pub compression: Compression,
    /// Bytes per read or write request.
    pub buffer: usize,
    /// Network timeout.
    pub timeout: Duration,
    /// Script timeout.
    pub script_timeout: Duration,
    /// The CBT bitmap chain, when CBT is enabled.
    pub cbt_chain: Option<String>,
}

impl Job {
    /// The job's name.
    pub fn name(&self) -> &str {
        &self.definition.name
    }
}

fn field_error(job: &str, field: &str, why: impl fmt::Display) -> Error {
    Error::InvalidArgument(format!("job {job:?}: {field}: {why}"))
}

/// Parses a duration like `10m`, `90s`, `2h` and checks it lies in
/// `min..=max`; `range` is how the range reads in a message.
fn duration_in(
    job: &str,
    field: &str,
    value: &str,
    min: Duration,
    max: Duration,
    range: &str,
) -> Result<Duration> {
    let d = humantime::parse_duration(value.trim()).map_err(|e| {
        field_error(
            job,
            field,
            format!("{value:?} is not a duration like 90s, 10m or 2h ({e})"),
        )
    })?;
    if d < min || d > max {
        return Err(field_error(
            job,
            field,
            format!("{value} is out of range ({range})"),
        ));
    }
    Ok(d)
}

/// Checks a job name: 1–64 of `A-Z a-z 0-9 . _ -`, not starting with `.`
/// or `-` (it names files in the state directory).
pub fn check_job_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "job name {name:?} is not valid (1–64 of A-Z a-z 0-9 . _ -, not starting with . or -)"
        )))
    }
}

impl JobDefinition {
    /// Parses a job's TOML text (`origin` names it in errors: a file
    /// path). Unknown keys and wrong types are refused here, with the line;
    /// ranges are checked by [`resolve`](Self::resolve).
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            Error::InvalidArgument(format!("job file {origin}: {}", e.to_string().trim_end()))
        })
    }

    /// The definition as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self)
            .map_err(|e| Error::InvalidArgument(format!("job {:?}: {e}", self.name)))
    }

    /// Checks every value against its range and gives the typed job. The
    /// first problem found is the error, naming the key.
    pub fn resolve(&self) -> Result<Job> {
        check_job_name(&self.name)?;
        let job = self.name.as_str();
        let err = |field: &str, why: String| field_error(job, field, why);
        if self.platform.trim().is_empty() {
            return Err(err("platform", "is empty (the platform's address)".into()));
        }
        if self.pool.trim().is_empty() {
            return Err(err("pool", "is empty (the pool's address)".into()));
        }
        let schedule: Schedule = self
            .schedule
            .parse()
            .map_err(|e: Error| err("schedule", strip_invalid(e)))?;
        let zone = match &self.timezone {
            Some(name) => TimeZone::get(name).map_err(|e| {
                err(
                    "timezone",
                    format!(
                        "{name:?} is not a known time zone (an IANA name like Europe/Berlin): {e}"
                    ),
                )
            })?,
            None => TimeZone::system(),
        };
        match schedule {
            Schedule::Immediate | Schedule::Once(_) => {}
            _ if self.kind == JobKind::Restore => {
                return Err(err(
                    "schedule",
                    format!(
                        "{:?}: a restore job runs immediately or once (R8), not repeatedly",
                        self.schedule
                    ),
                ))
            }
            _ => {
                // A repeating schedule that never fires (31 February) is a
                // mistake, not a job.
                if schedule.next_after(&zone, Timestamp::now()).is_none() {
                    return Err(err("schedule", format!("{:?} never runs", self.schedule)));
                }
            }
        }
        if self.select.is_empty() {
            return Err(err(
                "select",
                "names no host, VM or keyword (hosts, vms, keywords)".into(),
            ));
        }
        self.select.check_entries()?;
        self.limits
            .validate()
            .map_err(|e| err("limits", strip_invalid(e)))?;
        let rate_limit = RateLimit::parse(&self.rate_limit.rules)
            .map_err(|e| err("rate_limit.rules", strip_invalid(e)))?;
        let rate_direction = match self.rate_limit.on {
            RateTarget::Reads => Direction::Reads,
            RateTarget::Writes => Direction::Writes,
        };
        if self.capacity.min_free_percent > 99 {
            return Err(err(
                "capacity.min_free_percent",
                format!(
                    "{} is out of range (1–99, or 0 for no check)",
                    self.capacity.min_free_percent
                ),
            ));
        }
        let min_free = parse_size(&self.capacity.min_free).map_err(|e| {
            err(
                "capacity.min_free",
                format!("{e} (a size like 500GiB, or 0 for no check)"),
            )
        })?;
        let capacity = CapacityRule::new(
            (self.capacity.min_free_percent > 0).then_some(self.capacity.min_free_percent),
            (min_free > 0).then_some(min_free),
        )?;
        if self.retries.count > 10 {
            return Err(err(
                "retries.count",
                format!("{} is out of range (0–10)", self.retries.count),
            ));
        }
        let minute = Duration::from_secs(60);
        let retry_interval = duration_in(
            job,
            "retries.interval",
            &self.retries.interval,
            Duration::ZERO,
            120 * minute,
            "0–120 min",
        )?;
        let reconnect_window = duration_in(
            job,
            "retries.reconnect_window",
            &self.retries.reconnect_window,
            minute,
            60 * minute,
            "1–60 min",
        )?;
        let compression = match &self.compression {
            CompressionSetting::None => Compression::None,
            CompressionSetting::Fast => Compression::Zstd { level: 1 },
            CompressionSetting::Level(l) if (1..=19).contains(l) => {
                Compression::Zstd { level: *l as i32 }
            }
            CompressionSetting::Level(l) => {
                return Err(err(
                    "compression",
                    format!("level {l} is out of range (\"none\", \"fast\" or 1–19)"),
                ))
            }
            CompressionSetting::Other(w) => {
                return Err(err(
                    "compression",
                    format!("{w:?} is not \"none\", \"fast\" or a level 1–19"),
                ))
            }
        };
        let buffer = parse_size(&self.source.buffer)
            .map_err(|e| err("source.buffer", format!("{e} (64KiB–8MiB)")))?;
        if !(64 << 10..=8 << 20).contains(&buffer) {
            return Err(err(
                "source.buffer",
                format!("{} is out of range (64KiB–8MiB)", self.source.buffer),
            ));
        }
        let timeout = duration_in(
            job,
            "source.timeout",
            &self.source.timeout,
            minute,
            10 * minute,
            "1–10 min",
        )?;
        let script_timeout = duration_in(
            job,
            "scripts.timeout",
            &self.scripts.timeout,
            Duration::from_secs(1),
            24 * 60 * minute,
            "1s–24h",
        )?;
        for (field, script) in [
            ("scripts.precondition", &self.scripts.precondition),
            ("scripts.pre", &self.scripts.pre),
            ("scripts.post", &self.scripts.post),
            ("notify.command", &self.notify.command),
        ] {
            if script.as_deref().is_some_and(|s| s.trim().is_empty()) {
                return Err(err(field, "is empty (leave the key out for none)".into()));
            }
        }
        if self.kind == JobKind::Restore {
            if self.restore.snapshot.trim().is_empty() {
                return Err(err(
                    "restore.snapshot",
                    "is empty (latest, or a snapshot id)".into(),
                ));
            }
            if !(1..=64).contains(&self.restore.channels) {
                return Err(err(
                    "restore.channels",
                    format!("{} is out of range (1–64)", self.restore.channels),
                ));
            }
        }
        let cbt_chain = if self.cbt.enabled {
            if self.kind == JobKind::Restore {
                return Err(err("cbt.enabled", "applies to backup jobs only".into()));
            }
            let chain = match &self.cbt.chain {
                Some(c) => {
                    let ok = !c.is_empty()
                        && c.len() <= 64
                        && c.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
                    if !ok {
                        return Err(err(
                            "cbt.chain",
                            format!("{c:?} is not 1–64 of A-Z a-z 0-9 - _"),
                        ));
                    }
                    c.clone()
                }
                None => self
                    .name
                    .bytes()
                    .map(|b| {
                        if b.is_ascii_alphanumeric() || b == b'-' {
                            b as char
                        } else {
                            '_'
                        }
                    })
                    .collect(),
            };
            if self.cbt.spot_check > 64 {
                return Err(err(
                    "cbt.spot_check",
                    format!("{} is out of range (0–64)", self.cbt.spot_check),
                ));
            }
            Some(chain)
        } else {
            None
        };
        Ok(Job {
            definition: self.clone(),
            schedule,
            zone,
            rate_limit,
            rate_direction,
            capacity,
            retries: self.retries.count,
            retry_interval,
            reconnect_window,
            compression,
            buffer: buffer as usize,
            timeout,
            script_timeout,
            cbt_chain,
        })
    }
}

/// The message of an `InvalidArgument` without its variant's prefix.
fn strip_invalid(e: Error) -> String {
    match e {
        Error::InvalidArgument(m) => m,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MINIMAL: &str = r#"
name = "web"
kind = "backup"
platform = "inventory:/vms.toml"
pool = "/srv/pool"
[select]
keywords = ["web"]
"#;

    fn with(extra: &str) -> Result<Job> {
        JobDefinition::from_toml(&format!("{MINIMAL}{extra}"), "web.toml")?.resolve()
    }

    fn with_top(extra: &str) -> Result<Job> {
        // Top-level keys go before the first table.
        let (head, tail) = MINIMAL.split_once("[select]").unwrap();
        JobDefinition::from_toml(&format!("{head}{extra}\n[select]{tail}"), "web.toml")?.resolve()
    }

    #[test]
    fn defaults_are_the_specs() {
        let job = with("").unwrap();
        assert_eq!(job.definition.mode, BackupMode::Incremental);
        assert_eq!(job.schedule, Schedule::Immediate);
        assert_eq!(job.definition.limits, Limits::default());
        assert_eq!(job.capacity, CapacityRule::default());
        assert_eq!(job.retries, 3);
        assert_eq!(job.retry_interval, Duration::from_secs(600));
        assert_eq!(job.reconnect_window, Duration::from_secs(600));
        assert_eq!(job.compression, Compression::Zstd { level: 1 });
        assert_eq!(job.buffer, 1 << 20);
        assert_eq!(job.timeout, Duration::from_secs(600));
        assert_eq!(job.script_timeout, Duration::from_secs(300));
        assert!(job.rate_limit.is_unlimited());
        assert_eq!(job.rate_direction, Direction::Reads);
        assert_eq!(job.definition.restore.channels, 2);
    }

    #[test]
    fn every_setting_is_read() {
        let job = with_top(
            r#"mode = "full"
schedule = "weekly mon,thu 23:00"
timezone = "Europe/Berlin"
run_missed = true
compression = 7"#,
        )
        .unwrap();
        assert_eq!(job.definition.mode, BackupMode::Full);
        assert_eq!(job.compression, Compression::Zstd { level: 7 });
        assert!(job.definition.run_missed);
        assert_eq!(job.zone, TimeZone::get("Europe/Berlin").unwrap());
        let job = with(
            r#"
[limits]
vms_per_job = 8
vms_per_host = 3
[rate_limit]
rules = ["08:00-18:00=50MiB/s"]
on = "writes"
[capacity]
min_free_percent = 0
min_free = "100GiB"
[retries]
count = 0
interval = "90s"
reconnect_window = "1h"
[source]
buffer = "64KiB"
timeout = "1m"
log_level = "warn"
[scripts]
pre = "echo pre"
timeout = "1s"
[notify]
command = "cat > /dev/null"
"#,
        )
        .unwrap();
        assert_eq!(job.definition.limits.vms_per_job, 8);
        assert_eq!(job.definition.limits.vms_per_host, 3);
        assert_eq!(job.definition.limits.disks_per_vm, 1);
        assert_eq!(job.rate_direction, Direction::Writes);
        assert_eq!(job.rate_limit.rate_at(9 * 60), Some(50 << 20));
        assert_eq!(job.rate_limit.rate_at(19 * 60), None);
        assert_eq!(
            job.capacity,
            CapacityRule::new(None, Some(100 << 30)).unwrap()
        );
        assert_eq!(job.retries, 0);
        assert_eq!(job.retry_interval, Duration::from_secs(90));
        assert_eq!(job.reconnect_window, Duration::from_secs(3600));
        assert_eq!(job.buffer, 64 << 10);
        assert_eq!(job.timeout, Duration::from_secs(60));
        assert_eq!(job.definition.source.log_level, LogLevel::Warn);
        assert_eq!(job.script_timeout, Duration::from_secs(1));
        assert_eq!(job.definition.scripts.pre.as_deref(), Some("echo pre"));
        assert_eq!(
            job.definition.notify.command.as_deref(),
            Some("cat > /dev/null")
        );
        assert_eq!(
            with_top("compression = \"none\"").unwrap().compression,
            Compression::None
        );
    }

    /// Each bad value is refused naming its key and the allowed range.
    #[test]
    fn bad_values_name_their_key_and_range() {
        let cases: &[(&str, bool, &str)] = &[
            (
                "vms_per_job = 40",
                false,
                "limits: vms_per_job = 40 is out of range (1–32)",
            ),
            (
                "vms_per_host = 0",
                false,
                "vms_per_host = 0 is out of range (1–10)",
            ),
            (
                "disks_per_vm = 6",
                false,
                "disks_per_vm = 6 is out of range (1–5)",
            ),
            (
                "streams_per_disk = 0",
                false,
                "streams_per_disk = 0 is out of range (1–5)",
            ),
            (
                "count = 11",
                false,
                "retries.count: 11 is out of range (0–10)",
            ),
            (
                "interval = \"121m\"",
                false,
                "retries.interval: 121m is out of range (0–120 min)",
            ),
            (
                "interval = \"soon\"",
                false,
                "retries.interval: \"soon\" is not a duration",
            ),
            (
                "reconnect_window = \"30s\"",
                false,
                "retries.reconnect_window: 30s is out of range (1–60 min)",
            ),
            ("reconnect_window = \"61m\"", false, "(1–60 min)"),
            (
                "buffer = \"32KiB\"",
                false,
                "source.buffer: 32KiB is out of range (64KiB–8MiB)",
            ),
            (
                "buffer = \"9MiB\"",
                false,
                "source.buffer: 9MiB is out of range (64KiB–8MiB)",
            ),
            (
                "timeout = \"11m\"",
                false,
                "source.timeout: 11m is out of range (1–10 min)",
            ),
            (
                "min_free_percent = 100",
                false,
                "capacity.min_free_percent: 100 is out of range (1–99, or 0 for no check)",
            ),
            ("min_free = \"lots\"", false, "capacity.min_free:"),
            (
                "rules = [\"08:00-18:00=50MB/s\"]",
                false,
                "rate_limit.rules:",
            ),
            (
                "compression = 20",
                true,
                "compression: level 20 is out of range (\"none\", \"fast\" or 1–19)",
            ),
            (
                "compression = 0",
                true,
                "compression: level 0 is out of range",
            ),
            (
                "compression = \"best\"",
                true,
                "compression: \"best\" is not \"none\", \"fast\" or a level 1–19",
            ),
            ("schedule = \"daily 25:00\"", true, "schedule:"),
            ("schedule = \"monthly feb 30 03:00\"", true, "schedule:"),
            (
                "timezone = \"Mars/Olympus\"",
                true,
                "timezone: \"Mars/Olympus\" is not a known time zone",
            ),
            (
                "name = \"../etc\"",
                true,
                "job name \"../etc\" is not valid",
            ),
        ];
        for (line, top, want) in cases {
            let table = match line.split_once(' ').unwrap().0 {
                "vms_per_job" | "vms_per_host" | "disks_per_vm" | "streams_per_disk" => "[limits]",
                "count" | "interval" | "reconnect_window" => "[retries]",
                "buffer" | "timeout" => "[source]",
                "min_free_percent" | "min_free" => "[capacity]",
                "rules" => "[rate_limit]",
                _ => "",
            };
            let r = if *top {
                if line.starts_with("name") {
                    JobDefinition::from_toml(&MINIMAL.replace("name = \"web\"", line), "w")
                        .unwrap()
                        .resolve()
                } else {
                    with_top(line)
                }
            } else {
                with(&format!("\n{table}\n{line}\n"))
            };
            let e = r.err().unwrap_or_else(|| panic!("{line} was accepted"));
            assert!(matches!(e, Error::InvalidArgument(_)), "{line}: {e}");
            let m = e.to_string();
            assert!(m.contains(want), "{line}: {m}");
        }
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_with_their_line() {
        let e = with("\n[limits]\nvms_per_jobs = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("web.toml") && e.contains("vms_per_jobs"), "{e}");
        assert!(e.contains("line 10"), "{e}");
        let e = with_top("sechdule = \"daily 02:00\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field") && e.contains("sechdule"), "{e}");
        let e = with("\n[limits]\nvms_per_job = \"four\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("vms_per_job"), "{e}");
        let e = with_top("kind2 = 1").unwrap_err().to_string();
        assert!(e.contains("kind2"), "{e}");
        let e = JobDefinition::from_toml("name = \"x\"\nkind = \"copy\"", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("copy") && e.contains("backup"), "{e}");
    }

    #[test]
    fn restore_jobs_run_immediately_or_once() {
        let restore = MINIMAL.replace("kind = \"backup\"", "kind = \"restore\"");
        let ok = |extra: &str| {
            let (head, tail) = restore.split_once("[select]").unwrap();
            JobDefinition::from_toml(&format!("{head}{extra}\n[select]{tail}"), "r")
                .unwrap()
                .resolve()
        };
        assert!(ok("").is_ok());
        assert!(ok("schedule = \"once 2030-01-01T02:00\"").is_ok());
        let e = ok("schedule = \"daily 02:00\"").unwrap_err().to_string();
        assert!(e.contains("restore job runs immediately or once"), "{e}");
        let e = JobDefinition::from_toml(&format!("{restore}\n[restore]\nchannels = 65\n"), "r")
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("restore.channels: 65 is out of range (1–64)"),
            "{e}"
        );
    }

    #[test]
    fn empty_selection_platform_and_scripts_are_refused() {
        let e = JobDefinition::from_toml(&MINIMAL.replace("keywords = [\"web\"]", ""), "w")
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("select: names no host"), "{e}");
        let e = JobDefinition::from_toml(&MINIMAL.replace("inventory:/vms.toml", " "), "w")
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("platform: is empty"), "{e}");
        let e = with("\n[scripts]\npost = \"  \"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("scripts.post: is empty"), "{e}");
    }

    /// Written back as TOML, a definition reads the same.
    #[test]
    fn definitions_round_trip_through_toml() {
        let def = with_top("compression = 5\nschedule = \"daily/3 02:30\"")
            .unwrap()
            .definition;
        let text = def.to_toml().unwrap();
        assert_eq!(JobDefinition::from_toml(&text, "again").unwrap(), def);
        let def = with_top("compression = \"none\"").unwrap().definition;
        let text = def.to_toml().unwrap();
        assert_eq!(JobDefinition::from_toml(&text, "again").unwrap(), def);
    }
}
