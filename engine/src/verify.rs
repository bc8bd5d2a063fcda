//! Verification. Structural (default): every manifest decodes and every chunk
//! it references resolves through the index to a blob-table entry of a pack
//! that exists. With `read_data`: additionally every blob of every pack is
//! decompressed and re-hashed. Each piece of damage names the pack, the chunk
//! and every snapshot that depends on it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;

use crossbeam_channel::bounded;
use parking_lot::Mutex;

use crate::codec::{BlobCodec, Compression};
use crate::error::Result;
use crate::id::{ChunkId, PackId, SnapshotId};
use crate::index::BlobLocation;
use crate::pack::{parse_pack, read_pack_table, PackEntry};
use crate::pool::FileKind;
use crate::progress::Progress;
use crate::repo::Repository;

/// What kind of damage was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DamageKind {
    /// A manifest cannot be read or decoded.
    ManifestUnreadable,
    /// A referenced chunk is in no index segment and no pack.
    ChunkMissing,
    /// The index points to a pack that does not exist.
    PackMissing,
    /// A pack's header, table or trailer is damaged (or it cannot be read).
    PackUnreadable,
    /// The index location of a chunk does not match its pack's table.
    IndexMismatch,
    /// A blob fails to decode or does not hash to its id.
    ChunkCorrupt,
}

impl fmt::Display for DamageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DamageKind::ManifestUnreadable => "manifest-unreadable",
            DamageKind::ChunkMissing => "chunk-missing",
            DamageKind::PackMissing => "pack-missing",
            DamageKind::PackUnreadable => "pack-unreadable",
            DamageKind::IndexMismatch => "index-mismatch",
            DamageKind::ChunkCorrupt => "chunk-corrupt",
        })
    }
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub kind: DamageKind,
    pub pack: Option<PackId>,
    pub chunk: Option<ChunkId>,
    /// Every snapshot that can no longer be fully restored because of it.
    pub snapshots: Vec<SnapshotId>,
    pub detail: String,
}

/// Verify settings.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    pub read_data: bool,
    /// Worker threads (0 = one per CPU).
    pub threads: usize,
}

/// The outcome of a verify run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub snapshots: usize,
    pub packs: usize,
    pub chunks_referenced: usize,
    pub blobs_read: u64,
    pub bytes_read: u64,
    pub damage: Vec<Damage>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.damage.is_empty()
    }
}

