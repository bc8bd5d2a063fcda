//! [`TapePool`]: a pool on tape cartridges in a library, behind the engine's
//! pool traits.
//!
//! Packs live on tape only; index segments, manifests and the pool's
//! configuration are written to tape too (so that a pool can be recovered
//! from its cartridges alone) and served from a local copy; everything else
//! (leases, notices, the snapshot catalog, settings, marks) is local. The
//! local side is a directory:
//!
//! ```text
//! DIR/pool/          a local directory pool: the copies and the local-only kinds
//! DIR/tape-catalog   where every object on tape lies (JSON lines, appended)
//! DIR/media.json     the media sets and their cartridges (replaced atomically)
//! DIR/staging/       objects being written (spooled before they go to tape)
//! DIR/lock           held while the pool is open (one process drives the tape)
//! ```
//!
//! On tape, every cartridge starts with a **label** (file 0: one block
//! `'L'` + JSON: barcode, media set, sequence number), followed by one tape
//! file per object part: a header block (`'H'` + JSON: kind, name, part
//! number, offset in the object), data blocks (`'D'` + up to 256 KiB),
//! a trailer block (`'T'` + JSON: part length; for the last part the
//! object's length and BLAKE3 hash), and a filemark.
//!
//! **Media sets**: the cartridges written together, in order. Objects are
//! appended to the set's last cartridge; when a write reaches the early
//! warning, the part is closed and the object goes on on the next
//! cartridge (a blank one from the library, labelled with the next
//! sequence number): objects span cartridges. A write error (a cartridge
//! that ends before its early warning, an I/O error) marks the set
//! incomplete — what was committed before stays readable — and the next
//! object starts a new set. A cartridge whose label names another set (or
//! no Cairn set) is never written over.
//!
//! Objects are spooled to `staging/` first and streamed to the drive in one
//! go when committed, so several writers can prepare objects at once while
//! the drive writes one after another at full speed.
//!
//! The tape catalog is rebuildable by scanning every cartridge
//! ([`TapePool::rebuild_catalog`]); objects deleted from the pool stay on
//! tape (a scan brings them back) until their media set is retired.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use cairn_engine::{
    Error, FileKind, ObjectWriter, PoolDelete, PoolList, PoolRead, PoolWrite, Result,
};
use parking_lot::Mutex;

use super::{Element, ReadOutcome, TapeDrive, TapeError, TapeLibrary, TapeResult, WriteOutcome};
use crate::LocalPool;

/// Payload bytes per data block.
pub const DATA_BLOCK: usize = 256 << 10;

const LABEL_TAG: u8 = b'L';
const HEADER_TAG: u8 = b'H';
const DATA_TAG: u8 = b'D';
const TRAILER_TAG: u8 = b'T';

const CATALOG_FILE: &str = "tape-catalog";
const MEDIA_FILE: &str = "media.json";

/// Kinds stored on tape (the first one only there).
fn on_tape(kind: FileKind) -> bool {
    matches!(
        kind,
        FileKind::Pack | FileKind::Index | FileKind::Snapshot | FileKind::Config
    )
}

/// The longest media set rotation (`media.json`'s `rotation_days`).
pub const MAX_ROTATION_DAYS: u32 = 3650;

fn kind_named(name: &str) -> Option<FileKind> {
    FileKind::ALL.into_iter().find(|k| k.dir_name() == name)
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Label {
    format: String,
    version: u32,
    /// The tape pool's id (`media.json`): cartridges of other pools are
    /// never taken in.
    pool: String,
    barcode: String,
    media_set: String,
    sequence: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    kind: String,
    name: String,
    media_set: String,
    /// Random per write of an object: the parts of one write belong
    /// together, whatever else of the same name is on tape.
    write: String,
    part: u32,
    offset: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Trailer {
    part_len: u64,
    /// Set on the last part: the object's length and BLAKE3 hash (hex).
    complete: Option<(u64, String)>,
}

/// Where one part of an object lies.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Part {
    barcode: String,
    /// Tape file number on that cartridge.
    file: u64,
    /// Offset of the part's first byte in the object.
    offset: u64,
    len: u64,
}

/// One line of the tape catalog.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum CatalogLine {
    Add {
        kind: String,
        name: String,
        /// The media set holding this copy (empty in catalogs written
        /// before objects could have copies in several sets: then the set
        /// of the first part's cartridge).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        media_set: String,
        size: u64,
        blake3: String,
        parts: Vec<Part>,
    },
    Delete {
        kind: String,
        name: String,
        /// Only the copy in this media set; every copy when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        media_set: Option<String>,
    },
}

