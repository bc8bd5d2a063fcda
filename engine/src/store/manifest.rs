//! Snapshot manifests: one per snapshot, complete on its own (a synthetic
//! full): every disk, its logical size and an extent list that tiles the disk
//! exactly, each extent either a zero run (restored as a hole) or one chunk.
//!
//! ```text
//! header       magic "CAIRNSN1" | version u16 = 1 | reserved u16 = 0 | reserved u32 = 0
//! time         seconds since the Unix epoch i64 | nanoseconds u32
//! vm           str                      (str = u32 byte length + UTF-8)
//! mode         str                      ("full", "cbt" or "unchanged")
//! parent       u8 (0 none, 1 present) [+ snapshot id 32 B]
//! id scheme    u8 (1 = BLAKE3-256 of plaintext)
//! chunking     u8 kind (1 fixed, 2 FastCDC-2020) | u32 | u32 | u32   (fixed: size,0,0; cdc: min,avg,max)
//! compression  u8 (0 none, 1 zstd) | i32 level
//! properties   u32 count | (str key, str value)*
//! disks        u32 count | disk*
//!   disk       name str | logical size u64 | properties | u64 extent count | extent*
//!   extent     u8 0 = zero run  | u64 length
//!              u8 1 = chunk     | u32 length | chunk id [32]
//! checksum     BLAKE3 of everything above [32]
//! ```
//! Extent offsets are implicit: extents are contiguous from offset 0 and must
//! sum to the disk's size.
//!
//! **Version 2** (magic `CAIRNSN2`, version 2) keeps the header and
//! properties and replaces each disk's extent list by references to extent
//! pages (see `extent_page`), each stored as a chunk:
//! ```text
//!   disk       name str | logical size u64 | properties | u32 page count | page*
//!   page       chunk id [32] | covered length u64 | u32 extent count | u32 chunk count | u64 data bytes
//! ```
//! Pages tile the disk in order (their lengths sum to its size). A backup
//! writes version 2; every reader accepts both. A version 2 manifest has at
//! least one page (one without any would be the same snapshot as version 1). The snapshot id is the BLAKE3 hash of the whole
//! encoded manifest, so the name of a manifest checks its content too.
//! A manifest is written last: a snapshot exists only once its manifest does.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::chunker::ChunkingParams;
use crate::error::{Error, Result as EngineResult};
use crate::id::{ChunkId, IdScheme, SnapshotId};
use crate::kind::FileKind;
use crate::store::blob::Compression;
use crate::store::format::{
    CHUNKING_FASTCDC, CHUNKING_FIXED, COMPRESSION_NONE, COMPRESSION_ZSTD, EXTENT_CHUNK,
    EXTENT_ZERO, MANIFEST_MAGIC_V1, MANIFEST_MAGIC_V2, MANIFEST_VERSION_V1, MANIFEST_VERSION_V2,
    MAX_CHUNK_SIZE, MAX_STRING, MODE_CBT, MODE_FULL, MODE_UNCHANGED, PAGE_MAX_EXTENTS,
    PAGE_REF_LEN,
};
use crate::store::pool::{PoolList, PoolRead};
use crate::store::wire::{split_checksummed, DecodeError, Decoder, Encoder};

/// How a snapshot's disks were read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SnapshotMode {
    /// Every allocated extent was read.
    Full,
    /// At least one disk reused its parent's extents outside what it read:
    /// only its dirty ranges were read (changed-block tracking), or nothing
    /// (its source file was unchanged) while another disk was read.
    Cbt,
    /// No disk was read: every disk's source file was unchanged since its
    /// previous snapshot, whose extents it reuses.
    Unchanged,
}

impl SnapshotMode {
    /// The name stored in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotMode::Full => MODE_FULL,
            SnapshotMode::Cbt => MODE_CBT,
            SnapshotMode::Unchanged => MODE_UNCHANGED,
        }
    }

    /// The mode stored as `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            MODE_FULL => Some(SnapshotMode::Full),
            MODE_CBT => Some(SnapshotMode::Cbt),
            MODE_UNCHANGED => Some(SnapshotMode::Unchanged),
            _ => None,
        }
    }
}

impl std::fmt::Display for SnapshotMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One contiguous run of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Offset on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// `None`: all zeros (a hole on restore). `Some`: the chunk holding it.
    pub chunk: Option<ChunkId>,
}

impl Extent {
    /// The offset just past the extent.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// A version 2 manifest's reference to one extent page (a chunk), with
/// the counts that let listings, stats and restore planning work without
/// reading it. Checked against the page on every read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRef {
    /// The page's chunk id (BLAKE3 of its plaintext).
    pub id: ChunkId,
    /// Bytes of the disk its extents cover.
    pub length: u64,
    /// Extents it holds.
    pub extents: u32,
    /// Of those, chunk extents.
    pub chunks: u32,
    /// Bytes its chunk extents cover.
    pub data_bytes: u64,
}

/// One disk of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DiskManifest {
    /// The disk's name (a plain file name).
    pub name: String,
    /// Logical size in bytes.
    pub size: u64,
    /// Free-form facts about the disk (source format, bitmap consumed, …).
    pub properties: BTreeMap<String, String>,
    /// Version 1: extents tiling the disk from offset 0, in order. Empty
    /// when the extents are in `pages` (read them with `DiskExtents`).
    pub extents: Vec<Extent>,
    /// Version 2: the extent pages tiling the disk, in order.
    pub pages: Vec<PageRef>,
}

