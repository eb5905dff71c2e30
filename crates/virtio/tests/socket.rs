//! Socket-level tests: real `NetPort`s on a switch, driven by `virtnet-guest` frontends over
//! vhost-user (memfd guest memory, eventfds, the whole protocol).

use std::time::{Duration, Instant};

use virtnet_guest::{Guest, GuestConfig, NetHdr, DEFAULT_FEATURES};
use virtnet_switch::hdr::GSO_TCPV4;
use virtnet_switch::{DropReason, Switch, SwitchConfig};
use virtnet_virtio::virtio_net::features as F;
use virtnet_virtio::NetPort;

mod common;
use common::{eth, mac, port, tcp4};

const T: Duration = Duration::from_secs(2);

fn wait_running(p: &NetPort) {
    let deadline = Instant::now() + T;
    while !p.status().running {
        assert!(Instant::now() < deadline, "device never started running");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn two_guests_exchange_frames_and_offloads() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(SwitchConfig::default());
    let pa = port(&sw, dir.path(), 1, 1);
    let pb = port(&sw, dir.path(), 2, 1);
    let mut a = Guest::connect(pa.socket_path(), GuestConfig::default()).unwrap();
    let mut b = Guest::connect(pb.socket_path(), GuestConfig::default()).unwrap();
    wait_running(&pa);
    wait_running(&pb);
    assert_eq!(a.mac(), Some(mac(1)));
    let st = pa.status();
    assert!(st.connected && st.driver_ok && st.running);
    assert_eq!(st.connections, 1);
    assert_ne!(st.acked_features & F::MRG_RXBUF, 0);

    // Broadcast from B (teaches the switch where B is), then unicast A -> B.
    let bc = eth([0xff; 6], mac(2), 60, 0);
    b.send(0, &NetHdr::NONE, &bc).unwrap();
    let got = a.recv(0, T).unwrap().expect("broadcast reaches A");
    assert_eq!(got.frame, bc);
    for i in 0..200u32 {
        let len = 60 + (i as usize * 37) % 1400;
        let f = eth(mac(2), mac(1), len, i as u8);
        a.send(0, &NetHdr::NONE, &f).unwrap();
        let r = b.recv(0, T).unwrap().expect("frame arrives");
        assert_eq!(r.frame, f, "frame {i}");
    }

    // A 64 KiB TSO frame crosses whole to a guest that acked GUEST_TSO4.
    let (big, h) = tcp4(60_000, mac(1), mac(2));
    a.send(0, &h, &big).unwrap();
    let r = b.recv(0, T).unwrap().expect("TSO frame arrives");
    assert_eq!(r.frame.len(), big.len());
    assert_eq!(r.frame, big);
    assert_eq!(r.hdr.gso_type, GSO_TCPV4);
    assert!(r.num_buffers > 1, "mergeable buffers used");

    let sa = pa.stats();
    assert_eq!(sa.rx_frames, 201);
    assert_eq!(pb.stats().tx_frames, 201);
    drop(a);
    drop(b);
    pa.shutdown();
    pb.shutdown();
}

#[test]
fn software_segmentation_for_a_guest_without_offloads() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(SwitchConfig::default());
    let pa = port(&sw, dir.path(), 1, 1);
    let pb = port(&sw, dir.path(), 2, 1);
    let mut a = Guest::connect(pa.socket_path(), GuestConfig::default()).unwrap();
    // B: legacy-ish, no offloads, no mergeable buffers.
    let cfg = GuestConfig {
        features: DEFAULT_FEATURES
            & !(F::GUEST_CSUM
                | F::GUEST_TSO4
                | F::GUEST_TSO6
                | F::GUEST_ECN
                | F::MRG_RXBUF
                | F::RING_EVENT_IDX),
        ..Default::default()
    };
    let mut b = Guest::connect(pb.socket_path(), cfg).unwrap();
    wait_running(&pa);
    wait_running(&pb);
    let bc = eth([0xff; 6], mac(2), 60, 0);
    b.send(0, &NetHdr::NONE, &bc).unwrap();
    a.recv(0, T).unwrap().unwrap();
    let (big, h) = tcp4(10 * 1448, mac(1), mac(2));
    a.send(0, &h, &big).unwrap();
    let mut payload = Vec::new();
    for _ in 0..10 {
        let r = b.recv(0, T).unwrap().expect("segment");
        assert_eq!(r.hdr.gso_type, 0);
        assert!(r.frame.len() <= 1514);
        payload.extend_from_slice(&r.frame[54..]);
    }
    assert_eq!(payload, big[54..]);
    drop(a);
    drop(b);
}

