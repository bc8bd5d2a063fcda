//! CBT backups of qcow2 files: the per-disk dirty-bitmap lifecycle (see the
//! module documentation of [`qemu`](super)) around one engine backup.

use std::collections::BTreeMap;

use cairn_engine::cbt::{CbtDisk, CbtPolicy, PreparedVm};
use cairn_engine::format::{PROP_NEXT_BITMAP, PROP_SOURCE};
use cairn_engine::{
    BackupOptions, BackupStats, ChunkingParams, Error, NbdSource, Repository, Result, Snapshot,
    SnapshotId,
};

use super::export::QemuNbdExport;
use super::image::{ImageInfo, Qcow2Image};

/// Settings of [`backup_qcow2`].
#[derive(Clone, Debug)]
pub struct Qcow2BackupOptions {
    /// The chain's name: its bitmaps are `NAME.<token>`.
    pub chain: String,
    /// What to do when CBT cannot be trusted.
    pub policy: CbtPolicy,
    /// NBD connections used to read the disk (1–5 in the spec).
    pub connections: usize,
    /// Clean extents per disk to read back and compare with the parent
    /// before trusting a bitmap ([`spot_check`](cairn_engine::cbt::spot_check)); 0 = none.
    pub spot_check: u32,
    /// How the exports are read: request timeout, reconnect window and
    /// largest request (its `connections` is ignored: see above). `None`:
    /// a 60 s timeout, no reconnect, 32 MiB requests.
    pub read: Option<crate::ReadSettings>,
}

/// What [`backup_qcow2`] did.
#[derive(Debug)]
// Returned once per backup: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Qcow2Outcome {
    /// A snapshot was written.
    Done {
        /// What the backup did.
        stats: BackupStats,
        /// Per disk, the bitmap now recording changes since this snapshot.
        next_bitmaps: BTreeMap<String, String>,
        /// Non-fatal problems after the snapshot was committed (a bitmap
        /// that could not be removed).
        warnings: Vec<String>,
    },
    /// CBT was not trusted for a disk and the policy said skip: no snapshot
    /// (one untrusted disk skips the whole VM).
    Skipped {
        /// Why; with several disks `disk: reason; …`.
        reason: String,
        /// The policy asks for an alert.
        alert: bool,
    },
}

/// One qcow2 file of a VM and its disk name in the snapshot.
#[derive(Clone, Debug)]
pub struct Qcow2Disk {
    /// The qcow2 file.
    pub image: Qcow2Image,
    /// The disk's name in the snapshot.
    pub name: String,
}

/// One cairn backup per qcow2 image at a time on this host: an exclusive
/// `flock` on a lock file named by the image's device and inode, in a
/// local directory (`/run/lock`, else `/tmp`) — never on
/// the image itself, whose file system may be NFS (where `flock` becomes a
/// POSIX lock that would clash with qemu's own locks). Released when
/// dropped or when the process dies. Backups on different hosts of an image
/// on shared storage are kept apart by qemu's image locks.
pub(crate) struct ImageLock {
    /// Holds the lock while open.
    _file: std::fs::File,
}

impl ImageLock {
    pub(crate) fn take(path: &std::path::Path) -> Result<Self> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        use std::os::unix::io::AsRawFd;
        let meta = std::fs::metadata(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // One directory for every cairn on this host, whoever runs it and
        // whatever its $TMPDIR: /run/lock where it exists, else /tmp.
        let dir = if std::path::Path::new("/run/lock").is_dir() {
            "/run/lock"
        } else {
            "/tmp"
        };
        let lock_path = std::path::Path::new(dir).join(format!(
            "cairn-image-{}-{}.lock",
            meta.dev(),
            meta.ino()
        ));
        let lock_err = |e| Error::io(format!("opening lock file {}", lock_path.display()), e);
        // An existing lock file is opened read-only (flock needs no more),
        // so one left by another user never blocks; a new one is created
        // readable by all.
        let f = loop {
            match std::fs::File::open(&lock_path) {
                Ok(f) => break f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(lock_err(e)),
            }
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock_path)
            {
                Ok(f) => {
                    let _ = f.set_permissions(std::fs::Permissions::from_mode(0o644));
                    break f;
                }
                // Created by another process meanwhile: open that one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(lock_err(e)),
            }
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                return Err(Error::PoolBusy(format!(
                    "image {} is being backed up by another cairn process on this host; \
                     try again when it is done",
                    path.display()
                )));
            }
            return Err(Error::io(format!("locking {}", lock_path.display()), err));
        }
        Ok(ImageLock { _file: f })
    }
}

