//! One conformance suite, run against every pool: memory, local directory,
//! and S3 on a real s3s-fs server (single PUTs and multipart uploads).
#![allow(clippy::unwrap_used)] // test code

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use cairn_engine::DynPool;
use cairn_pools::testing::{conformance, S3Server};
use cairn_pools::{LocalPool, MemoryPool, ObjectPool, PoolAddress, StandardPool};

#[test]
fn memory_pool_conforms() {
    conformance(&|| Arc::new(MemoryPool::new()) as DynPool);
}

#[test]
fn local_pool_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicU32::new(0);
    conformance(&|| {
        let p = dir
            .path()
            .join(n.fetch_add(1, Ordering::SeqCst).to_string());
        Arc::new(LocalPool::create(p).unwrap()) as DynPool
    });
}

/// A backup set is a pool (what backups, copies and collections run on).
#[test]
fn a_standard_pools_backup_set_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicU32::new(0);
    let next = || {
        dir.path()
            .join(n.fetch_add(1, Ordering::SeqCst).to_string())
    };
    conformance(&|| {
        let pool = StandardPool::create(next(), 7).unwrap();
        Arc::new(pool.backup_set("web").unwrap()) as DynPool
    });
}

/// The whole standard pool reads, lists and deletes across sets, puts
/// marks with their snapshot, and refuses packs, segments and manifests
/// (they belong to one set).
#[test]
fn the_whole_standard_pool_spans_its_sets_and_writes_none_of_their_data() {
    use cairn_engine::{FileKind, PoolDelete, PoolList, PoolRead, PoolWrite};
    let dir = tempfile::tempdir().unwrap();
    let whole = StandardPool::create(dir.path(), 0).unwrap();
    let a = whole.backup_set("a").unwrap();
    let b = whole.backup_set("b").unwrap();
    assert_ne!(a.set_name(), b.set_name());
    let (sa, sb) = ("aa".repeat(32), "bb".repeat(32));
    a.write(FileKind::Snapshot, &sa, b"A").unwrap();
    b.write(FileKind::Snapshot, &sb, b"B").unwrap();
    let mut listed = whole.list(FileKind::Snapshot).unwrap();
    listed.sort();
    assert_eq!(listed, vec![sa.clone(), sb.clone()]);
    assert_eq!(&whole.read(FileKind::Snapshot, &sb).unwrap()[..], b"B");
    assert!(a.read(FileKind::Snapshot, &sb).unwrap_err().is_not_found());
    for kind in [FileKind::Pack, FileKind::Index, FileKind::Snapshot] {
        let e = whole.write(kind, &"cc".repeat(16), b"x").unwrap_err();
        assert!(
            matches!(e, cairn_engine::Error::Unsupported(_)),
            "{kind}: {e}"
        );
    }
    // A protection mark lands in its snapshot's set.
    whole.write(FileKind::Protection, &sb, b"p").unwrap();
    assert!(b.size(FileKind::Protection, &sb).is_ok());
    assert!(a
        .size(FileKind::Protection, &sb)
        .unwrap_err()
        .is_not_found());
    // Sets of length 0: every backup of a VM starts a new set.
    let a2 = whole.backup_set("a").unwrap();
    assert_ne!(a.set_name(), a2.set_name());
    whole.delete(FileKind::Snapshot, &sa).unwrap();
    let first = a.set_name().unwrap().to_string();
    whole.remove_set(&first).unwrap();
    let names: Vec<String> = whole.sets().unwrap().into_iter().map(|s| s.name).collect();
    assert!(!names.contains(&first), "{names:?}");
    // A set with a snapshot is not removed.
    let e = whole.remove_set(b.set_name().unwrap()).unwrap_err();
    assert!(matches!(e, cairn_engine::Error::PoolBusy(_)), "{e}");
}

fn s3_pool(server: &S3Server, prefix: &str, extra: &str) -> DynPool {
    let PoolAddress::S3(addr) = PoolAddress::parse(&server.address("conf", prefix, extra)).unwrap()
    else {
        panic!("not an s3 address")
    };
    Arc::new(ObjectPool::open_with(&addr, &server.settings()).unwrap())
}

#[test]
fn s3_pool_conforms() {
    let server = S3Server::start();
    server.create_bucket("conf");
    let n = AtomicU32::new(0);
    // Default part size: every object here is one conditional PUT.
    conformance(&|| {
        s3_pool(
            &server,
            &format!("p{}", n.fetch_add(1, Ordering::SeqCst)),
            "",
        )
    });
    // 5 MiB parts: the 12 MiB streamed object is a multipart upload.
    conformance(&|| {
        let prefix = format!("m{}", n.fetch_add(1, Ordering::SeqCst));
        s3_pool(&server, &prefix, "part_size=5M")
    });
}

#[test]
fn the_object_pool_works_from_threads_with_and_without_a_runtime() {
    let server = S3Server::start();
    server.create_bucket("rt");
    let pool = s3_pool(&server, "x", "");
    // A plain thread.
    let p = pool.clone();
    std::thread::spawn(move || {
        p.write(cairn_engine::FileKind::Snapshot, "aa", b"plain")
            .unwrap();
    })
    .join()
    .unwrap();
    // Inside another tokio runtime, through spawn_blocking (documented).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let p = pool.clone();
    let got = rt
        .block_on(async move {
            tokio::task::spawn_blocking(move || p.read(cairn_engine::FileKind::Snapshot, "aa"))
                .await
        })
        .unwrap()
        .unwrap();
    assert_eq!(&got[..], b"plain");
    // The last handle may go away inside async code without a panic.
    rt.block_on(async move { drop(pool) });
}

/// A set length out of range (0–365) is refused at creation and when a
/// pool's `standard.json` holds one, naming the file.
#[test]
fn a_standard_pool_refuses_a_set_length_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let Err(e) = StandardPool::create(dir.path().join("a"), 366) else {
        panic!("a set length of 366 was accepted")
    };
    assert!(e.to_string().contains("set_length 366"), "{e}");
    let root = dir.path().join("b");
    StandardPool::create(&root, 365).unwrap();
    let settings = root.join("standard.json");
    std::fs::write(&settings, br#"{"version": 1, "set_length": 366}"#).unwrap();
    let Err(e) = StandardPool::open(&root) else {
        panic!("a stored set length of 366 was accepted")
    };
    assert!(
        e.to_string().contains("set_length 366") && e.to_string().contains("standard.json"),
        "{e}"
    );
    std::fs::write(&settings, br#"{"version": 1, "set_length": 365}"#).unwrap();
    assert_eq!(StandardPool::open(&root).unwrap().set_length(), 365);
}
