//! A real DHCP client against the services: busybox udhcpc on a TAP port (virtnet-port-tap)
//! in a network namespace the test creates. The same interface autoconfigures an IPv6 address
//! from the services' router advertisements and pings the services' address (ARP + ICMP).
//! Needs root, /dev/net/tun, `ip` and busybox; otherwise SKIPPED.

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use virtnet_port_sys::is_root;

use virtnet_port_tap::{sys, TapConfig, TapPort};
use virtnet_services::{DhcpConfig, RaConfig, ServicesConfig, ServicesPort};
use virtnet_switch::{MacAddr, Switch, SwitchConfig};

const IFACE: &str = "vt-dhcp0";

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .expect(args[0]);
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        run(&["ip", "netns", "del", &self.0]);
    }
}

#[test]
fn udhcpc_gets_a_lease_over_a_tap() {
    if !is_root() || !Path::new("/dev/net/tun").exists() || !run(&["busybox", "true"]).0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "required in CI: needs root, /dev/net/tun and busybox"
        );
        eprintln!("SKIPPED: needs root, /dev/net/tun and busybox");
        return;
    }
    let ns = Netns(format!("vt-svc-{}", std::process::id()));
    assert!(run(&["ip", "netns", "add", &ns.0]).0, "ip netns add");
    let name = ns.0.clone();
    let dir = tempfile::TempDir::new().unwrap();
    let leases = dir.path().join("t.leases");
    let script = dir.path().join("udhcpc.sh");
    fs::write(
        &script,
        "#!/bin/sh\ncase \"$1\" in\n  bound|renew)\n    ip addr add \"$ip/$mask\" dev \"$interface\"\n    \
         echo \"LEASE ip=$ip mask=$mask lease=$lease server=$serverid mtu=$mtu domain=$domain\" ;;\nesac\n",
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();

    std::thread::spawn(move || {
        sys::enter_netns(&Path::new("/run/netns").join(&name)).expect("setns");
        let sw = Switch::new(SwitchConfig::default());
        let server = Ipv4Addr::new(10, 66, 0, 1);
        let mut dhcp = DhcpConfig::new(
            "10.66.0.0/24".parse().unwrap(),
            server,
            Ipv4Addr::new(10, 66, 0, 100),
            Ipv4Addr::new(10, 66, 0, 110),
        );
        dhcp.lease_file = Some(leases.clone());
        dhcp.domain = Some("virt.test".into());
        dhcp.mtu = Some(1500);
        let mut cfg = ServicesConfig::new("svc", MacAddr([2, 0x76, 0, 0, 0, 1]), server);
        cfg.dhcp = Some(dhcp);
        cfg.ra = Some(RaConfig {
            prefix: "fd00:66::/64".parse().unwrap(),
            router_lifetime: 0,
            interval_secs: 1,
            mtu: None,
        });
        let tap = TapPort::start(
            sw.clone(),
            &TapConfig {
                name: IFACE.into(),
                addr: None,
                mtu: Some(1500),
                vlan: None,
            },
        )
        .expect("TAP");
        let svc = ServicesPort::start(sw.clone(), cfg).expect("services");

        // udhcpc on the host side of the TAP: DISCOVER/OFFER/REQUEST/ACK through the switch.
        let script = script.to_str().unwrap();
        let (ok, out) = run(&[
            "ip", "netns", "exec", &name, "busybox", "udhcpc", "-i", IFACE, "-f", "-q", "-n",
            "-t", "5", "-T", "1", "-s", script,
        ]);
        eprintln!("udhcpc: {out}");
        assert!(ok, "udhcpc failed: {out}");
        assert!(
            out.contains("LEASE ip=10.66.0.100 mask=24 lease=3600 server=10.66.0.1 mtu=1500 domain=virt.test"),
            "{out}"
        );
        let leases_now = svc.leases();
        assert_eq!(leases_now.len(), 1, "{leases_now:?}");
        assert_eq!(leases_now[0].ip, Ipv4Addr::new(10, 66, 0, 100));
        let text = fs::read_to_string(&leases).unwrap();
        assert!(text.contains(" 10.66.0.100 "), "{text}");

        // ARP and ICMP echo for the services' address.
        let (ok, out) = run(&[
            "ip", "netns", "exec", &name, "busybox", "ping", "-c", "2", "-W", "2", "10.66.0.1",
        ]);
        assert!(ok, "ping the services: {out}");
        let s = svc.stats();
        assert!(s.arp_replies >= 1 && s.echo_replies >= 2, "{s:?}");

        // SLAAC from the router advertisements.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (_, out) = run(&["ip", "-n", &name, "-6", "addr", "show", "dev", IFACE]);
            if out.contains("fd00:66::") {
                break;
            }
            assert!(Instant::now() < deadline, "no SLAAC address: {out}");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(svc.stats().router_advertisements >= 1);

        // Again as a daemon: the same address for the known client; SIGUSR2 makes udhcpc
        // release it (unicast RELEASE to the server).
        run(&["ip", "-n", &name, "addr", "flush", "dev", IFACE]);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &name, "busybox", "udhcpc", "-i", IFACE, "-f", "-t", "5"])
            .args(["-T", "1", "-s", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("udhcpc");
        let deadline = Instant::now() + Duration::from_secs(10);
        while svc.stats().dhcp.acks < 2 {
            assert!(Instant::now() < deadline, "no second ACK: {:?}", svc.stats());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(svc.leases()[0].ip, Ipv4Addr::new(10, 66, 0, 100));
        // udhcpc releases only once bound: after its script applied the address.
        loop {
            let (_, out) = run(&["ip", "-n", &name, "-4", "addr", "show", "dev", IFACE]);
            if out.contains("10.66.0.100") {
                break;
            }
            assert!(Instant::now() < deadline, "address not applied: {out}");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        // `ip netns exec` execs busybox: the child's PID is udhcpc's.
        run(&["kill", "-USR2", &child.id().to_string()]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while svc.stats().dhcp.releases == 0 {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no RELEASE: {:?}", svc.stats());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        let l = svc.leases()[0];
        assert!(l.expires <= std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs());
        svc.shutdown();
        tap.shutdown();
    })
    .join()
    .unwrap();
}

/// A "guest" that cycles through MAC addresses behind one switch port (here the TAP: its MAC
/// changes between udhcpc runs) gets `max_leases_per_port` addresses and then nothing, while
/// the pool still has room.
#[test]
fn per_port_cap_with_a_real_client() {
    if !is_root() || !Path::new("/dev/net/tun").exists() || !run(&["busybox", "true"]).0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "required in CI: needs root, /dev/net/tun and busybox"
        );
        eprintln!("SKIPPED: needs root, /dev/net/tun and busybox");
        return;
    }
    let ns = Netns(format!("vt-cap-{}", std::process::id()));
    assert!(run(&["ip", "netns", "add", &ns.0]).0, "ip netns add");
    let name = ns.0.clone();
    std::thread::spawn(move || {
        sys::enter_netns(&Path::new("/run/netns").join(&name)).expect("setns");
        let sw = Switch::new(SwitchConfig::default());
        let server = Ipv4Addr::new(10, 67, 0, 1);
        let mut dhcp = DhcpConfig::new(
            "10.67.0.0/24".parse().unwrap(),
            server,
            Ipv4Addr::new(10, 67, 0, 100),
            Ipv4Addr::new(10, 67, 0, 199),
        );
        dhcp.max_leases_per_port = 2;
        let mut cfg = ServicesConfig::new("svc", MacAddr([2, 0x76, 0, 0, 0, 2]), server);
        cfg.dhcp = Some(dhcp);
        let iface = "vt-cap0";
        let tap = TapPort::start(
            sw.clone(),
            &TapConfig {
                name: iface.into(),
                addr: None,
                mtu: None,
                vlan: None,
            },
        )
        .expect("TAP");
        let svc = ServicesPort::start(sw.clone(), cfg).expect("services");
        let mut got = Vec::new();
        for n in 1..=3u8 {
            let mac = format!("52:54:00:00:67:{n:02x}");
            run(&["ip", "-n", &name, "link", "set", iface, "address", &mac]);
            let (ok, out) = run(&[
                "ip",
                "netns",
                "exec",
                &name,
                "busybox",
                "udhcpc",
                "-i",
                iface,
                "-f",
                "-q",
                "-n",
                "-t",
                "3",
                "-T",
                "1",
                "-s",
                "/bin/true",
            ]);
            got.push((ok, out));
        }
        assert!(got[0].0 && got[1].0, "{got:?}");
        assert!(
            !got[2].0,
            "the third MAC behind one port got a lease: {got:?}"
        );
        let s = svc.stats();
        assert_eq!(svc.leases().len(), 2, "{s:?}");
        assert!(s.dhcp.port_cap >= 1, "{s:?}");
        assert_eq!(s.dhcp.spoofed, 0, "{s:?}");
        svc.shutdown();
        tap.shutdown();
    })
    .join()
    .unwrap();
}
