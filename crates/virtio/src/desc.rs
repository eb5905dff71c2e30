//! Split-ring primitives shared by the TX, RX and control engines: defensive descriptor-chain
//! walking, used-ring writes with a deferred index publish, and interrupt suppression.
//!
//! ```text
//!   descriptor table (16 B each)          used ring
//!   ┌──────┬─────┬───────┬──────┐         ┌───────┬─────┬──────────────────────────┐
//!   │ addr │ len │ flags │ next │         │ flags │ idx │ ring[size] {id u32, len} │
//!   └──────┴─────┴───────┴──────┘         └───────┴─────┴──────────────────────────┘
//!        ▲ head from the avail ring                 ▲ published once per batch (Release)
//! ```
//!
//! A chain is walked into a list of [`Piece`]s: `(guest address, length)` ranges already split
//! at memory-region boundaries, each checked against the guest memory map. Nothing else ever
//! touches guest memory by raw address; the pieces are turned into bounds-checked
//! `VolatileSlice`s when the data is copied. Loops, overlong chains, bad indirect tables and
//! out-of-range addresses are reported as a [`DropReason`], never a panic.
//!
//! The TX fast path walks a chain once into a [`Segs`] instead: the same walker (same checks,
//! same order), but each range is kept as its `VolatileSlice`, in a fixed array of
//! [`MAX_SEGS`], so neither the header read nor the [`SegFrame`] the switch reads translates
//! an address again. A chain with more ranges than that is walked again into pieces.
//!
//! The data path translates addresses through a [`RegionCache`] built once per batch (TX) or
//! per delivery (RX): one `VolatileSlice` per memory region, and `subslice` (bounds-checked)
//! per access, instead of `GuestMemoryMmap`'s region search and `Bytes` plumbing. The avail
//! ring is read with an [`AvailCursor`]: the avail index once, then the entries.

use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use virtio_bindings::bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::{Queue, QueueT};
use virtnet_switch::frame::ETH_VLAN_HEADER_LEN;
use virtnet_switch::{DropReason, Frame, Segment};
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress, VolatileMemory, VolatileSlice,
};

/// Errors of the ring primitives (a broken ring, as opposed to a bad chain).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The used ring is not in guest memory.
    #[error("Used ring write failed")]
    UsedRing(#[source] vm_memory::GuestMemoryError),
}

/// Result of the ring primitives.
pub type Result<T> = std::result::Result<T, Error>;

/// Largest indirect table we accept (entries). Linux uses at most `MAX_SKB_FRAGS + 2`.
pub const MAX_INDIRECT: u32 = 1024;

/// One guest memory range of a chain, inside a single memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes (non-zero).
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// What direction the descriptors of a chain must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Device-readable only (TX).
    Read,
    /// Device-writable only (RX).
    Write,
    /// Readable descriptors followed by writable ones (control queue).
    ReadThenWrite,
}

/// Most memory regions [`RegionCache`] keeps (QEMU guests have one to three; more fall back
/// to `GuestMemoryMmap::get_slice`).
pub const MAX_CACHED_REGIONS: usize = 4;

#[derive(Clone, Copy, Debug)]
struct CachedRegion<'a> {
    start: u64,
    slice: VolatileSlice<'a>,
}

/// Guest address translation for the data path: the first [`MAX_CACHED_REGIONS`] memory
/// regions, each as one `VolatileSlice` over the whole region, built once per batch.
///
/// Translating is a compare against each cached region and a bounds-checked
/// `VolatileSlice::subslice`, instead of `GuestMemoryMmap`'s binary search and generic
/// `Bytes` plumbing per access. The result is exactly what `GuestMemoryMmap::get_slice` gives
/// (a range crossing a region's end is refused by both), and anything not in a cached region
/// goes to `get_slice` itself.
#[derive(Clone, Copy, Debug)]
pub struct RegionCache<'a> {
    mem: &'a GuestMemoryMmap,
    regions: [Option<CachedRegion<'a>>; MAX_CACHED_REGIONS],
}

impl<'a> RegionCache<'a> {
    /// Cache the regions of `mem`.
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        let mut regions = [None; MAX_CACHED_REGIONS];
        for (slot, r) in regions.iter_mut().zip(mem.iter()) {
            let Ok(len) = usize::try_from(r.len()) else {
                continue;
            };
            if let Ok(slice) = r.get_slice(MemoryRegionAddress(0), len) {
                *slot = Some(CachedRegion {
                    start: r.start_addr().0,
                    slice,
                });
            }
        }
        RegionCache { mem, regions }
    }

    /// The guest memory behind the cache.
    pub fn mem(&self) -> &'a GuestMemoryMmap {
        self.mem
    }

    /// A bounds-checked view of `len` bytes at guest address `addr`, which must lie in one
    /// region (as `GuestMemoryMmap::get_slice`).
    #[inline]
    pub fn slice(&self, addr: u64, len: usize) -> Option<VolatileSlice<'a>> {
        for r in self.regions.iter().flatten() {
            let off = addr.wrapping_sub(r.start);
            if off < r.slice.len() as u64 {
                // off < the region's length, a usize.
                return r.slice.subslice(off as usize, len).ok();
            }
        }
        self.mem.get_slice(GuestAddress(addr), len).ok()
    }

    /// Read `N` bytes at `addr` with one (unaligned) volatile load. A range that straddles two
    /// adjacent regions is read through `GuestMemoryMmap` (as before the cache).
    #[inline]
    pub fn read_array<const N: usize>(&self, addr: u64) -> Option<[u8; N]>
    where
        [u8; N]: ByteValued,
    {
        if let Some(s) = self.slice(addr, N) {
            if let Ok(r) = s.get_ref::<[u8; N]>(0) {
                return Some(r.load());
            }
        }
        self.read_array_slow(addr)
    }

    #[cold]
    #[inline(never)]
    fn read_array_slow<const N: usize>(&self, addr: u64) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        self.mem.read_slice(&mut b, GuestAddress(addr)).ok()?;
        Some(b)
    }

    /// Write `N` bytes at `addr` with one (unaligned) volatile store; false when the range is
    /// not in guest memory. A range that straddles two adjacent regions is written through
    /// `GuestMemoryMmap`.
    #[inline]
    pub fn write_array<const N: usize>(&self, addr: u64, data: [u8; N]) -> bool
    where
        [u8; N]: ByteValued,
    {
        if let Some(s) = self.slice(addr, N) {
            if let Ok(r) = s.get_ref::<[u8; N]>(0) {
                r.store(data);
                return true;
            }
        }
        self.write_slow(addr, &data)
    }

    #[cold]
    #[inline(never)]
    fn write_slow(&self, addr: u64, data: &[u8]) -> bool {
        self.mem.write_slice(data, GuestAddress(addr)).is_ok()
    }

    /// Write `data` at `addr`; false when the range is not in guest memory (a range over two
    /// adjacent regions is written through `GuestMemoryMmap`).
    #[inline]
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.slice(addr, data.len()) {
            Some(s) => {
                s.copy_from(data);
                true
            }
            None => self.write_slow(addr, data),
        }
    }
}

/// A reader of the avail ring that loads the avail index once (Acquire), then hands out heads
/// from `queue.next_avail()` up to it, advancing `next_avail`.
///
/// The same checks as `Queue::iter`: the queue must be ready, and the driver may not be more
/// than a queue size ahead (`InvalidAvailRingIndex`). An avail ring entry outside guest memory
/// ends the iteration, as `AvailIter` does.
#[derive(Debug)]
pub struct AvailCursor<'c, 'a> {
    cache: &'c RegionCache<'a>,
    /// The avail ring's entries, when they lie in one region.
    entries: Option<VolatileSlice<'a>>,
    /// Guest address of entry 0.
    ring: u64,
    idx: u16,
    size: u16,
}

impl<'c, 'a> AvailCursor<'c, 'a> {
    /// Read the avail index of `queue`.
    pub fn new(
        cache: &'c RegionCache<'a>,
        queue: &Queue,
    ) -> std::result::Result<Self, virtio_queue::Error> {
        let mut cur = Self::resume(cache, queue, queue.next_avail())?;
        cur.refresh(queue)?;
        Ok(cur)
    }

