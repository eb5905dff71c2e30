//! # virtnet-port-afpacket: a host NIC as a switch uplink (bridged networks)
//!
//! An [`AfPacketPort`] opens `AF_PACKET` sockets on a host interface (`uplink = "eth1"`) and
//! plugs them into a network's switch as one port. Guests then appear on the physical LAN as
//! machines of their own, with their own MACs, and take addresses from the LAN's DHCP server
//! (VMware's VMnet0).
//!
//! ```text
//!  guest worker ─ Switch::forward ─► UplinkSink::deliver            (any thread, TX mutex)
//!      frame ≤ slot:  copy [vnet hdr | frame (+802.1Q tag)] into the next TX ring slot,
//!                     mark it SEND_REQUEST; flush() = one send() kick per batch
//!      frame > slot:  (a 64 KiB GSO frame) kick pending slots, then one sendmsg() whose
//!                     iovecs point into guest memory (no user-space copy)
//!
//!  reader thread per queue: poll(socket, stop eventfd)
//!      walk the TPACKET_V3 RX ring block by block:
//!      ┌ block 0 ─────────────────────────┐┌ block 1 ──────┐
//!      │desc│hdr│sll│vnet│frame│hdr│sll│..││desc│...       │  ... RX_BLOCK_NR blocks
//!      └──────────────────────────────────┘└───────────────┘
//!      each frame is forwarded as a Frame whose segments are VolatileSlices INTO the block
//!      (zero intermediate copies; the guest's RX copy is the only one), then the block is
//!      handed back to the kernel (block_status = TP_STATUS_KERNEL).
//! ```
//!
//! Socket options (per queue socket, in this order): `PACKET_VERSION = TPACKET_V3`,
//! `PACKET_VNET_HDR` (offloads cross to the kernel both ways: partial checksums and TSO/GSO
//! frames go out whole, GRO'd frames come in whole), `PACKET_LOSS` (a frame the kernel rejects is
//! skipped instead of stalling the TX ring), `PACKET_QDISC_BYPASS` (optional: straight to the
//! driver; note that `tcpdump` on the uplink itself then does not see guest frames — watch the
//! LAN side), `PACKET_IGNORE_OUTGOING`, the RX and TX rings, `bind`, `PACKET_MR_PROMISC`
//! membership (the NIC is promiscuous while the port lives), and with more than one queue
//! `PACKET_FANOUT` (hash) so flows spread over reader threads.
//!
//! **Loops.** Frames this host transmits on the NIC (ours, or the host stack's) are not
//! received back: `PACKET_IGNORE_OUTGOING` on the socket, and the reader also drops any frame
//! whose `sll_pkttype` is `PACKET_OUTGOING`.
//!
//! **VLANs.** With `vlan = Some(id)` the uplink is a trunk for one network: every frame sent
//! gets an 802.1Q tag with `id` (inserted while copying, or as an extra iovec), and only frames
//! tagged `id` are received, untagged (the kernel usually strips the tag into the ring header,
//! `TP_STATUS_VLAN_VALID`; an in-frame tag is stripped by splitting the view). Without `vlan`
//! the uplink takes untagged frames only. Several bridged networks can share one NIC, one per
//! VLAN: each has its own switch and its own sockets, and each socket filters by VLAN in user
//! space (every socket sees every frame of the NIC; a BPF filter would move that to the kernel).
//!
//! **The host cannot reach its guests through the uplink.** Frames the guests send leave
//! through the NIC's driver and frames for the host's own address never come back in: like
//! macvtap and every AF_PACKET bridge, host ↔ guest traffic through `eth1` does not work. Use a
//! `host-only` network (a second NIC in the guest), or give the host a macvlan on the same NIC
//! (`ip link add mv0 link eth1 type macvlan mode bridge`, address it, and talk through `mv0`):
//! the macvlan's frames go out onto the LAN and come back in like any other machine's.
//!
//! **Privileges.** Opening the sockets needs `CAP_NET_RAW` (and the promiscuous membership
//! counts as such); once [`AfPacketPort::start`] returns, the process needs no capability for
//! this port. Without it, [`AfPacketError::NeedsCapNetRaw`] names the capability.
//!
//! Module map: [`sys`] holds every system call and the mmap (all `unsafe`).

#![deny(missing_docs)]

pub mod sys;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use thiserror::Error;
use virtnet_switch::frame::ETH_VLAN_HEADER_LEN;
use virtnet_switch::hdr::FLAG_NEEDS_CSUM;
use virtnet_switch::{
    DropReason, Frame, NetHdr, PortConfig, PortId, PortSink, Segment, Switch, MAX_BURST,
};
use vm_memory::{Bytes, VolatileMemory, VolatileSlice};
use vmm_sys_util::eventfd::EventFd;

/// Length of the `virtio_net_hdr` in front of every frame with `PACKET_VNET_HDR`.
pub const VNET_HDR_LEN: usize = 10;
/// `TPACKET_ALIGN(sizeof(struct tpacket3_hdr))`: where `sockaddr_ll` starts in an RX frame and
/// where the data starts in a TX slot.
pub const TPACKET3_HDR_LEN: usize = 48;
/// RX ring: bytes per block (holds a 64 KiB GRO frame).
pub const RX_BLOCK_SIZE: u32 = 1 << 17;
/// RX ring: blocks.
pub const RX_BLOCK_NR: u32 = 32;
/// RX ring: nominal frame size (TPACKET_V3 packs frames; this only sizes `frame_nr`).
pub const RX_FRAME_SIZE: u32 = 2048;
/// RX ring: a partly filled block is handed over after this many milliseconds.
pub const RX_BLOCK_TIMEOUT_MS: u32 = 2;
/// TX ring: bytes per block.
pub const TX_BLOCK_SIZE: u32 = 1 << 16;
/// TX ring: blocks.
pub const TX_BLOCK_NR: u32 = 16;
/// TX ring: bytes per slot. Frames that do not fit (jumbo, GSO) go out with `sendmsg`.
pub const TX_FRAME_SIZE: u32 = 2048;
/// TX ring: slots.
pub const TX_SLOTS: usize = (TX_BLOCK_SIZE / TX_FRAME_SIZE * TX_BLOCK_NR) as usize;
/// Largest frame (with vnet header and VLAN tag) that fits a TX slot.
pub const TX_SLOT_CAPACITY: usize = TX_FRAME_SIZE as usize - TPACKET3_HDR_LEN;
/// Most segments a frame may have for one sendmsg (plus header and tag).
pub const MAX_SEGMENTS: usize = 62;
/// Most reader threads (`PACKET_FANOUT` sockets).
pub const MAX_QUEUES: u16 = 16;
pub use virtnet_port_sys::MAX_IFNAME;

const ETH_ADDRS: usize = 12;
const VLAN_TAG_LEN: usize = 4;
const TPID_8021Q: u16 = 0x8100;

// tpacket_block_desc / tpacket_hdr_v1 offsets.
const BLK_STATUS: usize = 8;
const BLK_NUM_PKTS: usize = 12;
const BLK_FIRST_PKT: usize = 16;
// tpacket3_hdr offsets.
const PKT_NEXT: usize = 0;
const PKT_SNAPLEN: usize = 12;
const PKT_LEN: usize = 16;
const PKT_STATUS: usize = 20;
const PKT_MAC: usize = 24;
const PKT_VLAN_TCI: usize = 32;
const PKT_VLAN_TPID: usize = 36;
const PKT_SLL_PKTTYPE: usize = TPACKET3_HDR_LEN + 10;

const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;
const TP_STATUS_SEND_REQUEST: u32 = 1;
const TP_STATUS_SENDING: u32 = 2;
const TP_STATUS_WRONG_FORMAT: u32 = 4;
const PACKET_LOSS: libc::c_int = 14;

