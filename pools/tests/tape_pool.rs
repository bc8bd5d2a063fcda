//! The tape pool over the virtual tape library: the pool conformance suite
//! through its pool face; objects spanning cartridges; the catalog rebuilt
//! by scanning; cartridges of other media sets, blank ones and garbled
//! labels; a write that runs out of tape fails its media set cleanly.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use cairn_engine::{DynPool, Error, FileKind, PoolDelete, PoolList, PoolRead, PoolWrite};
use cairn_pools::tape::{
    MediaSetState, TapeMediaSet, TapePool, VirtualTapeLibrary, VirtualTapeOptions,
};
use cairn_pools::testing::conformance;

/// Cartridges of `capacity` bytes with a 1 MiB early-warning zone.
fn tape_pool(dir: &Path, cartridges: usize, capacity: u64) -> TapePool {
    let mut opts = VirtualTapeOptions::new(cartridges, capacity);
    opts.early_warning = 1 << 20;
    let lib = VirtualTapeLibrary::create(dir.join("library"), &opts).unwrap();
    TapePool::open(dir, Box::new(lib)).unwrap()
}

/// The open media set, where packs, segments and manifests are written.
fn set(pool: &TapePool) -> TapeMediaSet {
    pool.current_set().unwrap()
}

fn reopen(dir: &Path) -> TapePool {
    let lib = VirtualTapeLibrary::open(dir.join("library")).unwrap();
    TapePool::open(dir, Box::new(lib)).unwrap()
}

/// Pseudo-random bytes (xorshift64*): no two 64 KiB blocks alike.
fn data(len: usize, seed: u32) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ ((seed as u64 + 1) << 17);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

const PACK: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn the_tape_pool_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicU32::new(0);
    conformance(&|| {
        let d = dir
            .path()
            .join(n.fetch_add(1, Ordering::SeqCst).to_string());
        Arc::new(set(&tape_pool(&d, 2, 64 << 20))) as DynPool
    });
}

#[test]
fn objects_span_cartridges_and_read_back_whole_and_in_ranges() {
    let dir = tempfile::tempdir().unwrap();
    // 3 MiB before each cartridge's early warning: 10 MiB take four.
    let pool = tape_pool(dir.path(), 5, 4 << 20);
    let big = data(10 << 20, 1);
    set(&pool).write(FileKind::Pack, PACK, &big).unwrap();
    let parts = pool.object_position(FileKind::Pack, PACK).unwrap();
    let carts: Vec<&str> = parts.iter().map(|(b, _)| b.as_str()).collect();
    let four = vec!["CRN001L9", "CRN002L9", "CRN003L9", "CRN004L9"];
    assert_eq!(carts, four, "{parts:?}");
    // Every part is the first object on its cartridge (file 1, after the label).
    assert!(parts.iter().all(|(_, f)| *f == 1), "{parts:?}");
    let sets = pool.media_sets();
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0].cartridges, four);
    assert_eq!(sets[0].state, MediaSetState::Open);
    assert!(pool.read(FileKind::Pack, PACK).unwrap()[..] == big[..]);
    // A range across the first cartridge boundary (at 3 MiB).
    let at = 5 << 19;
    let got = pool.read_range(FileKind::Pack, PACK, at, 2 << 20).unwrap();
    assert!(got[..] == big[at as usize..(at as usize) + (2 << 20)]);
    // A second object continues on the fourth cartridge.
    let small = data(100_000, 2);
    let name2 = "fedcba9876543210fedcba9876543210";
    set(&pool).write(FileKind::Pack, name2, &small).unwrap();
    assert_eq!(
        pool.object_position(FileKind::Pack, name2).unwrap(),
        vec![("CRN004L9".to_string(), 2)]
    );
    // Opened again (a new process): the catalog and media state hold.
    drop(pool);
    let pool = reopen(dir.path());
    assert!(pool.read(FileKind::Pack, PACK).unwrap()[..] == big[..]);
    assert!(pool.read(FileKind::Pack, name2).unwrap()[..] == small[..]);
    let mut listed = pool.list(FileKind::Pack).unwrap();
    listed.sort();
    assert_eq!(listed, vec![PACK.to_string(), name2.to_string()]);
    // A second process cannot open it meanwhile.
    let lib = VirtualTapeLibrary::open(dir.path().join("library")).unwrap();
    assert!(matches!(
        TapePool::open(dir.path(), Box::new(lib)),
        Err(Error::PoolBusy(_))
    ));
}

