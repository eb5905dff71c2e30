//! Just enough of Ethernet, ARP, IPv4, UDP, ICMP and ICMPv6 to recognise what the services
//! answer and to build the answers: bounds-checked parsing of byte slices (no casts to
//! structs), field offsets as `Range` consts, builders that write into a reusable `Vec`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use thiserror::Error;
use virtnet_switch::frame::{ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETH_HEADER_LEN};
use virtnet_switch::gso::checksum;
use virtnet_switch::MacAddr;

/// Errors of parsing a frame the services received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    /// A header runs past the end of the frame.
    #[error("Truncated {0} header")]
    Truncated(&'static str),
    /// A header field has a value that makes no sense.
    #[error("Malformed {0} header")]
    Malformed(&'static str),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, WireError>;

/// Smallest Ethernet frame without FCS; shorter replies are zero-padded.
pub const MIN_FRAME: usize = 60;
/// IPv4 protocol numbers.
pub const PROTO_ICMP: u8 = 1;
/// UDP.
pub const PROTO_UDP: u8 = 17;
/// ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// ICMPv6 router solicitation.
pub const ICMPV6_RS: u8 = 133;
/// ICMPv6 router advertisement.
pub const ICMPV6_RA: u8 = 134;
/// Ethernet address of ff02::1 (all nodes).
pub const ALL_NODES_MAC: MacAddr = MacAddr([0x33, 0x33, 0, 0, 0, 1]);
/// Ethernet address of ff02::2 (all routers).
pub const ALL_ROUTERS_MAC: MacAddr = MacAddr([0x33, 0x33, 0, 0, 0, 2]);

mod field {
    use std::ops::Range;
    // Ethernet.
    pub const ETH_DST: Range<usize> = 0..6;
    pub const ETH_SRC: Range<usize> = 6..12;
    pub const ETHERTYPE: Range<usize> = 12..14;
    // ARP (Ethernet/IPv4), from the start of the ARP packet.
    pub const ARP_FIXED: Range<usize> = 0..6; // htype, ptype, hlen, plen
    pub const ARP_OPER: Range<usize> = 6..8;
    pub const ARP_SHA: Range<usize> = 8..14;
    pub const ARP_SPA: Range<usize> = 14..18;
    pub const ARP_TPA: Range<usize> = 24..28;
    pub const ARP_LEN: usize = 28;
    // IPv4.
    pub const V4_LEN: Range<usize> = 2..4;
    pub const V4_FRAG: Range<usize> = 6..8;
    pub const V4_PROTO: usize = 9;
    pub const V4_CSUM: Range<usize> = 10..12;
    pub const V4_SRC: Range<usize> = 12..16;
    pub const V4_DST: Range<usize> = 16..20;
    // UDP.
    pub const UDP_DPORT: Range<usize> = 2..4;
    pub const UDP_LEN: Range<usize> = 4..6;
    pub const UDP_CSUM: Range<usize> = 6..8;
    // IPv6.
    pub const V6_PLEN: Range<usize> = 4..6;
    pub const V6_NEXT: usize = 6;
    pub const V6_SRC: Range<usize> = 8..24;
    pub const V6_LEN: usize = 40;
}

/// What the services recognise in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// ARP request: who has `target`?
    ArpRequest {
        /// Sender MAC.
        sender_mac: MacAddr,
        /// Sender address.
        sender_ip: Ipv4Addr,
        /// Address asked for.
        target: Ipv4Addr,
    },
    /// A UDP datagram to the DHCP server port.
    Dhcp {
        /// The DHCP message.
        payload: &'a [u8],
    },
    /// ICMP echo request.
    Echo {
        /// Source address.
        src: Ipv4Addr,
        /// Destination address.
        dst: Ipv4Addr,
        /// The ICMP message from the identifier on (identifier, sequence, data).
        rest: &'a [u8],
    },
    /// ICMPv6 router solicitation.
    RouterSolicitation {
        /// Source address (unspecified when the host has none yet).
        src: Ipv6Addr,
    },
    /// Anything else.
    Other,
}

fn get<'a>(b: &'a [u8], r: Range<usize>, what: &'static str) -> Result<&'a [u8]> {
    b.get(r).ok_or(WireError::Truncated(what))
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn mac_at(b: &[u8], r: Range<usize>) -> MacAddr {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[r]);
    MacAddr(m)
}

fn v4_at(b: &[u8], r: Range<usize>) -> Ipv4Addr {
    let s = &b[r];
    Ipv4Addr::new(s[0], s[1], s[2], s[3])
}

/// Ethernet destination, source and ethertype of an untagged frame.
pub fn ethernet(frame: &[u8]) -> Result<(MacAddr, MacAddr, u16)> {
    if frame.len() < ETH_HEADER_LEN {
        return Err(WireError::Truncated("Ethernet"));
    }
    Ok((
        mac_at(frame, field::ETH_DST),
        mac_at(frame, field::ETH_SRC),
        be16(&frame[field::ETHERTYPE]),
    ))
}

/// Is this frame (whose first bytes are `head`) possibly for the services at `mac`/`ip`?
/// Cheap: looks at the Ethernet, IP and UDP/ICMP headers only. Used on the sender's thread.
pub fn is_for_services(head: &[u8], mac: MacAddr, ip: Ipv4Addr, ipv6: bool) -> bool {
    let Ok((dst, _, ethertype)) = ethernet(head) else {
        return false;
    };
    let l3 = &head[ETH_HEADER_LEN..];
    match ethertype {
        ETHERTYPE_ARP => {
            (dst == mac || dst.is_broadcast())
                && l3.get(field::ARP_TPA).is_some_and(|t| t == ip.octets())
        }
        ETHERTYPE_IPV4 if dst == mac || dst.is_broadcast() => {
            let Some(&vihl) = l3.first() else {
                return false;
            };
            let ihl = usize::from(vihl & 0x0f) * 4;
            match l3.get(field::V4_PROTO) {
                Some(&PROTO_UDP) => l3
                    .get(ihl + field::UDP_DPORT.start..ihl + field::UDP_DPORT.end)
                    .is_some_and(|p| be16(p) == crate::dhcp::SERVER_PORT),
                Some(&PROTO_ICMP) => l3.get(field::V4_DST).is_some_and(|d| d == ip.octets()),
                _ => false,
            }
        }
        ETHERTYPE_IPV6 if ipv6 && (dst == ALL_ROUTERS_MAC || dst == mac) => {
            l3.get(field::V6_NEXT) == Some(&PROTO_ICMPV6)
                && l3.get(field::V6_LEN) == Some(&ICMPV6_RS)
        }
        _ => false,
    }
}

/// Parse a frame the services received.
pub fn parse(frame: &[u8]) -> Result<Packet<'_>> {
    let (_, _, ethertype) = ethernet(frame)?;
    let l3 = &frame[ETH_HEADER_LEN..];
    match ethertype {
        ETHERTYPE_ARP => {
            let arp = get(l3, 0..field::ARP_LEN, "ARP")?;
            if arp[field::ARP_FIXED] != [0, 1, 8, 0, 6, 4] {
                return Err(WireError::Malformed("ARP"));
            }
            if be16(&arp[field::ARP_OPER]) != 1 {
                return Ok(Packet::Other);
            }
            Ok(Packet::ArpRequest {
                sender_mac: mac_at(arp, field::ARP_SHA),
                sender_ip: v4_at(arp, field::ARP_SPA),
                target: v4_at(arp, field::ARP_TPA),
            })
        }
        ETHERTYPE_IPV4 => {
            let vihl = *l3.first().ok_or(WireError::Truncated("IPv4"))?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return Err(WireError::Malformed("IPv4"));
            }
            let hdr = get(l3, 0..ihl, "IPv4")?;
            let total = usize::from(be16(&hdr[field::V4_LEN]));
            if total < ihl || total > l3.len() {
                return Err(WireError::Malformed("IPv4"));
            }
            // Fragments (MF set or an offset) are not reassembled.
            if be16(&hdr[field::V4_FRAG]) & 0x3fff != 0 {
                return Ok(Packet::Other);
            }
            let body = &l3[ihl..total];
            match hdr[field::V4_PROTO] {
                PROTO_UDP => {
                    let udp = get(body, 0..8, "UDP")?;
                    let len = usize::from(be16(&udp[field::UDP_LEN]));
                    if len < 8 || len > body.len() {
                        return Err(WireError::Malformed("UDP"));
                    }
                    if be16(&udp[field::UDP_DPORT]) != crate::dhcp::SERVER_PORT {
                        return Ok(Packet::Other);
                    }
                    Ok(Packet::Dhcp {
                        payload: &body[8..len],
                    })
                }
                PROTO_ICMP => {
                    let icmp = get(body, 0..8, "ICMP")?;
                    if icmp[0] != 8 || icmp[1] != 0 {
                        return Ok(Packet::Other);
                    }
                    if checksum::checksum(body) != 0 {
                        return Err(WireError::Malformed("ICMP"));
                    }
                    Ok(Packet::Echo {
                        src: v4_at(hdr, field::V4_SRC),
                        dst: v4_at(hdr, field::V4_DST),
                        rest: &body[4..],
                    })
                }
                _ => Ok(Packet::Other),
            }
        }
        ETHERTYPE_IPV6 => {
            let hdr = get(l3, 0..field::V6_LEN, "IPv6")?;
            if hdr[0] >> 4 != 6 {
                return Err(WireError::Malformed("IPv6"));
            }
            let plen = usize::from(be16(&hdr[field::V6_PLEN]));
            let body = get(l3, field::V6_LEN..field::V6_LEN + plen, "IPv6")?;
            if hdr[field::V6_NEXT] != PROTO_ICMPV6 || body.first() != Some(&ICMPV6_RS) {
                return Ok(Packet::Other);
            }
            let mut src = [0u8; 16];
            src.copy_from_slice(&hdr[field::V6_SRC]);
            Ok(Packet::RouterSolicitation {
                src: Ipv6Addr::from(src),
            })
        }
        _ => Ok(Packet::Other),
    }
}

