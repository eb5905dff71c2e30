//! Frames as borrowed scatter-gather views, and typed Ethernet header access.

use std::fmt;
use std::str::FromStr;

use vm_memory::VolatileSlice;

/// One contiguous piece of a frame: host memory, or a bounds-checked view into guest memory.
#[derive(Clone, Copy, Debug)]
pub enum Segment<'a> {
    /// Bytes in our own memory (synthesised frames, scratch buffers, ring slots we copied).
    Host(&'a [u8]),
    /// A bounds-checked view into mapped guest memory (or any mmap the frame lives in).
    Guest(VolatileSlice<'a>),
}

impl Segment<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Segment::Host(b) => b.len(),
            Segment::Guest(s) => s.len(),
        }
    }

    /// True when the segment holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copy from `offset` within the segment into `dst`; returns the bytes copied.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        match self {
            Segment::Host(b) => {
                let Some(src) = b.get(offset..) else { return 0 };
                let n = src.len().min(dst.len());
                dst[..n].copy_from_slice(&src[..n]);
                n
            }
            Segment::Guest(s) => match s.offset(offset) {
                Ok(s) => s.copy_to(dst),
                Err(_) => 0,
            },
        }
    }

    /// Copy from `offset` within the segment into the volatile `dst`; returns the bytes copied.
    pub fn copy_to_volatile(&self, offset: usize, dst: &VolatileSlice<'_>) -> usize {
        match self {
            Segment::Host(b) => {
                let Some(src) = b.get(offset..) else { return 0 };
                let n = src.len().min(dst.len());
                dst.copy_from(&src[..n]);
                n
            }
            Segment::Guest(s) => {
                let Ok(src) = s.offset(offset) else { return 0 };
                let n = src.len().min(dst.len());
                src.copy_to_volatile_slice(*dst);
                n
            }
        }
    }
}

/// A frame being switched: a borrowed view, never an owned buffer.
///
/// `len()` is the length of the Ethernet frame (no virtio header). Segments are visited in order
/// and their lengths add up to `len()`.
pub trait Frame {
    /// Length of the Ethernet frame in bytes.
    fn len(&self) -> usize;

    /// Visit each segment in order until `f` returns `false`.
    fn for_each_segment(&self, f: &mut dyn FnMut(Segment<'_>) -> bool);

    /// True for a zero-length frame.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copy bytes `[offset, offset + dst.len())` into `dst` (short at the end of the frame);
    /// returns the bytes copied.
    fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        read_segments_at(self, offset, dst)
    }

    /// Copy the first bytes, up to an 802.1Q-tagged Ethernet header, into `dst` (what the
    /// switch reads to route a frame); returns the bytes copied (short for a shorter frame).
    /// Same as `read_at(0, dst)`; a view that can do it in one load overrides it.
    fn read_head(&self, dst: &mut [u8; ETH_VLAN_HEADER_LEN]) -> usize {
        self.read_at(0, dst)
    }

    /// Copy bytes starting at `offset` into `dst` until `dst` is full or the frame ends;
    /// returns the bytes copied.
    fn copy_to_volatile(&self, offset: usize, dst: &VolatileSlice<'_>) -> usize {
        copy_segments_to_volatile(self, offset, dst)
    }
}

/// The general body of [`Frame::read_at`]: walk the segments. For implementations that add a
/// fast path and fall back to this.
pub fn read_segments_at<F: Frame + ?Sized>(frame: &F, offset: usize, dst: &mut [u8]) -> usize {
    let mut pos = 0usize; // start of the current segment within the frame
    let mut done = 0usize;
    frame.for_each_segment(&mut |seg| {
        let seg_len = seg.len();
        let want = offset + done;
        if want < pos + seg_len {
            done += seg.read_at(want - pos, &mut dst[done..]);
        }
        pos += seg_len;
        done < dst.len()
    });
    done
}

/// The general body of [`Frame::copy_to_volatile`]: walk the segments.
pub fn copy_segments_to_volatile<F: Frame + ?Sized>(
    frame: &F,
    offset: usize,
    dst: &VolatileSlice<'_>,
) -> usize {
    let mut pos = 0usize;
    let mut done = 0usize;
    let total = dst.len();
    frame.for_each_segment(&mut |seg| {
        let seg_len = seg.len();
        let want = offset + done;
        if want < pos + seg_len {
            let Ok(d) = dst.offset(done) else {
                return false;
            };
            done += seg.copy_to_volatile(want - pos, &d);
        }
        pos += seg_len;
        done < total
    });
    done
}

/// A frame held in one host byte slice.
#[derive(Clone, Copy, Debug)]
pub struct SliceFrame<'a>(pub &'a [u8]);

