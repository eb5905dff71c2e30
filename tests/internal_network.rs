//! An internal network end to end over real vhost-user Unix sockets: virtnet's device
//! (`NetPort`) on one side, the user-space guest driver (`virtnet-guest`) on the other.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use virtnet::guest::virtio_net as vn;
use virtnet::guest::GuestConfig;
use virtnet::switch::hdr::{GSO_NONE, GSO_TCPV4};
use virtnet::switch::{DropReason, NetHdr};

#[test]
fn two_guests_exchange_frames_both_ways() {
    let net = Net::new(2, |_, _| {});
    let mut a = net.connect(0, GuestConfig::default());
    let mut b = net.connect(1, GuestConfig::default());
    assert_eq!(a.mac(), Some(mac(1).0), "MAC from the config space");
    assert_ne!(a.acked_features() & vn::F_VERSION_1, 0);

    let f = udp_frame(mac(1), mac(2), 1000, 2000, 100);
    a.send(0, &NetHdr::NONE, &f).unwrap();
    let r = expect_frame(&mut b, 0, LONG);
    assert_eq!(r.frame, f);
    assert_eq!(r.num_buffers, 1);

    let g = udp_frame(mac(2), mac(1), 2000, 1000, 60);
    b.send(0, &NetHdr::NONE, &g).unwrap();
    assert_eq!(expect_frame(&mut a, 0, LONG).frame, g);

    let (sa, sb) = (net.stats(0), net.stats(1));
    assert_eq!((sa.rx_frames, sa.tx_frames), (1, 1));
    assert_eq!((sb.rx_frames, sb.tx_frames), (1, 1));
    assert_eq!(sa.total_drops() + sb.total_drops(), 0);
}

#[test]
fn three_guests_broadcast_reaches_all_and_learning_makes_unicast() {
    let net = Net::new(3, |_, _| {});
    let mut g: Vec<_> = (0..3)
        .map(|i| net.connect(i, GuestConfig::default()))
        .collect();

    // A broadcast (an ARP request, say) reaches both others, never the sender.
    let bcast = udp_frame(mac(1), virtnet::switch::MacAddr::BROADCAST, 68, 67, 300);
    g[0].send(0, &NetHdr::NONE, &bcast).unwrap();
    assert_eq!(expect_frame(&mut g[1], 0, LONG).frame, bcast);
    assert_eq!(expect_frame(&mut g[2], 0, LONG).frame, bcast);
    assert!(
        drain(&mut g[0], 0, SHORT).is_empty(),
        "no echo to the sender"
    );

    // B answers A by unicast: A is known, so C must not see it.
    let c_before = net.stats(2).tx_frames;
    for i in 0..50 {
        let f = udp_frame(mac(2), mac(1), 5000 + i, 1000, 80);
        g[1].send(0, &NetHdr::NONE, &f).unwrap();
        assert_eq!(expect_frame(&mut g[0], 0, LONG).frame, f);
        let f = udp_frame(mac(1), mac(2), 1000, 5000 + i, 80);
        g[0].send(0, &NetHdr::NONE, &f).unwrap();
        assert_eq!(expect_frame(&mut g[1], 0, LONG).frame, f);
    }
    assert!(drain(&mut g[2], 0, SHORT).is_empty(), "C saw unicast");
    assert_eq!(net.stats(2).tx_frames, c_before);
    // Only the very first B->A frame could have been flooded? No: A was learned from the
    // broadcast, and B from its first frame, so nothing after the broadcast floods.
    assert_eq!(net.stats(0).flooded, 1);
    assert_eq!(net.stats(1).flooded, 0);
    assert_eq!(net.stats(0).tx_frames, 50);
}

#[test]
fn mtu_sized_frames_cross_intact_and_longer_ones_are_dropped() {
    let net = Net::new(2, |_, _| {});
    let mut a = net.connect(0, GuestConfig::default());
    let mut b = net.connect(1, GuestConfig::default());
    assert_eq!(a.mtu(), Some(1500));
    for len in [60usize, 64, 512, 1514] {
        let f = udp_frame(mac(1), mac(2), 1, len as u16, len);
        a.send(0, &NetHdr::NONE, &f).unwrap();
        assert_eq!(expect_frame(&mut b, 0, LONG).frame, f, "{len}-byte frame");
    }
    // A non-GSO frame beyond MTU + Ethernet header (+ VLAN tag room) is a counted drop.
    let f = udp_frame(mac(1), mac(2), 1, 2, 1600);
    a.send(0, &NetHdr::NONE, &f).unwrap();
    assert!(drain(&mut b, 0, SHORT).is_empty());
    eventually(LONG, || {
        net.stats(0).drop_count(DropReason::FrameTooLong) > 0
    });
    assert_eq!(net.stats(0).drop_count(DropReason::FrameTooLong), 1);
}

