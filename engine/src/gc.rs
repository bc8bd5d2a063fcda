//! Garbage collection: [`Repository::gc`] reclaims the space of chunks no
//! snapshot references any more, safely beside backups running in other
//! processes or on other hosts.
//!
//! The protocol (docs/DESIGN.md, "Garbage collection beside running
//! backups", has the reasoning and the table of interleavings):
//!
//! 1. **Mark** every chunk the manifests reference (`live₁`), read every
//!    pack's table, and condemn packs with no live blob (delete) or a live
//!    share below the threshold (repack).
//! 2. **Announce** the condemned packs in a sweep notice. A backup that
//!    starts from now on reads it and reuses nothing from them.
//! 3. **Wait** for every writer whose lease existed when the notice was
//!    written (each may have reused a condemned chunk before the notice);
//!    a writer whose lease was not renewed within the expiry is evicted.
//! 4. **Mark again** (`live₂`): now the manifests of those writers are
//!    visible.
//! 5. **Copy** the blobs of condemned packs whose chunk is in `live₁ ∪
//!    live₂` into new packs (verified on the way), write one index segment
//!    covering every pack that stays, delete the old segments, then the
//!    condemned packs, then the notice. A live extent page stored more
//!    than once keeps its intact copies only (`intact_copies`).
//!
//! Every listing and read before the first deletion must succeed, or the
//! collection stops having deleted nothing. Atime is never used.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::external_sort::{
    sort_budget, ExternalSorter, FieldReader, FieldWriter, Record, ScratchDir, Sorted,
};
use crate::failpoint;
use crate::id::{ChunkId, PackId, SnapshotId};
use crate::kind::FileKind;
use crate::lease::{delete_retrying, list_leases, SweepNotice, WriterLease, LEASE_RENEW_INTERVAL};
use crate::pipeline::extents::visit_snapshot_chunks;
use crate::pipeline::extents::Store;
use crate::progress::CancelToken;
use crate::repo::Repository;
use crate::store::blob::{BlobCodec, Compression};
use crate::store::index::Index;
use crate::store::index::{write_sorted_segment, EntryRecord, Segment};
use crate::store::manifest::list_snapshot_ids;
use crate::store::pack::{read_pack_table, PackWriter};
use crate::store::pool::{DynPool, Pool};

/// Default live share below which a pack is repacked.
pub const DEFAULT_REPACK_BELOW: f64 = 0.5;

/// Default time after which a writer lease not renewed is considered dead.
pub const DEFAULT_LEASE_EXPIRY: Duration = Duration::from_secs(600);

/// Stored size new packs written by a repack grow to.
const REPACK_PACK_TARGET: u64 = 32 << 20;

/// What [`Repository::gc`] does.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct GcOptions {
    /// Decide and report, change nothing.
    pub dry_run: bool,
    /// Packs whose live share (bytes of live blobs / bytes of all blobs) is
    /// below this are repacked (0 … 1; 0 never repacks).
    pub repack_below: f64,
    /// A writer lease not renewed for this long belongs to a dead writer.
    pub lease_expiry: Duration,
    /// How often to look at the leases while waiting.
    pub poll: Duration,
    /// Give up (deleting nothing) if writers are still running after this.
    pub max_wait: Option<Duration>,
    /// Stops the collection (before its first deletion) when triggered.
    pub cancel: CancelToken,
    /// Where the external sort keeps its runs (`None`: `$CAIRN_SCRATCH_DIR`,
    /// else `$TMPDIR`, else `/var/tmp`). Needs about 220 bytes per chunk in
    /// the pool at peak.
    pub scratch_dir: Option<std::path::PathBuf>,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            dry_run: false,
            repack_below: DEFAULT_REPACK_BELOW,
            lease_expiry: DEFAULT_LEASE_EXPIRY,
            poll: Duration::from_millis(500),
            max_wait: None,
            cancel: CancelToken::new(),
            scratch_dir: None,
        }
    }
}

