//! # virtnet-services: what a network offers at its gateway address
//!
//! A [`ServicesPort`] is a port on the network's switch with its own MAC and IPv4 address. It
//! answers ARP for that address, ICMP echo to it, DHCP (a server with a lease file) and, for an
//! IPv6 prefix, router solicitations (and periodic advertisements) for SLAAC. Shared by the
//! `internal`, `host-only` and `nat` modes.
//!
//! ```text
//!  guest worker thread                          services thread
//!  ───────────────────                          ───────────────
//!  Switch::forward ─► ServicesSink::deliver     wait (condvar, 1 s tick)
//!                      parse L2/L3 headers       pop a frame ─► wire::parse ─► ARP / ICMP /
//!                      not ours? return           DHCP (dhcp::DhcpServer) / RS
//!                      copy into a preallocated   reply frame ─► Switch::forward (as our port)
//!                      slot of a bounded queue    every tick: expire offers, periodic RA
//! ```
//!
//! The guest's thread only parses headers and copies frames addressed to the services into a
//! fixed ring of slots; frames for others cost a header read and nothing else. All the work
//! (and all allocation) happens on the services thread.
//!
//! Module map:
//! - [`dhcp`]: the DHCPv4 lease state machine (dhcproto for the wire format).
//! - [`lease`]: the lease file.
//! - [`wire`]: typed views and builders for Ethernet/ARP/IPv4/UDP/ICMP/ICMPv6 frames.
//! - [`port`]: [`ServicesPort`], the switch port, its queue and thread.

#![deny(missing_docs)]

pub mod dhcp;
pub mod lease;
pub mod port;
pub mod wire;

pub use dhcp::{DhcpConfig, DhcpCounters, DhcpServer, Lease, LeaseState};
pub use port::{RaConfig, ServicesConfig, ServicesError, ServicesPort, ServicesStats};
