//! Copying snapshots from one pool to another without reading any disk:
//! [`Repository::copy_to`](crate::Repository::copy_to).
//!
//! A copied snapshot keeps its id: its manifest's bytes are written to the
//! target unchanged, after every chunk it names is durable there. Only the
//! chunks the target lacks are moved, as the source stored them (no
//! recompression), each decoded and hashed on the way so a damaged source
//! blob never reaches the target.
//!
//! Per snapshot, oldest first:
//! 1. skip it if the target already holds its manifest;
//! 2. read its manifest (hash-checked) and look up every chunk in the
//!    target's index; the ones it lacks are located in the source's index
//!    and sorted by source pack and offset on scratch disk (memory does not
//!    grow with the disk);
//! 3. read them in runs of adjacent blobs (worker threads read, decode and
//!    verify; one thread appends the blobs to the target's open pack and
//!    seals it when full), flushing index segments as they grow;
//! 4. seal the open pack, write the index segment, then the manifest.
//!
//! The copy joins the target's writers like a backup (a lease that a
//! garbage collection waits for, its sweep notices honoured, the lease
//! checked before every segment and manifest). A killed or failed copy
//! leaves sealed packs the next copy (or backup) reuses, and every
//! manifest in the target names only durable chunks: running it again
//! finishes the job without moving again what already arrived.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::bounded;

use crate::error::{Error, Result};
use crate::external_sort::{
    sort_budget, ExternalSorter, FieldReader, FieldWriter, Record, ScratchDir, Sorted,
};
use crate::id::{ChunkId, PackId, SnapshotId};
use crate::kind::FileKind;
use crate::lease::{condemned_packs, delete_retrying, WriterLease};
use crate::pipeline::backup::{DEFAULT_PACK_TARGET, SEGMENT_FLUSH_ENTRIES};
use crate::pipeline::extents::Store;
use crate::pipeline::extents::{decode_chunk, visit_manifest_chunks};
use crate::pipeline::failure::Failure;
use crate::pipeline::{read_pack_range, worker_threads};
use crate::progress::{CancelToken, NoProgress, Progress};
use crate::repo::Repository;
use crate::store::blob::{BlobCodec, Compression};
use crate::store::index::{Index, SegmentBuilder};
use crate::store::manifest::{read_manifest, Snapshot};
use crate::store::pack::{PackEntry, PackWriter};
use crate::store::pool::Pool;
use crate::store::wire::DecodeError;

/// Most stored bytes one read of adjacent blobs covers.
const RUN_MAX: u64 = 8 << 20;

/// Settings of one copy. Start from [`CopyOptions::default`].
#[derive(Clone)]
#[non_exhaustive]
pub struct CopyOptions {
    /// The snapshots to copy; empty: every snapshot of the source (of
    /// [`vm`](Self::vm) when set).
    pub snapshots: Vec<SnapshotId>,
    /// Copy only this VM's snapshots.
    pub vm: Option<String>,
    /// Worker threads (`None`: one per CPU).
    pub threads: Option<NonZeroUsize>,
    /// Seal a target pack once it holds this many stored bytes (default
    /// 32 MiB, or the target's [preferred size](crate::PoolWrite::preferred_pack_size)).
    pub pack_target: u64,
    /// Write an index segment once this many copied chunks are pending.
    pub segment_flush_entries: usize,
    /// How often the copy renews its writer lease in the target.
    pub lease_renewal: Duration,
    /// Where the chunks to copy are sorted (`None`: `$CAIRN_SCRATCH_DIR`,
    /// else `$TMPDIR`, else `/var/tmp`).
    pub scratch_dir: Option<PathBuf>,
    /// Receives progress: stored bytes moved.
    pub progress: Arc<dyn Progress>,
    /// Stops the copy when triggered (snapshots already copied stay).
    pub cancel: CancelToken,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            snapshots: Vec::new(),
            vm: None,
            threads: None,
            pack_target: DEFAULT_PACK_TARGET,
            segment_flush_entries: SEGMENT_FLUSH_ENTRIES,
            lease_renewal: crate::lease::LEASE_RENEW_INTERVAL,
            scratch_dir: None,
            progress: Arc::new(NoProgress),
            cancel: CancelToken::new(),
        }
    }
}

