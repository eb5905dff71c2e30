//! `nat` networks (VMware's VMnet8, QEMU's user networking): guests reach out through the
//! host's own sockets; nothing reaches in unless a port is forwarded.
//!
//! A NAT network is a switch plus two ports: the services (virtnet-services: DHCP, ARP, ping)
//! at the subnet's first address, and the NAT gateway (virtnet-port-nat) at the second, which
//! DHCP hands out as the router and the DNS server. The gateway translates guest TCP, UDP and
//! ICMP echo into host sockets and relays DNS to the host's resolvers.
//!
//! IPv6 is on by default (like passt and slirp): the gateway itself sends the router
//! advertisements (from its link-local address, as the default router, with the prefix for
//! SLAAC and its own address as RDNSS), answers neighbour discovery for its addresses and
//! translates IPv6 flows as it does IPv4 ones; the services port stays out of IPv6.
//!
//! ```toml
//! [[network]]
//! name = "vmnet8"
//! mode = "nat"
//! subnet = "10.0.2.0/24"            # default
//! ipv6_prefix = "fd00:10:0:2::/64"  # default; a /64 (SLAAC)
//! dhcp = { reservations = [{ mac = "52:54:00:00:00:0a", ip = "10.0.2.10" }] }   # on by default
//! [network.nat]
//! gateway = "10.0.2.2"              # default: the subnet's second address
//! gateway6 = "fd00:10:0:2::2"       # default: ::2 of the IPv6 prefix
//! ipv6 = true                       # false: IPv4 only
//! host_loopback = false             # true: the host's 127.0.0.1 is reachable at…
//! host_loopback_ip = "10.0.2.2"     # …this address (default: the gateway)
//! host_loopback_ip6 = "fd00:10:0:2::2"  # …and its ::1 at this one (default: gateway6)
//! dns = ["127.0.0.53"]              # resolvers (IP or IP:PORT); default: /etc/resolv.conf
//! forward = ["tcp:127.0.0.1:2222 -> 22", "udp:0.0.0.0:5353 -> 10.0.2.10:53",
//!            "tcp:[::1]:2223 -> [fd00:10:0:2::10]:22"]
//! max_flows_per_guest = 4096        # per guest MAC, IPv4 and IPv6 flows together
//! ```
//!
//! A forward without a guest address goes to the first DHCP reservation (IPv4); a forward to
//! an IPv6 guest names the guest's address (SLAAC: the prefix + the guest's EUI-64).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtnet_port_nat::engine::NatV6;
use virtnet_port_nat::host::Forward;
use virtnet_port_nat::{NatConfig, NatPolicy, NatPort};
use virtnet_services::ServicesPort;
use virtnet_switch::Switch;

use crate::config::NetworkConfig;
use crate::control::Counters;
use crate::mode::{ModeError, ModePort, NetMode, INTERNAL};
use crate::mode_hostonly::{self, ServicesReport};

/// The mode's name in the config file.
pub const NAT: &str = "nat";
/// Subnet of a NAT network without a `subnet` key (QEMU's user networking).
pub const DEFAULT_NAT_SUBNET: &str = "10.0.2.0/24";
/// IPv6 prefix of a NAT network without an `ipv6_prefix` key (a ULA /64).
pub const DEFAULT_NAT_PREFIX6: &str = "fd00:10:0:2::/64";
/// Where the host's resolvers are read from.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Errors of a NAT network's keys.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NatError {
    /// An address key does not parse or lies outside the subnet.
    #[error("Invalid gateway {0:?}: expected an address in the subnet other than the first")]
    BadGateway(String),
    /// `host_loopback_ip` does not parse.
    #[error("Invalid host loopback address {0:?}")]
    BadLoopback(String),
    /// `ipv6_prefix` does not parse or is not a /64.
    #[error("Invalid IPv6 prefix {0:?}: expected a /64 like fd00:10:0:2::/64")]
    BadPrefix6(String),
    /// `gateway6` does not parse or lies outside the IPv6 prefix.
    #[error(
        "Invalid IPv6 gateway {0:?}: expected an address in the IPv6 prefix other than its first"
    )]
    BadGateway6(String),
    /// `host_loopback_ip6` does not parse or is not a unicast address.
    #[error("Invalid IPv6 host loopback address {0:?}")]
    BadLoopback6(String),
    /// A resolver does not parse.
    #[error("Invalid DNS server {0:?}: expected IP or IP:PORT")]
    BadDns(String),
    /// A forward does not parse.
    #[error("{0}")]
    BadForward(String),
    /// The subnet or DHCP keys are wrong.
    #[error("{0}")]
    Net(String),
}