/// Errors of opening an uplink.
#[derive(Debug, Error)]
pub enum AfPacketError {
    /// The name is empty, too long or has odd characters.
    #[error(
        "Invalid interface name {0:?}: use 1 to {MAX_IFNAME} characters from A-Z a-z 0-9 _ . -"
    )]
    BadName(String),
    /// No such interface in this network namespace.
    #[error("Uplink interface {0} not found")]
    NoInterface(String, #[source] io::Error),
    /// The process may not open packet sockets.
    #[error("Opening an AF_PACKET socket on {0} needs CAP_NET_RAW (run virtnetd as root, or grant it: setcap cap_net_raw+ep virtnetd)")]
    NeedsCapNetRaw(String),
    /// A VLAN id outside 1..=4094.
    #[error("VLAN id {0} is out of range 1..=4094")]
    BadVlan(u16),
    /// A queue count outside 1..=MAX_QUEUES.
    #[error("Queue count {0} is out of range 1..={MAX_QUEUES}")]
    BadQueues(u16),
    /// A socket option, the rings or the bind failed.
    #[error("Cannot set up the AF_PACKET socket on {ifname}: {step}")]
    Setup {
        /// The interface.
        ifname: String,
        /// What failed.
        step: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A reader cannot start.
    #[error("Cannot start the uplink reader")]
    Thread(#[source] io::Error),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, AfPacketError>;

/// Check an interface name: 1..=15 bytes of `[A-Za-z0-9_.-]`.
pub fn check_name(name: &str) -> Result<()> {
    if virtnet_port_sys::valid_ifname(name) {
        Ok(())
    } else {
        Err(AfPacketError::BadName(name.to_string()))
    }
}

/// How to open the uplink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AfPacketConfig {
    /// Host interface, e.g. `eth1`.
    pub ifname: String,
    /// 802.1Q VLAN id the network's frames carry on the wire; `None`: untagged.
    pub vlan: Option<u16>,
    /// Reader threads (sockets joined with `PACKET_FANOUT`), 1..=[`MAX_QUEUES`].
    pub queues: u16,
    /// Put the NIC in promiscuous mode (needed unless the NIC already is).
    pub promisc: bool,
    /// `PACKET_QDISC_BYPASS`: transmit straight to the driver, skipping qdiscs and taps.
    pub qdisc_bypass: bool,
}

impl AfPacketConfig {
    /// An untagged uplink on `ifname` with one queue, promiscuous, bypassing the qdisc.
    pub fn new(ifname: &str) -> Self {
        AfPacketConfig {
            ifname: ifname.to_string(),
            vlan: None,
            queues: 1,
            promisc: true,
            qdisc_bypass: true,
        }
    }
}

/// Counters of the uplink (the switch counts frames too; these are the sockets' side).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AfPacketStats {
    /// Frames received from the NIC and forwarded into the switch.
    pub rx_frames: u64,
    /// Bytes of those frames (after VLAN stripping).
    pub rx_bytes: u64,
    /// Frames received for another VLAN (or tagged on an untagged uplink, or untagged on a
    /// tagged one).
    pub rx_vlan_filtered: u64,
    /// Frames that did not fit the ring block, or were malformed.
    pub rx_errors: u64,
    /// Frames the kernel dropped because the RX ring was full.
    pub rx_ring_drops: u64,
    /// Frames sent through the TX ring.
    pub tx_ring_frames: u64,
    /// Frames sent with sendmsg (larger than a slot).
    pub tx_sendmsg_frames: u64,
    /// Frames dropped because every TX slot was busy.
    pub tx_ring_full: u64,
    /// Frames that could not be sent (rejected, kick or sendmsg errors).
    pub tx_errors: u64,
    /// TX ring kicks (send() calls).
    pub tx_kicks: u64,
}

#[derive(Default)]
struct Counters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_vlan_filtered: AtomicU64,
    rx_errors: AtomicU64,
    rx_ring_drops: AtomicU64,
    tx_ring_frames: AtomicU64,
    tx_sendmsg_frames: AtomicU64,
    tx_ring_full: AtomicU64,
    tx_errors: AtomicU64,
    tx_kicks: AtomicU64,
}

/// Encode `hdr` as a little-endian `virtio_net_hdr` (10 bytes), shifted by `shift` bytes
/// (a VLAN tag inserted in front of the L3 header).
pub fn encode_hdr(hdr: &NetHdr, shift: u16) -> [u8; VNET_HDR_LEN] {
    let mut b = [0u8; VNET_HDR_LEN];
    let hdr_len = if hdr.hdr_len != 0 {
        hdr.hdr_len.saturating_add(shift)
    } else {
        0
    };
    let csum_start = if hdr.flags & FLAG_NEEDS_CSUM != 0 {
        hdr.csum_start.saturating_add(shift)
    } else {
        hdr.csum_start
    };
    b[0] = hdr.flags;
    b[1] = hdr.gso_type;
    b[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    b[4..6].copy_from_slice(&hdr.gso_size.to_le_bytes());
    b[6..8].copy_from_slice(&csum_start.to_le_bytes());
    b[8..10].copy_from_slice(&hdr.csum_offset.to_le_bytes());
    b
}

/// Decode a little-endian `virtio_net_hdr` (10 bytes), unshifted by `shift` bytes (a VLAN tag
/// removed from in front of the L3 header).
pub fn decode_hdr(b: &[u8; VNET_HDR_LEN], shift: u16) -> NetHdr {
    let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let flags = b[0];
    let hdr_len = le(2);
    let csum_start = le(6);
    NetHdr {
        flags,
        gso_type: b[1],
        hdr_len: if hdr_len != 0 {
            hdr_len.saturating_sub(shift)
        } else {
            0
        },
        gso_size: le(4),
        csum_start: if flags & FLAG_NEEDS_CSUM != 0 {
            csum_start.saturating_sub(shift)
        } else {
            csum_start
        },
        csum_offset: le(8),
    }
}

/// The 4 bytes of an 802.1Q tag for `vid` (priority 0).
pub fn vlan_tag(vid: u16) -> [u8; VLAN_TAG_LEN] {
    let t = TPID_8021Q.to_be_bytes();
    let c = (vid & 0x0fff).to_be_bytes();
    [t[0], t[1], c[0], c[1]]
}

fn open_socket(ifname: &str, protocol: u16) -> Result<OwnedFd> {
    sys::packet_socket(protocol).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => AfPacketError::NeedsCapNetRaw(ifname.to_string()),
        _ => AfPacketError::Setup {
            ifname: ifname.to_string(),
            step: "socket",
            source: e,
        },
    })
}

/// The socket for frames larger than a TX slot: no rings (with a TX ring, the kernel sends
/// from the ring and ignores sendmsg's data), receives nothing (protocol 0).
fn open_big_tx(ifname: &str, ifindex: libc::c_int, cfg: &AfPacketConfig) -> Result<OwnedFd> {
    let fd = open_socket(ifname, 0)?;
    let setup = |step: &'static str| {
        let ifname = ifname.to_string();
        move |source: io::Error| AfPacketError::Setup {
            ifname,
            step,
            source,
        }
    };
    sys::set_packet_int(&fd, sys::PACKET_VNET_HDR, 1).map_err(setup("PACKET_VNET_HDR"))?;
    if cfg.qdisc_bypass {
        if let Err(e) = sys::set_packet_int(&fd, sys::PACKET_QDISC_BYPASS, 1) {
            tracing::warn!("{ifname}: PACKET_QDISC_BYPASS unavailable: {e}");
        }
    }
    sys::bind(&fd, ifindex, 0).map_err(setup("bind"))?;
    Ok(fd)
}

