//! The assembler (the caller's thread): takes processed batches back in
//! order, appends new blobs to the open pack, hands full packs to a sealer
//! thread (table, fsync, commit) so chunking goes on while a pack is made
//! durable, flushes index segments as they grow, and cuts the disks'
//! extent lists into extent pages, stored as chunks beside the data.

use std::collections::BTreeMap;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use super::resume::{Extent, Journal};

use super::worker::Claims;
use super::{BackupOptions, BackupStats, Buffers, Done, DoneBody, Excluded};
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId};
use crate::pipeline::failure::Failure;
use crate::store::blob::BlobCodec;
use crate::store::extent_page::{PageBuilder, SealedPage};
use crate::store::index::{Index, SegmentBuilder};
use crate::store::manifest::DiskManifest;
use crate::store::pack::{PackEntry, PackWriter};
use crate::store::pool::Pool;

/// What the assembler needs from the pipeline.
pub(super) struct Context<'a> {
    pub(super) pool: &'a dyn Pool,
    pub(super) index: &'a Index,
    /// Stored copies not reused (see `Excluded`).
    pub(super) excluded: &'a Excluded,
    /// Called before each index segment is written (see `backup::run`).
    pub(super) guard: &'a (dyn Fn() -> Result<()> + Sync),
    pub(super) claims: &'a Claims,
    pub(super) failure: &'a Failure,
    pub(super) opts: &'a BackupOptions,
    pub(super) free_tx: &'a Sender<Buffers>,
}

/// Journals of the disks that keep one (see `resume`), with the offset
/// up to which each is journaled.
pub(super) struct Journals {
    pub(super) journals: Vec<Option<Journal>>,
    pub(super) done: Vec<u64>,
}

/// Append to the journals when this many bytes are durable and unjournaled
/// and no pack is pending.
const JOURNAL_EVERY: u64 = 64 << 20;

/// A disk as the manifest will name it.
pub(super) struct DiskMeta {
    pub(super) name: String,
    pub(super) properties: BTreeMap<String, String>,
    /// The source's size (streams: unknown).
    pub(super) size: Option<u64>,
}

/// The assembled backup: extent lists, counters, and the index entries of
/// the packs sealed since the last segment flush.
pub(super) struct Assembled {
    pub(super) disks: Vec<DiskManifest>,
    pub(super) stats: BackupStats,
    pub(super) segment: SegmentBuilder,
}

type Sealed = Result<(PackId, Vec<PackEntry>, u64)>;

/// The assembler's state between batches.
struct State<'a> {
    ctx: &'a Context<'a>,
    out: Assembled,
    pack: Option<PackWriter>,
    seal_tx: Option<Sender<PackWriter>>,
    sealed_rx: Receiver<Sealed>,
    /// The disk whose batches came last (announced through the progress).
    current_disk: Option<usize>,
    journals: Journals,
    /// Per pack handed to the sealer, in order: the (disk, offset) up to
    /// which every extent is durable once that pack is sealed.
    watermarks: std::collections::VecDeque<(usize, u64)>,
    /// Bytes of extents pushed since the last journal append.
    unjournaled: u64,
    /// Per disk: cuts its extents into pages.
    pages: Vec<Option<PageBuilder>>,
    /// Per disk with a journal: the extents not yet journaled.
    recent: Vec<DiskManifest>,
    /// Compresses pages.
    codec: BlobCodec,
}

