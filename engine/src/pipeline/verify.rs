//! Verification. Structural (default): every manifest decodes and every chunk
//! it references resolves through the index to a blob-table entry of a pack
//! that exists. With `read_data`: additionally every blob of every pack is
//! decompressed and re-hashed. Each piece of damage names the pack, the chunk
//! and every snapshot that depends on it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;

use crossbeam_channel::bounded;
use parking_lot::Mutex;

use crate::error::Result;
use crate::id::{ChunkId, PackId, SnapshotId};
use crate::kind::FileKind;
use crate::pipeline::worker_threads;
use crate::progress::{CancelToken, NoProgress, Progress};
use crate::store::blob::{BlobCodec, Compression};
use crate::store::format::PACK_HEADER_LEN;
use crate::store::index::{BlobLocation, Index};
use crate::store::manifest::{list_snapshot_ids, read_snapshot};
use crate::store::pack::{check_pack_header, read_pack_table, PackEntry};
use crate::store::pool::Pool;

/// What kind of damage was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum DamageKind {
    /// A manifest cannot be read or decoded.
    ManifestUnreadable,
    /// A referenced chunk is in no index segment and no pack.
    ChunkMissing,
    /// The index points to a pack that does not exist.
    PackMissing,
    /// A pack's header, table or trailer is damaged (or it cannot be read).
    PackUnreadable,
    /// The index location of a chunk does not match its pack's table.
    IndexMismatch,
    /// A blob fails to decode or does not hash to its id.
    ChunkCorrupt,
    /// An index segment is damaged (its packs are indexed from their own
    /// tables; `repair --index` rewrites the index).
    SegmentDamaged,
}

impl fmt::Display for DamageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DamageKind::ManifestUnreadable => "manifest-unreadable",
            DamageKind::ChunkMissing => "chunk-missing",
            DamageKind::PackMissing => "pack-missing",
            DamageKind::PackUnreadable => "pack-unreadable",
            DamageKind::IndexMismatch => "index-mismatch",
            DamageKind::ChunkCorrupt => "chunk-corrupt",
            DamageKind::SegmentDamaged => "segment-damaged",
        })
    }
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Damage {
    /// What is wrong.
    pub kind: DamageKind,
    /// The pack concerned, if any.
    pub pack: Option<PackId>,
    /// The chunk concerned, if any.
    pub chunk: Option<ChunkId>,
    /// Every snapshot that can no longer be fully restored because of it.
    pub snapshots: Vec<SnapshotId>,
    /// A human-readable detail.
    pub detail: String,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if let Some(p) = &self.pack {
            write!(f, " pack {p}")?;
        }
        if let Some(c) = &self.chunk {
            write!(f, " chunk {c}")?;
        }
        write!(f, ": {}", self.detail)?;
        if !self.snapshots.is_empty() {
            let ids: Vec<String> = self.snapshots.iter().map(|s| s.to_hex()).collect();
            write!(f, " (affects {})", ids.join(", "))?;
        }
        Ok(())
    }
}

/// Verify settings. Start from [`VerifyOptions::default`].
#[derive(Clone)]
#[non_exhaustive]
pub struct VerifyOptions {
    /// Also read, decompress and re-hash every blob of every pack.
    pub read_data: bool,
    /// With `read_data`: read only this share of the packs, in percent
    /// (1 … 100), chosen by [`subset_window`](Self::subset_window); the
    /// others get the table check. `None`: every pack.
    pub read_data_subset: Option<u8>,
    /// Which subset: packs are split into `ceil(100 / percent)` windows by
    /// their id, and window `subset_window mod` that count is read, so
    /// runs with successive windows (a counter, or the day number) read
    /// every pack once per cycle.
    pub subset_window: u64,
    /// Worker threads (`None`: one per CPU).
    pub threads: Option<NonZeroUsize>,
    /// Receives progress (default: none).
    pub progress: Arc<dyn Progress>,
    /// Stops the verify when triggered.
    pub cancel: CancelToken,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            read_data: false,
            read_data_subset: None,
            subset_window: 0,
            threads: None,
            progress: Arc::new(NoProgress),
            cancel: CancelToken::new(),
        }
    }
}

