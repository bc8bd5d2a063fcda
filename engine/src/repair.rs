//! Pack repair: [`Repository::repair_packs`] moves damaged packs aside into
//! quarantine (copied, never deleted before the copy is durable) after
//! salvaging every intact blob into new packs, then rebuilds the index.
//!
//! Order, so a kill at any point never reduces what restores: (1) salvaged
//! blobs sealed in new packs, (2) the damaged pack copied whole to
//! `quarantine/<pack id>`, (3) the damaged pack deleted, (4) the index
//! rebuilt from the packs. Before (3) the damaged pack is still in place;
//! after (1) its intact blobs exist twice (readers take the new packs in
//! from their tables even before the rebuild).

use std::collections::{BTreeMap, BTreeSet};

use crate::error::Result;
use crate::id::{ChunkId, PackId, SnapshotId};
use crate::kind::FileKind;
use crate::pipeline::verify::{DamageKind, VerifyOptions};
use crate::repo::Repository;
use crate::store::blob::{BlobCodec, BlobHeader, Compression};
use crate::store::format::{BLOB_HEADER_LEN, PACK_HEADER_LEN};
use crate::store::pack::{parse_pack, PackWriter};

/// What [`Repository::repair_packs`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct PackRepairReport {
    /// Nothing was changed on purpose.
    pub dry_run: bool,
    /// Damaged packs, with what is wrong.
    pub damaged_packs: BTreeMap<PackId, String>,
    /// Packs moved into quarantine.
    pub quarantined: Vec<PackId>,
    /// Intact blobs copied out of damaged packs.
    pub blobs_salvaged: usize,
    /// New packs holding them.
    pub packs_written: usize,
    /// Snapshots that still cannot be fully restored afterwards (their
    /// missing chunks are named by `cairn verify`); a later backup that
    /// stores the same chunks again heals them.
    pub damaged_snapshots: BTreeSet<SnapshotId>,
}

/// The intact blobs of a pack's bytes: (id, plaintext length, blob range).
/// With a readable table, blobs are taken at its offsets and must hash to
/// its ids; without one, at the locations the index knows (`known`: id,
/// offset, stored length), hash-checked; only when the index knows none,
/// the pack is scanned blob header by blob header (re-synchronising byte by
/// byte after damage), each blob named by the hash of what it decodes to.
fn salvage(
    bytes: &[u8],
    known: &[(ChunkId, u64, u32)],
) -> Vec<(ChunkId, u32, std::ops::Range<usize>)> {
    let mut codec = BlobCodec::new(Compression::None);
    let mut plain = Vec::new();
    let mut out = Vec::new();
    let located: Vec<(ChunkId, u64, u32)> = match parse_pack(bytes) {
        Ok(entries) => entries.iter().map(|e| (e.id, e.offset, e.length)).collect(),
        Err(_) => known.to_vec(),
    };
    if !located.is_empty() {
        for (id, offset, length) in located {
            let range = offset as usize..(offset + length as u64) as usize;
            let Some(blob) = bytes.get(range.clone()) else {
                continue;
            };
            if codec.decode_verified(blob, &id, &mut plain).is_ok() {
                out.push((id, plain.len() as u32, range));
            }
        }
        return out;
    }
    let mut pos = PACK_HEADER_LEN;
    while pos + BLOB_HEADER_LEN <= bytes.len() {
        let blob = BlobHeader::decode(&bytes[pos..])
            .ok()
            .map(|h| pos..pos + BLOB_HEADER_LEN + h.body_len as usize)
            .filter(|r| r.end <= bytes.len())
            .filter(|r| codec.decode_into(&bytes[r.clone()], &mut plain).is_ok());
        match blob {
            Some(range) => {
                out.push((ChunkId::of(&plain), plain.len() as u32, range.clone()));
                pos = range.end;
            }
            None => pos += 1,
        }
    }
    out
}

impl Repository {
    /// What the index knows of `pack`: (chunk, offset, stored length).
    fn index_entries_of(&self, pack: &PackId) -> Result<Vec<(ChunkId, u64, u32)>> {
        let (segments, _) = self.index()?.segments();
        let mut out = Vec::new();
        for seg in segments {
            if !seg.packs().contains(pack) {
                continue;
            }
            out.extend(
                seg.iter()
                    .filter(|(_, l)| l.pack == *pack)
                    .map(|(id, l)| (id, l.offset, l.length)),
            );
        }
        out.sort_by_key(|e| e.1);
        out.dedup();
        Ok(out)
    }

