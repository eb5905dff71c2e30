//! Real Linux guests (QEMU, TCG) on a `host-only` network of `virtnetd`.
//!
//! virtnetd runs inside a network namespace this test creates (`ip netns exec`), so the TAP
//! it creates (`vt-ho0`, 192.168.56.1/24) and the iperf3 server on it are private to the test.
//! The guests' vhost-user sockets are files and do not care about namespaces. The guests get
//! their addresses from the built-in DHCP server with busybox udhcpc (`vt_dhcp` in
//! tests/qemu/init.sh). Needs root (namespaces, TAP) and QEMU; otherwise SKIPPED.

mod qemu;

use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};
use virtnet_port_sys::is_root;

use qemu::{markers, Guest, GuestCfg, Lab, PortCfg};

const VIRTNETD: &str = env!("CARGO_BIN_EXE_virtnetd");
const MAC_A: &str = "52:54:00:00:56:0a";
const MAC_B: &str = "52:54:00:00:56:0b";
const HOST_IP: &str = "192.168.56.1";
const IFACE: &str = "vt-ho0";

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A network namespace of our own, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Option<Netns> {
        let name = format!("vt-{tag}-{}", std::process::id());
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Some(Netns(name))
    }

    fn exec(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, prog]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.0]);
    }
}

/// virtnetd with a host-only network, inside `ns`.
struct HostDaemon {
    child: Option<Child>,
    config: PathBuf,
    control: PathBuf,
    log: PathBuf,
    ns: String,
}

impl HostDaemon {
    /// The host-only network "ho" on 192.168.56.0/24 with `ports`.
    fn start(lab: &Lab, ns: &Netns, ports: &[PortCfg]) -> HostDaemon {
        let leases = lab.dir().join("ho.leases");
        let net = format!(
            "name = \"ho\"\nmode = \"host-only\"\nsubnet = \"192.168.56.0/24\"\n\
             host_interface = \"{IFACE}\"\n\
             dhcp = {{ range = \"192.168.56.100-192.168.56.109\", lease_secs = 600, \
             lease_file = \"{}\" }}",
            leases.display()
        );
        Self::start_with(lab, ns, &net, ports)
    }

