//! [`Guest`]: a user-space virtio-net driver speaking vhost-user as the frontend.
//!
//! Theory of operation:
//!
//! | step | what happens |
//! |---|---|
//! | connect | retry `connect()` on ENOENT/ECONNREFUSED until `connect_timeout` |
//! | handshake | SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES (MQ, REPLY_ACK, CONFIG), GET_QUEUE_NUM, SET_FEATURES (offered ∩ wanted), GET_CONFIG, SET_MEM_TABLE |
//! | queues | per queue: allocate ring, post RX buffers, NUM, BASE=0, ADDR (our HVAs), CALL, KICK, ENABLE; the control queue too when CTRL_VQ is acked |
//! | run | TX: copy hdr+frame into TX slots, one chain per frame, publish, kick unless suppressed. RX: pop used, reassemble `num_buffers` buffers, repost, kick unless suppressed |
//! | wait | notifications are off by default; to sleep, enable them (used_event / flags), re-check the ring, then `poll()` the call eventfd |
//! | disconnect | drop the socket: the backend sees EOF |
//!
//! Queue indices follow virtio-net: RX of pair `i` is `2i`, TX is `2i + 1`, and the control
//! queue is `2 * max_virtqueue_pairs` (2 without MQ).
//!
//! TX memory: each TX queue owns `queue_size` slots of `tx_buffer_size` bytes. A frame takes
//! `ceil((hdr + len) / slot)` slots, as a direct chain, or as one ring descriptor pointing at
//! a per-head indirect table when INDIRECT_DESC is acked and `tx_indirect` is set.

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VHOST_USER_MAX_VRINGS,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtnet_switch::NetHdr;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::mem::{self, GuestMem, DEFAULT_GPA_BASE, DEFAULT_MEM_SIZE};
use crate::ring::{self, RawDesc, Seg, SplitRing, UsedElem};
use crate::virtio_net::*;

/// Largest frame (without virtio_net_hdr) this driver sends or reassembles: a 64 KiB GSO frame
/// (Firecracker's `MAX_BUFFER_SIZE` of 65562 minus the 12-byte header).
pub const MAX_FRAME_LEN: usize = 65550;
/// Largest number of slots one TX frame may span (bounds `tx_buffer_size` from below).
pub const MAX_TX_SEGS: usize = 80;
/// Token of chains added through the raw interface.
const RAW_TOKEN: u64 = u64::MAX;
/// Token of chains added by `send`.
const TX_TOKEN: u64 = 0;

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not connect to the backend socket before the timeout.
    #[error("Cannot connect to {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Last connect error.
        #[source]
        source: io::Error,
    },
    /// The backend did not complete the handshake in time (5 × `io_timeout`, at least 1 s).
    #[error("vhost-user handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    /// A vhost-user request failed.
    #[error("vhost-user {op} failed")]
    Vhost {
        /// The request.
        op: &'static str,
        /// What the vhost crate reported.
        #[source]
        source: vhost::Error,
    },
    /// The configuration is invalid.
    #[error("Invalid config: {0}")]
    InvalidConfig(&'static str),
    /// Guest memory setup or access failed.
    #[error("Guest memory")]
    Mem(#[from] mem::Error),
    /// Ring access failed.
    #[error("Virtqueue")]
    Ring(#[from] ring::Error),
    /// Creating, writing or polling an eventfd failed.
    #[error("Eventfd {0} failed")]
    EventFd(&'static str, #[source] io::Error),
    /// There is no such queue pair.
    #[error("No queue pair {0}")]
    NoSuchQueuePair(u16),
    /// There is no such virtqueue.
    #[error("No virtqueue {0}")]
    NoSuchQueue(u16),
    /// The frame is longer than what can be sent.
    #[error("Frame of {len} bytes exceeds {max}")]
    FrameTooLarge {
        /// Frame length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The TX queue stayed full for `io_timeout`.
    #[error("TX queue {0} full")]
    TxFull(u16),
    /// The device broke the protocol on a queue.
    #[error("Device misbehaved on queue {queue}: {what} (id {id}, len {len})")]
    Device {
        /// Virtqueue index.
        queue: u16,
        /// What was wrong.
        what: &'static str,
        /// Used element id.
        id: u32,
        /// Used element len.
        len: u32,
    },
    /// A feature needed for the request was not negotiated.
    #[error("Feature not negotiated: {0}")]
    NotNegotiated(&'static str),
    /// The control queue did not answer within `io_timeout`.
    #[error("Control command {class}/{cmd} timed out")]
    CtrlTimeout {
        /// Class.
        class: u8,
        /// Command.
        cmd: u8,
    },
    /// The device answered a control command with an error ack.
    #[error("Control command {class}/{cmd} rejected (ack {ack})")]
    CtrlRejected {
        /// Class.
        class: u8,
        /// Command.
        cmd: u8,
        /// The ack byte.
        ack: u8,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

fn vhost_err(op: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::Vhost { op, source }
}

/// What the driver asks for.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    /// Features the driver is willing to ack (`ack = offered & features`, minus
    /// [`UNSUPPORTED_FEATURES`]). Default: [`DEFAULT_FEATURES`].
    pub features: u64,
    /// Queue pairs to set up (clamped to what the device offers). Default 1.
    pub queue_pairs: u16,
    /// Entries per virtqueue (power of two). Default 256.
    pub queue_size: u16,
    /// Bytes per RX buffer. 0 = automatic: 2048 with MRG_RXBUF, else 65562.
    pub rx_buffer_size: u32,
    /// RX buffers posted per RX queue at connect; `None` = `queue_size`. `Some(0)` leaves RX
    /// queues empty for raw tests.
    pub rx_buffers: Option<u16>,
    /// Bytes per TX slot (>= 1024). Default 2048.
    pub tx_buffer_size: u32,
    /// Send multi-slot frames through indirect descriptors when INDIRECT_DESC is acked.
    /// Default true.
    pub tx_indirect: bool,
    /// Put the virtio_net_hdr in its own descriptor (always done without VERSION_1 and
    /// ANY_LAYOUT). Default false.
    pub tx_hdr_separate: bool,
    /// Guest memory size in bytes (multiple of 4096). Default 64 MiB.
    pub mem_size: u64,
    /// How long `connect` retries while the socket is missing or refuses. Default 5 s.
    pub connect_timeout: Duration,
    /// How long `send` waits for TX room and `ctrl` for an answer. Default 2 s.
    pub io_timeout: Duration,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            features: DEFAULT_FEATURES,
            queue_pairs: 1,
            queue_size: 256,
            rx_buffer_size: 0,
            rx_buffers: None,
            tx_buffer_size: 2048,
            tx_indirect: true,
            tx_hdr_separate: false,
            mem_size: DEFAULT_MEM_SIZE,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(2),
        }
    }
}

impl GuestConfig {
    fn validate(&self) -> Result<()> {
        if self.queue_pairs == 0 {
            return Err(Error::InvalidConfig("queue_pairs must be at least 1"));
        }
        if self.queue_size == 0
            || !self.queue_size.is_power_of_two()
            || self.queue_size > ring::MAX_QUEUE_SIZE
        {
            return Err(Error::InvalidConfig(
                "queue_size must be a power of two <= 32768",
            ));
        }
        if self.tx_buffer_size < 1024 {
            return Err(Error::InvalidConfig("tx_buffer_size must be >= 1024"));
        }
        if self.rx_buffer_size != 0 && self.rx_buffer_size < 64 {
            return Err(Error::InvalidConfig("rx_buffer_size must be 0 or >= 64"));
        }
        if self.rx_buffers.is_some_and(|n| n > self.queue_size) {
            return Err(Error::InvalidConfig("rx_buffers exceeds queue_size"));
        }
        if self.mem_size == 0 || self.mem_size % 4096 != 0 {
            return Err(Error::InvalidConfig("mem_size must be a multiple of 4096"));
        }
        Ok(())
    }
}

/// A frame taken from an RX queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The virtio_net_hdr the device wrote.
    pub hdr: NetHdr,
    /// How many RX buffers the frame used (1 without MRG_RXBUF).
    pub num_buffers: u16,
    /// The Ethernet frame (header stripped).
    pub frame: Vec<u8>,
}

/// Counters of one guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// Frames queued for TX.
    pub tx_frames: u64,
    /// Frames received.
    pub rx_frames: u64,
    /// Kicks sent (eventfd writes).
    pub kicks: u64,
    /// Kicks skipped because the device suppressed them.
    pub kicks_suppressed: u64,
    /// Times the driver slept on a call eventfd.
    pub waits: u64,
}

/// One virtqueue with its eventfds.
#[derive(Debug)]
struct Vq {
    index: u16,
    ring: SplitRing,
    kick: EventFd,
    call: EventFd,
}

impl Vq {
    fn new(mem: &mut GuestMem, index: u16, size: u16, event_idx: bool) -> Result<Self> {
        let ring = SplitRing::new(mem, size, event_idx)?;
        let kick = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::EventFd("create", e))?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::EventFd("create", e))?;
        let mut vq = Vq {
            index,
            ring,
            kick,
            call,
        };
        vq.ring.disable_notify(mem)?;
        Ok(vq)
    }

    fn kick(&self, stats: &mut GuestStats) -> Result<()> {
        stats.kicks += 1;
        self.kick.write(1).map_err(|e| Error::EventFd("kick", e))
    }

    /// Publishes the avail index and kicks unless the device suppressed it.
    fn flush(&mut self, mem: &GuestMem, stats: &mut GuestStats) -> Result<()> {
        if !self.ring.has_unpublished() {
            return Ok(());
        }
        self.ring.publish(mem)?;
        if self.ring.needs_kick(mem)? {
            self.kick(stats)?;
        } else {
            stats.kicks_suppressed += 1;
        }
        Ok(())
    }

    /// Waits until the used ring has unconsumed entries or `deadline` passes.
    fn wait_used(
        &mut self,
        mem: &GuestMem,
        deadline: Instant,
        stats: &mut GuestStats,
    ) -> Result<bool> {
        loop {
            if self.ring.has_used(mem)? {
                return Ok(true);
            }
            if self.ring.enable_notify(mem)? {
                self.ring.disable_notify(mem)?;
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                self.ring.disable_notify(mem)?;
                return Ok(false);
            }
            stats.waits += 1;
            let ms = (deadline - now).as_millis().clamp(1, 1000);
            poll_readable(&self.call, i32::try_from(ms).unwrap_or(1000))?;
            // Drain the counter; EAGAIN just means the wake-up was for someone else.
            let _ = self.call.read();
            self.ring.disable_notify(mem)?;
        }
    }
}

