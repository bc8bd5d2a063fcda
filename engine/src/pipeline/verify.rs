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
use crate::external_sort::{
    sort_budget, ExternalSorter, FieldReader, FieldWriter, Record, ScratchDir, Sorted,
};
use crate::id::{ChunkId, PackId, SnapshotId};
use crate::kind::FileKind;
use crate::pipeline::extents::visit_snapshot_chunks;
use crate::pipeline::extents::Store;
use crate::pipeline::worker_threads;
use crate::progress::{CancelToken, NoProgress, Progress};
use crate::store::blob::{BlobCodec, Compression};
use crate::store::format::PACK_HEADER_LEN;
use crate::store::index::Index;
use crate::store::manifest::list_snapshot_ids;
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
    /// The disk byte ranges it breaks in those snapshots (for a finding
    /// about a chunk; adjacent extents merged), in snapshot order.
    pub ranges: Vec<DamagedRange>,
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

/// Bytes of one disk of one snapshot that cannot be restored.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct DamagedRange {
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// The disk's name in it.
    pub disk: String,
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
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
    /// Where the referenced chunks are sorted (`None`: `$CAIRN_SCRATCH_DIR`,
    /// else `$TMPDIR`, else `/var/tmp`).
    pub scratch_dir: Option<std::path::PathBuf>,
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
            scratch_dir: None,
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

    /// Sorts the referenced chunks under `dir` instead of the default.
    pub fn with_scratch_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.scratch_dir = Some(dir.into());
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

/// A referenced chunk's location, sorted by pack and offset (each pack's
/// references come together).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Reference {
    pub(crate) pack: PackId,
    pub(crate) offset: u64,
    pub(crate) length: u32,
    pub(crate) id: ChunkId,
}

impl Record for Reference {
    const LEN: usize = 60;
    fn put(&self, out: &mut [u8]) {
        FieldWriter::new(out)
            .bytes(self.pack.as_bytes())
            .u64(self.offset)
            .u32(self.length)
            .bytes(&self.id.0);
    }
    fn get(b: &[u8]) -> Self {
        let mut r = FieldReader::new(b);
        Reference {
            pack: PackId(r.array()),
            offset: r.u64(),
            length: r.u32(),
            id: ChunkId(r.array()),
        }
    }
}

