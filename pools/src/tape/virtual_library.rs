//! [`VirtualTapeLibrary`]: a **simulator** of a tape library, backed by
//! files — for tests, demos and development on machines without tape
//! hardware. It is not a production path: a real library goes through the
//! SCSI drivers behind the same traits.
//!
//! It behaves as the hardware does where it matters to the code above it:
//! cartridges have a fixed capacity and an early-warning zone before its
//! end; a write lands at the current position and erases everything after
//! it (there is no writing in the middle of a tape); reads return one
//! block, a filemark or the end of data; spacing over filemarks moves
//! forward or back; loading positions at the beginning of the medium; a
//! cartridge moves only between empty elements. Each drive counts what it
//! did (rewinds, backward moves, blocks), so tests can check that a reader
//! passes over each cartridge once.
//!
//! On disk (the simulator's own medium, nothing Cairn's formats depend on):
//! ```text
//! DIR/library.json            elements and what they hold, capacity settings
//! DIR/cartridges/<BARCODE>    one file per cartridge: records back to back,
//!                             block    = 'B' | length u32 LE | bytes
//!                             filemark = 'F'
//!                             end of data = end of file
//! ```
//! A record's framing counts against the capacity; a block cut short at the
//! end of the file (a crash mid-write) ends the recorded data before it,
//! as on a drive (the file is truncated when the cartridge is loaded).
//! `library.json` is replaced atomically (temporary file, fsync, rename)
//! after every move.
//! Drive positions live in memory: a library opened again finds loaded
//! cartridges rewound, as after a power cycle.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{
    Element, ElementStatus, ReadOutcome, TapeDrive, TapeError, TapeLibrary, TapePosition,
    TapeResult, WriteOutcome,
};

/// LTO-9's native capacity: 18 TB.
pub const LTO9_CAPACITY: u64 = 18_000_000_000_000;

/// Largest block the simulated drives accept (as LTO drives: 8 MiB).
pub const MAX_BLOCK: usize = 8 << 20;

const STATE_FILE: &str = "library.json";
const CARTRIDGES: &str = "cartridges";
use super::parse::{BLOCK_FRAMING, BLOCK_TAG, FILEMARK_TAG};

/// How a new virtual library is laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualTapeOptions {
    /// Blank cartridges created, one per storage slot.
    pub cartridges: usize,
    /// Extra empty storage slots.
    pub empty_slots: usize,
    /// Bytes each cartridge holds (record framing included).
    pub capacity: u64,
    /// Size of the early-warning zone before the end of each cartridge.
    pub early_warning: u64,
    /// Drives.
    pub drives: usize,
    /// Import/export slots.
    pub import_export: usize,
    /// Barcodes are this prefix, a 3-digit number and `L9`.
    pub barcode_prefix: String,
}

impl VirtualTapeOptions {
    /// `cartridges` blank cartridges of `capacity` bytes each; the early
    /// warning zone is 2 % of the capacity, at most 10 GiB and at least two
    /// of the largest blocks (as on real drives, whose zone is far larger
    /// than a block) — but never more than half the capacity; one drive,
    /// two import/export slots.
    pub fn new(cartridges: usize, capacity: u64) -> Self {
        VirtualTapeOptions {
            cartridges,
            empty_slots: 0,
            capacity,
            early_warning: (capacity / 50)
                .clamp(2 * MAX_BLOCK as u64, 10 << 30)
                .min(capacity / 2),
            drives: 1,
            import_export: 2,
            barcode_prefix: "CRN".into(),
        }
    }
}

/// What a simulated drive did since the library was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriveCounters {
    /// Cartridges loaded.
    pub loads: u64,
    /// Rewinds (unloads included).
    pub rewinds: u64,
    /// Moves towards the beginning of the medium other than rewinds
    /// (spacing back).
    pub backward_moves: u64,
    /// Forward space operations.
    pub forward_spaces: u64,
    /// Blocks read.
    pub blocks_read: u64,
    /// Blocks written.
    pub blocks_written: u64,
    /// Filemarks written.
    pub filemarks_written: u64,
}

#[derive(Clone, Copy, Debug)]
struct Record {
    /// Where its tag byte is in the cartridge file.
    offset: u64,
    /// Block length; `None` for a filemark.
    block: Option<u32>,
}

impl Record {
    fn end(&self) -> u64 {
        self.offset + self.block.map_or(1, |l| BLOCK_FRAMING + l as u64)
    }
}

/// A cartridge threaded in a drive.
struct Loaded {
    barcode: String,
    file: File,
    path: PathBuf,
    records: Vec<Record>,
    /// Index of the record at the position.
    at: usize,
    early_warning: bool,
}

