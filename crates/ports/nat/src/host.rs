//! The driver: runs an [`Engine`] against real host sockets on a tokio current-thread runtime.
//!
//! One task per host connection or socket; they report back over one channel. TCP reads are
//! credit-based (one chunk per [`HostCmd::TcpRead`]), so a slow guest throttles the host
//! socket instead of filling memory.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::engine::{Engine, FlowId, HostCmd, HostEvent, NatStats, CHUNK, DRIVER_IDS};
use crate::pool::FramePool;

/// How long a host TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of parsing a port forward.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ForwardError {
    /// The text is not `PROTO:HOST_IP:PORT -> [GUEST_IP:]PORT`.
    #[error(
        "Invalid forward {0:?}: expected e.g. \"tcp:127.0.0.1:2222 -> 22\" or \"tcp:[::1]:2222 -> [fd00::10]:22\""
    )]
    Syntax(String),
    /// Only a port was given and there is no default guest address.
    #[error("Forward {0:?} names no guest address and there is no reserved one")]
    NoGuest(String),
}

/// The protocol of a port forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardProto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// A host port forwarded to a guest service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    /// TCP or UDP.
    pub proto: ForwardProto,
    /// Where the host listens.
    pub host: SocketAddr,
    /// The guest service (IPv4, or IPv6 in the network's prefix).
    pub guest: SocketAddr,
}

impl Forward {
    /// Parse `tcp:127.0.0.1:2222 -> 22`, `udp:0.0.0.0:5353 -> 10.0.2.15:53` or
    /// `tcp:[::1]:2222 -> [fd00::10]:22` (either side may be IPv4 or IPv6); a bare guest port
    /// goes to `default_guest`.
    pub fn parse(s: &str, default_guest: Option<Ipv4Addr>) -> Result<Self, ForwardError> {
        let bad = || ForwardError::Syntax(s.into());
        let (left, right) = s.split_once("->").ok_or_else(bad)?;
        let (proto, host) = left.trim().split_once(':').ok_or_else(bad)?;
        let proto = match proto.trim() {
            "tcp" => ForwardProto::Tcp,
            "udp" => ForwardProto::Udp,
            _ => return Err(bad()),
        };
        let host = SocketAddr::from_str(host.trim()).map_err(|_| bad())?;
        let right = right.trim();
        let guest = match (SocketAddr::from_str(right), u16::from_str(right)) {
            (Ok(g), _) => g,
            (_, Ok(p)) => SocketAddr::new(
                default_guest
                    .ok_or_else(|| ForwardError::NoGuest(s.into()))?
                    .into(),
                p,
            ),
            _ => return Err(bad()),
        };
        Ok(Forward { proto, host, guest })
    }
}

/// Frames from the guests waiting for the driver.
#[derive(Default)]
pub struct Inbox {
    /// The frames.
    pub frames: Mutex<VecDeque<Vec<u8>>>,
    /// Their buffers, recycled (no allocation per frame once warm).
    pub pool: FramePool,
    /// Stations that left the network: their flows are closed.
    pub gone: Mutex<Vec<[u8; 6]>>,
    /// Wakes the driver.
    pub notify: Notify,
    /// Set to stop the driver (then notify).
    pub stop: AtomicBool,
}

/// Frames for the guests, in buffers kept from one batch to the next.
#[derive(Default)]
pub struct OutFrames {
    bufs: Vec<Vec<u8>>,
    len: usize,
}

impl OutFrames {
    /// Append a copy of `f` (reuses an old buffer's capacity).
    pub fn push(&mut self, f: &[u8]) {
        if self.len == self.bufs.len() {
            self.bufs.push(Vec::with_capacity(f.len().max(1514)));
        }
        let b = &mut self.bufs[self.len];
        b.clear();
        b.extend_from_slice(f);
        self.len += 1;
    }

