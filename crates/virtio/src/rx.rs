//! The RX engine: copy frames from other ports straight into this guest's RX buffers.
//!
//! ```text
//!   other port's worker ─► RxSink::deliver(frame, hdr)          (PortSink, any thread)
//!     flow hash ─► queue pair q ─► rx[q] locked by this thread? ── no ─► release the queue
//!       │                                 │ yes                        it holds, lock rx[q]
//!       │                                 ▼                            (kept: thread-local)
//!       burst open? ── no ─► vring lock once: ready/enabled, copy the Queue, memory snapshot
//!       filter (ctrl RX mode) ─► offloads: pass through, or Segmenter::adapt in software
//!       first chain one writable descriptor that holds hdr + frame? ─► write them, one used
//!         element (no chain walk: the common case with Linux and DPDK drivers)
//!       else gather chains until they hold hdr + frame (MRG_RXBUF) or one chain (no MRG_RXBUF)
//!         (avail idx read at the burst's first frame, again only when its heads run out)
//!       copy header + frame, write used elements  ─── used idx NOT published yet
//!   switch: next frame for another port ─► RxSink::release() ─► avail position back into
//!                                                                the vring, unlock rx[q]
//!   Switch::end(batch) ─► RxSink::flush() ─► publish used idx once (Release), interrupt once,
//!                                            unlock
//! ```
//!
//! **Runs.** `RxSink::deliver_burst` (the switch's `PortSink::deliver_burst`, a run of frames
//! for this port) does the same with one thread-local lookup, one memory translation set-up
//! and one descriptor table view per sub-run of consecutive frames for one queue (with several
//! queue pairs, frames are grouped by flow hash, in order). Inside a burst whose avail index is
//! known, frames whose next chain is one writable descriptor are written back to back with no
//! per-frame set-up (`RxRing::write_lone_run`); the first frame that needs anything else takes
//! the path above.
//!
//! **Bursts and lock order.** A switch batch delivers to one port after another, usually many
//! frames in a row to the same one. The first delivery of such a run locks the RX queue and the
//! lock is kept, in a thread-local slot, until the switch moves to another port
//! ([`PortSink::release`]) or ends the batch (flush, then release): one queue lock, one vring
//! lock, one memory snapshot and one avail index read per burst instead of per frame. A thread
//! holds at most one RX queue lock at a time, and only between deliveries of one batch; it never
//! waits for another lock while holding it except the vring's own (a leaf lock, held briefly),
//! so two workers delivering into each other's queues at the same time (A's TX into B while
//! B's TX floods into A) cannot deadlock. The control path (`attach`, `detach`, parameters)
//! first releases whatever its own thread holds. While a burst runs, the queue's avail
//! position lives in the burst's copy of the `Queue`; `GET_VRING_BASE` reaches `detach` only
//! after the burst ends, so the frontend always reads the final position.
//!
//! Publishing once per batch is not only cheaper: with mergeable buffers Linux reads
//! `num_buffers` and expects all of a frame's used entries to be visible together, so used
//! elements are written by hand into the used ring and the index is published in `flush`.
//! A frame is never partially written: when the ring has too few buffers the chains taken are
//! put back (`set_next_avail`) and the frame is dropped as `NoRxBuffers`.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;

use parking_lot::{ArcMutexGuard, Mutex, MutexGuard, RawMutex};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use virtnet_switch::frame::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN};
use virtnet_switch::gso::Segmenter;
use virtnet_switch::{DropReason, Frame, MacAddr, NetHdr, OffloadCaps, PortSink};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::ctrl::RxFilter;
use crate::desc::{self, AvailCursor, DescTable, Dir, Piece, RegionCache, UsedRing};
use crate::virtio_net::{emit_hdr, Negotiated, MAX_FRAME_LEN};

/// How many frames ahead of its copy the RX lone-run loop prefetches a buffer for writing.
/// The driver's core owns those lines; a few hundred nanoseconds each when the machine's
/// cores are far apart, so several frames' worth must be in flight at once.
const RX_PREFETCH_AHEAD: usize = 8;

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

/// A queue's descriptor table and used ring, each translated once per delivery call.
#[derive(Clone, Copy, Debug)]
struct Rings<'m> {
    desc: DescTable<'m>,
    used: UsedRing<'m>,
}

impl<'m> Rings<'m> {
    fn new(cache: &RegionCache<'m>, queue: &Queue) -> Self {
        Rings {
            desc: DescTable::new(cache, queue),
            used: UsedRing::new(cache, queue),
        }
    }
}