/// The `nat` table of a network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatSpec {
    /// The gateway's address; default: the subnet's second address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Let guests reach the host's 127.0.0.1 at `host_loopback_ip`.
    #[serde(default)]
    pub host_loopback: bool,
    /// Where guests see the host's loopback; default: the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_loopback_ip: Option<String>,
    /// IPv6 (router advertisements, NDP, IPv6 flows); default: on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
    /// The gateway's IPv6 address; default: ::2 of the network's `ipv6_prefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<String>,
    /// Where guests see the host's ::1 with `host_loopback`; default: `gateway6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_loopback_ip6: Option<String>,
    /// Host resolvers the DNS forwarder relays to; default: /etc/resolv.conf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<String>>,
    /// Port forwards, `PROTO:HOST_IP:PORT -> [GUEST_IP:]PORT`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forward: Vec<String>,
    /// Most flows one guest may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_flows_per_guest: Option<usize>,
}

fn subnet_of(net: &NetworkConfig) -> Result<Ipv4Net, NatError> {
    let text = net.subnet.as_deref().unwrap_or(DEFAULT_NAT_SUBNET);
    let s: Ipv4Net = text
        .parse()
        .map_err(|_| NatError::Net(format!("Invalid subnet {text:?}")))?;
    Ok(s.trunc())
}

fn gateway_of(net: &NetworkConfig, subnet: Ipv4Net) -> Result<Ipv4Addr, NatError> {
    let spec = net.nat.clone().unwrap_or_default();
    let gw = match &spec.gateway {
        Some(g) => g
            .trim()
            .parse()
            .map_err(|_| NatError::BadGateway(g.clone()))?,
        None => Ipv4Addr::from(u32::from(subnet.network()) + 2),
    };
    let first = Ipv4Addr::from(u32::from(subnet.network()) + 1);
    if !subnet.contains(&gw) || gw == first || gw == subnet.network() || gw == subnet.broadcast() {
        return Err(NatError::BadGateway(gw.to_string()));
    }
    Ok(gw)
}

/// The IPv6 side of a NAT network, or `None` with `ipv6 = false`.
pub fn v6_of(net: &NetworkConfig) -> Result<Option<NatV6>, NatError> {
    let spec = net.nat.clone().unwrap_or_default();
    if spec.ipv6 == Some(false) {
        return Ok(None);
    }
    let text = net.ipv6_prefix.as_deref().unwrap_or(DEFAULT_NAT_PREFIX6);
    let prefix: Ipv6Net = text
        .trim()
        .parse()
        .map_err(|_| NatError::BadPrefix6(text.into()))?;
    if prefix.prefix_len() != 64 {
        return Err(NatError::BadPrefix6(text.into()));
    }
    let prefix = prefix.trunc();
    let net6 = u128::from(prefix.network());
    let gateway = match &spec.gateway6 {
        Some(g) => g
            .trim()
            .parse()
            .map_err(|_| NatError::BadGateway6(g.clone()))?,
        None => Ipv6Addr::from(net6 + 2),
    };
    if !prefix.contains(&gateway) || gateway == prefix.network() {
        return Err(NatError::BadGateway6(gateway.to_string()));
    }
    let mut v6 = NatV6::new(gateway);
    if spec.host_loopback {
        v6.host_loopback = Some(match &spec.host_loopback_ip6 {
            Some(a) => {
                let ip: Ipv6Addr = a
                    .trim()
                    .parse()
                    .map_err(|_| NatError::BadLoopback6(a.clone()))?;
                if ip.is_multicast() || ip.is_unspecified() || ip.is_loopback() {
                    return Err(NatError::BadLoopback6(a.clone()));
                }
                ip
            }
            None => gateway,
        });
    }
    Ok(Some(v6))
}

