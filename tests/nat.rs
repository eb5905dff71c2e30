//! A `nat` network of the daemon, driven by a user-space virtio-net guest (virtnet-guest):
//! ARP for the gateway, UDP through the DNS forwarder and through `host_loopback` to servers
//! on 127.0.0.1, a reset for a refused TCP connection, and a TCP port forward's SYN reaching
//! the guest; over IPv6, the gateway's answer to a (unicast) neighbour solicitation, UDP
//! through the DNS forwarder to a resolver on [::1] and through `host_loopback` to [::1], and
//! an IPv6 port forward's SYN.

use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use tempfile::TempDir;
use virtnet_daemon::{Config, Daemon};
use virtnet_guest::{Guest, GuestConfig, NetHdr};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 2, 15];
const ME: [u8; 4] = [10, 0, 2, 15];
const GW: [u8; 4] = [10, 0, 2, 2];

fn udp_echo() -> u16 {
    udp_echo_on("127.0.0.1:0")
}

fn udp_echo_on(addr: &str) -> u16 {
    let s = UdpSocket::bind(addr).unwrap();
    let port = s.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut b = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut b) {
            let _ = s.send_to(&b[..n], from);
        }
    });
    port
}

/// Frames received within `timeout` until `pick` returns something.
fn wait<T>(g: &mut Guest, timeout: Duration, mut pick: impl FnMut(&[u8]) -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Some(r) = g.recv(0, Duration::from_millis(100)).unwrap() {
            if let Some(t) = pick(&r.frame) {
                return t;
            }
        }
    }
    panic!("nothing matching arrived");
}

fn gateway_mac(g: &mut Guest) -> [u8; 6] {
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&MAC);
    arp.extend_from_slice(&ME);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&GW);
    g.send(0, &NetHdr::NONE, &arp).unwrap();
    wait(g, Duration::from_secs(5), |f| {
        (f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[28..32] == GW)
            .then(|| f[22..28].try_into().unwrap())
    })
}

fn udp(g: &mut Guest, gw: [u8; 6], dport: u16, payload: &[u8]) -> (u16, Vec<u8>) {
    let b = PacketBuilder::ethernet2(MAC, gw)
        .ipv4(ME, GW, 64)
        .udp(40000 + dport % 1000, dport);
    let mut f = Vec::new();
    b.write(&mut f, payload).unwrap();
    g.send(0, &NetHdr::NONE, &f).unwrap();
    wait(g, Duration::from_secs(5), |f| {
        let p = SlicedPacket::from_ethernet(f).ok()?;
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            return None;
        };
        let Some(TransportSlice::Udp(u)) = &p.transport else {
            return None;
        };
        (ip.header().destination() == ME && u.destination_port() == 40000 + dport % 1000)
            .then(|| (u.source_port(), u.payload().to_vec()))
    })
}

#[test]
fn nat_network_gateway_udp_dns_reset_and_forward() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let echo = udp_echo();
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let fwd = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = format!(
        r#"
control_socket = "{d}/ctl.sock"
[[network]]
name = "nat"
mode = "nat"
dhcp = {{ lease_file = "{d}/nat.leases", reservations = [{{ mac = "52:54:00:00:02:0f", ip = "10.0.2.15" }}] }}
[network.nat]
host_loopback = true
dns = ["127.0.0.1:{echo}"]
forward = ["tcp:127.0.0.1:{fwd} -> 22"]
[[network.port]]
socket = "{d}/a.sock"
mac = "52:54:00:00:02:0f"
"#,
        d = d.display()
    );
    let cfg = Config::from_toml(&text, std::path::Path::new("nat.toml")).unwrap();
    cfg.validate().unwrap();
    let daemon = Daemon::start(cfg).unwrap();
    let mut g = Guest::connect(d.join("a.sock"), GuestConfig::default()).unwrap();

    let gw = gateway_mac(&mut g);
    // DNS forwarder: gateway:53 relays to the configured resolver (the echo server here).
    assert_eq!(udp(&mut g, gw, 53, b"query"), (53, b"query".to_vec()));
    // host_loopback: the gateway's address reaches the host's 127.0.0.1.
    assert_eq!(udp(&mut g, gw, echo, b"hello"), (echo, b"hello".to_vec()));

    // A SYN to a closed host port is answered with a reset.
    let syn = PacketBuilder::ethernet2(MAC, gw)
        .ipv4(ME, GW, 64)
        .tcp(41000, closed, 1000, 64240)
        .syn();
    let mut f = Vec::new();
    syn.write(&mut f, &[]).unwrap();
    g.send(0, &NetHdr::NONE, &f).unwrap();
    wait(&mut g, Duration::from_secs(5), |f| {
        let p = SlicedPacket::from_ethernet(f).ok()?;
        let Some(TransportSlice::Tcp(t)) = &p.transport else {
            return None;
        };
        (t.destination_port() == 41000 && t.rst()).then_some(())
    });

    // A host client of the forward: the gateway opens a connection to 10.0.2.15:22.
    let client = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", fwd)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        // The guest never answers: the connection ends (reset) when the daemon stops.
        let r = c.read(&mut b);
        assert!(!matches!(r, Ok(n) if n > 0), "{r:?}");
    });
    let src = wait(&mut g, Duration::from_secs(5), |f| {
        let p = SlicedPacket::from_ethernet(f).ok()?;
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            return None;
        };
        let Some(TransportSlice::Tcp(t)) = &p.transport else {
            return None;
        };
        (t.destination_port() == 22 && t.syn() && !t.ack())
            .then(|| (ip.header().source(), t.source_port()))
    });
    assert_eq!(Ipv4Addr::from(src.0), Ipv4Addr::from(GW));
    // Stopping the daemon closes every flow: the host client's connection ends.
    daemon.stop();
    client.join().unwrap();
}