#[test]
fn the_catalog_is_rebuilt_by_scanning_the_cartridges() {
    let dir = tempfile::tempdir().unwrap();
    let pool = tape_pool(dir.path(), 4, 4 << 20);
    let big = data(6 << 20, 3);
    set(&pool).write(FileKind::Pack, PACK, &big).unwrap();
    pool.write(FileKind::Config, "config", b"the config")
        .unwrap();
    set(&pool)
        .write(FileKind::Snapshot, "aa".repeat(32).as_str(), b"a manifest")
        .unwrap();
    pool.write(FileKind::Lease, "lease-1", b"local only")
        .unwrap();
    // An object whose write was never committed leaves nothing.
    let w = set(&pool)
        .create(FileKind::Pack, "11".repeat(16).as_str())
        .unwrap();
    drop(w);
    drop(pool);
    // Catalog, media state and the local copies lost.
    for f in ["tape-catalog", "media.json"] {
        std::fs::remove_file(dir.path().join(f)).unwrap();
    }
    std::fs::remove_dir_all(dir.path().join("pool")).unwrap();
    let pool = reopen(dir.path());
    assert!(pool.read(FileKind::Pack, PACK).unwrap_err().is_not_found());
    let report = pool.rebuild_catalog().unwrap();
    assert_eq!(report.objects, 3, "{report:?}");
    assert!(report.skipped.is_empty(), "{report:?}");
    assert!(pool.read(FileKind::Pack, PACK).unwrap()[..] == big[..]);
    assert_eq!(
        &pool.read(FileKind::Config, "config").unwrap()[..],
        b"the config"
    );
    assert_eq!(
        pool.list(FileKind::Snapshot).unwrap(),
        vec!["aa".repeat(32)]
    );
    assert!(pool.list(FileKind::Lease).unwrap().is_empty());
    // Writing goes on, on a new media set (the old one is closed).
    set(&pool)
        .write(FileKind::Pack, "22".repeat(16).as_str(), b"after")
        .unwrap();
    let sets = pool.media_sets();
    assert_eq!(sets.len(), 2, "{sets:?}");
    assert_eq!(sets[0].state, MediaSetState::Incomplete);
    assert_eq!(sets[1].state, MediaSetState::Open);
}

#[test]
fn foreign_blank_and_garbled_cartridges_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let pool = tape_pool(dir.path(), 3, 4 << 20);
    set(&pool)
        .write(FileKind::Pack, PACK, &data(1 << 20, 4))
        .unwrap();
    drop(pool);
    let cartridge = dir.path().join("library/cartridges/CRN001L9");
    let original = std::fs::read(&cartridge).unwrap();

    // Another pool's cartridge in its place: refused, named.
    let other = tempfile::tempdir().unwrap();
    let pool2 = tape_pool(other.path(), 1, 4 << 20);
    set(&pool2)
        .write(FileKind::Pack, PACK, b"other pool")
        .unwrap();
    drop(pool2);
    let foreign = std::fs::read(other.path().join("library/cartridges/CRN001L9")).unwrap();
    std::fs::write(&cartridge, &foreign).unwrap();
    let pool = reopen(dir.path());
    let e = pool.read(FileKind::Pack, PACK).unwrap_err();
    assert!(
        e.to_string().contains("CRN001L9") && e.to_string().contains("media set"),
        "{e}"
    );
    drop(pool);
    // Blank: the object cannot be found where the catalog says.
    std::fs::write(&cartridge, b"").unwrap();
    let pool = reopen(dir.path());
    let e = pool.read(FileKind::Pack, PACK).unwrap_err();
    assert!(e.to_string().contains("CRN001L9"), "{e}");
    drop(pool);
    // A garbled label.
    let mut garbled = original.clone();
    garbled[8] ^= 0x55;
    std::fs::write(&cartridge, &garbled).unwrap();
    let pool = reopen(dir.path());
    let e = pool.read(FileKind::Pack, PACK).unwrap_err();
    assert!(e.is_damage() && e.to_string().contains("CRN001L9"), "{e}");
    drop(pool);
    // Restored, it reads again; new writes never touch a labelled cartridge
    // that is not the pool's (CRN002L9 is labelled by hand here).
    std::fs::write(&cartridge, &original).unwrap();
    std::fs::write(dir.path().join("library/cartridges/CRN002L9"), &foreign).unwrap();
    let pool = reopen(dir.path());
    assert_eq!(pool.read(FileKind::Pack, PACK).unwrap().len(), 1 << 20);
    let big = data(4 << 20, 5);
    set(&pool)
        .write(FileKind::Pack, "33".repeat(16).as_str(), &big)
        .unwrap();
    let parts = pool
        .object_position(FileKind::Pack, &"33".repeat(16))
        .unwrap();
    assert!(parts.iter().all(|(b, _)| b != "CRN002L9"), "{parts:?}");
    assert_eq!(
        std::fs::read(dir.path().join("library/cartridges/CRN002L9")).unwrap(),
        foreign
    );
}

