//! The trust decision: given the previous snapshot of a disk, the bitmap the
//! caller is about to consume and what the source said about it, [`decide`]
//! returns an incremental only when every link holds (the bitmap exists and
//! is consistent, it is the one the previous snapshot started, the disk kept
//! its size and chunk grid); otherwise the job's [`CbtPolicy`] picks a full
//! read against the parent (stores only changed chunks, so always correct) or
//! skipping the disk.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::cbt::spot_check::spot_check;
use crate::chunker::ChunkingParams;
use crate::error::{Error, Result};
use crate::id::SnapshotId;
use crate::pipeline::input::{BackupDisk, ChangedBlocks, DiskInput};
use crate::source::DiskSource;
use crate::store::format::{PROP_BITMAP, PROP_FALLBACK, PROP_NEXT_BITMAP, PROP_SPOT_CHECK};
use crate::store::manifest::{DiskManifest, Snapshot};

/// What a job does when changed-block tracking cannot be trusted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CbtPolicy {
    /// Read the whole disk (its allocated extents) against the previous
    /// snapshot: only changed chunks are stored. The default.
    #[default]
    Full,
    /// Leave the disk out of this run and raise an alert.
    SkipAlert,
    /// Leave the disk out of this run silently.
    Skip,
}

impl std::fmt::Display for CbtPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CbtPolicy::Full => "full",
            CbtPolicy::SkipAlert => "skip-alert",
            CbtPolicy::Skip => "skip",
        })
    }
}

impl std::str::FromStr for CbtPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "full" => Ok(CbtPolicy::Full),
            "skip-alert" => Ok(CbtPolicy::SkipAlert),
            "skip" => Ok(CbtPolicy::Skip),
            _ => Err(format!(
                "CBT policy {s:?}: expected full, skip-alert or skip"
            )),
        }
    }
}

/// What the caller knows about one disk before an incremental.
#[derive(Clone, Copy, Debug)]
pub struct CbtRequest<'a> {
    /// The disk's name.
    pub disk: &'a str,
    /// The newest snapshot of the VM holding this disk, if any
    /// ([`Repository::latest_with_disk`](crate::Repository::latest_with_disk)).
    pub parent: Option<(&'a SnapshotId, &'a Snapshot)>,
    /// The bitmap the caller is about to consume.
    pub bitmap: &'a str,
    /// Its dirty ranges, or why they are unavailable (missing, inconsistent,
    /// in use …).
    pub dirty: std::result::Result<&'a [Range<u64>], &'a str>,
    /// The disk's size now.
    pub size: u64,
    /// This backup's chunking.
    pub chunking: ChunkingParams,
}

/// The outcome of [`decide`].
#[derive(Clone, Debug)]
pub enum CbtDecision {
    /// Trusted: read only the dirty ranges against the parent.
    Incremental {
        /// The snapshot built on.
        parent: SnapshotId,
        /// What to read and what to reuse.
        changed: ChangedBlocks,
    },
    /// No earlier copy of the disk: a plain full backup, nothing to fall
    /// back from.
    Full,
    /// Not trusted, policy `full`: read the whole disk, deduplicated against
    /// the parent (recorded), and record `reason`.
    Fallback {
        /// The snapshot deduplicated against.
        parent: SnapshotId,
        /// Why CBT was not trusted.
        reason: String,
    },
    /// Not trusted, policy `skip`/`skip-alert`: leave the disk out.
    Skip {
        /// Why CBT was not trusted.
        reason: String,
        /// The policy asks for an alert.
        alert: bool,
    },
}

