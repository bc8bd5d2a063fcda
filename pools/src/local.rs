//! The local directory pool.
//!
//! Layout under the pool directory:
//! ```text
//! config                 the pool configuration
//! packs/<2 hex>/<name>   pack files, sharded by the first two hex digits
//! index/<name>           index segments
//! snapshots/<name>       snapshot manifests
//! tmp/                   objects being written (never read)
//! ```
//! A write in progress is `tmp/<kind>-<name>-<random>~<owner tag>.tmp`: the
//! tag (`<host>.<pid>`, `cairn_engine::process`) lets the next open of the
//! pool remove what a killed writer of this host left there.
//! Writes go to `tmp/`, are fsynced, hard-linked to their final name (which
//! fails if the name exists: objects are never overwritten), unlinked from
//! `tmp/`, and the directory is fsynced. Index segments are memory-mapped when
//! read: objects are immutable, never truncated in place, so the mapping stays
//! valid even if the file is later deleted.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use cairn_engine::{
    Error, FileKind, ObjectWriter, PoolDelete, PoolList, PoolRead, PoolWrite, Result,
};
use parking_lot::Mutex;

use crate::PoolOpenError;

/// Most pack file handles kept open for range reads.
const OPEN_FILES: usize = 64;

/// A pool in a local directory.
#[derive(Debug)]
pub struct LocalPool {
    root: PathBuf,
    open_files: Mutex<Vec<(String, Arc<File>)>>,
}

impl LocalPool {
    /// Creates the directory layout (the directory may exist and be empty, or
    /// be an existing pool), then opens it.
    pub fn create(root: impl AsRef<Path>) -> std::result::Result<Self, PoolOpenError> {
        let root = root.as_ref().to_path_buf();
        for sub in ["packs", "index", "snapshots", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(|source| PoolOpenError::Io { path: p, source })?;
        }
        sync_dir(&root).map_err(|source| PoolOpenError::Io {
            path: root.clone(),
            source,
        })?;
        Self::open(root)
    }

