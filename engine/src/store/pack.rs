//! Pack files: many blobs, then a blob table, then a fixed-size trailer.
//!
//! ```text
//! header  (16 B)  magic "CAIRNPK1" | version u16 = 1 | flags u16 = 0 | reserved u32 = 0
//! blobs           blob* (see `codec`), back to back
//! table           entry_count × 48 B, in blob order:
//!                   chunk id [32] | offset u64 | stored length u32 | raw length u32
//! trailer (56 B)  table offset u64 | entry_count u32 | version u16 = 1 | reserved u16 = 0
//!                 | BLAKE3 of the table [32] | end magic "CAIRNPKE"
//! ```
//! A pack is written as one streaming, create-only pool object and sealed
//! (committed) when it reaches its size limit, so a crash loses at most the
//! pack being written. Its table makes it self-describing: the dedup index can
//! always be rebuilt from the packs alone.

use std::io::Write;

use crate::error::{Error, Result};
use crate::id::{hex, ChunkId, PackId};
use crate::kind::FileKind;
use crate::store::blob::BlobHeader;
use crate::store::format::{
    BLOB_HEADER_LEN, MAX_CHUNK_SIZE, PACK_END_MAGIC_V1, PACK_ENTRY_LEN, PACK_HEADER_LEN,
    PACK_MAGIC_V1, PACK_TRAILER_LEN, PACK_VERSION_V1,
};
use crate::store::pool::{ObjectWriter, PoolRead, PoolWrite};
use crate::store::wire::{DecodeError, Decoder, Encoder};

/// One blob's place in a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    /// The chunk.
    pub id: ChunkId,
    /// Offset of the blob header from the start of the pack.
    pub offset: u64,
    /// Stored length: blob header + body.
    pub length: u32,
    /// Plaintext length of the chunk.
    pub raw_length: u32,
}

/// Streams blobs into a new pack object.
pub struct PackWriter {
    id: PackId,
    out: Box<dyn ObjectWriter>,
    entries: Vec<PackEntry>,
    written: u64,
    raw_bytes: u64,
}

impl std::fmt::Debug for PackWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackWriter")
            .field("id", &self.id)
            .field("entries", &self.entries.len())
            .field("written", &self.written)
            .finish()
    }
}

impl PackWriter {
    /// Starts a pack under a fresh random name.
    pub fn create(pool: &dyn PoolWrite) -> Result<Self> {
        let id = PackId::random()?;
        let out = pool.create(FileKind::Pack, &id.to_hex())?;
        let mut w = PackWriter {
            id,
            out,
            entries: Vec::new(),
            written: 0,
            raw_bytes: 0,
        };
        w.write_raw(&pack_header())?;
        Ok(w)
    }

    /// The pack's name.
    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // for fuzz targets and benches
    pub fn id(&self) -> PackId {
        self.id
    }

    /// Bytes written so far (header + blobs).
    pub fn stored_bytes(&self) -> u64 {
        self.written
    }

    /// Plaintext bytes of the blobs added so far.
    pub fn raw_bytes(&self) -> u64 {
        self.raw_bytes
    }

    /// True when no blob was added.
    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // for fuzz targets and benches
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn write_raw(&mut self, data: &[u8]) -> Result<()> {
        self.out.write_all(data).map_err(|source| Error::PoolIo {
            op: "write",
            kind: FileKind::Pack,
            name: self.id.to_hex(),
            source,
        })?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Appends one encoded blob (as produced by [`BlobCodec`](crate::store::blob::BlobCodec)).
    pub fn add(&mut self, id: ChunkId, raw_length: u32, blob: &[u8]) -> Result<PackEntry> {
        let entry = PackEntry {
            id,
            offset: self.written,
            length: blob.len() as u32,
            raw_length,
        };
        self.write_raw(blob)?;
        self.raw_bytes += raw_length as u64;
        self.entries.push(entry);
        Ok(entry)
    }

    /// Writes the table and trailer and commits the pack. Returns its id, its
    /// entries and its total size.
    pub fn finish(mut self) -> Result<(PackId, Vec<PackEntry>, u64)> {
        let tail = encode_table(&self.entries, self.written);
        self.write_raw(&tail)?;
        let PackWriter {
            id,
            out,
            entries,
            written,
            ..
        } = self;
        out.commit()?;
        Ok((id, entries, written))
    }
}

/// The pack header: magic, version 1, flags and reserved 0.
pub fn pack_header() -> Vec<u8> {
    let mut header = Vec::with_capacity(PACK_HEADER_LEN);
    header.extend_from_slice(&PACK_MAGIC_V1);
    header.put_u16(PACK_VERSION_V1);
    header.put_u16(0);
    header.put_u32(0);
    header
}

/// Encodes the blob table and trailer for a pack whose blobs end at `table_offset`.
pub fn encode_table(entries: &[PackEntry], table_offset: u64) -> Vec<u8> {
    let mut table = Vec::with_capacity(entries.len() * PACK_ENTRY_LEN + PACK_TRAILER_LEN);
    for e in entries {
        table.extend_from_slice(e.id.as_bytes());
        table.put_u64(e.offset);
        table.put_u32(e.length);
        table.put_u32(e.raw_length);
    }
    let hash = blake3::hash(&table);
    table.put_u64(table_offset);
    table.put_u32(entries.len() as u32);
    table.put_u16(PACK_VERSION_V1);
    table.put_u16(0);
    table.extend_from_slice(hash.as_bytes());
    table.extend_from_slice(&PACK_END_MAGIC_V1);
    table
}

/// The decoded fixed-size trailer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackTrailer {
    pub table_offset: u64,
    pub entry_count: u32,
    pub table_hash: [u8; 32],
}

