//! Rate limits applied where a job's bytes flow — a backup's disk reads,
//! its pool writes, a restore's pool reads and its target writes — on a
//! fake clock: the clock must advance by the bytes moved over the rate
//! (within 5 %), and what was backed up restores bit-identical. No wall
//! time is measured.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::sync::Arc;

use cairn_engine::jobs::{Clock, Direction, FakeClock, RateLimit, Throttle, ThrottledPool};
use cairn_engine::sample::SampleRng;
use cairn_engine::{
    BackupDisk, BackupOptions, Compression, DynPool, FileKind, MemorySource, PoolList, PoolRead,
    Repository, RestoreOptions, WrappedPool,
};
use jiff::tz::TimeZone;

const MIB: u64 = 1 << 20;

fn image(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    SampleRng::new(9).fill(&mut data);
    data
}

fn throttle(rate: &str, clock: &Arc<FakeClock>) -> Arc<Throttle> {
    Arc::new(Throttle::new(
        RateLimit::parse(&[rate]).unwrap(),
        TimeZone::UTC,
        clock.clone(),
    ))
}

fn seconds(clock: &FakeClock, since: jiff::Timestamp) -> f64 {
    clock.now().duration_since(since).as_secs_f64()
}

fn near(got: f64, want: f64) -> bool {
    (got - want).abs() <= want * 0.05
}

fn one_thread(vm: &str) -> BackupOptions {
    BackupOptions::new(vm)
        .with_compression(Compression::None)
        .with_threads(std::num::NonZeroUsize::new(1))
}

fn stored(pool: &DynPool) -> u64 {
    [FileKind::Pack, FileKind::Index, FileKind::Snapshot]
        .into_iter()
        .flat_map(|k| {
            pool.list(k)
                .unwrap()
                .into_iter()
                .map(move |n| pool.size(k, &n).unwrap())
        })
        .sum()
}

#[test]
fn backups_and_restores_move_at_the_limited_rate() {
    let clock = Arc::new(FakeClock::new("2026-11-27T12:00:00Z".parse().unwrap()));
    let data = image(48 << 20);
    let base: DynPool = Arc::new(cairn_pools::MemoryPool::new());
    let repo = Repository::create(base.clone()).unwrap();

    // Disk reads at 16 MiB/s: 48 MiB take 3 s of the clock.
    let t0 = clock.now();
    let disk = BackupDisk::image("vda", MemorySource::new("vda", data.clone()))
        .throttled(throttle("16MiB/s", &clock));
    let first = repo.backup(vec![disk], &one_thread("web")).unwrap();
    assert_eq!(first.bytes_read, 48 << 20);
    let took = seconds(&clock, t0);
    assert!(near(took, 3.0), "{took} s for 48 MiB at 16 MiB/s");

    // Pool writes at 8 MiB/s: a second VM's copy of other data.
    let other = image(24 << 20).into_iter().rev().collect::<Vec<u8>>();
    let before = stored(&base);
    let writes: DynPool = Arc::new(WrappedPool(ThrottledPool::new(
        base.clone(),
        throttle("8MiB/s", &clock),
        Direction::Writes,
    )));
    let writer = Repository::open(writes).unwrap();
    let t0 = clock.now();
    let disk = BackupDisk::image("vdb", MemorySource::new("vdb", other.clone()));
    writer.backup(vec![disk], &one_thread("db")).unwrap();
    let written = stored(&base) - before;
    let took = seconds(&clock, t0);
    let want = written as f64 / (8 * MIB) as f64;
    assert!(near(took, want), "{took} s for {written} bytes at 8 MiB/s");

    // Restore target writes at 32 MiB/s: 48 MiB in 1.5 s.
    let out = tempfile::tempdir().unwrap();
    let t0 = clock.now();
    let opts = RestoreOptions::default()
        .with_threads(std::num::NonZeroUsize::new(1))
        .with_write_throttle(throttle("32MiB/s", &clock));
    repo.restore_to_dir(&first.snapshot, out.path(), &opts)
        .unwrap();
    let took = seconds(&clock, t0);
    assert!(near(took, 1.5), "{took} s for 48 MiB at 32 MiB/s");
    assert!(std::fs::read(out.path().join("vda")).unwrap() == data);

    // Pool reads at 64 MiB/s: the packs' bytes (48 MiB stored as is).
    let reads: DynPool = Arc::new(WrappedPool(ThrottledPool::new(
        base.clone(),
        throttle("64MiB/s", &clock),
        Direction::Reads,
    )));
    let reader = Repository::open(reads).unwrap();
    let out = tempfile::tempdir().unwrap();
    let t0 = clock.now();
    reader
        .restore_to_dir(
            &first.snapshot,
            out.path(),
            &RestoreOptions::default().with_threads(std::num::NonZeroUsize::new(1)),
        )
        .unwrap();
    let took = seconds(&clock, t0);
    assert!(
        near(took, 0.75),
        "{took} s to read 48 MiB of packs (and the index) at 64 MiB/s"
    );
    assert!(std::fs::read(out.path().join("vda")).unwrap() == data);
}
