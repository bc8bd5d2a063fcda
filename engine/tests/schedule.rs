//! Schedules against a brute-force reference: every civil minute of a
//! window is tested with a predicate written here from the spec's words
//! (its own calendar arithmetic), each matching wall time is turned into
//! an instant by the stated rule (a wall time in a gap runs at the offset
//! in force before the switch; one that occurs twice runs at its first
//! occurrence) using only the zone's offset at an instant, and the sorted,
//! de-duplicated instants after the start must be exactly the runs the
//! schedule gives — so a next run is always in the future and no due run
//! is skipped. The windows include daylight-saving switches of zones with
//! 1-hour, 30-minute and midnight switches.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::collections::BTreeSet;

use cairn_engine::jobs::Schedule;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use proptest::prelude::*;

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

fn days_in_month(y: i64, m: i64) -> i64 {
    days_from_civil(
        if m == 12 { y + 1 } else { y },
        if m == 12 { 1 } else { m + 1 },
        1,
    ) - days_from_civil(y, m, 1)
}

/// What a generated schedule is, in plain fields.
#[derive(Clone, Debug)]
enum Spec {
    Hourly {
        start: i64,
        end: i64,
        every: i64,
    },
    Daily {
        every: i64,
        times: Vec<i64>,
    },
    Weekly {
        every: i64,
        days: Vec<i64>,
        times: Vec<i64>,
    },
    /// days: (kind, n, weekday) — kind 0 day n, 1 last, 2 nth weekday, 3 last weekday.
    Monthly {
        months: Vec<i64>,
        days: Vec<(u8, i64, i64)>,
        times: Vec<i64>,
    },
}

const WD: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const MO: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];

fn hhmm(m: i64) -> String {
    format!("{:02}:{:02}", m / 60, m % 60)
}

fn times_text(t: &[i64]) -> String {
    t.iter().map(|m| hhmm(*m)).collect::<Vec<_>>().join(",")
}