const ME6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 2, 0, 0, 0, 0x15);
const GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 2, 0, 0, 0, 2);

fn checksum6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, l4: &[u8]) -> u16 {
    let mut sum = 0u32;
    let len = u32::try_from(l4.len()).unwrap().to_be_bytes();
    let parts: [&[u8]; 5] = [&src.octets(), &dst.octets(), &len, &[0, 0, 0, next], l4];
    let bytes: Vec<u8> = parts.concat();
    for c in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn udp6(g: &mut Guest, gw: [u8; 6], dst: Ipv6Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let sport = 42000 + dport % 1000;
    let b = PacketBuilder::ethernet2(MAC, gw)
        .ipv6(ME6.octets(), dst.octets(), 64)
        .udp(sport, dport);
    let mut f = Vec::new();
    b.write(&mut f, payload).unwrap();
    g.send(0, &NetHdr::NONE, &f).unwrap();
    wait(g, Duration::from_secs(5), |f| {
        let p = SlicedPacket::from_ethernet(f).ok()?;
        let Some(NetSlice::Ipv6(ip)) = &p.net else {
            return None;
        };
        let Some(TransportSlice::Udp(u)) = &p.transport else {
            return None;
        };
        (Ipv6Addr::from(ip.header().source()) == dst
            && Ipv6Addr::from(ip.header().destination()) == ME6
            && u.destination_port() == sport
            && u.source_port() == dport)
            .then(|| u.payload().to_vec())
    })
}

#[test]
fn nat_network_ipv6_ndp_udp_dns_and_forward() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let echo6 = udp_echo_on("[::1]:0");
    let fwd6 = TcpListener::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Default IPv6 prefix fd00:10:0:2::/64, gateway ::2, which maps [::1] (host_loopback).
    let text = format!(
        r#"
control_socket = "{d}/ctl.sock"
[[network]]
name = "nat"
mode = "nat"
dhcp = {{ lease_file = "{d}/nat.leases" }}
[network.nat]
host_loopback = true
dns = ["[::1]:{echo6}"]
forward = ["tcp:[::1]:{fwd6} -> [{ME6}]:22"]
[[network.port]]
socket = "{d}/a.sock"
mac = "52:54:00:00:02:0f"
"#,
        d = d.display()
    );
    let cfg = Config::from_toml(&text, std::path::Path::new("nat.toml")).unwrap();
    cfg.validate().unwrap();
    let daemon = Daemon::start(cfg).unwrap();
    let mut g = Guest::connect(d.join("a.sock"), GuestConfig::default()).unwrap();
    let gw = gateway_mac(&mut g);
    // The router's link-local address (modified EUI-64 of its MAC).
    let ll = Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        gw[0] ^ 2,
        gw[1],
        gw[2],
        0xff,
        0xfe,
        gw[3],
        gw[4],
        gw[5],
    ]);

    // Neighbour unreachability detection: a unicast solicitation for the router's address.
    let mut l4 = vec![135, 0, 0, 0, 0, 0, 0, 0];
    l4.extend_from_slice(&ll.octets());
    l4.extend_from_slice(&[1, 1]);
    l4.extend_from_slice(&MAC);
    let c = checksum6(ME6, ll, 58, &l4);
    l4[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = gw.to_vec();
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&u16::try_from(l4.len()).unwrap().to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&ME6.octets());
    f.extend_from_slice(&ll.octets());
    f.extend_from_slice(&l4);
    g.send(0, &NetHdr::NONE, &f).unwrap();
    let na = wait(&mut g, Duration::from_secs(5), |f| {
        (f.len() >= 86 && f[12..14] == [0x86, 0xdd] && f[20] == 58 && f[54] == 136)
            .then(|| f.to_vec())
    });
    assert_eq!(&na[..6], &MAC);
    assert_eq!(&na[62..78], &ll.octets(), "target");
    assert_eq!(na[58] & 0xe0, 0xe0, "router, solicited, override");
    assert_eq!(
        &na[78..86],
        &[2, 1, gw[0], gw[1], gw[2], gw[3], gw[4], gw[5]]
    );

    // DNS forwarder at the gateway's IPv6 address, relaying to a resolver on [::1].
    assert_eq!(udp6(&mut g, gw, GW6, 53, b"query6"), b"query6");
    // host_loopback: the gateway's IPv6 address reaches the host's ::1.
    assert_eq!(udp6(&mut g, gw, GW6, echo6, b"hello6"), b"hello6");

    // A host client of the IPv6 forward: the gateway opens a connection to [ME6]:22, straight
    // to the guest's MAC (learned from its traffic).
    let client = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(("::1", fwd6)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        let r = c.read(&mut b);
        assert!(!matches!(r, Ok(n) if n > 0), "{r:?}");
    });
    let (dst_mac, src) = wait(&mut g, Duration::from_secs(5), |f| {
        let p = SlicedPacket::from_ethernet(f).ok()?;
        let Some(NetSlice::Ipv6(ip)) = &p.net else {
            return None;
        };
        let Some(TransportSlice::Tcp(t)) = &p.transport else {
            return None;
        };
        (t.destination_port() == 22 && t.syn() && !t.ack()).then(|| {
            (
                f[..6].to_vec(),
                (
                    Ipv6Addr::from(ip.header().source()),
                    Ipv6Addr::from(ip.header().destination()),
                ),
            )
        })
    });
    assert_eq!(dst_mac, MAC);
    assert_eq!(src, (GW6, ME6));
    daemon.stop();
    client.join().unwrap();
}

