//! Arbitrary TX descriptor chains through the virtio device's TX engine
//! (`virtnet_virtio::tx::process_tx_queue`) into a two-port switch.
//!
//! Descriptor table and avail ring are built with virtio-queue's `MockSplitQueue` (the used ring
//! is moved, see [`USED_RING`]) in a guest memory of two regions with a
//! hole between them. Chains are either well formed (a virtio-net header + a built frame, cut
//! into direct or indirect descriptors) or raw descriptors, and raw patches then corrupt the
//! descriptor table (loops, out-of-range addresses, write-only buffers, absurd lengths) and the
//! avail index may jump arbitrarily far ahead.
//!
//! Invariants: no panic; at most `TX_BATCH` chains per call; every chain taken is returned to
//! the used ring with length 0, with the ids the avail ring gave, in order; good chains are counted as received, bad ones as drops; the other
//! port receives frames of at most `MAX_FRAME_LEN` bytes, and when the table was not patched by
//! hand they are exactly the built frames, in order (a subsequence: some are dropped).

#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use virtnet_fuzz::ring::{
    jump_avail, memory, patch, push_avail, store, RawDesc, BUF_START, F_INDIRECT, F_NEXT, F_WRITE,
    REGION_A, REGION_B, USED_RING,
};
use virtnet_fuzz::{corrupt, Corruption, FrameSpec};
use virtnet_switch::{DropReason, Frame, NetHdr, PortConfig, PortSink, Switch, SwitchConfig};
use virtnet_virtio::tx::{process_tx_queue, TxParams, TxScratch, TX_BATCH};
use virtnet_virtio::virtio_net::{emit_hdr, MAX_FRAME_LEN};
use vm_memory::{Bytes, GuestAddress};

#[derive(Arbitrary, Debug)]
struct ChainSpec {
    frame: FrameSpec,
    corruptions: Vec<Corruption>,
    truncate: Option<u16>,
    flags: u8,
    gso_type: u8,
    gso_size: u16,
    /// Derive hdr_len/csum_start/csum_offset from the built frame.
    auto_hdr: bool,
    hdr_len: u16,
    csum_start: u16,
    csum_offset: u16,
    /// Cut points of header+frame into descriptors (at most 8 pieces).
    cuts: Vec<u16>,
    /// Put the descriptors in an indirect table.
    indirect: bool,
    /// Mark this piece write-only.
    write_only: Option<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    queue_size_log2: u8,
    hdr_v1: bool,
    csum: bool,
    tso4: bool,
    tso6: bool,
    ecn: bool,
    mtu: u16,
    chains: Vec<ChainSpec>,
    /// Raw descriptor table entries written after the chains: (index, descriptor).
    patches: Vec<(u16, RawDesc)>,
    /// Extra raw heads made available.
    extra_heads: Vec<u16>,
    /// Move the avail index by this much without writing entries (a lying driver).
    avail_jump: Option<u16>,
    kicks: u8,
}

/// The receiving port: copies every frame into a fixed buffer and keeps a copy for checking.
struct Capture {
    buf: Mutex<Box<[u8]>>,
    got: Mutex<Vec<Vec<u8>>>,
}

impl PortSink for Capture {
    fn deliver(&self, frame: &dyn Frame, _hdr: &NetHdr) -> Result<(), DropReason> {
        let n = frame.len();
        assert!(n <= MAX_FRAME_LEN, "frame of {n} bytes");
        let mut buf = self.buf.lock().unwrap();
        assert_eq!(
            frame.read_at(0, &mut buf[..n]),
            n,
            "frame shorter than its length"
        );
        self.got.lock().unwrap().push(buf[..n].to_vec());
        Ok(())
    }
}

struct Null;
impl PortSink for Null {
    fn deliver(&self, _: &dyn Frame, _: &NetHdr) -> Result<(), DropReason> {
        Ok(())
    }
}

/// Hands out buffer space in the two regions.
struct Bump {
    next: u64,
}

impl Bump {
    fn alloc(&mut self, len: usize, align: u64) -> Option<u64> {
        let len = len as u64;
        let mut at = self.next.div_ceil(align) * align;
        let a_end = REGION_A.0 + REGION_A.1 as u64;
        if at + len > a_end && at < REGION_B.0 {
            at = REGION_B.0;
        }
        if at + len > REGION_B.0 + REGION_B.1 as u64 {
            return None;
        }
        self.next = at + len;
        Some(at)
    }
}

