//! Section 5: ICMP errors about a balanced flow, translated back the way
//! RFC 5508 asks of a NAT: the quoted packet and the outer header both.

use lb_common::{global, CT_REPLY, CT_SNAT, PROTO_TCP, PROTO_UDP};

use crate::checksum::{self, pseudo_header, Sum};
use crate::conntrack::{self, flow_key};
use crate::forward::{self, Decision};
use crate::packet::{IcmpError, Quote};
use crate::state::{Forwarding, Ingress, ModelState, Outcome, Path, TC_ACT_REDIRECT};

pub fn handle(
    state: &mut ModelState,
    pkt: &[u8],
    e: &IcmpError,
    ingress: Ingress,
    now: u64,
    out: &mut Outcome,
) {
    out.path = Path::IcmpNoEntry;
    let Some(q) = e.quote else {
        return;
    };
    // The quoted packet went from Q.src to Q.dst; the connection is found
    // by the tuple of a packet going the other way.
    let rkey = flow_key(q.dst, q.src, q.dport, q.sport, q.proto);
    // Looked up like a packet: an expired entry is deleted on the way
    // (the reading the datapath implements of "no state change"; see the
    // report). Nothing else changes.
    let Some((_, ct)) = conntrack::lookup(state, &rkey, now, out) else {
        return;
    };
    if e.ip.dst != q.src {
        return;
    }
    let snat = ct.flags & CT_SNAT != 0;
    let (tr, outer_src, outer_dst) = if ct.flags & CT_REPLY != 0 {
        // About a packet sent to the backend; goes to the client.
        let tr = QuoteNat {
            src: ct.client,
            sport: u16::from_be(ct.client_port),
            dst: ct.frontend,
            dport: u16::from_be(ct.frontend_port),
        };
        let src = if e.ip.src == ct.backend {
            ct.frontend
        } else {
            e.ip.src
        };
        (tr, src, ct.client)
    } else {
        // About a reply sent to the client; goes to the backend.
        let tr = QuoteNat {
            src: ct.backend,
            sport: u16::from_be(ct.backend_port),
            dst: if snat { ct.nat_addr } else { ct.client },
            dport: u16::from_be(if snat { ct.nat_port } else { ct.client_port }),
        };
        let src = if snat && e.ip.src == ct.client {
            ct.nat_addr
        } else {
            e.ip.src
        };
        (tr, src, ct.backend)
    };
    let d = forward::decide(state, pkt.len(), &e.ip, &outer_dst, ingress);
    match d {
        Decision::Forward { .. } => {}
        Decision::NotForwarded => {
            out.forwarding = Forwarding::NotForwarded;
            state.count(global::NOT_FORWARDED);
            return;
        }
        _ => {
            // No ICMP about an ICMP error: it passes as it is.
            out.forwarding = Forwarding::IcmpPassed;
            return;
        }
    }
    let mut p = pkt.to_vec();
    rewrite_quote(&mut p, e.ip.v6, &q, &tr);
    forward::write_addrs(&mut p, &e.ip, &outer_src, &outer_dst);
    forward::hop(&mut p, &e.ip, &d);
    forward::fix_ipv4_header(&mut p, &e.ip);
    let (icmp, end) = (e.icmp_off, e.ip.end());
    p[icmp + 2..icmp + 4].copy_from_slice(&[0, 0]);
    let c = if e.ip.v6 {
        pseudo_header(&outer_src, &outer_dst, e.ip.proto, (end - icmp) as u32)
            .push(&p[icmp..end])
            .checksum()
    } else {
        Sum::new().push(&p[icmp..end]).checksum()
    };
    p[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    out.packet = p;
    out.action = TC_ACT_REDIRECT;
    out.path = Path::IcmpTranslated;
    out.forwarding = Forwarding::Redirected;
    // `translated` counts packets for a frontend or a reply, which an ICMP
    // error is not.
    state.count(global::ICMP_TRANSLATED);
    state.count(global::REDIRECTED);
}

struct QuoteNat {
    src: [u8; 16],
    sport: u16,
    dst: [u8; 16],
    dport: u16,
}

/// The quoted addresses and ports, the quoted IPv4 header checksum (from
/// scratch: the header is all there) and the quoted TCP/UDP checksum if it
/// was quoted. The segment it covers is cut off, so that one can only be
/// updated by the change of what it covers (RFC 1624).
fn rewrite_quote(p: &mut [u8], v6: bool, q: &Quote, tr: &QuoteNat) {
    let addr_bytes = |a: &[u8; 16]| -> Vec<u8> {
        if v6 {
            a.to_vec()
        } else {
            a[12..].to_vec()
        }
    };
    let covered = |src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16| {
        let mut v = addr_bytes(src);
        v.extend(addr_bytes(dst));
        v.extend(sport.to_be_bytes());
        v.extend(dport.to_be_bytes());
        v
    };
    let old = covered(&q.src, &q.dst, q.sport, q.dport);
    let new = covered(&tr.src, &tr.dst, tr.sport, tr.dport);
    let o = q.off;
    if v6 {
        p[o + 8..o + 24].copy_from_slice(&tr.src);
        p[o + 24..o + 40].copy_from_slice(&tr.dst);
    } else {
        p[o + 12..o + 16].copy_from_slice(&tr.src[12..]);
        p[o + 16..o + 20].copy_from_slice(&tr.dst[12..]);
        p[o + 10..o + 12].copy_from_slice(&[0, 0]);
        let c = checksum::checksum(&p[o..o + q.hdr_len]);
        p[o + 10..o + 12].copy_from_slice(&c.to_be_bytes());
    }
    let l4 = q.l4_off();
    p[l4..l4 + 2].copy_from_slice(&tr.sport.to_be_bytes());
    p[l4 + 2..l4 + 4].copy_from_slice(&tr.dport.to_be_bytes());
    let at = match q.proto {
        PROTO_TCP if q.l4_avail >= 18 => l4 + 16,
        PROTO_UDP => l4 + 6,
        _ => return,
    };
    let old_sum = u16::from_be_bytes([p[at], p[at + 1]]);
    if q.proto == PROTO_UDP && old_sum == 0 {
        return;
    }
    let mut c = checksum::update(old_sum, &old, &new);
    if q.proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
}