/// The part of this pool's bitmap names that says they are this pool's:
/// `CHAIN.` + the first 8 hex digits of the pool id.
fn pool_prefix(chain: &str, pool_id: &str) -> String {
    let id: String = pool_id.chars().take(8).collect();
    format!("{chain}.{id}")
}

/// A chain's bitmap name for a new backup into the pool `pool_id`:
/// [`pool_prefix`] + 8 random hex digits.
pub(super) fn new_bitmap_name(chain: &str, pool_id: &str) -> Result<String> {
    let mut b = [0u8; 4];
    getrandom::getrandom(&mut b).map_err(|e| Error::Random(e.to_string()))?;
    let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!("{}{token}", pool_prefix(chain, pool_id)))
}

pub(crate) fn validate_chain(chain: &str) -> Result<()> {
    let ok = !chain.is_empty()
        && chain.len() <= 64
        && chain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "bitmap chain name {chain:?}: 1–64 characters from A–Z a–z 0–9 - _"
        )))
    }
}

/// What one disk's run knows before its export starts.
pub(crate) struct DiskPlan {
    pub(crate) disk: Qcow2Disk,
    info: ImageInfo,
    /// The disk's newest snapshot.
    parent: Option<(SnapshotId, Snapshot)>,
    /// The bitmap that snapshot started.
    recorded: Option<String>,
    /// The bitmap this run consumes (see [`plan_disk`]).
    pub(crate) consume: Option<String>,
    /// `consume` when it can be exported, else why not.
    pub(crate) usable: std::result::Result<String, String>,
    /// The bitmap this run starts.
    pub(crate) next: String,
    /// `next` is a bitmap an earlier run started and left (see
    /// [`plan_disk`]): it records already.
    pub(crate) adopted: bool,
}

/// Plans one disk's run against `parent`, the disk's newest snapshot.
/// `adopt`: a bitmap of this chain and pool that no snapshot recorded (left
/// by a run that stored nothing) becomes this run's next bitmap instead of
/// a new one — a superset of what a new one would record, and the image
/// is not written (so a resume journal keyed on its state still matches).
pub(crate) fn plan_disk(
    parent: Option<(SnapshotId, Snapshot)>,
    disk: Qcow2Disk,
    chain: &str,
    pool_id: &str,
    adopt: bool,
) -> Result<DiskPlan> {
    let info = disk.image.info()?;
    let recorded = parent.as_ref().and_then(|(_, s)| {
        s.disks
            .iter()
            .find(|d| d.name == disk.name)
            .and_then(|d| d.properties.get(PROP_NEXT_BITMAP).cloned())
    });
    let prefix = format!("{chain}.");
    // The bitmap this run consumes: the one the previous snapshot started,
    // when it belongs to this chain; otherwise this chain's newest bitmap in
    // the image (which `decide` will refuse as not the parent's).
    let consume: Option<String> = match &recorded {
        Some(r) if r.starts_with(&prefix) => Some(r.clone()),
        _ => info
            .bitmaps
            .iter()
            .rev()
            .find(|b| b.name.starts_with(&prefix))
            .map(|b| b.name.clone()),
    };
    let usable = match &consume {
        None => Err(format!("the image has no bitmap of chain {chain:?}")),
        Some(name) => match info.bitmap(name) {
            None => {
                let others: Vec<&str> = info.bitmaps.iter().map(|b| b.name.as_str()).collect();
                Err(format!(
                    "bitmap {name:?} is missing from {} (it holds: {})",
                    disk.image.path().display(),
                    if others.is_empty() {
                        "none".to_string()
                    } else {
                        others.join(", ")
                    }
                ))
            }
            Some(b) => match b.problem() {
                Some(p) => Err(p),
                None => Ok(name.clone()),
            },
        },
    };
    let ours = pool_prefix(chain, pool_id);
    let leftover = info
        .bitmaps
        .iter()
        .rev()
        .find(|b| {
            adopt
                && b.name.starts_with(&ours)
                && Some(&b.name) != recorded.as_ref()
                && b.problem().is_none()
        })
        .map(|b| b.name.clone());
    let (next, adopted) = match leftover {
        Some(name) => (name, true),
        None => (new_bitmap_name(chain, pool_id)?, false),
    };
    Ok(DiskPlan {
        disk,
        info,
        parent,
        recorded,
        consume,
        usable,
        next,
        adopted,
    })
}

