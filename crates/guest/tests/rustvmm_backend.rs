//! The driver against a small virtio-net device built on rust-vmm's `vhost-user-backend` and
//! `virtio-queue` (an implementation of the device side of the ring that is independent of
//! ours). Unlike DPDK it offers `VHOST_USER_PROTOCOL_F_CONFIG` and a control queue, so this
//! covers the config space, control commands, `set_queue_pairs`, EVENT_IDX kick/interrupt
//! suppression in both directions, and mergeable RX.
//!
//! The device ("macswap loopback") returns every TX frame on the same pair's RX queue with the
//! MAC addresses swapped, and answers control commands, recording them.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use virtnet_guest::virtio_net::*;
use virtnet_guest::{Error, Guest, GuestConfig, NetHdr};

const PAIRS: u16 = 2;
const CTRL_Q: u16 = 2 * PAIRS;
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

type Cmds = Arc<Mutex<Vec<(u8, u8, Vec<u8>)>>>;

struct LoopNet {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    acked: u64,
    event_idx: bool,
    cmds: Cmds,
    kicks: Arc<Mutex<u64>>,
}

const DEV_FEATURES: u64 = F_CSUM
    | F_GUEST_CSUM
    | F_MTU
    | F_MAC
    | F_MRG_RXBUF
    | F_STATUS
    | F_CTRL_VQ
    | F_CTRL_RX
    | F_MQ
    | F_INDIRECT_DESC
    | F_EVENT_IDX
    | F_PROTOCOL_FEATURES
    | F_VERSION_1;

impl LoopNet {
    fn hdr_len(&self) -> usize {
        hdr_len(self.acked)
    }

    fn process_tx(&mut self, vrings: &[VringRwLock], tx: usize) -> std::io::Result<()> {
        let mem = self.mem.memory();
        let hlen = self.hdr_len();
        let mrg = self.acked & F_MRG_RXBUF != 0;
        loop {
            vrings[tx].disable_notification().unwrap();
            loop {
                let chain = vrings[tx]
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let mut r = chain.reader(&mem).unwrap();
                let mut bytes = Vec::new();
                r.read_to_end(&mut bytes)?;
                vrings[tx].add_used(head, 0).unwrap();
                if bytes.len() >= hlen + 12 {
                    let (h, _) = decode_hdr(&bytes[..hlen]);
                    let mut frame = bytes[hlen..].to_vec();
                    let (d, s) = frame.split_at_mut(6);
                    d.swap_with_slice(&mut s[..6]);
                    self.deliver(&vrings[tx - 1], &h, &frame, hlen, mrg);
                }
            }
            // The disable → drain → enable loop (re-enabling also clears NO_NOTIFY).
            if !vrings[tx].enable_notification().unwrap() {
                break;
            }
        }
        if vrings[tx].needs_notification().unwrap() {
            vrings[tx].signal_used_queue()?;
        }
        Ok(())
    }

    fn deliver(&self, rx: &VringRwLock, h: &NetHdr, frame: &[u8], hlen: usize, mrg: bool) {
        let mem = self.mem.memory();
        let mut data = vec![0u8; hlen];
        encode_hdr(h, 1, &mut data);
        data.extend_from_slice(frame);
        let mut off = 0;
        let mut first: Option<GuestAddress> = None;
        let mut nbufs = 0u16;
        while off < data.len() {
            let chain = rx
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else {
                // Out of RX buffers: a real device would drop and count.
                return;
            };
            let head = chain.head_index();
            let d = chain.writable().next().expect("writable RX buffer");
            let n = (d.len() as usize).min(data.len() - off);
            if !mrg && n < data.len() {
                rx.add_used(head, 0).unwrap();
                return;
            }
            mem.write_slice(&data[off..off + n], d.addr()).unwrap();
            first.get_or_insert(d.addr());
            rx.add_used(head, n as u32).unwrap();
            off += n;
            nbufs += 1;
        }
        if mrg && hlen == 12 {
            let at = first.unwrap().unchecked_add(10);
            mem.write_slice(&nbufs.to_le_bytes(), at).unwrap();
        }
        if rx.needs_notification().unwrap() {
            rx.signal_used_queue().unwrap();
        }
    }

