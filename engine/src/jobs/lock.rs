//! One job at a time per resource (spec B18): a [`ResourceLock`] is an
//! exclusive `flock` on `<state dir>/locks/<resource>.lock`. The kernel
//! drops it when the holding process ends, however it ends (a crash, a
//! SIGKILL), so a lock is never left stuck; the file itself stays, and says
//! who held it last (process, host, job, since when) for the "busy"
//! message.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A held resource lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct ResourceLock {
    path: PathBuf,
    _file: File,
}

/// Longest encoded name kept whole (file names end at 255 bytes).
const NAME_MAX: usize = 200;

/// A file-name-safe form of a resource name (a VM id, a pool address):
/// letters, digits, `-`, `_` and `.` kept, everything else `%XX`; a name
/// longer than [`NAME_MAX`] so encoded keeps its first 160 bytes and adds
/// `~` and 32 hex digits of the whole name's BLAKE3 hash (still one file
/// per resource).
fn file_name(resource: &str) -> String {
    let mut out = String::with_capacity(resource.len());
    for b in resource.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_') || (b == b'.' && !out.is_empty()) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() > NAME_MAX {
        let hash = blake3::hash(resource.as_bytes()).to_hex();
        out.truncate(160);
        out.push('~');
        out.push_str(&hash[..32]);
    }
    out
}

impl ResourceLock {
    /// Takes the lock on `resource` for `job`, or fails at once with
    /// [`Error::PoolBusy`] naming the holder.
    pub fn acquire(state_dir: &Path, resource: &str, job: &str) -> Result<Self> {
        if resource.is_empty() {
            return Err(Error::InvalidArgument("an empty resource name".into()));
        }
        let dir = state_dir.join("locks");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
        let path = dir.join(format!("{}.lock", file_name(resource)));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(path.display().to_string(), e))?;
        // A lock just released may still be held for a moment by a child
        // this process is starting (fork copies the descriptor; exec closes
        // it): try for up to 200 ms before calling it busy.
        let mut tries = 0;
        loop {
            let taken = crate::file_lock::try_lock_exclusive(&file)
                .map_err(|e| Error::io(path.display().to_string(), e))?;
            if taken {
                break;
            }
            if tries == 10 {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(Error::PoolBusy(format!(
                    "{resource} is in use by another job ({}); one job at a time per resource",
                    holder.trim()
                )));
            }
            tries += 1;
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let since = jiff::Timestamp::now();
        let me = format!("job {job}, {}, since {since}", crate::process::owner_tag());
        let write = |f: &mut File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.seek(SeekFrom::Start(0))?;
            f.write_all(me.as_bytes())?;
            f.sync_data()
        };
        write(&mut file).map_err(|e| Error::io(path.display().to_string(), e))?;
        Ok(ResourceLock { path, _file: file })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_names_are_safe() {
        let dir = tempfile::tempdir().unwrap();
        let a = ResourceLock::acquire(dir.path(), "vm:web/01", "nightly").unwrap();
        let e = ResourceLock::acquire(dir.path(), "vm:web/01", "weekly").unwrap_err();
        assert!(matches!(e, Error::PoolBusy(_)), "{e}");
        assert!(e.to_string().contains("job nightly"), "{e}");
        // Another resource is free.
        let b = ResourceLock::acquire(dir.path(), "vm:web02", "weekly").unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(
            a.path().file_name().unwrap().to_str().unwrap(),
            "vm%3Aweb%2F01.lock"
        );
        assert_eq!(file_name(".."), "%2E.");
        drop(a);
        let again = ResourceLock::acquire(dir.path(), "vm:web/01", "weekly").unwrap();
        drop(again);
        assert!(ResourceLock::acquire(dir.path(), "", "x").is_err());
        // Long names (100 non-ASCII characters: 600 encoded bytes) lock
        // too, each its own file.
        let long_a = format!("vm:{}", "ü".repeat(100));
        let long_b = format!("vm:{}ä", "ü".repeat(99));
        let la = ResourceLock::acquire(dir.path(), &long_a, "x").unwrap();
        let lb = ResourceLock::acquire(dir.path(), &long_b, "x").unwrap();
        assert_ne!(la.path(), lb.path());
        assert!(la.path().file_name().unwrap().len() < 255);
        assert!(ResourceLock::acquire(dir.path(), &long_a, "y").is_err());
    }
}