/// Reads every manifest; unreadable ones are findings. Returns the
/// distinct chunk ids referenced, sorted on scratch disk (memory does not
/// grow with the pool).
fn collect_references(
    pool: &dyn Pool,
    index: &Index,
    scratch: &ScratchDir,
    report: &mut VerifyReport,
    cancel: &CancelToken,
) -> Result<Sorted<ChunkId>> {
    let ids = list_snapshot_ids(pool)?;
    report.snapshots = ids.len();
    let mut chunks = ExternalSorter::new(scratch, "referenced", sort_budget(), true);
    for id in &ids {
        cancel.check()?;
        let mut failed = None;
        let visited = visit_snapshot_chunks(&Store { pool, index }, id, &mut |c| {
            if failed.is_none() {
                if let Err(e) = chunks.push(c.id) {
                    failed = Some(e);
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        match visited {
            Ok(_) => {}
            // Deleted by a prune since the listing: not a finding.
            Err(e) if e.is_not_found() => report.snapshots -= 1,
            Err(e) => report.damage.push(Damage {
                kind: DamageKind::ManifestUnreadable,
                pack: None,
                chunk: None,
                snapshots: vec![*id],
                ranges: Vec::new(),
                detail: e.to_string(),
            }),
        }
    }
    let chunks = chunks.finish()?;
    report.chunks_referenced = chunks.len() as usize;
    Ok(chunks)
}

/// Resolves every referenced chunk through the index; chunks in no segment
/// and packs the pool does not hold are findings. Returns the locations,
/// sorted by pack.
fn locate_chunks(
    index: &Index,
    chunks: &Sorted<ChunkId>,
    listed: &HashSet<PackId>,
    scratch: &ScratchDir,
    report: &mut VerifyReport,
) -> Result<Sorted<Reference>> {
    let mut refs = ExternalSorter::new(scratch, "locations", sort_budget(), false);
    let mut batch = Vec::with_capacity(LOOKUP_BATCH);
    let mut found = Vec::with_capacity(LOOKUP_BATCH);
    let mut it = chunks.iter()?;
    loop {
        batch.clear();
        for c in it.by_ref().take(LOOKUP_BATCH) {
            batch.push(c?);
        }
        if batch.is_empty() {
            break;
        }
        index.lookup_many(&batch, &mut found);
        for (c, loc) in batch.iter().zip(&found) {
            match loc {
                Some(loc) if listed.contains(&loc.pack) => refs.push(Reference {
                    pack: loc.pack,
                    offset: loc.offset,
                    length: loc.length,
                    id: *c,
                })?,
                Some(loc) => report.damage.push(Damage {
                    kind: DamageKind::PackMissing,
                    pack: Some(loc.pack),
                    chunk: Some(*c),
                    snapshots: Vec::new(),
                    ranges: Vec::new(),
                    detail: "the index names this pack but the pool does not hold it".into(),
                }),
                None if index.lookup_including_absent(c).is_some() => {
                    let pack = index.lookup_including_absent(c).map(|l| l.pack);
                    report.damage.push(Damage {
                        kind: DamageKind::PackMissing,
                        pack,
                        chunk: Some(*c),
                        snapshots: Vec::new(),
                        ranges: Vec::new(),
                        detail: "the index names this pack but the pool does not hold it".into(),
                    })
                }
                None => report.damage.push(Damage {
                    kind: DamageKind::ChunkMissing,
                    pack: None,
                    chunk: Some(*c),
                    snapshots: Vec::new(),
                    ranges: Vec::new(),
                    detail: "no index segment or pack holds this chunk".into(),
                }),
            }
        }
    }
    refs.finish()
}

/// Chunks looked up in the index at once.
const LOOKUP_BATCH: usize = 4096;

/// Most bytes of a pack read at once with `read_data`.
const WINDOW: u64 = 8 << 20;

/// Most disk byte ranges recorded per finding (a chunk repeated all over
/// many snapshots, e.g. a common block, would otherwise hold them all).
const MAX_RANGES_PER_FINDING: usize = 1024;

/// Names, for every finding about a chunk, the snapshots that reference
/// it and the byte ranges of their disks it breaks (adjacent extents
/// merged, at most [`MAX_RANGES_PER_FINDING`] each): one more pass over the
/// manifests, holding only the damaged chunks in memory. A manifest that
/// has gone since the first pass is passed over; one that has become
/// unreadable is a finding of its own; any other read error stops the
/// verify (a snapshot must not go unnamed).
fn attribute_damage(
    pool: &dyn Pool,
    index: &Index,
    report: &mut VerifyReport,
    cancel: &CancelToken,
) -> Result<()> {
    let damage = &mut report.damage;
    let mut by_chunk: HashMap<ChunkId, Vec<usize>> = HashMap::new();
    for (i, d) in damage.iter().enumerate() {
        if let Some(c) = d.chunk {
            by_chunk.entry(c).or_default().push(i);
        }
    }
    if by_chunk.is_empty() {
        return Ok(());
    }
    for id in list_snapshot_ids(pool)? {
        cancel.check()?;
        // Per finding: its ranges in this snapshot.
        let mut hits: HashMap<usize, Vec<DamagedRange>> = HashMap::new();
        let visited = visit_snapshot_chunks(&Store { pool, index }, &id, &mut |c| {
            let Some(findings) = by_chunk.get(&c.id) else {
                return;
            };
            for &i in findings {
                let ranges = hits.entry(i).or_default();
                if let Some(last) = ranges.last_mut() {
                    if last.disk == c.disk && last.offset + last.length == c.offset {
                        last.length += c.length;
                        continue;
                    }
                }
                ranges.push(DamagedRange {
                    snapshot: id,
                    disk: c.disk.to_string(),
                    offset: c.offset,
                    length: c.length,
                });
            }
        });
        match visited {
            Ok(_) => {}
            Err(e) if e.is_not_found() => continue,
            Err(e) if e.is_damage() => {
                let known = damage
                    .iter()
                    .any(|d| d.kind == DamageKind::ManifestUnreadable && d.snapshots == [id]);
                if !known {
                    damage.push(Damage {
                        kind: DamageKind::ManifestUnreadable,
                        pack: None,
                        chunk: None,
                        snapshots: vec![id],
                        ranges: Vec::new(),
                        detail: e.to_string(),
                    });
                }
                // A version 2 manifest names the damaged chunks met before
                // its unreadable page (the page itself among them).
            }
            Err(e) => return Err(e),
        }
        let mut hits: Vec<(usize, Vec<DamagedRange>)> = hits.into_iter().collect();
        hits.sort_by_key(|(i, _)| *i);
        for (i, ranges) in hits {
            let d = &mut damage[i];
            d.snapshots.push(id);
            let room = MAX_RANGES_PER_FINDING.saturating_sub(d.ranges.len());
            d.ranges.extend(ranges.into_iter().take(room));
        }
    }
    Ok(())
}

/// Verifies the whole pool. The index is refreshed first, so what other
/// writers stored since it was loaded is not reported as missing. Memory
/// does not grow with the pool: the referenced chunks and their locations
/// are sorted on scratch disk and each pack is checked on its own.
pub(crate) fn run(pool: &dyn Pool, index: &Index, opts: &VerifyOptions) -> Result<VerifyReport> {
    let progress: &dyn Progress = &*opts.progress;
    let mut report = VerifyReport::default();
    let scratch = ScratchDir::new(opts.scratch_dir.as_deref())?;
    // Manifests first, then the index and the packs: a backup writes its
    // packs, then its segment, then its manifest, so everything a manifest
    // listed here names is already in what is listed after it.
    let chunks = collect_references(pool, index, &scratch, &mut report, &opts.cancel)?;
    index.refresh(pool)?;
    let listed: HashSet<PackId> = pool
        .list(FileKind::Pack)?
        .iter()
        .filter_map(|n| PackId::from_hex(n))
        .collect();
    let refs = locate_chunks(index, &chunks, &listed, &scratch, &mut report)?;
    drop(chunks);
    for (segment, detail) in index.damaged_segments() {
        report.damage.push(Damage {
            kind: DamageKind::SegmentDamaged,
            pack: None,
            chunk: None,
            snapshots: Vec::new(),
            ranges: Vec::new(),
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
                ranges: Vec::new(),
                detail,
            });
        }
    }
    // Packs to examine: with `read_data` every pack, otherwise those referenced.
    let mut packs: Vec<PackId> = if opts.read_data {
        listed.iter().copied().collect()
    } else {
        let mut referenced = Vec::new();
        for r in refs.iter()? {
            let r = r?;
            if referenced.last() != Some(&r.pack) {
                referenced.push(r.pack);
            }
        }
        referenced
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
        found: Mutex::new(Vec::new()),
        counters: Mutex::new((0, 0)),
    };
    checker.check_all(&packs, &refs)?;
    if opts.cancel.is_cancelled() {
        return Err(crate::Error::Cancelled);
    }
    let (blobs, bytes) = checker.counters.into_inner();
    report.blobs_read = blobs;
    report.bytes_read = bytes;
    report.damage.extend(checker.found.into_inner());
    attribute_damage(pool, index, &mut report, &opts.cancel)?;
    report.damage.sort_by_key(|d| (d.kind, d.pack, d.chunk));
    Ok(report)
}

/// Examines packs on worker threads.
struct PackChecker<'a> {
    pool: &'a dyn Pool,
    opts: &'a VerifyOptions,
    found: Mutex<Vec<Damage>>,
    /// (blobs read, bytes read)
    counters: Mutex<(u64, u64)>,
}

impl PackChecker<'_> {
    /// Checks `packs` (sorted), each with its references from `refs`
    /// (sorted by pack), on worker threads.
    fn check_all(&self, packs: &[PackId], refs: &Sorted<Reference>) -> Result<()> {
        let threads = worker_threads(self.opts.threads)
            .max(self.pool.preferred_read_concurrency().unwrap_or(0));
        let (tx, rx) = bounded::<(PackId, Vec<Reference>)>(threads * 2);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let rx = rx.clone();
                scope.spawn(move || {
                    let mut codec = BlobCodec::new(Compression::None);
                    let mut buf = Vec::new();
                    for (pack, refs) in rx.iter() {
                        let local = self.check(pack, &refs, &mut codec, &mut buf);
                        self.found.lock().extend(local);
                    }
                });
            }
            drop(rx);
            // Feed the workers; on an error, stop feeding them (dropping
            // the sender) before returning it, or they would wait forever.
            let fed = (|| -> Result<()> {
                let mut it = refs.iter()?.peekable();
                for p in packs {
                    let mut mine = Vec::new();
                    // References of packs not examined (missing ones,
                    // reported already) are passed over.
                    while let Some(r) = it.next_if(|r| r.as_ref().map_or(true, |r| r.pack <= *p)) {
                        let r = r?;
                        if r.pack == *p {
                            mine.push(r);
                        }
                    }
                    if self.opts.cancel.is_cancelled() || tx.send((*p, mine)).is_err() {
                        break;
                    }
                }
                Ok(())
            })();
            drop(tx);
            fed
        })
    }

    /// Every finding about one pack.
    fn check(
        &self,
        pack: PackId,
        refs: &[Reference],
        codec: &mut BlobCodec,
        buf: &mut Vec<u8>,
    ) -> Vec<Damage> {
        let mut local = Vec::new();
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
                for r in refs {
                    if table.get(&r.id) != Some(&(r.offset, r.length)) {
                        local.push(Damage {
                            kind: DamageKind::IndexMismatch,
                            pack: Some(pack),
                            chunk: Some(r.id),
                            snapshots: Vec::new(),
                            ranges: Vec::new(),
                            detail: format!(
                                "index says offset {} length {}, the pack's table disagrees",
                                r.offset, r.length
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
                        snapshots: Vec::new(),
                        ranges: Vec::new(),
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
    fn unreadable(&self, pack: PackId, refs: &[Reference], detail: &str, local: &mut Vec<Damage>) {
        if refs.is_empty() {
            local.push(Damage {
                kind: DamageKind::PackUnreadable,
                pack: Some(pack),
                chunk: None,
                snapshots: Vec::new(),
                ranges: Vec::new(),
                detail: detail.to_string(),
            });
        }
        for r in refs {
            local.push(Damage {
                kind: DamageKind::PackUnreadable,
                pack: Some(pack),
                chunk: Some(r.id),
                snapshots: Vec::new(),
                ranges: Vec::new(),
                detail: detail.to_string(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn references_round_trip_and_sort_by_pack_then_offset() {
        let mut buf = [0u8; 60];
        let mut all = Vec::new();
        for i in 0..=255u8 {
            let r = Reference {
                pack: PackId([255 - i; 16]),
                offset: 0x0102_0304_0506_0708u64.wrapping_mul(i as u64),
                length: 0x1112_1314 ^ i as u32,
                id: ChunkId([i; 32]),
            };
            r.put(&mut buf);
            assert_eq!(Reference::get(&buf), r);
            all.push(r);
        }
        all.sort();
        assert_eq!(all[0].pack, PackId([0; 16]));
    }
}
