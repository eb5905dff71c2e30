//! The daemon's configuration: the TOML file, the built-in default, and validation.
//!
//! The file deserialises straight into [`Config`] (unknown keys are errors). [`Config::validate`]
//! then checks everything a typo or a clash could break and names the offending key, e.g.
//! `network[0].port[1].mac`. Validation also prepares the socket directories: a missing
//! directory is created when its parent is writable.
//!
//! ```toml
//! control_socket = "/run/virtnet/control.sock"   # optional
//! log_level = "info"                              # optional; RUST_LOG wins
//!
//! [[network]]
//! name = "lab"
//! mode = "internal"          # internal | host-only | nat | bridged | null (tests)
//! # subnet, dhcp, host_interface, ipv6_prefix: see mode_hostonly
//! # uplink, uplink_vlan, uplink_queues: see mode_bridged
//! mtu = 1500                 # optional, 68..=65535
//! ageing_secs = 300          # optional, FDB ageing
//!
//! [[network.port]]
//! socket = "/run/virtnet/lab-0.sock"   # virtnetd listens here
//! name = "lab-0"                       # optional, default "<network>-<index>"
//! mac = "52:54:00:12:34:01"            # optional
//! queue_pairs = 1                      # optional, 1..=16
//! queue_size = 256                     # optional, power of two <= 1024
//! vlan = 10                            # optional access VLAN, 1..=4094
//! ```

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtnet_switch::frame::ParseMacError;
use virtnet_switch::MacAddr;

use crate::mode::{self, ModeError};
use crate::sys;

/// Where the control socket lives unless configured otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/virtnet/control.sock";
/// Default log level when neither `log_level` nor `RUST_LOG` say otherwise.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default network MTU.
pub const DEFAULT_MTU: u32 = 1500;
/// Smallest MTU accepted (the IPv4 minimum).
pub const MIN_MTU: u32 = 68;
/// Largest MTU accepted.
pub const MAX_MTU: u32 = 65535;
/// Default virtqueue size.
pub const DEFAULT_QUEUE_SIZE: u32 = 256;
/// Largest virtqueue size accepted.
pub const MAX_QUEUE_SIZE: u32 = 1024;
/// Longest configurable busy-poll window (µs).
pub const MAX_BUSY_POLL_US: u64 = 1000;
/// Default number of queue pairs.
pub const DEFAULT_QUEUE_PAIRS: u32 = 1;
/// Largest number of queue pairs accepted.
pub const MAX_QUEUE_PAIRS: u32 = 16;
/// Default FDB ageing time in seconds (802.1D).
pub const DEFAULT_AGEING_SECS: u64 = 300;
/// Largest FDB ageing time accepted (one day).
pub const MAX_AGEING_SECS: u64 = 86_400;
/// Lowest and highest access VLAN id.
pub const VLAN_RANGE: (u32, u32) = (1, 4094);
/// `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;
/// Longest network or port name.
pub const MAX_NAME_LEN: usize = 32;