/// One queue's socket and its mapped rings (RX ring first, then the TX ring).
struct Sock {
    fd: OwnedFd,
    map: sys::Mmap,
    rx_len: usize,
}

impl Sock {
    fn open(
        ifname: &str,
        ifindex: libc::c_int,
        cfg: &AfPacketConfig,
        fanout: Option<u16>,
    ) -> Result<Sock> {
        let fd = open_socket(ifname, sys::ETH_P_ALL)?;
        let setup = |step: &'static str| {
            let ifname = ifname.to_string();
            move |source: io::Error| AfPacketError::Setup {
                ifname,
                step,
                source,
            }
        };
        sys::set_packet_int(&fd, sys::PACKET_VERSION, sys::TPACKET_V3)
            .map_err(setup("PACKET_VERSION TPACKET_V3"))?;
        sys::set_packet_int(&fd, sys::PACKET_VNET_HDR, 1).map_err(setup("PACKET_VNET_HDR"))?;
        sys::set_packet_int(&fd, PACKET_LOSS, 1).map_err(setup("PACKET_LOSS"))?;
        if cfg.qdisc_bypass {
            if let Err(e) = sys::set_packet_int(&fd, sys::PACKET_QDISC_BYPASS, 1) {
                tracing::warn!("{ifname}: PACKET_QDISC_BYPASS unavailable: {e}");
            }
        }
        // Older kernels lack it; the reader checks sll_pkttype anyway.
        if let Err(e) = sys::set_packet_int(&fd, sys::PACKET_IGNORE_OUTGOING, 1) {
            tracing::debug!("{ifname}: PACKET_IGNORE_OUTGOING unavailable: {e}");
        }
        let rx = sys::TpacketReq3 {
            block_size: RX_BLOCK_SIZE,
            block_nr: RX_BLOCK_NR,
            frame_size: RX_FRAME_SIZE,
            frame_nr: RX_BLOCK_SIZE / RX_FRAME_SIZE * RX_BLOCK_NR,
            retire_blk_tov: RX_BLOCK_TIMEOUT_MS,
            sizeof_priv: 0,
            feature_req_word: 0,
        };
        sys::set_ring(&fd, sys::PACKET_RX_RING, &rx).map_err(setup("PACKET_RX_RING"))?;
        let tx = sys::TpacketReq3 {
            block_size: TX_BLOCK_SIZE,
            block_nr: TX_BLOCK_NR,
            frame_size: TX_FRAME_SIZE,
            frame_nr: TX_BLOCK_SIZE / TX_FRAME_SIZE * TX_BLOCK_NR,
            ..Default::default()
        };
        sys::set_ring(&fd, sys::PACKET_TX_RING, &tx).map_err(setup("PACKET_TX_RING"))?;
        let rx_len = (RX_BLOCK_SIZE * RX_BLOCK_NR) as usize;
        let tx_len = (TX_BLOCK_SIZE * TX_BLOCK_NR) as usize;
        let map = sys::Mmap::map(&fd, rx_len + tx_len).map_err(setup("mmap of the rings"))?;
        sys::bind(&fd, ifindex, sys::ETH_P_ALL).map_err(setup("bind"))?;
        if cfg.promisc {
            sys::add_promisc(&fd, ifindex).map_err(setup("PACKET_MR_PROMISC"))?;
        }
        if let Some(group) = fanout {
            sys::join_fanout(&fd, group).map_err(setup("PACKET_FANOUT"))?;
        }
        Ok(Sock { fd, map, rx_len })
    }

    fn rx_ring(&self) -> VolatileSlice<'_> {
        // The mapping is rx_len + tx_len long by construction; an empty slice is harmless.
        self.map
            .slice()
            .subslice(0, self.rx_len)
            .unwrap_or_else(|_| self.map.slice().subslice(0, 0).unwrap_or(self.map.slice()))
    }

    fn tx_ring(&self) -> VolatileSlice<'_> {
        self.map
            .slice()
            .offset(self.rx_len)
            .unwrap_or_else(|_| self.map.slice().subslice(0, 0).unwrap_or(self.map.slice()))
    }
}

struct TxState {
    next: usize,
    pending: usize,
}

struct UplinkSink {
    sock: Arc<Sock>,
    big: OwnedFd,
    vlan: Option<u16>,
    tx: Mutex<TxState>,
    counters: Arc<Counters>,
}

impl UplinkSink {
    fn kick(&self, st: &mut TxState) {
        st.pending = 0;
        self.counters.tx_kicks.fetch_add(1, Relaxed);
        if let Err(e) = sys::kick(self.sock.fd.as_raw_fd()) {
            if e.kind() != io::ErrorKind::WouldBlock {
                self.counters.tx_errors.fetch_add(1, Relaxed);
                tracing::debug!("uplink TX kick: {e}");
            }
        }
    }

    fn slot_status(ring: &VolatileSlice<'_>, slot: usize) -> Option<u32> {
        ring.load::<u32>(slot + PKT_STATUS, Ordering::Acquire).ok()
    }

    /// Copy the frame into the next TX slot.
    fn deliver_ring(
        &self,
        frame: &dyn Frame,
        vh: &[u8; VNET_HDR_LEN],
        wire_len: usize,
    ) -> std::result::Result<(), DropReason> {
        let mut st = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let ring = self.sock.tx_ring();
        let slot = st.next * TX_FRAME_SIZE as usize;
        let mut status = Self::slot_status(&ring, slot).ok_or(DropReason::NotReady)?;
        if status & (TP_STATUS_SEND_REQUEST | TP_STATUS_SENDING) != 0 {
            // The ring is full of frames not yet sent: push them out and look again.
            self.kick(&mut st);
            status = Self::slot_status(&ring, slot).ok_or(DropReason::NotReady)?;
            if status & (TP_STATUS_SEND_REQUEST | TP_STATUS_SENDING) != 0 {
                self.counters.tx_ring_full.fetch_add(1, Relaxed);
                return Err(DropReason::NoRxBuffers);
            }
        }
        if status & TP_STATUS_WRONG_FORMAT != 0 {
            self.counters.tx_errors.fetch_add(1, Relaxed);
        }
        let total = VNET_HDR_LEN + wire_len;
        let data = ring
            .subslice(slot + TPACKET3_HDR_LEN, total)
            .map_err(|_| DropReason::FrameTooLong)?;
        data.copy_from(&vh[..]);
        let body = data
            .offset(VNET_HDR_LEN)
            .map_err(|_| DropReason::FrameTooLong)?;
        let copied = match self.vlan {
            Some(vid) => {
                let addrs = body
                    .subslice(0, ETH_ADDRS)
                    .map_err(|_| DropReason::Malformed)?;
                let a = frame.copy_to_volatile(0, &addrs);
                let tag = body
                    .subslice(ETH_ADDRS, VLAN_TAG_LEN)
                    .map_err(|_| DropReason::Malformed)?;
                tag.copy_from(&vlan_tag(vid)[..]);
                let rest = body
                    .offset(ETH_ADDRS + VLAN_TAG_LEN)
                    .map_err(|_| DropReason::Malformed)?;
                a + VLAN_TAG_LEN + frame.copy_to_volatile(ETH_ADDRS, &rest)
            }
            None => frame.copy_to_volatile(0, &body),
        };
        if copied != wire_len {
            return Err(DropReason::Malformed);
        }
        let len = u32::try_from(total).map_err(|_| DropReason::FrameTooLong)?;
        ring.write_obj(0u32, slot + PKT_NEXT)
            .and_then(|_| ring.write_obj(len, slot + PKT_LEN))
            .and_then(|_| ring.write_obj(len, slot + PKT_SNAPLEN))
            .map_err(|_| DropReason::NotReady)?;
        ring.store(TP_STATUS_SEND_REQUEST, slot + PKT_STATUS, Ordering::Release)
            .map_err(|_| DropReason::NotReady)?;
        st.next = (st.next + 1) % TX_SLOTS;
        st.pending += 1;
        self.counters.tx_ring_frames.fetch_add(1, Relaxed);
        if st.pending >= TX_SLOTS / 2 {
            self.kick(&mut st);
        }
        Ok(())
    }

