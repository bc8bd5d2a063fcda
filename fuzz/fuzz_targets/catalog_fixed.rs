//! Snapshot catalog decoder behind its checksum (fixed up first): never
//! panics; what decodes encodes back to the same bytes.
#![no_main]
use cairn_engine::internals::{decode_catalog, encode_catalog};
use libfuzzer_sys::fuzz_target;

mod fixup;

fuzz_target!(|data: &[u8]| {
    let Some(fixed) = fixup::with_fixed_checksum(data) else {
        return;
    };
    if let Ok(entries) = decode_catalog(&fixed) {
        assert_eq!(encode_catalog(&entries), fixed, "decode/encode is not a round trip");
    }
});