    /// A cursor over heads up to `idx`, an avail index read earlier from this same queue (a
    /// burst of deliveries reads it once): no guest memory access for the index. `idx` is
    /// checked like a fresh one.
    pub fn resume(
        cache: &'c RegionCache<'a>,
        queue: &Queue,
        idx: u16,
    ) -> std::result::Result<Self, virtio_queue::Error> {
        let ring = queue.avail_ring();
        if !queue.ready() || ring == 0 {
            return Err(virtio_queue::Error::QueueNotReady);
        }
        let size = queue.size();
        if idx.wrapping_sub(queue.next_avail()) > size {
            return Err(virtio_queue::Error::InvalidAvailRingIndex);
        }
        let first = ring
            .checked_add(4)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let entries = cache.slice(first, usize::from(size) * 2);
        Ok(AvailCursor {
            cache,
            entries,
            ring: first,
            idx,
            size,
        })
    }

    /// Read the avail index again (Acquire): heads the driver added since are handed out too.
    pub fn refresh(&mut self, queue: &Queue) -> std::result::Result<(), virtio_queue::Error> {
        let idx_addr = queue
            .avail_ring()
            .checked_add(2)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let Some(s) = self.cache.slice(idx_addr, 2) else {
            return Err(virtio_queue::Error::GuestMemory(
                vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(idx_addr)),
            ));
        };
        let idx = s
            .load::<u16>(0, Ordering::Acquire)
            .map_err(|e| virtio_queue::Error::GuestMemory(e.into()))?;
        let idx = u16::from_le(idx);
        if idx.wrapping_sub(queue.next_avail()) > self.size {
            return Err(virtio_queue::Error::InvalidAvailRingIndex);
        }
        self.idx = idx;
        Ok(())
    }

    /// The avail index the cursor runs up to.
    pub fn idx(&self) -> u16 {
        self.idx
    }

    /// Heads available beyond `queue.next_avail()` when the index was read.
    pub fn pending(&self, queue: &Queue) -> u16 {
        self.idx.wrapping_sub(queue.next_avail())
    }

    /// The head `k` entries past `queue.next_avail()`, without taking it (`None` beyond the
    /// avail index or when the ring is not in one region). For prefetching only: the head is
    /// read again when it is taken.
    #[inline]
    pub fn peek(&self, queue: &Queue, k: u16) -> Option<u16> {
        if k >= self.pending(queue) {
            return None;
        }
        let at = queue.next_avail().wrapping_add(k);
        let off = usize::from(ring_slot(at, self.size)) * 2;
        let b = self.entries.as_ref()?.get_ref::<[u8; 2]>(off).ok()?.load();
        Some(u16::from_le_bytes(b))
    }

    /// The next head, advancing `queue.next_avail()`.
    #[inline]
    pub fn next(&mut self, queue: &mut Queue) -> Option<u16> {
        let at = queue.next_avail();
        if at == self.idx {
            return None;
        }
        let off = usize::from(ring_slot(at, self.size)) * 2;
        let b = match self.entries.as_ref() {
            Some(e) => e.get_ref::<[u8; 2]>(off).ok()?.load(),
            // A ring over two adjacent regions (or partly outside memory): entry by entry.
            None => self
                .cache
                .read_array_slow::<2>(self.ring.checked_add(off as u64)?)?,
        };
        queue.set_next_avail(at.wrapping_add(1));
        Some(u16::from_le_bytes(b))
    }
}

/// Take up to `max` heads from the avail ring of `queue` into `heads` (not cleared), reading
/// the avail index once (see [`AvailCursor`]). Returns whether more heads were available.
pub fn pop_avail(
    cache: &RegionCache<'_>,
    queue: &mut Queue,
    max: usize,
    heads: &mut Vec<u16>,
) -> std::result::Result<bool, virtio_queue::Error> {
    let mut cur = AvailCursor::new(cache, queue)?;
    for _ in 0..max {
        match cur.next(queue) {
            Some(h) => heads.push(h),
            None => return Ok(false),
        }
    }
    Ok(cur.pending(queue) > 0)
}

/// Walk the chain at `head`, appending its pieces to `out` (which is not cleared).
///
/// Returns the total length of the chain. Fails with `ChainLoop` for structural errors (loops,
/// chains longer than the table, bad `next` indices, nested or malformed indirect tables),
/// `BadAddress` for ranges outside guest memory, `BadDirection` for descriptors in the wrong
/// direction and `FrameTooLong` when the total exceeds `max_total`.
pub fn walk_chain(
    mem: &GuestMemoryMmap,
    desc_table: u64,
    queue_size: u16,
    head: u16,
    dir: Dir,
    max_total: usize,
    out: &mut Vec<Piece>,
) -> std::result::Result<usize, DropReason> {
    walk_chain_in(
        &RegionCache::new(mem),
        desc_table,
        queue_size,
        head,
        dir,
        max_total,
        out,
    )
}

/// [`walk_chain`] with a [`RegionCache`] built by the caller (once per batch).
pub fn walk_chain_in(
    cache: &RegionCache<'_>,
    desc_table: u64,
    queue_size: u16,
    head: u16,
    dir: Dir,
    max_total: usize,
    out: &mut Vec<Piece>,
) -> std::result::Result<usize, DropReason> {
    let desc = DescTable {
        addr: desc_table,
        size: queue_size,
        slice: None,
    };
    match walk(cache, &desc, head, dir, max_total, out) {
        Ok(total) => Ok(total),
        Err(Stop::Drop(r)) => Err(r),
        // A `Vec` never runs out of room.
        Err(Stop::Full) => Err(DropReason::Malformed),
    }
}

/// Why a walk stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// The chain is bad.
    Drop(DropReason),
    /// The collector is full (a [`Segs`] holds at most [`MAX_SEGS`] ranges).
    Full,
}

impl From<DropReason> for Stop {
    fn from(r: DropReason) -> Self {
        Stop::Drop(r)
    }
}

/// Where a walk puts the ranges of a chain.
trait ChainSink<'m> {
    /// Add `[addr, addr + len)` (`len > 0`), checking it lies in guest memory.
    fn push(
        &mut self,
        cache: &RegionCache<'m>,
        addr: u64,
        len: usize,
        write: bool,
    ) -> std::result::Result<(), Stop>;
}

impl<'m> ChainSink<'m> for Vec<Piece> {
    #[inline]
    fn push(
        &mut self,
        cache: &RegionCache<'m>,
        addr: u64,
        len: usize,
        write: bool,
    ) -> std::result::Result<(), Stop> {
        push_pieces(cache, addr, len, write, self).map_err(Stop::Drop)
    }
}

/// The one chain walker behind [`walk_chain_in`] and [`walk_chain_segs`]: every check, in
/// the same order, whatever collects the ranges.
#[inline]
fn walk<'m, S: ChainSink<'m>>(
    cache: &RegionCache<'m>,
    desc: &DescTable<'m>,
    head: u16,
    dir: Dir,
    max_total: usize,
    out: &mut S,
) -> std::result::Result<usize, Stop> {
    let mut table = desc.addr;
    let mut table_len = u32::from(desc.size);
    let mut idx = u32::from(head);
    let mut indirect = false;
    let mut visited = 0u32;
    let mut total = 0usize;
    let mut seen_write = false;
    loop {
        if idx >= table_len {
            return Err(DropReason::ChainLoop.into());
        }
        visited += 1;
        if visited > table_len {
            return Err(DropReason::ChainLoop.into());
        }
        let at = table
            .checked_add(u64::from(idx) * 16)
            .ok_or(DropReason::BadAddress)?;
        // Two 8-byte loads per descriptor: { addr le64 } { len le32, flags le16, next le16 }.
        let d = match u16::try_from(idx)
            .ok()
            .filter(|_| !indirect)
            .and_then(|i| desc.get(i))
            .or_else(|| cache.slice(at, 16).and_then(|s| RawDesc::load_at(&s, 0)))
        {
            Some(d) => d,
            // Not in one region: over two adjacent ones, or outside guest memory.
            None => RawDesc::parse(
                &cache
                    .read_array_slow::<16>(at)
                    .ok_or(DropReason::BadAddress)?,
            ),
        };
        let flags = u32::from(d.flags());
        if flags & VRING_DESC_F_INDIRECT != 0 {
            // Only one level, only as the last descriptor of the direct chain.
            if indirect || flags & VRING_DESC_F_NEXT != 0 {
                return Err(DropReason::ChainLoop.into());
            }
            let len = d.len();
            if len == 0 || len % 16 != 0 || len / 16 > MAX_INDIRECT {
                return Err(DropReason::ChainLoop.into());
            }
            table = d.addr();
            table_len = len / 16;
            idx = 0;
            visited = 0;
            indirect = true;
            continue;
        }
        let write = flags & VRING_DESC_F_WRITE != 0;
        match dir {
            Dir::Read if write => return Err(DropReason::BadDirection.into()),
            Dir::Write if !write => return Err(DropReason::BadDirection.into()),
            Dir::ReadThenWrite if seen_write && !write => {
                return Err(DropReason::BadDirection.into())
            }
            _ => {}
        }
        seen_write |= write;
        let len = d.len() as usize;
        if len > 0 {
            total = total.saturating_add(len);
            if total > max_total {
                return Err(DropReason::FrameTooLong.into());
            }
            out.push(cache, d.addr(), len, write)?;
        }
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(total);
        }
        idx = u32::from(d.next());
    }
}