impl CbtDecision {
    /// The reason CBT was not used, when it was asked for.
    pub fn fallback_reason(&self) -> Option<&str> {
        match self {
            CbtDecision::Fallback { reason, .. } | CbtDecision::Skip { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

impl CbtDecision {
    /// Turns the decision into the disk's backup input and the parent to
    /// record, noting in `properties` the bitmap consumed (incrementals) or
    /// the fallback reason. `Err((reason, alert))`: the policy skips the disk.
    #[allow(clippy::type_complexity)]
    pub fn into_input(
        self,
        source: Box<dyn DiskSource>,
        consumed: Option<&str>,
        properties: &mut BTreeMap<String, String>,
    ) -> std::result::Result<(DiskInput, Option<SnapshotId>), (String, bool)> {
        match self {
            CbtDecision::Incremental { parent, changed } => {
                if let Some(b) = consumed {
                    properties.insert(PROP_BITMAP.to_string(), b.to_string());
                }
                Ok((DiskInput::Incremental { source, changed }, Some(parent)))
            }
            CbtDecision::Full => Ok((DiskInput::Image(source), None)),
            CbtDecision::Fallback { parent, reason } => {
                properties.insert(PROP_FALLBACK.to_string(), reason);
                Ok((DiskInput::Image(source), Some(parent)))
            }
            CbtDecision::Skip { reason, alert } => Err((reason, alert)),
        }
    }
}

/// Where a [`CbtDisk`]'s parent comes from.
#[derive(Debug, Default)]
pub enum CbtParent {
    /// [`prepare_vm`](crate::cbt::prepare_vm) looks up the newest snapshot
    /// of the VM holding the disk.
    #[default]
    Find,
    /// The caller already loaded it (or knows there is none).
    Known(Option<Box<(SnapshotId, Snapshot)>>),
}

/// One disk whose backup may use a dirty bitmap.
#[non_exhaustive]
pub struct CbtDisk {
    /// The disk's name in the snapshot.
    pub name: String,
    /// The disk now.
    pub source: Box<dyn DiskSource>,
    /// The bitmap to consume.
    pub bitmap: String,
    /// Its dirty ranges, or why they are unavailable.
    pub dirty: std::result::Result<Vec<Range<u64>>, String>,
    /// The bitmap recording changes from this backup on (recorded as
    /// [`PROP_NEXT_BITMAP`]).
    pub next_bitmap: String,
    /// Other facts to record in the disk's manifest entry.
    pub properties: BTreeMap<String, String>,
    /// Extents the bitmap marks clean to read back and compare with the
    /// parent before trusting it ([`spot_check`]); 0 = none.
    pub spot_check: u32,
    /// The disk's previous snapshot.
    pub parent: CbtParent,
    /// Where a version 2 parent's extent pages are read (for the spot check).
    pub(crate) pages: Option<crate::pipeline::input::PageStore>,
}

impl CbtDisk {
    /// Disk `name` read from `source`, consuming `bitmap` (whose dirty
    /// ranges are `dirty`, or why they are unavailable) and starting
    /// `next_bitmap`. No properties, no spot check, parent looked up.
    pub fn new(
        name: impl Into<String>,
        source: Box<dyn DiskSource>,
        bitmap: impl Into<String>,
        dirty: std::result::Result<Vec<Range<u64>>, String>,
        next_bitmap: impl Into<String>,
    ) -> Self {
        CbtDisk {
            name: name.into(),
            source,
            bitmap: bitmap.into(),
            dirty,
            next_bitmap: next_bitmap.into(),
            properties: BTreeMap::new(),
            spot_check: 0,
            parent: CbtParent::Find,
            pages: None,
        }
    }

    /// Reads the parent's extent pages (a spot check reads the parent's
    /// extents) from `repo`, the pool the parent is in.
    pub fn with_pages_from(mut self, repo: &crate::Repository) -> Result<Self> {
        self.pages = Some(crate::pipeline::input::PageStore {
            pool: repo.pool().clone(),
            index: repo.index()?,
        });
        Ok(self)
    }

    /// Records `key = value` in the disk's manifest entry.
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Reads back `samples` clean extents before trusting the bitmap.
    pub fn with_spot_check(mut self, samples: u32) -> Self {
        self.spot_check = samples;
        self
    }

    /// Uses `parent` (already loaded) instead of looking it up.
    pub fn with_parent(mut self, parent: Option<(SnapshotId, Snapshot)>) -> Self {
        self.parent = CbtParent::Known(parent.map(Box::new));
        self
    }
}

impl std::fmt::Debug for CbtDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CbtDisk")
            .field("name", &self.name)
            .field("source", &self.source.describe())
            .field("bitmap", &self.bitmap)
            .field("next_bitmap", &self.next_bitmap)
            .finish_non_exhaustive()
    }
}

/// A disk ready for a backup, or skipped by the policy.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per disk, moved once
pub enum PreparedDisk {
    /// Back the disk up with this input.
    Backup {
        /// The input (an incremental, or a full read).
        disk: BackupDisk,
        /// The parent to set in the backup options.
        parent: Option<SnapshotId>,
        /// Set when CBT was not trusted and the disk is read in full.
        fallback: Option<String>,
    },
    /// Leave the disk (and its VM) out of this run.
    Skip {
        /// Why CBT cannot be trusted.
        reason: String,
        /// The policy asks for an alert.
        alert: bool,
    },
}

/// [`decide`]s for `disk` against its `parent` (the newest snapshot of the
/// VM holding it: [`Repository::latest_with_disk`](crate::Repository::latest_with_disk)),
/// runs the optional [`spot_check`] and builds the backup input.
pub fn prepare_disk(
    parent: Option<&(SnapshotId, Snapshot)>,
    disk: CbtDisk,
    chunking: ChunkingParams,
    policy: CbtPolicy,
) -> Result<PreparedDisk> {
    let request = CbtRequest {
        disk: &disk.name,
        parent: parent.map(|(id, s)| (id, s)),
        bitmap: &disk.bitmap,
        dirty: disk.dirty.as_deref().map_err(String::as_str),
        size: disk.source.size(),
        chunking,
    };
    let mut decision = decide(&request, policy);
    let mut properties = disk.properties;
    if let CbtDecision::Incremental { parent, changed } = &mut decision {
        if let Some(pages) = disk.pages.clone() {
            changed.attach_pages(pages.pool, pages.index);
        }
        if disk.spot_check > 0 {
            let grid = chunking.max_chunk() as u64;
            match spot_check(&*disk.source, changed, grid, disk.spot_check)? {
                Ok(checked) => {
                    properties.insert(
                        PROP_SPOT_CHECK.to_string(),
                        format!("{checked} clean extents match the parent"),
                    );
                }
                Err(reason) => {
                    decision = apply_policy(*parent, reason, policy);
                }
            }
        }
    }
    let fallback = decision.fallback_reason().map(str::to_string);
    properties.insert(PROP_NEXT_BITMAP.to_string(), disk.next_bitmap);
    Ok(
        match decision.into_input(disk.source, Some(&disk.bitmap), &mut properties) {
            Ok((input, parent)) => PreparedDisk::Backup {
                disk: BackupDisk {
                    name: disk.name,
                    input,
                    properties,
                },
                parent,
                fallback,
            },
            Err((reason, alert)) => PreparedDisk::Skip { reason, alert },
        },
    )
}

/// Decides whether the caller's bitmap can drive an incremental of
/// `req.disk`, and applies `policy` when it cannot. Never trusts a bitmap
/// that is missing or inconsistent, that is not the one the previous snapshot
/// started, or a disk whose size or chunk grid changed.
pub fn decide(req: &CbtRequest<'_>, policy: CbtPolicy) -> CbtDecision {
    let Some((parent_id, parent)) = req.parent else {
        return CbtDecision::Full;
    };
    let Some(parent_disk) = parent.disks.iter().find(|d| d.name == req.disk) else {
        return CbtDecision::Full;
    };
    match trust(req, parent_id, parent, parent_disk) {
        Ok(changed) => CbtDecision::Incremental {
            parent: *parent_id,
            changed,
        },
        Err(reason) => apply_policy(*parent_id, reason, policy),
    }
}

fn apply_policy(parent: SnapshotId, reason: String, policy: CbtPolicy) -> CbtDecision {
    match policy {
        CbtPolicy::Full => CbtDecision::Fallback { parent, reason },
        CbtPolicy::SkipAlert | CbtPolicy::Skip => CbtDecision::Skip {
            reason,
            alert: policy == CbtPolicy::SkipAlert,
        },
    }
}

fn trust(
    req: &CbtRequest<'_>,
    parent_id: &SnapshotId,
    parent: &Snapshot,
    parent_disk: &DiskManifest,
) -> std::result::Result<ChangedBlocks, String> {
    let short = &parent_id.to_hex()[..16];
    match parent_disk.properties.get(PROP_NEXT_BITMAP) {
        None => {
            return Err(format!(
                "the previous snapshot {short} started no dirty bitmap for this disk"
            ))
        }
        Some(next) if next != req.bitmap => {
            return Err(format!(
            "bitmap {:?} does not belong to the previous snapshot {short}, which started {next:?}",
            req.bitmap
        ))
        }
        Some(_) => {}
    }
    let dirty = req.dirty.map_err(|why| why.to_string())?;
    let changed = ChangedBlocks::new(*parent_id, parent, &parent_disk.name, dirty.to_vec())
        .map_err(|e| e.to_string())?;
    match changed.check(req.disk, req.size, req.chunking) {
        Ok(()) => Ok(changed),
        Err(Error::CbtNotTrusted { reason, .. }) => Err(reason),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{ChunkId, IdScheme};
    use crate::store::blob::Compression;

    /// A parent snapshot with one 1 MiB disk "vda" on the 64 KiB grid.
    fn parent(next: Option<&str>) -> Snapshot {
        let mut disk = DiskManifest::new("vda");
        for i in 0..16u8 {
            disk.push(65536, Some(ChunkId([i; 32])));
        }
        if let Some(n) = next {
            disk.properties
                .insert(PROP_NEXT_BITMAP.to_string(), n.to_string());
        }
        Snapshot {
            time: std::time::UNIX_EPOCH,
            vm: "vm".into(),
            mode: crate::store::manifest::SnapshotMode::Full,
            parent: None,
            id_scheme: IdScheme::Blake3,
            chunking: ChunkingParams::default(),
            compression: Compression::default(),
            properties: BTreeMap::new(),
            disks: vec![disk],
        }
    }

    fn request<'a>(
        parent: Option<(&'a SnapshotId, &'a Snapshot)>,
        bitmap: &'a str,
        dirty: std::result::Result<&'a [Range<u64>], &'a str>,
        size: u64,
    ) -> CbtRequest<'a> {
        CbtRequest {
            disk: "vda",
            parent,
            bitmap,
            dirty,
            size,
            chunking: ChunkingParams::default(),
        }
    }

    fn reason(d: CbtDecision) -> String {
        match d {
            CbtDecision::Fallback { reason, .. } => reason,
            other => panic!("expected a fallback, got {other:?}"),
        }
    }

    /// parent, bitmap consumed, its dirty ranges (or why not), disk size, expected reason
    type Case<'a> = (
        Snapshot,
        &'a str,
        std::result::Result<&'a [Range<u64>], &'a str>,
        u64,
        &'a str,
    );

