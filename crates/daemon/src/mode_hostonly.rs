//! `host-only` networks (VMware's VMnet1) and the network services of `internal` ones.
//!
//! A host-only network is a switch plus a host TAP interface (`host_interface`, default
//! `vt-<network>`) holding the subnet's first address, plus the services port
//! (virtnet-services) at the subnet's last host address with DHCP on by default. Nothing is
//! routed anywhere: the host reaches the guests and the guests reach the host.
//! An `internal` network gets the same services when it has a `dhcp` table (off by default),
//! at the subnet's first address.
//!
//! ```toml
//! [[network]]
//! name = "vmnet1"
//! mode = "host-only"
//! subnet = "192.168.56.0/24"        # default for host-only; required for internal + dhcp
//! host_interface = "vnet1"          # default "vt-<name>" (15 characters at most)
//! ipv6_prefix = "fd00:56::/64"      # optional: router advertisements for SLAAC
//! dhcp = { range = "192.168.56.100-192.168.56.199", lease_secs = 3600,
//!          reservations = [{ mac = "52:54:00:00:00:0a", ip = "192.168.56.10" }],
//!          dns = ["192.168.56.1"], domain = "lab", max_leases_per_port = 4,
//!          lease_file = "/var/lib/virtnet/vmnet1.leases", enabled = true }
//! ```

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtnet_port_tap::{TapConfig, TapPort};
use virtnet_services::{DhcpConfig, RaConfig, ServicesConfig, ServicesPort};
use virtnet_switch::{MacAddr, Switch};

use crate::config::NetworkConfig;
use crate::mode::{ModeError, ModePort, NetMode, INTERNAL};

/// The mode's name in the config file.
pub const HOST_ONLY: &str = "host-only";
/// Subnet of a host-only network without a `subnet` key (VirtualBox's default).
pub const DEFAULT_HOST_ONLY_SUBNET: &str = "192.168.56.0/24";
/// Where lease files go unless `dhcp.lease_file` says otherwise.
pub const DEFAULT_LEASE_DIR: &str = "/var/lib/virtnet";
/// Seconds between unsolicited router advertisements.
pub const RA_INTERVAL_SECS: u64 = 60;

/// Errors of a network's addressing and services keys. Messages name no key: the config
/// error that wraps them does.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NetError {
    /// `subnet` does not parse.
    #[error("Invalid subnet {0:?}: expected an IPv4 network like 192.168.56.0/24")]
    BadSubnet(String),
    /// The subnet is too small for a host, a server and a guest.
    #[error("Subnet {0} is too small: use a prefix of /29 or shorter")]
    SmallSubnet(Ipv4Net),
    /// A key that needs `subnet`.
    #[error("DHCP on an internal network needs a subnet")]
    NoSubnet,
    /// A key that only one mode has.
    #[error("Only host-only networks have a host interface")]
    NotHostOnly,
    /// `dhcp.range` does not parse.
    #[error("Invalid range {0:?}: expected FIRST-LAST, e.g. 192.168.56.100-192.168.56.199")]
    BadRange(String),
    /// An address key does not parse.
    #[error("Invalid IPv4 address {0:?}")]
    BadAddress(String),
    /// `ipv6_prefix` does not parse or is not a /64.
    #[error("Invalid IPv6 prefix {0:?}: expected a /64 like fd00:56::/64")]
    BadPrefix(String),
    /// A reservation's MAC does not parse.
    #[error("Invalid MAC address {0:?}")]
    BadMac(String),
    /// The DHCP settings are inconsistent.
    #[error("{0}")]
    Dhcp(String),
    /// The subnet overlaps another network's.
    #[error("Subnet {subnet} overlaps {other} of {first}")]
    Overlap {
        /// This subnet.
        subnet: Ipv4Net,
        /// The other.
        other: Ipv4Net,
        /// The key of the other.
        first: String,
    },
    /// The host interface name is invalid.
    #[error("Invalid interface name {0:?}: use 1 to 15 characters from A-Z a-z 0-9 _ . -")]
    BadInterface(String),
    /// The host interface exists already.
    #[error("Interface {0} already exists")]
    InterfaceInUse(String),
    /// Two networks want the same host interface.
    #[error("Interface {name} is already used by {first}")]
    DuplicateInterface {
        /// The interface.
        name: String,
        /// The key of the first user.
        first: String,
    },
}