/// Blocks until `fd` is readable or `timeout_ms` passes.
fn poll_readable(fd: &EventFd, timeout_ms: i32) -> Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid, initialised pollfd that lives across the call, and we pass
    // a count of exactly 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(Error::EventFd("poll", e));
    }
    Ok(rc > 0)
}

/// In-progress reassembly of a mergeable frame.
#[derive(Debug, Clone, Copy)]
struct Partial {
    hdr: NetHdr,
    num_buffers: u16,
    remaining: u16,
    filled: usize,
}

#[derive(Debug)]
struct RxQueue {
    vq: Vq,
    bufs: u64,
    buf_size: u32,
    scratch: Vec<u8>,
    partial: Option<Partial>,
}

#[derive(Debug)]
struct TxQueue {
    vq: Vq,
    slots: u64,
    slot_size: u32,
    nslots: usize,
    free_slots: Vec<u16>,
    chain_slots: Vec<u16>,
    chain_nslots: Vec<u16>,
    indirect: Option<u64>,
    max_segs: usize,
    scratch: Vec<u8>,
    /// Per-frame segment list, reused (a fresh `[Seg; MAX_TX_SEGS]` per frame cost more
    /// than the rest of `enqueue`).
    segs: Vec<Seg>,
    /// Per-frame slot list, reused.
    used_slots: Vec<u16>,
}

#[derive(Debug)]
struct CtrlQueue {
    vq: Vq,
    buf: u64,
}

/// [`CONFIG_LEN`] as the vhost-user message wants it.
const CONFIG_LEN_U32: u32 = CONFIG_LEN as u32;
/// Length of the control queue's buffer area.
const CTRL_BUF_LEN: u64 = 4096;

/// A virtio-net driver connected to a vhost-user backend. See the crate docs.
pub struct Guest {
    frontend: Frontend,
    mem: GuestMem,
    cfg: GuestConfig,
    acked: u64,
    offered: u64,
    protocol: VhostUserProtocolFeatures,
    config: Option<NetConfigSpace>,
    hdr_len: usize,
    hdr_separate: bool,
    device_max_pairs: u16,
    active_pairs: u16,
    rx: Vec<RxQueue>,
    tx: Vec<TxQueue>,
    ctrl: Option<CtrlQueue>,
    stats: GuestStats,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("acked", &format_args!("{:#x}", self.acked))
            .field("queue_pairs", &self.rx.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(Error::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

impl Guest {
    /// Connects to the vhost-user backend at `socket`, negotiates, sets up the queues and
    /// posts RX buffers. Retries for `config.connect_timeout` while the socket does not exist
    /// or refuses connections.
    pub fn connect(socket: impl AsRef<Path>, config: GuestConfig) -> Result<Guest> {
        config.validate()?;
        let stream = connect_socket(socket.as_ref(), config.connect_timeout)?;
        // The vhost crate retries reads forever, so a backend that stops answering would hang
        // the handshake: a watchdog shuts the socket down if it takes too long.
        let guard = stream.try_clone().map_err(|source| Error::Connect {
            path: socket.as_ref().to_path_buf(),
            source,
        })?;
        let limit = (config.io_timeout * 5).max(Duration::from_secs(1));
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let fired = matches!(wait.recv_timeout(limit), Err(RecvTimeoutError::Timeout));
            if fired {
                let _ = guard.shutdown(Shutdown::Both);
            }
            fired
        });
        let res = Self::setup(stream, config);
        drop(done);
        match (watchdog.join(), res) {
            // Shut down at the last moment: the guest is unusable.
            (Ok(true), Ok(_)) => Err(Error::HandshakeTimeout(limit)),
            (_, res) => res,
        }
    }

    fn setup(stream: UnixStream, config: GuestConfig) -> Result<Guest> {
        let mut fe = Frontend::from_stream(stream, VHOST_USER_MAX_VRINGS);
        fe.set_owner().map_err(vhost_err("SET_OWNER"))?;
        let offered = fe.get_features().map_err(vhost_err("GET_FEATURES"))?;
        let acked = offered & config.features & !UNSUPPORTED_FEATURES;

        let mut protocol = VhostUserProtocolFeatures::empty();
        let mut queue_num = None;
        if offered & F_PROTOCOL_FEATURES != 0 {
            let p = fe
                .get_protocol_features()
                .map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
            protocol = p
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::CONFIG);
            fe.set_protocol_features(protocol)
                .map_err(vhost_err("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every later request waits for the backend's ack: setup is synchronous.
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                queue_num = Some(fe.get_queue_num().map_err(vhost_err("GET_QUEUE_NUM"))?);
            }
        }
        fe.set_features(acked).map_err(vhost_err("SET_FEATURES"))?;

        let config_space = if protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let buf = [0u8; CONFIG_LEN];
            let (_, payload) = fe
                .get_config(0, CONFIG_LEN_U32, VhostUserConfigFlags::WRITABLE, &buf)
                .map_err(vhost_err("GET_CONFIG"))?;
            Some(NetConfigSpace::parse(&payload))
        } else {
            None
        };

        let mq = acked & F_MQ != 0;
        let device_max_pairs = if mq {
            match (config_space.map(|c| c.max_virtqueue_pairs), queue_num) {
                (Some(n), _) if n > 0 => n,
                // GET_QUEUE_NUM counts virtqueues in rust-vmm backends (2 per pair + ctrl).
                (_, Some(q)) => u16::try_from(q / 2).unwrap_or(u16::MAX).max(1),
                _ => 1,
            }
        } else {
            1
        };
        let pairs = config.queue_pairs.min(device_max_pairs);
        let event_idx = acked & F_EVENT_IDX != 0;
        let hdr_len = hdr_len(acked);
        let hdr_separate = config.tx_hdr_separate || acked & (F_VERSION_1 | F_ANY_LAYOUT) == 0;
        let rx_buf_size = match config.rx_buffer_size {
            0 if acked & F_MRG_RXBUF != 0 => 2048,
            0 => u32::try_from(MAX_FRAME_LEN + hdr_len).unwrap_or(u32::MAX),
            n => n,
        };

        let mut mem = GuestMem::new(DEFAULT_GPA_BASE, config.mem_size)?;
        let qs = config.queue_size;
        let mut rx = Vec::new();
        let mut tx = Vec::new();
        for p in 0..pairs {
            let nposts = config.rx_buffers.unwrap_or(qs);
            rx.push(RxQueue::new(
                &mut mem,
                2 * p,
                qs,
                event_idx,
                rx_buf_size,
                nposts,
            )?);
            let indirect = acked & F_INDIRECT_DESC != 0 && config.tx_indirect;
            tx.push(TxQueue::new(
                &mut mem,
                2 * p + 1,
                qs,
                event_idx,
                config.tx_buffer_size,
                hdr_len,
                hdr_separate,
                indirect,
            )?);
        }
        let ctrl = if acked & F_CTRL_VQ != 0 {
            let index = if mq { 2 * device_max_pairs } else { 2 };
            let vq = Vq::new(&mut mem, index, qs, event_idx)?;
            let buf = mem.alloc(CTRL_BUF_LEN, 16)?;
            Some(CtrlQueue { vq, buf })
        } else {
            None
        };

        let region = mem
            .memory()
            .iter()
            .next()
            .ok_or(Error::InvalidConfig("no guest memory region"))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(vhost_err("memory region info"))?;
        fe.set_mem_table(&[info])
            .map_err(vhost_err("SET_MEM_TABLE"))?;

        let mut guest = Guest {
            frontend: fe,
            mem,
            cfg: config,
            acked,
            offered,
            protocol,
            config: config_space,
            hdr_len,
            hdr_separate,
            device_max_pairs,
            active_pairs: pairs,
            rx,
            tx,
            ctrl,
            stats: GuestStats::default(),
        };
        guest.setup_vrings()?;
        if mq && pairs > 1 && guest.ctrl.is_some() {
            guest.ctrl_ok(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &pairs.to_le_bytes())?;
        }
        Ok(guest)
    }

