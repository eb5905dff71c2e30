//! # virtnet-port-tap: a host interface as a switch port
//!
//! A [`TapPort`] opens a TAP device (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte
//! `virtio_net_hdr_v1` in front of every frame), gives it an address and brings it up. The host
//! sees an ordinary NIC; the device disappears when the port is dropped (it is not persistent),
//! also when the process dies.
//!
//! ```text
//!  guest worker ─ Switch::forward ─► TapSink::deliver
//!                                      iovec[0] = vnet header (stack)
//!                                      iovec[1..] = the frame's segments, in guest memory
//!                                      one writev(tap fd)          (no copy in user space)
//!  reader thread: poll(tap fd, stop eventfd)
//!                 read(tap fd) → [vnet hdr | frame] ─► Switch::forward(NetHdr from the kernel)
//! ```
//!
//! Offloads: the kernel accepts partial checksums and TSO4/TSO6 (with ECN) on write, so
//! frames from guests go out as they are; on read, `TUNSETOFFLOAD` lets the kernel hand us
//! 64 KiB TCP frames with a partial checksum, which guest ports take as they are or segment
//! in software (`virtnet_switch::gso`). UFO frames are refused by the virtio TX side before
//! they reach the switch.
//!
//! Module map: [`sys`] holds every system call (and all `unsafe`).

#![deny(missing_docs)]

pub mod sys;

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;

use thiserror::Error;
use virtnet_switch::{
    DropReason, Frame, NetHdr, PortConfig, PortId, PortSink, Segment, SliceFrame, Switch,
};
use vmm_sys_util::eventfd::EventFd;

/// Length of the virtio-net header on the TAP fd (`virtio_net_hdr_v1`, with num_buffers).
pub const VNET_HDR_LEN: usize = 12;
const VNET_HDR_LEN_C: libc::c_int = 12;
/// Largest frame read from the TAP: a 64 KiB GSO frame plus headers.
pub const MAX_FRAME: usize = 65_562;
/// Most segments a frame may have for one writev (plus the header).
pub const MAX_SEGMENTS: usize = 63;
/// Frames read per wake-up before the switch flushes.
pub const READ_BATCH: usize = 64;
pub use virtnet_port_sys::MAX_IFNAME;

/// Errors of creating a TAP port.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name is empty, too long or has odd characters.
    #[error(
        "Invalid interface name {0:?}: use 1 to {MAX_IFNAME} characters from A-Z a-z 0-9 _ . -"
    )]
    BadName(String),
    /// An interface with that name exists already.
    #[error("Interface {0} already exists")]
    InUse(String),
    /// The TAP cannot be created.
    #[error("Cannot create TAP {0}")]
    Create(String, #[source] io::Error),
    /// The TAP cannot be configured.
    #[error("Cannot configure TAP {0}")]
    Configure(String, #[source] io::Error),
    /// The reader cannot start.
    #[error("Cannot start the TAP reader")]
    Thread(#[source] io::Error),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, TapError>;

/// Check an interface name: 1..=15 bytes of `[A-Za-z0-9_.-]`.
pub fn check_name(name: &str) -> Result<()> {
    if virtnet_port_sys::valid_ifname(name) {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_string()))
    }
}

/// Does an interface `name` exist in this (thread's) network namespace?
pub fn exists(name: &str) -> bool {
    check_name(name).is_ok() && sys::ifindex(name).is_ok()
}

/// How to create the TAP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapConfig {
    /// Interface name.
    pub name: String,
    /// Host address and prefix length on the interface.
    pub addr: Option<(Ipv4Addr, u8)>,
    /// Interface MTU.
    pub mtu: Option<u32>,
    /// Access VLAN of the switch port.
    pub vlan: Option<u16>,
}

/// Counters of the TAP port (the switch counts frames too; these are the fd's side).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapStats {
    /// Frames read from the TAP and forwarded.
    pub read_frames: u64,
    /// Bytes of those frames.
    pub read_bytes: u64,
    /// Frames read that were too short or had a bad header.
    pub read_errors: u64,
    /// Frames written to the TAP.
    pub written_frames: u64,
    /// Writes that failed (the kernel's queue was full, the interface was down).
    pub write_errors: u64,
}

