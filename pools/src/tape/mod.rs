//! Tape: how Cairn talks to tape drives and tape libraries.
//!
//! Two traits, one per device, modelled on what the hardware does (SCSI
//! stream commands for drives, SCSI medium changer commands for
//! libraries), so that the tape pool above them is the same whether the
//! devices are real or simulated:
//!
//! - [`TapeDrive`]: a sequential medium with blocks and filemarks. Writing
//!   happens at the current position and **erases everything after it**;
//!   reading returns one block at a time, or a filemark, or the end of the
//!   recorded data; the drive warns before the medium is full (*early
//!   warning*) and refuses to write past its end.
//! - [`TapeLibrary`]: storage slots, drives and import/export slots
//!   (mail slots) holding cartridges known by their barcodes; a robot
//!   moves a cartridge from one element to another.
//!
//! Implementations: [`VirtualTapeLibrary`] (a simulator backed by files,
//! for tests, demos and development; see its docs) and, for real hardware
//! on Linux, [`scsi::ScsiTapeDrive`] (`/dev/nstN`) with
//! [`scsi::MtxChanger`] (a changer driven by `mtx`) — **untested on
//! hardware**: only their command encoding is tested.
//!
//! The engine knows nothing of tape: [`TapePool`] maps pool objects onto
//! tape files and keeps a catalog of where each one lies.

pub mod parse;
mod pool;
pub mod scsi;
mod virtual_library;

pub use pool::{
    MediaSetInfo, MediaSetState, RetiredSet, TapeMediaSet, TapePool, TapeRebuild, TapeWriteStats,
    WeakTapePool, DATA_BLOCK,
};

pub use virtual_library::{
    DriveCounters, VirtualDrive, VirtualTapeLibrary, VirtualTapeOptions, LTO9_CAPACITY, MAX_BLOCK,
};

use std::fmt;

/// A place in a library that can hold one cartridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Element {
    /// A storage slot (numbered from 0).
    Slot(usize),
    /// A drive (numbered from 0).
    Drive(usize),
    /// An import/export slot (mail slot), where cartridges enter and leave
    /// the library.
    ImportExport(usize),
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Element::Slot(i) => write!(f, "slot {i}"),
            Element::Drive(i) => write!(f, "drive {i}"),
            Element::ImportExport(i) => write!(f, "import/export slot {i}"),
        }
    }
}

/// One element of a library and the cartridge in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElementStatus {
    /// The element.
    pub element: Element,
    /// The barcode of the cartridge it holds; `None` when empty.
    pub barcode: Option<String>,
}

/// Where a drive is on its medium: the tape file (filemarks passed since
/// the beginning of the medium) and the block within that file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct TapePosition {
    /// Filemarks between the beginning of the medium and the position.
    pub file: u64,
    /// Blocks between the start of that file and the position.
    pub block: u64,
}

/// What a read found at the current position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// A block of this many bytes was read into the buffer.
    Block(usize),
    /// A filemark was passed (the position is now the next file's start).
    Filemark,
    /// Nothing is recorded past this point (a blank medium reads this at
    /// once). The position does not move.
    EndOfData,
}

/// How a write went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written; room is left.
    Written,
    /// Written, and the medium is now in its early-warning zone: finish
    /// what is being written (a filemark, a closing block) and go on on the
    /// next cartridge.
    EarlyWarning,
}

