//! Resume mid-disk (spec B13): a backup stopped part-way, run again on the
//! same source, takes the journaled prefix instead of reading it (the
//! bytes read and resumed add up to the disk's data), and restores
//! bit-identical; a source whose identity changed, or a journal whose
//! chunks the pool lost, is read again; the journal goes once the snapshot
//! is written. (A SIGKILLed backup is in the CLI's tests.)
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cairn_engine::sample::SampleRng;
use cairn_engine::{
    BackupDisk, BackupOptions, CancelToken, ChunkingParams, Compression, DynPool, Error,
    MemorySource, MemoryTarget, Progress, Repository, RestoreOptions,
};

/// Cancels its token once `after` bytes were processed.
struct StopAfter {
    seen: AtomicU64,
    after: u64,
    cancel: CancelToken,
}

impl Progress for StopAfter {
    fn advance(&self, bytes: u64) {
        if self.seen.fetch_add(bytes, Ordering::SeqCst) + bytes >= self.after {
            self.cancel.cancel();
        }
    }
}

fn disk_bytes() -> Vec<u8> {
    // 12 MiB: random, then a zero run, then random again.
    let mut b = vec![0u8; 12 << 20];
    SampleRng::new(5).fill(&mut b[..7 << 20]);
    SampleRng::new(6).fill(&mut b[9 << 20..]);
    b
}

fn opts(dir: &std::path::Path) -> BackupOptions {
    let mut o = BackupOptions::new("vm")
        .with_chunking(ChunkingParams::Fixed { size: 64 << 10 })
        .with_compression(Compression::None)
        .with_resume_dir(dir);
    // Small packs: several seals (journal appends) per disk.
    o.pack_target = 512 << 10;
    o.pack_max_input = 1 << 20;
    o.threads = std::num::NonZeroUsize::new(2);
    o
}

fn stopped_backup(repo: &Repository, src: MemorySource, dir: &std::path::Path, after: u64) {
    let cancel = CancelToken::new();
    let progress = Arc::new(StopAfter {
        seen: AtomicU64::new(0),
        after,
        cancel: cancel.clone(),
    });
    let mut o = opts(dir).with_progress(progress).with_cancel(cancel);
    // Small batches: the reader runs only a few ahead of the progress, so
    // the stop leaves part of the disk unread.
    o.batch_size = 128 << 10;
    let e = repo
        .backup(vec![BackupDisk::image("vda", src)], &o)
        .unwrap_err();
    assert!(matches!(e, Error::Cancelled), "{e}");
}

fn restore(repo: &Repository, id: &cairn_engine::SnapshotId, len: usize) -> Vec<u8> {
    let target = MemoryTarget::new(len as u64).unwrap();
    let t = target.clone();
    repo.restore(
        id,
        &move |_| Ok(Box::new(t.clone())),
        &RestoreOptions::default(),
    )
    .unwrap();
    target.finished().unwrap()
}

fn journals(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

#[test]
fn a_stopped_backup_continues_from_its_journal() {
    let bytes = disk_bytes();
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new())).unwrap();
    let src = || MemorySource::new("vda", bytes.clone()).with_identity("disk-1");
    stopped_backup(&repo, src(), dir.path(), 5 << 20);
    assert_eq!(journals(dir.path()), 1);
    let stats = repo
        .backup(vec![BackupDisk::image("vda", src())], &opts(dir.path()))
        .unwrap();
    // Data is 10 MiB (the 2 MiB zero run is a hole, never read): what was
    // read and what was resumed make exactly that.
    assert!(stats.bytes_resumed >= 2 << 20, "{stats:?}");
    assert!(stats.bytes_resumed < 12 << 20, "{stats:?}");
    assert_eq!(stats.bytes_resumed % (64 << 10), 0, "on the chunk grid");
    let data_resumed =
        stats.bytes_resumed.min(7 << 20) + stats.bytes_resumed.saturating_sub(9 << 20);
    assert_eq!(stats.bytes_read + data_resumed, 10 << 20, "{stats:?}");
    assert_eq!(stats.bytes_logical, 12 << 20);
    assert_eq!(restore(&repo, &stats.snapshot, bytes.len()), bytes);
    // The journal went with the snapshot; the next backup reads everything.
    assert_eq!(journals(dir.path()), 0);
    let again = repo
        .backup(vec![BackupDisk::image("vda", src())], &opts(dir.path()))
        .unwrap();
    assert_eq!((again.bytes_resumed, again.bytes_read), (0, 10 << 20));
}

