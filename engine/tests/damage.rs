//! Bit flips in 100 random blobs of a pool shared by six snapshots of three
//! VMs (some chunks shared between VMs, some between a VM's snapshots):
//! (VM c's chunks spared, so some snapshots are untouched):
//! `verify --read-data` names exactly the snapshots whose images hold a
//! damaged block and exactly the disk byte ranges those blocks cover
//! (expected values computed from the images themselves, with BLAKE3 over
//! each 4 KiB block, not by the engine); every other snapshot restores
//! bit-identical; `repair_packs` quarantines every hit pack, salvages the
//! intact blobs and marks exactly the affected snapshots; backing the same
//! images up again heals them: verify is clean, the marks are gone and
//! every snapshot restores. Also each other kind of finding about a chunk:
//! packs lost (`pack-missing`, then `chunk-missing` once the index is
//! rebuilt) and an index entry at the wrong offset (`index-mismatch`).
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

mod failing_reads;
use failing_reads::{corrupt, denied, gone, BlobReads, FailingReads, Failure};

use cairn_engine::bytes::Bytes;
use cairn_engine::internals::{read_pack_table, PackEntry, SegmentBuilder};
use cairn_engine::sample::SampleRng;
use cairn_engine::{
    BackupDisk, BackupOptions, ChunkId, ChunkingParams, Compression, DamageKind, DynPool, FileKind,
    MemorySource, PoolList, Repository, RestoreOptions, SnapshotId, VerifyOptions,
};
use cairn_pools::LocalPool;

const BLOCK: usize = 4096;
const BLOCKS: usize = 160;

fn random_blocks(rng: &mut SampleRng, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|_| {
            let mut b = vec![0u8; BLOCK];
            rng.fill(&mut b);
            b[0] |= 1; // never an all-zero block (a hole, not a chunk)
            b
        })
        .collect()
}

/// Six images: per VM a base and a second version with 20 blocks
/// rewritten; VM b's images repeat 16 blocks of VM a's, and VM b's
/// second image holds one block twice, side by side (blocks 50 and 51).
fn images() -> Vec<(String, Vec<u8>)> {
    let mut rng = SampleRng::new(7);
    let a = random_blocks(&mut rng, BLOCKS);
    let mut out = Vec::new();
    for vm in ["a", "b", "c"] {
        let mut blocks = if vm == "a" {
            a.clone()
        } else {
            random_blocks(&mut rng, BLOCKS)
        };
        if vm == "b" {
            blocks[100..116].clone_from_slice(&a[10..26]);
        }
        out.push((vm.to_string(), blocks.concat()));
        let fresh = random_blocks(&mut rng, 20);
        for (i, f) in fresh.into_iter().enumerate() {
            blocks[i * 7] = f;
        }
        if vm == "b" {
            blocks[51] = blocks[50].clone();
        }
        out.push((vm.to_string(), blocks.concat()));
    }
    out
}

fn block_id(block: &[u8]) -> ChunkId {
    ChunkId(*blake3::hash(block).as_bytes())
}

/// Per damaged chunk, the (disk byte range) list of each image holding it,
/// adjacent blocks merged.
fn expected_ranges(
    image: &[u8],
    damaged: &BTreeSet<ChunkId>,
) -> BTreeMap<ChunkId, Vec<(u64, u64)>> {
    let mut out: BTreeMap<ChunkId, Vec<(u64, u64)>> = BTreeMap::new();
    for (i, b) in image.chunks(BLOCK).enumerate() {
        let id = block_id(b);
        if damaged.contains(&id) {
            let ranges = out.entry(id).or_default();
            let at = (i * BLOCK) as u64;
            match ranges.last_mut() {
                Some((off, len)) if *off + *len == at => *len += BLOCK as u64,
                _ => ranges.push((at, BLOCK as u64)),
            }
        }
    }
    out
}

fn restores(repo: &Repository, id: &SnapshotId, image: &[u8], scratch: &std::path::Path) -> bool {
    let dir = scratch.join(id.to_hex());
    let ok = repo
        .restore_to_dir(id, &dir, &RestoreOptions::default())
        .is_ok();
    let same = ok && std::fs::read(dir.join("vda")).unwrap() == image;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(ok, same, "snapshot {id} restored other bytes");
    ok
}

#[test]
fn bit_flips_in_100_blobs_name_exactly_the_affected_snapshots_and_repair_heals() {
    scenario();
}

/// The same with verify's, repair's and the index rebuild's sorts spilled
/// to disk (16 records per run).
#[test]
fn the_same_with_every_sort_on_disk() {
    std::env::set_var("CAIRN_SORT_BUDGET", "0");
    scenario();
}

