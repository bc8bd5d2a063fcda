//! The restore write buffer (spec R7): with `write_size` set, no write
//! request to a target is larger, and the disk restores bit-identical;
//! without it, whole read runs are written at once. Values outside
//! 64 KiB–8 MiB are refused before any target is made.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cairn_engine::sample::SampleRng;
use cairn_engine::{
    BackupDisk, BackupOptions, Compression, DiskTarget, MemorySource, MemoryTarget, Repository,
    RestoreOptions,
};

struct Recording {
    inner: MemoryTarget,
    largest: Arc<AtomicUsize>,
    writes: Arc<AtomicUsize>,
}

impl DiskTarget for Recording {
    fn write_at(&self, offset: u64, data: &[u8]) -> cairn_engine::Result<()> {
        self.largest.fetch_max(data.len(), Ordering::SeqCst);
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(offset, data)
    }
    fn finish(self: Box<Self>) -> cairn_engine::Result<()> {
        Box::new(self.inner).finish()
    }
}

#[test]
fn write_requests_never_exceed_the_write_size() {
    let mut image = vec![0u8; 6 << 20];
    SampleRng::new(5).fill(&mut image[..5 << 20]);
    let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new())).unwrap();
    let opts = BackupOptions::new("vm").with_compression(Compression::None);
    let stats = repo
        .backup(
            vec![BackupDisk::image(
                "vda",
                MemorySource::new("vda", image.clone()),
            )],
            &opts,
        )
        .unwrap();
    let restore = |opts: &RestoreOptions| {
        let target = MemoryTarget::new(image.len() as u64).unwrap();
        let keep = target.clone();
        let largest = Arc::new(AtomicUsize::new(0));
        let writes = Arc::new(AtomicUsize::new(0));
        let (l, w) = (largest.clone(), writes.clone());
        let result = repo.restore(
            &stats.snapshot,
            &move |_| {
                Ok(Box::new(Recording {
                    inner: target.clone(),
                    largest: l.clone(),
                    writes: w.clone(),
                }))
            },
            opts,
        );
        result.map(|_| {
            (
                keep.finished(),
                largest.load(Ordering::SeqCst),
                writes.load(Ordering::SeqCst),
            )
        })
    };
    // Default: runs of several chunks go in one write.
    let (data, largest, _) = restore(&RestoreOptions::default()).unwrap();
    assert!(data.unwrap() == image);
    assert!(largest > 1 << 20, "largest write {largest}");
    // 64 KiB requests: 80 of them for the 5 MiB of data, none larger.
    let (data, largest, writes) =
        restore(&RestoreOptions::default().with_write_size(64 << 10)).unwrap();
    assert!(data.unwrap() == image);
    assert_eq!((largest, writes), (64 << 10, 80));
    for bad in [(64 << 10) - 1, (8 << 20) + 1] {
        let err = restore(&RestoreOptions::default().with_write_size(bad)).unwrap_err();
        assert!(
            err.to_string().contains("out of range (64 KiB–8 MiB)"),
            "{err}"
        );
    }
}

/// A target whose writes count how many disks are being written at once.
struct Gauged {
    inner: MemoryTarget,
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl DiskTarget for Gauged {
    fn write_at(&self, offset: u64, data: &[u8]) -> cairn_engine::Result<()> {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let r = self.inner.write_at(offset, data);
        self.now.fetch_sub(1, Ordering::SeqCst);
        r
    }
    fn finish(self: Box<Self>) -> cairn_engine::Result<()> {
        Box::new(self.inner).finish()
    }
}

/// Restore's disks per VM (R7): with 3 at once, 4 disks restore
/// bit-identical and at least 2 are written at the same time; one at a
/// time (the default) never overlaps.
#[test]
fn disks_restore_side_by_side() {
    let images: Vec<Vec<u8>> = (0..4u64)
        .map(|i| {
            let mut b = vec![0u8; (1 << 20) + (i as usize) * 65536];
            SampleRng::new(20 + i).fill(&mut b);
            b
        })
        .collect();
    let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new())).unwrap();
    let disks = images
        .iter()
        .enumerate()
        .map(|(i, b)| BackupDisk::image(format!("vd{i}"), MemorySource::new("m", b.clone())))
        .collect();
    let stats = repo.backup(disks, &BackupOptions::new("vm")).unwrap();
    for (parallel, want_overlap) in [(3usize, true), (1, false)] {
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let made = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (n2, p2, m2) = (now.clone(), peak.clone(), made.clone());
        let opts = RestoreOptions::default()
            .with_parallel_disks(parallel)
            .with_write_size(64 << 10);
        repo.restore(
            &stats.snapshot,
            &move |d| {
                let t = MemoryTarget::new(d.size)?;
                m2.lock().push((d.name.clone(), t.clone()));
                Ok(Box::new(Gauged {
                    inner: t,
                    now: n2.clone(),
                    peak: p2.clone(),
                }))
            },
            &opts,
        )
        .unwrap();
        for (name, t) in made.lock().iter() {
            let i: usize = name[2..].parse().unwrap();
            assert!(t.finished().unwrap() == images[i], "{name}");
        }
        let peak = peak.load(Ordering::SeqCst);
        if want_overlap {
            assert!((2..=3).contains(&peak), "peak {peak}");
        } else {
            assert_eq!(peak, 1);
        }
    }
}