impl GcOptions {
    /// Reports what would be reclaimed without changing anything.
    pub fn with_dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Sets the repack threshold (a share, 0 … 1).
    pub fn with_repack_below(mut self, share: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&share) {
            return Err(Error::InvalidArgument(format!(
                "repack threshold {share} is out of range (0 … 1)"
            )));
        }
        self.repack_below = share;
        Ok(self)
    }

    /// Sets the lease expiry (at least 1 s).
    pub fn with_lease_expiry(mut self, expiry: Duration) -> Result<Self> {
        if expiry < Duration::from_secs(1) {
            return Err(Error::InvalidArgument(
                "lease expiry is out of range (at least 1s)".into(),
            ));
        }
        self.lease_expiry = expiry;
        Ok(self)
    }

    /// Sets how often leases are looked at while waiting.
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll.max(Duration::from_millis(10));
        self
    }

    /// Gives up, deleting nothing, when writers still run after `wait`.
    pub fn with_max_wait(mut self, wait: Option<Duration>) -> Self {
        self.max_wait = wait;
        self
    }

    /// Stops the collection when `cancel` is triggered.
    pub fn with_cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = cancel;
        self
    }

    /// Keeps the external sort's scratch files under `dir` instead of
    /// the default (see [`scratch_dir`](Self::scratch_dir)).
    pub fn with_scratch_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.scratch_dir = Some(dir.into());
        self
    }
}

/// What [`Repository::gc`] found and did.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
#[non_exhaustive]
pub struct GcReport {
    /// Nothing was changed on purpose.
    pub dry_run: bool,
    /// Snapshots whose chunks were marked (first mark).
    pub snapshots: usize,
    /// Distinct chunks they reference.
    pub live_chunks: usize,
    /// Packs in the pool when the collection started.
    pub packs_before: usize,
    /// Their total size.
    pub bytes_before: u64,
    /// Packs deleted that held no live blob.
    pub packs_deleted: usize,
    /// Packs whose live blobs were copied before they were deleted.
    pub packs_repacked: usize,
    /// New packs written by the repack.
    pub packs_written: usize,
    /// Blobs copied into them.
    pub blobs_copied: usize,
    /// Bytes of the packs deleted (repacked ones included).
    pub bytes_deleted: u64,
    /// Bytes of the new packs.
    pub bytes_written: u64,
    /// Net bytes given back: deleted packs and segments minus new ones.
    pub bytes_reclaimed: i64,
    /// Index segments before and after compaction.
    pub segments_before: usize,
    /// Index segments written (one, or none when nothing changed).
    pub segments_after: usize,
    /// Writers the collection waited for.
    pub writers_waited: usize,
    /// Writers evicted because their lease expired.
    pub writers_evicted: usize,
    /// Copies of live extent pages stored more than once that were found
    /// damaged and left out of the new index segment, an intact copy kept
    /// (`repair --packs` moves the damaged ones' packs aside). 0 when the
    /// collection did not plan: a dry run, or nothing to delete and the
    /// index already one segment.
    pub page_copies_damaged: usize,
    /// Wall time.
    pub seconds: f64,
}

impl std::fmt::Display for GcReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        write!(
            f,
            "{} snapshots, {} live chunks; {verb} {} packs without live data and repack {} ({} blobs into {} new packs); {} bytes reclaimed; index {} → {} segments",
            self.snapshots,
            self.live_chunks,
            self.packs_deleted,
            self.packs_repacked,
            self.blobs_copied,
            self.packs_written,
            self.bytes_reclaimed,
            self.segments_before,
            self.segments_after
        )?;
        if self.page_copies_damaged > 0 {
            write!(
                f,
                "; {} damaged copies of extent pages left out of the index (run repair --packs)",
                self.page_copies_damaged
            )?;
        }
        Ok(())
    }
}

/// A pack as the mark saw it (its table entries are in the sorted
/// [`TableRecord`]s, not here: memory grows with packs, not chunks).
#[derive(Debug, Default)]
struct PackUse {
    size: u64,
    blob_bytes: u64,
    /// Bytes of its blobs whose chunk is live, duplicates included (which
    /// pack owns a chunk stored twice).
    raw_live: u64,
    /// Bytes of the live chunks it owns, each counted once.
    live_bytes: u64,
}

type Packs = BTreeMap<PackId, PackUse>;

/// One entry of a pack's table, sorted by chunk id, then pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct TableRecord {
    id: ChunkId,
    pack: PackId,
    offset: u64,
    length: u32,
    raw_length: u32,
}

impl Record for TableRecord {
    const LEN: usize = 64;
    fn put(&self, out: &mut [u8]) {
        FieldWriter::new(out)
            .bytes(&self.id.0)
            .bytes(self.pack.as_bytes())
            .u64(self.offset)
            .u32(self.length)
            .u32(self.raw_length);
    }
    fn get(b: &[u8]) -> Self {
        let mut r = FieldReader::new(b);
        TableRecord {
            id: ChunkId(r.array()),
            pack: PackId(r.array()),
            offset: r.u64(),
            length: r.u32(),
            raw_length: r.u32(),
        }
    }
}

