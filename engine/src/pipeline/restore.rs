//! The restore pipeline: manifest → chunk reads (verified against their ids)
//! → writes at each extent's offset into a [`DiskTarget`]. Zero extents are
//! never written, so a sparse file keeps them as holes.
//!
//! The caller's thread walks the extents and feeds a bounded queue; worker
//! threads look chunks up, read and decode their blobs, check the BLAKE3 id,
//! and `pwrite` the data. Memory is bounded by the queue, not the disk.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use std::collections::HashMap;

use crossbeam_channel::bounded;

use crate::chunker::ChunkingParams;
use crate::error::{Error, Result};
use crate::external_sort::{
    sort_budget, ExternalSorter, FieldReader, FieldWriter, Record, ScratchDir, Sorted,
};
use crate::id::{ChunkId, PackId, SnapshotId};
use crate::kind::FileKind;
use crate::pipeline::extents::{decode_chunk, decode_other_copy, DiskExtents, Store};
use crate::pipeline::failure::Failure;
use crate::pipeline::input::validate_disk_name;
use crate::pipeline::{read_pack_range, worker_threads};
use crate::progress::{CancelToken, NoProgress, Progress};
use crate::source::{DiskTarget, SparseFileTarget};
use crate::store::blob::{BlobCodec, Compression};
use crate::store::manifest::{DiskManifest, Snapshot};
use crate::store::wire::DecodeError;

/// Restore settings. Start from [`RestoreOptions::default`] and change what
/// differs.
#[derive(Clone)]
#[non_exhaustive]
pub struct RestoreOptions {
    /// Worker threads (`None`: one per CPU).
    pub threads: Option<NonZeroUsize>,
    /// Replace existing target files.
    pub overwrite: bool,
    /// Restore only the disks with these names (`None`: every disk).
    pub disks: Option<Vec<String>>,
    /// Receives progress (default: none).
    pub progress: Arc<dyn Progress>,
    /// Stops the restore when triggered; its targets are discarded.
    pub cancel: CancelToken,
    /// Writes to the targets pass this throttle (a rate limit on writes;
    /// limit reads by restoring from a [`ThrottledPool`](crate::jobs::ThrottledPool)).
    pub write_throttle: Option<Arc<crate::jobs::Throttle>>,
    /// Largest write request to a target in bytes (spec R7's write buffer,
    /// 64 KiB–8 MiB; `None`: whole read runs, up to 4 MiB, or a chunk).
    /// Each piece passes the write throttle on its own.
    pub write_size: Option<usize>,
    /// Disks restored at the same time (spec R7's disks per VM, 1–64;
    /// default 1), the worker threads shared out among them.
    pub parallel_disks: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            threads: None,
            overwrite: false,
            disks: None,
            progress: Arc::new(NoProgress),
            cancel: CancelToken::new(),
            write_throttle: None,
            write_size: None,
            parallel_disks: 1,
        }
    }
}

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("threads", &self.threads)
            .field("overwrite", &self.overwrite)
            .field("disks", &self.disks)
            .finish_non_exhaustive()
    }
}

impl RestoreOptions {
    crate::pipeline::job_control_setters!();

    /// Allows replacing existing target files.
    pub fn with_overwrite(mut self, overwrite: bool) -> Self {
        self.overwrite = overwrite;
        self
    }

    /// Restores only the named disks.
    pub fn with_disks<I: IntoIterator<Item = S>, S: Into<String>>(mut self, disks: I) -> Self {
        self.disks = Some(disks.into_iter().map(Into::into).collect());
        self
    }

    /// Restores up to `n` disks at the same time.
    pub fn with_parallel_disks(mut self, n: usize) -> Self {
        self.parallel_disks = n;
        self
    }

    /// Writes to the targets in requests of at most `bytes` (64 KiB–8 MiB).
    pub fn with_write_size(mut self, bytes: usize) -> Self {
        self.write_size = Some(bytes);
        self
    }

