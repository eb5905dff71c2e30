//! The DHCPv4 server: lease logic over dhcproto's wire format.
//!
//! # Theory of operation
//!
//! The server is a pure state machine: [`DhcpServer::handle`] takes one decoded request, the
//! Ethernet source MAC it came from, the switch port that MAC was learned on and the clock
//! (Unix seconds), and returns at most one reply with where to send it. It does no I/O except
//! writing the lease file ([`crate::lease`]) when a binding changes.
//!
//! | request                       | condition                                   | answer            |
//! |-------------------------------|---------------------------------------------|-------------------|
//! | DISCOVER                      | address available, port under its lease cap | OFFER (held 60 s) |
//! | DISCOVER                      | pool exhausted / port cap reached           | silence (counted) |
//! | REQUEST, server id = ours     | requested ip = our offer/lease for the MAC  | ACK, bind         |
//! | REQUEST, server id = ours     | anything else                               | NAK               |
//! | REQUEST, server id = other    | the client chose another server             | offer withdrawn   |
//! | REQUEST, init-reboot (opt 50) | our lease for the MAC has that ip           | ACK               |
//! | REQUEST, init-reboot          | ip outside the subnet or bound to another   | NAK               |
//! | REQUEST, init-reboot          | no record of the client, ip free            | ACK (re-bind)     |
//! | REQUEST, renew/rebind (ciaddr)| lease for the MAC has ciaddr                | ACK, extend       |
//! | REQUEST, renew/rebind         | otherwise                                   | NAK               |
//! | DECLINE                       | for our lease                               | quarantine the ip |
//! | RELEASE                       | for our lease                               | lease expires now |
//! | INFORM                        | ciaddr in the subnet                        | ACK, options only |
//!
//! Address choice for a client, in order: its static reservation; its current or last lease
//! (an expired lease keeps its MAC→address association until the address is needed); the
//! address it asks for (option 50) when free; the lowest never-used address of the pool; the
//! address of the longest-expired lease of another client. Reserved addresses are only
//! handed to their owner, quarantined (declined) ones to nobody until the quarantine ends.
//!
//! The per-port cap bounds how many addresses one switch port (one VM) may hold at once
//! (offers and unexpired leases of all the MACs behind it), so a guest that cycles through
//! MAC addresses cannot empty the pool for the others.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use ipnet::Ipv4Net;
use thiserror::Error;
use virtnet_switch::{MacAddr, PortId};

use crate::lease::{self, LeaseRecord};

/// How long an offer holds its address (seconds).
pub const OFFER_SECS: u64 = 60;
/// How long a declined address stays out of the pool (seconds).
pub const DECLINE_SECS: u64 = 600;
/// Default lease time (seconds).
pub const DEFAULT_LEASE_SECS: u32 = 3600;
/// Shortest lease accepted by validation.
pub const MIN_LEASE_SECS: u32 = 60;
/// Default per-port cap on addresses held.
pub const DEFAULT_MAX_LEASES_PER_PORT: usize = 4;
/// Largest pool accepted (addresses), to bound the allocator's scans.
pub const MAX_POOL: u32 = 65_536;
/// DHCP server UDP port.
pub const SERVER_PORT: u16 = 67;
/// DHCP client UDP port.
pub const CLIENT_PORT: u16 = 68;

/// Errors of DHCP configuration, decoding and the lease file.
#[derive(Debug, Error)]
pub enum DhcpError {
    /// The pool's first address is after its last.
    #[error("DHCP range {start}-{end} is empty")]
    EmptyRange {
        /// First address.
        start: Ipv4Addr,
        /// Last address.
        end: Ipv4Addr,
    },
    /// An address is outside the subnet's host addresses.
    #[error("{what} {addr} is not a host address of {subnet}")]
    OutsideSubnet {
        /// Which address.
        what: &'static str,
        /// The address.
        addr: Ipv4Addr,
        /// The subnet.
        subnet: Ipv4Net,
    },
    /// The server's own address lies in the pool.
    #[error("Server address {0} lies inside the DHCP range")]
    ServerInRange(Ipv4Addr),
    /// The pool is too large.
    #[error("DHCP range has {0} addresses, more than {MAX_POOL}")]
    PoolTooLarge(u64),
    /// The lease time is too short.
    #[error("Lease time {0} s is shorter than {MIN_LEASE_SECS} s")]
    LeaseTooShort(u32),
    /// Two reservations for one MAC or one address.
    #[error("Duplicate reservation for {0}")]
    DuplicateReservation(String),
    /// The per-port cap is zero.
    #[error("max_leases_per_port must be at least 1")]
    ZeroCap,
    /// The packet is not a DHCP message.
    #[error("Malformed DHCP message: {0}")]
    Decode(String),
    /// The lease file cannot be read or written.
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, DhcpError>;

/// A DHCP server's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpConfig {
    /// The network.
    pub subnet: Ipv4Net,
    /// The server's own address (server identifier, source of replies).
    pub server_ip: Ipv4Addr,
    /// Router option (3); `None` for networks with no way out.
    pub router: Option<Ipv4Addr>,
    /// First address of the pool.
    pub range_start: Ipv4Addr,
    /// Last address of the pool (inclusive).
    pub range_end: Ipv4Addr,
    /// Lease time in seconds.
    pub lease_secs: u32,
    /// Static reservations: this MAC always gets this address (may lie outside the pool).
    pub reservations: Vec<(MacAddr, Ipv4Addr)>,
    /// DNS servers (option 6).
    pub dns: Vec<Ipv4Addr>,
    /// Domain name (option 15).
    pub domain: Option<String>,
    /// Interface MTU (option 26).
    pub mtu: Option<u16>,
    /// Classless static routes (option 121): destination, gateway.
    pub routes: Vec<(Ipv4Net, Ipv4Addr)>,
    /// Most addresses one switch port may hold at once.
    pub max_leases_per_port: usize,
    /// Where leases persist; `None` keeps them in memory only.
    pub lease_file: Option<PathBuf>,
}

