//! virtio-net spec structures and constants: feature bits, the config space, `virtio_net_hdr`
//! and the control-queue command set (virtio 1.2 §5.1).
//!
//! Everything here is a byte-level view (no `#[repr(C)]` casts of guest bytes): headers are
//! parsed from and emitted into small stack arrays, little endian.

use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net as vn;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtnet_switch::{MacAddr, NetHdr, OffloadCaps};

/// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30 of the virtio feature word in vhost-user).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// Bit mask for a feature number.
pub const fn bit(n: u32) -> u64 {
    1u64 << n
}

/// Feature bits (as masks) this device may offer.
pub mod features {
    use super::*;

    /// Device handles packets with partial checksum (guest TX `NEEDS_CSUM`).
    pub const CSUM: u64 = bit(vn::VIRTIO_NET_F_CSUM);
    /// Driver handles packets with partial checksum (guest RX `NEEDS_CSUM`).
    pub const GUEST_CSUM: u64 = bit(vn::VIRTIO_NET_F_GUEST_CSUM);
    /// The config space holds the MTU.
    pub const MTU: u64 = bit(vn::VIRTIO_NET_F_MTU);
    /// The config space holds a MAC address.
    pub const MAC: u64 = bit(vn::VIRTIO_NET_F_MAC);
    /// Guest can receive TSOv4.
    pub const GUEST_TSO4: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO4);
    /// Guest can receive TSOv6.
    pub const GUEST_TSO6: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO6);
    /// Guest can receive TSO with ECN.
    pub const GUEST_ECN: u64 = bit(vn::VIRTIO_NET_F_GUEST_ECN);
    /// Guest can receive UFO (never offered).
    pub const GUEST_UFO: u64 = bit(vn::VIRTIO_NET_F_GUEST_UFO);
    /// Device can receive TSOv4 from the guest.
    pub const HOST_TSO4: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO4);
    /// Device can receive TSOv6 from the guest.
    pub const HOST_TSO6: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO6);
    /// Device can receive TSO with ECN from the guest.
    pub const HOST_ECN: u64 = bit(vn::VIRTIO_NET_F_HOST_ECN);
    /// Mergeable receive buffers.
    pub const MRG_RXBUF: u64 = bit(vn::VIRTIO_NET_F_MRG_RXBUF);
    /// The config space holds a link status.
    pub const STATUS: u64 = bit(vn::VIRTIO_NET_F_STATUS);
    /// Control virtqueue.
    pub const CTRL_VQ: u64 = bit(vn::VIRTIO_NET_F_CTRL_VQ);
    /// Control channel RX mode support.
    pub const CTRL_RX: u64 = bit(vn::VIRTIO_NET_F_CTRL_RX);
    /// Multiqueue with automatic receive steering.
    pub const MQ: u64 = bit(vn::VIRTIO_NET_F_MQ);
    /// virtio 1.0 (modern) device.
    pub const VERSION_1: u64 = bit(VIRTIO_F_VERSION_1);
    /// `used_event`/`avail_event` notification suppression.
    pub const RING_EVENT_IDX: u64 = bit(VIRTIO_RING_F_EVENT_IDX);
    /// Indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = bit(VIRTIO_RING_F_INDIRECT_DESC);
    /// vhost-user protocol features.
    pub const PROTOCOL_FEATURES: u64 = bit(VHOST_USER_F_PROTOCOL_FEATURES);
}

/// Link status bit in the config space `status` field.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Length of the config space we expose: `mac[6]`, status, max_virtqueue_pairs, mtu.
pub const CONFIG_SPACE_LEN: usize = 12;

/// The largest Ethernet frame (without virtio header) a guest may send or receive:
/// a 64 KiB GSO frame plus Ethernet and VLAN headers (Firecracker `MAX_BUFFER_SIZE`).
pub const MAX_FRAME_LEN: usize = 65562;

/// The header length used on the rings for a set of acked features.
///
/// virtio 1.x: always 12 (`virtio_net_hdr_v1`); legacy: 12 with `MRG_RXBUF`, else 10.
pub fn header_len(acked: u64) -> usize {
    if acked & (features::VERSION_1 | features::MRG_RXBUF) != 0 {
        12
    } else {
        10
    }
}

