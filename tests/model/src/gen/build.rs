//! Building well-formed frames from their fields, every length and checksum
//! computed from the parts (the generator then breaks some on purpose).

use lb_common::{is_v4_mapped, PROTO_TCP, PROTO_UDP};

use crate::checksum::{self, pseudo_header, Sum};
use crate::packet::{ETH_P_IP, ETH_P_IPV6, EXT_AH, EXT_FRAGMENT, PROTO_ICMP, PROTO_ICMPV6};

/// An IP header's fields. The family follows the addresses.
#[derive(Clone, Debug)]
pub struct IpFields {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub ttl: u8,
    pub tos: u8,
    pub id: u16,
    /// IPv4: don't fragment. Ignored for IPv6.
    pub df: bool,
    /// IPv4 options, padded to a multiple of 4 by the builder (≤ 40 bytes).
    pub options: Vec<u8>,
    /// IPv6 extension headers in order, as (type, total length in bytes).
    pub ext: Vec<(u8, usize)>,
    pub flow_label: u32,
}

impl IpFields {
    pub fn new(src: [u8; 16], dst: [u8; 16]) -> IpFields {
        IpFields {
            src,
            dst,
            ttl: 64,
            tos: 0,
            id: 0,
            df: true,
            options: Vec::new(),
            ext: Vec::new(),
            flow_label: 0,
        }
    }

    pub fn v6(&self) -> bool {
        !is_v4_mapped(&self.src)
    }
}

/// The transport header.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        window: u16,
        /// TCP options, padded to a multiple of 4 (≤ 40 bytes).
        options: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        /// Send a zero checksum ("none").
        no_checksum: bool,
    },
    Icmp {
        icmp_type: u8,
        code: u8,
        /// The second word of the ICMP header (MTU, pointer, unused).
        rest: [u8; 4],
    },
    /// Another protocol: the payload follows the IP header as it is.
    Raw { proto: u8 },
}

impl L4 {
    pub fn proto(&self, v6: bool) -> u8 {
        match self {
            L4::Tcp { .. } => PROTO_TCP,
            L4::Udp { .. } => PROTO_UDP,
            L4::Icmp { .. } if v6 => PROTO_ICMPV6,
            L4::Icmp { .. } => PROTO_ICMP,
            L4::Raw { proto } => *proto,
        }
    }
}

fn pad4(mut v: Vec<u8>) -> Vec<u8> {
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
    v
}

