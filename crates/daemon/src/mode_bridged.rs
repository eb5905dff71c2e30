//! `bridged` networks (VMware's VMnet0): guests on the host's LAN through an AF_PACKET uplink.
//!
//! ```toml
//! [[network]]
//! name = "lan"
//! mode = "bridged"
//! uplink = "eth1"        # required: the host NIC
//! uplink_vlan = 100      # optional: tag this network's frames with 802.1Q VLAN 100 on the wire
//! uplink_queues = 2      # optional: reader threads joined with PACKET_FANOUT (default 1)
//! ```
//!
//! One bridged network is one switch whose uplink port is a
//! [`virtnet_port_afpacket::AfPacketPort`] on `uplink`. Guests keep their own MACs on the LAN
//! and take addresses from the LAN's DHCP server; virtnet runs no services here. Several
//! bridged networks may share a NIC when each has its own `uplink_vlan` (at most one of them
//! untagged): that is the recommended way to keep them apart.
//!
//! Needs `CAP_NET_RAW` to open the sockets (virtnetd says so when it lacks it). The host
//! cannot talk to its guests through the uplink (see the port crate's docs for why, and the
//! `host-only` or macvlan workaround).

use std::sync::Arc;

use thiserror::Error;
use virtnet_port_afpacket::{AfPacketConfig, AfPacketPort, MAX_QUEUES};
use virtnet_switch::Switch;

use crate::config::NetworkConfig;
use crate::control::Counters;
use crate::mode::{ModeError, ModePort, NetMode};

/// The mode's name in the config file.
pub const BRIDGED: &str = "bridged";

/// What is wrong with a network's bridged keys.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BridgedError {
    /// A bridged network without `uplink`.
    #[error("A bridged network needs an uplink interface (uplink = \"eth1\")")]
    NoUplink,
    /// `uplink*` keys on a network of another mode.
    #[error("Only bridged networks have an uplink")]
    NotBridged,
    /// Not a valid interface name.
    #[error("Invalid interface name {0:?}")]
    BadUplink(String),
    /// VLAN id outside 1..=4094.
    #[error("VLAN id {0} is out of range 1..=4094")]
    BadVlan(u32),
    /// Queue count outside 1..=16.
    #[error("{0} queues is out of range 1..={MAX_QUEUES}")]
    BadQueues(u32),
    /// Two bridged networks on the same NIC and VLAN.
    #[error("Uplink {uplink} (VLAN {vlan}) is already used by {first}")]
    Shared {
        /// The NIC.
        uplink: String,
        /// The VLAN, or "none".
        vlan: String,
        /// The key of the first network using it.
        first: String,
    },
}

/// Check one network's bridged keys; returns the key the error is about with it.
pub fn validate(net: &NetworkConfig) -> Result<(), (&'static str, BridgedError)> {
    if net.mode != BRIDGED {
        if net.uplink.is_some() {
            return Err(("uplink", BridgedError::NotBridged));
        }
        if net.uplink_vlan.is_some() {
            return Err(("uplink_vlan", BridgedError::NotBridged));
        }
        if net.uplink_queues.is_some() {
            return Err(("uplink_queues", BridgedError::NotBridged));
        }
        return Ok(());
    }
    let Some(up) = &net.uplink else {
        return Err(("uplink", BridgedError::NoUplink));
    };
    if virtnet_port_afpacket::check_name(up).is_err() {
        return Err(("uplink", BridgedError::BadUplink(up.clone())));
    }
    if let Some(v) = net.uplink_vlan {
        if !(1..=4094).contains(&v) {
            return Err(("uplink_vlan", BridgedError::BadVlan(v)));
        }
    }
    if let Some(q) = net.uplink_queues {
        if !(1..=u32::from(MAX_QUEUES)).contains(&q) {
            return Err(("uplink_queues", BridgedError::BadQueues(q)));
        }
    }
    Ok(())
}

/// Check every network's bridged keys, and that no two share a NIC and VLAN.
pub fn validate_all(nets: &[NetworkConfig]) -> Result<(), (String, BridgedError)> {
    let mut used: Vec<(&str, Option<u32>, String)> = Vec::new();
    for (i, net) in nets.iter().enumerate() {
        let key = format!("network[{i}]");
        validate(net).map_err(|(k, e)| (format!("{key}.{k}"), e))?;
        let Some(up) = net.uplink.as_deref() else {
            continue;
        };
        if let Some((_, _, first)) = used
            .iter()
            .find(|(u, v, _)| *u == up && *v == net.uplink_vlan)
        {
            return Err((
                format!("{key}.uplink"),
                BridgedError::Shared {
                    uplink: up.to_string(),
                    vlan: net
                        .uplink_vlan
                        .map_or_else(|| "none".to_string(), |v| v.to_string()),
                    first: first.clone(),
                },
            ));
        }
        used.push((up, net.uplink_vlan, format!("{key}.uplink")));
    }
    Ok(())
}

