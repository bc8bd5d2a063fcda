//! `mtx status` parsing on arbitrary text: never panics; drives come out
//! numbered in order.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../pools/src/tape/parse.rs"]
#[allow(dead_code)]
mod parse;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(st) = parse::parse_mtx_status(text) {
            assert!(!st.drives.is_empty() || !st.storage.is_empty());
        }
    }
});