/// The transport header and payload, checksum included.
fn segment(ip: &IpFields, l4: &L4, payload: &[u8]) -> Vec<u8> {
    let v6 = ip.v6();
    let mut s = Vec::new();
    let csum_at = match l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
            seq,
            ack,
            window,
            options,
        } => {
            let opts = pad4(options.clone());
            let doff = (20 + opts.len()) / 4;
            s.extend_from_slice(&sport.to_be_bytes());
            s.extend_from_slice(&dport.to_be_bytes());
            s.extend_from_slice(&seq.to_be_bytes());
            s.extend_from_slice(&ack.to_be_bytes());
            s.push((doff as u8) << 4);
            s.push(*flags);
            s.extend_from_slice(&window.to_be_bytes());
            s.extend_from_slice(&[0, 0, 0, 0]);
            s.extend_from_slice(&opts);
            Some(16)
        }
        L4::Udp {
            sport,
            dport,
            no_checksum,
        } => {
            s.extend_from_slice(&sport.to_be_bytes());
            s.extend_from_slice(&dport.to_be_bytes());
            s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            s.extend_from_slice(&[0, 0]);
            (!no_checksum).then_some(6)
        }
        L4::Icmp {
            icmp_type,
            code,
            rest,
        } => {
            s.extend_from_slice(&[*icmp_type, *code, 0, 0]);
            s.extend_from_slice(rest);
            Some(2)
        }
        L4::Raw { .. } => None,
    };
    s.extend_from_slice(payload);
    if let Some(at) = csum_at {
        let proto = l4.proto(v6);
        let sum = if proto == PROTO_ICMP {
            Sum::new()
        } else {
            pseudo_header(&ip.src, &ip.dst, proto, s.len() as u32)
        };
        let mut c = sum.push(&s).checksum();
        if proto == PROTO_UDP && c == 0 {
            c = 0xffff;
        }
        s[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    s
}

/// IPv6 extension headers, each pointing at the next; the last at `last`.
fn extension_headers(ext: &[(u8, usize)], last: u8) -> (u8, Vec<u8>) {
    let mut out = Vec::new();
    for (i, (kind, len)) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(last, |(k, _)| *k);
        let start = out.len();
        out.resize(start + len, 0);
        let h = &mut out[start..];
        h[0] = next;
        match *kind {
            EXT_AH => {
                h[1] = (len / 4 - 2) as u8;
                h[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
            }
            EXT_FRAGMENT => {
                // Offset 0 with more fragments: a first fragment.
                h[3] = 1;
                h[4..8].copy_from_slice(&0xabcd_0001u32.to_be_bytes());
            }
            43 => {
                h[1] = (len / 8 - 1) as u8;
                // Routing type 253 (experimental), no segments left: the
                // destination field stays the final destination.
                h[2] = 253;
            }
            _ => {
                h[1] = (len / 8 - 1) as u8;
                // One PadN option filling the rest.
                h[2] = 1;
                h[3] = (len - 4) as u8;
            }
        }
    }
    (ext.first().map_or(last, |(k, _)| *k), out)
}

/// A whole IP packet: header, transport header, payload.
pub fn ip_packet(ip: &IpFields, l4: &L4, payload: &[u8]) -> Vec<u8> {
    let v6 = ip.v6();
    let seg = segment(ip, l4, payload);
    let proto = l4.proto(v6);
    let mut p = Vec::new();
    if v6 {
        let (first, ext) = extension_headers(&ip.ext, proto);
        let vtf = (6u32 << 28) | (u32::from(ip.tos) << 20) | (ip.flow_label & 0xf_ffff);
        p.extend_from_slice(&vtf.to_be_bytes());
        p.extend_from_slice(&((ext.len() + seg.len()) as u16).to_be_bytes());
        p.push(first);
        p.push(ip.ttl);
        p.extend_from_slice(&ip.src);
        p.extend_from_slice(&ip.dst);
        p.extend_from_slice(&ext);
    } else {
        let opts = pad4(ip.options.clone());
        let ihl = (20 + opts.len()) / 4;
        let total = 20 + opts.len() + seg.len();
        p.push(0x40 | ihl as u8);
        p.push(ip.tos);
        p.extend_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&ip.id.to_be_bytes());
        p.extend_from_slice(&(if ip.df { 0x4000u16 } else { 0 }).to_be_bytes());
        p.push(ip.ttl);
        p.push(proto);
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&ip.src[12..]);
        p.extend_from_slice(&ip.dst[12..]);
        p.extend_from_slice(&opts);
        let c = checksum::checksum(&p[..20 + opts.len()]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    p.extend_from_slice(&seg);
    p
}

/// An Ethernet frame around an IP packet (the ethertype follows the IP
/// version nibble).
pub fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], ip_packet: &[u8]) -> Vec<u8> {
    let ethertype = if ip_packet.first().is_some_and(|b| b >> 4 == 6) {
        ETH_P_IPV6
    } else {
        ETH_P_IP
    };
    frame_with_type(dst_mac, src_mac, ethertype, ip_packet)
}

pub fn frame_with_type(dst_mac: [u8; 6], src_mac: [u8; 6], ethertype: u16, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + body.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// Recomputes the IPv4 header checksum of a frame's IP header (after a
/// deliberate change to a header field).
pub fn refresh_ipv4_checksum(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    if ihl < 20 || frame.len() < 14 + ihl {
        return;
    }
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}