impl Frame for SliceFrame<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn for_each_segment(&self, f: &mut dyn FnMut(Segment<'_>) -> bool) {
        f(Segment::Host(self.0));
    }
}

/// A frame spread over several host byte slices (header + payload, iovec-like).
#[derive(Clone, Copy, Debug)]
pub struct SlicesFrame<'a, 'b>(pub &'b [&'a [u8]]);

impl Frame for SlicesFrame<'_, '_> {
    fn len(&self) -> usize {
        self.0.iter().map(|s| s.len()).sum()
    }

    fn for_each_segment(&self, f: &mut dyn FnMut(Segment<'_>) -> bool) {
        for s in self.0 {
            if !f(Segment::Host(s)) {
                break;
            }
        }
    }
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl std::hash::Hash for MacAddr {
    /// One `write_u64` of the six bytes (the derived impl feeds a length prefix and then the
    /// bytes one by one, which dominated FDB lookups).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let [a, b, c, d, e, f] = self.0;
        state.write_u64(u64::from_le_bytes([a, b, c, d, e, f, 0, 0]));
    }
}

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Group bit set: broadcast or multicast.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// All ones.
    pub fn is_broadcast(&self) -> bool {
        *self == Self::BROADCAST
    }

    /// All zeroes.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// A valid station address: neither multicast nor all zeroes.
    pub fn is_unicast(&self) -> bool {
        !self.is_multicast() && !self.is_zero()
    }

    /// The bytes.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Error parsing a MAC address string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid MAC address {0:?}: expected six hex octets like 52:54:00:12:34:56")]
pub struct ParseMacError(pub String);

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for o in out.iter_mut() {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

mod field {
    use std::ops::Range;
    pub const DESTINATION: Range<usize> = 0..6;
    pub const SOURCE: Range<usize> = 6..12;
    pub const ETHERTYPE: Range<usize> = 12..14;
    pub const VLAN_TCI: Range<usize> = 14..16;
    pub const INNER_ETHERTYPE: Range<usize> = 16..18;
}

/// Ethernet header length without a VLAN tag.
pub const ETH_HEADER_LEN: usize = 14;
/// Ethernet header length with one 802.1Q tag.
pub const ETH_VLAN_HEADER_LEN: usize = 18;
/// 802.1Q TPID.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// IPv4 ethertype.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// IPv6 ethertype.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// ARP ethertype.
pub const ETHERTYPE_ARP: u16 = 0x0806;

/// A typed view of an Ethernet header over any byte buffer (smoltcp style).
#[derive(Debug, Clone, Copy)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
}

/// The buffer is shorter than an Ethernet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Frame shorter than an Ethernet header")]
pub struct Truncated;

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Wrap without checking the length; accessors may panic on a short buffer.
    pub fn new_unchecked(buffer: T) -> Self {
        EthernetFrame { buffer }
    }

    /// Wrap after checking that the header fits.
    pub fn new_checked(buffer: T) -> Result<Self, Truncated> {
        let f = Self::new_unchecked(buffer);
        f.check_len()?;
        Ok(f)
    }

    /// Check that the buffer holds a whole header (and the tag when it is 802.1Q tagged).
    pub fn check_len(&self) -> Result<(), Truncated> {
        let b = self.buffer.as_ref();
        if b.len() < ETH_HEADER_LEN {
            return Err(Truncated);
        }
        if self.ethertype() == ETHERTYPE_VLAN && b.len() < ETH_VLAN_HEADER_LEN {
            return Err(Truncated);
        }
        Ok(())
    }

