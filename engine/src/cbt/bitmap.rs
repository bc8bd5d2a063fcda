//! [`DirtyBitmap`]: which blocks of a disk changed, one bit per
//! `granularity` bytes, and its checksummed encoding:
//! ```text
//! magic "CAIRNBM1" | version u16 = 1 | reserved u16 = 0 | reserved u32 = 0
//! granularity u64 | disk size u64 | word count u64 | words u64* (bit i = block i)
//! BLAKE3-256 of everything above [32]
//! ```

use std::ops::Range;

use crate::error::{Error, Result};
use crate::store::format::{BITMAP_MAGIC_V1, BITMAP_VERSION_V1};
use crate::store::wire::{split_checksummed, DecodeError, Decoder, Encoder};

/// Which blocks of a disk changed, one bit per `granularity` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    granularity: u64,
    size: u64,
    words: Vec<u64>,
}

impl DirtyBitmap {
    /// An all-clean bitmap. `granularity` must be a power of two ≥ 512.
    pub fn new(size: u64, granularity: u64) -> Result<Self> {
        if !granularity.is_power_of_two() || granularity < 512 {
            return Err(Error::InvalidArgument(format!(
                "bitmap granularity {granularity} must be a power of two ≥ 512"
            )));
        }
        let blocks = size.div_ceil(granularity);
        Ok(DirtyBitmap {
            granularity,
            size,
            words: vec![0; blocks.div_ceil(64) as usize],
        })
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn blocks(&self) -> u64 {
        self.size.div_ceil(self.granularity)
    }

    /// Marks every block that `range` touches (clipped to the disk).
    pub fn set_range(&mut self, range: Range<u64>) {
        let end = range.end.min(self.size);
        if range.start >= end {
            return;
        }
        for b in range.start / self.granularity..end.div_ceil(self.granularity) {
            self.words[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// Whether block `block` is dirty (out of range: false).
    pub fn test(&self, block: u64) -> bool {
        block < self.blocks()
            && self
                .words
                .get((block / 64) as usize)
                .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    /// Dirty ranges in bytes, merged and clipped to the disk size.
    pub fn dirty_extents(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (wi, &w) in self.words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                let block = wi as u64 * 64 + bit;
                let start = block * self.granularity;
                // Saturating: a disk within one block of 2^64 bytes must not overflow.
                let end = start.saturating_add(self.granularity).min(self.size);
                match out.last_mut() {
                    Some(last) if last.end == start => last.end = end,
                    _ => out.push(start..end),
                }
            }
        }
        out
    }

    /// Bytes covered by dirty blocks.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_extents().iter().map(|r| r.end - r.start).sum()
    }

    /// ORs `other` into `self` (both must describe the same disk and grid).
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<()> {
        if other.granularity != self.granularity || other.size != self.size {
            return Err(Error::InvalidArgument(format!(
                "cannot merge bitmaps of {}/{} and {}/{} (size/granularity)",
                self.size, self.granularity, other.size, other.granularity
            )));
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        Ok(())
    }

    /// The checksummed encoding (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + self.words.len() * 8 + 32);
        out.extend_from_slice(&BITMAP_MAGIC_V1);
        out.put_u16(BITMAP_VERSION_V1);
        out.put_u16(0);
        out.put_u32(0);
        out.put_u64(self.granularity);
        out.put_u64(self.size);
        out.put_u64(self.words.len() as u64);
        for w in &self.words {
            out.put_u64(*w);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Decodes and checks an encoded bitmap. Never panics on any input.
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let body = split_checksummed(data)?;
        let mut d = Decoder::new(body);
        d.magic_version(&BITMAP_MAGIC_V1, BITMAP_VERSION_V1)?;
        d.zero_u16("reserved header u16")?;
        d.zero_u32("reserved header u32")?;
        let granularity = d.u64()?;
        let size = d.u64()?;
        let count = d.u64()?;
        if !granularity.is_power_of_two() || granularity < 512 {
            return Err(DecodeError::Invalid(format!("granularity {granularity}")));
        }
        if count != size.div_ceil(granularity).div_ceil(64) || count > (d.remaining() / 8) as u64 {
            return Err(DecodeError::Invalid(format!(
                "{count} words do not describe {size} bytes at {granularity}"
            )));
        }
        let mut words = Vec::with_capacity(count as usize);
        for _ in 0..count {
            words.push(d.u64()?);
        }
        d.expect_end()?;
        let bm = DirtyBitmap {
            granularity,
            size,
            words,
        };
        // Bits past the last block must be clear.
        let blocks = bm.blocks();
        if let Some(last) = bm.words.last() {
            let used = blocks - (bm.words.len() as u64 - 1) * 64;
            if used < 64 && last >> used != 0 {
                return Err(DecodeError::Invalid("bits set past the disk's end".into()));
            }
        }
        Ok(bm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_within_a_block_of_the_end_of_u64_does_not_overflow() {
        // Found by the dirty_bitmap_fixed fuzz target (seed
        // overflow-near-2-64): the last block's end passed 2^64.
        let size = u64::MAX - 100;
        let g = 1u64 << 62;
        let mut b = DirtyBitmap::new(size, g).unwrap();
        b.set_range(size - 10..size);
        assert_eq!(b.dirty_extents(), vec![3 * g..size]);
        assert_eq!(b.dirty_bytes(), size - 3 * g);
        let again = DirtyBitmap::decode(&b.encode()).unwrap();
        assert_eq!(again.dirty_extents(), b.dirty_extents());
    }

    #[test]
    fn a_bitmap_knows_its_size_and_granularity() {
        let b = DirtyBitmap::new(10 << 20, 65536).unwrap();
        assert_eq!((b.size(), b.granularity()), (10 << 20, 65536));
        let again = DirtyBitmap::decode(&b.encode()).unwrap();
        assert_eq!((again.size(), again.granularity()), (10 << 20, 65536));
    }

    #[test]
    fn set_test_extents_merge() {
        let mut b = DirtyBitmap::new(1_000_000, 65536).unwrap();
        b.set_range(100..200);
        b.set_range(65536 * 3 + 5..65536 * 5);
        b.set_range(999_999..2_000_000);
        assert!(b.test(0) && !b.test(1) && b.test(3) && b.test(4) && !b.test(5));
        assert_eq!(
            b.dirty_extents(),
            vec![0..65536, 196608..327680, 983040..1_000_000]
        );
        let mut c = DirtyBitmap::new(1_000_000, 65536).unwrap();
        c.set_range(65536..65537);
        c.merge(&b).unwrap();
        assert_eq!(c.dirty_extents()[0], 0..131072);
        assert!(c.merge(&DirtyBitmap::new(5, 512).unwrap()).is_err());
        assert!(DirtyBitmap::new(10, 1000).is_err());
    }

    #[test]
    fn encoding_round_trip_and_damage() {
        let mut b = DirtyBitmap::new(10 << 20, 65536).unwrap();
        b.set_range(1 << 20..(1 << 20) + 1);
        let bytes = b.encode();
        assert_eq!(&bytes[..8], b"CAIRNBM1");
        assert_eq!(DirtyBitmap::decode(&bytes).unwrap(), b);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 2;
            assert!(DirtyBitmap::decode(&bad).is_err(), "flip at {i}");
        }
        for n in 0..bytes.len() {
            assert!(DirtyBitmap::decode(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn merge_needs_the_same_size_and_grid() {
        let mut a = DirtyBitmap::new(1 << 20, 65536).unwrap();
        // Each differing alone is refused.
        assert!(a.merge(&DirtyBitmap::new(2 << 20, 65536).unwrap()).is_err());
        assert!(a.merge(&DirtyBitmap::new(1 << 20, 4096).unwrap()).is_err());
        assert!(a.merge(&DirtyBitmap::new(1 << 20, 65536).unwrap()).is_ok());
    }

    /// The encoding of a bitmap built field by field (no checks).
    fn raw(granularity: u64, size: u64, words: Vec<u64>) -> Vec<u8> {
        DirtyBitmap {
            granularity,
            size,
            words,
        }
        .encode()
    }

    #[test]
    fn decode_checks_the_grid_the_word_count_and_bits_past_the_end() {
        // Granularity: a power of two of at least 512.
        assert!(DirtyBitmap::decode(&raw(512, 512, vec![1])).is_ok());
        for bad in [256, 1000, 0] {
            let e = DirtyBitmap::decode(&raw(bad, 512 * 64, vec![0])).unwrap_err();
            assert!(e.to_string().contains("granularity"), "{bad}: {e}");
        }
        // Word count: what the size needs, and no more than the input holds
        // (refused as such, before anything is allocated for it).
        assert!(DirtyBitmap::decode(&raw(512, 512 * 65, vec![0])).is_err());
        assert!(DirtyBitmap::decode(&raw(512, 512 * 64, vec![0, 0])).is_err());
        let mut short = raw(512, 512 * 65, vec![0, 0]);
        let words_end = short.len() - 32;
        short.drain(words_end - 8..words_end); // one word left for a count of 2
        let n = short.len() - 32;
        let sum = blake3::hash(&short[..n]);
        short[n..].copy_from_slice(sum.as_bytes());
        let e = DirtyBitmap::decode(&short).unwrap_err();
        assert!(e.to_string().contains("words do not describe"), "{e}");
        // A count that agrees with a huge size but not with the input
        // (2^49 words: allocating them first would abort).
        let size = u64::MAX - 511;
        let mut huge = raw(512, size, Vec::new());
        huge[32..40].copy_from_slice(&size.div_ceil(512).div_ceil(64).to_le_bytes());
        let n = huge.len() - 32;
        let sum = blake3::hash(&huge[..n]);
        huge[n..].copy_from_slice(sum.as_bytes());
        let e = DirtyBitmap::decode(&huge).unwrap_err();
        assert!(e.to_string().contains("words do not describe"), "{e}");
        // Bits past the last block: 100 blocks in 2 words (36 bits used in
        // the second); the last block's bit is fine, the next is not.
        let size = 100 * 512;
        assert!(DirtyBitmap::decode(&raw(512, size, vec![0, 1 << 35])).is_ok());
        for bit in [36, 40, 63] {
            let e = DirtyBitmap::decode(&raw(512, size, vec![0, 1 << bit])).unwrap_err();
            assert!(
                e.to_string().contains("past the disk's end"),
                "bit {bit}: {e}"
            );
        }
        // A whole last word (128 blocks): every bit of it is a block.
        let b = DirtyBitmap::decode(&raw(512, 128 * 512, vec![0, 1 << 63])).unwrap();
        assert!(b.test(127) && !b.test(128));
        assert!(DirtyBitmap::decode(&raw(512, 127 * 512 + 1, vec![0, 1 << 63])).is_ok());
    }
}
