//! The XDP fast path (docs/datapath.md, section 11): a packet of a known
//! connection in its steady state, arriving on an interface whose frames
//! carry complete checksums (a NIC), is translated and redirected here,
//! before the kernel builds an skb for it. Everything else is passed to the
//! TC program unchanged, which stays the datapath of record: new flows,
//! every change of a connection's state (SYN, FIN, RST, the first reply,
//! confirmation), ICMP, packets with no resolved next hop or too big for
//! it, and anything this program cannot read in its one linear buffer.
//!
//! The two programs share the maps, the parser, the conntrack lookup and
//! `touch`, so a connection looks the same whichever of them carried its
//! packets. XDP has no skb and so no CHECKSUM_PARTIAL: checksums are
//! adjusted by plain RFC 1624 arithmetic, which is exact only when the
//! checksum fields are complete. That is why lbd attaches this program only
//! to the interfaces it is told to (`--xdp`): frames a local stack sent
//! through a veth with checksum offload carry partial checksums, and no
//! XDP program can tell.

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS},
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{
    global, CtEntry, BACKEND_DOWN, CT_REPLY, CT_SNAT, PROTO_TCP, PROTO_UDP, ST_SEEN_REPLY,
};

use crate::{
    conntrack,
    forward::{self, Route},
    maps::{
        count, count_traffic, count_xdp, Scratch, Traffic, BACKENDS, CONFIG, SCRATCH, XDP_PORTS,
    },
    parse::{self, Packet, Parsed, TCP_FIN, TCP_RST, TCP_SYN},
    pkt::{self, delta, fold, write, Frame},
};

#[xdp]
pub fn lb_xdp_ingress(ctx: XdpContext) -> u32 {
    let action = fast_path(&ctx);
    if action == XDP_PASS {
        count_xdp(lb_common::xdp_stat::PASSED);
    }
    action
}

/// Does nothing but pass: the XDP floor of the benchmarks.
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[inline(always)]
fn fast_path(ctx: &XdpContext) -> u32 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return XDP_PASS;
    };
    // SAFETY: this CPU's scratch entry; the program is not preempted on it,
    // and the TC program runs on a packet only after this one returned.
    let s = unsafe { &mut *s };
    let Some(cfg) = CONFIG.get(0) else {
        return XDP_PASS;
    };
    if parse::parse(ctx, &mut s.pkt) != Parsed::Candidate {
        return XDP_PASS;
    }
    let p = &s.pkt;
    if !crate::maps::prefilter(&p.dst, p.dport, cfg)
        && !crate::maps::prefilter(&p.src, p.sport, cfg)
    {
        return XDP_PASS;
    }
    let now = conntrack::now(cfg);
    conntrack::set_key(&mut s.key, (&p.src, p.sport), (&p.dst, p.dport), p.proto);
    let e = conntrack::find(s, cfg, now);
    if e.is_null() {
        return XDP_PASS;
    }
    let reply = s.entry.flags & CT_REPLY != 0;
    if !steady(s, reply) || !next_hop(ctx, s, e, conntrack::second(now)) {
        return XDP_PASS;
    }
    conntrack::touch(s, e, now);
    if translate(ctx, s).is_err() {
        count(global::SEEN);
        count(global::REWRITE_ERRORS);
        return XDP_DROP;
    }
    count(global::SEEN);
    count(global::TRANSLATED);
    count(global::REDIRECTED);
    count_xdp(lb_common::xdp_stat::TRANSLATED);
    let e = &s.entry;
    let traffic = if reply {
        Traffic::ToClient
    } else {
        Traffic::ToBackend(false)
    };
    count_traffic(e, Frame::len(ctx) as u64, traffic);
    // The egress device was found in XDP_PORTS above; were it removed since,
    // the frame is dropped rather than passed on translated.
    XDP_PORTS.redirect(e.hop.ifindex, 0).unwrap_or(XDP_DROP)
}

/// Whether the packet of the half in `s.entry` changes nothing in its
/// connection's state but its timestamps: what the TC program would do
/// with it is then only a translation, which this program can do too.
/// Mirrors the state changes of `continue_flow` and `to_client`.
#[inline(always)]
fn steady(s: &Scratch, reply: bool) -> bool {
    let p = &s.pkt;
    let e = &s.entry;
    let tcp = p.proto == PROTO_TCP;
    if p.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        return false;
    }
    let pending = s.pending != 0;
    if reply {
        // The first reply is recorded; a pending UDP flow is confirmed by it.
        return e.state & ST_SEEN_REPLY != 0 && !(pending && p.proto == PROTO_UDP);
    }
    // A pending TCP connection is confirmed by the client's ACK after the
    // backend answered.
    if pending && tcp && e.state & ST_SEEN_REPLY != 0 {
        return false;
    }
    // SAFETY: plain data.
    match unsafe { BACKENDS.get(&e.backend_id) } {
        // A backend that went down or left re-balances in TC.
        Some(b) => b.service_slot == e.service_slot && b.state != BACKEND_DOWN,
        None => false,
    }
}

