//! Worker threads: zero check, hash, one batched index lookup, and zstd for
//! the chunks that are new and claimed by this backup.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use super::{Batch, BatchBody, Done, DoneBody, Excluded};
use crate::chunker::is_zero;
use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::store::blob::{BlobCodec, Compression};
use crate::store::index::Index;

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
pub(super) struct Claims {
    shards: Vec<Mutex<IdSet>>,
}

impl Claims {
    pub(super) fn new() -> Self {
        Claims {
            shards: (0..64).map(|_| Mutex::new(IdSet::default())).collect(),
        }
    }
    /// True if this caller is the first to claim `id`.
    pub(super) fn claim(&self, id: &ChunkId) -> bool {
        self.shards[(id.0[1] & 63) as usize].lock().insert(*id)
    }
    /// Forgets claims whose chunks are now in the index.
    pub(super) fn release(&self, ids: &[ChunkId]) {
        for id in ids {
            self.shards[(id.0[1] & 63) as usize].lock().remove(id);
        }
    }
}

/// Where a worker looks chunks up: the index, minus the copies a backup
/// passes over (see `Excluded`).
#[derive(Clone, Copy)]
pub(super) struct Lookup<'a> {
    pub(super) index: &'a Index,
    pub(super) excluded: &'a Excluded,
}

/// Worker thread: zero check, hash, dedup, compress.
pub(super) fn work(
    work_rx: &Receiver<Batch>,
    done_tx: &Sender<Done>,
    index: Lookup<'_>,
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
                index.index.lookup_many(&ids, &mut found);
                if !index.excluded.is_empty() {
                    for (f, id) in found.iter_mut().zip(&ids) {
                        if f.is_some_and(|l| !index.excluded.reusable(id, &l)) {
                            *f = None;
                        }
                    }
                }
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