fn scenario() {
    let (_dir, local, pool, repo) = local_repo();
    let scratch = tempfile::tempdir().unwrap();
    let backup = |vm: &str, image: &[u8]| backup_blocks(&repo, vm, image);
    let images = images();
    let snaps: Vec<(SnapshotId, &[u8])> = images
        .iter()
        .map(|(vm, img)| (backup(vm, img), img.as_slice()))
        .collect();

    // 100 random blobs, each flipped in the middle of its stored bytes;
    // VM c's chunks are spared, so its snapshots must come out clean.
    let spared: BTreeSet<ChunkId> = images
        .iter()
        .filter(|(vm, _)| vm == "c")
        .flat_map(|(_, img)| img.chunks(BLOCK).map(block_id))
        .collect();
    // Data chunks only (extent pages are chunks too; their damage is
    // tested on its own).
    let data: BTreeSet<ChunkId> = images
        .iter()
        .flat_map(|(_, img)| img.chunks(BLOCK).map(block_id))
        .collect();
    let mut blobs = Vec::new();
    for name in pool.list(FileKind::Pack).unwrap() {
        let pack = cairn_engine::PackId::from_hex(&name).unwrap();
        for e in read_pack_table(&*pool, &pack).unwrap() {
            if data.contains(&e.id) && !spared.contains(&e.id) {
                blobs.push((name.clone(), e.id, e.offset + e.length as u64 / 2));
            }
        }
    }
    assert!(blobs.len() > 300, "{} blobs", blobs.len());
    let mut rng = SampleRng::new(99);
    let mut damaged = BTreeSet::new();
    let mut hit_packs = BTreeSet::new();
    // The first pick: the block b's second image holds twice in a row (one
    // range of 8 KiB, not two of 4).
    let twice = block_id(&images[3].1[50 * BLOCK..51 * BLOCK]);
    let first = blobs.iter().position(|b| b.1 == twice).unwrap();
    let mut picks = std::iter::once(first).chain(std::iter::repeat_with(|| {
        rng.below(blobs.len() as u64) as usize
    }));
    while damaged.len() < 100 {
        let (pack, id, at) = blobs[picks.next().unwrap()].clone();
        if !damaged.insert(id) {
            continue;
        }
        hit_packs.insert(pack.clone());
        let path = local.path_of(FileKind::Pack, &pack).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at as usize] ^= 0x5a;
        std::fs::write(&path, &bytes).unwrap();
    }

    // What the images say: which snapshots hold a damaged block, where.
    let mut expected_affected = BTreeSet::new();
    let mut expected: BTreeMap<ChunkId, BTreeMap<SnapshotId, Vec<(u64, u64)>>> = BTreeMap::new();
    for (id, img) in &snaps {
        for (c, ranges) in expected_ranges(img, &damaged) {
            expected_affected.insert(*id);
            expected.entry(c).or_default().insert(*id, ranges);
        }
    }
    assert_eq!(expected_affected.len(), 4, "a's and b's snapshots");
    assert_eq!(
        expected[&twice][&snaps[3].0],
        vec![(50 * BLOCK as u64, 2 * BLOCK as u64)]
    );

    let report = repo
        .verify(&VerifyOptions::default().with_read_data(true))
        .unwrap();
    assert_eq!(report.affected_snapshots(), expected_affected);
    let mut found = BTreeSet::new();
    for d in &report.damage {
        assert_eq!(d.kind, DamageKind::ChunkCorrupt, "{d}");
        let c = d.chunk.unwrap();
        found.insert(c);
        let want = &expected[&c];
        let got_snaps: BTreeSet<SnapshotId> = d.snapshots.iter().copied().collect();
        assert_eq!(got_snaps, want.keys().copied().collect(), "chunk {c}");
        let mut got: BTreeMap<SnapshotId, Vec<(u64, u64)>> = BTreeMap::new();
        for r in &d.ranges {
            assert_eq!(r.disk, "vda");
            got.entry(r.snapshot)
                .or_default()
                .push((r.offset, r.length));
        }
        assert_eq!(&got, want, "ranges of chunk {c}");
    }
    assert_eq!(found, damaged, "every flipped blob found, nothing else");
    for (id, img) in &snaps {
        assert_eq!(
            restores(&repo, id, img, scratch.path()),
            !expected_affected.contains(id),
            "snapshot {id}"
        );
    }

    // Repair: every hit pack quarantined, intact blobs salvaged, exactly
    // the affected snapshots marked.
    let r = repo.repair_packs(false).unwrap();
    assert_eq!(r.quarantined.len(), hit_packs.len());
    assert!(r.blobs_salvaged > 0);
    assert_eq!(r.damaged_snapshots, expected_affected);
    assert_eq!(repo.damage_marks().unwrap(), expected_affected);
    let listed: BTreeSet<SnapshotId> = repo
        .snapshots()
        .unwrap()
        .snapshots
        .iter()
        .filter(|s| s.damaged)
        .map(|s| s.id)
        .collect();
    assert_eq!(listed, expected_affected);
    assert_eq!(
        pool.list(FileKind::Quarantine).unwrap().len(),
        hit_packs.len()
    );
    for (id, img) in &snaps {
        assert_eq!(
            restores(&repo, id, img, scratch.path()),
            !expected_affected.contains(id)
        );
    }

    // The same data backed up again stores the lost chunks: healed.
    for (vm, img) in &images {
        backup(vm, img);
    }
    assert!(repo.damage_marks().unwrap().is_empty());
    let report = repo
        .verify(&VerifyOptions::default().with_read_data(true))
        .unwrap();
    assert!(report.is_ok(), "{report}");
    for (id, img) in &snaps {
        assert!(restores(&repo, id, img, scratch.path()), "snapshot {id}");
    }
}

/// Flips a byte in the middle of the blob of chunk `id`, in every pack
/// that holds it.
fn flip_blob(local: &LocalPool, id: &ChunkId) {
    let holding = packs_holding(local, id);
    assert!(!holding.is_empty(), "chunk {id} is stored in a pack");
    for (name, table) in holding {
        flip_copy(local, id, &name, &table);
    }
}

/// Flips a byte in the middle of chunk `id`'s blob in pack `name` (whose
/// table is `table`) only.
fn flip_copy(local: &LocalPool, id: &ChunkId, name: &str, table: &[PackEntry]) {
    for e in table.iter().filter(|e| e.id == *id) {
        let path = local.path_of(FileKind::Pack, name).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(e.offset + e.length as u64 / 2) as usize] ^= 0x5a;
        std::fs::write(&path, &bytes).unwrap();
    }
}

/// The packs whose table lists `id`: each pack's name and whole table.
fn packs_holding(local: &LocalPool, id: &ChunkId) -> Vec<(String, Vec<PackEntry>)> {
    let mut out = Vec::new();
    for name in local.list(FileKind::Pack).unwrap() {
        let pack = cairn_engine::PackId::from_hex(&name).unwrap();
        let table = read_pack_table(local, &pack).unwrap();
        if table.iter().any(|e| e.id == *id) {
            out.push((name, table));
        }
    }
    out
}

/// A repository on a local pool in a temporary directory (kept while the
/// returned guard lives).
fn local_repo() -> (tempfile::TempDir, Arc<LocalPool>, DynPool, Repository) {
    let dir = tempfile::tempdir().unwrap();
    let local = Arc::new(LocalPool::create(dir.path()).unwrap());
    let pool: DynPool = local.clone();
    let repo = Repository::create(pool.clone()).unwrap();
    (dir, local, pool, repo)
}