struct DriveState {
    loaded: Option<Loaded>,
    counters: DriveCounters,
}

struct State {
    drives: Vec<DriveState>,
    /// Barcodes per element, as in `library.json`.
    layout: Layout,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Layout {
    version: u32,
    capacity: u64,
    early_warning: u64,
    drives: Vec<Option<String>>,
    slots: Vec<Option<String>>,
    import_export: Vec<Option<String>>,
}

/// A simulated tape library in a directory (see the module docs).
#[derive(Clone)]
pub struct VirtualTapeLibrary {
    dir: PathBuf,
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for VirtualTapeLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtualTapeLibrary")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn io(device: impl Into<String>) -> impl FnOnce(std::io::Error) -> TapeError {
    let device = device.into();
    move |source| TapeError::Io { device, source }
}

impl VirtualTapeLibrary {
    /// Creates a library in `dir` (created if missing; it must not hold a
    /// library already) with blank cartridges in its first slots.
    pub fn create(dir: impl AsRef<Path>, opts: &VirtualTapeOptions) -> TapeResult<Self> {
        let dir = dir.as_ref().to_path_buf();
        let name = format!("vtl:{}", dir.display());
        if opts.capacity < 1 << 20 || opts.early_warning >= opts.capacity {
            return Err(TapeError::Device {
                device: name,
                reason: format!(
                    "capacity {} with early warning {}: the capacity must be at least 1 MiB and larger than the early-warning zone",
                    opts.capacity, opts.early_warning
                ),
            });
        }
        if opts.drives == 0 || opts.cartridges + opts.empty_slots == 0 || opts.cartridges > 999 {
            return Err(TapeError::Device {
                device: name,
                reason: "a library needs at least one drive, one slot, and at most 999 cartridges"
                    .into(),
            });
        }
        if dir.join(STATE_FILE).exists() {
            return Err(TapeError::Device {
                device: name,
                reason: "a virtual library exists here already".into(),
            });
        }
        let carts = dir.join(CARTRIDGES);
        std::fs::create_dir_all(&carts).map_err(io(carts.display().to_string()))?;
        let mut slots = Vec::new();
        for n in 1..=opts.cartridges {
            let barcode = format!("{}{n:03}L9", opts.barcode_prefix);
            let path = carts.join(&barcode);
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io(path.display().to_string()))?;
            slots.push(Some(barcode));
        }
        slots.extend((0..opts.empty_slots).map(|_| None));
        let layout = Layout {
            version: 1,
            capacity: opts.capacity,
            early_warning: opts.early_warning,
            drives: vec![None; opts.drives],
            slots,
            import_export: vec![None; opts.import_export],
        };
        save_layout(&dir, &layout)?;
        Self::open(dir)
    }

