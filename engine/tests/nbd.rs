//! The NBD client against real parts: qcow2 images made with qemu-img and
//! written with qemu-io (into a persistent dirty bitmap), exported by
//! qemu-nbd, and compared with the reference client `nbdinfo` (libnbd-bin).
//! `scripts/test.sh` installs what is missing.
#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

mod jobs;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cairn_engine::{
    BackupDisk, BackupOptions, ChangedBlocks, DiskInput, DiskSource, DiskTarget, DynPool,
    NbdConnection, NbdSource, NbdTarget, NoProgress, Repository, RestoreOptions, VerifyOptions,
};
use cairn_pools::MemoryPool;
use jobs::{backup, restore_to_dir, verify};

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

/// A qemu-nbd export of a qcow2 image with bitmap `b0`, stopped on drop.
struct Export {
    child: Child,
    socket: PathBuf,
}

impl Export {
    fn start(image: &Path, socket: &Path) -> Self {
        Self::start_with(image, socket, &["-r", "-e", "4", "-B", "b0"])
    }

    fn start_with(image: &Path, socket: &Path, args: &[&str]) -> Self {
        let _ = std::fs::remove_file(socket);
        let child = Command::new("qemu-nbd")
            .args(["-f", "qcow2", "-t"])
            .args(args)
            .arg("-k")
            .arg(socket)
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd (qemu-utils) is installed");
        // Guarded from here: a failed wait still kills the server.
        let mut export = Export {
            child,
            socket: socket.to_path_buf(),
        };
        let start = std::time::Instant::now();
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Some(st) = export.child.try_wait().unwrap() {
                panic!(
                    "qemu-nbd exited ({st}) before listening on {}",
                    socket.display()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "qemu-nbd does not listen on {} after 10 s",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        export
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

/// Any child process, killed and reaped on drop.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nbdinfo --map[=CONTEXT]` ranges whose type satisfies `pick`.
fn nbdinfo_map(uri: &str, context: Option<&str>, pick: impl Fn(u32) -> bool) -> Vec<Range<u64>> {
    let arg = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let text = run("nbdinfo", &[&arg, uri]);
    let mut out: Vec<Range<u64>> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len, ty): (u64, u64, u32) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        if pick(ty) {
            match out.last_mut() {
                Some(last) if last.end == off => last.end = off + len,
                _ => out.push(off..off + len),
            }
        }
    }
    out
}

fn qemu_io(image: &Path, cmds: &[&str]) {
    let mut args = Vec::new();
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let image = image.display().to_string();
    args.push(&image);
    run("qemu-io", &args);
}

fn raw_copy(image: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("raw.img");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            &image.display().to_string(),
            &out.display().to_string(),
        ],
    );
    std::fs::read(out).unwrap()
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.qcow2");
    let img = image.display().to_string();
    run("qemu-img", &["create", "-q", "-f", "qcow2", &img, "48M"]);
    run("qemu-img", &["bitmap", "--add", &img, "b0"]);
    (dir, image)
}

#[test]
fn extents_and_reads_match_the_reference_client() {
    let (dir, image) = setup();
    qemu_io(
        &image,
        &[
            "write -P 7 1M 64k",
            "write -P 9 5M 4k",
            "write -z 6M 64k",
            "write -P 3 40M 3M",
            "write -P 5 48892k 4k",
        ],
    );
    let export = Export::start(&image, &dir.path().join("s.sock"));
    let uri = export.uri();
    let src = NbdSource::connect(&uri, Some("b0")).unwrap();
    assert_eq!(src.size(), 48 << 20);
    let data = src.data_extents().unwrap();
    let reference = nbdinfo_map(&uri, None, |t| t & 3 == 0);
    assert_eq!(data, reference, "base:allocation differs from nbdinfo");
    let dirty = src.dirty_extents("b0").unwrap();
    let reference = nbdinfo_map(&uri, Some("qemu:dirty-bitmap:b0"), |t| t & 1 == 1);
    assert_eq!(dirty, reference, "dirty bitmap differs from nbdinfo");
    assert!(!dirty.is_empty());
    // Whole-disk read (several 32 MiB-capped requests) equals qemu-img's.
    let mut all = vec![0u8; src.size() as usize];
    src.read_at(0, &mut all).unwrap();
    assert!(all == raw_copy(&image, dir.path()));
    // A bitmap the export does not have is reported, not trusted.
    assert!(src.dirty_extents("nope").is_err());
    // Reads past the end are refused.
    assert!(src.read_at((48 << 20) - 10, &mut [0u8; 20]).is_err());
}

