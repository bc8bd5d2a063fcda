//! CBT backups of qcow2 files with real parts: images made with qemu-img,
//! guest writes made with qemu-io (recorded by the persistent bitmaps),
//! exports served by qemu-nbd, reference copies by `qemu-img convert`.
//! `scripts/test.sh` installs qemu-utils when missing.
#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cairn_cas::qemu::{
    backup_qcow2, backup_qcow2_vm, Qcow2BackupOptions, Qcow2Disk, Qcow2Image, Qcow2Outcome,
    Qcow2Target,
};
use cairn_engine::cbt::CbtPolicy;
use cairn_engine::format::{PROP_BITMAP, PROP_FALLBACK, PROP_NEXT_BITMAP, PROP_SPOT_CHECK};
use cairn_engine::sample::SampleRng;
use cairn_engine::{
    BackupOptions, BackupStats, DiskManifest, DiskTarget, DynPool, FileKind, Repository,
    RestoreOptions, SnapshotId,
};
use cairn_pools::MemoryPool;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (run scripts/test.sh to install it)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

struct Fixture {
    dir: tempfile::TempDir,
    image: PathBuf,
    repo: Repository,
    pool: DynPool,
}

const MIB: u64 = 1 << 20;

impl Fixture {
    fn new(size_mib: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("vda.qcow2");
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                &s(&image),
                &format!("{size_mib}M"),
            ],
        );
        let pool: DynPool = Arc::new(MemoryPool::new());
        Repository::init(pool.clone()).unwrap();
        let repo = Repository::open(pool.clone()).unwrap();
        Fixture {
            dir,
            image,
            repo,
            pool,
        }
    }

    fn write(&self, cmds: &[String]) {
        let mut args = Vec::new();
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        let img = s(&self.image);
        args.push(&img);
        run("qemu-io", &args);
    }

    fn backup(&self, chain: &str, policy: CbtPolicy) -> Qcow2Outcome {
        self.backup_with(&Qcow2BackupOptions {
            chain: chain.into(),
            policy,
            connections: 2,
            spot_check: 0,
            read: None,
        })
    }

    fn backup_with(&self, q: &Qcow2BackupOptions) -> Qcow2Outcome {
        backup_qcow2(
            &self.repo,
            &Qcow2Image::new(&self.image),
            "vda",
            &BackupOptions::new("vm"),
            q,
        )
        .unwrap()
    }

    /// A backup that must write a snapshot: its stats and next bitmap.
    fn expect_done(outcome: Qcow2Outcome) -> (BackupStats, String) {
        match outcome {
            Qcow2Outcome::Done {
                stats,
                next_bitmaps,
                warnings,
            } => {
                assert!(warnings.is_empty(), "{warnings:?}");
                (stats, next_bitmaps["vda"].clone())
            }
            o => panic!("expected a snapshot, got {o:?}"),
        }
    }

    fn done(&self, chain: &str) -> (BackupStats, String) {
        Self::expect_done(self.backup(chain, CbtPolicy::Full))
    }

    /// The image's raw content now, per `qemu-img convert`.
    fn reference(&self) -> blake3::Hash {
        let out = self.dir.path().join("reference.raw");
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                &s(&self.image),
                &s(&out),
            ],
        );
        let h = blake3::hash(&std::fs::read(&out).unwrap());
        std::fs::remove_file(out).unwrap();
        h
    }

    fn restored(&self, id: &SnapshotId) -> blake3::Hash {
        let out = self.dir.path().join("restore");
        let _ = std::fs::remove_dir_all(&out);
        self.repo
            .restore_to_dir(id, &out, &RestoreOptions::default())
            .unwrap();
        let h = blake3::hash(&std::fs::read(out.join("vda")).unwrap());
        std::fs::remove_dir_all(out).unwrap();
        h
    }

    fn bitmaps(&self) -> Vec<String> {
        Qcow2Image::new(&self.image)
            .info()
            .unwrap()
            .bitmaps
            .into_iter()
            .map(|b| b.name)
            .collect()
    }

    fn disk(&self, id: &SnapshotId) -> DiskManifest {
        self.repo.load_snapshot_with_extents(id).unwrap().disks[0].clone()
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Dirty bytes of `writes` (offset, length) rounded out to the 64 KiB grid.
fn grid_bytes(writes: &[(u64, u64)]) -> u64 {
    let mut blocks = std::collections::BTreeSet::new();
    for &(o, l) in writes {
        for b in o / 65536..(o + l).div_ceil(65536) {
            blocks.insert(b);
        }
    }
    blocks.len() as u64 * 65536
}

fn writes_cmds(writes: &[(u64, u64)], pattern: u8) -> Vec<String> {
    writes
        .iter()
        .map(|(o, l)| format!("write -P {pattern} {o} {l}"))
        .collect()
}

#[test]
fn incremental_reads_only_written_ranges_and_rotates_bitmaps() {
    let f = Fixture::new(64);
    f.write(&writes_cmds(&[(0, 8 * MIB), (30 * MIB, 3 * MIB)], 0x11));
    let (full, first) = f.done("daily");
    assert_eq!(full.mode.as_str(), "full");
    assert_eq!(full.bytes_read, 11 * MIB, "only allocated data is read");
    assert!(
        full.cbt_fallback.is_empty(),
        "a first backup is no fallback"
    );
    assert!(first.starts_with(&format!("daily.{}", &f.repo.config().pool_id.to_hex()[..8])));
    assert_eq!(first.len(), "daily.".len() + 16);
    assert_eq!(f.bitmaps(), vec![first.clone()]);
    assert_eq!(f.restored(&full.snapshot), f.reference());

    // Guest writes: a 4 KiB write costs one 64 KiB chunk, not megabytes.
    let writes = [
        (4 * MIB + 512, 4096),
        (20 * MIB - 100, 300),
        (40 * MIB, 200 * 1024),
        (63 * MIB, MIB),
    ];
    f.write(&writes_cmds(&writes, 0x5a));
    let (inc, second) = f.done("daily");
    assert_eq!(inc.mode.as_str(), "cbt");
    let expected = grid_bytes(&writes);
    assert_eq!(inc.bytes_dirty, expected);
    assert!(inc.bytes_read <= expected, "{inc:?}");
    assert_eq!(f.restored(&inc.snapshot), f.reference());
    // The consumed bitmap is retired, the next one records from here.
    assert_eq!(f.bitmaps(), vec![second.clone()]);
    let disk = f.disk(&inc.snapshot);
    assert_eq!(disk.properties.get(PROP_BITMAP), Some(&first));
    assert_eq!(disk.properties.get(PROP_NEXT_BITMAP), Some(&second));
    assert_eq!(
        f.repo.load_snapshot(&inc.snapshot).unwrap().parent,
        Some(full.snapshot)
    );

    // A run of this pool killed mid-backup left its new bitmap behind;
    // another pool backs the same image up under the same chain name.
    let pool_id = f.repo.config().pool_id.to_hex();
    let leaked = format!("daily.{}deadbeef", &pool_id[..8]);
    let foreign = "daily.ffffffff00000000".to_string();
    for b in [&leaked, &foreign] {
        run("qemu-img", &["bitmap", "--add", &s(&f.image), b]);
    }
    // Nothing written: nothing read, nothing but metadata stored; the leaked
    // bitmap is cleaned up, the other pool's is left alone.
    let (idle, third) = f.done("daily");
    assert_eq!(
        (idle.mode.as_str(), idle.bytes_read, idle.chunks_new),
        ("cbt", 0, 0)
    );
    let mut left = f.bitmaps();
    left.sort();
    let mut expected_left = vec![third, foreign];
    expected_left.sort();
    assert_eq!(left, expected_left);

    // A thin qcow2 restore holds exactly the snapshot's content.
    let out = f.dir.path().join("thin.qcow2");
    let snap = f.repo.load_snapshot(&inc.snapshot).unwrap();
    f.repo
        .restore(
            &inc.snapshot,
            &|d: &DiskManifest| {
                Ok(Box::new(Qcow2Target::create(&out, d.size, false)?) as Box<dyn DiskTarget>)
            },
            &RestoreOptions::default(),
        )
        .unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            &s(&out),
            &s(&f.image),
        ],
    );
    let info = Qcow2Image::new(&out).info().unwrap();
    assert_eq!(info.virtual_size, snap.disks[0].size);
    let map = run(
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", &s(&out)],
    );
    let allocated: u64 = serde_json::from_str::<serde_json::Value>(&map)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    // Exactly the source's non-zero 64 KiB blocks are allocated (counted
    // from the source image's own bytes): zero extents stay holes.
    let raw = f.dir.path().join("source.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            &s(&f.image),
            &s(&raw),
        ],
    );
    let nonzero: u64 = std::fs::read(&raw)
        .unwrap()
        .chunks(65536)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(|b| b.len() as u64)
        .sum();
    assert_eq!(allocated, nonzero, "zero extents stay unallocated");
    assert_eq!(allocated, snap.disks[0].data_bytes());
}

