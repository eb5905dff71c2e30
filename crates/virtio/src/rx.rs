//! The RX engine: copy frames from other ports straight into this guest's RX buffers.
//!
//! ```text
//!   other port's worker ─► RxSink::deliver(frame, hdr)          (PortSink, any thread)
//!     flow hash ─► queue pair q ─► lock rx[q]
//!       filter (ctrl RX mode) ─► offloads: pass through, or Segmenter::adapt in software
//!       gather chains until they hold hdr + frame (MRG_RXBUF) or one chain (no MRG_RXBUF)
//!       copy header + frame, write used elements  ─── used idx NOT published yet
//!   Switch::end(batch) ─► RxSink::flush() ─► publish used idx once (Release), interrupt once
//! ```
//!
//! Publishing once per batch is not only cheaper: with mergeable buffers Linux reads
//! `num_buffers` and expects all of a frame's used entries to be visible together, so used
//! elements are written by hand into the used ring and the index is published in `flush`.
//! A frame is never partially written: when the ring has too few buffers the chains taken are
//! put back (`set_next_avail`) and the frame is dropped as `NoRxBuffers`.

use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use virtnet_switch::frame::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN};
use virtnet_switch::gso::Segmenter;
use virtnet_switch::{DropReason, Frame, MacAddr, NetHdr, OffloadCaps, PortSink};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::ctrl::RxFilter;
use crate::desc::{self, AvailCursor, Dir, Piece, RegionCache};
use crate::virtio_net::{emit_hdr, Negotiated, MAX_FRAME_LEN};

/// Guest memory as the vhost-user backend sees it.
pub type Gm = GuestMemoryAtomic<GuestMemoryMmap>;
/// The vring type of the backend.
pub type Vring = VringRwLock<Gm>;

/// Errors of the RX engine (the ring itself is unusable).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The used ring cannot be written.
    #[error("Bad used ring")]
    UsedRing(#[source] desc::Error),
}

/// What the RX engine needs to know about the negotiated features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxParams {
    /// `virtio_net_hdr` length (10 or 12).
    pub hdr_len: usize,
    /// Mergeable RX buffers.
    pub mrg: bool,
    /// Offloads the guest accepts.
    pub caps: OffloadCaps,
}

impl RxParams {
    /// Parameters for a negotiated feature set.
    pub fn new(n: &Negotiated) -> Self {
        RxParams {
            hdr_len: n.hdr_len,
            mrg: n.mrg_rxbuf,
            caps: n.rx_caps,
        }
    }
}

impl Default for RxParams {
    fn default() -> Self {
        RxParams::new(&Negotiated::new(0))
    }
}

#[derive(Clone, Copy, Debug)]
struct RxChain {
    head: u16,
    first: usize,
    end: usize,
}

/// The ring side of the engine (split from the segmenter so both can be borrowed).
#[derive(Debug)]
struct RxRing {
    params: RxParams,
    pieces: Vec<Piece>,
    chains: Vec<RxChain>,
    pending: u16,
}

/// One RX queue's engine: queue-level logic with no vhost-user plumbing, driven by tests
/// with `MockSplitQueue` rings and by [`RxSink`] under the queue lock.
#[derive(Debug)]
pub struct RxEngine {
    ring: RxRing,
    seg: Segmenter,
    /// The receive filter (a copy of the control queue's state).
    pub filter: RxFilter,
}

impl RxEngine {
    /// An engine with empty buffers.
    pub fn new(params: RxParams, filter: RxFilter) -> Self {
        RxEngine {
            ring: RxRing {
                params,
                pieces: Vec::with_capacity(256),
                chains: Vec::with_capacity(64),
                pending: 0,
            },
            seg: Segmenter::new(),
            filter,
        }
    }

    /// Change the negotiated parameters.
    pub fn set_params(&mut self, params: RxParams) {
        self.ring.params = params;
    }

    /// Used elements written but not yet published.
    pub fn pending(&self) -> u16 {
        self.ring.pending
    }

    /// Forget unpublished used elements (device reset).
    pub fn reset(&mut self) {
        self.ring.pending = 0;
    }

