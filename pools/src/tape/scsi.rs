//! Real tape hardware on Linux, behind the same traits as the simulator:
//! [`ScsiTapeDrive`] drives a non-rewinding tape device (`/dev/nstN`,
//! the kernel's `st` driver) with `read`/`write` and the `MTIOCTOP`,
//! `MTIOCGET` ioctls; [`MtxChanger`] moves cartridges with the `mtx`
//! command on the changer's SCSI generic device (`/dev/sgM`).
//!
//! **Untested on hardware.** No tape drive or library can run on the
//! machines Cairn is developed on; what is tested is the command encoding
//! (ioctl numbers and structures, the `mtx` arguments for every move, the
//! parsing of `mtx status`) — the unit tests below. Treat this module as a
//! starting point to be validated against a real drive before use.
//!
//! Mapping of the trait's semantics onto `st` (see st(4)):
//! - one `write` is one block (variable-block mode, set with `MTSETBLK 0`);
//!   `ENOSPC` on a write means the early warning was passed: the driver
//!   lets the next writes through until the physical end, so the block is
//!   written again once and reported as [`WriteOutcome::EarlyWarning`]; a
//!   second `ENOSPC` is the end of the medium;
//! - a `read` of 0 bytes is a filemark (the driver moves past it); `EIO`
//!   with the status showing end of data is [`ReadOutcome::EndOfData`];
//!   `ENOMEM` is a block larger than the buffer;
//! - spacing: `MTFSF`/`MTBSF`; "to the start of the current file" is
//!   `MTBSF 1` + `MTFSF 1`, or a rewind in file 0; end of data is `MTEOM`;
//! - the position is `MTIOCGET`'s file and block numbers.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{
    Element, ElementStatus, ReadOutcome, TapeDrive, TapeError, TapeLibrary, TapePosition,
    TapeResult, WriteOutcome,
};

/// `struct mtop` of `<sys/mtio.h>`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MtOp {
    /// The operation (`MT*` below).
    pub mt_op: libc::c_short,
    /// Its count.
    pub mt_count: libc::c_int,
}

/// `struct mtget` of `<sys/mtio.h>`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MtGet {
    /// Drive type.
    pub mt_type: libc::c_long,
    /// Residual count.
    pub mt_resid: libc::c_long,
    /// Device-dependent status (block size, density).
    pub mt_dsreg: libc::c_long,
    /// Generic status bits (`GMT_*`).
    pub mt_gstat: libc::c_long,
    /// Error register.
    pub mt_erreg: libc::c_long,
    /// File number of the position.
    pub mt_fileno: libc::c_int,
    /// Block number in that file.
    pub mt_blkno: libc::c_int,
}

/// Tape operations used here (`<sys/mtio.h>`).
pub mod op {
    /// Forward space over filemarks.
    pub const MTFSF: i16 = 1;
    /// Backward space over filemarks.
    pub const MTBSF: i16 = 2;
    /// Write filemarks.
    pub const MTWEOF: i16 = 5;
    /// Rewind.
    pub const MTREW: i16 = 6;
    /// Rewind and unload (take the tape offline).
    pub const MTOFFL: i16 = 7;
    /// Go to the end of recorded data.
    pub const MTEOM: i16 = 12;
    /// Set the block size (0: variable).
    pub const MTSETBLK: i16 = 20;
}

/// Generic status bits of `MtGet::mt_gstat`.
pub mod gstat {
    /// At a filemark.
    pub const EOF: i64 = 0x8000_0000;
    /// At the beginning of the medium.
    pub const BOT: i64 = 0x4000_0000;
    /// Past the early warning (end of tape).
    pub const EOT: i64 = 0x2000_0000;
    /// At the end of recorded data.
    pub const EOD: i64 = 0x0800_0000;
    /// A cartridge is loaded and ready.
    pub const ONLINE: i64 = 0x0100_0000;
}

/// The generic status bits as i64 (`c_long` is 32 bits on some targets).
#[allow(clippy::unnecessary_cast)]
fn bits(s: &MtGet) -> i64 {
    s.mt_gstat as i64
}

