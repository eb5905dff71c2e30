//! The device as a switch port: [`NetDevice`] (state that outlives VMM connections) and
//! [`NetPort`] (a socket served across reconnects).
//!
//! ```text
//!  NetPort::listen ─► NetDevice::new ─► Switch::add_port(RxSink)       (port id, counters kept)
//!                 └─► thread "vu-net-<name>":
//!                       loop until shutdown:
//!                         poll(listener, 200 ms)
//!                         VhostUserDaemon::new(Arc<VhostUserNetBackend>) ─► start ─► wait
//!                         exit events ─► drop daemon (joins workers) ─► NetDevice::disconnected
//!  NetPort::shutdown ─► stop flag + ShutdownHandle ─► join ─► remove socket ─► remove port
//! ```

use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use virtnet_switch::{MacAddr, PortConfig, PortId, PortStatsSnapshot, Switch};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::ctrl::CtrlState;
use crate::rx::{RxParams, RxSink};
use crate::vhu_net::VhostUserNetBackend;
use crate::virtio_net::{offered_features, Negotiated, VirtioNetConfig, VIRTIO_NET_S_LINK_UP};

/// Errors creating or serving a device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is not usable.
    #[error("Invalid device configuration: {0}")]
    InvalidConfig(&'static str),
    /// The vhost-user socket cannot be created.
    #[error("Cannot listen on {0}")]
    Listen(PathBuf, #[source] std::io::Error),
    /// The serving thread cannot be spawned.
    #[error("Cannot spawn the device thread")]
    Thread(#[source] std::io::Error),
}

/// Result of device operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Configuration of one virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Name for logs.
    pub name: String,
    /// MAC in the config space (`VIRTIO_NET_F_MAC` is offered only when set).
    pub mac: Option<MacAddr>,
    /// Most queue pairs offered (1..=16); more than one offers `MQ`.
    pub queue_pairs: u16,
    /// Queue size (a power of two, at most 1024). vhost-user has no way to advertise a
    /// maximum and QEMU's virtio-mmio always uses 1024, so the device accepts any size up to
    /// 1024 whatever this says; it is validated and kept for configuration files.
    pub queue_size: u16,
    /// `VIRTIO_NET_F_MTU`: TX frames longer than `mtu + 18` without GSO are dropped.
    pub mtu: u16,
    /// Access VLAN on the switch.
    pub vlan: Option<u16>,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            name: String::new(),
            mac: None,
            queue_pairs: 1,
            queue_size: 256,
            mtu: 1500,
            vlan: None,
        }
    }
}

impl NetConfig {
    /// Check the limits documented on the fields.
    pub fn validate(&self) -> Result<()> {
        if !(1..=16).contains(&self.queue_pairs) {
            return Err(Error::InvalidConfig("queue_pairs must be 1..=16"));
        }
        if !self.queue_size.is_power_of_two() || !(2..=1024).contains(&self.queue_size) {
            return Err(Error::InvalidConfig(
                "queue_size must be a power of two in 2..=1024",
            ));
        }
        if self.mtu < 68 {
            return Err(Error::InvalidConfig("mtu must be at least 68"));
        }
        if let Some(v) = self.vlan {
            if !(1..=4094).contains(&v) {
                return Err(Error::InvalidConfig("vlan must be 1..=4094"));
            }
        }
        if let Some(m) = self.mac {
            if !m.is_unicast() {
                return Err(Error::InvalidConfig("mac must be a unicast address"));
            }
        }
        Ok(())
    }
}

/// What a device is doing right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStatus {
    /// A VMM is connected.
    pub connected: bool,
    /// The driver negotiated features on this connection.
    pub driver_ok: bool,
    /// RX queue 0 is running: frames for this port are delivered.
    pub running: bool,
    /// The features the driver acked (0 when none).
    pub acked_features: u64,
    /// Queue pairs in use (`VQ_PAIRS_SET`, 1 by default).
    pub active_queue_pairs: u16,
    /// VMM connections served so far (including the current one).
    pub connections: u64,
}