    /// Finds packs with damage (`verify --read-data`), salvages their
    /// intact blobs into new packs, moves them into quarantine and
    /// rebuilds the index. Crash-safe (see the module doc).
    pub fn repair_packs(&self, dry_run: bool) -> Result<PackRepairReport> {
        // A collection running now could make the damaged pack the owner of
        // shared chunks and delete the salvage packs: refuse beside one,
        // and hold a lease so one that starts meanwhile waits for us.
        if !dry_run && !self.pool().list(FileKind::Sweep)?.is_empty() {
            return Err(crate::Error::PoolBusy(
                "a garbage collection is running; repair after it".into(),
            ));
        }
        let _lease = if dry_run {
            None
        } else {
            Some(crate::lease::WriterLease::acquire(
                self.pool(),
                crate::lease::LEASE_RENEW_INTERVAL,
            )?)
        };
        let verify = self.verify(&VerifyOptions::default().with_read_data(true))?;
        let mut report = PackRepairReport {
            dry_run,
            ..PackRepairReport::default()
        };
        for d in &verify.damage {
            if let (DamageKind::PackUnreadable | DamageKind::ChunkCorrupt, Some(p)) =
                (d.kind, d.pack)
            {
                report
                    .damaged_packs
                    .entry(p)
                    .or_insert_with(|| d.detail.clone());
            }
        }
        if dry_run {
            report.damaged_snapshots = verify.affected_snapshots();
            return Ok(report);
        }
        // A repair killed after it moved a pack aside left an index that
        // names the pack: finish its job (rebuild, mark) even when no pack
        // is damaged any more.
        if report.damaged_packs.is_empty() {
            // Only packs confirmed gone by name (a listing cut short would
            // show the same symptom and must not shrink the index).
            let mut gone = false;
            for p in verify
                .damage
                .iter()
                .filter(|d| d.kind == DamageKind::PackMissing)
                .filter_map(|d| d.pack)
                .collect::<BTreeSet<_>>()
            {
                match self.pool().size(FileKind::Pack, &p.to_hex()) {
                    Ok(_) => {
                        return Err(crate::Error::ListingIncomplete {
                            kind: FileKind::Pack,
                            name: p.to_hex(),
                        })
                    }
                    Err(e) if e.is_not_found() => gone = true,
                    Err(e) => return Err(e),
                }
            }
            report.damaged_snapshots = if gone {
                self.repair_index()?;
                // Judged on the rebuilt index: chunks salvaged into new
                // packs before the kill no longer count as missing.
                self.verify(&VerifyOptions::default())?.affected_snapshots()
            } else {
                verify.affected_snapshots()
            };
            self.mark_damaged(&report.damaged_snapshots)?;
            return Ok(report);
        }
        let pool = self.pool().clone();
        for pack in report.damaged_packs.keys().copied().collect::<Vec<_>>() {
            let name = pack.to_hex();
            let bytes = match pool.read(FileKind::Pack, &name) {
                Ok(b) => b,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            let known = self.index_entries_of(&pack)?;
            let blobs = salvage(&bytes, &known);
            // Read whole and intact now (verify met a transient error):
            // leave it in place.
            if parse_pack(&bytes).is_ok_and(|t| t.len() == blobs.len()) {
                report.damaged_packs.remove(&pack);
                continue;
            }
            if !blobs.is_empty() {
                let mut w = PackWriter::create(&*pool)?;
                for (id, raw, range) in &blobs {
                    w.add(*id, *raw, &bytes[range.clone()])?;
                }
                w.finish()?;
                report.blobs_salvaged += blobs.len();
                report.packs_written += 1;
            }
            crate::failpoint::pause("repair-after-salvage");
            match pool.write(FileKind::Quarantine, &name, &bytes) {
                Ok(()) => {}
                // A repair killed after its copy: the copy is complete.
                Err(crate::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            }
            crate::failpoint::pause("repair-after-quarantine");
            pool.delete(FileKind::Pack, &name)?;
            report.quarantined.push(pack);
        }
        crate::failpoint::pause("repair-before-index");
        self.repair_index()?;
        crate::failpoint::pause("repair-before-marks");
        report.damaged_snapshots = self.verify(&VerifyOptions::default())?.affected_snapshots();
        self.mark_damaged(&report.damaged_snapshots)?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::pack::{encode_table, pack_header, PackEntry};

    fn pack_of(chunks: &[Vec<u8>]) -> Vec<u8> {
        let mut codec = BlobCodec::new(Compression::Zstd { level: 1 });
        let mut pack = pack_header();
        let mut entries = Vec::new();
        for c in chunks {
            let offset = pack.len() as u64;
            let length = codec.encode_into(c, &mut pack).unwrap() as u32;
            entries.push(PackEntry {
                id: ChunkId::of(c),
                offset,
                length,
                raw_length: c.len() as u32,
            });
        }
        let at = pack.len() as u64;
        pack.extend_from_slice(&encode_table(&entries, at));
        pack
    }

    #[test]
    fn salvage_keeps_intact_blobs_with_or_without_a_table() {
        let chunks: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 5000 + i as usize]).collect();
        let good = pack_of(&chunks);
        let ids = |v: &[(ChunkId, u32, std::ops::Range<usize>)]| -> Vec<ChunkId> {
            v.iter().map(|b| b.0).collect()
        };
        let all: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
        assert_eq!(ids(&salvage(&good, &[])), all);
        // A flipped bit in the second blob's body: the table stays, the
        // blob fails its hash, the other three are kept.
        let second = parse_pack(&good).unwrap()[1];
        let mut bad = good.clone();
        bad[second.offset as usize + 14] ^= 0x40;
        assert_eq!(ids(&salvage(&bad, &[])), vec![all[0], all[2], all[3]]);
        // The trailer destroyed as well: the scan still finds the blobs
        // that decode, each named by its content.
        let n = bad.len();
        bad[n - 3] ^= 1;
        let scanned = ids(&salvage(&bad, &[]));
        for id in [all[0], all[2], all[3]] {
            assert!(scanned.contains(&id), "{scanned:?}");
        }
        // With the index's locations: exactly the intact ones, by id.
        let known: Vec<(ChunkId, u64, u32)> = parse_pack(&good)
            .unwrap()
            .iter()
            .map(|e| (e.id, e.offset, e.length))
            .collect();
        assert_eq!(ids(&salvage(&bad, &known)), vec![all[0], all[2], all[3]]);
    }
}