/// Errors of loading or validating a configuration. Every validation error names its key.
#[derive(Debug, Error)]
pub enum Error {
    /// The file could not be read.
    #[error("{}: Cannot read the config file", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is not valid TOML or does not have the expected shape.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The TOML parser's message.
        message: String,
    },
    /// `mode` is not a mode virtnet knows, or not one implemented yet.
    #[error("{key}")]
    Mode {
        /// The key, e.g. `network[0].mode`.
        key: String,
        /// Why.
        #[source]
        source: ModeError,
    },
    /// A network or port name is empty, too long or has odd characters.
    #[error(
        "{key}: Invalid name {name:?}: use 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 _ . -"
    )]
    BadName {
        /// The key.
        key: String,
        /// The name.
        name: String,
    },
    /// Two networks have the same name.
    #[error("{key}: Duplicate network name {name:?}, already used by {first}")]
    DuplicateNetwork {
        /// The key of the second one.
        key: String,
        /// The name.
        name: String,
        /// The key of the first one.
        first: String,
    },
    /// Two ports of a network have the same name.
    #[error("{key}: Duplicate port name {name:?}, already used by {first}")]
    DuplicatePortName {
        /// The key of the second one.
        key: String,
        /// The name.
        name: String,
        /// The key of the first one.
        first: String,
    },
    /// Two sockets (ports or the control socket) have the same path.
    #[error("{key}: Duplicate socket {}, already used by {first}", path.display())]
    DuplicateSocket {
        /// The key of the second one.
        key: String,
        /// The path.
        path: PathBuf,
        /// The key of the first one.
        first: String,
    },
    /// A socket path is empty or too long for `sun_path`.
    #[error("{key}: Invalid socket path {path:?}: must be 1 to {MAX_SOCKET_PATH} bytes")]
    BadSocketPath {
        /// The key.
        key: String,
        /// The path.
        path: PathBuf,
    },
    /// Something that is not a socket is in the way of a socket.
    #[error("{key}: {} exists and is not a socket", path.display())]
    NotASocket {
        /// The key.
        key: String,
        /// The path.
        path: PathBuf,
    },
    /// A socket's directory is missing and cannot be created.
    #[error("{key}: Cannot create socket directory {}", dir.display())]
    SocketDirCreate {
        /// The key.
        key: String,
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A socket's directory exists but is not a writable directory.
    #[error("{key}: Socket directory {} is not a writable directory", dir.display())]
    SocketDirNotWritable {
        /// The key.
        key: String,
        /// The directory.
        dir: PathBuf,
    },
    /// A MAC address does not parse.
    #[error("{key}")]
    BadMac {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: ParseMacError,
    },
    /// A MAC address is multicast or all zeroes.
    #[error("{key}: MAC address {mac} is not a unicast station address")]
    NotUnicastMac {
        /// The key.
        key: String,
        /// The address.
        mac: MacAddr,
    },
    /// Two ports of a network have the same MAC address.
    #[error("{key}: Duplicate MAC address {mac}, already used by {first}")]
    DuplicateMac {
        /// The key of the second one.
        key: String,
        /// The address.
        mac: MacAddr,
        /// The key of the first one.
        first: String,
    },
    /// A number is outside its range.
    #[error("{key}: {value} is out of range {min}..={max}")]
    OutOfRange {
        /// The key.
        key: String,
        /// The value.
        value: u64,
        /// Smallest accepted.
        min: u64,
        /// Largest accepted.
        max: u64,
    },
    /// A queue size is not a power of two, or too large.
    #[error("{key}: {value} is not a power of two up to {MAX_QUEUE_SIZE}")]
    BadQueueSize {
        /// The key.
        key: String,
        /// The value.
        value: u32,
    },
    /// A network's addressing or services keys are wrong (host-only, DHCP).
    #[error("{key}")]
    Network {
        /// The key, e.g. `network[0].dhcp`.
        key: String,
        /// Why.
        #[source]
        source: crate::mode_hostonly::NetError,
    },
    /// A network's NAT keys are wrong.
    #[error("{key}")]
    Nat {
        /// The key, e.g. `network[0].nat`.
        key: String,
        /// Why.
        #[source]
        source: crate::mode_nat::NatError,
    },
    /// A network's bridged keys are wrong (uplink, uplink_vlan, uplink_queues).
    #[error("{key}")]
    Bridged {
        /// The key, e.g. `network[0].uplink`.
        key: String,
        /// Why.
        #[source]
        source: crate::mode_bridged::BridgedError,
    },
    /// `socket_mode` is not an octal permission like "0660".
    #[error("{key}: Invalid mode {value:?}: expected octal permissions like \"0660\"")]
    BadSocketMode {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// `socket_group` names no group of this host.
    #[error("{key}: No group {value:?} on this host")]
    BadSocketGroup {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// `log_level` is not a valid filter.
    #[error("{key}: Invalid log level {value:?}")]
    BadLogLevel {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Why.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}
fn default_log_level() -> String {
    DEFAULT_LOG_LEVEL.to_string()
}
fn default_mtu() -> u32 {
    DEFAULT_MTU
}
fn default_ageing_secs() -> u64 {
    DEFAULT_AGEING_SECS
}
fn default_queue_pairs() -> u32 {
    DEFAULT_QUEUE_PAIRS
}
fn default_queue_size() -> u32 {
    DEFAULT_QUEUE_SIZE
}

/// Everything virtnetd runs: the networks and the control socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Unix stream socket of the control API (`stats`, `ping`).
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or `tracing` directives);
    /// `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Permissions of the vhost-user sockets, octal (`"0660"`: a VMM in `socket_group` may
    /// connect). Default: as created (0755 under root's usual umask: only root connects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_mode: Option<String>,
    /// Group of the vhost-user sockets, by name or number (e.g. `"kvm"`, `"libvirt-qemu"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// The networks, `[[network]]` in the file.
    #[serde(default, rename = "network")]
    pub networks: Vec<NetworkConfig>,
}

/// Who may connect to the vhost-user sockets: `socket_mode` and `socket_group`, resolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketPerms {
    /// Permission bits to set.
    pub mode: Option<u32>,
    /// Group id to set.
    pub gid: Option<u32>,
}

/// One network: a switch in some mode, and its guest ports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Unique name.
    pub name: String,
    /// `internal` (VMs only), or `null` (internal plus a port that swallows frames; for tests).
    /// `host-only` (a host TAP + DHCP, see [`crate::mode_hostonly`]); `bridged` (an AF_PACKET
    /// uplink, see [`crate::mode_bridged`]); `nat` (a NAT gateway, see [`crate::mode_nat`]).
    pub mode: String,
    /// MTU offered to the guests (VIRTIO_NET_F_MTU).
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Seconds after which the switch forgets an unseen MAC.
    #[serde(default = "default_ageing_secs")]
    pub ageing_secs: u64,
    /// IPv4 subnet (host-only: default 192.168.56.0/24; the host has the first address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// DHCP server settings (host-only: on by default; internal: off unless present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<crate::mode_hostonly::DhcpSpec>,
    /// Host TAP interface of a host-only network (default `vt-<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_interface: Option<String>,
    /// IPv6 /64 prefix advertised for SLAAC (router advertisements).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_prefix: Option<String>,
    /// Host NIC of a bridged network (see [`crate::mode_bridged`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// 802.1Q VLAN id a bridged network's frames carry on the uplink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_vlan: Option<u32>,
    /// Reader threads on the uplink (PACKET_FANOUT), default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_queues: Option<u32>,
    /// NAT gateway settings of a `nat` network (see [`crate::mode_nat`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<crate::mode_nat::NatSpec>,
    /// Guest ports, `[[network.port]]` in the file.
    #[serde(default, rename = "port")]
    pub ports: Vec<PortSpec>,
}