/// A CBT incremental whose parent's extent page is damaged, or whose pack
/// is gone: the page's span cannot be reused, so it is read again from the
/// source (not a failed backup), and the new snapshot restores
/// bit-identical while verify names the parent alone — or, when the damaged
/// page is cut again identical, names both until `repair` moves the damaged
/// copy aside.
#[test]
fn an_incremental_over_a_damaged_or_lost_parent_page_reads_its_span_again() {
    // A flipped page on a one-page disk (block 5's change makes the new
    // page differ from the damaged one); a flipped page on a two-page disk
    // whose span is unchanged (the page cut anew is the damaged one, byte
    // for byte: it must be stored again, not deduplicated against the
    // damaged copy); a lost page on a two-page disk, where exactly that
    // page's span is read again.
    for (lose_pack, two_pages) in [(false, false), (false, true), (true, true)] {
        let (_dir, local, _pool, repo) = local_repo();
        let mut rng = SampleRng::new(33);
        // Two pages (a page spans 16 384 blocks): 40 blocks of data, zeros
        // to the end of the first span, and 40 blocks of data after it. The
        // second page is the one damaged or lost.
        let span = if two_pages { 16_384 * BLOCK } else { 0 };
        let mut image = vec![0u8; span + 40 * BLOCK];
        image[..40 * BLOCK].copy_from_slice(&random_blocks(&mut rng, 40).concat());
        image[span..].copy_from_slice(&random_blocks(&mut rng, 40).concat());
        let parent = backup_blocks(&repo, "vm", &image);
        let parent_snapshot = repo.load_snapshot(&parent).unwrap();
        let pages = &parent_snapshot.disks[0].pages;
        assert_eq!(pages.len(), 1 + two_pages as usize);
        if two_pages {
            assert_eq!(pages[0].length, span as u64);
        }
        let all_pages = pages.clone();
        let pages = &pages[pages.len() - 1..];
        let parent_image = image.clone();
        // Block 5 rewritten, and the bitmap says so.
        image[5 * BLOCK..6 * BLOCK].copy_from_slice(&random_blocks(&mut rng, 1)[0]);
        let mut lost = BTreeSet::new();
        if lose_pack {
            for (name, table) in packs_holding(&local, &pages[0].id) {
                lost.extend(table.iter().map(|e| e.id));
                std::fs::remove_file(local.path_of(FileKind::Pack, &name).unwrap()).unwrap();
            }
        } else {
            flip_blob(&local, &pages[0].id);
        }
        // New chunks: block 5, and the blocks whose only copy was lost
        // (counted from the image, not by the engine).
        let blocks: BTreeSet<ChunkId> = image.chunks(BLOCK).map(ChunkId::of).collect();
        let relost = blocks.iter().filter(|id| lost.contains(id)).count() as u64;

        let stats = block_5_incremental(&repo, parent, &image, &[]);
        // The dirty block and the damaged page's whole span were read, and
        // nothing else.
        // Read again: the span of every page lost with the pack (or the
        // flipped one), and block 5 unless its page is among them.
        let gone = |id: &ChunkId| lost.contains(id) || (!lose_pack && *id == pages[0].id);
        let mut read: u64 = all_pages
            .iter()
            .filter(|p| gone(&p.id))
            .map(|p| p.length)
            .sum();
        if !gone(&all_pages[0].id) {
            read += BLOCK as u64;
        }
        let case = format!("lose_pack {lose_pack}, two_pages {two_pages}");
        assert_eq!(stats.bytes_read, read, "{case}");
        assert_eq!(stats.chunks_new, 1 + relost, "{case}");
        // Every page is stored: the first is new (block 5), the second
        // lost or damaged (stored again even when cut identical).
        assert_eq!(stats.pages_new, 1 + two_pages as u64, "{case}");
        // A damaged page is reported; a lost pack the index knows is gone
        // is not read at all.
        assert_eq!(stats.parent_pages_damaged, !lose_pack as u64, "{case}");

        let scratch = tempfile::tempdir().unwrap();
        let report = repo
            .verify(&VerifyOptions::default().with_read_data(true))
            .unwrap();
        assert!(!report.damage.is_empty(), "{case}");
        if two_pages && !lose_pack {
            // The page cut anew is the damaged one: both snapshots name it.
            // Two copies are stored. This handle wrote the newer one's
            // segment last, so its lookups find that copy (another process
            // may find either, and then reads the other: see
            // a_page_stored_again_after_damage_…): the snapshots' pages read,
            // and the one finding is the damaged copy, which verify meets
            // reading every blob. `repair` moves its pack aside; then both
            // snapshots restore from the copy this backup stored (with the
            // damaged copy reused instead, the page would be lost with the
            // pack).
            assert_eq!(report.damage.len(), 1, "{case}: {report}");
            let d = &report.damage[0];
            assert_eq!(d.kind, DamageKind::ChunkCorrupt, "{d}");
            assert_eq!(d.chunk, Some(pages[0].id), "{d}");
            let mut both = vec![parent, stats.snapshot];
            both.sort();
            assert_eq!(d.snapshots, both, "{d}");
            repo.repair_packs(false).unwrap();
            let report = repo
                .verify(&VerifyOptions::default().with_read_data(true))
                .unwrap();
            assert!(report.is_ok(), "{case}: {report}");
            assert!(restores(&repo, &parent, &parent_image, scratch.path()));
            assert!(restores(&repo, &stats.snapshot, &image, scratch.path()));
        } else {
            assert!(restores(&repo, &stats.snapshot, &image, scratch.path()));
            for d in &report.damage {
                assert_eq!(d.snapshots, vec![parent], "{case}: {d}");
            }
        }
    }
}

fn backup_blocks(repo: &Repository, vm: &str, image: &[u8]) -> SnapshotId {
    let disk = BackupDisk::image(
        "vda",
        MemorySource::new("vda", Bytes::copy_from_slice(image)),
    );
    repo.backup(vec![disk], &blocks_opts(vm)).unwrap().snapshot
}

/// The options of every backup here: 4 KiB fixed chunks, zstd level 1.
fn blocks_opts(vm: &str) -> BackupOptions {
    BackupOptions::new(vm)
        .with_chunking(ChunkingParams::Fixed { size: BLOCK as u32 })
        .with_compression(Compression::Zstd { level: 1 })
}

/// A CBT incremental of disk "vda" holding `image` over snapshot `parent`
/// (of VM "vm"), whose bitmap says block 5 changed, with a second disk
/// "vdb" holding `other` unless it is empty.
fn block_5_incremental(
    repo: &Repository,
    parent: SnapshotId,
    image: &[u8],
    other: &[u8],
) -> cairn_engine::BackupStats {
    let parent_snapshot = repo.load_snapshot(&parent).unwrap();
    let dirty = std::iter::once((5 * BLOCK) as u64..(6 * BLOCK) as u64).collect();
    let changed = cairn_engine::ChangedBlocks::new(parent, &parent_snapshot, "vda", dirty).unwrap();
    let mut disks = vec![BackupDisk::incremental(
        "vda",
        MemorySource::new("vda", Bytes::copy_from_slice(image)),
        changed,
    )];
    if !other.is_empty() {
        disks.push(BackupDisk::image(
            "vdb",
            MemorySource::new("vdb", Bytes::copy_from_slice(other)),
        ));
    }
    repo.backup(disks, &blocks_opts("vm")).unwrap()
}