#[test]
fn full_then_incremental_over_nbd_restores_bit_identical() {
    let (dir, image) = setup();
    qemu_io(&image, &["write -P 1 0 8M", "write -P 2 20M 4M"]);
    let pool: DynPool = Arc::new(MemoryPool::new());
    Repository::init(pool.clone()).unwrap();
    let repo = Repository::open(pool).unwrap();
    let sock = dir.path().join("s.sock");

    let export = Export::start(&image, &sock);
    let disk = BackupDisk::new(
        "vda",
        DiskInput::Image(Box::new(NbdSource::connect(&export.uri(), None).unwrap())),
    );
    let full = backup(&repo, vec![disk], &BackupOptions::new("vm"), &NoProgress).unwrap();
    assert_eq!(full.bytes_read, 12 << 20, "only allocated data is read");
    drop(export);
    // The bitmap (b0, enabled) now records everything written since its
    // creation; write more and back up incrementally from it.
    qemu_io(&image, &["write -P 8 3M 4k", "write -P 9 30M 128k"]);
    let expected = raw_copy(&image, dir.path());
    let export = Export::start(&image, &sock);
    let src = NbdSource::connect(&export.uri(), Some("b0")).unwrap();
    let dirty = src.dirty_extents("b0").unwrap();
    let dirty_bytes: u64 = dirty.iter().map(|r| r.end - r.start).sum();
    let parent = repo.load_snapshot(&full.snapshot).unwrap();
    let opts = BackupOptions::new("vm");
    let disk = BackupDisk::new(
        "vda",
        DiskInput::Incremental {
            source: Box::new(src),
            changed: ChangedBlocks::new(full.snapshot, &parent, "vda", dirty).unwrap(),
        },
    );
    let inc = backup(&repo, vec![disk], &opts, &NoProgress).unwrap();
    assert_eq!(inc.mode.as_str(), "cbt");
    assert!(
        inc.bytes_read <= dirty_bytes.div_ceil(65536) * 65536,
        "{inc:?}"
    );
    let out = dir.path().join("restore");
    restore_to_dir(
        &repo,
        &inc.snapshot,
        &out,
        &RestoreOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert!(std::fs::read(out.join("vda")).unwrap() == expected);
}

#[test]
fn dropped_connection_fails_cleanly() {
    let (dir, image) = setup();
    qemu_io(&image, &["write -P 1 0 16M"]);
    let mut export = Export::start(&image, &dir.path().join("s.sock"));
    let mut conn = NbdConnection::connect(&export.uri(), &["base:allocation"]).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    conn.read_at(0, &mut buf).unwrap();
    export.child.kill().unwrap();
    export.child.wait().unwrap();
    let err = conn.read_at(0, &mut buf).unwrap_err();
    assert!(err.to_string().contains("NBD"), "{err}");
    // No server at all: a clear connection error naming the socket.
    let err = NbdConnection::connect(&export.uri(), &[]).unwrap_err();
    assert!(err.to_string().contains("s.sock"), "{err}");
}

#[test]
fn several_connections_read_one_export() {
    let (dir, image) = setup();
    qemu_io(&image, &["write -P 4 0 20M", "write -P 6 33M 5M"]);
    let expected = raw_copy(&image, dir.path());
    let export = Export::start(&image, &dir.path().join("s.sock"));
    let src = NbdSource::connect_many(&export.uri(), Some("b0"), 4).unwrap();
    assert_eq!(src.connections(), 4);
    let mut all = vec![0u8; src.size() as usize];
    src.read_at(0, &mut all).unwrap();
    assert!(all == expected);
    // Unaligned reads split across connections land in the right place.
    let mut part = vec![0u8; 3 << 20];
    src.read_at(19 << 20 | 12345, &mut part).unwrap();
    let at = (19 << 20 | 12345) as usize;
    assert!(part[..] == expected[at..at + (3 << 20)]);
    assert!(NbdSource::connect_many(&export.uri(), None, 0).is_err());
    drop(src);
    drop(export);
    // A server taking one client at a time leaves the source with one.
    let export = Export::start_with(&image, &dir.path().join("t.sock"), &["-r", "-e", "1"]);
    let src = NbdSource::connect_many(&export.uri(), None, 3).unwrap();
    assert_eq!(src.connections(), 1);
    src.read_at(0, &mut all).unwrap();
    assert!(all == expected);
}

#[test]
fn nbd_target_writes_a_blank_export_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("t.qcow2");
    let img = image.display().to_string();
    run("qemu-img", &["create", "-q", "-f", "qcow2", &img, "8M"]);
    let export = Export::start_with(&image, &dir.path().join("w.sock"), &["-e", "1"]);
    assert!(
        NbdTarget::connect(&export.uri(), 4 << 20).is_err(),
        "size must match"
    );
    let target = Box::new(NbdTarget::connect(&export.uri(), 8 << 20).unwrap());
    let data: Vec<u8> = (0..(1 << 20) + 4096).map(|i| (i % 251) as u8).collect();
    target.write_at(3 << 20, &data).unwrap();
    assert!(
        target.write_at((8 << 20) - 10, &[1; 20]).is_err(),
        "past the end"
    );
    target.finish().unwrap();
    drop(export);
    let raw = raw_copy(&image, dir.path());
    assert!(raw[3 << 20..(3 << 20) + data.len()] == data[..]);
    assert!(raw[..3 << 20].iter().all(|&b| b == 0));
    // Not blank any more: refused, naming where data was found.
    let export = Export::start_with(&image, &dir.path().join("w.sock"), &["-e", "1"]);
    let err = NbdTarget::connect(&export.uri(), 8 << 20).unwrap_err();
    assert!(err.to_string().contains("not blank"), "{err}");
    drop(export);
    let export = Export::start_with(&image, &dir.path().join("r.sock"), &["-r"]);
    let err = NbdTarget::connect(&export.uri(), 8 << 20).unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
}

