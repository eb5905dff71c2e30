//! # virtnet-bench: frame rates of virtnet side by side with DPDK
//!
//! The `virtnet-bench` binary measures, in one run, end to end over real vhost-user sockets,
//! guest → guest through a backend with two ports:
//!
//! - backends: **virtnetd** (an internal network of two ports) and **DPDK** `dpdk-testpmd`
//!   with two `net_vhost` ports in io forwarding, run interleaved A B, B A, A B …;
//! - frontends: our driver ([`virtnet_guest::Guest`], zero-alloc `send_batch` /
//!   `drain_with`, guest A → guest B) and DPDK `virtio_user` (one testpmd with two ports,
//!   `--tx-first` then mac forwarding, both directions at once; `--vuser-mode flowgen` for
//!   testpmd's flow generator), so that one frontend is not ours;
//! - frames: 64, 512, 1500 B (Mpps, Gbit/s) and 64 KiB TCPv4 GSO (Gbit/s); 1 and 2 queue
//!   pairs;
//! - context: a core-to-core round-trip probe before each pair (the machine is bimodal) and
//!   a single-core memcpy of the same frames as the physical reference.
//!
//! It prints a table, writes a JSON file and an SVG plot, and shows a progress bar. The
//! figure is the ratio virtnet / DPDK of medians within the run.
//!
//! Module map (each uses only the ones above it):
//! - [`sys`]: CPU pinning and signals (the only unsafe code).
//! - [`stats`]: medians, testpmd output parsing.
//! - [`probe`]: c2c probe, memcpy reference.
//! - [`proc`]: child processes: virtnetd, testpmd backend, testpmd virtio_user frontends.
//! - [`load`]: the load through our own driver.
//! - [`report`]: results, table, JSON, SVG.
//! - [`run`]: the matrix.
//!
//! Placement (2 CPUs here): the backend gets `--backend-cpus` (default CPU 1) and every
//! frontend `--frontend-cpus` (default CPU 0), identically for both backends. Our driver
//! runs sender and receiver in one thread; testpmd runs both ports on one lcore. (txonly
//! and rxonly as two processes on one CPU are two busy pollers time-sliced by the
//! scheduler: that measured about 10 kpps, the scheduler's rate, so one process drives both
//! ports.)

#![deny(missing_docs)]

pub mod load;
pub mod probe;
pub mod proc;
pub mod report;
pub mod run;
pub mod stats;
pub mod sys;