/// Consumes every processed batch, in order, and returns the assembled
/// backup. On a reader or worker failure it still seals what was already
/// processed (the work is durable: the next backup indexes those packs from
/// their tables and reuses them), then returns the failure.
pub(super) fn assemble(
    ctx: &Context<'_>,
    done_rx: Receiver<Done>,
    meta: Vec<DiskMeta>,
    journals: Journals,
) -> Result<Assembled> {
    let disks = meta
        .iter()
        .map(|m| {
            let mut d = DiskManifest::new(m.name.clone());
            d.properties = m.properties.clone();
            d
        })
        .collect();
    // At most one full pack waits while another seals.
    let (seal_tx, seal_rx) = bounded::<PackWriter>(1);
    let (sealed_tx, sealed_rx) = unbounded::<Sealed>();
    let mut state = State {
        ctx,
        out: Assembled {
            disks,
            stats: BackupStats::empty(),
            segment: SegmentBuilder::new(),
        },
        pack: None,
        seal_tx: Some(seal_tx),
        sealed_rx,
        current_disk: None,
        journals,
        watermarks: std::collections::VecDeque::new(),
        unjournaled: 0,
        pages: meta
            .iter()
            .map(|_| {
                ctx.opts
                    .extent_pages
                    .then(|| PageBuilder::new(ctx.opts.chunking))
            })
            .collect(),
        recent: meta.iter().map(|_| DiskManifest::default()).collect(),
        codec: BlobCodec::new(ctx.opts.compression),
    };
    let outcome = std::thread::scope(|scope| {
        scope.spawn(move || seal_packs(seal_rx, sealed_tx));
        let result = state
            .take_batches(done_rx)
            .and_then(|()| state.close_pages());
        state.finish(result)
    });
    outcome?;
    if ctx.failure.aborted() {
        return Err(ctx
            .failure
            .take()
            .unwrap_or_else(|| Error::Internal("backup aborted".into())));
    }
    check_sizes(&state.out.disks, &meta)?;
    Ok(state.out)
}

/// The sealer thread: finishes packs one after another until the queue
/// closes or one fails.
fn seal_packs(seal_rx: Receiver<PackWriter>, sealed_tx: Sender<Sealed>) {
    for pack in seal_rx.iter() {
        let result = pack.finish();
        let failed = result.is_err();
        let _ = sealed_tx.send(result);
        if failed {
            break;
        }
    }
}

/// Every disk of known size must have been read to its end.
fn check_sizes(disks: &[DiskManifest], meta: &[DiskMeta]) -> Result<()> {
    for (disk, m) in disks.iter().zip(meta) {
        if let Some(size) = m.size {
            if disk.size != size {
                return Err(Error::Internal(format!(
                    "disk {:?}: read {} bytes of {size}",
                    m.name, disk.size
                )));
            }
        }
    }
    Ok(())
}

