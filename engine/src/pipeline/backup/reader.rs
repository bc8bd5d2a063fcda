//! The reader thread: turns disks into numbered batches of whole chunks
//! (data extents read into free buffers, or cut straight from a mapping;
//! holes and an incremental's clean ranges as extents to reuse).

use std::io::Read;
use std::ops::Range;

use crossbeam_channel::{Receiver, Sender};

use super::resume::{read_prefix, Prefix};
use super::{Batch, BatchBody, Buffers};
use crate::chunker::ChunkingParams;
use crate::error::{Error, Result};
use crate::pipeline::failure::Failure;
use crate::pipeline::input::{BackupDisk, ChangedBlocks, DiskInput};
use crate::progress::CancelToken;
use crate::source::{align_extents, DiskSource, MappedDisk};

/// The reader's side of the pipeline: numbers batches, hands them to the
/// workers, and takes free buffer pairs (noticing an abort while waiting).
pub(super) struct Feed<'a> {
    chunking: ChunkingParams,
    batch_size: usize,
    disk: usize,
    seq: u64,
    free_rx: &'a Receiver<Buffers>,
    free_tx: &'a Sender<Buffers>,
    work_tx: &'a Sender<Batch>,
    failure: &'a Failure,
    cancel: &'a CancelToken,
}

impl<'a> Feed<'a> {
    /// A feed starting at the first disk.
    pub(super) fn new(
        chunking: ChunkingParams,
        batch_size: usize,
        free_rx: &'a Receiver<Buffers>,
        free_tx: &'a Sender<Buffers>,
        work_tx: &'a Sender<Batch>,
        failure: &'a Failure,
        cancel: &'a CancelToken,
    ) -> Self {
        Feed {
            chunking,
            batch_size,
            disk: 0,
            seq: 0,
            free_rx,
            free_tx,
            work_tx,
            failure,
            cancel,
        }
    }

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
            if self.failure.check(self.cancel) {
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
pub(super) fn read_disks(
    disks: Vec<BackupDisk>,
    prefixes: Vec<Option<Prefix>>,
    mut feed: Feed<'_>,
) -> Result<()> {
    let mut prefixes = prefixes.into_iter();
    for (disk, d) in disks.into_iter().enumerate() {
        feed.disk = disk;
        let prefix = prefixes.next().flatten();
        let running = match d.input {
            DiskInput::Image(src) => read_image(&mut feed, &*src, None, prefix)?,
            DiskInput::Incremental { source, changed } => {
                read_image(&mut feed, &*source, Some(&changed), None)?
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
/// an incremental, the parent's extents. A resumed disk starts with its
/// journaled `prefix` (length, extents), read from its end on. Returns
/// `Ok(false)` on shutdown.
fn read_image(
    feed: &mut Feed<'_>,
    src: &dyn DiskSource,
    changed: Option<&ChangedBlocks>,
    prefix: Option<Prefix>,
) -> Result<bool> {
    // Emits a range not read: a hole, or the parent's extents in pieces.
    let gap = |feed: &mut Feed<'_>, range: Range<u64>| -> Result<bool> {
        if feed.failure.check(feed.cancel) {
            return Ok(false);
        }
        match changed {
            None => Ok(feed.send(BatchBody::Reuse(vec![(range.end - range.start, None)]))),
            Some(c) => c.reuse_pieces(range, 1 << 16, &mut |piece| {
                feed.send(BatchBody::Reuse(piece))
            }),
        }
    };
    let size = src.size();
    let extents = match changed {
        Some(c) => c.dirty().to_vec(),
        None => src.data_extents()?,
    };
    let grid = match feed.chunking {
        ChunkingParams::Fixed { size: grid } => grid as u64,
        _ => 1,
    };
    crate::failpoint::pause("backup-after-extents");
    let map = src.mapped();
    let mut pos = 0u64;
    if let Some(prefix) = prefix {
        // Read back from the journal one record at a time.
        let sent = read_prefix(&prefix.path, &prefix.key, prefix.len, &mut |piece| {
            !feed.failure.check(feed.cancel) && feed.send(BatchBody::Reuse(piece))
        })?;
        if !sent {
            return Ok(false);
        }
        pos = prefix.len;
    }
    for region in align_extents(&extents, grid, size) {
        if region.end <= pos {
            continue;
        }
        let region = region.start.max(pos)..region.end;
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