/// Verifies the whole pool.
pub fn verify(
    repo: &Repository,
    opts: &VerifyOptions,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let ids = repo.snapshot_ids()?;
    report.snapshots = ids.len();
    // chunk → indexes into `ids` of the snapshots that reference it
    let mut referenced: HashMap<ChunkId, Vec<u32>> = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        match repo.load_snapshot(id) {
            Ok(s) => {
                for c in s.chunk_ids() {
                    let v = referenced.entry(c).or_default();
                    if v.last() != Some(&(i as u32)) {
                        v.push(i as u32);
                    }
                }
            }
            Err(e) => report.damage.push(Damage {
                kind: DamageKind::ManifestUnreadable,
                pack: None,
                chunk: None,
                snapshots: vec![*id],
                detail: e.to_string(),
            }),
        }
    }
    report.chunks_referenced = referenced.len();
    let snaps_of = |c: &ChunkId| -> Vec<SnapshotId> {
        referenced
            .get(c)
            .map(|v| {
                v.iter()
                    .filter_map(|&i| ids.get(i as usize).copied())
                    .collect()
            })
            .unwrap_or_default()
    };

    let listed: HashSet<PackId> = repo
        .pool()
        .list(FileKind::Pack)?
        .iter()
        .filter_map(|n| PackId::from_hex(n))
        .collect();
    let mut by_pack: HashMap<PackId, Vec<(ChunkId, BlobLocation)>> = HashMap::new();
    for c in referenced.keys() {
        match repo.index().lookup(c) {
            Some(loc) => by_pack.entry(loc.pack).or_default().push((*c, loc)),
            None => report.damage.push(Damage {
                kind: DamageKind::ChunkMissing,
                pack: None,
                chunk: Some(*c),
                snapshots: snaps_of(c),
                detail: "no index segment or pack holds this chunk".into(),
            }),
        }
    }
    for (pack, chunks) in &by_pack {
        if !listed.contains(pack) {
            for (c, _) in chunks {
                report.damage.push(Damage {
                    kind: DamageKind::PackMissing,
                    pack: Some(*pack),
                    chunk: Some(*c),
                    snapshots: snaps_of(c),
                    detail: "the index names this pack but the pool does not hold it".into(),
                });
            }
        }
    }

    // Packs to examine: with --read-data every pack, otherwise those referenced.
    let mut packs: Vec<PackId> = if opts.read_data {
        listed.iter().copied().collect()
    } else {
        by_pack
            .keys()
            .filter(|p| listed.contains(p))
            .copied()
            .collect()
    };
    packs.sort();
    report.packs = packs.len();
    if opts.read_data {
        let mut total = 0;
        for p in &packs {
            total += repo.pool().size(FileKind::Pack, &p.to_hex()).unwrap_or(0);
        }
        progress.start(total);
    } else {
        progress.start(0);
    }

    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    let found = Mutex::new(Vec::<Damage>::new());
    let counters = Mutex::new((0u64, 0u64));
    let (tx, rx) = bounded::<PackId>(threads * 2);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let rx = rx.clone();
            let (found, counters, by_pack, snaps_of) = (&found, &counters, &by_pack, &snaps_of);
            scope.spawn(move || {
                let mut codec = BlobCodec::new(Compression::None);
                let mut buf = Vec::new();
                for pack in rx.iter() {
                    let mut local = Vec::new();
                    let refs = by_pack.get(&pack).map(Vec::as_slice).unwrap_or_default();
                    let unreadable = |detail: String, local: &mut Vec<Damage>| {
                        if refs.is_empty() {
                            local.push(Damage {
                                kind: DamageKind::PackUnreadable,
                                pack: Some(pack),
                                chunk: None,
                                snapshots: Vec::new(),
                                detail: detail.clone(),
                            });
                        }
                        for (c, _) in refs {
                            local.push(Damage {
                                kind: DamageKind::PackUnreadable,
                                pack: Some(pack),
                                chunk: Some(*c),
                                snapshots: snaps_of(c),
                                detail: detail.clone(),
                            });
                        }
                    };
                    let entries: Option<Vec<PackEntry>> = if opts.read_data {
                        match repo.pool().read(FileKind::Pack, &pack.to_hex()) {
                            Err(e) => {
                                unreadable(e.to_string(), &mut local);
                                None
                            }
                            Ok(bytes) => {
                                progress.advance(bytes.len() as u64);
                                match parse_pack(&bytes) {
                                    Err(e) => {
                                        unreadable(format!("pack {pack}: {e}"), &mut local);
                                        None
                                    }
                                    Ok(entries) => {
                                        let mut c = counters.lock();
                                        c.0 += entries.len() as u64;
                                        c.1 += bytes.len() as u64;
                                        drop(c);
                                        for e in &entries {
                                            let start = e.offset as usize;
                                            let blob = bytes.get(start..start + e.length as usize).unwrap_or_default();
                                            if let Err(err) = codec.decode_verified(blob, &e.id, &mut buf) {
                                                local.push(Damage {
                                                    kind: DamageKind::ChunkCorrupt,
                                                    pack: Some(pack),
                                                    chunk: Some(e.id),
                                                    snapshots: snaps_of(&e.id),
                                                    detail: format!("blob at offset {}: {err}", e.offset),
                                                });
                                            }
                                        }
                                        Some(entries)
                                    }
                                }
                            }
                        }
                    } else {
                        match read_pack_table(&**repo.pool(), &pack) {
                            Ok(entries) => Some(entries),
                            Err(e) => {
                                unreadable(e.to_string(), &mut local);
                                None
                            }
                        }
                    };
                    if let Some(entries) = entries {
                        let table: HashMap<ChunkId, (u64, u32)> =
                            entries.iter().map(|e| (e.id, (e.offset, e.length))).collect();
                        for (c, loc) in refs {
                            if table.get(c) != Some(&(loc.offset, loc.length)) {
                                local.push(Damage {
                                    kind: DamageKind::IndexMismatch,
                                    pack: Some(pack),
                                    chunk: Some(*c),
                                    snapshots: snaps_of(c),
                                    detail: format!(
                                        "index says offset {} length {}, pack table disagrees (run `cairn repair --index`)",
                                        loc.offset, loc.length
                                    ),
                                });
                            }
                        }
                    }
                    found.lock().extend(local);
                }
            });
        }
        drop(rx);
        for p in &packs {
            if tx.send(*p).is_err() {
                break;
            }
        }
        drop(tx);
    });
    let (blobs, bytes) = counters.into_inner();
    report.blobs_read = blobs;
    report.bytes_read = bytes;
    report.damage.extend(found.into_inner());
    report.damage.sort_by_key(|d| (d.kind, d.pack, d.chunk));
    Ok(report)
}

/// Snapshots affected by any damage in the report.
pub fn affected_snapshots(report: &VerifyReport) -> BTreeSet<SnapshotId> {
    report
        .damage
        .iter()
        .flat_map(|d| d.snapshots.iter().copied())
        .collect()
}
