//! Deterministic sample disk images for the demo, tests and benchmarks (not
//! used by any backup or restore path).
//!
//! The image is built from 1 MiB blocks, each chosen by a seeded generator:
//! 25 % zeros (half left as holes, half written as zero bytes), 35 % log-like
//! text (slices of an 8 MiB text pool at random byte offsets), 30 % random
//! bytes (fresh from the generator), 10 % copies of an earlier block. The
//! rewrite variant overwrites 2 % of the image in scattered 64 KiB – 1 MiB
//! writes (4 KiB aligned) and records them in `<image>.dirty`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

const BLOCK: usize = 1 << 20;

/// A small, fast, seeded pseudo-random generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct SampleRng(u64);

impl SampleRng {
    pub fn new(seed: u64) -> Self {
        SampleRng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "kernel:",
    "systemd[1]:",
    "sshd[812]:",
    "Started",
    "Stopped",
    "session",
    "user",
    "root",
    "connection",
    "from",
    "10.0.3.17",
    "port",
    "accepted",
    "failed",
    "disk",
    "sda1",
    "mounted",
    "ERROR",
    "WARN",
    "INFO",
    "request",
    "GET",
    "/api/v1/vms",
    "200",
    "404",
    "latency_ms=",
    "backup",
    "completed",
    "timeout",
    "retry",
    "cvk-host-03",
    "qemu-kvm",
    "bitmap",
    "dirty",
];

/// Fills `buf` with log-like text lines.
pub fn fill_text(rng: &mut SampleRng, buf: &mut [u8]) {
    let mut pos = 0;
    let mut line = String::with_capacity(160);
    while pos < buf.len() {
        line.clear();
        let t = rng.below(86_400);
        line.push_str(&format!(
            "2026-11-{:02}T{:02}:{:02}:{:02}Z ",
            1 + rng.below(28),
            t / 3600,
            (t / 60) % 60,
            t % 60
        ));
        for _ in 0..4 + rng.below(10) {
            line.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
            line.push(' ');
        }
        line.push_str(&format!("id={}\n", rng.below(1_000_000)));
        let n = line.len().min(buf.len() - pos);
        buf[pos..pos + n].copy_from_slice(&line.as_bytes()[..n]);
        pos += n;
    }
}

/// Overwrites `count` scattered regions of 4 KiB–64 KiB with random bytes,
/// as a guest would between two backups. Returns the ranges written (what a
/// hypervisor's dirty bitmap would record).
pub fn scribble(path: &Path, count: usize, seed: u64) -> io::Result<Vec<Range<u64>>> {
    let file = OpenOptions::new().write(true).open(path)?;
    let size = file.metadata()?.len();
    let mut rng = SampleRng::new(seed);
    let mut written = Vec::with_capacity(count);
    for _ in 0..count {
        let len = (4096 * (1 + rng.below(16))).min(size);
        let at = rng.below(size - len + 1) / 4096 * 4096;
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        file.write_all_at(&data, at)?;
        written.push(at..at + len);
    }
    file.sync_all()?;
    Ok(written)
}

/// BLAKE3 of a whole file's content, read in a stream.
pub fn hash_file(path: &Path) -> io::Result<blake3::Hash> {
    let mut f = File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; BLOCK];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

/// `len` bytes of the mix, in memory (criterion benches).
pub fn mixed_data(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut gen = BlockGen::new(seed);
    let mut off = 0;
    while off < len {
        let end = (off + BLOCK).min(len);
        let (done, rest) = v.split_at_mut(off);
        gen.fill_block(&mut rest[..end - off], |src, buf| {
            let s = src as usize;
            buf.copy_from_slice(&done[s..s + buf.len()]);
            Ok(())
        })
        .ok();
        off = end;
    }
    v
}

/// What a generated block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Hole,
    Zeros,
    Text,
    Random,
    Duplicate,
}

/// Produces the block sequence of the mix.
#[derive(Debug)]
pub struct BlockGen {
    rng: SampleRng,
    text_pool: Vec<u8>,
    written: Vec<u64>,
    offset: u64,
}

impl BlockGen {
    pub fn new(seed: u64) -> Self {
        let mut rng = SampleRng::new(seed);
        let mut text_pool = vec![0u8; 8 << 20];
        fill_text(&mut rng, &mut text_pool);
        BlockGen {
            rng,
            text_pool,
            written: Vec::new(),
            offset: 0,
        }
    }

