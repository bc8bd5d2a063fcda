//! Chunkers: pure functions from bytes to cut points, no I/O (as in bupstash).
//!
//! - [`ChunkingParams::Fixed`]: fixed-size chunks on a grid anchored at offset 0
//!   of the disk. The default for disk images is 64 KiB, the granularity of
//!   qcow2's dirty bitmaps, so a CBT incremental re-reads exactly the dirty
//!   chunks.
//! - [`ChunkingParams::FastCdc`]: FastCDC 2020 (normalisation level 1) from the
//!   `fastcdc` crate, for streams whose content shifts.
//!
//! The pipeline feeds a chunker the bytes from the current chunk start and asks
//! for the next cut with [`ChunkingParams::next_cut`]; it returns `None` when it
//! needs more data to decide.

use std::fmt;
use std::str::FromStr;

use crate::store::format::MAX_CHUNK_SIZE;

/// Default fixed chunk size for disk images: 64 KiB (qcow2's bitmap granularity).
pub const DEFAULT_FIXED_CHUNK: u32 = 64 << 10;
/// Default FastCDC sizes: 16 KiB minimum, 64 KiB average, 256 KiB maximum.
pub const DEFAULT_CDC: (u32, u32, u32) = (16 << 10, 64 << 10, 256 << 10);

/// How a snapshot's disks were cut into chunks. Recorded in every manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChunkingParams {
    /// Fixed-size chunks of `size` bytes (a power of two, 4 KiB – 16 MiB).
    Fixed {
        /// Chunk size in bytes (a power of two, 4 KiB–16 MiB).
        size: u32,
    },
    /// FastCDC 2020 with normalisation level 1.
    FastCdc {
        /// Smallest chunk.
        min: u32,
        /// Average chunk.
        avg: u32,
        /// Largest chunk.
        max: u32,
    },
}

impl Default for ChunkingParams {
    fn default() -> Self {
        ChunkingParams::Fixed {
            size: DEFAULT_FIXED_CHUNK,
        }
    }
}

impl ChunkingParams {
    /// Default content-defined chunking.
    pub fn cdc() -> Self {
        let (min, avg, max) = DEFAULT_CDC;
        ChunkingParams::FastCdc { min, avg, max }
    }

    /// Checks the parameters against the ranges this build supports.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            ChunkingParams::Fixed { size } => {
                if !size.is_power_of_two() || !(4096..=MAX_CHUNK_SIZE as u32).contains(&size) {
                    return Err(format!(
                        "fixed chunk size {size} must be a power of two between 4 KiB and 16 MiB"
                    ));
                }
            }
            ChunkingParams::FastCdc { min, avg, max } => {
                // The ranges fastcdc's v2020 implementation accepts.
                let ok = (64..=1 << 20).contains(&min)
                    && (256..=4 << 20).contains(&avg)
                    && (1024..=MAX_CHUNK_SIZE as u32).contains(&max)
                    && min <= avg
                    && avg <= max;
                if !ok {
                    return Err(format!(
                        "FastCDC sizes min={min} avg={avg} max={max} out of range \
                         (64 B ≤ min ≤ 1 MiB, 256 B ≤ avg ≤ 4 MiB, 1 KiB ≤ max ≤ 16 MiB, min ≤ avg ≤ max)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The largest chunk these parameters can produce.
    pub fn max_chunk(&self) -> usize {
        match *self {
            ChunkingParams::Fixed { size } => size as usize,
            ChunkingParams::FastCdc { max, .. } => max as usize,
        }
    }

    /// Length of the chunk that starts at `data[0]`, or `None` if more data is
    /// needed to decide. With `eof` set, `data` is the rest of the input and a
    /// cut is always returned for non-empty data. Never returns 0.
    ///
    /// Parameters must have passed [`validate`](Self::validate).
    pub fn next_cut(&self, data: &[u8], eof: bool) -> Option<usize> {
        if data.is_empty() {
            return None;
        }
        match *self {
            ChunkingParams::Fixed { size } => {
                let size = size as usize;
                if data.len() >= size {
                    Some(size)
                } else if eof {
                    Some(data.len())
                } else {
                    None
                }
            }
            ChunkingParams::FastCdc { min, avg, max } => {
                let window = data.len().min(max as usize);
                let cdc = fastcdc::v2020::FastCDC::new(&data[..window], min, avg, max);
                let (_, cut) = cdc.cut(0, window);
                // A cut at the window's end is final only if the window is a
                // full max-size chunk or the input ended: otherwise more data
                // could move it. A cut inside the window depends only on bytes
                // before it, so it is final.
                if cut < window || window == max as usize || eof {
                    Some(cut.max(1))
                } else {
                    None
                }
            }
        }
    }

    /// Cuts a complete buffer into chunk lengths (tests, tools).
    pub fn cut_all(&self, mut data: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        while let Some(n) = self.next_cut(data, true) {
            out.push(n);
            data = &data[n..];
        }
        out
    }
}

impl fmt::Display for ChunkingParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ChunkingParams::Fixed { size } => write!(f, "fixed:{size}"),
            ChunkingParams::FastCdc { min, avg, max } => write!(f, "cdc:{min}:{avg}:{max}"),
        }
    }
}

