//! Schedules (spec B6): when a job runs. A [`Schedule`] is parsed from a
//! one-line spec and gives its run times in a time zone (the backup
//! host's, by default), with the daylight-saving rules of that zone:
//!
//! ```text
//! immediate                                once, as soon as the job is added
//! once 2026-12-01T02:00                    once, at that wall time
//! hourly 08:00-18:00 every 2h              08:00, 10:00, … 18:00 each day
//! hourly every 30m                         00:00, 00:30, … 23:30 each day
//! daily 02:30            daily/3 02:30     every day; every 3rd day
//! weekly mon,thu 23:00   weekly/2 sat 01:00
//! monthly jan,jul 1,15 03:00               chosen months, days of month
//! monthly * last-sun 03:00                 … or the last / Nth weekday
//! monthly * 2nd-tue,last 03:00             (`last`: the month's last day)
//! ```
//!
//! Several times may be listed (`daily 02:30,14:00`). The window of an
//! hourly schedule includes its end and may run past midnight
//! (`22:00-02:00`); runs start again at the window's start each day.
//! `daily/N` and `weekly/N` count days and ISO weeks from 1970-01-01 (a
//! Thursday; weeks from Monday 1969-12-29): a day or week runs when its
//! number is a multiple of N, whatever the date the job was added, so the
//! rhythm survives restarts and edits.
//!
//! Wall times follow the zone's rules: a wall time that does not exist
//! (clocks spring forward) runs at the instant the offset in force before
//! the switch gives it — 02:30 in Europe/Berlin on the last Sunday of March
//! runs at 03:30 — and a wall time that occurs twice (clocks fall back)
//! runs once, at its first occurrence (RFC 5545's rule; jiff's
//! `compatible` disambiguation). Two wall times that land on one instant
//! (02:30 and 03:30 on a spring-forward day) run once.

use std::fmt;
use std::str::FromStr;

use jiff::civil::{Date, DateTime, Weekday};
use jiff::tz::{Disambiguation, TimeZone};
use jiff::{Timestamp, ToSpan};

use crate::{Error, Result};

/// Minutes in a day.
const DAY: u16 = 24 * 60;

/// How far ahead a run is sought: the Gregorian calendar repeats every
/// 400 years, so a schedule that can run at all runs within them
/// (`monthly feb 5th-mon` runs once in 28 years, or more across 2100).
const HORIZON_DAYS: i32 = 146_097;

/// When a job runs (see the module docs for the spec forms).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Schedule {
    /// Once, when the job is added.
    Immediate,
    /// Once, at a wall time.
    Once(DateTime),
    /// Every `every` minutes from the window's start (minutes of the day)
    /// to its end (inclusive; past midnight when end < start), each day.
    Hourly {
        /// (start, end) in minutes of the day; `None`: the whole day.
        window: Option<(u16, u16)>,
        /// Minutes between runs, 1–1440.
        every: u16,
    },
    /// On days whose number since 1970-01-01 is a multiple of `every`.
    Daily {
        /// 1–366.
        every: u16,
        /// Minutes of the day, ascending.
        times: Vec<u16>,
    },
    /// On the chosen weekdays of ISO weeks whose number since 1969-12-29
    /// is a multiple of `every`.
    Weekly {
        /// 1–52.
        every: u16,
        /// Bit `n` set: weekday `n` (Monday 0 … Sunday 6).
        days: u8,
        /// Minutes of the day, ascending.
        times: Vec<u16>,
    },
    /// In the chosen months, on the chosen days.
    Monthly {
        /// Bit `n` set: month `n + 1`.
        months: u16,
        /// Which days of those months.
        days: Vec<MonthDay>,
        /// Minutes of the day, ascending.
        times: Vec<u16>,
    },
}

