//! Real Linux guests (QEMU, TCG) on an `internal` network of `virtnetd`.
//!
//! Each test boots its own daemon and guests (see tests/qemu/mod.rs) and asserts on real
//! traffic: ping replies, iperf3 bytes and the switch's counters. Without
//! `qemu-system-x86_64` the tests print SKIPPED and pass, unless `CI` is set.
//! Guest image: scripts/guest-image.sh (cached in <target>/guest-image).

mod qemu;

use std::time::Duration;

use qemu::{Daemon, Guest, GuestCfg, Lab, Machine, PortCfg};

const MAC_A: &str = "52:54:00:00:00:0a";
const MAC_B: &str = "52:54:00:00:00:0b";
const MAC_C: &str = "52:54:00:00:00:0c";
const IP_A: &str = "10.0.0.1";
const IP_B: &str = "10.0.0.2";
const IP_C: &str = "10.0.0.3";

fn cidr(ip: &str) -> String {
    format!("{ip}/24")
}

/// a. Two guests ping each other both ways, then iperf3 TCP A→B for 5 s.
#[test]
fn two_guests_ping_and_iperf() {
    let Some(lab) = Lab::new("two_guests_ping_and_iperf", 2) else {
        return;
    };
    let (pa, pb) = (PortCfg::new("a", MAC_A), PortCfg::new("b", MAC_B));
    let d = Daemon::start(&lab, &[pa.clone(), pb.clone()]);
    let mut a = Guest::boot(&lab, GuestCfg::new(&lab, &pa, &cidr(IP_A)));
    let mut b = Guest::boot(&lab, GuestCfg::new(&lab, &pb, &cidr(IP_B)));

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
    assert_eq!(sa.total_drops(), 0, "drops on a: {:?}", sa.drops);
    a.poweroff();
    b.poweroff();
}
