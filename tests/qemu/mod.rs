//! Harness for tests with real Linux guests in QEMU (TCG) on `virtnetd`.
//!
//! Used as `mod qemu;` from `tests/qemu_*.rs`. The pieces:
//!
//! - [`Lab::new`]: one per test. Checks that QEMU is installed (skips, or fails under `CI`),
//!   builds/locates the guest image once per test binary (`scripts/guest-image.sh`), takes
//!   guest slots from a global semaphore (TCG guests on 2 cores: at most [`MAX_GUESTS`] at
//!   once) and owns a unique temp dir for sockets, configs and logs.
//! - [`Daemon`]: `virtnetd --config` as a child, with [`Daemon::stats`], [`Daemon::kill`]
//!   (SIGKILL) and [`Daemon::restart`].
//! - [`Guest`]: one `qemu-system-x86_64` child. Its serial console is a unix socket that the
//!   harness connects to before the VM starts (`wait=on`): a reader thread appends everything
//!   to the guest's log; commands go the other way. The guest's `/init` (tests/qemu/init.sh)
//!   answers with `VT: ...` marker lines.
//!
//! Every child is killed by PID in `Drop`, also when a test panics; on panic the tail of every
//! log is printed first. The temp dir goes with the [`Lab`].

#![allow(dead_code)]

pub mod json;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use json::Json;

/// Most guests that may run at once, over all tests of the binary.
pub const MAX_GUESTS: usize = 4;

/// Guest memory (MiB).
const GUEST_MEM_MIB: u32 = 256;

/// Boot (process start to the `VT: ready` marker) timeout. TCG boots take 2–10 s.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Path of the virtnetd binary under test.
const VIRTNETD: &str = env!("CARGO_BIN_EXE_virtnetd");

fn log_line(msg: &str) {
    eprintln!("[qemu-harness] {msg}");
}

/// Is `prog` on `PATH`?
fn find_in_path(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// A command for a child process that must not outlive the test: through util-linux
/// `setpriv --pdeathsig KILL` when it is there (same PID: setpriv execs the program), so that
/// an interrupted test run (Ctrl-C, a killed test binary) leaves no QEMU or daemon behind.
/// The signal fires when the spawning *thread* ends; every test spawns and reaps its children
/// on its own thread.
fn child_command(prog: &str) -> Command {
    static SETPRIV: OnceLock<Option<PathBuf>> = OnceLock::new();
    match SETPRIV.get_or_init(|| find_in_path("setpriv")) {
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", prog]);
            c
        }
        None => Command::new(prog),
    }
}

/// The built guest image.
#[derive(Debug, Clone)]
pub struct Image {
    /// Uncompressed kernel (PVH ELF).
    pub vmlinux: PathBuf,
    /// initramfs with /init from tests/qemu/init.sh.
    pub initrd: PathBuf,
}

/// Builds the guest image once per test binary (the script itself caches across runs and
/// serialises concurrent builds with flock).
fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = std::env::var_os("VT_GUEST_IMAGE")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                // <target>/tmp → <target>/guest-image, so CARGO_TARGET_DIR is honoured.
                Path::new(env!("CARGO_TARGET_TMPDIR"))
                    .parent()
                    .unwrap_or(Path::new("target"))
                    .join("guest-image")
            });
        let t = Instant::now();
        let res = Command::new("bash")
            .arg(root.join("scripts/guest-image.sh"))
            .arg(&out)
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/guest-image.sh");
        assert!(
            res.status.success(),
            "scripts/guest-image.sh failed ({}):\n{}{}",
            res.status,
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        );
        log_line(&format!(
            "guest image {} ready in {:.1} s",
            out.display(),
            t.elapsed().as_secs_f64()
        ));
        Image {
            vmlinux: out.join("vmlinux"),
            initrd: out.join("initrd.gz"),
        }
    })
}

/// The host TSC frequency in kHz, for microvm's `tsc_early_khz` (it has no other calibration
/// source; see real-peers.md G3).
fn tsc_khz() -> u64 {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(2_700_000)
}

/// Counting semaphore over guest slots.
struct Slots {
    free: Mutex<usize>,
    cv: Condvar,
}

