//! Helpers shared by the CLI's end-to-end tests: run `cairn`, parse its
//! JSON, make test images.
#![allow(dead_code, clippy::unwrap_used)] // each test file uses a subset; a failed step is a failed test

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use cairn_engine::sample::{fill_text, SampleRng};
use serde_json::Value;

/// Longest any single `cairn` run of the tests may take: a command that
/// hangs fails its test (killed, with what it printed) instead of hanging
/// the suite.
pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Runs `cmd` to completion, collecting its output; kills it and panics
/// after [`COMMAND_TIMEOUT`].
pub fn output_within(mut cmd: Command) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > COMMAND_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            let err = err.join().unwrap_or_default();
            panic!(
                "{cmd:?} still running after {COMMAND_TIMEOUT:?}: killed. stderr: {}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Runs `cairn` with `args` and the extra environment `env` (see
/// [`COMMAND_TIMEOUT`]).
pub fn cairn_env<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    args: &[S],
    env: &[(&str, String)],
) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn"));
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    output_within(cmd)
}

/// Runs `cairn` with `args` and the extra environment `env`; it must succeed.
pub fn ok_env<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    args: &[S],
    env: &[(&str, String)],
) -> String {
    let out = cairn_env(args, env);
    assert!(
        out.status.success(),
        "cairn {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// [`ok_env`], parsed as JSON.
pub fn json_env<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    args: &[S],
    env: &[(&str, String)],
) -> Value {
    serde_json::from_str(&ok_env(args, env)).unwrap()
}

pub fn cairn<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> Output {
    cairn_env(args, &[])
}

pub fn ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let out = cairn(args);
    assert!(
        out.status.success(),
        "cairn {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn json<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> Value {
    serde_json::from_str(&ok(args)).unwrap()
}

pub fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally, not by a signal")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// An image with zeros, text, random data, duplicated regions and holes.
pub fn make_image(path: &Path, size: u64, seed: u64) {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    let mut rng = SampleRng::new(seed);
    let mut text = vec![0u8; 300_000];
    fill_text(&mut rng, &mut text);
    let mut random = vec![0u8; 200_000];
    rng.fill(&mut random);
    f.write_all_at(&text, 0).unwrap();
    f.write_all_at(&random, 1 << 20).unwrap();
    f.write_all_at(&random, 3 << 20).unwrap(); // duplicated region, grid-aligned
    f.write_all_at(&[0u8; 100_000], 5 << 20).unwrap(); // explicit zeros (allocated)
    f.write_all_at(&text[..12345], size - 12345).unwrap(); // unaligned tail
}

pub fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Bytes free for an unprivileged writer on the filesystem holding `path`
/// (root may also write the blocks ext4 reserves: a lower bound for it).
pub fn free_bytes(path: &Path) -> u64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs writes into the struct we pass; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::statvfs(c.as_ptr(), &mut s) },
        0,
        "statvfs {}",
        path.display()
    );
    s.f_bavail as u64 * s.f_frsize as u64
}

/// Runs a tool (qemu-img, qemu-io …); it must succeed.
pub fn tool(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (run scripts/test.sh to install it)"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", stderr(&out));
}

pub fn new_qcow2(path: &Path, size: &str) {
    tool("qemu-img", &["create", "-q", "-f", "qcow2", &p(path), size]);
}

pub fn raw_of(qcow2: &Path, out: &Path) -> Vec<u8> {
    tool(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", &p(qcow2), &p(out)],
    );
    std::fs::read(out).unwrap()
}

/// A small tmpfs mounted for a test (needs root, as CI runs): a filesystem
/// that really fills up. Unmounted on drop. `None` (with a notice) when
/// the mount is refused, so a developer's unprivileged run still passes
/// the rest of the suite; CI runs as root and always mounts it.
#[allow(dead_code)] // not every test binary uses it
pub struct SmallFs {
    pub path: std::path::PathBuf,
}

#[allow(dead_code)]
impl SmallFs {
    pub fn mount(parent: &Path, bytes: u64) -> Option<SmallFs> {
        let path = parent.join("smallfs");
        std::fs::create_dir_all(&path).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&path)
            .stderr(Stdio::null())
            .status();
        if !st.is_ok_and(|s| s.success()) {
            eprintln!("NOTICE: cannot mount a tmpfs (not root?): full-filesystem test skipped");
            return None;
        }
        Some(SmallFs { path })
    }

    /// Bytes free for an unprivileged writer.
    pub fn free(&self) -> u64 {
        free_bytes(&self.path)
    }

    /// Fills the filesystem until `leave` bytes are free (a file `filler`).
    pub fn fill_leaving(&self, leave: u64) {
        let free = self.free();
        assert!(free > leave, "only {free} bytes free");
        let f = std::fs::File::create(self.path.join("filler")).unwrap();
        let block = vec![0x5au8; 1 << 20];
        let mut left = free - leave;
        use std::io::Write;
        let mut w = std::io::BufWriter::new(f);
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            w.write_all(&block[..n]).unwrap();
            left -= n as u64;
        }
        w.into_inner().unwrap().sync_all().unwrap();
    }

    pub fn unfill(&self) {
        std::fs::remove_file(self.path.join("filler")).unwrap();
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A child process killed and reaped when the guard drops (a failed
/// assertion never leaves a qemu-nbd behind).
#[allow(dead_code)]
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `sock` accepts a connection; panics after 10 s or when
/// `child` exits first.
#[allow(dead_code)]
pub fn wait_for_socket(sock: &Path, child: &mut std::process::Child) {
    let start = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "the server exited ({st}) before listening on {}",
                sock.display()
            );
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "nothing listens on {} after 10 s",
            sock.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// `len` random bytes (from `seed`) written to `path`, and returned.
#[allow(dead_code)]
pub fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    SampleRng::new(seed).fill(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

/// Every file below `dir`, recursively.
#[allow(dead_code)]
pub fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(walk_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Starts `cairn args` (with `env`) held at pause point `point`
/// (`CAIRN_PAUSE_AT`, files in `dir`): the process-kill harness's way to
/// act at an exact step. `None` when the process exits before reaching
/// the point; panics after 60 s.
#[allow(dead_code)]
pub fn spawn_held(
    args: &[&str],
    env: &[(&str, String)],
    point: &str,
    dir: &Path,
) -> Option<std::process::Child> {
    std::fs::create_dir_all(dir).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("CAIRN_PAUSE_AT", point)
        .env("CAIRN_PAUSE_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let flag = dir.join(format!("{point}.reached"));
    let start = std::time::Instant::now();
    while !flag.exists() {
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "cairn {args:?} never reached {point}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Some(child)
}

/// Lets a process held by [`spawn_held`] go on.
#[allow(dead_code)]
pub fn release(point: &str, dir: &Path) {
    std::fs::write(dir.join(format!("{point}.go")), b"").unwrap();
}
