//! The control virtqueue: RX mode, MAC filter tables, multiqueue pairs, announce acks.
//!
//! A command is `{ class u8, command u8, data[] }` in device-readable descriptors followed by a
//! one-byte ack in a device-writable descriptor (virtio 1.2 §5.1.6.5). Malformed commands get
//! `VIRTIO_NET_ERR` when there is somewhere to write it; a chain without a writable byte is
//! returned with len 0. Nothing here panics on guest input.
//!
//! The resulting [`RxFilter`] is copied into every RX queue (under its own lock), so the data
//! path never takes a control lock.

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtnet_switch::MacAddr;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::desc::{self, Dir, Piece};
use crate::virtio_net::ctrl::*;

/// Most MAC filter entries kept per table; more sets the table's overflow flag (accept all).
pub const MAC_TABLE_LEN: usize = 64;
/// Largest control command payload we read.
const MAX_CMD: usize = 2 + 4 + MAC_TABLE_LEN * 6 + 4 + MAC_TABLE_LEN * 6 + 64;

/// Errors of the control engine (the ring itself is unusable).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The avail ring cannot be read or its index is more than a queue ahead.
    #[error("Bad avail ring")]
    AvailRing(#[source] virtio_queue::Error),
    /// The used ring cannot be written.
    #[error("Bad used ring")]
    UsedRing(#[source] desc::Error),
}

/// Result of the control engine.
pub type Result<T> = std::result::Result<T, Error>;

/// The receive filter a driver configured through `VIRTIO_NET_CTRL_RX` / `CTRL_MAC`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RxFilter {
    /// A driver sent an RX mode or MAC table command: filter from now on.
    pub active: bool,
    /// Accept everything.
    pub promisc: bool,
    /// Accept all multicast.
    pub allmulti: bool,
    /// Accept all unicast.
    pub alluni: bool,
    /// Reject all multicast.
    pub nomulti: bool,
    /// Reject all unicast.
    pub nouni: bool,
    /// Reject broadcast.
    pub nobcast: bool,
    /// The station address (config MAC or `MAC_ADDR_SET`); unknown means unicast is not
    /// filtered by address.
    pub mac: Option<MacAddr>,
    /// Extra unicast addresses.
    pub uni: Vec<MacAddr>,
    /// Unicast table overflowed.
    pub uni_overflow: bool,
    /// Multicast addresses.
    pub multi: Vec<MacAddr>,
    /// Multicast table overflowed.
    pub multi_overflow: bool,
}

impl RxFilter {
    /// A filter that accepts everything until the driver configures it.
    pub fn new(mac: Option<MacAddr>) -> Self {
        RxFilter {
            mac,
            ..Default::default()
        }
    }

    /// Should a frame for `dst` reach the guest?
    pub fn accepts(&self, dst: &MacAddr) -> bool {
        if !self.active || self.promisc {
            return true;
        }
        if dst.is_broadcast() {
            return !self.nobcast;
        }
        if dst.is_multicast() {
            if self.nomulti {
                return false;
            }
            return self.allmulti || self.multi_overflow || self.multi.contains(dst);
        }
        if self.nouni {
            return false;
        }
        if self.alluni || self.uni_overflow {
            return true;
        }
        match self.mac {
            None => true,
            Some(m) => m == *dst || self.uni.contains(dst),
        }
    }
}

/// Device state the control queue changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtrlState {
    /// The receive filter.
    pub filter: RxFilter,
    /// Active queue pairs set by `VQ_PAIRS_SET`; 0 until the driver sends one (then the
    /// device spreads over the RX queues the frontend started, as with QEMU, which handles
    /// the control queue itself and only enables the pairs in use).
    pub active_pairs: u16,
    /// Most queue pairs offered.
    pub max_pairs: u16,
    /// MQ was negotiated (VQ_PAIRS_SET allowed).
    pub mq: bool,
}

impl CtrlState {
    /// Fresh state for a device with `mac` and up to `max_pairs` queue pairs.
    pub fn new(mac: Option<MacAddr>, max_pairs: u16) -> Self {
        CtrlState {
            filter: RxFilter::new(mac),
            active_pairs: 0,
            max_pairs,
            mq: false,
        }
    }

