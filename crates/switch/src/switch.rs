//! The switch: ports, VLAN access ports, learning, flooding, batches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::fdb::{Fdb, Learn};
use crate::frame::{
    EthernetFrame, Frame, MacAddr, SliceFrame, ETHERTYPE_VLAN, ETH_HEADER_LEN, ETH_VLAN_HEADER_LEN,
};
use crate::hdr::NetHdr;
use crate::stats::{DropReason, PortStats, PortStatsSnapshot};

/// Most frames one [`Switch::forward_burst`] call hands a sink at once
/// ([`PortSink::deliver_burst`]); longer runs are split.
pub const MAX_BURST: usize = 64;

/// Where [`Switch::route`] sends one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// Dropped (already counted at the ingress port).
    Drop,
    /// Known unicast: the port at this index of the table.
    Port(usize),
    /// Broadcast, multicast or unknown unicast: every other port of this VLAN.
    Flood(u16),
}

/// A port's handle on its switch. Stable for the port's lifetime; reused after removal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u32);

/// The receiving side of a port: how the switch hands it frames.
///
/// `deliver` may be called from any port's worker thread, concurrently. It copies the frame into
/// the port's own memory (guest RX buffers, a ring slot, a socket) before it returns: the view is
/// only borrowed. It may defer publishing (used ring index, interrupt) to [`PortSink::flush`],
/// which the switch calls once per batch for every port it delivered to.
pub trait PortSink: Send + Sync {
    /// Copy one frame into the port. An error is counted against the port as a drop.
    fn deliver(&self, frame: &dyn Frame, hdr: &NetHdr) -> Result<(), DropReason>;

    /// Copy a run of frames into the port, in order, as consecutive [`PortSink::deliver`]
    /// calls would: `out[i]` gets frame `i`'s result (`frames`, `hdrs` and `out` have the same
    /// length, at most [`MAX_BURST`]). A sink overrides this to pay its per-call costs (locks,
    /// ring state, memory translation) once per run instead of once per frame. Default: one
    /// `deliver` per frame.
    fn deliver_burst(
        &self,
        frames: &[&dyn Frame],
        hdrs: &[NetHdr],
        out: &mut [Result<(), DropReason>],
    ) {
        for ((f, h), o) in frames.iter().zip(hdrs).zip(out.iter_mut()) {
            *o = self.deliver(*f, h);
        }
    }

    /// Publish what `deliver` wrote since the last flush and notify the other side.
    fn flush(&self) {}

    /// The switch is done delivering to this port for now: the next frame goes to another
    /// port, or the batch ends. A sink that keeps a lock across consecutive `deliver` calls of
    /// one thread (a burst into one queue) lets go of it here; a following `flush` still comes
    /// for what was delivered. The switch holds at most one port "open" per batch, so a thread
    /// never waits for a second sink's lock while it keeps one. Default: nothing to do.
    fn release(&self) {}

    /// Stations behind another port are gone (that port was removed, or its driver reset or
    /// disconnected): `macs` is what it had learned. A gateway closes their flows. Called on
    /// the control path, never per frame.
    fn stations_gone(&self, _macs: &[MacAddr]) {}
}

/// How a port joins the switch.
#[derive(Clone, Debug, Default)]
pub struct PortConfig {
    /// A name for logs and stats (the socket path, "uplink", "gateway").
    pub name: String,
    /// Access VLAN: frames from the port belong to this VLAN and only ports of the same VLAN
    /// see them. `None` is the untagged default VLAN. Tagged frames are dropped on access ports.
    pub vlan: Option<u16>,
}

/// Switch-wide settings.
#[derive(Clone, Debug)]
pub struct SwitchConfig {
    /// Name of the network (for logs).
    pub name: String,
    /// Seconds after which an unseen MAC is forgotten (default 300, like 802.1D).
    pub ageing_secs: u64,
    /// Maximum FDB entries.
    pub max_fdb_entries: usize,
    /// Maximum MACs one port may have learned at once.
    pub max_macs_per_port: usize,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            name: "switch".into(),
            ageing_secs: 300,
            max_fdb_entries: 16 * 1024,
            max_macs_per_port: 256,
        }
    }
}

struct PortEntry {
    id: PortId,
    name: String,
    vlan: u16,
    sink: Arc<dyn PortSink>,
    stats: Arc<PortStats>,
}

#[derive(Default)]
struct PortTable {
    ports: Vec<Option<Arc<PortEntry>>>,
}

/// An L2 learning switch. Cheap to share (`Arc<Switch>`); every method takes `&self`.
pub struct Switch {
    config: SwitchConfig,
    table: ArcSwap<PortTable>,
    /// Serialises writers of `table` (add/remove); readers never wait.
    table_writer: Mutex<()>,
    /// Bumped on every port table change so batches know to reload their snapshot.
    generation: AtomicU64,
    fdb: Fdb,
    epoch: Instant,
}

/// Per-worker state for forwarding a batch of frames: a snapshot of the port table, the clock,
/// and the set of ports that need a flush. Create once per worker with [`Switch::new_batch`] and
/// reuse it: it allocates only when the port table grows.
pub struct TxBatch {
    table: Arc<PortTable>,
    generation: u64,
    now: u64,
    touched: Vec<u64>,
    /// The last (VLAN, source MAC, ingress) learned in this batch: the FDB already has it
    /// with this batch's timestamp, so frames of the same flow skip `Fdb::learn`.
    learned: Option<(u16, MacAddr, PortId, u64)>,
    /// The last unicast (VLAN, destination MAC) looked up in this batch, its port (`None`:
    /// unknown, flooded) and the clock then. A station learned or moved by this batch clears
    /// it; one learned meanwhile by another port's batch is flooded to until the next batch
    /// (flooding reaches it as well).
    looked_up: Option<(u16, MacAddr, Option<PortId>, u64)>,
    /// Frames and bytes received from one ingress port, not yet added to its counters.
    rx_acc: Acc,
    /// Frames and bytes delivered to one port, not yet added to its counters.
    tx_acc: Acc,
    /// The port delivered to last, not yet released ([`PortSink::release`]).
    open: Option<usize>,
}