impl fmt::Debug for VerifyOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyOptions")
            .field("read_data", &self.read_data)
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl VerifyOptions {
    crate::pipeline::job_control_setters!();

    /// Also reads every blob.
    pub fn with_read_data(mut self, read_data: bool) -> Self {
        self.read_data = read_data;
        self
    }

    /// Reads only `percent` % of the packs (1 … 100), window `window` of
    /// the rotation (see [`subset_window`](Self::subset_window)); implies
    /// `read_data`.
    pub fn with_read_data_subset(mut self, percent: u8, window: u64) -> crate::Result<Self> {
        if !(1..=100).contains(&percent) {
            return Err(crate::Error::InvalidArgument(format!(
                "read-data subset {percent}% is out of range (1 … 100)"
            )));
        }
        self.read_data = true;
        self.read_data_subset = Some(percent);
        self.subset_window = window;
        Ok(self)
    }

    /// Whether `pack`'s blobs are read in this run.
    fn reads(&self, pack: &PackId) -> bool {
        if !self.read_data {
            return false;
        }
        let Some(percent) = self.read_data_subset else {
            return true;
        };
        // The pack's place in [0, 1) by its (random) id, cut into windows
        // of `percent` % each (the last one may be shorter).
        let windows = 100u64.div_ceil(percent as u64);
        let mut key = [0u8; 8];
        key.copy_from_slice(&pack.0[..8]);
        let place = u64::from_be_bytes(key) as u128 * 100;
        let window = (place >> 64) as u64 / percent as u64;
        window == self.subset_window % windows
    }
}

/// The outcome of a verify run.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Snapshots checked.
    pub snapshots: usize,
    /// Packs examined.
    pub packs: usize,
    /// Distinct chunks the snapshots reference.
    pub chunks_referenced: usize,
    /// Blobs read and re-hashed (with `read_data`).
    pub blobs_read: u64,
    /// Pack bytes read (with `read_data`).
    pub bytes_read: u64,
    /// Every finding, sorted by kind, pack and chunk.
    pub damage: Vec<Damage>,
}

impl VerifyReport {
    /// True when nothing is damaged.
    pub fn is_ok(&self) -> bool {
        self.damage.is_empty()
    }

    /// Snapshots affected by any damage in the report.
    pub fn affected_snapshots(&self) -> BTreeSet<SnapshotId> {
        self.damage
            .iter()
            .flat_map(|d| d.snapshots.iter().copied())
            .collect()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} snapshots, {} packs, {} chunks referenced: ",
            self.snapshots, self.packs, self.chunks_referenced
        )?;
        if self.is_ok() {
            f.write_str("no damage")
        } else {
            write!(
                f,
                "{} findings affecting {} snapshots",
                self.damage.len(),
                self.affected_snapshots().len()
            )
        }
    }
}

/// Which snapshots reference each chunk.
struct References {
    ids: Vec<SnapshotId>,
    /// chunk → indexes into `ids` of the snapshots that reference it
    by_chunk: HashMap<ChunkId, Vec<u32>>,
}

