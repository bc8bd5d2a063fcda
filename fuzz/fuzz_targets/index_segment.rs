//! Index segment decoder and lookups on whatever decodes.
#![no_main]
use cairn_engine::internals::Segment;
use cairn_engine::ChunkId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(seg) = Segment::decode(bytes::Bytes::copy_from_slice(data)) {
        for (id, loc) in seg.iter() {
            assert_eq!(seg.lookup(&id), Some(loc));
        }
        let _ = seg.lookup(&ChunkId([0x5a; 32]));
    }
});
