//! Resume mid-disk (spec B13): a local journal per disk of the extents a
//! backup has made durable, so a backup interrupted (killed, cancelled, a
//! failed read) and started again on the *same* source continues where it
//! stopped instead of reading the disk again from the start.
//!
//! A journal belongs to one pool, VM, disk, source identity (a raw file's
//! device, inode, size, mtime and ctime — [`DiskSource::identity`]) and
//! chunking: its file name is the BLAKE3 hash of those (see
//! `docs/FORMAT.md`, "Resume journal"), so a changed source never resumes
//! from it. One backup at a time keeps a journal (an exclusive `flock`; a
//! second backup of the same disk runs without one). Extents are
//! journaled when they should be durable: zero runs, chunks the index
//! already held, chunks in packs already sealed (the assembler appends
//! when a pack's seal completes, and when nothing is pending) — except a
//! chunk another worker of the same backup claimed, whose blob may still
//! be on its way. So on resume every journaled chunk is looked up in the
//! index (which indexes an interrupted backup's sealed packs from their
//! tables) and must be no longer than a chunk can be; the prefix ends at
//! the first that fails, and on the chunk grid. The journal is removed
//! when the backup's snapshot is written.
//!
//! [`DiskSource::identity`]: crate::DiskSource::identity

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::chunker::ChunkingParams;
use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::store::index::Index;

use super::Excluded;

/// The journal's magic and version.
pub const JOURNAL_MAGIC: &[u8; 8] = b"CAIRNRJ1";
/// One extent in a journal record: length u64 LE, kind u8 (0 zeros, 1
/// chunk), chunk id (32 bytes, zero for zeros).
const ENTRY_LEN: usize = 8 + 1 + 32;
/// Most entries in one record.
pub const MAX_RECORD_ENTRIES: u32 = 1 << 16;

/// An extent of a disk: its length and its chunk (`None`: zeros).
pub type Extent = (u64, Option<ChunkId>);

/// The key of a disk's journal (see the module docs).
pub fn journal_key(
    pool_id: &[u8],
    vm: &str,
    disk: &str,
    identity: &str,
    chunking: ChunkingParams,
) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for part in [pool_id, vm.as_bytes(), disk.as_bytes(), identity.as_bytes()] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(chunking.to_string().as_bytes());
    *h.finalize().as_bytes()
}

/// Encodes one record: count u32 LE, the entries, then the first 16 bytes
/// of the BLAKE3 hash of count and entries.
pub fn encode_record(extents: &[Extent]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + extents.len() * ENTRY_LEN + 16);
    out.extend_from_slice(&(extents.len() as u32).to_le_bytes());
    for (len, id) in extents {
        out.extend_from_slice(&len.to_le_bytes());
        match id {
            Some(id) => {
                out.push(1);
                out.extend_from_slice(id.as_bytes());
            }
            None => {
                out.push(0);
                out.extend_from_slice(&[0u8; 32]);
            }
        }
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(&sum.as_bytes()[..16]);
    out
}

/// Reads a journal's records one at a time from any reader: each whole,
/// valid record's extents, until the end or the first torn or damaged
/// record (a crash mid-append ends the journal there). Memory holds one
/// record (at most [`MAX_RECORD_ENTRIES`] extents).
pub struct RecordReader<R> {
    input: R,
    /// Bytes of valid records (and header) read so far.
    pos: u64,
    done: bool,
}

impl<R: Read> RecordReader<R> {
    /// Reads the header; a journal of another key, or without the magic,
    /// holds no record.
    pub fn new(mut input: R, key: &[u8; 32]) -> Self {
        let mut head = [0u8; 40];
        let ok =
            input.read_exact(&mut head).is_ok() && &head[..8] == JOURNAL_MAGIC && &head[8..] == key;
        RecordReader {
            input,
            pos: if ok { 40 } else { 0 },
            done: !ok,
        }
    }

    /// Bytes of the header and the valid records read so far (0 when the
    /// header is not this key's).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next valid record's extents; `None` at the end of the valid ones.
    pub fn next_record(&mut self) -> Option<Vec<Extent>> {
        if self.done {
            return None;
        }
        let record = self.read_record();
        if record.is_none() {
            self.done = true;
        }
        record
    }

    fn read_record(&mut self) -> Option<Vec<Extent>> {
        let mut count = [0u8; 4];
        self.input.read_exact(&mut count).ok()?;
        let count = u32::from_le_bytes(count);
        if count == 0 || count > MAX_RECORD_ENTRIES {
            return None;
        }
        let body = 4 + count as usize * ENTRY_LEN;
        let mut record = vec![0u8; body + 16];
        record[..4].copy_from_slice(&count.to_le_bytes());
        self.input.read_exact(&mut record[4..]).ok()?;
        if blake3::hash(&record[..body]).as_bytes()[..16] != record[body..] {
            return None;
        }
        let mut parsed = Vec::with_capacity(count as usize);
        for e in record[4..body].chunks_exact(ENTRY_LEN) {
            let mut len = [0u8; 8];
            len.copy_from_slice(&e[..8]);
            let len = u64::from_le_bytes(len);
            let mut id = [0u8; 32];
            id.copy_from_slice(&e[9..]);
            match e[8] {
                0 if id == [0u8; 32] && len > 0 => parsed.push((len, None)),
                1 if len > 0 => parsed.push((len, Some(ChunkId(id)))),
                _ => return None,
            }
        }
        self.pos += record.len() as u64;
        Some(parsed)
    }
}

