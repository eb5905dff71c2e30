//! Real Linux guests (QEMU, TCG) on an `internal` network of `virtnetd`.
//!
//! Each test boots its own daemon and guests (see tests/qemu/mod.rs) and asserts on real
//! traffic: ping replies, iperf3 bytes and the switch's counters. Without
//! `qemu-system-x86_64` the tests print SKIPPED and pass, unless `CI` is set.
//! Guest image: scripts/guest-image.sh (cached in <target>/guest-image).

mod qemu;

use std::time::Duration;

use qemu::{last_ping_seq, Daemon, Guest, GuestCfg, Lab, Machine, PortCfg};

const MAC_A: &str = "52:54:00:00:00:0a";
const MAC_B: &str = "52:54:00:00:00:0b";
const MAC_C: &str = "52:54:00:00:00:0c";
const IP_A: &str = "10.0.0.1";
const IP_B: &str = "10.0.0.2";
const IP_C: &str = "10.0.0.3";

// virtio-net feature bits (virtio spec 5.1.3).
const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_MQ: u64 = 1 << 22;
const F_VERSION_1: u64 = 1 << 32;

fn cidr(ip: &str) -> String {
    format!("{ip}/24")
}

fn boot2(lab: &Lab, a: GuestCfg, b: GuestCfg) -> [Guest; 2] {
    let v = Guest::boot_all(lab, vec![a, b]);
    v.try_into().unwrap_or_else(|_| unreachable!())
}

/// a. Two guests ping each other both ways, then iperf3 TCP A→B for 5 s.
#[test]
fn two_guests_ping_and_iperf() {
    let Some(lab) = Lab::new("two_guests_ping_and_iperf", 2) else {
        return;
    };
    let (pa, pb) = (PortCfg::new("a", MAC_A), PortCfg::new("b", MAC_B));
    let d = Daemon::start(&lab, &[pa.clone(), pb.clone()]);
    let [mut a, mut b] = boot2(
        &lab,
        GuestCfg::new(&lab, &pa, &cidr(IP_A)),
        GuestCfg::new(&lab, &pb, &cidr(IP_B)),
    );

    assert!(a.reach(IP_B, 30), "A cannot reach B");
    let ab = a.ping(IP_B, 10, 0.2);
    let ba = b.ping(IP_A, 10, 0.2);
    eprintln!("ping A->B {ab:?}\nping B->A {ba:?}");
    assert_eq!(ab.rx, 10, "A->B replies");
    assert_eq!(ba.rx, 10, "B->A replies");

    let before = d.port("b");
    b.iperf_server();
    let r = a.iperf(IP_B, 5);
    eprintln!(
        "iperf3 A->B: {:.0} Mbit/s, {} bytes, {} retransmits",
        r.bps / 1e6,
        r.bytes,
        r.retrans
    );
    assert!(r.bytes > 10_000_000, "iperf3 moved only {} bytes", r.bytes);
    let after = d.port("b");
    assert!(
        after.tx_bytes - before.tx_bytes >= r.bytes,
        "switch delivered {} bytes to B, iperf3 counted {}",
        after.tx_bytes - before.tx_bytes,
        r.bytes
    );
    let sa = d.port("a");
    assert!(sa.connected && sa.running, "port a: {sa:?}");
    eprintln!("port a: {sa:?}\nport b: {after:?}");
    a.poweroff();
    b.poweroff();
}

