//! A vhost-user message shim between the VMM and the rust-vmm backend.
//!
//! QEMU's vhost-user-net sends `VHOST_USER_SET_VRING_ENABLE` as soon as the guest driver
//! writes its features (`virtio_net_set_features` → `peer_attach`), which is *before* it sends
//! `VHOST_USER_SET_FEATURES` to the backend. The `vhost` 0.18 crate rejects that message
//! ("inactive feature: PROTOCOL_FEATURES") and `VhostUserDaemon` then drops the connection,
//! so no QEMU guest could ever use the device. QEMU 7.2 even "restores the vring enable
//! state" in `vhost_net_start` just *before* `SET_FEATURES`, and never again. So the shim
//! holds `SET_VRING_ENABLE` back until `SET_FEATURES` with `VHOST_USER_F_PROTOCOL_FEATURES`
//! went through, then replays the latest state of each queue (acking the held messages at
//! once when the frontend asked for a reply). Everything else, file descriptors included, is
//! forwarded unchanged in both directions.
//!
//! ```text
//!   VMM ──unix socket──► [shim: vmm→backend thread] ──private socket──► VhostUserDaemon
//!   VMM ◄──────────────  [shim: backend→vmm thread] ◄───────────────────
//! ```
//!
//! Only the control channel goes through the shim; the data path is shared memory and
//! eventfds, as before.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// `VHOST_USER_SET_FEATURES`.
const SET_FEATURES: u32 = 2;
/// `VHOST_USER_SET_VRING_ENABLE`.
const SET_VRING_ENABLE: u32 = 18;
/// Header flags: protocol version 1.
const FLAG_VERSION: u32 = 0x1;
/// Header flags: this is a reply.
const FLAG_REPLY: u32 = 0x4;
/// Header flags: the frontend wants a REPLY_ACK.
const FLAG_NEED_REPLY: u32 = 0x8;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Largest payload we accept (the vhost-user maximum is 4096 + a little; be generous).
const MAX_PAYLOAD: usize = 64 * 1024;
/// Most file descriptors in one message (SET_MEM_TABLE has at most 8).
const MAX_FDS: usize = 32;

/// Errors of the shim.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket I/O failed.
    #[error("Shim socket I/O")]
    Io(#[source] io::Error),
    /// A message header announced an absurd payload.
    #[error("Message payload too large: {0} bytes")]
    TooLarge(usize),
}

/// One message: header, payload, file descriptors.
struct Msg {
    hdr: [u8; 12],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Msg {
    fn request(&self) -> u32 {
        u32::from_le_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes([self.hdr[4], self.hdr[5], self.hdr[6], self.hdr[7]])
    }
}

/// Read one message; `Ok(None)` at end of stream.
fn recv_msg(sock: &UnixStream) -> Result<Option<Msg>, Error> {
    let mut hdr = [0u8; 12];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    }];
    // SAFETY: the iovec points at `hdr`, which is valid for writes of its whole length and
    // outlives the call; `raw_fds` receives descriptor numbers only.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| Error::Io(io::Error::from_raw_os_error(e.errno())))?;
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        // SAFETY: the kernel just installed these descriptors for us; nobody else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut r = sock;
    if n < hdr.len() {
        r.read_exact(&mut hdr[n..]).map_err(Error::Io)?;
    }
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(Error::TooLarge(size));
    }
    let mut payload = vec![0u8; size];
    r.read_exact(&mut payload).map_err(Error::Io)?;
    Ok(Some(Msg { hdr, payload, fds }))
}

/// Write one message (header and payload in one `sendmsg`, with its descriptors).
fn send_msg(sock: &UnixStream, m: &Msg) -> Result<(), Error> {
    let mut buf = Vec::with_capacity(12 + m.payload.len());
    buf.extend_from_slice(&m.hdr);
    buf.extend_from_slice(&m.payload);
    let fds: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
    let sent = sock
        .send_with_fds(&[&buf[..]], &fds)
        .map_err(|e| Error::Io(io::Error::from_raw_os_error(e.errno())))?;
    if sent < buf.len() {
        let mut w = sock;
        w.write_all(&buf[sent..]).map_err(Error::Io)?;
    }
    Ok(())
}

