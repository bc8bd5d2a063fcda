//! What a backup reads and a restore writes: the [`DiskSource`] and
//! [`DiskTarget`] traits that platform adapters implement, and the sources
//! and targets the engine brings: raw files and block devices
//! ([`RawFileSource`], [`SparseFileTarget`]), NBD exports ([`NbdSource`],
//! [`NbdTarget`]) and memory ([`MemorySource`], [`MemoryTarget`]).

mod memory;
pub(crate) mod nbd;
mod raw;
mod target;

use std::ops::Range;
use std::sync::Arc;

use crate::error::Result;

pub use memory::{MemorySource, MemoryTarget};
pub use nbd::{NbdAddress, NbdConnection, NbdSource, NbdTarget};
pub use raw::{file_identity, RawFileSource};
pub use target::{partial_path, publish_file, SparseFileTarget};

/// A disk image readable at any offset.
pub trait DiskSource: Send + Sync {
    /// Logical size in bytes.
    fn size(&self) -> u64;

    /// Ranges that may hold non-zero data, sorted and disjoint. Everything
    /// else reads as zeros and is not read at all. The default is the whole disk.
    #[allow(clippy::single_range_in_vec_init)] // one extent: the whole disk
    fn data_extents(&self) -> Result<Vec<Range<u64>>> {
        Ok(if self.size() == 0 {
            Vec::new()
        } else {
            vec![0..self.size()]
        })
    }

    /// Fills `buf` from `offset`. Reads past the end are an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// What this source is, for messages (a path, an NBD URI).
    fn describe(&self) -> String;

    /// A string that changes whenever the disk's content may have changed
    /// (a raw file: device, inode, size, mtime, ctime), or `None` when the
    /// source cannot tell. A backup resumes from a journal only on a source
    /// of the same identity (spec B13).
    fn identity(&self) -> Option<String> {
        None
    }

    /// Whether an unchanged [`identity`](Self::identity) proves the content
    /// unchanged — a regular file's device, inode, size and modification and
    /// change times, as restic's and borg's files caches assume: a backup
    /// then reuses the disk's previous snapshot instead of reading it
    /// ([`BackupOptions::reuse_unchanged`](crate::BackupOptions::reuse_unchanged)).
    /// Block devices and network sources: false (their times say nothing).
    /// The default: false.
    fn identity_proves_content(&self) -> bool {
        false
    }

    /// The whole disk mapped into memory, when the source was opened that
    /// way ([`RawFileSource::open_mapped`]): the pipeline then hashes and
    /// compresses straight from the mapping instead of copying into buffers.
    fn mapped(&self) -> Option<MappedDisk> {
        None
    }
}

/// A disk's bytes mapped into memory.
pub trait MappedBytes: Send + Sync {
    /// The whole disk.
    fn bytes(&self) -> &[u8];
    /// The pipeline is done with `range`: drop it from this process's
    /// resident set (the data stays in the page cache).
    fn release(&self, _range: Range<usize>) {}
}

/// A shared handle to a mapped disk.
pub type MappedDisk = Arc<dyn MappedBytes>;

/// Where a restored disk goes.
pub trait DiskTarget: Send + Sync {
    /// Writes `data` at `offset`. Regions never written read as zeros.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes the disk durable and visible. Dropping without `finish` discards it.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Rounds data extents out to a grid of `grid` bytes (clipped to `size`) and
/// merges those that touch, so fixed-size chunks never straddle a read.
pub fn align_extents(extents: &[Range<u64>], grid: u64, size: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::with_capacity(extents.len());
    for r in extents {
        let start = r.start / grid * grid;
        let end = r.end.div_ceil(grid).saturating_mul(grid).min(size);
        if start >= end {
            continue;
        }
        match out.last_mut() {
            Some(last) if start <= last.end => last.end = last.end.max(end),
            _ => out.push(start..end),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_merges_and_clips() {
        let e = vec![5..10, 4000..5000, 70_000..70_001];
        assert_eq!(
            align_extents(&e, 4096, 100_000),
            vec![0..8192, 69632..73728]
        );
        let one: Vec<Range<u64>> = std::iter::once(0..10).collect();
        assert_eq!(align_extents(&one, 4096, 10), one);
    }
}