impl std::fmt::Debug for CopyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOptions")
            .field("snapshots", &self.snapshots)
            .field("vm", &self.vm)
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl CopyOptions {
    crate::pipeline::job_control_setters!();

    /// Copies these snapshots (empty: all).
    pub fn with_snapshots(mut self, ids: Vec<SnapshotId>) -> Self {
        self.snapshots = ids;
        self
    }

    /// Copies only this VM's snapshots.
    pub fn with_vm(mut self, vm: Option<String>) -> Self {
        self.vm = vm;
        self
    }

    /// Sorts the chunks to copy under `dir`.
    pub fn with_scratch_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.scratch_dir = dir;
        self
    }

    /// Sets how often the writer lease is renewed (at least 10 ms).
    pub fn with_lease_renewal(mut self, every: Duration) -> Self {
        self.lease_renewal = every.max(Duration::from_millis(10));
        self
    }
}

/// What a copy did.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct CopyStats {
    /// Snapshots written to the target by this run, oldest first.
    pub copied: Vec<SnapshotId>,
    /// Selected snapshots the target already held.
    pub present: Vec<SnapshotId>,
    /// Selected snapshots not copied because the source is damaged (an
    /// unreadable manifest, a missing or corrupt chunk), with why. The
    /// other snapshots are copied.
    pub failed: Vec<(SnapshotId, String)>,
    /// Chunk extents the copied manifests reference (repeats counted; a
    /// version 2 manifest's extent pages are chunks it references too).
    pub chunks_referenced: u64,
    /// Distinct chunks moved (the target lacked them), extent pages included.
    pub chunks_copied: u64,
    /// Stored bytes of the chunks moved (blob headers and bodies).
    pub bytes_copied: u64,
    /// Plaintext bytes of the chunks moved.
    pub bytes_copied_raw: u64,
    /// Every byte written to the target: packs, index segments, manifests.
    pub bytes_written: u64,
    /// Packs written to the target.
    pub packs_written: u64,
    /// Seconds the copy took.
    pub seconds: f64,
}

