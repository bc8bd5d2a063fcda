//! [`RawFileSource`]: a raw image file or block device, its holes found with
//! `SEEK_DATA`/`SEEK_HOLE`, read with `pread` or (opt-in) memory-mapped.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::source::{DiskSource, MappedBytes, MappedDisk};

/// A read-only, shared file mapping.
struct FileMapping(memmap2::Mmap);

impl MappedBytes for FileMapping {
    fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn release(&self, range: Range<usize>) {
        // SAFETY: a shared, read-only file mapping: MADV_DONTNEED only unmaps
        // the pages; the next access faults them in again from the page
        // cache with the same content. No reference into the range is used
        // after release (the pipeline releases a batch after its last use).
        let _ = unsafe {
            self.0.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                range.start,
                range.end - range.start,
            )
        };
    }
}

/// What changes whenever a file's content may have: its device, inode,
/// size, mtime and ctime (the identity resume keys on).
pub fn file_identity(m: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{}:{}:{}:{}.{}:{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    )
}

/// Whether `file` lives on a network or FUSE file system (NFS, SMB/CIFS,
/// Ceph, GlusterFS via FUSE …), whose attributes may be cached.
fn remote_file_system(file: &File) -> bool {
    // SAFETY: fstatfs fills the zeroed struct; the descriptor is ours.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return true;
    }
    const REMOTE: [i64; 7] = [
        0x6969,      // NFS
        0x517B,      // SMB
        0xFF53_4D42, // CIFS
        0xFE53_4D42, // SMB2
        0x6573_5546, // FUSE
        0x00C3_6400, // Ceph
        0x0BD0_0BD0, // Lustre
    ];
    REMOTE.contains(&(st.f_type as i64))
}

/// A raw image file or block device.
pub struct RawFileSource {
    file: File,
    path: PathBuf,
    size: u64,
    map: Option<MappedDisk>,
}

impl std::fmt::Debug for RawFileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawFileSource")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("mapped", &self.map.is_some())
            .finish()
    }
}

impl RawFileSource {
    /// Opens a raw image file or block device for reading.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut file = File::open(&path)
            .map_err(|e| Error::io(format!("opening disk {}", path.display()), e))?;
        // Works for regular files and block devices alike.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(format!("sizing disk {}", path.display()), e))?;
        Ok(RawFileSource {
            file,
            path,
            size,
            map: None,
        })
    }

    /// Opens the disk and maps it into memory (explicit opt-in).
    ///
    /// Saves the copy from the page cache into read buffers (≈ 15 % of a
    /// full backup's CPU). Only for images nothing truncates while the backup
    /// runs (a snapshot, a stopped VM's disk): if the file shrinks under the
    /// mapping, the process gets SIGBUS. Block devices and empty files are
    /// read normally.
    pub fn open_mapped(path: impl AsRef<Path>) -> Result<Self> {
        let mut src = Self::open(path)?;
        let is_file = src.file.metadata().map(|m| m.is_file()).unwrap_or(false);
        if is_file && src.size > 0 {
            // SAFETY: the caller opted in to mapping a file that is not
            // truncated during the backup (documented above); the mapping is
            // read-only.
            let map = unsafe { memmap2::Mmap::map(&src.file) }
                .map_err(|e| Error::io(format!("mapping {}", src.path.display()), e))?;
            let _ = map.advise(memmap2::Advice::Sequential);
            src.map = Some(Arc::new(FileMapping(map)));
        }
        Ok(src)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Err` when the file is now shorter than when it was opened: its
    /// tail would otherwise read as a hole (zeros) — a snapshot of bytes
    /// the disk no longer has.
    fn unshrunk(&self) -> Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: lseek on a file descriptor we own; no memory is touched.
        let end = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
        if end < 0 {
            return Err(Error::io(
                format!("sizing disk {}", self.path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        if (end as u64) < self.size {
            return Err(Error::io(
                format!(
                    "disk {} shrank from {} to {end} bytes during the backup",
                    self.path.display(),
                    self.size
                ),
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            ));
        }
        Ok(())
    }
}

impl DiskSource for RawFileSource {
    fn size(&self) -> u64 {
        self.size
    }

    /// Regular files only: a block device's times say nothing about its
    /// content.
    fn identity(&self) -> Option<String> {
        let m = self.file.metadata().ok()?;
        m.is_file().then(|| format!("file:{}", file_identity(&m)))
    }

    /// Regular files on a local file system whose change time is over
    /// 2 s old: their state changes with every write (the change time
    /// cannot be set back). A file changed in the last 2 s may change
    /// again within the same clock tick of its change time, unseen (git's
    /// "racily clean" rule), and network or FUSE file systems may report
    /// cached attributes: those are always read.
    fn identity_proves_content(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(m) = self.file.metadata() else {
            return false;
        };
        if !m.is_file() || remote_file_system(&self.file) {
            return false;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        let changed = i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec());
        now - changed >= 2_000_000_000
    }

    #[allow(clippy::single_range_in_vec_init)] // one extent: the whole disk
    fn data_extents(&self) -> Result<Vec<Range<u64>>> {
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos: u64 = 0;
        while pos < self.size {
            // SAFETY: lseek on a file descriptor we own; no memory is touched.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let err = std::io::Error::last_os_error();
                return match err.raw_os_error() {
                    // ENXIO: no data after `pos` — or the file ends before
                    // the size it had when opened.
                    Some(libc::ENXIO) => self.unshrunk().map(|()| out),
                    // The file system cannot tell: treat everything as data.
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if out.is_empty() => {
                        Ok(vec![0..self.size])
                    }
                    _ => Err(Error::io(
                        format!("SEEK_DATA on {}", self.path.display()),
                        err,
                    )),
                };
            }
            let data = data as u64;
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            if hole < 0 {
                let err = std::io::Error::last_os_error();
                return Err(Error::io(
                    format!("SEEK_HOLE on {}", self.path.display()),
                    err,
                ));
            }
            let hole = (hole as u64).min(self.size);
            if hole > data {
                out.push(data..hole);
            }
            if hole <= pos {
                break;
            }
            pos = hole;
        }
        self.unshrunk()?;
        Ok(out)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            Error::io(
                format!(
                    "reading {} bytes at offset {offset} of {}",
                    buf.len(),
                    self.path.display()
                ),
                e,
            )
        })
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn mapped(&self) -> Option<MappedDisk> {
        self.map.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn finds_holes_in_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse.img");
        let mut f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(4 << 20)).unwrap();
        f.write_all(&[1u8; 8192]).unwrap();
        f.sync_all().unwrap();
        let src = RawFileSource::open(&p).unwrap();
        assert_eq!(src.size(), 8 << 20);
        let ext = src.data_extents().unwrap();
        // tmpfs / ext4 / xfs report the written block(s) only.
        let total: u64 = ext.iter().map(|r| r.end - r.start).sum();
        assert!(total < 1 << 20, "{ext:?}");
        assert!(ext
            .iter()
            .any(|r| r.start <= 4 << 20 && r.end >= (4 << 20) + 8192));
    }
}
