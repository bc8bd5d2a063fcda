//! Dirty bitmap decoder behind its checksum (fixed up first): never panics;
//! what decodes re-encodes to the same bytes.
#![no_main]
use cairn_engine::cbt::DirtyBitmap;
use libfuzzer_sys::fuzz_target;

mod fixup;

fuzz_target!(|data: &[u8]| {
    let Some(fixed) = fixup::with_fixed_checksum(data) else {
        return;
    };
    if let Ok(b) = DirtyBitmap::decode(&fixed) {
        assert_eq!(b.encode(), fixed);
        let _ = b.dirty_extents();
    }
});
