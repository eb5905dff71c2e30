//! The TAP port's system calls: the crate's only `unsafe`.
//!
//! Every call's return value is checked on the next line. Memory handed to the kernel is
//! either owned by the caller for the duration of the call (ifreq, ints, buffers) or, for
//! [`writev`], described by iovecs whose validity the caller guarantees.

use std::ffi::CStr;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
pub use virtnet_port_sys::{check, enter_netns, ifindex, poll_readable, unshare_netns};

/// `IFNAMSIZ`: interface names are at most 15 bytes plus the NUL.
pub const IFNAMSIZ: usize = 16;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `TUN_F_CSUM`: the reader accepts partial checksums.
pub const TUN_F_CSUM: libc::c_uint = 0x01;
/// `TUN_F_TSO4`.
pub const TUN_F_TSO4: libc::c_uint = 0x02;
/// `TUN_F_TSO6`.
pub const TUN_F_TSO6: libc::c_uint = 0x04;
/// `TUN_F_TSO_ECN`.
pub const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// `struct ifreq` as the kernel reads it: a name and a 24-byte union, of which we use a
/// short (flags), an int (MTU, ifindex) or a `sockaddr_in`.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; IFNAMSIZ],
    data: IfReqData,
}

#[repr(C)]
union IfReqData {
    flags: libc::c_short,
    int: libc::c_int,
    addr: libc::sockaddr_in,
    _pad: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<IfReq> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() >= IFNAMSIZ || b.contains(&0) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut r = IfReq {
            name: [0; IFNAMSIZ],
            data: IfReqData { _pad: [0; 24] },
        };
        for (d, s) in r.name.iter_mut().zip(b) {
            *d = libc::c_char::from_ne_bytes([*s]);
        }
        Ok(r)
    }

    fn name(&self) -> String {
        let bytes: Vec<u8> = self
            .name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| c.to_ne_bytes()[0])
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Open `/dev/net/tun` as TAP `name` (no packet info, with a `vnet_hdr_len`-byte virtio-net
/// header, non-blocking) and set its offloads. Returns the fd and the kernel's name for it.
pub fn open_tap(
    name: &str,
    vnet_hdr_len: libc::c_int,
    offloads: libc::c_uint,
) -> io::Result<(OwnedFd, String)> {
    let path: &CStr = c"/dev/net/tun";
    // SAFETY: `path` is a NUL-terminated string; open has no other memory effects.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    check(fd)?;
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq::new(name)?;
    req.data.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is, for the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    check(ret)?;
    let hdr_len: libc::c_int = vnet_hdr_len;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, valid for the call.
    let ret = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            TUNSETVNETHDRSZ,
            &hdr_len as *const libc::c_int,
        )
    };
    check(ret)?;
    // SAFETY: TUNSETOFFLOAD takes the flags by value.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, offloads as libc::c_ulong) };
    check(ret)?;
    Ok((fd, req.name()))
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket has no memory effects.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(s)?;
    // SAFETY: `s` was just returned by socket and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(s) })
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
}

fn ifreq_ioctl(sock: &OwnedFd, request: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: every SIOC[GS]IF* request used here reads/writes one `struct ifreq`, which
    // `req` is, for the duration of the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut IfReq) };
    check(ret).map(|_| ())
}

/// Give interface `name` the address `ip/prefix` and the MTU `mtu`, and bring it up.
pub fn configure(name: &str, ip: Option<(Ipv4Addr, u8)>, mtu: Option<u32>) -> io::Result<()> {
    let sock = inet_socket()?;
    if let Some((ip, prefix)) = ip {
        let mut req = IfReq::new(name)?;
        req.data.addr = sockaddr(ip);
        ifreq_ioctl(&sock, libc::SIOCSIFADDR, &mut req)?;
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix.min(32)))
        };
        let mut req = IfReq::new(name)?;
        req.data.addr = sockaddr(Ipv4Addr::from(mask));
        ifreq_ioctl(&sock, libc::SIOCSIFNETMASK, &mut req)?;
    }
    if let Some(mtu) = mtu {
        let mut req = IfReq::new(name)?;
        req.data.int = libc::c_int::try_from(mtu).unwrap_or(1500);
        ifreq_ioctl(&sock, libc::SIOCSIFMTU, &mut req)?;
    }
    let mut req = IfReq::new(name)?;
    ifreq_ioctl(&sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the union's `flags` member.
    let flags = unsafe { req.data.flags };
    req.data.flags = flags | (libc::IFF_UP as libc::c_short);
    ifreq_ioctl(&sock, libc::SIOCSIFFLAGS, &mut req)
}

/// `writev(2)`. The caller guarantees every iovec describes readable memory that stays valid
/// for the call.
///
/// # Safety
///
/// Each `iov[i].iov_base` must point to `iov[i].iov_len` readable bytes.
pub unsafe fn writev(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    let cnt = libc::c_int::try_from(iov.len())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the caller guarantees the iovecs; `iov` itself is a live slice of `cnt` entries.
    let n = unsafe { libc::writev(fd, iov.as_ptr(), cnt) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.unsigned_abs())
}

/// `read(2)` into `buf`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, writable slice of `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.unsigned_abs())
}