/// An extent page stored twice, a damaged copy and an intact one: a CBT
/// incremental finds its parent's page damaged and stores it again, cut
/// identical (block 5 is said dirty but holds what it held). Another
/// process whose index finds the damaged copy first reads the intact one
/// when it restores, and stores the page again when it backs up (it must
/// not reference the damaged copy); a collection keeps an intact copy and
/// reports the damaged one.
///
/// Without looking, a collection loses the intact copy two ways: when the
/// incremental's pack holds only the page, the parent's pack owns the
/// chunk (more live bytes) and the other pack, owning nothing live, is
/// deleted; when it also holds a second disk's new data, it stays, but the
/// new segment names one copy per chunk, the one in the lower pack id.
/// Pack ids are random, so that case runs at least 12 times and on until
/// the damaged copy was in the lower pack once (about half the rounds).
#[test]
fn a_page_stored_again_after_damage_is_the_copy_readers_and_collections_keep() {
    let mut damaged_in_lower_pack = 0;
    // Rounds 1… have a second disk; at least 12 of them, and on until one
    // has put the damaged copy in the lower pack (each does with a chance
    // of one half; 40 rounds at most).
    for round in 0..41u64 {
        if round >= 13 && damaged_in_lower_pack > 0 {
            break;
        }
        let (_dir, local, pool, repo) = local_repo();
        let mut rng = SampleRng::new(60 + round);
        let image = random_blocks(&mut rng, 40).concat();
        let other = if round > 0 {
            random_blocks(&mut rng, 10).concat()
        } else {
            Vec::new()
        };
        let parent = backup_blocks(&repo, "vm", &image);
        let page = repo.load_snapshot(&parent).unwrap().disks[0].pages[0].id;
        let damaged = packs_holding(&local, &page);
        assert_eq!(damaged.len(), 1);
        let damaged = damaged[0].0.clone();
        flip_blob(&local, &page);
        // A handle that loaded its index before the page was stored again.
        let stale = Repository::open(pool.clone()).unwrap();
        stale.index().unwrap();

        let stats = block_5_incremental(&repo, parent, &image, &other);
        assert_eq!(stats.parent_pages_damaged, 1);
        // It reads the parent's extents without a refresh first
        // (`load_snapshot_with_extents`): meeting the damaged copy, it
        // refreshes its index and finds the new one.
        let listed = stale.load_snapshot_with_extents(&parent).unwrap();
        assert_eq!(listed.disks[0].extents.len(), 40);
        let holding: Vec<String> = packs_holding(&local, &page)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(holding.len(), 2, "the page is stored again");
        let intact = holding.iter().find(|p| **p != damaged).unwrap().clone();
        if damaged < intact && !other.is_empty() {
            damaged_in_lower_pack += 1;
        }

        let scratch = tempfile::tempdir().unwrap();
        let case = format!("round {round}");
        for after_collection in [false, true] {
            // Another process, with an index of its own: before the
            // collection, one whose lookups find the damaged copy first.
            let reader = if after_collection {
                Repository::open(pool.clone()).unwrap()
            } else {
                reader_finding(&pool, &page, &damaged)
            };
            assert!(restores(&reader, &parent, &image, scratch.path()), "{case}");
            assert!(
                restores(&reader, &stats.snapshot, &image, scratch.path()),
                "{case}"
            );
            if !other.is_empty() {
                let dir = scratch.path().join("vdb");
                reader
                    .restore_to_dir(&stats.snapshot, &dir, &RestoreOptions::default())
                    .unwrap();
                assert!(std::fs::read(dir.join("vdb")).unwrap() == other, "{case}");
                std::fs::remove_dir_all(&dir).unwrap();
            }
            if after_collection {
                continue;
            }
            if round == 0 {
                // A backup there reads the page where its index finds it,
                // damaged, so it stores the page once more.
                let third = block_5_incremental(&reader, parent, &image, &other);
                assert_eq!(third.parent_pages_damaged, 1, "{case}");
                assert_eq!(packs_holding(&local, &page).len(), 3, "{case}");
                assert!(restores(&reader, &third.snapshot, &image, scratch.path()));
            }
            let report = reader.gc(&cairn_engine::GcOptions::default()).unwrap();
            assert_eq!(report.page_copies_damaged, 1, "{case}: {report}");
        }
        // The one segment left names an intact copy of the page: the
        // incremental's, or the repack's copy of it.
        let segments = pool.list(FileKind::Index).unwrap();
        assert_eq!(segments.len(), 1, "{case}");
        let segment = cairn_engine::internals::Segment::decode(
            pool.read(FileKind::Index, &segments[0]).unwrap(),
        )
        .unwrap();
        let at = segment.lookup(&page).unwrap();
        assert_ne!(at.pack.to_hex(), damaged, "{case}");
        if !other.is_empty() {
            assert_eq!(at.pack.to_hex(), intact, "{case}");
        }
        // The damaged copy is still in its pack (which holds the parent's
        // data): verify, reading every blob, finds it; `repair` moves that
        // pack aside, salvaging the rest, and nothing is lost.
        let report = repo
            .verify(&VerifyOptions::default().with_read_data(true))
            .unwrap();
        assert_eq!(report.damage.len(), 1, "{case}: {report}");
        assert_eq!(report.damage[0].kind, DamageKind::ChunkCorrupt, "{case}");
        assert_eq!(report.damage[0].chunk, Some(page), "{case}");
        repo.repair_packs(false).unwrap();
        let reader = Repository::open(pool.clone()).unwrap();
        let report = reader
            .verify(&VerifyOptions::default().with_read_data(true))
            .unwrap();
        assert!(report.is_ok(), "{case}: {report}");
        assert!(restores(&reader, &parent, &image, scratch.path()), "{case}");
        assert!(
            restores(&reader, &stats.snapshot, &image, scratch.path()),
            "{case}"
        );
    }
    assert!(
        damaged_in_lower_pack > 0,
        "no round put the damaged copy in the lower pack"
    );
}

