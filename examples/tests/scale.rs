//! Scale checks of the CLI (issue #11, point 4b): an 8 TiB disk that holds
//! 4 MiB of data every 64 GiB backs up as a raw file and as a qcow2 (full,
//! then a CBT incremental), restores sparse (raw and qcow2) and verifies,
//! each with a peak RSS of at most 128 MiB. Holes are never read or
//! written: the bytes a backup reads are exactly the data, the restored
//! files allocate only the data, and `qemu-img compare` (an independent
//! reader) finds them identical to the sources. Sparse files this large
//! cost no disk space. The wall time of each step is printed, not asserted.
//!
//! The two tests take turns ([`one_at_a_time`]; `cargo test` runs a test
//! file's tests as threads of one process): together they would need the
//! sum of their disk space (about 6 GiB), one at a time the larger (about
//! 4.3 GiB). Each first checks that the temporary directory's filesystem
//! has the space it needs, and says so if not, instead of failing later
//! with a tool's bare exit code.

#![allow(clippy::unwrap_used)] // a failed step is a failed test

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use common::*;
use serde_json::Value;

const DISK: u64 = 8 << 40;
const STRIDE: u64 = 64 << 30;
const DATA: u64 = 4 << 20;
const PEAK_RSS_LIMIT: u64 = 128 << 20;

/// Held by each test while it runs: see the module's doc.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    // A test that failed while holding it leaves nothing the other needs.
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Fails the test at once, with the figures, if `dir`'s filesystem has
/// less than `need` bytes free.
fn require_free(dir: &Path, need: u64) {
    let free = free_bytes(dir);
    assert!(
        free >= need,
        "this test writes up to {} MiB under {}, whose filesystem has {} MiB free",
        need >> 20,
        dir.display(),
        free >> 20
    );
}

