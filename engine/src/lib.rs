//! # cairn-engine
//!
//! The core of Cairn: every on-disk format and every algorithm. Pools and
//! platform adapters implement the traits defined here; the engine names no
//! concrete pool and no platform.
//!
//! ## Data path
//! ```text
//! DiskSource ─► extents (allocated) ─► chunker ─► BLAKE3 id ─► index lookup
//!                                                     │ new chunks only
//!                                                     ▼
//!        manifest (disk → extents → ids) ◄── PackWriter ◄── zstd blob
//! ```
//!
//! ## Crash safety
//! Objects are immutable and committed atomically by the pool. A backup seals
//! packs as it goes, then writes its index segment, then its manifest: a
//! snapshot exists only once its manifest does, and an interrupted backup
//! leaves sealed packs that the next backup indexes and reuses.
//!
//! See `docs/DESIGN.md` and `docs/FORMAT.md` in the repository.

pub mod chunker;
pub mod codec;
pub mod coding;
mod error;
pub mod format;
pub mod id;
pub mod index;
pub mod manifest;
pub mod pack;
pub mod pool;

pub use cbt::{ChangedBlocks, DirtyBitmap};
pub use chunker::ChunkingParams;
pub use codec::{BlobCodec, Compression};
pub use coding::DecodeError;
pub use error::{Error, Result};
pub use id::{ChunkId, IdScheme, PackId, SegmentId, SnapshotId};
pub use index::{BlobLocation, Index};
pub use manifest::{DiskManifest, Extent, Snapshot};
pub use pack::{PackEntry, PackWriter};
pub use pool::{DynPool, FileKind, ObjectWriter, Pool, PoolDelete, PoolList, PoolRead, PoolWrite};
pub mod backup;
pub mod progress;
pub mod repo;
pub mod restore;
pub mod source;
pub mod verify;

pub use backup::{backup, BackupDisk, BackupOptions, BackupStats, DiskInput};
pub use nbd::NbdSource;
pub use platform::{Platform, PlatformSnapshot, VmDisk, VmInfo};
pub use progress::{NoProgress, Progress};
pub use repo::{PoolConfig, Repository};
pub use restore::{
    restore, restore_to_dir, DiskTarget, RestoreOptions, RestoreStats, SparseFileTarget,
};
pub use source::{DiskSource, RawFileSource};
pub use verify::{verify, Damage, DamageKind, VerifyOptions, VerifyReport};
pub mod cbt;
pub mod nbd;
pub mod platform;
pub mod sample;
