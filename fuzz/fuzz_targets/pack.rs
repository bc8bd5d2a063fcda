//! Pack parser (header, trailer, blob table), then every blob it lists.
#![no_main]
use cairn_engine::internals::parse_pack;
use cairn_engine::internals::BlobCodec;
use cairn_engine::Compression;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = parse_pack(data) {
        let mut codec = BlobCodec::new(Compression::None);
        let mut out = Vec::new();
        for e in entries {
            let start = e.offset as usize;
            let blob = &data[start..start + e.length as usize];
            let _ = codec.decode_verified(blob, &e.id, &mut out);
        }
    }
});
