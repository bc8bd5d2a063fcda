//! Retention: which snapshots a [`RetentionPolicy`] keeps, and why.
//!
//! Rules are applied to each VM's snapshots on their own, newest first, as
//! restic does (each rule looks at all of them; a snapshot is kept if any
//! rule keeps it):
//!
//! - `keep-last N`: the N newest snapshots;
//! - `keep-within D`: every snapshot taken within D of the VM's *newest*
//!   snapshot (not of the wall clock: a VM whose backups stopped keeps its
//!   last ones however long ago they were taken);
//! - `keep-hourly/daily/weekly/monthly/yearly N`: the newest snapshot of
//!   each of the N newest calendar buckets (hour, day, ISO week, month,
//!   year) that hold a snapshot, buckets taken in the policy's time zone
//!   (default: the local one), so a day is a day on the wall clock across
//!   DST changes;
//! - protected snapshots are always kept.
//!
//! A snapshot no rule keeps is removed. A policy without any rule is refused
//! (it would remove everything). Removing a snapshot only deletes its
//! manifest: every manifest lists all of its chunks, so the snapshots that
//! remain stay restorable whatever is removed; the chunks themselves are
//! reclaimed by garbage collection.
//!
//! A policy can be stored in a pool as a small text object (see
//! docs/FORMAT.md, "Retention policy"), one encoding per policy.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, SystemTime};

use jiff::tz::TimeZone;
use jiff::Timestamp;

use crate::error::{Error, Result};
use crate::id::SnapshotId;
use crate::snapshots::SnapshotInfo;
use crate::store::wire::DecodeError;

/// First line of a stored policy: magic and version.
pub const POLICY_MAGIC_LINE: &str = "cairn-retention 1";

/// Largest count a `keep-*` rule accepts.
pub const MAX_KEEP: u32 = 1_000_000;

/// The calendar buckets a `keep-<period>` rule counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// One bucket per wall-clock hour.
    Hourly,
    /// One bucket per calendar day.
    Daily,
    /// One bucket per ISO 8601 week (Monday to Sunday).
    Weekly,
    /// One bucket per calendar month.
    Monthly,
    /// One bucket per calendar year.
    Yearly,
}

impl Period {
    /// Every period, shortest first.
    pub const ALL: [Period; 5] = [
        Period::Hourly,
        Period::Daily,
        Period::Weekly,
        Period::Monthly,
        Period::Yearly,
    ];