/// A guest's flows close when the guest goes away: the VMM disconnects, the switch forgets the
/// guest's MAC and tells the gateway, which closes the host side of its connections.
#[test]
fn guest_leaving_closes_its_flows_on_the_host() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let text = format!(
        r#"
control_socket = "{d}/ctl.sock"
[[network]]
name = "nat"
mode = "nat"
dhcp = {{ lease_file = "{d}/nat.leases" }}
[network.nat]
host_loopback = true
dns = []
[[network.port]]
socket = "{d}/a.sock"
mac = "52:54:00:00:02:0f"
"#,
        d = d.display()
    );
    let cfg = Config::from_toml(&text, std::path::Path::new("nat.toml")).unwrap();
    let daemon = Daemon::start(cfg).unwrap();
    let mut g = Guest::connect(d.join("a.sock"), GuestConfig::default()).unwrap();
    let gw = gateway_mac(&mut g);

    // The guest's handshake with the host server (through host_loopback at the gateway).
    let tcp = |seq: u32, ack: Option<u32>| {
        let b = PacketBuilder::ethernet2(MAC, gw)
            .ipv4(ME, GW, 64)
            .tcp(42000, port, seq, 64240);
        let b = match ack {
            Some(a) => b.ack(a),
            None => b.syn(),
        };
        let mut f = Vec::new();
        b.write(&mut f, &[]).unwrap();
        f
    };
    g.send(0, &NetHdr::NONE, &tcp(1000, None)).unwrap();
    let server_seq = wait(&mut g, Duration::from_secs(5), |f| {
        let p = SlicedPacket::from_ethernet(f).ok()?;
        let Some(TransportSlice::Tcp(t)) = &p.transport else {
            return None;
        };
        (t.destination_port() == 42000 && t.syn() && t.ack()).then(|| t.sequence_number())
    });
    g.send(0, &NetHdr::NONE, &tcp(1001, Some(server_seq + 1)))
        .unwrap();
    let (mut conn, _) = server.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let nat = |daemon: &Daemon| daemon.stats().networks[0].nat.clone().unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while nat(&daemon)["tcp_flows"] != 1 {
        assert!(Instant::now() < end, "{:?}", nat(&daemon));
        std::thread::sleep(Duration::from_millis(20));
    }

    // The VMM goes away: the host side of the connection ends (EOF or reset), promptly.
    drop(g);
    let t0 = Instant::now();
    let mut b = [0u8; 16];
    loop {
        match conn.read(&mut b) {
            Ok(0) => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "the host connection outlived its guest: {:?}",
                    nat(&daemon)
                );
            }
            r => panic!("unexpected {r:?}"),
        }
    }
    let c = nat(&daemon);
    assert_eq!((c["tcp_flows"], c["closed_gone"]), (0, 1), "{c:?}");
    daemon.stop();
}
