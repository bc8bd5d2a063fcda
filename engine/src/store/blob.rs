//! The blob codec: how one chunk is stored inside a pack.
//!
//! ```text
//! offset size field
//!  0     1    blob format version (1)
//!  1     1    compression: 0 = stored raw, 1 = zstd
//!  2     1    encryption: 0 = none (reserved for AEAD)
//!  3     1    reserved, 0
//!  4     4    raw (plaintext) length, u32 LE
//!  8     4    body length, u32 LE
//! 12     n    body
//! ```
//! A chunk that does not shrink under compression is stored raw. All-zero
//! chunks never reach the codec: manifests record them as zero extents.

use std::fmt;
use std::str::FromStr;

use crate::id::ChunkId;
use crate::store::format::{
    BLOB_COMPRESSION_NONE as COMPRESSION_NONE, BLOB_COMPRESSION_ZSTD as COMPRESSION_ZSTD,
    BLOB_ENCRYPTION_NONE as ENCRYPTION_NONE, BLOB_HEADER_LEN, BLOB_VERSION_V1, MAX_CHUNK_SIZE,
};
use crate::store::wire::{DecodeError, Decoder};

/// Compression applied to new chunks: none, fast (zstd level 1) or an
/// adjustable zstd level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Compression {
    /// Store chunks raw.
    None,
    /// zstd at `level` (1–19; 1 is "fast", the default).
    Zstd {
        /// 1–19.
        level: i32,
    },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd { level: 1 }
    }
}

impl Compression {
    /// Checks the level's range.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Compression::None => Ok(()),
            Compression::Zstd { level } if (1..=19).contains(&level) => Ok(()),
            Compression::Zstd { level } => Err(format!("zstd level {level} out of range 1–19")),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Compression::None => f.write_str("none"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

impl FromStr for Compression {
    type Err = String;
    /// `none`, `fast` (zstd:1), `zstd` (zstd:3), `zstd:LEVEL` or `LEVEL`
    /// (as a job file writes it).
    fn from_str(s: &str) -> Result<Self, String> {
        let c = match s {
            "none" => Compression::None,
            "fast" => Compression::Zstd { level: 1 },
            "zstd" => Compression::Zstd { level: 3 },
            _ => match s
                .strip_prefix("zstd:")
                .unwrap_or(s)
                .parse::<i32>()
                .ok()
                .filter(|_| !s.starts_with(['+', '-']))
                .map(Ok::<i32, ()>)
            {
                Some(Ok(level)) => Compression::Zstd { level },
                _ => {
                    return Err(format!(
                    "{s:?} is not a compression; use none, fast, zstd, zstd:LEVEL or LEVEL (1–19)"
                ))
                }
            },
        };
        c.validate()?;
        Ok(c)
    }
}

/// Encodes and decodes blobs, reusing zstd contexts. One per worker thread.
pub struct BlobCodec {
    compression: Compression,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    scratch: Vec<u8>,
}

impl fmt::Debug for BlobCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobCodec")
            .field("compression", &self.compression)
            .finish()
    }
}

impl BlobCodec {
    /// A codec compressing new blobs with `compression`.
    pub fn new(compression: Compression) -> Self {
        BlobCodec {
            compression,
            compressor: None,
            decompressor: None,
            scratch: Vec::new(),
        }
    }

