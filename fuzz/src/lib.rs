//! Input types shared by the fuzz targets.
//!
//! Inputs are structure-aware: besides raw bytes, a [`FrameSpec`] builds a well-formed
//! Ethernet/IP/TCP-or-UDP frame (VLAN tag, IP and TCP options, payload size of the fuzzer's
//! choosing) which [`Corruption`]s then damage, so libFuzzer reaches the deep parsing and
//! segmentation paths in seconds instead of guessing ethertypes and checksums byte by byte.

#![deny(missing_docs)]

use arbitrary::Arbitrary;

/// Largest payload a built frame carries: 64 KiB minus the longest headers.
pub const MAX_PAYLOAD: usize = 0xffff - 60 - 60;

/// TCP or UDP, over IPv4 or IPv6.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// TCP with `opts` bytes of options (rounded to a multiple of 4, at most 40).
    Tcp {
        /// Option bytes.
        opts: u8,
        /// Flag byte (FIN, SYN, RST, PSH, ACK, URG, ECE, CWR).
        flags: u8,
        /// Sequence number.
        seq: u32,
    },
    /// UDP.
    Udp,
}

/// How to make a frame.
#[derive(Arbitrary, Debug, Clone)]
pub enum FrameSpec {
    /// Exactly these bytes.
    Raw(Vec<u8>),
    /// A well-formed IP packet in an Ethernet frame.
    Ip {
        /// 802.1Q tag (VLAN id in the low 12 bits).
        vlan: Option<u16>,
        /// IPv6 instead of IPv4.
        ipv6: bool,
        /// IPv4 option bytes (rounded to a multiple of 4, at most 40).
        ip_opts: u8,
        /// IPv4 identification.
        id: u16,
        /// The transport header.
        l4: L4,
        /// Payload length (reduced modulo [`MAX_PAYLOAD`] + 1).
        payload: u16,
    },
}

/// Where the headers of a built frame are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Built {
    /// Start of the L4 header (0 for raw frames).
    pub l4: usize,
    /// End of the L4 header (0 for raw frames).
    pub headers: usize,
    /// Offset of the L4 checksum relative to `l4`.
    pub csum_offset: usize,
}

/// Option bytes for a fuzzer-chosen count: a multiple of 4, at most 40.
pub fn options_len(n: u8) -> usize {
    (usize::from(n) % 41) & !3
}

fn push16(f: &mut Vec<u8>, v: u16) {
    f.extend_from_slice(&v.to_be_bytes());
}

impl FrameSpec {
    /// Write the frame into `out` (cleared first).
    pub fn build(&self, out: &mut Vec<u8>) -> Built {
        out.clear();
        let FrameSpec::Ip {
            vlan,
            ipv6,
            ip_opts,
            id,
            l4,
            payload,
        } = *self
        else {
            if let FrameSpec::Raw(b) = self {
                out.extend_from_slice(b);
            }
            return Built::default();
        };
        let payload = usize::from(payload) % (MAX_PAYLOAD + 1);
        let (proto, l4_hl) = match l4 {
            L4::Tcp { opts, .. } => (6u8, 20 + options_len(opts)),
            L4::Udp => (17u8, 8),
        };
        let l4_len = l4_hl + payload;
        out.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1]);
        if let Some(v) = vlan {
            push16(out, 0x8100);
            push16(out, v & 0x0fff);
        }
        if ipv6 {
            push16(out, 0x86dd);
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            push16(out, l4_len as u16);
            out.extend_from_slice(&[proto, 64]);
            out.extend_from_slice(&[0xfd; 16]);
            out.extend_from_slice(&[0xfe; 16]);
        } else {
            push16(out, 0x0800);
            let ihl = 20 + options_len(ip_opts);
            out.push(0x40 | (ihl / 4) as u8);
            out.push(0);
            push16(out, (ihl + l4_len).min(0xffff) as u16);
            push16(out, id);
            out.extend_from_slice(&[0x40, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
            out.resize(out.len() + ihl - 20, 1); // NOP options
        }
        let l4_start = out.len();
        push16(out, 1234);
        push16(out, 80);
        let csum_offset = match l4 {
            L4::Tcp { flags, seq, .. } => {
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&[0, 0, 0, 1]);
                out.push(((l4_hl / 4) as u8) << 4);
                out.push(flags);
                out.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
                out.resize(out.len() + l4_hl - 20, 1);
                16
            }
            L4::Udp => {
                push16(out, l4_len.min(0xffff) as u16);
                push16(out, 0);
                6
            }
        };
        let headers = out.len();
        out.extend((0..payload).map(|i| (i * 31 + 7) as u8));
        Built {
            l4: l4_start,
            headers,
            csum_offset,
        }
    }
}

/// Overwrite one byte (the index wraps around the frame length).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Corruption {
    /// Byte index, modulo the frame length.
    pub at: u16,
    /// New value.
    pub value: u8,
}

