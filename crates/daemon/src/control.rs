//! The control socket: a unix stream socket where a client sends one line and the daemon
//! answers and closes.
//!
//! | request | answer |
//! |---------|--------|
//! | `ping`  | `pong` |
//! | `stats` | one JSON document, [`StatsReport`] |
//! | other   | `error: unknown command "..."` |
//!
//! Every answer ends with a newline. The server is non-blocking: the daemon's loop calls
//! [`ControlServer::handle_pending`] when the listening socket is readable.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtnet_switch::{DropReason, PortStatsSnapshot};

/// How long a client may take to send its line, and to read the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest request line accepted.
pub const MAX_REQUEST: u64 = 256;

/// Errors of the control socket, server and client side.
#[derive(Debug, Error)]
pub enum ControlError {
    /// Another daemon answers on the socket.
    #[error("{}: Another virtnetd is already listening", path.display())]
    InUse {
        /// The socket.
        path: PathBuf,
    },
    /// The socket could not be created.
    #[error("{}: Cannot listen", path.display())]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The client could not reach the daemon.
    #[error("Cannot reach virtnetd at {} (is it running?)", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The exchange failed half-way.
    #[error("Control socket I/O failed")]
    Io(#[source] io::Error),
    /// The daemon answered with an error line.
    #[error("The daemon refused the request: {0}")]
    Refused(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, ControlError>;

/// Answer to `stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    /// One entry per network, in config order.
    pub networks: Vec<NetworkStats>,
}

/// One network in [`StatsReport`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStats {
    /// Network name.
    pub name: String,
    /// Mode name.
    pub mode: String,
    /// Guest ports in config order, then the mode's own ports.
    pub ports: Vec<PortReport>,
    /// The network services (DHCP leases, counters), when the network runs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<crate::mode_hostonly::ServicesReport>,
    /// The NAT gateway's counters, on `nat` networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<Counters>,
    /// The uplink's socket-side counters, on `bridged` networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<Counters>,
}

/// Named counters of a mode's own machinery (a gateway, an uplink).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Counters(pub std::collections::BTreeMap<String, u64>);

impl Counters {
    /// From (name, value) pairs.
    pub fn from_pairs(pairs: &[(&str, u64)]) -> Self {
        Counters(pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect())
    }
}

impl std::ops::Index<&str> for Counters {
    type Output = u64;
    fn index(&self, name: &str) -> &u64 {
        &self.0[name]
    }
}

/// One port in [`StatsReport`]. Directions are the switch's: `rx` is what the switch received
/// from the port (the guest's TX), `tx` what it delivered to the port (the guest's RX).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortReport {
    /// Port name.
    pub name: String,
    /// `guest` for a vhost-user device, otherwise the mode's port kind (e.g. `null`).
    pub kind: String,
    /// The vhost-user socket, for guest ports.
    pub socket: Option<PathBuf>,
    /// Id on the switch.
    pub port_id: u32,
    /// Configured MAC address.
    pub mac: Option<String>,
    /// A VMM is connected.
    pub connected: bool,
    /// The driver negotiated features on this connection.
    pub driver_ok: bool,
    /// RX queue 0 runs: frames for this port are delivered.
    pub running: bool,
    /// VMM connections accepted so far.
    pub connections: u64,
    /// Virtio features the driver acknowledged.
    pub acked_features: u64,
    /// Queue pairs in use.
    pub active_queue_pairs: u16,
    /// Frames received from the port.
    pub rx_frames: u64,
    /// Bytes received from the port.
    pub rx_bytes: u64,
    /// Frames delivered to the port.
    pub tx_frames: u64,
    /// Bytes delivered to the port.
    pub tx_bytes: u64,
    /// Frames from the port that were flooded.
    pub flooded: u64,
    /// Drops by [`DropReason::name`]; every reason is present.
    pub drops: BTreeMap<String, u64>,
}

impl PortReport {
    /// Fill the counters from a snapshot.
    pub fn set_counters(&mut self, s: &PortStatsSnapshot) {
        self.rx_frames = s.rx_frames;
        self.rx_bytes = s.rx_bytes;
        self.tx_frames = s.tx_frames;
        self.tx_bytes = s.tx_bytes;
        self.flooded = s.flooded;
        self.drops = DropReason::ALL
            .iter()
            .map(|r| (r.name().to_string(), s.drop_count(*r)))
            .collect();
    }
}

/// The answer to one request line (with its trailing newline).
pub fn answer(request: &str, stats: &dyn Fn() -> StatsReport) -> String {
    match request.trim() {
        "ping" => "pong\n".to_string(),
        "stats" => match serde_json::to_string(&stats()) {
            Ok(mut s) => {
                s.push('\n');
                s
            }
            Err(e) => format!("error: cannot encode stats: {e}\n"),
        },
        other => format!("error: unknown command {other:?} (try: ping, stats)\n"),
    }
}

