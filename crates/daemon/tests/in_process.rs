//! The daemon run in-process (`run()` in a thread) with a temp-dir config: sockets appear,
//! the control socket answers `ping` and `stats`, shutdown removes every socket.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use virtnet_daemon::control::{request, request_stats};
use virtnet_daemon::{run, Config, Shutdown};

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

fn config(dir: &Path) -> Config {
    let text = format!(
        r#"
control_socket = "{d}/control.sock"
log_level = "warn"

[[network]]
name = "lab"
mode = "internal"

[[network.port]]
socket = "{d}/run/lab-0.sock"
mac = "52:54:00:12:34:01"
queue_pairs = 1

[[network.port]]
socket = "{d}/run/lab-1.sock"
vlan = 10
queue_size = 512

[[network]]
name = "quiet"
mode = "null"
mtu = 9000

[[network.port]]
socket = "{d}/run/quiet-0.sock"
name = "solo"
"#,
        d = dir.display()
    );
    let cfg = Config::from_toml(&text, Path::new("inline.toml")).expect("parses");
    cfg.validate().expect("valid");
    cfg
}

#[test]
fn daemon_serves_and_cleans_up() {
    let dir = tempfile::TempDir::new().unwrap();
    let cfg = config(dir.path());
    let ctl = cfg.control_socket.clone();
    let sockets: Vec<_> = cfg
        .networks
        .iter()
        .flat_map(|n| n.ports.iter().map(|p| p.socket.clone()))
        .collect();
    assert!(
        dir.path().join("run").is_dir(),
        "validation created the socket directory"
    );

    let shutdown = Shutdown::new().unwrap();
    let sd = shutdown.clone();
    let daemon = thread::spawn(move || run(cfg, &sd));

    wait_for("the control socket", || request(&ctl, "ping").is_ok());
    for s in &sockets {
        assert!(s.exists(), "{} missing", s.display());
    }
    assert_eq!(request(&ctl, "ping").unwrap(), "pong");

    let stats = request_stats(&ctl).unwrap();
    let nets: Vec<_> = stats
        .networks
        .iter()
        .map(|n| (n.name.as_str(), n.mode.as_str()))
        .collect();
    assert_eq!(nets, [("lab", "internal"), ("quiet", "null")]);
    let lab = &stats.networks[0].ports;
    assert_eq!(lab.len(), 2);
    assert_eq!(lab[0].name, "lab-0");
    assert_eq!(lab[0].mac.as_deref(), Some("52:54:00:12:34:01"));
    assert_eq!(lab[0].socket.as_deref(), Some(sockets[0].as_path()));
    assert_eq!(lab[1].mac, None);
    assert_ne!(lab[0].port_id, lab[1].port_id);
    for p in lab {
        assert!(!p.connected && !p.running, "no VMM connected yet");
        assert_eq!((p.rx_frames, p.tx_frames), (0, 0));
        assert!(p.drops.contains_key("no_rx_buffers"));
    }
    let quiet = &stats.networks[1].ports;
    let names: Vec<_> = quiet
        .iter()
        .map(|p| (p.name.as_str(), p.kind.as_str()))
        .collect();
    assert_eq!(names, [("solo", "guest"), ("null", "null")]);

    // The raw JSON has the documented keys.
    let raw: serde_json::Value = serde_json::from_str(&request(&ctl, "stats").unwrap()).unwrap();
    let p = &raw["networks"][0]["ports"][0];
    for key in [
        "name",
        "socket",
        "port_id",
        "mac",
        "connected",
        "running",
        "connections",
        "acked_features",
        "rx_frames",
        "rx_bytes",
        "tx_frames",
        "tx_bytes",
        "flooded",
        "drops",
    ] {
        assert!(p.get(key).is_some(), "stats lacks {key}: {p}");
    }

    // The CLI client reaches it too.
    let ctl_str = ctl.to_str().unwrap();
    assert_eq!(
        virtnet_daemon::main_with(["virtnetd", "stats", "--control", ctl_str]),
        0
    );
    assert_eq!(
        virtnet_daemon::main_with(["virtnetd", "ping", "--control", ctl_str]),
        0
    );

    // A second daemon on the same control socket is refused and leaves the first alone.
    let again = config(dir.path());
    let sd2 = Shutdown::new().unwrap();
    sd2.trigger();
    assert!(run(again, &sd2).is_err());
    assert_eq!(request(&ctl, "ping").unwrap(), "pong");

    shutdown.trigger();
    daemon.join().unwrap().unwrap();
    assert!(!ctl.exists(), "control socket removed");
    for s in &sockets {
        assert!(!s.exists(), "{} left behind", s.display());
    }
    assert_eq!(
        virtnet_daemon::main_with(["virtnetd", "ping", "--control", ctl_str]),
        1
    );
}
