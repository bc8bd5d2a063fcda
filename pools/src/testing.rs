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

    /// CPU seconds (user + system) the server has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are
        // the 14th and 15th fields of the whole line.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        (ticks(11) + ticks(12)) / hz
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
            // Keep the local cache out of the user's home.
            (
                "XDG_CACHE_HOME",
                self.root.join(".client-cache").display().to_string(),
            ),
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
    // A small object, and one past several multipart parts when the pool
    // uses small parts.
    for size in [100_000usize, 12 << 20] {
        let mut w = pool.create(FileKind::Index, name).unwrap();
        w.write_all(&vec![7u8; size]).unwrap();
        drop(w);
        assert!(pool.list(FileKind::Index).unwrap().is_empty(), "{size}");
        assert!(
            pool.read(FileKind::Index, name).unwrap_err().is_not_found(),
            "{size}"
        );
    }
    // The name is still free.
    pool.write(FileKind::Index, name, b"x").unwrap();
    // A create of a taken name fails even with identical bytes.
    let again = pool.write(FileKind::Index, name, b"x").unwrap_err();
    assert!(matches!(again, Error::AlreadyExists { .. }), "{again}");
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

/// What a [`FaultProxy`] does to the requests it passes.
#[derive(Clone, Copy, Debug)]
pub struct FaultPlan {
    /// Share of requests that fail, in percent (0–100).
    pub fail_percent: u32,
    /// How long a stalled request hangs before its connection is closed
    /// (longer than the client's timeout, so the client gives up first).
    pub stall: Duration,
    /// Seed of the fault sequence.
    pub seed: u64,
}

/// Counts of what a [`FaultProxy`] did.
#[derive(Debug, Default)]
pub struct FaultCounts {
    /// Requests passed through untouched.
    pub passed: std::sync::atomic::AtomicU64,
    /// Answered `503 SlowDown`.
    pub slow_down: std::sync::atomic::AtomicU64,
    /// Connection reset after the request was read.
    pub reset: std::sync::atomic::AtomicU64,
    /// Stalled until the client timed out.
    pub stalled: std::sync::atomic::AtomicU64,
    /// Upload cut halfway: half the body forwarded, then both sides closed.
    pub cut: std::sync::atomic::AtomicU64,
    /// Request forwarded and answered by the server, the answer dropped
    /// (the client cannot know whether its write landed).
    pub lost_response: std::sync::atomic::AtomicU64,
    /// Faults applied so far: picks the next kind, round robin, so every
    /// kind occurs once enough requests fail.
    next_kind: std::sync::atomic::AtomicU64,
}

/// An HTTP/1.1 proxy between an S3 client and a server that fails a share
/// of the requests: `503 SlowDown` answers, connection resets, stalls past
/// the client's timeout, uploads cut halfway (the server sees half a body,
/// then the connection drops) and answers lost after the server acted on
/// the request. The kinds take turns, so each occurs once five requests
/// have failed (a cut waits for a request with a body). Everything else
/// passes unchanged.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    counts: std::sync::Arc<FaultCounts>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 in front of `upstream_port`.
    pub fn start(upstream_port: u16, plan: FaultPlan) -> Self {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let counts = Arc::new(FaultCounts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counts.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seq = plan.seed;
            for conn in listener.incoming() {
                if s.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                seq = seq.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let counts = c.clone();
                std::thread::spawn(move || {
                    let _ = proxy_connection(client, upstream_port, plan, seq, &counts);
                });
            }
        });
        FaultProxy { port, counts, stop }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What the proxy did so far.
    pub fn counts(&self) -> &FaultCounts {
        &self.counts
    }

    /// Faults injected so far (all kinds).
    pub fn faults(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.counts;
        c.slow_down.load(Relaxed)
            + c.reset.load(Relaxed)
            + c.stalled.load(Relaxed)
            + c.cut.load(Relaxed)
            + c.lost_response.load(Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Reads one HTTP message head (up to the blank line); `None` at EOF.
fn read_head(r: &mut impl std::io::BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r.read_until(b'\n', &mut line)?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" {
            return Ok(Some(head));
        }
    }
}

