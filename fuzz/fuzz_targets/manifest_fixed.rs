//! Snapshot manifest decoder behind its checksum: the input's trailing
//! BLAKE3 checksum is fixed up first, so the fuzzer explores the parser
//! instead of the checksum rejection. Never panics; what decodes
//! re-encodes to the same bytes (one encoding per value).
#![no_main]
use cairn_engine::Snapshot;
use libfuzzer_sys::fuzz_target;

mod fixup;

fuzz_target!(|data: &[u8]| {
    let Some(fixed) = fixup::with_fixed_checksum(data) else {
        return;
    };
    if let Ok(s) = Snapshot::decode(&fixed) {
        assert_eq!(s.encode(), fixed, "decode/encode is not a round trip");
    }
});