#[test]
fn a_cartridge_that_ends_early_fails_its_set_and_earlier_objects_stay() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = VirtualTapeOptions::new(3, 2 << 20);
    // No early-warning zone: the write runs into the end of the medium.
    opts.early_warning = 0;
    let lib = VirtualTapeLibrary::create(dir.path().join("library"), &opts).unwrap();
    let pool = TapePool::open(dir.path(), Box::new(lib)).unwrap();
    let first = data(1 << 20, 6);
    set(&pool).write(FileKind::Pack, PACK, &first).unwrap();
    let e = set(&pool)
        .write(FileKind::Pack, &"44".repeat(16), &data(3 << 20, 7))
        .unwrap_err();
    assert!(e.to_string().contains("end of medium"), "{e}");
    assert!(pool
        .read(FileKind::Pack, &"44".repeat(16))
        .unwrap_err()
        .is_not_found());
    let sets = pool.media_sets();
    assert_eq!(
        sets[0].state,
        MediaSetState::Incomplete,
        "the set is marked incomplete: {sets:?}"
    );
    assert!(pool.read(FileKind::Pack, PACK).unwrap()[..] == first[..]);
    // The next object goes to a new set on a blank cartridge.
    set(&pool)
        .write(FileKind::Pack, &"55".repeat(16), b"next")
        .unwrap();
    let sets = pool.media_sets();
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[1].cartridges, vec!["CRN002L9"]);
    pool.delete(FileKind::Pack, PACK).unwrap();
    assert!(pool.read(FileKind::Pack, PACK).unwrap_err().is_not_found());
}

