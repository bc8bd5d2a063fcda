//! [`QemuNbdExport`]: a `qemu-nbd` process serving one image on a unix
//! socket in a private directory, ready once it sends its NBD greeting.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_engine::{Error, Result};

use super::tool_error;

/// How long `qemu-nbd` may take to create its socket.
const EXPORT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `qemu-nbd` process serving one image on a unix socket in a private
/// directory. [`stop`](Self::stop) ends it with SIGTERM and waits; dropping
/// without `stop` does the same, ignoring errors.
#[derive(Debug)]
pub struct QemuNbdExport {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
}

static EXPORT_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Whether an NBD server on `socket` sends its greeting. A successful
/// `connect` alone proves nothing: qemu-nbd listens before it has opened the
/// image and its bitmap, and the kernel queues connections until it accepts
/// them — or exits because the bitmap does not exist.
fn greets(socket: &Path) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC"
}

impl QemuNbdExport {
    /// Starts `qemu-nbd -f FORMAT ARGS --persistent -k SOCKET IMAGE` and
    /// waits until it sends its NBD greeting (a listening socket alone proves
    /// nothing: qemu-nbd listens before opening the image); an error with its
    /// messages if it exits instead.
    pub fn start(image: &Path, format: &str, mut extra: Vec<String>) -> Result<Self> {
        // The readiness probe is a client that leaves again: without
        // --persistent, qemu-nbd would take that as its last client and exit.
        if !extra.iter().any(|a| a == "--persistent" || a == "-t") {
            extra.push("--persistent".into());
        }
        let n = EXPORT_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("cairn-nbd-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let socket = dir.join("nbd.sock");
        // A directory left by an earlier process with the same pid.
        let _ = std::fs::remove_file(&socket);
        // qemu-nbd's messages go to a file, not a pipe nobody drains while
        // it runs; they are read back if it fails to start.
        let log_path = dir.join("qemu-nbd.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| Error::io(format!("creating {}", log_path.display()), e))?;
        let mut args = vec!["-f".to_string(), format.to_string()];
        args.extend(extra);
        args.push("-k".into());
        args.push(socket.display().to_string());
        args.push(image.display().to_string());
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // A --persistent qemu-nbd outlives a killed parent and keeps the
        // image locked (the VM, or the next backup, could not write it):
        // the kernel sends it SIGTERM when the *thread* that started it
        // ends — so an export must be started on a thread that outlives
        // it (the CLI starts every export on its main thread; see the
        // docs of `Qcow2Image::export_read_only` and `Qcow2Target`).
        // Its own process group: a terminal's Ctrl-C goes to cairn, which
        // cancels cleanly, not to qemu-nbd mid-request.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let parent = std::process::id();
        // SAFETY: the hook runs in the forked child before exec and calls
        // only async-signal-safe functions (prctl, getppid).
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the prctl took effect (no
                // allocation here: this runs between fork and exec).
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| Error::io("running qemu-nbd (install qemu-utils to get it)", e))?;
        let mut export = QemuNbdExport {
            child: Some(child),
            dir,
            socket,
        };
        let started = Instant::now();
        loop {
            if greets(&export.socket) {
                return Ok(export);
            }
            let exited = export
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                export.child = None;
                let stderr = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(tool_error(
                    "qemu-nbd",
                    &args,
                    format!("exited with {status}: {}", stderr.trim()),
                ));
            }
            if started.elapsed() > EXPORT_START_TIMEOUT {
                return Err(tool_error(
                    "qemu-nbd",
                    &args,
                    "did not open its socket within 30 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `nbd+unix:///?socket=…`
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Ends qemu-nbd (SIGTERM) and waits for it: afterwards the image lock is
    /// released and every write it accepted is in the file.
    pub fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::External {
                        program: "qemu-nbd".into(),
                        detail: "did not stop within 30 s of SIGTERM; killed".into(),
                    });
                }
                Err(e) => return Err(Error::io("waiting for qemu-nbd", e)),
            }
        };
        let _ = std::fs::remove_dir_all(&self.dir);
        // qemu-nbd exits with status 0 on SIGTERM after closing the image.
        if status.success() || status.code().is_none() {
            Ok(())
        } else {
            Err(Error::External {
                program: "qemu-nbd".into(),
                detail: format!("exited with {status}"),
            })
        }
    }
}

impl Drop for QemuNbdExport {
    fn drop(&mut self) {
        let _ = self.terminate();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