    /// Opens the library in `dir`. Cartridges found in drives are loaded
    /// and rewound.
    pub fn open(dir: impl AsRef<Path>) -> TapeResult<Self> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(STATE_FILE);
        let raw = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                TapeError::Device {
                    device: format!("vtl:{}", dir.display()),
                    reason: "no virtual tape library here (no library.json)".into(),
                }
            } else {
                TapeError::Io {
                    device: path.display().to_string(),
                    source: e,
                }
            }
        })?;
        let layout: Layout = serde_json::from_slice(&raw).map_err(|e| TapeError::Device {
            device: path.display().to_string(),
            reason: format!("not a virtual library state: {e}"),
        })?;
        let bad = |reason: String| TapeError::Device {
            device: path.display().to_string(),
            reason,
        };
        if layout.version != 1 {
            return Err(bad(format!("version {} is not supported", layout.version)));
        }
        if layout.early_warning >= layout.capacity || layout.drives.is_empty() {
            return Err(bad("capacity, early warning or drives make no sense".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for b in layout
            .drives
            .iter()
            .chain(&layout.slots)
            .chain(&layout.import_export)
            .flatten()
        {
            if !valid_barcode(b) || !seen.insert(b.clone()) {
                return Err(bad(format!("barcode {b:?} is invalid or held twice")));
            }
        }
        let mut drives = Vec::new();
        for barcode in &layout.drives {
            let loaded = match barcode {
                Some(b) => Some(load(&dir, b)?),
                None => None,
            };
            drives.push(DriveState {
                loaded,
                counters: DriveCounters::default(),
            });
        }
        Ok(VirtualTapeLibrary {
            dir,
            state: Arc::new(Mutex::new(State { drives, layout })),
        })
    }

    /// The library's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What drive `index` did so far (`None`: no such drive).
    pub fn counters(&self, index: usize) -> Option<DriveCounters> {
        self.state.lock().drives.get(index).map(|d| d.counters)
    }

    /// The simulated drive `index`, with its counters.
    pub fn virtual_drive(&self, index: usize) -> TapeResult<VirtualDrive> {
        if index >= self.state.lock().drives.len() {
            return Err(TapeError::NoSuchElement {
                library: self.name(),
                element: Element::Drive(index),
            });
        }
        Ok(VirtualDrive {
            library: self.clone(),
            index,
        })
    }

    /// Puts a new blank cartridge with `barcode` into import/export slot
    /// `slot` (an operator inserting a cartridge into the mail slot).
    pub fn insert_blank(&self, slot: usize, barcode: &str) -> TapeResult<()> {
        let mut state = self.state.lock();
        if !valid_barcode(barcode) {
            return Err(TapeError::Device {
                device: self.name(),
                reason: format!("barcode {barcode:?}: 1–16 letters, digits or '-'"),
            });
        }
        let exists = self.dir.join(CARTRIDGES).join(barcode);
        if exists.exists() {
            return Err(TapeError::Device {
                device: self.name(),
                reason: format!("a cartridge {barcode} exists already"),
            });
        }
        let element = Element::ImportExport(slot);
        match state.layout.import_export.get(slot) {
            None => {
                return Err(TapeError::NoSuchElement {
                    library: self.name(),
                    element,
                })
            }
            Some(Some(b)) => {
                return Err(TapeError::ElementFull {
                    library: self.name(),
                    element,
                    barcode: b.clone(),
                })
            }
            Some(None) => {}
        }
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&exists)
            .and_then(|f| f.sync_all())
            .map_err(io(exists.display().to_string()))?;
        let mut layout = state.layout.clone();
        layout.import_export[slot] = Some(barcode.to_string());
        save_layout(&self.dir, &layout)?;
        state.layout = layout;
        Ok(())
    }

    fn with_drive<T>(
        &self,
        index: usize,
        f: impl FnOnce(&mut DriveState, &Layout, String) -> TapeResult<T>,
    ) -> TapeResult<T> {
        let mut state = self.state.lock();
        let State { drives, layout } = &mut *state;
        let device = format!("vtl:{} drive {index}", self.dir.display());
        match drives.get_mut(index) {
            Some(d) => f(d, layout, device),
            None => Err(TapeError::NoSuchElement {
                library: self.name(),
                element: Element::Drive(index),
            }),
        }
    }
}

/// The holder of one element in `layout`.
fn element(layout: &mut Layout, e: Element) -> Option<&mut Option<String>> {
    match e {
        Element::Drive(i) => layout.drives.get_mut(i),
        Element::Slot(i) => layout.slots.get_mut(i),
        Element::ImportExport(i) => layout.import_export.get_mut(i),
    }
}

fn valid_barcode(b: &str) -> bool {
    (1..=16).contains(&b.len()) && b.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
}

fn save_layout(dir: &Path, layout: &Layout) -> TapeResult<()> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(layout).map_err(|e| TapeError::Device {
        device: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(io(path.display().to_string()))
}

/// Opens a cartridge file and indexes its records.
fn load(dir: &Path, barcode: &str) -> TapeResult<Loaded> {
    let path = dir.join(CARTRIDGES).join(barcode);
    let device = path.display().to_string();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io(device.clone()))?;
    let len = file.metadata().map_err(io(device.clone()))?.len();
    let scan = super::parse::scan_cartridge(&mut file, len, MAX_BLOCK).map_err(|reason| {
        TapeError::Device {
            device: device.clone(),
            reason,
        }
    })?;
    let records = scan
        .records
        .into_iter()
        .map(|(offset, block)| Record { offset, block })
        .collect();
    if let Some(at) = scan.torn_at {
        file.set_len(at).map_err(io(device.clone()))?;
    }
    file.seek(SeekFrom::Start(0)).map_err(io(device))?;
    Ok(Loaded {
        barcode: barcode.to_string(),
        file,
        path,
        records,
        at: 0,
        early_warning: false,
    })
}

impl TapeLibrary for VirtualTapeLibrary {
    fn name(&self) -> String {
        format!("vtl:{}", self.dir.display())
    }

    fn inventory(&self) -> TapeResult<Vec<ElementStatus>> {
        let state = self.state.lock();
        let l = &state.layout;
        let mut out = Vec::new();
        let mut add = |e: fn(usize) -> Element, v: &[Option<String>]| {
            for (i, b) in v.iter().enumerate() {
                out.push(ElementStatus {
                    element: e(i),
                    barcode: b.clone(),
                });
            }
        };
        add(Element::Drive, &l.drives);
        add(Element::Slot, &l.slots);
        add(Element::ImportExport, &l.import_export);
        Ok(out)
    }