/// A restore of a snapshot whose chunks lie in packs on several cartridges
/// (written by a full backup and two incrementals that changed scattered
/// blocks) reads in medium order: each cartridge loaded once, the drive
/// never moving backwards.
#[test]
fn a_restore_from_tape_passes_each_cartridge_once() {
    use cairn_engine::{BackupDisk, BackupOptions, Compression, MemorySource, Repository};
    use cairn_engine::{RestoreOptions, SnapshotId};

    let dir = tempfile::tempdir().unwrap();
    let mut opts = VirtualTapeOptions::new(10, 4 << 20);
    opts.early_warning = 1 << 20;
    let lib = VirtualTapeLibrary::create(dir.path().join("library"), &opts).unwrap();
    let tape = TapePool::open(dir.path(), Box::new(lib.clone())).unwrap();
    let pool: DynPool = Arc::new(tape.clone());
    let repo = Repository::create(pool.clone()).unwrap();
    let writer = Repository::open(Arc::new(set(&tape))).unwrap();
    let mut backup_opts = BackupOptions::new("web").with_compression(Compression::None);
    backup_opts.pack_target = 1 << 20;
    let block = 64 << 10;
    let mut image = data(8 << 20, 10);
    let backup = |image: &[u8]| -> SnapshotId {
        let disk = BackupDisk::image("vda", MemorySource::new("vda", image.to_vec()));
        writer.backup(vec![disk], &backup_opts).unwrap().snapshot
    };
    backup(&image);
    for (round, step) in [(1u32, 4usize), (2, 5)] {
        for b in (round as usize..128).step_by(step) {
            let fresh = data(block, 100 * round + b as u32);
            image[b * block..(b + 1) * block].copy_from_slice(&fresh);
        }
        backup(&image);
    }
    let latest: SnapshotId = repo.snapshots().unwrap().snapshots.last().unwrap().id;
    let before = lib.counters(0).unwrap();
    let out = tempfile::tempdir().unwrap();
    repo.restore_to_dir(&latest, out.path(), &RestoreOptions::default())
        .unwrap();
    assert!(std::fs::read(out.path().join("vda")).unwrap() == image);
    let after = lib.counters(0).unwrap();
    let used: std::collections::BTreeSet<String> = pool
        .list(FileKind::Pack)
        .unwrap()
        .iter()
        .filter_map(|p| tape.object_position(FileKind::Pack, p))
        .flatten()
        .map(|(b, _)| b)
        .collect();
    let loads = after.loads - before.loads;
    assert!(
        loads as usize <= used.len(),
        "{loads} loads for {} cartridges: {before:?} → {after:?}",
        used.len()
    );
    // Every load rewinds twice (the unload of the cartridge before, and
    // the label check); one more when the first cartridge needed was in
    // the drive already. Any other rewind would be a move backwards.
    let rewinds = after.rewinds - before.rewinds;
    assert!(
        rewinds <= 2 * loads + 1,
        "{rewinds} rewinds for {loads} loads: {after:?}"
    );
    assert_eq!(after.backward_moves, before.backward_moves, "{after:?}");
    assert!(used.len() >= 3, "the packs lie on {used:?}");

    // A copy to another pool reads each snapshot's missing chunks in
    // medium order too (snapshot by snapshot, oldest first: at most one
    // pass per cartridge per snapshot).
    let target = Repository::create(Arc::new(cairn_pools::MemoryPool::new())).unwrap();
    let before = lib.counters(0).unwrap();
    let stats = repo
        .copy_to(&target, &cairn_engine::CopyOptions::default())
        .unwrap();
    assert_eq!(stats.copied.len(), 3);
    let after = lib.counters(0).unwrap();
    let loads = after.loads - before.loads;
    assert!(
        loads as usize <= used.len() + 2,
        "{loads} loads for {} cartridges and 3 snapshots: {before:?} → {after:?}",
        used.len()
    );
    // Snapshot by snapshot: at most one rewind to go back per snapshot.
    let rewinds = after.rewinds - before.rewinds;
    assert!(
        rewinds <= 2 * loads + 3,
        "{rewinds} rewinds for {loads} loads: {after:?}"
    );
    assert_eq!(after.backward_moves, before.backward_moves, "{after:?}");
    let out2 = tempfile::tempdir().unwrap();
    target
        .restore_to_dir(&latest, out2.path(), &RestoreOptions::default())
        .unwrap();
    assert!(std::fs::read(out2.path().join("vda")).unwrap() == image);
}