/// Most guest memory ranges a [`Segs`] holds: a chain of more descriptors (or ranges split at
/// region boundaries) takes the [`Piece`] path instead. Linux sends at most
/// `MAX_SKB_FRAGS + 2` (19 by default, 47 at the largest configurable `MAX_SKB_FRAGS`).
pub const MAX_SEGS: usize = 64;

/// A chain collected as bounds-checked views into guest memory, in a fixed array (no heap):
/// each range is translated once, when the chain is walked, and read through its
/// `VolatileSlice` afterwards. Build one per batch and reuse it for every chain.
#[derive(Clone, Debug)]
pub struct Segs<'m> {
    buf: [VolatileSlice<'m>; MAX_SEGS],
    n: usize,
    total: usize,
}

impl Default for Segs<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'m> Segs<'m> {
    /// An empty collection.
    pub fn new() -> Self {
        Segs {
            buf: [empty_slice(); MAX_SEGS],
            n: 0,
            total: 0,
        }
    }

    /// The collected ranges, in chain order (none of them empty).
    pub fn as_slice(&self) -> &[VolatileSlice<'m>] {
        &self.buf[..self.n]
    }

    /// Total bytes collected.
    pub fn total(&self) -> usize {
        self.total
    }

    #[inline]
    fn add(&mut self, s: VolatileSlice<'m>) -> std::result::Result<(), Stop> {
        let slot = self.buf.get_mut(self.n).ok_or(Stop::Full)?;
        *slot = s;
        self.n += 1;
        self.total += s.len();
        Ok(())
    }

    /// Copy the first `N` bytes into an array (`None` when there are fewer): one unaligned
    /// load when they lie in the first range, as a header in the head descriptor does.
    #[inline]
    pub fn read_prefix<const N: usize>(&self) -> Option<[u8; N]>
    where
        [u8; N]: ByteValued,
    {
        let first = self.as_slice().first()?;
        if let Ok(r) = first.get_ref::<[u8; N]>(0) {
            return Some(r.load());
        }
        let mut b = [0u8; N];
        let mut done = 0;
        for s in self.as_slice() {
            done += s.copy_to(&mut b[done..]);
            if done == N {
                return Some(b);
            }
        }
        None
    }

    /// When the chain was one range: the bytes after its first `skip` as a [`Frame`] that does
    /// not borrow `self` (so it can be kept while `self` collects the next chain).
    #[inline]
    pub fn lone_frame_after(&self, skip: usize) -> Option<SegFrame<'m, 'm>> {
        if self.n != 1 {
            return None;
        }
        let first = self.buf[0].offset(skip).ok()?;
        Some(SegFrame {
            len: first.len(),
            first,
            rest: &[],
        })
    }

    /// The bytes after the first `skip` (the virtio header) as a [`Frame`]: empty when
    /// there are no more than `skip`.
    pub fn frame_after(&self, skip: usize) -> SegFrame<'_, 'm> {
        let len = self.total.saturating_sub(skip);
        let mut rem = skip;
        for (i, s) in self.as_slice().iter().enumerate() {
            if rem < s.len() {
                let Ok(first) = s.offset(rem) else { break };
                return SegFrame {
                    first,
                    rest: self.buf.get(i + 1..self.n).unwrap_or(&[]),
                    len,
                };
            }
            rem -= s.len();
        }
        SegFrame {
            first: empty_slice(),
            rest: &[],
            len: 0,
        }
    }
}

/// A zero-length `VolatileSlice` (a placeholder; it gives access to nothing).
fn empty_slice() -> VolatileSlice<'static> {
    let empty: &'static mut [u8] = &mut [];
    VolatileSlice::from(empty)
}

impl<'m> ChainSink<'m> for Segs<'m> {
    #[inline]
    fn push(
        &mut self,
        cache: &RegionCache<'m>,
        addr: u64,
        len: usize,
        _write: bool,
    ) -> std::result::Result<(), Stop> {
        // Fast path: the whole range is inside one region (always, unless it straddles two).
        if let Some(s) = cache.slice(addr, len) {
            return self.add(s);
        }
        let mut off = 0usize;
        for s in GuestMemoryBackend::get_slices(cache.mem(), GuestAddress(addr), len) {
            let s = s.map_err(|_| DropReason::BadAddress)?;
            off += s.len();
            self.add(s)?;
        }
        if off != len {
            return Err(DropReason::BadAddress.into());
        }
        Ok(())
    }
}

/// A queue's descriptor table, translated once (per batch) when it lies in one memory region.
#[derive(Clone, Copy, Debug)]
pub struct DescTable<'m> {
    addr: u64,
    size: u16,
    slice: Option<VolatileSlice<'m>>,
}

impl<'m> DescTable<'m> {
    /// The descriptor table of `queue`.
    pub fn new(cache: &RegionCache<'m>, queue: &Queue) -> Self {
        let (addr, size) = (queue.desc_table(), queue.size());
        DescTable {
            addr,
            size,
            slice: cache.slice(addr, usize::from(size) * 16),
        }
    }
}

/// When the chain at `head` is one readable descriptor (no `NEXT`, `WRITE` or `INDIRECT`) of
/// 1..=`max_total` bytes inside one memory region: put its view in `out` (cleared first) and
/// return its length. `None` for anything else, good or bad, with `out` untouched: the caller
/// then walks the chain, which decides. The TX fast path: Linux and DPDK put the virtio header
/// and a small frame in one descriptor.
#[inline]
pub fn lone_read_segs<'m>(
    cache: &RegionCache<'m>,
    table: &DescTable<'m>,
    head: u16,
    max_total: usize,
    out: &mut Segs<'m>,
) -> Option<usize> {
    let d = table.get(head)?;
    let len = d.len() as usize;
    if d.flags() != 0 || len == 0 || len > max_total {
        return None;
    }
    let s = cache.slice(d.addr(), len)?;
    out.buf[0] = s;
    out.n = 1;
    out.total = len;
    Some(len)
}

/// Ask the CPU to start loading the cache line at the start of `s` (a hint: nothing is read
/// architecturally). The driver wrote descriptors and frames on another core: a prefetch issued
/// a few frames ahead overlaps those cache misses instead of taking them one after another.
#[inline(always)]
pub fn prefetch(s: &VolatileSlice<'_>) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = s.ptr_guard().as_ptr();
        // SAFETY: PREFETCHT0 is a hint: it never faults and has no architectural effect
        // whatever the address; `p` is the start of a bounds-checked view of guest memory.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>())
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

/// Like [`prefetch`], for a line the caller is about to write: PREFETCHW asks for the line
/// in exclusive state. The driver's core last wrote the RX buffers it posts (and reads the used
/// ring we write), so a plain store would first wait for that core to give the line up; the
/// stores of a burst then queue behind one another in the store buffer. Falls back to
/// [`prefetch`] on CPUs without PREFETCHW.
#[inline(always)]
pub fn prefetch_write(s: &VolatileSlice<'_>) {
    #[cfg(target_arch = "x86_64")]
    {
        if *HAS_PREFETCHW {
            let p = s.ptr_guard().as_ptr();
            // SAFETY: PREFETCHW (supported, checked above) is a hint: it never faults, reads or
            // writes nothing architecturally, and leaves the stack and flags alone; `p` is the
            // start of a bounds-checked view of guest memory.
            unsafe {
                std::arch::asm!(
                    "prefetchw [{p}]",
                    p = in(reg) p,
                    options(nostack, preserves_flags, readonly)
                )
            };
            return;
        }
    }
    prefetch(s)
}

/// Does the CPU have PREFETCHW (CPUID 0x8000_0001, ECX bit 8, "3DNowPrefetch")?
#[cfg(target_arch = "x86_64")]
static HAS_PREFETCHW: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
    std::arch::x86_64::__cpuid(0x8000_0000).eax >= 0x8000_0001
        && std::arch::x86_64::__cpuid(0x8000_0001).ecx & (1 << 8) != 0
});

