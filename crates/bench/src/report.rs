//! Results: the data model (one [`Point`] per frontend × queue pairs × frame size, each with
//! its interleaved virtnet/DPDK pairs), the terminal table, the JSON file and the SVG plot.
//!
//! The figure of a point is the ratio of medians, virtnet / DPDK, from the same run: never
//! compare absolute numbers across runs on this machine.

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::stats::median;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Drawing the plot failed.
    #[error("Cannot draw the plot: {0}")]
    Plot(String),
    /// Writing a file failed.
    #[error("Cannot write {0}")]
    Write(String, #[source] std::io::Error),
    /// Encoding JSON failed.
    #[error("Cannot encode JSON")]
    Json(#[from] serde_json::Error),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// A rate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Rate {
    /// Million frames per second delivered.
    pub mpps: f64,
    /// Gbit/s delivered (Ethernet frame bytes; no virtio header, no FCS).
    pub gbps: f64,
    /// Million frames per second the sender offered, when known.
    pub offered_mpps: Option<f64>,
    /// Frames that arrived with another length than was sent (our driver checks every
    /// frame; e.g. a GSO frame segmented on the way). Zero for a correct run.
    #[serde(default)]
    pub wrong_len_frames: u64,
    /// Frames sent and received in the window (our driver only), to cross-check the rates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames_sent_received: Option<(u64, u64)>,
}

/// The outcome of one backend's run in a pair.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It ran.
    Ok(Rate),
    /// It failed (the message says why).
    Failed(String),
    /// Not run (`--backends`).
    Skipped,
}

impl Outcome {
    /// The rate, when it ran.
    pub fn rate(&self) -> Option<Rate> {
        match self {
            Outcome::Ok(r) => Some(*r),
            Outcome::Failed(_) | Outcome::Skipped => None,
        }
    }

    /// Did it fail?
    pub fn failed(&self) -> bool {
        matches!(self, Outcome::Failed(_))
    }
}

/// One A/B pair: a c2c probe, then virtnet and DPDK (in alternating order, see
/// [`crate::run::virtnet_first`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Pair {
    /// Core-to-core round trip (frontend CPU ↔ backend CPU) measured just before the pair.
    pub c2c_ns: Option<f64>,
    /// Blocking wake-up round trip (frontend CPU ↔ backend CPU) measured just before the
    /// pair: what an event-driven backend pays per sleep/kick cycle.
    #[serde(default)]
    pub wake_ns: Option<f64>,
    /// virtnetd.
    pub virtnet: Outcome,
    /// DPDK net_vhost.
    pub dpdk: Outcome,
}

impl Pair {
    /// virtnet / DPDK within this pair, by Gbit/s (equal to the Mpps ratio: same frames).
    pub fn ratio(&self) -> Option<f64> {
        let (v, d) = (self.virtnet.rate()?, self.dpdk.rate()?);
        (d.gbps > 0.0).then(|| v.gbps / d.gbps)
    }
}

/// One point of the matrix.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Point {
    /// `guest` (virtnet_guest::Guest) or `virtio_user` (DPDK testpmd txonly/rxonly).
    pub frontend: String,
    /// Queue pairs per port.
    pub qps: u16,
    /// Display label: the frame length, or `64K-GSO`.
    pub label: String,
    /// Frame length in bytes.
    pub frame_len: usize,
    /// TCPv4 GSO frames.
    pub gso: bool,
    /// The pairs, in run order.
    pub pairs: Vec<Pair>,
    /// Single-core memcpy of the same frames (the physical reference).
    pub memcpy: Option<Rate>,
}

/// Medians of a point.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Median c2c.
    pub c2c_ns: Option<f64>,
    /// Median wake-up round trip.
    pub wake_ns: Option<f64>,
    /// Median virtnet rate.
    pub virtnet: Option<Rate>,
    /// Median DPDK rate.
    pub dpdk: Option<Rate>,
    /// median(virtnet) / median(DPDK).
    pub ratio: Option<f64>,
    /// Median of the per-pair ratios.
    pub pair_ratio: Option<f64>,
    /// Runs that failed.
    pub failures: usize,
}

fn median_rate(rates: &[Rate]) -> Option<Rate> {
    let m: Vec<f64> = rates.iter().map(|r| r.mpps).collect();
    let g: Vec<f64> = rates.iter().map(|r| r.gbps).collect();
    let o: Vec<f64> = rates.iter().filter_map(|r| r.offered_mpps).collect();
    Some(Rate {
        mpps: median(&m)?,
        gbps: median(&g)?,
        offered_mpps: median(&o),
        wrong_len_frames: rates.iter().map(|r| r.wrong_len_frames).sum(),
        frames_sent_received: None,
    })
}