/// A page stored three times: damaged in the parent's pack, intact in the
/// packs of two incrementals (the second backed up by a handle whose
/// index found the damaged copy first). Returns the pool, the parent and
/// its image, the page, the damaged copy's pack and the two intact ones
/// with the page's offset in each.
#[allow(clippy::type_complexity)]
fn page_in_three_copies(
    seed: u64,
) -> (
    tempfile::TempDir,
    Arc<LocalPool>,
    DynPool,
    SnapshotId,
    Vec<u8>,
    ChunkId,
    String,
    [(String, u64); 2],
) {
    let (dir, local, pool, repo) = local_repo();
    let mut rng = SampleRng::new(seed);
    let image = random_blocks(&mut rng, 40).concat();
    let parent = backup_blocks(&repo, "vm", &image);
    let page = repo.load_snapshot(&parent).unwrap().disks[0].pages[0].id;
    let damaged = packs_holding(&local, &page)[0].0.clone();
    flip_blob(&local, &page);
    let again = |repo: &Repository| {
        let stats = block_5_incremental(repo, parent, &image, &[]);
        assert_eq!(stats.parent_pages_damaged, 1);
    };
    again(&repo);
    // After the first, so that its index knows both copies.
    again(&reader_finding(&pool, &page, &damaged));
    let intact: Vec<(String, u64)> = packs_holding(&local, &page)
        .into_iter()
        .filter(|(name, _)| *name != damaged)
        .map(|(name, table)| {
            let at = table.iter().find(|e| e.id == page).unwrap().offset;
            (name, at)
        })
        .collect();
    let intact: [(String, u64); 2] = intact.try_into().unwrap();
    (dir, local, pool, parent, image, page, damaged, intact)
}

/// What the pool answers for one copy of a page stored three times (one
/// copy damaged, the parent's): a reader and a collection treat damage
/// (and a copy gone since the listing) as "try another copy", any other
/// error as a failure. A collection whose mark reads another copy meets
/// the answer when it checks the copies: an I/O error fails it before it
/// deletes anything; a copy gone is passed over; a damaged one is counted.
#[test]
fn copies_of_a_page_tell_damage_from_io_errors() {
    for (case, fail) in [
        ("denied", denied as Failure),
        ("gone", gone),
        ("corrupt", corrupt),
    ] {
        let (_dir, _local, pool, parent, _image, page, damaged, [failing, read]) =
            page_in_three_copies(70);
        let wrapped = Arc::new(cairn_engine::WrappedPool(BlobReads {
            inner: pool.clone(),
            pack: failing.0.clone(),
            offset: failing.1,
            fail: Some(fail),
            count: Default::default(),
        }));
        let dynamic: DynPool = wrapped.clone();

        // Readers whose index finds the failing copy first, or the
        // damaged one, then the failing one.
        for order in [&[&*failing.0][..], &[&*damaged, &*failing.0]] {
            let reader = reader_trying(&dynamic, &page, order);
            let listed = reader.load_snapshot_with_extents(&parent);
            match (case, listed) {
                ("denied", Err(e)) => {
                    assert!(matches!(e, cairn_engine::Error::PoolIo { .. }), "{e}")
                }
                ("gone" | "corrupt", Ok(s)) => assert_eq!(s.disks[0].extents.len(), 40),
                (_, other) => panic!("{case}, {order:?}: {other:?}"),
            }
        }

        // A collection whose mark reads the intact copy the reader did not.
        let before: BTreeSet<String> = pool.list(FileKind::Pack).unwrap().into_iter().collect();
        let collector = reader_finding(&dynamic, &page, &read.0);
        let reads = wrapped.0.reads();
        let result = collector.gc(&cairn_engine::GcOptions::default());
        assert_eq!(
            wrapped.0.reads(),
            reads + 1,
            "{case}: one read, the check's"
        );
        match (case, result) {
            ("denied", Err(e)) => {
                assert!(matches!(e, cairn_engine::Error::PoolIo { .. }), "{e}");
                let after: BTreeSet<String> =
                    pool.list(FileKind::Pack).unwrap().into_iter().collect();
                assert_eq!(after, before, "nothing deleted");
            }
            ("gone", Ok(report)) => assert_eq!(report.page_copies_damaged, 1, "{report}"),
            ("corrupt", Ok(report)) => {
                assert_eq!(report.page_copies_damaged, 2, "{report}");
                assert!(
                    report.to_string().ends_with(
                        "; 2 damaged copies of extent pages left out of the index (run repair --packs)"
                    ),
                    "{report}"
                );
            }
            (_, other) => panic!("{case}: {other:?}"),
        }
    }
}

/// A copy to another pool from a handle whose index finds the damaged copy
/// of a page first: it moves an intact copy (the source's index names
/// three), and the target's snapshot restores bit-identical and verifies
/// clean.
#[test]
fn a_copy_moves_an_intact_copy_of_a_page_stored_again() {
    let (_dir, _local, pool, parent, image, page, damaged, _) = page_in_three_copies(90);
    let source = reader_finding(&pool, &page, &damaged);
    let (_target_dir, _, _, target) = local_repo();
    let stats = source
        .copy_to(
            &target,
            &cairn_engine::CopyOptions::default().with_snapshots(vec![parent]),
        )
        .unwrap();
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    assert_eq!(stats.copied, vec![parent]);
    let scratch = tempfile::tempdir().unwrap();
    assert!(restores(&target, &parent, &image, scratch.path()));
    let report = target
        .verify(&VerifyOptions::default().with_read_data(true))
        .unwrap();
    assert!(report.is_ok(), "{report}");
}

/// A snapshot of 40 blocks whose every chunk is stored twice: a second
/// backup of the same image ran while a (made-up) collection had
/// condemned the first one's pack, so it stored everything again, not
/// compressed (the blocks compress well: the two copies of a chunk differ
/// in length); the notice is gone since. Returns the pool, the image, the
/// snapshot and the two packs with their tables, the first backup's
/// first.
#[allow(clippy::type_complexity)]
fn every_chunk_twice(
    seed: u64,
) -> (
    tempfile::TempDir,
    Arc<LocalPool>,
    DynPool,
    Vec<u8>,
    SnapshotId,
    Vec<(String, Vec<PackEntry>)>,
) {
    let (dir, local, pool, repo) = local_repo();
    let image: Vec<u8> = (0..40)
        .flat_map(|i| {
            let text = format!("seed {seed}, block {i}; ");
            text.into_bytes().into_iter().cycle().take(BLOCK)
        })
        .collect();
    let first = backup_blocks(&repo, "vm", &image);
    let packs = pool.list(FileKind::Pack).unwrap();
    assert_eq!(packs.len(), 1);
    let notice = cairn_engine::internals::SweepNotice {
        packs: [cairn_engine::PackId::from_hex(&packs[0]).unwrap()].into(),
    };
    let name = cairn_engine::internals::SweepNotice::new_name("0123456789abcdef0123456789abcdef");
    pool.write(FileKind::Sweep, &name, notice.encode().as_bytes())
        .unwrap();
    let disk = BackupDisk::image(
        "vda",
        MemorySource::new("vda", Bytes::copy_from_slice(&image)),
    );
    let opts = blocks_opts("vm").with_compression(Compression::None);
    repo.backup(vec![disk], &opts).unwrap();
    pool.delete(FileKind::Sweep, &name).unwrap();
    let block = block_id(&image[..BLOCK]);
    let mut holding = packs_holding(&local, &block);
    assert_eq!(holding.len(), 2, "stored again");
    holding.sort_by_key(|(p, _)| *p != packs[0]);
    let length = |t: &[PackEntry]| t.iter().find(|e| e.id == block).unwrap().length;
    assert!(length(&holding[0].1) < length(&holding[1].1));
    (dir, local, pool, image, first, holding)
}

