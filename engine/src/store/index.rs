//! The dedup index: chunk id → (pack, offset, length).
//!
//! The index is a set of immutable **segments**, one written per backup (and
//! replaced wholesale by `repair --index`), so concurrent writers never rewrite a shared
//! file. Each segment is a sorted array searched in place (memory-mapped by the
//! local pool), so a lookup costs a fan-out step and a binary search and needs
//! no per-entry heap memory:
//!
//! ```text
//! header  (32 B)  magic "CAIRNIX1" | version u16 = 1 | reserved u16 = 0
//!                 | pack_count u32 | entry_count u64 | reserved u64 = 0
//! packs           pack_count × 16 B pack ids
//! fan-out         256 × u32: number of entries whose id's first byte ≤ i
//! entries         entry_count × 48 B, strictly ascending by id:
//!                   chunk id [32] | pack index u32 | stored length u32 | offset u64
//! checksum        BLAKE3 of everything above [32]
//! ```
//! Packs are self-describing, so the index can always be rebuilt from them
//! ([`rebuild`]); packs that no segment covers (a backup interrupted after
//! sealing them) are read at load time and their chunks reused.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;

use crate::error::{Error, Result};
use crate::external_sort::{
    sort_budget, ExternalSorter, FieldReader, FieldWriter, Record, ScratchDir, Sorted,
};
use crate::id::{ChunkId, PackId, SegmentId};
use crate::kind::FileKind;
use crate::store::format::{
    BLOB_HEADER_LEN, INDEX_ENTRY_LEN as ENTRY_LEN, INDEX_FANOUT_LEN as FANOUT_LEN,
    INDEX_HEADER_LEN as HEADER_LEN, INDEX_MAGIC_V1, INDEX_VERSION_V1, MAX_CHUNK_SIZE,
    PACK_HEADER_LEN,
};
use crate::store::pack::{read_pack_table, PackEntry};
use crate::store::pool::{Pool, PoolList, PoolRead, PoolWrite};
use crate::store::wire::{split_checksummed, DecodeError, Decoder, Encoder};

/// Where a chunk's blob lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlobLocation {
    pub pack: PackId,
    pub offset: u64,
    pub length: u32,
}

/// One decoded, validated, immutable index segment.
pub struct Segment {
    data: Bytes,
    packs: Vec<PackId>,
    fanout: [u32; 256],
    entries_start: usize,
    entry_count: usize,
    /// The first 8 bytes of every [`SUMMARY_EVERY`]th entry's id (big
    /// endian), so a lookup finds its block of entries in this small,
    /// cache-resident array and touches the mapped segment in one place.
    summary: Vec<u64>,
}

/// One summary key per this many entries (0.125 B of heap per entry;
/// a block is 64 × 48 B = 3 KiB of the segment).
const SUMMARY_EVERY: usize = 64;

/// What a search costs, counted per thread by the unit tests (the module
/// promises one place in the segment per lookup; a walk gives way to a
/// binary search rarely on uniform keys, and always bounds one on keys
/// that are not).
#[cfg(test)]
mod cost {
    use std::cell::Cell;
    thread_local! {
        /// Reads of a segment's entries (an entry read twice counts twice:
        /// a walk reads the key it stops at, then the whole entry).
        pub(super) static ENTRY_READS: Cell<u64> = const { Cell::new(0) };
        /// Binary searches: a walk in a segment that gave way to one, and
        /// `first_at_or_above`'s on the summary.
        pub(super) static BINARY_SEARCHES: Cell<u64> = const { Cell::new(0) };
    }
    pub(super) fn count(what: &'static std::thread::LocalKey<Cell<u64>>) {
        what.with(|c| c.set(c.get() + 1));
    }
    /// Both counts, set back to zero.
    pub(super) fn take() -> (u64, u64) {
        (
            ENTRY_READS.with(|c| c.replace(0)),
            BINARY_SEARCHES.with(|c| c.replace(0)),
        )
    }
}

/// The index of the first key in the sorted `keys` that is at least
/// `key`: ids are uniform hashes, so one interpolation step lands within a
/// few places and a short walk ends there; a walk that goes on (skewed
/// keys) gives way to a binary search.
fn first_at_or_above(keys: &[u64], key: u64) -> usize {
    let (Some(&first), Some(&last)) = (keys.first(), keys.last()) else {
        return 0;
    };
    if key <= first {
        return 0;
    }
    if key > last {
        return keys.len();
    }
    let span = u128::from(last - first).max(1);
    let guess = (u128::from(key - first) * (keys.len() - 1) as u128 / span) as usize;
    let mut at = guess.min(keys.len() - 1);
    for _ in 0..8 {
        if keys[at] < key {
            at += 1;
        } else if at > 0 && keys[at - 1] >= key {
            at -= 1;
        } else {
            return at;
        }
    }
    #[cfg(test)]
    cost::count(&cost::BINARY_SEARCHES);
    keys.partition_point(|k| *k < key)
}

/// The first 8 bytes of an id, big endian: ordered as the ids are.
fn prefix64(id: &[u8]) -> u64 {
    let mut k = [0u8; 8];
    if let Some(b) = id.get(..8) {
        k.copy_from_slice(b);
    }
    u64::from_be_bytes(k)
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("packs", &self.packs.len())
            .field("entries", &self.entry_count)
            .finish()
    }
}

impl Segment {
    /// Validates and wraps an encoded segment: checksum, header, fan-out,
    /// strict ordering and pack references. Never panics.
    pub fn decode(data: Bytes) -> Result<Self, DecodeError> {
        let body = split_checksummed(&data)?;
        let mut d = Decoder::new(body);
        d.magic_version(&INDEX_MAGIC_V1, INDEX_VERSION_V1)?;
        d.zero_u16("reserved header u16")?;
        let pack_count = d.u32()? as usize;
        let entry_count = d.u64()?;
        d.zero_u64("reserved header u64")?;
        let expected = (pack_count as u64)
            .checked_mul(16)
            .and_then(|p| entry_count.checked_mul(ENTRY_LEN as u64).map(|e| (p, e)))
            .and_then(|(p, e)| p.checked_add(e))
            .and_then(|v| v.checked_add((HEADER_LEN + FANOUT_LEN) as u64));
        if expected != Some(body.len() as u64) {
            return Err(DecodeError::Invalid(format!(
                "{pack_count} packs and {entry_count} entries do not fit {} bytes",
                body.len()
            )));
        }
        let entry_count = entry_count as usize;
        let mut packs = Vec::with_capacity(pack_count);
        let mut seen = HashSet::with_capacity(pack_count);
        for _ in 0..pack_count {
            let pack = PackId(d.array()?);
            if !seen.insert(pack) {
                return Err(DecodeError::Invalid(format!("pack {pack} listed twice")));
            }
            packs.push(pack);
        }
        let mut fanout = [0u32; 256];
        for f in fanout.iter_mut() {
            *f = d.u32()?;
        }
        let entries_start = d.position();
        let mut seg = Segment {
            data: data.clone(),
            packs,
            fanout,
            entries_start,
            entry_count,
            summary: Vec::with_capacity(entry_count.div_ceil(SUMMARY_EVERY)),
        };
        let mut summary = Vec::with_capacity(entry_count.div_ceil(SUMMARY_EVERY));
        // Validate ordering, fan-out and pack references once, so lookups can
        // rely on them.
        let mut counts = [0u32; 256];
        let mut prev: Option<&[u8]> = None;
        for i in 0..entry_count {
            let e = seg.entry_bytes(i).ok_or(DecodeError::Truncated {
                needed: ENTRY_LEN as u64,
                available: 0,
            })?;
            let id = &e[..32];
            if prev.is_some_and(|p| p >= id) {
                return Err(DecodeError::Invalid(format!("entry {i} is out of order")));
            }
            prev = Some(id);
            if i % SUMMARY_EVERY == 0 {
                summary.push(prefix64(id));
            }
            counts[id[0] as usize] += 1;
            let mut ed = Decoder::new(&e[32..]);
            let pack_index = ed.u32()? as usize;
            if pack_index >= seg.packs.len() {
                return Err(DecodeError::Invalid(format!(
                    "entry {i} names pack #{pack_index} of {}",
                    seg.packs.len()
                )));
            }
            // A blob as a pack's table admits it: after the pack header,
            // a blob header and at least one byte, no longer than a chunk.
            let length = ed.u32()? as usize;
            let offset = ed.u64()?;
            if offset < PACK_HEADER_LEN as u64
                || length <= BLOB_HEADER_LEN
                || length > BLOB_HEADER_LEN + MAX_CHUNK_SIZE
                || offset.checked_add(length as u64).is_none()
            {
                return Err(DecodeError::Invalid(format!(
                    "entry {i} (offset {offset}, length {length}) cannot be a blob"
                )));
            }
        }
        let mut total = 0u32;
        for (b, c) in counts.iter().enumerate() {
            total += c;
            if seg.fanout[b] != total {
                return Err(DecodeError::Invalid(format!("fan-out entry {b} is wrong")));
            }
        }
        seg.summary = summary;
        Ok(seg)
    }

