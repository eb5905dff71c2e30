//! The NAT gateway's translation engine under a hostile guest and a confused host side.
//!
//! A sequence of operations on one [`SmolEngine`] (IPv4 + IPv6, host loopback mapped, a low
//! per-guest flow limit): guest frames (well-formed IPv4/IPv6 TCP/UDP from [`FrameSpec`],
//! ICMP/ICMPv6, ARP, or raw bytes, addressed into the NAT's own subnets, optionally with
//! correct checksums, then corrupted/truncated), host events for flow ids the engine handed out
//! or made up, clock steps, a guest leaving, and `close_all` at the end. Invariants: nothing
//! panics; every frame the engine emits is a well-formed Ethernet frame from the gateway's MAC;
//! open flows never exceed the per-guest limit times the stations seen; after `close_all`
//! nothing stays open.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtnet_fuzz::{corrupt, Corruption, FrameSpec};
use virtnet_port_nat::engine::{FlowId, HostCmd, HostEvent};
use virtnet_port_nat::{Engine, NatPolicy, NatV6, SmolEngine};

const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const GW6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 2, 0, 0, 0, 2);
const LIMIT: usize = 8;

#[derive(Arbitrary, Debug)]
enum Dst {
    Gateway,
    LoopbackAlias,
    Outside,
    Loopback,
    Broadcast,
    Other([u8; 4]),
}

#[derive(Arbitrary, Debug)]
enum Frame {
    /// TCP or UDP over IPv4 or IPv6, readdressed into the NAT's networks.
    Ip {
        spec: FrameSpec,
        /// Guest (low byte of its address and MAC).
        guest: u8,
        dst: Dst,
        dport: u16,
        fix_checksums: bool,
    },
    /// ICMP echo (or any type) over IPv4, or ICMPv6 (echo, RS, NS …) over IPv6.
    Icmp {
        ipv6: bool,
        guest: u8,
        dst: Dst,
        kind: u8,
        code: u8,
        body: Vec<u8>,
        fix_checksums: bool,
    },
    /// ARP with a fuzzer-chosen operation and target.
    Arp { guest: u8, op: u8, target: Dst },
    /// Whatever bytes.
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Ev {
    Connected,
    Refused,
    Written(u16),
    Data(Vec<u8>),
    Eof,
    Reset,
    Inbound {
        guest: u8,
        port: u16,
        v6: bool,
    },
    UdpRecv(Vec<u8>),
    UdpInbound {
        guest: u8,
        port: u16,
        v6: bool,
        data: Vec<u8>,
    },
    Echo {
        seq: u16,
        data: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
enum Op {
    Guest {
        frame: Frame,
        corruptions: Vec<Corruption>,
        truncate: Option<u16>,
    },
    /// A host event for the n-th flow id the engine handed out (or a made-up one).
    Host {
        flow: u16,
        ev: Ev,
    },
    Advance {
        ms: u16,
    },
    GuestLeaves {
        guest: u8,
    },
}

fn guest_mac(g: u8) -> [u8; 6] {
    [0x52, 0x54, 0, 0, 2, g]
}

fn v4(dst: &Dst) -> Ipv4Addr {
    match dst {
        Dst::Gateway => GW,
        Dst::LoopbackAlias => Ipv4Addr::new(10, 0, 2, 4),
        Dst::Outside => Ipv4Addr::new(192, 0, 2, 80),
        Dst::Loopback => Ipv4Addr::LOCALHOST,
        Dst::Broadcast => Ipv4Addr::new(10, 0, 2, 255),
        Dst::Other(a) => Ipv4Addr::from(*a),
    }
}

fn v6(dst: &Dst) -> Ipv6Addr {
    match dst {
        Dst::Gateway => GW6,
        Dst::LoopbackAlias => Ipv6Addr::new(0xfd00, 0x10, 0, 2, 0, 0, 0, 4),
        Dst::Outside => Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x80),
        Dst::Loopback => Ipv6Addr::LOCALHOST,
        Dst::Broadcast => Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2),
        Dst::Other(a) => Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, u16::from(a[0]), u16::from(a[1])),
    }
}