/// The listening control socket. Removes its file when dropped.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlServer {
    /// Listen on `path`. A stale socket file is replaced; a live daemon is an error.
    pub fn bind(path: &Path) -> Result<Self> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse { path: path.into() });
            }
            let _ = std::fs::remove_file(path);
        }
        let bind_err = |source| ControlError::Bind {
            path: path.into(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(ControlServer {
            listener,
            path: path.into(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serve every client waiting in the accept queue, one after another.
    /// Client errors are logged, never fatal.
    pub fn handle_pending(&self, stats: &dyn Fn() -> StatsReport) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = serve_client(stream, stats) {
                        tracing::debug!("control client: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    return;
                }
            }
        }
    }
}

impl AsRawFd for ControlServer {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_client(stream: UnixStream, stats: &dyn Fn() -> StatsReport) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let reply = answer(&line, stats);
    (&stream).write_all(reply.as_bytes())?;
    Ok(())
}

/// Client side: send `command` to the daemon at `path` and return its answer (without the
/// trailing newline). An answer starting with `error:` becomes [`ControlError::Refused`].
pub fn request(path: &Path, command: &str) -> Result<String> {
    let mut stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.into(),
        source,
    })?;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(ControlError::Io)?;
    stream
        .write_all(format!("{command}\n").as_bytes())
        .map_err(ControlError::Io)?;
    let mut out = String::new();
    stream.read_to_string(&mut out).map_err(ControlError::Io)?;
    let out = out.trim_end().to_string();
    match out.strip_prefix("error: ") {
        Some(msg) => Err(ControlError::Refused(msg.to_string())),
        None => Ok(out),
    }
}

/// Client side: `stats`, decoded.
pub fn request_stats(path: &Path) -> Result<StatsReport> {
    let text = request(path, "stats")?;
    serde_json::from_str(&text).map_err(|e| ControlError::Io(io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use assert_matches::assert_matches;
    use tempfile::TempDir;

    fn sample() -> StatsReport {
        let mut port = PortReport {
            name: "lab-0".into(),
            kind: "guest".into(),
            socket: Some("/x/lab-0.sock".into()),
            port_id: 3,
            mac: Some("52:54:00:00:00:01".into()),
            connected: true,
            ..PortReport::default()
        };
        let mut snap = PortStatsSnapshot {
            rx_frames: 5,
            rx_bytes: 300,
            ..Default::default()
        };
        snap.drops[DropReason::NoRxBuffers as usize] = 7;
        port.set_counters(&snap);
        StatsReport {
            networks: vec![NetworkStats {
                name: "lab".into(),
                mode: "internal".into(),
                ports: vec![port],
                services: None,
                nat: None,
                uplink: None,
            }],
        }
    }

    #[test]
    fn answers_ping_stats_and_garbage() {
        assert_eq!(answer("ping\n", &sample), "pong\n");
        let s = answer("stats\r\n", &sample);
        assert!(s.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        let p = &v["networks"][0]["ports"][0];
        assert_eq!(v["networks"][0]["name"], "lab");
        assert_eq!(v["networks"][0]["mode"], "internal");
        assert_eq!(p["port_id"], 3);
        assert_eq!(p["rx_frames"], 5);
        assert_eq!(p["rx_bytes"], 300);
        assert_eq!(p["connected"], true);
        assert_eq!(p["drops"]["no_rx_buffers"], 7);
        assert_eq!(p["drops"]["bad_address"], 0);
        assert_eq!(
            p["drops"].as_object().unwrap().len(),
            DropReason::COUNT,
            "every reason is listed"
        );
        for key in [
            "name",
            "socket",
            "mac",
            "running",
            "connections",
            "acked_features",
            "tx_frames",
            "tx_bytes",
            "flooded",
        ] {
            assert!(p.get(key).is_some(), "missing {key}");
        }
        assert!(answer("reboot", &sample).starts_with("error: unknown command \"reboot\""));
    }

    #[test]
    fn server_and_client_talk() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("ctl.sock");
        let server = ControlServer::bind(&path).unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d2 = done.clone();
        let t = std::thread::spawn(move || {
            while !d2.load(std::sync::atomic::Ordering::Relaxed) {
                server.handle_pending(&sample);
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(server);
        });
        assert_eq!(request(&path, "ping").unwrap(), "pong");
        assert_eq!(request_stats(&path).unwrap(), sample());
        assert_matches!(request(&path, "bogus"), Err(ControlError::Refused(m)) if m.contains("bogus"));
        // A second server on the same path is refused while the first answers.
        assert_matches!(ControlServer::bind(&path), Err(ControlError::InUse { .. }));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        t.join().unwrap();
        assert!(!path.exists(), "dropping the server removes the socket");
        assert_matches!(request(&path, "ping"), Err(ControlError::Connect { .. }));
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("ctl.sock");
        drop(UnixListener::bind(&path).unwrap()); // leaves a dead socket file behind
        assert!(path.exists());
        let server = ControlServer::bind(&path).unwrap();
        assert_eq!(server.path(), path);
    }

    #[test]
    fn silent_client_does_not_hang_the_server() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("ctl.sock");
        let server = ControlServer::bind(&path).unwrap();
        let mut quiet = UnixStream::connect(&path).unwrap();
        quiet.write_all(b"pi").unwrap(); // no newline, then hangs up
        drop(quiet);
        server.handle_pending(&sample);
        let c = std::thread::spawn({
            let path = path.clone();
            move || request(&path, "ping")
        });
        // Serve until the client got its answer.
        let start = std::time::Instant::now();
        while !c.is_finished() && start.elapsed() < Duration::from_secs(5) {
            server.handle_pending(&sample);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(c.join().unwrap().unwrap(), "pong");
    }
}