    /// Deliver one frame into `queue`: filter, adapt offloads, write. Used elements are
    /// written but not published; call [`RxEngine::publish`] once per batch.
    pub fn deliver(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        frame: &dyn Frame,
        hdr: &NetHdr,
    ) -> Result<(), DropReason> {
        if self.filter.active {
            let mut dst = [0u8; 6];
            if frame.read_at(0, &mut dst) == 6 && !self.filter.accepts(&MacAddr(dst)) {
                return Err(DropReason::RxFiltered);
            }
        }
        let caps = self.ring.params.caps;
        let cache = RegionCache::new(mem);
        if caps.accepts(hdr) {
            return self.ring.write_frame(&cache, queue, frame, hdr);
        }
        let ring = &mut self.ring;
        self.seg
            .adapt(frame, hdr, caps, &mut |f, h| {
                ring.write_frame(&cache, queue, f, h)
            })
            .map(|_| ())
    }

    /// Publish pending used elements; returns whether the driver wants an interrupt.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> Result<bool, Error> {
        if self.ring.pending == 0 {
            return Ok(false);
        }
        let count = self.ring.pending;
        self.ring.pending = 0;
        let (old, new) = desc::publish_used(mem, queue, count).map_err(Error::UsedRing)?;
        Ok(desc::should_notify(mem, queue, old, new))
    }
}

impl RxRing {
    fn write_frame(
        &mut self,
        cache: &RegionCache<'_>,
        queue: &mut Queue,
        frame: &dyn Frame,
        hdr: &NetHdr,
    ) -> Result<(), DropReason> {
        let flen = frame.len();
        if flen > MAX_FRAME_LEN {
            return Err(DropReason::FrameTooLong);
        }
        let hdr_len = self.params.hdr_len;
        let mrg = self.params.mrg;
        let need = hdr_len + flen;
        let desc_table = queue.desc_table();
        let size = queue.size();
        let start = queue.next_avail();
        self.chains.clear();
        self.pieces.clear();
        let mut cap = 0usize;
        let mut bad = None;
        {
            let mut avail = AvailCursor::new(cache, queue).map_err(|_| DropReason::Malformed)?;
            while cap < need {
                let Some(head) = avail.next(queue) else { break };
                let first = self.pieces.len();
                match desc::walk_chain_in(
                    cache,
                    desc_table,
                    size,
                    head,
                    Dir::Write,
                    usize::MAX,
                    &mut self.pieces,
                ) {
                    Ok(n) if mrg && n < hdr_len => bad = Some(DropReason::HeaderTruncated),
                    Ok(n) => cap += n,
                    Err(r) => bad = Some(r),
                }
                if bad.is_some() {
                    self.pieces.truncate(first);
                }
                let end = self.pieces.len();
                self.chains.push(RxChain { head, first, end });
                if bad.is_some() || !mrg {
                    break;
                }
            }
        }
        let base = queue.next_used().wrapping_add(self.pending);
        if let Some(reason) = bad {
            // Return every chain taken for this frame, unused, and drop the frame.
            for (k, ch) in self.chains.iter().enumerate() {
                let slot = base.wrapping_add(k as u16);
                desc::write_used_elem_in(cache, queue, slot, ch.head, 0)
                    .map_err(|_| DropReason::Malformed)?;
            }
            self.pending = self.pending.wrapping_add(self.chains.len() as u16);
            return Err(reason);
        }
        if cap < need {
            queue.set_next_avail(start);
            return Err(if mrg || self.chains.is_empty() {
                DropReason::NoRxBuffers
            } else {
                DropReason::RxBufferTooSmall
            });
        }
        // chains.len() <= queue size <= 32768.
        let nb = self.chains.len() as u16;
        let hdr_bytes = emit_hdr(hdr, if mrg { nb } else { 1 });
        let mut hdr_left = &hdr_bytes[..hdr_len];
        let mut foff = 0usize;
        for (k, ch) in self.chains.iter().enumerate() {
            let mut written = 0usize;
            for p in &self.pieces[ch.first..ch.end] {
                if hdr_left.is_empty() && foff >= flen {
                    break;
                }
                let Some(s) = cache.slice(p.addr, p.len as usize) else {
                    break;
                };
                let mut off = 0usize;
                if !hdr_left.is_empty() {
                    let n = hdr_left.len().min(s.len());
                    s.copy_from(&hdr_left[..n]);
                    hdr_left = &hdr_left[n..];
                    off = n;
                }
                if off < s.len() && foff < flen {
                    if let Ok(dst) = s.offset(off) {
                        let n = frame.copy_to_volatile(foff, &dst);
                        foff += n;
                        off += n;
                    }
                }
                written += off;
            }
            let slot = base.wrapping_add(k as u16);
            // written <= chain length <= u32::MAX (descriptor lengths are u32 and the walk
            // stops at the frame size here).
            desc::write_used_elem_in(cache, queue, slot, ch.head, written as u32)
                .map_err(|_| DropReason::Malformed)?;
        }
        self.pending = self.pending.wrapping_add(nb);
        Ok(())
    }
}