/// Parses a byte size such as `65536`, `64K`, `64KiB`, `1M`, `1MiB`, `18T`
/// (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 65536, 64K, 1M)"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown size unit {unit:?} (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

impl FromStr for ChunkingParams {
    type Err = String;

    /// `fixed`, `fixed:SIZE`, `cdc`, or `cdc:MIN:AVG:MAX`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(':');
        let kind = parts.next().unwrap_or_default();
        let rest: Vec<&str> = parts.collect();
        let size32 = |v: &str| -> Result<u32, String> {
            let n = parse_size(v)?;
            u32::try_from(n).map_err(|_| format!("{v:?} is too large"))
        };
        let params = match (kind, rest.as_slice()) {
            ("fixed", []) => ChunkingParams::default(),
            ("fixed", [size]) => ChunkingParams::Fixed {
                size: size32(size)?,
            },
            ("cdc", []) => ChunkingParams::cdc(),
            ("cdc", [min, avg, max]) => ChunkingParams::FastCdc {
                min: size32(min)?,
                avg: size32(avg)?,
                max: size32(max)?,
            },
            _ => {
                return Err(format!(
                    "{s:?} is not a chunking; use fixed, fixed:SIZE, cdc or cdc:MIN:AVG:MAX"
                ))
            }
        };
        params.validate()?;
        Ok(params)
    }
}