/// Decodes a journal's bytes for `key`: the extents of every whole, valid
/// record from the start, and how many bytes those records span (a torn
/// or damaged tail — a crash mid-append — ends the journal there). A
/// journal of another key, or without the magic, holds nothing.
#[cfg(any(test, feature = "internals"))]
pub fn decode_journal(bytes: &[u8], key: &[u8; 32]) -> (Vec<Extent>, usize) {
    let mut r = RecordReader::new(bytes, key);
    let mut extents = Vec::new();
    while let Some(record) = r.next_record() {
        extents.extend(record);
    }
    // Without a valid header nothing counts, as before (0 bytes used).
    let used = if r.position() == 0 {
        0
    } else {
        r.position() as usize
    };
    (extents, used)
}

/// A disk's journal, open for appending.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
}

/// What a disk resumes from.
#[derive(Debug)]
pub struct DiskResume {
    /// The journal, appended as the backup goes on.
    pub journal: Journal,
    /// Its total length: the offset reading starts at. The extents that
    /// make it are the journal's records from the start (read again,
    /// record by record, by [`read_prefix`]).
    pub prefix_len: u64,
    /// The journal's key (to read the prefix back).
    pub key: [u8; 32],
}

/// Where a resumed disk's prefix is read from: the first `len` bytes of
/// extents in the journal at `path` (of `key`).
#[derive(Debug, Clone)]
pub struct Prefix {
    /// Bytes of the disk the prefix covers.
    pub len: u64,
    /// The journal.
    pub path: PathBuf,
    /// Its key.
    pub key: [u8; 32],
}

/// Calls `f` with the extents of the first `len` bytes the journal at
/// `path` (of `key`) holds, one record at a time, until `f` returns false.
/// Returns whether every piece was taken. The journal holds at least that
/// much: [`Journal::open`] cut it to exactly its usable prefix.
pub fn read_prefix(
    path: &Path,
    key: &[u8; 32],
    len: u64,
    f: &mut dyn FnMut(Vec<Extent>) -> bool,
) -> Result<bool> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let mut records = RecordReader::new(std::io::BufReader::new(file), key);
    let mut at = 0u64;
    while at < len {
        let Some(mut record) = records.next_record() else {
            return Err(Error::Internal(format!(
                "resume journal {} ends at {at} of its prefix of {len} bytes",
                path.display()
            )));
        };
        // Keep what lies before `len` (it ends on a record's extent).
        let mut keep = 0;
        for (l, _) in &record {
            if at >= len {
                break;
            }
            at += l;
            keep += 1;
        }
        record.truncate(keep);
        if !f(record) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("resume journal {}", path.display()), e)
}

impl Journal {
    /// Opens (or starts) the journal of `key` in `dir` and returns the
    /// usable prefix: the journaled extents whose chunks `index` holds in
    /// copies `excluded` lets be reused, none longer than `max_chunk`, cut
    /// back to a multiple of `grid` and to at most `size`. The file is cut to that
    /// prefix. `Ok(None)` when another backup holds the journal (two
    /// backups of one disk at once: only the first keeps a journal).
    pub fn open(
        dir: &Path,
        key: &[u8; 32],
        index: &Index,
        excluded: &Excluded,
        (grid, max_chunk): (u64, u64),
        size: u64,
    ) -> Result<Option<DiskResume>> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let name: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let path = dir.join(format!("{name}.journal"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        // One writer per journal; the kernel drops the lock with the
        // process, however it ends.
        if !crate::file_lock::try_lock_exclusive(&file).unwrap_or(false) {
            return Ok(None);
        }
        // The usable prefix, record by record: chunks the index holds
        // outside `excluded`, none longer than a chunk, within `size`,
        // ending on the grid. Only where it ends is kept: the byte offset
        // of the last whole record before it, and the entries of the
        // record it ends in (at most one record's worth).
        let reader = file.try_clone().map_err(|e| io_err(&path, e))?;
        let mut records = RecordReader::new(std::io::BufReader::new(reader), key);
        let (mut len, mut aligned_len) = (0u64, 0u64);
        // Where the prefix ends: whole records up to `cut`, then `tail`.
        let (mut cut, mut tail): (u64, Vec<Extent>) = (records.position(), Vec::new());
        'records: loop {
            let start = records.position();
            let Some(record) = records.next_record() else {
                break;
            };
            let n = record.len();
            for (i, (l, id)) in record.iter().enumerate() {
                if let Some(id) = id {
                    match index.lookup(id) {
                        Some(loc) if excluded.reusable(id, &loc) && *l <= max_chunk => {}
                        _ => break 'records,
                    }
                }
                match len.checked_add(*l) {
                    Some(end) if end <= size => len = end,
                    _ => break 'records,
                }
                if len % grid.max(1) == 0 {
                    aligned_len = len;
                    if i + 1 == n {
                        (cut, tail) = (records.position(), Vec::new());
                    } else {
                        (cut, tail) = (start, record[..=i].to_vec());
                    }
                }
            }
        }
        // Cut the journal to exactly that prefix (a fresh header when it
        // held none of this key).
        let write = |file: &mut File| -> std::io::Result<()> {
            if cut == 0 {
                file.set_len(0)?;
                file.seek(SeekFrom::Start(0))?;
                file.write_all(JOURNAL_MAGIC)?;
                file.write_all(key)?;
            } else {
                file.set_len(cut)?;
                file.seek(SeekFrom::Start(cut))?;
                if !tail.is_empty() {
                    file.write_all(&encode_record(&tail))?;
                }
            }
            file.sync_data()
        };
        write(&mut file).map_err(|e| io_err(&path, e))?;
        Ok(Some(DiskResume {
            journal: Journal { path, file },
            prefix_len: aligned_len,
            key: *key,
        }))
    }