/// One guest port: a vhost-user virtio-net device listening on a socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// The vhost-user socket virtnetd listens on (the VMM connects).
    pub socket: PathBuf,
    /// Name for logs and stats; default `<network>-<index>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// MAC address in the device's config space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Queue pairs offered (VIRTIO_NET_F_MQ when more than one).
    #[serde(default = "default_queue_pairs")]
    pub queue_pairs: u32,
    /// Maximum virtqueue size.
    #[serde(default = "default_queue_size")]
    pub queue_size: u32,
    /// Access VLAN; none means the untagged default VLAN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u32>,
    /// Longest busy-poll of an idle TX queue before its worker sleeps on the guest's kick, in
    /// microseconds (0: never poll; trades CPU for latency and frame rate under load).
    /// Default: `VIRTNET_BUSY_POLL_US`, else 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy_poll_us: Option<u32>,
}

impl PortSpec {
    /// A port on `socket` with every other setting at its default.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        PortSpec {
            socket: socket.into(),
            name: None,
            mac: None,
            queue_pairs: DEFAULT_QUEUE_PAIRS,
            queue_size: DEFAULT_QUEUE_SIZE,
            vlan: None,
            busy_poll_us: None,
        }
    }

    /// `queue_pairs` for the device (validation keeps it in 1..=16).
    pub fn queue_pairs_u16(&self) -> u16 {
        u16::try_from(self.queue_pairs).unwrap_or(1)
    }

    /// `queue_size` for the device (validation keeps it a power of two <= 1024).
    pub fn queue_size_u16(&self) -> u16 {
        u16::try_from(self.queue_size).unwrap_or(256)
    }

    /// `vlan` for the switch (validation keeps it in 1..=4094).
    pub fn vlan_u16(&self) -> Option<u16> {
        self.vlan.and_then(|v| u16::try_from(v).ok())
    }

    /// The parsed MAC address, if one is configured and valid (validation rejects invalid ones).
    pub fn mac_addr(&self) -> Option<MacAddr> {
        self.mac.as_deref().and_then(|m| m.parse().ok())
    }
}

impl NetworkConfig {
    /// An internal network with no ports and default settings.
    pub fn internal(name: impl Into<String>) -> Self {
        NetworkConfig {
            name: name.into(),
            mode: mode::INTERNAL.to_string(),
            mtu: DEFAULT_MTU,
            ageing_secs: DEFAULT_AGEING_SECS,
            ports: Vec::new(),
            subnet: None,
            dhcp: None,
            host_interface: None,
            ipv6_prefix: None,
            uplink: None,
            uplink_vlan: None,
            uplink_queues: None,
            nat: None,
        }
    }

    /// The name of port `index`: its own, or `<network>-<index>`.
    pub fn port_name(&self, index: usize) -> String {
        match self.ports.get(index).and_then(|p| p.name.clone()) {
            Some(n) => n,
            None => format!("{}-{index}", self.name),
        }
    }

    /// The MTU as the device wants it (validation keeps it in range).
    pub fn mtu_u16(&self) -> u16 {
        u16::try_from(self.mtu).unwrap_or(u16::MAX)
    }
}

impl Default for Config {
    /// One internal network "default" with two ports under /run/virtnet.
    fn default() -> Self {
        // A NAT network with DHCP, like VMware's VMnet8 (see crate::mode_nat).
        let mut net = crate::mode_nat::default_network("default");
        for i in 0..2u8 {
            let mut port = PortSpec::new(format!("/run/virtnet/default-{i}.sock"));
            port.mac = Some(MacAddr([0x52, 0x54, 0, 0, 0, i + 1]).to_string());
            net.ports.push(port);
        }
        Config {
            control_socket: default_control_socket(),
            log_level: default_log_level(),
            socket_mode: None,
            socket_group: None,
            networks: vec![net],
        }
    }
}

/// Line and column (1-based) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn range(key: impl Into<String>, value: u64, min: u64, max: u64) -> Result<()> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(Error::OutOfRange {
            key: key.into(),
            value,
            min,
            max,
        })
    }
}

