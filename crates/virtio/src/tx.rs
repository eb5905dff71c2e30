//! The TX engine: drain a batch of guest TX chains into the switch.
//!
//! ```text
//!   kick ─► RegionCache, DescTable (once) ─► avail idx read once, ≤ TX_BATCH heads
//!           for each head:
//!             one readable descriptor? ─► Segs of one view, no walk (the common case)
//!             else walk chain once (readable only, ≤ hdr + 65562 bytes) ─► Segs (≤ MAX_SEGS
//!               VolatileSlices, on the stack; longer chains: walk again into pieces)
//!             header: one load of hdr_len bytes ─► NetHdr, validate offload metadata
//!             one range: its SegFrame joins the burst (stack arrays, ≤ TX_BATCH frames)
//!             else: Switch::forward_burst(the burst so far), then Switch::forward(this frame)
//!             write the used element (len 0)
//!           Switch::forward_burst(the burst) ─► RxSink::deliver_burst per destination run
//!           publish used idx once ─► Switch::end(batch)
//!           ─► interrupt if the driver wants one (EVENT_IDX / NO_INTERRUPT)
//! ```
//!
//! The frame is never copied here: the destination copies straight out of our guest's memory
//! during `forward`. A bad chain is counted as a drop on this port and still returned to the
//! used ring (len 0) so the guest does not leak descriptors.

use virtio_queue::{Queue, QueueT};
use virtnet_switch::hdr::{GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6};
use virtnet_switch::{DropReason, Frame, NetHdr, PortId, Switch, TxBatch};
use vm_memory::GuestMemoryMmap;

use crate::desc::{self, DescTable, Dir, GuestFrame, Piece, RegionCache, SegFrame, Segs, UsedRing};
use crate::virtio_net::{parse_hdr, Negotiated, MAX_FRAME_LEN};

/// How many frames ahead the TX loop prefetches a frame's first bytes.
const PREFETCH_AHEAD: usize = 4;
/// How many bytes of a frame the TX loop prefetches (after the virtio header): the Ethernet
/// header the switch routes on, and all of a small frame.
const PREFETCH_SPAN: usize = 64;

/// Most chains handled per batch.
pub const TX_BATCH: usize = 64;

/// Errors of the TX engine (the ring itself is unusable; chains never cause these).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The avail ring cannot be read or its index is more than a queue ahead.
    #[error("Bad avail ring")]
    AvailRing(#[source] virtio_queue::Error),
    /// The used ring cannot be written.
    #[error("Bad used ring")]
    UsedRing(#[source] desc::Error),
}

/// Result of the TX engine.
pub type Result<T> = std::result::Result<T, Error>;

/// What the TX engine needs to know about the negotiated features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxParams {
    /// `virtio_net_hdr` length (10 or 12).
    pub hdr_len: usize,
    /// `NEEDS_CSUM` allowed (CSUM).
    pub csum: bool,
    /// TCPv4 GSO allowed (HOST_TSO4).
    pub tso4: bool,
    /// TCPv6 GSO allowed (HOST_TSO6).
    pub tso6: bool,
    /// ECN GSO allowed (HOST_ECN).
    pub ecn: bool,
    /// The device MTU: non-GSO frames longer than `mtu + 18` are dropped.
    pub mtu: u16,
}

impl TxParams {
    /// Parameters for a negotiated feature set and MTU.
    pub fn new(n: &Negotiated, mtu: u16) -> Self {
        TxParams {
            hdr_len: n.hdr_len,
            csum: n.tx_csum,
            tso4: n.tx_tso4,
            tso6: n.tx_tso6,
            ecn: n.tx_ecn,
            mtu,
        }
    }
}

/// Per-worker buffers reused for every batch (no per-frame allocation).
#[derive(Debug, Default)]
pub struct TxScratch {
    heads: Vec<u16>,
    pieces: Vec<Piece>,
}

impl TxScratch {
    /// Buffers sized for a batch.
    pub fn new() -> Self {
        TxScratch {
            heads: Vec::with_capacity(TX_BATCH),
            pieces: Vec::with_capacity(256),
        }
    }
}

/// What one call to [`process_tx_queue`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxOutcome {
    /// Chains taken from the avail ring (good and bad).
    pub chains: usize,
    /// Chains dropped as malformed.
    pub dropped: usize,
    /// The driver wants an interrupt for this batch.
    pub notify: bool,
    /// More chains were available than the batch took.
    pub more: bool,
}

