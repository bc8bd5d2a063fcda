//! Reconnect (spec B12) with real parts: a qcow2 served read-only by
//! qemu-nbd, reached through a fault-injecting proxy that cuts chosen
//! connections mid-reply and refuses new ones for a while. A source with a
//! reconnect window re-establishes its connection, retries the request and
//! the backup restores bit-identical to `qemu-img convert`'s copy; without
//! a window, or with one shorter than the outage, the backup fails saying
//! so.
#![allow(clippy::unwrap_used)] // test code: a failed step is a failed test

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_cas::qemu::Qcow2Image;
use cairn_engine::{
    BackupDisk, BackupOptions, DiskInput, MemoryTarget, NbdSource, Repository, RestoreOptions,
};

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (run scripts/test.sh to install it)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the proxy does to each connection, by its number (0-based).
#[derive(Default)]
struct Plan {
    /// Connection number → bytes of the server's replies passed before the
    /// connection is cut.
    cut_after: Mutex<Vec<(usize, u64)>>,
    /// New connections are closed at once until then.
    down_until: Mutex<Option<Instant>>,
    /// Connections accepted so far.
    accepted: AtomicUsize,
    /// Connections cut or refused so far.
    faults: AtomicUsize,
    /// Every byte the clients sent (requests are small: headers only).
    sent: Mutex<Vec<u8>>,
    /// Every connection is cut after this many reply bytes.
    cut_every: Mutex<Option<u64>>,
    /// Connection number → reply bytes after which it stalls (stays open,
    /// passes nothing more).
    stall_after: Mutex<Vec<(usize, u64)>>,
    /// Reply bytes passed to clients, over all connections.
    passed: std::sync::atomic::AtomicU64,
    /// Every this many read data chunks (over all connections), the chunk
    /// is replaced by an NBD error reply (EIO) and the connection closed.
    error_every: Mutex<Option<usize>>,
    /// Read data chunks seen.
    data_chunks: AtomicUsize,
}

impl Plan {
    /// (type, length) of every NBD request the clients sent.
    fn requests(&self) -> Vec<(u16, u32)> {
        let sent = self.sent.lock().unwrap();
        let mut out = Vec::new();
        let mut i = 0;
        while i + 28 <= sent.len() {
            if sent[i..i + 4] == [0x25, 0x60, 0x95, 0x13] {
                let kind = u16::from_be_bytes([sent[i + 6], sent[i + 7]]);
                let len = u32::from_be_bytes(sent[i + 24..i + 28].try_into().unwrap());
                out.push((kind, len));
                i += 28;
            } else {
                i += 1;
            }
        }
        out
    }
}