impl PackTrailer {
    /// Decodes the last [`PACK_TRAILER_LEN`] bytes of a pack of `pack_size` bytes.
    pub fn decode(trailer: &[u8], pack_size: u64) -> Result<Self, DecodeError> {
        if trailer.len() != PACK_TRAILER_LEN {
            return Err(DecodeError::Truncated {
                needed: PACK_TRAILER_LEN as u64,
                available: trailer.len() as u64,
            });
        }
        let mut d = Decoder::new(trailer);
        let table_offset = d.u64()?;
        let entry_count = d.u32()?;
        let version = d.u16()?;
        let reserved = d.u16()?;
        let table_hash = d.array::<32>()?;
        let magic = d.array::<8>()?;
        if magic != PACK_END_MAGIC_V1 {
            return Err(DecodeError::BadMagic);
        }
        if version != PACK_VERSION_V1 {
            return Err(DecodeError::UnsupportedVersion(version as u32));
        }
        if reserved != 0 {
            return Err(DecodeError::Invalid(
                "reserved trailer field is not 0".into(),
            ));
        }
        let table_len = entry_count as u64 * PACK_ENTRY_LEN as u64;
        let expected_size = table_offset
            .checked_add(table_len)
            .and_then(|v| v.checked_add(PACK_TRAILER_LEN as u64));
        if table_offset < PACK_HEADER_LEN as u64 || expected_size != Some(pack_size) {
            return Err(DecodeError::Invalid(format!(
                "trailer (table at {table_offset}, {entry_count} entries) does not fit a pack of {pack_size} bytes"
            )));
        }
        Ok(PackTrailer {
            table_offset,
            entry_count,
            table_hash,
        })
    }

    pub fn table_len(&self) -> usize {
        self.entry_count as usize * PACK_ENTRY_LEN
    }
}

/// Decodes and checks a blob table against its trailer.
pub fn decode_table(table: &[u8], trailer: &PackTrailer) -> Result<Vec<PackEntry>, DecodeError> {
    if table.len() != trailer.table_len() {
        return Err(DecodeError::Truncated {
            needed: trailer.table_len() as u64,
            available: table.len() as u64,
        });
    }
    let got = blake3::hash(table);
    if got.as_bytes() != &trailer.table_hash {
        return Err(DecodeError::ChecksumMismatch {
            expected: hex(&trailer.table_hash),
            got: got.to_hex().to_string(),
        });
    }
    let mut d = Decoder::new(table);
    let mut entries = Vec::with_capacity(trailer.entry_count as usize);
    let mut next_free = PACK_HEADER_LEN as u64;
    for i in 0..trailer.entry_count {
        let id = ChunkId(d.array()?);
        let offset = d.u64()?;
        let length = d.u32()?;
        let raw_length = d.u32()?;
        let end = offset.checked_add(length as u64);
        // Blobs lie back to back from the header to the table: one
        // encoding per pack, no gaps a reader would have to skip.
        let ok = offset == next_free
            && end.is_some_and(|e| e <= trailer.table_offset)
            && (length as usize) > BLOB_HEADER_LEN
            && (length as usize) <= BLOB_HEADER_LEN + raw_length as usize
            && (raw_length as usize) <= MAX_CHUNK_SIZE
            && raw_length > 0;
        if !ok {
            return Err(DecodeError::Invalid(format!(
                "table entry {i} (offset {offset}, length {length}, raw {raw_length}) is out of bounds"
            )));
        }
        next_free = end.unwrap_or(u64::MAX);
        entries.push(PackEntry {
            id,
            offset,
            length,
            raw_length,
        });
    }
    if next_free != trailer.table_offset {
        return Err(DecodeError::Invalid(format!(
            "blobs end at {next_free} but the table starts at {}",
            trailer.table_offset
        )));
    }
    Ok(entries)
}