    /// The rule's name (`hourly`, `daily` …).
    pub fn name(self) -> &'static str {
        match self {
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Yearly => "yearly",
        }
    }

    /// The bucket `time` falls in, in `tz`, as a sortable label
    /// (`2026-11-27T09`, `2026-11-27`, `2026-W48`, `2026-11`, `2026`).
    fn bucket(self, time: Timestamp, tz: &TimeZone) -> String {
        let z = time.to_zoned(tz.clone());
        match self {
            Period::Hourly => format!(
                "{:04}-{:02}-{:02}T{:02}",
                z.year(),
                z.month(),
                z.day(),
                z.hour()
            ),
            Period::Daily => format!("{:04}-{:02}-{:02}", z.year(), z.month(), z.day()),
            Period::Weekly => {
                let w = z.date().iso_week_date();
                format!("{:04}-W{:02}", w.year(), w.week())
            }
            Period::Monthly => format!("{:04}-{:02}", z.year(), z.month()),
            Period::Yearly => format!("{:04}", z.year()),
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which snapshots to keep. Build it with the `with_*` setters, or parse
/// the stored text form with [`RetentionPolicy::decode`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetentionPolicy {
    /// Keep the N newest snapshots of each VM.
    pub keep_last: Option<u32>,
    /// Keep every snapshot within this duration of the VM's newest one.
    pub keep_within: Option<Duration>,
    /// Keep the newest snapshot of each of the N newest buckets, per period.
    pub keep_periods: BTreeMap<Period, u32>,
    /// IANA time zone the calendar buckets are taken in; `None`: the
    /// local time zone of the machine applying the policy.
    pub time_zone: Option<String>,
}

fn check_count(rule: &str, n: u32) -> Result<u32> {
    if n == 0 || n > MAX_KEEP {
        return Err(Error::InvalidArgument(format!(
            "{rule} {n} is out of range (1 … {MAX_KEEP})"
        )));
    }
    Ok(n)
}

impl RetentionPolicy {
    /// An empty policy (no rule yet; [`apply`](Self::apply) refuses it).
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the `n` newest snapshots of each VM (1 … [`MAX_KEEP`]).
    pub fn with_keep_last(mut self, n: u32) -> Result<Self> {
        self.keep_last = Some(check_count("keep-last", n)?);
        Ok(self)
    }

    /// Keeps every snapshot within `d` of each VM's newest (whole
    /// seconds, at least 1 s).
    pub fn with_keep_within(mut self, d: Duration) -> Result<Self> {
        if d < Duration::from_secs(1) || d.subsec_nanos() != 0 {
            return Err(Error::InvalidArgument(format!(
                "keep-within {} is out of range (whole seconds, at least 1s)",
                humantime::format_duration(d)
            )));
        }
        self.keep_within = Some(d);
        Ok(self)
    }

    /// Keeps the newest snapshot of each of the `n` newest `period` buckets.
    pub fn with_keep(mut self, period: Period, n: u32) -> Result<Self> {
        let n = check_count(&format!("keep-{period}"), n)?;
        self.keep_periods.insert(period, n);
        Ok(self)
    }

    /// Takes calendar buckets in the IANA time zone `name` (`Europe/Berlin`,
    /// `UTC`); refused when the zone is unknown.
    pub fn with_time_zone(mut self, name: &str) -> Result<Self> {
        let tz = TimeZone::get(name)
            .map_err(|e| Error::InvalidArgument(format!("time zone {name:?} is not known: {e}")))?;
        // The database's own spelling (names are looked up regardless of
        // case): one encoding per stored policy.
        self.time_zone = Some(tz.iana_name().unwrap_or(name).to_string());
        Ok(self)
    }

    /// Whether the policy has no keep rule at all.
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none() && self.keep_within.is_none() && self.keep_periods.is_empty()
    }

    fn zone(&self) -> Result<TimeZone> {
        match &self.time_zone {
            Some(name) => TimeZone::get(name).map_err(|e| {
                Error::InvalidArgument(format!("time zone {name:?} is not known: {e}"))
            }),
            None => Ok(TimeZone::try_system().unwrap_or(TimeZone::UTC)),
        }
    }

    /// Decides for every snapshot in `snapshots` whether it is kept and by
    /// which rules. `protected` snapshots are always kept. Decisions come
    /// back grouped by VM (VMs by name), newest first within a VM.
    pub fn apply(
        &self,
        snapshots: &[SnapshotInfo],
        protected: &BTreeSet<SnapshotId>,
    ) -> Result<Vec<RetentionDecision>> {
        if self.is_empty() {
            return Err(Error::InvalidArgument(
                "the retention policy has no keep rule; it would remove every snapshot".into(),
            ));
        }
        let tz = self.zone()?;
        let mut by_vm: BTreeMap<&str, Vec<&SnapshotInfo>> = BTreeMap::new();
        for s in snapshots {
            by_vm.entry(&s.vm).or_default().push(s);
        }
        let mut out = Vec::with_capacity(snapshots.len());
        for (_, mut group) in by_vm {
            // Newest first; equal times ordered by id so the result is
            // deterministic.
            group.sort_by(|a, b| b.time.cmp(&a.time).then(b.id.0.cmp(&a.id.0)));
            out.extend(self.apply_group(&group, protected, &tz)?);
        }
        Ok(out)
    }

    fn apply_group(
        &self,
        group: &[&SnapshotInfo],
        protected: &BTreeSet<SnapshotId>,
        tz: &TimeZone,
    ) -> Result<Vec<RetentionDecision>> {
        let mut reasons: Vec<Vec<KeepReason>> = vec![Vec::new(); group.len()];
        for (i, s) in group.iter().enumerate() {
            if protected.contains(&s.id) {
                reasons[i].push(KeepReason::Protected);
            }
        }
        if let Some(n) = self.keep_last {
            for (i, r) in reasons.iter_mut().enumerate().take(n as usize) {
                r.push(KeepReason::Last { rank: i as u32 + 1 });
            }
        }
        if let (Some(d), Some(newest)) = (self.keep_within, group.first()) {
            let cutoff = newest.time.checked_sub(d);
            for (i, s) in group.iter().enumerate() {
                if cutoff.is_none_or(|c| s.time >= c) {
                    reasons[i].push(KeepReason::Within { duration: d });
                }
            }
        }
        for (&period, &n) in &self.keep_periods {
            let mut seen = 0u32;
            let mut last_bucket: Option<String> = None;
            for (i, s) in group.iter().enumerate() {
                if seen == n {
                    break;
                }
                let time = Timestamp::try_from(s.time).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "snapshot {} has a time out of range: {e}",
                        s.id
                    ))
                })?;
                let bucket = period.bucket(time, tz);
                if last_bucket.as_deref() != Some(bucket.as_str()) {
                    seen += 1;
                    reasons[i].push(KeepReason::Period {
                        period,
                        bucket: bucket.clone(),
                    });
                    last_bucket = Some(bucket);
                }
            }
        }
        Ok(group
            .iter()
            .zip(reasons)
            .map(|(s, reasons)| RetentionDecision {
                id: s.id,
                vm: s.vm.clone(),
                time: s.time,
                keep: !reasons.is_empty(),
                reasons,
            })
            .collect())
    }

    /// The stored text form: the magic line, then one line per rule set,
    /// in the fixed order `keep-last`, `keep-within`, `keep-hourly` …
    /// `keep-yearly`, `time-zone`; each line ends with a newline.
    pub fn encode(&self) -> String {
        let mut s = format!("{POLICY_MAGIC_LINE}\n");
        if let Some(n) = self.keep_last {
            s += &format!("keep-last {n}\n");
        }
        if let Some(d) = self.keep_within {
            s += &format!("keep-within {}s\n", d.as_secs());
        }
        for (period, n) in &self.keep_periods {
            s += &format!("keep-{period} {n}\n");
        }
        if let Some(tz) = &self.time_zone {
            s += &format!("time-zone {tz}\n");
        }
        s
    }

    /// Parses the stored text form; refuses anything [`encode`](Self::encode)
    /// would not write (unknown or repeated lines, another order, a value
    /// out of range or not in its one spelling, a missing final newline).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        Self::decode_inner(bytes).map_err(|e| {
            let why = match e {
                Error::InvalidArgument(why) => why,
                other => other.to_string(),
            };
            Error::corrupt("stored retention policy", DecodeError::Invalid(why))
        })
    }

    fn decode_inner(bytes: &[u8]) -> Result<Self> {
        let bad = Error::InvalidArgument;
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8".into()))?;
        let body = text
            .strip_suffix('\n')
            .ok_or_else(|| bad("does not end with a newline".into()))?;
        let mut lines = body.split('\n');
        if lines.next() != Some(POLICY_MAGIC_LINE) {
            return Err(bad(format!("first line is not {POLICY_MAGIC_LINE:?}")));
        }
        let mut policy = RetentionPolicy::new();
        for line in lines {
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| bad(format!("line {line:?} has no value")))?;
            let count = || -> Result<u32> {
                let n: u32 = value
                    .parse()
                    .map_err(|_| bad(format!("{key} {value:?} is not a count")))?;
                if n.to_string() != value {
                    return Err(bad(format!("{key} {value:?} is not in its one spelling")));
                }
                Ok(n)
            };
            policy = match key {
                "keep-last" => policy.with_keep_last(count()?)?,
                "keep-within" => {
                    let secs: u64 = value
                        .strip_suffix('s')
                        .and_then(|v| v.parse().ok())
                        .filter(|n: &u64| format!("{n}s") == value)
                        .ok_or_else(|| bad(format!("keep-within {value:?} is not N seconds")))?;
                    policy.with_keep_within(Duration::from_secs(secs))?
                }
                "time-zone" => policy.with_time_zone(value)?,
                other => match Period::ALL.iter().find(|p| other == format!("keep-{p}")) {
                    Some(&p) => policy.with_keep(p, count()?)?,
                    None => return Err(bad(format!("unknown line {line:?}"))),
                },
            };
        }
        if policy.encode().as_bytes() != bytes {
            return Err(bad(
                "lines are repeated or out of order (one encoding per policy)".into(),
            ));
        }
        if policy.is_empty() {
            return Err(bad("no keep rule (a stored policy keeps something)".into()));
        }
        Ok(policy)
    }
}