fn default_true() -> bool {
    true
}
fn default_lease_secs() -> u32 {
    virtnet_services::dhcp::DEFAULT_LEASE_SECS
}
fn default_cap() -> usize {
    virtnet_services::dhcp::DEFAULT_MAX_LEASES_PER_PORT
}

/// A static DHCP reservation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationSpec {
    /// Client MAC.
    pub mac: String,
    /// Its address.
    pub ip: String,
}

/// A classless static route handed out by DHCP (option 121).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Destination network, e.g. `10.9.0.0/16`.
    pub dst: String,
    /// Gateway.
    pub gw: String,
}

/// The `dhcp` table of a network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpSpec {
    /// On unless `false`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// `FIRST-LAST`; default: the upper half of the subnet below the services' address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<String>,
    /// Lease time in seconds.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u32,
    /// Static reservations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reservations: Vec<ReservationSpec>,
    /// DNS servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// Domain name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Router option; none by default (host-only and internal networks lead nowhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<String>,
    /// Classless static routes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    /// Most addresses one port (VM) may hold.
    #[serde(default = "default_cap")]
    pub max_leases_per_port: usize,
    /// Lease file; default `/var/lib/virtnet/<network>.leases`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_file: Option<PathBuf>,
}

impl Default for DhcpSpec {
    fn default() -> Self {
        DhcpSpec {
            enabled: true,
            range: None,
            lease_secs: default_lease_secs(),
            reservations: Vec::new(),
            dns: Vec::new(),
            domain: None,
            router: None,
            routes: Vec::new(),
            max_leases_per_port: default_cap(),
            lease_file: None,
        }
    }
}

/// A network's addressing, resolved from its keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addressing {
    /// The subnet.
    pub subnet: Ipv4Net,
    /// The host's address (host-only) .
    pub host_ip: Option<Ipv4Addr>,
    /// The host interface (host-only).
    pub host_interface: Option<String>,
    /// The services, when any are on.
    pub services: Option<ServicesConfig>,
}

fn ip(s: &str) -> Result<Ipv4Addr, NetError> {
    s.trim().parse().map_err(|_| NetError::BadAddress(s.into()))
}

fn nth_host(subnet: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(n))
}

/// A stable, locally administered MAC for a network's services.
pub fn services_mac(network: &str) -> MacAddr {
    let mut h: u32 = 0x811c_9dc5;
    for b in network.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    MacAddr([0x02, 0x76, b[0], b[1], b[2], b[3]])
}

/// The default host interface name of a network.
pub fn default_interface(network: &str) -> String {
    let mut n = format!("vt-{network}");
    n.truncate(virtnet_port_tap::MAX_IFNAME);
    n
}

/// Does this network run anything of this module (a TAP or services)?
pub fn applies(net: &NetworkConfig) -> bool {
    net.mode == HOST_ONLY
        || net.dhcp.as_ref().is_some_and(|d| d.enabled)
        || net.ipv6_prefix.is_some()
}

/// The subnet of `net`, if it has one (host-only always does).
pub fn subnet(net: &NetworkConfig) -> Result<Option<Ipv4Net>, NetError> {
    let text = match (&net.subnet, net.mode.as_str()) {
        (Some(s), _) => s.as_str(),
        (None, HOST_ONLY) => DEFAULT_HOST_ONLY_SUBNET,
        (None, _) => return Ok(None),
    };
    let s: Ipv4Net = text.parse().map_err(|_| NetError::BadSubnet(text.into()))?;
    if s.prefix_len() > 29 {
        return Err(NetError::SmallSubnet(s));
    }
    Ok(Some(s.trunc()))
}

