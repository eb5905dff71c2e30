//! Small statistics: medians (the figure of every point) and the parsing of DPDK testpmd's
//! periodic `Rx-pps:` lines.

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable sample.
    #[error("No samples")]
    NoSamples,
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// The median of `v` (mean of the middle two for even lengths); `None` when empty. NaNs are
/// ignored.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// Every value of a `label` field in testpmd output, in order: for `"Rx-pps:"` the
/// per-second receive rates that `--stats-period 1` prints, one per port per period.
pub fn testpmd_field(log: &str, label: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for line in log.lines() {
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            if w == label {
                if let Some(v) = words.next().and_then(|n| n.parse::<f64>().ok()) {
                    out.push(v);
                }
            }
        }
    }
    out
}

/// Sums consecutive groups of `ports` samples: testpmd prints one block per port per
/// period, so this turns per-port rates into per-period totals. A trailing partial group is
/// dropped.
pub fn period_sums(samples: &[f64], ports: usize) -> Vec<f64> {
    samples
        .chunks_exact(ports.max(1))
        .map(|c| c.iter().sum())
        .collect()
}

/// The steady-state rate of a testpmd run from its per-period samples: drop zeros (before
/// traffic starts and after it stops), then the first `skip` (warm-up) and the last one (a
/// partial period), and take the median. Falls back to the median of all non-zero samples
/// when too few remain.
pub fn steady_rate(samples: &[f64], skip: usize) -> Result<f64> {
    let nz: Vec<f64> = samples.iter().copied().filter(|&x| x > 0.0).collect();
    if nz.is_empty() {
        return Err(Error::NoSamples);
    }
    let trimmed = if nz.len() > skip + 1 {
        &nz[skip..nz.len() - 1]
    } else {
        &nz[..]
    };
    median(trimmed).ok_or(Error::NoSamples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }

    const LOG: &str = "
  ######################## NIC statistics for port 0  ########################
  RX-packets: 0          RX-missed: 0          RX-bytes:  0
  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
  Rx-pps:      5000000          Rx-bps:   2560000000
  Rx-pps:      7000000          Rx-bps:   3584000000
  Rx-pps:      8000000          Rx-bps:   3584000000
  Rx-pps:      6000000          Rx-bps:   3584000000
  Rx-pps:      1000000          Rx-bps:   3584000000
  Rx-pps: garbage
";

    #[test]
    fn parses_testpmd_rates() {
        let v = testpmd_field(LOG, "Rx-pps:");
        assert_eq!(v, vec![0.0, 5e6, 7e6, 8e6, 6e6, 1e6]);
        assert_eq!(testpmd_field(LOG, "Tx-pps:"), vec![0.0]);
        // zeros out, first sample (warm-up) and last (partial period) out: 7, 8, 6.
        assert_eq!(steady_rate(&v, 1).unwrap(), 7e6);
        // Too few samples: median of the non-zero ones.
        assert_eq!(steady_rate(&[0.0, 4.0, 2.0], 5).unwrap(), 3.0);
        assert!(matches!(steady_rate(&[0.0], 1), Err(Error::NoSamples)));
        assert_eq!(period_sums(&[1.0, 2.0, 3.0, 4.0, 5.0], 2), vec![3.0, 7.0]);
        assert_eq!(period_sums(&[1.0, 2.0], 1), vec![1.0, 2.0]);
    }
}