    fn move_medium(&mut self, from: Element, to: Element) -> TapeResult<()> {
        let name = self.name();
        let mut state = self.state.lock();
        let mut layout = state.layout.clone();
        let missing = |element| TapeError::NoSuchElement {
            library: name.clone(),
            element,
        };
        let barcode = element(&mut layout, from)
            .ok_or_else(|| missing(from))?
            .clone()
            .ok_or_else(|| TapeError::ElementEmpty {
                library: name.clone(),
                element: from,
            })?;
        let dst = element(&mut layout, to).ok_or_else(|| missing(to))?;
        if let Some(b) = dst {
            return Err(TapeError::ElementFull {
                library: name.clone(),
                element: to,
                barcode: b.clone(),
            });
        }
        *dst = Some(barcode.clone());
        if let Some(src) = element(&mut layout, from) {
            *src = None;
        }
        // The drives: unload what leaves, load what arrives.
        let loaded = match to {
            Element::Drive(_) => Some(load(&self.dir, &barcode)?),
            _ => None,
        };
        save_layout(&self.dir, &layout)?;
        state.layout = layout;
        if let Element::Drive(i) = from {
            if let Some(d) = state.drives.get_mut(i) {
                d.loaded = None;
                d.counters.rewinds += 1;
            }
        }
        if let (Element::Drive(i), Some(l)) = (to, loaded) {
            if let Some(d) = state.drives.get_mut(i) {
                d.loaded = Some(l);
                d.counters.loads += 1;
            }
        }
        Ok(())
    }

    fn drive(&self, index: usize) -> TapeResult<Box<dyn TapeDrive>> {
        Ok(Box::new(self.virtual_drive(index)?))
    }
}

/// A handle on one simulated drive (see [`VirtualTapeLibrary`]).
#[derive(Debug, Clone)]
pub struct VirtualDrive {
    library: VirtualTapeLibrary,
    index: usize,
}

impl VirtualDrive {
    /// What this drive did so far.
    pub fn counters(&self) -> DriveCounters {
        self.library.counters(self.index).unwrap_or_default()
    }

    fn with_loaded<T>(
        &self,
        f: impl FnOnce(&mut Loaded, &mut DriveCounters, &Layout, &str) -> TapeResult<T>,
    ) -> TapeResult<T> {
        self.library.with_drive(self.index, |d, layout, device| {
            let DriveState { loaded, counters } = d;
            match loaded {
                Some(l) => f(l, counters, layout, &device),
                None => Err(TapeError::NoMedium { device }),
            }
        })
    }
}

impl Loaded {
    /// Where the next record would start.
    fn offset_at(&self, at: usize) -> u64 {
        match at {
            0 => 0,
            n => self.records.get(n - 1).map_or(0, Record::end),
        }
    }

    /// Writes one record (a block of `data`, or a filemark when `None`) at
    /// the position, erasing what followed.
    fn write_record(
        &mut self,
        data: Option<&[u8]>,
        layout: &Layout,
        device: &str,
    ) -> TapeResult<WriteOutcome> {
        let start = self.offset_at(self.at);
        let framing = data.map_or(1, |d| BLOCK_FRAMING + d.len() as u64);
        let end = start + framing;
        if end > layout.capacity {
            return Err(TapeError::EndOfMedium {
                device: device.to_string(),
                barcode: self.barcode.clone(),
                capacity: layout.capacity,
            });
        }
        let path = self.path.display().to_string();
        if self.at < self.records.len() {
            // In the middle of the recorded data: what follows is erased.
            self.records.truncate(self.at);
            self.file.set_len(start).map_err(io(path.clone()))?;
        }
        let block = match data {
            Some(d) => {
                let mut head = [BLOCK_TAG, 0, 0, 0, 0];
                head[1..].copy_from_slice(&(d.len() as u32).to_le_bytes());
                self.file
                    .write_all_at(&head, start)
                    .and_then(|()| self.file.write_all_at(d, start + BLOCK_FRAMING))
                    .map_err(io(path))?;
                Some(d.len() as u32)
            }
            None => {
                self.file
                    .write_all_at(&[FILEMARK_TAG], start)
                    .map_err(io(path))?;
                None
            }
        };
        self.records.push(Record {
            offset: start,
            block,
        });
        self.at += 1;
        self.early_warning = end >= layout.capacity - layout.early_warning;
        Ok(if self.early_warning {
            WriteOutcome::EarlyWarning
        } else {
            WriteOutcome::Written
        })
    }
}