impl DhcpConfig {
    /// A server at `server_ip` handing out `start..=end` of `subnet` with default settings.
    pub fn new(subnet: Ipv4Net, server_ip: Ipv4Addr, start: Ipv4Addr, end: Ipv4Addr) -> Self {
        DhcpConfig {
            subnet,
            server_ip,
            router: None,
            range_start: start,
            range_end: end,
            lease_secs: DEFAULT_LEASE_SECS,
            reservations: Vec::new(),
            dns: Vec::new(),
            domain: None,
            mtu: None,
            routes: Vec::new(),
            max_leases_per_port: DEFAULT_MAX_LEASES_PER_PORT,
            lease_file: None,
        }
    }

    fn is_host(&self, a: Ipv4Addr) -> bool {
        self.subnet.contains(&a)
            && (self.subnet.prefix_len() >= 31
                || (a != self.subnet.network() && a != self.subnet.broadcast()))
    }

    /// Is `a` in the pool?
    pub fn in_range(&self, a: Ipv4Addr) -> bool {
        a >= self.range_start && a <= self.range_end
    }

    /// Check the configuration; the first problem found is returned.
    pub fn validate(&self) -> Result<()> {
        let outside = |what, addr| DhcpError::OutsideSubnet {
            what,
            addr,
            subnet: self.subnet,
        };
        if self.range_start > self.range_end {
            return Err(DhcpError::EmptyRange {
                start: self.range_start,
                end: self.range_end,
            });
        }
        for (what, a) in [
            ("Range start", self.range_start),
            ("Range end", self.range_end),
            ("Server address", self.server_ip),
        ] {
            if !self.is_host(a) {
                return Err(outside(what, a));
            }
        }
        if self.in_range(self.server_ip) {
            return Err(DhcpError::ServerInRange(self.server_ip));
        }
        let size =
            u64::from(u32::from(self.range_end)) - u64::from(u32::from(self.range_start)) + 1;
        if size > u64::from(MAX_POOL) {
            return Err(DhcpError::PoolTooLarge(size));
        }
        if self.lease_secs < MIN_LEASE_SECS {
            return Err(DhcpError::LeaseTooShort(self.lease_secs));
        }
        if self.max_leases_per_port == 0 {
            return Err(DhcpError::ZeroCap);
        }
        let mut macs = HashMap::new();
        let mut ips = HashMap::new();
        for (mac, ip) in &self.reservations {
            if !self.is_host(*ip) || *ip == self.server_ip {
                return Err(outside("Reservation", *ip));
            }
            if macs.insert(*mac, ()).is_some() {
                return Err(DhcpError::DuplicateReservation(mac.to_string()));
            }
            if ips.insert(*ip, ()).is_some() {
                return Err(DhcpError::DuplicateReservation(ip.to_string()));
            }
        }
        Ok(())
    }
}

/// A lease's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Offered, not yet requested.
    Offered,
    /// Acknowledged.
    Bound,
}

/// One client's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The client.
    pub mac: MacAddr,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Unix time when it ends.
    pub expires: u64,
    /// Offered or bound.
    pub state: LeaseState,
    /// The switch port the client was on (unknown for leases loaded from the file).
    pub port: Option<PortId>,
}

impl Lease {
    fn active(&self, now: u64) -> bool {
        self.expires > now
    }
}

/// Where a reply goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyDst {
    /// Ethernet and IPv4 broadcast.
    Broadcast,
    /// Unicast to this MAC and address.
    Unicast {
        /// Destination MAC.
        mac: MacAddr,
        /// Destination IPv4 address.
        ip: Ipv4Addr,
    },
}

/// A reply to send.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The message.
    pub msg: Message,
    /// Where it goes.
    pub dst: ReplyDst,
}

impl Reply {
    /// The DHCP message type of the reply.
    pub fn kind(&self) -> Option<MessageType> {
        self.msg.opts().msg_type()
    }
}

/// What happened to the requests (for stats and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DhcpCounters {
    /// Requests handled (decoded, ours to answer).
    pub requests: u64,
    /// OFFERs sent.
    pub offers: u64,
    /// ACKs sent (requests and informs).
    pub acks: u64,
    /// NAKs sent.
    pub naks: u64,
    /// Releases honoured.
    pub releases: u64,
    /// Declines honoured.
    pub declines: u64,
    /// Packets that did not decode or were not BOOTREQUESTs.
    pub malformed: u64,
    /// Requests whose chaddr was not the Ethernet source MAC.
    pub spoofed: u64,
    /// DISCOVERs refused because their port holds its cap.
    pub port_cap: u64,
    /// DISCOVERs refused because the pool is exhausted.
    pub exhausted: u64,
    /// Lease file write failures.
    pub persist_errors: u64,
}

/// The DHCP server state machine.
pub struct DhcpServer {
    config: DhcpConfig,
    leases: HashMap<MacAddr, Lease>,
    by_ip: HashMap<Ipv4Addr, MacAddr>,
    declined: HashMap<Ipv4Addr, u64>,
    reserved: HashMap<MacAddr, Ipv4Addr>,
    reserved_ips: HashMap<Ipv4Addr, MacAddr>,
    counters: DhcpCounters,
}

/// Decode a DHCP message from a UDP payload; never panics.
pub fn decode(payload: &[u8]) -> Result<Message> {
    let r = std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(payload)));
    match r {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => Err(DhcpError::Decode(e.to_string())),
        Err(_) => Err(DhcpError::Decode("decoder panicked".into())),
    }
}

/// Encode a message into `out` (cleared first).
pub fn encode(msg: &Message, out: &mut Vec<u8>) -> Result<()> {
    out.clear();
    msg.encode(&mut Encoder::new(out))
        .map_err(|e| DhcpError::Decode(e.to_string()))
}

