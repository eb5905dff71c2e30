//! [`ServicesPort`]: the services as a port on the switch, with a bounded queue and a thread.
//!
//! ```text
//!   Queue (preallocated, `queue_len` slots of SLOT_SIZE bytes)
//!   ┌──────┬──────┬──────┬──────┐   deliver(): copy in at (head + len) % n, len += 1
//!   │ slot │ slot │ slot │ slot │   worker:    copy out at head, head += 1, len -= 1
//!   └──────┴──────┴──────┴──────┘   full: the frame is dropped (NoRxBuffers) and counted
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dhcproto::v4::Message;
use ipnet::Ipv6Net;
use thiserror::Error;
use virtnet_switch::{
    DropReason, Frame, MacAddr, NetHdr, PortConfig, PortId, PortSink, SliceFrame, Switch,
};

use crate::dhcp::{self, DhcpConfig, DhcpCounters, DhcpError, DhcpServer, Lease, ReplyDst};
use crate::wire::{self, Packet, RaFields};

/// Largest frame the services accept (they answer small control packets only).
pub const SLOT_SIZE: usize = 1600;
/// Default queue length.
pub const DEFAULT_QUEUE_LEN: usize = 64;
/// How often the services thread does housekeeping.
pub const TICK: Duration = Duration::from_secs(1);

/// Errors of starting the services.
#[derive(Debug, Error)]
pub enum ServicesError {
    /// The DHCP server cannot start (configuration, lease file).
    #[error("DHCP server cannot start")]
    Dhcp(#[source] DhcpError),
    /// The IPv6 prefix cannot be used for SLAAC.
    #[error("IPv6 prefix {0} must be a /64 for SLAAC")]
    BadPrefix(Ipv6Net),
    /// The queue length is zero.
    #[error("Queue length must be at least 1")]
    ZeroQueue,
    /// The thread cannot be spawned.
    #[error("Cannot spawn the services thread")]
    Thread(#[source] std::io::Error),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, ServicesError>;

/// IPv6 router advertisements for SLAAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaConfig {
    /// The /64 prefix guests autoconfigure from.
    pub prefix: Ipv6Net,
    /// Router lifetime (s); 0 means "not a default router" (host-only, internal).
    pub router_lifetime: u16,
    /// Seconds between unsolicited advertisements.
    pub interval_secs: u64,
    /// MTU option.
    pub mtu: Option<u32>,
}

/// What the services are and offer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicesConfig {
    /// Port name on the switch.
    pub name: String,
    /// The services' MAC.
    pub mac: MacAddr,
    /// The services' IPv4 address (ARP, ICMP echo, DHCP server id).
    pub ip: Ipv4Addr,
    /// Access VLAN of the port.
    pub vlan: Option<u16>,
    /// DHCP server, if enabled.
    pub dhcp: Option<DhcpConfig>,
    /// Router advertisements, if enabled.
    pub ra: Option<RaConfig>,
    /// Frames that may wait for the services thread.
    pub queue_len: usize,
}

impl ServicesConfig {
    /// Services at `ip` with MAC `mac`, no DHCP, no RA.
    pub fn new(name: impl Into<String>, mac: MacAddr, ip: Ipv4Addr) -> Self {
        ServicesConfig {
            name: name.into(),
            mac,
            ip,
            vlan: None,
            dhcp: None,
            ra: None,
            queue_len: DEFAULT_QUEUE_LEN,
        }
    }
}

/// Counters of the services.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServicesStats {
    /// Frames queued for the services thread.
    pub queued: u64,
    /// Frames dropped because the queue was full.
    pub queue_full: u64,
    /// Frames for the services that were too long or did not parse.
    pub malformed: u64,
    /// ARP replies sent.
    pub arp_replies: u64,
    /// ICMP echo replies sent.
    pub echo_replies: u64,
    /// Router advertisements sent.
    pub router_advertisements: u64,
    /// DHCP requests whose sender MAC was not on any switch port.
    pub unknown_port: u64,
    /// The DHCP server's counters.
    pub dhcp: DhcpCounters,
}

struct Slot {
    len: usize,
    buf: Box<[u8]>,
}