/// A day of a month in a monthly schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MonthDay {
    /// Day 1–31 (a month without that day has no run).
    Day(u8),
    /// The month's last day.
    Last,
    /// The Nth (1–5) such weekday (a month without a 5th has no run).
    Nth(u8, Weekday),
    /// The month's last such weekday.
    LastWeekday(Weekday),
}

impl MonthDay {
    /// The canonical order: days, `last`, Nth weekdays, last weekdays.
    fn order(self) -> (u8, u8, i8) {
        match self {
            MonthDay::Day(n) => (0, n, 0),
            MonthDay::Last => (1, 0, 0),
            MonthDay::Nth(n, w) => (2, n, w.to_monday_zero_offset()),
            MonthDay::LastWeekday(w) => (3, 0, w.to_monday_zero_offset()),
        }
    }
}

const WEEKDAYS: [(&str, Weekday); 7] = [
    ("mon", Weekday::Monday),
    ("tue", Weekday::Tuesday),
    ("wed", Weekday::Wednesday),
    ("thu", Weekday::Thursday),
    ("fri", Weekday::Friday),
    ("sat", Weekday::Saturday),
    ("sun", Weekday::Sunday),
];

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];

/// The longest each month can be (February in a leap year).
const MONTH_MAX: [u8; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

fn bad(spec: &str, why: impl fmt::Display) -> Error {
    Error::InvalidArgument(format!("schedule {spec:?}: {why}"))
}

fn weekday_named(s: &str) -> Option<Weekday> {
    WEEKDAYS.iter().find(|(n, _)| *n == s).map(|(_, w)| *w)
}

fn weekday_name(w: Weekday) -> &'static str {
    WEEKDAYS
        .iter()
        .find(|(_, d)| *d == w)
        .map_or("?", |(n, _)| n)
}

/// `HH:MM` as minutes of the day; `24:00` only when `end_of_day`.
fn parse_time(spec: &str, s: &str, end_of_day: bool) -> Result<u16> {
    let parsed = s.split_once(':').and_then(|(h, m)| {
        let ok = h.len() == 2 && m.len() == 2;
        let (h, m) = (h.parse::<u16>().ok()?, m.parse::<u16>().ok()?);
        ok.then_some((h, m))
    });
    match parsed {
        Some((h, m)) if h < 24 && m < 60 => Ok(h * 60 + m),
        Some((24, 0)) if end_of_day => Ok(DAY),
        _ => Err(bad(
            spec,
            format!(
                "time {s:?} is not a wall time HH:MM (00:00–23:59{})",
                if end_of_day {
                    ", or 24:00 as a window's end"
                } else {
                    ""
                }
            ),
        )),
    }
}

fn parse_times(spec: &str, s: Option<&str>) -> Result<Vec<u16>> {
    let s = s.ok_or_else(|| bad(spec, "a time of day (HH:MM) is missing"))?;
    let mut times = Vec::new();
    for t in s.split(',') {
        times.push(parse_time(spec, t, false)?);
    }
    times.sort_unstable();
    times.dedup();
    Ok(times)
}

/// `daily/3` → 3; `daily` → 1.
fn parse_every(spec: &str, kind: &str, every: Option<&str>, max: u16) -> Result<u16> {
    let Some(n) = every else {
        return Ok(1);
    };
    match n.parse::<u16>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(bad(
            spec,
            format!("{kind}/N: N = {n:?} is out of range (1–{max})"),
        )),
    }
}

fn parse_month_day(spec: &str, s: &str) -> Result<MonthDay> {
    if s == "last" {
        return Ok(MonthDay::Last);
    }
    if let Some(w) = s.strip_prefix("last-") {
        return weekday_named(w)
            .map(MonthDay::LastWeekday)
            .ok_or_else(|| bad(spec, format!("{w:?} is not a weekday (mon … sun)")));
    }
    for (n, prefix) in ["1st-", "2nd-", "3rd-", "4th-", "5th-"].iter().enumerate() {
        if let Some(w) = s.strip_prefix(prefix) {
            return weekday_named(w)
                .map(|w| MonthDay::Nth(n as u8 + 1, w))
                .ok_or_else(|| bad(spec, format!("{w:?} is not a weekday (mon … sun)")));
        }
    }
    match s.parse::<u8>() {
        Ok(d) if (1..=31).contains(&d) => Ok(MonthDay::Day(d)),
        _ => Err(bad(
            spec,
            format!(
                "day {s:?} is not a day of the month (1–31, last, 1st-mon … 5th-sun, last-mon … last-sun)"
            ),
        )),
    }
}