/// Check that `path` can become a listening socket: a sane length, nothing but a stale socket
/// in the way, and a writable directory (created if missing and the parent allows).
fn check_socket_path(key: &str, path: &Path) -> Result<()> {
    let len = path.as_os_str().len();
    if len == 0 || len > MAX_SOCKET_PATH {
        return Err(Error::BadSocketPath {
            key: key.into(),
            path: path.into(),
        });
    }
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::NotASocket {
                key: key.into(),
                path: path.into(),
            });
        }
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() && sys::dir_writable(dir) => Ok(()),
        Ok(_) => Err(Error::SocketDirNotWritable {
            key: key.into(),
            dir: dir.into(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|source| Error::SocketDirCreate {
                key: key.into(),
                dir: dir.into(),
                source,
            })
        }
        Err(source) => Err(Error::SocketDirCreate {
            key: key.into(),
            dir: dir.into(),
            source,
        }),
    }
}

impl Config {
    /// `socket_mode` and `socket_group`, resolved (the group by name through the host's
    /// group database).
    pub fn socket_perms(&self) -> Result<SocketPerms> {
        let mode = match &self.socket_mode {
            None => None,
            Some(v) => {
                let digits = v.trim().trim_start_matches("0o");
                let m = u32::from_str_radix(digits, 8)
                    .ok()
                    .filter(|&m| m <= 0o777 && !digits.is_empty());
                Some(m.ok_or_else(|| Error::BadSocketMode {
                    key: "socket_mode".into(),
                    value: v.clone(),
                })?)
            }
        };
        let gid = match &self.socket_group {
            None => None,
            Some(g) => {
                let gid = g
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .or_else(|| crate::sys::group_id(g.trim()));
                Some(gid.ok_or_else(|| Error::BadSocketGroup {
                    key: "socket_group".into(),
                    value: g.clone(),
                })?)
            }
        };
        Ok(SocketPerms { mode, gid })
    }