/// The network as the services see it: an `internal` network with DHCP (router and DNS at
/// the gateway) and no IPv6 (the NAT gateway itself advertises the prefix). Other modes are
/// returned unchanged. Config validation checks this form.
pub fn effective(net: &NetworkConfig) -> NetworkConfig {
    if net.mode != NAT {
        return net.clone();
    }
    let mut e = net.clone();
    e.mode = INTERNAL.into();
    e.nat = None;
    e.ipv6_prefix = None;
    let subnet = subnet_of(net).ok();
    e.subnet = Some(
        net.subnet
            .clone()
            .unwrap_or_else(|| DEFAULT_NAT_SUBNET.into()),
    );
    let mut d = net.dhcp.clone().unwrap_or_default();
    if let Some(gw) = subnet.and_then(|s| gateway_of(net, s).ok()) {
        if d.router.is_none() {
            d.router = Some(gw.to_string());
        }
        if d.dns.is_empty() {
            d.dns = vec![gw.to_string()];
        }
    }
    e.dhcp = Some(d);
    e
}

/// The host's resolvers from resolv.conf text.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next())
                .flatten()
                .and_then(|a| a.split('%').next()?.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

fn parse_dns(s: &str) -> Result<SocketAddr, NatError> {
    let s = s.trim();
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| NatError::BadDns(s.into()))
}

/// Resolve and check a NAT network's keys into the gateway's configuration.
pub fn nat_config(net: &NetworkConfig) -> Result<NatConfig, NatError> {
    let spec = net.nat.clone().unwrap_or_default();
    let subnet = subnet_of(net)?;
    let gateway = gateway_of(net, subnet)?;
    let mut policy = NatPolicy::new(
        mode_hostonly::services_mac(&format!("{}-gateway", net.name)).0,
        gateway,
        subnet.prefix_len(),
    );
    if spec.host_loopback {
        policy.host_loopback = Some(match &spec.host_loopback_ip {
            Some(a) => a
                .trim()
                .parse()
                .map_err(|_| NatError::BadLoopback(a.clone()))?,
            None => gateway,
        });
    }
    policy.dns = match &spec.dns {
        Some(list) => list
            .iter()
            .map(|s| parse_dns(s))
            .collect::<Result<_, _>>()?,
        None => std::fs::read_to_string(RESOLV_CONF)
            .map(|t| parse_resolv_conf(&t))
            .unwrap_or_default(),
    };
    if let Some(m) = spec.max_flows_per_guest {
        policy.max_flows_per_guest = m;
    }
    policy.v6 = v6_of(net)?;
    let reserved = net
        .dhcp
        .as_ref()
        .and_then(|d| d.reservations.first())
        .and_then(|r| r.ip.parse().ok());
    let forwards = spec
        .forward
        .iter()
        .map(|f| {
            let fwd =
                Forward::parse(f, reserved).map_err(|e| NatError::BadForward(e.to_string()))?;
            let inside = match fwd.guest.ip() {
                IpAddr::V4(a) => subnet.contains(&a),
                IpAddr::V6(a) => policy.v6.is_some_and(|v6| {
                    Ipv6Net::new(v6.prefix(), v6.prefix_len).is_ok_and(|n| n.contains(&a))
                }),
            };
            if !inside {
                return Err(NatError::BadForward(format!(
                    "Forward {f:?}: the guest address is not in the network's {}",
                    if fwd.guest.is_ipv4() {
                        "subnet"
                    } else {
                        "IPv6 prefix (or IPv6 is off)"
                    }
                )));
            }
            Ok(fwd)
        })
        .collect::<Result<_, _>>()?;
    Ok(NatConfig {
        name: format!("{}-gateway", net.name),
        vlan: None,
        policy,
        forwards,
    })
}

