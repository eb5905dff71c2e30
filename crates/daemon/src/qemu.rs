//! QEMU command-line hints: the options that attach a VM to a port.
//!
//! Correct for QEMU 7.2 on a TCG-only host (see shared/notes/real-peers.md):
//! - vhost-user needs guest memory shared with the backend: a `memory-backend-memfd` with
//!   `share=on` as the machine's memory;
//! - `reconnect=1` lets QEMU reconnect when virtnetd restarts;
//! - `vectors=0` works around a QEMU 7.2 crash with TCG + vhost-user + MSI-X (gotcha G2).
//!   Under KVM drop it (or use `vectors=2*N+2` with N queue pairs).

use std::fmt::Write;

use crate::config::{Config, NetworkConfig, PortSpec, DEFAULT_MTU};

/// QEMU's default (and, for rx, minimum) virtio-net ring size.
pub const QEMU_QUEUE_SIZE: u32 = 256;

/// Guest memory size used in the hints (the memory backend must match `-m`).
pub const HINT_MEMORY: &str = "512M";

/// The QEMU options for one port. `index` makes the chardev/netdev ids unique when one VM takes
/// several ports (`vnet<index>`, `net<index>`); the memory backend is once per VM.
pub fn port_args(port: &PortSpec, mtu: u32, index: usize) -> String {
    let mut s = format!(
        "-object memory-backend-memfd,id=mem,size={HINT_MEMORY},share=on -machine memory-backend=mem \
         -chardev socket,id=vnet{index},path={},reconnect=1 \
         -netdev vhost-user,id=net{index},chardev=vnet{index}",
        port.socket.display()
    );
    if port.queue_pairs > 1 {
        let _ = write!(s, ",queues={}", port.queue_pairs);
    }
    let _ = write!(s, " -device virtio-net-pci,netdev=net{index}");
    if let Some(mac) = port.mac_addr() {
        let _ = write!(s, ",mac={mac}");
    }
    if port.queue_pairs > 1 {
        s.push_str(",mq=on");
    }
    if port.queue_size > QEMU_QUEUE_SIZE {
        // QEMU's rings default to 256 entries; larger ones must be asked for.
        let _ = write!(s, ",rx_queue_size={0},tx_queue_size={0}", port.queue_size);
    }
    if mtu != DEFAULT_MTU {
        let _ = write!(s, ",host_mtu={mtu}");
    }
    s.push_str(",vectors=0");
    s
}

fn network_hints(out: &mut String, net: &NetworkConfig) {
    if net.mode == crate::mode_nat::NAT && !net.ports.is_empty() {
        let subnet = net
            .subnet
            .as_deref()
            .unwrap_or(crate::mode_nat::DEFAULT_NAT_SUBNET);
        let v6 = match crate::mode_nat::v6_of(net) {
            Ok(Some(v6)) => format!(
                " and by SLAAC in {}/{} (gateway {})",
                v6.prefix(),
                v6.prefix_len,
                v6.gateway
            ),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "# network {} is NAT: guests get an address in {subnet} by DHCP{v6}; the gateway \
             is the router and DNS server; nothing reaches in unless forwarded",
            net.name
        );
    }
    for (j, port) in net.ports.iter().enumerate() {
        if port.queue_size < QEMU_QUEUE_SIZE {
            let _ = writeln!(
                out,
                "# note: {} has queue_size {} but QEMU's rings have at least {QEMU_QUEUE_SIZE} entries",
                net.port_name(j),
                port.queue_size
            );
        }
        let _ = writeln!(
            out,
            "# port {} (network {}, {}):\n{}",
            net.port_name(j),
            net.name,
            net.mode,
            port_args(port, net.mtu, 0)
        );
    }
}

/// The hints for every port, one VM per port, with a header explaining them.
pub fn hints(config: &Config) -> String {
    let mut out = String::new();
    if config.networks.iter().all(|n| n.ports.is_empty()) {
        return out;
    }
    out.push_str(
        "# Attach a VM to a port with these qemu-system-x86_64 options (QEMU 7.2; -m must be 512M, or\n\
         # change size=). vectors=0 works around QEMU 7.2's crash with TCG + vhost-user + MSI-X;\n\
         # under KVM drop it. For several ports in one VM keep one memory-backend and number\n\
         # the ids vnet1/net1, ...\n",
    );
    for net in &config.networks {
        network_hints(&mut out, net);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_port_line() {
        let cfg = Config::default();
        let line = port_args(&cfg.networks[0].ports[0], 1500, 0);
        assert_eq!(
            line,
            "-object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem \
             -chardev socket,id=vnet0,path=/run/virtnet/default-0.sock,reconnect=1 \
             -netdev vhost-user,id=net0,chardev=vnet0 \
             -device virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,vectors=0"
        );
    }

    #[test]
    fn multiqueue_mtu_and_no_mac() {
        let mut port = PortSpec::new("/tmp/p.sock");
        port.queue_pairs = 4;
        let line = port_args(&port, 9000, 2);
        assert!(
            line.contains("-netdev vhost-user,id=net2,chardev=vnet2,queues=4"),
            "{line}"
        );
        assert!(
            line.ends_with("-device virtio-net-pci,netdev=net2,mq=on,host_mtu=9000,vectors=0"),
            "{line}"
        );
        assert!(!line.contains("mac="));
    }

    #[test]
    fn queue_sizes() {
        let mut port = PortSpec::new("/tmp/p.sock");
        port.queue_size = 1024;
        let line = port_args(&port, 1500, 0);
        assert!(
            line.contains(",rx_queue_size=1024,tx_queue_size=1024"),
            "{line}"
        );
        let mut cfg = Config::default();
        cfg.networks[0].ports[0].queue_size = 128;
        assert!(hints(&cfg).contains("# note: default-0 has queue_size 128"));
    }

    #[test]
    fn hints_cover_every_port() {
        let h = hints(&Config::default());
        assert_eq!(h.matches("-device virtio-net-pci").count(), 2);
        assert!(h.contains("# port default-1 (network default, nat):"));
        assert!(h.contains("# network default is NAT: guests get an address in 10.0.2.0/24"));
        assert!(
            h.contains("by SLAAC in fd00:10:0:2::/64 (gateway fd00:10:0:2::2)"),
            "{h}"
        );
        assert!(h.contains("vectors=0"));
        let empty = Config {
            networks: vec![],
            ..Config::default()
        };
        assert_eq!(hints(&empty), "");
    }
}