/// b. Three guests: a broadcast reaches everyone; once the switch has learned the MACs,
/// unicast between A and B is not delivered to C.
#[test]
fn three_guests_flood_then_learn() {
    let Some(lab) = Lab::new("three_guests_flood_then_learn", 3) else {
        return;
    };
    let ports = [
        PortCfg::new("a", MAC_A),
        PortCfg::new("b", MAC_B),
        PortCfg::new("c", MAC_C),
    ];
    let d = Daemon::start(&lab, &ports);
    let cfgs = ports
        .iter()
        .zip([IP_A, IP_B, IP_C])
        .map(|(p, ip)| GuestCfg::new(&lab, p, &cidr(ip)))
        .collect();
    let mut g = Guest::boot_all(&lab, cfgs);
    let [a, b, c] = &mut g[..] else {
        unreachable!()
    };

    // Broadcast: B and C both answer A's ping to the broadcast address.
    let c_before = d.port("c");
    let flood = a.ping("10.0.0.255", 3, 0.5);
    eprintln!("broadcast ping: {flood:?}");
    for ip in [IP_B, IP_C] {
        assert!(
            flood.replies_from.iter().any(|r| r == ip),
            "no reply from {ip} to the broadcast ping: {flood:?}"
        );
    }
    let c_after = d.port("c");
    assert!(
        c_after.tx_frames - c_before.tx_frames >= 3,
        "C got {} frames during the broadcast ping",
        c_after.tx_frames - c_before.tx_frames
    );
    assert!(
        d.port("a").flooded >= 3,
        "A's broadcasts were not counted as flooded"
    );

    // Learning: after A<->B traffic the FDB knows both; unicast then skips C.
    assert!(a.reach(IP_B, 30), "A cannot reach B");
    assert_eq!(b.ping(IP_A, 3, 0.2).rx, 3);
    let (c_rx0, _) = c.netdev();
    let (s_b0, s_c0) = (d.port("b"), d.port("c"));
    let uni = a.ping(IP_B, 100, 0.05);
    let (s_b1, s_c1) = (d.port("b"), d.port("c"));
    let (c_rx1, _) = c.netdev();
    let to_b = s_b1.tx_frames - s_b0.tx_frames;
    let to_c = s_c1.tx_frames - s_c0.tx_frames;
    eprintln!(
        "unicast A->B: {} replies; switch delivered {to_b} frames to B, {to_c} to C; C's eth0 rx +{}",
        uni.rx,
        c_rx1 - c_rx0
    );
    assert!(uni.rx >= 95, "A->B unicast lost: {uni:?}");
    assert!(to_b >= 100, "B got only {to_b} frames");
    assert!(
        to_c <= 5,
        "C got {to_c} frames during 100 A->B unicast pings"
    );
    assert!(c_rx1 - c_rx0 <= 5, "C's eth0 saw {} frames", c_rx1 - c_rx0);
    for guest in g {
        guest.poweroff();
    }
}

/// One feature variant `v` against a default guest `n`: pings both ways, iperf3 n→v for 2 s
/// (large frames into v's rx path), and the features the device saw.
fn variant(
    name: &str,
    v_port: PortCfg,
    tweak: impl FnOnce(&mut GuestCfg),
    check: impl FnOnce(&qemu::PortStats),
) {
    let Some(lab) = Lab::new(name, 2) else {
        return;
    };
    let n_port = PortCfg::new("n", MAC_A);
    let d = Daemon::start(&lab, &[n_port.clone(), v_port.clone()]);
    let mut vcfg = GuestCfg::new(&lab, &v_port, &cidr(IP_B));
    tweak(&mut vcfg);
    let [mut n, mut v] = boot2(&lab, GuestCfg::new(&lab, &n_port, &cidr(IP_A)), vcfg);
    assert!(v.reach(IP_A, 30), "{name}: v cannot reach n");
    let vn = v.ping(IP_A, 10, 0.1);
    let nv = n.ping(IP_B, 10, 0.1);
    assert_eq!((vn.rx, nv.rx), (10, 10), "{name}: v->n {vn:?} n->v {nv:?}");
    v.iperf_server();
    let r = n.iperf(IP_B, 2);
    eprintln!(
        "{name}: ping v->n avg {:.2} ms; iperf3 n->v {:.0} Mbit/s ({} bytes)",
        vn.avg_ms,
        r.bps / 1e6,
        r.bytes
    );
    assert!(
        r.bytes > 1_000_000,
        "{name}: iperf3 moved {} bytes",
        r.bytes
    );
    let s = d.port(&v_port.name);
    eprintln!("{name}: acked_features {:#x}, {s:?}", s.acked_features);
    check(&s);
    n.poweroff();
    v.poweroff();
}

