#![allow(missing_docs)]
//! Criterion benchmark of one port's TX→RX path, in process: a `Switch`, two `NetPort`s
//! (vhost-user devices on unix sockets) and two `Guest` drivers. Each iteration guest A
//! queues a batch of frames with `send_batch` (one kick), the device's TX worker forwards
//! them through the switch into B's RX ring, and B takes them with `drain_with` (one
//! repost). Throughput is in frames; 64 B and 1500 B.
//!
//! `cargo bench --bench port`

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use virtnet::guest::{Guest, GuestConfig, NetHdr};
use virtnet::switch::{MacAddr, Switch, SwitchConfig};
use virtnet::virtio::{NetConfig, NetPort};

const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0a];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x0b];
/// Frames per iteration (a typical NAPI/virtio batch; well under the 256-entry rings).
const BATCH: usize = 32;

struct Rig {
    _dir: tempfile::TempDir,
    pa: NetPort,
    pb: NetPort,
    a: Guest,
    b: Guest,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let sw = Switch::new(SwitchConfig::default());
    let mk = |mac: [u8; 6], name: &str| {
        let cfg = NetConfig {
            name: name.into(),
            mac: Some(MacAddr(mac)),
            ..Default::default()
        };
        NetPort::listen(sw.clone(), cfg, &dir.path().join(format!("{name}.sock"))).expect("listen")
    };
    let (pa, pb) = (mk(A, "a"), mk(B, "b"));
    let mut a = Guest::connect(pa.socket_path(), GuestConfig::default()).expect("connect a");
    let mut b = Guest::connect(pb.socket_path(), GuestConfig::default()).expect("connect b");
    // B announces itself so the switch forwards A's frames as known unicast.
    let mut hello = [0u8; 60];
    hello[..6].copy_from_slice(&[0xff; 6]);
    hello[6..12].copy_from_slice(&B);
    hello[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    b.send(0, &NetHdr::NONE, &hello).expect("announce");
    a.recv(0, Duration::from_secs(2))
        .expect("recv")
        .expect("the switch delivered B's broadcast to A");
    Rig {
        _dir: dir,
        pa,
        pb,
        a,
        b,
    }
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&B);
    f[6..12].copy_from_slice(&A);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    f
}

/// Sends one batch from A and waits until B has all of it. Panics if frames are lost (a
/// benchmark of a lossy path would measure nothing).
fn round(r: &mut Rig, f: &[u8]) {
    let len = f.len();
    let sent =
        r.a.send_batch(0, BATCH, |_, buf| {
            buf[..len].copy_from_slice(f);
            Some((NetHdr::NONE, len))
        })
        .expect("send_batch");
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut got = 0;
    while got < sent {
        let n =
            r.b.drain_with(0, 256, |_, fr| assert_eq!(fr.len(), len))
                .expect("drain");
        if n == 0 {
            // Sleep on the call eventfd rather than spin (2 CPUs, one is the device worker).
            if r.b
                .recv_with(0, Duration::from_millis(100), |_, fr| {
                    assert_eq!(fr.len(), len)
                })
                .expect("recv")
                .is_some()
            {
                got += 1;
            }
        }
        got += n;
        assert!(Instant::now() < deadline, "lost frames: {got}/{sent}");
    }
}

fn bench_port(c: &mut Criterion) {
    let mut g = c.benchmark_group("port_tx_rx");
    let mut r = rig();
    for len in [64usize, 1500] {
        let f = frame(len);
        g.throughput(Throughput::Elements(BATCH as u64));
        g.bench_with_input(BenchmarkId::new("guest_to_guest", len), &f, |bch, f| {
            bch.iter(|| round(&mut r, f))
        });
    }
    g.finish();
    let drops = r.pb.stats().total_drops();
    assert_eq!(drops, 0, "the receiving port dropped frames");
    let Rig { a, b, pa, pb, .. } = r;
    a.disconnect();
    b.disconnect();
    pa.shutdown();
    pb.shutdown();
}

criterion_group!(benches, bench_port);
criterion_main!(benches);
