//! The job options about sources and limits as `cairn backup` /
//! `cairn restore` flags, with the meaning (and range) they have in a job
//! file: `--parallel-disks` (limits.disks_per_vm, 1–5), `--read-buffer` /
//! `--write-buffer` (source.buffer, 64 KiB–8 MiB), `--reconnect-window`
//! (retries.reconnect_window, 1–60 min), `--min-free-percent` /
//! `--min-free` (the capacity check, on the file systems holding the image
//! files; off by default on the command line) and `--log-level`
//! (source.log_level: info, warn — no progress bar —, error — no warnings
//! either).

use std::path::PathBuf;
use std::time::Duration;

use crate::Failure;

/// Log detail of a command (a job's `source.log_level`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum LogLevel {
    /// Progress and warnings.
    #[default]
    Info,
    /// Warnings, no progress bar.
    Warn,
    /// Errors only.
    Error,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SourceArgs {
    /// Disks read (or written, in a restore) at the same time, 1–5.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub parallel_disks: usize,
    /// Largest read request per disk, 64KiB–8MiB: NBD requests (--nbd,
    /// --qcow2), or reads of image files (at least two chunks).
    #[arg(long, value_name = "SIZE")]
    read_buffer: Option<String>,
    /// With --nbd or --qcow2: re-establish a dropped connection and retry
    /// the read for up to this long (1–60 min); by default a failed read
    /// fails the backup.
    #[arg(long, value_name = "DURATION")]
    reconnect_window: Option<String>,
    /// Do nothing (exit 4) when the file system of an image file has less
    /// than this share free (1–99 %; block devices are not checked).
    #[arg(long, value_name = "PERCENT")]
    min_free_percent: Option<u8>,
    /// Do nothing (exit 4) when the file system of an image file has less
    /// than this much free (a size like 500GiB).
    #[arg(long, value_name = "SIZE")]
    min_free: Option<String>,
    /// info (default), warn (no progress bar) or error (no warnings either).
    #[arg(long, value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
}

/// `cairn restore`'s own: the write buffer.
#[derive(clap::Args, Debug, Clone)]
pub struct WriteArgs {
    /// Largest write request to a restored disk, 64KiB–8MiB.
    #[arg(long, value_name = "SIZE")]
    write_buffer: Option<String>,
    /// Disks written at the same time, 1–5.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub parallel_disks: usize,
}

fn buffer(option: &str, value: &str) -> Result<usize, Failure> {
    let n = cairn_engine::parse_size(value)
        .map_err(|e| Failure::usage(format!("{option} {value:?}: {e} (64KiB–8MiB)")))?;
    if !(64 << 10..=8 << 20).contains(&n) {
        return Err(Failure::usage(format!(
            "{option} {value} is out of range (64KiB–8MiB)"
        )));
    }
    Ok(n as usize)
}

fn parallel(n: usize) -> Result<usize, Failure> {
    if (1..=5).contains(&n) {
        Ok(n)
    } else {
        Err(Failure::usage(format!(
            "--parallel-disks {n} is out of range (1–5)"
        )))
    }
}

impl SourceArgs {
    /// Disks at once, checked.
    pub fn parallel_disks(&self) -> Result<usize, Failure> {
        parallel(self.parallel_disks)
    }

    /// The read buffer in bytes, checked.
    pub fn read_buffer(&self) -> Result<Option<usize>, Failure> {
        self.read_buffer
            .as_deref()
            .map(|v| buffer("--read-buffer", v))
            .transpose()
    }

    /// The reconnect window, checked (`None`: no reconnect).
    pub fn reconnect_window(&self) -> Result<Option<Duration>, Failure> {
        let Some(v) = self.reconnect_window.as_deref() else {
            return Ok(None);
        };
        let d = humantime::parse_duration(v).map_err(|e| {
            Failure::usage(format!(
                "--reconnect-window {v:?} is not a duration like 10m: {e}"
            ))
        })?;
        if d < Duration::from_secs(60) || d > Duration::from_secs(3600) {
            return Err(Failure::usage(format!(
                "--reconnect-window {v} is out of range (1–60 min)"
            )));
        }
        Ok(Some(d))
    }

    /// Checks every value (before anything is opened).
    pub fn check(&self) -> Result<(), Failure> {
        self.parallel_disks()?;
        self.read_buffer()?;
        self.reconnect_window()?;
        self.capacity_rule()?;
        Ok(())
    }

    fn capacity_rule(&self) -> Result<Option<cairn_engine::jobs::CapacityRule>, Failure> {
        if let Some(p) = self.min_free_percent {
            if !(1..=99).contains(&p) {
                return Err(Failure::usage(format!(
                    "--min-free-percent {p} is out of range (1–99)"
                )));
            }
        }
        let bytes = self
            .min_free
            .as_deref()
            .map(|v| {
                cairn_engine::parse_size(v).map_err(|e| {
                    Failure::usage(format!("--min-free {v:?}: {e} (a size like 500GiB)"))
                })
            })
            .transpose()?;
        if self.min_free_percent.is_none() && bytes.is_none() {
            return Ok(None);
        }
        Ok(Some(cairn_engine::jobs::CapacityRule::new(
            self.min_free_percent,
            bytes,
        )?))
    }

    /// The capacity check on the file systems holding `files`: why not to
    /// back up, or `None`.
    pub fn capacity_shortfall(&self, files: &[PathBuf]) -> Result<Option<String>, Failure> {
        let Some(rule) = self.capacity_rule()? else {
            return Ok(None);
        };
        for f in files {
            // Block devices have no file system of theirs to check.
            if !std::fs::metadata(f).is_ok_and(|m| m.is_file()) {
                continue;
            }
            let dir = f
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let store = statvfs(dir)?;
            if let Some(why) = rule.shortfall(&store) {
                return Ok(Some(why));
            }
        }
        Ok(None)
    }
}

impl WriteArgs {
    /// The write buffer in bytes, checked.
    pub fn write_buffer(&self) -> Result<Option<usize>, Failure> {
        self.write_buffer
            .as_deref()
            .map(|v| buffer("--write-buffer", v))
            .transpose()
    }

    /// Disks at once, checked.
    pub fn parallel_disks(&self) -> Result<usize, Failure> {
        parallel(self.parallel_disks)
    }
}

/// The space of the file system holding `dir`, as a datastore.
fn statvfs(dir: &std::path::Path) -> Result<cairn_engine::Datastore, Failure> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Failure::usage(format!("{} has a NUL byte", dir.display())))?;
    // SAFETY: statvfs fills the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Failure::new(format!(
            "free space of {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        )));
    }
    let frsize = st.f_frsize as u64;
    Ok(cairn_engine::Datastore {
        host: "localhost".into(),
        name: dir.display().to_string(),
        capacity: st.f_blocks as u64 * frsize,
        free: st.f_bavail as u64 * frsize,
    })
}