/// The value of header `name` (case-insensitive) in `head`.
fn header(head: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(head).lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Reads a body: `Content-Length` bytes, or chunked (kept chunked).
fn read_body(r: &mut impl std::io::BufRead, head: &[u8]) -> std::io::Result<Vec<u8>> {
    if let Some(len) = header(head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        return Ok(body);
    }
    if header(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line)?;
            body.extend_from_slice(&line);
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&line)
                    .trim()
                    .split(';')
                    .next()
                    .unwrap_or("0"),
                16,
            )
            .unwrap_or(0);
            let mut chunk = vec![0u8; size + 2];
            r.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk);
            if size == 0 {
                return Ok(body);
            }
        }
    }
    Ok(Vec::new())
}

/// Closes a socket with a TCP reset.
fn reset(s: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger.
    unsafe {
        libc::setsockopt(
            std::os::unix::io::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

// Long on purpose: one HTTP exchange loop with every fault kind inline,
// so a test reader sees exactly what each fault does on the wire.
fn proxy_connection(
    client: TcpStream,
    upstream_port: u16,
    plan: FaultPlan,
    seed: u64,
    counts: &FaultCounts,
) -> std::io::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    // SplitMix64: well mixed from the first draw, whatever the seed.
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut from_client = std::io::BufReader::new(client.try_clone()?);
    let mut to_client = client;
    let upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
    let mut from_upstream = std::io::BufReader::new(upstream.try_clone()?);
    let mut to_upstream = upstream;
    loop {
        let Some(head) = read_head(&mut from_client)? else {
            return Ok(());
        };
        let body = read_body(&mut from_client, &head)?;
        let roll = next();
        let kind = counts.next_kind.load(Relaxed) % 5;
        // A cut needs a body: a failure due as a cut waits for one.
        let fail = (roll % 100) < plan.fail_percent as u64 && !(kind == 3 && body.len() < 2);
        if fail {
            counts.next_kind.fetch_add(1, Relaxed);
            match kind {
                0 => {
                    counts.slow_down.fetch_add(1, Relaxed);
                    let xml = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code>\
                               <Message>Please reduce your request rate.</Message></Error>";
                    write!(
                        to_client,
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                        xml.len()
                    )?;
                    return Ok(());
                }
                1 => {
                    counts.reset.fetch_add(1, Relaxed);
                    reset(to_client);
                    return Ok(());
                }
                2 => {
                    counts.stalled.fetch_add(1, Relaxed);
                    std::thread::sleep(plan.stall);
                    reset(to_client);
                    return Ok(());
                }
                3 => {
                    counts.cut.fetch_add(1, Relaxed);
                    to_upstream.write_all(&head)?;
                    to_upstream.write_all(&body[..body.len() / 2])?;
                    reset(to_upstream);
                    reset(to_client);
                    return Ok(());
                }
                _ => {
                    counts.lost_response.fetch_add(1, Relaxed);
                    to_upstream.write_all(&head)?;
                    to_upstream.write_all(&body)?;
                    // Wait for the server's answer, then drop it.
                    let is_head = head.starts_with(b"HEAD ");
                    if let Some(rhead) = read_head(&mut from_upstream)? {
                        if !is_head {
                            let _ = read_body(&mut from_upstream, &rhead);
                        }
                    }
                    reset(to_client);
                    return Ok(());
                }
            }
        }
        counts.passed.fetch_add(1, Relaxed);
        to_upstream.write_all(&head)?;
        to_upstream.write_all(&body)?;
        let is_head = head.starts_with(b"HEAD ");
        let Some(rhead) = read_head(&mut from_upstream)? else {
            return Ok(());
        };
        let status = String::from_utf8_lossy(&rhead)
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_string();
        let rbody = if is_head || status == "204" || status == "304" {
            Vec::new()
        } else {
            read_body(&mut from_upstream, &rhead)?
        };
        to_client.write_all(&rhead)?;
        to_client.write_all(&rbody)?;
        if header(&rhead, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
            return Ok(());
        }
    }
}
