//! [`NatPort`]: the NAT gateway as a port on the switch, with its driver thread.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use thiserror::Error;
use virtnet_switch::gso::Segmenter;
use virtnet_switch::{
    DropReason, Frame, MacAddr, NetHdr, OffloadCaps, PortConfig, PortId, PortSink, SliceFrame,
    Switch,
};

use crate::engine::{EngineError, NatPolicy, NatStats, SmolEngine, RX_QUEUE};
use crate::host::{Driver, Forward, FrameOut, Inbox};

/// Errors of starting the gateway.
#[derive(Debug, Error)]
pub enum NatError {
    /// The engine rejects the policy.
    #[error("Invalid NAT policy")]
    Engine(#[source] EngineError),
    /// A runtime, thread or forward socket cannot be set up.
    #[error("Cannot start the NAT gateway")]
    Io(#[source] io::Error),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, NatError>;

/// How the gateway joins the switch and what it does.
#[derive(Clone, Debug)]
pub struct NatConfig {
    /// Port name on the switch.
    pub name: String,
    /// Access VLAN.
    pub vlan: Option<u16>,
    /// Addresses and rules.
    pub policy: NatPolicy,
    /// Port forwards.
    pub forwards: Vec<Forward>,
}

struct NatSink {
    mac: MacAddr,
    inbox: Arc<Inbox>,
    seg: Mutex<Segmenter>,
    dropped: AtomicU64,
}

impl PortSink for NatSink {
    fn deliver(&self, frame: &dyn Frame, hdr: &NetHdr) -> std::result::Result<(), DropReason> {
        let mut dst = [0u8; 6];
        if frame.read_at(0, &mut dst) < 6 {
            return Err(DropReason::FrameTooShort);
        }
        // The gateway's MAC, broadcast, and IPv6 router/neighbour solicitation groups.
        if !crate::engine::wants_frame(self.mac.0, dst) {
            return Ok(());
        }
        let mut seg = self.seg.lock().unwrap_or_else(|e| e.into_inner());
        let inbox = &self.inbox;
        let r = seg.adapt(
            frame,
            hdr,
            OffloadCaps::NONE,
            &mut |f: &dyn Frame, _h: &NetHdr| {
                let mut q = inbox.frames.lock().unwrap_or_else(|e| e.into_inner());
                if q.len() >= RX_QUEUE {
                    return Err(DropReason::NoRxBuffers);
                }
                let mut v = inbox.pool.take(f.len());
                f.read_at(0, &mut v);
                q.push_back(v);
                Ok(())
            },
        );
        drop(seg);
        match r {
            Ok(_) => {
                self.inbox.notify.notify_one();
                Ok(())
            }
            Err(e) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn stations_gone(&self, macs: &[MacAddr]) {
        let mut gone = self.inbox.gone.lock().unwrap_or_else(|e| e.into_inner());
        gone.extend(macs.iter().map(|m| m.0));
        drop(gone);
        self.inbox.notify.notify_one();
    }
}

struct SwitchOut {
    switch: Arc<Switch>,
    port: PortId,
}

impl FrameOut for SwitchOut {
    fn send(&mut self, frames: &[Vec<u8>]) {
        let mut batch = self.switch.new_batch();
        self.switch.begin(&mut batch);
        for f in frames {
            self.switch
                .forward(&mut batch, self.port, &SliceFrame(f), &NetHdr::default());
        }
        self.switch.end(&mut batch);
    }
}

/// The NAT gateway running as a port of a switch.
pub struct NatPort {
    switch: Arc<Switch>,
    port: PortId,
    mac: MacAddr,
    inbox: Arc<Inbox>,
    sink: Arc<NatSink>,
    stats: Arc<Mutex<NatStats>>,
    thread: Option<JoinHandle<()>>,
}

impl NatPort {
    /// Join `switch`, bind the forwards and start the driver thread.
    pub fn start(switch: Arc<Switch>, config: NatConfig) -> Result<NatPort> {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mac = MacAddr(config.policy.mac);
        let engine = SmolEngine::new(config.policy.clone(), seed).map_err(NatError::Engine)?;
        let inbox = Arc::new(Inbox::default());
        let sink = Arc::new(NatSink {
            mac,
            inbox: inbox.clone(),
            seg: Mutex::new(Segmenter::new()),
            dropped: AtomicU64::new(0),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NatError::Io)?;
        let mut driver = Driver::new(Box::new(engine), config.forwards.clone());
        let stats = driver.stats_handle();
        rt.block_on(driver.bind()).map_err(NatError::Io)?;
        let port = switch.add_port(
            PortConfig {
                name: config.name.clone(),
                vlan: config.vlan,
            },
            sink.clone(),
        );
        let out = Box::new(SwitchOut {
            switch: switch.clone(),
            port,
        });
        let ib = inbox.clone();
        let thread = std::thread::Builder::new()
            .name(format!("nat-{}", config.name))
            .spawn(move || rt.block_on(driver.run(ib, out)));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                switch.remove_port(port);
                return Err(NatError::Io(e));
            }
        };
        Ok(NatPort {
            switch,
            port,
            mac,
            inbox,
            sink,
            stats,
            thread: Some(thread),
        })
    }

    /// The gateway's port on the switch.
    pub fn port_id(&self) -> PortId {
        self.port
    }

    /// The gateway's MAC.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The engine's counters (as of the driver's last step), with the frames the gateway
    /// dropped before the engine saw them (queue full, unsegmentable) added to `dropped`.
    pub fn stats(&self) -> NatStats {
        let mut s = *self.stats.lock().unwrap_or_else(|e| e.into_inner());
        s.dropped += self.sink.dropped.load(Ordering::Relaxed);
        s
    }

    /// Close every flow, leave the switch and stop the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.inbox.stop.store(true, Ordering::Release);
            self.inbox.notify.notify_one();
            let _ = t.join();
            self.switch.remove_port(self.port);
        }
    }
}

impl Drop for NatPort {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink() -> NatSink {
        NatSink {
            mac: MacAddr([2, 0, 0, 0, 0, 2]),
            inbox: Arc::new(Inbox::default()),
            seg: Mutex::new(Segmenter::new()),
            dropped: AtomicU64::new(0),
        }
    }

    fn frame(dst: [u8; 6]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1, 0x08, 0x06]);
        f.resize(60, 0);
        f
    }

