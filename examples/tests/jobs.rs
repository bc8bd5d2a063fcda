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

/// A raw and a qcow2 VM in an inventory, a backup job and a restore job.
struct JobSetup {
    dir: tempfile::TempDir,
}

impl JobSetup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("images")).unwrap();
        make_image(&d.join("images/web1.img"), 3 << 20, 1);
        new_qcow2(&d.join("images/web2.qcow2"), "8M");
        tool(
            "qemu-io",
            &[
                "-c",
                "write -P 0x5a 1M 2M",
                &p(&d.join("images/web2.qcow2")),
            ],
        );
        std::fs::write(
            d.join("inv.toml"),
            "restore_dir = \"restored\"\n\
             [[vm]]\nname = \"web1\"\nhost = \"kvm1\"\n[[vm.disk]]\ndevice = \"vda\"\npath = \"images/web1.img\"\n\
             [[vm]]\nname = \"web2\"\nhost = \"kvm1\"\n[[vm.disk]]\ndevice = \"vda\"\npath = \"images/web2.qcow2\"\n\
             [[vm]]\nname = \"db\"\nhost = \"kvm2\"\n[[vm.disk]]\ndevice = \"vda\"\npath = \"images/web1.img\"\n",
        )
        .unwrap();
        ok(&["init", &p(&d.join("pool"))]);
        JobSetup { dir }
    }

    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![("CAIRN_STATE_DIR", p(&self.path("state")))]
    }

    /// Writes job `name` (`body` after the common keys) and adds it.
    fn add(&self, name: &str, kind: &str, top: &str, tables: &str) {
        self.add_to(name, kind, &p(&self.path("pool")), top, tables);
    }

    /// [`add`](Self::add) with the pool at `pool`.
    fn add_to(&self, name: &str, kind: &str, pool: &str, top: &str, tables: &str) {
        let file = self.path(&format!("{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "name = \"{name}\"\nkind = \"{kind}\"\nplatform = \"inventory:{}\"\npool = \"{}\"\n{top}\n\
                 [capacity]\nmin_free_percent = 0\nmin_free = \"0\"\n[retries]\ninterval = \"0s\"\n{tables}",
                p(&self.path("inv.toml")),
                pool
            ),
        )
        .unwrap();
        ok_env(&["job", "add", "--replace", &p(&file)], &self.env());
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        cairn_env(args, &self.env())
    }
}