fn eth_header(out: &mut Vec<u8>, dst: MacAddr, src: MacAddr, ethertype: u16) {
    out.clear();
    out.extend_from_slice(&dst.0);
    out.extend_from_slice(&src.0);
    out.extend_from_slice(&ethertype.to_be_bytes());
}

fn pad(out: &mut Vec<u8>) {
    if out.len() < MIN_FRAME {
        out.resize(MIN_FRAME, 0);
    }
}

/// An ARP reply from `mac`/`ip` to the asker.
pub fn arp_reply(out: &mut Vec<u8>, mac: MacAddr, ip: Ipv4Addr, to_mac: MacAddr, to_ip: Ipv4Addr) {
    eth_header(out, to_mac, mac, ETHERTYPE_ARP);
    out.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    out.extend_from_slice(&mac.0);
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&to_mac.0);
    out.extend_from_slice(&to_ip.octets());
    pad(out);
}

fn ipv4_header(out: &mut Vec<u8>, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, body_len: usize) {
    let start = out.len();
    let total = u16::try_from(20 + body_len).unwrap_or(u16::MAX);
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    let c = checksum::checksum(&out[start..start + 20]);
    out[start + field::V4_CSUM.start..start + field::V4_CSUM.end].copy_from_slice(&c.to_be_bytes());
}

