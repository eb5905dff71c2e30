//! The AF_PACKET port's system calls and its mmap: the crate's only `unsafe`.
//!
//! Every call's return value is checked on the next line. Memory handed to the kernel is
//! owned by the caller for the duration of the call (ints, `tpacket_req3`, `packet_mreq`,
//! `sockaddr_ll`), or described by iovecs whose validity the caller guarantees ([`sendmsg`]).
//! The rings are reached only through [`Mmap::slice`], a bounds-checked
//! [`VolatileSlice`] over the whole mapping.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
pub use virtnet_port_sys::{check, ifindex, poll_readable, unshare_netns};

use vm_memory::VolatileSlice;

/// `SOL_PACKET`.
pub const SOL_PACKET: libc::c_int = 263;
/// `ETH_P_ALL`: every protocol.
pub const ETH_P_ALL: u16 = 0x0003;
/// `PACKET_ADD_MEMBERSHIP`.
pub const PACKET_ADD_MEMBERSHIP: libc::c_int = 1;
/// `PACKET_RX_RING`.
pub const PACKET_RX_RING: libc::c_int = 5;
/// `PACKET_STATISTICS`.
pub const PACKET_STATISTICS: libc::c_int = 6;
/// `PACKET_VERSION`.
pub const PACKET_VERSION: libc::c_int = 10;
/// `PACKET_TX_RING`.
pub const PACKET_TX_RING: libc::c_int = 13;
/// `PACKET_VNET_HDR`: a `virtio_net_hdr` (10 bytes) in front of every frame, both ways.
pub const PACKET_VNET_HDR: libc::c_int = 15;
/// `PACKET_FANOUT`.
pub const PACKET_FANOUT: libc::c_int = 18;
/// `PACKET_QDISC_BYPASS`: transmit straight to the driver.
pub const PACKET_QDISC_BYPASS: libc::c_int = 20;
/// `PACKET_IGNORE_OUTGOING`: do not see frames this host transmits on the interface.
pub const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// `TPACKET_V3`.
pub const TPACKET_V3: libc::c_int = 2;
/// `PACKET_MR_PROMISC`.
pub const PACKET_MR_PROMISC: libc::c_ushort = 1;
/// `PACKET_FANOUT_HASH`: flows stay on one socket.
pub const PACKET_FANOUT_HASH: u32 = 0;
/// `PACKET_FANOUT_FLAG_DEFRAG`: reassemble IP fragments before hashing.
pub const PACKET_FANOUT_FLAG_DEFRAG: u32 = 0x8000;
/// `PACKET_OUTGOING` in `sll_pkttype`.
pub const PACKET_OUTGOING: u8 = 4;

/// `struct tpacket_req3`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TpacketReq3 {
    /// Bytes per block (a multiple of the page size).
    pub block_size: u32,
    /// Blocks in the ring.
    pub block_nr: u32,
    /// Bytes per frame (TX: a fixed slot).
    pub frame_size: u32,
    /// Frames in the ring: `block_size * block_nr / frame_size`.
    pub frame_nr: u32,
    /// RX: milliseconds after which a partly filled block is handed to user space.
    pub retire_blk_tov: u32,
    /// Private bytes per block (0).
    pub sizeof_priv: u32,
    /// Feature requests (0).
    pub feature_req_word: u32,
}

/// `struct tpacket_stats_v3`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TpacketStatsV3 {
    /// Frames the socket saw.
    pub packets: u32,
    /// Frames dropped because the ring was full.
    pub drops: u32,
    /// Times the ring was frozen full.
    pub freeze_q_cnt: u32,
}

/// Is interface `name` administratively up (`IFF_UP`, via `SIOCGIFFLAGS`)?
pub fn is_up(name: &str) -> io::Result<bool> {
    #[repr(C)]
    struct IfReqFlags {
        name: [libc::c_char; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= libc::IFNAMSIZ || b.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    for (d, s) in req.name.iter_mut().zip(b) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    // SAFETY: socket has no memory effects.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: `fd` was just returned by socket and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into one `struct ifreq`
    // (40 bytes), which `req` is, for the duration of the call.
    let ret = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::SIOCGIFFLAGS,
            &mut req as *mut IfReqFlags,
        )
    };
    check(ret)?;
    Ok(req.flags & (libc::IFF_UP as libc::c_short) != 0)
}

/// A non-blocking `AF_PACKET`/`SOCK_RAW` socket receiving `protocol` (host order; 0 = none,
/// [`ETH_P_ALL`] = every frame). Needs CAP_NET_RAW.
pub fn packet_socket(protocol: u16) -> io::Result<OwnedFd> {
    // SAFETY: socket has no memory effects.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::c_int::from(protocol.to_be()),
        )
    };
    check(fd)?;
    // SAFETY: `fd` was just returned by socket and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `setsockopt(fd, level, opt, &val)` for any plain-data `val`.
fn setsockopt<T: Copy>(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    val: &T,
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the kernel reads `len` bytes from `val`, a live `T` of exactly that size.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (val as *const T).cast::<libc::c_void>(),
            len,
        )
    };
    check(ret).map(|_| ())
}

