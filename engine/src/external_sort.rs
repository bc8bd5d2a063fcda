//! Sorting more fixed-size records than memory should hold: the external
//! sort behind garbage collection, index compaction, `repair --index` and
//! `verify`, so their memory does not grow with the pool.
//!
//! Records are collected in a buffer of a fixed byte budget; a full buffer
//! is sorted and written to a *run* file in a private scratch directory
//! (removed when the [`ScratchDir`] is dropped, also on error). `finish`
//! merges the runs (at most [`MAX_FAN_IN`] at a time, in several rounds for
//! a very large input) into one sorted file that can be read any number of
//! times. Input that fits the budget never touches the disk.
//!
//! Scratch space lives under `$TMPDIR` (or a directory the caller names) and
//! needs about the records' size once more during the last merge: 64 bytes
//! per index entry, 32 per live chunk id.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Bytes of records an [`ExternalSorter`] holds before it spills a run.
pub const DEFAULT_SORT_BUDGET: usize = 8 << 20;

/// The sort budget: [`DEFAULT_SORT_BUDGET`], or `CAIRN_SORT_BUDGET` bytes
/// when set — a test knob that makes small pools spill (0: 16 records per
/// run), so the on-disk paths are exercised by ordinary tests.
pub fn sort_budget() -> usize {
    std::env::var("CAIRN_SORT_BUDGET")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SORT_BUDGET)
}

/// Where scratch directories go by default: `$CAIRN_SCRATCH_DIR`, else
/// `$TMPDIR`, else `/var/tmp` (on disk on most systems, where `/tmp` may
/// be a RAM-backed tmpfs), else the system's temporary directory.
pub fn default_scratch_parent() -> PathBuf {
    if let Some(d) = std::env::var_os("CAIRN_SCRATCH_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("TMPDIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let var_tmp = Path::new("/var/tmp");
    if var_tmp.is_dir() {
        return var_tmp.to_path_buf();
    }
    std::env::temp_dir()
}

/// Runs merged at once (each takes one read buffer).
pub const MAX_FAN_IN: usize = 64;

/// Read and write buffer of each scratch file.
const IO_BUFFER: usize = 128 << 10;

/// A record of fixed encoded size, sorted by its `Ord`.
pub trait Record: Copy + Ord {
    /// Encoded length in bytes.
    const LEN: usize;
    /// Writes the record into `out` (exactly `LEN` bytes).
    fn put(&self, out: &mut [u8]);
    /// Reads a record written by [`put`](Record::put).
    fn get(bytes: &[u8]) -> Self;
}

/// Writes a record's fixed fields one after another (see [`Record::put`]).
pub(crate) struct FieldWriter<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl<'a> FieldWriter<'a> {
    /// Starts at the first byte of `out`.
    pub(crate) fn new(out: &'a mut [u8]) -> Self {
        FieldWriter { out, at: 0 }
    }
    /// Appends raw bytes.
    pub(crate) fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.out[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
        self
    }
    /// Appends a little-endian u64.
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Appends a little-endian u32.
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
}

/// Reads the fields a [`FieldWriter`] wrote, in the same order (see
/// [`Record::get`]).
pub(crate) struct FieldReader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> FieldReader<'a> {
    /// Starts at the first byte of `b`.
    pub(crate) fn new(b: &'a [u8]) -> Self {
        FieldReader { b, at: 0 }
    }
    /// The next `N` bytes.
    pub(crate) fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&self.b[self.at..self.at + N]);
        self.at += N;
        a
    }
    /// The next little-endian u64.
    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
    /// The next little-endian u32.
    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
}

/// Name prefix of scratch directories: `cairn-sort-<owner tag>~<random>`
/// (see [`crate::process`]).
const SCRATCH_PREFIX: &str = "cairn-sort-";

/// Removes scratch directories under `parent` whose owner (by its tag) was
/// a process of this machine that is gone. Best effort; directories of
/// live processes, other machines and other namespaces are left alone.
fn remove_orphans(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(tag) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|n| n.rsplit_once('~'))
            .map(|(tag, _)| tag.to_string())
        else {
            continue;
        };
        if crate::process::owner_is_gone(&tag) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A private directory for run files, deleted with everything in it on drop.
#[derive(Debug)]
pub struct ScratchDir {
    dir: tempfile::TempDir,
    next: std::sync::atomic::AtomicU64,
}

