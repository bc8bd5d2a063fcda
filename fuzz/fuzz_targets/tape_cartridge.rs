//! The virtual tape library's cartridge scanner on arbitrary bytes: never
//! panics; what it accepts is records back to back that end inside the
//! input (a torn tail only at the end).
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../pools/src/tape/parse.rs"]
#[allow(dead_code)]
mod parse;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    if let Ok(scan) = parse::scan_cartridge(data, len, 1 << 16) {
        let mut at = 0u64;
        for (offset, block) in &scan.records {
            assert_eq!(*offset, at, "records are back to back");
            at += block.map_or(1, |l| parse::BLOCK_FRAMING + l as u64);
        }
        match scan.torn_at {
            Some(t) => assert!(t == at && t < len),
            None => assert_eq!(at, len),
        }
    }
});
