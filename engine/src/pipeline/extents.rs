//! One reader of a disk's extents for every consumer (restore, verify, GC,
//! copy, CBT): [`DiskExtents`] yields a disk's extents in order from either
//! manifest version — a version 1 manifest's decoded list, or a version 2
//! manifest's extent pages, read, verified against their chunk ids and
//! decoded one at a time, so no consumer holds a disk's whole extent list.
//! A page whose copy is damaged is read from another copy the index names
//! (`read_page`); a backup reads its parent's pages from the copy it
//! would reference only (`read_page_where_found`).

use crate::chunker::ChunkingParams;
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId, SnapshotId};
use crate::pipeline::read_pack_range;
use crate::store::blob::{BlobCodec, Compression};
use crate::store::extent_page::{decode_page, page_span, PagePlace};
use crate::store::index::{BlobLocation, Index};
use crate::store::manifest::{read_manifest, ChunkExtent, DiskManifest, Extent, PageRef, Snapshot};
use crate::store::pool::Pool;
use crate::store::wire::DecodeError;

/// Where chunks are read from: the pool and its index (restore, extent
/// pages).
pub(crate) struct Store<'a> {
    pub(crate) pool: &'a dyn Pool,
    pub(crate) index: &'a Index,
}

impl Store<'_> {
    /// Where chunk `id` lives; on a miss the index is refreshed once (another
    /// writer may have stored it since this handle loaded its index).
    pub(crate) fn locate(
        &self,
        id: &ChunkId,
        refreshed: &mut bool,
    ) -> Result<Option<BlobLocation>> {
        if let Some(loc) = self.index.lookup(id) {
            return Ok(Some(loc));
        }
        if !*refreshed {
            *refreshed = true;
            self.index.refresh(self.pool)?;
            if let Some(loc) = self.index.lookup(id) {
                return Ok(Some(loc));
            }
        }
        // Only in a pack the pool no longer holds: reading it names the
        // missing pack (a clearer error than "no segment knows it").
        Ok(self.index.lookup_including_absent(id))
    }
}

/// Decodes the blob of chunk `id` (at `offset` in `pack`), appends the
/// verified plaintext to `out`, and names the chunk and pack on failure.
pub(crate) fn decode_chunk(
    codec: &mut BlobCodec,
    blob: &[u8],
    id: &ChunkId,
    pack: PackId,
    offset: u64,
    out: &mut Vec<u8>,
) -> Result<()> {
    match codec.decode_verified_append(blob, id, out) {
        Ok(()) => Ok(()),
        Err(DecodeError::ChecksumMismatch { got, .. }) => Err(Error::ChunkHashMismatch {
            chunk: *id,
            pack,
            // `got` is the hex of the content's id, made by the codec.
            got: ChunkId::from_hex(&got).unwrap_or(ChunkId([0; 32])),
        }),
        Err(e) => Err(Error::corrupt(
            format!("chunk {id} at offset {offset} of pack {pack}"),
            e,
        )),
    }
}