fn sum(parts: &[&[u8]]) -> u16 {
    let mut s: u32 = 0;
    for p in parts {
        for c in p.chunks(2) {
            s += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
        }
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Readdress a built IPv4/IPv6 frame (no VLAN tag) and optionally fix its checksums.
fn readdress(f: &mut [u8], g: u8, dst: &Dst, dport: Option<u16>, fix: bool) {
    if f.len() < 14 {
        return;
    }
    f[0..6].copy_from_slice(&GW_MAC);
    f[6..12].copy_from_slice(&guest_mac(g));
    let ether = u16::from_be_bytes([f[12], f[13]]);
    let ip = &mut f[14..];
    if ether == 0x0800 && ip.len() >= 20 {
        let ihl = usize::from(ip[0] & 0xf) * 4;
        ip[12..16].copy_from_slice(&[10, 0, 2, 10 + g % 8]);
        ip[16..20].copy_from_slice(&v4(dst).octets());
        if ihl < 20 || ip.len() < ihl {
            return;
        }
        if let Some(p) = dport {
            if ip.len() >= ihl + 4 {
                ip[ihl + 2..ihl + 4].copy_from_slice(&p.to_be_bytes());
            }
        }
        if fix {
            ip[10..12].copy_from_slice(&[0, 0]);
            let c = sum(&[&ip[..ihl]]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            fix_l4(ip, ihl, ip[9], true);
        }
    } else if ether == 0x86dd && ip.len() >= 40 {
        let mut src = GW6.octets();
        src[15] = 0x10 + g % 8;
        ip[8..24].copy_from_slice(&src);
        ip[24..40].copy_from_slice(&v6(dst).octets());
        if let Some(p) = dport {
            if ip.len() >= 44 {
                ip[42..44].copy_from_slice(&p.to_be_bytes());
            }
        }
        if fix {
            fix_l4(ip, 40, ip[6], false);
        }
    }
}

/// Recompute the TCP/UDP/ICMP/ICMPv6 checksum of the transport at `ip[hl..]`.
fn fix_l4(ip: &mut [u8], hl: usize, proto: u8, is_v4: bool) {
    let off = match proto {
        6 => 16,
        17 => 6,
        1 | 58 => 2,
        _ => return,
    };
    if ip.len() < hl + off + 2 {
        return;
    }
    let len = ip.len() - hl;
    ip[hl + off..hl + off + 2].copy_from_slice(&[0, 0]);
    let c = if proto == 1 {
        sum(&[&ip[hl..]])
    } else if is_v4 {
        let pseudo = [&ip[12..20], &[0, proto], &(len as u16).to_be_bytes()[..]].concat();
        sum(&[&pseudo, &ip[hl..]])
    } else {
        let l = (len as u32).to_be_bytes();
        let pseudo = [&ip[8..40], &l[..], &[0, 0, 0, proto]].concat();
        sum(&[&pseudo, &ip[hl..]])
    };
    ip[hl + off..hl + off + 2].copy_from_slice(&c.to_be_bytes());
}

fn build(frame: &Frame, out: &mut Vec<u8>) -> Option<[u8; 6]> {
    out.clear();
    match frame {
        Frame::Ip {
            spec,
            guest,
            dst,
            dport,
            fix_checksums,
        } => {
            // No VLAN tag: the switch strips them before the gateway.
            let spec = match spec.clone() {
                FrameSpec::Ip {
                    ipv6,
                    ip_opts,
                    id,
                    l4,
                    payload,
                    ..
                } => FrameSpec::Ip {
                    vlan: None,
                    ipv6,
                    ip_opts,
                    id,
                    l4,
                    payload: payload % 3000,
                },
                raw => raw,
            };
            spec.build(out);
            readdress(out, *guest, dst, Some(*dport), *fix_checksums);
            Some(guest_mac(*guest))
        }
        Frame::Icmp {
            ipv6,
            guest,
            dst,
            kind,
            code,
            body,
            fix_checksums,
        } => {
            let body = &body[..body.len().min(1500)];
            let l4_len = 4 + body.len();
            out.extend_from_slice(&[0; 12]);
            if *ipv6 {
                out.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
                out.extend_from_slice(&(l4_len as u16).to_be_bytes());
                out.extend_from_slice(&[58, 255]);
                out.extend_from_slice(&[0; 32]);
            } else {
                out.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
                out.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
                out.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]);
                out.extend_from_slice(&[0; 8]);
            }
            out.extend_from_slice(&[*kind, *code, 0, 0]);
            out.extend_from_slice(body);
            readdress(out, *guest, dst, None, *fix_checksums);
            Some(guest_mac(*guest))
        }
        Frame::Arp { guest, op, target } => {
            let mac = guest_mac(*guest);
            out.extend_from_slice(&[0xff; 6]);
            out.extend_from_slice(&mac);
            out.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, *op]);
            out.extend_from_slice(&mac);
            out.extend_from_slice(&[10, 0, 2, 10 + guest % 8]);
            out.extend_from_slice(&[0; 6]);
            out.extend_from_slice(&v4(target).octets());
            Some(mac)
        }
        Frame::Raw(b) => {
            out.extend_from_slice(&b[..b.len().min(9000)]);
            None
        }
    }
}

fn guest_addr(g: u8, port: u16, v6addr: bool) -> SocketAddr {
    if v6addr {
        let mut a = GW6.octets();
        a[15] = 0x10 + g % 8;
        SocketAddr::new(IpAddr::from(a), port)
    } else {
        SocketAddr::new(Ipv4Addr::new(10, 0, 2, 10 + g % 8).into(), port)
    }
}

