//! # virtnet-daemon: `virtnetd`
//!
//! The daemon only wires things together: it reads a configuration, builds one switch per
//! network (through its mode), opens one vhost-user virtio-net device per port socket, answers
//! a control socket, and tears everything down on SIGINT/SIGTERM.
//!
//! ```text
//!   argv ──clap──► cli::Args ──TryFrom (load TOML / default, overrides, validate)──► Config
//!                                                                                   │
//!   daemon::Daemon::start(Config) ◄───────────────────────────────────────────────────┘
//!     ├─ control::ControlServer        control socket: "ping", "stats" (JSON)
//!     └─ per network: mode::alloc_mode → Box<dyn NetMode> (switch + mode ports)
//!          └─ per port: port::GuestPort → virtnet_virtio::NetPort (listens on its socket)
//!   daemon::Daemon::serve(&Shutdown)   until SIGINT/SIGTERM (sys::wait_termination)
//!   daemon::Daemon::stop()             ports, modes, sockets removed
//! ```
//!
//! Exit codes of [`main`]: 0 success, 1 runtime error (a socket cannot be bound, the daemon
//! cannot be reached), 2 bad command line or configuration.
//!
//! Module map:
//! - [`cli`]: command line ([`cli::Args`]) and `TryFrom<Args> for Config`.
//! - [`config`]: [`Config`] (the TOML file's shape), defaults, validation.
//! - [`mode`]: the [`mode::NetMode`] trait and [`mode::alloc_mode`] factory.
//! - [`mode_bridged`]: `bridged` networks (an AF_PACKET uplink on a host NIC).
//! - [`mode_hostonly`]: `host-only` networks (TAP + services) and DHCP on `internal` ones.
//! - [`mode_nat`]: `nat` networks (services + the NAT gateway of virtnet-port-nat).
//! - [`port`]: guest ports, the glue to `virtnet_virtio::NetPort`.
//! - [`control`]: the control socket protocol, server and client.
//! - [`daemon`]: [`Daemon`] start/serve/stop, [`Shutdown`], [`run`].
//! - [`qemu`]: the QEMU options printed for each port.
//! - [`sys`]: signal masks and `access(2)`; the crate's only `unsafe`.

#![deny(missing_docs)]

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod mode;
pub mod mode_bridged;
pub mod mode_hostonly;
pub mod mode_nat;
pub mod port;
pub mod qemu;
pub mod sys;

use std::ffi::OsString;
use std::io::{IsTerminal, Write};

use clap::Parser;

pub use cli::{Args, Command};
pub use config::{Config, NetworkConfig, PortSpec};
pub use control::StatsReport;
pub use daemon::{run, Daemon, DaemonError, Shutdown};

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: runtime error.
pub const EXIT_RUNTIME: i32 = 1;
/// Exit code: bad command line or configuration.
pub const EXIT_CONFIG: i32 = 2;

/// An error and its sources on one line, joined by ": ".
pub fn error_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        line.push_str(": ");
        line.push_str(&s.to_string());
        source = s.source();
    }
    line.replace('\n', " ")
}

/// Entry point of the `virtnetd` binary; returns the process exit code.
pub fn main() -> i32 {
    main_with(std::env::args_os())
}

/// [`main`] with explicit arguments (the first is the program name).
pub fn main_with<I, T>(argv: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = match Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_CONFIG } else { EXIT_OK };
        }
    };
    if let Some(command) = &args.command {
        let control = match args.client_control_socket() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {}", error_line(&e));
                return EXIT_CONFIG;
            }
        };
        return match command {
            Command::Stats { pretty, .. } => client(&control, "stats", *pretty),
            Command::Ping { .. } => client(&control, "ping", false),
        };
    }
    if args.print_default_config {
        stdout(&Config::default().to_toml());
        return EXIT_OK;
    }
    let check_only = args.check_config;
    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            return EXIT_CONFIG;
        }
    };
    if check_only {
        stdout("configuration OK\n");
        return EXIT_OK;
    }
    serve(config)
}

