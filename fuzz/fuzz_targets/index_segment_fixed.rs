//! Index segment decoder behind its checksum (fixed up first): never
//! panics; what decodes answers lookups for every entry and re-encodes to
//! the same bytes (one encoding per value).
#![no_main]
use cairn_engine::internals::{Segment, SegmentBuilder};
use libfuzzer_sys::fuzz_target;

mod fixup;

fuzz_target!(|data: &[u8]| {
    let Some(fixed) = fixup::with_fixed_checksum(data) else {
        return;
    };
    let Ok(seg) = Segment::decode(bytes::Bytes::copy_from_slice(&fixed)) else {
        return;
    };
    for (id, loc) in seg.iter() {
        assert_eq!(seg.lookup(&id), Some(loc));
    }
    assert_eq!(
        SegmentBuilder::from_segment(&seg).encode(),
        fixed,
        "decode/encode is not a round trip"
    );
});
