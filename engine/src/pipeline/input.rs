//! What a backup reads: [`BackupDisk`] (a named disk and its
//! [`DiskInput`]) and [`ChangedBlocks`], the input that turns a disk's
//! backup into an incremental. The pipeline takes these as given; deciding
//! whether changed-block information can be trusted is the `cbt` module's job.

use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::chunker::ChunkingParams;
use crate::error::{Error, Result};
use crate::id::{ChunkId, SnapshotId};
use crate::pipeline::extents::Store;
use crate::pipeline::extents::{page_place, read_page_where_found};
use crate::source::DiskSource;
use crate::store::blob::{BlobCodec, Compression};
use crate::store::extent_page::{decode_page, page_span, PagePlace};
use crate::store::format::MAX_STRING;
use crate::store::index::Index;
use crate::store::manifest::{DiskManifest, Extent, Snapshot};
use crate::store::pool::DynPool;

/// What to read for one disk.
#[non_exhaustive]
pub enum DiskInput {
    /// A random-access disk image (holes skipped).
    Image(Box<dyn DiskSource>),
    /// A stream of unknown size, read once, start to end.
    Stream(Box<dyn Read + Send>),
    /// An incremental: only `changed.dirty` is read from the source; every
    /// other range reuses the parent snapshot's extents.
    Incremental {
        /// The disk now.
        source: Box<dyn DiskSource>,
        /// What changed since the parent.
        changed: ChangedBlocks,
    },
}

impl std::fmt::Debug for DiskInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskInput::Image(s) => write!(f, "Image({})", s.describe()),
            DiskInput::Stream(_) => f.write_str("Stream"),
            DiskInput::Incremental { source, .. } => {
                write!(f, "Incremental({})", source.describe())
            }
        }
    }
}

/// A named disk to back up.
#[derive(Debug)]
#[non_exhaustive]
pub struct BackupDisk {
    /// The disk's name in the snapshot (a plain file name).
    pub name: String,
    /// What to read.
    pub input: DiskInput,
    /// Recorded in the disk's manifest entry.
    pub properties: BTreeMap<String, String>,
}

impl BackupDisk {
    /// A random-access disk image named `name` (holes are skipped).
    pub fn image(name: impl Into<String>, source: impl DiskSource + 'static) -> Self {
        Self::new(name, DiskInput::Image(Box::new(source)))
    }

    /// A stream of unknown size, read once from start to end (use
    /// content-defined chunking for streams).
    pub fn stream(name: impl Into<String>, reader: impl Read + Send + 'static) -> Self {
        Self::new(name, DiskInput::Stream(Box::new(reader)))
    }

    /// An incremental: only `changed`'s dirty ranges are read from `source`;
    /// everything else reuses the parent's extents.
    pub fn incremental(
        name: impl Into<String>,
        source: impl DiskSource + 'static,
        changed: ChangedBlocks,
    ) -> Self {
        Self::new(
            name,
            DiskInput::Incremental {
                source: Box::new(source),
                changed,
            },
        )
    }

    /// A disk from an already boxed input.
    pub fn new(name: impl Into<String>, input: DiskInput) -> Self {
        BackupDisk {
            name: name.into(),
            input,
            properties: BTreeMap::new(),
        }
    }