/// A REPLY_ACK success for `req`.
fn ack(req: &Msg) -> Msg {
    let mut hdr = [0u8; 12];
    hdr[0..4].copy_from_slice(&req.request().to_le_bytes());
    hdr[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    hdr[8..12].copy_from_slice(&8u32.to_le_bytes());
    Msg {
        hdr,
        payload: 0u64.to_le_bytes().to_vec(),
        fds: Vec::new(),
    }
}

/// A `SET_VRING_ENABLE` message for `(index, num)` without a reply request.
fn vring_enable(index: u32, num: u32) -> Msg {
    let mut hdr = [0u8; 12];
    hdr[0..4].copy_from_slice(&SET_VRING_ENABLE.to_le_bytes());
    hdr[4..8].copy_from_slice(&FLAG_VERSION.to_le_bytes());
    hdr[8..12].copy_from_slice(&8u32.to_le_bytes());
    let mut payload = index.to_le_bytes().to_vec();
    payload.extend_from_slice(&num.to_le_bytes());
    Msg {
        hdr,
        payload,
        fds: Vec::new(),
    }
}

/// Forward VMM → backend, deferring early `SET_VRING_ENABLE` until after `SET_FEATURES`.
fn vmm_to_backend(
    vmm: &UnixStream,
    backend: &UnixStream,
    vmm_tx: &Mutex<UnixStream>,
) -> Result<(), Error> {
    let mut protocol_acked = false;
    // Latest early enable state per queue, replayed after SET_FEATURES.
    let mut deferred: Vec<(u32, u32)> = Vec::new();
    while let Some(m) = recv_msg(vmm)? {
        log::trace!(
            "shim: request {} flags {:#x} size {} fds {}",
            m.request(),
            m.flags(),
            m.payload.len(),
            m.fds.len()
        );
        match m.request() {
            SET_FEATURES if m.payload.len() >= 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&m.payload[..8]);
                protocol_acked = u64::from_le_bytes(b) & PROTOCOL_FEATURES != 0;
                send_msg(backend, &m)?;
                if protocol_acked {
                    for (index, num) in deferred.drain(..) {
                        send_msg(backend, &vring_enable(index, num))?;
                    }
                }
                continue;
            }
            SET_VRING_ENABLE if !protocol_acked && m.payload.len() >= 8 => {
                let index =
                    u32::from_le_bytes([m.payload[0], m.payload[1], m.payload[2], m.payload[3]]);
                let num =
                    u32::from_le_bytes([m.payload[4], m.payload[5], m.payload[6], m.payload[7]]);
                log::debug!("shim: SET_VRING_ENABLE({index}, {num}) before SET_FEATURES: deferred");
                if let Some(e) = deferred.iter_mut().find(|(i, _)| *i == index) {
                    e.1 = num;
                } else if deferred.len() < 1024 {
                    deferred.push((index, num));
                }
                if m.flags() & FLAG_NEED_REPLY != 0 {
                    let tx = vmm_tx.lock().unwrap_or_else(|e| e.into_inner());
                    send_msg(&tx, &ack(&m))?;
                }
                continue;
            }
            _ => {}
        }
        send_msg(backend, &m)?;
    }
    Ok(())
}

/// Forward backend → VMM.
fn backend_to_vmm(backend: &UnixStream, vmm_tx: &Mutex<UnixStream>) -> Result<(), Error> {
    while let Some(m) = recv_msg(backend)? {
        let tx = vmm_tx.lock().unwrap_or_else(|e| e.into_inner());
        send_msg(&tx, &m)?;
    }
    Ok(())
}

