//! Extent page decoder (manifest version 2). The first 26 bytes are the
//! place and the reference (flags: bit 0 = the disk's last page; span =
//! 2^(byte 1 mod 48); covered length u64, extent count u32, chunk count
//! u32, data bytes u64); the rest is the page. Never panics; a page that
//! decodes is exactly what the page builder cuts from its extents (one
//! encoding per extent list, the cut rule included).
#![no_main]
use cairn_engine::internals::{cut_pages, decode_page, PagePlace};
use cairn_engine::{ChunkId, PageRef};
use libfuzzer_sys::fuzz_target;

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 26 {
        return;
    }
    let (head, page) = data.split_at(26);
    let place = PagePlace {
        start: 0,
        span: 1u64 << (head[1] % 48),
        last: head[0] & 1 == 1,
        follows_zero: false,
    };
    let reference = PageRef {
        id: ChunkId::of(page),
        length: u64_at(head, 2),
        extents: u32_at(head, 10),
        chunks: u32_at(head, 14),
        data_bytes: u64_at(head, 18),
    };
    if let Ok(extents) = decode_page(page, &reference, place) {
        let again = cut_pages(extents.iter().map(|e| (e.length, e.chunk)), place.span);
        assert_eq!(again.len(), 1, "a decoded page re-cuts into {} pages", again.len());
        assert_eq!(again[0].bytes, page, "decode/encode is not a round trip");
        assert_eq!(again[0].reference, reference);
    }
});
