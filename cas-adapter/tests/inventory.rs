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
