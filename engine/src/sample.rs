//! Deterministic sample disk images for the demo, tests and benchmarks (not
//! used by any backup or restore path).
//!
//! An image is made of 1 MiB blocks, each picked by a seeded generator:
//! 25 % left as holes (zeros), 35 % log-like text, 30 % random bytes, 10 %
//! copies of an earlier block (duplicated regions that dedup must catch).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
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

/// Writes a sparse sample image of `size` bytes at `path` (created or truncated).
pub fn write_sample_image(path: &Path, size: u64, seed: u64) -> io::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(size)?;
    let mut rng = SampleRng::new(seed);
    let mut buf = vec![0u8; BLOCK];
    let mut written: Vec<u64> = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let n = ((size - offset) as usize).min(BLOCK);
        let pick = rng.below(100);
        let block = &mut buf[..n];
        match pick {
            0..=24 => {
                offset += n as u64;
                continue;
            }
            25..=59 => fill_text(&mut rng, block),
            60..=89 => rng.fill(block),
            _ => match written.get(rng.below(written.len() as u64) as usize) {
                Some(&src) => {
                    let got = read_at_most(&file, src, block)?;
                    block[got..].fill(0);
                }
                None => rng.fill(block),
            },
        }
        file.write_all_at(block, offset)?;
        written.push(offset);
        offset += n as u64;
    }
    file.sync_all()
}

fn read_at_most(f: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// Overwrites `count` scattered regions of 4 KiB–64 KiB with random bytes,
/// as a guest would between two backups. Returns the bytes changed.
pub fn scribble(path: &Path, count: usize, seed: u64) -> io::Result<u64> {
    let file = OpenOptions::new().write(true).open(path)?;
    let size = file.metadata()?.len();
    let mut rng = SampleRng::new(seed);
    let mut total = 0;
    for _ in 0..count {
        let len = (4096 * (1 + rng.below(16))).min(size);
        let at = rng.below(size - len + 1) / 4096 * 4096;
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        file.write_all_at(&data, at)?;
        total += len;
    }
    file.sync_all()?;
    Ok(total)
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