#[test]
fn reconnect_keeps_the_port_and_counters() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(SwitchConfig::default());
    let pa = port(&sw, dir.path(), 1, 1);
    let pb = port(&sw, dir.path(), 2, 1);
    let id = pa.port_id();
    let mut b = Guest::connect(pb.socket_path(), GuestConfig::default()).unwrap();
    for round in 0..3u8 {
        let mut a = Guest::connect(pa.socket_path(), GuestConfig::default()).unwrap();
        wait_running(&pa);
        let f = eth([0xff; 6], mac(1), 100, round);
        a.send(0, &NetHdr::NONE, &f).unwrap();
        assert_eq!(b.recv(0, T).unwrap().unwrap().frame, f);
        a.disconnect();
        let deadline = Instant::now() + T;
        while pa.status().connected {
            assert!(Instant::now() < deadline, "disconnect not noticed");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!pa.status().running);
        // Frames for a disconnected port are NotReady drops, nothing else breaks.
        let before = pa.stats().drop_count(DropReason::NotReady);
        b.send(0, &NetHdr::NONE, &eth([0xff; 6], mac(2), 60, 0))
            .unwrap();
        let deadline = Instant::now() + T;
        while pa.stats().drop_count(DropReason::NotReady) == before {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert_eq!(pa.port_id(), id);
    assert_eq!(pa.status().connections, 3);
    assert_eq!(pa.stats().rx_frames, 3);
    // Shutdown with a VMM connected: prompt, the VMM sees the socket close.
    let mut a = Guest::connect(pa.socket_path(), GuestConfig::default()).unwrap();
    wait_running(&pa);
    let sock = pa.socket_path().to_path_buf();
    let t0 = Instant::now();
    pa.shutdown();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(!sock.exists());
    assert_eq!(sw.ports().len(), 1, "only B's port is left");
    assert!(
        a.send(0, &NetHdr::NONE, &eth([0xff; 6], mac(1), 60, 0))
            .is_err()
            || {
                // The send may still land in the (now unserved) ring; the next control op fails.
                a.set_promisc(true).is_err()
            }
    );
    drop(b);
}

#[test]
fn control_queue_filter_and_multiqueue() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(SwitchConfig::default());
    let pa = port(&sw, dir.path(), 1, 2);
    let pb = port(&sw, dir.path(), 2, 2);
    let cfg = GuestConfig {
        queue_pairs: 2,
        ..Default::default()
    };
    let mut a = Guest::connect(pa.socket_path(), cfg.clone()).unwrap();
    let mut b = Guest::connect(pb.socket_path(), cfg).unwrap();
    wait_running(&pa);
    wait_running(&pb);
    b.set_queue_pairs(2).unwrap();
    assert_eq!(pb.status().active_queue_pairs, 2);
    assert_ne!(pb.status().acked_features & F::MQ, 0);
    // Filtering: B turns promisc off; frames to a foreign unicast MAC are dropped.
    b.set_promisc(false).unwrap();
    let foreign = eth(mac(9), mac(1), 60, 0);
    a.send(0, &NetHdr::NONE, &foreign).unwrap();
    let deadline = Instant::now() + T;
    while pb.stats().drop_count(DropReason::RxFiltered) == 0 {
        assert!(Instant::now() < deadline, "filtered frame not counted");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Flows spread over both RX queues of B.
    b.send(0, &NetHdr::NONE, &eth([0xff; 6], mac(2), 60, 0))
        .unwrap();
    let r = a.recv(0, T).unwrap();
    assert!(
        r.is_some(),
        "{:?} {:?} {:?} {:?}",
        pa.stats(),
        pb.stats(),
        pa.status(),
        pb.status()
    );
    let mut per_queue = [0usize; 2];
    for port in 0..32u16 {
        let (mut f, _) = tcp4(10, mac(1), mac(2));
        f[34..36].copy_from_slice(&(1000 + port).to_be_bytes());
        a.send(0, &NetHdr::NONE, &f).unwrap();
    }
    let deadline = Instant::now() + T;
    while per_queue.iter().sum::<usize>() < 32 && Instant::now() < deadline {
        for (q, n) in per_queue.iter_mut().enumerate() {
            if b.recv(q as u16, Duration::from_millis(10))
                .unwrap()
                .is_some()
            {
                *n += 1;
            }
        }
    }
    assert_eq!(per_queue.iter().sum::<usize>(), 32);
    assert!(per_queue[0] > 0 && per_queue[1] > 0, "{per_queue:?}");
    // Bad VQ_PAIRS_SET is refused.
    assert!(b.set_queue_pairs(3).is_err());
}

#[test]
fn legacy_guests_without_version_1() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(SwitchConfig::default());
    let pa = port(&sw, dir.path(), 1, 1);
    let pb = port(&sw, dir.path(), 2, 1);
    let pc = port(&sw, dir.path(), 3, 1);
    // A: legacy with 10-byte headers (no MRG_RXBUF); B: legacy with MRG_RXBUF (12 bytes);
    // C: modern.
    let legacy = DEFAULT_FEATURES & !F::VERSION_1;
    let mut a = Guest::connect(
        pa.socket_path(),
        GuestConfig {
            features: legacy & !F::MRG_RXBUF,
            ..Default::default()
        },
    )
    .unwrap();
    let mut b = Guest::connect(
        pb.socket_path(),
        GuestConfig {
            features: legacy,
            ..Default::default()
        },
    )
    .unwrap();
    let mut c = Guest::connect(pc.socket_path(), GuestConfig::default()).unwrap();
    assert_eq!(a.hdr_len(), 10);
    assert_eq!(b.hdr_len(), 12);
    for p in [&pa, &pb, &pc] {
        wait_running(p);
    }
    assert_eq!(pa.status().acked_features & F::VERSION_1, 0);
    let f = eth([0xff; 6], mac(1), 1000, 7);
    a.send(0, &NetHdr::NONE, &f).unwrap();
    assert_eq!(b.recv(0, T).unwrap().unwrap().frame, f);
    assert_eq!(c.recv(0, T).unwrap().unwrap().frame, f);
    let g = eth([0xff; 6], mac(2), 1514, 9);
    b.send(0, &NetHdr::NONE, &g).unwrap();
    assert_eq!(a.recv(0, T).unwrap().unwrap().frame, g);
    assert_eq!(c.recv(0, T).unwrap().unwrap().frame, g);
    // A TSO frame from C reaches the no-MRG guest A whole (it acked GUEST_TSO4 and posts
    // 64 KiB buffers).
    let (big, h) = tcp4(30_000, mac(3), mac(1));
    c.send(0, &h, &big).unwrap();
    let r = a.recv(0, T).unwrap().expect("TSO frame");
    assert_eq!(r.frame, big);
    assert_eq!(r.num_buffers, 1);
}

