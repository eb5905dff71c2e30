//! Software offloads at the edge: complete partial checksums and segment GSO frames for
//! destinations that cannot take them (see [`crate::OffloadCaps`]).
//!
//! # Theory of operation
//!
//! Between two guests that both negotiated CSUM/TSO a 64 KiB GSO frame crosses the switch whole.
//! When the destination did not negotiate what a frame needs, its RX path hands the frame to a
//! [`Segmenter`] (one per worker, reused) which turns it into frames the destination accepts:
//!
//! | frame's [`NetHdr`]                 | destination lacks         | what [`Segmenter::adapt`] emits                    |
//! |------------------------------------|---------------------------|----------------------------------------------------|
//! | anything `caps.accepts()`          | nothing                   | the frame and its header, untouched                |
//! | `NEEDS_CSUM`, no GSO               | `csum`                    | one frame, checksum completed at `csum_start`      |
//! | `GSO_TCPV4` / `GSO_TCPV6` (+ECN)   | `tso4` / `tso6` / `ecn`   | MSS-sized TCP segments, every checksum valid       |
//! | `GSO_UDP` over IPv4                | `ufo`                     | IPv4 fragments of one checksummed UDP datagram     |
//!
//! Emitted frames carry `NetHdr { flags: FLAG_DATA_VALID, ..NetHdr::NONE }`: every checksum
//! in them is complete. A device may set DATA_VALID even when GUEST_CSUM was not negotiated
//! (virtio TC erratum of 2024-01, Linux commit 604141c036e1).
//!
//! The frame is copied once into a scratch buffer (guest memory is shared and may change under
//! us: every decision is made on the copy). Each segment is then emitted as a two-piece
//! [`SlicesFrame`]: a rewritten header in a small stack buffer, and a payload slice borrowed
//! from the scratch buffer; the sink copies it straight to its destination. The scratch buffer
//! grows once to the largest frame seen (at most [`MAX_FRAME_LEN`]); after that nothing is
//! allocated.
//!
//! ```text
//!   scratch: | eth | ip | tcp |  payload 0  |  payload 1  | ... |  payload n  |
//!                 \____________/      │
//!   segment i:  [ eth | ip' | tcp' ] + [ payload i ]     ip' = length, id+i, checksum
//!                 (stack header)     (borrowed slice)   tcp' = seq+i*mss, flags, checksum
//! ```
//!
//! The TCP/UDP payload is everything from the end of the L4 header to the end of the frame: the
//! IP length fields of a GSO frame are rewritten, never trusted (a guest may lie in them).
//!
//! Everything is validated before the first frame is emitted, so a malformed frame is dropped
//! whole (never half-delivered). Supported: Ethernet with at most one 802.1Q tag, IPv4 with
//! options, IPv6 without extension headers (extension headers are rejected), TCP with options.
//! UFO is supported over IPv4 only (IPv6 UFO would need a fragment header and is rejected).

use crate::frame::{
    Frame, SliceFrame, SlicesFrame, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN, ETH_HEADER_LEN,
    ETH_VLAN_HEADER_LEN,
};
use crate::hdr::{NetHdr, FLAG_DATA_VALID, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP};
use crate::stats::DropReason;

/// Largest frame the segmenter takes: a tagged Ethernet header, an IPv6 header and the largest
/// IPv6 payload (65535). IPv4 frames are further limited by the 16-bit total length.
pub const MAX_FRAME_LEN: usize = ETH_VLAN_HEADER_LEN + IPV6_HEADER_LEN + 0xffff;

/// Longest header a segment can carry: tagged Ethernet, IPv4 with 40 bytes of options, TCP with
/// 40 bytes of options. No emitted frame is longer than the input frame plus this.
pub const MAX_HEADERS_LEN: usize = ETH_VLAN_HEADER_LEN + 60 + 60;

const IPV4_MIN_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
const TCP_MIN_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
const IP_PROTO_TCP: u8 = 6;
const IP_PROTO_UDP: u8 = 17;

/// Why a frame could not be adapted. Every variant is counted as
/// [`DropReason::SoftwareOffload`]; [`Segmenter::last_error`] tells which one it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Longer than [`MAX_FRAME_LEN`], or than the IP length fields allow.
    #[error("Frame too long to segment")]
    TooLong,
    /// The frame ends inside its Ethernet, IP or L4 header.
    #[error("Frame ends inside its headers")]
    Truncated,
    /// `hdr_len` of a GSO frame points past the end of the frame.
    #[error("Header length beyond the frame")]
    HdrLenBeyondFrame,
    /// The checksum start/offset do not fit in the frame.
    #[error("Checksum offsets out of range")]
    BadChecksumOffsets,
    /// `gso_size` is zero (or below 8 for UDP fragmentation).
    #[error("GSO size too small")]
    BadGsoSize,
    /// A GSO type this module does not know.
    #[error("Unknown GSO type {0:#04x}")]
    UnknownGsoType(u8),
    /// Neither IPv4 nor IPv6 (after at most one VLAN tag).
    #[error("Unsupported ethertype {0:#06x}")]
    UnsupportedEthertype(u16),
    /// The IP version does not match the ethertype or the GSO type, or the IHL is below 5.
    #[error("Malformed IP header")]
    BadIpHeader,
    /// The IPv4 packet is already a fragment.
    #[error("IPv4 fragment cannot be segmented")]
    Fragment,
    /// The L4 protocol is not the one the GSO type needs (IPv6 extension headers land here).
    #[error("Unexpected L4 protocol {0}")]
    WrongProtocol(u8),
    /// TCP data offset below 5.
    #[error("Malformed TCP header")]
    BadTcpHeader,
    /// UDP fragmentation over IPv6 is not implemented.
    #[error("UDP fragmentation over IPv6 is not supported")]
    UfoIpv6,
    /// The frame changed length while it was copied.
    #[error("Frame shorter than announced")]
    ShortRead,
}

impl From<Error> for DropReason {
    fn from(_: Error) -> Self {
        DropReason::SoftwareOffload
    }
}

type Result<T> = std::result::Result<T, Error>;

/// Field offsets, smoltcp style (relative to the start of each header).
mod field {
    #![allow(dead_code)]
    use std::ops::Range;

    pub mod eth {
        use super::Range;
        pub const ETHERTYPE: Range<usize> = 12..14;
        pub const INNER_ETHERTYPE: Range<usize> = 16..18;
    }

    pub mod ipv4 {
        use super::Range;
        pub const VER_IHL: usize = 0;
        pub const TOTAL_LEN: Range<usize> = 2..4;
        pub const IDENT: Range<usize> = 4..6;
        pub const FLG_OFF: Range<usize> = 6..8;
        pub const PROTOCOL: usize = 9;
        pub const CHECKSUM: Range<usize> = 10..12;
        pub const SRC_ADDR: Range<usize> = 12..16;
        pub const DST_ADDR: Range<usize> = 16..20;
        /// "More fragments" in the flags/offset word.
        pub const FLAG_MF: u16 = 0x2000;
        /// "Don't fragment".
        pub const FLAG_DF: u16 = 0x4000;
        pub const OFFSET_MASK: u16 = 0x1fff;
    }