/// A virtio-net device's state that outlives VMM connections: its switch port, counters,
/// negotiated features and control-queue state.
pub struct NetDevice {
    config: NetConfig,
    switch: Arc<Switch>,
    port: PortId,
    rx: Arc<RxSink>,
    ctrl: Mutex<CtrlState>,
    acked: AtomicU64,
    driver_ok: AtomicBool,
    connected: AtomicBool,
    connections: AtomicU64,
    busy_poll_ns: AtomicU64,
}

/// The default longest busy-poll window of a TX worker (see [`NetDevice::set_busy_poll`]),
/// chosen by measurement (virtnet-bench, guest → guest, 64 B and 1500 B).
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);

/// The busy-poll window new devices start with: `VIRTNET_BUSY_POLL_US` from the environment
/// (microseconds, 0 = off) if set and valid, else [`DEFAULT_BUSY_POLL`]. Read once.
pub fn default_busy_poll() -> Duration {
    static FROM_ENV: OnceLock<Duration> = OnceLock::new();
    *FROM_ENV.get_or_init(|| {
        std::env::var("VIRTNET_BUSY_POLL_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(DEFAULT_BUSY_POLL, Duration::from_micros)
    })
}

impl std::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice")
            .field("name", &self.config.name)
            .field("port", &self.port)
            .finish()
    }
}