impl References {
    fn snapshots_of(&self, c: &ChunkId) -> Vec<SnapshotId> {
        self.by_chunk
            .get(c)
            .map(|v| {
                v.iter()
                    .filter_map(|&i| self.ids.get(i as usize).copied())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Reads every manifest; unreadable ones are findings.
fn collect_references(pool: &dyn Pool, report: &mut VerifyReport) -> Result<References> {
    let ids = list_snapshot_ids(pool)?;
    report.snapshots = ids.len();
    let mut by_chunk: HashMap<ChunkId, Vec<u32>> = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        match read_snapshot(pool, id) {
            Ok(s) => {
                for c in s.chunk_ids() {
                    let v = by_chunk.entry(c).or_default();
                    if v.last() != Some(&(i as u32)) {
                        v.push(i as u32);
                    }
                }
            }
            Err(e) => report.damage.push(Damage {
                kind: DamageKind::ManifestUnreadable,
                pack: None,
                chunk: None,
                snapshots: vec![*id],
                detail: e.to_string(),
            }),
        }
    }
    report.chunks_referenced = by_chunk.len();
    Ok(References { ids, by_chunk })
}

type ByPack = HashMap<PackId, Vec<(ChunkId, BlobLocation)>>;

/// Resolves every referenced chunk through the index; chunks in no segment
/// and packs the pool does not hold are findings.
fn locate_chunks(
    index: &Index,
    refs: &References,
    listed: &HashSet<PackId>,
    report: &mut VerifyReport,
) -> ByPack {
    let mut by_pack: ByPack = HashMap::new();
    for c in refs.by_chunk.keys() {
        match index.lookup(c) {
            Some(loc) => by_pack.entry(loc.pack).or_default().push((*c, loc)),
            None => report.damage.push(Damage {
                kind: DamageKind::ChunkMissing,
                pack: None,
                chunk: Some(*c),
                snapshots: refs.snapshots_of(c),
                detail: "no index segment or pack holds this chunk".into(),
            }),
        }
    }
    for (pack, chunks) in &by_pack {
        if !listed.contains(pack) {
            for (c, _) in chunks {
                report.damage.push(Damage {
                    kind: DamageKind::PackMissing,
                    pack: Some(*pack),
                    chunk: Some(*c),
                    snapshots: refs.snapshots_of(c),
                    detail: "the index names this pack but the pool does not hold it".into(),
                });
            }
        }
    }
    by_pack
}

/// Most bytes of a pack read at once with `read_data`.
const WINDOW: u64 = 8 << 20;

/// Verifies the whole pool. The index is refreshed first, so what other
/// writers stored since it was loaded is not reported as missing.
pub(crate) fn run(pool: &dyn Pool, index: &Index, opts: &VerifyOptions) -> Result<VerifyReport> {
    let progress: &dyn Progress = &*opts.progress;
    let mut report = VerifyReport::default();
    // Manifests first, then the index and the packs: a backup writes its
    // packs, then its segment, then its manifest, so everything a manifest
    // listed here names is already in what is listed after it.
    let refs = collect_references(pool, &mut report)?;
    index.refresh(pool)?;
    let listed: HashSet<PackId> = pool
        .list(FileKind::Pack)?
        .iter()
        .filter_map(|n| PackId::from_hex(n))
        .collect();
    let by_pack = locate_chunks(index, &refs, &listed, &mut report);
    for (segment, detail) in index.damaged_segments() {
        report.damage.push(Damage {
            kind: DamageKind::SegmentDamaged,
            pack: None,
            chunk: None,
            snapshots: Vec::new(),
            detail: format!("index segment {segment}: {detail}"),
        });
    }
    // Packs no segment covers whose table the index could not read.
    for (pack, detail) in index.unreadable_packs() {
        if !opts.read_data && listed.contains(&pack) {
            report.damage.push(Damage {
                kind: DamageKind::PackUnreadable,
                pack: Some(pack),
                chunk: None,
                snapshots: Vec::new(),
                detail,
            });
        }
    }
    // Packs to examine: with `read_data` every pack, otherwise those referenced.
    let mut packs: Vec<PackId> = if opts.read_data {
        listed.iter().copied().collect()
    } else {
        by_pack
            .keys()
            .filter(|p| listed.contains(p))
            .copied()
            .collect()
    };
    packs.sort();
    report.packs = packs.len();
    let total = if opts.read_data {
        packs
            .iter()
            .filter(|p| opts.reads(p))
            .map(|p| pool.size(FileKind::Pack, &p.to_hex()).unwrap_or(0))
            .sum()
    } else {
        0
    };
    progress.start(total);
    let checker = PackChecker {
        pool,
        opts,
        refs: &refs,
        by_pack: &by_pack,
        found: Mutex::new(Vec::new()),
        counters: Mutex::new((0, 0)),
    };
    checker.check_all(&packs);
    if opts.cancel.is_cancelled() {
        return Err(crate::Error::Cancelled);
    }
    let (blobs, bytes) = checker.counters.into_inner();
    report.blobs_read = blobs;
    report.bytes_read = bytes;
    report.damage.extend(checker.found.into_inner());
    report.damage.sort_by_key(|d| (d.kind, d.pack, d.chunk));
    Ok(report)
}

/// Examines packs on worker threads.
struct PackChecker<'a> {
    pool: &'a dyn Pool,
    opts: &'a VerifyOptions,
    refs: &'a References,
    by_pack: &'a ByPack,
    found: Mutex<Vec<Damage>>,
    /// (blobs read, bytes read)
    counters: Mutex<(u64, u64)>,
}

impl PackChecker<'_> {
    fn check_all(&self, packs: &[PackId]) {
        let threads = worker_threads(self.opts.threads)
            .max(self.pool.preferred_read_concurrency().unwrap_or(0));
        let (tx, rx) = bounded::<PackId>(threads * 2);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let rx = rx.clone();
                scope.spawn(move || {
                    let mut codec = BlobCodec::new(Compression::None);
                    let mut buf = Vec::new();
                    for pack in rx.iter() {
                        let local = self.check(pack, &mut codec, &mut buf);
                        self.found.lock().extend(local);
                    }
                });
            }
            drop(rx);
            for p in packs {
                if self.opts.cancel.is_cancelled() || tx.send(*p).is_err() {
                    break;
                }
            }
            drop(tx);
        });
    }

    /// Every finding about one pack.
    fn check(&self, pack: PackId, codec: &mut BlobCodec, buf: &mut Vec<u8>) -> Vec<Damage> {
        let mut local = Vec::new();
        let refs = self
            .by_pack
            .get(&pack)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let entries = if self.opts.reads(&pack) {
            self.read_blobs(pack, codec, buf, &mut local)
        } else {
            read_pack_table(self.pool, &pack).map_err(|e| e.to_string())
        };
        match entries {
            Err(detail) => self.unreadable(pack, refs, &detail, &mut local),
            Ok(entries) => {
                let table: HashMap<ChunkId, (u64, u32)> = entries
                    .iter()
                    .map(|e| (e.id, (e.offset, e.length)))
                    .collect();
                for (c, loc) in refs {
                    if table.get(c) != Some(&(loc.offset, loc.length)) {
                        local.push(Damage {
                            kind: DamageKind::IndexMismatch,
                            pack: Some(pack),
                            chunk: Some(*c),
                            snapshots: self.refs.snapshots_of(c),
                            detail: format!(
                                "index says offset {} length {}, the pack's table disagrees",
                                loc.offset, loc.length
                            ),
                        });
                    }
                }
            }
        }
        local
    }

    /// Reads a pack — its header, its table, then its blobs in windows of
    /// at most [`WINDOW`] bytes, so memory does not depend on pack size —
    /// and re-hashes every blob; corrupt blobs are findings. `Err`: the pack
    /// itself cannot be read or parsed.
    fn read_blobs(
        &self,
        pack: PackId,
        codec: &mut BlobCodec,
        buf: &mut Vec<u8>,
        local: &mut Vec<Damage>,
    ) -> std::result::Result<Vec<PackEntry>, String> {
        let name = pack.to_hex();
        let header = self
            .pool
            .read_range(FileKind::Pack, &name, 0, PACK_HEADER_LEN)
            .map_err(|e| e.to_string())?;
        check_pack_header(&header).map_err(|e| format!("pack {pack}: {e}"))?;
        let entries = read_pack_table(self.pool, &pack).map_err(|e| e.to_string())?;
        let mut i = 0;
        while i < entries.len() {
            // A window of blobs lying back to back.
            let start = entries[i].offset;
            let mut end = start + entries[i].length as u64;
            let mut j = i + 1;
            while j < entries.len()
                && entries[j].offset == end
                && end + entries[j].length as u64 - start <= WINDOW
            {
                end += entries[j].length as u64;
                j += 1;
            }
            let bytes = self
                .pool
                .read_range(FileKind::Pack, &name, start, (end - start) as usize)
                .map_err(|e| e.to_string())?;
            self.opts.progress.advance(bytes.len() as u64);
            {
                let mut c = self.counters.lock();
                c.0 += (j - i) as u64;
                c.1 += bytes.len() as u64;
            }
            for e in &entries[i..j] {
                let at = (e.offset - start) as usize;
                let blob = bytes.get(at..at + e.length as usize).unwrap_or_default();
                if let Err(err) = codec.decode_verified(blob, &e.id, buf) {
                    local.push(Damage {
                        kind: DamageKind::ChunkCorrupt,
                        pack: Some(pack),
                        chunk: Some(e.id),
                        snapshots: self.refs.snapshots_of(&e.id),
                        detail: format!("blob at offset {}: {err}", e.offset),
                    });
                }
            }
            i = j;
        }
        Ok(entries)
    }

    /// A pack that cannot be read: one finding per chunk needed from it (or
    /// one for the pack when nothing needs it).
    fn unreadable(
        &self,
        pack: PackId,
        refs: &[(ChunkId, BlobLocation)],
        detail: &str,
        local: &mut Vec<Damage>,
    ) {
        if refs.is_empty() {
            local.push(Damage {
                kind: DamageKind::PackUnreadable,
                pack: Some(pack),
                chunk: None,
                snapshots: Vec::new(),
                detail: detail.to_string(),
            });
        }
        for (c, _) in refs {
            local.push(Damage {
                kind: DamageKind::PackUnreadable,
                pack: Some(pack),
                chunk: Some(*c),
                snapshots: self.refs.snapshots_of(c),
                detail: detail.to_string(),
            });
        }
    }
}