    pub mod ipv6 {
        use super::Range;
        pub const VER_TC_FLOW: usize = 0;
        pub const PAYLOAD_LEN: Range<usize> = 4..6;
        pub const NXT_HDR: usize = 6;
        pub const SRC_ADDR: Range<usize> = 8..24;
        pub const DST_ADDR: Range<usize> = 24..40;
    }

    pub mod tcp {
        use super::Range;
        pub const SEQ_NUM: Range<usize> = 4..8;
        pub const DATA_OFF: usize = 12;
        pub const FLAGS: usize = 13;
        pub const CHECKSUM: Range<usize> = 16..18;
        pub const FLG_FIN: u8 = 0x01;
        pub const FLG_PSH: u8 = 0x08;
        pub const FLG_CWR: u8 = 0x80;
    }

    pub mod udp {
        use super::Range;
        pub const LENGTH: Range<usize> = 4..6;
        pub const CHECKSUM: Range<usize> = 6..8;
    }
}

/// Internet checksum (RFC 1071) building blocks.
///
/// A running sum is a `u64` of big-endian 16-bit words; [`checksum::accumulate`] adds bytes to
/// it and [`checksum::fold`] reduces it to 16 bits. The checksum to store is `!fold(sum)`.
/// Pieces fed one after the other must each have an even length except the last (a trailing
/// odd byte is padded with zero, as in the RFC).
pub mod checksum {
    /// Add `data` to the running sum `sum`.
    pub fn accumulate(sum: u64, data: &[u8]) -> u64 {
        // Keep the incoming sum below 2^33 so 64 KiB of 32-bit words cannot overflow; folding
        // the high half into the low half preserves the value modulo 0xffff.
        let mut s = (sum & 0xffff_ffff) + (sum >> 32);
        let mut words = data.chunks_exact(4);
        for w in &mut words {
            s += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
        }
        let rest = words.remainder();
        let mut tail = [0u8; 4];
        tail[..rest.len()].copy_from_slice(rest);
        s + u64::from(u32::from_be_bytes(tail))
    }

    /// Reduce a running sum to 16 bits (ones' complement addition; not complemented).
    pub fn fold(sum: u64) -> u16 {
        let mut s = sum;
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        // The loop leaves s <= 0xffff.
        s as u16
    }

    /// The Internet checksum of `data`: `!fold(accumulate(0, data))`.
    pub fn checksum(data: &[u8]) -> u16 {
        !fold(accumulate(0, data))
    }

    /// The running sum of an IPv4 pseudo-header (addresses, protocol, upper-layer length).
    pub fn pseudo_header_v4(src: &[u8], dst: &[u8], proto: u8, len: u32) -> u64 {
        let s = accumulate(accumulate(0, src), dst);
        s + u64::from(proto) + u64::from(len)
    }

    /// The running sum of an IPv6 pseudo-header (addresses, upper-layer length, next header).
    pub fn pseudo_header_v6(src: &[u8], dst: &[u8], proto: u8, len: u32) -> u64 {
        let s = accumulate(accumulate(0, src), dst);
        s + u64::from(proto) + u64::from(len >> 16) + u64::from(len & 0xffff)
    }
}

/// Where the headers of a parsed frame are.
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// Start of the IP header.
    l3: usize,
    /// Start of the L4 header (end of the IP header).
    l4: usize,
    /// End of the L4 header: start of the payload.
    payload: usize,
    ipv6: bool,
}

fn be16(b: &[u8], r: std::ops::Range<usize>) -> u16 {
    u16::from_be_bytes([b[r.start], b[r.start + 1]])
}

fn put16(b: &mut [u8], r: std::ops::Range<usize>, v: u16) {
    b[r].copy_from_slice(&v.to_be_bytes());
}

/// Parse Ethernet (+ one VLAN tag) and IP; check that the L4 protocol is `proto` and that its
/// header fits. `frame` is the whole frame.
fn parse(frame: &[u8], proto: u8) -> Result<Layout> {
    use field::{eth, ipv4, ipv6, tcp};
    let len = frame.len();
    if len < ETH_HEADER_LEN {
        return Err(Error::Truncated);
    }
    let mut ethertype = be16(frame, eth::ETHERTYPE);
    let mut l3 = ETH_HEADER_LEN;
    if ethertype == ETHERTYPE_VLAN {
        if len < ETH_VLAN_HEADER_LEN {
            return Err(Error::Truncated);
        }
        ethertype = be16(frame, eth::INNER_ETHERTYPE);
        l3 = ETH_VLAN_HEADER_LEN;
    }
    let ip = &frame[l3..];
    let (l4, ipv6, l4_proto) = match ethertype {
        ETHERTYPE_IPV4 => {
            if ip.len() < IPV4_MIN_HEADER_LEN {
                return Err(Error::Truncated);
            }
            if ip[ipv4::VER_IHL] >> 4 != 4 {
                return Err(Error::BadIpHeader);
            }
            let ihl = usize::from(ip[ipv4::VER_IHL] & 0x0f) * 4;
            if ihl < IPV4_MIN_HEADER_LEN {
                return Err(Error::BadIpHeader);
            }
            if ip.len() < ihl {
                return Err(Error::Truncated);
            }
            if ip.len() > 0xffff {
                return Err(Error::TooLong);
            }
            let frag = be16(ip, ipv4::FLG_OFF);
            if frag & (ipv4::FLAG_MF | ipv4::OFFSET_MASK) != 0 {
                return Err(Error::Fragment);
            }
            (l3 + ihl, false, ip[ipv4::PROTOCOL])
        }
        ETHERTYPE_IPV6 => {
            if ip.len() < IPV6_HEADER_LEN {
                return Err(Error::Truncated);
            }
            if ip[ipv6::VER_TC_FLOW] >> 4 != 6 {
                return Err(Error::BadIpHeader);
            }
            if ip.len() - IPV6_HEADER_LEN > 0xffff {
                return Err(Error::TooLong);
            }
            (l3 + IPV6_HEADER_LEN, true, ip[ipv6::NXT_HDR])
        }
        other => return Err(Error::UnsupportedEthertype(other)),
    };
    if l4_proto != proto {
        return Err(Error::WrongProtocol(l4_proto));
    }
    let l4_hdr = &frame[l4..];
    let l4_len = if proto == IP_PROTO_TCP {
        if l4_hdr.len() < TCP_MIN_HEADER_LEN {
            return Err(Error::Truncated);
        }
        let doff = usize::from(l4_hdr[tcp::DATA_OFF] >> 4) * 4;
        if doff < TCP_MIN_HEADER_LEN {
            return Err(Error::BadTcpHeader);
        }
        doff
    } else {
        UDP_HEADER_LEN
    };
    if l4_hdr.len() < l4_len {
        return Err(Error::Truncated);
    }
    Ok(Layout {
        l3,
        l4,
        payload: l4 + l4_len,
        ipv6,
    })
}