/// A rebuild keeps the last complete copy of an object written twice,
/// reports cartridges of another pool and garbled labels instead of taking
/// them in, and refuses to guess between two pools when it has no media
/// state.
#[test]
fn a_rebuild_takes_only_this_pools_cartridges_and_whole_writes() {
    let dir = tempfile::tempdir().unwrap();
    let pool = tape_pool(dir.path(), 5, 4 << 20);
    let snap = "cd".repeat(32);
    set(&pool)
        .write(FileKind::Snapshot, &snap, b"manifest")
        .unwrap();
    // Withdrawn and written again (a copy that lost its lease, re-run).
    pool.delete(FileKind::Snapshot, &snap).unwrap();
    set(&pool)
        .write(FileKind::Snapshot, &snap, b"manifest")
        .unwrap();
    let big = data(4 << 20, 20);
    set(&pool).write(FileKind::Pack, PACK, &big).unwrap();
    drop(pool);
    // Another pool's cartridge and a garbled label in this library.
    let other = tempfile::tempdir().unwrap();
    let pool2 = tape_pool(other.path(), 1, 4 << 20);
    set(&pool2).write(FileKind::Pack, PACK, b"other").unwrap();
    drop(pool2);
    let carts = dir.path().join("library/cartridges");
    // (its label renamed to the slot's barcode, as if it were that cartridge)
    let mut foreign = std::fs::read(other.path().join("library/cartridges/CRN001L9")).unwrap();
    let at = foreign.windows(8).position(|w| w == b"CRN001L9").unwrap();
    foreign[at..at + 8].copy_from_slice(b"CRN004L9");
    std::fs::write(carts.join("CRN004L9"), &foreign).unwrap();
    std::fs::write(carts.join("CRN005L9"), b"B\x05\x00\x00\x00Lxxxx").unwrap();

    let pool = reopen(dir.path());
    let report = pool.rebuild_catalog().unwrap();
    assert_eq!(report.objects, 2, "{report:?}");
    let mut skipped: Vec<&str> = report.skipped.iter().map(|(b, _)| b.as_str()).collect();
    skipped.sort();
    assert_eq!(skipped, vec!["CRN004L9", "CRN005L9"], "{report:?}");
    assert_eq!(
        &pool.read(FileKind::Snapshot, &snap).unwrap()[..],
        b"manifest"
    );
    assert!(pool.read(FileKind::Pack, PACK).unwrap()[..] == big[..]);
    drop(pool);

    // Without media.json the pool's id comes from the labels: with two
    // pools' cartridges in the library, the rebuild refuses to guess.
    std::fs::remove_file(dir.path().join("media.json")).unwrap();
    let pool = reopen(dir.path());
    let e = pool.rebuild_catalog().unwrap_err();
    assert!(e.to_string().contains("2 tape pools"), "{e}");
    // With only its own, it proceeds.
    std::fs::remove_file(carts.join("CRN004L9")).unwrap();
    std::fs::write(carts.join("CRN004L9"), b"").unwrap();
    let report = pool.rebuild_catalog().unwrap();
    assert_eq!(report.objects, 2, "{report:?}");
    assert!(pool.read(FileKind::Pack, PACK).unwrap()[..] == big[..]);
}

/// Objects of every length around the block and cartridge boundaries
/// read back: empty, one byte, a block exactly, a block and one byte, and
/// one that ends just where the early-warning zone begins.
#[test]
fn objects_of_awkward_lengths_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let pool = tape_pool(dir.path(), 6, 4 << 20);
    let block = cairn_pools::tape::DATA_BLOCK;
    for (i, len) in [0usize, 1, block, block + 1, 3 << 20, (3 << 20) + 7]
        .into_iter()
        .enumerate()
    {
        let name = format!("{i:032x}");
        let bytes = data(len, i as u32);
        set(&pool).write(FileKind::Pack, &name, &bytes).unwrap();
        assert_eq!(pool.size(FileKind::Pack, &name).unwrap(), len as u64);
        assert!(
            pool.read(FileKind::Pack, &name).unwrap()[..] == bytes[..],
            "{len}"
        );
    }
    drop(pool);
    let pool = reopen(dir.path());
    std::fs::remove_file(dir.path().join("tape-catalog")).unwrap();
    drop(pool);
    let pool = reopen(dir.path());
    assert_eq!(pool.rebuild_catalog().unwrap().objects, 6);
    for (i, len) in [0usize, 1, block, block + 1, 3 << 20, (3 << 20) + 7]
        .into_iter()
        .enumerate()
    {
        let name = format!("{i:032x}");
        assert!(pool.read(FileKind::Pack, &name).unwrap()[..] == data(len, i as u32)[..]);
    }
}

/// The medium-order restore with two disks, one made of a single repeated
/// chunk (one blob written to many places) and one of distinct chunks.
#[test]
fn a_medium_order_restore_places_repeated_chunks_and_several_disks() {
    use cairn_engine::{BackupDisk, BackupOptions, MemorySource, Repository, RestoreOptions};

    let dir = tempfile::tempdir().unwrap();
    let tape = tape_pool(dir.path(), 4, 16 << 20);
    let repo = Repository::create(Arc::new(tape.clone()) as DynPool).unwrap();
    let writer = Repository::open(Arc::new(set(&tape))).unwrap();
    let block = data(64 << 10, 30);
    let repeated: Vec<u8> = block
        .iter()
        .copied()
        .cycle()
        .take(300 * block.len())
        .collect();
    let distinct = data(5 << 20, 31);
    let disks = vec![
        BackupDisk::image("a", MemorySource::new("a", repeated.clone())),
        BackupDisk::image("b", MemorySource::new("b", distinct.clone())),
    ];
    let id = writer
        .backup(disks, &BackupOptions::new("web"))
        .unwrap()
        .snapshot;
    let out = tempfile::tempdir().unwrap();
    let stats = repo
        .restore_to_dir(&id, out.path(), &RestoreOptions::default())
        .unwrap();
    assert_eq!(stats.chunks, 300 + 80);
    assert!(std::fs::read(out.path().join("a")).unwrap() == repeated);
    assert!(std::fs::read(out.path().join("b")).unwrap() == distinct);
}

