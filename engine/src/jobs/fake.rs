//! A fake platform for tests of jobs (built with the `sample` feature or in
//! the engine's own tests; never in the library's production path): an
//! inventory of VMs on hosts, disks held in memory, datastores whose free
//! space a test sets, and counters of what jobs asked of it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::platform::{Datastore, Platform, PlatformSnapshot, VmDisk, VmInfo};
use crate::source::{DiskSource, DiskTarget, MemorySource, MemoryTarget};
use crate::{Error, Result};

/// (VM id, device) → the disk's bytes.
type Disks = BTreeMap<(String, String), Arc<Vec<u8>>>;

/// The fake platform (see the module docs).
#[derive(Debug, Default)]
pub struct FakePlatform {
    vms: Mutex<Vec<VmInfo>>,
    disks: Mutex<Disks>,
    datastores: Mutex<BTreeMap<(String, String), Datastore>>,
    restored: Mutex<BTreeMap<(String, String), MemoryTarget>>,
    /// Snapshots taken.
    pub snapshots_taken: AtomicU64,
    /// Snapshots released.
    pub snapshots_released: Arc<AtomicU64>,
    /// Faults the next snapshots meet, in order (`true`: a dropped
    /// connection, a network-type failure; `false`: a refusal).
    faults: Mutex<std::collections::VecDeque<bool>>,
}

impl FakePlatform {
    /// An empty platform.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds VM `name` on `host` with disks (device, bytes) on datastore
    /// `store` of that host (created with 10 TiB free of 20 TiB if new).
    pub fn add_vm(&self, name: &str, host: &str, store: &str, disks: Vec<(&str, Vec<u8>)>) {
        let mut vm = VmInfo {
            id: format!("{host}/{name}"),
            name: name.into(),
            host: host.into(),
            state: "running".into(),
            ..VmInfo::default()
        };
        for (device, bytes) in disks {
            vm.disks.push(VmDisk {
                device: device.into(),
                format: "raw".into(),
                path: format!("/vms/{name}/{device}.img"),
                size: bytes.len() as u64,
                datastore: store.into(),
            });
            self.disks
                .lock()
                .insert((vm.id.clone(), device.into()), Arc::new(bytes));
        }
        self.datastores
            .lock()
            .entry((host.into(), store.into()))
            .or_insert_with(|| Datastore {
                host: host.into(),
                name: store.into(),
                capacity: 20 << 40,
                free: 10 << 40,
            });
        self.vms.lock().push(vm);
    }

    /// Sets a datastore's space.
    pub fn set_space(&self, host: &str, store: &str, capacity: u64, free: u64) {
        self.datastores.lock().insert(
            (host.into(), store.into()),
            Datastore {
                host: host.into(),
                name: store.into(),
                capacity,
                free,
            },
        );
    }

    /// Makes the next snapshot calls fail, one per entry: `true` with a
    /// dropped connection (network-type, retried by jobs), `false` with a
    /// refusal (not retried).
    pub fn fail_snapshots(&self, faults: &[bool]) {
        self.faults.lock().extend(faults.iter().copied());
    }

    /// What was restored into disk `device` of VM `vm_id`, once finished.
    pub fn restored(&self, vm_id: &str, device: &str) -> Option<Vec<u8>> {
        self.restored
            .lock()
            .get(&(vm_id.into(), device.into()))
            .and_then(|t| t.finished())
    }
}

struct FakeSnapshot {
    disks: BTreeMap<String, Arc<Vec<u8>>>,
    released: Arc<AtomicU64>,
}

impl PlatformSnapshot for FakeSnapshot {
    fn open_disk(&self, device: &str) -> Result<Box<dyn DiskSource>> {
        let bytes = self
            .disks
            .get(device)
            .ok_or_else(|| Error::InvalidArgument(format!("no disk {device} in the snapshot")))?;
        Ok(Box::new(MemorySource::new(device, bytes.to_vec())))
    }
    fn release(self: Box<Self>) -> Result<()> {
        self.released.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Platform for FakePlatform {
    fn list_vms(&self) -> Result<Vec<VmInfo>> {
        Ok(self.vms.lock().clone())
    }

    fn snapshot(&self, vm: &VmInfo) -> Result<Box<dyn PlatformSnapshot>> {
        if let Some(network) = self.faults.lock().pop_front() {
            return Err(if network {
                Error::io(
                    format!("snapshot of VM {} (fake platform)", vm.name),
                    std::io::Error::from(std::io::ErrorKind::ConnectionReset),
                )
            } else {
                Error::InvalidArgument(format!("VM {} refuses snapshots (fake platform)", vm.name))
            });
        }
        self.snapshots_taken.fetch_add(1, Ordering::SeqCst);
        let disks = self
            .disks
            .lock()
            .iter()
            .filter(|((id, _), _)| *id == vm.id)
            .map(|((_, d), b)| (d.clone(), b.clone()))
            .collect();
        Ok(Box::new(FakeSnapshot {
            disks,
            released: self.snapshots_released.clone(),
        }))
    }

    fn restore_target(&self, vm: &VmInfo, disk: &VmDisk) -> Result<Box<dyn DiskTarget>> {
        let t = MemoryTarget::new(disk.size)?;
        self.restored
            .lock()
            .insert((vm.id.clone(), disk.device.clone()), t.clone());
        Ok(Box::new(t))
    }

    fn datastore(&self, host: &str, name: &str) -> Result<Datastore> {
        self.datastores
            .lock()
            .get(&(host.into(), name.into()))
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("no datastore {name} on host {host}")))
    }
}