    /// Fills the next block. `copy(src, buf)` must fill `buf` from the data
    /// already produced at offset `src`.
    pub fn fill_block(
        &mut self,
        buf: &mut [u8],
        copy: impl FnOnce(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<BlockKind> {
        let here = self.offset;
        self.offset += buf.len() as u64;
        let pick = self.rng.below(1000);
        let kind = match pick {
            0..=124 => BlockKind::Hole,
            125..=249 => BlockKind::Zeros,
            250..=599 => BlockKind::Text,
            600..=899 => BlockKind::Random,
            _ if !self.written.is_empty() && buf.len() == BLOCK => BlockKind::Duplicate,
            _ => BlockKind::Random,
        };
        match kind {
            BlockKind::Hole | BlockKind::Zeros => buf.fill(0),
            BlockKind::Text => {
                let start = self.rng.below((self.text_pool.len() - buf.len()) as u64) as usize;
                buf.copy_from_slice(&self.text_pool[start..start + buf.len()]);
            }
            BlockKind::Random => self.rng.fill(buf),
            BlockKind::Duplicate => {
                let src = self.written[self.rng.below(self.written.len() as u64) as usize];
                copy(src, buf)?;
            }
        }
        if kind != BlockKind::Hole && kind != BlockKind::Zeros {
            self.written.push(here);
        }
        Ok(kind)
    }
}

/// Writes the benchmark image (sparse where the mix has holes).
pub fn generate_image(path: &Path, size: u64, seed: u64) -> io::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(size)?;
    let mut gen = BlockGen::new(seed);
    let mut buf = vec![0u8; BLOCK];
    let mut off = 0u64;
    while off < size {
        let n = ((size - off) as usize).min(BLOCK);
        let block = &mut buf[..n];
        let kind = gen.fill_block(block, |src, b| file.read_exact_at(b, src))?;
        if kind != BlockKind::Hole {
            file.write_all_at(block, off)?;
        }
        off += n as u64;
    }
    file.sync_all()
}

/// The scattered writes of the rewrite variant: 64 KiB – 1 MiB, 4 KiB
/// aligned, non-overlapping, totalling `fraction` of `size`.
pub fn rewrite_plan(size: u64, fraction: f64, seed: u64) -> Vec<Range<u64>> {
    let mut rng = SampleRng::new(seed ^ 0xd1e7);
    let target = (size as f64 * fraction) as u64;
    let mut ranges: Vec<Range<u64>> = Vec::new();
    let mut total = 0;
    let mut attempts = 0;
    while total < target && attempts < 1_000_000 {
        attempts += 1;
        let len = (16 + rng.below(241)) * 4096; // 64 KiB ..= 1 MiB
        let len = len.min(target - total).max(4096).min(size);
        let start = rng.below((size - len) / 4096 + 1) * 4096;
        let r = start..start + len;
        if ranges.iter().any(|o| o.start < r.end && r.start < o.end) {
            continue;
        }
        total += len;
        ranges.push(r);
    }
    ranges.sort_by_key(|r| r.start);
    ranges
}

/// Copies `base` to `path` and applies the rewrite plan with random data.
/// Writes the plan to `<path>.dirty` (one `start end` per line). Returns it.
pub fn generate_rewrite(
    base: &Path,
    path: &Path,
    fraction: f64,
    seed: u64,
) -> io::Result<Vec<Range<u64>>> {
    std::fs::copy(base, path)?;
    let file = OpenOptions::new().write(true).open(path)?;
    let size = file.metadata()?.len();
    let plan = rewrite_plan(size, fraction, seed);
    let mut rng = SampleRng::new(seed ^ 0x5eed);
    let mut buf = Vec::new();
    for r in &plan {
        buf.resize((r.end - r.start) as usize, 0);
        rng.fill(&mut buf);
        file.write_all_at(&buf, r.start)?;
    }
    file.sync_all()?;
    let mut dirty = File::create(path.with_extension("dirty"))?;
    for r in &plan {
        writeln!(dirty, "{} {}", r.start, r.end)?;
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_deterministic_and_has_the_mix() {
        let a = mixed_data(64 << 20, 7);
        assert!(a == mixed_data(64 << 20, 7));
        assert!(a != mixed_data(64 << 20, 8));
        let zero_blocks = a
            .chunks(BLOCK)
            .filter(|b| b.iter().all(|&x| x == 0))
            .count();
        assert!(
            (8..=24).contains(&zero_blocks),
            "{zero_blocks} zero blocks of 64"
        );
    }

    #[test]
    fn rewrite_plan_is_two_percent_in_bounds() {
        let size = 1u64 << 30;
        let plan = rewrite_plan(size, 0.02, 1);
        let total: u64 = plan.iter().map(|r| r.end - r.start).sum();
        assert_eq!(total, (size as f64 * 0.02) as u64);
        for w in plan.windows(2) {
            assert!(w[0].end <= w[1].start);
        }
        assert!(plan.iter().all(|r| r.start % 4096 == 0 && r.end <= size));
        assert!(plan.iter().filter(|r| r.end - r.start >= 64 << 10).count() >= plan.len() - 1);
    }
}