/// A flow hash over the L3/L4 addresses (and ports) of a frame, for queue selection.
pub fn flow_hash(frame: &dyn Frame) -> u32 {
    let mut b = [0u8; 64];
    let n = frame.read_at(0, &mut b);
    let b = &b[..n];
    let be16 = |o: usize| b.get(o..o + 2).map(|x| u16::from_be_bytes([x[0], x[1]]));
    let mut off = 14;
    let mut et = be16(12).unwrap_or(0);
    if et == ETHERTYPE_VLAN {
        et = be16(16).unwrap_or(0);
        off = 18;
    }
    let (addrs, l4, proto) = match et {
        ETHERTYPE_IPV4 => {
            let ihl = b.get(off).map(|v| usize::from(v & 0xf) * 4).unwrap_or(0);
            let frag = be16(off + 6).unwrap_or(0) & 0x3fff != 0;
            let proto = if frag {
                0
            } else {
                b.get(off + 9).copied().unwrap_or(0)
            };
            (off + 12..off + 20, off + ihl, proto)
        }
        ETHERTYPE_IPV6 => (
            off + 8..off + 40,
            off + 40,
            b.get(off + 6).copied().unwrap_or(0),
        ),
        _ => (0..12, 0, 0),
    };
    let mut h: u32 = 0x811c_9dc5;
    let mut mix = |x: &[u8]| {
        for &v in x {
            h = (h ^ u32::from(v)).wrapping_mul(0x0100_0193);
        }
    };
    mix(b.get(addrs).unwrap_or(&[]));
    if proto == 6 || proto == 17 {
        mix(b.get(l4..l4 + 4).unwrap_or(&[]));
    }
    h ^ (h >> 16)
}

/// One RX queue of a device: the live vring (while the driver runs it) and the engine.
pub struct RxQueue {
    vring: Option<Vring>,
    mem: Option<Gm>,
    cached: Option<Arc<GuestMemoryMmap>>,
    engine: RxEngine,
}