impl Point {
    /// The medians over the pairs.
    pub fn summary(&self) -> Summary {
        let c2c: Vec<f64> = self.pairs.iter().filter_map(|p| p.c2c_ns).collect();
        let wake: Vec<f64> = self.pairs.iter().filter_map(|p| p.wake_ns).collect();
        let v: Vec<Rate> = self.pairs.iter().filter_map(|p| p.virtnet.rate()).collect();
        let d: Vec<Rate> = self.pairs.iter().filter_map(|p| p.dpdk.rate()).collect();
        let pr: Vec<f64> = self.pairs.iter().filter_map(Pair::ratio).collect();
        let virtnet = median_rate(&v);
        let dpdk = median_rate(&d);
        let ratio = match (virtnet, dpdk) {
            (Some(v), Some(d)) if d.gbps > 0.0 => Some(v.gbps / d.gbps),
            _ => None,
        };
        let failures = self
            .pairs
            .iter()
            .map(|p| usize::from(p.virtnet.failed()) + usize::from(p.dpdk.failed()))
            .sum();
        Summary {
            c2c_ns: median(&c2c),
            wake_ns: median(&wake),
            virtnet,
            dpdk,
            ratio,
            pair_ratio: median(&pr),
            failures,
        }
    }
}

/// The whole run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// When (UTC, seconds since the epoch).
    pub unix_time: u64,
    /// Host CPUs.
    pub cpus: usize,
    /// Backend CPU list.
    pub backend_cpus: String,
    /// Frontend CPU list.
    pub frontend_cpus: String,
    /// A/B pairs per point.
    pub pairs: usize,
    /// Warm-up per run, seconds.
    pub warmup_secs: f64,
    /// Measurement window per run, seconds.
    pub secs: f64,
    /// How the run was set up, in words.
    pub notes: Vec<String>,
    /// The points (serialised with their summaries by [`Report::to_json`]).
    #[serde(skip_serializing)]
    pub points: Vec<Point>,
}

/// A point with its summary, as the JSON file stores it.
#[derive(Serialize)]
struct PointOut<'a> {
    #[serde(flatten)]
    point: &'a Point,
    summary: Summary,
}

#[derive(Serialize)]
struct ReportOut<'a> {
    #[serde(flatten)]
    report: &'a Report,
    points: Vec<PointOut<'a>>,
}

fn fe_label(frontend: &str) -> String {
    if frontend == "virtio_user" {
        "virtio_user (testpmd), both ways".into()
    } else {
        format!("{frontend}, A → B")
    }
}

/// A rate with about three significant digits.
fn sig(y: f64) -> String {
    if y >= 100.0 {
        format!("{y:.0}")
    } else if y >= 1.0 {
        format!("{y:.2}")
    } else {
        format!("{y:.3}")
    }
}

fn f(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.prec$}"))
}

