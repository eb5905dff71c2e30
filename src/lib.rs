//! # virtnet
//!
//! Fast, safe networking for virtual machines: virtio-net devices served over the vhost-user
//! protocol, each plugged into a port of a zero-copy software switch.
//!
//! This facade re-exports the member crates so that one dependency gives an embedder everything:
//!
//! | crate | what it is |
//! |---|---|
//! | [`switch`] | the L2 switch core: ports, MAC learning with ageing, VLAN access ports, flooding, counters. No virtio, no sockets, no unsafe. |
//! | [`virtio`] | the vhost-user virtio-net device: one switch port per device. |
//! | [`guest`] | the driver side of virtio-net in user space (a vhost-user frontend), for tests, benches and examples. |
//!
//! The daemon `virtnetd` (crate `crates/daemon`) only wires these together.

pub use virtnet_guest as guest;
pub use virtnet_switch as switch;
pub use virtnet_virtio as virtio;