    /// Records `key = value` in the disk's manifest entry.
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Reads of this disk pass `throttle` first (a job's rate limit on
    /// reads; a mapped image is then read, not mapped).
    pub fn throttled(mut self, throttle: std::sync::Arc<crate::jobs::Throttle>) -> Self {
        use crate::jobs::{ThrottledReader, ThrottledSource};
        self.input = match self.input {
            DiskInput::Image(s) => DiskInput::Image(Box::new(ThrottledSource::new(s, throttle))),
            DiskInput::Stream(r) => DiskInput::Stream(Box::new(ThrottledReader::new(r, throttle))),
            DiskInput::Incremental { source, changed } => DiskInput::Incremental {
                source: Box::new(ThrottledSource::new(source, throttle)),
                changed,
            },
        };
        self
    }

    /// The source's size, when the input has one (streams do not).
    pub(crate) fn size(&self) -> Option<u64> {
        match &self.input {
            DiskInput::Image(s) | DiskInput::Incremental { source: s, .. } => Some(s.size()),
            DiskInput::Stream(_) => None,
        }
    }
}

/// What [`ChangedBlocks::reread_unless`] learnt beside the spans it
/// marked dirty.
#[derive(Debug, Default)]
pub(crate) struct Reread {
    /// Extent pages of the parent that `reusable` accepted but that could
    /// not be read as damage (the copy the index names is damaged, or its
    /// pack is gone): their spans are read again, and the copy read must
    /// not be reused when the same page is cut anew.
    pub(crate) damaged_pages: Vec<ChunkId>,
}

/// Turns a disk's backup into an incremental against its parent snapshot:
/// the parent's copy of the disk, the parent's id (recorded as the new
/// snapshot's parent) and the ranges that may have changed since.
///
/// Made from the parent snapshot itself ([`ChangedBlocks::new`]), so the
/// extents reused and the parent recorded cannot disagree.
#[derive(Clone, Debug)]
pub struct ChangedBlocks {
    parent_id: SnapshotId,
    parent: DiskManifest,
    parent_chunking: ChunkingParams,
    dirty: Vec<Range<u64>>,
    /// Nothing changed because the source file is the one the parent read
    /// (its state recorded), not because a bitmap said so.
    unchanged_file: bool,
    /// A version 2 parent's pages: where they start and how to read them.
    paged: Box<PagedParent>,
}

/// A decoded page, by its index in the disk.
type CachedPage = Option<(usize, Arc<Vec<Extent>>)>;

/// How a version 2 parent's pages are found and read.
#[derive(Debug, Default)]
struct PagedParent {
    /// Where each page starts.
    starts: Vec<u64>,
    /// The pool to read them from (attached by the repository).
    store: Option<PageStore>,
    /// The page read last, decoded (the reader walks the disk in order).
    cache: Mutex<CachedPage>,
}

impl Clone for PagedParent {
    fn clone(&self) -> Self {
        PagedParent {
            starts: self.starts.clone(),
            store: self.store.clone(),
            cache: Mutex::new(None),
        }
    }
}

/// Where a version 2 parent's extent pages are read from.
#[derive(Clone)]
pub(crate) struct PageStore {
    pub(crate) pool: DynPool,
    pub(crate) index: Arc<Index>,
}

impl std::fmt::Debug for PageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageStore({})", self.pool.location())
    }
}

impl ChangedBlocks {
    /// The changes of disk `disk` since snapshot `parent_id` (whose decoded
    /// manifest is `parent`): `dirty` are the byte ranges that may differ
    /// (from a dirty bitmap; any order). Fails when the parent has no such
    /// disk.
    pub fn new(
        parent_id: SnapshotId,
        parent: &Snapshot,
        disk: &str,
        dirty: Vec<Range<u64>>,
    ) -> Result<Self> {
        let copy = parent
            .disks
            .iter()
            .find(|d| d.name == disk)
            .ok_or_else(|| Error::CbtNotTrusted {
                disk: disk.to_string(),
                reason: format!("the parent snapshot {parent_id} has no disk {disk:?}"),
            })?;
        let mut dirty = dirty;
        dirty.sort_by_key(|r| r.start);
        Ok(Self::with_parent(
            parent_id,
            copy.clone(),
            parent.chunking,
            dirty,
        ))
    }

    fn with_parent(
        parent_id: SnapshotId,
        parent: DiskManifest,
        parent_chunking: ChunkingParams,
        dirty: Vec<Range<u64>>,
    ) -> Self {
        let starts = parent
            .pages
            .iter()
            .scan(0u64, |at, p| {
                let start = *at;
                *at = at.saturating_add(p.length);
                Some(start)
            })
            .collect();
        ChangedBlocks {
            parent_id,
            parent,
            parent_chunking,
            dirty,
            unchanged_file: false,
            paged: Box::new(PagedParent {
                starts,
                ..Default::default()
            }),
        }
    }

    /// Where a version 2 parent's extent pages are read from.
    pub(crate) fn attach_pages(&mut self, pool: DynPool, index: Arc<Index>) {
        self.paged.store = Some(PageStore { pool, index });
    }

