//! Rate limits (spec B14): a [`RateLimit`] — a rate for the whole day, or
//! rates for windows of the day in the host's time zone — enforced by a
//! [`Throttle`], a token bucket shared by every reader (or writer) of a
//! job, on a [`Clock`] that tests replace.
//!
//! ```text
//! 50MiB/s                      all day
//! 08:00-18:00=50MiB/s          in the window; unlimited outside it
//! 08:00-18:00=50MiB/s 200MiB/s in the window, and 200 MiB/s outside it
//! 22:00-06:00=1GiB/s           a window past midnight
//! ```
//!
//! Rates are `N KiB/s`, `MiB/s` or `GiB/s` (N a whole or decimal number,
//! 1 KiB/s to 1024 GiB/s) or `unlimited`; a window's start is included and
//! its end is not (`24:00` ends at midnight); windows must not overlap.
//!
//! The bucket starts empty, holds at most a tenth of a second of the rate
//! (so a burst after a pause is short) and may go into debt for a request larger than
//! that: the caller then sleeps until the debt is paid, outside the lock,
//! so concurrent callers share the rate. When the rate changes (a window
//! begins or ends) the bucket keeps its debt and refills at the new rate.

use std::fmt;
use std::io::Read;
use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use parking_lot::Mutex;

use crate::source::{DiskSource, DiskTarget, MappedDisk};
use crate::{Error, Result};

const DAY: u16 = 24 * 60;
const KIB: f64 = 1024.0;
const MIN_RATE: u64 = 1 << 10;
const MAX_RATE: u64 = 1 << 40;

/// Bytes per second, or `None` for unlimited.
pub type Rate = Option<u64>;

/// A rate within a window of the day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateWindow {
    /// Minutes of the day the window starts at (included).
    pub start: u16,
    /// Minutes of the day it ends at (excluded; 1440: midnight; less than
    /// `start`: the next day).
    pub end: u16,
    /// The rate inside it.
    pub rate: Rate,
}

impl RateWindow {
    fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

/// A job's rate limit (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimit {
    /// Outside every window (`None`: unlimited).
    pub default: Rate,
    /// Windows of the day, not overlapping.
    pub windows: Vec<RateWindow>,
}

fn bad(rule: &str, why: impl fmt::Display) -> Error {
    Error::InvalidArgument(format!("rate limit {rule:?}: {why}"))
}

fn parse_rate(rule: &str, s: &str) -> Result<Rate> {
    if s == "unlimited" {
        return Ok(None);
    }
    let lower = s.to_ascii_lowercase();
    let (number, unit) = [
        ("kib/s", KIB),
        ("mib/s", KIB * KIB),
        ("gib/s", KIB * KIB * KIB),
    ]
    .into_iter()
    .find_map(|(suffix, unit)| lower.strip_suffix(suffix).map(|n| (n.to_string(), unit)))
    .ok_or_else(|| {
        bad(
            rule,
            format!("{s:?} is not a rate (like 500KiB/s, 50MiB/s, 1.5GiB/s or unlimited)"),
        )
    })?;
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| bad(rule, format!("{number:?} in {s:?} is not a number")))?;
    let bytes = n * unit;
    if !bytes.is_finite() || bytes < MIN_RATE as f64 || bytes > MAX_RATE as f64 {
        return Err(bad(
            rule,
            format!("{s} is out of range (1KiB/s–1024GiB/s, or unlimited)"),
        ));
    }
    Ok(Some(bytes.round() as u64))
}

fn parse_minute(rule: &str, s: &str, end: bool) -> Result<u16> {
    let parsed = s.split_once(':').and_then(|(h, m)| {
        let ok = h.len() == 2 && m.len() == 2;
        ok.then_some((h.parse::<u16>().ok()?, m.parse::<u16>().ok()?))
    });
    match parsed {
        Some((h, m)) if h < 24 && m < 60 => Ok(h * 60 + m),
        Some((24, 0)) if end => Ok(DAY),
        _ => Err(bad(
            rule,
            format!("{s:?} is not a time of day HH:MM (00:00–23:59; 24:00 as an end)"),
        )),
    }
}

