//! Local qemu tooling for qcow2 disks: what a CVK host (or any KVM host)
//! runs to back up and restore a qcow2 file.
//!
//! - [`Qcow2Image`]: `qemu-img info` (size, persistent dirty bitmaps and their
//!   flags) and bitmap management (`qemu-img bitmap --add/--remove`).
//! - [`QemuNbdExport`]: a `qemu-nbd` process serving an image on a private
//!   unix socket (read-only with a dirty bitmap for backups, writable for
//!   restores), stopped with SIGTERM and waited for, so the image lock is
//!   released before anything else touches the file.
//! - [`backup_qcow2`]: one CBT backup of a qcow2 file with the bitmap
//!   lifecycle of libvirt checkpoints (below).
//! - [`Qcow2Target`]: a restore target writing a thin qcow2 through qemu-nbd.
//!
//! ## Bitmap lifecycle
//! A chain is named by the caller (`--bitmap NAME`); every bitmap Cairn
//! creates for it is `NAME.<8 hex digits of the pool id><8 random hex
//! digits>`, unique per backup, so a bitmap is identified by its name alone
//! and two pools (or two chains) backing up one image never consume or
//! remove each other's bitmaps. One run:
//! 1. read the image's bitmaps (`qemu-img info`); the previous snapshot of
//!    the disk names the bitmap it started (`cbt.next-bitmap`);
//! 2. add the next bitmap, enabled (it records every write from now on);
//! 3. export the image read-only with the previous bitmap, read its dirty
//!    extents and let [`cairn_engine::cbt::decide`] judge them: a missing,
//!    disabled or inconsistent (`in-use`, left by an unclean qemu exit)
//!    bitmap, one from another chain, or a resized disk is not trusted and
//!    the job's policy applies (full read against the parent, or skip);
//! 4. back up, stop the export;
//! 5. on success remove the consumed bitmap and any other bitmap of this
//!    chain and pool (left by a run that was killed); on failure or skip
//!    remove the new one, so the previous bitmap keeps recording and the
//!    next run retries from it. (Jobs on the inventory platform keep the
//!    new one instead and the next run adopts it rather than adding
//!    another: the image is then not written between the two runs, so an
//!    interrupted full read resumes.)
//!
//! Between steps 2 and 4 the image is either unlocked for a moment or held
//! read-only by the export; a write in that moment lands in both bitmaps and
//! is read again next time (a superset, never a loss).
//!
//! The image must not be open read-write by a running VM: qemu's image lock
//! makes `qemu-img` fail, and the error says so. A running VM's disk is
//! backed up through its own NBD export (libvirt pull mode) instead.

pub(crate) mod backup;
mod export;
mod image;
mod target;

use std::process::{Command, Stdio};

use cairn_engine::{Error, Result};

pub use backup::{backup_qcow2, backup_qcow2_vm, Qcow2BackupOptions, Qcow2Disk, Qcow2Outcome};
pub use export::QemuNbdExport;
pub use image::{BitmapInfo, ImageInfo, Qcow2Image};
pub use target::Qcow2Target;

pub(crate) fn tool_error(tool: &str, args: &[String], detail: impl std::fmt::Display) -> Error {
    Error::External {
        program: tool.to_string(),
        detail: format!("{}: {detail}", args.join(" ")),
    }
}

/// Runs a qemu tool to completion; a failure carries its stderr.
pub(crate) fn run_tool(tool: &str, args: &[String]) -> Result<String> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("running {tool} (install qemu-utils to get it)"), e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let detail = stderr.trim();
        let hint = if detail.contains("lock") {
            " (the image is open in another process, e.g. a running VM; back it up through \
             its NBD export with --nbd instead)"
        } else {
            ""
        };
        return Err(tool_error(
            tool,
            args,
            format!("exited with {}: {detail}{hint}", out.status),
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| tool_error(tool, args, e))
}

#[cfg(test)]
mod tests {
    use super::backup::{new_bitmap_name, validate_chain};
    use super::*;

    #[test]
    fn parses_qemu_img_info() {
        let json = r#"{
            "virtual-size": 67108864, "filename": "d.qcow2", "format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
              "bitmaps": [
                {"flags": ["auto"], "name": "c.00", "granularity": 65536},
                {"flags": ["in-use", "auto"], "name": "c.01", "granularity": 65536},
                {"flags": [], "name": "off", "granularity": 131072}
              ]}}}"#;
        let info = ImageInfo::parse(json).unwrap();
        assert_eq!(info.virtual_size, 64 << 20);
        assert_eq!(info.bitmaps.len(), 3);
        assert!(info.bitmap("c.00").unwrap().problem().is_none());
        assert!(info
            .bitmap("c.01")
            .unwrap()
            .problem()
            .unwrap()
            .contains("inconsistent"));
        assert!(info
            .bitmap("off")
            .unwrap()
            .problem()
            .unwrap()
            .contains("disabled"));
        let plain = r#"{"virtual-size": 1, "format": "raw"}"#;
        assert!(ImageInfo::parse(plain).unwrap().bitmaps.is_empty());
        assert!(ImageInfo::parse("{").is_err());
        assert!(ImageInfo::parse(r#"{"format": "qcow2"}"#).is_err());
    }

    #[test]
    fn chain_names() {
        assert!(validate_chain("cairn-daily_1").is_ok());
        for bad in ["", "a.b", "a b", &"x".repeat(65)] {
            assert!(validate_chain(bad).is_err(), "{bad}");
        }
        let n = new_bitmap_name("c", "0123456789abcdef0123456789abcdef").unwrap();
        assert!(n.starts_with("c.01234567") && n.len() == 18, "{n}");
        assert_ne!(n, new_bitmap_name("c", "0123456789abcdef").unwrap());
    }
}
