//! The backup pipeline: disk sources → chunks → ids → index lookup → zstd for
//! new chunks only → packs → index segment → manifest (written last).
//!
//! Threads and bounded queues:
//! ```text
//! reader ──(work, bounded)──► N workers ──(done, bounded)──► assembler (caller's thread)
//!    ▲                                                            │
//!    └──────────── free buffer pairs (fixed count) ◄──────────────┘
//! ```
//! The reader reads data extents in batches into one of a fixed number of
//! buffer pairs, skipping holes; workers cut, zero-check, hash, dedup and
//! compress; the assembler restores order, appends new blobs to the open pack,
//! seals packs and builds the manifest. Memory is bounded by the number of
//! buffer pairs, not by disk size (plus the manifest: ~56 B per chunk).

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::Read;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;

use crate::cbt::ChangedBlocks;
use crate::chunker::ChunkingParams;
use crate::codec::{BlobCodec, Compression};
use crate::error::{Error, Result};
use crate::id::PackId;
use crate::id::{ChunkId, IdScheme, SnapshotId};
use crate::index::{Index, SegmentBuilder};
use crate::manifest::{DiskManifest, Snapshot, MAX_STRING};
use crate::pack::{PackEntry, PackWriter};
use crate::pool::{FileKind, Pool};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::source::{align_extents, DiskSource, MappedDisk};

/// Seal a pack once this much chunk data (before compression) went into it.
pub const DEFAULT_PACK_MAX_INPUT: u64 = 64 << 20;
/// Seal a pack once it holds this many stored bytes.
pub const DEFAULT_PACK_TARGET: u64 = 32 << 20;
/// Flush an index segment once the backup has this many unflushed entries.
pub const SEGMENT_FLUSH_ENTRIES: usize = 1 << 18;

/// What to read for one disk.
pub enum DiskInput {
    /// A random-access disk image (holes skipped).
    Image(Box<dyn DiskSource>),
    /// A stream of unknown size, read once, start to end.
    Stream(Box<dyn Read + Send>),
    /// An incremental: only `changed.dirty` is read from the source; every
    /// other range reuses the parent snapshot's extents.
    Incremental {
        source: Box<dyn DiskSource>,
        changed: ChangedBlocks,
    },
}

impl std::fmt::Debug for DiskInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskInput::Image(s) => write!(f, "Image({})", s.describe()),
            DiskInput::Stream(_) => f.write_str("Stream"),
            DiskInput::Incremental { source, .. } => {
                write!(f, "Incremental({})", source.describe())
            }
        }
    }
}

/// A named disk to back up.
#[derive(Debug)]
pub struct BackupDisk {
    pub name: String,
    pub input: DiskInput,
    /// Recorded in the disk's manifest entry.
    pub properties: BTreeMap<String, String>,
}

/// Settings of one backup run.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub vm: String,
    pub chunking: ChunkingParams,
    pub compression: Compression,
    /// Worker threads (0 = one per CPU).
    pub threads: usize,
    /// Bytes read from a source per batch (rounded up to a whole number of chunks).
    pub batch_size: usize,
    pub pack_max_input: u64,
    pub pack_target: u64,
    /// Write an index segment mid-backup once this many new entries are
    /// pending, bounding memory on huge disks.
    pub segment_flush_entries: usize,
    /// Recorded in the manifest.
    pub properties: BTreeMap<String, String>,
    /// The snapshot an incremental builds on (recorded as its parent).
    pub parent: Option<SnapshotId>,
}

impl BackupOptions {
    pub fn new(vm: impl Into<String>) -> Self {
        BackupOptions {
            vm: vm.into(),
            chunking: ChunkingParams::default(),
            compression: Compression::default(),
            threads: 0,
            batch_size: 4 << 20,
            pack_max_input: DEFAULT_PACK_MAX_INPUT,
            pack_target: DEFAULT_PACK_TARGET,
            segment_flush_entries: SEGMENT_FLUSH_ENTRIES,
            properties: BTreeMap::new(),
            parent: None,
        }
    }
}

