//! A KVM host's VMs described by an inventory file — the host side of the
//! platform without a CVM: each VM names its disk images (raw files or
//! qcow2), the datastore (directory) they live in and, for jobs, its host
//! and addresses. It drives real jobs on this host (`cairn job` with
//! `platform = "inventory:PATH"`) and is what the tests and the demo use
//! until the CVM REST client arrives.
//!
//! - **Snapshot**: raw images are read as they are — not a point-in-time
//!   view: back up images of VMs that are stopped or paused (the inventory
//!   says nothing about the VM's state); qcow2 images are served read-only
//!   by `qemu-nbd` (it refuses an image a running VM holds) and read over
//!   NBD with the job's connections, timeout and reconnect window.
//! - **Datastore space**: `statvfs` of the datastore directory.
//! - **Restore targets**: `<restore_dir>/<vm>/<device>.img` (sparse raw)
//!   or `.qcow2` (thin qcow2), as the disk's format; existing files are
//!   replaced only when they are not the VM's own images.
//!
//! ```toml
//! restore_dir = "/srv/restored"
//!
//! [[vm]]
//! name = "web1"
//! host = "kvm1"
//! host_address = "10.0.0.1"
//! addresses = ["10.0.1.5"]
//!
//! [[vm.disk]]
//! device = "vda"
//! path = "/var/lib/images/web1.qcow2"
//! format = "qcow2"       # raw or qcow2; default: from the file name
//! datastore = "images"   # a name; its directory is that of path
//! ```

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_engine::cbt::CbtDisk;
use cairn_engine::{
    CancelToken, CbtOpen, Datastore, DiskSource, DiskTarget, Error, NbdSource, Platform,
    PlatformSnapshot, RawFileSource, Result, SparseFileTarget, VmDisk, VmInfo,
};
use serde::Deserialize;

use crate::qemu::backup::{plan_disk, validate_chain, DiskPlan, ImageLock};
use crate::qemu::{Qcow2Disk, Qcow2Image, Qcow2Target, QemuNbdExport};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InventoryFile {
    restore_dir: PathBuf,
    #[serde(default)]
    vm: Vec<VmEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmEntry {
    name: String,
    #[serde(default = "local_host")]
    host: String,
    #[serde(default)]
    host_address: String,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    disk: Vec<DiskEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskEntry {
    device: String,
    path: PathBuf,
    format: Option<String>,
    datastore: Option<String>,
}

fn local_host() -> String {
    "localhost".into()
}

/// How the platform reads disks (a job's source options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadSettings {
    /// NBD connections per qcow2 disk (1–5).
    pub connections: usize,
    /// NBD request timeout.
    pub timeout: Duration,
    /// How long a dropped NBD connection is re-established before a read
    /// fails (zero: never).
    pub reconnect_window: Duration,
    /// Largest NBD read request in bytes (spec B16's read buffer).
    pub request_size: u32,
}

impl Default for ReadSettings {
    fn default() -> Self {
        ReadSettings {
            connections: 1,
            timeout: Duration::from_secs(600),
            reconnect_window: Duration::from_secs(600),
            request_size: 1 << 20,
        }
    }
}

impl ReadSettings {
    /// `connections` per disk, `timeout` per request, dropped
    /// connections re-established for up to `reconnect_window`, reads of
    /// at most `request_size` bytes per request.
    pub fn new(
        connections: usize,
        timeout: Duration,
        reconnect_window: Duration,
        request_size: u32,
    ) -> Self {
        ReadSettings {
            connections,
            timeout,
            reconnect_window,
            request_size,
        }
    }
}

/// The platform of an inventory file (see the module docs).
#[derive(Debug)]
pub struct InventoryPlatform {
    file: PathBuf,
    restore_dir: PathBuf,
    vms: Vec<VmInfo>,
    /// (host, datastore name) → its directory.
    datastores: BTreeMap<(String, String), PathBuf>,
    read: ReadSettings,
    /// Ends reconnect waits of the disks it opens.
    cancel: Option<CancelToken>,
}

fn bad(file: &Path, why: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("inventory {}: {why}", file.display()))
}