    /// Writes to the targets pass `throttle` first.
    pub fn with_write_throttle(mut self, throttle: Arc<crate::jobs::Throttle>) -> Self {
        self.write_throttle = Some(throttle);
        self
    }
}

/// What a restore did.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct RestoreStats {
    /// The snapshot restored.
    pub snapshot: SnapshotId,
    /// Disks restored.
    pub disks: usize,
    /// Sum of the restored disks' logical sizes.
    pub bytes_logical: u64,
    /// Bytes of chunk data written (zero extents are holes).
    pub bytes_written: u64,
    /// Chunks read and verified.
    pub chunks: u64,
    /// Wall time.
    pub seconds: f64,
}

impl std::fmt::Display for RestoreStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "restored snapshot {} ({} disks, {} bytes logical, {} written) in {:.2}s",
            self.snapshot, self.disks, self.bytes_logical, self.bytes_written, self.seconds
        )
    }
}

/// A function making the target for one disk of the snapshot.
pub type MakeTarget<'a> = dyn Fn(&DiskManifest) -> Result<Box<dyn DiskTarget>> + 'a;

/// A target maker writing each disk as a sparse raw file `dir/<disk name>`
/// (the directory is created first).
pub(crate) fn dir_targets(dir: &Path, overwrite: bool) -> Result<Box<MakeTarget<'_>>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating restore directory {}", dir.display()), e))?;
    Ok(Box::new(move |disk: &DiskManifest| {
        validate_disk_name(&disk.name)?;
        let t = SparseFileTarget::create(&dir.join(&disk.name), disk.size, overwrite)?;
        Ok(Box::new(t) as Box<dyn DiskTarget>)
    }))
}

