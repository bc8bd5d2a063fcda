//! Disks in memory: [`MemorySource`] (a backup source over bytes you hold)
//! and [`MemoryTarget`] (a restore target whose bytes you read back). For
//! tests, examples and embedders that produce or consume disk images
//! themselves.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::source::{DiskSource, DiskTarget};

/// A disk image held in memory. Runs of zeros are reported as holes (at
/// 4 KiB granularity), as a sparse file's would be.
///
/// ```
/// use cairn_engine::{DiskSource, MemorySource};
/// let src = MemorySource::new("demo", vec![7u8; 8192]);
/// let mut buf = [0u8; 4];
/// src.read_at(100, &mut buf).unwrap();
/// assert_eq!(buf, [7; 4]);
/// ```
#[derive(Clone, Debug)]
pub struct MemorySource {
    name: String,
    data: Bytes,
    identity: Option<String>,
}

impl MemorySource {
    /// A disk named `name` (for messages) holding `data`.
    pub fn new(name: impl Into<String>, data: impl Into<Bytes>) -> Self {
        MemorySource {
            name: name.into(),
            data: data.into(),
            identity: None,
        }
    }

    /// Gives the source an identity (see [`DiskSource::identity`]): the
    /// caller promises its content is the same whenever the identity is.
    pub fn with_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self
    }

    /// The disk's bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.data
    }
}

/// Granularity at which [`MemorySource`] reports holes.
const HOLE_GRANULARITY: usize = 4096;

impl DiskSource for MemorySource {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn identity(&self) -> Option<String> {
        self.identity.clone()
    }

    fn data_extents(&self) -> Result<Vec<Range<u64>>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (i, block) in self.data.chunks(HOLE_GRANULARITY).enumerate() {
            if block.iter().all(|&b| b == 0) {
                continue;
            }
            let start = (i * HOLE_GRANULARITY) as u64;
            let end = start + block.len() as u64;
            match out.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => out.push(start..end),
            }
        }
        Ok(out)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buf.len())?))
            .filter(|r| r.end <= self.data.len());
        match range.and_then(|r| self.data.get(r)) {
            Some(bytes) => {
                buf.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(Error::io(
                format!(
                    "reading {} bytes at offset {offset} of {} ({} bytes)",
                    buf.len(),
                    self.name,
                    self.data.len()
                ),
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            )),
        }
    }

    fn describe(&self) -> String {
        format!("memory:{}", self.name)
    }
}

/// A restore target in memory. Clones share the bytes: keep one clone,
/// hand another to the restore, and read the disk with
/// [`MemoryTarget::finished`] once the restore returned.
#[derive(Clone, Debug)]
pub struct MemoryTarget {
    inner: Arc<Mutex<TargetState>>,
}

#[derive(Debug)]
struct TargetState {
    data: Vec<u8>,
    finished: bool,
}

impl MemoryTarget {
    /// A target of `size` bytes, all zeros.
    pub fn new(size: u64) -> Result<Self> {
        let size = usize::try_from(size)
            .map_err(|_| Error::InvalidArgument(format!("{size} bytes do not fit in memory")))?;
        Ok(MemoryTarget {
            inner: Arc::new(Mutex::new(TargetState {
                data: vec![0; size],
                finished: false,
            })),
        })
    }

    /// The restored bytes, once [`DiskTarget::finish`] was called (a
    /// restore that failed never finishes its targets).
    pub fn finished(&self) -> Option<Vec<u8>> {
        let state = self.inner.lock();
        state.finished.then(|| state.data.clone())
    }
}

impl DiskTarget for MemoryTarget {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut state = self.inner.lock();
        let len = state.data.len();
        let slot = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(data.len())?))
            .and_then(|r| state.data.get_mut(r));
        match slot {
            Some(slot) => {
                slot.copy_from_slice(data);
                Ok(())
            }
            None => Err(Error::io(
                format!(
                    "writing {} bytes at offset {offset} of a {len}-byte memory target",
                    data.len()
                ),
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            )),
        }
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.inner.lock().finished = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_reads_and_bounds() {
        let mut data = vec![0u8; 5 * HOLE_GRANULARITY + 10];
        data[HOLE_GRANULARITY + 1] = 1;
        data[5 * HOLE_GRANULARITY + 9] = 2;
        let src = MemorySource::new("m", data);
        assert_eq!(src.data_extents().unwrap(), vec![4096..8192, 20480..20490]);
        let mut b = [0u8; 2];
        src.read_at(4096, &mut b).unwrap();
        assert_eq!(b, [0, 1]);
        assert!(src.read_at(20489, &mut b).is_err());
        assert!(src.read_at(u64::MAX, &mut b).is_err());
    }

    #[test]
    fn target_shows_bytes_only_when_finished() {
        let t = MemoryTarget::new(8).unwrap();
        let keep = t.clone();
        t.write_at(2, &[5, 6]).unwrap();
        assert!(t.write_at(7, &[1, 2]).is_err());
        assert_eq!(keep.finished(), None);
        Box::new(t).finish().unwrap();
        assert_eq!(keep.finished(), Some(vec![0, 0, 5, 6, 0, 0, 0, 0]));
    }
}
