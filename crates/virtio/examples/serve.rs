//! Serve N vhost-user virtio-net devices on one switch for a while (manual tests with QEMU).
//!
//! `cargo run -p virtnet-virtio --example serve -- DIR [ports=2] [seconds=60] [queue_pairs=1]`
//! creates DIR/vm0.sock.. (MACs 52:54:00:00:00:0a + i) and prints per-port status and counters
//! every 5 seconds and at the end.

use std::time::{Duration, Instant};

use virtnet_switch::{MacAddr, Switch, SwitchConfig};
use virtnet_virtio::{NetConfig, NetPort};

struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Debug
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("{} {}: {}", r.level(), r.target(), r.args());
        }
    }
    fn flush(&self) {}
}

static LOGGER: Stderr = Stderr;

fn main() {
    let _ = log::set_logger(&LOGGER).map(|()| log::set_max_level(log::LevelFilter::Debug));
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: serve DIR [ports] [secs]"));
    let n: u8 = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);
    let secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(60);
    let pairs: u16 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    std::fs::create_dir_all(&dir).unwrap();
    let sw = Switch::new(SwitchConfig::default());
    let ports: Vec<NetPort> = (0..n)
        .map(|i| {
            let cfg = NetConfig {
                name: format!("vm{i}"),
                mac: Some(MacAddr([0x52, 0x54, 0, 0, 0, 0x0a + i])),
                queue_pairs: pairs,
                ..Default::default()
            };
            NetPort::listen(sw.clone(), cfg, &dir.join(format!("vm{i}.sock"))).unwrap()
        })
        .collect();
    println!("serving {n} ports in {}", dir.display());
    let start = Instant::now();
    let report = |ports: &[NetPort]| {
        for p in ports {
            let s = p.stats();
            let drops: Vec<String> = virtnet_switch::DropReason::ALL
                .iter()
                .filter(|r| s.drop_count(**r) > 0)
                .map(|r| format!("{r}={}", s.drop_count(*r)))
                .collect();
            println!(
                "{}: {:?} rx {} tx {} drops [{}]",
                p.socket_path().display(),
                p.status(),
                s.rx_frames,
                s.tx_frames,
                drops.join(" ")
            );
        }
    };
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(5));
        report(&ports);
    }
    report(&ports);
    for p in ports {
        p.shutdown();
    }
}