/// Appends to `out` the verified plaintext of a copy of chunk `id` in
/// another pack than `not` that the index names; false when none is
/// intact. A copy damaged or gone is passed over; any other read error is
/// returned. `needed_by` names the snapshot and disk for errors.
pub(crate) fn decode_other_copy(
    store: &Store<'_>,
    codec: &mut BlobCodec,
    id: &ChunkId,
    not: PackId,
    needed_by: &dyn Fn() -> String,
    out: &mut Vec<u8>,
) -> Result<bool> {
    for loc in store.index.locations(id) {
        if loc.pack == not {
            continue;
        }
        match decode_copy_at(store, codec, id, loc, needed_by, out) {
            Ok(()) => return Ok(true),
            // The codec leaves `out` as it was on an error.
            Err(e) if e.is_damage() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Reads one extent page's plaintext, verified against its chunk id.
/// `needed_by` names the snapshot and disk for errors.
///
/// A copy found damaged gives way to the page's other copies the index
/// names, the index refreshed first (a backup stores a page again when it
/// finds its copy damaged, so the pool then holds both until `repair`);
/// the first copy's error is returned when none is intact. Any other
/// error is returned at once. For readers of what a snapshot holds
/// (restore, verify, collection, copy); a backup reads its parent's pages
/// with [`read_page_where_found`].
pub(crate) fn read_page(
    store: &Store<'_>,
    codec: &mut BlobCodec,
    page: &PageRef,
    needed_by: &dyn Fn() -> String,
) -> Result<Vec<u8>> {
    let mut refreshed = false;
    let loc = locate_page(store, page, &mut refreshed, needed_by)?;
    let first = match read_page_at(store, codec, page, loc, needed_by) {
        Err(e) if e.is_damage() => e,
        done => return done,
    };
    if !refreshed {
        store.index.refresh(store.pool)?;
    }
    let mut out = Vec::new();
    if decode_other_copy(store, codec, &page.id, loc.pack, needed_by, &mut out)? {
        return Ok(out);
    }
    Err(first)
}

/// Reads one extent page from the copy the index finds first, verified,
/// with no fallback: the copy a backup deduplicates against when it
/// reuses its parent's extents. A backup must learn that this copy is
/// damaged, to store the page again instead of referencing it.
pub(crate) fn read_page_where_found(
    store: &Store<'_>,
    codec: &mut BlobCodec,
    page: &PageRef,
    needed_by: &dyn Fn() -> String,
) -> Result<Vec<u8>> {
    let loc = locate_page(store, page, &mut false, needed_by)?;
    read_page_at(store, codec, page, loc, needed_by)
}

fn locate_page(
    store: &Store<'_>,
    page: &PageRef,
    refreshed: &mut bool,
    needed_by: &dyn Fn() -> String,
) -> Result<BlobLocation> {
    store
        .locate(&page.id, refreshed)?
        .ok_or_else(|| Error::ChunkMissing {
            chunk: page.id,
            needed_by: needed_by(),
        })
}

/// Reads the copy of a page at `loc`, verified.
fn read_page_at(
    store: &Store<'_>,
    codec: &mut BlobCodec,
    page: &PageRef,
    loc: BlobLocation,
    needed_by: &dyn Fn() -> String,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    decode_copy_at(store, codec, &page.id, loc, needed_by, &mut out)?;
    Ok(out)
}

/// Reads the copy of chunk `id` at `loc` and appends its verified
/// plaintext to `out` (left as it was on an error).
fn decode_copy_at(
    store: &Store<'_>,
    codec: &mut BlobCodec,
    id: &ChunkId,
    loc: BlobLocation,
    needed_by: &dyn Fn() -> String,
    out: &mut Vec<u8>,
) -> Result<()> {
    let blob = read_pack_range(
        store.pool,
        loc.pack,
        (loc.offset, u64::from(loc.length)),
        Some(*id),
        needed_by,
    )?;
    decode_chunk(codec, &blob, id, loc.pack, loc.offset, out)
}

/// A disk's extents in disk order, each `Ok(extent)` or, once, the error
/// that stopped the walk (a page missing, damaged or cut against the rule).
pub(crate) struct DiskExtents<'a> {
    store: Option<&'a Store<'a>>,
    snapshot: SnapshotId,
    disk: &'a DiskManifest,
    span: u64,
    /// Version 1: the next extent's index.
    next_listed: usize,
    /// Version 2: the next page's index and where it starts.
    next_page: usize,
    page_start: u64,
    /// The extents of the page being walked.
    current: std::vec::IntoIter<Extent>,
    follows_zero: bool,
    codec: BlobCodec,
    failed: bool,
}

/// How errors name the extent page of `disk` of `snapshot` that starts at
/// `offset`.
pub(crate) fn page_place(snapshot: SnapshotId, disk: &str, offset: u64) -> String {
    format!("extent page of snapshot {snapshot}, disk {disk:?} at offset {offset}")
}

impl<'a> DiskExtents<'a> {
    /// The extents of `disk` of snapshot `snapshot` (chunked with
    /// `chunking`); pages are read through `store`. A version 2 disk with
    /// no store fails on its first page.
    pub(crate) fn new(
        store: Option<&'a Store<'a>>,
        snapshot: SnapshotId,
        chunking: ChunkingParams,
        disk: &'a DiskManifest,
    ) -> Self {
        DiskExtents {
            store,
            snapshot,
            disk,
            span: page_span(chunking),
            next_listed: 0,
            next_page: 0,
            page_start: 0,
            current: Vec::new().into_iter(),
            follows_zero: false,
            codec: BlobCodec::new(Compression::None),
            failed: false,
        }
    }

    fn needed_by(&self, at: u64) -> String {
        page_place(self.snapshot, &self.disk.name, at)
    }

    /// Reads the next page into `current`; `None` at the disk's end.
    fn load_page(&mut self) -> Option<Result<()>> {
        let page = *self.disk.pages.get(self.next_page)?;
        let start = self.page_start;
        let Some(store) = self.store else {
            return Some(Err(Error::Internal(format!(
                "{}: read without access to the pool",
                self.needed_by(start)
            ))));
        };
        let (snapshot, name) = (self.snapshot, &self.disk.name);
        let needed_by = || page_place(snapshot, name, start);
        let bytes = match read_page(store, &mut self.codec, &page, &needed_by) {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        };
        let place = PagePlace {
            start,
            span: self.span,
            last: self.next_page + 1 == self.disk.pages.len(),
            follows_zero: self.follows_zero,
        };
        match decode_page(&bytes, &page, place) {
            Ok(extents) => {
                self.follows_zero = extents.last().is_some_and(|e| e.chunk.is_none());
                self.current = extents.into_iter();
                self.page_start += page.length;
                self.next_page += 1;
                Some(Ok(()))
            }
            Err(e) => Some(Err(Error::corrupt(
                format!("extent page {} ({})", page.id, self.needed_by(start)),
                e,
            ))),
        }
    }
}

impl Iterator for DiskExtents<'_> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if !self.disk.is_paged() {
            let e = self.disk.extents.get(self.next_listed).copied()?;
            self.next_listed += 1;
            return Some(Ok(e));
        }
        loop {
            if let Some(e) = self.current.next() {
                return Some(Ok(e));
            }
            match self.load_page()? {
                Ok(()) => {}
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Reads and checks (content hash = name) one manifest and calls
/// `on_chunk` with every chunk it references, in disk order: for a
/// version 2 disk first each extent page (covering its span), then the
/// chunks of its extents, read page by page. A version 1 manifest is
/// validated whole first (then `on_chunk` sees all its chunks); a version
/// 2 manifest's page that cannot be read or is damaged ends the walk with
/// its error after the chunks before it were visited.
pub(crate) fn visit_snapshot_chunks(
    store: &Store<'_>,
    id: &SnapshotId,
    on_chunk: &mut dyn FnMut(ChunkExtent<'_>),
) -> Result<Snapshot> {
    let bytes = read_manifest(store.pool, id)?;
    visit_manifest_chunks(store, id, &bytes, on_chunk)
}

/// [`visit_snapshot_chunks`] on a manifest already read (and checked
/// against its name), `bytes`.
pub(crate) fn visit_manifest_chunks(
    store: &Store<'_>,
    id: &SnapshotId,
    bytes: &[u8],
    on_chunk: &mut dyn FnMut(ChunkExtent<'_>),
) -> Result<Snapshot> {
    let corrupt = |e| Error::corrupt(format!("snapshot manifest {id}"), e);
    if !Snapshot::is_paged_encoding(bytes) {
        // Checked whole first, so `on_chunk` sees a valid manifest only.
        Snapshot::decode_without_extents(bytes).map_err(corrupt)?;
        return Snapshot::decode_visiting_chunks(bytes, on_chunk).map_err(corrupt);
    }
    // Version 2: the page references (small), then one page at a time.
    let summary = Snapshot::decode(bytes).map_err(corrupt)?;
    for disk in &summary.disks {
        let mut offset = 0;
        for page in &disk.pages {
            on_chunk(ChunkExtent {
                disk: &disk.name,
                offset,
                length: page.length,
                id: page.id,
            });
            offset += page.length;
        }
        for e in DiskExtents::new(Some(store), *id, summary.chunking, disk) {
            let e = e?;
            if let Some(chunk) = e.chunk {
                on_chunk(ChunkExtent {
                    disk: &disk.name,
                    offset: e.offset,
                    length: e.length,
                    id: chunk,
                });
            }
        }
    }
    Ok(summary)
}