/// Backups into two media sets: the second writes every chunk again (no
/// dedup across sets), its packs lie on its own cartridges, and it
/// restores — configuration included — with the first set's cartridges
/// blanked and everything local lost.
#[test]
fn each_media_set_restores_on_its_own() {
    use cairn_engine::{BackupDisk, BackupOptions, MemorySource, Repository, RestoreOptions};

    let dir = tempfile::tempdir().unwrap();
    let tape = tape_pool(dir.path(), 6, 8 << 20);
    Repository::create(Arc::new(tape.clone()) as DynPool).unwrap();
    let image = data(4 << 20, 40);
    let backup = |face: &TapeMediaSet| {
        let repo = Repository::open(Arc::new(face.clone())).unwrap();
        let disk = BackupDisk::image("vda", MemorySource::new("vda", image.clone()));
        repo.backup(vec![disk], &BackupOptions::new("web")).unwrap()
    };
    let first = set(&tape);
    let a = backup(&first);
    assert_eq!(set(&tape).id(), first.id(), "the open set stays open");
    assert_eq!(
        tape.close_current_set().unwrap().as_deref(),
        Some(first.id())
    );
    let second = set(&tape);
    assert_ne!(second.id(), first.id());
    let b = backup(&second);
    assert!(a.chunks_new > 0);
    assert_eq!(b.chunks_new, a.chunks_new, "every chunk written again");
    let packs = |face: &TapeMediaSet| -> std::collections::BTreeSet<String> {
        face.list(FileKind::Pack).unwrap().into_iter().collect()
    };
    assert!(packs(&first).is_disjoint(&packs(&second)));
    let sets = tape.media_sets();
    assert_eq!(sets.len(), 2);
    assert_eq!(
        (sets[0].state, sets[1].state),
        (MediaSetState::Closed, MediaSetState::Open)
    );
    assert_eq!(sets[0].snapshots, vec![a.snapshot.to_hex()]);
    assert_eq!(sets[1].snapshots, vec![b.snapshot.to_hex()]);
    assert!(sets[0]
        .cartridges
        .iter()
        .all(|c| !sets[1].cartridges.contains(c)));
    // Only the second set's cartridges are left, and nothing local.
    let first_carts = sets[0].cartridges.clone();
    drop((first, second, tape));
    for c in &first_carts {
        std::fs::write(dir.path().join("library/cartridges").join(c), b"").unwrap();
    }
    std::fs::remove_file(dir.path().join("tape-catalog")).unwrap();
    std::fs::remove_dir_all(dir.path().join("pool")).unwrap();
    let tape = reopen(dir.path());
    tape.rebuild_catalog().unwrap();
    let repo = Repository::open(Arc::new(tape.clone()) as DynPool).unwrap();
    let listed: Vec<_> = repo
        .snapshots()
        .unwrap()
        .snapshots
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed, vec![b.snapshot]);
    let out = tempfile::tempdir().unwrap();
    repo.restore_to_dir(&b.snapshot, out.path(), &RestoreOptions::default())
        .unwrap();
    assert!(std::fs::read(out.path().join("vda")).unwrap() == image);
}