/// Restores the disks of `snapshot` (selected by `opts.disks`) into targets
/// made by `make_target`. A target is finished (made visible) only when its
/// disk is complete; on any failure the unfinished ones are dropped.
pub(crate) fn run(
    store: &Store<'_>,
    id: &SnapshotId,
    snapshot: &Snapshot,
    make_target: &MakeTarget<'_>,
    opts: &RestoreOptions,
) -> Result<RestoreStats> {
    let started = Instant::now();
    // Readers: one per worker thread, or more where each read waits on the
    // network (the pool says how many it wants in flight).
    let threads =
        worker_threads(opts.threads).max(store.pool.preferred_read_concurrency().unwrap_or(0));
    let progress: &dyn Progress = &*opts.progress;
    let disks: Vec<&DiskManifest> = match &opts.disks {
        None => snapshot.disks.iter().collect(),
        Some(names) => select_disks(id, snapshot, names)?,
    };
    let bytes_logical = disks.iter().map(|d| d.size).sum();
    progress.start(bytes_logical);
    let mut stats = RestoreStats {
        snapshot: *id,
        disks: disks.len(),
        bytes_logical,
        bytes_written: 0,
        chunks: 0,
        seconds: 0.0,
    };
    if !(1..=64).contains(&opts.parallel_disks) {
        return Err(Error::InvalidArgument(format!(
            "parallel disks: {} is out of range (1–64)",
            opts.parallel_disks
        )));
    }
    if let Some(size) = opts.write_size {
        if !(64 << 10..=8 << 20).contains(&size) {
            return Err(Error::InvalidArgument(format!(
                "write size {size} is out of range (64 KiB–8 MiB)"
            )));
        }
    }
    // Every target first, so a failure to create one leaves nothing behind.
    let mut targets: Vec<Box<dyn DiskTarget>> = Vec::with_capacity(disks.len());
    for disk in &disks {
        let mut target = make_target(disk)?;
        if let Some(t) = &opts.write_throttle {
            target = Box::new(crate::jobs::ThrottledTarget::new(target, t.clone()));
        }
        if let Some(max) = opts.write_size {
            target = Box::new(SplitWrites { inner: target, max });
        }
        targets.push(target);
    }
    if sequential_media(store, &disks)? {
        // Tape: every chunk of every disk sorted by where it lies, so each
        // cartridge is passed once.
        restore_in_medium_order(
            store,
            id,
            snapshot.chunking,
            &disks,
            &targets,
            threads,
            opts,
        )?;
    } else if opts.parallel_disks > 1 && disks.len() > 1 {
        restore_parallel(
            store,
            id,
            snapshot.chunking,
            &disks,
            &targets,
            threads,
            opts,
        )?;
    } else {
        for (disk, target) in disks.iter().zip(&targets) {
            progress.message(&disk.name);
            restore_disk(store, id, snapshot.chunking, disk, &**target, threads, opts)?;
            crate::failpoint::pause("restore-after-disk");
        }
    }
    for disk in &disks {
        stats.bytes_written += disk.data_bytes();
        stats.chunks += disk.chunk_count();
    }
    // Every disk is complete: publish them (unless cancelled meanwhile:
    // a cancelled restore publishes nothing).
    opts.cancel.check()?;
    for target in targets {
        target.finish()?;
    }
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// Restores up to `opts.parallel_disks` disks at once, each lane taking
/// the next disk when it finishes one, with `threads` shared out; the
/// first failure stops further disks from starting and is returned once
/// the running ones end.
fn restore_parallel(
    store: &Store<'_>,
    id: &SnapshotId,
    chunking: ChunkingParams,
    disks: &[&DiskManifest],
    targets: &[Box<dyn DiskTarget>],
    threads: usize,
    opts: &RestoreOptions,
) -> Result<()> {
    // Each lane takes at least one worker: never more lanes than workers.
    let lanes = opts.parallel_disks.min(disks.len()).min(threads.max(1));
    let per_lane = (threads / lanes).max(1);
    // The lanes stop together: on the caller's cancel or a lane's failure.
    let mut lane_opts = opts.clone();
    lane_opts.cancel = CancelToken::new();
    let items: Vec<_> = disks.iter().zip(targets).collect();
    crate::pipeline::lanes::run_lanes(
        items,
        lanes,
        &opts.cancel,
        &lane_opts.cancel,
        |(disk, target)| {
            lane_opts.progress.message(&disk.name);
            restore_disk(store, id, chunking, disk, &**target, per_lane, &lane_opts)
        },
    )?;
    Ok(())
}

/// The disks named in `names`, in the snapshot's order; an unknown name is
/// an error.
fn select_disks<'a>(
    id: &SnapshotId,
    snapshot: &'a Snapshot,
    names: &[String],
) -> Result<Vec<&'a DiskManifest>> {
    for n in names {
        if !snapshot.disks.iter().any(|d| &d.name == n) {
            return Err(Error::InvalidArgument(format!(
                "snapshot {id} has no disk {n:?} (it has: {})",
                snapshot
                    .disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok(snapshot
        .disks
        .iter()
        .filter(|d| names.contains(&d.name))
        .collect())
}

/// A target written in requests of at most `max` bytes.
struct SplitWrites {
    inner: Box<dyn DiskTarget>,
    max: usize,
}

impl DiskTarget for SplitWrites {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut at = offset;
        for piece in data.chunks(self.max) {
            self.inner.write_at(at, piece)?;
            at += piece.len() as u64;
        }
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.inner.finish()
    }
}

/// Most decoded bytes one read run covers.
const RUN_MAX: u64 = 4 << 20;

/// Chunks whose blobs lie back to back in one pack and whose extents lie back
/// to back on the disk: read with one range read, written with one `pwrite`.
struct Run {
    pack: PackId,
    pack_offset: u64,
    pack_len: u64,
    disk_offset: u64,
    disk_len: u64,
    /// (chunk id, blob length, extent length)
    chunks: Vec<(ChunkId, u32, u64)>,
}

/// Reads and verifies one run into `out` (cleared first).
fn read_run(
    store: &Store<'_>,
    codec: &mut BlobCodec,
    snapshot: &SnapshotId,
    disk: &DiskManifest,
    run: &Run,
    out: &mut Vec<u8>,
) -> Result<()> {
    let needed_by = || {
        format!(
            "snapshot {snapshot}, disk {:?} at offset {}",
            disk.name, run.disk_offset
        )
    };
    // A run that cannot be read for damage (its pack gone or short) is
    // read chunk by chunk from other copies (`Err`: why it could not).
    let blobs = match read_pack_range(
        store.pool,
        run.pack,
        (run.pack_offset, run.pack_len),
        run.chunks.first().map(|c| c.0),
        needed_by,
    ) {
        Err(e) if !e.is_damage() => return Err(e),
        read => read,
    };
    out.clear();
    let mut at = 0usize;
    let mut disk_at = run.disk_offset;
    for (id, blob_len, extent_len) in &run.chunks {
        let before = out.len();
        match &blobs {
            Ok(blobs) => {
                let blob = blobs.get(at..at + *blob_len as usize).unwrap_or_default();
                let offset = run.pack_offset + at as u64;
                if let Err(e) = decode_chunk(codec, blob, id, run.pack, offset, out) {
                    // A damaged blob (`out` left as it was): another copy
                    // the index names, if any.
                    if !e.is_damage()
                        || !decode_other_copy(store, codec, id, run.pack, &needed_by, out)?
                    {
                        return Err(e);
                    }
                }
            }
            Err(_) => {
                if !decode_other_copy(store, codec, id, run.pack, &needed_by, out)? {
                    // No copy: the run's own read error (`blobs` is `Err`).
                    return blobs.map(drop);
                }
            }
        }
        if (out.len() - before) as u64 != *extent_len {
            return Err(Error::corrupt(
                format!("snapshot {snapshot}"),
                DecodeError::Invalid(format!(
                    "disk {:?}: extent at {disk_at} is {extent_len} bytes but chunk {id} holds {}",
                    disk.name,
                    out.len() - before
                )),
            ));
        }
        at += *blob_len as usize;
        disk_at += extent_len;
    }
    Ok(())
}

/// Restores one disk: the caller's thread groups extents into runs, workers
/// read, decode and verify runs, and one writer thread `pwrite`s them (one
/// writer: parallel writes to one file only contend on its inode lock).
fn restore_disk(
    store: &Store<'_>,
    snapshot: &SnapshotId,
    chunking: ChunkingParams,
    disk: &DiskManifest,
    target: &dyn DiskTarget,
    threads: usize,
    opts: &RestoreOptions,
) -> Result<()> {
    let progress: &dyn Progress = &*opts.progress;
    let (run_tx, run_rx) = bounded::<Run>(threads * 4);
    let (write_tx, write_rx) = bounded::<(u64, Vec<u8>)>(threads + 1);
    let buffers = threads + 3;
    let (free_tx, free_rx) = bounded::<Vec<u8>>(buffers);
    for _ in 0..buffers {
        let _ = free_tx.send(Vec::with_capacity(RUN_MAX as usize + (1 << 20)));
    }
    let first = Failure::new();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (run_rx, write_tx, free_rx, first) =
                (run_rx.clone(), write_tx.clone(), free_rx.clone(), &first);
            scope.spawn(move || {
                let mut codec = BlobCodec::new(Compression::None);
                for run in run_rx.iter() {
                    if first.aborted() {
                        break;
                    }
                    let Ok(mut buf) = free_rx.recv() else { break };
                    match read_run(store, &mut codec, snapshot, disk, &run, &mut buf) {
                        Ok(()) => {
                            if write_tx.send((run.disk_offset, buf)).is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            first.set(e);
                            break;
                        }
                    }
                }
            });
        }
        drop(run_rx);
        drop(write_tx);
        {
            let (first, free_tx) = (&first, free_tx.clone());
            scope.spawn(move || {
                for (offset, buf) in write_rx.iter() {
                    if !first.aborted() {
                        match target.write_at(offset, &buf) {
                            Ok(()) => progress.advance(buf.len() as u64),
                            Err(e) => first.set(e),
                        }
                    }
                    let _ = free_tx.send(buf);
                }
            });
        }
        if let Err(e) = send_runs(store, snapshot, chunking, disk, &run_tx, &first, opts) {
            first.set(e);
        }
        drop(run_tx);
        drop(free_tx);
    });
    match first.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Walks the disk's extents, grouping chunks whose blobs lie back to back in
/// one pack into runs, and sends them to the workers. Zero extents only
/// advance the progress. Stops early when the pipeline failed or the caller
/// cancelled.
fn send_runs(
    store: &Store<'_>,
    snapshot: &SnapshotId,
    chunking: ChunkingParams,
    disk: &DiskManifest,
    run_tx: &crossbeam_channel::Sender<Run>,
    first: &Failure,
    opts: &RestoreOptions,
) -> Result<()> {
    let mut current: Option<Run> = None;
    let send = |run: Option<Run>| -> bool { run.is_none_or(|r| run_tx.send(r).is_ok()) };
    let mut refreshed = false;
    for e in DiskExtents::new(Some(store), *snapshot, chunking, disk) {
        let e = e?;
        if first.check(&opts.cancel) {
            return Ok(());
        }
        let Some(id) = e.chunk else {
            opts.progress.advance(e.length);
            if !send(current.take()) {
                return Ok(());
            }
            continue;
        };
        let Some(loc) = store.locate(&id, &mut refreshed)? else {
            return Err(Error::ChunkMissing {
                chunk: id,
                needed_by: format!(
                    "snapshot {snapshot}, disk {:?} at offset {}",
                    disk.name, e.offset
                ),
            });
        };
        if let Some(run) = &mut current {
            let joins = run.pack == loc.pack
                && run.pack_offset + run.pack_len == loc.offset
                && run.disk_offset + run.disk_len == e.offset
                && run.disk_len + e.length <= RUN_MAX;
            if joins {
                run.pack_len += loc.length as u64;
                run.disk_len += e.length;
                run.chunks.push((id, loc.length, e.length));
                continue;
            }
        }
        let next = Run {
            pack: loc.pack,
            pack_offset: loc.offset,
            pack_len: loc.length as u64,
            disk_offset: e.offset,
            disk_len: e.length,
            chunks: vec![(id, loc.length, e.length)],
        };
        if !send(current.replace(next)) {
            return Ok(());
        }
    }
    if !first.check(&opts.cancel) {
        send(current.take());
    }
    Ok(())
}

/// Whether the pool wants reads in medium order (tape): asked about the
/// pack of the first chunk the disks need.
fn sequential_media(store: &Store<'_>, disks: &[&DiskManifest]) -> Result<bool> {
    // A version 2 disk's first page is a chunk in a pack as well.
    let first = disks.iter().find_map(|d| {
        d.pages
            .first()
            .map(|p| p.id)
            .or_else(|| d.extents.iter().find_map(|e| e.chunk))
    });
    let Some(first) = first else {
        return Ok(false);
    };
    let mut refreshed = false;
    Ok(store.locate(&first, &mut refreshed)?.is_some_and(|l| {
        store
            .pool
            .read_order(FileKind::Pack, &l.pack.to_hex())
            .is_some()
    }))
}

/// One chunk extent of a disk, sorted by where its blob lies on the medium.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Placed {
    order: u64,
    pack: PackId,
    pack_offset: u64,
    blob_len: u32,
    disk: u32,
    disk_offset: u64,
    extent_len: u32,
    id: ChunkId,
}

