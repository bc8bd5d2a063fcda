//! The virtualization-platform trait: what a platform adapter (H3C CAS,
//! plain libvirt/KVM, …) gives the engine. The engine drives jobs through it
//! and never names a concrete platform.
//!
//! It carries the inventory (with what job selection needs: host, address,
//! the datastore of each disk), the free space of datastores (a job's
//! capacity check) and the snapshot lifecycle the backup job needs; disk
//! access goes through [`DiskSource`] and restore targets through
//! [`DiskTarget`].

use std::collections::BTreeMap;

use crate::cbt::CbtDisk;
use crate::error::Result;
use crate::id::SnapshotId;
use crate::source::{DiskSource, DiskTarget};
use crate::store::manifest::Snapshot;

/// A VM as the platform describes it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct VmInfo {
    /// The platform's id for the VM.
    pub id: String,
    /// The VM's name.
    pub name: String,
    /// Host (hypervisor) the VM runs on.
    pub host: String,
    /// That host's IP address (empty when unknown).
    pub host_address: String,
    /// Running, shut off, paused, migrating … in the platform's words.
    pub state: String,
    /// Its IP addresses, as far as the platform knows them.
    pub addresses: Vec<String>,
    /// Its disks.
    pub disks: Vec<VmDisk>,
    /// Anything else worth recording (CPU, memory, firmware, NICs …).
    pub properties: BTreeMap<String, String>,
}

/// One disk of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct VmDisk {
    /// Device name (`vda`, `sdb`), used as the disk's name in snapshots.
    pub device: String,
    /// `qcow2`, `raw`, …
    pub format: String,
    /// Where the disk lives on the platform.
    pub path: String,
    /// Logical size in bytes.
    pub size: u64,
    /// The datastore (storage pool) holding it on the VM's host; empty
    /// when the platform does not say.
    pub datastore: String,
}

/// A datastore (storage pool) of a host, with its space.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Datastore {
    /// The host it belongs to.
    pub host: String,
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub capacity: u64,
    /// Bytes free.
    pub free: u64,
}

/// What a CBT backup of one disk asks of the platform
/// ([`PlatformSnapshot::open_cbt`]).
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct CbtOpen<'a> {
    /// The job's bitmap chain: the platform names the bitmaps it starts
    /// after it, so two jobs (or a job and a hand-run backup) never consume
    /// each other's.
    pub chain: &'a str,
    /// The pool's id (hex): bitmaps started for one pool are never consumed
    /// by a backup into another.
    pub pool_id: &'a str,
    /// The disk's newest snapshot in the pool (the incremental's parent;
    /// its disk entry names the bitmap it started,
    /// [`PROP_NEXT_BITMAP`](crate::format::PROP_NEXT_BITMAP)). `None`: a
    /// full backup that only starts a bitmap.
    pub parent: Option<&'a (SnapshotId, Snapshot)>,
    /// The bitmap granularity: the backup's fixed chunk size.
    pub granularity: u64,
}

impl<'a> CbtOpen<'a> {
    /// A request for chain `chain` of pool `pool_id` against `parent`.
    pub fn new(
        chain: &'a str,
        pool_id: &'a str,
        parent: Option<&'a (SnapshotId, Snapshot)>,
        granularity: u64,
    ) -> Self {
        CbtOpen {
            chain,
            pool_id,
            parent,
            granularity,
        }
    }

    /// The bitmap the parent's disk `device` started, if it recorded one.
    pub fn recorded_bitmap(&self, device: &str) -> Option<&'a str> {
        self.parent.and_then(|(_, s)| {
            s.disks
                .iter()
                .find(|d| d.name == device)
                .and_then(|d| d.properties.get(crate::format::PROP_NEXT_BITMAP))
                .map(String::as_str)
        })
    }
}

/// A point-in-time view of a VM's disks held by the platform for a backup.
pub trait PlatformSnapshot: Send {
    /// Opens a disk of the snapshot for reading.
    fn open_disk(&self, device: &str) -> Result<Box<dyn DiskSource>>;
    /// Opens disk `device` for a changed-block-tracking backup (spec B3):
    /// the disk, the dirty ranges of the bitmap that recorded writes since
    /// `request.parent` (or why they cannot be had: missing, inconsistent,
    /// lost at a power cycle) and the bitmap that records writes from now
    /// on, which the platform starts here. The engine decides whether to
    /// trust the ranges ([`decide`](crate::cbt::decide)). `Ok(None)`: the
    /// disk has no CBT here (a raw disk, a platform without it) and is read
    /// whole against the parent. The default: `Ok(None)`.
    fn open_cbt(&mut self, device: &str, request: &CbtOpen<'_>) -> Result<Option<CbtDisk>> {
        let _ = (device, request);
        Ok(None)
    }
    /// The backup of this snapshot ended: `stored` when its snapshot is
    /// committed (the bitmaps it consumed can go, the ones it started now
    /// track changes since it), otherwise failed or skipped (the bitmaps it
    /// started go, the consumed ones keep recording for the next attempt).
    /// Returns warnings (a bitmap that could not be removed); called before
    /// [`release`](Self::release). The default: nothing to do.
    fn backup_ended(&mut self, stored: bool) -> Vec<String> {
        let _ = stored;
        Vec::new()
    }
    /// Releases the snapshot (deleting or merging it back).
    fn release(self: Box<Self>) -> Result<()>;
}

/// A virtualization platform.
pub trait Platform: Send + Sync {
    /// Every VM the platform knows.
    fn list_vms(&self) -> Result<Vec<VmInfo>>;
    /// Takes a crash-consistent snapshot of a VM for backup.
    fn snapshot(&self, vm: &VmInfo) -> Result<Box<dyn PlatformSnapshot>>;
    /// A target to restore one disk of `vm` into.
    fn restore_target(&self, vm: &VmInfo, disk: &VmDisk) -> Result<Box<dyn DiskTarget>>;
    /// Datastore `name` of `host`, with its space now (for the capacity
    /// check before a snapshot). The default: the platform cannot say.
    fn datastore(&self, host: &str, name: &str) -> Result<Datastore> {
        Err(crate::Error::Unsupported(format!(
            "the free space of datastore {name} on host {host}"
        )))
    }
}
