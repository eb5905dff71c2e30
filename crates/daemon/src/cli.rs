//! Command line: clap `Args` → `TryFrom<Args> for Config` (validation).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, DEFAULT_CONTROL_SOCKET};

/// virtnetd: virtio-net devices for VMs (vhost-user) on software switches.
///
/// Without --config it runs one NAT network "default" (10.0.2.0/24, DHCP, DNS and gateway at
/// 10.0.2.2, like VMware's VMnet8) with two ports, /run/virtnet/default-0.sock and
/// default-1.sock, and prints the QEMU options to attach VMs.
#[derive(Parser, Debug, Clone, Default, PartialEq, Eq)]
#[command(name = "virtnetd", version, about, long_about)]
pub struct Args {
    /// TOML configuration file.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Control socket path (overrides `control_socket` from the file).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Log filter, e.g. `debug` (overrides `log_level`; RUST_LOG overrides both).
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Print the default configuration as TOML and exit.
    #[arg(long, conflicts_with = "config")]
    pub print_default_config: bool,

    /// Validate the configuration (creating missing socket directories) and exit.
    #[arg(long)]
    pub check_config: bool,

    /// Talk to a running daemon instead of starting one.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Client commands for a running daemon.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Print the daemon's networks, ports and counters as JSON.
    Stats {
        /// The daemon's control socket [default: --control-socket, else the --config file's
        /// `control_socket`, else /run/virtnet/control.sock].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
        /// Indent the JSON.
        #[arg(long)]
        pretty: bool,
    },
    /// Check that the daemon answers (prints "pong").
    Ping {
        /// The daemon's control socket [default: as for `stats`].
        #[arg(long, value_name = "PATH")]
        control: Option<PathBuf>,
    },
}

impl Args {
    /// The control socket a client command talks to: `--control`, else `--control-socket`,
    /// else the `--config` file's `control_socket`, else the default.
    pub fn client_control_socket(&self) -> config::Result<PathBuf> {
        let explicit = match &self.command {
            Some(Command::Stats { control, .. }) | Some(Command::Ping { control }) => {
                control.clone()
            }
            None => None,
        };
        if let Some(p) = explicit.or_else(|| self.control_socket.clone()) {
            return Ok(p);
        }
        match &self.config {
            Some(file) => Ok(Config::load(file)?.control_socket),
            None => Ok(PathBuf::from(DEFAULT_CONTROL_SOCKET)),
        }
    }
}

impl TryFrom<Args> for Config {
    type Error = config::Error;

    /// The file (or the default), with command-line overrides, validated.
    fn try_from(args: Args) -> config::Result<Config> {
        let mut config = match &args.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(p) = args.control_socket {
            config.control_socket = p;
        }
        if let Some(l) = args.log_level {
            config.log_level = l;
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use assert_matches::assert_matches;
    use std::path::Path;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("virtnetd").chain(args.iter().copied()))
    }

    #[test]
    fn parses_daemon_flags() {
        let a = parse(&[
            "--config",
            "/etc/v.toml",
            "--control-socket",
            "/tmp/c.sock",
            "--log-level",
            "debug",
        ])
        .unwrap();
        assert_eq!(a.config.as_deref(), Some(Path::new("/etc/v.toml")));
        assert_eq!(a.control_socket.as_deref(), Some(Path::new("/tmp/c.sock")));
        assert_eq!(a.log_level.as_deref(), Some("debug"));
        assert_eq!(a.command, None);
        assert_eq!(parse(&[]).unwrap(), Args::default());
    }

    #[test]
    fn parses_client_commands() {
        let a = parse(&["stats"]).unwrap();
        assert_eq!(
            a.command,
            Some(Command::Stats {
                control: None,
                pretty: false
            })
        );
        assert_eq!(
            a.client_control_socket().unwrap(),
            Path::new(DEFAULT_CONTROL_SOCKET)
        );
        let a = parse(&["stats", "--control", "/x.sock", "--pretty"]).unwrap();
        assert_eq!(
            a.command,
            Some(Command::Stats {
                control: Some("/x.sock".into()),
                pretty: true
            })
        );
        assert_eq!(a.client_control_socket().unwrap(), Path::new("/x.sock"));
        let a = parse(&["--control-socket", "/y.sock", "ping"]).unwrap();
        assert_eq!(a.client_control_socket().unwrap(), Path::new("/y.sock"));
        assert_matches!(
            parse(&["ping"]).unwrap().command,
            Some(Command::Ping { .. })
        );
    }

    #[test]
    fn client_finds_control_socket_in_config_file() {
        let dir = tempfile::TempDir::new().unwrap();
        let file = dir.path().join("v.toml");
        std::fs::write(&file, "control_socket = \"/z/c.sock\"\n").unwrap();
        let a = parse(&["--config", file.to_str().unwrap(), "stats"]).unwrap();
        assert_eq!(a.client_control_socket().unwrap(), Path::new("/z/c.sock"));
        let a = parse(&["--config", "/nonexistent.toml", "stats"]).unwrap();
        assert_matches!(a.client_control_socket(), Err(config::Error::Read { .. }));
    }

    #[test]
    fn rejects_bad_command_lines() {
        assert!(parse(&["--bogus"]).is_err());
        assert!(parse(&["--print-default-config", "--config", "x"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
    }

    #[test]
    fn overrides_apply_and_are_validated() {
        let dir = tempfile::TempDir::new().unwrap();
        let file = dir.path().join("v.toml");
        std::fs::write(
            &file,
            format!(
                "[[network]]\nname = \"a\"\nmode = \"internal\"\n[[network.port]]\nsocket = \"{}/a.sock\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let ctl = dir.path().join("c.sock");
        let args = Args {
            config: Some(file.clone()),
            control_socket: Some(ctl.clone()),
            log_level: Some("warn".into()),
            ..Args::default()
        };
        let cfg = Config::try_from(args).unwrap();
        assert_eq!(cfg.control_socket, ctl);
        assert_eq!(cfg.log_level, "warn");
        assert_eq!(cfg.networks[0].name, "a");

        let bad = Args {
            config: Some(file),
            control_socket: Some(ctl),
            log_level: Some("[[".into()),
            ..Args::default()
        };
        assert_matches!(
            Config::try_from(bad),
            Err(config::Error::BadLogLevel { .. })
        );
        let missing = Args {
            config: Some(dir.path().join("nope.toml")),
            ..Args::default()
        };
        assert_matches!(Config::try_from(missing), Err(config::Error::Read { .. }));
    }
}
