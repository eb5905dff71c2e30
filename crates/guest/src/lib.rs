//! # virtnet-guest: a user-space virtio-net driver over vhost-user
//!
//! The *driver* side of virtio-net, like DPDK's `virtio_user`: it connects to a vhost-user
//! backend's socket as the frontend (the role a VMM plays), shares a memfd "guest memory"
//! with it, fills split virtqueues by hand, and sends and receives Ethernet frames. It is how
//! virtnet is tested and benchmarked without a VM, and it works against any vhost-user-net
//! backend (virtnet's own, DPDK `net_vhost`, …).
//!
//! ```text
//!   test / bench                       this crate                         backend process
//!   ────────────                       ──────────                         ───────────────
//!   Guest::send(qp, hdr, frame) ──► TX slots ─► split ring ─ kick ─────► dequeues, forwards
//!   Guest::recv(qp, timeout)   ◄── reassemble ◄─ used ring ◄─ call ───── enqueues into RX bufs
//!                                   GuestMem (memfd, shared via SET_MEM_TABLE)
//! ```
//!
//! Layering (each module only uses the ones above it):
//! - [`mem`]: the memfd region and a bump allocator; all access is bounds-checked vm-memory.
//! - [`ring`]: a split virtqueue, driver side: descriptor free list, avail/used rings,
//!   EVENT_IDX, indirect tables. No I/O; unit-tested by playing the device.
//! - [`virtio_net`]: feature bits, `virtio_net_hdr` encoding, config space, control commands.
//! - [`guest`]: [`Guest`]: the vhost-user handshake, eventfds, TX/RX/control queues, and the
//!   raw interface ([`RawQueue`]) for hostile-guest tests.
//!
//! ## Example
//!
//! ```no_run
//! use std::time::Duration;
//! use virtnet_guest::{Guest, GuestConfig, NetHdr};
//!
//! # fn main() -> Result<(), virtnet_guest::Error> {
//! let mut vm = Guest::connect("/run/virtnet/vm0.sock", GuestConfig::default())?;
//! println!("features {:#x}, mac {:?}", vm.acked_features(), vm.mac());
//!
//! let mut frame = [0u8; 60];
//! frame[..6].copy_from_slice(&[0xff; 6]); // broadcast
//! frame[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
//! frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
//! vm.send(0, &NetHdr::NONE, &frame)?;
//!
//! if let Some(rx) = vm.recv(0, Duration::from_secs(1))? {
//!     println!("got {} bytes in {} buffers", rx.frame.len(), rx.num_buffers);
//! }
//!
//! // Load generation without allocation: fill frames in place, one kick per batch.
//! let queued = vm.send_batch(0, 32, |_, buf| {
//!     buf[..60].copy_from_slice(&frame);
//!     Some((NetHdr::NONE, 60))
//! })?;
//! # let _ = queued;
//! vm.disconnect();
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod guest;
pub mod mem;
pub mod ring;
pub mod virtio_net;

pub use guest::{Error, Guest, GuestConfig, GuestStats, RawQueue, Received, Result, MAX_FRAME_LEN};
pub use mem::GuestMem;
pub use ring::{RawDesc, UsedElem};
pub use virtio_net::{NetConfigSpace, DEFAULT_FEATURES};
pub use virtnet_switch::NetHdr;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_can_move_to_another_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Guest>();
        assert_send::<Received>();
    }
}
