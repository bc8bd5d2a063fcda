//! What lies in a pool: the byte coding ([`wire`]), every format constant
//! ([`format`]), blobs, packs, index segments, snapshot manifests, the pool
//! configuration, and the pool traits every storage backend implements.
//! Nothing here knows about disk sources, CBT or the pipelines.

pub(crate) mod blob;
pub(crate) mod config;
pub mod format;
pub(crate) mod index;
pub(crate) mod manifest;
pub(crate) mod pack;
pub(crate) mod pool;
pub(crate) mod wire;