    fn process_ctrl(&mut self, vring: &VringRwLock) -> std::io::Result<()> {
        let mem = self.mem.memory();
        vring.disable_notification().unwrap();
        loop {
            // Bind first: the queue guard must be gone before add_used() locks again.
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else {
                if vring.enable_notification().unwrap() {
                    vring.disable_notification().unwrap();
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let mut r = chain.clone().reader(&mem).unwrap();
            let mut w = chain.writer(&mem).unwrap();
            let mut cmd = Vec::new();
            r.read_to_end(&mut cmd)?;
            let ok = match (cmd.first(), cmd.get(1)) {
                (Some(&CTRL_RX), Some(&(CTRL_RX_PROMISC | CTRL_RX_ALLMULTI))) => cmd.len() == 3,
                (Some(&CTRL_MAC), Some(&CTRL_MAC_TABLE_SET)) => true,
                (Some(&CTRL_MQ), Some(&CTRL_MQ_VQ_PAIRS_SET)) => {
                    let n = u16::from_le_bytes([cmd[2], cmd[3]]);
                    (1..=PAIRS).contains(&n)
                }
                _ => false,
            };
            w.write_all(&[if ok { CTRL_OK } else { CTRL_ERR }])?;
            vring.add_used(head, 1).unwrap();
            if cmd.len() >= 2 {
                self.cmds
                    .lock()
                    .unwrap()
                    .push((cmd[0], cmd[1], cmd[2..].to_vec()));
            }
        }
        vring.signal_used_queue()
    }
}

impl VhostUserBackendMut for LoopNet {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(2 * PAIRS + 1)
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        DEV_FEATURES
    }

    fn acked_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut cfg = Vec::new();
        cfg.extend_from_slice(&MAC);
        cfg.extend_from_slice(&S_LINK_UP.to_le_bytes());
        cfg.extend_from_slice(&PAIRS.to_le_bytes());
        cfg.extend_from_slice(&1500u16.to_le_bytes());
        cfg.resize(64, 0);
        let o = offset as usize;
        cfg.get(o..o + size as usize)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.mem = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1 << (2 * PAIRS + 1)) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Lets the daemon stop its worker thread when the guest disconnects.
        new_event_consumer_and_notifier(EventFlag::empty()).ok()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        *self.kicks.lock().unwrap() += 1;
        match device_event {
            CTRL_Q => self.process_ctrl(&vrings[usize::from(CTRL_Q)]),
            q if q % 2 == 1 && q < CTRL_Q => self.process_tx(vrings, usize::from(q)),
            // RX kicks: buffers were posted; nothing is queued in this device.
            _ => Ok(()),
        }
    }
}

