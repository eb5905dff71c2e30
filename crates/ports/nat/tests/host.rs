//! The NAT port against real host sockets on loopback: a smoltcp "guest" on a switch port
//! talks through the gateway to servers this test runs on 127.0.0.1.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SInstant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Cidr};
use virtnet_port_nat::host::{Forward, ForwardProto};
use virtnet_port_nat::{NatConfig, NatPolicy, NatPort};
use virtnet_switch::{
    DropReason, Frame, NetHdr, PortConfig, PortId, PortSink, SliceFrame, Switch, SwitchConfig,
};

const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const GW_MAC: [u8; 6] = [0x02, 0x76, 0, 0, 0, 2];
const G_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 15];

#[derive(Default)]
struct Inbox(Mutex<VecDeque<Vec<u8>>>);

impl PortSink for Inbox {
    fn deliver(&self, frame: &dyn Frame, _hdr: &NetHdr) -> Result<(), DropReason> {
        let mut v = vec![0u8; frame.len()];
        frame.read_at(0, &mut v);
        self.0.lock().unwrap().push_back(v);
        Ok(())
    }
}

struct Link {
    rx: Arc<Inbox>,
    tx: Vec<Vec<u8>>,
    /// Data frames towards the guest (0-based) to drop, as a full guest RX ring would.
    drop_data: Vec<usize>,
    /// Drop the first frame towards the guest that carries a FIN.
    drop_fin: bool,
    data_seen: usize,
    dropped: usize,
}

impl Link {
    /// Whether to drop `f` (a frame towards the guest).
    fn lose(&mut self, f: &[u8]) -> bool {
        if f.len() < 54 || f[12..14] != [0x08, 0x00] || f[23] != 6 {
            return false;
        }
        let ihl = usize::from(f[14] & 0xf) * 4;
        let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
        let tcp = &f[14 + ihl..14 + total];
        let payload = tcp.len() - usize::from(tcp[12] >> 4) * 4;
        let fin = tcp[13] & 1 != 0;
        let mut lose = false;
        if fin && self.drop_fin {
            self.drop_fin = false;
            lose = true;
        }
        if payload > 0 {
            lose |= self.drop_data.contains(&self.data_seen);
            self.data_seen += 1;
        }
        self.dropped += usize::from(lose);
        lose
    }
}

struct RxT(Vec<u8>);
struct TxT<'a>(&'a mut Vec<Vec<u8>>);

impl smoltcp::phy::RxToken for RxT {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for TxT<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0u8; len];
        let r = f(&mut b);
        self.0.push(b);
        r
    }
}

