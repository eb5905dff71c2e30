//! `virtnet-bench`: virtnet vs DPDK vhost frame rates, side by side. See the library docs.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use virtnet_bench::proc::{BackendKind, Programs};
use virtnet_bench::report::Report;
use virtnet_bench::run::{Frontend, Plan, Size};
use virtnet_bench::sys::CpuSet;

/// Frame rates guest → guest through virtnetd and through DPDK's vhost backend, interleaved.
#[derive(Parser, Debug)]
#[command(name = "virtnet-bench", version, about)]
struct Args {
    /// A/B pairs per point (virtnet then DPDK, then DPDK then virtnet, and so on).
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    /// Measurement window per run, seconds.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Warm-up per run before measuring, seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Short run: 1 pair, 1 s window, 0.5 s warm-up (overrides the three above).
    #[arg(long)]
    quick: bool,
    /// Frame sizes: bytes, or `gso` for 64 KiB TCPv4 GSO frames.
    #[arg(long, value_delimiter = ',', default_value = "64,512,1500,gso")]
    sizes: Vec<String>,
    /// Queue pairs per port.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    qps: Vec<u16>,
    /// Frontends: `guest` (virtnet_guest, A → B) and/or `virtio_user` (DPDK testpmd, two
    /// ports, both directions; see --vuser-mode).
    #[arg(long, value_delimiter = ',', default_value = "guest,virtio_user")]
    frontends: Vec<String>,
    /// How the virtio_user frontend makes traffic: `mac` (tx-first, then mac forwarding: each
    /// port sends with its own MAC to the other's, 2 × 256 frames in flight) or `flowgen`
    /// (DPDK 22.11 flowgen: one fixed source MAC on both ports to an unknown destination, so
    /// a learning switch floods every frame).
    #[arg(long, value_enum, default_value_t = virtnet_bench::proc::VuserMode::Mac)]
    vuser_mode: virtnet_bench::proc::VuserMode,
    /// Backends: `virtnet` and/or `dpdk` (the ratio needs both; one alone is for profiling).
    #[arg(long, value_delimiter = ',', default_value = "virtnet,dpdk")]
    backends: Vec<String>,
    /// CPUs of the backend (virtnetd or testpmd), comma-separated.
    #[arg(long, default_value = "1")]
    backend_cpus: String,
    /// CPUs of the frontends, comma-separated.
    #[arg(long, default_value = "0")]
    frontend_cpus: String,
    /// virtnetd binary [default: next to this binary, else from PATH].
    #[arg(long)]
    virtnetd: Option<PathBuf>,
    /// dpdk-testpmd binary.
    #[arg(long, default_value = "dpdk-testpmd")]
    testpmd: PathBuf,
    /// EAL memory per testpmd process, MiB (with --no-huge).
    #[arg(long, default_value_t = 512)]
    dpdk_mem: u32,
    /// Output directory for results.json and plot.svg.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Keep every run's sockets dir and logs (failed runs keep theirs anyway).
    #[arg(long)]
    keep_logs: bool,
}

fn default_virtnetd() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("virtnetd")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("virtnetd"))
}