/// What a [`proxy`] does once the server has sent its `limit` bytes.
enum AfterLimit {
    /// Cut both directions: a connection dropped mid-read.
    Cut,
    /// Keep both connections open and pass nothing more (a server that
    /// hangs) until the flag is set.
    Silent(Arc<std::sync::atomic::AtomicBool>),
}

/// A unix-socket proxy in front of an NBD server that passes `limit`
/// bytes of the server's answers, then cuts or goes silent.
fn proxy(
    listen: &Path,
    server: &Path,
    limit: usize,
    after: AfterLimit,
) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let _ = std::fs::remove_file(listen);
    let listener = UnixListener::bind(listen).unwrap();
    let server = server.to_path_buf();
    std::thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        let upstream = UnixStream::connect(&server).unwrap();
        let (mut c_in, mut u_out) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = c_in.read(&mut buf) {
                if n == 0 || u_out.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let (mut u_in, mut c_out) = (upstream, client);
        let mut sent = 0;
        let mut buf = [0u8; 65536];
        while sent < limit {
            let Ok(n) = u_in.read(&mut buf) else { break };
            let n = n.min(limit - sent);
            if n == 0 || c_out.write_all(&buf[..n]).is_err() {
                break;
            }
            sent += n;
        }
        match after {
            AfterLimit::Cut => {
                let _ = c_out.shutdown(std::net::Shutdown::Both);
                let _ = u_in.shutdown(std::net::Shutdown::Both);
            }
            AfterLimit::Silent(release) => {
                while !release.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    })
}

