//! Which process on which machine owns a temporary file: an *owner tag*
//! written into the names of temporary files (a local pool's `tmp/`
//! objects, a restore's `.cairn-partial` files, the external sort's
//! scratch directories), so a later process can remove what a killed one
//! left behind.
//!
//! A tag is `<machine>.<pid>`, where `<machine>` joins the host name
//! (letters, digits and `-` only), the first 8 hex digits of the kernel's
//! boot id and the inode of the PID namespace: two containers sharing a
//! host name, two cloned hosts sharing one, or one host before and after a
//! reboot never judge each other's processes. A tag is "gone" only when
//! its machine is this one and `kill(pid, 0)` says no such process
//! (`EPERM`: it exists). Anything unparsable is never gone.

use std::sync::OnceLock;

/// This process's owner tag.
pub fn owner_tag() -> String {
    format!("{}.{}", machine(), std::process::id())
}

/// True when `tag` names a process of this machine that no longer runs.
pub fn owner_is_gone(tag: &str) -> bool {
    let Some((machine_part, pid)) = tag.rsplit_once('.') else {
        return false;
    };
    let Ok(pid) = pid.parse::<i32>() else {
        return false;
    };
    if machine_part != machine() || pid <= 0 || pid as u32 == std::process::id() {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// `<host>-<boot id>-<pid namespace>`, computed once.
fn machine() -> &'static str {
    static MACHINE: OnceLock<String> = OnceLock::new();
    MACHINE.get_or_init(|| {
        let boot: String = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap_or_default()
            .chars()
            .filter(|c| c.is_ascii_hexdigit())
            .take(8)
            .collect();
        let pidns = std::fs::read_link("/proc/self/ns/pid")
            .ok()
            .map(|l| {
                l.to_string_lossy()
                    .chars()
                    .filter(|c| c.is_ascii_digit())
                    .collect::<String>()
            })
            .unwrap_or_default();
        if boot.is_empty() || pidns.is_empty() {
            // Without /proc this machine cannot be told apart from another
            // with its host name: a random part makes every other process's
            // tag foreign (never swept) rather than wrongly judged.
            let mut r = [0u8; 4];
            let _ = getrandom::getrandom(&mut r);
            return format!("{}-x{}", host_name(), crate::id::hex(&r));
        }
        format!("{}-{boot}-{pidns}", host_name())
    })
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let raw = if ok {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let clean: String = raw
        .chars()
        .take(32)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    if clean.is_empty() {
        "host".into()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_of_this_machine_are_gone_only_when_their_process_is() {
        let me = owner_tag();
        assert!(!owner_is_gone(&me), "this process runs");
        let (machine, _) = me.rsplit_once('.').unwrap_or_default();
        assert!(!machine.contains('.') && !machine.is_empty());
        // Above the kernel's pid limit: no such process.
        assert!(owner_is_gone(&format!("{machine}.4194305")));
        // pid 1 exists (in every namespace).
        assert!(!owner_is_gone(&format!("{machine}.1")));
        // Another machine (host, boot or namespace), or garbage: never gone.
        assert!(!owner_is_gone("some-other-host-0-0.4194305"));
        assert!(!owner_is_gone(&format!("{machine}x.4194305")));
        assert!(!owner_is_gone("garbage"));
        assert!(!owner_is_gone(&format!("{machine}.notapid")));
    }
}
