//! `cairn-bench`: the whole-pipeline benchmark on the generated mixed image
//! (default 4 GiB). Prints, per phase, wall time, MB/s of logical input, CPU
//! seconds (user + system) and peak RSS (`VmHWM`, reset between phases via
//! `/proc/self/clear_refs`).
//!
//! ```text
//! cargo run --release -p cairn-benches --bin cairn-bench -- [--size-gib 4] [--dir target/bench-data]
//!                                                          [--threads 0] [--index-chunks 10000000] [--repeat 3]
//! ```
//! Each pipeline phase runs `--repeat` times (a full backup into a fresh
//! pool each time); the run with the median wall time is reported.
//!
//! `--only cbt` (also part of the default run) measures CBT incrementals with
//! real qemu parts: the image converted to qcow2, a full backup through
//! qemu-nbd (`--connections` streams), the 2 % rewrite written through a
//! writable qemu-nbd export (so the persistent bitmap records it, with the
//! same bytes as the rewrite image), then the incremental; its restore is
//! checked against the rewrite image.
//!
//! `--scale` runs full backup, re-backup and restore at 1, 4 and 16 GiB
//! (`--scale-gib`), printing MB/s, CPU seconds per GiB and peak RSS per
//! size, beside the write + fsync speed of the pool and restore
//! directories (`--pool-dir`, `--restore-dir`).

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use cairn_benches::{generate_image, generate_rewrite};
use cairn_engine::internals::{BlobCodec, PackEntry, PackWriter, Segment, SegmentBuilder};
use cairn_engine::{
    BackupDisk, BackupOptions, BackupStats, ChunkId, DynPool, NbdConnection, PackId, RawFileSource,
    Repository, RestoreOptions,
};
use cairn_pools::LocalPool;