#[test]
fn jumbo_frame_spans_mergeable_rx_buffers() {
    let net = Net::new(2, |_, c| c.mtu = 9000);
    let mut a = net.connect(0, GuestConfig::default());
    let mut b = net.connect(
        1,
        GuestConfig {
            rx_buffer_size: 1024,
            ..Default::default()
        },
    );
    assert_ne!(b.acked_features() & vn::F_MRG_RXBUF, 0);
    let f = udp_frame(mac(1), mac(2), 7, 7, 9014);
    a.send(0, &NetHdr::NONE, &f).unwrap();
    let r = expect_frame(&mut b, 0, LONG);
    assert_eq!(r.frame, f);
    // 12-byte header + 9014 bytes in 1024-byte buffers.
    assert_eq!(r.num_buffers, (12 + 9014usize).div_ceil(1024) as u16);
}

#[test]
fn gso_frame_passes_through_whole_with_its_header() {
    let net = Net::new(2, |_, _| {});
    let mut a = net.connect(0, GuestConfig::default());
    let mut b = net.connect(1, GuestConfig::default());
    for need in [vn::F_HOST_TSO4, vn::F_CSUM] {
        assert_ne!(a.acked_features() & need, 0);
    }
    assert_ne!(b.acked_features() & vn::F_GUEST_TSO4, 0);
    // A 64 KiB TSO frame, as a Linux guest sends it.
    let (hdr, f) = tcp_gso_frame(mac(1), mac(2), 65000, Some(1448), false);
    a.send(0, &hdr, &f).unwrap();
    let r = expect_frame(&mut b, 0, LONG);
    assert_eq!(r.frame.len(), f.len());
    assert_eq!(r.frame, f, "one frame, byte for byte");
    assert_eq!(r.hdr.gso_type, GSO_TCPV4);
    assert_eq!(r.hdr.gso_size, 1448);
    assert_eq!(r.hdr.csum_start, hdr.csum_start);
    assert_eq!(r.hdr.csum_offset, hdr.csum_offset);
    assert!(r.hdr.needs_csum());
    assert!(
        r.num_buffers > 1,
        "64 KiB needs many 2 KiB mergeable buffers"
    );
    assert_eq!(net.stats(1).tx_frames, 1);
    // IPv6 too.
    let (hdr, f) = tcp_gso_frame(mac(1), mac(2), 30000, Some(1428), true);
    a.send(0, &hdr, &f).unwrap();
    let r = expect_frame(&mut b, 0, LONG);
    assert_eq!(r.frame, f);
    assert_eq!(r.hdr.gso_size, 1428);
}

#[test]
fn software_segmentation_toward_a_guest_without_tso() {
    let net = Net::new(2, |_, _| {});
    let mut a = net.connect(0, GuestConfig::default());
    let mut b = net.connect(
        1,
        GuestConfig {
            features: features_without(F_GUEST_TSO | vn::F_GUEST_CSUM),
            ..Default::default()
        },
    );
    assert_eq!(b.acked_features() & (F_GUEST_TSO | vn::F_GUEST_CSUM), 0);
    for v6 in [false, true] {
        let mss = 1448u16;
        let payload = 20000usize;
        let (hdr, f) = tcp_gso_frame(mac(1), mac(2), payload, Some(mss), v6);
        a.send(0, &hdr, &f).unwrap();
        let segs = drain(&mut b, 0, Duration::from_millis(500));
        assert_eq!(segs.len(), payload.div_ceil(usize::from(mss)), "v6={v6}");
        let mut data = Vec::new();
        let mut seq = 1_000_000u32;
        for (i, s) in segs.iter().enumerate() {
            assert_eq!(s.hdr.gso_type, GSO_NONE);
            assert!(!s.hdr.needs_csum(), "checksum completed in software");
            let (p, sq, flags) = verify_l4(&s.frame);
            assert_eq!(sq, Some(seq), "segment {i} sequence number");
            let psh = flags.unwrap() & 0x08 != 0;
            assert_eq!(psh, i == segs.len() - 1, "PSH only on the last segment");
            assert!(p.len() <= usize::from(mss));
            seq = seq.wrapping_add(p.len() as u32);
            data.extend_from_slice(&p);
        }
        let expect: Vec<u8> = (0..payload).map(|i| (i % 251) as u8).collect();
        assert_eq!(data, expect, "payload reassembles");
    }
    // A checksum-offloaded (non-GSO) frame gets its checksum completed too.
    let (hdr, f) = tcp_gso_frame(mac(1), mac(2), 500, None, false);
    a.send(0, &hdr, &f).unwrap();
    let r = expect_frame(&mut b, 0, LONG);
    assert!(!r.hdr.needs_csum());
    verify_l4(&r.frame);
}

