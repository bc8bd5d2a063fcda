//! The snapshot catalog: small immutable objects (`catalog/<random>`) that
//! summarise manifests — everything but their extent lists — so listing
//! snapshots and finding a disk's newest one read a few objects instead of
//! every manifest. Merged on read like index segments; always rebuildable
//! from the manifests, and only trusted for manifests the pool still lists.
//!
//! ```text
//! header   16 B  magic "CAIRNCT1" | version u16 = 1 | reserved u16 = 0 | reserved u32 = 0
//! count    u32
//! entries        count × (snapshot id [32] | summary length u32 | summary)
//!                strictly ascending by snapshot id
//! checksum 32 B  BLAKE3-256 of everything above
//! ```
//!
//! A *summary* is the snapshot's manifest with each disk's extent list
//! replaced by one zero run of the disk's size (none for an empty disk): a
//! valid manifest encoding in itself, decoded with the manifest decoder.

use crate::id::SnapshotId;
use crate::store::format::{CATALOG_MAGIC_V1, CATALOG_VERSION_V1};
use crate::store::manifest::Snapshot;
use crate::store::wire::{split_checksummed, DecodeError, Decoder, Encoder};

/// One catalog entry: a snapshot id and its summary.
pub type CatalogEntry = (SnapshotId, Snapshot);

/// `s` without its extent lists (each disk one zero run of its size).
pub fn summary_of(s: &Snapshot) -> Snapshot {
    let mut out = s.clone();
    for d in &mut out.disks {
        d.extents.clear();
        d.pages.clear();
        let size = d.size;
        d.size = 0;
        d.push(size, None);
    }
    out
}

