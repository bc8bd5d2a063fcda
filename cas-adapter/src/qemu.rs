//! Local qemu tooling for qcow2 disks: what a CVK host (or any KVM host)
//! runs to back up and restore a qcow2 file.
//!
//! - [`Qcow2Image`]: `qemu-img info` (size, persistent dirty bitmaps and their
//!   flags) and bitmap management (`qemu-img bitmap --add/--remove`).
//! - [`QemuNbdExport`]: a `qemu-nbd` process serving an image on a private
//!   unix socket (read-only with a dirty bitmap for backups, writable for
//!   restores), stopped with SIGTERM and waited for, so the image lock is
//!   released before anything else touches the file.
//! - [`backup_qcow2`]: one CBT backup of a qcow2 file with the bitmap
//!   lifecycle of libvirt checkpoints (below).
//! - [`Qcow2Target`]: a restore target writing a thin qcow2 through qemu-nbd.
//!
//! ## Bitmap lifecycle
//! A chain is named by the caller (`--bitmap NAME`); every bitmap Cairn
//! creates for it is `NAME.<8 hex digits of the pool id><8 random hex
//! digits>`, unique per backup, so a bitmap is identified by its name alone
//! and two pools (or two chains) backing up one image never consume or
//! remove each other's bitmaps. One run:
//! 1. read the image's bitmaps (`qemu-img info`); the previous snapshot of
//!    the disk names the bitmap it started (`cbt.next-bitmap`);
//! 2. add the next bitmap, enabled (it records every write from now on);
//! 3. export the image read-only with the previous bitmap, read its dirty
//!    extents and let [`cairn_engine::cbt::decide`] judge them: a missing,
//!    disabled or inconsistent (`in-use`, left by an unclean qemu exit)
//!    bitmap, one from another chain, or a resized disk is not trusted and
//!    the job's policy applies (full read against the parent, or skip);
//! 4. back up, stop the export;
//! 5. on success remove the consumed bitmap and any other bitmap of this
//!    chain and pool (left by a run that was killed); on failure or skip
//!    remove the new one, so the previous bitmap keeps recording and the
//!    next run retries from it.
//!
//! Between steps 2 and 4 the image is either unlocked for a moment or held
//! read-only by the export; a write in that moment lands in both bitmaps and
//! is read again next time (a superset, never a loss).
//!
//! The image must not be open read-write by a running VM: qemu's image lock
//! makes `qemu-img` fail, and the error says so. A running VM's disk is
//! backed up through its own NBD export (libvirt pull mode) instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_engine::cbt::{self, CbtDisk, CbtPolicy, PreparedDisk};
use cairn_engine::nbd::NbdTarget;
use cairn_engine::{
    backup, BackupOptions, BackupStats, ChunkingParams, DiskTarget, Error, NbdSource, Progress,
    Repository, Result, Snapshot, SnapshotId,
};

/// How long `qemu-nbd` may take to create its socket.
const EXPORT_START_TIMEOUT: Duration = Duration::from_secs(30);

fn tool_error(tool: &str, args: &[String], detail: impl std::fmt::Display) -> Error {
    Error::External {
        program: tool.to_string(),
        detail: format!("{}: {detail}", args.join(" ")),
    }
}

/// Runs a qemu tool to completion; a failure carries its stderr.
fn run_tool(tool: &str, args: &[String]) -> Result<String> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("running {tool} (install qemu-utils to get it)"), e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let detail = stderr.trim();
        let hint = if detail.contains("lock") {
            " (the image is open in another process, e.g. a running VM; back it up through \
             its NBD export with --nbd instead)"
        } else {
            ""
        };
        return Err(tool_error(
            tool,
            args,
            format!("exited with {}: {detail}{hint}", out.status),
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| tool_error(tool, args, e))
}

