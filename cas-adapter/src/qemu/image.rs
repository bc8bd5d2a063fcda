//! `qemu-img` on a qcow2 file: what `qemu-img info` reports ([`ImageInfo`],
//! [`BitmapInfo`]) and the persistent dirty bitmaps of [`Qcow2Image`].

use std::path::{Path, PathBuf};

use cairn_engine::Result;

use super::export::QemuNbdExport;
use super::{run_tool, tool_error};

/// A persistent dirty bitmap of a qcow2 image, as `qemu-img info` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// qemu's flags: `auto` (enabled: it records writes), `in-use` (not
    /// saved cleanly: it may have missed writes and must not be trusted).
    pub flags: Vec<String>,
}

impl BitmapInfo {
    /// Records writes.
    pub fn enabled(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }
    /// Left inconsistent by an unclean exit of the process that had it open.
    pub fn inconsistent(&self) -> bool {
        self.flags.iter().any(|f| f == "in-use")
    }
    /// Why this bitmap cannot be trusted, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if self.inconsistent() {
            Some(format!(
                "bitmap {:?} is inconsistent (flag in-use: the process that had the image open \
                 exited uncleanly), so it may have missed writes",
                self.name
            ))
        } else if !self.enabled() {
            Some(format!(
                "bitmap {:?} is disabled: it stopped recording writes",
                self.name
            ))
        } else {
            None
        }
    }
}

/// What `qemu-img info` says about an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// `qcow2`, `raw`, …
    pub format: String,
    /// The disk's size in bytes.
    pub virtual_size: u64,
    /// Persistent dirty bitmaps, in the image's order.
    pub bitmaps: Vec<BitmapInfo>,
}

impl ImageInfo {
    /// Parses `qemu-img info --output=json`.
    pub fn parse(json: &str) -> std::result::Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
        let format = v
            .get("format")
            .and_then(|f| f.as_str())
            .ok_or("no \"format\"")?
            .to_string();
        let virtual_size = v
            .get("virtual-size")
            .and_then(|s| s.as_u64())
            .ok_or("no \"virtual-size\"")?;
        let mut bitmaps = Vec::new();
        let list = v
            .pointer("/format-specific/data/bitmaps")
            .and_then(|b| b.as_array());
        for b in list.into_iter().flatten() {
            let name = b
                .get("name")
                .and_then(|n| n.as_str())
                .ok_or("bitmap without a name")?;
            let granularity = b
                .get("granularity")
                .and_then(|g| g.as_u64())
                .ok_or("bitmap without a granularity")?;
            let flags = b
                .get("flags")
                .and_then(|f| f.as_array())
                .map(|f| {
                    f.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            bitmaps.push(BitmapInfo {
                name: name.to_string(),
                granularity,
                flags,
            });
        }
        Ok(ImageInfo {
            format,
            virtual_size,
            bitmaps,
        })
    }

    /// The bitmap named `name`, if the image has it.
    pub fn bitmap(&self, name: &str) -> Option<&BitmapInfo> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
}

/// A qcow2 image file driven with `qemu-img`.
#[derive(Clone, Debug)]
pub struct Qcow2Image {
    path: PathBuf,
}

impl Qcow2Image {
    /// The qcow2 file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Qcow2Image { path: path.into() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn arg(&self) -> String {
        self.path.display().to_string()
    }

    /// `qemu-img info`; an error if the file is not a qcow2 image or is
    /// locked by a writer.
    pub fn info(&self) -> Result<ImageInfo> {
        let args = vec![
            "info".into(),
            "--output=json".into(),
            "-f".into(),
            "qcow2".into(),
            self.arg(),
        ];
        let out = run_tool("qemu-img", &args)?;
        ImageInfo::parse(&out).map_err(|e| tool_error("qemu-img", &args, e))
    }

    /// Adds an enabled persistent bitmap.
    pub fn add_bitmap(&self, name: &str, granularity: u64) -> Result<()> {
        run_tool(
            "qemu-img",
            &[
                "bitmap".into(),
                "--add".into(),
                "--granularity".into(),
                granularity.to_string(),
                "-f".into(),
                "qcow2".into(),
                self.arg(),
                name.into(),
            ],
        )
        .map(drop)
    }

    /// Removes a persistent bitmap.
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        run_tool(
            "qemu-img",
            &[
                "bitmap".into(),
                "--remove".into(),
                "-f".into(),
                "qcow2".into(),
                self.arg(),
                name.into(),
            ],
        )
        .map(drop)
    }

    /// Serves the image read-only over a private unix socket, with `bitmap`
    /// as the `qemu:dirty-bitmap:<bitmap>` context, accepting
    /// `connections` clients at once. The qemu-nbd process ends when the
    /// thread that called this ends (so a killed cairn never leaves the
    /// image locked): call it on a thread that outlives the export.
    pub fn export_read_only(
        &self,
        bitmap: Option<&str>,
        connections: usize,
    ) -> Result<QemuNbdExport> {
        let mut args: Vec<String> = vec![
            "--read-only".into(),
            "--persistent".into(),
            format!("--shared={}", connections.max(1)),
        ];
        if let Some(b) = bitmap {
            args.push(format!("--bitmap={b}"));
        }
        QemuNbdExport::start(&self.path, "qcow2", args)
    }
}
