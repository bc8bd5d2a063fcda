//! The backup pipeline: disk sources → chunks → ids → index lookup → zstd for
//! new chunks only → packs → index segment → manifest (written last).
//!
//! Threads and bounded queues:
//! ```text
//! reader ──(work, bounded)──► N workers ──(done, bounded)──► assembler (caller's thread)
//!    ▲                                                            │
//!    └──────────── free buffer pairs (fixed count) ◄──────────────┘   sealer thread
//! ```
//! The [reader](reader) reads data extents in batches into one of a fixed
//! number of buffer pairs, skipping holes; [workers](worker) cut, zero-check,
//! hash, dedup and compress; the [assembler](assembler) restores order,
//! appends new blobs to the open pack, hands full packs to the sealer thread
//! and builds the manifest. Memory is bounded by the number of buffer pairs,
//! not by disk size (plus the manifest: ~56 B per chunk).

mod assembler;
pub(crate) mod excluded;
mod reader;
pub(crate) mod resume;
mod worker;

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crossbeam_channel::bounded;

use crate::chunker::ChunkingParams;
use crate::error::{Error, Result};
use crate::id::{ChunkId, IdScheme, SnapshotId};
use crate::kind::FileKind;
use crate::pipeline::failure::Failure;
use crate::pipeline::input::{validate_disk_name, BackupDisk, DiskInput};
use crate::pipeline::worker_threads;
use crate::progress::{CancelToken, NoProgress, Progress};
use crate::source::{align_extents, MappedDisk};
use crate::store::blob::Compression;
use crate::store::format::{MAX_STRING, PROP_FALLBACK};
use crate::store::index::Index;
use crate::store::manifest::{Snapshot, SnapshotMode};
use crate::store::pool::Pool;
pub(crate) use excluded::Excluded;

use assembler::Assembled;

/// Seal a pack once this much chunk data (before compression) went into it.
pub const DEFAULT_PACK_MAX_INPUT: u64 = 64 << 20;
/// Seal a pack once it holds this many stored bytes.
pub const DEFAULT_PACK_TARGET: u64 = 32 << 20;
/// Flush an index segment once the backup has this many unflushed entries.
pub const SEGMENT_FLUSH_ENTRIES: usize = 1 << 18;

/// Settings of one backup run. Start from [`BackupOptions::new`] and change
/// what differs, with the `with_*` setters or by assigning fields.
#[derive(Clone)]
#[non_exhaustive]
pub struct BackupOptions {
    /// VM name recorded in the snapshot (1–4096 bytes).
    pub vm: String,
    /// How disks are cut into chunks (default: fixed 64 KiB).
    pub chunking: ChunkingParams,
    /// Compression of new chunks (default: zstd level 1).
    pub compression: Compression,
    /// Worker threads (`None`: one per CPU).
    pub threads: Option<NonZeroUsize>,
    /// Bytes read from a source per batch (rounded up to a whole number of chunks).
    pub batch_size: usize,
    /// Seal a pack once this much chunk data (before compression) went into it.
    pub pack_max_input: u64,
    /// Seal a pack once it holds this many stored bytes (default 32 MiB,
    /// or the pool's [preferred size](crate::PoolWrite::preferred_pack_size)).
    pub pack_target: u64,
    /// Write an index segment mid-backup once this many new entries are
    /// pending, bounding memory on huge disks.
    pub segment_flush_entries: usize,
    /// Write the extent lists in extent pages (manifest version 2, the
    /// default: memory does not grow with a disk's extents). `false`
    /// writes version 1 manifests, for pools that builds without version
    /// 2 must still read.
    pub extent_pages: bool,
    /// Recorded in the manifest.
    pub properties: BTreeMap<String, String>,
    /// The snapshot recorded as the parent when no disk is an incremental
    /// (a full read deduplicated against an earlier copy). When a disk is an
    /// incremental, the parent in its [`ChangedBlocks`](crate::ChangedBlocks)
    /// is recorded instead (the first such disk's).
    pub parent: Option<SnapshotId>,
    /// Receives progress (default: none).
    pub progress: Arc<dyn Progress>,
    /// Stops the backup when triggered.
    pub cancel: CancelToken,
    /// How often the backup renews its writer lease (default 30 s). A
    /// garbage collection evicts a writer whose lease it sees unrenewed for
    /// longer than its expiry, so this must stay well below that.
    pub lease_renewal: std::time::Duration,
    /// Where resume journals are kept (spec B13; `None`: no resume). A
    /// disk whose source has an [identity](crate::DiskSource::identity)
    /// continues from its journal instead of being read from the start.
    pub resume_dir: Option<std::path::PathBuf>,
    /// Disks read at the same time (spec B8's disks per VM, 1–5; default
    /// 1: one after another). With more than one, each disk runs its own
    /// reader and assembler (the worker threads are shared out among them)
    /// and the snapshot is written once all are done.
    pub parallel_disks: usize,
    /// Reuse the previous snapshot of a disk whose source file is unchanged
    /// (its [identity](crate::DiskSource::identity_proves_content) equals
    /// the one recorded) instead of reading it. Default: on; off reads
    /// every disk (`--force-read`).
    pub reuse_unchanged: bool,
}

