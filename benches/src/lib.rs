//! Shared helpers for Cairn's benchmarks: deterministic in-memory data.

use cairn_engine::sample::{fill_text, SampleRng};

/// `len` bytes: 25 % zeros, 35 % log text, 30 % random, 10 % repeats, in
/// 1 MiB blocks (the mix of the performance issue).
pub fn mixed_data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = SampleRng::new(seed);
    let mut v = vec![0u8; len];
    let block = 1 << 20;
    let mut off = 0;
    while off < len {
        let end = (off + block).min(len);
        match rng.below(100) {
            0..=24 => {}
            25..=59 => fill_text(&mut rng, &mut v[off..end]),
            60..=89 => rng.fill(&mut v[off..end]),
            _ if off >= block => {
                let (a, b) = v.split_at_mut(off);
                b[..end - off].copy_from_slice(&a[off - block..end - block]);
            }
            _ => rng.fill(&mut v[off..end]),
        }
        off = end;
    }
    v
}
