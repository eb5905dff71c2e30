//! `Segmenter::adapt` on an arbitrary frame, `NetHdr` and destination caps.
//!
//! Invariants: no panic; a rejected frame emits nothing; what the destination accepts passes
//! untouched; every emitted frame is at most the input plus `MAX_HEADERS_LEN` and carries no GSO;
//! segments of a TCP GSO frame have valid IP lengths, IPv4 header and TCP checksums; a completed
//! partial checksum verifies against the pseudo-header sum the sender left in the field; UFO
//! fragments have valid headers and offsets and reassemble into a datagram with a valid UDP
//! length and checksum.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtnet_fuzz::{corrupt, Corruption, FrameSpec};
use virtnet_switch::frame::SlicesFrame;
use virtnet_switch::gso::{checksum, Segmenter, MAX_HEADERS_LEN};
use virtnet_switch::hdr::{FLAG_DATA_VALID, GSO_TCPV4, GSO_TCPV6, GSO_UDP};
use virtnet_switch::{DropReason, Frame, NetHdr, OffloadCaps};

#[derive(Arbitrary, Debug)]
struct Input {
    frame: FrameSpec,
    corruptions: Vec<Corruption>,
    truncate: Option<u16>,
    /// Where to cut the frame into segments (scatter-gather views).
    splits: [u16; 3],
    /// Derive `csum_start`/`csum_offset`/`hdr_len` from the built frame (else take `hdr` as is).
    auto_hdr: bool,
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
    caps: [bool; 5],
}

thread_local! {
    static SEGMENTER: std::cell::RefCell<Segmenter> = std::cell::RefCell::new(Segmenter::new());
}

/// Check the IPv4 header checksum and the TCP checksum of an emitted TCP segment.
fn check_tcp_segment(f: &[u8]) {
    let mut l3 = 14;
    let mut ethertype = u16::from_be_bytes([f[12], f[13]]);
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes([f[16], f[17]]);
        l3 = 18;
    }
    let ip = &f[l3..];
    let (l4, pseudo) = if ethertype == 0x0800 {
        let ihl = usize::from(ip[0] & 0xf) * 4;
        assert_eq!(checksum::checksum(&ip[..ihl]), 0, "IPv4 header checksum");
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        assert_eq!(total, ip.len(), "IPv4 total length");
        let len = (ip.len() - ihl) as u32;
        (
            l3 + ihl,
            checksum::pseudo_header_v4(&ip[12..16], &ip[16..20], 6, len),
        )
    } else {
        assert_eq!(ethertype, 0x86dd);
        let len = ip.len() - 40;
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[4], ip[5]])),
            len,
            "IPv6 payload length"
        );
        (
            l3 + 40,
            checksum::pseudo_header_v6(&ip[8..24], &ip[24..40], 6, len as u32),
        )
    };
    let sum = checksum::fold(checksum::accumulate(pseudo, &f[l4..]));
    assert_eq!(sum, 0xffff, "TCP checksum");
}

