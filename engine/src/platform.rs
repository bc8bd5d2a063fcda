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

use crate::error::Result;
use crate::source::{DiskSource, DiskTarget};

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

/// A point-in-time view of a VM's disks held by the platform for a backup.
pub trait PlatformSnapshot: Send {
    /// Opens a disk of the snapshot for reading.
    fn open_disk(&self, device: &str) -> Result<Box<dyn DiskSource>>;
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