    /// Destination MAC.
    pub fn dst(&self) -> MacAddr {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.buffer.as_ref()[field::DESTINATION]);
        MacAddr(m)
    }

    /// Source MAC.
    pub fn src(&self) -> MacAddr {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.buffer.as_ref()[field::SOURCE]);
        MacAddr(m)
    }

    /// The outer ethertype (0x8100 for tagged frames).
    pub fn ethertype(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::ETHERTYPE];
        u16::from_be_bytes([b[0], b[1]])
    }

    /// The VLAN id of an 802.1Q tagged frame.
    pub fn vlan_id(&self) -> Option<u16> {
        if self.ethertype() != ETHERTYPE_VLAN {
            return None;
        }
        let b = &self.buffer.as_ref()[field::VLAN_TCI];
        Some(u16::from_be_bytes([b[0], b[1]]) & 0x0fff)
    }

    /// The ethertype of the payload (past one VLAN tag if present).
    pub fn payload_ethertype(&self) -> u16 {
        if self.ethertype() == ETHERTYPE_VLAN {
            let b = &self.buffer.as_ref()[field::INNER_ETHERTYPE];
            u16::from_be_bytes([b[0], b[1]])
        } else {
            self.ethertype()
        }
    }

    /// Header length: 14, or 18 with a VLAN tag.
    pub fn header_len(&self) -> usize {
        if self.ethertype() == ETHERTYPE_VLAN {
            ETH_VLAN_HEADER_LEN
        } else {
            ETH_HEADER_LEN
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    /// Set the destination MAC.
    pub fn set_dst(&mut self, mac: MacAddr) {
        self.buffer.as_mut()[field::DESTINATION].copy_from_slice(&mac.0);
    }

    /// Set the source MAC.
    pub fn set_src(&mut self, mac: MacAddr) {
        self.buffer.as_mut()[field::SOURCE].copy_from_slice(&mac.0);
    }

    /// Set the outer ethertype.
    pub fn set_ethertype(&mut self, t: u16) {
        self.buffer.as_mut()[field::ETHERTYPE].copy_from_slice(&t.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parse_and_display() {
        let m: MacAddr = "52:54:00:12:34:0A".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:12:34:0a");
        assert!(m.is_unicast());
        assert!(MacAddr::BROADCAST.is_multicast());
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
            "zz:54:00:12:34:56",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn read_at_crosses_segments() {
        let a = [1u8, 2, 3];
        let b = [4u8, 5];
        let c = [6u8, 7, 8, 9];
        let parts: [&[u8]; 3] = [&a, &b, &c];
        let f = SlicesFrame(&parts);
        assert_eq!(f.len(), 9);
        let mut out = [0u8; 5];
        assert_eq!(f.read_at(2, &mut out), 5);
        assert_eq!(out, [3, 4, 5, 6, 7]);
        let mut out = [0u8; 5];
        assert_eq!(f.read_at(7, &mut out), 2);
        assert_eq!(&out[..2], &[8, 9]);
        assert_eq!(f.read_at(20, &mut out), 0);
    }

    #[test]
    fn copy_to_volatile_crosses_segments() {
        let a = [1u8, 2, 3];
        let b = [4u8, 5, 6, 7];
        let parts: [&[u8]; 2] = [&a, &b];
        let f = SlicesFrame(&parts);
        let mut dst = [0u8; 4];
        let n = f.copy_to_volatile(1, &VolatileSlice::from(&mut dst[..]));
        assert_eq!(n, 4);
        assert_eq!(dst, [2, 3, 4, 5]);
    }

    #[test]
    fn ethernet_view() {
        let mut b = [0u8; 18];
        b[12] = 0x81;
        b[14] = 0x00;
        b[15] = 0x0a;
        b[16] = 0x08;
        let f = EthernetFrame::new_checked(&b[..]).unwrap();
        assert_eq!(f.vlan_id(), Some(10));
        assert_eq!(f.payload_ethertype(), 0x0800);
        assert!(EthernetFrame::new_checked(&b[..16]).is_err());
        assert!(EthernetFrame::new_checked(&b[..13]).is_err());
    }
}