    /// Appends the blob for `chunk` to `out`; returns the blob's length.
    pub fn encode_into(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> std::io::Result<usize> {
        debug_assert!(chunk.len() <= MAX_CHUNK_SIZE);
        let start = out.len();
        out.extend_from_slice(&[0; BLOB_HEADER_LEN]); // patched below
        let body_start = out.len();
        let mut compressed = false;
        if let Compression::Zstd { level } = self.compression {
            let compressor = match &mut self.compressor {
                Some(c) => c,
                None => self.compressor.insert(zstd::bulk::Compressor::new(level)?),
            };
            // zstd writes into the scratch vector's spare capacity (no
            // zero-fill), then the body is appended if it is smaller.
            let scratch = &mut self.scratch;
            scratch.clear();
            scratch.reserve(zstd::zstd_safe::compress_bound(chunk.len()));
            let n = compressor.compress_to_buffer(chunk, scratch)?;
            if n < chunk.len() {
                out.extend_from_slice(&scratch[..n]);
                compressed = true;
            }
        }
        if !compressed {
            out.extend_from_slice(chunk);
        }
        let header = BlobHeader {
            compression: if compressed {
                COMPRESSION_ZSTD
            } else {
                COMPRESSION_NONE
            },
            raw_len: chunk.len() as u32,
            body_len: (out.len() - body_start) as u32,
        };
        out[start..body_start].copy_from_slice(&header.encode());
        Ok(out.len() - start)
    }

    /// Decodes a blob and checks that the plaintext hashes to `expected`.
    /// This is the only way the read paths turn blobs into chunk data.
    pub fn decode_verified(
        &mut self,
        blob: &[u8],
        expected: &ChunkId,
        out: &mut Vec<u8>,
    ) -> Result<(), DecodeError> {
        out.clear();
        self.decode_verified_append(blob, expected, out)
    }

    /// Like [`decode_verified`](Self::decode_verified) but appends the chunk
    /// to `out`. On error `out` is left at its previous length.
    pub fn decode_verified_append(
        &mut self,
        blob: &[u8],
        expected: &ChunkId,
        out: &mut Vec<u8>,
    ) -> Result<(), DecodeError> {
        let start = out.len();
        let result = self.decode_append(blob, out).and_then(|()| {
            let got = ChunkId::of(&out[start..]);
            if &got != expected {
                return Err(DecodeError::ChecksumMismatch {
                    expected: expected.to_hex(),
                    got: got.to_hex(),
                });
            }
            Ok(())
        });
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    /// Decodes a whole blob (header + body, nothing else) into `out`
    /// (cleared first). Checks every header field and the plaintext length.
    #[cfg_attr(not(feature = "internals"), allow(dead_code))] // for fuzz targets and benches
    pub fn decode_into(&mut self, blob: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        out.clear();
        self.decode_append(blob, out)
    }

    fn decode_append(&mut self, blob: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        let header = BlobHeader::decode(blob)?;
        let body = blob.get(BLOB_HEADER_LEN..).unwrap_or_default();
        if body.len() != header.body_len as usize {
            return Err(DecodeError::Invalid(format!(
                "blob body is {} bytes, header says {}",
                body.len(),
                header.body_len
            )));
        }
        let start = out.len();
        match header.compression {
            COMPRESSION_NONE => {
                if body.len() != header.raw_len as usize {
                    return Err(DecodeError::Invalid(
                        "raw blob length differs from plaintext length".into(),
                    ));
                }
                out.extend_from_slice(body);
            }
            _ => {
                // One frame, nothing after it (zstd would also decode
                // frames back to back, or skippable frames: other
                // encodings of the same blob).
                if zstd::zstd_safe::find_frame_compressed_size(body) != Ok(body.len()) {
                    return Err(DecodeError::Invalid(
                        "zstd body is not exactly one frame".into(),
                    ));
                }
                // Decompress into the spare capacity after `start`: no
                // memset of bytes zstd overwrites anyway.
                out.reserve(header.raw_len as usize);
                let decompressor = match &mut self.decompressor {
                    Some(d) => d,
                    None => self.decompressor.insert(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| DecodeError::Invalid(format!("zstd: {e}")))?,
                    ),
                };
                let mut cursor = std::io::Cursor::new(std::mem::take(out));
                cursor.set_position(start as u64);
                let result = decompressor.decompress_to_buffer(body, &mut cursor);
                *out = cursor.into_inner();
                let n = match result {
                    Ok(n) => n,
                    Err(e) => {
                        out.truncate(start);
                        return Err(DecodeError::Invalid(format!("zstd body: {e}")));
                    }
                };
                if n != header.raw_len as usize {
                    out.truncate(start);
                    return Err(DecodeError::Invalid(format!(
                        "zstd body decompressed to {n} bytes, header says {}",
                        header.raw_len
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The fixed-size header in front of every blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobHeader {
    /// Compression code.
    pub compression: u8,
    /// Plaintext length.
    pub raw_len: u32,
    /// Stored body length.
    pub body_len: u32,
}

impl BlobHeader {
    /// The header's encoding (version 1, no encryption, reserved 0).
    pub fn encode(&self) -> [u8; BLOB_HEADER_LEN] {
        let mut b = [0u8; BLOB_HEADER_LEN];
        b[0] = BLOB_VERSION_V1;
        b[1] = self.compression;
        b[2] = ENCRYPTION_NONE;
        b[4..8].copy_from_slice(&self.raw_len.to_le_bytes());
        b[8..12].copy_from_slice(&self.body_len.to_le_bytes());
        b
    }

    /// Parses and checks the header at the start of `blob`.
    pub fn decode(blob: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(blob);
        let version = d.u8()?;
        if version != BLOB_VERSION_V1 {
            return Err(DecodeError::UnsupportedVersion(version as u32));
        }
        let compression = d.u8()?;
        let encryption = d.u8()?;
        let reserved = d.u8()?;
        let raw_len = d.u32()?;
        let body_len = d.u32()?;
        if compression != COMPRESSION_NONE && compression != COMPRESSION_ZSTD {
            return Err(DecodeError::Invalid(format!(
                "unknown compression {compression}"
            )));
        }
        if encryption != ENCRYPTION_NONE {
            return Err(DecodeError::Invalid(format!(
                "blob encryption {encryption} is not supported by this build"
            )));
        }
        if reserved != 0 {
            return Err(DecodeError::Invalid(
                "reserved blob header byte is not 0".into(),
            ));
        }
        if raw_len as usize > MAX_CHUNK_SIZE || raw_len == 0 {
            return Err(DecodeError::Invalid(format!(
                "plaintext length {raw_len} out of range"
            )));
        }
        // One encoding per chunk's blob header: a raw body is the plaintext;
        // a chunk that does not shrink under zstd is stored raw.
        if compression == COMPRESSION_NONE && body_len != raw_len {
            return Err(DecodeError::Invalid(format!(
                "raw blob body length {body_len} differs from plaintext length {raw_len}"
            )));
        }
        if compression == COMPRESSION_ZSTD && (body_len >= raw_len || body_len == 0) {
            return Err(DecodeError::Invalid(format!(
                "zstd blob body length {body_len} is not below plaintext length {raw_len}"
            )));
        }
        Ok(BlobHeader {
            compression,
            raw_len,
            body_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(c: Compression, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        BlobCodec::new(c).encode_into(data, &mut out).unwrap();
        out
    }

    #[test]
    fn compressions_print_and_parse_by_name() {
        for (text, c, shown) in [
            ("none", Compression::None, "none"),
            ("fast", Compression::Zstd { level: 1 }, "zstd:1"),
            ("zstd", Compression::Zstd { level: 3 }, "zstd:3"),
            ("zstd:19", Compression::Zstd { level: 19 }, "zstd:19"),
            ("5", Compression::Zstd { level: 5 }, "zstd:5"),
        ] {
            assert_eq!(text.parse::<Compression>(), Ok(c), "{text}");
            assert_eq!(c.to_string(), shown);
            assert_eq!(shown.parse::<Compression>(), Ok(c), "{shown}");
        }
        assert!("zstd:x".parse::<Compression>().is_err());
        assert!("lz4".parse::<Compression>().is_err());
        for bad in ["0", "20", "-3", "+3"] {
            assert!(bad.parse::<Compression>().is_err(), "{bad}");
        }
        let codec = BlobCodec::new(Compression::Zstd { level: 7 });
        assert!(format!("{codec:?}").contains("level: 7"), "{codec:?}");
    }

    #[test]
    fn headers_with_an_empty_or_oversized_plaintext_are_rejected() {
        for raw_len in [0u32, MAX_CHUNK_SIZE as u32 + 1, u32::MAX] {
            let h = BlobHeader {
                compression: COMPRESSION_NONE,
                raw_len,
                body_len: raw_len,
            };
            assert!(BlobHeader::decode(&h.encode()).is_err(), "{raw_len}");
        }
        // The largest chunk is fine.
        let h = BlobHeader {
            compression: COMPRESSION_NONE,
            raw_len: MAX_CHUNK_SIZE as u32,
            body_len: MAX_CHUNK_SIZE as u32,
        };
        let mut blob = h.encode().to_vec();
        blob.resize(BLOB_HEADER_LEN + MAX_CHUNK_SIZE, 0);
        assert!(BlobHeader::decode(&blob).is_ok());
    }

    #[test]
    fn golden_raw_blob() {
        // Incompressible 4-byte chunk under zstd is stored raw.
        let blob = encode(Compression::default(), b"abcd");
        assert_eq!(
            blob,
            [1, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, b'a', b'b', b'c', b'd']
        );
    }

    #[test]
    fn golden_zstd_blob_header() {
        let data = vec![b'x'; 4096];
        let blob = encode(Compression::Zstd { level: 1 }, &data);
        assert_eq!(&blob[..8], &[1, 1, 0, 0, 0, 16, 0, 0]);
        let body_len = u32::from_le_bytes(blob[8..12].try_into().unwrap()) as usize;
        assert_eq!(blob.len(), 12 + body_len);
        assert!(body_len < 64);
    }

    #[test]
    fn every_flipped_byte_is_rejected_or_harmless() {
        let data: Vec<u8> = (0..20_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 700) as u8)
            .collect();
        let id = ChunkId::of(&data);
        let mut codec = BlobCodec::new(Compression::default());
        let mut out = Vec::new();
        let mut rejected = 0;
        for blob in [
            encode(Compression::default(), &data),
            encode(Compression::None, &data),
        ] {
            for i in 0..blob.len() {
                let mut bad = blob.clone();
                bad[i] ^= 0x10;
                // The verified read either fails or yields exactly the original
                // chunk (a flip in a zstd field that does not affect the
                // output): damage never reaches a restore.
                match codec.decode_verified(&bad, &id, &mut out) {
                    Ok(()) => assert_eq!(out, data, "flip at byte {i}"),
                    Err(_) => rejected += 1,
                }
            }
        }
        assert!(rejected > 20_000, "only {rejected} flips were rejected");
    }

    #[test]
    fn a_zstd_body_is_exactly_one_frame() {
        let data = vec![b'x'; 4096];
        let one = zstd::bulk::compress(&data, 1).unwrap();
        let half = zstd::bulk::compress(&data[..2048], 1).unwrap();
        // A skippable frame: magic 0x184D2A50, length, payload.
        let mut skippable = 0x184D_2A50u32.to_le_bytes().to_vec();
        skippable.extend_from_slice(&3u32.to_le_bytes());
        skippable.extend_from_slice(b"abc");
        let blob_of = |body: &[u8]| {
            let mut b = BlobHeader {
                compression: 1,
                raw_len: 4096,
                body_len: body.len() as u32,
            }
            .encode()
            .to_vec();
            b.extend_from_slice(body);
            b
        };
        let mut codec = BlobCodec::new(Compression::None);
        let mut out = Vec::new();
        codec.decode_into(&blob_of(&one), &mut out).unwrap();
        assert_eq!(out, data);
        // Other encodings zstd itself would decode to the same 4 096 bytes.
        for (what, body) in [
            ("two frames", [half.clone(), half.clone()].concat()),
            (
                "a skippable frame after",
                [one.clone(), skippable.clone()].concat(),
            ),
            (
                "a skippable frame before",
                [skippable.clone(), one.clone()].concat(),
            ),
        ] {
            let e = codec.decode_into(&blob_of(&body), &mut out).unwrap_err();
            assert!(e.to_string().contains("one frame"), "{what}: {e}");
        }
    }

    #[test]
    fn truncated_blobs_fail() {
        let blob = encode(Compression::default(), &[7u8; 1000]);
        let mut codec = BlobCodec::new(Compression::None);
        let mut out = Vec::new();
        for n in 0..blob.len() {
            assert!(codec.decode_into(&blob[..n], &mut out).is_err(), "len {n}");
        }
    }

    #[test]
    fn parse_compression() {
        assert_eq!(
            "fast".parse::<Compression>().unwrap(),
            Compression::Zstd { level: 1 }
        );
        assert_eq!(
            "zstd:7".parse::<Compression>().unwrap(),
            Compression::Zstd { level: 7 }
        );
        assert_eq!("none".parse::<Compression>().unwrap(), Compression::None);
        assert!("zstd:0".parse::<Compression>().is_err());
        assert!("lz4".parse::<Compression>().is_err());
    }

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 1..5000), level in 1i32..5, raw in any::<bool>()) {
            let c = if raw { Compression::None } else { Compression::Zstd { level } };
            let blob = encode(c, &data);
            let mut out = Vec::new();
            BlobCodec::new(Compression::None).decode_into(&blob, &mut out).unwrap();
            prop_assert_eq!(out, data);
        }
    }
}