    /// Send a frame too large for a slot with one sendmsg whose iovecs point at its segments.
    fn deliver_sendmsg(
        &self,
        frame: &dyn Frame,
        vh: &[u8; VNET_HDR_LEN],
    ) -> std::result::Result<(), DropReason> {
        let tag = self.vlan.map(vlan_tag);
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut iov = [empty; MAX_SEGMENTS + 3];
        iov[0] = libc::iovec {
            iov_base: vh.as_ptr().cast_mut().cast(),
            iov_len: VNET_HDR_LEN,
        };
        let mut n = 1usize;
        let mut pos = 0usize;
        let mut tag_pending = tag.is_some();
        let mut too_many = false;
        let push = |iov: &mut [libc::iovec], n: &mut usize, ptr: *const u8, len: usize| {
            if len == 0 {
                return true;
            }
            if *n >= iov.len() {
                return false;
            }
            iov[*n] = libc::iovec {
                iov_base: ptr.cast_mut().cast(),
                iov_len: len,
            };
            *n += 1;
            true
        };
        frame.for_each_segment(&mut |seg| {
            let (ptr, len) = match seg {
                Segment::Host(b) => (b.as_ptr(), b.len()),
                // The guard owns nothing without vm-memory's `xen` feature: the pointer stays
                // valid as long as the slice's mapping, which outlives this call.
                Segment::Guest(s) => (s.ptr_guard().as_ptr(), s.len()),
            };
            let ok = match (&tag, tag_pending && pos + len >= ETH_ADDRS) {
                (Some(t), true) => {
                    let k = ETH_ADDRS - pos;
                    tag_pending = false;
                    push(&mut iov, &mut n, ptr, k)
                        && push(&mut iov, &mut n, t.as_ptr(), VLAN_TAG_LEN)
                        && push(&mut iov, &mut n, ptr.wrapping_add(k), len - k)
                }
                _ => push(&mut iov, &mut n, ptr, len),
            };
            pos += len;
            if !ok {
                too_many = true;
            }
            ok
        });
        if too_many || tag_pending {
            self.counters.tx_errors.fetch_add(1, Relaxed);
            return Err(DropReason::FrameTooLong);
        }
        let mut st = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if st.pending > 0 {
            // Keep frame order: slots queued before this frame go first.
            self.kick(&mut st);
        }
        // SAFETY: iov[0] points at `vh`, the tag iovec at `tag` (both live on this stack frame);
        // the others at the frame's segments, host slices or mapped guest memory borrowed for
        // the duration of deliver().
        let r = unsafe { sys::sendmsg(self.big.as_raw_fd(), &iov[..n]) };
        drop(st);
        match r {
            Ok(_) => {
                self.counters.tx_sendmsg_frames.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(e) => {
                self.counters.tx_errors.fetch_add(1, Relaxed);
                Err(match e.kind() {
                    io::ErrorKind::WouldBlock => DropReason::NoRxBuffers,
                    io::ErrorKind::InvalidInput => DropReason::BadOffload,
                    _ => match e.raw_os_error() {
                        Some(libc::EMSGSIZE) => DropReason::FrameTooLong,
                        Some(libc::ENOBUFS) => DropReason::NoRxBuffers,
                        _ => DropReason::NotReady,
                    },
                })
            }
        }
    }
}

impl PortSink for UplinkSink {
    fn deliver(&self, frame: &dyn Frame, hdr: &NetHdr) -> std::result::Result<(), DropReason> {
        let len = frame.len();
        if len < virtnet_switch::frame::ETH_HEADER_LEN {
            return Err(DropReason::FrameTooShort);
        }
        let shift = if self.vlan.is_some() { VLAN_TAG_LEN } else { 0 };
        let wire_len = len + shift;
        let vh = encode_hdr(hdr, shift as u16);
        if VNET_HDR_LEN + wire_len <= TX_SLOT_CAPACITY {
            self.deliver_ring(frame, &vh, wire_len)
        } else {
            self.deliver_sendmsg(frame, &vh)
        }
    }

    fn flush(&self) {
        let mut st = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if st.pending > 0 {
            self.kick(&mut st);
        }
    }
}

/// A received frame: one or two views into an RX ring block (two when an in-frame 802.1Q tag
/// was cut out).
#[derive(Clone, Copy)]
struct RingFrame<'a> {
    head: VolatileSlice<'a>,
    tail: Option<VolatileSlice<'a>>,
}

impl Frame for RingFrame<'_> {
    fn len(&self) -> usize {
        self.head.len() + self.tail.map_or(0, |t| t.len())
    }

    #[inline]
    fn read_head(&self, dst: &mut [u8; ETH_VLAN_HEADER_LEN]) -> usize {
        // One unaligned load when `head` holds the whole header (always, unless the frame is
        // shorter or a tag was cut out right behind the addresses).
        if let Ok(r) = self.head.get_ref::<[u8; ETH_VLAN_HEADER_LEN]>(0) {
            *dst = r.load();
            return ETH_VLAN_HEADER_LEN;
        }
        self.read_at(0, dst)
    }

    #[inline]
    fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        // The common case (an Ethernet header, a whole untagged frame): all in `head`.
        let n = dst.len().min(self.len().saturating_sub(offset));
        match self.head.subslice(offset, n) {
            Ok(s) => s.copy_to(&mut dst[..n]),
            Err(_) => virtnet_switch::frame::read_segments_at(self, offset, dst),
        }
    }

    #[inline]
    fn copy_to_volatile(&self, offset: usize, dst: &VolatileSlice<'_>) -> usize {
        let n = dst.len().min(self.len().saturating_sub(offset));
        match self.head.subslice(offset, n) {
            Ok(s) => {
                s.copy_to_volatile_slice(*dst);
                n
            }
            Err(_) => virtnet_switch::frame::copy_segments_to_volatile(self, offset, dst),
        }
    }

    fn for_each_segment(&self, f: &mut dyn FnMut(Segment<'_>) -> bool) {
        if f(Segment::Guest(self.head)) {
            if let Some(t) = self.tail {
                f(Segment::Guest(t));
            }
        }
    }
}

/// What the reader makes of one packet in a block.
#[derive(Debug, PartialEq, Eq)]
enum Rx {
    /// Forward the frame at `head` (offset, length) followed by `tail`, with this header.
    Frame {
        head: (usize, usize),
        tail: Option<(usize, usize)>,
        hdr: NetHdr,
    },
    /// Our own or the host's outgoing frame: ignore silently.
    Outgoing,
    /// Another VLAN.
    Filtered,
    /// Truncated or malformed.
    Error,
}