    /// The frames.
    pub fn as_slice(&self) -> &[Vec<u8>] {
        &self.bufs[..self.len]
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forget the frames, keep the buffers (at most 1024 of them).
    pub fn clear(&mut self) {
        self.len = 0;
        self.bufs.truncate(1024);
    }
}

/// Where the driver's frames for the guests go (the switch, in a port).
pub trait FrameOut: Send {
    /// Send these frames, as one batch.
    fn send(&mut self, frames: &[Vec<u8>]);
}

enum Msg {
    Ev(HostEvent),
    Accepted(FlowId, TcpStream, SocketAddr),
    UdpIn(FlowId, Arc<UdpSocket>, SocketAddr, SocketAddr, Vec<u8>),
}

enum WriteOp {
    Data(Vec<u8>),
    Shutdown,
    Reset,
}

struct TcpHost {
    write: mpsc::UnboundedSender<WriteOp>,
    credit: Arc<Notify>,
    task: JoinHandle<()>,
}

enum UdpHost {
    Out(Arc<UdpSocket>, JoinHandle<()>),
    In(Arc<UdpSocket>, SocketAddr),
}

struct EchoHost {
    sock: Arc<UdpSocket>,
    raw: bool,
    ident: u16,
    task: JoinHandle<()>,
}

type Tx = mpsc::UnboundedSender<Msg>;

fn send(tx: &Tx, ev: HostEvent) {
    // The driver is gone only when shutting down.
    let _ = tx.send(Msg::Ev(ev));
}

async fn splice(
    id: FlowId,
    s: TcpStream,
    credit: Arc<Notify>,
    mut wrx: mpsc::UnboundedReceiver<WriteOp>,
    tx: Tx,
) {
    let _ = s.set_nodelay(true);
    let (mut r, mut w) = s.into_split();
    let stop = Arc::new(Notify::new());
    let stop2 = stop.clone();
    let tx2 = tx.clone();
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let got = tokio::select! {
                _ = stop2.notified() => break,
                got = async {
                    credit.notified().await;
                    r.read(&mut buf).await
                } => got,
            };
            match got {
                Ok(0) => {
                    send(&tx2, HostEvent::TcpEof { id });
                    break;
                }
                Ok(n) => send(
                    &tx2,
                    HostEvent::TcpData {
                        id,
                        data: buf[..n].to_vec(),
                    },
                ),
                Err(_) => {
                    send(&tx2, HostEvent::TcpReset { id });
                    break;
                }
            }
        }
        r
    };
    let writer = async move {
        while let Some(op) = wrx.recv().await {
            match op {
                WriteOp::Data(v) => {
                    if w.write_all(&v).await.is_err() {
                        send(&tx, HostEvent::TcpReset { id });
                        break;
                    }
                    send(&tx, HostEvent::TcpWritten { id, n: v.len() });
                }
                WriteOp::Shutdown => {
                    let _ = w.shutdown().await;
                }
                WriteOp::Reset => {
                    // Closing with a zero linger time sends a reset (and never blocks);
                    // no FIN first: the write half closes with the read half.
                    let _ = SockRef::from(w.as_ref()).set_linger(Some(Duration::ZERO));
                    w.forget();
                    stop.notify_one();
                    return None;
                }
            }
        }
        // The engine closed the flow (or writing failed): stop reading too.
        stop.notify_one();
        Some(w)
    };
    // Both halves drop here: the socket closes (FIN, or RST after WriteOp::Reset).
    let _ = tokio::join!(reader, writer);
}