/// Run the shim between `vmm` and `backend` on two threads until either side closes.
pub fn spawn(vmm: UnixStream, backend: UnixStream, name: &str) -> io::Result<[JoinHandle<()>; 2]> {
    let vmm_tx = Arc::new(Mutex::new(vmm.try_clone()?));
    let backend2 = backend.try_clone()?;
    let vmm2 = vmm.try_clone()?;
    let (tx1, tx2) = (vmm_tx.clone(), vmm_tx);
    let (n1, n2) = (name.to_string(), name.to_string());
    let a = std::thread::Builder::new()
        .name(format!("vu-shim-{name}"))
        .spawn(move || {
            if let Err(e) = vmm_to_backend(&vmm, &backend, &tx1) {
                log::debug!("{n1}: shim (from VMM): {e}");
            }
            let _ = backend.shutdown(std::net::Shutdown::Both);
            let _ = vmm.shutdown(std::net::Shutdown::Both);
        })?;
    let b = std::thread::Builder::new()
        .name(format!("vu-shim-{name}"))
        .spawn(move || {
            if let Err(e) = backend_to_vmm(&backend2, &tx2) {
                log::debug!("{n2}: shim (from backend): {e}");
            }
            let _ = vmm2.shutdown(std::net::Shutdown::Both);
            let _ = backend2.shutdown(std::net::Shutdown::Both);
        })?;
    Ok([a, b])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(req: u32, flags: u32, payload: &[u8]) -> Msg {
        let mut hdr = [0u8; 12];
        hdr[0..4].copy_from_slice(&req.to_le_bytes());
        hdr[4..8].copy_from_slice(&flags.to_le_bytes());
        hdr[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Msg {
            hdr,
            payload: payload.to_vec(),
            fds: Vec::new(),
        }
    }

    #[test]
    fn defers_early_vring_enable_and_forwards_the_rest() {
        let (vmm, vmm_peer) = UnixStream::pair().unwrap();
        let (backend, backend_peer) = UnixStream::pair().unwrap();
        let threads = spawn(vmm_peer, backend_peer, "t").unwrap();
        // Early disable, then enable with NEED_REPLY: acked by the shim, held back.
        let early = [0u8, 0, 0, 0, 1, 0, 0, 0]; // queue 0, enable
        send_msg(&vmm, &msg(SET_VRING_ENABLE, FLAG_VERSION, &[0; 8])).unwrap();
        send_msg(
            &vmm,
            &msg(SET_VRING_ENABLE, FLAG_VERSION | FLAG_NEED_REPLY, &early),
        )
        .unwrap();
        let r = recv_msg(&vmm).unwrap().unwrap();
        assert_eq!(r.request(), SET_VRING_ENABLE);
        assert_eq!(r.flags(), FLAG_VERSION | FLAG_REPLY);
        assert_eq!(r.payload, vec![0; 8]);
        // SET_FEATURES with PROTOCOL_FEATURES, with an fd attached to test passing.
        let (a, _b) = UnixStream::pair().unwrap();
        let mut m = msg(SET_FEATURES, FLAG_VERSION, &PROTOCOL_FEATURES.to_le_bytes());
        m.fds.push(OwnedFd::from(a));
        send_msg(&vmm, &m).unwrap();
        let f = recv_msg(&backend).unwrap().unwrap();
        assert_eq!(f.request(), SET_FEATURES);
        assert_eq!(f.fds.len(), 1);
        // The deferred enable follows, without a reply request.
        let e = recv_msg(&backend).unwrap().unwrap();
        assert_eq!(e.request(), SET_VRING_ENABLE);
        assert_eq!(e.flags(), FLAG_VERSION);
        assert_eq!(e.payload, early);
        // Now enables go through.
        send_msg(&vmm, &msg(SET_VRING_ENABLE, FLAG_VERSION, &[1; 8])).unwrap();
        assert_eq!(
            recv_msg(&backend).unwrap().unwrap().request(),
            SET_VRING_ENABLE
        );
        // Replies flow back.
        send_msg(&backend, &msg(1, FLAG_VERSION | FLAG_REPLY, &[7; 8])).unwrap();
        assert_eq!(recv_msg(&vmm).unwrap().unwrap().payload, vec![7; 8]);
        // Closing the VMM side ends both threads.
        drop(vmm);
        for t in threads {
            t.join().unwrap();
        }
        assert!(recv_msg(&backend).unwrap().is_none());
    }
}