/// Features offered for a device configuration.
pub fn offered_features(mac: bool, queue_pairs: u16) -> u64 {
    use features::*;
    let mut f = VERSION_1
        | STATUS
        | MTU
        | MRG_RXBUF
        | CSUM
        | GUEST_CSUM
        | GUEST_TSO4
        | GUEST_TSO6
        | GUEST_ECN
        | HOST_TSO4
        | HOST_TSO6
        | HOST_ECN
        | CTRL_VQ
        | CTRL_RX
        | RING_EVENT_IDX
        | RING_INDIRECT_DESC
        | PROTOCOL_FEATURES;
    if mac {
        f |= MAC;
    }
    if queue_pairs > 1 {
        f |= MQ;
    }
    f
}

/// What the acked features mean for the data path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// The acked feature word.
    pub acked: u64,
    /// `virtio_net_hdr` length on both directions.
    pub hdr_len: usize,
    /// Mergeable RX buffers (num_buffers is meaningful).
    pub mrg_rxbuf: bool,
    /// What the guest can receive.
    pub rx_caps: OffloadCaps,
    /// Guest may send `NEEDS_CSUM`.
    pub tx_csum: bool,
    /// Guest may send TCPv4 GSO.
    pub tx_tso4: bool,
    /// Guest may send TCPv6 GSO.
    pub tx_tso6: bool,
    /// Guest may send GSO with ECN.
    pub tx_ecn: bool,
    /// Control queue negotiated.
    pub ctrl_vq: bool,
    /// Multiqueue negotiated.
    pub mq: bool,
}

impl Negotiated {
    /// Derive the data-path parameters from an acked feature word.
    pub fn new(acked: u64) -> Self {
        use features::*;
        let has = |f: u64| acked & f != 0;
        let guest_csum = has(GUEST_CSUM);
        let csum = has(CSUM);
        Negotiated {
            acked,
            hdr_len: header_len(acked),
            mrg_rxbuf: has(MRG_RXBUF),
            rx_caps: OffloadCaps {
                csum: guest_csum,
                tso4: guest_csum && has(GUEST_TSO4),
                tso6: guest_csum && has(GUEST_TSO6),
                ecn: guest_csum && has(GUEST_ECN),
                ufo: false,
            },
            tx_csum: csum,
            tx_tso4: csum && has(HOST_TSO4),
            tx_tso6: csum && has(HOST_TSO6),
            tx_ecn: csum && has(HOST_ECN),
            ctrl_vq: has(CTRL_VQ),
            mq: has(CTRL_VQ) && has(MQ),
        }
    }
}

/// The device configuration space (little endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetConfig {
    /// `mac`.
    pub mac: MacAddr,
    /// `status` (`VIRTIO_NET_S_LINK_UP`).
    pub status: u16,
    /// `max_virtqueue_pairs`.
    pub max_virtqueue_pairs: u16,
    /// `mtu`.
    pub mtu: u16,
}

impl VirtioNetConfig {
    /// The config space bytes.
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut b = [0u8; CONFIG_SPACE_LEN];
        b[0..6].copy_from_slice(&self.mac.0);
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_virtqueue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b
    }

    /// A `size`-byte window at `offset` (zero padded past the end), as `get_config` returns it.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let b = self.to_bytes();
        let size = (size as usize).min(256);
        let mut out = vec![0u8; size];
        let off = offset as usize;
        if off < b.len() {
            let n = (b.len() - off).min(size);
            out[..n].copy_from_slice(&b[off..off + n]);
        }
        out
    }
}