/// The RX side of a device as a switch port: a [`PortSink`] over its RX queues.
pub struct RxSink {
    name: String,
    queues: Vec<Mutex<RxQueue>>,
    dirty: AtomicU32,
    live: AtomicU32,
    active_pairs: AtomicU16,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RxSink {
    /// A sink with `pairs` RX queues, none live.
    pub fn new(name: &str, pairs: u16, filter: RxFilter) -> Self {
        let queues = (0..pairs)
            .map(|_| {
                Mutex::new(RxQueue {
                    vring: None,
                    mem: None,
                    cached: None,
                    engine: RxEngine::new(RxParams::default(), filter.clone()),
                })
            })
            .collect();
        RxSink {
            name: name.to_string(),
            queues,
            dirty: AtomicU32::new(0),
            live: AtomicU32::new(0),
            active_pairs: AtomicU16::new(0),
        }
    }

    /// Start delivering into RX queue `q` through `vring` (idempotent).
    pub fn attach(&self, q: usize, vring: &Vring, mem: &Gm) {
        let Some(m) = self.queues.get(q) else { return };
        let mut rq = lock(m);
        if rq.vring.is_none() {
            {
                let st = vring.get_ref();
                if !st.get_queue().ready() || !st.is_enabled() {
                    return;
                }
            }
            // We never wait for RX kicks: ask the driver not to send them.
            let _ = vring.disable_notification();
            rq.vring = Some(vring.clone());
            rq.mem = Some(mem.clone());
            rq.cached = None;
            self.live.fetch_or(1 << q, Ordering::SeqCst);
        }
    }

    /// Stop touching RX queue `q`: publish what is pending, then forget the vring.
    pub fn detach(&self, q: usize) {
        let Some(m) = self.queues.get(q) else { return };
        let mut rq = lock(m);
        self.live.fetch_and(!(1 << q), Ordering::SeqCst);
        let RxQueue {
            vring,
            mem,
            cached,
            engine,
        } = &mut *rq;
        if let (Some(v), Some(gm)) = (vring.as_ref(), mem.as_ref()) {
            if engine.pending() > 0 {
                let memory = gm.memory();
                let mut st = v.get_mut();
                if let Ok(true) = engine.publish(&memory, st.get_queue_mut()) {
                    let _ = st.signal_used_queue();
                }
            }
        }
        engine.reset();
        *vring = None;
        *mem = None;
        *cached = None;
    }

    /// Detach every queue (reset, disconnect).
    pub fn detach_all(&self) {
        for q in 0..self.queues.len() {
            self.detach(q);
        }
    }

    /// Set the negotiated parameters on every queue.
    pub fn set_params(&self, p: RxParams) {
        for m in &self.queues {
            lock(m).engine.set_params(p);
        }
    }

    /// Set the receive filter on every queue.
    pub fn set_filter(&self, f: &RxFilter) {
        for m in &self.queues {
            let mut rq = lock(m);
            if rq.engine.filter != *f {
                rq.engine.filter = f.clone();
            }
        }
    }

    /// Spread flows over `n` queue pairs (0: over the RX queues started from queue 0 on).
    pub fn set_active_pairs(&self, n: u16) {
        let n = n.min(self.queues.len() as u16);
        self.active_pairs.store(n, Ordering::Relaxed);
    }

    /// Queue pairs flows are spread over.
    pub fn active_pairs(&self) -> u16 {
        match self.active_pairs.load(Ordering::Relaxed) {
            0 => (self.live.load(Ordering::Relaxed).trailing_ones() as u16).max(1),
            n => n,
        }
    }

    /// Is RX queue 0 live (the driver is running)?
    pub fn is_running(&self) -> bool {
        self.live.load(Ordering::Relaxed) & 1 != 0
    }

    /// The device name (logs).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn deliver_to(&self, q: usize, frame: &dyn Frame, hdr: &NetHdr) -> Result<(), DropReason> {
        let Some(m) = self.queues.get(q) else {
            return Err(DropReason::NotReady);
        };
        let mut guard = lock(m);
        let rq = &mut *guard;
        let Some(vring) = rq.vring.as_ref() else {
            return Err(DropReason::NotReady);
        };
        if rq.cached.is_none() {
            match rq.mem.as_ref() {
                Some(gm) => rq.cached = Some(gm.memory().into_inner()),
                None => return Err(DropReason::NotReady),
            }
        }
        let Some(memory) = rq.cached.as_deref() else {
            return Err(DropReason::NotReady);
        };
        let res = {
            let mut st = vring.get_mut();
            if !st.get_queue().ready() || !st.is_enabled() {
                return Err(DropReason::NotReady);
            }
            rq.engine.deliver(memory, st.get_queue_mut(), frame, hdr)
        };
        if rq.engine.pending() > 0 {
            if res.is_ok() {
                // Frames after the first of a batch find the bit set: skip the atomic RMW.
                // (A concurrent flush clears it before it takes this queue's lock, which we
                // hold, so a set bit here is always followed by a publish of this frame.)
                if self.dirty.load(Ordering::Relaxed) & (1 << q) == 0 {
                    self.dirty.fetch_or(1 << q, Ordering::AcqRel);
                }
            } else {
                // No flush follows a failed delivery: publish what was written now.
                Self::publish_queue(rq);
            }
        }
        if let Err(
            r @ (DropReason::BadAddress
            | DropReason::BadDirection
            | DropReason::ChainLoop
            | DropReason::HeaderTruncated
            | DropReason::Malformed),
        ) = res
        {
            desc::log_drop(&self.name, "rx", r);
        }
        res
    }

    fn publish_queue(rq: &mut RxQueue) {
        let RxQueue {
            vring,
            mem,
            cached,
            engine,
        } = rq;
        if engine.pending() > 0 {
            if let Some(v) = vring.as_ref() {
                let memory = match cached.take() {
                    Some(m) => m,
                    None => match mem.as_ref() {
                        Some(gm) => gm.memory().into_inner(),
                        None => return,
                    },
                };
                let mut st = v.get_mut();
                match engine.publish(&memory, st.get_queue_mut()) {
                    Ok(true) => {
                        let _ = st.signal_used_queue();
                    }
                    Ok(false) => {}
                    Err(e) => {
                        if desc::log_allowed() {
                            log::warn!("rx: {e}");
                        }
                    }
                }
            }
        }
        *cached = None;
    }
}

