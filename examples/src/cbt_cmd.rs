//! `cairn backup --nbd/--qcow2` (CBT incrementals with the B4 policy) and
//! `cairn restore --format qcow2`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn_cas::qemu::{
    backup_qcow2_vm, Qcow2BackupOptions, Qcow2Disk, Qcow2Image, Qcow2Outcome, Qcow2Target,
};
use cairn_engine::cbt::{CbtDisk, CbtPolicy, PreparedVm};
use cairn_engine::format::PROP_SOURCE;
use cairn_engine::{
    validate_disk_name, BackupDisk, BackupOptions, BackupStats, DiskManifest, DiskTarget,
    NbdAddress, NbdSource, Repository, RestoreOptions, RestoreStats, SnapshotId,
};

use crate::{output, Bar, Failure};

/// Spec B8: at most 5 connections per disk.
const MAX_CONNECTIONS: usize = 5;
/// Most clean extents `--cbt-spot-check` reads back per disk.
const MAX_SPOT_CHECK: u32 = 4096;

/// Restore file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreFormat {
    Raw,
    Qcow2,
}

impl std::str::FromStr for RestoreFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(RestoreFormat::Raw),
            "qcow2" => Ok(RestoreFormat::Qcow2),
            _ => Err(format!("format {s:?}: expected raw or qcow2")),
        }
    }
}

impl std::fmt::Display for RestoreFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RestoreFormat::Raw => "raw",
            RestoreFormat::Qcow2 => "qcow2",
        })
    }
}

/// Command-line settings of one CBT backup.
#[derive(Debug)]
pub struct CbtRun {
    pub pool: String,
    pub nbd: Vec<String>,
    pub qcow2: Vec<PathBuf>,
    pub bitmap: Option<String>,
    pub next_bitmap: Option<String>,
    pub policy: CbtPolicy,
    pub connections: usize,
    pub nbd_timeout: std::time::Duration,
    pub spot_check: u32,
    pub disk_names: Vec<String>,
    /// Largest NBD read request (`--read-buffer`).
    pub read_buffer: Option<usize>,
    /// How long dropped connections are re-established (`--reconnect-window`).
    pub reconnect_window: Option<std::time::Duration>,
    /// Print warnings (not with `--log-level error`).
    pub warnings: bool,
    /// A rate limit, on disk reads or pool writes.
    pub throttle: Option<(
        std::sync::Arc<cairn_engine::jobs::Throttle>,
        crate::rate_args::RateOn,
    )>,
    pub json: bool,
}

/// What happened, for printing.
#[allow(clippy::large_enum_variant)] // one per run, moved once
enum Ran {
    Done {
        stats: BackupStats,
        next_bitmaps: BTreeMap<String, String>,
        connections: usize,
        warnings: Vec<String>,
    },
    Skipped {
        reason: String,
        alert: bool,
    },
}

pub fn run_backup(run: CbtRun, opts: BackupOptions, bar: &Bar) -> Result<u8, Failure> {
    if run.spot_check > MAX_SPOT_CHECK {
        return Err(Failure::usage(format!(
            "--cbt-spot-check {}: must be 0–{MAX_SPOT_CHECK}",
            run.spot_check
        )));
    }
    if !(1..=MAX_CONNECTIONS).contains(&run.connections) {
        return Err(Failure::usage(format!(
            "--connections {}: must be 1–{MAX_CONNECTIONS}",
            run.connections
        )));
    }
    let count = run.nbd.len() + run.qcow2.len();
    if run.disk_names.len() > count {
        return Err(Failure::usage(format!(
            "{} --disk-name values for {count} disks",
            run.disk_names.len()
        )));
    }
    let mut repo = crate::open_repo_for_backup(&run.pool, &opts.vm)?;
    if let Some((t, crate::rate_args::RateOn::Writes)) = &run.throttle {
        repo = crate::rate_args::throttle_pool(
            repo,
            t.clone(),
            cairn_engine::jobs::Direction::Writes,
        )?;
    }
    let vm = opts.vm.clone();
    if run.nbd.is_empty() && matches!(&run.throttle, Some((_, crate::rate_args::RateOn::Reads))) {
        return Err(Failure::usage(
            "--rate-limit on reads is not applied to --qcow2 backups yet (the qcow2 path opens \
             its own NBD exports); use --rate-limit-on writes",
        ));
    }
    let ran = if !run.nbd.is_empty() {
        backup_nbd(&repo, &run, &opts, bar)
    } else {
        let names = crate::disk_names(&run.qcow2, &run.disk_names)?;
        let disks: Vec<Qcow2Disk> = run
            .qcow2
            .iter()
            .zip(names)
            .map(|(file, name)| Qcow2Disk {
                image: Qcow2Image::new(file),
                name,
            })
            .collect();
        let q = Qcow2BackupOptions {
            chain: run.bitmap.clone().unwrap_or_else(|| "cairn".into()),
            policy: run.policy,
            connections: run.connections,
            spot_check: run.spot_check,
            read: (run.reconnect_window.is_some() || run.read_buffer.is_some()).then(|| {
                cairn_cas::ReadSettings::new(
                    run.connections,
                    run.nbd_timeout,
                    run.reconnect_window.unwrap_or_default(),
                    run.read_buffer.unwrap_or(32 << 20) as u32,
                )
            }),
        };
        let outcome = backup_qcow2_vm(&repo, &disks, &opts, &q);
        bar.finish();
        match outcome? {
            Qcow2Outcome::Done {
                stats,
                next_bitmaps,
                warnings,
            } => Ok(Ran::Done {
                stats,
                next_bitmaps,
                connections: run.connections,
                warnings,
            }),
            Qcow2Outcome::Skipped { reason, alert } => Ok(Ran::Skipped { reason, alert }),
        }
    }?;
    let requests = match &ran {
        Ran::Done { stats, .. } => repo.requests_json("per_gib_stored", stats.bytes_new),
        Ran::Skipped { .. } => repo.requests_json("per_gib_stored", 0),
    };
    report(&vm, ran, (run.json, run.warnings), requests)
}