/// Prefetch the cache lines of the first `span` bytes of `s` (at most [`PREFETCH_LINES`]
/// lines), for reading or, with `write`, for writing. Returns how many lines it asked for.
#[inline(always)]
pub fn prefetch_lines(s: &VolatileSlice<'_>, span: usize, write: bool) -> usize {
    let span = span.min(s.len());
    let first = s.ptr_guard().as_ptr() as usize;
    let mut off = 0;
    let mut lines = 0;
    while lines < PREFETCH_LINES && off < span {
        if let Ok(l) = s.subslice(off, 1) {
            if write {
                prefetch_write(&l);
            } else {
                prefetch(&l);
            }
        }
        lines += 1;
        // The start of the next cache line.
        off = (off + CACHE_LINE) - (first + off) % CACHE_LINE;
    }
    lines
}

/// The cache line size this code assumes.
pub const CACHE_LINE: usize = 64;
/// The most cache lines [`prefetch_lines`] asks for: the virtio header, the Ethernet header and
/// a small frame span two or three lines wherever the driver put the buffer; the copy of a
/// larger frame is sequential, which the CPU's own prefetchers follow.
pub const PREFETCH_LINES: usize = 3;

impl DescTable<'_> {
    /// Descriptor `idx`, when the table lies in one region and `idx` is in it (else `None`:
    /// the walk reads it through the [`RegionCache`], or reports it).
    #[inline]
    fn get(&self, idx: u16) -> Option<RawDesc> {
        if idx >= self.size {
            return None;
        }
        RawDesc::load_at(self.slice.as_ref()?, usize::from(idx) * 16)
    }

    /// Prefetch descriptor `head` (when the table lies in one region).
    #[inline]
    pub fn prefetch_desc(&self, head: u16) {
        if let Some(d) = self
            .slice
            .as_ref()
            .and_then(|t| t.subslice(usize::from(head) * 16, 16).ok())
        {
            prefetch(&d);
        }
    }

    /// Read descriptor `head` (prefetched earlier) and prefetch the first `span` bytes of its
    /// buffer (see [`prefetch_lines`]): for reading (TX: the virtio and Ethernet headers the
    /// switch reads), or with `write` for writing, when it is a lone writable buffer (the RX
    /// fast path, see [`lone_write_buffer`]). Anything odd is left to the real walk. Returns
    /// whether it asked for any line.
    #[inline]
    pub fn prefetch_buffer(
        &self,
        cache: &RegionCache<'_>,
        head: u16,
        span: usize,
        write: bool,
    ) -> bool {
        let usable = |d: &RawDesc| {
            let flags = u32::from(d.flags());
            d.len() > 0
                && if write {
                    flags == VRING_DESC_F_WRITE
                } else {
                    flags & VRING_DESC_F_INDIRECT == 0
                }
        };
        self.get(head)
            .filter(usable)
            .and_then(|d| cache.slice(d.addr(), (d.len() as usize).min(span)))
            .is_some_and(|b| prefetch_lines(&b, span, write) > 0)
    }
}

/// [`walk_chain_in`] into a [`Segs`] (cleared first), reading direct descriptors through
/// `table`. `Ok(None)` when the chain has more than [`MAX_SEGS`] ranges (or a loop fills the
/// `Segs` before it is caught): walk it again with [`walk_chain_in`], which decides as always.
pub fn walk_chain_segs<'m>(
    cache: &RegionCache<'m>,
    table: &DescTable<'m>,
    head: u16,
    dir: Dir,
    max_total: usize,
    out: &mut Segs<'m>,
) -> std::result::Result<Option<usize>, DropReason> {
    out.n = 0;
    out.total = 0;
    match walk(cache, table, head, dir, max_total, out) {
        Ok(total) => Ok(Some(total)),
        Err(Stop::Drop(r)) => Err(r),
        Err(Stop::Full) => Ok(None),
    }
}

/// The buffer of the chain at `head` when that chain is one writable descriptor (no `NEXT`,
/// no `INDIRECT`) of at least `need` bytes inside one memory region: a view of its first
/// `need` bytes. `None` for anything else, good or bad: the caller then walks the chain with
/// [`walk_chain_in`], which decides. This is the RX fast path: Linux (mergeable buffers) and
/// DPDK post one such descriptor per buffer.
#[inline]
pub fn lone_write_buffer<'a>(
    cache: &RegionCache<'a>,
    table: &DescTable<'a>,
    head: u16,
    need: usize,
) -> Option<VolatileSlice<'a>> {
    let d = table.get(head)?;
    if u32::from(d.flags()) != VRING_DESC_F_WRITE || (d.len() as usize) < need || need == 0 {
        return None;
    }
    cache.slice(d.addr(), need)
}

/// A split-ring descriptor as read from guest memory.
#[derive(Clone, Copy, Debug)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl RawDesc {
    fn parse(b: &[u8; 16]) -> Self {
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = *b;
        RawDesc {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }

    /// Read the descriptor at byte `off` of `s` (unaligned volatile loads: an indirect table
    /// need not be aligned).
    #[inline]
    fn load_at(s: &VolatileSlice<'_>, off: usize) -> Option<Self> {
        let addr = u64::from_le(s.get_ref::<u64>(off).ok()?.load());
        let rest = u64::from_le(s.get_ref::<u64>(off.checked_add(8)?).ok()?.load());
        // Truncations pick the fields out of `rest`.
        #[allow(clippy::cast_possible_truncation)]
        Some(RawDesc {
            addr,
            len: rest as u32,
            flags: (rest >> 32) as u16,
            next: (rest >> 48) as u16,
        })
    }

    fn addr(&self) -> u64 {
        self.addr
    }

    fn len(&self) -> u32 {
        self.len
    }

    fn flags(&self) -> u16 {
        self.flags
    }

    fn next(&self) -> u16 {
        self.next
    }
}

/// Split `[addr, addr + len)` at region boundaries, checking it lies in guest memory.
fn push_pieces(
    cache: &RegionCache<'_>,
    addr: u64,
    len: usize,
    write: bool,
    out: &mut Vec<Piece>,
) -> std::result::Result<(), DropReason> {
    // Fast path: the whole range is inside one region (always, unless it straddles two).
    if cache.slice(addr, len).is_some() {
        out.push(Piece {
            addr,
            len: u32::try_from(len).map_err(|_| DropReason::BadAddress)?,
            write,
        });
        return Ok(());
    }
    let mem = cache.mem();
    let mut off = 0usize;
    for s in GuestMemoryBackend::get_slices(mem, GuestAddress(addr), len) {
        let s = s.map_err(|_| DropReason::BadAddress)?;
        let piece_len = u32::try_from(s.len()).map_err(|_| DropReason::BadAddress)?;
        out.push(Piece {
            addr: addr + off as u64,
            len: piece_len,
            write,
        });
        off += s.len();
    }
    if off != len {
        return Err(DropReason::BadAddress);
    }
    Ok(())
}

/// Copy up to `dst.len()` bytes starting `offset` bytes into the pieces; returns bytes copied.
pub fn read_pieces(
    mem: &GuestMemoryMmap,
    pieces: &[Piece],
    offset: usize,
    dst: &mut [u8],
) -> usize {
    read_pieces_in(&RegionCache::new(mem), pieces, offset, dst)
}

/// [`read_pieces`] with a [`RegionCache`] built by the caller.
pub fn read_pieces_in(
    cache: &RegionCache<'_>,
    pieces: &[Piece],
    offset: usize,
    dst: &mut [u8],
) -> usize {
    // Fast path: the bytes are all in the first piece (a header in the head descriptor).
    if let Some(p) = pieces.first() {
        let end = offset.saturating_add(dst.len());
        if end <= p.len as usize {
            return match cache.slice(p.addr + offset as u64, dst.len()) {
                Some(s) => s.copy_to(dst),
                None => 0,
            };
        }
    }
    GuestFrame::new(cache, pieces, offset, usize::MAX).read_at(0, dst)
}

