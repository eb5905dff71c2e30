//! Ethernet parsing and switching of arbitrary frames between a few ports.
//!
//! `EthernetFrame::new_checked` + every accessor on the raw bytes, then `Switch::forward` of the
//! frame between 2-6 ports (with VLANs, port removal and re-adding, ageing) whose sinks copy
//! into a fixed buffer. Invariants: nothing panics; a frame is never delivered back to its
//! ingress port, nor to a port of another VLAN; it arrives byte for byte; the counters add up
//! (rx per forward, tx + destination drops = delivery attempts, one flush per touched port).

#![no_main]

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtnet_fuzz::{corrupt, Corruption, FrameSpec};
use virtnet_switch::frame::SlicesFrame;
use virtnet_switch::{
    DropReason, EthernetFrame, Frame, NetHdr, PortConfig, PortId, PortSink, PortStatsSnapshot,
    Switch, SwitchConfig,
};

const BUF: usize = 64 * 1024 + 128;
const NONE: u32 = u32::MAX;

/// What the sinks compare against: the frame being forwarded and where it came from.
struct Current {
    ingress: AtomicU32,
    vlan: AtomicU32,
    frame: Mutex<Vec<u8>>,
}

struct Sink {
    id: AtomicU32,
    vlan: u16,
    fail: AtomicBool,
    attempts: AtomicU64,
    flushes: AtomicU64,
    buf: Mutex<Box<[u8]>>,
    current: Arc<Current>,
}

impl PortSink for Sink {
    fn deliver(&self, frame: &dyn Frame, _hdr: &NetHdr) -> Result<(), DropReason> {
        self.attempts.fetch_add(1, Relaxed);
        let me = self.id.load(Relaxed);
        assert_ne!(
            me,
            self.current.ingress.load(Relaxed),
            "delivered back to ingress"
        );
        assert_eq!(
            u32::from(self.vlan),
            self.current.vlan.load(Relaxed),
            "crossed VLANs"
        );
        let mut buf = self.buf.lock().unwrap();
        let n = frame.len().min(BUF);
        assert_eq!(frame.read_at(0, &mut buf[..n]), n);
        let want = self.current.frame.lock().unwrap();
        assert_eq!(frame.len(), want.len());
        assert_eq!(&buf[..n], &want[..n], "frame changed in transit");
        if self.fail.load(Relaxed) {
            return Err(DropReason::NoRxBuffers);
        }
        Ok(())
    }

