//! Offload metadata that travels with a frame: the semantics of `struct virtio_net_hdr`, in host
//! byte order and independent of any transport.

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` must be completed.
pub const FLAG_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum was validated.
pub const FLAG_DATA_VALID: u8 = 2;
/// No segmentation.
pub const GSO_NONE: u8 = 0;
/// TCP over IPv4 segmentation.
pub const GSO_TCPV4: u8 = 1;
/// UDP fragmentation offload (legacy UFO).
pub const GSO_UDP: u8 = 3;
/// TCP over IPv6 segmentation.
pub const GSO_TCPV6: u8 = 4;
/// Flag: the TCP stream carries ECN (CWR may be set on segments).
pub const GSO_ECN: u8 = 0x80;

/// Offload metadata of one frame (the fields of `virtio_net_hdr` except `num_buffers`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    /// `FLAG_*` bits.
    pub flags: u8,
    /// `GSO_*` type, possibly with `GSO_ECN`.
    pub gso_type: u8,
    /// Length of the headers (Ethernet + IP + TCP) to replicate per segment (a hint).
    pub hdr_len: u16,
    /// Maximum segment payload size.
    pub gso_size: u16,
    /// Where checksumming starts (from the start of the Ethernet frame).
    pub csum_start: u16,
    /// Where the checksum is stored, relative to `csum_start`.
    pub csum_offset: u16,
}

impl NetHdr {
    /// A plain frame: no offloads, checksums complete.
    pub const NONE: NetHdr = NetHdr {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// The GSO type without the ECN flag.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !GSO_ECN
    }

    /// True when the frame must be segmented before it goes on a wire.
    pub fn is_gso(&self) -> bool {
        self.gso_kind() != GSO_NONE
    }

    /// True when a partial checksum must be completed.
    pub fn needs_csum(&self) -> bool {
        self.flags & FLAG_NEEDS_CSUM != 0
    }
}

/// What a destination port can take without software help.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffloadCaps {
    /// Partial checksums (`NEEDS_CSUM`) are fine (virtio GUEST_CSUM).
    pub csum: bool,
    /// TCPv4 GSO frames (GUEST_TSO4).
    pub tso4: bool,
    /// TCPv6 GSO frames (GUEST_TSO6).
    pub tso6: bool,
    /// GSO frames with the ECN bit (GUEST_ECN).
    pub ecn: bool,
    /// UDP fragmentation offload (GUEST_UFO).
    pub ufo: bool,
}

impl OffloadCaps {
    /// Everything.
    pub const ALL: OffloadCaps = OffloadCaps {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
        ufo: true,
    };

    /// Nothing: every frame must arrive complete and wire-sized.
    pub const NONE: OffloadCaps = OffloadCaps {
        csum: false,
        tso4: false,
        tso6: false,
        ecn: false,
        ufo: false,
    };

    /// Can this destination take `hdr` as it is?
    pub fn accepts(&self, hdr: &NetHdr) -> bool {
        if hdr.needs_csum() && !self.csum {
            return false;
        }
        if hdr.gso_type & GSO_ECN != 0 && !self.ecn {
            return false;
        }
        match hdr.gso_kind() {
            GSO_NONE => true,
            GSO_TCPV4 => self.tso4,
            GSO_TCPV6 => self.tso6,
            GSO_UDP => self.ufo,
            _ => false,
        }
    }
}
