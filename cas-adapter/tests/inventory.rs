//! The inventory platform with real parts: VMs of raw and qcow2 images
//! (qemu-img, qemu-io), datastore space from the file system, identities
//! that resume keys on (unchanged image: same; a write: different),
//! restore targets beside the images, never over them.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::process::Command;

use cairn_cas::{InventoryPlatform, ReadSettings};
use cairn_engine::Platform;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn vms_identities_space_and_targets() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("a.img"), vec![1u8; 1 << 20]).unwrap();
    let q = d.join("b.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "4M"],
    );
    std::fs::write(
        d.join("inv.toml"),
        "restore_dir = \"out\"\n\
         [[vm]]\nname = \"a\"\nhost = \"h1\"\naddresses = [\"10.0.0.9\"]\n[[vm.disk]]\ndevice = \"vda\"\npath = \"a.img\"\n\
         [[vm]]\nname = \"b\"\nhost = \"h1\"\n[[vm.disk]]\ndevice = \"vda\"\npath = \"b.qcow2\"\ndatastore = \"fast\"\n",
    )
    .unwrap();
    let platform = InventoryPlatform::open(&d.join("inv.toml"), ReadSettings::default()).unwrap();
    let vms = platform.list_vms().unwrap();
    assert_eq!(vms.len(), 2);
    assert_eq!(vms[0].addresses, ["10.0.0.9"]);
    assert_eq!(
        (vms[1].disks[0].format.as_str(), vms[1].disks[0].size),
        ("qcow2", 4 << 20)
    );
    let store = platform.datastore("h1", "fast").unwrap();
    assert!(
        store.capacity > 0 && store.free <= store.capacity,
        "{store:?}"
    );

    let identity = |vm: usize| {
        let snap = platform.snapshot(&vms[vm]).unwrap();
        let id = snap.open_disk("vda").unwrap().identity();
        snap.release().unwrap();
        id.unwrap()
    };
    let (a1, b1) = (identity(0), identity(1));
    assert_eq!(
        (identity(0), identity(1)),
        (a1.clone(), b1.clone()),
        "unchanged: same"
    );
    run("qemu-io", &["-c", "write -P 7 0 64K", q.to_str().unwrap()]);
    assert_ne!(identity(1), b1, "a write to the qcow2 changes its identity");
    std::fs::write(d.join("a.img"), vec![2u8; 1 << 20]).unwrap();
    assert_ne!(
        identity(0),
        a1,
        "a rewritten raw image changes its identity"
    );

    // Restore targets go to restore_dir; one that is a VM's own image is refused.
    let t = platform.restore_target(&vms[0], &vms[0].disks[0]).unwrap();
    drop(t);
    std::fs::write(
        d.join("bad.toml"),
        "restore_dir = \".\"\n[[vm]]\nname = \"a\"\n[[vm.disk]]\ndevice = \"vda\"\npath = \"a/vda.img\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(d.join("a")).unwrap();
    std::fs::write(d.join("a/vda.img"), vec![0u8; 4096]).unwrap();
    let bad = InventoryPlatform::open(&d.join("bad.toml"), ReadSettings::default()).unwrap();
    let vm = &bad.list_vms().unwrap()[0];
    let e = bad.restore_target(vm, &vm.disks[0]).err().unwrap();
    assert!(e.to_string().contains("is VM a's disk vda"), "{e}");
    // Bad inventories name the problem.
    std::fs::write(d.join("dup.toml"), "restore_dir = \"o\"\n[[vm]]\nname = \"a\"\n[[vm.disk]]\ndevice = \"vda\"\npath = \"a.img\"\n[[vm]]\nname = \"a\"\n[[vm.disk]]\ndevice = \"vda\"\npath = \"a.img\"\n").unwrap();
    let e = InventoryPlatform::open(&d.join("dup.toml"), ReadSettings::default()).unwrap_err();
    assert!(e.to_string().contains("repeated"), "{e}");
    std::fs::write(d.join("key.toml"), "restore_dir = \"o\"\ncolour = 1\n").unwrap();
    let e = InventoryPlatform::open(&d.join("key.toml"), ReadSettings::default()).unwrap_err();
    assert!(e.to_string().contains("colour"), "{e}");
}