    /// Appends `extents` (durable ones) as one or more records.
    pub fn append(&mut self, extents: &[Extent]) -> Result<()> {
        if extents.is_empty() {
            return Ok(());
        }
        for piece in extents.chunks(MAX_RECORD_ENTRIES as usize) {
            self.file
                .write_all(&encode_record(piece))
                .map_err(|e| io_err(&self.path, e))?;
        }
        // Not synced: a process killed keeps what it wrote (the page cache
        // does), and after a machine crash a stale or torn journal only
        // resumes less (every entry is checked against the index). A sync
        // per pack cost a tenth of a backup's time on ext4.
        crate::failpoint::pause("backup-after-journal");
        Ok(())
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_cut() {
        let key = [7u8; 32];
        let mut bytes = JOURNAL_MAGIC.to_vec();
        bytes.extend_from_slice(&key);
        let a = vec![(4096, Some(id(1))), (1 << 20, None)];
        let b = vec![(4096, Some(id(2)))];
        bytes.extend_from_slice(&encode_record(&a));
        let after_a = bytes.len();
        bytes.extend_from_slice(&encode_record(&b));
        let (all, used) = decode_journal(&bytes, &key);
        assert_eq!(all, [a.clone(), b.clone()].concat());
        assert_eq!(used, bytes.len());
        // Every cut inside the second record keeps exactly the first.
        for cut in after_a..bytes.len() {
            let (got, used) = decode_journal(&bytes[..cut], &key);
            assert_eq!(got, a, "cut at {cut}");
            assert_eq!(used, after_a);
        }
        // A flipped byte in the second record ends the journal before it.
        for at in after_a..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            assert_eq!(decode_journal(&bad, &key).0, a, "flip at {at}");
        }
        // Another key, or no magic: nothing.
        assert!(decode_journal(&bytes, &[8u8; 32]).0.is_empty());
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(decode_journal(&bad, &key).0.is_empty());
        // A zero entry with a non-zero id, or a zero length, is invalid.
        let mut rec = encode_record(&[(4096, None)]);
        rec[4 + 9] = 1;
        let body = rec.len() - 16;
        let sum = blake3::hash(&rec[..body]);
        rec[body..].copy_from_slice(&sum.as_bytes()[..16]);
        let mut j = JOURNAL_MAGIC.to_vec();
        j.extend_from_slice(&key);
        j.extend_from_slice(&rec);
        assert!(decode_journal(&j, &key).0.is_empty());
    }

    #[test]
    fn keys_differ_by_every_part() {
        let c = ChunkingParams::default();
        let base = journal_key(b"pool", "vm", "vda", "file:1:2", c);
        assert_ne!(base, journal_key(b"pool2", "vm", "vda", "file:1:2", c));
        assert_ne!(base, journal_key(b"pool", "vm2", "vda", "file:1:2", c));
        assert_ne!(base, journal_key(b"pool", "vm", "vdb", "file:1:2", c));
        assert_ne!(base, journal_key(b"pool", "vm", "vda", "file:1:3", c));
        assert_ne!(
            base,
            journal_key(
                b"pool",
                "vm",
                "vda",
                "file:1:2",
                ChunkingParams::Fixed { size: 1 << 20 }
            )
        );
        // Lengths are part of the hash: parts cannot shift into each other.
        assert_ne!(
            journal_key(b"pool", "vmv", "da", "x", c),
            journal_key(b"pool", "vm", "vda", "x", c)
        );
    }
}