    /// Parse TOML text; `origin` names the file in error messages. Does not validate.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config> {
        toml::from_str(text).map_err(|e| {
            let (line, column) = line_col(text, e.span().map_or(0, |s| s.start));
            Error::Parse {
                path: origin.into(),
                line,
                column,
                message: e.message().trim().replace('\n', " "),
            }
        })
    }

    /// Read and parse a TOML file. Does not validate.
    pub fn load(path: &Path) -> Result<Config> {
        let text = fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// The configuration as TOML (what `--print-default-config` prints).
    pub fn to_toml(&self) -> String {
        // Every field is a string, a number, a path or a table of those: this cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// Check every key; create missing socket directories. The first problem found is returned.
    pub fn validate(&self) -> Result<()> {
        tracing_subscriber::EnvFilter::try_new(&self.log_level).map_err(|source| {
            Error::BadLogLevel {
                key: "log_level".into(),
                value: self.log_level.clone(),
                source,
            }
        })?;
        check_socket_path("control_socket", &self.control_socket)?;
        self.socket_perms()?;
        let mut sockets: HashMap<&Path, String> = HashMap::new();
        sockets.insert(&self.control_socket, "control_socket".into());
        let mut names: HashMap<&str, String> = HashMap::new();

        for (i, net) in self.networks.iter().enumerate() {
            let nkey = format!("network[{i}]");
            if !valid_name(&net.name) {
                return Err(Error::BadName {
                    key: format!("{nkey}.name"),
                    name: net.name.clone(),
                });
            }
            if let Some(first) = names.insert(&net.name, format!("{nkey}.name")) {
                return Err(Error::DuplicateNetwork {
                    key: format!("{nkey}.name"),
                    name: net.name.clone(),
                    first,
                });
            }
            mode::check(&net.mode).map_err(|source| Error::Mode {
                key: format!("{nkey}.mode"),
                source,
            })?;
            range(
                format!("{nkey}.mtu"),
                net.mtu.into(),
                MIN_MTU.into(),
                MAX_MTU.into(),
            )?;
            range(
                format!("{nkey}.ageing_secs"),
                net.ageing_secs,
                1,
                MAX_AGEING_SECS,
            )?;

            let mut port_names: HashMap<String, String> = HashMap::new();
            let mut macs: HashMap<MacAddr, String> = HashMap::new();
            for (j, port) in net.ports.iter().enumerate() {
                let pkey = format!("{nkey}.port[{j}]");
                let name = net.port_name(j);
                if !valid_name(&name) {
                    return Err(Error::BadName {
                        key: format!("{pkey}.name"),
                        name,
                    });
                }
                if let Some(first) = port_names.insert(name.clone(), format!("{pkey}.name")) {
                    return Err(Error::DuplicatePortName {
                        key: format!("{pkey}.name"),
                        name,
                        first,
                    });
                }
                let skey = format!("{pkey}.socket");
                if let Some(first) = sockets.get(port.socket.as_path()) {
                    return Err(Error::DuplicateSocket {
                        key: skey,
                        path: port.socket.clone(),
                        first: first.clone(),
                    });
                }
                check_socket_path(&skey, &port.socket)?;
                sockets.insert(&port.socket, skey);

                if let Some(text) = &port.mac {
                    let key = format!("{pkey}.mac");
                    let mac: MacAddr = text.parse().map_err(|source| Error::BadMac {
                        key: key.clone(),
                        source,
                    })?;
                    if !mac.is_unicast() {
                        return Err(Error::NotUnicastMac { key, mac });
                    }
                    if let Some(first) = macs.insert(mac, key.clone()) {
                        return Err(Error::DuplicateMac { key, mac, first });
                    }
                }
                range(
                    format!("{pkey}.queue_pairs"),
                    port.queue_pairs.into(),
                    1,
                    MAX_QUEUE_PAIRS.into(),
                )?;
                if !port.queue_size.is_power_of_two() || port.queue_size > MAX_QUEUE_SIZE {
                    return Err(Error::BadQueueSize {
                        key: format!("{pkey}.queue_size"),
                        value: port.queue_size,
                    });
                }
                if let Some(vlan) = port.vlan {
                    range(
                        format!("{pkey}.vlan"),
                        vlan.into(),
                        VLAN_RANGE.0.into(),
                        VLAN_RANGE.1.into(),
                    )?;
                }
                if let Some(us) = port.busy_poll_us {
                    range(
                        format!("{pkey}.busy_poll_us"),
                        us.into(),
                        0,
                        MAX_BUSY_POLL_US,
                    )?;
                }
            }
        }
        crate::mode_nat::validate_all(&self.networks)
            .map_err(|(key, source)| Error::Nat { key, source })?;
        let effective: Vec<NetworkConfig> = self
            .networks
            .iter()
            .map(crate::mode_nat::effective)
            .collect();
        crate::mode_hostonly::validate_all(&effective)
            .map_err(|(key, source)| Error::Network { key, source })?;
        crate::mode_bridged::validate_all(&self.networks)
            .map_err(|(key, source)| Error::Bridged { key, source })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use assert_matches::assert_matches;
    use tempfile::TempDir;

    /// A config text with `{dir}` replaced by a temp dir, parsed and validated.
    fn check(dir: &TempDir, text: &str) -> Result<Config> {
        let text = text.replace("{dir}", dir.path().to_str().unwrap());
        let text = format!(
            "control_socket = \"{}/ctl.sock\"\n{text}",
            dir.path().display()
        );
        let cfg = Config::from_toml(&text, Path::new("test.toml"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    const LAB: &str = r#"
[[network]]
name = "lab"
mode = "internal"

[[network.port]]
socket = "{dir}/lab-0.sock"
mac = "52:54:00:12:34:01"
queue_pairs = 1

[[network.port]]
socket = "{dir}/lab-1.sock"
"#;

    #[test]
    fn brief_example_parses_with_defaults() {
        let dir = TempDir::new().unwrap();
        let cfg = check(&dir, LAB).unwrap();
        assert_eq!(cfg.networks.len(), 1);
        let net = &cfg.networks[0];
        assert_eq!(net.mode, "internal");
        assert_eq!(net.mtu, DEFAULT_MTU);
        assert_eq!(net.ageing_secs, DEFAULT_AGEING_SECS);
        assert_eq!(net.ports.len(), 2);
        assert_eq!(
            net.ports[0].mac_addr(),
            Some(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 1]))
        );
        assert_eq!(net.ports[1].mac, None);
        assert_eq!(net.ports[1].queue_size, DEFAULT_QUEUE_SIZE);
        assert_eq!(net.ports[1].queue_pairs, DEFAULT_QUEUE_PAIRS);
        assert_eq!(net.port_name(0), "lab-0");
        assert_eq!(cfg.log_level, "info");
    }

    #[test]
    fn all_keys_parse() {
        let dir = TempDir::new().unwrap();
        let cfg = check(
            &dir,
            r#"
log_level = "debug,virtnet_virtio=trace"
[[network]]
name = "a"
mode = "internal"
mtu = 9000
ageing_secs = 60
[[network.port]]
socket = "{dir}/a.sock"
name = "vm-a"
mac = "52-54-00-00-00-0a"
queue_pairs = 4
queue_size = 1024
vlan = 4094
[[network]]
name = "b"
mode = "null"
"#,
        )
        .unwrap();
        let p = &cfg.networks[0].ports[0];
        assert_eq!(cfg.networks[0].port_name(0), "vm-a");
        assert_eq!((p.queue_pairs, p.queue_size, p.vlan), (4, 1024, Some(4094)));
        assert_eq!(cfg.networks[0].mtu_u16(), 9000);
        assert!(cfg.networks[1].ports.is_empty());
    }

    #[test]
    fn default_config_round_trips_through_toml() {
        let cfg = Config::default();
        assert_eq!(cfg.networks[0].name, "default");
        assert_eq!(cfg.networks[0].ports.len(), 2);
        assert_eq!(
            cfg.networks[0].ports[1].socket,
            Path::new("/run/virtnet/default-1.sock")
        );
        assert_eq!(
            cfg.networks[0].ports[1].mac.as_deref(),
            Some("52:54:00:00:00:02")
        );
        let text = cfg.to_toml();
        assert!(text.contains("[[network]]"), "{text}");
        assert!(text.contains("[[network.port]]"), "{text}");
        let back = Config::from_toml(&text, Path::new("x")).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn rejects_unknown_mode() {
        let dir = TempDir::new().unwrap();
        let e = check(&dir, "[[network]]\nname = \"n\"\nmode = \"turbo\"\n").unwrap_err();
        assert_matches!(&e, Error::Mode { key, source: ModeError::Unknown(m) }
            if key == "network[0].mode" && m == "turbo");
    }

    #[test]
    fn rejects_unimplemented_modes() {
        let dir = TempDir::new().unwrap();
        for m in mode::NOT_YET {
            let e = check(
                &dir,
                &format!("[[network]]\nname = \"n\"\nmode = \"{m}\"\n"),
            )
            .unwrap_err();
            assert_matches!(&e, Error::Mode { source: ModeError::NotImplemented(x), .. } if x == m);
            assert!(e.to_string().starts_with("network[0].mode"), "{e}");
        }
    }

    #[test]
    fn bridged_network_parses_and_checks_its_keys() {
        let dir = TempDir::new().unwrap();
        let cfg = check(
            &dir,
            "[[network]]\nname = \"lan\"\nmode = \"bridged\"\nuplink = \"eth1\"\nuplink_vlan = 100\n",
        )
        .unwrap();
        assert_eq!(cfg.networks[0].uplink.as_deref(), Some("eth1"));
        assert_eq!(cfg.networks[0].uplink_vlan, Some(100));
        let e = check(&dir, "[[network]]\nname = \"lan\"\nmode = \"bridged\"\n").unwrap_err();
        assert_matches!(&e, Error::Bridged { key, source: crate::mode_bridged::BridgedError::NoUplink }
            if key == "network[0].uplink");
    }

    #[test]
    fn rejects_duplicate_socket_across_networks() {
        let dir = TempDir::new().unwrap();
        let e = check(
            &dir,
            r#"
[[network]]
name = "a"
mode = "internal"
[[network.port]]
socket = "{dir}/x.sock"
[[network]]
name = "b"
mode = "internal"
[[network.port]]
socket = "{dir}/y.sock"
[[network.port]]
socket = "{dir}/x.sock"
"#,
        )
        .unwrap_err();
        assert_matches!(&e, Error::DuplicateSocket { key, first, .. }
            if key == "network[1].port[1].socket" && first == "network[0].port[0].socket");
    }

    #[test]
    fn rejects_port_socket_equal_to_control_socket() {
        let dir = TempDir::new().unwrap();
        let e = check(
            &dir,
            "[[network]]\nname = \"a\"\nmode = \"internal\"\n[[network.port]]\nsocket = \"{dir}/ctl.sock\"\n",
        )
        .unwrap_err();
        assert_matches!(&e, Error::DuplicateSocket { first, .. } if first == "control_socket");
    }

    #[test]
    fn rejects_duplicate_network_name() {
        let dir = TempDir::new().unwrap();
        let e = check(
            &dir,
            "[[network]]\nname = \"a\"\nmode = \"internal\"\n[[network]]\nname = \"a\"\nmode = \"internal\"\n",
        )
        .unwrap_err();
        assert_matches!(&e, Error::DuplicateNetwork { key, name, first }
            if key == "network[1].name" && name == "a" && first == "network[0].name");
    }

    #[test]
    fn rejects_bad_names() {
        let dir = TempDir::new().unwrap();
        let e = check(&dir, "[[network]]\nname = \"\"\nmode = \"internal\"\n").unwrap_err();
        assert_matches!(&e, Error::BadName { key, .. } if key == "network[0].name");
        let e = check(
            &dir,
            "[[network]]\nname = \"a\"\nmode = \"internal\"\n[[network.port]]\nsocket = \"{dir}/a\"\nname = \"a b\"\n",
        )
        .unwrap_err();
        assert_matches!(&e, Error::BadName { key, .. } if key == "network[0].port[0].name");
    }

    #[test]
    fn rejects_duplicate_port_name() {
        let dir = TempDir::new().unwrap();
        let e = check(
            &dir,
            r#"
[[network]]
name = "a"
mode = "internal"
[[network.port]]
socket = "{dir}/0.sock"
[[network.port]]
socket = "{dir}/1.sock"
name = "a-0"
"#,
        )
        .unwrap_err();
        assert_matches!(&e, Error::DuplicatePortName { key, .. } if key == "network[0].port[1].name");
    }

    fn one_port(extra: &str) -> String {
        format!(
            "[[network]]\nname = \"lab\"\nmode = \"internal\"\n[[network.port]]\nsocket = \"{{dir}}/p0.sock\"\n[[network.port]]\nsocket = \"{{dir}}/p1.sock\"\n{extra}\n"
        )
    }

    #[test]
    fn rejects_bad_mac() {
        let dir = TempDir::new().unwrap();
        let e = check(&dir, &one_port("mac = \"zz\"")).unwrap_err();
        assert_matches!(&e, Error::BadMac { key, .. } if key == "network[0].port[1].mac");
        let line = crate::error_line(&e);
        assert!(
            line.starts_with("network[0].port[1].mac: Invalid MAC address \"zz\""),
            "{line}"
        );
        let e = check(&dir, &one_port("mac = \"01:00:5e:00:00:01\"")).unwrap_err();
        assert_matches!(&e, Error::NotUnicastMac { key, .. } if key == "network[0].port[1].mac");
    }

    #[test]
    fn rejects_duplicate_mac() {
        let dir = TempDir::new().unwrap();
        let text = one_port("mac = \"52:54:00:00:00:01\"")
            .replace("p0.sock\"\n", "p0.sock\"\nmac = \"52:54:00:00:00:01\"\n");
        let e = check(&dir, &text).unwrap_err();
        assert_matches!(&e, Error::DuplicateMac { key, first, .. }
            if key == "network[0].port[1].mac" && first == "network[0].port[0].mac");
    }

    #[test]
    fn same_mac_on_two_networks_is_fine() {
        let dir = TempDir::new().unwrap();
        check(
            &dir,
            r#"
[[network]]
name = "a"
mode = "internal"
[[network.port]]
socket = "{dir}/a.sock"
mac = "52:54:00:00:00:01"
[[network]]
name = "b"
mode = "internal"
[[network.port]]
socket = "{dir}/b.sock"
mac = "52:54:00:00:00:01"
"#,
        )
        .unwrap();
    }

    #[test]
    fn rejects_queue_pairs_out_of_range() {
        let dir = TempDir::new().unwrap();
        for v in [0, 17, 65537] {
            let e = check(&dir, &one_port(&format!("queue_pairs = {v}"))).unwrap_err();
            assert_matches!(&e, Error::OutOfRange { key, value, min: 1, max: 16 }
                if key == "network[0].port[1].queue_pairs" && *value == v);
        }
        check(&dir, &one_port("queue_pairs = 16")).unwrap();
    }

    #[test]
    fn rejects_bad_queue_size() {
        let dir = TempDir::new().unwrap();
        for v in [0, 100, 2048, 1 << 20] {
            let e = check(&dir, &one_port(&format!("queue_size = {v}"))).unwrap_err();
            assert_matches!(&e, Error::BadQueueSize { key, value }
                if key == "network[0].port[1].queue_size" && *value == v);
        }
        check(&dir, &one_port("queue_size = 64")).unwrap();
    }

    #[test]
    fn rejects_mtu_out_of_range() {
        let dir = TempDir::new().unwrap();
        for v in [67u64, 65536] {
            let e = check(
                &dir,
                &format!("[[network]]\nname = \"a\"\nmode = \"internal\"\nmtu = {v}\n"),
            )
            .unwrap_err();
            assert_matches!(&e, Error::OutOfRange { key, value, min: 68, max: 65535 }
                if key == "network[0].mtu" && *value == v);
        }
    }

    #[test]
    fn rejects_vlan_out_of_range() {
        let dir = TempDir::new().unwrap();
        for v in [0u64, 4095, 70000] {
            let e = check(&dir, &one_port(&format!("vlan = {v}"))).unwrap_err();
            assert_matches!(&e, Error::OutOfRange { key, value, min: 1, max: 4094 }
                if key == "network[0].port[1].vlan" && *value == v);
        }
    }

    #[test]
    fn busy_poll_in_range() {
        let dir = TempDir::new().unwrap();
        let c = check(&dir, &one_port("busy_poll_us = 0")).unwrap();
        assert_eq!(c.networks[0].ports[1].busy_poll_us, Some(0));
        let e = check(&dir, &one_port("busy_poll_us = 5000")).unwrap_err();
        assert_matches!(&e, Error::OutOfRange { key, value: 5000, min: 0, max: 1000 }
            if key == "network[0].port[1].busy_poll_us");
    }

    #[test]
    fn rejects_bad_ageing() {
        let dir = TempDir::new().unwrap();
        let e = check(
            &dir,
            "[[network]]\nname = \"a\"\nmode = \"internal\"\nageing_secs = 0\n",
        )
        .unwrap_err();
        assert_matches!(&e, Error::OutOfRange { key, .. } if key == "network[0].ageing_secs");
    }

    #[test]
    fn creates_missing_socket_dir() {
        let dir = TempDir::new().unwrap();
        let text = one_port("").replace("{dir}/p1.sock", "{dir}/new/sub/p1.sock");
        check(&dir, &text).unwrap();
        assert!(dir.path().join("new/sub").is_dir());
    }

    #[test]
    fn rejects_uncreatable_socket_dir() {
        let dir = TempDir::new().unwrap();
        fs::write(dir.path().join("file"), b"x").unwrap();
        let text = one_port("").replace("{dir}/p1.sock", "{dir}/file/sub/p1.sock");
        let e = check(&dir, &text).unwrap_err();
        assert_matches!(&e, Error::SocketDirCreate { key, .. } if key == "network[0].port[1].socket");
    }

    #[test]
    fn rejects_socket_dir_that_is_a_file() {
        let dir = TempDir::new().unwrap();
        fs::write(dir.path().join("file"), b"x").unwrap();
        let text = one_port("").replace("{dir}/p1.sock", "{dir}/file/p1.sock");
        let e = check(&dir, &text).unwrap_err();
        assert_matches!(&e, Error::SocketDirNotWritable { key, .. } if key == "network[0].port[1].socket");
    }

    #[test]
    fn rejects_unwritable_socket_dir() {
        // Root may write anywhere except on a read-only file system; /proc is one of those.
        let dir = TempDir::new().unwrap();
        let text = one_port("").replace("{dir}/p1.sock", "/proc/self/p1.sock");
        let e = check(&dir, &text).unwrap_err();
        assert_matches!(&e, Error::SocketDirNotWritable { key, .. } if key == "network[0].port[1].socket");
    }

    #[test]
    fn rejects_non_socket_in_the_way() {
        let dir = TempDir::new().unwrap();
        fs::write(dir.path().join("p1.sock"), b"precious").unwrap();
        let e = check(&dir, &one_port("")).unwrap_err();
        assert_matches!(&e, Error::NotASocket { key, .. } if key == "network[0].port[1].socket");
    }

    #[test]
    fn rejects_too_long_socket_path() {
        let dir = TempDir::new().unwrap();
        let long = "x".repeat(120);
        let e = check(&dir, &one_port("").replace("p1.sock", &long)).unwrap_err();
        assert_matches!(&e, Error::BadSocketPath { key, .. } if key == "network[0].port[1].socket");
    }

    #[test]
    fn rejects_bad_control_socket_dir() {
        let cfg = Config {
            control_socket: "/proc/self/ctl.sock".into(),
            networks: vec![],
            ..Config::default()
        };
        assert_matches!(cfg.validate(), Err(Error::SocketDirNotWritable { key, .. }) if key == "control_socket");
    }

    #[test]
    fn socket_mode_and_group() {
        let dir = TempDir::new().unwrap();
        let c = check(&dir, "socket_mode = \"0660\"\nsocket_group = \"root\"\n").unwrap();
        assert_eq!(
            c.socket_perms().unwrap(),
            SocketPerms {
                mode: Some(0o660),
                gid: Some(0)
            }
        );
        let c = check(&dir, "socket_group = \"1234\"\n").unwrap();
        assert_eq!(c.socket_perms().unwrap().gid, Some(1234));
        for bad in ["\"0999\"", "\"rw\"", "\"01777\"", "\"\""] {
            let e = check(&dir, &format!("socket_mode = {bad}\n")).unwrap_err();
            assert_matches!(&e, Error::BadSocketMode { key, .. } if key == "socket_mode", "{bad}");
        }
        let e = check(&dir, "socket_group = \"no-such-group-here\"\n").unwrap_err();
        assert_matches!(&e, Error::BadSocketGroup { key, .. } if key == "socket_group");
        assert!(crate::error_line(&e).contains("no-such-group-here"));
    }

    #[test]
    fn rejects_bad_log_level() {
        let dir = TempDir::new().unwrap();
        let e = check(&dir, "log_level = \"info,[[[\"\n").unwrap_err();
        assert_matches!(&e, Error::BadLogLevel { key, .. } if key == "log_level");
    }

    #[test]
    fn rejects_unknown_keys_with_position() {
        let dir = TempDir::new().unwrap();
        let e = check(&dir, &one_port("sockte = \"x\"")).unwrap_err();
        assert_matches!(&e, Error::Parse { line: 9, column: 1, message, .. } if message.contains("sockte"));
        let line = e.to_string();
        assert!(
            line.starts_with("test.toml:9:1: unknown field `sockte`"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn rejects_unparsable_toml() {
        let dir = TempDir::new().unwrap();
        // Line 1 of the text is the control_socket line added by check().
        let e = check(&dir, "[[network]\nname = \"a\"\n").unwrap_err();
        assert_matches!(&e, Error::Parse { line: 2, .. });
        let e = check(&dir, "[[network]]\nname = \"a\"\n").unwrap_err();
        assert_matches!(&e, Error::Parse { message, .. } if message.contains("mode"));
        let e = check(&dir, &one_port("queue_pairs = -1")).unwrap_err();
        assert_matches!(
            &e,
            Error::Parse {
                line: 9,
                column: 15,
                ..
            }
        );
        let e = check(&dir, &one_port("vlan = \"ten\"")).unwrap_err();
        assert_matches!(
            &e,
            Error::Parse {
                line: 9,
                column: 8,
                ..
            }
        );
    }

    #[test]
    fn rejects_unreadable_file() {
        let dir = TempDir::new().unwrap();
        let e = Config::load(&dir.path().join("missing.toml")).unwrap_err();
        assert_matches!(&e, Error::Read { source, .. } if source.kind() == io::ErrorKind::NotFound);
        let e = Config::load(dir.path()).unwrap_err();
        assert_matches!(e, Error::Read { .. });
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 99), (1, 3));
    }
}