/// What a backup did.
#[derive(Clone, Debug, PartialEq)]
pub struct BackupStats {
    pub snapshot: SnapshotId,
    pub mode: String,
    /// Sum of the disks' logical sizes.
    pub bytes_logical: u64,
    /// Bytes read from the sources (holes are not read).
    pub bytes_read: u64,
    /// Dirty bytes of incremental disks, rounded out to the chunk grid.
    pub bytes_dirty: u64,
    /// Bytes added to the pool: packs, index segments and the manifest.
    pub bytes_new: u64,
    /// Chunk references in the manifest (zero runs excluded).
    pub chunks_total: u64,
    /// Chunks stored by this backup.
    pub chunks_new: u64,
    /// Plaintext bytes of the new chunks.
    pub bytes_new_raw: u64,
    pub packs_written: u64,
    pub seconds: f64,
    /// Disks whose changed-block tracking was asked for but not trusted,
    /// with the reason (their [`PROP_FALLBACK`](crate::cbt::PROP_FALLBACK)
    /// property); they were read in full against the parent.
    pub cbt_fallback: BTreeMap<String, String>,
}

/// Checks a disk name: non-empty, no path separators, no `.`/`..`, no NUL.
pub fn validate_disk_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\0'])
        || name.len() > MAX_STRING
    {
        return Err(Error::InvalidArgument(format!(
            "disk name {name:?} must be a plain file name (no '/', not . or ..)"
        )));
    }
    Ok(())
}

/// Hasher for chunk ids: they are BLAKE3 outputs, so 8 of their bytes are
/// already a uniform hash.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8).take(1) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }
    fn write_usize(&mut self, _: usize) {}
}

type IdSet = HashSet<ChunkId, BuildHasherDefault<IdHasher>>;

/// Chunks claimed for storage by this backup, sharded to keep workers apart.
struct Claims {
    shards: Vec<Mutex<IdSet>>,
}

impl Claims {
    fn new() -> Self {
        Claims {
            shards: (0..64).map(|_| Mutex::new(IdSet::default())).collect(),
        }
    }
    /// True if this caller is the first to claim `id`.
    fn claim(&self, id: &ChunkId) -> bool {
        self.shards[(id.0[1] & 63) as usize].lock().insert(*id)
    }
    /// Forgets claims whose chunks are now in the index.
    fn release(&self, ids: &[ChunkId]) {
        for id in ids {
            self.shards[(id.0[1] & 63) as usize].lock().remove(id);
        }
    }
}

/// One batch of input.
struct Batch {
    seq: u64,
    disk: usize,
    body: BatchBody,
}

enum BatchBody {
    /// Extents that were not read: zero runs (holes) or, for an incremental,
    /// the parent's extents, as (length, chunk) pairs.
    Reuse(Vec<(u64, Option<ChunkId>)>),
    /// Bytes read, with the chunk lengths that tile them. The bytes are in
    /// `buffers.input`, or, for a memory-mapped source, in `mapped`.
    Data {
        buffers: Buffers,
        cuts: Vec<u32>,
        bytes_read: u64,
        mapped: Option<(MappedDisk, Range<usize>)>,
    },
}

/// Input and output buffers, recycled through the free list.
struct Buffers {
    input: Vec<u8>,
    output: Vec<u8>,
}

/// A processed batch.
struct Done {
    seq: u64,
    disk: usize,
    body: DoneBody,
}

enum DoneBody {
    Reuse(Vec<(u64, Option<ChunkId>)>),
    Data {
        buffers: Buffers,
        /// The mapped range the batch came from, released once assembled.
        mapped: Option<(MappedDisk, Range<usize>)>,
        /// (length, chunk id or zero)
        chunks: Vec<(u32, Option<ChunkId>)>,
        /// (id, raw length, range in `buffers.output`)
        new_blobs: Vec<(ChunkId, u32, Range<usize>)>,
        bytes_read: u64,
    },
}

