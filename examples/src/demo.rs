//! `cairn demo`: a sample disk, a full backup, guest-like changes tracked in
//! a dirty bitmap, a CBT incremental that reads and stores only what changed,
//! restores of both points (each from its own complete manifest) compared bit
//! for bit, and a full read-back verify.

use std::path::{Path, PathBuf};

use cairn_engine::cbt::DirtyBitmap;
use cairn_engine::sample::{generate_image, hash_file, scribble};
use cairn_engine::{
    BackupDisk, BackupOptions, ChangedBlocks, RawFileSource, Repository, RestoreOptions,
    VerifyOptions,
};

use crate::output::human;
use crate::{open_pool, remove_tree, Failure};

fn io(what: &str) -> impl Fn(std::io::Error) -> Failure + '_ {
    move |e| Failure::new(format!("{what}: {e}"))
}

pub fn run(dir: Option<&Path>, size_mib: u64) -> Result<u8, Failure> {
    if !(1..=65_536).contains(&size_mib) {
        return Err(Failure::usage(format!(
            "--size-mib {size_mib} out of range 1–65536"
        )));
    }
    let (work, temporary) = match dir {
        Some(d) => (d.to_path_buf(), false),
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            (
                std::env::temp_dir().join(format!("cairn-demo-{}-{nanos}", std::process::id())),
                true,
            )
        }
    };
    let result = steps(&work, size_mib);
    if temporary {
        remove_tree(&work);
    }
    result
}

fn backup_disk(repo: &Repository, disk: &Path) -> Result<cairn_engine::BackupStats, Failure> {
    let src = RawFileSource::open(disk)?;
    let disks = vec![BackupDisk::image("disk0.img", src)];
    Ok(repo.backup(disks, &BackupOptions::new("demo-vm"))?)
}

fn steps(work: &Path, size_mib: u64) -> Result<u8, Failure> {
    std::fs::create_dir_all(work).map_err(io("creating the demo directory"))?;
    let disk = work.join("disk0.img");
    let pool_dir = work.join("pool");
    println!("Cairn demo in {}", work.display());

    generate_image(&disk, size_mib << 20, 42).map_err(io("writing the sample disk"))?;
    println!(
        "1. sample disk: {} MiB (holes, zeros, log text, random data, duplicated blocks)",
        size_mib
    );
    let hash_v1 = hash_file(&disk).map_err(io("hashing the disk"))?;

    let pool = open_pool(&pool_dir.display().to_string(), true)?.pool;
    Repository::init(pool.clone())?;
    let repo = Repository::open(pool.clone())?;
    let full = backup_disk(&repo, &disk)?;
    println!(
        "2. full backup {}: read {}, stored {} ({} chunks, {} new) in {:.2}s",
        &full.snapshot.to_hex()[..12],
        human(full.bytes_read),
        human(full.bytes_new),
        full.chunks_total,
        full.chunks_new,
        full.seconds
    );

    // The guest's writes are recorded in a dirty bitmap, as a hypervisor's
    // changed-block tracking would (qcow2's default 64 KiB granularity).
    let written = scribble(&disk, 24, 7).map_err(io("changing the disk"))?;
    let mut bitmap = DirtyBitmap::new(size_mib << 20, 65536)?;
    for r in &written {
        bitmap.set_range(r.clone());
    }
    let hash_v2 = hash_file(&disk).map_err(io("hashing the disk"))?;
    println!(
        "3. guest writes: {} in {} scattered places, tracked in a 64 KiB dirty bitmap",
        human(written.iter().map(|r| r.end - r.start).sum()),
        written.len()
    );

    let repo = Repository::open(pool.clone())?;
    let parent = repo.load_snapshot(&full.snapshot)?;
    let changed = ChangedBlocks::new(full.snapshot, &parent, "disk0.img", bitmap.dirty_extents())?;
    let second = repo.backup(
        vec![BackupDisk::incremental(
            "disk0.img",
            RawFileSource::open(&disk)?,
            changed,
        )],
        &BackupOptions::new("demo-vm"),
    )?;
    println!(
        "4. CBT incremental {}: read {} of {} (dirty blocks only), {} chunks new, {} added to the pool in {:.2}s",
        &second.snapshot.to_hex()[..12],
        human(second.bytes_read),
        human(second.bytes_logical),
        second.chunks_new,
        human(second.bytes_new),
        second.seconds
    );

    let mut ok = true;
    for (n, (stats, expected)) in [(&full, hash_v1), (&second, hash_v2)]
        .into_iter()
        .enumerate()
    {
        let to: PathBuf = work.join(format!("restore-{}", n + 1));
        let r = repo.restore_to_dir(&stats.snapshot, &to, &RestoreOptions::default())?;
        let got = hash_file(&to.join("disk0.img")).map_err(io("hashing the restored disk"))?;
        let same = got == expected;
        ok &= same;
        println!(
            "{}. restore of {}: {} in {:.2}s, {}",
            5 + n,
            &stats.snapshot.to_hex()[..12],
            human(r.bytes_logical),
            r.seconds,
            if same {
                "bit-identical to the disk at backup time"
            } else {
                "DIFFERS from the disk at backup time"
            }
        );
    }

    let report = repo.verify(&VerifyOptions::default().with_read_data(true))?;
    println!(
        "7. verify --read-data: {} blobs in {} packs re-hashed, {}",
        report.blobs_read,
        report.packs,
        if report.is_ok() {
            "no damage"
        } else {
            "DAMAGE FOUND"
        }
    );
    ok &= report.is_ok();
    let dedup = 100.0 * (1.0 - second.bytes_new as f64 / full.bytes_new.max(1) as f64);
    println!(
        "summary: the incremental stored {:.1}% less than the full backup; restores {}",
        dedup,
        if ok { "verified" } else { "FAILED" }
    );
    Ok(if ok { 0 } else { 1 })
}
