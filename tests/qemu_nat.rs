//! Real Linux guests (QEMU, TCG) on `nat` networks of `virtnetd`.
//!
//! The "outside" is servers this test runs on the host's loopback: an HTTP server, a tiny DNS
//! responder on 127.0.0.1:53 (plain UDP through the flow table), dnsmasq on a free port (the
//! resolver the gateway's DNS forwarder relays to). Guest A's network maps the host loopback
//! at 10.0.2.4 (`host_loopback = true`); guest B's network does not, and must not reach it.
//! The guests configure themselves with DHCP from the built-in services. Needs QEMU
//! (otherwise SKIPPED); ping out needs ping sockets or CAP_NET_RAW (root).
//!
//! IPv6 in the same guests (default prefix fd00:10:0:2::/64): SLAAC from the gateway's router
//! advertisements, ping to the gateway's address, DNS through the forwarder at it, HTTP from
//! a server on the host's [::1] through `host_loopback_ip6` (fd00:10:0:2::4), UDP to a
//! responder on [::1]:53, ping out, a port forward from [::1] to the guest's SLAAC address;
//! guest B cannot reach [::1].

mod qemu;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use qemu::{markers, Daemon, Guest, GuestCfg, Lab, PortCfg};

const MAC_A: &str = "52:54:00:00:02:0f";
const MAC_B: &str = "52:54:00:00:03:0f";
/// Guest A's SLAAC address: the default prefix and the modified EUI-64 of `MAC_A`.
const A6: &str = "fd00:10:0:2:5054:ff:fe00:20f";
/// The NAT gateway's IPv6 address (default: ::2 of the prefix).
const GW6: &str = "fd00:10:0:2::2";
/// Where guest A's network maps the host's ::1.
const LO6: &str = "fd00:10:0:2::4";
const BODY_LEN: usize = 3 * 1024 * 1024;

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal HTTP/1.0 server on 127.0.0.1 answering every request with `BODY_LEN` bytes.
fn http_server() -> u16 {
    http_server_on("127.0.0.1:0")
}

/// The same on `addr` (e.g. `[::1]:0`).
fn http_server_on(addr: &str) -> u16 {
    let l = TcpListener::bind(addr).unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        let body: Vec<u8> = (0..BODY_LEN).map(|i| (i % 251) as u8).collect();
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            let body = body.clone();
            thread::spawn(move || {
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req);
                let _ = write!(
                    s,
                    "HTTP/1.0 200 OK\r\nContent-Length: {BODY_LEN}\r\nContent-Type: application/octet-stream\r\n\r\n"
                );
                let _ = s.write_all(&body);
            });
        }
    });
    port
}

/// Answers every DNS query on 127.0.0.1:53 with one A record 10.7.7.7. `None` if the port
/// is taken.
fn dns_responder() -> Option<()> {
    dns_responder_on("127.0.0.1:53")
}

/// The same on `addr` (e.g. `[::1]:53`).
fn dns_responder_on(addr: &str) -> Option<()> {
    let s = UdpSocket::bind(addr).ok()?;
    thread::spawn(move || {
        let mut b = [0u8; 512];
        while let Ok((n, from)) = s.recv_from(&mut b) {
            if n < 12 {
                continue;
            }
            let mut r = b[..n].to_vec();
            r[2] |= 0x80; // QR
            r[3] = 0x80; // RA, NOERROR
            r[6..8].copy_from_slice(&1u16.to_be_bytes()); // ANCOUNT
            r[8..12].fill(0);
            // Only the question: cut anything after it (EDNS).
            let mut q = 12;
            while q < n && r[q] != 0 {
                q += usize::from(r[q]) + 1;
            }
            r.truncate((q + 5).min(n));
            r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 7, 7, 7]);
            let _ = s.send_to(&r, from);
        }
    });
    Some(())
}

/// dnsmasq on 127.0.0.1:`port` knowing one name.
struct Dnsmasq(Child);