fn slots() -> &'static Slots {
    static SLOTS: OnceLock<Slots> = OnceLock::new();
    SLOTS.get_or_init(|| Slots {
        free: Mutex::new(MAX_GUESTS),
        cv: Condvar::new(),
    })
}

/// Slots held by one test (all it needs, taken at once so that tests cannot deadlock).
struct SlotPermit(usize);

impl SlotPermit {
    fn take(n: usize) -> SlotPermit {
        assert!(
            n <= MAX_GUESTS,
            "a test may run at most {MAX_GUESTS} guests"
        );
        let s = slots();
        let mut free = s.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free < n {
            free = s.cv.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= n;
        SlotPermit(n)
    }
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        let s = slots();
        let mut free = s.free.lock().unwrap_or_else(|e| e.into_inner());
        *free += self.0;
        s.cv.notify_all();
    }
}

/// One test's environment: image, guest slots, temp dir, wall clock.
pub struct Lab {
    /// Test name (for logs).
    pub name: String,
    /// The guest image.
    pub image: Image,
    started: Instant,
    slots: Option<SlotPermit>,
    dir: Option<tempfile::TempDir>,
}

impl Lab {
    /// Sets up a test that will run up to `guests` guests at once. `None` means QEMU is not
    /// installed and the test must return (it was reported as SKIPPED); under `CI` that panics.
    pub fn new(name: &str, guests: usize) -> Option<Lab> {
        if find_in_path("qemu-system-x86_64").is_none() {
            if std::env::var_os("CI").is_some() {
                panic!("qemu-system-x86_64 not installed (CI is set: the QEMU tests must run)");
            }
            eprintln!();
            eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
            eprintln!("!!! SKIPPED: qemu-system-x86_64 not installed ({name})");
            eprintln!("!!! apt-get install qemu-system-x86 busybox-static iperf3 python3 cpio");
            eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
            return None;
        }
        let image = image().clone();
        let waited = Instant::now();
        let slots = SlotPermit::take(guests);
        if waited.elapsed() > Duration::from_secs(1) {
            log_line(&format!(
                "{name}: waited {:.1} s for {guests} guest slots",
                waited.elapsed().as_secs_f64()
            ));
        }
        // Short paths: unix socket paths are limited to 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("vt-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        Some(Lab {
            name: name.to_string(),
            image,
            started: Instant::now(),
            slots: Some(slots),
            dir: Some(dir),
        })
    }

    /// The temp dir.
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/nonexistent"))
    }

    /// Seconds since the lab was set up.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// A socket path in the temp dir for port `name`.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir().join(format!("{name}.sock"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        log_line(&format!(
            "{}: wall time {:.1} s{}",
            self.name,
            self.elapsed(),
            if thread::panicking() { " (FAILED)" } else { "" }
        ));
        self.slots.take();
        if let Some(d) = self.dir.take() {
            let _ = d.close();
        }
    }
}

/// Kills a child by PID (SIGKILL) and reaps it.
fn kill_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Prints the last `n` lines of a log file (for failures).
fn dump_tail(what: &str, path: &Path, n: usize) {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    eprintln!(
        "----- {what}: last {} lines of {} -----",
        lines.len() - start,
        path.display()
    );
    for l in &lines[start..] {
        eprintln!("  {l}");
    }
}

/// A port in the daemon's config.
#[derive(Debug, Clone)]
pub struct PortCfg {
    /// Port name (also the socket's file name and the guest's name).
    pub name: String,
    /// MAC for the device's config space.
    pub mac: String,
    /// Queue pairs (1 = no multiqueue).
    pub queue_pairs: u16,
    /// Largest virtqueue the device accepts (`None`: the daemon's default).
    pub queue_size: Option<u32>,
}

impl PortCfg {
    /// A single-queue port.
    pub fn new(name: &str, mac: &str) -> PortCfg {
        PortCfg {
            name: name.into(),
            mac: mac.into(),
            queue_pairs: 1,
            queue_size: None,
        }
    }
}

/// `virtnetd` running one internal network.
pub struct Daemon {
    child: Option<Child>,
    config: PathBuf,
    control: PathBuf,
    log: PathBuf,
    starts: u32,
}

impl Daemon {
    /// Writes the config for one internal network "lab" with `ports`, starts virtnetd and
    /// waits until it answers on its control socket.
    pub fn start(lab: &Lab, ports: &[PortCfg]) -> Daemon {
        Daemon::start_network(lab, "internal", "", ports)
    }