#[test]
fn chain_of_ten_incrementals_with_random_writes() {
    let f = Fixture::new(32);
    f.write(&writes_cmds(&[(0, 32 * MIB)], 0x01));
    let mut rng = SampleRng::new(42);
    let mut points = Vec::new();
    let (full, _) = f.done("c");
    points.push((full.snapshot, f.reference()));
    for round in 0..10u8 {
        let writes: Vec<(u64, u64)> = (0..1 + rng.below(6))
            .map(|_| {
                let len = 512 * (1 + rng.below(600));
                let off = 512 * rng.below((32 * MIB - len) / 512);
                (off, len)
            })
            .collect();
        let mut cmds = writes_cmds(&writes, 0x20 + round);
        if round % 3 == 0 {
            // Some zeroed ranges too (qemu-io's write -z).
            cmds.push(format!("write -z {} 65536", 65536 * rng.below(500)));
        }
        f.write(&cmds);
        let (inc, _) = f.done("c");
        assert_eq!(inc.mode.as_str(), "cbt", "round {round}");
        assert!(inc.bytes_read <= inc.bytes_dirty);
        assert!(
            inc.bytes_dirty <= grid_bytes(&writes) + 65536,
            "round {round}"
        );
        points.push((inc.snapshot, f.reference()));
    }
    assert_eq!(
        f.bitmaps().len(),
        1,
        "one bitmap per chain, whatever its length"
    );
    // Every point restores bit-identical, each from its own manifest: before
    // and after deleting middle manifests (any subset: each stands alone).
    for (i, (id, hash)) in points.iter().enumerate() {
        assert_eq!(&f.restored(id), hash, "point {i}");
    }
    let deleted = [2usize, 5, 6, 9];
    for &i in &deleted {
        f.pool
            .delete(FileKind::Snapshot, &points[i].0.to_hex())
            .unwrap();
    }
    let repo = Repository::open(f.pool.clone()).unwrap();
    for (i, (id, hash)) in points.iter().enumerate() {
        if deleted.contains(&i) {
            assert!(repo.load_snapshot(id).is_err());
            continue;
        }
        assert_eq!(
            &f.restored(id),
            hash,
            "point {i} with middle manifests gone"
        );
    }
    // The chain goes on from the newest remaining snapshot.
    f.write(&writes_cmds(&[(MIB, 4096)], 0x7f));
    let (next, _) = f.done("c");
    assert_eq!((next.mode.as_str(), next.bytes_read), ("cbt", 65536));
    assert_eq!(f.restored(&next.snapshot), f.reference());
}