/// Resolve and check `net`'s addressing and services keys (not the interface's existence).
pub fn addressing(net: &NetworkConfig) -> Result<Option<Addressing>, NetError> {
    let host_only = net.mode == HOST_ONLY;
    if net.host_interface.is_some() && !host_only {
        return Err(NetError::NotHostOnly);
    }
    let Some(subnet) = subnet(net)? else {
        if applies(net) {
            return Err(NetError::NoSubnet);
        }
        return Ok(None);
    };
    let hosts = (1u32 << (32 - subnet.prefix_len())) - 2;
    let (host_ip, services_ip) = if host_only {
        (Some(nth_host(subnet, 1)), nth_host(subnet, hosts))
    } else {
        (None, nth_host(subnet, 1))
    };
    let host_interface = if host_only {
        let name = net
            .host_interface
            .clone()
            .unwrap_or_else(|| default_interface(&net.name));
        virtnet_port_tap::check_name(&name).map_err(|_| NetError::BadInterface(name.clone()))?;
        Some(name)
    } else {
        None
    };
    let dhcp_spec = match &net.dhcp {
        Some(d) if d.enabled => Some(d.clone()),
        Some(_) => None,
        None if host_only => Some(DhcpSpec::default()),
        None => None,
    };
    let dhcp = match dhcp_spec {
        None => None,
        Some(d) => Some(dhcp_config(net, &d, subnet, services_ip, hosts)?),
    };
    let ra = match &net.ipv6_prefix {
        None => None,
        Some(p) => {
            let prefix: Ipv6Net = p.parse().map_err(|_| NetError::BadPrefix(p.clone()))?;
            if prefix.prefix_len() != 64 {
                return Err(NetError::BadPrefix(p.clone()));
            }
            Some(RaConfig {
                prefix: prefix.trunc(),
                router_lifetime: 0,
                interval_secs: RA_INTERVAL_SECS,
                mtu: Some(net.mtu),
            })
        }
    };
    let services = (dhcp.is_some() || ra.is_some() || host_only).then(|| ServicesConfig {
        dhcp,
        ra,
        ..ServicesConfig::new(
            format!("{}-services", net.name),
            services_mac(&net.name),
            services_ip,
        )
    });
    Ok(Some(Addressing {
        subnet,
        host_ip,
        host_interface,
        services,
    }))
}

fn dhcp_config(
    net: &NetworkConfig,
    d: &DhcpSpec,
    subnet: Ipv4Net,
    server: Ipv4Addr,
    hosts: u32,
) -> Result<DhcpConfig, NetError> {
    let (start, end) = match &d.range {
        Some(r) => {
            let (a, b) = r
                .split_once('-')
                .ok_or_else(|| NetError::BadRange(r.clone()))?;
            let a = a
                .trim()
                .parse()
                .map_err(|_| NetError::BadRange(r.clone()))?;
            let b = b
                .trim()
                .parse()
                .map_err(|_| NetError::BadRange(r.clone()))?;
            (a, b)
        }
        // Upper half of the subnet, below the last host address.
        None => (nth_host(subnet, hosts / 2 + 1), nth_host(subnet, hosts - 1)),
    };
    let mut c = DhcpConfig::new(subnet, server, start, end);
    c.lease_secs = d.lease_secs;
    c.max_leases_per_port = d.max_leases_per_port;
    c.domain = d.domain.clone();
    c.mtu = u16::try_from(net.mtu).ok();
    c.router = d.router.as_deref().map(ip).transpose()?;
    c.dns = d.dns.iter().map(|s| ip(s)).collect::<Result<_, _>>()?;
    for r in &d.reservations {
        let mac: MacAddr = r.mac.parse().map_err(|_| NetError::BadMac(r.mac.clone()))?;
        c.reservations.push((mac, ip(&r.ip)?));
    }
    for r in &d.routes {
        let dst: Ipv4Net = r
            .dst
            .parse()
            .map_err(|_| NetError::BadSubnet(r.dst.clone()))?;
        c.routes.push((dst.trunc(), ip(&r.gw)?));
    }
    c.lease_file =
        Some(d.lease_file.clone().unwrap_or_else(|| {
            PathBuf::from(DEFAULT_LEASE_DIR).join(format!("{}.leases", net.name))
        }));
    // The host's address is never handed out either.
    if net.mode == HOST_ONLY {
        let host = nth_host(subnet, 1);
        if c.in_range(host) || c.reservations.iter().any(|(_, i)| *i == host) {
            return Err(NetError::Dhcp(format!(
                "The host's address {host} lies in the DHCP range or a reservation"
            )));
        }
    }
    c.validate().map_err(|e| NetError::Dhcp(e.to_string()))?;
    Ok(c)
}