impl Dnsmasq {
    fn start(port: u16) -> Option<Dnsmasq> {
        let c = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--pid-file",
                "--user=root",
                "--address=/www.vt.test/10.9.8.7",
            ])
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        thread::sleep(Duration::from_millis(300));
        Some(Dnsmasq(c))
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `vt_dhcp` (retried) and the lease's fields.
fn dhcp(g: &mut Guest) -> std::collections::BTreeMap<String, String> {
    for attempt in 0..4 {
        let (rc, out) = g.run("vt_dhcp", Duration::from_secs(60));
        if let Some(m) = markers(&out, "dhcp")
            .into_iter()
            .find(|m| m.get("event").map(String::as_str) == Some("bound"))
        {
            eprintln!("{}: DHCP lease {m:?}", g.cfg.name);
            return m;
        }
        eprintln!("{}: vt_dhcp attempt {attempt}: rc={rc} {out}", g.cfg.name);
    }
    panic!("{}: no DHCP lease", g.cfg.name);
}

fn network(name: &str, third: u8, mac: &str, socket: &str, nat: &str, lab: &Lab) -> String {
    format!(
        "\n[[network]]\nname = \"{name}\"\nmode = \"nat\"\nsubnet = \"10.0.{third}.0/24\"\n\
         dhcp = {{ lease_file = \"{}\", reservations = [{{ mac = \"{mac}\", ip = \"10.0.{third}.15\" }}] }}\n\
         [network.nat]\n{nat}\n\
         [[network.port]]\nname = \"{name}\"\nsocket = \"{socket}\"\nmac = \"{mac}\"\n",
        lab.dir().join(format!("{name}.leases")).display()
    )
}