impl DiskManifest {
    /// An empty disk named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        DiskManifest {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Appends an extent at the current end, merging zero runs. Updates `size`.
    pub fn push(&mut self, length: u64, chunk: Option<ChunkId>) {
        if length == 0 {
            return;
        }
        if chunk.is_none() {
            if let Some(last) = self.extents.last_mut() {
                if last.chunk.is_none() {
                    last.length += length;
                    self.size += length;
                    return;
                }
            }
        }
        self.extents.push(Extent {
            offset: self.size,
            length,
            chunk,
        });
        self.size += length;
    }

    /// Bytes held in chunks (not zero runs).
    pub fn data_bytes(&self) -> u64 {
        let listed: u64 = self
            .extents
            .iter()
            .filter(|e| e.chunk.is_some())
            .map(|e| e.length)
            .sum();
        listed + self.pages.iter().map(|p| p.data_bytes).sum::<u64>()
    }

    /// Chunk references (zero runs excluded), with repetitions.
    pub fn chunk_count(&self) -> u64 {
        let listed = self.extents.iter().filter(|e| e.chunk.is_some()).count() as u64;
        listed + self.pages.iter().map(|p| u64::from(p.chunks)).sum::<u64>()
    }

    /// Extents, counting those in pages.
    pub fn extent_count(&self) -> u64 {
        self.extents.len() as u64 + self.pages.iter().map(|p| u64::from(p.extents)).sum::<u64>()
    }

    /// Whether the extents are in pages (version 2).
    pub fn is_paged(&self) -> bool {
        !self.pages.is_empty()
    }
}

/// A decoded snapshot manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// When the backup finished.
    pub time: SystemTime,
    /// The VM backed up.
    pub vm: String,
    /// Full read or CBT incremental.
    pub mode: SnapshotMode,
    /// The snapshot this one was deduplicated against or built on.
    pub parent: Option<SnapshotId>,
    /// How chunk ids were derived.
    pub id_scheme: IdScheme,
    /// How disks were cut into chunks.
    pub chunking: ChunkingParams,
    /// Compression of the chunks this backup stored.
    pub compression: Compression,
    /// Free-form facts about the snapshot.
    pub properties: BTreeMap<String, String>,
    /// Every disk, complete.
    pub disks: Vec<DiskManifest>,
}

impl Snapshot {
    /// Sum of the disks' logical sizes.
    pub fn bytes_logical(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }

    /// Every chunk reference of the version 1 extent lists, with
    /// repetitions (not the chunks inside pages).
    pub fn chunk_ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.disks
            .iter()
            .flat_map(|d| d.extents.iter().filter_map(|e| e.chunk))
    }

    /// Whether the manifest is version 2 (some disk's extents are in pages).
    pub fn is_paged(&self) -> bool {
        self.disks.iter().any(DiskManifest::is_paged)
    }

    /// Checks what encoding cannot represent.
    pub fn validate(&self) -> Result<(), String> {
        let long = |s: &str| s.len() > MAX_STRING;
        if long(&self.vm) {
            return Err("VM name longer than 4096 bytes".into());
        }
        let props_ok = |p: &BTreeMap<String, String>| p.iter().all(|(k, v)| !long(k) && !long(v));
        if !props_ok(&self.properties) {
            return Err("property longer than 4096 bytes".into());
        }
        let paged = self.is_paged();
        for d in &self.disks {
            if long(&d.name) || !props_ok(&d.properties) {
                return Err(format!("disk {:?}: name or property too long", d.name));
            }
            if paged && !d.extents.is_empty() {
                return Err(format!(
                    "disk {:?}: extents listed in a manifest whose extents are in pages",
                    d.name
                ));
            }
            let covered = d.pages.iter().fold(0u64, |a, p| a.saturating_add(p.length));
            if d.is_paged() && covered != d.size {
                return Err(format!("disk {:?}: pages do not cover its size", d.name));
            }
        }
        Ok(())
    }

    /// Encodes the manifest (header, body, checksum).
    pub fn encode(&self) -> Vec<u8> {
        let paged = self.is_paged();
        let mut out = Vec::new();
        if paged {
            out.extend_from_slice(&MANIFEST_MAGIC_V2);
            out.put_u16(MANIFEST_VERSION_V2);
        } else {
            out.extend_from_slice(&MANIFEST_MAGIC_V1);
            out.put_u16(MANIFEST_VERSION_V1);
        }
        out.put_u16(0);
        out.put_u32(0);
        let since = self.time.duration_since(UNIX_EPOCH).unwrap_or_default();
        out.put_i64(since.as_secs() as i64);
        out.put_u32(since.subsec_nanos());
        out.put_str(&self.vm);
        out.put_str(self.mode.as_str());
        match &self.parent {
            None => out.put_u8(0),
            Some(p) => {
                out.put_u8(1);
                out.extend_from_slice(p.as_bytes());
            }
        }
        out.put_u8(self.id_scheme.code());
        match self.chunking {
            ChunkingParams::Fixed { size } => {
                out.put_u8(CHUNKING_FIXED);
                out.put_u32(size);
                out.put_u32(0);
                out.put_u32(0);
            }
            ChunkingParams::FastCdc { min, avg, max } => {
                out.put_u8(CHUNKING_FASTCDC);
                out.put_u32(min);
                out.put_u32(avg);
                out.put_u32(max);
            }
        }
        match self.compression {
            Compression::None => {
                out.put_u8(COMPRESSION_NONE);
                out.put_i32(0);
            }
            Compression::Zstd { level } => {
                out.put_u8(COMPRESSION_ZSTD);
                out.put_i32(level);
            }
        }
        put_properties(&mut out, &self.properties);
        out.put_u32(self.disks.len() as u32);
        for d in &self.disks {
            out.put_str(&d.name);
            out.put_u64(d.size);
            put_properties(&mut out, &d.properties);
            if paged {
                out.put_u32(d.pages.len() as u32);
                for p in &d.pages {
                    out.extend_from_slice(p.id.as_bytes());
                    out.put_u64(p.length);
                    out.put_u32(p.extents);
                    out.put_u32(p.chunks);
                    out.put_u64(p.data_bytes);
                }
                continue;
            }
            out.put_u64(d.extents.len() as u64);
            for e in &d.extents {
                put_extent(&mut out, e.length, e.chunk);
            }
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Decodes and validates a manifest. Never panics on any input.
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        decode(data, true, &mut |_| {})
    }

    /// Decodes a manifest without keeping its extent lists (every extent
    /// and page reference is still checked): the disks come back with
    /// empty `extents` and `pages`, their `size` set. For listings, which
    /// must not hold every extent of every snapshot in memory.
    pub fn decode_without_extents(data: &[u8]) -> Result<Self, DecodeError> {
        let mut s = decode(data, false, &mut |_| {})?;
        for d in &mut s.disks {
            d.pages = Vec::new();
        }
        Ok(s)
    }

    /// Whether `data` is a version 2 manifest (extent lists in pages), by
    /// its magic; says nothing of whether it decodes.
    pub fn is_paged_encoding(data: &[u8]) -> bool {
        data.starts_with(&MANIFEST_MAGIC_V2)
    }

    /// Like [`decode_without_extents`](Self::decode_without_extents), and
    /// calls `on_chunk` with every chunk extent, in disk order, as it goes
    /// (also for a manifest that turns out to be invalid further on).
    pub fn decode_visiting_chunks(
        data: &[u8],
        on_chunk: &mut dyn FnMut(ChunkExtent<'_>),
    ) -> Result<Self, DecodeError> {
        decode(data, false, on_chunk)
    }
}

/// A chunk extent met while decoding a manifest.
#[derive(Clone, Copy, Debug)]
pub struct ChunkExtent<'a> {
    /// The disk it belongs to.
    pub disk: &'a str,
    /// Its offset in the disk.
    pub offset: u64,
    /// Its length.
    pub length: u64,
    /// The chunk.
    pub id: ChunkId,
}

