//! [`Repository`]: the entry point. A pool opened with its configuration,
//! with one method per job (backup, restore, verify, list, resolve, repair,
//! CBT preparation). The dedup index is loaded on first use, and a handle
//! stays correct for as long as it lives: it picks up index segments and
//! manifests that other handles or processes write.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;

use crate::cbt::{prepare_vm, CbtDisk, CbtPolicy, PreparedVm};
use crate::chunker::ChunkingParams;
use crate::error::{Error, Result};
use crate::id::{IdScheme, PoolId, SnapshotId};
use crate::kind::FileKind;
use crate::lease::{condemned_packs, delete_retrying, WriterLease};
use crate::pipeline::backup::{self, BackupOptions, BackupStats, Excluded};
use crate::pipeline::input::{BackupDisk, ChangedBlocks, DiskInput};
use crate::pipeline::restore::{self, MakeTarget, RestoreOptions, RestoreStats};
use crate::pipeline::verify::{self, VerifyOptions, VerifyReport};
use crate::random::random_16;
use crate::snapshots::{PoolInfo, SnapshotInfo, SnapshotList, SnapshotSelector};
use crate::store::catalog;
use crate::store::config::PoolConfig;
use crate::store::format::{CONFIG_NAME, PROP_SOURCE_STATE};
use crate::store::index::{rebuild, Index, RebuildReport};
use crate::store::manifest::{
    list_snapshot_ids, read_manifest, read_snapshot, DiskManifest, Extent, Snapshot,
};

use crate::store::pool::DynPool;

/// Manifests read once each, and per disk the place of its parent among
/// them (see `Repository::parents_of`).
type LoadedParents = (Vec<(SnapshotId, Snapshot)>, Vec<Option<usize>>);