    /// Like [`Daemon::start`] for a network of any `mode`; `extra` is TOML added to the
    /// `[[network]]` table (e.g. `subnet = "..."`), before the ports.
    pub fn start_network(lab: &Lab, mode: &str, extra: &str, ports: &[PortCfg]) -> Daemon {
        let mut toml = format!("\n[[network]]\nname = \"lab\"\nmode = \"{mode}\"\n{extra}\n");
        for p in ports {
            let _ = writeln!(
                toml,
                "\n[[network.port]]\nname = \"{}\"\nsocket = \"{}\"\nmac = \"{}\"\nqueue_pairs = {}",
                p.name,
                lab.socket(&p.name).display(),
                p.mac,
                p.queue_pairs
            );
            if let Some(q) = p.queue_size {
                let _ = writeln!(toml, "queue_size = {q}");
            }
        }
        Daemon::start_toml(lab, &toml)
    }

    /// Starts virtnetd with `networks` (TOML `[[network]]` tables; the harness adds
    /// `control_socket`). Sockets should be [`Lab::socket`] paths.
    pub fn start_toml(lab: &Lab, networks: &str) -> Daemon {
        let control = lab.dir().join("control.sock");
        let toml = format!("control_socket = \"{}\"\n{networks}", control.display());
        let config = lab.dir().join("virtnetd.toml");
        fs::write(&config, toml).expect("write virtnetd config");
        let mut d = Daemon {
            child: None,
            config,
            control,
            log: lab.dir().join("virtnetd.log"),
            starts: 0,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "virtnetd already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("virtnetd log");
        let child = child_command(VIRTNETD)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn virtnetd");
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    dump_tail("virtnetd", &self.log, 40);
                    panic!("virtnetd exited at start: {status}");
                }
            }
            if self.control.exists() && self.try_stats().is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "virtnetd did not answer on its control socket"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL (no cleanup on the daemon's side: sockets stay behind).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
    }

    /// Starts the daemon again with the same config.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn try_stats(&self) -> Result<Json, String> {
        let out = Command::new(VIRTNETD)
            .arg("stats")
            .arg("--control")
            .arg(&self.control)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "virtnetd stats: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Json::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// `virtnetd stats`, by port name.
    pub fn stats(&self) -> BTreeMap<String, PortStats> {
        let v = self.try_stats().unwrap_or_else(|e| panic!("stats: {e}"));
        let mut out = BTreeMap::new();
        for net in v.get("networks").map(Json::items).unwrap_or(&[]) {
            for p in net.get("ports").map(Json::items).unwrap_or(&[]) {
                let s = PortStats::from_json(p);
                out.insert(s.name.clone(), s);
            }
        }
        out
    }

    /// Stats of one port.
    pub fn port(&self, name: &str) -> PortStats {
        self.stats()
            .remove(name)
            .unwrap_or_else(|| panic!("no port {name} in virtnetd stats"))
    }

    /// Waits until `pred` holds for port `name`'s stats.
    pub fn wait_port(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&PortStats) -> bool,
    ) -> PortStats {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.port(name);
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "port {name}: condition not met: {s:?}"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if thread::panicking() {
            dump_tail("virtnetd", &self.log, 40);
            if let Ok(v) = self.try_stats() {
                eprintln!("virtnetd stats at failure: {v:?}");
            }
        }
        self.kill();
    }
}

/// DPDK `dpdk-testpmd` in io-forward mode between two vhost-user sockets: an independent
/// backend to check the harness and the guest image against (not virtnetd).
pub struct Testpmd {
    child: Option<Child>,
    prefix: String,
    log: PathBuf,
}