impl DhcpServer {
    /// A server with `config` (validated), loading the lease file if one is configured.
    pub fn new(config: DhcpConfig, now: u64) -> Result<Self> {
        config.validate()?;
        let reserved: HashMap<MacAddr, Ipv4Addr> = config.reservations.iter().copied().collect();
        let reserved_ips = config.reservations.iter().map(|(m, i)| (*i, *m)).collect();
        let mut s = DhcpServer {
            config,
            leases: HashMap::new(),
            by_ip: HashMap::new(),
            declined: HashMap::new(),
            reserved,
            reserved_ips,
            counters: DhcpCounters::default(),
        };
        if let Some(path) = s.config.lease_file.clone() {
            for rec in lease::load(&path)? {
                match rec {
                    LeaseRecord::Lease { mac, ip, expires } => {
                        let ok = s.config.is_host(ip)
                            && ip != s.config.server_ip
                            && (s.config.in_range(ip) || s.reserved.get(&mac) == Some(&ip))
                            && s.reserved_ips.get(&ip).is_none_or(|m| *m == mac)
                            && !s.by_ip.contains_key(&ip);
                        if !ok {
                            tracing::warn!("lease file: dropping lease {mac} {ip}: not valid for this network any more");
                            continue;
                        }
                        s.insert(Lease {
                            mac,
                            ip,
                            expires,
                            state: LeaseState::Bound,
                            port: None,
                        });
                    }
                    LeaseRecord::Declined { ip, until } => {
                        if until > now {
                            s.declined.insert(ip, until);
                        }
                    }
                }
            }
        }
        Ok(s)
    }

    /// The configuration.
    pub fn config(&self) -> &DhcpConfig {
        &self.config
    }

    /// What happened so far.
    pub fn counters(&self) -> DhcpCounters {
        self.counters
    }

    /// Count a request that failed before reaching the state machine.
    pub fn count_malformed(&mut self) {
        self.counters.malformed += 1;
    }

    /// Every lease (offered and bound, expired included), sorted by address.
    pub fn leases(&self) -> Vec<Lease> {
        let mut v: Vec<Lease> = self.leases.values().copied().collect();
        v.sort_by_key(|l| l.ip);
        v
    }

    /// The lease of `mac`, if any.
    pub fn lease(&self, mac: MacAddr) -> Option<&Lease> {
        self.leases.get(&mac)
    }

    fn insert(&mut self, l: Lease) {
        if let Some(old) = self.leases.insert(l.mac, l) {
            if old.ip != l.ip && self.by_ip.get(&old.ip) == Some(&l.mac) {
                self.by_ip.remove(&old.ip);
            }
        }
        self.by_ip.insert(l.ip, l.mac);
    }

    fn remove(&mut self, mac: MacAddr) {
        if let Some(old) = self.leases.remove(&mac) {
            if self.by_ip.get(&old.ip) == Some(&mac) {
                self.by_ip.remove(&old.ip);
            }
        }
    }

    /// Addresses held right now through `port` by MACs other than `mac`.
    fn held_by_port(&self, port: PortId, mac: MacAddr, now: u64) -> usize {
        self.leases
            .values()
            .filter(|l| l.port == Some(port) && l.mac != mac && l.active(now))
            .count()
    }

    /// Can `mac` have `ip` now?
    fn available(&self, ip: Ipv4Addr, mac: MacAddr, now: u64) -> bool {
        if !self.config.is_host(ip) || ip == self.config.server_ip {
            return false;
        }
        if let Some(owner) = self.reserved_ips.get(&ip) {
            return *owner == mac;
        }
        if !self.config.in_range(ip) {
            return false;
        }
        if self.declined.get(&ip).is_some_and(|until| *until > now) {
            return false;
        }
        match self.by_ip.get(&ip) {
            Some(m) if *m == mac => true,
            Some(m) => self.leases.get(m).is_none_or(|l| !l.active(now)),
            None => true,
        }
    }

    /// The address `mac` should be offered, if any.
    fn choose(&self, mac: MacAddr, requested: Option<Ipv4Addr>, now: u64) -> Option<Ipv4Addr> {
        if let Some(ip) = self.reserved.get(&mac) {
            return Some(*ip);
        }
        if let Some(l) = self.leases.get(&mac) {
            if self.available(l.ip, mac, now) {
                return Some(l.ip);
            }
        }
        if let Some(ip) = requested {
            if self.available(ip, mac, now) {
                return Some(ip);
            }
        }
        let (a, b) = (
            u32::from(self.config.range_start),
            u32::from(self.config.range_end),
        );
        let mut oldest: Option<(u64, Ipv4Addr)> = None;
        for n in a..=b {
            let ip = Ipv4Addr::from(n);
            if !self.available(ip, mac, now) {
                continue;
            }
            match self.by_ip.get(&ip).and_then(|m| self.leases.get(m)) {
                None => return Some(ip),
                Some(l) => {
                    if oldest.is_none_or(|(e, _)| l.expires < e) {
                        oldest = Some((l.expires, ip));
                    }
                }
            }
        }
        oldest.map(|(_, ip)| ip)
    }

    fn persist(&mut self, now: u64) {
        let Some(path) = self.config.lease_file.clone() else {
            return;
        };
        let mut recs: Vec<LeaseRecord> = self
            .leases
            .values()
            .filter(|l| l.state == LeaseState::Bound)
            .map(|l| LeaseRecord::Lease {
                mac: l.mac,
                ip: l.ip,
                expires: l.expires,
            })
            .collect();
        recs.extend(
            self.declined
                .iter()
                .filter(|(_, u)| **u > now)
                .map(|(ip, until)| LeaseRecord::Declined {
                    ip: *ip,
                    until: *until,
                }),
        );
        if let Err(e) = lease::store(&path, &recs) {
            self.counters.persist_errors += 1;
            tracing::error!("DHCP: {e}");
        }
    }

    /// Forget offers that ran out and quarantines that ended (call now and then).
    pub fn expire(&mut self, now: u64) {
        let stale: Vec<MacAddr> = self
            .leases
            .values()
            .filter(|l| l.state == LeaseState::Offered && !l.active(now))
            .map(|l| l.mac)
            .collect();
        for m in stale {
            self.remove(m);
        }
        self.declined.retain(|_, until| *until > now);
    }