/// An open pool: its configuration, its (lazily loaded) index, and every
/// job as a method.
///
/// ```
/// # fn main() -> cairn_engine::Result<()> {
/// use std::sync::Arc;
/// use cairn_engine::{BackupDisk, BackupOptions, MemorySource, Repository, SnapshotSelector};
/// # let pool: cairn_engine::DynPool = Arc::new(cairn_pools::MemoryPool::new());
/// let repo = Repository::open_or_init(pool)?;
/// let disk = BackupDisk::image("vda", MemorySource::new("vda", vec![1u8; 1 << 20]));
/// let stats = repo.backup(vec![disk], &BackupOptions::new("web01"))?;
/// let latest = repo.resolve(&SnapshotSelector::latest_of("web01"))?;
/// assert_eq!(latest, stats.snapshot);
/// # Ok(()) }
/// ```
pub struct Repository {
    pool: DynPool,
    config: PoolConfig,
    index: Mutex<Option<Arc<Index>>>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.pool.location())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Repository {
    /// Writes a fresh configuration into an empty pool. Fails with
    /// [`Error::AlreadyExists`] if the pool has one.
    pub fn init(pool: DynPool) -> Result<PoolConfig> {
        let now = humantime::parse_rfc3339(
            &humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        )
        .unwrap_or_else(|_| SystemTime::now());
        let config = PoolConfig::new(PoolId(random_16()?), now);
        pool.write(FileKind::Config, CONFIG_NAME, config.encode().as_bytes())?;
        Ok(config)
    }

    /// Initialises an empty pool and opens it.
    pub fn create(pool: DynPool) -> Result<Self> {
        Self::init(pool.clone())?;
        Self::open(pool)
    }

    /// Opens an initialised pool, or initialises it first if it has no
    /// configuration.
    pub fn open_or_init(pool: DynPool) -> Result<Self> {
        match Self::open(pool.clone()) {
            Err(Error::NotInitialized { .. }) => match Self::init(pool.clone()) {
                // Another process initialised it meanwhile: open theirs.
                Ok(_) | Err(Error::AlreadyExists { .. }) => Self::open(pool),
                Err(e) => Err(e),
            },
            other => other,
        }
    }

    /// Opens an initialised pool: reads and checks its configuration. The
    /// index is loaded when a job first needs it.
    pub fn open(pool: DynPool) -> Result<Self> {
        let raw = match pool.read(FileKind::Config, CONFIG_NAME) {
            Ok(raw) => raw,
            Err(e) if e.is_not_found() => {
                return Err(Error::NotInitialized {
                    location: pool.location(),
                })
            }
            Err(e) => return Err(e),
        };
        let config = PoolConfig::decode(&raw)
            .map_err(|e| Error::corrupt(format!("pool config of {}", pool.location()), e))?;
        if config.id_scheme != IdScheme::Blake3 {
            return Err(Error::Unsupported(format!(
                "chunk id scheme {}",
                config.id_scheme.name()
            )));
        }
        Ok(Repository {
            pool,
            config,
            index: Mutex::new(None),
        })
    }

    /// The pool.
    pub fn pool(&self) -> &DynPool {
        &self.pool
    }

    /// The pool's configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The dedup index, loaded on first use.
    pub fn index(&self) -> Result<Arc<Index>> {
        let mut slot = self.index.lock();
        if let Some(index) = &*slot {
            return Ok(index.clone());
        }
        let index = Arc::new(Index::load(&*self.pool)?);
        *slot = Some(index.clone());
        Ok(index)
    }

    /// Picks up index segments and packs that others wrote since the index
    /// was loaded (a no-op before it is). Jobs call it themselves where it
    /// matters (before a backup, before a verify, on a lookup miss during a
    /// restore); manifests are always listed afresh.
    pub fn refresh(&self) -> Result<()> {
        let loaded = self.index.lock().clone();
        if let Some(index) = loaded {
            index.refresh(&*self.pool)?;
        }
        Ok(())
    }

    /// Ids of every snapshot manifest in the pool, sorted.
    pub fn snapshot_ids(&self) -> Result<Vec<SnapshotId>> {
        list_snapshot_ids(&*self.pool)
    }

    /// Reads, checks (content hash = name) and decodes one manifest.
    pub fn load_snapshot(&self, id: &SnapshotId) -> Result<Snapshot> {
        read_snapshot(&*self.pool, id).map_err(|e| match e {
            Error::NotFound { .. } => Error::SnapshotNotFound(id.to_hex()),
            e => e,
        })
    }

    /// Calls `f` with every extent of disk `disk` of snapshot `id` (loaded
    /// as `snapshot`), in disk order. A version 2 manifest's extent pages
    /// are read and verified one at a time, so memory does not grow with
    /// the disk.
    pub fn for_each_extent(
        &self,
        id: &SnapshotId,
        snapshot: &Snapshot,
        disk: &DiskManifest,
        f: &mut dyn FnMut(Extent),
    ) -> Result<()> {
        let index = self.index()?;
        let store = crate::pipeline::extents::Store {
            pool: &*self.pool,
            index: &index,
        };
        for e in
            crate::pipeline::extents::DiskExtents::new(Some(&store), *id, snapshot.chunking, disk)
        {
            f(e?);
        }
        Ok(())
    }

    /// [`load_snapshot`](Self::load_snapshot) with every disk's extents in
    /// `extents` (a version 2 manifest's pages read and expanded; `pages`
    /// left empty). Holds every extent in memory: for inspection and
    /// tests; the pipelines stream them instead.
    pub fn load_snapshot_with_extents(&self, id: &SnapshotId) -> Result<Snapshot> {
        let mut snapshot = self.load_snapshot(id)?;
        for i in 0..snapshot.disks.len() {
            if !snapshot.disks[i].is_paged() {
                continue;
            }
            let mut extents = Vec::new();
            self.for_each_extent(id, &snapshot, &snapshot.disks[i], &mut |e| extents.push(e))?;
            let disk = &mut snapshot.disks[i];
            disk.extents = extents;
            disk.pages.clear();
        }
        Ok(snapshot)
    }

    /// Every snapshot, oldest first, without their extent lists; manifests
    /// that cannot be read are reported beside them, never failing the list.
    ///
    /// ```
    /// # fn main() -> cairn_engine::Result<()> {
    /// # use std::sync::Arc;
    /// # use cairn_engine::*;
    /// # let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new()))?;
    /// # let image: Vec<u8> = (0..1u32 << 20).map(|i| (i % 249) as u8).collect();
    /// # let disk = BackupDisk::image("vda", MemorySource::new("vda", image.clone()));
    /// # let stats = repo.backup(vec![disk], &BackupOptions::new("web01"))?;
    /// let list = repo.snapshots()?;
    /// assert_eq!(list.snapshots.len(), 1);
    /// assert_eq!(list.snapshots[0].vm, "web01");
    /// assert!(list.damaged.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn snapshots(&self) -> Result<SnapshotList> {
        let ids = self.snapshot_ids()?;
        let (mut known, catalogs, stale) = self.read_catalog(&ids)?;
        let mut list = SnapshotList::default();
        let mut entries: Vec<catalog::CatalogEntry> = Vec::with_capacity(ids.len());
        let mut added = 0;
        for id in ids {
            if let Some(s) = known.remove(&id) {
                entries.push((id, s.clone()));
                list.snapshots.push(SnapshotInfo::new(id, s));
                continue;
            }
            if let Some(s) = self.summarise(id, &mut list)? {
                added += 1;
                entries.push((id, s.clone()));
                list.snapshots.push(SnapshotInfo::new(id, s));
            }
        }
        if added > 0 || stale || catalogs.len() > 1 {
            // Best effort: a listing never fails because the catalog could
            // not be rewritten (a read-only pool, a full disk).
            let _ = self.rewrite_catalog(&entries, &catalogs);
        }
        self.finish_listing(list)
    }

    /// Reads and hash-checks manifest `id` without its extent lists.
    /// `None`: deleted since the listing (forgotten or pruned), or damaged
    /// (then recorded in `list.damaged`). A read that may succeed later (a
    /// timeout …) is an error: `latest` must not silently pick an older
    /// snapshot.
    fn summarise(&self, id: SnapshotId, list: &mut SnapshotList) -> Result<Option<Snapshot>> {
        let summary = read_manifest(&*self.pool, &id).and_then(|bytes| {
            Snapshot::decode_without_extents(&bytes)
                .map_err(|e| Error::corrupt(format!("snapshot manifest {id}"), e))
        });
        match summary {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) if e.is_damage() => {
                list.damaged.push((id, e));
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Reads every catalog object: the summaries of listed manifests, the
    /// names read (to be replaced), and whether any entry named a manifest
    /// no longer listed. A damaged catalog object is ignored (and replaced).
    #[allow(clippy::type_complexity)]
    fn read_catalog(
        &self,
        ids: &[SnapshotId],
    ) -> Result<(BTreeMap<SnapshotId, Snapshot>, Vec<String>, bool)> {
        let mut known = BTreeMap::new();
        let mut names = Vec::new();
        let mut stale = false;
        for name in self.pool.list(FileKind::Catalog)? {
            let bytes = match self.pool.read(FileKind::Catalog, &name) {
                Ok(b) => b,
                Err(e) if e.is_not_found() => continue,
                Err(e) if e.is_damage() => {
                    names.push(name);
                    continue;
                }
                Err(e) => return Err(e),
            };
            match catalog::decode(&bytes) {
                Ok(entries) => {
                    for (id, s) in entries {
                        if ids.binary_search(&id).is_ok() {
                            known.insert(id, s);
                        } else {
                            stale = true;
                        }
                    }
                }
                Err(_) => stale = true,
            }
            names.push(name);
        }
        Ok((known, names, stale))
    }

    /// Writes one catalog object holding `entries`, then deletes `old`.
    fn rewrite_catalog(&self, entries: &[catalog::CatalogEntry], old: &[String]) -> Result<()> {
        let name = crate::id::hex(&random_16()?);
        self.pool
            .write(FileKind::Catalog, &name, &catalog::encode(entries))?;
        for n in old {
            match self.pool.delete(FileKind::Catalog, n) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The newest snapshot of `vm` that holds a disk named `disk`, decoded
    /// in full: the parent of that disk's next incremental. Manifests that
    /// fail to load are passed over (an older parent only makes CBT fall
    /// back, never wrong).
    pub fn latest_with_disk(&self, vm: &str, disk: &str) -> Result<Option<(SnapshotId, Snapshot)>> {
        Ok(self.latest_with_disks(vm, &[disk])?.pop().flatten())
    }

    /// [`latest_with_disk`](Self::latest_with_disk) for each of `disks` of
    /// one VM, in their order: one listing of the pool, and each manifest
    /// read and decoded once however many of the disks it is the parent of
    /// (usually all of them).
    pub fn latest_with_disks(
        &self,
        vm: &str,
        disks: &[&str],
    ) -> Result<Vec<Option<(SnapshotId, Snapshot)>>> {
        let (loaded, parents) = self.parents_of(vm, disks)?;
        Ok(parents
            .into_iter()
            .map(|p| p.map(|i| loaded[i].clone()))
            .collect())
    }

    /// The manifests [`latest_with_disks`](Self::latest_with_disks) reads,
    /// each once, and per disk the place of its parent among them: one
    /// copy of each manifest, however many disks it is the parent of.
    fn parents_of(&self, vm: &str, disks: &[&str]) -> Result<LoadedParents> {
        let list = self.snapshots()?;
        let mut loaded: Vec<(SnapshotId, Snapshot)> = Vec::new();
        let mut parents = Vec::with_capacity(disks.len());
        for disk in disks {
            let newest = list
                .snapshots
                .iter()
                .rev()
                .filter(|s| s.vm == vm && s.disks.iter().any(|d| d.name == *disk));
            let mut parent = None;
            for info in newest {
                if let Some(i) = loaded.iter().position(|(id, _)| *id == info.id) {
                    parent = Some(i);
                    break;
                }
                match self.load_snapshot(&info.id) {
                    Ok(s) => {
                        loaded.push((info.id, s));
                        parent = Some(loaded.len() - 1);
                        break;
                    }
                    Err(e) if e.is_damage() || e.is_not_found() => continue,
                    Err(e) => return Err(e),
                }
            }
            parents.push(parent);
        }
        Ok((loaded, parents))
    }

    /// The snapshot a selector names. `latest` considers the snapshots
    /// whose manifests can be read; without a VM it must be unambiguous.
    ///
    /// ```
    /// # fn main() -> cairn_engine::Result<()> {
    /// # use std::sync::Arc;
    /// # use cairn_engine::*;
    /// # let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new()))?;
    /// # let image: Vec<u8> = (0..1u32 << 20).map(|i| (i % 249) as u8).collect();
    /// # let disk = BackupDisk::image("vda", MemorySource::new("vda", image.clone()));
    /// # let stats = repo.backup(vec![disk], &BackupOptions::new("web01"))?;
    /// let prefix = &stats.snapshot.to_hex()[..8];
    /// assert_eq!(repo.resolve(&prefix.parse()?)?, stats.snapshot);
    /// assert_eq!(repo.resolve(&SnapshotSelector::latest_of("web01"))?, stats.snapshot);
    /// assert!(repo.resolve(&SnapshotSelector::latest_of("db01")).unwrap_err().is_not_found());
    /// # Ok(()) }
    /// ```
    pub fn resolve(&self, selector: &SnapshotSelector) -> Result<SnapshotId> {
        match selector {
            SnapshotSelector::Id(id) => match self.pool.size(FileKind::Snapshot, &id.to_hex()) {
                Ok(_) => Ok(*id),
                Err(e) if e.is_not_found() => Err(Error::SnapshotNotFound(id.to_hex())),
                Err(e) => Err(e),
            },
            SnapshotSelector::Prefix(prefix) => {
                let matches: Vec<SnapshotId> = self
                    .snapshot_ids()?
                    .into_iter()
                    .filter(|id| id.to_hex().starts_with(prefix.as_str()))
                    .collect();
                match matches.as_slice() {
                    [] => Err(Error::SnapshotNotFound(selector.to_string())),
                    [one] => Ok(*one),
                    many => Err(Error::AmbiguousSnapshot {
                        selector: selector.to_string(),
                        matches: format!(
                            "{} snapshots ({}{})",
                            many.len(),
                            many.iter()
                                .take(5)
                                .map(|id| id.to_hex())
                                .collect::<Vec<_>>()
                                .join(", "),
                            if many.len() > 5 { ", …" } else { "" }
                        ),
                    }),
                }
            }
            SnapshotSelector::Latest { vm } => self.resolve_latest(selector, vm.as_deref()),
        }
    }

    fn resolve_latest(&self, selector: &SnapshotSelector, vm: Option<&str>) -> Result<SnapshotId> {
        let list = self.snapshots()?;
        let candidates: Vec<&SnapshotInfo> = list
            .snapshots
            .iter()
            .filter(|s| vm.is_none_or(|v| s.vm == v))
            .collect();
        let vms: BTreeSet<&str> = candidates.iter().map(|s| s.vm.as_str()).collect();
        if vm.is_none() && vms.len() > 1 {
            return Err(Error::AmbiguousSnapshot {
                selector: selector.to_string(),
                matches: format!(
                    "the latest snapshots of {} VMs ({})",
                    vms.len(),
                    vms.into_iter().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        // The catalog lists a manifest damaged after it was summarised as
        // healthy: the newest one that still reads (hash-checked) wins.
        for s in candidates.iter().rev() {
            match read_manifest(&*self.pool, &s.id) {
                Ok(_) => return Ok(s.id),
                Err(e) if e.is_damage() || e.is_not_found() => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::SnapshotNotFound(selector.to_string()))
    }

    /// Sorts a listing by (time, id) and flags the snapshots a repair
    /// marked damaged.
    fn finish_listing(&self, mut list: SnapshotList) -> Result<SnapshotList> {
        list.snapshots
            .sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
        let marks = self.damage_marks()?;
        for s in &mut list.snapshots {
            s.damaged = marks.contains(&s.id);
        }
        Ok(list)
    }

    /// [`snapshots`](Self::snapshots) from the manifests themselves (each
    /// read and hash-checked; the catalog is not trusted): for decisions
    /// that delete, like prune.
    pub fn snapshots_checked(&self) -> Result<SnapshotList> {
        let mut list = SnapshotList::default();
        for id in self.snapshot_ids()? {
            if let Some(s) = self.summarise(id, &mut list)? {
                list.snapshots.push(SnapshotInfo::new(id, s));
            }
        }
        self.finish_listing(list)
    }

    /// Backs up `disks` as one snapshot. The index is refreshed first, so
    /// chunks that other writers stored since it was loaded are reused.
    ///
    /// ```
    /// # fn main() -> cairn_engine::Result<()> {
    /// # use std::sync::Arc;
    /// use cairn_engine::{BackupDisk, BackupOptions, Compression, MemorySource, Repository};
    /// let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new()))?;
    /// let disk = BackupDisk::image("vda", MemorySource::new("vda", vec![5u8; 1 << 20]))
    ///     .with_property("source", "example");
    /// let opts = BackupOptions::new("web01").with_compression(Compression::None);
    /// let first = repo.backup(vec![disk], &opts)?;
    /// assert_eq!(first.chunks_new, 1); // 16 equal 64 KiB chunks, stored once
    /// # Ok(()) }
    /// ```
    pub fn backup(&self, mut disks: Vec<BackupDisk>, opts: &BackupOptions) -> Result<BackupStats> {
        // The lease comes first: a garbage collection either sees it (and
        // waits for this backup) or announced its sweep before it (and this
        // backup reads the notice below and reuses nothing it condemns).
        let lease = WriterLease::acquire(&self.pool, opts.lease_renewal)?;
        let mut excluded = Excluded {
            packs: condemned_packs(&self.pool)?.into_iter().collect(),
            ..Excluded::default()
        };
        let index = self.fresh_index()?;
        // Packs the index names but the pool no longer lists (a collection
        // or repair removed them since the index was built).
        excluded.packs.extend(index.absent_packs());
        self.mark_unchanged(&mut disks, opts)?;
        // An incremental reuses its parent's chunks without looking them
        // up: re-read those the index no longer holds outside excluded
        // packs (the parent may have been pruned and collected since it
        // was read, or a collection is about to delete their pack), and
        // the spans of extent pages that cannot be read. A page found
        // damaged is stored again when its span is cut anew: the copy it
        // was read from (where this handle's index places it) is not
        // reused.
        let mut parent_pages_damaged = 0;
        for disk in &mut disks {
            if let DiskInput::Incremental { changed, .. } = &mut disk.input {
                changed.attach_pages(self.pool.clone(), index.clone());
                let reread = changed
                    .reread_unless(|c| index.lookup(c).is_some_and(|l| excluded.reusable(c, &l)))?;
                for page in reread.damaged_pages {
                    if let Some(at) = index.lookup(&page) {
                        if excluded.blobs.insert((page, at)) {
                            parent_pages_damaged += 1;
                        }
                    }
                }
            }
        }
        crate::failpoint::pause("backup-after-index");
        let resumes = backup::prepare_resume(
            self.config.pool_id.as_bytes(),
            &index,
            &excluded,
            &disks,
            opts,
        )?;
        let guard = || lease.ensure_held();
        // Sequential media: extent lists stay in the manifest (reading
        // pages would cost cartridge passes outside the sorted restore).
        let sequential;
        let opts = if opts.extent_pages && self.pool.sequential_media() {
            let mut o = opts.clone();
            o.extent_pages = false;
            sequential = o;
            &sequential
        } else {
            opts
        };
        let result = match self.pool.preferred_pack_size() {
            // The pool wants other packs and the caller kept the defaults.
            Some(size) if opts.pack_target == backup::DEFAULT_PACK_TARGET => {
                let mut opts = opts.clone();
                opts.pack_target = size;
                opts.pack_max_input = opts.pack_max_input.max(size.saturating_mul(2));
                backup::run(
                    &*self.pool,
                    &index,
                    &excluded,
                    &guard,
                    disks,
                    resumes,
                    &opts,
                )
            }
            _ => backup::run(&*self.pool, &index, &excluded, &guard, disks, resumes, opts),
        };
        let mut stats = result?;
        stats.parent_pages_damaged = parent_pages_damaged;
        crate::failpoint::pause("backup-after-manifest");
        let lease_name = lease.name();
        // Any doubt (evicted, or the check itself failed) withdraws the
        // manifest: a sweep may have removed chunks it reuses.
        if !matches!(lease.finish(), Ok(true)) {
            delete_retrying(&self.pool, FileKind::Snapshot, &stats.snapshot.to_hex());
            return Err(Error::LeaseLost { lease: lease_name });
        }
        // Best effort: the backup has succeeded whatever this finds.
        let _ = self.heal_damage_marks();
        Ok(stats)
    }

    /// Copies snapshots into `target` (another pool) without reading any
    /// disk: only the chunks `target` lacks are moved, each verified on the
    /// way, and each copied snapshot keeps its id. Resumable: a copy that
    /// was killed or failed leaves `target` consistent, and running it
    /// again moves only what had not arrived. See [`CopyOptions`].
    ///
    /// ```
    /// # fn main() -> cairn_engine::Result<()> {
    /// # use std::sync::Arc;
    /// use cairn_engine::{BackupDisk, BackupOptions, CopyOptions, MemorySource, Repository};
    /// let here = Repository::create(Arc::new(cairn_pools::MemoryPool::new()))?;
    /// let there = Repository::create(Arc::new(cairn_pools::MemoryPool::new()))?;
    /// let disk = BackupDisk::image("vda", MemorySource::new("vda", vec![7u8; 1 << 20]));
    /// let snap = here.backup(vec![disk], &BackupOptions::new("web01"))?.snapshot;
    /// let first = here.copy_to(&there, &CopyOptions::default())?;
    /// // The one distinct chunk, and the disk's extent page.
    /// assert_eq!((first.copied.as_slice(), first.chunks_copied), (&[snap][..], 2));
    /// // Nothing left to move the second time.
    /// let again = here.copy_to(&there, &CopyOptions::default())?;
    /// assert_eq!((again.present.as_slice(), again.chunks_copied), (&[snap][..], 0));
    /// # Ok(()) }
    /// ```
    ///
    /// [`CopyOptions`]: crate::CopyOptions
    pub fn copy_to(
        &self,
        target: &Repository,
        opts: &crate::copy::CopyOptions,
    ) -> Result<crate::copy::CopyStats> {
        crate::copy::copy(self, target, opts)
    }

    /// The index, refreshed; loaded afresh when a segment it holds was
    /// removed (a garbage collection compacted the index or deleted packs).
    pub(crate) fn fresh_index(&self) -> Result<Arc<Index>> {
        let index = self.index()?;
        index.refresh(&*self.pool)?;
        if index.is_stale() {
            let reloaded = Arc::new(Index::load(&*self.pool)?);
            *self.index.lock() = Some(reloaded.clone());
            return Ok(reloaded);
        }
        Ok(index)
    }

    /// Records the state of each disk read from a regular file, and turns
    /// a disk whose file is in the state its newest snapshot recorded into
    /// a reuse of that snapshot's extents (nothing read), unless
    /// `opts.reuse_unchanged` is off or the chunking changed.
    fn mark_unchanged(&self, disks: &mut [BackupDisk], opts: &BackupOptions) -> Result<()> {
        // The parents of the disks that could be unchanged, found together.
        let candidates: Vec<&str> = disks
            .iter()
            .filter(|d| matches!(&d.input, DiskInput::Image(src) if src.identity_proves_content()))
            .map(|d| d.name.as_str())
            .collect();
        let (loaded, parents) = if opts.reuse_unchanged && !candidates.is_empty() {
            self.parents_of(&opts.vm, &candidates)?
        } else {
            (Vec::new(), Vec::new())
        };
        // The candidates' parents, in the disks' order.
        let mut parents = parents.into_iter();
        for disk in disks.iter_mut() {
            let DiskInput::Image(src) = &disk.input else {
                continue;
            };
            if !src.identity_proves_content() {
                continue;
            }
            // A candidate: its parent comes next, whatever is decided below.
            let parent = parents.next().flatten();
            let Some(state) = src.identity() else {
                continue;
            };
            disk.properties
                .insert(PROP_SOURCE_STATE.to_string(), state.clone());
            if !opts.reuse_unchanged {
                continue;
            }
            let Some((parent_id, parent)) = parent.map(|i| (loaded[i].0, &loaded[i].1)) else {
                continue;
            };
            let same = parent.chunking == opts.chunking
                && parent.disks.iter().any(|d| {
                    d.name == disk.name && d.properties.get(PROP_SOURCE_STATE) == Some(&state)
                });
            if !same {
                continue;
            }
            let changed = ChangedBlocks::unchanged_file(parent_id, parent, &disk.name)?;
            // Only what an incremental can splice (fixed chunking, the
            // parent's size); anything else is read as usual.
            let size = match &disk.input {
                DiskInput::Image(src) => src.size(),
                _ => continue,
            };
            if changed.check(&disk.name, size, opts.chunking).is_err() {
                continue;
            }
            let input = std::mem::replace(
                &mut disk.input,
                DiskInput::Stream(Box::new(std::io::empty())),
            );
            if let DiskInput::Image(source) = input {
                disk.input = DiskInput::Incremental { source, changed };
            }
        }
        Ok(())
    }

    /// Prepares a VM's disks for a CBT backup: per disk, finds its newest
    /// snapshot (unless given), decides whether its bitmap can be trusted
    /// under `policy`, and builds the backup inputs; pass them to
    /// [`backup`](Self::backup) with the returned parent set in the options.
    ///
    /// ```
    /// # fn main() -> cairn_engine::Result<()> {
    /// # use std::sync::Arc;
    /// use cairn_engine::cbt::{CbtDisk, CbtPolicy, PreparedVm};
    /// use cairn_engine::{BackupOptions, ChunkingParams, MemorySource, Repository, SnapshotMode};
    /// let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new()))?;
    /// let mut image = vec![1u8; 1 << 20];
    /// let run = |image: &[u8], bitmap: &str, next: &str, dirty| -> cairn_engine::Result<_> {
    ///     let disk = CbtDisk::new(
    ///         "vda",
    ///         Box::new(MemorySource::new("vda", image.to_vec())),
    ///         bitmap,
    ///         Ok(dirty),
    ///         next,
    ///     );
    ///     let chunking = ChunkingParams::default();
    ///     match repo.prepare_cbt("web01", vec![disk], chunking, CbtPolicy::Full)? {
    ///         PreparedVm::Backup { disks, parent, .. } => {
    ///             let opts = BackupOptions::new("web01").with_parent(parent);
    ///             repo.backup(disks, &opts)
    ///         }
    ///         PreparedVm::Skip { reason, .. } => panic!("skipped: {reason}"),
    ///     }
    /// };
    /// // No earlier snapshot: a full backup that starts bitmap "b1".
    /// assert_eq!(run(&image, "b0", "b1", vec![])?.mode, SnapshotMode::Full);
    /// // The guest writes; "b1" recorded it: an incremental reads only that.
    /// image[70_000] = 9;
    /// let inc = run(&image, "b1", "b2", vec![70_000..70_001])?;
    /// assert_eq!((inc.mode, inc.bytes_read), (SnapshotMode::Cbt, 65536));
    /// # Ok(()) }
    /// ```
    pub fn prepare_cbt(
        &self,
        vm: &str,
        disks: Vec<CbtDisk>,
        chunking: ChunkingParams,
        policy: CbtPolicy,
    ) -> Result<PreparedVm> {
        // A spot check reads the parent's extents: from this pool.
        let disks = disks
            .into_iter()
            .map(|d| {
                if d.pages.is_some() {
                    Ok(d)
                } else {
                    d.with_pages_from(self)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        prepare_vm(disks, chunking, policy, &mut |disk| {
            self.latest_with_disk(vm, disk)
        })
    }

    /// Restores the snapshot's disks (all, or those `opts.disks` names) into
    /// targets made by `make_target`. Each target is finished only once
    /// every disk is complete.
    ///
    /// ```
    /// # fn main() -> cairn_engine::Result<()> {
    /// # use std::sync::Arc;
    /// # use cairn_engine::*;
    /// # let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new()))?;
    /// # let image: Vec<u8> = (0..1u32 << 20).map(|i| (i % 249) as u8).collect();
    /// # let disk = BackupDisk::image("vda", MemorySource::new("vda", image.clone()));
    /// # let stats = repo.backup(vec![disk], &BackupOptions::new("web01"))?;
    /// let target = MemoryTarget::new(image.len() as u64)?;
    /// let keep = target.clone();
    /// let opts = RestoreOptions::default().with_disks(["vda"]);
    /// repo.restore(&stats.snapshot, &move |_disk| Ok(Box::new(target.clone())), &opts)?;
    /// assert_eq!(keep.finished(), Some(image));
    /// # Ok(()) }
    /// ```
    pub fn restore(
        &self,
        id: &SnapshotId,
        make_target: &MakeTarget<'_>,
        opts: &RestoreOptions,
    ) -> Result<RestoreStats> {
        let snapshot = self.load_snapshot(id)?;
        let index = self.fresh_index()?;
        let store = crate::pipeline::extents::Store {
            pool: &*self.pool,
            index: &index,
        };
        restore::run(&store, id, &snapshot, make_target, opts)
    }

    /// Restores the snapshot's disks as sparse raw files `dir/<disk name>`.
    ///
    /// ```
    /// # fn main() -> cairn_engine::Result<()> {
    /// # use std::sync::Arc;
    /// # use cairn_engine::*;
    /// # let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new()))?;
    /// # let image: Vec<u8> = (0..1u32 << 20).map(|i| (i % 249) as u8).collect();
    /// # let disk = BackupDisk::image("vda", MemorySource::new("vda", image.clone()));
    /// # let stats = repo.backup(vec![disk], &BackupOptions::new("web01"))?;
    /// let dir = tempfile::tempdir().unwrap();
    /// repo.restore_to_dir(&stats.snapshot, dir.path(), &RestoreOptions::default())?;
    /// assert_eq!(std::fs::read(dir.path().join("vda")).unwrap(), image);
    /// # Ok(()) }
    /// ```
    pub fn restore_to_dir(
        &self,
        id: &SnapshotId,
        dir: &Path,
        opts: &RestoreOptions,
    ) -> Result<RestoreStats> {
        let make = restore::dir_targets(dir, opts.overwrite)?;
        self.restore(id, &*make, opts)
    }

    /// Checks the pool (see [`VerifyOptions`]).
    ///
    /// ```
    /// # fn main() -> cairn_engine::Result<()> {
    /// # use std::sync::Arc;
    /// # use cairn_engine::*;
    /// # let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new()))?;
    /// # let image: Vec<u8> = (0..1u32 << 20).map(|i| (i % 249) as u8).collect();
    /// # let disk = BackupDisk::image("vda", MemorySource::new("vda", image.clone()));
    /// # let stats = repo.backup(vec![disk], &BackupOptions::new("web01"))?;
    /// let report = repo.verify(&VerifyOptions::default().with_read_data(true))?;
    /// assert!(report.is_ok());
    /// assert_eq!(report.snapshots, 1);
    /// # Ok(()) }
    /// ```
    pub fn verify(&self, opts: &VerifyOptions) -> Result<VerifyReport> {
        let index = self.fresh_index()?;
        verify::run(&*self.pool, &index, opts)
    }

    /// What the pool holds: snapshots, packs, stored and logical bytes.
    ///
    /// ```
    /// # fn main() -> cairn_engine::Result<()> {
    /// # use std::sync::Arc;
    /// # use cairn_engine::*;
    /// let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new()))?;
    /// for vm in ["a", "b"] {
    ///     let disk = BackupDisk::image("vda", MemorySource::new("vda", vec![3u8; 4 << 20]));
    ///     repo.backup(vec![disk], &BackupOptions::new(vm))?;
    /// }
    /// let info = repo.info()?;
    /// assert_eq!((info.snapshots, info.packs, info.logical_bytes), (2, 1, 8 << 20));
    /// assert!(info.dedup_ratio().unwrap() > 100.0);
    /// # Ok(()) }
    /// ```
    pub fn info(&self) -> Result<PoolInfo> {
        let list = self.snapshots()?;
        let mut info = PoolInfo {
            snapshots: list.snapshots.len(),
            damaged_snapshots: list.damaged.len(),
            logical_bytes: list.snapshots.iter().map(SnapshotInfo::bytes_logical).sum(),
            ..PoolInfo::default()
        };
        for kind in FileKind::ALL {
            let sizes = match self.pool.list_sizes(kind)? {
                Some(sizes) => sizes,
                None => {
                    let mut sizes = Vec::new();
                    for name in self.pool.list(kind)? {
                        match self.pool.size(kind, &name) {
                            Ok(size) => sizes.push((name, size)),
                            // Deleted since the listing.
                            Err(e) if e.is_not_found() => {}
                            Err(e) => return Err(e),
                        }
                    }
                    sizes
                }
            };
            if kind == FileKind::Pack {
                info.packs = sizes.len();
            }
            info.stored_bytes += sizes.iter().map(|(_, s)| s).sum::<u64>();
        }
        Ok(info)
    }

    /// Rebuilds the dedup index from the packs alone: one new segment
    /// replaces every old one; damaged packs are skipped and reported.
    ///
    /// ```
    /// # fn main() -> cairn_engine::Result<()> {
    /// # use std::sync::Arc;
    /// # use cairn_engine::*;
    /// # let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new()))?;
    /// # let image: Vec<u8> = (0..1u32 << 20).map(|i| (i % 249) as u8).collect();
    /// # let disk = BackupDisk::image("vda", MemorySource::new("vda", image.clone()));
    /// # let stats = repo.backup(vec![disk], &BackupOptions::new("web01"))?;
    /// let report = repo.repair_index()?;
    /// assert_eq!(report.packs, 1);
    /// assert!(report.damaged_packs.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn repair_index(&self) -> Result<RebuildReport> {
        let report = rebuild(&*self.pool, None)?;
        // Reload on next use: the old segments are gone.
        *self.index.lock() = None;
        Ok(report)
    }
}
