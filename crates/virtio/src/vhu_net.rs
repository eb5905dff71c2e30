//! vhost-user glue: [`VhostUserNetBackend`] implements `VhostUserBackend` for one VMM
//! connection of a [`NetDevice`].
//!
//! Threads and queues (`queues_per_thread`): worker `i` serves queue pair `i`
//! (RX `2i`, TX `2i + 1`, mask `0b11 << 2i`); the control queue (last, `2 * pairs`) is served
//! by worker 0. Inside a worker, event ids are the queue's position in that worker's mask:
//!
//! | worker | event 0 (`RX_QUEUE_EVENT`) | event 1 (`TX_QUEUE_EVENT`) | event 2 (`CTRL_QUEUE_EVENT`) |
//! |---|---|---|---|
//! | 0 | RX 0 | TX 0 | control |
//! | i | RX i | TX i | — |
//!
//! vhost-user-backend calls `handle_event` for a queue when it becomes ready and enabled, and on
//! every kick. The RX queue's vring is handed to the device's [`crate::rx::RxSink`] then, so
//! other ports can deliver into it; `stop_vring` (GET_VRING_BASE) and `reset_device` take it
//! back before the frontend sees the answer.
//!
//! TX (`process_tx`): notifications off (EVENT_IDX: `avail_event` left where it was armed;
//! otherwise `VRING_USED_F_NO_NOTIFY`), drain batches of [`crate::tx::TX_BATCH`] chains through
//! the switch, and when the queue is dry poll its avail index for a short adaptive window
//! (`BusyPoll`, at most [`NetDevice::busy_poll`]) before re-arming notifications and sleeping:
//! under load the driver never has to kick and the worker never waits for an epoll wake-up.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_queue::QueueT;
use virtnet_switch::TxBatch;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::ctrl::process_ctrl_queue;
use crate::port::NetDevice;
use crate::rx::{Gm, Vring};
use crate::tx::{process_tx_queue, TxParams, TxScratch};

/// The largest queue size a frontend may set up.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Event id of a worker's RX queue.
pub const RX_QUEUE_EVENT: u16 = 0;
/// Event id of a worker's TX queue.
pub const TX_QUEUE_EVENT: u16 = 1;
/// Event id of the control queue (worker 0 only).
pub const CTRL_QUEUE_EVENT: u16 = 2;

/// Errors of the vhost-user glue.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An event arrived with an unexpected event set.
    #[error("Unexpected epoll event set {0:#x}")]
    HandleEventNotEpollIn(u32),
    /// An event id that no queue of this worker has.
    #[error("Unknown device event {0}")]
    UnknownEvent(u16),
    /// Creating an exit eventfd failed.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] io::Error),
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::other(e)
    }
}

/// Per-worker TX state, reused for every batch.
struct TxWorker {
    batch: TxBatch,
    scratch: TxScratch,
    params: TxParams,
    poll: BusyPoll,
}

/// The adaptive busy-poll window of one TX worker.
///
/// When the TX queue runs dry the worker watches the avail index for up to `window` before it
/// re-enables notifications and sleeps: under load the next batch usually comes sooner than a
/// kick would (an eventfd write by the driver, an epoll wake-up here: tens of microseconds on a
/// busy host), and while the worker polls the driver sees notifications off and does not kick
/// at all. The window adapts between `max / 16` and `max`: it doubles when a kick arrives less
/// than `max` after the worker went to sleep (polling longer would have caught it) and halves
/// when the worker slept longer (idle, or slow traffic), so an idle port costs at most a few
/// microseconds of spinning per kick.
#[derive(Debug)]
struct BusyPoll {
    window: Duration,
    slept_at: Option<Instant>,
}

impl BusyPoll {
    fn new() -> Self {
        BusyPoll {
            window: Duration::ZERO,
            slept_at: None,
        }
    }

