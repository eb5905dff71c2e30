//! A two-VM internal network in a few lines: one switch, two vhost-user virtio-net ports, and
//! two user-space guest drivers standing in for the VMs. Any vhost-user frontend (QEMU,
//! cloud-hypervisor, DPDK virtio_user) can take a guest driver's place on the same socket.
//!
//! `cargo run --example two_vms`

use std::time::Duration;

use anyhow::{Context, Result};
use virtnet::guest::{Guest, GuestConfig};
use virtnet::switch::{MacAddr, NetHdr, Switch, SwitchConfig};
use virtnet::virtio::{NetConfig, NetPort};

fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let switch = Switch::new(SwitchConfig::default());

    // Two device ports, listening like virtnetd does. A VMM connects with
    // `-chardev socket,path=<sock> -netdev vhost-user,chardev=...`.
    let port = |n: u8| -> Result<NetPort> {
        let config = NetConfig {
            name: format!("vm{n}"),
            mac: Some(MacAddr([0x52, 0x54, 0, 0, 0, n])),
            ..Default::default()
        };
        Ok(NetPort::listen(
            switch.clone(),
            config,
            &dir.path().join(format!("vm{n}.sock")),
        )?)
    };
    let (p1, p2) = (port(1)?, port(2)?);

    // The "VMs": user-space virtio-net drivers over the same sockets.
    let mut vm1 = Guest::connect(p1.socket_path(), GuestConfig::default())?;
    let mut vm2 = Guest::connect(p2.socket_path(), GuestConfig::default())?;
    println!("vm1 negotiated features {:#x}", vm1.acked_features());
    while !(p1.status().running && p2.status().running) {
        std::thread::sleep(Duration::from_millis(5));
    }

    // vm1 broadcasts; vm2 answers by unicast (the switch has learned vm1's MAC by then).
    let mut frame = vec![0u8; 60];
    frame[..6].copy_from_slice(&MacAddr::BROADCAST.0);
    frame[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    frame[14..19].copy_from_slice(b"hello");
    vm1.send(0, &NetHdr::NONE, &frame)?;
    let got = vm2
        .recv(0, Duration::from_secs(2))?
        .context("vm2 got nothing")?;
    println!(
        "vm2 received {} bytes: {:?}",
        got.frame.len(),
        &got.frame[14..19]
    );

    let mut reply = got.frame.clone();
    reply[..6].copy_from_slice(&got.frame[6..12]);
    reply[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
    vm2.send(0, &NetHdr::NONE, &reply)?;
    let back = vm1
        .recv(0, Duration::from_secs(2))?
        .context("vm1 got nothing")?;
    println!(
        "vm1 received the unicast reply ({} bytes)",
        back.frame.len()
    );

    for p in [&p1, &p2] {
        let s = p.stats();
        println!(
            "{}: switch rx {} frames, tx {} frames, flooded {}, drops {}",
            p.socket_path().display(),
            s.rx_frames,
            s.tx_frames,
            s.flooded,
            s.total_drops()
        );
    }
    Ok(())
}