    /// Opens an existing pool directory (whether it is initialised is the
    /// engine's check: it reads `config`).
    pub fn open(root: impl AsRef<Path>) -> std::result::Result<Self, PoolOpenError> {
        let root = root.as_ref().to_path_buf();
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(PoolOpenError::NotADirectory(root)),
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(PoolOpenError::Missing(root)),
            Err(source) => return Err(PoolOpenError::Io { path: root, source }),
        }
        remove_orphaned_writes(&root.join("tmp"));
        Ok(LocalPool {
            root,
            open_files: Mutex::new(Vec::new()),
        })
    }

    /// The pool's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file holding an object. Names must be plain (no `/`, not `.`/`..`).
    pub fn path_of(&self, kind: FileKind, name: &str) -> Result<PathBuf> {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(Error::InvalidArgument(format!(
                "object name {name:?} is not a plain name"
            )));
        }
        Ok(match kind {
            FileKind::Config => self.root.join(name),
            FileKind::Pack => {
                let shard = name.get(..2).unwrap_or("00");
                self.root.join("packs").join(shard).join(name)
            }
            other => self.root.join(other.dir_name()).join(name),
        })
    }

    fn io(op: &'static str, kind: FileKind, name: &str, source: std::io::Error) -> Error {
        if source.kind() == ErrorKind::NotFound {
            Error::NotFound {
                kind,
                name: name.to_string(),
            }
        } else {
            Error::PoolIo {
                op,
                kind,
                name: name.to_string(),
                source,
            }
        }
    }

    fn open_cached(&self, kind: FileKind, name: &str) -> Result<Arc<File>> {
        let key = format!("{}/{name}", kind.dir_name());
        {
            let cache = self.open_files.lock();
            if let Some((_, f)) = cache.iter().find(|(k, _)| *k == key) {
                return Ok(f.clone());
            }
        }
        let path = self.path_of(kind, name)?;
        let f = Arc::new(File::open(&path).map_err(|e| Self::io("open", kind, name, e))?);
        let mut cache = self.open_files.lock();
        if cache.len() >= OPEN_FILES {
            cache.remove(0);
        }
        cache.push((key, f.clone()));
        Ok(f)
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl PoolRead for LocalPool {
    fn read(&self, kind: FileKind, name: &str) -> Result<Bytes> {
        let path = self.path_of(kind, name)?;
        if kind == FileKind::Index {
            let file = File::open(&path).map_err(|e| Self::io("open", kind, name, e))?;
            let len = file
                .metadata()
                .map_err(|e| Self::io("stat", kind, name, e))?
                .len();
            if len == 0 {
                return Ok(Bytes::new());
            }
            // SAFETY: pool objects are immutable once committed and are never
            // truncated or rewritten in place (only unlinked), so the mapping
            // cannot change under us.
            let map = unsafe { memmap2::Mmap::map(&file) }
                .map_err(|e| Self::io("mmap", kind, name, e))?;
            return Ok(Bytes::from_owner(map));
        }
        fs::read(&path)
            .map(Bytes::from)
            .map_err(|e| Self::io("read", kind, name, e))
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Bytes> {
        let f = self.open_cached(kind, name)?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| Error::PoolIo {
                op: "read",
                kind,
                name: name.to_string(),
                source: std::io::Error::new(
                    e.kind(),
                    format!("{len} bytes at offset {offset}: {e}"),
                ),
            })?;
        Ok(Bytes::from(buf))
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        let path = self.path_of(kind, name)?;
        fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| Self::io("stat", kind, name, e))
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn free_bytes(&self) -> Result<Option<u64>> {
        let path = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::InvalidArgument("pool path holds a NUL byte".into()))?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: `path` is a NUL-terminated string and `st` points to
        // writable memory of the right size; statvfs only writes into it.
        let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
        if rc != 0 {
            return Err(Error::io(
                format!("statvfs {}", self.root.display()),
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: statvfs returned 0, so it filled the structure.
        let st = unsafe { st.assume_init() };
        Ok(Some(st.f_bavail.saturating_mul(st.f_frsize)))
    }
}

/// A write in progress: a temporary file in `tmp/`.
struct LocalWriter {
    file: Option<BufWriter<File>>,
    tmp: PathBuf,
    dest: PathBuf,
    kind: FileKind,
    name: String,
}

impl Write for LocalWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(data),
            None => Err(std::io::Error::other("writer already committed")),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl ObjectWriter for LocalWriter {
    fn commit(mut self: Box<Self>) -> Result<()> {
        let (kind, name) = (self.kind, self.name.clone());
        let io = |op, e| LocalPool::io(op, kind, &name, e);
        let file = self
            .file
            .take()
            .ok_or_else(|| Error::Internal("pool writer committed twice".into()))?;
        let file = file.into_inner().map_err(|e| io("write", e.into_error()))?;
        file.sync_all().map_err(|e| io("fsync", e))?;
        drop(file);
        let parent = self
            .dest
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let created_dir = !parent.exists();
        if created_dir {
            fs::create_dir_all(&parent).map_err(|e| io("mkdir", e))?;
        }
        // link() fails with EEXIST instead of replacing: never overwrite.
        match fs::hard_link(&self.tmp, &self.dest) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists { kind, name });
            }
            Err(e) => return Err(io("link", e)),
        }
        let _ = fs::remove_file(&self.tmp);
        sync_dir(&parent).map_err(|e| io("fsync dir", e))?;
        if created_dir {
            if let Some(grand) = parent.parent() {
                sync_dir(grand).map_err(|e| io("fsync dir", e))?;
            }
        }
        Ok(())
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        // Aborted (never committed) or committed: the temp file goes either way.
        let _ = fs::remove_file(&self.tmp);
    }
}