impl NetDevice {
    /// Validate `config` and attach a new port to `switch`. Frames for the port are dropped
    /// as `NotReady` until a driver runs the RX queue.
    pub fn new(switch: Arc<Switch>, config: NetConfig) -> Result<Arc<Self>> {
        config.validate()?;
        let ctrl = CtrlState::new(config.mac, config.queue_pairs);
        let rx = Arc::new(RxSink::new(
            &config.name,
            config.queue_pairs,
            ctrl.filter.clone(),
        ));
        let port = switch.add_port(
            PortConfig {
                name: config.name.clone(),
                vlan: config.vlan,
            },
            rx.clone(),
        );
        Ok(Arc::new(NetDevice {
            config,
            switch,
            port,
            rx,
            ctrl: Mutex::new(ctrl),
            acked: AtomicU64::new(0),
            driver_ok: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            busy_poll_ns: AtomicU64::new(duration_ns(default_busy_poll())),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The longest time a TX worker polls its queue after it ran dry before it sleeps until
    /// the next kick (adaptive below that, see the `vhu_net` module); zero turns polling off.
    pub fn set_busy_poll(&self, window: Duration) {
        self.busy_poll_ns
            .store(duration_ns(window), Ordering::Relaxed);
    }

    /// The busy-poll window (see [`NetDevice::set_busy_poll`]).
    pub fn busy_poll(&self) -> Duration {
        Duration::from_nanos(self.busy_poll_ns.load(Ordering::Relaxed))
    }

    /// The switch this device is a port of.
    pub fn switch(&self) -> &Switch {
        &self.switch
    }

    /// The switch port id.
    pub fn port_id(&self) -> PortId {
        self.port
    }

    /// The switch counters of this port.
    pub fn stats(&self) -> PortStatsSnapshot {
        self.switch
            .port_stats(self.port)
            .map(|s| s.snapshot())
            .unwrap_or_default()
    }

    /// Connection and driver state.
    pub fn status(&self) -> DeviceStatus {
        DeviceStatus {
            connected: self.connected.load(Ordering::Relaxed),
            driver_ok: self.driver_ok.load(Ordering::Relaxed),
            running: self.rx.is_running(),
            acked_features: self.acked.load(Ordering::Relaxed),
            active_queue_pairs: self.rx.active_pairs(),
            connections: self.connections.load(Ordering::Relaxed),
        }
    }

    /// Take the port off the switch (the device stops receiving for good).
    pub fn remove_from_switch(&self) {
        self.rx.detach_all();
        self.switch.remove_port(self.port);
    }

    /// The features this device offers.
    pub fn offered_features(&self) -> u64 {
        offered_features(self.config.mac.is_some(), self.config.queue_pairs)
    }

    /// The config space.
    pub fn config_space(&self) -> VirtioNetConfig {
        VirtioNetConfig {
            mac: self.config.mac.unwrap_or_default(),
            status: VIRTIO_NET_S_LINK_UP,
            max_virtqueue_pairs: self.config.queue_pairs,
            mtu: self.config.mtu,
        }
    }

    pub(crate) fn rx(&self) -> &RxSink {
        &self.rx
    }

    pub(crate) fn negotiated(&self) -> Negotiated {
        Negotiated::new(self.acked.load(Ordering::Relaxed))
    }

    pub(crate) fn set_acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        let n = Negotiated::new(features);
        self.rx.set_params(RxParams::new(&n));
        let mut ctrl = self.ctrl_state();
        *ctrl = CtrlState::new(self.config.mac, self.config.queue_pairs);
        ctrl.mq = n.mq;
        self.apply_ctrl(&ctrl);
        self.driver_ok.store(true, Ordering::Relaxed);
    }

    pub(crate) fn ctrl_state(&self) -> MutexGuard<'_, CtrlState> {
        self.ctrl.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn apply_ctrl(&self, s: &CtrlState) {
        self.rx.set_filter(&s.filter);
        self.rx.set_active_pairs(s.active_pairs);
    }

    /// Device reset (or disconnect): stop touching the rings, forget the driver's settings
    /// and the stations learned behind this port (a NAT gateway then closes their flows).
    pub(crate) fn reset(&self) {
        self.rx.detach_all();
        self.switch.flush_port_fdb(self.port);
        self.driver_ok.store(false, Ordering::Relaxed);
        self.acked.store(0, Ordering::Relaxed);
        let mut ctrl = self.ctrl_state();
        *ctrl = CtrlState::new(self.config.mac, self.config.queue_pairs);
        self.apply_ctrl(&ctrl);
    }

    fn connection_started(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
    }

    fn connection_ended(&self) {
        self.reset();
        self.connected.store(false, Ordering::Relaxed);
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Stop flag and the live connection's shutdown handle.
#[derive(Default)]
struct Control {
    stop: AtomicBool,
    conn: Mutex<Option<ShutdownHandle>>,
}

/// A switch port that serves one vhost-user socket, across VMM reconnects.
pub struct NetPort {
    dev: Arc<NetDevice>,
    socket: PathBuf,
    ctl: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NetPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetPort")
            .field("dev", &self.dev)
            .field("socket", &self.socket)
            .finish()
    }
}

impl NetPort {
    /// Attach a port to `switch` and listen on `socket` (a stale socket file is replaced; the
    /// parent dir must exist). Serves VMM connections one after another in a background
    /// thread (a VMM may disconnect and reconnect, or a VM restart on the same socket) until
    /// shutdown. While no driver is running, frames for this port are dropped as
    /// `DropReason::NotReady`.
    pub fn listen(switch: Arc<Switch>, config: NetConfig, socket: &Path) -> Result<NetPort> {
        let dev = NetDevice::new(switch, config)?;
        let listener = match bind(socket) {
            Ok(l) => l,
            Err(e) => {
                dev.remove_from_switch();
                return Err(Error::Listen(socket.to_path_buf(), e));
            }
        };
        let ctl = Arc::new(Control::default());
        let (d, c) = (dev.clone(), ctl.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vu-net-{}", dev.config().name))
            .spawn(move || serve(listener, &d, &c));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                dev.remove_from_switch();
                let _ = std::fs::remove_file(socket);
                return Err(Error::Thread(e));
            }
        };
        Ok(NetPort {
            dev,
            socket: socket.to_path_buf(),
            ctl,
            thread: Some(thread),
        })
    }

    /// The switch port id.
    pub fn port_id(&self) -> PortId {
        self.dev.port_id()
    }

    /// The vhost-user socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The switch counters of this port.
    pub fn stats(&self) -> PortStatsSnapshot {
        self.dev.stats()
    }

    /// Connection and driver state.
    pub fn status(&self) -> DeviceStatus {
        self.dev.status()
    }

    /// The device behind the port.
    pub fn device(&self) -> &Arc<NetDevice> {
        &self.dev
    }

    /// Stop accepting, drop the VMM connection, join threads, remove the socket file and
    /// remove the port from the switch. Also done on drop.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.ctl.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self
            .ctl
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            h.shutdown();
        }
        if thread.join().is_err() {
            log::error!("{}: device thread panicked", self.dev.config().name);
        }
        let _ = std::fs::remove_file(&self.socket);
        self.dev.remove_from_switch();
    }
}

impl Drop for NetPort {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long the accept loop sleeps between looks at the stop flag.
const POLL_MS: i32 = 200;

/// The public socket and the private one the backend side of the shim uses.
struct Listeners {
    public: UnixListener,
    internal: Listener,
    internal_path: PathBuf,
    private_dir: PathBuf,
}

impl Drop for Listeners {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.internal_path);
        let _ = std::fs::remove_dir(&self.private_dir);
    }
}