/// Restore, from a handle whose index finds the first copies: a damaged
/// blob mid-run is read from its other copy; a run whose pack cannot be
/// read (gone) is read chunk by chunk from the other copies; the other
/// copy denied as well fails the restore with the pool's error.
#[test]
fn a_restore_reads_the_other_copy_of_a_damaged_blob_or_a_lost_run() {
    let (_dir, local, pool, image, first, holding) = every_chunk_twice(96);
    let scratch = tempfile::tempdir().unwrap();
    let block = |i: usize| block_id(&image[i * BLOCK..(i + 1) * BLOCK]);
    let (damaged, table) = &holding[0];
    flip_copy(&local, &block(10), damaged, table);
    let reader = reader_finding(&pool, &block(10), damaged);
    assert!(restores(&reader, &first, &image, scratch.path()));

    // The run's read fails: its first blob is block 0's.
    let run_start = table.iter().find(|e| e.id == block(0)).unwrap().offset;
    let wrapped = Arc::new(cairn_engine::WrappedPool(BlobReads {
        inner: pool.clone(),
        pack: damaged.clone(),
        offset: run_start,
        fail: Some(gone),
        count: Default::default(),
    }));
    let dynamic: DynPool = wrapped.clone();
    let reader = reader_finding(&dynamic, &block(10), damaged);
    assert!(restores(&reader, &first, &image, scratch.path()));
    assert_eq!(
        wrapped.0.reads(),
        1,
        "the run read once, then its chunks elsewhere"
    );
    // Denied instead: not damage, so no other copy is tried; the restore
    // fails with the pool's error although every chunk has one.
    let dynamic: DynPool = Arc::new(cairn_engine::WrappedPool(BlobReads {
        inner: pool.clone(),
        pack: damaged.clone(),
        offset: run_start,
        fail: Some(denied),
        count: Default::default(),
    }));
    let reader = reader_finding(&dynamic, &block(10), damaged);
    let err = reader
        .restore_to_dir(
            &first,
            &scratch.path().join("run-denied"),
            &RestoreOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(err, cairn_engine::Error::PoolIo { .. }), "{err}");

    // Block 10's other copy denied: the restore fails with that error.
    let (intact, other) = &holding[1];
    let dynamic: DynPool = Arc::new(cairn_engine::WrappedPool(BlobReads {
        inner: pool.clone(),
        pack: intact.clone(),
        offset: other.iter().find(|e| e.id == block(10)).unwrap().offset,
        fail: Some(denied),
        count: Default::default(),
    }));
    let reader = reader_finding(&dynamic, &block(10), damaged);
    let err = reader
        .restore_to_dir(
            &first,
            &scratch.path().join("denied"),
            &RestoreOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(err, cairn_engine::Error::PoolIo { .. }), "{err}");
}

/// Every chunk stored twice (a backup ran while a collection had condemned
/// the first copy's pack, so it stored everything again; the collection
/// then stopped), one block's first copy damaged mid-pack: a copy to
/// another pool from a handle whose index finds the first copies replaces
/// that blob by its intact copy and keeps the blobs before and after it
/// in the same run.
#[test]
fn a_copy_replaces_a_damaged_blob_mid_run_by_its_other_copy() {
    let (_dir, local, pool, image, first, holding) = every_chunk_twice(95);
    let block = block_id(&image[10 * BLOCK..11 * BLOCK]);
    let (damaged, table) = &holding[0];
    flip_copy(&local, &block, damaged, table);

    let source = reader_finding(&pool, &block, damaged);
    let (_target_dir, _, _, target) = local_repo();
    let stats = source
        .copy_to(
            &target,
            &cairn_engine::CopyOptions::default().with_snapshots(vec![first]),
        )
        .unwrap();
    assert!(stats.failed.is_empty(), "{:?}", stats.failed);
    // 40 blocks and the page, moved once each.
    assert_eq!(stats.chunks_copied, 41);
    let scratch = tempfile::tempdir().unwrap();
    assert!(restores(&target, &first, &image, scratch.path()));
    let report = target
        .verify(&VerifyOptions::default().with_read_data(true))
        .unwrap();
    assert!(report.is_ok(), "{report}");

    // The other copy cannot be read: gone or damaged, the snapshot is not
    // copied (the damage named); denied, the copy fails with the pool's
    // error.
    let (intact, table) = &holding[1];
    let at = table.iter().find(|e| e.id == block).unwrap().offset;
    for (case, fail) in [
        ("gone", gone as Failure),
        ("corrupt", corrupt),
        ("denied", denied),
    ] {
        let wrapped: DynPool = Arc::new(cairn_engine::WrappedPool(BlobReads {
            inner: pool.clone(),
            pack: intact.clone(),
            offset: at,
            fail: Some(fail),
            count: Default::default(),
        }));
        let source = reader_finding(&wrapped, &block, damaged);
        let (_target_dir, _, _, target) = local_repo();
        let copied = source.copy_to(
            &target,
            &cairn_engine::CopyOptions::default().with_snapshots(vec![first]),
        );
        match (case, copied) {
            ("gone" | "corrupt", Ok(stats)) => {
                assert_eq!(stats.failed.len(), 1, "{stats:?}");
                assert!(stats.failed[0].1.contains(&block.to_hex()), "{stats:?}");
            }
            ("denied", Err(cairn_engine::Error::PoolIo { .. })) => {}
            (_, other) => panic!("{case}: {other:?}"),
        }
    }
}