/// A per-batch counter for one port, added to its shared `PortStats` when the port changes
/// and at `Switch::end`: two atomic additions per batch and flow instead of per frame.
#[derive(Clone, Copy, Debug, Default)]
struct Acc {
    port: usize,
    frames: u64,
    bytes: u64,
}

impl Acc {
    #[inline]
    fn add(&mut self, table: &PortTable, port: usize, bytes: usize, rx: bool) {
        self.add_n(table, port, 1, bytes as u64, rx);
    }

    #[inline]
    fn add_n(&mut self, table: &PortTable, port: usize, frames: u64, bytes: u64, rx: bool) {
        if self.frames != 0 && self.port != port {
            self.flush(table, rx);
        }
        self.port = port;
        self.frames += frames;
        self.bytes += bytes;
    }

    fn flush(&mut self, table: &PortTable, rx: bool) {
        if self.frames != 0 {
            if let Some(Some(p)) = table.ports.get(self.port) {
                if rx {
                    p.stats.add_rx(self.frames, self.bytes);
                } else {
                    p.stats.add_tx(self.frames, self.bytes);
                }
            }
        }
        *self = Acc::default();
    }
}

impl TxBatch {
    fn touch(touched: &mut Vec<u64>, id: PortId) {
        let i = id.0 as usize;
        let w = i / 64;
        if w >= touched.len() {
            touched.resize(w + 1, 0);
        }
        touched[w] |= 1 << (i % 64);
    }

    /// Override the batch clock (seconds since the switch started); for tests of ageing.
    pub fn set_now(&mut self, now: u64) {
        self.now = now;
    }
}

/// The parts of a [`TxBatch`] that deciding a frame's route reads and updates.
struct BatchState<'b> {
    now: u64,
    learned: &'b mut Option<(u16, MacAddr, PortId, u64)>,
    looked_up: &'b mut Option<(u16, MacAddr, Option<PortId>, u64)>,
    rx_acc: &'b mut Acc,
}

/// The parts of a [`TxBatch`] that delivering frames updates, with its port table.
struct Out<'b> {
    table: &'b PortTable,
    touched: &'b mut Vec<u64>,
    tx_acc: &'b mut Acc,
    open: &'b mut Option<usize>,
}

impl TxBatch {
    fn split(&mut self) -> (BatchState<'_>, Out<'_>) {
        (
            BatchState {
                now: self.now,
                learned: &mut self.learned,
                looked_up: &mut self.looked_up,
                rx_acc: &mut self.rx_acc,
            },
            Out {
                table: &self.table,
                touched: &mut self.touched,
                tx_acc: &mut self.tx_acc,
                open: &mut self.open,
            },
        )
    }
}

impl Out<'_> {
    /// Make port `i` the open one, releasing the one open before.
    #[inline]
    fn open(&mut self, i: usize) {
        if *self.open != Some(i) {
            Switch::release_open(self.table, self.open);
            *self.open = Some(i);
        }
    }

    fn deliver_to(&mut self, d: &PortEntry, frame: &dyn Frame, hdr: &NetHdr) {
        let i = d.id.0 as usize;
        self.open(i);
        match d.sink.deliver(frame, hdr) {
            Ok(()) => {
                self.tx_acc.add(self.table, i, frame.len(), false);
                TxBatch::touch(self.touched, d.id);
            }
            Err(reason) => d.stats.count_drop(reason),
        }
    }

    /// Deliver to the port at index `i` of the table.
    fn deliver_index(&mut self, i: usize, frame: &dyn Frame, hdr: &NetHdr) {
        if let Some(Some(d)) = self.table.ports.get(i) {
            self.deliver_to(d, frame, hdr);
        }
    }

    /// Deliver to every port of `vlan` but the ingress.
    fn flood(
        &mut self,
        ingress: PortId,
        src: &PortEntry,
        vlan: u16,
        frame: &dyn Frame,
        hdr: &NetHdr,
    ) {
        src.stats.count_flood();
        let table = self.table;
        for d in table.ports.iter().flatten() {
            if d.id != ingress && d.vlan == vlan {
                self.deliver_to(d, frame, hdr);
            }
        }
    }

    /// Deliver a run of at most [`MAX_BURST`] frames to the port at index `i`.
    fn deliver_run<F: Frame>(&mut self, i: usize, frames: &[F], hdrs: &[NetHdr]) {
        let table = self.table;
        let Some(Some(d)) = table.ports.get(i) else {
            return;
        };
        if let ([f], [h]) = (frames, hdrs) {
            self.deliver_to(d, f, h);
            return;
        }
        self.open(i);
        let n = frames.len().min(hdrs.len()).min(MAX_BURST);
        const NONE: SliceFrame<'static> = SliceFrame(&[]);
        let mut refs: [&dyn Frame; MAX_BURST] = [&NONE; MAX_BURST];
        for (r, f) in refs.iter_mut().zip(frames) {
            *r = f;
        }
        let mut res = [Ok(()); MAX_BURST];
        d.sink.deliver_burst(&refs[..n], &hdrs[..n], &mut res[..n]);
        let (mut sent, mut bytes) = (0u64, 0u64);
        for (f, r) in frames.iter().zip(&res[..n]) {
            match r {
                Ok(()) => {
                    sent += 1;
                    bytes += f.len() as u64;
                }
                Err(reason) => d.stats.count_drop(*reason),
            }
        }
        if sent > 0 {
            self.tx_acc.add_n(table, i, sent, bytes, false);
            TxBatch::touch(self.touched, d.id);
        }
    }
}

