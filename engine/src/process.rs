//! Which process on which host owns a temporary file: an *owner tag*
//! (`<host>.<pid>`) written into the names of temporary files (a local
//! pool's `tmp/` objects, a restore's `.cairn-partial` files), so a later
//! process can remove those a killed process left behind — only its own
//! host's, and only when that process is gone.

/// This process's owner tag: the host name (letters, digits and `-` only)
/// and the process id, joined by a dot.
pub fn owner_tag() -> String {
    format!("{}.{}", host_name(), std::process::id())
}

/// True when `tag` names a process of this host that no longer runs. A tag
/// of another host, or one that does not parse, is never called dead.
pub fn owner_is_gone(tag: &str) -> bool {
    let Some((host, pid)) = tag.rsplit_once('.') else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    host == host_name()
        && pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
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
    fn tags_of_this_host_are_gone_only_when_their_process_is() {
        let me = owner_tag();
        assert!(!owner_is_gone(&me), "this process runs");
        let (host, _) = me.rsplit_once('.').unwrap_or_default();
        // Above the kernel's pid limit: no such process.
        assert!(owner_is_gone(&format!("{host}.4194305")));
        assert!(!owner_is_gone("some-other-host.4194305"));
        assert!(!owner_is_gone("garbage"));
        assert!(!owner_is_gone(&format!("{host}.notapid")));
        assert!(!host.contains('.') && !host.is_empty());
    }
}