/// Bind the public socket (replacing a stale file) and a private one in a fresh 0700
/// directory (only our user can reach it, as with the public socket).
fn bind(socket: &Path) -> std::io::Result<Listeners> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let private_dir = std::env::temp_dir().join(format!(
        "virtnet-virtio-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private_dir)?;
    let internal_path = private_dir.join("backend.sock");
    let internal = match UnixListener::bind(&internal_path) {
        Ok(l) => Listener::from(l),
        Err(e) => {
            let _ = std::fs::remove_dir(&private_dir);
            return Err(e);
        }
    };
    let _ = std::fs::remove_file(socket);
    let public = match UnixListener::bind(socket) {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_file(&internal_path);
            let _ = std::fs::remove_dir(&private_dir);
            return Err(e);
        }
    };
    Ok(Listeners {
        public,
        internal,
        internal_path,
        private_dir,
    })
}

fn serve(mut l: Listeners, dev: &Arc<NetDevice>, ctl: &Control) {
    let name = dev.config().name.clone();
    let epoll = match Epoll::new().and_then(|ep| {
        ep.ctl(
            ControlOperation::Add,
            l.public.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        Ok(ep)
    }) {
        Ok(ep) => ep,
        Err(e) => {
            log::error!("{name}: cannot poll the listener: {e}");
            return;
        }
    };
    let mut events = [EpollEvent::default(); 1];
    while !ctl.stop.load(Ordering::SeqCst) {
        match epoll.wait(POLL_MS, &mut events) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("{name}: epoll: {e}");
                std::thread::sleep(std::time::Duration::from_millis(POLL_MS as u64));
                continue;
            }
        }
        if ctl.stop.load(Ordering::SeqCst) {
            break;
        }
        match l.public.accept() {
            Ok((vmm, _)) => serve_one(vmm, &mut l, dev, ctl),
            Err(e) => {
                log::warn!("{name}: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(POLL_MS as u64));
            }
        }
    }
}

