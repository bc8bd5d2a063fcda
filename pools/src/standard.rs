//! [`StandardPool`]: a directory where each **backup set** — a VM's full
//! snapshot and the incrementals after it — is stored on its own, in a
//! folder of its own: no chunk is shared between sets, so deleting a set
//! removes exactly its files, and a set can be moved or archived alone.
//!
//! ```text
//! DIR/standard.json          {version: 1, set_length: N} (incrementals per set)
//! DIR/shared/                a local pool: the configuration, settings, the
//!                            snapshot catalog, leases of pool-wide jobs
//! DIR/sets/<NNNNNN>-<vm>/    a local pool per set (packs, index, manifests,
//!                            leases, marks) and its set.json {vm}
//! ```
//!
//! The pool has two faces, both pools to the engine:
//! - the **whole pool** ([`StandardPool::open`]): reads, lists and deletes
//!   across every set (listing, restore, verify, prune and forget work on
//!   it unchanged); new packs, segments and manifests go to the newest set,
//!   protection and damage marks to the set holding their snapshot;
//! - **one set** ([`StandardPool::set`], [`StandardPool::backup_set`]): a
//!   backup runs on the set chosen for its VM, so its deduplication sees
//!   only that set's chunks — the next backup after a set holds
//!   `1 + set_length` snapshots starts a new set, with a full read (the new
//!   set has no parent to be incremental to).
//!
//! Garbage collection runs per set (`cairn gc` does that), and a set left
//! without snapshots, which is not its VM's newest, is removed whole.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use cairn_engine::{
    Error, FileKind, ObjectWriter, PoolDelete, PoolList, PoolRead, PoolWrite, Result,
};

use crate::{LocalPool, PoolOpenError};

/// Incrementals per backup set unless the pool says otherwise.
pub const DEFAULT_SET_LENGTH: u32 = 7;

const SETTINGS_FILE: &str = "standard.json";
const SET_FILE: &str = "set.json";
/// One empty file per backup started in a set (what its length counts).
const BACKUPS_DIR: &str = "backups";

fn random_name() -> std::io::Result<String> {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    version: u32,
    set_length: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetInfo {
    vm: String,
}

/// One backup set as listed by [`StandardPool::sets`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupSet {
    /// Its folder's name under `sets/`.
    pub name: String,
    /// The VM it belongs to.
    pub vm: String,
    /// Snapshots in it.
    pub snapshots: usize,
}