struct Device {
    sock: PathBuf,
    cmds: Cmds,
    kicks: Arc<Mutex<u64>>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Device {
    fn start() -> Device {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("loop.sock");
        let cmds = Cmds::default();
        let kicks = Arc::new(Mutex::new(0));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(RwLock::new(LoopNet {
            mem: mem.clone(),
            acked: 0,
            event_idx: false,
            cmds: cmds.clone(),
            kicks: kicks.clone(),
        }));
        let path = sock.clone();
        let thread = std::thread::spawn(move || {
            let mut d = VhostUserDaemon::new("loopnet".into(), backend, mem).unwrap();
            // Ends when the guest disconnects.
            let _ = d.serve(&path);
        });
        Device {
            sock,
            cmds,
            kicks,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn join(mut self) {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = seed.wrapping_add(i as u8);
    }
    f
}

fn check_echo(sent: &[u8], got: &[u8]) {
    assert_eq!(got.len(), sent.len());
    assert_eq!(&got[..6], &sent[6..12]);
    assert_eq!(&got[6..12], &sent[..6]);
    assert_eq!(&got[12..], &sent[12..]);
}

#[test]
fn handshake_config_space_and_features() {
    let dev = Device::start();
    // The socket appears a moment after start(): connect must retry on ENOENT.
    let g = Guest::connect(&dev.sock, GuestConfig::default()).unwrap();
    assert_eq!(g.acked_features(), DEV_FEATURES & DEFAULT_FEATURES);
    assert!(g
        .protocol_features()
        .contains(VhostUserProtocolFeatures::CONFIG));
    assert_eq!(g.mac(), Some(MAC));
    assert_eq!(g.mtu(), Some(1500));
    assert_eq!(g.link_up(), Some(true));
    assert_eq!(g.device_max_queue_pairs(), PAIRS);
    assert_eq!(g.queue_pairs(), 1);
    // Pair 0 and the control queue at 2 * max_virtqueue_pairs.
    assert_eq!(g.queue_indices(), vec![0, 1, CTRL_Q]);
    assert_eq!(g.hdr_len(), 12);
    assert_eq!(g.rx_buffer_size(), 2048);
    g.disconnect();
    dev.join();
}

#[test]
fn echo_with_mergeable_rx_and_indirect_tx() {
    let dev = Device::start();
    let mut g = Guest::connect(&dev.sock, GuestConfig::default()).unwrap();
    for (i, len) in [60usize, 1514, 2036, 2037, 4000, 9000, 65550]
        .iter()
        .enumerate()
    {
        let f = frame(*len, i as u8);
        g.send(0, &NetHdr::NONE, &f).unwrap();
        let r = g.recv(0, Duration::from_secs(5)).unwrap().expect("echo");
        check_echo(&f, &r.frame);
        // 2048-byte buffers hold 2036 frame bytes after the 12-byte header.
        assert_eq!(
            usize::from(r.num_buffers),
            (len + 12).div_ceil(2048),
            "len {len}"
        );
    }
    // Offload metadata crosses untouched.
    let h = NetHdr {
        flags: virtnet_switch::hdr::FLAG_NEEDS_CSUM,
        gso_type: 0,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 34,
        csum_offset: 6,
    };
    g.send(0, &h, &frame(100, 9)).unwrap();
    assert_eq!(g.recv(0, Duration::from_secs(5)).unwrap().unwrap().hdr, h);
    assert!(matches!(
        g.send(0, &NetHdr::NONE, &[0; MAX_FRAME_LEN_PLUS_ONE]),
        Err(Error::FrameTooLarge { .. })
    ));
    g.disconnect();
    dev.join();
}

const MAX_FRAME_LEN_PLUS_ONE: usize = virtnet_guest::MAX_FRAME_LEN + 1;

#[test]
fn event_idx_suppresses_kicks_under_load() {
    let dev = Device::start();
    let mut g = Guest::connect(&dev.sock, GuestConfig::default()).unwrap();
    assert_ne!(g.acked_features() & F_EVENT_IDX, 0);
    let total = 3000;
    let (mut sent, mut got) = (0, 0);
    while got < total {
        if sent < total {
            sent += g
                .send_batch(0, (total - sent).min(32), |i, buf| {
                    let f = frame(64, (sent + i) as u8);
                    buf[..64].copy_from_slice(&f);
                    Some((NetHdr::NONE, 64))
                })
                .unwrap();
        }
        got += g
            .drain_with(0, 256, |_, f| assert_eq!(f.len(), 64))
            .unwrap();
        if got < sent {
            if g.recv(0, Duration::from_secs(2)).unwrap().is_some() {
                got += 1;
            } else {
                panic!("lost frames: sent {sent} got {got}");
            }
        }
    }
    let st = g.stats();
    eprintln!(
        "stats {st:?}, device saw {} kicks",
        dev.kicks.lock().unwrap()
    );
    assert_eq!(st.tx_frames, total as u64);
    assert_eq!(st.rx_frames, total as u64);
    assert!(
        st.kicks < st.tx_frames,
        "no kick was ever suppressed: {st:?}"
    );
    g.disconnect();
    dev.join();
}

#[test]
fn no_event_idx_no_mrg_legacy_header_paths() {
    let dev = Device::start();
    let mut g = Guest::connect(
        &dev.sock,
        GuestConfig {
            features: DEFAULT_FEATURES & !(F_EVENT_IDX | F_MRG_RXBUF | F_INDIRECT_DESC),
            rx_buffer_size: 9100,
            queue_size: 32,
            mem_size: 8 << 20,
            ..GuestConfig::default()
        },
    )
    .unwrap();
    assert_eq!(g.hdr_len(), 12);
    for len in [60usize, 9000, 100] {
        let f = frame(len, 3);
        g.send(0, &NetHdr::NONE, &f).unwrap();
        let r = g.recv(0, Duration::from_secs(5)).unwrap().unwrap();
        check_echo(&f, &r.frame);
        assert_eq!(r.num_buffers, 1);
    }
    // A frame larger than one RX buffer cannot be delivered without MRG_RXBUF.
    g.send(0, &NetHdr::NONE, &frame(9100, 1)).unwrap();
    assert!(matches!(
        g.recv(0, Duration::from_secs(1)),
        Err(Error::Device { .. }) | Ok(None)
    ));
    g.disconnect();
    dev.join();
}

#[test]
fn control_queue_commands_and_multiqueue() {
    let dev = Device::start();
    let mut g = Guest::connect(
        &dev.sock,
        GuestConfig {
            queue_pairs: 4,
            ..GuestConfig::default()
        },
    )
    .unwrap();
    // Clamped to the device's max_virtqueue_pairs; connect sent VQ_PAIRS_SET(2).
    assert_eq!(g.queue_pairs(), 2);
    assert_eq!(g.queue_indices(), vec![0, 1, 2, 3, CTRL_Q]);
    g.set_promisc(true).unwrap();
    g.set_allmulti(false).unwrap();
    g.set_mac_table(&[[2, 0, 0, 0, 0, 9]], &[]).unwrap();
    g.set_queue_pairs(1).unwrap();
    assert_eq!(g.active_queue_pairs(), 1);
    g.set_queue_pairs(2).unwrap();
    assert!(matches!(
        g.set_queue_pairs(3),
        Err(Error::NoSuchQueuePair(3))
    ));
    assert_eq!(g.ctrl(99, 1, &[1, 2, 3]).unwrap(), CTRL_ERR);
    assert!(matches!(
        g.set_mac([2, 0, 0, 0, 0, 1]),
        Err(Error::CtrlRejected {
            class: CTRL_MAC,
            cmd: CTRL_MAC_ADDR_SET,
            ack: CTRL_ERR
        })
    ));
    let cmds = dev.cmds.lock().unwrap().clone();
    assert_eq!(
        cmds,
        vec![
            (CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, vec![2, 0]),
            (CTRL_RX, CTRL_RX_PROMISC, vec![1]),
            (CTRL_RX, CTRL_RX_ALLMULTI, vec![0]),
            (
                CTRL_MAC,
                CTRL_MAC_TABLE_SET,
                vec![1, 0, 0, 0, 2, 0, 0, 0, 0, 9, 0, 0, 0, 0]
            ),
            (CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, vec![1, 0]),
            (CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, vec![2, 0]),
            (99, 1, vec![1, 2, 3]),
            (CTRL_MAC, CTRL_MAC_ADDR_SET, vec![2, 0, 0, 0, 0, 1]),
        ]
    );
    // Both pairs carry traffic on their own queues.
    for qp in [1u16, 0] {
        let f = frame(300, qp as u8);
        g.send(qp, &NetHdr::NONE, &f).unwrap();
        check_echo(
            &f,
            &g.recv(qp, Duration::from_secs(5)).unwrap().unwrap().frame,
        );
    }
    g.disconnect();
    dev.join();
}

#[test]
fn connect_times_out_on_missing_socket() {
    let dir = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let r = Guest::connect(
        dir.path().join("nobody.sock"),
        GuestConfig {
            connect_timeout: Duration::from_millis(200),
            ..GuestConfig::default()
        },
    );
    assert!(matches!(r, Err(Error::Connect { .. })));
    assert!(t.elapsed() >= Duration::from_millis(200));
}

#[test]
fn invalid_configs_are_rejected_before_connecting() {
    for cfg in [
        GuestConfig {
            queue_size: 100,
            ..GuestConfig::default()
        },
        GuestConfig {
            queue_pairs: 0,
            ..GuestConfig::default()
        },
        GuestConfig {
            tx_buffer_size: 512,
            ..GuestConfig::default()
        },
        GuestConfig {
            mem_size: 1000,
            ..GuestConfig::default()
        },
        GuestConfig {
            rx_buffers: Some(300),
            ..GuestConfig::default()
        },
    ] {
        assert!(matches!(
            Guest::connect("/nonexistent/x.sock", cfg),
            Err(Error::InvalidConfig(_))
        ));
    }
}

#[test]
fn silent_backend_fails_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mute.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = std::time::Instant::now();
    let r = Guest::connect(
        &path,
        GuestConfig {
            io_timeout: Duration::from_millis(100),
            ..GuestConfig::default()
        },
    );
    assert!(matches!(r, Err(Error::Vhost { .. })), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
    drop(listener);
}