/// True if every byte is zero. ORs 64-byte blocks so the compiler vectorises
/// it, stopping at the first non-zero block.
pub fn is_zero(data: &[u8]) -> bool {
    data.chunks(64)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 65536]));
        assert!(is_zero(&[]));
        let mut v = vec![0u8; 65537];
        v[65536] = 1;
        assert!(!is_zero(&v));
        v[65536] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
    use proptest::prelude::*;

    /// Deterministic pseudo-random bytes (xorshift64*), for golden vectors.
    fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            let v = seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    #[test]
    fn fixed_golden() {
        let p = ChunkingParams::Fixed { size: 4096 };
        assert_eq!(p.cut_all(&[1u8; 10000]), vec![4096, 4096, 1808]);
        assert_eq!(p.next_cut(&[1u8; 4095], false), None);
        assert_eq!(p.next_cut(&[], true), None);
    }

    /// Pinned cut points for the default FastCDC parameters on 1 MiB of
    /// seeded pseudo-random data: (offset, length, BLAKE3 prefix).
    #[test]
    fn cdc_golden() {
        let data = pseudo_random(1 << 20, 0x5eed);
        let p = ChunkingParams::cdc();
        let mut off = 0;
        let mut got = Vec::new();
        for len in p.cut_all(&data) {
            let id = blake3::hash(&data[off..off + len]).to_hex().to_string();
            got.push((off, len, id[..16].to_string()));
            off += len;
        }
        let expected = include_str!("../tests/golden/cdc_default_1mib.txt");
        let rendered: String = got
            .iter()
            .map(|(o, l, h)| format!("{o} {l} {h}\n"))
            .collect();
        assert_eq!(rendered, expected, "FastCDC cut points changed");
    }

    #[test]
    fn parse_forms() {
        assert_eq!(
            "fixed".parse::<ChunkingParams>().unwrap(),
            ChunkingParams::default()
        );
        assert_eq!(
            "fixed:1M".parse::<ChunkingParams>().unwrap(),
            ChunkingParams::Fixed { size: 1 << 20 }
        );
        assert_eq!(
            "cdc".parse::<ChunkingParams>().unwrap(),
            ChunkingParams::cdc()
        );
        assert!("fixed:3000".parse::<ChunkingParams>().is_err());
        assert!("fixed:64Q".parse::<ChunkingParams>().is_err());
        assert!("cdc:1:2".parse::<ChunkingParams>().is_err());
        assert!("rabin".parse::<ChunkingParams>().is_err());
        assert!("cdc:4096:1024:65536".parse::<ChunkingParams>().is_err());
    }

    #[test]
    fn validate_needs_a_power_of_two_in_range() {
        // In range but not a power of two; a power of two out of range.
        for bad in [5000u32, 3 << 20, 2048, 32 << 20] {
            assert!(
                ChunkingParams::Fixed { size: bad }.validate().is_err(),
                "{bad}"
            );
        }
        for good in [4096u32, 65536, 16 << 20] {
            assert!(
                ChunkingParams::Fixed { size: good }.validate().is_ok(),
                "{good}"
            );
        }
    }

    #[test]
    fn max_chunk_and_display() {
        let fixed = ChunkingParams::Fixed { size: 1 << 20 };
        assert_eq!(fixed.max_chunk(), 1 << 20);
        assert_eq!(ChunkingParams::cdc().max_chunk(), 256 << 10);
        assert_eq!(fixed.to_string(), "fixed:1048576");
        assert_eq!(ChunkingParams::cdc().to_string(), "cdc:16384:65536:262144");
        for p in [fixed, ChunkingParams::cdc()] {
            assert_eq!(p.to_string().parse::<ChunkingParams>().unwrap(), p);
        }
    }

    #[test]
    fn a_cdc_cut_inside_a_short_window_is_final_before_the_end() {
        // Less than a maximal chunk of data, not the end of input: a cut
        // found inside it cannot move, so it is returned now.
        let mut rng = crate::random::Sampler::seeded(3);
        let data: Vec<u8> = (0..25_000)
            .flat_map(|_| rng.next_u64().to_le_bytes())
            .collect();
        let p = ChunkingParams::cdc();
        let whole = p.cut_all(&data);
        assert!(whole[0] < data.len(), "{whole:?}");
        assert_eq!(p.next_cut(&data, false), Some(whole[0]));
        // Cut only at the end of the window: undecided until more data.
        assert_eq!(p.next_cut(&data[..whole[0]], false), None);
    }

    #[test]
    fn sizes_take_every_unit() {
        for (text, bytes) in [
            ("512", 512u64),
            ("512b", 512),
            ("512B", 512),
            ("4k", 4096),
            ("4KB", 4096),
            ("4KiB", 4096),
            ("3m", 3 << 20),
            ("2g", 2 << 30),
            ("2GiB", 2 << 30),
            ("18T", 18 << 40),
            ("1TiB", 1 << 40),
            (" 7 ", 7),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        for bad in [
            "",
            "k",
            "4p",
            "4 k",
            "-1",
            "99999999999999999999g",
            "20000000t",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            "cdc:8K:32K:128K".parse::<ChunkingParams>().unwrap(),
            ChunkingParams::FastCdc {
                min: 8192,
                avg: 32768,
                max: 131072
            }
        );
    }

    proptest! {
        /// Feeding data in arbitrary pieces gives the same cuts as all at once,
        /// and cuts cover the input exactly within the size limits.
        #[test]
        fn cdc_streaming_matches_whole(seed in any::<u64>(), len in 0usize..300_000, piece in 1usize..70_000) {
            let data = pseudo_random(len, seed | 1);
            let p = ChunkingParams::FastCdc { min: 2048, avg: 8192, max: 32768 };
            let whole = p.cut_all(&data);
            prop_assert_eq!(whole.iter().sum::<usize>(), len);
            for (i, &c) in whole.iter().enumerate() {
                prop_assert!(c <= 32768);
                if i + 1 < whole.len() { prop_assert!(c >= 2048); }
            }
            // streaming: reveal `piece` more bytes at a time
            let mut streamed = Vec::new();
            let mut start = 0;
            let mut visible = 0;
            while start < len {
                visible = (visible + piece).min(len);
                let eof = visible == len;
                while let Some(c) = p.next_cut(&data[start..visible], eof) {
                    streamed.push(c);
                    start += c;
                }
            }
            prop_assert_eq!(streamed, whole);
        }
    }
}