impl FromStr for Schedule {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Schedule> {
        let mut words = spec.split_whitespace();
        let head = words.next().unwrap_or("");
        let (kind, every) = match head.split_once('/') {
            Some((k, n)) => (k, Some(n)),
            None => (head, None),
        };
        if every.is_some() && !matches!(kind, "daily" | "weekly") {
            return Err(bad(
                spec,
                format!("{kind} takes no /N (daily/N and weekly/N do)"),
            ));
        }
        let schedule = match kind {
            "immediate" => Schedule::Immediate,
            "once" => {
                let at = words
                    .next()
                    .ok_or_else(|| bad(spec, "once needs a wall time (like 2026-12-01T02:00)"))?;
                let dt = DateTime::from_str(at).map_err(|e| {
                    bad(spec, format!("{at:?} is not a wall time like 2026-12-01T02:00: {e}"))
                })?;
                Schedule::Once(dt)
            }
            "hourly" => {
                let mut next = words.next();
                let mut window = None;
                if let Some((start, end)) = next.and_then(|w| w.split_once('-')) {
                    window = Some((
                        parse_time(spec, start, false)?,
                        parse_time(spec, end, true)?,
                    ));
                    next = words.next();
                }
                if next != Some("every") {
                    return Err(bad(spec, "hourly needs `every Nh` or `every Nm`"));
                }
                let n = words.next().unwrap_or("");
                let minutes = match (n.strip_suffix('h'), n.strip_suffix('m')) {
                    (Some(h), _) => h
                        .parse::<u16>()
                        .ok()
                        .filter(|h| (1..=24).contains(h))
                        .map(|h| h * 60)
                        .ok_or_else(|| bad(spec, format!("every {n}: hours out of range (1h–24h)")))?,
                    (_, Some(m)) => m
                        .parse::<u16>()
                        .ok()
                        .filter(|m| (1..=DAY).contains(m))
                        .ok_or_else(|| {
                            bad(spec, format!("every {n}: minutes out of range (1m–1440m)"))
                        })?,
                    _ => {
                        return Err(bad(
                            spec,
                            format!("every {n:?}: give hours (2h) or minutes (30m)"),
                        ))
                    }
                };
                Schedule::Hourly {
                    window,
                    every: minutes,
                }
            }
            "daily" => Schedule::Daily {
                every: parse_every(spec, kind, every, 366)?,
                times: parse_times(spec, words.next())?,
            },
            "weekly" => {
                let every = parse_every(spec, kind, every, 52)?;
                let days_word = words
                    .next()
                    .ok_or_else(|| bad(spec, "weekly needs weekdays (like mon,thu or *)"))?;
                let mut days = 0u8;
                if days_word == "*" {
                    days = 0x7f;
                } else {
                    for d in days_word.split(',') {
                        let w = weekday_named(d).ok_or_else(|| {
                            bad(spec, format!("{d:?} is not a weekday (mon … sun, or *)"))
                        })?;
                        days |= 1 << w.to_monday_zero_offset();
                    }
                }
                Schedule::Weekly {
                    every,
                    days,
                    times: parse_times(spec, words.next())?,
                }
            }
            "monthly" => {
                let months_word = words
                    .next()
                    .ok_or_else(|| bad(spec, "monthly needs months (like jan,jul or *)"))?;
                let mut months = 0u16;
                if months_word == "*" {
                    months = 0xfff;
                } else {
                    for m in months_word.split(',') {
                        let i = MONTHS.iter().position(|n| *n == m).ok_or_else(|| {
                            bad(spec, format!("{m:?} is not a month (jan … dec, or *)"))
                        })?;
                        months |= 1 << i;
                    }
                }
                let days_word = words.next().ok_or_else(|| {
                    bad(spec, "monthly needs days (like 1,15 or last-sun or 2nd-tue)")
                })?;
                let mut days = Vec::new();
                for d in days_word.split(',') {
                    days.push(parse_month_day(spec, d)?);
                }
                days.sort_unstable_by_key(|d| d.order());
                days.dedup();
                // A month runs when one of its days can exist in it.
                let possible = (0..12).filter(|m| months & (1 << m) != 0).any(|m| {
                    days.iter().any(|d| match d {
                        MonthDay::Day(n) => *n <= MONTH_MAX[m],
                        _ => true,
                    })
                });
                if !possible {
                    return Err(bad(spec, "no chosen month has any of the chosen days: it never runs"));
                }
                Schedule::Monthly {
                    months,
                    days,
                    times: parse_times(spec, words.next())?,
                }
            }
            "" => return Err(bad(spec, "empty (immediate, once, hourly, daily, weekly or monthly)")),
            k => {
                return Err(bad(
                    spec,
                    format!("{k:?} is not a schedule kind (immediate, once, hourly, daily, weekly, monthly)"),
                ))
            }
        };
        if let Some(extra) = words.next() {
            return Err(bad(spec, format!("unexpected {extra:?} at the end")));
        }
        Ok(schedule)
    }
}

