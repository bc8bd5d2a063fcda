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
        size: u64,
        blake3: String,
        parts: Vec<Part>,
    },
    Delete {
        kind: String,
        name: String,
    },
}

#[derive(Clone, Debug)]
struct Entry {
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
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MediaSet {
    id: String,
    cartridges: Vec<SetCartridge>,
    /// A write failed in this set: nothing more is appended to it.
    incomplete: bool,
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
    objects: HashMap<(FileKind, String), Entry>,
    media: MediaState,
    /// The label of the cartridge in the drive, once read since it was
    /// loaded.
    checked: Option<String>,
    /// The object part read last — (barcode, tape file), its bytes — so
    /// that reads of one pack in several ranges (a restore's runs) read the
    /// tape once, not once per range.
    last_part: Option<(String, u64, Arc<Vec<u8>>)>,
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
        let (catalog, objects) = load_catalog(&dir)?;
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
                }),
                _lock: lock,
            }),
        })
    }

    /// The pool's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The cartridges of every media set, in order: (set id, barcodes,
    /// whether the set is incomplete).
    pub fn media_sets(&self) -> Vec<(String, Vec<String>, bool)> {
        self.shared
            .tape
            .lock()
            .media
            .sets
            .iter()
            .map(|s| {
                (
                    s.id.clone(),
                    s.cartridges.iter().map(|c| c.barcode.clone()).collect(),
                    s.incomplete,
                )
            })
            .collect()
    }

    /// Where the parts of a stored object lie: (barcode, tape file).
    pub fn object_position(&self, kind: FileKind, name: &str) -> Option<Vec<(String, u64)>> {
        self.shared
            .tape
            .lock()
            .objects
            .get(&(kind, name.to_string()))
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
        // last one found of each name wins.
        let mut found: BTreeMap<(FileKind, String), Entry> = BTreeMap::new();
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
            found.insert(
                (kind, name),
                Entry {
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
        };
        for (id, mut cartridges) in sets {
            cartridges.sort_by_key(|c| c.sequence);
            media.sets.push(MediaSet {
                id,
                cartridges,
                incomplete: true,
            });
        }
        save_media(&self.shared.dir, &media)?;
        tape.media = media;
        let path = self.shared.dir.join(CATALOG_FILE);
        let tmp = self.shared.dir.join(format!("{CATALOG_FILE}.tmp"));
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            for ((kind, name), e) in &found {
                let line = CatalogLine::Add {
                    kind: kind.dir_name().to_string(),
                    name: name.clone(),
                    size: e.size,
                    blake3: e.blake3.clone(),
                    parts: e.parts.clone(),
                };
                let mut s =
                    serde_json::to_string(&line).map_err(|e| Error::Internal(e.to_string()))?;
                s.push('\n');
                f.write_all(s.as_bytes()).map_err(io_err(&tmp))?;
            }
            f.sync_all().map_err(io_err(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        let (catalog, objects) = load_catalog(&self.shared.dir)?;
        tape.catalog = catalog;
        tape.objects = objects;
        tape.last_part = None;
        report.objects = found.len();
        drop(found);
        Ok(report)
    }
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
    match std::fs::read(&path) {
        Ok(raw) => serde_json::from_slice(&raw).map_err(|e| {
            Error::corrupt(
                format!("tape media state {}", path.display()),
                cairn_engine::DecodeError::Invalid(e.to_string()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MediaState {
            version: 1,
            pool: String::new(),
            sets: Vec::new(),
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

type Objects = HashMap<(FileKind, String), Entry>;

/// Opens the catalog for appending and reads it. A last line cut short (a
/// crash mid-append) is ignored; any other bad line is an error.
fn load_catalog(dir: &Path) -> Result<(File, Objects)> {
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
                size,
                blake3,
                parts,
            } => {
                if let Some(k) = kind_named(&kind) {
                    objects.insert(
                        (k, name),
                        Entry {
                            size,
                            blake3,
                            parts,
                        },
                    );
                }
            }
            CatalogLine::Delete { kind, name } => {
                if let Some(k) = kind_named(&kind) {
                    objects.remove(&(k, name));
                }
            }
        }
    }
    if complete < raw.len() {
        // Cut the torn line off so the next append starts a fresh one.
        file.set_len(complete as u64).map_err(io_err(&path))?;
    }
    file.seek(SeekFrom::End(0)).map_err(io_err(&path))?;
    Ok((file, objects))
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
    fn read_object(
        &mut self,
        kind: FileKind,
        name: &str,
        offset: u64,
        len: Option<u64>,
        dir: &Path,
    ) -> Result<Vec<u8>> {
        let entry = self
            .objects
            .get(&(kind, name.to_string()))
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

    /// A cartridge to append to in the current media set, loaded and
    /// positioned; starts a new set (or extends the current one with a
    /// blank cartridge) when needed.
    fn writable(&mut self, dir: &Path) -> Result<(usize, usize)> {
        let current = self
            .media
            .sets
            .iter()
            .rposition(|s| !s.incomplete)
            .filter(|&i| i + 1 == self.media.sets.len());
        let set = match current {
            Some(i) => i,
            None => {
                self.media.sets.push(MediaSet {
                    id: random_hex()?,
                    cartridges: Vec::new(),
                    incomplete: false,
                });
                self.media.sets.len() - 1
            }
        };
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
            // Only a blank cartridge is labelled; one with any label is
            // left alone (another pool's, or a set this pool forgot).
            match self.load(&barcode, dir, false) {
                Ok(None) => {}
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
        // A set that never got a cartridge is not kept.
        if self.media.sets[set].cartridges.is_empty() {
            self.media.sets.remove(set);
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
    fn write_object(
        &mut self,
        kind: FileKind,
        name: &str,
        spool: &mut File,
        size: u64,
        hash: &str,
        dir: &Path,
    ) -> Result<Vec<Part>> {
        let result = self.write_parts(kind, name, spool, size, hash, dir);
        if result.is_err() {
            if let Some(s) = self.media.sets.last_mut() {
                s.incomplete = true;
            }
            let _ = save_media(dir, &self.media);
        }
        result
    }

    fn write_parts(
        &mut self,
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
            let (set, cart) = self.writable(dir)?;
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

impl Shared {
    /// Whether an object exists: the tape catalog decides for the kinds on
    /// tape (their local copies are a cache), the local pool for the rest.
    fn exists(&self, kind: FileKind, name: &str) -> Result<bool> {
        if on_tape(kind) {
            return Ok(self
                .tape
                .lock()
                .objects
                .contains_key(&(kind, name.to_string())));
        }
        match self.store.size(kind, name) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn commit(&self, w: &mut TapeObjectWriter) -> Result<()> {
        let exists = || Error::AlreadyExists {
            kind: w.kind,
            name: w.name.clone(),
        };
        w.spool.flush().map_err(io_err(&w.path))?;
        let hash = w.hasher.finalize().to_hex().to_string();
        let mut tape = self.tape.lock();
        // Under the lock: of two writers of one name, one wins.
        if tape.objects.contains_key(&(w.kind, w.name.clone())) {
            return Err(exists());
        }
        let file = w.spool.get_mut();
        let parts = tape.write_object(w.kind, &w.name, file, w.len, &hash, &self.dir)?;
        tape.append_catalog(
            &CatalogLine::Add {
                kind: w.kind.dir_name().into(),
                name: w.name.clone(),
                size: w.len,
                blake3: hash.clone(),
                parts: parts.clone(),
            },
            &self.dir,
        )?;
        tape.objects.insert(
            (w.kind, w.name.clone()),
            Entry {
                size: w.len,
                blake3: hash,
                parts,
            },
        );
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

    /// A whole object of a kind kept on tape: the local copy, else the
    /// tape (checked against the catalog's hash, and copied locally).
    fn read_whole(&self, kind: FileKind, name: &str) -> Result<Bytes> {
        let mut tape = self.tape.lock();
        let Some(entry) = tape.objects.get(&(kind, name.to_string())).cloned() else {
            return Err(Error::NotFound {
                kind,
                name: name.to_string(),
            });
        };
        if kind != FileKind::Pack {
            match self.store.read(kind, name) {
                Ok(b) => return Ok(b),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        let bytes = tape.read_object(kind, name, 0, None, &self.dir)?;
        let got = blake3::hash(&bytes).to_hex().to_string();
        if got != entry.blake3 {
            return Err(Error::corrupt(
                format!("{kind} {name} on tape"),
                cairn_engine::DecodeError::ChecksumMismatch {
                    expected: entry.blake3,
                    got,
                },
            ));
        }
        if kind != FileKind::Pack {
            match self.store.write(kind, name, &bytes) {
                Ok(()) | Err(Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Bytes::from(bytes))
    }
}

/// An object being spooled (see [`TapePool`]).
struct TapeObjectWriter {
    shared: Arc<Shared>,
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

impl PoolRead for TapePool {
    fn read(&self, kind: FileKind, name: &str) -> Result<Bytes> {
        if !on_tape(kind) {
            return self.shared.store.read(kind, name);
        }
        self.shared.read_whole(kind, name)
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Bytes> {
        if !on_tape(kind) {
            return self.shared.store.read_range(kind, name, offset, len);
        }
        if kind != FileKind::Pack {
            let whole = self.shared.read_whole(kind, name)?;
            let end = offset
                .checked_add(len as u64)
                .filter(|e| *e <= whole.len() as u64);
            return match end {
                Some(end) => Ok(whole.slice(offset as usize..end as usize)),
                None => Err(Error::PoolIo {
                    op: "read",
                    kind,
                    name: name.to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("{len} bytes at {offset} are past the end of the object"),
                    ),
                }),
            };
        }
        let mut tape = self.shared.tape.lock();
        tape.read_object(kind, name, offset, Some(len as u64), &self.shared.dir)
            .map(Bytes::from)
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        if !on_tape(kind) {
            return self.shared.store.size(kind, name);
        }
        self.shared
            .tape
            .lock()
            .objects
            .get(&(kind, name.to_string()))
            .map(|e| e.size)
            .ok_or_else(|| Error::NotFound {
                kind,
                name: name.to_string(),
            })
    }

    fn location(&self) -> String {
        format!("tape:{}", self.shared.dir.display())
    }

    fn preferred_read_concurrency(&self) -> Option<usize> {
        Some(1)
    }

    /// (media set, cartridge sequence, tape file) of the object's first
    /// part: 16, 16 and 32 bits of one key.
    fn read_order(&self, kind: FileKind, name: &str) -> Option<u64> {
        let tape = self.shared.tape.lock();
        let first = tape
            .objects
            .get(&(kind, name.to_string()))?
            .parts
            .first()?
            .clone();
        tape.media.sets.iter().enumerate().find_map(|(i, s)| {
            s.cartridges
                .iter()
                .find(|c| c.barcode == first.barcode)
                .map(|c| {
                    ((i as u64) << 48)
                        | ((c.sequence as u64 & 0xffff) << 32)
                        | (first.file & 0xffff_ffff)
                })
        })
    }
}

impl PoolWrite for TapePool {
    fn create(&self, kind: FileKind, name: &str) -> Result<Box<dyn ObjectWriter>> {
        if !on_tape(kind) {
            return self.shared.store.create(kind, name);
        }
        if self.shared.exists(kind, name)? {
            return Err(Error::AlreadyExists {
                kind,
                name: name.to_string(),
            });
        }
        let path = self.shared.dir.join("staging").join(format!(
            "{}-{name}-{}",
            kind.dir_name(),
            random_hex()?
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(Box::new(TapeObjectWriter {
            shared: self.shared.clone(),
            kind,
            name: name.to_string(),
            path,
            spool: std::io::BufWriter::with_capacity(1 << 20, file),
            hasher: blake3::Hasher::new(),
            len: 0,
        }))
    }
}

impl PoolList for TapePool {
    fn list(&self, kind: FileKind) -> Result<Vec<String>> {
        if !on_tape(kind) {
            return self.shared.store.list(kind);
        }
        Ok(self
            .shared
            .tape
            .lock()
            .objects
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| n.clone())
            .collect())
    }

    fn list_sizes(&self, kind: FileKind) -> Result<Option<Vec<(String, u64)>>> {
        if !on_tape(kind) {
            return self.shared.store.list_sizes(kind);
        }
        Ok(Some(
            self.shared
                .tape
                .lock()
                .objects
                .iter()
                .filter(|((k, _), _)| *k == kind)
                .map(|((_, n), e)| (n.clone(), e.size))
                .collect(),
        ))
    }
}

impl PoolDelete for TapePool {
    fn delete(&self, kind: FileKind, name: &str) -> Result<()> {
        if !on_tape(kind) {
            return self.shared.store.delete(kind, name);
        }
        let mut tape = self.shared.tape.lock();
        let key = (kind, name.to_string());
        if !tape.objects.contains_key(&key) {
            return Err(Error::NotFound {
                kind,
                name: name.to_string(),
            });
        }
        tape.append_catalog(
            &CatalogLine::Delete {
                kind: kind.dir_name().into(),
                name: name.to_string(),
            },
            &self.shared.dir,
        )?;
        tape.objects.remove(&key);
        if kind != FileKind::Pack {
            match self.shared.store.delete(kind, name) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
