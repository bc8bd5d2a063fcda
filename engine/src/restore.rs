//! The restore pipeline: manifest → chunk reads (verified against their ids)
//! → writes at each extent's offset into a [`DiskTarget`]. Zero extents are
//! never written, so a sparse file keeps them as holes.
//!
//! The caller's thread walks the extents and feeds a bounded queue; worker
//! threads look chunks up, read and decode their blobs, check the BLAKE3 id,
//! and `pwrite` the data. Memory is bounded by the queue, not the disk.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crossbeam_channel::bounded;

use crate::backup::validate_disk_name;
use crate::codec::{BlobCodec, Compression};
use crate::coding::DecodeError;
use crate::error::{Error, Result};
use crate::id::{ChunkId, SnapshotId};
use crate::manifest::DiskManifest;
use crate::pool::FileKind;
use crate::progress::Progress;
use crate::repo::Repository;

/// Where a restored disk goes.
pub trait DiskTarget: Send + Sync {
    /// Writes `data` at `offset`. Regions never written read as zeros.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes the disk durable and visible. Dropping without `finish` discards it.
    fn finish(self: Box<Self>) -> Result<()>;
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
        if !overwrite && path.exists() {
            return Err(Error::InvalidArgument(format!(
                "restore target {} already exists (pass --force to overwrite)",
                path.display()
            )));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.cairn-partial"));
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
        self.file
            .sync_all()
            .map_err(|e| Error::io(format!("syncing {}", self.tmp.display()), e))?;
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| Error::io(format!("renaming into {}", self.path.display()), e))?;
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))?;
        }
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

/// Restore settings.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Worker threads (0 = one per CPU).
    pub threads: usize,
    /// Replace existing target files.
    pub overwrite: bool,
}

/// What a restore did.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoreStats {
    pub snapshot: SnapshotId,
    pub disks: usize,
    pub bytes_logical: u64,
    /// Bytes of chunk data written (zero extents are holes).
    pub bytes_written: u64,
    pub chunks: u64,
    pub seconds: f64,
}

/// Restores every disk of a snapshot into `dir/<disk name>` as sparse raw files.
pub fn restore_to_dir(
    repo: &Repository,
    id: &SnapshotId,
    dir: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreStats> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating restore directory {}", dir.display()), e))?;
    let overwrite = opts.overwrite;
    restore(
        repo,
        id,
        &|disk: &DiskManifest| {
            validate_disk_name(&disk.name)?;
            let t = SparseFileTarget::create(&dir.join(&disk.name), disk.size, overwrite)?;
            Ok(Box::new(t) as Box<dyn DiskTarget>)
        },
        opts,
        progress,
    )
}

/// Restores every disk of a snapshot into targets made by `make_target`.
pub fn restore(
    repo: &Repository,
    id: &SnapshotId,
    make_target: &dyn Fn(&DiskManifest) -> Result<Box<dyn DiskTarget>>,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreStats> {
    let started = Instant::now();
    let snapshot = repo.load_snapshot(id)?;
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    progress.start(snapshot.bytes_logical());
    let mut stats = RestoreStats {
        snapshot: *id,
        disks: snapshot.disks.len(),
        bytes_logical: snapshot.bytes_logical(),
        bytes_written: 0,
        chunks: 0,
        seconds: 0.0,
    };
    for disk in &snapshot.disks {
        progress.message(&disk.name);
        let target = make_target(disk)?;
        restore_disk(repo, id, disk, &*target, threads, progress)?;
        target.finish()?;
        stats.bytes_written += disk.data_bytes();
        stats.chunks += disk.extents.iter().filter(|e| e.chunk.is_some()).count() as u64;
    }
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// Reads one chunk from the pool and checks it against its id.
pub fn read_chunk(
    repo: &Repository,
    codec: &mut BlobCodec,
    id: &ChunkId,
    needed_by: &dyn Fn() -> String,
    out: &mut Vec<u8>,
) -> Result<()> {
    let loc = repo.index().lookup(id).ok_or_else(|| Error::ChunkMissing {
        chunk: *id,
        needed_by: needed_by(),
    })?;
    let blob = repo.pool().read_range(
        FileKind::Pack,
        &loc.pack.to_hex(),
        loc.offset,
        loc.length as usize,
    )?;
    match codec.decode_verified(&blob, id, out) {
        Ok(()) => Ok(()),
        Err(DecodeError::ChecksumMismatch { .. }) => Err(Error::ChunkHashMismatch {
            chunk: *id,
            pack: loc.pack,
            got: ChunkId::of(out),
        }),
        Err(e) => Err(Error::corrupt(
            format!("chunk {id} at offset {} of pack {}", loc.offset, loc.pack),
            e,
        )),
    }
}

fn restore_disk(
    repo: &Repository,
    snapshot: &SnapshotId,
    disk: &DiskManifest,
    target: &dyn DiskTarget,
    threads: usize,
    progress: &dyn Progress,
) -> Result<()> {
    let (tx, rx) = bounded::<(u64, u64, ChunkId)>(threads * 64);
    let failure = parking_lot::Mutex::new(None::<Error>);
    let failed = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let rx = rx.clone();
            let (failure, failed) = (&failure, &failed);
            scope.spawn(move || {
                let mut codec = BlobCodec::new(Compression::None);
                let mut buf = Vec::new();
                for (offset, length, id) in rx.iter() {
                    let needed_by = || {
                        format!("snapshot {snapshot}, disk {:?} at offset {offset}", disk.name)
                    };
                    let result = read_chunk(repo, &mut codec, &id, &needed_by, &mut buf).and_then(|()| {
                        if buf.len() as u64 != length {
                            return Err(Error::corrupt(
                                format!("snapshot {snapshot}"),
                                DecodeError::Invalid(format!(
                                    "disk {:?}: extent at {offset} is {length} bytes but chunk {id} holds {}",
                                    disk.name,
                                    buf.len()
                                )),
                            ));
                        }
                        target.write_at(offset, &buf)
                    });
                    match result {
                        Ok(()) => progress.advance(length),
                        Err(e) => {
                            failed.store(true, std::sync::atomic::Ordering::SeqCst);
                            failure.lock().get_or_insert(e);
                            break;
                        }
                    }
                }
            });
        }
        drop(rx);
        for e in &disk.extents {
            if failed.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            match e.chunk {
                Some(id) => {
                    if tx.send((e.offset, e.length, id)).is_err() {
                        break;
                    }
                }
                None => progress.advance(e.length),
            }
        }
        drop(tx);
    });
    match failure.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