/// Validate one TX chain and return its header and frame length; `pieces` gets its ranges.
pub fn parse_tx_chain(
    mem: &GuestMemoryMmap,
    queue: &Queue,
    head: u16,
    p: &TxParams,
    pieces: &mut Vec<Piece>,
) -> std::result::Result<(NetHdr, usize), DropReason> {
    parse_tx_chain_in(&RegionCache::new(mem), queue, head, p, pieces)
}

/// [`parse_tx_chain`] with a [`RegionCache`] built by the caller (once per batch).
pub fn parse_tx_chain_in(
    cache: &RegionCache<'_>,
    queue: &Queue,
    head: u16,
    p: &TxParams,
    pieces: &mut Vec<Piece>,
) -> std::result::Result<(NetHdr, usize), DropReason> {
    pieces.clear();
    let total = desc::walk_chain_in(
        cache,
        queue.desc_table(),
        queue.size(),
        head,
        Dir::Read,
        p.hdr_len + MAX_FRAME_LEN,
        pieces,
    )?;
    if total < p.hdr_len || total == 0 {
        return Err(DropReason::HeaderTruncated);
    }
    let mut raw = [0u8; 12];
    if desc::read_pieces_in(cache, pieces, 0, &mut raw[..p.hdr_len]) != p.hdr_len {
        return Err(DropReason::HeaderTruncated);
    }
    let len = total - p.hdr_len;
    check_hdr(&raw, len, p).map(|hdr| (hdr, len))
}

/// [`parse_tx_chain_in`] in one walk: the chain's ranges are collected as guest memory views
/// into `segs`, and the header is read from them. Returns the header (the frame is
/// `segs.frame_after(p.hdr_len)`), or `Ok(None)` when the chain has more than
/// [`desc::MAX_SEGS`] ranges (then use [`parse_tx_chain_in`]). Same checks, same order, same
/// drop reasons as [`parse_tx_chain_in`].
#[inline]
pub fn parse_tx_segs<'m>(
    cache: &RegionCache<'m>,
    table: &DescTable<'m>,
    head: u16,
    p: &TxParams,
    segs: &mut Segs<'m>,
) -> std::result::Result<Option<NetHdr>, DropReason> {
    let max = p.hdr_len + MAX_FRAME_LEN;
    let total = match desc::lone_read_segs(cache, table, head, max, segs) {
        Some(t) => t,
        None => match desc::walk_chain_segs(cache, table, head, Dir::Read, max, segs)? {
            Some(t) => t,
            None => return Ok(None),
        },
    };
    if total < p.hdr_len || total == 0 {
        return Err(DropReason::HeaderTruncated);
    }
    let mut raw = [0u8; 12];
    match p.hdr_len {
        12 => {
            raw = segs
                .read_prefix::<12>()
                .ok_or(DropReason::HeaderTruncated)?
        }
        10 => {
            let b = segs
                .read_prefix::<10>()
                .ok_or(DropReason::HeaderTruncated)?;
            raw[..10].copy_from_slice(&b);
        }
        n => {
            let f = segs.frame_after(0);
            let dst = raw.get_mut(..n).ok_or(DropReason::HeaderTruncated)?;
            if f.read_at(0, dst) != n {
                return Err(DropReason::HeaderTruncated);
            }
        }
    }
    check_hdr(&raw, total - p.hdr_len, p).map(Some)
}

/// Parse a TX header and check it against the frame length `len` and what was negotiated.
#[inline]
fn check_hdr(raw: &[u8; 12], len: usize, p: &TxParams) -> std::result::Result<NetHdr, DropReason> {
    let mut hdr = parse_hdr(raw);
    // DATA_VALID is an RX-only flag; drivers must not set it on TX.
    hdr.flags &= virtnet_switch::hdr::FLAG_NEEDS_CSUM;
    validate_offload(&hdr, len, p)?;
    if !hdr.is_gso() && len > usize::from(p.mtu) + 18 {
        return Err(DropReason::FrameTooLong);
    }
    Ok(hdr)
}