impl InventoryPlatform {
    /// Reads the inventory at `file`. Relative image paths and the restore
    /// directory are taken from the file's directory.
    pub fn open(file: &Path, read: ReadSettings) -> Result<Self> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Error::io(format!("reading inventory {}", file.display()), e))?;
        let parsed: InventoryFile =
            toml::from_str(&text).map_err(|e| bad(file, e.to_string().trim_end()))?;
        let base = file.parent().unwrap_or(Path::new("."));
        let mut vms = Vec::new();
        let mut datastores = BTreeMap::new();
        let mut names = std::collections::BTreeSet::new();
        for entry in parsed.vm {
            if entry.name.is_empty() || !names.insert(entry.name.clone()) {
                return Err(bad(
                    file,
                    format!("VM name {:?} is empty or repeated", entry.name),
                ));
            }
            if entry.disk.is_empty() {
                return Err(bad(file, format!("VM {} has no disk", entry.name)));
            }
            let mut vm = VmInfo {
                id: format!("{}/{}", entry.host, entry.name),
                name: entry.name.clone(),
                host: entry.host.clone(),
                host_address: entry.host_address,
                state: "unknown".into(),
                addresses: entry.addresses,
                ..VmInfo::default()
            };
            let mut devices = std::collections::BTreeSet::new();
            for d in entry.disk {
                if d.device.is_empty()
                    || !d
                        .device
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    || !devices.insert(d.device.clone())
                {
                    return Err(bad(
                        file,
                        format!(
                            "VM {}: device {:?} is not a name like vda, or repeated",
                            vm.name, d.device
                        ),
                    ));
                }
                let path = base.join(&d.path);
                let format = match d.format.as_deref() {
                    Some(f @ ("raw" | "qcow2")) => f.to_string(),
                    Some(f) => {
                        return Err(bad(
                            file,
                            format!(
                                "VM {} disk {}: format {f:?} is not raw or qcow2",
                                vm.name, d.device
                            ),
                        ))
                    }
                    None if path.extension().is_some_and(|e| e == "qcow2") => "qcow2".into(),
                    None => "raw".into(),
                };
                let size = disk_size(&path, &format)?;
                let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
                let store = d.datastore.unwrap_or_else(|| dir.display().to_string());
                datastores.insert((vm.host.clone(), store.clone()), dir);
                vm.disks.push(VmDisk {
                    device: d.device,
                    format,
                    path: path.display().to_string(),
                    size,
                    datastore: store,
                });
            }
            vms.push(vm);
        }
        Ok(InventoryPlatform {
            file: file.to_path_buf(),
            restore_dir: base.join(parsed.restore_dir),
            vms,
            datastores,
            read,
            cancel: None,
        })
    }

    /// Disks opened from now on stop reconnecting when `cancel` fires (a
    /// job's cancellation), instead of waiting out the reconnect window.
    pub fn with_cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = Some(cancel);
        self
    }
}

fn disk_size(path: &Path, format: &str) -> Result<u64> {
    if format == "qcow2" {
        let info = Qcow2Image::new(path).info()?;
        return Ok(info.virtual_size);
    }
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| Error::io(format!("disk image {}", path.display()), e))
}

/// A snapshot: the raw files as they are, qcow2 images served read-only
/// (each export started when the disk is first opened).
struct InventorySnapshot {
    disks: BTreeMap<String, VmDisk>,
    /// The exports started, per device.
    exports: std::sync::Mutex<BTreeMap<String, QemuNbdExport>>,
    read: ReadSettings,
    cancel: Option<CancelToken>,
    /// Disks opened through CBT: their plan and the image lock held until
    /// the backup ended.
    cbt: Vec<(DiskPlan, ImageLock)>,
    /// The CBT request's chain and pool (for retiring bitmaps).
    chain: String,
    pool_id: String,
}

