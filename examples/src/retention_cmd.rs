//! `cairn prune`, `forget`, `protect` and `policy`: retention from the
//! command line. The decisions are the engine's ([`RetentionPolicy`]); this
//! module parses flags and prints what was kept, removed, and why.

use std::time::Duration;

use cairn_engine::{Period, PruneOptions, RetentionPolicy, SnapshotSelector};
use clap::{Args, Subcommand};

use crate::{open_repo, output, Failure};

/// The keep rules, shared by `prune` and `policy set`.
#[derive(Args, Debug, Default)]
pub struct KeepArgs {
    /// Keep the N newest snapshots of each VM.
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep every snapshot within DURATION of each VM's newest (`30d`, `12h`, `2weeks`).
    #[arg(long, value_name = "DURATION")]
    keep_within: Option<String>,
    /// Keep the newest snapshot of each of the N newest hours that have one.
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    /// … of each of the N newest days.
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// … of each of the N newest ISO weeks.
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// … of each of the N newest months.
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    /// … of each of the N newest years.
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
    /// IANA time zone of the calendar buckets (default: the local one).
    #[arg(long, value_name = "ZONE")]
    tz: Option<String>,
}

impl KeepArgs {
    /// The policy the flags describe; `None` when no keep rule is given.
    fn policy(&self) -> Result<Option<RetentionPolicy>, Failure> {
        let mut p = RetentionPolicy::new();
        if let Some(n) = self.keep_last {
            p = p.with_keep_last(n)?;
        }
        if let Some(d) = &self.keep_within {
            let d: Duration = humantime::parse_duration(d).map_err(|e| {
                Failure::usage(format!(
                    "--keep-within {d:?} is not a duration (like 30d or 12h): {e}"
                ))
            })?;
            p = p.with_keep_within(d)?;
        }
        let periods = [
            (Period::Hourly, self.keep_hourly),
            (Period::Daily, self.keep_daily),
            (Period::Weekly, self.keep_weekly),
            (Period::Monthly, self.keep_monthly),
            (Period::Yearly, self.keep_yearly),
        ];
        for (period, n) in periods {
            if let Some(n) = n {
                p = p.with_keep(period, n)?;
            }
        }
        if p.is_empty() {
            if self.tz.is_some() {
                return Err(Failure::usage("--tz needs at least one --keep-* rule"));
            }
            return Ok(None);
        }
        if let Some(tz) = &self.tz {
            p = p.with_time_zone(tz)?;
        }
        Ok(Some(p))
    }
}

/// `cairn policy …`
#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Store a retention policy in the pool; `prune` without rules applies it.
    Set {
        pool: String,
        #[command(flatten)]
        keep: KeepArgs,
    },
    /// Print the stored policy.
    Show {
        pool: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove the stored policy.
    Clear { pool: String },
}

/// `cairn prune`.
pub fn prune(
    pool: &str,
    keep: &KeepArgs,
    vm: Option<String>,
    dry_run: bool,
    json: bool,
) -> Result<u8, Failure> {
    let repo = open_repo(pool)?;
    let mut options = PruneOptions::new().with_dry_run(dry_run);
    match keep.policy()? {
        Some(policy) => options = options.with_policy(policy),
        None if repo.retention_policy()?.is_none() => {
            return Err(Failure::usage(
                "no --keep-* rule given and no policy stored in the pool (see `cairn policy set`)",
            ))
        }
        None => {}
    }
    if let Some(vm) = vm {
        options = options.with_vm(vm);
    }
    let report = repo.prune(&options)?;
    if json {
        output::print_json(&serde_json::to_value(&report).unwrap_or_default());
    } else {
        println!("policy: {}", report.policy);
        let mut vm = None;
        for d in &report.decisions {
            if vm != Some(&d.vm) {
                println!("vm {}", d.vm);
                vm = Some(&d.vm);
            }
            let reasons: Vec<String> = d.reasons.iter().map(ToString::to_string).collect();
            println!(
                "  {:<7} {}  {}  {}",
                if d.keep { "keep" } else { "remove" },
                &d.id.to_hex()[..16],
                humantime::format_rfc3339_seconds(d.time),
                reasons.join(", ")
            );
        }
        let kept = report.decisions.iter().filter(|d| d.keep).count();
        let doomed = report.decisions.len() - kept;
        if report.dry_run {
            println!("{kept} kept, {doomed} would be removed (dry run: nothing removed)");
        } else {
            println!(
                "{kept} kept, {} removed; run `cairn gc` to reclaim their space",
                report.removed.len()
            );
        }
        for id in &report.skipped {
            println!("skipped {id}: protected or already removed meanwhile");
        }
    }
    for id in &report.damaged {
        eprintln!("cairn: warning: snapshot {id} cannot be read; prune leaves it alone");
    }
    Ok(if report.damaged.is_empty() { 0 } else { 3 })
}

