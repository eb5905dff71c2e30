//! The crate's only unsafe code: CPU affinity (for threads of this process and for child
//! processes before they exec) and signals to our own children.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Highest CPU number a [`CpuSet`] can hold (the kernel's default `CPU_SETSIZE`).
pub const MAX_CPUS: usize = 1024;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No CPU in the list.
    #[error("Empty CPU list")]
    EmptyCpuList,
    /// A CPU number that is not a number or is too large.
    #[error("Bad CPU {0:?} (expected numbers below 1024, like \"0\" or \"0,1\")")]
    BadCpu(String),
    /// `sched_setaffinity` refused.
    #[error("Cannot pin to CPUs {0}")]
    SetAffinity(String, #[source] io::Error),
    /// `kill` refused.
    #[error("Cannot signal process {pid}")]
    Kill {
        /// The process.
        pid: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A set of CPUs, laid out as the kernel's `cpu_set_t` (1024 bits).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CpuSet {
    bits: [u64; MAX_CPUS / 64],
}

impl std::fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuSet({})", self.list())
    }
}

impl CpuSet {
    /// Parses a comma-separated list of CPU numbers (`"1"`, `"0,1"`).
    pub fn parse(list: &str) -> Result<CpuSet> {
        let mut bits = [0u64; MAX_CPUS / 64];
        let mut any = false;
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let cpu: usize = part.parse().map_err(|_| Error::BadCpu(part.to_string()))?;
            if cpu >= MAX_CPUS {
                return Err(Error::BadCpu(part.to_string()));
            }
            bits[cpu / 64] |= 1 << (cpu % 64);
            any = true;
        }
        if !any {
            return Err(Error::EmptyCpuList);
        }
        Ok(CpuSet { bits })
    }

    /// The CPUs in the set, ascending.
    pub fn cpus(&self) -> Vec<usize> {
        (0..MAX_CPUS)
            .filter(|c| self.bits[c / 64] & (1 << (c % 64)) != 0)
            .collect()
    }

    /// The set as a comma-separated list (the inverse of [`CpuSet::parse`]).
    pub fn list(&self) -> String {
        let v: Vec<String> = self.cpus().iter().map(|c| c.to_string()).collect();
        v.join(",")
    }

    /// The set in DPDK `--lcores` syntax for one lcore: `1` or `(0,1)`.
    pub fn dpdk_group(&self) -> String {
        let c = self.cpus();
        if c.len() == 1 {
            c[0].to_string()
        } else {
            format!("({})", self.list())
        }
    }

    /// The first CPU of the set.
    pub fn first(&self) -> usize {
        self.cpus().first().copied().unwrap_or(0)
    }

    fn apply(&self) -> io::Result<()> {
        // SAFETY: `bits` is a live, initialised buffer of exactly size_of::<cpu_set_t>() bytes
        // (1024 bits) that the kernel only reads; pid 0 means the calling thread.
        let rc = unsafe {
            libc::sched_setaffinity(
                0,
                std::mem::size_of_val(&self.bits),
                self.bits.as_ptr().cast::<libc::cpu_set_t>(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Pins the calling thread to `set`.
pub fn pin_current_thread(set: &CpuSet) -> Result<()> {
    set.apply().map_err(|e| Error::SetAffinity(set.list(), e))
}

/// Makes `cmd`'s process (and every thread it starts) run on `set` only.
pub fn pin_command(cmd: &mut Command, set: CpuSet) {
    // SAFETY: the hook runs in the forked child before exec; it only calls
    // sched_setaffinity (a plain system call, async-signal-safe) on a CpuSet copied into the
    // closure beforehand, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || set.apply());
    }
}

/// Sends `sig` (e.g. `libc::SIGINT`) to the process `pid`, which must be our own child.
pub fn signal(pid: u32, sig: i32) -> Result<()> {
    let p = i32::try_from(pid).map_err(|_| Error::Kill {
        pid,
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: kill() has no memory-safety preconditions; callers pass their own child's pid.
    let rc = unsafe { libc::kill(p, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Kill {
            pid,
            source: io::Error::last_os_error(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists() {
        let s = CpuSet::parse("1").unwrap();
        assert_eq!(s.cpus(), vec![1]);
        assert_eq!(s.dpdk_group(), "1");
        let s = CpuSet::parse(" 0, 1 ").unwrap();
        assert_eq!(s.cpus(), vec![0, 1]);
        assert_eq!(s.list(), "0,1");
        assert_eq!(s.dpdk_group(), "(0,1)");
        assert!(matches!(CpuSet::parse(""), Err(Error::EmptyCpuList)));
        assert!(matches!(CpuSet::parse("x"), Err(Error::BadCpu(_))));
        assert!(matches!(CpuSet::parse("1024"), Err(Error::BadCpu(_))));
    }

    #[test]
    fn pins_a_thread() {
        let s = CpuSet::parse("0").unwrap();
        std::thread::spawn(move || pin_current_thread(&s).unwrap())
            .join()
            .unwrap();
    }

    #[test]
    fn pins_a_child() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "grep Cpus_allowed_list /proc/self/status"]);
        pin_command(&mut cmd, CpuSet::parse("0").unwrap());
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.trim().ends_with('0'), "{text}");
    }
}
