//! Section 6 (the forwarding decision and the rewrite that follows it) and
//! section 7 (the ICMP errors the datapath sends itself).

use lb_common::{global, PROTO_TCP, PROTO_UDP};

use crate::checksum::{self, pseudo_header, Sum};
use crate::fib::{FibResult, Interface};
use crate::packet::{Ip, ETH_LEN, ETH_P_IP, ETH_P_IPV6, PROTO_ICMP, PROTO_ICMPV6};
use crate::state::{
    Forwarding, Ingress, ModelState, Outcome, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC,
};

/// The quote of a datapath-sent ICMP error: at most this many bytes of the
/// offending IP packet.
pub const ICMP_QUOTE_MAX: usize = 128;
/// TTL / hop limit of datapath-sent ICMP errors.
pub const ICMP_TTL: u8 = 64;
/// The IPv4 TOS byte of datapath-sent ICMP errors: precedence
/// "internetwork control", as the kernel's own ICMP errors (the spec does
/// not say; see the report).
pub const ICMP_TOS: u8 = 0xc0;

/// The section 6 decision, made on the translated destination before the
/// packet changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Forward {
        iface: Interface,
        neighbour: Option<[u8; 6]>,
    },
    TtlExpired,
    NotForwarded,
    TooBig {
        mtu: u32,
    },
}

pub fn decide(
    state: &ModelState,
    frame_len: usize,
    ip: &Ip,
    new_dst: &[u8; 16],
    ingress: Ingress,
) -> Decision {
    if ip.ttl <= 1 {
        return Decision::TtlExpired;
    }
    match state.fib.lookup(ingress.ifindex, ip.v6, new_dst) {
        FibResult::NotForwarded => Decision::NotForwarded,
        FibResult::Egress { iface, neighbour } => {
            // bpf_check_mtu compares the whole frame (skb->len) with the
            // MTU plus the link header.
            if frame_len > iface.mtu as usize + ETH_LEN {
                Decision::TooBig { mtu: iface.mtu }
            } else {
                Decision::Forward { iface, neighbour }
            }
        }
    }
}

/// Carries out a decision other than `Forward` for a TCP/UDP packet.
/// Returns false when the packet is to be forwarded.
pub fn refuse(
    state: &mut ModelState,
    pkt: &[u8],
    ip: &Ip,
    d: &Decision,
    out: &mut Outcome,
) -> bool {
    match d {
        Decision::Forward { .. } => return false,
        Decision::TtlExpired => {
            out.packet = icmp_error(pkt, ip, IcmpKind::TimeExceeded);
            out.action = TC_ACT_REDIRECT;
            out.forwarding = Forwarding::TimeExceededSent;
            state.count(global::ICMP_SENT);
        }
        Decision::NotForwarded => {
            out.action = TC_ACT_UNSPEC;
            out.forwarding = Forwarding::NotForwarded;
            state.count(global::NOT_FORWARDED);
        }
        Decision::TooBig { mtu } => {
            if ip.v6 || ip.df {
                out.packet = icmp_error(pkt, ip, IcmpKind::TooBig(*mtu));
                out.action = TC_ACT_REDIRECT;
                out.forwarding = Forwarding::TooBigSent;
                state.count(global::ICMP_SENT);
            } else {
                out.action = TC_ACT_SHOT;
                out.forwarding = Forwarding::TooBigDropped;
                state.count(global::TOO_BIG_DROPPED);
            }
        }
    }
    true
}

/// New addresses and ports for a TCP/UDP packet (ports in host order).
#[derive(Clone, Copy, Debug)]
pub struct Nat {
    pub src: [u8; 16],
    pub sport: u16,
    pub dst: [u8; 16],
    pub dport: u16,
}

/// Step 6.4 for a TCP/UDP packet: translate, decrement the TTL, set the
/// MACs, and recompute every checksum from scratch.
pub fn translate_transport(pkt: &[u8], ip: &Ip, nat: &Nat, d: &Decision) -> Vec<u8> {
    let mut p = pkt.to_vec();
    write_addrs(&mut p, ip, &nat.src, &nat.dst);
    let l4 = ip.l4_off();
    p[l4..l4 + 2].copy_from_slice(&nat.sport.to_be_bytes());
    p[l4 + 2..l4 + 4].copy_from_slice(&nat.dport.to_be_bytes());
    hop(&mut p, ip, d);
    fix_l4_checksum(&mut p, ip, &nat.src, &nat.dst);
    fix_ipv4_header(&mut p, ip);
    p
}

/// Writes the outer addresses (16-byte form; IPv4 takes the last four).
pub fn write_addrs(p: &mut [u8], ip: &Ip, src: &[u8; 16], dst: &[u8; 16]) {
    let o = ip.off;
    if ip.v6 {
        p[o + 8..o + 24].copy_from_slice(src);
        p[o + 24..o + 40].copy_from_slice(dst);
    } else {
        p[o + 12..o + 16].copy_from_slice(&src[12..]);
        p[o + 16..o + 20].copy_from_slice(&dst[12..]);
    }
}