/// What to do with a frame, decided from its metadata before the frame is touched.
#[derive(Clone, Copy, Debug)]
enum Job {
    /// Nothing to compute (a stray ECN bit without GSO): emit with a cleaned header.
    Clean,
    /// Complete the checksum over `[start, end)` and store it at `at`.
    Checksum { start: usize, at: usize },
    /// Segment TCP into `mss`-byte payloads.
    Tso { mss: usize, ipv6: bool },
    /// Fragment one IPv4/UDP datagram into `frag`-byte IP payloads.
    Ufo { frag: usize },
}

impl Job {
    fn new(len: usize, hdr: &NetHdr) -> Result<Job> {
        if len > MAX_FRAME_LEN {
            return Err(Error::TooLong);
        }
        // hdr_len is only a hint (the headers are parsed), but a GSO frame shorter than its
        // announced headers is bogus. Linux ignores it on other frames, and so do we.
        if hdr.is_gso() && usize::from(hdr.hdr_len) > len {
            return Err(Error::HdrLenBeyondFrame);
        }
        match hdr.gso_kind() {
            GSO_NONE if hdr.needs_csum() => {
                let start = usize::from(hdr.csum_start);
                let at = start + usize::from(hdr.csum_offset);
                if at + 2 > len {
                    return Err(Error::BadChecksumOffsets);
                }
                Ok(Job::Checksum { start, at })
            }
            GSO_NONE => Ok(Job::Clean),
            kind @ (GSO_TCPV4 | GSO_TCPV6) => {
                if hdr.gso_size == 0 {
                    return Err(Error::BadGsoSize);
                }
                Ok(Job::Tso {
                    mss: usize::from(hdr.gso_size),
                    ipv6: kind == GSO_TCPV6,
                })
            }
            GSO_UDP => {
                // Fragment offsets count 8-byte units.
                let frag = usize::from(hdr.gso_size) & !7;
                if frag == 0 {
                    return Err(Error::BadGsoSize);
                }
                Ok(Job::Ufo { frag })
            }
            other => Err(Error::UnknownGsoType(other)),
        }
    }
}

/// The header of every frame the segmenter computed.
const OUT_HDR: NetHdr = NetHdr {
    flags: FLAG_DATA_VALID,
    ..NetHdr::NONE
};

/// Where [`Segmenter::adapt`] sends its frames.
type Emit<'e> = dyn FnMut(&dyn Frame, &NetHdr) -> std::result::Result<(), DropReason> + 'e;

/// Software checksum and segmentation for one worker; reuse it for every frame.
///
/// Owns a scratch copy of the frame being adapted (grown once, up to [`MAX_FRAME_LEN`]);
/// segment headers are rewritten in a small stack buffer.
#[derive(Debug, Default)]
pub struct Segmenter {
    buf: Vec<u8>,
    last_error: Option<Error>,
}

impl Segmenter {
    /// A segmenter with an empty scratch buffer (it grows on first use).
    pub fn new() -> Self {
        Segmenter {
            buf: Vec::new(),
            last_error: None,
        }
    }

    /// Why the last [`Segmenter::adapt`] that rejected a frame rejected it (for logs).
    pub fn last_error(&self) -> Option<Error> {
        self.last_error
    }

    /// Make `frame` + `hdr` acceptable to `caps`, calling `emit` once per resulting frame.
    ///
    /// - If `caps.accepts(hdr)`, the frame is emitted unchanged with its header.
    /// - A partial checksum (`NEEDS_CSUM`) is completed: the Internet checksum over
    ///   `[csum_start, end)` is folded into the 16-bit field at `csum_start + csum_offset`.
    /// - A TCPv4/TCPv6 GSO frame is cut into `gso_size`-byte payloads with replicated headers:
    ///   IPv4 total length, identification (+1 per segment) and header checksum, IPv6 payload
    ///   length, TCP sequence number (FIN/PSH on the last segment only, CWR on the first only)
    ///   and TCP checksum (with the pseudo-header) are rewritten. `csum_start`/`csum_offset`
    ///   are not needed (the headers are parsed) and not checked.
    /// - A UDP GSO (UFO) frame over IPv4 becomes IPv4 fragments of one datagram whose UDP
    ///   length and checksum are computed; each fragment carries at most `gso_size` (rounded
    ///   down to a multiple of 8) bytes of IP payload, all with the frame's identification.
    ///
    /// Emitted headers are `NetHdr { flags: FLAG_DATA_VALID, ..NetHdr::NONE }`. Returns how many
    /// frames were emitted. Malformed frames fail with [`DropReason::SoftwareOffload`] before
    /// anything is emitted (see [`Segmenter::last_error`]); an error from `emit` stops the work
    /// and is returned.
    pub fn adapt(
        &mut self,
        frame: &dyn Frame,
        hdr: &NetHdr,
        caps: crate::OffloadCaps,
        emit: &mut Emit<'_>,
    ) -> std::result::Result<usize, DropReason> {
        if caps.accepts(hdr) {
            emit(frame, hdr)?;
            return Ok(1);
        }
        let len = frame.len();
        let job = Job::new(len, hdr).map_err(|e| self.fail(e))?;
        if let Job::Clean = job {
            let clean = NetHdr {
                flags: hdr.flags & FLAG_DATA_VALID,
                ..NetHdr::NONE
            };
            emit(frame, &clean)?;
            return Ok(1);
        }
        self.load(frame, len).map_err(|e| self.fail(e))?;
        match job {
            Job::Clean => Ok(0), // emitted above, without a copy
            Job::Checksum { start, at } => {
                let b = &mut self.buf[..len];
                let c = complete(checksum::accumulate(0, &b[start..]));
                put16(b, at..at + 2, c);
                emit(&SliceFrame(b), &OUT_HDR)?;
                Ok(1)
            }
            Job::Tso { mss, ipv6 } => {
                let layout = self.tso_layout(len, ipv6).map_err(|e| self.fail(e))?;
                self.tso(len, layout, mss, emit)
            }
            Job::Ufo { frag } => {
                let layout = self.ufo_layout(len).map_err(|e| self.fail(e))?;
                self.ufo(len, layout, frag, emit)
            }
        }
    }

    fn fail(&mut self, e: Error) -> DropReason {
        self.last_error = Some(e);
        e.into()
    }

    /// Copy the frame into the scratch buffer (grows it only for a larger frame than ever).
    fn load(&mut self, frame: &dyn Frame, len: usize) -> Result<()> {
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        if frame.read_at(0, &mut self.buf[..len]) != len {
            return Err(Error::ShortRead);
        }
        Ok(())
    }