fn decode(
    data: &[u8],
    keep_extents: bool,
    on_chunk: &mut dyn FnMut(ChunkExtent<'_>),
) -> Result<Snapshot, DecodeError> {
    let paged = data.len() >= 8 && data[..8] == MANIFEST_MAGIC_V2;
    if data.len() >= 8 && data[..8] != MANIFEST_MAGIC_V1 && !paged {
        return Err(DecodeError::BadMagic);
    }
    let body = split_checksummed(data)?;
    let mut d = Decoder::new(body);
    let mut snapshot = decode_header(&mut d, paged)?;
    let disk_count = d.u32()? as usize;
    // Each disk takes at least 24 bytes (version 2: 20, a disk without
    // pages): bound allocations by the input.
    if disk_count > d.remaining() / if paged { 20 } else { 24 } {
        return Err(DecodeError::Invalid(format!(
            "{disk_count} disks cannot fit"
        )));
    }
    snapshot.disks.reserve(disk_count);
    let mut names = std::collections::HashSet::with_capacity(disk_count);
    for _ in 0..disk_count {
        let disk = if paged {
            decode_paged_disk(&mut d)?
        } else {
            decode_disk(&mut d, keep_extents, on_chunk)?
        };
        // Names are plain file names, each once: what a restore creates.
        if crate::pipeline::input::validate_disk_name(&disk.name).is_err() {
            return Err(DecodeError::Invalid(format!(
                "disk name {:?} is not a plain file name",
                disk.name
            )));
        }
        if !names.insert(disk.name.clone()) {
            return Err(DecodeError::Invalid(format!(
                "disk {:?} is listed twice",
                disk.name
            )));
        }
        snapshot.disks.push(disk);
    }
    d.expect_end()?;
    if paged && !snapshot.is_paged() {
        return Err(DecodeError::Invalid(
            "a version 2 manifest without any extent page (it is written as version 1)".into(),
        ));
    }
    Ok(snapshot)
}

/// Everything before the disks.
fn decode_header(d: &mut Decoder<'_>, paged: bool) -> Result<Snapshot, DecodeError> {
    if paged {
        d.magic_version(&MANIFEST_MAGIC_V2, MANIFEST_VERSION_V2)?;
    } else {
        d.magic_version(&MANIFEST_MAGIC_V1, MANIFEST_VERSION_V1)?;
    }
    d.zero_u16("reserved header u16")?;
    d.zero_u32("reserved header u32")?;
    let secs = d.i64()?;
    let nanos = d.u32()?;
    if secs < 0 || nanos >= 1_000_000_000 {
        return Err(DecodeError::Invalid("timestamp out of range".into()));
    }
    let time = UNIX_EPOCH
        .checked_add(Duration::new(secs as u64, nanos))
        .ok_or_else(|| DecodeError::Invalid("timestamp out of range".into()))?;
    let vm = d.string(MAX_STRING)?;
    let mode_name = d.string(MAX_STRING)?;
    let mode = SnapshotMode::from_name(&mode_name)
        .ok_or_else(|| DecodeError::Invalid(format!("unknown snapshot mode {mode_name:?}")))?;
    let parent = match d.u8()? {
        0 => None,
        1 => Some(SnapshotId(d.array()?)),
        x => return Err(DecodeError::Invalid(format!("parent flag {x}"))),
    };
    let scheme = d.u8()?;
    let id_scheme = IdScheme::from_code(scheme)
        .ok_or_else(|| DecodeError::Invalid(format!("unknown chunk id scheme {scheme}")))?;
    let kind = d.u8()?;
    let (a, b, c) = (d.u32()?, d.u32()?, d.u32()?);
    let chunking = match kind {
        CHUNKING_FIXED if b != 0 || c != 0 => {
            return Err(DecodeError::Invalid(format!(
                "fixed chunking carries unused fields {b}, {c} (must be 0)"
            )))
        }
        CHUNKING_FIXED => ChunkingParams::Fixed { size: a },
        CHUNKING_FASTCDC => ChunkingParams::FastCdc {
            min: a,
            avg: b,
            max: c,
        },
        x => return Err(DecodeError::Invalid(format!("unknown chunking kind {x}"))),
    };
    chunking.validate().map_err(DecodeError::Invalid)?;
    let ckind = d.u8()?;
    let level = d.i32()?;
    let compression = match ckind {
        COMPRESSION_NONE if level != 0 => {
            return Err(DecodeError::Invalid(format!(
                "compression none carries level {level} (must be 0)"
            )))
        }
        COMPRESSION_NONE => Compression::None,
        COMPRESSION_ZSTD => Compression::Zstd { level },
        x => return Err(DecodeError::Invalid(format!("unknown compression {x}"))),
    };
    compression.validate().map_err(DecodeError::Invalid)?;
    let properties = get_properties(d)?;
    Ok(Snapshot {
        time,
        vm,
        mode,
        parent,
        id_scheme,
        chunking,
        compression,
        properties,
        disks: Vec::new(),
    })
}

/// Encodes one extent: `tag | length | chunk id` (the layout shared by
/// version 1 disks and extent pages).
pub(crate) fn put_extent(out: &mut Vec<u8>, length: u64, chunk: Option<ChunkId>) {
    match chunk {
        None => {
            out.put_u8(EXTENT_ZERO);
            out.put_u64(length);
        }
        Some(id) => {
            out.put_u8(EXTENT_CHUNK);
            out.put_u32(length as u32);
            out.extend_from_slice(id.as_bytes());
        }
    }
}

/// Decodes one extent that starts at `at` (named in errors): a zero run
/// or a chunk of at most `MAX_CHUNK_SIZE` bytes, never empty.
pub(crate) fn decode_extent(
    d: &mut Decoder<'_>,
    at: u64,
) -> Result<(u64, Option<ChunkId>), DecodeError> {
    let (length, chunk) = match d.u8()? {
        EXTENT_ZERO => (d.u64()?, None),
        EXTENT_CHUNK => {
            let len = u64::from(d.u32()?);
            if len as usize > MAX_CHUNK_SIZE {
                return Err(DecodeError::Invalid(format!(
                    "chunk extent of {len} bytes at {at}"
                )));
            }
            (len, Some(ChunkId(d.array()?)))
        }
        x => {
            return Err(DecodeError::Invalid(format!(
                "unknown extent tag {x} at {at}"
            )))
        }
    };
    if length == 0 {
        return Err(DecodeError::Invalid(format!("empty extent at {at}")));
    }
    Ok((length, chunk))
}

/// One disk: name, size, properties and extents (kept or only checked).
fn decode_disk(
    d: &mut Decoder<'_>,
    keep_extents: bool,
    on_chunk: &mut dyn FnMut(ChunkExtent<'_>),
) -> Result<DiskManifest, DecodeError> {
    let name = d.string(MAX_STRING)?;
    let size = d.u64()?;
    let properties = get_properties(d)?;
    let count = d.u64()?;
    if count > (d.remaining() / 9) as u64 {
        return Err(DecodeError::Invalid(format!(
            "disk {name:?}: {count} extents cannot fit"
        )));
    }
    let mut extents = Vec::with_capacity(if keep_extents { count as usize } else { 0 });
    let mut offset = 0u64;
    let mut prev_zero = false;
    for _ in 0..count {
        let (length, chunk) = decode_extent(d, offset).map_err(|e| match e {
            DecodeError::Invalid(why) => DecodeError::Invalid(format!("disk {name:?}: {why}")),
            other => other,
        })?;
        // One encoding per disk: two zero runs side by side are one run.
        if chunk.is_none() && prev_zero {
            return Err(DecodeError::Invalid(format!(
                "disk {name:?}: zero run at {offset} follows a zero run (they are merged)"
            )));
        }
        prev_zero = chunk.is_none();
        if let Some(id) = chunk {
            on_chunk(ChunkExtent {
                disk: &name,
                offset,
                length,
                id,
            });
        }
        if keep_extents {
            extents.push(Extent {
                offset,
                length,
                chunk,
            });
        }
        offset = offset
            .checked_add(length)
            .ok_or_else(|| DecodeError::Invalid(format!("disk {name:?}: extents overflow")))?;
    }
    if offset != size {
        return Err(DecodeError::Invalid(format!(
            "disk {name:?}: extents cover {offset} bytes, size is {size}"
        )));
    }
    Ok(DiskManifest {
        name,
        size,
        properties,
        extents,
        pages: Vec::new(),
    })
}

/// One disk of a version 2 manifest: name, size, properties, page
/// references (each checked for counts that can be true; that they tile
/// the disk).
fn decode_paged_disk(d: &mut Decoder<'_>) -> Result<DiskManifest, DecodeError> {
    let name = d.string(MAX_STRING)?;
    let size = d.u64()?;
    let properties = get_properties(d)?;
    let count = d.u32()? as usize;
    if count > d.remaining() / PAGE_REF_LEN {
        return Err(DecodeError::Invalid(format!(
            "disk {name:?}: {count} pages cannot fit"
        )));
    }
    let mut pages = Vec::with_capacity(count);
    let mut offset = 0u64;
    for _ in 0..count {
        let page = PageRef {
            id: ChunkId(d.array()?),
            length: d.u64()?,
            extents: d.u32()?,
            chunks: d.u32()?,
            data_bytes: d.u64()?,
        };
        let possible = page.length > 0
            && (1..=PAGE_MAX_EXTENTS).contains(&page.extents)
            && page.chunks <= page.extents
            && u64::from(page.extents - page.chunks) <= u64::from(page.chunks) + 1
            && page.data_bytes <= page.length
            && page.data_bytes >= u64::from(page.chunks)
            && page.data_bytes <= u64::from(page.chunks) * MAX_CHUNK_SIZE as u64;
        if !possible {
            return Err(DecodeError::Invalid(format!(
                "disk {name:?}: page at {offset} claims {} bytes in {} extents, {} chunks \
                 holding {} bytes",
                page.length, page.extents, page.chunks, page.data_bytes
            )));
        }
        offset = offset
            .checked_add(page.length)
            .ok_or_else(|| DecodeError::Invalid(format!("disk {name:?}: pages overflow")))?;
        pages.push(page);
    }
    if offset != size {
        return Err(DecodeError::Invalid(format!(
            "disk {name:?}: pages cover {offset} bytes, size is {size}"
        )));
    }
    Ok(DiskManifest {
        name,
        size,
        properties,
        extents: Vec::new(),
        pages,
    })
}

/// Ids of every snapshot manifest in the pool, sorted (names that are not
/// snapshot ids are ignored).
pub(crate) fn list_snapshot_ids<P: PoolList + ?Sized>(pool: &P) -> EngineResult<Vec<SnapshotId>> {
    let mut ids: Vec<SnapshotId> = pool
        .list(FileKind::Snapshot)?
        .iter()
        .filter_map(|n| SnapshotId::from_hex(n))
        .collect();
    ids.sort();
    Ok(ids)
}

/// Reads one manifest and checks that its bytes hash to its name.
pub(crate) fn read_manifest<P: PoolRead + ?Sized>(
    pool: &P,
    id: &SnapshotId,
) -> EngineResult<bytes::Bytes> {
    let bytes = pool.read(FileKind::Snapshot, &id.to_hex())?;
    let got = SnapshotId::of_manifest(&bytes);
    if &got != id {
        return Err(Error::corrupt(
            format!("snapshot manifest {id}"),
            DecodeError::ChecksumMismatch {
                expected: id.to_hex(),
                got: got.to_hex(),
            },
        ));
    }
    Ok(bytes)
}

/// Reads, checks (content hash = name) and decodes one manifest.
pub(crate) fn read_snapshot<P: PoolRead + ?Sized>(
    pool: &P,
    id: &SnapshotId,
) -> EngineResult<Snapshot> {
    let bytes = read_manifest(pool, id)?;
    Snapshot::decode(&bytes).map_err(|e| Error::corrupt(format!("snapshot manifest {id}"), e))
}

fn put_properties(out: &mut Vec<u8>, p: &BTreeMap<String, String>) {
    out.put_u32(p.len() as u32);
    for (k, v) in p {
        out.put_str(k);
        out.put_str(v);
    }
}

fn get_properties(d: &mut Decoder<'_>) -> Result<BTreeMap<String, String>, DecodeError> {
    let n = d.u32()? as usize;
    if n > d.remaining() / 8 {
        return Err(DecodeError::Invalid(format!("{n} properties cannot fit")));
    }
    let mut p = BTreeMap::new();
    for _ in 0..n {
        let k = d.string(MAX_STRING)?;
        let v = d.string(MAX_STRING)?;
        // Keys strictly ascending: one encoding per set of properties.
        if p.last_key_value().is_some_and(|(last, _)| *last >= k) {
            return Err(DecodeError::Invalid(format!(
                "property {k:?} is out of order or repeated"
            )));
        }
        p.insert(k, v);
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Snapshot {
        let mut disk = DiskManifest::new("vda.img");
        disk.push(65536, Some(ChunkId::of(b"one")));
        disk.push(65536, None);
        disk.push(131072, None);
        disk.push(100, Some(ChunkId::of(b"two")));
        disk.properties.insert("source".into(), "raw".into());
        Snapshot {
            time: UNIX_EPOCH + Duration::new(1_700_000_000, 5),
            vm: "web01".into(),
            mode: SnapshotMode::Full,
            parent: None,
            id_scheme: IdScheme::Blake3,
            chunking: ChunkingParams::default(),
            compression: Compression::default(),
            properties: BTreeMap::new(),
            disks: vec![disk],
        }
    }

    #[test]
    fn validate_refuses_what_the_encoding_cannot_hold() {
        let at_limit = "x".repeat(MAX_STRING);
        let over = "x".repeat(MAX_STRING + 1);
        let mut s = sample();
        s.vm = at_limit.clone();
        s.properties.insert(at_limit.clone(), at_limit.clone());
        s.disks[0].name = at_limit.clone();
        s.disks[0]
            .properties
            .insert(at_limit.clone(), at_limit.clone());
        assert_eq!(s.validate(), Ok(()));
        type Spoil = fn(&mut Snapshot, &str);
        let cases: [(&str, Spoil); 6] = [
            ("VM name", |s, o| s.vm = o.into()),
            ("property", |s, o| {
                s.properties.insert(o.into(), "v".into());
            }),
            ("property", |s, o| {
                s.properties.insert("k".into(), o.into());
            }),
            ("disk", |s, o| s.disks[0].name = o.into()),
            ("disk", |s, o| {
                s.disks[0].properties.insert(o.into(), "v".into());
            }),
            ("disk", |s, o| {
                s.disks[0].properties.insert("k".into(), o.into());
            }),
        ];
        for (i, (what, spoil)) in cases.into_iter().enumerate() {
            let mut bad = sample();
            spoil(&mut bad, &over);
            let e = bad.validate().unwrap_err();
            assert!(e.contains(what), "case {i}: {e}");
        }
    }

    #[test]
    fn chunk_extents_are_at_most_the_largest_chunk() {
        for (len, ok) in [
            (MAX_CHUNK_SIZE as u64, true),
            (MAX_CHUNK_SIZE as u64 + 1, false),
        ] {
            let mut s = sample();
            s.disks[0].push(len, Some(ChunkId::of(b"big")));
            match Snapshot::decode(&s.encode()) {
                Ok(d) => assert!(ok && d == s, "{len}"),
                Err(e) => assert!(
                    !ok && e.to_string().contains("chunk extent of"),
                    "{len}: {e}"
                ),
            }
        }
    }

    #[test]
    fn strings_are_read_up_to_their_limit() {
        let mut s = sample();
        s.vm = "v".repeat(MAX_STRING);
        assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
        s.vm.push('v');
        let e = Snapshot::decode(&s.encode()).unwrap_err();
        assert!(e.to_string().contains("exceeds limit"), "{e}");
    }

    #[test]
    fn chunk_ids_lists_every_reference() {
        let ids: Vec<ChunkId> = sample().chunk_ids().collect();
        assert_eq!(ids, vec![ChunkId::of(b"one"), ChunkId::of(b"two")]);
    }

    #[test]
    fn a_snapshot_at_the_epoch_round_trips() {
        let mut s = sample();
        s.time = UNIX_EPOCH;
        assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
    }

    /// A count field of the encoding of `sample()`'s first disk.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Count {
        /// The disk count (u32 before the first disk).
        Disks,
        /// The disk's property count (u32 after its name and size).
        Properties,
        /// The disk's extent count (u64 after its empty properties).
        Extents,
        /// The disk's page count (u32 after its empty properties), in the
        /// encoding of `sample_v2()`.
        Pages,
    }

    /// `sample()` encoded (`sample_v2()` for `Pages`; its disk without
    /// properties), with count field `field` set to `value` and the
    /// checksum fixed; and how many bytes of the body follow the field.
    fn with_count(field: Count, value: u64) -> (Vec<u8>, usize) {
        let mut s = if field == Count::Pages {
            sample_v2()
        } else {
            sample()
        };
        s.disks[0].properties.clear();
        let mut b = s.encode();
        let name = b
            .windows(11)
            .position(|w| w == b"\x07\0\0\0vda.img")
            .unwrap();
        let (at, width, want) = match field {
            Count::Disks => (name - 4, 4, 1),
            Count::Properties => (name + 11 + 8, 4, 0),
            Count::Extents => (name + 11 + 8 + 4, 8, 3),
            Count::Pages => (name + 11 + 8 + 4, 4, 1),
        };
        let mut was = [0u8; 8];
        was[..width].copy_from_slice(&b[at..at + width]);
        assert_eq!(
            u64::from_le_bytes(was),
            want,
            "the field is where the test thinks"
        );
        b[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
        let n = b.len() - 32;
        let sum = *blake3::hash(&b[..n]).as_bytes();
        b[n..].copy_from_slice(&sum);
        (b, n - at - width)
    }

    /// Counts the input cannot hold are refused before anything is
    /// allocated for them (u64::MAX extents would ask for exabytes); a
    /// count at the bound is read on.
    #[test]
    fn counts_beyond_the_input_are_refused_first() {
        for (field, per, huge) in [
            (Count::Disks, 24, u64::from(u32::MAX)),
            (Count::Properties, 8, u64::from(u32::MAX)),
            (Count::Extents, 9, u64::MAX),
            (Count::Pages, PAGE_REF_LEN, u64::from(u32::MAX)),
        ] {
            let (_, rest) = with_count(field, 0);
            let bound = (rest / per) as u64;
            for value in [huge, bound + 1] {
                let e = Snapshot::decode(&with_count(field, value).0).unwrap_err();
                assert!(
                    e.to_string().contains("cannot fit"),
                    "{field:?} {value}: {e}"
                );
            }
            // At the bound: read on (the sample's one page is the bound,
            // so it decodes; the other counts fail further on).
            match Snapshot::decode(&with_count(field, bound).0) {
                Ok(_) => assert_eq!((field, bound), (Count::Pages, 1)),
                Err(e) => assert!(
                    !e.to_string().contains("cannot fit"),
                    "{field:?} {bound}: {e}"
                ),
            }
        }
    }

    #[test]
    fn modes_print_as_they_are_stored() {
        for mode in [
            SnapshotMode::Full,
            SnapshotMode::Cbt,
            SnapshotMode::Unchanged,
        ] {
            assert_eq!(mode.to_string(), mode.as_str());
            assert_eq!(SnapshotMode::from_name(&mode.to_string()), Some(mode));
        }
        assert_eq!(SnapshotMode::Full.to_string(), "full");
        assert_eq!(SnapshotMode::from_name("incremental"), None);
    }

    #[test]
    fn push_merges_zero_runs() {
        let s = sample();
        let d = &s.disks[0];
        assert_eq!(d.extents.len(), 3);
        assert_eq!(
            d.extents[1],
            Extent {
                offset: 65536,
                length: 196608,
                chunk: None
            }
        );
        assert_eq!(d.size, 65536 + 196608 + 100);
        assert_eq!(d.data_bytes(), 65636);
    }

    #[test]
    fn round_trip_and_golden_id() {
        let s = sample();
        let bytes = s.encode();
        assert_eq!(&bytes[..16], b"CAIRNSN1\x01\x00\x00\x00\x00\x00\x00\x00");
        assert_eq!(Snapshot::decode(&bytes).unwrap(), s);
        // Pin the encoding: any layout change must be a new version.
        assert_eq!(bytes.len(), 236);
        assert_eq!(
            SnapshotId::of_manifest(&bytes).to_hex(),
            include_str!("../../tests/golden/manifest_sample_id.txt").trim()
        );
    }

    #[test]
    fn every_flipped_byte_and_truncation_is_detected() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x80;
            assert!(Snapshot::decode(&bad).is_err(), "flip at {i}");
        }
        for n in 0..bytes.len() {
            assert!(Snapshot::decode(&bytes[..n]).is_err(), "length {n}");
        }
    }

    /// The sample's disk in pages (the default chunking's span holds it
    /// in one), plus a second, empty disk (no pages).
    fn sample_v2() -> Snapshot {
        let mut s = sample();
        let d = &mut s.disks[0];
        let pages = crate::store::extent_page::cut_pages(
            d.extents.iter().map(|e| (e.length, e.chunk)),
            crate::store::extent_page::page_span(s.chunking),
        );
        d.extents.clear();
        d.pages = pages.iter().map(|p| p.reference).collect();
        s.disks.push(DiskManifest::new("empty"));
        s
    }

    #[test]
    fn version_2_round_trip_and_layout() {
        let s = sample_v2();
        let bytes = s.encode();
        assert_eq!(&bytes[..16], b"CAIRNSN2\x02\x00\x00\x00\x00\x00\x00\x00");
        assert_eq!(Snapshot::decode(&bytes).unwrap(), s);
        assert_eq!(Snapshot::decode(&bytes).unwrap().encode(), bytes);
        // The disks, pinned by hand: after the header and properties.
        let p = s.disks[0].pages[0];
        let mut disks = Vec::new();
        disks.extend_from_slice(&2u32.to_le_bytes());
        disks.extend_from_slice(&7u32.to_le_bytes());
        disks.extend_from_slice(b"vda.img");
        disks.extend_from_slice(&(65536u64 + 196608 + 100).to_le_bytes());
        disks.extend_from_slice(&1u32.to_le_bytes());
        disks.extend_from_slice(&6u32.to_le_bytes());
        disks.extend_from_slice(b"source");
        disks.extend_from_slice(&3u32.to_le_bytes());
        disks.extend_from_slice(b"raw");
        disks.extend_from_slice(&1u32.to_le_bytes());
        disks.extend_from_slice(p.id.as_bytes());
        disks.extend_from_slice(&(65536u64 + 196608 + 100).to_le_bytes());
        disks.extend_from_slice(&3u32.to_le_bytes());
        disks.extend_from_slice(&2u32.to_le_bytes());
        disks.extend_from_slice(&65636u64.to_le_bytes());
        disks.extend_from_slice(&5u32.to_le_bytes());
        disks.extend_from_slice(b"empty");
        disks.extend_from_slice(&0u64.to_le_bytes());
        disks.extend_from_slice(&0u32.to_le_bytes());
        disks.extend_from_slice(&0u32.to_le_bytes());
        let body = &bytes[..bytes.len() - 32];
        assert!(body.ends_with(&disks), "disk layout changed");
        assert_eq!(
            &bytes[bytes.len() - 32..],
            blake3::hash(body).as_bytes(),
            "checksum"
        );
        assert_eq!(s.disks[0].data_bytes(), 65636);
        assert_eq!(s.disks[0].chunk_count(), 2);
        assert_eq!(s.disks[0].extent_count(), 3);
    }

    #[test]
    fn disk_names_are_plain_file_names_each_once() {
        for (names, ok) in [
            (&["vda", "vdb"][..], true),
            (&["vda", "vda"][..], false),
            (&[""][..], false),
            (&[".."][..], false),
            (&["a/b"][..], false),
        ] {
            let mut s = sample();
            s.disks = names.iter().map(|n| DiskManifest::new(*n)).collect();
            let r = Snapshot::decode(&s.encode());
            assert_eq!(r.is_ok(), ok, "{names:?}: {r:?}");
        }
    }

    #[test]
    fn zstd_levels_are_those_a_backup_accepts() {
        for (level, ok) in [(0, false), (1, true), (19, true), (20, false), (-1, false)] {
            let mut s = sample();
            s.compression = Compression::Zstd { level };
            assert_eq!(Snapshot::decode(&s.encode()).is_ok(), ok, "level {level}");
        }
    }

    #[test]
    fn two_zero_runs_side_by_side_are_refused() {
        // The same disk as one merged run decodes; split in two it would be
        // a second encoding (a second snapshot id) of the same contents.
        let mut s = sample();
        let merged = s.encode();
        assert!(Snapshot::decode(&merged).is_ok());
        let run = s.disks[0].extents[1];
        assert_eq!(run.chunk, None);
        let half = run.length / 2;
        s.disks[0].extents.splice(
            1..2,
            [
                Extent {
                    offset: run.offset,
                    length: half,
                    chunk: None,
                },
                Extent {
                    offset: run.offset + half,
                    length: run.length - half,
                    chunk: None,
                },
            ],
        );
        let e = Snapshot::decode(&s.encode()).unwrap_err();
        assert!(e.to_string().contains("follows a zero run"), "{e}");
    }

    #[test]
    fn version_2_decodes_many_empty_disks() {
        // An empty version 2 disk with a one-byte name takes 21 bytes, less
        // than version 1's smallest disk (24): the disk count's bound must
        // be version 2's own, or this manifest would be refused.
        let mut s = sample_v2();
        for c in ('a'..='z').chain('A'..='Z').chain('0'..='9') {
            s.disks.push(DiskManifest::new(c.to_string()));
        }
        let bytes = s.encode();
        let without_disks = {
            let mut t = s.clone();
            t.disks.clear();
            t.encode().len()
        };
        assert!(
            (bytes.len() - without_disks) / 24 < s.disks.len(),
            "the test needs disks smaller than version 1's"
        );
        assert_eq!(Snapshot::decode(&bytes).unwrap(), s);
        assert_eq!(Snapshot::decode(&bytes).unwrap().encode(), bytes);
        assert_eq!(
            Snapshot::decode_without_extents(&bytes)
                .unwrap()
                .disks
                .len(),
            64
        );
    }

    #[test]
    fn version_2_refuses_what_cannot_be_true() {
        let good = sample_v2();
        let refused = |f: &dyn Fn(&mut Snapshot)| {
            let mut s = good.clone();
            f(&mut s);
            Snapshot::decode(&s.encode()).is_err()
        };
        assert!(
            refused(&|s| s.disks[0].pages[0].length += 1),
            "pages must tile"
        );
        assert!(refused(&|s| s.disks[0].size += 1), "size");
        assert!(refused(&|s| s.disks[0].pages[0].extents = 0));
        assert!(refused(
            &|s| s.disks[0].pages[0].extents = PAGE_MAX_EXTENTS + 1
        ));
        assert!(
            refused(&|s| s.disks[0].pages[0].chunks = 4),
            "more chunks than extents"
        );
        assert!(
            refused(&|s| s.disks[0].pages[0].extents = 3 + 3),
            "zero runs not merged"
        );
        assert!(
            refused(&|s| s.disks[0].pages[0].data_bytes = 1),
            "fewer bytes than chunks"
        );
        assert!(refused(&|s| s.disks[0].pages[0].data_bytes = 1 << 40));
        // An empty page, even where the pages still tile the disk.
        assert!(
            refused(&|s| {
                let mut empty = s.disks[0].pages[0];
                (empty.length, empty.extents, empty.chunks, empty.data_bytes) = (0, 1, 0, 0);
                s.disks[0].pages.push(empty);
            }),
            "an empty page"
        );
        // At the bounds: two chunks of the largest size in a page, and a
        // page of one zero run (no chunk, no data).
        let largest = MAX_CHUNK_SIZE as u64;
        let mut at_bound = good.clone();
        let page = &mut at_bound.disks[0].pages[0];
        (page.length, page.extents, page.chunks, page.data_bytes) =
            (2 * largest, 2, 2, 2 * largest);
        at_bound.disks[0].size = 2 * largest;
        assert_eq!(Snapshot::decode(&at_bound.encode()).unwrap(), at_bound);
        let page = &mut at_bound.disks[0].pages[0];
        (page.extents, page.chunks, page.data_bytes) = (1, 0, 0);
        assert_eq!(Snapshot::decode(&at_bound.encode()).unwrap(), at_bound);
        // A version 2 manifest without a page is version 1's snapshot.
        let mut v1 = sample();
        v1.disks[0] = DiskManifest::new("vda.img");
        let mut bytes = v1.encode();
        bytes[..8].copy_from_slice(b"CAIRNSN2");
        bytes[8] = 2;
        // (v1 writes a u64 extent count where v2 has a u32 page count:
        // re-encode the body by hand as version 2.)
        let n = bytes.len();
        bytes.truncate(n - 32);
        let n = bytes.len();
        bytes.truncate(n - 8);
        bytes.extend_from_slice(&0u32.to_le_bytes());
        let sum = blake3::hash(&bytes);
        bytes.extend_from_slice(sum.as_bytes());
        let err = Snapshot::decode(&bytes).unwrap_err();
        assert!(err.to_string().contains("without any extent page"), "{err}");
        // Mixing listed extents with pages is not encodable.
        let mut mixed = good.clone();
        mixed.disks[1].push(4096, None);
        assert!(mixed.validate().is_err());
    }

    #[test]
    fn version_2_flipped_bytes_and_truncations_are_detected() {
        let bytes = sample_v2().encode();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x80;
            assert!(Snapshot::decode(&bad).is_err(), "flip at {i}");
        }
        for n in 0..bytes.len() {
            assert!(Snapshot::decode(&bytes[..n]).is_err(), "length {n}");
        }
    }

    proptest! {
        #[test]
        fn round_trip_any(
            vm in ".{0,40}",
            lens in proptest::collection::vec((1u64..200_000, any::<bool>(), any::<u8>()), 0..50),
            secs in 0i64..4_000_000_000,
        ) {
            let mut disk = DiskManifest::new("d");
            for (len, data, seed) in lens {
                if data { disk.push(len.min(65536), Some(ChunkId::of(&[seed]))); } else { disk.push(len, None); }
            }
            let mut s = sample();
            s.vm = vm;
            s.time = UNIX_EPOCH + Duration::from_secs(secs as u64);
            s.disks = vec![disk];
            let bytes = s.encode();
            prop_assert_eq!(Snapshot::decode(&bytes).unwrap(), s.clone());
            let light = Snapshot::decode_without_extents(&bytes).unwrap();
            prop_assert_eq!(light.disks[0].size, s.disks[0].size);
            prop_assert!(light.disks[0].extents.is_empty());
            // The same disk as version 2 (when it has any extent).
            let mut v2 = s.clone();
            let d = &mut v2.disks[0];
            let pages = crate::store::extent_page::cut_pages(
                d.extents.iter().map(|e| (e.length, e.chunk)),
                crate::store::extent_page::page_span(v2.chunking),
            );
            d.extents.clear();
            d.pages = pages.iter().map(|p| p.reference).collect();
            if v2.is_paged() {
                let bytes = v2.encode();
                prop_assert!(bytes.starts_with(b"CAIRNSN2"));
                prop_assert_eq!(Snapshot::decode(&bytes).unwrap(), v2.clone());
                let light = Snapshot::decode_without_extents(&bytes).unwrap();
                prop_assert!(light.disks[0].pages.is_empty());
                prop_assert_eq!(light.disks[0].size, v2.disks[0].size);
            }
        }
    }
}
