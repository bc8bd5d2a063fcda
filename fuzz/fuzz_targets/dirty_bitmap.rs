//! Dirty bitmap decoder: never panics; what decodes re-encodes identically.
#![no_main]
use cairn_engine::cbt::DirtyBitmap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = DirtyBitmap::decode(data) {
        assert_eq!(b.encode(), data);
        let _ = b.dirty_extents();
    }
});