/// A proxy on `listen` forwarding to the unix socket `target`, following
/// `plan`.
fn start_proxy(listen: &Path, target: PathBuf, plan: Arc<Plan>) {
    let listener = UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let n = plan.accepted.fetch_add(1, Ordering::SeqCst);
            if plan
                .down_until
                .lock()
                .unwrap()
                .is_some_and(|t| Instant::now() < t)
            {
                plan.faults.fetch_add(1, Ordering::SeqCst);
                drop(client);
                continue;
            }
            let Ok(server) = UnixStream::connect(&target) else {
                continue;
            };
            let budget = plan
                .cut_after
                .lock()
                .unwrap()
                .iter()
                .find(|(i, _)| *i == n)
                .map(|(_, b)| *b)
                .or(*plan.cut_every.lock().unwrap());
            let stall = plan
                .stall_after
                .lock()
                .unwrap()
                .iter()
                .find(|(i, _)| *i == n)
                .map(|(_, b)| *b);
            let plan = plan.clone();
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let recorder = plan.clone();
            // Set once the client sent its first request: the server's
            // bytes from then on are replies, chunk after chunk.
            let requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let requested_by_client = requested.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                while let Ok(k) = c_read.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    if buf[..k].windows(4).any(|w| w == [0x25, 0x60, 0x95, 0x13]) {
                        requested_by_client.store(true, Ordering::SeqCst);
                    }
                    if s_write.write_all(&buf[..k]).is_err() {
                        break;
                    }
                    recorder.sent.lock().unwrap().extend_from_slice(&buf[..k]);
                }
                let _ = s_write.shutdown(std::net::Shutdown::Both);
            });
            if plan.error_every.lock().unwrap().is_some() {
                std::thread::spawn(move || inject_errors(server, client, &plan, &requested));
                continue;
            }
            std::thread::spawn(move || {
                let (mut s_read, mut c_write) = (server, client);
                let mut passed = 0u64;
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    if stall.is_some_and(|s| passed >= s) {
                        plan.faults.fetch_add(1, Ordering::SeqCst);
                        // Hold the connection open, silent, until the
                        // client gives up on it.
                        let mut sink = [0u8; 1];
                        let _ = c_write.read(&mut sink);
                        std::thread::sleep(Duration::from_secs(4));
                        break;
                    }
                    let want = match budget {
                        Some(b) if passed >= b => {
                            plan.faults.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        Some(b) => buf.len().min((b - passed) as usize),
                        None => buf.len(),
                    };
                    match s_read.read(&mut buf[..want]) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            if c_write.write_all(&buf[..k]).is_err() {
                                break;
                            }
                            passed += k as u64;
                            plan.passed.fetch_add(k as u64, Ordering::SeqCst);
                        }
                    }
                }
                let _ = c_write.shutdown(std::net::Shutdown::Both);
                let _ = s_read.shutdown(std::net::Shutdown::Both);
            });
        }
    });
}

/// Forwards the server's replies chunk by chunk once the client has sent
/// its first request (`requested`), replacing every
/// `plan.error_every`-th read data chunk with an EIO error chunk and then
/// closing the connection (the rest of that reply never arrives).
fn inject_errors(
    mut s_read: UnixStream,
    mut c_write: UnixStream,
    plan: &Plan,
    requested: &std::sync::atomic::AtomicBool,
) {
    const MAGIC: [u8; 4] = [0x66, 0x8e, 0x33, 0xef];
    let every = plan.error_every.lock().unwrap().unwrap_or(usize::MAX);
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    'outer: loop {
        let k = match s_read.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => k,
        };
        if !requested.load(Ordering::SeqCst) {
            // The handshake: passed on as it comes.
            if c_write.write_all(&buf[..k]).is_err() {
                break;
            }
            continue;
        }
        pending.extend_from_slice(&buf[..k]);
        // Header: magic u32, flags u16, type u16, cookie u64, length u32.
        while pending.len() >= 20 {
            let len = u32::from_be_bytes(pending[16..20].try_into().unwrap()) as usize;
            if pending.len() < 20 + len {
                break;
            }
            let kind = u16::from_be_bytes([pending[6], pending[7]]);
            if kind == 1 {
                let n = plan.data_chunks.fetch_add(1, Ordering::SeqCst) + 1;
                if n % every == 0 {
                    let mut err = Vec::new();
                    err.extend_from_slice(&MAGIC);
                    err.extend_from_slice(&1u16.to_be_bytes()); // DONE
                    err.extend_from_slice(&((1u16 << 15) | 1).to_be_bytes()); // ERROR
                    err.extend_from_slice(&pending[8..16]); // cookie
                    err.extend_from_slice(&6u32.to_be_bytes());
                    err.extend_from_slice(&5u32.to_be_bytes()); // EIO
                    err.extend_from_slice(&0u16.to_be_bytes()); // no message
                    let _ = c_write.write_all(&err);
                    plan.faults.fetch_add(1, Ordering::SeqCst);
                    break 'outer;
                }
            }
            if c_write.write_all(&pending[..20 + len]).is_err() {
                break 'outer;
            }
            plan.passed.fetch_add((20 + len) as u64, Ordering::SeqCst);
            pending.drain(..20 + len);
        }
    }
    let _ = c_write.shutdown(std::net::Shutdown::Both);
    let _ = s_read.shutdown(std::net::Shutdown::Both);
}