fn plan(args: &Args) -> anyhow::Result<Plan> {
    let (pairs, secs, warmup) = if args.quick {
        (1, 1.0, 0.5)
    } else {
        (args.pairs, args.secs, args.warmup)
    };
    if pairs == 0 || !secs.is_finite() || secs <= 0.0 || !warmup.is_finite() || warmup < 0.0 {
        bail!("--pairs and --secs must be positive, --warmup not negative");
    }
    let sizes = args
        .sizes
        .iter()
        .map(|s| Size::parse(s).with_context(|| format!("bad frame size {s:?} (14..=9000 or gso)")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let frontends = args
        .frontends
        .iter()
        .map(|s| match s.as_str() {
            "guest" => Ok(Frontend::Guest),
            "virtio_user" | "vuser" => Ok(Frontend::VirtioUser),
            _ => bail!("bad frontend {s:?} (guest, virtio_user)"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let backends = args
        .backends
        .iter()
        .map(|s| match s.as_str() {
            "virtnet" => Ok(BackendKind::Virtnet),
            "dpdk" => Ok(BackendKind::Dpdk),
            _ => bail!("bad backend {s:?} (virtnet, dpdk)"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.qps.iter().any(|&q| q == 0 || q > 8) {
        bail!("--qps must be in 1..=8");
    }
    Ok(Plan {
        programs: Programs {
            virtnetd: args.virtnetd.clone().unwrap_or_else(default_virtnetd),
            testpmd: args.testpmd.clone(),
            backend_cpus: CpuSet::parse(&args.backend_cpus).context("--backend-cpus")?,
            frontend_cpus: CpuSet::parse(&args.frontend_cpus).context("--frontend-cpus")?,
            dpdk_mem_mb: args.dpdk_mem,
            vuser_mode: args.vuser_mode,
        },
        pairs,
        warmup: Duration::from_secs_f64(warmup),
        secs: Duration::from_secs_f64(secs),
        backends,
        frontends,
        qps: args.qps.clone(),
        sizes,
        work_dir: std::env::temp_dir().join(format!("vnb-{}", std::process::id())),
        keep_logs: args.keep_logs,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plan = plan(&args)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {:?}", args.out))?;
    let points = plan.points();
    let runs = (points.len() * plan.pairs * plan.backends.len()) as u64;
    let pb = ProgressBar::new(runs);
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} runs [{elapsed_precise}<{eta}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut report = Report {
        unix_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        cpus,
        backend_cpus: plan.programs.backend_cpus.list(),
        frontend_cpus: plan.programs.frontend_cpus.list(),
        pairs: plan.pairs,
        warmup_secs: plan.warmup.as_secs_f64(),
        secs: plan.secs.as_secs_f64(),
        notes: vec![
            format!(
                "backend (virtnetd or testpmd io fwd, 2 ports) pinned to CPUs {}; frontends pinned to CPUs {}",
                plan.programs.backend_cpus.list(),
                plan.programs.frontend_cpus.list()
            ),
            "guest: one thread runs sender (send_batch 64) and receiver (drain_with 256) of two virtnet_guest::Guest".into(),
            match plan.programs.vuser_mode {
                virtnet_bench::proc::VuserMode::Mac => format!("virtio_user: ONE testpmd with two virtio_user ports, --tx-first then mac forwarding (a burst of {} --txpkts frames per port, then every frame received on one port is sent out of the other, source = that port's MAC, destination = the other's): BIDIRECTIONAL closed loop, rate = median over periods of the sum of both ports' Rx-pps (txonly+rxonly as two processes on one CPU measured the scheduler, ~10 kpps)", virtnet_bench::proc::VUSER_BURST),
                virtnet_bench::proc::VuserMode::Flowgen => "virtio_user: ONE testpmd with two virtio_user ports in flowgen mode (rx+free, then generate --txpkts frames; DPDK 22.11 uses one fixed source MAC for both ports and a destination no port owns, so virtnet floods every frame): BIDIRECTIONAL, rate = median over periods of the sum of both ports' Rx-pps".into(),
            },
            "rates are delivered frames at the receiver; ratio = median(virtnet)/median(DPDK) within this run; c2c = frontend<->backend CPU cache-line round trip and wake = blocking wake-up round trip (unix socket ping-pong), both measured before each pair".into(),
        ],
        points: Vec::new(),
    };
    for (i, p) in points.iter().enumerate() {
        let name = format!("{} {}qp {}", p.frontend.name(), p.qps, p.size.label());
        pb.set_message(name.clone());
        let point = plan.run_point(*p, i, |msg| {
            pb.inc(1);
            pb.set_message(format!("{name}: {msg}"));
        });
        let s = point.summary();
        let wrong: u64 = [s.virtnet, s.dpdk]
            .iter()
            .flatten()
            .map(|r| r.wrong_len_frames)
            .sum();
        let line = format!(
            "{name:<24} virtnet {:>8} Mpps  dpdk {:>8} Mpps  ratio {:>5}  c2c {:>5} ns  wake {:>6} us{}",
            s.virtnet.map_or("-".into(), |r| format!("{:.3}", r.mpps)),
            s.dpdk.map_or("-".into(), |r| format!("{:.3}", r.mpps)),
            s.ratio.map_or("-".into(), |r| format!("{r:.2}")),
            s.c2c_ns.map_or("-".into(), |c| format!("{c:.0}")),
            s.wake_ns.map_or("-".into(), |w| format!("{:.1}", w / 1e3)),
            match (s.failures, wrong) {
                (0, 0) => String::new(),
                (f, w) => format!("  ({f} runs failed, {w} frames of wrong length: see JSON)"),
            }
        );
        // A hidden bar (no terminal) swallows println: print to stderr then.
        if pb.is_hidden() {
            eprintln!("{line}");
        } else {
            pb.println(line);
        }
        report.points.push(point);
        // Keep partial results on disk as we go.
        report.write_json(&args.out.join("results.json"))?;
    }
    pb.finish_and_clear();
    print!("{}", report.table());
    report.write_json(&args.out.join("results.json"))?;
    report.write_svg(&args.out.join("plot.svg"))?;
    println!(
        "wrote {} and {}",
        args.out.join("results.json").display(),
        args.out.join("plot.svg").display()
    );
    if !plan.keep_logs {
        let _ = std::fs::remove_dir(&plan.work_dir);
    }
    Ok(())
}
