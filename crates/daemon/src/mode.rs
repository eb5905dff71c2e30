//! Network modes: a trait and a factory.
//!
//! A mode decides what a network's switch is wired to besides its guest ports: nothing
//! (`internal`), a TAP the host sees (`host-only`), a NAT gateway (`nat`), an AF_PACKET uplink
//! (`bridged`). [`alloc_mode`] builds the switch and the mode's own ports; the daemon then adds
//! one guest port per configured socket.
//!
//! | mode        | status            | extra ports                          |
//! |-------------|-------------------|--------------------------------------|
//! | `internal`  | implemented       | none                                 |
//! | `null`      | implemented, test | one sink that swallows every frame   |
//! | `host-only` | implemented       | TAP, services (mode_hostonly)        |
//! | `nat`       | implemented       | NAT gateway, services (mode_nat)     |
//! | `bridged`   | implemented       | AF_PACKET uplink (mode_bridged)      |
//!
//! A later mode implements [`NetMode`] in its own module (feature-gated if it pulls in
//! dependencies) and adds one arm to [`alloc_mode`] and [`check`].

use std::sync::Arc;

use thiserror::Error;
use virtnet_switch::{
    DropReason, Frame, NetHdr, PortConfig, PortId, PortSink, PortStatsSnapshot, Switch,
    SwitchConfig,
};

use crate::config::NetworkConfig;

/// VMs on the network talk to each other only.
pub const INTERNAL: &str = "internal";
/// Internal, plus a port that swallows every frame (for tests).
pub const NULL: &str = "null";
/// Modes that exist in the design but are not implemented yet.
pub const NOT_YET: [&str; 0] = [];

/// Errors of choosing or starting a mode.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ModeError {
    /// Not a mode virtnet knows.
    #[error("Unknown mode {0:?} (known: internal, null, host-only, nat, bridged)")]
    Unknown(String),
    /// The mode's own ports (a TAP, the services) cannot start.
    #[error("{0}")]
    Start(String),
    /// A known mode that a later version implements.
    #[error("Mode {0:?} is not implemented yet")]
    NotImplemented(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, ModeError>;

/// A port the mode added to the switch (an uplink, a gateway), for stats.
#[derive(Clone, Debug)]
pub struct ModePort {
    /// Its id on the switch.
    pub id: PortId,
    /// Its name.
    pub name: String,
}

/// A running network mode: owns the switch and whatever the mode wires to it.
pub trait NetMode: Send + Sync {
    /// The mode's name, as in the config file.
    fn name(&self) -> &'static str;

    /// The network's switch; guest ports join it.
    fn switch(&self) -> &Arc<Switch>;

    /// The ports the mode added itself (not guest ports).
    fn extra_ports(&self) -> Vec<ModePort> {
        Vec::new()
    }

    /// The network services' counters and DHCP leases, if the mode runs services.
    fn services(&self) -> Option<crate::mode_hostonly::ServicesReport> {
        None
    }

    /// The NAT gateway's counters (flows, denials, drops), if the mode runs one.
    fn nat(&self) -> Option<crate::control::Counters> {
        None
    }

    /// The uplink's own counters (ring drops, VLAN filtering…), if the mode has one.
    fn uplink(&self) -> Option<crate::control::Counters> {
        None
    }

    /// Periodic housekeeping from the control loop (FDB ageing, leases…).
    fn tick(&self) {
        self.switch().age();
    }

    /// Stop the mode's own ports. Guest ports are stopped by the daemon before this.
    fn shutdown(self: Box<Self>);
}

/// Is `mode` a mode this build can run? Used by config validation.
pub fn check(mode: &str) -> Result<()> {
    match mode {
        INTERNAL
        | NULL
        | crate::mode_hostonly::HOST_ONLY
        | crate::mode_bridged::BRIDGED
        | crate::mode_nat::NAT => Ok(()),
        m if NOT_YET.contains(&m) => Err(ModeError::NotImplemented(m.to_string())),
        m => Err(ModeError::Unknown(m.to_string())),
    }
}

/// Build the network's switch and the mode's own ports.
pub fn alloc_mode(net: &NetworkConfig) -> Result<Box<dyn NetMode>> {
    check(&net.mode)?;
    let switch = Switch::new(SwitchConfig {
        name: net.name.clone(),
        ageing_secs: net.ageing_secs,
        ..SwitchConfig::default()
    });
    match net.mode.as_str() {
        NULL => Ok(Box::new(NullMode::new(switch))),
        crate::mode_bridged::BRIDGED => Ok(Box::new(crate::mode_bridged::BridgedMode::start(
            switch, net,
        )?)),
        crate::mode_nat::NAT => Ok(Box::new(crate::mode_nat::NatMode::start(switch, net)?)),
        crate::mode_hostonly::HOST_ONLY => Ok(Box::new(crate::mode_hostonly::HostOnlyMode::start(
            switch, net,
        )?)),
        INTERNAL if crate::mode_hostonly::applies(net) => Ok(Box::new(
            crate::mode_hostonly::InternalWithServices::start(switch, net)?,
        )),
        _ => Ok(Box::new(InternalMode { switch })),
    }
}

/// `internal`: a switch and nothing else.
pub struct InternalMode {
    switch: Arc<Switch>,
}

impl NetMode for InternalMode {
    fn name(&self) -> &'static str {
        INTERNAL
    }

    fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    fn shutdown(self: Box<Self>) {}
}