impl Record for Placed {
    const LEN: usize = 84;
    fn put(&self, out: &mut [u8]) {
        FieldWriter::new(out)
            .u64(self.order)
            .bytes(self.pack.as_bytes())
            .u64(self.pack_offset)
            .u32(self.blob_len)
            .u32(self.disk)
            .u64(self.disk_offset)
            .u32(self.extent_len)
            .bytes(&self.id.0);
    }
    fn get(b: &[u8]) -> Self {
        let mut r = FieldReader::new(b);
        Placed {
            order: r.u64(),
            pack: PackId(r.array()),
            pack_offset: r.u64(),
            blob_len: r.u32(),
            disk: r.u32(),
            disk_offset: r.u64(),
            extent_len: r.u32(),
            id: ChunkId(r.array()),
        }
    }
}

/// Most pieces one run of the medium-order restore carries (a disk full of
/// one repeated chunk must not build a run of millions of pieces).
const MAX_PIECES: usize = 4096;

/// Blobs back to back in one pack, read at once, and where each goes.
struct PlacedRun {
    pack: PackId,
    offset: u64,
    len: u64,
    /// (chunk, blob length) in pack order.
    blobs: Vec<(ChunkId, u32)>,
    /// (blob index, disk, offset in the disk, extent length).
    pieces: Vec<(usize, u32, u64, u32)>,
}