/// A CBT job on the inventory platform with real qcow2 bitmaps: the first
/// run starts a bitmap per qcow2 disk, writes made with qemu-io are all the
/// next run reads of it (the raw disk, unchanged, is not read at all), the snapshot restores
/// bit-identical to `qemu-img convert`'s raw image; a lost bitmap falls
/// back to a full read; a run that stores nothing leaves the bitmap it
/// consumed in place.
#[test]
fn cbt_jobs_on_qcow2_read_only_what_qemu_io_wrote() {
    use cairn_engine::jobs::{
        Job, JobDefinition, JobEnvironment, JobRunner, MemoryNotifier, RunStatus, StateDir,
        Trigger, VmStatus,
    };
    use cairn_engine::{DynPool, Repository, RestoreOptions, SnapshotId};
    use std::sync::Arc;

    use cairn_engine::{FileKind, ObjectWriter, Pool, PoolWrapper, VmInfo, WrappedPool};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The pool, refusing to store snapshot manifests: a backup that reads
    /// everything and then fails.
    struct NoManifests(DynPool);
    impl PoolWrapper for NoManifests {
        fn inner(&self) -> &dyn Pool {
            &*self.0
        }
        fn create(
            &self,
            kind: FileKind,
            name: &str,
        ) -> cairn_engine::Result<Box<dyn ObjectWriter>> {
            if kind == FileKind::Snapshot {
                return Err(cairn_engine::Error::InvalidArgument(
                    "test: no manifests today".into(),
                ));
            }
            self.0.create(kind, name)
        }
    }
    struct Env {
        inventory: std::path::PathBuf,
        pool: DynPool,
        fail_manifests: AtomicBool,
    }
    impl JobEnvironment for Env {
        fn backup_pool(
            &self,
            _: &Job,
            _: &VmInfo,
            pool: &DynPool,
        ) -> cairn_engine::Result<Option<DynPool>> {
            Ok(self
                .fail_manifests
                .load(Ordering::SeqCst)
                .then(|| Arc::new(WrappedPool(NoManifests(pool.clone()))) as DynPool))
        }
        fn platform(
            &self,
            _: &Job,
            _: &cairn_engine::CancelToken,
        ) -> cairn_engine::Result<Arc<dyn Platform>> {
            Ok(Arc::new(InventoryPlatform::open(
                &self.inventory,
                ReadSettings::default(),
            )?))
        }
        fn pool(&self, _: &Job) -> cairn_engine::Result<DynPool> {
            Ok(self.pool.clone())
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q = d.join("web.qcow2");
    let qs = q.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", qs, "8M"]);
    run(
        "qemu-io",
        &["-c", "write -P 3 0 1M", "-c", "write -P 4 5M 512K", qs],
    );
    let raw: Vec<u8> = (0..1u32 << 19).map(|i| (i % 251) as u8).collect();
    std::fs::write(d.join("data.img"), &raw).unwrap();
    // A file changed in the last 2 s is always read: let it settle, so the
    // runs below can reuse it unread.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    std::fs::write(
        d.join("inv.toml"),
        "restore_dir = \"out\"\n[[vm]]\nname = \"web\"\n\
         [[vm.disk]]\ndevice = \"vda\"\npath = \"web.qcow2\"\n\
         [[vm.disk]]\ndevice = \"vdb\"\npath = \"data.img\"\n",
    )
    .unwrap();
    let pool: DynPool = Arc::new(cairn_pools::MemoryPool::new());
    let repo = Repository::create(pool.clone()).unwrap();
    let env = Env {
        inventory: d.join("inv.toml"),
        pool,
        fail_manifests: AtomicBool::new(false),
    };
    let state = StateDir::new(d.join("state"));
    let notes = MemoryNotifier::default();
    let runner = JobRunner::new(&state, &env, &notes);
    let job = JobDefinition::from_toml(
        "name = \"nightly\"\nkind = \"backup\"\nplatform = \"inventory\"\npool = \"mem\"\n\
         [select]\nvms = [\"web\"]\n[capacity]\nmin_free_percent = 0\nmin_free = \"0\"\n\
         [cbt]\nenabled = true\n",
        "nightly.toml",
    )
    .unwrap()
    .resolve()
    .unwrap();
    let bitmaps = || -> Vec<String> {
        let info = cairn_cas::qemu::Qcow2Image::new(&q).info().unwrap();
        info.bitmaps.iter().map(|b| b.name.clone()).collect()
    };
    let backup = || {
        let rec = runner.run(&job, Trigger::Manual, None).unwrap();
        assert_eq!(rec.status, RunStatus::Succeeded, "{rec:?}");
        rec.vms[0].clone()
    };
    let restored_matches = |snapshot: &str| {
        let out = d.join("restored");
        let _ = std::fs::remove_dir_all(&out);
        let id = SnapshotId::from_hex(snapshot).unwrap();
        repo.restore_to_dir(&id, &out, &RestoreOptions::default())
            .unwrap();
        let flat = d.join("flat.raw");
        run(
            "qemu-img",
            &["convert", "-O", "raw", qs, flat.to_str().unwrap()],
        );
        assert!(std::fs::read(out.join("vda")).unwrap() == std::fs::read(&flat).unwrap());
        assert!(std::fs::read(out.join("vdb")).unwrap() == raw);
    };

    // The first run reads the allocated 1.5 MiB and the raw disk, and
    // starts one bitmap of chain "nightly".
    let first = backup();
    assert_eq!(first.bytes_read, (3 << 19) + raw.len() as u64, "{first:?}");
    let started = bitmaps();
    assert_eq!(started.len(), 1);
    assert!(started[0].starts_with("nightly."), "{started:?}");
    // Two writes, in two 64 KiB chunks: the next run reads those only.
    run(
        "qemu-io",
        &["-c", "write -P 9 100K 4K", "-c", "write -P 8 7M 1K", qs],
    );
    let second = backup();
    assert_eq!(second.mode.as_deref(), Some("cbt"), "{second:?}");
    assert_eq!(second.bytes_read, 2 * 65536, "{second:?}");
    let now = bitmaps();
    assert_eq!(now.len(), 1, "the consumed bitmap is retired: {now:?}");
    assert_ne!(now, started);
    restored_matches(second.snapshot.as_deref().unwrap());

    // A run that stores nothing (it reads, then the pool refuses its
    // manifest) keeps the bitmap it would have consumed, and leaves the one
    // it started for the next run to adopt.
    run("qemu-io", &["-c", "write -P 5 2M 4K", qs]);
    env.fail_manifests.store(true, Ordering::SeqCst);
    let rec = runner.run(&job, Trigger::Manual, None).unwrap();
    env.fail_manifests.store(false, Ordering::SeqCst);
    assert_eq!(rec.vms[0].status, VmStatus::Failed, "{rec:?}");
    assert!(
        rec.vms[0]
            .error
            .as_deref()
            .unwrap()
            .contains("no manifests today"),
        "{rec:?}"
    );
    let after_failure = bitmaps();
    assert_eq!(after_failure.len(), 2, "{after_failure:?}");
    assert!(after_failure.contains(&now[0]), "the consumed one is kept");
    let left = after_failure
        .iter()
        .find(|b| **b != now[0])
        .unwrap()
        .clone();
    // The next run reads the one changed chunk again, adopts the bitmap
    // left behind and retires the consumed one.
    let third = backup();
    assert_eq!(third.mode.as_deref(), Some("cbt"), "{third:?}");
    assert_eq!(third.bytes_read, 65536, "{third:?}");
    assert_eq!(bitmaps(), [left]);
    restored_matches(third.snapshot.as_deref().unwrap());

    // The bitmap is removed behind the job's back: a full read (policy
    // full). Interrupted (the pool refuses the manifest), it resumes: the
    // run after reads nothing again (the bitmap the first attempt started
    // is adopted, so the image's state — what the journal is keyed on —
    // did not change), and is bit-identical, with one bitmap.
    for b in bitmaps() {
        run("qemu-img", &["bitmap", "--remove", qs, &b]);
    }
    // New data, so the interrupted run seals packs (journaled at each seal;
    // data the pool has already is journaled only every 64 MiB).
    run("qemu-io", &["-c", "write -P 0x77 3M 1M", qs]);
    env.fail_manifests.store(true, Ordering::SeqCst);
    let rec = runner.run(&job, Trigger::Manual, None).unwrap();
    env.fail_manifests.store(false, Ordering::SeqCst);
    assert_eq!(rec.vms[0].status, VmStatus::Failed, "{rec:?}");
    let fourth = backup();
    assert_eq!(fourth.bytes_read, 0, "{fourth:?}");
    // The journal covers the whole 8 MiB disk (its holes too).
    assert_eq!(fourth.bytes_resumed, 8 << 20, "{fourth:?}");
    assert_eq!(bitmaps().len(), 1);
    restored_matches(fourth.snapshot.as_deref().unwrap());
}