/// Classify the packet whose `tpacket3_hdr` is at `p` in `ring`, for an uplink of VLAN `vlan`.
fn parse_packet(ring: &VolatileSlice<'_>, p: usize, vlan: Option<u16>) -> Rx {
    let rd32 = |off: usize| ring.read_obj::<u32>(p + off).ok();
    let (Some(snaplen), Some(len), Some(status), Some(tci), Some(tpid)) = (
        rd32(PKT_SNAPLEN),
        rd32(PKT_LEN),
        rd32(PKT_STATUS),
        rd32(PKT_VLAN_TCI),
        ring.read_obj::<u16>(p + PKT_VLAN_TPID).ok(),
    ) else {
        return Rx::Error;
    };
    let Ok(pkttype) = ring.read_obj::<u8>(p + PKT_SLL_PKTTYPE) else {
        return Rx::Error;
    };
    if pkttype == sys::PACKET_OUTGOING {
        return Rx::Outgoing;
    }
    let Ok(mac) = ring.read_obj::<u16>(p + PKT_MAC) else {
        return Rx::Error;
    };
    let mac = usize::from(mac);
    let (snaplen, len) = (snaplen as usize, len as usize);
    // With PACKET_VNET_HDR, tp_len counts the frame only; the header sits just before it.
    if snaplen < len || snaplen < virtnet_switch::frame::ETH_HEADER_LEN || mac < VNET_HDR_LEN {
        return Rx::Error;
    }
    let mut vh = [0u8; VNET_HDR_LEN];
    if ring.read_slice(&mut vh, p + mac - VNET_HDR_LEN).is_err()
        || ring.subslice(p + mac, snaplen).is_err()
    {
        return Rx::Error;
    }
    let start = p + mac;
    // Which VLAN is the frame on, and where is its tag?
    let (vid, in_frame) = if status & TP_STATUS_VLAN_VALID != 0 {
        if status & TP_STATUS_VLAN_TPID_VALID != 0 && tpid != TPID_8021Q {
            return Rx::Filtered; // an 802.1ad S-tag: not ours
        }
        let v = (tci & 0x0fff) as u16;
        (if v == 0 { None } else { Some(v) }, false)
    } else {
        let mut et = [0u8; 4];
        if ring.read_slice(&mut et, start + ETH_ADDRS).is_err() {
            return Rx::Error;
        }
        if u16::from_be_bytes([et[0], et[1]]) == TPID_8021Q {
            if snaplen < ETH_ADDRS + VLAN_TAG_LEN + 2 {
                return Rx::Error;
            }
            let v = u16::from_be_bytes([et[2], et[3]]) & 0x0fff;
            (if v == 0 { None } else { Some(v) }, true)
        } else {
            (None, false)
        }
    };
    if vid != vlan {
        return Rx::Filtered;
    }
    if in_frame {
        let tail_at = ETH_ADDRS + VLAN_TAG_LEN;
        Rx::Frame {
            head: (start, ETH_ADDRS),
            tail: Some((start + tail_at, snaplen - tail_at)),
            hdr: decode_hdr(&vh, VLAN_TAG_LEN as u16),
        }
    } else {
        Rx::Frame {
            head: (start, snaplen),
            tail: None,
            hdr: decode_hdr(&vh, 0),
        }
    }
}

/// An AF_PACKET uplink plugged into a switch.
pub struct AfPacketPort {
    switch: Arc<Switch>,
    port: PortId,
    ifname: String,
    vlan: Option<u16>,
    socks: Vec<Arc<Sock>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    threads: Vec<JoinHandle<()>>,
}

static FANOUT_SEQ: AtomicU16 = AtomicU16::new(0);

impl AfPacketPort {
    /// Open the sockets on `config.ifname`, plug the uplink into `switch` (as an access port of
    /// the untagged VLAN: the tag exists only on the wire) and start the readers.
    pub fn start(switch: Arc<Switch>, config: &AfPacketConfig) -> Result<AfPacketPort> {
        check_name(&config.ifname)?;
        if let Some(v) = config.vlan {
            if !(1..=4094).contains(&v) {
                return Err(AfPacketError::BadVlan(v));
            }
        }
        if !(1..=MAX_QUEUES).contains(&config.queues) {
            return Err(AfPacketError::BadQueues(config.queues));
        }
        let ifname = config.ifname.clone();
        let ifindex =
            sys::ifindex(&ifname).map_err(|e| AfPacketError::NoInterface(ifname.clone(), e))?;
        if !sys::is_up(&ifname).unwrap_or(true) {
            tracing::warn!("uplink {ifname} is down: no frames cross until it is up");
        }
        let fanout = (config.queues > 1).then(|| {
            (std::process::id() as u16) ^ FANOUT_SEQ.fetch_add(1, Relaxed).wrapping_mul(0x9e37)
        });
        let mut socks = Vec::with_capacity(usize::from(config.queues));
        for _ in 0..config.queues {
            socks.push(Arc::new(Sock::open(&ifname, ifindex, config, fanout)?));
        }
        let big = open_big_tx(&ifname, ifindex, config)?;
        let counters = Arc::new(Counters::default());
        let wake = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(AfPacketError::Thread)?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let name = match config.vlan {
            Some(v) => format!("uplink:{ifname}.{v}"),
            None => format!("uplink:{ifname}"),
        };
        let port = switch.add_port(
            PortConfig { name, vlan: None },
            Arc::new(UplinkSink {
                sock: socks[0].clone(),
                big,
                vlan: config.vlan,
                tx: Mutex::new(TxState {
                    next: 0,
                    pending: 0,
                }),
                counters: counters.clone(),
            }),
        );
        let mut this = AfPacketPort {
            switch: switch.clone(),
            port,
            ifname: ifname.clone(),
            vlan: config.vlan,
            socks: socks.clone(),
            counters: counters.clone(),
            stop: stop.clone(),
            wake: wake.clone(),
            threads: Vec::new(),
        };
        for (q, sock) in socks.into_iter().enumerate() {
            let reader = Reader {
                switch: switch.clone(),
                port,
                sock,
                vlan: config.vlan,
                counters: counters.clone(),
                stop: stop.clone(),
                wake: wake.clone(),
            };
            let t = std::thread::Builder::new()
                .name(format!("afp-{ifname}-{q}"))
                .spawn(move || reader.run())
                .map_err(AfPacketError::Thread)?;
            this.threads.push(t);
        }
        tracing::info!(
            "uplink {ifname}: AF_PACKET TPACKET_V3 up (switch port {}, vlan {:?}, {} queue(s))",
            port.0,
            config.vlan,
            config.queues
        );
        Ok(this)
    }

    /// The interface's name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The VLAN id on the wire, if tagging.
    pub fn vlan(&self) -> Option<u16> {
        self.vlan
    }

    /// Its port on the switch.
    pub fn port_id(&self) -> PortId {
        self.port
    }

    /// Counters (also collects the kernel's RX ring drop counts).
    pub fn stats(&self) -> AfPacketStats {
        let c = &self.counters;
        for s in &self.socks {
            if let Ok(st) = sys::packet_stats(&s.fd) {
                c.rx_ring_drops.fetch_add(u64::from(st.drops), Relaxed);
            }
        }
        AfPacketStats {
            rx_frames: c.rx_frames.load(Relaxed),
            rx_bytes: c.rx_bytes.load(Relaxed),
            rx_vlan_filtered: c.rx_vlan_filtered.load(Relaxed),
            rx_errors: c.rx_errors.load(Relaxed),
            rx_ring_drops: c.rx_ring_drops.load(Relaxed),
            tx_ring_frames: c.tx_ring_frames.load(Relaxed),
            tx_sendmsg_frames: c.tx_sendmsg_frames.load(Relaxed),
            tx_ring_full: c.tx_ring_full.load(Relaxed),
            tx_errors: c.tx_errors.load(Relaxed),
            tx_kicks: c.tx_kicks.load(Relaxed),
        }
    }

    fn stop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.stop.store(true, Relaxed);
        let _ = self.wake.write(1);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The sink holds the last reference to socket 0: removing the port closes it, and the
        // NIC leaves promiscuous mode with the last membership.
        self.switch.remove_port(self.port);
        tracing::info!("uplink {}: closed", self.ifname);
    }

    /// Stop the readers, leave the switch, close the sockets.
    pub fn shutdown(mut self) {
        self.stop();
    }
}