fuzz_target!(|input: Input| {
    let Some(mem) = memory() else {
        return;
    };
    let size: u16 = 1 << (input.queue_size_log2 % 9);
    let mock = MockSplitQueue::new(&mem, size);
    // Descriptor table (16 B each) and avail ring (6 + 2 per entry) end below the used ring.
    assert!(mock.avail_addr().0 + 6 + 2 * u64::from(size) <= USED_RING);
    let params = TxParams {
        hdr_len: if input.hdr_v1 { 12 } else { 10 },
        csum: input.csum,
        tso4: input.tso4,
        tso6: input.tso6,
        ecn: input.ecn,
        mtu: input.mtu,
    };

    // Well-formed chains first.
    let mut bump = Bump { next: BUF_START };
    let mut next_desc = 0u16;
    let mut expected: Vec<Vec<u8>> = Vec::new();
    let mut heads: Vec<u16> = Vec::new();
    let mut bytes = Vec::new();
    let mut frame = Vec::new();
    for c in input.chains.iter().take(usize::from(size).min(16)) {
        let built = c.frame.build(&mut frame);
        corrupt(&mut frame, &c.corruptions, c.truncate);
        let mut hdr = NetHdr {
            flags: c.flags,
            gso_type: c.gso_type,
            hdr_len: c.hdr_len,
            gso_size: c.gso_size,
            csum_start: c.csum_start,
            csum_offset: c.csum_offset,
        };
        if c.auto_hdr && built.headers != 0 {
            hdr.hdr_len = built.headers as u16;
            hdr.csum_start = built.l4 as u16;
            hdr.csum_offset = built.csum_offset as u16;
        }
        bytes.clear();
        bytes.extend_from_slice(&emit_hdr(&hdr, 0)[..params.hdr_len]);
        bytes.extend_from_slice(&frame);
        let Some(at) = bump.alloc(bytes.len(), 1) else {
            break;
        };
        if mem.write_slice(&bytes, GuestAddress(at)).is_err() {
            break;
        }
        let mut cuts: Vec<usize> = c
            .cuts
            .iter()
            .take(7)
            .map(|&x| usize::from(x) % (bytes.len() + 1))
            .collect();
        cuts.push(0);
        cuts.push(bytes.len());
        cuts.sort_unstable();
        cuts.dedup();
        let pieces: Vec<(u64, u32)> = cuts
            .windows(2)
            .map(|w| (at + w[0] as u64, (w[1] - w[0]) as u32))
            .collect();
        let n = pieces.len() as u16;
        let flag_of = |i: usize| {
            let mut f = if c.write_only.map(|w| usize::from(w) % pieces.len()) == Some(i) {
                F_WRITE
            } else {
                0
            };
            if i + 1 < pieces.len() {
                f |= F_NEXT;
            }
            f
        };
        // Each chain gets descriptor slots of its own (no wrap-around).
        let slots = if c.indirect { 1 } else { n };
        if u32::from(next_desc) + u32::from(slots) > u32::from(size) {
            break;
        }
        let head = next_desc;
        if c.indirect {
            let Some(table) = bump.alloc(16 * pieces.len(), 16) else {
                break;
            };
            for (i, &(a, l)) in pieces.iter().enumerate() {
                let d = Descriptor::new(a, l, flag_of(i), i as u16 + 1);
                let _ = mem.write_obj(RawDescriptor::from(d), GuestAddress(table + 16 * i as u64));
            }
            store(
                &mock,
                size,
                head,
                Descriptor::new(table, 16 * u32::from(n), F_INDIRECT, 0),
            );
        } else {
            for (i, &(a, l)) in pieces.iter().enumerate() {
                let idx = next_desc + i as u16;
                store(&mock, size, idx, Descriptor::new(a, l, flag_of(i), idx + 1));
            }
        }
        next_desc += slots;
        push_avail(&mock, size, head);
        heads.push(head);
        expected.push(frame.clone());
    }
    // Then hostile edits.
    for (idx, d) in input.patches.iter().take(16) {
        patch(&mock, size, *idx, d);
    }
    for &h in input.extra_heads.iter().take(8) {
        push_avail(&mock, size, h);
        heads.push(h);
    }
    if let Some(j) = input.avail_jump {
        jump_avail(&mock, j);
    }
    let hand_made = !input.patches.is_empty() || !input.extra_heads.is_empty();
    // With a jumped index the ring holds entries nobody wrote: ids cannot be predicted.
    let known_heads = input.avail_jump.is_none();

    let sw = Switch::new(SwitchConfig::default());
    let me = sw.add_port(PortConfig::default(), Arc::new(Null));
    let cap = Arc::new(Capture {
        buf: Mutex::new(vec![0u8; MAX_FRAME_LEN + 64].into_boxed_slice()),
        got: Mutex::new(Vec::new()),
    });
    sw.add_port(PortConfig::default(), cap.clone());
    let mut batch = sw.new_batch();
    let mut scratch = TxScratch::new();
    let Ok(mut q) = mock.create_queue::<Queue>() else {
        return;
    };
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    let used_idx = || u16::from_le(mem.read_obj::<u16>(GuestAddress(USED_RING + 2)).unwrap());
    let used_elem = |i: u16| {
        let at = USED_RING + 4 + 8 * u64::from(i % size);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    };

    let mut taken = 0usize;
    for _ in 0..=(input.kicks % 4) {
        let used_before = used_idx();
        let stats_before = sw.port_stats(me).unwrap().snapshot();
        let r = process_tx_queue(
            &mem,
            &mut q,
            &sw,
            &mut batch,
            me,
            &params,
            &mut scratch,
            "fuzz",
        );
        let Ok(out) = r else { break };
        let stats = sw.port_stats(me).unwrap().snapshot();
        assert!(out.chains <= TX_BATCH);
        assert!(out.dropped <= out.chains);
        let used = used_idx();
        assert_eq!(
            usize::from(used.wrapping_sub(used_before)),
            out.chains,
            "every chain returned"
        );
        for i in 0..out.chains {
            let (id, len) = used_elem(used_before.wrapping_add(i as u16));
            assert_eq!(len, 0, "TX used length");
            if known_heads {
                let want = heads.get(taken + i).copied();
                assert_eq!(
                    Some(id),
                    want.map(u32::from),
                    "used ids follow the avail ring"
                );
            }
        }
        let rx = (stats.rx_frames - stats_before.rx_frames) as usize;
        assert_eq!(rx, out.chains - out.dropped, "good chains reach the switch");
        assert!(stats.total_drops() - stats_before.total_drops() >= out.dropped as u64);
        taken += out.chains;
        if !out.more {
            break;
        }
    }

    if !hand_made && known_heads {
        // What arrived is the built frames, unchanged and in order, minus the dropped ones.
        let got = cap.got.lock().unwrap();
        let mut want = expected.iter();
        for g in got.iter() {
            assert!(
                want.any(|w| w == g),
                "a delivered frame is not one the guest sent"
            );
        }
    }
});