/// Whether the packet of the half `e` (copied in `s.entry`) has a next hop
/// this program can send it to, as TC's `decide_cached` finds it: the
/// half's cached one when it is from this second and this interface, else
/// the FIB's answer, cached in the half as TC caches it. Only a direct next
/// hop (neighbour resolved) within the egress MTU, on a device that takes
/// redirected frames (listed in XDP_PORTS), will do; TC decides what
/// becomes of any other packet.
#[inline(always)]
fn next_hop(ctx: &XdpContext, s: &mut Scratch, e: *mut CtEntry, second: u32) -> bool {
    let in_ifindex = ctx.ingress_ifindex() as u32;
    let hop = &s.entry.hop;
    if s.pkt.ttl <= 1 {
        return false;
    }
    if !(hop.ifindex != 0 && hop.second == second && hop.in_ifindex == in_ifindex)
        && !refresh_hop(ctx, s, e, in_ifindex, second)
    {
        return false;
    }
    let hop = &s.entry.hop;
    Frame::len(ctx).saturating_sub(s.pkt.l3_off) <= hop.mtu
        && XDP_PORTS.get_ifindex(hop.ifindex).is_some()
}

/// Asks the FIB for the next hop of the half in `s.entry` with the
/// packet's translated addresses, and caches a direct one in the half (and
/// its copy) when the packet fits its MTU: what TC's `decide` and
/// `remember` do for the same packet.
#[inline(never)]
fn refresh_hop(
    ctx: &XdpContext,
    s: &mut Scratch,
    e: *mut CtEntry,
    in_ifindex: u32,
    second: u32,
) -> bool {
    let p = &s.pkt;
    let ((src, _), (dst, _)) = translated(p, &s.entry);
    let rc = forward::fib_lookup(ctx, &mut s.fib, p, (src, dst), in_ifindex);
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return false;
    }
    // SAFETY: on success without a length the kernel writes the egress
    // device's MTU here.
    let mtu = unsafe { s.fib.__bindgen_anon_1.mtu_result } as u32;
    if Frame::len(ctx).saturating_sub(p.l3_off) > mtu {
        return false;
    }
    forward::remember(in_ifindex, Route::Direct, &s.fib, &mut s.entry.hop, second);
    // SAFETY: pointer from a successful lookup, valid for this program run.
    unsafe { (*e).hop = s.entry.hop };
    true
}

/// An address and a port (network byte order).
type Endpoint<'a> = (&'a [u8; 16], u16);

/// The source and destination of `p` once translated for its connection's
/// half `e`.
#[inline(always)]
fn translated<'a>(p: &'a Packet, e: &'a CtEntry) -> (Endpoint<'a>, Endpoint<'a>) {
    match (e.flags & CT_REPLY != 0, e.flags & CT_SNAT != 0) {
        (true, false) => ((&e.frontend, e.frontend_port), (&p.dst, p.dport)),
        (true, true) => ((&e.frontend, e.frontend_port), (&e.client, e.client_port)),
        (false, false) => ((&p.src, p.sport), (&e.backend, e.backend_port)),
        (false, true) => ((&e.nat_addr, e.nat_port), (&e.backend, e.backend_port)),
    }
}

/// Rewrites addresses, ports, TTL and MACs for the half in `s.entry`, with
/// each checksum adjusted once for all of its changes.
#[inline(never)]
fn translate(ctx: &XdpContext, s: &Scratch) -> Result<(), ()> {
    let p = &s.pkt;
    let e = &s.entry;
    let ((src, sport), (dst, dport)) = translated(p, e);
    let l3 = p.l3_off as usize;
    let l4 = p.l4_off as usize;
    let old_ports = ports(p.sport, p.dport);
    let new_ports = ports(sport, dport);
    let ttl = p.ttl;
    let ports_delta = delta(&old_ports, &new_ports);
    if p.is_v6() {
        write(ctx, l3 + 7, &(ttl - 1))?;
        write(ctx, l3 + 8, src)?;
        write(ctx, l3 + 24, dst)?;
        let d = delta(&p.src, src) + delta(&p.dst, dst) + ports_delta;
        fix_l4(ctx, p, d)?;
    } else {
        let (os, ns) = (v4(&p.src), v4(src));
        let (od, nd) = (v4(&p.dst), v4(dst));
        let addrs = delta(&os, &ns) + delta(&od, &nd);
        write(ctx, l3 + 8, &(ttl - 1))?;
        write(ctx, l3 + 12, &ns)?;
        write(ctx, l3 + 16, &nd)?;
        // The TTL shares a 16-bit word with the protocol.
        let ttl_delta = delta(&[ttl, p.proto], &[ttl - 1, p.proto]);
        pkt::fix_csum(ctx, l3 + 10, addrs + ttl_delta)?;
        fix_l4(ctx, p, addrs + ports_delta)?;
    }
    write(ctx, l4, &new_ports)?;
    write(ctx, 0, &e.hop.dmac)?;
    write(ctx, 6, &e.hop.smac)
}

/// Adjusts the TCP or UDP checksum for changes worth `d`. An IPv4 UDP
/// datagram without a checksum (0) keeps none; a UDP checksum that comes
/// out as 0 is sent as 0xffff, its other form (RFC 768).
#[inline(always)]
fn fix_l4(ctx: &XdpContext, p: &Packet, d: u64) -> Result<(), ()> {
    let off = p.csum_off();
    let old = u16::from_be_bytes(pkt::read::<[u8; 2], _>(ctx, off)?);
    if p.proto == PROTO_UDP && old == 0 {
        // Only possible over IPv4: the parser refuses it over IPv6.
        return Ok(());
    }
    let mut new = !fold((!old) as u64 + d);
    if p.proto == PROTO_UDP && new == 0 {
        new = 0xffff;
    }
    write(ctx, off, &new.to_be_bytes())
}

#[inline(always)]
fn ports(sport: u16, dport: u16) -> [u8; 4] {
    let (s, d) = (sport.to_ne_bytes(), dport.to_ne_bytes());
    [s[0], s[1], d[0], d[1]]
}

#[inline(always)]
fn v4(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}
