//! Restore targets on the local file system: [`SparseFileTarget`] writes a
//! sparse raw file under a temporary name and renames it into place only
//! when complete ([`partial_path`], [`publish_file`]).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::id::hex;
use crate::random::random_16;
use crate::source::DiskTarget;

/// A fresh temporary name to write `path` under until it is complete
/// (`.NAME.<random>~<owner tag>.cairn-partial` beside it, so two restores
/// of the same name never share it). Refuses an existing `path` unless
/// `overwrite` (the final [`publish_file`] checks again). Partial files of
/// the same name left by a killed restore on this host (their process gone,
/// see [`crate::process`]) are removed first.
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
    let name = partial_stem(&name);
    remove_orphaned_partials(path, name);
    let token = hex(&random_16()?[..4]);
    let tag = crate::process::owner_tag();
    Ok(path.with_file_name(format!(".{name}.{token}~{tag}.cairn-partial")))
}

/// The part of a disk's file name a partial file's name carries: at most
/// 96 bytes of it (whole characters), so the partial name (with its random
/// token and owner tag) stays within the 255-byte limit of file names.
fn partial_stem(name: &str) -> &str {
    let mut end = name.len().min(96);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// Removes `.NAME.*~<tag>.cairn-partial` beside `path` whose owner is gone
/// (best effort).
fn remove_orphaned_partials(path: &Path, name: &str) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{name}.");
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(rest) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|f| f.strip_suffix(".cairn-partial"))
        else {
            continue;
        };
        if let Some((_, tag)) = rest.rsplit_once('~') {
            if crate::process::owner_is_gone(tag) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Makes a finished restore file durable and visible: syncs `file` (open on
/// `tmp`), renames `tmp` to `path` (without `overwrite`, never replacing a
/// file that appeared meanwhile) and syncs the directory.
pub fn publish_file(file: &File, tmp: &Path, path: &Path, overwrite: bool) -> Result<()> {
    file.sync_all()
        .map_err(|e| Error::io(format!("syncing {}", tmp.display()), e))?;
    if overwrite {
        std::fs::rename(tmp, path)
            .map_err(|e| Error::io(format!("renaming into {}", path.display()), e))?;
    } else {
        rename_no_replace(tmp, path)?;
    }
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

/// Renames `from` to `to` unless `to` exists (`renameat2(RENAME_NOREPLACE)`,
/// or link + unlink where the file system lacks it).
fn rename_no_replace(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let exists = || Error::TargetExists {
        path: to.to_path_buf(),
    };
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| Error::InvalidArgument(format!("{} holds a NUL byte", p.display())))
    };
    let (cf, ct) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths; renameat2 reads them only.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cf.as_ptr(),
            libc::AT_FDCWD,
            ct.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Err(exists()),
        Some(libc::EINVAL) | Some(libc::ENOSYS) => match std::fs::hard_link(from, to) {
            Ok(()) => std::fs::remove_file(from)
                .map_err(|e| Error::io(format!("removing {}", from.display()), e)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(exists()),
            Err(e) => Err(Error::io(format!("linking into {}", to.display()), e)),
        },
        _ => Err(Error::io(format!("renaming into {}", to.display()), err)),
    }
}

/// A sparse raw file, written under a temporary name and renamed into place
/// by [`DiskTarget::finish`].
#[derive(Debug)]
pub struct SparseFileTarget {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    overwrite: bool,
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
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        // From here on, dropping the target removes the temporary file.
        let target = SparseFileTarget {
            file,
            tmp,
            path: path.to_path_buf(),
            overwrite,
            done: false,
        };
        target.file.set_len(size).map_err(|e| {
            Error::io(
                format!("sizing {} to {size} bytes", target.tmp.display()),
                e,
            )
        })?;
        Ok(target)
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
        publish_file(&self.file, &self.tmp, &self.path, self.overwrite)?;
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