impl std::fmt::Debug for BackupOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupOptions")
            .field("vm", &self.vm)
            .field("chunking", &self.chunking)
            .field("compression", &self.compression)
            .field("threads", &self.threads)
            .field("parent", &self.parent)
            .field("properties", &self.properties)
            .finish_non_exhaustive()
    }
}

impl BackupOptions {
    crate::pipeline::job_control_setters!();

    /// Defaults for a backup of VM `vm`.
    pub fn new(vm: impl Into<String>) -> Self {
        BackupOptions {
            vm: vm.into(),
            chunking: ChunkingParams::default(),
            compression: Compression::default(),
            threads: None,
            batch_size: 4 << 20,
            extent_pages: true,
            pack_max_input: DEFAULT_PACK_MAX_INPUT,
            pack_target: DEFAULT_PACK_TARGET,
            segment_flush_entries: SEGMENT_FLUSH_ENTRIES,
            properties: BTreeMap::new(),
            parent: None,
            progress: Arc::new(NoProgress),
            cancel: CancelToken::new(),
            lease_renewal: crate::lease::LEASE_RENEW_INTERVAL,
            resume_dir: None,
            parallel_disks: 1,
            reuse_unchanged: true,
        }
    }

    /// Reads up to `n` disks at the same time (see
    /// [`parallel_disks`](Self::parallel_disks)).
    pub fn with_parallel_disks(mut self, n: usize) -> Self {
        self.parallel_disks = n;
        self
    }

    /// Keeps resume journals in `dir` (see [`resume_dir`](Self::resume_dir)).
    pub fn with_resume_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.resume_dir = Some(dir.into());
        self
    }

    /// Sets how often the writer lease is renewed (at least 10 ms).
    pub fn with_lease_renewal(mut self, every: std::time::Duration) -> Self {
        self.lease_renewal = every.max(std::time::Duration::from_millis(10));
        self
    }

    /// Sets the chunking.
    pub fn with_chunking(mut self, chunking: ChunkingParams) -> Self {
        self.chunking = chunking;
        self
    }

    /// Sets the compression of new chunks.
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Records `key = value` in the manifest.
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Sets the parent recorded when no disk is an incremental.
    pub fn with_parent(mut self, parent: Option<SnapshotId>) -> Self {
        self.parent = parent;
        self
    }

    /// Checks every setting; the error names the one out of range.
    pub fn validate(&self) -> Result<()> {
        self.chunking.validate().map_err(Error::InvalidArgument)?;
        self.compression
            .validate()
            .map_err(Error::InvalidArgument)?;
        if self.vm.is_empty() || self.vm.len() > MAX_STRING {
            return Err(Error::InvalidArgument(
                "VM name must be 1–4096 bytes".into(),
            ));
        }
        if !(1..=64).contains(&self.parallel_disks) {
            return Err(Error::InvalidArgument(format!(
                "parallel disks: {} is out of range (1–64)",
                self.parallel_disks
            )));
        }
        Ok(())
    }
}