/// Backs up the qcow2 file `image` as disk `disk` of `opts.vm`: one disk of
/// [`backup_qcow2_vm`].
pub fn backup_qcow2(
    repo: &Repository,
    image: &Qcow2Image,
    disk: &str,
    opts: &BackupOptions,
    qcow2: &Qcow2BackupOptions,
) -> Result<Qcow2Outcome> {
    let disks = [Qcow2Disk {
        image: image.clone(),
        name: disk.to_string(),
    }];
    backup_qcow2_vm(repo, &disks, opts, qcow2)
}

/// Backs up the qcow2 files of one VM as one snapshot of `opts.vm`, each
/// disk a CBT incremental against its newest snapshot when its bitmap can be
/// trusted (see the module documentation for the bitmap lifecycle, which
/// runs per disk). Under a skip policy one untrusted disk skips the VM.
pub fn backup_qcow2_vm(
    repo: &Repository,
    disks: &[Qcow2Disk],
    opts: &BackupOptions,
    qcow2: &Qcow2BackupOptions,
) -> Result<Qcow2Outcome> {
    validate_chain(&qcow2.chain)?;
    let ChunkingParams::Fixed { size: grid } = opts.chunking else {
        return Err(Error::InvalidArgument(
            "qcow2 backups use fixed-size chunking (the CBT grid)".into(),
        ));
    };
    if disks.is_empty() {
        return Err(Error::InvalidArgument("no qcow2 disk given".into()));
    }
    // One cairn backup per image at a time: two would each start a next
    // bitmap and the first to finish would retire the other's.
    let mut seen = std::collections::BTreeSet::new();
    for d in disks {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = std::fs::metadata(d.image.path()) {
            if !seen.insert((m.dev(), m.ino())) {
                return Err(Error::InvalidArgument(format!(
                    "image {} is given twice (as disk {:?} and another)",
                    d.image.path().display(),
                    d.name
                )));
            }
        }
    }
    let _locks = disks
        .iter()
        .map(|d| ImageLock::take(d.image.path()))
        .collect::<Result<Vec<_>>>()?;
    let pool_id = repo.config().pool_id.to_hex();
    let plans = disks
        .iter()
        .map(|d| {
            let parent = repo.latest_with_disk(&opts.vm, &d.name)?;
            plan_disk(parent, d.clone(), &qcow2.chain, &pool_id, false)
        })
        .collect::<Result<Vec<_>>>()?;
    // Start every next bitmap; undo them all if one fails.
    let mut added: Vec<&DiskPlan> = Vec::new();
    for plan in &plans {
        if let Err(e) = plan.start_next(grid as u64) {
            for p in added {
                let _ = p.drop_next();
            }
            return Err(e);
        }
        added.push(plan);
    }
    let result = backup_with_exports(repo, &plans, opts, qcow2);
    match result {
        Ok(Qcow2Outcome::Done {
            stats,
            mut warnings,
            next_bitmaps,
        }) => {
            for plan in &plans {
                warnings.extend(plan.retire_consumed(&qcow2.chain, &pool_id));
            }
            Ok(Qcow2Outcome::Done {
                stats,
                next_bitmaps,
                warnings,
            })
        }
        other => {
            // No snapshot: the new bitmaps start nothing; the previous ones
            // keep recording for the next attempt.
            let mut cleanup = Ok(());
            for plan in &plans {
                let r = plan.drop_next();
                if cleanup.is_ok() {
                    cleanup = r;
                }
            }
            let outcome = other?;
            cleanup?;
            Ok(outcome)
        }
    }
}

impl DiskPlan {
    /// Adds the bitmap this run starts, enabled: it records every write
    /// from now on.
    pub(crate) fn start_next(&self, granularity: u64) -> Result<()> {
        if self.adopted {
            return Ok(());
        }
        self.disk.image.add_bitmap(&self.next, granularity)
    }

    /// The run stored nothing: removes the bitmap it started (the one it
    /// consumed keeps recording for the next attempt).
    pub(crate) fn drop_next(&self) -> Result<()> {
        self.disk.image.remove_bitmap(&self.next)
    }