/// Disk names for NBD exports: `--disk-name` by position, else the export
/// name, else `diskN`; repeats get `-1`, `-2`, … suffixes.
fn nbd_disk_names(uris: &[String], overrides: &[String]) -> Result<Vec<String>, Failure> {
    let mut used = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (i, uri) in uris.iter().enumerate() {
        let base = match (overrides.get(i), NbdAddress::parse(uri)?) {
            (Some(n), _) => n.clone(),
            (None, NbdAddress::Unix { export, .. } | NbdAddress::Tcp { export, .. })
                if !export.is_empty() =>
            {
                export
            }
            _ => format!("disk{i}"),
        };
        let mut name = base.clone();
        let mut n = 0;
        while used.contains(&name) {
            n += 1;
            name = format!("{base}-{n}");
        }
        used.insert(name.clone());
        out.push(name);
    }
    Ok(out)
}

fn backup_nbd(
    repo: &Repository,
    run: &CbtRun,
    opts: &BackupOptions,
    bar: &Bar,
) -> Result<Ran, Failure> {
    let names = nbd_disk_names(&run.nbd, &run.disk_names)?;
    let mut opts = opts.clone();
    let mut connections = usize::MAX;
    let mut sources = Vec::new();
    for (uri, name) in run.nbd.iter().zip(names) {
        let mut source = NbdSource::connect_many_with_timeout(
            uri,
            run.bitmap.as_deref(),
            run.connections,
            run.nbd_timeout,
        )?
        .with_cancel(crate::signals::token());
        if let Some(w) = run.reconnect_window {
            source = source.with_reconnect(w);
        }
        if let Some(n) = run.read_buffer {
            source = source.with_read_request_size(n as u32)?;
        }
        connections = connections.min(source.connections());
        sources.push((uri, name, source));
    }
    let disks = match &run.bitmap {
        // No bitmap asked for: full reads, deduplicated against the newest
        // copy of the first disk.
        None => {
            let mut disks = Vec::new();
            for (uri, name, source) in sources {
                if opts.parent.is_none() {
                    opts.parent = repo.latest_with_disk(&opts.vm, &name)?.map(|(id, _)| id);
                }
                disks
                    .push(BackupDisk::image(name, source).with_property(PROP_SOURCE, uri.as_str()));
            }
            disks
        }
        Some(bitmap) => {
            let next = run.next_bitmap.clone().unwrap_or_else(|| bitmap.clone());
            let cbt_disks = sources
                .into_iter()
                .map(|(uri, name, source)| {
                    let dirty = source.dirty_extents(bitmap).map_err(|e| match e {
                        cairn_engine::Error::CbtNotTrusted { reason, .. } => reason,
                        e => e.to_string(),
                    });
                    CbtDisk::new(name, Box::new(source), bitmap.clone(), dirty, next.clone())
                        .with_property(PROP_SOURCE, uri.as_str())
                        .with_spot_check(run.spot_check)
                })
                .collect();
            match repo.prepare_cbt(&opts.vm, cbt_disks, opts.chunking, run.policy)? {
                PreparedVm::Backup { disks, parent, .. } => {
                    opts.parent = parent;
                    disks
                }
                // Spec B4: an untrusted disk under a skip policy skips the VM.
                PreparedVm::Skip { reason, alert } => return Ok(Ran::Skipped { reason, alert }),
            }
        }
    };
    let next_bitmaps = match run.next_bitmap.as_ref().or(run.bitmap.as_ref()) {
        Some(b) => disks.iter().map(|d| (d.name.clone(), b.clone())).collect(),
        None => BTreeMap::new(),
    };
    let disks = match &run.throttle {
        Some((t, crate::rate_args::RateOn::Reads)) => {
            disks.into_iter().map(|d| d.throttled(t.clone())).collect()
        }
        _ => disks,
    };
    let stats = repo.backup(disks, &opts);
    bar.finish();
    Ok(Ran::Done {
        stats: stats?,
        next_bitmaps,
        connections,
        warnings: Vec::new(),
    })
}

