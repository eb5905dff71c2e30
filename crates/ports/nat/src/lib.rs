//! # virtnet-port-nat: the NAT gateway port
//!
//! NAT is VMware's VMnet8 and QEMU's user networking: guests live on a private subnet behind
//! a virtual gateway, and their connections leave through the host's own sockets (no root,
//! no TAP, no packet filter). Nothing reaches in unless a port is forwarded.
//!
//! ```text
//!  guests ─► Switch ─► NatSink::deliver (gateway MAC / broadcast only, offloads completed)
//!                        │ bounded queue
//!                        ▼
//!               driver thread (tokio, current-thread)            host
//!               ┌───────────────────────────────┐        ┌──────────────────┐
//!               │ Engine (sans I/O, smoltcp)     │ HostCmd│ TcpStream        │
//!               │  guest_frame / host_event ────►├───────►│ UdpSocket        │
//!               │  poll ─► frames to the switch  │◄───────┤ ping socket      │
//!               └───────────────────────────────┘HostEvent└──────────────────┘
//! ```
//!
//! Limits of this version: IPv4 only (IPv6 frames are counted as dropped); frames are
//! copied once from the switch into recycled buffers ([`pool`]) and the stack's own frames
//! reuse theirs (no allocation per frame once warm; TCP payload moves to the host side in
//! chunks of up to 64 KiB, one allocation per chunk; UDP and ICMP payloads allocate per
//! datagram); the engine runs on one thread per network; smoltcp
//! 0.12 can lose its retransmission timer (CLOSE-WAIT, CLOSING, FIN-WAIT-1 → CLOSING) and
//! does not count duplicate ACKs that carry data, so a per-flow watchdog (`rescue`)
//! restarts stalled retransmissions with a burst of duplicate ACKs (drop it when smoltcp
//! is fixed).
//!
//! Module map:
//! - [`engine`]: the [`Engine`] trait and [`SmolEngine`], its smoltcp implementation (no I/O,
//!   simulated clock in tests).
//! - [`host`]: the tokio driver that runs an engine against real host sockets.
//! - [`port`]: [`NatPort`], the switch port.
//! - `rescue` (private): the TCP retransmission watchdog.

#![deny(missing_docs)]

pub mod engine;
pub mod host;
pub mod pool;
pub mod port;
mod rescue;

pub use engine::{Engine, HostCmd, HostEvent, NatPolicy, NatStats, SmolEngine};
pub use host::{Forward, ForwardProto};
pub use port::{NatConfig, NatError, NatPort};
