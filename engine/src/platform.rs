//! The virtualization-platform trait: what a platform adapter (H3C CAS,
//! plain libvirt/KVM, …) gives the engine. The engine drives jobs through it
//! and never names a concrete platform.
//!
//! This first version carries the inventory and snapshot lifecycle the
//! backup job needs; disk access goes through [`DiskSource`] and
//! restore targets through [`DiskTarget`].

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
    /// Running, shut off, paused, migrating … in the platform's words.
    pub state: String,
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
}