#[test]
fn nat_dhcp_dns_http_udp_ping_forward_and_policy() {
    let Some(lab) = Lab::new("nat_dhcp_dns_http_udp_ping_forward_and_policy", 2) else {
        return;
    };
    let http = http_server();
    let http6 = http_server_on("[::1]:0");
    let dns_port = free_udp_port();
    let dnsmasq = Dnsmasq::start(dns_port);
    let fwd = free_tcp_port();
    let fwd6 = TcpListener::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (pa, pb) = (PortCfg::new("na", MAC_A), PortCfg::new("nb", MAC_B));
    let toml = network(
        "na",
        2,
        MAC_A,
        &lab.socket("na").display().to_string(),
        &format!(
            "host_loopback = true\nhost_loopback_ip = \"10.0.2.4\"\nhost_loopback_ip6 = \"{LO6}\"\n\
             dns = [\"127.0.0.1:{dns_port}\"]\nforward = [\"tcp:127.0.0.1:{fwd} -> 8022\", \
             \"tcp:[::1]:{fwd6} -> [{A6}]:8023\"]"
        ),
        &lab,
    ) + &network(
        "nb",
        3,
        MAC_B,
        &lab.socket("nb").display().to_string(),
        &format!("dns = [\"127.0.0.1:{dns_port}\"]"),
        &lab,
    );
    let d = Daemon::start_toml(&lab, &toml);
    let v6 = |mut c: GuestCfg| {
        c.kernel_args.push("vt.ipv6=1".into());
        c
    };
    let v = Guest::boot_all(
        &lab,
        vec![
            v6(GuestCfg::new(&lab, &pa, "dhcp")),
            v6(GuestCfg::new(&lab, &pb, "dhcp")),
        ],
    );
    let [mut a, mut b]: [Guest; 2] = v.try_into().unwrap_or_else(|_| unreachable!());

    // DHCP: the reserved address, the gateway as router and DNS server.
    let m = dhcp(&mut a);
    assert_eq!(m.get("ip").map(String::as_str), Some("10.0.2.15"));
    assert_eq!(m.get("router").map(String::as_str), Some("10.0.2.2"));
    assert_eq!(m.get("dns").map(String::as_str), Some("10.0.2.2"));
    let (rc, _) = a.run("ip route add default via 10.0.2.2", Duration::from_secs(10));
    assert_eq!(rc, 0);

    // DNS through the gateway's forwarder to dnsmasq on the host's loopback.
    if dnsmasq.is_some() {
        let (rc, out) = a.run(
            "nslookup -type=a www.vt.test 10.0.2.2",
            Duration::from_secs(30),
        );
        assert!(
            rc == 0 && out.contains("10.9.8.7"),
            "nslookup: rc={rc} {out}"
        );
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "dnsmasq did not start (apt-get install dnsmasq-base): the DNS forwarder check cannot run in CI"
        );
        eprintln!("SKIPPED: dnsmasq did not start: DNS forwarder check skipped");
    }

    // HTTP download from a server on the host's loopback (host_loopback at 10.0.2.4).
    let (rc, out) = a.run(
        &format!("wget -q -O /tmp/f http://10.0.2.4:{http}/f && wc -c </tmp/f"),
        Duration::from_secs(120),
    );
    assert_eq!(rc, 0, "wget: {out}");
    assert!(out.contains(&BODY_LEN.to_string()), "wget: {out}");

    // UDP out and the reply back: a DNS query straight to a UDP server on 127.0.0.1:53.
    if dns_responder().is_some() {
        let (rc, out) = a.run("nslookup -type=a x.y 10.0.2.4", Duration::from_secs(30));
        assert!(rc == 0 && out.contains("10.7.7.7"), "UDP: rc={rc} {out}");
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "required in CI: 127.0.0.1:53 is taken: plain UDP check skipped"
        );
        eprintln!("127.0.0.1:53 is taken: plain UDP check skipped");
    }

    // ICMP echo out through the host (ping socket or raw socket).
    let p = a.ping("10.0.2.4", 3, 0.2);
    assert_eq!(p.rx, 3, "ping out: {p:?}");

    // A host client reaches a guest service through the port forward.
    a.run(
        "(echo hello-from-guest | nc -l -p 8022 >/tmp/got) &",
        Duration::from_secs(10),
    );
    thread::sleep(Duration::from_millis(500));
    let mut c = TcpStream::connect(("127.0.0.1", fwd)).expect("forward connect");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(b"hello-from-host\n").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = String::new();
    let _ = c.read_to_string(&mut got);
    assert_eq!(got, "hello-from-guest\n");
    let (_, out) = a.run("cat /tmp/got", Duration::from_secs(10));
    assert!(out.contains("hello-from-host"), "{out}");

    // IPv6: SLAAC in the default prefix, the gateway's link-local address as the router.
    let (rc, out) = a.run("vt_slaac 60", Duration::from_secs(90));
    let m = markers(&out, "slaac").pop().unwrap_or_default();
    assert!(rc == 0, "A: no SLAAC address: {out}");
    assert_eq!(m.get("ip").map(String::as_str), Some(A6), "{out}");
    assert!(
        m.get("router").is_some_and(|r| r.starts_with("fe80::")),
        "{out}"
    );
    let p = a.ping(GW6, 3, 0.2);
    assert_eq!(p.rx, 3, "ping the gateway's IPv6 address: {p:?}");
    if dnsmasq.is_some() {
        let (rc, out) = a.run(
            &format!("nslookup -type=a www.vt.test {GW6}"),
            Duration::from_secs(30),
        );
        assert!(
            rc == 0 && out.contains("10.9.8.7"),
            "nslookup over IPv6: rc={rc} {out}"
        );
    }
    let (rc, out) = a.run(
        &format!("wget -q -O /tmp/f6 http://[{LO6}]:{http6}/f && wc -c </tmp/f6"),
        Duration::from_secs(120),
    );
    assert_eq!(rc, 0, "wget over IPv6: {out}");
    assert!(out.contains(&BODY_LEN.to_string()), "wget over IPv6: {out}");
    if dns_responder_on("[::1]:53").is_some() {
        let (rc, out) = a.run(
            &format!("nslookup -type=a x.y {LO6}"),
            Duration::from_secs(30),
        );
        assert!(
            rc == 0 && out.contains("10.7.7.7"),
            "UDP over IPv6: rc={rc} {out}"
        );
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "required in CI: [::1]:53 is taken: UDP over IPv6 check skipped"
        );
        eprintln!("[::1]:53 is taken: UDP over IPv6 check skipped");
    }
    let p = a.ping(LO6, 3, 0.2);
    assert_eq!(p.rx, 3, "ping out over IPv6 (the host's ::1): {p:?}");
    a.run(
        "(echo hello6-from-guest | nc -l -p 8023 >/tmp/got6) &",
        Duration::from_secs(10),
    );
    thread::sleep(Duration::from_millis(500));
    let mut c = TcpStream::connect(("::1", fwd6)).expect("IPv6 forward connect");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(b"hello6-from-host\n").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = String::new();
    let _ = c.read_to_string(&mut got);
    assert_eq!(got, "hello6-from-guest\n");
    let (_, out) = a.run("cat /tmp/got6", Duration::from_secs(10));
    assert!(out.contains("hello6-from-host"), "{out}");

    // Guest B's network has no host_loopback: the host's loopback services are out of reach.
    let m = dhcp(&mut b);
    assert_eq!(m.get("ip").map(String::as_str), Some("10.0.3.15"));
    b.run("ip route add default via 10.0.3.2", Duration::from_secs(10));
    for dst in ["10.0.3.2", "10.0.3.4", "127.0.0.1"] {
        let (rc, out) = b.run(
            &format!("wget -q -T 5 -O /tmp/f http://{dst}:{http}/f"),
            Duration::from_secs(60),
        );
        assert_ne!(rc, 0, "B reached the host's loopback at {dst}: {out}");
    }
    // Nor over IPv6: no [::1] at the gateway's address or at ::4.
    let (rc, out) = b.run("vt_slaac 60", Duration::from_secs(90));
    assert_eq!(rc, 0, "B: no SLAAC address: {out}");
    for dst in [GW6, LO6] {
        let (rc, out) = b.run(
            &format!("wget -q -T 5 -O /tmp/f http://[{dst}]:{http6}/f"),
            Duration::from_secs(60),
        );
        assert_ne!(rc, 0, "B reached the host's ::1 at {dst}: {out}");
    }
    let s = d.stats();
    eprintln!("stats: {s:?}");
    a.poweroff();
    b.poweroff();
}

