//! Shared helpers of the integration tests: a switch with vhost-user ports on real Unix
//! sockets, guest-driver "VMs" connected to them, and frame builders/checkers.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use virtnet::guest::virtio_net as vn;
use virtnet::guest::{Guest, GuestConfig, Received};
use virtnet::switch::hdr::{FLAG_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6};
use virtnet::switch::{MacAddr, NetHdr, PortStatsSnapshot, Switch, SwitchConfig};
use virtnet::virtio::{NetConfig, NetPort};

/// An internal network: one switch and `n` vhost-user ports listening in a temp dir.
pub struct Net {
    pub switch: Arc<Switch>,
    pub ports: Vec<NetPort>,
    pub dir: tempfile::TempDir,
}

impl Net {
    /// `n` ports with the default device config, changed by `cfg(i, &mut NetConfig)`.
    pub fn new(n: usize, cfg: impl Fn(usize, &mut NetConfig)) -> Net {
        let switch = Switch::new(SwitchConfig {
            name: "test".into(),
            ..Default::default()
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let ports = (0..n)
            .map(|i| {
                let mut c = NetConfig {
                    name: format!("vm{i}"),
                    mac: Some(mac(i as u8 + 1)),
                    ..Default::default()
                };
                cfg(i, &mut c);
                NetPort::listen(switch.clone(), c, &dir.path().join(format!("vm{i}.sock")))
                    .expect("listen")
            })
            .collect();
        Net { switch, ports, dir }
    }

    pub fn socket(&self, i: usize) -> PathBuf {
        self.ports[i].socket_path().to_path_buf()
    }

    /// Connect a guest driver to port `i` and wait until the device runs.
    pub fn connect(&self, i: usize, config: GuestConfig) -> Guest {
        let g = Guest::connect(self.socket(i), config).expect("guest connect");
        self.wait_running(i);
        g
    }

    pub fn wait_running(&self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.ports[i].status().running {
            assert!(
                Instant::now() < deadline,
                "port {i} never started running: {:?}",
                self.ports[i].status()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stats(&self, i: usize) -> PortStatsSnapshot {
        self.ports[i].stats()
    }
}

pub fn mac(n: u8) -> MacAddr {
    MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, n])
}

/// Guest features without the given bits.
pub fn features_without(bits: u64) -> u64 {
    virtnet::guest::DEFAULT_FEATURES & !bits
}

/// An Ethernet/IPv4/UDP frame of exactly `len` bytes (>= 42) with valid checksums.
pub fn udp_frame(src: MacAddr, dst: MacAddr, sport: u16, dport: u16, len: usize) -> Vec<u8> {
    assert!(len >= 42);
    let payload: Vec<u8> = (0..len - 42)
        .map(|i| (i * 7 + sport as usize) as u8)
        .collect();
    let b = PacketBuilder::ethernet2(src.0, dst.0)
        .ipv4([10, 0, 0, src.0[5]], [10, 0, 0, dst.0[5]], 64)
        .udp(sport, dport);
    let mut out = Vec::with_capacity(len);
    b.write(&mut out, &payload).unwrap();
    assert_eq!(out.len(), len);
    out
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn sum16(data: &[u8]) -> u32 {
    let mut s = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s += u32::from(w);
    }
    s
}

/// A TCP frame carrying `payload_len` bytes as a Linux guest hands it to a TSO-capable NIC:
/// `NEEDS_CSUM` with the pseudo-header sum in the checksum field, and (when `mss` is given) GSO
/// metadata. IPv4 or IPv6.
pub fn tcp_gso_frame(
    src: MacAddr,
    dst: MacAddr,
    payload_len: usize,
    mss: Option<u16>,
    v6: bool,
) -> (NetHdr, Vec<u8>) {
    let payload: Vec<u8> = (0..payload_len).map(|i| (i % 251) as u8).collect();
    let mut out = Vec::new();
    let (l3_len, gso) = if v6 {
        let mut s = [0u8; 16];
        s[0] = 0xfd;
        s[15] = src.0[5];
        let mut d = s;
        d[15] = dst.0[5];
        PacketBuilder::ethernet2(src.0, dst.0)
            .ipv6(s, d, 64)
            .tcp(40000, 5201, 1_000_000, 65535)
            .ack(7)
            .psh()
            .write(&mut out, &payload)
            .unwrap();
        (40usize, GSO_TCPV6)
    } else {
        PacketBuilder::ethernet2(src.0, dst.0)
            .ipv4([10, 0, 0, src.0[5]], [10, 0, 0, dst.0[5]], 64)
            .tcp(40000, 5201, 1_000_000, 65535)
            .ack(7)
            .psh()
            .write(&mut out, &payload)
            .unwrap();
        (20usize, GSO_TCPV4)
    };
    let l4 = 14 + l3_len;
    let tcp_len = out.len() - l4;
    // Pseudo-header sum, not complemented, in the checksum field (CHECKSUM_PARTIAL).
    let mut ph = 0u32;
    if v6 {
        ph += sum16(&out[14 + 8..14 + 40]);
    } else {
        ph += sum16(&out[14 + 12..14 + 20]);
    }
    ph += 6 + tcp_len as u32;
    let partial = fold(ph);
    out[l4 + 16..l4 + 18].copy_from_slice(&partial.to_be_bytes());
    let hdr = NetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: if mss.is_some() { gso } else { 0 },
        hdr_len: (l4 + 20) as u16,
        gso_size: mss.unwrap_or(0),
        csum_start: l4 as u16,
        csum_offset: 16,
    };
    (hdr, out)
}

/// Check a complete (non-partial) IPv4/IPv6 TCP or UDP frame: IP header checksum and L4
/// checksum. Returns (transport payload, tcp seq if TCP, tcp flags byte if TCP).
pub fn verify_l4(frame: &[u8]) -> (Vec<u8>, Option<u32>, Option<u8>) {
    let p = SlicedPacket::from_ethernet(frame).expect("parseable frame");
    let (src_dst_sum, ip_payload_len): (u32, usize) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            let hb = h.slice();
            assert_eq!(fold(sum16(hb)), 0xffff, "IPv4 header checksum");
            (sum16(&hb[12..20]), ip.payload().payload.len())
        }
        Some(NetSlice::Ipv6(ip)) => {
            let hb = ip.header().slice();
            (sum16(&hb[8..40]), ip.payload().payload.len())
        }
        other => panic!("not IP: {other:?}"),
    };
    let l4_off = frame.len() - ip_payload_len;
    let l4 = &frame[l4_off..];
    let (proto, seq, flags, payload) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => (
            6u32,
            Some(t.sequence_number()),
            Some(l4[13]),
            t.payload().to_vec(),
        ),
        Some(TransportSlice::Udp(u)) => (17u32, None, None, u.payload().to_vec()),
        other => panic!("not TCP/UDP: {other:?}"),
    };
    let total = src_dst_sum + proto + l4.len() as u32 + sum16(l4);
    assert_eq!(
        fold(total),
        0xffff,
        "L4 checksum of a {}-byte segment",
        l4.len()
    );
    (payload, seq, flags)
}

/// Everything that arrives on queue pair `qp` until `quiet` passes with nothing new.
pub fn drain(g: &mut Guest, qp: u16, quiet: Duration) -> Vec<Received> {
    let mut out = Vec::new();
    while let Some(r) = g.recv(qp, quiet).expect("recv") {
        out.push(r);
    }
    out
}

/// The next frame on `qp`, or panic after `timeout`.
pub fn expect_frame(g: &mut Guest, qp: u16, timeout: Duration) -> Received {
    g.recv(qp, timeout)
        .expect("recv")
        .expect("a frame should have arrived")
}

pub const F_GUEST_TSO: u64 = vn::F_GUEST_TSO4 | vn::F_GUEST_TSO6 | vn::F_GUEST_ECN;
pub const SHORT: Duration = Duration::from_millis(200);
pub const LONG: Duration = Duration::from_secs(3);

/// Poll `cond` until it holds or `timeout` passes; returns whether it held. Counters are
/// updated by device threads right after they publish used entries, so a test that saw the
/// used entry may still have to wait a moment for the counter.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
