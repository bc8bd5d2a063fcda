//! Jobs (spec B1, B6–B20, R7, R8): what to back up or restore, where,
//! when, how fast, with which retries, scripts and notifications, and a
//! record of every run. Nothing here knows a platform: applications give
//! platforms and pools through [`JobEnvironment`].
//!
//! - [`schedule`]: when a job runs — the spec forms, next runs in a time
//!   zone with its daylight-saving rules, missed runs.
//! - [`rate`]: how fast — rate limits by window of the day, a token
//!   bucket on a replaceable clock, throttled sources, readers and pools.
//! - [`select`]: which VMs — hosts, names, keywords, excludes (B1).
//! - [`capacity`]: whether a VM's datastores have room for a snapshot (B9).
//! - [`runner`]: how many at once — VMs per job and per host, disks per VM
//!   (B8).
//! - [`lock`]: one job at a time per resource, never stuck after a crash
//!   (B18).
//! - [`definition`]: a job as written (TOML), checked into a [`Job`].
//! - [`state`]: the state directory — definitions, run records and logs.
//! - [`execute`]: running a job once ([`JobRunner`]): scripts, VMs within
//!   the limits, retries, retention, the record.
//! - [`daemon`]: runs jobs at their times, across restarts.
//! - [`script`]: pre-condition, pre- and post-scripts with timeouts.
//! - [`notify`]: job events and where they go.
//! - `fake` (feature `sample`): a fake platform for tests.

pub mod capacity;
pub mod daemon;
pub mod definition;
pub mod execute;
#[cfg(any(test, feature = "sample"))]
pub mod fake;
pub mod lock;
pub mod notify;
pub mod rate;
pub mod runner;
pub mod schedule;
pub mod script;
pub mod select;
pub mod state;

pub use capacity::CapacityRule;
pub use daemon::{Daemon, PassOutcomes, ScheduleState, TickOutcome};
pub use definition::{Job, JobDefinition, JobKind};
pub use execute::{JobEnvironment, JobRunner};
pub use lock::ResourceLock;
pub use notify::{CommandNotifier, EventKind, JobEvent, MemoryNotifier, NoNotifier, Notifier};
pub use runner::{run_limited, Limits};
pub use select::Selection;
pub use state::{RunRecord, RunStatus, StateDir, Trigger, VmRecord, VmStatus};

pub use rate::{
    Clock, Direction, FakeClock, RateLimit, RateWindow, SystemClock, Throttle, ThrottledPool,
    ThrottledReader, ThrottledSource, ThrottledTarget,
};
pub use schedule::{MonthDay, Schedule};