impl Testpmd {
    /// Starts testpmd with vhost-user server sockets `a` and `b` (frames from one go out of
    /// the other). `None` if dpdk-testpmd is not installed.
    pub fn start(lab: &Lab, a: &Path, b: &Path) -> Option<Testpmd> {
        find_in_path("dpdk-testpmd")?;
        let prefix = format!(
            "vt{}",
            std::process::id() ^ (lab.dir().as_os_str().len() as u32)
        );
        let log = lab.dir().join("testpmd.log");
        let f = fs::File::create(&log).expect("testpmd log");
        // stdin must stay open: testpmd exits on EOF (real-peers.md G10).
        let child = child_command("dpdk-testpmd")
            .args([
                "-l",
                "0-1",
                "--no-huge",
                "-m",
                "512",
                "--no-pci",
                "--file-prefix",
                &prefix,
            ])
            .arg("--vdev")
            .arg(format!("net_vhost0,iface={},client=0", a.display()))
            .arg("--vdev")
            .arg(format!("net_vhost1,iface={},client=0", b.display()))
            .args([
                "--",
                "--forward-mode=io",
                "--auto-start",
                "--nb-cores=1",
                "--rxq=1",
                "--txq=1",
            ])
            .arg("--total-num-mbufs=32768")
            .stdin(Stdio::piped())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("spawn dpdk-testpmd");
        let t = Testpmd {
            child: Some(child),
            prefix,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(a.exists() && b.exists()) {
            assert!(Instant::now() < deadline, "testpmd sockets did not appear");
            thread::sleep(Duration::from_millis(50));
        }
        Some(t)
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        if thread::panicking() {
            dump_tail("testpmd", &self.log, 20);
        }
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
        let _ = fs::remove_dir_all(Path::new("/var/run/dpdk").join(&self.prefix));
    }
}

/// One port's counters from `virtnetd stats`.
#[derive(Debug, Clone, Default)]
pub struct PortStats {
    /// Port name.
    pub name: String,
    /// A frontend is connected.
    pub connected: bool,
    /// The device runs (DRIVER_OK and rings set up).
    pub running: bool,
    /// Connections accepted so far.
    pub connections: u64,
    /// Features the driver acked.
    pub acked_features: u64,
    /// Queue pairs in use.
    pub active_queue_pairs: u64,
    /// Frames the switch received from the guest.
    pub rx_frames: u64,
    /// Bytes the switch received from the guest.
    pub rx_bytes: u64,
    /// Frames delivered to the guest.
    pub tx_frames: u64,
    /// Bytes delivered to the guest.
    pub tx_bytes: u64,
    /// Frames the guest sent that were flooded.
    pub flooded: u64,
    /// Every drop counter.
    pub drops: BTreeMap<String, u64>,
}

impl PortStats {
    fn from_json(p: &Json) -> PortStats {
        let n = |k: &str| p.get(k).and_then(Json::as_u64).unwrap_or(0);
        let b = |k: &str| p.get(k).and_then(Json::as_bool).unwrap_or(false);
        let drops = match p.get("drops") {
            Some(Json::Obj(m)) => m
                .iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect(),
            _ => BTreeMap::new(),
        };
        PortStats {
            name: p
                .get("name")
                .and_then(Json::as_str)
                .unwrap_or("")
                .to_string(),
            connected: b("connected"),
            running: b("running"),
            connections: n("connections"),
            acked_features: n("acked_features"),
            active_queue_pairs: n("active_queue_pairs"),
            rx_frames: n("rx_frames"),
            rx_bytes: n("rx_bytes"),
            tx_frames: n("tx_frames"),
            tx_bytes: n("tx_bytes"),
            flooded: n("flooded"),
            drops,
        }
    }

    /// Sum of all drop counters.
    pub fn total_drops(&self) -> u64 {
        self.drops.values().sum()
    }
}

/// Which machine the guest is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// `-M pc` with virtio-net-pci (modern virtio), INTx (`vectors=0`).
    Pc,
    /// `-M microvm` with virtio-net-device on virtio-mmio (legacy virtio).
    Microvm,
}

/// How to boot a guest.
#[derive(Debug, Clone)]
pub struct GuestCfg {
    /// Name (log file, console socket; by convention the daemon port's name too).
    pub name: String,
    /// vhost-user socket to connect to.
    pub socket: PathBuf,
    /// MAC of the NIC.
    pub mac: String,
    /// Address with prefix, e.g. `10.0.0.1/24`.
    pub ip: String,
    /// Machine type.
    pub machine: Machine,
    /// Queue pairs (`queues=N` on the netdev, `mq=on` on the device when > 1).
    pub queues: u16,
    /// Extra `-device` properties, e.g. `mrg_rxbuf=off`.
    pub device_props: Vec<String>,
    /// vCPUs (Linux uses min(vCPUs, queue pairs) queue pairs).
    pub smp: u32,
    /// Extra kernel arguments, e.g. `vt.role=ping vt.peer=10.0.0.2` (see tests/qemu/init.sh).
    pub kernel_args: Vec<String>,
}