/// What a backup did.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct BackupStats {
    /// The snapshot written.
    pub snapshot: SnapshotId,
    /// Full read or CBT incremental.
    pub mode: SnapshotMode,
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
    /// Packs sealed by this backup.
    pub packs_written: u64,
    /// Extent pages stored by this backup (chunks holding the manifest's
    /// extent lists; not counted in `chunks_new`).
    pub pages_new: u64,
    /// Bytes of the disks taken from resume journals instead of being read
    /// (an interrupted backup of the same sources continued).
    pub bytes_resumed: u64,
    /// Wall time of the backup.
    pub seconds: f64,
    /// Disks whose changed-block tracking was asked for but not trusted,
    /// with the reason (their [`PROP_FALLBACK`](crate::format::PROP_FALLBACK)
    /// property); they were read in full against the parent.
    pub cbt_fallback: BTreeMap<String, String>,
    /// Disks not read because their source file was unchanged since their
    /// previous snapshot (its extents reused).
    pub unchanged: Vec<String>,
    /// Distinct extent pages of a parent (a CBT incremental's, or an
    /// unchanged file's) found damaged when read (or their pack gone since
    /// the index was loaded): their spans were read again and the pages
    /// stored anew. Non-zero means the pool holds damage: run
    /// `verify` with `read_data`, then `repair_packs`. (A page in a pack
    /// the index already knows is gone is not counted: its span is read
    /// again without trying it.)
    pub parent_pages_damaged: u64,
}

impl BackupStats {
    /// Adds the counters the assembler keeps of another part of the same
    /// backup.
    fn absorb(&mut self, other: &BackupStats) {
        self.bytes_read += other.bytes_read;
        self.bytes_new += other.bytes_new;
        self.chunks_total += other.chunks_total;
        self.chunks_new += other.chunks_new;
        self.bytes_new_raw += other.bytes_new_raw;
        self.packs_written += other.packs_written;
        self.pages_new += other.pages_new;
        self.bytes_resumed += other.bytes_resumed;
    }

    fn empty() -> Self {
        BackupStats {
            snapshot: SnapshotId([0; 32]),
            mode: SnapshotMode::Full,
            bytes_logical: 0,
            bytes_read: 0,
            bytes_dirty: 0,
            bytes_new: 0,
            chunks_total: 0,
            chunks_new: 0,
            bytes_resumed: 0,
            bytes_new_raw: 0,
            packs_written: 0,
            pages_new: 0,
            seconds: 0.0,
            cbt_fallback: BTreeMap::new(),
            unchanged: Vec::new(),
            parent_pages_damaged: 0,
        }
    }
}

impl std::fmt::Display for BackupStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "snapshot {} ({}): {} bytes logical, {} read, {} new in pool ({} of {} chunks new) in {:.2}s",
            self.snapshot,
            self.mode,
            self.bytes_logical,
            self.bytes_read,
            self.bytes_new,
            self.chunks_new,
            self.chunks_total,
            self.seconds
        )
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

/// What the checks before a backup learned about its disks.
struct Plan {
    mode: SnapshotMode,
    parent: Option<SnapshotId>,
    bytes_dirty: u64,
    /// Disks whose source file is unchanged (not read).
    unchanged: Vec<String>,
}

/// Checks options and disks before anything is read: names, duplicates,
/// and every incremental's parent against the disk it describes.
fn plan(disks: &[BackupDisk], opts: &BackupOptions) -> Result<Plan> {
    opts.validate()?;
    if disks.is_empty() {
        return Err(Error::InvalidArgument(
            "a backup needs at least one disk".into(),
        ));
    }
    let mut seen = HashSet::new();
    let mut plan = Plan {
        mode: SnapshotMode::Full,
        parent: None,
        bytes_dirty: 0,
        unchanged: Vec::new(),
    };
    for d in disks {
        validate_disk_name(&d.name)?;
        if !seen.insert(d.name.as_str()) {
            return Err(Error::InvalidArgument(format!(
                "disk name {:?} used twice",
                d.name
            )));
        }
        if let DiskInput::Incremental { source, changed } = &d.input {
            changed.check(&d.name, source.size(), opts.chunking)?;
            // Unless chunks the parent lost are read again.
            if changed.is_unchanged_file() && changed.dirty().is_empty() {
                plan.unchanged.push(d.name.clone());
            }
            plan.mode = SnapshotMode::Cbt;
            plan.parent = plan.parent.or(Some(changed.parent_id()));
            let grid = opts.chunking.max_chunk() as u64;
            plan.bytes_dirty += align_extents(changed.dirty(), grid, source.size())
                .iter()
                .map(|r| r.end - r.start)
                .sum::<u64>();
        }
    }
    plan.parent = plan.parent.or(opts.parent);
    if plan.unchanged.len() == disks.len() {
        plan.mode = SnapshotMode::Unchanged;
    }
    Ok(plan)
}

