//! A fake platform for tests of jobs (built with the `sample` feature or in
//! the engine's own tests; never in the library's production path): an
//! inventory of VMs on hosts, disks held in memory, datastores whose free
//! space a test sets, and counters of what jobs asked of it.
//!
//! Disks can track changed blocks like qcow2 persistent bitmaps
//! ([`FakePlatform::enable_cbt`]): every bitmap a backup starts records the
//! writes a test makes ([`FakePlatform::write`]) until a later backup
//! consumes it; [`FakePlatform::lose_cbt`] drops them as a power cycle
//! does on the real platform.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::cbt::CbtDisk;
use crate::platform::{CbtOpen, Datastore, Platform, PlatformSnapshot, VmDisk, VmInfo};
use crate::source::{DiskSource, DiskTarget, MemorySource, MemoryTarget};
use crate::{Error, Result};

/// (VM id, device) → the disk's bytes.
type Disks = BTreeMap<(String, String), Arc<Vec<u8>>>;

/// (VM id, device) → its bitmaps: name → the ranges written since it
/// started. A disk is in the map once CBT is enabled on it.
type Bitmaps = BTreeMap<(String, String), BTreeMap<String, Vec<Range<u64>>>>;

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
    bitmaps: Arc<Mutex<Bitmaps>>,
    /// Bitmaps started so far (names them).
    bitmaps_started: Arc<AtomicU64>,
    /// VMs whose snapshot panics (a bug in a platform adapter).
    panics: Mutex<Vec<String>>,
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

    /// Makes every snapshot of VM `name` panic (as a buggy adapter might).
    pub fn panic_on_snapshot(&self, name: &str) {
        self.panics.lock().push(name.to_string());
    }

    /// Turns on changed-block tracking for disk `device` of VM `vm_id`
    /// (as a qcow2 disk that can hold persistent bitmaps).
    pub fn enable_cbt(&self, vm_id: &str, device: &str) {
        self.bitmaps
            .lock()
            .entry((vm_id.into(), device.into()))
            .or_default();
    }

    /// The guest writes `bytes` at `offset` of disk `device` of VM `vm_id`:
    /// the disk changes (snapshots taken before keep the old bytes) and
    /// every bitmap of the disk records the range.
    pub fn write(&self, vm_id: &str, device: &str, offset: u64, bytes: &[u8]) {
        let key = (vm_id.to_string(), device.to_string());
        let mut disks = self.disks.lock();
        let Some(disk) = disks.get_mut(&key) else {
            panic!("fake platform: no disk {device} of VM {vm_id}");
        };
        let disk = Arc::make_mut(disk);
        let start = offset as usize;
        disk[start..start + bytes.len()].copy_from_slice(bytes);
        if let Some(maps) = self.bitmaps.lock().get_mut(&key) {
            for ranges in maps.values_mut() {
                ranges.push(offset..offset + bytes.len() as u64);
            }
        }
    }

    /// The VM powers off and on: its disks' bitmaps are lost (their
    /// changed-block tracking stays enabled).
    pub fn lose_cbt(&self, vm_id: &str) {
        for ((id, _), maps) in self.bitmaps.lock().iter_mut() {
            if id == vm_id {
                maps.clear();
            }
        }
    }

    /// The names of disk `device`'s bitmaps.
    pub fn bitmaps(&self, vm_id: &str, device: &str) -> Vec<String> {
        self.bitmaps
            .lock()
            .get(&(vm_id.into(), device.into()))
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
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
    vm_id: String,
    disks: BTreeMap<String, Arc<Vec<u8>>>,
    released: Arc<AtomicU64>,
    bitmaps: Arc<Mutex<Bitmaps>>,
    bitmaps_started: Arc<AtomicU64>,
    /// Per disk opened through CBT: the bitmap consumed, the one started.
    cbt: Vec<(String, Option<String>, String)>,
}

/// Sorted, merged ranges.
fn merged(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

impl PlatformSnapshot for FakeSnapshot {
    fn open_disk(&self, device: &str) -> Result<Box<dyn DiskSource>> {
        let bytes = self
            .disks
            .get(device)
            .ok_or_else(|| Error::InvalidArgument(format!("no disk {device} in the snapshot")))?;
        Ok(Box::new(MemorySource::new(device, bytes.to_vec())))
    }

    fn open_cbt(&mut self, device: &str, request: &CbtOpen<'_>) -> Result<Option<CbtDisk>> {
        let key = (self.vm_id.clone(), device.to_string());
        let mut all = self.bitmaps.lock();
        let Some(maps) = all.get_mut(&key) else {
            return Ok(None);
        };
        let consumed = request.recorded_bitmap(device).map(str::to_string);
        let dirty = match &consumed {
            None => Err("the disk's previous snapshot started no bitmap".to_string()),
            Some(name) => maps
                .get(name)
                .map(|r| merged(r.clone()))
                .ok_or_else(|| format!("bitmap {name:?} is missing (lost at a power cycle?)")),
        };
        let n = self.bitmaps_started.fetch_add(1, Ordering::SeqCst);
        let pool: String = request.pool_id.chars().take(8).collect();
        let next = format!("{}.{pool}{n:08x}", request.chain);
        maps.insert(next.clone(), Vec::new());
        drop(all);
        self.cbt
            .push((device.to_string(), consumed.clone(), next.clone()));
        let source = self.open_disk(device)?;
        Ok(Some(CbtDisk::new(
            device,
            source,
            consumed.unwrap_or_else(|| format!("{}.*", request.chain)),
            dirty,
            next,
        )))
    }

    fn backup_ended(&mut self, stored: bool) -> Vec<String> {
        let mut all = self.bitmaps.lock();
        for (device, consumed, next) in self.cbt.drain(..) {
            if let Some(maps) = all.get_mut(&(self.vm_id.clone(), device)) {
                let gone = if stored { consumed } else { Some(next) };
                if let Some(name) = gone {
                    maps.remove(&name);
                }
            }
        }
        Vec::new()
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
        if self.panics.lock().contains(&vm.name) {
            panic!("fake platform: snapshot of VM {} panics", vm.name);
        }
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
            vm_id: vm.id.clone(),
            disks,
            released: self.snapshots_released.clone(),
            bitmaps: self.bitmaps.clone(),
            bitmaps_started: self.bitmaps_started.clone(),
            cbt: Vec::new(),
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
