//! Machine probes: the core-to-core round trip (this machine is bimodal, see
//! shared/notes/real-peers.md §2) and the physical reference, a single-core memcpy of the
//! frame sizes under test.
//!
//! The c2c probe bounces one cache line between a thread on CPU `a` and one on CPU `b`:
//! `ping` writes an odd value, `pong` answers with the next even one. The median of many
//! short batches is the round-trip time; about 120–200 ns is the "fast" regime here,
//! 400–750 ns the "slow" one.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::stats::median;
use crate::sys::{self, CpuSet};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A probe thread could not be pinned.
    #[error("Cannot pin the probe thread")]
    Pin(#[from] sys::Error),
    /// The partner thread never answered within the time budget.
    #[error("The c2c probe got no answer (is CPU {0} starved?)")]
    NoAnswer(usize),
    /// A probe thread panicked.
    #[error("A probe thread died")]
    ThreadDied,
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

#[repr(align(128))]
struct Line(AtomicU64);

/// Round trips per timed batch of the c2c probe.
const C2C_BATCH: u64 = 32;

/// Measures the cache-line round trip between CPU `a` and CPU `b` for about `budget`;
/// returns the median nanoseconds per round trip over the batches.
pub fn c2c_ns(a: usize, b: usize, budget: Duration) -> Result<f64> {
    let line = Arc::new(Line(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let (l2, s2) = (line.clone(), stop.clone());
    let set_b = CpuSet::parse(&b.to_string())?;
    let pong = std::thread::spawn(move || -> Result<()> {
        sys::pin_current_thread(&set_b)?;
        let mut last = 0u64;
        while !s2.load(Ordering::Relaxed) {
            let v = l2.0.load(Ordering::Acquire);
            if v != last && v % 2 == 1 {
                last = v + 1;
                l2.0.store(last, Ordering::Release);
            } else {
                std::hint::spin_loop();
            }
        }
        Ok(())
    });
    // On a thread of its own, so the caller's CPU affinity is left alone.
    let result = std::thread::scope(|s| s.spawn(|| ping(&line, a, budget)).join())
        .map_err(|_| Error::ThreadDied)?;
    stop.store(true, Ordering::Relaxed);
    let joined = pong.join().map_err(|_| Error::ThreadDied)?;
    joined?;
    let samples = result?;
    median(&samples).ok_or(Error::NoAnswer(b))
}

fn ping(line: &Line, a: usize, budget: Duration) -> Result<Vec<f64>> {
    sys::pin_current_thread(&CpuSet::parse(&a.to_string())?)?;
    let start = Instant::now();
    let give_up = start + budget + Duration::from_millis(500);
    let mut samples = Vec::new();
    let mut v = 0u64;
    while start.elapsed() < budget || samples.is_empty() {
        let t = Instant::now();
        for _ in 0..C2C_BATCH {
            v += 1;
            line.0.store(v, Ordering::Release);
            let want = v + 1;
            let mut spins = 0u32;
            while line.0.load(Ordering::Acquire) != want {
                std::hint::spin_loop();
                spins = spins.wrapping_add(1);
                if spins % 4096 == 0 && Instant::now() > give_up {
                    return Err(Error::NoAnswer(a));
                }
            }
            v = want;
        }
        samples.push(t.elapsed().as_nanos() as f64 / C2C_BATCH as f64);
    }
    Ok(samples)
}

/// Round trips per timed batch of the wake-up probe.
const WAKE_BATCH: u32 = 8;

/// Measures a blocking wake-up round trip between a thread on CPU `a` and one on CPU `b`
/// (one byte each way over a unix socket pair, both sides sleeping in `read`) for about
/// `budget`; returns the median nanoseconds per round trip. This is the price an
/// event-driven backend pays per kick when it sleeps between batches (two wake-ups).
pub fn wake_ns(a: usize, b: usize, budget: Duration) -> Result<f64> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let (mut x, mut y) = UnixStream::pair().map_err(|_| Error::ThreadDied)?;
    let set_b = CpuSet::parse(&b.to_string())?;
    let echo = std::thread::spawn(move || -> Result<()> {
        sys::pin_current_thread(&set_b)?;
        let mut buf = [0u8; 1];
        // Ends when the other side closes.
        while let Ok(1) = y.read(&mut buf) {
            if y.write_all(&buf).is_err() {
                break;
            }
        }
        Ok(())
    });
    let run = || -> Result<Vec<f64>> {
        sys::pin_current_thread(&CpuSet::parse(&a.to_string())?)?;
        x.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|_| Error::NoAnswer(b))?;
        let start = Instant::now();
        let mut samples = Vec::new();
        let mut buf = [0u8; 1];
        while start.elapsed() < budget || samples.is_empty() {
            let t = Instant::now();
            for _ in 0..WAKE_BATCH {
                x.write_all(&[1]).map_err(|_| Error::NoAnswer(b))?;
                x.read_exact(&mut buf).map_err(|_| Error::NoAnswer(b))?;
            }
            samples.push(t.elapsed().as_nanos() as f64 / f64::from(WAKE_BATCH));
        }
        Ok(samples)
    };
    let result = std::thread::scope(|s| s.spawn(run).join()).map_err(|_| Error::ThreadDied)?;
    drop(x);
    echo.join().map_err(|_| Error::ThreadDied)??;
    median(&result?).ok_or(Error::NoAnswer(b))
}

/// Result of one memcpy reference measurement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemcpyRate {
    /// Frames copied per second, in millions.
    pub mpps: f64,
    /// Bits copied per second, in billions.
    pub gbps: f64,
}