/// First error of any pipeline thread, plus an abort flag.
/// Shared by the backup and restore pipelines.
pub(crate) struct Failure {
    abort: AtomicBool,
    error: Mutex<Option<Error>>,
}

impl Failure {
    pub(crate) fn new() -> Self {
        Failure {
            abort: AtomicBool::new(false),
            error: Mutex::new(None),
        }
    }
    /// Records `e` unless an earlier error is recorded, and aborts.
    pub(crate) fn set(&self, e: Error) {
        self.abort.store(true, Ordering::SeqCst);
        let mut slot = self.error.lock();
        if slot.is_none() {
            *slot = Some(e);
        }
    }
    pub(crate) fn aborted(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }
    pub(crate) fn take(&self) -> Option<Error> {
        self.error.lock().take()
    }
}

/// True if every byte is zero. ORs 64-byte blocks so the compiler vectorises
/// it, stopping at the first non-zero block.
pub(crate) fn is_zero(data: &[u8]) -> bool {
    data.chunks(64)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Runs a backup of `disks` into `repo` and writes its manifest.
pub fn backup(
    repo: &Repository,
    disks: Vec<BackupDisk>,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupStats> {
    let started = Instant::now();
    opts.chunking.validate().map_err(Error::InvalidArgument)?;
    opts.compression
        .validate()
        .map_err(Error::InvalidArgument)?;
    if opts.vm.is_empty() || opts.vm.len() > MAX_STRING {
        return Err(Error::InvalidArgument(
            "VM name must be 1–4096 bytes".into(),
        ));
    }
    if disks.is_empty() {
        return Err(Error::InvalidArgument(
            "a backup needs at least one disk".into(),
        ));
    }
    let mut seen = HashSet::new();
    for d in &disks {
        validate_disk_name(&d.name)?;
        if !seen.insert(d.name.clone()) {
            return Err(Error::InvalidArgument(format!(
                "disk name {:?} used twice",
                d.name
            )));
        }
    }
    // Incrementals: check every parent before reading anything.
    let mut bytes_dirty = 0u64;
    let mut incremental = false;
    for d in &disks {
        if let DiskInput::Incremental { source, changed } = &d.input {
            changed.check(&d.name, source.size(), opts.chunking)?;
            if opts.parent.is_none() {
                return Err(Error::InvalidArgument(format!(
                    "disk {:?} is incremental but no parent snapshot is set",
                    d.name
                )));
            }
            incremental = true;
            let grid = opts.chunking.max_chunk() as u64;
            bytes_dirty += align_extents(&changed.dirty, grid, source.size())
                .iter()
                .map(|r| r.end - r.start)
                .sum::<u64>();
        }
    }
    let mode = if incremental { "cbt" } else { "full" };
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    let max_chunk = opts.chunking.max_chunk();
    // A batch holds whole chunks: at least two maximal ones.
    let batch_size = opts.batch_size.max(2 * max_chunk).div_ceil(max_chunk) * max_chunk;
    let buffer_pairs = threads + 3;

    let total: u64 = disks
        .iter()
        .map(|d| match &d.input {
            DiskInput::Image(s) | DiskInput::Incremental { source: s, .. } => s.size(),
            DiskInput::Stream(_) => 0,
        })
        .sum();
    progress.start(total);

    let pool: &dyn Pool = &**repo.pool();
    let index: &Index = repo.index();
    let claims = Claims::new();
    let failure = Failure::new();

    let (free_tx, free_rx) = bounded::<Buffers>(buffer_pairs);
    for _ in 0..buffer_pairs {
        let _ = free_tx.send(Buffers {
            input: Vec::with_capacity(batch_size),
            output: Vec::new(),
        });
    }
    let (work_tx, work_rx) = bounded::<Batch>(buffer_pairs);
    let (done_tx, done_rx) = bounded::<Done>(buffer_pairs);

    let disk_meta: Vec<(String, BTreeMap<String, String>, Option<u64>)> = disks
        .iter()
        .map(|d| {
            let size = match &d.input {
                DiskInput::Image(s) | DiskInput::Incremental { source: s, .. } => Some(s.size()),
                DiskInput::Stream(_) => None,
            };
            (d.name.clone(), d.properties.clone(), size)
        })
        .collect();

    let assembled = std::thread::scope(|scope| {
        // Reader.
        {
            let failure = &failure;
            let (free_rx, free_tx) = (free_rx.clone(), free_tx.clone());
            let chunking = opts.chunking;
            scope.spawn(move || {
                let feed = Feed {
                    chunking,
                    batch_size,
                    disk: 0,
                    seq: 0,
                    free_rx: &free_rx,
                    free_tx: &free_tx,
                    work_tx: &work_tx,
                    failure,
                };
                if let Err(e) = read_disks(disks, feed) {
                    failure.set(e);
                }
            });
        }
        // Workers.
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            let (claims, failure) = (&claims, &failure);
            let compression = opts.compression;
            scope.spawn(move || {
                if let Err(e) = work(&work_rx, &done_tx, index, claims, compression) {
                    failure.set(e);
                }
            });
        }
        drop(work_rx);
        drop(done_tx);
        let result = assemble(
            pool, index, &claims, &failure, opts, done_rx, &free_tx, disk_meta, progress,
        );
        if result.is_err() {
            // Stop the reader; workers stop when their channels close.
            failure.abort.store(true, Ordering::SeqCst);
        }
        result
    });

    let (mut manifest_disks, mut stats, segment) = match (assembled, failure.take()) {
        (_, Some(e)) => return Err(e),
        (Err(e), None) => return Err(e),
        (Ok(v), None) => v,
    };
    // Index segment for everything this backup stored, plus any packs an
    // interrupted backup left uncovered.
    let mut segment = segment;
    for pack in index.take_uncovered_packs() {
        let entries = crate::pack::read_pack_table(pool, &pack)?;
        segment.add_entries(pack, &entries);
    }
    if segment.pack_count() > 0 {
        let (_, seg, len) = segment.write(pool)?;
        stats.bytes_new += len;
        // Keep this repository handle's view current for later operations.
        index.push(seg);
    }
    for d in &mut manifest_disks {
        d.extents.shrink_to_fit();
        if let Some(reason) = d.properties.get(crate::cbt::PROP_FALLBACK) {
            stats.cbt_fallback.insert(d.name.clone(), reason.clone());
        }
    }
    let snapshot = Snapshot {
        time: SystemTime::now(),
        vm: opts.vm.clone(),
        mode: mode.into(),
        parent: opts.parent,
        id_scheme: IdScheme::Blake3,
        chunking: opts.chunking,
        compression: opts.compression,
        properties: opts.properties.clone(),
        disks: manifest_disks,
    };
    snapshot.validate().map_err(Error::InvalidArgument)?;
    let encoded = snapshot.encode();
    let id = SnapshotId::of_manifest(&encoded);
    pool.write(FileKind::Snapshot, &id.to_hex(), &encoded)?;
    stats.bytes_new += encoded.len() as u64;
    stats.snapshot = id;
    stats.mode = mode.into();
    stats.bytes_dirty = bytes_dirty;
    stats.bytes_logical = snapshot.bytes_logical();
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// The reader's side of the pipeline: numbers batches, hands them to the
/// workers, and takes free buffer pairs (noticing an abort while waiting).
struct Feed<'a> {
    chunking: ChunkingParams,
    batch_size: usize,
    disk: usize,
    seq: u64,
    free_rx: &'a Receiver<Buffers>,
    free_tx: &'a Sender<Buffers>,
    work_tx: &'a Sender<Batch>,
    failure: &'a Failure,
}

impl Feed<'_> {
    /// Sends a batch of the current disk; `false` when the pipeline shut down.
    fn send(&mut self, body: BatchBody) -> bool {
        let batch = Batch {
            seq: self.seq,
            disk: self.disk,
            body,
        };
        self.seq += 1;
        self.work_tx.send(batch).is_ok()
    }

    /// Waits for a free buffer pair; `None` on abort (the assembler failed
    /// and will not hand buffers back) or shutdown.
    fn buffers(&self) -> Option<Buffers> {
        loop {
            if self.failure.aborted() {
                return None;
            }
            match self
                .free_rx
                .recv_timeout(std::time::Duration::from_millis(50))
            {
                Ok(b) => return Some(b),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(_) => return None,
            }
        }
    }
}

