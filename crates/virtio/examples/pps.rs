//! Ad-hoc frame-rate check: one guest sends 60-byte unicast frames to another through two
//! `NetPort`s on one switch (guest TX ring → switch → other guest's RX ring, one copy).
//!
//! `cargo run --release -p virtnet-virtio --example pps -- [seconds] [frame_len] [max_frames]`
//!
//! With `max_frames` the sender stops after that many frames (or `seconds`, whichever comes
//! first): a fixed workload for instruction counting, e.g.
//! `valgrind --tool=callgrind --separate-threads=yes target/release/examples/pps 60 60 200000`
//! then divide each thread's instruction count by the frame counts printed at the end. In that
//! mode the sender also keeps at most 192 frames ahead of the receiver, so no frame is dropped
//! for want of RX buffers and every run does the same work.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtnet_guest::{Guest, GuestConfig, NetHdr};
use virtnet_switch::{MacAddr, Switch, SwitchConfig};
use virtnet_virtio::{NetConfig, NetPort};

fn main() {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let len: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(60);
    let max_frames: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(u64::MAX);
    let dir = std::env::temp_dir().join(format!("virtnet-pps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sw = Switch::new(SwitchConfig::default());
    let mk = |n: u8| {
        let cfg = NetConfig {
            name: format!("vm{n}"),
            mac: Some(MacAddr([0x52, 0x54, 0, 0, 0, n])),
            ..Default::default()
        };
        NetPort::listen(sw.clone(), cfg, &dir.join(format!("vm{n}.sock"))).unwrap()
    };
    let (pa, pb) = (mk(1), mk(2));
    let mut a = Guest::connect(pa.socket_path(), GuestConfig::default()).unwrap();
    let mut b = Guest::connect(pb.socket_path(), GuestConfig::default()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut bc = vec![0u8; 60];
    bc[..6].copy_from_slice(&[0xff; 6]);
    bc[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
    bc[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    b.send(0, &NetHdr::NONE, &bc).unwrap();
    a.recv(0, Duration::from_secs(1)).unwrap().expect("learn");

    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let (s2, r2) = (stop.clone(), received.clone());
    let rx = std::thread::spawn(move || {
        while !s2.load(Ordering::Relaxed) {
            let n = b.drain_with(0, 256, |_, _| {}).unwrap();
            if n == 0 {
                let _ = b
                    .recv_with(0, Duration::from_millis(10), |_, _| ())
                    .unwrap()
                    .map(|_| r2.fetch_add(1, Ordering::Relaxed));
            } else {
                r2.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        b
    });
    let mut frame = vec![0u8; len];
    frame[..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
    frame[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    // Longer than an MTU: a TCPv4 TSO frame (the receiver acked GUEST_TSO4: passthrough).
    let mut hdr = NetHdr::NONE;
    if len > 1514 {
        frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        frame[14] = 0x45;
        frame[16..18].copy_from_slice(&((len - 14).min(0xffff) as u16).to_be_bytes());
        frame[22] = 64;
        frame[23] = 6;
        frame[26..30].copy_from_slice(&[10, 0, 0, 1]);
        frame[30..34].copy_from_slice(&[10, 0, 0, 2]);
        frame[46] = 0x50;
        hdr = NetHdr {
            flags: 1,
            gso_type: 1,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
    }
    let start = Instant::now();
    let mut sent = 0u64;
    let paced = max_frames != u64::MAX;
    while start.elapsed() < Duration::from_secs(secs) && sent < max_frames {
        if paced && sent.saturating_sub(received.load(Ordering::Relaxed)) > 192 - 64 {
            std::thread::yield_now();
            continue;
        }
        let want = (max_frames - sent).min(64) as usize;
        let n = a
            .send_batch(0, want, |_, buf| {
                buf[..len].copy_from_slice(&frame);
                Some((hdr, len))
            })
            .unwrap();
        if n == 0 {
            std::thread::yield_now();
        }
        sent += n as u64;
    }
    let el = start.elapsed().as_secs_f64();
    let _ = a.wait_tx_done(0, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let b = rx.join().unwrap();
    let got = received.load(Ordering::Relaxed);
    let st = pb.stats();
    let (ga, gb) = (a.stats(), b.stats());
    println!(
        "frames: sent {sent} forwarded {} received {got}; tx kicks {} (suppressed {}), \
         rx waits {} rx kicks {} (suppressed {})",
        pa.stats().rx_frames,
        ga.kicks,
        ga.kicks_suppressed,
        gb.waits,
        gb.kicks,
        gb.kicks_suppressed
    );
    println!(
        "len {len}: sent {:.2} Mpps, received {:.2} Mpps ({:.2} Gbit/s), rx drops {:?}",
        sent as f64 / el / 1e6,
        got as f64 / el / 1e6,
        got as f64 * len as f64 * 8.0 / el / 1e9,
        st.total_drops()
    );
    drop(a);
    drop(b);
    pa.shutdown();
    pb.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