/// The ring side of the engine (split from the segmenter so both can be borrowed).
#[derive(Debug)]
struct RxRing {
    params: RxParams,
    pieces: Vec<Piece>,
    chains: Vec<RxChain>,
    pending: u16,
    /// Within a burst: the avail index read last (`Some(None)`: not read yet this burst).
    /// Outside a burst (`None`) every frame reads it.
    burst_avail: Option<Option<u16>>,
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
                burst_avail: None,
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
        self.ring.burst_avail = None;
    }

    /// Start a burst: the following deliveries go to the same queue, one after another, so
    /// the avail index is read once and again only when the heads it announced run out.
    pub fn begin_burst(&mut self) {
        self.ring.burst_avail = Some(None);
    }

    /// End a burst: every delivery reads the avail index again.
    pub fn end_burst(&mut self) {
        self.ring.burst_avail = None;
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
        let cache = RegionCache::new(mem);
        let rings = Rings::new(&cache, queue);
        self.deliver_in(&cache, &rings, queue, frame, hdr)
    }

    /// [`RxEngine::deliver`] for a run of frames, in order: `out[i]` gets frame `i`'s result.
    /// Guest memory, the descriptor table and the used ring are looked up once for the run.
    pub fn deliver_burst(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        frames: &[&dyn Frame],
        hdrs: &[NetHdr],
        out: &mut [Result<(), DropReason>],
    ) {
        let cache = RegionCache::new(mem);
        let rings = Rings::new(&cache, queue);
        let n = frames.len().min(hdrs.len()).min(out.len());
        let mut i = 0;
        while i < n {
            if !self.filter.active {
                i += self.ring.write_lone_run(
                    &cache,
                    &rings,
                    queue,
                    &frames[i..n],
                    &hdrs[i..n],
                    &mut out[i..n],
                );
                if i == n {
                    break;
                }
            }
            // The first frame of a burst, and any the run above cannot take.
            out[i] = self.deliver_in(&cache, &rings, queue, frames[i], &hdrs[i]);
            i += 1;
        }
    }

    #[inline]
    fn deliver_in(
        &mut self,
        cache: &RegionCache<'_>,
        rings: &Rings<'_>,
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
        if caps.accepts(hdr) {
            return self.ring.write_frame(cache, rings, queue, frame, hdr);
        }
        let ring = &mut self.ring;
        self.seg
            .adapt(frame, hdr, caps, &mut |f, h| {
                ring.write_frame(cache, rings, queue, f, h)
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

/// The next head for a frame: from the heads known in this burst, and when they ran out, once
/// from a fresh read of the avail index (`fresh` records it; `bad_idx` is set when that index
/// is out of range).
#[inline]
fn next_head(
    avail: &mut desc::AvailCursor<'_, '_>,
    queue: &mut Queue,
    fresh: &mut bool,
    bad_idx: &mut bool,
) -> Option<u16> {
    if let Some(h) = avail.next(queue) {
        return Some(h);
    }
    if *fresh {
        return None;
    }
    *fresh = true;
    if avail.refresh(queue).is_err() {
        *bad_idx = true;
        return None;
    }
    avail.next(queue)
}

impl RxRing {
    fn write_frame(
        &mut self,
        cache: &RegionCache<'_>,
        rings: &Rings<'_>,
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
            let mut avail = match self.burst_avail {
                Some(Some(idx)) => AvailCursor::resume(cache, queue, idx),
                _ => AvailCursor::new(cache, queue),
            }
            .map_err(|_| DropReason::Malformed)?;
            let mut fresh = !matches!(self.burst_avail, Some(Some(_)));
            let mut bad_idx = false;
            let mut first_head = next_head(&mut avail, queue, &mut fresh, &mut bad_idx);
            if let Some(head) = first_head {
                // Fast path: the first chain is one writable descriptor that holds the whole
                // frame (no chain walk, no piece list).
                if let Some(buf) = desc::lone_write_buffer(cache, &rings.desc, head, need) {
                    if self.burst_avail.is_some() {
                        self.burst_avail = Some(Some(avail.idx()));
                    }
                    return self.write_lone(cache, &rings.used, queue, head, &buf, frame, hdr);
                }
            }
            while cap < need {
                let Some(head) = first_head
                    .take()
                    .or_else(|| next_head(&mut avail, queue, &mut fresh, &mut bad_idx))
                else {
                    break;
                };
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
            if self.burst_avail.is_some() {
                self.burst_avail = Some(Some(avail.idx()));
            }
            if bad_idx {
                // The index went bad since the burst began: give back what was taken.
                queue.set_next_avail(start);
                self.burst_avail = self.burst_avail.map(|_| None);
                return Err(DropReason::Malformed);
            }
        }
        let base = queue.next_used().wrapping_add(self.pending);
        if let Some(reason) = bad {
            // Return every chain taken for this frame, unused, and drop the frame.
            for (k, ch) in self.chains.iter().enumerate() {
                let slot = base.wrapping_add(k as u16);
                rings
                    .used
                    .write(cache, queue, slot, ch.head, 0)
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
            rings
                .used
                .write(cache, queue, slot, ch.head, written as u32)
                .map_err(|_| DropReason::Malformed)?;
        }
        self.pending = self.pending.wrapping_add(nb);
        Ok(())
    }

    /// Inside a burst whose avail index is known: write frames while each one's offloads need
    /// no change and its next chain is one writable descriptor that holds it (the common
    /// case), with no per-frame set-up. Returns how many frames it took (`out` has their
    /// results); it stops, leaving the queue where the next frame's chain starts, at the first
    /// frame that needs the general path ([`RxRing::write_frame`]), which decides.
    #[inline]
    fn write_lone_run(
        &mut self,
        cache: &RegionCache<'_>,
        rings: &Rings<'_>,
        queue: &mut Queue,
        frames: &[&dyn Frame],
        hdrs: &[NetHdr],
        out: &mut [Result<(), DropReason>],
    ) -> usize {
        let Some(Some(idx)) = self.burst_avail else {
            return 0;
        };
        let Ok(mut avail) = AvailCursor::resume(cache, queue, idx) else {
            return 0;
        };
        let caps = self.params.caps;
        let hdr_len = self.params.hdr_len;
        // The driver posted these buffers on its own core: ask for the descriptors of the run
        // now, and for each buffer's first lines, for writing, RX_PREFETCH_AHEAD frames ahead
        // of its copy. (Not the used ring's lines: the driver polls those, and taking them
        // early made things worse.)
        let ahead = frames.len().min(usize::from(avail.pending(queue)));
        for k in 0..ahead {
            // k < frames.len() <= MAX_BURST, so the casts are lossless.
            if let Some(h) = avail.peek(queue, k as u16) {
                rings.desc.prefetch_desc(h);
            }
        }
        for (k, f) in frames.iter().enumerate().take(RX_PREFETCH_AHEAD.min(ahead)) {
            if let Some(h) = avail.peek(queue, k as u16) {
                rings
                    .desc
                    .prefetch_buffer(cache, h, hdr_len + f.len(), true);
            }
        }
        let mut done = 0;
        for ((f, h), o) in frames.iter().zip(hdrs).zip(out.iter_mut()) {
            let flen = f.len();
            if flen > MAX_FRAME_LEN || !caps.accepts(h) {
                break;
            }
            if let Some(next) = frames.get(done + RX_PREFETCH_AHEAD) {
                if let Some(h) = avail.peek(queue, RX_PREFETCH_AHEAD as u16) {
                    rings
                        .desc
                        .prefetch_buffer(cache, h, hdr_len + next.len(), true);
                }
            }
            let at = queue.next_avail();
            let Some(head) = avail.next(queue) else {
                break;
            };
            let Some(buf) = desc::lone_write_buffer(cache, &rings.desc, head, hdr_len + flen)
            else {
                queue.set_next_avail(at);
                break;
            };
            *o = self.write_lone(cache, &rings.used, queue, head, &buf, *f, h);
            done += 1;
        }
        done
    }

    /// Write `hdr` and `frame` into `buf`, the first `hdr_len + frame.len()` bytes of the lone
    /// descriptor of the chain at `head` (see [`desc::lone_write_buffer`]), and its used element.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn write_lone(
        &mut self,
        cache: &RegionCache<'_>,
        used: &UsedRing<'_>,
        queue: &Queue,
        head: u16,
        buf: &vm_memory::VolatileSlice<'_>,
        frame: &dyn Frame,
        hdr: &NetHdr,
    ) -> Result<(), DropReason> {
        let hdr_len = self.params.hdr_len;
        let hdr_bytes = emit_hdr(hdr, 1);
        match hdr_len {
            // One unaligned store for the (modern) 12-byte header.
            12 => match vm_memory::VolatileMemory::get_ref::<[u8; 12]>(buf, 0) {
                Ok(r) => r.store(hdr_bytes),
                Err(_) => return Err(DropReason::Malformed),
            },
            _ => match buf.subslice(0, hdr_len) {
                Ok(h) => h.copy_from(&hdr_bytes[..hdr_len]),
                Err(_) => return Err(DropReason::Malformed),
            },
        }
        let Ok(body) = buf.offset(hdr_len) else {
            return Err(DropReason::Malformed);
        };
        let n = frame.copy_to_volatile(0, &body);
        let slot = queue.next_used().wrapping_add(self.pending);
        // n <= buf.len() <= the descriptor's length, a u32.
        used.write(cache, queue, slot, head, (hdr_len + n) as u32)
            .map_err(|_| DropReason::Malformed)?;
        self.pending = self.pending.wrapping_add(1);
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
    engine: RxEngine,
    burst: Option<Burst>,
}

/// A burst in progress: what the deliveries into one queue share between the first delivery
/// and the flush (or release) that ends it. The queue's position is taken from the vring once
/// and handed back once, so the vring's lock is not taken per frame.
struct Burst {
    memory: Arc<GuestMemoryMmap>,
    queue: Queue,
}

impl RxQueue {
    /// Start a burst (no-op when one is going on): check the vring runs, copy its queue.
    fn open_burst(&mut self) -> Result<(), DropReason> {
        if self.burst.is_some() {
            return Ok(());
        }
        let (Some(vring), Some(gm)) = (self.vring.as_ref(), self.mem.as_ref()) else {
            return Err(DropReason::NotReady);
        };
        let state = {
            let st = vring.get_ref();
            if !st.get_queue().ready() || !st.is_enabled() {
                return Err(DropReason::NotReady);
            }
            st.get_queue().state()
        };
        let queue = Queue::try_from(state).map_err(|_| DropReason::NotReady)?;
        self.burst = Some(Burst {
            memory: gm.memory().into_inner(),
            queue,
        });
        self.engine.begin_burst();
        Ok(())
    }

    /// End the burst, if any: hand the avail position back to the vring; with `publish`,
    /// also publish the used elements written (and interrupt if the driver wants one).
    fn close(&mut self, publish: bool) {
        let burst = self.burst.take();
        self.engine.end_burst();
        let publish = publish && self.engine.pending() > 0;
        if burst.is_none() && !publish {
            return;
        }
        let Some(v) = self.vring.as_ref() else { return };
        let mut st = v.get_mut();
        let memory = match burst {
            // Only the avail position moves during a burst: the used index moves here.
            Some(b) => {
                st.get_queue_mut().set_next_avail(b.queue.next_avail());
                b.memory
            }
            None => match self.mem.as_ref() {
                Some(gm) => gm.memory().into_inner(),
                None => return,
            },
        };
        if publish {
            match self.engine.publish(&memory, st.get_queue_mut()) {
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
}

/// The RX queue this thread keeps locked between deliveries (a burst), and which one it is.
struct Open {
    key: usize,
    guard: ArcMutexGuard<RawMutex, RxQueue>,
}

thread_local! {
    /// At most one RX queue (of any device) is kept locked per thread, and only between
    /// deliveries of one switch batch to one port: the switch releases it
    /// ([`PortSink::release`]) before it delivers to another port and when the batch ends,
    /// so a thread never waits for a lock while it holds one of these.
    static OPEN: RefCell<Option<Open>> = const { RefCell::new(None) };
}

/// End the burst this thread keeps open, if any (without publishing: a flush follows), and
/// unlock its queue.
fn release_open() {
    let old = OPEN.with(|o| o.try_borrow_mut().ok().and_then(|mut o| o.take()));
    if let Some(mut o) = old {
        o.guard.close(false);
    }
}

/// The RX side of a device as a switch port: a [`PortSink`] over its RX queues.
///
/// Deliveries of one batch into one queue form a burst: the queue's lock is taken at the first
/// and kept (per thread, see `OPEN`) until the switch flushes or releases the port; the vring's
/// lock, the guest memory snapshot and the avail index are taken once per burst, the used index
/// is published and the driver interrupted at most once per flush.
pub struct RxSink {
    name: String,
    queues: Vec<Arc<Mutex<RxQueue>>>,
    dirty: AtomicU32,
    live: AtomicU32,
    active_pairs: AtomicU16,
}

impl RxSink {
    /// A sink with `pairs` RX queues, none live.
    pub fn new(name: &str, pairs: u16, filter: RxFilter) -> Self {
        let queues = (0..pairs)
            .map(|_| {
                Arc::new(Mutex::new(RxQueue {
                    vring: None,
                    mem: None,
                    engine: RxEngine::new(RxParams::default(), filter.clone()),
                    burst: None,
                }))
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

    /// Lock RX queue `q` for the control path (nothing of this thread stays open).
    fn lock_queue(&self, q: usize) -> Option<MutexGuard<'_, RxQueue>> {
        release_open();
        self.queues.get(q).map(|m| m.lock())
    }

    /// Start delivering into RX queue `q` through `vring` (idempotent).
    pub fn attach(&self, q: usize, vring: &Vring, mem: &Gm) {
        // Called on every TX kick: a live queue is left alone without taking its lock (another
        // worker may hold it for a burst). `detach` clears the bit before it forgets the vring.
        if q < 32 && self.live.load(Ordering::Acquire) & (1 << q) != 0 {
            return;
        }
        let Some(mut rq) = self.lock_queue(q) else {
            return;
        };
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
            rq.burst = None;
            self.live.fetch_or(1 << q, Ordering::SeqCst);
        }
    }

    /// Stop touching RX queue `q`: publish what is pending, then forget the vring.
    pub fn detach(&self, q: usize) {
        let Some(mut rq) = self.lock_queue(q) else {
            return;
        };
        self.live.fetch_and(!(1 << q), Ordering::SeqCst);
        rq.close(true);
        rq.engine.reset();
        rq.vring = None;
        rq.mem = None;
    }

    /// Detach every queue (reset, disconnect).
    pub fn detach_all(&self) {
        for q in 0..self.queues.len() {
            self.detach(q);
        }
    }

    /// Set the negotiated parameters on every queue.
    pub fn set_params(&self, p: RxParams) {
        for q in 0..self.queues.len() {
            if let Some(mut rq) = self.lock_queue(q) {
                rq.engine.set_params(p);
            }
        }
    }

    /// Set the receive filter on every queue.
    pub fn set_filter(&self, f: &RxFilter) {
        for q in 0..self.queues.len() {
            if let Some(mut rq) = self.lock_queue(q) {
                if rq.engine.filter != *f {
                    rq.engine.filter = f.clone();
                }
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
        self.with_open(q, Err(DropReason::NotReady), |rq| {
            self.deliver_locked(q, rq, frame, hdr)
        })
    }

    /// Run `f` on RX queue `q` locked and kept open for this thread's burst (see `OPEN`).
    #[inline]
    fn with_open<R>(&self, q: usize, busy: R, f: impl FnOnce(&mut RxQueue) -> R) -> R {
        let Some(m) = self.queues.get(q) else {
            return busy;
        };
        let key = Arc::as_ptr(m) as usize;
        OPEN.with(|cell| {
            // Never borrowed elsewhere while a delivery runs (deliveries do not nest).
            let Ok(mut open) = cell.try_borrow_mut() else {
                return busy;
            };
            if open.as_ref().is_none_or(|o| o.key != key) {
                // Another queue (of this or another device) first: one lock at a time.
                if let Some(mut old) = open.take() {
                    old.guard.close(false);
                }
                *open = Some(Open {
                    key,
                    guard: m.lock_arc(),
                });
            }
            match open.as_mut() {
                Some(o) => f(&mut o.guard),
                None => busy,
            }
        })
    }

    /// Mark queue `q` for the next flush (after a delivery that left used elements pending).
    #[inline]
    fn mark_dirty(&self, q: usize) {
        // Frames after the first of a batch find the bit set: skip the atomic RMW.
        // (A concurrent flush clears it before it takes this queue's lock, which we
        // hold, so a set bit here is always followed by a publish of this frame.)
        if self.dirty.load(Ordering::Relaxed) & (1 << q) == 0 {
            self.dirty.fetch_or(1 << q, Ordering::AcqRel);
        }
    }

    fn log_hostile(&self, res: &Result<(), DropReason>) {
        if let Err(
            r @ (DropReason::BadAddress
            | DropReason::BadDirection
            | DropReason::ChainLoop
            | DropReason::HeaderTruncated
            | DropReason::Malformed),
        ) = *res
        {
            desc::log_drop(&self.name, "rx", r);
        }
    }

    /// A run of frames into queue `q`; false (every frame `NotReady`) when the queue does
    /// not run.
    fn deliver_run(
        &self,
        q: usize,
        frames: &[&dyn Frame],
        hdrs: &[NetHdr],
        out: &mut [Result<(), DropReason>],
    ) -> bool {
        let ran = self.with_open(q, false, |rq| {
            self.deliver_burst_locked(q, rq, frames, hdrs, out)
        });
        if !ran {
            out.fill(Err(DropReason::NotReady));
        }
        ran
    }

    /// A run of frames into queue `q`, locked; false when the queue does not run.
    fn deliver_burst_locked(
        &self,
        q: usize,
        rq: &mut RxQueue,
        frames: &[&dyn Frame],
        hdrs: &[NetHdr],
        out: &mut [Result<(), DropReason>],
    ) -> bool {
        if rq.open_burst().is_err() {
            return false;
        }
        let RxQueue { burst, engine, .. } = rq;
        let Some(b) = burst.as_mut() else {
            return false;
        };
        engine.deliver_burst(&b.memory, &mut b.queue, frames, hdrs, out);
        if rq.engine.pending() > 0 {
            if out.iter().any(Result::is_ok) {
                self.mark_dirty(q);
            } else {
                // No flush follows when nothing was delivered: publish what was written now.
                rq.close(true);
            }
        }
        for r in out.iter() {
            self.log_hostile(r);
        }
        true
    }

    fn deliver_locked(
        &self,
        q: usize,
        rq: &mut RxQueue,
        frame: &dyn Frame,
        hdr: &NetHdr,
    ) -> Result<(), DropReason> {
        rq.open_burst()?;
        let RxQueue { burst, engine, .. } = rq;
        let Some(b) = burst.as_mut() else {
            return Err(DropReason::NotReady);
        };
        let res = engine.deliver(&b.memory, &mut b.queue, frame, hdr);
        if rq.engine.pending() > 0 {
            if res.is_ok() {
                self.mark_dirty(q);
            } else {
                // No flush follows a failed delivery: publish what was written now.
                rq.close(true);
            }
        }
        self.log_hostile(&res);
        res
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

    fn deliver_burst(
        &self,
        frames: &[&dyn Frame],
        hdrs: &[NetHdr],
        out: &mut [Result<(), DropReason>],
    ) {
        if self.live.load(Ordering::Acquire) == 0 {
            out.fill(Err(DropReason::NotReady));
            return;
        }
        let n = frames.len().min(hdrs.len()).min(out.len());
        let pairs = self.active_pairs();
        if pairs <= 1 {
            self.deliver_run(0, &frames[..n], &hdrs[..n], &mut out[..n]);
            return;
        }
        // Spread over the queue pairs by flow: consecutive frames of one flow (the usual
        // run) go to their queue together.
        let queue_of = |f: &dyn Frame| (flow_hash(f) % u32::from(pairs)) as usize;
        let mut start = 0;
        let mut next_q = frames.first().map_or(0, |f| queue_of(*f));
        while start < n {
            let q = next_q;
            let mut end = start + 1;
            while end < n {
                next_q = queue_of(frames[end]);
                if next_q != q {
                    break;
                }
                end += 1;
            }
            let (f, h, o) = (&frames[start..end], &hdrs[start..end], &mut out[start..end]);
            if !self.deliver_run(q, f, h, o) && q != 0 {
                // A pair the frontend stopped or disabled: fall back to the first one.
                self.deliver_run(0, f, h, o);
            }
            start = end;
        }
    }

    fn flush(&self) {
        let mut mask = self.dirty.swap(0, Ordering::AcqRel);
        while mask != 0 {
            let q = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let Some(m) = self.queues.get(q) else {
                continue;
            };
            let key = Arc::as_ptr(m) as usize;
            // This thread's open burst on this queue: publish under the lock it holds.
            let mine = OPEN.with(|c| {
                let mut o = c.try_borrow_mut().ok()?;
                if o.as_ref()?.key == key {
                    o.take()
                } else {
                    None
                }
            });
            match mine {
                Some(mut o) => o.guard.close(true),
                None => {
                    release_open();
                    m.lock().close(true);
                }
            }
        }
    }

    fn release(&self) {
        release_open();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::tests::{test_mem, Driver};
    use crate::tx::tests::eth;
    use vhost_user_backend::VringT;
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
    fn lone_buffers_and_walked_chains_agree() {
        // The same frames into one-descriptor buffers (the fast path) and into the same
        // buffers cut in two descriptors (the chain walk), within a burst: same bytes, same
        // used elements, same positions.
        let frames = [eth(60, 1, 2), eth(1514, 3, 4), eth(300, 5, 6)];
        let mut out = Vec::new();
        for split in [false, true] {
            let mem = test_mem();
            let mut d = Driver::new(&mem, 16);
            for i in 0..4u64 {
                let at = 0x10_0000 + i * 0x1000;
                if split {
                    d.chain(&[(at, 7, true), (at + 7, 2041, true)]);
                } else {
                    d.chain(&[(at, 2048, true)]);
                }
            }
            let mut q = d.queue();
            let mut e = engine(f::VERSION_1 | f::MRG_RXBUF);
            e.begin_burst();
            for fr in &frames {
                e.deliver(&mem, &mut q, &SliceFrame(fr), &NetHdr::NONE)
                    .unwrap();
            }
            e.end_burst();
            assert!(e.publish(&mem, &mut q).unwrap());
            assert_eq!((d.used_idx(), q.next_avail()), (3, 3));
            // Heads differ (a split buffer takes two descriptors); the lengths must not.
            let heads: Vec<_> = (0..3).map(|k| d.used(k).0).collect();
            assert_eq!(heads, if split { [0, 2, 4] } else { [0, 1, 2] });
            let used: Vec<_> = (0..3).map(|k| d.used(k).1).collect();
            assert_eq!(used, [72, 1526, 312]);
            let bytes: Vec<_> = (0..3u64)
                .map(|k| read(&mem, 0x10_0000 + k * 0x1000, 12 + frames[k as usize].len()))
                .collect();
            for (b, fr) in bytes.iter().zip(&frames) {
                assert_eq!(&b[10..12], &[1, 0], "num_buffers = 1");
                assert_eq!(&b[12..], &fr[..]);
            }
            out.push((used, bytes));
        }
        assert!(out[0] == out[1], "the fast path and the chain walk differ");
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

    /// A sink of `pairs` queue pairs whose driver acked VERSION_1 and MRG_RXBUF.
    fn mrg_sink(pairs: u16) -> RxSink {
        let s = RxSink::new("t", pairs, RxFilter::new(None));
        s.set_params(RxParams::new(&Negotiated::new(f::VERSION_1 | f::MRG_RXBUF)));
        s
    }

    fn as_frames<'a>(views: &'a [SliceFrame<'_>]) -> Vec<&'a dyn Frame> {
        views.iter().map(|f| f as &dyn Frame).collect()
    }

    /// A live vring over `d`'s queue, as the vhost-user handler would set it up.
    fn live_vring(gm: &Gm, d: &Driver<'_>, size: u16) -> Vring {
        let q = d.queue();
        let v = <Vring as VringT<Gm>>::new(gm.clone(), size).unwrap();
        v.set_queue_size(size);
        v.set_queue_info(q.desc_table(), q.avail_ring(), q.used_ring())
            .unwrap();
        v.set_queue_ready(true);
        v.set_enabled(true);
        v
    }

    #[test]
    fn sink_bursts_publish_once_and_release_lets_others_in() {
        let mem = test_mem();
        let gm = GuestMemoryAtomic::new(mem.clone());
        let mut d = Driver::new(&mem, 16);
        for i in 0..8u64 {
            d.chain(&[(0x10_0000 + i * 0x1000, 2048, true)]);
        }
        let vring = live_vring(&gm, &d, 16);
        let s = Arc::new(mrg_sink(1));
        s.attach(0, &vring, &gm);
        assert!(s.is_running());
        // A burst of three: written, but neither the used index nor the vring's avail
        // position moves until the flush.
        for i in 0..3 {
            s.deliver(&SliceFrame(&eth(60 + i, 1, 2)), &NetHdr::NONE)
                .unwrap();
        }
        assert_eq!(d.used_idx(), 0);
        assert_eq!(vring.queue_next_avail(), 0, "held by the burst");
        s.flush();
        assert_eq!(d.used_idx(), 3);
        assert_eq!(vring.queue_next_avail(), 3);
        assert_eq!(d.used(2), (2, 12 + 62));
        // This thread opens a burst; another thread's delivery waits for the release.
        s.deliver(&SliceFrame(&eth(100, 1, 2)), &NetHdr::NONE)
            .unwrap();
        let (s2, done) = (s.clone(), Arc::new(AtomicU32::new(0)));
        let done2 = done.clone();
        let t = std::thread::spawn(move || {
            s2.deliver(&SliceFrame(&eth(101, 1, 2)), &NetHdr::NONE)
                .unwrap();
            done2.store(1, Ordering::SeqCst);
            s2.flush();
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            done.load(Ordering::SeqCst),
            0,
            "the queue is locked by the burst"
        );
        s.release();
        t.join().unwrap();
        assert_eq!(done.load(Ordering::SeqCst), 1);
        // The other thread's flush published both frames, in order.
        assert_eq!(d.used_idx(), 5);
        assert_eq!(d.used(3), (3, 112));
        assert_eq!(d.used(4), (4, 113));
        // The control path on the thread that holds a burst does not deadlock: detach
        // releases it and publishes what was written.
        s.deliver(&SliceFrame(&eth(60, 1, 2)), &NetHdr::NONE)
            .unwrap();
        s.detach(0);
        assert_eq!(d.used_idx(), 6);
        assert_eq!(vring.queue_next_avail(), 6);
        assert!(!s.is_running());
        assert_eq!(
            s.deliver(&SliceFrame(&eth(60, 1, 2)), &NetHdr::NONE),
            Err(DropReason::NotReady)
        );
    }

    #[test]
    fn burst_looks_again_for_buffers_when_the_known_ones_run_out() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        d.chain(&[(0x10_0000, 2048, true)]);
        let mut q = d.queue();
        let mut e = engine(f::VERSION_1 | f::MRG_RXBUF);
        e.begin_burst();
        e.deliver(&mem, &mut q, &SliceFrame(&eth(60, 1, 2)), &NetHdr::NONE)
            .unwrap();
        // More buffers arrive during the burst: found when the known ones run out.
        d.chain(&[(0x10_1000, 2048, true)]);
        e.deliver(&mem, &mut q, &SliceFrame(&eth(60, 1, 2)), &NetHdr::NONE)
            .unwrap();
        assert_eq!(
            e.deliver(&mem, &mut q, &SliceFrame(&eth(60, 1, 2)), &NetHdr::NONE),
            Err(DropReason::NoRxBuffers)
        );
        // A bogus index seen in the middle of a burst: nothing taken, nothing written.
        d.chain(&[(0x10_2000, 2048, true)]);
        d.mock.avail().idx().store(u16::to_le(3 + 1000));
        assert_eq!(
            e.deliver(&mem, &mut q, &SliceFrame(&eth(60, 1, 2)), &NetHdr::NONE),
            Err(DropReason::Malformed)
        );
        assert_eq!(q.next_avail(), 2);
        e.end_burst();
        e.publish(&mem, &mut q).unwrap();
        assert_eq!(d.used_idx(), 2);
    }

    #[test]
    fn sink_burst_writes_in_order_and_reports_each_frame() {
        let mem = test_mem();
        let gm = GuestMemoryAtomic::new(mem.clone());
        let mut d = Driver::new(&mem, 16);
        // Four buffers: three lone descriptors and one chain of two (the walked path).
        for i in 0..3u64 {
            d.chain(&[(0x10_0000 + i * 0x1000, 2048, true)]);
        }
        d.chain(&[(0x10_3000, 40, true), (0x10_4000, 2048, true)]);
        let vring = live_vring(&gm, &d, 16);
        let s = mrg_sink(1);
        s.attach(0, &vring, &gm);
        let frames: Vec<Vec<u8>> = (0..6).map(|i| eth(60 + i, 1, 2)).collect();
        let views: Vec<SliceFrame<'_>> = frames.iter().map(|f| SliceFrame(f)).collect();
        let refs = as_frames(&views);
        let hdrs = vec![NetHdr::NONE; 6];
        let mut out = vec![Ok(()); 6];
        s.deliver_burst(&refs, &hdrs, &mut out);
        // Four fit; the rest find no buffers. Nothing is published before the flush.
        assert_eq!(
            out,
            [
                Ok(()),
                Ok(()),
                Ok(()),
                Ok(()),
                Err(DropReason::NoRxBuffers),
                Err(DropReason::NoRxBuffers)
            ]
        );
        assert_eq!(d.used_idx(), 0);
        s.flush();
        assert_eq!(d.used_idx(), 4);
        for i in 0..4u16 {
            assert_eq!(d.used(i), (u32::from(i), 12 + 60 + u32::from(i)));
        }
        assert_eq!(read(&mem, 0x10_2000 + 12, 62), frames[2]);
        let mut tail = read(&mem, 0x10_3000 + 12, 28);
        tail.extend(read(&mem, 0x10_4000, 63 - 28));
        assert_eq!(tail, frames[3], "split over the walked chain");
        // A burst that delivers nothing but took a hostile chain publishes it at once (no
        // flush follows), returned empty.
        d.put(9, 0x10_5000, 2048, 0, 0); // readable: wrong direction for RX
        d.avail(9);
        out.fill(Ok(()));
        s.deliver_burst(&refs[..2], &hdrs[..2], &mut out[..2]);
        assert_eq!(out[0], Err(DropReason::BadDirection));
        assert_eq!(out[1], Err(DropReason::NoRxBuffers));
        assert_eq!(d.used_idx(), 5);
        assert_eq!(d.used(4), (9, 0));
        s.release();
        // Without a driver every frame is NotReady.
        s.detach(0);
        out.fill(Ok(()));
        s.deliver_burst(&refs, &hdrs, &mut out);
        assert!(out.iter().all(|r| *r == Err(DropReason::NotReady)));
    }

    #[test]
    fn sink_burst_spreads_flows_over_pairs_in_order() {
        let mem = test_mem();
        let gm = GuestMemoryAtomic::new(mem.clone());
        // The mock's used ring starts inside the avail ring (over its second half): 32
        // entries keep the 12 avail slots used here clear of it.
        let mut d0 = Driver::new(&mem, 32);
        let mut d1 = Driver::at(&mem, 0x8_0000, 16);
        for i in 0..12u64 {
            d0.chain(&[(0x10_0000 + i * 0x1000, 2048, true)]);
        }
        for i in 0..6u64 {
            d1.chain(&[(0x20_0000 + i * 0x1000, 2048, true)]);
        }
        let (v0, v1) = (live_vring(&gm, &d0, 32), live_vring(&gm, &d1, 16));
        let s = mrg_sink(2);
        s.set_active_pairs(2);
        // Six TCP frames of flows (source ports) that hash to both queues; byte 60 numbers
        // them.
        let (base, _) = tcp4_gso(10);
        let frames: Vec<Vec<u8>> = (0..6u8)
            .map(|i| {
                let mut f = base.clone();
                f[35] = [1, 1, 2, 3, 3, 1][usize::from(i)];
                f[60] = i;
                f
            })
            .collect();
        let queue: Vec<usize> = frames
            .iter()
            .map(|f| (flow_hash(&SliceFrame(f)) % 2) as usize)
            .collect();
        assert!(queue.contains(&0) && queue.contains(&1), "{queue:?}");
        let views: Vec<SliceFrame<'_>> = frames.iter().map(|f| SliceFrame(f)).collect();
        let refs = as_frames(&views);
        let hdrs = vec![NetHdr::NONE; 6];
        let mut out = vec![Err(DropReason::Malformed); 6];
        // Only queue 0 runs: every flow falls back to it, in order.
        s.attach(0, &v0, &gm);
        s.deliver_burst(&refs, &hdrs, &mut out);
        assert!(out.iter().all(Result::is_ok), "{out:?}");
        s.flush();
        s.release();
        assert_eq!(d0.used_idx(), 6);
        for i in 0..6u64 {
            assert_eq!(read(&mem, 0x10_0000 + i * 0x1000 + 12 + 60, 1), [i as u8]);
        }
        // Both run: each frame goes to its flow's queue, each queue in order.
        s.attach(1, &v1, &gm);
        out.fill(Err(DropReason::Malformed));
        s.deliver_burst(&refs, &hdrs, &mut out);
        assert!(out.iter().all(Result::is_ok), "{out:?}");
        s.flush();
        s.release();
        let on =
            |q: usize| -> Vec<u8> { (0..6u8).filter(|&i| queue[usize::from(i)] == q).collect() };
        assert_eq!(d0.used_idx() - 6, on(0).len() as u16);
        assert_eq!(d1.used_idx(), on(1).len() as u16);
        for (k, i) in on(0).into_iter().enumerate() {
            assert_eq!(read(&mem, 0x10_6000 + k as u64 * 0x1000 + 12 + 60, 1), [i]);
        }
        for (k, i) in on(1).into_iter().enumerate() {
            assert_eq!(read(&mem, 0x20_0000 + k as u64 * 0x1000 + 12 + 60, 1), [i]);
        }
    }
}