struct Queue {
    slots: Vec<Slot>,
    head: usize,
    len: usize,
}

#[derive(Default)]
struct Counters {
    queued: AtomicU64,
    queue_full: AtomicU64,
    malformed: AtomicU64,
    arp: AtomicU64,
    echo: AtomicU64,
    ra: AtomicU64,
    unknown_port: AtomicU64,
}

struct Shared {
    mac: MacAddr,
    ip: Ipv4Addr,
    ipv6: bool,
    queue: Mutex<Queue>,
    cv: Condvar,
    stop: AtomicBool,
    counters: Counters,
    dhcp: Mutex<(DhcpCounters, Vec<Lease>)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The receiving side: runs on the sender's thread; parses headers and queues.
struct ServicesSink {
    shared: Arc<Shared>,
}

impl PortSink for ServicesSink {
    fn deliver(&self, frame: &dyn Frame, _hdr: &NetHdr) -> std::result::Result<(), DropReason> {
        let s = &self.shared;
        let mut head = [0u8; 128];
        let n = frame.read_at(0, &mut head);
        if !wire::is_for_services(&head[..n], s.mac, s.ip, s.ipv6) {
            return Ok(());
        }
        let len = frame.len();
        if len > SLOT_SIZE {
            s.counters.malformed.fetch_add(1, Relaxed);
            return Err(DropReason::FrameTooLong);
        }
        let mut q = lock(&s.queue);
        let cap = q.slots.len();
        if q.len == cap {
            drop(q);
            s.counters.queue_full.fetch_add(1, Relaxed);
            return Err(DropReason::NoRxBuffers);
        }
        let i = (q.head + q.len) % cap;
        let slot = &mut q.slots[i];
        slot.len = frame.read_at(0, &mut slot.buf[..len]);
        q.len += 1;
        drop(q);
        s.counters.queued.fetch_add(1, Relaxed);
        s.cv.notify_one();
        Ok(())
    }
}

/// The services running as a port of a switch.
pub struct ServicesPort {
    switch: Arc<Switch>,
    port: PortId,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ServicesPort {
    /// Add the services to `switch` and start their thread.
    pub fn start(switch: Arc<Switch>, config: ServicesConfig) -> Result<ServicesPort> {
        if config.queue_len == 0 {
            return Err(ServicesError::ZeroQueue);
        }
        if let Some(ra) = &config.ra {
            if ra.prefix.prefix_len() != 64 {
                return Err(ServicesError::BadPrefix(ra.prefix));
            }
        }
        let dhcp = match &config.dhcp {
            Some(c) => Some(DhcpServer::new(c.clone(), unix_now()).map_err(ServicesError::Dhcp)?),
            None => None,
        };
        let slots = (0..config.queue_len)
            .map(|_| Slot {
                len: 0,
                buf: vec![0u8; SLOT_SIZE].into_boxed_slice(),
            })
            .collect();
        let leases = dhcp.as_ref().map(|d| d.leases()).unwrap_or_default();
        let shared = Arc::new(Shared {
            mac: config.mac,
            ip: config.ip,
            ipv6: config.ra.is_some(),
            queue: Mutex::new(Queue {
                slots,
                head: 0,
                len: 0,
            }),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            dhcp: Mutex::new((DhcpCounters::default(), leases)),
        });
        let port = switch.add_port(
            PortConfig {
                name: config.name.clone(),
                vlan: config.vlan,
            },
            Arc::new(ServicesSink {
                shared: shared.clone(),
            }),
        );
        let mut worker = Worker {
            switch: switch.clone(),
            port,
            shared: shared.clone(),
            vlan: config.vlan,
            dhcp,
            ra: config.ra.clone(),
            out: Vec::with_capacity(SLOT_SIZE),
            enc: Vec::with_capacity(SLOT_SIZE),
        };
        let thread = std::thread::Builder::new()
            .name(format!("services-{}", config.name))
            .spawn(move || worker.run());
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                switch.remove_port(port);
                return Err(ServicesError::Thread(e));
            }
        };
        tracing::info!(
            "services {}: {} at {} (port {}){}{}",
            config.name,
            config.mac,
            config.ip,
            port.0,
            if config.dhcp.is_some() { ", DHCP" } else { "" },
            if config.ra.is_some() { ", RA" } else { "" }
        );
        Ok(ServicesPort {
            switch,
            port,
            shared,
            thread: Some(thread),
        })
    }

