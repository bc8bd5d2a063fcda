//! Snapshot manifest decoder behind its checksum: the input's trailing
//! BLAKE3 checksum is fixed up first, so the fuzzer explores the parser
//! instead of the checksum rejection. Never panics; what decodes
//! re-encodes to the same bytes (one encoding per value).
#![no_main]
use cairn_engine::{ChunkId, Snapshot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(body) = data.len().checked_sub(32) else { return };
    let mut fixed = data.to_vec();
    let sum = ChunkId::of(&data[..body]).0;
    fixed[body..].copy_from_slice(&sum);
    if let Ok(s) = Snapshot::decode(&fixed) {
        assert_eq!(s.encode(), fixed, "decode/encode is not a round trip");
    }
});
