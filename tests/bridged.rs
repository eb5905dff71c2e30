//! Bridged networks end to end, without VMs: `virtnetd` runs inside a network namespace the
//! test creates ("the host"), its uplink is one end of a veth pair whose other end sits in a
//! second namespace ("the LAN", a real Linux stack at 10.77.7.1/24). Guests are the user-space
//! virtio-net driver (`virtnet-guest`) on the daemon's vhost-user sockets.
//!
//! ```text
//!  test process (root ns)            netns vtb<N>h                 netns vtb<N>l
//!  Guest g1 ──vhost-user──► virtnetd ── AF_PACKET on up0 ══veth══ lan0 10.77.7.1 (kernel)
//!  Guest g2 ──vhost-user──►    (bridged network "lan")
//! ```
//!
//! Needs root (namespaces, CAP_NET_RAW) and `ip`; `tcpdump`/`python3` for the VLAN test.
//! Without root the tests print SKIPPED and pass.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use virtnet_port_sys::is_root;

use common::*;
use etherparse::PacketBuilder;
use virtnet::guest::{Guest, GuestConfig};
use virtnet::switch::NetHdr;

const VIRTNETD: &str = env!("CARGO_BIN_EXE_virtnetd");

/// Run `cmd` with `sh -c` inside namespace `ns`; returns (success, stdout + stderr).
fn sh(ns: &str, cmd: &str) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .stdin(Stdio::null())
        .output()
        .expect("run ip netns exec");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn must(ns: &str, cmd: &str) -> String {
    let (ok, out) = sh(ns, cmd);
    assert!(ok, "[{ns}] {cmd}: {out}");
    out
}

/// Two namespaces joined by a veth pair, and virtnetd in the host one. Everything is killed
/// (by PID) and deleted on drop.
struct Lan {
    host: String,
    lan: String,
    dir: tempfile::TempDir,
    daemon: Option<Child>,
    log: PathBuf,
}