/// A live blob to copy out of a condemned pack, sorted by pack and offset
/// (each pack read front to back).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct CopyRecord {
    pack: PackId,
    offset: u64,
    length: u32,
    raw_length: u32,
    id: ChunkId,
}

impl Record for CopyRecord {
    const LEN: usize = 64;
    fn put(&self, out: &mut [u8]) {
        TableRecord {
            id: self.id,
            pack: self.pack,
            offset: self.offset,
            length: self.length,
            raw_length: self.raw_length,
        }
        .put(out)
    }
    fn get(b: &[u8]) -> Self {
        let t = TableRecord::get(b);
        CopyRecord {
            pack: t.pack,
            offset: t.offset,
            length: t.length,
            raw_length: t.raw_length,
            id: t.id,
        }
    }
}

/// Sorted, distinct ids of every chunk the manifests reference (plus
/// `seed`'s), and the number of manifests read. A manifest deleted since
/// the listing is skipped; one that cannot be read stops the collection.
/// The ids go through an external sort: memory does not grow with them.
fn mark(
    pool: &DynPool,
    index: &Index,
    cancel: &CancelToken,
    scratch: &ScratchDir,
    seed: Option<&Sorted<ChunkId>>,
    expected: &mut BTreeSet<SnapshotId>,
    pages: &mut ExternalSorter<'_, ChunkId>,
) -> Result<(usize, Sorted<ChunkId>)> {
    let mut live = ExternalSorter::new(scratch, "live", sort_budget(), true);
    if let Some(seed) = seed {
        for id in seed.iter()? {
            live.push(id?)?;
        }
    }
    let mut snapshots = 0;
    let listed = list_snapshot_ids(&**pool)?;
    check_listing(pool, &listed, expected)?;
    expected.extend(listed.iter().copied());
    for id in listed {
        cancel.check()?;
        let mut failed = None;
        let store = Store {
            pool: &**pool,
            index,
        };
        let visited = visit_snapshot_chunks(&store, &id, &mut |c| {
            if failed.is_none() {
                if let Err(e) = live.push(c.id) {
                    failed = Some(e);
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        match visited {
            Ok(snapshot) => {
                snapshots += 1;
                for page in snapshot.disks.iter().flat_map(|d| &d.pages) {
                    pages.push(page.id)?;
                }
            }
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        }
    }
    Ok((snapshots, live.finish()?))
}

/// Refuses a manifest listing that leaves out a manifest known to exist
/// (named by the snapshot catalog or by an earlier listing of this
/// collection, and still there when asked by name): a listing cut short
/// would make the chunks of the missing snapshots look like garbage —
/// restic's prune lost data that way.
fn check_listing(
    pool: &DynPool,
    listed: &[SnapshotId],
    expected: &mut BTreeSet<SnapshotId>,
) -> Result<()> {
    if expected.is_empty() {
        for name in pool.list(FileKind::Catalog)? {
            let bytes = match pool.read(FileKind::Catalog, &name) {
                Ok(b) => b,
                Err(e) if e.is_not_found() || e.is_damage() => continue,
                Err(e) => return Err(e),
            };
            // A damaged catalog object only weakens this check.
            if let Ok(entries) = crate::store::catalog::decode(&bytes) {
                expected.extend(entries.into_iter().map(|(id, _)| id));
            }
        }
    }
    for id in expected.iter() {
        if listed.binary_search(id).is_ok() {
            continue;
        }
        match pool.size(FileKind::Snapshot, &id.to_hex()) {
            Ok(_) => {
                return Err(Error::ListingIncomplete {
                    kind: FileKind::Snapshot,
                    name: id.to_hex(),
                })
            }
            Err(e) if e.is_not_found() => {} // forgotten meanwhile
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Calls `f` with each run of table records of one chunk (packs no longer
/// in `packs` left out) and whether the chunk is live.
fn for_each_chunk(
    entries: &Sorted<TableRecord>,
    live: &Sorted<ChunkId>,
    packs: &Packs,
    cancel: &CancelToken,
    mut f: impl FnMut(&[TableRecord], bool) -> Result<()>,
) -> Result<()> {
    let mut cursor = live.cursor()?;
    let mut group: Vec<TableRecord> = Vec::new();
    let mut n = 0u64;
    for r in entries.iter()? {
        let r = r?;
        n += 1;
        if n % 65536 == 0 {
            cancel.check()?;
        }
        if !packs.contains_key(&r.pack) {
            continue;
        }
        if group.first().is_some_and(|g| g.id != r.id) {
            let is_live = cursor.contains(&group[0].id)?;
            f(&group, is_live)?;
            group.clear();
        }
        group.push(r);
    }
    if let Some(first) = group.first() {
        let is_live = cursor.contains(&first.id)?;
        f(&group, is_live)?;
    }
    Ok(())
}

/// The copies in `group` (one chunk's table records, an extent page stored
/// more than once) whose blob reads back intact, into `intact`. A backup
/// that finds its parent's page damaged stores it again, so the pool holds
/// a damaged and an intact copy until `repair`; the new segment names one
/// copy per chunk (the first by pack id) and a repack copies the owner's
/// alone, so a collection that did not look could keep the damaged one and
/// delete the other. Pages are a few per disk and rarely duplicated: each
/// copy is read. Returns how many copies were found damaged (a pack gone
/// since the listing is not counted). A read that fails for another
/// reason than damage fails the collection (nothing is deleted yet).
fn intact_copies(
    pool: &dyn Pool,
    codec: &mut BlobCodec,
    scratch: &mut Vec<u8>,
    group: &[TableRecord],
    intact: &mut Vec<TableRecord>,
) -> Result<usize> {
    intact.clear();
    let mut damaged = 0;
    for r in group {
        let blob = match pool.read_range(
            FileKind::Pack,
            &r.pack.to_hex(),
            r.offset,
            r.length as usize,
        ) {
            Ok(blob) => blob,
            Err(e) if e.is_not_found() => continue,
            Err(e) if e.is_damage() => {
                damaged += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        if codec.decode_verified(&blob, &r.id, scratch).is_ok() {
            intact.push(*r);
        } else {
            damaged += 1;
        }
    }
    Ok(damaged)
}

/// Which pack keeps a live chunk stored more than once (two writers stored
/// it at once, or a collection was interrupted after copying it): the one
/// with the most live bytes, then the lowest id. The others' copies count
/// as garbage.
fn owner(group: &[TableRecord], packs: &Packs) -> Option<TableRecord> {
    group.iter().copied().min_by_key(|r| {
        (
            std::cmp::Reverse(packs.get(&r.pack).map_or(0, |u| u.raw_live)),
            r.pack,
        )
    })
}

/// Packs with no live blob, or a live share below `repack_below`; each
/// pack's live bytes are recounted, a chunk counting only in the pack that
/// owns it. Two passes over the sorted table records.
fn condemn(
    packs: &mut Packs,
    entries: &Sorted<TableRecord>,
    live: &Sorted<ChunkId>,
    repack_below: f64,
    cancel: &CancelToken,
) -> Result<BTreeSet<PackId>> {
    for u in packs.values_mut() {
        u.raw_live = 0;
        u.live_bytes = 0;
    }
    let mut raw: HashMap<PackId, u64> = HashMap::new();
    for_each_chunk(entries, live, packs, cancel, |group, is_live| {
        if is_live {
            for r in group {
                *raw.entry(r.pack).or_default() += r.length as u64;
            }
        }
        Ok(())
    })?;
    for (p, bytes) in raw {
        if let Some(u) = packs.get_mut(&p) {
            u.raw_live = bytes;
        }
    }
    let mut owned: HashMap<PackId, u64> = HashMap::new();
    for_each_chunk(entries, live, packs, cancel, |group, is_live| {
        if is_live {
            if let Some(o) = owner(group, packs) {
                *owned.entry(o.pack).or_default() += o.length as u64;
            }
        }
        Ok(())
    })?;
    let mut out = BTreeSet::new();
    for (p, u) in packs.iter_mut() {
        u.live_bytes = owned.get(p).copied().unwrap_or(0);
        if u.live_bytes == 0 || (u.live_bytes as f64) < repack_below * u.blob_bytes as f64 {
            out.insert(*p);
        }
    }
    Ok(out)
}

/// Deletes the sweep notice when the collection ends, however it ends.
struct NoticeGuard<'a> {
    pool: &'a DynPool,
    name: String,
}

impl Drop for NoticeGuard<'_> {
    fn drop(&mut self) {
        delete_retrying(self.pool, FileKind::Sweep, &self.name);
    }
}

impl Repository {
    /// Collects garbage (see the module doc of `gc.rs` and docs/DESIGN.md).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use cairn_engine::{GcOptions, Repository};
    /// let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new()))?;
    /// let report = repo.gc(&GcOptions::default())?;
    /// assert_eq!(report.packs_deleted, 0);
    /// # Ok::<(), cairn_engine::Error>(())
    /// ```
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        let started = Instant::now();
        let pool = self.pool().clone();
        let stale_notices = self.other_sweeps(opts)?;
        let scratch = ScratchDir::new(opts.scratch_dir.as_deref())?;
        // The collection holds a lease too: its notice is only honoured by
        // other collections while the lease lives.
        let lease = if opts.dry_run {
            None
        } else {
            // Renewed often enough that a collection configured with this
            // expiry never takes it for dead.
            let every = LEASE_RENEW_INTERVAL
                .min(opts.lease_expiry / 3)
                .max(Duration::from_millis(10));
            Some(WriterLease::acquire(&pool, every)?)
        };
        let me = lease.as_ref().map(WriterLease::writer).unwrap_or_default();

        // 1. Mark, and read every pack's table (segments listed first, so
        //    every pack a listed segment covers is in the pack listing).
        let mut known_snapshots = BTreeSet::new();
        // Extent pages are found through the index (refreshed on a miss).
        let index = self.fresh_index()?;
        // The live chunks that are extent pages (sorted on disk, like
        // every set a collection holds).
        let mut pages = ExternalSorter::new(&scratch, "pages", sort_budget(), true);
        let (snapshots, live1) = mark(
            &pool,
            &index,
            &opts.cancel,
            &scratch,
            None,
            &mut known_snapshots,
            &mut pages,
        )?;
        let old_segments = pool.list(FileKind::Index)?;
        let mut packs = Packs::new();
        let sizes: HashMap<String, u64> = match pool.list_sizes(FileKind::Pack)? {
            Some(s) => s.into_iter().collect(),
            None => HashMap::new(),
        };
        let mut tables = ExternalSorter::new(&scratch, "tables", sort_budget(), false);
        for name in pool.list(FileKind::Pack)? {
            opts.cancel.check()?;
            let Some(pack) = PackId::from_hex(&name) else {
                continue;
            };
            let entries = match read_pack_table(&*pool, &pack) {
                Ok(e) => e,
                Err(e) if e.is_not_found() => continue, // another collection
                Err(e) => return Err(e),
            };
            let size = match sizes.get(&name) {
                Some(&s) => s,
                None => pool.size(FileKind::Pack, &name)?,
            };
            let mut blob_bytes = 0;
            for e in &entries {
                blob_bytes += e.length as u64;
                tables.push(TableRecord {
                    id: e.id,
                    pack,
                    offset: e.offset,
                    length: e.length,
                    raw_length: e.raw_length,
                })?;
            }
            packs.insert(
                pack,
                PackUse {
                    size,
                    blob_bytes,
                    ..PackUse::default()
                },
            );
        }
        drop(sizes);
        let tables = tables.finish()?;
        let mut report = GcReport {
            dry_run: opts.dry_run,
            snapshots,
            live_chunks: live1.len() as usize,
            packs_before: packs.len(),
            bytes_before: packs.values().map(|u| u.size).sum(),
            segments_before: old_segments.len(),
            ..GcReport::default()
        };
        let condemned = condemn(&mut packs, &tables, &live1, opts.repack_below, &opts.cancel)?;
        if opts.dry_run {
            count_condemned(&mut report, &packs, &condemned);
            report.bytes_reclaimed = report.bytes_deleted as i64
                - condemned.iter().map(|p| packs[p].live_bytes).sum::<u64>() as i64;
            report.segments_after = old_segments.len().min(1);
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        if condemned.is_empty() && old_segments.len() <= 1 {
            self.delete_stale_notices(&stale_notices);
            report.segments_after = old_segments.len();
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }

        // 2. Announce (only when packs are to go: compacting the index
        //    alone deletes no data a writer could reuse).
        let mut _notice = None;
        let mut live = live1;
        let mut condemned = condemned;
        if !condemned.is_empty() {
            let notice = SweepNotice {
                packs: condemned.clone(),
            };
            let notice_name = SweepNotice::new_name(&me);
            pool.write(FileKind::Sweep, &notice_name, notice.encode().as_bytes())?;
            _notice = Some(NoticeGuard {
                pool: &pool,
                name: notice_name,
            });
            // Two collections that started together: both back off rather
            // than wait for each other's lease (either may retry).
            let notice_name = &_notice.as_ref().map(|n| n.name.clone()).unwrap_or_default();
            if let Some(other) = pool
                .list(FileKind::Sweep)?
                .into_iter()
                .find(|n| n != notice_name && !stale_notices.contains(n))
            {
                return Err(Error::PoolBusy(format!(
                    "another garbage collection is running (sweep notice {other})"
                )));
            }
            failpoint::pause("gc-after-notice");

            // 3. Wait for the writers that may have reused condemned chunks.
            let (waited, evicted) = wait_for_writers(&pool, opts, &me)?;
            report.writers_waited = waited;
            report.writers_evicted = evicted;
            failpoint::pause("gc-after-wait");

            // 4. Mark again: their manifests are visible now. A condemned
            //    pack that is live enough again (a running backup's own
            //    packs, published meanwhile) stays.
            // Packs deleted meanwhile (a repair moved a damaged one aside)
            // neither own chunks nor need deleting.
            let still: std::collections::HashSet<String> =
                pool.list(FileKind::Pack)?.into_iter().collect();
            packs.retain(|p, _| still.contains(&p.to_hex()));
            condemned.retain(|p| packs.contains_key(p));
            let (_, live2) = mark(
                &pool,
                &index,
                &opts.cancel,
                &scratch,
                Some(&live),
                &mut known_snapshots,
                &mut pages,
            )?;
            live = live2;
            let again = condemn(&mut packs, &tables, &live, opts.repack_below, &opts.cancel)?;
            condemned.retain(|p| again.contains(p));
        }
        count_condemned(&mut report, &packs, &condemned);

        // 5. Plan: live blobs owned by condemned packs are copied (in pack
        //    order); every entry of a pack that stays goes to the new
        //    segment.
        //    A live extent page stored more than once keeps its intact
        //    copies only (below).
        let mut copies = ExternalSorter::new(&scratch, "copies", sort_budget(), false);
        let mut segment = ExternalSorter::new(&scratch, "segment", sort_budget(), false);
        let mut codec = BlobCodec::new(Compression::None);
        let mut scratch_blob = Vec::new();
        let mut intact = Vec::new();
        let pages = pages.finish()?;
        let mut pages = pages.cursor()?;
        for_each_chunk(&tables, &live, &packs, &opts.cancel, |group, is_live| {
            let group = if is_live && group.len() > 1 && pages.contains(&group[0].id)? {
                let damaged =
                    intact_copies(&*pool, &mut codec, &mut scratch_blob, group, &mut intact)?;
                if intact.is_empty() {
                    // None intact (mark read the page, so a copy was
                    // intact then): the index stays as it was for this
                    // page; verify names it, repair deals with it.
                    group
                } else {
                    report.page_copies_damaged += damaged;
                    &intact[..]
                }
            } else {
                group
            };
            if is_live {
                if let Some(o) = owner(group, &packs).filter(|o| condemned.contains(&o.pack)) {
                    copies.push(CopyRecord {
                        pack: o.pack,
                        offset: o.offset,
                        length: o.length,
                        raw_length: o.raw_length,
                        id: o.id,
                    })?;
                }
            }
            for r in group.iter().filter(|r| !condemned.contains(&r.pack)) {
                segment.push(EntryRecord::new(r.id, r.pack, r.offset, r.length))?;
            }
            Ok(())
        })?;
        drop(tables);
        let copies = copies.finish()?;
        let mut covered: Vec<PackId> = packs
            .keys()
            .filter(|p| !condemned.contains(p))
            .copied()
            .collect();

        // 6. Copy what is live out of condemned packs, verified.
        let mut writer: Option<PackWriter> = None;
        let finish_pack = |w: PackWriter,
                           report: &mut GcReport,
                           segment: &mut ExternalSorter<'_, EntryRecord>,
                           covered: &mut Vec<PackId>|
         -> Result<()> {
            let (id, entries, size) = w.finish()?;
            for e in &entries {
                segment.push(EntryRecord::new(e.id, id, e.offset, e.length))?;
            }
            covered.push(id);
            report.packs_written += 1;
            report.bytes_written += size;
            Ok(())
        };
        for c in copies.iter()? {
            let c = c?;
            opts.cancel.check()?;
            let blob = pool.read_range(
                FileKind::Pack,
                &c.pack.to_hex(),
                c.offset,
                c.length as usize,
            )?;
            codec
                .decode_verified(&blob, &c.id, &mut scratch_blob)
                .map_err(|err| {
                    Error::corrupt(format!("pack {} (blob of chunk {})", c.pack, c.id), err)
                })?;
            let w = match &mut writer {
                Some(w) => w,
                None => writer.insert(PackWriter::create(&*pool)?),
            };
            w.add(c.id, c.raw_length, &blob)?;
            report.blobs_copied += 1;
            if w.stored_bytes() >= REPACK_PACK_TARGET {
                if let Some(w) = writer.take() {
                    finish_pack(w, &mut report, &mut segment, &mut covered)?;
                }
            }
        }
        if let Some(w) = writer.take() {
            finish_pack(w, &mut report, &mut segment, &mut covered)?;
        }
        drop(copies);

        // 7. One segment for every pack that stays: the tables read above,
        //    the new packs, and whatever segments others wrote meanwhile
        //    (minus condemned packs).
        let segments_now = pool.list(FileKind::Index)?;
        for name in &segments_now {
            if old_segments.contains(name) {
                continue;
            }
            let data = match pool.read(FileKind::Index, name) {
                Ok(d) => d,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            let seg = Segment::decode(data)
                .map_err(|e| Error::corrupt(format!("index segment {name}"), e))?;
            covered.extend(seg.packs().iter().filter(|p| !condemned.contains(p)));
            for (id, loc) in seg.iter() {
                if !condemned.contains(&loc.pack) {
                    segment.push(EntryRecord::new(id, loc.pack, loc.offset, loc.length))?;
                }
            }
        }
        opts.cancel.check()?;
        let segment = segment.finish()?;
        let segment_bytes_before: u64 = segments_now
            .iter()
            .filter_map(|n| pool.size(FileKind::Index, n).ok())
            .sum();
        self.still_in_charge(lease.as_ref(), _notice.as_ref())?;
        let (new_segment, _, new_segment_len) = write_sorted_segment(&*pool, &covered, &segment)?;
        drop(segment);
        report.segments_after = 1;
        failpoint::pause("gc-before-delete");

        // 8. Delete: old segments first (no segment may name a deleted
        //    pack), then the condemned packs. The notice goes last (guard).
        self.still_in_charge(lease.as_ref(), _notice.as_ref())?;
        let new_name = new_segment.to_hex();
        for name in segments_now.iter().filter(|n| **n != new_name) {
            match pool.delete(FileKind::Index, name) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        for p in &condemned {
            match pool.delete(FileKind::Pack, &p.to_hex()) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        self.delete_stale_notices(&stale_notices);
        report.bytes_reclaimed = report.bytes_deleted as i64 - report.bytes_written as i64
            + segment_bytes_before as i64
            - new_segment_len as i64;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// `Err` unless this collection still holds its lease and its notice:
    /// a collection frozen past its expiry may have been taken for dead,
    /// and must not write or delete on the strength of an old mark.
    fn still_in_charge(
        &self,
        lease: Option<&WriterLease>,
        notice: Option<&NoticeGuard<'_>>,
    ) -> Result<()> {
        if let Some(lease) = lease {
            lease.ensure_held()?;
        }
        if let Some(n) = notice {
            match self.pool().size(FileKind::Sweep, &n.name) {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {
                    return Err(Error::PoolBusy(format!(
                        "this collection's sweep notice {} was removed; nothing more was deleted",
                        n.name
                    )))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sweep notices of other collections: a recent one means another
    /// collection is running (refused); older ones were left by a killed
    /// collection and are returned to be deleted once this one is done.
    fn other_sweeps(&self, opts: &GcOptions) -> Result<Vec<String>> {
        let mut stale = Vec::new();
        let notices = self.pool().list(FileKind::Sweep)?;
        if notices.is_empty() {
            return Ok(stale);
        }
        let leases = list_leases(self.pool())?;
        for name in notices {
            let writer = SweepNotice::writer_of(&name).unwrap_or_default();
            let alive = leases
                .iter()
                .any(|l| l.writer == writer && l.age() <= l.grace(opts.lease_expiry));
            if alive {
                return Err(Error::PoolBusy(format!(
                    "another garbage collection is running (sweep notice {name})"
                )));
            }
            stale.push(name);
        }
        Ok(stale)
    }

    fn delete_stale_notices(&self, names: &[String]) {
        for name in names {
            let _ = self.pool().delete(FileKind::Sweep, name);
        }
    }
}

fn count_condemned(
    report: &mut GcReport,
    packs: &BTreeMap<PackId, PackUse>,
    condemned: &BTreeSet<PackId>,
) {
    for p in condemned {
        if packs[p].live_bytes == 0 {
            report.packs_deleted += 1;
        } else {
            report.packs_repacked += 1;
        }
        report.bytes_deleted += packs[p].size;
    }
}

/// Waits until every writer holding a lease now has finished, evicting
/// those whose lease this collection saw unrenewed for longer than its
/// grace (measured on this process's own clock, so a writer's clock skew
/// does not matter). Returns (writers waited for, writers evicted).
fn wait_for_writers(pool: &DynPool, opts: &GcOptions, me: &str) -> Result<(usize, usize)> {
    let started = Instant::now();
    let mut waiting: BTreeSet<String> = list_leases(pool)?
        .into_iter()
        .map(|l| l.writer)
        .filter(|w| w != me)
        .collect();
    let count = waiting.len();
    let mut evicted = 0;
    // When this collection first saw each lease name.
    let mut first_seen: HashMap<String, Instant> = HashMap::new();
    loop {
        let leases = list_leases(pool)?;
        for l in &leases {
            first_seen.entry(l.name()).or_insert_with(Instant::now);
        }
        waiting.retain(|w| leases.iter().any(|l| &l.writer == w));
        for w in waiting.clone() {
            // The newest lease of this writer (a renewal may leave two).
            let Some(newest) = leases.iter().filter(|l| l.writer == w).max() else {
                continue;
            };
            let seen = first_seen
                .get(&newest.name())
                .map_or(Duration::ZERO, |t| t.elapsed());
            if seen <= newest.grace(opts.lease_expiry) {
                continue;
            }
            match pool.delete(FileKind::Lease, &newest.name()) {
                Ok(()) => {}
                // Renewed meanwhile: alive after all.
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            }
            // A renewal racing the delete (on S3 a delete of a missing key
            // succeeds) leaves a newer lease: then the writer is alive.
            let renewed = list_leases(pool)?
                .iter()
                .any(|l| l.writer == w && l.heartbeat > newest.heartbeat);
            if renewed {
                continue;
            }
            for l in leases.iter().filter(|l| l.writer == w) {
                let _ = pool.delete(FileKind::Lease, &l.name());
            }
            waiting.remove(&w);
            evicted += 1;
        }
        if waiting.is_empty() {
            return Ok((count, evicted));
        }
        opts.cancel.check()?;
        if opts.max_wait.is_some_and(|m| started.elapsed() > m) {
            return Err(Error::PoolBusy(format!(
                "{} backups still running after {:?}; nothing was deleted",
                waiting.len(),
                opts.max_wait.unwrap_or_default()
            )));
        }
        std::thread::sleep(opts.poll);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::external_sort::Record;

    fn sample(i: u8) -> TableRecord {
        TableRecord {
            id: ChunkId([i ^ 0x5a; 32]),
            pack: PackId([i; 16]),
            offset: 0x0102_0304_0506_0708 + i as u64,
            length: 0x1112_1314 + i as u32,
            raw_length: 0x2122_2324 - i as u32,
        }
    }

    #[test]
    fn records_round_trip_through_their_encoding() {
        let mut buf = [0u8; 64];
        for i in 0..=255u8 {
            let t = sample(i);
            t.put(&mut buf);
            assert_eq!(TableRecord::get(&buf), t);
            let c = CopyRecord {
                pack: t.pack,
                offset: t.offset,
                length: t.length,
                raw_length: t.raw_length,
                id: t.id,
            };
            c.put(&mut buf);
            assert_eq!(CopyRecord::get(&buf), c);
        }
    }

    #[test]
    fn copies_sort_by_pack_then_offset_and_tables_by_chunk_then_pack() {
        let a = sample(1);
        let mut b = sample(2);
        b.id = ChunkId([0; 32]); // smaller id, larger pack
        assert!(b < a, "tables: by chunk id first");
        let copy = |t: TableRecord| CopyRecord {
            pack: t.pack,
            offset: t.offset,
            length: t.length,
            raw_length: t.raw_length,
            id: t.id,
        };
        assert!(copy(a) < copy(b), "copies: by pack first");
    }
}
