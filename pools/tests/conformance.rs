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

#[test]
fn standard_pool_conforms_whole_and_per_set() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicU32::new(0);
    let next = || {
        dir.path()
            .join(n.fetch_add(1, Ordering::SeqCst).to_string())
    };
    conformance(&|| Arc::new(StandardPool::create(next(), 7).unwrap()) as DynPool);
    conformance(&|| {
        let pool = StandardPool::create(next(), 7).unwrap();
        Arc::new(pool.backup_set("web").unwrap()) as DynPool
    });
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