impl Report {
    /// The report as pretty JSON, each point with its [`Summary`].
    pub fn to_json(&self) -> Result<String> {
        let out = ReportOut {
            report: self,
            points: self
                .points
                .iter()
                .map(|p| PointOut {
                    point: p,
                    summary: p.summary(),
                })
                .collect(),
        };
        Ok(serde_json::to_string_pretty(&out)?)
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "{:<11} {:>3} {:>8} {:>7} {:>7} | {:>8} {:>7} | {:>8} {:>7} | {:>6} {:>6} | {:>8} {:>7} | {}\n",
            "frontend",
            "qp",
            "frame",
            "c2c ns",
            "wake us",
            "vn Mpps",
            "Gbit/s",
            "dpdk Mp",
            "Gbit/s",
            "ratio",
            "pair-r",
            "memcpy M",
            "Gbit/s",
            "fail"
        ));
        s.push_str(&"-".repeat(126));
        s.push('\n');
        for p in &self.points {
            let m = p.summary();
            s.push_str(&format!(
                "{:<11} {:>3} {:>8} {:>7} {:>7} | {:>8} {:>7} | {:>8} {:>7} | {:>6} {:>6} | {:>8} {:>7} | {}\n",
                p.frontend,
                p.qps,
                p.label,
                f(m.c2c_ns, 0),
                f(m.wake_ns.map(|w| w / 1e3), 1),
                f(m.virtnet.map(|r| r.mpps), 3),
                f(m.virtnet.map(|r| r.gbps), 2),
                f(m.dpdk.map(|r| r.mpps), 3),
                f(m.dpdk.map(|r| r.gbps), 2),
                f(m.ratio, 2),
                f(m.pair_ratio, 2),
                f(p.memcpy.map(|r| r.mpps), 3),
                f(p.memcpy.map(|r| r.gbps), 1),
                m.failures
            ));
        }
        s
    }

    /// Writes the JSON file.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json()?)
            .map_err(|e| Error::Write(path.display().to_string(), e))
    }

    /// Writes the SVG plot: frame size vs Mpps (both axes logarithmic), one line per
    /// frontend × backend × queue pairs, plus the memcpy reference.
    pub fn write_svg(&self, path: &Path) -> Result<()> {
        let plot = |e: &dyn std::fmt::Display| Error::Plot(e.to_string());
        let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        let mut add = |name: String, x: f64, y: f64| {
            if y <= 0.0 {
                return;
            }
            match series.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.push((x, y)),
                None => series.push((name, vec![(x, y)])),
            }
        };
        let mut memcpy_seen = Vec::new();
        for p in &self.points {
            let m = p.summary();
            let x = p.frame_len as f64;
            if let Some(v) = m.virtnet {
                add(
                    format!("virtnet ({}, {} qp)", fe_label(&p.frontend), p.qps),
                    x,
                    v.mpps,
                );
            }
            if let Some(d) = m.dpdk {
                add(
                    format!("DPDK vhost ({}, {} qp)", fe_label(&p.frontend), p.qps),
                    x,
                    d.mpps,
                );
            }
            if let Some(r) = p.memcpy {
                if !memcpy_seen.contains(&p.frame_len) {
                    memcpy_seen.push(p.frame_len);
                    add("memcpy, 1 core".into(), x, r.mpps);
                }
            }
        }
        for (_, v) in &mut series {
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        let ys = series.iter().flat_map(|(_, v)| v.iter().map(|p| p.1));
        let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(l, h), y| (l.min(y), h.max(y)));
        let (lo, hi) = if lo <= hi {
            (lo / 2.0, hi * 2.0)
        } else {
            (0.01, 100.0)
        };

        let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "virtnet vs DPDK vhost: guest → guest frame rate (same run, interleaved)",
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d((32f64..131_072f64).log_scale(), (lo..hi).log_scale())
            .map_err(|e| plot(&e))?;
        chart
            .configure_mesh()
            .x_desc("frame size (bytes)")
            .y_desc("Mpps delivered")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| sig(*y))
            .draw()
            .map_err(|e| plot(&e))?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let dashed = name.starts_with("memcpy");
            let style = ShapeStyle {
                color,
                filled: false,
                stroke_width: if dashed { 1 } else { 2 },
            };
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), style))
                .map_err(|e| plot(&e))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| plot(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot(&e))?;
        root.present().map_err(|e| plot(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(mpps: f64, len: usize) -> Rate {
        Rate {
            mpps,
            gbps: mpps * len as f64 * 8.0 / 1e3,
            offered_mpps: None,
            wrong_len_frames: 0,
            frames_sent_received: None,
        }
    }

    fn report() -> Report {
        let p = Point {
            frontend: "guest".into(),
            qps: 1,
            label: "64".into(),
            frame_len: 64,
            gso: false,
            pairs: vec![
                Pair {
                    c2c_ns: Some(150.0),
                    wake_ns: Some(20_000.0),
                    virtnet: Outcome::Ok(rate(4.0, 64)),
                    dpdk: Outcome::Ok(rate(2.0, 64)),
                },
                Pair {
                    c2c_ns: Some(170.0),
                    wake_ns: None,
                    virtnet: Outcome::Ok(rate(6.0, 64)),
                    dpdk: Outcome::Failed("boom".into()),
                },
                Pair {
                    c2c_ns: Some(500.0),
                    wake_ns: None,
                    virtnet: Outcome::Ok(rate(5.0, 64)),
                    dpdk: Outcome::Ok(rate(4.0, 64)),
                },
            ],
            memcpy: Some(rate(80.0, 64)),
        };
        let mut q = p.clone();
        q.label = "1500".into();
        q.frame_len = 1500;
        q.pairs = vec![Pair {
            c2c_ns: None,
            wake_ns: None,
            virtnet: Outcome::Ok(rate(1.0, 1500)),
            dpdk: Outcome::Ok(rate(1.0, 1500)),
        }];
        Report {
            unix_time: 0,
            cpus: 2,
            backend_cpus: "1".into(),
            frontend_cpus: "0".into(),
            pairs: 3,
            warmup_secs: 1.0,
            secs: 3.0,
            notes: vec!["test".into()],
            points: vec![p, q],
        }
    }

    #[test]
    fn summary_is_a_ratio_of_medians() {
        let r = report();
        let s = r.points[0].summary();
        assert_eq!(s.virtnet.unwrap().mpps, 5.0);
        assert_eq!(s.dpdk.unwrap().mpps, 3.0);
        assert!((s.ratio.unwrap() - 5.0 / 3.0).abs() < 1e-9);
        // Pair ratios 2.0 and 1.25; the failed pair has none.
        assert!((s.pair_ratio.unwrap() - 1.625).abs() < 1e-9);
        assert_eq!(s.failures, 1);
        assert_eq!(s.c2c_ns, Some(170.0));
    }

    #[test]
    fn table_and_json_carry_the_figures() {
        let r = report();
        let t = r.table();
        assert!(t.contains("guest"), "{t}");
        assert!(t.contains("1.67"), "{t}");
        let j: serde_json::Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        assert_eq!(j["points"][0]["summary"]["virtnet"]["mpps"], 5.0);
        assert_eq!(j["points"][0]["pairs"][1]["dpdk"]["failed"], "boom");
        assert_eq!(j["backend_cpus"], "1");
        assert_eq!(j["points"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn svg_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plot.svg");
        report().write_svg(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("<svg"), "{}", &text[..100.min(text.len())]);
        assert!(text.contains("virtnet (guest, A → B, 1 qp)"), "{text}");
        assert!(text.contains("DPDK vhost (guest, A → B, 1 qp)"), "{text}");
        assert!(text.contains("memcpy"));
    }
}
