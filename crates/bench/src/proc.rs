//! The processes of a run: the backend under test (virtnetd, or DPDK testpmd with two
//! `net_vhost` ports in io forwarding) and, for the DPDK frontend, one testpmd with two
//! `virtio_user` ports in mac forwarding (default) or flowgen mode (see [`testpmd_vuser_args`]
//! for why not txonly/rxonly).
//!
//! ```text
//!   frontend (CPU set F)              backend (CPU set B)                 frontend (CPU set F)
//!   Guest A                ──p0.sock──► virtnetd switch  ──p1.sock──► Guest B
//!   testpmd vuser port 0   ◄─p0.sock──► or testpmd io fwd ◄─p1.sock──► testpmd vuser port 1
//! ```
//!
//! Every child is pinned before exec, keeps its stdin open (testpmd exits on EOF, gotcha
//! G10), logs to a file, stops with SIGINT (testpmd then prints its totals) and is killed if
//! it lingers. DPDK children get a unique `--file-prefix` whose /var/run/dpdk directory is
//! removed afterwards (G8).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::sys::{self, CpuSet};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Spawning failed.
    #[error("Cannot start {0}")]
    Spawn(String, #[source] io::Error),
    /// A file of the run could not be written.
    #[error("Cannot write {0}")]
    Write(PathBuf, #[source] io::Error),
    /// The process exited early.
    #[error("{name} exited early ({status}); last log lines:\n{tail}")]
    Exited {
        /// Which process.
        name: String,
        /// Its exit status.
        status: String,
        /// The end of its log.
        tail: String,
    },
    /// Its sockets never appeared.
    #[error("{name} did not create {path} in time; last log lines:\n{tail}")]
    NoSocket {
        /// Which process.
        name: String,
        /// The socket it should have created.
        path: PathBuf,
        /// The end of its log.
        tail: String,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A child process of the run: pinned, logged, stopped on drop.
#[derive(Debug)]
pub struct Child {
    name: String,
    child: std::process::Child,
    _stdin: Option<ChildStdin>,
    log: PathBuf,
    dpdk_prefix: Option<String>,
    stopped: bool,
}

impl Child {
    /// Starts `cmd` pinned to `cpus`, stdout and stderr into `log`, stdin an open pipe.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        cpus: CpuSet,
        log: &Path,
        dpdk_prefix: Option<String>,
    ) -> Result<Child> {
        let out = File::create(log).map_err(|e| Error::Write(log.into(), e))?;
        let err = out.try_clone().map_err(|e| Error::Write(log.into(), e))?;
        sys::pin_command(&mut cmd, cpus);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| Error::Spawn(name.to_string(), e))?;
        let stdin = child.stdin.take();
        Ok(Child {
            name: name.to_string(),
            child,
            _stdin: stdin,
            log: log.to_path_buf(),
            dpdk_prefix,
            stopped: false,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn tail(&self) -> String {
        let t = self.log_text();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fails when the process has already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(Error::Exited {
                name: self.name.clone(),
                status: status.to_string(),
                tail: self.tail(),
            }),
            _ => Ok(()),
        }
    }

    /// Waits until every path in `paths` exists (and the process is still alive).
    pub fn wait_for_paths(&mut self, paths: &[PathBuf], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for p in paths {
            while !p.exists() {
                self.check_alive()?;
                if Instant::now() > deadline {
                    return Err(Error::NoSocket {
                        name: self.name.clone(),
                        path: p.clone(),
                        tail: self.tail(),
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// SIGINT, then up to `grace` for a clean exit, then SIGKILL. Returns the log.
    pub fn stop(&mut self, grace: Duration) -> String {
        if !self.stopped {
            self.stopped = true;
            if let Ok(None) = self.child.try_wait() {
                let _ = sys::signal(self.pid(), libc::SIGINT);
                let deadline = Instant::now() + grace;
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = self.child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            if let Some(p) = &self.dpdk_prefix {
                let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(p));
            }
        }
        self.log_text()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

/// Which backend serves the two vhost-user sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// virtnetd with one internal network of two ports.
    Virtnet,
    /// dpdk-testpmd with two `net_vhost` ports in io forwarding.
    Dpdk,
}

impl BackendKind {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Virtnet => "virtnet",
            BackendKind::Dpdk => "dpdk",
        }
    }
}

/// Where the programs are and how to place them.
#[derive(Clone, Debug)]
pub struct Programs {
    /// The virtnetd binary.
    pub virtnetd: PathBuf,
    /// The dpdk-testpmd binary.
    pub testpmd: PathBuf,
    /// CPUs of the backend.
    pub backend_cpus: CpuSet,
    /// CPUs of the frontends.
    pub frontend_cpus: CpuSet,
    /// Extra EAL memory for each testpmd, in MiB (`-m`, with `--no-huge`).
    pub dpdk_mem_mb: u32,
    /// How the `virtio_user` frontend makes its traffic.
    pub vuser_mode: VuserMode,
}

/// How the `virtio_user` frontend (one testpmd, two ports, one lcore) makes its traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum VuserMode {
    /// `mac` forwarding after `--tx-first`: each port first sends one burst of
    /// [`VUSER_BURST`] frames, then every frame received on one port is sent out of the other
    /// with that port's MAC as source and the peer's as destination, like two real stations.
    /// A closed loop of 2 × [`VUSER_BURST`] frames in flight.
    #[default]
    Mac,
    /// testpmd `flowgen`: both ports send from the same fixed source MAC to a destination no
    /// port owns (DPDK 22.11), so a learning switch sees the source flap between ports and
    /// floods every frame. Kept to compare with older runs; not what stations do.
    Flowgen,
}

/// Frames per burst of the `mac` mode, and so in flight per port: the ring size.
pub const VUSER_BURST: usize = 256;

/// A running backend with its two sockets.
#[derive(Debug)]
pub struct Backend {
    /// The backend.
    pub kind: BackendKind,
    /// The process.
    pub child: Child,
    /// Port 0 (the sender's) and port 1 (the receiver's) vhost-user sockets.
    pub sockets: [PathBuf; 2],
}

/// The virtnetd configuration of a run: an internal network "bench" with two ports.
pub fn virtnetd_config(dir: &Path, sockets: &[PathBuf; 2], qps: u16) -> String {
    let mut s = format!(
        "control_socket = {:?}\nlog_level = \"warn\"\n\n[[network]]\nname = \"bench\"\nmode = \"internal\"\n",
        dir.join("control.sock").display().to_string()
    );
    for p in sockets {
        s.push_str(&format!(
            "\n[[network.port]]\nsocket = {:?}\nqueue_pairs = {qps}\n",
            p.display().to_string()
        ));
    }
    s
}

/// The testpmd arguments of the DPDK backend (without the program name).
pub fn testpmd_backend_args(
    prog: &Programs,
    prefix: &str,
    sockets: &[PathBuf; 2],
    qps: u16,
    tso: bool,
) -> Vec<String> {
    let g = prog.backend_cpus.dpdk_group();
    let tso = if tso { ",tso=1" } else { "" };
    let mut a: Vec<String> = vec![
        "--lcores".into(),
        format!("0@{g},1@{g}"),
        "--no-huge".into(),
        "-m".into(),
        prog.dpdk_mem_mb.to_string(),
        "--no-pci".into(),
        "--file-prefix".into(),
        prefix.into(),
        "--log-level".into(),
        "lib.eal:error".into(),
    ];
    for (i, s) in sockets.iter().enumerate() {
        a.push("--vdev".into());
        a.push(format!(
            "net_vhost{i},iface={},queues={qps},client=0{tso}",
            s.display()
        ));
    }
    a.extend(
        [
            "--",
            "--forward-mode=io",
            "--auto-start",
            "--stats-period",
            "1",
            "--nb-cores=1",
            "--total-num-mbufs=32768",
        ]
        .map(String::from),
    );
    a.push(format!("--rxq={qps}"));
    a.push(format!("--txq={qps}"));
    a
}

impl Backend {
    /// Starts a backend of `kind` with two ports of `qps` queue pairs, its files in `dir`
    /// (which must exist), and waits for both sockets.
    pub fn start(
        kind: BackendKind,
        prog: &Programs,
        dir: &Path,
        tag: &str,
        qps: u16,
        tso: bool,
    ) -> Result<Backend> {
        let sockets = [dir.join("p0.sock"), dir.join("p1.sock")];
        for s in &sockets {
            let _ = std::fs::remove_file(s);
        }
        let log = dir.join(format!("{}.log", kind.name()));
        let mut child = match kind {
            BackendKind::Virtnet => {
                let cfg = dir.join("virtnetd.toml");
                std::fs::write(&cfg, virtnetd_config(dir, &sockets, qps))
                    .map_err(|e| Error::Write(cfg.clone(), e))?;
                let mut cmd = Command::new(&prog.virtnetd);
                cmd.arg("--config").arg(&cfg);
                Child::spawn("virtnetd", cmd, prog.backend_cpus, &log, None)?
            }
            BackendKind::Dpdk => {
                let prefix = format!("vnb{}{tag}b", std::process::id());
                let mut cmd = testpmd_command(prog);
                cmd.args(testpmd_backend_args(prog, &prefix, &sockets, qps, tso));
                Child::spawn(
                    "testpmd backend",
                    cmd,
                    prog.backend_cpus,
                    &log,
                    Some(prefix),
                )?
            }
        };
        child.wait_for_paths(&sockets, Duration::from_secs(15))?;
        // The socket file exists once bound; give the listener a moment.
        std::thread::sleep(Duration::from_millis(50));
        Ok(Backend {
            kind,
            child,
            sockets,
        })
    }
}

/// A testpmd command, line-buffered through `stdbuf -oL` when it is installed so that the
/// per-second statistics reach the log while it runs.
pub fn testpmd_command(prog: &Programs) -> Command {
    let stdbuf = Path::new("/usr/bin/stdbuf");
    if stdbuf.is_file() {
        let mut c = Command::new(stdbuf);
        c.arg("-oL").arg(&prog.testpmd);
        c
    } else {
        Command::new(&prog.testpmd)
    }
}

/// MACs of the two `virtio_user` ports (port 0 on socket 0, port 1 on socket 1).
pub const VUSER_MACS: [&str; 2] = ["52:54:00:00:be:11", "52:54:00:00:be:12"];

/// The testpmd arguments of the `virtio_user` frontend (without the program name): ONE
/// process with two `virtio_user` ports on one lcore, both directions at once, each frame
/// crossing the backend, frames of `--txpkts=len` bytes. See [`VuserMode`] for the two ways
/// it makes traffic.
///
/// Why not txonly + rxonly as two processes: with one frontend CPU they are two busy pollers
/// time-sliced by the scheduler; while one runs the other's ring sits full, and the
/// measured rate (about 10 kpps here) is the scheduler's, not the backend's.
pub fn testpmd_vuser_args(
    prog: &Programs,
    prefix: &str,
    sockets: &[PathBuf; 2],
    qps: u16,
    len: usize,
) -> Vec<String> {
    let g = prog.frontend_cpus.dpdk_group();
    // Multiqueue in virtio_user needs its (locally emulated) control queue.
    let cq = if qps > 1 { ",cq=1" } else { "" };
    let mut a: Vec<String> = vec![
        "--lcores".into(),
        format!("0@{g},1@{g}"),
        "--no-huge".into(),
        "-m".into(),
        prog.dpdk_mem_mb.to_string(),
        "--no-pci".into(),
        "--file-prefix".into(),
        prefix.into(),
        "--log-level".into(),
        "lib.eal:error".into(),
    ];
    for (i, s) in sockets.iter().enumerate() {
        a.push("--vdev".into());
        a.push(format!(
            "net_virtio_user{i},path={},mac={},queues={qps},queue_size=256{cq}",
            s.display(),
            VUSER_MACS[i]
        ));
    }
    a.push("--".into());
    match prog.vuser_mode {
        VuserMode::Mac => {
            a.push("--forward-mode=mac".into());
            a.push("--tx-first".into());
            a.push(format!("--burst={VUSER_BURST}"));
        }
        VuserMode::Flowgen => a.push("--forward-mode=flowgen".into()),
    }
    a.push(format!("--txpkts={len}"));
    a.push(format!("--eth-peer=0,{}", VUSER_MACS[1]));
    a.push(format!("--eth-peer=1,{}", VUSER_MACS[0]));
    a.extend(
        [
            "--auto-start",
            "--stats-period",
            "1",
            "--nb-cores=1",
            "--total-num-mbufs=32768",
        ]
        .map(String::from),
    );
    a.push(format!("--rxq={qps}"));
    a.push(format!("--txq={qps}"));
    a
}

/// Starts the `virtio_user` frontend on both sockets.
pub fn start_vuser(
    prog: &Programs,
    dir: &Path,
    tag: &str,
    sockets: &[PathBuf; 2],
    qps: u16,
    len: usize,
) -> Result<Child> {
    let prefix = format!("vnb{}{tag}f", std::process::id());
    let log = dir.join("vuser.log");
    let mut cmd = testpmd_command(prog);
    cmd.args(testpmd_vuser_args(prog, &prefix, sockets, qps, len));
    Child::spawn(
        "testpmd virtio_user",
        cmd,
        prog.frontend_cpus,
        &log,
        Some(prefix),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progs() -> Programs {
        Programs {
            virtnetd: "virtnetd".into(),
            testpmd: "dpdk-testpmd".into(),
            backend_cpus: CpuSet::parse("1").unwrap(),
            frontend_cpus: CpuSet::parse("0").unwrap(),
            dpdk_mem_mb: 1024,
            vuser_mode: VuserMode::Mac,
        }
    }

    #[test]
    fn virtnetd_config_has_two_ports() {
        let s = virtnetd_config(
            Path::new("/tmp/x"),
            &["/tmp/x/p0.sock".into(), "/tmp/x/p1.sock".into()],
            2,
        );
        assert!(s.contains("mode = \"internal\""));
        assert!(s.contains("control_socket = \"/tmp/x/control.sock\""));
        assert_eq!(s.matches("[[network.port]]").count(), 2);
        assert_eq!(s.matches("queue_pairs = 2").count(), 2);
        assert!(s.contains("socket = \"/tmp/x/p1.sock\""));
    }

    #[test]
    fn testpmd_args_place_and_size() {
        let p = progs();
        let socks: [PathBuf; 2] = ["/d/p0.sock".into(), "/d/p1.sock".into()];
        let a = testpmd_backend_args(&p, "pre", &socks, 2, true).join(" ");
        assert!(a.contains("--lcores 0@1,1@1"), "{a}");
        assert!(
            a.contains("net_vhost1,iface=/d/p1.sock,queues=2,client=0,tso=1"),
            "{a}"
        );
        assert!(
            a.contains("--forward-mode=io") && a.contains("--rxq=2 --txq=2"),
            "{a}"
        );
        let a = testpmd_vuser_args(&p, "pre", &socks, 1, 64).join(" ");
        assert!(a.contains("--lcores 0@0,1@0"), "{a}");
        assert!(
            a.contains("--forward-mode=mac --tx-first --burst=256 --txpkts=64"),
            "{a}"
        );
        let flowgen = Programs {
            vuser_mode: VuserMode::Flowgen,
            ..p.clone()
        };
        let f = testpmd_vuser_args(&flowgen, "pre", &socks, 1, 64).join(" ");
        assert!(f.contains("--forward-mode=flowgen --txpkts=64"), "{f}");
        assert!(!f.contains("--tx-first"), "{f}");
        assert!(
            a.contains("net_virtio_user1,path=/d/p1.sock,mac=52:54:00:00:be:12"),
            "{a}"
        );
        assert!(a.contains("--eth-peer=0,52:54:00:00:be:12"), "{a}");
        assert!(!a.contains("cq=1"), "{a}");
        let a = testpmd_vuser_args(&p, "pre", &socks, 2, 64).join(" ");
        assert!(a.contains("queues=2,queue_size=256,cq=1"), "{a}");
    }

    #[test]
    fn child_is_stopped_and_logged() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello; exec sleep 30"]);
        let mut c = Child::spawn("sleeper", cmd, CpuSet::parse("0").unwrap(), &log, None).unwrap();
        c.wait_for_paths(std::slice::from_ref(&log), Duration::from_secs(1))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !c.log_text().contains("hello") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        c.check_alive().unwrap();
        let t0 = Instant::now();
        let text = c.stop(Duration::from_secs(2));
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(text.contains("hello"), "{text}");
    }

    #[test]
    fn early_exit_is_reported_with_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo broken config; exit 3"]);
        let mut c = Child::spawn("bad", cmd, CpuSet::parse("0").unwrap(), &log, None).unwrap();
        let err = c
            .wait_for_paths(&[dir.path().join("never")], Duration::from_secs(5))
            .unwrap_err();
        match err {
            Error::Exited { tail, .. } => assert!(tail.contains("broken config")),
            other => panic!("{other:?}"),
        }
    }
}
