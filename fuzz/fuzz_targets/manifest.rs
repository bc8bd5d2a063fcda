//! Snapshot manifest decoder: never panics; what decodes re-encodes identically.
#![no_main]
use cairn_engine::Snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Snapshot::decode(data) {
        assert_eq!(s.encode(), data, "decode/encode is not a round trip");
    }
});