/// A persistent dirty bitmap of a qcow2 image, as `qemu-img info` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    pub granularity: u64,
    /// qemu's flags: `auto` (enabled: it records writes), `in-use` (not
    /// saved cleanly: it may have missed writes and must not be trusted).
    pub flags: Vec<String>,
}

impl BitmapInfo {
    /// Records writes.
    pub fn enabled(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }
    /// Left inconsistent by an unclean exit of the process that had it open.
    pub fn inconsistent(&self) -> bool {
        self.flags.iter().any(|f| f == "in-use")
    }
    /// Why this bitmap cannot be trusted, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if self.inconsistent() {
            Some(format!(
                "bitmap {:?} is inconsistent (flag in-use: the process that had the image open \
                 exited uncleanly), so it may have missed writes",
                self.name
            ))
        } else if !self.enabled() {
            Some(format!(
                "bitmap {:?} is disabled: it stopped recording writes",
                self.name
            ))
        } else {
            None
        }
    }
}

/// What `qemu-img info` says about an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: String,
    pub virtual_size: u64,
    pub bitmaps: Vec<BitmapInfo>,
}

impl ImageInfo {
    /// Parses `qemu-img info --output=json`.
    pub fn parse(json: &str) -> std::result::Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
        let format = v
            .get("format")
            .and_then(|f| f.as_str())
            .ok_or("no \"format\"")?
            .to_string();
        let virtual_size = v
            .get("virtual-size")
            .and_then(|s| s.as_u64())
            .ok_or("no \"virtual-size\"")?;
        let mut bitmaps = Vec::new();
        let list = v
            .pointer("/format-specific/data/bitmaps")
            .and_then(|b| b.as_array());
        for b in list.into_iter().flatten() {
            let name = b
                .get("name")
                .and_then(|n| n.as_str())
                .ok_or("bitmap without a name")?;
            let granularity = b
                .get("granularity")
                .and_then(|g| g.as_u64())
                .ok_or("bitmap without a granularity")?;
            let flags = b
                .get("flags")
                .and_then(|f| f.as_array())
                .map(|f| {
                    f.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            bitmaps.push(BitmapInfo {
                name: name.to_string(),
                granularity,
                flags,
            });
        }
        Ok(ImageInfo {
            format,
            virtual_size,
            bitmaps,
        })
    }

    pub fn bitmap(&self, name: &str) -> Option<&BitmapInfo> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
}

/// A qcow2 image file driven with `qemu-img`.
#[derive(Clone, Debug)]
pub struct Qcow2Image {
    path: PathBuf,
}

impl Qcow2Image {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Qcow2Image { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn arg(&self) -> String {
        self.path.display().to_string()
    }

    /// `qemu-img info`; an error if the file is not a qcow2 image or is
    /// locked by a writer.
    pub fn info(&self) -> Result<ImageInfo> {
        let args = vec![
            "info".into(),
            "--output=json".into(),
            "-f".into(),
            "qcow2".into(),
            self.arg(),
        ];
        let out = run_tool("qemu-img", &args)?;
        ImageInfo::parse(&out).map_err(|e| tool_error("qemu-img", &args, e))
    }

    /// Adds an enabled persistent bitmap.
    pub fn add_bitmap(&self, name: &str, granularity: u64) -> Result<()> {
        run_tool(
            "qemu-img",
            &[
                "bitmap".into(),
                "--add".into(),
                "--granularity".into(),
                granularity.to_string(),
                "-f".into(),
                "qcow2".into(),
                self.arg(),
                name.into(),
            ],
        )
        .map(drop)
    }

    /// Removes a persistent bitmap.
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        run_tool(
            "qemu-img",
            &[
                "bitmap".into(),
                "--remove".into(),
                "-f".into(),
                "qcow2".into(),
                self.arg(),
                name.into(),
            ],
        )
        .map(drop)
    }