impl GuestCfg {
    /// A pc guest with one queue pair on `port`'s socket, named like the port.
    pub fn new(lab: &Lab, port: &PortCfg, ip: &str) -> GuestCfg {
        GuestCfg {
            name: port.name.clone(),
            socket: lab.socket(&port.name),
            mac: port.mac.clone(),
            ip: ip.into(),
            machine: Machine::Pc,
            queues: port.queue_pairs,
            device_props: Vec::new(),
            smp: 1,
            kernel_args: Vec::new(),
        }
    }
}

/// Result of `vt_ping`.
#[derive(Debug, Clone, Default)]
pub struct Ping {
    /// Echo requests sent.
    pub tx: u64,
    /// Replies received (first replies; duplicates not counted).
    pub rx: u64,
    /// Duplicate replies (e.g. several hosts answering a broadcast).
    pub dup: u64,
    /// Average RTT in ms (NaN when no reply).
    pub avg_ms: f64,
    /// Source address of every reply line, in order (duplicates included).
    pub replies_from: Vec<String>,
}

/// Result of `vt_iperf`.
#[derive(Debug, Clone, Default)]
pub struct Iperf {
    /// Bytes the server received.
    pub bytes: u64,
    /// Receiver throughput (bit/s).
    pub bps: f64,
    /// TCP retransmissions at the sender.
    pub retrans: u64,
}

