//! virtio-net wire structures seen from the driver: feature bits, `virtio_net_hdr` encoding,
//! the device configuration space, and control-queue commands (virtio 1.x §5.1).

use virtnet_switch::NetHdr;

/// `VIRTIO_NET_F_CSUM`: the device takes partial checksums from us (TX).
pub const F_CSUM: u64 = 1 << 0;
/// `VIRTIO_NET_F_GUEST_CSUM`: we take partial checksums (RX).
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// `VIRTIO_NET_F_CTRL_GUEST_OFFLOADS`.
pub const F_CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
/// `VIRTIO_NET_F_MTU`: the config space holds an MTU.
pub const F_MTU: u64 = 1 << 3;
/// `VIRTIO_NET_F_MAC`: the config space holds a MAC.
pub const F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_GUEST_TSO4`: we take TSOv4 frames.
pub const F_GUEST_TSO4: u64 = 1 << 7;
/// `VIRTIO_NET_F_GUEST_TSO6`: we take TSOv6 frames.
pub const F_GUEST_TSO6: u64 = 1 << 8;
/// `VIRTIO_NET_F_GUEST_ECN`: we take TSO frames with ECN.
pub const F_GUEST_ECN: u64 = 1 << 9;
/// `VIRTIO_NET_F_GUEST_UFO`.
pub const F_GUEST_UFO: u64 = 1 << 10;
/// `VIRTIO_NET_F_HOST_TSO4`: the device takes TSOv4 frames from us.
pub const F_HOST_TSO4: u64 = 1 << 11;
/// `VIRTIO_NET_F_HOST_TSO6`: the device takes TSOv6 frames from us.
pub const F_HOST_TSO6: u64 = 1 << 12;
/// `VIRTIO_NET_F_HOST_ECN`.
pub const F_HOST_ECN: u64 = 1 << 13;
/// `VIRTIO_NET_F_HOST_UFO`.
pub const F_HOST_UFO: u64 = 1 << 14;
/// `VIRTIO_NET_F_MRG_RXBUF`: frames may span several RX buffers.
pub const F_MRG_RXBUF: u64 = 1 << 15;
/// `VIRTIO_NET_F_STATUS`: the config space holds a link status.
pub const F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_F_CTRL_VQ`: there is a control queue.
pub const F_CTRL_VQ: u64 = 1 << 17;
/// `VIRTIO_NET_F_CTRL_RX`: RX mode commands (promisc, allmulti).
pub const F_CTRL_RX: u64 = 1 << 18;
/// `VIRTIO_NET_F_CTRL_VLAN`.
pub const F_CTRL_VLAN: u64 = 1 << 19;
/// `VIRTIO_NET_F_GUEST_ANNOUNCE`.
pub const F_GUEST_ANNOUNCE: u64 = 1 << 21;
/// `VIRTIO_NET_F_MQ`: several queue pairs.
pub const F_MQ: u64 = 1 << 22;
/// `VIRTIO_NET_F_CTRL_MAC_ADDR`.
pub const F_CTRL_MAC_ADDR: u64 = 1 << 23;
/// `VIRTIO_F_ANY_LAYOUT`.
pub const F_ANY_LAYOUT: u64 = 1 << 27;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const F_EVENT_IDX: u64 = 1 << 29;
/// `VHOST_USER_F_PROTOCOL_FEATURES` (vhost-user, not virtio).
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_RING_PACKED` (never acked: this driver only does split rings).
pub const F_RING_PACKED: u64 = 1 << 34;

/// What [`crate::GuestConfig::default`] is willing to ack.
pub const DEFAULT_FEATURES: u64 = F_CSUM
    | F_GUEST_CSUM
    | F_MTU
    | F_MAC
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_GUEST_ECN
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_HOST_ECN
    | F_MRG_RXBUF
    | F_STATUS
    | F_CTRL_VQ
    | F_CTRL_RX
    | F_MQ
    | F_INDIRECT_DESC
    | F_EVENT_IDX
    | F_PROTOCOL_FEATURES
    | F_VERSION_1;

/// Features this driver can never ack, whatever the caller wants.
pub const UNSUPPORTED_FEATURES: u64 = F_RING_PACKED;

/// `VIRTIO_NET_S_LINK_UP`.
pub const S_LINK_UP: u16 = 1;

/// Control class `VIRTIO_NET_CTRL_RX`.
pub const CTRL_RX: u8 = 0;
/// `VIRTIO_NET_CTRL_RX_PROMISC`.
pub const CTRL_RX_PROMISC: u8 = 0;
/// `VIRTIO_NET_CTRL_RX_ALLMULTI`.
pub const CTRL_RX_ALLMULTI: u8 = 1;
/// Control class `VIRTIO_NET_CTRL_MAC`.
pub const CTRL_MAC: u8 = 1;
/// `VIRTIO_NET_CTRL_MAC_TABLE_SET`.
pub const CTRL_MAC_TABLE_SET: u8 = 0;
/// `VIRTIO_NET_CTRL_MAC_ADDR_SET`.
pub const CTRL_MAC_ADDR_SET: u8 = 1;
/// Control class `VIRTIO_NET_CTRL_MQ`.
pub const CTRL_MQ: u8 = 4;
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`.
pub const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
/// Control ack `VIRTIO_NET_OK`.
pub const CTRL_OK: u8 = 0;
/// Control ack `VIRTIO_NET_ERR`.
pub const CTRL_ERR: u8 = 1;