    /// The run's snapshot is committed: retires the bitmap the previous
    /// snapshot started (`next` supersedes it) and any this pool's runs
    /// left behind when they were killed. Bitmaps of other chains and
    /// other pools are left alone. Returns warnings.
    pub(crate) fn retire_consumed(&self, chain: &str, pool_id: &str) -> Vec<String> {
        let prefix = format!("{chain}.");
        let ours = pool_prefix(chain, pool_id);
        let mut warnings = Vec::new();
        for b in &self.info.bitmaps {
            let stale = b.name.starts_with(&ours) || Some(&b.name) == self.recorded.as_ref();
            if stale && b.name != self.next && b.name.starts_with(&prefix) {
                if let Err(e) = self.disk.image.remove_bitmap(&b.name) {
                    warnings.push(format!(
                        "{}: could not remove bitmap {:?}: {e}",
                        self.disk.name, b.name
                    ));
                }
            }
        }
        warnings
    }

    /// Exports the image read-only with the bitmap to consume, connects
    /// through `connect(uri, bitmap)` and reads the dirty extents: the
    /// export (stop it before [`drop_next`](Self::drop_next) or
    /// [`retire_consumed`](Self::retire_consumed)) and the disk for
    /// [`prepare_cbt`](Repository::prepare_cbt) — its parent still to set.
    pub(crate) fn open(
        &self,
        chain: &str,
        connections: usize,
        connect: &dyn Fn(&str, Option<&str>) -> Result<NbdSource>,
    ) -> Result<(QemuNbdExport, CbtDisk)> {
        let bitmap = self.usable.as_deref().ok();
        let export = self.disk.image.export_read_only(bitmap, connections)?;
        let source = match connect(&export.uri(), bitmap) {
            Ok(s) => s,
            Err(e) => {
                let _ = export.stop();
                return Err(e);
            }
        };
        let dirty = match &self.usable {
            Ok(name) => source.dirty_extents(name).map_err(|e| e.to_string()),
            Err(why) => Err(why.clone()),
        };
        let disk = CbtDisk::new(
            self.disk.name.clone(),
            Box::new(source),
            self.consume.clone().unwrap_or_else(|| format!("{chain}.*")),
            dirty,
            self.next.clone(),
        )
        .with_property(PROP_SOURCE, self.disk.image.path().display().to_string())
        .with_property("format", "qcow2");
        Ok((export, disk))
    }
}

fn backup_with_exports(
    repo: &Repository,
    plans: &[DiskPlan],
    opts: &BackupOptions,
    qcow2: &Qcow2BackupOptions,
) -> Result<Qcow2Outcome> {
    let mut exports = Vec::new();
    let mut cbt_disks = Vec::new();
    let connect = |uri: &str, bitmap: Option<&str>| match &qcow2.read {
        None => NbdSource::connect_many(uri, bitmap, qcow2.connections),
        Some(read) => {
            NbdSource::connect_many_with_timeout(uri, bitmap, qcow2.connections, read.timeout)?
                .with_reconnect(read.reconnect_window)
                .with_read_request_size(read.request_size)
        }
    };
    for plan in plans {
        let (export, disk) = plan.open(&qcow2.chain, qcow2.connections, &connect)?;
        exports.push(export);
        cbt_disks.push(
            disk.with_spot_check(qcow2.spot_check)
                .with_parent(plan.parent.clone()),
        );
    }
    let prepared = repo.prepare_cbt(&opts.vm, cbt_disks, opts.chunking, qcow2.policy)?;
    let (inputs, parent_id) = match prepared {
        PreparedVm::Backup { disks, parent, .. } => (disks, parent),
        PreparedVm::Skip { reason, alert } => {
            for export in exports {
                export.stop()?;
            }
            return Ok(Qcow2Outcome::Skipped { reason, alert });
        }
    };
    let mut opts = opts.clone();
    opts.parent = parent_id;
    let stats = repo.backup(inputs, &opts)?;
    // The snapshot is committed and names the next bitmaps: from here on a
    // problem is a warning, never a reason to drop them.
    let mut warnings = Vec::new();
    for export in exports {
        if let Err(e) = export.stop() {
            warnings.push(format!("stopping qemu-nbd: {e}"));
        }
    }
    Ok(Qcow2Outcome::Done {
        stats,
        next_bitmaps: plans
            .iter()
            .map(|p| (p.disk.name.clone(), p.next.clone()))
            .collect(),
        warnings,
    })
}