/// Encodes entries (sorted by id, duplicates dropped).
pub fn encode(entries: &[CatalogEntry]) -> Vec<u8> {
    let mut sorted: Vec<&CatalogEntry> = entries.iter().collect();
    sorted.sort_by_key(|e| e.0);
    sorted.dedup_by(|a, b| a.0 == b.0);
    let mut out = Vec::new();
    out.extend_from_slice(&CATALOG_MAGIC_V1);
    out.put_u16(CATALOG_VERSION_V1);
    out.put_u16(0);
    out.put_u32(0);
    out.put_u32(sorted.len() as u32);
    for (id, s) in sorted {
        let summary = summary_of(s).encode();
        out.extend_from_slice(id.as_bytes());
        out.put_u32(summary.len() as u32);
        out.extend_from_slice(&summary);
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Decodes a catalog object; the summaries come back with empty extent
/// lists (disk sizes set). Refuses unsorted or repeated ids, summaries
/// that are not summaries, and trailing bytes.
pub fn decode(data: &[u8]) -> Result<Vec<CatalogEntry>, DecodeError> {
    let body = split_checksummed(data)?;
    let mut d = Decoder::new(body);
    d.magic_version(&CATALOG_MAGIC_V1, CATALOG_VERSION_V1)?;
    d.zero_u16("reserved catalog u16")?;
    d.zero_u32("reserved catalog u32")?;
    let count = d.u32()? as usize;
    // Each entry takes at least 36 bytes: bound allocations by the input.
    if count > d.remaining() / 36 {
        return Err(DecodeError::Invalid(format!("{count} entries cannot fit")));
    }
    let mut out: Vec<CatalogEntry> = Vec::with_capacity(count);
    for i in 0..count {
        let id = SnapshotId(d.array()?);
        if out.last().is_some_and(|(prev, _)| *prev >= id) {
            return Err(DecodeError::Invalid(format!(
                "entry {i}: ids are not strictly ascending"
            )));
        }
        let len = d.u32()? as usize;
        let bytes = d.bytes(len)?;
        let full = Snapshot::decode(bytes).map_err(|e| match e {
            DecodeError::Invalid(why) => {
                DecodeError::Invalid(format!("entry {i} (snapshot {id}): {why}"))
            }
            other => other,
        })?;
        if summary_of(&full).encode() != bytes {
            return Err(DecodeError::Invalid(format!(
                "entry {i}: not the summary of a manifest"
            )));
        }
        let mut s = full;
        for disk in &mut s.disks {
            disk.extents.clear();
        }
        out.push((id, s));
    }
    d.expect_end()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::id::ChunkId;
    use crate::store::manifest::DiskManifest;
    use std::time::{Duration, UNIX_EPOCH};

    fn snap(vm: &str, secs: u64) -> Snapshot {
        let mut disk = DiskManifest::new("vda");
        disk.push(65536, Some(ChunkId::of(b"x")));
        disk.push(1000, None);
        Snapshot {
            time: UNIX_EPOCH + Duration::from_secs(secs),
            vm: vm.into(),
            mode: crate::store::manifest::SnapshotMode::Full,
            parent: None,
            id_scheme: crate::id::IdScheme::Blake3,
            chunking: crate::chunker::ChunkingParams::default(),
            compression: crate::store::blob::Compression::None,
            properties: Default::default(),
            disks: vec![disk],
        }
    }

    /// A catalog (valid checksum) of `count` entries followed by `pad`
    /// zero bytes.
    fn with_count(count: u32, pad: usize) -> Vec<u8> {
        let mut b = CATALOG_MAGIC_V1.to_vec();
        b.extend_from_slice(&CATALOG_VERSION_V1.to_le_bytes());
        b.extend_from_slice(&[0; 6]);
        b.extend_from_slice(&count.to_le_bytes());
        b.extend(std::iter::repeat_n(0u8, pad));
        let sum = *blake3::hash(&b).as_bytes();
        b.extend_from_slice(&sum);
        b
    }

    /// An entry takes at least 36 bytes: a count the input cannot hold is
    /// refused before anything is allocated for it (u32::MAX entries would
    /// ask for hundreds of GiB), and a count it can hold is read on.
    #[test]
    fn an_entry_count_beyond_the_input_is_refused_first() {
        assert!(decode(&encode(&[])).unwrap().is_empty());
        for count in [u32::MAX, 3] {
            let e = decode(&with_count(count, 100)).unwrap_err();
            assert!(e.to_string().contains("cannot fit"), "{count}: {e}");
        }
        // 100 bytes hold 2 entries of 36: read on (and found wanting).
        let e = decode(&with_count(2, 100)).unwrap_err();
        assert!(!e.to_string().contains("cannot fit"), "{e}");
    }

    #[test]
    fn round_trip_drops_extents_and_keeps_the_rest() {
        let a = snap("web", 100);
        let b = snap("db", 200);
        let (ia, ib) = (
            SnapshotId::of_manifest(&a.encode()),
            SnapshotId::of_manifest(&b.encode()),
        );
        let bytes = encode(&[(ib, b.clone()), (ia, a.clone()), (ia, a.clone())]);
        let got = decode(&bytes).unwrap();
        assert_eq!(got.len(), 2);
        let mut want = vec![(ia, a), (ib, b)];
        want.sort_by_key(|e| e.0);
        for ((gid, gs), (wid, ws)) in got.iter().zip(&want) {
            assert_eq!(gid, wid);
            assert_eq!((gs.vm.as_str(), gs.time), (ws.vm.as_str(), ws.time));
            assert_eq!(gs.disks[0].size, 65536 + 1000);
            assert!(gs.disks[0].extents.is_empty());
        }
        // One encoding: decoding and encoding again gives the same bytes.
        assert_eq!(encode(&got), bytes);
    }

    #[test]
    fn damage_is_refused() {
        let a = snap("web", 100);
        let ia = SnapshotId::of_manifest(&a.encode());
        let bytes = encode(&[(ia, a)]);
        for at in [0, 10, 12, 20, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[at] ^= 1;
            assert!(decode(&b).is_err(), "byte {at}");
        }
        assert!(decode(&bytes[..bytes.len() - 5]).is_err());
    }
}