/// Restores every disk at once in the order the medium holds the chunks:
/// the extents are sorted by (pack position, offset) on scratch disk, one
/// thread reads the runs front to back, workers decode, verify and write
/// each piece at its place.
fn restore_in_medium_order(
    store: &Store<'_>,
    snapshot: &SnapshotId,
    chunking: ChunkingParams,
    disks: &[&DiskManifest],
    targets: &[Box<dyn DiskTarget>],
    threads: usize,
    opts: &RestoreOptions,
) -> Result<()> {
    let scratch = ScratchDir::new(None)?;
    let mut sorter = ExternalSorter::<Placed>::new(&scratch, "restore", sort_budget(), false);
    let mut orders: HashMap<PackId, u64> = HashMap::new();
    let mut refreshed = false;
    for (d, disk) in disks.iter().enumerate() {
        opts.progress.message(&disk.name);
        for e in DiskExtents::new(Some(store), *snapshot, chunking, disk) {
            let e = e?;
            opts.cancel.check()?;
            let Some(id) = e.chunk else {
                opts.progress.advance(e.length);
                continue;
            };
            let Some(loc) = store.locate(&id, &mut refreshed)? else {
                return Err(Error::ChunkMissing {
                    chunk: id,
                    needed_by: format!(
                        "snapshot {snapshot}, disk {:?} at offset {}",
                        disk.name, e.offset
                    ),
                });
            };
            let order = *orders.entry(loc.pack).or_insert_with(|| {
                store
                    .pool
                    .read_order(FileKind::Pack, &loc.pack.to_hex())
                    .unwrap_or(u64::MAX)
            });
            sorter.push(Placed {
                order,
                pack: loc.pack,
                pack_offset: loc.offset,
                blob_len: loc.length,
                disk: d as u32,
                disk_offset: e.offset,
                extent_len: u32::try_from(e.length)
                    .map_err(|_| Error::Internal(format!("extent of {} bytes", e.length)))?,
                id,
            })?;
        }
    }
    let sorted = sorter.finish()?;
    let first = Failure::new();
    let (run_tx, run_rx) = bounded::<(PlacedRun, bytes::Bytes)>(threads * 2);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (run_rx, first) = (run_rx.clone(), &first);
            scope.spawn(move || {
                let mut codec = BlobCodec::new(Compression::None);
                let mut plain = Vec::new();
                for (run, bytes) in run_rx.iter() {
                    if first.aborted() {
                        continue;
                    }
                    if let Err(e) =
                        write_placed(&mut codec, &mut plain, &run, &bytes, disks, targets, opts)
                    {
                        first.set(e);
                    }
                }
            });
        }
        drop(run_rx);
        if let Err(e) = read_placed_runs(store, snapshot, &sorted, &run_tx, &first, &opts.cancel) {
            first.set(e);
        }
        drop(run_tx);
    });
    match first.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Reads the sorted extents' runs front to back (this thread: the medium
