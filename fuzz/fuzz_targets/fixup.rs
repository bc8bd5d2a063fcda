//! Shared by the `*_fixed` targets: the input with its BLAKE3-256 checksum
//! recomputed, so the fuzzer reaches the parser behind the check; and the
//! pack round trip both pack targets assert.

/// `data` with its last 32 bytes replaced by the checksum of the rest;
/// `None` when it is too short to hold one.
#[allow(dead_code)] // not every target that shares this module uses it
pub fn with_fixed_checksum(data: &[u8]) -> Option<Vec<u8>> {
    let body = data.len().checked_sub(32)?;
    let mut fixed = data.to_vec();
    fixed[body..].copy_from_slice(&cairn_engine::ChunkId::of(&data[..body]).0);
    Some(fixed)
}

/// A pack with the table hash in its trailer recomputed (trailer: table
/// offset u64 | entry count u32 | version u16 | reserved u16 | BLAKE3-256
/// of the table | magic): `None` when it is too short for a trailer or the
/// offset it holds does not lie before the trailer.
#[allow(dead_code)] // not every target that shares this module uses it
pub fn pack_with_fixed_table_hash(data: &[u8]) -> Option<Vec<u8>> {
    let trailer = data.len().checked_sub(56)?;
    let offset = u64::from_le_bytes(data[trailer..trailer + 8].try_into().ok()?);
    let offset = usize::try_from(offset).ok().filter(|&o| o <= trailer)?;
    let mut fixed = data.to_vec();
    fixed[trailer + 16..trailer + 48]
        .copy_from_slice(&cairn_engine::ChunkId::of(&data[offset..trailer]).0);
    Some(fixed)
}

/// Parses `data` as a pack (header, trailer, table, blob headers), reads
/// every blob it lists, and asserts that encoding again what was decoded
/// (header, blob headers, bodies, table) gives exactly `data`. Never
/// panics on a pack that does not parse.
#[allow(dead_code)] // not every target that shares this module uses it
pub fn pack_round_trip(data: &[u8]) {
    use cairn_engine::internals::{encode_table, pack_header, parse_pack, BlobCodec, BlobHeader};
    let Ok(entries) = parse_pack(data) else {
        return;
    };
    let mut codec = BlobCodec::new(cairn_engine::Compression::None);
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
}