impl ScratchDir {
    /// Creates a scratch directory under `parent`, or under
    /// [`default_scratch_parent`]. Directories left there by processes that
    /// no longer run (killed: a `TempDir` is removed on drop, not on
    /// SIGKILL) are removed first.
    pub fn new(parent: Option<&Path>) -> Result<Self> {
        let parent = parent.map_or_else(default_scratch_parent, Path::to_path_buf);
        remove_orphans(&parent);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{SCRATCH_PREFIX}{}~", crate::process::owner_tag()))
            .tempdir_in(&parent)
            .map_err(|e| {
                Error::io(
                    format!("creating a scratch directory under {}", parent.display()),
                    e,
                )
            })?;
        Ok(ScratchDir {
            dir,
            next: Default::default(),
        })
    }

    /// The directory's path.
    #[cfg(test)]
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn new_file(&self, what: &str) -> Result<(PathBuf, BufWriter<File>)> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.path().join(format!("{what}-{n}"));
        let f = File::create(&path)
            .map_err(|e| Error::io(format!("creating scratch file {}", path.display()), e))?;
        Ok((path, BufWriter::with_capacity(IO_BUFFER, f)))
    }
}

/// Collects records and sorts them within a memory budget.
#[derive(Debug)]
pub struct ExternalSorter<'a, R: Record> {
    scratch: &'a ScratchDir,
    what: &'static str,
    buf: Vec<R>,
    limit: usize,
    runs: Vec<(PathBuf, u64)>,
    dedup: bool,
}

impl<'a, R: Record> ExternalSorter<'a, R> {
    /// A sorter whose buffer holds `budget` bytes of records; `what` names
    /// its scratch files (and errors about them). With `dedup`, equal
    /// records come out once.
    pub fn new(scratch: &'a ScratchDir, what: &'static str, budget: usize, dedup: bool) -> Self {
        let limit = (budget / std::mem::size_of::<R>().max(1)).max(16);
        ExternalSorter {
            scratch,
            what,
            buf: Vec::new(),
            limit,
            runs: Vec::new(),
            dedup,
        }
    }

    /// Adds one record.
    pub fn push(&mut self, r: R) -> Result<()> {
        if self.buf.len() >= self.limit {
            self.spill()?;
        }
        self.buf.push(r);
        Ok(())
    }

    fn sort_buffer(&mut self) {
        self.buf.sort_unstable();
        if self.dedup {
            self.buf.dedup();
        }
    }

    fn spill(&mut self) -> Result<()> {
        self.sort_buffer();
        let (path, mut w) = self.scratch.new_file(self.what)?;
        let mut rec = vec![0u8; R::LEN];
        for r in &self.buf {
            r.put(&mut rec);
            w.write_all(&rec).map_err(|e| scratch_error(&path, e))?;
        }
        w.flush().map_err(|e| scratch_error(&path, e))?;
        self.runs.push((path, self.buf.len() as u64));
        self.buf.clear();
        // From now on the buffer is reused at its full size.
        self.buf.reserve_exact(self.limit);
        Ok(())
    }

    /// Sorts what was pushed.
    pub fn finish(mut self) -> Result<Sorted<R>> {
        if self.runs.is_empty() {
            self.sort_buffer();
            self.buf.shrink_to_fit();
            return Ok(Sorted {
                inner: SortedInner::Memory(std::mem::take(&mut self.buf)),
            });
        }
        if !self.buf.is_empty() {
            self.spill()?;
        }
        self.buf = Vec::new();
        let mut runs = std::mem::take(&mut self.runs);
        // Each run is sorted (and deduplicated) on its own already.
        while runs.len() > 1 {
            let mut next = Vec::new();
            for group in runs.chunks(MAX_FAN_IN) {
                next.push(self.merge(group)?);
            }
            runs = next;
        }
        let Some((path, count)) = runs.pop() else {
            return Ok(Sorted {
                inner: SortedInner::Memory(Vec::new()),
            });
        };
        Ok(Sorted {
            inner: SortedInner::File { path, count },
        })
    }

