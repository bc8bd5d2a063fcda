//! Pool configuration parser.
#![no_main]
use cairn_engine::PoolConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = PoolConfig::decode(data);
});