    /// The services' IPv4 address.
    pub fn ip(&self) -> Ipv4Addr {
        self.shared.ip
    }

    /// The services' MAC.
    pub fn mac(&self) -> MacAddr {
        self.shared.mac
    }

    /// The services' port on the switch.
    pub fn port_id(&self) -> PortId {
        self.port
    }

    /// Counters.
    pub fn stats(&self) -> ServicesStats {
        let c = &self.shared.counters;
        ServicesStats {
            queued: c.queued.load(Relaxed),
            queue_full: c.queue_full.load(Relaxed),
            malformed: c.malformed.load(Relaxed),
            arp_replies: c.arp.load(Relaxed),
            echo_replies: c.echo.load(Relaxed),
            router_advertisements: c.ra.load(Relaxed),
            unknown_port: c.unknown_port.load(Relaxed),
            dhcp: lock(&self.shared.dhcp).0,
        }
    }

    /// The DHCP leases (as of the last DHCP message handled).
    pub fn leases(&self) -> Vec<Lease> {
        lock(&self.shared.dhcp).1.clone()
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Relaxed);
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
            self.switch.remove_port(self.port);
        }
    }

    /// Stop the thread and leave the switch.
    pub fn shutdown(mut self) {
        self.stop();
    }
}

impl Drop for ServicesPort {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Worker {
    switch: Arc<Switch>,
    port: PortId,
    shared: Arc<Shared>,
    vlan: Option<u16>,
    dhcp: Option<DhcpServer>,
    ra: Option<RaConfig>,
    out: Vec<u8>,
    enc: Vec<u8>,
}

impl Worker {
    fn run(&mut self) {
        let mut frame = vec![0u8; SLOT_SIZE];
        let mut batch = self.switch.new_batch();
        let mut next_tick = Instant::now();
        let mut next_ra = Instant::now();
        loop {
            let len = {
                let mut q = lock(&self.shared.queue);
                while q.len == 0 && !self.shared.stop.load(Relaxed) {
                    let wait = next_tick.saturating_duration_since(Instant::now());
                    if wait.is_zero() {
                        break;
                    }
                    q = self
                        .shared
                        .cv
                        .wait_timeout(q, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                if self.shared.stop.load(Relaxed) {
                    return;
                }
                if q.len > 0 {
                    let h = q.head;
                    let n = q.slots[h].len;
                    frame[..n].copy_from_slice(&q.slots[h].buf[..n]);
                    q.head = (h + 1) % q.slots.len();
                    q.len -= 1;
                    Some(n)
                } else {
                    None
                }
            };
            self.switch.begin(&mut batch);
            if let Some(n) = len {
                self.handle(&frame[..n], &mut batch);
            }
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                if let Some(d) = self.dhcp.as_mut() {
                    d.expire(unix_now());
                }
                if let Some(ra) = &self.ra {
                    if now >= next_ra {
                        next_ra = now + Duration::from_secs(ra.interval_secs.max(1));
                        self.send_ra(wire::ALL_NODES_MAC, &mut batch);
                    }
                }
            }
            self.switch.end(&mut batch);
        }
    }

    fn emit(&self, batch: &mut virtnet_switch::TxBatch) {
        self.switch
            .forward(batch, self.port, &SliceFrame(&self.out), &NetHdr::NONE);
    }

    fn send_ra(&mut self, dst_mac: MacAddr, batch: &mut virtnet_switch::TxBatch) {
        let Some(ra) = &self.ra else { return };
        let f = RaFields {
            prefix: ra.prefix.network(),
            prefix_len: ra.prefix.prefix_len(),
            router_lifetime: ra.router_lifetime,
            valid: 86_400,
            preferred: 14_400,
            mtu: ra.mtu,
        };
        let dst: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        wire::router_advertisement(&mut self.out, self.shared.mac, dst_mac, dst, &f);
        self.emit(batch);
        self.shared.counters.ra.fetch_add(1, Relaxed);
    }

    fn handle(&mut self, frame: &[u8], batch: &mut virtnet_switch::TxBatch) {
        let c = &self.shared.counters;
        let (mac, ip) = (self.shared.mac, self.shared.ip);
        let Ok((_, src_mac, _)) = wire::ethernet(frame) else {
            c.malformed.fetch_add(1, Relaxed);
            return;
        };
        match wire::parse(frame) {
            Ok(Packet::ArpRequest {
                sender_mac,
                sender_ip,
                target,
            }) if target == ip && sender_mac == src_mac => {
                wire::arp_reply(&mut self.out, mac, ip, sender_mac, sender_ip);
                self.emit(batch);
                c.arp.fetch_add(1, Relaxed);
            }
            Ok(Packet::Echo { src, dst, rest }) if dst == ip => {
                wire::echo_reply(&mut self.out, mac, src_mac, ip, src, rest);
                self.emit(batch);
                c.echo.fetch_add(1, Relaxed);
            }
            Ok(Packet::RouterSolicitation { .. }) if self.ra.is_some() => {
                self.send_ra(wire::ALL_NODES_MAC, batch);
            }
            Ok(Packet::Dhcp { payload }) => self.handle_dhcp(payload, src_mac, batch),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!("services: {e} from {src_mac}");
                c.malformed.fetch_add(1, Relaxed);
            }
        }
    }

