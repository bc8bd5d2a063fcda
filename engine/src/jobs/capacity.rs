//! The capacity check (spec B9): before a VM's snapshot is taken, every
//! datastore its disks live on must keep a share of its space free and/or
//! an absolute amount (10 % and 500 GiB by default, both on); a VM that
//! fails is skipped, and the job says which datastore and why.

use std::fmt;

use crate::platform::{Datastore, Platform, VmInfo};
use crate::{Error, Result};

/// Free space a datastore must keep for a snapshot to be taken on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CapacityRule {
    /// Percent of the datastore's size that must stay free (1–99; `None`:
    /// not checked).
    pub min_free_percent: Option<u8>,
    /// Bytes that must stay free (`None`: not checked).
    pub min_free_bytes: Option<u64>,
}

impl Default for CapacityRule {
    fn default() -> Self {
        CapacityRule {
            min_free_percent: Some(10),
            min_free_bytes: Some(500 << 30),
        }
    }
}

impl CapacityRule {
    /// No check at all.
    pub fn off() -> Self {
        CapacityRule {
            min_free_percent: None,
            min_free_bytes: None,
        }
    }

    /// A rule keeping `percent` (1–99, or none) and `bytes` (or none) free.
    pub fn new(percent: Option<u8>, bytes: Option<u64>) -> Result<Self> {
        if let Some(p) = percent {
            if !(1..=99).contains(&p) {
                return Err(Error::InvalidArgument(format!(
                    "minimum free space {p}% is out of range (1–99 %, or off)"
                )));
            }
        }
        Ok(CapacityRule {
            min_free_percent: percent,
            min_free_bytes: bytes,
        })
    }

    /// Why `store` is too full, or `None` when it has room.
    pub fn shortfall(&self, store: &Datastore) -> Option<String> {
        let mut why = Vec::new();
        if let Some(p) = self.min_free_percent {
            // A datastore of no size (or less than its free space) says
            // nothing about its share: the check cannot pass.
            if store.capacity == 0 || store.free > store.capacity {
                why.push(format!(
                    "its size is not known; {p} % free cannot be checked"
                ));
            // free / capacity < p %, without floating point.
            } else if u128::from(store.free) * 100 < u128::from(store.capacity) * u128::from(p) {
                why.push(format!("below {p} % free"));
            }
        }
        if let Some(b) = self.min_free_bytes {
            if store.free < b {
                why.push(format!("below {} free", Bytes(b)));
            }
        }
        (!why.is_empty()).then(|| {
            format!(
                "datastore {} on host {} has {} free of {} ({})",
                store.name,
                store.host,
                Bytes(store.free),
                Bytes(store.capacity),
                why.join(" and ")
            )
        })
    }

    /// Checks every datastore `vm`'s disks live on. `Ok(None)`: the VM
    /// may be snapshotted; `Ok(Some(reason))`: skip it. A disk whose
    /// datastore the platform does not name, or a platform that cannot
    /// tell a datastore's space, is a reason to skip too (the check is on
    /// and cannot be made) — unless the rule is off.
    pub fn check(&self, platform: &dyn Platform, vm: &VmInfo) -> Result<Option<String>> {
        if self.min_free_percent.is_none() && self.min_free_bytes.is_none() {
            return Ok(None);
        }
        let mut seen: Vec<&str> = Vec::new();
        for disk in &vm.disks {
            if disk.datastore.is_empty() {
                return Ok(Some(format!(
                    "the platform does not say which datastore disk {} of VM {} is on; \
                     the capacity check cannot be made",
                    disk.device, vm.name
                )));
            }
            if seen.contains(&disk.datastore.as_str()) {
                continue;
            }
            seen.push(&disk.datastore);
            let store = match platform.datastore(&vm.host, &disk.datastore) {
                Ok(s) => s,
                Err(Error::Unsupported(what)) => {
                    return Ok(Some(format!(
                        "the platform cannot tell {what}; the capacity check cannot be made"
                    )))
                }
                Err(e) => return Err(e),
            };
            if let Some(why) = self.shortfall(&store) {
                return Ok(Some(why));
            }
        }
        Ok(None)
    }
}

/// Bytes for messages (GiB/MiB with two decimals).
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if self.0 >= 1 << 30 {
            write!(f, "{:.2} GiB", b / (1u64 << 30) as f64)
        } else {
            write!(f, "{:.2} MiB", b / (1u64 << 20) as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn store(capacity: u64, free: u64) -> Datastore {
        Datastore {
            host: "cvk1".into(),
            name: "defaultpool".into(),
            capacity,
            free,
        }
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn both_thresholds_apply_by_default_and_each_can_be_off() {
        let r = CapacityRule::default();
        assert_eq!(r.shortfall(&store(10_000 * GIB, 1_000 * GIB)), None);
        // 9.99 %: below the share (exactly 10 % passes).
        let why = r.shortfall(&store(10_000 * GIB, 999 * GIB)).unwrap();
        assert!(
            why.contains("below 10 % free") && why.contains("defaultpool"),
            "{why}"
        );
        // Plenty of share, too few bytes.
        let why = r.shortfall(&store(1_000 * GIB, 499 * GIB)).unwrap();
        assert!(why.contains("below 500.00 GiB free"), "{why}");
        assert!(!why.contains('%'), "{why}");
        assert_eq!(r.shortfall(&store(1_000 * GIB, 500 * GIB)), None);
        // Both.
        let why = r.shortfall(&store(10_000 * GIB, 100 * GIB)).unwrap();
        assert!(why.contains(" and "), "{why}");
        let share_only = CapacityRule::new(Some(10), None).unwrap();
        assert_eq!(share_only.shortfall(&store(1_000 * GIB, 100 * GIB)), None);
        let bytes_only = CapacityRule::new(None, Some(GIB)).unwrap();
        assert_eq!(bytes_only.shortfall(&store(1_000 * GIB, GIB)), None);
        assert!(bytes_only.shortfall(&store(1_000 * GIB, GIB - 1)).is_some());
        assert_eq!(CapacityRule::off().shortfall(&store(GIB, 0)), None);
        // A size of 0 (unknown) fails the share check, not the bytes one.
        let why = share_only.shortfall(&store(0, 0)).unwrap();
        assert!(why.contains("size is not known"), "{why}");
        assert!(share_only.shortfall(&store(GIB, 2 * GIB)).is_some());
        assert_eq!(bytes_only.shortfall(&store(0, 2 * GIB)), None);
        for p in [0u8, 100] {
            assert!(matches!(
                CapacityRule::new(Some(p), None),
                Err(Error::InvalidArgument(_))
            ));
        }
    }
}