/// One copy of an object on tape.
#[derive(Clone, Debug)]
struct Entry {
    /// The media set holding it.
    set: String,
    size: u64,
    blake3: String,
    parts: Vec<Part>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MediaState {
    version: u32,
    /// This tape pool's id, written into every label.
    #[serde(default)]
    pool: String,
    sets: Vec<MediaSet>,
    /// Retired media sets: their cartridges are scratch media, relabelled
    /// when a new set needs one; a catalog rebuild skips them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    retired: Vec<String>,
    /// A new media set starts with the first write after the current one
    /// is this many days old (0: only when closed by hand or by an error).
    #[serde(default)]
    rotation_days: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MediaSet {
    id: String,
    cartridges: Vec<SetCartridge>,
    /// A write failed in this set: nothing more is appended to it.
    incomplete: bool,
    /// Closed by the operator or by rotation: nothing more is appended.
    #[serde(default)]
    closed: bool,
    /// When the set was started (Unix seconds; 0 when unknown, after a
    /// catalog rebuild).
    #[serde(default)]
    created: u64,
}

impl MediaSet {
    fn open(&self) -> bool {
        !self.incomplete && !self.closed
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetCartridge {
    barcode: String,
    sequence: u32,
    /// The tape file the next object starts at.
    next_file: u64,
    /// Reached its early warning: nothing more is appended to it.
    full: bool,
}

/// A tape pool (see the module docs).
#[derive(Clone)]
pub struct TapePool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TapePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapePool")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

/// A handle to a [`TapePool`] that does not keep it open: the pool (and
/// the tape it drives) closes when the last [`TapePool`] goes.
#[derive(Clone, Debug, Default)]
pub struct WeakTapePool {
    shared: std::sync::Weak<Shared>,
}

impl WeakTapePool {
    /// The pool, while something else keeps it open.
    pub fn upgrade(&self) -> Option<TapePool> {
        self.shared.upgrade().map(|shared| TapePool { shared })
    }
}

struct Shared {
    dir: PathBuf,
    store: LocalPool,
    tape: Mutex<Tape>,
    _lock: File,
}

struct Tape {
    library: Box<dyn TapeLibrary>,
    drive: Box<dyn TapeDrive>,
    catalog: File,
    objects: Objects,
    media: MediaState,
    /// The label of the cartridge in the drive, once read since it was
    /// loaded.
    checked: Option<String>,
    /// The object part read last — (barcode, tape file), its bytes — so
    /// that reads of one pack in several ranges (a restore's runs) read the
    /// tape once, not once per range.
    last_part: Option<(String, u64, Arc<Vec<u8>>)>,
    /// What was streamed to the drive since the pool was opened.
    streamed: TapeWriteStats,
}

/// What a tape pool streamed to its drive since it was opened
/// ([`TapePool::write_stats`]): the rate a drive held while it wrote, and
/// how much of the time it was writing at all.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct TapeWriteStats {
    /// Objects written (each streamed in one go, from its first block to
    /// its filemark).
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Seconds spent streaming them (positioning and cartridge changes
    /// excluded).
    pub streaming_seconds: f64,
}

impl TapeWriteStats {
    /// Bytes per second while streaming (0 before any write).
    pub fn rate_held(&self) -> f64 {
        if self.streaming_seconds > 0.0 {
            self.bytes as f64 / self.streaming_seconds
        } else {
            0.0
        }
    }
}

fn tape_err(e: TapeError) -> Error {
    Error::PoolIo {
        op: "tape",
        kind: FileKind::Pack,
        name: String::new(),
        source: std::io::Error::other(e.to_string()),
    }
}

fn io_err(what: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(what.display().to_string(), e)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn random_hex() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b)
        .map_err(|e| Error::io("random source", std::io::Error::other(e.to_string())))?;
    Ok(hex(&b))
}

impl TapePool {
    /// Opens (creating what is missing of) the tape pool in `dir` on drive
    /// 0 of `library`. Fails with [`Error::PoolBusy`] when another process
    /// has it open.
    pub fn open(dir: impl AsRef<Path>, library: Box<dyn TapeLibrary>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let staging = dir.join("staging");
        std::fs::create_dir_all(&staging).map_err(io_err(&staging))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc != 0 {
            return Err(Error::PoolBusy(format!(
                "tape pool {} is in use by another process (one process drives the tape)",
                dir.display()
            )));
        }
        // Spooled objects of a process that died.
        if let Ok(entries) = std::fs::read_dir(dir.join("staging")) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let store = LocalPool::create(dir.join("pool")).map_err(Error::from)?;
        let mut media = load_media(&dir)?;
        if media.pool.is_empty() {
            // Saved with the first label; until then a rebuild may still
            // take the id from the cartridges (media.json lost).
            media.pool = random_hex()?;
        }
        let (catalog, objects) = load_catalog(&dir, &media)?;
        let drive = library.drive(0).map_err(tape_err)?;
        Ok(TapePool {
            shared: Arc::new(Shared {
                dir,
                store,
                tape: Mutex::new(Tape {
                    library,
                    drive,
                    catalog,
                    objects,
                    media,
                    checked: None,
                    last_part: None,
                    streamed: TapeWriteStats::default(),
                }),
                _lock: lock,
            }),
        })
    }

    /// The pool's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The media sets, oldest first, with what each holds.
    pub fn media_sets(&self) -> Vec<MediaSetInfo> {
        let tape = self.shared.tape.lock();
        let last = tape.media.sets.len().checked_sub(1);
        tape.media
            .sets
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut info = MediaSetInfo {
                    id: s.id.clone(),
                    state: if s.incomplete {
                        MediaSetState::Incomplete
                    } else if s.closed || Some(i) != last {
                        MediaSetState::Closed
                    } else {
                        MediaSetState::Open
                    },
                    created: s.created,
                    cartridges: s.cartridges.iter().map(|c| c.barcode.clone()).collect(),
                    objects: 0,
                    bytes: 0,
                    snapshots: Vec::new(),
                };
                for ((kind, name), copies) in &tape.objects {
                    for c in copies.iter().filter(|c| c.set == s.id) {
                        info.objects += 1;
                        info.bytes += c.size;
                        if *kind == FileKind::Snapshot {
                            info.snapshots.push(name.clone());
                        }
                    }
                }
                info.snapshots.sort();
                info
            })
            .collect()
    }

    /// A handle that does not keep the pool open.
    pub fn downgrade(&self) -> WeakTapePool {
        WeakTapePool {
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// The media set new objects go to, as a pool of its own
    /// ([`TapeMediaSet`]): backups and copies write through it so that a
    /// media set is self-contained. Starts a new set when there is no open
    /// one, or when the open one is older than the rotation period.
    pub fn current_set(&self) -> Result<TapeMediaSet> {
        let set = self.shared.tape.lock().current_set_id(&self.shared.dir)?;
        Ok(TapeMediaSet {
            shared: self.shared.clone(),
            set,
        })
    }

    /// Media set `id` as a pool of its own — to restore a snapshot from
    /// that set's cartridges alone (the whole pool may find a chunk in
    /// another set's copy first). Writes through it fail unless it is the
    /// open set.
    pub fn media_set(&self, id: &str) -> Result<TapeMediaSet> {
        let tape = self.shared.tape.lock();
        if !tape.media.sets.iter().any(|s| s.id == id) {
            return Err(Error::InvalidArgument(format!(
                "tape pool {} has no media set {id}",
                self.shared.dir.display()
            )));
        }
        Ok(TapeMediaSet {
            shared: self.shared.clone(),
            set: id.to_string(),
        })
    }

    /// The newest media set holding a copy of snapshot manifest `id`.
    pub fn newest_set_with(&self, kind: FileKind, name: &str) -> Option<String> {
        let tape = self.shared.tape.lock();
        let copies = tape.objects.get(&(kind, name.to_string()))?;
        tape.media
            .sets
            .iter()
            .rev()
            .find(|s| copies.iter().any(|c| c.set == s.id))
            .map(|s| s.id.clone())
    }

    /// Closes the open media set (nothing more is appended to it; the next
    /// write starts a new set). Returns its id, `None` when none was open.
    pub fn close_current_set(&self) -> Result<Option<String>> {
        let mut tape = self.shared.tape.lock();
        let Some(s) = tape.media.sets.last_mut().filter(|s| s.open()) else {
            return Ok(None);
        };
        s.closed = true;
        let id = s.id.clone();
        save_media(&self.shared.dir, &tape.media)?;
        Ok(Some(id))
    }

    /// What was streamed to the drive since the pool was opened.
    pub fn write_stats(&self) -> TapeWriteStats {
        self.shared.tape.lock().streamed
    }

    /// The rotation period in days (0: none).
    pub fn rotation_days(&self) -> u32 {
        self.shared.tape.lock().media.rotation_days
    }

    /// Sets the rotation period: the first write after the open media set
    /// is `days` old starts a new set (0: sets are only closed by hand or
    /// by a write error). At most 3650.
    pub fn set_rotation_days(&self, days: u32) -> Result<()> {
        if days > MAX_ROTATION_DAYS {
            return Err(Error::InvalidArgument(format!(
                "media set rotation of {days} days: the range is 0 (none) to 3650"
            )));
        }
        let mut tape = self.shared.tape.lock();
        tape.media.rotation_days = days;
        save_media(&self.shared.dir, &tape.media)
    }

    /// Retires a closed (or incomplete) media set: every copy of an object
    /// in it leaves the catalog — objects with a copy in another set stay
    /// — and its cartridges become scratch media that a new set relabels.
    /// Snapshots that only this set holds are gone from the pool
    /// afterwards: forget them first (the CLI does, refusing protected
    /// ones). The open set must be closed before it can be retired.
    pub fn retire_set(&self, id: &str) -> Result<RetiredSet> {
        let mut tape = self.shared.tape.lock();
        let tape = &mut *tape;
        let Some(index) = tape.media.sets.iter().position(|s| s.id == id) else {
            return Err(Error::InvalidArgument(
                if tape.media.retired.iter().any(|r| r == id) {
                    format!("media set {id} is retired already")
                } else {
                    format!(
                        "tape pool {} has no media set {id}",
                        self.shared.dir.display()
                    )
                },
            ));
        };
        if tape.media.sets[index].open() && index + 1 == tape.media.sets.len() {
            return Err(Error::InvalidArgument(format!(
                "media set {id} is the open one: close it first (cairn tape close)"
            )));
        }
        let mut report = RetiredSet {
            cartridges: tape.media.sets[index]
                .cartridges
                .iter()
                .map(|c| c.barcode.clone())
                .collect(),
            ..RetiredSet::default()
        };
        let mut keys: Vec<(FileKind, String)> = tape
            .objects
            .iter()
            .filter(|(_, copies)| copies.iter().any(|c| c.set == id))
            .map(|(k, _)| k.clone())
            .collect();
        // Manifests first: a crash part-way leaves no snapshot whose
        // chunks are gone.
        keys.sort_by_key(|(k, n)| (*k != FileKind::Snapshot, *k, n.clone()));
        for (kind, name) in keys {
            tape.append_catalog(
                &CatalogLine::Delete {
                    kind: kind.dir_name().into(),
                    name: name.clone(),
                    media_set: Some(id.to_string()),
                },
                &self.shared.dir,
            )?;
            let key = (kind, name);
            let mut left = 0;
            if let Some(copies) = tape.objects.get_mut(&key) {
                if let Some(c) = copies.iter().find(|c| c.set == id) {
                    report.objects += 1;
                    report.bytes += c.size;
                }
                copies.retain(|c| c.set != id);
                left = copies.len();
            }
            if left == 0 {
                tape.objects.remove(&key);
                // The configuration's local copy stays even when its last
                // tape copy goes: it is the pool's, and the next set gets
                // a copy of it with its first object.
                if key.0 != FileKind::Pack && key.0 != FileKind::Config {
                    match self.shared.store.delete(key.0, &key.1) {
                        Ok(()) => {}
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        // The set's own snapshot catalog objects.
        let prefix = format!("{id}.");
        for name in self.shared.store.list(FileKind::Catalog)? {
            if name.starts_with(&prefix) {
                match self.shared.store.delete(FileKind::Catalog, &name) {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
        }
        tape.media.sets.remove(index);
        tape.media.retired.push(id.to_string());
        tape.last_part = None;
        save_media(&self.shared.dir, &tape.media)?;
        Ok(report)
    }

    /// Where the parts of a stored object lie: (barcode, tape file), of
    /// its first copy.
    pub fn object_position(&self, kind: FileKind, name: &str) -> Option<Vec<(String, u64)>> {
        self.shared
            .tape
            .lock()
            .objects
            .get(&(kind, name.to_string()))
            .and_then(|copies| copies.first())
            .map(|e| {
                e.parts
                    .iter()
                    .map(|p| (p.barcode.clone(), p.file))
                    .collect()
            })
    }

    /// Rebuilds the tape catalog and the media state from the cartridges
    /// in the library (and the local copies of index segments, manifests
    /// and the configuration). Cartridges of this pool are those whose
    /// labels carry its id (from `media.json`; when that is lost too, the
    /// one tape pool whose cartridges are in the library — several are an
    /// error). Blank cartridges, those of other pools and unreadable labels
    /// are skipped and reported; any other read error stops the rebuild
    /// with nothing replaced. Of several complete copies of one object
    /// (written again after a withdrawal, say), the last one found wins.
    pub fn rebuild_catalog(&self) -> Result<TapeRebuild> {
        let mut tape = self.shared.tape.lock();
        let tape = &mut *tape;
        let barcodes: Vec<String> = tape
            .library
            .inventory()
            .map_err(tape_err)?
            .into_iter()
            .filter(|e| !matches!(e.element, Element::ImportExport(_)))
            .filter_map(|e| e.barcode)
            .collect();
        let mut report = TapeRebuild::default();
        let mut labelled: Vec<(String, Label)> = Vec::new();
        for barcode in &barcodes {
            match tape.load(barcode, &self.shared.dir, false) {
                Ok(None) => {}
                Ok(Some(label)) => labelled.push((barcode.clone(), label)),
                Err(e) if e.is_damage() => report.skipped.push((barcode.clone(), e.to_string())),
                Err(e) => return Err(e),
            }
        }
        let pool = if !tape.media.pool.is_empty() && self.shared.dir.join(MEDIA_FILE).exists() {
            tape.media.pool.clone()
        } else {
            let ids: std::collections::BTreeSet<&str> =
                labelled.iter().map(|(_, l)| l.pool.as_str()).collect();
            match ids.len() {
                0 => tape.media.pool.clone(),
                1 => ids.into_iter().next().unwrap_or_default().to_string(),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "the library holds cartridges of {} tape pools ({}); without this pool's media.json \
                         the rebuild cannot tell which are its own: leave only its cartridges in the library",
                        ids.len(),
                        ids.into_iter().collect::<Vec<_>>().join(", ")
                    )))
                }
            }
        };
        // (write id) → the parts of one write of an object.
        let mut writes: BTreeMap<String, Vec<ScannedPart>> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut sets: BTreeMap<String, Vec<SetCartridge>> = BTreeMap::new();
        for (barcode, label) in &labelled {
            if label.pool != pool {
                report.skipped.push((
                    barcode.clone(),
                    format!(
                        "labelled by tape pool {}, not this one ({pool})",
                        label.pool
                    ),
                ));
                continue;
            }
            if tape.media.retired.contains(&label.media_set) {
                report.skipped.push((
                    barcode.clone(),
                    format!("of retired media set {} (scratch)", label.media_set),
                ));
                continue;
            }
            tape.load(barcode, &self.shared.dir, false)?;
            let mut file = 1u64;
            while let Some((header, part, trailer)) =
                read_object_part(&mut *tape.drive, barcode, file, None)?
            {
                if let Some(t) = trailer {
                    if !writes.contains_key(&header.write) {
                        order.push(header.write.clone());
                    }
                    writes
                        .entry(header.write.clone())
                        .or_default()
                        .push((header, part, t.complete));
                }
                file += 1;
            }
            sets.entry(label.media_set.clone())
                .or_default()
                .push(SetCartridge {
                    barcode: barcode.clone(),
                    sequence: label.sequence,
                    next_file: file,
                    full: true,
                });
        }
        // Writes whose parts are all there, the last one complete; the
        // last one found of each name in each media set wins.
        let mut found: BTreeMap<(FileKind, String, String), Entry> = BTreeMap::new();
        for write in order {
            let Some(mut ps) = writes.remove(&write) else {
                continue;
            };
            ps.sort_by_key(|(h, _, _)| (h.part, h.offset));
            let Some((h0, _, _)) = ps.first() else {
                continue;
            };
            let (Some(kind), name) = (kind_named(&h0.kind), h0.name.clone()) else {
                continue;
            };
            let Some((_, _, Some((size, hash)))) = ps.last().cloned() else {
                continue;
            };
            let mut expect = 0u64;
            let mut whole = true;
            for (i, (h, p, _)) in ps.iter().enumerate() {
                whole &= h.part as usize == i && p.offset == expect && h.name == name;
                expect += p.len;
            }
            if !whole || expect != size {
                continue;
            }
            let set = h0.media_set.clone();
            if ps.iter().any(|(h, _, _)| h.media_set != set) {
                continue;
            }
            found.insert(
                (kind, name, set.clone()),
                Entry {
                    set,
                    size,
                    blake3: hash,
                    parts: ps.into_iter().map(|(_, p, _)| p).collect(),
                },
            );
        }
        // The media state first (appending resumes on a new set, after
        // everything found), then the catalog.
        let mut media = MediaState {
            version: 1,
            pool,
            sets: Vec::new(),
            retired: tape.media.retired.clone(),
            rotation_days: tape.media.rotation_days,
        };
        for (id, mut cartridges) in sets {
            cartridges.sort_by_key(|c| c.sequence);
            media.sets.push(MediaSet {
                id,
                cartridges,
                incomplete: true,
                closed: false,
                created: 0,
            });
        }
        save_media(&self.shared.dir, &media)?;
        tape.media = media;
        write_catalog(
            &self.shared.dir,
            found.iter().map(|((kind, name, _), e)| (*kind, name, e)),
        )?;
        let (catalog, objects) = load_catalog(&self.shared.dir, &tape.media)?;
        tape.catalog = catalog;
        tape.objects = objects;
        tape.last_part = None;
        report.objects = found.len();
        drop(found);
        Ok(report)
    }
}

/// What a media set is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MediaSetState {
    /// New objects are appended to it.
    Open,
    /// Closed by hand or by rotation: complete, nothing more is appended.
    Closed,
    /// A write failed in it (or the catalog was rebuilt, which cannot tell
    /// where the set ended): what it holds reads, nothing is appended.
    Incomplete,
}

impl MediaSetState {
    /// `open`, `closed` or `incomplete`.
    pub fn name(self) -> &'static str {
        match self {
            MediaSetState::Open => "open",
            MediaSetState::Closed => "closed",
            MediaSetState::Incomplete => "incomplete",
        }
    }
}

/// One media set of a tape pool ([`TapePool::media_sets`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MediaSetInfo {
    /// Its id (in every label and object header of the set).
    pub id: String,
    /// Whether it is appended to.
    pub state: MediaSetState,
    /// When it was started (Unix seconds; 0 when unknown).
    pub created: u64,
    /// Its cartridges' barcodes, in sequence.
    pub cartridges: Vec<String>,
    /// Objects with a copy in it.
    pub objects: usize,
    /// Their bytes.
    pub bytes: u64,
    /// The snapshot manifests in it (ids), sorted.
    pub snapshots: Vec<String>,
}

/// What [`TapePool::retire_set`] dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetiredSet {
    /// Object copies dropped from the catalog.
    pub objects: usize,
    /// Their bytes.
    pub bytes: u64,
    /// The cartridges now scratch media.
    pub cartridges: Vec<String>,
}

/// What [`TapePool::rebuild_catalog`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TapeRebuild {
    /// Objects in the new catalog.
    pub objects: usize,
    /// Cartridges not taken in, with why (another pool's, an unreadable
    /// label).
    pub skipped: Vec<(String, String)>,
}