/// Errors of tape devices, named after what the device reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TapeError {
    /// The drive holds no cartridge.
    #[error("{device}: no cartridge loaded")]
    NoMedium {
        /// The drive.
        device: String,
    },
    /// A write would pass the physical end of the medium; nothing was
    /// written.
    #[error("{device}: end of medium: cartridge {barcode} is full ({capacity} bytes)")]
    EndOfMedium {
        /// The drive.
        device: String,
        /// The cartridge.
        barcode: String,
        /// Its capacity in bytes.
        capacity: u64,
    },
    /// A space or read ran into the beginning of the medium.
    #[error("{device}: beginning of medium reached")]
    BeginningOfMedium {
        /// The drive.
        device: String,
    },
    /// A space forward ran past the recorded data.
    #[error("{device}: end of recorded data reached (blank check)")]
    BlankCheck {
        /// The drive.
        device: String,
    },
    /// A block is larger than the caller's buffer (the read did not move).
    #[error("{device}: a {block}-byte block does not fit a {buffer}-byte buffer")]
    BlockTooLarge {
        /// The drive.
        device: String,
        /// The block's size.
        block: usize,
        /// The buffer's size.
        buffer: usize,
    },
    /// A block larger than the drive accepts, or an empty one.
    #[error("{device}: cannot write a {len}-byte block (1 … {max} bytes)")]
    BadBlockSize {
        /// The drive.
        device: String,
        /// The block's size.
        len: usize,
        /// The largest block accepted.
        max: usize,
    },
    /// A library move from an empty element.
    #[error("{library}: {element} is empty")]
    ElementEmpty {
        /// The library.
        library: String,
        /// The element.
        element: Element,
    },
    /// A library move into an occupied element.
    #[error("{library}: {element} is occupied (by {barcode})")]
    ElementFull {
        /// The library.
        library: String,
        /// The element.
        element: Element,
        /// The cartridge in it.
        barcode: String,
    },
    /// An element the library does not have.
    #[error("{library}: there is no {element}")]
    NoSuchElement {
        /// The library.
        library: String,
        /// The element.
        element: Element,
    },
    /// The device's on-disk state (simulator) or its answers (hardware)
    /// make no sense.
    #[error("{device}: {reason}")]
    Device {
        /// The device or file.
        device: String,
        /// What is wrong.
        reason: String,
    },
    /// I/O on the device (or the simulator's files) failed.
    #[error("{device}: {source}")]
    Io {
        /// The device or file.
        device: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A result of a tape operation.
pub type TapeResult<T> = std::result::Result<T, TapeError>;

/// A tape drive in variable-block mode (each write is one block, each read
/// returns one block). Every operation acts at the current position.
pub trait TapeDrive: Send {
    /// A name for messages (`/dev/nst0`, `vtl:DIR drive 0`).
    fn device(&self) -> String;

    /// The barcode (or volume name) of the cartridge loaded, if any.
    fn loaded(&self) -> Option<String>;

    /// Moves to the beginning of the medium.
    fn rewind(&mut self) -> TapeResult<()>;

    /// The current position.
    fn position(&self) -> TapeResult<TapePosition>;

    /// Writes one block at the current position; what followed it on the
    /// medium is erased. Fails with [`TapeError::EndOfMedium`] (nothing
    /// written) when the block does not fit.
    fn write_block(&mut self, data: &[u8]) -> TapeResult<WriteOutcome>;

    /// Writes `count` filemarks at the current position (erasing what
    /// followed) and makes everything written so far durable.
    fn write_filemarks(&mut self, count: u32) -> TapeResult<WriteOutcome>;

    /// Reads the block at the current position into `buf`.
    fn read_block(&mut self, buf: &mut [u8]) -> TapeResult<ReadOutcome>;

    /// Spaces over `count` filemarks: forward (`count > 0`, stopping just
    /// after the last one), backward (`count < 0`, stopping just before
    /// it), or to the start of the current file (`count == 0`).
    fn space_filemarks(&mut self, count: i64) -> TapeResult<()>;

    /// Moves to the end of the recorded data (where appending starts).
    fn space_to_end_of_data(&mut self) -> TapeResult<()>;

    /// Whether the last write left the medium in its early-warning zone.
    fn at_early_warning(&self) -> bool;

    /// The largest block the drive writes and reads.
    fn max_block_size(&self) -> usize;
}

/// A tape library (media changer): elements holding cartridges, a robot
/// moving them, and drives.
pub trait TapeLibrary: Send {
    /// A name for messages.
    fn name(&self) -> String;

    /// Every element and what it holds, drives first, then storage slots,
    /// then import/export slots.
    fn inventory(&self) -> TapeResult<Vec<ElementStatus>>;

    /// Moves the cartridge in `from` to `to` (which must be empty). A
    /// cartridge leaves a drive only when the drive has unloaded it (the
    /// robot cannot pull a threaded tape): [`TapeLibrary::drive`] handles
    /// are told by the library, the simulator rewinds on unload.
    fn move_medium(&mut self, from: Element, to: Element) -> TapeResult<()>;

    /// A handle on drive `index`, positioned where the drive is (the
    /// beginning of the medium right after a load).
    fn drive(&self, index: usize) -> TapeResult<Box<dyn TapeDrive>>;
}