/// A frame view over validated pieces of a chain, skipping the first `skip` bytes (the
/// virtio header). Each segment is a bounds-checked `VolatileSlice` into guest memory.
pub struct GuestFrame<'a, 'm> {
    cache: &'a RegionCache<'m>,
    pieces: &'a [Piece],
    skip: usize,
    len: usize,
}

impl<'a, 'm> GuestFrame<'a, 'm> {
    /// A view of `len` bytes (clamped to what the pieces hold) after the first `skip` bytes.
    pub fn new(cache: &'a RegionCache<'m>, pieces: &'a [Piece], skip: usize, len: usize) -> Self {
        let avail = pieces
            .iter()
            .map(|p| p.len as usize)
            .sum::<usize>()
            .saturating_sub(skip);
        GuestFrame {
            cache,
            pieces,
            skip,
            len: len.min(avail),
        }
    }
}

impl GuestFrame<'_, '_> {
    /// The frame's bytes `[offset, offset + n)` when they all lie in the first piece that
    /// holds frame bytes (the common case: one descriptor for header and frame, or a header
    /// descriptor then one frame descriptor).
    #[inline]
    fn first_piece_slice(&self, offset: usize, n: usize) -> Option<VolatileSlice<'_>> {
        let mut skip = self.skip;
        for p in self.pieces.iter().take(2) {
            let plen = p.len as usize;
            if skip >= plen {
                skip -= plen;
                continue;
            }
            let start = skip.checked_add(offset)?;
            let end = start.checked_add(n)?;
            if end > plen || offset.checked_add(n)? > self.len {
                return None;
            }
            return self.cache.slice(p.addr + start as u64, n);
        }
        None
    }
}

impl Frame for GuestFrame<'_, '_> {
    fn len(&self) -> usize {
        self.len
    }

    fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.len.saturating_sub(offset));
        if let Some(s) = self.first_piece_slice(offset, n) {
            return s.copy_to(&mut dst[..n]);
        }
        virtnet_switch::frame::read_segments_at(self, offset, dst)
    }

    fn copy_to_volatile(&self, offset: usize, dst: &VolatileSlice<'_>) -> usize {
        let n = dst.len().min(self.len.saturating_sub(offset));
        if let Some(s) = self.first_piece_slice(offset, n) {
            s.copy_to_volatile_slice(*dst);
            return n;
        }
        virtnet_switch::frame::copy_segments_to_volatile(self, offset, dst)
    }

    fn for_each_segment(&self, f: &mut dyn FnMut(Segment<'_>) -> bool) {
        let mut skip = self.skip;
        let mut left = self.len;
        for p in self.pieces {
            if left == 0 {
                return;
            }
            let plen = p.len as usize;
            if skip >= plen {
                skip -= plen;
                continue;
            }
            let n = (plen - skip).min(left);
            let Some(s) = self.cache.slice(p.addr + skip as u64, n) else {
                return;
            };
            skip = 0;
            left -= n;
            if !f(Segment::Guest(s)) {
                return;
            }
        }
    }
}

/// A frame view over a [`Segs`] (see [`Segs::frame_after`]): the first range holding frame
/// bytes, already advanced past the header, then the others. Nothing is translated again: a
/// read of bytes in the first range (an Ethernet header, a whole small frame) is one
/// bounds-checked `subslice` and a copy.
#[derive(Clone, Copy, Debug)]
pub struct SegFrame<'s, 'm> {
    first: VolatileSlice<'m>,
    rest: &'s [VolatileSlice<'m>],
    len: usize,
}

impl SegFrame<'_, '_> {
    /// An empty frame (a placeholder in arrays).
    pub fn empty() -> Self {
        SegFrame {
            first: empty_slice(),
            rest: &[],
            len: 0,
        }
    }
}

impl Frame for SegFrame<'_, '_> {
    fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn read_head(&self, dst: &mut [u8; ETH_VLAN_HEADER_LEN]) -> usize {
        // One unaligned load when the frame's first range holds the whole header.
        if self.len >= ETH_VLAN_HEADER_LEN {
            if let Ok(r) = self.first.get_ref::<[u8; ETH_VLAN_HEADER_LEN]>(0) {
                *dst = r.load();
                return ETH_VLAN_HEADER_LEN;
            }
        }
        self.read_at(0, dst)
    }

    #[inline]
    fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.len.saturating_sub(offset));
        match self.first.subslice(offset, n) {
            Ok(s) => s.copy_to(&mut dst[..n]),
            Err(_) => virtnet_switch::frame::read_segments_at(self, offset, dst),
        }
    }

    #[inline]
    fn copy_to_volatile(&self, offset: usize, dst: &VolatileSlice<'_>) -> usize {
        let n = dst.len().min(self.len.saturating_sub(offset));
        match self.first.subslice(offset, n) {
            Ok(s) => {
                s.copy_to_volatile_slice(*dst);
                n
            }
            Err(_) => virtnet_switch::frame::copy_segments_to_volatile(self, offset, dst),
        }
    }

    fn for_each_segment(&self, f: &mut dyn FnMut(Segment<'_>) -> bool) {
        if self.len == 0 || !f(Segment::Guest(self.first)) {
            return;
        }
        for s in self.rest {
            if !f(Segment::Guest(*s)) {
                return;
            }
        }
    }
}

/// Write used element number `slot` (a free-running index) without publishing it.
pub fn write_used_elem(
    mem: &GuestMemoryMmap,
    queue: &Queue,
    slot: u16,
    head: u16,
    len: u32,
) -> Result<()> {
    write_used_elem_in(&RegionCache::new(mem), queue, slot, head, len)
}

/// `idx % size` for a ring position: a mask for the power-of-two sizes split rings have (a
/// division costs tens of cycles, and this runs a few times per frame), `%` otherwise; 0 for
/// an (invalid) empty ring.
#[inline]
pub fn ring_slot(idx: u16, size: u16) -> u16 {
    if size.is_power_of_two() {
        idx & (size - 1)
    } else {
        idx.checked_rem(size).unwrap_or(0)
    }
}

/// The bytes of `struct virtq_used_elem { le32 id; le32 len; }`.
#[inline(always)]
fn used_elem(head: u16, len: u32) -> [u8; 8] {
    (u64::from(head) | u64::from(len) << 32).to_le_bytes()
}

/// [`write_used_elem`] with a [`RegionCache`] built by the caller.
#[inline]
pub fn write_used_elem_in(
    cache: &RegionCache<'_>,
    queue: &Queue,
    slot: u16,
    head: u16,
    len: u32,
) -> Result<()> {
    let size = queue.size().max(1);
    let off = 4 + u64::from(ring_slot(slot, size)) * 8;
    let b = used_elem(head, len);
    let addr = queue.used_ring().checked_add(off).ok_or(Error::UsedRing(
        vm_memory::GuestMemoryError::InvalidBackendAddress,
    ))?;
    if cache.write_array(addr, b) {
        Ok(())
    } else {
        Err(Error::UsedRing(
            vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(addr)),
        ))
    }
}

/// A queue's used ring entries, translated once (per batch) when they lie in one memory region:
/// writing an element is then one bounds-checked store, no translation.
#[derive(Clone, Copy, Debug)]
pub struct UsedRing<'m> {
    size: u16,
    entries: Option<VolatileSlice<'m>>,
}

impl<'m> UsedRing<'m> {
    /// The used ring of `queue`.
    pub fn new(cache: &RegionCache<'m>, queue: &Queue) -> Self {
        let size = queue.size();
        let entries = queue
            .used_ring()
            .checked_add(4)
            .filter(|_| size.is_power_of_two())
            .and_then(|a| cache.slice(a, usize::from(size) * 8));
        UsedRing { size, entries }
    }

    /// [`write_used_elem_in`]: used element number `slot` (free-running), not published.
    #[inline(always)]
    pub fn write(
        &self,
        cache: &RegionCache<'_>,
        queue: &Queue,
        slot: u16,
        head: u16,
        len: u32,
    ) -> Result<()> {
        if let Some(e) = self.entries.as_ref() {
            // `entries` is only set for power-of-two sizes.
            let off = usize::from(slot & (self.size - 1)) * 8;
            if let Ok(r) = e.get_ref::<[u8; 8]>(off) {
                r.store(used_elem(head, len));
                return Ok(());
            }
        }
        write_used_elem_in(cache, queue, slot, head, len)
    }
}

