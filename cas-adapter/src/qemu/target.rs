//! [`Qcow2Target`]: a restore target writing a thin qcow2 file through a
//! writable qemu-nbd export.

use std::path::{Path, PathBuf};

use cairn_engine::{partial_path, publish_file, DiskTarget, Error, NbdTarget, Result};

use super::export::QemuNbdExport;
use super::run_tool;

/// A restore target writing a thin qcow2 file: `qemu-img create` under a
/// temporary name, written through a writable qemu-nbd export (zero extents
/// are never written and stay unallocated), then flushed, closed, synced and
/// renamed into place by [`DiskTarget::finish`].
#[derive(Debug)]
pub struct Qcow2Target {
    inner: Option<Box<NbdTarget>>,
    export: Option<QemuNbdExport>,
    tmp: PathBuf,
    path: PathBuf,
    overwrite: bool,
    done: bool,
}

impl Qcow2Target {
    /// Creates `path` (a qcow2 of `size` bytes). Refuses to replace an
    /// existing file unless `overwrite`. Its qemu-nbd ends with the thread
    /// that called this: create it on a thread that outlives the target.
    pub fn create(path: &Path, size: u64, overwrite: bool) -> Result<Self> {
        if size % 512 != 0 {
            return Err(Error::InvalidArgument(format!(
                "{}: a qcow2 image's size is a multiple of 512 bytes, this disk is {size}; \
                 restore it as raw",
                path.display()
            )));
        }
        let tmp = partial_path(path, overwrite)?;
        run_tool(
            "qemu-img",
            &[
                "create".into(),
                "-q".into(),
                "-f".into(),
                "qcow2".into(),
                tmp.display().to_string(),
                size.to_string(),
            ],
        )?;
        let mut target = Qcow2Target {
            inner: None,
            export: None,
            tmp,
            path: path.to_path_buf(),
            overwrite,
            done: false,
        };
        let export = QemuNbdExport::start(
            &target.tmp,
            "qcow2",
            vec![
                "--persistent".into(),
                "--cache=writeback".into(),
                "--shared=1".into(),
            ],
        )?;
        let inner = NbdTarget::connect(&export.uri(), size)?;
        target.export = Some(export);
        target.inner = Some(Box::new(inner));
        Ok(target)
    }
}

impl DiskTarget for Qcow2Target {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        match &self.inner {
            Some(t) => t.write_at(offset, data),
            None => Err(Error::Internal("qcow2 target already finished".into())),
        }
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if let Some(inner) = self.inner.take() {
            inner.finish()?;
        }
        if let Some(export) = self.export.take() {
            export.stop()?;
        }
        let file = std::fs::File::open(&self.tmp)
            .map_err(|e| Error::io(format!("opening {}", self.tmp.display()), e))?;
        publish_file(&file, &self.tmp, &self.path, self.overwrite)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Qcow2Target {
    fn drop(&mut self) {
        self.inner = None;
        self.export = None;
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