/// c1. A guest without mergeable rx buffers.
#[test]
fn variant_no_mrg_rxbuf() {
    variant(
        "variant_no_mrg_rxbuf",
        PortCfg::new("v", MAC_B),
        |g| g.device_props.push("mrg_rxbuf=off".into()),
        |s| assert_eq!(s.acked_features & F_MRG_RXBUF, 0, "MRG_RXBUF acked"),
    );
}

/// c2. A guest without checksum offload either way (hence no TSO/GSO).
#[test]
fn variant_no_csum() {
    variant(
        "variant_no_csum",
        PortCfg::new("v", MAC_B),
        |g| {
            g.device_props
                .extend(["csum=off".into(), "guest_csum=off".into()])
        },
        |s| assert_eq!(s.acked_features & (F_CSUM | F_GUEST_CSUM), 0, "CSUM acked"),
    );
}

/// c3. A multiqueue guest: 2 queue pairs, 2 vCPUs (Linux uses min(vCPUs, pairs)).
#[test]
fn variant_multiqueue() {
    let mut port = PortCfg::new("v", MAC_B);
    port.queue_pairs = 2;
    variant(
        "variant_multiqueue",
        port,
        |g| g.smp = 2,
        |s| {
            assert_ne!(s.acked_features & F_MQ, 0, "MQ not acked");
            assert_eq!(s.active_queue_pairs, 2, "queue pairs in use");
        },
    );
}

/// c4. A microvm guest on virtio-mmio: legacy virtio (no VERSION_1). Its driver takes the
/// transport's largest ring, 1024 entries (QEMU's legacy virtio-mmio QueueNumMax), so the
/// port must accept 1024.
#[test]
fn variant_microvm_mmio() {
    let mut port = PortCfg::new("v", MAC_B);
    port.queue_size = Some(1024);
    variant(
        "variant_microvm_mmio",
        port,
        |g| g.machine = Machine::Microvm,
        |s| {
            assert_eq!(
                s.acked_features & F_VERSION_1,
                0,
                "VERSION_1 acked by a legacy device"
            )
        },
    );
}