#[derive(Default)]
struct Counters {
    read_frames: AtomicU64,
    read_bytes: AtomicU64,
    read_errors: AtomicU64,
    written_frames: AtomicU64,
    write_errors: AtomicU64,
}

/// Encode `hdr` as a little-endian `virtio_net_hdr_v1`.
pub fn encode_hdr(hdr: &NetHdr) -> [u8; VNET_HDR_LEN] {
    let mut b = [0u8; VNET_HDR_LEN];
    b[0] = hdr.flags;
    b[1] = hdr.gso_type;
    b[2..4].copy_from_slice(&hdr.hdr_len.to_le_bytes());
    b[4..6].copy_from_slice(&hdr.gso_size.to_le_bytes());
    b[6..8].copy_from_slice(&hdr.csum_start.to_le_bytes());
    b[8..10].copy_from_slice(&hdr.csum_offset.to_le_bytes());
    b
}

/// Decode a little-endian `virtio_net_hdr_v1` (num_buffers ignored).
pub fn decode_hdr(b: &[u8; VNET_HDR_LEN]) -> NetHdr {
    let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    NetHdr {
        flags: b[0],
        gso_type: b[1],
        hdr_len: le(2),
        gso_size: le(4),
        csum_start: le(6),
        csum_offset: le(8),
    }
}

struct TapSink {
    fd: Arc<OwnedFd>,
    counters: Arc<Counters>,
}

impl PortSink for TapSink {
    fn deliver(&self, frame: &dyn Frame, hdr: &NetHdr) -> std::result::Result<(), DropReason> {
        let vh = encode_hdr(hdr);
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut iov = [empty; MAX_SEGMENTS + 1];
        iov[0] = libc::iovec {
            iov_base: vh.as_ptr().cast_mut().cast(),
            iov_len: VNET_HDR_LEN,
        };
        let mut n = 1usize;
        let mut too_many = false;
        frame.for_each_segment(&mut |seg| {
            if n > MAX_SEGMENTS {
                too_many = true;
                return false;
            }
            let (ptr, len) = match seg {
                Segment::Host(b) => (b.as_ptr(), b.len()),
                // The guard owns nothing without vm-memory's `xen` feature: the pointer stays
                // valid as long as the slice's mapping, which outlives this call ('a).
                Segment::Guest(s) => (s.ptr_guard().as_ptr(), s.len()),
            };
            if len > 0 {
                iov[n] = libc::iovec {
                    iov_base: ptr.cast_mut().cast(),
                    iov_len: len,
                };
                n += 1;
            }
            true
        });
        if too_many {
            self.counters.write_errors.fetch_add(1, Relaxed);
            return Err(DropReason::FrameTooLong);
        }
        // SAFETY: iov[0] points at `vh` on this stack frame; iov[1..n] point at the frame's
        // segments, host slices or mapped guest memory borrowed for the duration of deliver().
        match unsafe { sys::writev(self.fd.as_raw_fd(), &iov[..n]) } {
            Ok(_) => {
                self.counters.written_frames.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(e) => {
                self.counters.write_errors.fetch_add(1, Relaxed);
                Err(match e.kind() {
                    io::ErrorKind::WouldBlock => DropReason::NoRxBuffers,
                    io::ErrorKind::InvalidInput => DropReason::BadOffload,
                    _ => DropReason::NotReady,
                })
            }
        }
    }
}

/// A TAP interface plugged into a switch.
pub struct TapPort {
    switch: Arc<Switch>,
    port: PortId,
    name: String,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl TapPort {
    /// Create the TAP, configure it, plug it into `switch` and start its reader.
    pub fn start(switch: Arc<Switch>, config: &TapConfig) -> Result<TapPort> {
        check_name(&config.name)?;
        if exists(&config.name) {
            return Err(TapError::InUse(config.name.clone()));
        }
        let offloads = sys::TUN_F_CSUM | sys::TUN_F_TSO4 | sys::TUN_F_TSO6 | sys::TUN_F_TSO_ECN;
        let (fd, name) = sys::open_tap(&config.name, VNET_HDR_LEN_C, offloads)
            .map_err(|e| TapError::Create(config.name.clone(), e))?;
        sys::configure(&name, config.addr, config.mtu)
            .map_err(|e| TapError::Configure(name.clone(), e))?;
        let fd = Arc::new(fd);
        let counters = Arc::new(Counters::default());
        let wake = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(TapError::Thread)?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let port = switch.add_port(
            PortConfig {
                name: name.clone(),
                vlan: config.vlan,
            },
            Arc::new(TapSink {
                fd: fd.clone(),
                counters: counters.clone(),
            }),
        );
        let reader = Reader {
            switch: switch.clone(),
            port,
            fd,
            counters: counters.clone(),
            stop: stop.clone(),
            wake: wake.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("tap-{name}"))
            .spawn(move || reader.run());
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                switch.remove_port(port);
                return Err(TapError::Thread(e));
            }
        };
        tracing::info!("TAP {name}: up (switch port {}), {:?}", port.0, config.addr);
        Ok(TapPort {
            switch,
            port,
            name,
            counters,
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its port on the switch.
    pub fn port_id(&self) -> PortId {
        self.port
    }

    /// Counters.
    pub fn stats(&self) -> TapStats {
        let c = &self.counters;
        TapStats {
            read_frames: c.read_frames.load(Relaxed),
            read_bytes: c.read_bytes.load(Relaxed),
            read_errors: c.read_errors.load(Relaxed),
            written_frames: c.written_frames.load(Relaxed),
            write_errors: c.write_errors.load(Relaxed),
        }
    }

    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Relaxed);
            let _ = self.wake.write(1);
            let _ = t.join();
            // The sink holds the last fd reference: once the port is removed and no worker's
            // batch holds the old port table any more (it refreshes at its next begin), the
            // TAP closes and the kernel deletes the (non-persistent) interface. Process exit
            // closes it in any case.
            self.switch.remove_port(self.port);
            tracing::info!("TAP {}: removed", self.name);
        }
    }