impl PortSink for RxSink {
    fn deliver(&self, frame: &dyn Frame, hdr: &NetHdr) -> Result<(), DropReason> {
        if self.live.load(Ordering::Acquire) == 0 {
            return Err(DropReason::NotReady);
        }
        let pairs = self.active_pairs();
        let q = if pairs > 1 {
            (flow_hash(frame) % u32::from(pairs)) as usize
        } else {
            0
        };
        match self.deliver_to(q, frame, hdr) {
            // A pair the frontend stopped or disabled: fall back to the first one.
            Err(DropReason::NotReady) if q != 0 => self.deliver_to(0, frame, hdr),
            r => r,
        }
    }

    fn flush(&self) {
        let mut mask = self.dirty.swap(0, Ordering::AcqRel);
        while mask != 0 {
            let q = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            if let Some(m) = self.queues.get(q) {
                Self::publish_queue(&mut lock(m));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::tests::{test_mem, Driver};
    use crate::tx::tests::eth;
    use virtnet_switch::hdr::{FLAG_NEEDS_CSUM, GSO_TCPV4};
    use virtnet_switch::SliceFrame;
    use vm_memory::{Bytes, GuestAddress};

    fn engine(acked: u64) -> RxEngine {
        RxEngine::new(RxParams::new(&Negotiated::new(acked)), RxFilter::new(None))
    }

    fn read(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    use crate::virtio_net::features as f;

    #[test]
    fn single_buffer_and_deferred_publish() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        d.chain(&[(0x10_0000, 2048, true)]);
        let mut q = d.queue();
        let mut e = engine(f::VERSION_1);
        let fr = eth(100, 1, 2);
        e.deliver(&mem, &mut q, &SliceFrame(&fr), &NetHdr::NONE)
            .unwrap();
        assert_eq!(d.used_idx(), 0, "deferred");
        assert_eq!(e.pending(), 1);
        assert!(e.publish(&mem, &mut q).unwrap());
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.used(0), (0, 112));
        let got = read(&mem, 0x10_0000, 112);
        assert_eq!(&got[..10], &[0u8; 10]);
        assert_eq!(&got[10..12], &[1, 0], "num_buffers = 1");
        assert_eq!(&got[12..], &fr[..]);
    }

    #[test]
    fn mergeable_across_three_buffers() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        for i in 0..4u64 {
            d.chain(&[(0x10_0000 + i * 0x1000, 1000, true)]);
        }
        let mut q = d.queue();
        let mut e = engine(f::VERSION_1 | f::MRG_RXBUF);
        let fr = eth(2500, 1, 2);
        e.deliver(&mem, &mut q, &SliceFrame(&fr), &NetHdr::NONE)
            .unwrap();
        e.publish(&mem, &mut q).unwrap();
        assert_eq!(d.used_idx(), 3);
        assert_eq!(d.used(0), (0, 1000));
        assert_eq!(d.used(1), (1, 1000));
        assert_eq!(d.used(2), (2, 512));
        let hdr = read(&mem, 0x10_0000, 12);
        assert_eq!(&hdr[10..12], &[3, 0], "num_buffers = 3");
        let mut all = read(&mem, 0x10_000c, 988);
        all.extend(read(&mem, 0x10_1000, 1000));
        all.extend(read(&mem, 0x10_2000, 512));
        assert_eq!(all, fr);
        assert_eq!(q.next_avail(), 3);
    }

    #[test]
    fn not_enough_buffers_writes_nothing_and_consumes_nothing() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        d.chain(&[(0x10_0000, 1000, true)]);
        d.chain(&[(0x10_1000, 1000, true)]);
        let mut q = d.queue();
        let mut e = engine(f::VERSION_1 | f::MRG_RXBUF);
        mem.write_slice(&[0xee; 16], GuestAddress(0x10_0000))
            .unwrap();
        let fr = eth(3000, 1, 2);
        assert_eq!(
            e.deliver(&mem, &mut q, &SliceFrame(&fr), &NetHdr::NONE),
            Err(DropReason::NoRxBuffers)
        );
        assert_eq!(q.next_avail(), 0, "chains put back");
        assert_eq!(e.pending(), 0);
        assert_eq!(read(&mem, 0x10_0000, 16), vec![0xee; 16], "nothing written");
        // A small frame still fits afterwards.
        e.deliver(&mem, &mut q, &SliceFrame(&eth(60, 1, 2)), &NetHdr::NONE)
            .unwrap();
        // Empty ring.
        let mem2 = test_mem();
        let mut q3 = Driver::new(&mem2, 8).queue();
        assert_eq!(
            e.deliver(&mem2, &mut q3, &SliceFrame(&fr), &NetHdr::NONE),
            Err(DropReason::NoRxBuffers)
        );
    }

