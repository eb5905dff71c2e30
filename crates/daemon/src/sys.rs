//! The few system calls the daemon makes itself: signal masks, `access(2)` and group lookup.
//! All of the crate's `unsafe` lives here.

use std::ffi::CString;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Can this process create files in `dir`? (`access(dir, W_OK | X_OK)`, which also sees
/// read-only file systems.)
pub fn dir_writable(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; access() only reads it.
    let ret = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) };
    ret == 0
}

/// Is the effective user root?
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The id of group `name` (getgrnam_r: files, LDAP… whatever the host's NSS says).
pub fn group_id(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    let mut grp = MaybeUninit::<libc::group>::uninit();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: `c` is NUL-terminated, `grp` and `found`
    // are writable, `buf` is writable for `buf.len()` bytes; getgrnam_r writes only there.
    let ret = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            grp.as_mut_ptr(),
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if ret != 0 || found.is_null() {
        return None;
    }
    // SAFETY: getgrnam_r succeeded and set `found` to `grp`, which it initialised.
    Some(unsafe { grp.assume_init() }.gr_gid)
}

fn termination_set() -> io::Result<libc::sigset_t> {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given; we pass a valid pointer to one.
    let ret = unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sigemptyset succeeded, so the set is initialised.
    let mut set = unsafe { set.assume_init() };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `set` is an initialised sigset_t and `sig` a valid signal number.
        let ret = unsafe { libc::sigaddset(&mut set, sig) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(set)
}

/// Block SIGINT and SIGTERM in the calling thread, and so in every thread it spawns later,
/// so that [`wait_termination`] can take them synchronously. Call before spawning threads.
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_set()?;
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Wait until SIGINT or SIGTERM is pending (they must be blocked) and return its number.
pub fn wait_termination() -> io::Result<i32> {
    let set = termination_set()?;
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised and `sig` is a valid place for the result.
    let ret = unsafe { libc::sigwait(&set, &mut sig) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_dirs() {
        let dir = tempfile::TempDir::new().unwrap();
        assert!(dir_writable(dir.path()));
        assert!(!dir_writable(&dir.path().join("missing")));
        assert!(!dir_writable(Path::new("/proc/self")));
    }

    #[test]
    fn blocked_signal_is_taken_by_sigwait() {
        // Run in a fresh thread so the mask does not leak into other tests.
        std::thread::spawn(|| {
            block_termination_signals().unwrap();
            // SAFETY: raising a signal at our own (blocked) thread; it stays pending.
            let ret = unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGTERM) };
            assert_eq!(ret, 0);
            assert_eq!(wait_termination().unwrap(), libc::SIGTERM);
        })
        .join()
        .unwrap();
    }
}