impl fmt::Display for RetentionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(n) = self.keep_last {
            parts.push(format!("keep-last {n}"));
        }
        if let Some(d) = self.keep_within {
            parts.push(format!("keep-within {}", humantime::format_duration(d)));
        }
        for (period, n) in &self.keep_periods {
            parts.push(format!("keep-{period} {n}"));
        }
        if parts.is_empty() {
            parts.push("no rule".into());
        }
        match &self.time_zone {
            Some(tz) => parts.push(format!("time zone {tz}")),
            None => parts.push("local time zone".into()),
        }
        f.write_str(&parts.join(", "))
    }
}

/// Why a snapshot is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeepReason {
    /// It is protected.
    Protected,
    /// `keep-last`: it is the `rank`-th newest of its VM.
    Last {
        /// 1 for the newest.
        rank: u32,
    },
    /// `keep-within`: it is within `duration` of its VM's newest.
    Within {
        /// The rule's duration.
        duration: Duration,
    },
    /// `keep-<period>`: it is the newest of `bucket`.
    Period {
        /// The rule's period.
        period: Period,
        /// The bucket's label (`2026-11-27`, `2026-W48` …).
        bucket: String,
    },
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepReason::Protected => f.write_str("protected"),
            KeepReason::Last { rank } => write!(f, "last #{rank}"),
            KeepReason::Within { duration } => {
                write!(f, "within {}", humantime::format_duration(*duration))
            }
            KeepReason::Period { period, bucket } => write!(f, "{period} {bucket}"),
        }
    }
}