    #[test]
    fn sink_takes_only_frames_for_the_gateway() {
        let s = sink();
        let h = NetHdr::default();
        s.deliver(&SliceFrame(&frame([2, 0, 0, 0, 0, 2])), &h)
            .unwrap();
        s.deliver(&SliceFrame(&frame([0xff; 6])), &h).unwrap();
        s.deliver(&SliceFrame(&frame([2, 0, 0, 0, 0, 9])), &h)
            .unwrap();
        s.deliver(&SliceFrame(&frame([0x33, 0x33, 0, 0, 0, 1])), &h)
            .unwrap();
        assert_eq!(s.inbox.frames.lock().unwrap().len(), 2);
        assert_eq!(
            s.deliver(&SliceFrame(&[2, 0]), &h),
            Err(DropReason::FrameTooShort)
        );
    }

    #[test]
    fn sink_queue_is_bounded() {
        let s = sink();
        let f = frame([2, 0, 0, 0, 0, 2]);
        for _ in 0..RX_QUEUE {
            s.deliver(&SliceFrame(&f), &NetHdr::default()).unwrap();
        }
        assert_eq!(
            s.deliver(&SliceFrame(&f), &NetHdr::default()),
            Err(DropReason::NoRxBuffers)
        );
        assert_eq!(s.dropped.load(Ordering::Relaxed), 1);
    }
}
