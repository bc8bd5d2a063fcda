//! Jobs (spec B6–B20): what to back up, where, when and how fast. This
//! wave has the pieces a job runner is built from; nothing here knows
//! about a platform.
//!
//! - [`schedule`]: when a job runs — the spec forms, next runs in a time
//!   zone with its daylight-saving rules, missed runs.
//! - [`rate`]: how fast — rate limits by window of the day, a token
//!   bucket on a replaceable clock, throttled sources, readers and pools.

pub mod rate;
pub mod schedule;

pub use rate::{
    Clock, Direction, FakeClock, RateLimit, RateWindow, SystemClock, Throttle, ThrottledPool,
    ThrottledReader, ThrottledSource, ThrottledTarget,
};
pub use schedule::{MonthDay, Schedule};