    fn setup_vrings(&mut self) -> Result<()> {
        let size = self.cfg.queue_size;
        let mut vqs: Vec<&Vq> = Vec::new();
        for (r, t) in self.rx.iter().zip(self.tx.iter()) {
            vqs.push(&r.vq);
            vqs.push(&t.vq);
        }
        if let Some(c) = &self.ctrl {
            vqs.push(&c.vq);
        }
        let fe = &mut self.frontend;
        let mem = &self.mem;
        let mut indices = Vec::new();
        for vq in vqs {
            let i = usize::from(vq.index);
            fe.set_vring_num(i, size)
                .map_err(vhost_err("SET_VRING_NUM"))?;
            fe.set_vring_base(i, 0)
                .map_err(vhost_err("SET_VRING_BASE"))?;
            let addr = VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: 0,
                desc_table_addr: mem.host_address(vq.ring.desc_addr())?,
                used_ring_addr: mem.host_address(vq.ring.used_addr())?,
                avail_ring_addr: mem.host_address(vq.ring.avail_addr())?,
                log_addr: None,
            };
            fe.set_vring_addr(i, &addr)
                .map_err(vhost_err("SET_VRING_ADDR"))?;
            fe.set_vring_call(i, &vq.call)
                .map_err(vhost_err("SET_VRING_CALL"))?;
            fe.set_vring_kick(i, &vq.kick)
                .map_err(vhost_err("SET_VRING_KICK"))?;
            indices.push(i);
        }
        if self.acked & F_PROTOCOL_FEATURES != 0 {
            for i in indices {
                fe.set_vring_enable(i, true)
                    .map_err(vhost_err("SET_VRING_ENABLE"))?;
            }
        }
        // Tell every RX queue about the buffers posted before the backend started.
        for q in &self.rx {
            q.vq.kick(&mut self.stats)?;
        }
        Ok(())
    }

    /// Features the device offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Features acked (`offered & wanted`).
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// Protocol features acked.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// The device config space, when the backend offers `VHOST_USER_PROTOCOL_F_CONFIG`.
    pub fn config(&self) -> Option<NetConfigSpace> {
        self.config
    }

    /// Link state from the config space, when STATUS was acked and the config space is
    /// readable.
    pub fn link_up(&self) -> Option<bool> {
        self.config
            .filter(|_| self.acked & F_STATUS != 0)
            .map(|c| c.link_up())
    }

    /// Re-reads the config space (e.g. after a link change).
    pub fn refresh_config(&mut self) -> Result<Option<NetConfigSpace>> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(None);
        }
        let buf = [0u8; CONFIG_LEN];
        let (_, payload) = self
            .frontend
            .get_config(0, CONFIG_LEN_U32, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(vhost_err("GET_CONFIG"))?;
        self.config = Some(NetConfigSpace::parse(&payload));
        Ok(self.config)
    }

    /// The device MAC, when MAC was acked and the config space is readable.
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.config
            .filter(|_| self.acked & F_MAC != 0)
            .map(|c| c.mac)
    }

    /// The device MTU, when MTU was acked and the config space is readable.
    pub fn mtu(&self) -> Option<u16> {
        self.config
            .filter(|_| self.acked & F_MTU != 0)
            .map(|c| c.mtu)
    }

    /// Queue pairs set up (usable with [`Guest::set_queue_pairs`]).
    pub fn queue_pairs(&self) -> u16 {
        u16::try_from(self.rx.len()).unwrap_or(u16::MAX)
    }

    /// Queue pairs currently active (after [`Guest::set_queue_pairs`]).
    pub fn active_queue_pairs(&self) -> u16 {
        self.active_pairs
    }

    /// `max_virtqueue_pairs` of the device as the driver understood it.
    pub fn device_max_queue_pairs(&self) -> u16 {
        self.device_max_pairs
    }

    /// Length of the virtio_net_hdr in use (10 or 12).
    pub fn hdr_len(&self) -> usize {
        self.hdr_len
    }

    /// Bytes per RX buffer in use.
    pub fn rx_buffer_size(&self) -> u32 {
        self.rx.first().map(|q| q.buf_size).unwrap_or(0)
    }

    /// Counters.
    pub fn stats(&self) -> GuestStats {
        self.stats
    }

    /// The configuration this guest was created with.
    pub fn guest_config(&self) -> &GuestConfig {
        &self.cfg
    }

    /// The vhost-user frontend, to send extra (or hostile) requests.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Guest memory (bounds-checked vm-memory access).
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// Allocates `len` zeroed bytes of guest memory (for raw tests).
    pub fn alloc_mem(&mut self, len: u64, align: u64) -> Result<u64> {
        Ok(self.mem.alloc(len, align)?)
    }

    /// Writes arbitrary bytes into guest memory at `gpa`.
    pub fn write_mem(&self, gpa: u64, data: &[u8]) -> Result<()> {
        Ok(self.mem.write(gpa, data)?)
    }

    /// Reads guest memory at `gpa`.
    pub fn read_mem(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        Ok(self.mem.read(gpa, buf)?)
    }

    fn check_pair(&self, qp: u16) -> Result<usize> {
        if usize::from(qp) < self.rx.len() {
            Ok(usize::from(qp))
        } else {
            Err(Error::NoSuchQueuePair(qp))
        }
    }

    // ------------------------------------------------------------------ TX

    /// Sends one frame on queue pair `qp` with offload metadata `hdr`. Waits up to
    /// `io_timeout` for room when the TX queue is full.
    pub fn send(&mut self, qp: u16, hdr: &NetHdr, frame: &[u8]) -> Result<()> {
        let q = self.check_pair(qp)?;
        if frame.len() > MAX_FRAME_LEN {
            return Err(Error::FrameTooLarge {
                len: frame.len(),
                max: MAX_FRAME_LEN,
            });
        }
        let mut hb = [0u8; 12];
        encode_hdr(hdr, 0, &mut hb[..self.hdr_len]);
        let hdr_bytes = &hb[..self.hdr_len];
        let deadline = Instant::now() + self.cfg.io_timeout;
        let t = &mut self.tx[q];
        let need = t.slots_needed(hdr_bytes.len(), frame.len(), self.hdr_separate);
        if need > t.nslots {
            return Err(Error::FrameTooLarge {
                len: frame.len(),
                max: t.nslots * t.slot_size as usize - self.hdr_len,
            });
        }
        loop {
            t.reap(&self.mem)?;
            if t.enqueue(&self.mem, hdr_bytes, frame, self.hdr_separate)? {
                break;
            }
            if !t.vq.wait_used(&self.mem, deadline, &mut self.stats)? {
                return Err(Error::TxFull(qp));
            }
        }
        self.stats.tx_frames += 1;
        t.vq.flush(&self.mem, &mut self.stats)
    }

    /// Zero-allocation batch send for load generation: calls `fill(i, buf)` up to `max`
    /// times; `fill` writes a frame into `buf` (65550 bytes) and returns its header and
    /// length, or `None` to stop. Reaps completed TX chains first, never waits: the batch
    /// stops early when the queue is full. One publish and at most one kick per batch.
    /// Returns the number of frames queued.
    pub fn send_batch<F>(&mut self, qp: u16, max: usize, mut fill: F) -> Result<usize>
    where
        F: FnMut(usize, &mut [u8]) -> Option<(NetHdr, usize)>,
    {
        let q = self.check_pair(qp)?;
        let hlen = self.hdr_len;
        let sep = self.hdr_separate;
        let t = &mut self.tx[q];
        t.reap(&self.mem)?;
        let mut scratch = std::mem::take(&mut t.scratch);
        let mut sent = 0;
        let mut result = Ok(());
        while sent < max {
            let room_descs = if t.indirect.is_some() { 1 } else { t.max_segs };
            if t.free_slots.len() < t.max_segs || usize::from(t.vq.ring.num_free()) < room_descs {
                if let Err(e) = t.reap(&self.mem) {
                    result = Err(e);
                    break;
                }
                if t.free_slots.len() < t.max_segs || usize::from(t.vq.ring.num_free()) < room_descs
                {
                    break;
                }
            }
            let Some((hdr, len)) = fill(sent, &mut scratch) else {
                break;
            };
            let len = len.min(scratch.len());
            let mut hb = [0u8; 12];
            encode_hdr(&hdr, 0, &mut hb[..hlen]);
            match t.enqueue(&self.mem, &hb[..hlen], &scratch[..len], sep) {
                Ok(true) => sent += 1,
                Ok(false) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        t.scratch = scratch;
        result?;
        self.stats.tx_frames += sent as u64;
        if sent > 0 {
            t.vq.flush(&self.mem, &mut self.stats)?;
        }
        Ok(sent)
    }

    /// Frees TX chains the device completed on `qp`; returns how many.
    pub fn reap_tx(&mut self, qp: u16) -> Result<usize> {
        let q = self.check_pair(qp)?;
        self.tx[q].reap(&self.mem)
    }

    /// TX chains handed to the device and not yet completed on `qp`.
    pub fn tx_in_flight(&self, qp: u16) -> Result<usize> {
        let q = self.check_pair(qp)?;
        Ok(self.tx[q].vq.ring.in_flight())
    }

    /// Waits until every TX chain on `qp` has completed, or `timeout` passes. Returns true
    /// when the queue drained.
    pub fn wait_tx_done(&mut self, qp: u16, timeout: Duration) -> Result<bool> {
        let q = self.check_pair(qp)?;
        let deadline = Instant::now() + timeout;
        let t = &mut self.tx[q];
        loop {
            t.reap(&self.mem)?;
            if t.vq.ring.in_flight() == 0 {
                return Ok(true);
            }
            if !t.vq.wait_used(&self.mem, deadline, &mut self.stats)? {
                return Ok(false);
            }
        }
    }

    // ------------------------------------------------------------------ RX

    /// Receives one frame from queue pair `qp`, waiting up to `timeout`. `Ok(None)` on timeout.
    pub fn recv(&mut self, qp: u16, timeout: Duration) -> Result<Option<Received>> {
        self.recv_inner(qp, timeout, |hdr, nb, frame| Received {
            hdr: *hdr,
            num_buffers: nb,
            frame: frame.to_vec(),
        })
    }

    /// Zero-allocation receive: waits up to `timeout` for one frame and hands its header and
    /// bytes to `f`. `Ok(None)` on timeout.
    pub fn recv_with<R>(
        &mut self,
        qp: u16,
        timeout: Duration,
        f: impl FnOnce(&NetHdr, &[u8]) -> R,
    ) -> Result<Option<R>> {
        self.recv_inner(qp, timeout, |h, _, b| f(h, b))
    }

    /// Non-blocking: hands up to `max` frames already received on `qp` to `f`, reposts their
    /// buffers with one publish and at most one kick. Returns the number of frames.
    pub fn drain_with(
        &mut self,
        qp: u16,
        max: usize,
        mut f: impl FnMut(&NetHdr, &[u8]),
    ) -> Result<usize> {
        let q = self.check_pair(qp)?;
        let hlen = self.hdr_len;
        let mrg = self.acked & F_MRG_RXBUF != 0;
        let r = &mut self.rx[q];
        let mut n = 0;
        while n < max {
            match r.try_frame(&self.mem, hlen, mrg) {
                Ok(Some((hdr, _, len))) => {
                    f(&hdr, &r.scratch[..len]);
                    n += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    r.vq.flush(&self.mem, &mut self.stats)?;
                    return Err(e);
                }
            }
        }
        self.stats.rx_frames += n as u64;
        r.vq.flush(&self.mem, &mut self.stats)?;
        Ok(n)
    }

    fn recv_inner<R>(
        &mut self,
        qp: u16,
        timeout: Duration,
        f: impl FnOnce(&NetHdr, u16, &[u8]) -> R,
    ) -> Result<Option<R>> {
        let q = self.check_pair(qp)?;
        let hlen = self.hdr_len;
        let mrg = self.acked & F_MRG_RXBUF != 0;
        let deadline = Instant::now() + timeout;
        let r = &mut self.rx[q];
        loop {
            let got = r.try_frame(&self.mem, hlen, mrg);
            // Reposted buffers go out now (even after a device error), so the device is never
            // starved while we wait.
            r.vq.flush(&self.mem, &mut self.stats)?;
            let got = got?;
            if let Some((hdr, nb, len)) = got {
                self.stats.rx_frames += 1;
                return Ok(Some(f(&hdr, nb, &r.scratch[..len])));
            }
            if !r.vq.wait_used(&self.mem, deadline, &mut self.stats)? {
                return Ok(None);
            }
        }
    }

    // ------------------------------------------------------------------ control

    /// Sends a control-queue command and returns the device's ack byte (`CTRL_OK` = 0).
    pub fn ctrl(&mut self, class: u8, cmd: u8, data: &[u8]) -> Result<u8> {
        let timeout = self.cfg.io_timeout;
        let c = self
            .ctrl
            .as_mut()
            .ok_or(Error::NotNegotiated("VIRTIO_NET_F_CTRL_VQ"))?;
        if data.len() as u64 > CTRL_BUF_LEN - 16 {
            return Err(Error::FrameTooLarge {
                len: data.len(),
                max: (CTRL_BUF_LEN - 16) as usize,
            });
        }
        // Layout of the buffer: [class, cmd] | data | ack.
        let data_at = c.buf + 8;
        let ack_at = c.buf + CTRL_BUF_LEN - 8;
        self.mem.write(c.buf, &[class, cmd])?;
        self.mem.write(data_at, data)?;
        self.mem.write(ack_at, &[0xff])?;
        let mut segs = [
            Seg {
                addr: c.buf,
                len: 2,
                write: false,
            },
            Seg {
                addr: data_at,
                len: data.len() as u32,
                write: false,
            },
            Seg {
                addr: ack_at,
                len: 1,
                write: true,
            },
        ];
        let segs: &[Seg] = if data.is_empty() {
            segs[1] = segs[2];
            &segs[..2]
        } else {
            &segs
        };
        // Leftovers from an earlier timed-out command.
        while c.vq.ring.pop_used(&self.mem)?.is_some() {}
        let head = c.vq.ring.add(&self.mem, segs, 0)?;
        c.vq.flush(&self.mem, &mut self.stats)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(u) = c.vq.ring.pop_used(&self.mem)? {
                if u.id == u32::from(head) {
                    let mut ack = [0u8; 1];
                    self.mem.read(ack_at, &mut ack)?;
                    return Ok(ack[0]);
                }
                continue;
            }
            if !c.vq.wait_used(&self.mem, deadline, &mut self.stats)? {
                return Err(Error::CtrlTimeout { class, cmd });
            }
        }
    }

    fn ctrl_ok(&mut self, class: u8, cmd: u8, data: &[u8]) -> Result<()> {
        match self.ctrl(class, cmd, data)? {
            CTRL_OK => Ok(()),
            ack => Err(Error::CtrlRejected { class, cmd, ack }),
        }
    }

    /// Sets the number of active queue pairs: `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`, then
    /// `SET_VRING_ENABLE` on (and off beyond) the pairs. `n` must not exceed
    /// [`Guest::queue_pairs`].
    pub fn set_queue_pairs(&mut self, n: u16) -> Result<()> {
        if self.acked & F_MQ == 0 {
            return Err(Error::NotNegotiated("VIRTIO_NET_F_MQ"));
        }
        if n == 0 || n > self.queue_pairs() {
            return Err(Error::NoSuchQueuePair(n));
        }
        self.ctrl_ok(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &n.to_le_bytes())?;
        for p in 0..self.queue_pairs() {
            let on = p < n;
            for i in [2 * p, 2 * p + 1] {
                self.frontend
                    .set_vring_enable(usize::from(i), on)
                    .map_err(vhost_err("SET_VRING_ENABLE"))?;
            }
        }
        self.active_pairs = n;
        Ok(())
    }

    /// `VIRTIO_NET_CTRL_RX_PROMISC`.
    pub fn set_promisc(&mut self, on: bool) -> Result<()> {
        self.ctrl_ok(CTRL_RX, CTRL_RX_PROMISC, &[u8::from(on)])
    }

    /// `VIRTIO_NET_CTRL_RX_ALLMULTI`.
    pub fn set_allmulti(&mut self, on: bool) -> Result<()> {
        self.ctrl_ok(CTRL_RX, CTRL_RX_ALLMULTI, &[u8::from(on)])
    }

    /// `VIRTIO_NET_CTRL_MAC_TABLE_SET` with unicast and multicast filter tables.
    pub fn set_mac_table(&mut self, uc: &[[u8; 6]], mc: &[[u8; 6]]) -> Result<()> {
        let mut data = Vec::with_capacity(8 + 6 * (uc.len() + mc.len()));
        for table in [uc, mc] {
            data.extend_from_slice(&(table.len() as u32).to_le_bytes());
            for mac in table {
                data.extend_from_slice(mac);
            }
        }
        self.ctrl_ok(CTRL_MAC, CTRL_MAC_TABLE_SET, &data)
    }

    /// `VIRTIO_NET_CTRL_MAC_ADDR_SET`.
    pub fn set_mac(&mut self, mac: [u8; 6]) -> Result<()> {
        self.ctrl_ok(CTRL_MAC, CTRL_MAC_ADDR_SET, &mac)
    }

    // ------------------------------------------------------------------ raw

    /// Virtqueue indices in use: RX of pair `p` is `2p`, TX `2p + 1`, then the control queue.
    pub fn queue_indices(&self) -> Vec<u16> {
        let mut v: Vec<u16> = self
            .rx
            .iter()
            .zip(&self.tx)
            .flat_map(|(r, t)| [r.vq.index, t.vq.index])
            .collect();
        v.extend(self.ctrl.as_ref().map(|c| c.vq.index));
        v
    }

    /// The raw, hostile interface to virtqueue `index` (see [`RawQueue`]).
    pub fn raw_queue(&mut self, index: u16) -> Result<RawQueue<'_>> {
        let pair = usize::from(index / 2);
        let vq = if let Some(c) = self.ctrl.as_mut().filter(|c| c.vq.index == index) {
            &mut c.vq
        } else if pair < self.rx.len() && index % 2 == 0 {
            &mut self.rx[pair].vq
        } else if pair < self.tx.len() {
            &mut self.tx[pair].vq
        } else {
            return Err(Error::NoSuchQueue(index));
        };
        Ok(RawQueue {
            mem: &self.mem,
            vq,
            stats: &mut self.stats,
        })
    }

    /// Disconnects: closes the vhost-user socket (the backend sees EOF) and unmaps memory.
    pub fn disconnect(self) {
        drop(self)
    }
}