impl Drop for AfPacketPort {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Reader {
    switch: Arc<Switch>,
    port: PortId,
    sock: Arc<Sock>,
    vlan: Option<u16>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
}

impl Reader {
    fn run(self) {
        let mut batch = self.switch.new_batch();
        let fd = self.sock.fd.as_raw_fd();
        let ring = self.sock.rx_ring();
        let block_size = RX_BLOCK_SIZE as usize;
        let mut cur = 0usize;
        while !self.stop.load(Relaxed) {
            let ready = |cur: usize| {
                ring.load::<u32>(cur * block_size + BLK_STATUS, Ordering::Acquire)
                    .is_ok_and(|s| s & TP_STATUS_USER != 0)
            };
            if !ready(cur) {
                match sys::poll_readable([fd, self.wake.as_raw_fd()], 1000) {
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!("uplink poll: {e}");
                        return;
                    }
                }
                continue;
            }
            for _ in 0..RX_BLOCK_NR {
                if !ready(cur) {
                    break;
                }
                let Ok(block) = ring.subslice(cur * block_size, block_size) else {
                    return;
                };
                self.switch.begin(&mut batch);
                self.walk_block(&block, &mut batch);
                self.switch.end(&mut batch);
                // Hand the block back: every view into it is gone (deliver copied).
                if ring
                    .store(
                        TP_STATUS_KERNEL,
                        cur * block_size + BLK_STATUS,
                        Ordering::Release,
                    )
                    .is_err()
                {
                    return;
                }
                cur = (cur + 1) % RX_BLOCK_NR as usize;
            }
        }
    }

