//! Packets broken on purpose, each in one way that section 1 names, and
//! packets that are not for the datapath at all.

use lb_common::{v4_mapped, PROTO_TCP, PROTO_UDP};

use super::Body;
use crate::checksum;
use crate::packet::{ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, EXT_FRAGMENT};
use crate::rng::Rng;

fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn put16(p: &mut [u8], at: usize, v: u16) {
    p[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn fix_v4(p: &mut [u8]) {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    if ihl >= 20 && p.len() >= ihl {
        p[10..12].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&p[..ihl]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
}

/// The transport offset and protocol of a packet without IPv6 extension
/// headers (None when it has some).
fn l4_of(p: &[u8]) -> Option<(usize, u8)> {
    if p[0] >> 4 == 4 {
        Some((usize::from(p[0] & 0x0f) * 4, p[9]))
    } else {
        matches!(p[6], PROTO_TCP | PROTO_UDP).then_some((40, p[6]))
    }
}

/// Sets the IP length so that the packet ends at `len` bytes.
fn set_ip_len(p: &mut [u8], len: usize) {
    if p[0] >> 4 == 4 {
        put16(p, 2, len as u16);
        fix_v4(p);
    } else {
        put16(p, 4, (len - 40) as u16);
    }
}

/// One of the ways section 1 calls malformed, applied to a well-formed
/// IP packet carrying TCP or UDP.
pub(super) fn malform(r: &mut Rng, mut p: Vec<u8>) -> Body {
    let v4 = p[0] >> 4 == 4;
    let ethertype = if v4 { ETH_P_IP } else { ETH_P_IPV6 };
    let l4 = l4_of(&p);
    loop {
        match r.below(11) {
            // The IP header itself cut short.
            0 => {
                let keep = r.below(if v4 { 20 } else { 40 }) as usize;
                p.truncate(keep);
            }
            1 if v4 => p[0] = 0x40 | r.below(5) as u8,
            2 => {
                let wrong = if v4 {
                    *r.pick(&[0u8, 5, 6, 15])
                } else {
                    *r.pick(&[0u8, 4, 7, 15])
                };
                p[0] = (wrong << 4) | (p[0] & 0x0f);
            }
            // A length field claiming more than arrived.
            3 => {
                let extra = r.range(1, 100) as u16;
                if v4 {
                    let t = be16(&p, 2);
                    put16(&mut p, 2, t.saturating_add(extra));
                    fix_v4(&mut p);
                } else {
                    let t = be16(&p, 4);
                    put16(&mut p, 4, t.saturating_add(extra));
                }
            }
            // An IPv4 total length shorter than its own header.
            4 if v4 => {
                let ihl = usize::from(p[0] & 0x0f) * 4;
                put16(&mut p, 2, r.below(ihl as u64) as u16);
                fix_v4(&mut p);
            }
            // The transport header cut short (lengths consistent).
            5 => {
                let Some((off, proto)) = l4 else { continue };
                let min = if proto == PROTO_TCP { 20 } else { 8 };
                let keep = off + r.below(min) as usize;
                p.truncate(keep);
                set_ip_len(&mut p, keep);
            }
            // TCP data offset below 5, or beyond the segment.
            6 => {
                let Some((off, PROTO_TCP)) = l4 else { continue };
                let avail = p.len() - off;
                let doff = if r.chance(50) || avail / 4 >= 15 {
                    r.below(5) as u8
                } else {
                    r.range(avail as u64 / 4 + 1, 15) as u8
                };
                p[off + 12] = (doff << 4) | (p[off + 12] & 0x0f);
            }
            // UDP length not the IP payload length.
            7 => {
                let Some((off, PROTO_UDP)) = l4 else { continue };
                let len = be16(&p, off + 4);
                let wrong = if r.chance(50) {
                    len.wrapping_add(r.range(1, 30) as u16)
                } else {
                    len.wrapping_sub(r.range(1, 8) as u16)
                };
                put16(&mut p, off + 4, wrong);
            }
            // IPv4-mapped IPv6 addresses.
            8 if !v4 => {
                let mapped = v4_mapped([10, 73, 0, r.range(1, 20) as u8]);
                let at = if r.chance(50) { 8 } else { 24 };
                p[at..at + 16].copy_from_slice(&mapped);
            }
            // An extension header running past the payload.
            9 if !v4 => {
                let next = p[6];
                let ext = [next, 200, 1, 4, 0, 0, 0, 0];
                p[6] = 0;
                p.splice(40..40, ext);
                let plen = be16(&p, 4) + 8;
                put16(&mut p, 4, plen);
            }
            // Fewer bytes than the IP length says, by cutting the end.
            10 => {
                let cut = r.range(1, 20.min(p.len() as u64 - 1)) as usize;
                p.truncate(p.len() - cut);
            }
            _ => continue,
        }
        return Body::Frame(ethertype, p);
    }
}

/// A fragment: IPv4 with MF or an offset, IPv6 with a fragment header.
pub(super) fn fragment(r: &mut Rng, mut p: Vec<u8>) -> Vec<u8> {
    if p[0] >> 4 == 4 {
        let mf = r.chance(60);
        let offset = if !mf || r.chance(50) {
            r.range(1, 0x1fff) as u16
        } else {
            0
        };
        let df = if r.chance(20) { 0x4000 } else { 0 };
        put16(&mut p, 6, df | if mf { 0x2000 } else { 0 } | offset);
        fix_v4(&mut p);
    } else {
        let next = p[6];
        let offset: u16 = if r.chance(50) {
            0
        } else {
            r.range(1, 0x1fff) as u16
        };
        let mf = u16::from(offset == 0 || r.chance(50));
        let fo = (offset << 3) | mf;
        let mut ext = vec![next, 0];
        ext.extend_from_slice(&fo.to_be_bytes());
        ext.extend_from_slice(&r.next_u32().to_be_bytes());
        p[6] = EXT_FRAGMENT;
        p.splice(40..40, ext);
        let plen = be16(&p, 4) + 8;
        put16(&mut p, 4, plen);
    }
    p
}

/// Frames the datapath must leave alone: ARP, VLAN-tagged IP, other
/// ethertypes, IP protocols other than TCP, UDP and ICMP.
pub(super) fn not_ip(r: &mut Rng, mut p: Vec<u8>) -> Body {
    let ethertype = if p[0] >> 4 == 4 { ETH_P_IP } else { ETH_P_IPV6 };
    match r.below(5) {
        0 => Body::Frame(0x0806, r.bytes(28)),
        1 | 2 => {
            let tag = if r.chance(70) {
                ETH_P_8021Q
            } else {
                ETH_P_8021AD
            };
            let mut body = (r.next_u32() as u16 & 0x0fff).to_be_bytes().to_vec();
            body.extend_from_slice(&ethertype.to_be_bytes());
            body.extend_from_slice(&p);
            Body::Frame(tag, body)
        }
        3 => Body::Frame(*r.pick(&[0x88ccu16, 0x8847, 0x0842, 0x22f0]), p),
        _ => {
            if ethertype == ETH_P_IP {
                p[9] = *r.pick(&[47u8, 50, 132, 4, 41]);
                fix_v4(&mut p);
            } else if l4_of(&p).is_some() {
                p[6] = *r.pick(&[59u8, 47, 50, 132]);
            }
            Body::Ip(p)
        }
    }
}
