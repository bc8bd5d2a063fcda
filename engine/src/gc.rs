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
//!    condemned packs, then the notice.
//!
//! Every listing and read before the first deletion must succeed, or the
//! collection stops having deleted nothing. Atime is never used.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::failpoint;
use crate::id::{ChunkId, PackId};
use crate::kind::FileKind;
use crate::lease::{delete_retrying, list_leases, SweepNotice, WriterLease, LEASE_RENEW_INTERVAL};
use crate::progress::CancelToken;
use crate::repo::Repository;
use crate::store::blob::{BlobCodec, Compression};
use crate::store::index::{Segment, SegmentBuilder};
use crate::store::manifest::{list_snapshot_ids, read_snapshot};
use crate::store::pack::{read_pack_table, PackEntry, PackWriter};
use crate::store::pool::DynPool;

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
        )
    }
}

/// A pack as the mark saw it.
struct PackUse {
    size: u64,
    entries: Vec<PackEntry>,
    live_bytes: u64,
    blob_bytes: u64,
}

/// Sorted, distinct ids of every chunk the manifests reference, and the
/// number of manifests. A manifest deleted since the listing is skipped;
/// one that cannot be read stops the collection.
fn mark(pool: &DynPool, cancel: &CancelToken) -> Result<(usize, Vec<ChunkId>)> {
    let mut live = Vec::new();
    let mut snapshots = 0;
    for id in list_snapshot_ids(&**pool)? {
        cancel.check()?;
        let snapshot = match read_snapshot(&**pool, &id) {
            Ok(s) => s,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        snapshots += 1;
        for disk in &snapshot.disks {
            live.extend(disk.extents.iter().filter_map(|e| e.chunk));
        }
        // Keep memory near the number of distinct chunks.
        if live.len() > 1 << 20 {
            live.sort_unstable();
            live.dedup();
        }
    }
    live.sort_unstable();
    live.dedup();
    Ok((snapshots, live))
}

fn is_live(live: &[ChunkId], id: &ChunkId) -> bool {
    live.binary_search(id).is_ok()
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
        let (snapshots, live1) = mark(&pool, &opts.cancel)?;
        let old_segments = pool.list(FileKind::Index)?;
        let mut packs: BTreeMap<PackId, PackUse> = BTreeMap::new();
        let sizes: HashMap<String, u64> = match pool.list_sizes(FileKind::Pack)? {
            Some(s) => s.into_iter().collect(),
            None => HashMap::new(),
        };
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
            let blob_bytes = entries.iter().map(|e| e.length as u64).sum();
            packs.insert(
                pack,
                PackUse {
                    size,
                    entries,
                    live_bytes: 0,
                    blob_bytes,
                },
            );
        }
        let mut report = GcReport {
            dry_run: opts.dry_run,
            snapshots,
            live_chunks: live1.len(),
            packs_before: packs.len(),
            bytes_before: packs.values().map(|u| u.size).sum(),
            segments_before: old_segments.len(),
            ..GcReport::default()
        };
        let (condemned, mut owners) = condemn(&mut packs, &live1, opts.repack_below);
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
            let (_, live2) = mark(&pool, &opts.cancel)?;
            live = merge_sorted(&live, &live2);
            let (again, now_owners) = condemn(&mut packs, &live, opts.repack_below);
            condemned.retain(|p| again.contains(p));
            owners = now_owners;
        }
        count_condemned(&mut report, &packs, &condemned);

        // 5. Copy what is live out of condemned packs.
        let mut builder = SegmentBuilder::new();
        let mut codec = BlobCodec::new(Compression::None);
        let mut scratch = Vec::new();
        let mut writer: Option<PackWriter> = None;
        for p in &condemned {
            let mut copied = BTreeSet::new();
            let owned = packs[p]
                .entries
                .iter()
                .filter(|e| owner_of(&owners, &e.id) == Some(*p) && copied.insert(e.id));
            for e in owned {
                opts.cancel.check()?;
                let blob =
                    pool.read_range(FileKind::Pack, &p.to_hex(), e.offset, e.length as usize)?;
                codec
                    .decode_verified(&blob, &e.id, &mut scratch)
                    .map_err(|err| {
                        Error::corrupt(format!("pack {p} (blob of chunk {})", e.id), err)
                    })?;
                let w = match &mut writer {
                    Some(w) => w,
                    None => writer.insert(PackWriter::create(&*pool)?),
                };
                w.add(e.id, e.raw_length, &blob)?;
                report.blobs_copied += 1;
                if w.stored_bytes() >= REPACK_PACK_TARGET {
                    if let Some(w) = writer.take() {
                        let (id, entries, size) = w.finish()?;
                        builder.add_entries(id, &entries);
                        report.packs_written += 1;
                        report.bytes_written += size;
                    }
                }
            }
        }
        if let Some(w) = writer.take() {
            let (id, entries, size) = w.finish()?;
            builder.add_entries(id, &entries);
            report.packs_written += 1;
            report.bytes_written += size;
        }

        // One segment for every pack that stays: the tables read above, and
        // whatever segments others wrote meanwhile (minus condemned packs).
        for (p, u) in &packs {
            if !condemned.contains(p) {
                builder.add_entries(*p, &u.entries);
            }
        }
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
            add_segment_without(&mut builder, &seg, &condemned);
        }
        opts.cancel.check()?;
        let segment_bytes_before: u64 = segments_now
            .iter()
            .filter_map(|n| pool.size(FileKind::Index, n).ok())
            .sum();
        self.still_in_charge(lease.as_ref(), _notice.as_ref())?;
        let (new_segment, _, new_segment_len) = builder.write(&*pool)?;
        report.segments_after = 1;
        failpoint::pause("gc-before-delete");

        // 6. Delete: old segments first (no segment may name a deleted
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