impl TapeDrive for VirtualDrive {
    fn device(&self) -> String {
        format!("vtl:{} drive {}", self.library.dir.display(), self.index)
    }

    fn loaded(&self) -> Option<String> {
        self.library
            .with_drive(self.index, |d, _, _| {
                Ok(d.loaded.as_ref().map(|l| l.barcode.clone()))
            })
            .ok()
            .flatten()
    }

    fn rewind(&mut self) -> TapeResult<()> {
        self.with_loaded(|l, c, _, _| {
            l.at = 0;
            c.rewinds += 1;
            Ok(())
        })
    }

    fn position(&self) -> TapeResult<TapePosition> {
        self.with_loaded(|l, _, _, _| {
            let mut pos = TapePosition::default();
            for r in &l.records[..l.at] {
                match r.block {
                    Some(_) => pos.block += 1,
                    None => {
                        pos.file += 1;
                        pos.block = 0;
                    }
                }
            }
            Ok(pos)
        })
    }

    fn write_block(&mut self, data: &[u8]) -> TapeResult<WriteOutcome> {
        let device = self.device();
        if data.is_empty() || data.len() > MAX_BLOCK {
            return Err(TapeError::BadBlockSize {
                device,
                len: data.len(),
                max: MAX_BLOCK,
            });
        }
        self.with_loaded(|l, c, layout, device| {
            let out = l.write_record(Some(data), layout, device)?;
            c.blocks_written += 1;
            Ok(out)
        })
    }

    fn write_filemarks(&mut self, count: u32) -> TapeResult<WriteOutcome> {
        self.with_loaded(|l, c, layout, device| {
            let mut out = WriteOutcome::Written;
            for _ in 0..count {
                out = l.write_record(None, layout, device)?;
                c.filemarks_written += 1;
            }
            // A filemark flushes the drive's buffer to the medium.
            l.file
                .sync_data()
                .map_err(io(l.path.display().to_string()))?;
            Ok(out)
        })
    }

    fn read_block(&mut self, buf: &mut [u8]) -> TapeResult<ReadOutcome> {
        self.with_loaded(|l, c, _, device| {
            let Some(r) = l.records.get(l.at).copied() else {
                return Ok(ReadOutcome::EndOfData);
            };
            match r.block {
                None => {
                    l.at += 1;
                    Ok(ReadOutcome::Filemark)
                }
                Some(len) => {
                    let len = len as usize;
                    if len > buf.len() {
                        return Err(TapeError::BlockTooLarge {
                            device: device.to_string(),
                            block: len,
                            buffer: buf.len(),
                        });
                    }
                    l.file
                        .read_exact_at(&mut buf[..len], r.offset + BLOCK_FRAMING)
                        .map_err(io(l.path.display().to_string()))?;
                    l.at += 1;
                    c.blocks_read += 1;
                    Ok(ReadOutcome::Block(len))
                }
            }
        })
    }

    fn space_filemarks(&mut self, count: i64) -> TapeResult<()> {
        self.with_loaded(|l, c, _, device| {
            if count > 0 {
                c.forward_spaces += 1;
                let mut left = count;
                while left > 0 {
                    let Some(r) = l.records.get(l.at) else {
                        return Err(TapeError::BlankCheck {
                            device: device.to_string(),
                        });
                    };
                    l.at += 1;
                    if r.block.is_none() {
                        left -= 1;
                    }
                }
                return Ok(());
            }
            c.backward_moves += 1;
            // Back over `-count` filemarks, stopping before the last one;
            // `0`: back to the start of the current file.
            let mut left = count.unsigned_abs();
            loop {
                if l.at == 0 {
                    if left == 0 {
                        return Ok(());
                    }
                    return Err(TapeError::BeginningOfMedium {
                        device: device.to_string(),
                    });
                }
                let before = l.records[l.at - 1];
                if before.block.is_none() {
                    if left == 0 {
                        return Ok(());
                    }
                    left -= 1;
                    if left == 0 {
                        l.at -= 1;
                        return Ok(());
                    }
                }
                l.at -= 1;
            }
        })
    }

    fn space_to_end_of_data(&mut self) -> TapeResult<()> {
        self.with_loaded(|l, c, _, _| {
            c.forward_spaces += 1;
            l.at = l.records.len();
            Ok(())
        })
    }

    fn at_early_warning(&self) -> bool {
        self.with_loaded(|l, _, _, _| Ok(l.early_warning))
            .unwrap_or(false)
    }

    fn max_block_size(&self) -> usize {
        MAX_BLOCK
    }
}