impl Device for Link {
    type RxToken<'a> = RxT;
    type TxToken<'a> = TxT<'a>;
    fn receive(&mut self, _t: SInstant) -> Option<(RxT, TxT<'_>)> {
        loop {
            let f = self.rx.0.lock().unwrap().pop_front()?;
            if !self.lose(&f) {
                return Some((RxT(f), TxT(&mut self.tx)));
            }
        }
    }
    fn transmit(&mut self, _t: SInstant) -> Option<TxT<'_>> {
        Some(TxT(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

struct Guest {
    sw: Arc<Switch>,
    port: PortId,
    iface: Interface,
    link: Link,
    sockets: SocketSet<'static>,
    start: Instant,
    nat: Option<NatPort>,
}

impl Guest {
    fn new(host_loopback: bool, dns: Option<u16>, forwards: Vec<Forward>) -> Guest {
        let sw = Switch::new(SwitchConfig::default());
        let mut policy = NatPolicy::new(GW_MAC, GW, 24);
        policy.host_loopback = host_loopback.then_some(GW);
        policy.dns = dns
            .map(|p| vec![(Ipv4Addr::LOCALHOST, p).into()])
            .unwrap_or_default();
        let nat = NatPort::start(
            sw.clone(),
            NatConfig {
                name: "gw".into(),
                vlan: None,
                policy,
                forwards,
            },
        )
        .unwrap();
        let rx = Arc::new(Inbox::default());
        let port = sw.add_port(PortConfig::default(), rx.clone());
        let mut link = Link {
            rx,
            tx: Vec::new(),
            drop_data: Vec::new(),
            drop_fin: false,
            data_seen: 0,
            dropped: 0,
        };
        let cfg = Config::new(HardwareAddress::Ethernet(EthernetAddress(G_MAC)));
        let mut iface = Interface::new(cfg, &mut link, SInstant::from_millis(0));
        iface.update_ip_addrs(|a| {
            a.push(IpCidr::Ipv4(Ipv4Cidr::new(GUEST, 24))).unwrap();
        });
        iface.routes_mut().add_default_ipv4_route(GW).unwrap();
        Guest {
            sw,
            port,
            iface,
            link,
            sockets: SocketSet::new(Vec::new()),
            start: Instant::now(),
            nat: Some(nat),
        }
    }

    fn poll(&mut self) {
        let t = SInstant::from_micros(self.start.elapsed().as_micros() as i64);
        self.iface.poll(t, &mut self.link, &mut self.sockets);
        if !self.link.tx.is_empty() {
            let mut b = self.sw.new_batch();
            self.sw.begin(&mut b);
            for f in self.link.tx.drain(..) {
                self.sw
                    .forward(&mut b, self.port, &SliceFrame(&f), &NetHdr::default());
            }
            self.sw.end(&mut b);
        }
        std::thread::sleep(Duration::from_millis(1));
    }

    /// Poll until `done` or 10 s.
    fn until(&mut self, mut done: impl FnMut(&mut Guest) -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            self.poll();
            if done(self) {
                return true;
            }
        }
        false
    }

    fn tcp(&mut self) -> SocketHandle {
        let s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 65536]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        self.sockets.add(s)
    }

    fn connect(&mut self, dst: Ipv4Addr, port: u16) -> SocketHandle {
        let h = self.tcp();
        let cx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(h)
            .connect(cx, (IpAddress::Ipv4(dst), port), 40000 + port % 1000)
            .unwrap();
        h
    }

    fn sock(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }
}

fn serve_once(body: Vec<u8>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut req = [0u8; 5];
        s.read_exact(&mut req).unwrap();
        assert_eq!(&req, b"hello");
        s.write_all(&body).unwrap();
    });
    port
}

#[test]
fn tcp_download_from_host_loopback_and_eof() {
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let port = serve_once(body.clone());
    let mut g = Guest::new(true, None, Vec::new());
    let h = g.connect(GW, port);
    assert!(g.until(|g| g.sock(h).may_send()), "connected");
    g.sock(h).send_slice(b"hello").unwrap();
    let mut got = Vec::new();
    let ok = g.until(|g| {
        let s = g.sock(h);
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        !s.may_recv()
    });
    assert!(ok, "EOF after {} bytes", got.len());
    assert_eq!(got, body);
    g.sock(h).close();
    g.nat.take().unwrap().shutdown();
}

/// Frames towards the guest lost as a full RX ring would drop them, the last one included
/// (only a timer can recover that one: the driver must poll the engine at its `poll_at`),
/// the guest half-closing right after its request. Used to stall: smoltcp 0.12 loses its
/// retransmission timer in CLOSE-WAIT; the engine's watchdog restarts it.
#[test]
fn tcp_download_survives_frames_lost_toward_the_guest() {
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let port = serve_once(body.clone());
    let mut g = Guest::new(true, None, Vec::new());
    g.link.drop_data = vec![10, 11, 40];
    g.link.drop_fin = true;
    let h = g.connect(GW, port);
    assert!(g.until(|g| g.sock(h).may_send()), "connected");
    g.sock(h).send_slice(b"hello").unwrap();
    g.sock(h).close();
    let mut got = Vec::new();
    let start = Instant::now();
    let ok = g.until(|g| {
        let s = g.sock(h);
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        !s.may_recv()
    });
    assert!(ok, "EOF after {} bytes", got.len());
    assert_eq!(got, body);
    assert_eq!(g.link.dropped, 4, "the drops happened");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    g.nat.take().unwrap().shutdown();
}

