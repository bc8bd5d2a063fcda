//! Exclusive advisory locks on local files (`flock`), for one writer per
//! resume journal and one job per resource. The kernel drops a lock when
//! its descriptor closes — with the process, however it ends — so a killed
//! holder never leaves a stale lock behind.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Takes an exclusive lock on `file` without waiting: `Ok(true)` taken,
/// `Ok(false)` held through another descriptor (another process, or
/// another open of the file), `Err` any other failure.
pub(crate) fn try_lock_exclusive(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor `file` owns for the whole call; no
    // memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_descriptor_finds_the_lock_held_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = File::create(&path).unwrap();
        assert!(try_lock_exclusive(&first).unwrap());
        let second = File::open(&path).unwrap();
        assert!(!try_lock_exclusive(&second).unwrap());
        drop(first);
        assert!(try_lock_exclusive(&second).unwrap());
    }
}