/// sees one reader) and hands them to the decoding workers.
fn read_placed_runs(
    store: &Store<'_>,
    snapshot: &SnapshotId,
    sorted: &Sorted<Placed>,
    run_tx: &crossbeam_channel::Sender<(PlacedRun, bytes::Bytes)>,
    first: &Failure,
    cancel: &CancelToken,
) -> Result<()> {
    let read = |run: PlacedRun| -> Result<bool> {
        let bytes = read_pack_range(
            store.pool,
            run.pack,
            (run.offset, run.len),
            run.blobs.first().map(|b| b.0),
            || format!("snapshot {snapshot}"),
        )?;
        Ok(run_tx.send((run, bytes)).is_ok())
    };
    let mut current: Option<PlacedRun> = None;
    for p in sorted.iter()? {
        let p = p?;
        if first.check(cancel) {
            return Ok(());
        }
        if let Some(run) = &mut current {
            if run.pack == p.pack {
                let last = run.blobs.len() - 1;
                let last_offset = run.offset + run.len - run.blobs[last].1 as u64;
                if p.pack_offset == last_offset && run.pieces.len() < MAX_PIECES {
                    // The same blob again (a chunk at several places).
                    run.pieces.push((last, p.disk, p.disk_offset, p.extent_len));
                    continue;
                }
                if p.pack_offset == run.offset + run.len
                    && run.len + p.blob_len as u64 <= RUN_MAX
                    && run.pieces.len() < MAX_PIECES
                {
                    run.blobs.push((p.id, p.blob_len));
                    run.pieces
                        .push((run.blobs.len() - 1, p.disk, p.disk_offset, p.extent_len));
                    run.len += p.blob_len as u64;
                    continue;
                }
            }
        }
        let next = PlacedRun {
            pack: p.pack,
            offset: p.pack_offset,
            len: p.blob_len as u64,
            blobs: vec![(p.id, p.blob_len)],
            pieces: vec![(0, p.disk, p.disk_offset, p.extent_len)],
        };
        if let Some(run) = current.replace(next) {
            if !read(run)? {
                return Ok(());
            }
        }
    }
    if let Some(run) = current {
        if !first.check(cancel) {
            read(run)?;
        }
    }
    Ok(())
}

