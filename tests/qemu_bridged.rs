//! Real Linux guests (QEMU, TCG) on a `bridged` network of `virtnetd`.
//!
//! Two network namespaces of the test's own: "host" (virtnetd runs there, `ip netns exec`, and
//! its uplink is `up0`) and "LAN" (`lan0` = 10.88.0.1/24, Debian's dnsmasq serving DHCP, an
//! iperf3 server), joined by a veth pair that plays the host NIC and the LAN's cable. The
//! guests' vhost-user sockets are files, so QEMU runs in the root namespace.
//!
//! ```text
//!   QEMU a ─┐ vhost-user                                     netns LAN
//!   QEMU b ─┴──────────► virtnetd (netns host) ─ AF_PACKET up0 ══ lan0: dnsmasq, iperf3 -s
//! ```
//!
//! The closing figure compares guest ↔ LAN TCP throughput through the uplink with the kernel's
//! own bridge path measured in the same run: iperf3 between two more namespaces joined by
//! veth → Linux bridge → veth (no VM: an upper bound for the kernel path, see the output).
//!
//! Needs root, QEMU, dnsmasq and iperf3; otherwise SKIPPED.

mod qemu;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};
use virtnet_port_sys::is_root;

use qemu::{markers, Guest, GuestCfg, Lab, PortCfg};

const VIRTNETD: &str = env!("CARGO_BIN_EXE_virtnetd");
const MAC_A: &str = "52:54:00:88:00:0a";
const MAC_B: &str = "52:54:00:88:00:0b";
const LAN_IP: &str = "10.88.0.1";

fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Run `cmd` with `sh -c` in namespace `ns`; panics on failure; returns stdout + stderr.
fn must(ns: &str, cmd: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .stdin(Stdio::null())
        .output()
        .expect("ip netns exec");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "[{ns}] {cmd}: {text}");
    text
}

/// Spawn `args` in namespace `ns` (`ip netns exec` execs: the child's PID is the program's).
fn spawn_in(ns: &str, args: &[&str], log: &PathBuf) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"))
}

/// Namespaces and children of one test; children are killed by PID, namespaces deleted.
struct World {
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
    logs: Vec<PathBuf>,
}

impl World {
    fn new() -> World {
        World {
            namespaces: Vec::new(),
            children: Vec::new(),
            logs: Vec::new(),
        }
    }