    /// Extents of page `p` of a version 2 parent, read and checked.
    fn page_extents(&self, p: usize) -> Result<Arc<Vec<Extent>>> {
        if let Some((cached, extents)) = &*self.paged.cache.lock() {
            if *cached == p {
                return Ok(extents.clone());
            }
        }
        let (Some(page), Some(&start)) = (self.parent.pages.get(p), self.paged.starts.get(p))
        else {
            return Err(Error::Internal(format!("parent page {p} out of range")));
        };
        let what = || page_place(self.parent_id, &self.parent.name, start);
        let Some(pages) = &self.paged.store else {
            return Err(Error::Internal(format!(
                "{}: the parent's pages are read without a pool",
                what()
            )));
        };
        let store = Store {
            pool: &*pages.pool,
            index: &pages.index,
        };
        let mut codec = BlobCodec::new(Compression::None);
        let bytes = read_page_where_found(&store, &mut codec, page, &what)?;
        let place = PagePlace {
            start,
            span: page_span(self.parent_chunking),
            last: p + 1 == self.parent.pages.len(),
            follows_zero: false,
        };
        let extents = Arc::new(
            decode_page(&bytes, page, place)
                .map_err(|e| Error::corrupt(format!("extent page {} ({})", page.id, what()), e))?,
        );
        *self.paged.cache.lock() = Some((p, extents.clone()));
        Ok(extents)
    }

    /// Calls `f` with the parent's extents from the one holding `from` on,
    /// in order, until it returns false.
    /// Pages starting at or past `until` are not read (a clean range
    /// never reads a page that lies wholly in a dirty one).
    fn walk_parent(
        &self,
        (from, until): (u64, u64),
        f: &mut dyn FnMut(&Extent) -> Result<bool>,
    ) -> Result<()> {
        if !self.parent.is_paged() {
            let extents = &self.parent.extents;
            let first = extents.partition_point(|e| e.end() <= from);
            for e in extents.get(first..).unwrap_or_default() {
                if !f(e)? {
                    break;
                }
            }
            return Ok(());
        }
        let mut p = self
            .paged
            .starts
            .partition_point(|&s| s <= from)
            .saturating_sub(1);
        while p < self.parent.pages.len() {
            if self.paged.starts.get(p).is_some_and(|&s| s >= until) {
                break;
            }
            let extents = self.page_extents(p)?;
            let first = extents.partition_point(|e| e.end() <= from);
            for e in extents.get(first..).unwrap_or_default() {
                if !f(e)? {
                    return Ok(());
                }
            }
            p += 1;
        }
        Ok(())
    }

    /// Calls `f` with every extent of the parent, in order (a version 2
    /// parent's pages are read one at a time).
    pub(crate) fn for_each_parent_extent(&self, f: &mut dyn FnMut(&Extent)) -> Result<()> {
        self.walk_parent((0, u64::MAX), &mut |e| {
            f(e);
            Ok(true)
        })
    }

    /// Disk `disk` of `parent` again, unread: its source file's state
    /// equals the one recorded there.
    pub(crate) fn unchanged_file(
        parent_id: SnapshotId,
        parent: &Snapshot,
        disk: &str,
    ) -> Result<Self> {
        let mut c = Self::new(parent_id, parent, disk, Vec::new())?;
        c.unchanged_file = true;
        Ok(c)
    }

    /// Whether this is an unchanged file (see [`unchanged_file`](Self::unchanged_file)).
    pub(crate) fn is_unchanged_file(&self) -> bool {
        self.unchanged_file
    }

    /// A value from its parts (unit tests of the pipeline and CBT).
    #[cfg(test)]
    pub(crate) fn from_parts(
        parent: DiskManifest,
        chunking: ChunkingParams,
        dirty: Vec<Range<u64>>,
    ) -> Self {
        Self::with_parent(SnapshotId([0; 32]), parent, chunking, dirty)
    }

    /// The snapshot the incremental builds on.
    pub fn parent_id(&self) -> SnapshotId {
        self.parent_id
    }

    /// The parent's copy of the disk.
    pub fn parent_disk(&self) -> &DiskManifest {
        &self.parent
    }

    /// Ranges that may differ from the parent, sorted by start.
    pub fn dirty(&self) -> &[Range<u64>] {
        &self.dirty
    }

