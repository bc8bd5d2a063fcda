//! Disks of one VM read at the same time (`BackupOptions::parallel_disks`,
//! a job's `limits.disks_per_vm`): the snapshot is the one a sequential
//! backup writes (same extents, same chunk ids, disks in the given order),
//! chunks shared by two disks are stored once, the disks are really read
//! concurrently, and a failing disk fails the backup without a snapshot.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cairn_engine::sample::SampleRng;
use cairn_engine::{
    BackupDisk, BackupOptions, DiskSource, Error, FileKind, MemorySource, PoolList, Repository,
    RestoreOptions,
};

/// A memory disk whose reads are counted while they run (each one lasts a
/// few milliseconds, as a network read does), so a test can see how many
/// disks were being read at once.
struct Watched {
    inner: MemorySource,
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    fail_at: Option<u64>,
}

impl DiskSource for Watched {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn data_extents(&self) -> cairn_engine::Result<Vec<Range<u64>>> {
        self.inner.data_extents()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> cairn_engine::Result<()> {
        if self.fail_at.is_some_and(|at| offset >= at) {
            return Err(Error::io(
                "reading the watched disk",
                std::io::Error::other("the disk broke"),
            ));
        }
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(3));
        let r = self.inner.read_at(offset, buf);
        self.running.fetch_sub(1, Ordering::SeqCst);
        r
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; len];
    SampleRng::new(seed).fill(&mut b);
    b
}

/// Four disks: two equal (their chunks dedup), one with a hole, one small.
fn images() -> Vec<(String, Vec<u8>)> {
    let mut holed = bytes(3 << 20, 2);
    holed[1 << 20..2 << 20].fill(0);
    vec![
        ("vda".into(), bytes(2 << 20, 1)),
        ("vdb".into(), holed),
        ("vdc".into(), bytes(2 << 20, 1)),
        ("vdd".into(), bytes(300 << 10, 4)),
    ]
}

fn backup(
    repo: &Repository,
    parallel: usize,
    fail: Option<&str>,
) -> (cairn_engine::Result<cairn_engine::BackupStats>, usize) {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let disks = images()
        .into_iter()
        .map(|(name, data)| {
            let source = Watched {
                inner: MemorySource::new(&name, data),
                running: running.clone(),
                peak: peak.clone(),
                fail_at: (fail == Some(name.as_str())).then_some(1 << 20),
            };
            BackupDisk::image(name, source)
        })
        .collect();
    let mut opts = BackupOptions::new("vm").with_parallel_disks(parallel);
    opts.batch_size = 256 << 10;
    let stats = repo.backup(disks, &opts);
    (stats, peak.load(Ordering::SeqCst))
}

#[test]
fn parallel_disks_write_the_sequential_snapshot_and_read_at_once() {
    let seq_repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new())).unwrap();
    let (seq, seq_peak) = backup(&seq_repo, 1, None);
    let seq = seq.unwrap();
    assert_eq!(seq_peak, 1, "one disk after another");

    let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new())).unwrap();
    let (par, peak) = backup(&repo, 3, None);
    let par = par.unwrap();
    assert!(peak >= 2, "disks read at once: peak {peak}");
    assert!(peak <= 3, "never more than 3 disks at once: peak {peak}");
    // The same counts, the same extents and ids, in the disks' order.
    for (a, b) in [
        (seq.bytes_read, par.bytes_read),
        (seq.chunks_total, par.chunks_total),
        (seq.chunks_new, par.chunks_new),
        (seq.bytes_new_raw, par.bytes_new_raw),
        (seq.bytes_logical, par.bytes_logical),
    ] {
        assert_eq!(a, b, "{seq:?}\n{par:?}");
    }
    // vdc equals vda: its 32 chunks are not new.
    assert_eq!(par.chunks_new, par.chunks_total - 32, "{par:?}");
    let s = seq_repo.load_snapshot_with_extents(&seq.snapshot).unwrap();
    let p = repo.load_snapshot_with_extents(&par.snapshot).unwrap();
    assert_eq!(
        s.disks.iter().map(|d| &d.name).collect::<Vec<_>>(),
        ["vda", "vdb", "vdc", "vdd"]
    );
    for (a, b) in s.disks.iter().zip(&p.disks) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.size, b.size);
        assert!(a.extents == b.extents, "disk {}", a.name);
    }
    // Restores bit-identical, every chunk found in the index.
    let dir = tempfile::tempdir().unwrap();
    let reopened = Repository::open(repo.pool().clone()).unwrap();
    reopened
        .restore_to_dir(&par.snapshot, dir.path(), &RestoreOptions::default())
        .unwrap();
    for (name, data) in images() {
        assert!(
            std::fs::read(dir.path().join(&name)).unwrap() == data,
            "{name}"
        );
    }
    assert!(reopened.verify(&Default::default()).unwrap().is_ok());
    // The lanes' index entries merged into one segment, which covers
    // every pack written: a fresh open reads no pack table.
    let index = reopened.index().unwrap();
    assert!(index.uncovered_packs().is_empty());
    let (segments, _) = index.segments();
    assert_eq!(segments.len(), 1);
    // Its entries: the new chunks and the manifest's extent pages (vda's
    // and vdc's are the same page).
    let pages: std::collections::HashSet<_> = repo
        .load_snapshot(&par.snapshot)
        .unwrap()
        .disks
        .iter()
        .flat_map(|d| d.pages.iter().map(|p| p.id))
        .collect();
    assert_eq!(pages.len(), 3);
    assert_eq!(segments[0].len() as u64, par.chunks_new + 3);
    // (Listings come in no set order: compared as sets.)
    let list_packs = || -> std::collections::BTreeSet<String> {
        repo.pool()
            .list(FileKind::Pack)
            .unwrap()
            .into_iter()
            .collect()
    };
    let packs = list_packs();
    assert_eq!(segments[0].packs().len(), packs.len());
    // Nothing new, nothing written: no pack, no empty segment.
    let (again, _) = backup(&reopened, 3, None);
    assert_eq!(again.unwrap().chunks_new, 0);
    assert_eq!(list_packs(), packs);
    assert_eq!(repo.pool().list(FileKind::Index).unwrap().len(), 1);
}

#[test]
fn a_failing_disk_stops_the_parallel_backup_without_a_snapshot() {
    let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new())).unwrap();
    let (result, _) = backup(&repo, 2, Some("vdb"));
    let err = result.unwrap_err();
    assert!(err.to_string().contains("the disk broke"), "{err}");
    assert!(repo.snapshot_ids().unwrap().is_empty());
    // Out of range.
    let opts = BackupOptions::new("vm").with_parallel_disks(0);
    let disk = BackupDisk::image("vda", MemorySource::new("vda", vec![1u8; 4096]));
    let err = repo.backup(vec![disk], &opts).unwrap_err();
    assert!(
        err.to_string()
            .contains("parallel disks: 0 is out of range"),
        "{err}"
    );
}