    fn reply(&self, req: &Message, kind: MessageType, yiaddr: Ipv4Addr, lease: bool) -> Message {
        let mut m = Message::default();
        m.set_opcode(Opcode::BootReply)
            .set_htype(req.htype())
            .set_xid(req.xid())
            .set_flags(req.flags())
            .set_giaddr(req.giaddr())
            .set_chaddr(req.chaddr())
            .set_yiaddr(yiaddr)
            .set_siaddr(self.config.server_ip);
        if kind == MessageType::Ack && yiaddr.is_unspecified() {
            m.set_ciaddr(req.ciaddr());
        }
        let c = &self.config;
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::ServerIdentifier(c.server_ip));
        if kind == MessageType::Nak {
            return m;
        }
        if lease {
            o.insert(DhcpOption::AddressLeaseTime(c.lease_secs));
            o.insert(DhcpOption::Renewal(c.lease_secs / 2));
            o.insert(DhcpOption::Rebinding(c.lease_secs / 8 * 7));
        }
        o.insert(DhcpOption::SubnetMask(c.subnet.netmask()));
        o.insert(DhcpOption::BroadcastAddr(c.subnet.broadcast()));
        if let Some(r) = c.router {
            o.insert(DhcpOption::Router(vec![r]));
        }
        if !c.dns.is_empty() {
            o.insert(DhcpOption::DomainNameServer(c.dns.clone()));
        }
        if let Some(d) = &c.domain {
            o.insert(DhcpOption::DomainName(d.clone()));
        }
        if let Some(mtu) = c.mtu {
            o.insert(DhcpOption::InterfaceMtu(mtu));
        }
        if !c.routes.is_empty() {
            // RFC 3442: a client that takes option 121 ignores option 3, so repeat the default
            // route in it.
            let mut routes = c.routes.clone();
            if let Some(r) = c.router {
                if !routes.iter().any(|(n, _)| n.prefix_len() == 0) {
                    routes.push((Ipv4Net::default(), r));
                }
            }
            o.insert(DhcpOption::ClasslessStaticRoute(routes));
        }
        m
    }

    /// Where a reply to `req` goes (RFC 2131 4.1, no relays on a switch).
    fn dst(req: &Message, mac: MacAddr, yiaddr: Ipv4Addr, kind: MessageType) -> ReplyDst {
        let ci = req.ciaddr();
        if kind == MessageType::Nak {
            return ReplyDst::Broadcast;
        }
        if !ci.is_unspecified() {
            return ReplyDst::Unicast { mac, ip: ci };
        }
        if req.flags().broadcast() || yiaddr.is_unspecified() {
            return ReplyDst::Broadcast;
        }
        ReplyDst::Unicast { mac, ip: yiaddr }
    }

    fn answer(&mut self, req: &Message, mac: MacAddr, kind: MessageType, ip: Ipv4Addr) -> Reply {
        match kind {
            MessageType::Offer => self.counters.offers += 1,
            MessageType::Ack => self.counters.acks += 1,
            MessageType::Nak => self.counters.naks += 1,
            _ => {}
        }
        let lease = kind != MessageType::Nak && !ip.is_unspecified();
        Reply {
            msg: self.reply(req, kind, ip, lease),
            dst: Self::dst(req, mac, ip, kind),
        }
    }

    fn nak(&mut self, req: &Message, mac: MacAddr) -> Option<Reply> {
        Some(self.answer(req, mac, MessageType::Nak, Ipv4Addr::UNSPECIFIED))
    }

    fn bind(&mut self, req: &Message, mac: MacAddr, ip: Ipv4Addr, port: PortId, now: u64) -> Reply {
        // Another client's expired lease on this address goes.
        if let Some(other) = self.by_ip.get(&ip).copied() {
            if other != mac {
                self.remove(other);
            }
        }
        self.insert(Lease {
            mac,
            ip,
            expires: now + u64::from(self.config.lease_secs),
            state: LeaseState::Bound,
            port: Some(port),
        });
        self.persist(now);
        self.answer(req, mac, MessageType::Ack, ip)
    }

    /// Handle one request. `src` is the frame's Ethernet source, `port` the switch port it was
    /// learned on. Returns the reply to send, if any.
    pub fn handle(&mut self, req: &Message, src: MacAddr, port: PortId, now: u64) -> Option<Reply> {
        if req.opcode() != Opcode::BootRequest || req.htype() != HType::Eth || req.hlen() != 6 {
            self.counters.malformed += 1;
            return None;
        }
        let Some(kind) = req.opts().msg_type() else {
            self.counters.malformed += 1;
            return None;
        };
        let chaddr = req.chaddr();
        let mac = match <[u8; 6]>::try_from(chaddr.get(..6).unwrap_or(&[])) {
            Ok(b) => MacAddr(b),
            Err(_) => {
                self.counters.malformed += 1;
                return None;
            }
        };
        if mac != src || !mac.is_unicast() {
            // A client speaks for itself only: a chaddr that is not the frame's source MAC is
            // a spoof (or a relay, which a switch port never is).
            self.counters.spoofed += 1;
            return None;
        }
        let server_id = match req.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        };
        let requested = match req.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let ours = |s: &Self| server_id.is_none_or(|id| id == s.config.server_ip);
        self.counters.requests += 1;
        match kind {
            MessageType::Discover => {
                if !self.reserved.contains_key(&mac)
                    && self.held_by_port(port, mac, now) >= self.config.max_leases_per_port
                {
                    self.counters.port_cap += 1;
                    tracing::warn!(
                        "DHCP: port {} holds {} addresses already; no offer for {mac}",
                        port.0,
                        self.config.max_leases_per_port
                    );
                    return None;
                }
                let Some(ip) = self.choose(mac, requested, now) else {
                    self.counters.exhausted += 1;
                    tracing::warn!("DHCP: pool exhausted; no offer for {mac}");
                    return None;
                };
                if let Some(other) = self.by_ip.get(&ip).copied() {
                    if other != mac {
                        self.remove(other);
                    }
                }
                let existing = self.leases.get(&mac).copied();
                let lease = match existing {
                    Some(l) if l.ip == ip && l.state == LeaseState::Bound && l.active(now) => {
                        Lease {
                            port: Some(port),
                            ..l
                        }
                    }
                    _ => Lease {
                        mac,
                        ip,
                        expires: now + OFFER_SECS,
                        state: LeaseState::Offered,
                        port: Some(port),
                    },
                };
                self.insert(lease);
                Some(self.answer(req, mac, MessageType::Offer, ip))
            }
            MessageType::Request => {
                let ci = req.ciaddr();
                if let Some(id) = server_id {
                    if id != self.config.server_ip {
                        // The client took another server's offer.
                        if self
                            .leases
                            .get(&mac)
                            .is_some_and(|l| l.state == LeaseState::Offered)
                        {
                            self.remove(mac);
                        }
                        return None;
                    }
                    // SELECTING.
                    let Some(ip) = requested.or((!ci.is_unspecified()).then_some(ci)) else {
                        return self.nak(req, mac);
                    };
                    let mine = self.leases.get(&mac).is_some_and(|l| l.ip == ip);
                    let fresh = !mine
                        && self.available(ip, mac, now)
                        && self.choose(mac, Some(ip), now) == Some(ip)
                        && self.held_by_port(port, mac, now) < self.config.max_leases_per_port;
                    if (mine && self.available(ip, mac, now)) || fresh {
                        return Some(self.bind(req, mac, ip, port, now));
                    }
                    return self.nak(req, mac);
                }
                if let Some(ip) = requested {
                    // INIT-REBOOT.
                    if !self.config.is_host(ip) {
                        return self.nak(req, mac);
                    }
                    match self.leases.get(&mac) {
                        Some(l) if l.ip == ip && self.available(ip, mac, now) => {
                            Some(self.bind(req, mac, ip, port, now))
                        }
                        Some(_) => self.nak(req, mac),
                        None if self.choose(mac, Some(ip), now) == Some(ip)
                            && self.held_by_port(port, mac, now)
                                < self.config.max_leases_per_port =>
                        {
                            Some(self.bind(req, mac, ip, port, now))
                        }
                        None if !self.available(ip, mac, now) => self.nak(req, mac),
                        None => None,
                    }
                } else if !ci.is_unspecified() {
                    // RENEWING (unicast) or REBINDING (broadcast).
                    match self.leases.get(&mac) {
                        Some(l) if l.ip == ci && self.available(ci, mac, now) => {
                            Some(self.bind(req, mac, ci, port, now))
                        }
                        _ => self.nak(req, mac),
                    }
                } else {
                    self.counters.malformed += 1;
                    None
                }
            }
            MessageType::Decline => {
                if !ours(self) {
                    return None;
                }
                let ip = requested?;
                if self.leases.get(&mac).is_some_and(|l| l.ip == ip) {
                    self.remove(mac);
                    self.declined.insert(ip, now + DECLINE_SECS);
                    self.counters.declines += 1;
                    tracing::warn!("DHCP: {mac} declined {ip}: quarantined for {DECLINE_SECS} s");
                    self.persist(now);
                }
                None
            }
            MessageType::Release => {
                if !ours(self) {
                    return None;
                }
                let ip = req.ciaddr();
                if let Some(l) = self.leases.get_mut(&mac) {
                    if l.ip == ip {
                        // Keep the association: the client gets the same address next time if
                        // nobody needed it meanwhile.
                        l.expires = now;
                        self.counters.releases += 1;
                        self.persist(now);
                    }
                }
                None
            }
            MessageType::Inform => {
                let ci = req.ciaddr();
                if !self.config.subnet.contains(&ci) {
                    return None;
                }
                let mut r = self.answer(req, mac, MessageType::Ack, Ipv4Addr::UNSPECIFIED);
                r.msg.set_ciaddr(ci);
                r.dst = ReplyDst::Unicast { mac, ip: ci };
                Some(r)
            }
            _ => {
                self.counters.requests -= 1;
                None
            }
        }
    }
}

