//! Restore targets on the local file system: [`SparseFileTarget`] writes a
//! sparse raw file under a temporary name and renames it into place only
//! when complete ([`partial_path`], [`publish_file`]).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::source::DiskTarget;

/// The temporary name a restore writes `path` under until it is complete
/// (`.NAME.cairn-partial` beside it). Refuses an existing `path` unless
/// `overwrite`.
pub fn partial_path(path: &Path, overwrite: bool) -> Result<PathBuf> {
    if !overwrite && path.exists() {
        return Err(Error::TargetExists {
            path: path.to_path_buf(),
        });
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    Ok(path.with_file_name(format!(".{name}.cairn-partial")))
}

/// Makes a finished restore file durable and visible: syncs `file` (open on
/// `tmp`), renames `tmp` to `path` and syncs the directory.
pub fn publish_file(file: &File, tmp: &Path, path: &Path) -> Result<()> {
    file.sync_all()
        .map_err(|e| Error::io(format!("syncing {}", tmp.display()), e))?;
    std::fs::rename(tmp, path)
        .map_err(|e| Error::io(format!("renaming into {}", path.display()), e))?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))?;
    }
    Ok(())
}

/// A sparse raw file, written under a temporary name and renamed into place
/// by [`DiskTarget::finish`].
#[derive(Debug)]
pub struct SparseFileTarget {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    done: bool,
}

impl SparseFileTarget {
    /// Creates `path` of `size` bytes (all holes). Refuses to replace an
    /// existing file unless `overwrite`.
    pub fn create(path: &Path, size: u64, overwrite: bool) -> Result<Self> {
        let tmp = partial_path(path, overwrite)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        file.set_len(size)
            .map_err(|e| Error::io(format!("sizing {} to {size} bytes", tmp.display()), e))?;
        Ok(SparseFileTarget {
            file,
            tmp,
            path: path.to_path_buf(),
            done: false,
        })
    }
}

impl DiskTarget for SparseFileTarget {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, offset).map_err(|e| {
            Error::io(
                format!(
                    "writing {} bytes at {offset} of {}",
                    data.len(),
                    self.tmp.display()
                ),
                e,
            )
        })
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        publish_file(&self.file, &self.tmp, &self.path)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for SparseFileTarget {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