/// Which pack keeps each live chunk: when a chunk is stored more than
/// once (two writers stored it at once, or a collection was interrupted
/// after copying it), the copy in the pack with the most live bytes is
/// kept and the others count as garbage. Sorted by chunk id.
type Owners = Vec<(ChunkId, PackId)>;

fn owner_of(owners: &Owners, id: &ChunkId) -> Option<PackId> {
    owners
        .binary_search_by(|(c, _)| c.cmp(id))
        .ok()
        .map(|i| owners[i].1)
}

/// Packs with no live blob, or a live share below `repack_below`, by
/// `live`; each pack's live bytes are recounted, a chunk counting only in
/// the pack that owns it.
fn condemn(
    packs: &mut BTreeMap<PackId, PackUse>,
    live: &[ChunkId],
    repack_below: f64,
) -> (BTreeSet<PackId>, Owners) {
    let mut candidates: Vec<(ChunkId, std::cmp::Reverse<u64>, PackId)> = Vec::new();
    for (p, u) in packs.iter() {
        let raw: u64 = u
            .entries
            .iter()
            .filter(|e| is_live(live, &e.id))
            .map(|e| e.length as u64)
            .sum();
        for e in u.entries.iter().filter(|e| is_live(live, &e.id)) {
            candidates.push((e.id, std::cmp::Reverse(raw), *p));
        }
    }
    candidates.sort_unstable();
    candidates.dedup_by(|a, b| a.0 == b.0);
    let owners: Owners = candidates.into_iter().map(|(c, _, p)| (c, p)).collect();
    let mut out = BTreeSet::new();
    for (p, u) in packs.iter_mut() {
        let mut counted = BTreeSet::new();
        u.live_bytes = 0;
        for e in &u.entries {
            if owner_of(&owners, &e.id) == Some(*p) && counted.insert(e.id) {
                u.live_bytes += e.length as u64;
            }
        }
        if u.live_bytes == 0 || (u.live_bytes as f64) < repack_below * u.blob_bytes as f64 {
            out.insert(*p);
        }
    }
    (out, owners)
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

fn add_segment_without(builder: &mut SegmentBuilder, seg: &Segment, condemned: &BTreeSet<PackId>) {
    let mut by_pack: BTreeMap<PackId, Vec<PackEntry>> = BTreeMap::new();
    for p in seg.packs() {
        if !condemned.contains(p) {
            by_pack.entry(*p).or_default();
        }
    }
    for (id, loc) in seg.iter() {
        if let Some(v) = by_pack.get_mut(&loc.pack) {
            v.push(PackEntry {
                id,
                offset: loc.offset,
                length: loc.length,
                raw_length: 0,
            });
        }
    }
    for (p, entries) in by_pack {
        builder.add_entries(p, &entries);
    }
}

fn merge_sorted(a: &[ChunkId], b: &[ChunkId]) -> Vec<ChunkId> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    out.extend_from_slice(a);
    out.extend_from_slice(b);
    out.sort_unstable();
    out.dedup();
    out
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
