//! [`prepare_vm`]: the CBT preparation of a whole VM, shared by every
//! caller that backs up through dirty bitmaps (the CLI's `--nbd`, the qcow2
//! driver, platform adapters): one [`prepare_disk`] per disk, one parent for
//! the snapshot, and the rule that one untrusted disk under a skip policy
//! skips the whole VM.

use std::collections::BTreeMap;

use crate::cbt::trust::{prepare_disk, CbtDisk, CbtParent, CbtPolicy, PreparedDisk};
use crate::chunker::ChunkingParams;
use crate::error::Result;
use crate::id::SnapshotId;
use crate::pipeline::input::BackupDisk;
use crate::store::manifest::Snapshot;

/// A VM ready for a backup, or skipped by the policy.
#[derive(Debug)]
pub enum PreparedVm {
    /// Back these disks up as one snapshot.
    Backup {
        /// The disks' inputs, in the order given.
        disks: Vec<BackupDisk>,
        /// The parent to record (the first disk's previous snapshot).
        parent: Option<SnapshotId>,
        /// Disks whose CBT was not trusted and that are read in full, with
        /// the reason.
        fallbacks: BTreeMap<String, String>,
    },
    /// Leave the VM out of this run.
    Skip {
        /// Why: one disk's reason, or `disk: reason; …` for several.
        reason: String,
        /// The policy asks for an alert.
        alert: bool,
    },
}

/// Finds the newest snapshot of the VM holding the named disk.
pub type FindParent<'a> = dyn FnMut(&str) -> Result<Option<(SnapshotId, Snapshot)>> + 'a;

/// Prepares every disk of a VM for a CBT backup under `policy`. A disk whose
/// parent is [`CbtParent::Find`] gets it from `find_parent(disk name)` (the
/// newest snapshot of the VM holding that disk).
pub fn prepare_vm(
    disks: Vec<CbtDisk>,
    chunking: ChunkingParams,
    policy: CbtPolicy,
    find_parent: &mut FindParent<'_>,
) -> Result<PreparedVm> {
    let several = disks.len() > 1;
    let mut inputs = Vec::new();
    let mut parent_id = None;
    let mut fallbacks = BTreeMap::new();
    let mut skips = Vec::new();
    let mut alert = false;
    for mut disk in disks {
        let parent = match std::mem::take(&mut disk.parent) {
            CbtParent::Known(p) => p.map(|b| *b),
            CbtParent::Find => find_parent(&disk.name)?,
        };
        let name = disk.name.clone();
        match prepare_disk(parent.as_ref(), disk, chunking, policy)? {
            PreparedDisk::Backup {
                disk,
                parent,
                fallback,
            } => {
                parent_id = parent_id.or(parent);
                if let Some(f) = fallback {
                    fallbacks.insert(name, f);
                }
                inputs.push(disk);
            }
            PreparedDisk::Skip { reason, alert: a } => {
                alert |= a;
                skips.push(if several {
                    format!("{name}: {reason}")
                } else {
                    reason
                });
            }
        }
    }
    if !skips.is_empty() {
        return Ok(PreparedVm::Skip {
            reason: skips.join("; "),
            alert,
        });
    }
    Ok(PreparedVm::Backup {
        disks: inputs,
        parent: parent_id,
        fallbacks,
    })
}
