//! Dirty bitmap decoder behind its checksum (fixed up first): never panics;
//! what decodes re-encodes to the same bytes.
#![no_main]
use cairn_engine::cbt::DirtyBitmap;
use cairn_engine::ChunkId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(body) = data.len().checked_sub(32) else { return };
    let mut fixed = data.to_vec();
    let sum = ChunkId::of(&data[..body]).0;
    fixed[body..].copy_from_slice(&sum);
    if let Ok(b) = DirtyBitmap::decode(&fixed) {
        assert_eq!(b.encode(), fixed);
        let _ = b.dirty_extents();
    }
});