    /// Marks every parent chunk extent whose chunk `reusable` rejects as
    /// dirty, so it is read again instead of reused (a garbage collection
    /// is about to delete the only pack holding it), and the whole span of
    /// a version 2 parent's page that is rejected or cannot be read.
    /// Returns the pages that could not be read.
    pub(crate) fn reread_unless(&mut self, reusable: impl Fn(&ChunkId) -> bool) -> Result<Reread> {
        let mut added = Vec::new();
        let mut damaged_pages = Vec::new();
        if self.parent.is_paged() {
            // Page by page: a page that is not reusable itself, or cannot
            // be read (damaged, or its pack gone since the parent was
            // written), makes its whole span dirty — read again, never
            // reused, and never read later.
            for (p, page) in self.parent.pages.iter().enumerate() {
                let start = self.paged.starts.get(p).copied().unwrap_or(0);
                let span = start..start.saturating_add(page.length);
                if !reusable(&page.id) {
                    added.push(span);
                    continue;
                }
                match self.page_extents(p) {
                    Ok(extents) => added.extend(
                        extents
                            .iter()
                            .filter(|e| e.chunk.is_some_and(|c| !reusable(&c)))
                            .map(|e| e.offset..e.end()),
                    ),
                    Err(e) if e.is_damage() => {
                        added.push(span);
                        damaged_pages.push(page.id);
                    }
                    Err(e) => return Err(e),
                }
            }
        } else {
            for e in &self.parent.extents {
                if e.chunk.is_some_and(|c| !reusable(&c)) {
                    added.push(e.offset..e.end());
                }
            }
        }
        if !added.is_empty() {
            self.dirty.extend(added);
            self.dirty.sort_by_key(|r| r.start);
        }
        Ok(Reread { damaged_pages })
    }

    /// Checks that the parent can be reused for a disk of `size` bytes cut
    /// with `chunking`. The error says why CBT cannot be trusted.
    pub fn check(&self, disk: &str, size: u64, chunking: ChunkingParams) -> Result<()> {
        let untrusted = |reason: String| Error::CbtNotTrusted {
            disk: disk.to_string(),
            reason,
        };
        let ChunkingParams::Fixed { size: grid } = chunking else {
            return Err(untrusted("incrementals need fixed-size chunking".into()));
        };
        if self.parent_chunking != chunking {
            return Err(untrusted(format!(
                "the parent was chunked {} and this backup {}",
                self.parent_chunking, chunking
            )));
        }
        if self.parent.size != size {
            return Err(untrusted(format!(
                "the disk is {size} bytes, the parent's copy {} (resized)",
                self.parent.size
            )));
        }
        // Every chunk extent of the parent must sit on the grid (a version
        // 2 parent's extents are checked as they are reused).
        for e in &self.parent.extents {
            off_grid(e, grid).map_err(untrusted)?;
        }
        Ok(())
    }

    /// The parent's extents covering `range` (grid-aligned), as
    /// (length, chunk) pairs; zero runs are clipped to the range. Fails
    /// ([`Error::CbtNotTrusted`]) at a chunk extent of a fixed-size parent
    /// that is off its grid, whether or not [`check`](Self::check) ran.
    pub fn reuse(&self, range: Range<u64>) -> Result<Vec<(u64, Option<ChunkId>)>> {
        let mut out = Vec::new();
        self.reuse_pieces(range, usize::MAX, &mut |piece| {
            out.extend(piece);
            true
        })?;
        Ok(out)
    }

    /// Like [`reuse`](Self::reuse), handing the extents to `f` in pieces
    /// of at most `max` (memory stays flat for a disk of any size). Returns
    /// false when `f` did.
    pub(crate) fn reuse_pieces(
        &self,
        range: Range<u64>,
        max: usize,
        f: &mut dyn FnMut(Vec<(u64, Option<ChunkId>)>) -> bool,
    ) -> Result<bool> {
        let grid = match self.parent_chunking {
            ChunkingParams::Fixed { size } => size,
            _ => 0,
        };
        let mut piece = Vec::new();
        let mut running = true;
        self.walk_parent((range.start, range.end), &mut |e| {
            if e.offset >= range.end {
                return Ok(false);
            }
            // `check` saw a version 1 parent's extents whole, but the
            // public `reuse` may be called without it, and a version 2
            // parent's are only seen here, page by page.
            if grid > 0 {
                off_grid(e, grid).map_err(|reason| Error::CbtNotTrusted {
                    disk: self.parent.name.clone(),
                    reason,
                })?;
            }
            let start = e.offset.max(range.start);
            let end = e.end().min(range.end);
            if e.chunk.is_some() && (start != e.offset || end != e.end()) {
                return Err(Error::Internal(format!(
                    "parent chunk extent at {} straddles the reused range {range:?}",
                    e.offset
                )));
            }
            piece.push((end - start, e.chunk));
            if piece.len() >= max {
                running = f(std::mem::take(&mut piece));
            }
            Ok(running)
        })?;
        if running && !piece.is_empty() {
            running = f(piece);
        }
        Ok(running)
    }
}