/// How a throughput guest is networked.
enum Net<'a> {
    /// virtnet NAT through a vhost-user socket; the host's loopback is at 10.0.2.4.
    Virtnet(&'a std::path::Path),
    /// QEMU's user networking (slirp); the host's loopback is at 10.0.2.2.
    Slirp,
    /// passt over `-netdev stream`; the host's loopback is at the gateway 10.0.2.2.
    Passt(&'a std::path::Path),
}

/// Boots a guest in the `iperfc` role of tests/qemu/init.sh (ping, then iperf3 to `peer`
/// for 5 s), waits for it to power off and returns the bits per second it reported.
fn iperf_guest(lab: &Lab, tag: &str, net: Net<'_>, peer: &str) -> Option<f64> {
    let console = lab.dir().join(format!("{tag}.console.log"));
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
    ]);
    cmd.args(["-m", "256", "-smp", "1"]);
    cmd.args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"]);
    cmd.args(["-machine", "pc,memory-backend=mem"]);
    cmd.arg("-kernel").arg(&lab.image.vmlinux);
    cmd.arg("-initrd").arg(&lab.image.initrd);
    cmd.arg("-append").arg(format!(
        "console=ttyS0 quiet panic=-1 vt.name={tag} vt.ip=10.0.2.15/24 vt.role=iperfc \
         vt.peer={peer} vt.count=2 vt.time=5"
    ));
    match net {
        Net::Virtnet(sock) => {
            cmd.arg("-chardev").arg(format!(
                "socket,id=vnet0,path={},reconnect=1",
                sock.display()
            ));
            cmd.args(["-netdev", "vhost-user,id=net0,chardev=vnet0"]);
        }
        Net::Slirp => {
            cmd.args(["-netdev", "user,id=net0,net=10.0.2.0/24"]);
        }
        Net::Passt(sock) => {
            cmd.arg("-netdev").arg(format!(
                "stream,id=net0,server=off,addr.type=unix,addr.path={}",
                sock.display()
            ));
        }
    }
    cmd.args([
        "-device",
        "virtio-net-pci,netdev=net0,mac=52:54:00:00:02:0f,vectors=0",
    ]);
    cmd.arg("-serial")
        .arg(format!("file:{}", console.display()));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().ok()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let bps = markers(&text, "iperf3")
        .into_iter()
        .find_map(|m| m.get("bps")?.parse::<f64>().ok());
    if bps.is_none() {
        eprintln!("{tag}: no iperf3 result; console:\n{text}");
    }
    bps
}