/// Publish `queue.next_used() + count` as the used index (Release) and keep the queue in sync.
/// Returns `(old, new)` used indices.
pub fn publish_used(mem: &GuestMemoryMmap, queue: &mut Queue, count: u16) -> Result<(u16, u16)> {
    let old = queue.next_used();
    let new = old.wrapping_add(count);
    let addr = queue.used_ring().checked_add(2).ok_or(Error::UsedRing(
        vm_memory::GuestMemoryError::InvalidBackendAddress,
    ))?;
    mem.store(u16::to_le(new), GuestAddress(addr), Ordering::Release)
        .map_err(Error::UsedRing)?;
    queue.set_next_used(new);
    Ok((old, new))
}

/// `vring_need_event` from the virtio spec.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    (Wrapping(new) - Wrapping(event) - Wrapping(1)) < (Wrapping(new) - Wrapping(old))
}

/// Does the driver want an interrupt now that the used index moved from `old` to `new`?
///
/// With EVENT_IDX: the `used_event` rule; without: the `NO_INTERRUPT` avail flag.
pub fn should_notify(mem: &GuestMemoryMmap, queue: &Queue, old: u16, new: u16) -> bool {
    if old == new {
        return false;
    }
    fence(Ordering::SeqCst);
    let avail = queue.avail_ring();
    if queue.event_idx_enabled() {
        let off = 4 + 2 * u64::from(queue.size());
        let Some(addr) = avail.checked_add(off) else {
            return true;
        };
        match mem.load::<u16>(GuestAddress(addr), Ordering::Acquire) {
            Ok(ev) => need_event(u16::from_le(ev), new, old),
            Err(_) => true,
        }
    } else {
        match mem.load::<u16>(GuestAddress(avail), Ordering::Acquire) {
            Ok(fl) => u32::from(u16::from_le(fl)) & VRING_AVAIL_F_NO_INTERRUPT == 0,
            Err(_) => true,
        }
    }
}

