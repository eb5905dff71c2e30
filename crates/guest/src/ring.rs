//! The driver side of a split virtqueue (virtio 1.x §2.7), written by hand on top of
//! bounds-checked vm-memory accesses.
//!
//! ```text
//!  descriptor table (16 B each)      avail ring (driver → device)     used ring (device → driver)
//!  ┌────┬─────┬──────┬──────┐       ┌───────┬─────┬──────────┐       ┌───────┬─────┬──────────────┐
//!  │addr│ len │flags │ next │ 0     │ flags │ idx │ ring[N]  │       │ flags │ idx │ {id,len}[N]  │
//!  ├────┼─────┼──────┼──────┤       │  u16  │ u16 │  u16 ... │       │  u16  │ u16 │  u32,u32 ... │
//!  │    │     │      │      │ 1     └───────┴─────┴──────────┘       └───────┴─────┴──────────────┘
//!  │ …  │     │      │      │        + used_event (u16)                + avail_event (u16)
//!  └────┴─────┴──────┴──────┘          (EVENT_IDX)                       (EVENT_IDX)
//! ```
//!
//! The driver keeps a *shadow* of everything it owns and never trusts what it reads back from
//! the device except the used ring, which it validates: `next` links live in [`SplitRing`]
//! (`next`), the number of descriptors of each in-flight chain in `chain_len`, and a caller
//! token per head (`tokens`). Free descriptors form a singly linked list through `next`.
//!
//! Ordering: descriptor and ring-slot writes are plain (volatile) stores; `avail.idx` is published
//! with a Release store and `used.idx` read with an Acquire load. Before deciding whether to
//! kick (or to sleep), a SeqCst fence orders our index store against the device's event field.

use std::sync::atomic::{fence, Ordering};

use crate::mem::{self, GuestMem};

/// `VRING_DESC_F_NEXT`: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`: the device writes this buffer.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`: the buffer is a table of descriptors.
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver does not want used-buffer notifications.
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `VRING_USED_F_NO_NOTIFY`: the device does not want available-buffer notifications.
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;
/// Largest split queue size allowed by the spec.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Bytes of one descriptor.
pub const DESC_SIZE: u64 = 16;

/// Errors of the split ring.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The queue size is zero, not a power of two, or above 32768.
    #[error("Invalid queue size {0}")]
    InvalidSize(u16),
    /// Not enough free descriptors.
    #[error("Queue full: need {need} descriptors, {free} free")]
    Full {
        /// Descriptors needed.
        need: usize,
        /// Descriptors free.
        free: usize,
    },
    /// A chain must have at least one buffer.
    #[error("Empty descriptor chain")]
    EmptyChain,
    /// Guest memory access failed.
    #[error("Ring memory access failed")]
    Mem(#[from] mem::Error),
    /// Atomic index access failed.
    #[error("Ring index access failed")]
    Index(#[source] vm_memory::GuestMemoryError),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// An index or flags access that failed: [`Error::Index`] for an address outside guest memory.
fn index_error(e: mem::Error) -> Error {
    match e {
        mem::Error::Access(g) => Error::Index(g),
        other => Error::Mem(other),
    }
}

/// One buffer of a chain to add: guest-physical address, length, device-writable or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// True for a device-writable (RX) buffer.
    pub write: bool,
}

/// One descriptor exactly as it sits in the table (used by the raw interface).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDesc {
    /// `addr` field.
    pub addr: u64,
    /// `len` field.
    pub len: u32,
    /// `flags` field (`VRING_DESC_F_*`).
    pub flags: u16,
    /// `next` field. `None` in [`crate::RawQueue::push_chain`] means "link to the next
    /// descriptor of this chain" (0 for the last one).
    pub next: Option<u16>,
}

impl RawDesc {
    /// A device-readable buffer.
    pub fn read(addr: u64, len: u32) -> Self {
        RawDesc {
            addr,
            len,
            flags: 0,
            next: None,
        }
    }

    /// A device-writable buffer.
    pub fn write(addr: u64, len: u32) -> Self {
        RawDesc {
            addr,
            len,
            flags: VRING_DESC_F_WRITE,
            next: None,
        }
    }

    /// Encodes the 16-byte little-endian table entry.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.unwrap_or(0).to_le_bytes());
        b
    }
}

