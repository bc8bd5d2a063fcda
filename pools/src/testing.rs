//! Test support (feature `testing`), shared by the pool, CLI and benchmark
//! tests: a real S3-compatible server on 127.0.0.1 ([`S3Server`], running
//! `s3s-fs`) and the pool [`conformance`] suite every pool passes.
//!
//! Not for production use: it spawns processes and panics on failure.
#![allow(clippy::unwrap_used, clippy::panic)] // test support: a failure is a failed test

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_engine::{DynPool, Error, FileKind};

use crate::object::S3Settings;

/// Access key of the test server.
pub const TEST_ACCESS_KEY: &str = "cairn-test-key";
/// Secret key of the test server.
pub const TEST_SECRET_KEY: &str = "cairn-test-secret-0123456789";

/// An `s3s-fs` server on 127.0.0.1 serving a fresh directory; stopped and
/// removed on drop. A bucket is a sub-directory of [`root`](Self::root).
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    port: u16,
    root: PathBuf,
}

/// The `s3s-fs` binary: `$S3S_FS`, `PATH`, or `$CARGO_HOME/bin`.
fn s3s_fs_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("S3S_FS") {
        return PathBuf::from(p);
    }
    let in_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.is_file())
    });
    if let Some(p) = in_path {
        return p;
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_default();
    cargo_home.join("bin").join("s3s-fs")
}

/// A random port in the dynamic range.
fn random_port() -> u16 {
    let mut b = [0u8; 2];
    getrandom::getrandom(&mut b).unwrap();
    20000 + (u16::from_le_bytes(b) % 30000)
}

/// True once an HTTP server answers on `port`.
fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

impl S3Server {
    /// Starts a server on a free port (a port another process takes first
    /// makes the server exit; it is started again on another one).
    pub fn start() -> Self {
        let bin = s3s_fs_binary();
        assert!(
            bin.is_file(),
            "s3s-fs not found ({}): run scripts/test.sh, which installs it",
            bin.display()
        );
        let mut token = [0u8; 8];
        getrandom::getrandom(&mut token).unwrap();
        let root = std::env::temp_dir().join(format!(
            "cairn-s3-{}-{}",
            std::process::id(),
            cairn_engine::ChunkId::of(&token)
                .to_hex()
                .get(..12)
                .unwrap_or("x")
        ));
        std::fs::create_dir_all(&root).unwrap();
        for _attempt in 0..10 {
            let port = random_port();
            let mut child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args([
                    "--access-key",
                    TEST_ACCESS_KEY,
                    "--secret-key",
                    TEST_SECRET_KEY,
                ])
                .arg(&root)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break; // exited: the port was taken
                }
                if answers(port) {
                    return S3Server { child, port, root };
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("s3s-fs did not start on 127.0.0.1 after 10 attempts");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory it serves (buckets are its sub-directories).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates bucket `name`.
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.root.join(name)).unwrap();
    }

    /// A pool address for `bucket`/`prefix` on this server, with `extra`
    /// query settings (`key=value&…`, may be empty).
    pub fn address(&self, bucket: &str, prefix: &str, extra: &str) -> String {
        let mut a = format!("s3://{bucket}/{prefix}?endpoint={}", self.endpoint());
        if !extra.is_empty() {
            a.push('&');
            a.push_str(extra);
        }
        a
    }

    /// Credentials and settings for [`ObjectPool::open_with`](crate::ObjectPool::open_with).
    pub fn settings(&self) -> S3Settings {
        let mut s = S3Settings::new(TEST_ACCESS_KEY, TEST_SECRET_KEY);
        s.allow_http = true;
        s
    }

