//! Guest memory: one memfd-backed region that the backend maps through `SET_MEM_TABLE`, and a
//! bump allocator that carves rings and buffers out of it.
//!
//! ```text
//!   GPA base                                                    base + size
//!   ├──────────┬──────────────┬──────────┬────────────┬ ─ ─ ─ ─ ─ ┤
//!   │ vq0 ring │ vq0 buffers  │ vq1 ring │ vq1 bufs   │   free     │
//!   └──────────┴──────────────┴──────────┴────────────┴ ─ ─ ─ ─ ─ ┘
//!                                                     ▲ next
//! ```
//!
//! Nothing is ever freed: a guest lives as long as its test. Every access goes through
//! vm-memory's bounds-checked [`Bytes`] interface.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    GuestMemoryRegion,
};

/// Errors of guest memory setup and allocation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// memfd_create failed.
    #[error("Cannot create memfd")]
    Memfd(#[source] std::io::Error),
    /// Sizing the memfd failed.
    #[error("Cannot size memfd")]
    Truncate(#[source] std::io::Error),
    /// Mapping the memfd failed.
    #[error("Cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    /// The requested size is zero or not a multiple of the page size.
    #[error("Invalid guest memory size {0:#x}")]
    InvalidSize(u64),
    /// The allocator ran out of guest memory.
    #[error("Out of guest memory: need {need:#x} bytes, {left:#x} left")]
    OutOfMemory {
        /// Bytes requested (after alignment).
        need: u64,
        /// Bytes left in the region.
        left: u64,
    },
    /// An access fell outside guest memory.
    #[error("Guest memory access failed")]
    Access(#[source] GuestMemoryError),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Default guest memory size: 64 MiB.
pub const DEFAULT_MEM_SIZE: u64 = 64 << 20;
/// Default guest-physical base address of the region.
pub const DEFAULT_GPA_BASE: u64 = 0;

/// One memfd-backed guest memory region plus a bump allocator.
#[derive(Debug)]
pub struct GuestMem {
    mem: GuestMemoryMmap,
    base: u64,
    size: u64,
    next: u64,
    /// Our address of the region's first byte (`mem`'s one mapping, `size` bytes long), kept
    /// as an integer so that `GuestMem` stays `Send` and `Sync` like `GuestMemoryMmap`.
    host: usize,
}

impl GuestMem {
    /// Creates `size` bytes of shared memfd memory mapped at guest-physical address `base`.
    pub fn new(base: u64, size: u64) -> Result<Self> {
        if size == 0 || size % 4096 != 0 || base % 4096 != 0 {
            return Err(Error::InvalidSize(size));
        }
        let len = usize::try_from(size).map_err(|_| Error::InvalidSize(size))?;
        let name: &CStr = c"virtnet-guest";
        // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no other
        // memory-safety preconditions.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create, is valid, and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(Error::Truncate)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(base),
            len,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(Error::Mmap)?;
        let host = mem
            .get_host_address(GuestAddress(base))
            .map_err(Error::Access)? as usize;
        Ok(GuestMem {
            mem,
            base,
            size,
            next: base,
            host,
        })
    }

    /// The vm-memory view (for [`Bytes`] access and for building the vhost-user memory table).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Guest-physical base address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Region size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes not yet handed out by [`GuestMem::alloc`].
    pub fn remaining(&self) -> u64 {
        self.base + self.size - self.next
    }

    /// Hands out `len` bytes aligned to `align` (a power of two), zeroed.
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64> {
        let align = align.max(1).next_power_of_two();
        let start = self.next.checked_add(align - 1).map(|v| v & !(align - 1));
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(start), Some(end)) if end <= self.base + self.size => {
                self.next = end;
                self.zero(start, len)?;
                Ok(start)
            }
            _ => Err(Error::OutOfMemory {
                need: len,
                left: self.remaining(),
            }),
        }
    }

    fn zero(&self, mut gpa: u64, mut len: u64) -> Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        while len > 0 {
            let n = len.min(ZEROS.len() as u64);
            // n <= 4096, so the cast is lossless.
            self.write(gpa, &ZEROS[..n as usize])?;
            gpa += n;
            len -= n;
        }
        Ok(())
    }

    /// The frontend's (our) virtual address of `gpa`, for `SET_VRING_ADDR`.
    pub fn host_address(&self, gpa: u64) -> Result<u64> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(Error::Access)
    }

    /// Writes `data` at `gpa` (bounds-checked).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        if let Some(s) = self.fast_slice(gpa, data.len()) {
            s.copy_from(data);
            return Ok(());
        }
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(Error::Access)
    }

    /// Reads `buf.len()` bytes at `gpa` (bounds-checked).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        if let Some(s) = self.fast_slice(gpa, buf.len()) {
            if s.copy_to(buf) == buf.len() {
                return Ok(());
            }
        }
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(Error::Access)
    }

    /// Writes the `N` bytes of `data` at `gpa` with one (unaligned, volatile) store when they
    /// lie in the region: descriptors, ring entries, headers.
    #[inline]
    pub fn write_array<const N: usize>(&self, gpa: u64, data: [u8; N]) -> Result<()>
    where
        [u8; N]: vm_memory::ByteValued,
    {
        if let Some(s) = self.fast_slice(gpa, N) {
            if let Ok(r) = vm_memory::VolatileMemory::get_ref::<[u8; N]>(&s, 0) {
                r.store(data);
                return Ok(());
            }
        }
        self.write(gpa, &data)
    }

    /// Reads `N` bytes at `gpa` with one (unaligned, volatile) load when they lie in the
    /// region.
    #[inline]
    pub fn read_array<const N: usize>(&self, gpa: u64) -> Result<[u8; N]>
    where
        [u8; N]: vm_memory::ByteValued,
    {
        if let Some(s) = self.fast_slice(gpa, N) {
            if let Ok(r) = vm_memory::VolatileMemory::get_ref::<[u8; N]>(&s, 0) {
                return Ok(r.load());
            }
        }
        let mut b = [0u8; N];
        self.read(gpa, &mut b)?;
        Ok(b)
    }

    /// Loads a little-endian `u16` at `gpa` with `order` (ring indices and flags).
    #[inline]
    pub fn load_u16(&self, gpa: u64, order: std::sync::atomic::Ordering) -> Result<u16> {
        if let Some(s) = self.fast_slice(gpa, 2) {
            if let Ok(v) = s.load::<u16>(0, order) {
                return Ok(u16::from_le(v));
            }
        }
        self.mem
            .load::<u16>(GuestAddress(gpa), order)
            .map(u16::from_le)
            .map_err(Error::Access)
    }

    /// Stores `v` little-endian at `gpa` with `order` (ring indices and flags).
    #[inline]
    pub fn store_u16(&self, gpa: u64, v: u16, order: std::sync::atomic::Ordering) -> Result<()> {
        if let Some(s) = self.fast_slice(gpa, 2) {
            if s.store(v.to_le(), 0, order).is_ok() {
                return Ok(());
            }
        }
        self.mem
            .store(v.to_le(), GuestAddress(gpa), order)
            .map_err(Error::Access)
    }

    /// A bounds-checked view of `[gpa, gpa + len)` in the one region, straight from the
    /// region's address: no region search and none of `Bytes`' generic plumbing (the data path
    /// calls `read`/`write` several times per frame). `None` sends the caller to the slow path,
    /// which also produces the error.
    #[inline]
    fn fast_slice(&self, gpa: u64, len: usize) -> Option<vm_memory::VolatileSlice<'_>> {
        let off = gpa.checked_sub(self.base)?;
        let end = off.checked_add(len as u64)?;
        if end > self.size {
            return None;
        }
        // off < end <= size, and size fits a usize (checked in `new`).
        let off = off as usize;
        // SAFETY: `[host + off, host + off + len)` lies inside the one mapping of `self.mem`
        // (`size` bytes from `host`, checked just above), which lives as long as `self` and so
        // outlives the returned slice's borrow of `self`. Guest memory is shared with the
        // device, which is exactly what a `VolatileSlice` (volatile accesses only) allows.
        Some(unsafe { vm_memory::VolatileSlice::new((self.host + off) as *mut u8, len) })
    }

    /// True when `[gpa, gpa + len)` lies inside the region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        let region_end = self
            .mem
            .iter()
            .next()
            .map(|r| r.start_addr().0 + r.len())
            .unwrap_or(0);
        gpa >= self.base && gpa.checked_add(len).is_some_and(|e| e <= region_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use assert_matches::assert_matches;

    #[test]
    fn alloc_aligns_and_zeroes() {
        let mut m = GuestMem::new(0x10000, 1 << 20).unwrap();
        m.write(0x10000, &[0xff; 64]).unwrap();
        let a = m.alloc(3, 1).unwrap();
        assert_eq!(a, 0x10000);
        let b = m.alloc(100, 4096).unwrap();
        assert_eq!(b, 0x11000);
        let mut buf = [1u8; 3];
        m.read(a, &mut buf).unwrap();
        assert_eq!(buf, [0; 3]);
        assert_eq!(m.remaining(), (1 << 20) - 0x1000 - 100);
    }

    #[test]
    fn alloc_exhaustion_is_an_error() {
        let mut m = GuestMem::new(0, 8192).unwrap();
        m.alloc(8000, 8).unwrap();
        assert_matches!(m.alloc(200, 8), Err(Error::OutOfMemory { .. }));
        assert_matches!(m.alloc(u64::MAX, 8), Err(Error::OutOfMemory { .. }));
    }

    #[test]
    fn out_of_range_access_fails() {
        let m = GuestMem::new(0, 4096).unwrap();
        assert_matches!(m.write(4090, &[0; 16]), Err(Error::Access(_)));
        let mut b = [0u8; 1];
        assert_matches!(m.read(1 << 40, &mut b), Err(Error::Access(_)));
        assert!(m.contains(0, 4096));
        assert!(!m.contains(1, 4096));
        assert!(m.host_address(100).unwrap() != 0);
    }

    #[test]
    fn fixed_size_and_index_accesses_are_bounds_checked() {
        use std::sync::atomic::Ordering;
        let m = GuestMem::new(0x10000, 8192).unwrap();
        let end = 0x10000 + 8192;
        // The last bytes of the region work, one byte further does not.
        m.write_array(end - 16, [7u8; 16]).unwrap();
        assert_eq!(m.read_array::<16>(end - 16).unwrap(), [7u8; 16]);
        let mut b = [0u8; 16];
        m.read(end - 16, &mut b).unwrap();
        assert_eq!(b, [7u8; 16]);
        assert_matches!(m.write_array(end - 15, [0u8; 16]), Err(Error::Access(_)));
        assert_matches!(m.read_array::<8>(end - 7), Err(Error::Access(_)));
        assert_matches!(m.read_array::<2>(0xfff0), Err(Error::Access(_)));
        assert_matches!(m.write_array(u64::MAX - 1, [0u8; 4]), Err(Error::Access(_)));
        // Indices are little-endian.
        m.store_u16(end - 2, 0x1234, Ordering::Release).unwrap();
        assert_eq!(m.read_array::<2>(end - 2).unwrap(), [0x34, 0x12]);
        assert_eq!(m.load_u16(end - 2, Ordering::Acquire).unwrap(), 0x1234);
        assert_matches!(
            m.load_u16(end - 1, Ordering::Acquire),
            Err(Error::Access(_))
        );
        assert_matches!(
            m.store_u16(end, 1, Ordering::Relaxed),
            Err(Error::Access(_))
        );
    }

    #[test]
    fn bad_sizes_rejected() {
        assert_matches!(GuestMem::new(0, 0), Err(Error::InvalidSize(0)));
        assert_matches!(GuestMem::new(0, 100), Err(Error::InvalidSize(100)));
    }
}
