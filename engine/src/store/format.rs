//! Every magic number, format version, fixed length, code and well-known
//! name of Cairn's on-disk structures, in one place. `docs/FORMAT.md` is the
//! human description of the layouts; the structures that use these values are
//! defined beside it in `store/`.
//!
//! DO NOT MODIFY a released value: add a new constant (and a new version) instead.

// ---- pack files -------------------------------------------------------------

/// First 8 bytes of a pack file.
pub const PACK_MAGIC_V1: [u8; 8] = *b"CAIRNPK1";
/// Last 8 bytes of a pack file (end of the trailer).
pub const PACK_END_MAGIC_V1: [u8; 8] = *b"CAIRNPKE";
/// Pack layout version, stored after the magic.
pub const PACK_VERSION_V1: u16 = 1;
/// Bytes of a pack header: magic, version, reserved.
pub const PACK_HEADER_LEN: usize = 16;
/// Bytes of one blob-table entry.
pub const PACK_ENTRY_LEN: usize = 48;
/// Bytes of the pack trailer.
pub const PACK_TRAILER_LEN: usize = 56;

// ---- blobs ------------------------------------------------------------------

/// Version byte at the start of every blob header.
pub const BLOB_VERSION_V1: u8 = 1;
/// Bytes of a blob header.
pub const BLOB_HEADER_LEN: usize = 12;
/// Blob header compression code: stored raw.
pub const BLOB_COMPRESSION_NONE: u8 = 0;
/// Blob header compression code: zstd.
pub const BLOB_COMPRESSION_ZSTD: u8 = 1;
/// Blob header encryption code: not encrypted.
pub const BLOB_ENCRYPTION_NONE: u8 = 0;

// ---- index segments ---------------------------------------------------------

/// First 8 bytes of a dedup index segment.
pub const INDEX_MAGIC_V1: [u8; 8] = *b"CAIRNIX1";
/// Index segment layout version, stored after the magic.
pub const INDEX_VERSION_V1: u16 = 1;
/// Bytes of an index segment header.
pub const INDEX_HEADER_LEN: usize = 32;
/// Bytes of one index entry.
pub const INDEX_ENTRY_LEN: usize = 48;
/// Bytes of the fan-out table (256 × u32).
pub const INDEX_FANOUT_LEN: usize = 256 * 4;

// ---- snapshot catalog -------------------------------------------------------

/// First 8 bytes of a snapshot catalog object.
pub const CATALOG_MAGIC_V1: [u8; 8] = *b"CAIRNCT1";
/// Catalog layout version, stored after the magic.
pub const CATALOG_VERSION_V1: u16 = 1;

// ---- snapshot manifests -----------------------------------------------------

/// First 8 bytes of a snapshot manifest.
pub const MANIFEST_MAGIC_V1: [u8; 8] = *b"CAIRNSN1";
/// Manifest layout version, stored after the magic.
pub const MANIFEST_VERSION_V1: u16 = 1;
/// Longest string (name, property) a manifest may hold.
pub const MAX_STRING: usize = 4096;
/// Manifest mode string of a snapshot read in full.
pub const MODE_FULL: &str = "full";
/// Manifest mode string of a snapshot whose disks were read through CBT.
pub const MODE_CBT: &str = "cbt";
/// Snapshot mode: no disk was read — each disk's source file was unchanged
/// (device, inode, size, modification and change times) since the disk's
/// previous snapshot, whose extents it reuses.
pub const MODE_UNCHANGED: &str = "unchanged";
/// Disk property: the state of the regular file a disk was read from
/// (device, inode, size and times); an equal state at the next backup
/// means the file is unchanged and is not read again.
pub const PROP_SOURCE_STATE: &str = "source.state";
/// Manifest chunking code: fixed-size chunks.
pub const CHUNKING_FIXED: u8 = 1;
/// Manifest chunking code: FastCDC (2020).
pub const CHUNKING_FASTCDC: u8 = 2;
/// Manifest compression code: none.
pub const COMPRESSION_NONE: u8 = 0;
/// Manifest compression code: zstd.
pub const COMPRESSION_ZSTD: u8 = 1;
/// Manifest extent tag: a zero run.
pub const EXTENT_ZERO: u8 = 0;
/// Manifest extent tag: one chunk.
pub const EXTENT_CHUNK: u8 = 1;
/// First 8 bytes of a version 2 manifest (extent lists in pages).
pub const MANIFEST_MAGIC_V2: [u8; 8] = *b"CAIRNSN2";
/// Manifest layout version 2, stored after the magic.
pub const MANIFEST_VERSION_V2: u16 = 2;
/// Encoded length of a page reference in a version 2 manifest.
pub const PAGE_REF_LEN: usize = 56;

// ---- extent pages -----------------------------------------------------------

/// First 8 bytes of an extent page's plaintext (a page is stored as a chunk).
pub const EXTENT_PAGE_MAGIC_V1: [u8; 8] = *b"CAIRNEP1";
/// Most extents one page holds.
pub const PAGE_MAX_EXTENTS: u32 = 65_536;
/// A page's span is this many times the chunking's smallest chunk.
pub const PAGE_SPAN_CHUNKS: u64 = 16_384;

// ---- dirty bitmaps ----------------------------------------------------------

/// First 8 bytes of an encoded dirty bitmap.
pub const BITMAP_MAGIC_V1: [u8; 8] = *b"CAIRNBM1";
/// Dirty bitmap layout version.
pub const BITMAP_VERSION_V1: u16 = 1;

// ---- pool configuration -----------------------------------------------------

/// Name of the pool configuration object (a short UTF-8 text of
/// `key value` lines, see `docs/FORMAT.md`).
pub const CONFIG_NAME: &str = "config";
/// Pool configuration format version (first line `cairn-pool 1`).
pub const CONFIG_VERSION_V1: u32 = 1;

// ---- chunks -----------------------------------------------------------------

/// Largest chunk any chunker may produce and any decoder accepts (16 MiB).
pub const MAX_CHUNK_SIZE: usize = 16 << 20;

// ---- disk properties recorded in manifests ----------------------------------

/// Disk property: where the disk was read from (a path, an NBD URI).
pub const PROP_SOURCE: &str = "source";
/// Disk property: the dirty bitmap this snapshot's incremental consumed.
pub const PROP_BITMAP: &str = "cbt.bitmap";
/// Disk property: the bitmap that records changes since this snapshot; the
/// next incremental of the disk must consume exactly this one.
pub const PROP_NEXT_BITMAP: &str = "cbt.next-bitmap";
/// Disk property: why CBT was asked for but not used (the fallback reason).
pub const PROP_FALLBACK: &str = "cbt.fallback";
/// Disk property: what the optional CBT spot check verified.
pub const PROP_SPOT_CHECK: &str = "cbt.spot-check";