/// Check every network's addressing, overlaps between networks and host interfaces. The
/// error comes with the key it is about.
pub fn validate_all(nets: &[NetworkConfig]) -> Result<(), (String, NetError)> {
    let mut subnets: Vec<(Ipv4Net, String)> = Vec::new();
    let mut ifaces: Vec<(String, String)> = Vec::new();
    for (i, net) in nets.iter().enumerate() {
        let key = format!("network[{i}]");
        let which = |e: &NetError| -> String {
            match e {
                NetError::BadSubnet(_) | NetError::SmallSubnet(_) | NetError::NoSubnet => "subnet",
                NetError::NotHostOnly | NetError::BadInterface(_) => "host_interface",
                NetError::BadPrefix(_) => "ipv6_prefix",
                _ => "dhcp",
            }
            .to_string()
        };
        let a = match addressing(net) {
            Ok(Some(a)) => a,
            Ok(None) => continue,
            Err(e) => return Err((format!("{key}.{}", which(&e)), e)),
        };
        for (other, first) in &subnets {
            if other.contains(&a.subnet.network()) || a.subnet.contains(&other.network()) {
                return Err((
                    format!("{key}.subnet"),
                    NetError::Overlap {
                        subnet: a.subnet,
                        other: *other,
                        first: first.clone(),
                    },
                ));
            }
        }
        subnets.push((a.subnet, format!("{key}.subnet")));
        if let Some(name) = a.host_interface {
            let ikey = format!("{key}.host_interface");
            if let Some((_, first)) = ifaces.iter().find(|(n, _)| *n == name) {
                return Err((
                    ikey,
                    NetError::DuplicateInterface {
                        name,
                        first: first.clone(),
                    },
                ));
            }
            if virtnet_port_tap::exists(&name) {
                return Err((ikey, NetError::InterfaceInUse(name)));
            }
            ifaces.push((name, ikey));
        }
    }
    Ok(())
}

/// Start the services of `net` on `switch`, if it has any.
pub fn start_services(
    switch: &Arc<Switch>,
    net: &NetworkConfig,
) -> Result<Option<ServicesPort>, ModeError> {
    let a = addressing(net).map_err(|e| ModeError::Start(e.to_string()))?;
    match a.and_then(|a| a.services) {
        None => Ok(None),
        Some(cfg) => ServicesPort::start(switch.clone(), cfg)
            .map(Some)
            .map_err(|e| ModeError::Start(crate::error_line(&e))),
    }
}

/// `host-only`: a switch, a host TAP and the services.
pub struct HostOnlyMode {
    switch: Arc<Switch>,
    tap: TapPort,
    services: Option<ServicesPort>,
}

impl HostOnlyMode {
    /// Create the TAP and start the services.
    pub fn start(switch: Arc<Switch>, net: &NetworkConfig) -> Result<Self, ModeError> {
        let a = addressing(net)
            .map_err(|e| ModeError::Start(e.to_string()))?
            .ok_or_else(|| ModeError::Start("host-only network without a subnet".into()))?;
        let name = a
            .host_interface
            .clone()
            .unwrap_or_else(|| default_interface(&net.name));
        let tap = TapPort::start(
            switch.clone(),
            &TapConfig {
                name,
                addr: a.host_ip.map(|ip| (ip, a.subnet.prefix_len())),
                mtu: Some(net.mtu),
                vlan: None,
            },
        )
        .map_err(|e| ModeError::Start(crate::error_line(&e)))?;
        let services = start_services(&switch, net)?;
        Ok(HostOnlyMode {
            switch,
            tap,
            services,
        })
    }
}

/// One DHCP lease in the `stats` answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseReport {
    /// Client MAC.
    pub mac: String,
    /// Its address.
    pub ip: String,
    /// `offered` or `bound`.
    pub state: String,
    /// Unix time when it ends (in the past: expired or released, the address is kept for the
    /// client until someone else needs it).
    pub expires: u64,
}

/// The services of a network in the `stats` answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesReport {
    /// The services' IPv4 address.
    pub address: String,
    /// The services' MAC.
    pub mac: String,
    /// Counters by name (`dhcp_*` for the DHCP server).
    pub counters: std::collections::BTreeMap<String, u64>,
    /// DHCP leases, by address.
    pub leases: Vec<LeaseReport>,
}