impl TxQueue {
    #[allow(clippy::too_many_arguments)]
    fn new(
        mem: &mut GuestMem,
        index: u16,
        qs: u16,
        event_idx: bool,
        slot_size: u32,
        hdr_len: usize,
        hdr_separate: bool,
        indirect: bool,
    ) -> Result<Self> {
        let vq = Vq::new(mem, index, qs, event_idx)?;
        let max_segs =
            (MAX_FRAME_LEN + hdr_len).div_ceil(slot_size as usize) + usize::from(hdr_separate);
        if max_segs > MAX_TX_SEGS {
            return Err(Error::InvalidConfig("tx_buffer_size too small"));
        }
        let slots = mem.alloc(u64::from(qs) * u64::from(slot_size), 64)?;
        let indirect = if indirect {
            Some(mem.alloc(u64::from(qs) * max_segs as u64 * ring::DESC_SIZE, 16)?)
        } else {
            None
        };
        Ok(TxQueue {
            vq,
            slots,
            slot_size,
            nslots: usize::from(qs),
            free_slots: (0..qs).rev().collect(),
            chain_slots: vec![0; usize::from(qs) * max_segs],
            chain_nslots: vec![0; usize::from(qs)],
            indirect,
            max_segs,
            scratch: vec![0; MAX_FRAME_LEN],
            segs: Vec::with_capacity(MAX_TX_SEGS),
            used_slots: Vec::with_capacity(MAX_TX_SEGS),
        })
    }

