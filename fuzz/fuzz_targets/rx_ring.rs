//! Hostile RX rings through the RX engine: the burst path (`RxEngine::deliver_burst`, with its
//! lone-descriptor run) against the frame-by-frame path (`RxEngine::deliver`), on two copies of
//! the same guest memory.
//!
//! The guest posts buffers as it likes: one writable descriptor (the fast path), a header
//! descriptor then a body, read-only buffers, indirect tables pointing anywhere, tiny buffers,
//! loops; raw patches then corrupt the descriptor table, extra heads go into the avail ring, and
//! the avail index may jump arbitrarily far ahead. Frames (built by `FrameSpec`, any offload
//! header) go in as one burst.
//!
//! Invariants: no panic; both paths give the same result for every frame, consume the same
//! avail entries, write the same used elements and leave guest memory byte for byte the same;
//! every avail entry taken is returned in the used ring.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use virtnet_fuzz::ring::{
    jump_avail, memory, patch, push_avail, store, RawDesc, BUF_START, F_INDIRECT, F_NEXT, F_WRITE,
    REGION_A, REGION_B, USED_RING,
};
use virtnet_fuzz::FrameSpec;
use virtnet_switch::{DropReason, Frame, NetHdr, SliceFrame};
use virtnet_virtio::ctrl::RxFilter;
use virtnet_virtio::rx::{RxEngine, RxParams};
use virtnet_virtio::virtio_net::{features as F, Negotiated};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Arbitrary, Debug)]
enum Post {
    /// One writable descriptor of this many bytes.
    Lone(u16),
    /// A writable header descriptor of the first length, then a body of the second.
    Split(u8, u16),
    /// A readable descriptor (wrong direction for RX).
    ReadOnly(u16),
    /// An indirect table of writable descriptors of these lengths.
    Indirect(Vec<u16>),
}

#[derive(Arbitrary, Debug)]
struct FrameIn {
    frame: FrameSpec,
    flags: u8,
    gso_type: u8,
    gso_size: u16,
    /// Derive hdr_len/csum_start/csum_offset from the built frame.
    auto_hdr: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    queue_size_log2: u8,
    /// Feature bits: VERSION_1, MRG_RXBUF, GUEST_CSUM, GUEST_TSO4, GUEST_TSO6.
    features: u8,
    posts: Vec<Post>,
    patches: Vec<(u16, RawDesc)>,
    extra_heads: Vec<u16>,
    avail_jump: Option<u16>,
    frames: Vec<FrameIn>,
}

/// Lay out the guest's RX ring in `mem` as `input` says; the same input gives the same bytes.
fn build(mem: &GuestMemoryMmap, input: &Input, size: u16) -> Option<Queue> {
    let mock = MockSplitQueue::new(mem, size);
    if mock.avail_addr().0 + 6 + 2 * u64::from(size) > USED_RING {
        return None;
    }
    let mut next_buf = BUF_START;
    let mut alloc = |len: u64| -> u64 {
        let mut at = next_buf.div_ceil(16) * 16;
        if at + len > REGION_A.0 + REGION_A.1 as u64 && at < REGION_B.0 {
            at = REGION_B.0;
        }
        next_buf = at + len;
        // Past the end: the descriptor points outside guest memory, as a hostile guest's may.
        at
    };
    let mut next_desc = 0u16;
    for p in input.posts.iter().take(usize::from(size)) {
        let head = next_desc;
        let used = match p {
            Post::Lone(l) => {
                let at = alloc(u64::from(*l));
                store(
                    &mock,
                    size,
                    head,
                    Descriptor::new(at, u32::from(*l), F_WRITE, 0),
                );
                1
            }
            Post::Split(h, b) => {
                let (ha, ba) = (alloc(u64::from(*h)), alloc(u64::from(*b)));
                store(
                    &mock,
                    size,
                    head,
                    Descriptor::new(ha, u32::from(*h), F_WRITE | F_NEXT, head.wrapping_add(1)),
                );
                store(
                    &mock,
                    size,
                    head.wrapping_add(1),
                    Descriptor::new(ba, u32::from(*b), F_WRITE, 0),
                );
                2
            }
            Post::ReadOnly(l) => {
                let at = alloc(u64::from(*l));
                store(&mock, size, head, Descriptor::new(at, u32::from(*l), 0, 0));
                1
            }
            Post::Indirect(lens) => {
                let lens = &lens[..lens.len().min(8)];
                let table = alloc(16 * lens.len() as u64);
                for (i, l) in lens.iter().enumerate() {
                    let at = alloc(u64::from(*l));
                    let flags = if i + 1 < lens.len() {
                        F_WRITE | F_NEXT
                    } else {
                        F_WRITE
                    };
                    let d = Descriptor::new(at, u32::from(*l), flags, i as u16 + 1);
                    let _ =
                        mem.write_obj(RawDescriptor::from(d), GuestAddress(table + 16 * i as u64));
                }
                let d = Descriptor::new(table, 16 * lens.len() as u32, F_INDIRECT, 0);
                store(&mock, size, head, d);
                1
            }
        };
        if u32::from(next_desc) + used > u32::from(size) {
            break;
        }
        next_desc += used as u16;
        push_avail(&mock, size, head);
    }
    for (idx, d) in input.patches.iter().take(16) {
        patch(&mock, size, *idx, d);
    }
    for &h in input.extra_heads.iter().take(8) {
        push_avail(&mock, size, h);
    }
    if let Some(j) = input.avail_jump {
        jump_avail(&mock, j);
    }
    let mut q = mock.create_queue::<Queue>().ok()?;
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    Some(q)
}