    fn tso_layout(&self, len: usize, ipv6: bool) -> Result<Layout> {
        let layout = parse(&self.buf[..len], IP_PROTO_TCP)?;
        if layout.ipv6 != ipv6 {
            return Err(Error::BadIpHeader);
        }
        if layout.payload > MAX_HEADERS_LEN {
            return Err(Error::TooLong);
        }
        Ok(layout)
    }

    fn ufo_layout(&self, len: usize) -> Result<Layout> {
        let layout = parse(&self.buf[..len], IP_PROTO_UDP)?;
        if layout.ipv6 {
            return Err(Error::UfoIpv6);
        }
        Ok(layout)
    }

    /// Emit the TCP segments of the frame in the scratch buffer.
    fn tso(
        &self,
        len: usize,
        layout: Layout,
        mss: usize,
        emit: &mut Emit<'_>,
    ) -> std::result::Result<usize, DropReason> {
        use field::{ipv4, ipv6, tcp};
        let frame = &self.buf[..len];
        let Layout {
            l3, l4, payload, ..
        } = layout;
        let ihl = l4 - l3;
        let tcp_hl = payload - l4;
        let data = &frame[payload..];
        let nseg = data.len().div_ceil(mss).max(1);

        let mut h = [0u8; MAX_HEADERS_LEN];
        h[..payload].copy_from_slice(&frame[..payload]);
        let seq0 = u32::from_be_bytes(array4(&frame[l4 + tcp::SEQ_NUM.start..]));
        let flags0 = frame[l4 + tcp::FLAGS];
        let id0 = be16(&frame[l3..], ipv4::IDENT);

        for i in 0..nseg {
            let start = i * mss;
            let chunk = &data[start..data.len().min(start + mss)];
            // <= 65535: parse checked that the frame's IP payload fits the length fields.
            let seg_l4_len = tcp_hl + chunk.len();
            let (ip, th) = h[l3..payload].split_at_mut(ihl);
            let pseudo = if layout.ipv6 {
                put16(ip, ipv6::PAYLOAD_LEN, seg_l4_len as u16);
                checksum::pseudo_header_v6(
                    &ip[ipv6::SRC_ADDR],
                    &ip[ipv6::DST_ADDR],
                    IP_PROTO_TCP,
                    seg_l4_len as u32,
                )
            } else {
                put16(ip, ipv4::TOTAL_LEN, (ihl + seg_l4_len) as u16);
                put16(ip, ipv4::IDENT, id0.wrapping_add(i as u16));
                put16(ip, ipv4::CHECKSUM, 0);
                let c = checksum::checksum(ip);
                put16(ip, ipv4::CHECKSUM, c);
                checksum::pseudo_header_v4(
                    &ip[ipv4::SRC_ADDR],
                    &ip[ipv4::DST_ADDR],
                    IP_PROTO_TCP,
                    seg_l4_len as u32,
                )
            };
            let seq = seq0.wrapping_add((start & 0xffff_ffff) as u32);
            th[tcp::SEQ_NUM].copy_from_slice(&seq.to_be_bytes());
            let mut f = flags0;
            if i + 1 != nseg {
                f &= !(tcp::FLG_FIN | tcp::FLG_PSH);
            }
            if i != 0 {
                f &= !tcp::FLG_CWR;
            }
            th[tcp::FLAGS] = f;
            put16(th, tcp::CHECKSUM, 0);
            // The TCP header has an even length, so the payload sum can follow it.
            let sum = checksum::accumulate(checksum::accumulate(pseudo, th), chunk);
            put16(th, tcp::CHECKSUM, !checksum::fold(sum));

            let parts: [&[u8]; 2] = [&h[..payload], chunk];
            emit(&SlicesFrame(&parts), &OUT_HDR)?;
        }
        Ok(nseg)
    }

    /// Checksum the UDP datagram in the scratch buffer and emit it as IPv4 fragments.
    fn ufo(
        &mut self,
        len: usize,
        layout: Layout,
        frag: usize,
        emit: &mut Emit<'_>,
    ) -> std::result::Result<usize, DropReason> {
        use field::{ipv4, udp};
        let Layout { l3, l4, .. } = layout;
        let ihl = l4 - l3;
        {
            let b = &mut self.buf[..len];
            // <= 65535 - ihl: parse checked the IPv4 payload against the total length field.
            let udp_len = len - l4;
            let (ip, dgram) = b[l3..].split_at_mut(ihl);
            put16(dgram, udp::LENGTH, udp_len as u16);
            put16(dgram, udp::CHECKSUM, 0);
            let pseudo = checksum::pseudo_header_v4(
                &ip[ipv4::SRC_ADDR],
                &ip[ipv4::DST_ADDR],
                IP_PROTO_UDP,
                udp_len as u32,
            );
            let c = complete(checksum::accumulate(pseudo, dgram));
            put16(dgram, udp::CHECKSUM, c);
        }
        let frame = &self.buf[..len];
        let data = &frame[l4..];
        let n = data.len().div_ceil(frag);
        let mut h = [0u8; MAX_HEADERS_LEN];
        h[..l4].copy_from_slice(&frame[..l4]);
        for (i, piece) in data.chunks(frag).enumerate() {
            let ip = &mut h[l3..l4];
            put16(ip, ipv4::TOTAL_LEN, (ihl + piece.len()) as u16);
            // i * frag < 65536, so the offset in 8-byte units fits the 13-bit field.
            let offset = ((i * frag) >> 3) as u16 & ipv4::OFFSET_MASK;
            let mf = if i + 1 < n { ipv4::FLAG_MF } else { 0 };
            put16(ip, ipv4::FLG_OFF, offset | mf);
            put16(ip, ipv4::CHECKSUM, 0);
            let c = checksum::checksum(ip);
            put16(ip, ipv4::CHECKSUM, c);
            let parts: [&[u8]; 2] = [&h[..l4], piece];
            emit(&SlicesFrame(&parts), &OUT_HDR)?;
        }
        Ok(n)
    }
}

/// The checksum to store for a running sum that includes the checksum field as the sender left
/// it; a result of 0 is sent as 0xffff (the same value in ones' complement, and what UDP needs
/// since 0 there means "no checksum").
fn complete(sum: u64) -> u16 {
    match !checksum::fold(sum) {
        0 => 0xffff,
        c => c,
    }
}

