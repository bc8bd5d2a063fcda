//! `cairn tape …`: the media sets of a tape pool — list them, close the
//! open one, set the rotation period, retire whole sets.

use std::collections::BTreeSet;
use std::time::{Duration, UNIX_EPOCH};

use cairn_engine::SnapshotId;
use cairn_pools::tape::{MediaSetInfo, MediaSetState, TapePool};
use clap::Subcommand;

use crate::{open_repo, output, Failure};

#[derive(Subcommand, Debug)]
pub enum TapeCommand {
    /// List the media sets: state, cartridges, snapshots, bytes.
    Sets {
        /// A tape pool (tape:DIR or tape:/dev/nstN?…).
        pool: String,
        #[arg(long)]
        json: bool,
    },
    /// Close the open media set: the next backup or copy starts a new set
    /// (and the first backup of each disk into it is a full one).
    Close {
        pool: String,
        #[arg(long)]
        json: bool,
    },
    /// Start a new media set with the first write after the open one is
    /// DAYS old (0: only `cairn tape close` or a write error ends a set).
    Rotation {
        pool: String,
        /// 0–3650.
        days: u32,
    },
    /// Retire closed media sets: their snapshots that no other set holds
    /// are forgotten (none is if any of them is protected), every copy of
    /// an object in them leaves the catalog, and their cartridges become
    /// scratch media that a new set relabels.
    Retire {
        pool: String,
        /// Media set ids (or unique prefixes of at least 8 characters).
        sets: Vec<String>,
        /// Retire every closed or incomplete set that holds no snapshot
        /// (after a prune, say).
        #[arg(long, conflicts_with = "sets")]
        empty: bool,
        /// Say what would happen; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

fn tape_pool(pool: &str) -> Result<(crate::Opened, TapePool), Failure> {
    let opened = open_repo(pool)?;
    let Some(tape) = opened.pool.tape.clone() else {
        return Err(Failure::usage(format!(
            "{pool} is not a tape pool (tape:DIR or tape:/dev/nstN?changer=…)"
        )));
    };
    Ok((opened, tape))
}

fn created(s: &MediaSetInfo) -> String {
    if s.created == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s.created)).to_string()
}

fn set_json(s: &MediaSetInfo) -> serde_json::Value {
    serde_json::json!({
        "id": s.id,
        "state": s.state.name(),
        "created": (s.created > 0).then(|| created(s)),
        "cartridges": s.cartridges,
        "objects": s.objects,
        "bytes": s.bytes,
        "snapshots": s.snapshots,
    })
}

/// `cairn tape …`.
pub fn run(command: TapeCommand) -> Result<u8, Failure> {
    match command {
        TapeCommand::Sets { pool, json } => {
            let (_, tape) = tape_pool(&pool)?;
            let sets = tape.media_sets();
            if json {
                output::print_json(&serde_json::json!({
                    "rotation_days": tape.rotation_days(),
                    "media_sets": sets.iter().map(set_json).collect::<Vec<_>>(),
                }));
            } else {
                println!(
                    "{:<32} {:<10} {:<20} {:>9} {:>10}  cartridges",
                    "media set", "state", "created", "snapshots", "bytes"
                );
                for s in &sets {
                    println!(
                        "{:<32} {:<10} {:<20} {:>9} {:>10}  {}",
                        s.id,
                        s.state.name(),
                        created(s),
                        s.snapshots.len(),
                        output::human(s.bytes),
                        s.cartridges.join(" ")
                    );
                }
                match tape.rotation_days() {
                    0 => println!("rotation: none (cairn tape close ends a set)"),
                    d => println!("rotation: a new media set every {d} days"),
                }
            }
            Ok(0)
        }
        TapeCommand::Close { pool, json } => {
            let (_, tape) = tape_pool(&pool)?;
            let closed = tape.close_current_set()?;
            if json {
                output::print_json(&serde_json::json!({ "closed": closed }));
            } else {
                match closed {
                    Some(id) => println!("closed media set {id}; the next write starts a new one"),
                    None => println!("no media set was open; the next write starts a new one"),
                }
            }
            Ok(0)
        }
        TapeCommand::Rotation { pool, days } => {
            let (_, tape) = tape_pool(&pool)?;
            tape.set_rotation_days(days)?;
            println!("rotation: {days} days (0: none)");
            Ok(0)
        }
        TapeCommand::Retire {
            pool,
            sets,
            empty,
            dry_run,
            json,
        } => retire(&pool, &sets, empty, dry_run, json),
    }
}

