//! `cairn schedule next`: a schedule's next run times, without running
//! anything.

use std::str::FromStr;

use cairn_engine::jobs::Schedule;
use clap::Subcommand;
use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::Timestamp;

use crate::{output, Failure};

#[derive(Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Print the next run times of a schedule (RFC 3339, with the zone's
    /// offset): immediate | once 2026-12-01T02:00 | hourly 08:00-18:00
    /// every 2h | daily[/N] 02:30 | weekly[/N] mon,thu 23:00 | monthly
    /// jan,jul 1,15 03:00 | monthly * last-sun 03:00 | monthly * 2nd-tue
    /// 03:00.
    Next {
        /// The schedule, quoted.
        spec: String,
        /// The time zone its wall times are in (an IANA name; default:
        /// this host's).
        #[arg(long, value_name = "ZONE")]
        tz: Option<String>,
        /// Runs after this instant (RFC 3339, or a wall time in --tz;
        /// default: now).
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        /// How many runs (1–1000).
        #[arg(long, default_value_t = 5)]
        count: usize,
        /// A JSON array of strings.
        #[arg(long)]
        json: bool,
    },
}

/// `cairn schedule …`.
pub fn run(command: ScheduleCommand) -> Result<u8, Failure> {
    let ScheduleCommand::Next {
        spec,
        tz,
        from,
        count,
        json,
    } = command;
    if !(1..=1000).contains(&count) {
        return Err(Failure::usage(format!(
            "--count {count} is out of range (1–1000)"
        )));
    }
    let schedule: Schedule = spec.parse()?;
    let zone = match &tz {
        Some(name) => TimeZone::get(name)
            .map_err(|e| Failure::usage(format!("--tz {name:?} is not a known time zone: {e}")))?,
        None => TimeZone::try_system().unwrap_or(TimeZone::UTC),
    };
    let from = match &from {
        None => Timestamp::now(),
        Some(s) => match Timestamp::from_str(s) {
            Ok(t) => t,
            Err(_) => DateTime::from_str(s)
                .ok()
                .and_then(|dt| dt.to_zoned(zone.clone()).ok())
                .map(|z| z.timestamp())
                .ok_or_else(|| {
                    Failure::usage(format!(
                        "--from {s:?} is not a time (like 2026-11-28T10:00:00+01:00, or a wall time 2026-11-28T10:00)"
                    ))
                })?,
        },
    };
    let runs: Vec<Timestamp> = match schedule.first_run(&zone, from) {
        None => Vec::new(),
        Some(first) => {
            let mut runs = vec![first];
            runs.extend(schedule.upcoming(&zone, first, count - 1));
            runs
        }
    };
    let texts: Vec<String> = runs
        .iter()
        .map(|t| {
            t.to_zoned(zone.clone())
                .strftime("%Y-%m-%dT%H:%M:%S%:z")
                .to_string()
        })
        .collect();
    if json {
        output::print_json(&serde_json::json!(texts));
    } else if texts.is_empty() {
        eprintln!("cairn: {schedule} has no run after {from}");
    } else {
        for t in &texts {
            println!("{t}");
        }
    }
    Ok(0)
}