    fn handle_dhcp(&mut self, payload: &[u8], src: MacAddr, batch: &mut virtnet_switch::TxBatch) {
        let Some(server) = self.dhcp.as_mut() else {
            return;
        };
        let reply = match dhcp::decode(payload) {
            Err(e) => {
                tracing::debug!("services: {e} from {src}");
                server.count_malformed();
                None
            }
            Ok(req) => match self.switch.lookup(self.vlan, src) {
                None => {
                    self.shared.counters.unknown_port.fetch_add(1, Relaxed);
                    None
                }
                Some(port) => server.handle(&req, src, port, unix_now()),
            },
        };
        *lock(&self.shared.dhcp) = (server.counters(), server.leases());
        let Some(reply) = reply else { return };
        if let Some(kind) = reply.kind() {
            tracing::debug!("DHCP: {kind:?} {} to {src}", reply.msg.yiaddr());
        }
        self.send_dhcp(&reply.msg, reply.dst, batch);
    }

    fn send_dhcp(&mut self, msg: &Message, dst: ReplyDst, batch: &mut virtnet_switch::TxBatch) {
        if dhcp::encode(msg, &mut self.enc).is_err() {
            return;
        }
        let (dmac, dip) = match dst {
            ReplyDst::Broadcast => (MacAddr::BROADCAST, Ipv4Addr::BROADCAST),
            ReplyDst::Unicast { mac, ip } => (mac, ip),
        };
        wire::udp4(
            &mut self.out,
            self.shared.mac,
            dmac,
            self.shared.ip,
            dip,
            dhcp::SERVER_PORT,
            dhcp::CLIENT_PORT,
            &self.enc,
        );
        self.emit(batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::{DhcpOption, MessageType};
    use virtnet_switch::SwitchConfig;

    /// A port that records what it receives.
    #[derive(Default)]
    struct Recorder {
        frames: Mutex<Vec<Vec<u8>>>,
        cv: Condvar,
    }

    impl PortSink for Recorder {
        fn deliver(&self, f: &dyn Frame, _h: &NetHdr) -> std::result::Result<(), DropReason> {
            let mut v = vec![0u8; f.len()];
            f.read_at(0, &mut v);
            lock(&self.frames).push(v);
            self.cv.notify_all();
            Ok(())
        }
    }

    impl Recorder {
        fn wait(&self, n: usize) -> Vec<Vec<u8>> {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut g = lock(&self.frames);
            while g.len() < n && Instant::now() < deadline {
                g = self
                    .cv
                    .wait_timeout(g, Duration::from_millis(50))
                    .unwrap()
                    .0;
            }
            std::mem::take(&mut *g)
        }
    }

    const SMAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xfe]);
    const SIP: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 254);

