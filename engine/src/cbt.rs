//! Changed-block tracking: [`DirtyBitmap`] (what changed since a snapshot, at
//! a fixed granularity) and [`ChangedBlocks`], the input that turns a backup
//! into an incremental: only dirty ranges are read; every other range reuses
//! the parent snapshot's extents, so the new manifest is complete on its own.
//!
//! [`decide`] is the trust check of spec B4: given the previous snapshot of a
//! disk, the bitmap the caller is about to consume and what the source said
//! about it, it returns an incremental only when every link holds (the
//! bitmap exists and is consistent, it is the one the previous snapshot
//! started, the disk kept its size and chunk grid); otherwise the job's
//! [`CbtPolicy`] picks a full read against the parent (stores only changed
//! chunks, so always correct) or skipping the disk. Each snapshot records in
//! its disk properties the bitmap it consumed ([`PROP_BITMAP`]), the bitmap
//! that tracks changes since it ([`PROP_NEXT_BITMAP`]) and, when CBT was asked
//! for but not trusted, why ([`PROP_FALLBACK`]).
//!
//! Bitmap encoding (`DirtyBitmap::encode`):
//! ```text
//! magic "CAIRNBM1" | version u16 = 1 | reserved u16 = 0 | reserved u32 = 0
//! granularity u64 | disk size u64 | word count u64 | words u64* (bit i = block i)
//! BLAKE3-256 of everything above [32]
//! ```

use std::collections::BTreeMap;
use std::ops::Range;

use crate::backup::DiskInput;
use crate::chunker::ChunkingParams;
use crate::coding::{split_checksummed, DecodeError, Decoder, Encoder};
use crate::error::{Error, Result};
use crate::id::SnapshotId;
use crate::manifest::{DiskManifest, Snapshot};
use crate::source::DiskSource;

/// Disk property: the dirty bitmap this snapshot's incremental consumed.
pub const PROP_BITMAP: &str = "cbt.bitmap";
/// Disk property: the bitmap that records changes since this snapshot; the
/// next incremental of the disk must consume exactly this one.
pub const PROP_NEXT_BITMAP: &str = "cbt.next-bitmap";
/// Disk property: why CBT was asked for but not used (the fallback reason).
pub const PROP_FALLBACK: &str = "cbt.fallback";
/// Disk property: what the optional [`spot_check`] verified.
pub const PROP_SPOT_CHECK: &str = "cbt.spot-check";

const BITMAP_MAGIC_V1: [u8; 8] = *b"CAIRNBM1";
const BITMAP_VERSION_V1: u16 = 1;

/// Which blocks of a disk changed, one bit per `granularity` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    granularity: u64,
    size: u64,
    words: Vec<u64>,
}

