//! Frame rate and throughput of the AF_PACKET uplink beside the kernel's bridge path.
//!
//! Run as root (it makes a private network namespace; nothing outside it is touched):
//!
//! ```text
//! cargo run --release -p virtnet-port-afpacket --example uplink_bench [SECONDS]
//! ```
//!
//! Both paths start at the same switch with the same in-process frame generator (a switch
//! port forwarding one frame over and over, batches of 64) and end at the same place, the far
//! end of a veth pair, whose kernel RX counter is the measurement:
//!
//! ```text
//!  TX  afpacket:  generator ─► switch ─► AfPacketPort(va) TX ring ══veth══ vb  (count rx)
//!      bridge:    generator ─► switch ─► TapPort(vt-b0) writev ─► br0 ─► va2 ══veth══ vb2
//!  RX  afpacket:  generator ─► AfPacketPort(vb)  ══veth══ va RX ring ─► switch ─► counter
//!      bridge:    generator ─► AfPacketPort(vb2) ══veth══ va2 ─► br0 ─► vt-b0 ─► TapPort
//!                 reader (read) ─► switch ─► counter
//! ```
//!
//! Unknown-unicast frames (the destination MAC is nobody's), so the receiving kernel stack
//! drops them right after counting. On a shared 2-core machine the figures are noisy; compare
//! the two columns of one run rather than runs.

use std::fs;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtnet_port_afpacket::{sys, AfPacketConfig, AfPacketPort};
use virtnet_port_tap::{TapConfig, TapPort};
use virtnet_switch::{DropReason, Frame, NetHdr, PortConfig, PortId, PortSink, SliceFrame, Switch};

fn ip(args: &str) {
    let st = Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .expect("ip");
    assert!(st.success(), "ip {args}");
}

/// RX packets of `ifname` in this thread's namespace.
fn rx_packets(ifname: &str) -> u64 {
    let text = fs::read_to_string("/proc/thread-self/net/dev").unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let (name, rest) = l.split_once(':')?;
            (name.trim() == ifname).then(|| rest.split_whitespace().nth(1)?.parse().ok())?
        })
        .unwrap_or(0)
}

struct Nop;
impl PortSink for Nop {
    fn deliver(&self, _f: &dyn Frame, _h: &NetHdr) -> Result<(), DropReason> {
        Ok(())
    }
}

#[derive(Default)]
struct Counter(AtomicU64);
impl PortSink for Counter {
    fn deliver(&self, _f: &dyn Frame, _h: &NetHdr) -> Result<(), DropReason> {
        self.0.fetch_add(1, Relaxed);
        Ok(())
    }
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

/// Forward `f` from `port` as fast as possible for `secs` (or until `stop`).
fn generate(sw: &Switch, port: PortId, f: &[u8], secs: f64) {
    let mut b = sw.new_batch();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        sw.begin(&mut b);
        for _ in 0..64 {
            sw.forward(&mut b, port, &SliceFrame(f), &NetHdr::NONE);
        }
        sw.end(&mut b);
    }
}

fn rate(frames: u64, len: usize, secs: f64) -> String {
    let pps = frames as f64 / secs;
    format!(
        "{:7.3} Mpps {:7.2} Gbit/s",
        pps / 1e6,
        pps * (len as f64) * 8.0 / 1e9
    )
}

/// TX: frames/s arriving at `far` while the generator on `sw` runs.
fn tx_run(sw: &Switch, gen: PortId, far: &str, len: usize, secs: f64) -> u64 {
    let f = frame(len);
    generate(sw, gen, &f, 0.2); // warm up
    let before = rx_packets(far);
    generate(sw, gen, &f, secs);
    std::thread::sleep(Duration::from_millis(100));
    rx_packets(far) - before
}

/// RX: frames counted by `counter` while a generator sends from `lan_if` for `secs`.
fn rx_run(lan_if: &str, counter: &Counter, len: usize, secs: f64) -> u64 {
    let lan = Switch::new(Default::default());
    let up = AfPacketPort::start(lan.clone(), &AfPacketConfig::new(lan_if)).expect("LAN generator");
    let gen = lan.add_port(PortConfig::default(), Arc::new(Nop));
    let f = frame(len);
    generate(&lan, gen, &f, 0.2);
    std::thread::sleep(Duration::from_millis(50));
    let before = counter.0.load(Relaxed);
    generate(&lan, gen, &f, secs);
    std::thread::sleep(Duration::from_millis(100));
    let n = counter.0.load(Relaxed) - before;
    up.shutdown();
    n
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    std::thread::spawn(move || {
        sys::unshare_netns().expect("unshare(CLONE_NEWNET): run as root");
        ip("link set lo up");
        ip("link add va type veth peer name vb");
        ip("link add va2 type veth peer name vb2");
        ip("link add br0 type bridge");
        for i in ["va", "vb", "va2", "vb2", "br0"] {
            ip(&format!("link set {i} up"));
        }
        ip("link set va2 master br0");

        // AF_PACKET side.
        let sw_a = Switch::new(Default::default());
        let up = AfPacketPort::start(sw_a.clone(), &AfPacketConfig::new("va")).expect("uplink");
        let gen_a = sw_a.add_port(PortConfig::default(), Arc::new(Nop));
        let count_a = Arc::new(Counter::default());
        // Kernel bridge side.
        let sw_b = Switch::new(Default::default());
        let tap = TapPort::start(
            sw_b.clone(),
            &TapConfig {
                name: "vt-b0".into(),
                addr: None,
                mtu: Some(1500),
                vlan: None,
            },
        )
        .expect("tap");
        ip("link set vt-b0 master br0");
        let gen_b = sw_b.add_port(PortConfig::default(), Arc::new(Nop));
        let count_b = Arc::new(Counter::default());
        std::thread::sleep(Duration::from_millis(300));

        println!("uplink_bench: {secs} s per cell, unknown-unicast frames, batches of 64");
        println!(
            "{:<26} {:<34} {:<34}",
            "", "AF_PACKET uplink", "TAP + Linux bridge"
        );
        for len in [64usize, 1514] {
            let a = tx_run(&sw_a, gen_a, "vb", len, secs);
            let b = tx_run(&sw_b, gen_b, "vb2", len, secs);
            println!(
                "{:<26} {:<34} {:<34}",
                format!("switch -> LAN, {len} B"),
                rate(a, len, secs),
                rate(b, len, secs)
            );
        }
        sw_a.remove_port(gen_a);
        sw_b.remove_port(gen_b);
        let ca = sw_a.add_port(PortConfig::default(), count_a.clone());
        let cb = sw_b.add_port(PortConfig::default(), count_b.clone());
        for len in [64usize, 1514] {
            let a = rx_run("vb", &count_a, len, secs);
            let b = rx_run("vb2", &count_b, len, secs);
            println!(
                "{:<26} {:<34} {:<34}",
                format!("LAN -> switch, {len} B"),
                rate(a, len, secs),
                rate(b, len, secs)
            );
        }
        println!("uplink counters: {:?}", up.stats());
        println!("tap counters: {:?}", tap.stats());
        sw_a.remove_port(ca);
        sw_b.remove_port(cb);
        up.shutdown();
        tap.shutdown();
        d.store(true, Relaxed);
    })
    .join()
    .expect("bench thread");
    assert!(done.load(Relaxed));
}
