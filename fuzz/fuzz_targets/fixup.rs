//! Shared by the `*_fixed` targets: the input with its trailing BLAKE3-256
//! checksum recomputed, so the fuzzer reaches the parser behind the check.

/// `data` with its last 32 bytes replaced by the checksum of the rest;
/// `None` when it is too short to hold one.
pub fn with_fixed_checksum(data: &[u8]) -> Option<Vec<u8>> {
    let body = data.len().checked_sub(32)?;
    let mut fixed = data.to_vec();
    fixed[body..].copy_from_slice(&cairn_engine::ChunkId::of(&data[..body]).0);
    Some(fixed)
}
