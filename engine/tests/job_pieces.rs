//! The pieces of a job on the fake platform: selection, the capacity
//! check, VMs run within the limits, each snapshotted, backed up and its
//! snapshot released; and the resource lock held by a process that is
//! SIGKILLed — the next job takes it at once.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cairn_engine::jobs::fake::FakePlatform;
use cairn_engine::jobs::{CapacityRule, Limits, ResourceLock, Selection};
use cairn_engine::sample::SampleRng;
use cairn_engine::{
    BackupDisk, BackupOptions, CancelToken, Error, Platform, PlatformSnapshot, Repository,
    RestoreOptions, VmDisk, VmInfo,
};

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut b = vec![0u8; len];
    SampleRng::new(seed).fill(&mut b);
    b
}

#[test]
fn a_job_selects_checks_capacity_and_backs_up_within_its_limits() {
    let platform = FakePlatform::new();
    for (i, host) in ["cvk1", "cvk1", "cvk2", "cvk2", "cvk3"].iter().enumerate() {
        let store = if *host == "cvk3" { "small" } else { "pool" };
        platform.add_vm(
            &format!("web{i}"),
            host,
            store,
            vec![
                ("vda", bytes(1 << 20, i as u64)),
                ("vdb", bytes(1 << 19, 10 + i as u64)),
            ],
        );
    }
    platform.add_vm("db-test", "cvk1", "pool", vec![("vda", bytes(1 << 18, 99))]);
    // cvk3's datastore: 30 GiB free of 1 TiB — under 10 % and under 500 GiB.
    platform.set_space("cvk3", "small", 1 << 40, 30 << 30);

    let mut selection = Selection::default();
    selection.keywords = vec!["web".into()];
    selection.hosts = vec!["cvk1".into()];
    selection.exclude = vec!["test".into()];
    let vms = selection.select(&platform.list_vms().unwrap()).unwrap();
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["web0", "web1", "web2", "web3", "web4"]);

    let rule = CapacityRule::default();
    let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new())).unwrap();
    let limits = Limits::new(2, 1, 1, 1).unwrap();
    let results = limits.run_vms(vms, &CancelToken::new(), |vm| {
        if let Some(why) = rule.check(&platform, vm)? {
            return Ok::<_, Error>(Err(why));
        }
        let snap = platform.snapshot(vm)?;
        let disks = vm
            .disks
            .iter()
            .map(|d| {
                Ok(BackupDisk::new(
                    d.device.clone(),
                    cairn_engine::DiskInput::Image(snap.open_disk(&d.device)?),
                ))
            })
            .collect::<cairn_engine::Result<Vec<_>>>()?;
        let stats = repo.backup(disks, &BackupOptions::new(vm.name.clone()));
        snap.release()?;
        Ok(Ok(stats?.snapshot))
    });
    let mut done = Vec::new();
    for (vm, r) in &results {
        match r.as_ref().unwrap().as_ref().unwrap() {
            Ok(id) => done.push((vm.clone(), *id)),
            Err(why) => {
                assert_eq!(vm.name, "web4", "{why}");
                assert!(why.contains("datastore small on host cvk3"), "{why}");
                assert!(
                    why.contains("below 10 % free and below 500.00 GiB free"),
                    "{why}"
                );
            }
        }
    }
    assert_eq!(done.len(), 4);
    assert_eq!(platform.snapshots_taken.load(Ordering::SeqCst), 4);
    assert_eq!(platform.snapshots_released.load(Ordering::SeqCst), 4);
    // Each restores into the platform's targets bit-identical.
    let (vm, id) = &done[2];
    repo.restore(
        id,
        &|d| {
            platform.restore_target(
                vm,
                &VmDisk {
                    device: d.name.clone(),
                    size: d.size,
                    ..VmDisk::default()
                },
            )
        },
        &RestoreOptions::default(),
    )
    .unwrap();
    assert_eq!(platform.restored(&vm.id, "vda").unwrap(), bytes(1 << 20, 2));
    assert_eq!(
        platform.restored(&vm.id, "vdb").unwrap(),
        bytes(1 << 19, 12)
    );
}

/// A platform that cannot tell datastore space, and a VM whose disk has
/// no datastore: the check cannot be made, so the VM is skipped, saying
/// why — unless the check is off.
#[test]
fn a_capacity_check_that_cannot_be_made_skips_the_vm() {
    struct Blind;
    impl Platform for Blind {
        fn list_vms(&self) -> cairn_engine::Result<Vec<VmInfo>> {
            Ok(Vec::new())
        }
        fn snapshot(&self, _: &VmInfo) -> cairn_engine::Result<Box<dyn PlatformSnapshot>> {
            unreachable!()
        }
        fn restore_target(
            &self,
            _: &VmInfo,
            _: &VmDisk,
        ) -> cairn_engine::Result<Box<dyn cairn_engine::DiskTarget>> {
            unreachable!()
        }
    }
    let mut vm = VmInfo {
        name: "web".into(),
        host: "cvk1".into(),
        disks: vec![VmDisk {
            device: "vda".into(),
            datastore: "pool".into(),
            ..VmDisk::default()
        }],
        ..VmInfo::default()
    };
    let why = CapacityRule::default().check(&Blind, &vm).unwrap().unwrap();
    assert!(
        why.contains("cannot tell") && why.contains("datastore pool"),
        "{why}"
    );
    vm.disks[0].datastore.clear();
    let why = CapacityRule::default().check(&Blind, &vm).unwrap().unwrap();
    assert!(
        why.contains("does not say which datastore disk vda"),
        "{why}"
    );
    assert_eq!(CapacityRule::off().check(&Blind, &vm).unwrap(), None);
}

const HOLDER: &str = "CAIRN_TEST_LOCK_HOLDER";

#[test]
fn a_killed_holder_leaves_no_stuck_lock() {
    if let Ok(dir) = std::env::var(HOLDER) {
        // The child: hold the lock until killed.
        let _lock = ResourceLock::acquire(Path::new(&dir), "vm:web01", "child-job").unwrap();
        println!("held");
        std::thread::sleep(std::time::Duration::from_secs(600));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_killed_holder_leaves_no_stuck_lock",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.unwrap().contains("held")),
        "the child never held the lock"
    );
    let e = ResourceLock::acquire(dir.path(), "vm:web01", "parent-job").unwrap_err();
    assert!(matches!(e, Error::PoolBusy(_)), "{e}");
    assert!(e.to_string().contains("child-job"), "{e}");
    child.kill().unwrap();
    child.wait().unwrap();
    let lock = ResourceLock::acquire(dir.path(), "vm:web01", "parent-job").unwrap();
    assert!(std::fs::read_to_string(lock.path())
        .unwrap()
        .contains("parent-job"));
}
