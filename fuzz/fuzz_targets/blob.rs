//! Blob decoder (header + zstd body): never panics, never over-allocates.
#![no_main]
use cairn_engine::internals::BlobCodec;
use cairn_engine::Compression;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut codec = BlobCodec::new(Compression::None);
    let mut out = Vec::new();
    let _ = codec.decode_into(data, &mut out);
});
