//! A loss-recovery watchdog for one smoltcp 0.12 TCP connection, working on frames only.
//!
//! # Why
//!
//! smoltcp 0.12 can lose its retransmission timer while data (or a FIN) is still
//! unacknowledged, and then never retransmits: in `tcp.rs`, `Socket::process` calls
//! `timer.set_for_idle` on *every* ACK in CLOSE-WAIT (so a duplicate ACK cancels a pending
//! RTO), on a FIN received in FIN-WAIT-1 (→ CLOSING) and on ACKs in CLOSING, whatever is
//! still in flight. Fast retransmit does not save it either when the peer sends data too:
//! a duplicate ACK that carries payload resets the duplicate counter, so bidirectional
//! transfers never reach three. The connection then sits until keep-alive and the 300 s
//! timeout end it. That was the stall of `tcp_bulk_both_ways_over_loss`.
//!
//! # How
//!
//! The watchdog follows the sequence numbers of the segments the socket sends and of the
//! ACKs it receives. When something is outstanding and the peer's ACK has not moved for
//! [`RESCUE_AFTER`] (doubling up to [`RESCUE_MAX`] while nothing moves), it builds a pure
//! duplicate ACK as the peer would send it (peer's addresses, `seq` = what the socket last
//! acknowledged, `ack` = the peer's highest ACK, the peer's last window). smoltcp starts a
//! fast retransmit on exactly the third duplicate in a row, so the burst first resets its
//! counter (one ACK with another window, then one with the peer's window again: two window
//! updates), then repeats the duplicate three times. The fast retransmit resends from the
//! oldest unacknowledged byte. A healthy connection never gets there: its own RTO fires
//! first.

use std::net::IpAddr;
use std::time::Duration;

/// Outstanding data with no ACK progress for this long gets a rescue.
pub(crate) const RESCUE_AFTER: Duration = Duration::from_millis(500);
/// Longest interval between rescues of a silent peer.
pub(crate) const RESCUE_MAX: Duration = Duration::from_secs(8);
/// Duplicate ACKs smoltcp needs for a fast retransmit (exactly this many: it starts one on
/// the third, and further ones in CLOSING clear it again).
const DUP_ACKS: usize = 3;

const ETH_HDR: usize = 14;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// The fields of an Ethernet/IPv4-or-IPv6/TCP frame the watchdog needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seg {
    /// Ethernet destination and source.
    pub macs: ([u8; 6], [u8; 6]),
    /// IP source and destination (both IPv4 or both IPv6).
    pub ips: (IpAddr, IpAddr),
    /// TCP source and destination ports.
    pub ports: (u16, u16),
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (valid with the ACK flag).
    pub ack: u32,
    /// TCP flags.
    pub flags: u8,
    /// Raw window field.
    pub win: u16,
    /// Sequence space used: payload + SYN + FIN.
    pub len: u32,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The TCP segment and the addresses of an IPv4 packet.
fn tcp_in_ipv4(ip: &[u8]) -> Option<(&[u8], (IpAddr, IpAddr))> {
    if ip.len() < 20 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(be16(ip, 2));
    if ip[0] >> 4 != 4 || ip[9] != 6 || ihl < 20 || total < ihl + 20 || total > ip.len() {
        return None;
    }
    let a = |at: usize| IpAddr::from([ip[at], ip[at + 1], ip[at + 2], ip[at + 3]]);
    Some((&ip[ihl..total], (a(12), a(16))))
}

/// The TCP segment and the addresses of an IPv6 packet (TCP as the first next header).
fn tcp_in_ipv6(ip: &[u8]) -> Option<(&[u8], (IpAddr, IpAddr))> {
    if ip.len() < 40 + 20 || ip[0] >> 4 != 6 || ip[6] != 6 {
        return None;
    }
    let end = 40 + usize::from(be16(ip, 4));
    if end < 60 || end > ip.len() {
        return None;
    }
    let a = |at: usize| {
        let mut o = [0u8; 16];
        o.copy_from_slice(&ip[at..at + 16]);
        IpAddr::from(o)
    };
    Some((&ip[40..end], (a(8), a(24))))
}

