//! Pause points for tests of concurrent processes: a test makes a process
//! stop at a named point of a job, does something in another process, then
//! lets it go on — so every interleaving of a protocol can be forced.
//!
//! Inert unless the environment sets `CAIRN_PAUSE_AT=<point>[,<point>…]`
//! and `CAIRN_PAUSE_DIR=<dir>`: at a listed point the process creates
//! `<dir>/<point>.reached` and waits until `<dir>/<point>.go` exists.
//! Production runs never set them; the cost is one environment lookup per
//! point passed (a handful per job).

use std::path::PathBuf;
use std::time::Duration;

/// Stops at `point` if the environment asks for it (see the module doc).
pub(crate) fn pause(point: &str) {
    let Some(points) = std::env::var_os("CAIRN_PAUSE_AT") else {
        return;
    };
    if !points.to_string_lossy().split(',').any(|p| p == point) {
        return;
    }
    let Some(dir) = std::env::var_os("CAIRN_PAUSE_DIR").map(PathBuf::from) else {
        return;
    };
    let _ = std::fs::write(dir.join(format!("{point}.reached")), b"");
    let go = dir.join(format!("{point}.go"));
    while !go.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
}
