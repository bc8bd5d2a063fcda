//! Blob decoder (header + zstd body): never panics, never over-allocates.
//! A blob that decodes has one encoding: its header encodes back to its
//! first bytes, a raw body is the plaintext, a zstd body is one frame.
#![no_main]
use cairn_engine::internals::{BlobCodec, BlobHeader};
use cairn_engine::Compression;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut codec = BlobCodec::new(Compression::None);
    let mut out = Vec::new();
    if codec.decode_into(data, &mut out).is_ok() {
        let header = BlobHeader::decode(data).expect("a decoded blob has a valid header");
        let head = header.encode();
        assert_eq!(&data[..head.len()], &head[..], "header round trip");
        assert_eq!(out.len(), header.raw_len as usize);
        if header.compression == 0 {
            assert_eq!(&data[head.len()..], &out[..], "a raw body is the plaintext");
        } else {
            assert!(data.len() - head.len() < out.len(), "a zstd body is shorter");
        }
    }
});