/// Copies snapshots from `source` to `target` (see the module docs).
pub(crate) fn copy(
    source: &Repository,
    target: &Repository,
    opts: &CopyOptions,
) -> Result<CopyStats> {
    let started = Instant::now();
    if source.config().pool_id == target.config().pool_id {
        return Err(Error::InvalidArgument(format!(
            "{} and {} are the same pool (pool id {})",
            source.pool().location(),
            target.pool().location(),
            source.config().pool_id
        )));
    }
    if source.config().id_scheme != target.config().id_scheme {
        return Err(Error::Unsupported(format!(
            "copying between pools whose chunk ids differ ({} in {}, {} in {})",
            source.config().id_scheme.name(),
            source.pool().location(),
            target.config().id_scheme.name(),
            target.pool().location()
        )));
    }
    let (selected, unreadable) = select(source, opts)?;
    let scratch = ScratchDir::new(opts.scratch_dir.as_deref())?;

    // Join the target's writers first, as a backup does: a collection
    // either waits for this lease or announced its sweep before it (read
    // just below: nothing is deduplicated against a condemned pack).
    let tpool = target.pool().clone();
    let lease = WriterLease::acquire(&tpool, opts.lease_renewal)?;
    let mut excluded: HashSet<PackId> = condemned_packs(&tpool)?.into_iter().collect();
    let tindex = target.fresh_index()?;
    excluded.extend(tindex.absent_packs());
    let sindex = source.fresh_index()?;
    let guard = || lease.ensure_held();

    let mut opts = opts.clone();
    if let Some(size) = tpool.preferred_pack_size() {
        if opts.pack_target == DEFAULT_PACK_TARGET {
            opts.pack_target = size;
        }
    }
    let mut stats = CopyStats {
        failed: unreadable,
        ..CopyStats::default()
    };
    let mut out = Output {
        pool: &*tpool,
        index: &tindex,
        excluded: &excluded,
        guard: &guard,
        opts: &opts,
        pack: None,
        segment: SegmentBuilder::new(),
        uncovered_taken: false,
    };
    let mut wanted_so_far = 0u64;
    let result = (|| -> Result<()> {
        for id in &selected {
            opts.cancel.check()?;
            if exists(&*tpool, id)? {
                stats.present.push(*id);
                continue;
            }
            let copied = read_manifest(&**source.pool(), id).and_then(|manifest| {
                copy_one(
                    (source, &sindex),
                    &mut out,
                    &scratch,
                    (id, &manifest),
                    &mut wanted_so_far,
                    &mut stats,
                )?;
                Ok(manifest)
            });
            let manifest = match copied {
                Ok(m) => m,
                // Damage in the source spoils this snapshot only: the
                // others are copied, and the failure is reported.
                Err(e) if e.is_damage() => {
                    stats.failed.push((*id, e.to_string()));
                    continue;
                }
                Err(e) => return Err(e),
            };
            // Every chunk it names durable and indexed before the manifest.
            out.finish(&mut stats)?;
            opts.cancel.check()?;
            guard()?;
            // (Held here, a test freezes the copy past its lease expiry.)
            crate::failpoint::pause("copy-before-manifest");
            match tpool.write(FileKind::Snapshot, &id.to_hex(), &manifest) {
                Ok(()) => {
                    stats.bytes_written += manifest.len() as u64;
                    stats.copied.push(*id);
                }
                // Another copy got there first: the same bytes.
                Err(Error::AlreadyExists { .. }) => stats.present.push(*id),
                Err(e) => return Err(e),
            }
            crate::failpoint::pause("copy-after-manifest");
        }
        Ok(())
    })();
    // What was sealed stays durable and indexed whatever happened (the
    // next run reuses it); an error here is secondary to the first one.
    let flushed = out.finish(&mut stats);
    let result = result.and(flushed);
    let lease_name = lease.name();
    let held = lease.finish();
    if !matches!(held, Ok(true)) {
        // Whatever else went wrong: a sweep may have removed chunks the
        // manifests this run published reuse. Withdraw them.
        for id in &stats.copied {
            delete_retrying(&tpool, FileKind::Snapshot, &id.to_hex());
        }
        result?;
        return Err(Error::LeaseLost { lease: lease_name });
    }
    result?;
    // Best effort, as after a backup: chunks that arrived may heal
    // snapshots a repair marked damaged in the target.
    if stats.chunks_copied > 0 {
        let _ = target.heal_damage_marks();
    }
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// A snapshot not copied, and why.
type Failed = (SnapshotId, String);

/// The snapshots to copy, oldest first, and the selected ones whose
/// manifest cannot be read (with why; copying everything or one VM's
/// snapshots, that is every unreadable manifest: its VM cannot be told).
fn select(source: &Repository, opts: &CopyOptions) -> Result<(Vec<SnapshotId>, Vec<Failed>)> {
    let list = source.snapshots()?;
    let wanted: HashSet<SnapshotId> = opts.snapshots.iter().copied().collect();
    let unreadable: Vec<Failed> = list
        .damaged
        .iter()
        .filter(|(id, _)| wanted.is_empty() || wanted.contains(id))
        .map(|(id, e)| (*id, format!("snapshot {id} cannot be read: {e}")))
        .collect();
    for id in &wanted {
        if unreadable.iter().any(|(u, _)| u == id) {
            continue;
        }
        let Some(s) = list.snapshots.iter().find(|s| s.id == *id) else {
            return Err(Error::SnapshotNotFound(format!(
                "{id} in {}",
                source.pool().location()
            )));
        };
        if let Some(vm) = opts.vm.as_deref().filter(|vm| *vm != s.vm) {
            return Err(Error::InvalidArgument(format!(
                "snapshot {id} is of VM {:?}, not of {vm:?}",
                s.vm
            )));
        }
    }
    let selected: Vec<SnapshotId> = list
        .snapshots
        .iter()
        .filter(|s| wanted.is_empty() || wanted.contains(&s.id))
        .filter(|s| opts.vm.as_deref().is_none_or(|vm| s.vm == vm))
        .map(|s| s.id)
        .collect();
    if let Some(vm) = &opts.vm {
        if selected.is_empty() && unreadable.is_empty() {
            return Err(Error::SnapshotNotFound(format!(
                "no snapshot of VM {vm:?} in {}",
                source.pool().location()
            )));
        }
    }
    Ok((selected, unreadable))
}

fn exists(pool: &dyn Pool, id: &SnapshotId) -> Result<bool> {
    match pool.size(FileKind::Snapshot, &id.to_hex()) {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Moves the chunks of one snapshot that the target lacks.
fn copy_one(
    (source, sindex): (&Repository, &Index),
    out: &mut Output<'_>,
    scratch: &ScratchDir,
    (id, manifest): (&SnapshotId, &Bytes),
    wanted_so_far: &mut u64,
    stats: &mut CopyStats,
) -> Result<()> {
    let corrupt = |e| Error::corrupt(format!("snapshot manifest {id}"), e);
    let summary = Snapshot::decode_without_extents(manifest).map_err(corrupt)?;
    if summary.id_scheme != source.config().id_scheme {
        return Err(Error::corrupt(
            format!("snapshot manifest {id}"),
            DecodeError::Invalid(format!(
                "chunk id scheme {} differs from the pool's",
                summary.id_scheme.name()
            )),
        ));
    }
    let opts = out.opts;
    opts.progress.message(&format!("snapshot {id}"));
    let mut wanted = ExternalSorter::<Wanted>::new(scratch, "copy", sort_budget(), true);
    let mut orders: std::collections::HashMap<PackId, u64> = std::collections::HashMap::new();
    let mut failed: Option<Error> = None;
    let mut referenced = 0u64;
    let store = Store {
        pool: &**source.pool(),
        index: sindex,
    };
    visit_manifest_chunks(&store, id, manifest, &mut |c| {
        if failed.is_some() {
            return;
        }
        referenced += 1;
        let held = out
            .index
            .lookup(&c.id)
            .is_some_and(|l| !out.excluded.contains(&l.pack));
        if held {
            return;
        }
        match sindex.lookup_including_absent(&c.id) {
            Some(l) => {
                let order = *orders.entry(l.pack).or_insert_with(|| {
                    source
                        .pool()
                        .read_order(FileKind::Pack, &l.pack.to_hex())
                        .unwrap_or(0)
                });
                if let Err(e) = wanted.push(Wanted {
                    order,
                    pack: l.pack,
                    offset: l.offset,
                    length: l.length,
                    id: c.id,
                }) {
                    failed = Some(e);
                }
            }
            None => {
                failed = Some(Error::ChunkMissing {
                    chunk: c.id,
                    needed_by: format!(
                        "snapshot {id}, disk {:?} at offset {} (in {})",
                        c.disk,
                        c.offset,
                        source.pool().location()
                    ),
                })
            }
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    opts.cancel.check()?;
    stats.chunks_referenced += referenced;
    let wanted = wanted.finish()?;
    // Progress counts stored bytes to move over the whole run so far.
    for r in wanted.iter()? {
        *wanted_so_far += r?.length as u64;
    }
    opts.progress.start(*wanted_so_far);
    transfer((source, sindex), id, &wanted, out, stats)
}

/// A chunk to move, sorted by where its blob lies: the source pool's read
/// order of its pack (tape: cartridge and tape file; else 0), the pack,
/// the offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Wanted {
    order: u64,
    pack: PackId,
    offset: u64,
    length: u32,
    id: ChunkId,
}

impl Record for Wanted {
    const LEN: usize = 68;
    fn put(&self, out: &mut [u8]) {
        FieldWriter::new(out)
            .u64(self.order)
            .bytes(self.pack.as_bytes())
            .u64(self.offset)
            .u32(self.length)
            .bytes(&self.id.0);
    }
    fn get(b: &[u8]) -> Self {
        let mut r = FieldReader::new(b);
        Wanted {
            order: r.u64(),
            pack: PackId(r.array()),
            offset: r.u64(),
            length: r.u32(),
            id: ChunkId(r.array()),
        }
    }
}

/// A run of blobs adjacent in one source pack.
struct Run {
    pack: PackId,
    offset: u64,
    length: u64,
    blobs: Vec<(ChunkId, u32)>,
    /// The run's bytes, when the producer read them itself (sequential
    /// media: one reader, in medium order).
    bytes: Option<Bytes>,
}

/// A verified run: its bytes and each blob's (id, stored length, plaintext length).
struct Verified {
    bytes: Bytes,
    blobs: Vec<(ChunkId, u32, u32)>,
}

/// Reads, verifies and appends every referenced blob, in source order.
fn transfer(
    (source, sindex): (&Repository, &Index),
    snapshot: &SnapshotId,
    wanted: &Sorted<Wanted>,
    out: &mut Output<'_>,
    stats: &mut CopyStats,
) -> Result<()> {
    let opts = out.opts;
    let threads = worker_threads(opts.threads);
    let spool = &**source.pool();
    let failure = Failure::new();
    let (run_tx, run_rx) = bounded::<Run>(threads * 2);
    let (done_tx, done_rx) = bounded::<Verified>(threads * 2);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (run_rx, done_tx, failure) = (run_rx.clone(), done_tx.clone(), &failure);
            scope.spawn(move || {
                let mut codec = BlobCodec::new(Compression::None);
                let mut plain = Vec::new();
                for run in run_rx.iter() {
                    if failure.aborted() {
                        break;
                    }
                    match verify_run((spool, sindex), &mut codec, &mut plain, snapshot, run) {
                        Ok(v) => {
                            if done_tx.send(v).is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            failure.set(e);
                            break;
                        }
                    }
                }
            });
        }
        drop(run_rx);
        drop(done_tx);
        {
            let (failure, out, stats) = (&failure, &mut *out, &mut *stats);
            scope.spawn(move || {
                for v in done_rx.iter() {
                    if failure.aborted() {
                        continue;
                    }
                    let n = v.bytes.len() as u64;
                    if let Err(e) = out.append(&v, stats) {
                        failure.set(e);
                        continue;
                    }
                    opts.progress.advance(n);
                }
            });
        }
        // Sequential media (tape) get one reader, in medium order: this
        // thread reads each run before handing it on; the workers verify
        // (and read a damaged blob's other copy themselves, out of that
        // order: a rare cost, paid only where the index names one).
        let sequential = wanted
            .iter()
            .ok()
            .and_then(|mut i| i.next())
            .and_then(|r| r.ok())
            .is_some_and(|r| spool.read_order(FileKind::Pack, &r.pack.to_hex()).is_some());
        let read_ahead = |mut run: Run| -> Result<Run> {
            if sequential {
                run.bytes = Some(read_run(spool, snapshot, &run)?);
            }
            Ok(run)
        };
        if let Err(e) = send_runs(wanted, &run_tx, &failure, &opts.cancel, &read_ahead) {
            failure.set(e);
        }
        drop(run_tx);
    });
    match failure.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Groups the sorted references into runs of adjacent blobs.
fn send_runs(
    wanted: &Sorted<Wanted>,
    run_tx: &crossbeam_channel::Sender<Run>,
    failure: &Failure,
    cancel: &CancelToken,
    read_ahead: &dyn Fn(Run) -> Result<Run>,
) -> Result<()> {
    let mut current: Option<Run> = None;
    for r in wanted.iter()? {
        let r = r?;
        if failure.check(cancel) {
            return Ok(());
        }
        if let Some(run) = &mut current {
            if run.pack == r.pack
                && run.offset + run.length == r.offset
                && run.length + r.length as u64 <= RUN_MAX
            {
                run.length += r.length as u64;
                run.blobs.push((r.id, r.length));
                continue;
            }
        }
        let next = Run {
            pack: r.pack,
            offset: r.offset,
            length: r.length as u64,
            blobs: vec![(r.id, r.length)],
            bytes: None,
        };
        if let Some(run) = current.replace(next) {
            if run_tx.send(read_ahead(run)?).is_err() {
                return Ok(());
            }
        }
    }
    if let Some(run) = current {
        if !failure.check(cancel) {
            let _ = run_tx.send(read_ahead(run)?);
        }
    }
    Ok(())
}

/// Reads a run's bytes from its pack.
fn read_run(pool: &dyn Pool, snapshot: &SnapshotId, run: &Run) -> Result<Bytes> {
    read_pack_range(
        pool,
        run.pack,
        (run.offset, run.length),
        run.blobs.first().map(|b| b.0),
        || format!("snapshot {snapshot}"),
    )
}

/// Reads one run (unless read already) and checks that every blob decodes
/// to its chunk id; a damaged blob is replaced by an intact copy from
/// another pack if the source's index names one ([`other_copy`]).
fn verify_run(
    (pool, index): (&dyn Pool, &Index),
    codec: &mut BlobCodec,
    plain: &mut Vec<u8>,
    snapshot: &SnapshotId,
    mut run: Run,
) -> Result<Verified> {
    let bytes = match run.bytes.take() {
        Some(b) => b,
        None => read_run(pool, snapshot, &run)?,
    };
    let mut blobs = Vec::with_capacity(run.blobs.len());
    // The run's bytes with a damaged blob replaced by an intact copy from
    // another pack, once one was (the blobs before it as they were read).
    let mut mended: Option<Vec<u8>> = None;
    let mut at = 0usize;
    for (id, len) in run.blobs {
        let blob = bytes.get(at..at + len as usize).unwrap_or_default();
        let used = match verify_blob(codec, plain, blob, &id, run.pack, run.offset + at as u64) {
            Ok(()) => None,
            Err(e) if e.is_damage() => {
                match other_copy((pool, index), codec, plain, &id, run.pack)? {
                    Some(copy) => Some(copy),
                    None => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        if used.is_some() && mended.is_none() {
            mended = Some(bytes.get(..at).unwrap_or_default().to_vec());
        }
        let stored = used.as_deref().unwrap_or(blob);
        if let Some(m) = &mut mended {
            m.extend_from_slice(stored);
        }
        let raw = u32::try_from(plain.len())
            .map_err(|_| Error::Internal(format!("chunk {id} is larger than 4 GiB")))?;
        let stored_len = u32::try_from(stored.len())
            .map_err(|_| Error::Internal(format!("blob of chunk {id} is larger than 4 GiB")))?;
        blobs.push((id, stored_len, raw));
        at += len as usize;
    }
    let bytes = mended.map_or(bytes, Bytes::from);
    Ok(Verified { bytes, blobs })
}

/// Decodes `blob` (chunk `id`, at `offset` in `pack`) into `plain`
/// (cleared first), verified against its id.
fn verify_blob(
    codec: &mut BlobCodec,
    plain: &mut Vec<u8>,
    blob: &[u8],
    id: &ChunkId,
    pack: PackId,
    offset: u64,
) -> Result<()> {
    plain.clear();
    decode_chunk(codec, blob, id, pack, offset, plain)
}

/// An intact copy of chunk `id` in another pack than `damaged` that the
/// source's index names (a page a backup stored again because its copy
/// was damaged, or a chunk two writers stored at once), decoded into
/// `plain`; `None` when there is none. A copy found damaged or gone is
/// passed over; any other read error is returned.
fn other_copy(
    (pool, index): (&dyn Pool, &Index),
    codec: &mut BlobCodec,
    plain: &mut Vec<u8>,
    id: &ChunkId,
    damaged: PackId,
) -> Result<Option<Bytes>> {
    for loc in index.locations(id) {
        if loc.pack == damaged {
            continue;
        }
        // A pack gone or cut short reads as damage here.
        let blob = match read_pack_range(
            pool,
            loc.pack,
            (loc.offset, u64::from(loc.length)),
            Some(*id),
            || format!("a copy of chunk {id}"),
        ) {
            Ok(blob) => blob,
            Err(e) if e.is_damage() => continue,
            Err(e) => return Err(e),
        };
        if verify_blob(codec, plain, &blob, id, loc.pack, loc.offset).is_ok() {
            return Ok(Some(blob));
        }
    }
    Ok(None)
}

/// The target side: the open pack and the pending index segment.
struct Output<'a> {
    pool: &'a dyn Pool,
    index: &'a Index,
    excluded: &'a HashSet<PackId>,
    guard: &'a (dyn Fn() -> Result<()> + Sync),
    opts: &'a CopyOptions,
    pack: Option<PackWriter>,
    segment: SegmentBuilder,
    /// Whether the packs a killed writer left without a segment were
    /// taken into this copy's segment already.
    uncovered_taken: bool,
}

impl Output<'_> {
    fn append(&mut self, v: &Verified, stats: &mut CopyStats) -> Result<()> {
        let mut at = 0usize;
        for &(id, len, raw) in &v.blobs {
            let blob = v.bytes.get(at..at + len as usize).unwrap_or_default();
            at += len as usize;
            let writer = match &mut self.pack {
                Some(p) => p,
                None => self.pack.insert(PackWriter::create(self.pool)?),
            };
            if let Err(e) = writer.add(id, raw, blob) {
                // Never seal a pack whose write failed part-way: its
                // table would name bytes that are not there.
                self.pack = None;
                return Err(e);
            }
            stats.chunks_copied += 1;
            stats.bytes_copied += len as u64;
            stats.bytes_copied_raw += raw as u64;
            if writer.stored_bytes() >= self.opts.pack_target {
                self.seal(stats)?;
            }
        }
        Ok(())
    }

    /// Seals the open pack into the pending segment, and writes the
    /// segment once it is large.
    fn seal(&mut self, stats: &mut CopyStats) -> Result<()> {
        if let Some(p) = self.pack.take() {
            let (id, entries, size) = p.finish()?;
            self.segment.add_entries(id, &entries);
            stats.bytes_written += size;
            stats.packs_written += 1;
        }
        if self.segment.len() >= self.opts.segment_flush_entries {
            self.flush(stats)?;
        }
        Ok(())
    }

    /// Writes the pending segment (with the packs a killed writer left
    /// uncovered, once): its chunks are found by lookups from here on.
    fn flush(&mut self, stats: &mut CopyStats) -> Result<()> {
        if !self.uncovered_taken {
            self.uncovered_taken = true;
            let uncovered: Vec<(PackId, Vec<PackEntry>)> = self.index.take_uncovered_packs();
            for (pack, entries) in uncovered {
                if !self.excluded.contains(&pack) {
                    self.segment.add_entries(pack, &entries);
                }
            }
        }
        if self.segment.pack_count() == 0 {
            return Ok(());
        }
        (self.guard)()?;
        let full = std::mem::take(&mut self.segment);
        let (name, seg, len) = full.write(self.pool)?;
        stats.bytes_written += len;
        self.index.push(name, seg);
        Ok(())
    }

    /// Seals and indexes everything written (after each snapshot, and
    /// whatever happened at the end).
    fn finish(&mut self, stats: &mut CopyStats) -> Result<()> {
        self.seal(stats)?;
        self.flush(stats)
    }
}