/// TTL / hop limit minus one and the link header from the FIB; when the
/// neighbour is unknown the MACs are left for bpf_redirect_neigh.
pub fn hop(p: &mut [u8], ip: &Ip, d: &Decision) {
    let Decision::Forward { iface, neighbour } = d else {
        panic!("hop without a forwarding decision");
    };
    let ttl_at = if ip.v6 { ip.off + 7 } else { ip.off + 8 };
    p[ttl_at] = ip.ttl - 1;
    if let Some(mac) = neighbour {
        p[0..6].copy_from_slice(mac);
        p[6..12].copy_from_slice(&iface.mac);
    }
}

/// The IPv4 header checksum, from scratch (nothing for IPv6).
pub fn fix_ipv4_header(p: &mut [u8], ip: &Ip) {
    if ip.v6 {
        return;
    }
    let o = ip.off;
    p[o + 10..o + 12].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&p[o..o + ip.hdr_len]);
    p[o + 10..o + 12].copy_from_slice(&c.to_be_bytes());
}

/// The TCP or UDP checksum, from scratch over the segment as the IP header
/// bounds it. A UDP checksum of zero means "none" and stays zero; a
/// computed zero is sent as all ones.
fn fix_l4_checksum(p: &mut [u8], ip: &Ip, src: &[u8; 16], dst: &[u8; 16]) {
    let l4 = ip.l4_off();
    let end = ip.end();
    let at = match ip.proto {
        PROTO_TCP => l4 + 16,
        PROTO_UDP => l4 + 6,
        _ => unreachable!(),
    };
    if ip.proto == PROTO_UDP && p[at..at + 2] == [0, 0] {
        return;
    }
    p[at..at + 2].copy_from_slice(&[0, 0]);
    let mut c = pseudo_header(src, dst, ip.proto, (end - l4) as u32)
        .push(&p[l4..end])
        .checksum();
    if ip.proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpKind {
    TimeExceeded,
    /// Fragmentation needed (IPv4) / packet too big (IPv6), with the MTU.
    TooBig(u32),
}

/// Section 7: the error built in place of `pkt`, back to where it came
/// from: MACs swapped, an IP header from the packet's destination to its
/// source, the ICMP header, and the start of the packet as it was sent.
pub fn icmp_error(pkt: &[u8], ip: &Ip, kind: IcmpKind) -> Vec<u8> {
    let quote = &pkt[ip.off..ip.off + ip.len.min(ICMP_QUOTE_MAX)];
    let mut p = Vec::with_capacity(ETH_LEN + 48 + quote.len());
    p.extend_from_slice(&pkt[6..12]);
    p.extend_from_slice(&pkt[0..6]);
    if ip.v6 {
        p.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
        let plen = (8 + quote.len()) as u16;
        p.extend_from_slice(&[0x60, 0, 0, 0]);
        p.extend_from_slice(&plen.to_be_bytes());
        p.extend_from_slice(&[PROTO_ICMPV6, ICMP_TTL]);
        p.extend_from_slice(&ip.dst);
        p.extend_from_slice(&ip.src);
        let (t, rest) = match kind {
            IcmpKind::TimeExceeded => (3u8, 0u32),
            IcmpKind::TooBig(mtu) => (2u8, mtu),
        };
        let icmp_at = p.len();
        p.extend_from_slice(&[t, 0, 0, 0]);
        p.extend_from_slice(&rest.to_be_bytes());
        p.extend_from_slice(quote);
        let c = pseudo_header(&ip.dst, &ip.src, PROTO_ICMPV6, u32::from(plen))
            .push(&p[icmp_at..])
            .checksum();
        p[icmp_at + 2..icmp_at + 4].copy_from_slice(&c.to_be_bytes());
    } else {
        p.extend_from_slice(&ETH_P_IP.to_be_bytes());
        let total = (20 + 8 + quote.len()) as u16;
        let ip_at = p.len();
        p.extend_from_slice(&[0x45, ICMP_TOS]);
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 0, ICMP_TTL, PROTO_ICMP, 0, 0]);
        p.extend_from_slice(&ip.dst[12..]);
        p.extend_from_slice(&ip.src[12..]);
        let c = checksum::checksum(&p[ip_at..ip_at + 20]);
        p[ip_at + 10..ip_at + 12].copy_from_slice(&c.to_be_bytes());
        let (t, code, rest) = match kind {
            IcmpKind::TimeExceeded => (11u8, 0u8, 0u32),
            IcmpKind::TooBig(mtu) => (3, 4, mtu & 0xffff),
        };
        let icmp_at = p.len();
        p.extend_from_slice(&[t, code, 0, 0]);
        p.extend_from_slice(&rest.to_be_bytes());
        p.extend_from_slice(quote);
        let c = Sum::new().push(&p[icmp_at..]).checksum();
        p[icmp_at + 2..icmp_at + 4].copy_from_slice(&c.to_be_bytes());
    }
    p
}