/// Parse an Ethernet/IPv4/TCP or Ethernet/IPv6/TCP frame; `None` for anything else or
/// anything malformed.
pub(crate) fn parse(f: &[u8]) -> Option<Seg> {
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    if f.len() < ETH_HDR + 20 {
        return None;
    }
    let (t, ips) = match be16(f, 12) {
        0x0800 => tcp_in_ipv4(&f[ETH_HDR..])?,
        0x86dd => tcp_in_ipv6(&f[ETH_HDR..])?,
        _ => return None,
    };
    let doff = usize::from(t[12] >> 4) * 4;
    if doff < 20 || doff > t.len() {
        return None;
    }
    let flags = t[13];
    let payload = u32::try_from(t.len() - doff).ok()?;
    let mut mac = ([0u8; 6], [0u8; 6]);
    mac.0.copy_from_slice(&f[0..6]);
    mac.1.copy_from_slice(&f[6..12]);
    Some(Seg {
        macs: mac,
        ips,
        ports: (be16(t, 0), be16(t, 2)),
        seq: be32(t, 4),
        ack: be32(t, 8),
        flags,
        win: be16(t, 14),
        len: payload + u32::from(flags & SYN != 0) + u32::from(flags & FIN != 0),
    })
}

/// `a` after `b` in sequence space.
fn after(a: u32, b: u32) -> bool {
    let d = a.wrapping_sub(b);
    d != 0 && d < 1 << 31
}

/// The watchdog of one connection (see the module docs).
#[derive(Clone, Debug, Default)]
pub(crate) struct Rescue {
    /// Highest sequence number sent, plus one.
    snd_max: Option<u32>,
    /// Highest ACK received from the peer.
    snd_una: Option<u32>,
    /// What the socket last acknowledged (the peer's next sequence number).
    rcv_nxt: Option<u32>,
    /// The peer's last segment (addresses and window).
    peer: Option<Seg>,
    /// Start of the current wait for progress.
    since: Duration,
    /// Current wait.
    wait: Duration,
    /// Rescues so far.
    pub fired: u64,
}

impl Rescue {
    fn outstanding(&self) -> bool {
        match (self.snd_una, self.snd_max) {
            (Some(una), Some(max)) => after(max, una),
            _ => false,
        }
    }

    /// A segment the socket sent.
    pub(crate) fn sent(&mut self, now: Duration, s: &Seg) {
        if s.flags & RST != 0 {
            return;
        }
        if s.flags & ACK != 0 {
            self.rcv_nxt = Some(s.ack);
        }
        let end = s.seq.wrapping_add(s.len);
        if self.snd_max.is_none_or(|m| after(end, m)) {
            if !self.outstanding() {
                self.since = now;
                self.wait = RESCUE_AFTER;
            }
            self.snd_max = Some(end);
        }
    }

    /// A segment the peer sent to the socket.
    pub(crate) fn received(&mut self, now: Duration, s: &Seg) {
        if s.flags & RST != 0 || s.flags & ACK == 0 {
            return;
        }
        if self.snd_una.is_none_or(|u| after(s.ack, u)) {
            self.snd_una = Some(s.ack);
            self.since = now;
            self.wait = RESCUE_AFTER;
        }
        self.peer = Some(*s);
    }

    /// When a rescue is due, if anything is outstanding.
    pub(crate) fn due(&self) -> Option<Duration> {
        (self.outstanding() && self.peer.is_some() && self.rcv_nxt.is_some())
            .then(|| self.since + self.wait)
    }

    /// If a rescue is due at `now`: the frames to feed the socket, in order.
    pub(crate) fn fire(&mut self, now: Duration) -> Option<Vec<Vec<u8>>> {
        if self.due().is_none_or(|d| d > now) {
            return None;
        }
        let (p, ack, seq) = (self.peer?, self.snd_una?, self.rcv_nxt?);
        self.since = now;
        self.wait = (self.wait * 2).min(RESCUE_MAX);
        self.fired += 1;
        let other = Seg {
            win: p.win ^ 1,
            ..p
        };
        let mut burst = vec![ack_frame(&other, seq, ack)];
        burst.extend(std::iter::repeat_n(ack_frame(&p, seq, ack), 1 + DUP_ACKS));
        Some(burst)
    }
}

/// A pure ACK with the addresses and window of `p`.
fn ack_frame(p: &Seg, seq: u32, ack: u32) -> Vec<u8> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&p.ports.0.to_be_bytes());
    tcp[2..4].copy_from_slice(&p.ports.1.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = ACK;
    tcp[14..16].copy_from_slice(&p.win.to_be_bytes());
    let mut f = Vec::with_capacity(ETH_HDR + 60);
    f.extend_from_slice(&p.macs.0);
    f.extend_from_slice(&p.macs.1);
    match p.ips {
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let (src, dst) = (src.octets(), dst.octets());
            let pseudo = [&src[..], &dst[..], &20u32.to_be_bytes(), &[0, 0, 0, 6]].concat();
            let c = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = 6;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&src);
            ip[24..40].copy_from_slice(&dst);
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        (src, dst) => {
            let v4 = |a: IpAddr| match a {
                IpAddr::V4(a) => a.octets(),
                IpAddr::V6(_) => [0; 4],
            };
            let (src, dst) = (v4(src), v4(dst));
            let pseudo = [&src[..], &dst[..], &[0, 6], &20u16.to_be_bytes()[..]].concat();
            let c = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[6] = 0x40;
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&src);
            ip[16..20].copy_from_slice(&dst);
            let c = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            f.extend_from_slice(&ip);
        }
    }
    f.extend_from_slice(&tcp);
    f
}

fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for p in parts {
        for c in p.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(seq: u32, ack: u32, len: u32) -> Seg {
        Seg {
            macs: ([2; 6], [4; 6]),
            ips: ([10, 0, 2, 15].into(), [192, 0, 2, 80].into()),
            ports: (40000, 80),
            seq,
            ack,
            flags: ACK,
            win: 1000,
            len,
        }
    }

    #[test]
    fn fires_only_without_progress_and_backs_off() {
        let ms = Duration::from_millis;
        let mut r = Rescue::default();
        r.received(ms(0), &seg(500, 100, 0));
        assert_eq!(r.due(), None, "nothing sent yet");
        r.sent(ms(10), &seg(100, 500, 1000));
        assert_eq!(r.due(), Some(ms(10) + RESCUE_AFTER));
        assert!(r.fire(ms(400)).is_none());
        // Progress restarts the wait.
        r.received(ms(400), &seg(500, 600, 0));
        assert!(r.fire(ms(600)).is_none());
        let burst = r.fire(ms(900)).expect("due");
        assert_eq!(burst.len(), 5);
        assert_eq!(
            parse(&burst[0]).unwrap().win,
            1001,
            "resets the duplicate counter"
        );
        assert!(burst[1..].iter().all(|f| *f == burst[1]));
        let f = &burst[1];
        let s = parse(f).unwrap();
        assert_eq!(
            (s.seq, s.ack, s.win, s.len, s.flags),
            (500, 600, 1000, 0, ACK)
        );
        assert_eq!(s.ports, (40000, 80));
        assert_eq!(checksum(&[&f[14..34]]), 0, "IP checksum");
        assert_eq!(r.due(), Some(ms(900) + RESCUE_AFTER * 2), "backs off");
        // Everything acknowledged: quiet.
        r.received(ms(1000), &seg(500, 1100, 0));
        assert_eq!(r.due(), None);
        assert_eq!(r.fired, 1);
    }

    #[test]
    fn parse_rejects_non_tcp() {
        assert!(parse(&[0u8; 60]).is_none());
        let mut f = ack_frame(&seg(1, 2, 0), 1, 2);
        assert!(parse(&f).is_some());
        f[23] = 17;
        assert!(parse(&f).is_none());
        assert!(parse(&f[..40]).is_none());
    }

    #[test]
    fn ipv6_segments_parse_and_rescue() {
        let g: IpAddr = "fd00:10:0:2::15".parse().unwrap();
        let o: IpAddr = "2001:db8::80".parse().unwrap();
        let s6 = |seq, ack, len| Seg {
            ips: (g, o),
            ..seg(seq, ack, len)
        };
        let f = ack_frame(&s6(7, 9, 0), 7, 9);
        assert_eq!(f.len(), 14 + 40 + 20);
        let p = parse(&f).unwrap();
        assert_eq!((p.ips, p.seq, p.ack, p.len), ((g, o), 7, 9, 0));
        // TCP checksum over the IPv6 pseudo-header: summing it all in gives zero.
        let pseudo = [
            &f[22..38],
            &f[38..54],
            &20u32.to_be_bytes()[..],
            &[0, 0, 0, 6][..],
        ]
        .concat();
        assert_eq!(checksum(&[&pseudo, &f[54..]]), 0);
        // Payload length beyond the frame, or another next header: not a segment.
        let mut bad = f.clone();
        bad[19] = 200;
        assert!(parse(&bad).is_none());
        let mut bad = f.clone();
        bad[20] = 17;
        assert!(parse(&bad).is_none());
        // The watchdog works the same on IPv6 flows.
        let ms = Duration::from_millis;
        let mut r = Rescue::default();
        r.received(ms(0), &s6(500, 100, 0));
        r.sent(ms(0), &s6(100, 500, 1000));
        let burst = r.fire(ms(0) + RESCUE_AFTER).expect("due");
        assert!(burst
            .iter()
            .all(|f| parse(f).is_some_and(|s| s.ips == (g, o))));
    }
}
