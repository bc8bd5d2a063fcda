//! Embedding Cairn: back up a disk image into a local pool, take a second
//! backup, list, resolve, restore and verify — with progress and a
//! cancellation token, as a backup product would drive it.
//!
//! `cargo run -p cairn-cli --example embed_backup [WORK_DIR]`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cairn_engine::{
    BackupDisk, BackupOptions, CancelToken, DynPool, MemorySource, Progress, RawFileSource,
    Repository, RestoreOptions, SnapshotSelector, VerifyOptions,
};
use cairn_pools::LocalPool;

/// Counts bytes; a real product would update its UI.
#[derive(Default)]
struct Counter(AtomicU64);

impl Progress for Counter {
    fn advance(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::Relaxed);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let work = match std::env::args().nth(1) {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::env::temp_dir().join(format!("cairn-embed-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work)?;
    // A disk image: 8 MiB of data with a hole in the middle.
    let image_path = work.join("vda.img");
    let mut image: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 % 253) as u8).collect();
    image[2 << 20..5 << 20].fill(0);
    std::fs::write(&image_path, &image)?;

    let pool: DynPool = Arc::new(LocalPool::create(work.join("pool"))?);
    let repo = Repository::open_or_init(pool)?;
    let progress = Arc::new(Counter::default());
    let cancel = CancelToken::new(); // `cancel.cancel()` from any thread stops the job
    let opts = BackupOptions::new("web01")
        .with_progress(progress.clone())
        .with_cancel(cancel.clone());

    let first = repo.backup(
        vec![BackupDisk::image("vda", RawFileSource::open(&image_path)?)],
        &opts,
    )?;
    println!("{first}");
    // A second disk, held in memory, in a second snapshot.
    let second = repo.backup(
        vec![
            BackupDisk::image("vda", RawFileSource::open(&image_path)?),
            BackupDisk::image("vdb", MemorySource::new("vdb", vec![9u8; 1 << 20])),
        ],
        &opts,
    )?;
    println!("{second}");

    let list = repo.snapshots()?;
    for s in &list.snapshots {
        println!("{} {} {} disks", s.id, s.vm, s.disks.len());
    }
    let latest = repo.resolve(&SnapshotSelector::latest_of("web01"))?;
    assert_eq!(latest, second.snapshot);
    let restored = repo.restore_to_dir(
        &latest,
        &work.join("restore"),
        &RestoreOptions::default().with_disks(["vda"]),
    )?;
    println!("{restored}");
    assert_eq!(std::fs::read(work.join("restore/vda"))?, image);
    let report = repo.verify(&VerifyOptions::default().with_read_data(true))?;
    println!("{report}");
    println!("progress saw {} bytes", progress.0.load(Ordering::Relaxed));
    if std::env::args().nth(1).is_none() {
        std::fs::remove_dir_all(&work)?;
    }
    Ok(())
}