fn icmp_checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in b.chunks(2) {
        let v = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(v);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Open an ICMP (or ICMPv6) echo socket to `dst`: an unprivileged ping socket, else (with
/// CAP_NET_RAW) a raw socket. Returns the socket and whether it is raw.
fn ping_socket(dst: IpAddr) -> io::Result<(std::net::UdpSocket, bool)> {
    let (domain, proto) = match dst {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let (s, raw) = match Socket::new(domain, Type::DGRAM, Some(proto)) {
        Ok(s) => (s, false),
        Err(e) => match Socket::new(domain, Type::RAW, Some(proto)) {
            Ok(s) => (s, true),
            Err(_) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "ICMP echo unavailable: ping sockets are forbidden (sysctl \
                         net.ipv4.ping_group_range) and raw sockets need CAP_NET_RAW: {e}"
                    ),
                ))
            }
        },
    };
    s.set_nonblocking(true)?;
    s.connect(&SocketAddr::new(dst, 0).into())?;
    Ok((s.into(), raw))
}

/// Runs an engine against host sockets.
pub struct Driver {
    engine: Box<dyn Engine>,
    tx: Tx,
    rx: mpsc::UnboundedReceiver<Msg>,
    tcp: HashMap<FlowId, TcpHost>,
    udp: HashMap<FlowId, UdpHost>,
    echo: HashMap<FlowId, EchoHost>,
    start: Instant,
    forwards: Vec<Forward>,
    listeners: Vec<JoinHandle<()>>,
    closing: Vec<JoinHandle<()>>,
    echo_warned: bool,
    /// Guest frames being handled (swapped with the inbox's queue).
    batch: VecDeque<Vec<u8>>,
    cmds: Vec<HostCmd>,
    stats: Arc<Mutex<NatStats>>,
}

impl Driver {
    /// A driver for `engine` with these port forwards.
    pub fn new(engine: Box<dyn Engine>, forwards: Vec<Forward>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Driver {
            engine,
            tx,
            rx,
            tcp: HashMap::new(),
            udp: HashMap::new(),
            echo: HashMap::new(),
            start: Instant::now(),
            forwards,
            listeners: Vec::new(),
            closing: Vec::new(),
            echo_warned: false,
            batch: VecDeque::new(),
            cmds: Vec::new(),
            stats: Arc::default(),
        }
    }

    /// The engine's counters, updated after every step of [`Driver::run`].
    pub fn stats_handle(&self) -> Arc<Mutex<NatStats>> {
        self.stats.clone()
    }

    /// Bind the forwards' host sockets (call inside the runtime, before [`Driver::run`]).
    pub async fn bind(&mut self) -> io::Result<()> {
        let next = Arc::new(AtomicU64::new(DRIVER_IDS));
        for f in self.forwards.clone() {
            let tx = self.tx.clone();
            let next = next.clone();
            match f.proto {
                ForwardProto::Tcp => {
                    let l = TcpListener::bind(f.host).await?;
                    self.listeners.push(tokio::spawn(async move {
                        while let Ok((s, _)) = l.accept().await {
                            let id = next.fetch_add(1, Ordering::Relaxed);
                            let _ = tx.send(Msg::Accepted(id, s, f.guest));
                        }
                    }));
                }
                ForwardProto::Udp => {
                    let sock = Arc::new(UdpSocket::bind(f.host).await?);
                    self.listeners.push(tokio::spawn(async move {
                        let mut clients: HashMap<SocketAddr, FlowId> = HashMap::new();
                        let mut buf = vec![0u8; 65536];
                        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                            let id = *clients
                                .entry(from)
                                .or_insert_with(|| next.fetch_add(1, Ordering::Relaxed));
                            let m = Msg::UdpIn(id, sock.clone(), from, f.guest, buf[..n].to_vec());
                            let _ = tx.send(m);
                        }
                    }));
                }
            }
        }
        Ok(())
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn handle(&mut self, m: Msg) {
        let now = self.now();
        match m {
            Msg::Ev(ev) => self.engine.host_event(now, ev),
            Msg::Accepted(id, s, guest) => {
                let credit = Arc::new(Notify::new());
                let (wtx, wrx) = mpsc::unbounded_channel();
                let task = tokio::spawn(splice(id, s, credit.clone(), wrx, self.tx.clone()));
                self.tcp.insert(
                    id,
                    TcpHost {
                        write: wtx,
                        credit,
                        task,
                    },
                );
                self.engine
                    .host_event(now, HostEvent::TcpInbound { id, guest });
            }
            Msg::UdpIn(id, sock, from, guest, data) => {
                self.udp.entry(id).or_insert(UdpHost::In(sock, from));
                self.engine
                    .host_event(now, HostEvent::UdpInbound { id, guest, data });
            }
        }
    }