    fn netns(&mut self, tag: &str) -> String {
        let name = format!("vtq{tag}{}", std::process::id());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name}");
        self.namespaces.push(name.clone());
        must(&name, "ip link set lo up");
        name
    }

    fn spawn(&mut self, what: &str, ns: &str, args: &[&str], log: PathBuf) {
        let c = spawn_in(ns, args, &log);
        self.logs.push(log);
        self.children.push((what.to_string(), c));
    }

    fn stop(&mut self, what: &str) {
        if let Some(i) = self.children.iter().position(|(w, _)| w == what) {
            let (_, mut c) = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            for l in &self.logs {
                let text = fs::read_to_string(l).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("----- {} (last 30 lines) -----", l.display());
                for l in &lines[lines.len().saturating_sub(30)..] {
                    eprintln!("  {l}");
                }
            }
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn virtnetd_answers(control: &PathBuf) -> bool {
    control.exists()
        && Command::new(VIRTNETD)
            .args(["ping", "--control"])
            .arg(control)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

fn virtnetd_stats(control: &PathBuf) -> String {
    Command::new(VIRTNETD)
        .args(["stats", "--control"])
        .arg(control)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// `vt_dhcp` until a lease from `server` is bound; returns the address.
fn dhcp_from(g: &mut Guest, server: &str) -> String {
    for attempt in 0..4 {
        let (rc, out) = g.run("vt_dhcp", Duration::from_secs(60));
        if let Some(m) = markers(&out, "dhcp")
            .into_iter()
            .find(|m| m.get("event").map(String::as_str) == Some("bound"))
        {
            eprintln!("{}: DHCP lease {m:?}", g.cfg.name);
            assert_eq!(m.get("server").map(String::as_str), Some(server));
            assert_eq!(m.get("mask").map(String::as_str), Some("24"));
            return m.get("ip").cloned().unwrap_or_default();
        }
        eprintln!("{}: vt_dhcp attempt {attempt}: rc={rc} {out}", g.cfg.name);
    }
    panic!("{}: no DHCP lease from the LAN", g.cfg.name);
}

/// `vt_iperf DST SECS EXTRA` in the guest: (bytes, bit/s).
fn guest_iperf(g: &mut Guest, dst: &str, secs: u32, extra: &str) -> (u64, f64) {
    let (_, out) = g.run(
        &format!("vt_iperf {dst} {secs} {extra}"),
        Duration::from_secs(u64::from(secs) * 3 + 60),
    );
    let m = markers(&out, "iperf3");
    let m = m
        .last()
        .unwrap_or_else(|| panic!("no iperf3 marker: {out}"));
    let num = |k: &str| m.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (num("bytes") as u64, num("bps"))
}

/// iperf3 from namespace `client` to `server_ip` (served in `server`), TCP, `secs` seconds:
/// receiver bit/s.
fn ns_iperf(
    w: &mut World,
    lab: &Lab,
    client: &str,
    server: &str,
    server_ip: &str,
    secs: u32,
) -> f64 {
    w.spawn(
        "iperf3-bridge",
        server,
        &["iperf3", "-s", "-1", "-B", server_ip],
        lab.dir().join("iperf3-bridge.log"),
    );
    thread::sleep(Duration::from_millis(500));
    let out = must(
        client,
        &format!("iperf3 -c {server_ip} -t {secs} -J | grep -A8 '\"sum_received\"' | grep bits_per_second"),
    );
    w.stop("iperf3-bridge");
    out.split(':')
        .nth(1)
        .and_then(|v| v.trim().trim_end_matches(',').parse::<f64>().ok())
        .unwrap_or(0.0)
}

#[test]
fn bridged_guests_get_dhcp_from_the_lan_ping_and_iperf() {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "required in CI: bridged test needs root (network namespaces, CAP_NET_RAW)"
        );
        eprintln!("SKIPPED: bridged test needs root (network namespaces, CAP_NET_RAW)");
        return;
    }
    if !have("dnsmasq") || !have("iperf3") {
        assert!(
            std::env::var_os("CI").is_none(),
            "required in CI: needs dnsmasq (dnsmasq-base) and iperf3"
        );
        eprintln!("SKIPPED: needs dnsmasq (dnsmasq-base) and iperf3");
        return;
    }
    let Some(lab) = Lab::new("bridged_guests_get_dhcp_from_the_lan_ping_and_iperf", 2) else {
        return;
    };
    let mut w = World::new();
    let host = w.netns("h");
    let lan = w.netns("l");
    must(
        &host,
        &format!("ip link add up0 type veth peer name lan0 netns {lan} && ip link set up0 up"),
    );
    must(
        &lan,
        &format!("ip addr add {LAN_IP}/24 dev lan0 && ip link set lan0 up"),
    );

    // The LAN's DHCP server.
    let leases = lab.dir().join("dnsmasq.leases");
    let leases_arg = format!("--dhcp-leasefile={}", leases.display());
    w.spawn(
        "dnsmasq",
        &lan,
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--log-facility=-",
            "--log-dhcp",
            "--user=root",
            "--port=0",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--interface=lan0",
            "--bind-interfaces",
            "--dhcp-range=10.88.0.100,10.88.0.150,255.255.255.0,10m",
            &leases_arg,
        ],
        lab.dir().join("dnsmasq.log"),
    );

    // virtnetd with the bridged network, in the host namespace.
    let control = lab.dir().join("control.sock");
    let (pa, pb) = (PortCfg::new("a", MAC_A), PortCfg::new("b", MAC_B));
    let mut toml = format!(
        "control_socket = \"{}\"\n\n[[network]]\nname = \"lan\"\nmode = \"bridged\"\nuplink = \"up0\"\n",
        control.display()
    );
    for p in [&pa, &pb] {
        toml.push_str(&format!(
            "\n[[network.port]]\nname = \"{}\"\nsocket = \"{}\"\nmac = \"{}\"\n",
            p.name,
            lab.socket(&p.name).display(),
            p.mac
        ));
    }
    let cfg = lab.dir().join("virtnetd.toml");
    fs::write(&cfg, toml).unwrap();
    let cfg_s = cfg.display().to_string();
    w.spawn(
        "virtnetd",
        &host,
        &[VIRTNETD, "--config", &cfg_s],
        lab.dir().join("virtnetd.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !virtnetd_answers(&control) {
        assert!(Instant::now() < deadline, "virtnetd does not answer");
        thread::sleep(Duration::from_millis(100));
    }

    let v = Guest::boot_all(
        &lab,
        vec![
            GuestCfg::new(&lab, &pa, "dhcp"),
            GuestCfg::new(&lab, &pb, "dhcp"),
        ],
    );
    let [mut a, mut b]: [Guest; 2] = v.try_into().unwrap_or_else(|_| unreachable!());

    // Addresses from the LAN's dnsmasq.
    let ip_a = dhcp_from(&mut a, LAN_IP);
    let ip_b = dhcp_from(&mut b, LAN_IP);
    assert!(ip_a.starts_with("10.88.0.1"), "{ip_a}");
    assert!(ip_b.starts_with("10.88.0.1"), "{ip_b}");
    assert_ne!(ip_a, ip_b);

    // Both ping the LAN host.
    for g in [&mut a, &mut b] {
        assert!(
            g.reach(LAN_IP, 30),
            "{} cannot reach the LAN host",
            g.cfg.name
        );
        let p = g.ping(LAN_IP, 5, 0.2);
        assert_eq!(p.rx, 5, "{} -> LAN: {p:?}", g.cfg.name);
    }
    // Both are on the LAN as machines of their own: dnsmasq leased to each MAC, and the LAN
    // host's neighbour table has each address at its own MAC.
    let lease_text = fs::read_to_string(&leases).unwrap_or_default();
    let neigh = must(&lan, "ip neigh show dev lan0");
    for (ip, mac) in [(&ip_a, MAC_A), (&ip_b, MAC_B)] {
        assert!(
            lease_text.contains(mac) && lease_text.contains(ip.as_str()),
            "lease file lacks {ip} {mac}: {lease_text}"
        );
        assert!(
            neigh
                .lines()
                .any(|l| l.starts_with(&format!("{ip} ")) && l.contains(mac)),
            "LAN neighbours lack {ip} at {mac}:\n{neigh}"
        );
    }
    // And the LAN host reaches a guest.
    must(&lan, &format!("busybox ping -c 3 -W 2 {ip_b}"));

    // iperf3 guest -> LAN and LAN -> guest (-R).
    w.spawn(
        "iperf3",
        &lan,
        &["iperf3", "-s", "-B", LAN_IP],
        lab.dir().join("iperf3.log"),
    );
    thread::sleep(Duration::from_millis(500));
    let (bytes_up, bps_up) = guest_iperf(&mut a, LAN_IP, 5, "");
    let (bytes_down, bps_down) = guest_iperf(&mut a, LAN_IP, 5, "-R");
    w.stop("iperf3");
    assert!(
        bytes_up > 5_000_000,
        "guest->LAN iperf3 moved only {bytes_up} bytes"
    );
    assert!(
        bytes_down > 5_000_000,
        "LAN->guest iperf3 moved only {bytes_down} bytes"
    );
    let stats = virtnetd_stats(&control);
    assert!(stats.contains("uplink:up0"), "{stats}");
    a.poweroff();
    b.poweroff();

    // The kernel's bridge path in the same run: iperf3 between two namespaces joined by
    // veth -> Linux bridge -> veth.
    let c1 = w.netns("c");
    let br = w.netns("b");
    let c2 = w.netns("s");
    must(&br, "ip link add br0 type bridge && ip link set br0 up");
    must(
        &br,
        &format!(
            "ip link add p1 type veth peer name e1 netns {c1} && ip link set p1 master br0 up"
        ),
    );
    must(
        &br,
        &format!(
            "ip link add p2 type veth peer name e2 netns {c2} && ip link set p2 master br0 up"
        ),
    );
    must(&c1, "ip addr add 10.89.0.2/24 dev e1 && ip link set e1 up");
    must(&c2, "ip addr add 10.89.0.1/24 dev e2 && ip link set e2 up");
    let bps_bridge = ns_iperf(&mut w, &lab, &c1, &c2, "10.89.0.1", 5);
    eprintln!(
        "BENCH bridged: guest->LAN {:.0} Mbit/s, LAN->guest {:.0} Mbit/s (QEMU TCG guest, \
         vhost-user, virtnetd AF_PACKET uplink, veth); kernel veth->bridge->veth {:.0} Mbit/s \
         (netns to netns, no VM)",
        bps_up / 1e6,
        bps_down / 1e6,
        bps_bridge / 1e6
    );
    eprintln!("stats: {stats}");
}