/// Ring slots the memcpy reference copies between (like a 256-entry virtqueue).
const MEMCPY_SLOTS: usize = 256;

/// Copies `frame_len`-byte frames from one 256-slot ring to another on CPU `cpu` for about
/// `duration`: the cost of the one copy a switch must make, with nothing else.
pub fn memcpy_rate(frame_len: usize, cpu: usize, duration: Duration) -> Result<MemcpyRate> {
    let set = CpuSet::parse(&cpu.to_string())?;
    let h = std::thread::spawn(move || -> Result<MemcpyRate> {
        sys::pin_current_thread(&set)?;
        let len = frame_len.max(1);
        let src: Vec<u8> = (0..len * MEMCPY_SLOTS).map(|i| i as u8).collect();
        let mut dst = vec![0u8; len * MEMCPY_SLOTS];
        let start = Instant::now();
        let mut frames = 0u64;
        while start.elapsed() < duration {
            for i in 0..MEMCPY_SLOTS {
                let r = i * len..(i + 1) * len;
                dst[r.clone()].copy_from_slice(black_box(&src[r]));
            }
            black_box(&mut dst);
            frames += MEMCPY_SLOTS as u64;
        }
        let secs = start.elapsed().as_secs_f64();
        let pps = frames as f64 / secs;
        Ok(MemcpyRate {
            mpps: pps / 1e6,
            gbps: pps * len as f64 * 8.0 / 1e9,
        })
    });
    h.join().map_err(|_| Error::ThreadDied)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c2c_measures_something_plausible() {
        if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
            eprintln!("SKIPPED: the c2c probe needs two CPUs");
            return;
        }
        let ns = c2c_ns(0, 1, Duration::from_millis(20)).unwrap();
        assert!(ns > 1.0 && ns < 10_000_000.0, "{ns}");
    }

    #[test]
    fn wake_up_round_trip_is_measured() {
        let b = usize::from(std::thread::available_parallelism().map_or(1, |n| n.get()) > 1);
        let ns = wake_ns(0, b, Duration::from_millis(20)).unwrap();
        assert!(ns > 100.0 && ns < 1e9, "{ns}");
    }

    #[test]
    fn memcpy_copies_bigger_frames_faster_in_bits() {
        let small = memcpy_rate(64, 0, Duration::from_millis(30)).unwrap();
        let big = memcpy_rate(1500, 0, Duration::from_millis(30)).unwrap();
        assert!(small.mpps > 0.0 && big.mpps > 0.0);
        assert!((small.gbps - small.mpps * 64.0 * 8.0 / 1e3).abs() < 1e-6 * small.gbps.max(1.0));
        assert!(big.gbps > small.gbps, "{big:?} vs {small:?}");
    }
}