    /// A kick woke the worker: adapt the window to how long it slept.
    fn woke(&mut self, max: Duration) {
        let min = max / 16;
        if let Some(t) = self.slept_at.take() {
            self.window = if t.elapsed() < max {
                (self.window * 2).clamp(min, max)
            } else {
                (self.window / 2).clamp(min, max)
            };
        }
        self.window = self.window.min(max);
    }

    /// Spin until `more` says there is work or the window closes; true when there is work.
    ///
    /// The worker yields its CPU before every few probes, the first time right after it drained
    /// its queue: when another worker shares the CPU (both directions of a flow, queue pairs of
    /// several ports on one core) that one runs now. Probing first let a worker whose driver
    /// hands it a frame or two at a time find work on every probe and never yield: the two
    /// vring workers of a bench run were seen switching ~250 times a second (scheduler
    /// slices of ~4 ms) while the other worker's queue waited. Alone on its CPU, the yield
    /// returns at once.
    fn spin(&mut self, mut more: impl FnMut() -> bool) -> bool {
        if self.window.is_zero() {
            return false;
        }
        let start = Instant::now();
        loop {
            std::thread::yield_now();
            // The clock is read every few probes (a probe is one load from the avail ring).
            for _ in 0..16 {
                if more() {
                    return true;
                }
                std::hint::spin_loop();
            }
            if start.elapsed() >= self.window {
                return false;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The vhost-user backend of one connection of a [`NetDevice`].
///
/// Create one per VMM connection and hand it (in an `Arc`) to a `VhostUserDaemon` built on the
/// same `GuestMemoryAtomic`; [`crate::NetPort`] does exactly that in a loop.
pub struct VhostUserNetBackend {
    dev: Arc<NetDevice>,
    mem: RwLock<Gm>,
    threads: Vec<Mutex<TxWorker>>,
    event_idx: AtomicBool,
}

impl VhostUserNetBackend {
    /// A backend for `dev`, reading guest memory through `mem` (the daemon's atomic).
    pub fn new(dev: Arc<NetDevice>, mem: Gm) -> Self {
        let pairs = dev.config().queue_pairs;
        let params = TxParams::new(&dev.negotiated(), dev.config().mtu);
        let threads = (0..pairs)
            .map(|_| {
                Mutex::new(TxWorker {
                    batch: dev.switch().new_batch(),
                    scratch: TxScratch::new(),
                    params,
                    poll: BusyPoll::new(),
                })
            })
            .collect();
        VhostUserNetBackend {
            dev,
            mem: RwLock::new(mem),
            threads,
            event_idx: AtomicBool::new(false),
        }
    }

    /// The device this backend serves.
    pub fn device(&self) -> &Arc<NetDevice> {
        &self.dev
    }

    fn memory(&self) -> Gm {
        self.mem.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn process_tx(&self, thread: usize, vring: &Vring) {
        let Some(w) = self.threads.get(thread) else {
            return;
        };
        let mut w = lock(w);
        let w = &mut *w;
        let gm = self.memory();
        let mem = gm.memory();
        let name = &self.dev.config().name;
        let mut st = vring.get_mut();
        let max_poll = self.dev.busy_poll();
        w.poll.woke(max_poll);
        loop {
            // EVENT_IDX: nothing to do (avail_event stays where it was armed, so the driver
            // kicks at most once until it is armed again); otherwise VRING_USED_F_NO_NOTIFY.
            let _ = st.get_queue_mut().disable_notification(&*mem);
            match process_tx_queue(
                &mem,
                st.get_queue_mut(),
                self.dev.switch(),
                &mut w.batch,
                self.dev.port_id(),
                &w.params,
                &mut w.scratch,
                name,
            ) {
                Ok(o) => {
                    if o.notify {
                        let _ = st.signal_used_queue();
                    }
                    if o.more {
                        continue;
                    }
                }
                Err(e) => {
                    if crate::desc::log_allowed() {
                        log::error!("{name}: tx queue {thread}: {e}");
                    }
                    return;
                }
            }
            // Dry: poll a little before paying for a kick and a wake-up.
            let q = st.get_queue();
            if w.poll.spin(|| {
                q.avail_idx(&*mem, Ordering::Acquire)
                    .is_ok_and(|i| i.0 != q.next_avail())
            }) {
                continue;
            }
            // Re-arm (EVENT_IDX: avail_event = next_avail; else clear NO_NOTIFY) and look
            // again: a chain made available meanwhile would otherwise never be kicked. Every
            // round consumes at least one chain, so this ends when the guest stops sending.
            match st.get_queue_mut().enable_notification(&*mem) {
                Ok(true) => continue,
                _ => {
                    w.poll.slept_at = Some(Instant::now());
                    return;
                }
            }
        }
    }

    fn process_ctrl(&self, vring: &Vring) {
        let gm = self.memory();
        let mem = gm.memory();
        let name = &self.dev.config().name;
        let mut st = vring.get_mut();
        let mut ctrl = self.dev.ctrl_state();
        // Commands are rare: re-arm notifications (EVENT_IDX: avail_event) after each pass.
        loop {
            match process_ctrl_queue(&mem, st.get_queue_mut(), &mut ctrl, name) {
                Ok(o) => {
                    self.dev.apply_ctrl(&ctrl);
                    if o.notify {
                        let _ = st.signal_used_queue();
                    }
                }
                Err(e) => {
                    if crate::desc::log_allowed() {
                        log::error!("{name}: control queue: {e}");
                    }
                    return;
                }
            }
            match st.get_queue_mut().enable_notification(&*mem) {
                Ok(true) => continue,
                _ => return,
            }
        }
    }

    fn attach_rx(&self, thread: usize, vring: &Vring) {
        self.dev.rx().attach(thread, vring, &self.memory());
    }
}

impl VhostUserBackend for VhostUserNetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.dev.config().queue_pairs) * 2 + 1
    }

    fn max_queue_size(&self) -> usize {
        // vhost-user cannot tell the frontend a maximum, and QEMU's virtio-mmio always asks
        // for 1024 entries: refusing would drop the connection. Any size up to 1024 works.
        usize::from(self.dev.config().queue_size.max(MAX_QUEUE_SIZE))
    }

    fn features(&self) -> u64 {
        self.dev.offered_features()
    }

    fn acked_features(&self, features: u64) {
        self.dev.set_acked_features(features);
        let params = TxParams::new(&self.dev.negotiated(), self.dev.config().mtu);
        for w in &self.threads {
            lock(w).params = params;
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
    }

    fn reset_device(&self) {
        self.dev.reset();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.dev.config_space().read(offset, size)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let pairs = u32::from(self.dev.config().queue_pairs);
        (0..pairs)
            .map(|i| {
                let mut m = 0b11u64 << (2 * i);
                if i == 0 {
                    m |= 1u64 << (2 * pairs); // control queue
                }
                m
            })
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(p) => Some(p),
            Err(e) => {
                log::error!("{}: {}", self.dev.config().name, Error::EventFd(e));
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let pairs = u32::from(self.dev.config().queue_pairs);
        if queue_index < 2 * pairs && queue_index % 2 == 0 {
            self.dev.rx().detach((queue_index / 2) as usize);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            // Never fail: an error would end this worker thread.
            log::warn!(
                "{}: {}",
                self.dev.config().name,
                Error::HandleEventNotEpollIn(evset.bits())
            );
            return Ok(());
        }
        match device_event {
            RX_QUEUE_EVENT => {
                if let Some(v) = vrings.first() {
                    self.attach_rx(thread_id, v);
                }
            }
            TX_QUEUE_EVENT => {
                if let Some(v) = vrings.first() {
                    self.attach_rx(thread_id, v);
                }
                if let Some(v) = vrings.get(1) {
                    self.process_tx(thread_id, v);
                }
            }
            CTRL_QUEUE_EVENT if thread_id == 0 => {
                if let Some(v) = vrings.get(2) {
                    self.process_ctrl(v);
                }
            }
            other => log::warn!("{}: {}", self.dev.config().name, Error::UnknownEvent(other)),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::NetConfig;
    use virtnet_switch::{Switch, SwitchConfig};

    fn backend(pairs: u16) -> VhostUserNetBackend {
        let sw = Switch::new(SwitchConfig::default());
        let cfg = NetConfig {
            queue_pairs: pairs,
            mac: Some("52:54:00:00:00:01".parse().unwrap()),
            ..Default::default()
        };
        let dev = NetDevice::new(sw, cfg).unwrap();
        VhostUserNetBackend::new(dev, GuestMemoryAtomic::new(GuestMemoryMmap::new()))
    }

    #[test]
    fn queue_layout_and_masks() {
        let b = backend(3);
        assert_eq!(b.num_queues(), 7);
        assert_eq!(b.queues_per_thread(), vec![0b100_0011, 0b1100, 0b11_0000]);
        let b = backend(1);
        assert_eq!(b.queues_per_thread(), vec![0b111]);
        assert_eq!(b.max_queue_size(), 1024);
    }

    #[test]
    fn features_and_config() {
        let b = backend(2);
        let f = b.features();
        use crate::virtio_net::features as F;
        assert_ne!(f & F::MQ, 0);
        assert_ne!(f & F::MAC, 0);
        assert_eq!(f & F::GUEST_UFO, 0);
        let c = b.get_config(0, 12);
        assert_eq!(&c[..6], &[0x52, 0x54, 0, 0, 0, 1]);
        assert_eq!(&c[6..8], &[1, 0]);
        assert_eq!(&c[8..10], &[2, 0]);
        assert_eq!(&c[10..12], &1500u16.to_le_bytes());
        b.acked_features(f & !F::MRG_RXBUF);
        assert_eq!(b.device().status().acked_features, f & !F::MRG_RXBUF);
        assert!(b.device().status().driver_ok);
        b.reset_device();
        assert!(!b.device().status().driver_ok);
    }

    #[test]
    fn bad_events_do_not_fail_the_worker() {
        let b = backend(1);
        assert!(b.handle_event(9, EventSet::IN, &[], 0).is_ok());
        assert!(b.handle_event(0, EventSet::HANG_UP, &[], 0).is_ok());
        assert!(b.handle_event(RX_QUEUE_EVENT, EventSet::IN, &[], 0).is_ok());
    }

    #[test]
    fn busy_poll_window_adapts_within_bounds() {
        let max = Duration::from_micros(160);
        let mut p = BusyPoll::new();
        p.woke(max);
        assert_eq!(
            p.window,
            Duration::ZERO,
            "no polling before the first sleep"
        );
        assert!(!p.spin(|| true), "a zero window never polls");
        // Kicks that come soon after the worker slept widen the window up to max.
        for want in [10, 20, 40, 80, 160, 160] {
            p.slept_at = Some(Instant::now());
            p.woke(max);
            assert_eq!(p.window, Duration::from_micros(want));
        }
        // A long sleep narrows it, never below max / 16.
        for want in [80, 40, 20, 10, 10] {
            p.slept_at = Instant::now().checked_sub(Duration::from_millis(5));
            p.woke(max);
            assert_eq!(p.window, Duration::from_micros(want));
        }
        // Spinning stops at once when there is work, and after the window when there is not.
        assert!(p.spin(|| true));
        let t = Instant::now();
        let mut probes = 0;
        assert!(!p.spin(|| {
            probes += 1;
            false
        }));
        assert!(t.elapsed() >= p.window && probes > 0);
        // Turning polling off (max 0) closes the window.
        p.slept_at = Some(Instant::now());
        p.woke(Duration::ZERO);
        assert_eq!(p.window, Duration::ZERO);
    }
}