/// Reader thread: turns disks into batches.
fn read_disks(disks: Vec<BackupDisk>, mut feed: Feed<'_>) -> Result<()> {
    for (disk, d) in disks.into_iter().enumerate() {
        feed.disk = disk;
        let running = match d.input {
            DiskInput::Image(src) => read_image(&mut feed, &*src, None)?,
            DiskInput::Incremental { source, changed } => {
                read_image(&mut feed, &*source, Some(&changed))?
            }
            DiskInput::Stream(mut r) => {
                let name = d.name;
                let mut reader = |buf: &mut [u8]| -> Result<usize> {
                    loop {
                        match r.read(buf) {
                            Ok(n) => return Ok(n),
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                return Err(Error::io(
                                    format!("reading stream for disk {name:?}"),
                                    e,
                                ))
                            }
                        }
                    }
                };
                chunk_stream(&mut feed, &mut reader)?
            }
        };
        if !running {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads one disk image: its data extents (or, for an incremental, its dirty
/// ranges), aligned to the chunk grid. Ranges not read become holes, or, for
/// an incremental, the parent's extents. Returns `Ok(false)` on shutdown.
fn read_image(
    feed: &mut Feed<'_>,
    src: &dyn DiskSource,
    changed: Option<&ChangedBlocks>,
) -> Result<bool> {
    // Emits a range not read: a hole, or the parent's extents in pieces.
    let gap = |feed: &mut Feed<'_>, range: Range<u64>| -> Result<bool> {
        let pieces = match changed {
            None => vec![vec![(range.end - range.start, None)]],
            Some(c) => c.reuse(range)?.chunks(1 << 16).map(<[_]>::to_vec).collect(),
        };
        Ok(pieces
            .into_iter()
            .all(|piece| feed.send(BatchBody::Reuse(piece))))
    };
    let size = src.size();
    let extents = match changed {
        Some(c) => {
            let mut dirty = c.dirty.clone();
            dirty.sort_by_key(|r| r.start);
            dirty
        }
        None => src.data_extents()?,
    };
    let grid = match feed.chunking {
        ChunkingParams::Fixed { size: grid } => grid as u64,
        _ => 1,
    };
    let map = src.mapped();
    let mut pos = 0u64;
    for region in align_extents(&extents, grid, size) {
        if region.start > pos && !gap(feed, pos..region.start)? {
            return Ok(false);
        }
        let running = match &map {
            Some(map) => chunk_mapped(feed, map, region.clone()),
            None => {
                let mut offset = region.start;
                let mut reader = |buf: &mut [u8]| -> Result<usize> {
                    let n = buf.len().min((region.end - offset) as usize);
                    src.read_at(offset, &mut buf[..n])?;
                    offset += n as u64;
                    Ok(n)
                };
                chunk_stream(feed, &mut reader)?
            }
        };
        if !running {
            return Ok(false);
        }
        pos = region.end;
    }
    if size > pos && !gap(feed, pos..size)? {
        return Ok(false);
    }
    Ok(true)
}

/// Reads one region (or stream) to its end, cutting it into batches of whole
/// chunks. Returns `Ok(false)` when the pipeline shut down.
fn chunk_stream(
    feed: &mut Feed<'_>,
    read: &mut dyn FnMut(&mut [u8]) -> Result<usize>,
) -> Result<bool> {
    let (chunking, batch_size) = (feed.chunking, feed.batch_size);
    let mut carry: Vec<u8> = Vec::new();
    let mut eof = false;
    while !eof || !carry.is_empty() {
        let Some(mut buffers) = feed.buffers() else {
            return Ok(false);
        };
        // The input buffer keeps its full length between batches (zeroed
        // once), so refilling it costs no memset.
        let input = &mut buffers.input;
        if input.len() < batch_size {
            input.resize(batch_size, 0);
        }
        input[..carry.len()].copy_from_slice(&carry);
        let mut filled = carry.len();
        carry.clear();
        let mut bytes_read = 0u64;
        while !eof && filled < batch_size {
            let n = read(&mut input[filled..batch_size])?;
            filled += n;
            bytes_read += n as u64;
            if n == 0 {
                eof = true;
            }
        }
        let mut cuts = Vec::with_capacity(filled / 4096 + 1);
        let mut pos = 0usize;
        while let Some(c) = chunking.next_cut(&input[pos..filled], eof) {
            cuts.push(c as u32);
            pos += c;
        }
        carry.extend_from_slice(&input[pos..filled]);
        if cuts.is_empty() {
            // Nothing to send (the region ended exactly at the previous
            // batch): hand the buffers back for the next batch.
            let _ = feed.free_tx.send(buffers);
            continue;
        }
        let body = BatchBody::Data {
            buffers,
            cuts,
            bytes_read,
            mapped: None,
        };
        if !feed.send(body) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Cuts one region of a memory-mapped disk into batches without copying:
/// batches refer to the mapping. Returns `false` when the pipeline shut down.
fn chunk_mapped(feed: &mut Feed<'_>, map: &MappedDisk, region: Range<u64>) -> bool {
    let bytes: &[u8] = map.bytes();
    let end = (region.end as usize).min(bytes.len());
    let mut pos = region.start as usize;
    let max_chunk = feed.chunking.max_chunk();
    while pos < end {
        let Some(buffers) = feed.buffers() else {
            return false;
        };
        let start = pos;
        let mut cuts = Vec::with_capacity(feed.batch_size / 4096 + 1);
        // The whole region is available, so every cut is final.
        while pos < end && pos - start + max_chunk <= feed.batch_size {
            match feed.chunking.next_cut(&bytes[pos..end], true) {
                Some(c) => {
                    cuts.push(c as u32);
                    pos += c;
                }
                None => break,
            }
        }
        let body = BatchBody::Data {
            buffers,
            cuts,
            bytes_read: (pos - start) as u64,
            mapped: Some((map.clone(), start..pos)),
        };
        if !feed.send(body) {
            return false;
        }
    }
    true
}

/// Worker thread: zero check, hash, dedup, compress.
fn work(
    work_rx: &Receiver<Batch>,
    done_tx: &Sender<Done>,
    index: &Index,
    claims: &Claims,
    compression: Compression,
) -> Result<()> {
    let mut codec = BlobCodec::new(compression);
    let mut ids: Vec<ChunkId> = Vec::new();
    let mut found = Vec::new();
    for batch in work_rx.iter() {
        let body = match batch.body {
            BatchBody::Reuse(v) => DoneBody::Reuse(v),
            BatchBody::Data {
                mut buffers,
                cuts,
                bytes_read,
                mapped,
            } => {
                let input: &[u8] = match &mapped {
                    Some((map, range)) => map.bytes().get(range.clone()).unwrap_or_default(),
                    None => &buffers.input,
                };
                // Pass 1: zero check and hash every chunk (data hot in cache).
                let mut chunks = Vec::with_capacity(cuts.len());
                let mut pos = 0usize;
                ids.clear();
                for len in cuts {
                    let data = &input[pos..pos + len as usize];
                    pos += len as usize;
                    if is_zero(data) {
                        chunks.push((len, None));
                    } else {
                        let id = ChunkId::of(data);
                        ids.push(id);
                        chunks.push((len, Some(id)));
                    }
                }
                // Pass 2: one batched index lookup (overlapping memory accesses).
                index.lookup_many(&ids, &mut found);
                // Pass 3: compress chunks that are new and claimed by us.
                let mut new_blobs = Vec::new();
                buffers.output.clear();
                let mut pos = 0usize;
                let mut k = 0usize;
                for &(len, id) in &chunks {
                    let start_in = pos;
                    pos += len as usize;
                    let Some(id) = id else { continue };
                    let known = found.get(k).is_some_and(Option::is_some);
                    k += 1;
                    if known || !claims.claim(&id) {
                        continue;
                    }
                    let data = &input[start_in..pos];
                    let start = buffers.output.len();
                    codec
                        .encode_into(data, &mut buffers.output)
                        .map_err(|e| Error::io("compressing a chunk", e))?;
                    new_blobs.push((id, len, start..buffers.output.len()));
                }
                DoneBody::Data {
                    buffers,
                    mapped,
                    chunks,
                    new_blobs,
                    bytes_read,
                }
            }
        };
        if done_tx
            .send(Done {
                seq: batch.seq,
                disk: batch.disk,
                body,
            })
            .is_err()
        {
            break;
        }
    }
    Ok(())
}

/// Assembler: restores order, writes packs, builds the manifest.
#[allow(clippy::too_many_arguments)]
fn assemble(
    pool: &dyn Pool,
    index: &Index,
    claims: &Claims,
    failure: &Failure,
    opts: &BackupOptions,
    done_rx: Receiver<Done>,
    free_tx: &Sender<Buffers>,
    disk_meta: Vec<(String, BTreeMap<String, String>, Option<u64>)>,
    progress: &dyn Progress,
) -> Result<(Vec<DiskManifest>, BackupStats, SegmentBuilder)> {
    let mut disks: Vec<DiskManifest> = disk_meta
        .iter()
        .map(|(name, props, _)| {
            let mut d = DiskManifest::new(name.clone());
            d.properties = props.clone();
            d
        })
        .collect();
    let mut stats = BackupStats {
        snapshot: SnapshotId([0; 32]),
        mode: "full".into(),
        bytes_logical: 0,
        bytes_read: 0,
        bytes_dirty: 0,
        cbt_fallback: BTreeMap::new(),
        bytes_new: 0,
        chunks_total: 0,
        chunks_new: 0,
        bytes_new_raw: 0,
        packs_written: 0,
        seconds: 0.0,
    };
    let mut segment = SegmentBuilder::new();
    let mut pack: Option<PackWriter> = None;
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;

    // Sealing (table, fsync, link, directory fsync) runs on its own thread so
    // the pipeline keeps chunking while a pack is made durable. At most one
    // full pack waits while another seals.
    let (seal_tx, seal_rx) = bounded::<PackWriter>(1);
    let (sealed_tx, sealed_rx) =
        crossbeam_channel::unbounded::<Result<(PackId, Vec<PackEntry>, u64)>>();
    let outcome: Result<()> = std::thread::scope(|scope| {
        scope.spawn(move || {
            for p in seal_rx.iter() {
                let result = p.finish();
                let failed = result.is_err();
                let _ = sealed_tx.send(result);
                if failed {
                    break;
                }
            }
        });
        // Takes finished seals into the pending segment; flushes it when large.
        let absorb =
            |segment: &mut SegmentBuilder, stats: &mut BackupStats, wait: bool| -> Result<()> {
                loop {
                    let next = if wait {
                        match sealed_rx.recv() {
                            Ok(r) => r,
                            Err(_) => break,
                        }
                    } else {
                        match sealed_rx.try_recv() {
                            Ok(r) => r,
                            Err(_) => break,
                        }
                    };
                    let (id, entries, size) = next?;
                    segment.add_entries(id, &entries);
                    stats.bytes_new += size;
                    stats.packs_written += 1;
                }
                if segment.len() >= opts.segment_flush_entries {
                    let full = std::mem::take(segment);
                    let flushed: Vec<ChunkId> = full.ids().collect();
                    let (_, seg, len) = full.write(pool)?;
                    stats.bytes_new += len;
                    index.push(seg);
                    // These chunks are now found by index lookups.
                    claims.release(&flushed);
                }
                Ok(())
            };
        let mut seal_tx = Some(seal_tx);
        let seal = |p: PackWriter| -> Result<()> {
            match seal_tx.as_ref().map(|tx| tx.send(p)) {
                Some(Ok(())) => Ok(()),
                // The sealer stopped on an error: it is in `sealed_rx`.
                _ => Err(Error::Internal("pack sealer stopped".into())),
            }
        };

        // On a reader or worker failure the assembler still consumes every
        // batch already processed, in order, and seals it: the work is
        // durable and the next backup reuses it (its packs are indexed from
        // their tables).
        let mut run = || -> Result<()> {
            for done in done_rx.iter() {
                pending.insert(done.seq, done);
                while let Some(done) = pending.remove(&next) {
                    next += 1;
                    let disk = disks
                        .get_mut(done.disk)
                        .ok_or_else(|| Error::Internal("batch for unknown disk".into()))?;
                    match done.body {
                        DoneBody::Reuse(extents) => {
                            for (len, id) in extents {
                                disk.push(len, id);
                                progress.advance(len);
                                if id.is_some() {
                                    stats.chunks_total += 1;
                                }
                            }
                        }
                        DoneBody::Data {
                            buffers,
                            mapped,
                            chunks,
                            new_blobs,
                            bytes_read,
                        } => {
                            // Keep the resident set flat on mapped sources.
                            if let Some((map, range)) = mapped {
                                map.release(range);
                            }
                            stats.bytes_read += bytes_read;
                            for (id, raw_len, range) in new_blobs {
                                let writer = match &mut pack {
                                    Some(p) => p,
                                    None => pack.insert(PackWriter::create(pool)?),
                                };
                                writer.add(id, raw_len, &buffers.output[range])?;
                                stats.chunks_new += 1;
                                stats.bytes_new_raw += raw_len as u64;
                                if writer.raw_bytes() >= opts.pack_max_input
                                    || writer.stored_bytes() >= opts.pack_target
                                {
                                    if let Some(p) = pack.take() {
                                        seal(p)?;
                                    }
                                    absorb(&mut segment, &mut stats, false)?;
                                }
                            }
                            let mut advanced = 0;
                            for (len, id) in chunks {
                                disk.push(len as u64, id);
                                advanced += len as u64;
                                if id.is_some() {
                                    stats.chunks_total += 1;
                                }
                            }
                            progress.advance(advanced);
                            let _ = free_tx.send(buffers);
                        }
                    }
                }
            }
            Ok(())
        };
        let mut result = run();
        // Whatever happened, seal what was written so far.
        if let Some(p) = pack.take() {
            let sealed = seal(p);
            if result.is_ok() {
                result = sealed;
            }
        }
        // Closing the queue lets the sealer finish and exit.
        seal_tx = None;
        debug_assert!(seal_tx.is_none());
        match (result, absorb(&mut segment, &mut stats, true)) {
            // A sealing error is the more precise one (it names the pack).
            (_, Err(e)) => Err(e),
            (r, Ok(())) => r,
        }
    });
    outcome?;
    if failure.aborted() {
        return Err(failure
            .take()
            .unwrap_or_else(|| Error::Internal("backup aborted".into())));
    }
    if !pending.is_empty() {
        return Err(Error::Internal("backup pipeline lost a batch".into()));
    }
    for (disk, (name, _, size)) in disks.iter().zip(&disk_meta) {
        if let Some(size) = size {
            if disk.size != *size {
                return Err(Error::Internal(format!(
                    "disk {name:?}: read {} bytes of {size}",
                    disk.size
                )));
            }
        }
    }
    Ok((disks, stats, segment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 65536]));
        assert!(is_zero(&[]));
        let mut v = vec![0u8; 65537];
        v[65536] = 1;
        assert!(!is_zero(&v));
        v[65536] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn disk_names() {
        assert!(validate_disk_name("vda.qcow2").is_ok());
        for bad in ["", ".", "..", "a/b", "x\0"] {
            assert!(validate_disk_name(bad).is_err(), "{bad:?}");
        }
    }
}