/// Linux `_IOC` encoding: direction, type `'m'`, number, size.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((b'm' as u64) << 8) | nr
}
/// `MTIOCTOP = _IOW('m', 1, struct mtop)`.
pub const MTIOCTOP: u64 = ioc(1, 1, std::mem::size_of::<MtOp>());
/// `MTIOCGET = _IOR('m', 2, struct mtget)`.
pub const MTIOCGET: u64 = ioc(2, 2, std::mem::size_of::<MtGet>());

/// Largest block written or read (the `st` driver's buffer must allow it).
pub const SCSI_MAX_BLOCK: usize = 1 << 20;

/// A tape drive through the Linux `st` driver (see the module docs;
/// untested on hardware).
pub struct ScsiTapeDrive {
    path: PathBuf,
    file: File,
    /// The cartridge the changer loaded, as the changer tells it.
    loaded: Arc<Mutex<Option<String>>>,
    early_warning: bool,
}

impl std::fmt::Debug for ScsiTapeDrive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiTapeDrive")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ScsiTapeDrive {
    /// Opens a non-rewinding tape device (`/dev/nstN`) and sets
    /// variable-block mode. `loaded` is shared with the changer, which
    /// records the barcode it moved into this drive.
    pub fn open(path: impl AsRef<Path>, loaded: Arc<Mutex<Option<String>>>) -> TapeResult<Self> {
        let path = path.as_ref().to_path_buf();
        let device = path.display().to_string();
        let meta = std::fs::metadata(&path).map_err(|source| TapeError::Io {
            device: device.clone(),
            source,
        })?;
        if !std::os::unix::fs::FileTypeExt::is_char_device(&meta.file_type()) {
            return Err(TapeError::Device {
                device,
                reason: "not a character device (expected a tape device like /dev/nst0)".into(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| TapeError::Io { device, source })?;
        let mut drive = ScsiTapeDrive {
            path,
            file,
            loaded,
            early_warning: false,
        };
        drive.op(op::MTSETBLK, 0)?;
        Ok(drive)
    }

    fn err(&self, source: std::io::Error) -> TapeError {
        TapeError::Io {
            device: self.path.display().to_string(),
            source,
        }
    }

    fn op(&mut self, mt_op: i16, count: i32) -> TapeResult<()> {
        let arg = MtOp {
            mt_op,
            mt_count: count,
        };
        // SAFETY: MTIOCTOP reads one `struct mtop` from the pointer, which
        // points to a live, properly laid out value.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), MTIOCTOP as _, &arg) };
        if rc < 0 {
            return Err(self.err(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn status(&self) -> TapeResult<MtGet> {
        let mut st = MtGet::default();
        // SAFETY: MTIOCGET writes one `struct mtget` to the pointer, which
        // points to a live value of that layout.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), MTIOCGET as _, &mut st) };
        if rc < 0 {
            return Err(self.err(std::io::Error::last_os_error()));
        }
        Ok(st)
    }
}

impl TapeDrive for ScsiTapeDrive {
    fn device(&self) -> String {
        self.path.display().to_string()
    }

    fn loaded(&self) -> Option<String> {
        let online = self.status().is_ok_and(|s| bits(&s) & gstat::ONLINE != 0);
        if online {
            self.loaded.lock().clone()
        } else {
            None
        }
    }

    fn rewind(&mut self) -> TapeResult<()> {
        self.early_warning = false;
        self.op(op::MTREW, 1)
    }

    fn position(&self) -> TapeResult<TapePosition> {
        let s = self.status()?;
        if s.mt_fileno < 0 || s.mt_blkno < 0 {
            return Err(TapeError::Device {
                device: self.device(),
                reason: "the drive does not know its position".into(),
            });
        }
        Ok(TapePosition {
            file: s.mt_fileno as u64,
            block: s.mt_blkno as u64,
        })
    }

    fn write_block(&mut self, data: &[u8]) -> TapeResult<WriteOutcome> {
        if data.is_empty() || data.len() > SCSI_MAX_BLOCK {
            return Err(TapeError::BadBlockSize {
                device: self.device(),
                len: data.len(),
                max: SCSI_MAX_BLOCK,
            });
        }
        let mut tried_again = false;
        loop {
            match self.file.write(data) {
                Ok(n) if n == data.len() => break,
                Ok(n) => {
                    return Err(TapeError::Device {
                        device: self.device(),
                        reason: format!("wrote {n} of a {}-byte block", data.len()),
                    })
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && !tried_again => {
                    // Past the early warning: the driver lets the next
                    // write through.
                    self.early_warning = true;
                    tried_again = true;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    return Err(TapeError::EndOfMedium {
                        device: self.device(),
                        barcode: self.loaded.lock().clone().unwrap_or_default(),
                        capacity: 0,
                    })
                }
                Err(e) => return Err(self.err(e)),
            }
        }
        if self.status().is_ok_and(|s| bits(&s) & gstat::EOT != 0) {
            self.early_warning = true;
        }
        Ok(if self.early_warning {
            WriteOutcome::EarlyWarning
        } else {
            WriteOutcome::Written
        })
    }

    fn write_filemarks(&mut self, count: u32) -> TapeResult<WriteOutcome> {
        self.op(op::MTWEOF, count as i32)?;
        Ok(if self.early_warning {
            WriteOutcome::EarlyWarning
        } else {
            WriteOutcome::Written
        })
    }

    fn read_block(&mut self, buf: &mut [u8]) -> TapeResult<ReadOutcome> {
        match self.file.read(buf) {
            Ok(0) => Ok(ReadOutcome::Filemark),
            Ok(n) => Ok(ReadOutcome::Block(n)),
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => Err(TapeError::BlockTooLarge {
                device: self.device(),
                block: 0,
                buffer: buf.len(),
            }),
            Err(e) => {
                let at_end = self.status().is_ok_and(|s| bits(&s) & gstat::EOD != 0);
                if at_end {
                    Ok(ReadOutcome::EndOfData)
                } else {
                    Err(self.err(e))
                }
            }
        }
    }

    fn space_filemarks(&mut self, count: i64) -> TapeResult<()> {
        let count32 = |c: i64| {
            i32::try_from(c).map_err(|_| TapeError::Device {
                device: self.device(),
                reason: format!("cannot space over {c} filemarks"),
            })
        };
        match count {
            c if c > 0 => self.op(op::MTFSF, count32(c)?),
            c if c < 0 => self.op(op::MTBSF, count32(-c)?),
            _ => {
                if self.position()?.file == 0 {
                    self.rewind()
                } else {
                    self.op(op::MTBSF, 1)?;
                    self.op(op::MTFSF, 1)
                }
            }
        }
    }

    fn space_to_end_of_data(&mut self) -> TapeResult<()> {
        self.op(op::MTEOM, 1)
    }

    fn at_early_warning(&self) -> bool {
        self.early_warning
    }

    fn max_block_size(&self) -> usize {
        SCSI_MAX_BLOCK
    }
}

pub use super::parse::{parse_mtx_status, MtxStatus};

/// The `mtx` arguments (after `-f DEV`) that move a cartridge from `from`
/// to `to`, given the element numbers of the library's storage slots and
/// import/export slots (`mtx` numbers both among its storage elements).
pub fn mtx_move_args(
    from: Element,
    to: Element,
    slots: &[u32],
    import_export: &[u32],
) -> Result<Vec<String>, String> {
    let storage = |e: Element| -> Result<Option<u32>, String> {
        match e {
            Element::Slot(i) => slots
                .get(i)
                .copied()
                .map(Some)
                .ok_or_else(|| format!("there is no {e}")),
            Element::ImportExport(i) => import_export
                .get(i)
                .copied()
                .map(Some)
                .ok_or_else(|| format!("there is no {e}")),
            Element::Drive(_) => Ok(None),
        }
    };
    Ok(match (from, to, storage(from)?, storage(to)?) {
        (_, Element::Drive(d), Some(s), None) => vec!["load".into(), s.to_string(), d.to_string()],
        (Element::Drive(d), _, None, Some(s)) => {
            vec!["unload".into(), s.to_string(), d.to_string()]
        }
        (_, _, Some(a), Some(b)) => vec!["transfer".into(), a.to_string(), b.to_string()],
        _ => return Err(format!("cannot move from {from} to {to}")),
    })
}

/// A media changer driven by the `mtx` command (see the module docs;
/// untested on hardware). Drives are the given tape devices, in the
/// changer's drive order.
pub struct MtxChanger {
    device: PathBuf,
    drives: Vec<PathBuf>,
    loaded: Vec<Arc<Mutex<Option<String>>>>,
}

impl std::fmt::Debug for MtxChanger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtxChanger")
            .field("device", &self.device)
            .field("drives", &self.drives)
            .finish()
    }
}

impl MtxChanger {
    /// A changer at `device` (`/dev/sgM`) whose drives are `drives`
    /// (`/dev/nstN`, in the changer's order). Fails when `mtx` is missing or
    /// the changer does not answer.
    pub fn open(device: impl AsRef<Path>, drives: Vec<PathBuf>) -> TapeResult<Self> {
        let mut changer = MtxChanger {
            device: device.as_ref().to_path_buf(),
            loaded: drives.iter().map(|_| Arc::new(Mutex::new(None))).collect(),
            drives,
        };
        let status = changer.status()?;
        for (i, b) in status.drives.iter().enumerate() {
            if let Some(slot) = changer.loaded.get_mut(i) {
                *slot.lock() = b.clone();
            }
        }
        Ok(changer)
    }

    fn mtx(&self, args: &[String]) -> TapeResult<String> {
        let device = self.device.display().to_string();
        let out = Command::new("mtx")
            .arg("-f")
            .arg(&self.device)
            .args(args)
            .output()
            .map_err(|source| TapeError::Io {
                device: format!("mtx -f {device}"),
                source,
            })?;
        if !out.status.success() {
            return Err(TapeError::Device {
                device,
                reason: format!(
                    "mtx {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn status(&self) -> TapeResult<MtxStatus> {
        let text = self.mtx(&["status".into()])?;
        parse_mtx_status(&text).map_err(|reason| TapeError::Device {
            device: self.device.display().to_string(),
            reason,
        })
    }
}

impl TapeLibrary for MtxChanger {
    fn name(&self) -> String {
        self.device.display().to_string()
    }

    fn inventory(&self) -> TapeResult<Vec<ElementStatus>> {
        let st = self.status()?;
        let mut out: Vec<ElementStatus> = st
            .drives
            .iter()
            .enumerate()
            .map(|(i, b)| ElementStatus {
                element: Element::Drive(i),
                barcode: b.clone(),
            })
            .collect();
        let (mut slot, mut ie) = (0, 0);
        for (_, is_ie, b) in &st.storage {
            let element = if *is_ie {
                ie += 1;
                Element::ImportExport(ie - 1)
            } else {
                slot += 1;
                Element::Slot(slot - 1)
            };
            out.push(ElementStatus {
                element,
                barcode: b.clone(),
            });
        }
        Ok(out)
    }

    fn move_medium(&mut self, from: Element, to: Element) -> TapeResult<()> {
        let st = self.status()?;
        let slots: Vec<u32> = st.storage.iter().filter(|s| !s.1).map(|s| s.0).collect();
        let ie: Vec<u32> = st.storage.iter().filter(|s| s.1).map(|s| s.0).collect();
        let args = mtx_move_args(from, to, &slots, &ie).map_err(|reason| TapeError::Device {
            device: self.name(),
            reason,
        })?;
        if let Element::Drive(d) = from {
            // The robot cannot pull a threaded tape: take it offline.
            if let Some(path) = self.drives.get(d) {
                let mut drive = ScsiTapeDrive::open(path, self.loaded[d].clone())?;
                drive.op(op::MTOFFL, 1)?;
            }
        }
        self.mtx(&args)?;
        let after = self.status()?;
        for (i, b) in after.drives.iter().enumerate() {
            if let Some(slot) = self.loaded.get(i) {
                *slot.lock() = b.clone();
            }
        }
        Ok(())
    }

    fn drive(&self, index: usize) -> TapeResult<Box<dyn TapeDrive>> {
        let path = self
            .drives
            .get(index)
            .ok_or_else(|| TapeError::NoSuchElement {
                library: self.name(),
                element: Element::Drive(index),
            })?;
        Ok(Box::new(ScsiTapeDrive::open(
            path,
            self.loaded[index].clone(),
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_and_structures_match_linux() {
        // From <linux/mtio.h> on x86_64 / aarch64 (LP64).
        assert_eq!(std::mem::size_of::<MtOp>(), 8);
        assert_eq!(std::mem::size_of::<MtGet>(), 48);
        assert_eq!(MTIOCTOP, 0x4008_6d01);
        assert_eq!(MTIOCGET, 0x8030_6d02);
        let (fsf, bsf, weof, rew, offl, eom, setblk) = (
            op::MTFSF,
            op::MTBSF,
            op::MTWEOF,
            op::MTREW,
            op::MTOFFL,
            op::MTEOM,
            op::MTSETBLK,
        );
        assert_eq!(
            (fsf, bsf, weof, rew, offl, eom, setblk),
            (1, 2, 5, 6, 7, 12, 20)
        );
        assert_eq!(gstat::EOF, 0x8000_0000);
        assert_eq!(gstat::EOD, 0x0800_0000);
    }

    const STATUS: &str = "  Storage Changer /dev/sg3:2 Drives, 6 Slots ( 2 Import/Export )
Data Transfer Element 0:Full (Storage Element 2 Loaded):VolumeTag = CRN002L9                        
Data Transfer Element 1:Empty
      Storage Element 1:Full :VolumeTag=CRN001L9                        
      Storage Element 2:Empty
      Storage Element 3:Full :VolumeTag=CRN003L9
      Storage Element 4:Full 
      Storage Element 5 IMPORT/EXPORT:Empty
      Storage Element 6 IMPORT/EXPORT:Full :VolumeTag=NEW001L9
";

    #[test]
    fn mtx_status_is_parsed() {
        let st = parse_mtx_status(STATUS).unwrap();
        assert_eq!(st.drives, vec![Some("CRN002L9".to_string()), None]);
        assert_eq!(
            st.storage,
            vec![
                (1, false, Some("CRN001L9".to_string())),
                (2, false, None),
                (3, false, Some("CRN003L9".to_string())),
                (4, false, Some(String::new())),
                (5, true, None),
                (6, true, Some("NEW001L9".to_string())),
            ]
        );
        assert!(parse_mtx_status("").is_err());
        assert!(parse_mtx_status("Data Transfer Element x:Empty").is_err());
        assert!(parse_mtx_status("Data Transfer Element 1:Empty").is_err());
        assert!(parse_mtx_status("Storage Element :Empty").is_err());
    }

    #[test]
    fn every_move_has_its_mtx_command() {
        let (slots, ie) = ([1, 2, 3, 4], [5, 6]);
        let args = |f, t| mtx_move_args(f, t, &slots, &ie);
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            args(Element::Slot(0), Element::Drive(1)).unwrap(),
            v(&["load", "1", "1"])
        );
        assert_eq!(
            args(Element::ImportExport(1), Element::Drive(0)).unwrap(),
            v(&["load", "6", "0"])
        );
        assert_eq!(
            args(Element::Drive(0), Element::Slot(3)).unwrap(),
            v(&["unload", "4", "0"])
        );
        assert_eq!(
            args(Element::Slot(2), Element::ImportExport(0)).unwrap(),
            v(&["transfer", "3", "5"])
        );
        assert!(args(Element::Drive(0), Element::Drive(1)).is_err());
        assert!(args(Element::Slot(9), Element::Drive(0)).is_err());
        assert!(args(Element::Drive(0), Element::ImportExport(2)).is_err());
    }

    #[test]
    fn a_regular_file_is_not_a_tape_device() {
        let dir = std::env::temp_dir().join(format!("cairn-scsi-{}", std::process::id()));
        std::fs::write(&dir, b"x").unwrap();
        let e = ScsiTapeDrive::open(&dir, Arc::new(Mutex::new(None))).unwrap_err();
        let _ = std::fs::remove_file(&dir);
        assert!(matches!(e, TapeError::Device { .. }), "{e}");
        let e = ScsiTapeDrive::open("/nonexistent/nst0", Arc::new(Mutex::new(None))).unwrap_err();
        assert!(matches!(e, TapeError::Io { .. }), "{e}");
    }
}