/// Runs a backup of `disks` into the pool and writes its manifest.
///
/// Chunks `excluded` passes over (in a pack a garbage collection is about
/// to delete, or found damaged) are stored again instead of reused.
///
/// `guard` is called before every index segment and before the manifest
/// is written; an error from it stops the backup there (a writer whose
/// lease was lost must not publish).
pub(crate) fn run(
    pool: &dyn Pool,
    index: &Index,
    excluded: &Excluded,
    guard: &(dyn Fn() -> Result<()> + Sync),
    disks: Vec<BackupDisk>,
    resumes: Vec<Option<resume::DiskResume>>,
    opts: &BackupOptions,
) -> Result<BackupStats> {
    let started = Instant::now();
    let plan = plan(&disks, opts)?;
    let progress: &dyn Progress = &*opts.progress;
    progress.start(disks.iter().filter_map(BackupDisk::size).sum());
    let mut prefixes = Vec::with_capacity(disks.len());
    let mut journals = assembler::Journals {
        journals: Vec::with_capacity(disks.len()),
        done: Vec::with_capacity(disks.len()),
    };
    let mut resumed = 0;
    let mut paths = Vec::new();
    for r in resumes
        .into_iter()
        .chain(std::iter::repeat_with(|| None))
        .take(disks.len())
    {
        match r {
            Some(r) => {
                resumed += r.prefix_len;
                let path = r.journal.path().to_path_buf();
                paths.push(path.clone());
                journals.done.push(r.prefix_len);
                journals.journals.push(Some(r.journal));
                prefixes.push(Some(resume::Prefix {
                    len: r.prefix_len,
                    path,
                    key: r.key,
                }));
            }
            None => {
                journals.done.push(0);
                journals.journals.push(None);
                prefixes.push(None);
            }
        }
    }
    let assembled = if opts.parallel_disks > 1 && disks.len() > 1 {
        run_parallel(
            pool, index, excluded, guard, disks, prefixes, journals, opts,
        )?
    } else {
        let claims = worker::Claims::new();
        run_pipeline(
            pool, index, excluded, guard, disks, prefixes, journals, opts, &claims,
        )?
    };
    let stats = commit(pool, index, excluded, guard, assembled, &plan, opts)?;
    // The snapshot exists: the journals have served.
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
    Ok(BackupStats {
        seconds: started.elapsed().as_secs_f64(),
        bytes_resumed: resumed,
        ..stats
    })
}

/// Opens the resume journals of `disks` when `opts.resume_dir` is set:
/// one per disk read from a source with an identity (see `resume`).
pub(crate) fn prepare_resume(
    pool_id: &[u8],
    index: &Index,
    excluded: &Excluded,
    disks: &[BackupDisk],
    opts: &BackupOptions,
) -> Result<Vec<Option<resume::DiskResume>>> {
    let Some(dir) = &opts.resume_dir else {
        return Ok(disks.iter().map(|_| None).collect());
    };
    let grid = match opts.chunking {
        ChunkingParams::Fixed { size } => size as u64,
        _ => 1,
    };
    disks
        .iter()
        .map(|d| {
            let DiskInput::Image(src) = &d.input else {
                return Ok(None);
            };
            let Some(identity) = src.identity() else {
                return Ok(None);
            };
            let key = resume::journal_key(pool_id, &opts.vm, &d.name, &identity, opts.chunking);
            let max_chunk = opts.chunking.max_chunk() as u64;
            // A journal that cannot be opened costs the saving, not the
            // backup.
            Ok(
                resume::Journal::open(dir, &key, index, excluded, (grid, max_chunk), src.size())
                    .ok()
                    .flatten(),
            )
        })
        .collect()
}