struct Fixture {
    dir: tempfile::TempDir,
    image: PathBuf,
    reference: Vec<u8>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "8M"],
    );
    for (pattern, at, len) in [
        ("0x11", "0", "3M"),
        ("0x5c", "4M", "1M"),
        ("0xe7", "6M", "1536K"),
    ] {
        run(
            "qemu-io",
            &[
                "-c",
                &format!("write -P {pattern} {at} {len}"),
                image.to_str().unwrap(),
            ],
        );
    }
    let raw = dir.path().join("reference.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let reference = std::fs::read(&raw).unwrap();
    Fixture {
        dir,
        image,
        reference,
    }
}

/// Backs up the disk through the proxy (with `window`) and restores it.
fn back_up_through(
    f: &Fixture,
    plan: Arc<Plan>,
    window: Duration,
) -> cairn_engine::Result<(Vec<u8>, u64)> {
    back_up_with(f, plan, window, 32 << 20)
}

/// [`back_up_through`] with reads of at most `request` bytes.
fn back_up_with(
    f: &Fixture,
    plan: Arc<Plan>,
    window: Duration,
    request: u32,
) -> cairn_engine::Result<(Vec<u8>, u64)> {
    // Two client slots: a stalled connection still holds one on the server.
    let export = Qcow2Image::new(&f.image).export_read_only(None, 2).unwrap();
    let socket = export.uri().split_once("socket=").unwrap().1.to_string();
    let proxy = f.dir.path().join(format!("proxy-{}.sock", rand_suffix()));
    start_proxy(&proxy, PathBuf::from(socket), plan);
    let source = NbdSource::connect_many_with_timeout(
        &format!("nbd+unix:///?socket={}", proxy.display()),
        None,
        1,
        Duration::from_secs(2),
    )?
    .with_reconnect(window)
    .with_read_request_size(request)?;
    let source = Arc::new(source);
    let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new())).unwrap();
    let disk = BackupDisk::new(
        "vda",
        DiskInput::Image(Box::new(SharedSource(source.clone()))),
    );
    let stats = repo.backup(vec![disk], &BackupOptions::new("vm"))?;
    let target = MemoryTarget::new(f.reference.len() as u64).unwrap();
    let t2 = target.clone();
    repo.restore(
        &stats.snapshot,
        &move |_| Ok(Box::new(t2.clone())),
        &RestoreOptions::default(),
    )?;
    export.stop().unwrap();
    Ok((target.finished().unwrap(), source.reconnects()))
}

fn rand_suffix() -> u64 {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::SeqCst) as u64
}

/// Lets the test keep the source to read its reconnect count.
struct SharedSource(Arc<NbdSource>);