    /// Serves the image read-only over a private unix socket, with `bitmap`
    /// as the `qemu:dirty-bitmap:<bitmap>` context, accepting
    /// `connections` clients at once.
    pub fn export_read_only(
        &self,
        bitmap: Option<&str>,
        connections: usize,
    ) -> Result<QemuNbdExport> {
        let mut args: Vec<String> = vec![
            "--read-only".into(),
            "--persistent".into(),
            format!("--shared={}", connections.max(1)),
        ];
        if let Some(b) = bitmap {
            args.push(format!("--bitmap={b}"));
        }
        QemuNbdExport::start(&self.path, "qcow2", args)
    }
}

/// A `qemu-nbd` process serving one image on a unix socket in a private
/// directory. [`stop`](Self::stop) ends it with SIGTERM and waits; dropping
/// without `stop` does the same, ignoring errors.
#[derive(Debug)]
pub struct QemuNbdExport {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
}

static EXPORT_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Whether an NBD server on `socket` sends its greeting. A successful
/// `connect` alone proves nothing: qemu-nbd listens before it has opened the
/// image and its bitmap, and the kernel queues connections until it accepts
/// them — or exits because the bitmap does not exist.
fn greets(socket: &Path) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC"
}

impl QemuNbdExport {
    /// Starts `qemu-nbd -f FORMAT ARGS --persistent -k SOCKET IMAGE` and
    /// waits until it greets a client (see [`greets`]); an error with its
    /// messages if it exits instead.
    pub fn start(image: &Path, format: &str, mut extra: Vec<String>) -> Result<Self> {
        // The readiness probe is a client that leaves again: without
        // --persistent, qemu-nbd would take that as its last client and exit.
        if !extra.iter().any(|a| a == "--persistent" || a == "-t") {
            extra.push("--persistent".into());
        }
        let n = EXPORT_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("cairn-nbd-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let socket = dir.join("nbd.sock");
        // A directory left by an earlier process with the same pid.
        let _ = std::fs::remove_file(&socket);
        // qemu-nbd's messages go to a file, not a pipe nobody drains while
        // it runs; they are read back if it fails to start.
        let log_path = dir.join("qemu-nbd.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| Error::io(format!("creating {}", log_path.display()), e))?;
        let mut args = vec!["-f".to_string(), format.to_string()];
        args.extend(extra);
        args.push("-k".into());
        args.push(socket.display().to_string());
        args.push(image.display().to_string());
        let child = Command::new("qemu-nbd")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| Error::io("running qemu-nbd (install qemu-utils to get it)", e))?;
        let mut export = QemuNbdExport {
            child: Some(child),
            dir,
            socket,
        };
        let started = Instant::now();
        loop {
            if greets(&export.socket) {
                return Ok(export);
            }
            let exited = export
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                export.child = None;
                let stderr = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(tool_error(
                    "qemu-nbd",
                    &args,
                    format!("exited with {status}: {}", stderr.trim()),
                ));
            }
            if started.elapsed() > EXPORT_START_TIMEOUT {
                return Err(tool_error(
                    "qemu-nbd",
                    &args,
                    "did not open its socket within 30 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `nbd+unix:///?socket=…`
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Ends qemu-nbd (SIGTERM) and waits for it: afterwards the image lock is
    /// released and every write it accepted is in the file.
    pub fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::External {
                        program: "qemu-nbd".into(),
                        detail: "did not stop within 30 s of SIGTERM; killed".into(),
                    });
                }
                Err(e) => return Err(Error::io("waiting for qemu-nbd", e)),
            }
        };
        let _ = std::fs::remove_dir_all(&self.dir);
        // qemu-nbd exits with status 0 on SIGTERM after closing the image.
        if status.success() || status.code().is_none() {
            Ok(())
        } else {
            Err(Error::External {
                program: "qemu-nbd".into(),
                detail: format!("exited with {status}"),
            })
        }
    }
}