    fn guest_mac(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, n])
    }

    fn setup(
        dhcp_cap: usize,
        queue_len: usize,
    ) -> (Arc<Switch>, ServicesPort, Arc<Recorder>, PortId) {
        let sw = Switch::new(SwitchConfig::default());
        let mut cfg = ServicesConfig::new("svc", SMAC, SIP);
        let mut d = DhcpConfig::new(
            "192.168.56.0/24".parse().unwrap(),
            SIP,
            Ipv4Addr::new(192, 168, 56, 100),
            Ipv4Addr::new(192, 168, 56, 199),
        );
        d.max_leases_per_port = dhcp_cap;
        cfg.dhcp = Some(d);
        cfg.ra = Some(RaConfig {
            prefix: "fd00:56::/64".parse().unwrap(),
            router_lifetime: 0,
            interval_secs: 3600,
            mtu: None,
        });
        cfg.queue_len = queue_len;
        // The guest first, so it sees the RA sent at start.
        let rec = Arc::new(Recorder::default());
        let guest = sw.add_port(PortConfig::default(), rec.clone());
        let svc = ServicesPort::start(sw.clone(), cfg).unwrap();
        (sw, svc, rec, guest)
    }

    fn send(sw: &Switch, port: PortId, frame: &[u8]) {
        let mut b = sw.new_batch();
        sw.begin(&mut b);
        sw.forward(&mut b, port, &SliceFrame(frame), &NetHdr::NONE);
        sw.end(&mut b);
    }

    fn dhcp_frame(src: MacAddr, msg: &Message) -> Vec<u8> {
        let mut enc = Vec::new();
        dhcp::encode(msg, &mut enc).unwrap();
        let mut f = Vec::new();
        wire::udp4(
            &mut f,
            src,
            MacAddr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            68,
            67,
            &enc,
        );
        f
    }

    /// The DHCP reply in a frame the guest received, if it is one.
    fn dhcp_reply(f: &[u8]) -> Option<Message> {
        (f.len() > 42 && f[12..14] == [8, 0] && f[23] == 17 && f[36..38] == [0, 68])
            .then(|| dhcp::decode(&f[42..]).ok())
            .flatten()
    }

    #[test]
    fn arp_echo_and_dhcp_end_to_end() {
        let (sw, svc, rec, guest) = setup(4, 4);
        // The unsolicited RA at start.
        let got = rec.wait(1);
        assert!(got
            .iter()
            .any(|f| f[12..14] == [0x86, 0xdd] && f[54] == wire::ICMPV6_RA));
        let gm = guest_mac(1);

        // ARP for the services' address.
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&gm.0);
        arp.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&gm.0);
        arp.extend_from_slice(&[192, 168, 56, 7]);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&SIP.octets());
        send(&sw, guest, &arp);
        let got = rec.wait(1);
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0][20..22], &[0, 2]);
        assert_eq!(&got[0][22..28], &SMAC.0);

        // DISCOVER → OFFER → REQUEST → ACK.
        let m = dhcp::client_message(MessageType::Discover, gm, 42);
        send(&sw, guest, &dhcp_frame(gm, &m));
        let got = rec.wait(1);
        let offer = dhcp_reply(&got[0]).expect("offer");
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(&got[0][0..6], &gm.0);
        let ip = offer.yiaddr();
        let mut m = dhcp::client_message(MessageType::Request, gm, 43);
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        m.opts_mut().insert(DhcpOption::ServerIdentifier(SIP));
        send(&sw, guest, &dhcp_frame(gm, &m));
        let got = rec.wait(1);
        let ack = dhcp_reply(&got[0]).expect("ack");
        assert_eq!(
            (ack.opts().msg_type(), ack.yiaddr()),
            (Some(MessageType::Ack), ip)
        );
        assert_eq!(svc.leases().len(), 1);
        assert_eq!(svc.stats().dhcp.acks, 1);
        assert_eq!(svc.stats().arp_replies, 1);
        // The services' MAC was learned: unicast to it goes to the services port only.
        assert_eq!(sw.lookup(None, SMAC), Some(svc.port_id()));
        svc.shutdown();
        assert_eq!(sw.ports().len(), 1);
    }

    #[test]
    fn hostile_input_is_counted_and_harmless() {
        // The queue holds the whole burst below (a_full_queue_drops_and_counts tests overflow).
        let (sw, svc, rec, guest) = setup(2, 16);
        rec.wait(1); // RA
                     // Garbage in a UDP datagram to port 67, and a truncated IPv4 header.
        let mut f = Vec::new();
        wire::udp4(
            &mut f,
            guest_mac(1),
            MacAddr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            68,
            67,
            &[1, 2, 3],
        );
        send(&sw, guest, &f);
        let mut t = f.clone();
        t[16] = 0xff; // IPv4 total length beyond the frame
        send(&sw, guest, &t);
        // A spoofed chaddr: the frame comes from guest_mac(2), the DISCOVER says guest_mac(3).
        let m = dhcp::client_message(MessageType::Discover, guest_mac(3), 1);
        send(&sw, guest, &dhcp_frame(guest_mac(2), &m));
        // One port cycling through MACs: only 2 get offers.
        for n in 10..16 {
            let m = dhcp::client_message(MessageType::Discover, guest_mac(n), u32::from(n));
            send(&sw, guest, &dhcp_frame(guest_mac(n), &m));
        }
        rec.wait(2);
        let deadline = Instant::now() + Duration::from_secs(5);
        while svc.stats().dhcp.port_cap < 4 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let s = svc.stats();
        assert_eq!(s.dhcp.malformed, 1, "{s:?}");
        assert_eq!(s.malformed, 1, "{s:?}");
        assert_eq!(s.dhcp.spoofed, 1, "{s:?}");
        assert_eq!(s.dhcp.offers, 2, "{s:?}");
        assert_eq!(s.dhcp.port_cap, 4, "{s:?}");
        // A second port still gets an address.
        let rec2 = Arc::new(Recorder::default());
        let other = sw.add_port(PortConfig::default(), rec2.clone());
        let gm = guest_mac(99);
        send(
            &sw,
            other,
            &dhcp_frame(gm, &dhcp::client_message(MessageType::Discover, gm, 5)),
        );
        let got = rec2.wait(1);
        assert!(got
            .iter()
            .filter_map(|f| dhcp_reply(f))
            .any(|m| m.opts().msg_type() == Some(MessageType::Offer)));
        // Frames not for the services cost nothing and are not queued.
        let before = svc.stats().queued;
        let mut f = Vec::new();
        wire::udp4(
            &mut f,
            guest_mac(1),
            MacAddr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            68,
            53,
            &[0; 100],
        );
        send(&sw, guest, &f);
        assert_eq!(svc.stats().queued, before);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let sw = Switch::new(SwitchConfig::default());
        let mut cfg = ServicesConfig::new("svc", SMAC, SIP);
        cfg.queue_len = 1;
        let svc = ServicesPort::start(sw.clone(), cfg).unwrap();
        // Hold the queue lock so the worker cannot drain, then fill it through the sink.
        let sink = ServicesSink {
            shared: svc.shared.clone(),
        };
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&guest_mac(1).0);
        arp.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&guest_mac(1).0);
        arp.extend_from_slice(&[192, 168, 56, 7, 0, 0, 0, 0, 0, 0]);
        arp.extend_from_slice(&SIP.octets());
        {
            let mut q = lock(&svc.shared.queue);
            q.len = 1; // pretend a frame is waiting
        }
        assert_eq!(
            sink.deliver(&SliceFrame(&arp), &NetHdr::NONE),
            Err(DropReason::NoRxBuffers)
        );
        assert_eq!(svc.stats().queue_full, 1);
        assert!(matches!(
            ServicesPort::start(
                sw.clone(),
                ServicesConfig {
                    queue_len: 0,
                    ..ServicesConfig::new("x", SMAC, SIP)
                }
            ),
            Err(ServicesError::ZeroQueue)
        ));
        let mut bad = ServicesConfig::new("x", SMAC, SIP);
        bad.ra = Some(RaConfig {
            prefix: "fd00::/48".parse().unwrap(),
            router_lifetime: 0,
            interval_secs: 10,
            mtu: None,
        });
        assert!(matches!(
            ServicesPort::start(sw, bad),
            Err(ServicesError::BadPrefix(_))
        ));
    }
}