/// A UDP/IPv4 frame carrying `payload`.
#[allow(clippy::too_many_arguments)]
pub fn udp4(
    out: &mut Vec<u8>,
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) {
    eth_header(out, dst_mac, src_mac, ETHERTYPE_IPV4);
    ipv4_header(out, src, dst, PROTO_UDP, 8 + payload.len());
    let start = out.len();
    let len = u16::try_from(8 + payload.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    let sum = checksum::pseudo_header_v4(&src.octets(), &dst.octets(), PROTO_UDP, u32::from(len));
    let mut c = !checksum::fold(checksum::accumulate(sum, &out[start..]));
    if c == 0 {
        c = 0xffff;
    }
    out[start + field::UDP_CSUM.start..start + field::UDP_CSUM.end]
        .copy_from_slice(&c.to_be_bytes());
    pad(out);
}

/// An ICMP echo reply answering a request whose identifier, sequence and data are `rest`.
pub fn echo_reply(
    out: &mut Vec<u8>,
    src_mac: MacAddr,
    dst_mac: MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    rest: &[u8],
) {
    eth_header(out, dst_mac, src_mac, ETHERTYPE_IPV4);
    ipv4_header(out, src, dst, PROTO_ICMP, 4 + rest.len());
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(rest);
    let c = checksum::checksum(&out[start..]);
    out[start + 2..start + 4].copy_from_slice(&c.to_be_bytes());
    pad(out);
}

/// The link-local address derived from a MAC (modified EUI-64).
pub fn link_local(mac: MacAddr) -> Ipv6Addr {
    let m = mac.0;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 2,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

/// What a router advertisement says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RaFields {
    /// The on-link, autonomous prefix.
    pub prefix: Ipv6Addr,
    /// Its length (64 for SLAAC).
    pub prefix_len: u8,
    /// Router lifetime: 0 means "not a default router".
    pub router_lifetime: u16,
    /// Prefix valid lifetime (s).
    pub valid: u32,
    /// Prefix preferred lifetime (s).
    pub preferred: u32,
    /// MTU option, if any.
    pub mtu: Option<u32>,
}

/// A router advertisement from `mac`'s link-local address to `dst` (ff02::1 or a host).
pub fn router_advertisement(
    out: &mut Vec<u8>,
    mac: MacAddr,
    dst_mac: MacAddr,
    dst: Ipv6Addr,
    ra: &RaFields,
) {
    let src = link_local(mac);
    let mut icmp = Vec::with_capacity(64);
    icmp.extend_from_slice(&[ICMPV6_RA, 0, 0, 0, 64, 0]);
    icmp.extend_from_slice(&ra.router_lifetime.to_be_bytes());
    icmp.extend_from_slice(&[0; 8]); // reachable time, retrans timer
    icmp.extend_from_slice(&[1, 1]); // source link-layer address
    icmp.extend_from_slice(&mac.0);
    if let Some(mtu) = ra.mtu {
        icmp.extend_from_slice(&[5, 1, 0, 0]);
        icmp.extend_from_slice(&mtu.to_be_bytes());
    }
    icmp.extend_from_slice(&[3, 4, ra.prefix_len, 0xc0]); // prefix information, L and A
    icmp.extend_from_slice(&ra.valid.to_be_bytes());
    icmp.extend_from_slice(&ra.preferred.to_be_bytes());
    icmp.extend_from_slice(&[0; 4]);
    icmp.extend_from_slice(&ra.prefix.octets());
    let len = u32::try_from(icmp.len()).unwrap_or(0);
    let sum = checksum::pseudo_header_v6(&src.octets(), &dst.octets(), PROTO_ICMPV6, len);
    let c = !checksum::fold(checksum::accumulate(sum, &icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());

    eth_header(out, dst_mac, mac, ETHERTYPE_IPV6);
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&u16::try_from(icmp.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&[PROTO_ICMPV6, 255]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    out.extend_from_slice(&icmp);
    pad(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xfe]);
    const GUEST: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
    const IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
    const GIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);

    fn arp_request(target: Ipv4Addr) -> Vec<u8> {
        let mut f = Vec::new();
        eth_header(&mut f, MacAddr::BROADCAST, GUEST, ETHERTYPE_ARP);
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&GUEST.0);
        f.extend_from_slice(&GIP.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target.octets());
        f
    }

    #[test]
    fn arp_request_and_reply() {
        let req = arp_request(IP);
        assert!(is_for_services(&req, MAC, IP, false));
        assert!(!is_for_services(&arp_request(GIP), MAC, IP, false));
        assert_eq!(
            parse(&req).unwrap(),
            Packet::ArpRequest {
                sender_mac: GUEST,
                sender_ip: GIP,
                target: IP
            }
        );
        let mut out = Vec::new();
        arp_reply(&mut out, MAC, IP, GUEST, GIP);
        assert_eq!(out.len(), MIN_FRAME);
        assert_eq!(&out[0..6], &GUEST.0);
        assert_eq!(&out[20..22], &[0, 2]);
        assert_eq!(&out[22..28], &MAC.0);
        assert_eq!(&out[28..32], &IP.octets());
        // A reply (op 2) is not answered.
        let mut f = req.clone();
        f[21] = 2;
        assert_eq!(parse(&f).unwrap(), Packet::Other);
        // Truncated and malformed ARP.
        assert_eq!(parse(&req[..30]), Err(WireError::Truncated("ARP")));
        let mut f = req;
        f[15] = 9;
        assert_eq!(parse(&f), Err(WireError::Malformed("ARP")));
    }

    #[test]
    fn udp_build_then_parse() {
        let mut out = Vec::new();
        udp4(
            &mut out,
            GUEST,
            MacAddr::BROADCAST,
            GIP,
            Ipv4Addr::BROADCAST,
            68,
            67,
            b"hello",
        );
        assert!(is_for_services(&out, MAC, IP, false));
        assert_eq!(parse(&out).unwrap(), Packet::Dhcp { payload: b"hello" });
        // The IPv4 header checksum verifies, and so does UDP's.
        assert_eq!(checksum::checksum(&out[14..34]), 0);
        let sum = checksum::pseudo_header_v4(&GIP.octets(), &[255; 4], PROTO_UDP, 13);
        assert_eq!(!checksum::fold(checksum::accumulate(sum, &out[34..47])), 0);
        // Lies in length fields are malformed, not panics.
        let mut f = out.clone();
        f[16] = 0xff;
        assert_eq!(parse(&f), Err(WireError::Malformed("IPv4")));
        let mut f = out.clone();
        f[38] = 0xff;
        assert_eq!(parse(&f), Err(WireError::Malformed("UDP")));
        let mut f = out.clone();
        f[14] = 0x41; // IHL 4
        assert_eq!(parse(&f), Err(WireError::Malformed("IPv4")));
        // Other UDP ports are not ours.
        udp4(&mut out, GUEST, MAC, GIP, IP, 68, 53, b"x");
        assert!(!is_for_services(&out, MAC, IP, false));
        assert_eq!(parse(&out).unwrap(), Packet::Other);
        // Every truncation of a valid frame parses without panicking.
        udp4(&mut out, GUEST, MAC, GIP, IP, 68, 67, b"payload");
        for n in 0..out.len() {
            let _ = parse(&out[..n]);
            let _ = is_for_services(&out[..n], MAC, IP, true);
        }
    }

    #[test]
    fn echo_request_and_reply() {
        let mut req = Vec::new();
        eth_header(&mut req, MAC, GUEST, ETHERTYPE_IPV4);
        ipv4_header(&mut req, GIP, IP, PROTO_ICMP, 12);
        let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1, b'p', b'i', b'n', b'g'];
        let c = checksum::checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        req.extend_from_slice(&icmp);
        assert!(is_for_services(&req, MAC, IP, false));
        let Packet::Echo { src, dst, rest } = parse(&req).unwrap() else {
            panic!("not an echo")
        };
        assert_eq!((src, dst), (GIP, IP));
        let mut out = Vec::new();
        echo_reply(&mut out, MAC, GUEST, IP, GIP, rest);
        assert_eq!(out[34], 0);
        assert_eq!(checksum::checksum(&out[34..46]), 0);
        assert_eq!(&out[38..46], &[0x12, 0x34, 0, 1, b'p', b'i', b'n', b'g']);
        // A bad ICMP checksum is malformed.
        req[40] ^= 1;
        assert_eq!(parse(&req), Err(WireError::Malformed("ICMP")));
    }

    #[test]
    fn router_solicitation_and_advertisement() {
        let ra = RaFields {
            prefix: "fd00:56::".parse().unwrap(),
            prefix_len: 64,
            router_lifetime: 0,
            valid: 86400,
            preferred: 14400,
            mtu: Some(1500),
        };
        let mut out = Vec::new();
        router_advertisement(
            &mut out,
            MAC,
            ALL_NODES_MAC,
            "ff02::1".parse().unwrap(),
            &ra,
        );
        assert_eq!(&out[0..6], &ALL_NODES_MAC.0);
        assert_eq!(out[20], PROTO_ICMPV6);
        assert_eq!(out[54], ICMPV6_RA);
        let src = link_local(MAC);
        assert_eq!(src, "fe80::ff:fe00:fe".parse::<Ipv6Addr>().unwrap());
        let plen = u32::from(be16(&out[18..20]));
        let sum = checksum::pseudo_header_v6(&out[22..38], &out[38..54], PROTO_ICMPV6, plen);
        let end = 54 + plen as usize;
        assert_eq!(!checksum::fold(checksum::accumulate(sum, &out[54..end])), 0);
        // An RS built by flipping the type of that frame (the services only look at the type).
        let mut rs = out.clone();
        rs[0..6].copy_from_slice(&ALL_ROUTERS_MAC.0);
        rs[54] = ICMPV6_RS;
        assert!(is_for_services(&rs, MAC, IP, true));
        assert!(!is_for_services(&rs, MAC, IP, false));
        assert_eq!(parse(&rs).unwrap(), Packet::RouterSolicitation { src });
    }
}
