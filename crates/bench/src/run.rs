//! The matrix: for every frontend × queue pairs × frame size, `pairs` times: a c2c probe,
//! then a virtnet run and a DPDK run, in alternating order (A B, B A, A B, …). Each run
//! starts a fresh backend, drives it with the frontend for warm-up + window, and stops
//! everything.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::load::{self, GuestLoad, GSO_FRAME_LEN};
use crate::probe;
use crate::proc::{self, Backend, BackendKind, Programs};
use crate::report::{Outcome, Pair, Point, Rate};
use crate::stats;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A process could not be run.
    #[error(transparent)]
    Proc(#[from] proc::Error),
    /// The guest-driver load failed.
    #[error(transparent)]
    Load(#[from] load::Error),
    /// testpmd printed no usable rate.
    #[error("testpmd virtio_user reported no traffic; last log lines:\n{0}")]
    NoRate(String),
    /// Our driver received nothing in the window.
    #[error("No frame arrived in the window ({sent} sent); backend log:\n{log}")]
    NoTraffic {
        /// Frames queued.
        sent: u64,
        /// The end of the backend's log.
        log: String,
    },
    /// testpmd did not start forwarding in time.
    #[error("testpmd did not start forwarding in time; last log lines:\n{0}")]
    NotStarted(String),
    /// A run directory could not be made.
    #[error("Cannot create {0}")]
    Dir(PathBuf, #[source] std::io::Error),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Which frontend drives the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frontend {
    /// Our driver, `virtnet_guest::Guest`.
    Guest,
    /// DPDK `virtio_user` in testpmd txonly / rxonly.
    VirtioUser,
}

impl Frontend {
    /// The name used in the table and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Frontend::Guest => "guest",
            Frontend::VirtioUser => "virtio_user",
        }
    }
}

/// A frame size of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// Plain frames of this many bytes.
    Plain(usize),
    /// 64 KiB TCPv4 GSO frames.
    Gso,
}

impl Size {
    /// Parses `64`, `1500`, `gso`.
    pub fn parse(s: &str) -> Option<Size> {
        if s.eq_ignore_ascii_case("gso") {
            return Some(Size::Gso);
        }
        s.parse()
            .ok()
            .filter(|n| (14..=9000).contains(n))
            .map(Size::Plain)
    }

    /// Frame length in bytes.
    pub fn frame_len(self) -> usize {
        match self {
            Size::Plain(n) => n,
            Size::Gso => GSO_FRAME_LEN,
        }
    }

    /// Table label.
    pub fn label(self) -> String {
        match self {
            Size::Plain(n) => n.to_string(),
            Size::Gso => "64K-GSO".into(),
        }
    }
}

/// Settings of the whole run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Programs and placement.
    pub programs: Programs,
    /// A/B pairs per point.
    pub pairs: usize,
    /// Warm-up per run.
    pub warmup: Duration,
    /// Window per run.
    pub secs: Duration,
    /// Backends to run (both, normally: the ratio needs both).
    pub backends: Vec<BackendKind>,
    /// Frontends.
    pub frontends: Vec<Frontend>,
    /// Queue pairs.
    pub qps: Vec<u16>,
    /// Sizes.
    pub sizes: Vec<Size>,
    /// Scratch directory (sockets, configs, logs). A failed run's logs stay there.
    pub work_dir: PathBuf,
    /// Keep the logs of successful runs too.
    pub keep_logs: bool,
}

/// One point to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointSpec {
    /// The frontend.
    pub frontend: Frontend,
    /// Queue pairs.
    pub qps: u16,
    /// Frame size.
    pub size: Size,
}

impl Plan {
    /// The points in run order. DPDK's txonly sends no GSO frames, so `virtio_user` × GSO is
    /// left out.
    pub fn points(&self) -> Vec<PointSpec> {
        let mut v = Vec::new();
        for &frontend in &self.frontends {
            for &qps in &self.qps {
                for &size in &self.sizes {
                    if frontend == Frontend::VirtioUser && size == Size::Gso {
                        continue;
                    }
                    v.push(PointSpec {
                        frontend,
                        qps,
                        size,
                    });
                }
            }
        }
        v
    }

    /// Runs one backend under one frontend; a failure is an [`Outcome::Failed`] with the
    /// reason, so one bad run does not end the matrix.
    pub fn run_one(&self, kind: BackendKind, p: PointSpec, tag: &str) -> Outcome {
        match self.try_run_one(kind, p, tag) {
            Ok(r) => Outcome::Ok(r),
            Err(e) => Outcome::Failed(format!("{e}")),
        }
    }