impl serde::Serialize for KeepReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What a policy decided for one snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RetentionDecision {
    /// The snapshot.
    pub id: SnapshotId,
    /// Its VM.
    pub vm: String,
    /// When it was taken.
    #[serde(serialize_with = "crate::snapshots::rfc3339")]
    pub time: SystemTime,
    /// Kept (some rule keeps it) or removed.
    pub keep: bool,
    /// Every rule that keeps it; empty when it is removed.
    pub reasons: Vec<KeepReason>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::chunker::ChunkingParams;
    use crate::id::IdScheme;
    use crate::store::blob::Compression;
    use crate::store::manifest::{Snapshot, SnapshotMode};

    /// A snapshot of `vm` at the RFC 3339 instant `at`; its id is `n`.
    fn snap(n: u8, vm: &str, at: &str) -> SnapshotInfo {
        let time: Timestamp = at.parse().unwrap();
        let s = Snapshot {
            time: SystemTime::from(time),
            vm: vm.into(),
            mode: SnapshotMode::Full,
            parent: None,
            id_scheme: IdScheme::Blake3,
            chunking: ChunkingParams::default(),
            compression: Compression::None,
            properties: BTreeMap::new(),
            disks: Vec::new(),
        };
        SnapshotInfo::new(SnapshotId([n; 32]), s)
    }

    /// Ids kept, in decision order (newest first per VM).
    fn kept(policy: &RetentionPolicy, snaps: &[SnapshotInfo]) -> Vec<u8> {
        kept_protected(policy, snaps, &BTreeSet::new())
    }