/// Length of `virtio_net_hdr` for the acked features: 12 bytes (with `num_buffers`) under
/// VERSION_1 or MRG_RXBUF, else the 10-byte legacy header.
pub fn hdr_len(features: u64) -> usize {
    if features & (F_VERSION_1 | F_MRG_RXBUF) != 0 {
        12
    } else {
        10
    }
}

/// Encodes `hdr` (and `num_buffers` when `out.len() >= 12`) little-endian into `out`, which must
/// be 10 or 12 bytes long. Returns the bytes written.
pub fn encode_hdr(hdr: &NetHdr, num_buffers: u16, out: &mut [u8]) -> usize {
    let mut b = [0u8; 12];
    b[0] = hdr.flags;
    b[1] = hdr.gso_type;
    b[2..4].copy_from_slice(&hdr.hdr_len.to_le_bytes());
    b[4..6].copy_from_slice(&hdr.gso_size.to_le_bytes());
    b[6..8].copy_from_slice(&hdr.csum_start.to_le_bytes());
    b[8..10].copy_from_slice(&hdr.csum_offset.to_le_bytes());
    b[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    let n = out.len().min(12);
    out[..n].copy_from_slice(&b[..n]);
    n
}

/// Decodes a `virtio_net_hdr` from `b` (10 or 12 bytes; shorter input yields zeros for the
/// missing fields). Returns the header and `num_buffers` (1 when absent).
pub fn decode_hdr(b: &[u8]) -> (NetHdr, u16) {
    let mut x = [0u8; 12];
    let n = b.len().min(12);
    x[..n].copy_from_slice(&b[..n]);
    let u = |i: usize| u16::from_le_bytes([x[i], x[i + 1]]);
    let hdr = NetHdr {
        flags: x[0],
        gso_type: x[1],
        hdr_len: u(2),
        gso_size: u(4),
        csum_start: u(6),
        csum_offset: u(8),
    };
    let nb = if n >= 12 { u(10) } else { 1 };
    (hdr, nb)
}

/// The fields of `struct virtio_net_config` this driver reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConfigSpace {
    /// `mac` (meaningful with VIRTIO_NET_F_MAC).
    pub mac: [u8; 6],
    /// `status` (meaningful with VIRTIO_NET_F_STATUS).
    pub status: u16,
    /// `max_virtqueue_pairs` (meaningful with VIRTIO_NET_F_MQ).
    pub max_virtqueue_pairs: u16,
    /// `mtu` (meaningful with VIRTIO_NET_F_MTU).
    pub mtu: u16,
}

/// Bytes of the config space this driver asks for.
pub const CONFIG_LEN: usize = 12;

impl NetConfigSpace {
    /// Parses the first 12 bytes of the config space; missing bytes read as zero.
    pub fn parse(b: &[u8]) -> Self {
        let mut x = [0u8; CONFIG_LEN];
        let n = b.len().min(CONFIG_LEN);
        x[..n].copy_from_slice(&b[..n]);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&x[0..6]);
        NetConfigSpace {
            mac,
            status: u16::from_le_bytes([x[6], x[7]]),
            max_virtqueue_pairs: u16::from_le_bytes([x[8], x[9]]),
            mtu: u16::from_le_bytes([x[10], x[11]]),
        }
    }

    /// Link up (`VIRTIO_NET_S_LINK_UP`).
    pub fn link_up(&self) -> bool {
        self.status & S_LINK_UP != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hdr_round_trip() {
        let h = NetHdr {
            flags: 1,
            gso_type: 4 | 0x80,
            hdr_len: 74,
            gso_size: 1448,
            csum_start: 54,
            csum_offset: 16,
        };
        let mut b = [0u8; 12];
        assert_eq!(encode_hdr(&h, 3, &mut b), 12);
        assert_eq!(b, [1, 0x84, 74, 0, 0xa8, 5, 54, 0, 16, 0, 3, 0]);
        assert_eq!(decode_hdr(&b), (h, 3));
        let mut l = [0u8; 10];
        assert_eq!(encode_hdr(&h, 3, &mut l), 10);
        assert_eq!(decode_hdr(&l), (h, 1));
        assert_eq!(decode_hdr(&[1]).0.flags, 1);
    }

    #[test]
    fn hdr_len_by_features() {
        assert_eq!(hdr_len(F_VERSION_1), 12);
        assert_eq!(hdr_len(F_MRG_RXBUF), 12);
        assert_eq!(hdr_len(F_CSUM), 10);
    }

    #[test]
    fn config_parse() {
        let b = [0x52, 0x54, 0, 1, 2, 3, 1, 0, 4, 0, 0xdc, 0x05];
        let c = NetConfigSpace::parse(&b);
        assert_eq!(c.mac, [0x52, 0x54, 0, 1, 2, 3]);
        assert!(c.link_up());
        assert_eq!(c.max_virtqueue_pairs, 4);
        assert_eq!(c.mtu, 1500);
        assert_eq!(NetConfigSpace::parse(&b[..6]).mtu, 0);
    }

    #[test]
    fn default_features_are_sane() {
        assert_eq!(DEFAULT_FEATURES & UNSUPPORTED_FEATURES, 0);
        assert_ne!(DEFAULT_FEATURES & F_VERSION_1, 0);
        assert_ne!(DEFAULT_FEATURES & F_PROTOCOL_FEATURES, 0);
    }
}
