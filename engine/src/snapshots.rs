//! Listing and naming snapshots: [`SnapshotInfo`] (a snapshot without its
//! extent lists), [`SnapshotList`] (the healthy ones and, beside them, the
//! ones whose manifests cannot be read) and [`SnapshotSelector`] (`latest`,
//! an id prefix, or a full id).

use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;

use crate::chunker::ChunkingParams;
use crate::error::{Error, Result};
use crate::id::SnapshotId;
use crate::store::blob::Compression;
use crate::store::manifest::{Snapshot, SnapshotMode};

/// Shortest id prefix a selector accepts.
pub const MIN_PREFIX: usize = 8;

/// One disk of a listed snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct DiskInfo {
    /// The disk's name.
    pub name: String,
    /// Logical size in bytes.
    pub size: u64,
    /// The disk's recorded properties (source, bitmaps, fallback reason …).
    pub properties: BTreeMap<String, String>,
}

/// A snapshot as listed: everything but the extent lists.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct SnapshotInfo {
    /// The snapshot's id.
    pub id: SnapshotId,
    /// When the backup finished.
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// The VM.
    pub vm: String,
    /// Full read or CBT incremental.
    pub mode: SnapshotMode,
    /// The snapshot it was built on or deduplicated against.
    pub parent: Option<SnapshotId>,
    /// How disks were chunked.
    #[serde(serialize_with = "display")]
    pub chunking: ChunkingParams,
    /// Compression of the chunks the backup stored.
    #[serde(serialize_with = "display")]
    pub compression: Compression,
    /// Recorded properties.
    pub properties: BTreeMap<String, String>,
    /// The disks.
    pub disks: Vec<DiskInfo>,
    /// Marked damaged by `repair --packs` and not healed since (see
    /// [`Repository::damage_marks`](crate::Repository::damage_marks)).
    pub damaged: bool,
}

pub(crate) fn rfc3339<S: serde::Serializer>(
    t: &SystemTime,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_seconds(*t).to_string())
}

fn display<T: fmt::Display, S: serde::Serializer>(
    v: &T,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl SnapshotInfo {
    /// The listing of snapshot `id` decoded as `s` (its extents are not used).
    pub fn new(id: SnapshotId, s: Snapshot) -> Self {
        SnapshotInfo {
            id,
            time: s.time,
            vm: s.vm,
            mode: s.mode,
            parent: s.parent,
            chunking: s.chunking,
            compression: s.compression,
            properties: s.properties,
            disks: s
                .disks
                .into_iter()
                .map(|d| DiskInfo {
                    name: d.name,
                    size: d.size,
                    properties: d.properties,
                })
                .collect(),
            damaged: false,
        }
    }

    /// Sum of the disks' logical sizes.
    pub fn bytes_logical(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }
}

impl fmt::Display for SnapshotInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} ({} disks, {} bytes)",
            self.id,
            humantime::format_rfc3339_seconds(self.time),
            self.vm,
            self.mode,
            self.disks.len(),
            self.bytes_logical()
        )
    }
}

/// What a pool holds ([`Repository::info`](crate::Repository::info)).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct PoolInfo {
    /// Snapshots whose manifests can be read.
    pub snapshots: usize,
    /// Manifests that cannot be read.
    pub damaged_snapshots: usize,
    /// Pack files.
    pub packs: usize,
    /// Bytes of every object in the pool (packs, index, manifests, config).
    pub stored_bytes: u64,
    /// Sum of the readable snapshots' logical sizes.
    pub logical_bytes: u64,
}

impl PoolInfo {
    /// Logical bytes per stored byte (`None` for an empty pool).
    pub fn dedup_ratio(&self) -> Option<f64> {
        (self.stored_bytes > 0 && self.logical_bytes > 0)
            .then(|| self.logical_bytes as f64 / self.stored_bytes as f64)
    }
}

/// Every snapshot of a pool, oldest first, and the manifests that could not
/// be read (with why) beside them.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct SnapshotList {
    /// Healthy snapshots, oldest first (ties by id).
    pub snapshots: Vec<SnapshotInfo>,
    /// Manifests that cannot be read or decoded.
    pub damaged: Vec<(SnapshotId, Error)>,
}

impl SnapshotList {
    /// The healthy snapshots of `vm`, oldest first.
    pub fn of_vm<'a>(&'a self, vm: &'a str) -> impl Iterator<Item = &'a SnapshotInfo> + 'a {
        self.snapshots.iter().filter(move |s| s.vm == vm)
    }
}

/// Names a snapshot: `latest` (of one VM, or of the only VM in the pool), a
/// unique prefix of at least [`MIN_PREFIX`] hex digits, or a full id.
///
/// ```
/// use cairn_engine::SnapshotSelector;
/// assert_eq!(
///     SnapshotSelector::parse("latest", Some("web01")).unwrap(),
///     SnapshotSelector::latest_of("web01")
/// );
/// assert!(matches!(
///     "0123abcd".parse::<SnapshotSelector>().unwrap(),
///     SnapshotSelector::Prefix(_)
/// ));
/// assert!("0123".parse::<SnapshotSelector>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotSelector {
    /// The newest snapshot, of `vm` when given.
    Latest {
        /// Restrict to this VM.
        vm: Option<String>,
    },
    /// A unique id prefix (lower-case hex).
    Prefix(String),
    /// A full id.
    Id(SnapshotId),
}

impl SnapshotSelector {
    /// `latest` of VM `vm`.
    pub fn latest_of(vm: impl Into<String>) -> Self {
        SnapshotSelector::Latest {
            vm: Some(vm.into()),
        }
    }

    /// Parses `latest`, a prefix or a full id; `vm` restricts `latest` (an
    /// id or prefix names snapshots across every VM).
    pub fn parse(s: &str, vm: Option<&str>) -> Result<Self> {
        if s == "latest" {
            return Ok(SnapshotSelector::Latest {
                vm: vm.map(str::to_string),
            });
        }
        let sel = s.to_ascii_lowercase();
        if sel.len() < MIN_PREFIX
            || sel.len() > SnapshotId::LEN * 2
            || !sel.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(Error::InvalidArgument(format!(
                "snapshot {s:?}: give a full id, a prefix of at least {MIN_PREFIX} hex digits, \
                 or `latest`"
            )));
        }
        Ok(match SnapshotId::from_hex(&sel) {
            Some(id) => SnapshotSelector::Id(id),
            None => SnapshotSelector::Prefix(sel),
        })
    }
}

impl fmt::Display for SnapshotSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotSelector::Latest { vm: None } => f.write_str("latest"),
            SnapshotSelector::Latest { vm: Some(vm) } => write!(f, "latest of VM {vm:?}"),
            SnapshotSelector::Prefix(p) => write!(f, "{p:?}"),
            SnapshotSelector::Id(id) => write!(f, "{id}"),
        }
    }
}

impl std::str::FromStr for SnapshotSelector {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        SnapshotSelector::parse(s, None)
    }
}