impl DirtyBitmap {
    /// An all-clean bitmap. `granularity` must be a power of two ≥ 512.
    pub fn new(size: u64, granularity: u64) -> Result<Self> {
        if !granularity.is_power_of_two() || granularity < 512 {
            return Err(Error::InvalidArgument(format!(
                "bitmap granularity {granularity} must be a power of two ≥ 512"
            )));
        }
        let blocks = size.div_ceil(granularity);
        Ok(DirtyBitmap {
            granularity,
            size,
            words: vec![0; blocks.div_ceil(64) as usize],
        })
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn blocks(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    /// Marks every block that `range` touches (clipped to the disk).
    pub fn set_range(&mut self, range: Range<u64>) {
        let end = range.end.min(self.size);
        if range.start >= end {
            return;
        }
        for b in range.start / self.granularity..end.div_ceil(self.granularity) {
            self.words[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// Whether block `block` is dirty (out of range: false).
    pub fn test(&self, block: u64) -> bool {
        block < self.blocks()
            && self
                .words
                .get((block / 64) as usize)
                .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    /// Dirty ranges in bytes, merged and clipped to the disk size.
    pub fn dirty_extents(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (wi, &w) in self.words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                let block = wi as u64 * 64 + bit;
                let start = block * self.granularity;
                let end = (start + self.granularity).min(self.size);
                match out.last_mut() {
                    Some(last) if last.end == start => last.end = end,
                    _ => out.push(start..end),
                }
            }
        }
        out
    }

    /// Bytes covered by dirty blocks.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_extents().iter().map(|r| r.end - r.start).sum()
    }

    /// ORs `other` into `self` (both must describe the same disk and grid).
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<()> {
        if other.granularity != self.granularity || other.size != self.size {
            return Err(Error::InvalidArgument(format!(
                "cannot merge bitmaps of {}/{} and {}/{} (size/granularity)",
                self.size, self.granularity, other.size, other.granularity
            )));
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + self.words.len() * 8 + 32);
        out.extend_from_slice(&BITMAP_MAGIC_V1);
        out.put_u16(BITMAP_VERSION_V1);
        out.put_u16(0);
        out.put_u32(0);
        out.put_u64(self.granularity);
        out.put_u64(self.size);
        out.put_u64(self.words.len() as u64);
        for w in &self.words {
            out.put_u64(*w);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let body = split_checksummed(data)?;
        let mut d = Decoder::new(body);
        d.magic_version(&BITMAP_MAGIC_V1, BITMAP_VERSION_V1)?;
        let _ = (d.u16()?, d.u32()?);
        let granularity = d.u64()?;
        let size = d.u64()?;
        let count = d.u64()?;
        if !granularity.is_power_of_two() || granularity < 512 {
            return Err(DecodeError::Invalid(format!("granularity {granularity}")));
        }
        if count != size.div_ceil(granularity).div_ceil(64) || count > (d.remaining() / 8) as u64 {
            return Err(DecodeError::Invalid(format!(
                "{count} words do not describe {size} bytes at {granularity}"
            )));
        }
        let mut words = Vec::with_capacity(count as usize);
        for _ in 0..count {
            words.push(d.u64()?);
        }
        d.expect_end()?;
        let bm = DirtyBitmap {
            granularity,
            size,
            words,
        };
        // Bits past the last block must be clear.
        let blocks = bm.blocks();
        if let Some(last) = bm.words.last() {
            let used = blocks - (bm.words.len() as u64 - 1) * 64;
            if used < 64 && last >> used != 0 {
                return Err(DecodeError::Invalid("bits set past the disk's end".into()));
            }
        }
        Ok(bm)
    }
}

/// Turns a disk's backup into an incremental against its parent snapshot.
#[derive(Clone, Debug)]
pub struct ChangedBlocks {
    /// The same disk in the parent snapshot.
    pub parent: DiskManifest,
    /// The parent snapshot's chunking (must equal this backup's).
    pub parent_chunking: ChunkingParams,
    /// Ranges that may differ from the parent (from a dirty bitmap).
    pub dirty: Vec<Range<u64>>,
}

impl ChangedBlocks {
    /// Checks that the parent can be reused for a disk of `size` bytes cut
    /// with `chunking`. The error says why CBT cannot be trusted.
    pub fn check(&self, disk: &str, size: u64, chunking: ChunkingParams) -> Result<()> {
        let untrusted = |reason: String| Error::CbtNotTrusted {
            disk: disk.to_string(),
            reason,
        };
        let ChunkingParams::Fixed { size: grid } = chunking else {
            return Err(untrusted("incrementals need fixed-size chunking".into()));
        };
        if self.parent_chunking != chunking {
            return Err(untrusted(format!(
                "the parent was chunked {} and this backup {}",
                self.parent_chunking, chunking
            )));
        }
        if self.parent.size != size {
            return Err(untrusted(format!(
                "the disk is {size} bytes, the parent's copy {} (resized)",
                self.parent.size
            )));
        }
        // Every chunk extent of the parent must sit on the grid.
        for e in &self.parent.extents {
            if e.chunk.is_some() && (e.offset % grid as u64 != 0 || e.length > grid as u64) {
                return Err(untrusted(format!(
                    "the parent's extent at {} is not on the {grid}-byte grid",
                    e.offset
                )));
            }
        }
        Ok(())
    }

    /// The parent's extents covering `range` (grid-aligned), as
    /// (length, chunk) pairs; zero runs are clipped to the range.
    pub fn reuse(&self, range: Range<u64>) -> Result<Vec<(u64, Option<crate::id::ChunkId>)>> {
        let extents = &self.parent.extents;
        let first = extents.partition_point(|e| e.end() <= range.start);
        let mut out = Vec::new();
        for e in extents.get(first..).unwrap_or_default() {
            if e.offset >= range.end {
                break;
            }
            let start = e.offset.max(range.start);
            let end = e.end().min(range.end);
            if e.chunk.is_some() && (start != e.offset || end != e.end()) {
                return Err(Error::Internal(format!(
                    "parent chunk extent at {} straddles the reused range {range:?}",
                    e.offset
                )));
            }
            out.push((end - start, e.chunk));
        }
        Ok(out)
    }
}

/// What a job does when changed-block tracking cannot be trusted (spec B4).
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
    pub disk: &'a str,
    /// The newest snapshot of the VM holding this disk, if any
    /// ([`Repository::latest_with_disk`](crate::repo::Repository::latest_with_disk)).
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
        parent: SnapshotId,
        changed: ChangedBlocks,
    },
    /// No earlier copy of the disk: a plain full backup, nothing to fall
    /// back from.
    Full,
    /// Not trusted, policy `full`: read the whole disk, deduplicated against
    /// the parent (recorded), and record `reason`.
    Fallback { parent: SnapshotId, reason: String },
    /// Not trusted, policy `skip`/`skip-alert`: leave the disk out.
    Skip { reason: String, alert: bool },
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

/// One disk whose backup may use a dirty bitmap.
pub struct CbtDisk {
    pub name: String,
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

/// A disk ready for [`backup`](crate::backup::backup), or skipped by the policy.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per disk, moved once
pub enum PreparedDisk {
    Backup {
        disk: crate::backup::BackupDisk,
        /// The parent to set in [`BackupOptions`](crate::backup::BackupOptions).
        parent: Option<SnapshotId>,
        /// Set when CBT was not trusted and the disk is read in full.
        fallback: Option<String>,
    },
    Skip {
        reason: String,
        alert: bool,
    },
}

/// [`decide`]s for `disk` against its `parent` (the newest snapshot of the
/// VM holding it: [`Repository::latest_with_disk`](crate::repo::Repository::latest_with_disk)),
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
    if let CbtDecision::Incremental { parent, changed } = &decision {
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
                disk: crate::backup::BackupDisk {
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

/// Reads back up to `samples` extents that the bitmap marks clean (spread
/// over the disk, chosen at random) and compares them with the parent: a
/// chunk must hash to the parent's id, a zero run must read as zeros. Catches
/// a bitmap that was cleared or re-created after the parent snapshot, which
/// no name check can see. `Ok(Ok(n))`: n extents matched; `Ok(Err(reason))`:
/// a mismatch, CBT must not be trusted.
pub fn spot_check(
    source: &dyn DiskSource,
    changed: &ChangedBlocks,
    grid: u64,
    samples: u32,
) -> Result<std::result::Result<u32, String>> {
    let dirty = crate::source::align_extents(&changed.dirty, grid, source.size());
    let is_dirty = |start: u64, end: u64| {
        let i = dirty.partition_point(|r| r.end <= start);
        dirty.get(i).is_some_and(|r| r.start < end)
    };
    // Clean candidates: chunk extents, and grid-sized pieces of zero runs.
    let mut candidates: Vec<(u64, u64, Option<crate::id::ChunkId>)> = Vec::new();
    for e in &changed.parent.extents {
        match e.chunk {
            Some(id) if !is_dirty(e.offset, e.end()) => {
                candidates.push((e.offset, e.length, Some(id)))
            }
            Some(_) => {}
            None => {
                let mut at = e.offset;
                while at < e.end() {
                    let len = grid.min(e.end() - at);
                    if !is_dirty(at, at + len) {
                        candidates.push((at, len, None));
                    }
                    at += len;
                }
            }
        }
    }
    let seed = crate::id::random_16()?;
    let mut rng = crate::sample::SampleRng::new(u64::from_le_bytes([
        seed[0], seed[1], seed[2], seed[3], seed[4], seed[5], seed[6], seed[7],
    ]));
    // Partial Fisher–Yates: the first `samples` candidates, in random order.
    let n = (samples as usize).min(candidates.len());
    for i in 0..n {
        let j = i + rng.below((candidates.len() - i) as u64) as usize;
        candidates.swap(i, j);
    }
    let mut buf = Vec::new();
    for &(offset, len, id) in candidates.iter().take(n) {
        buf.resize(len as usize, 0);
        source.read_at(offset, &mut buf)?;
        let same = match id {
            Some(id) => crate::id::ChunkId::of(&buf) == id,
            None => crate::backup::is_zero(&buf),
        };
        if !same {
            return Ok(Err(format!(
                "spot check: bytes {offset}..{} changed since the previous snapshot although \
                 the bitmap marks them clean (the bitmap was cleared or re-created after it)",
                offset + len
            )));
        }
    }
    Ok(Ok(n as u32))
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
    let changed = ChangedBlocks {
        parent: parent_disk.clone(),
        parent_chunking: parent.chunking,
        dirty: dirty.to_vec(),
    };
    match changed.check(req.disk, req.size, req.chunking) {
        Ok(()) => Ok(changed),
        Err(Error::CbtNotTrusted { reason, .. }) => Err(reason),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Compression;
    use crate::id::{ChunkId, IdScheme};

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
            mode: "full".into(),
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
                assert_eq!(changed.dirty, dirty);
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

    /// A disk held in memory.
    struct Memory(Vec<u8>);
    impl DiskSource for Memory {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            let at = offset as usize;
            buf.copy_from_slice(&self.0[at..at + buf.len()]);
            Ok(())
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one dirty range each
    fn spot_check_catches_changes_the_bitmap_missed() {
        // Parent: 16 chunks of 64 KiB, chunk 3 all zeros (a zero run).
        let mut data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        data[3 << 16..4 << 16].fill(0);
        let mut parent = DiskManifest::new("vda");
        for c in data.chunks(65536) {
            let zero = c.iter().all(|&b| b == 0);
            parent.push(65536, (!zero).then(|| ChunkId::of(c)));
        }
        let changed = |dirty: Vec<Range<u64>>| ChangedBlocks {
            parent: parent.clone(),
            parent_chunking: ChunkingParams::default(),
            dirty,
        };
        let same = Memory(data.clone());
        assert_eq!(
            spot_check(&same, &changed(vec![]), 65536, 100).unwrap(),
            Ok(16)
        );
        assert_eq!(
            spot_check(&same, &changed(vec![0..1]), 65536, 4).unwrap(),
            Ok(4)
        );
        // A write the bitmap does not show, in a chunk and in a zero run.
        for at in [5 << 16 | 100, 3 << 16 | 7] {
            let mut d = data.clone();
            d[at] ^= 0xff;
            let src = Memory(d);
            let why = spot_check(&src, &changed(vec![]), 65536, 100)
                .unwrap()
                .unwrap_err();
            let block = (at as u64) >> 16 << 16;
            assert!(why.contains(&format!("bytes {block}..")), "{why}");
            // Marked dirty, it is not a clean extent and is not checked.
            let dirty = changed(vec![at as u64..at as u64 + 1]);
            assert_eq!(spot_check(&src, &dirty, 65536, 100).unwrap(), Ok(15));
        }
    }

    #[test]
    fn policy_names_round_trip() {
        for p in [CbtPolicy::Full, CbtPolicy::SkipAlert, CbtPolicy::Skip] {
            assert_eq!(p.to_string().parse::<CbtPolicy>().unwrap(), p);
        }
        assert!("maybe".parse::<CbtPolicy>().is_err());
        assert_eq!(CbtPolicy::default(), CbtPolicy::Full);
    }

    #[test]
    fn set_test_extents_merge() {
        let mut b = DirtyBitmap::new(1_000_000, 65536).unwrap();
        b.set_range(100..200);
        b.set_range(65536 * 3 + 5..65536 * 5);
        b.set_range(999_999..2_000_000);
        assert!(b.test(0) && !b.test(1) && b.test(3) && b.test(4) && !b.test(5));
        assert_eq!(
            b.dirty_extents(),
            vec![0..65536, 196608..327680, 983040..1_000_000]
        );
        let mut c = DirtyBitmap::new(1_000_000, 65536).unwrap();
        c.set_range(65536..65537);
        c.merge(&b).unwrap();
        assert_eq!(c.dirty_extents()[0], 0..131072);
        assert!(c.merge(&DirtyBitmap::new(5, 512).unwrap()).is_err());
        assert!(DirtyBitmap::new(10, 1000).is_err());
    }

    #[test]
    fn encoding_round_trip_and_damage() {
        let mut b = DirtyBitmap::new(10 << 20, 65536).unwrap();
        b.set_range(1 << 20..(1 << 20) + 1);
        let bytes = b.encode();
        assert_eq!(&bytes[..8], b"CAIRNBM1");
        assert_eq!(DirtyBitmap::decode(&bytes).unwrap(), b);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 2;
            assert!(DirtyBitmap::decode(&bad).is_err(), "flip at {i}");
        }
        for n in 0..bytes.len() {
            assert!(DirtyBitmap::decode(&bytes[..n]).is_err());
        }
    }
}