    fn entry_bytes(&self, i: usize) -> Option<&[u8]> {
        #[cfg(test)]
        cost::count(&cost::ENTRY_READS);
        let start = self.entries_start + i * ENTRY_LEN;
        self.data.get(start..start + ENTRY_LEN)
    }

    fn decode_entry(&self, e: &[u8]) -> Option<BlobLocation> {
        let mut d = Decoder::new(e.get(32..)?);
        let pack = *self.packs.get(d.u32().ok()? as usize)?;
        let length = d.u32().ok()?;
        let offset = d.u64().ok()?;
        Some(BlobLocation {
            pack,
            offset,
            length,
        })
    }

    /// Finds a chunk: the fan-out on its first byte and the summary (every
    /// 64th entry's first 8 bytes, in RAM) give the one block of at most
    /// 64 entries (3 KiB of the segment) that can hold it, where a binary
    /// search ends — one place in the mapped segment per lookup.
    pub fn lookup(&self, id: &ChunkId) -> Option<BlobLocation> {
        let mut out = [None];
        self.lookup_many(std::slice::from_ref(id), &mut out);
        out[0]
    }

    /// Looks up many ids at once: `out[i]` is the location of `ids[i]`.
    ///
    /// Same search as [`lookup`](Self::lookup), 16 lookups at a time: first
    /// each one's block and its guessed place in it (ids are uniform
    /// hashes, so interpolating between the block's first key and the
    /// next block's lands within a few entries), with the 16 guessed
    /// entries read one after another so their cache misses overlap; then
    /// each walks the few entries to its place, comparing 8-byte keys and
    /// the whole id only when those are equal.
    pub fn lookup_many(&self, ids: &[ChunkId], out: &mut [Option<BlobLocation>]) {
        const GROUP: usize = 16;
        for (ids, out) in ids.chunks(GROUP).zip(out.chunks_mut(GROUP)) {
            let mut at = [(0usize, 0usize, 0usize); GROUP];
            let mut first_key = [0u64; GROUP];
            for (i, id) in ids.iter().enumerate() {
                let (lo, hi) = self.block_of(id);
                let guess = self.guess(lo, hi, prefix64(&id.0));
                at[i] = (lo, hi, guess);
            }
            for (i, (lo, hi, guess)) in at.iter().enumerate().take(ids.len()) {
                if lo < hi {
                    first_key[i] = self.key_at(*guess);
                }
            }
            for (i, id) in ids.iter().enumerate() {
                let (lo, hi, guess) = at[i];
                out[i] = if lo < hi {
                    self.walk(lo, hi, guess, first_key[i], id)
                } else {
                    None
                };
            }
        }
    }

    /// The 8-byte key of entry `i` (past the end: the largest key).
    fn key_at(&self, i: usize) -> u64 {
        self.entry_bytes(i).map_or(u64::MAX, prefix64)
    }

    /// Where in `lo..hi` an entry with 8-byte key `key` should be, by
    /// interpolating between the keys that bound the range.
    fn guess(&self, lo: usize, hi: usize, key: u64) -> usize {
        if hi <= lo + 1 {
            return lo;
        }
        // The range lies in the fan-out bucket of the key's first byte:
        // its keys are within that byte's share of the key space, unless a
        // block start nearer is known.
        let first = key >> 56;
        let bucket_lo = first << 56;
        let bucket_hi = bucket_lo | ((1u64 << 56) - 1);
        let k_lo = self
            .summary
            .get(lo / SUMMARY_EVERY)
            .copied()
            .filter(|k| lo % SUMMARY_EVERY == 0 && *k >= bucket_lo)
            .unwrap_or(bucket_lo);
        let k_hi = if hi % SUMMARY_EVERY == 0 {
            self.summary.get(hi / SUMMARY_EVERY).copied()
        } else {
            None
        }
        .filter(|k| *k <= bucket_hi)
        .unwrap_or(bucket_hi);
        if key <= k_lo || k_hi <= k_lo {
            return lo;
        }
        let span = u128::from(k_hi - k_lo);
        let off = (u128::from(key - k_lo) * (hi - lo) as u128 / span) as usize;
        (lo + off).min(hi - 1)
    }

    /// Finds `id` in `lo..hi` starting at `guess` (whose key is `key_at`):
    /// a short walk to the first entry whose key is not below the id's,
    /// then the entries sharing that key. A walk longer than 8 entries
    /// (keys that are not uniform) finishes with a binary search.
    fn walk(
        &self,
        lo: usize,
        hi: usize,
        guess: usize,
        key_at: u64,
        id: &ChunkId,
    ) -> Option<BlobLocation> {
        let key = prefix64(&id.0);
        let mut p = guess;
        let mut steps = 0;
        if key_at < key {
            // Right: the first entry at or above the key.
            p += 1;
            while p < hi && self.key_at(p) < key {
                p += 1;
                steps += 1;
                if steps > 8 {
                    p = lo + self.partition(lo, hi, key);
                    break;
                }
            }
        } else {
            // Left, while the entry before is still at or above the key.
            while p > lo && self.key_at(p - 1) >= key {
                p -= 1;
                steps += 1;
                if steps > 8 {
                    p = lo + self.partition(lo, hi, key);
                    break;
                }
            }
        }
        while p < hi {
            let e = self.entry_bytes(p)?;
            if prefix64(e) != key {
                return None;
            }
            match e[..32].cmp(&id.0[..]) {
                std::cmp::Ordering::Less => p += 1,
                std::cmp::Ordering::Equal => return self.decode_entry(e),
                std::cmp::Ordering::Greater => return None,
            }
        }
        None
    }

