//! Per-port counters and the reasons a frame can be dropped.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a frame (or a descriptor chain) was dropped. Every drop is counted under one reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum DropReason {
    /// A descriptor pointed outside guest memory.
    BadAddress = 0,
    /// A descriptor chain looped or was longer than the queue.
    ChainLoop,
    /// A descriptor had the wrong direction (a write-only TX buffer, a read-only RX buffer).
    BadDirection,
    /// The chain was shorter than a virtio-net header.
    HeaderTruncated,
    /// The frame was longer than the device accepts.
    FrameTooLong,
    /// The frame was shorter than an Ethernet header.
    FrameTooShort,
    /// Bogus offload metadata (GSO type, sizes, checksum offsets).
    BadOffload,
    /// A multicast or all-zero source MAC.
    BadSourceMac,
    /// A tagged frame on an access port, or a frame for another VLAN.
    VlanFiltered,
    /// The destination is the ingress port (hairpin).
    Hairpin,
    /// The destination had no RX buffers posted.
    NoRxBuffers,
    /// The destination's RX buffers were too small for the frame.
    RxBufferTooSmall,
    /// The destination port is not running (no driver, queues not ready).
    NotReady,
    /// Software segmentation or checksum failed (malformed L3/L4 headers).
    SoftwareOffload,
    /// Filtered by the destination's receive filter (rx mode, MAC table).
    RxFiltered,
    /// Any other malformed input.
    Malformed,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 16] = [
        DropReason::BadAddress,
        DropReason::ChainLoop,
        DropReason::BadDirection,
        DropReason::HeaderTruncated,
        DropReason::FrameTooLong,
        DropReason::FrameTooShort,
        DropReason::BadOffload,
        DropReason::BadSourceMac,
        DropReason::VlanFiltered,
        DropReason::Hairpin,
        DropReason::NoRxBuffers,
        DropReason::RxBufferTooSmall,
        DropReason::NotReady,
        DropReason::SoftwareOffload,
        DropReason::RxFiltered,
        DropReason::Malformed,
    ];
    /// Number of reasons.
    pub const COUNT: usize = Self::ALL.len();

    /// A short snake_case name for logs and stats output.
    pub fn name(&self) -> &'static str {
        match self {
            DropReason::BadAddress => "bad_address",
            DropReason::ChainLoop => "chain_loop",
            DropReason::BadDirection => "bad_direction",
            DropReason::HeaderTruncated => "header_truncated",
            DropReason::FrameTooLong => "frame_too_long",
            DropReason::FrameTooShort => "frame_too_short",
            DropReason::BadOffload => "bad_offload",
            DropReason::BadSourceMac => "bad_source_mac",
            DropReason::VlanFiltered => "vlan_filtered",
            DropReason::Hairpin => "hairpin",
            DropReason::NoRxBuffers => "no_rx_buffers",
            DropReason::RxBufferTooSmall => "rx_buffer_too_small",
            DropReason::NotReady => "not_ready",
            DropReason::SoftwareOffload => "software_offload",
            DropReason::RxFiltered => "rx_filtered",
            DropReason::Malformed => "malformed",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Live counters of one port. Directions are the switch's: `rx` is what the switch received
/// from the port (a guest's TX), `tx` what the switch delivered to it (a guest's RX).
#[derive(Debug, Default)]
pub struct PortStats {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    flooded: AtomicU64,
    drops: [AtomicU64; DropReason::COUNT],
}

impl PortStats {
    /// Count a frame received from the port.
    pub fn count_rx(&self, bytes: usize) {
        self.rx_frames.fetch_add(1, Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// Count a frame delivered to the port.
    pub fn count_tx(&self, bytes: usize) {
        self.tx_frames.fetch_add(1, Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// Count `frames` frames of `bytes` bytes in all received from the port (a batch).
    pub fn add_rx(&self, frames: u64, bytes: u64) {
        self.rx_frames.fetch_add(frames, Relaxed);
        self.rx_bytes.fetch_add(bytes, Relaxed);
    }

    /// Count `frames` frames of `bytes` bytes in all delivered to the port (a batch).
    pub fn add_tx(&self, frames: u64, bytes: u64) {
        self.tx_frames.fetch_add(frames, Relaxed);
        self.tx_bytes.fetch_add(bytes, Relaxed);
    }

    /// Count a frame from this port that was flooded.
    pub fn count_flood(&self) {
        self.flooded.fetch_add(1, Relaxed);
    }

    /// Count a drop.
    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason as usize].fetch_add(1, Relaxed);
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> PortStatsSnapshot {
        let mut drops = [0u64; DropReason::COUNT];
        for (d, a) in drops.iter_mut().zip(self.drops.iter()) {
            *d = a.load(Relaxed);
        }
        PortStatsSnapshot {
            rx_frames: self.rx_frames.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_frames: self.tx_frames.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            flooded: self.flooded.load(Relaxed),
            drops,
        }
    }
}

/// A copy of a port's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStatsSnapshot {
    /// Frames received from the port.
    pub rx_frames: u64,
    /// Bytes received from the port.
    pub rx_bytes: u64,
    /// Frames delivered to the port.
    pub tx_frames: u64,
    /// Bytes delivered to the port.
    pub tx_bytes: u64,
    /// Frames from this port that were flooded (broadcast, multicast, unknown unicast).
    pub flooded: u64,
    /// Drops indexed by `DropReason as usize`.
    pub drops: [u64; DropReason::COUNT],
}

impl PortStatsSnapshot {
    /// Drops for one reason.
    pub fn drop_count(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    /// All drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}