    /// The environment a child process needs to reach the server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY.to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The behaviour every pool promises (the pool traits' contracts), checked
/// on a fresh pool from `make` (a new, empty pool each call).
pub fn conformance(make: &dyn Fn() -> DynPool) {
    round_trip_per_kind(&*make());
    create_only(&*make());
    dropped_writer_leaves_nothing(&*make());
    missing_objects_are_not_found(&*make());
    large_listing(&*make());
    streamed_object(&*make());
}

fn round_trip_per_kind(pool: &dyn cairn_engine::Pool) {
    for kind in FileKind::ALL {
        let name = if kind == FileKind::Config {
            "config".to_string()
        } else {
            format!("{:032x}", 0xabcdef_u64 + kind as u64)
        };
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 31 % 251) as u8).collect();
        pool.write(kind, &name, &data).unwrap();
        assert_eq!(&pool.read(kind, &name).unwrap()[..], &data[..], "{kind}");
        assert_eq!(pool.size(kind, &name).unwrap(), data.len() as u64, "{kind}");
        let part = pool.read_range(kind, &name, 1000, 5000).unwrap();
        assert_eq!(&part[..], &data[1000..6000], "{kind}");
        assert!(
            pool.read_range(kind, &name, 69_000, 5000).is_err(),
            "{kind}: read past the end"
        );
        assert_eq!(pool.list(kind).unwrap(), vec![name.clone()], "{kind}");
        if let Some(sizes) = pool.list_sizes(kind).unwrap() {
            assert_eq!(sizes, vec![(name.clone(), data.len() as u64)], "{kind}");
        }
        pool.delete(kind, &name).unwrap();
        assert!(
            pool.list(kind).unwrap().is_empty(),
            "{kind}: deleted object still listed"
        );
        assert!(pool.read(kind, &name).unwrap_err().is_not_found(), "{kind}");
    }
}

fn create_only(pool: &dyn cairn_engine::Pool) {
    let name = "0123456789abcdef0123456789abcdef";
    pool.write(FileKind::Pack, name, b"first").unwrap();
    let again = pool
        .write(FileKind::Pack, name, b"second, longer")
        .unwrap_err();
    assert!(matches!(again, Error::AlreadyExists { .. }), "{again}");
    assert_eq!(&pool.read(FileKind::Pack, name).unwrap()[..], b"first");
}

fn dropped_writer_leaves_nothing(pool: &dyn cairn_engine::Pool) {
    let name = "fedcba9876543210fedcba9876543210";
    let mut w = pool.create(FileKind::Index, name).unwrap();
    w.write_all(&[7u8; 100_000]).unwrap();
    drop(w);
    assert!(pool.list(FileKind::Index).unwrap().is_empty());
    assert!(pool.read(FileKind::Index, name).unwrap_err().is_not_found());
    // The name is still free.
    pool.write(FileKind::Index, name, b"x").unwrap();
}

fn missing_objects_are_not_found(pool: &dyn cairn_engine::Pool) {
    let name = "00000000000000000000000000000000";
    for kind in [FileKind::Pack, FileKind::Index, FileKind::Snapshot] {
        assert!(pool.read(kind, name).unwrap_err().is_not_found(), "{kind}");
        assert!(pool.size(kind, name).unwrap_err().is_not_found(), "{kind}");
        assert!(
            pool.read_range(kind, name, 0, 1)
                .unwrap_err()
                .is_not_found(),
            "{kind}"
        );
        assert!(
            pool.delete(kind, name).unwrap_err().is_not_found(),
            "{kind}"
        );
    }
    assert!(pool
        .read(FileKind::Config, "config")
        .unwrap_err()
        .is_not_found());
    assert!(pool.list(FileKind::Snapshot).unwrap().is_empty());
}

fn large_listing(pool: &dyn cairn_engine::Pool) {
    // More than one S3 list page (1000 keys).
    let names: Vec<String> = (0..1100u32).map(|i| format!("{i:032x}")).collect();
    for n in &names {
        pool.write(FileKind::Snapshot, n, n.as_bytes()).unwrap();
    }
    let mut listed = pool.list(FileKind::Snapshot).unwrap();
    listed.sort();
    assert_eq!(listed, names);
}

fn streamed_object(pool: &dyn cairn_engine::Pool) {
    // Written in many small pieces, larger than a multipart part when the
    // pool's address sets a small part size.
    let name = "11111111111111111111111111111111";
    let mut w = pool.create(FileKind::Pack, name).unwrap();
    let mut expected = Vec::new();
    for i in 0..(12u32 << 20) / 65_536 {
        let piece: Vec<u8> = (0..65_536u32).map(|j| ((i * 7 + j) % 253) as u8).collect();
        w.write_all(&piece).unwrap();
        expected.extend_from_slice(&piece);
    }
    w.commit().unwrap();
    let got = pool.read(FileKind::Pack, name).unwrap();
    assert!(got[..] == expected[..], "streamed object differs");
    let part = pool
        .read_range(FileKind::Pack, name, 6 << 20, 1 << 20)
        .unwrap();
    assert!(part[..] == expected[6 << 20..7 << 20]);
}
