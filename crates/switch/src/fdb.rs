//! The forwarding database: which port a (VLAN, MAC) was last seen on, with ageing.
//!
//! Lookups take a read lock and touch no shared cache line unless the entry's timestamp moves
//! (at most once a second per MAC). Learning a new MAC or a move takes the write lock. A port may
//! learn at most `max_per_port` MACs and the table holds at most `max_entries`, so a guest that
//! sprays random source MACs cannot grow memory or evict everybody else.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::RwLock;

use crate::frame::MacAddr;
use crate::switch::PortId;

/// A fast hasher for the FDB's 8-byte keys (VLAN + MAC). MACs are not secret and the table is
/// bounded per port, so SipHash's flooding resistance buys nothing here; this is a multiply-mix.
#[derive(Default)]
struct MacHasher(u64);

impl Hasher for MacHasher {
    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u16(&mut self, v: u16) {
        self.0 = self.0.rotate_left(16) ^ u64::from(v);
    }

    fn write_u64(&mut self, v: u64) {
        // A MAC (48 bits) after a VLAN (16 bits): the key fits the state exactly.
        self.0 = self.0.rotate_left(48) ^ v;
    }
}

type FdbMap = HashMap<(u16, MacAddr), Entry, BuildHasherDefault<MacHasher>>;

#[derive(Debug)]
struct Entry {
    port: PortId,
    last_seen: AtomicU64,
}

/// What learning a source address did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learn {
    /// Already known on this port.
    Known,
    /// New entry, or moved from another port.
    Learned,
    /// Not learned: the port or the table is at its limit.
    Limited,
}

/// The forwarding database.
#[derive(Debug)]
pub struct Fdb {
    map: RwLock<FdbMap>,
    ageing_secs: u64,
    max_entries: usize,
    max_per_port: usize,
}

impl Fdb {
    /// A table whose entries expire `ageing_secs` after they were last seen.
    pub fn new(ageing_secs: u64, max_entries: usize, max_per_port: usize) -> Self {
        Fdb {
            map: RwLock::new(FdbMap::default()),
            ageing_secs,
            max_entries,
            max_per_port,
        }
    }

    fn fresh(&self, e: &Entry, now: u64) -> bool {
        now.saturating_sub(e.last_seen.load(Relaxed)) <= self.ageing_secs
    }

    /// The port `mac` lives on in `vlan`, if it was seen recently enough.
    pub fn lookup(&self, vlan: u16, mac: MacAddr, now: u64) -> Option<PortId> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.get(&(vlan, mac))
            .filter(|e| self.fresh(e, now))
            .map(|e| e.port)
    }

    /// Record that `mac` was seen on `port` in `vlan` at time `now` (seconds).
    pub fn learn(&self, vlan: u16, mac: MacAddr, port: PortId, now: u64) -> Learn {
        {
            let map = self.map.read().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = map.get(&(vlan, mac)) {
                if e.port == port {
                    if e.last_seen.load(Relaxed) != now {
                        e.last_seen.store(now, Relaxed);
                    }
                    return Learn::Known;
                }
            }
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get_mut(&(vlan, mac)) {
            // A move (the VM migrated, or a MAC changed ports): follow it.
            e.port = port;
            e.last_seen.store(now, Relaxed);
            return Learn::Learned;
        }
        if map.len() >= self.max_entries {
            let ageing = self.ageing_secs;
            map.retain(|_, e| now.saturating_sub(e.last_seen.load(Relaxed)) <= ageing);
            if map.len() >= self.max_entries {
                return Learn::Limited;
            }
        }
        if self.max_per_port != usize::MAX {
            let on_port = map.values().filter(|e| e.port == port).count();
            if on_port >= self.max_per_port {
                return Learn::Limited;
            }
        }
        map.insert(
            (vlan, mac),
            Entry {
                port,
                last_seen: AtomicU64::new(now),
            },
        );
        Learn::Learned
    }

    /// Forget everything learned on `port` (the port went away or its link went down).
    /// Returns the MACs it had learned (control path: allocates).
    pub fn flush_port(&self, port: PortId) -> Vec<MacAddr> {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let mut gone = Vec::new();
        map.retain(|&(_, mac), e| {
            let keep = e.port != port;
            if !keep {
                gone.push(mac);
            }
            keep
        });
        gone
    }

    /// Remove entries older than the ageing time; returns how many were removed.
    pub fn age(&self, now: u64) -> usize {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let before = map.len();
        let ageing = self.ageing_secs;
        map.retain(|_, e| now.saturating_sub(e.last_seen.load(Relaxed)) <= ageing);
        before - map.len()
    }

    /// Number of entries (fresh or not yet aged out).
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All entries: (vlan, mac, port, last_seen).
    pub fn entries(&self) -> Vec<(u16, MacAddr, PortId, u64)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|((v, m), e)| (*v, *m, e.port, e.last_seen.load(Relaxed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, n])
    }

    #[test]
    fn learn_lookup_age() {
        let fdb = Fdb::new(300, 1024, 16);
        assert_eq!(fdb.learn(0, mac(1), PortId(1), 10), Learn::Learned);
        assert_eq!(fdb.learn(0, mac(1), PortId(1), 11), Learn::Known);
        assert_eq!(fdb.lookup(0, mac(1), 311), Some(PortId(1)));
        assert_eq!(fdb.lookup(0, mac(1), 312), None, "aged out");
        assert_eq!(fdb.lookup(1, mac(1), 12), None, "other VLAN");
        assert_eq!(fdb.age(400), 1);
        assert!(fdb.is_empty());
    }

    #[test]
    fn move_and_flush() {
        let fdb = Fdb::new(300, 1024, 16);
        fdb.learn(0, mac(1), PortId(1), 0);
        assert_eq!(fdb.learn(0, mac(1), PortId(2), 1), Learn::Learned);
        assert_eq!(fdb.lookup(0, mac(1), 1), Some(PortId(2)));
        fdb.flush_port(PortId(2));
        assert_eq!(fdb.lookup(0, mac(1), 1), None);
    }

    #[test]
    fn per_port_and_table_limits() {
        let fdb = Fdb::new(300, 8, 4);
        for n in 0..4 {
            assert_eq!(fdb.learn(0, mac(n), PortId(1), 0), Learn::Learned);
        }
        assert_eq!(fdb.learn(0, mac(9), PortId(1), 0), Learn::Limited);
        for n in 10..14 {
            assert_eq!(fdb.learn(0, mac(n), PortId(2), 0), Learn::Learned);
        }
        assert_eq!(
            fdb.learn(0, mac(20), PortId(3), 0),
            Learn::Limited,
            "table full"
        );
        // Once old entries age out there is room again.
        assert_eq!(fdb.learn(0, mac(20), PortId(3), 1000), Learn::Learned);
    }
}