    /// One network (the keys of its `[[network]]` table) with `ports`.
    fn start_with(lab: &Lab, ns: &Netns, net: &str, ports: &[PortCfg]) -> HostDaemon {
        let control = lab.dir().join("control.sock");
        let mut toml = String::new();
        let _ = writeln!(toml, "control_socket = \"{}\"", control.display());
        let _ = writeln!(toml, "\n[[network]]\n{net}");
        for p in ports {
            let _ = writeln!(
                toml,
                "\n[[network.port]]\nname = \"{}\"\nsocket = \"{}\"\nmac = \"{}\"",
                p.name,
                lab.socket(&p.name).display(),
                p.mac
            );
        }
        let config = lab.dir().join("virtnetd.toml");
        fs::write(&config, toml).expect("write config");
        let mut d = HostDaemon {
            child: None,
            config,
            control,
            log: lab.dir().join("virtnetd.log"),
            ns: ns.0.clone(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        // `ip netns exec` execs the program: the child's PID is virtnetd's.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, VIRTNETD, "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,virtnet_services=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn virtnetd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.answers() {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.dump();
                panic!("virtnetd exited at start: {st}");
            }
            assert!(Instant::now() < deadline, "virtnetd does not answer");
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn answers(&self) -> bool {
        self.control.exists()
            && Command::new(VIRTNETD)
                .args(["ping", "--control"])
                .arg(&self.control)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
    }

    fn stats(&self) -> String {
        let out = Command::new(VIRTNETD)
            .args(["stats", "--control"])
            .arg(&self.control)
            .output()
            .expect("stats");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        // The TAP went with the process.
        let deadline = Instant::now() + Duration::from_secs(5);
        while ip(&["-n", &self.ns, "link", "show", IFACE]) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        self.spawn();
    }

    fn dump(&self) {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("----- virtnetd log (last 40 lines) -----");
        for l in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("  {l}");
        }
    }
}

impl Drop for HostDaemon {
    fn drop(&mut self) {
        if thread::panicking() {
            self.dump();
            eprintln!("stats: {}", self.stats());
        }
        self.kill();
    }
}

/// Runs `vt_dhcp` (retrying while the link comes back) and returns the bound address.
fn dhcp(g: &mut Guest) -> String {
    dhcp_from(g, "192.168.56.254")
}

fn dhcp_from(g: &mut Guest, server: &str) -> String {
    for attempt in 0..4 {
        let (rc, out) = g.run("vt_dhcp", Duration::from_secs(60));
        if let Some(m) = markers(&out, "dhcp")
            .into_iter()
            .find(|m| m.get("event").map(String::as_str) == Some("bound"))
        {
            eprintln!("{}: DHCP lease {m:?}", g.cfg.name);
            assert_eq!(m.get("mask").map(String::as_str), Some("24"));
            assert_eq!(m.get("server").map(String::as_str), Some(server));
            return m.get("ip").cloned().unwrap_or_default();
        }
        eprintln!("{}: vt_dhcp attempt {attempt}: rc={rc} {out}", g.cfg.name);
    }
    panic!("{}: no DHCP lease", g.cfg.name);
}

#[test]
fn host_only_dhcp_ping_iperf_and_restart() {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "required in CI: host-only test needs root (network namespace, TAP)"
        );
        eprintln!("SKIPPED: host-only test needs root (network namespace, TAP)");
        return;
    }
    let Some(lab) = Lab::new("host_only_dhcp_ping_iperf_and_restart", 2) else {
        return;
    };
    let ns = Netns::new("ho").expect("ip netns add");
    let (pa, pb) = (PortCfg::new("a", MAC_A), PortCfg::new("b", MAC_B));
    let mut d = HostDaemon::start(&lab, &ns, &[pa.clone(), pb.clone()]);
    assert!(
        ip(&["-n", &ns.0, "addr", "show", "dev", IFACE]),
        "virtnetd did not create {IFACE}"
    );
    let v = Guest::boot_all(
        &lab,
        vec![
            GuestCfg::new(&lab, &pa, "dhcp"),
            GuestCfg::new(&lab, &pb, "dhcp"),
        ],
    );
    let [mut a, mut b]: [Guest; 2] = v.try_into().unwrap_or_else(|_| unreachable!());

    // Both guests get distinct addresses from the pool.
    let ip_a = dhcp(&mut a);
    let ip_b = dhcp(&mut b);
    assert!(ip_a.starts_with("192.168.56.10"), "{ip_a}");
    assert!(ip_b.starts_with("192.168.56.10"), "{ip_b}");
    assert_ne!(ip_a, ip_b);

    // The guest reaches the host's TAP address, and the second guest.
    assert!(a.reach(HOST_IP, 30), "A cannot reach the host");
    let p = a.ping(HOST_IP, 5, 0.2);
    assert_eq!(p.rx, 5, "A->host: {p:?}");
    let p = a.ping(&ip_b, 5, 0.2);
    assert_eq!(p.rx, 5, "A->B: {p:?}");
    // The host reaches the guest.
    let host_ping = ns
        .exec("busybox")
        .args(["ping", "-c", "3", "-W", "2", &ip_b])
        .output()
        .expect("busybox ping");
    assert!(
        host_ping.status.success(),
        "host->B: {}",
        String::from_utf8_lossy(&host_ping.stdout)
    );

    // iperf3: server on the host side of the TAP, client in guest A.
    let mut server = ns
        .exec("iperf3")
        .args(["-s", "-1", "-B", HOST_IP])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    thread::sleep(Duration::from_millis(500));
    let r = a.iperf(HOST_IP, 5);
    let _ = server.kill();
    let _ = server.wait();
    eprintln!(
        "iperf3 A->host: {:.0} Mbit/s, {} bytes, {} retransmits",
        r.bps / 1e6,
        r.bytes,
        r.retrans
    );
    assert!(r.bytes > 5_000_000, "iperf3 moved only {} bytes", r.bytes);

    // The other way (-R: the host sends): the kernel hands the TAP reader 64 KiB TSO frames,
    // which the guest takes whole (GUEST_TSO4) or the switch segments for it.
    let mut server = ns
        .exec("iperf3")
        .args(["-s", "-1", "-B", HOST_IP])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    thread::sleep(Duration::from_millis(500));
    let (_, out) = a.run(&format!("vt_iperf {HOST_IP} 5 -R"), Duration::from_secs(90));
    let _ = server.kill();
    let _ = server.wait();
    let m = markers(&out, "iperf3");
    let bytes: u64 = m
        .last()
        .and_then(|m| m.get("bytes"))
        .and_then(|b| b.parse().ok())
        .unwrap_or(0);
    let bps: f64 = m
        .last()
        .and_then(|m| m.get("bps"))
        .and_then(|b| b.parse().ok())
        .unwrap_or(0.0);
    eprintln!("iperf3 host->A: {:.0} Mbit/s, {bytes} bytes", bps / 1e6);
    assert!(
        bytes > 5_000_000,
        "iperf3 -R moved only {bytes} bytes: {out}"
    );

    // A daemon restart (SIGKILL: no goodbye) keeps the leases: the lease file tells the new
    // daemon who had which address. B asks first: a server that had forgotten would give it
    // the pool's first address, A's.
    d.restart();
    assert!(ip(&["-n", &ns.0, "link", "show", IFACE]), "{IFACE} is back");
    let again_b = dhcp(&mut b);
    assert_eq!(again_b, ip_b, "B's lease after the restart");
    let again_a = dhcp(&mut a);
    assert_eq!(again_a, ip_a, "A's lease after the restart");
    let p = b.ping(HOST_IP, 3, 0.2);
    assert_eq!(p.rx, 3, "B->host after restart: {p:?}");
    let st = d.stats();
    eprintln!("stats after restart: {st}");
    for (mac, ip) in [(MAC_A, &ip_a), (MAC_B, &ip_b)] {
        let lease = format!("\"mac\":\"{mac}\",\"ip\":\"{ip}\",\"state\":\"bound\"");
        assert!(st.contains(&lease), "no {lease} in {st}");
    }
    a.poweroff();
    b.poweroff();
}