    fn kept_protected(
        policy: &RetentionPolicy,
        snaps: &[SnapshotInfo],
        protected: &BTreeSet<SnapshotId>,
    ) -> Vec<u8> {
        let decisions = policy.apply(snaps, protected).unwrap();
        assert_eq!(decisions.len(), snaps.len());
        for d in &decisions {
            assert_eq!(d.keep, !d.reasons.is_empty());
        }
        decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id.0[0])
            .collect()
    }

    fn utc(p: RetentionPolicy) -> RetentionPolicy {
        p.with_time_zone("UTC").unwrap()
    }

    #[test]
    fn keep_last_keeps_the_newest_of_each_vm() {
        let snaps = [
            snap(1, "a", "2026-01-01T00:00:00Z"),
            snap(2, "a", "2026-01-02T00:00:00Z"),
            snap(3, "a", "2026-01-03T00:00:00Z"),
            snap(4, "b", "2026-01-01T00:00:00Z"),
        ];
        let p = utc(RetentionPolicy::new().with_keep_last(2).unwrap());
        assert_eq!(kept(&p, &snaps), vec![3, 2, 4]);
        let d = p.apply(&snaps, &BTreeSet::new()).unwrap();
        assert_eq!(d[0].reasons, vec![KeepReason::Last { rank: 1 }]);
        assert_eq!(d[1].reasons[0].to_string(), "last #2");
        assert!(!d[2].keep && d[2].id.0[0] == 1);
    }

    #[test]
    fn keep_within_counts_from_the_newest_snapshot_not_the_clock() {
        let snaps = [
            snap(1, "a", "2020-01-01T00:00:00Z"),
            snap(2, "a", "2020-01-09T00:00:00Z"),
            snap(3, "a", "2020-01-10T00:00:00Z"),
        ];
        let day = Duration::from_secs(86_400);
        let p = utc(RetentionPolicy::new().with_keep_within(day).unwrap());
        assert_eq!(kept(&p, &snaps), vec![3, 2]); // exactly one day before: kept
        let p = utc(RetentionPolicy::new().with_keep_within(day * 9).unwrap());
        assert_eq!(kept(&p, &snaps), vec![3, 2, 1]);
    }

    #[test]
    fn keep_daily_keeps_the_newest_of_each_day() {
        let snaps = [
            snap(1, "a", "2026-05-01T01:00:00Z"),
            snap(2, "a", "2026-05-01T23:00:00Z"),
            snap(3, "a", "2026-05-02T10:00:00Z"),
            snap(4, "a", "2026-05-04T10:00:00Z"),
            snap(5, "a", "2026-05-04T12:00:00Z"),
        ];
        let p = utc(RetentionPolicy::new().with_keep(Period::Daily, 3).unwrap());
        // Days with a snapshot: 05-04 (5), 05-02 (3), 05-01 (2); a day
        // without one (05-03) does not count.
        assert_eq!(kept(&p, &snaps), vec![5, 3, 2]);
        let d = p.apply(&snaps, &BTreeSet::new()).unwrap();
        assert_eq!(d[0].reasons[0].to_string(), "daily 2026-05-04");
        // Only the N newest days count: with two, the first of May goes.
        let p = utc(RetentionPolicy::new().with_keep(Period::Daily, 2).unwrap());
        assert_eq!(kept(&p, &snaps), vec![5, 3]);
    }

    #[test]
    fn days_are_wall_clock_days_in_the_policy_time_zone() {
        // 22:30 UTC on 24 Oct is 00:30 CEST on 25 Oct in Berlin.
        let snaps = [
            snap(1, "a", "2026-10-24T21:00:00Z"), // 23:00 CEST, 24 Oct
            snap(2, "a", "2026-10-24T22:30:00Z"), // 00:30 CEST, 25 Oct
        ];
        let daily = RetentionPolicy::new().with_keep(Period::Daily, 2).unwrap();
        assert_eq!(kept(&utc(daily.clone()), &snaps), vec![2]);
        let berlin = daily.with_time_zone("Europe/Berlin").unwrap();
        assert_eq!(kept(&berlin, &snaps), vec![2, 1]);
    }

    #[test]
    fn the_repeated_hour_of_a_fall_back_is_one_bucket() {
        // Berlin falls back at 03:00 CEST (01:00 UTC) on 25 Oct 2026: the
        // wall hour 02:00–03:00 happens twice (00:00–01:00 and 01:00–02:00 UTC).
        let snaps = [
            snap(1, "a", "2026-10-25T00:10:00Z"), // 02:10 CEST
            snap(2, "a", "2026-10-25T01:10:00Z"), // 02:10 CET
            snap(3, "a", "2026-10-25T02:10:00Z"), // 03:10 CET
        ];
        let p = RetentionPolicy::new()
            .with_keep(Period::Hourly, 3)
            .unwrap()
            .with_time_zone("Europe/Berlin")
            .unwrap();
        assert_eq!(kept(&p, &snaps), vec![3, 2]);
        // In UTC the three are in three different hours.
        let p = utc(RetentionPolicy::new().with_keep(Period::Hourly, 3).unwrap());
        assert_eq!(kept(&p, &snaps), vec![3, 2, 1]);
        // The spring-forward day (29 Mar 2026, 23 hours long) is one day.
        let spring = [
            snap(1, "a", "2026-03-28T23:30:00Z"), // 00:30 CET, 29 Mar
            snap(2, "a", "2026-03-29T21:30:00Z"), // 23:30 CEST, 29 Mar
            snap(3, "a", "2026-03-29T22:30:00Z"), // 00:30 CEST, 30 Mar
        ];
        let p = RetentionPolicy::new()
            .with_keep(Period::Daily, 5)
            .unwrap()
            .with_time_zone("Europe/Berlin")
            .unwrap();
        assert_eq!(kept(&p, &spring), vec![3, 2]);
    }

    #[test]
    fn months_end_on_the_wall_clock_and_weeks_are_iso_weeks() {
        let snaps = [
            snap(1, "a", "2026-01-30T12:00:00Z"),
            snap(2, "a", "2026-01-31T22:30:00Z"), // 23:30 CET 31 Jan
            snap(3, "a", "2026-01-31T23:30:00Z"), // 00:30 CET 1 Feb
            snap(4, "a", "2026-02-28T12:00:00Z"),
            snap(5, "a", "2026-03-01T00:30:00Z"), // 01:30 CET 1 Mar
        ];
        let monthly = RetentionPolicy::new()
            .with_keep(Period::Monthly, 3)
            .unwrap()
            .with_time_zone("Europe/Berlin")
            .unwrap();
        assert_eq!(kept(&monthly, &snaps), vec![5, 4, 2]);
        let monthly_utc = utc(RetentionPolicy::new()
            .with_keep(Period::Monthly, 3)
            .unwrap());
        assert_eq!(kept(&monthly_utc, &snaps), vec![5, 4, 3]);
        // 31 Dec 2026 (Thursday) and 3 Jan 2027 (Sunday) are both ISO week
        // 2026-W53; Monday 4 Jan 2027 starts 2027-W01.
        let weeks = [
            snap(1, "a", "2026-12-31T12:00:00Z"),
            snap(2, "a", "2027-01-03T12:00:00Z"),
            snap(3, "a", "2027-01-04T12:00:00Z"),
        ];
        let weekly = utc(RetentionPolicy::new().with_keep(Period::Weekly, 5).unwrap());
        assert_eq!(kept(&weekly, &weeks), vec![3, 2]);
        let d = weekly.apply(&weeks, &BTreeSet::new()).unwrap();
        assert_eq!(d[1].reasons[0].to_string(), "weekly 2026-W53");
        let yearly = utc(RetentionPolicy::new().with_keep(Period::Yearly, 5).unwrap());
        assert_eq!(kept(&yearly, &weeks), vec![3, 1]);
    }

    #[test]
    fn rules_add_up_and_protected_snapshots_are_always_kept() {
        let snaps = [
            snap(1, "a", "2026-01-01T00:00:00Z"),
            snap(2, "a", "2026-02-01T00:00:00Z"),
            snap(3, "a", "2026-02-02T00:00:00Z"),
            snap(4, "a", "2026-02-03T00:00:00Z"),
        ];
        let p = utc(RetentionPolicy::new()
            .with_keep_last(1)
            .unwrap()
            .with_keep(Period::Monthly, 2)
            .unwrap());
        assert_eq!(kept(&p, &snaps), vec![4, 1]);
        let protected = BTreeSet::from([SnapshotId([2; 32])]);
        assert_eq!(kept_protected(&p, &snaps, &protected), vec![4, 2, 1]);
        let d = p.apply(&snaps, &protected).unwrap();
        assert_eq!(
            d[0].reasons
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec!["last #1", "monthly 2026-02"]
        );
        assert_eq!(d[2].reasons, vec![KeepReason::Protected]);
    }

    #[test]
    fn bad_policies_are_refused() {
        assert!(RetentionPolicy::new().apply(&[], &BTreeSet::new()).is_err());
        assert!(RetentionPolicy::new().with_keep_last(0).is_err());
        assert!(RetentionPolicy::new().with_keep_last(MAX_KEEP + 1).is_err());
        assert!(RetentionPolicy::new().with_keep(Period::Daily, 0).is_err());
        assert!(RetentionPolicy::new()
            .with_keep_within(Duration::from_millis(10))
            .is_err());
        // The bounds themselves are accepted; one past them is not.
        assert!(RetentionPolicy::new().with_keep_last(MAX_KEEP).is_ok());
        assert!(RetentionPolicy::new().with_keep_last(1).is_ok());
        assert!(RetentionPolicy::new()
            .with_keep(Period::Yearly, MAX_KEEP)
            .is_ok());
        assert!(RetentionPolicy::new()
            .with_keep(Period::Yearly, MAX_KEEP + 1)
            .is_err());
        // keep-within: whole seconds, at least one.
        assert!(RetentionPolicy::new()
            .with_keep_within(Duration::from_secs(1))
            .is_ok());
        assert!(RetentionPolicy::new()
            .with_keep_within(Duration::ZERO)
            .is_err());
        assert!(RetentionPolicy::new()
            .with_keep_within(Duration::from_millis(1500))
            .is_err());
        let e = RetentionPolicy::new()
            .with_time_zone("Mars/Olympus")
            .unwrap_err();
        assert!(e.to_string().contains("Mars/Olympus"), "{e}");
    }

    #[test]
    fn stored_policies_have_one_encoding() {
        let p = RetentionPolicy::new()
            .with_keep_last(3)
            .unwrap()
            .with_keep_within(Duration::from_secs(3600))
            .unwrap()
            .with_keep(Period::Weekly, 4)
            .unwrap()
            .with_keep(Period::Daily, 7)
            .unwrap()
            .with_time_zone("Europe/Berlin")
            .unwrap();
        let text = p.encode();
        assert_eq!(
            text,
            "cairn-retention 1\nkeep-last 3\nkeep-within 3600s\nkeep-daily 7\nkeep-weekly 4\ntime-zone Europe/Berlin\n"
        );
        assert_eq!(RetentionPolicy::decode(text.as_bytes()).unwrap(), p);
        assert_eq!(
            p.to_string(),
            "keep-last 3, keep-within 1h, keep-daily 7, keep-weekly 4, time zone Europe/Berlin"
        );
        assert_eq!(
            RetentionPolicy::new().to_string(),
            "no rule, local time zone"
        );
        for bad in [
            "cairn-retention 1\nkeep-last 3",                 // no newline
            "cairn-retention 2\nkeep-last 3\n",               // version
            "cairn-retention 1\nkeep-last 03\n",              // spelling
            "cairn-retention 1\nkeep-last 0\n",               // range
            "cairn-retention 1\nkeep-last 3\nkeep-last 3\n",  // repeated
            "cairn-retention 1\nkeep-daily 3\nkeep-last 3\n", // order
            "cairn-retention 1\nkeep-within 1h\n",            // unit
            "cairn-retention 1\nkeep-forever 1\n",            // unknown
            "cairn-retention 1\ntime-zone Nowhere/Land\n",    // zone
            "cairn-retention 1\nkeep-last 3\n\n",             // empty line
            "cairn-retention 1\nkeep-last 3\ntime-zone europe/berlin\n", // zone spelling
            "cairn-retention 1\n",                            // no keep rule
            "cairn-retention 1\ntime-zone Europe/Berlin\n",   // no keep rule
        ] {
            let e = RetentionPolicy::decode(bad.as_bytes()).unwrap_err();
            assert!(e.is_damage(), "{bad:?}: {e}");
        }
    }
}