impl PoolWrite for LocalPool {
    fn create(&self, kind: FileKind, name: &str) -> Result<Box<dyn ObjectWriter>> {
        let dest = self.path_of(kind, name)?;
        if dest.exists() {
            return Err(Error::AlreadyExists {
                kind,
                name: name.to_string(),
            });
        }
        let mut rnd = [0u8; 8];
        getrandom::getrandom(&mut rnd).map_err(|e| Error::Random(e.to_string()))?;
        let tmp = self.root.join("tmp").join(format!(
            "{}-{name}-{:016x}~{}.tmp",
            kind.dir_name(),
            u64::from_le_bytes(rnd),
            cairn_engine::process::owner_tag()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| {
                if e.kind() == ErrorKind::NotFound {
                    Error::PoolIo {
                        op: "create",
                        kind,
                        name: name.to_string(),
                        source: std::io::Error::new(
                            e.kind(),
                            format!(
                                "{} is missing: is {} a Cairn pool?",
                                tmp.display(),
                                self.root.display()
                            ),
                        ),
                    }
                } else {
                    Self::io("create", kind, name, e)
                }
            })?;
        Ok(Box::new(LocalWriter {
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            tmp,
            dest,
            kind,
            name: name.to_string(),
        }))
    }
}

impl PoolList for LocalPool {
    fn list(&self, kind: FileKind) -> Result<Vec<String>> {
        let names = |dir: &Path| -> Result<Vec<String>> {
            let rd = match fs::read_dir(dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(Self::io("list", kind, &dir.display().to_string(), e)),
            };
            let mut out = Vec::new();
            for entry in rd {
                let entry =
                    entry.map_err(|e| Self::io("list", kind, &dir.display().to_string(), e))?;
                if let Some(n) = entry.file_name().to_str() {
                    out.push(n.to_string());
                }
            }
            Ok(out)
        };
        match kind {
            FileKind::Config => Ok(if self.root.join("config").exists() {
                vec!["config".into()]
            } else {
                Vec::new()
            }),
            FileKind::Pack => {
                let mut out = Vec::new();
                for shard in names(&self.root.join("packs"))? {
                    out.extend(names(&self.root.join("packs").join(shard))?);
                }
                Ok(out)
            }
            other => names(&self.root.join(other.dir_name())),
        }
    }
}

impl PoolDelete for LocalPool {
    fn delete(&self, kind: FileKind, name: &str) -> Result<()> {
        let path = self.path_of(kind, name)?;
        fs::remove_file(&path).map_err(|e| Self::io("delete", kind, name, e))?;
        self.open_files
            .lock()
            .retain(|(k, _)| *k != format!("{}/{name}", kind.dir_name()));
        if let Some(parent) = path.parent() {
            sync_dir(parent).map_err(|e| Self::io("fsync dir", kind, name, e))?;
        }
        Ok(())
    }
}

/// Removes `tmp/` files whose writer (by its owner tag) was a process of
/// this host that is gone: a killed backup's unfinished pack, say. Files of
/// live processes and of other hosts are left alone. Best effort.
fn remove_orphaned_writes(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(tag) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|n| n.rsplit_once('~'))
            .map(|(_, tag)| tag.to_string())
        else {
            continue;
        };
        if cairn_engine::process::owner_is_gone(&tag) {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_removes_what_dead_writers_of_this_host_left_in_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let pool = LocalPool::create(dir.path()).unwrap();
        // A write in progress of this process.
        let mut live = pool.create(FileKind::Pack, "abcd").unwrap();
        live.write_all(b"half").unwrap();
        let me = cairn_engine::process::owner_tag();
        let (host, _) = me.rsplit_once('.').unwrap();
        let tmp = dir.path().join("tmp");
        let dead = tmp.join(format!("packs-ef01-0011223344556677~{host}.4194305.tmp"));
        let other_host = tmp.join("packs-ef02-0011223344556677~elsewhere.4194305.tmp");
        let old_style = tmp.join("packs-ef03-0011223344556677.tmp");
        for f in [&dead, &other_host, &old_style] {
            fs::write(f, b"x").unwrap();
        }
        let _again = LocalPool::open(dir.path()).unwrap();
        assert!(!dead.exists(), "a dead writer's file is removed");
        assert!(
            other_host.exists() && old_style.exists(),
            "others are left alone"
        );
        assert_eq!(
            fs::read_dir(&tmp).unwrap().count(),
            3,
            "the live write stays"
        );
        live.commit().unwrap();
        assert_eq!(pool.read(FileKind::Pack, "abcd").unwrap().as_ref(), b"half");
    }

    #[test]
    fn write_is_atomic_and_create_only() {
        let dir = tempfile::tempdir().unwrap();
        let pool = LocalPool::create(dir.path()).unwrap();
        let mut w = pool.create(FileKind::Pack, "abcd").unwrap();
        w.write_all(b"hello").unwrap();
        // Not visible before commit.
        assert!(pool
            .read(FileKind::Pack, "abcd")
            .unwrap_err()
            .is_not_found());
        w.commit().unwrap();
        assert_eq!(&pool.read(FileKind::Pack, "abcd").unwrap()[..], b"hello");
        assert_eq!(
            &pool.read_range(FileKind::Pack, "abcd", 1, 3).unwrap()[..],
            b"ell"
        );
        assert!(pool.read_range(FileKind::Pack, "abcd", 3, 3).is_err());
        assert!(matches!(
            pool.write(FileKind::Pack, "abcd", b"x"),
            Err(Error::AlreadyExists { .. })
        ));
        assert_eq!(pool.list(FileKind::Pack).unwrap(), vec!["abcd".to_string()]);
        // An aborted write leaves nothing behind.
        let mut w = pool.create(FileKind::Snapshot, "s1").unwrap();
        w.write_all(b"partial").unwrap();
        drop(w);
        assert!(pool.list(FileKind::Snapshot).unwrap().is_empty());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        pool.delete(FileKind::Pack, "abcd").unwrap();
        assert!(pool
            .delete(FileKind::Pack, "abcd")
            .unwrap_err()
            .is_not_found());
    }

    #[test]
    fn rejects_path_names() {
        let dir = tempfile::tempdir().unwrap();
        let pool = LocalPool::create(dir.path()).unwrap();
        assert!(pool.write(FileKind::Index, "../evil", b"x").is_err());
        assert!(LocalPool::open(dir.path().join("nope")).is_err());
    }
}