    /// Merges `runs` into one new run and deletes them.
    fn merge(&self, runs: &[(PathBuf, u64)]) -> Result<(PathBuf, u64)> {
        let mut readers = Vec::with_capacity(runs.len());
        for (path, count) in runs {
            readers.push(RunReader::open(path, *count)?);
        }
        let mut heap = BinaryHeap::new();
        for (i, r) in readers.iter_mut().enumerate() {
            if let Some(rec) = r.next_record()? {
                heap.push(Reverse((rec, i)));
            }
        }
        let (path, mut w) = self.scratch.new_file(self.what)?;
        let mut out = vec![0u8; R::LEN];
        let mut last: Option<R> = None;
        let mut count = 0u64;
        while let Some(Reverse((rec, i))) = heap.pop() {
            if let Some(next) = readers[i].next_record()? {
                heap.push(Reverse((next, i)));
            }
            if self.dedup && last == Some(rec) {
                continue;
            }
            last = Some(rec);
            rec.put(&mut out);
            w.write_all(&out).map_err(|e| scratch_error(&path, e))?;
            count += 1;
        }
        w.flush().map_err(|e| scratch_error(&path, e))?;
        drop(readers);
        for (p, _) in runs {
            let _ = std::fs::remove_file(p);
        }
        Ok((path, count))
    }
}

fn scratch_error(path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("scratch file {}", path.display()), e)
}

/// Records in ascending order (each once if the sorter deduplicated),
/// readable any number of times.
#[derive(Debug)]
pub struct Sorted<R: Record> {
    inner: SortedInner<R>,
}

#[derive(Debug)]
enum SortedInner<R> {
    Memory(Vec<R>),
    File { path: PathBuf, count: u64 },
}

impl<R> Drop for SortedInner<R> {
    /// The merged file goes as soon as the records are no longer needed,
    /// not only with the scratch directory.
    fn drop(&mut self) {
        if let SortedInner::File { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl<R: Record> Sorted<R> {
    /// Number of records.
    pub fn len(&self) -> u64 {
        match &self.inner {
            SortedInner::Memory(v) => v.len() as u64,
            SortedInner::File { count, .. } => *count,
        }
    }

    /// Reads the records from the start.
    pub fn iter(&self) -> Result<SortedIter<'_, R>> {
        Ok(match &self.inner {
            SortedInner::Memory(v) => SortedIter::Memory(v.iter()),
            SortedInner::File { path, count } => SortedIter::File(RunReader::open(path, *count)?),
        })
    }

    /// A cursor for membership tests of ascending keys.
    pub fn cursor(&self) -> Result<Cursor<'_, R>> {
        let mut it = self.iter()?;
        let next = it.next().transpose()?;
        Ok(Cursor { it, next })
    }
}

/// Reads one run file.
#[derive(Debug)]
pub struct RunReader<R> {
    path: PathBuf,
    reader: BufReader<File>,
    left: u64,
    buf: Vec<u8>,
    _r: PhantomData<R>,
}

impl<R: Record> RunReader<R> {
    fn open(path: &Path, count: u64) -> Result<Self> {
        let f = File::open(path)
            .map_err(|e| Error::io(format!("opening scratch file {}", path.display()), e))?;
        Ok(RunReader {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(IO_BUFFER, f),
            left: count,
            buf: vec![0u8; R::LEN],
            _r: PhantomData,
        })
    }

    fn next_record(&mut self) -> Result<Option<R>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.reader
            .read_exact(&mut self.buf)
            .map_err(|e| scratch_error(&self.path, e))?;
        self.left -= 1;
        Ok(Some(R::get(&self.buf)))
    }
}

/// Iterator over [`Sorted`] records.
#[derive(Debug)]
pub enum SortedIter<'a, R: Record> {
    /// Records that never left memory.
    Memory(std::slice::Iter<'a, R>),
    /// Records read back from a scratch file.
    File(RunReader<R>),
}

impl<R: Record> Iterator for SortedIter<'_, R> {
    type Item = Result<R>;

    fn next(&mut self) -> Option<Result<R>> {
        match self {
            SortedIter::Memory(it) => it.next().map(|r| Ok(*r)),
            SortedIter::File(r) => r.next_record().transpose(),
        }
    }
}

/// Answers "is this key in the set?" for keys asked in ascending order,
/// reading the sorted records once.
#[derive(Debug)]
pub struct Cursor<'a, R: Record> {
    it: SortedIter<'a, R>,
    next: Option<R>,
}

impl<R: Record> Cursor<'_, R> {
    /// True when `key` is among the records. Keys must not decrease from
    /// one call to the next.
    pub fn contains(&mut self, key: &R) -> Result<bool> {
        while let Some(n) = self.next {
            match n.cmp(key) {
                std::cmp::Ordering::Less => self.next = self.it.next().transpose()?,
                std::cmp::Ordering::Equal => return Ok(true),
                std::cmp::Ordering::Greater => return Ok(false),
            }
        }
        Ok(false)
    }
}