/// The report of a running services port.
pub fn services_report(s: &ServicesPort) -> ServicesReport {
    let st = s.stats();
    let d = st.dhcp;
    let counters = [
        ("queued", st.queued),
        ("queue_full", st.queue_full),
        ("malformed", st.malformed),
        ("arp_replies", st.arp_replies),
        ("echo_replies", st.echo_replies),
        ("router_advertisements", st.router_advertisements),
        ("unknown_port", st.unknown_port),
        ("dhcp_requests", d.requests),
        ("dhcp_offers", d.offers),
        ("dhcp_acks", d.acks),
        ("dhcp_naks", d.naks),
        ("dhcp_releases", d.releases),
        ("dhcp_declines", d.declines),
        ("dhcp_malformed", d.malformed),
        ("dhcp_spoofed", d.spoofed),
        ("dhcp_port_cap", d.port_cap),
        ("dhcp_exhausted", d.exhausted),
        ("dhcp_persist_errors", d.persist_errors),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let leases = s
        .leases()
        .into_iter()
        .map(|l| LeaseReport {
            mac: l.mac.to_string(),
            ip: l.ip.to_string(),
            state: match l.state {
                virtnet_services::LeaseState::Offered => "offered",
                virtnet_services::LeaseState::Bound => "bound",
            }
            .into(),
            expires: l.expires,
        })
        .collect();
    ServicesReport {
        address: s.ip().to_string(),
        mac: s.mac().to_string(),
        counters,
        leases,
    }
}

fn extra(services: &Option<ServicesPort>, name: &str) -> Vec<ModePort> {
    services
        .iter()
        .map(|s| ModePort {
            id: s.port_id(),
            name: format!("{name}-services"),
        })
        .collect()
}

impl NetMode for HostOnlyMode {
    fn name(&self) -> &'static str {
        HOST_ONLY
    }

    fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    fn extra_ports(&self) -> Vec<ModePort> {
        let mut v = vec![ModePort {
            id: self.tap.port_id(),
            name: self.tap.name().to_string(),
        }];
        v.extend(extra(&self.services, &self.switch.config().name));
        v
    }

    fn services(&self) -> Option<ServicesReport> {
        self.services.as_ref().map(services_report)
    }

    fn shutdown(self: Box<Self>) {
        if let Some(s) = self.services {
            s.shutdown();
        }
        self.tap.shutdown();
    }
}

/// `internal` with services (DHCP, RA) at the subnet's first address.
pub struct InternalWithServices {
    switch: Arc<Switch>,
    services: Option<ServicesPort>,
}

impl InternalWithServices {
    /// Start the services of an internal network.
    pub fn start(switch: Arc<Switch>, net: &NetworkConfig) -> Result<Self, ModeError> {
        let services = start_services(&switch, net)?;
        Ok(InternalWithServices { switch, services })
    }
}