fn array4(b: &[u8]) -> [u8; 4] {
    [b[0], b[1], b[2], b[3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hdr::{FLAG_NEEDS_CSUM, GSO_ECN};
    use crate::OffloadCaps;
    use etherparse::{
        Ethernet2Header, Ipv4Header, Ipv6Header, SingleVlanHeader, TcpHeader, UdpHeader,
    };

    /// The test-side RFC 1071 reference: 16-bit words, end-around carry, one at a time.
    fn reference_sum(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for w in data.chunks(2) {
            let v = u32::from(w[0]) << 8 | u32::from(*w.get(1).unwrap_or(&0));
            s += v;
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8 ^ (i >> 8) as u8).collect()
    }

    const SRC4: [u8; 4] = [10, 0, 0, 1];
    const DST4: [u8; 4] = [10, 0, 0, 2];
    const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    /// A TCP GSO frame as a guest hands it over: headers for the whole payload, a partial TCP
    /// checksum (the pseudo-header sum), and `hdr` saying how to cut it.
    struct Tcp {
        vlan: Option<u16>,
        ipv6: bool,
        ip_opts: usize,
        tcp_opts: usize,
        payload: usize,
        flags: u8,
        id: u16,
        seq: u32,
    }

    impl Default for Tcp {
        fn default() -> Self {
            Tcp {
                vlan: None,
                ipv6: false,
                ip_opts: 0,
                tcp_opts: 12,
                payload: 1000,
                flags: 0x10, // ACK
                id: 0xfff0,
                seq: 0xffff_f000,
            }
        }
    }

    impl Tcp {
        fn eth(&self, ethertype: u16) -> Vec<u8> {
            let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
            if let Some(v) = self.vlan {
                f.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
                f.extend_from_slice(&v.to_be_bytes());
            }
            f.extend_from_slice(&ethertype.to_be_bytes());
            f
        }

        /// (frame, offset of the TCP header)
        fn build(&self) -> (Vec<u8>, usize) {
            let tcp_len = 20 + self.tcp_opts + self.payload;
            let mut f;
            let pseudo;
            if self.ipv6 {
                f = self.eth(ETHERTYPE_IPV6);
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&(tcp_len as u16).to_be_bytes());
                f.extend_from_slice(&[IP_PROTO_TCP, 64]);
                f.extend_from_slice(&SRC6);
                f.extend_from_slice(&DST6);
                pseudo = checksum::pseudo_header_v6(&SRC6, &DST6, IP_PROTO_TCP, tcp_len as u32);
            } else {
                f = self.eth(ETHERTYPE_IPV4);
                let l3 = f.len();
                let ihl = 20 + self.ip_opts;
                f.push(0x40 | (ihl / 4) as u8);
                f.push(0);
                f.extend_from_slice(&((ihl + tcp_len) as u16).to_be_bytes());
                f.extend_from_slice(&self.id.to_be_bytes());
                f.extend_from_slice(&[0x40, 0, 64, IP_PROTO_TCP, 0, 0]);
                f.extend_from_slice(&SRC4);
                f.extend_from_slice(&DST4);
                f.extend(std::iter::repeat_n(1u8, self.ip_opts)); // NOPs
                let c = !reference_sum(&f[l3..]);
                f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
                pseudo = checksum::pseudo_header_v4(&SRC4, &DST4, IP_PROTO_TCP, tcp_len as u32);
            }
            let l4 = f.len();
            f.extend_from_slice(&1234u16.to_be_bytes());
            f.extend_from_slice(&80u16.to_be_bytes());
            f.extend_from_slice(&self.seq.to_be_bytes());
            f.extend_from_slice(&7u32.to_be_bytes());
            f.push((((20 + self.tcp_opts) / 4) as u8) << 4);
            f.push(self.flags);
            f.extend_from_slice(&[0xff, 0xff]);
            f.extend_from_slice(&checksum::fold(pseudo).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
            f.extend(std::iter::repeat_n(1u8, self.tcp_opts));
            f.extend_from_slice(&pattern(self.payload));
            (f, l4)
        }

        fn hdr(&self, mss: u16) -> NetHdr {
            let (f, l4) = self.build();
            NetHdr {
                flags: FLAG_NEEDS_CSUM,
                gso_type: if self.ipv6 { GSO_TCPV6 } else { GSO_TCPV4 },
                hdr_len: (f.len() - self.payload) as u16,
                gso_size: mss,
                csum_start: l4 as u16,
                csum_offset: 16,
            }
        }
    }

    type Emitted = Vec<(Vec<u8>, NetHdr)>;

    /// Run `adapt` and collect every emitted frame.
    fn run(
        seg: &mut Segmenter,
        frame: &dyn Frame,
        hdr: &NetHdr,
        caps: OffloadCaps,
    ) -> (std::result::Result<usize, DropReason>, Emitted) {
        let mut out = Vec::new();
        let r = seg.adapt(frame, hdr, caps, &mut |f, h| {
            let mut v = vec![0u8; f.len()];
            assert_eq!(f.read_at(0, &mut v), f.len());
            out.push((v, *h));
            Ok(())
        });
        (r, out)
    }

    /// Check every segment of `spec` cut at `mss` with etherparse; returns how many there were.
    fn check_tso(spec: &Tcp, mss: u16) -> usize {
        let (frame, _) = spec.build();
        let mut seg = Segmenter::new();
        let (r, out) = run(
            &mut seg,
            &SliceFrame(&frame),
            &spec.hdr(mss),
            OffloadCaps::NONE,
        );
        let mss = usize::from(mss);
        let n = spec.payload.div_ceil(mss).max(1);
        assert_eq!(r, Ok(n));
        assert_eq!(out.len(), n);
        let mut data = Vec::new();
        for (i, (f, h)) in out.iter().enumerate() {
            assert_eq!(*h, OUT_HDR);
            let (eth, rest) = Ethernet2Header::from_slice(f).unwrap();
            let rest = match spec.vlan {
                Some(v) => {
                    assert_eq!(eth.ether_type.0, ETHERTYPE_VLAN);
                    let (vh, rest) = SingleVlanHeader::from_slice(rest).unwrap();
                    assert_eq!(vh.vlan_id.value(), v);
                    rest
                }
                None => rest,
            };
            let (tcp, payload) = if spec.ipv6 {
                let (ip, rest) = Ipv6Header::from_slice(rest).unwrap();
                assert_eq!(usize::from(ip.payload_length), rest.len());
                let (tcp, payload) = TcpHeader::from_slice(rest).unwrap();
                assert_eq!(tcp.checksum, tcp.calc_checksum_ipv6(&ip, payload).unwrap());
                (tcp, payload)
            } else {
                let (ip, rest) = Ipv4Header::from_slice(rest).unwrap();
                assert_eq!(usize::from(ip.total_len), ip.header_len() + rest.len());
                assert_eq!(ip.header_len(), 20 + spec.ip_opts);
                assert_eq!(ip.identification, spec.id.wrapping_add(i as u16));
                assert_eq!(ip.header_checksum, ip.calc_header_checksum());
                assert!(ip.dont_fragment && !ip.more_fragments);
                let (tcp, payload) = TcpHeader::from_slice(rest).unwrap();
                assert_eq!(tcp.checksum, tcp.calc_checksum_ipv4(&ip, payload).unwrap());
                (tcp, payload)
            };
            assert_eq!(tcp.header_len(), 20 + spec.tcp_opts);
            assert_eq!(tcp.sequence_number, spec.seq.wrapping_add((i * mss) as u32));
            let last = i + 1 == n;
            assert_eq!(tcp.fin, last && spec.flags & 0x01 != 0, "fin on {i}");
            assert_eq!(tcp.psh, last && spec.flags & 0x08 != 0, "psh on {i}");
            assert_eq!(tcp.cwr, i == 0 && spec.flags & 0x80 != 0, "cwr on {i}");
            assert_eq!(tcp.ece, spec.flags & 0x40 != 0);
            assert!(tcp.ack);
            if !last {
                assert_eq!(payload.len(), mss);
            }
            assert!(f.len() <= frame.len());
            data.extend_from_slice(payload);
        }
        assert_eq!(data, pattern(spec.payload));
        n
    }

    #[test]
    fn checksum_matches_reference() {
        // RFC 1071 section 3 example.
        let ex = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum::fold(checksum::accumulate(0, &ex)), 0xddf2);
        assert_eq!(checksum::checksum(&ex), !0xddf2);
        let mut rng = Rng(0x1234_5678_9abc_def0);
        for len in 0..300 {
            let d = rng.bytes(len);
            assert_eq!(
                checksum::fold(checksum::accumulate(0, &d)),
                reference_sum(&d),
                "{len}"
            );
            // Split at an even point: the running sum carries across pieces.
            let cut = (rng.next() as usize % (len + 1)) & !1;
            let s = checksum::accumulate(checksum::accumulate(0, &d[..cut]), &d[cut..]);
            assert_eq!(checksum::fold(s), reference_sum(&d));
        }
        // A huge running sum plus 64 KiB of 0xff: no overflow, same value.
        let big = vec![0xffu8; MAX_FRAME_LEN & !1];
        assert_eq!(checksum::fold(checksum::accumulate(u64::MAX >> 1, &big)), {
            let mut r = big.clone();
            r.extend_from_slice(&(u64::MAX >> 1).to_be_bytes());
            reference_sum(&r)
        });
    }

    /// Build a valid packet with etherparse, turn its L4 checksum into a partial one as a guest
    /// would, and check that completing it gives back etherparse's bytes.
    #[test]
    fn checksum_completion_matches_etherparse() {
        for (udp, vlan, len) in [
            (false, false, 1000),
            (true, false, 333),
            (true, true, 1),
            (false, true, 0),
        ] {
            let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
            let payload = pattern(len);
            let mut good = Vec::new();
            let (l4, off) = if vlan {
                let b = b
                    .single_vlan(etherparse::VlanId::try_new(42).unwrap())
                    .ipv4(SRC4, DST4, 64);
                if udp {
                    b.udp(53, 5353).write(&mut good, &payload).unwrap();
                } else {
                    b.tcp(1, 2, 3, 4).write(&mut good, &payload).unwrap();
                }
                (18 + 20, if udp { 6 } else { 16 })
            } else {
                let b = b.ipv6(SRC6, DST6, 64);
                if udp {
                    b.udp(53, 5353).write(&mut good, &payload).unwrap();
                } else {
                    b.tcp(1, 2, 3, 4).write(&mut good, &payload).unwrap();
                }
                (14 + 40, if udp { 6 } else { 16 })
            };
            let proto = if udp { IP_PROTO_UDP } else { IP_PROTO_TCP };
            let l4_len = (good.len() - l4) as u32;
            let pseudo = if vlan {
                checksum::pseudo_header_v4(&SRC4, &DST4, proto, l4_len)
            } else {
                checksum::pseudo_header_v6(&SRC6, &DST6, proto, l4_len)
            };
            let mut partial = good.clone();
            partial[l4 + off..l4 + off + 2].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
            assert_ne!(partial, good);
            let hdr = NetHdr {
                flags: FLAG_NEEDS_CSUM,
                csum_start: l4 as u16,
                csum_offset: off as u16,
                ..NetHdr::NONE
            };
            let mut seg = Segmenter::new();
            let (r, out) = run(&mut seg, &SliceFrame(&partial), &hdr, OffloadCaps::NONE);
            assert_eq!(r, Ok(1));
            assert_eq!(out[0].0, good, "udp={udp} vlan={vlan} len={len}");
            assert_eq!(out[0].1, OUT_HDR);
        }
    }

    #[test]
    fn tso4_64k_into_mss_1448() {
        let spec = Tcp {
            payload: 0xffff - 20 - 32,
            flags: 0x10 | 0x08 | 0x01 | 0x80 | 0x40, // ACK PSH FIN CWR ECE
            ..Tcp::default()
        };
        assert_eq!(spec.build().0.len(), 14 + 0xffff);
        assert_eq!(check_tso(&spec, 1448), 46);
    }

    #[test]
    fn tso6_64k_into_mss_1448() {
        let spec = Tcp {
            ipv6: true,
            payload: 0xffff - 32,
            flags: 0x10 | 0x08 | 0x01,
            ..Tcp::default()
        };
        assert_eq!(check_tso(&spec, 1448), 46);
    }

    #[test]
    fn tso_vlan_and_options() {
        for ipv6 in [false, true] {
            let spec = Tcp {
                vlan: Some(100),
                ipv6,
                ip_opts: if ipv6 { 0 } else { 40 },
                tcp_opts: 40,
                payload: 20_000,
                flags: 0x10 | 0x80,
                ..Tcp::default()
            };
            assert_eq!(check_tso(&spec, 1400), 15);
        }
    }

    #[test]
    fn tso_odd_sizes() {
        // Exact multiple, a single short segment, a header-only frame, mss 1.
        for (payload, mss) in [(2896, 1448), (100, 1448), (0, 1448), (37, 1)] {
            check_tso(
                &Tcp {
                    payload,
                    ..Tcp::default()
                },
                mss,
            );
        }
    }

    #[test]
    fn tso_when_only_ecn_is_missing() {
        let spec = Tcp {
            flags: 0x10 | 0x80,
            payload: 5000,
            ..Tcp::default()
        };
        let (frame, _) = spec.build();
        let mut hdr = spec.hdr(1000);
        hdr.gso_type |= GSO_ECN;
        let caps = OffloadCaps {
            ecn: false,
            ..OffloadCaps::ALL
        };
        let (r, out) = run(&mut Segmenter::new(), &SliceFrame(&frame), &hdr, caps);
        assert_eq!(r, Ok(5));
        assert!(out
            .iter()
            .all(|(f, h)| *h == OUT_HDR && f.len() <= 14 + 20 + 32 + 1000));
    }

    #[test]
    fn ufo4_fragments() {
        let data = pattern(10_001);
        let mut f = Tcp::default().eth(ETHERTYPE_IPV4);
        let l3 = f.len();
        let ip = Ipv4Header::new(
            (8 + data.len()) as u16,
            64,
            etherparse::IpNumber::UDP,
            SRC4,
            DST4,
        )
        .unwrap();
        let mut ip = ip;
        ip.identification = 777;
        ip.dont_fragment = true;
        ip.header_checksum = ip.calc_header_checksum();
        ip.write(&mut f).unwrap();
        let l4 = f.len();
        // Length and checksum are left for the segmenter.
        f.extend_from_slice(&[0, 53, 0x14, 0xe9, 0, 0, 0, 0]);
        f.extend_from_slice(&data);
        let hdr = NetHdr {
            gso_type: GSO_UDP,
            gso_size: 1485, // rounded down to 1480
            hdr_len: l4 as u16,
            ..NetHdr::NONE
        };
        let (r, out) = run(
            &mut Segmenter::new(),
            &SliceFrame(&f),
            &hdr,
            OffloadCaps::NONE,
        );
        let n = (8 + data.len()).div_ceil(1480);
        assert_eq!(r, Ok(n));
        let mut dgram = Vec::new();
        for (i, (frag, h)) in out.iter().enumerate() {
            assert_eq!(*h, OUT_HDR);
            let (fip, rest) = Ipv4Header::from_slice(&frag[l3..]).unwrap();
            assert_eq!(fip.identification, 777);
            assert_eq!(fip.header_checksum, fip.calc_header_checksum());
            assert!(!fip.dont_fragment);
            assert_eq!(fip.more_fragments, i + 1 < n);
            assert_eq!(usize::from(fip.fragment_offset.value()) * 8, dgram.len());
            assert_eq!(usize::from(fip.total_len), 20 + rest.len());
            if i + 1 < n {
                assert_eq!(rest.len(), 1480);
            }
            dgram.extend_from_slice(rest);
        }
        let (udp, payload) = UdpHeader::from_slice(&dgram).unwrap();
        assert_eq!(usize::from(udp.length), dgram.len());
        assert_eq!(payload, &data[..]);
        assert_eq!(udp.checksum, udp.calc_checksum_ipv4(&ip, payload).unwrap());
    }

    #[test]
    fn pass_through_when_caps_accept() {
        let spec = Tcp {
            payload: 30_000,
            ..Tcp::default()
        };
        let (frame, l4) = spec.build();
        let hdr = spec.hdr(1448);
        let mut calls = 0;
        let r = Segmenter::new().adapt(&SliceFrame(&frame), &hdr, OffloadCaps::ALL, &mut |f, h| {
            calls += 1;
            assert_eq!(*h, hdr);
            let mut same = false;
            f.for_each_segment(&mut |s| {
                same = matches!(s, crate::Segment::Host(b) if b.as_ptr() == frame.as_ptr() && b.len() == frame.len());
                false
            });
            assert!(same, "the very same view");
            Ok(())
        });
        assert_eq!((r, calls), (Ok(1), 1));
        // A plain frame needs nothing, even with no caps.
        let plain = NetHdr::NONE;
        let (r, out) = run(
            &mut Segmenter::new(),
            &SliceFrame(&frame),
            &plain,
            OffloadCaps::NONE,
        );
        assert_eq!(r, Ok(1));
        assert_eq!((out[0].0.as_slice(), out[0].1), (frame.as_slice(), plain));
        // hdr_len is ignored without GSO.
        let sloppy = NetHdr {
            flags: FLAG_NEEDS_CSUM,
            hdr_len: 0xffff,
            csum_start: l4 as u16,
            csum_offset: 16,
            ..NetHdr::NONE
        };
        let (r, out) = run(
            &mut Segmenter::new(),
            &SliceFrame(&frame),
            &sloppy,
            OffloadCaps::NONE,
        );
        assert_eq!((r, out.len(), out[0].1), (Ok(1), 1, OUT_HDR));
        // A stray ECN bit without GSO is cleaned, the frame untouched.
        let stray = NetHdr {
            gso_type: GSO_ECN,
            flags: FLAG_DATA_VALID,
            ..NetHdr::NONE
        };
        let (r, out) = run(
            &mut Segmenter::new(),
            &SliceFrame(&frame),
            &stray,
            OffloadCaps::NONE,
        );
        assert_eq!(r, Ok(1));
        assert_eq!((out[0].0.as_slice(), out[0].1), (frame.as_slice(), OUT_HDR));
    }

    #[test]
    fn emit_error_stops_and_is_returned() {
        let spec = Tcp {
            payload: 10_000,
            ..Tcp::default()
        };
        let (frame, _) = spec.build();
        let mut calls = 0;
        let r = Segmenter::new().adapt(
            &SliceFrame(&frame),
            &spec.hdr(1000),
            OffloadCaps::NONE,
            &mut |_, _| {
                calls += 1;
                if calls == 3 {
                    Err(DropReason::NoRxBuffers)
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!((r, calls), (Err(DropReason::NoRxBuffers), 3));
    }

    #[test]
    fn scratch_does_not_grow_after_warm_up() {
        let big = Tcp {
            payload: 60_000,
            ..Tcp::default()
        };
        let small = Tcp {
            payload: 3_000,
            ..Tcp::default()
        };
        let mut seg = Segmenter::new();
        let (f, _) = big.build();
        run(&mut seg, &SliceFrame(&f), &big.hdr(1448), OffloadCaps::NONE)
            .0
            .unwrap();
        let (ptr, cap) = (seg.buf.as_ptr(), seg.buf.capacity());
        for spec in [&small, &big, &small] {
            let (f, _) = spec.build();
            run(
                &mut seg,
                &SliceFrame(&f),
                &spec.hdr(1448),
                OffloadCaps::NONE,
            )
            .0
            .unwrap();
        }
        assert_eq!((seg.buf.as_ptr(), seg.buf.capacity()), (ptr, cap));
    }

    /// A frame whose `len()` promises more than its segments hold.
    struct Liar<'a>(&'a [u8]);
    impl Frame for Liar<'_> {
        fn len(&self) -> usize {
            self.0.len() + 100
        }
        fn for_each_segment(&self, f: &mut dyn FnMut(crate::Segment<'_>) -> bool) {
            f(crate::Segment::Host(self.0));
        }
    }

    #[test]
    fn malformed_frames_are_rejected_before_any_emit() {
        let good = Tcp {
            payload: 3000,
            ..Tcp::default()
        };
        let (frame, l4) = good.build();
        let hdr = good.hdr(1000);
        let v6 = Tcp {
            ipv6: true,
            payload: 3000,
            ..Tcp::default()
        };
        let (frame6, _) = v6.build();
        let l3 = 14;
        let edit = |f: &[u8], at: usize, v: &[u8]| {
            let mut f = f.to_vec();
            f[at..at + v.len()].copy_from_slice(v);
            f
        };
        let udp4 = edit(&frame, l3 + 9, &[IP_PROTO_UDP]);
        let mut udp6 = edit(&frame6, l3 + 6, &[IP_PROTO_UDP]);
        udp6.truncate(200);
        let ufo = NetHdr {
            gso_type: GSO_UDP,
            gso_size: 1480,
            ..NetHdr::NONE
        };
        let mut huge = frame.clone();
        huge.resize(MAX_FRAME_LEN + 1, 0);
        let mut huge4 = frame.clone();
        huge4.resize(14 + 0x10000, 0);
        let mut vlan_short = frame[..16].to_vec();
        vlan_short[12..14].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        let cases: Vec<(&str, Vec<u8>, NetHdr)> = vec![
            ("gso_size 0", frame.clone(), NetHdr { gso_size: 0, ..hdr }),
            ("empty", Vec::new(), hdr),
            (
                "eth only",
                frame[..14].to_vec(),
                NetHdr { hdr_len: 0, ..hdr },
            ),
            ("vlan truncated", vlan_short, NetHdr { hdr_len: 0, ..hdr }),
            (
                "ip truncated",
                frame[..14 + 10].to_vec(),
                NetHdr { hdr_len: 0, ..hdr },
            ),
            (
                "tcp truncated",
                frame[..l4 + 10].to_vec(),
                NetHdr { hdr_len: 0, ..hdr },
            ),
            (
                "tcp options truncated",
                frame[..l4 + 24].to_vec(),
                NetHdr { hdr_len: 0, ..hdr },
            ),
            ("ihl < 5", edit(&frame, l3, &[0x44]), hdr),
            (
                "ip options past end",
                frame[..14 + 30]
                    .iter()
                    .copied()
                    .enumerate()
                    .map(|(i, b)| if i == l3 { 0x4f } else { b })
                    .collect(),
                NetHdr { hdr_len: 0, ..hdr },
            ),
            ("ip version 6 in ipv4", edit(&frame, l3, &[0x65]), hdr),
            (
                "tso6 on ipv4",
                frame.clone(),
                NetHdr {
                    gso_type: GSO_TCPV6,
                    ..hdr
                },
            ),
            (
                "tso4 on ipv6",
                frame6.clone(),
                NetHdr {
                    gso_type: GSO_TCPV4,
                    ..hdr
                },
            ),
            ("tcp doff < 5", edit(&frame, l4 + 12, &[0x40]), hdr),
            ("udp under tso", udp4.clone(), hdr),
            (
                "ipv6 extension header",
                edit(&frame6, l3 + 6, &[0]),
                NetHdr {
                    gso_type: GSO_TCPV6,
                    ..hdr
                },
            ),
            ("arp", edit(&frame, 12, &[0x08, 0x06]), hdr),
            ("qinq", edit(&frame, 12, &[0x88, 0xa8]), hdr),
            ("ipv4 fragment", edit(&frame, l3 + 6, &[0x20, 0]), hdr),
            ("ipv4 fragment offset", edit(&frame, l3 + 6, &[0, 1]), hdr),
            (
                "hdr_len beyond frame",
                frame.clone(),
                NetHdr {
                    hdr_len: frame.len() as u16 + 1,
                    ..hdr
                },
            ),
            (
                "unknown gso type",
                frame.clone(),
                NetHdr { gso_type: 2, ..hdr },
            ),
            (
                "unknown gso type 5",
                frame.clone(),
                NetHdr {
                    gso_type: 5 | GSO_ECN,
                    ..hdr
                },
            ),
            ("longer than 64 KiB", huge, hdr),
            ("ipv4 longer than 64 KiB", huge4, hdr),
            (
                "csum offset past end",
                frame.clone(),
                NetHdr {
                    flags: FLAG_NEEDS_CSUM,
                    csum_start: frame.len() as u16 - 2,
                    csum_offset: 1,
                    ..NetHdr::NONE
                },
            ),
            (
                "csum start past end",
                frame.clone(),
                NetHdr {
                    flags: FLAG_NEEDS_CSUM,
                    csum_start: frame.len() as u16 + 4,
                    csum_offset: 0,
                    ..NetHdr::NONE
                },
            ),
            (
                "csum offsets overflow",
                frame.clone(),
                NetHdr {
                    flags: FLAG_NEEDS_CSUM,
                    csum_start: 0xffff,
                    csum_offset: 0xffff,
                    ..NetHdr::NONE
                },
            ),
            (
                "ufo gso_size 7",
                udp4.clone(),
                NetHdr { gso_size: 7, ..ufo },
            ),
            ("ufo over ipv6", udp6, ufo),
            ("ufo on tcp", frame.clone(), ufo),
        ];
        for (name, f, h) in cases {
            let mut seg = Segmenter::new();
            let (r, out) = run(&mut seg, &SliceFrame(&f), &h, OffloadCaps::NONE);
            assert_eq!(
                r,
                Err(DropReason::SoftwareOffload),
                "{name}: {:?}",
                seg.last_error()
            );
            assert!(out.is_empty(), "{name}");
            assert!(seg.last_error().is_some(), "{name}");
        }
        let mut seg = Segmenter::new();
        let (r, out) = run(&mut seg, &Liar(&frame), &hdr, OffloadCaps::NONE);
        assert_eq!((r, out.len()), (Err(DropReason::SoftwareOffload), 0));
        assert_eq!(seg.last_error(), Some(Error::ShortRead));
        // And the good frame itself passes, so the cases above fail for their own reason.
        assert_eq!(
            run(
                &mut Segmenter::new(),
                &SliceFrame(&frame),
                &hdr,
                OffloadCaps::NONE
            )
            .0,
            Ok(3)
        );
        assert_eq!(
            run(
                &mut Segmenter::new(),
                &SliceFrame(&udp4),
                &ufo,
                OffloadCaps::NONE
            )
            .0,
            Ok(3)
        );
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = Rng(42);
        let spec = Tcp {
            payload: 600,
            ..Tcp::default()
        };
        let (base, _) = spec.build();
        let mut seg = Segmenter::new();
        for _ in 0..3000 {
            let mut f = base.clone();
            for _ in 0..(rng.next() % 6) {
                let i = rng.next() as usize % f.len();
                f[i] = rng.next() as u8;
            }
            f.truncate(rng.next() as usize % (f.len() + 1));
            let r = rng.next();
            let hdr = NetHdr {
                flags: (r & 3) as u8,
                gso_type: [0, 1, 3, 4, 0x81, 0x84, 7][(r >> 2) as usize % 7],
                hdr_len: (r >> 8) as u16 % 128,
                gso_size: (r >> 24) as u16 % 700,
                csum_start: (r >> 40) as u16 % 700,
                csum_offset: (r >> 50) as u16 % 32,
            };
            let caps = OffloadCaps {
                csum: r >> 60 & 1 == 1,
                ..OffloadCaps::NONE
            };
            let len = f.len();
            let _ = seg.adapt(&SliceFrame(&f), &hdr, caps, &mut |fr, h| {
                assert!(fr.len() <= len.max(1) + MAX_HEADERS_LEN);
                assert!(!h.is_gso());
                Ok(())
            });
        }
    }
}
