//! Every magic number and format version of Cairn's on-disk structures, in one
//! place. `docs/FORMAT.md` is the human description of the layouts.
//!
//! DO NOT MODIFY a released value: add a new constant (and a new version) instead.

/// First 8 bytes of a pack file.
pub const PACK_MAGIC_V1: [u8; 8] = *b"CAIRNPK1";
/// Last 8 bytes of a pack file (end of the trailer).
pub const PACK_END_MAGIC_V1: [u8; 8] = *b"CAIRNPKE";
/// First 8 bytes of a dedup index segment.
pub const INDEX_MAGIC_V1: [u8; 8] = *b"CAIRNIX1";
/// First 8 bytes of a snapshot manifest.
pub const MANIFEST_MAGIC_V1: [u8; 8] = *b"CAIRNSN1";

/// Version byte at the start of every blob header.
pub const BLOB_VERSION_V1: u8 = 1;
/// Pack layout version, stored after the magic.
pub const PACK_VERSION_V1: u16 = 1;
/// Index segment layout version, stored after the magic.
pub const INDEX_VERSION_V1: u16 = 1;
/// Manifest layout version, stored after the magic.
pub const MANIFEST_VERSION_V1: u16 = 1;
/// Pool configuration (`config`, JSON) format version.
pub const CONFIG_VERSION_V1: u32 = 1;

/// Largest chunk any chunker may produce and any decoder accepts (16 MiB).
pub const MAX_CHUNK_SIZE: usize = 16 << 20;