    fn try_run_one(&self, kind: BackendKind, p: PointSpec, tag: &str) -> Result<Rate> {
        let dir = self.work_dir.join(tag);
        std::fs::create_dir_all(&dir).map_err(|e| Error::Dir(dir.clone(), e))?;
        let mut backend =
            Backend::start(kind, &self.programs, &dir, tag, p.qps, p.size == Size::Gso)?;
        let len = p.size.frame_len();
        let rate = match p.frontend {
            Frontend::Guest => {
                let spec = GuestLoad {
                    frame_len: len,
                    gso: p.size == Size::Gso,
                    qps: p.qps,
                    warmup: self.warmup,
                    duration: self.secs,
                    cpus: self.programs.frontend_cpus,
                    no_ctrl_vq: kind == BackendKind::Dpdk,
                };
                let r = load::run(&backend.sockets[0], &backend.sockets[1], &spec)?;
                backend.child.check_alive()?;
                if r.rx_frames == 0 {
                    return Err(Error::NoTraffic {
                        sent: r.tx_frames,
                        log: tail(&backend.child.log_text()),
                    });
                }
                Rate {
                    mpps: r.rx_pps / 1e6,
                    gbps: r.rx_bps / 1e9,
                    offered_mpps: Some(r.tx_pps / 1e6),
                    wrong_len_frames: r.bad_frames,
                    frames_sent_received: Some((r.tx_frames, r.rx_frames)),
                }
            }
            Frontend::VirtioUser => self.vuser_run(&mut backend, &dir, tag, p.qps, len)?,
        };
        backend.child.stop(Duration::from_secs(3));
        if !self.keep_logs {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(rate)
    }

    fn vuser_run(
        &self,
        backend: &mut Backend,
        dir: &Path,
        tag: &str,
        qps: u16,
        len: usize,
    ) -> Result<Rate> {
        let p = &self.programs;
        let mut fe = proc::start_vuser(p, dir, tag, &backend.sockets, qps, len)?;
        // testpmd start-up is slow on a loaded machine: wait for it rather than guess.
        wait_for_log(&mut fe, "packet forwarding - ports=", STARTUP)?;
        // Run until testpmd has printed enough per-second samples with traffic: the warm-up,
        // the window, and one partial period that is dropped.
        let skip = self.warmup.as_secs_f64().ceil() as usize;
        let need = skip + self.secs.as_secs_f64().ceil() as usize + 1;
        let limit = Instant::now() + STARTUP + self.warmup + self.secs + Duration::from_secs(5);
        loop {
            std::thread::sleep(Duration::from_millis(100));
            fe.check_alive()?;
            backend.child.check_alive()?;
            let n = stats::period_sums(&stats::testpmd_field(&fe.log_text(), "Rx-pps:"), 2)
                .iter()
                .filter(|&&x| x > 0.0)
                .count();
            if n >= need || Instant::now() > limit {
                break;
            }
        }
        let log = fe.stop(Duration::from_secs(3));
        let rx = stats::period_sums(&stats::testpmd_field(&log, "Rx-pps:"), 2);
        let tx = stats::period_sums(&stats::testpmd_field(&log, "Tx-pps:"), 2);
        let pps = stats::steady_rate(&rx, skip).map_err(|_| Error::NoRate(tail(&log)))?;
        let offered = stats::steady_rate(&tx, skip).ok();
        Ok(Rate {
            mpps: pps / 1e6,
            gbps: pps * len as f64 * 8.0 / 1e9,
            offered_mpps: offered.map(|o| o / 1e6),
            wrong_len_frames: 0,
            frames_sent_received: None,
        })
    }

    /// Measures one point: `pairs` × (c2c, virtnet, DPDK; DPDK first in every other pair, see
    /// [`virtnet_first`]), calling `tick` after every run.
    pub fn run_point(&self, p: PointSpec, index: usize, mut tick: impl FnMut(&str)) -> Point {
        let a = self.programs.frontend_cpus.first();
        let b = self.programs.backend_cpus.first();
        let len = p.size.frame_len();
        let memcpy = probe::memcpy_rate(len, a, Duration::from_millis(300))
            .ok()
            .map(|m| Rate {
                mpps: m.mpps,
                gbps: m.gbps,
                offered_mpps: None,
                wrong_len_frames: 0,
                frames_sent_received: None,
            });
        let mut pairs = Vec::new();
        for i in 0..self.pairs {
            let c2c_ns = probe::c2c_ns(a, b, Duration::from_millis(50)).ok();
            let wake_ns = probe::wake_ns(a, b, Duration::from_millis(50)).ok();
            let mut one = |kind: BackendKind, tag: String| {
                if !self.backends.contains(&kind) {
                    return Outcome::Skipped;
                }
                let o = self.run_one(kind, p, &tag);
                tick(&describe(kind.name(), &o));
                o
            };
            // A B, B A, A B, …: a drift in the machine over the point falls on both
            // backends alike instead of always on the second.
            let (virtnet, dpdk) = if virtnet_first(i) {
                let v = one(BackendKind::Virtnet, format!("{index}v{i}"));
                (v, one(BackendKind::Dpdk, format!("{index}d{i}")))
            } else {
                let d = one(BackendKind::Dpdk, format!("{index}d{i}"));
                (one(BackendKind::Virtnet, format!("{index}v{i}")), d)
            };
            pairs.push(Pair {
                c2c_ns,
                wake_ns,
                virtnet,
                dpdk,
            });
        }
        Point {
            frontend: p.frontend.name().into(),
            qps: p.qps,
            label: p.size.label(),
            frame_len: len,
            gso: p.size == Size::Gso,
            pairs,
            memcpy,
        }
    }
}

/// How long a testpmd may take to start forwarding.
const STARTUP: Duration = Duration::from_secs(20);

/// Waits until `child`'s log contains `needle`.
fn wait_for_log(child: &mut proc::Child, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        child.check_alive()?;
        if child.log_text().contains(needle) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::NotStarted(tail(&child.log_text())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Does pair `i` of a point run virtnet first? Yes for even pairs, no for odd ones: with
/// an even number of pairs each backend runs first equally often, so neither is always the
/// one measured later (after the machine warmed, or slowed).
pub fn virtnet_first(i: usize) -> bool {
    i % 2 == 0
}

fn describe(name: &str, o: &Outcome) -> String {
    match o {
        Outcome::Ok(r) => format!("{name} {:.3} Mpps {:.2} Gbit/s", r.mpps, r.gbps),
        Outcome::Failed(e) => format!("{name} FAILED: {}", e.lines().next().unwrap_or("")),
        Outcome::Skipped => format!("{name} skipped"),
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::CpuSet;

    fn plan() -> Plan {
        Plan {
            programs: Programs {
                virtnetd: "/nonexistent/virtnetd".into(),
                testpmd: "/nonexistent/dpdk-testpmd".into(),
                backend_cpus: CpuSet::parse("0").unwrap(),
                frontend_cpus: CpuSet::parse("0").unwrap(),
                dpdk_mem_mb: 256,
                vuser_mode: crate::proc::VuserMode::Mac,
            },
            pairs: 1,
            warmup: Duration::ZERO,
            secs: Duration::from_millis(10),
            backends: vec![BackendKind::Virtnet, BackendKind::Dpdk],
            frontends: vec![Frontend::Guest, Frontend::VirtioUser],
            qps: vec![1, 2],
            sizes: vec![Size::Plain(64), Size::Gso],
            work_dir: std::env::temp_dir().join(format!("vnb-test-{}", std::process::id())),
            keep_logs: false,
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(Size::parse("64"), Some(Size::Plain(64)));
        assert_eq!(Size::parse("GSO"), Some(Size::Gso));
        assert_eq!(Size::parse("13"), None);
        assert_eq!(Size::parse("x"), None);
        assert_eq!(Size::Gso.frame_len(), GSO_FRAME_LEN);
        assert_eq!(Size::Gso.label(), "64K-GSO");
    }

    #[test]
    fn matrix_skips_virtio_user_gso() {
        let pts = plan().points();
        assert_eq!(pts.len(), 2 * 2 + 2);
        assert!(!pts
            .iter()
            .any(|p| p.frontend == Frontend::VirtioUser && p.size == Size::Gso));
    }

    #[test]
    fn a_missing_backend_is_a_failed_outcome_not_a_crash() {
        let p = plan();
        let spec = p.points()[0];
        let point = p.run_point(spec, 0, |_| {});
        assert_eq!(point.pairs.len(), 1);
        assert!(matches!(point.pairs[0].virtnet, Outcome::Failed(ref m) if m.contains("virtnetd")));
        assert!(matches!(point.pairs[0].dpdk, Outcome::Failed(_)));
        assert_eq!(point.summary().failures, 2);
        let mut only = p.clone();
        only.backends = vec![BackendKind::Dpdk];
        let point = only.run_point(spec, 1, |_| {});
        assert_eq!(point.pairs[0].virtnet, Outcome::Skipped);
        assert_eq!(point.summary().failures, 1);
        let _ = std::fs::remove_dir_all(&p.work_dir);
    }

    #[test]
    fn pairs_alternate_which_backend_runs_first() {
        let mut p = plan();
        p.pairs = 4;
        p.work_dir = std::env::temp_dir().join(format!("vnb-test-abba-{}", std::process::id()));
        let spec = p.points()[0];
        let mut order = Vec::new();
        let point = p.run_point(spec, 0, |t| {
            order.push(t.split_whitespace().next().unwrap_or("").to_string())
        });
        assert_eq!(
            order,
            ["virtnet", "dpdk", "dpdk", "virtnet", "virtnet", "dpdk", "dpdk", "virtnet"]
        );
        // Each pair still holds each backend's own outcome, whatever the order.
        for pair in &point.pairs {
            assert!(matches!(pair.virtnet, Outcome::Failed(ref m) if m.contains("virtnetd")));
            assert!(matches!(pair.dpdk, Outcome::Failed(ref m) if !m.contains("virtnetd")));
        }
        let _ = std::fs::remove_dir_all(&p.work_dir);
    }
}