impl InventorySnapshot {
    fn exports_guard(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, QemuNbdExport>> {
        // A panic while holding it leaves a map that is still whole.
        self.exports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn disk(&self, device: &str) -> Result<&VmDisk> {
        self.disks
            .get(device)
            .ok_or_else(|| Error::InvalidArgument(format!("no disk {device} in the snapshot")))
    }

    /// A source on `uri` with the job's read settings.
    fn connect(
        read: ReadSettings,
        cancel: Option<&CancelToken>,
        path: &str,
        uri: &str,
        bitmap: Option<&str>,
    ) -> Result<NbdSource> {
        let mut source =
            NbdSource::connect_many_with_timeout(uri, bitmap, read.connections, read.timeout)?
                .with_reconnect(read.reconnect_window)
                .with_read_request_size(read.request_size)?;
        if let Some(c) = cancel {
            source = source.with_cancel(c.clone());
        }
        // The image file unchanged (nothing wrote it since): an interrupted
        // backup of it may resume.
        if let Ok(m) = std::fs::metadata(path) {
            source = source.with_identity(format!("qcow2:{}", cairn_engine::file_identity(&m)));
        }
        Ok(source)
    }

    /// Stops every export (before bitmaps change: qemu-img needs the image
    /// unlocked); the first failure is returned.
    fn stop_exports(&self) -> Result<()> {
        let mut first = Ok(());
        for (_, export) in std::mem::take(&mut *self.exports_guard()) {
            let r = export.stop();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl PlatformSnapshot for InventorySnapshot {
    fn open_disk(&self, device: &str) -> Result<Box<dyn DiskSource>> {
        let disk = self.disk(device)?;
        if disk.format != "qcow2" {
            return Ok(Box::new(RawFileSource::open(&disk.path)?));
        }
        let mut exports = self.exports_guard();
        if !exports.contains_key(device) {
            let export =
                Qcow2Image::new(&disk.path).export_read_only(None, self.read.connections)?;
            exports.insert(device.to_string(), export);
        }
        let uri = exports[device].uri();
        Ok(Box::new(Self::connect(
            self.read,
            self.cancel.as_ref(),
            &disk.path,
            &uri,
            None,
        )?))
    }

    /// qcow2 disks track changed blocks with persistent bitmaps, as
    /// `cairn backup --qcow2` does (see [`crate::qemu`] for the lifecycle);
    /// raw disks have none.
    fn open_cbt(&mut self, device: &str, request: &CbtOpen<'_>) -> Result<Option<CbtDisk>> {
        let disk = self.disk(device)?.clone();
        if disk.format != "qcow2" {
            return Ok(None);
        }
        if self.exports_guard().contains_key(device) {
            return Err(Error::InvalidArgument(format!(
                "disk {device} is open already; open it through CBT first"
            )));
        }
        validate_chain(request.chain)?;
        self.chain = request.chain.to_string();
        self.pool_id = request.pool_id.to_string();
        // Two devices of one VM on one image would each start and retire
        // bitmaps on it.
        use std::os::unix::fs::MetadataExt;
        let key = |path: &Path| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
        let this = key(Path::new(&disk.path));
        if this.is_some()
            && self
                .cbt
                .iter()
                .any(|(p, _)| key(p.disk.image.path()) == this)
        {
            return Err(Error::InvalidArgument(format!(
                "disk {device}: image {} is another disk of this VM too",
                disk.path
            )));
        }
        let lock = ImageLock::take(Path::new(&disk.path))?;
        let image = Qcow2Disk {
            image: Qcow2Image::new(&disk.path),
            name: device.to_string(),
        };
        let plan = plan_disk(
            request.parent.cloned(),
            image,
            request.chain,
            request.pool_id,
            true,
        )?;
        plan.start_next(request.granularity)?;
        let (read, cancel) = (self.read, self.cancel.clone());
        let path = disk.path.clone();
        let connect = move |uri: &str, bitmap: Option<&str>| {
            Self::connect(read, cancel.as_ref(), &path, uri, bitmap)
        };
        match plan.open(request.chain, self.read.connections, &connect) {
            Ok((export, cbt_disk)) => {
                self.exports_guard().insert(device.to_string(), export);
                self.cbt.push((plan, lock));
                Ok(Some(cbt_disk))
            }
            // The bitmap stays for the next run to adopt.
            Err(e) => Err(e),
        }
    }

    fn backup_ended(&mut self, stored: bool) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Err(e) = self.stop_exports() {
            warnings.push(format!("stopping qemu-nbd: {e}"));
        }
        for (plan, _lock) in self.cbt.drain(..) {
            // Nothing stored: the bitmap this run started stays for the next
            // run to adopt (it records a superset; the image is not written
            // again, so that run's resume journal still matches).
            if stored {
                warnings.extend(plan.retire_consumed(&self.chain, &self.pool_id));
            }
        }
        warnings
    }

    fn release(mut self: Box<Self>) -> Result<()> {
        self.abandon()
    }
}

impl InventorySnapshot {
    /// Stops the exports; the bitmaps started for disks whose backup never
    /// ended stay for the next run to adopt (see `backup_ended`).
    fn abandon(&mut self) -> Result<()> {
        self.cbt.clear();
        self.stop_exports()
    }
}

impl Drop for InventorySnapshot {
    /// A snapshot dropped without `release` (a panic in the caller): its
    /// exports stop (the image lock goes with them).
    fn drop(&mut self) {
        let _ = self.abandon();
    }
}

impl Platform for InventoryPlatform {
    fn list_vms(&self) -> Result<Vec<VmInfo>> {
        Ok(self.vms.clone())
    }

    fn snapshot(&self, vm: &VmInfo) -> Result<Box<dyn PlatformSnapshot>> {
        let known = self
            .vms
            .iter()
            .find(|v| v.id == vm.id)
            .ok_or_else(|| bad(&self.file, format!("no VM {}", vm.id)))?;
        let disks = known
            .disks
            .iter()
            .map(|d| (d.device.clone(), d.clone()))
            .collect();
        Ok(Box::new(InventorySnapshot {
            disks,
            exports: std::sync::Mutex::new(BTreeMap::new()),
            read: self.read,
            cancel: self.cancel.clone(),
            cbt: Vec::new(),
            chain: String::new(),
            pool_id: String::new(),
        }))
    }

    fn restore_target(&self, vm: &VmInfo, disk: &VmDisk) -> Result<Box<dyn DiskTarget>> {
        let known = self.vms.iter().find(|v| v.id == vm.id);
        let format = known
            .and_then(|v| v.disks.iter().find(|d| d.device == disk.device))
            .map_or("raw", |d| d.format.as_str());
        let dir = self.restore_dir.join(&vm.name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let ext = if format == "qcow2" { "qcow2" } else { "img" };
        let path = dir.join(format!("{}.{ext}", disk.device));
        // Never over a VM's own image (a restore directory pointed at the
        // images would otherwise replace them).
        if let Ok(target) = path.canonicalize() {
            for v in &self.vms {
                for d in &v.disks {
                    if Path::new(&d.path).canonicalize().is_ok_and(|p| p == target) {
                        return Err(Error::InvalidArgument(format!(
                            "restore target {} is VM {}'s disk {}; choose another restore_dir",
                            path.display(),
                            v.name,
                            d.device
                        )));
                    }
                }
            }
        }
        if format == "qcow2" {
            Ok(Box::new(Qcow2Target::create(&path, disk.size, true)?))
        } else {
            Ok(Box::new(SparseFileTarget::create(&path, disk.size, true)?))
        }
    }

    fn datastore(&self, host: &str, name: &str) -> Result<Datastore> {
        let dir = self
            .datastores
            .get(&(host.to_string(), name.to_string()))
            .ok_or_else(|| bad(&self.file, format!("no datastore {name} on host {host}")))?;
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| {
            bad(
                &self.file,
                format!("datastore path {} has a NUL", dir.display()),
            )
        })?;
        // SAFETY: statvfs fills the zeroed struct; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        if rc != 0 {
            return Err(Error::io(
                format!("free space of datastore {}", dir.display()),
                std::io::Error::last_os_error(),
            ));
        }
        let frsize = st.f_frsize as u64;
        Ok(Datastore {
            host: host.into(),
            name: name.into(),
            capacity: st.f_blocks as u64 * frsize,
            free: st.f_bavail as u64 * frsize,
        })
    }
}