/// A standard pool, whole or one set (see the module docs).
#[derive(Debug)]
pub struct StandardPool {
    root: PathBuf,
    shared: Arc<LocalPool>,
    settings: Settings,
    /// `Some`: this face is one set.
    set: Option<(String, LocalPool)>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PoolOpenError + '_ {
    move |source| PoolOpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Kinds kept pool-wide (in `shared/`), whichever face writes them.
fn pool_wide(kind: FileKind) -> bool {
    matches!(kind, FileKind::Config | FileKind::Setting)
}

/// Kinds the whole pool keeps in `shared/` (a set keeps its own).
fn whole_pool_only(kind: FileKind) -> bool {
    matches!(kind, FileKind::Catalog | FileKind::Lease | FileKind::Sweep)
}

/// The most incrementals a set may hold (`standard.json`'s `set_length`).
pub const MAX_SET_LENGTH: u32 = 365;

impl StandardPool {
    /// Creates the layout in `dir` (which may exist and be empty) with
    /// `set_length` incrementals per set, or opens the pool there.
    pub fn create(
        dir: impl AsRef<Path>,
        set_length: u32,
    ) -> std::result::Result<Self, PoolOpenError> {
        let root = dir.as_ref().to_path_buf();
        if set_length > MAX_SET_LENGTH {
            return Err(PoolOpenError::Settings {
                address: root.display().to_string(),
                reason: format!("set_length {set_length} is out of range (0–{MAX_SET_LENGTH})"),
            });
        }
        std::fs::create_dir_all(root.join("sets")).map_err(io(&root))?;
        let settings_path = root.join(SETTINGS_FILE);
        if !settings_path.exists() {
            let s = Settings {
                version: 1,
                set_length,
            };
            let bytes = serde_json::to_vec_pretty(&s).map_err(|e| PoolOpenError::Settings {
                address: root.display().to_string(),
                reason: e.to_string(),
            })?;
            let tmp = root.join(format!("{SETTINGS_FILE}.tmp"));
            std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &settings_path))
                .map_err(io(&settings_path))?;
        }
        LocalPool::create(root.join("shared"))?;
        Self::open(root)
    }

    /// Opens the whole pool in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> std::result::Result<Self, PoolOpenError> {
        let root = dir.as_ref().to_path_buf();
        match std::fs::metadata(&root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(PoolOpenError::NotADirectory(root)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PoolOpenError::Missing(root))
            }
            Err(e) => return Err(io(&root)(e)),
        }
        let settings_path = root.join(SETTINGS_FILE);
        let raw = std::fs::read(&settings_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                PoolOpenError::Settings {
                    address: format!("standard:{}", root.display()),
                    reason: "not a standard pool (no standard.json); run `cairn init` first".into(),
                }
            } else {
                io(&settings_path)(e)
            }
        })?;
        let settings: Settings =
            serde_json::from_slice(&raw).map_err(|e| PoolOpenError::Settings {
                address: settings_path.display().to_string(),
                reason: format!("not a standard pool's settings: {e}"),
            })?;
        if settings.version != 1 {
            return Err(PoolOpenError::Settings {
                address: settings_path.display().to_string(),
                reason: format!("version {} is not supported", settings.version),
            });
        }
        if settings.set_length > MAX_SET_LENGTH {
            return Err(PoolOpenError::Settings {
                address: settings_path.display().to_string(),
                reason: format!(
                    "set_length {} is out of range (0–{MAX_SET_LENGTH})",
                    settings.set_length
                ),
            });
        }
        let shared = Arc::new(LocalPool::open(root.join("shared"))?);
        Ok(StandardPool {
            root,
            shared,
            settings,
            set: None,
        })
    }

    /// Incrementals per set.
    pub fn set_length(&self) -> u32 {
        self.settings.set_length
    }

    /// The pool's directory.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// The set this face is, if it is one.
    pub fn set_name(&self) -> Option<&str> {
        self.set.as_ref().map(|(n, _)| n.as_str())
    }

    fn sets_dir(&self) -> PathBuf {
        self.root.join("sets")
    }

    /// Every set, oldest first.
    pub fn sets(&self) -> Result<Vec<BackupSet>> {
        let mut out = Vec::new();
        for name in self.set_names()? {
            let dir = self.sets_dir().join(&name);
            let info: SetInfo = std::fs::read(dir.join(SET_FILE))
                .map_err(|e| Error::io(format!("backup set {name}"), e))
                .and_then(|raw| {
                    serde_json::from_slice(&raw).map_err(|e| {
                        Error::corrupt(
                            format!("backup set {name}"),
                            cairn_engine::DecodeError::Invalid(e.to_string()),
                        )
                    })
                })?;
            let pool = self.open_set(&name)?;
            out.push(BackupSet {
                snapshots: pool.list(FileKind::Snapshot)?.len(),
                vm: info.vm,
                name,
            });
        }
        Ok(out)
    }

    fn set_names(&self) -> Result<Vec<String>> {
        let dir = self.sets_dir();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.len() > 7 && n.as_bytes()[..6].iter().all(u8::is_ascii_digit))
            .collect();
        names.sort();
        Ok(names)
    }

    fn open_set(&self, name: &str) -> Result<LocalPool> {
        LocalPool::open(self.sets_dir().join(name)).map_err(Error::from)
    }

    fn face(&self, name: &str, pool: LocalPool) -> StandardPool {
        StandardPool {
            root: self.root.clone(),
            shared: self.shared.clone(),
            settings: self.settings.clone(),
            set: Some((name.to_string(), pool)),
        }
    }

    /// The face of set `name`.
    pub fn set(&self, name: &str) -> Result<StandardPool> {
        let pool = self.open_set(name)?;
        Ok(self.face(name, pool))
    }

    /// The set the next backup of `vm` goes to: its newest set while
    /// fewer than `1 + set_length` backups went into it (counted when they
    /// start, so pruning a set does not keep it open), else a new one.
    pub fn backup_set(&self, vm: &str) -> Result<StandardPool> {
        let sets = self.sets()?;
        let face = match sets.iter().rev().find(|s| s.vm == vm) {
            Some(s) if self.backups_in(&s.name)? < 1 + self.settings.set_length as usize => {
                self.set(&s.name)?
            }
            _ => self.new_set(vm, &sets)?,
        };
        if let Some(name) = face.set_name() {
            let dir = self.sets_dir().join(name).join(BACKUPS_DIR);
            std::fs::create_dir_all(&dir)
                .and_then(|()| {
                    std::fs::File::create(dir.join(random_name()?))?;
                    std::fs::File::open(&dir)?.sync_all()
                })
                .map_err(|e| Error::io(format!("counting a backup in set {name}"), e))?;
        }
        Ok(face)
    }

    /// Backups started in set `name`.
    fn backups_in(&self, name: &str) -> Result<usize> {
        let dir = self.sets_dir().join(name).join(BACKUPS_DIR);
        match std::fs::read_dir(&dir) {
            Ok(entries) => Ok(entries.count()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(Error::io(format!("listing {}", dir.display()), e)),
        }
    }

    fn new_set(&self, vm: &str, sets: &[BackupSet]) -> Result<StandardPool> {
        let next = sets
            .iter()
            .filter_map(|s| s.name.get(..6)?.parse::<u32>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let slug: String = vm
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        // Built aside, then renamed into place: a set is whole or absent,
        // and of two writers picking the same number one gets the next.
        let tmp = self.sets_dir().join(format!(
            ".new-{}",
            random_name().map_err(|e| Error::io("random name", e))?
        ));
        LocalPool::create(&tmp).map_err(Error::from)?;
        let info = serde_json::to_vec(&SetInfo { vm: vm.to_string() })
            .map_err(|e| Error::Internal(e.to_string()))?;
        let path = tmp.join(SET_FILE);
        std::fs::write(&path, info)
            .and_then(|()| std::fs::File::open(&path)?.sync_all())
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .map_err(|e| Error::io(path.display().to_string(), e))?;
        for n in next..next + 1000 {
            let name = format!("{n:06}-{slug}");
            let dir = self.sets_dir().join(&name);
            if dir.exists() {
                continue;
            }
            match std::fs::rename(&tmp, &dir) {
                Ok(()) => {
                    let _ = std::fs::File::open(self.sets_dir()).and_then(|d| d.sync_all());
                    let pool = self.open_set(&name)?;
                    return Ok(self.face(&name, pool));
                }
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) => {}
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    return Err(Error::io(format!("creating backup set {name}"), e));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&tmp);
        Err(Error::PoolBusy("no free backup set number".into()))
    }

    /// Removes set `name` whole (its folder). Refused while it holds
    /// snapshots or a writer's lease.
    pub fn remove_set(&self, name: &str) -> Result<()> {
        let pool = self.open_set(name)?;
        let busy =
            !pool.list(FileKind::Snapshot)?.is_empty() || !pool.list(FileKind::Lease)?.is_empty();
        if busy {
            return Err(Error::PoolBusy(format!(
                "backup set {name} still holds snapshots or a writer's lease"
            )));
        }
        // Renamed out of the way first: listings never see half a set.
        let dir = self.sets_dir().join(name);
        let gone = self.sets_dir().join(format!(
            ".removed-{name}-{}",
            random_name().map_err(|e| Error::io("random name", e))?
        ));
        std::fs::rename(&dir, &gone)
            .map_err(|e| Error::io(format!("removing {}", dir.display()), e))?;
        let dir = gone;
        std::fs::remove_dir_all(&dir)
            .map_err(|e| Error::io(format!("removing {}", dir.display()), e))
    }

    /// The set holding object `name` of `kind` (whole-pool face).
    fn find(&self, kind: FileKind, name: &str) -> Result<Option<LocalPool>> {
        for set in self.set_names()?.into_iter().rev() {
            let pool = self.open_set(&set)?;
            match pool.size(kind, name) {
                Ok(_) => return Ok(Some(pool)),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// The set a protection or damage mark of snapshot `name` goes to.
    fn target_for(&self, kind: FileKind, name: &str) -> Result<LocalPool> {
        match self.find(FileKind::Snapshot, name)? {
            Some(p) => Ok(p),
            None => Err(Error::SnapshotNotFound(format!(
                "{name} ({kind} for a snapshot no backup set holds)"
            ))),
        }
    }

    fn not_found(kind: FileKind, name: &str) -> Error {
        Error::NotFound {
            kind,
            name: name.to_string(),
        }
    }
}

impl PoolRead for StandardPool {
    fn read(&self, kind: FileKind, name: &str) -> Result<Bytes> {
        if pool_wide(kind) || (self.set.is_none() && whole_pool_only(kind)) {
            return self.shared.read(kind, name);
        }
        match &self.set {
            Some((_, p)) => p.read(kind, name),
            None => match self.find(kind, name)? {
                Some(p) => p.read(kind, name),
                None => Err(Self::not_found(kind, name)),
            },
        }
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Bytes> {
        if pool_wide(kind) || (self.set.is_none() && whole_pool_only(kind)) {
            return self.shared.read_range(kind, name, offset, len);
        }
        match &self.set {
            Some((_, p)) => p.read_range(kind, name, offset, len),
            None => match self.find(kind, name)? {
                Some(p) => p.read_range(kind, name, offset, len),
                None => Err(Self::not_found(kind, name)),
            },
        }
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        if pool_wide(kind) || (self.set.is_none() && whole_pool_only(kind)) {
            return self.shared.size(kind, name);
        }
        match &self.set {
            Some((_, p)) => p.size(kind, name),
            None => match self.find(kind, name)? {
                Some(p) => p.size(kind, name),
                None => Err(Self::not_found(kind, name)),
            },
        }
    }

    fn location(&self) -> String {
        match &self.set {
            Some((n, _)) => format!("standard:{} (set {n})", self.root.display()),
            None => format!("standard:{}", self.root.display()),
        }
    }

    fn free_bytes(&self) -> Result<Option<u64>> {
        self.shared.free_bytes()
    }
}

impl PoolWrite for StandardPool {
    fn create(&self, kind: FileKind, name: &str) -> Result<Box<dyn ObjectWriter>> {
        if pool_wide(kind) || (self.set.is_none() && whole_pool_only(kind)) {
            return self.shared.create(kind, name);
        }
        match &self.set {
            Some((_, p)) => p.create(kind, name),
            None => {
                if !matches!(kind, FileKind::Protection | FileKind::DamageMark) {
                    // Packs, segments and manifests belong to one set: a
                    // job that writes them runs on a set's face.
                    return Err(Error::Unsupported(format!(
                        "writing a {kind} into the whole standard pool {}: \
                         run the job on one backup set (the CLI does)",
                        self.root.display()
                    )));
                }
                // Create-only across the whole pool.
                if self.find(kind, name)?.is_some() {
                    return Err(Error::AlreadyExists {
                        kind,
                        name: name.to_string(),
                    });
                }
                self.target_for(kind, name)?.create(kind, name)
            }
        }
    }
}

impl PoolList for StandardPool {
    fn list(&self, kind: FileKind) -> Result<Vec<String>> {
        if pool_wide(kind) || (self.set.is_none() && whole_pool_only(kind)) {
            return self.shared.list(kind);
        }
        match &self.set {
            Some((_, p)) => p.list(kind),
            None => {
                let mut all = Vec::new();
                for set in self.set_names()? {
                    all.extend(self.open_set(&set)?.list(kind)?);
                }
                all.sort();
                all.dedup();
                Ok(all)
            }
        }
    }
}

impl PoolDelete for StandardPool {
    fn delete(&self, kind: FileKind, name: &str) -> Result<()> {
        if pool_wide(kind) || (self.set.is_none() && whole_pool_only(kind)) {
            return self.shared.delete(kind, name);
        }
        match &self.set {
            Some((_, p)) => p.delete(kind, name),
            None => match self.find(kind, name)? {
                Some(p) => p.delete(kind, name),
                None => Err(Self::not_found(kind, name)),
            },
        }
    }
}