/// `cairn forget`.
pub fn forget(pool: &str, snapshots: &[String], json: bool) -> Result<u8, Failure> {
    let repo = open_repo(pool)?;
    let mut ids = Vec::new();
    for s in snapshots {
        ids.push(repo.resolve(&SnapshotSelector::parse(s, None)?)?);
    }
    repo.forget(&ids)?;
    if json {
        output::print_json(&serde_json::json!({
            "removed": ids.iter().map(|i| i.to_hex()).collect::<Vec<_>>(),
        }));
    } else {
        for id in &ids {
            println!("removed snapshot {id}");
        }
        println!("run `cairn gc` to reclaim their space");
    }
    Ok(0)
}

/// `cairn protect`.
pub fn protect(pool: &str, snapshot: &str, off: bool, json: bool) -> Result<u8, Failure> {
    let repo = open_repo(pool)?;
    let id = repo.resolve(&SnapshotSelector::parse(snapshot, None)?)?;
    let changed = repo.protect(&id, !off)?;
    if json {
        output::print_json(&serde_json::json!({
            "snapshot": id.to_hex(),
            "protected": !off,
            "changed": changed,
        }));
    } else {
        let state = if off { "not protected" } else { "protected" };
        let note = if changed { "" } else { " (already)" };
        println!("snapshot {id} is {state}{note}");
    }
    Ok(0)
}

/// `cairn policy …`.
pub fn policy(command: PolicyCommand) -> Result<u8, Failure> {
    match command {
        PolicyCommand::Set { pool, keep } => {
            let policy = keep
                .policy()?
                .ok_or_else(|| Failure::usage("give at least one --keep-* rule"))?;
            open_repo(&pool)?.set_retention_policy(Some(&policy))?;
            println!("stored policy: {policy}");
        }
        PolicyCommand::Show { pool, json } => {
            let policy = open_repo(&pool)?.retention_policy()?;
            match (policy, json) {
                (Some(p), true) => output::print_json(&serde_json::json!({
                    "policy": p.to_string(),
                    "stored": p.encode(),
                })),
                (None, true) => output::print_json(&serde_json::json!({ "policy": null })),
                (Some(p), false) => println!("{p}"),
                (None, false) => println!("no policy stored"),
            }
        }
        PolicyCommand::Clear { pool } => {
            open_repo(&pool)?.set_retention_policy(None)?;
            println!("stored policy removed");
        }
    }
    Ok(0)
}

/// `cairn gc` arguments.
#[derive(Args, Debug)]
pub struct GcArgs {
    pool: String,
    /// Report what would be reclaimed, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Repack packs whose live share is below P percent (0–100).
    #[arg(long, value_name = "P", default_value_t = 50.0)]
    repack_below: f64,
    /// A backup whose lease was not renewed for this long is taken as dead.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    lease_expiry: String,
    /// Give up (deleting nothing) if backups still run after this long.
    #[arg(long, value_name = "DURATION")]
    max_wait: Option<String>,
    #[arg(long)]
    json: bool,
}