impl Switch {
    /// A switch with no ports.
    pub fn new(config: SwitchConfig) -> Arc<Self> {
        let fdb = Fdb::new(
            config.ageing_secs,
            config.max_fdb_entries,
            config.max_macs_per_port,
        );
        Arc::new(Switch {
            config,
            table: ArcSwap::from_pointee(PortTable::default()),
            table_writer: Mutex::new(()),
            generation: AtomicU64::new(0),
            fdb,
            epoch: Instant::now(),
        })
    }

    /// The switch's settings.
    pub fn config(&self) -> &SwitchConfig {
        &self.config
    }

    /// Seconds since the switch was created (the FDB clock).
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// Plug a port in. The returned id is what the port passes to [`Switch::forward`].
    pub fn add_port(&self, config: PortConfig, sink: Arc<dyn PortSink>) -> PortId {
        let _w = self.table_writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.table.load_full();
        let mut ports = old.ports.clone();
        let slot = ports.iter().position(Option::is_none).unwrap_or_else(|| {
            ports.push(None);
            ports.len() - 1
        });
        let id = PortId(slot as u32);
        ports[slot] = Some(Arc::new(PortEntry {
            id,
            name: config.name,
            vlan: config.vlan.unwrap_or(0),
            sink,
            stats: Arc::new(PortStats::default()),
        }));
        self.table.store(Arc::new(PortTable { ports }));
        self.generation.fetch_add(1, Ordering::Release);
        id
    }

    /// Unplug a port: it receives nothing more, and what it had learned is forgotten.
    /// Returns its final counters.
    pub fn remove_port(&self, id: PortId) -> Option<PortStatsSnapshot> {
        let _w = self.table_writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.table.load_full();
        let entry = old.ports.get(id.0 as usize)?.clone()?;
        let mut ports = old.ports.clone();
        ports[id.0 as usize] = None;
        while matches!(ports.last(), Some(None)) {
            ports.pop();
        }
        self.table.store(Arc::new(PortTable { ports }));
        self.generation.fetch_add(1, Ordering::Release);
        drop(_w);
        self.forget_stations(id);
        Some(entry.stats.snapshot())
    }

    /// The live counters of a port (shared; keep the `Arc` to read them later cheaply).
    pub fn port_stats(&self, id: PortId) -> Option<Arc<PortStats>> {
        let t = self.table.load();
        t.ports
            .get(id.0 as usize)?
            .as_ref()
            .map(|p| p.stats.clone())
    }

    /// A snapshot of every port: (id, name, vlan, counters).
    pub fn ports(&self) -> Vec<(PortId, String, Option<u16>, PortStatsSnapshot)> {
        let t = self.table.load();
        t.ports
            .iter()
            .flatten()
            .map(|p| {
                let vlan = (p.vlan != 0).then_some(p.vlan);
                (p.id, p.name.clone(), vlan, p.stats.snapshot())
            })
            .collect()
    }

    /// The forwarding database.
    pub fn fdb(&self) -> &Fdb {
        &self.fdb
    }

    /// Forget what a port had learned (e.g. its driver reset or its link went down); the other
    /// ports hear which stations are gone ([`PortSink::stations_gone`]).
    pub fn flush_port_fdb(&self, id: PortId) {
        self.forget_stations(id);
    }

    fn forget_stations(&self, id: PortId) {
        let gone = self.fdb.flush_port(id);
        if gone.is_empty() {
            return;
        }
        let t = self.table.load_full();
        for p in t.ports.iter().flatten().filter(|p| p.id != id) {
            p.sink.stations_gone(&gone);
        }
    }

    /// Drop aged entries from the FDB; call now and then from the control plane.
    pub fn age(&self) -> usize {
        self.fdb.age(self.now())
    }

    /// A batch for one worker. Reuse it across kicks.
    pub fn new_batch(&self) -> TxBatch {
        TxBatch {
            table: self.table.load_full(),
            generation: self.generation.load(Ordering::Acquire),
            now: self.now(),
            touched: Vec::new(),
            learned: None,
            looked_up: None,
            rx_acc: Acc::default(),
            tx_acc: Acc::default(),
            open: None,
        }
    }

    /// Release the port delivered to last, if any.
    fn release_open(table: &PortTable, open: &mut Option<usize>) {
        if let Some(i) = open.take() {
            if let Some(Some(p)) = table.ports.get(i) {
                p.sink.release();
            }
        }
    }

    /// Start a batch: refresh the port snapshot if ports came or went, and the clock.
    ///
    /// Within a batch the last learned source and the last destination lookup are remembered
    /// (one entry each), so a change in the FDB made by another worker during a batch is seen
    /// from the next batch on (at most one batch late, like the port table snapshot).
    pub fn begin(&self, batch: &mut TxBatch) {
        Self::release_open(&batch.table, &mut batch.open);
        batch.rx_acc.flush(&batch.table, true);
        batch.tx_acc.flush(&batch.table, false);
        let g = self.generation.load(Ordering::Acquire);
        if g != batch.generation {
            batch.table = self.table.load_full();
            batch.generation = g;
        }
        batch.now = self.now();
        batch.learned = None;
        batch.looked_up = None;
    }

