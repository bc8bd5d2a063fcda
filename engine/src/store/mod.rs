//! What lies in a pool: the byte coding ([`wire`]), every format constant
//! ([`format`]), blobs, packs, index segments, snapshot manifests, the pool
//! configuration, and the pool traits every storage backend implements.
//! Nothing here knows about disk sources, CBT or the pipelines.

pub(crate) mod blob;
pub(crate) mod catalog;
pub(crate) mod config;
pub(crate) mod extent_page;
pub mod format;
pub(crate) mod index;
pub(crate) mod manifest;
pub(crate) mod pack;
pub(crate) mod pool;
pub(crate) mod wire;

use crate::id::SnapshotId;
use crate::kind::FileKind;

/// Whether `bytes` are intact as object `name` of `kind`, for kinds whose
/// objects check themselves: a manifest hashes to its name, an index
/// segment carries its checksum. `None` for other kinds. Caches use it to
/// trust nothing they cannot verify.
pub fn verify_object(kind: FileKind, name: &str, bytes: &[u8]) -> Option<bool> {
    match kind {
        FileKind::Snapshot => Some(SnapshotId::of_manifest(bytes).to_hex() == name),
        FileKind::Index | FileKind::Catalog => Some(wire::split_checksummed(bytes).is_ok()),
        FileKind::Protection => Some(bytes.strip_suffix(b"\n") == Some(name.as_bytes())),
        _ => None,
    }
}
#[cfg(test)]
pub(crate) mod testing;