/// Apply corruptions, then truncate to `truncate` bytes if given.
pub fn corrupt(frame: &mut Vec<u8>, corruptions: &[Corruption], truncate: Option<u16>) {
    if !frame.is_empty() {
        for c in corruptions {
            let i = usize::from(c.at) % frame.len();
            frame[i] = c.value;
        }
    }
    if let Some(t) = truncate {
        frame.truncate(usize::from(t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_have_the_announced_layout() {
        let mut f = Vec::new();
        for (vlan, ipv6, l4) in [
            (None, false, L4::Udp),
            (Some(7), true, L4::Udp),
            (
                Some(7),
                false,
                L4::Tcp {
                    opts: 13,
                    flags: 0x18,
                    seq: 1,
                },
            ),
            (
                None,
                true,
                L4::Tcp {
                    opts: 255,
                    flags: 0x18,
                    seq: 1,
                },
            ),
        ] {
            let spec = FrameSpec::Ip {
                vlan,
                ipv6,
                ip_opts: 9,
                id: 1,
                l4,
                payload: 100,
            };
            let b = spec.build(&mut f);
            assert_eq!(f.len(), b.headers + 100);
            let l3 = if vlan.is_some() { 18 } else { 14 };
            let ihl = if ipv6 { 40 } else { 28 };
            assert_eq!(b.l4, l3 + ihl);
            let l4_hl = if let L4::Tcp { opts, .. } = l4 {
                20 + options_len(opts)
            } else {
                8
            };
            assert_eq!(b.headers - b.l4, l4_hl);
        }
    }

    /// The builder's frames must take the deep paths of the targets, or the fuzzer wastes its
    /// time on parse errors.
    #[test]
    fn built_frames_are_segmented() {
        use virtnet_switch::gso::Segmenter;
        use virtnet_switch::hdr::{FLAG_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP};
        use virtnet_switch::{NetHdr, OffloadCaps, SliceFrame};
        let mut f = Vec::new();
        let mut seg = Segmenter::new();
        for (ipv6, l4, gso_type) in [
            (
                false,
                L4::Tcp {
                    opts: 12,
                    flags: 0x19,
                    seq: 5,
                },
                GSO_TCPV4,
            ),
            (
                true,
                L4::Tcp {
                    opts: 0,
                    flags: 0x10,
                    seq: 5,
                },
                GSO_TCPV6,
            ),
            (false, L4::Udp, GSO_UDP),
        ] {
            let spec = FrameSpec::Ip {
                vlan: Some(3),
                ipv6,
                ip_opts: 8,
                id: 9,
                l4,
                payload: 5000,
            };
            let b = spec.build(&mut f);
            let hdr = NetHdr {
                flags: FLAG_NEEDS_CSUM,
                gso_type,
                hdr_len: b.headers as u16,
                gso_size: 1000,
                csum_start: b.l4 as u16,
                csum_offset: b.csum_offset as u16,
            };
            let n = seg.adapt(&SliceFrame(&f), &hdr, OffloadCaps::NONE, &mut |_, _| Ok(()));
            assert!(
                matches!(n, Ok(5..=6)),
                "{spec:?}: {n:?} {:?}",
                seg.last_error()
            );
        }
    }
}

/// A split virtqueue in a guest memory of two regions with a hole between them, shared by the
/// targets that drive the virtio engines (descriptor table and avail ring from virtio-queue's
/// `MockSplitQueue`, used ring placed by hand).
pub mod ring {
    use arbitrary::Arbitrary;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// Descriptor flag: the chain goes on at `next`.
    pub const F_NEXT: u16 = 1;
    /// Descriptor flag: device-writable.
    pub const F_WRITE: u16 = 2;
    /// Descriptor flag: the buffer is a table of descriptors.
    pub const F_INDIRECT: u16 = 4;

    /// The first region: [0, 128 KiB). Rings live at 0.
    pub const REGION_A: (u64, usize) = (0, 0x2_0000);
    /// The second region: [192 KiB, 320 KiB).
    pub const REGION_B: (u64, usize) = (0x3_0000, 0x2_0000);
    /// Where buffers start.
    pub const BUF_START: u64 = 0x4000;
    /// The used ring, placed by hand: `MockSplitQueue` (virtio-queue 0.18) lays it out from
    /// `SplitQueueRing::end()`, which adds the avail ring's element count instead of its byte
    /// length, so its used ring overlaps the second half of the avail ring.
    pub const USED_RING: u64 = 0x2000;

    /// A raw descriptor as a hostile guest may write it.
    #[derive(Arbitrary, Debug)]
    pub struct RawDesc {
        /// Guest address (reduced into and just past the two regions by [`patch`]).
        pub addr: u32,
        /// Length.
        pub len: u32,
        /// Flags.
        pub flags: u16,
        /// Next index.
        pub next: u16,
    }

    /// The guest memory: the two regions.
    pub fn memory() -> Option<GuestMemoryMmap> {
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(REGION_A.0), REGION_A.1),
            (GuestAddress(REGION_B.0), REGION_B.1),
        ])
        .ok()
    }

    /// Write descriptor `idx` (modulo the queue size).
    pub fn store(mock: &MockSplitQueue<'_, GuestMemoryMmap>, size: u16, idx: u16, d: Descriptor) {
        let _ = mock.desc_table().store(idx % size, RawDescriptor::from(d));
    }

    /// Overwrite descriptor `idx` with `d`, its address reduced to the two regions and a page
    /// past them.
    pub fn patch(mock: &MockSplitQueue<'_, GuestMemoryMmap>, size: u16, idx: u16, d: &RawDesc) {
        let addr = u64::from(d.addr) % (REGION_B.0 + REGION_B.1 as u64 + 0x1000);
        store(
            mock,
            size,
            idx,
            Descriptor::new(addr, d.len, d.flags, d.next),
        );
    }

    /// Make `head` available.
    pub fn push_avail(mock: &MockSplitQueue<'_, GuestMemoryMmap>, size: u16, head: u16) {
        let idx = u16::from_le(mock.avail().idx().load());
        if let Ok(r) = mock.avail().ring().ref_at(usize::from(idx % size)) {
            r.store(u16::to_le(head));
        }
        mock.avail().idx().store(u16::to_le(idx.wrapping_add(1)));
    }

    /// Move the avail index `j` entries ahead without writing them (a lying driver).
    pub fn jump_avail(mock: &MockSplitQueue<'_, GuestMemoryMmap>, j: u16) {
        let idx = u16::from_le(mock.avail().idx().load());
        mock.avail().idx().store(u16::to_le(idx.wrapping_add(j)));
    }
}
