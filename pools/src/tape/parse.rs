//! The hand-written parsers of the tape code, with nothing but `std`, so
//! that the fuzz targets include this file directly (`fuzz/`): the
//! simulator's cartridge records and the output of `mtx status`.

use std::io::Read;

/// A block record's tag in a simulated cartridge file.
pub const BLOCK_TAG: u8 = b'B';
/// A filemark record's tag.
pub const FILEMARK_TAG: u8 = b'F';
/// Bytes of a block record before its data (tag + length).
pub const BLOCK_FRAMING: u64 = 5;

/// The records of a simulated cartridge file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CartridgeScan {
    /// (offset of the record's tag, block length or `None` for a filemark).
    pub records: Vec<(u64, Option<u32>)>,
    /// Where a block cut short begins (a crash mid-write): the recorded
    /// data ends there.
    pub torn_at: Option<u64>,
}

/// Reads the records of a cartridge file of `len` bytes from `reader`
/// (blocks of 1 … `max_block` bytes and filemarks, back to back). An
/// unknown tag or a block length out of range is an error naming its
/// offset; a block running past the end is a torn tail, not an error.
pub fn scan_cartridge<R: Read>(
    reader: R,
    len: u64,
    max_block: usize,
) -> Result<CartridgeScan, String> {
    let mut reader = std::io::BufReader::with_capacity(64 << 10, reader);
    let mut scan = CartridgeScan::default();
    let mut offset = 0u64;
    let mut skip = vec![0u8; 64 << 10];
    while offset < len {
        let mut tag = [0u8; 1];
        reader
            .read_exact(&mut tag)
            .map_err(|e| format!("reading at {offset}: {e}"))?;
        match tag[0] {
            FILEMARK_TAG => {
                scan.records.push((offset, None));
                offset += 1;
            }
            BLOCK_TAG => {
                if offset + BLOCK_FRAMING > len {
                    scan.torn_at = Some(offset);
                    break;
                }
                let mut l = [0u8; 4];
                reader
                    .read_exact(&mut l)
                    .map_err(|e| format!("reading at {offset}: {e}"))?;
                let l = u32::from_le_bytes(l);
                if l == 0 || l as usize > max_block {
                    return Err(format!("a {l}-byte block at {offset} is not a valid block"));
                }
                let end = offset + BLOCK_FRAMING + l as u64;
                if end > len {
                    scan.torn_at = Some(offset);
                    break;
                }
                let mut left = l as usize;
                while left > 0 {
                    let n = left.min(skip.len());
                    reader
                        .read_exact(&mut skip[..n])
                        .map_err(|e| format!("reading at {offset}: {e}"))?;
                    left -= n;
                }
                scan.records.push((offset, Some(l)));
                offset = end;
            }
            t => return Err(format!("unknown record tag {t:#04x} at {offset}")),
        }
    }
    Ok(scan)
}

/// What `mtx status` reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MtxStatus {
    /// Drives (data transfer elements, numbered from 0): barcode if full.
    pub drives: Vec<Option<String>>,
    /// Storage elements, as `mtx` numbers them (from 1): (number, is an
    /// import/export slot, barcode if full).
    pub storage: Vec<(u32, bool, Option<String>)>,
}

fn volume_tag(rest: &str) -> Option<String> {
    let tag = rest.split_once("VolumeTag")?.1;
    let tag = tag.trim_start_matches([' ', '=']).trim();
    (!tag.is_empty()).then(|| tag.to_string())
}

/// Parses the output of `mtx -f DEV status`.
pub fn parse_mtx_status(text: &str) -> Result<MtxStatus, String> {
    let mut st = MtxStatus::default();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Data Transfer Element ") {
            let (num, state) = rest
                .split_once(':')
                .ok_or_else(|| format!("bad drive line {line:?}"))?;
            let n: usize = num
                .trim()
                .parse()
                .map_err(|_| format!("bad drive number in {line:?}"))?;
            if n != st.drives.len() {
                return Err(format!("drive {n} out of order in {line:?}"));
            }
            st.drives.push(if state.starts_with("Full") {
                Some(volume_tag(state).unwrap_or_default())
            } else {
                None
            });
        } else if let Some(rest) = line.strip_prefix("Storage Element ") {
            let (head, state) = rest
                .split_once(':')
                .ok_or_else(|| format!("bad slot line {line:?}"))?;
            let mut words = head.split_whitespace();
            let n: u32 = words
                .next()
                .and_then(|w| w.parse().ok())
                .ok_or_else(|| format!("bad slot number in {line:?}"))?;
            let ie = words.any(|w| w == "IMPORT/EXPORT");
            let full = state.trim_start().starts_with("Full");
            st.storage
                .push((n, ie, full.then(|| volume_tag(state).unwrap_or_default())));
        }
    }
    if st.drives.is_empty() && st.storage.is_empty() {
        return Err("no drives or slots in the mtx status output".into());
    }
    Ok(st)
}