struct Args {
    size_gib: f64,
    dir: PathBuf,
    threads: usize,
    index_chunks: u32,
    only: Option<String>,
    s3: Option<String>,
    repeat: usize,
    huge_pages: bool,
    mmap: bool,
    pool_dir: Option<PathBuf>,
    connections: usize,
    gc_chunks: u64,
    gc_pool: Option<PathBuf>,
    rebuild_pool: Option<PathBuf>,
    verify_pool: Option<PathBuf>,
    /// The phases' figures also go here, as JSON.
    json: Option<PathBuf>,
    /// `--only scale`: image sizes in GiB.
    scale_gib: Vec<u64>,
    /// Where restores go (default: the pool directory).
    restore_dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        size_gib: 4.0,
        dir: PathBuf::from("target/bench-data"),
        threads: 0,
        index_chunks: 10_000_000,
        only: None,
        s3: None,
        repeat: 3,
        huge_pages: false,
        mmap: false,
        pool_dir: None,
        connections: 2,
        gc_chunks: 1_000_000,
        gc_pool: None,
        rebuild_pool: None,
        verify_pool: None,
        json: None,
        scale_gib: vec![1, 4, 16],
        restore_dir: None,
    };
    // --quick sets defaults that the other flags may then change.
    if std::env::args().any(|f| f == "--quick") {
        a.size_gib = 0.125;
        a.repeat = 1;
        a.index_chunks = 500_000;
        a.only = Some("quick".into());
        a.dir = PathBuf::from("target/bench-quick");
        a.json = Some(PathBuf::from("target/bench-quick.json"));
    }
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--size-gib" => a.size_gib = val()?.parse().map_err(|e| format!("--size-gib: {e}"))?,
            "--dir" => a.dir = PathBuf::from(val()?),
            "--threads" => a.threads = val()?.parse().map_err(|e| format!("--threads: {e}"))?,
            "--index-chunks" => {
                a.index_chunks = val()?.parse().map_err(|e| format!("--index-chunks: {e}"))?
            }
            "--only" => a.only = Some(val()?),
            "--s3" => a.s3 = Some(val()?),
            "--huge-pages" => a.huge_pages = true,
            "--mmap" => a.mmap = true,
            "--pool-dir" => a.pool_dir = Some(PathBuf::from(val()?)),
            "--connections" => {
                a.connections = val()?.parse().map_err(|e| format!("--connections: {e}"))?
            }
            "--gc-chunks" => {
                a.gc_chunks = val()?.parse().map_err(|e| format!("--gc-chunks: {e}"))?
            }
            "--gc-pool" => a.gc_pool = Some(PathBuf::from(val()?)),
            "--rebuild-pool" => a.rebuild_pool = Some(PathBuf::from(val()?)),
            "--verify-pool" => a.verify_pool = Some(PathBuf::from(val()?)),
            "--json" => a.json = Some(PathBuf::from(val()?)),
            "--scale" => a.only = Some("scale".into()),
            "--scale-gib" => {
                a.scale_gib = val()?
                    .split(',')
                    .map(|v| {
                        v.trim()
                            .parse::<u64>()
                            .map_err(|e| format!("--scale-gib: {e}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--restore-dir" => a.restore_dir = Some(PathBuf::from(val()?)),
            // The regression guard of `.ci/run`: 128 MiB, one run each, the
            // pipeline (restores checked bit-identical) and a 500 000-chunk
            // index, figures in target/bench-quick.json; under 30 s.
            "--quick" => {}
            "--repeat" => {
                a.repeat = val()?
                    .parse::<usize>()
                    .map_err(|e| format!("--repeat: {e}"))?
                    .max(1)
            }
            "-h" | "--help" => {
                println!("cairn-bench [--quick] [--json FILE] [--size-gib N] [--dir DIR] [--threads N] [--index-chunks N] [--only pipeline|index|cbt|s3|gc|catalog|rebuild|copy|jobs|scale] [--scale [--scale-gib 1,4,16] [--restore-dir DIR]] [--gc-chunks N] [--s3 ADDRESS] [--repeat N] [--huge-pages] [--mmap] [--pool-dir DIR] [--connections N]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; no other memory is touched.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

struct Row {
    phase: String,
    bytes: u64,
    wall: f64,
    cpu: f64,
    rss: f64,
    note: String,
}

fn measure<T>(phase: &str, f: impl FnOnce() -> (u64, T, String)) -> (Row, T) {
    reset_peak_rss();
    let (c0, t0) = (cpu_seconds(), Instant::now());
    let (bytes, out, note) = f();
    let wall = t0.elapsed().as_secs_f64();
    let row = Row {
        phase: phase.to_string(),
        bytes,
        wall,
        cpu: cpu_seconds() - c0,
        rss: peak_rss_mib(),
        note,
    };
    eprintln!(
        "{:<28} {:>9.0} MB/s  {:>7.2} s  cpu {:>6.2} s  peak RSS {:>6.1} MiB  {}",
        row.phase,
        row.bytes as f64 / row.wall / 1e6,
        row.wall,
        row.cpu,
        row.rss,
        row.note
    );
    (row, out)
}

/// Runs a phase `n` times and keeps the median run by wall time.
fn median<T>(n: usize, mut once: impl FnMut() -> (Row, T)) -> (Row, T) {
    let mut runs: Vec<(Row, T)> = (0..n).map(|_| once()).collect();
    runs.sort_by(|a, b| a.0.wall.total_cmp(&b.0.wall));
    let mid = runs.len() / 2;
    let picked = runs.swap_remove(mid);
    eprintln!(
        "  -> median of {n}: {:.0} MB/s",
        picked.0.bytes as f64 / picked.0.wall / 1e6
    );
    picked
}

fn disk(path: &Path, mmap: bool) -> BackupDisk {
    let src = if mmap {
        RawFileSource::open_mapped(path)
    } else {
        RawFileSource::open(path)
    };
    BackupDisk::image("disk.img", src.expect("open image"))
}

fn warm(path: &Path) {
    use std::io::Read;
    let mut f = std::fs::File::open(path).expect("open image");
    let mut buf = vec![0u8; 8 << 20];
    while f.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
}

fn run_backup(repo: &Repository, path: &Path, a: &Args) -> BackupStats {
    run_backup_with(repo, path, a, true)
}

/// [`run_backup`]; `reuse_unchanged` off reads an unchanged file anyway.
fn run_backup_with(repo: &Repository, path: &Path, a: &Args, reuse_unchanged: bool) -> BackupStats {
    let mut opts = BackupOptions::new("bench").with_threads(NonZeroUsize::new(a.threads));
    opts.reuse_unchanged = reuse_unchanged;
    repo.backup(vec![disk(path, a.mmap)], &opts)
        .expect("backup")
}

fn note(s: &BackupStats) -> String {
    format!(
        "read {:.0} MB, new {} chunks, +{:.1} MB to pool",
        s.bytes_read as f64 / 1e6,
        s.chunks_new,
        s.bytes_new as f64 / 1e6
    )
}

/// Restores `snapshot` into `out` (overwriting), for [`measure`].
fn restore_phase(
    repo: &Repository,
    snapshot: &cairn_engine::SnapshotId,
    out: &Path,
    a: &Args,
) -> (u64, (), String) {
    let opts = RestoreOptions::default()
        .with_threads(NonZeroUsize::new(a.threads))
        .with_overwrite(true);
    let s = repo.restore_to_dir(snapshot, out, &opts).expect("restore");
    (
        s.bytes_logical,
        (),
        format!("wrote {:.0} MB of data", s.bytes_written as f64 / 1e6),
    )
}

/// The generated image and its 2 % rewrite (made once, kept in `--dir`).
fn images(a: &Args, rows: &mut Vec<Row>) -> (PathBuf, PathBuf, u64) {
    std::fs::create_dir_all(&a.dir).expect("bench dir");
    let size = (a.size_gib * (1u64 << 30) as f64) as u64;
    let base = a.dir.join(format!("mixed-{size}.img"));
    let rewrite = a.dir.join(format!("mixed-{size}-rewrite.img"));
    if !base.exists() || !rewrite.exists() {
        let (r, ()) = measure("generate images", || {
            generate_image(&base, size, 1).expect("generate");
            let plan = generate_rewrite(&base, &rewrite, 0.02, 1).expect("rewrite");
            let dirty: u64 = plan.iter().map(|r| r.end - r.start).sum();
            (
                2 * size,
                (),
                format!(
                    "2 % rewrite: {} writes, {:.1} MB",
                    plan.len(),
                    dirty as f64 / 1e6
                ),
            )
        });
        rows.push(r);
    }
    (base, rewrite, size)
}

fn fresh_repo(dir: &Path) -> Repository {
    let _ = std::fs::remove_dir_all(dir);
    let pool: DynPool = Arc::new(LocalPool::create(dir).expect("pool"));
    Repository::init(pool.clone()).expect("init");
    Repository::open(pool).expect("open")
}

fn cbt(a: &Args, rows: &mut Vec<Row>) {
    use cairn_cas::qemu::{
        backup_qcow2, Qcow2BackupOptions, Qcow2Image, Qcow2Outcome, QemuNbdExport,
    };
    let (base, rewrite, size) = images(a, rows);
    let work = a.pool_dir.clone().unwrap_or_else(|| a.dir.clone());
    std::fs::create_dir_all(&work).expect("pool dir");
    let qcow2 = work.join("cbt.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&base)
        .arg(&qcow2)
        .status()
        .expect("qemu-img (qemu-utils)");
    assert!(status.success(), "qemu-img convert failed");
    warm(&qcow2);
    let repo = fresh_repo(&work.join("pool-cbt"));
    let image = Qcow2Image::new(&qcow2);
    let q = Qcow2BackupOptions {
        chain: "bench".into(),
        policy: Default::default(),
        connections: a.connections,
        spot_check: 0,
        read: None,
    };
    let opts = BackupOptions::new("bench").with_threads(NonZeroUsize::new(a.threads));
    let run = |label: &str| {
        measure(label, || {
            match backup_qcow2(&repo, &image, "disk.img", &opts, &q).expect("qcow2 backup") {
                Qcow2Outcome::Done { stats, .. } => {
                    (stats.bytes_logical, stats.clone(), note(&stats))
                }
                Qcow2Outcome::Skipped { reason, .. } => panic!("skipped: {reason}"),
            }
        })
    };
    let (r, full) = run("full backup (qcow2, NBD)");
    rows.push(r);
    // The rewrite, through qemu so the bitmap records it: the same plan and
    // bytes as `generate_rewrite(.., 0.02, 1)`.
    let plan = cairn_benches::rewrite_plan(size, 0.02, 1);
    let plan_bytes: u64 = plan.iter().map(|r| r.end - r.start).sum();
    {
        let export = QemuNbdExport::start(
            &qcow2,
            "qcow2",
            vec!["--persistent".into(), "--shared=1".into()],
        )
        .expect("writable export");
        let mut c = NbdConnection::connect(&export.uri(), &[]).expect("connect");
        let mut rng = cairn_engine::sample::SampleRng::new(1 ^ 0x5eed);
        let mut buf = Vec::new();
        for r in &plan {
            buf.resize((r.end - r.start) as usize, 0);
            rng.fill(&mut buf);
            c.write_at(r.start, &buf).expect("write");
        }
        c.flush().expect("flush");
        drop(c);
        export.stop().expect("stop export");
    }
    warm(&qcow2);
    let (mut r, inc) = run("CBT incremental (2 % rewrite)");
    assert_eq!(inc.mode.as_str(), "cbt");
    r.note = format!(
        "{}; wall {:.1} % of full; read {:.2}x the {:.1} MB written ({:.1} MB dirty on the 64 KiB grid)",
        r.note,
        100.0 * inc.seconds / full.seconds,
        inc.bytes_read as f64 / plan_bytes as f64,
        plan_bytes as f64 / 1e6,
        inc.bytes_dirty as f64 / 1e6,
    );
    eprintln!("    {}", r.note);
    rows.push(r);
    let out = work.join("restore-cbt");
    let _ = std::fs::remove_dir_all(&out);
    repo.restore_to_dir(&inc.snapshot, &out, &RestoreOptions::default())
        .expect("restore");
    let restored = cairn_engine::sample::hash_file(&out.join("disk.img")).expect("hash");
    let expected = cairn_engine::sample::hash_file(&rewrite).expect("hash");
    assert_eq!(
        restored, expected,
        "CBT restore differs from the rewrite image"
    );
    eprintln!("    incremental restore is bit-identical to the rewrite image");
    let _ = std::fs::remove_dir_all(&out);
    // The same snapshot restored as a thin qcow2 through qemu-nbd.
    std::fs::create_dir_all(&out).expect("restore dir");
    let thin = out.join("disk.qcow2");
    let (r, ()) = measure("restore (thin qcow2, NBD)", || {
        let opts = RestoreOptions::default()
            .with_threads(NonZeroUsize::new(a.threads))
            .with_overwrite(true);
        let s = repo
            .restore(
                &inc.snapshot,
                &|d: &cairn_engine::DiskManifest| {
                    Ok(
                        Box::new(cairn_cas::qemu::Qcow2Target::create(&thin, d.size, true)?)
                            as Box<dyn cairn_engine::DiskTarget>,
                    )
                },
                &opts,
            )
            .expect("qcow2 restore");
        (
            s.bytes_logical,
            (),
            format!("wrote {:.0} MB of data", s.bytes_written as f64 / 1e6),
        )
    });
    rows.push(r);
    let same = std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
        .arg(&thin)
        .arg(&rewrite)
        .status()
        .expect("qemu-img compare");
    assert!(
        same.success(),
        "qcow2 restore differs from the rewrite image"
    );
    eprintln!("    qcow2 restore matches the rewrite image (qemu-img compare)");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(work.join("pool-cbt"));
    let _ = std::fs::remove_file(&qcow2);
}

fn pipeline(a: &Args, rows: &mut Vec<Row>) {
    let (base, rewrite, _) = images(a, rows);
    warm(&base);
    warm(&rewrite);
    // Pools and restores go to --pool-dir (default: the data directory).
    let work = a.pool_dir.clone().unwrap_or_else(|| a.dir.clone());
    std::fs::create_dir_all(&work).expect("pool dir");
    // Each run backs up into a fresh pool, deleted after the run except for
    // the last one, which the later phases use (keeping several multi-GiB
    // pools around skews later runs).
    let mut kept: Option<(BackupStats, Repository)> = None;
    let mut attempt = 0;
    let (r, ()) = median(a.repeat, || {
        let pool_dir = work.join(format!("pool-{attempt}"));
        attempt += 1;
        if let Some((_, old)) = kept.take() {
            let _ = std::fs::remove_dir_all(old.pool().location());
        }
        let _ = std::fs::remove_dir_all(&pool_dir);
        let pool: DynPool = Arc::new(LocalPool::create(&pool_dir).expect("pool"));
        Repository::init(pool.clone()).expect("init");
        let repo = Repository::open(pool).expect("open");
        let (row, stats) = measure("full backup", || {
            let s = run_backup(&repo, &base, a);
            (s.bytes_logical, s.clone(), note(&s))
        });
        kept = Some((stats, repo));
        (row, ())
    });
    rows.push(r);
    let (full, repo) = kept.expect("at least one run");
    let mut reused = None;
    let (r, _) = median(a.repeat, || {
        measure("unchanged re-backup", || {
            let s = run_backup(&repo, &base, a);
            reused = Some(s.snapshot);
            (s.bytes_logical, (), note(&s))
        })
    });
    rows.push(r);
    let (r, _) = median(a.repeat, || {
        measure("unchanged re-backup, --force-read", || {
            let s = run_backup_with(&repo, &base, a, false);
            (s.bytes_logical, (), note(&s))
        })
    });
    rows.push(r);
    let (r, _) = measure("2 % rewrite, full re-read", || {
        let s = run_backup(&repo, &rewrite, a);
        (s.bytes_logical, (), note(&s))
    });
    rows.push(r);
    let out = work.join("restore");
    let (r, _) = median(a.repeat, || {
        let _ = std::fs::remove_dir_all(&out);
        measure("restore (sparse file)", || {
            restore_phase(&repo, &full.snapshot, &out, a)
        })
    });
    rows.push(r);
    let restored = cairn_engine::sample::hash_file(&out.join("disk.img")).expect("hash");
    let original = cairn_engine::sample::hash_file(&base).expect("hash");
    assert_eq!(restored, original, "restore is not bit-identical");
    // The snapshot of the unchanged re-backup (its extents reused without
    // reading, when the file was old enough) restores the same bytes.
    if let Some(id) = reused {
        let _ = std::fs::remove_dir_all(&out);
        let opts = RestoreOptions::default().with_overwrite(true);
        repo.restore_to_dir(&id, &out, &opts).expect("restore");
        let again = cairn_engine::sample::hash_file(&out.join("disk.img")).expect("hash");
        assert_eq!(
            again, original,
            "the unchanged re-backup does not restore bit-identical"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// Bytes free for an unprivileged writer in the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs fills the struct we pass from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    st.f_bavail as u64 * st.f_frsize as u64
}

/// The sequential write + fsync speed of the filesystem holding `dir`
/// (1 GiB in 8 MiB writes, like `dd bs=8M count=128 conv=fsync`), MB/s.
fn write_speed(dir: &Path) -> (u64, f64) {
    use std::io::Write;
    let path = dir.join("write-speed.tmp");
    let block: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    let t = Instant::now();
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&path)?;
        for _ in 0..128 {
            f.write_all(&block)?;
        }
        f.sync_all()
    })();
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    if let Err(e) = result {
        eprintln!("write speed of {}: {e}", dir.display());
        return (0, secs);
    }
    (128 << 23, secs)
}

/// `--scale`: full backup, re-backup (every byte read again:
/// `--force-read`) and restore of the generated image at each of
/// `--scale-gib` sizes (default 1, 4, 16 GiB), one run per phase, each
/// restore checked bit-identical. Pools go to `--pool-dir`, restores to
/// `--restore-dir` (default: the pool directory); a size whose pool or
/// restore does not fit is reported as skipped (a row of its own). The write + fsync speed of
/// both directories is measured first: a phase writing there at close to
/// it is bound by the disk, not by Cairn. CPU seconds per GiB are the
/// steadier figure on a noisy machine.
fn scale(a: &Args, rows: &mut Vec<Row>) {
    let work = a.pool_dir.clone().unwrap_or_else(|| a.dir.clone());
    let restore_dir = a.restore_dir.clone().unwrap_or_else(|| work.clone());
    for d in [&a.dir, &work, &restore_dir] {
        std::fs::create_dir_all(d).expect("bench dir");
    }
    for (what, d) in [("pool", &work), ("restore", &restore_dir)] {
        let (bytes, wall) = write_speed(d);
        let r = Row {
            phase: format!("disk write + fsync ({what})"),
            bytes,
            wall,
            cpu: 0.0,
            rss: 0.0,
            note: d.display().to_string(),
        };
        eprintln!(
            "{:<28} {:>9.0} MB/s  {}",
            r.phase,
            bytes as f64 / wall / 1e6,
            r.note
        );
        rows.push(r);
    }
    let per_gib = |r: &Row| {
        format!(
            "cpu {:.2} s/GiB",
            r.cpu / (r.bytes as f64 / (1u64 << 30) as f64)
        )
    };
    for &gib in &a.scale_gib {
        let size = gib << 30;
        let img = a.dir.join(format!("mixed-{size}.img"));
        let skipped = |rows: &mut Vec<Row>, why: String| {
            eprintln!("{gib} GiB: skipped, {why}");
            rows.push(Row {
                phase: format!("{gib} GiB"),
                bytes: 0,
                wall: 0.0,
                cpu: 0.0,
                rss: 0.0,
                note: format!("skipped: {why}"),
            });
        };
        if !img.exists() {
            if free_bytes(&a.dir) < size {
                skipped(
                    rows,
                    format!("{} has less than {gib} GiB free", a.dir.display()),
                );
                continue;
            }
            // Generated under a temporary name: an interrupted run leaves
            // no partial image to be taken for a whole one.
            let partial = a.dir.join(format!("mixed-{size}.img.partial"));
            let (r, ()) = measure(&format!("generate {gib} GiB"), || {
                generate_image(&partial, size, 1).expect("generate");
                std::fs::rename(&partial, &img).expect("rename the image");
                (size, (), String::new())
            });
            rows.push(r);
        }
        // Stored: ≈ 45 % of the image; restored: its data, ≈ 80 %; both
        // at once when they share a filesystem.
        let (pool_need, restore_need) = (size / 2, size * 4 / 5);
        let same_fs = {
            use std::os::unix::fs::MetadataExt;
            let dev = |d: &Path| std::fs::metadata(d).map(|m| m.dev()).ok();
            dev(&work).is_some() && dev(&work) == dev(&restore_dir)
        };
        let fits = if same_fs {
            free_bytes(&work) >= pool_need + restore_need
        } else {
            free_bytes(&work) >= pool_need && free_bytes(&restore_dir) >= restore_need
        };
        if !fits {
            skipped(
                rows,
                format!(
                    "the pool needs {} GB free in {} and the restore {} GB in {}{}",
                    pool_need / 1_000_000_000,
                    work.display(),
                    restore_need / 1_000_000_000,
                    restore_dir.display(),
                    if same_fs {
                        " (the same filesystem)"
                    } else {
                        ""
                    }
                ),
            );
            continue;
        }
        warm(&img);
        let repo = fresh_repo(&work.join("scale-pool"));
        let (mut r, full) = measure(&format!("full backup {gib} GiB"), || {
            let s = run_backup(&repo, &img, a);
            (s.bytes_logical, s.clone(), note(&s))
        });
        r.note = format!("{}; {}", r.note, per_gib(&r));
        rows.push(r);
        let (mut r, ()) = measure(&format!("re-backup {gib} GiB (--force-read)"), || {
            let s = run_backup_with(&repo, &img, a, false);
            (s.bytes_logical, (), note(&s))
        });
        r.note = format!("{}; {}", r.note, per_gib(&r));
        rows.push(r);
        let out = restore_dir.join("scale-restore");
        let _ = std::fs::remove_dir_all(&out);
        let (mut r, ()) = measure(&format!("restore {gib} GiB"), || {
            restore_phase(&repo, &full.snapshot, &out, a)
        });
        r.note = format!("{}; {}", r.note, per_gib(&r));
        rows.push(r);
        let restored = cairn_engine::sample::hash_file(&out.join("disk.img")).expect("hash");
        let original = cairn_engine::sample::hash_file(&img).expect("hash");
        assert_eq!(
            restored, original,
            "{gib} GiB: restore is not bit-identical"
        );
        let _ = std::fs::remove_dir_all(&out);
        let _ = std::fs::remove_dir_all(work.join("scale-pool"));
    }
}

/// Copies between two local pools: the base image backed up once, then
/// copied into a fresh pool (every chunk moves, decoded and re-hashed on
/// the way) and back out of it into another — MB/s of stored bytes moved
/// and of the snapshot's logical bytes. Pools go to `--pool-dir` (tmpfs:
/// the copy's own cost).
fn copy(a: &Args, rows: &mut Vec<Row>) {
    let (base, _, size) = images(a, rows);
    warm(&base);
    let work = a.pool_dir.clone().unwrap_or_else(|| a.dir.clone());
    std::fs::create_dir_all(&work).expect("pool dir");
    let source = fresh_repo(&work.join("copy-source"));
    let snap = run_backup(&source, &base, a).snapshot;
    let opts = cairn_engine::CopyOptions::default()
        .with_threads(NonZeroUsize::new(a.threads))
        .with_snapshots(vec![snap]);
    let mut copied = None;
    let (r, ()) = median(a.repeat, || {
        copied = None;
        let target = fresh_repo(&work.join("copy-target"));
        let (row, ()) = measure("copy dedup → dedup", || {
            let s = source.copy_to(&target, &opts).expect("copy");
            (
                s.bytes_copied,
                (),
                format!(
                    "{} chunks, {:.0} MB stored, {:.0} MB/s of logical bytes",
                    s.chunks_copied,
                    s.bytes_copied as f64 / 1e6,
                    size as f64 / s.seconds / 1e6
                ),
            )
        });
        copied = Some(target);
        (row, ())
    });
    rows.push(r);
    let target = copied.expect("a copy ran");
    // And back: from the copy into an empty pool.
    let (r, ()) = median(a.repeat, || {
        let back = fresh_repo(&work.join("copy-back"));
        measure("copy back (copy → dedup)", || {
            let s = target.copy_to(&back, &opts).expect("copy back");
            (
                s.bytes_copied,
                (),
                format!("{:.0} MB/s of logical bytes", size as f64 / s.seconds / 1e6),
            )
        })
    });
    rows.push(r);
    // Through the tape pool on the virtual library (cartridges of 1 GiB in
    // the pool directory: the copy spans several).
    let tape_runs = std::cell::Cell::new(0);
    let fresh_tape = || {
        // A directory per run: the run the median picks is read back below.
        let tape_dir = work.join(format!("copy-tape-{}", tape_runs.get()));
        tape_runs.set(tape_runs.get() + 1);
        let _ = std::fs::remove_dir_all(&tape_dir);
        let mut vtl = cairn_pools::tape::VirtualTapeOptions::new(8, 1 << 30);
        vtl.early_warning = 64 << 20;
        let library = cairn_pools::tape::VirtualTapeLibrary::create(tape_dir.join("library"), &vtl)
            .expect("virtual library");
        let tape_pool =
            cairn_pools::tape::TapePool::open(&tape_dir, Box::new(library)).expect("tape pool");
        Repository::init(Arc::new(tape_pool.clone())).expect("init tape");
        tape_pool
    };
    // Into the open media set of a fresh tape pool each time, as `cairn
    // copy` writes; the drive's own rate while it streamed, and the share
    // of the copy's time it streamed, beside.
    let (r, tape_pool) = median(a.repeat, || {
        let tape_pool = fresh_tape();
        let media_set =
            Repository::open(Arc::new(tape_pool.current_set().expect("media set"))).expect("set");
        measure("copy dedup → tape", || {
            let s = source.copy_to(&media_set, &opts).expect("copy to tape");
            let w = tape_pool.write_stats();
            (
                s.bytes_copied,
                tape_pool.clone(),
                format!(
                    "{:.0} MB/s of logical bytes; drive held {:.0} MB/s while streaming, streamed {:.0} % of the time",
                    size as f64 / s.seconds / 1e6,
                    w.rate_held() / 1e6,
                    100.0 * w.streaming_seconds / s.seconds
                ),
            )
        })
    });
    rows.push(r);
    let tape = Repository::open(Arc::new(tape_pool.clone())).expect("open tape");
    let (r, ()) = median(a.repeat, || {
        let back = fresh_repo(&work.join("copy-back"));
        measure("copy tape → dedup", || {
            let s = tape.copy_to(&back, &opts).expect("copy from tape");
            (
                s.bytes_copied,
                (),
                format!("{:.0} MB/s of logical bytes", size as f64 / s.seconds / 1e6),
            )
        })
    });
    rows.push(r);
    drop((tape, tape_pool));
    for dir in ["copy-source", "copy-target", "copy-back"] {
        let _ = std::fs::remove_dir_all(work.join(dir));
    }
    for n in 0..tape_runs.get() {
        let _ = std::fs::remove_dir_all(work.join(format!("copy-tape-{n}")));
    }
}

/// The object pool on loopback: full backup and restore of the base image
/// into an S3 pool (an s3s-fs server started here unless `--s3 ADDRESS`
/// names one; credentials then come from the environment), with requests
/// per GiB stored and restored. Skipped with a message when no server can
/// be had.
fn s3(a: &Args, rows: &mut Vec<Row>) {
    let (base, _, _) = images(a, rows);
    warm(&base);
    let work = a.pool_dir.clone().unwrap_or_else(|| a.dir.clone());
    std::fs::create_dir_all(&work).expect("work dir");
    let mut server = None;
    let address = match &a.s3 {
        Some(address) => address.clone(),
        None => {
            if std::process::Command::new("s3s-fs")
                .arg("--version")
                .output()
                .is_err()
                && !std::path::Path::new(&format!(
                    "{}/.cargo/bin/s3s-fs",
                    std::env::var("HOME").unwrap_or_default()
                ))
                .exists()
            {
                eprintln!("s3 phase skipped: no --s3 ADDRESS and no s3s-fs binary (cargo install s3s-fs@0.14.1 --locked --features binary)");
                return;
            }
            let srv = cairn_pools::testing::S3Server::start();
            srv.create_bucket("bench");
            for (k, v) in srv.env() {
                std::env::set_var(k, v);
            }
            let address = srv.address("bench", "pool", "");
            server = Some(srv);
            address
        }
    };
    let mut attempt = 0;
    let mut kept: Option<(BackupStats, Repository, cairn_pools::OpenedPool)> = None;
    let (r, ()) = median(a.repeat, || {
        // A fresh prefix per run: s3://BUCKET/PREFIX-N?…
        let address = match address.split_once('?') {
            Some((path, query)) => format!("{path}-run{attempt}?{query}"),
            None => format!("{address}-run{attempt}"),
        };
        attempt += 1;
        let opened = cairn_pools::create(&address).expect("open the S3 pool");
        let repo = Repository::create(opened.pool.clone()).expect("init the S3 pool");
        let before = opened.requests.as_ref().map_or(0, |r| r.total());
        let server_cpu = server.as_ref().map_or(0.0, |s| s.cpu_seconds());
        let (row, stats) = measure("S3 full backup", || {
            let s = run_backup(&repo, &base, a);
            let requests = opened.requests.as_ref().map_or(0, |r| r.total()) - before;
            let per_gib = requests as f64 / (s.bytes_new as f64 / (1u64 << 30) as f64);
            let server_cpu = server.as_ref().map_or(0.0, |s| s.cpu_seconds()) - server_cpu;
            let n = format!(
                "{}; {requests} requests, {per_gib:.1} per GiB stored; server cpu {server_cpu:.2} s",
                note(&s)
            );
            (s.bytes_logical, s.clone(), n)
        });
        kept = Some((stats, repo, opened));
        (row, ())
    });
    rows.push(r);
    let (full, repo, opened) = kept.expect("at least one run");
    let out = work.join("restore-s3");
    let (r, _) = median(a.repeat, || {
        let _ = std::fs::remove_dir_all(&out);
        let before = opened.requests.as_ref().map_or(0, |r| r.total());
        let server_cpu = server.as_ref().map_or(0.0, |s| s.cpu_seconds());
        measure("S3 restore (sparse file)", || {
            let opts = RestoreOptions::default()
                .with_threads(NonZeroUsize::new(a.threads))
                .with_overwrite(true);
            let s = repo
                .restore_to_dir(&full.snapshot, &out, &opts)
                .expect("restore");
            let requests = opened.requests.as_ref().map_or(0, |r| r.total()) - before;
            let per_gib = requests as f64 / (s.bytes_logical as f64 / (1u64 << 30) as f64);
            let server_cpu = server.as_ref().map_or(0.0, |s| s.cpu_seconds()) - server_cpu;
            (
                s.bytes_logical,
                (),
                format!(
                    "{requests} requests, {per_gib:.1} per GiB restored; server cpu {server_cpu:.2} s"
                ),
            )
        })
    });
    rows.push(r);
    let restored = cairn_engine::sample::hash_file(&out.join("disk.img")).expect("hash");
    let original = cairn_engine::sample::hash_file(&base).expect("hash");
    assert_eq!(restored, original, "S3 restore is not bit-identical");
    let _ = std::fs::remove_dir_all(&out);
    drop(server);
}

fn index(a: &Args, rows: &mut Vec<Row>) {
    let n = a.index_chunks;
    let (r, seg) = measure("index: build segment", || {
        let entries: Vec<PackEntry> = (0..n)
            .map(|i| PackEntry {
                id: ChunkId::of(&i.to_le_bytes()),
                offset: 16 + (i as u64 % 1000) * 40_000,
                length: 40_000,
                raw_length: 65536,
            })
            .collect();
        let mut b = SegmentBuilder::new();
        for (p, chunk) in entries.chunks(1000).enumerate() {
            b.add_entries(
                PackId([(p % 251) as u8; 16].map(|x| x ^ (p >> 8) as u8)),
                chunk,
            );
        }
        let bytes = b.encode();
        let len = bytes.len();
        let data = if a.huge_pages {
            // Anonymous memory backed by transparent huge pages: fewer TLB misses.
            let mut map = memmap2::MmapMut::map_anon(len).expect("anonymous map");
            let _ = map.advise(memmap2::Advice::HugePage);
            map.copy_from_slice(&bytes);
            bytes::Bytes::from_owner(map.make_read_only().expect("read-only map"))
        } else {
            bytes::Bytes::from(bytes)
        };
        let seg = Segment::decode(data).expect("segment");
        (
            len as u64,
            seg,
            format!("{n} chunks, {} B per chunk", len as u64 / n as u64),
        )
    });
    rows.push(r);
    let threads = if a.threads == 0 { 2 } else { a.threads };
    let per_thread = 2_000_000u32;
    for hits in [true, false] {
        // Ids are computed before timing: this measures lookups alone.
        let ids: Vec<Vec<ChunkId>> = (0..threads as u32)
            .map(|t| {
                (0..per_thread)
                    .map(|i| {
                        let k = (i.wrapping_mul(2_654_435_761) ^ t) % n;
                        ChunkId::of(&(if hits { k } else { n + k }).to_le_bytes())
                    })
                    .collect()
            })
            .collect();
        let phase = if hits {
            "index: lookups (hits)"
        } else {
            "index: lookups (misses)"
        };
        let (mut r, found) = measure(phase, || {
            let found: usize = std::thread::scope(|s| {
                let handles: Vec<_> = ids
                    .iter()
                    .map(|ids| {
                        let seg = &seg;
                        s.spawn(move || {
                            // As the backup workers do: one batch of ids at a time.
                            let mut out = vec![None; 64];
                            let mut found = 0;
                            for batch in ids.chunks(64) {
                                seg.lookup_many(batch, &mut out[..batch.len()]);
                                found += out[..batch.len()].iter().filter(|o| o.is_some()).count();
                            }
                            found
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
            });
            (0, found, String::new())
        });
        let lookups = per_thread as f64 * threads as f64;
        // A correctness check too (the quick run in CI relies on it): the
        // count, and where the first 100 000 hits of thread 0 point.
        if hits {
            for i in 0..per_thread.min(100_000) {
                let k = i.wrapping_mul(2_654_435_761) % n;
                let loc = seg.lookup(&ChunkId::of(&k.to_le_bytes()));
                assert_eq!(
                    loc.map(|l| (l.offset, l.length)),
                    Some((16 + (k as u64 % 1000) * 40_000, 40_000)),
                    "index lookup of chunk {k}"
                );
            }
        }
        let want = if hits {
            per_thread as usize * threads
        } else {
            0
        };
        assert_eq!(found, want, "index lookups found {found} of {want}");
        r.note = format!(
            "{:.1} M lookups/s ({threads} threads, {found} found)",
            lookups / r.wall / 1e6
        );
        eprintln!("    {}", r.note);
        rows.push(r);
    }
}

/// `N` unique 4 KiB blocks that compress to a few dozen bytes each.
fn gc_image(first: u64, n: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((n * 4096) as usize);
    for i in first..first + n {
        let stamp = format!("{i:016x}");
        for _ in 0..256 {
            out.extend_from_slice(stamp.as_bytes());
        }
    }
    out
}

/// `n` unique 4 KiB blocks: every `step`th block of [`gc_image`]'s.
fn gc_image_every(n: u64, step: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((n / step * 4096) as usize);
    for i in (0..n).step_by(step as usize) {
        out.extend_from_slice(&gc_image(i, 1));
    }
    out
}

/// GC of a pool with `--gc-chunks` chunks, twice: half of them garbage in
/// whole packs (deleted), then two thirds garbage spread over every pack
/// (repacked). The pools are built here; each collection runs in a fresh
/// process (so its peak RSS is its own, not what building the pool left
/// in the allocator).
fn gc(a: &Args, rows: &mut Vec<Row>) {
    let n = a.gc_chunks;
    for (label, keep) in [("delete", 0u64), ("repack", 3)] {
        let dir = a.dir.join("gc-pool");
        let _ = std::fs::remove_dir_all(&dir);
        let repo = fresh_repo(&dir);
        let opts = BackupOptions::new("gc")
            .with_chunking(cairn_engine::ChunkingParams::Fixed { size: 4096 });
        let (row, _) = measure(&format!("gc {label}: build pool"), || {
            let second = if keep == 0 {
                gc_image(0, n / 2)
            } else {
                gc_image_every(n, keep)
            };
            let mut ids = Vec::new();
            for image in [gc_image(0, n), second] {
                let disk = BackupDisk::image("vda", cairn_engine::MemorySource::new("vda", image));
                ids.push(repo.backup(vec![disk], &opts).expect("backup").snapshot);
            }
            repo.forget(&ids[..1]).expect("forget");
            (
                n * 4096,
                (),
                if keep == 0 {
                    format!("{n} chunks, the second half then garbage")
                } else {
                    format!("{n} chunks, all but every {keep}th then garbage")
                },
            )
        });
        rows.push(row);
        drop(repo);
        rows.push(child_phase(
            &format!("gc {label}: collect"),
            "--gc-pool",
            &dir,
        ));
        if keep == 0 {
            rows.push(child_phase(
                "verify (structural) after gc",
                "--verify-pool",
                &dir,
            ));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `repair --index` of a pool of `--index-chunks` chunks (packs of 10 000
/// stored 8-byte blobs, written directly: the rebuild reads only the
/// packs' tables), in a fresh process.
fn rebuild(a: &Args, rows: &mut Vec<Row>) {
    let dir = a.dir.join("rebuild-pool");
    let _ = std::fs::remove_dir_all(&dir);
    let repo = fresh_repo(&dir);
    drop(repo);
    let pool: DynPool = Arc::new(LocalPool::open(&dir).expect("pool"));
    let n = a.index_chunks as u64;
    let (row, _) = measure("rebuild: write packs", || {
        let mut codec = BlobCodec::new(cairn_engine::Compression::None);
        let mut blob = Vec::new();
        let mut i = 0u64;
        while i < n {
            let mut w = PackWriter::create(&*pool).expect("pack");
            for _ in 0..10_000.min(n - i) {
                let chunk = i.to_le_bytes();
                blob.clear();
                codec.encode_into(&chunk, &mut blob).expect("encode");
                w.add(ChunkId::of(&chunk), 8, &blob).expect("add");
                i += 1;
            }
            w.finish().expect("seal");
        }
        (0, (), format!("{n} chunks in {} packs", n.div_ceil(10_000)))
    });
    rows.push(row);
    rows.push(child_phase(
        "rebuild: repair --index",
        "--rebuild-pool",
        &dir,
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs this binary with `flag DIR` and reads back its report and peak RSS.
fn child_phase(phase: &str, flag: &str, dir: &Path) -> Row {
    let exe = std::env::current_exe().expect("own path");
    let (c0, t0) = (children_cpu_seconds(), Instant::now());
    let out = std::process::Command::new(exe)
        .arg(flag)
        .arg(dir)
        .output()
        .expect("child");
    let wall = t0.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let rss = text
        .lines()
        .find_map(|l| l.strip_prefix("peak-rss-mib "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let report = text
        .lines()
        .find_map(|l| l.strip_prefix("report "))
        .unwrap_or("?")
        .to_string();
    eprintln!("{phase}: {wall:.2} s, peak RSS {rss:.1} MiB: {report}");
    Row {
        phase: phase.into(),
        bytes: 0,
        wall,
        cpu: children_cpu_seconds() - c0,
        rss,
        note: report,
    }
}

fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; no other memory is touched.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// The child side of [`gc`].
fn gc_child(pool: &Path) {
    let pool: DynPool = Arc::new(LocalPool::open(pool).expect("pool"));
    let repo = Repository::open(pool).expect("repo");
    let report = repo.gc(&cairn_engine::GcOptions::default()).expect("gc");
    println!("report {report}");
    println!("peak-rss-mib {:.1}", peak_rss_mib());
}

/// The child side of the verify phase of [`gc`].
fn verify_child(pool: &Path) {
    let pool: DynPool = Arc::new(LocalPool::open(pool).expect("pool"));
    let repo = Repository::open(pool).expect("repo");
    let report = repo
        .verify(&cairn_engine::VerifyOptions::default())
        .expect("verify");
    println!("report {report}");
    println!("peak-rss-mib {:.1}", peak_rss_mib());
}

/// The child side of [`rebuild`].
fn rebuild_child(pool: &Path) {
    let pool: DynPool = Arc::new(LocalPool::open(pool).expect("pool"));
    let repo = Repository::open(pool).expect("repo");
    let report = repo.repair_index().expect("rebuild");
    println!("report {report}");
    println!("peak-rss-mib {:.1}", peak_rss_mib());
}

/// Listing and parent lookup at 10 000 snapshots (written as files).
fn catalog(a: &Args, rows: &mut Vec<Row>) {
    let dir = a.dir.join("catalog-pool");
    let _ = std::fs::remove_dir_all(&dir);
    let repo = fresh_repo(&dir);
    for i in 0..10_000u64 {
        let mut disk = cairn_engine::DiskManifest::new("vda");
        disk.push(65536, Some(ChunkId::of(&i.to_le_bytes())));
        disk.push(1 << 30, None);
        let s = cairn_engine::Snapshot {
            time: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000 + i),
            vm: format!("vm-{}", i % 100),
            mode: cairn_engine::SnapshotMode::Full,
            parent: None,
            id_scheme: cairn_engine::IdScheme::Blake3,
            chunking: cairn_engine::ChunkingParams::default(),
            compression: cairn_engine::Compression::default(),
            properties: Default::default(),
            disks: vec![disk],
        };
        let bytes = s.encode();
        let id = cairn_engine::SnapshotId::of_manifest(&bytes);
        std::fs::write(dir.join("snapshots").join(id.to_hex()), bytes).expect("write");
    }
    for phase in [
        "catalog: first listing",
        "catalog: listing",
        "catalog: parent lookup",
    ] {
        let (row, _) = measure(phase, || {
            if phase.ends_with("lookup") {
                let found = repo.latest_with_disk("vm-7", "vda").expect("lookup");
                (0, (), format!("found: {}", found.is_some()))
            } else {
                let n = repo.snapshots().expect("list").snapshots.len();
                (0, (), format!("{n} snapshots"))
            }
        });
        rows.push(row);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The job runner's cost over a direct backup (both medians of 3, fresh
/// pools, the image through the inventory platform), a backup cancelled at
/// half the image and resumed (share of the image the resumed run reads),
/// the rate limit on the real clock at 50 MiB/s and 2 GiB/s, and the
/// daemon idling for 10 s.
fn jobs(a: &Args, rows: &mut Vec<Row>) {
    use cairn_engine::jobs::{
        Daemon, Job, JobDefinition, JobEnvironment, JobRunner, NoNotifier, RateLimit, StateDir,
        Throttle, Trigger,
    };
    let (base, _, size) = images(a, rows);
    let base = base.canonicalize().expect("image path");
    warm(&base);
    let work = a.dir.join("jobs");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("jobs dir");
    let (row, ()) = median(3, || {
        let repo = fresh_repo(&work.join("direct"));
        measure("backup, direct", || {
            let s = run_backup(&repo, &base, a);
            (size, (), note(&s))
        })
    });
    let direct = row.wall;
    rows.push(row);

    struct Env(PathBuf);
    impl JobEnvironment for Env {
        fn platform(
            &self,
            _: &Job,
            _: &cairn_engine::CancelToken,
        ) -> cairn_engine::Result<Arc<dyn cairn_engine::Platform>> {
            Ok(Arc::new(cairn_cas::InventoryPlatform::open(
                &self.0,
                cairn_cas::ReadSettings::default(),
            )?))
        }
        fn pool(&self, job: &Job) -> cairn_engine::Result<DynPool> {
            Ok(Arc::new(
                LocalPool::open(&job.definition.pool).map_err(cairn_engine::Error::from)?,
            ))
        }
    }
    let inventory = work.join("inventory.toml");
    std::fs::write(
        &inventory,
        format!(
            "restore_dir = \"restored\"\n[[vm]]\nname = \"bench\"\n[[vm.disk]]\ndevice = \"vda\"\npath = \"{}\"\n",
            base.display()
        ),
    )
    .expect("inventory");
    let env = Env(inventory);
    let state = StateDir::new(work.join("state"));
    let pool_dir = work.join("job-pool");
    let job = JobDefinition::from_toml(
        &format!(
            "name = \"bench\"\nkind = \"backup\"\nplatform = \"inventory:x\"\npool = \"{}\"\n\
             [select]\nvms = [\"bench\"]\n[capacity]\nmin_free_percent = 0\nmin_free = \"0\"\n",
            pool_dir.display()
        ),
        "bench.toml",
    )
    .expect("job")
    .resolve()
    .expect("job");
    let (row, ()) = median(3, || {
        fresh_repo(&pool_dir);
        let runner = JobRunner::new(&state, &env, &NoNotifier);
        measure("backup, through a job", || {
            let r = runner.run(&job, Trigger::Manual, None).expect("job run");
            assert_eq!(r.status, cairn_engine::jobs::RunStatus::Succeeded, "{r:?}");
            (
                size,
                (),
                format!("{} VM, {:.0} MB new", r.vms.len(), r.bytes_new as f64 / 1e6),
            )
        })
    });
    let overhead = (row.wall / direct - 1.0) * 100.0;
    rows.push(Row {
        note: format!("{} ({overhead:+.1} % vs direct)", row.note),
        ..row
    });

    // Cancelled at half the image, then resumed.
    struct Half {
        seen: std::sync::atomic::AtomicU64,
        at: u64,
        cancel: cairn_engine::CancelToken,
    }
    impl cairn_engine::Progress for Half {
        fn advance(&self, bytes: u64) {
            use std::sync::atomic::Ordering;
            if self.seen.fetch_add(bytes, Ordering::SeqCst) + bytes >= self.at {
                self.cancel.cancel();
            }
        }
    }
    let repo = fresh_repo(&work.join("resume-pool"));
    let journals = work.join("journals");
    let cancel = cairn_engine::CancelToken::new();
    let opts = BackupOptions::new("bench")
        .with_threads(NonZeroUsize::new(a.threads))
        .with_resume_dir(&journals);
    let stopped = opts
        .clone()
        .with_cancel(cancel.clone())
        .with_progress(Arc::new(Half {
            seen: Default::default(),
            at: size / 2,
            cancel,
        }));
    let _ = repo.backup(vec![disk(&base, false)], &stopped);
    let (row, ()) = measure("backup resumed at 50 %", || {
        let s = repo
            .backup(vec![disk(&base, false)], &opts)
            .expect("resume");
        (
            s.bytes_read,
            (),
            format!(
                "read {:.1} % of the image, resumed {:.1} %",
                s.bytes_read as f64 * 100.0 / size as f64,
                s.bytes_resumed as f64 * 100.0 / size as f64
            ),
        )
    });
    rows.push(row);

    // The rate limit on the real clock.
    for (rule, rate) in [("50MiB/s", 50u64 << 20), ("2GiB/s", 2u64 << 30)] {
        let limit = RateLimit::parse(&[rule]).expect("rule");
        let throttle = Throttle::new(
            limit,
            jiff::tz::TimeZone::UTC,
            Arc::new(cairn_engine::jobs::SystemClock),
        );
        let (row, ()) = measure(&format!("rate limit {rule}"), || {
            let t0 = Instant::now();
            let mut moved = 0u64;
            while t0.elapsed() < std::time::Duration::from_secs(5) {
                throttle.take(1 << 20);
                moved += 1 << 20;
            }
            let got = moved as f64 / t0.elapsed().as_secs_f64();
            (
                moved,
                (),
                format!("{:+.1} % of the limit", (got / rate as f64 - 1.0) * 100.0),
            )
        });
        rows.push(row);
    }

    // The daemon idling: one job, next due in a year.
    let idle_state = StateDir::new(work.join("idle-state"));
    let mut idle = job.definition.clone();
    idle.schedule = "monthly jan 1 03:00".into();
    idle_state.add_job(&idle, true).expect("idle job");
    let runner = JobRunner::new(&idle_state, &env, &NoNotifier);
    let daemon = Daemon::new(&idle_state, runner).expect("daemon");
    let stop = cairn_engine::CancelToken::new();
    let (row, ()) = measure("daemon idle 10 s", || {
        let stopper = stop.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(10));
            stopper.cancel();
        });
        daemon.run(std::time::Duration::from_secs(1), &stop, &mut |_| {});
        t.join().expect("timer");
        (0, (), String::from("CPU s over 10 s of wall time"))
    });
    rows.push(row);
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cairn-bench: {e}");
            std::process::exit(2);
        }
    };
    if let Some(pool) = &a.gc_pool {
        gc_child(pool);
        return;
    }
    if let Some(pool) = &a.rebuild_pool {
        rebuild_child(pool);
        return;
    }
    if let Some(pool) = &a.verify_pool {
        verify_child(pool);
        return;
    }
    let mut rows = Vec::new();
    let only = a.only.as_deref();
    if only.is_none_or(|o| o == "pipeline" || o == "quick") {
        pipeline(&a, &mut rows);
    }
    if only.is_none_or(|o| o == "index" || o == "quick") {
        index(&a, &mut rows);
    }
    if only.is_none_or(|o| o == "cbt") {
        cbt(&a, &mut rows);
    }
    if only.is_none_or(|o| o == "s3") {
        s3(&a, &mut rows);
    }
    if only == Some("gc") {
        gc(&a, &mut rows);
    }
    if only == Some("copy") {
        copy(&a, &mut rows);
    }
    if only == Some("catalog") {
        catalog(&a, &mut rows);
    }
    if only == Some("rebuild") {
        rebuild(&a, &mut rows);
    }
    if only == Some("jobs") {
        jobs(&a, &mut rows);
    }
    if only == Some("scale") {
        scale(&a, &mut rows);
    }
    if let Some(path) = &a.json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "phase": r.phase,
                    "bytes": r.bytes,
                    "mb_per_s": if r.bytes > 0 { r.bytes as f64 / r.wall / 1e6 } else { 0.0 },
                    "wall_s": r.wall,
                    "cpu_s": r.cpu,
                    "peak_rss_mib": r.rss,
                    "note": r.note,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "size_gib": a.size_gib,
            "repeat": a.repeat,
            "threads": a.threads,
            "phases": list,
        });
        let text = serde_json::to_string_pretty(&doc).expect("JSON");
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("cairn-bench: writing {}: {e}", path.display());
            std::process::exit(1);
        }
    }
    println!("| phase | MB/s | wall s | CPU s | peak RSS MiB | notes |");
    println!("|---|---:|---:|---:|---:|---|");
    for r in rows {
        let mbps = if r.bytes > 0 {
            format!("{:.0}", r.bytes as f64 / r.wall / 1e6)
        } else {
            "-".into()
        };
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.1} | {} |",
            r.phase, mbps, r.wall, r.cpu, r.rss, r.note
        );
    }
}