#[test]
fn without_host_loopback_the_host_is_unreachable() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut g = Guest::new(false, None, Vec::new());
    let a = g.connect(GW, port);
    let b = g.connect(Ipv4Addr::LOCALHOST, port);
    assert!(g.until(
        |g| g.sock(a).state() == tcp::State::Closed && g.sock(b).state() == tcp::State::Closed
    ));
    l.set_nonblocking(true).unwrap();
    assert!(l.accept().is_err(), "nothing reached the host service");
}

#[test]
fn refused_host_connection_resets_the_guest() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut g = Guest::new(true, None, Vec::new());
    let h = g.connect(GW, port);
    assert!(g.until(|g| g.sock(h).state() == tcp::State::Closed));
}

#[test]
fn udp_echo_and_dns_forwarder() {
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let eport = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut b = [0u8; 1500];
        for _ in 0..2 {
            let (n, from) = echo.recv_from(&mut b).unwrap();
            echo.send_to(&b[..n], from).unwrap();
        }
    });
    // The "resolver" is the same echo server: gateway:53 relays to it.
    let mut g = Guest::new(true, Some(eport), Vec::new());
    let s = udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
    );
    let h = g.sockets.add(s);
    g.sockets.get_mut::<udp::Socket>(h).bind(5000).unwrap();
    g.sockets
        .get_mut::<udp::Socket>(h)
        .send_slice(b"direct", (IpAddress::Ipv4(GW), eport))
        .unwrap();
    g.sockets
        .get_mut::<udp::Socket>(h)
        .send_slice(b"dns", (IpAddress::Ipv4(GW), 53))
        .unwrap();
    let mut got = Vec::new();
    assert!(
        g.until(|g| {
            let s = g.sockets.get_mut::<udp::Socket>(h);
            while let Ok((d, m)) = s.recv() {
                got.push((d.to_vec(), m.endpoint.port));
            }
            got.len() == 2
        }),
        "{got:?}"
    );
    got.sort();
    assert_eq!(
        got,
        vec![(b"direct".to_vec(), eport), (b"dns".to_vec(), 53)]
    );
}