#[test]
fn guest_without_mergeable_buffers_or_offloads_still_works() {
    let net = Net::new(2, |_, _| {});
    let plain = vn::F_VERSION_1 | vn::F_MAC | vn::F_STATUS | vn::F_MTU;
    let mut a = net.connect(
        0,
        GuestConfig {
            features: plain,
            ..Default::default()
        },
    );
    let mut b = net.connect(
        1,
        GuestConfig {
            features: plain,
            rx_buffer_size: 1526,
            ..Default::default()
        },
    );
    assert_eq!(a.acked_features() & vn::F_MRG_RXBUF, 0);
    let f = udp_frame(mac(1), mac(2), 3, 4, 1514);
    a.send(0, &NetHdr::NONE, &f).unwrap();
    let r = expect_frame(&mut b, 0, LONG);
    assert_eq!(r.frame, f);
    assert_eq!(r.num_buffers, 1);
}

#[test]
fn legacy_driver_without_version_1() {
    let net = Net::new(2, |_, _| {});
    // Legacy virtio (e.g. QEMU's virtio-mmio): 10-byte header without MRG_RXBUF.
    let legacy = vn::F_MAC | vn::F_STATUS | vn::F_CSUM | vn::F_GUEST_CSUM;
    let mut a = net.connect(
        0,
        GuestConfig {
            features: legacy,
            ..Default::default()
        },
    );
    let mut b = net.connect(1, GuestConfig::default());
    assert_eq!(a.acked_features() & vn::F_VERSION_1, 0);
    assert_eq!(a.hdr_len(), 10);
    let f = udp_frame(mac(1), mac(2), 3, 4, 200);
    a.send(0, &NetHdr::NONE, &f).unwrap();
    assert_eq!(expect_frame(&mut b, 0, LONG).frame, f);
    let g = udp_frame(mac(2), mac(1), 4, 3, 1514);
    b.send(0, &NetHdr::NONE, &g).unwrap();
    assert_eq!(expect_frame(&mut a, 0, LONG).frame, g);
}

#[test]
fn multiqueue_two_pairs_spreads_flows() {
    let net = Net::new(2, |_, c| c.queue_pairs = 2);
    let cfg = GuestConfig {
        queue_pairs: 2,
        ..Default::default()
    };
    let mut a = net.connect(0, cfg.clone());
    let mut b = net.connect(1, cfg);
    assert_ne!(b.acked_features() & vn::F_MQ, 0);
    assert_eq!(b.device_max_queue_pairs(), 2);
    a.set_queue_pairs(2).unwrap();
    b.set_queue_pairs(2).unwrap();
    assert_eq!(net.ports[1].status().active_queue_pairs, 2);

    let mut sent = HashSet::new();
    for i in 0..64u16 {
        let f = udp_frame(mac(1), mac(2), 10000 + i, 80, 100);
        // Alternate TX queues: both TX queues of A must work.
        a.send(i % 2, &NetHdr::NONE, &f).unwrap();
        sent.insert(f);
    }
    let q0 = drain(&mut b, 0, SHORT);
    let q1 = drain(&mut b, 1, SHORT);
    assert_eq!(q0.len() + q1.len(), 64, "every frame arrives once");
    assert!(
        !q0.is_empty() && !q1.is_empty(),
        "flows spread over both RX queues: {} / {}",
        q0.len(),
        q1.len()
    );
    for r in q0.iter().chain(q1.iter()) {
        assert!(sent.contains(&r.frame));
    }
    // One flow stays on one queue (no reordering within a flow).
    let f = udp_frame(mac(1), mac(2), 4242, 80, 100);
    for _ in 0..10 {
        a.send(0, &NetHdr::NONE, &f).unwrap();
    }
    let n0 = drain(&mut b, 0, SHORT).len();
    let n1 = drain(&mut b, 1, SHORT).len();
    assert!(n0 == 10 && n1 == 0 || n0 == 0 && n1 == 10, "{n0}/{n1}");
    // A bad VQ_PAIRS_SET is refused.
    assert!(b.set_queue_pairs(3).is_err());
}