fn duration_arg(flag: &str, value: &str) -> Result<Duration, Failure> {
    humantime::parse_duration(value).map_err(|e| {
        Failure::usage(format!(
            "{flag} {value:?} is not a duration (like 10m): {e}"
        ))
    })
}

/// `cairn gc`.
pub fn gc(args: &GcArgs) -> Result<u8, Failure> {
    if !(0.0..=100.0).contains(&args.repack_below) {
        return Err(Failure::usage(format!(
            "--repack-below {} is out of range (0–100)",
            args.repack_below
        )));
    }
    let mut opts = cairn_engine::GcOptions::default()
        .with_cancel(crate::signals::token())
        .with_dry_run(args.dry_run)
        .with_repack_below(args.repack_below / 100.0)?
        .with_lease_expiry(duration_arg("--lease-expiry", &args.lease_expiry)?)?;
    if let Some(w) = &args.max_wait {
        opts = opts.with_max_wait(Some(duration_arg("--max-wait", w)?));
    }
    if crate::is_tape(&args.pool) {
        return Err(Failure::usage(format!(
            "gc does not run on tape pools: tape is written once, and its space comes back when \
             a whole media set is retired (`cairn prune`, then `cairn tape retire {} --empty`)",
            args.pool
        )));
    }
    if let Some(dir) = crate::standard_dir(&args.pool) {
        return gc_standard(&dir, &args.pool, &opts, args.json);
    }
    // GC reads and deletes in the pool itself, never through a cache.
    let repo = crate::open_repo_with(&args.pool, true)?;
    let report = repo.gc(&opts)?;
    if args.json {
        output::print_json(&serde_json::to_value(&report).unwrap_or_default());
    } else {
        println!("{report}");
    }
    Ok(0)
}

/// A standard pool is collected set by set (a set's chunks are its own);
/// then the sets left without snapshots are removed whole — except each
/// VM's newest set, where its next backup may be starting.
fn gc_standard(
    dir: &std::path::Path,
    address: &str,
    opts: &cairn_engine::GcOptions,
    json: bool,
) -> Result<u8, Failure> {
    // The pool must be initialised (its configuration is shared).
    crate::open_repo_with(address, true)?;
    let pool = cairn_pools::StandardPool::open(dir).map_err(|e| Failure::new(e.to_string()))?;
    let sets = pool.sets()?;
    let mut reports = Vec::new();
    let mut failed = None;
    for s in &sets {
        let face = pool.set(&s.name)?;
        let repo = cairn_engine::Repository::open(std::sync::Arc::new(face))?;
        // One set's failure (a writer to wait for) does not stop the others.
        let report = match repo.gc(opts) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("cairn: backup set {}: {e}", s.name);
                failed = Some(e);
                continue;
            }
        };
        if !json {
            println!("set {}: {report}", s.name);
        }
        reports.push(serde_json::json!({
            "set": s.name,
            "vm": s.vm,
            "report": serde_json::to_value(&report).unwrap_or_default(),
        }));
    }
    let mut removed = Vec::new();
    for s in &sets {
        let newest = sets.iter().rev().find(|o| o.vm == s.vm).map(|o| &o.name);
        if newest == Some(&s.name) {
            continue;
        }
        if cairn_engine::PoolList::list(&pool.set(&s.name)?, cairn_engine::FileKind::Snapshot)?
            .is_empty()
        {
            if opts.dry_run {
                removed.push(s.name.clone());
                continue;
            }
            match pool.remove_set(&s.name) {
                Ok(()) => removed.push(s.name.clone()),
                Err(cairn_engine::Error::PoolBusy(why)) => {
                    eprintln!("cairn: backup set {} kept: {why}", s.name)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    if let Some(e) = failed {
        return Err(e.into());
    }
    if json {
        output::print_json(&serde_json::json!({"sets": reports, "sets_removed": removed}));
    } else {
        for name in &removed {
            println!(
                "backup set {name} {}",
                if opts.dry_run {
                    "would be removed (no snapshots left)"
                } else {
                    "removed (no snapshots left)"
                }
            );
        }
    }
    Ok(0)
}