/// An `internal` network with the optional DHCP service: a guest gets its address and pings
/// the services' address (the subnet's first), which answers ARP and ICMP echo. No TAP.
#[test]
fn internal_network_with_dhcp() {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "required in CI: needs root (network namespace)"
        );
        eprintln!("SKIPPED: needs root (network namespace)");
        return;
    }
    let Some(lab) = Lab::new("internal_network_with_dhcp", 1) else {
        return;
    };
    let ns = Netns::new("in").expect("ip netns add");
    let pa = PortCfg::new("a", MAC_A);
    let net = format!(
        "name = \"lan\"\nmode = \"internal\"\nsubnet = \"10.0.5.0/24\"\n\
         dhcp = {{ range = \"10.0.5.50-10.0.5.59\", lease_file = \"{}\" }}",
        lab.dir().join("lan.leases").display()
    );
    let d = HostDaemon::start_with(&lab, &ns, &net, std::slice::from_ref(&pa));
    let mut a = Guest::boot(&lab, GuestCfg::new(&lab, &pa, "dhcp"));
    let ip_a = dhcp_from(&mut a, "10.0.5.1");
    assert_eq!(ip_a, "10.0.5.50");
    let p = a.ping("10.0.5.1", 3, 0.2);
    assert_eq!(p.rx, 3, "A->services: {p:?}");
    let stats = d.stats();
    assert!(stats.contains("\"lan-services\""), "{stats}");
    a.poweroff();
}