#[test]
fn another_source_or_a_lost_pack_is_read_again() {
    let bytes = disk_bytes();
    let dir = tempfile::tempdir().unwrap();
    let pool: DynPool = Arc::new(cairn_pools::MemoryPool::new());
    let repo = Repository::create(pool.clone()).unwrap();
    stopped_backup(
        &repo,
        MemorySource::new("vda", bytes.clone()).with_identity("disk-1"),
        dir.path(),
        5 << 20,
    );
    // Another identity: the journal is not used.
    let mut changed = bytes.clone();
    changed[100] ^= 1;
    let stats = repo
        .backup(
            vec![BackupDisk::image(
                "vda",
                MemorySource::new("vda", changed.clone()).with_identity("disk-2"),
            )],
            &opts(dir.path()),
        )
        .unwrap();
    assert_eq!(stats.bytes_resumed, 0);
    assert_eq!(restore(&repo, &stats.snapshot, changed.len()), changed);

    // The packs an interrupted backup sealed are lost before it resumes:
    // the journal's chunks are not found, so nothing is taken from it.
    let dir = tempfile::tempdir().unwrap();
    let pool: DynPool = Arc::new(cairn_pools::MemoryPool::new());
    let repo = Repository::create(pool.clone()).unwrap();
    let src = || MemorySource::new("vda", bytes.clone()).with_identity("disk-1");
    stopped_backup(&repo, src(), dir.path(), 5 << 20);
    for name in pool.list(cairn_engine::FileKind::Pack).unwrap() {
        pool.delete(cairn_engine::FileKind::Pack, &name).unwrap();
    }
    let repo = Repository::open(pool.clone()).unwrap();
    let stats = repo
        .backup(vec![BackupDisk::image("vda", src())], &opts(dir.path()))
        .unwrap();
    assert_eq!(stats.bytes_resumed, 0, "{stats:?}");
    assert_eq!(stats.bytes_read, 10 << 20);
    assert_eq!(restore(&repo, &stats.snapshot, bytes.len()), bytes);
}

/// One of the packs an interrupted backup sealed is lost: the journal's
/// prefix ends before the first chunk it held (inside a record, usually),
/// the journal is cut there, and the resumed backup reads the rest; the
/// snapshot restores identical, and resuming from the cut journal again
/// (a second interruption) works the same.
#[test]
fn a_journal_cut_inside_a_record_resumes_up_to_the_cut() {
    let bytes = disk_bytes();
    let dir = tempfile::tempdir().unwrap();
    let pool: DynPool = Arc::new(cairn_pools::MemoryPool::new());
    let repo = Repository::create(pool.clone()).unwrap();
    let src = || MemorySource::new("vda", bytes.clone()).with_identity("disk-1");
    stopped_backup(&repo, src(), dir.path(), 5 << 20);
    let packs = pool.list(cairn_engine::FileKind::Pack).unwrap();
    assert!(packs.len() >= 3, "{packs:?}");
    // Lose one pack in the middle of the listing (names are random).
    pool.delete(cairn_engine::FileKind::Pack, &packs[packs.len() / 2])
        .unwrap();
    let repo = Repository::open(pool.clone()).unwrap();
    stopped_backup(&repo, src(), dir.path(), 6 << 20);
    let repo = Repository::open(pool.clone()).unwrap();
    let stats = repo
        .backup(vec![BackupDisk::image("vda", src())], &opts(dir.path()))
        .unwrap();
    assert_eq!(stats.bytes_resumed % (64 << 10), 0, "on the chunk grid");
    assert!(stats.bytes_resumed < bytes.len() as u64, "{stats:?}");
    assert_eq!(restore(&repo, &stats.snapshot, bytes.len()), bytes);
    assert_eq!(
        journals(dir.path()),
        0,
        "the journal goes with the snapshot"
    );
}

/// Blocks in the middle of a backup until released.
struct Hold {
    seen: AtomicU64,
    at: u64,
    reached: std::sync::mpsc::SyncSender<()>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Progress for Hold {
    fn advance(&self, bytes: u64) {
        let before = self.seen.fetch_add(bytes, Ordering::SeqCst);
        if before < self.at && before + bytes >= self.at {
            let _ = self.reached.send(());
            let _ = self.release.lock().unwrap().recv();
        }
    }
}

/// Two backups of one disk at once: the second runs without a journal
/// (it neither reads nor writes the first one's), both snapshots restore
/// identical, and the first one's journal goes with its snapshot.
#[test]
fn a_second_backup_of_the_same_disk_leaves_the_first_ones_journal_alone() {
    let bytes = disk_bytes();
    let dir = tempfile::tempdir().unwrap();
    let repo = Arc::new(Repository::create(Arc::new(cairn_pools::MemoryPool::new())).unwrap());
    let src = || MemorySource::new("vda", bytes.clone()).with_identity("disk-1");
    let (reached_tx, reached_rx) = std::sync::mpsc::sync_channel(1);
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let hold = Arc::new(Hold {
        seen: AtomicU64::new(0),
        at: 6 << 20,
        reached: reached_tx,
        release: std::sync::Mutex::new(release_rx),
    });
    let first = {
        let (repo, o, disk) = (repo.clone(), opts(dir.path()).with_progress(hold), src());
        std::thread::spawn(move || repo.backup(vec![BackupDisk::image("vda", disk)], &o))
    };
    reached_rx.recv().unwrap();
    let journal = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let before = std::fs::read(&journal).unwrap();
    assert!(before.len() > 40, "the first backup journaled something");
    let second = repo
        .backup(vec![BackupDisk::image("vda", src())], &opts(dir.path()))
        .unwrap();
    assert_eq!(second.bytes_resumed, 0);
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        before,
        "the journal was touched"
    );
    release_tx.send(()).unwrap();
    let first = first.join().unwrap().unwrap();
    for s in [&first, &second] {
        assert_eq!(restore(&repo, &s.snapshot, bytes.len()), bytes);
    }
    assert_eq!(journals(dir.path()), 0);
}