/// `setsockopt(SOL_PACKET, opt, int)`.
pub fn set_packet_int(fd: &OwnedFd, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    setsockopt(fd, SOL_PACKET, opt, &val)
}

/// `PACKET_RX_RING` / `PACKET_TX_RING`.
pub fn set_ring(fd: &OwnedFd, opt: libc::c_int, req: &TpacketReq3) -> io::Result<()> {
    setsockopt(fd, SOL_PACKET, opt, req)
}

/// Put interface `ifindex` in promiscuous mode for as long as `fd` is open.
pub fn add_promisc(fd: &OwnedFd, ifindex: libc::c_int) -> io::Result<()> {
    let mreq = libc::packet_mreq {
        mr_ifindex: ifindex,
        mr_type: PACKET_MR_PROMISC,
        mr_alen: 0,
        mr_address: [0; 8],
    };
    setsockopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mreq)
}

/// Join fanout group `group` (`PACKET_FANOUT_HASH | DEFRAG`). Call after [`bind`].
pub fn join_fanout(fd: &OwnedFd, group: u16) -> io::Result<()> {
    let arg: u32 = u32::from(group) | ((PACKET_FANOUT_HASH | PACKET_FANOUT_FLAG_DEFRAG) << 16);
    setsockopt(fd, SOL_PACKET, PACKET_FANOUT, &arg)
}

/// Bind `fd` to interface `ifindex` for `protocol` (host order, as in [`packet_socket`]).
pub fn bind(fd: &OwnedFd, ifindex: libc::c_int, protocol: u16) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as libc::c_ushort;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = ifindex;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the kernel reads `len` bytes of the live `sll`.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast::<libc::sockaddr>(),
            len,
        )
    };
    check(ret).map(|_| ())
}

/// `PACKET_STATISTICS` (TPACKET_V3 layout); reading resets the kernel's counters.
pub fn packet_stats(fd: &OwnedFd) -> io::Result<TpacketStatsV3> {
    let mut st = TpacketStatsV3::default();
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<TpacketStatsV3>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the kernel writes at most `len` bytes into the live `st` and updates `len`.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            SOL_PACKET,
            PACKET_STATISTICS,
            (&mut st as *mut TpacketStatsV3).cast::<libc::c_void>(),
            &mut len,
        )
    };
    check(ret)?;
    Ok(st)
}

/// A shared mapping of a packet socket's rings, unmapped on drop.
pub struct Mmap {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through VolatileSlice (volatile
// reads/writes, atomics for the status words), so sharing the pointer between threads is sound.
unsafe impl Send for Mmap {}
// SAFETY: as above; `&Mmap` only hands out VolatileSlices.
unsafe impl Sync for Mmap {}

impl Mmap {
    /// Map `len` bytes of `fd`'s rings (RX ring first, then TX ring), read-write, shared.
    pub fn map(fd: &OwnedFd, len: usize) -> io::Result<Mmap> {
        // SAFETY: a fresh shared mapping chosen by the kernel; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_LOCKED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        let addr = if addr == libc::MAP_FAILED {
            // MAP_LOCKED can fail on RLIMIT_MEMLOCK; retry without it.
            // SAFETY: as above.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_POPULATE,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if addr == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            addr
        } else {
            addr
        };
        Ok(Mmap {
            addr: addr.cast::<u8>(),
            len,
        })
    }

    /// The whole mapping as a bounds-checked volatile slice.
    pub fn slice(&self) -> VolatileSlice<'_> {
        // SAFETY: `addr..addr+len` is mapped read-write until `self` is dropped, which the
        // returned slice's lifetime prevents while it lives.
        unsafe { VolatileSlice::new(self.addr, self.len) }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: `addr/len` is exactly the mapping made in `map`, and no slice of it outlives
        // `self`.
        let ret = unsafe { libc::munmap(self.addr.cast(), self.len) };
        if ret < 0 {
            tracing::warn!("munmap: {}", io::Error::last_os_error());
        }
    }
}

/// Kick the TX ring: the kernel sends every slot marked `TP_STATUS_SEND_REQUEST`.
pub fn kick(fd: RawFd) -> io::Result<()> {
    // SAFETY: a zero-length send with a null buffer; the kernel reads the TX ring only.
    let ret = unsafe { libc::send(fd, std::ptr::null(), 0, libc::MSG_DONTWAIT) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `sendmsg(2)` of one frame gathered from `iov` (the socket is bound: no address).
///
/// # Safety
///
/// Each `iov[i].iov_base` must point to `iov[i].iov_len` readable bytes for the call.
pub unsafe fn sendmsg(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr().cast_mut();
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: `msg` points at `iov`, a live slice of iovecs the caller vouches for.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.unsigned_abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_kernel() {
        assert_eq!(std::mem::size_of::<TpacketReq3>(), 28);
        assert_eq!(std::mem::size_of::<TpacketStatsV3>(), 12);
    }

    #[test]
    fn unknown_interface_is_an_error() {
        assert!(is_up("no-such-if0").is_err());
        assert!(is_up("lo").is_ok());
        assert!(ifindex("no-such-if0").is_err());
        assert!(ifindex("bad\0name").is_err());
    }
}