fn write_rate(f: &mut fmt::Formatter<'_>, rate: Rate) -> fmt::Result {
    let Some(r) = rate else {
        return f.write_str("unlimited");
    };
    for (unit, size) in [
        ("GiB/s", 1u64 << 30),
        ("MiB/s", 1 << 20),
        ("KiB/s", 1 << 10),
    ] {
        if r % size == 0 {
            return write!(f, "{}{unit}", r / size);
        }
    }
    write!(f, "{}KiB/s", r as f64 / KIB)
}

impl RateLimit {
    /// Unlimited.
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// Parses rules (each `RATE` or `HH:MM-HH:MM=RATE`, see the module
    /// docs); at most one rule without a window.
    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<Self> {
        let mut limit = RateLimit::default();
        let mut default_seen = false;
        for rule in rules {
            let rule = rule.as_ref().trim();
            match rule.split_once('=') {
                None => {
                    if default_seen {
                        return Err(bad(rule, "a second rate without a window"));
                    }
                    default_seen = true;
                    limit.default = parse_rate(rule, rule)?;
                }
                Some((window, rate)) => {
                    let (start, end) = window.split_once('-').ok_or_else(|| {
                        bad(rule, format!("{window:?} is not a window HH:MM-HH:MM"))
                    })?;
                    let w = RateWindow {
                        start: parse_minute(rule, start, false)?,
                        end: parse_minute(rule, end, true)?,
                        rate: parse_rate(rule, rate)?,
                    };
                    if w.start == w.end {
                        return Err(bad(rule, "an empty window (start = end)"));
                    }
                    if let Some(o) = limit
                        .windows
                        .iter()
                        .find(|o| (0..DAY).any(|m| o.contains(m) && w.contains(m)))
                    {
                        return Err(bad(rule, format!("overlaps the window {}", WindowText(o))));
                    }
                    limit.windows.push(w);
                }
            }
        }
        limit.windows.sort_by_key(|w| w.start);
        Ok(limit)
    }

    /// The rate at minute `minute` of the day.
    pub fn rate_at(&self, minute: u16) -> Rate {
        self.windows
            .iter()
            .find(|w| w.contains(minute % DAY))
            .map_or(self.default, |w| w.rate)
    }

    /// Whether nothing is ever limited.
    pub fn is_unlimited(&self) -> bool {
        self.default.is_none() && self.windows.iter().all(|w| w.rate.is_none())
    }
}

struct WindowText<'a>(&'a RateWindow);

impl fmt::Display for WindowText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.0;
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}=",
            w.start / 60,
            w.start % 60,
            w.end / 60,
            w.end % 60
        )?;
        write_rate(f, w.rate)
    }
}

/// The rules, space-separated: windows first, then the rest of the day's
/// rate (left out when unlimited and there are windows).
impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, w) in self.windows.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}", WindowText(w))?;
        }
        if self.default.is_some() || self.windows.is_empty() {
            if !self.windows.is_empty() {
                f.write_str(" ")?;
            }
            write_rate(f, self.default)?;
        }
        Ok(())
    }
}

impl FromStr for RateLimit {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        RateLimit::parse(&s.split_whitespace().collect::<Vec<_>>())
    }
}

/// Time for a [`Throttle`]: the system's, or a fake one in tests.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Timestamp;
    /// Waits `d`.
    fn sleep(&self, d: Duration);
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// A clock that only moves when slept on (or advanced): for tests of
/// anything timed, without waiting.
#[derive(Debug)]
pub struct FakeClock {
    now: Mutex<Timestamp>,
}

