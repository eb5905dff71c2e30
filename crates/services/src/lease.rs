//! The lease file: bound leases and quarantined addresses, one per line, so that a restarted
//! daemon never hands out an address twice.
//!
//! ```text
//! # virtnet DHCP leases
//! lease 52:54:00:00:00:0a 192.168.56.100 1790000000
//! declined 192.168.56.101 1789990600
//! ```
//!
//! The file is replaced atomically (written to `<file>.tmp`, fsynced, renamed), so a crash
//! leaves either the old or the new version. Unparsable lines are skipped with a warning.

use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use thiserror::Error;
use virtnet_switch::MacAddr;

/// Errors of the lease file.
#[derive(Debug, Error)]
pub enum LeaseError {
    /// The file exists but cannot be read.
    #[error("{}: Cannot read the lease file", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file cannot be written.
    #[error("{}: Cannot write the lease file", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, LeaseError>;

/// One line of the lease file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseRecord {
    /// A bound lease.
    Lease {
        /// Client MAC.
        mac: MacAddr,
        /// Its address.
        ip: Ipv4Addr,
        /// Unix time when it ends.
        expires: u64,
    },
    /// An address a client declined, out of the pool until `until`.
    Declined {
        /// The address.
        ip: Ipv4Addr,
        /// Unix time when it returns to the pool.
        until: u64,
    },
}

fn parse_line(line: &str) -> Option<LeaseRecord> {
    let mut w = line.split_whitespace();
    match w.next()? {
        "lease" => {
            let mac = w.next()?.parse().ok()?;
            let ip = w.next()?.parse().ok()?;
            let expires = w.next()?.parse().ok()?;
            w.next()
                .is_none()
                .then_some(LeaseRecord::Lease { mac, ip, expires })
        }
        "declined" => {
            let ip = w.next()?.parse().ok()?;
            let until = w.next()?.parse().ok()?;
            w.next()
                .is_none()
                .then_some(LeaseRecord::Declined { ip, until })
        }
        _ => None,
    }
}

/// Read the lease file; a missing file is an empty one.
pub fn load(path: &Path) -> Result<Vec<LeaseRecord>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LeaseError::Read {
                path: path.into(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        match parse_line(t) {
            Some(r) => out.push(r),
            None => tracing::warn!(
                "{}:{}: skipping unparsable lease line",
                path.display(),
                n + 1
            ),
        }
    }
    Ok(out)
}

/// Replace the lease file with `records`.
pub fn store(path: &Path, records: &[LeaseRecord]) -> Result<()> {
    let err = |source| LeaseError::Write {
        path: path.into(),
        source,
    };
    let mut text = String::from("# virtnet DHCP leases\n");
    for r in records {
        match r {
            LeaseRecord::Lease { mac, ip, expires } => {
                text.push_str(&format!("lease {mac} {ip} {expires}\n"))
            }
            LeaseRecord::Declined { ip, until } => {
                text.push_str(&format!("declined {ip} {until}\n"))
            }
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(err)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = fs::File::create(&tmp).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_lines() {
        let dir = tempfile::TempDir::new().unwrap();
        let p = dir.path().join("sub/x.leases");
        assert!(load(&p).unwrap().is_empty());
        let recs = vec![
            LeaseRecord::Lease {
                mac: MacAddr([0x52, 0x54, 0, 0, 0, 1]),
                ip: Ipv4Addr::new(10, 0, 0, 5),
                expires: 42,
            },
            LeaseRecord::Declined {
                ip: Ipv4Addr::new(10, 0, 0, 6),
                until: 43,
            },
        ];
        store(&p, &recs).unwrap();
        assert_eq!(load(&p).unwrap(), recs);
        let mut text = fs::read_to_string(&p).unwrap();
        text.push_str("lease zz 10.0.0.1 5\nlease 52:54:00:00:00:02 10.0.0.7\ngarbage\n\n");
        fs::write(&p, text).unwrap();
        assert_eq!(load(&p).unwrap(), recs);
    }

    #[test]
    fn unreadable_is_an_error() {
        let dir = tempfile::TempDir::new().unwrap();
        // A directory in place of the file.
        assert!(matches!(load(dir.path()), Err(LeaseError::Read { .. })));
        let blocker = dir.path().join("file");
        fs::write(&blocker, "").unwrap();
        assert!(matches!(
            store(&blocker.join("x"), &[]),
            Err(LeaseError::Write { .. })
        ));
    }
}