impl Drop for QemuNbdExport {
    fn drop(&mut self) {
        let _ = self.terminate();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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
    /// before trusting a bitmap ([`cbt::spot_check`]); 0 = none.
    pub spot_check: u32,
}

/// What [`backup_qcow2`] did.
#[derive(Debug)]
pub enum Qcow2Outcome {
    /// A snapshot was written.
    Done {
        stats: BackupStats,
        /// Per disk, the bitmap now recording changes since this snapshot.
        next_bitmaps: BTreeMap<String, String>,
        /// Non-fatal problems after the snapshot was committed (a bitmap
        /// that could not be removed).
        warnings: Vec<String>,
    },
    /// CBT was not trusted for a disk and the policy said skip: no snapshot
    /// (spec B4 skips the whole VM). With several disks, `reason` is
    /// `disk: reason; …`.
    Skipped { reason: String, alert: bool },
}

/// One qcow2 file of a VM and its disk name in the snapshot.
#[derive(Clone, Debug)]
pub struct Qcow2Disk {
    pub image: Qcow2Image,
    pub name: String,
}

/// The part of this pool's bitmap names that says they are this pool's:
/// `CHAIN.` + the first 8 hex digits of the pool id.
fn pool_prefix(chain: &str, pool_id: &str) -> String {
    let id: String = pool_id.chars().take(8).collect();
    format!("{chain}.{id}")
}

/// A chain's bitmap name for a new backup into the pool `pool_id`:
/// [`pool_prefix`] + 8 random hex digits.
fn new_bitmap_name(chain: &str, pool_id: &str) -> Result<String> {
    let mut b = [0u8; 4];
    getrandom::getrandom(&mut b).map_err(|e| Error::Random(e.to_string()))?;
    let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!("{}{token}", pool_prefix(chain, pool_id)))
}

fn validate_chain(chain: &str) -> Result<()> {
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
struct DiskPlan<'a> {
    disk: &'a Qcow2Disk,
    info: ImageInfo,
    /// The disk's newest snapshot.
    parent: Option<(SnapshotId, Snapshot)>,
    /// The bitmap that snapshot started.
    recorded: Option<String>,
    /// The bitmap this run consumes (see [`plan_disk`]).
    consume: Option<String>,
    /// `consume` when it can be exported, else why not.
    usable: std::result::Result<String, String>,
    /// The bitmap this run starts.
    next: String,
}