/// A collection over pages stored once reads no page beyond its mark's
/// one read each: checking copies is for pages stored more than once.
#[test]
fn a_collection_reads_a_page_stored_once_only_to_mark() {
    let (_dir, local, pool, repo) = local_repo();
    let mut rng = SampleRng::new(80);
    let first = backup_blocks(&repo, "one", &random_blocks(&mut rng, 40).concat());
    backup_blocks(&repo, "two", &random_blocks(&mut rng, 40).concat());
    let page = repo.load_snapshot(&first).unwrap().disks[0].pages[0].id;
    let holding = packs_holding(&local, &page);
    assert_eq!(holding.len(), 1);
    let (pack, table) = &holding[0];
    let wrapped = Arc::new(cairn_engine::WrappedPool(BlobReads {
        inner: pool.clone(),
        pack: pack.clone(),
        offset: table.iter().find(|e| e.id == page).unwrap().offset,
        fail: None,
        count: Default::default(),
    }));
    let dynamic: DynPool = wrapped.clone();
    let report = Repository::open(dynamic)
        .unwrap()
        .gc(&cairn_engine::GcOptions::default())
        .unwrap();
    // Two segments compacted into one: the plan ran.
    assert_eq!((report.segments_before, report.segments_after), (2, 1));
    assert_eq!(report.snapshots, 2, "{report}");
    assert_eq!(wrapped.0.reads(), 1);
    assert_eq!(report.page_copies_damaged, 0);
    assert!(!report.to_string().contains("damaged"), "{report}");
}

/// A new handle on `pool` (another process's view) whose index finds
/// chunk `id` in pack `pack` first. Segments load in no set order, so a
/// few tries find one.
fn reader_finding(pool: &DynPool, id: &ChunkId, pack: &str) -> Repository {
    reader_trying(pool, id, &[pack])
}

/// A new handle on `pool` whose index lists the copies of chunk `id` in
/// the packs `order` first, in that order. This relies on a handle loading
/// the pool's segments in no set order (`Index::refresh` walks a hash
/// set): were it ever sorted, this would fail at once, saying so.
fn reader_trying(pool: &DynPool, id: &ChunkId, order: &[&str]) -> Repository {
    for _ in 0..200 {
        let reader = Repository::open(pool.clone()).unwrap();
        let packs: Vec<String> = reader
            .index()
            .unwrap()
            .locations(id)
            .iter()
            .map(|l| l.pack.to_hex())
            .collect();
        if packs.len() >= order.len() && packs[..order.len()] == *order {
            return reader;
        }
    }
    panic!("no handle listed chunk {id} in packs {order:?} first in 200 tries");
}

/// The packs of the first of two backups deleted: before the index is
/// rebuilt every chunk of it is `pack-missing`, after it `chunk-missing`;
/// each finding names the first snapshot only, at the block's offset.
#[test]
fn lost_packs_are_pack_missing_then_chunk_missing_naming_their_snapshot() {
    let (_dir, local, pool, repo) = local_repo();
    let mut rng = SampleRng::new(11);
    let one = random_blocks(&mut rng, 40).concat();
    let two = random_blocks(&mut rng, 40).concat();
    let s1 = backup_blocks(&repo, "one", &one);
    let first_packs = pool.list(FileKind::Pack).unwrap();
    let s2 = backup_blocks(&repo, "two", &two);
    for p in &first_packs {
        std::fs::remove_file(local.path_of(FileKind::Pack, p).unwrap()).unwrap();
    }
    // The lost packs held the first backup's extent page too: its chunks
    // can no longer be listed, so the findings are the page (a chunk the
    // snapshot references, covering the whole disk) and the snapshot's
    // extents being unreadable — each naming the first snapshot only.
    let page = repo.load_snapshot(&s1).unwrap().disks[0].pages[0];
    assert_eq!(page.length, one.len() as u64);
    for kind in [DamageKind::PackMissing, DamageKind::ChunkMissing] {
        if kind == DamageKind::ChunkMissing {
            repo.repair_index().unwrap();
        }
        let report = repo.verify(&VerifyOptions::default()).unwrap();
        let mut kinds = BTreeSet::new();
        for d in &report.damage {
            assert_eq!(d.snapshots, vec![s1], "{d}");
            kinds.insert(d.kind);
            if d.kind == kind {
                assert_eq!(d.chunk, Some(page.id), "{d}");
                assert_eq!(d.ranges.len(), 1, "{d}");
                assert_eq!((d.ranges[0].offset, d.ranges[0].length), (0, page.length));
            } else {
                assert_eq!(d.kind, DamageKind::ManifestUnreadable, "{d}");
                assert!(d.detail.contains("extent page"), "{d}");
            }
        }
        assert_eq!(
            kinds,
            BTreeSet::from([kind, DamageKind::ManifestUnreadable]),
            "{kind}"
        );
        let fresh = Repository::open(pool.clone()).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        assert!(restores(&fresh, &s2, &two, scratch.path()));
        assert!(!restores(&fresh, &s1, &one, scratch.path()));
    }
}

/// An index segment that puts one chunk at the wrong offset: exactly one
/// `index-mismatch` finding, for that chunk, naming the snapshot.
#[test]
fn an_index_entry_at_the_wrong_offset_is_an_index_mismatch() {
    use cairn_engine::internals::{PackEntry, Segment, SegmentBuilder};
    let (_dir, local, pool, repo) = local_repo();
    let mut rng = SampleRng::new(12);
    let image = random_blocks(&mut rng, 30).concat();
    let snap = backup_blocks(&repo, "vm", &image);
    let victim = block_id(&image[7 * BLOCK..8 * BLOCK]);
    let segments = pool.list(FileKind::Index).unwrap();
    let mut builder = SegmentBuilder::new();
    for name in &segments {
        let seg = Segment::decode(pool.read(FileKind::Index, name).unwrap()).unwrap();
        for (id, loc) in seg.iter() {
            let offset = if id == victim {
                loc.offset + 1
            } else {
                loc.offset
            };
            builder.add_entries(
                loc.pack,
                &[PackEntry {
                    id,
                    offset,
                    length: loc.length,
                    raw_length: 0,
                }],
            );
        }
    }
    builder.write(&*pool).unwrap();
    for name in &segments {
        std::fs::remove_file(local.path_of(FileKind::Index, name).unwrap()).unwrap();
    }
    let repo = Repository::open(pool.clone()).unwrap();
    let report = repo.verify(&VerifyOptions::default()).unwrap();
    assert_eq!(report.damage.len(), 1, "{report}");
    let d = &report.damage[0];
    assert_eq!(d.kind, DamageKind::IndexMismatch);
    assert_eq!(d.chunk, Some(victim));
    assert_eq!(d.snapshots, vec![snap]);
    assert_eq!(
        (d.ranges[0].offset, d.ranges[0].length),
        ((7 * BLOCK) as u64, BLOCK as u64)
    );
}

