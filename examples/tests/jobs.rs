//! Job options from the command line. `cairn schedule next`: run times of
//! each schedule form in a named zone across daylight-saving switches, as
//! text and JSON; bad specs, zones and counts exit 2 naming what is wrong.
//! `--rate-limit` on backup and restore, on reads and on writes: the data
//! arrives whole; bad rules exit 2 naming the option. (How fast is tested
//! on a fake clock in the engine's tests and measured in the benchmarks.)
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

mod common;

use common::*;

fn next(args: &[&str]) -> Vec<String> {
    let mut all = vec!["schedule", "next"];
    all.extend_from_slice(args);
    all.push("--json");
    let v = json(&all);
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn next_runs_of_each_form_across_switches() {
    let berlin = ["--tz", "Europe/Berlin"];
    let from = |t: &'static str| ["--from", t];
    let with = |spec: &'static str, f: &'static str, n: &'static str| {
        let mut a = vec![spec];
        a.extend(berlin);
        a.extend(from(f));
        a.extend(["--count", n]);
        next(&a)
    };
    // Spring forward: 02:30 does not exist on 2026-03-29 and runs at 03:30.
    assert_eq!(
        with("daily 02:30", "2026-03-28T12:00:00+01:00", "2"),
        ["2026-03-29T03:30:00+02:00", "2026-03-30T02:30:00+02:00"]
    );
    // Fall back: 02:30 occurs twice on 2026-10-25 and runs once, first.
    assert_eq!(
        with("daily 02:30", "2026-10-24T12:00:00+02:00", "2"),
        ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
    );
    assert_eq!(
        with(
            "hourly 08:00-18:00 every 2h",
            "2026-11-27T17:00:00+01:00",
            "3"
        ),
        [
            "2026-11-27T18:00:00+01:00",
            "2026-11-28T08:00:00+01:00",
            "2026-11-28T10:00:00+01:00"
        ]
    );
    assert_eq!(
        with("monthly * last-sun 03:00", "2026-11-27T00:00:00Z", "2"),
        ["2026-11-29T03:00:00+01:00", "2026-12-27T03:00:00+01:00"]
    );
    assert_eq!(
        with("monthly * 2nd-tue 03:00", "2026-11-27T00:00:00Z", "1"),
        ["2026-12-08T03:00:00+01:00"]
    );
    assert_eq!(
        with("weekly mon,thu 23:00", "2026-11-27T00:00:00Z", "2"),
        ["2026-11-30T23:00:00+01:00", "2026-12-03T23:00:00+01:00"]
    );
    // A wall time as --from is read in --tz.
    assert_eq!(
        with("once 2026-12-01T02:00", "2026-11-30T10:00", "5"),
        ["2026-12-01T02:00:00+01:00"]
    );
    assert!(with("once 2026-12-01T02:00", "2026-12-02T00:00", "5").is_empty());
    assert_eq!(
        with("immediate", "2026-11-28T10:00:00+01:00", "3"),
        ["2026-11-28T10:00:00+01:00"]
    );
    // New York's switch is at 02:00 local, on its own dates.
    assert_eq!(
        next(&[
            "daily 02:30",
            "--tz",
            "America/New_York",
            "--from",
            "2026-03-07T12:00:00-05:00",
            "--count",
            "2"
        ]),
        ["2026-03-08T03:30:00-04:00", "2026-03-09T02:30:00-04:00"]
    );
    // Text output: one line per run.
    let text = ok(&[
        "schedule",
        "next",
        "daily 02:30",
        "--tz",
        "UTC",
        "--from",
        "2026-11-28T00:00:00Z",
        "--count",
        "2",
    ]);
    assert_eq!(
        text,
        "2026-11-28T02:30:00+00:00\n2026-11-29T02:30:00+00:00\n"
    );
}

#[test]
fn bad_specs_zones_and_counts_exit_2() {
    for (args, needle) in [
        (vec!["daily 26:00"], "00:00–23:59"),
        (vec!["weekly/60 mon 01:00"], "1–52"),
        (vec!["monthly feb 30 01:00"], "never runs"),
        (vec!["hourly every 0m"], "1m–1440m"),
        (vec!["daily 02:00", "--tz", "Mars/Olympus"], "--tz"),
        (vec!["daily 02:00", "--count", "0"], "--count"),
        (vec!["daily 02:00", "--from", "yesterday"], "--from"),
    ] {
        let mut all = vec!["schedule", "next"];
        all.extend(args.iter().copied());
        let out = cairn(&all);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn rate_limited_backups_and_restores_move_everything_and_bad_rules_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let pool = p(&dir.path().join("pool"));
    ok(&["init", &pool]);
    let img = dir.path().join("vda.img");
    let data = random_file(&img, 4 << 20, 3);
    for (on, rules) in [
        ("reads", vec!["--rate-limit", "1GiB/s"]),
        (
            "writes",
            vec![
                "--rate-limit",
                "00:00-12:00=1GiB/s",
                "--rate-limit",
                "12:00-24:00=2GiB/s",
            ],
        ),
    ] {
        let mut args = vec!["backup", &pool, "--vm", on, "--json", "--rate-limit-on", on];
        args.extend(rules.iter().copied());
        let img_arg = p(&img);
        args.push(&img_arg);
        let v = json(&args);
        let id = v["snapshot"].as_str().unwrap().to_string();
        let at = dir.path().join(format!("r-{on}"));
        let mut args = vec!["restore", &pool, &id, "--rate-limit-on", on];
        let at_arg = p(&at);
        args.extend(["--to", &at_arg]);
        args.extend(rules.iter().copied());
        ok(&args);
        assert!(std::fs::read(at.join("vda.img")).unwrap() == data, "{on}");
    }
    for (args, needle) in [
        (vec!["--rate-limit", "50MB/s"], "--rate-limit"),
        (
            vec![
                "--rate-limit",
                "08:00-18:00=50MiB/s",
                "--rate-limit",
                "17:00-19:00=1GiB/s",
            ],
            "overlaps",
        ),
        (vec!["--rate-limit", "0KiB/s"], "out of range"),
        (
            vec!["--rate-limit", "1MiB/s", "--rate-limit-on", "sideways"],
            "reads or writes",
        ),
    ] {
        let img_arg = p(&img);
        let mut all = vec!["backup", &pool, "--vm", "bad", &img_arg];
        all.extend(args.iter().copied());
        let out = cairn(&all);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
}
