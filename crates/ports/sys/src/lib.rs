//! System calls and checks shared by virtnet's host-facing ports (`virtnet-port-tap`,
//! `virtnet-port-afpacket`). Each port keeps its own calls in its own `sys` module; what they
//! have in common lives here once. Every call's return value is checked on the next line.

#![deny(missing_docs)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

/// Longest interface name the kernel takes (`IFNAMSIZ` - 1).
pub const MAX_IFNAME: usize = 15;

/// Is `name` a usable interface name: 1..=15 bytes of `[A-Za-z0-9_.-]`, not `.` or `..`?
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// True when the process runs as root (effective uid 0): tests that need network namespaces,
/// TAPs or raw sockets check this first.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions, touches no memory and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Turn a negative libc return into the thread's `errno`.
pub fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The index of interface `name` in this thread's network namespace.
pub fn ifindex(name: &str) -> io::Result<libc::c_int> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated string that lives for the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(io::Error::last_os_error());
    }
    libc::c_int::try_from(idx).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Wait until one of `fds` is readable or `timeout_ms` passes; returns which are readable
/// (errors and hang-ups count as readable so the caller's read reports them).
pub fn poll_readable<const N: usize>(fds: [RawFd; N], timeout_ms: i32) -> io::Result<[bool; N]> {
    let mut p = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `p` is a live array of N pollfds for the call.
    let ret = unsafe { libc::poll(p.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(e);
    }
    Ok(p.map(|p| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0))
}

/// Move the calling thread into a new network namespace (tests; needs CAP_SYS_ADMIN).
pub fn unshare_netns() -> io::Result<()> {
    // SAFETY: unshare has no memory effects; it changes only this thread's namespace.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    check(ret).map(|_| ())
}

/// Move the calling thread into the network namespace at `path` (e.g. `/run/netns/NAME`,
/// made by `ip netns add`). For tests; needs CAP_SYS_ADMIN.
pub fn enter_netns(path: &Path) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: setns has no memory effects; `f` is an open namespace fd for the call.
    let ret = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    check(ret).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        for ok in ["eth0", "vnet1", "vt-lab.10", "a_b", "123456789012345"] {
            assert!(valid_ifname(ok), "{ok}");
        }
        for bad in ["", ".", "..", "1234567890123456", "eth 0", "eth/0", "ä"] {
            assert!(!valid_ifname(bad), "{bad:?}");
        }
    }

    #[test]
    fn loopback_has_an_index_and_bogus_names_do_not() {
        assert!(ifindex("lo").unwrap() > 0);
        assert!(ifindex("no-such-if-xyz").is_err());
        assert!(ifindex("bad\0name").is_err());
    }

    #[test]
    fn check_maps_errno() {
        assert_eq!(check(3).unwrap(), 3);
        assert!(check(-1).is_err());
    }
}