fn hhmm(f: &mut fmt::Formatter<'_>, minutes: u16) -> fmt::Result {
    write!(f, "{:02}:{:02}", minutes / 60, minutes % 60)
}

fn times_list(f: &mut fmt::Formatter<'_>, times: &[u16]) -> fmt::Result {
    for (i, t) in times.iter().enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        hhmm(f, *t)?;
    }
    Ok(())
}

/// The canonical spec: parsing it gives the same schedule.
impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let every = |f: &mut fmt::Formatter<'_>, kind: &str, n: u16| {
            if n == 1 {
                write!(f, "{kind} ")
            } else {
                write!(f, "{kind}/{n} ")
            }
        };
        match self {
            Schedule::Immediate => f.write_str("immediate"),
            Schedule::Once(dt) => write!(f, "once {}", dt.strftime("%Y-%m-%dT%H:%M:%S")),
            Schedule::Hourly { window, every } => {
                f.write_str("hourly ")?;
                if let Some((s, e)) = window {
                    hhmm(f, *s)?;
                    f.write_str("-")?;
                    hhmm(f, *e)?;
                    f.write_str(" ")?;
                }
                if every % 60 == 0 {
                    write!(f, "every {}h", every / 60)
                } else {
                    write!(f, "every {every}m")
                }
            }
            Schedule::Daily { every: n, times } => {
                every(f, "daily", *n)?;
                times_list(f, times)
            }
            Schedule::Weekly {
                every: n,
                days,
                times,
            } => {
                every(f, "weekly", *n)?;
                if *days == 0x7f {
                    f.write_str("*")?;
                } else {
                    let names: Vec<&str> = WEEKDAYS
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| days & (1 << i) != 0)
                        .map(|(_, (n, _))| *n)
                        .collect();
                    f.write_str(&names.join(","))?;
                }
                f.write_str(" ")?;
                times_list(f, times)
            }
            Schedule::Monthly {
                months,
                days,
                times,
            } => {
                f.write_str("monthly ")?;
                if *months == 0xfff {
                    f.write_str("*")?;
                } else {
                    let names: Vec<&str> = MONTHS
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| months & (1 << i) != 0)
                        .map(|(_, n)| *n)
                        .collect();
                    f.write_str(&names.join(","))?;
                }
                f.write_str(" ")?;
                for (i, d) in days.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    match d {
                        MonthDay::Day(n) => write!(f, "{n}")?,
                        MonthDay::Last => f.write_str("last")?,
                        MonthDay::Nth(n, w) => {
                            let nth = ["1st", "2nd", "3rd", "4th", "5th"][(*n as usize - 1) % 5];
                            write!(f, "{nth}-{}", weekday_name(*w))?
                        }
                        MonthDay::LastWeekday(w) => write!(f, "last-{}", weekday_name(*w))?,
                    }
                }
                f.write_str(" ")?;
                times_list(f, times)
            }
        }
    }
}