    fn exec(&mut self, cmd: HostCmd) {
        match cmd {
            HostCmd::TcpConnect { id, dst } => {
                let credit = Arc::new(Notify::new());
                let (wtx, wrx) = mpsc::unbounded_channel();
                let tx = self.tx.clone();
                let c = credit.clone();
                let task = tokio::spawn(async move {
                    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
                        Ok(Ok(s)) => {
                            send(&tx, HostEvent::TcpConnected { id });
                            splice(id, s, c, wrx, tx).await;
                        }
                        _ => send(&tx, HostEvent::TcpRefused { id }),
                    }
                });
                self.tcp.insert(
                    id,
                    TcpHost {
                        write: wtx,
                        credit,
                        task,
                    },
                );
            }
            HostCmd::TcpSend { id, data } => {
                if let Some(h) = self.tcp.get(&id) {
                    let _ = h.write.send(WriteOp::Data(data));
                }
            }
            HostCmd::TcpRead { id } => {
                if let Some(h) = self.tcp.get(&id) {
                    h.credit.notify_one();
                }
            }
            HostCmd::TcpShutdown { id } => {
                if let Some(h) = self.tcp.get(&id) {
                    let _ = h.write.send(WriteOp::Shutdown);
                }
            }
            HostCmd::TcpClose { id, reset } => {
                if let Some(h) = self.tcp.remove(&id) {
                    // Data already queued is still written; then the writer stops the
                    // reader and the socket closes. A connection still connecting is
                    // cancelled.
                    if reset {
                        let _ = h.write.send(WriteOp::Reset);
                    }
                    if h.write.send(WriteOp::Shutdown).is_err() {
                        h.task.abort();
                    }
                    self.closing.push(h.task);
                }
            }
            HostCmd::UdpSend { id, dst, data } => self.udp_send(id, dst, &data),
            HostCmd::UdpClose { id } => {
                if let Some(UdpHost::Out(_, t)) = self.udp.remove(&id) {
                    t.abort();
                }
            }
            HostCmd::Echo { id, dst, seq, data } => self.echo_send(id, dst, seq, &data),
            HostCmd::EchoClose { id } => {
                if let Some(h) = self.echo.remove(&id) {
                    h.task.abort();
                }
            }
        }
    }

    fn udp_send(&mut self, id: FlowId, dst: SocketAddr, data: &[u8]) {
        if !self.udp.contains_key(&id) {
            let open = || -> io::Result<UdpSocket> {
                let bind: SocketAddr = match dst.ip() {
                    IpAddr::V4(a) if a.is_loopback() => (Ipv4Addr::LOCALHOST, 0).into(),
                    IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                    IpAddr::V6(a) if a.is_loopback() => (Ipv6Addr::LOCALHOST, 0).into(),
                    IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
                };
                let s = std::net::UdpSocket::bind(bind)?;
                s.connect(dst)?;
                s.set_nonblocking(true)?;
                UdpSocket::from_std(s)
            };
            let s = match open() {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::debug!("nat: UDP to {dst}: {e}");
                    return;
                }
            };
            let (tx, r) = (self.tx.clone(), s.clone());
            let task = tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = r.recv(&mut buf).await {
                    send(
                        &tx,
                        HostEvent::UdpRecv {
                            id,
                            data: buf[..n].to_vec(),
                        },
                    );
                }
            });
            self.udp.insert(id, UdpHost::Out(s, task));
        }
        match self.udp.get(&id) {
            // Sent on the fd directly: tokio's try_send needs readiness the reactor may not
            // have seen yet on a new socket. A full socket buffer drops the datagram.
            Some(UdpHost::Out(s, _)) => {
                let _ = SockRef::from(&**s).send(data);
            }
            Some(UdpHost::In(s, client)) => {
                let _ = SockRef::from(&**s).send_to(data, &(*client).into());
            }
            None => {}
        }
    }

    fn echo_send(&mut self, id: FlowId, dst: IpAddr, seq: u16, data: &[u8]) {
        // ICMP echo request/reply types, and whether raw replies start with an IPv4 header
        // (raw ICMPv6 sockets deliver the ICMPv6 message alone).
        let (request, reply, v4) = match dst {
            IpAddr::V4(_) => (8u8, 0u8, true),
            IpAddr::V6(_) => (128, 129, false),
        };
        if !self.echo.contains_key(&id) {
            let (s, raw) = match ping_socket(dst) {
                Ok(x) => x,
                Err(e) => {
                    if !self.echo_warned {
                        self.echo_warned = true;
                        tracing::warn!("nat: {e}");
                    }
                    return;
                }
            };
            let Ok(s) = UdpSocket::from_std(s) else {
                return;
            };
            let s = Arc::new(s);
            let ident = u16::try_from(id & 0xffff).unwrap_or(0) ^ 0x5a5a;
            let (tx, r) = (self.tx.clone(), s.clone());
            let task = tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = r.recv(&mut buf).await {
                    let mut p = &buf[..n];
                    if raw {
                        let ihl = match (v4, p.first()) {
                            (true, Some(b)) => usize::from(b & 0xf) * 4,
                            _ => 0,
                        };
                        if p.len() < ihl + 8 {
                            continue;
                        }
                        p = &p[ihl..];
                        if u16::from_be_bytes([p[4], p[5]]) != ident {
                            continue;
                        }
                    }
                    if p.len() < 8 || p[0] != reply {
                        continue;
                    }
                    let seq = u16::from_be_bytes([p[6], p[7]]);
                    send(
                        &tx,
                        HostEvent::EchoReply {
                            id,
                            seq,
                            data: p[8..].to_vec(),
                        },
                    );
                }
            });
            self.echo.insert(
                id,
                EchoHost {
                    sock: s,
                    raw,
                    ident,
                    task,
                },
            );
        }
        if let Some(h) = self.echo.get(&id) {
            let mut pkt = Vec::with_capacity(8 + data.len());
            pkt.extend_from_slice(&[request, 0, 0, 0]);
            pkt.extend_from_slice(&h.ident.to_be_bytes());
            pkt.extend_from_slice(&seq.to_be_bytes());
            pkt.extend_from_slice(data);
            // The kernel computes ICMPv6 checksums (on raw sockets too: RFC 3542 3.1).
            if h.raw && v4 {
                let c = icmp_checksum(&pkt);
                pkt[2..4].copy_from_slice(&c.to_be_bytes());
            }
            let _ = SockRef::from(&*h.sock).send(&pkt);
        }
    }

    fn step(&mut self, inbox: &Inbox, out: &mut dyn FrameOut, frames: &mut OutFrames) {
        let now = self.now();
        std::mem::swap(
            &mut *inbox.frames.lock().unwrap_or_else(|e| e.into_inner()),
            &mut self.batch,
        );
        for f in self.batch.drain(..) {
            self.engine.guest_frame(now, &f);
            inbox.pool.give(f);
        }
        let gone = std::mem::take(&mut *inbox.gone.lock().unwrap_or_else(|e| e.into_inner()));
        for mac in gone {
            self.engine
                .close_guest(mac, &mut |f: &[u8]| frames.push(f), &mut self.cmds);
        }
        while let Ok(m) = self.rx.try_recv() {
            self.handle(m);
        }
        self.engine
            .poll(now, &mut |f: &[u8]| frames.push(f), &mut self.cmds);
        if !frames.is_empty() {
            out.send(frames.as_slice());
            frames.clear();
        }
        let mut cmds = std::mem::take(&mut self.cmds);
        for c in cmds.drain(..) {
            self.exec(c);
        }
        self.cmds = cmds;
        self.closing.retain(|t| !t.is_finished());
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone_from(&self.engine.stats());
    }

    /// Run until `inbox.stop` is set; then close every flow.
    pub async fn run(mut self, inbox: Arc<Inbox>, mut out: Box<dyn FrameOut>) {
        let mut frames = OutFrames::default();
        loop {
            self.step(&inbox, out.as_mut(), &mut frames);
            if inbox.stop.load(Ordering::Acquire) {
                break;
            }
            let now = self.now();
            let wait = self
                .engine
                .poll_at(now)
                .map_or(Duration::from_secs(1), |t| t.saturating_sub(now))
                .min(Duration::from_secs(1));
            if wait.is_zero() {
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = inbox.notify.notified() => {}
                m = self.rx.recv() => {
                    if let Some(m) = m {
                        self.handle(m);
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        for l in self.listeners.drain(..) {
            l.abort();
        }
        let mut cmds = Vec::new();
        self.engine
            .close_all(&mut |f: &[u8]| frames.push(f), &mut cmds);
        out.send(frames.as_slice());
        for c in cmds {
            self.exec(c);
        }
        for (_, h) in self.tcp.drain() {
            h.task.abort();
        }
        // Let the connections being closed send their FIN or RST (bounded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        for t in self.closing.drain(..) {
            let _ = tokio::time::timeout_at(deadline, t).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse() {
        let g = Some(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(
            Forward::parse("tcp:127.0.0.1:2222 -> 22", g),
            Ok(Forward {
                proto: ForwardProto::Tcp,
                host: "127.0.0.1:2222".parse().unwrap(),
                guest: "10.0.2.15:22".parse().unwrap(),
            })
        );
        assert_eq!(
            Forward::parse("udp:0.0.0.0:5353->10.0.2.9:53", None),
            Ok(Forward {
                proto: ForwardProto::Udp,
                host: "0.0.0.0:5353".parse().unwrap(),
                guest: "10.0.2.9:53".parse().unwrap(),
            })
        );
        for bad in [
            "tcp:127.0.0.1:2222",
            "sctp:127.0.0.1:1 -> 2",
            "tcp:127.0.0.1 -> 22",
            "tcp:127.0.0.1:1 -> x",
            "tcp:127.0.0.1:1 -> 70000",
        ] {
            assert_eq!(
                Forward::parse(bad, g),
                Err(ForwardError::Syntax(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            Forward::parse("tcp:127.0.0.1:1 -> 22", None),
            Err(ForwardError::NoGuest("tcp:127.0.0.1:1 -> 22".into()))
        );
        // IPv6 on either side; a bare port still goes to the IPv4 reservation.
        assert_eq!(
            Forward::parse("tcp:[::1]:2222 -> [fd00::10]:22", g),
            Ok(Forward {
                proto: ForwardProto::Tcp,
                host: "[::1]:2222".parse().unwrap(),
                guest: "[fd00::10]:22".parse().unwrap(),
            })
        );
        assert_eq!(
            Forward::parse("udp:[::]:5353 -> 53", g).map(|f| f.guest),
            Ok("10.0.2.15:53".parse().unwrap())
        );
        for bad in ["tcp:::1:2222 -> 22", "tcp:[::1]:1 -> fd00::10:22"] {
            assert_eq!(
                Forward::parse(bad, g),
                Err(ForwardError::Syntax(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn icmp_checksum_verifies() {
        let mut p = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1, b'a', b'b', b'c'];
        let c = icmp_checksum(&p);
        p[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(icmp_checksum(&p), 0);
    }
}