    fn slots_needed(&self, hlen: usize, len: usize, separate: bool) -> usize {
        let slot = self.slot_size as usize;
        if separate {
            1 + len.div_ceil(slot).max(1)
        } else {
            (hlen + len).div_ceil(slot)
        }
    }

    /// Frees completed chains and their slots.
    fn reap(&mut self, mem: &GuestMem) -> Result<usize> {
        let mut n = 0;
        while let Some(u) = self.vq.ring.pop_used(mem)? {
            if u.token == Some(TX_TOKEN) {
                let h = u.id as usize;
                let k = usize::from(self.chain_nslots[h]);
                let base = h * self.max_segs;
                self.free_slots
                    .extend_from_slice(&self.chain_slots[base..base + k]);
                self.chain_nslots[h] = 0;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Copies `hdr ++ frame` into free slots and adds the chain. `Ok(false)` when there is no
    /// room.
    fn enqueue(
        &mut self,
        mem: &GuestMem,
        hdr: &[u8],
        frame: &[u8],
        separate: bool,
    ) -> Result<bool> {
        let nseg = self.slots_needed(hdr.len(), frame.len(), separate);
        let indirect = self.indirect.filter(|_| nseg > 1);
        let need_descs = if indirect.is_some() { 1 } else { nseg };
        if self.free_slots.len() < nseg || usize::from(self.vq.ring.num_free()) < need_descs {
            return Ok(false);
        }
        let mut segs = std::mem::take(&mut self.segs);
        let mut used_slots = std::mem::take(&mut self.used_slots);
        segs.clear();
        used_slots.clear();
        let r = self.enqueue_segs(mem, hdr, frame, separate, nseg, &mut segs, &mut used_slots);
        self.segs = segs;
        self.used_slots = used_slots;
        r
    }

    /// The body of [`TxQueue::enqueue`] once there is room, with its (empty) scratch lists.
    #[allow(clippy::too_many_arguments)]
    fn enqueue_segs(
        &mut self,
        mem: &GuestMem,
        hdr: &[u8],
        frame: &[u8],
        separate: bool,
        nseg: usize,
        segs: &mut Vec<Seg>,
        used_slots: &mut Vec<u16>,
    ) -> Result<bool> {
        let indirect = self.indirect.filter(|_| nseg > 1);
        let slot = self.slot_size as usize;
        let total = hdr.len() + frame.len();
        for k in 0..nseg {
            let s = self.free_slots.pop().unwrap_or_default();
            used_slots.push(s);
            let addr = self.slots + u64::from(s) * u64::from(self.slot_size);
            let (len, res) = if separate {
                if k == 0 {
                    (hdr.len(), mem.write(addr, hdr))
                } else {
                    let from = (k - 1) * slot;
                    let to = (from + slot).min(frame.len());
                    (to - from, mem.write(addr, &frame[from..to]))
                }
            } else {
                // Stream bytes [from, to) of hdr ++ frame.
                let from = k * slot;
                let to = (from + slot).min(total);
                let mut res = Ok(());
                if from < hdr.len() {
                    res = mem.write(addr, &hdr[from..hdr.len().min(to)]);
                }
                let f0 = from.max(hdr.len()) - hdr.len();
                let f1 = to - hdr.len();
                if res.is_ok() && f1 > f0 {
                    let off = (from.max(hdr.len()) - from) as u64;
                    res = mem.write(addr + off, &frame[f0..f1]);
                }
                (to - from, res)
            };
            if let Err(e) = res {
                self.free_slots.extend_from_slice(&used_slots[..=k]);
                return Err(e.into());
            }
            // len <= slot_size, a u32.
            segs.push(Seg {
                addr,
                len: len as u32,
                write: false,
            });
        }
        let added = match indirect {
            Some(base) => {
                let head = self.vq.ring.peek_free_head().unwrap_or(0);
                let table = base + u64::from(head) * self.max_segs as u64 * ring::DESC_SIZE;
                self.vq
                    .ring
                    .add_indirect(mem, table, &segs[..nseg], TX_TOKEN)
            }
            None => self.vq.ring.add(mem, &segs[..nseg], TX_TOKEN),
        };
        let head = match added {
            Ok(h) => usize::from(h),
            Err(e) => {
                self.free_slots.extend_from_slice(&used_slots[..nseg]);
                return Err(e.into());
            }
        };
        let base = head * self.max_segs;
        self.chain_slots[base..base + nseg].copy_from_slice(&used_slots[..nseg]);
        // nseg <= MAX_TX_SEGS.
        self.chain_nslots[head] = nseg as u16;
        Ok(true)
    }
}

impl RxQueue {
    /// Allocates the ring and `qs` buffers of `buf_size` bytes, and posts `nposts` of them
    /// (published, not kicked).
    fn new(
        mem: &mut GuestMem,
        index: u16,
        qs: u16,
        event_idx: bool,
        buf_size: u32,
        nposts: u16,
    ) -> Result<Self> {
        let vq = Vq::new(mem, index, qs, event_idx)?;
        let bufs = mem.alloc(u64::from(qs) * u64::from(buf_size), 64)?;
        let mut q = RxQueue {
            vq,
            bufs,
            buf_size,
            scratch: vec![0; MAX_FRAME_LEN.max(buf_size as usize)],
            partial: None,
        };
        for i in 0..nposts.min(qs) {
            q.vq.ring.add(
                mem,
                &[Seg {
                    addr: q.buf_addr(u64::from(i)),
                    len: buf_size,
                    write: true,
                }],
                u64::from(i),
            )?;
        }
        q.vq.ring.publish(mem)?;
        Ok(q)
    }

    fn buf_addr(&self, buf: u64) -> u64 {
        self.bufs + buf * u64::from(self.buf_size)
    }

    /// Takes one complete frame from the used ring into `scratch`, reposting its buffers
    /// (added to the avail ring, not published). Returns (hdr, num_buffers, frame length).
    fn try_frame(
        &mut self,
        mem: &GuestMem,
        hlen: usize,
        mrg: bool,
    ) -> Result<Option<(NetHdr, u16, usize)>> {
        loop {
            let Some(u) = self.vq.ring.pop_used(mem)? else {
                return Ok(None);
            };
            let Some(buf) = u.token.filter(|&t| t != RAW_TOKEN) else {
                if u.token.is_none() {
                    return Err(self.bug("used id is not an in-flight RX buffer", u));
                }
                // A raw chain: the raw interface reports it; skip it here.
                continue;
            };
            let addr = self.buf_addr(buf);
            // Repost first: whatever happens below, the buffer goes back to the device.
            self.vq.ring.add(
                mem,
                &[Seg {
                    addr,
                    len: self.buf_size,
                    write: true,
                }],
                buf,
            )?;
            if u.len > self.buf_size {
                self.partial = None;
                return Err(self.bug("used len exceeds the buffer", u));
            }
            let len = u.len as usize;
            let mut p = match self.partial.take() {
                Some(p) => p,
                None => {
                    if len < hlen {
                        return Err(self.bug("used len shorter than virtio_net_hdr", u));
                    }
                    let mut hb = [0u8; 12];
                    if hlen == hb.len() {
                        hb = mem.read_array(addr)?;
                    } else {
                        mem.read(addr, &mut hb[..hlen])?;
                    }
                    let (hdr, nb) = decode_hdr(&hb[..hlen]);
                    let nb = if mrg { nb } else { 1 };
                    if nb == 0 {
                        return Err(self.bug("num_buffers is 0", u));
                    }
                    let data = len - hlen;
                    if data > self.scratch.len() {
                        return Err(self.bug("frame exceeds the reassembly buffer", u));
                    }
                    mem.read(addr + hlen as u64, &mut self.scratch[..data])?;
                    Partial {
                        hdr,
                        num_buffers: nb,
                        remaining: nb,
                        filled: data,
                    }
                }
            };
            if p.remaining != p.num_buffers {
                // A continuation buffer: all data.
                let end = p.filled + len;
                if end > self.scratch.len() {
                    return Err(self.bug("frame exceeds the reassembly buffer", u));
                }
                mem.read(addr, &mut self.scratch[p.filled..end])?;
                p.filled = end;
            }
            p.remaining -= 1;
            if p.remaining == 0 {
                return Ok(Some((p.hdr, p.num_buffers, p.filled)));
            }
            self.partial = Some(p);
        }
    }

    fn bug(&self, what: &'static str, u: UsedElem) -> Error {
        Error::Device {
            queue: self.vq.index,
            what,
            id: u.id,
            len: u.len,
        }
    }
}

/// Raw access to one virtqueue, for tests of a misbehaving guest.
///
/// Everything here bypasses the driver's safety nets: descriptors are written as given
/// (addresses need not be inside guest memory, `next` may loop, flags may be nonsense), the
/// avail index can be set to any value, and the kick is unconditional. Chains pushed here are
/// tracked as in flight, so their descriptors return to the free list when the device marks
/// them used; [`RawQueue::used_entries`] reports every used entry it consumes, known or not.
///
/// Mixing raw use with [`Guest::send`]/[`Guest::recv`] on the same queue is allowed but the
/// normal path skips raw chains it finds in the used ring (RX) or ignores them (TX). On RX
/// queues, set [`GuestConfig::rx_buffers`] to leave free descriptors for raw chains.
///
/// ```no_run
/// # use virtnet_guest::{Guest, GuestConfig, RawDesc};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut g = Guest::connect("/tmp/vm0.sock", GuestConfig::default())?;
/// let mut txq = g.raw_queue(1)?; // TX of pair 0
/// // A descriptor pointing far outside guest memory.
/// let head = txq.push_chain(&[RawDesc::read(1 << 50, 64)])?;
/// txq.publish()?;
/// txq.kick()?;
/// assert!(txq.wait_used(std::time::Duration::from_secs(1))?);
/// let used = txq.used_entries()?;
/// assert_eq!(used[0].id, u32::from(head));
/// # Ok(()) }
/// ```
pub struct RawQueue<'a> {
    mem: &'a GuestMem,
    vq: &'a mut Vq,
    stats: &'a mut GuestStats,
}

impl RawQueue<'_> {
    /// The virtqueue index.
    pub fn index(&self) -> u16 {
        self.vq.index
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.vq.ring.size()
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.vq.ring.num_free()
    }

    /// GPAs of the descriptor table, avail ring and used ring.
    pub fn ring_addrs(&self) -> (u64, u64, u64) {
        (
            self.vq.ring.desc_addr(),
            self.vq.ring.avail_addr(),
            self.vq.ring.used_addr(),
        )
    }

    /// Writes `descs` into free table entries (`next: None` links to the following
    /// descriptor, `VRING_DESC_F_NEXT` is added to all but the last) and puts the head in the
    /// next avail slot. Not visible to the device until [`RawQueue::publish`].
    pub fn push_chain(&mut self, descs: &[RawDesc]) -> Result<u16> {
        let head = self.vq.ring.add_raw(self.mem, descs, RAW_TOKEN)?;
        self.vq.ring.push_avail(self.mem, head)?;
        Ok(head)
    }

    /// Overwrites table entry `index` (modulo the queue size) with `desc` verbatim
    /// (`next: None` writes 0).
    pub fn write_desc(&mut self, index: u16, desc: RawDesc) -> Result<()> {
        Ok(self.vq.ring.write_desc(self.mem, index, &desc)?)
    }

    /// Puts an arbitrary head index (in range or not) into the next avail slot.
    pub fn push_head(&mut self, head: u16) -> Result<()> {
        Ok(self.vq.ring.push_avail(self.mem, head)?)
    }

    /// Publishes the shadow avail index (everything pushed so far).
    pub fn publish(&mut self) -> Result<()> {
        Ok(self.vq.ring.publish(self.mem)?)
    }

    /// Stores an arbitrary avail index, e.g. one far ahead of what was pushed.
    pub fn publish_avail_idx(&mut self, idx: u16) -> Result<()> {
        Ok(self.vq.ring.set_avail_idx(self.mem, idx)?)
    }

    /// The shadow avail index.
    pub fn avail_idx(&self) -> u16 {
        self.vq.ring.avail_idx()
    }

    /// The device's used index.
    pub fn used_idx(&self) -> Result<u16> {
        Ok(self.vq.ring.used_idx(self.mem)?)
    }

    /// Kicks the device unconditionally.
    pub fn kick(&mut self) -> Result<()> {
        self.vq.kick(self.stats)
    }

    /// Waits up to `timeout` for unconsumed used entries.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<bool> {
        self.vq
            .wait_used(self.mem, Instant::now() + timeout, self.stats)
    }

