//! Helpers shared by the socket-level integration tests.
// Each test binary uses its own subset.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use virtnet_guest::NetHdr;
use virtnet_switch::hdr::{FLAG_NEEDS_CSUM, GSO_TCPV4};
use virtnet_switch::{MacAddr, Switch};
use virtnet_virtio::{NetConfig, NetPort};

/// The MAC of vm`n`.
pub fn mac(n: u8) -> [u8; 6] {
    [0x52, 0x54, 0, 0, 0, n]
}

/// A frame of `len` bytes (EtherType 0x88b5) with a payload pattern shifted by `seed`.
pub fn eth(dst: [u8; 6], src: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(14) {
        *b = (i as u8).wrapping_add(seed);
    }
    f
}

/// Port vm`n` (MAC [`mac`]`(n)`, `pairs` queue pairs) on `sw`, listening in `dir`.
pub fn port(sw: &Arc<Switch>, dir: &Path, n: u8, pairs: u16) -> NetPort {
    let cfg = NetConfig {
        name: format!("vm{n}"),
        mac: Some(MacAddr(mac(n))),
        queue_pairs: pairs,
        ..Default::default()
    };
    NetPort::listen(sw.clone(), cfg, &dir.join(format!("vm{n}.sock"))).unwrap()
}

/// A TCPv4 frame with `payload` bytes and the TSO header Linux sends with it (MSS 1448,
/// partial checksum).
pub fn tcp4(payload: usize, src: [u8; 6], dst: [u8; 6]) -> (Vec<u8>, NetHdr) {
    let mut f = vec![0u8; 54 + payload];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12] = 0x08;
    let tot = (40 + payload).min(0xffff) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&[10, 0, 0, 1]);
    f[30..34].copy_from_slice(&[10, 0, 0, 2]);
    f[34..36].copy_from_slice(&5555u16.to_be_bytes());
    f[36..38].copy_from_slice(&80u16.to_be_bytes());
    f[46] = 0x50;
    f[47] = 0x18;
    for (i, b) in f[54..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let h = NetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    };
    (f, h)
}