/// Starts the reader, the workers and the assembler and waits for them.
#[allow(clippy::too_many_arguments)]
fn run_pipeline(
    pool: &dyn Pool,
    index: &Index,
    excluded: &Excluded,
    guard: &(dyn Fn() -> Result<()> + Sync),
    disks: Vec<BackupDisk>,
    prefixes: Vec<Option<resume::Prefix>>,
    journals: assembler::Journals,
    opts: &BackupOptions,
    claims: &worker::Claims,
) -> Result<Assembled> {
    let threads = worker_threads(opts.threads);
    let max_chunk = opts.chunking.max_chunk();
    // A batch holds whole chunks: at least two maximal ones.
    let batch_size = opts.batch_size.max(2 * max_chunk).div_ceil(max_chunk) * max_chunk;
    let buffer_pairs = threads + 3;
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
    let disk_meta: Vec<assembler::DiskMeta> = disks
        .iter()
        .map(|d| assembler::DiskMeta {
            name: d.name.clone(),
            properties: d.properties.clone(),
            size: d.size(),
        })
        .collect();

    let assembled = std::thread::scope(|scope| {
        {
            let failure = &failure;
            let (free_rx, free_tx) = (free_rx.clone(), free_tx.clone());
            let (chunking, cancel) = (opts.chunking, &opts.cancel);
            scope.spawn(move || {
                let feed = reader::Feed::new(
                    chunking, batch_size, &free_rx, &free_tx, &work_tx, failure, cancel,
                );
                if let Err(e) = reader::read_disks(disks, prefixes, feed) {
                    failure.set(e);
                }
            });
        }
        for _ in 0..threads {
            let (work_rx, done_tx) = (work_rx.clone(), done_tx.clone());
            let failure = &failure;
            let compression = opts.compression;
            scope.spawn(move || {
                let index = worker::Lookup { index, excluded };
                if let Err(e) = worker::work(&work_rx, &done_tx, index, claims, compression) {
                    failure.set(e);
                }
            });
        }
        drop(work_rx);
        drop(done_tx);
        let ctx = assembler::Context {
            pool,
            index,
            excluded,
            guard,
            claims,
            failure: &failure,
            opts,
            free_tx: &free_tx,
        };
        let result = assembler::assemble(&ctx, done_rx, disk_meta, journals);
        if result.is_err() {
            // Stop the reader; workers stop when their channels close.
            failure.abort();
        }
        result
    });
    // A reader or worker error (cancellation included) is the cause of
    // whatever the assembler saw afterwards.
    match (assembled, failure.take()) {
        (_, Some(e)) => Err(e),
        (Err(e), None) => Err(e),
        (Ok(v), None) => Ok(v),
    }
}

/// Runs one pipeline per disk, at most `opts.parallel_disks` at once, each
/// taking the next disk as it finishes one, with the worker threads shared
/// out among them and one set of claims (a chunk new to several disks is
/// stored once). A failure stops the others; the extent lists come back in
/// the disks' order and the index entries together, for one commit.
#[allow(clippy::too_many_arguments)]
fn run_parallel(
    pool: &dyn Pool,
    index: &Index,
    excluded: &Excluded,
    guard: &(dyn Fn() -> Result<()> + Sync),
    disks: Vec<BackupDisk>,
    prefixes: Vec<Option<resume::Prefix>>,
    journals: assembler::Journals,
    opts: &BackupOptions,
) -> Result<Assembled> {
    let n = disks.len();
    let lanes = opts.parallel_disks.min(n);
    let mut lane_opts = opts.clone();
    lane_opts.threads = NonZeroUsize::new((worker_threads(opts.threads) / lanes).max(1));
    // The lanes stop together: on the caller's cancel or one's failure.
    lane_opts.cancel = CancelToken::new();
    let claims = worker::Claims::new();
    let assembler::Journals {
        journals: disk_journals,
        done,
    } = journals;
    let items: Vec<_> = disks
        .into_iter()
        .zip(prefixes)
        .zip(disk_journals.into_iter().zip(done))
        .collect();
    let results = crate::pipeline::lanes::run_lanes(
        items,
        lanes,
        &opts.cancel,
        &lane_opts.cancel,
        |((disk, prefix), (journal, done))| {
            let journals = assembler::Journals {
                journals: vec![journal],
                done: vec![done],
            };
            run_pipeline(
                pool,
                index,
                excluded,
                guard,
                vec![disk],
                vec![prefix],
                journals,
                &lane_opts,
                &claims,
            )
        },
    )?;
    let mut merged = Assembled {
        disks: Vec::with_capacity(n),
        stats: BackupStats::empty(),
        segment: crate::store::index::SegmentBuilder::new(),
    };
    for a in results {
        merged.disks.extend(a.disks);
        merged.stats.absorb(&a.stats);
        merged.segment.append(a.segment);
    }
    Ok(merged)
}