#[test]
fn tcp_port_forward_reaches_a_guest_service() {
    let probe = TcpListener::bind("127.0.0.1:0").unwrap();
    let hport = probe.local_addr().unwrap().port();
    drop(probe);
    let fwd = Forward {
        proto: ForwardProto::Tcp,
        host: (Ipv4Addr::LOCALHOST, hport).into(),
        guest: SocketAddrV4::new(GUEST, 22).into(),
    };
    let mut g = Guest::new(false, None, vec![fwd]);
    let h = g.tcp();
    g.sock(h).listen(22).unwrap();
    let client = std::thread::spawn(move || {
        let mut c = TcpStream::connect(("127.0.0.1", hport)).unwrap();
        c.write_all(b"ping").unwrap();
        let mut r = [0u8; 4];
        c.read_exact(&mut r).unwrap();
        r
    });
    let mut buf = Vec::new();
    assert!(g.until(|g| {
        let s = g.sock(h);
        if s.can_recv() {
            s.recv(|b| {
                buf.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        buf == b"ping"
    }));
    g.sock(h).send_slice(b"pong").unwrap();
    assert!(g.until(|g| g.sock(h).send_queue() == 0));
    assert_eq!(&client.join().unwrap(), b"pong");
}

fn csum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[test]
fn ping_out_through_the_host() {
    // 10.0.2.4 is this test's alias for the host's loopback.
    let sw = Switch::new(SwitchConfig::default());
    let mut policy = NatPolicy::new(GW_MAC, GW, 24);
    let alias = Ipv4Addr::new(10, 0, 2, 4);
    policy.host_loopback = Some(alias);
    let nat = NatPort::start(
        sw.clone(),
        NatConfig {
            name: "gw".into(),
            vlan: None,
            policy,
            forwards: Vec::new(),
        },
    )
    .unwrap();
    let rx = Arc::new(Inbox::default());
    let port = sw.add_port(PortConfig::default(), rx.clone());
    let mut icmp = vec![8, 0, 0, 0, 0x33, 0x44, 0, 7, b'p', b'i', b'n', b'g'];
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 32, 0, 1, 0x40, 0, 64, 1, 0, 0];
    ip.extend_from_slice(&GUEST.octets());
    ip.extend_from_slice(&alias.octets());
    let c = csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = GW_MAC.to_vec();
    f.extend_from_slice(&G_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    let mut b = sw.new_batch();
    sw.begin(&mut b);
    sw.forward(&mut b, port, &SliceFrame(&f), &NetHdr::default());
    sw.end(&mut b);
    let t = Instant::now();
    let reply = loop {
        if let Some(r) = rx.0.lock().unwrap().pop_front() {
            break Some(r);
        }
        if t.elapsed() > Duration::from_secs(5) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    nat.shutdown();
    // Without ping sockets or CAP_NET_RAW there is no reply (and a warning in the log).
    let Some(r) = reply else {
        eprintln!("no ICMP reply: this host forbids ping sockets and raw sockets");
        return;
    };
    assert_eq!(&r[..6], &G_MAC);
    assert_eq!(&r[26..30], &alias.octets());
    assert_eq!(&r[34..35], &[0]);
    assert_eq!(&r[38..], &[0x33, 0x44, 0, 7, b'p', b'i', b'n', b'g']);
}

#[test]
fn udp_port_forward_reaches_a_guest_service() {
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    let hport = probe.local_addr().unwrap().port();
    drop(probe);
    let fwd = Forward {
        proto: ForwardProto::Udp,
        host: (Ipv4Addr::LOCALHOST, hport).into(),
        guest: SocketAddrV4::new(GUEST, 53).into(),
    };
    let mut g = Guest::new(false, None, vec![fwd]);
    let s = udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4], vec![0; 4096]),
    );
    let h = g.sockets.add(s);
    g.sockets.get_mut::<udp::Socket>(h).bind(53).unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(b"query", ("127.0.0.1", hport)).unwrap();
    let mut answered = false;
    assert!(g.until(|g| {
        let s = g.sockets.get_mut::<udp::Socket>(h);
        if let Ok((d, m)) = s.recv() {
            assert_eq!(d, b"query");
            let ep = m.endpoint;
            s.send_slice(b"answer", ep).unwrap();
            answered = true;
        }
        answered && s.send_queue() == 0
    }));
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 64];
    let (n, from) = client.recv_from(&mut b).unwrap();
    assert_eq!((&b[..n], from.port()), (&b"answer"[..], hport));
}

/// A host server that reports what its one connection saw: `Ok(bytes)` at EOF, or the
/// error kind.
fn observe() -> (
    u16,
    std::sync::mpsc::Receiver<Result<Vec<u8>, std::io::ErrorKind>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut got = Vec::new();
        let r = s.read_to_end(&mut got).map(|_| got).map_err(|e| e.kind());
        let _ = tx.send(r);
    });
    (port, rx)
}

#[test]
fn guest_reset_resets_the_host_side_and_fin_is_eof() {
    let (p1, r1) = observe();
    let (p2, r2) = observe();
    let mut g = Guest::new(true, None, Vec::new());
    let a = g.connect(GW, p1);
    let b = g.connect(GW, p2);
    assert!(g.until(|g| g.sock(a).may_send() && g.sock(b).may_send()));
    g.sock(a).send_slice(b"bye").unwrap();
    g.sock(a).close();
    g.sock(b).abort();
    for _ in 0..200 {
        g.poll();
    }
    let wait = Duration::from_secs(5);
    assert_eq!(r1.recv_timeout(wait).unwrap(), Ok(b"bye".to_vec()));
    assert_eq!(
        r2.recv_timeout(wait).unwrap(),
        Err(std::io::ErrorKind::ConnectionReset)
    );
}

#[test]
fn shutdown_closes_every_host_flow() {
    let (p, r) = observe();
    let mut g = Guest::new(true, None, Vec::new());
    let a = g.connect(GW, p);
    assert!(g.until(|g| g.sock(a).may_send()));
    g.nat.take().unwrap().shutdown();
    let got = r.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(got, Err(std::io::ErrorKind::ConnectionReset));
    // The guest is told too: its connection is reset.
    assert!(g.until(|g| g.sock(a).state() == tcp::State::Closed));
}