    fn walk_block(&self, block: &VolatileSlice<'_>, batch: &mut virtnet_switch::TxBatch) {
        let (Ok(num), Ok(first)) = (
            block.read_obj::<u32>(BLK_NUM_PKTS),
            block.read_obj::<u32>(BLK_FIRST_PKT),
        ) else {
            return;
        };
        let mut p = first as usize;
        // Frames go to the switch in bursts ([`MAX_BURST`]); the counters once per block.
        let empty = RingFrame {
            head: block.subslice(0, 0).unwrap_or(*block),
            tail: None,
        };
        let mut frames = [empty; MAX_BURST];
        let mut hdrs = [NetHdr::NONE; MAX_BURST];
        let mut n = 0;
        let (mut count, mut bytes) = (0u64, 0u64);
        for i in 0..num {
            match parse_packet(block, p, self.vlan) {
                Rx::Frame { head, tail, hdr } => {
                    let view = |(o, l): (usize, usize)| block.subslice(o, l).ok();
                    let f = match (view(head), tail.map(view)) {
                        (Some(head), None) => Some(RingFrame { head, tail: None }),
                        (Some(head), Some(Some(tail))) => Some(RingFrame {
                            head,
                            tail: Some(tail),
                        }),
                        _ => None,
                    };
                    match f {
                        Some(f) => {
                            count += 1;
                            bytes += f.len() as u64;
                            frames[n] = f;
                            hdrs[n] = hdr;
                            n += 1;
                            if n == MAX_BURST {
                                self.switch.forward_burst(batch, self.port, &frames, &hdrs);
                                n = 0;
                            }
                        }
                        None => {
                            self.counters.rx_errors.fetch_add(1, Relaxed);
                        }
                    }
                }
                Rx::Outgoing => {}
                Rx::Filtered => {
                    self.counters.rx_vlan_filtered.fetch_add(1, Relaxed);
                }
                Rx::Error => {
                    self.counters.rx_errors.fetch_add(1, Relaxed);
                    self.switch
                        .count_drop(batch, self.port, DropReason::Malformed);
                }
            }
            if i + 1 == num {
                break;
            }
            match block.read_obj::<u32>(p + PKT_NEXT) {
                Ok(0) | Err(_) => break,
                Ok(n) => p += n as usize,
            }
        }
        self.switch
            .forward_burst(batch, self.port, &frames[..n], &hdrs[..n]);
        if count > 0 {
            self.counters.rx_frames.fetch_add(count, Relaxed);
            self.counters.rx_bytes.fetch_add(bytes, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtnet_port_sys::is_root;

    #[test]
    fn names_are_checked() {
        for ok in ["eth1", "a", "enp0s31f6", "abcdefghijklmno"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "abcdefghijklmnop", "a b", "a/b", "..", "é"] {
            assert!(
                matches!(check_name(bad), Err(AfPacketError::BadName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn vnet_header_shifts_with_the_tag() {
        let h = NetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type: 1,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let b = encode_hdr(&h, 4);
        assert_eq!(b[2..4], 58u16.to_le_bytes());
        assert_eq!(b[6..8], 38u16.to_le_bytes());
        assert_eq!(decode_hdr(&b, 4), h);
        assert_eq!(decode_hdr(&encode_hdr(&h, 0), 0), h);
        // Without NEEDS_CSUM the checksum fields are not offsets and stay as they are.
        let n = NetHdr::NONE;
        assert_eq!(decode_hdr(&encode_hdr(&n, 4), 4), n);
    }

    #[test]
    fn ring_frame_reads_across_the_cut() {
        let mut a: Vec<u8> = (0u8..20).collect();
        let mut b: Vec<u8> = (100u8..110).collect();
        let f = RingFrame {
            head: VolatileSlice::from(&mut a[..]),
            tail: Some(VolatileSlice::from(&mut b[..])),
        };
        let whole: Vec<u8> = (0u8..20).chain(100..110).collect();
        assert_eq!(f.len(), 30);
        for (off, len) in [(0, 14), (0, 30), (5, 20), (18, 5), (25, 10), (30, 4)] {
            let mut got = vec![0u8; len];
            let n = f.read_at(off, &mut got);
            let want = &whole[off.min(30)..(off + len).min(30)];
            assert_eq!(&got[..n], want, "read_at({off}, {len})");
            let mut out = vec![0u8; len];
            let n = f.copy_to_volatile(off, &VolatileSlice::from(&mut out[..]));
            assert_eq!(&out[..n], want, "copy_to_volatile({off}, {len})");
        }
        // The header: over the cut, and in `head` alone.
        let mut h = [0u8; ETH_VLAN_HEADER_LEN];
        assert_eq!(f.read_head(&mut h), 18);
        assert_eq!(h[..], whole[..18]);
        let g = RingFrame {
            head: VolatileSlice::from(&mut b[..]),
            tail: None,
        };
        assert_eq!(g.read_head(&mut h), 10);
        assert_eq!(h[..10], (100u8..110).collect::<Vec<_>>()[..]);
        let mut long: Vec<u8> = (0u8..64).collect();
        let g = RingFrame {
            head: VolatileSlice::from(&mut long[..]),
            tail: None,
        };
        assert_eq!(g.read_head(&mut h), 18);
        assert_eq!(h[..], (0u8..18).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn vlan_tag_bytes() {
        assert_eq!(vlan_tag(100), [0x81, 0x00, 0x00, 100]);
        assert_eq!(vlan_tag(0xfff), [0x81, 0x00, 0x0f, 0xff]);
    }

    /// A hand-made `tpacket3_hdr` + `sockaddr_ll` + vnet header + frame at offset `P`.
    fn packet(buf: &mut [u8], frame: &[u8], status: u32, tci: u32, pkttype: u8) {
        const P: usize = 64;
        const MAC: usize = 80;
        let n = frame.len() as u32;
        buf[P + PKT_SNAPLEN..P + PKT_SNAPLEN + 4].copy_from_slice(&n.to_ne_bytes());
        buf[P + PKT_LEN..P + PKT_LEN + 4].copy_from_slice(&n.to_ne_bytes());
        buf[P + PKT_STATUS..P + PKT_STATUS + 4].copy_from_slice(&status.to_ne_bytes());
        buf[P + PKT_MAC..P + PKT_MAC + 2].copy_from_slice(&(MAC as u16).to_ne_bytes());
        buf[P + PKT_VLAN_TCI..P + PKT_VLAN_TCI + 4].copy_from_slice(&tci.to_ne_bytes());
        buf[P + PKT_VLAN_TPID..P + PKT_VLAN_TPID + 2].copy_from_slice(&TPID_8021Q.to_ne_bytes());
        buf[P + PKT_SLL_PKTTYPE] = pkttype;
        let h = NetHdr {
            flags: FLAG_NEEDS_CSUM,
            csum_start: 38,
            csum_offset: 6,
            ..NetHdr::NONE
        };
        buf[P + MAC - VNET_HDR_LEN..P + MAC].copy_from_slice(&encode_hdr(&h, 0));
        buf[P + MAC..P + MAC + frame.len()].copy_from_slice(frame);
    }

    #[test]
    fn parse_packet_sorts_tags_loops_and_garbage() {
        let mut tagged = vec![0xff; 6];
        tagged.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 100, 0x08, 0x00]);
        tagged.resize(64, 0xab);
        let untagged: Vec<u8> = tagged[..12].iter().chain(&tagged[16..]).copied().collect();
        let mut buf = vec![0u8; 4096];

        // An in-frame tag: the view skips it and the checksum offset moves back by 4.
        packet(&mut buf, &tagged, TP_STATUS_USER, 0, 0);
        let ring = VolatileSlice::from(&mut buf[..]);
        match parse_packet(&ring, 64, Some(100)) {
            Rx::Frame { head, tail, hdr } => {
                assert_eq!(head, (144, 12));
                assert_eq!(tail, Some((160, 48)));
                assert_eq!((hdr.csum_start, hdr.csum_offset), (34, 6));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_packet(&ring, 64, None), Rx::Filtered);
        assert_eq!(parse_packet(&ring, 64, Some(101)), Rx::Filtered);

        // A tag the kernel moved into the header: the frame is whole.
        packet(
            &mut buf,
            &untagged,
            TP_STATUS_USER | TP_STATUS_VLAN_VALID,
            100,
            0,
        );
        let ring = VolatileSlice::from(&mut buf[..]);
        assert!(matches!(
            parse_packet(&ring, 64, Some(100)),
            Rx::Frame {
                head: (144, 60),
                tail: None,
                ..
            }
        ));
        assert_eq!(parse_packet(&ring, 64, None), Rx::Filtered);

        // Untagged: only for an untagged uplink.
        packet(&mut buf, &untagged, TP_STATUS_USER, 0, 0);
        let ring = VolatileSlice::from(&mut buf[..]);
        assert!(matches!(
            parse_packet(&ring, 64, None),
            Rx::Frame { tail: None, .. }
        ));
        assert_eq!(parse_packet(&ring, 64, Some(100)), Rx::Filtered);

        // Our own transmissions never come back in.
        packet(&mut buf, &untagged, TP_STATUS_USER, 0, sys::PACKET_OUTGOING);
        let ring = VolatileSlice::from(&mut buf[..]);
        assert_eq!(parse_packet(&ring, 64, None), Rx::Outgoing);

        // Truncated (snaplen < len), a MAC offset with no room for the header, out of bounds.
        packet(&mut buf, &untagged, TP_STATUS_USER, 0, 0);
        buf[64 + PKT_LEN..64 + PKT_LEN + 4].copy_from_slice(&9000u32.to_ne_bytes());
        assert_eq!(
            parse_packet(&VolatileSlice::from(&mut buf[..]), 64, None),
            Rx::Error
        );
        packet(&mut buf, &untagged, TP_STATUS_USER, 0, 0);
        buf[64 + PKT_MAC..64 + PKT_MAC + 2].copy_from_slice(&4u16.to_ne_bytes());
        assert_eq!(
            parse_packet(&VolatileSlice::from(&mut buf[..]), 64, None),
            Rx::Error
        );
        packet(&mut buf, &untagged, TP_STATUS_USER, 0, 0);
        buf[64 + PKT_MAC..64 + PKT_MAC + 2].copy_from_slice(&4090u16.to_ne_bytes());
        assert_eq!(
            parse_packet(&VolatileSlice::from(&mut buf[..]), 64, None),
            Rx::Error
        );
        assert_eq!(
            parse_packet(&VolatileSlice::from(&mut buf[..]), 4090, None),
            Rx::Error
        );
    }

    #[test]
    fn config_is_checked_before_any_socket() {
        let sw = Switch::new(Default::default());
        let mut c = AfPacketConfig::new("lo");
        c.vlan = Some(4095);
        assert!(matches!(
            AfPacketPort::start(sw.clone(), &c),
            Err(AfPacketError::BadVlan(4095))
        ));
        let mut c = AfPacketConfig::new("lo");
        c.queues = 0;
        assert!(matches!(
            AfPacketPort::start(sw.clone(), &c),
            Err(AfPacketError::BadQueues(0))
        ));
        let c = AfPacketConfig::new("no-such-if9");
        assert!(matches!(
            AfPacketPort::start(sw.clone(), &c),
            Err(AfPacketError::NoInterface(..))
        ));
        assert!(sw.ports().is_empty());
    }
    #[derive(Default)]
    struct Recorder {
        frames: Mutex<Vec<(Vec<u8>, NetHdr)>>,
        cv: std::sync::Condvar,
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

    impl Recorder {
        /// Wait up to 5 s for a frame matching `pred`.
        fn wait_for(&self, pred: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let mut frames = self.frames.lock().unwrap();
            loop {
                if let Some((f, _)) = frames.iter().find(|(f, _)| pred(f)) {
                    return Some(f.clone());
                }
                let now = std::time::Instant::now();
                if now >= deadline {
                    return None;
                }
                frames = self.cv.wait_timeout(frames, deadline - now).unwrap().0;
            }
        }
    }

    fn ip(args: &str) {
        let st = std::process::Command::new("ip")
            .args(args.split_whitespace())
            .status()
            .expect("run ip");
        assert!(st.success(), "ip {args}");
    }

    fn mac_of(ifname: &str) -> [u8; 6] {
        // /sys shows the initial namespace: ask ip.
        let out = std::process::Command::new("ip")
            .args(["-o", "link", "show", ifname])
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        let addr = s
            .split("link/ether ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let v: Vec<u8> = addr
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        v.try_into().unwrap()
    }

    /// An Ethernet + IPv4 + UDP frame with `payload_len` bytes of payload.
    fn udp_frame(
        dst: [u8; 6],
        src: [u8; 6],
        sip: [u8; 4],
        dip: [u8; 4],
        dport: u16,
        payload_len: usize,
    ) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[8, 0]);
        let total = (20 + 8 + payload_len) as u16;
        let mut iph = vec![0x45, 0];
        iph.extend_from_slice(&total.to_be_bytes());
        iph.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
        iph.extend_from_slice(&sip);
        iph.extend_from_slice(&dip);
        let c = virtnet_switch::gso::checksum::checksum(&iph);
        iph[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&iph);
        f.extend_from_slice(&4444u16.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend((0..payload_len).map(|i| (i % 251) as u8));
        f
    }

    fn send(sw: &Switch, port: PortId, frame: &[u8]) {
        // Two segments, so both TX paths gather.
        let (a, b) = frame.split_at(7);
        let parts: [&[u8]; 2] = [a, b];
        let mut batch = sw.new_batch();
        sw.begin(&mut batch);
        sw.forward(
            &mut batch,
            port,
            &virtnet_switch::frame::SlicesFrame(&parts),
            &NetHdr::NONE,
        );
        sw.end(&mut batch);
    }

    fn is_arp_for(f: &[u8], ip: [u8; 4]) -> bool {
        f.len() >= 42 && f[12..14] == [8, 6] && f[38..42] == ip
    }

    /// A veth pair in a private network namespace: `va` is the uplink, `vb` (10.78.0.1/24,
    /// and `vb.100` = 10.79.0.1/24 on VLAN 100) is the LAN's host. Frames cross both ways
    /// through the rings, large ones through sendmsg, nothing the uplink sends comes back,
    /// and a VLAN uplink tags, strips and filters.
    #[test]
    fn veth_uplink_carries_frames_both_ways() {
        if !is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "required in CI: needs root (CAP_NET_RAW, CAP_SYS_ADMIN for a netns)"
            );
            eprintln!("SKIPPED: needs root (CAP_NET_RAW, CAP_SYS_ADMIN for a netns)");
            return;
        }
        std::thread::spawn(|| {
            sys::unshare_netns().expect("unshare(CLONE_NEWNET)");
            ip("link add va mtu 9000 type veth peer name vb mtu 9000");
            ip("link set va up");
            ip("addr add 10.78.0.1/24 dev vb");
            ip("link set vb up");
            let vb_mac = mac_of("vb");
            let gmac = [0x52, 0x54, 0, 0, 0, 0x21];

            // Untagged uplink.
            let sw = Switch::new(Default::default());
            let up = AfPacketPort::start(sw.clone(), &AfPacketConfig::new("va")).unwrap();
            let rec = Arc::new(Recorder::default());
            let guest = sw.add_port(PortConfig::default(), rec.clone());

            // Guest → LAN, through a TX ring slot.
            let sock = std::net::UdpSocket::bind("10.78.0.1:5555").unwrap();
            sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let f = udp_frame(vb_mac, gmac, [10, 78, 0, 2], [10, 78, 0, 1], 5555, 100);
            send(&sw, guest, &f);
            let mut got = vec![0u8; 9000];
            let (n, from) = sock.recv_from(&mut got).expect("datagram from the guest");
            assert_eq!(n, 100);
            assert_eq!(from.to_string(), "10.78.0.2:4444");
            // Guest → LAN, a jumbo frame through sendmsg.
            let f = udp_frame(vb_mac, gmac, [10, 78, 0, 2], [10, 78, 0, 1], 5555, 5000);
            send(&sw, guest, &f);
            let r = sock.recv_from(&mut got);
            let (n, _) = r.unwrap_or_else(|e| {
                panic!(
                    "jumbo datagram: {e} {:?} {:?}",
                    up.stats(),
                    sw.port_stats(up.port_id()).map(|s| s.snapshot())
                )
            });
            assert_eq!(n, 5000);
            assert_eq!(got[4999], (4999 % 251) as u8);
            let s = up.stats();
            assert_eq!(
                (s.tx_ring_frames, s.tx_sendmsg_frames, s.tx_errors),
                (1, 1, 0)
            );

            // LAN → guest: answering makes the LAN host ARP for 10.78.0.2.
            sock.send_to(b"reply", "10.78.0.2:4444").unwrap();
            let arp = rec
                .wait_for(|f| is_arp_for(f, [10, 78, 0, 2]))
                .expect("ARP from the LAN");
            assert_eq!(arp[6..12], vb_mac);
            // A guest broadcast must not loop back in through the uplink: the guest's MAC stays
            // learned on the guest port and the guest never sees its own frame.
            let bc = udp_frame([0xff; 6], gmac, [10, 78, 0, 2], [10, 78, 0, 255], 9, 20);
            send(&sw, guest, &bc);
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert_eq!(sw.lookup(None, virtnet_switch::MacAddr(gmac)), Some(guest));
            assert!(!rec
                .frames
                .lock()
                .unwrap()
                .iter()
                .any(|(f, _)| f[6..12] == gmac));
            assert!(up.stats().rx_frames >= 1);
            up.shutdown();
            sw.remove_port(guest);

            // Two queues (PACKET_FANOUT): frames still arrive, once each.
            let sw = Switch::new(Default::default());
            let mut cfg = AfPacketConfig::new("va");
            cfg.queues = 2;
            let up = AfPacketPort::start(sw.clone(), &cfg).unwrap();
            let rec = Arc::new(Recorder::default());
            sw.add_port(PortConfig::default(), rec.clone());
            sock.send_to(b"reply", "10.78.0.5:4444").unwrap();
            rec.wait_for(|f| is_arp_for(f, [10, 78, 0, 5]))
                .expect("ARP through a fanout group");
            std::thread::sleep(std::time::Duration::from_millis(100));
            let first = rec.frames.lock().unwrap()[0].0.clone();
            let copies = rec
                .frames
                .lock()
                .unwrap()
                .iter()
                .filter(|(f, _)| *f == first)
                .count();
            assert_eq!(copies, 1, "a frame came in through both sockets");
            up.shutdown();

            // A VLAN 100 uplink on the same NIC: tagged on the wire, untagged in the switch.
            // The LAN side has no 8021q module here, so two more uplinks on `vb` play the LAN:
            // one on VLAN 100, one untagged (the kernel reports tags in the ring header, so the
            // LAN side's filtering does not depend on how we inserted the tag).
            let sw = Switch::new(Default::default());
            let mut cfg = AfPacketConfig::new("va");
            cfg.vlan = Some(100);
            let up = AfPacketPort::start(sw.clone(), &cfg).unwrap();
            let rec = Arc::new(Recorder::default());
            let guest = sw.add_port(PortConfig::default(), rec.clone());
            let lan100 = Switch::new(Default::default());
            let mut cfg = AfPacketConfig::new("vb");
            cfg.vlan = Some(100);
            let lan100_up = AfPacketPort::start(lan100.clone(), &cfg).unwrap();
            let rec100 = Arc::new(Recorder::default());
            let host100 = lan100.add_port(PortConfig::default(), rec100.clone());
            let lan0 = Switch::new(Default::default());
            let lan0_up = AfPacketPort::start(lan0.clone(), &AfPacketConfig::new("vb")).unwrap();
            let rec0 = Arc::new(Recorder::default());
            let host0 = lan0.add_port(PortConfig::default(), rec0.clone());
            let lan_mac = [0x02, 0, 0, 0, 0, 0x99];
            for len in [64, 3000] {
                let f = udp_frame(lan_mac, gmac, [10, 79, 0, 2], [10, 79, 0, 1], 5556, len);
                send(&sw, guest, &f);
                let got = rec100
                    .wait_for(|g| g.len() == f.len() && g[6..12] == gmac)
                    .expect("the guest's frame on VLAN 100");
                assert_eq!(got, f, "tag added on the wire, stripped at the LAN side");
            }
            assert!(!rec0
                .frames
                .lock()
                .unwrap()
                .iter()
                .any(|(g, _)| g[6..12] == gmac));
            // Untagged LAN traffic must not reach the VLAN's guest; tagged traffic does.
            let untagged = udp_frame([0xff; 6], lan_mac, [10, 78, 0, 9], [10, 78, 0, 255], 7, 30);
            send(&lan0, host0, &untagged);
            let tagged = udp_frame(gmac, lan_mac, [10, 79, 0, 1], [10, 79, 0, 2], 7, 40);
            send(&lan100, host100, &tagged);
            assert_eq!(rec.wait_for(|g| g[6..12] == lan_mac), Some(tagged));
            std::thread::sleep(std::time::Duration::from_millis(200));
            assert_eq!(
                rec.frames.lock().unwrap().len(),
                1,
                "untagged frame leaked into VLAN 100"
            );
            assert!(up.stats().rx_vlan_filtered >= 1);
            lan0_up.shutdown();
            lan100_up.shutdown();
            up.shutdown();
        })
        .join()
        .unwrap();
    }
}