/// d. virtnetd is SIGKILLed and restarted under running guests; QEMU reconnects
/// (`reconnect=1`) and traffic resumes.
#[test]
fn daemon_restart_under_guests() {
    let Some(lab) = Lab::new("daemon_restart_under_guests", 2) else {
        return;
    };
    let (pa, pb) = (PortCfg::new("a", MAC_A), PortCfg::new("b", MAC_B));
    let mut d = Daemon::start(&lab, &[pa.clone(), pb.clone()]);
    let [mut a, mut b] = boot2(
        &lab,
        GuestCfg::new(&lab, &pa, &cidr(IP_A)),
        GuestCfg::new(&lab, &pb, &cidr(IP_B)),
    );
    assert!(a.reach(IP_B, 30), "A cannot reach B");

    // 80 pings over 20 s; kill the daemon once a few have been answered.
    let h = a.send(&format!("vt_ping {IP_B} 80 0.25"));
    let seen = a.wait_for(h.1, Duration::from_secs(30), "5 replies", |t| {
        last_ping_seq(t).filter(|&s| s >= 4)
    });
    d.kill();
    std::thread::sleep(Duration::from_secs(1));
    let at_restart = last_ping_seq(&a.console_text()[h.1..]).unwrap_or(seen);
    d.restart();
    let resumed = a.wait_for(
        h.1,
        Duration::from_secs(60),
        "replies after the restart",
        |t| last_ping_seq(t).filter(|&s| s > at_restart + 2),
    );
    let (_, out) = a.finish(h, Duration::from_secs(90));
    let p = qemu::parse_ping(&out).expect("ping marker");
    let after = out
        .lines()
        .filter(|l| l.contains(" bytes from "))
        .filter_map(|l| {
            l.split("seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .filter(|&s| s > at_restart)
        .count();
    eprintln!("killed at seq {seen}, restarted after seq {at_restart}, first reply after at seq {resumed}; {after} replies after; {p:?}");
    assert!(after >= 10, "only {after} replies after the restart");
    // Both directions and both ports back.
    assert_eq!(b.ping(IP_A, 5, 0.2).rx, 5, "B->A after the restart");
    for name in ["a", "b"] {
        let s = d.port(name);
        assert!(
            s.connected && s.running,
            "port {name} after the restart: {s:?}"
        );
    }
    a.poweroff();
    b.poweroff();
}

/// e. A guest powers off and a new QEMU boots on the same socket: traffic resumes.
#[test]
fn guest_reboot_same_socket() {
    let Some(lab) = Lab::new("guest_reboot_same_socket", 2) else {
        return;
    };
    let (pa, pb) = (PortCfg::new("a", MAC_A), PortCfg::new("b", MAC_B));
    let d = Daemon::start(&lab, &[pa.clone(), pb.clone()]);
    let bcfg = GuestCfg::new(&lab, &pb, &cidr(IP_B));
    let [mut a, b] = boot2(&lab, GuestCfg::new(&lab, &pa, &cidr(IP_A)), bcfg.clone());
    assert!(a.reach(IP_B, 30), "A cannot reach B");
    assert_eq!(a.ping(IP_B, 5, 0.2).rx, 5);
    b.poweroff();
    d.wait_port("b", Duration::from_secs(20), |s| !s.connected);
    assert_eq!(
        a.ping(IP_B, 3, 0.2).rx,
        0,
        "replies from a powered-off guest"
    );

    let mut b2 = Guest::boot(&lab, bcfg);
    assert!(a.reach(IP_B, 30), "A cannot reach the rebooted B");
    let p = a.ping(IP_B, 10, 0.2);
    assert_eq!(p.rx, 10, "A->B after the reboot: {p:?}");
    assert_eq!(b2.ping(IP_A, 5, 0.2).rx, 5, "B->A after the reboot");
    let s = d.port("b");
    assert!(
        s.connected && s.running && s.connections >= 2,
        "port b: {s:?}"
    );
    a.poweroff();
    b2.poweroff();
}

/// The harness and guest image against DPDK testpmd (io-forward) instead of virtnetd: an
/// independent check of the test machinery. Ignored by default (testpmd polls a whole core).
#[test]
#[ignore = "harness self-check against dpdk-testpmd; run with --ignored"]
fn harness_selfcheck_with_testpmd() {
    let Some(lab) = Lab::new("harness_selfcheck_with_testpmd", 2) else {
        return;
    };
    let (pa, pb) = (PortCfg::new("a", MAC_A), PortCfg::new("b", MAC_B));
    let Some(_tp) = qemu::Testpmd::start(&lab, &lab.socket("a"), &lab.socket("b")) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "required in CI: dpdk-testpmd not installed"
        );
        eprintln!("SKIPPED: dpdk-testpmd not installed");
        return;
    };
    let mut a = Guest::boot(&lab, GuestCfg::new(&lab, &pa, &cidr(IP_A)));
    let mut b = Guest::boot(&lab, GuestCfg::new(&lab, &pb, &cidr(IP_B)));
    assert!(a.reach(IP_B, 30), "A cannot reach B");
    let p = b.ping(IP_A, 5, 0.2);
    assert_eq!(p.rx, 5, "{p:?}");
    b.iperf_server();
    let r = a.iperf(IP_B, 2);
    eprintln!(
        "testpmd: iperf3 A->B {:.0} Mbit/s, {} bytes",
        r.bps / 1e6,
        r.bytes
    );
    assert!(r.bytes > 1_000_000, "{r:?}");
    let (rx, tx) = b.netdev();
    assert!(rx > 100 && tx > 100, "B eth0 rx={rx} tx={tx}");
    b.poweroff();

    // The static roles of init.sh: B pings A on its own and powers off.
    let mut cfg = GuestCfg::new(&lab, &pb, &cidr(IP_B));
    cfg.kernel_args = vec![
        "vt.role=ping".into(),
        format!("vt.peer={IP_A}"),
        "vt.count=4".into(),
    ];
    let mut b = Guest::spawn(&lab, cfg);
    let out = b.wait_for(0, qemu::BOOT_TIMEOUT, "poweroff", |t| {
        t.contains("VT: poweroff").then(|| t.to_string())
    });
    let p = qemu::parse_ping(&out).expect("ping marker");
    assert!(p.rx >= 3, "role=ping: {p:?}");
    a.poweroff();
}