/// Checks a pack header (the first [`PACK_HEADER_LEN`] bytes of a pack).
pub fn check_pack_header(header: &[u8]) -> Result<(), DecodeError> {
    let mut d = Decoder::new(header);
    d.magic_version(&PACK_MAGIC_V1, PACK_VERSION_V1)?;
    let (flags, reserved) = (d.u16()?, d.u32()?);
    if flags != 0 || reserved != 0 {
        return Err(DecodeError::Invalid(format!(
            "pack header flags {flags:#x} / reserved {reserved:#x} must be 0"
        )));
    }
    Ok(())
}

/// Parses a whole pack held in memory: checks the header, the trailer, the
/// table and every blob header against its table entry; returns the table.
#[cfg_attr(not(feature = "internals"), allow(dead_code))] // for fuzz targets and benches
pub fn parse_pack(pack: &[u8]) -> Result<Vec<PackEntry>, DecodeError> {
    check_pack_header(pack)?;
    if pack.len() < PACK_HEADER_LEN + PACK_TRAILER_LEN {
        return Err(DecodeError::Truncated {
            needed: (PACK_HEADER_LEN + PACK_TRAILER_LEN) as u64,
            available: pack.len() as u64,
        });
    }
    let trailer = PackTrailer::decode(&pack[pack.len() - PACK_TRAILER_LEN..], pack.len() as u64)?;
    let start = trailer.table_offset as usize;
    let table = pack
        .get(start..start + trailer.table_len())
        .ok_or(DecodeError::Truncated {
            needed: (start + trailer.table_len()) as u64,
            available: pack.len() as u64,
        })?;
    let entries = decode_table(table, &trailer)?;
    for (i, e) in entries.iter().enumerate() {
        let blob = &pack[e.offset as usize..(e.offset + e.length as u64) as usize];
        let header = BlobHeader::decode(blob)?;
        if header.raw_len != e.raw_length
            || BLOB_HEADER_LEN + header.body_len as usize != blob.len()
        {
            return Err(DecodeError::Invalid(format!(
                "table entry {i} (length {}, raw {}) disagrees with its blob header (body {}, raw {})",
                e.length, e.raw_length, header.body_len, header.raw_len
            )));
        }
    }
    Ok(entries)
}