    /// Consumes every pending used entry (freeing chains this driver knows about).
    pub fn used_entries(&mut self) -> Result<Vec<UsedElem>> {
        let mut v = Vec::new();
        while let Some(u) = self.vq.ring.pop_used(self.mem)? {
            v.push(u);
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use assert_matches::assert_matches;

    /// Plays the device side of one ring directly in guest memory.
    struct Dev {
        used: u64,
        avail: u64,
        desc: u64,
        size: u16,
        used_idx: u16,
        last_avail: u16,
    }

    impl Dev {
        fn of(vq: &Vq) -> Dev {
            Dev {
                used: vq.ring.used_addr(),
                avail: vq.ring.avail_addr(),
                desc: vq.ring.desc_addr(),
                size: vq.ring.size(),
                used_idx: 0,
                last_avail: 0,
            }
        }

        /// Pops the next available head; returns its first descriptor's (addr, len, flags).
        fn pop(&mut self, m: &GuestMem) -> (u16, u64, u32, u16) {
            let mut b = [0u8; 2];
            m.read(
                self.avail + 4 + 2 * u64::from(self.last_avail % self.size),
                &mut b,
            )
            .unwrap();
            self.last_avail = self.last_avail.wrapping_add(1);
            let head = u16::from_le_bytes(b);
            let (a, l, f, _) = self.desc_at(m, self.desc, head);
            (head, a, l, f)
        }

        fn desc_at(&self, m: &GuestMem, table: u64, i: u16) -> (u64, u32, u16, u16) {
            let mut d = [0u8; 16];
            m.read(table + 16 * u64::from(i), &mut d).unwrap();
            (
                u64::from_le_bytes(d[0..8].try_into().unwrap()),
                u32::from_le_bytes(d[8..12].try_into().unwrap()),
                u16::from_le_bytes(d[12..14].try_into().unwrap()),
                u16::from_le_bytes(d[14..16].try_into().unwrap()),
            )
        }

        /// Writes a used entry without publishing it.
        fn put(&mut self, m: &GuestMem, id: u16, len: u32) {
            let slot = u64::from(self.used_idx % self.size);
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&u32::from(id).to_le_bytes());
            b[4..].copy_from_slice(&len.to_le_bytes());
            m.write(self.used + 4 + 8 * slot, &b).unwrap();
            self.used_idx = self.used_idx.wrapping_add(1);
        }

        fn publish(&self, m: &GuestMem) {
            m.write(self.used + 2, &self.used_idx.to_le_bytes())
                .unwrap();
        }
    }

    fn rx_setup(buf: u32) -> (GuestMem, RxQueue, Dev) {
        let mut m = GuestMem::new(0, 4 << 20).unwrap();
        let q = RxQueue::new(&mut m, 0, 8, false, buf, 8).unwrap();
        let d = Dev::of(&q.vq);
        (m, q, d)
    }

    /// Device side: writes `data` into the next `n` RX buffers as one mergeable frame.
    fn deliver(m: &GuestMem, d: &mut Dev, hdr: &NetHdr, frame: &[u8], buf: usize) -> u16 {
        let mut all = vec![0u8; 12];
        all.extend_from_slice(frame);
        let chunks: Vec<&[u8]> = all.chunks(buf).collect();
        let n = chunks.len() as u16;
        encode_hdr(hdr, n, &mut all[..12]);
        for c in all.chunks(buf) {
            let (head, addr, len, flags) = d.pop(m);
            assert_eq!(flags, ring::VRING_DESC_F_WRITE);
            assert_eq!(len as usize, buf);
            m.write(addr, c).unwrap();
            d.put(m, head, c.len() as u32);
        }
        n
    }

    #[test]
    fn rx_single_and_mergeable_frames_are_reassembled() {
        let (m, mut q, mut d) = rx_setup(256);
        let h = NetHdr {
            flags: 1,
            csum_start: 34,
            csum_offset: 16,
            ..NetHdr::NONE
        };
        let small: Vec<u8> = (0..60u8).collect();
        deliver(&m, &mut d, &h, &small, 256);
        let big: Vec<u8> = (0..1000).map(|i| (i * 7) as u8).collect();
        // 12 + 1000 bytes in 256-byte buffers.
        assert_eq!(deliver(&m, &mut d, &NetHdr::NONE, &big, 256), 4);
        d.publish(&m);
        let (hdr, nb, len) = q.try_frame(&m, 12, true).unwrap().unwrap();
        assert_eq!((hdr, nb), (h, 1));
        assert_eq!(&q.scratch[..len], &small[..]);
        let (hdr, nb, len) = q.try_frame(&m, 12, true).unwrap().unwrap();
        assert_eq!((hdr, nb), (NetHdr::NONE, 4));
        assert_eq!(&q.scratch[..len], &big[..]);
        assert!(q.try_frame(&m, 12, true).unwrap().is_none());
        // Every buffer went back to the ring.
        assert_eq!(q.vq.ring.num_free(), 0);
        assert_eq!(q.vq.ring.avail_idx(), 8 + 5);
    }

    #[test]
    fn rx_partial_mergeable_frame_waits_for_the_rest() {
        let (m, mut q, mut d) = rx_setup(256);
        let big = vec![0xabu8; 600]; // 3 buffers
        deliver(&m, &mut d, &NetHdr::NONE, &big, 256);
        // Publish only the first two used entries.
        let full = d.used_idx;
        m.write(d.used + 2, &full.wrapping_sub(1).to_le_bytes())
            .unwrap();
        assert!(q.try_frame(&m, 12, true).unwrap().is_none());
        d.publish(&m);
        let (_, nb, len) = q.try_frame(&m, 12, true).unwrap().unwrap();
        assert_eq!((nb, len), (3, 600));
        assert!(q.scratch[..600].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn rx_without_mrg_ignores_num_buffers() {
        let (m, mut q, mut d) = rx_setup(2048);
        let (head, addr, _, _) = d.pop(&m);
        let mut b = vec![0u8; 12 + 100];
        encode_hdr(&NetHdr::NONE, 7, &mut b[..12]);
        m.write(addr, &b).unwrap();
        d.put(&m, head, 112);
        d.publish(&m);
        let (_, nb, len) = q.try_frame(&m, 12, false).unwrap().unwrap();
        assert_eq!((nb, len), (1, 100));
    }

    #[test]
    fn rx_device_bugs_are_errors_and_buffers_survive() {
        let (m, mut q, mut d) = rx_setup(256);
        let (h0, _, _, _) = d.pop(&m);
        d.put(&m, h0, 4); // shorter than the header
        let (h1, _, _, _) = d.pop(&m);
        d.put(&m, h1, 257); // longer than the buffer
                            // Head 7 was posted but never popped by this device: the driver cannot tell, and
                            // takes it as a frame.
        let mut b7 = [0u8; 20];
        encode_hdr(&NetHdr::NONE, 1, &mut b7[..12]);
        m.write(q.buf_addr(7), &b7).unwrap();
        d.put(&m, 7, 20);
        d.put(&m, 999, 20); // out of range
        let (h2, addr, _, _) = d.pop(&m);
        let mut b = [0u8; 12];
        encode_hdr(&NetHdr::NONE, 0, &mut b); // num_buffers 0
        m.write(addr, &b).unwrap();
        d.put(&m, h2, 12);
        d.publish(&m);
        assert_matches!(
            q.try_frame(&m, 12, true),
            Err(Error::Device { what, .. }) if what.contains("shorter")
        );
        assert_matches!(
            q.try_frame(&m, 12, true),
            Err(Error::Device { what, .. }) if what.contains("exceeds")
        );
        let r = q.try_frame(&m, 12, true);
        assert_matches!(r, Ok(Some((_, 1, 8))));
        assert_matches!(
            q.try_frame(&m, 12, true),
            Err(Error::Device { id: 999, .. })
        );
        assert_matches!(
            q.try_frame(&m, 12, true),
            Err(Error::Device { what, .. }) if what.contains("num_buffers")
        );
        assert!(q.try_frame(&m, 12, true).unwrap().is_none());
        // All 8 buffers are posted again.
        assert_eq!(q.vq.ring.num_free(), 0);
    }

    fn tx_setup(indirect: bool, separate: bool) -> (GuestMem, TxQueue, Dev) {
        let mut m = GuestMem::new(0, 4 << 20).unwrap();
        let q = TxQueue::new(&mut m, 1, 16, false, 2048, 12, separate, indirect).unwrap();
        let d = Dev::of(&q.vq);
        (m, q, d)
    }

    /// Device side: pops a TX chain (direct or indirect) and returns its buffers' bytes.
    fn read_chain(m: &GuestMem, d: &mut Dev) -> (u16, Vec<Vec<u8>>) {
        let (head, addr, len, flags) = d.pop(m);
        let mut out = Vec::new();
        let (table, mut i) = if flags & ring::VRING_DESC_F_INDIRECT != 0 {
            (addr, 0)
        } else {
            (d.desc, head)
        };
        loop {
            let (a, l, f, n) = d.desc_at(m, table, i);
            assert_eq!(f & ring::VRING_DESC_F_WRITE, 0);
            let mut b = vec![0u8; l as usize];
            m.read(a, &mut b).unwrap();
            out.push(b);
            if f & ring::VRING_DESC_F_NEXT == 0 {
                break;
            }
            i = n;
        }
        if flags & ring::VRING_DESC_F_INDIRECT != 0 {
            assert_eq!(len as usize, 16 * out.len());
        }
        (head, out)
    }

    #[test]
    fn tx_layouts_direct_indirect_and_separate_header() {
        let frame: Vec<u8> = (0..5000).map(|i| (i % 251) as u8).collect();
        let hdr = [9u8; 12];
        for (indirect, separate, lens) in [
            (false, false, vec![2048, 2048, 916]),
            (true, false, vec![2048, 2048, 916]),
            (false, true, vec![12, 2048, 2048, 904]),
            (true, true, vec![12, 2048, 2048, 904]),
        ] {
            let (m, mut q, mut d) = tx_setup(indirect, separate);
            assert!(q.enqueue(&m, &hdr, &frame, separate).unwrap());
            q.vq.ring.publish(&m).unwrap();
            let used_descs = 16 - q.vq.ring.num_free();
            assert_eq!(used_descs, if indirect { 1 } else { lens.len() as u16 });
            assert_eq!(q.free_slots.len(), 16 - lens.len());
            let (head, bufs) = read_chain(&m, &mut d);
            assert_eq!(bufs.iter().map(Vec::len).collect::<Vec<_>>(), lens);
            let all: Vec<u8> = bufs.concat();
            assert_eq!(&all[..12], &hdr);
            assert_eq!(&all[12..], &frame[..]);
            d.put(&m, head, 0);
            d.publish(&m);
            assert_eq!(q.reap(&m).unwrap(), 1);
            assert_eq!(q.free_slots.len(), 16);
            assert_eq!(q.vq.ring.num_free(), 16);
        }
    }

    #[test]
    fn tx_full_queue_reports_no_room_then_recovers() {
        let (m, mut q, mut d) = tx_setup(false, false);
        let f = [1u8; 3000]; // 2 slots each
        for _ in 0..8 {
            assert!(q.enqueue(&m, &[0; 12], &f, false).unwrap());
        }
        assert!(!q.enqueue(&m, &[0; 12], &f, false).unwrap());
        q.vq.ring.publish(&m).unwrap();
        let (head, _) = read_chain(&m, &mut d);
        d.put(&m, head, 0);
        d.publish(&m);
        q.reap(&m).unwrap();
        assert!(q.enqueue(&m, &[0; 12], &f, false).unwrap());
        assert_eq!(q.vq.ring.in_flight(), 8);
    }

    #[test]
    fn config_validation() {
        assert!(GuestConfig::default().validate().is_ok());
        let bad = [
            GuestConfig {
                queue_size: 0,
                ..Default::default()
            },
            GuestConfig {
                queue_size: 48,
                ..Default::default()
            },
            GuestConfig {
                queue_pairs: 0,
                ..Default::default()
            },
            GuestConfig {
                tx_buffer_size: 1000,
                ..Default::default()
            },
            GuestConfig {
                rx_buffer_size: 10,
                ..Default::default()
            },
            GuestConfig {
                mem_size: 4095,
                ..Default::default()
            },
            GuestConfig {
                rx_buffers: Some(257),
                ..Default::default()
            },
        ];
        for c in bad {
            assert_matches!(c.validate(), Err(Error::InvalidConfig(_)), "{c:?}");
        }
    }

    #[test]
    fn wait_used_times_out_and_wakes_on_call() {
        let mut m = GuestMem::new(0, 1 << 20).unwrap();
        let mut vq = Vq::new(&mut m, 0, 8, true).unwrap();
        let mut st = GuestStats::default();
        let t = Instant::now();
        assert!(!vq
            .wait_used(&m, t + Duration::from_millis(50), &mut st)
            .unwrap());
        assert!(t.elapsed() >= Duration::from_millis(50));
        // Notifications are off again after the wait.
        let mut b = [0u8; 2];
        m.read(vq.ring.avail_addr(), &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), ring::VRING_AVAIL_F_NO_INTERRUPT);
        // A used entry is seen without sleeping.
        vq.ring
            .add(
                &m,
                &[Seg {
                    addr: 0,
                    len: 1,
                    write: false,
                }],
                0,
            )
            .unwrap();
        let mut d = Dev::of(&vq);
        d.put(&m, 0, 0);
        d.publish(&m);
        vq.call.write(1).unwrap();
        assert!(vq
            .wait_used(&m, Instant::now() + Duration::from_secs(5), &mut st)
            .unwrap());
    }
}