impl Spec {
    fn text(&self) -> String {
        let per = |k: &str, n: i64| {
            if n == 1 {
                k.to_string()
            } else {
                format!("{k}/{n}")
            }
        };
        match self {
            Spec::Hourly { start, end, every } => {
                let every = if every % 60 == 0 {
                    format!("{}h", every / 60)
                } else {
                    format!("{every}m")
                };
                format!("hourly {}-{} every {every}", hhmm(*start), hhmm(*end))
            }
            Spec::Daily { every, times } => {
                format!("{} {}", per("daily", *every), times_text(times))
            }
            Spec::Weekly { every, days, times } => format!(
                "{} {} {}",
                per("weekly", *every),
                days.iter()
                    .map(|d| WD[*d as usize])
                    .collect::<Vec<_>>()
                    .join(","),
                times_text(times)
            ),
            Spec::Monthly {
                months,
                days,
                times,
            } => format!(
                "monthly {} {} {}",
                months
                    .iter()
                    .map(|m| MO[*m as usize - 1])
                    .collect::<Vec<_>>()
                    .join(","),
                days.iter()
                    .map(|(k, n, w)| match k {
                        0 => n.to_string(),
                        1 => "last".to_string(),
                        2 => format!(
                            "{}-{}",
                            ["1st", "2nd", "3rd", "4th", "5th"][*n as usize - 1],
                            WD[*w as usize]
                        ),
                        _ => format!("last-{}", WD[*w as usize]),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                times_text(times)
            ),
        }
    }

    /// Whether civil minute `minute` of day number `day` is a scheduled
    /// wall time.
    fn scheduled(&self, day: i64, minute: i64) -> bool {
        let (y, m, d) = civil_from_days(day);
        let weekday = (day + 3).rem_euclid(7); // Monday 0; 1970-01-01 a Thursday
        match self {
            Spec::Hourly { start, end, every } => {
                let len = if end >= start {
                    end - start
                } else {
                    end + 1440 - start
                };
                // From this day's window start, or the previous day's.
                [minute - start, minute + 1440 - start]
                    .into_iter()
                    .any(|off| off >= 0 && off <= len && off % every == 0)
            }
            Spec::Daily { every, times } => day.rem_euclid(*every) == 0 && times.contains(&minute),
            Spec::Weekly { every, days, times } => {
                (day + 3).div_euclid(7).rem_euclid(*every) == 0
                    && days.contains(&weekday)
                    && times.contains(&minute)
            }
            Spec::Monthly {
                months,
                days,
                times,
            } => {
                let dim = days_in_month(y, m);
                months.contains(&m)
                    && times.contains(&minute)
                    && days.iter().any(|(k, n, w)| match k {
                        0 => d == *n,
                        1 => d == dim,
                        2 => weekday == *w && (d - 1) / 7 + 1 == *n,
                        _ => weekday == *w && d + 7 > dim,
                    })
            }
        }
    }
}

/// The instant wall time (`day`, `minute`) runs at in `tz`, by the rule,
/// from offsets alone.
fn instant(tz: &TimeZone, day: i64, minute: i64) -> Timestamp {
    let naive = (day * 1440 + minute) * 60; // the wall time read as UTC seconds
    let offset_at = |s: i64| i64::from(tz.to_offset(Timestamp::from_second(s).unwrap()).seconds());
    // Offsets in use within two days either side.
    let offsets: BTreeSet<i64> = (-48..=48).map(|h| offset_at(naive + h * 1800)).collect();
    let valid: Vec<i64> = offsets
        .iter()
        .map(|o| naive - o)
        .filter(|u| naive - offset_at(*u) == *u)
        .collect();
    let at = match valid.iter().min() {
        // Exists (once, or twice: the first).
        Some(u) => *u,
        // In a gap: the offset in force before the switch — the offset of
        // an instant just before the earliest reading of the wall time.
        None => {
            let earliest = offsets.iter().map(|o| naive - o).min().unwrap();
            let before = offset_at(earliest - 3600);
            naive - before
        }
    };
    Timestamp::from_second(at).unwrap()
}

fn reference(spec: &Spec, tz: &TimeZone, after: Timestamp, days: i64) -> Vec<Timestamp> {
    let local = after.to_zoned(tz.clone());
    let first = days_from_civil(
        i64::from(local.year()),
        i64::from(local.month()),
        i64::from(local.day()),
    ) - 1;
    let mut runs = BTreeSet::new();
    for day in first..first + days {
        for minute in 0..1440 {
            if spec.scheduled(day, minute) {
                let t = instant(tz, day, minute);
                if t > after {
                    runs.insert(t);
                }
            }
        }
    }
    runs.into_iter().collect()
}

fn times() -> impl Strategy<Value = Vec<i64>> {
    prop::collection::btree_set(
        prop_oneof![
            0i64..1440,
            (0i64..24).prop_map(|h| h * 60 + 30),
            (0i64..24).prop_map(|h| h * 60)
        ],
        1..4,
    )
    .prop_map(|s| s.into_iter().collect())
}

fn spec() -> impl Strategy<Value = Spec> {
    prop_oneof![
        (
            0i64..1440,
            0i64..1440,
            prop_oneof![(1i64..=24).prop_map(|h| h * 60), 1i64..=240]
        )
            .prop_map(|(start, end, every)| Spec::Hourly { start, end, every }),
        (1i64..=5, times()).prop_map(|(every, times)| Spec::Daily { every, times }),
        (
            1i64..=3,
            prop::collection::btree_set(0i64..7, 1..4),
            times()
        )
            .prop_map(|(every, days, times)| Spec::Weekly {
                every,
                days: days.into_iter().collect(),
                times
            }),
        (
            prop::collection::btree_set(1i64..=12, 3..13),
            prop::collection::vec(
                prop_oneof![
                    (1i64..=28).prop_map(|n| (0u8, n, 0i64)),
                    (29i64..=31).prop_map(|n| (0u8, n, 0i64)),
                    Just((1u8, 0, 0)),
                    (1i64..=5, 0i64..7).prop_map(|(n, w)| (2u8, n, w)),
                    (0i64..7).prop_map(|w| (3u8, 0, w)),
                ],
                1..3
            ),
            times()
        )
            .prop_map(|(months, days, times)| Spec::Monthly {
                months: months.into_iter().collect(),
                days,
                times
            }),
    ]
}

/// Instants just before daylight-saving switches (UTC seconds), and the
/// zones they are in: 1-hour switches both ways, Lord Howe's 30 minutes,
/// São Paulo's at midnight (2018), and a zone without any.
const SWITCHES: [(&str, &str); 9] = [
    ("Europe/Berlin", "2026-03-29T01:00:00Z"),
    ("Europe/Berlin", "2026-10-25T01:00:00Z"),
    ("America/New_York", "2026-03-08T07:00:00Z"),
    ("America/New_York", "2026-11-01T06:00:00Z"),
    ("Australia/Lord_Howe", "2026-04-04T15:00:00Z"),
    ("Australia/Lord_Howe", "2026-10-03T15:30:00Z"),
    ("America/Sao_Paulo", "2018-11-04T03:00:00Z"),
    ("America/Sao_Paulo", "2019-02-17T02:00:00Z"),
    ("Asia/Kolkata", "2026-06-01T00:00:00Z"),
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn next_runs_match_the_brute_force_reference(
        spec in spec(),
        which in 0usize..SWITCHES.len(),
        shift_minutes in -3i64 * 1440..2 * 1440,
    ) {
        let (zone, switch) = SWITCHES[which];
        let tz = TimeZone::get(zone).unwrap();
        let after = switch.parse::<Timestamp>().unwrap() + shift_minutes.minutes();
        let text = spec.text();
        let schedule: Schedule = match text.parse() {
            Ok(s) => s,
            // Only a monthly spec whose days never occur in its months.
            Err(e) => {
                prop_assert!(matches!(spec, Spec::Monthly { .. }), "{text}: {e}");
                prop_assert!(e.to_string().contains("never runs"), "{text}: {e}");
                return Ok(());
            }
        };
        // Monthly runs may be a year apart: a longer window for those.
        let days = if matches!(spec, Spec::Monthly { .. }) { 400 } else { 40 };
        let want = reference(&spec, &tz, after, days);
        let n = want.len().min(6);
        let got = schedule.upcoming(&tz, after, n + 1);
        prop_assert!(got.len() > n || got.len() == want.len(), "{text} in {zone} after {after}: {got:?}");
        prop_assert_eq!(&got[..n], &want[..n], "{} in {} after {}", text, zone, after);
        if want.len() == n && got.len() > n {
            // Beyond the window, or beyond the six compared.
            let end = after + (days * 24 - 48).hours();
            prop_assert!(want.len() == 6 || got[n] > end, "{text}: {:?} skipped", got[n]);
        }
        prop_assert!(got.iter().all(|t| *t > after));
        prop_assert!(got.windows(2).all(|w| w[0] < w[1]));
    }
}
