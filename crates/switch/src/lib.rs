//! # virtnet-switch: the L2 switch core
//!
//! Knows frames, not virtio and not sockets. Everything that can move a frame (a guest's
//! virtio-net device, an AF_PACKET uplink, a TAP, a NAT gateway) is a *port*: it hands frames to
//! [`Switch::forward`] and receives frames through its [`PortSink`].
//!
//! ```text
//!   ingress port worker                       destination ports
//!   ───────────────────                       ─────────────────
//!   drain a batch of frames ──► Switch::forward(batch, ingress, &frame, &hdr)
//!                               (or forward_burst(batch, ingress, &frames, &hdrs): the same
//!                                per frame, and a run of frames for one port goes to its
//!                                PortSink::deliver_burst in one call)
//!                                 │  parse Ethernet header (stack copy of 18 bytes)
//!                                 │  learn (vlan, src MAC) → ingress  (FDB, ageing)
//!                                 │  look up (vlan, dst MAC):
//!                                 │     known unicast  → that port (never back to ingress)
//!                                 │     bcast/mcast/unknown → every other port of the VLAN
//!                                 └──► PortSink::deliver(&frame, &hdr)   (copy into its memory)
//!   Switch::end(batch)  ─────────────► PortSink::flush()  once per touched port per batch
//! ```
//!
//! A frame crosses the switch as a borrowed scatter-gather view ([`Frame`]): segments point
//! into the source's memory (mapped guest memory, a ring slot) and the destination copies
//! straight from them into its own buffers. There is no heap allocation per frame.
//!
//! Module map:
//! - [`frame`]: the [`Frame`] view, [`Segment`]s, Ethernet header parsing, [`MacAddr`].
//! - [`hdr`]: [`NetHdr`], the offload metadata (virtio_net_hdr semantics) that travels with a frame.
//! - [`fdb`]: the forwarding database with ageing and per-port learning limits.
//! - [`stats`]: per-port counters and [`DropReason`].
//! - [`gso`]: software checksum and segmentation for destinations that cannot take offloads.
//! - [`switch`]: ports, VLAN access ports, flooding, batches.

#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod fdb;
pub mod frame;
pub mod gso;
pub mod hdr;
pub mod stats;
pub mod switch;

pub use frame::{EthernetFrame, Frame, MacAddr, Segment, SliceFrame};
pub use hdr::{NetHdr, OffloadCaps};
pub use stats::{DropReason, PortStats, PortStatsSnapshot};
pub use switch::{PortConfig, PortId, PortSink, Switch, SwitchConfig, TxBatch, MAX_BURST};