    /// Execute one command; returns the ack byte.
    pub fn execute(&mut self, class: u8, cmd: u8, data: &[u8]) -> u8 {
        match self.try_execute(class, cmd, data) {
            Ok(()) => VIRTIO_NET_OK,
            Err(()) => VIRTIO_NET_ERR,
        }
    }

    fn try_execute(&mut self, class: u8, cmd: u8, data: &[u8]) -> std::result::Result<(), ()> {
        match class {
            CLASS_RX => {
                let [on] = data else { return Err(()) };
                let on = *on != 0;
                let f = &mut self.filter;
                match cmd {
                    RX_PROMISC => f.promisc = on,
                    RX_ALLMULTI => f.allmulti = on,
                    RX_ALLUNI => f.alluni = on,
                    RX_NOMULTI => f.nomulti = on,
                    RX_NOUNI => f.nouni = on,
                    RX_NOBCAST => f.nobcast = on,
                    _ => return Err(()),
                }
                f.active = true;
                Ok(())
            }
            CLASS_MAC => match cmd {
                MAC_ADDR_SET => {
                    let mac: [u8; 6] = data.try_into().map_err(|_| ())?;
                    self.filter.mac = Some(MacAddr(mac));
                    Ok(())
                }
                MAC_TABLE_SET => {
                    let (uni, rest) = parse_mac_table(data)?;
                    let (multi, rest) = parse_mac_table(rest)?;
                    if !rest.is_empty() {
                        return Err(());
                    }
                    let f = &mut self.filter;
                    f.uni_overflow = fill_table(&mut f.uni, uni);
                    f.multi_overflow = fill_table(&mut f.multi, multi);
                    f.active = true;
                    Ok(())
                }
                _ => Err(()),
            },
            CLASS_ANNOUNCE if cmd == ANNOUNCE_ACK && data.is_empty() => Ok(()),
            CLASS_MQ if cmd == MQ_VQ_PAIRS_SET && self.mq => {
                let b: [u8; 2] = data.try_into().map_err(|_| ())?;
                let n = u16::from_le_bytes(b);
                if n == 0 || n > self.max_pairs {
                    return Err(());
                }
                self.active_pairs = n;
                Ok(())
            }
            _ => Err(()),
        }
    }
}

/// Split `{ entries le32, macs[entries][6] }` off the front of `data`.
fn parse_mac_table(data: &[u8]) -> std::result::Result<(&[u8], &[u8]), ()> {
    let n: [u8; 4] = data.get(..4).ok_or(())?.try_into().map_err(|_| ())?;
    let n = u32::from_le_bytes(n) as usize;
    let bytes = n.checked_mul(6).ok_or(())?;
    let rest = &data[4..];
    if rest.len() < bytes {
        return Err(());
    }
    Ok(rest.split_at(bytes))
}

/// Replace `table` with the MACs in `raw`; returns true when it overflowed.
fn fill_table(table: &mut Vec<MacAddr>, raw: &[u8]) -> bool {
    table.clear();
    for m in raw.chunks_exact(6).take(MAC_TABLE_LEN) {
        let mut a = [0u8; 6];
        a.copy_from_slice(m);
        table.push(MacAddr(a));
    }
    raw.len() / 6 > MAC_TABLE_LEN
}

/// What [`process_ctrl_queue`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlOutcome {
    /// Commands taken from the ring.
    pub chains: usize,
    /// The driver wants an interrupt.
    pub notify: bool,
}