fn plan_disk<'a>(
    repo: &Repository,
    vm: &str,
    disk: &'a Qcow2Disk,
    chain: &str,
    pool_id: &str,
) -> Result<DiskPlan<'a>> {
    let info = disk.image.info()?;
    let parent = repo.latest_with_disk(vm, &disk.name)?;
    let recorded = parent.as_ref().and_then(|(_, s)| {
        s.disks
            .iter()
            .find(|d| d.name == disk.name)
            .and_then(|d| d.properties.get(cbt::PROP_NEXT_BITMAP).cloned())
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
    Ok(DiskPlan {
        disk,
        info,
        parent,
        recorded,
        consume,
        usable,
        next: new_bitmap_name(chain, pool_id)?,
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
    progress: &dyn Progress,
) -> Result<Qcow2Outcome> {
    let disks = [Qcow2Disk {
        image: image.clone(),
        name: disk.to_string(),
    }];
    backup_qcow2_vm(repo, &disks, opts, qcow2, progress)
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
    progress: &dyn Progress,
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
    let pool_id = repo.config().pool_id.clone();
    let plans = disks
        .iter()
        .map(|d| plan_disk(repo, &opts.vm, d, &qcow2.chain, &pool_id))
        .collect::<Result<Vec<_>>>()?;
    // Start every next bitmap; undo them all if one fails.
    let mut added: Vec<&DiskPlan<'_>> = Vec::new();
    for plan in &plans {
        if let Err(e) = plan.disk.image.add_bitmap(&plan.next, grid as u64) {
            for p in added {
                let _ = p.disk.image.remove_bitmap(&p.next);
            }
            return Err(e);
        }
        added.push(plan);
    }
    let result = backup_with_exports(repo, &plans, opts, qcow2, progress);
    let prefix = format!("{}.", qcow2.chain);
    let ours = pool_prefix(&qcow2.chain, &pool_id);
    match result {
        Ok(Qcow2Outcome::Done {
            stats,
            mut warnings,
            next_bitmaps,
        }) => {
            // Per disk, retire the bitmap the previous snapshot started
            // (`next` supersedes it) and any this pool's runs left behind
            // when they were killed. Bitmaps of other chains and other pools
            // are left alone.
            for plan in &plans {
                for b in &plan.info.bitmaps {
                    let stale =
                        b.name.starts_with(&ours) || Some(&b.name) == plan.recorded.as_ref();
                    if stale && b.name != plan.next && b.name.starts_with(&prefix) {
                        if let Err(e) = plan.disk.image.remove_bitmap(&b.name) {
                            warnings.push(format!(
                                "{}: could not remove bitmap {:?}: {e}",
                                plan.disk.name, b.name
                            ));
                        }
                    }
                }
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
                let r = plan.disk.image.remove_bitmap(&plan.next);
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

fn backup_with_exports(
    repo: &Repository,
    plans: &[DiskPlan<'_>],
    opts: &BackupOptions,
    qcow2: &Qcow2BackupOptions,
    progress: &dyn Progress,
) -> Result<Qcow2Outcome> {
    let mut exports = Vec::new();
    let mut inputs = Vec::new();
    let mut skips = Vec::new();
    let mut alert = false;
    let mut parent_id = None;
    for plan in plans {
        let export = plan
            .disk
            .image
            .export_read_only(plan.usable.as_deref().ok(), qcow2.connections)?;
        let source = NbdSource::connect_many(
            &export.uri(),
            plan.usable.as_deref().ok(),
            qcow2.connections,
        )?;
        exports.push(export);
        let dirty = match &plan.usable {
            Ok(name) => source.dirty_extents(name).map_err(|e| e.to_string()),
            Err(why) => Err(why.clone()),
        };
        let mut properties = BTreeMap::new();
        properties.insert(
            "source".to_string(),
            plan.disk.image.path().display().to_string(),
        );
        properties.insert("format".to_string(), "qcow2".to_string());
        let cbt_disk = CbtDisk {
            name: plan.disk.name.clone(),
            source: Box::new(source),
            bitmap: plan
                .consume
                .clone()
                .unwrap_or_else(|| format!("{}.*", qcow2.chain)),
            dirty,
            next_bitmap: plan.next.clone(),
            properties,
            spot_check: qcow2.spot_check,
        };
        match cbt::prepare_disk(plan.parent.as_ref(), cbt_disk, opts.chunking, qcow2.policy)? {
            PreparedDisk::Backup { disk, parent, .. } => {
                parent_id = parent_id.or(parent);
                inputs.push(disk);
            }
            PreparedDisk::Skip { reason, alert: a } => {
                alert |= a;
                // Several disks: say which one.
                skips.push(if plans.len() == 1 {
                    reason
                } else {
                    format!("{}: {reason}", plan.disk.name)
                });
            }
        }
    }
    if !skips.is_empty() {
        drop(inputs);
        for export in exports {
            export.stop()?;
        }
        return Ok(Qcow2Outcome::Skipped {
            reason: skips.join("; "),
            alert,
        });
    }
    let mut opts = opts.clone();
    opts.parent = parent_id;
    let stats = backup(repo, inputs, &opts, progress)?;
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

/// A restore target writing a thin qcow2 file: `qemu-img create` under a
/// temporary name, written through a writable qemu-nbd export (zero extents
/// are never written and stay unallocated), then flushed, closed, synced and
/// renamed into place by [`DiskTarget::finish`].
#[derive(Debug)]
pub struct Qcow2Target {
    inner: Option<Box<NbdTarget>>,
    export: Option<QemuNbdExport>,
    tmp: PathBuf,
    path: PathBuf,
    done: bool,
}

impl Qcow2Target {
    /// Creates `path` (a qcow2 of `size` bytes). Refuses to replace an
    /// existing file unless `overwrite`.
    pub fn create(path: &Path, size: u64, overwrite: bool) -> Result<Self> {
        if size % 512 != 0 {
            return Err(Error::InvalidArgument(format!(
                "{}: a qcow2 image's size is a multiple of 512 bytes, this disk is {size}; \
                 restore it as raw",
                path.display()
            )));
        }
        let tmp = cairn_engine::restore::partial_path(path, overwrite)?;
        let _ = std::fs::remove_file(&tmp);
        run_tool(
            "qemu-img",
            &[
                "create".into(),
                "-q".into(),
                "-f".into(),
                "qcow2".into(),
                tmp.display().to_string(),
                size.to_string(),
            ],
        )?;
        let mut target = Qcow2Target {
            inner: None,
            export: None,
            tmp,
            path: path.to_path_buf(),
            done: false,
        };
        let export = QemuNbdExport::start(
            &target.tmp,
            "qcow2",
            vec![
                "--persistent".into(),
                "--cache=writeback".into(),
                "--shared=1".into(),
            ],
        )?;
        let inner = NbdTarget::connect(&export.uri(), size)?;
        target.export = Some(export);
        target.inner = Some(Box::new(inner));
        Ok(target)
    }
}

impl DiskTarget for Qcow2Target {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        match &self.inner {
            Some(t) => t.write_at(offset, data),
            None => Err(Error::Internal("qcow2 target already finished".into())),
        }
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if let Some(inner) = self.inner.take() {
            inner.finish()?;
        }
        if let Some(export) = self.export.take() {
            export.stop()?;
        }
        let file = std::fs::File::open(&self.tmp)
            .map_err(|e| Error::io(format!("opening {}", self.tmp.display()), e))?;
        cairn_engine::restore::publish_file(&file, &self.tmp, &self.path)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Qcow2Target {
    fn drop(&mut self) {
        self.inner = None;
        self.export = None;
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_img_info() {
        let json = r#"{
            "virtual-size": 67108864, "filename": "d.qcow2", "format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
              "bitmaps": [
                {"flags": ["auto"], "name": "c.00", "granularity": 65536},
                {"flags": ["in-use", "auto"], "name": "c.01", "granularity": 65536},
                {"flags": [], "name": "off", "granularity": 131072}
              ]}}}"#;
        let info = ImageInfo::parse(json).unwrap();
        assert_eq!(info.virtual_size, 64 << 20);
        assert_eq!(info.bitmaps.len(), 3);
        assert!(info.bitmap("c.00").unwrap().problem().is_none());
        assert!(info
            .bitmap("c.01")
            .unwrap()
            .problem()
            .unwrap()
            .contains("inconsistent"));
        assert!(info
            .bitmap("off")
            .unwrap()
            .problem()
            .unwrap()
            .contains("disabled"));
        let plain = r#"{"virtual-size": 1, "format": "raw"}"#;
        assert!(ImageInfo::parse(plain).unwrap().bitmaps.is_empty());
        assert!(ImageInfo::parse("{").is_err());
        assert!(ImageInfo::parse(r#"{"format": "qcow2"}"#).is_err());
    }

    #[test]
    fn chain_names() {
        assert!(validate_chain("cairn-daily_1").is_ok());
        for bad in ["", "a.b", "a b", &"x".repeat(65)] {
            assert!(validate_chain(bad).is_err(), "{bad}");
        }
        let n = new_bitmap_name("c", "0123456789abcdef0123456789abcdef").unwrap();
        assert!(n.starts_with("c.01234567") && n.len() == 18, "{n}");
        assert_ne!(n, new_bitmap_name("c", "0123456789abcdef").unwrap());
    }
}
