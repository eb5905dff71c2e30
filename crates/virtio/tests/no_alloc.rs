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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use virtnet_guest::{Guest, GuestConfig, NetHdr, DEFAULT_FEATURES};
use virtnet_switch::{Switch, SwitchConfig};
use virtnet_virtio::virtio_net::features as F;

mod common;
use common::{eth, mac, port, tcp4};

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
    let (pa, pb) = (port(&sw, dir.path(), 1, 1), port(&sw, dir.path(), 2, 1));
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
    b.send(0, &NetHdr::NONE, &eth([0xff; 6], mac(2), 60, 0))
        .unwrap();
    assert!(a.recv(0, T).unwrap().is_some());

    // (frame, header, frames the receiver gets per frame sent, frames to send)
    let (gso, gso_hdr) = tcp4(10_000, mac(1), mac(2));
    let loads = [
        (eth(mac(2), mac(1), 60, 0), NetHdr::NONE, 1, 20_000),
        (eth(mac(2), mac(1), 1514, 0), NetHdr::NONE, 1, 20_000),
        // 10 000 bytes of TCP payload at MSS 1448: 7 segments.
        (gso, gso_hdr, 7, 3_000),
    ];
    for (f, hdr, per, count) in loads {
        // Warm-up: every buffer, batch and scratch area reaches its working size.
        assert_eq!(pump(&mut a, &mut b, &f, hdr, 2_000, per), 2_000 * per);
        let before = ALLOCS.load(Ordering::Relaxed);
        let got = pump(&mut a, &mut b, &f, hdr, count, per);
        let allocs = ALLOCS.load(Ordering::Relaxed) - before;
        assert_eq!(got, count * per);
        let (len, gso) = (f.len(), if hdr.gso_type != 0 { " GSO" } else { "" });
        eprintln!(
            "{len} B{gso}: {count} frames sent, {got} received, {allocs} allocations in the process"
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