impl NetMode for InternalWithServices {
    fn name(&self) -> &'static str {
        INTERNAL
    }

    fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    fn extra_ports(&self) -> Vec<ModePort> {
        extra(&self.services, &self.switch.config().name)
    }

    fn services(&self) -> Option<ServicesReport> {
        self.services.as_ref().map(services_report)
    }

    fn shutdown(self: Box<Self>) {
        if let Some(s) = self.services {
            s.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use assert_matches::assert_matches;

    fn net(mode: &str) -> NetworkConfig {
        NetworkConfig {
            mode: mode.into(),
            ..NetworkConfig::internal("lab")
        }
    }

    #[test]
    fn host_only_defaults() {
        let a = addressing(&net(HOST_ONLY)).unwrap().unwrap();
        assert_eq!(a.subnet.to_string(), "192.168.56.0/24");
        assert_eq!(a.host_ip, Some(Ipv4Addr::new(192, 168, 56, 1)));
        assert_eq!(a.host_interface.as_deref(), Some("vt-lab"));
        let s = a.services.unwrap();
        assert_eq!(s.ip, Ipv4Addr::new(192, 168, 56, 254));
        let d = s.dhcp.unwrap();
        assert_eq!(
            (d.range_start, d.range_end),
            (
                Ipv4Addr::new(192, 168, 56, 128),
                Ipv4Addr::new(192, 168, 56, 253)
            )
        );
        assert_eq!(
            d.lease_file,
            Some(PathBuf::from("/var/lib/virtnet/lab.leases"))
        );
        assert!(s.ra.is_none());
        assert_eq!(services_mac("lab"), services_mac("lab"));
        assert_ne!(services_mac("lab"), services_mac("lab2"));
        assert!(services_mac("lab").is_unicast());
    }

    #[test]
    fn internal_has_services_only_with_dhcp() {
        assert_eq!(addressing(&net(INTERNAL)).unwrap(), None);
        let mut n = net(INTERNAL);
        n.dhcp = Some(DhcpSpec::default());
        assert_eq!(addressing(&n), Err(NetError::NoSubnet));
        n.subnet = Some("10.1.0.0/16".into());
        let s = addressing(&n).unwrap().unwrap().services.unwrap();
        assert_eq!(s.ip, Ipv4Addr::new(10, 1, 0, 1));
        let mut n2 = n.clone();
        n2.dhcp = Some(DhcpSpec {
            enabled: false,
            ..DhcpSpec::default()
        });
        assert!(addressing(&n2).unwrap().unwrap().services.is_none());
    }

    #[test]
    fn rejections() {
        let mut n = net(HOST_ONLY);
        n.subnet = Some("192.168.56.0/33".into());
        assert_matches!(addressing(&n), Err(NetError::BadSubnet(_)));
        n.subnet = Some("192.168.56.0/30".into());
        assert_matches!(addressing(&n), Err(NetError::SmallSubnet(_)));
        let mut n = net(HOST_ONLY);
        n.dhcp = Some(DhcpSpec {
            range: Some("192.168.57.10-192.168.57.20".into()),
            ..DhcpSpec::default()
        });
        assert_matches!(addressing(&n), Err(NetError::Dhcp(m)) if m.contains("is not a host address of 192.168.56.0/24"));
        n.dhcp = Some(DhcpSpec {
            range: Some("192.168.56.1-192.168.56.20".into()),
            ..DhcpSpec::default()
        });
        assert_matches!(addressing(&n), Err(NetError::Dhcp(m)) if m.contains("host's address"));
        n.dhcp = Some(DhcpSpec {
            range: Some("nonsense".into()),
            ..DhcpSpec::default()
        });
        assert_matches!(addressing(&n), Err(NetError::BadRange(_)));
        let mut n = net(HOST_ONLY);
        n.host_interface = Some("a-much-too-long-name".into());
        assert_matches!(addressing(&n), Err(NetError::BadInterface(_)));
        let mut n = net(INTERNAL);
        n.host_interface = Some("vnet1".into());
        assert_matches!(addressing(&n), Err(NetError::NotHostOnly));
        let mut n = net(HOST_ONLY);
        n.ipv6_prefix = Some("fd00::/48".into());
        assert_matches!(addressing(&n), Err(NetError::BadPrefix(_)));
    }

    #[test]
    fn internal_with_dhcp_reports_its_services() {
        let dir = tempfile::TempDir::new().unwrap();
        let mut n = net(INTERNAL);
        n.subnet = Some("10.3.0.0/24".into());
        n.dhcp = Some(DhcpSpec {
            lease_file: Some(dir.path().join("l")),
            ..DhcpSpec::default()
        });
        let m = crate::mode::alloc_mode(&n).unwrap();
        assert_eq!(m.name(), INTERNAL);
        assert_eq!(m.extra_ports().len(), 1);
        assert_eq!(m.extra_ports()[0].name, "lab-services");
        let r = m.services().unwrap();
        assert_eq!(r.address, "10.3.0.1");
        assert_eq!(r.counters.get("dhcp_acks"), Some(&0));
        assert!(r.leases.is_empty());
        let sw = m.switch().clone();
        m.shutdown();
        assert!(sw.ports().is_empty());
        // Without services, nothing to report.
        let m = crate::mode::alloc_mode(&net(INTERNAL)).unwrap();
        assert!(m.services().is_none());
        m.shutdown();
    }

    /// The TOML keys through `Config::validate`, with the key named in the error.
    #[test]
    fn config_file_keys() {
        use crate::config::{Config, Error};
        let dir = tempfile::TempDir::new().unwrap();
        let parse = |text: &str| {
            let text = format!(
                "control_socket = \"{}/c.sock\"\n{text}",
                dir.path().display()
            );
            Config::from_toml(&text, std::path::Path::new("t.toml")).and_then(|c| {
                c.validate()?;
                Ok(c)
            })
        };
        let cfg = parse(
            r#"
[[network]]
name = "vmnet1"
mode = "host-only"
subnet = "192.168.56.0/24"
host_interface = "vt-unit-cfg"
ipv6_prefix = "fd00:56::/64"
dhcp = { range = "192.168.56.100-192.168.56.199", lease_secs = 600, dns = ["192.168.56.1"], domain = "lab", reservations = [{ mac = "52:54:00:00:00:0a", ip = "192.168.56.10" }], routes = [{ dst = "10.9.0.0/16", gw = "192.168.56.1" }] }
[[network]]
name = "lan"
mode = "internal"
subnet = "10.0.0.0/24"
dhcp = { max_leases_per_port = 2 }
"#,
        )
        .unwrap();
        let a = addressing(&cfg.networks[0]).unwrap().unwrap();
        let d = a.services.unwrap().dhcp.unwrap();
        assert_eq!(d.lease_secs, 600);
        assert_eq!(d.reservations.len(), 1);
        assert_eq!(d.routes.len(), 1);
        assert_eq!(d.domain.as_deref(), Some("lab"));
        let b = addressing(&cfg.networks[1]).unwrap().unwrap();
        assert_eq!(b.services.unwrap().dhcp.unwrap().max_leases_per_port, 2);
        // The written form reads back the same.
        assert_eq!(
            Config::from_toml(&cfg.to_toml(), std::path::Path::new("x")).unwrap(),
            cfg
        );

        let e = parse("[[network]]\nname = \"h\"\nmode = \"host-only\"\ndhcp = { range = \"192.168.57.1-192.168.57.9\" }\n")
            .unwrap_err();
        assert_matches!(&e, Error::Network { key, .. } if key == "network[0].dhcp");
        assert!(
            crate::error_line(&e).contains("is not a host address of 192.168.56.0/24"),
            "{e:?}"
        );
        let e = parse("[[network]]\nname = \"h\"\nmode = \"host-only\"\nhost_interface = \"sixteen-chars-xx\"\n")
            .unwrap_err();
        assert_matches!(&e, Error::Network { key, source: NetError::BadInterface(_) } if key == "network[0].host_interface");
        let e = parse("[[network]]\nname = \"i\"\nmode = \"internal\"\ndhcp = {}\n").unwrap_err();
        assert_matches!(&e, Error::Network { key, source: NetError::NoSubnet } if key == "network[0].subnet");
        let e = parse("[[network]]\nname = \"i\"\nmode = \"internal\"\ndhcp = { bogus = 1 }\n")
            .unwrap_err();
        assert_matches!(&e, Error::Parse { .. });
    }

    #[test]
    fn overlaps_and_interfaces_across_networks() {
        let mut a = net(HOST_ONLY);
        a.name = "a".into();
        a.host_interface = Some("vt-unit-a".into());
        let mut b = net(INTERNAL);
        b.name = "b".into();
        b.subnet = Some("192.168.0.0/16".into());
        b.dhcp = Some(DhcpSpec::default());
        let e = validate_all(&[a.clone(), b.clone()]).unwrap_err();
        assert_eq!(e.0, "network[1].subnet");
        assert_matches!(e.1, NetError::Overlap { .. });
        assert!(e
            .1
            .to_string()
            .contains("overlaps 192.168.56.0/24 of network[0].subnet"));
        b.subnet = Some("10.0.0.0/24".into());
        assert_eq!(validate_all(&[a.clone(), b.clone()]), Ok(()));
        let mut c = a.clone();
        c.name = "c".into();
        c.subnet = Some("172.16.0.0/24".into());
        let e = validate_all(&[a.clone(), c]).unwrap_err();
        assert_eq!(e.0, "network[1].host_interface");
        assert_matches!(e.1, NetError::DuplicateInterface { .. });
        // An interface that exists already ("lo" always does).
        a.host_interface = Some("lo".into());
        let e = validate_all(&[a]).unwrap_err();
        assert_eq!(e.1, NetError::InterfaceInUse("lo".into()));
    }
}