    /// Count a drop that happened at a port before the frame reached the switch (bad
    /// descriptors, truncated headers…).
    pub fn count_drop(&self, batch: &TxBatch, port: PortId, reason: DropReason) {
        if let Some(Some(p)) = batch.table.ports.get(port.0 as usize) {
            p.stats.count_drop(reason);
        }
    }

    /// Switch one frame that arrived on `ingress`. Delivery happens before this returns;
    /// notifications wait for [`Switch::end`].
    pub fn forward(&self, batch: &mut TxBatch, ingress: PortId, frame: &dyn Frame, hdr: &NetHdr) {
        let (mut st, mut out) = batch.split();
        let Some(Some(src)) = out.table.ports.get(ingress.0 as usize) else {
            return;
        };
        st.rx_acc
            .add(out.table, ingress.0 as usize, frame.len(), true);
        let mut head = [0u8; ETH_VLAN_HEADER_LEN];
        let got = frame.read_head(&mut head);
        match self.route(&mut st, out.table, ingress, src, &head[..got]) {
            Route::Drop => {}
            Route::Port(d) => out.deliver_index(d, frame, hdr),
            Route::Flood(vlan) => out.flood(ingress, src, vlan, frame, hdr),
        }
    }

    /// Switch a burst of frames that arrived on `ingress`, in order: what [`Switch::forward`]
    /// does for each, except that consecutive frames for one known destination reach its sink
    /// in one [`PortSink::deliver_burst`] call (runs of up to [`MAX_BURST`]). A port still sees
    /// its frames in the order they arrived, floods included. `frames` and `hdrs` pair up; the
    /// extra entries of the longer one are ignored.
    pub fn forward_burst<F: Frame>(
        &self,
        batch: &mut TxBatch,
        ingress: PortId,
        frames: &[F],
        hdrs: &[NetHdr],
    ) {
        let (mut st, mut out) = batch.split();
        let Some(Some(src)) = out.table.ports.get(ingress.0 as usize) else {
            return;
        };
        let n = frames.len().min(hdrs.len());
        let (frames, hdrs) = (&frames[..n], &hdrs[..n]);
        // The run being collected: its destination and first frame.
        let mut run: Option<(usize, usize)> = None;
        let mut bytes = 0u64;
        // The Ethernet addresses and type of the frame before and where it went, when that
        // was a known port: a frame with the same ones goes there too (nothing the route
        // depends on changes between two frames of one flow in a row).
        let mut prev: Option<([u8; ETH_HEADER_LEN], usize)> = None;
        for (i, frame) in frames.iter().enumerate() {
            bytes += frame.len() as u64;
            let mut head = [0u8; ETH_VLAN_HEADER_LEN];
            let got = frame.read_head(&mut head);
            let mut key = [0u8; ETH_HEADER_LEN];
            key.copy_from_slice(&head[..ETH_HEADER_LEN]);
            let route = match prev {
                Some((k, d)) if got >= ETH_HEADER_LEN && k == key => Route::Port(d),
                _ => self.route(&mut st, out.table, ingress, src, &head[..got]),
            };
            prev = match route {
                Route::Port(d) => Some((key, d)),
                _ => None,
            };
            if let (Route::Port(d), Some((rd, start))) = (route, run) {
                if d == rd && i - start < MAX_BURST {
                    continue;
                }
            }
            if let Some((rd, start)) = run.take() {
                out.deliver_run(rd, &frames[start..i], &hdrs[start..i]);
            }
            match route {
                Route::Drop => {}
                Route::Port(d) => run = Some((d, i)),
                Route::Flood(vlan) => out.flood(ingress, src, vlan, frame, &hdrs[i]),
            }
        }
        if let Some((rd, start)) = run {
            out.deliver_run(rd, &frames[start..], &hdrs[start..]);
        }
        st.rx_acc
            .add_n(out.table, ingress.0 as usize, n as u64, bytes, true);
    }

    /// Learn the source of a frame that starts with `head` (its first bytes, up to
    /// [`ETH_VLAN_HEADER_LEN`]) and decide where it goes; drops are counted on `src`.
    #[inline]
    fn route(
        &self,
        st: &mut BatchState<'_>,
        table: &PortTable,
        ingress: PortId,
        src: &PortEntry,
        head: &[u8],
    ) -> Route {
        let now = st.now;
        let Ok(eth) = EthernetFrame::new_checked(head) else {
            src.stats.count_drop(DropReason::FrameTooShort);
            return Route::Drop;
        };
        let src_mac = eth.src();
        if !src_mac.is_unicast() {
            src.stats.count_drop(DropReason::BadSourceMac);
            return Route::Drop;
        }
        if eth.ethertype() == ETHERTYPE_VLAN {
            // Access ports carry untagged frames only.
            src.stats.count_drop(DropReason::VlanFiltered);
            return Route::Drop;
        }
        let vlan = src.vlan;
        let key = (vlan, src_mac, ingress, now);
        if *st.learned != Some(key) {
            match self.fdb.learn(vlan, src_mac, ingress, now) {
                Learn::Known => *st.learned = Some(key),
                Learn::Learned => {
                    *st.learned = Some(key);
                    // A new or moved station: what this batch looked up may be stale.
                    *st.looked_up = None;
                }
                // Not fatal: the frame still goes out, it just cannot be answered by unicast.
                Learn::Limited => {}
            }
        }

        let dst_mac = eth.dst();
        if !dst_mac.is_multicast() {
            let dst = match *st.looked_up {
                Some((v, m, p, t)) if v == vlan && m == dst_mac && t == now => p,
                _ => {
                    let p = self.fdb.lookup(vlan, dst_mac, now);
                    *st.looked_up = Some((vlan, dst_mac, p, now));
                    p
                }
            };
            if let Some(dst) = dst {
                if dst == ingress {
                    src.stats.count_drop(DropReason::Hairpin);
                    return Route::Drop;
                }
                let i = dst.0 as usize;
                if let Some(Some(d)) = table.ports.get(i) {
                    if d.vlan == vlan {
                        return Route::Port(i);
                    }
                }
            }
        }
        Route::Flood(vlan)
    }

