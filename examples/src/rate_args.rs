//! `--rate-limit` and `--rate-limit-on`, shared by `backup` and `restore`.

use std::str::FromStr;
use std::sync::Arc;

use cairn_engine::jobs::{Direction, RateLimit, SystemClock, Throttle, ThrottledPool};
use cairn_engine::{Repository, WrappedPool};

use crate::{Failure, Opened};

/// What a rate limit applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateOn {
    Reads,
    Writes,
}

impl FromStr for RateOn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reads" => Ok(RateOn::Reads),
            "writes" => Ok(RateOn::Writes),
            _ => Err(format!("{s:?} is not reads or writes")),
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct RateArgs {
    /// Limit the transfer rate: RATE (like 50MiB/s) all day, or
    /// HH:MM-HH:MM=RATE in a window of the day (this host's time zone).
    /// Repeat for several windows; outside them the rule without a window
    /// applies (none: unlimited). Rates in KiB/s, MiB/s or GiB/s (1KiB/s
    /// to 1024GiB/s), or unlimited.
    #[arg(long = "rate-limit", value_name = "RULE")]
    pub rate_limit: Vec<String>,
    /// What the limit applies to: reads (a backup's disk reads, a
    /// restore's pool reads) or writes (a backup's pool writes, a
    /// restore's target writes).
    #[arg(long, value_name = "reads|writes", default_value = "reads")]
    pub rate_limit_on: RateOn,
}

impl RateArgs {
    /// The throttle the flags ask for, if any.
    pub fn throttle(&self) -> Result<Option<(Arc<Throttle>, RateOn)>, Failure> {
        if self.rate_limit.is_empty() {
            return Ok(None);
        }
        let limit = RateLimit::parse(&self.rate_limit)
            .map_err(|e| Failure::usage(format!("--rate-limit: {e}")))?;
        if limit.is_unlimited() {
            return Ok(None);
        }
        let zone = jiff::tz::TimeZone::try_system().unwrap_or(jiff::tz::TimeZone::UTC);
        Ok(Some((
            Arc::new(Throttle::new(limit, zone, Arc::new(SystemClock))),
            self.rate_limit_on,
        )))
    }
}

/// `opened` with its pool's transfers in `direction` passing `throttle`.
pub fn throttle_pool(
    opened: Opened,
    throttle: Arc<Throttle>,
    direction: Direction,
) -> Result<Opened, Failure> {
    let pool = Arc::new(WrappedPool(ThrottledPool::new(
        opened.repo.pool().clone(),
        throttle,
        direction,
    )));
    Ok(Opened {
        repo: Repository::open(pool)?,
        pool: opened.pool,
    })
}