#[test]
fn connection_dropped_mid_backup_fails_the_snapshot_and_keeps_earlier_ones() {
    let (dir, image) = setup();
    qemu_io(&image, &["write -P 1 0 4M"]);
    let pool: DynPool = Arc::new(MemoryPool::new());
    Repository::init(pool.clone()).unwrap();
    let repo = Repository::open(pool.clone()).unwrap();
    let sock = dir.path().join("s.sock");
    let export = Export::start(&image, &sock);
    let disk = |uri: &str| {
        BackupDisk::new(
            "vda",
            DiskInput::Image(Box::new(NbdSource::connect(uri, None).unwrap())),
        )
    };
    let first = backup(
        &repo,
        vec![disk(&export.uri())],
        &BackupOptions::new("vm"),
        &NoProgress,
    )
    .unwrap();
    let before = raw_copy(&image, dir.path());
    drop(export);
    qemu_io(&image, &["write -P 2 8M 24M"]);
    let export = Export::start(&image, &sock);
    // The server's bytes stop 10 MiB into the reads of the second backup.
    let proxy_sock = dir.path().join("proxy.sock");
    let proxy = proxy(&proxy_sock, &sock, 10 << 20, AfterLimit::Cut);
    let uri = format!("nbd+unix:///?socket={}", proxy_sock.display());
    let err = backup(
        &repo,
        vec![disk(&uri)],
        &BackupOptions::new("vm"),
        &NoProgress,
    )
    .unwrap_err();
    assert!(err.to_string().contains("NBD"), "{err}");
    proxy.join().unwrap();
    drop(export);
    // No new snapshot; the earlier one restores bit-identical and the pool
    // verifies clean (packs sealed before the drop are reused later).
    let repo = Repository::open(pool).unwrap();
    assert_eq!(repo.snapshot_ids().unwrap(), vec![first.snapshot]);
    let out = dir.path().join("restore");
    restore_to_dir(
        &repo,
        &first.snapshot,
        &out,
        &RestoreOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert!(std::fs::read(out.join("vda")).unwrap() == before);
    let report = verify(
        &repo,
        &VerifyOptions::default().with_read_data(true),
        &NoProgress,
    )
    .unwrap();
    assert!(report.is_ok(), "{report:?}");
}

#[test]
fn tcp_exports_read_like_unix_ones() {
    let (dir, image) = setup();
    qemu_io(&image, &["write -P 5 1M 3M"]);
    let expected = raw_copy(&image, dir.path());
    // qemu-nbd cannot pick its own port: try free-looking ones until one
    // is its own (another process may take a port between our probe and
    // qemu-nbd's bind; then qemu-nbd exits and the next port is tried).
    let (port, mut child) = (0..10)
        .find_map(|_| {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new("qemu-nbd")
                .args([
                    "-r", "-f", "qcow2", "-t", "-e", "3", "-B", "b0", "-x", "vda",
                ])
                .args(["-b", "127.0.0.1", "-p", &port.to_string()])
                .arg(&image)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut guard = Guard(child);
            let start = std::time::Instant::now();
            loop {
                if guard.0.try_wait().unwrap().is_some() {
                    return None; // the port was taken: try another
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some((port, guard));
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "qemu-nbd never listened"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .expect("qemu-nbd could not bind a port in 10 tries");
    let uri = format!("nbd://127.0.0.1:{port}/vda");
    let src = NbdSource::connect_many(&uri, Some("b0"), 2).unwrap();
    assert_eq!(src.connections(), 2);
    assert_eq!(src.data_extents().unwrap(), vec![(1 << 20)..(4 << 20)]);
    assert_eq!(
        src.dirty_extents("b0").unwrap(),
        nbdinfo_map(&uri, Some("qemu:dirty-bitmap:b0"), |t| t & 1 == 1)
    );
    let mut all = vec![0u8; src.size() as usize];
    src.read_at(0, &mut all).unwrap();
    assert!(all == expected);
    drop(src);
    let _ = child.0.kill();
    let _ = child.0.wait();
    // Nobody listening: a clear error naming the server, at once.
    let err = NbdSource::connect(&uri, None).unwrap_err();
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn a_server_that_stops_answering_fails_the_backup_after_the_timeout() {
    let (dir, image) = setup();
    qemu_io(&image, &["write -P 1 0 16M"]);
    let pool: DynPool = Arc::new(MemoryPool::new());
    Repository::init(pool.clone()).unwrap();
    let repo = Repository::open(pool.clone()).unwrap();
    let sock = dir.path().join("s.sock");
    let _export = Export::start(&image, &sock);
    let proxy_sock = dir.path().join("silent.sock");
    let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let proxy = proxy(
        &proxy_sock,
        &sock,
        4 << 20,
        AfterLimit::Silent(release.clone()),
    );
    let uri = format!("nbd+unix:///?socket={}", proxy_sock.display());
    let source =
        NbdSource::connect_many_with_timeout(&uri, None, 1, Duration::from_secs(1)).unwrap();
    let started = std::time::Instant::now();
    let err = backup(
        &repo,
        vec![BackupDisk::new("vda", DiskInput::Image(Box::new(source)))],
        &BackupOptions::new("vm"),
        &NoProgress,
    )
    .unwrap_err();
    let took = started.elapsed();
    release.store(true, std::sync::atomic::Ordering::SeqCst);
    proxy.join().unwrap();
    let text = err.to_string();
    assert!(
        text.contains("the server did not answer in full within the timeout"),
        "the timeout names itself: {text}"
    );
    // The 1 s timeout fired, not the 60 s default (generous bound for a
    // loaded machine).
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(repo.snapshot_ids().unwrap().is_empty(), "no snapshot");
    // A zero timeout is refused.
    assert!(NbdSource::connect_many_with_timeout(&uri, None, 1, Duration::ZERO).is_err());
}