/// Retiring a media set drops its copies (an object with a copy in
/// another set stays), refuses the open set, and its cartridge is
/// relabelled by the next set that needs one; a rebuild skips cartridges
/// of retired sets.
#[test]
fn a_retired_media_set_goes_whole_and_its_cartridges_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let pool = tape_pool(dir.path(), 4, 4 << 20);
    let (p1, p2, p3) = ("a1".repeat(16), "a2".repeat(16), "a3".repeat(16));
    let (s1, s2, shared) = ("51".repeat(32), "52".repeat(32), "5f".repeat(32));
    let one = set(&pool);
    one.write(FileKind::Pack, &p1, &data(2 << 20, 50)).unwrap();
    one.write(FileKind::Snapshot, &s1, b"one").unwrap();
    one.write(FileKind::Snapshot, &shared, b"both").unwrap();
    pool.close_current_set().unwrap();
    let two = set(&pool);
    two.write(FileKind::Pack, &p2, &data(1 << 20, 51)).unwrap();
    two.write(FileKind::Snapshot, &shared, b"both").unwrap();
    two.write(FileKind::Snapshot, &s2, b"two").unwrap();
    // Listed once in the whole pool, once in each set.
    let mut listed = pool.list(FileKind::Snapshot).unwrap();
    listed.sort();
    assert_eq!(listed, vec![s1.clone(), s2.clone(), shared.clone()]);
    assert_eq!(two.list(FileKind::Pack).unwrap(), vec![p2.clone()]);

    let e = pool.retire_set(two.id()).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("close"),
        "{e}"
    );
    let report = pool.retire_set(one.id()).unwrap();
    assert_eq!(report.objects, 3, "{report:?}");
    assert_eq!(report.bytes, (2 << 20) + 3 + 4);
    assert_eq!(report.cartridges, vec!["CRN001L9"]);
    let e = pool.retire_set(one.id()).unwrap_err();
    assert!(e.to_string().contains("retired already"), "{e}");
    let mut listed = pool.list(FileKind::Snapshot).unwrap();
    listed.sort();
    assert_eq!(listed, vec![s2.clone(), shared.clone()]);
    assert_eq!(
        &pool.read(FileKind::Snapshot, &shared).unwrap()[..],
        b"both"
    );
    assert!(pool.read(FileKind::Pack, &p1).unwrap_err().is_not_found());
    assert!(pool
        .read(FileKind::Snapshot, &s1)
        .unwrap_err()
        .is_not_found());
    // A write to the retired set's face fails; it never lands elsewhere.
    let e = one.write(FileKind::Pack, &p3, b"late").unwrap_err();
    assert!(matches!(e, Error::PoolBusy(_)), "{e}");
    assert!(pool.read(FileKind::Pack, &p3).unwrap_err().is_not_found());

    // The next set takes the scratch cartridge first (relabelling it).
    pool.close_current_set().unwrap();
    let three = set(&pool);
    three
        .write(FileKind::Pack, &p3, &data(1 << 20, 52))
        .unwrap();
    assert_eq!(
        pool.object_position(FileKind::Pack, &p3).unwrap(),
        vec![("CRN001L9".to_string(), 1)]
    );
    let sets = pool.media_sets();
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[1].cartridges, vec!["CRN001L9"]);
    // Retire the second set too; a rebuild then skips its cartridge and
    // finds the first set's objects nowhere (overwritten by the label).
    pool.retire_set(two.id()).unwrap();
    drop((one, two, three, pool));
    std::fs::remove_file(dir.path().join("tape-catalog")).unwrap();
    let pool = reopen(dir.path());
    let report = pool.rebuild_catalog().unwrap();
    assert_eq!(report.objects, 1, "{report:?}");
    assert_eq!(report.skipped.len(), 1, "{report:?}");
    assert_eq!(report.skipped[0].0, "CRN002L9");
    assert!(report.skipped[0].1.contains("retired"), "{report:?}");
    assert_eq!(pool.list(FileKind::Pack).unwrap(), vec![p3.clone()]);
    assert!(pool.list(FileKind::Snapshot).unwrap().is_empty());
    assert!(pool.read(FileKind::Pack, &p3).unwrap()[..] == data(1 << 20, 52)[..]);
}