/// Check the NAT keys of every network; the error comes with its key.
pub fn validate_all(nets: &[NetworkConfig]) -> Result<(), (String, NatError)> {
    for (i, net) in nets.iter().enumerate() {
        if net.mode != NAT {
            if net.nat.is_some() {
                return Err((
                    format!("network[{i}].nat"),
                    NatError::Net("Only nat networks have a nat table".into()),
                ));
            }
            continue;
        }
        nat_config(net).map_err(|e| {
            let key = match e {
                NatError::BadPrefix6(_) => "ipv6_prefix",
                _ => "nat",
            };
            (format!("network[{i}].{key}"), e)
        })?;
    }
    Ok(())
}

/// A NAT network with default settings (VMnet8): 10.0.2.0/24, DHCP, DNS forwarder.
pub fn default_network(name: &str) -> NetworkConfig {
    NetworkConfig {
        mode: NAT.into(),
        ..NetworkConfig::internal(name)
    }
}

/// The gateway's counters for `stats`: open `tcp_flows`/`udp_flows`/`icmp_flows`; `denied`
/// (policy), `over_limit` (flows per guest), `dropped` (frames not parsed or not handled),
/// `tcp_rescues` (stalled retransmissions restarted), `closed_gone` (flows closed because
/// their guest left).
pub fn nat_report(s: &virtnet_port_nat::NatStats) -> Counters {
    let counters = [
        ("tcp_flows", s.tcp_flows as u64),
        ("udp_flows", s.udp_flows as u64),
        ("icmp_flows", s.icmp_flows as u64),
        ("denied", s.denied),
        ("over_limit", s.over_limit),
        ("dropped", s.dropped),
        ("tcp_rescues", s.tcp_rescues),
        ("closed_gone", s.closed_gone),
    ];
    Counters::from_pairs(&counters)
}

/// `nat`: a switch, the services and the NAT gateway.
pub struct NatMode {
    switch: Arc<Switch>,
    services: Option<ServicesPort>,
    gateway: NatPort,
    gateway_name: String,
}

impl NatMode {
    /// Start the services and the gateway.
    pub fn start(switch: Arc<Switch>, net: &NetworkConfig) -> Result<Self, ModeError> {
        let cfg = nat_config(net).map_err(|e| ModeError::Start(e.to_string()))?;
        let services = mode_hostonly::start_services(&switch, &effective(net))?;
        let gateway_name = cfg.name.clone();
        let gateway = NatPort::start(switch.clone(), cfg)
            .map_err(|e| ModeError::Start(crate::error_line(&e)))?;
        Ok(NatMode {
            switch,
            services,
            gateway,
            gateway_name,
        })
    }
}