impl FakeClock {
    /// A fake clock showing `start`.
    pub fn new(start: Timestamp) -> Self {
        FakeClock {
            now: Mutex::new(start),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut now = self.now.lock();
        if let Ok(span) = jiff::SignedDuration::try_from(d) {
            if let Ok(t) = now.checked_add(span) {
                *now = t;
            }
        }
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        *self.now.lock()
    }
    fn sleep(&self, d: Duration) {
        self.advance(d);
    }
}

struct Bucket {
    /// Bytes that may pass now (negative: owed).
    tokens: f64,
    last: Option<Timestamp>,
}

/// A token bucket enforcing a [`RateLimit`] (see the module docs). Share
/// one (`Arc`) between every reader or writer the limit covers.
pub struct Throttle {
    limit: RateLimit,
    zone: TimeZone,
    clock: Arc<dyn Clock>,
    bucket: Mutex<Bucket>,
    /// Lets everything pass once it fires (the job stops at its next
    /// checkpoint rather than after a long wait).
    cancel: Option<crate::CancelToken>,
}

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle")
            .field("limit", &self.limit.to_string())
            .finish_non_exhaustive()
    }
}

impl Throttle {
    /// A throttle for `limit`, its windows read in `zone`, on `clock`.
    pub fn new(limit: RateLimit, zone: TimeZone, clock: Arc<dyn Clock>) -> Self {
        Throttle {
            limit,
            zone,
            clock,
            bucket: Mutex::new(Bucket {
                tokens: 0.0,
                last: None,
            }),
            cancel: None,
        }
    }

    /// Stops waiting as soon as `cancel` fires.
    pub fn with_cancel(mut self, cancel: crate::CancelToken) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// The limit it enforces.
    pub fn limit(&self) -> &RateLimit {
        &self.limit
    }

    fn rate_now(&self, now: Timestamp) -> Rate {
        if self.limit.windows.is_empty() {
            return self.limit.default;
        }
        let local = now.to_zoned(self.zone.clone());
        self.limit
            .rate_at(local.hour() as u16 * 60 + local.minute() as u16)
    }

    /// Lets `bytes` pass, waiting as long as the rate requires. A large
    /// request passes in pieces of at most a tenth of a second's worth,
    /// each at the rate in force when it goes (a window that changes
    /// mid-request applies from the next piece), and a cancelled throttle
    /// stops waiting.
    pub fn take(&self, bytes: u64) {
        let mut left = bytes;
        while left > 0 {
            if self.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                return;
            }
            let wait = {
                let mut b = self.bucket.lock();
                let now = self.clock.now();
                let Some(rate) = self.rate_now(now) else {
                    b.last = Some(now);
                    b.tokens = 0.0;
                    return;
                };
                let rate = rate as f64;
                let burst = rate / 10.0;
                // A new bucket starts empty: the first bytes wait their turn.
                let elapsed = b
                    .last
                    .map_or(0.0, |last| now.duration_since(last).as_secs_f64().max(0.0));
                b.tokens = (b.tokens + elapsed * rate).min(burst);
                b.last = Some(now);
                let piece = left.min((burst as u64).max(1));
                left -= piece;
                b.tokens -= piece as f64;
                (b.tokens < 0.0).then(|| Duration::from_secs_f64(-b.tokens / rate))
            };
            if let Some(wait) = wait {
                self.clock.sleep(wait);
            }
        }
    }
}

/// A disk source whose reads pass a [`Throttle`] first (never mapped:
/// mapped bytes would pass unseen).
pub struct ThrottledSource {
    inner: Box<dyn DiskSource>,
    throttle: Arc<Throttle>,
}

impl fmt::Debug for ThrottledSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrottledSource")
            .field("source", &self.inner.describe())
            .field("throttle", &self.throttle)
            .finish()
    }
}

impl ThrottledSource {
    /// `inner`, read through `throttle`.
    pub fn new(inner: Box<dyn DiskSource>, throttle: Arc<Throttle>) -> Self {
        ThrottledSource { inner, throttle }
    }
}