/// Run every pending command on a control `queue` against `state`.
pub fn process_ctrl_queue(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    state: &mut CtrlState,
    name: &str,
) -> Result<CtrlOutcome> {
    let mut out = CtrlOutcome::default();
    let mut pieces: Vec<Piece> = Vec::new();
    let mut buf = [0u8; MAX_CMD];
    let mut count = 0u16;
    loop {
        let head = {
            let mut iter = queue.iter(mem).map_err(Error::AvailRing)?;
            match iter.next() {
                Some(c) => c.head_index(),
                None => break,
            }
        };
        pieces.clear();
        let used_len = match desc::walk_chain(
            mem,
            queue.desc_table(),
            queue.size(),
            head,
            Dir::ReadThenWrite,
            usize::MAX,
            &mut pieces,
        ) {
            Ok(_) => run_command(mem, &pieces, &mut buf, state),
            Err(reason) => {
                desc::log_drop(name, "ctrl", reason);
                0
            }
        };
        let slot = queue.next_used().wrapping_add(count);
        desc::write_used_elem(mem, queue, slot, head, used_len).map_err(Error::UsedRing)?;
        count = count.wrapping_add(1);
        out.chains += 1;
        if usize::from(count) >= usize::from(queue.size()) {
            break;
        }
    }
    if count > 0 {
        let (old, new) = desc::publish_used(mem, queue, count).map_err(Error::UsedRing)?;
        out.notify = desc::should_notify(mem, queue, old, new);
    }
    Ok(out)
}