/// Serve one VMM connection from accept to disconnect.
fn serve_one(vmm: UnixStream, l: &mut Listeners, dev: &Arc<NetDevice>, ctl: &Control) {
    let name = dev.config().name.clone();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = Arc::new(VhostUserNetBackend::new(dev.clone(), mem.clone()));
    let mut daemon = match VhostUserDaemon::new(format!("vu-net-{name}-conn"), backend, mem) {
        Ok(d) => d,
        Err(e) => {
            log::error!("{name}: cannot create the vhost-user daemon: {e}");
            return;
        }
    };
    // The backend side of the shim: connect (queued in the backlog), then accept it.
    let inner = match UnixStream::connect(&l.internal_path) {
        Ok(s) => s,
        Err(e) => {
            log::error!("{name}: cannot connect the internal socket: {e}");
            return;
        }
    };
    if let Err(e) = daemon.start(&mut l.internal) {
        log::error!("{name}: accept failed: {e}");
        return;
    }
    let shim = match crate::shim::spawn(vmm, inner, &name) {
        Ok(t) => t,
        Err(e) => {
            log::error!("{name}: cannot start the message shim: {e}");
            daemon.request_shutdown();
            let _ = daemon.wait();
            return;
        }
    };
    dev.connection_started();
    log::info!("{name}: VMM connected");
    *ctl.conn.lock().unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
    if ctl.stop.load(Ordering::SeqCst) {
        daemon.request_shutdown();
    }
    match daemon.wait() {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected
            | vhost::vhost_user::Error::PartialMessage
            | vhost::vhost_user::Error::SocketBroken(_),
        )) => {}
        Err(e) if ctl.stop.load(Ordering::SeqCst) => log::debug!("{name}: {e}"),
        Err(e) => log::warn!("{name}: connection ended: {e}"),
    }
    *ctl.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    dev.rx().detach_all();
    drop(daemon); // joins the vring workers
    for t in shim {
        let _ = t.join();
    }
    dev.connection_ended();
    log::info!("{name}: VMM disconnected");
}

#[cfg(test)]
mod tests {
    use super::*;
    use assert_matches::assert_matches;
    use virtnet_switch::SwitchConfig;

    #[test]
    fn config_rejections() {
        let ok = NetConfig::default();
        assert!(ok.validate().is_ok());
        for bad in [
            NetConfig {
                queue_pairs: 0,
                ..Default::default()
            },
            NetConfig {
                queue_pairs: 17,
                ..Default::default()
            },
            NetConfig {
                queue_size: 100,
                ..Default::default()
            },
            NetConfig {
                queue_size: 2048,
                ..Default::default()
            },
            NetConfig {
                mtu: 10,
                ..Default::default()
            },
            NetConfig {
                vlan: Some(4095),
                ..Default::default()
            },
            NetConfig {
                mac: Some(MacAddr::BROADCAST),
                ..Default::default()
            },
        ] {
            assert_matches!(bad.validate(), Err(Error::InvalidConfig(_)));
        }
    }

    #[test]
    fn listen_and_shutdown_cleans_up() {
        let dir = std::env::temp_dir().join(format!("virtnet-virtio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("a.sock");
        std::fs::write(&sock, b"stale").unwrap();
        let sw = Switch::new(SwitchConfig::default());
        let p = NetPort::listen(sw.clone(), NetConfig::default(), &sock).unwrap();
        assert!(sock.exists());
        assert_eq!(sw.ports().len(), 1);
        let st = p.status();
        assert!(!st.connected && !st.running);
        // Frames to the port are NotReady drops.
        let mut b = sw.new_batch();
        sw.begin(&mut b);
        sw.deliver_to_port(
            &mut b,
            p.port_id(),
            &virtnet_switch::SliceFrame(&[0u8; 60]),
            &virtnet_switch::NetHdr::NONE,
        );
        sw.end(&mut b);
        assert_eq!(
            p.stats().drop_count(virtnet_switch::DropReason::NotReady),
            1
        );
        p.shutdown();
        assert!(!sock.exists());
        assert!(sw.ports().is_empty());
        // Missing parent directory is an error and leaves no port behind.
        assert_matches!(
            NetPort::listen(sw.clone(), NetConfig::default(), &dir.join("no/such.sock")),
            Err(Error::Listen(..))
        );
        assert!(sw.ports().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
