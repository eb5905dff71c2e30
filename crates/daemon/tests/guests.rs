//! Frames through a daemon run in-process: two user-space virtio-net drivers
//! (`virtnet-guest`, the DPDK virtio_user of this project) connect to two ports of one
//! network, a third waits on another network. Checks forwarding, isolation between networks,
//! the `stats` counters and status fields, and a VMM reconnect.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use virtnet_daemon::control::{request, request_stats, PortReport, StatsReport};
use virtnet_daemon::{run, Config, Shutdown};
use virtnet_guest::{Guest, GuestConfig, NetHdr};

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn port<'a>(s: &'a StatsReport, net: &str, name: &str) -> &'a PortReport {
    s.networks
        .iter()
        .find(|n| n.name == net)
        .and_then(|n| n.ports.iter().find(|p| p.name == name))
        .unwrap_or_else(|| panic!("no port {net}/{name} in {s:?}"))
}

fn frame(src: [u8; 6], dst: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes()); // local experimental ethertype
    f[14] = tag;
    f
}

const MAC_A: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 1];
const MAC_B: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 2];

#[test]
fn two_guests_talk_through_the_daemon() {
    let dir = tempfile::TempDir::new().unwrap();
    let d = dir.path();
    let text = format!(
        r#"
control_socket = "{d}/ctl.sock"
log_level = "warn"
[[network]]
name = "lab"
mode = "internal"
[[network.port]]
socket = "{d}/a.sock"
mac = "52:54:00:12:34:01"
[[network.port]]
socket = "{d}/b.sock"
mac = "52:54:00:12:34:02"
[[network]]
name = "other"
mode = "internal"
[[network.port]]
socket = "{d}/c.sock"
"#,
        d = d.display()
    );
    let cfg = Config::from_toml(&text, Path::new("guests.toml")).unwrap();
    cfg.validate().unwrap();
    let ctl: PathBuf = cfg.control_socket.clone();
    let shutdown = Shutdown::new().unwrap();
    let sd = shutdown.clone();
    let daemon = thread::spawn(move || run(cfg, &sd));
    wait_for("the daemon", || request(&ctl, "ping").is_ok());

    let mut a = Guest::connect(d.join("a.sock"), GuestConfig::default()).unwrap();
    let mut b = Guest::connect(d.join("b.sock"), GuestConfig::default()).unwrap();
    let mut c = Guest::connect(d.join("c.sock"), GuestConfig::default()).unwrap();
    // The device exposes the configured MAC.
    assert_eq!(a.mac(), Some(MAC_A));
    assert_eq!(c.mac(), None);

    wait_for("all ports running", || {
        let s = request_stats(&ctl).unwrap();
        ["lab-0", "lab-1"]
            .iter()
            .all(|p| port(&s, "lab", p).running)
            && port(&s, "other", "other-0").running
    });
    let s = request_stats(&ctl).unwrap();
    let pa = port(&s, "lab", "lab-0");
    assert!(pa.connected);
    assert_eq!(pa.connections, 1);
    assert_eq!(pa.acked_features, a.acked_features());
    assert_eq!(pa.mac.as_deref(), Some("52:54:00:12:34:01"));

    // A broadcast from A reaches B, not the other network.
    a.send(0, &NetHdr::NONE, &frame(MAC_A, [0xff; 6], 1))
        .unwrap();
    let got = b
        .recv(0, Duration::from_secs(5))
        .unwrap()
        .expect("B receives the broadcast");
    assert_eq!(got.frame, frame(MAC_A, [0xff; 6], 1));
    // B answers by unicast; A receives it.
    b.send(0, &NetHdr::NONE, &frame(MAC_B, MAC_A, 2)).unwrap();
    let got = a
        .recv(0, Duration::from_secs(5))
        .unwrap()
        .expect("A receives the reply");
    assert_eq!(got.frame[14], 2);
    assert_eq!(
        c.recv(0, Duration::from_millis(200)).unwrap(),
        None,
        "networks are isolated"
    );

    wait_for("the counters", || {
        let s = request_stats(&ctl).unwrap();
        port(&s, "lab", "lab-1").tx_frames == 1 && port(&s, "lab", "lab-0").tx_frames == 1
    });
    let s = request_stats(&ctl).unwrap();
    let (pa, pb, pc) = (
        port(&s, "lab", "lab-0"),
        port(&s, "lab", "lab-1"),
        port(&s, "other", "other-0"),
    );
    assert_eq!((pa.rx_frames, pa.rx_bytes, pa.flooded), (1, 60, 1));
    assert_eq!((pb.rx_frames, pb.tx_frames, pb.tx_bytes), (1, 1, 60));
    assert_eq!((pc.rx_frames, pc.tx_frames), (0, 0));
    assert_eq!(pa.drops.values().sum::<u64>(), 0);

    // A's VMM goes away and comes back: the port stays, counts a second connection.
    a.disconnect();
    wait_for("A disconnected", || {
        !port(&request_stats(&ctl).unwrap(), "lab", "lab-0").connected
    });
    let mut a = Guest::connect(d.join("a.sock"), GuestConfig::default()).unwrap();
    wait_for("A reconnected", || {
        let s = request_stats(&ctl).unwrap();
        let p = port(&s, "lab", "lab-0");
        p.connected && p.running && p.connections == 2
    });
    a.send(0, &NetHdr::NONE, &frame(MAC_A, MAC_B, 3)).unwrap();
    let got = b
        .recv(0, Duration::from_secs(5))
        .unwrap()
        .expect("B receives after reconnect");
    assert_eq!(got.frame[14], 3);

    shutdown.trigger();
    daemon.join().unwrap().unwrap();
    for s in ["a.sock", "b.sock", "c.sock", "ctl.sock"] {
        assert!(!d.join(s).exists(), "{s} left behind");
    }
    drop((a, b, c));
}
