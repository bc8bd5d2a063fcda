//! Removing snapshots: [`Repository::forget`], protection marks
//! ([`Repository::protect`]), the retention policy stored in a pool, and
//! [`Repository::prune`], which applies a [`RetentionPolicy`].
//!
//! Removing a snapshot deletes its manifest and nothing else: every
//! manifest lists all of its chunks, so what remains stays restorable, and
//! the chunks are reclaimed later by garbage collection. A protected
//! snapshot is never removed; its mark is checked again right before each
//! deletion, so a snapshot protected while a prune runs survives it.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::id::SnapshotId;
use crate::kind::FileKind;
use crate::random::random_16;
use crate::repo::Repository;
use crate::retention::{RetentionDecision, RetentionPolicy};

/// Name prefix of stored retention policies (`retention.<nanos>.<random>`).
const POLICY_PREFIX: &str = "retention.";

/// Whether `name` is a stored policy's name, `retention.<20 digits>.<8
/// lower-case hex>` (in that one spelling: the newest sorts last); other
/// names are foreign and ignored.
fn is_policy_name(name: &str) -> bool {
    let Some((nanos, random)) = name
        .strip_prefix(POLICY_PREFIX)
        .and_then(|rest| rest.split_once('.'))
    else {
        return false;
    };
    nanos.len() == 20
        && nanos.bytes().all(|b| b.is_ascii_digit())
        && random.len() == 8
        && random
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What [`Repository::prune`] does.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct PruneOptions {
    /// The policy to apply; `None`: the one stored in the pool.
    pub policy: Option<RetentionPolicy>,
    /// Only this VM's snapshots; `None`: every VM.
    pub vm: Option<String>,
    /// Decide and report, remove nothing.
    pub dry_run: bool,
}

impl PruneOptions {
    /// Applies the pool's stored policy to every VM.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies `policy` instead of the stored one.
    pub fn with_policy(mut self, policy: RetentionPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Only considers snapshots of `vm`.
    pub fn with_vm(mut self, vm: impl Into<String>) -> Self {
        self.vm = Some(vm.into());
        self
    }

    /// Reports what would be removed without removing it.
    pub fn with_dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }
}

/// What [`Repository::prune`] decided and did.
#[derive(Clone, Debug, serde::Serialize)]
#[non_exhaustive]
pub struct PruneReport {
    /// The policy applied, in words.
    pub policy: String,
    /// Whether nothing was removed on purpose.
    pub dry_run: bool,
    /// One decision per snapshot considered, grouped by VM, newest first.
    pub decisions: Vec<RetentionDecision>,
    /// Snapshots removed (none in a dry run).
    pub removed: Vec<SnapshotId>,
    /// Snapshots the policy would remove but that were protected or
    /// already gone when their turn came.
    pub skipped: Vec<SnapshotId>,
    /// Manifests that cannot be read: never removed by prune (their VM and
    /// time are unknown), listed so an operator sees them.
    pub damaged: Vec<SnapshotId>,
}

impl Repository {
    /// The ids of every protected snapshot.
    pub fn protected(&self) -> Result<BTreeSet<SnapshotId>> {
        let mut out = BTreeSet::new();
        for name in self.pool().list(FileKind::Protection)? {
            // Foreign names (not an id) protect nothing; leave them alone.
            if let Some(id) = SnapshotId::from_hex(&name) {
                out.insert(id);
            }
        }
        Ok(out)
    }

    /// Whether `id` is protected, asked of the pool now.
    pub fn is_protected(&self, id: &SnapshotId) -> Result<bool> {
        match self.pool().size(FileKind::Protection, &id.to_hex()) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Protects snapshot `id` from removal (`on`), or lifts its protection.
    /// Returns whether anything changed. Protecting a snapshot that does not
    /// exist is [`Error::SnapshotNotFound`].
    ///
    /// ```
    /// # use cairn_engine::{Repository, SnapshotId};
    /// # let repo = Repository::create(std::sync::Arc::new(cairn_pools::MemoryPool::new())).unwrap();
    /// # let id = SnapshotId([1; 32]);
    /// // Nothing to protect in an empty pool.
    /// assert!(repo.protect(&id, true).unwrap_err().is_not_found());
    /// assert!(!repo.protect(&id, false).unwrap());
    /// ```
    pub fn protect(&self, id: &SnapshotId, on: bool) -> Result<bool> {
        let name = id.to_hex();
        if on {
            self.resolve(&crate::snapshots::SnapshotSelector::Id(*id))?;
            let changed =
                match self
                    .pool()
                    .write(FileKind::Protection, &name, format!("{name}\n").as_bytes())
                {
                    Ok(()) => true,
                    Err(Error::AlreadyExists { .. }) => false,
                    Err(e) => return Err(e),
                };
            // A prune or forget may have deleted it between the check and
            // the mark: then it is not protected, say so.
            if let Err(e) = self.pool().size(FileKind::Snapshot, &name) {
                if e.is_not_found() {
                    let _ = self.pool().delete(FileKind::Protection, &name);
                    return Err(Error::SnapshotNotFound(name));
                }
                return Err(e);
            }
            Ok(changed)
        } else {
            match self.pool().delete(FileKind::Protection, &name) {
                Ok(()) => Ok(true),
                Err(e) if e.is_not_found() => Ok(false),
                Err(e) => Err(e),
            }
        }
    }

    /// Removes the named snapshots (their manifests). Every id is checked
    /// first: if any is protected or missing, nothing is removed.
    pub fn forget(&self, ids: &[SnapshotId]) -> Result<()> {
        for id in ids {
            self.resolve(&crate::snapshots::SnapshotSelector::Id(*id))?;
            if self.is_protected(id)? {
                return Err(Error::SnapshotProtected(id.to_hex()));
            }
        }
        for id in ids {
            self.remove_snapshot(id)?;
        }
        Ok(())
    }

    /// Deletes one manifest unless it is protected now. `Ok(false)`: left
    /// alone (protected, or already gone).
    fn remove_snapshot(&self, id: &SnapshotId) -> Result<bool> {
        if self.is_protected(id)? {
            return Err(Error::SnapshotProtected(id.to_hex()));
        }
        match self.pool().delete(FileKind::Snapshot, &id.to_hex()) {
            Ok(()) => {
                self.drop_damage_mark(id);
                Ok(true)
            }
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The retention policy stored in the pool, if any (the newest one).
    pub fn retention_policy(&self) -> Result<Option<RetentionPolicy>> {
        let Some(name) = self.policy_names()?.pop() else {
            return Ok(None);
        };
        let bytes = self.pool().read(FileKind::Setting, &name)?;
        RetentionPolicy::decode(&bytes)
            .map(Some)
            .map_err(|e| match e {
                Error::Corrupt { what, reason } => Error::Corrupt {
                    what: format!("{what} settings/{name}"),
                    reason,
                },
                other => other,
            })
    }

    /// Stores `policy` in the pool (`None`: removes the stored policy).
    /// The new policy is written before older ones are deleted, so a crash
    /// in between leaves the newest in force.
    pub fn set_retention_policy(&self, policy: Option<&RetentionPolicy>) -> Result<()> {
        let older = self.policy_names()?;
        if let Some(policy) = policy {
            if policy.is_empty() {
                return Err(Error::InvalidArgument(
                    "a stored retention policy needs at least one keep rule".into(),
                ));
            }
            // Later than every stored name even if this host's clock is
            // behind, so the new policy is the one in force.
            let latest = older
                .last()
                .and_then(|n| {
                    n.strip_prefix(POLICY_PREFIX)?
                        .split('.')
                        .next()?
                        .parse::<u128>()
                        .ok()
                })
                .unwrap_or(0);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
                .max(latest + 1);
            let random = random_16()?;
            let name = format!(
                "{POLICY_PREFIX}{nanos:020}.{}",
                crate::id::hex(&random[..4])
            );
            self.pool()
                .write(FileKind::Setting, &name, policy.encode().as_bytes())?;
        }
        for name in older {
            match self.pool().delete(FileKind::Setting, &name) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Stored policy names, oldest first.
    fn policy_names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .pool()
            .list(FileKind::Setting)?
            .into_iter()
            .filter(|n| is_policy_name(n))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Applies a retention policy: decides for every snapshot whether a rule
    /// keeps it, then (unless a dry run) removes the others. Damaged
    /// manifests are listed and never removed. A listing error removes
    /// nothing.
    ///
    /// ```
    /// # use cairn_engine::{PruneOptions, Repository, RetentionPolicy};
    /// # let repo = Repository::create(std::sync::Arc::new(cairn_pools::MemoryPool::new())).unwrap();
    /// let policy = RetentionPolicy::new().with_keep_last(7)?;
    /// let report = repo.prune(&PruneOptions::new().with_policy(policy).with_dry_run(true))?;
    /// assert!(report.removed.is_empty());
    /// # Ok::<(), cairn_engine::Error>(())
    /// ```
    pub fn prune(&self, options: &PruneOptions) -> Result<PruneReport> {
        let policy = match &options.policy {
            Some(p) => p.clone(),
            None => self.retention_policy()?.ok_or_else(|| {
                Error::InvalidArgument(
                    "no retention rule given and no policy stored in the pool".into(),
                )
            })?,
        };
        // Every manifest read and hash-checked: a damaged one must not be
        // counted as a kept snapshot (the catalog would list it healthy).
        let list = self.snapshots_checked()?;
        let protected = self.protected()?;
        let considered: Vec<_> = list
            .snapshots
            .into_iter()
            .filter(|s| options.vm.as_ref().is_none_or(|vm| &s.vm == vm))
            .collect();
        let decisions = policy.apply(&considered, &protected)?;
        let mut report = PruneReport {
            policy: policy.to_string(),
            dry_run: options.dry_run,
            decisions,
            removed: Vec::new(),
            skipped: Vec::new(),
            damaged: list.damaged.iter().map(|(id, _)| *id).collect(),
        };
        if options.dry_run {
            return Ok(report);
        }
        let doomed: Vec<SnapshotId> = report
            .decisions
            .iter()
            .filter(|d| !d.keep)
            .map(|d| d.id)
            .collect();
        // A kept snapshot that vanished since the listing (a backup that
        // withdrew its manifest, a concurrent forget) changes what the
        // rules keep: decide again rather than delete on a stale view.
        for d in report.decisions.iter().filter(|d| d.keep) {
            if let Err(e) = self.pool().size(FileKind::Snapshot, &d.id.to_hex()) {
                if e.is_not_found() {
                    return Err(Error::PoolBusy(format!(
                        "snapshot {} disappeared while prune was deciding; nothing was removed, run it again",
                        d.id
                    )));
                }
                return Err(e);
            }
        }
        for id in doomed {
            match self.remove_snapshot(&id) {
                Ok(true) => report.removed.push(id),
                Ok(false) | Err(Error::SnapshotProtected(_)) => report.skipped.push(id),
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_have_one_shape() {
        assert!(is_policy_name("retention.01800000000123456789.0a1b2c3d"));
        for foreign in [
            "retention.zzz",
            "retention.1800000000123456789.0a1b2c3d", // 19 digits
            "retention.01800000000123456789.0A1B2C3D", // upper case
            "retention.01800000000123456789.0a1b2c3", // 7 hex
            "retention.01800000000123456789.0a1b2c3d.x", // more
            "retention.0180000000012345678x.0a1b2c3d",
            "policy.01800000000123456789.0a1b2c3d",
        ] {
            assert!(!is_policy_name(foreign), "{foreign}");
        }
    }
}
