//! [`CachedPool`]: a local cache of the index segments and manifests of a
//! remote pool, so commands do not fetch them again on every run.
//!
//! Objects are immutable, so a cached copy never goes stale in content; it
//! is still never trusted over the pool: every cached file is verified by
//! its own checksum or name before use (a damaged or truncated one is
//! removed and fetched again), listings always come from the pool, and
//! cached files of objects the pool no longer lists are removed.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use cairn_engine::{verify_object, DynPool, FileKind, Pool, PoolWrapper, Result};

/// The default cache directory: `$XDG_CACHE_HOME/cairn`, else
/// `~/.cache/cairn`.
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|base| base.join("cairn"))
}

/// A pool wrapper that keeps verified copies of index segments and
/// manifests in a local directory (wrap it in
/// [`WrappedPool`](cairn_engine::WrappedPool)).
pub struct CachedPool {
    inner: DynPool,
    dir: PathBuf,
}

impl std::fmt::Debug for CachedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedPool")
            .field("pool", &self.inner.location())
            .field("dir", &self.dir)
            .finish()
    }
}

impl CachedPool {
    /// Caches `inner`'s segments and manifests under `dir` (one directory
    /// per pool: callers pass a directory specific to the pool's address).
    pub fn new(inner: DynPool, dir: impl Into<PathBuf>) -> Self {
        CachedPool {
            inner,
            dir: dir.into(),
        }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn cached(kind: FileKind) -> bool {
        matches!(
            kind,
            FileKind::Index | FileKind::Snapshot | FileKind::Catalog
        )
    }

    fn path(&self, kind: FileKind, name: &str) -> PathBuf {
        self.dir.join(kind.dir_name()).join(name)
    }

    /// A verified cached copy, if there is one (a bad one is removed).
    /// A verified cached copy, memory-mapped: the index of a remote pool
    /// then costs page cache, not heap, as a local pool's does.
    fn lookup(&self, kind: FileKind, name: &str) -> Option<Bytes> {
        let path = self.path(kind, name);
        let file = std::fs::File::open(&path).ok()?;
        let bytes = if file.metadata().ok()?.len() == 0 {
            Bytes::new()
        } else {
            // SAFETY: cached files are written to a unique temporary name
            // and renamed into place, never truncated or rewritten in place
            // (only unlinked or replaced by a rename, which leaves this
            // mapping's inode alone), so the mapping cannot change under us.
            // (A cache directory on NFS shared between hosts is not
            // supported: another host's unlink can make pages unreadable.)
            match unsafe { memmap2::Mmap::map(&file) } {
                Ok(map) => Bytes::from_owner(map),
                // Where mapping is refused (some FUSE file systems, the
                // map count limit), read it: the cache still works.
                Err(_) => Bytes::from(std::fs::read(&path).ok()?),
            }
        };
        if verify_object(kind, name, &bytes) == Some(true) {
            Some(bytes)
        } else {
            let _ = std::fs::remove_file(&path);
            None
        }
    }

    /// Keeps a verified copy (best effort: the cache is never required).
    fn store(&self, kind: FileKind, name: &str, bytes: &[u8]) {
        if verify_object(kind, name, bytes) != Some(true) {
            return;
        }
        let path = self.path(kind, name);
        let Some(dir) = path.parent() else { return };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        // Unique per writer: threads of one process may store at once.
        let mut rnd = [0u8; 8];
        if getrandom::getrandom(&mut rnd).is_err() {
            return;
        }
        let tmp = dir.join(format!(
            ".{name}.{}.{:016x}.tmp",
            std::process::id(),
            u64::from_le_bytes(rnd)
        ));
        if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, &path).is_ok() {
            return;
        }
        let _ = std::fs::remove_file(&tmp);
    }
}

impl PoolWrapper for CachedPool {
    fn inner(&self) -> &dyn Pool {
        &*self.inner
    }

    fn read(&self, kind: FileKind, name: &str) -> Result<Bytes> {
        if !Self::cached(kind) {
            return self.inner.read(kind, name);
        }
        if let Some(bytes) = self.lookup(kind, name) {
            return Ok(bytes);
        }
        let bytes = self.inner.read(kind, name)?;
        self.store(kind, name, &bytes);
        // Served from the cached file (mapped), so the copy just fetched
        // does not stay on the heap.
        Ok(self.lookup(kind, name).unwrap_or(bytes))
    }

    fn list(&self, kind: FileKind) -> Result<Vec<String>> {
        let names = self.inner.list(kind)?;
        if Self::cached(kind) {
            self.prune(kind, &names);
        }
        Ok(names)
    }

    fn list_sizes(&self, kind: FileKind) -> Result<Option<Vec<(String, u64)>>> {
        let listed = self.inner.list_sizes(kind)?;
        if let (true, Some(l)) = (Self::cached(kind), &listed) {
            let names: Vec<String> = l.iter().map(|(n, _)| n.clone()).collect();
            self.prune(kind, &names);
        }
        Ok(listed)
    }

    fn delete(&self, kind: FileKind, name: &str) -> Result<()> {
        let _ = std::fs::remove_file(self.path(kind, name));
        self.inner.delete(kind, name)
    }
}

impl CachedPool {
    /// Removes cached files of objects the pool no longer lists.
    fn prune(&self, kind: FileKind, listed: &[String]) {
        let Ok(entries) = std::fs::read_dir(self.dir.join(kind.dir_name())) else {
            return;
        };
        let listed: std::collections::HashSet<&str> = listed.iter().map(String::as_str).collect();
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if !name.starts_with('.') && !listed.contains(name.as_ref()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