/// Swallows every frame delivered to it.
struct NullSink;

impl PortSink for NullSink {
    fn deliver(&self, _frame: &dyn Frame, _hdr: &NetHdr) -> std::result::Result<(), DropReason> {
        Ok(())
    }
}

/// `null`: an internal switch plus one port that accepts and discards every frame, so a
/// lone guest's broadcasts are counted as delivered somewhere. For tests.
pub struct NullMode {
    switch: Arc<Switch>,
    port: PortId,
}

impl NullMode {
    fn new(switch: Arc<Switch>) -> Self {
        let port = switch.add_port(
            PortConfig {
                name: "null".into(),
                vlan: None,
            },
            Arc::new(NullSink),
        );
        NullMode { switch, port }
    }

    /// The sink port's counters.
    pub fn sink_stats(&self) -> Option<PortStatsSnapshot> {
        self.switch.port_stats(self.port).map(|s| s.snapshot())
    }
}

impl NetMode for NullMode {
    fn name(&self) -> &'static str {
        NULL
    }

    fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    fn extra_ports(&self) -> Vec<ModePort> {
        vec![ModePort {
            id: self.port,
            name: "null".into(),
        }]
    }

    fn shutdown(self: Box<Self>) {
        self.switch.remove_port(self.port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use assert_matches::assert_matches;
    use virtnet_switch::SliceFrame;

    fn net(mode: &str) -> NetworkConfig {
        NetworkConfig {
            mode: mode.into(),
            ..NetworkConfig::internal("t")
        }
    }

    #[test]
    fn check_classifies_modes() {
        assert_eq!(check("internal"), Ok(()));
        assert_eq!(check("null"), Ok(()));
        assert_eq!(check("nat"), Ok(()));
        assert_eq!(check("host-only"), Ok(()));
        assert_eq!(check("bridged"), Ok(()));
        assert_matches!(check("Internal"), Err(ModeError::Unknown(m)) if m == "Internal");
        assert_eq!(
            ModeError::NotImplemented("nat".into()).to_string(),
            "Mode \"nat\" is not implemented yet"
        );
    }

    #[test]
    fn alloc_rejects_what_check_rejects() {
        assert_matches!(alloc_mode(&net("x")).err(), Some(ModeError::Unknown(_)));
    }

    #[test]
    fn internal_mode_has_an_empty_switch() {
        let m = alloc_mode(&net("internal")).unwrap();
        assert_eq!(m.name(), "internal");
        assert!(m.switch().ports().is_empty());
        assert!(m.extra_ports().is_empty());
        assert_eq!(m.switch().config().name, "t");
        m.tick();
        m.shutdown();
    }

    #[test]
    fn null_mode_swallows_frames() {
        let m = alloc_mode(&net("null")).unwrap();
        assert_eq!(m.name(), "null");
        let extra = m.extra_ports();
        assert_eq!(extra.len(), 1);
        let sw = m.switch().clone();
        // A second port sends a broadcast: it floods to the null port, which takes it.
        struct Nop;
        impl PortSink for Nop {
            fn deliver(&self, _f: &dyn Frame, _h: &NetHdr) -> std::result::Result<(), DropReason> {
                Ok(())
            }
        }
        let src = sw.add_port(PortConfig::default(), Arc::new(Nop));
        let mut frame = [0u8; 60];
        frame[..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        let mut batch = sw.new_batch();
        sw.begin(&mut batch);
        sw.forward(&mut batch, src, &SliceFrame(&frame), &NetHdr::default());
        sw.end(&mut batch);
        let s = sw.port_stats(extra[0].id).unwrap().snapshot();
        assert_eq!((s.tx_frames, s.tx_bytes), (1, 60));
        m.shutdown();
        assert_eq!(sw.ports().len(), 1);
    }
}