/// Parses `VT: <kind> k=v k=v` marker lines of `kind` in `text`.
pub fn markers(text: &str, kind: &str) -> Vec<BTreeMap<String, String>> {
    let tag = format!("VT: {kind} ");
    text.lines()
        .filter_map(|l| l.find(&tag).map(|i| &l[i + tag.len()..]))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

fn num<T: std::str::FromStr + Default>(m: &BTreeMap<String, String>, k: &str) -> T {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or_default()
}

/// The console log shared with the reader thread.
struct Console {
    text: Mutex<String>,
    cv: Condvar,
}

/// A QEMU guest.
pub struct Guest {
    /// The config it was booted with.
    pub cfg: GuestCfg,
    child: Option<Child>,
    con: Option<UnixStream>,
    console: Arc<Console>,
    reader: Option<thread::JoinHandle<()>>,
    log: PathBuf,
    qemu_log: PathBuf,
    next_id: u32,
    booted: Instant,
}

impl Guest {
    /// Starts QEMU and waits until the guest's /init is ready for commands.
    pub fn boot(lab: &Lab, cfg: GuestCfg) -> Guest {
        let mut g = Guest::spawn(lab, cfg);
        g.wait_ready(lab);
        g
    }

    /// Boots several guests at once (they boot in parallel) and waits for all.
    pub fn boot_all(lab: &Lab, cfgs: Vec<GuestCfg>) -> Vec<Guest> {
        let mut guests: Vec<Guest> = cfgs.into_iter().map(|c| Guest::spawn(lab, c)).collect();
        for g in &mut guests {
            g.wait_ready(lab);
        }
        guests
    }

    /// Waits for the `VT: ready` marker and checks that eth0 has carrier.
    pub fn wait_ready(&mut self, lab: &Lab) {
        self.wait_text(0, "VT: ready", BOOT_TIMEOUT);
        let up = self.console_text();
        let link = markers(&up, "link");
        log_line(&format!(
            "{}: {}: ready after {:.1} s, {:?}",
            lab.name,
            self.cfg.name,
            self.booted.elapsed().as_secs_f64(),
            link.first()
        ));
        let carrier = link
            .first()
            .and_then(|m| m.get("carrier"))
            .map(String::as_str);
        assert_eq!(carrier, Some("1"), "{}: eth0 has no carrier", self.cfg.name);
    }

    /// Starts QEMU without waiting for the guest.
    pub fn spawn(lab: &Lab, cfg: GuestCfg) -> Guest {
        let con_path = lab.dir().join(format!("{}.con", cfg.name));
        let log = lab.dir().join(format!("{}.console.log", cfg.name));
        let qemu_log = lab.dir().join(format!("{}.qemu.log", cfg.name));
        let _ = fs::remove_file(&con_path);
        let mut append = format!(
            "console=ttyS0 quiet panic=-1 vt.name={} vt.ip={}",
            cfg.name, cfg.ip
        );
        let mut cmd = child_command("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
        ]);
        cmd.arg("-m").arg(format!("{GUEST_MEM_MIB}"));
        cmd.arg("-smp").arg(cfg.smp.to_string());
        cmd.arg("-object").arg(format!(
            "memory-backend-memfd,id=mem,size={GUEST_MEM_MIB}M,share=on"
        ));
        let netdev = format!(
            "vhost-user,id=net0,chardev=vnet0{}",
            if cfg.queues > 1 {
                format!(",queues={}", cfg.queues)
            } else {
                String::new()
            }
        );
        let mut device;
        match cfg.machine {
            Machine::Pc => {
                cmd.args(["-machine", "pc,memory-backend=mem"]);
                device = format!("virtio-net-pci,netdev=net0,mac={},vectors=0", cfg.mac);
                if cfg.queues > 1 {
                    device.push_str(",mq=on");
                }
            }
            Machine::Microvm => {
                cmd.args(["-machine", "microvm,memory-backend=mem"]);
                device = format!("virtio-net-device,netdev=net0,mac={}", cfg.mac);
                let _ = write!(append, " tsc_early_khz={} tsc=reliable", tsc_khz());
            }
        }
        for p in &cfg.device_props {
            device.push(',');
            device.push_str(p);
        }
        for a in &cfg.kernel_args {
            append.push(' ');
            append.push_str(a);
        }
        cmd.arg("-kernel").arg(&lab.image.vmlinux);
        cmd.arg("-initrd").arg(&lab.image.initrd);
        cmd.arg("-append").arg(&append);
        cmd.arg("-chardev").arg(format!(
            "socket,id=vnet0,path={},reconnect=1",
            cfg.socket.display()
        ));
        cmd.arg("-netdev").arg(&netdev);
        cmd.arg("-device").arg(&device);
        cmd.arg("-chardev").arg(format!(
            "socket,id=con,path={},server=on,wait=on",
            con_path.display()
        ));
        cmd.args(["-serial", "chardev:con"]);
        let qlog = fs::File::create(&qemu_log).expect("qemu log");
        let _ = fs::write(
            &log,
            format!("# {:?}\n", cmd.get_args().collect::<Vec<_>>()),
        );
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(qlog.try_clone().expect("dup"))
            .stderr(qlog)
            .spawn()
            .expect("spawn qemu-system-x86_64");
        // QEMU creates the console socket and waits for us before it runs the guest.
        let deadline = Instant::now() + Duration::from_secs(30);
        let con = loop {
            if let Ok(s) = UnixStream::connect(&con_path) {
                break s;
            }
            if let Ok(Some(st)) = child.try_wait() {
                dump_tail("qemu", &qemu_log, 20);
                panic!("{}: qemu exited at start: {st}", cfg.name);
            }
            if Instant::now() > deadline {
                kill_child(&mut child);
                dump_tail("qemu", &qemu_log, 20);
                panic!("{}: qemu console socket never appeared", cfg.name);
            }
            thread::sleep(Duration::from_millis(20));
        };
        let console = Arc::new(Console {
            text: Mutex::new(String::new()),
            cv: Condvar::new(),
        });
        let reader = {
            let console = console.clone();
            let mut rd = con.try_clone().expect("clone console socket");
            let mut file = fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .expect("console log");
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match rd.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let _ = file.write_all(&buf[..n]);
                            let chunk = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                            let mut t = console.text.lock().unwrap_or_else(|e| e.into_inner());
                            t.push_str(&chunk);
                            console.cv.notify_all();
                        }
                    }
                }
                console.cv.notify_all();
            })
        };
        Guest {
            cfg,
            child: Some(child),
            con: Some(con),
            console,
            reader: Some(reader),
            log,
            qemu_log,
            next_id: 1,
            booted: Instant::now(),
        }
    }

    /// Everything the guest printed so far.
    pub fn console_text(&self) -> String {
        self.console
            .text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Length of the console text (an offset for [`Guest::wait_text`]).
    pub fn console_len(&self) -> usize {
        self.console
            .text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Is QEMU still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits until the console text after `from` satisfies `pred`, which returns a value.
    /// Panics (with the log tail) on timeout or when QEMU exits first.
    pub fn wait_for<T>(
        &mut self,
        from: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let console = self.console.clone();
        let mut t = console.text.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(v) = pred(t.get(from..).unwrap_or("")) {
                return v;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(t);
                panic!(
                    "{}: timed out after {timeout:?} waiting for {what}",
                    self.cfg.name
                );
            }
            let wait = (deadline - now).min(Duration::from_millis(250));
            t = console
                .cv
                .wait_timeout(t, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            let exited = self
                .child
                .as_mut()
                .map(|c| !matches!(c.try_wait(), Ok(None)))
                .unwrap_or(true);
            if exited && pred(t.get(from..).unwrap_or("")).is_none() {
                // Give the reader a moment to drain what QEMU wrote last.
                drop(t);
                thread::sleep(Duration::from_millis(200));
                t = console.text.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(v) = pred(t.get(from..).unwrap_or("")) {
                    return v;
                }
                drop(t);
                panic!("{}: QEMU exited while waiting for {what}", self.cfg.name);
            }
        }
    }

    /// Waits for `needle` in the console text after `from`.
    pub fn wait_text(&mut self, from: usize, needle: &str, timeout: Duration) {
        let n = needle.to_string();
        self.wait_for(from, timeout, needle, |t| t.contains(&n).then_some(()));
    }

    /// Sends a shell command line to the guest; returns its id and console offset.
    pub fn send(&mut self, cmd: &str) -> (u32, usize) {
        assert!(!cmd.contains('\n'), "one line");
        let id = self.next_id;
        self.next_id += 1;
        let from = self.console_len();
        let con = self.con.as_mut().expect("console");
        con.write_all(format!("{id} {cmd}\n").as_bytes())
            .unwrap_or_else(|e| panic!("write to the console: {e}"));
        (id, from)
    }

    /// Waits for the end of the command `id` sent at offset `from`; returns (rc, output).
    pub fn finish(&mut self, (id, from): (u32, usize), timeout: Duration) -> (i32, String) {
        let tag = format!("VT: end {id} rc=");
        self.wait_for(from, timeout, &tag.clone(), move |t| {
            let i = t.find(&tag)?;
            let rest = &t[i + tag.len()..];
            let nl = rest.find('\n')?;
            let rc = rest[..nl].trim().parse().unwrap_or(-1);
            Some((rc, t[..i].to_string()))
        })
    }

    /// Runs a command line and waits for it; returns (rc, output).
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> (i32, String) {
        let h = self.send(cmd);
        self.finish(h, timeout)
    }

    /// Pings `dst` `count` times every `interval` seconds.
    pub fn ping(&mut self, dst: &str, count: u32, interval: f64) -> Ping {
        let timeout = Duration::from_secs_f64(30.0 + f64::from(count) * interval * 2.0);
        let h = self.send(&format!("vt_ping {dst} {count} {interval}"));
        let (_, out) = self.finish(h, timeout);
        parse_ping(&out).unwrap_or_else(|| panic!("{}: no ping marker in:\n{out}", self.cfg.name))
    }

    /// Waits until `dst` answers a ping (up to `tries` seconds).
    pub fn reach(&mut self, dst: &str, tries: u32) -> bool {
        let (rc, _) = self.run(
            &format!("vt_wait {dst} {tries}"),
            Duration::from_secs(u64::from(tries) * 3 + 30),
        );
        rc == 0
    }

    /// Starts an iperf3 server (background).
    pub fn iperf_server(&mut self) {
        let (rc, out) = self.run("vt_iperfs", Duration::from_secs(30));
        assert_eq!(rc, 0, "{}: iperf3 -s failed: {out}", self.cfg.name);
    }

    /// TCP iperf3 to `dst` for `secs` seconds.
    pub fn iperf(&mut self, dst: &str, secs: u32) -> Iperf {
        let (_, out) = self.run(
            &format!("vt_iperf {dst} {secs}"),
            Duration::from_secs(u64::from(secs) * 3 + 60),
        );
        let m = markers(&out, "iperf3");
        let m = m
            .last()
            .unwrap_or_else(|| panic!("{}: no iperf3 marker in:\n{out}", self.cfg.name));
        Iperf {
            bytes: num(m, "bytes"),
            bps: num(m, "bps"),
            retrans: num(m, "retrans"),
        }
    }

    /// eth0's counters in the guest: (rx_packets, tx_packets).
    pub fn netdev(&mut self) -> (u64, u64) {
        let (_, out) = self.run("vt_netdev", Duration::from_secs(30));
        let m = markers(&out, "netdev");
        let m = m.last().expect("netdev marker");
        (num(m, "rx_packets"), num(m, "tx_packets"))
    }

    /// Powers the guest off and waits for QEMU to exit.
    pub fn poweroff(mut self) {
        if let Some(con) = self.con.as_mut() {
            let _ = con.write_all(b"0 vt_off\n");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.alive() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
        assert!(
            !self.alive(),
            "{}: QEMU did not exit after poweroff",
            self.cfg.name
        );
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
        if let Some(con) = self.con.take() {
            let _ = con.shutdown(std::net::Shutdown::Both);
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if thread::panicking() {
            dump_tail(&format!("guest {}", self.cfg.name), &self.log, 40);
            dump_tail(&format!("qemu {}", self.cfg.name), &self.qemu_log, 10);
        }
        self.shutdown();
    }
}

/// Parses the output of `vt_ping`.
pub fn parse_ping(out: &str) -> Option<Ping> {
    let m = markers(out, "ping");
    let m = m.last()?;
    let replies_from = out
        .lines()
        .filter_map(|l| {
            let rest = l.split(" bytes from ").nth(1)?;
            Some(rest.split(':').next()?.to_string())
        })
        .collect();
    Some(Ping {
        tx: num(m, "tx"),
        rx: num(m, "rx"),
        dup: num(m, "dup"),
        avg_ms: m
            .get("avg_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN),
        replies_from,
    })
}

/// Highest `seq=N` of a ping reply in `text`.
pub fn last_ping_seq(text: &str) -> Option<u64> {
    text.lines()
        .filter(|l| l.contains(" bytes from "))
        .filter_map(|l| {
            let s = l.split("seq=").nth(1)?;
            s.split_whitespace().next()?.parse().ok()
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PING_OUT: &str = "PING 10.0.0.255 (10.0.0.255): 56 data bytes\n\
        64 bytes from 10.0.0.2: seq=0 ttl=64 time=2.1 ms\n\
        64 bytes from 10.0.0.3: seq=0 ttl=64 time=2.5 ms (DUP!)\n\
        64 bytes from 10.0.0.2: seq=1 ttl=64 time=1.9 ms\n\
        \n--- 10.0.0.255 ping statistics ---\n\
        2 packets transmitted, 2 packets received, 1 duplicates, 0% packet loss\n\
        round-trip min/avg/max = 1.9/2.1/2.5 ms\n\
        VT: ping dst=10.0.0.255 tx=2 rx=2 dup=1 avg_ms=2.1\n";

    #[test]
    fn ping_output_parses() {
        let p = parse_ping(PING_OUT).unwrap();
        assert_eq!((p.tx, p.rx, p.dup), (2, 2, 1));
        assert!((p.avg_ms - 2.1).abs() < 1e-9);
        assert_eq!(p.replies_from, ["10.0.0.2", "10.0.0.3", "10.0.0.2"]);
        assert_eq!(last_ping_seq(PING_OUT), Some(1));
        assert!(parse_ping("no marker").is_none());
    }

    #[test]
    fn markers_parse_key_values() {
        let m = markers(
            "x\n[  1.0] VT: iperf3 dst=a bytes=12 bps=3e+08\nVT: iperf3x y=1\n",
            "iperf3",
        );
        assert_eq!(m.len(), 1);
        assert_eq!(num::<u64>(&m[0], "bytes"), 12);
        assert_eq!(num::<f64>(&m[0], "bps"), 3e8);
    }

    #[test]
    fn slots_are_counted() {
        let b = SlotPermit::take(1);
        assert!(*slots().free.lock().unwrap() < MAX_GUESTS);
        drop(b);
    }
}