    #[test]
    fn decide_trusts_only_an_unbroken_link() {
        let id = SnapshotId([7; 32]);
        let p = parent(Some("c.1"));
        let dirty = [65536..70000, 300_000..300_001];
        let ok = decide(
            &request(Some((&id, &p)), "c.1", Ok(&dirty), 1 << 20),
            CbtPolicy::Full,
        );
        match ok {
            CbtDecision::Incremental { parent, changed } => {
                assert_eq!(parent, id);
                assert_eq!(changed.dirty(), dirty);
            }
            other => panic!("{other:?}"),
        }
        // No parent, or a parent without this disk: a plain full backup.
        let d = decide(&request(None, "c.1", Ok(&dirty), 1 << 20), CbtPolicy::Skip);
        assert!(matches!(d, CbtDecision::Full));
        let mut other_disk = p.clone();
        other_disk.disks[0].name = "vdb".into();
        let d = decide(
            &request(Some((&id, &other_disk)), "c.1", Ok(&dirty), 1 << 20),
            CbtPolicy::Skip,
        );
        assert!(matches!(d, CbtDecision::Full));
        // Every broken link is named.
        let cases: [Case<'_>; 4] = [
            (
                parent(None),
                "c.1",
                Ok(&dirty),
                1 << 20,
                "started no dirty bitmap",
            ),
            (
                parent(Some("c.1")),
                "c.2",
                Ok(&dirty),
                1 << 20,
                "does not belong",
            ),
            (
                parent(Some("c.1")),
                "c.1",
                Err("bitmap is inconsistent"),
                1 << 20,
                "inconsistent",
            ),
            (parent(Some("c.1")), "c.1", Ok(&dirty), 2 << 20, "resized"),
        ];
        for (p, bitmap, dirty, size, expect) in cases {
            let r = reason(decide(
                &request(Some((&id, &p)), bitmap, dirty, size),
                CbtPolicy::Full,
            ));
            assert!(r.contains(expect), "{r:?} should say {expect:?}");
            let skip = decide(
                &request(Some((&id, &p)), bitmap, dirty, size),
                CbtPolicy::SkipAlert,
            );
            assert!(matches!(skip, CbtDecision::Skip { alert: true, .. }));
            let skip = decide(
                &request(Some((&id, &p)), bitmap, dirty, size),
                CbtPolicy::Skip,
            );
            assert!(matches!(skip, CbtDecision::Skip { alert: false, .. }));
        }
        // A parent cut with other chunking.
        let mut cdc = parent(Some("c.1"));
        cdc.chunking = ChunkingParams::cdc();
        let r = reason(decide(
            &request(Some((&id, &cdc)), "c.1", Ok(&dirty), 1 << 20),
            CbtPolicy::Full,
        ));
        assert!(r.contains("chunked"), "{r}");
    }