#[test]
fn jobs_back_up_and_restore_an_inventory_record_runs_and_notify() {
    let s = JobSetup::new();
    let events = s.path("events.jsonl");
    s.add(
        "nightly",
        "backup",
        "schedule = \"daily 02:30\"\ntimezone = \"UTC\"",
        &format!(
            "[select]\nkeywords = [\"web\"]\n[scripts]\npre = \"[ \\\"$CAIRN_VM\\\" != web2 ] || [ -e {flag} ]\"\n\
             [notify]\ncommand = \"cat >> {events}; echo >> {events}\"\n",
            flag = p(&s.path("web2-ok")),
            events = p(&events)
        ),
    );
    // web2's pre-script says no: partly done, exit 7, events sent.
    let out = s.run(&["job", "run", "nightly", "--json"]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rec["status"], "partial");
    let vms = rec["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2);
    assert_eq!(vms[0]["vm"], "web1");
    assert_eq!(vms[0]["status"], "succeeded");
    assert_eq!(
        vms[0]["bytes_logical"],
        std::fs::metadata(s.path("images/web1.img")).unwrap().len()
    );
    assert_eq!(vms[1]["status"], "skipped");
    assert!(vms[1]["error"]
        .as_str()
        .unwrap()
        .contains("pre-script exited with code 1"));
    let text = std::fs::read_to_string(&events).unwrap();
    let kinds: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(kinds, ["vm-skipped", "job-partial"]);
    // Both now.
    std::fs::write(s.path("web2-ok"), b"").unwrap();
    let out = s.run(&["job", "run", "nightly", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let listed = json_env(&["job", "list", "--json"], &s.env());
    assert_eq!(listed[0]["job"], "nightly");
    assert_eq!(listed[0]["last_status"], "succeeded");
    assert!(listed[0]["next_run"]
        .as_str()
        .unwrap()
        .ends_with("T02:30:00+00:00"));
    let history = json_env(&["job", "history", "nightly", "--json"], &s.env());
    assert_eq!(history.as_array().unwrap().len(), 2);
    let log = ok_env(&["job", "log", "nightly"], &s.env());
    assert!(log.contains("2 VM(s) selected: web1, web2"), "{log}");
    assert!(log.contains("run ended: succeeded"), "{log}");

    // A restore job puts both back bit-identical.
    s.add(
        "back",
        "restore",
        "",
        "[select]\nvms = [\"web1\", \"web2\"]\n",
    );
    let out = s.run(&["job", "run", "back"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        std::fs::read(s.path("restored/web1/vda.img")).unwrap(),
        std::fs::read(s.path("images/web1.img")).unwrap()
    );
    assert_eq!(
        raw_of(&s.path("restored/web2/vda.qcow2"), &s.path("a.raw")),
        raw_of(&s.path("images/web2.qcow2"), &s.path("b.raw"))
    );
    // Removing keeps the history unless purged.
    ok_env(&["job", "remove", "back"], &s.env());
    let out = s.run(&["job", "show", "back"]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("no job named \"back\""),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        json_env(&["job", "history", "back", "--json"], &s.env())
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// Jobs into a tape pool (each VM into the open media set, two VMs at
/// once) and a standard pool (each VM into its own backup set), with CBT
/// on: everything restores bit-identical from each, and the second run of
/// the qcow2 VM reads only what changed.
#[test]
fn jobs_into_tape_and_standard_pools() {
    let s = JobSetup::new();
    let tape = format!("tape:{}", p(&s.path("tape")));
    ok(&[
        "init",
        &tape,
        "--cartridges",
        "4",
        "--cartridge-size",
        "64M",
    ]);
    let standard = format!("standard:{}", p(&s.path("standard")));
    ok(&["init", &standard]);
    for (name, pool) in [("to-tape", &tape), ("to-standard", &standard)] {
        s.add_to(
            name,
            "backup",
            pool,
            "",
            "[select]\nvms = [\"web1\", \"web2\"]\n[limits]\nvms_per_job = 2\n[cbt]\nenabled = true\n",
        );
        let out = s.run(&["job", "run", name, "--json"]);
        assert_eq!(
            code(&out),
            0,
            "{name}: {} {}",
            stderr(&out),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The guest writes 4 KiB; the next runs read one 64 KiB chunk of web2.
    tool(
        "qemu-io",
        &[
            "-c",
            "write -P 0x33 2M 4K",
            &p(&s.path("images/web2.qcow2")),
        ],
    );
    for (name, pool) in [("to-tape", &tape), ("to-standard", &standard)] {
        let out = s.run(&["job", "run", name, "--json"]);
        assert_eq!(code(&out), 0, "{name}: {}", stderr(&out));
        let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let web2 = rec["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vm"] == "web2")
            .unwrap()
            .clone();
        assert_eq!(web2["mode"], "cbt", "{name}: {web2}");
        assert_eq!(web2["bytes_read"], 65536, "{name}: {web2}");
        let restore = format!("{name}-back");
        s.add_to(
            &restore,
            "restore",
            pool,
            "",
            "[select]\nvms = [\"web1\", \"web2\"]\n",
        );
        let _ = std::fs::remove_dir_all(s.path("restored"));
        let out = s.run(&["job", "run", &restore]);
        assert_eq!(code(&out), 0, "{restore}: {}", stderr(&out));
        assert!(
            std::fs::read(s.path("restored/web1/vda.img")).unwrap()
                == std::fs::read(s.path("images/web1.img")).unwrap(),
            "{name}"
        );
        assert_eq!(
            raw_of(&s.path("restored/web2/vda.qcow2"), &s.path("a.raw")),
            raw_of(&s.path("images/web2.qcow2"), &s.path("b.raw")),
            "{name}"
        );
    }
    // The standard pool keeps a backup set per VM.
    let sets = json(&["sets", &standard, "--json"]);
    assert_eq!(sets.as_array().unwrap().len(), 2, "{sets}");
}

#[test]
fn bad_job_files_exit_2_naming_the_key() {
    let s = JobSetup::new();
    for (top, tables, want) in [
        (
            "",
            "[select]\nvms = [\"web1\"]\n[limits]\nvms_per_job = 33\n",
            "vms_per_job = 33 is out of range (1–32)",
        ),
        (
            "schedule = \"daily 24:30\"",
            "[select]\nvms = [\"web1\"]\n",
            "schedule:",
        ),
        (
            "colour = \"red\"",
            "[select]\nvms = [\"web1\"]\n",
            "unknown field `colour`",
        ),
        (
            "",
            "[select]\nvms = [\"web1\"]\n[source]\nbuffer = \"16MiB\"\n",
            "source.buffer: 16MiB is out of range (64KiB–8MiB)",
        ),
    ] {
        let file = s.path("bad.toml");
        std::fs::write(
            &file,
            format!("name = \"bad\"\nkind = \"backup\"\nplatform = \"inventory:x\"\npool = \"y\"\n{top}\n{tables}"),
        )
        .unwrap();
        let out = s.run(&["job", "add", &p(&file)]);
        assert_eq!(code(&out), 2, "{top} {tables}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(want),
            "{want:?} not in {}",
            stderr(&out)
        );
    }
    assert!(json_env(&["job", "list", "--json"], &s.env())
        .as_array()
        .unwrap()
        .is_empty());
}

/// The daemon killed while a run is under way (SIGKILL), and stopped by
/// SIGTERM: the run is recorded interrupted (or cancelled), resumed once by
/// the next daemon, and never run a third time.
#[test]
fn a_killed_or_stopped_daemon_resumes_its_run_once() {
    use std::process::{Command, Stdio};
    let s = JobSetup::new();
    let inside = s.path("inside");
    let go = s.path("go");
    // An immediate job whose pre-script waits (up to 30 s) for `go`.
    let add_job = || {
        s.add(
            "now",
            "backup",
            "",
            &format!(
                "[select]\nvms = [\"db\"]\n[scripts]\n\
                 pre = \"touch {inside}; i=0; while [ ! -e {go} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\"\n",
                inside = p(&inside),
                go = p(&go)
            ),
        )
    };
    add_job();
    let history = || json_env(&["job", "history", "now", "--json"], &s.env());
    for signal in [libc::SIGKILL, libc::SIGTERM] {
        let _ = std::fs::remove_file(&inside);
        let _ = std::fs::remove_file(&go);
        if signal == libc::SIGTERM {
            // A fresh occurrence: the job again, as a new immediate job.
            ok_env(&["job", "remove", "now", "--purge"], &s.env());
            add_job();
        }
        let mut daemon = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["daemon", "--poll", "1s"])
            .envs(s.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while !inside.exists() {
            assert!(
                start.elapsed().as_secs() < 60,
                "the daemon never ran the job"
            );
            assert!(daemon.try_wait().unwrap().is_none(), "the daemon ended");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // SAFETY: signals the child we started.
        unsafe {
            libc::kill(daemon.id() as i32, signal);
        }
        let status = daemon.wait().unwrap();
        let h = history();
        assert_eq!(h.as_array().unwrap().len(), 1, "{h}");
        let want = if signal == libc::SIGKILL {
            "interrupted"
        } else {
            "cancelled"
        };
        assert_eq!(h[0]["status"], want, "{h}");
        if signal == libc::SIGTERM {
            assert_eq!(status.code(), Some(128 + libc::SIGTERM));
        }
        // The next daemon resumes it once; the one after does nothing.
        std::fs::write(&go, b"").unwrap();
        ok_env(&["daemon", "--once"], &s.env());
        ok_env(&["daemon", "--once"], &s.env());
        let h = history();
        let runs = h.as_array().unwrap();
        assert_eq!(runs.len(), 2, "{h}");
        assert_eq!(runs[1]["trigger"], "resumed");
        assert_eq!(runs[1]["status"], "succeeded");
        assert_eq!(runs[1]["scheduled"], runs[0]["scheduled"]);
    }
    // Two snapshots, from the resumed runs: none from a killed or stopped one.
    let snaps = json_env(&["snapshots", &p(&s.path("pool")), "--json"], &[]);
    let n = snaps
        .as_array()
        .map(|a| a.len())
        .or_else(|| snaps["snapshots"].as_array().map(|a| a.len()))
        .unwrap();
    assert_eq!(n, 2, "{snaps}");
}

/// Job options as backup/restore flags: a pre-condition that says no (exit
/// 4, nothing written), pre- and post-scripts with the result, retries of
/// a network-type failure (a refused NBD connection), bad values exit 2
/// naming the option and its range.
#[test]
fn job_flags_on_backup_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("disk.img");
    make_image(&image, 2 << 20, 3);
    let pool = p(&d.join("pool"));
    ok(&["init", &pool]);
    let img = p(&image);
    let out = cairn(&[
        "backup",
        &pool,
        "--vm",
        "v",
        &img,
        "--pre-condition",
        "exit 3",
    ]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("exited with code 3"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        json(&["snapshots", &pool, "--json"])
            .as_array()
            .unwrap()
            .len(),
        0
    );

    let result = d.join("result");
    let post = format!(
        "echo \"$CAIRN_KIND $CAIRN_VM $CAIRN_RESULT\" >> {}",
        p(&result)
    );
    ok(&[
        "backup",
        &pool,
        "--vm",
        "v",
        &img,
        "--pre-script",
        "true",
        "--post-script",
        &post,
    ]);
    let restored = d.join("restored");
    ok(&[
        "restore",
        &pool,
        "latest",
        "--vm",
        "v",
        "--to",
        &p(&restored),
        "--post-script",
        &post,
    ]);
    assert_eq!(
        std::fs::read_to_string(&result).unwrap(),
        "backup v succeeded\nrestore v succeeded\n"
    );
    let out = cairn(&[
        "restore",
        &pool,
        "latest",
        "--vm",
        "v",
        "--to",
        &p(&restored),
        "--pre-script",
        "exit 1",
    ]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));

    // A socket nobody listens on: connection refused, a network-type
    // failure, tried three times.
    let sock = d.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let uri = format!("nbd+unix:///?socket={}", p(&sock));
    let out = cairn(&[
        "backup",
        &pool,
        "--vm",
        "n",
        "--nbd",
        &uri,
        "--retries",
        "2",
        "--retry-interval",
        "0s",
    ]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("retry 1 of 2") && err.contains("retry 2 of 2"),
        "{err}"
    );
    assert!(!err.contains("retry 3"), "{err}");

    for (flag, value, want) in [
        ("--retries", "11", "--retries 11 is out of range (0–10)"),
        (
            "--retry-interval",
            "3h",
            "--retry-interval 3h is out of range (0–120 min)",
        ),
        (
            "--script-timeout",
            "0s",
            "--script-timeout 0s is out of range (1s–24h)",
        ),
    ] {
        let out = cairn(&["backup", &pool, "--vm", "v", &img, flag, value]);
        assert_eq!(code(&out), 2, "{flag} {value}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{}", stderr(&out));
    }
}

/// The source and limit options of jobs as flags (#15 point 10): bad
/// values exit 2 naming the option and its range; a capacity shortfall
/// exits 4 without a snapshot; two disks read and written side by side
/// with small read and write requests restore bit-identical.
#[test]
fn source_and_limit_flags() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (d.join("a.img"), d.join("b.img"));
    make_image(&a, 8 << 20, 5);
    make_image(&b, 7 << 20, 6);
    let pool = p(&d.join("pool"));
    ok(&["init", &pool]);
    let backup = |extra: &[&str]| {
        let mut args = vec!["backup", &pool, "--vm", "v"];
        let (pa, pb) = (p(&a), p(&b));
        let mut all: Vec<String> = args.drain(..).map(String::from).collect();
        all.push(pa);
        all.push(pb);
        all.extend(extra.iter().map(|s| s.to_string()));
        cairn(&all)
    };
    for (flags, want) in [
        (
            vec!["--parallel-disks", "6"],
            "--parallel-disks 6 is out of range (1–5)",
        ),
        (
            vec!["--read-buffer", "32K"],
            "--read-buffer 32K is out of range (64KiB–8MiB)",
        ),
        (vec!["--read-buffer", "many"], "--read-buffer \"many\""),
        (
            vec!["--reconnect-window", "30s"],
            "--reconnect-window 30s is out of range (1–60 min)",
        ),
        (
            vec!["--min-free-percent", "100"],
            "--min-free-percent 100 is out of range (1–99)",
        ),
        (vec!["--log-level", "loud"], "invalid value 'loud'"),
    ] {
        let out = backup(&flags);
        assert_eq!(code(&out), 2, "{flags:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{flags:?}: {}", stderr(&out));
    }
    // 99 % free is more than this file system has: not backed up.
    let out = backup(&["--min-free-percent", "99"]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("below 99 % free"), "{}", stderr(&out));
    assert_eq!(
        json(&["snapshots", &pool, "--json"])
            .as_array()
            .unwrap()
            .len(),
        0
    );

    let out = backup(&[
        "--parallel-disks",
        "2",
        "--read-buffer",
        "128K",
        "--min-free",
        "1M",
        "--log-level",
        "warn",
        "--json",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let logical = std::fs::metadata(&a).unwrap().len() + std::fs::metadata(&b).unwrap().len();
    assert_eq!(stats["bytes_logical"], logical);
    let to = d.join("out");
    for bad in [["--write-buffer", "9M"], ["--channels", "65"]] {
        let out = cairn(&["restore", &pool, "latest", "--to", &p(&to), bad[0], bad[1]]);
        assert_eq!(code(&out), 2, "{bad:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("out of range"), "{}", stderr(&out));
    }
    ok(&[
        "restore",
        &pool,
        "latest",
        "--to",
        &p(&to),
        "--write-buffer",
        "64K",
        "--parallel-disks",
        "2",
        "--channels",
        "2",
    ]);
    assert!(std::fs::read(to.join("a.img")).unwrap() == std::fs::read(&a).unwrap());
    assert!(std::fs::read(to.join("b.img")).unwrap() == std::fs::read(&b).unwrap());
}
