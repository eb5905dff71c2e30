//! Load through our own driver (`virtnet_guest::Guest`): guest A sends on port 0, guest B
//! receives on port 1, both driven by ONE thread pinned to the frontend CPUs that alternates
//! `send_batch` (zero-allocation, one kick per batch) and `drain_with` on every queue pair.
//! Nothing is allocated per frame. The rate is B's delivered rate over the measurement
//! window (after a warm-up), as the median of half-second samples.

use std::path::Path;
use std::time::{Duration, Instant};

use virtnet_guest::virtio_net::{F_CTRL_RX, F_CTRL_VQ, F_MQ};
use virtnet_guest::{Guest, GuestConfig, NetHdr, DEFAULT_FEATURES, MAX_FRAME_LEN};
use virtnet_switch::hdr::{FLAG_NEEDS_CSUM, GSO_TCPV4};

use crate::stats::median;
use crate::sys::{self, CpuSet};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The driver failed.
    #[error("Guest driver: {0}")]
    Guest(&'static str, #[source] virtnet_guest::Error),
    /// The backend gave fewer queue pairs than asked.
    #[error("Asked for {want} queue pairs, the backend gave {got}")]
    QueuePairs {
        /// Asked.
        want: u16,
        /// Got.
        got: u16,
    },
    /// A frame size the driver cannot carry.
    #[error("Bad frame length {0} (14..={max})", max = MAX_FRAME_LEN)]
    FrameLen(usize),
    /// Pinning failed.
    #[error("Cannot pin the load thread")]
    Pin(#[from] sys::Error),
    /// The load thread panicked.
    #[error("The load thread died")]
    ThreadDied,
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

fn ge(op: &'static str) -> impl FnOnce(virtnet_guest::Error) -> Error {
    move |e| Error::Guest(op, e)
}

/// MAC of the sending guest.
pub const MAC_TX: [u8; 6] = [0x52, 0x54, 0, 0, 0xbe, 0x01];
/// MAC of the receiving guest.
pub const MAC_RX: [u8; 6] = [0x52, 0x54, 0, 0, 0xbe, 0x02];
/// Segment size of the GSO frames.
pub const GSO_MSS: u16 = 1448;
/// Length of the GSO frames: Ethernet + IPv4 + TCP headers and 45 full segments.
pub const GSO_FRAME_LEN: usize = 54 + 45 * GSO_MSS as usize;

/// Frames per `send_batch`.
const TX_BATCH: usize = 64;
/// Frames per `drain_with`.
const RX_BATCH: usize = 256;
/// Sampling interval.
const SAMPLE: Duration = Duration::from_millis(500);

/// One load run.
#[derive(Clone, Debug)]
pub struct GuestLoad {
    /// Frame length (Ethernet header included, no virtio header, no FCS).
    pub frame_len: usize,
    /// Send TCPv4 GSO frames (frame_len should then be [`GSO_FRAME_LEN`]).
    pub gso: bool,
    /// Queue pairs on both guests.
    pub qps: u16,
    /// Warm-up before counting.
    pub warmup: Duration,
    /// Measurement window.
    pub duration: Duration,
    /// CPUs of the load thread.
    pub cpus: CpuSet,
    /// The backend is DPDK: don't ask for the control queue (its vhost library leaves it to
    /// the VMM); multiqueue still works through SET_VRING_ENABLE.
    pub no_ctrl_vq: bool,
}

/// What a run measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct LoadResult {
    /// Median delivered frames per second over the samples.
    pub rx_pps: f64,
    /// Delivered bits per second (frame bytes, no virtio header), same samples.
    pub rx_bps: f64,
    /// Median frames queued per second by the sender, same samples.
    pub tx_pps: f64,
    /// Mean delivered frames per second over the whole window (a cross-check of `rx_pps`).
    pub rx_mean_pps: f64,
    /// Frames delivered in the window.
    pub rx_frames: u64,
    /// Frames queued in the window.
    pub tx_frames: u64,
    /// Delivered frames whose length was not the one sent.
    pub bad_frames: u64,
}

/// Builds the frame that is sent, and its header.
pub fn build_frame(len: usize, gso: bool) -> Result<(Vec<u8>, NetHdr)> {
    if !(14..=MAX_FRAME_LEN).contains(&len) || (gso && len < 54) {
        return Err(Error::FrameLen(len));
    }
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&MAC_RX);
    f[6..12].copy_from_slice(&MAC_TX);
    if !gso {
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        for (i, b) in f[14..].iter_mut().enumerate() {
            *b = i as u8;
        }
        return Ok((f, NetHdr::NONE));
    }
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = u16::try_from(len - 14).map_err(|_| Error::FrameLen(len))?;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6; // TCP
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let c = !fold(sum16(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&5001u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH|ACK
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    // With NEEDS_CSUM the field holds the pseudo-header sum (not complemented).
    let tcp_len = u32::from(ip_len) - 20;
    let pseudo = 10 + 2 + 10 + 2 + 6 + tcp_len;
    tcp[16..18].copy_from_slice(&fold(pseudo).to_be_bytes());
    let hdr = NetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: GSO_MSS,
        csum_start: 34,
        csum_offset: 16,
    };
    Ok((f, hdr))
}

fn sum16(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn guest_config(spec: &GuestLoad, sender: bool) -> GuestConfig {
    let mut features = DEFAULT_FEATURES;
    if spec.no_ctrl_vq {
        features &= !(F_CTRL_VQ | F_CTRL_RX);
    }
    if spec.qps < 2 {
        features &= !F_MQ;
    }
    let mut cfg = GuestConfig {
        features,
        queue_pairs: spec.qps,
        ..GuestConfig::default()
    };
    if sender && spec.gso {
        // One slot per 64 KiB frame, like a guest kernel's linear skb head + frags.
        cfg.tx_buffer_size = 66 * 1024;
        cfg.mem_size = 96 << 20;
    }
    cfg
}

/// Runs one load: connects A to `tx_sock` and B to `rx_sock`, lets B announce its MAC (so a
/// learning switch forwards unicast), warms up, measures. Runs on its own pinned thread.
pub fn run(tx_sock: &Path, rx_sock: &Path, spec: &GuestLoad) -> Result<LoadResult> {
    let (txp, rxp, spec) = (tx_sock.to_path_buf(), rx_sock.to_path_buf(), spec.clone());
    std::thread::spawn(move || run_pinned(&txp, &rxp, &spec))
        .join()
        .map_err(|_| Error::ThreadDied)?
}

fn run_pinned(tx_sock: &Path, rx_sock: &Path, spec: &GuestLoad) -> Result<LoadResult> {
    sys::pin_current_thread(&spec.cpus)?;
    let (frame, hdr) = build_frame(spec.frame_len, spec.gso)?;
    let mut a = Guest::connect(tx_sock, guest_config(spec, true)).map_err(ge("connect A"))?;
    let mut b = Guest::connect(rx_sock, guest_config(spec, false)).map_err(ge("connect B"))?;
    for g in [&a, &b] {
        if g.queue_pairs() != spec.qps {
            return Err(Error::QueuePairs {
                want: spec.qps,
                got: g.queue_pairs(),
            });
        }
    }
    // B announces itself; A takes whatever arrives.
    let mut hello = [0u8; 60];
    hello[..6].copy_from_slice(&[0xff; 6]);
    hello[6..12].copy_from_slice(&MAC_RX);
    hello[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    b.send(0, &NetHdr::NONE, &hello).map_err(ge("announce"))?;
    let _ = a
        .recv_with(0, Duration::from_millis(500), |_, _| ())
        .map_err(ge("announce"))?;

    let len = frame.len();
    let start = Instant::now();
    let t_measure = start + spec.warmup;
    let t_end = t_measure + spec.duration;
    let mut measuring = false;
    let (mut rx, mut tx, mut rx_bytes, mut bad) = (0u64, 0u64, 0u64, 0u64);
    let mut samples_pps = Vec::new();
    let mut samples_bps = Vec::new();
    let mut samples_tx = Vec::new();
    let (mut s_start, mut s_rx, mut s_bytes, mut s_tx) = (t_measure, 0u64, 0u64, 0u64);
    let mut t_first = t_measure;
    let mut now = start;
    let mut iter = 0u32;
    while now < t_end {
        let mut sent = 0;
        for qp in 0..spec.qps {
            sent += a
                .send_batch(qp, TX_BATCH, |_, buf| {
                    buf[..len].copy_from_slice(&frame);
                    Some((hdr, len))
                })
                .map_err(ge("send_batch"))?;
        }
        let mut got = 0u64;
        let mut got_bytes = 0u64;
        let mut wrong = 0u64;
        for qp in 0..spec.qps {
            got += b
                .drain_with(qp, RX_BATCH, |_, f| {
                    got_bytes += f.len() as u64;
                    wrong += u64::from(f.len() != len);
                })
                .map_err(ge("drain_with"))? as u64;
        }
        // Reading the clock is not free here (about 10% of the loop when done every
        // iteration): every 32 iterations is a few tens of microseconds of resolution.
        iter = iter.wrapping_add(1);
        if iter % 32 == 0 {
            now = Instant::now();
        }
        if measuring {
            tx += sent as u64;
            rx += got;
            rx_bytes += got_bytes;
            bad += wrong;
            if now >= s_start + SAMPLE || now >= t_end {
                let dt = now.duration_since(s_start).as_secs_f64();
                if dt > 0.05 {
                    samples_pps.push((rx - s_rx) as f64 / dt);
                    samples_bps.push((rx_bytes - s_bytes) as f64 * 8.0 / dt);
                    samples_tx.push((tx - s_tx) as f64 / dt);
                }
                (s_start, s_rx, s_bytes, s_tx) = (now, rx, rx_bytes, tx);
            }
        } else if now >= t_measure {
            measuring = true;
            (s_start, s_rx, s_bytes, s_tx) = (now, 0, 0, 0);
            t_first = now;
        }
    }
    let window = now.duration_since(t_first).as_secs_f64().max(1e-9);
    a.disconnect();
    b.disconnect();
    Ok(LoadResult {
        rx_pps: median(&samples_pps).unwrap_or(0.0),
        rx_bps: median(&samples_bps).unwrap_or(0.0),
        tx_pps: median(&samples_tx).unwrap_or(0.0),
        rx_mean_pps: rx as f64 / window,
        rx_frames: rx,
        tx_frames: tx,
        bad_frames: bad,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_frames() {
        let (f, h) = build_frame(64, false).unwrap();
        assert_eq!(f.len(), 64);
        assert_eq!(&f[..6], &MAC_RX);
        assert_eq!(&f[6..12], &MAC_TX);
        assert_eq!(h, NetHdr::NONE);
        assert!(build_frame(13, false).is_err());
        assert!(build_frame(MAX_FRAME_LEN + 1, false).is_err());
    }

    #[test]
    fn gso_frame_headers_are_consistent() {
        let (f, h) = build_frame(GSO_FRAME_LEN, true).unwrap();
        assert_eq!(f.len(), GSO_FRAME_LEN);
        const { assert!(GSO_FRAME_LEN <= MAX_FRAME_LEN) };
        assert_eq!(
            u16::from_be_bytes([f[16], f[17]]) as usize,
            GSO_FRAME_LEN - 14
        );
        // A correct IPv4 header checksum sums to 0xffff.
        assert_eq!(fold(sum16(&f[14..34])), 0xffff);
        assert_eq!(h.gso_type, GSO_TCPV4);
        assert_eq!(usize::from(h.csum_start) + usize::from(h.csum_offset), 50);
        assert_eq!(h.hdr_len, 54);
    }

    #[test]
    fn dpdk_config_drops_the_control_queue() {
        let spec = GuestLoad {
            frame_len: 64,
            gso: false,
            qps: 2,
            warmup: Duration::ZERO,
            duration: Duration::ZERO,
            cpus: CpuSet::parse("0").unwrap(),
            no_ctrl_vq: true,
        };
        let c = guest_config(&spec, true);
        assert_eq!(c.features & (F_CTRL_VQ | F_CTRL_RX), 0);
        assert_ne!(c.features & F_MQ, 0);
        assert_eq!(c.queue_pairs, 2);
    }
}