    /// How many entries of `lo..hi` have a key below `key` (binary search).
    fn partition(&self, lo: usize, hi: usize, key: u64) -> usize {
        #[cfg(test)]
        cost::count(&cost::BINARY_SEARCHES);
        let (mut a, mut b) = (lo, hi);
        while a < b {
            let mid = a + (b - a) / 2;
            if self.key_at(mid) < key {
                a = mid + 1;
            } else {
                b = mid;
            }
        }
        a - lo
    }

    /// The entries that can hold `id`: its fan-out bucket, narrowed by the
    /// summary to the blocks whose first keys bracket its first 8 bytes
    /// (one block, unless ids share those 8 bytes across a block start).
    fn block_of(&self, id: &ChunkId) -> (usize, usize) {
        let first = id.0[0] as usize;
        let lo = if first == 0 {
            0
        } else {
            self.fanout[first - 1] as usize
        };
        let hi = (self.fanout[first] as usize).min(self.entry_count);
        if hi <= lo || hi - lo <= SUMMARY_EVERY {
            return (lo, hi.max(lo));
        }
        let key = prefix64(&id.0);
        let (s_lo, s_hi) = (lo / SUMMARY_EVERY, (hi - 1) / SUMMARY_EVERY + 1);
        let Some(blocks) = self.summary.get(s_lo..s_hi) else {
            return (lo, hi);
        };
        // The first block starting at or above the key, and the first
        // starting above it: the id lies after the start of the block
        // before the former and before the start of the latter.
        let at_or_above = first_at_or_above(blocks, key);
        let mut above = at_or_above;
        while blocks.get(above).is_some_and(|k| *k == key) {
            above += 1;
        }
        let start = match at_or_above {
            0 => lo,
            a => ((s_lo + a - 1) * SUMMARY_EVERY).max(lo),
        };
        let end = if above == blocks.len() {
            hi
        } else {
            ((s_lo + above) * SUMMARY_EVERY).min(hi)
        };
        (start, end.max(start))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entry_count
    }

    /// True when the segment holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entry_count == 0
    }

    /// The packs this segment covers.
    pub fn packs(&self) -> &[PackId] {
        &self.packs
    }

    /// Every entry, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (ChunkId, BlobLocation)> + '_ {
        (0..self.entry_count).filter_map(move |i| {
            let e = self.entry_bytes(i)?;
            let mut id = [0u8; 32];
            id.copy_from_slice(&e[..32]);
            Some((ChunkId(id), self.decode_entry(e)?))
        })
    }
}

/// Collects entries for a new segment.
#[derive(Debug, Default)]
pub struct SegmentBuilder {
    packs: Vec<PackId>,
    pack_index: HashMap<PackId, u32>,
    entries: Vec<([u8; 32], u32, u32, u64)>,
}