/// A damaged extent page: verify names the snapshot (the page as a corrupt
/// chunk covering the disk, and the snapshot's extents as unreadable), a
/// restore fails naming the page, and garbage collection stops instead of
/// taking the snapshot's chunks for unreferenced — every pack stays.
#[test]
fn a_damaged_extent_page_is_found_and_stops_garbage_collection() {
    let (_dir, local, pool, repo) = local_repo();
    let mut rng = SampleRng::new(21);
    let image = random_blocks(&mut rng, 40).concat();
    let id = backup_blocks(&repo, "vm", &image);
    let page = repo.load_snapshot(&id).unwrap().disks[0].pages[0];
    flip_blob(&local, &page.id);

    let report = repo
        .verify(&VerifyOptions::default().with_read_data(true))
        .unwrap();
    let kinds: BTreeSet<DamageKind> = report.damage.iter().map(|d| d.kind).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([DamageKind::ChunkCorrupt, DamageKind::ManifestUnreadable]),
        "{:?}",
        report.damage
    );
    for d in &report.damage {
        assert_eq!(d.snapshots, vec![id], "{d}");
        if d.kind == DamageKind::ChunkCorrupt {
            assert_eq!(d.chunk, Some(page.id));
            assert_eq!(
                (d.ranges[0].offset, d.ranges[0].length),
                (0, image.len() as u64)
            );
        }
    }

    let scratch = tempfile::tempdir().unwrap();
    let err = repo
        .restore_to_dir(&id, scratch.path(), &RestoreOptions::default())
        .unwrap_err();
    assert!(err.is_damage(), "{err}");
    assert!(err.to_string().contains(&page.id.to_hex()), "{err}");

    let packs_before: BTreeSet<String> = pool.list(FileKind::Pack).unwrap().into_iter().collect();
    let err = repo.gc(&cairn_engine::GcOptions::default()).unwrap_err();
    assert!(err.is_damage(), "{err}");
    let packs_after: BTreeSet<String> = pool.list(FileKind::Pack).unwrap().into_iter().collect();
    assert_eq!(packs_after, packs_before);
}

/// A pack no index segment covers (its backup stopped before writing one)
/// whose table cannot be read: verify names it `pack-unreadable`, beside
/// the chunks no segment holds.
#[test]
fn an_uncovered_pack_whose_table_cannot_be_read_is_a_finding() {
    let (_dir, local, pool, repo) = local_repo();
    let mut rng = SampleRng::new(44);
    let image = random_blocks(&mut rng, 8).concat();
    backup_blocks(&repo, "vm", &image);
    for name in local.list(FileKind::Index).unwrap() {
        std::fs::remove_file(local.path_of(FileKind::Index, &name).unwrap()).unwrap();
    }
    let packs = local.list(FileKind::Pack).unwrap();
    assert_eq!(packs.len(), 1);
    // Its trailer cut short: the table cannot be found.
    let path = local.path_of(FileKind::Pack, &packs[0]).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len - 8).unwrap();
    drop(file);

    let repo = Repository::open(pool).unwrap();
    let report = repo.verify(&VerifyOptions::default()).unwrap();
    let unreadable: Vec<_> = report
        .damage
        .iter()
        .filter(|d| d.kind == DamageKind::PackUnreadable)
        .collect();
    assert_eq!(unreadable.len(), 1, "{report}");
    assert_eq!(
        unreadable[0].pack.map(|p| p.to_hex()),
        Some(packs[0].clone())
    );
    assert!(report
        .damage
        .iter()
        .any(|d| d.kind == DamageKind::ChunkMissing));
}

/// An uncovered pack whose table cannot be read for an I/O error (not
/// damage) fails the index's load with that error: it is not passed over
/// as unreadable.
#[test]
fn an_uncovered_pack_that_cannot_be_read_fails_the_index_load() {
    let (_dir, local, pool, repo) = local_repo();
    let mut rng = SampleRng::new(45);
    backup_blocks(&repo, "vm", &random_blocks(&mut rng, 4).concat());
    for name in local.list(FileKind::Index).unwrap() {
        std::fs::remove_file(local.path_of(FileKind::Index, &name).unwrap()).unwrap();
    }
    let denied: DynPool = Arc::new(cairn_engine::WrappedPool(FailingReads {
        inner: pool,
        kind: std::io::ErrorKind::PermissionDenied,
    }));
    match Repository::open(denied).and_then(|r| r.index().map(|_| ())) {
        Err(cairn_engine::Error::PoolIo { kind, source, .. }) => {
            assert_eq!(kind, FileKind::Pack);
            assert_eq!(source.kind(), std::io::ErrorKind::PermissionDenied);
        }
        other => panic!("{other:?}"),
    }
}

/// A chunk whose newest index entry names a pack the pool no longer holds
/// (a segment written before a repair moved that pack aside, say) is found
/// where an older segment places it: verify and restore pass the entry
/// over.
#[test]
fn an_entry_in_a_pack_the_pool_no_longer_holds_is_passed_over() {
    let (_dir, local, pool, repo) = local_repo();
    let mut rng = SampleRng::new(45);
    let image = random_blocks(&mut rng, 8).concat();
    let snapshot = backup_blocks(&repo, "vm", &image);
    let packs = local.list(FileKind::Pack).unwrap();
    assert_eq!(packs.len(), 1);
    let table = read_pack_table(&*local, &packs[0].parse().unwrap()).unwrap();
    // Every chunk again, in a pack that is not there. This handle loads
    // that segment last, so its lookups try it first.
    let mut gone = SegmentBuilder::new();
    gone.add_entries(cairn_engine::PackId([0xee; 16]), &table);
    gone.write(&*pool).unwrap();

    let report = repo.verify(&VerifyOptions::default()).unwrap();
    assert!(report.is_ok(), "{report}");
    let scratch = tempfile::tempdir().unwrap();
    assert!(restores(&repo, &snapshot, &image, scratch.path()));
}
