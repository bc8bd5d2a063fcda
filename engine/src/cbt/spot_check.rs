//! The optional spot check before trusting a dirty bitmap: read back a few
//! extents the bitmap marks clean and compare them with the parent snapshot.

use crate::chunker::is_zero;
use crate::error::Result;
use crate::id::ChunkId;
use crate::pipeline::input::ChangedBlocks;
use crate::random::Sampler;
use crate::source::{align_extents, DiskSource};

/// Reads back up to `samples` extents that the bitmap marks clean (spread
/// over the disk, chosen at random) and compares them with the parent: a
/// chunk must hash to the parent's id, a zero run must read as zeros. Catches
/// a bitmap that was cleared or re-created after the parent snapshot, which
/// no name check can see. `Ok(Ok(n))`: n extents matched; `Ok(Err(reason))`:
/// a mismatch, CBT must not be trusted.
pub fn spot_check(
    source: &dyn DiskSource,
    changed: &ChangedBlocks,
    grid: u64,
    samples: u32,
) -> Result<std::result::Result<u32, String>> {
    let dirty = align_extents(changed.dirty(), grid, source.size());
    let is_dirty = |start: u64, end: u64| {
        let i = dirty.partition_point(|r| r.end <= start);
        dirty.get(i).is_some_and(|r| r.start < end)
    };
    // Clean candidates: chunk extents, and grid-sized pieces of zero runs,
    // sampled as they stream past (reservoir sampling: each candidate is
    // kept with equal chance, memory holds `samples` of them).
    let mut rng = Sampler::from_os()?;
    let n = samples as usize;
    let mut chosen: Vec<(u64, u64, Option<ChunkId>)> = Vec::with_capacity(n.min(1 << 16));
    let mut seen = 0u64;
    let mut offer = |c: (u64, u64, Option<ChunkId>)| {
        if chosen.len() < n {
            chosen.push(c);
        } else {
            let j = rng.below(seen + 1);
            if let Some(slot) = usize::try_from(j).ok().and_then(|j| chosen.get_mut(j)) {
                *slot = c;
            }
        }
        seen += 1;
    };
    let walked = changed.for_each_parent_extent(&mut |e| match e.chunk {
        Some(id) if !is_dirty(e.offset, e.end()) => offer((e.offset, e.length, Some(id))),
        Some(_) => {}
        None => {
            let mut at = e.offset;
            while at < e.end() {
                let len = grid.min(e.end() - at);
                if !is_dirty(at, at + len) {
                    offer((at, len, None));
                }
                at += len;
            }
        }
    });
    match walked {
        Ok(()) => {}
        // The parent's extent pages are damaged or gone: nothing to compare
        // with, so the bitmap cannot be trusted (the policy decides).
        Err(e) if e.is_damage() => {
            return Ok(Err(format!(
                "spot check: the previous snapshot's extents cannot be read: {e}"
            )))
        }
        Err(e) => return Err(e),
    }
    let mut buf = Vec::new();
    for &(offset, len, id) in &chosen {
        buf.resize(len as usize, 0);
        source.read_at(offset, &mut buf)?;
        let same = match id {
            Some(id) => ChunkId::of(&buf) == id,
            None => is_zero(&buf),
        };
        if !same {
            return Ok(Err(format!(
                "spot check: bytes {offset}..{} changed since the previous snapshot although \
                 the bitmap marks them clean (the bitmap was cleared or re-created after it)",
                offset + len
            )));
        }
    }
    Ok(Ok(chosen.len() as u32))
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use super::*;
    use crate::chunker::ChunkingParams;
    use crate::source::MemorySource;
    use crate::store::manifest::DiskManifest;

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one dirty range each
    fn spot_check_catches_changes_the_bitmap_missed() {
        // Parent: 16 chunks of 64 KiB, chunk 3 all zeros (a zero run).
        let mut data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        data[3 << 16..4 << 16].fill(0);
        let mut parent = DiskManifest::new("vda");
        for c in data.chunks(65536) {
            let zero = c.iter().all(|&b| b == 0);
            parent.push(65536, (!zero).then(|| ChunkId::of(c)));
        }
        let changed = |dirty: Vec<Range<u64>>| {
            ChangedBlocks::from_parts(parent.clone(), ChunkingParams::default(), dirty)
        };
        let same = MemorySource::new("vda", data.clone());
        assert_eq!(
            spot_check(&same, &changed(vec![]), 65536, 100).unwrap(),
            Ok(16)
        );
        assert_eq!(
            spot_check(&same, &changed(vec![0..1]), 65536, 4).unwrap(),
            Ok(4)
        );
        // A write the bitmap does not show, in a chunk and in a zero run.
        for at in [5 << 16 | 100, 3 << 16 | 7] {
            let mut d = data.clone();
            d[at] ^= 0xff;
            let src = MemorySource::new("vda", d);
            let why = spot_check(&src, &changed(vec![]), 65536, 100)
                .unwrap()
                .unwrap_err();
            let block = (at as u64) >> 16 << 16;
            assert!(why.contains(&format!("bytes {block}..")), "{why}");
            // Marked dirty, it is not a clean extent and is not checked.
            let dirty = changed(vec![at as u64..at as u64 + 1]);
            assert_eq!(spot_check(&src, &dirty, 65536, 100).unwrap(), Ok(15));
        }
    }

    /// Samples are drawn from the whole disk, each clean extent with the
    /// same chance: a change in the first or in the last of 16 chunks,
    /// with 4 samples, is caught by a quarter of the checks (2 000 checks:
    /// 500 expected, σ ≈ 19.4; the bounds 400 … 600 are 5 σ away; a
    /// sampler that keeps the first extent with a chance of 1/7 instead of
    /// 1/4 lands 7 σ below them).
    #[test]
    fn samples_are_drawn_from_the_whole_disk_alike() {
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let mut parent = DiskManifest::new("vda");
        for c in data.chunks(65536) {
            parent.push(65536, Some(ChunkId::of(c)));
        }
        let changed = ChangedBlocks::from_parts(parent, ChunkingParams::default(), vec![]);
        for chunk in [0, 15] {
            let mut d = data.clone();
            d[chunk << 16] ^= 1;
            let src = MemorySource::new("vda", d);
            let caught = (0..2000)
                .filter(|_| spot_check(&src, &changed, 65536, 4).unwrap().is_err())
                .count();
            assert!(
                (400..=600).contains(&caught),
                "chunk {chunk}: caught by {caught} of 2000 checks"
            );
        }
    }

    /// A zero run that ends off the grid (a disk size that is not a
    /// multiple of it) is checked up to the disk's end, not a grid past it.
    #[test]
    fn a_zero_run_ending_off_the_grid_is_checked_to_the_end() {
        let size = (2u64 << 16) + 100;
        let mut data = vec![0u8; size as usize];
        data[..1 << 16].fill(3);
        let mut parent = DiskManifest::new("vda");
        parent.push(65536, Some(ChunkId::of(&data[..1 << 16])));
        parent.push(65536 + 100, None);
        let changed = ChangedBlocks::from_parts(parent, ChunkingParams::default(), vec![]);
        let src = MemorySource::new("vda", data);
        // Pieces: the chunk, 64 KiB of zeros, the last 100 bytes.
        assert_eq!(spot_check(&src, &changed, 65536, 100).unwrap(), Ok(3));
    }
}