impl DiskSource for ThrottledSource {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn data_extents(&self) -> Result<Vec<Range<u64>>> {
        self.inner.data_extents()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.throttle.take(buf.len() as u64);
        self.inner.read_at(offset, buf)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn identity(&self) -> Option<String> {
        self.inner.identity()
    }
    fn identity_proves_content(&self) -> bool {
        self.inner.identity_proves_content()
    }
    fn mapped(&self) -> Option<MappedDisk> {
        None
    }
}

/// A restore target whose writes pass a [`Throttle`] first.
pub struct ThrottledTarget {
    inner: Box<dyn DiskTarget>,
    throttle: Arc<Throttle>,
}

impl fmt::Debug for ThrottledTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrottledTarget")
            .field("throttle", &self.throttle)
            .finish_non_exhaustive()
    }
}

impl ThrottledTarget {
    /// `inner`, written through `throttle`.
    pub fn new(inner: Box<dyn DiskTarget>, throttle: Arc<Throttle>) -> Self {
        ThrottledTarget { inner, throttle }
    }
}

impl DiskTarget for ThrottledTarget {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.throttle.take(data.len() as u64);
        self.inner.write_at(offset, data)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.inner.finish()
    }
}

/// A stream whose reads pass a [`Throttle`].
#[derive(Debug)]
pub struct ThrottledReader<R> {
    inner: R,
    throttle: Arc<Throttle>,
}

impl<R> ThrottledReader<R> {
    /// `inner`, read through `throttle`.
    pub fn new(inner: R, throttle: Arc<Throttle>) -> Self {
        ThrottledReader { inner, throttle }
    }
}

impl<R: Read> Read for ThrottledReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.throttle.take(n as u64);
        Ok(n)
    }
}

/// Which of a pool's transfers a [`ThrottledPool`] limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Direction {
    /// Bytes read from the pool (a restore's or copy's source).
    Reads,
    /// Bytes written to the pool (a backup's or copy's target).
    Writes,
}

/// A pool whose reads or writes pass a [`Throttle`]; use it as a pool
/// through [`WrappedPool`](crate::WrappedPool).
pub struct ThrottledPool {
    inner: crate::DynPool,
    throttle: Arc<Throttle>,
    direction: Direction,
}

impl fmt::Debug for ThrottledPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrottledPool")
            .field("location", &self.inner.location())
            .field("direction", &self.direction)
            .finish_non_exhaustive()
    }
}

impl ThrottledPool {
    /// `inner` with its `direction` of transfers limited by `throttle`.
    pub fn new(inner: crate::DynPool, throttle: Arc<Throttle>, direction: Direction) -> Self {
        ThrottledPool {
            inner,
            throttle,
            direction,
        }
    }
}

struct ThrottledWriter {
    inner: Box<dyn crate::ObjectWriter>,
    throttle: Arc<Throttle>,
}

impl std::io::Write for ThrottledWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.throttle.take(buf.len() as u64);
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl crate::ObjectWriter for ThrottledWriter {
    fn commit(self: Box<Self>) -> Result<()> {
        self.inner.commit()
    }
}