/// guest → host iperf3 (TCP) through virtnet NAT, QEMU's slirp and passt, in the same run.
/// Prints the figures; asserts only that virtnet moved data.
#[test]
fn nat_throughput_beside_slirp_and_passt() {
    // All guest slots: a throughput comparison must not share the two CPUs with other guests.
    let Some(lab) = Lab::new("nat_throughput_beside_slirp_and_passt", qemu::MAX_GUESTS) else {
        return;
    };
    if TcpListener::bind("127.0.0.1:5201").is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "required in CI: 127.0.0.1:5201 is taken (the guest's iperf3 uses the default port)"
        );
        eprintln!("SKIPPED: 127.0.0.1:5201 is taken (the guest's iperf3 uses the default port)");
        return;
    }
    let mut server = Command::new("iperf3")
        .args(["-s", "-B", "127.0.0.1", "-p", "5201"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 -s");
    thread::sleep(Duration::from_millis(500));

    let sock = lab.socket("tp");
    let toml = format!(
        "\n[[network]]\nname = \"tp\"\nmode = \"nat\"\n\
         dhcp = {{ lease_file = \"{}\" }}\n\
         [network.nat]\nhost_loopback = true\nhost_loopback_ip = \"10.0.2.4\"\ndns = []\n\
         [[network.port]]\nname = \"tp\"\nsocket = \"{}\"\nmac = \"52:54:00:00:02:0f\"\n",
        lab.dir().join("tp.leases").display(),
        sock.display()
    );
    // Rounds of virtnet, slirp, passt in turn (VIRTNET_NAT_ROUNDS, default 1): the figures are
    // medians, and ratios within one run are what to compare.
    let rounds: usize = std::env::var("VIRTNET_NAT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let (mut virtnet, mut slirp, mut passt) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let d = Daemon::start_toml(&lab, &toml);
        virtnet.extend(iperf_guest(
            &lab,
            "virtnet",
            Net::Virtnet(&sock),
            "10.0.2.4",
        ));
        drop(d);
        slirp.extend(iperf_guest(&lab, "slirp", Net::Slirp, "10.0.2.2"));
        passt.extend(passt_run(&lab));
        eprintln!(
            "round {}/{rounds}: virtnet {:?} slirp {:?} passt {:?} (Mbit/s)",
            round + 1,
            virtnet.last().map(|b| (b / 1e6).round()),
            slirp.last().map(|b| (b / 1e6).round()),
            passt.last().map(|b| (b / 1e6).round())
        );
    }
    let _ = server.kill();
    let _ = server.wait();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let (virtnet, slirp, passt_bps) =
        (median(&mut virtnet), median(&mut slirp), median(&mut passt));
    let show = |b: Option<f64>| b.map_or("n/a".to_string(), |b| format!("{:.0} Mbit/s", b / 1e6));
    let ratio = |b: Option<f64>| match (virtnet, b) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
        _ => "n/a".into(),
    };
    eprintln!(
        "guest -> host iperf3 (TCG guest, 5 s, median of {rounds}): virtnet NAT {}, QEMU slirp {}, \
         passt {}; virtnet/slirp {}, virtnet/passt {}",
        show(virtnet),
        show(slirp),
        show(passt_bps),
        ratio(slirp),
        ratio(passt_bps)
    );
    assert!(
        virtnet.is_some_and(|b| b > 0.0),
        "virtnet NAT moved no data"
    );
}

/// passt in a network namespace of our own (ping sockets allowed there, a veth pair as the
/// template interface, iperf3 server on the namespace's loopback), and a guest iperf3 through it.
fn passt_run(lab: &Lab) -> Option<f64> {
    let ok = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok(&["passt", "--version"]) {
        eprintln!("passt not installed");
        return None;
    }
    let ns = format!("vt-passt-{}", std::process::id());
    if !ok(&["ip", "netns", "add", &ns]) {
        eprintln!("passt: cannot create a network namespace");
        return None;
    }
    let x = |cmd: &str| ok(&["ip", "netns", "exec", &ns, "sh", "-c", cmd]);
    x(
        "ip link set lo up && ip link add v0 type veth peer name v1 && \
       ip link set v0 up && ip link set v1 up && ip addr add 192.0.2.2/24 dev v0 && ip route add default via 192.0.2.1 && \
       ip addr add 10.0.2.2/32 dev lo && \
         sysctl -q -w net.ipv4.ping_group_range='0 2147483647'",
    );
    let sock = std::path::PathBuf::from(format!("/tmp/{ns}.sock"));
    let spawn = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
    };
    // Whether passt maps the gateway to loopback or not, the namespace answers at both.
    let server = spawn(&["iperf3", "-s", "-p", "5201"]);
    let sp = sock.display().to_string();
    let passt = spawn(&[
        "passt",
        "-f",
        "-q",
        "-a",
        "10.0.2.15",
        "-n",
        "24",
        "-g",
        "10.0.2.2",
        "-s",
        &sp,
    ]);
    thread::sleep(Duration::from_millis(800));
    let r = iperf_guest(lab, "passt", Net::Passt(&sock), "10.0.2.2");
    for mut c in [passt, server].into_iter().flatten() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_file(&sock);
    ok(&["ip", "netns", "del", &ns]);
    r
}