fuzz_target!(|input: Input| {
    let mut frame = Vec::new();
    let built = input.frame.build(&mut frame);
    corrupt(&mut frame, &input.corruptions, input.truncate);
    let len = frame.len();

    let mut hdr = NetHdr {
        flags: input.flags,
        gso_type: input.gso_type,
        hdr_len: input.hdr_len,
        gso_size: input.gso_size,
        csum_start: input.csum_start,
        csum_offset: input.csum_offset,
    };
    if input.auto_hdr && built.headers != 0 {
        hdr.csum_start = built.l4 as u16;
        hdr.csum_offset = built.csum_offset as u16;
        hdr.hdr_len = built.headers as u16;
    }
    let [csum, tso4, tso6, ecn, ufo] = input.caps;
    let caps = OffloadCaps {
        csum,
        tso4,
        tso6,
        ecn,
        ufo,
    };

    let mut cuts = input.splits.map(|s| usize::from(s) % (len + 1));
    cuts.sort_unstable();
    let parts: [&[u8]; 4] = [
        &frame[..cuts[0]],
        &frame[cuts[0]..cuts[1]],
        &frame[cuts[1]..cuts[2]],
        &frame[cuts[2]..],
    ];
    let view = SlicesFrame(&parts);

    let accepts = caps.accepts(&hdr);
    let tcp_gso = matches!(hdr.gso_kind(), GSO_TCPV4 | GSO_TCPV6);
    let ufo = hdr.gso_kind() == GSO_UDP;
    let csum_only = !hdr.is_gso() && hdr.needs_csum();
    let mut ufo_dgram: Vec<u8> = Vec::new();
    let mut ufo_ip: Vec<u8> = Vec::new();
    let mut emitted = 0usize;
    let mut out = vec![0u8; len + MAX_HEADERS_LEN];
    let r = SEGMENTER.with(|s| {
        s.borrow_mut()
            .adapt(&view, &hdr, caps, &mut |f: &dyn Frame, h: &NetHdr| {
                emitted += 1;
                let n = f.len();
                assert!(n <= len + MAX_HEADERS_LEN, "emitted {n} bytes from {len}");
                assert_eq!(f.read_at(0, &mut out[..n]), n);
                if accepts {
                    assert_eq!(*h, hdr);
                    assert_eq!(&out[..n], &frame[..]);
                    return Ok(());
                }
                assert!(!h.is_gso());
                if hdr.is_gso() {
                    assert_eq!(h.flags, FLAG_DATA_VALID);
                }
                if tcp_gso {
                    check_tcp_segment(&out[..n]);
                }
                if csum_only {
                    check_completed(&frame, &out[..n], &hdr);
                }
                if ufo {
                    collect_fragment(&out[..n], &mut ufo_ip, &mut ufo_dgram);
                }
                Ok(())
            })
    });
    match r {
        Ok(n) => assert_eq!(n, emitted),
        Err(e) => {
            assert_eq!(e, DropReason::SoftwareOffload);
            assert_eq!(emitted, 0, "rejected after emitting");
        }
    }
    if accepts {
        assert_eq!((r, emitted), (Ok(1), 1));
    }
    if ufo && !accepts && r.is_ok() {
        // The reassembled datagram has the right UDP length and a valid checksum.
        let udp_len = usize::from(u16::from_be_bytes([ufo_dgram[4], ufo_dgram[5]]));
        assert_eq!(udp_len, ufo_dgram.len(), "UDP length");
        let pseudo =
            checksum::pseudo_header_v4(&ufo_ip[12..16], &ufo_ip[16..20], 17, udp_len as u32);
        assert_eq!(
            checksum::fold(checksum::accumulate(pseudo, &ufo_dgram)),
            0xffff,
            "UDP checksum"
        );
    }
});

/// A completed partial checksum: only the two checksum bytes changed, and adding back the value
/// the sender had left there (its pseudo-header sum) makes the range sum to 0xffff.
fn check_completed(input: &[u8], out: &[u8], hdr: &NetHdr) {
    assert_eq!(input.len(), out.len());
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    assert_eq!(&input[..at], &out[..at]);
    assert_eq!(&input[at + 2..], &out[at + 2..]);
    if hdr.csum_offset % 2 == 1 {
        // The field straddles two 16-bit words of the sum: valid (Linux allows it) but the
        // sender's value cannot be added back as one word.
        return;
    }
    let left = u16::from_be_bytes([input[at], input[at + 1]]);
    let sum = checksum::fold(checksum::accumulate(u64::from(left), &out[start..]));
    // 0 and 0xffff are the same number in ones' complement.
    assert!(
        sum == 0xffff || sum == 0,
        "completed checksum does not verify: {sum:#x}"
    );
}

/// Check one IPv4 fragment and append its payload to the datagram being reassembled.
fn collect_fragment(f: &[u8], ip_hdr: &mut Vec<u8>, dgram: &mut Vec<u8>) {
    let l3 = if u16::from_be_bytes([f[12], f[13]]) == 0x8100 {
        18
    } else {
        14
    };
    let ip = &f[l3..];
    let ihl = usize::from(ip[0] & 0xf) * 4;
    assert_eq!(checksum::checksum(&ip[..ihl]), 0, "IPv4 header checksum");
    assert_eq!(
        usize::from(u16::from_be_bytes([ip[2], ip[3]])),
        ip.len(),
        "IPv4 total length"
    );
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    assert_eq!(
        usize::from(frag & 0x1fff) * 8,
        dgram.len(),
        "fragment offset"
    );
    if ip_hdr.is_empty() {
        ip_hdr.extend_from_slice(&ip[..ihl]);
    } else {
        assert_eq!(ip[4..6], ip_hdr[4..6], "same identification");
    }
    if !dgram.is_empty() || frag & 0x2000 != 0 {
        assert_eq!(frag & 0x4000, 0, "DF on a fragment");
    }
    dgram.extend_from_slice(&ip[ihl..]);
}