/// Why a chunk extent of a parent is not on the `grid`, if it is not.
fn off_grid(e: &Extent, grid: u32) -> std::result::Result<(), String> {
    if e.chunk.is_some() && (e.offset % grid as u64 != 0 || e.length > grid as u64) {
        return Err(format!(
            "the parent's extent at {} is not on the {grid}-byte grid",
            e.offset
        ));
    }
    Ok(())
}

/// Checks a disk name: non-empty, no path separators, no `.`/`..`, no NUL.
pub fn validate_disk_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\0'])
        || name.len() > MAX_STRING
    {
        return Err(Error::InvalidArgument(format!(
            "disk name {name:?} must be a plain file name (no '/', not . or ..)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const K64: u64 = 65536;

    /// Parent: chunk a [0, 64K), zeros [64K, 192K), chunk b [192K, 256K),
    /// then a short tail chunk c [256K, 256K + 1000).
    fn parent() -> DiskManifest {
        let mut d = DiskManifest::new("vda");
        d.push(K64, Some(ChunkId::of(b"a")));
        d.push(2 * K64, None);
        d.push(K64, Some(ChunkId::of(b"b")));
        d.push(1000, Some(ChunkId::of(b"c")));
        d
    }

    fn grid() -> ChunkingParams {
        ChunkingParams::Fixed { size: K64 as u32 }
    }

    #[test]
    fn check_accepts_the_grid_and_refuses_everything_else() {
        let size = 4 * K64 + 1000;
        let cb = ChangedBlocks::from_parts(parent(), grid(), vec![]);
        // A short tail chunk on the grid is fine.
        assert!(cb.check("vda", size, grid()).is_ok());
        assert!(cb.check("vda", size + 1, grid()).is_err(), "resized");
        assert!(cb
            .check("vda", size, ChunkingParams::Fixed { size: 32768 })
            .is_err());
        assert!(cb.check("vda", size, ChunkingParams::cdc()).is_err());
        // On the grid but longer than a grid cell; inside a cell but off
        // the grid: each alone is refused.
        let mut long = DiskManifest::new("vda");
        long.push(2 * K64, Some(ChunkId::of(b"x")));
        let cb = ChangedBlocks::from_parts(long, grid(), vec![]);
        assert!(cb.check("vda", 2 * K64, grid()).is_err());
        let mut off = DiskManifest::new("vda");
        off.push(1000, None);
        off.push(1000, Some(ChunkId::of(b"y")));
        let cb = ChangedBlocks::from_parts(off, grid(), vec![]);
        assert!(cb.check("vda", 2000, grid()).is_err());
    }

    #[test]
    fn reuse_returns_the_parent_extents_and_refuses_a_straddle() {
        let cb = ChangedBlocks::from_parts(parent(), grid(), vec![]);
        let (a, b, c) = (ChunkId::of(b"a"), ChunkId::of(b"b"), ChunkId::of(b"c"));
        assert_eq!(
            cb.reuse(0..4 * K64 + 1000).unwrap(),
            vec![
                (K64, Some(a)),
                (2 * K64, None),
                (K64, Some(b)),
                (1000, Some(c))
            ]
        );
        // Zero runs are clipped to the range.
        assert_eq!(
            cb.reuse(K64 + 100..2 * K64).unwrap(),
            vec![(K64 - 100, None)]
        );
        assert_eq!(cb.reuse(3 * K64..4 * K64).unwrap(), vec![(K64, Some(b))]);
        // A range cutting a chunk extent: an internal error, not a guess.
        assert!(cb.reuse(K64 / 2..K64).is_err());
        assert!(cb.reuse(3 * K64..3 * K64 + 10).is_err());
        assert_eq!(cb.reuse(5 * K64..6 * K64).unwrap(), vec![]);
    }

    #[test]
    fn reuse_refuses_chunks_off_the_grid_without_a_check_first() {
        // A chunk inside a grid cell but not at its start.
        let mut off = DiskManifest::new("vda");
        off.push(1000, None);
        off.push(1000, Some(ChunkId::of(b"y")));
        let cb = ChangedBlocks::from_parts(off.clone(), grid(), vec![]);
        match cb.reuse(0..2000) {
            Err(Error::CbtNotTrusted { disk, reason }) => {
                assert_eq!(disk, "vda");
                assert!(reason.contains("1000"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // A parent chunked by content has no grid: its extents are reused
        // as they are (only a direct call gets here: `check` refuses it).
        let cb = ChangedBlocks::from_parts(off, ChunkingParams::cdc(), vec![]);
        assert_eq!(
            cb.reuse(0..2000).unwrap(),
            vec![(1000, None), (1000, Some(ChunkId::of(b"y")))]
        );
    }

    /// `reuse_pieces` hands the extents over in pieces of exactly `max`
    /// (the last one shorter), and stops when `f` says so: the backup
    /// reader's memory and channel traffic both rest on it.
    #[test]
    fn reuse_pieces_come_in_pieces_of_max() {
        let cb = ChangedBlocks::from_parts(parent(), grid(), vec![]);
        let all = cb.reuse(0..4 * K64 + 1000).unwrap();
        assert_eq!(all.len(), 4);
        for (max, sizes) in [(1, vec![1, 1, 1, 1]), (3, vec![3, 1]), (4, vec![4])] {
            let mut pieces = Vec::new();
            let done = cb
                .reuse_pieces(0..4 * K64 + 1000, max, &mut |p| {
                    pieces.push(p);
                    true
                })
                .unwrap();
            assert!(done);
            assert_eq!(pieces.iter().map(Vec::len).collect::<Vec<_>>(), sizes);
            assert_eq!(pieces.concat(), all);
        }
        let mut calls = 0;
        let done = cb
            .reuse_pieces(0..4 * K64 + 1000, 1, &mut |_| {
                calls += 1;
                false
            })
            .unwrap();
        assert!(!done);
        assert_eq!(calls, 1, "no piece after f said stop");
    }

    #[test]
    fn reread_unless_marks_rejected_chunks_dirty_in_order() {
        let mut cb = ChangedBlocks::from_parts(
            parent(),
            grid(),
            std::iter::once(4 * K64..4 * K64 + 1000).collect(),
        );
        let b = ChunkId::of(b"b");
        let a = ChunkId::of(b"a");
        let reread = cb.reread_unless(|c| *c != b && *c != a).unwrap();
        assert!(reread.damaged_pages.is_empty());
        let dirty = [0..K64, 3 * K64..4 * K64, 4 * K64..4 * K64 + 1000];
        assert_eq!(cb.dirty(), &dirty);
        cb.reread_unless(|_| true).unwrap();
        assert_eq!(cb.dirty(), &dirty);
    }

    #[test]
    fn sizes_of_inputs() {
        let image = BackupDisk::image(
            "vda",
            crate::source::MemorySource::new("vda", vec![1u8; 5000]),
        );
        assert_eq!(image.size(), Some(5000));
        let stream = BackupDisk::stream("s", std::io::empty());
        assert_eq!(stream.size(), None);
        // Debug names the kind of input and its source.
        assert_eq!(format!("{:?}", image.input), "Image(memory:vda)");
        assert_eq!(format!("{:?}", stream.input), "Stream");
        let incremental = DiskInput::Incremental {
            source: Box::new(crate::source::MemorySource::new("vdb", vec![0u8; 10])),
            changed: ChangedBlocks::from_parts(
                crate::store::manifest::DiskManifest::new("vdb"),
                crate::chunker::ChunkingParams::default(),
                Vec::new(),
            ),
        };
        assert_eq!(format!("{incremental:?}"), "Incremental(memory:vdb)");
    }

    #[test]
    fn disk_names() {
        assert!(validate_disk_name("vda.qcow2").is_ok());
        // The longest name a manifest holds, and one byte more.
        assert!(validate_disk_name(&"n".repeat(MAX_STRING)).is_ok());
        assert!(validate_disk_name(&"n".repeat(MAX_STRING + 1)).is_err());
        for bad in ["", ".", "..", "a/b", "x\0"] {
            assert!(validate_disk_name(bad).is_err(), "{bad:?}");
        }
    }
}