impl State<'_> {
    /// Takes batches in sequence order until the workers are done.
    fn take_batches(&mut self, done_rx: Receiver<Done>) -> Result<()> {
        let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
        let mut next = 0u64;
        for done in done_rx.iter() {
            pending.insert(done.seq, done);
            while let Some(done) = pending.remove(&next) {
                next += 1;
                self.take(done)?;
            }
        }
        if !pending.is_empty() && !self.ctx.failure.aborted() {
            return Err(Error::Internal("backup pipeline lost a batch".into()));
        }
        Ok(())
    }

    /// Adds one batch to its disk's extent list; new blobs go to the pack.
    fn take(&mut self, done: Done) -> Result<()> {
        let progress = &*self.ctx.opts.progress;
        let disk = done.disk;
        let Some(name) = self.out.disks.get(disk).map(|d| d.name.as_str()) else {
            return Err(Error::Internal("batch for unknown disk".into()));
        };
        if self.current_disk != Some(disk) {
            progress.message(name);
            self.current_disk = Some(disk);
        }
        match done.body {
            DoneBody::Reuse(extents) => {
                for (len, id) in extents {
                    self.push_extent(disk, len, id)?;
                    progress.advance(len);
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
                self.out.stats.bytes_read += bytes_read;
                for (id, raw_len, range) in new_blobs {
                    self.add_blob(id, raw_len, &buffers.output[range], true)?;
                }
                let mut advanced = 0;
                for (len, id) in chunks {
                    self.push_extent(disk, len as u64, id)?;
                    advanced += len as u64;
                }
                progress.advance(advanced);
                let _ = self.ctx.free_tx.send(buffers);
            }
        }
        if self.unjournaled >= JOURNAL_EVERY && self.watermarks.is_empty() {
            match self.pack.take() {
                // Nothing pending: everything pushed is durable.
                None => {
                    let end = self.position();
                    self.journal_upto(end);
                }
                // Mostly deduplicated data fills a pack slowly: seal it
                // early when a journal waits on it, so the extents kept
                // for the journal stay bounded (≈ JOURNAL_EVERY of them).
                Some(p) if self.journals.journals.iter().any(Option::is_some) => {
                    self.seal(p)?;
                    self.absorb(false)?;
                }
                Some(p) => self.pack = Some(p),
            }
        }
        Ok(())
    }

    /// The (disk, offset) the extent lists have reached.
    fn position(&self) -> (usize, u64) {
        let disk = self.current_disk.unwrap_or(0);
        (disk, self.out.disks.get(disk).map_or(0, |d| d.size))
    }

    /// Appends to the journals every extent up to `(disk, offset)`. A
    /// journal that cannot be written is dropped (resume is a saving, not
    /// a promise; a gap must never be journaled).
    fn journal_upto(&mut self, (disk, offset): (usize, u64)) {
        self.unjournaled = 0;
        for d in 0..=disk {
            let Some(Some(journal)) = self.journals.journals.get_mut(d) else {
                continue;
            };
            let Some(manifest) = self.out.disks.get(d) else {
                continue;
            };
            let target = if d < disk { manifest.size } else { offset };
            let mut at = self.journals.done[d];
            let Some(recent) = self.recent.get_mut(d) else {
                continue;
            };
            let mut i = recent
                .extents
                .partition_point(|e| e.offset + e.length <= at);
            let mut out: Vec<Extent> = Vec::new();
            while at < target {
                let Some(e) = recent.extents.get(i) else {
                    break;
                };
                let end = e.offset + e.length;
                let stop = end.min(target);
                if e.chunk.is_some() && (at != e.offset || stop != end) {
                    // A chunk cut in two: never (positions fall between
                    // extents); stop journaling rather than record it.
                    break;
                }
                out.push((stop - at, e.chunk));
                at = stop;
                if stop == end {
                    i += 1;
                }
            }
            // Keep only what is not journaled yet.
            let whole = recent
                .extents
                .partition_point(|e| e.offset + e.length <= at);
            recent.extents.drain(..whole);
            self.journals.done[d] = at;
            if journal.append(&out).is_err() {
                self.journals.journals[d] = None;
            }
        }
    }

    fn push_extent(&mut self, disk: usize, len: u64, id: Option<ChunkId>) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut sealed = Vec::new();
        match (self.pages.get_mut(disk), self.out.disks.get_mut(disk)) {
            (Some(Some(pages)), Some(d)) => {
                pages.push(len, id, &mut sealed);
                d.size += len;
            }
            // Version 1: the extent list itself.
            (_, Some(d)) => d.push(len, id),
            _ => {}
        }
        if matches!(self.journals.journals.get(disk), Some(Some(_))) {
            if let Some(r) = self.recent.get_mut(disk) {
                r.push(len, id);
            }
        }
        self.unjournaled += len;
        if id.is_some() {
            self.out.stats.chunks_total += 1;
        }
        for page in sealed {
            self.store_page(disk, page)?;
        }
        Ok(())
    }

    /// Closes every disk's last page (all batches are in).
    fn close_pages(&mut self) -> Result<()> {
        for disk in 0..self.pages.len() {
            let mut sealed = Vec::new();
            if let Some(pages) = self.pages.get_mut(disk).and_then(Option::take) {
                pages.finish(&mut sealed);
            }
            for page in sealed {
                self.store_page(disk, page)?;
            }
        }
        Ok(())
    }

    /// Records a sealed page in its disk's manifest and stores it as a
    /// chunk unless the pool (or this backup) already holds it.
    fn store_page(&mut self, disk: usize, page: SealedPage) -> Result<()> {
        let SealedPage { bytes, reference } = page;
        if let Some(d) = self.out.disks.get_mut(disk) {
            d.pages.push(reference);
        }
        let id = reference.id;
        let stored = self
            .ctx
            .index
            .lookup(&id)
            .is_some_and(|loc| self.ctx.excluded.reusable(&id, &loc));
        if stored || !self.ctx.claims.claim(&id) {
            return Ok(());
        }
        let mut blob = Vec::with_capacity(bytes.len() / 2 + 64);
        self.codec
            .encode_into(&bytes, &mut blob)
            .map_err(|e| Error::Internal(format!("compressing extent page {id}: {e}")))?;
        self.out.stats.pages_new += 1;
        self.add_blob(id, bytes.len() as u32, &blob, false)
    }

    /// Appends a new blob to the open pack, sealing it when full. `data`:
    /// a chunk of disk data (counted as such), not an extent page.
    fn add_blob(&mut self, id: ChunkId, raw_len: u32, blob: &[u8], data: bool) -> Result<()> {
        let writer = match &mut self.pack {
            Some(p) => p,
            None => self.pack.insert(PackWriter::create(self.ctx.pool)?),
        };
        if let Err(e) = writer.add(id, raw_len, blob) {
            // Never seal a pack whose write failed part-way: its table
            // would name bytes that are not there.
            self.pack = None;
            return Err(e);
        }
        if data {
            self.out.stats.chunks_new += 1;
            self.out.stats.bytes_new_raw += raw_len as u64;
        }
        let opts = self.ctx.opts;
        if writer.raw_bytes() >= opts.pack_max_input || writer.stored_bytes() >= opts.pack_target {
            if let Some(p) = self.pack.take() {
                self.seal(p)?;
            }
            self.absorb(false)?;
        }
        Ok(())
    }

    fn seal(&mut self, pack: PackWriter) -> Result<()> {
        // Extents pushed so far reference blobs of this pack or earlier.
        let mark = self.position();
        self.watermarks.push_back(mark);
        match self.seal_tx.as_ref().map(|tx| tx.send(pack)) {
            Some(Ok(())) => Ok(()),
            // The sealer stopped on an error: it is in `sealed_rx`.
            _ => Err(Error::Internal("pack sealer stopped".into())),
        }
    }

    /// Takes finished seals into the pending segment (waiting for all of
    /// them when `wait`) and flushes the segment once it is large.
    fn absorb(&mut self, wait: bool) -> Result<()> {
        loop {
            let next = if wait {
                self.sealed_rx.recv().ok()
            } else {
                self.sealed_rx.try_recv().ok()
            };
            let Some(next) = next else { break };
            let (id, entries, size) = next?;
            if let Some(mark) = self.watermarks.pop_front() {
                self.journal_upto(mark);
            }
            self.out.segment.add_entries(id, &entries);
            self.out.stats.bytes_new += size;
            self.out.stats.packs_written += 1;
        }
        if self.out.segment.len() >= self.ctx.opts.segment_flush_entries {
            let full = std::mem::take(&mut self.out.segment);
            let flushed: Vec<ChunkId> = full.ids().collect();
            (self.ctx.guard)()?;
            let (name, seg, len) = full.write(self.ctx.pool)?;
            self.out.stats.bytes_new += len;
            self.ctx.index.push(name, seg);
            // These chunks are now found by index lookups.
            self.ctx.claims.release(&flushed);
        }
        Ok(())
    }

    /// Whatever happened, seals what was written so far and waits for the
    /// sealer. A sealing error is the more precise one (it names the pack).
    fn finish(&mut self, result: Result<()>) -> Result<()> {
        let mut result = result;
        if let Some(p) = self.pack.take() {
            let sealed = self.seal(p);
            if result.is_ok() {
                result = sealed;
            }
        }
        // Closing the queue lets the sealer finish and exit.
        self.seal_tx = None;
        match (result, self.absorb(true)) {
            (_, Err(e)) => Err(e),
            (r, Ok(())) => r,
        }
    }
}