/// Runs `cairn args`, which must succeed; returns its stdout and its peak
/// RSS in bytes, and prints how long it took.
fn measured(args: &[&str]) -> (String, u64) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn"));
    cmd.args(args).env("CAIRN_PRINT_PEAK_RSS", "1");
    let start = Instant::now();
    let out = output_within(cmd);
    let err = stderr(&out);
    assert!(out.status.success(), "cairn {args:?}: {err}");
    let rss = err
        .lines()
        .find_map(|l| l.strip_prefix("cairn: peak-rss-kib "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("peak RSS line")
        * 1024;
    eprintln!(
        "cairn {}: {:.2} s, peak RSS {:.1} MiB",
        args.join(" "),
        start.elapsed().as_secs_f64(),
        rss as f64 / (1 << 20) as f64
    );
    assert!(
        rss <= PEAK_RSS_LIMIT,
        "cairn {args:?}: peak RSS {rss} bytes, more than 128 MiB"
    );
    (String::from_utf8(out.stdout).unwrap(), rss)
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// `qemu-img compare` reads both images through their allocation maps, so
/// it compares 8 TiB of mostly holes in about a second.
fn compare(a: &Path, a_format: &str, b: &Path, b_format: &str) {
    tool(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            a_format,
            "-F",
            b_format,
            &p(a),
            &p(b),
        ],
    );
}

/// Stored bytes differ from region to region (a stamp of the region's
/// offset), so the pool holds every region, not one deduplicated chunk.
fn region(offset: u64) -> Vec<u8> {
    let mut block = vec![0u8; DATA as usize];
    for (i, word) in block.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(
            &(offset ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes(),
        );
    }
    block
}

#[test]
fn an_8_tib_sparse_disk_backs_up_restores_and_verifies_in_flat_memory() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let regions = DISK / STRIDE;
    // At most two copies of the data at once (a source and its restore),
    // the pool's copy, and the qcow2 images' metadata (L2 tables, the
    // bitmap: tens of MiB at 8 TiB).
    require_free(root, 3 * regions * (DATA + 65536) + (256 << 20));
    let pool = p(&root.join("pool"));
    ok(&["init", &pool]);

    // Raw file: full backup, restore, verify.
    let img = root.join("big.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(DISK).unwrap();
    for r in 0..regions {
        f.write_all_at(&region(r * STRIDE), r * STRIDE).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let (out, _) = measured(&["backup", &pool, "--vm", "raw", &p(&img), "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["bytes_logical"], DISK);
    assert_eq!(
        v["bytes_read"],
        regions * DATA,
        "only the data is read: {v}"
    );
    assert_eq!(v["bytes_new_raw"], regions * DATA, "{v}");
    let restored = root.join("restore-raw");
    measured(&[
        "restore",
        &pool,
        "latest",
        "--vm",
        "raw",
        "--to",
        &p(&restored),
    ]);
    let back = restored.join("big.img");
    assert_eq!(std::fs::metadata(&back).unwrap().len(), DISK);
    // The data, plus at most the filesystem's own extent blocks.
    let alloc = allocated(&back);
    assert!(
        (regions * DATA..regions * DATA + (1 << 20)).contains(&alloc),
        "restored file allocates {alloc} bytes for {} of data",
        regions * DATA
    );
    compare(&back, "raw", &img, "raw");
    std::fs::remove_dir_all(&restored).unwrap();
    std::fs::remove_file(&img).unwrap();

    // qcow2: a full backup through qemu-nbd (which starts a dirty bitmap),
    // guest writes through qemu-io, a CBT incremental, restores as raw and
    // as qcow2.
    let q = root.join("big.qcow2");
    new_qcow2(&q, "8T");
    let writes = |pattern: u8, shift: u64, len: &str| {
        let mut args: Vec<String> = Vec::new();
        for r in 0..regions {
            args.push("-c".into());
            args.push(format!("write -P {pattern} {} {len}", r * STRIDE + shift));
        }
        args.push(p(&q));
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .args(&args)
            .output()
            .expect("qemu-io (run scripts/test.sh to install it)");
        // qemu-io prints a failed command's reason ("write failed: …") on
        // its standard output, among a line per write done.
        let said = String::from_utf8_lossy(&out.stdout);
        let failed: Vec<&str> = said
            .lines()
            .filter(|l| !l.starts_with("wrote ") && !l.contains(" ops/sec)"))
            .collect();
        assert!(
            out.status.success(),
            "qemu-io ({}): {}\n{}\n({} MiB free under {})",
            out.status,
            stderr(&out),
            failed.join("\n"),
            free_bytes(root) >> 20,
            root.display()
        );
    };
    let backup = || -> Value {
        let (out, _) = measured(&[
            "backup",
            &pool,
            "--vm",
            "q",
            "--qcow2",
            &p(&q),
            "--bitmap",
            "b",
            "--json",
        ]);
        serde_json::from_str(&out).unwrap()
    };
    writes(7, 0, "4M");
    let v = backup();
    assert_eq!(v["mode"], "full", "{v}");
    assert_eq!(
        v["bytes_read"],
        regions * DATA,
        "only the data is read: {v}"
    );
    // 64 KiB at 1 GiB past each region: the incremental reads those alone.
    writes(9, 1 << 30, "64k");
    let v = backup();
    assert_eq!(v["mode"], "cbt", "{v}");
    assert_eq!(
        v["bytes_read"],
        regions * 65536,
        "only the dirty blocks: {v}"
    );
    assert_eq!(v["bytes_dirty"], regions * 65536, "{v}");

    let restored = root.join("restore-q");
    measured(&[
        "restore",
        &pool,
        "latest",
        "--vm",
        "q",
        "--to",
        &p(&restored),
    ]);
    let back = restored.join("big.qcow2");
    let data = regions * (DATA + 65536);
    let alloc = allocated(&back);
    assert!(
        (data..data + (1 << 20)).contains(&alloc),
        "restored file allocates {alloc} bytes for {data} of data"
    );
    compare(&back, "raw", &q, "qcow2");
    std::fs::remove_dir_all(&restored).unwrap();
    let restored = root.join("restore-q2");
    measured(&[
        "restore",
        &pool,
        "latest",
        "--vm",
        "q",
        "--to",
        &p(&restored),
        "--format",
        "qcow2",
    ]);
    let back = restored.join("big.qcow2");
    assert!(
        allocated(&back) < data + (64 << 20),
        "thin qcow2 allocates {} bytes for {data} of data",
        allocated(&back)
    );
    compare(&back, "qcow2", &q, "qcow2");
    std::fs::remove_dir_all(&restored).unwrap();

    measured(&["verify", &pool, "--read-data"]);
}

/// One 4 KiB block, not zero, that every block of the pattern disks repeats.
fn pattern_block() -> Vec<u8> {
    (0..4096u32).map(|i| (i % 251 + 1) as u8).collect()
}

/// A file of `size` bytes repeating [`pattern_block`]: at 4 KiB chunks,
/// one extent per block, all deduplicated to one stored chunk.
fn pattern_file(path: &Path, size: u64) {
    let block = pattern_block();
    let buf: Vec<u8> = block.iter().copied().cycle().take(1 << 20).collect();
    let f = std::fs::File::create(path).unwrap();
    let mut at = 0;
    while at < size {
        f.write_all_at(&buf, at).unwrap();
        at += buf.len() as u64;
    }
    f.set_len(size).unwrap();
}

/// Whether `path` holds `size` bytes of the pattern.
fn is_pattern(path: &Path, size: u64) -> bool {
    use std::io::Read;
    let block = pattern_block();
    let mut f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path).unwrap());
    let mut buf = vec![0u8; 4096];
    let mut read = 0;
    while read < size {
        if f.read_exact(&mut buf).is_err() || buf != block {
            return false;
        }
        read += 4096;
    }
    std::fs::metadata(path).unwrap().len() == size
}

/// Issue #11, point 4a: a disk of 1 048 576 extents (4 GiB at 4 KiB
/// chunks) backs up, restores and verifies within 32 MiB of the peak RSS
/// of a 64 MiB disk of the same pattern (16 384 extents). A version 1
/// manifest holds 56 B per extent decoded plus 37 B encoded (≈ 93 MiB
/// here); extent pages keep one page (≤ 16 384 extents at this chunking)
/// in memory at a time.
#[test]
fn a_million_extents_back_up_restore_and_verify_in_the_memory_of_a_few() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // One 4 GiB file at a time (the source is removed before its restore),
    // and a pool that holds one deduplicated chunk plus its metadata.
    require_free(root, (4 << 30) + (256 << 20));
    let pool = p(&root.join("pool"));
    ok(&["init", &pool]);
    let mut peaks = Vec::new();
    for (vm, size) in [("small", 64u64 << 20), ("large", 4u64 << 30)] {
        let img = root.join(format!("{vm}.img"));
        pattern_file(&img, size);
        let (out, backup) = measured(&[
            "backup",
            &pool,
            "--vm",
            vm,
            &p(&img),
            "--chunking",
            "fixed:4K",
            "--json",
        ]);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["chunks_total"], size / 4096, "{v}");
        std::fs::remove_file(&img).unwrap();
        let restored = root.join(format!("restore-{vm}"));
        let (_, restore) = measured(&[
            "restore",
            &pool,
            "latest",
            "--vm",
            vm,
            "--to",
            &p(&restored),
        ]);
        let back = restored.join(format!("{vm}.img"));
        assert!(is_pattern(&back, size), "{vm}: the restore differs");
        std::fs::remove_dir_all(&restored).unwrap();
        let (_, verify) = measured(&["verify", &pool, "--read-data"]);
        peaks.push([backup, restore, verify]);
    }
    let (small, large) = (peaks[0], peaks[1]);
    for (i, step) in ["backup", "restore", "verify"].iter().enumerate() {
        assert!(
            large[i] <= small[i] + (32 << 20),
            "{step}: peak RSS {} MiB for 1 M extents, {} MiB for 16 K",
            large[i] >> 20,
            small[i] >> 20
        );
    }
}