impl crate::PoolWrapper for ThrottledPool {
    fn inner(&self) -> &dyn crate::Pool {
        &*self.inner
    }
    fn read(&self, kind: crate::FileKind, name: &str) -> Result<bytes::Bytes> {
        let b = self.inner.read(kind, name)?;
        if self.direction == Direction::Reads {
            self.throttle.take(b.len() as u64);
        }
        Ok(b)
    }
    fn read_range(
        &self,
        kind: crate::FileKind,
        name: &str,
        offset: u64,
        len: usize,
    ) -> Result<bytes::Bytes> {
        if self.direction == Direction::Reads {
            self.throttle.take(len as u64);
        }
        self.inner.read_range(kind, name, offset, len)
    }
    fn create(&self, kind: crate::FileKind, name: &str) -> Result<Box<dyn crate::ObjectWriter>> {
        let w = self.inner.create(kind, name)?;
        Ok(match self.direction {
            Direction::Writes => Box::new(ThrottledWriter {
                inner: w,
                throttle: self.throttle.clone(),
            }),
            Direction::Reads => w,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn rules_parse_print_and_refuse_bad_values() {
        for (rules, text) in [
            (vec!["50MiB/s"], "50MiB/s"),
            (vec!["08:00-18:00=50MiB/s"], "08:00-18:00=50MiB/s"),
            (
                vec!["200MiB/s", "08:00-18:00=50MiB/s"],
                "08:00-18:00=50MiB/s 200MiB/s",
            ),
            (
                vec!["22:00-06:00=1GiB/s", "06:00-22:00=unlimited"],
                "06:00-22:00=unlimited 22:00-06:00=1GiB/s",
            ),
            (vec!["1.5GiB/s"], "1536MiB/s"),
            (vec!["500kib/s"], "500KiB/s"),
            (vec!["18:00-24:00=2GiB/s"], "18:00-24:00=2GiB/s"),
            (vec!["00:00-24:00=2GiB/s"], "00:00-24:00=2GiB/s"),
            (vec![], "unlimited"),
        ] {
            let limit = RateLimit::parse(&rules).unwrap();
            assert_eq!(limit.to_string(), text, "{rules:?}");
            assert_eq!(text.parse::<RateLimit>().unwrap(), limit);
        }
        for (rules, needle) in [
            (vec!["50MB/s"], "not a rate"),
            (vec!["0.5KiB/s"], "out of range"),
            (vec!["2048GiB/s"], "out of range"),
            (vec!["xMiB/s"], "not a number"),
            (vec!["25:00-26:00=1MiB/s"], "time of day"),
            (vec!["08:00=1MiB/s"], "window"),
            (vec!["08:00-08:00=1MiB/s"], "empty window"),
            (vec!["08:00-18:00=1MiB/s", "17:00-19:00=2MiB/s"], "overlaps"),
            (vec!["22:00-06:00=1MiB/s", "05:00-07:00=2MiB/s"], "overlaps"),
            (vec!["1MiB/s", "2MiB/s"], "second rate"),
        ] {
            let e = RateLimit::parse(&rules).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{rules:?}: {e}");
            assert!(e.to_string().contains(needle), "{rules:?}: {e}");
        }
        let l = RateLimit::parse(&["200MiB/s", "22:00-06:00=1GiB/s"]).unwrap();
        assert_eq!(l.rate_at(21 * 60 + 59), Some(200 * MIB));
        assert_eq!(l.rate_at(22 * 60), Some(1 << 30));
        assert_eq!(l.rate_at(5 * 60 + 59), Some(1 << 30));
        assert_eq!(l.rate_at(6 * 60), Some(200 * MIB));
        assert!(!l.is_unlimited());
        assert!(RateLimit::parse(&["08:00-09:00=unlimited"])
            .unwrap()
            .is_unlimited());
    }

    /// Bytes that pass in `seconds` of fake time through `throttle`, taken
    /// in requests of `request` bytes.
    fn passed(throttle: &Throttle, clock: &FakeClock, seconds: f64, request: u64) -> u64 {
        let end = clock.now() + jiff::SignedDuration::from_secs_f64(seconds);
        let mut bytes = 0;
        while clock.now() < end {
            throttle.take(request);
            bytes += request;
        }
        bytes
    }

    fn within(got: u64, rate: u64, seconds: f64, tolerance: f64) -> bool {
        let want = rate as f64 * seconds;
        (got as f64 - want).abs() <= want * tolerance
    }

    #[test]
    fn a_limit_holds_within_five_percent_in_each_window() {
        let zone = TimeZone::get("Europe/Berlin").unwrap();
        let start: Timestamp = "2026-11-27T06:59:50Z".parse().unwrap(); // 07:59:50 in Berlin
        let clock = Arc::new(FakeClock::new(start));
        let limit = RateLimit::parse(&["200MiB/s", "08:00-18:00=50MiB/s"]).unwrap();
        let t = Throttle::new(limit, zone.clone(), clock.clone());
        // Before 08:00 local: 200 MiB/s (10 s straddle the window's start:
        // the first 10 s are before it).
        let before = passed(&t, &clock, 10.0, MIB);
        assert!(within(before, 200 * MIB, 10.0, 0.05), "{before}");
        // In the window: 50 MiB/s, with small and large requests.
        for request in [64 << 10, MIB, 8 * MIB] {
            let got = passed(&t, &clock, 10.0, request);
            assert!(within(got, 50 * MIB, 10.0, 0.05), "{request}: {got}");
        }
        // At 18:00 local it lifts back to 200 MiB/s.
        clock.advance(Duration::from_secs(10 * 3600));
        let after = passed(&t, &clock, 10.0, MIB);
        assert!(within(after, 200 * MIB, 10.0, 0.05), "{after}");
        // 2 GiB/s holds too.
        let fast = Throttle::new(
            RateLimit::parse(&["2GiB/s"]).unwrap(),
            zone.clone(),
            clock.clone(),
        );
        let got = passed(&fast, &clock, 10.0, 4 * MIB);
        assert!(within(got, 2 << 30, 10.0, 0.05), "{got}");
        // Unlimited never sleeps.
        let free = Throttle::new(RateLimit::unlimited(), zone, clock.clone());
        let before = clock.now();
        for _ in 0..1000 {
            free.take(1 << 30);
        }
        assert_eq!(clock.now(), before);
    }

    /// A request larger than a window's remaining time passes at each
    /// window's rate (not all of it at the rate in force when it began),
    /// and a cancelled throttle stops waiting.
    #[test]
    fn large_requests_follow_window_changes_and_cancel() {
        let zone = TimeZone::get("Europe/Berlin").unwrap();
        // 17:59:50 in Berlin: 10 s of 1 MiB/s left, then 200 MiB/s.
        let start: Timestamp = "2026-11-27T16:59:50Z".parse().unwrap();
        let clock = Arc::new(FakeClock::new(start));
        let limit = RateLimit::parse(&["200MiB/s", "08:00-18:00=1MiB/s"]).unwrap();
        let cancel = crate::CancelToken::new();
        let t = Throttle::new(limit, zone, clock.clone()).with_cancel(cancel.clone());
        t.take(100 * MIB);
        let took = clock.now().duration_since(start).as_secs_f64();
        // 10 MiB in the last 10 s of the window, 90 MiB at 200 MiB/s: about
        // 10.45 s, not the 100 s the window's rate alone would take.
        assert!((10.0..11.0).contains(&took), "{took}");
        // Back in the slow window, cancelled: a large request waits no more.
        clock.advance(Duration::from_secs(14 * 3600));
        cancel.cancel();
        let before = clock.now();
        t.take(1 << 30);
        assert_eq!(clock.now(), before);
    }

    #[test]
    fn a_pause_buys_only_a_short_burst() {
        let clock = Arc::new(FakeClock::new("2026-11-27T12:00:00Z".parse().unwrap()));
        let t = Throttle::new(
            RateLimit::parse(&["10MiB/s"]).unwrap(),
            TimeZone::UTC,
            clock.clone(),
        );
        passed(&t, &clock, 1.0, MIB);
        clock.advance(Duration::from_secs(60));
        // After a minute idle, a second passes at most 1.1 s worth.
        let got = passed(&t, &clock, 1.0, 64 << 10);
        assert!(got <= 11 * MIB + MIB / 10, "{got}");
        assert!(got >= 10 * MIB, "{got}");
    }
}