/// Check guest GSO/checksum metadata against what was negotiated and the frame length.
pub fn validate_offload(
    hdr: &NetHdr,
    len: usize,
    p: &TxParams,
) -> std::result::Result<(), DropReason> {
    if hdr.needs_csum() {
        if !p.csum {
            return Err(DropReason::BadOffload);
        }
        let end = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2;
        if end > len {
            return Err(DropReason::BadOffload);
        }
    }
    if hdr.gso_type & GSO_ECN != 0 && !p.ecn {
        return Err(DropReason::BadOffload);
    }
    match hdr.gso_kind() {
        GSO_NONE => {
            if hdr.gso_type != GSO_NONE {
                return Err(DropReason::BadOffload); // ECN flag without GSO
            }
            return Ok(());
        }
        GSO_TCPV4 if p.tso4 => {}
        GSO_TCPV6 if p.tso6 => {}
        _ => return Err(DropReason::BadOffload),
    }
    // GSO: the spec requires NEEDS_CSUM and a segment size.
    if hdr.gso_size == 0 || !hdr.needs_csum() {
        return Err(DropReason::BadOffload);
    }
    Ok(())
}

/// Drain up to [`TX_BATCH`] chains from a TX `queue` into `switch` as port `port`.
///
/// This is the whole TX data path minus the vhost-user plumbing (locks, eventfds), so tests
/// and fuzz targets can drive it with `MockSplitQueue`-built rings. Bad chains are counted via
/// `Switch::count_drop` on `port`. Calls `Switch::begin` and `Switch::end` on `batch`.
/// The caller signals the guest when `notify` is set.
#[allow(clippy::too_many_arguments)]
pub fn process_tx_queue(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    switch: &Switch,
    batch: &mut TxBatch,
    port: PortId,
    params: &TxParams,
    scratch: &mut TxScratch,
    name: &str,
) -> Result<TxOutcome> {
    let mut out = TxOutcome::default();
    let cache = RegionCache::new(mem);
    scratch.heads.clear();
    // The avail index is read once for the batch, then the entries.
    out.more =
        desc::pop_avail(&cache, queue, TX_BATCH, &mut scratch.heads).map_err(Error::AvailRing)?;
    if scratch.heads.is_empty() {
        return Ok(out);
    }
    switch.begin(batch);
    let base = queue.next_used();
    let mut result = Ok(());
    // Filled anew by each chain: one walk, each range translated once.
    let mut segs = Segs::new();
    let table = DescTable::new(&cache, queue);
    let used = UsedRing::new(&cache, queue);
    // The driver wrote these descriptors and frames on another core: start loading them all
    // now, and each frame's first bytes PREFETCH_AHEAD frames ahead of its turn.
    for &h in &scratch.heads {
        table.prefetch_desc(h);
    }
    let span = params.hdr_len + PREFETCH_SPAN;
    for &h in scratch.heads.iter().take(PREFETCH_AHEAD) {
        table.prefetch_buffer(&cache, h, span, false);
    }
    // Frames of one descriptor each (the common case) wait here and go to the switch as one
    // burst; any other frame sends the burst first, so the order is kept.
    let mut burst = [SegFrame::empty(); TX_BATCH];
    let mut hdrs = [NetHdr::NONE; TX_BATCH];
    let mut n = 0usize;
    for (i, &head) in scratch.heads.iter().enumerate() {
        if let Some(&ahead) = scratch.heads.get(i + PREFETCH_AHEAD) {
            table.prefetch_buffer(&cache, ahead, span, false);
        }
        let parsed = match parse_tx_segs(&cache, &table, head, params, &mut segs) {
            Ok(Some(hdr)) => {
                match (segs.lone_frame_after(params.hdr_len), burst.get_mut(n)) {
                    (Some(f), Some(slot)) => {
                        *slot = f;
                        hdrs[n] = hdr;
                        n += 1;
                    }
                    _ => {
                        switch.forward_burst(batch, port, &burst[..n], &hdrs[..n]);
                        n = 0;
                        switch.forward(batch, port, &segs.frame_after(params.hdr_len), &hdr);
                    }
                }
                Ok(())
            }
            // More ranges than a `Segs` holds: the general path.
            Ok(None) => parse_tx_chain_in(&cache, queue, head, params, &mut scratch.pieces).map(
                |(hdr, len)| {
                    switch.forward_burst(batch, port, &burst[..n], &hdrs[..n]);
                    n = 0;
                    let frame = GuestFrame::new(&cache, &scratch.pieces, params.hdr_len, len);
                    switch.forward(batch, port, &frame, &hdr);
                },
            ),
            Err(reason) => Err(reason),
        };
        match parsed {
            Ok(()) => {}
            Err(reason) => {
                switch.count_drop(batch, port, reason);
                desc::log_drop(name, "tx", reason);
                out.dropped += 1;
            }
        }
        // i < TX_BATCH, so the cast is lossless.
        let slot = base.wrapping_add(i as u16);
        if let Err(e) = used.write(&cache, queue, slot, head, 0) {
            result = Err(Error::UsedRing(e));
            break;
        }
    }
    switch.forward_burst(batch, port, &burst[..n], &hdrs[..n]);
    out.chains = scratch.heads.len();
    if result.is_ok() {
        match desc::publish_used(mem, queue, scratch.heads.len() as u16) {
            Ok((old, new)) => out.notify = desc::should_notify(mem, queue, old, new),
            Err(e) => result = Err(Error::UsedRing(e)),
        }
    }
    switch.end(batch);
    result.map(|()| out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::desc::tests::{test_mem, Driver, F_INDIRECT, F_NEXT};
    use std::sync::{Arc, Mutex};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtnet_switch::{Frame, PortConfig, PortSink, SwitchConfig};
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Default)]
    pub(crate) struct Capture {
        pub frames: Mutex<Vec<(Vec<u8>, NetHdr)>>,
    }

    impl PortSink for Capture {
        fn deliver(&self, frame: &dyn Frame, hdr: &NetHdr) -> std::result::Result<(), DropReason> {
            let mut v = vec![0u8; frame.len()];
            frame.read_at(0, &mut v);
            self.frames.lock().unwrap().push((v, *hdr));
            Ok(())
        }
    }

    pub(crate) fn eth(len: usize, dst: u8, src: u8) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, dst]);
        f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, src]);
        f[12] = 0x08;
        for (i, b) in f.iter_mut().enumerate().skip(14) {
            *b = i as u8;
        }
        f
    }

    struct Rig {
        switch: Arc<Switch>,
        me: PortId,
        cap: Arc<Capture>,
        batch: TxBatch,
        params: TxParams,
        scratch: TxScratch,
    }

    impl Rig {
        fn new() -> Self {
            let switch = Switch::new(SwitchConfig::default());
            let me = switch.add_port(PortConfig::default(), Arc::new(Capture::default()));
            let cap = Arc::new(Capture::default());
            switch.add_port(PortConfig::default(), cap.clone());
            let batch = switch.new_batch();
            let n = Negotiated::new(crate::virtio_net::offered_features(true, 1));
            Rig {
                switch,
                me,
                cap,
                batch,
                params: TxParams::new(&n, 1500),
                scratch: TxScratch::new(),
            }
        }

        fn run(&mut self, mem: &GuestMemoryMmap, q: &mut Queue) -> TxOutcome {
            process_tx_queue(
                mem,
                q,
                &self.switch,
                &mut self.batch,
                self.me,
                &self.params,
                &mut self.scratch,
                "test",
            )
            .unwrap()
        }

        fn drops(&self, r: DropReason) -> u64 {
            self.switch
                .port_stats(self.me)
                .unwrap()
                .snapshot()
                .drop_count(r)
        }

        fn got(&self) -> Vec<(Vec<u8>, NetHdr)> {
            self.cap.frames.lock().unwrap().clone()
        }
    }

    /// A TCPv4 GSO header with a partial checksum, as Linux sends (Ethernet + IPv4 + TCP).
    fn tso4() -> NetHdr {
        NetHdr {
            flags: 1,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        }
    }

    fn put_hdr(mem: &GuestMemoryMmap, at: u64, h: &NetHdr) {
        mem.write_slice(&crate::virtio_net::emit_hdr(h, 0), GuestAddress(at))
            .unwrap();
    }

    #[test]
    fn good_frames_separate_and_shared_descriptor() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        let f1 = eth(60, 2, 1);
        let f2 = eth(1514, 2, 1);
        // 1: header and frame in separate descriptors, frame split in two.
        put_hdr(&mem, 0x10_0000, &NetHdr::NONE);
        mem.write_slice(&f1[..20], GuestAddress(0x11_0000)).unwrap();
        mem.write_slice(&f1[20..], GuestAddress(0x12_0000)).unwrap();
        d.chain(&[
            (0x10_0000, 12, false),
            (0x11_0000, 20, false),
            (0x12_0000, 40, false),
        ]);
        // 2: header and frame in one descriptor.
        put_hdr(&mem, 0x13_0000, &NetHdr::NONE);
        mem.write_slice(&f2, GuestAddress(0x13_000c)).unwrap();
        d.chain(&[(0x13_0000, 12 + 1514, false)]);
        let mut q = d.queue();
        let mut rig = Rig::new();
        let o = rig.run(&mem, &mut q);
        assert_eq!((o.chains, o.dropped, o.more), (2, 0, false));
        assert!(o.notify);
        let got = rig.got();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, f1);
        assert_eq!(got[1].0, f2);
        assert_eq!(d.used_idx(), 2);
        assert_eq!(d.used(0), (0, 0));
        assert_eq!(d.used(1), (3, 0));
        assert_eq!(
            rig.switch.port_stats(rig.me).unwrap().snapshot().rx_frames,
            2
        );
    }

    #[test]
    fn header_split_over_descriptors() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        let f = eth(80, 2, 1);
        let h = crate::virtio_net::emit_hdr(&NetHdr::NONE, 0);
        mem.write_slice(&h[..5], GuestAddress(0x10_0000)).unwrap();
        let mut rest = h[5..].to_vec();
        rest.extend_from_slice(&f[..30]);
        mem.write_slice(&rest, GuestAddress(0x11_0000)).unwrap();
        mem.write_slice(&f[30..], GuestAddress(0x12_0000)).unwrap();
        d.chain(&[
            (0x10_0000, 5, false),
            (0x11_0000, 7 + 30, false),
            (0x12_0000, 50, false),
        ]);
        let mut q = d.queue();
        let mut rig = Rig::new();
        rig.run(&mem, &mut q);
        assert_eq!(rig.got()[0].0, f);
    }

    #[test]
    fn indirect_chain() {
        let mem = test_mem();
        let d = Driver::new(&mem, 16);
        let f = eth(100, 2, 1);
        put_hdr(&mem, 0x10_0000, &NetHdr::NONE);
        mem.write_slice(&f, GuestAddress(0x11_0000)).unwrap();
        for (i, desc) in [
            Descriptor::new(0x10_0000, 12, F_NEXT, 1),
            Descriptor::new(0x11_0000, 100, 0, 0),
        ]
        .into_iter()
        .enumerate()
        {
            mem.write_obj(
                RawDescriptor::from(desc),
                GuestAddress(0x20_0000 + 16 * i as u64),
            )
            .unwrap();
        }
        d.put(0, 0x20_0000, 32, F_INDIRECT, 0);
        d.avail(0);
        let mut q = d.queue();
        let mut rig = Rig::new();
        rig.run(&mem, &mut q);
        assert_eq!(rig.got()[0].0, f);
    }

    #[test]
    fn lone_and_split_chains_keep_their_order() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 32);
        let frames: Vec<Vec<u8>> = (0..7u8)
            .map(|i| {
                let mut f = eth(60 + usize::from(i), 2, 1);
                f[14] = i;
                f
            })
            .collect();
        for (i, f) in frames.iter().enumerate() {
            let at = 0x10_0000 + i as u64 * 0x1000;
            put_hdr(&mem, at, &NetHdr::NONE);
            mem.write_slice(f, GuestAddress(at + 12)).unwrap();
            let len = 12 + f.len() as u32;
            match i {
                // Header and frame in separate descriptors: forwarded on its own, between
                // the lone ones around it.
                2 | 5 => d.chain(&[(at, 12, false), (at + 12, len - 12, false)]),
                // A bad chain in the middle of a burst: dropped, the burst goes on.
                4 => d.chain(&[(at, len, true)]),
                _ => d.chain(&[(at, len, false)]),
            };
        }
        let mut q = d.queue();
        let mut rig = Rig::new();
        let o = rig.run(&mem, &mut q);
        assert_eq!((o.chains, o.dropped), (7, 1));
        let got: Vec<u8> = rig.got().iter().map(|(f, _)| f[14]).collect();
        assert_eq!(got, [0, 1, 2, 3, 5, 6]);
        for (f, _) in rig.got() {
            assert_eq!(f, frames[usize::from(f[14])]);
        }
        assert_eq!(rig.drops(DropReason::BadDirection), 1);
        assert_eq!(d.used_idx(), 7);
    }

    #[test]
    fn hostile_chains_are_counted_and_returned() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 32);
        let good = eth(60, 2, 1);
        put_hdr(&mem, 0x10_0000, &NetHdr::NONE);
        mem.write_slice(&good, GuestAddress(0x10_000c)).unwrap();
        let tso = NetHdr {
            flags: 1,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 0,
            csum_start: 34,
            csum_offset: 16,
        };
        put_hdr(&mem, 0x11_0000, &tso);
        let udp = NetHdr {
            gso_type: virtnet_switch::hdr::GSO_UDP,
            gso_size: 1000,
            ..tso
        };
        put_hdr(&mem, 0x12_0000, &udp);
        let bad_csum = NetHdr {
            flags: 1,
            csum_start: 50,
            csum_offset: 16,
            ..NetHdr::NONE
        };
        put_hdr(&mem, 0x13_0000, &bad_csum);
        d.chain(&[(0x3f_fff0, 100, false)]); // BadAddress
        d.chain(&[(0x10_0000, 72, true)]); // BadDirection
        d.chain(&[(0x10_0000, 0, false)]); // HeaderTruncated (zero)
        d.chain(&[(0x10_0000, 8, false)]); // HeaderTruncated
        d.chain(&[(0x10_0000, 12 + 10, false)]); // FrameTooShort (switch)
        d.chain(&[(0x10_0000, 12 + 1600, false)]); // FrameTooLong (mtu)
        d.chain(&[(0x10_0000, 12 + 70_000, false)]); // FrameTooLong (huge)
        d.chain(&[(0x11_0000, 12 + 2000, false)]); // BadOffload gso_size 0
        d.chain(&[(0x12_0000, 12 + 2000, false)]); // BadOffload UFO
        d.chain(&[(0x13_0000, 12 + 60, false)]); // BadOffload csum past end
                                                 // loop
        let h = d.next_desc;
        d.put(h, 0x10_0000, 10, F_NEXT, h);
        d.avail(h);
        d.next_desc += 1;
        d.chain(&[(0x10_0000, 72, false)]); // good, after all of that
        let mut q = d.queue();
        let mut rig = Rig::new();
        let o = rig.run(&mem, &mut q);
        assert_eq!(o.chains, 12);
        assert_eq!(o.dropped, 10);
        assert_eq!(rig.drops(DropReason::BadAddress), 1);
        assert_eq!(rig.drops(DropReason::BadDirection), 1);
        assert_eq!(rig.drops(DropReason::HeaderTruncated), 2);
        assert_eq!(rig.drops(DropReason::FrameTooShort), 1);
        assert_eq!(rig.drops(DropReason::FrameTooLong), 2);
        assert_eq!(rig.drops(DropReason::BadOffload), 3);
        assert_eq!(rig.drops(DropReason::ChainLoop), 1);
        assert_eq!(rig.got().len(), 1);
        assert_eq!(rig.got()[0].0, good);
        assert_eq!(d.used_idx(), 12);
        for i in 0..12 {
            assert_eq!(d.used(i).1, 0);
        }
    }

    #[test]
    fn gso_frame_passes_with_header() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        let h = tso4();
        put_hdr(&mem, 0x10_0000, &h);
        let f = eth(65_000, 2, 1);
        mem.write_slice(&f, GuestAddress(0x10_000c)).unwrap();
        d.chain(&[(0x10_0000, 12 + 65_000, false)]);
        let mut q = d.queue();
        let mut rig = Rig::new();
        rig.run(&mem, &mut q);
        let got = rig.got();
        assert_eq!(got[0].1, h);
        assert_eq!(got[0].0.len(), 65_000);
        // Without HOST_TSO4 the same frame is a BadOffload.
        d.chain(&[(0x10_0000, 12 + 65_000, false)]);
        rig.params.tso4 = false;
        rig.run(&mem, &mut q);
        assert_eq!(rig.drops(DropReason::BadOffload), 1);
    }

    #[test]
    fn batches_and_bad_avail_idx() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 128);
        put_hdr(&mem, 0x10_0000, &NetHdr::NONE);
        mem.write_slice(&eth(60, 2, 1), GuestAddress(0x10_000c))
            .unwrap();
        for _ in 0..100 {
            d.chain(&[(0x10_0000, 72, false)]);
        }
        let mut q = d.queue();
        let mut rig = Rig::new();
        let o = rig.run(&mem, &mut q);
        assert_eq!((o.chains, o.more), (64, true));
        let o = rig.run(&mem, &mut q);
        assert_eq!((o.chains, o.more), (36, false));
        assert_eq!(d.used_idx(), 100);
        // avail idx far ahead: an error, not a spin.
        d.mock.avail().idx().store(u16::to_le(100 + 1000));
        assert!(process_tx_queue(
            &mem,
            &mut q,
            &rig.switch,
            &mut rig.batch,
            rig.me,
            &rig.params,
            &mut rig.scratch,
            "t"
        )
        .is_err());
    }

    #[test]
    fn long_chains_take_the_general_path() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 512);
        let f = eth(200, 2, 1);
        put_hdr(&mem, 0x10_0000, &NetHdr::NONE);
        mem.write_slice(&f, GuestAddress(0x10_000c)).unwrap();
        // Header, then the frame cut into `n` descriptors of 2 bytes (the rest in the last):
        // below, at and above what a `Segs` holds.
        let mut want = Vec::new();
        for n in [desc::MAX_SEGS - 2, desc::MAX_SEGS - 1, desc::MAX_SEGS + 5] {
            let mut bufs = vec![(0x10_0000u64, 12u32, false)];
            for i in 0..n as u64 - 1 {
                bufs.push((0x10_000c + 2 * i, 2, false));
            }
            let done = 2 * (n as u64 - 1);
            bufs.push((0x10_000c + done, 200 - done as u32, false));
            d.chain(&bufs);
            want.push(f.clone());
        }
        // A long chain that is bad after the point a `Segs` fills up.
        let mut bufs = vec![(0x10_0000u64, 12u32, false)];
        for i in 0..desc::MAX_SEGS as u64 + 3 {
            bufs.push((0x10_000c + i, 1, false));
        }
        bufs.push((0x10_000c, 1, true));
        d.chain(&bufs);
        let mut q = d.queue();
        let mut rig = Rig::new();
        let o = rig.run(&mem, &mut q);
        assert_eq!((o.chains, o.dropped), (4, 1));
        assert_eq!(rig.drops(DropReason::BadDirection), 1);
        let got: Vec<Vec<u8>> = rig.got().into_iter().map(|(v, _)| v).collect();
        assert_eq!(got, want);
        assert_eq!(d.used_idx(), 4);
    }

    #[test]
    fn parse_paths_agree() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        let tso = tso4();
        put_hdr(&mem, 0x10_0000, &tso);
        mem.write_slice(&eth(3000, 2, 1), GuestAddress(0x10_000c))
            .unwrap();
        let heads = [
            d.chain(&[(0x10_0000, 12 + 3000, false)]),
            d.chain(&[(0x10_0000, 3, false), (0x10_0003, 9 + 3000, false)]),
            d.chain(&[(0x10_0000, 11, false)]),
            d.chain(&[(0x10_0000, 12 + 20, false)]),
        ];
        let q = d.queue();
        let cache = RegionCache::new(&mem);
        let mut pieces = Vec::new();
        let mut segs = Segs::new();
        for hdr_len in [10, 12] {
            for mtu in [1500, 9000] {
                let p = TxParams {
                    hdr_len,
                    csum: true,
                    tso4: mtu == 1500,
                    tso6: false,
                    ecn: false,
                    mtu,
                };
                for &h in &heads {
                    let want = parse_tx_chain_in(&cache, &q, h, &p, &mut pieces);
                    let got = parse_tx_segs(&cache, &DescTable::new(&cache, &q), h, &p, &mut segs);
                    assert_eq!(want.map(|(hdr, _)| Some(hdr)), got, "{h} {hdr_len} {mtu}");
                    if let Ok((_, len)) = want {
                        assert_eq!(segs.frame_after(hdr_len).len(), len);
                    }
                }
            }
        }
    }

    #[test]
    fn legacy_ten_byte_header() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        let f = eth(60, 2, 1);
        mem.write_slice(&[0u8; 10], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&f, GuestAddress(0x10_000a)).unwrap();
        d.chain(&[(0x10_0000, 70, false)]);
        let mut q = d.queue();
        let mut rig = Rig::new();
        rig.params = TxParams::new(&Negotiated::new(0), 1500);
        assert_eq!(rig.params.hdr_len, 10);
        rig.run(&mem, &mut q);
        assert_eq!(rig.got()[0].0, f);
    }
}