/// A set older than the rotation period is closed by the next write;
/// out-of-range periods are refused; a catalog without media-set names
/// (the earlier format) is rewritten with them.
#[test]
fn media_sets_rotate_by_age_and_old_catalogs_are_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let pool = tape_pool(dir.path(), 3, 4 << 20);
    assert!(matches!(
        pool.set_rotation_days(3651),
        Err(Error::InvalidArgument(_))
    ));
    pool.set_rotation_days(7).unwrap();
    let first = set(&pool);
    first.write(FileKind::Pack, PACK, b"first week").unwrap();
    assert_eq!(set(&pool).id(), first.id());
    drop((first, pool));
    // Eight days later (the set's start moved back).
    let path = dir.path().join("media.json");
    let mut media: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let created = media["sets"][0]["created"].as_u64().unwrap();
    assert!(created > 0);
    media["sets"][0]["created"] = (created - 8 * 86_400).into();
    std::fs::write(&path, serde_json::to_vec(&media).unwrap()).unwrap();
    // And the catalog as the earlier format wrote it.
    let catalog = dir.path().join("tape-catalog");
    let old: String = std::fs::read_to_string(&catalog)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["add"]
                .as_object_mut()
                .unwrap()
                .remove("media_set")
                .unwrap();
            format!("{v}\n")
        })
        .collect();
    std::fs::write(&catalog, &old).unwrap();
    let pool = reopen(dir.path());
    assert!(std::fs::read_to_string(&catalog)
        .unwrap()
        .contains("media_set"));
    assert_eq!(pool.rotation_days(), 7);
    let second = set(&pool);
    let sets = pool.media_sets();
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[0].state, MediaSetState::Closed);
    assert_ne!(second.id(), sets[0].id);
    assert_eq!(second.list(FileKind::Pack).unwrap(), Vec::<String>::new());
    assert_eq!(&pool.read(FileKind::Pack, PACK).unwrap()[..], b"first week");
}

/// The pool's local files are checked when it opens: `media.json` of
/// another version or with a rotation out of range, and a catalog line
/// naming a kind of object this build does not know, are damage errors
/// naming the file (and the line), not values taken or lines skipped.
#[test]
fn local_files_out_of_range_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let pool = tape_pool(dir.path(), 2, 4 << 20);
    set(&pool).write(FileKind::Pack, PACK, b"kept").unwrap();
    drop(pool);
    let open = |dir: &Path| {
        let lib = VirtualTapeLibrary::open(dir.join("library")).unwrap();
        TapePool::open(dir, Box::new(lib))
    };
    let media_path = dir.path().join("media.json");
    let good_media = std::fs::read(&media_path).unwrap();
    for (field, value, named) in [
        ("version", 2u64, "version 2"),
        ("rotation_days", 3651, "rotation_days 3651"),
    ] {
        let mut media: serde_json::Value = serde_json::from_slice(&good_media).unwrap();
        media[field] = value.into();
        std::fs::write(&media_path, serde_json::to_vec(&media).unwrap()).unwrap();
        let Err(e) = open(dir.path()) else {
            panic!("{field}: not refused")
        };
        let text = e.to_string();
        assert!(e.is_damage(), "{field}: {text}");
        assert!(
            text.contains("media.json") && text.contains(named),
            "{text}"
        );
    }
    let mut media: serde_json::Value = serde_json::from_slice(&good_media).unwrap();
    media["rotation_days"] = 3650.into();
    std::fs::write(&media_path, serde_json::to_vec(&media).unwrap()).unwrap();
    assert_eq!(open(dir.path()).unwrap().rotation_days(), 3650);

    let catalog = dir.path().join("tape-catalog");
    let good_catalog = std::fs::read_to_string(&catalog).unwrap();
    let mut line: serde_json::Value =
        serde_json::from_str(good_catalog.lines().next().unwrap()).unwrap();
    line["add"]["kind"] = "holograms".into();
    std::fs::write(&catalog, format!("{good_catalog}{line}\n")).unwrap();
    let Err(e) = open(dir.path()) else {
        panic!("an unknown kind was not refused")
    };
    let text = e.to_string();
    assert!(e.is_damage(), "{text}");
    let n = good_catalog.lines().count() + 1;
    assert!(
        text.contains(&format!("line {n}")) && text.contains("holograms"),
        "{text}"
    );
    std::fs::write(&catalog, &good_catalog).unwrap();
    assert_eq!(
        &open(dir.path())
            .unwrap()
            .read(FileKind::Pack, PACK)
            .unwrap()[..],
        b"kept"
    );
}