fn report(
    vm: &str,
    ran: Ran,
    (json, show_warnings): (bool, bool),
    requests: serde_json::Value,
) -> Result<u8, Failure> {
    match ran {
        Ran::Done {
            stats,
            next_bitmaps,
            connections,
            warnings,
        } => {
            for w in warnings.iter().filter(|_| show_warnings) {
                eprintln!("cairn: warning: {w}");
            }
            let fallback = fallback_text(&stats);
            output::backup_warnings(&stats);
            if json {
                let mut v = output::backup_json(vm, &stats);
                if let Some(o) = v.as_object_mut() {
                    o.insert("cbt_fallback".into(), fallback.clone().into());
                    o.insert("next_bitmaps".into(), serde_json::json!(next_bitmaps));
                    o.insert("connections".into(), connections.into());
                    o.insert("warnings".into(), warnings.into());
                    o.insert("requests".into(), requests);
                }
                output::print_json(&v);
            } else {
                if let Some(f) = &fallback {
                    eprintln!("cairn: CBT not used, read the whole disk: {f}");
                }
                println!(
                    "snapshot {} of {vm} ({}): {} logical, {} dirty, {} read, {} new in pool in {:.2}s",
                    stats.snapshot,
                    stats.mode,
                    output::human(stats.bytes_logical),
                    output::human(stats.bytes_dirty),
                    output::human(stats.bytes_read),
                    output::human(stats.bytes_new),
                    stats.seconds
                );
            }
            Ok(0)
        }
        Ran::Skipped { reason, alert } => {
            if json {
                output::print_json(&serde_json::json!({
                    "vm": vm, "skipped": true, "alert": alert, "snapshot": null,
                    "mode": null, "cbt_fallback": reason,
                }));
            }
            if alert {
                eprintln!("cairn: ALERT: backup of {vm} skipped: CBT cannot be trusted: {reason}");
                Ok(4)
            } else {
                if !json {
                    println!("backup of {vm} skipped: CBT cannot be trusted: {reason}");
                }
                Ok(0)
            }
        }
    }
}

/// The fallback reason(s) of a backup: one disk's reason, or
/// "disk: reason; …" for several.
fn fallback_text(stats: &BackupStats) -> Option<String> {
    match stats.cbt_fallback.len() {
        0 => None,
        1 => stats.cbt_fallback.values().next().cloned(),
        _ => Some(
            stats
                .cbt_fallback
                .iter()
                .map(|(d, r)| format!("{d}: {r}"))
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
}

/// Restores every disk of a snapshot as thin qcow2 files `dir/<disk name>`.
pub fn restore_qcow2(
    repo: &Repository,
    id: &SnapshotId,
    dir: &Path,
    opts: &RestoreOptions,
) -> cairn_engine::Result<RestoreStats> {
    std::fs::create_dir_all(dir).map_err(|e| {
        cairn_engine::Error::io(format!("creating restore directory {}", dir.display()), e)
    })?;
    let overwrite = opts.overwrite;
    repo.restore(
        id,
        &|disk: &DiskManifest| {
            validate_disk_name(&disk.name)?;
            let t = Qcow2Target::create(&dir.join(&disk.name), disk.size, overwrite)?;
            Ok(Box::new(t) as Box<dyn DiskTarget>)
        },
        opts,
    )
}
