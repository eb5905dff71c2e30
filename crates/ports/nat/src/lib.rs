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
//! IPv4 and IPv6: with [`NatV6`] in the policy the gateway sends router advertisements
//! (from its EUI-64 link-local address, as the default router, with the /64 prefix for SLAAC
//! and its own address as RDNSS), answers neighbour solicitations for its addresses (router
//! flag set) and translates IPv6 TCP, UDP and ICMPv6 echo like IPv4; the DNS forwarder
//! answers at the gateway's IPv6 address too. Per-guest flow limits count by guest MAC,
//! IPv4 and IPv6 flows together (a guest chooses its IPv6 addresses freely).
//!
//! A guest's flows close when its station leaves the switch (port removed, driver reset or
//! VMM disconnect: [`Engine::close_guest`]).
//!
//! Limits of this version: frames are copied once from the switch into recycled buffers
//! ([`pool`]) and the stack's own frames reuse theirs (no allocation per frame once warm;
//! TCP payload moves to the host side in chunks of up to 64 KiB, one allocation per chunk;
//! UDP and ICMP payloads allocate per datagram); the engine runs on one thread per network;
//! smoltcp 0.12 can lose its retransmission timer (CLOSE-WAIT, CLOSING, FIN-WAIT-1 →
//! CLOSING) and does not count duplicate ACKs that carry data, so a per-flow watchdog
//! (`rescue`, IPv4 and IPv6) restarts stalled retransmissions with a burst of duplicate ACKs
//! (drop it when smoltcp is fixed). IPv6 extension headers and fragments from guests are
//! dropped; no ICMPv6 errors (packet too big, unreachable) are relayed from the host.
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

pub use engine::{Engine, HostCmd, HostEvent, NatPolicy, NatStats, NatV6, SmolEngine};
pub use host::{Forward, ForwardProto};
pub use port::{NatConfig, NatError, NatPort};
