//! Index segment decoder behind its checksum (fixed up first): never
//! panics; what decodes answers lookups for every entry and re-encodes to
//! the same bytes (one encoding per value).
#![no_main]
use std::collections::BTreeMap;

use cairn_engine::internals::{PackEntry, Segment, SegmentBuilder};
use cairn_engine::{ChunkId, PackId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(body) = data.len().checked_sub(32) else { return };
    let mut fixed = data.to_vec();
    let sum = ChunkId::of(&data[..body]).0;
    fixed[body..].copy_from_slice(&sum);
    let Ok(seg) = Segment::decode(bytes::Bytes::copy_from_slice(&fixed)) else { return };
    let mut b = SegmentBuilder::new();
    for p in seg.packs() {
        b.add_pack(*p);
    }
    let mut by_pack: BTreeMap<PackId, Vec<PackEntry>> = BTreeMap::new();
    for (id, loc) in seg.iter() {
        assert_eq!(seg.lookup(&id), Some(loc));
        by_pack.entry(loc.pack).or_default().push(PackEntry {
            id,
            offset: loc.offset,
            length: loc.length,
            raw_length: 1,
        });
    }
    for (p, e) in by_pack {
        b.add_entries(p, &e);
    }
    assert_eq!(b.encode(), fixed, "decode/encode is not a round trip");
});