/// A part found by a scan: its header, where it lies, and (last parts
/// only) the object's length and hash.
type ScannedPart = (Header, Part, Option<(u64, String)>);

fn load_media(dir: &Path) -> Result<MediaState> {
    let path = dir.join(MEDIA_FILE);
    let bad = |why: String| {
        Error::corrupt(
            format!("tape media state {}", path.display()),
            cairn_engine::DecodeError::Invalid(why),
        )
    };
    match std::fs::read(&path) {
        Ok(raw) => {
            let media: MediaState = serde_json::from_slice(&raw).map_err(|e| bad(e.to_string()))?;
            if media.version != 1 {
                return Err(bad(format!("version {} is not supported", media.version)));
            }
            if media.rotation_days > MAX_ROTATION_DAYS {
                return Err(bad(format!(
                    "rotation_days {} is out of range (0–{MAX_ROTATION_DAYS})",
                    media.rotation_days
                )));
            }
            Ok(media)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MediaState {
            version: 1,
            ..MediaState::default()
        }),
        Err(e) => Err(Error::io(path.display().to_string(), e)),
    }
}

fn save_media(dir: &Path, media: &MediaState) -> Result<()> {
    let path = dir.join(MEDIA_FILE);
    let tmp = dir.join(format!("{MEDIA_FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(media).map_err(|e| Error::Internal(e.to_string()))?;
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(io_err(&path))
}

/// Every object on tape: its copies, one per media set holding it.
type Objects = HashMap<(FileKind, String), Vec<Entry>>;

/// The media set a cartridge belongs to.
fn set_of(media: &MediaState, barcode: &str) -> Option<String> {
    media
        .sets
        .iter()
        .find(|s| s.cartridges.iter().any(|c| c.barcode == barcode))
        .map(|s| s.id.clone())
}

/// Adds (or replaces) the copy of an object in `entry.set`.
fn put_copy(objects: &mut Objects, key: (FileKind, String), entry: Entry) {
    let copies = objects.entry(key).or_default();
    copies.retain(|c| c.set != entry.set);
    copies.push(entry);
}

/// Replaces the catalog with one `add` line per copy (temp file, fsync,
/// rename).
fn write_catalog<'a>(
    dir: &Path,
    copies: impl Iterator<Item = (FileKind, &'a String, &'a Entry)>,
) -> Result<()> {
    let path = dir.join(CATALOG_FILE);
    let tmp = dir.join(format!("{CATALOG_FILE}.tmp"));
    {
        let mut f = std::io::BufWriter::new(File::create(&tmp).map_err(io_err(&tmp))?);
        for (kind, name, e) in copies {
            let line = CatalogLine::Add {
                kind: kind.dir_name().to_string(),
                name: name.clone(),
                media_set: e.set.clone(),
                size: e.size,
                blake3: e.blake3.clone(),
                parts: e.parts.clone(),
            };
            let mut s = serde_json::to_string(&line).map_err(|e| Error::Internal(e.to_string()))?;
            s.push('\n');
            f.write_all(s.as_bytes()).map_err(io_err(&tmp))?;
        }
        let f = f
            .into_inner()
            .map_err(|e| Error::io(tmp.display().to_string(), e.into_error()))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Opens the catalog for appending and reads it. A last line cut short (a
/// crash mid-append) is ignored; any other bad line is an error. A catalog
/// with `add` lines that do not name their media set (written before
/// objects could have copies in several sets) is rewritten with the sets
/// named, while the media state still tells which cartridge is whose.
fn load_catalog(dir: &Path, media: &MediaState) -> Result<(File, Objects)> {
    let (file, objects, legacy) = read_catalog(dir, media)?;
    if !legacy {
        return Ok((file, objects));
    }
    drop(file);
    write_catalog(
        dir,
        objects
            .iter()
            .flat_map(|((k, n), copies)| copies.iter().map(move |e| (*k, n, e))),
    )?;
    let (file, objects, _) = read_catalog(dir, media)?;
    Ok((file, objects))
}

fn read_catalog(dir: &Path, media: &MediaState) -> Result<(File, Objects, bool)> {
    let mut legacy = false;
    let path = dir.join(CATALOG_FILE);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .append(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let mut objects = HashMap::new();
    let mut raw = Vec::new();
    file.read_to_end(&mut raw).map_err(io_err(&path))?;
    let complete = raw.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    // A kind this build does not know is an error, not a line to skip: the
    // object would vanish from the pool.
    let known_kind = |kind: &str, n: usize| {
        kind_named(kind).ok_or_else(|| {
            Error::corrupt(
                format!("tape catalog {} line {}", path.display(), n + 1),
                cairn_engine::DecodeError::Invalid(format!("unknown object kind {kind:?}")),
            )
        })
    };
    for (n, line) in raw[..complete].lines().enumerate() {
        let line = line.map_err(io_err(&path))?;
        let parsed: CatalogLine = serde_json::from_str(&line).map_err(|e| {
            Error::corrupt(
                format!("tape catalog {} line {}", path.display(), n + 1),
                cairn_engine::DecodeError::Invalid(e.to_string()),
            )
        })?;
        match parsed {
            CatalogLine::Add {
                kind,
                name,
                media_set,
                size,
                blake3,
                parts,
            } => {
                let k = known_kind(&kind, n)?;
                legacy |= media_set.is_empty();
                let set = if media_set.is_empty() {
                    parts
                        .first()
                        .and_then(|p| set_of(media, &p.barcode))
                        .unwrap_or_default()
                } else {
                    media_set
                };
                put_copy(
                    &mut objects,
                    (k, name),
                    Entry {
                        set,
                        size,
                        blake3,
                        parts,
                    },
                );
            }
            CatalogLine::Delete {
                kind,
                name,
                media_set,
            } => {
                let k = known_kind(&kind, n)?;
                let key = (k, name);
                match media_set {
                    None => {
                        objects.remove(&key);
                    }
                    Some(set) => {
                        if let Some(copies) = objects.get_mut(&key) {
                            copies.retain(|c| c.set != set);
                            if copies.is_empty() {
                                objects.remove(&key);
                            }
                        }
                    }
                }
            }
        }
    }
    if complete < raw.len() {
        // Cut the torn line off so the next append starts a fresh one.
        file.set_len(complete as u64).map_err(io_err(&path))?;
    }
    file.seek(SeekFrom::End(0)).map_err(io_err(&path))?;
    Ok((file, objects, legacy))
}

/// One block with a tag and a JSON payload.
fn json_block<T: serde::Serialize>(tag: u8, value: &T) -> Result<Vec<u8>> {
    let mut b = vec![tag];
    serde_json::to_writer(&mut b, value).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(b)
}

fn parse_block<T: serde::de::DeserializeOwned>(
    block: &[u8],
    tag: u8,
    what: &str,
    barcode: &str,
) -> Result<T> {
    let bad = |why: String| {
        Error::corrupt(
            format!("tape cartridge {barcode}"),
            cairn_engine::DecodeError::Invalid(format!("{what}: {why}")),
        )
    };
    match block.split_first() {
        Some((t, rest)) if *t == tag => {
            serde_json::from_slice(rest).map_err(|e| bad(format!("not a Cairn {what}: {e}")))
        }
        _ => Err(bad(format!("expected a {what} block"))),
    }
}

/// Reads one block; `None` at a filemark or the end of data.
fn read_one(drive: &mut dyn TapeDrive, buf: &mut [u8]) -> Result<Option<usize>> {
    match drive.read_block(buf).map_err(tape_err)? {
        ReadOutcome::Block(n) => Ok(Some(n)),
        ReadOutcome::Filemark | ReadOutcome::EndOfData => Ok(None),
    }
}

/// Positions `drive` at the start of tape file `file` (moving forward when
/// it can).
fn seek_file(drive: &mut dyn TapeDrive, file: u64) -> TapeResult<()> {
    let pos = drive.position()?;
    if pos.file == file && pos.block == 0 {
        return Ok(());
    }
    if pos.file < file {
        return drive.space_filemarks((file - pos.file) as i64);
    }
    // Backwards: rewind and space forward (a real drive's file numbers
    // are only sure from the beginning of the medium).
    drive.rewind()?;
    if file > 0 {
        drive.space_filemarks(file as i64)?;
    }
    Ok(())
}

/// Reads the object part in tape file `file`: its header, its bytes (into
/// `out` when given, else skipped) and its trailer (`None` when it has
/// none: a write that never finished). `None` when the file does not exist.
fn read_object_part(
    drive: &mut dyn TapeDrive,
    barcode: &str,
    file: u64,
    mut out: Option<&mut Vec<u8>>,
) -> Result<Option<(Header, Part, Option<Trailer>)>> {
    match seek_file(drive, file) {
        Ok(()) => {}
        // Past the recorded data: there is no such file.
        Err(TapeError::BlankCheck { .. }) => return Ok(None),
        Err(e) => return Err(tape_err(e)),
    }
    let mut buf = vec![0u8; DATA_BLOCK + 1];
    let Some(n) = read_one(drive, &mut buf)? else {
        return Ok(None);
    };
    let header: Header = parse_block(&buf[..n], HEADER_TAG, "object header", barcode)?;
    let mut len = 0u64;
    let mut trailer = None;
    while let Some(n) = read_one(drive, &mut buf)? {
        match buf[0] {
            DATA_TAG => {
                len += (n - 1) as u64;
                if let Some(o) = out.as_deref_mut() {
                    o.extend_from_slice(&buf[1..n]);
                }
            }
            TRAILER_TAG => {
                let t: Trailer = parse_block(&buf[..n], TRAILER_TAG, "object trailer", barcode)?;
                if t.part_len != len {
                    return Err(Error::corrupt(
                        format!("tape cartridge {barcode} file {file}"),
                        cairn_engine::DecodeError::Invalid(format!(
                            "the trailer says {} bytes, the part holds {len}",
                            t.part_len
                        )),
                    ));
                }
                trailer = Some(t);
            }
            t => {
                return Err(Error::corrupt(
                    format!("tape cartridge {barcode} file {file}"),
                    cairn_engine::DecodeError::Invalid(format!("unknown block tag {t:#04x}")),
                ))
            }
        }
    }
    let part = Part {
        barcode: barcode.to_string(),
        file,
        offset: header.offset,
        len,
    };
    Ok(Some((header, part, trailer)))
}

impl Tape {
    /// Loads cartridge `barcode` into the drive (unloading another one to
    /// an empty slot) and reads its label. `Ok(None)`: the cartridge is
    /// blank. With `known_only`, a label of a media set this pool does not
    /// know is an error.
    fn load(&mut self, barcode: &str, _dir: &Path, known_only: bool) -> Result<Option<Label>> {
        if self.drive.loaded().as_deref() != Some(barcode) {
            let inv = self.library.inventory().map_err(tape_err)?;
            let from = inv
                .iter()
                .find(|e| e.barcode.as_deref() == Some(barcode))
                .map(|e| e.element)
                .ok_or_else(|| Error::NotFound {
                    kind: FileKind::Pack,
                    name: format!("tape cartridge {barcode} (not in the library)"),
                })?;
            if let Some(other) = inv
                .iter()
                .find(|e| e.element == Element::Drive(0) && e.barcode.is_some())
            {
                let free = inv
                    .iter()
                    .find(|e| matches!(e.element, Element::Slot(_)) && e.barcode.is_none())
                    .map(|e| e.element)
                    .ok_or_else(|| {
                        Error::PoolBusy(format!(
                            "no empty slot to unload {} into",
                            other.barcode.clone().unwrap_or_default()
                        ))
                    })?;
                self.library
                    .move_medium(Element::Drive(0), free)
                    .map_err(tape_err)?;
            }
            self.library
                .move_medium(from, Element::Drive(0))
                .map_err(tape_err)?;
            self.checked = None;
            self.last_part = None;
        }
        self.drive.rewind().map_err(tape_err)?;
        let mut buf = vec![0u8; DATA_BLOCK + 1];
        let Some(n) = read_one(&mut *self.drive, &mut buf)? else {
            self.drive.rewind().map_err(tape_err)?;
            return Ok(None);
        };
        let label: Label = parse_block(&buf[..n], LABEL_TAG, "label", barcode)?;
        if label.format != "cairn-tape-label" || label.version != 1 {
            return Err(Error::corrupt(
                format!("tape cartridge {barcode}"),
                cairn_engine::DecodeError::Invalid(format!(
                    "label format {:?} version {} is not supported",
                    label.format, label.version
                )),
            ));
        }
        if label.barcode != barcode {
            return Err(Error::corrupt(
                format!("tape cartridge {barcode}"),
                cairn_engine::DecodeError::Invalid(format!(
                    "its label names cartridge {}",
                    label.barcode
                )),
            ));
        }
        if known_only {
            let member = label.pool == self.media.pool
                && self.media.sets.iter().any(|s| {
                    s.id == label.media_set
                        && s.cartridges
                            .iter()
                            .any(|c| c.barcode == barcode && c.sequence == label.sequence)
                });
            if !member {
                return Err(Error::corrupt(
                    format!("tape cartridge {barcode}"),
                    cairn_engine::DecodeError::Invalid(format!(
                        "it belongs to media set {} (sequence {}) of tape pool {}, not to this pool's",
                        label.media_set, label.sequence, label.pool
                    )),
                ));
            }
        }
        self.checked = Some(barcode.to_string());
        Ok(Some(label))
    }

    /// Reads `len` bytes (all: `None`) of an object from `offset`.
    #[allow(clippy::too_many_arguments)]
    fn read_object(
        &mut self,
        kind: FileKind,
        name: &str,
        set: Option<&str>,
        offset: u64,
        len: Option<u64>,
        dir: &Path,
    ) -> Result<Vec<u8>> {
        let entry = self
            .copy(kind, name, set)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                kind,
                name: name.to_string(),
            })?;
        let len = len.unwrap_or(entry.size.saturating_sub(offset));
        if offset.checked_add(len).is_none_or(|end| end > entry.size) {
            return Err(Error::PoolIo {
                op: "read",
                kind,
                name: name.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "{len} bytes at {offset} are past the end of the {}-byte object",
                        entry.size
                    ),
                ),
            });
        }
        let mut out = Vec::with_capacity(len as usize);
        for p in &entry.parts {
            let (start, end) = (p.offset, p.offset + p.len);
            if end <= offset || start >= offset + len {
                continue;
            }
            let cached = self
                .last_part
                .as_ref()
                .filter(|(b, f, bytes)| {
                    *b == p.barcode && *f == p.file && bytes.len() as u64 == p.len
                })
                .map(|(_, _, bytes)| bytes.clone());
            let part = match cached {
                Some(bytes) => bytes,
                None => {
                    let bytes = Arc::new(self.read_part(kind, name, p, dir)?);
                    self.last_part = Some((p.barcode.clone(), p.file, bytes.clone()));
                    bytes
                }
            };
            let from = offset.max(start) - start;
            let to = (offset + len).min(end) - start;
            out.extend_from_slice(&part[from as usize..to as usize]);
        }
        Ok(out)
    }

    /// Reads one part of an object from tape and checks it is that part.
    fn read_part(&mut self, kind: FileKind, name: &str, p: &Part, dir: &Path) -> Result<Vec<u8>> {
        if self.checked.as_deref() != Some(p.barcode.as_str())
            || self.drive.loaded().as_deref() != Some(p.barcode.as_str())
        {
            self.load(&p.barcode, dir, true)?;
        }
        let mut part = Vec::with_capacity(p.len as usize);
        let got = read_object_part(&mut *self.drive, &p.barcode, p.file, Some(&mut part))?;
        let ok = got.as_ref().is_some_and(|(h, _, t)| {
            h.kind == kind.dir_name() && h.name == name && h.offset == p.offset && t.is_some()
        });
        if !ok || part.len() as u64 != p.len {
            return Err(Error::corrupt(
                format!("{kind} {name}"),
                cairn_engine::DecodeError::Invalid(format!(
                    "tape file {} of cartridge {} does not hold its part at {}",
                    p.file, p.barcode, p.offset
                )),
            ));
        }
        Ok(part)
    }

    /// The copy of an object in media set `set` (any set: the first copy).
    fn copy(&self, kind: FileKind, name: &str, set: Option<&str>) -> Option<&Entry> {
        self.objects
            .get(&(kind, name.to_string()))?
            .iter()
            .find(|c| set.is_none_or(|s| c.set == s))
    }

    /// The id of the open media set: the last one, unless it is closed,
    /// incomplete or older than the rotation period (then it is closed and
    /// a new set, still without cartridges, is started).
    fn current_set_id(&mut self, dir: &Path) -> Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let days = u64::from(self.media.rotation_days);
        if let Some(s) = self.media.sets.last_mut().filter(|s| s.open()) {
            let expired =
                days > 0 && s.created > 0 && now >= s.created.saturating_add(days * 86_400);
            if !expired {
                return Ok(s.id.clone());
            }
            s.closed = true;
        }
        let id = random_hex()?;
        self.media.sets.push(MediaSet {
            id: id.clone(),
            cartridges: Vec::new(),
            incomplete: false,
            closed: false,
            created: now,
        });
        save_media(dir, &self.media)?;
        Ok(id)
    }

    /// A cartridge to append to in media set `set_id`, loaded and
    /// positioned (a blank one labelled into the set when its last is
    /// full). Fails when the set is closed, incomplete or retired: writers
    /// of a set never spill into another one.
    fn writable(&mut self, set_id: &str, dir: &Path) -> Result<(usize, usize)> {
        let set = self
            .media
            .sets
            .iter()
            .position(|s| s.id == set_id && s.open())
            .ok_or_else(|| {
                Error::PoolBusy(format!(
                    "media set {set_id} of tape pool {} takes no more writes (closed, failed or \
                     retired): start again to write to a new media set",
                    dir.display()
                ))
            })?;
        let usable = self.media.sets[set]
            .cartridges
            .iter()
            .rposition(|c| !c.full);
        let cart = match usable {
            Some(c) => c,
            None => self.add_blank(set, dir)?,
        };
        let (barcode, next) = {
            let c = &self.media.sets[set].cartridges[cart];
            (c.barcode.clone(), c.next_file)
        };
        if self.checked.as_deref() != Some(barcode.as_str())
            || self.drive.loaded().as_deref() != Some(barcode.as_str())
        {
            self.load(&barcode, dir, true)?;
        }
        seek_file(&mut *self.drive, next).map_err(tape_err)?;
        Ok((set, cart))
    }

    /// Labels a blank cartridge from the library as the next of `set`.
    fn add_blank(&mut self, set: usize, dir: &Path) -> Result<usize> {
        let known: Vec<String> = self
            .media
            .sets
            .iter()
            .flat_map(|s| s.cartridges.iter().map(|c| c.barcode.clone()))
            .collect();
        let inv = self.library.inventory().map_err(tape_err)?;
        let candidates: Vec<String> = inv
            .into_iter()
            .filter(|e| !matches!(e.element, Element::ImportExport(_)))
            .filter_map(|e| e.barcode)
            .filter(|b| !known.contains(b))
            .collect();
        let mut passed = Vec::new();
        for barcode in candidates {
            // Only a blank cartridge, or one of this pool's retired sets, is
            // labelled; one with any other label is left alone (another
            // pool's, or a set this pool forgot).
            match self.load(&barcode, dir, false) {
                Ok(None) => {}
                Ok(Some(l))
                    if l.pool == self.media.pool && self.media.retired.contains(&l.media_set) => {}
                Ok(Some(l)) => {
                    passed.push(format!("{barcode}: labelled (media set {})", l.media_set));
                    continue;
                }
                Err(e) if e.is_damage() => {
                    passed.push(format!("{barcode}: {e}"));
                    continue;
                }
                Err(e) => return Err(e),
            }
            let sequence = self.media.sets[set].cartridges.len() as u32 + 1;
            let label = Label {
                format: "cairn-tape-label".into(),
                version: 1,
                pool: self.media.pool.clone(),
                barcode: barcode.clone(),
                media_set: self.media.sets[set].id.clone(),
                sequence,
            };
            self.drive.rewind().map_err(tape_err)?;
            self.drive
                .write_block(&json_block(LABEL_TAG, &label)?)
                .map_err(tape_err)?;
            self.drive.write_filemarks(1).map_err(tape_err)?;
            self.media.sets[set].cartridges.push(SetCartridge {
                barcode: barcode.clone(),
                sequence,
                next_file: 1,
                full: false,
            });
            save_media(dir, &self.media)?;
            self.checked = Some(barcode);
            return Ok(self.media.sets[set].cartridges.len() - 1);
        }
        Err(Error::PoolBusy(format!(
            "no blank cartridge left in the tape library: import one{}",
            if passed.is_empty() {
                String::new()
            } else {
                format!(" (not blank: {})", passed.join("; "))
            }
        )))
    }

    /// Streams a spooled object to tape, spanning cartridges at the early
    /// warning. On failure the media set is marked incomplete.
    #[allow(clippy::too_many_arguments)]
    fn write_object(
        &mut self,
        set: &str,
        kind: FileKind,
        name: &str,
        spool: &mut File,
        size: u64,
        hash: &str,
        dir: &Path,
    ) -> Result<Vec<Part>> {
        let result = self.write_parts(set, kind, name, spool, size, hash, dir);
        if result.is_err() {
            // A write that failed before it moved the tape (the set was
            // closed, no blank cartridge) leaves the set as it was.
            let moved = !matches!(result, Err(Error::PoolBusy(_)));
            if let Some(s) = self.media.sets.iter_mut().find(|s| s.id == set) {
                if moved {
                    s.incomplete = true;
                }
            }
            let _ = save_media(dir, &self.media);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn write_parts(
        &mut self,
        set_id: &str,
        kind: FileKind,
        name: &str,
        spool: &mut File,
        size: u64,
        hash: &str,
        dir: &Path,
    ) -> Result<Vec<Part>> {
        spool.seek(SeekFrom::Start(0)).map_err(io_err(dir))?;
        let mut reader = std::io::BufReader::with_capacity(4 << 20, spool);
        let mut parts = Vec::new();
        let mut offset = 0u64;
        let mut block = vec![DATA_TAG; DATA_BLOCK + 1];
        let write = random_hex()?;
        loop {
            let (set, cart) = self.writable(set_id, dir)?;
            let (barcode, file, set_id) = {
                let s = &self.media.sets[set];
                (
                    s.cartridges[cart].barcode.clone(),
                    s.cartridges[cart].next_file,
                    s.id.clone(),
                )
            };
            let header = Header {
                kind: kind.dir_name().into(),
                name: name.into(),
                media_set: set_id,
                write: write.clone(),
                part: parts.len() as u32,
                offset,
            };
            let streaming = std::time::Instant::now();
            let mut warned = self
                .drive
                .write_block(&json_block(HEADER_TAG, &header)?)
                .map_err(tape_err)?
                == WriteOutcome::EarlyWarning;
            let start = offset;
            while offset < size && !warned {
                let n = (size - offset).min(DATA_BLOCK as u64) as usize;
                reader.read_exact(&mut block[1..=n]).map_err(io_err(dir))?;
                warned = self.drive.write_block(&block[..=n]).map_err(tape_err)?
                    == WriteOutcome::EarlyWarning;
                offset += n as u64;
            }
            let done = offset == size;
            let trailer = Trailer {
                part_len: offset - start,
                complete: done.then(|| (size, hash.to_string())),
            };
            self.drive
                .write_block(&json_block(TRAILER_TAG, &trailer)?)
                .map_err(tape_err)?;
            self.drive.write_filemarks(1).map_err(tape_err)?;
            self.streamed.bytes += offset - start;
            self.streamed.streaming_seconds += streaming.elapsed().as_secs_f64();
            self.streamed.objects += u64::from(done);
            parts.push(Part {
                barcode,
                file,
                offset: start,
                len: offset - start,
            });
            let c = &mut self.media.sets[set].cartridges[cart];
            c.next_file += 1;
            c.full |= warned || self.drive.at_early_warning();
            save_media(dir, &self.media)?;
            if done {
                return Ok(parts);
            }
        }
    }

    fn append_catalog(&mut self, line: &CatalogLine, dir: &Path) -> Result<()> {
        let mut s = serde_json::to_string(line).map_err(|e| Error::Internal(e.to_string()))?;
        s.push('\n');
        let path = dir.join(CATALOG_FILE);
        self.catalog
            .write_all(s.as_bytes())
            .map_err(io_err(&path))?;
        self.catalog.sync_data().map_err(io_err(&path))
    }
}

/// What a face of the pool sees of the kinds on tape: every media set
/// (`None`: the whole pool) or one.
type Scope<'a> = Option<&'a str>;

fn not_found(kind: FileKind, name: &str) -> Error {
    Error::NotFound {
        kind,
        name: name.to_string(),
    }
}

fn past_end(kind: FileKind, name: &str, offset: u64, len: usize) -> Error {
    Error::PoolIo {
        op: "read",
        kind,
        name: name.to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{len} bytes at {offset} are past the end of the object"),
        ),
    }
}

impl Shared {
    /// Whether an object of a kind on tape has a copy in `scope` (the tape
    /// catalog decides: local copies are a cache).
    fn on_tape_exists(&self, kind: FileKind, name: &str, scope: Scope) -> bool {
        self.tape.lock().copy(kind, name, scope).is_some()
    }

    fn create(
        self: &Arc<Self>,
        kind: FileKind,
        name: &str,
        scope: Scope,
    ) -> Result<Box<dyn ObjectWriter>> {
        if scope.is_none() && kind != FileKind::Config {
            return Err(Error::Unsupported(format!(
                "tape pool {}: a {kind} is written into one media set, through \
                 TapePool::current_set() (as backups and copies do), so that each set \
                 holds everything its snapshots need",
                self.dir.display()
            )));
        }
        if self.on_tape_exists(kind, name, scope) {
            return Err(Error::AlreadyExists {
                kind,
                name: name.to_string(),
            });
        }
        let path =
            self.dir
                .join("staging")
                .join(format!("{}-{name}-{}", kind.dir_name(), random_hex()?));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(Box::new(TapeObjectWriter {
            shared: self.clone(),
            set: scope.map(str::to_string),
            kind,
            name: name.to_string(),
            path,
            spool: std::io::BufWriter::with_capacity(1 << 20, file),
            hasher: blake3::Hasher::new(),
            len: 0,
        }))
    }

    fn commit(&self, w: &mut TapeObjectWriter) -> Result<()> {
        w.spool.flush().map_err(io_err(&w.path))?;
        let hash = w.hasher.finalize().to_hex().to_string();
        let mut tape = self.tape.lock();
        // Under the lock: of two writers of one name, one wins.
        if tape.copy(w.kind, &w.name, w.set.as_deref()).is_some() {
            return Err(Error::AlreadyExists {
                kind: w.kind,
                name: w.name.clone(),
            });
        }
        let set = match &w.set {
            Some(s) => s.clone(),
            None => tape.current_set_id(&self.dir)?,
        };
        if w.kind != FileKind::Config {
            self.ensure_config(&mut tape, &set)?;
        }
        let file = w.spool.get_mut();
        self.store_on_tape(&mut tape, &set, w.kind, &w.name, file, w.len, &hash)?;
        if w.kind != FileKind::Pack {
            // The local copy the engine reads (a cache: a read that misses
            // it goes to tape). Written under the lock, so a delete cannot
            // slip in between.
            file.seek(SeekFrom::Start(0)).map_err(io_err(&w.path))?;
            let mut bytes = Vec::with_capacity(w.len as usize);
            file.read_to_end(&mut bytes).map_err(io_err(&w.path))?;
            match self.store.write(w.kind, &w.name, &bytes) {
                Ok(()) | Err(Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Streams a spooled object into media set `set` and catalogs it.
    #[allow(clippy::too_many_arguments)]
    fn store_on_tape(
        &self,
        tape: &mut Tape,
        set: &str,
        kind: FileKind,
        name: &str,
        file: &mut File,
        len: u64,
        hash: &str,
    ) -> Result<()> {
        let parts = tape.write_object(set, kind, name, file, len, hash, &self.dir)?;
        tape.append_catalog(
            &CatalogLine::Add {
                kind: kind.dir_name().into(),
                name: name.to_string(),
                media_set: set.to_string(),
                size: len,
                blake3: hash.to_string(),
                parts: parts.clone(),
            },
            &self.dir,
        )?;
        put_copy(
            &mut tape.objects,
            (kind, name.to_string()),
            Entry {
                set: set.to_string(),
                size: len,
                blake3: hash.to_string(),
                parts,
            },
        );
        Ok(())
    }

    /// Puts a copy of the pool's configuration into media set `set` before
    /// its first other object, so that every set can be read (and its
    /// pool recovered) on its own.
    fn ensure_config(&self, tape: &mut Tape, set: &str) -> Result<()> {
        const NAME: &str = "config";
        if tape.copy(FileKind::Config, NAME, Some(set)).is_some() {
            return Ok(());
        }
        let bytes = match self.store.read(FileKind::Config, NAME) {
            Ok(b) => b.to_vec(),
            Err(e) if e.is_not_found() => {
                let Some(entry) = tape.copy(FileKind::Config, NAME, None).cloned() else {
                    // No configuration yet (a raw pool in tests).
                    return Ok(());
                };
                let bytes = tape.read_object(FileKind::Config, NAME, None, 0, None, &self.dir)?;
                check_hash(FileKind::Config, NAME, &bytes, &entry.blake3)?;
                bytes
            }
            Err(e) => return Err(e),
        };
        let path = self
            .dir
            .join("staging")
            .join(format!("config-copy-{}", random_hex()?));
        let result = (|| {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io_err(&path))?;
            f.write_all(&bytes).map_err(io_err(&path))?;
            let hash = blake3::hash(&bytes).to_hex().to_string();
            self.store_on_tape(
                tape,
                set,
                FileKind::Config,
                NAME,
                &mut f,
                bytes.len() as u64,
                &hash,
            )
        })();
        let _ = std::fs::remove_file(&path);
        result
    }

    /// A whole object of a kind kept on tape: the local copy, else the
    /// tape (checked against the catalog's hash, and copied locally).
    fn read_whole(&self, kind: FileKind, name: &str, scope: Scope) -> Result<Bytes> {
        let mut tape = self.tape.lock();
        let Some(entry) = tape.copy(kind, name, scope).cloned() else {
            return Err(not_found(kind, name));
        };
        if kind != FileKind::Pack {
            match self.store.read(kind, name) {
                Ok(b) => return Ok(b),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        let bytes = tape.read_object(kind, name, Some(&entry.set), 0, None, &self.dir)?;
        check_hash(kind, name, &bytes, &entry.blake3)?;
        if kind != FileKind::Pack {
            match self.store.write(kind, name, &bytes) {
                Ok(()) | Err(Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Bytes::from(bytes))
    }

    fn read(&self, kind: FileKind, name: &str, scope: Scope) -> Result<Bytes> {
        if !on_tape(kind) {
            return self.store.read(kind, name);
        }
        match self.read_whole(kind, name, scope) {
            // No set holds a copy of the configuration (its sets were
            // retired): the local copy is the pool's until the next set
            // gets one.
            Err(e) if e.is_not_found() && kind == FileKind::Config => self.store.read(kind, name),
            other => other,
        }
    }

    fn read_range(
        &self,
        kind: FileKind,
        name: &str,
        offset: u64,
        len: usize,
        scope: Scope,
    ) -> Result<Bytes> {
        if !on_tape(kind) {
            return self.store.read_range(kind, name, offset, len);
        }
        if kind != FileKind::Pack {
            let whole = self.read_whole(kind, name, scope)?;
            let end = offset
                .checked_add(len as u64)
                .filter(|e| *e <= whole.len() as u64);
            return match end {
                Some(end) => Ok(whole.slice(offset as usize..end as usize)),
                None => Err(past_end(kind, name, offset, len)),
            };
        }
        let mut tape = self.tape.lock();
        tape.read_object(kind, name, scope, offset, Some(len as u64), &self.dir)
            .map(Bytes::from)
    }

    fn size(&self, kind: FileKind, name: &str, scope: Scope) -> Result<u64> {
        if !on_tape(kind) {
            return self.store.size(kind, name);
        }
        self.tape
            .lock()
            .copy(kind, name, scope)
            .map(|e| e.size)
            .ok_or_else(|| not_found(kind, name))
    }

    /// (media set, cartridge sequence, tape file) of the object's first
    /// part: 16, 16 and 32 bits of one key.
    fn read_order(&self, kind: FileKind, name: &str, scope: Scope) -> Option<u64> {
        let tape = self.tape.lock();
        let copy = tape.copy(kind, name, scope)?;
        let first = copy.parts.first()?;
        let (i, s) = tape
            .media
            .sets
            .iter()
            .enumerate()
            .find(|(_, s)| s.id == copy.set)?;
        let c = s.cartridges.iter().find(|c| c.barcode == first.barcode)?;
        Some(((i as u64) << 48) | ((c.sequence as u64 & 0xffff) << 32) | (first.file & 0xffff_ffff))
    }

    fn list_sizes(&self, kind: FileKind, scope: Scope) -> Vec<(String, u64)> {
        self.tape
            .lock()
            .objects
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .filter_map(|((_, n), copies)| {
                copies
                    .iter()
                    .find(|c| scope.is_none_or(|s| c.set == s))
                    .map(|c| (n.clone(), c.size))
            })
            .collect()
    }

    /// Deletes the copy in `scope` (every copy: `None`); the local copy
    /// goes with the last one.
    fn delete(&self, kind: FileKind, name: &str, scope: Scope) -> Result<()> {
        if !on_tape(kind) {
            return self.store.delete(kind, name);
        }
        let mut tape = self.tape.lock();
        let key = (kind, name.to_string());
        if tape.copy(kind, name, scope).is_none() {
            return Err(not_found(kind, name));
        }
        tape.append_catalog(
            &CatalogLine::Delete {
                kind: kind.dir_name().into(),
                name: name.to_string(),
                media_set: scope.map(str::to_string),
            },
            &self.dir,
        )?;
        let left = match tape.objects.get_mut(&key) {
            Some(copies) => {
                copies.retain(|c| scope.is_some_and(|s| c.set != s));
                copies.len()
            }
            None => 0,
        };
        if left == 0 {
            tape.objects.remove(&key);
            if kind != FileKind::Pack {
                match self.store.delete(kind, name) {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

fn check_hash(kind: FileKind, name: &str, bytes: &[u8], want: &str) -> Result<()> {
    let got = blake3::hash(bytes).to_hex().to_string();
    if got != want {
        return Err(Error::corrupt(
            format!("{kind} {name} on tape"),
            cairn_engine::DecodeError::ChecksumMismatch {
                expected: want.to_string(),
                got,
            },
        ));
    }
    Ok(())
}

/// An object being spooled (see [`TapePool`]).
struct TapeObjectWriter {
    shared: Arc<Shared>,
    /// The media set it goes to (`None`: the open one, at commit).
    set: Option<String>,
    kind: FileKind,
    name: String,
    path: PathBuf,
    spool: std::io::BufWriter<File>,
    hasher: blake3::Hasher,
    len: u64,
}

impl Write for TapeObjectWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.spool.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.spool.flush()
    }
}

impl ObjectWriter for TapeObjectWriter {
    fn commit(mut self: Box<Self>) -> Result<()> {
        let shared = self.shared.clone();
        shared.commit(&mut self)
    }
}

impl Drop for TapeObjectWriter {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The whole pool: reads, lists and deletes across every media set (an
/// object with copies in several sets reads from the first, is listed
/// once and deleted everywhere). Packs, index segments and manifests are
/// written through a media set ([`TapePool::current_set`]); the
/// configuration and the local kinds directly.
impl PoolRead for TapePool {
    fn read(&self, kind: FileKind, name: &str) -> Result<Bytes> {
        self.shared.read(kind, name, None)
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Bytes> {
        self.shared.read_range(kind, name, offset, len, None)
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        self.shared.size(kind, name, None)
    }

    fn location(&self) -> String {
        format!("tape:{}", self.shared.dir.display())
    }

    fn preferred_read_concurrency(&self) -> Option<usize> {
        Some(1)
    }

    fn read_order(&self, kind: FileKind, name: &str) -> Option<u64> {
        self.shared.read_order(kind, name, None)
    }
    fn sequential_media(&self) -> bool {
        true
    }
}

impl PoolWrite for TapePool {
    fn create(&self, kind: FileKind, name: &str) -> Result<Box<dyn ObjectWriter>> {
        if !on_tape(kind) {
            return self.shared.store.create(kind, name);
        }
        self.shared.create(kind, name, None)
    }
}

impl PoolList for TapePool {
    fn list(&self, kind: FileKind) -> Result<Vec<String>> {
        if !on_tape(kind) {
            let mut all = self.shared.store.list(kind)?;
            if kind == FileKind::Catalog {
                // The media sets' own snapshot catalogs are theirs.
                all.retain(|n| !n.contains('.'));
            }
            return Ok(all);
        }
        Ok(self
            .shared
            .list_sizes(kind, None)
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    fn list_sizes(&self, kind: FileKind) -> Result<Option<Vec<(String, u64)>>> {
        if on_tape(kind) {
            return Ok(Some(self.shared.list_sizes(kind, None)));
        }
        if kind == FileKind::Catalog {
            return Ok(None);
        }
        self.shared.store.list_sizes(kind)
    }
}

impl PoolDelete for TapePool {
    fn delete(&self, kind: FileKind, name: &str) -> Result<()> {
        self.shared.delete(kind, name, None)
    }
}

/// One media set of a [`TapePool`] as a pool of its own
/// ([`TapePool::current_set`]): it lists, reads and writes only the
/// packs, index segments and manifests in that set, so a backup or copy
/// through it deduplicates within the set, finds CBT parents only there
/// (the first backup into a new set is a full one) and leaves a set that
/// restores from its own cartridges — and can be retired as a whole. The
/// local kinds (leases, notices, marks, settings) are the pool's; its
/// snapshot catalog is its own.
#[derive(Clone)]
pub struct TapeMediaSet {
    shared: Arc<Shared>,
    set: String,
}

impl std::fmt::Debug for TapeMediaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapeMediaSet")
            .field("dir", &self.shared.dir)
            .field("set", &self.set)
            .finish_non_exhaustive()
    }
}

impl TapeMediaSet {
    /// The media set's id.
    pub fn id(&self) -> &str {
        &self.set
    }

    /// The local name of this set's snapshot catalog object `name`.
    fn catalog_name(&self, kind: FileKind, name: &str) -> Option<String> {
        (kind == FileKind::Catalog).then(|| format!("{}.{name}", self.set))
    }

    /// What reads of `kind` see: the set, except for the configuration —
    /// the pool's, read from any set (a new set gets its copy with its
    /// first object).
    fn read_scope(&self, kind: FileKind) -> Scope<'_> {
        (kind != FileKind::Config).then_some(self.set.as_str())
    }
}

impl PoolRead for TapeMediaSet {
    fn read(&self, kind: FileKind, name: &str) -> Result<Bytes> {
        match self.catalog_name(kind, name) {
            Some(n) => self.shared.store.read(kind, &n),
            None => self.shared.read(kind, name, self.read_scope(kind)),
        }
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Bytes> {
        match self.catalog_name(kind, name) {
            Some(n) => self.shared.store.read_range(kind, &n, offset, len),
            None => self
                .shared
                .read_range(kind, name, offset, len, self.read_scope(kind)),
        }
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        match self.catalog_name(kind, name) {
            Some(n) => self.shared.store.size(kind, &n),
            None => self.shared.size(kind, name, self.read_scope(kind)),
        }
    }

    fn location(&self) -> String {
        format!(
            "tape:{} (media set {})",
            self.shared.dir.display(),
            self.set
        )
    }

    fn preferred_read_concurrency(&self) -> Option<usize> {
        Some(1)
    }

    fn read_order(&self, kind: FileKind, name: &str) -> Option<u64> {
        self.shared.read_order(kind, name, Some(&self.set))
    }
    fn sequential_media(&self) -> bool {
        true
    }
}

impl PoolWrite for TapeMediaSet {
    fn create(&self, kind: FileKind, name: &str) -> Result<Box<dyn ObjectWriter>> {
        if let Some(n) = self.catalog_name(kind, name) {
            return self.shared.store.create(kind, &n);
        }
        if !on_tape(kind) {
            return self.shared.store.create(kind, name);
        }
        self.shared.create(kind, name, Some(&self.set))
    }
}

impl PoolList for TapeMediaSet {
    fn list(&self, kind: FileKind) -> Result<Vec<String>> {
        if kind == FileKind::Catalog {
            let prefix = format!("{}.", self.set);
            return Ok(self
                .shared
                .store
                .list(kind)?
                .into_iter()
                .filter_map(|n| n.strip_prefix(&prefix).map(str::to_string))
                .collect());
        }
        if !on_tape(kind) {
            return self.shared.store.list(kind);
        }
        Ok(self
            .shared
            .list_sizes(kind, self.read_scope(kind))
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    fn list_sizes(&self, kind: FileKind) -> Result<Option<Vec<(String, u64)>>> {
        if on_tape(kind) {
            return Ok(Some(self.shared.list_sizes(kind, self.read_scope(kind))));
        }
        if kind == FileKind::Catalog {
            return Ok(None);
        }
        self.shared.store.list_sizes(kind)
    }
}

impl PoolDelete for TapeMediaSet {
    fn delete(&self, kind: FileKind, name: &str) -> Result<()> {
        match self.catalog_name(kind, name) {
            Some(n) => self.shared.store.delete(kind, &n),
            None => self.shared.delete(kind, name, Some(&self.set)),
        }
    }
}