    /// Inject a frame from outside any port (services answering on behalf of the network):
    /// delivered to `dst` only, counted as transmitted to it.
    pub fn deliver_to_port(
        &self,
        batch: &mut TxBatch,
        dst: PortId,
        frame: &dyn Frame,
        hdr: &NetHdr,
    ) -> bool {
        let (_, mut out) = batch.split();
        match out.table.ports.get(dst.0 as usize) {
            Some(Some(d)) => {
                out.deliver_to(d, frame, hdr);
                true
            }
            _ => false,
        }
    }

    /// End a batch: flush every port that received frames, once.
    ///
    /// The port delivered to last is flushed first (a sink that kept its queue locked for the
    /// burst publishes under that lock), then released, and only then the others are flushed:
    /// no sink's lock is held while another sink is flushed.
    pub fn end(&self, batch: &mut TxBatch) {
        batch.rx_acc.flush(&batch.table, true);
        batch.tx_acc.flush(&batch.table, false);
        if let Some(i) = batch.open {
            let (w, bit) = (i / 64, 1u64 << (i % 64));
            if let Some(word) = batch.touched.get_mut(w) {
                if *word & bit != 0 {
                    *word &= !bit;
                    if let Some(Some(p)) = batch.table.ports.get(i) {
                        p.sink.flush();
                    }
                }
            }
        }
        Self::release_open(&batch.table, &mut batch.open);
        for w in 0..batch.touched.len() {
            let mut bits = std::mem::take(&mut batch.touched[w]);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(Some(p)) = batch.table.ports.get(w * 64 + b) {
                    p.sink.flush();
                }
            }
        }
    }

    /// Where a unicast MAC is, if known.
    pub fn lookup(&self, vlan: Option<u16>, mac: MacAddr) -> Option<PortId> {
        self.fdb.lookup(vlan.unwrap_or(0), mac, self.now())
    }
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switch")
            .field("name", &self.config.name)
            .field("ports", &self.table.load().ports.iter().flatten().count())
            .field("fdb_entries", &self.fdb.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A sink that records frames into a preallocated log.
    #[derive(Default)]
    struct Recorder {
        frames: Mutex<Vec<Vec<u8>>>,
        flushes: AtomicUsize,
        releases: AtomicUsize,
        fail: Option<DropReason>,
        gone: Mutex<Vec<MacAddr>>,
        /// Shared event log: (port tag, 'd'eliver / 'f'lush / 'r'elease).
        log: Option<(u8, EventLog)>,
    }

    type EventLog = Arc<Mutex<Vec<(u8, char)>>>;

    impl Recorder {
        fn event(&self, e: char) {
            if let Some((tag, log)) = &self.log {
                log.lock().unwrap().push((*tag, e));
            }
        }
    }

    impl PortSink for Recorder {
        fn deliver(&self, frame: &dyn Frame, _hdr: &NetHdr) -> Result<(), DropReason> {
            self.event('d');
            if let Some(r) = self.fail {
                return Err(r);
            }
            let mut v = vec![0u8; frame.len()];
            frame.read_at(0, &mut v);
            self.frames.lock().unwrap().push(v);
            Ok(())
        }
        fn deliver_burst(
            &self,
            frames: &[&dyn Frame],
            hdrs: &[NetHdr],
            out: &mut [Result<(), DropReason>],
        ) {
            self.event('B');
            for ((f, h), o) in frames.iter().zip(hdrs).zip(out.iter_mut()) {
                *o = self.deliver(*f, h);
            }
        }
        fn flush(&self) {
            self.event('f');
            self.flushes.fetch_add(1, Ordering::Relaxed);
        }
        fn release(&self) {
            self.event('r');
            self.releases.fetch_add(1, Ordering::Relaxed);
        }
        fn stations_gone(&self, macs: &[MacAddr]) {
            self.gone.lock().unwrap().extend_from_slice(macs);
        }
    }

    fn mac(n: u8) -> [u8; 6] {
        [0x52, 0x54, 0, 0, 0, n]
    }

    fn eth(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0xab; 46]);
        f
    }

    fn setup(n: usize) -> (Arc<Switch>, Vec<(PortId, Arc<Recorder>)>) {
        let sw = Switch::new(SwitchConfig::default());
        let ports = (0..n)
            .map(|i| {
                let r = Arc::new(Recorder::default());
                let id = sw.add_port(
                    PortConfig {
                        name: format!("p{i}"),
                        vlan: None,
                    },
                    r.clone(),
                );
                (id, r)
            })
            .collect();
        (sw, ports)
    }

    fn send(sw: &Switch, from: PortId, f: &[u8]) {
        let mut b = sw.new_batch();
        sw.begin(&mut b);
        sw.forward(&mut b, from, &SliceFrame(f), &NetHdr::NONE);
        sw.end(&mut b);
    }

    fn count(r: &Recorder) -> usize {
        r.frames.lock().unwrap().len()
    }

    #[test]
    fn unknown_unicast_floods_then_learning_makes_it_unicast() {
        let (sw, p) = setup(3);
        send(&sw, p[0].0, &eth(mac(2), mac(1)));
        assert_eq!((count(&p[0].1), count(&p[1].1), count(&p[2].1)), (0, 1, 1));
        // p1 answers: mac(1) is known, so only p0 gets it.
        send(&sw, p[1].0, &eth(mac(1), mac(2)));
        assert_eq!((count(&p[0].1), count(&p[1].1), count(&p[2].1)), (1, 1, 1));
        // Now mac(2) is known too.
        send(&sw, p[0].0, &eth(mac(2), mac(1)));
        assert_eq!((count(&p[0].1), count(&p[1].1), count(&p[2].1)), (1, 2, 1));
        let s0 = sw.port_stats(p[0].0).unwrap().snapshot();
        assert_eq!(s0.rx_frames, 2);
        assert_eq!(s0.flooded, 1);
        assert_eq!(s0.tx_frames, 1);
    }

    #[test]
    fn unknown_destination_is_remembered_until_a_station_is_learned_in_the_batch() {
        let (sw, p) = setup(3);
        let (b0, b1) = (eth(mac(9), mac(1)), eth([0xff; 6], mac(9)));
        let mut b = sw.new_batch();
        sw.begin(&mut b);
        // mac(9) unknown: flooded, twice (the second from the batch's memory).
        sw.forward(&mut b, p[0].0, &SliceFrame(&b0), &NetHdr::NONE);
        sw.forward(&mut b, p[0].0, &SliceFrame(&b0), &NetHdr::NONE);
        // mac(9) turns out to live behind p0 itself (a broadcast: no lookup of its own).
        sw.forward(&mut b, p[0].0, &SliceFrame(&b1), &NetHdr::NONE);
        // The remembered "unknown" is gone: this is a hairpin now, not a flood.
        sw.forward(&mut b, p[0].0, &SliceFrame(&b0), &NetHdr::NONE);
        sw.end(&mut b);
        assert_eq!((count(&p[1].1), count(&p[2].1)), (3, 3));
        let s0 = sw.port_stats(p[0].0).unwrap().snapshot();
        assert_eq!(s0.flooded, 3);
        assert_eq!(s0.drop_count(DropReason::Hairpin), 1);
    }

    #[test]
    fn broadcast_reaches_all_others_never_ingress() {
        let (sw, p) = setup(4);
        send(&sw, p[2].0, &eth([0xff; 6], mac(3)));
        let c: Vec<usize> = p.iter().map(|(_, r)| count(r)).collect();
        assert_eq!(c, vec![1, 1, 0, 1]);
        // Multicast too.
        send(&sw, p[2].0, &eth([0x01, 0x00, 0x5e, 0, 0, 1], mac(3)));
        let c: Vec<usize> = p.iter().map(|(_, r)| count(r)).collect();
        assert_eq!(c, vec![2, 2, 0, 2]);
    }

    #[test]
    fn hairpin_and_bad_frames_are_counted_drops() {
        let (sw, p) = setup(2);
        send(&sw, p[0].0, &eth(mac(9), mac(1)));
        // mac(1) is on p0; a frame from p0 to mac(1) must not go back.
        send(&sw, p[0].0, &eth(mac(1), mac(1)));
        let s = sw.port_stats(p[0].0).unwrap().snapshot();
        assert_eq!(s.drop_count(DropReason::Hairpin), 1);
        send(&sw, p[0].0, &[0u8; 10]);
        send(&sw, p[0].0, &eth(mac(2), [0xff; 6]));
        let mut tagged = eth(mac(2), mac(1));
        tagged[12] = 0x81;
        tagged[13] = 0x00;
        send(&sw, p[0].0, &tagged);
        let s = sw.port_stats(p[0].0).unwrap().snapshot();
        assert_eq!(s.drop_count(DropReason::FrameTooShort), 1);
        assert_eq!(s.drop_count(DropReason::BadSourceMac), 1);
        assert_eq!(s.drop_count(DropReason::VlanFiltered), 1);
        assert_eq!(count(&p[1].1), 1);
    }

    #[test]
    fn vlans_are_separate() {
        let sw = Switch::new(SwitchConfig::default());
        let mk = |vlan| {
            let r = Arc::new(Recorder::default());
            let id = sw.add_port(
                PortConfig {
                    name: String::new(),
                    vlan,
                },
                r.clone(),
            );
            (id, r)
        };
        let a = mk(Some(10));
        let b = mk(Some(10));
        let c = mk(Some(20));
        let d = mk(None);
        send(&sw, a.0, &eth([0xff; 6], mac(1)));
        assert_eq!((count(&b.1), count(&c.1), count(&d.1)), (1, 0, 0));
        send(&sw, c.0, &eth(mac(1), mac(3)));
        assert_eq!(count(&a.1), 0, "known in VLAN 10 only");
    }

    #[test]
    fn flush_once_per_batch_and_drops_counted_at_destination() {
        let sw = Switch::new(SwitchConfig::default());
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        let full = Arc::new(Recorder {
            fail: Some(DropReason::NoRxBuffers),
            ..Default::default()
        });
        let pa = sw.add_port(PortConfig::default(), a.clone());
        let pb = sw.add_port(PortConfig::default(), b.clone());
        let pf = sw.add_port(PortConfig::default(), full.clone());
        let mut batch = sw.new_batch();
        sw.begin(&mut batch);
        for _ in 0..10 {
            sw.forward(
                &mut batch,
                pa,
                &SliceFrame(&eth([0xff; 6], mac(1))),
                &NetHdr::NONE,
            );
        }
        sw.end(&mut batch);
        assert_eq!(count(&b), 10);
        assert_eq!(b.flushes.load(Ordering::Relaxed), 1);
        assert_eq!(full.flushes.load(Ordering::Relaxed), 0);
        let sf = sw.port_stats(pf).unwrap().snapshot();
        assert_eq!(sf.drop_count(DropReason::NoRxBuffers), 10);
        assert_eq!(sw.port_stats(pb).unwrap().snapshot().tx_frames, 10);
    }

    #[test]
    fn removed_port_gets_nothing_and_is_forgotten() {
        let (sw, p) = setup(3);
        send(&sw, p[1].0, &eth(mac(1), mac(2)));
        assert_eq!(sw.lookup(None, MacAddr(mac(2))), Some(p[1].0));
        let last = sw.remove_port(p[1].0).unwrap();
        assert_eq!(last.rx_frames, 1);
        assert_eq!(sw.lookup(None, MacAddr(mac(2))), None);
        send(&sw, p[0].0, &eth(mac(2), mac(1)));
        assert_eq!(count(&p[1].1), 0);
        assert_eq!(count(&p[2].1), 2);
        // The slot is reused.
        let r = Arc::new(Recorder::default());
        let id = sw.add_port(PortConfig::default(), r);
        assert_eq!(id, p[1].0);
    }

    #[test]
    fn other_ports_hear_which_stations_left() {
        let (sw, p) = setup(3);
        send(&sw, p[1].0, &eth(mac(1), mac(2)));
        send(&sw, p[1].0, &eth(mac(1), mac(3)));
        send(&sw, p[0].0, &eth(mac(2), mac(1)));
        // A link reset on p1: its two stations are gone, p0's is not.
        sw.flush_port_fdb(p[1].0);
        let mut g0 = p[0].1.gone.lock().unwrap().clone();
        g0.sort_by_key(|m| m.0);
        assert_eq!(g0, vec![MacAddr(mac(2)), MacAddr(mac(3))]);
        let mut g2 = p[2].1.gone.lock().unwrap().clone();
        g2.sort_by_key(|m| m.0);
        assert_eq!(g2, g0);
        assert!(
            p[1].1.gone.lock().unwrap().is_empty(),
            "not told about itself"
        );
        // Nothing learned: nobody hears anything.
        sw.flush_port_fdb(p[1].0);
        assert_eq!(p[0].1.gone.lock().unwrap().len(), 2);
        // Removing p0 tells the rest about mac(1).
        sw.remove_port(p[0].0);
        assert_eq!(p[2].1.gone.lock().unwrap().len(), 3);
        assert_eq!(p[2].1.gone.lock().unwrap()[2], MacAddr(mac(1)));
    }

    #[test]
    fn ageing_turns_unicast_back_into_flooding() {
        let (sw, p) = setup(3);
        let mut b = sw.new_batch();
        sw.begin(&mut b);
        b.set_now(0);
        sw.forward(
            &mut b,
            p[1].0,
            &SliceFrame(&eth(mac(1), mac(2))),
            &NetHdr::NONE,
        );
        b.set_now(100);
        sw.forward(
            &mut b,
            p[0].0,
            &SliceFrame(&eth(mac(2), mac(1))),
            &NetHdr::NONE,
        );
        assert_eq!(count(&p[2].1), 1, "only the first (unknown) frame flooded");
        b.set_now(1000);
        sw.forward(
            &mut b,
            p[0].0,
            &SliceFrame(&eth(mac(2), mac(1))),
            &NetHdr::NONE,
        );
        sw.end(&mut b);
        assert_eq!(count(&p[2].1), 2, "aged out: flooded again");
    }

    #[test]
    fn one_port_open_at_a_time_and_the_open_one_flushed_first() {
        let sw = Switch::new(SwitchConfig::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mk = |tag: u8, fail: Option<DropReason>| {
            let r = Arc::new(Recorder {
                fail,
                log: Some((tag, log.clone())),
                ..Default::default()
            });
            (sw.add_port(PortConfig::default(), r.clone()), r)
        };
        let (pa, _a) = mk(0, None);
        let (pb, b) = mk(1, None);
        let (pc, c) = mk(2, None);
        let (_pf, f) = mk(3, Some(DropReason::NoRxBuffers));
        // B and C announce themselves (flooded), then the log starts.
        send(&sw, pb, &eth(mac(1), mac(2)));
        send(&sw, pc, &eth(mac(1), mac(3)));
        log.lock().unwrap().clear();
        let mut batch = sw.new_batch();
        sw.begin(&mut batch);
        for dst in [mac(2), mac(2), mac(3), mac(3), mac(2)] {
            let fr = eth(dst, mac(1));
            sw.forward(&mut batch, pa, &SliceFrame(&fr), &NetHdr::NONE);
        }
        sw.end(&mut batch);
        let got = std::mem::take(&mut *log.lock().unwrap());
        assert_eq!(
            got,
            vec![
                (1, 'd'),
                (1, 'd'),
                (1, 'r'),
                (2, 'd'),
                (2, 'd'),
                (2, 'r'),
                (1, 'd'),
                // End: the open port is flushed first, then released, then the others.
                (1, 'f'),
                (1, 'r'),
                (2, 'f'),
            ]
        );
        // A flood: every port is released before the next one gets the frame; a port whose
        // delivery failed is released too but not flushed.
        sw.begin(&mut batch);
        let fr = eth([0xff; 6], mac(1));
        sw.forward(&mut batch, pa, &SliceFrame(&fr), &NetHdr::NONE);
        sw.end(&mut batch);
        let got = std::mem::take(&mut *log.lock().unwrap());
        assert_eq!(
            got,
            vec![
                (1, 'd'),
                (1, 'r'),
                (2, 'd'),
                (2, 'r'),
                (3, 'd'),
                (3, 'r'),
                (1, 'f'),
                (2, 'f'),
            ]
        );
        assert_eq!(f.flushes.load(Ordering::Relaxed), 0);
        // Counted from the start: the two announcements flooded through F (and C) as well.
        assert_eq!(f.releases.load(Ordering::Relaxed), 3);
        assert_eq!(b.flushes.load(Ordering::Relaxed), 3);
        assert_eq!(c.releases.load(Ordering::Relaxed), 3);
    }

    /// Forward `frames` from `from` as one burst in one batch.
    fn send_burst(sw: &Switch, from: PortId, frames: &[Vec<u8>]) {
        let views: Vec<SliceFrame<'_>> = frames.iter().map(|f| SliceFrame(f)).collect();
        let hdrs = vec![NetHdr::NONE; frames.len()];
        let mut b = sw.new_batch();
        sw.begin(&mut b);
        sw.forward_burst(&mut b, from, &views, &hdrs);
        sw.end(&mut b);
    }

    #[test]
    fn bursts_go_out_in_runs_and_in_order() {
        let sw = Switch::new(SwitchConfig::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mk = |tag: u8| {
            let r = Arc::new(Recorder {
                log: Some((tag, log.clone())),
                ..Default::default()
            });
            (sw.add_port(PortConfig::default(), r.clone()), r)
        };
        let (pa, a) = mk(0);
        let (pb, b) = mk(1);
        let (pc, c) = mk(2);
        send(&sw, pb, &eth(mac(1), mac(2)));
        send(&sw, pc, &eth(mac(1), mac(3)));
        log.lock().unwrap().clear();
        let tagged = |dst: [u8; 6], n: u8| {
            let mut f = eth(dst, mac(1));
            f[20] = n;
            f
        };
        let burst = vec![
            tagged(mac(2), 0),
            tagged(mac(2), 1),
            tagged([0xff; 6], 2),
            tagged(mac(2), 3),
            tagged(mac(3), 4),
            tagged(mac(3), 5),
            eth(mac(2), [0xff; 6]), // bad source: dropped, ends the run
            tagged(mac(3), 7),
        ];
        send_burst(&sw, pa, &burst);
        let got = std::mem::take(&mut *log.lock().unwrap());
        assert_eq!(
            got,
            vec![
                (1, 'B'),
                (1, 'd'),
                (1, 'd'),
                // The broadcast: B is still open, then C.
                (1, 'd'),
                (1, 'r'),
                (2, 'd'),
                // A run of one is a plain delivery.
                (2, 'r'),
                (1, 'd'),
                (1, 'r'),
                (2, 'B'),
                (2, 'd'),
                (2, 'd'),
                (2, 'd'),
                (2, 'f'),
                (2, 'r'),
                (1, 'f'),
            ]
        );
        let order =
            |r: &Recorder| -> Vec<u8> { r.frames.lock().unwrap().iter().map(|f| f[20]).collect() };
        assert_eq!(order(&b)[1..], [0, 1, 2, 3]);
        assert_eq!(order(&c)[1..], [2, 4, 5, 7]);
        assert_eq!(count(&a), 2, "A heard only the two announcements");
        let st = sw.port_stats(pa).unwrap().snapshot();
        assert_eq!(st.rx_frames, 8);
        assert_eq!(st.drop_count(DropReason::BadSourceMac), 1);
        assert_eq!(sw.port_stats(pb).unwrap().snapshot().tx_frames, 4 + 1);
        assert_eq!(sw.port_stats(pc).unwrap().snapshot().tx_frames, 4 + 1);
    }

    #[test]
    fn a_station_moving_mid_burst_is_seen_by_the_next_frame() {
        let (sw, p) = setup(3);
        send(&sw, p[1].0, &eth(mac(9), mac(2)));
        // From port 0: two frames to station 2 (at port 1), then one from station 2 itself
        // (it moved behind port 0), then one more to it: a hairpin now, not port 1.
        let burst = vec![
            eth(mac(2), mac(1)),
            eth(mac(2), mac(1)),
            eth(mac(9), mac(2)),
            eth(mac(2), mac(1)),
        ];
        let before = count(&p[1].1);
        send_burst(&sw, p[0].0, &burst);
        assert_eq!(count(&p[1].1), before + 2 + 1, "two unicast, one flood");
        assert_eq!(sw.lookup(None, MacAddr(mac(2))), Some(p[0].0));
        let st = sw.port_stats(p[0].0).unwrap().snapshot();
        assert_eq!(st.drop_count(DropReason::Hairpin), 1);
    }

    #[test]
    fn long_runs_are_split_and_failed_frames_counted() {
        let sw = Switch::new(SwitchConfig::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let a = sw.add_port(PortConfig::default(), Arc::new(Recorder::default()));
        let full = Arc::new(Recorder {
            fail: Some(DropReason::NoRxBuffers),
            log: Some((1, log.clone())),
            ..Default::default()
        });
        let pf = sw.add_port(PortConfig::default(), full.clone());
        send(&sw, pf, &eth(mac(1), mac(2)));
        log.lock().unwrap().clear();
        let frames = vec![eth(mac(2), mac(1)); 2 * MAX_BURST + 22];
        send_burst(&sw, a, &frames);
        let got = std::mem::take(&mut *log.lock().unwrap());
        assert_eq!(got.iter().filter(|e| e.1 == 'B').count(), 3);
        assert_eq!(got.iter().filter(|e| e.1 == 'd').count(), frames.len());
        assert_eq!(
            got.iter().filter(|e| e.1 == 'f').count(),
            0,
            "nothing delivered"
        );
        let st = sw.port_stats(pf).unwrap().snapshot();
        assert_eq!(st.drop_count(DropReason::NoRxBuffers), frames.len() as u64);
        assert_eq!(st.tx_frames, 0);
    }
}