/// The uplink settings of a (validated) bridged network.
pub fn uplink_config(net: &NetworkConfig) -> Result<AfPacketConfig, ModeError> {
    validate(net).map_err(|(k, e)| ModeError::Start(format!("{k}: {e}")))?;
    let mut c = AfPacketConfig::new(net.uplink.as_deref().unwrap_or_default());
    c.vlan = net.uplink_vlan.and_then(|v| u16::try_from(v).ok());
    c.queues = net
        .uplink_queues
        .and_then(|q| u16::try_from(q).ok())
        .unwrap_or(1);
    Ok(c)
}

/// `bridged`: a switch and an AF_PACKET uplink.
pub struct BridgedMode {
    switch: Arc<Switch>,
    uplink: AfPacketPort,
}

impl BridgedMode {
    /// Open the uplink on the network's NIC.
    pub fn start(switch: Arc<Switch>, net: &NetworkConfig) -> Result<Self, ModeError> {
        let cfg = uplink_config(net)?;
        let uplink = AfPacketPort::start(switch.clone(), &cfg)
            .map_err(|e| ModeError::Start(crate::error_line(&e)))?;
        Ok(BridgedMode { switch, uplink })
    }

    /// The uplink's counters.
    pub fn uplink_stats(&self) -> virtnet_port_afpacket::AfPacketStats {
        self.uplink.stats()
    }
}

impl NetMode for BridgedMode {
    fn name(&self) -> &'static str {
        BRIDGED
    }

    fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    fn extra_ports(&self) -> Vec<ModePort> {
        let name = match self.uplink.vlan() {
            Some(v) => format!("uplink:{}.{v}", self.uplink.ifname()),
            None => format!("uplink:{}", self.uplink.ifname()),
        };
        vec![ModePort {
            id: self.uplink.port_id(),
            name,
        }]
    }

    fn uplink(&self) -> Option<Counters> {
        let s = self.uplink.stats();
        Some(Counters::from_pairs(&[
            ("rx_frames", s.rx_frames),
            ("rx_bytes", s.rx_bytes),
            ("rx_vlan_filtered", s.rx_vlan_filtered),
            ("rx_errors", s.rx_errors),
            ("rx_ring_drops", s.rx_ring_drops),
            ("tx_ring_frames", s.tx_ring_frames),
            ("tx_sendmsg_frames", s.tx_sendmsg_frames),
            ("tx_ring_full", s.tx_ring_full),
            ("tx_errors", s.tx_errors),
            ("tx_kicks", s.tx_kicks),
        ]))
    }

    fn shutdown(self: Box<Self>) {
        self.uplink.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use assert_matches::assert_matches;

    fn bridged(uplink: Option<&str>) -> NetworkConfig {
        NetworkConfig {
            mode: BRIDGED.into(),
            uplink: uplink.map(str::to_string),
            ..NetworkConfig::internal("lan")
        }
    }

    #[test]
    fn every_rejection_names_its_key() {
        assert_eq!(validate(&bridged(Some("eth1"))), Ok(()));
        assert_eq!(
            validate(&bridged(None)),
            Err(("uplink", BridgedError::NoUplink))
        );
        assert_matches!(
            validate(&bridged(Some("a b"))),
            Err(("uplink", BridgedError::BadUplink(_)))
        );
        let mut n = bridged(Some("eth1"));
        n.uplink_vlan = Some(4095);
        assert_eq!(
            validate(&n),
            Err(("uplink_vlan", BridgedError::BadVlan(4095)))
        );
        n.uplink_vlan = Some(100);
        n.uplink_queues = Some(0);
        assert_eq!(
            validate(&n),
            Err(("uplink_queues", BridgedError::BadQueues(0)))
        );
        n.uplink_queues = Some(2);
        assert_eq!(validate(&n), Ok(()));
        let mut i = NetworkConfig::internal("i");
        i.uplink_vlan = Some(5);
        assert_eq!(validate(&i), Err(("uplink_vlan", BridgedError::NotBridged)));
    }

    #[test]
    fn networks_share_a_nic_only_on_different_vlans() {
        let a = bridged(Some("eth1"));
        let mut b = bridged(Some("eth1"));
        b.name = "b".into();
        let e = validate_all(&[a.clone(), b.clone()]).unwrap_err();
        assert_eq!(e.0, "network[1].uplink");
        assert_eq!(
            e.1.to_string(),
            "Uplink eth1 (VLAN none) is already used by network[0].uplink"
        );
        b.uplink_vlan = Some(10);
        assert_eq!(validate_all(&[a, b.clone()]), Ok(()));
        let mut c = b.clone();
        c.name = "c".into();
        assert_matches!(validate_all(&[b, c]), Err((_, BridgedError::Shared { .. })));
    }

    #[test]
    fn uplink_config_carries_the_keys() {
        let mut n = bridged(Some("eth1"));
        n.uplink_vlan = Some(42);
        n.uplink_queues = Some(4);
        let c = uplink_config(&n).unwrap();
        assert_eq!(
            (c.ifname.as_str(), c.vlan, c.queues, c.promisc),
            ("eth1", Some(42), 4, true)
        );
    }

    #[test]
    fn a_missing_nic_is_a_start_error() {
        let sw = Switch::new(Default::default());
        let e = BridgedMode::start(sw, &bridged(Some("no-such-nic0")))
            .err()
            .unwrap();
        assert_matches!(&e, ModeError::Start(m) if m.contains("no-such-nic0 not found"));
    }
}