impl Lan {
    /// `None` (SKIPPED) without root.
    fn new() -> Option<Lan> {
        if !is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "required in CI: bridged tests need root (network namespaces, CAP_NET_RAW)"
            );
            eprintln!("SKIPPED: bridged tests need root (network namespaces, CAP_NET_RAW)");
            return None;
        }
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = std::process::id() % 100_000 * 10 + SEQ.fetch_add(1, Ordering::Relaxed);
        let host = format!("vtb{n}h");
        let lan = format!("vtb{n}l");
        let dir = tempfile::TempDir::new().unwrap();
        let log = dir.path().join("virtnetd.log");
        let me = Lan {
            host,
            lan,
            dir,
            daemon: None,
            log,
        };
        for ns in [&me.host, &me.lan] {
            let st = Command::new("ip")
                .args(["netns", "add", ns])
                .status()
                .unwrap();
            assert!(st.success(), "ip netns add {ns}");
        }
        must(
            &me.host,
            &format!("ip link add up0 type veth peer name lan0 netns {}", me.lan),
        );
        must(&me.host, "ip link set lo up && ip link set up0 up");
        must(
            &me.lan,
            "ip link set lo up && ip addr add 10.77.7.1/24 dev lan0 && ip link set lan0 up",
        );
        Some(me)
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    /// Start virtnetd in the host namespace with `networks` (TOML) and wait for its control
    /// socket.
    fn start(&mut self, networks: &str) {
        let control = self.dir.path().join("control.sock");
        let cfg = self.dir.path().join("virtnetd.toml");
        fs::write(
            &cfg,
            format!("control_socket = \"{}\"\n{networks}", control.display()),
        )
        .unwrap();
        let log = fs::File::create(&self.log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.host, VIRTNETD, "--config"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn virtnetd");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(control.exists() && self.stats().is_some()) {
            if let Some(Ok(Some(st))) = self.daemon.as_mut().map(|c| c.try_wait()) {
                panic!("virtnetd exited: {st}: {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "virtnetd did not start: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `virtnetd stats` as JSON text.
    fn stats(&self) -> Option<String> {
        let out = Command::new(VIRTNETD)
            .args(["stats", "--control"])
            .arg(self.dir.path().join("control.sock"))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn connect(&self, name: &str) -> Guest {
        Guest::connect(self.socket(name), GuestConfig::default()).expect("connect guest")
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- virtnetd log -----\n{}", self.log_text());
        }
        for ns in [&self.host, &self.lan] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn port_toml(lan: &Lan, name: &str, mac: &str) -> String {
    format!(
        "[[network.port]]\nname = \"{name}\"\nsocket = \"{}\"\nmac = \"{mac}\"\n",
        lan.socket(name).display()
    )
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// An ARP request from `mac`/`ip` for `target`.
fn arp_request(mac: [u8; 6], ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f.resize(60, 0);
    f
}

fn icmp_echo(src: [u8; 6], dst: [u8; 6], sip: [u8; 4], dip: [u8; 4], seq: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src, dst)
        .ipv4(sip, dip, 64)
        .icmpv4_echo_request(0x77, seq);
    let payload = [0x5a; 56];
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, &payload).unwrap();
    v
}

/// Wait for a frame matching `pred` (others are skipped).
fn wait_frame(g: &mut Guest, what: &str, pred: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(r) = g.recv(0, Duration::from_millis(200)).expect("recv") {
            if pred(&r.frame) {
                return r.frame;
            }
        }
    }
    panic!("no {what}");
}

fn is_arp_reply_from(f: &[u8], ip: [u8; 4]) -> bool {
    f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2] && f[28..32] == ip
}

fn is_echo_reply(f: &[u8], from: [u8; 4]) -> bool {
    f.len() >= 42 && f[12..14] == [8, 0] && f[23] == 1 && f[26..30] == from && f[34] == 0
}

/// ARP and ping from two guests to a real Linux host on the LAN; the LAN sees each guest with
/// its own MAC; nothing a guest sends comes back to it through the uplink.
#[test]
fn guests_reach_a_lan_host_with_their_own_macs() {
    let Some(mut lan) = Lan::new() else { return };
    let net = format!(
        "[[network]]\nname = \"lan\"\nmode = \"bridged\"\nuplink = \"up0\"\n{}{}",
        port_toml(&lan, "g1", "52:54:00:77:00:02"),
        port_toml(&lan, "g2", "52:54:00:77:00:03")
    );
    lan.start(&net);
    let lan_host = [10, 77, 7, 1];
    for (name, mac, ip) in [
        ("g1", "52:54:00:77:00:02", [10, 77, 7, 2]),
        ("g2", "52:54:00:77:00:03", [10, 77, 7, 3]),
    ] {
        let mac = parse_mac(mac);
        let mut g = lan.connect(name);
        g.send(0, &NetHdr::NONE, &arp_request(mac, ip, lan_host))
            .unwrap();
        let reply = wait_frame(&mut g, "ARP reply from the LAN host", |f| {
            is_arp_reply_from(f, lan_host)
        });
        assert_eq!(
            reply[..6],
            mac,
            "the reply is unicast to the guest's own MAC"
        );
        let host_mac: [u8; 6] = reply[6..12].try_into().unwrap();
        for seq in 1..=3 {
            g.send(
                0,
                &NetHdr::NONE,
                &icmp_echo(mac, host_mac, ip, lan_host, seq),
            )
            .unwrap();
            let r = wait_frame(&mut g, "echo reply", |f| is_echo_reply(f, lan_host));
            assert_eq!(r[..6], mac);
        }
        // Nothing of the guest's own came back (loop avoidance on the uplink).
        let own = drain(&mut g, 0, SHORT)
            .into_iter()
            .filter(|r| r.frame[6..12] == mac)
            .count();
        assert_eq!(own, 0, "{name} saw its own frames");
    }
    // Both guests are on the LAN with their own MACs.
    let neigh = must(&lan.lan, "ip neigh show dev lan0");
    for (ip, mac) in [
        ("10.77.7.2", "52:54:00:77:00:02"),
        ("10.77.7.3", "52:54:00:77:00:03"),
    ] {
        assert!(
            neigh
                .lines()
                .any(|l| l.starts_with(&format!("{ip} ")) && l.contains(mac)),
            "LAN neighbour table lacks {ip} at {mac}:\n{neigh}"
        );
    }
    let stats = lan.stats().unwrap();
    assert!(stats.contains("uplink:up0"), "{stats}");
    // The uplink's socket-side counters: the LAN host's replies came in, the guests' went out.
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let up = &v["networks"][0]["uplink"];
    assert!(up["rx_frames"].as_u64().unwrap() >= 4, "{up}");
    assert!(
        up["tx_ring_frames"].as_u64().unwrap() + up["tx_sendmsg_frames"].as_u64().unwrap() >= 4,
        "{up}"
    );
    assert_eq!(up["tx_errors"].as_u64(), Some(0), "{up}");
}

/// Two bridged networks on one NIC: untagged, and VLAN 100. The VLAN network's frames carry
/// the tag on the wire (tcpdump on the LAN side), untagged LAN traffic reaches only the
/// untagged network, VLAN 100 traffic only the VLAN network (untagged).
#[test]
fn vlan_network_is_tagged_on_the_wire_and_separated() {
    let Some(mut lan) = Lan::new() else { return };
    let have = |p: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("tcpdump") || !have("python3") {
        assert!(
            std::env::var_os("CI").is_none(),
            "required in CI: needs tcpdump and python3"
        );
        eprintln!("SKIPPED: needs tcpdump and python3");
        return;
    }
    let net = format!(
        "[[network]]\nname = \"plain\"\nmode = \"bridged\"\nuplink = \"up0\"\n{}\
         [[network]]\nname = \"v100\"\nmode = \"bridged\"\nuplink = \"up0\"\nuplink_vlan = 100\n{}",
        port_toml(&lan, "p0", "52:54:00:77:01:02"),
        port_toml(&lan, "v0", "52:54:00:77:64:02")
    );
    lan.start(&net);
    let mut p0 = lan.connect("p0");
    let mut v0 = lan.connect("v0");
    let vmac = parse_mac("52:54:00:77:64:02");

    // Guest → wire: tcpdump in the LAN namespace must see the tag.
    let pcap_out = lan.dir.path().join("tcpdump.txt");
    let mut dump = Command::new("ip")
        .args([
            "netns", "exec", &lan.lan, "tcpdump", "-i", "lan0", "-e", "-n", "-l", "-c", "1",
        ])
        .args(["ether", "src", "52:54:00:77:64:02"])
        .stdout(fs::File::create(&pcap_out).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(1500)); // tcpdump opens its socket
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = None;
    while Instant::now() < deadline {
        v0.send(
            0,
            &NetHdr::NONE,
            &arp_request(vmac, [10, 77, 100, 2], [10, 77, 100, 1]),
        )
        .unwrap();
        if let Ok(Some(st)) = dump.try_wait() {
            done = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    if done.is_none() {
        let _ = dump.kill();
    }
    let _ = dump.wait();
    let seen = fs::read_to_string(&pcap_out).unwrap_or_default();
    assert!(
        seen.contains("vlan 100") && seen.contains("52:54:00:77:64:02"),
        "tcpdump on the LAN did not see a VLAN 100 frame from the guest: {seen:?}"
    );

    // The untagged network's guest never sees the VLAN guest's frames.
    assert!(
        !drain(&mut p0, 0, SHORT)
            .iter()
            .any(|r| r.frame[6..12] == vmac),
        "VLAN 100 leaked into the untagged network"
    );

    // LAN → guests: an untagged and a VLAN 100 broadcast, written raw on lan0.
    let lan_mac = [0x02, 0x77, 0, 0, 0, 0x01];
    let mut untagged = vec![0xff; 6];
    untagged.extend_from_slice(&lan_mac);
    untagged.extend_from_slice(&[0x88, 0xb5]);
    untagged.extend_from_slice(b"untagged-from-the-lan");
    untagged.resize(60, 0);
    let mut tagged = untagged[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 100]);
    tagged.extend_from_slice(&[0x88, 0xb5]);
    tagged.extend_from_slice(b"tagged-100-from-the-lan");
    tagged.resize(64, 0);
    let hex = |v: &[u8]| v.iter().map(|b| format!("{b:02x}")).collect::<String>();
    must(
        &lan.lan,
        &format!(
            "python3 -c \"import socket; s=socket.socket(socket.AF_PACKET, socket.SOCK_RAW); \
             s.bind(('lan0', 0)); s.send(bytes.fromhex('{}')); s.send(bytes.fromhex('{}'))\"",
            hex(&untagged),
            hex(&tagged)
        ),
    );
    let got_v = wait_frame(&mut v0, "the VLAN 100 frame", |f| f[6..12] == lan_mac);
    let mut want_v = untagged[..12].to_vec();
    want_v.extend_from_slice(&tagged[16..]);
    assert_eq!(got_v, want_v, "the VLAN guest gets the frame untagged");
    let got_p = wait_frame(&mut p0, "the untagged frame", |f| f[6..12] == lan_mac);
    assert_eq!(got_p, untagged);
    // Neither saw the other's.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!drain(&mut v0, 0, SHORT)
        .iter()
        .any(|r| r.frame[6..12] == lan_mac));
    assert!(!drain(&mut p0, 0, SHORT)
        .iter()
        .any(|r| r.frame[6..12] == lan_mac));
}

/// Without CAP_NET_RAW virtnetd refuses to start and names the capability.
#[test]
fn without_cap_net_raw_the_error_names_it() {
    let Some(lan) = Lan::new() else { return };
    if Command::new("setpriv").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "required in CI: needs setpriv (util-linux)"
        );
        eprintln!("SKIPPED: needs setpriv (util-linux)");
        return;
    }
    let cfg = lan.dir.path().join("virtnetd.toml");
    fs::write(
        &cfg,
        format!(
            "control_socket = \"{}\"\n[[network]]\nname = \"lan\"\nmode = \"bridged\"\nuplink = \"up0\"\n{}",
            lan.dir.path().join("control.sock").display(),
            port_toml(&lan, "g1", "52:54:00:77:00:02")
        ),
    )
    .unwrap();
    // Root without CAP_NET_RAW in its bounding set has no CAP_NET_RAW after exec.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lan.host,
            "setpriv",
            "--bounding-set",
            "-net_raw",
            VIRTNETD,
        ])
        .arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .expect("run virtnetd");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "virtnetd started without CAP_NET_RAW: {text}"
    );
    assert!(
        text.contains("needs CAP_NET_RAW") && text.contains("up0"),
        "the error does not name the capability: {text}"
    );
}