/// Reads just the table of a pack in a pool (two range reads).
pub fn read_pack_table<P: PoolRead + ?Sized>(pool: &P, id: &PackId) -> Result<Vec<PackEntry>> {
    let name = id.to_hex();
    let what = || format!("pack {name}");
    let size = pool.size(FileKind::Pack, &name)?;
    if size < (PACK_HEADER_LEN + PACK_TRAILER_LEN) as u64 {
        return Err(Error::corrupt(
            what(),
            DecodeError::Truncated {
                needed: (PACK_HEADER_LEN + PACK_TRAILER_LEN) as u64,
                available: size,
            },
        ));
    }
    let tail = pool.read_range(
        FileKind::Pack,
        &name,
        size - PACK_TRAILER_LEN as u64,
        PACK_TRAILER_LEN,
    )?;
    let trailer = PackTrailer::decode(&tail, size).map_err(|e| Error::corrupt(what(), e))?;
    let table = pool.read_range(
        FileKind::Pack,
        &name,
        trailer.table_offset,
        trailer.table_len(),
    )?;
    decode_table(&table, &trailer).map_err(|e| Error::corrupt(what(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BLAKE3 of the pack `golden_layout` writes.
    const GOLDEN_PACK_BLAKE3: &str =
        "af902f7d4a2b4dad1e9f51c01f4719511b968fe1aca789aacb08018f0051d82c";

    fn sample_pack() -> (Vec<u8>, Vec<PackEntry>) {
        let mut pack = Vec::new();
        pack.extend_from_slice(&PACK_MAGIC_V1);
        pack.put_u16(1);
        pack.put_u16(0);
        pack.put_u32(0);
        let mut entries = Vec::new();
        let mut codec =
            crate::store::blob::BlobCodec::new(crate::store::blob::Compression::default());
        for i in 0..3u8 {
            let chunk = vec![i + 1; 1000 * (i as usize + 1)];
            let offset = pack.len() as u64;
            let n = codec.encode_into(&chunk, &mut pack).unwrap();
            entries.push(PackEntry {
                id: ChunkId::of(&chunk),
                offset,
                length: n as u32,
                raw_length: chunk.len() as u32,
            });
        }
        let off = pack.len() as u64;
        pack.extend_from_slice(&encode_table(&entries, off));
        (pack, entries)
    }

    #[test]
    fn round_trip() {
        let (pack, entries) = sample_pack();
        assert_eq!(parse_pack(&pack).unwrap(), entries);
    }

    /// A trailer whose table would overlap the header, or whose table and
    /// trailer do not end exactly at the pack's end, is refused.
    #[test]
    fn a_trailer_must_fit_its_pack() {
        let trailer = |table_offset: u64, entries: u32| {
            let mut t = table_offset.to_le_bytes().to_vec();
            t.extend_from_slice(&entries.to_le_bytes());
            t.extend_from_slice(&PACK_VERSION_V1.to_le_bytes());
            t.extend_from_slice(&[0; 2 + 32]);
            t.extend_from_slice(&PACK_END_MAGIC_V1);
            t
        };
        let fits = |offset: u64, entries: u32| {
            offset + u64::from(entries) * PACK_ENTRY_LEN as u64 + PACK_TRAILER_LEN as u64
        };
        assert!(PackTrailer::decode(&trailer(16, 2), fits(16, 2)).is_ok());
        for (offset, entries, size) in [
            (16, 2, fits(16, 2) + 1),
            (16, 2, fits(16, 2) - 1),
            (0, 2, fits(0, 2)),
            (15, 0, fits(15, 0)),
        ] {
            let e = PackTrailer::decode(&trailer(offset, entries), size).unwrap_err();
            assert!(
                e.to_string().contains("does not fit"),
                "{offset} {entries} {size}: {e}"
            );
        }
    }

    /// A table entry must hold more than a blob header: a blob of a
    /// non-empty chunk has a body.
    #[test]
    fn a_blob_of_a_header_alone_is_out_of_bounds() {
        let mut pack = pack_header();
        let header = crate::store::blob::BlobHeader {
            compression: crate::store::format::COMPRESSION_NONE,
            raw_len: 1,
            body_len: 0,
        };
        pack.extend_from_slice(&header.encode());
        let entry = PackEntry {
            id: ChunkId::of(b"x"),
            offset: 16,
            length: BLOB_HEADER_LEN as u32,
            raw_length: 1,
        };
        pack.extend_from_slice(&encode_table(&[entry], 16 + BLOB_HEADER_LEN as u64));
        let e = parse_pack(&pack).unwrap_err();
        assert!(e.to_string().contains("out of bounds"), "{e}");
    }

    /// A pack of one blob of `raw` bytes whose table entry says
    /// `table_raw`.
    fn one_blob_pack(raw: &[u8], table_raw: u32) -> Vec<u8> {
        let mut pack = pack_header();
        let mut blob = Vec::new();
        crate::store::blob::BlobCodec::new(crate::store::blob::Compression::None)
            .encode_into(raw, &mut blob)
            .unwrap();
        pack.extend_from_slice(&blob);
        let entry = PackEntry {
            id: ChunkId::of(raw),
            offset: 16,
            length: blob.len() as u32,
            raw_length: table_raw,
        };
        pack.extend_from_slice(&encode_table(&[entry], 16 + blob.len() as u64));
        pack
    }

    #[test]
    fn packs_of_no_blob_and_disagreeing_entries() {
        // No blob at all: a header and a trailer, valid.
        let mut empty = pack_header();
        empty.extend_from_slice(&encode_table(&[], 16));
        assert_eq!(empty.len(), PACK_HEADER_LEN + PACK_TRAILER_LEN);
        assert_eq!(parse_pack(&empty).unwrap(), Vec::new());
        let e = parse_pack(&empty[..empty.len() - 1]).unwrap_err();
        assert!(
            matches!(
                e,
                DecodeError::Truncated {
                    needed: 72,
                    available: 71
                }
            ),
            "{e}"
        );
        assert!(parse_pack(&one_blob_pack(b"ab", 2)).is_ok());
        // The entry's raw length disagrees with the blob header's (lengths
        // agree), or is 0.
        let e = parse_pack(&one_blob_pack(b"ab", 3)).unwrap_err();
        assert!(e.to_string().contains("disagrees"), "{e}");
        let e = parse_pack(&one_blob_pack(b"ab", 0)).unwrap_err();
        assert!(e.to_string().contains("out of bounds"), "{e}");
    }

    /// The table alone (what an index rebuild reads) refuses an entry
    /// whose stored length exceeds 12 + its plaintext length: no blob body
    /// is longer than its plaintext.
    #[test]
    fn a_table_entry_longer_than_its_plaintext_allows_is_refused() {
        let table_of = |length: u32| {
            let entry = PackEntry {
                id: ChunkId::of(b"ab"),
                offset: 16,
                length,
                raw_length: 2,
            };
            let table_offset = 16 + length as u64;
            let tail = encode_table(&[entry], table_offset);
            let size = table_offset + tail.len() as u64;
            let (table, trailer) = tail.split_at(tail.len() - PACK_TRAILER_LEN);
            let trailer = PackTrailer::decode(trailer, size).unwrap();
            decode_table(table, &trailer)
        };
        let most = (BLOB_HEADER_LEN + 2) as u32;
        assert_eq!(table_of(most).unwrap()[0].length, most);
        let e = table_of(most + 1).unwrap_err();
        assert!(e.to_string().contains("out of bounds"), "{e}");
    }

    #[test]
    fn writers_say_whether_they_hold_anything() {
        let pool = crate::store::testing::LastObject::default();
        let mut w = PackWriter::create(&pool).unwrap();
        assert!(w.is_empty());
        let mut blob = Vec::new();
        crate::store::blob::BlobCodec::new(crate::store::blob::Compression::None)
            .encode_into(b"x", &mut blob)
            .unwrap();
        w.add(ChunkId::of(b"x"), 1, &blob).unwrap();
        assert!(!w.is_empty());
    }

    /// What `PackWriter` stores, byte for byte: three uncompressed blobs
    /// back to back after the 16-byte header, then the table and the
    /// trailer. Offsets follow from the layout in the module doc alone
    /// (12-byte blob header + plaintext); the whole pack is pinned by its
    /// BLAKE3 hash, so any change to the format fails here.
    #[test]
    fn golden_layout() {
        let pool = crate::store::testing::LastObject::default();
        let mut w = PackWriter::create(&pool).unwrap();
        let mut codec = crate::store::blob::BlobCodec::new(crate::store::blob::Compression::None);
        for i in 0..3u8 {
            let chunk = vec![i + 1; 1000 * (i as usize + 1)];
            let mut blob = Vec::new();
            codec.encode_into(&chunk, &mut blob).unwrap();
            w.add(ChunkId::of(&chunk), chunk.len() as u32, &blob)
                .unwrap();
        }
        let shown = format!("{w:?}");
        assert!(
            shown.starts_with("PackWriter")
                && shown.contains("entries: 3")
                && shown.contains("written: 6052"),
            "{shown}"
        );
        let (_, entries, size) = w.finish().unwrap();
        let pack = pool.bytes();
        assert_eq!(pack.len() as u64, size);
        assert_eq!(&pack[..16], b"CAIRNPK1\x01\x00\x00\x00\x00\x00\x00\x00");
        assert_eq!(&pack[pack.len() - 8..], b"CAIRNPKE");
        let offsets: Vec<u64> = entries.iter().map(|e| e.offset).collect();
        assert_eq!(
            offsets,
            vec![16, 16 + 12 + 1000, 16 + 12 + 1000 + 12 + 2000]
        );
        let lengths: Vec<u32> = entries.iter().map(|e| e.length).collect();
        assert_eq!(lengths, vec![1012, 2012, 3012]);
        let n = pack.len();
        let trailer = &pack[n - 56..];
        let table_offset = u64::from_le_bytes(trailer[..8].try_into().unwrap());
        assert_eq!(table_offset, 16 + 1012 + 2012 + 3012);
        assert_eq!(u32::from_le_bytes(trailer[8..12].try_into().unwrap()), 3);
        assert_eq!(parse_pack(&pack).unwrap(), entries);
        assert_eq!(
            blake3::hash(&pack).to_hex().as_str(),
            GOLDEN_PACK_BLAKE3,
            "the pack format changed: update docs/FORMAT.md and this vector together"
        );
    }

    #[test]
    fn flipped_byte_in_table_or_trailer_is_detected() {
        let (pack, _) = sample_pack();
        let table_start =
            u64::from_le_bytes(pack[pack.len() - 56..pack.len() - 48].try_into().unwrap()) as usize;
        for i in (table_start..pack.len()).chain(0..16) {
            let mut bad = pack.clone();
            bad[i] ^= 0x01;
            assert!(parse_pack(&bad).is_err(), "flip at {i} not detected");
        }
    }

    #[test]
    fn truncated_and_empty_packs_fail() {
        let (pack, _) = sample_pack();
        for n in 0..pack.len() {
            assert!(parse_pack(&pack[..n]).is_err(), "length {n}");
        }
    }
}