mod field {
    use std::ops::Range;
    pub const FLAGS: usize = 0;
    pub const GSO_TYPE: usize = 1;
    pub const HDR_LEN: Range<usize> = 2..4;
    pub const GSO_SIZE: Range<usize> = 4..6;
    pub const CSUM_START: Range<usize> = 6..8;
    pub const CSUM_OFFSET: Range<usize> = 8..10;
    pub const NUM_BUFFERS: Range<usize> = 10..12;
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

/// Parse the first 10 bytes of a `virtio_net_hdr` (`num_buffers` is ignored on TX).
pub fn parse_hdr(b: &[u8; 12]) -> NetHdr {
    NetHdr {
        flags: b[field::FLAGS],
        gso_type: b[field::GSO_TYPE],
        hdr_len: le16(&b[field::HDR_LEN]),
        gso_size: le16(&b[field::GSO_SIZE]),
        csum_start: le16(&b[field::CSUM_START]),
        csum_offset: le16(&b[field::CSUM_OFFSET]),
    }
}

/// Emit a `virtio_net_hdr` (12 bytes; a 10-byte legacy header is the prefix).
pub fn emit_hdr(hdr: &NetHdr, num_buffers: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[field::FLAGS] = hdr.flags;
    b[field::GSO_TYPE] = hdr.gso_type;
    b[field::HDR_LEN].copy_from_slice(&hdr.hdr_len.to_le_bytes());
    b[field::GSO_SIZE].copy_from_slice(&hdr.gso_size.to_le_bytes());
    b[field::CSUM_START].copy_from_slice(&hdr.csum_start.to_le_bytes());
    b[field::CSUM_OFFSET].copy_from_slice(&hdr.csum_offset.to_le_bytes());
    b[field::NUM_BUFFERS].copy_from_slice(&num_buffers.to_le_bytes());
    b
}

/// Control queue classes and commands (virtio 1.2 §5.1.6.5).
pub mod ctrl {
    /// `virtio_net_ctrl_ack` OK.
    pub const VIRTIO_NET_OK: u8 = 0;
    /// `virtio_net_ctrl_ack` ERR.
    pub const VIRTIO_NET_ERR: u8 = 1;

    /// RX mode class.
    pub const CLASS_RX: u8 = 0;
    /// Promiscuous mode.
    pub const RX_PROMISC: u8 = 0;
    /// All multicast.
    pub const RX_ALLMULTI: u8 = 1;
    /// All unicast.
    pub const RX_ALLUNI: u8 = 2;
    /// No multicast.
    pub const RX_NOMULTI: u8 = 3;
    /// No unicast.
    pub const RX_NOUNI: u8 = 4;
    /// No broadcast.
    pub const RX_NOBCAST: u8 = 5;

    /// MAC class.
    pub const CLASS_MAC: u8 = 1;
    /// Set the unicast and multicast filter tables.
    pub const MAC_TABLE_SET: u8 = 0;
    /// Set the station address.
    pub const MAC_ADDR_SET: u8 = 1;

    /// Gratuitous packet announce class.
    pub const CLASS_ANNOUNCE: u8 = 3;
    /// Acknowledge an announce.
    pub const ANNOUNCE_ACK: u8 = 0;

    /// Multiqueue class.
    pub const CLASS_MQ: u8 = 4;
    /// Set the number of active queue pairs.
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_len_follows_spec() {
        assert_eq!(header_len(0), 10);
        assert_eq!(header_len(features::MRG_RXBUF), 12);
        assert_eq!(header_len(features::VERSION_1), 12);
    }

    #[test]
    fn hdr_roundtrip() {
        let h = NetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let b = emit_hdr(&h, 3);
        assert_eq!(parse_hdr(&b), h);
        assert_eq!(&b[10..12], &[3, 0]);
    }

    #[test]
    fn config_space_layout() {
        let c = VirtioNetConfig {
            mac: MacAddr([1, 2, 3, 4, 5, 6]),
            status: VIRTIO_NET_S_LINK_UP,
            max_virtqueue_pairs: 4,
            mtu: 1500,
        };
        assert_eq!(c.to_bytes(), [1, 2, 3, 4, 5, 6, 1, 0, 4, 0, 0xdc, 0x05]);
        assert_eq!(c.read(6, 2), vec![1, 0]);
        assert_eq!(c.read(10, 4), vec![0xdc, 0x05, 0, 0]);
        assert_eq!(c.read(100, 2), vec![0, 0]);
    }

    #[test]
    fn offered_and_negotiated() {
        let f = offered_features(false, 1);
        assert_eq!(f & features::MAC, 0);
        assert_eq!(f & features::MQ, 0);
        assert_ne!(
            offered_features(true, 2) & (features::MAC | features::MQ),
            0
        );
        let n = Negotiated::new(features::GUEST_TSO4);
        assert!(!n.rx_caps.tso4, "TSO needs GUEST_CSUM");
        let n = Negotiated::new(f);
        assert!(n.rx_caps.tso4 && n.rx_caps.csum && n.tx_tso6 && n.mrg_rxbuf);
        assert_eq!(n.hdr_len, 12);
    }
}