/// A crude process-wide rate limit for guest-triggered log lines: at most `PER_SEC` a second.
pub fn log_allowed() -> bool {
    const PER_SEC: u64 = 10;
    static STATE: AtomicU64 = AtomicU64::new(0); // (second << 16) | count
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let cur = STATE.load(Ordering::Relaxed);
    let (sec, count) = (cur >> 16, cur & 0xffff);
    let next = if sec == now & 0xffff_ffff_ffff {
        if count >= PER_SEC {
            return false;
        }
        cur + 1
    } else {
        ((now & 0xffff_ffff_ffff) << 16) | 1
    };
    STATE
        .compare_exchange(cur, next, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
}

/// Log a guest-caused drop, rate limited.
pub fn log_drop(port: &str, queue: &str, reason: DropReason) {
    if log_allowed() {
        log::warn!("{port}: {queue}: dropped a chain: {reason}");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    /// A driver-side helper over `MockSplitQueue`: raw descriptors and avail pushes.
    pub(crate) struct Driver<'a> {
        pub mock: MockSplitQueue<'a, GuestMemoryMmap>,
        pub next_desc: u16,
        pub size: u16,
    }

    pub(crate) const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
    pub(crate) const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
    pub(crate) const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    pub(crate) fn test_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    impl<'a> Driver<'a> {
        pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
            Driver {
                mock: MockSplitQueue::new(mem, size),
                next_desc: 0,
                size,
            }
        }

        /// A driver whose rings start at guest address `start`.
        pub fn at(mem: &'a GuestMemoryMmap, start: u64, size: u16) -> Self {
            Driver {
                mock: MockSplitQueue::create(mem, GuestAddress(start), size),
                next_desc: 0,
                size,
            }
        }

        pub fn queue(&self) -> Queue {
            self.mock.create_queue::<Queue>().unwrap()
        }

        /// Store a raw descriptor at `idx`.
        pub fn put(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
            self.mock
                .desc_table()
                .store(
                    idx,
                    RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
                )
                .unwrap();
        }

        /// Make `head` available.
        pub fn avail(&self, head: u16) {
            let idx = self.mock.avail().idx().load();
            self.mock
                .avail()
                .ring()
                .ref_at((idx % self.size) as usize)
                .unwrap()
                .store(u16::to_le(head));
            self.mock
                .avail()
                .idx()
                .store(u16::to_le(idx.wrapping_add(1)));
        }

        /// Add a chain of `(addr, len, write)` buffers; returns the head.
        pub fn chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, (addr, len, write)) in bufs.iter().enumerate() {
                let idx = self.next_desc;
                self.next_desc = (self.next_desc + 1) % self.size;
                let mut flags = if *write { F_WRITE } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= F_NEXT;
                }
                self.put(idx, *addr, *len, flags, self.next_desc);
            }
            self.avail(head);
            head
        }

        /// Used ring entry `i`: (id, len).
        pub fn used(&self, i: u16) -> (u32, u32) {
            let e = self
                .mock
                .used()
                .ring()
                .ref_at((i % self.size) as usize)
                .unwrap()
                .load();
            (e.id(), e.len())
        }

        /// The used index as the driver sees it.
        pub fn used_idx(&self) -> u16 {
            u16::from_le(self.mock.used().idx().load())
        }
    }

    #[test]
    fn walks_direct_and_indirect_chains() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        let h = d.chain(&[(0x10_0000, 100, false), (0x10_1000, 50, false)]);
        let q = d.queue();
        let mut out = Vec::new();
        let n = walk_chain(&mem, q.desc_table(), 16, h, Dir::Read, 1 << 20, &mut out).unwrap();
        assert_eq!(n, 150);
        assert_eq!(out.len(), 2);
        // Indirect: table of 2 at 0x20_0000.
        mem.write_obj(
            RawDescriptor::from(Descriptor::new(0x10_0000, 10, F_NEXT, 1)),
            GuestAddress(0x20_0000),
        )
        .unwrap();
        mem.write_obj(
            RawDescriptor::from(Descriptor::new(0x10_2000, 20, 0, 0)),
            GuestAddress(0x20_0010),
        )
        .unwrap();
        d.put(5, 0x20_0000, 32, F_INDIRECT, 0);
        out.clear();
        let n = walk_chain(&mem, q.desc_table(), 16, 5, Dir::Read, 1 << 20, &mut out).unwrap();
        assert_eq!(n, 30);
    }

    #[test]
    fn rejects_hostile_chains() {
        let mem = test_mem();
        let d = Driver::new(&mem, 8);
        let q = d.queue();
        let walk = |head| {
            let mut out = Vec::new();
            walk_chain(&mem, q.desc_table(), 8, head, Dir::Read, 70_000, &mut out)
        };
        // loop 0 -> 1 -> 0
        d.put(0, 0x10_0000, 10, F_NEXT, 1);
        d.put(1, 0x10_0000, 10, F_NEXT, 0);
        assert_eq!(walk(0), Err(DropReason::ChainLoop));
        // next out of range
        d.put(2, 0x10_0000, 10, F_NEXT, 200);
        assert_eq!(walk(2), Err(DropReason::ChainLoop));
        // head out of range
        assert_eq!(walk(9), Err(DropReason::ChainLoop));
        // address out of memory, and wrapping
        d.put(3, 0x3f_ffff, 10, 0, 0);
        assert_eq!(walk(3), Err(DropReason::BadAddress));
        d.put(3, u64::MAX - 4, 10, 0, 0);
        assert_eq!(walk(3), Err(DropReason::BadAddress));
        // write-only on TX
        d.put(4, 0x10_0000, 10, F_WRITE, 0);
        assert_eq!(walk(4), Err(DropReason::BadDirection));
        // huge
        d.put(5, 0x10_0000, 0x30_0000, 0, 0);
        assert_eq!(walk(5), Err(DropReason::FrameTooLong));
        // indirect with bad length, nested, with NEXT, self-looping
        d.put(6, 0x20_0000, 17, F_INDIRECT, 0);
        assert_eq!(walk(6), Err(DropReason::ChainLoop));
        d.put(6, 0x20_0000, 16, F_INDIRECT | F_NEXT, 0);
        assert_eq!(walk(6), Err(DropReason::ChainLoop));
        mem.write_obj(
            RawDescriptor::from(Descriptor::new(0x20_0000, 16, F_INDIRECT, 0)),
            GuestAddress(0x20_0000),
        )
        .unwrap();
        d.put(6, 0x20_0000, 16, F_INDIRECT, 0);
        assert_eq!(walk(6), Err(DropReason::ChainLoop));
        mem.write_obj(
            RawDescriptor::from(Descriptor::new(0x10_0000, 16, F_NEXT, 0)),
            GuestAddress(0x20_0000),
        )
        .unwrap();
        assert_eq!(walk(6), Err(DropReason::ChainLoop));
        // indirect table outside memory
        d.put(7, 0x40_0000, 32, F_INDIRECT, 0);
        assert_eq!(walk(7), Err(DropReason::BadAddress));
    }

    #[test]
    fn region_boundaries_split_pieces() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x10_0000), 0x10_0000),
        ])
        .unwrap();
        let mut d = Driver::new(&mem, 8);
        let h = d.chain(&[(0x0f_fff0, 0x20, false)]);
        let q = d.queue();
        let mut out = Vec::new();
        walk_chain(&mem, q.desc_table(), 8, h, Dir::Read, 1 << 20, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len + out[1].len, 0x20);
        mem.write_slice(&[7u8; 0x20], GuestAddress(0x0f_fff0))
            .unwrap();
        let cache = RegionCache::new(&mem);
        let f = GuestFrame::new(&cache, &out, 4, 100);
        assert_eq!(f.len(), 0x1c);
        let mut b = [0u8; 0x1c];
        assert_eq!(f.read_at(0, &mut b), 0x1c);
        assert!(b.iter().all(|&x| x == 7));
    }

    #[test]
    fn guest_frame_reads_match_the_bytes_at_every_offset() {
        let mem = test_mem();
        let bytes: Vec<u8> = (0..200u8).collect();
        mem.write_slice(&bytes[..12], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&bytes[12..100], GuestAddress(0x11_0000))
            .unwrap();
        mem.write_slice(&bytes[100..], GuestAddress(0x12_0000))
            .unwrap();
        let cache = RegionCache::new(&mem);
        // Header alone, then two frame pieces; and everything in one piece.
        let split = [
            Piece {
                addr: 0x10_0000,
                len: 12,
                write: false,
            },
            Piece {
                addr: 0x11_0000,
                len: 88,
                write: false,
            },
            Piece {
                addr: 0x12_0000,
                len: 100,
                write: false,
            },
        ];
        mem.write_slice(&bytes, GuestAddress(0x13_0000)).unwrap();
        let one = [Piece {
            addr: 0x13_0000,
            len: 200,
            write: false,
        }];
        let mut out = [0u8; 256];
        let dst = test_mem();
        for pieces in [&split[..], &one[..]] {
            for (skip, len) in [(12, 188), (12, 50), (0, 200), (5, 300)] {
                let f = GuestFrame::new(&cache, pieces, skip, len);
                let flen = f.len();
                let want = &bytes[skip..skip + flen];
                for off in [0, 1, 13, 87, 88, 99, 150, 187, 188, 250] {
                    for n in [0, 1, 14, 64, 256] {
                        let got = f.read_at(off, &mut out[..n]);
                        let exp = want.get(off..).map_or(0, |w| w.len().min(n));
                        assert_eq!(got, exp, "read_at skip {skip} off {off} n {n}");
                        assert_eq!(&out[..got], &want[off.min(flen)..][..got]);
                        let v = dst.get_slice(GuestAddress(0), n).unwrap();
                        let got = f.copy_to_volatile(off, &v);
                        assert_eq!(got, exp, "copy_to_volatile skip {skip} off {off} n {n}");
                        let mut back = vec![0u8; got];
                        dst.read_slice(&mut back, GuestAddress(0)).unwrap();
                        assert_eq!(&back[..], &want[off.min(flen)..][..got]);
                    }
                }
            }
        }
    }

    #[test]
    fn avail_cursor_checks_and_batches() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 4);
        for _ in 0..3 {
            d.chain(&[(0x10_0000, 10, false)]);
        }
        let mut q = d.queue();
        let cache = RegionCache::new(&mem);
        let mut heads = Vec::new();
        assert!(
            pop_avail(&cache, &mut q, 2, &mut heads).unwrap(),
            "one more left"
        );
        assert_eq!(heads, [0, 1]);
        assert!(!pop_avail(&cache, &mut q, 2, &mut heads).unwrap());
        assert_eq!(heads, [0, 1, 2]);
        assert_eq!(q.next_avail(), 3);
        // A driver more than a queue ahead is refused, as by `Queue::iter`.
        d.mock.avail().idx().store(u16::to_le(100));
        assert!(matches!(
            pop_avail(&cache, &mut q, 2, &mut heads),
            Err(virtio_queue::Error::InvalidAvailRingIndex)
        ));
    }

    #[test]
    fn peek_sees_heads_ahead_without_taking_them() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 4);
        for _ in 0..3 {
            d.chain(&[(0x10_0000, 10, false)]);
        }
        let mut q = d.queue();
        let cache = RegionCache::new(&mem);
        let mut cur = AvailCursor::new(&cache, &q).unwrap();
        assert_eq!(
            (0..4).map(|k| cur.peek(&q, k)).collect::<Vec<_>>(),
            [Some(0), Some(1), Some(2), None],
            "nothing beyond the avail index"
        );
        assert_eq!(q.next_avail(), 0, "peeking takes nothing");
        assert_eq!(cur.next(&mut q), Some(0));
        assert_eq!(cur.peek(&q, 0), Some(1));
        assert_eq!(cur.peek(&q, 1), Some(2));
        assert_eq!(cur.peek(&q, 2), None);
        assert_eq!(cur.peek(&q, u16::MAX), None);
    }

    #[test]
    fn prefetches_ask_for_the_lines_of_their_span_only() {
        let mem = test_mem();
        let cache = RegionCache::new(&mem);
        // A buffer 60 bytes into a cache line: a 76-byte span (header + 64 B frame) covers
        // three lines, a 4-byte one the first only; never more than PREFETCH_LINES.
        let s = cache.slice(0x1000 + 60, 2000).unwrap();
        assert_eq!(prefetch_lines(&s, 76, true), 3);
        assert_eq!(prefetch_lines(&s, 4, false), 1);
        assert_eq!(prefetch_lines(&s, 5, false), 2);
        assert_eq!(prefetch_lines(&s, 2000, false), PREFETCH_LINES);
        // The span stops at the view: the region's last 7 bytes are one line; empty is none.
        let end = cache.slice(0x40_0000 - 7, 7).unwrap();
        assert_eq!(prefetch_lines(&end, usize::MAX, true), 1);
        assert_eq!(
            prefetch_lines(&cache.slice(0x2000, 0).unwrap(), 64, true),
            0
        );
        // Descriptor-driven: only buffers the walk would take.
        let d = Driver::new(&mem, 8);
        d.put(0, 0x40_0000 - 4, 4096, F_WRITE, 0); // runs past the end of memory
        d.put(1, 0x3000, 0, F_WRITE, 0); // empty
        d.put(2, u64::MAX - 8, 64, 0, 0); // outside memory
        d.put(3, 0x3000, 64, F_INDIRECT, 0);
        d.put(4, 0x3000, 2048, F_WRITE, 0);
        d.put(5, 0x3000, 2048, 0, 0);
        d.put(6, 0x3000, 2048, F_WRITE | F_NEXT, 1);
        let q = d.queue();
        let table = DescTable::new(&cache, &q);
        let asked = |write| {
            (0..9)
                .map(|h| table.prefetch_buffer(&cache, h, 76, write))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            asked(false),
            [false, false, false, false, true, true, true, false, false]
        );
        assert_eq!(
            asked(true),
            [false, false, false, false, true, false, false, false, false]
        );
    }

    #[test]
    fn accesses_over_adjacent_regions_still_work() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x10_0000), 0x10_0000),
        ])
        .unwrap();
        let cache = RegionCache::new(&mem);
        assert!(cache.slice(0x0f_fffc, 8).is_none(), "not in one region");
        assert!(cache.write_array(0x0f_fffc, [1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(
            cache.read_array::<8>(0x0f_fffc),
            Some([1, 2, 3, 4, 5, 6, 7, 8])
        );
        assert!(cache.write(0x0f_fffe, &[9, 9, 9, 9]));
        assert_eq!(cache.read_array::<4>(0x0f_fffe), Some([9, 9, 9, 9]));
        assert!(!cache.write_array(0x1f_fffc, [0u8; 8]), "past the end");
        assert_eq!(cache.read_array::<8>(0x1f_fffc), None);
        // An indirect table whose descriptor straddles the boundary.
        let d = Driver::new(&mem, 8);
        mem.write_obj(
            RawDescriptor::from(Descriptor::new(0x5_0000, 60, 0, 0)),
            GuestAddress(0x0f_fff8),
        )
        .unwrap();
        d.put(0, 0x0f_fff8, 16, F_INDIRECT, 0);
        let q = d.queue();
        let mut out = Vec::new();
        let n = walk_chain(&mem, q.desc_table(), 8, 0, Dir::Read, 1 << 20, &mut out).unwrap();
        assert_eq!((n, out.len()), (60, 1));
    }

    #[test]
    fn used_ring_publish_and_event_idx() {
        let mem = test_mem();
        let d = Driver::new(&mem, 8);
        let mut q = d.queue();
        write_used_elem(&mem, &q, 0, 3, 42).unwrap();
        write_used_elem(&mem, &q, 1, 4, 43).unwrap();
        assert_eq!(d.used_idx(), 0, "not visible before publish");
        let (old, new) = publish_used(&mem, &mut q, 2).unwrap();
        assert_eq!((old, new), (0, 2));
        assert_eq!(d.used_idx(), 2);
        assert_eq!(d.used(0), (3, 42));
        assert_eq!(d.used(1), (4, 43));
        assert_eq!(q.next_used(), 2);
        assert!(should_notify(&mem, &q, 0, 2));
        assert!(!should_notify(&mem, &q, 2, 2));
        assert!(need_event(0, 1, 0));
        assert!(!need_event(5, 3, 0));
        assert!(need_event(0xffff, 1, 0xfffe));
    }

    #[test]
    fn used_ring_view_writes_what_the_general_path_writes() {
        let mem = test_mem();
        let d = Driver::new(&mem, 8);
        let q = d.queue();
        let cache = RegionCache::new(&mem);
        let used = UsedRing::new(&cache, &q);
        assert!(used.entries.is_some());
        // Free-running slots wrap around the ring.
        for (slot, head, len) in [(0u16, 3u16, 42u32), (7, 5, 0), (8, 6, 1514), (0xffff, 7, 9)] {
            used.write(&cache, &q, slot, head, len).unwrap();
            assert_eq!(d.used(slot % 8), (u32::from(head), len), "slot {slot}");
            write_used_elem_in(&cache, &q, slot, head + 1, len + 1).unwrap();
            assert_eq!(d.used(slot % 8), (u32::from(head) + 1, len + 1));
        }
        // A used ring outside guest memory: no view, and the write fails as the general
        // path's does.
        let mut bad = d.queue();
        bad.set_used_ring_address(Some(0x3f_fff0), None);
        let view = UsedRing::new(&cache, &bad);
        assert!(view.entries.is_none());
        assert!(view.write(&cache, &bad, 1, 0, 0).is_err());
    }

    /// The bytes of a frame, through `read_at` and through its segments.
    fn frame_bytes(f: &dyn Frame) -> Vec<u8> {
        let mut v = vec![0u8; f.len()];
        assert_eq!(f.read_at(0, &mut v), f.len());
        let mut w = Vec::new();
        f.for_each_segment(&mut |s| {
            let mut b = vec![0u8; s.len()];
            s.read_at(0, &mut b);
            w.extend_from_slice(&b);
            true
        });
        assert_eq!(v, w, "read_at and the segments agree");
        v
    }

    #[test]
    fn segs_walk_agrees_with_the_piece_walk() {
        // Two adjacent regions, so that some ranges are split at the boundary.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x10_0000), 0x30_0000),
        ])
        .unwrap();
        let bytes: Vec<u8> = (0..=255u8).cycle().take(0x4000).collect();
        mem.write_slice(&bytes, GuestAddress(0x0f_e000)).unwrap();
        let mut d = Driver::new(&mem, 256);
        let mut heads = vec![
            d.chain(&[(0x0f_e000, 100, false)]),
            d.chain(&[(0x0f_e000, 5, false), (0x0f_f000, 0x2000, false)]),
            d.chain(&[
                (0x0f_e000, 12, false),
                (0x0f_e100, 0, false),
                (0x0f_e200, 60, false),
            ]),
            d.chain(&[(0x3f_fff0, 100, false)]),
            d.chain(&[(0x0f_e000, 10, true)]),
            d.chain(&[(0x0f_e000, 0x30_0000, false)]),
        ];
        // One descriptor more than a `Segs` holds, and exactly as many.
        for n in [MAX_SEGS + 1, MAX_SEGS] {
            let bufs: Vec<(u64, u32, bool)> = (0..n as u64)
                .map(|i| (0x0f_e000 + 3 * i, 3, false))
                .collect();
            heads.push(d.chain(&bufs));
        }
        // A loop.
        d.put(250, 0x0f_e000, 10, F_NEXT, 251);
        d.put(251, 0x0f_e000, 10, F_NEXT, 250);
        heads.push(250);
        let q = d.queue();
        let cache = RegionCache::new(&mem);
        let mut segs = Segs::new();
        let mut full = 0;
        for &h in &heads {
            let mut pieces = Vec::new();
            let want = walk_chain_in(
                &cache,
                q.desc_table(),
                256,
                h,
                Dir::Read,
                1 << 20,
                &mut pieces,
            );
            let got = walk_chain_segs(
                &cache,
                &DescTable::new(&cache, &q),
                h,
                Dir::Read,
                1 << 20,
                &mut segs,
            );
            match (want, got) {
                // Full: the caller walks again with `walk_chain_in`, which decides (here a
                // long good chain, and a loop that fills the `Segs` before it is caught).
                (want, Ok(None)) => {
                    assert!(
                        pieces.len() > MAX_SEGS || want == Err(DropReason::ChainLoop),
                        "head {h}"
                    );
                    full += 1;
                }
                (Ok(n), Ok(Some(m))) => {
                    assert_eq!(n, m, "head {h}");
                    assert_eq!(segs.total(), n);
                    assert_eq!(segs.as_slice().len(), pieces.len(), "head {h}");
                    for skip in [0, 1, 5, 12, 13, n.saturating_sub(1), n, n + 4] {
                        let g = GuestFrame::new(&cache, &pieces, skip, usize::MAX);
                        let f = segs.frame_after(skip);
                        assert_eq!(f.len(), g.len(), "head {h} skip {skip}");
                        assert_eq!(frame_bytes(&f), frame_bytes(&g), "head {h} skip {skip}");
                        for off in [0, 1, 7, 95, 200] {
                            let mut a = [0u8; 40];
                            let mut b = [0u8; 40];
                            assert_eq!(f.read_at(off, &mut a), g.read_at(off, &mut b));
                            assert_eq!(a, b);
                        }
                        // The header fast path reads what `read_at` reads, short frames and
                        // headers split over ranges included.
                        let mut a = [0u8; ETH_VLAN_HEADER_LEN];
                        let mut b = [0u8; ETH_VLAN_HEADER_LEN];
                        assert_eq!(f.read_head(&mut a), g.read_at(0, &mut b), "head {h}");
                        assert_eq!(a, b, "head {h} skip {skip}");
                    }
                    let mut raw = [0u8; 12];
                    let n12 = read_pieces_in(&cache, &pieces, 0, &mut raw);
                    assert_eq!(segs.read_prefix::<12>(), (n12 == 12).then_some(raw));
                }
                (want, got) => assert_eq!(want.map(Some), got, "head {h}"),
            }
        }
        assert_eq!(full, 2);
    }

    #[test]
    fn ring_slot_is_the_remainder() {
        for size in [1u16, 2, 4, 256, 1024, 32768, 3, 100] {
            for idx in [0u16, 1, 2, 255, 256, 1023, 1024, 40000, u16::MAX] {
                assert_eq!(ring_slot(idx, size), idx % size, "{idx} % {size}");
            }
        }
        assert_eq!(ring_slot(7, 0), 0);
    }
}