#[test]
fn vmm_disconnect_and_reconnect_keeps_the_port() {
    let net = Net::new(2, |_, _| {});
    let mut a = net.connect(0, GuestConfig::default());
    let mut b = net.connect(1, GuestConfig::default());
    let id = net.ports[1].port_id();
    let f = udp_frame(mac(1), mac(2), 1, 2, 100);
    a.send(0, &NetHdr::NONE, &f).unwrap();
    expect_frame(&mut b, 0, LONG);

    // The VMM of B goes away: frames for B are counted drops, A is unaffected.
    b.disconnect();
    let deadline = std::time::Instant::now() + LONG;
    while net.ports[1].status().connected {
        assert!(
            std::time::Instant::now() < deadline,
            "disconnect not noticed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    a.send(0, &NetHdr::NONE, &f).unwrap();
    assert!(eventually(LONG, || net
        .stats(1)
        .drop_count(DropReason::NotReady)
        >= 1));

    // A new VMM (or the restarted VM) connects to the same socket: traffic resumes.
    for round in 0..3 {
        let mut b = net.connect(1, GuestConfig::default());
        assert_eq!(net.ports[1].port_id(), id);
        let g = udp_frame(mac(1), mac(2), 1, round, 100);
        a.send(0, &NetHdr::NONE, &g).unwrap();
        assert_eq!(expect_frame(&mut b, 0, LONG).frame, g, "round {round}");
        let h = udp_frame(mac(2), mac(1), round, 1, 100);
        b.send(0, &NetHdr::NONE, &h).unwrap();
        assert_eq!(expect_frame(&mut a, 0, LONG).frame, h);
        b.disconnect();
    }
    assert!(net.ports[1].status().connections >= 4);
    assert!(net.stats(1).rx_frames >= 3, "counters survive reconnects");
}

#[test]
fn rx_filter_from_the_control_queue() {
    let net = Net::new(2, |_, _| {});
    let mut a = net.connect(0, GuestConfig::default());
    let mut b = net.connect(1, GuestConfig::default());
    // Before any RX-mode command everything is accepted (no filtering promised).
    let other = virtnet::switch::MacAddr([0x52, 0x54, 0, 0, 0, 0x99]);
    let f = udp_frame(mac(1), other, 1, 2, 100);
    a.send(0, &NetHdr::NONE, &f).unwrap();
    assert_eq!(expect_frame(&mut b, 0, LONG).frame, f);
    // The driver turns promiscuous mode off and programs its own MAC only.
    b.set_promisc(false).unwrap();
    b.set_mac_table(&[mac(2).0], &[]).unwrap();
    a.send(0, &NetHdr::NONE, &f).unwrap();
    assert!(drain(&mut b, 0, SHORT).is_empty());
    eventually(LONG, || net.stats(1).drop_count(DropReason::RxFiltered) > 0);
    assert_eq!(net.stats(1).drop_count(DropReason::RxFiltered), 1);
    let g = udp_frame(mac(1), mac(2), 1, 2, 100);
    a.send(0, &NetHdr::NONE, &g).unwrap();
    assert_eq!(expect_frame(&mut b, 0, LONG).frame, g);
    b.set_promisc(true).unwrap();
    a.send(0, &NetHdr::NONE, &f).unwrap();
    assert_eq!(expect_frame(&mut b, 0, LONG).frame, f);
}