/// Kills a qemu-io that holds the image open with its bitmaps enabled, so
/// qemu leaves them flagged `in-use` (inconsistent).
fn unclean_exit_while_writing(image: &Path) {
    // At 15 MiB, where nothing was written before (data already allocated
    // at the offset would look "landed" before qemu-io even opened the
    // image — and a kill during its open can leave no bitmap at all).
    let mut child = Command::new("qemu-io")
        .args(["-c", "write -P 0x77 15M 64k", "-c", "sleep 60000"])
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the write is done (the bitmap is marked in use on open).
    let info = Qcow2Image::new(image);
    let mut written = false;
    for _ in 0..400 {
        std::thread::sleep(Duration::from_millis(25));
        let out = Command::new("qemu-img")
            .args(["map", "--output=json", "-U", "-f", "qcow2"])
            .arg(image)
            .output()
            .unwrap();
        // Data allocated at 15 MiB: the write has landed, so the image is
        // open and its bitmaps are flagged in use; wait until they show so.
        let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let at = 15u64 << 20;
        let landed = map.as_array().is_some_and(|ranges| {
            ranges.iter().any(|r| {
                let (start, len) = (
                    r["start"].as_u64().unwrap_or(0),
                    r["length"].as_u64().unwrap_or(0),
                );
                r["data"] == true && start <= at && at < start + len
            })
        });
        // (-U: qemu-io holds the image's lock)
        let shared = Command::new("qemu-img")
            .args(["info", "--output=json", "-U", "-f", "qcow2"])
            .arg(image)
            .output()
            .unwrap();
        let in_use = cairn_cas::qemu::ImageInfo::parse(&String::from_utf8_lossy(&shared.stdout))
            .is_ok_and(|i| !i.bitmaps.is_empty() && i.bitmaps.iter().all(|b| b.inconsistent()));
        if landed && in_use {
            written = true;
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL: no chance to save the bitmaps
    assert!(written, "qemu-io never wrote within 10 s");
    child.wait().unwrap();
    let b = info.info().unwrap().bitmaps;
    assert!(!b.is_empty() && b.iter().all(|b| b.inconsistent()), "{b:?}");
}

#[test]
fn untrusted_bitmaps_apply_the_policy_and_restores_stay_correct() {
    let f = Fixture::new(16);
    f.write(&writes_cmds(&[(0, 4 * MIB)], 0x01));
    let (_, first) = f.done("c");

    // 1. Bitmap removed.
    f.write(&writes_cmds(&[(2 * MIB, 4096)], 0x02));
    run("qemu-img", &["bitmap", "--remove", &s(&f.image), &first]);
    let before = f.repo.snapshot_ids().unwrap().len();
    // skip-alert: no snapshot, an alert, and the image keeps no new bitmap.
    match f.backup("c", CbtPolicy::SkipAlert) {
        Qcow2Outcome::Skipped { reason, alert } => {
            assert!(alert);
            assert!(reason.contains("missing"), "{reason}");
        }
        o => panic!("{o:?}"),
    }
    match f.backup("c", CbtPolicy::Skip) {
        Qcow2Outcome::Skipped { alert, .. } => assert!(!alert),
        o => panic!("{o:?}"),
    }
    assert_eq!(f.repo.snapshot_ids().unwrap().len(), before);
    assert!(f.bitmaps().is_empty(), "{:?}", f.bitmaps());
    // full (default): a full read, deduplicated, with the reason recorded.
    let (fb, _) = f.done("c");
    assert_eq!(fb.mode.as_str(), "full");
    assert_eq!(fb.bytes_read, 4 * MIB);
    assert_eq!(fb.chunks_new, 1, "only the changed chunk is stored");
    let reason = fb.cbt_fallback.get("vda").unwrap();
    assert!(
        reason.contains(&format!("{first:?} is missing")),
        "{reason}"
    );
    assert_eq!(
        f.disk(&fb.snapshot).properties.get(PROP_FALLBACK),
        Some(reason)
    );
    assert_eq!(f.restored(&fb.snapshot), f.reference());
    // The chain heals: the next run is an incremental again.
    f.write(&writes_cmds(&[(MIB, 4096)], 0x03));
    let (healed, _) = f.done("c");
    assert_eq!((healed.mode.as_str(), healed.bytes_read), ("cbt", 65536));

    // 2. Inconsistent bitmap (unclean exit of the process holding it).
    unclean_exit_while_writing(&f.image);
    let (fb, _) = f.done("c");
    assert_eq!(fb.mode.as_str(), "full");
    assert!(fb.cbt_fallback["vda"].contains("inconsistent"), "{fb:?}");
    assert_eq!(f.restored(&fb.snapshot), f.reference());
    assert_eq!(f.bitmaps().len(), 1, "the inconsistent bitmap was retired");

    // 3. Disk resized.
    run(
        "qemu-img",
        &["resize", "-q", "-f", "qcow2", &s(&f.image), "20M"],
    );
    f.write(&writes_cmds(&[(18 * MIB, 4096)], 0x04));
    let (fb, _) = f.done("c");
    assert_eq!(fb.mode.as_str(), "full");
    assert!(fb.cbt_fallback["vda"].contains("resized"), "{fb:?}");
    assert_eq!(fb.bytes_logical, 20 * MIB);
    assert_eq!(f.restored(&fb.snapshot), f.reference());

    // 4. A bitmap of another chain: never consumed for this one, never removed.
    let (_, other) = f.done("other");
    f.write(&writes_cmds(&[(5 * MIB, 4096)], 0x05));
    let (fb, _) = f.done("c");
    assert_eq!(fb.mode.as_str(), "full");
    assert!(
        fb.cbt_fallback["vda"].contains("does not belong to the previous snapshot"),
        "{fb:?}"
    );
    assert_eq!(f.restored(&fb.snapshot), f.reference());
    assert!(
        f.bitmaps().contains(&other),
        "another chain's bitmap is left alone"
    );
}

#[test]
fn a_vm_with_two_disks_is_one_snapshot_and_one_untrusted_disk_decides_alone() {
    let f = Fixture::new(16);
    let second = f.dir.path().join("vdb.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &s(&second), "8M"],
    );
    f.write(&writes_cmds(&[(0, 2 * MIB)], 0x01));
    run("qemu-io", &["-c", "write -P 2 1M 1M", &s(&second)]);
    let disks = [
        Qcow2Disk {
            image: Qcow2Image::new(&f.image),
            name: "vda".into(),
        },
        Qcow2Disk {
            image: Qcow2Image::new(&second),
            name: "vdb".into(),
        },
    ];
    let q = |policy| Qcow2BackupOptions {
        chain: "c".into(),
        policy,
        connections: 1,
        spot_check: 0,
        read: None,
    };
    let go =
        |policy| backup_qcow2_vm(&f.repo, &disks, &BackupOptions::new("vm"), &q(policy)).unwrap();
    let Qcow2Outcome::Done {
        stats: full,
        next_bitmaps,
        ..
    } = go(CbtPolicy::Full)
    else {
        panic!("no snapshot")
    };
    assert_eq!(next_bitmaps.len(), 2);
    assert_eq!(f.repo.load_snapshot(&full.snapshot).unwrap().disks.len(), 2);
    // Writes on both; vdb's bitmap is lost.
    f.write(&writes_cmds(&[(5 * MIB, 4096)], 0x03));
    run("qemu-io", &["-c", "write -P 4 6M 4k", &s(&second)]);
    run(
        "qemu-img",
        &["bitmap", "--remove", &s(&second), &next_bitmaps["vdb"]],
    );
    // skip-alert skips the whole VM, naming the disk.
    let Qcow2Outcome::Skipped { reason, alert } = go(CbtPolicy::SkipAlert) else {
        panic!("not skipped")
    };
    assert!(
        alert && reason.starts_with("vdb: ") && reason.contains("missing"),
        "{reason}"
    );
    // full: vda stays incremental, vdb is read in full; both restore right.
    let Qcow2Outcome::Done { stats, .. } = go(CbtPolicy::Full) else {
        panic!("no snapshot")
    };
    assert_eq!(stats.mode.as_str(), "cbt");
    assert_eq!(stats.cbt_fallback.keys().collect::<Vec<_>>(), ["vdb"]);
    assert_eq!(
        stats.bytes_read,
        65536 + (MIB + 65536),
        "vda's dirty chunk + vdb's allocated data (1 MiB + one 64 KiB cluster)"
    );
    let out = f.dir.path().join("both");
    f.repo
        .restore_to_dir(&stats.snapshot, &out, &RestoreOptions::default())
        .unwrap();
    assert_eq!(
        blake3::hash(&std::fs::read(out.join("vda")).unwrap()),
        f.reference()
    );
    let raw = f.dir.path().join("vdb.raw");
    run("qemu-img", &["convert", "-O", "raw", &s(&second), &s(&raw)]);
    assert!(std::fs::read(out.join("vdb")).unwrap() == std::fs::read(raw).unwrap());
}

#[test]
fn spot_check_catches_a_bitmap_recreated_under_its_name() {
    let f = Fixture::new(8);
    f.write(&writes_cmds(&[(0, 2 * MIB)], 0x01));
    let (_, first) = f.done("c");
    // Writes, then the bitmap is dropped and re-created empty under the
    // same name: the name check cannot see it.
    f.write(&writes_cmds(&[(MIB + 8192, 4096)], 0x09));
    run("qemu-img", &["bitmap", "--remove", &s(&f.image), &first]);
    run("qemu-img", &["bitmap", "--add", &s(&f.image), &first]);
    let q = Qcow2BackupOptions {
        chain: "c".into(),
        policy: CbtPolicy::Full,
        connections: 1,
        spot_check: 4096, // every clean extent: deterministic
        read: None,
    };
    let (stats, _) = Fixture::expect_done(f.backup_with(&q));
    assert_eq!(stats.mode.as_str(), "full");
    let reason = &stats.cbt_fallback["vda"];
    assert!(
        reason.contains("spot check") && reason.contains("1048576.."),
        "{reason}"
    );
    assert_eq!(f.restored(&stats.snapshot), f.reference());
    // A sound bitmap passes the check and is recorded as checked.
    f.write(&writes_cmds(&[(3 * MIB, 4096)], 0x0a));
    let (stats, _) = Fixture::expect_done(f.backup_with(&q));
    assert_eq!(stats.mode.as_str(), "cbt");
    let disk = f.disk(&stats.snapshot);
    assert_eq!(
        disk.properties.get(PROP_SPOT_CHECK).map(String::as_str),
        Some("127 clean extents match the parent")
    );
    assert_eq!(f.restored(&stats.snapshot), f.reference());
}

#[test]
fn a_failing_qemu_nbd_reports_its_own_message() {
    let f = Fixture::new(4);
    let err = Qcow2Image::new(&f.image)
        .export_read_only(Some("nope"), 1)
        .unwrap_err();
    let msg = err.to_string();
    // qemu-nbd's own words (our message repeats the command line, which
    // names the bitmap too: that alone would prove nothing).
    assert!(
        msg.starts_with("qemu-nbd: ") && msg.contains("Bitmap 'nope' is not found"),
        "{msg}"
    );
    // No lock left behind: a writer (which needs qemu's write lock) can
    // open the image at once.
    let out = Command::new("qemu-io")
        .args(["-c", "write -P 9 0 64k"])
        .arg(&f.image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the image stays locked: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(Qcow2Image::new(&f.image).info().unwrap().bitmaps.is_empty());
}