    #[test]
    fn too_small_chain_without_mrg() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        d.chain(&[(0x10_0000, 100, true)]);
        let mut q = d.queue();
        let mut e = engine(f::VERSION_1);
        let fr = eth(200, 1, 2);
        assert_eq!(
            e.deliver(&mem, &mut q, &SliceFrame(&fr), &NetHdr::NONE),
            Err(DropReason::RxBufferTooSmall)
        );
        assert_eq!(q.next_avail(), 0);
        assert_eq!(e.pending(), 0);
        // Legacy 10-byte header: 90 bytes of frame fit in 100.
        let mut e = engine(0);
        e.deliver(&mem, &mut q, &SliceFrame(&eth(90, 1, 2)), &NetHdr::NONE)
            .unwrap();
        e.publish(&mem, &mut q).unwrap();
        assert_eq!(d.used(0), (0, 100));
    }

    #[test]
    fn hostile_rx_chain_is_returned_empty() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        d.chain(&[(0x10_0000, 100, false)]); // read-only RX buffer
        d.chain(&[(0x11_0000, 2000, true)]);
        let mut q = d.queue();
        let mut e = engine(f::VERSION_1 | f::MRG_RXBUF);
        let fr = eth(60, 1, 2);
        assert_eq!(
            e.deliver(&mem, &mut q, &SliceFrame(&fr), &NetHdr::NONE),
            Err(DropReason::BadDirection)
        );
        e.deliver(&mem, &mut q, &SliceFrame(&fr), &NetHdr::NONE)
            .unwrap();
        e.publish(&mem, &mut q).unwrap();
        assert_eq!(d.used(0), (0, 0));
        assert_eq!(d.used(1), (1, 72));
    }

    fn tcp4_gso(payload: usize) -> (Vec<u8>, NetHdr) {
        let mut f = vec![0u8; 14 + 20 + 20 + payload];
        f[..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
        f[12] = 0x08;
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        let tot = (20 + 20 + payload) as u16;
        ip[2..4].copy_from_slice(&tot.to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 0, 0, 2]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 1]);
        let tcp = &mut f[34..54];
        tcp[0..2].copy_from_slice(&1234u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[12] = 0x50;
        tcp[13] = 0x18;
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let h = NetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1000,
            csum_start: 34,
            csum_offset: 16,
        };
        (f, h)
    }

    #[test]
    fn gso_passthrough_vs_software() {
        let (fr, h) = tcp4_gso(5000);
        // Passthrough: one 64K-class chain, header intact.
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        d.chain(&[(0x10_0000, 65_600, true)]);
        let mut q = d.queue();
        let mut e =
            engine(f::VERSION_1 | f::MRG_RXBUF | f::GUEST_CSUM | f::GUEST_TSO4 | f::GUEST_TSO6);
        e.deliver(&mem, &mut q, &SliceFrame(&fr), &h).unwrap();
        e.publish(&mem, &mut q).unwrap();
        assert_eq!(d.used_idx(), 1);
        let hb = read(&mem, 0x10_0000, 12);
        assert_eq!(crate::virtio_net::parse_hdr(&hb.try_into().unwrap()), h);
        // Software path: caps none → 5 segments of 1000 bytes payload.
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        for i in 0..8u64 {
            d.chain(&[(0x10_0000 + i * 0x1000, 2048, true)]);
        }
        let mut q = d.queue();
        let mut e = engine(f::VERSION_1 | f::MRG_RXBUF);
        e.deliver(&mem, &mut q, &SliceFrame(&fr), &h).unwrap();
        e.publish(&mem, &mut q).unwrap();
        assert_eq!(d.used_idx(), 5);
        for i in 0..5 {
            assert_eq!(d.used(i).1, 12 + 54 + 1000);
            let hb = read(&mem, 0x10_0000 + u64::from(i) * 0x1000, 12);
            let hdr = crate::virtio_net::parse_hdr(&hb.try_into().unwrap());
            assert!(!hdr.is_gso());
            assert!(!hdr.needs_csum());
        }
    }

    #[test]
    fn filtering() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        d.chain(&[(0x10_0000, 2048, true)]);
        let mut q = d.queue();
        let mut e = engine(f::VERSION_1);
        let mut st = crate::ctrl::CtrlState::new(Some(MacAddr([0x52, 0x54, 0, 0, 0, 1])), 1);
        st.execute(0, 0, &[0]); // PROMISC off
        e.filter = st.filter.clone();
        let other = eth(60, 9, 2);
        assert_eq!(
            e.deliver(&mem, &mut q, &SliceFrame(&other), &NetHdr::NONE),
            Err(DropReason::RxFiltered)
        );
        e.deliver(&mem, &mut q, &SliceFrame(&eth(60, 1, 2)), &NetHdr::NONE)
            .unwrap();
    }

    #[test]
    fn header_split_over_tiny_descriptors() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        d.chain(&[
            (0x10_0000, 4, true),
            (0x10_1000, 4, true),
            (0x10_2000, 6, true),
            (0x10_3000, 200, true),
        ]);
        let mut q = d.queue();
        let mut e = engine(f::VERSION_1 | f::MRG_RXBUF);
        let fr = eth(100, 1, 2);
        e.deliver(&mem, &mut q, &SliceFrame(&fr), &NetHdr::NONE)
            .unwrap();
        e.publish(&mem, &mut q).unwrap();
        assert_eq!(d.used(0), (0, 112));
        let mut got = read(&mem, 0x10_0000, 4);
        got.extend(read(&mem, 0x10_1000, 4));
        got.extend(read(&mem, 0x10_2000, 6));
        got.extend(read(&mem, 0x10_3000, 98));
        assert_eq!(&got[10..12], &[1, 0]);
        assert_eq!(&got[12..], &fr[..]);
    }

    #[test]
    fn bad_avail_idx_and_event_idx_suppression() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        d.chain(&[(0x10_0000, 2048, true)]);
        d.chain(&[(0x10_1000, 2048, true)]);
        let mut q = d.queue();
        q.set_event_idx(true);
        // MockSplitQueue puts the used ring right after avail.ring[], over used_event: move it.
        q.set_used_ring_address(Some(0x8000), Some(0));
        let mut e = engine(f::VERSION_1 | f::RING_EVENT_IDX);
        let fr = eth(60, 1, 2);
        // used_event = 5 (avail ring + 4 + 2 * size): the driver wants no interrupt yet.
        mem.write_obj(
            5u16.to_le(),
            GuestAddress(d.mock.avail_addr().0 + 4 + 2 * 16),
        )
        .unwrap();
        e.deliver(&mem, &mut q, &SliceFrame(&fr), &NetHdr::NONE)
            .unwrap();
        assert!(!e.publish(&mem, &mut q).unwrap(), "suppressed");
        // used_event = 1: crossing it asks for an interrupt.
        mem.write_obj(
            1u16.to_le(),
            GuestAddress(d.mock.avail_addr().0 + 4 + 2 * 16),
        )
        .unwrap();
        e.deliver(&mem, &mut q, &SliceFrame(&fr), &NetHdr::NONE)
            .unwrap();
        assert!(e.publish(&mem, &mut q).unwrap());
        // An avail index far ahead is refused, nothing written.
        d.mock.avail().idx().store(u16::to_le(2 + 1000));
        assert_eq!(
            e.deliver(&mem, &mut q, &SliceFrame(&fr), &NetHdr::NONE),
            Err(DropReason::Malformed)
        );
        assert_eq!(e.pending(), 0);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x8002)).unwrap(), 2);
    }

    #[test]
    fn flow_hash_is_stable_and_spreads() {
        let (a, _) = tcp4_gso(10);
        let mut b = a.clone();
        b[35] = 99; // different source port
        assert_eq!(flow_hash(&SliceFrame(&a)), flow_hash(&SliceFrame(&a)));
        assert_ne!(flow_hash(&SliceFrame(&a)), flow_hash(&SliceFrame(&b)));
        let _ = flow_hash(&SliceFrame(&[0u8; 3]));
    }

    #[test]
    fn sink_is_not_ready_without_a_driver() {
        let s = RxSink::new("t", 2, RxFilter::new(None));
        assert_eq!(
            s.deliver(&SliceFrame(&eth(60, 1, 2)), &NetHdr::NONE),
            Err(DropReason::NotReady)
        );
        s.flush();
        assert!(!s.is_running());
    }
}