impl cairn_engine::DiskSource for SharedSource {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn data_extents(&self) -> cairn_engine::Result<Vec<std::ops::Range<u64>>> {
        self.0.data_extents()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> cairn_engine::Result<()> {
        self.0.read_at(offset, buf)
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
}

#[test]
fn a_cut_connection_is_reestablished_and_the_backup_is_whole() {
    let f = fixture();
    // The first connection is cut 2.5 MiB into its replies (mid-read), the
    // second one right after its handshake and 100 KiB of data.
    let plan = Arc::new(Plan::default());
    *plan.cut_after.lock().unwrap() = vec![(0, (5 << 19) + 1234), (1, 100 << 10)];
    let (restored, reconnects) =
        back_up_through(&f, plan.clone(), Duration::from_secs(60)).unwrap();
    assert!(restored == f.reference, "the restored disk differs");
    assert_eq!(plan.faults.load(Ordering::SeqCst), 2);
    assert_eq!(reconnects, 2);

    // The same cut without a reconnect window fails the backup.
    let plan = Arc::new(Plan::default());
    *plan.cut_after.lock().unwrap() = vec![(0, (5 << 19) + 1234)];
    let e = back_up_through(&f, plan, Duration::ZERO).unwrap_err();
    assert!(
        e.is_transient(),
        "a dropped connection is network-type: {e}"
    );
    assert!(!e.to_string().contains("reconnect window"), "{e}");
}

#[test]
fn an_outage_shorter_than_the_window_is_waited_out_and_a_longer_one_fails() {
    let f = fixture();
    // Cut at 1 MiB; the server is then unreachable for 1.5 s.
    let plan = Arc::new(Plan::default());
    *plan.cut_after.lock().unwrap() = vec![(0, 1 << 20)];
    // From the first connection on, new ones are refused for 1.5 s.
    let plan2 = plan.clone();
    let arm = std::thread::spawn(move || {
        while plan2.accepted.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        *plan2.down_until.lock().unwrap() = Some(Instant::now() + Duration::from_millis(1500));
    });
    let (restored, reconnects) =
        back_up_through(&f, plan.clone(), Duration::from_secs(60)).unwrap();
    arm.join().unwrap();
    assert!(restored == f.reference, "the restored disk differs");
    assert_eq!(reconnects, 1);
    assert!(
        plan.faults.load(Ordering::SeqCst) >= 2,
        "refused attempts were made"
    );

    // A window of 1 s against a 30 s outage: the backup fails, naming it.
    let plan = Arc::new(Plan::default());
    *plan.cut_after.lock().unwrap() = vec![(0, 1 << 20)];
    let plan2 = plan.clone();
    std::thread::spawn(move || {
        while plan2.accepted.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        *plan2.down_until.lock().unwrap() = Some(Instant::now() + Duration::from_secs(30));
    });
    let e = back_up_through(&f, plan, Duration::from_secs(1)).unwrap_err();
    assert!(
        e.to_string()
            .contains("could not be re-established within the reconnect window of 1s"),
        "{e}"
    );
    // Still network-type: a job retries it after its interval.
    assert!(e.is_transient(), "{e}");
}

/// The read buffer (spec B16): reads go out as requests of at most that
/// many bytes, covering the data, and the backup is whole.
#[test]
fn reads_are_split_into_requests_of_the_read_buffer() {
    let f = fixture();
    for request in [64u32 << 10, 1 << 20] {
        let plan = Arc::new(Plan::default());
        let (restored, _) = back_up_with(&f, plan.clone(), Duration::ZERO, request).unwrap();
        assert!(restored == f.reference, "the restored disk differs");
        let reads: Vec<u32> = plan
            .requests()
            .into_iter()
            .filter(|(kind, _)| *kind == 0)
            .map(|(_, len)| len)
            .collect();
        // 5.5 MiB of data in the image.
        let total: u64 = reads.iter().map(|&l| u64::from(l)).sum();
        assert!(total >= 11 << 19, "{total}");
        assert_eq!(reads.iter().max(), Some(&request), "{reads:?}");
    }
}

/// A connection dropped every MiB of replies: the backup completes through
/// reconnects, and what crossed the wire stays within 5 % of the disk
/// (only the request that was cut is asked again).
#[test]
fn a_source_dropping_every_mib_completes_reading_little_more() {
    let f = fixture();
    let plan = Arc::new(Plan::default());
    *plan.cut_every.lock().unwrap() = Some(1 << 20);
    let (restored, reconnects) =
        back_up_with(&f, plan.clone(), Duration::from_secs(60), 64 << 10).unwrap();
    assert!(restored == f.reference, "the restored disk differs");
    let data = 11u64 << 19; // 5.5 MiB written into the image
    assert!(reconnects >= 5, "{reconnects}");
    let passed = plan.passed.load(Ordering::SeqCst);
    assert!(passed >= data, "{passed}");
    // The bound: at most 1.05 × the disk (8 MiB) crosses; and
    // each cut costs at most the one 64 KiB request it interrupted (plus
    // a handshake).
    assert!(passed * 100 <= (8 << 20) * 105, "{passed} bytes crossed");
    assert!(
        passed - data <= reconnects * (68 << 10),
        "{passed} bytes crossed for {data} with {reconnects} reconnects"
    );
}

/// A connection that stalls (open, silent) is given up after the request
/// timeout and re-established; the backup is whole.
#[test]
fn a_stalled_connection_times_out_and_is_reestablished() {
    let f = fixture();
    let plan = Arc::new(Plan::default());
    plan.stall_after.lock().unwrap().push((0, 2 << 20));
    let (restored, reconnects) =
        back_up_through(&f, plan.clone(), Duration::from_secs(60)).unwrap();
    assert!(restored == f.reference, "the restored disk differs");
    assert_eq!(reconnects, 1);
    assert_eq!(plan.faults.load(Ordering::SeqCst), 1);
}

/// A share of reads answered with an NBD error (EIO): each such request is
/// tried again on a renewed connection and the backup is whole; without a
/// reconnect window the first error fails it.
#[test]
fn reads_failing_with_nbd_errors_are_retried() {
    let f = fixture();
    let plan = Arc::new(Plan::default());
    *plan.error_every.lock().unwrap() = Some(7);
    let (restored, reconnects) =
        back_up_with(&f, plan.clone(), Duration::from_secs(60), 64 << 10).unwrap();
    assert!(restored == f.reference, "the restored disk differs");
    let faults = plan.faults.load(Ordering::SeqCst) as u64;
    assert!(faults >= 5, "{faults} errors injected");
    assert_eq!(reconnects, faults);
    let plan = Arc::new(Plan::default());
    *plan.error_every.lock().unwrap() = Some(7);
    let e = back_up_with(&f, plan, Duration::ZERO, 64 << 10).unwrap_err();
    assert!(e.to_string().contains("server error 5"), "{e}");
}

/// A cancelled job does not wait out the reconnect window: a source with
/// a cancel token stops reconnecting as soon as it fires, and the read
/// fails with `Cancelled` (here a 10-minute window, a 60 s outage, the
/// token fired 300 ms into it).
#[test]
fn cancelling_ends_a_reconnect_wait() {
    let f = fixture();
    let plan = Arc::new(Plan::default());
    *plan.cut_after.lock().unwrap() = vec![(0, 1 << 20)];
    let cancel = cairn_engine::CancelToken::new();
    {
        let (plan, cancel) = (plan.clone(), cancel.clone());
        std::thread::spawn(move || {
            while plan.accepted.load(Ordering::SeqCst) == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            *plan.down_until.lock().unwrap() = Some(Instant::now() + Duration::from_secs(60));
            while plan.faults.load(Ordering::SeqCst) == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(300));
            cancel.cancel();
        });
    }
    let export = Qcow2Image::new(&f.image).export_read_only(None, 2).unwrap();
    let socket = export.uri().split_once("socket=").unwrap().1.to_string();
    let proxy = f.dir.path().join(format!("proxy-{}.sock", rand_suffix()));
    start_proxy(&proxy, PathBuf::from(socket), plan.clone());
    let source = NbdSource::connect_many_with_timeout(
        &format!("nbd+unix:///?socket={}", proxy.display()),
        None,
        1,
        Duration::from_secs(2),
    )
    .unwrap()
    .with_reconnect(Duration::from_secs(600))
    .with_cancel(cancel);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let repo = Repository::create(Arc::new(cairn_pools::MemoryPool::new())).unwrap();
        let disk = BackupDisk::new("vda", DiskInput::Image(Box::new(source)));
        let _ = tx.send(repo.backup(vec![disk], &BackupOptions::new("vm")));
    });
    // Without the token the read would wait up to 60 s for the server.
    let result = rx
        .recv_timeout(Duration::from_secs(45))
        .expect("the cancelled read did not return");
    let e = result.unwrap_err();
    assert!(matches!(e, cairn_engine::Error::Cancelled), "{e}");
    assert!(plan.faults.load(Ordering::SeqCst) >= 1);
    export.stop().unwrap();
}