/// Execute the command in `pieces` and write the ack; returns the used length.
fn run_command(
    mem: &GuestMemoryMmap,
    pieces: &[Piece],
    buf: &mut [u8],
    state: &mut CtrlState,
) -> u32 {
    let Some(ack) = pieces.iter().find(|p| p.write) else {
        return 0; // nowhere to put an answer
    };
    let readable: usize = pieces
        .iter()
        .filter(|p| !p.write)
        .map(|p| p.len as usize)
        .sum();
    let status = if readable < 2 || readable > buf.len() {
        VIRTIO_NET_ERR
    } else {
        let n = desc::read_pieces(mem, pieces, 0, &mut buf[..readable]);
        if n != readable {
            VIRTIO_NET_ERR
        } else {
            state.execute(buf[0], buf[1], &buf[2..readable])
        }
    };
    match mem.write_obj(status, GuestAddress(ack.addr)) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::tests::{test_mem, Driver};

    const OWN: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
    const OTHER: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 9]);
    const MCAST: MacAddr = MacAddr([0x01, 0, 0x5e, 0, 0, 1]);

    #[test]
    fn filter_semantics() {
        let mut s = CtrlState::new(Some(OWN), 1);
        assert!(s.filter.accepts(&OTHER), "no RX command yet: accept all");
        assert_eq!(s.execute(CLASS_RX, RX_PROMISC, &[0]), VIRTIO_NET_OK);
        assert!(s.filter.accepts(&OWN));
        assert!(!s.filter.accepts(&OTHER));
        assert!(!s.filter.accepts(&MCAST));
        assert!(s.filter.accepts(&MacAddr::BROADCAST));
        s.execute(CLASS_RX, RX_ALLMULTI, &[1]);
        assert!(s.filter.accepts(&MCAST));
        s.execute(CLASS_RX, RX_NOMULTI, &[1]);
        assert!(!s.filter.accepts(&MCAST));
        s.execute(CLASS_RX, RX_NOBCAST, &[1]);
        assert!(!s.filter.accepts(&MacAddr::BROADCAST));
        s.execute(CLASS_RX, RX_PROMISC, &[1]);
        assert!(s.filter.accepts(&OTHER) && s.filter.accepts(&MCAST));
        s.execute(CLASS_RX, RX_PROMISC, &[0]);
        s.execute(CLASS_RX, RX_NOUNI, &[1]);
        assert!(!s.filter.accepts(&OWN));
    }

    #[test]
    fn mac_tables_and_errors() {
        let mut s = CtrlState::new(Some(OWN), 4);
        let mut t = Vec::new();
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&OTHER.0);
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&MCAST.0);
        assert_eq!(s.execute(CLASS_MAC, MAC_TABLE_SET, &t), VIRTIO_NET_OK);
        assert!(s.filter.accepts(&OTHER) && s.filter.accepts(&MCAST));
        assert!(!s.filter.accepts(&MacAddr([0x52, 0x54, 0, 0, 0, 7])));
        // truncated table
        assert_eq!(
            s.execute(CLASS_MAC, MAC_TABLE_SET, &t[..12]),
            VIRTIO_NET_ERR
        );
        // absurd count
        let mut bad = u32::MAX.to_le_bytes().to_vec();
        bad.extend_from_slice(&[0; 8]);
        assert_eq!(s.execute(CLASS_MAC, MAC_TABLE_SET, &bad), VIRTIO_NET_ERR);
        assert_eq!(s.execute(CLASS_MAC, MAC_ADDR_SET, &OTHER.0), VIRTIO_NET_OK);
        assert_eq!(s.filter.mac, Some(OTHER));
        assert_eq!(s.execute(CLASS_MAC, MAC_ADDR_SET, &[1, 2]), VIRTIO_NET_ERR);
        assert_eq!(s.execute(CLASS_RX, RX_PROMISC, &[]), VIRTIO_NET_ERR);
        assert_eq!(s.execute(CLASS_RX, 77, &[1]), VIRTIO_NET_ERR);
        assert_eq!(s.execute(99, 0, &[]), VIRTIO_NET_ERR);
        assert_eq!(s.execute(CLASS_ANNOUNCE, ANNOUNCE_ACK, &[]), VIRTIO_NET_OK);
        // MQ only when negotiated, 1..=max
        assert_eq!(
            s.execute(CLASS_MQ, MQ_VQ_PAIRS_SET, &2u16.to_le_bytes()),
            VIRTIO_NET_ERR
        );
        s.mq = true;
        assert_eq!(
            s.execute(CLASS_MQ, MQ_VQ_PAIRS_SET, &2u16.to_le_bytes()),
            VIRTIO_NET_OK
        );
        assert_eq!(s.active_pairs, 2);
        assert_eq!(
            s.execute(CLASS_MQ, MQ_VQ_PAIRS_SET, &0u16.to_le_bytes()),
            VIRTIO_NET_ERR
        );
        assert_eq!(
            s.execute(CLASS_MQ, MQ_VQ_PAIRS_SET, &5u16.to_le_bytes()),
            VIRTIO_NET_ERR
        );
        assert_eq!(s.active_pairs, 2);
    }

    #[test]
    fn commands_through_the_queue() {
        let mem = test_mem();
        let mut d = Driver::new(&mem, 16);
        // PROMISC on: header + data in one descriptor, ack separate.
        mem.write_slice(&[CLASS_RX, RX_PROMISC, 1], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_slice(&[0xff], GuestAddress(0x11_0000)).unwrap();
        d.chain(&[(0x10_0000, 3, false), (0x11_0000, 1, true)]);
        // Unknown class: ERR.
        mem.write_slice(&[42, 0], GuestAddress(0x12_0000)).unwrap();
        d.chain(&[(0x12_0000, 2, false), (0x13_0000, 1, true)]);
        // No writable byte: len 0.
        d.chain(&[(0x12_0000, 2, false)]);
        // Writable before readable: bad direction, len 0.
        d.chain(&[(0x13_0000, 1, true), (0x12_0000, 2, false)]);
        // Truncated (1 byte).
        d.chain(&[(0x12_0000, 1, false), (0x14_0000, 1, true)]);
        let mut q = d.queue();
        let mut s = CtrlState::new(Some(OWN), 1);
        let o = process_ctrl_queue(&mem, &mut q, &mut s, "t").unwrap();
        assert_eq!(o.chains, 5);
        assert!(s.filter.promisc && s.filter.active);
        let ack = |a: u64| mem.read_obj::<u8>(GuestAddress(a)).unwrap();
        assert_eq!(ack(0x11_0000), VIRTIO_NET_OK);
        assert_eq!(ack(0x13_0000), VIRTIO_NET_ERR);
        assert_eq!(ack(0x14_0000), VIRTIO_NET_ERR);
        assert_eq!(d.used_idx(), 5);
        assert_eq!(d.used(0).1, 1);
        assert_eq!(d.used(2).1, 0);
        assert_eq!(d.used(3).1, 0);
    }
}
