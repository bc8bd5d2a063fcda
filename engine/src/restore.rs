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

use crate::backup::{validate_disk_name, Failure};
use crate::codec::{BlobCodec, Compression};
use crate::coding::DecodeError;
use crate::error::{Error, Result};
use crate::id::{ChunkId, PackId, SnapshotId};
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

/// The temporary name a restore writes `path` under until it is complete
/// (`.NAME.cairn-partial` beside it). Refuses an existing `path` unless
/// `overwrite`.
pub fn partial_path(path: &Path, overwrite: bool) -> Result<PathBuf> {
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
    out.clear();
    decode_chunk(codec, &blob, id, loc.pack, loc.offset, out)
}

/// Decodes the blob of chunk `id` (at `offset` in `pack`), appends the
/// verified plaintext to `out`, and names the chunk and pack on failure.
fn decode_chunk(
    codec: &mut BlobCodec,
    blob: &[u8],
    id: &ChunkId,
    pack: PackId,
    offset: u64,
    out: &mut Vec<u8>,
) -> Result<()> {
    match codec.decode_verified_append(blob, id, out) {
        Ok(()) => Ok(()),
        Err(DecodeError::ChecksumMismatch { got, .. }) => Err(Error::ChunkHashMismatch {
            chunk: *id,
            pack,
            // `got` is the hex of the content's id, made by the codec.
            got: ChunkId::from_hex(&got).unwrap_or(ChunkId([0; 32])),
        }),
        Err(e) => Err(Error::corrupt(
            format!("chunk {id} at offset {offset} of pack {pack}"),
            e,
        )),
    }
}

/// Most decoded bytes one read run covers.
const RUN_MAX: u64 = 4 << 20;

/// Chunks whose blobs lie back to back in one pack and whose extents lie back
/// to back on the disk: read with one range read, written with one `pwrite`.
struct Run {
    pack: PackId,
    pack_offset: u64,
    pack_len: u64,
    disk_offset: u64,
    disk_len: u64,
    /// (chunk id, blob length, extent length)
    chunks: Vec<(ChunkId, u32, u64)>,
}

/// Reads and verifies one run into `out` (cleared first).
fn read_run(
    repo: &Repository,
    codec: &mut BlobCodec,
    snapshot: &SnapshotId,
    disk: &DiskManifest,
    run: &Run,
    out: &mut Vec<u8>,
) -> Result<()> {
    let blobs = repo.pool().read_range(
        FileKind::Pack,
        &run.pack.to_hex(),
        run.pack_offset,
        run.pack_len as usize,
    )?;
    out.clear();
    let mut at = 0usize;
    let mut disk_at = run.disk_offset;
    for (id, blob_len, extent_len) in &run.chunks {
        let blob = blobs.get(at..at + *blob_len as usize).unwrap_or_default();
        let before = out.len();
        decode_chunk(codec, blob, id, run.pack, run.pack_offset + at as u64, out)?;
        if (out.len() - before) as u64 != *extent_len {
            return Err(Error::corrupt(
                format!("snapshot {snapshot}"),
                DecodeError::Invalid(format!(
                    "disk {:?}: extent at {disk_at} is {extent_len} bytes but chunk {id} holds {}",
                    disk.name,
                    out.len() - before
                )),
            ));
        }
        at += *blob_len as usize;
        disk_at += extent_len;
    }
    Ok(())
}

/// Restores one disk: the caller's thread groups extents into runs, workers
/// read, decode and verify runs, and one writer thread `pwrite`s them (one
/// writer: parallel writes to one file only contend on its inode lock).
fn restore_disk(
    repo: &Repository,
    snapshot: &SnapshotId,
    disk: &DiskManifest,
    target: &dyn DiskTarget,
    threads: usize,
    progress: &dyn Progress,
) -> Result<()> {
    let (run_tx, run_rx) = bounded::<Run>(threads * 4);
    let (write_tx, write_rx) = bounded::<(u64, Vec<u8>)>(threads + 1);
    let buffers = threads + 3;
    let (free_tx, free_rx) = bounded::<Vec<u8>>(buffers);
    for _ in 0..buffers {
        let _ = free_tx.send(Vec::with_capacity(RUN_MAX as usize + (1 << 20)));
    }
    let first = Failure::new();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (run_rx, write_tx, free_rx, first) =
                (run_rx.clone(), write_tx.clone(), free_rx.clone(), &first);
            scope.spawn(move || {
                let mut codec = BlobCodec::new(Compression::None);
                for run in run_rx.iter() {
                    if first.aborted() {
                        break;
                    }
                    let Ok(mut buf) = free_rx.recv() else { break };
                    match read_run(repo, &mut codec, snapshot, disk, &run, &mut buf) {
                        Ok(()) => {
                            if write_tx.send((run.disk_offset, buf)).is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            first.set(e);
                            break;
                        }
                    }
                }
            });
        }
        drop(run_rx);
        drop(write_tx);
        {
            let (first, free_tx) = (&first, free_tx.clone());
            scope.spawn(move || {
                for (offset, buf) in write_rx.iter() {
                    if !first.aborted() {
                        match target.write_at(offset, &buf) {
                            Ok(()) => progress.advance(buf.len() as u64),
                            Err(e) => first.set(e),
                        }
                    }
                    let _ = free_tx.send(buf);
                }
            });
        }
        let mut current: Option<Run> = None;
        let send = |run: Option<Run>| -> bool { run.is_none_or(|r| run_tx.send(r).is_ok()) };
        for e in &disk.extents {
            if first.aborted() {
                break;
            }
            let Some(id) = e.chunk else {
                progress.advance(e.length);
                if !send(current.take()) {
                    break;
                }
                continue;
            };
            let Some(loc) = repo.index().lookup(&id) else {
                first.set(Error::ChunkMissing {
                    chunk: id,
                    needed_by: format!(
                        "snapshot {snapshot}, disk {:?} at offset {}",
                        disk.name, e.offset
                    ),
                });
                break;
            };
            if let Some(run) = &mut current {
                let joins = run.pack == loc.pack
                    && run.pack_offset + run.pack_len == loc.offset
                    && run.disk_offset + run.disk_len == e.offset
                    && run.disk_len + e.length <= RUN_MAX;
                if joins {
                    run.pack_len += loc.length as u64;
                    run.disk_len += e.length;
                    run.chunks.push((id, loc.length, e.length));
                    continue;
                }
            }
            let next = Run {
                pack: loc.pack,
                pack_offset: loc.offset,
                pack_len: loc.length as u64,
                disk_offset: e.offset,
                disk_len: e.length,
                chunks: vec![(id, loc.length, e.length)],
            };
            if !send(current.replace(next)) {
                break;
            }
        }
        if !first.aborted() {
            send(current.take());
        }
        drop(run_tx);
        drop(free_tx);
    });
    match first.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
