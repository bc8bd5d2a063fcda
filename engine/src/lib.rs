//! # cairn-engine
//!
//! The core of Cairn: backs up virtual-machine disks into content-addressed,
//! deduplicating storage and restores them. Every on-disk format and every
//! algorithm lives here; pools (where bytes are stored) and platform adapters
//! (where disks come from) implement the traits defined here.
//!
//! ## In 30 lines
//! ```
//! # fn main() -> cairn_engine::Result<()> {
//! use std::sync::Arc;
//! use cairn_engine::{
//!     BackupDisk, BackupOptions, DynPool, MemorySource, MemoryTarget, Repository,
//!     RestoreOptions, SnapshotSelector, VerifyOptions,
//! };
//!
//! // Any pool: a directory (`cairn_pools::LocalPool`), S3, or memory.
//! let pool: DynPool = Arc::new(cairn_pools::MemoryPool::new());
//! let repo = Repository::create(pool)?;
//!
//! // Back up one disk (here held in memory; `RawFileSource` reads files).
//! let image: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
//! let disk = BackupDisk::image("vda", MemorySource::new("vda", image.clone()));
//! let stats = repo.backup(vec![disk], &BackupOptions::new("web01"))?;
//!
//! // List, resolve, restore, verify.
//! assert_eq!(repo.snapshots()?.snapshots.len(), 1);
//! let id = repo.resolve(&SnapshotSelector::latest_of("web01"))?;
//! assert_eq!(id, stats.snapshot);
//! let target = MemoryTarget::new(image.len() as u64)?;
//! let keep = target.clone();
//! repo.restore(&id, &move |_disk| Ok(Box::new(target.clone())), &RestoreOptions::default())?;
//! assert_eq!(keep.finished(), Some(image));
//! assert!(repo.verify(&VerifyOptions::default().with_read_data(true))?.is_ok());
//! # Ok(()) }
//! ```
//!
//! ## Data path
//! ```text
//! DiskSource ─► extents (allocated / dirty) ─► chunker ─► BLAKE3 id ─► index lookup
//!                                                              │ new chunks only
//!                                                              ▼
//!              manifest (disk → extents → ids) ◄── PackWriter ◄── zstd blob
//! ```
//! The modules follow it: `store` (what lies in a pool: formats, pool
//! traits), `source` (disk sources and restore targets), `cbt` (dirty
//! bitmaps and whether to trust them), `pipeline` (backup, restore, verify)
//! and [`Repository`], which opens a pool and runs the jobs.
//!
//! ## Crash safety
//! Objects are immutable and committed atomically by the pool. A backup
//! seals packs as it goes, then writes its index segment, then its manifest:
//! a snapshot exists only once its manifest does, and an interrupted (or
//! cancelled) backup leaves sealed packs that the next backup indexes and
//! reuses. Every manifest is complete on its own, so any snapshot restores
//! from its manifest alone.
//!
//! ## Embedding notes
//! - Jobs run on their own threads (`threads`, default one per CPU) and
//!   block the caller; report progress through [`Progress`] and stop them
//!   with a [`CancelToken`].
//! - A [`Repository`] handle may live as long as the process: it picks up
//!   what other handles and processes write.
//! - Errors say what can be done about them: [`Error::is_not_found`],
//!   [`Error::is_damage`], [`Error::is_transient`].
//!
//! See `docs/API.md`, `docs/DESIGN.md` and `docs/FORMAT.md` in the repository.

#![warn(missing_docs)]

mod chunker;
mod copy;
mod damage;
mod error;
mod external_sort;
mod failpoint;
mod file_lock;
mod gc;
mod id;
mod kind;
mod lease;
mod pipeline;
mod platform;
mod progress;
mod prune;
mod random;
mod repair;
mod repo;
mod retention;
mod snapshots;
mod source;
mod store;

pub mod cbt;
pub mod jobs;
pub mod process;

/// Every on-disk constant and well-known property key.
pub use store::format;

/// Byte buffers as pools return them.
pub use bytes;

pub use chunker::{is_zero, parse_size, ChunkingParams};
pub use copy::{CopyOptions, CopyStats};
pub use error::{Error, Result};
pub use gc::{GcOptions, GcReport, DEFAULT_LEASE_EXPIRY, DEFAULT_REPACK_BELOW};
pub use id::{ChunkId, IdScheme, PackId, PoolId, SegmentId, SnapshotId};
pub use kind::FileKind;
pub use pipeline::backup::{BackupOptions, BackupStats};
pub use pipeline::input::{validate_disk_name, BackupDisk, ChangedBlocks, DiskInput};
pub use pipeline::restore::{MakeTarget, RestoreOptions, RestoreStats};
pub use pipeline::verify::{Damage, DamageKind, DamagedRange, VerifyOptions, VerifyReport};
pub use platform::{CbtOpen, Datastore, Platform, PlatformSnapshot, VmDisk, VmInfo};
pub use progress::{CancelToken, NoProgress, Progress};
pub use prune::{PruneOptions, PruneReport};
pub use repair::PackRepairReport;
pub use repo::Repository;
pub use retention::{KeepReason, Period, RetentionDecision, RetentionPolicy, MAX_KEEP};
pub use snapshots::{DiskInfo, PoolInfo, SnapshotInfo, SnapshotList, SnapshotSelector, MIN_PREFIX};
pub use source::{
    align_extents, file_identity, partial_path, publish_file, DiskSource, DiskTarget, MappedBytes,
    MappedDisk, MemorySource, MemoryTarget, NbdAddress, NbdConnection, NbdSource, NbdTarget,
    RawFileSource, SparseFileTarget,
};
pub use store::blob::Compression;
pub use store::config::PoolConfig;
pub use store::index::RebuildReport;
pub use store::manifest::{DiskManifest, Extent, PageRef, Snapshot, SnapshotMode};
pub use store::pool::{
    DynPool, ObjectWriter, Pool, PoolDelete, PoolList, PoolRead, PoolWrapper, PoolWrite,
    WrappedPool,
};
pub use store::verify_object;
pub use store::wire::DecodeError;

/// Low-level pieces for benchmarks and fuzz targets: codecs and parsers of
/// the on-disk structures. Not part of the stable API.
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod internals {
    pub use crate::lease::{LeaseName, SweepNotice};
    pub use crate::pipeline::backup::resume::{decode_journal, encode_record, JOURNAL_MAGIC};
    pub use crate::store::blob::{BlobCodec, BlobHeader};
    pub use crate::store::catalog::{
        decode as decode_catalog, encode as encode_catalog, CatalogEntry,
    };
    pub use crate::store::extent_page::{cut_pages, decode_page, PagePlace, SealedPage};
    pub use crate::store::index::{Index, Segment, SegmentBuilder};
    pub use crate::store::pack::{
        encode_table, pack_header, parse_pack, read_pack_table, PackEntry, PackWriter,
    };
}

/// Sample disk images and data generators for tests, benchmarks and the
/// demo. Not part of the stable API.
#[cfg(feature = "sample")]
#[doc(hidden)]
pub mod sample;
