//! The running daemon: networks, their guest ports, the control socket, and the loop that
//! serves it until shutdown.
//!
//! ```text
//!   Daemon::start(config)            Daemon::serve(&shutdown)             Daemon::stop()
//!   ─────────────────────            ────────────────────────             ──────────────
//!   bind control socket              epoll { shutdown eventfd,            guest ports: shutdown,
//!   per network: alloc_mode            control socket } every 1 s:          sockets removed
//!     (switch + mode ports)            control requests → answers        modes: shutdown
//!     per port: NetPort::listen        mode.tick() (FDB ageing)          control socket removed
//! ```
//!
//! The vhost-user work happens on the devices' own threads; this loop only answers the control
//! socket and does housekeeping.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::config::Config;
use crate::control::{self, ControlServer, NetworkStats, PortReport, StatsReport};
use crate::mode::{self, ModeError, NetMode};
use crate::port::{GuestPort, PortError};

/// How often the loop wakes up for housekeeping.
pub const TICK: Duration = Duration::from_secs(1);
/// How often modes get [`NetMode::tick`].
pub const HOUSEKEEPING: Duration = Duration::from_secs(10);

const EV_SHUTDOWN: u64 = 0;
const EV_CONTROL: u64 = 1;

/// Errors of running the daemon.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// A network's mode could not start.
    #[error("Network {network} cannot start")]
    Mode {
        /// Network name.
        network: String,
        /// Why.
        #[source]
        source: ModeError,
    },
    /// A guest port could not start.
    #[error(transparent)]
    Port(#[from] PortError),
    /// The configuration does not hold (e.g. `socket_group` names no group).
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// The control socket could not start.
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// The event loop failed.
    #[error("Event loop failed")]
    Poll(#[source] io::Error),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, DaemonError>;

/// Asks a running daemon to stop. Clone it freely and trigger it from any thread, before or
/// during [`Daemon::serve`]. (Not meant for signal handlers: `virtnetd` takes SIGINT/SIGTERM
/// with `sigwait` on a thread of its own, which then calls [`Shutdown::trigger`].)
#[derive(Clone, Debug)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

#[derive(Debug)]
struct ShutdownInner {
    fired: AtomicBool,
    event: EventFd,
}

impl Shutdown {
    /// A new, untriggered handle.
    pub fn new() -> io::Result<Self> {
        Ok(Shutdown {
            inner: Arc::new(ShutdownInner {
                fired: AtomicBool::new(false),
                event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            }),
        })
    }

    /// Ask the daemon to stop.
    pub fn trigger(&self) {
        self.inner.fired.store(true, Ordering::Release);
        if let Err(e) = self.inner.event.write(1) {
            tracing::warn!("shutdown eventfd: {e}");
        }
    }

    /// Has [`Shutdown::trigger`] been called?
    pub fn is_triggered(&self) -> bool {
        self.inner.fired.load(Ordering::Acquire)
    }
}

struct Network {
    name: String,
    mode: Box<dyn NetMode>,
    ports: Vec<GuestPort>,
}

/// The running daemon.
pub struct Daemon {
    config: Config,
    networks: Vec<Network>,
    control: ControlServer,
}

impl Daemon {
    /// Start everything in a validated `config`. On error, whatever was started is stopped.
    pub fn start(config: Config) -> Result<Daemon> {
        let perms = config.socket_perms()?;
        let control = ControlServer::bind(&config.control_socket)?;
        tracing::info!("control socket {}", config.control_socket.display());
        let mut daemon = Daemon {
            config: config.clone(),
            networks: Vec::new(),
            control,
        };
        for net in &config.networks {
            let mode = match mode::alloc_mode(net) {
                Ok(m) => m,
                Err(source) => {
                    daemon.stop();
                    return Err(DaemonError::Mode {
                        network: net.name.clone(),
                        source,
                    });
                }
            };
            tracing::info!("network {}: mode {}", net.name, mode.name());
            let switch = mode.switch().clone();
            daemon.networks.push(Network {
                name: net.name.clone(),
                mode,
                ports: Vec::new(),
            });
            for index in 0..net.ports.len() {
                match GuestPort::listen(switch.clone(), net, index, perms) {
                    Ok(p) => {
                        if let Some(n) = daemon.networks.last_mut() {
                            n.ports.push(p);
                        }
                    }
                    Err(e) => {
                        daemon.stop();
                        return Err(e.into());
                    }
                }
            }
        }
        Ok(daemon)
    }

    /// The configuration it runs.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Status and counters of every network and port.
    pub fn stats(&self) -> StatsReport {
        let networks = self
            .networks
            .iter()
            .map(|n| {
                let mut ports: Vec<PortReport> = n.ports.iter().map(GuestPort::report).collect();
                for extra in n.mode.extra_ports() {
                    let mut r = PortReport {
                        name: extra.name,
                        kind: n.mode.name().into(),
                        port_id: extra.id.0,
                        ..PortReport::default()
                    };
                    if let Some(s) = n.mode.switch().port_stats(extra.id) {
                        r.set_counters(&s.snapshot());
                    }
                    ports.push(r);
                }
                NetworkStats {
                    name: n.name.clone(),
                    mode: n.mode.name().into(),
                    ports,
                    services: n.mode.services(),
                    nat: n.mode.nat(),
                    uplink: n.mode.uplink(),
                }
            })
            .collect();
        StatsReport { networks }
    }

    /// Answer the control socket and do housekeeping until `shutdown` is triggered.
    pub fn serve(&self, shutdown: &Shutdown) -> Result<()> {
        let epoll = Epoll::new().map_err(DaemonError::Poll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                shutdown.inner.event.as_raw_fd(),
                EpollEvent::new(EventSet::IN, EV_SHUTDOWN),
            )
            .map_err(DaemonError::Poll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                self.control.as_raw_fd(),
                EpollEvent::new(EventSet::IN, EV_CONTROL),
            )
            .map_err(DaemonError::Poll)?;
        let mut events = [EpollEvent::default(); 4];
        let mut last_tick = Instant::now();
        let stats = || self.stats();
        let timeout_ms = i32::try_from(TICK.as_millis()).unwrap_or(1000);
        while !shutdown.is_triggered() {
            let n = match epoll.wait(timeout_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(DaemonError::Poll(e)),
            };
            for ev in &events[..n] {
                if ev.data() == EV_CONTROL {
                    self.control.handle_pending(&stats);
                }
            }
            if last_tick.elapsed() >= HOUSEKEEPING {
                last_tick = Instant::now();
                for net in &self.networks {
                    net.mode.tick();
                }
            }
        }
        Ok(())
    }

    /// Stop every port and mode and remove every socket.
    pub fn stop(mut self) {
        for net in self.networks.drain(..) {
            for port in net.ports {
                port.shutdown();
            }
            net.mode.shutdown();
            tracing::info!("network {}: stopped", net.name);
        }
        // Dropping the control server removes its socket.
    }
}

/// Start `config` (already validated), serve until `shutdown`, then stop and clean up.
pub fn run(config: Config, shutdown: &Shutdown) -> Result<()> {
    let daemon = Daemon::start(config)?;
    let served = daemon.serve(shutdown);
    daemon.stop();
    served
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NetworkConfig, PortSpec};
    use assert_matches::assert_matches;
    use tempfile::TempDir;

    fn config(dir: &TempDir, mode: &str, ports: usize) -> Config {
        let mut net = NetworkConfig::internal("t");
        net.mode = mode.into();
        for i in 0..ports {
            net.ports
                .push(PortSpec::new(dir.path().join(format!("p{i}.sock"))));
        }
        Config {
            control_socket: dir.path().join("ctl.sock"),
            networks: vec![net],
            ..Config::default()
        }
    }

    #[test]
    fn start_stats_stop() {
        let dir = TempDir::new().unwrap();
        let d = Daemon::start(config(&dir, "null", 2)).unwrap();
        assert!(dir.path().join("p0.sock").exists());
        assert!(dir.path().join("p1.sock").exists());
        assert!(dir.path().join("ctl.sock").exists());
        let s = d.stats();
        assert_eq!(s.networks.len(), 1);
        assert_eq!(s.networks[0].mode, "null");
        let names: Vec<_> = s.networks[0]
            .ports
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["t-0", "t-1", "null"]);
        assert_eq!(s.networks[0].ports[2].kind, "null");
        assert_eq!(
            s.networks[0].ports[1].socket.as_deref(),
            Some(dir.path().join("p1.sock").as_path())
        );
        d.stop();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn serve_returns_on_early_trigger() {
        let dir = TempDir::new().unwrap();
        let sd = Shutdown::new().unwrap();
        sd.trigger();
        run(config(&dir, "internal", 1), &sd).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn failed_start_cleans_up() {
        let dir = TempDir::new().unwrap();
        let mut cfg = config(&dir, "internal", 2);
        // The second port's socket cannot be bound: its directory does not exist.
        cfg.networks[0].ports[1].socket = dir.path().join("missing/p1.sock");
        assert_matches!(Daemon::start(cfg).err(), Some(DaemonError::Port(_)));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn live_port_socket_is_not_stolen() {
        let dir = TempDir::new().unwrap();
        let other = std::os::unix::net::UnixListener::bind(dir.path().join("p1.sock")).unwrap();
        let e = Daemon::start(config(&dir, "internal", 2)).err().unwrap();
        assert_matches!(e, DaemonError::Port(PortError::InUse { .. }));
        assert!(
            dir.path().join("p1.sock").exists(),
            "the other owner's socket stays"
        );
        assert!(!dir.path().join("p0.sock").exists());
        assert!(!dir.path().join("ctl.sock").exists());
        drop(other);
    }

    #[test]
    fn sockets_get_the_configured_mode_and_group_and_busy_poll() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = TempDir::new().unwrap();
        let mut c = config(&dir, "null", 1);
        // Root may give the socket any group; others only one of their own.
        let gid = if crate::sys::is_root() {
            4321
        } else {
            std::fs::metadata(dir.path()).unwrap().gid()
        };
        c.socket_mode = Some("0660".into());
        c.socket_group = Some(gid.to_string());
        c.networks[0].ports[0].busy_poll_us = Some(7);
        let d = Daemon::start(c).unwrap();
        let m = std::fs::metadata(dir.path().join("p0.sock")).unwrap();
        assert_eq!((m.permissions().mode() & 0o777, m.gid()), (0o660, gid));
        let busy = d.networks[0].ports[0].busy_poll();
        assert_eq!(
            busy,
            std::time::Duration::from_micros(7),
            "busy_poll_us reaches the device"
        );
        d.stop();
        let mut c = config(&dir, "null", 1);
        c.socket_group = Some("no-such-group-here".into());
        assert!(matches!(Daemon::start(c), Err(DaemonError::Config(_))));
    }

    #[test]
    fn nat_mode_starts_with_gateway_and_services() {
        let dir = TempDir::new().unwrap();
        let mut c = config(&dir, "nat", 1);
        c.networks[0].dhcp = Some(crate::mode_hostonly::DhcpSpec {
            lease_file: Some(dir.path().join("t.leases")),
            ..Default::default()
        });
        let d = Daemon::start(c).unwrap();
        let s = d.stats();
        assert_eq!(s.networks[0].mode, "nat");
        assert!(s.networks[0].ports.iter().any(|p| p.name == "t-gateway"));
        let nat = s.networks[0].nat.as_ref().expect("NAT counters in stats");
        assert_eq!(nat["tcp_flows"], 0);
        assert!(nat.0.contains_key("closed_gone"), "{nat:?}");
        d.stop();
        assert!(!dir.path().join("ctl.sock").exists());
    }
}