    /// Stop the reader, leave the switch, delete the interface.
    pub fn shutdown(mut self) {
        self.stop();
    }
}

impl Drop for TapPort {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Reader {
    switch: Arc<Switch>,
    port: PortId,
    fd: Arc<OwnedFd>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
}

impl Reader {
    fn run(self) {
        let mut buf = vec![0u8; VNET_HDR_LEN + MAX_FRAME];
        let mut batch = self.switch.new_batch();
        let fd = self.fd.as_raw_fd();
        while !self.stop.load(Relaxed) {
            match sys::poll_readable([fd, self.wake.as_raw_fd()], 1000) {
                Ok([true, _]) => {}
                Ok(_) => continue,
                Err(e) => {
                    tracing::error!("TAP poll: {e}");
                    return;
                }
            }
            self.switch.begin(&mut batch);
            for _ in 0..READ_BATCH {
                let n = match sys::read(fd, &mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("TAP read: {e}");
                        break;
                    }
                };
                let (h, frame) = buf[..n].split_at(n.min(VNET_HDR_LEN));
                let Ok(h) = <&[u8; VNET_HDR_LEN]>::try_from(h) else {
                    self.counters.read_errors.fetch_add(1, Relaxed);
                    continue;
                };
                if frame.len() < 14 {
                    self.counters.read_errors.fetch_add(1, Relaxed);
                    self.switch
                        .count_drop(&batch, self.port, DropReason::FrameTooShort);
                    continue;
                }
                let hdr = decode_hdr(h);
                self.counters.read_frames.fetch_add(1, Relaxed);
                self.counters
                    .read_bytes
                    .fetch_add(frame.len() as u64, Relaxed);
                self.switch
                    .forward(&mut batch, self.port, &SliceFrame(frame), &hdr);
            }
            self.switch.end(&mut batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant};
    use virtnet_port_sys::is_root;
    use virtnet_switch::SwitchConfig;

    #[test]
    fn names_are_checked() {
        for ok in ["vnet1", "a", "host-only.1", "abcdefghijklmno"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "abcdefghijklmnop", "a b", "a/b", "..", "é"] {
            assert!(
                matches!(check_name(bad), Err(TapError::BadName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn vnet_header_round_trips() {
        let h = NetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 74,
            gso_size: 1440,
            csum_start: 54,
            csum_offset: 16,
        };
        let b = encode_hdr(&h);
        assert_eq!(b[2..4], 74u16.to_le_bytes());
        assert_eq!(decode_hdr(&b), h);
    }

    #[derive(Default)]
    struct Recorder {
        frames: Mutex<Vec<(Vec<u8>, NetHdr)>>,
        cv: Condvar,
    }

    impl PortSink for Recorder {
        fn deliver(&self, f: &dyn Frame, h: &NetHdr) -> std::result::Result<(), DropReason> {
            let mut v = vec![0u8; f.len()];
            f.read_at(0, &mut v);
            self.frames.lock().unwrap().push((v, *h));
            self.cv.notify_all();
            Ok(())
        }
    }

    /// A TAP in a private network namespace: a UDP datagram from a "guest" port reaches a
    /// host socket through writev; the host's ARP for the guest comes back through the reader.
    #[test]
    fn tap_in_a_netns_carries_frames_both_ways() {
        if !is_root() || !std::path::Path::new("/dev/net/tun").exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "required in CI: needs root and /dev/net/tun"
            );
            eprintln!("SKIPPED: needs root and /dev/net/tun");
            return;
        }
        // Everything runs on a thread that moved into its own namespace.
        std::thread::spawn(|| {
            sys::unshare_netns().expect("unshare(CLONE_NEWNET)");
            let sw = Switch::new(SwitchConfig::default());
            let cfg = TapConfig {
                name: "vt-test0".into(),
                addr: Some((Ipv4Addr::new(10, 77, 0, 1), 24)),
                mtu: Some(1500),
                vlan: None,
            };
            let tap = TapPort::start(sw.clone(), &cfg).unwrap();
            assert!(exists("vt-test0"));
            assert!(matches!(
                TapPort::start(sw.clone(), &cfg),
                Err(TapError::InUse(_))
            ));
            let rec = Arc::new(Recorder::default());
            let guest = sw.add_port(PortConfig::default(), rec.clone());

            // Guest → host: a UDP datagram to a socket bound on the TAP's address.
            let sock = UdpSocket::bind("10.77.0.1:5555").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let gmac = [0x52, 0x54, 0, 0, 0, 0x21];
            let mut f = Vec::new();
            f.extend_from_slice(&[0xff; 6]);
            f.extend_from_slice(&gmac);
            f.extend_from_slice(&[8, 0]);
            let payload = b"through the tap";
            let total = (20 + 8 + payload.len()) as u16;
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0, 10, 77, 0, 2, 10, 77, 0, 1]);
            let c = virtnet_switch::gso::checksum::checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
            f.extend_from_slice(&4444u16.to_be_bytes());
            f.extend_from_slice(&5555u16.to_be_bytes());
            f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]); // no UDP checksum
            f.extend_from_slice(payload);
            // Split over two segments so writev gathers.
            let (a, b) = f.split_at(20);
            let parts: [&[u8]; 2] = [a, b];
            let mut batch = sw.new_batch();
            sw.begin(&mut batch);
            sw.forward(
                &mut batch,
                guest,
                &virtnet_switch::frame::SlicesFrame(&parts),
                &NetHdr::NONE,
            );
            sw.end(&mut batch);
            let mut got = [0u8; 64];
            let (n, from) = sock.recv_from(&mut got).expect("datagram from the guest");
            assert_eq!(&got[..n], payload);
            assert_eq!(from.to_string(), "10.77.0.2:4444");
            assert_eq!(tap.stats().written_frames, 1);

            // Host → guest: answering makes the kernel ARP for 10.77.0.2 out of the TAP.
            sock.send_to(b"reply", "10.77.0.2:4444").unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut frames = rec.frames.lock().unwrap();
            while !frames
                .iter()
                .any(|(f, _)| f.len() >= 42 && f[12..14] == [8, 6] && f[38..42] == [10, 77, 0, 2])
                && Instant::now() < deadline
            {
                frames = rec
                    .cv
                    .wait_timeout(frames, Duration::from_millis(50))
                    .unwrap()
                    .0;
            }
            assert!(
                frames.iter().any(|(f, _)| f[12..14] == [8, 6]),
                "no ARP from the host: {} frames",
                frames.len()
            );
            drop(frames);
            assert!(tap.stats().read_frames >= 1);
            // A batch keeps a snapshot of the port table (and so the TAP fd) until it is
            // dropped or begins again.
            drop(batch);
            tap.shutdown();
            assert!(
                !exists("vt-test0"),
                "the interface is deleted with the port"
            );
        })
        .join()
        .unwrap();
    }
}