/// Build a client request (for tests and tools).
pub fn client_message(kind: MessageType, mac: MacAddr, xid: u32) -> Message {
    let mut m = Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac.0,
    );
    m.set_flags(Flags::default());
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use assert_matches::assert_matches;

    const NOW: u64 = 1_000_000;
    const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 56, 254);
    const P1: PortId = PortId(1);
    const P2: PortId = PortId(2);

    fn mac(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 1, n])
    }

    fn cfg() -> DhcpConfig {
        let mut c = DhcpConfig::new(
            "192.168.56.0/24".parse().unwrap(),
            SERVER,
            Ipv4Addr::new(192, 168, 56, 100),
            Ipv4Addr::new(192, 168, 56, 103),
        );
        c.router = Some(Ipv4Addr::new(192, 168, 56, 1));
        c.dns = vec![Ipv4Addr::new(192, 168, 56, 1)];
        c.domain = Some("lab.test".into());
        c.mtu = Some(1500);
        c.routes = vec![(
            "10.9.0.0/16".parse().unwrap(),
            Ipv4Addr::new(192, 168, 56, 1),
        )];
        c
    }

    fn discover(m: MacAddr, requested: Option<Ipv4Addr>) -> Message {
        let mut msg = client_message(MessageType::Discover, m, 7);
        if let Some(ip) = requested {
            msg.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        }
        msg
    }

    fn request(m: MacAddr, ip: Ipv4Addr, server: Option<Ipv4Addr>) -> Message {
        let mut msg = client_message(MessageType::Request, m, 8);
        msg.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        if let Some(s) = server {
            msg.opts_mut().insert(DhcpOption::ServerIdentifier(s));
        }
        msg
    }

    fn with_ciaddr(kind: MessageType, m: MacAddr, ip: Ipv4Addr) -> Message {
        let mut msg = client_message(kind, m, 9);
        msg.set_ciaddr(ip);
        if kind == MessageType::Release {
            msg.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        }
        msg
    }

    /// DISCOVER + REQUEST; returns the bound address.
    fn lease(s: &mut DhcpServer, m: MacAddr, port: PortId, now: u64) -> Ipv4Addr {
        let offer = s.handle(&discover(m, None), m, port, now).expect("offer");
        assert_eq!(offer.kind(), Some(MessageType::Offer));
        let ip = offer.msg.yiaddr();
        let ack = s
            .handle(&request(m, ip, Some(SERVER)), m, port, now)
            .expect("ack");
        assert_eq!(ack.kind(), Some(MessageType::Ack));
        assert_eq!(ack.msg.yiaddr(), ip);
        ip
    }

    #[test]
    fn validation_rejects_bad_configs() {
        let mut c = cfg();
        c.range_start = Ipv4Addr::new(192, 168, 55, 1);
        assert_matches!(
            c.validate(),
            Err(DhcpError::OutsideSubnet {
                what: "Range start",
                ..
            })
        );
        let mut c = cfg();
        c.range_end = Ipv4Addr::new(192, 168, 56, 255);
        assert_matches!(
            c.validate(),
            Err(DhcpError::OutsideSubnet {
                what: "Range end",
                ..
            })
        );
        let mut c = cfg();
        c.range_start = Ipv4Addr::new(192, 168, 56, 200);
        assert_matches!(c.validate(), Err(DhcpError::EmptyRange { .. }));
        let mut c = cfg();
        c.server_ip = Ipv4Addr::new(192, 168, 56, 101);
        assert_matches!(c.validate(), Err(DhcpError::ServerInRange(_)));
        let mut c = cfg();
        c.lease_secs = 5;
        assert_matches!(c.validate(), Err(DhcpError::LeaseTooShort(5)));
        let mut c = cfg();
        c.reservations = vec![(mac(1), Ipv4Addr::new(10, 0, 0, 1))];
        assert_matches!(
            c.validate(),
            Err(DhcpError::OutsideSubnet {
                what: "Reservation",
                ..
            })
        );
        let mut c = cfg();
        c.reservations = vec![
            (mac(1), Ipv4Addr::new(192, 168, 56, 10)),
            (mac(1), Ipv4Addr::new(192, 168, 56, 11)),
        ];
        assert_matches!(c.validate(), Err(DhcpError::DuplicateReservation(_)));
        let mut c = cfg();
        c.max_leases_per_port = 0;
        assert_matches!(c.validate(), Err(DhcpError::ZeroCap));
        assert!(cfg().validate().is_ok());
    }

    #[test]
    fn discover_request_ack_with_options() {
        let mut s = DhcpServer::new(cfg(), NOW).unwrap();
        let offer = s.handle(&discover(mac(1), None), mac(1), P1, NOW).unwrap();
        assert_eq!(offer.msg.yiaddr(), Ipv4Addr::new(192, 168, 56, 100));
        assert_eq!(offer.msg.opcode(), Opcode::BootReply);
        assert_eq!(offer.msg.xid(), 7);
        assert_eq!(
            offer.dst,
            ReplyDst::Unicast {
                mac: mac(1),
                ip: Ipv4Addr::new(192, 168, 56, 100)
            }
        );
        let o = offer.msg.opts();
        assert_matches!(o.get(OptionCode::ServerIdentifier), Some(DhcpOption::ServerIdentifier(ip)) if *ip == SERVER);
        assert_matches!(
            o.get(OptionCode::AddressLeaseTime),
            Some(DhcpOption::AddressLeaseTime(3600))
        );
        assert_matches!(o.get(OptionCode::Renewal), Some(DhcpOption::Renewal(1800)));
        assert_matches!(
            o.get(OptionCode::Rebinding),
            Some(DhcpOption::Rebinding(3150))
        );
        assert_matches!(o.get(OptionCode::SubnetMask), Some(DhcpOption::SubnetMask(m)) if *m == Ipv4Addr::new(255, 255, 255, 0));
        assert_matches!(o.get(OptionCode::Router), Some(DhcpOption::Router(r)) if r == &[Ipv4Addr::new(192, 168, 56, 1)]);
        assert_matches!(
            o.get(OptionCode::DomainNameServer),
            Some(DhcpOption::DomainNameServer(_))
        );
        assert_matches!(o.get(OptionCode::DomainName), Some(DhcpOption::DomainName(d)) if d == "lab.test");
        assert_matches!(
            o.get(OptionCode::InterfaceMtu),
            Some(DhcpOption::InterfaceMtu(1500))
        );
        assert_matches!(o.get(OptionCode::ClasslessStaticRoute), Some(DhcpOption::ClasslessStaticRoute(r)) if r.len() == 2);
        // The wire format round-trips.
        let mut buf = Vec::new();
        encode(&offer.msg, &mut buf).unwrap();
        let back = decode(&buf).unwrap();
        assert_eq!(back.yiaddr(), offer.msg.yiaddr());
        assert_eq!(s.lease(mac(1)).unwrap().state, LeaseState::Offered);

        let ack = s
            .handle(
                &request(mac(1), offer.msg.yiaddr(), Some(SERVER)),
                mac(1),
                P1,
                NOW,
            )
            .unwrap();
        assert_eq!(ack.kind(), Some(MessageType::Ack));
        let l = s.lease(mac(1)).unwrap();
        assert_eq!((l.state, l.expires), (LeaseState::Bound, NOW + 3600));
        // The broadcast flag makes replies broadcast.
        let mut d = discover(mac(2), None);
        d.set_flags(Flags::default().set_broadcast());
        assert_eq!(
            s.handle(&d, mac(2), P2, NOW).unwrap().dst,
            ReplyDst::Broadcast
        );
    }

    #[test]
    fn request_for_another_servers_offer_withdraws_ours() {
        let mut s = DhcpServer::new(cfg(), NOW).unwrap();
        let offer = s.handle(&discover(mac(1), None), mac(1), P1, NOW).unwrap();
        let other = Ipv4Addr::new(192, 168, 56, 2);
        assert!(s
            .handle(
                &request(mac(1), offer.msg.yiaddr(), Some(other)),
                mac(1),
                P1,
                NOW
            )
            .is_none());
        assert!(s.lease(mac(1)).is_none());
    }

    #[test]
    fn wrong_address_in_selecting_gets_nak() {
        let mut s = DhcpServer::new(cfg(), NOW).unwrap();
        let a = lease(&mut s, mac(1), P1, NOW);
        s.handle(&discover(mac(2), None), mac(2), P2, NOW).unwrap();
        // mac(2) asks for mac(1)'s address.
        let r = s
            .handle(&request(mac(2), a, Some(SERVER)), mac(2), P2, NOW)
            .unwrap();
        assert_eq!(r.kind(), Some(MessageType::Nak));
        assert_eq!(r.dst, ReplyDst::Broadcast);
        assert_eq!(s.counters().naks, 1);
    }

    #[test]
    fn renew_rebind_and_init_reboot() {
        let mut s = DhcpServer::new(cfg(), NOW).unwrap();
        let ip = lease(&mut s, mac(1), P1, NOW);
        // Renew at T1: ciaddr set, unicast answer, lease extended.
        let later = NOW + 1800;
        let r = s
            .handle(
                &with_ciaddr(MessageType::Request, mac(1), ip),
                mac(1),
                P1,
                later,
            )
            .unwrap();
        assert_eq!(r.kind(), Some(MessageType::Ack));
        assert_eq!(r.dst, ReplyDst::Unicast { mac: mac(1), ip });
        assert_eq!(s.lease(mac(1)).unwrap().expires, later + 3600);
        // Renewing an address that is not yours: NAK.
        let r = s
            .handle(
                &with_ciaddr(
                    MessageType::Request,
                    mac(1),
                    Ipv4Addr::new(192, 168, 56, 103),
                ),
                mac(1),
                P1,
                later,
            )
            .unwrap();
        assert_eq!(r.kind(), Some(MessageType::Nak));
        // INIT-REBOOT with the right address: ACK; with an address off the subnet: NAK.
        let r = s
            .handle(&request(mac(1), ip, None), mac(1), P1, later)
            .unwrap();
        assert_eq!(r.kind(), Some(MessageType::Ack));
        let r = s
            .handle(
                &request(mac(1), Ipv4Addr::new(10, 1, 1, 1), None),
                mac(1),
                P1,
                later,
            )
            .unwrap();
        assert_eq!(r.kind(), Some(MessageType::Nak));
        // A stranger asking for a bound address: NAK; for a free one: re-bound.
        let r = s
            .handle(&request(mac(3), ip, None), mac(3), P2, later)
            .unwrap();
        assert_eq!(r.kind(), Some(MessageType::Nak));
        let free = Ipv4Addr::new(192, 168, 56, 102);
        let r = s
            .handle(&request(mac(3), free, None), mac(3), P2, later)
            .unwrap();
        assert_eq!(r.kind(), Some(MessageType::Ack));
    }

    #[test]
    fn release_keeps_association_and_decline_quarantines() {
        let mut s = DhcpServer::new(cfg(), NOW).unwrap();
        let ip = lease(&mut s, mac(1), P1, NOW);
        assert!(s
            .handle(
                &with_ciaddr(MessageType::Release, mac(1), ip),
                mac(1),
                P1,
                NOW + 10
            )
            .is_none());
        assert_eq!(s.counters().releases, 1);
        assert!(!s.lease(mac(1)).unwrap().active(NOW + 10));
        // The same client gets the same address back.
        assert_eq!(lease(&mut s, mac(1), P1, NOW + 20), ip);

        // Decline: the address is quarantined and the client gets another one.
        let mut d = client_message(MessageType::Decline, mac(1), 1);
        d.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        d.opts_mut().insert(DhcpOption::ServerIdentifier(SERVER));
        assert!(s.handle(&d, mac(1), P1, NOW + 30).is_none());
        assert_eq!(s.counters().declines, 1);
        let other = lease(&mut s, mac(1), P1, NOW + 40);
        assert_ne!(other, ip);
        // After the quarantine, the address is back in the pool.
        s.expire(NOW + 30 + DECLINE_SECS + 1);
        assert!(s.available(ip, mac(9), NOW + 30 + DECLINE_SECS + 1));
    }

    #[test]
    fn inform_gets_options_without_a_lease() {
        let mut s = DhcpServer::new(cfg(), NOW).unwrap();
        let ci = Ipv4Addr::new(192, 168, 56, 50);
        let r = s
            .handle(
                &with_ciaddr(MessageType::Inform, mac(5), ci),
                mac(5),
                P1,
                NOW,
            )
            .unwrap();
        assert_eq!(r.kind(), Some(MessageType::Ack));
        assert_eq!(r.msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(r.msg.opts().get(OptionCode::AddressLeaseTime).is_none());
        assert!(r.msg.opts().get(OptionCode::SubnetMask).is_some());
        assert_eq!(
            r.dst,
            ReplyDst::Unicast {
                mac: mac(5),
                ip: ci
            }
        );
        assert!(s.lease(mac(5)).is_none());
    }

    #[test]
    fn reservations_win_and_are_kept_from_others() {
        let mut c = cfg();
        let fixed = Ipv4Addr::new(192, 168, 56, 10);
        let in_pool = Ipv4Addr::new(192, 168, 56, 100);
        c.reservations = vec![(mac(7), fixed), (mac(8), in_pool)];
        let mut s = DhcpServer::new(c, NOW).unwrap();
        assert_eq!(lease(&mut s, mac(7), P1, NOW), fixed);
        // mac(1) never gets mac(8)'s reserved pool address.
        assert_eq!(
            lease(&mut s, mac(1), P2, NOW),
            Ipv4Addr::new(192, 168, 56, 101)
        );
        let r = s
            .handle(&discover(mac(2), Some(in_pool)), mac(2), P2, NOW)
            .unwrap();
        assert_ne!(r.msg.yiaddr(), in_pool);
    }

    #[test]
    fn pool_exhaustion_and_expired_lease_reuse() {
        let mut s = DhcpServer::new(cfg(), NOW).unwrap();
        let ports = [PortId(1), PortId(2), PortId(3), PortId(4)];
        for (i, p) in ports.iter().enumerate() {
            lease(&mut s, mac(i as u8), *p, NOW);
        }
        assert!(s
            .handle(&discover(mac(9), None), mac(9), PortId(5), NOW)
            .is_none());
        assert_eq!(s.counters().exhausted, 1);
        // Once the leases ran out, the oldest one is reused.
        let later = NOW + 3601;
        let r = s
            .handle(&discover(mac(9), None), mac(9), PortId(5), later)
            .unwrap();
        assert!(s.config().in_range(r.msg.yiaddr()));
    }

    #[test]
    fn per_port_cap_stops_a_mac_cycling_guest() {
        let mut c = cfg();
        c.max_leases_per_port = 2;
        let mut s = DhcpServer::new(c, NOW).unwrap();
        lease(&mut s, mac(1), P1, NOW);
        lease(&mut s, mac(2), P1, NOW);
        // A third MAC behind the same port gets nothing, also not by asking directly.
        assert!(s.handle(&discover(mac(3), None), mac(3), P1, NOW).is_none());
        let r = s.handle(
            &request(mac(3), Ipv4Addr::new(192, 168, 56, 103), Some(SERVER)),
            mac(3),
            P1,
            NOW,
        );
        assert_eq!(r.unwrap().kind(), Some(MessageType::Nak));
        assert!(s
            .handle(
                &request(mac(3), Ipv4Addr::new(192, 168, 56, 103), None),
                mac(3),
                P1,
                NOW
            )
            .is_none());
        assert_eq!(s.counters().port_cap, 1);
        // Existing clients of that port still renew, and other ports still get addresses.
        let ip = s.lease(mac(1)).unwrap().ip;
        let r = s.handle(
            &with_ciaddr(MessageType::Request, mac(1), ip),
            mac(1),
            P1,
            NOW + 5,
        );
        assert_eq!(r.unwrap().kind(), Some(MessageType::Ack));
        lease(&mut s, mac(4), P2, NOW);
    }

    #[test]
    fn spoofed_chaddr_is_ignored() {
        let mut s = DhcpServer::new(cfg(), NOW).unwrap();
        // A frame from mac(2) carrying a DISCOVER for mac(1).
        assert!(s.handle(&discover(mac(1), None), mac(2), P1, NOW).is_none());
        assert_eq!(s.counters().spoofed, 1);
        assert!(s.leases().is_empty());
        // Releasing someone else's lease by spoofing does nothing either.
        let ip = lease(&mut s, mac(1), P1, NOW);
        let rel = with_ciaddr(MessageType::Release, mac(1), ip);
        assert!(s.handle(&rel, mac(2), P2, NOW).is_none());
        assert!(s.lease(mac(1)).unwrap().active(NOW + 1));
        assert_eq!(s.counters().spoofed, 2);
    }

    #[test]
    fn malformed_messages_are_counted_not_fatal() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[1, 1, 6, 0]).is_err());
        // Random bytes never panic.
        let mut x: u32 = 0x1234_5678;
        for len in [0usize, 10, 236, 240, 241, 300, 576] {
            for _ in 0..200 {
                let buf: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x as u8
                    })
                    .collect();
                let _ = decode(&buf);
            }
        }
        // A valid header with a broken option (classless route with a bad length).
        let mut buf = Vec::new();
        encode(&discover(mac(1), None), &mut buf).unwrap();
        let end = buf.len() - 1;
        buf.truncate(end);
        buf.extend_from_slice(&[121, 3, 40, 1, 2, 255]);
        let _ = decode(&buf);
        // A BOOTREPLY or a message without a type is not a request.
        let mut s = DhcpServer::new(cfg(), NOW).unwrap();
        let mut m = discover(mac(1), None);
        m.set_opcode(Opcode::BootReply);
        assert!(s.handle(&m, mac(1), P1, NOW).is_none());
        let mut m = discover(mac(1), None);
        m.opts_mut().remove(OptionCode::MessageType);
        assert!(s.handle(&m, mac(1), P1, NOW).is_none());
        assert_eq!(s.counters().malformed, 2);
        lease(&mut s, mac(1), P1, NOW);
    }

    #[test]
    fn leases_survive_a_restart() {
        let dir = tempfile::TempDir::new().unwrap();
        let mut c = cfg();
        c.lease_file = Some(dir.path().join("net.leases"));
        let mut s = DhcpServer::new(c.clone(), NOW).unwrap();
        let a = lease(&mut s, mac(1), P1, NOW);
        let b = lease(&mut s, mac(2), P2, NOW);
        drop(s);
        let mut s = DhcpServer::new(c.clone(), NOW + 100).unwrap();
        // A new client never gets a persisted address.
        let ip = lease(&mut s, mac(3), P1, NOW + 100);
        assert!(ip != a && ip != b);
        // The old clients get theirs back, by DISCOVER or by INIT-REBOOT.
        let r = s
            .handle(&discover(mac(1), None), mac(1), P1, NOW + 100)
            .unwrap();
        assert_eq!(r.msg.yiaddr(), a);
        let r = s
            .handle(&request(mac(2), b, None), mac(2), P2, NOW + 100)
            .unwrap();
        assert_eq!((r.kind(), r.msg.yiaddr()), (Some(MessageType::Ack), b));
        // A lease that no longer fits the pool is dropped on load.
        let mut smaller = c;
        smaller.range_start = Ipv4Addr::new(192, 168, 56, 102);
        let s = DhcpServer::new(smaller, NOW + 200).unwrap();
        assert!(s
            .leases()
            .iter()
            .all(|l| l.ip >= Ipv4Addr::new(192, 168, 56, 102)));
    }
}