/// The instant a wall time runs at in `tz` (see the module docs).
fn resolve(tz: &TimeZone, dt: DateTime) -> Option<Timestamp> {
    tz.to_ambiguous_timestamp(dt)
        .disambiguate(Disambiguation::Compatible)
        .ok()
}

fn epoch_day() -> Date {
    Date::constant(1970, 1, 1)
}

/// Days since 1970-01-01 (negative before).
fn day_number(d: Date) -> i64 {
    i64::from((d - epoch_day()).get_days())
}

fn month_day_matches(d: Date, md: MonthDay) -> bool {
    match md {
        MonthDay::Day(n) => d.day() as u8 == n,
        MonthDay::Last => d.day() == d.days_in_month(),
        MonthDay::Nth(n, w) => d.weekday() == w && (d.day() as u8 - 1) / 7 + 1 == n,
        MonthDay::LastWeekday(w) => d.weekday() == w && d.day() + 7 > d.days_in_month(),
    }
}

impl Schedule {
    /// Whether the schedule runs on civil day `d` at all, and at which
    /// minutes of the day (past 1440: the next day, for hourly windows
    /// that run past midnight).
    fn minutes_on(&self, d: Date) -> Vec<u32> {
        let times = |t: &[u16]| t.iter().map(|m| u32::from(*m)).collect();
        match self {
            Schedule::Immediate | Schedule::Once(_) => Vec::new(),
            Schedule::Hourly { window, every } => {
                let (start, end) = window.unwrap_or((0, DAY - 1));
                let (start, end) = (u32::from(start), u32::from(end));
                let len = if end >= start {
                    end - start
                } else {
                    end + u32::from(DAY) - start
                };
                (0..)
                    .map(|k| start + k * u32::from(*every))
                    .take_while(|m| *m <= start + len)
                    .collect()
            }
            Schedule::Daily { every, times: t } => {
                if day_number(d).rem_euclid(i64::from(*every)) == 0 {
                    times(t)
                } else {
                    Vec::new()
                }
            }
            Schedule::Weekly {
                every,
                days,
                times: t,
            } => {
                let wd = d.weekday().to_monday_zero_offset();
                // ISO weeks from Monday 1969-12-29 (day -3).
                let week = (day_number(d) + 3).div_euclid(7);
                if days & (1 << wd) != 0 && week.rem_euclid(i64::from(*every)) == 0 {
                    times(t)
                } else {
                    Vec::new()
                }
            }
            Schedule::Monthly {
                months,
                days,
                times: t,
            } => {
                let month_ok = months & (1 << (d.month() - 1)) != 0;
                if month_ok && days.iter().any(|md| month_day_matches(d, *md)) {
                    times(t)
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// The first run strictly after `after`, in zone `tz`; `None` when the
    /// schedule runs no more (an immediate or past once schedule).
    pub fn next_after(&self, tz: &TimeZone, after: Timestamp) -> Option<Timestamp> {
        match self {
            Schedule::Immediate => None,
            Schedule::Once(dt) => resolve(tz, *dt).filter(|t| *t > after),
            _ => {
                // From the day before (a window past midnight, a wall time
                // pushed across midnight by a gap); a day after the first
                // day with a run, no earlier instant can come.
                let first = after
                    .to_zoned(tz.clone())
                    .date()
                    .checked_sub(1.day())
                    .ok()?;
                let mut best: Option<Timestamp> = None;
                let mut found_on: Option<i32> = None;
                for i in 0..HORIZON_DAYS {
                    if found_on.is_some_and(|f| i > f + 1) {
                        break;
                    }
                    let Ok(d) = first.checked_add(i.days()) else {
                        break;
                    };
                    for m in self.minutes_on(d) {
                        let Ok(day) = d.checked_add(i64::from(m / u32::from(DAY)).days()) else {
                            continue;
                        };
                        let m = m % u32::from(DAY);
                        let dt = day.at((m / 60) as i8, (m % 60) as i8, 0, 0);
                        let Some(t) = resolve(tz, dt) else {
                            continue;
                        };
                        if t > after && best.is_none_or(|b| t < b) {
                            best = Some(t);
                            found_on.get_or_insert(i);
                        }
                    }
                }
                best
            }
        }
    }

    /// The first run for a job added at `added`: `added` itself for an
    /// immediate schedule, else the first run after it.
    pub fn first_run(&self, tz: &TimeZone, added: Timestamp) -> Option<Timestamp> {
        match self {
            Schedule::Immediate => Some(added),
            _ => self.next_after(tz, added),
        }
    }

    /// The next `count` runs after `after`.
    pub fn upcoming(&self, tz: &TimeZone, after: Timestamp, count: usize) -> Vec<Timestamp> {
        let mut out = Vec::with_capacity(count.min(1024));
        let mut at = after;
        while out.len() < count {
            match self.next_after(tz, at) {
                Some(t) => {
                    out.push(t);
                    at = t;
                }
                None => break,
            }
        }
        out
    }

    /// The runs due in `(since, until]` — missed while nothing ran them —
    /// at most `limit` of them (the earliest).
    pub fn due_between(
        &self,
        tz: &TimeZone,
        since: Timestamp,
        until: Timestamp,
        limit: usize,
    ) -> Vec<Timestamp> {
        let mut out = Vec::new();
        let mut at = since;
        while out.len() < limit {
            match self.next_after(tz, at) {
                Some(t) if t <= until => {
                    out.push(t);
                    at = t;
                }
                _ => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(tz: &TimeZone, s: &str) -> Timestamp {
        DateTime::from_str(s)
            .unwrap()
            .to_zoned(tz.clone())
            .unwrap()
            .timestamp()
    }

    fn local(tz: &TimeZone, t: Timestamp) -> String {
        t.to_zoned(tz.clone())
            .strftime("%Y-%m-%dT%H:%M%:z")
            .to_string()
    }

    fn next_n(spec: &str, zone: &str, from: &str, n: usize) -> Vec<String> {
        let tz = TimeZone::get(zone).unwrap();
        let s: Schedule = spec.parse().unwrap();
        s.upcoming(&tz, at(&tz, from), n)
            .into_iter()
            .map(|t| local(&tz, t))
            .collect()
    }

    #[test]
    fn every_form_gives_its_runs() {
        let z = "Europe/Berlin";
        // (spec, after, how many, the runs). Day numbers: 2026-10-07 is day
        // 20 733 since 1970, a multiple of 3 (its 02:30 is past); 2026-11-28
        // is day 20 785, in week (20 785 + 3) / 7 = 2 969, odd, so weekly/2
        // skips that Saturday and runs on the next one (week 2 970).
        let cases: &[(&str, &str, usize, &[&str])] = &[
            (
                "hourly 08:00-18:00 every 2h",
                "2026-11-27T17:00",
                3,
                &[
                    "2026-11-27T18:00+01:00",
                    "2026-11-28T08:00+01:00",
                    "2026-11-28T10:00+01:00",
                ],
            ),
            (
                "hourly every 30m",
                "2026-11-27T23:10",
                2,
                &["2026-11-27T23:30+01:00", "2026-11-28T00:00+01:00"],
            ),
            (
                "hourly 22:00-02:00 every 2h",
                "2026-11-27T01:00",
                4,
                &[
                    "2026-11-27T02:00+01:00",
                    "2026-11-27T22:00+01:00",
                    "2026-11-28T00:00+01:00",
                    "2026-11-28T02:00+01:00",
                ],
            ),
            (
                "daily/3 02:30",
                "2026-10-07T12:00",
                2,
                &["2026-10-10T02:30+02:00", "2026-10-13T02:30+02:00"],
            ),
            (
                "daily 02:30,14:00",
                "2026-11-27T12:00",
                2,
                &["2026-11-27T14:00+01:00", "2026-11-28T02:30+01:00"],
            ),
            (
                "weekly mon,thu 23:00",
                "2026-11-27T00:00",
                2,
                &["2026-11-30T23:00+01:00", "2026-12-03T23:00+01:00"],
            ),
            (
                "weekly/2 sat 01:00",
                "2026-11-27T00:00",
                2,
                &["2026-12-05T01:00+01:00", "2026-12-19T01:00+01:00"],
            ),
            (
                "monthly jan,jul 1,15 03:00",
                "2026-11-27T00:00",
                3,
                &[
                    "2027-01-01T03:00+01:00",
                    "2027-01-15T03:00+01:00",
                    "2027-07-01T03:00+02:00",
                ],
            ),
            (
                "monthly * last-sun 03:00",
                "2026-11-27T00:00",
                2,
                &["2026-11-29T03:00+01:00", "2026-12-27T03:00+01:00"],
            ),
            (
                "monthly * 2nd-tue 03:00",
                "2026-11-27T00:00",
                2,
                &["2026-12-08T03:00+01:00", "2027-01-12T03:00+01:00"],
            ),
            (
                "monthly feb last 12:00",
                "2027-01-01T00:00",
                2,
                &["2027-02-28T12:00+01:00", "2028-02-29T12:00+01:00"],
            ),
            (
                "monthly * 31 12:00",
                "2026-11-01T00:00",
                2,
                &["2026-12-31T12:00+01:00", "2027-01-31T12:00+01:00"],
            ),
            (
                "once 2026-12-01T02:00",
                "2026-11-27T00:00",
                3,
                &["2026-12-01T02:00+01:00"],
            ),
        ];
        for (spec, after, n, want) in cases {
            assert_eq!(next_n(spec, z, after, *n), *want, "{spec}");
        }
        assert!(next_n("once 2026-12-01T02:00", z, "2026-12-01T02:00", 1).is_empty());
        // A fifth Monday in February: 29 February a Monday, next in 2044.
        assert_eq!(
            next_n("monthly feb 5th-mon 03:00", z, "2026-11-27T00:00", 1),
            ["2044-02-29T03:00+01:00"]
        );
        let tz = TimeZone::get(z).unwrap();
        let now = at(&tz, "2026-11-27T10:00");
        let imm: Schedule = "immediate".parse().unwrap();
        assert_eq!(imm.first_run(&tz, now), Some(now));
        assert_eq!(imm.next_after(&tz, now), None);
    }

    #[test]
    fn daylight_saving_gaps_and_folds() {
        let z = "Europe/Berlin";
        // 2026-03-29 02:00 → 03:00: 02:30 does not exist and runs at 03:30.
        assert_eq!(
            next_n("daily 02:30", z, "2026-03-28T12:00", 2),
            ["2026-03-29T03:30+02:00", "2026-03-30T02:30+02:00"]
        );
        // 2026-10-25 03:00 → 02:00: 02:30 occurs twice and runs once, first.
        assert_eq!(
            next_n("daily 02:30", z, "2026-10-24T12:00", 2),
            ["2026-10-25T02:30+02:00", "2026-10-26T02:30+01:00"]
        );
        // Every 30 minutes across the gap: 02:00 and 03:00 land on one
        // instant, as do 02:30 and 03:30; each runs once.
        assert_eq!(
            next_n("hourly 01:00-04:00 every 30m", z, "2026-03-29T00:00", 6),
            [
                "2026-03-29T01:00+01:00",
                "2026-03-29T01:30+01:00",
                "2026-03-29T03:00+02:00",
                "2026-03-29T03:30+02:00",
                "2026-03-29T04:00+02:00",
                "2026-03-30T01:00+02:00"
            ]
        );
        // Across the fold: the repeated hour's wall times run once each.
        assert_eq!(
            next_n("hourly 01:30-03:30 every 30m", z, "2026-10-25T00:00", 6),
            [
                "2026-10-25T01:30+02:00",
                "2026-10-25T02:00+02:00",
                "2026-10-25T02:30+02:00",
                "2026-10-25T03:00+01:00",
                "2026-10-25T03:30+01:00",
                "2026-10-26T01:30+01:00"
            ]
        );
    }

    #[test]
    fn specs_round_trip_and_bad_ones_name_the_field() {
        for spec in [
            "immediate",
            "once 2026-12-01T02:00:00",
            "hourly 08:00-18:00 every 2h",
            "hourly every 30m",
            "hourly 22:00-24:00 every 90m",
            "daily 02:30",
            "daily/3 02:30,14:00",
            "weekly mon,thu 23:00",
            "weekly/2 sat 01:00",
            "weekly * 01:00",
            "monthly jan,jul 1,15 03:00",
            "monthly * 2nd-tue,last-sun 03:00",
            "monthly feb last 12:00",
        ] {
            let s: Schedule = spec.parse().unwrap();
            assert_eq!(s.to_string(), spec);
            assert_eq!(s.to_string().parse::<Schedule>().unwrap(), s);
        }
        for (spec, needle) in [
            ("", "empty"),
            ("yearly 01:00", "not a schedule kind"),
            ("daily 25:00", "00:00–23:59"),
            ("daily 2:30", "HH:MM"),
            ("daily/0 02:30", "1–366"),
            ("daily/400 02:30", "1–366"),
            ("weekly/53 mon 01:00", "1–52"),
            ("weekly mon", "time of day"),
            ("weekly funday 01:00", "not a weekday"),
            ("monthly feb 30,31 01:00", "never runs"),
            ("monthly foo 1 01:00", "not a month"),
            ("monthly * 32 01:00", "1–31"),
            ("monthly * 6th-mon 01:00", "day of the month"),
            ("hourly every 0h", "1h–24h"),
            ("hourly every 2000m", "1m–1440m"),
            ("hourly 08:00-18:00", "every"),
            ("hourly every 5s", "hours (2h) or minutes"),
            ("once tomorrow", "wall time"),
            ("monthly/2 * 1 01:00", "no /N"),
            ("daily 02:30 extra", "unexpected"),
        ] {
            let e = spec.parse::<Schedule>().unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{spec}: {e}");
            assert!(e.to_string().contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn missed_runs_are_counted() {
        let tz = TimeZone::get("UTC").unwrap();
        let s: Schedule = "daily 02:00".parse().unwrap();
        let missed = s.due_between(
            &tz,
            at(&tz, "2026-11-20T03:00"),
            at(&tz, "2026-11-27T02:00"),
            100,
        );
        assert_eq!(missed.len(), 7);
        assert_eq!(missed[0], at(&tz, "2026-11-21T02:00"));
        assert_eq!(missed[6], at(&tz, "2026-11-27T02:00"));
        assert_eq!(
            s.due_between(
                &tz,
                at(&tz, "2026-11-20T03:00"),
                at(&tz, "2026-11-27T02:00"),
                3
            )
            .len(),
            3
        );
    }
}