/// Decodes and verifies a run's blobs and writes each piece to its disk.
fn write_placed(
    codec: &mut BlobCodec,
    plain: &mut Vec<u8>,
    run: &PlacedRun,
    bytes: &[u8],
    disks: &[&DiskManifest],
    targets: &[Box<dyn DiskTarget>],
    opts: &RestoreOptions,
) -> Result<()> {
    let mut starts = Vec::with_capacity(run.blobs.len());
    let mut at = 0usize;
    for (_, len) in &run.blobs {
        starts.push(at);
        at += *len as usize;
    }
    let mut decoded: Option<usize> = None;
    for &(b, disk, disk_offset, extent_len) in &run.pieces {
        let (id, len) = run.blobs[b];
        if decoded != Some(b) {
            let blob = bytes
                .get(starts[b]..starts[b] + len as usize)
                .unwrap_or_default();
            plain.clear();
            decode_chunk(
                codec,
                blob,
                &id,
                run.pack,
                run.offset + starts[b] as u64,
                plain,
            )?;
            decoded = Some(b);
        }
        let disk_m = disks[disk as usize];
        if plain.len() as u64 != extent_len as u64 {
            return Err(Error::corrupt(
                "snapshot manifest",
                DecodeError::Invalid(format!(
                    "disk {:?}: extent at {disk_offset} is {extent_len} bytes but chunk {id} holds {}",
                    disk_m.name,
                    plain.len()
                )),
            ));
        }
        targets[disk as usize].write_at(disk_offset, plain)?;
        opts.progress.advance(extent_len as u64);
    }
    Ok(())
}
