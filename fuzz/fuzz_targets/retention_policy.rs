//! Stored retention policy and sweep notice parsers (text): never panic;
//! what decodes encodes back to the same bytes.
#![no_main]
use cairn_engine::internals::SweepNotice;
use cairn_engine::RetentionPolicy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = RetentionPolicy::decode(data) {
        assert_eq!(p.encode().as_bytes(), data, "policy round trip");
    }
    if let Ok(n) = SweepNotice::decode(data) {
        assert_eq!(n.encode().as_bytes(), data, "sweep notice round trip");
    }
});