/// Writes the index segment (this backup's packs, plus packs an interrupted
/// backup left uncovered), then the manifest: the snapshot exists from here.
fn commit(
    pool: &dyn Pool,
    index: &Index,
    excluded: &Excluded,
    guard: &(dyn Fn() -> Result<()> + Sync),
    assembled: Assembled,
    plan: &Plan,
    opts: &BackupOptions,
) -> Result<BackupStats> {
    let Assembled {
        disks: mut manifest_disks,
        mut stats,
        mut segment,
    } = assembled;
    // Packs a sweep is about to delete are not covered: no segment may
    // name a pack after the sweep deleted it.
    for (pack, entries) in index.take_uncovered_packs() {
        if !excluded.packs.contains(&pack) {
            segment.add_entries(pack, &entries);
        }
    }
    crate::failpoint::pause("backup-before-segment");
    if segment.pack_count() > 0 {
        guard()?;
        let (name, seg, len) = segment.write(pool)?;
        stats.bytes_new += len;
        // Keep this handle's view current for later operations.
        index.push(name, seg);
    }
    for d in &mut manifest_disks {
        d.extents.shrink_to_fit();
        if let Some(reason) = d.properties.get(PROP_FALLBACK) {
            stats.cbt_fallback.insert(d.name.clone(), reason.clone());
        }
    }
    // Cancelled after the last batch: no snapshot (the packs stay, as
    // after a kill, for the next backup to reuse).
    if opts.cancel.is_cancelled() {
        return Err(Error::Cancelled);
    }
    let snapshot = Snapshot {
        time: SystemTime::now(),
        vm: opts.vm.clone(),
        mode: plan.mode,
        parent: plan.parent,
        id_scheme: IdScheme::Blake3,
        chunking: opts.chunking,
        compression: opts.compression,
        properties: opts.properties.clone(),
        disks: manifest_disks,
    };
    snapshot.validate().map_err(Error::InvalidArgument)?;
    let encoded = snapshot.encode();
    let id = SnapshotId::of_manifest(&encoded);
    crate::failpoint::pause("backup-before-manifest");
    guard()?;
    pool.write(FileKind::Snapshot, &id.to_hex(), &encoded)?;
    stats.bytes_new += encoded.len() as u64;
    stats.snapshot = id;
    stats.mode = plan.mode;
    stats.bytes_dirty = plan.bytes_dirty;
    stats.unchanged = plan.unchanged.clone();
    stats.bytes_logical = snapshot.bytes_logical();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunker::ChunkingParams;
    use crate::id::IdScheme;
    use crate::pipeline::input::ChangedBlocks;
    use crate::source::MemorySource;
    use crate::store::blob::Compression;
    use crate::store::manifest::{DiskManifest, Snapshot};

    /// A backup whose every disk is an unread, unchanged file is mode
    /// `unchanged`; a CBT incremental with nothing dirty is not.
    #[test]
    fn only_unchanged_files_make_a_snapshot_unchanged() {
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
        let mut disk = DiskManifest::new("vda");
        for c in data.chunks(65536) {
            disk.push(65536, Some(ChunkId::of(c)));
        }
        let parent = Snapshot {
            time: std::time::UNIX_EPOCH,
            vm: "vm".into(),
            mode: SnapshotMode::Full,
            parent: None,
            id_scheme: IdScheme::Blake3,
            chunking: ChunkingParams::default(),
            compression: Compression::default(),
            properties: Default::default(),
            disks: vec![disk],
        };
        let id = SnapshotId([9; 32]);
        let input = |changed: ChangedBlocks| BackupDisk {
            name: "vda".into(),
            input: DiskInput::Incremental {
                source: Box::new(MemorySource::new("vda", data.clone())),
                changed,
            },
            properties: Default::default(),
        };
        let opts = BackupOptions::new("vm");
        let unchanged = ChangedBlocks::unchanged_file(id, &parent, "vda").unwrap();
        let p = plan(&[input(unchanged)], &opts).unwrap();
        assert_eq!(p.mode, SnapshotMode::Unchanged);
        assert_eq!(p.unchanged, vec!["vda".to_string()]);
        assert_eq!(p.parent, Some(id));
        let cbt = ChangedBlocks::new(id, &parent, "vda", Vec::new()).unwrap();
        let p = plan(&[input(cbt)], &opts).unwrap();
        assert_eq!(p.mode, SnapshotMode::Cbt);
        assert!(p.unchanged.is_empty());
    }
}