    fn flush(&self) {
        self.flushes.fetch_add(1, Relaxed);
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Forward a frame from port `ingress` (modulo the slots), cut in two at `split`.
    Forward {
        ingress: u8,
        frame: FrameSpec,
        /// Rewrite the MACs to one of 8 stations (or broadcast/multicast/zero) to drive learning.
        macs: Option<(u8, u8)>,
        corruptions: Vec<Corruption>,
        truncate: Option<u16>,
        split: u16,
    },
    Remove(u8),
    Add(Option<u16>),
    /// Make a port's sink fail (or succeed again).
    Fail(u8, bool),
    /// Move the batch clock (seconds), for ageing.
    Clock(u16),
    Age,
}

#[derive(Arbitrary, Debug)]
struct Input {
    vlans: Vec<Option<u16>>,
    ops: Vec<Op>,
}

fn mac(n: u8) -> [u8; 6] {
    match n % 11 {
        8 => [0xff; 6],
        9 => [0x01, 0x00, 0x5e, 0, 0, 1],
        10 => [0; 6],
        k => [0x52, 0x54, 0, 0, 0, k],
    }
}

fn check_accessors(b: &[u8]) {
    match EthernetFrame::new_checked(b) {
        Ok(e) => {
            let (_, _, t) = (e.dst(), e.src(), e.ethertype());
            let hl = e.header_len();
            assert!(hl <= b.len());
            assert_eq!(e.vlan_id().is_some(), hl == 18);
            assert_eq!(e.vlan_id().is_some(), t == 0x8100);
            let _ = e.payload_ethertype();
        }
        Err(_) => assert!(b.len() < 18),
    }
}

fuzz_target!(|input: Input| {
    let sw = Switch::new(SwitchConfig {
        max_macs_per_port: 4,
        max_fdb_entries: 16,
        ..SwitchConfig::default()
    });
    let current = Arc::new(Current {
        ingress: AtomicU32::new(NONE),
        vlan: AtomicU32::new(0),
        frame: Mutex::new(Vec::new()),
    });
    let mut ports: Vec<Option<(PortId, Arc<Sink>)>> = Vec::new();
    let add = |ports: &mut Vec<Option<(PortId, Arc<Sink>)>>, vlan: Option<u16>| {
        let vlan = vlan.map(|v| v & 0x0fff);
        let sink = Arc::new(Sink {
            id: AtomicU32::new(NONE),
            vlan: vlan.unwrap_or(0),
            fail: AtomicBool::new(false),
            attempts: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            buf: Mutex::new(vec![0u8; BUF].into_boxed_slice()),
            current: current.clone(),
        });
        let id = sw.add_port(
            PortConfig {
                name: String::new(),
                vlan,
            },
            sink.clone(),
        );
        sink.id.store(id.0, Relaxed);
        let slot = id.0 as usize;
        if ports.len() <= slot {
            ports.resize(slot + 1, None);
        }
        assert!(ports[slot].is_none(), "port id reused while in use");
        ports[slot] = Some((id, sink));
    };
    let n = input.vlans.len().clamp(2, 6);
    for i in 0..n {
        add(&mut ports, input.vlans.get(i).copied().flatten());
    }

    let mut batch = sw.new_batch();
    let mut clock = 0u64;
    let mut frame = Vec::new();
    for op in input.ops.iter().take(64) {
        match op {
            Op::Forward {
                ingress,
                frame: spec,
                macs,
                corruptions,
                truncate,
                split,
            } => {
                spec.build(&mut frame);
                if let Some((d, s)) = macs {
                    if frame.len() >= 12 {
                        frame[..6].copy_from_slice(&mac(*d));
                        frame[6..12].copy_from_slice(&mac(*s));
                    }
                }
                corrupt(&mut frame, corruptions, *truncate);
                check_accessors(&frame);
                let slot = usize::from(*ingress) % ports.len().max(1);
                let Some(Some((id, src_sink))) = ports.get(slot).cloned() else {
                    continue;
                };
                current.ingress.store(id.0, Relaxed);
                current.vlan.store(u32::from(src_sink.vlan), Relaxed);
                current.frame.lock().unwrap().clone_from(&frame);

                let live: Vec<(PortId, Arc<Sink>)> = ports.iter().flatten().cloned().collect();
                let before: Vec<(PortStatsSnapshot, u64, u64)> = live
                    .iter()
                    .map(|(pid, s)| {
                        let st = sw.port_stats(*pid).unwrap().snapshot();
                        (st, s.attempts.load(Relaxed), s.flushes.load(Relaxed))
                    })
                    .collect();

                let cut = usize::from(*split) % (frame.len() + 1);
                let parts: [&[u8]; 2] = [&frame[..cut], &frame[cut..]];
                sw.begin(&mut batch);
                batch.set_now(clock);
                sw.forward(&mut batch, id, &SlicesFrame(&parts), &NetHdr::NONE);
                sw.end(&mut batch);
                current.ingress.store(NONE, Relaxed);

                let mut attempts = 0;
                let mut delivered_or_dropped = 0;
                let mut same_vlan_others = 0;
                let mut ingress_delta = None;
                for ((pid, s), (b, a0, f0)) in live.iter().zip(&before) {
                    let st = sw.port_stats(*pid).unwrap().snapshot();
                    let a = s.attempts.load(Relaxed) - a0;
                    let tx = st.tx_frames - b.tx_frames;
                    let rxdrop = st.drop_count(DropReason::NoRxBuffers)
                        - b.drop_count(DropReason::NoRxBuffers);
                    let flushed = s.flushes.load(Relaxed) - f0;
                    assert_eq!(flushed, u64::from(tx > 0), "one flush per touched port");
                    assert_eq!(tx + rxdrop, a, "every attempt is counted once");
                    assert_eq!(st.tx_bytes - b.tx_bytes, tx * frame.len() as u64);
                    attempts += a;
                    delivered_or_dropped += tx + rxdrop;
                    if *pid == id {
                        assert_eq!(a, 0);
                        ingress_delta = Some((
                            st.rx_frames - b.rx_frames,
                            st.flooded - b.flooded,
                            st.total_drops() - b.total_drops(),
                        ));
                    } else if s.vlan == src_sink.vlan {
                        same_vlan_others += 1;
                    }
                }
                assert_eq!(attempts, delivered_or_dropped);
                let (rx, flooded, dropped) = ingress_delta.expect("ingress is live");
                assert_eq!(rx, 1, "rx counted once");
                match (flooded, dropped) {
                    (0, 1) => assert_eq!(attempts, 0, "dropped at ingress yet delivered"),
                    (1, 0) => assert_eq!(
                        attempts, same_vlan_others,
                        "flood reaches every other port of the VLAN"
                    ),
                    (0, 0) => assert_eq!(attempts, 1, "known unicast goes to one port"),
                    other => panic!("ingress counted {other:?}"),
                }
                if frame.len() < 14 {
                    assert_eq!(dropped, 1);
                }
            }
            Op::Remove(i) => {
                let slot = usize::from(*i) % ports.len().max(1);
                if let Some(Some((id, _))) = ports.get(slot).cloned() {
                    assert!(sw.remove_port(id).is_some());
                    ports[slot] = None;
                    assert!(
                        sw.fdb().entries().iter().all(|e| e.2 != id),
                        "removed port still learned"
                    );
                }
            }
            Op::Add(vlan) => {
                if ports.iter().flatten().count() < 8 {
                    add(&mut ports, *vlan);
                }
            }
            Op::Fail(i, on) => {
                if let Some(Some((_, s))) = ports.get(usize::from(*i) % ports.len().max(1)) {
                    s.fail.store(*on, Relaxed);
                }
            }
            Op::Clock(t) => clock += u64::from(*t),
            Op::Age => {
                let _ = sw.fdb().age(clock);
            }
        }
        assert!(sw.fdb().len() <= 16);
    }
});