    #[test]
    fn policy_names_round_trip() {
        for p in [CbtPolicy::Full, CbtPolicy::SkipAlert, CbtPolicy::Skip] {
            assert_eq!(p.to_string().parse::<CbtPolicy>().unwrap(), p);
        }
        assert!("maybe".parse::<CbtPolicy>().is_err());
        assert_eq!(CbtPolicy::default(), CbtPolicy::Full);
    }

    /// The spot check runs only when asked for (`spot_check > 0`): asked
    /// for, it records what it checked, or falls back when the disk does
    /// not match its parent; not asked for, nothing is read back.
    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one dirty range
    fn prepare_disk_spot_checks_only_when_asked() {
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let mut disk = DiskManifest::new("vda");
        for c in data.chunks(65536) {
            disk.push(65536, Some(ChunkId::of(c)));
        }
        disk.properties
            .insert(PROP_NEXT_BITMAP.to_string(), "c.1".to_string());
        let mut p = parent(None);
        p.disks = vec![disk];
        let id = SnapshotId([3; 32]);
        // The bitmap marks 64 KiB dirty; the rest must equal the parent.
        let run = |content: Vec<u8>, samples: u32| {
            let cbt = CbtDisk::new(
                "vda",
                Box::new(crate::source::MemorySource::new("vda", content)),
                "c.1",
                Ok(vec![0..65536]),
                "c.2",
            )
            .with_spot_check(samples);
            let debug = format!("{cbt:?}");
            assert!(
                debug.contains("\"vda\"") && debug.contains("\"c.2\""),
                "{debug}"
            );
            match prepare_disk(
                Some(&(id, p.clone())),
                cbt,
                ChunkingParams::default(),
                CbtPolicy::Full,
            )
            .unwrap()
            {
                PreparedDisk::Backup { disk, fallback, .. } => {
                    (disk.properties.get(PROP_SPOT_CHECK).cloned(), fallback)
                }
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(run(data.clone(), 0), (None, None));
        let (checked, fallback) = run(data.clone(), 2);
        assert_eq!(checked.as_deref(), Some("2 clean extents match the parent"));
        assert_eq!(fallback, None);
        // Every clean chunk differs from its parent's.
        let other: Vec<u8> = data.iter().map(|b| b ^ 0x5a).collect();
        assert_eq!(run(other.clone(), 0), (None, None));
        let (checked, fallback) = run(other, 2);
        assert_eq!(checked, None);
        assert!(
            fallback.is_some_and(|f| f.contains("spot check")),
            "fallback"
        );
    }
}
