//! Pool configuration parser: never panics; what decodes encodes back to
//! the same bytes (one encoding per value).
#![no_main]
use cairn_engine::PoolConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = PoolConfig::decode(data) {
        assert_eq!(c.encode().as_bytes(), data, "decode/encode is not a round trip");
    }
});
