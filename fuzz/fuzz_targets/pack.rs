//! Pack parser (header, trailer, blob table, blob headers), then every blob
//! it lists. Never panics; a pack that parses is encoded again from what was
//! decoded (header, blob headers, bodies, table) to exactly its own bytes.
#![no_main]
use cairn_engine::internals::{encode_table, pack_header, parse_pack, BlobCodec, BlobHeader};
use cairn_engine::Compression;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = parse_pack(data) else {
        return;
    };
    let mut codec = BlobCodec::new(Compression::None);
    let mut out = Vec::new();
    let mut again = pack_header();
    for e in &entries {
        let blob = &data[e.offset as usize..(e.offset + e.length as u64) as usize];
        let _ = codec.decode_verified(blob, &e.id, &mut out);
        let header = BlobHeader::decode(blob).expect("parse_pack checked every blob header");
        again.extend_from_slice(&header.encode());
        again.extend_from_slice(&blob[header.encode().len()..]);
    }
    let table_offset = again.len() as u64;
    again.extend_from_slice(&encode_table(&entries, table_offset));
    assert_eq!(again, data, "decode/encode is not a round trip");
});