impl Record for crate::id::ChunkId {
    const LEN: usize = 32;
    fn put(&self, out: &mut [u8]) {
        out.copy_from_slice(&self.0);
    }
    fn get(bytes: &[u8]) -> Self {
        let mut id = [0u8; 32];
        id.copy_from_slice(&bytes[..32]);
        crate::id::ChunkId(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ChunkId;

    fn sorted_ids(n: u64, budget: usize, dedup: bool) -> (Vec<ChunkId>, Vec<ChunkId>, usize) {
        let scratch = ScratchDir::new(None).unwrap();
        let mut s = ExternalSorter::new(&scratch, "ids", budget, dedup);
        let mut expected = Vec::new();
        for i in 0..n {
            // Every id twice, in a scrambled order.
            let id = ChunkId::of(&(i % (n / 2 + 1)).to_le_bytes());
            s.push(id).unwrap();
            expected.push(id);
        }
        let spilled = s.runs.len();
        let sorted = s.finish().unwrap();
        let got: Vec<ChunkId> = sorted.iter().unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(got.len() as u64, sorted.len());
        expected.sort();
        if dedup {
            expected.dedup();
        }
        (got, expected, spilled)
    }

    #[test]
    fn in_memory_sort_matches_std() {
        let (got, expected, spilled) = sorted_ids(5000, 1 << 20, true);
        assert_eq!(spilled, 0);
        assert_eq!(got, expected);
    }

    #[test]
    fn spilled_runs_merge_in_order_with_and_without_dedup() {
        // 16 records per run: thousands of runs, several merge rounds.
        for dedup in [true, false] {
            let (got, expected, spilled) = sorted_ids(50_000, 0, dedup);
            assert!(spilled > MAX_FAN_IN, "{spilled} runs");
            assert_eq!(got, expected, "dedup {dedup}");
        }
    }

    #[test]
    fn cursor_answers_membership_for_ascending_keys() {
        let scratch = ScratchDir::new(None).unwrap();
        let mut s = ExternalSorter::new(&scratch, "ids", 0, true);
        let mut all: Vec<ChunkId> = (0..3000u32)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        for id in all.iter().step_by(2) {
            s.push(*id).unwrap();
        }
        let members: std::collections::HashSet<ChunkId> = all.iter().step_by(2).copied().collect();
        let sorted = s.finish().unwrap();
        all.sort();
        let mut c = sorted.cursor().unwrap();
        for id in &all {
            assert_eq!(c.contains(id).unwrap(), members.contains(id));
        }
    }

    #[test]
    fn scratch_files_are_removed_with_the_directory() {
        let scratch = ScratchDir::new(None).unwrap();
        let path = scratch.path().to_path_buf();
        let mut s = ExternalSorter::new(&scratch, "ids", 0, false);
        for i in 0..5000u32 {
            s.push(ChunkId::of(&i.to_le_bytes())).unwrap();
        }
        let sorted = s.finish().unwrap();
        // One merged file is left of the runs, and goes with the records.
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 1);
        drop(sorted);
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0);
        drop(scratch);
        assert!(!path.exists());
    }

    #[test]
    fn directories_of_dead_processes_are_removed_live_ones_kept() {
        let parent = tempfile::tempdir().unwrap();
        let me = crate::process::owner_tag();
        let (machine, _) = me.rsplit_once('.').unwrap();
        // No process has pid 4194305 (above the kernel's maximum).
        let dead = parent
            .path()
            .join(format!("cairn-sort-{machine}.4194305~abc"));
        let mine = parent.path().join(format!("cairn-sort-{me}~def"));
        let elsewhere = parent.path().join("cairn-sort-other-0-0.4194305~ghi");
        let other = parent.path().join("unrelated");
        for d in [&dead, &mine, &elsewhere, &other] {
            std::fs::create_dir_all(d.join("x")).unwrap();
        }
        let scratch = ScratchDir::new(Some(parent.path())).unwrap();
        assert!(!dead.exists());
        assert!(mine.exists() && elsewhere.exists() && other.exists());
        assert!(scratch
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&format!("cairn-sort-{me}~")));
    }

    #[test]
    fn a_missing_scratch_parent_is_a_clear_error() {
        let err = ScratchDir::new(Some(Path::new("/nonexistent/cairn-scratch"))).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/cairn-scratch"),
            "{err}"
        );
    }
}
