//! Guest ports: one vhost-user virtio-net device ([`NetPort`]) per configured socket.
//! The only module that talks to `virtnet-virtio`.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;
use virtnet_switch::{MacAddr, Switch};

use crate::config::{NetworkConfig, SocketPerms};
use crate::control::PortReport;

use virtnet_virtio::{NetConfig, NetPort};

/// Errors of starting a guest port.
#[derive(Debug, Error)]
pub enum PortError {
    /// Something already listens on the socket (another virtnetd, a testpmd…).
    #[error("Port {name}: {} is in use by another process", socket.display())]
    InUse {
        /// Port name.
        name: String,
        /// Its socket.
        socket: PathBuf,
    },
    /// The device could not listen on its socket.
    #[error("Port {name} cannot listen on {}", socket.display())]
    Listen {
        /// Port name.
        name: String,
        /// Its socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: virtnet_virtio::Error,
    },
    /// `socket_mode` / `socket_group` could not be applied.
    #[error("Port {name}: cannot set the mode or group of {}", socket.display())]
    Perms {
        /// Port name.
        name: String,
        /// Its socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Give the socket its configured mode and group.
fn set_perms(socket: &std::path::Path, perms: SocketPerms) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(gid) = perms.gid {
        std::os::unix::fs::chown(socket, None, Some(gid))?;
    }
    if let Some(mode) = perms.mode {
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, PortError>;

/// A running guest port.
pub struct GuestPort {
    name: String,
    mac: Option<MacAddr>,
    socket: PathBuf,
    port: NetPort,
}

impl GuestPort {
    /// Start port `index` of `net` on `switch`: the device listens on its socket.
    pub fn listen(
        switch: Arc<Switch>,
        net: &NetworkConfig,
        index: usize,
        perms: SocketPerms,
    ) -> Result<GuestPort> {
        let spec = &net.ports[index];
        let name = net.port_name(index);
        let mac = spec.mac_addr();
        // Never steal a live socket: a stale one (nobody accepting) is replaced by the device.
        if spec.socket.exists() && UnixStream::connect(&spec.socket).is_ok() {
            return Err(PortError::InUse {
                name,
                socket: spec.socket.clone(),
            });
        }
        let config = NetConfig {
            name: name.clone(),
            mac,
            queue_pairs: spec.queue_pairs_u16(),
            queue_size: spec.queue_size_u16(),
            mtu: net.mtu_u16(),
            vlan: spec.vlan_u16(),
        };
        let port =
            NetPort::listen(switch, config, &spec.socket).map_err(|e| PortError::Listen {
                name: name.clone(),
                socket: spec.socket.clone(),
                source: e,
            })?;
        if let Some(us) = spec.busy_poll_us {
            port.device()
                .set_busy_poll(std::time::Duration::from_micros(us.into()));
        }
        if let Err(source) = set_perms(&spec.socket, perms) {
            port.shutdown();
            return Err(PortError::Perms {
                name,
                socket: spec.socket.clone(),
                source,
            });
        }
        tracing::info!(
            "port {name}: listening on {} (switch port {})",
            spec.socket.display(),
            port.port_id().0
        );
        Ok(GuestPort {
            name,
            mac,
            socket: spec.socket.clone(),
            port,
        })
    }

    /// The device's busy-poll window.
    pub fn busy_poll(&self) -> std::time::Duration {
        self.port.device().busy_poll()
    }

    /// The port's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Its status and counters for `stats`.
    pub fn report(&self) -> PortReport {
        let status = self.port.status();
        let mut r = PortReport {
            name: self.name.clone(),
            kind: "guest".into(),
            socket: Some(self.port.socket_path().to_path_buf()),
            port_id: self.port.port_id().0,
            mac: self.mac.map(|m| m.to_string()),
            connected: status.connected,
            driver_ok: status.driver_ok,
            running: status.running,
            connections: status.connections,
            acked_features: status.acked_features,
            active_queue_pairs: status.active_queue_pairs,
            ..PortReport::default()
        };
        r.set_counters(&self.port.stats());
        r
    }

    /// Stop the device and remove its socket.
    pub fn shutdown(self) {
        self.port.shutdown();
        match std::fs::remove_file(&self.socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                "port {}: cannot remove {}: {e}",
                self.name,
                self.socket.display()
            ),
        }
        tracing::info!("port {}: stopped", self.name);
    }
}