/// One entry taken from the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index the device reported.
    pub id: u32,
    /// Bytes the device wrote.
    pub len: u32,
    /// The token given when the chain was added; `None` when `id` is not an in-flight head
    /// (a device bug, or a chain published through the raw interface).
    pub token: Option<u64>,
}

/// `vring_need_event()` from the spec: must a notification be sent when the index moves from
/// `old` to `new`, given the other side's event index?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Driver state of one split virtqueue.
#[derive(Debug)]
pub struct SplitRing {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    free_head: u16,
    num_free: u16,
    next: Vec<u16>,
    chain_len: Vec<u16>,
    tokens: Vec<u64>,
    avail_idx: u16,
    kicked_avail: u16,
    last_used: u16,
    /// The used index as last read: entries up to it can be popped without reading it again.
    used_seen: u16,
}

impl SplitRing {
    /// Bytes of the descriptor table, avail ring and used ring for `size` entries.
    pub fn layout(size: u16) -> (u64, u64, u64) {
        let n = u64::from(size);
        (DESC_SIZE * n, 6 + 2 * n, 6 + 8 * n)
    }

    /// Allocates and zeroes the three parts of a ring of `size` entries in `mem`.
    pub fn new(mem: &mut GuestMem, size: u16, event_idx: bool) -> Result<Self> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(Error::InvalidSize(size));
        }
        let (d, a, u) = Self::layout(size);
        let desc = mem.alloc(d, 4096)?;
        let avail = mem.alloc(a, 2)?;
        let used = mem.alloc(u, 4096)?;
        let n = usize::from(size);
        let next = (1..=size).map(|i| i % size).collect();
        Ok(SplitRing {
            size,
            desc,
            avail,
            used,
            event_idx,
            free_head: 0,
            num_free: size,
            next,
            chain_len: vec![0; n],
            tokens: vec![0; n],
            avail_idx: 0,
            kicked_avail: 0,
            last_used: 0,
            used_seen: 0,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// GPA of the descriptor table.
    pub fn desc_addr(&self) -> u64 {
        self.desc
    }

    /// GPA of the avail ring.
    pub fn avail_addr(&self) -> u64 {
        self.avail
    }

    /// GPA of the used ring.
    pub fn used_addr(&self) -> u64 {
        self.used
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// The descriptor the next chain will start at, if any is free.
    pub fn peek_free_head(&self) -> Option<u16> {
        (self.num_free > 0).then_some(self.free_head)
    }

    /// Chains handed to the device and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.chain_len.iter().filter(|&&l| l > 0).count()
    }

    /// The avail index the driver will publish next (its shadow).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The next used index the driver will consume.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    fn store_u16(&self, mem: &GuestMem, gpa: u64, v: u16, order: Ordering) -> Result<()> {
        mem.store_u16(gpa, v, order).map_err(index_error)
    }

    fn load_u16(&self, mem: &GuestMem, gpa: u64, order: Ordering) -> Result<u16> {
        mem.load_u16(gpa, order).map_err(index_error)
    }

    /// `size - 1`: ring positions modulo the (power-of-two) size without a division.
    #[inline]
    fn mask(&self) -> u16 {
        self.size.wrapping_sub(1)
    }

    /// Writes one descriptor table entry (no free-list bookkeeping).
    pub fn write_desc(&self, mem: &GuestMem, index: u16, d: &RawDesc) -> Result<()> {
        let gpa = self.desc + DESC_SIZE * u64::from(index & self.mask());
        Ok(mem.write_array(gpa, d.encode())?)
    }

    /// Takes `n` descriptors off the free list and returns their indices in chain order
    /// (written into `out`, which must hold `n`).
    fn take(&mut self, n: usize, out: &mut [u16]) -> Result<()> {
        if n == 0 {
            return Err(Error::EmptyChain);
        }
        if n > usize::from(self.num_free) {
            return Err(Error::Full {
                need: n,
                free: usize::from(self.num_free),
            });
        }
        let mut i = self.free_head;
        for slot in out.iter_mut().take(n) {
            *slot = i;
            i = self.next[usize::from(i)];
        }
        self.free_head = i;
        // n <= num_free <= u16::MAX.
        self.num_free -= n as u16;
        Ok(())
    }

    /// Adds a chain of direct descriptors for `segs` and places its head in the next avail slot
    /// (not yet published). Returns the head index.
    pub fn add(&mut self, mem: &GuestMem, segs: &[Seg], token: u64) -> Result<u16> {
        let n = segs.len();
        if n == 0 {
            return Err(Error::EmptyChain);
        }
        if n > usize::from(self.num_free) {
            return Err(Error::Full {
                need: n,
                free: usize::from(self.num_free),
            });
        }
        let head = self.free_head;
        let mut idx = head;
        for (k, s) in segs.iter().enumerate() {
            let next = self.next[usize::from(idx)];
            let last = k + 1 == n;
            let d = RawDesc {
                addr: s.addr,
                len: s.len,
                flags: if s.write { VRING_DESC_F_WRITE } else { 0 }
                    | if last { 0 } else { VRING_DESC_F_NEXT },
                next: Some(if last { 0 } else { next }),
            };
            self.write_desc(mem, idx, &d)?;
            if !last {
                idx = next;
            }
        }
        self.free_head = self.next[usize::from(idx)];
        // n <= num_free <= u16::MAX.
        self.num_free -= n as u16;
        self.chain_len[usize::from(head)] = n as u16;
        self.tokens[usize::from(head)] = token;
        self.push_avail(mem, head)?;
        Ok(head)
    }

    /// Adds one ring descriptor pointing at an indirect table at `table` (which must have
    /// room for `segs.len()` entries) and places it in the next avail slot.
    pub fn add_indirect(
        &mut self,
        mem: &GuestMem,
        table: u64,
        segs: &[Seg],
        token: u64,
    ) -> Result<u16> {
        let n = segs.len();
        if n == 0 {
            return Err(Error::EmptyChain);
        }
        let mut head = [0u16; 1];
        self.take(1, &mut head)?;
        let head = head[0];
        for (k, s) in segs.iter().enumerate() {
            let last = k + 1 == n;
            let d = RawDesc {
                addr: s.addr,
                len: s.len,
                flags: if s.write { VRING_DESC_F_WRITE } else { 0 }
                    | if last { 0 } else { VRING_DESC_F_NEXT },
                // k + 1 < n <= u16::MAX (callers bound the table size).
                next: Some(if last { 0 } else { (k + 1) as u16 }),
            };
            mem.write(table + DESC_SIZE * k as u64, &d.encode())?;
        }
        let d = RawDesc {
            addr: table,
            len: u32::try_from(DESC_SIZE * n as u64).unwrap_or(u32::MAX),
            flags: VRING_DESC_F_INDIRECT,
            next: Some(0),
        };
        self.write_desc(mem, head, &d)?;
        self.chain_len[usize::from(head)] = 1;
        self.tokens[usize::from(head)] = token;
        self.push_avail(mem, head)?;
        Ok(head)
    }

    /// Allocates `descs.len()` descriptors from the free list and writes them verbatim, except
    /// that `next: None` links to the following descriptor of the chain (0 for the last) and
    /// `VRING_DESC_F_NEXT` is set on every descriptor but the last. Does not touch the avail
    /// ring. The chain is tracked as in flight with `token`; returns the head index.
    pub fn add_raw(&mut self, mem: &GuestMem, descs: &[RawDesc], token: u64) -> Result<u16> {
        let n = descs.len();
        if n == 0 {
            return Err(Error::EmptyChain);
        }
        let head = self.free_head;
        let mut idxs = vec![0u16; n];
        self.take(n, &mut idxs)?;
        for (k, d) in descs.iter().enumerate() {
            let last = k + 1 == n;
            let mut d = *d;
            if !last {
                d.flags |= VRING_DESC_F_NEXT;
            }
            if d.next.is_none() {
                d.next = Some(if last { 0 } else { idxs[k + 1] });
            }
            self.write_desc(mem, idxs[k], &d)?;
        }
        self.chain_len[usize::from(head)] = n as u16;
        self.tokens[usize::from(head)] = token;
        Ok(head)
    }

    /// Writes `head` into the next avail slot and advances the shadow avail index (not yet
    /// published).
    pub fn push_avail(&mut self, mem: &GuestMem, head: u16) -> Result<()> {
        let slot = u64::from(self.avail_idx & self.mask());
        mem.write_array(self.avail + 4 + 2 * slot, head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// True when entries were pushed since the last kick decision.
    pub fn has_unpublished(&self) -> bool {
        self.avail_idx != self.kicked_avail
    }

    /// Publishes the shadow avail index to the device (Release).
    pub fn publish(&mut self, mem: &GuestMem) -> Result<()> {
        self.store_u16(mem, self.avail + 2, self.avail_idx, Ordering::Release)
    }

    /// Stores an arbitrary avail index (raw interface) and makes it the shadow.
    pub fn set_avail_idx(&mut self, mem: &GuestMem, idx: u16) -> Result<()> {
        self.avail_idx = idx;
        self.publish(mem)
    }

    /// Decides whether the device wants a kick for what was published since the last call
    /// (`avail_event` with EVENT_IDX, else `used.flags & NO_NOTIFY`).
    pub fn needs_kick(&mut self, mem: &GuestMem) -> Result<bool> {
        fence(Ordering::SeqCst);
        let old = self.kicked_avail;
        let new = self.avail_idx;
        self.kicked_avail = new;
        if self.event_idx {
            let event = self.load_u16(
                mem,
                self.used + 4 + 8 * u64::from(self.size),
                Ordering::Acquire,
            )?;
            Ok(need_event(event, new, old))
        } else {
            let flags = self.load_u16(mem, self.used, Ordering::Acquire)?;
            Ok(flags & VRING_USED_F_NO_NOTIFY == 0)
        }
    }

    /// The device's used index (Acquire).
    pub fn used_idx(&self, mem: &GuestMem) -> Result<u16> {
        self.load_u16(mem, self.used + 2, Ordering::Acquire)
    }

    /// True when the used ring holds entries the driver has not consumed.
    pub fn has_used(&self, mem: &GuestMem) -> Result<bool> {
        Ok(self.used_idx(mem)? != self.last_used)
    }

    /// Number of used entries not yet consumed.
    pub fn pending_used(&self, mem: &GuestMem) -> Result<u16> {
        Ok(self.used_idx(mem)?.wrapping_sub(self.last_used))
    }

    /// Takes the next used entry, frees its chain and returns its token.
    pub fn pop_used(&mut self, mem: &GuestMem) -> Result<Option<UsedElem>> {
        // The used index is read (Acquire) only when the entries seen last time are all taken:
        // the ones before it were written before it was published.
        if self.used_seen == self.last_used {
            self.used_seen = self.used_idx(mem)?;
            if self.used_seen == self.last_used {
                return Ok(None);
            }
        }
        let slot = u64::from(self.last_used & self.mask());
        let b: [u8; 8] = mem.read_array(self.used + 4 + 8 * slot)?;
        self.last_used = self.last_used.wrapping_add(1);
        let id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let token = self.free_chain(id);
        Ok(Some(UsedElem { id, len, token }))
    }

    /// Returns the chain at `id` to the free list if it is in flight.
    fn free_chain(&mut self, id: u32) -> Option<u64> {
        let head = u16::try_from(id).ok().filter(|&h| h < self.size)?;
        let n = self.chain_len[usize::from(head)];
        if n == 0 {
            return None;
        }
        let mut last = head;
        for _ in 1..n {
            last = self.next[usize::from(last)];
        }
        self.next[usize::from(last)] = self.free_head;
        self.free_head = head;
        self.num_free += n;
        self.chain_len[usize::from(head)] = 0;
        Some(self.tokens[usize::from(head)])
    }

    /// Asks for used-buffer notifications from the current position on. Returns true when
    /// used entries are already pending (the caller must not sleep then).
    pub fn enable_notify(&mut self, mem: &GuestMem) -> Result<bool> {
        if self.event_idx {
            self.store_u16(
                mem,
                self.avail + 4 + 2 * u64::from(self.size),
                self.last_used,
                Ordering::Relaxed,
            )?;
        }
        self.store_u16(mem, self.avail, 0, Ordering::Relaxed)?;
        fence(Ordering::SeqCst);
        self.has_used(mem)
    }

    /// Suppresses used-buffer notifications (best effort: with EVENT_IDX the device may still
    /// send one more).
    pub fn disable_notify(&mut self, mem: &GuestMem) -> Result<()> {
        if self.event_idx {
            self.store_u16(
                mem,
                self.avail + 4 + 2 * u64::from(self.size),
                self.last_used.wrapping_sub(1),
                Ordering::Relaxed,
            )?;
        }
        self.store_u16(
            mem,
            self.avail,
            VRING_AVAIL_F_NO_INTERRUPT,
            Ordering::Relaxed,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use assert_matches::assert_matches;

    /// Plays the device: reads avail, writes used entries, like a backend would.
    struct Dev {
        last_avail: u16,
        used_idx: u16,
    }

    impl Dev {
        fn new() -> Self {
            Dev {
                last_avail: 0,
                used_idx: 0,
            }
        }

        fn avail_idx(&self, m: &GuestMem, r: &SplitRing) -> u16 {
            let mut b = [0u8; 2];
            m.read(r.avail_addr() + 2, &mut b).unwrap();
            u16::from_le_bytes(b)
        }

        /// Pops one available head and walks its chain, returning the descriptors.
        fn pop(&mut self, m: &GuestMem, r: &SplitRing) -> Option<(u16, Vec<RawDesc>)> {
            if self.avail_idx(m, r) == self.last_avail {
                return None;
            }
            let mut b = [0u8; 2];
            let slot = u64::from(self.last_avail % r.size());
            m.read(r.avail_addr() + 4 + 2 * slot, &mut b).unwrap();
            self.last_avail = self.last_avail.wrapping_add(1);
            let head = u16::from_le_bytes(b);
            let mut out = Vec::new();
            let mut i = head;
            loop {
                let mut d = [0u8; 16];
                m.read(r.desc_addr() + 16 * u64::from(i), &mut d).unwrap();
                let rd = RawDesc {
                    addr: u64::from_le_bytes(d[0..8].try_into().unwrap()),
                    len: u32::from_le_bytes(d[8..12].try_into().unwrap()),
                    flags: u16::from_le_bytes(d[12..14].try_into().unwrap()),
                    next: Some(u16::from_le_bytes(d[14..16].try_into().unwrap())),
                };
                out.push(rd);
                if rd.flags & VRING_DESC_F_NEXT == 0 {
                    break;
                }
                i = rd.next.unwrap();
            }
            Some((head, out))
        }

        fn put(&mut self, m: &GuestMem, r: &SplitRing, id: u32, len: u32) {
            let slot = u64::from(self.used_idx % r.size());
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&id.to_le_bytes());
            b[4..].copy_from_slice(&len.to_le_bytes());
            m.write(r.used_addr() + 4 + 8 * slot, &b).unwrap();
            self.used_idx = self.used_idx.wrapping_add(1);
            m.write(r.used_addr() + 2, &self.used_idx.to_le_bytes())
                .unwrap();
        }
    }

    fn setup(size: u16, event_idx: bool) -> (GuestMem, SplitRing) {
        let mut m = GuestMem::new(0, 1 << 20).unwrap();
        let r = SplitRing::new(&mut m, size, event_idx).unwrap();
        (m, r)
    }

    #[test]
    fn invalid_sizes() {
        let mut m = GuestMem::new(0, 1 << 20).unwrap();
        assert_matches!(SplitRing::new(&mut m, 0, false), Err(Error::InvalidSize(0)));
        assert_matches!(SplitRing::new(&mut m, 3, false), Err(Error::InvalidSize(3)));
        assert_matches!(
            SplitRing::new(&mut m, 65535, false),
            Err(Error::InvalidSize(_))
        );
    }

    #[test]
    fn used_entries_published_while_popping_are_all_seen() {
        let (m, mut r) = setup(8, false);
        let mut dev = Dev::new();
        let seg = |addr| Seg {
            addr,
            len: 60,
            write: false,
        };
        let heads: Vec<u16> = (0..4)
            .map(|i| r.add(&m, &[seg(0x8000 + 0x100 * i)], i).unwrap())
            .collect();
        r.publish(&m).unwrap();
        for _ in 0..4 {
            dev.pop(&m, &r).unwrap();
        }
        // Two used, one popped; a third published before the next pop; then the last.
        dev.put(&m, &r, u32::from(heads[0]), 0);
        dev.put(&m, &r, u32::from(heads[1]), 0);
        assert_eq!(r.pop_used(&m).unwrap().unwrap().token, Some(0));
        dev.put(&m, &r, u32::from(heads[2]), 0);
        assert_eq!(r.pop_used(&m).unwrap().unwrap().token, Some(1));
        assert_eq!(r.pop_used(&m).unwrap().unwrap().token, Some(2));
        assert!(r.pop_used(&m).unwrap().is_none());
        dev.put(&m, &r, u32::from(heads[3]), 0);
        assert_eq!(r.pop_used(&m).unwrap().unwrap().token, Some(3));
        assert!(r.pop_used(&m).unwrap().is_none());
        assert_eq!(r.num_free(), 8);
    }

    #[test]
    fn layout_sizes_match_spec() {
        assert_eq!(SplitRing::layout(256), (4096, 6 + 512, 6 + 2048));
    }

    #[test]
    fn chain_round_trip_and_free_list() {
        let (m, mut r) = setup(8, false);
        let mut dev = Dev::new();
        let segs = [
            Seg {
                addr: 0x8000,
                len: 12,
                write: false,
            },
            Seg {
                addr: 0x9000,
                len: 60,
                write: false,
            },
        ];
        let h = r.add(&m, &segs, 77).unwrap();
        assert_eq!(r.num_free(), 6);
        // Not visible before publish.
        assert!(dev.pop(&m, &r).is_none());
        r.publish(&m).unwrap();
        let (head, chain) = dev.pop(&m, &r).unwrap();
        assert_eq!(head, h);
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].addr, 0x8000);
        assert_eq!(chain[0].flags, VRING_DESC_F_NEXT);
        assert_eq!(chain[1].len, 60);
        assert_eq!(chain[1].flags, 0);
        assert!(r.pop_used(&m).unwrap().is_none());
        dev.put(&m, &r, u32::from(head), 0);
        let u = r.pop_used(&m).unwrap().unwrap();
        assert_eq!(u.token, Some(77));
        assert_eq!(r.num_free(), 8);
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn fills_whole_ring_then_full_then_wraps() {
        let (m, mut r) = setup(4, false);
        let mut dev = Dev::new();
        let w = |a| Seg {
            addr: a,
            len: 100,
            write: true,
        };
        // Run enough rounds to wrap the 16-bit indices' ring slots many times.
        for round in 0..40u64 {
            for k in 0..4 {
                r.add(&m, &[w(0x1000 * k)], round * 10 + k).unwrap();
            }
            assert_matches!(r.add(&m, &[w(0)], 0), Err(Error::Full { need: 1, free: 0 }));
            r.publish(&m).unwrap();
            let mut heads = Vec::new();
            while let Some((h, c)) = dev.pop(&m, &r) {
                assert_eq!(c[0].flags, VRING_DESC_F_WRITE);
                heads.push(h);
            }
            assert_eq!(heads.len(), 4);
            // Complete out of order.
            for h in heads.iter().rev() {
                dev.put(&m, &r, u32::from(*h), 50);
            }
            let mut toks = Vec::new();
            while let Some(u) = r.pop_used(&m).unwrap() {
                assert_eq!(u.len, 50);
                toks.push(u.token.unwrap());
            }
            toks.sort();
            assert_eq!(toks, (0..4).map(|k| round * 10 + k).collect::<Vec<_>>());
        }
    }

    #[test]
    fn bogus_used_ids_do_not_corrupt_free_list() {
        let (m, mut r) = setup(4, false);
        let mut dev = Dev::new();
        let h = r
            .add(
                &m,
                &[Seg {
                    addr: 0,
                    len: 1,
                    write: false,
                }],
                5,
            )
            .unwrap();
        dev.put(&m, &r, 9999, 0); // out of range
        dev.put(&m, &r, 3, 0); // not in flight
        dev.put(&m, &r, u32::from(h), 0);
        dev.put(&m, &r, u32::from(h), 0); // twice
        assert_eq!(r.pop_used(&m).unwrap().unwrap().token, None);
        assert_eq!(r.pop_used(&m).unwrap().unwrap().token, None);
        assert_eq!(r.pop_used(&m).unwrap().unwrap().token, Some(5));
        assert_eq!(r.pop_used(&m).unwrap().unwrap().token, None);
        assert_eq!(r.num_free(), 4);
    }

    #[test]
    fn indirect_chain() {
        let (mut m, mut r) = setup(4, false);
        let mut dev = Dev::new();
        let table = m.alloc(16 * 3, 16).unwrap();
        let segs = [
            Seg {
                addr: 0x100,
                len: 12,
                write: false,
            },
            Seg {
                addr: 0x200,
                len: 20,
                write: false,
            },
            Seg {
                addr: 0x300,
                len: 30,
                write: false,
            },
        ];
        r.add_indirect(&m, table, &segs, 1).unwrap();
        assert_eq!(r.num_free(), 3);
        r.publish(&m).unwrap();
        let (_, c) = dev.pop(&m, &r).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].flags, VRING_DESC_F_INDIRECT);
        assert_eq!(c[0].addr, table);
        assert_eq!(c[0].len, 48);
        let mut d = [0u8; 16];
        m.read(table + 16, &mut d).unwrap();
        assert_eq!(u64::from_le_bytes(d[0..8].try_into().unwrap()), 0x200);
        assert_eq!(u16::from_le_bytes(d[12..14].try_into().unwrap()), 1);
        assert_eq!(u16::from_le_bytes(d[14..16].try_into().unwrap()), 2);
    }

    #[test]
    fn need_event_matches_spec() {
        // Device asked to be notified when avail idx passes 5.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(9, 8, 3));
        // Wrap-around.
        assert!(need_event(65535, 2, 65530));
        assert!(!need_event(3, 2, 65530));
    }

    #[test]
    fn kick_suppression_without_event_idx() {
        let (m, mut r) = setup(4, false);
        let s = Seg {
            addr: 0,
            len: 1,
            write: false,
        };
        r.add(&m, &[s], 0).unwrap();
        r.publish(&m).unwrap();
        assert!(r.needs_kick(&m).unwrap());
        m.write(r.used_addr(), &VRING_USED_F_NO_NOTIFY.to_le_bytes())
            .unwrap();
        r.add(&m, &[s], 0).unwrap();
        r.publish(&m).unwrap();
        assert!(!r.needs_kick(&m).unwrap());
    }

    #[test]
    fn kick_suppression_with_event_idx() {
        let (m, mut r) = setup(8, true);
        let s = Seg {
            addr: 0,
            len: 1,
            write: false,
        };
        let avail_event = r.used_addr() + 4 + 8 * 8;
        // avail_event = 0: the device wants a kick when idx moves past 0.
        r.add(&m, &[s], 0).unwrap();
        r.publish(&m).unwrap();
        assert!(r.needs_kick(&m).unwrap());
        // Device is still busy with entry 0 and says "wake me after 4".
        m.write(avail_event, &4u16.to_le_bytes()).unwrap();
        r.add(&m, &[s], 0).unwrap();
        r.publish(&m).unwrap(); // idx 2
        assert!(!r.needs_kick(&m).unwrap());
        for _ in 0..3 {
            r.add(&m, &[s], 0).unwrap();
        }
        r.publish(&m).unwrap(); // idx 5 crosses 4 → kick
        assert!(r.needs_kick(&m).unwrap());
    }

    #[test]
    fn notify_toggles_flags_and_used_event() {
        let (m, mut r) = setup(8, true);
        let used_event = r.avail_addr() + 4 + 2 * 8;
        r.disable_notify(&m).unwrap();
        let mut b = [0u8; 2];
        m.read(r.avail_addr(), &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), VRING_AVAIL_F_NO_INTERRUPT);
        m.read(used_event, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), 0xffff);
        assert!(!r.enable_notify(&m).unwrap());
        m.read(used_event, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), 0);
        m.read(r.avail_addr(), &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), 0);
    }

    #[test]
    fn raw_chain_links_and_loops() {
        let (m, mut r) = setup(8, false);
        let mut dev = Dev::new();
        let h = r
            .add_raw(&m, &[RawDesc::read(0x10, 4), RawDesc::write(0x20, 8)], 3)
            .unwrap();
        r.push_avail(&m, h).unwrap();
        r.publish(&m).unwrap();
        let (_, c) = dev.pop(&m, &r).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].flags, VRING_DESC_F_WRITE);
        // A self-loop written on purpose.
        let h2 = r
            .add_raw(
                &m,
                &[RawDesc {
                    addr: 0,
                    len: 1,
                    flags: VRING_DESC_F_NEXT,
                    next: Some(2),
                }],
                4,
            )
            .unwrap();
        assert_eq!(h2, 2);
        let mut d = [0u8; 16];
        m.read(r.desc_addr() + 32, &mut d).unwrap();
        assert_eq!(u16::from_le_bytes(d[14..16].try_into().unwrap()), 2);
        r.set_avail_idx(&m, 1000).unwrap();
        assert_eq!(dev.avail_idx(&m, &r), 1000);
    }
}
