//! Jobs (spec B6–B20): what to back up, where, when and how fast. This
//! wave has the pieces a job runner is built from; nothing here knows
//! about a platform.
//!
//! - [`schedule`]: when a job runs — the spec forms, next runs in a time
//!   zone with its daylight-saving rules, missed runs.

pub mod schedule;

pub use schedule::{MonthDay, Schedule};