impl NetMode for NatMode {
    fn name(&self) -> &'static str {
        NAT
    }

    fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    fn extra_ports(&self) -> Vec<ModePort> {
        let mut v = vec![ModePort {
            id: self.gateway.port_id(),
            name: self.gateway_name.clone(),
        }];
        v.extend(self.services.iter().map(|s| ModePort {
            id: s.port_id(),
            name: format!("{}-services", self.switch.config().name),
        }));
        v
    }

    fn services(&self) -> Option<ServicesReport> {
        self.services.as_ref().map(mode_hostonly::services_report)
    }

    fn nat(&self) -> Option<Counters> {
        Some(nat_report(&self.gateway.stats()))
    }

    fn shutdown(self: Box<Self>) {
        self.gateway.shutdown();
        if let Some(s) = self.services {
            s.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mode_hostonly::DhcpSpec;
    use assert_matches::assert_matches;

    fn nat(spec: NatSpec) -> NetworkConfig {
        NetworkConfig {
            nat: Some(spec),
            ..default_network("n")
        }
    }

    #[test]
    fn defaults_are_vmnet8_like() {
        let mut net = default_network("n");
        net.nat = Some(NatSpec {
            dns: Some(vec!["127.0.0.1:5353".into()]),
            ..NatSpec::default()
        });
        let c = nat_config(&net).unwrap();
        assert_eq!(c.policy.gateway, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(c.policy.prefix_len, 24);
        assert_eq!(c.policy.host_loopback, None);
        assert_eq!(c.policy.dns, vec!["127.0.0.1:5353".parse().unwrap()]);
        let e = effective(&net);
        assert_eq!(e.mode, "internal");
        let d = e.dhcp.unwrap();
        assert_eq!(d.router.as_deref(), Some("10.0.2.2"));
        assert_eq!(d.dns, vec!["10.0.2.2".to_string()]);
        let a = mode_hostonly::addressing(&effective(&net))
            .unwrap()
            .unwrap();
        let s = a.services.unwrap();
        assert_eq!(s.ip, Ipv4Addr::new(10, 0, 2, 1));
        assert!(s.dhcp.is_some());
    }

    #[test]
    fn host_loopback_and_forwards() {
        let mut net = nat(NatSpec {
            host_loopback: true,
            dns: Some(vec!["10.1.1.1".into()]),
            forward: vec!["tcp:127.0.0.1:2222 -> 22".into()],
            ..NatSpec::default()
        });
        net.dhcp = Some(DhcpSpec {
            reservations: vec![mode_hostonly::ReservationSpec {
                mac: "52:54:00:00:00:0a".into(),
                ip: "10.0.2.10".into(),
            }],
            ..DhcpSpec::default()
        });
        let c = nat_config(&net).unwrap();
        assert_eq!(c.policy.host_loopback, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(c.policy.dns, vec!["10.1.1.1:53".parse().unwrap()]);
        assert_eq!(c.forwards[0].guest, "10.0.2.10:22".parse().unwrap());
        assert_eq!(c.forwards[0].host, "127.0.0.1:2222".parse().unwrap());
    }

    #[test]
    fn rejections() {
        let bad = |s: NatSpec| nat_config(&nat(s)).unwrap_err();
        assert_matches!(
            bad(NatSpec {
                gateway: Some("10.0.3.1".into()),
                ..NatSpec::default()
            }),
            NatError::BadGateway(_)
        );
        assert_matches!(
            bad(NatSpec {
                gateway: Some("10.0.2.1".into()),
                ..NatSpec::default()
            }),
            NatError::BadGateway(_)
        );
        assert_matches!(
            bad(NatSpec {
                dns: Some(vec!["x".into()]),
                ..NatSpec::default()
            }),
            NatError::BadDns(_)
        );
        assert_matches!(
            bad(NatSpec {
                dns: Some(vec![]),
                forward: vec!["tcp:127.0.0.1:2222 -> 22".into()],
                ..NatSpec::default()
            }),
            NatError::BadForward(_)
        );
        let mut internal = NetworkConfig::internal("i");
        internal.nat = Some(NatSpec::default());
        assert_matches!(validate_all(&[internal]), Err((k, _)) if k == "network[0].nat");
    }

    #[test]
    fn resolv_conf() {
        let t = "# x\nnameserver 1.1.1.1\nsearch lab\nnameserver fe80::1%eth0\nnameserver\n";
        assert_eq!(
            parse_resolv_conf(t),
            vec![
                "1.1.1.1:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn ipv6_is_on_by_default_and_can_be_turned_off() {
        let net = nat(NatSpec {
            dns: Some(vec![]),
            ..NatSpec::default()
        });
        let v6 = nat_config(&net).unwrap().policy.v6.unwrap();
        assert_eq!(v6.gateway, "fd00:10:0:2::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(v6.prefix_len, 64);
        assert_eq!(v6.host_loopback, None);
        // The services stay out of IPv6: the gateway advertises the prefix itself.
        let mut with_prefix = net.clone();
        with_prefix.ipv6_prefix = Some("fd00:99::/64".into());
        assert_eq!(effective(&with_prefix).ipv6_prefix, None);
        let v6 = nat_config(&with_prefix).unwrap().policy.v6.unwrap();
        assert_eq!(v6.gateway, "fd00:99::2".parse::<Ipv6Addr>().unwrap());
        let off = nat(NatSpec {
            ipv6: Some(false),
            dns: Some(vec![]),
            ..NatSpec::default()
        });
        assert_eq!(nat_config(&off).unwrap().policy.v6, None);
        // host_loopback maps ::1 at gateway6 unless told otherwise.
        let lo = nat(NatSpec {
            host_loopback: true,
            gateway6: Some("fd00:10:0:2::9".into()),
            dns: Some(vec![]),
            ..NatSpec::default()
        });
        let v6 = nat_config(&lo).unwrap().policy.v6.unwrap();
        assert_eq!(v6.host_loopback, Some(v6.gateway));
        let lo = nat(NatSpec {
            host_loopback: true,
            host_loopback_ip6: Some("fd00:10:0:2::3".into()),
            dns: Some(vec![]),
            ..NatSpec::default()
        });
        let v6 = nat_config(&lo).unwrap().policy.v6.unwrap();
        assert_eq!(v6.host_loopback, Some("fd00:10:0:2::3".parse().unwrap()));
    }

    #[test]
    fn ipv6_forwards() {
        let net = nat(NatSpec {
            dns: Some(vec![]),
            forward: vec!["tcp:[::1]:2222 -> [fd00:10:0:2::10]:22".into()],
            ..NatSpec::default()
        });
        let c = nat_config(&net).unwrap();
        assert_eq!(c.forwards[0].host, "[::1]:2222".parse().unwrap());
        assert_eq!(c.forwards[0].guest, "[fd00:10:0:2::10]:22".parse().unwrap());
        let outside = nat(NatSpec {
            dns: Some(vec![]),
            forward: vec!["tcp:[::1]:2222 -> [fd00:99::10]:22".into()],
            ..NatSpec::default()
        });
        assert_matches!(nat_config(&outside), Err(NatError::BadForward(_)));
        let off = nat(NatSpec {
            ipv6: Some(false),
            dns: Some(vec![]),
            forward: vec!["tcp:[::1]:2222 -> [fd00:10:0:2::10]:22".into()],
            ..NatSpec::default()
        });
        assert_matches!(nat_config(&off), Err(NatError::BadForward(_)));
    }

    #[test]
    fn ipv6_rejections_name_their_key() {
        for p in ["fd00::/48", "fd00::zz/64", "10.0.0.0/8"] {
            let mut net = nat(NatSpec::default());
            net.ipv6_prefix = Some(p.into());
            assert_matches!(
                validate_all(&[net]),
                Err((k, NatError::BadPrefix6(_))) if k == "network[0].ipv6_prefix",
                "{p}"
            );
        }
        let bad = |s: NatSpec| nat_config(&nat(s)).unwrap_err();
        for g in ["fd00:11::2", "fd00:10:0:2::", "x"] {
            assert_matches!(
                bad(NatSpec {
                    gateway6: Some(g.into()),
                    ..NatSpec::default()
                }),
                NatError::BadGateway6(_),
                "{g}"
            );
        }
        for a in ["::1", "ff02::1", "nope"] {
            assert_matches!(
                bad(NatSpec {
                    host_loopback: true,
                    host_loopback_ip6: Some(a.into()),
                    ..NatSpec::default()
                }),
                NatError::BadLoopback6(_),
                "{a}"
            );
        }
        let mut net = nat(NatSpec {
            gateway6: Some("x".into()),
            ..NatSpec::default()
        });
        net.name = "n".into();
        assert_matches!(validate_all(&[net]), Err((k, _)) if k == "network[0].nat");
    }
}