fn contents(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut v = vec![0u8; REGION_A.1 + REGION_B.1];
    let (a, b) = v.split_at_mut(REGION_A.1);
    mem.read_slice(a, GuestAddress(REGION_A.0)).unwrap();
    mem.read_slice(b, GuestAddress(REGION_B.0)).unwrap();
    v
}

fuzz_target!(|input: Input| {
    let (Some(mem_a), Some(mem_b)) = (memory(), memory()) else {
        return;
    };
    let size: u16 = 1 << (input.queue_size_log2 % 9);
    let (Some(mut qa), Some(mut qb)) = (build(&mem_a, &input, size), build(&mem_b, &input, size))
    else {
        return;
    };
    let mut acked = 0u64;
    for (bit, f) in [
        F::VERSION_1,
        F::MRG_RXBUF,
        F::GUEST_CSUM,
        F::GUEST_TSO4,
        F::GUEST_TSO6,
    ]
    .into_iter()
    .enumerate()
    {
        if input.features & (1 << bit) != 0 {
            acked |= f;
        }
    }
    let params = RxParams::new(&Negotiated::new(acked));

    // The frames, built once.
    let mut bufs: Vec<Vec<u8>> = Vec::new();
    let mut hdrs: Vec<NetHdr> = Vec::new();
    for f in input.frames.iter().take(64) {
        let mut b = Vec::new();
        let built = f.frame.build(&mut b);
        let mut hdr = NetHdr {
            flags: f.flags & 1,
            gso_type: f.gso_type,
            gso_size: f.gso_size,
            ..NetHdr::NONE
        };
        if f.auto_hdr && built.headers != 0 {
            hdr.hdr_len = built.headers as u16;
            hdr.csum_start = built.l4 as u16;
            hdr.csum_offset = built.csum_offset as u16;
        }
        bufs.push(b);
        hdrs.push(hdr);
    }
    let views: Vec<SliceFrame<'_>> = bufs.iter().map(|b| SliceFrame(b)).collect();
    let refs: Vec<&dyn Frame> = views.iter().map(|v| v as &dyn Frame).collect();
    let n = refs.len();

    // A: the burst path.
    let mut ea = RxEngine::new(params, RxFilter::new(None));
    let mut out_a = vec![Err(DropReason::NotReady); n];
    ea.begin_burst();
    ea.deliver_burst(&mem_a, &mut qa, &refs, &hdrs, &mut out_a);
    ea.end_burst();
    let pub_a = ea.publish(&mem_a, &mut qa).is_ok();

    // B: frame by frame, in the same burst.
    let mut eb = RxEngine::new(params, RxFilter::new(None));
    let mut out_b = Vec::with_capacity(n);
    eb.begin_burst();
    for (f, h) in refs.iter().zip(&hdrs) {
        out_b.push(eb.deliver(&mem_b, &mut qb, *f, h));
    }
    eb.end_burst();
    let pub_b = eb.publish(&mem_b, &mut qb).is_ok();

    assert_eq!(out_a, out_b, "per-frame results");
    assert_eq!(pub_a, pub_b);
    assert_eq!(qa.next_avail(), qb.next_avail(), "avail entries taken");
    assert_eq!(qa.next_used(), qb.next_used(), "used elements");
    // Every avail entry taken went back in the used ring (a bad chain empty); a frame that
    // did not fit gave its chains back to the avail ring.
    assert_eq!(qa.next_used(), qa.next_avail(), "chains taken and returned");
    assert!(contents(&mem_a) == contents(&mem_b), "guest memory differs");
});
