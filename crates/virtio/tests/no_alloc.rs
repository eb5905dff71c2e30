//! The data path allocates nothing per frame: two guests (`virtnet-guest` frontends over real
//! vhost-user sockets) exchange frames through two `NetPort`s on one switch while a counting
//! global allocator watches the whole process (the backend's vring workers included).
//!
//! After a warm-up (buffers, batches and scratch space reach their working size), tens of
//! thousands of frames go through: small frames, full-size frames, and TCP GSO frames that the
//! switch segments in software for a receiver that cannot take them. A per-frame allocation
//! anywhere on the way would show up as at least one allocation per frame; what is left is
//! the occasional allocation of the machinery around it (thread wake-ups, timers), far fewer.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtnet_guest::{Guest, GuestConfig, NetHdr, DEFAULT_FEATURES};
use virtnet_switch::hdr::{FLAG_NEEDS_CSUM, GSO_TCPV4};
use virtnet_switch::{MacAddr, Switch, SwitchConfig};
use virtnet_virtio::virtio_net::features as F;
use virtnet_virtio::{NetConfig, NetPort};

/// Counts every allocation (and reallocation) of the process, then lets `System` do it.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract `System` meets is met here; the counter is a relaxed atomic add.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` (non-zero size) is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through this allocator with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` came from `System` through this allocator with `layout`; the caller
        // guarantees `new_size` is valid for it.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const T: Duration = Duration::from_secs(5);

fn mac(n: u8) -> [u8; 6] {
    [0x52, 0x54, 0, 0, 0, n]
}

fn port(sw: &Arc<Switch>, dir: &Path, n: u8) -> NetPort {
    let cfg = NetConfig {
        name: format!("vm{n}"),
        mac: Some(MacAddr(mac(n))),
        ..Default::default()
    };
    NetPort::listen(sw.clone(), cfg, &dir.join(format!("vm{n}.sock"))).unwrap()
}

/// A frame of `len` bytes from vm1 to vm2: plain (EtherType 0x88b5), or when `gso` a TCPv4
/// frame with a TSO header (MSS 1448, partial checksum) as Linux sends.
fn frame(len: usize, gso: bool) -> (Vec<u8>, NetHdr) {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&mac(2));
    f[6..12].copy_from_slice(&mac(1));
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    if !gso {
        return (f, NetHdr::NONE);
    }
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((len - 14) as u16).to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&[10, 0, 0, 1]);
    f[30..34].copy_from_slice(&[10, 0, 0, 2]);
    f[46] = 0x50;
    let hdr = NetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    };
    (f, hdr)
}

/// Send `count` copies of `f` from `a` to `b` in batches, each batch received before the next
/// goes (so no frame is dropped for want of RX buffers); returns the frames `b` received.
fn pump(a: &mut Guest, b: &mut Guest, f: &[u8], hdr: NetHdr, count: usize, per: usize) -> usize {
    let mut got = 0;
    let mut sent = 0;
    while sent < count {
        let n = a
            .send_batch(0, 32.min(count - sent), |_, buf| {
                buf[..f.len()].copy_from_slice(f);
                Some((hdr, f.len()))
            })
            .unwrap();
        sent += n;
        let want = sent * per;
        let deadline = Instant::now() + T;
        while got < want {
            let k = b.drain_with(0, 256, |_, _| {}).unwrap();
            got += k;
            if k == 0 {
                assert!(
                    Instant::now() < deadline,
                    "only {got} of {want} frames arrived"
                );
                std::thread::yield_now();
            }
        }
        a.wait_tx_done(0, T).unwrap();
    }
    got
}

#[test]
fn steady_traffic_allocates_nothing_per_frame() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new(SwitchConfig::default());
    let (pa, pb) = (port(&sw, dir.path(), 1), port(&sw, dir.path(), 2));
    let mut a = Guest::connect(pa.socket_path(), GuestConfig::default()).unwrap();
    // The receiver takes no TSO: GSO frames are segmented by the switch on the way.
    let mut b = Guest::connect(
        pb.socket_path(),
        GuestConfig {
            features: DEFAULT_FEATURES & !(F::GUEST_TSO4 | F::GUEST_TSO6 | F::GUEST_ECN),
            ..GuestConfig::default()
        },
    )
    .unwrap();
    let deadline = Instant::now() + T;
    while !(pa.status().running && pb.status().running) {
        assert!(Instant::now() < deadline, "devices never started running");
        std::thread::sleep(Duration::from_millis(5));
    }
    // vm2 announces itself so frames to it are unicast, not flooded.
    let (mut hello, _) = frame(60, false);
    hello[..6].copy_from_slice(&[0xff; 6]);
    hello[6..12].copy_from_slice(&mac(2));
    b.send(0, &NetHdr::NONE, &hello).unwrap();
    assert!(a.recv(0, T).unwrap().is_some());

    // (frame length, GSO, frames the receiver gets per frame sent, frames to send)
    let loads = [
        (60, false, 1, 20_000),
        (1514, false, 1, 20_000),
        // 10 000 bytes of TCP payload at MSS 1448: 7 segments.
        (54 + 10_000, true, 7, 3_000),
    ];
    for (len, gso, per, count) in loads {
        let (f, hdr) = frame(len, gso);
        // Warm-up: every buffer, batch and scratch area reaches its working size.
        assert_eq!(pump(&mut a, &mut b, &f, hdr, 2_000, per), 2_000 * per);
        let before = ALLOCS.load(Ordering::Relaxed);
        let got = pump(&mut a, &mut b, &f, hdr, count, per);
        let allocs = ALLOCS.load(Ordering::Relaxed) - before;
        assert_eq!(got, count * per);
        eprintln!(
            "{len} B{}: {count} frames sent, {got} received, {allocs} allocations in the process",
            if gso { " GSO" } else { "" }
        );
        assert!(
            allocs < (count / 100) as u64,
            "{allocs} allocations for {count} frames of {len} B: something allocates per frame"
        );
    }
    let st = pb.stats();
    assert_eq!(st.total_drops(), 0, "{st:?}");
    drop((a, b));
    pa.shutdown();
    pb.shutdown();
}