fn check_out(f: &[u8]) {
    assert!(f.len() >= 14, "runt frame from the gateway: {f:?}");
    assert_eq!(f[6..12], GW_MAC, "frame not from the gateway's MAC");
    assert!(
        f.len() <= 1514 + 4,
        "frame longer than the link MTU: {}",
        f.len()
    );
}

fuzz_target!(|ops: Vec<Op>| {
    let mut policy = NatPolicy::new(GW_MAC, GW, 24);
    policy.host_loopback = Some(Ipv4Addr::new(10, 0, 2, 4));
    policy.dns = vec!["127.0.0.1:53".parse().unwrap()];
    policy.max_flows_per_guest = LIMIT;
    let mut v6 = NatV6::new(GW6);
    v6.host_loopback = Some(Ipv6Addr::new(0xfd00, 0x10, 0, 2, 0, 0, 0, 4));
    policy.v6 = Some(v6);
    let Ok(mut eng) = SmolEngine::new(policy, 1) else {
        panic!("a valid policy is rejected");
    };
    let mut now = Duration::ZERO;
    let mut ids: Vec<FlowId> = Vec::new();
    let mut cmds = Vec::new();
    let mut frame = Vec::new();
    let mut stations = std::collections::HashSet::new();
    for op in ops.into_iter().take(256) {
        match op {
            Op::Guest {
                frame: spec,
                corruptions,
                truncate,
            } => {
                if let Some(mac) = build(&spec, &mut frame) {
                    stations.insert(mac);
                }
                corrupt(&mut frame, &corruptions, truncate);
                if frame.len() >= 12 {
                    let mut src = [0u8; 6];
                    src.copy_from_slice(&frame[6..12]);
                    stations.insert(src);
                }
                eng.guest_frame(now, &frame);
            }
            Op::Host { flow, ev } => {
                let id = ids
                    .get(usize::from(flow) % ids.len().max(1))
                    .copied()
                    .unwrap_or(u64::from(flow));
                let ev = match ev {
                    Ev::Connected => HostEvent::TcpConnected { id },
                    Ev::Refused => HostEvent::TcpRefused { id },
                    Ev::Written(n) => HostEvent::TcpWritten {
                        id,
                        n: usize::from(n),
                    },
                    Ev::Data(data) => HostEvent::TcpData { id, data },
                    Ev::Eof => HostEvent::TcpEof { id },
                    Ev::Reset => HostEvent::TcpReset { id },
                    Ev::Inbound { guest, port, v6 } => HostEvent::TcpInbound {
                        id: (1 << 63) | id,
                        guest: guest_addr(guest, port, v6),
                    },
                    Ev::UdpRecv(data) => HostEvent::UdpRecv { id, data },
                    Ev::UdpInbound {
                        guest,
                        port,
                        v6,
                        data,
                    } => HostEvent::UdpInbound {
                        id: (1 << 63) | id,
                        guest: guest_addr(guest, port, v6),
                        data,
                    },
                    Ev::Echo { seq, data } => HostEvent::EchoReply { id, seq, data },
                };
                eng.host_event(now, ev);
            }
            Op::Advance { ms } => now += Duration::from_millis(u64::from(ms)),
            Op::GuestLeaves { guest } => {
                eng.close_guest(guest_mac(guest), &mut |f: &[u8]| check_out(f), &mut cmds);
            }
        }
        eng.poll(now, &mut |f: &[u8]| check_out(f), &mut cmds);
        let _ = eng.poll_at(now);
        for c in cmds.drain(..) {
            let id = match c {
                HostCmd::TcpConnect { id, .. }
                | HostCmd::TcpSend { id, .. }
                | HostCmd::TcpRead { id }
                | HostCmd::TcpShutdown { id }
                | HostCmd::TcpClose { id, .. }
                | HostCmd::UdpSend { id, .. }
                | HostCmd::UdpClose { id }
                | HostCmd::Echo { id, .. }
                | HostCmd::EchoClose { id } => id,
            };
            if !ids.contains(&id) && ids.len() < 64 {
                ids.push(id);
            }
        }
        let s = eng.stats();
        // Inbound forwards to a guest not seen yet count under one "unknown" station.
        let bound = LIMIT * (stations.len() + 1);
        assert!(
            s.tcp_flows + s.udp_flows + s.icmp_flows <= bound,
            "{s:?} over {bound}"
        );
    }
    eng.close_all(&mut |f: &[u8]| check_out(f), &mut cmds);
    eng.poll(now, &mut |f: &[u8]| check_out(f), &mut cmds);
    let s = eng.stats();
    assert_eq!((s.tcp_flows, s.udp_flows, s.icmp_flows), (0, 0, 0), "{s:?}");
});
