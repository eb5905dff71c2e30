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

use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use virtio_bindings::bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use virtnet_switch::{DropReason, Frame, Segment};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
    let mut table = desc_table;
    let mut table_len = u32::from(queue_size);
    let mut idx = u32::from(head);
    let mut indirect = false;
    let mut visited = 0u32;
    let mut total = 0usize;
    let mut seen_write = false;
    loop {
        if idx >= table_len {
            return Err(DropReason::ChainLoop);
        }
        visited += 1;
        if visited > table_len {
            return Err(DropReason::ChainLoop);
        }
        let at = table
            .checked_add(u64::from(idx) * 16)
            .ok_or(DropReason::BadAddress)?;
        let d: Descriptor = mem
            .read_obj(GuestAddress(at))
            .map_err(|_| DropReason::BadAddress)?;
        let flags = u32::from(d.flags());
        if flags & VRING_DESC_F_INDIRECT != 0 {
            // Only one level, only as the last descriptor of the direct chain.
            if indirect || flags & VRING_DESC_F_NEXT != 0 {
                return Err(DropReason::ChainLoop);
            }
            let len = d.len();
            if len == 0 || len % 16 != 0 || len / 16 > MAX_INDIRECT {
                return Err(DropReason::ChainLoop);
            }
            table = d.addr().0;
            table_len = len / 16;
            idx = 0;
            visited = 0;
            indirect = true;
            continue;
        }
        let write = flags & VRING_DESC_F_WRITE != 0;
        match dir {
            Dir::Read if write => return Err(DropReason::BadDirection),
            Dir::Write if !write => return Err(DropReason::BadDirection),
            Dir::ReadThenWrite if seen_write && !write => return Err(DropReason::BadDirection),
            _ => {}
        }
        seen_write |= write;
        let len = d.len() as usize;
        if len > 0 {
            total = total.saturating_add(len);
            if total > max_total {
                return Err(DropReason::FrameTooLong);
            }
            push_pieces(mem, d.addr().0, len, write, out)?;
        }
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(total);
        }
        idx = u32::from(d.next());
    }
}

/// Split `[addr, addr + len)` at region boundaries, checking it lies in guest memory.
fn push_pieces(
    mem: &GuestMemoryMmap,
    addr: u64,
    len: usize,
    write: bool,
    out: &mut Vec<Piece>,
) -> std::result::Result<(), DropReason> {
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
    GuestFrame::new(mem, pieces, offset, usize::MAX).read_at(0, dst)
}

/// A frame view over validated pieces of a chain, skipping the first `skip` bytes (the
/// virtio header). Each segment is a bounds-checked `VolatileSlice` into guest memory.
pub struct GuestFrame<'a> {
    mem: &'a GuestMemoryMmap,
    pieces: &'a [Piece],
    skip: usize,
    len: usize,
}

impl<'a> GuestFrame<'a> {
    /// A view of `len` bytes (clamped to what the pieces hold) after the first `skip` bytes.
    pub fn new(mem: &'a GuestMemoryMmap, pieces: &'a [Piece], skip: usize, len: usize) -> Self {
        let avail = pieces
            .iter()
            .map(|p| p.len as usize)
            .sum::<usize>()
            .saturating_sub(skip);
        GuestFrame {
            mem,
            pieces,
            skip,
            len: len.min(avail),
        }
    }
}

impl Frame for GuestFrame<'_> {
    fn len(&self) -> usize {
        self.len
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
            let Ok(s) = self.mem.get_slice(GuestAddress(p.addr + skip as u64), n) else {
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

/// Write used element number `slot` (a free-running index) without publishing it.
pub fn write_used_elem(
    mem: &GuestMemoryMmap,
    queue: &Queue,
    slot: u16,
    head: u16,
    len: u32,
) -> Result<()> {
    let size = queue.size().max(1);
    let off = 4 + u64::from(slot % size) * 8;
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&u32::from(head).to_le_bytes());
    b[4..].copy_from_slice(&len.to_le_bytes());
    let addr = queue.used_ring().checked_add(off).ok_or(Error::UsedRing(
        vm_memory::GuestMemoryError::InvalidBackendAddress,
    ))?;
    mem.write_slice(&b, GuestAddress(addr))
        .map_err(Error::UsedRing)
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
        let f = GuestFrame::new(&mem, &out, 4, 100);
        assert_eq!(f.len(), 0x1c);
        let mut b = [0u8; 0x1c];
        assert_eq!(f.read_at(0, &mut b), 0x1c);
        assert!(b.iter().all(|&x| x == 7));
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
}