#[test]
fn hostile_tx_chains_are_dropped_and_the_port_keeps_working() {
    use virtnet_guest::RawDesc;
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(SwitchConfig::default());
    let pa = port(&sw, dir.path(), 1, 1);
    let pb = port(&sw, dir.path(), 2, 1);
    let mut a = Guest::connect(pa.socket_path(), GuestConfig::default()).unwrap();
    let mut b = Guest::connect(pb.socket_path(), GuestConfig::default()).unwrap();
    wait_running(&pa);
    wait_running(&pb);
    let buf = a.alloc_mem(4096, 64).unwrap();
    {
        let mut raw = a.raw_queue(1).unwrap();
        let before = raw.used_idx().unwrap();
        raw.push_chain(&[RawDesc::read(0xdead_0000_0000, 100)])
            .unwrap();
        raw.push_chain(&[RawDesc {
            addr: buf,
            len: 100,
            flags: 2, // VRING_DESC_F_WRITE on TX
            next: None,
        }])
        .unwrap();
        raw.push_chain(&[RawDesc::read(buf, 4)]).unwrap(); // truncated header
        raw.publish().unwrap();
        raw.kick().unwrap();
        let deadline = Instant::now() + T;
        while raw.used_idx().unwrap().wrapping_sub(before) < 3 {
            assert!(Instant::now() < deadline, "bad chains not returned");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let s = pa.stats();
    assert_eq!(s.drop_count(DropReason::BadAddress), 1);
    assert_eq!(s.drop_count(DropReason::BadDirection), 1);
    assert_eq!(s.drop_count(DropReason::HeaderTruncated), 1);
    // Still works.
    let f = eth([0xff; 6], mac(1), 200, 1);
    a.send(0, &NetHdr::NONE, &f).unwrap();
    assert_eq!(b.recv(0, T).unwrap().unwrap().frame, f);
    // An avail index far ahead breaks A's TX queue but nothing else, and nothing spins.
    {
        let mut raw = a.raw_queue(1).unwrap();
        let idx = raw.avail_idx();
        raw.publish_avail_idx(idx.wrapping_add(5000)).unwrap();
        raw.kick().unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    let g = eth([0xff; 6], mac(2), 100, 2);
    b.send(0, &NetHdr::NONE, &g).unwrap();
    assert_eq!(a.recv(0, T).unwrap().unwrap().frame, g);
    drop(a);
    drop(b);
    pa.shutdown();
    pb.shutdown();
}

/// Three guests with two queue pairs each send to one another at the same time (unicast to
/// both others, and broadcast) from their own threads: every worker delivers into the other
/// ports' RX queues while their workers deliver into its own. Deliveries keep an RX queue
/// locked for a burst, so this is the lock-ordering check: it must finish (no deadlock), and
/// every frame that arrives must be intact.
#[test]
fn concurrent_cross_traffic_between_three_multiqueue_guests() {
    const FRAMES: usize = 3000;
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(SwitchConfig::default());
    let ports: Vec<NetPort> = (1..=3).map(|n| port(&sw, dir.path(), n, 2)).collect();
    let cfg = GuestConfig {
        queue_pairs: 2,
        ..GuestConfig::default()
    };
    let mut guests: Vec<Guest> = ports
        .iter()
        .map(|p| Guest::connect(p.socket_path(), cfg.clone()).unwrap())
        .collect();
    for p in &ports {
        wait_running(p);
    }
    for g in &mut guests {
        g.set_queue_pairs(2).unwrap();
    }
    // Everyone announces itself so unicast is switched, not flooded.
    for (i, g) in guests.iter_mut().enumerate() {
        let me = mac(i as u8 + 1);
        g.send(0, &NetHdr::NONE, &eth([0xff; 6], me, 60, 0))
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let threads: Vec<_> = guests
        .into_iter()
        .enumerate()
        .map(|(i, mut g)| {
            let done = done_tx.clone();
            std::thread::spawn(move || {
                let me = mac(i as u8 + 1);
                let others = [mac((i as u8 + 1) % 3 + 1), mac((i as u8 + 2) % 3 + 1)];
                let (mut sent, mut got, mut bad) = (0usize, 0usize, 0usize);
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut k = 0usize;
                while sent < FRAMES && Instant::now() < deadline {
                    for qp in 0..2u16 {
                        sent += g
                            .send_batch(qp, 32, |_, buf| {
                                k += 1;
                                let dst = match k % 5 {
                                    0 => [0xff; 6],
                                    n => others[n % 2],
                                };
                                let len = 60 + (k * 97) % 1400;
                                let f = eth(dst, me, len, k as u8);
                                buf[..len].copy_from_slice(&f);
                                Some((NetHdr::NONE, len))
                            })
                            .unwrap();
                        got += g
                            .drain_with(qp, 256, |_, f| {
                                // eth() fills byte j with j + seed: check from byte 15 on.
                                let seed = f.get(15).map_or(0, |b| b.wrapping_sub(15));
                                let intact = f.len() >= 60
                                    && f[15..]
                                        .iter()
                                        .enumerate()
                                        .all(|(j, &b)| b == ((j + 15) as u8).wrapping_add(seed));
                                bad += usize::from(!intact);
                            })
                            .unwrap();
                    }
                }
                for _ in 0..50 {
                    for qp in 0..2u16 {
                        got += g.drain_with(qp, 256, |_, _| {}).unwrap();
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                let _ = done.send((i, sent, got, bad));
                g
            })
        })
        .collect();
    drop(done_tx);
    let mut results = Vec::new();
    for _ in 0..3 {
        match done_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(r) => results.push(r),
            Err(e) => panic!("cross traffic did not finish (deadlock?): {e}"),
        }
    }
    let guests: Vec<Guest> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, sent, got, bad) in results {
        assert!(
            sent >= FRAMES,
            "guest {i} could not send everything: {sent}"
        );
        assert!(got > 0, "guest {i} received nothing");
        assert_eq!(bad, 0, "guest {i} received damaged frames");
    }
    drop(guests);
    for p in ports {
        p.shutdown();
    }
}