impl SegmentBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a pack (even an empty one) as covered by this segment.
    pub fn add_pack(&mut self, pack: PackId) -> u32 {
        let next = self.packs.len() as u32;
        *self.pack_index.entry(pack).or_insert_with(|| {
            self.packs.push(pack);
            next
        })
    }

    /// Adds every entry of `pack`.
    pub fn add_entries(&mut self, pack: PackId, entries: &[PackEntry]) {
        let p = self.add_pack(pack);
        for e in entries {
            self.entries.push((e.id.0, p, e.length, e.offset));
        }
    }

    /// Adds everything `other` holds (its packs, then its entries).
    pub fn append(&mut self, other: SegmentBuilder) {
        let map: Vec<u32> = other.packs.iter().map(|p| self.add_pack(*p)).collect();
        self.entries.extend(
            other
                .entries
                .into_iter()
                .map(|(id, p, len, off)| (id, map[p as usize], len, off)),
        );
    }

    /// A builder holding exactly what `seg` holds (its packs in their order,
    /// its entries), so `encode` reproduces a canonical segment byte for
    /// byte: what the canonical-form tests and fuzz targets compare against.
    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // for tests and fuzz targets
    pub fn from_segment(seg: &Segment) -> Self {
        let mut b = SegmentBuilder::new();
        for p in seg.packs() {
            b.add_pack(*p);
        }
        for (id, loc) in seg.iter() {
            let p = b.add_pack(loc.pack);
            b.entries.push((id.0, p, loc.length, loc.offset));
        }
        b
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no entry was added.
    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // for fuzz targets and benches
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of packs covered.
    pub fn pack_count(&self) -> usize {
        self.packs.len()
    }

    /// Ids of the entries added so far (unsorted, with duplicates).
    pub fn ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.entries.iter().map(|e| ChunkId(e.0))
    }

    /// Encodes the segment: sorted by id, duplicates dropped (first kept).
    pub fn encode(mut self) -> Vec<u8> {
        self.entries.sort_by_key(|e| e.0);
        self.entries.dedup_by(|a, b| a.0 == b.0);
        let mut out = Vec::with_capacity(
            HEADER_LEN + self.packs.len() * 16 + FANOUT_LEN + self.entries.len() * ENTRY_LEN + 32,
        );
        out.extend_from_slice(&INDEX_MAGIC_V1);
        out.put_u16(INDEX_VERSION_V1);
        out.put_u16(0);
        out.put_u32(self.packs.len() as u32);
        out.put_u64(self.entries.len() as u64);
        out.put_u64(0);
        for p in &self.packs {
            out.extend_from_slice(p.as_bytes());
        }
        let mut fanout = [0u32; 256];
        for e in &self.entries {
            fanout[e.0[0] as usize] += 1;
        }
        let mut total = 0;
        for f in fanout {
            total += f;
            out.put_u32(total);
        }
        for (id, p, len, off) in &self.entries {
            out.extend_from_slice(id);
            out.put_u32(*p);
            out.put_u32(*len);
            out.put_u64(*off);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Encodes and stores the segment under a fresh name.
    pub fn write(self, pool: &dyn PoolWrite) -> Result<(SegmentId, Segment, u64)> {
        let id = SegmentId::random()?;
        let bytes = self.encode();
        let len = bytes.len() as u64;
        pool.write(FileKind::Index, &id.to_hex(), &bytes)?;
        let seg = Segment::decode(Bytes::from(bytes))
            .map_err(|e| Error::corrupt(format!("index segment {id} (just written)"), e))?;
        Ok((id, seg, len))
    }
}

/// The pool's whole index: every segment, plus an in-memory segment for packs
/// no stored segment covers. [`Index::refresh`] picks up what other writers
/// added since.
#[derive(Debug, Default)]
pub struct Index {
    state: RwLock<IndexState>,
    /// Packs without a stored segment, with their tables, until a backup
    /// takes them into its segment.
    uncovered: parking_lot::Mutex<Vec<(PackId, Vec<PackEntry>)>>,
    /// Uncovered packs whose table could not be read, with why.
    unreadable: parking_lot::Mutex<Vec<(PackId, String)>>,
    /// Stored segments that failed to decode, with why. Their packs are
    /// indexed from their own tables instead (packs describe themselves),
    /// so a damaged segment loses nothing.
    damaged_segments: parking_lot::Mutex<Vec<(String, String)>>,
    /// One refresh at a time: two would load the same segments twice.
    refreshing: parking_lot::Mutex<()>,
    /// A refresh found a segment this index holds gone from the pool (a
    /// garbage collection or repair replaced it): its entries may name
    /// deleted packs, so the holder should load the index afresh.
    stale: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct IndexState {
    segments: Vec<Arc<Segment>>,
    /// Names of the stored segments loaded (or written) by this handle.
    loaded: HashSet<String>,
    /// Packs that a loaded segment or the in-memory segment covers, or
    /// whose table could not be read.
    covered: HashSet<PackId>,
    /// Covered packs the last refresh did not find in the pool (deleted by
    /// a garbage collection or a repair): their entries must not be reused.
    absent: HashSet<PackId>,
}

impl Index {
    /// Loads every segment and indexes uncovered packs from their tables.
    pub fn load<P: PoolRead + PoolList + ?Sized>(pool: &P) -> Result<Self> {
        let index = Index::default();
        index.refresh(pool)?;
        Ok(index)
    }

    /// Loads the segments written since the last load or refresh, and
    /// indexes packs that no segment covers yet (from their tables). Returns
    /// the number of new segments and packs taken in.
    ///
    /// A segment deleted between the listing and the read (a concurrent
    /// `repair`) is skipped; a damaged segment is skipped, reported by
    /// [`damaged_segments`](Self::damaged_segments), and its packs indexed
    /// from their tables; an uncovered pack whose table cannot be read is
    /// skipped and reported by [`unreadable_packs`](Self::unreadable_packs).
    pub fn refresh<P: PoolRead + PoolList + ?Sized>(&self, pool: &P) -> Result<usize> {
        let _one_at_a_time = self.refreshing.lock();
        let fresh: Vec<String> = {
            let state = self.state.read();
            let listed: HashSet<String> = pool.list(FileKind::Index)?.into_iter().collect();
            if state.loaded.iter().any(|name| !listed.contains(name)) {
                self.stale.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            listed
                .into_iter()
                .filter(|name| !state.loaded.contains(name))
                .collect()
        };
        let mut loaded = Vec::new();
        for name in fresh {
            let data = match pool.read(FileKind::Index, &name) {
                Ok(data) => data,
                Err(Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            match Segment::decode(data) {
                Ok(seg) => loaded.push((name, seg)),
                Err(e) => {
                    let why = Error::corrupt(format!("index segment {name}"), e).to_string();
                    self.damaged_segments.lock().push((name.clone(), why));
                    // Not read again by later refreshes.
                    self.state.write().loaded.insert(name);
                }
            }
        }
        let mut added = loaded.len();
        {
            let mut state = self.state.write();
            for (name, seg) in loaded {
                state.covered.extend(seg.packs().iter().copied());
                state.loaded.insert(name);
                state.segments.push(Arc::new(seg));
            }
        }
        added += self.take_in_uncovered(pool)?;
        Ok(added)
    }

    /// Indexes packs that no segment covers (a backup interrupted after
    /// sealing them, or another writer still running) from their tables.
    fn take_in_uncovered<P: PoolRead + PoolList + ?Sized>(&self, pool: &P) -> Result<usize> {
        let candidates: Vec<PackId> = {
            let listed: HashSet<PackId> = pool
                .list(FileKind::Pack)?
                .iter()
                .filter_map(|name| PackId::from_hex(name))
                .collect();
            let mut state = self.state.write();
            let absent: HashSet<PackId> = state
                .covered
                .iter()
                .filter(|p| !listed.contains(p))
                .copied()
                .collect();
            state.absent = absent;
            listed
                .into_iter()
                .filter(|p| !state.covered.contains(p))
                .collect()
        };
        let mut extra = SegmentBuilder::new();
        let mut taken = Vec::new();
        let mut unreadable = Vec::new();
        for pack in candidates {
            match read_pack_table(pool, &pack) {
                Ok(entries) => {
                    extra.add_entries(pack, &entries);
                    taken.push((pack, entries));
                }
                // Deleted since the listing.
                Err(Error::NotFound { .. }) => {}
                Err(e) if e.is_damage() => unreadable.push((pack, e.to_string())),
                Err(e) => return Err(e),
            }
        }
        let mut state = self.state.write();
        state.covered.extend(unreadable.iter().map(|(p, _)| *p));
        self.unreadable.lock().extend(unreadable);
        if taken.is_empty() {
            return Ok(0);
        }
        let seg = Segment::decode(Bytes::from(extra.encode()))
            .map_err(|e| Error::corrupt("in-memory index of uncovered packs", e))?;
        state.covered.extend(taken.iter().map(|(p, _)| *p));
        state.segments.push(Arc::new(seg));
        let n = taken.len();
        self.uncovered.lock().extend(taken);
        Ok(n)
    }

    /// Packs this index names that the last refresh did not find in the
    /// pool: a backup must not reuse chunks from them.
    pub fn absent_packs(&self) -> HashSet<PackId> {
        self.state.read().absent.clone()
    }

    /// Whether a refresh found a segment of this index removed from the
    /// pool; load the index afresh before trusting its locations.
    pub fn is_stale(&self) -> bool {
        self.stale.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The segments loaded (stored ones, then the in-memory one of
    /// uncovered packs), and the names of the stored ones.
    pub fn segments(&self) -> (Vec<Arc<Segment>>, Vec<String>) {
        let state = self.state.read();
        (
            state.segments.clone(),
            state.loaded.iter().cloned().collect(),
        )
    }

    /// Packs that no stored segment covered when they were taken in.
    pub fn uncovered_packs(&self) -> Vec<PackId> {
        self.uncovered.lock().iter().map(|(p, _)| *p).collect()
    }

    /// Takes the uncovered packs with their tables: the caller's next
    /// segment will cover them.
    pub fn take_uncovered_packs(&self) -> Vec<(PackId, Vec<PackEntry>)> {
        std::mem::take(&mut *self.uncovered.lock())
    }

    /// Uncovered packs whose table could not be read, with why.
    pub fn unreadable_packs(&self) -> Vec<(PackId, String)> {
        self.unreadable.lock().clone()
    }

    /// Stored segments that failed to decode (name, why); their packs were
    /// indexed from their tables instead.
    pub fn damaged_segments(&self) -> Vec<(String, String)> {
        self.damaged_segments.lock().clone()
    }

    /// Where chunk `id` is stored, if any segment holds it.
    pub fn lookup(&self, id: &ChunkId) -> Option<BlobLocation> {
        // Newest segments first: they are the most likely to hold recent
        // data. A location in a pack the pool no longer lists (a repair
        // moved it aside, a collection deleted it; an older segment may
        // still name it) is passed over: another segment may hold the same
        // chunk elsewhere (a salvaged or repacked copy).
        let state = self.state.read();
        state
            .segments
            .iter()
            .rev()
            .find_map(|s| s.lookup(id).filter(|l| !state.absent.contains(&l.pack)))
    }

    /// Every location of chunk `id` the segments name, newest segment
    /// first (the first is [`lookup`](Self::lookup)'s), each once, passing
    /// over packs the pool no longer lists. A chunk is stored more than
    /// once when two writers stored it at once, or when a backup stored a
    /// damaged extent page again: a reader that finds one copy damaged
    /// tries the others.
    pub fn locations(&self, id: &ChunkId) -> Vec<BlobLocation> {
        let state = self.state.read();
        let mut out: Vec<BlobLocation> = Vec::new();
        for seg in state.segments.iter().rev() {
            if let Some(l) = seg.lookup(id) {
                if !state.absent.contains(&l.pack) && !out.contains(&l) {
                    out.push(l);
                }
            }
        }
        out
    }

    /// Like [`lookup`](Self::lookup), but also a location in a pack the pool
    /// no longer lists: to tell "the pack holding it is gone" from "no
    /// segment knows it" when the chunk is nowhere else.
    pub fn lookup_including_absent(&self, id: &ChunkId) -> Option<BlobLocation> {
        self.lookup(id).or_else(|| {
            self.state
                .read()
                .segments
                .iter()
                .rev()
                .find_map(|s| s.lookup(id))
        })
    }

    /// Looks up many ids: `out[i]` for `ids[i]` (newest segment wins).
    pub fn lookup_many(&self, ids: &[ChunkId], out: &mut Vec<Option<BlobLocation>>) {
        out.clear();
        out.resize(ids.len(), None);
        let state = self.state.read();
        let mut missing: Vec<usize> = (0..ids.len()).collect();
        let mut found = Vec::new();
        let mut sub_ids = Vec::new();
        for seg in state.segments.iter().rev() {
            if missing.is_empty() {
                break;
            }
            sub_ids.clear();
            sub_ids.extend(missing.iter().map(|&i| ids[i]));
            found.clear();
            found.resize(sub_ids.len(), None);
            seg.lookup_many(&sub_ids, &mut found);
            let mut still = Vec::with_capacity(missing.len());
            for (k, &i) in missing.iter().enumerate() {
                match found[k] {
                    Some(loc) if !state.absent.contains(&loc.pack) => out[i] = Some(loc),
                    _ => still.push(i),
                }
            }
            missing = still;
        }
    }

    /// True if some segment holds `id`.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lookup(id).is_some()
    }

    /// Adds segment `name`, just written by this process, to the live view.
    pub fn push(&self, name: SegmentId, seg: Segment) {
        let mut state = self.state.write();
        state.covered.extend(seg.packs().iter().copied());
        state.loaded.insert(name.to_hex());
        state.segments.push(Arc::new(seg));
    }

    /// Number of entries over all segments (duplicates counted per segment).
    pub fn entry_count(&self) -> usize {
        self.state.read().segments.iter().map(|s| s.len()).sum()
    }

    /// Number of segments loaded (stored ones and the in-memory one).
    pub fn segment_count(&self) -> usize {
        self.state.read().segments.len()
    }
}

/// Outcome of an index rebuild ([`Repository::repair_index`](crate::Repository::repair_index)).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RebuildReport {
    /// Packs indexed.
    pub packs: usize,
    /// Entries in the new segment.
    pub entries: usize,
    /// Packs whose table could not be read, with the error (skipped).
    pub damaged_packs: Vec<(PackId, String)>,
    /// Old segments removed.
    pub segments_removed: usize,
}

impl std::fmt::Display for RebuildReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "index rebuilt from {} packs: {} chunks, {} old segments removed, {} damaged packs skipped",
            self.packs,
            self.entries,
            self.segments_removed,
            self.damaged_packs.len()
        )
    }
}

/// Rebuilds the index from the packs alone: one new segment replaces every
/// old one. Damaged packs are skipped and reported. Memory stays bounded
/// (the entries are sorted on scratch disk, see `external_sort`).
pub fn rebuild(pool: &dyn Pool, scratch_parent: Option<&std::path::Path>) -> Result<RebuildReport> {
    let old = pool.list(FileKind::Index)?;
    let scratch = ScratchDir::new(scratch_parent)?;
    let mut sorter = ExternalSorter::new(&scratch, "index-entries", sort_budget(), false);
    let mut covered = Vec::new();
    let mut damaged = Vec::new();
    for name in pool.list(FileKind::Pack)? {
        let Some(pack) = PackId::from_hex(&name) else {
            continue;
        };
        match read_pack_table(pool, &pack) {
            Ok(entries) => {
                for e in &entries {
                    sorter.push(EntryRecord::new(e.id, pack, e.offset, e.length))?;
                }
                covered.push(pack);
            }
            Err(e) => damaged.push((pack, e.to_string())),
        }
    }
    let packs = covered.len();
    let sorted = sorter.finish()?;
    let (new_id, entries, _) = write_sorted_segment(pool, &covered, &sorted)?;
    crate::failpoint::pause("rebuild-before-delete");
    let mut removed = 0;
    for name in old {
        if name != new_id.to_hex() {
            pool.delete(FileKind::Index, &name)?;
            removed += 1;
        }
    }
    Ok(RebuildReport {
        packs,
        entries: entries as usize,
        damaged_packs: damaged,
        segments_removed: removed,
    })
}

/// One index entry on its way into a segment, ordered by chunk id first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EntryRecord {
    /// The chunk.
    pub id: ChunkId,
    /// The pack holding its blob.
    pub pack: PackId,
    /// The blob's offset in the pack.
    pub offset: u64,
    /// The blob's stored length.
    pub length: u32,
}

impl EntryRecord {
    /// A record for `id` stored in `pack` at `offset`.
    pub fn new(id: ChunkId, pack: PackId, offset: u64, length: u32) -> Self {
        EntryRecord {
            id,
            pack,
            offset,
            length,
        }
    }
}

impl Record for EntryRecord {
    const LEN: usize = 60;
    fn put(&self, out: &mut [u8]) {
        FieldWriter::new(out)
            .bytes(&self.id.0)
            .bytes(self.pack.as_bytes())
            .u64(self.offset)
            .u32(self.length);
    }
    fn get(b: &[u8]) -> Self {
        let mut r = FieldReader::new(b);
        EntryRecord {
            id: ChunkId(r.array()),
            pack: PackId(r.array()),
            offset: r.u64(),
            length: r.u32(),
        }
    }
}

/// Writes a segment covering `packs` from entries sorted by id (the first
/// of several entries for one chunk is kept), streaming: two passes over
/// `entries`, none of them held in memory. Every entry's pack must be in
/// `packs`. Returns the new segment's name, its entry count and its size.
pub fn write_sorted_segment(
    pool: &dyn PoolWrite,
    packs: &[PackId],
    entries: &Sorted<EntryRecord>,
) -> Result<(SegmentId, u64, u64)> {
    let mut pack_list = Vec::with_capacity(packs.len());
    let mut pack_index: HashMap<PackId, u32> = HashMap::with_capacity(packs.len());
    for p in packs {
        if !pack_index.contains_key(p) {
            pack_index.insert(*p, pack_list.len() as u32);
            pack_list.push(*p);
        }
    }
    // Pass 1: count and fan-out.
    let mut fanout = [0u32; 256];
    let mut count = 0u64;
    let mut last: Option<ChunkId> = None;
    for r in entries.iter()? {
        let r = r?;
        if last == Some(r.id) {
            continue;
        }
        last = Some(r.id);
        if !pack_index.contains_key(&r.pack) {
            return Err(Error::corrupt(
                format!("new index segment (entry for chunk {})", r.id),
                DecodeError::Invalid(format!("pack {} is not among the covered packs", r.pack)),
            ));
        }
        fanout[r.id.0[0] as usize] += 1;
        count += 1;
    }
    if count > u32::MAX as u64 {
        return Err(Error::corrupt(
            "new index segment".to_string(),
            DecodeError::Invalid(format!("{count} entries exceed the fan-out's u32 counts")),
        ));
    }
    // Pass 2: write.
    let id = SegmentId::random()?;
    let name = id.to_hex();
    let out = pool.create(FileKind::Index, &name)?;
    let mut w = HashingWriter {
        inner: std::io::BufWriter::with_capacity(256 << 10, out),
        hasher: blake3::Hasher::new(),
        written: 0,
    };
    let io = |e: std::io::Error| Error::PoolIo {
        op: "write",
        kind: FileKind::Index,
        name: name.clone(),
        source: e,
    };
    let mut header = Vec::with_capacity(HEADER_LEN + FANOUT_LEN);
    header.extend_from_slice(&INDEX_MAGIC_V1);
    header.put_u16(INDEX_VERSION_V1);
    header.put_u16(0);
    header.put_u32(pack_list.len() as u32);
    header.put_u64(count);
    header.put_u64(0);
    w.put(&header).map_err(io)?;
    for p in &pack_list {
        w.put(p.as_bytes()).map_err(io)?;
    }
    let mut fan = Vec::with_capacity(FANOUT_LEN);
    let mut total = 0u32;
    for f in fanout {
        total += f;
        fan.put_u32(total);
    }
    w.put(&fan).map_err(io)?;
    let mut last: Option<ChunkId> = None;
    let mut entry = [0u8; ENTRY_LEN];
    let mut written = 0u64;
    let changed = || {
        Error::corrupt(
            format!("new index segment {name}"),
            DecodeError::Invalid("its sorted entries changed between the two passes".into()),
        )
    };
    for r in entries.iter()? {
        let r = r?;
        if last == Some(r.id) {
            continue;
        }
        last = Some(r.id);
        written += 1;
        let p = *pack_index.get(&r.pack).ok_or_else(changed)?;
        entry[..32].copy_from_slice(&r.id.0);
        entry[32..36].copy_from_slice(&p.to_le_bytes());
        entry[36..40].copy_from_slice(&r.length.to_le_bytes());
        entry[40..48].copy_from_slice(&r.offset.to_le_bytes());
        w.put(&entry).map_err(io)?;
    }
    if written != count {
        return Err(changed()); // dropping the writer aborts the object
    }
    let sum = w.hasher.finalize();
    w.put_unhashed(sum.as_bytes()).map_err(io)?;
    let size = w.written;
    let out = w.inner.into_inner().map_err(|e| io(e.into_error()))?;
    out.commit()?;
    Ok((id, count, size))
}

/// Writes through, hashing what passes (the segment checksum).
struct HashingWriter<W: std::io::Write> {
    inner: W,
    hasher: blake3::Hasher,
    written: u64,
}

impl<W: std::io::Write> HashingWriter<W> {
    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.hasher.update(b);
        self.put_unhashed(b)
    }
    fn put_unhashed(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entries(n: u32, pack_seed: u8) -> (PackId, Vec<PackEntry>) {
        let pack = PackId([pack_seed; 16]);
        let e = (0..n)
            .map(|i| PackEntry {
                id: ChunkId::of(&i.to_le_bytes()),
                offset: 16 + i as u64 * 100,
                length: 100,
                raw_length: 65536,
            })
            .collect();
        (pack, e)
    }

    #[test]
    fn lookup_hits_and_misses() {
        let (pack, es) = entries(1000, 3);
        let mut b = SegmentBuilder::new();
        b.add_entries(pack, &es);
        let seg = Segment::decode(Bytes::from(b.encode())).unwrap();
        assert_eq!(seg.len(), 1000);
        for e in &es {
            assert_eq!(
                seg.lookup(&e.id),
                Some(BlobLocation {
                    pack,
                    offset: e.offset,
                    length: 100
                })
            );
        }
        assert_eq!(seg.lookup(&ChunkId::of(b"absent")), None);
    }

    #[test]
    fn lookup_in_large_segment_with_skewed_keys() {
        // Ids that are not uniform (all share byte 1..9) exercise the
        // fallback from a wrong interpolation guess.
        let pack = PackId([9; 16]);
        let mut es = Vec::new();
        for i in 0..5000u32 {
            let mut id = [0u8; 32];
            id[0] = (i % 3) as u8;
            id[1..9].copy_from_slice(&[0xff; 8]);
            id[28..32].copy_from_slice(&i.to_be_bytes());
            es.push(PackEntry {
                id: ChunkId(id),
                offset: 16 + i as u64,
                length: 20,
                raw_length: 1,
            });
        }
        let (_, uniform) = entries(5000, 2);
        let mut b = SegmentBuilder::new();
        b.add_entries(pack, &es);
        b.add_entries(PackId([2; 16]), &uniform);
        let seg = Segment::decode(Bytes::from(b.encode())).unwrap();
        for e in es.iter().chain(&uniform) {
            assert_eq!(seg.lookup(&e.id).map(|l| l.offset), Some(e.offset));
            let mut miss = e.id;
            miss.0[31] ^= 0x80;
            miss.0[27] ^= 0x01;
            assert_eq!(seg.lookup(&miss), None);
        }
    }

    #[test]
    fn a_builder_lists_the_ids_it_holds_in_the_order_added() {
        let (pack, es) = entries(10, 5);
        let mut b = SegmentBuilder::new();
        assert_eq!(b.ids().count(), 0);
        assert!(b.is_empty());
        b.add_entries(pack, &es);
        assert!(!b.is_empty());
        b.add_entries(PackId([9; 16]), &es[..3]);
        let ids: Vec<ChunkId> = b.ids().collect();
        let added: Vec<ChunkId> = es.iter().chain(&es[..3]).map(|e| e.id).collect();
        assert_eq!(ids, added);
    }

    #[test]
    fn entries_that_cannot_be_blobs_are_refused() {
        let max = (BLOB_HEADER_LEN + MAX_CHUNK_SIZE) as u32;
        let decodes = |offset: u64, length: u32| {
            let mut b = SegmentBuilder::new();
            let e = PackEntry {
                id: ChunkId([7; 32]),
                offset,
                length,
                raw_length: 1,
            };
            b.add_entries(PackId([1; 16]), &[e]);
            Segment::decode(Bytes::from(b.encode())).is_ok()
        };
        // At the bounds: right after the pack header, a blob header and
        // one byte, the longest chunk stored raw.
        assert!(decodes(16, 13));
        assert!(decodes(16, max));
        assert!(decodes(u64::MAX - 13, 13));
        // One past them.
        assert!(!decodes(15, 13));
        assert!(!decodes(16, 12));
        assert!(!decodes(16, max + 1));
        assert!(!decodes(u64::MAX - 12, 13));
    }

    /// A segment of `entries` from one pack.
    fn segment_of(pack: PackId, es: &[PackEntry]) -> Segment {
        let mut b = SegmentBuilder::new();
        b.add_entries(pack, es);
        Segment::decode(Bytes::from(b.encode())).unwrap()
    }

    /// Entries whose ids start with the 8-byte keys `keys` (any order),
    /// then the key's index.
    fn entries_with_keys(keys: impl Iterator<Item = u64>) -> Vec<PackEntry> {
        keys.enumerate()
            .map(|(i, k)| {
                let mut id = [0u8; 32];
                id[..8].copy_from_slice(&k.to_be_bytes());
                id[24..].copy_from_slice(&(i as u64).to_be_bytes());
                PackEntry {
                    id: ChunkId(id),
                    offset: 16 + i as u64,
                    length: 13,
                    raw_length: 1,
                }
            })
            .collect()
    }

    /// Lookups of uniform ids (hashes) in a segment whose fan-out buckets
    /// span several blocks: each reads a few entries of the segment, and
    /// hardly ever needs a binary search; `lookup_many` reads what the
    /// single lookups read.
    #[test]
    fn uniform_ids_are_found_in_a_few_reads() {
        let n = 50_000u32;
        let (pack, es) = entries(n, 1);
        let seg = segment_of(pack, &es);
        cost::take();
        let (mut reads, mut searches) = ((0, 0), (0, 0));
        for (i, e) in es.iter().enumerate() {
            assert_eq!(seg.lookup(&e.id).map(|l| l.offset), Some(e.offset));
            let (r, s) = cost::take();
            reads.0 += r;
            searches.0 += s;
            let absent = ChunkId::of(&(i as u32 + 10_000_000).to_le_bytes());
            assert_eq!(seg.lookup(&absent), None);
            let (r, s) = cost::take();
            reads.1 += r;
            searches.1 += s;
        }
        // 4.9 reads a lookup, a binary search in 0.7 % of them (at
        // 2026-11-29; other sets of random ids give 4.9–5.1 and up to
        // 1.2 %): the fan-out and summary give a block of 64, the
        // interpolation a place within a few entries of the id's. A guess
        // at the block's start, or interpolated over the whole bucket,
        // gives 12–15 reads and binary searches in over half.
        for (what, r, s) in [
            ("present", reads.0, searches.0),
            ("absent", reads.1, searches.1),
        ] {
            assert!(r <= 6 * u64::from(n), "{what}: {r} reads for {n} lookups");
            assert!(s <= 3 * u64::from(n) / 100, "{what}: {s} binary searches");
        }
        let ids: Vec<ChunkId> = es.iter().map(|e| e.id).collect();
        let mut out = vec![None; ids.len()];
        seg.lookup_many(&ids, &mut out);
        assert!(out.iter().all(Option::is_some));
        assert_eq!(cost::take(), (reads.0, searches.0));
    }

    /// The same cost in a segment's first fan-out buckets, whose entries
    /// start below the 64th block: the summary is sliced from the bucket's
    /// first block there too (`lo / 64`), not from some other block.
    #[test]
    fn ids_in_the_first_buckets_are_found_in_a_few_reads() {
        let n = 50_000u32;
        let (pack, es) = entries(n, 1);
        let seg = segment_of(pack, &es);
        // About 195 entries a bucket: buckets 0..=20 start below entry
        // 64 × 64 = 4 096 (as does bucket 21 here, at entry 4 010).
        let first: Vec<&PackEntry> = es.iter().filter(|e| e.id.0[0] <= 20).collect();
        assert!(first.len() > 3_000, "{}", first.len());
        cost::take();
        for e in &first {
            assert_eq!(seg.lookup(&e.id).map(|l| l.offset), Some(e.offset));
        }
        let (reads, searches) = cost::take();
        // 5.0 reads a lookup and 1.1 % binary searches (4 010 lookups, at
        // 2026-11-29); the summary sliced from another block (`lo % 64`)
        // gives 5.9 and 5.6 %.
        let m = first.len() as u64;
        assert!(2 * reads <= 11 * m, "{reads} reads for {m} lookups");
        assert!(searches <= 3 * m / 100, "{searches} binary searches");
    }

    /// `locations` names every copy the segments hold, newest segment
    /// first (its first is `lookup`'s), each once, and none in an absent
    /// pack.
    #[test]
    fn locations_name_every_copy_newest_first_each_once() {
        let index = Index::default();
        let (one, first) = entries(10, 1);
        let (two, mut second) = entries(10, 2);
        for e in &mut second {
            e.offset += 7;
        }
        index.push(SegmentId::random().unwrap(), segment_of(one, &first));
        index.push(SegmentId::random().unwrap(), segment_of(two, &second));
        // The second copy named again by a later segment.
        index.push(SegmentId::random().unwrap(), segment_of(two, &second[..3]));
        let packs =
            |id: &ChunkId| -> Vec<PackId> { index.locations(id).iter().map(|l| l.pack).collect() };
        for e in &first {
            assert_eq!(packs(&e.id), vec![two, one]);
            assert_eq!(index.locations(&e.id)[0], index.lookup(&e.id).unwrap());
            assert_eq!(index.locations(&e.id)[1].offset, e.offset);
            assert_eq!(index.locations(&e.id)[0].offset, e.offset + 7);
        }
        assert!(index.locations(&ChunkId([0xee; 32])).is_empty());
        index.state.write().absent.insert(two);
        assert_eq!(packs(&first[0].id), vec![one]);
    }

    /// An id whose fan-out bucket is empty costs no read of the segment.
    #[test]
    fn an_id_in_an_empty_bucket_reads_nothing() {
        let es = entries_with_keys((0..100u64).map(|i| (1 << 56) + i));
        let seg = segment_of(PackId([1; 16]), &es);
        cost::take();
        for first in [0u8, 2, 255] {
            let id = ChunkId([first; 32]);
            assert_eq!(seg.lookup(&id), None);
            let mut out = [Some(BlobLocation {
                pack: PackId([0; 16]),
                offset: 0,
                length: 0,
            })];
            seg.lookup_many(&[id], &mut out);
            assert_eq!(out, [None]);
            assert_eq!(cost::take(), (0, 0), "bucket {first}");
        }
        // Its only occupied bucket: found.
        assert!(seg.lookup(&es[50].id).is_some());
    }

    /// Keys that interpolation guesses badly (in each block of 64, all but
    /// the last crowd at its start, so walks go right; or all but the
    /// first crowd at its end, so walks go left): a walk gives way to a
    /// binary search after 8 steps, so no lookup reads more than a few
    /// dozen entries.
    #[test]
    fn a_long_walk_gives_way_to_a_binary_search() {
        let at_start = |i: u64| (i / 64) << 40 | if i % 64 == 63 { 1 << 39 } else { i % 64 };
        let at_end = |i: u64| {
            (i / 64) << 40
                | if i % 64 == 0 {
                    0
                } else {
                    (1 << 40) - 64 + i % 64
                }
        };
        for layout in [&at_start as &dyn Fn(u64) -> u64, &at_end] {
            let es = entries_with_keys((0..4096u64).map(layout));
            let seg = segment_of(PackId([1; 16]), &es);
            cost::take();
            let (mut most, mut searches) = (0, 0);
            for e in &es {
                assert_eq!(seg.lookup(&e.id).map(|l| l.offset), Some(e.offset));
                let (r, s) = cost::take();
                most = most.max(r);
                searches += s;
            }
            // 18 at most (2026-11-29): the guessed entry, 9 steps of the
            // walk, 7 of the binary search in the block, then the entry;
            // the walk alone would take up to 63.
            assert!(most <= 20, "{most} reads");
            assert!(searches > 0);
        }
    }

    /// `first_at_or_above` agrees with a binary search on any sorted keys,
    /// and on uniform keys (a segment's summary) needs none.
    #[test]
    fn first_at_or_above_is_a_partition_point() {
        let (pack, es) = entries(50_000, 1);
        let uniform = segment_of(pack, &es).summary;
        let skewed: Vec<u64> = (0..700u64).map(|i| i.pow(5)).chain([u64::MAX; 3]).collect();
        for (keys, uniform) in [
            (&uniform, true),
            (&skewed, false),
            (&vec![], false),
            (&vec![7], false),
        ] {
            cost::take();
            let probes = keys
                .iter()
                .flat_map(|&k| [k.saturating_sub(1), k, k.saturating_add(1)])
                .chain([0, u64::MAX]);
            for key in probes {
                assert_eq!(
                    first_at_or_above(keys, key),
                    keys.partition_point(|k| *k < key),
                    "{key}"
                );
            }
            let (_, s) = cost::take();
            if uniform {
                assert_eq!(s, 0);
            }
        }
    }

    #[test]
    fn lookup_many_matches_lookup() {
        let (pack, es) = entries(3000, 4);
        let mut b = SegmentBuilder::new();
        b.add_entries(pack, &es);
        let seg = Segment::decode(Bytes::from(b.encode())).unwrap();
        let mut ids: Vec<ChunkId> = es.iter().map(|e| e.id).collect();
        ids.extend((0..500u32).map(|i| ChunkId::of(&(i + 1_000_000).to_le_bytes())));
        let mut out = vec![None; ids.len()];
        seg.lookup_many(&ids, &mut out);
        for (id, got) in ids.iter().zip(&out) {
            assert_eq!(*got, seg.lookup(id));
        }
        assert_eq!(out.iter().filter(|o| o.is_some()).count(), 3000);
        assert_eq!(format!("{seg:?}"), "Segment { packs: 1, entries: 3000 }");
        let index = Index::default();
        index.push(SegmentId([1; 16]), seg);
        let mut out2 = Vec::new();
        index.lookup_many(&ids, &mut out2);
        assert_eq!(out, out2);
        assert!(index.contains(&ids[0]) && index.contains(&ids[2999]));
        assert!(!index.contains(&ids[3000]));
    }

    #[test]
    fn golden_empty_segment() {
        let bytes = SegmentBuilder::new().encode();
        assert_eq!(bytes.len(), 32 + 1024 + 32);
        assert_eq!(&bytes[..12], b"CAIRNIX1\x01\x00\x00\x00");
        assert_eq!(
            blake3::hash(&bytes[..bytes.len() - 32]).as_bytes(),
            &bytes[bytes.len() - 32..]
        );
        assert!(Segment::decode(Bytes::from(bytes)).unwrap().is_empty());
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let (pack, es) = entries(20, 1);
        let mut b = SegmentBuilder::new();
        b.add_entries(pack, &es);
        let good = b.encode();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x04;
            assert!(Segment::decode(Bytes::from(bad)).is_err(), "flip at {i}");
        }
        for n in 0..good.len() {
            assert!(Segment::decode(Bytes::copy_from_slice(&good[..n])).is_err());
        }
    }

    /// The streaming writer (GC, rebuild) and the in-memory builder
    /// (backups) produce the same bytes for the same entries, and a chunk
    /// stored twice comes out once; with a 0-byte sort budget the entries
    /// go through spilled runs.
    #[test]
    fn entry_records_round_trip() {
        let mut buf = [0u8; 60];
        for i in 0..=255u8 {
            let r = EntryRecord::new(
                ChunkId([i; 32]),
                PackId([i ^ 0xff; 16]),
                0x0102_0304_0506_0708 ^ i as u64,
                0x1112_1314 + i as u32,
            );
            r.put(&mut buf);
            assert_eq!(EntryRecord::get(&buf), r);
        }
    }

    #[test]
    fn streamed_segment_matches_the_builder_byte_for_byte() {
        let pool = crate::store::testing::LastObject::default();
        let scratch = ScratchDir::new(None).unwrap();
        let (p1, e1) = entries(3000, 1);
        let (p2, e2) = entries(40, 2); // the first 40 ids again, in pack 2
        let mut sorter = ExternalSorter::new(&scratch, "t", 0, false);
        for (p, es) in [(p2, &e2), (p1, &e1)] {
            for e in es.iter().rev() {
                sorter
                    .push(EntryRecord::new(e.id, p, e.offset, e.length))
                    .unwrap();
            }
        }
        let sorted = sorter.finish().unwrap();
        let (_, count, size) = write_sorted_segment(&pool, &[p1, p2, p1], &sorted).unwrap();
        assert_eq!(count, 3000);
        let stored = pool.bytes();
        assert_eq!(stored.len() as u64, size);
        // The builder keeps the first entry it was given for a chunk: pack 1's
        // (PackId [1; 16] sorts before [2; 16], as the streamed writer keeps).
        let mut b = SegmentBuilder::new();
        b.add_entries(p1, &e1);
        b.add_entries(p2, &e2);
        assert_eq!(&stored[..], &b.encode()[..]);
        // An entry whose pack is not covered is refused.
        let err = write_sorted_segment(&pool, &[p2], &sorted).unwrap_err();
        assert!(
            err.to_string().contains("not among the covered packs"),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn round_trip(n in 0u32..500, m in 0u32..50) {
            let (p1, e1) = entries(n, 1);
            let (p2, mut e2) = entries(m, 2);
            for e in &mut e2 { e.id = ChunkId::of(&[e.id.0[0], 0xee]); }
            let mut b = SegmentBuilder::new();
            b.add_entries(p1, &e1);
            b.add_entries(p2, &e2);
            let seg = Segment::decode(Bytes::from(b.encode())).unwrap();
            for e in &e1 { prop_assert_eq!(seg.lookup(&e.id).map(|l| l.pack), Some(p1)); }
            let all: Vec<_> = seg.iter().collect();
            prop_assert_eq!(all.len(), seg.len());
        }

        /// The summary never hides an entry: ids in clusters that share
        /// their first 8 bytes (across block starts, within and across
        /// fan-out buckets) are all found, and near misses are not.
        #[test]
        fn summary_lookups_find_exactly_what_is_stored(
            n in 0usize..2500,
            cluster in 1usize..200,
            seed in any::<u64>(),
        ) {
            let mut rng = crate::random::Sampler::seeded(seed);
            let mut es = Vec::new();
            let mut prefix = [0u8; 8];
            for i in 0..n {
                if i % cluster == 0 {
                    prefix = rng.next_u64().to_be_bytes();
                    // Few first bytes: buckets larger than a block.
                    prefix[0] %= 4;
                }
                let mut id = [0u8; 32];
                id[..8].copy_from_slice(&prefix);
                id[8..16].copy_from_slice(&rng.next_u64().to_be_bytes());
                id[16..24].copy_from_slice(&(i as u64).to_be_bytes());
                es.push(PackEntry { id: ChunkId(id), offset: 16 + i as u64, length: 13, raw_length: 1 });
            }
            let mut b = SegmentBuilder::new();
            b.add_entries(PackId([1; 16]), &es);
            let seg = Segment::decode(Bytes::from(b.encode())).unwrap();
            let ids: Vec<ChunkId> = es.iter().map(|e| e.id).collect();
            let mut out = vec![None; ids.len()];
            seg.lookup_many(&ids, &mut out);
            for (e, got) in es.iter().zip(&out) {
                prop_assert_eq!(got.map(|l| l.offset), Some(e.offset));
                let mut miss = e.id;
                miss.0[31] ^= 1;
                prop_assert_eq!(seg.lookup(&miss), None);
            }
        }
    }
}
