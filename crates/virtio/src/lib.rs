//! # virtnet-virtio: the vhost-user virtio-net device
//!
//! A guest's virtio-net device, served over vhost-user, as one port of a
//! [`virtnet_switch::Switch`]. Embeddable in a VMM (use [`NetDevice`] +
//! [`VhostUserNetBackend`] with your own `VhostUserDaemon`) or served on a socket across VMM
//! reconnects ([`NetPort`]).
//!
//! ## Layering
//!
//! ```text
//!   port.rs      NetPort (socket, reconnect loop), NetDevice (port, counters, ctrl state)
//!      │
//!   vhu_net.rs   VhostUserBackend glue: queues/threads, features, config space, events
//!      │
//!   tx.rs  rx.rs  ctrl.rs     queue engines; plain virtio_queue::Queue + GuestMemoryMmap,
//!      │                      no vhost-user types (tested with MockSplitQueue)
//!   desc.rs      chain walking, used-ring writes, interrupt suppression
//!   virtio_net.rs  spec: feature bits, config space, virtio_net_hdr, ctrl commands
//! ```
//!
//! ## Data path
//!
//! A TX kick drains up to 64 chains. Each chain becomes a [`virtnet_switch::Frame`] whose
//! segments are bounds-checked `VolatileSlice`s into the guest's memory, and is handed to
//! `Switch::forward`. Destinations copy straight out of it: another guest's RX queue copies
//! header and frame into its own buffers (one copy), then publishes its used index once per
//! batch in `PortSink::flush`. Offloads (partial checksums, TSO) pass through when the
//! destination negotiated them, and are done in software (`virtnet_switch::gso`) otherwise.
//!
//! ## Module map
//!
//! - [`port`]: [`NetConfig`], [`NetPort`], [`NetDevice`], [`DeviceStatus`], [`Error`].
//! - [`vhu_net`]: [`VhostUserNetBackend`], named event ids.
//! - [`tx`]: the TX engine ([`tx::process_tx_queue`] is the fuzzing entry point).
//! - [`rx`]: the RX engine and [`rx::RxSink`], the port's `PortSink`.
//! - [`ctrl`]: control queue commands and the RX filter.
//! - [`desc`]: descriptor chains and the used ring.
//! - `shim`: a vhost-user message shim in front of the backend (QEMU sends SET_VRING_ENABLE
//!   before SET_FEATURES, which the `vhost` crate rejects).
//! - [`virtio_net`]: spec structures and constants.

#![deny(missing_docs)]

pub mod ctrl;
pub mod desc;
pub mod port;
pub mod rx;
mod shim;
pub mod tx;
pub mod vhu_net;
pub mod virtio_net;

pub use port::{
    default_busy_poll, DeviceStatus, Error, NetConfig, NetDevice, NetPort, Result,
    DEFAULT_BUSY_POLL,
};
pub use vhu_net::VhostUserNetBackend;