/// Write to stdout; a closed pipe (`virtnetd stats | head`) is not an error worth a panic.
fn stdout(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn client(control: &std::path::Path, command: &str, pretty: bool) -> i32 {
    match control::request(control, command) {
        Ok(answer) => {
            let out = match serde_json::from_str::<serde_json::Value>(&answer) {
                Ok(v) if pretty => serde_json::to_string_pretty(&v).unwrap_or(answer),
                _ => answer,
            };
            stdout(&format!("{out}\n"));
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            EXIT_RUNTIME
        }
    }
}

/// Install the log subscriber: `RUST_LOG` if set, else `level`. Bridges the `log` crate
/// (used by virtnet-virtio and rust-vmm) into `tracing`. Logs go to stderr.
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(config::DEFAULT_LOG_LEVEL));
    // Fails only if a subscriber is already installed (e.g. twice in one test process).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Run the daemon in this process until SIGINT/SIGTERM.
fn serve(config: Config) -> i32 {
    init_logging(&config.log_level);
    // Block the signals before any thread exists so every thread inherits the mask and only
    // the waiter below takes them.
    if let Err(e) = sys::block_termination_signals() {
        eprintln!("error: Cannot block signals: {e}");
        return EXIT_RUNTIME;
    }
    let shutdown = match Shutdown::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: Cannot create the shutdown event: {e}");
            return EXIT_RUNTIME;
        }
    };
    let waiter = shutdown.clone();
    std::thread::spawn(move || match sys::wait_termination() {
        Ok(sig) => {
            tracing::info!("signal {sig}: shutting down");
            waiter.trigger();
        }
        Err(e) => tracing::error!("sigwait: {e}"),
    });

    let hints = qemu::hints(&config);
    let daemon = match Daemon::start(config) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            return EXIT_RUNTIME;
        }
    };
    stdout(&hints);
    tracing::info!("virtnetd running");
    let served = daemon.serve(&shutdown);
    daemon.stop();
    match served {
        Ok(()) => {
            tracing::info!("virtnetd stopped");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            EXIT_RUNTIME
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_exit_2() {
        let dir = tempfile::TempDir::new().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "[[network]]\nname = \"a\"\nmode = \"warp\"\n").unwrap();
        let f = file.to_str().unwrap();
        let ctl = dir.path().join("c.sock");
        let ctl = ctl.to_str().unwrap();
        assert_eq!(
            main_with(["virtnetd", "--config", f, "--control-socket", ctl]),
            EXIT_CONFIG
        );
        assert_eq!(
            main_with(["virtnetd", "--config", "/nonexistent/x.toml"]),
            EXIT_CONFIG
        );
        assert_eq!(main_with(["virtnetd", "--bogus"]), EXIT_CONFIG);
    }

    #[test]
    fn check_config_and_print_default_exit_0() {
        let dir = tempfile::TempDir::new().unwrap();
        let file = dir.path().join("ok.toml");
        std::fs::write(
            &file,
            format!(
                "control_socket = \"{0}/c.sock\"\n[[network]]\nname = \"a\"\nmode = \"internal\"\n[[network.port]]\nsocket = \"{0}/a.sock\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let f = file.to_str().unwrap();
        assert_eq!(
            main_with(["virtnetd", "--config", f, "--check-config"]),
            EXIT_OK
        );
        assert_eq!(main_with(["virtnetd", "--print-default-config"]), EXIT_OK);
    }

    #[test]
    fn client_without_daemon_exits_1() {
        let dir = tempfile::TempDir::new().unwrap();
        let ctl = dir.path().join("none.sock");
        let ctl = ctl.to_str().unwrap();
        assert_eq!(
            main_with(["virtnetd", "stats", "--control", ctl]),
            EXIT_RUNTIME
        );
        assert_eq!(
            main_with(["virtnetd", "ping", "--control", ctl]),
            EXIT_RUNTIME
        );
    }

    #[test]
    fn error_line_joins_sources() {
        let e = config::Error::Read {
            path: "/x.toml".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(
            error_line(&e),
            "/x.toml: Cannot read the config file: entity not found"
        );
    }
}