fn retire(
    pool: &str,
    wanted: &[String],
    empty: bool,
    dry_run: bool,
    json: bool,
) -> Result<u8, Failure> {
    if wanted.is_empty() && !empty {
        return Err(Failure::usage(
            "name the media sets to retire, or pass --empty",
        ));
    }
    let (opened, tape) = tape_pool(pool)?;
    let all = tape.media_sets();
    let mut targets: Vec<&MediaSetInfo> = Vec::new();
    if empty {
        targets.extend(
            all.iter()
                .filter(|s| s.state != MediaSetState::Open && s.snapshots.is_empty()),
        );
    }
    for w in wanted {
        let matching: Vec<&MediaSetInfo> = all
            .iter()
            .filter(|s| s.id == *w || (w.len() >= 8 && s.id.starts_with(w.as_str())))
            .collect();
        let set = match matching.as_slice() {
            [one] => *one,
            [] => {
                return Err(Failure::usage(format!(
                    "{pool} has no media set {w} (see cairn tape sets)"
                )))
            }
            _ => {
                return Err(Failure::usage(format!(
                    "media set prefix {w} matches {} sets: give more of the id",
                    matching.len()
                )))
            }
        };
        if set.state == MediaSetState::Open {
            return Err(Failure::usage(format!(
                "media set {} is the open one: close it first (cairn tape close {pool})",
                set.id
            )));
        }
        if !targets.iter().any(|t| t.id == set.id) {
            targets.push(set);
        }
    }
    // Snapshots only the retired sets hold are forgotten; a copy in
    // another set keeps one.
    let kept: BTreeSet<&str> = all
        .iter()
        .filter(|s| !targets.iter().any(|t| t.id == s.id))
        .flat_map(|s| s.snapshots.iter().map(String::as_str))
        .collect();
    let gone: BTreeSet<&str> = targets
        .iter()
        .flat_map(|s| s.snapshots.iter().map(String::as_str))
        .filter(|s| !kept.contains(s))
        .collect();
    let mut ids = Vec::new();
    for s in &gone {
        ids.push(SnapshotId::from_hex(s).ok_or_else(|| {
            Failure::new(format!(
                "a manifest on tape is named {s:?}, not a snapshot id"
            ))
        })?);
    }
    // Protection first, for all of them (a dry run says so too): nothing
    // is forgotten or retired if one is protected.
    for id in &ids {
        if opened.repo.is_protected(id)? {
            return Err(cairn_engine::Error::SnapshotProtected(id.to_hex()).into());
        }
    }
    // Then set by set: its snapshots forgotten, then the set retired, so
    // an error part-way leaves no set whose snapshots were forgotten but
    // whose copies stay.
    let mut retired = Vec::new();
    if !dry_run {
        let mut forgotten: Vec<SnapshotId> = Vec::new();
        for t in &targets {
            let mine: Vec<SnapshotId> = ids
                .iter()
                .filter(|i| t.snapshots.contains(&i.to_hex()) && !forgotten.contains(i))
                .copied()
                .collect();
            opened.repo.forget(&mine)?;
            forgotten.extend(mine);
            retired.push(tape.retire_set(&t.id)?);
        }
    }
    if json {
        output::print_json(&serde_json::json!({
            "dry_run": dry_run,
            "retired": targets.iter().enumerate().map(|(i, t)| serde_json::json!({
                "id": t.id,
                "cartridges": t.cartridges,
                "objects": retired.get(i).map_or(t.objects, |r| r.objects),
                "bytes": retired.get(i).map_or(t.bytes, |r| r.bytes),
            })).collect::<Vec<_>>(),
            "forgotten": gone,
        }));
    } else {
        let verb = if dry_run { "would retire" } else { "retired" };
        for (i, t) in targets.iter().enumerate() {
            println!(
                "{verb} media set {} ({} objects, {}); scratch cartridges: {}",
                t.id,
                retired.get(i).map_or(t.objects, |r| r.objects),
                output::human(retired.get(i).map_or(t.bytes, |r| r.bytes)),
                t.cartridges.join(" ")
            );
        }
        let verb = if dry_run { "would forget" } else { "forgot" };
        for s in &gone {
            println!("{verb} snapshot {s} (no other media set holds it)");
        }
        if targets.is_empty() {
            println!("no media set to retire");
        }
    }
    Ok(0)
}
