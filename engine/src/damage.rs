//! Damage marks: which snapshots `repair --packs` left unrestorable, kept
//! in the pool (`damaged/<snapshot id>`, FORMAT.md) so `snapshots` shows
//! them until they are healed. A backup that finishes checks the marked
//! snapshots (only when there are marks) and removes the mark of every one
//! whose chunks all resolve again to packs the pool holds: it stored the
//! lost chunks anew. Removing a snapshot removes its mark. Marks are
//! advisory: `verify` remains the judge of what restores.

use std::collections::{BTreeSet, HashSet};

use crate::error::Result;
use crate::id::{PackId, SnapshotId};
use crate::kind::FileKind;
use crate::pipeline::extents::visit_snapshot_chunks;
use crate::pipeline::extents::Store;
use crate::repo::Repository;

impl Repository {
    /// Snapshots marked damaged by a repair and not healed since.
    pub fn damage_marks(&self) -> Result<BTreeSet<SnapshotId>> {
        Ok(self
            .pool()
            .list(FileKind::DamageMark)?
            .iter()
            .filter_map(|n| SnapshotId::from_hex(n))
            .collect())
    }

    /// Marks `ids` damaged (a mark already there is kept).
    pub(crate) fn mark_damaged(&self, ids: &BTreeSet<SnapshotId>) -> Result<()> {
        for id in ids {
            let name = id.to_hex();
            match self
                .pool()
                .write(FileKind::DamageMark, &name, format!("{name}\n").as_bytes())
            {
                Ok(()) | Err(crate::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Removes the marks of snapshots that restore again (every chunk found
    /// in the index, in a pack the pool lists) or no longer exist. Returns
    /// the snapshots healed.
    pub fn heal_damage_marks(&self) -> Result<Vec<SnapshotId>> {
        let marks = self.damage_marks()?;
        if marks.is_empty() {
            return Ok(Vec::new());
        }
        let index = self.fresh_index()?;
        let listed: HashSet<PackId> = self
            .pool()
            .list(FileKind::Pack)?
            .iter()
            .filter_map(|n| PackId::from_hex(n))
            .collect();
        let mut healed = Vec::new();
        for id in marks {
            let mut whole = true;
            let store = Store {
                pool: &**self.pool(),
                index: &index,
            };
            let visited = visit_snapshot_chunks(&store, &id, &mut |c| {
                if whole {
                    whole = index
                        .lookup(&c.id)
                        .is_some_and(|loc| listed.contains(&loc.pack));
                }
            });
            match visited {
                Ok(_) if whole => {}
                Ok(_) => continue,
                Err(e) if e.is_not_found() => {}
                Err(_) => continue, // a manifest damaged itself stays marked
            }
            match self.pool().delete(FileKind::DamageMark, &id.to_hex()) {
                Ok(()) => healed.push(id),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(healed)
    }

    /// Drops the mark of a snapshot just removed.
    pub(crate) fn drop_damage_mark(&self, id: &SnapshotId) {
        let _ = self.pool().delete(FileKind::DamageMark, &id.to_hex());
    }
}
