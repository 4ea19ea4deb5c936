//! The load balancer's datapath: a TC ingress classifier attached to every
//! Ethernet interface of the node. docs/datapath.md is its contract: a
//! packet for a frontend is DNATed to a backend chosen by Maglev and
//! tracked; replies and ICMP errors are translated back; anything else
//! continues untouched to the next program or the stack.
//!
//! Built for the BPF target by lb-userspace's build script; a host build
//! (`cargo build --workspace`) only checks that it compiles.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Inline assembly on the BPF target (pkt::bounded).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

mod conntrack;
mod events;
mod forward;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod pkt;
mod sock;
mod xdp;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    global, Backend, Config, CtEntry, NextHop, ServiceKey, ServiceValue, BACKEND_ACTIVE,
    BACKEND_DOWN, CT_SNAT, FLAG_FULLNAT, FLAG_LOCAL_VIP, FLAG_SOCKET, PROTO_TCP, PROTO_UDP,
    ST_CLOSING, ST_FIN_BACKEND, ST_FIN_CLIENT, ST_RST, ST_SEEN_REPLY,
};

use forward::Route;
use maps::{
    add_stats, count, count_traffic, Scratch, Traffic, BACKENDS, CONFIG, SCRATCH, SERVICES,
    SERVICE_STATS,
};
use nat::Side;
use parse::{Parsed, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

const UNSPEC: i32 = TC_ACT_UNSPEC;
const SHOT: i32 = TC_ACT_SHOT as i32;
/// `continue_flow`'s answer when the packet must be balanced afresh.
const NEW_FLOW: i32 = i32::MIN;

#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    count(global::SEEN);
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return UNSPEC;
    };
    // SAFETY: this CPU's scratch entry; the program is not preempted on it.
    let s = unsafe { &mut *s };
    let Some(cfg) = CONFIG.get(0) else {
        return UNSPEC;
    };
    match parse::parse(&ctx, &mut s.pkt) {
        Parsed::Candidate => transport(&ctx, s, cfg),
        Parsed::IcmpError => icmp_error(&ctx, s, cfg),
        Parsed::Other => UNSPEC,
        Parsed::Fragment => {
            count(global::FRAGMENTS);
            UNSPEC
        }
        Parsed::Malformed => {
            count(global::MALFORMED);
            UNSPEC
        }
    }
}

/// Does nothing but pass: the floor that benchmarks compare the datapath with.
#[classifier]
pub fn lb_tc_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

/// A TCP or UDP packet: section 2's lookup order.
#[inline(always)]
fn transport(ctx: &TcContext, s: &mut Scratch, cfg: &Config) -> i32 {
    let p = &s.pkt;
    if !maps::prefilter(&p.dst, p.dport, cfg) && !maps::prefilter(&p.src, p.sport, cfg) {
        count(global::PREFILTERED);
        return UNSPEC;
    }
    let now = conntrack::now(cfg);
    conntrack::set_key(&mut s.key, (&p.src, p.sport), (&p.dst, p.dport), p.proto);
    let e = conntrack::find(s, cfg, now);
    if !e.is_null() {
        if s.entry.flags & lb_common::CT_REPLY != 0 {
            return to_client(ctx, s, e, now);
        }
        let action = continue_flow(ctx, s, e, now);
        if action != NEW_FLOW {
            return action;
        }
    }
    let p = &s.pkt;
    let key = ServiceKey {
        addr: p.dst,
        port: p.dport,
        proto: p.proto,
        _pad: 0,
    };
    // SAFETY: plain data, written whole by the reconciler.
    match unsafe { SERVICES.get(&key) } {
        // A socket-balanced address is for the socket programs alone.
        Some(svc) if svc.flags & FLAG_SOCKET == 0 => new_flow(ctx, s, svc, cfg, now),
        _ => UNSPEC,
    }
}

/// A client's packet on a known connection (section 3.1).
#[inline(never)]
fn continue_flow(ctx: &TcContext, s: &mut Scratch, e: *mut CtEntry, now: u64) -> i32 {
    // SAFETY: plain data.
    let backend = unsafe { BACKENDS.get(&s.entry.backend_id) };
    let (serves, takes_new) = match backend {
        Some(b) if b.service_slot == s.entry.service_slot && b.state != BACKEND_DOWN => {
            (true, b.state == BACKEND_ACTIVE)
        }
        _ => (false, false),
    };
    let flags = s.pkt.tcp_flags;
    let tcp = s.pkt.proto == PROTO_TCP;
    let syn = tcp && flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if syn && (s.entry.state & ST_CLOSING != 0 || !takes_new) {
        conntrack::delete(s);
        count(global::CT_REOPENED);
        return NEW_FLOW;
    }
    if !serves {
        conntrack::delete(s);
        count(global::CT_STALE);
        return NEW_FLOW;
    }
    let snat = s.entry.flags & CT_SNAT != 0;
    let src = if snat {
        s.entry.nat_addr
    } else {
        s.entry.client
    };
    let route = match route_known(ctx, s, e, (src, s.entry.backend), now) {
        Ok(route) => route,
        Err(action) => return action,
    };
    // A FIN or an RST (rare) goes to both halves even when this one has it
    // already: the other half may have been restored from an older copy.
    let bits = tcp_bits(flags, ST_FIN_CLIENT);
    if bits != 0 {
        conntrack::set_state(s, e, bits);
    }
    let confirm =
        s.pending != 0 && tcp && flags & TCP_SYN == 0 && s.entry.state & ST_SEEN_REPLY != 0;
    if !(confirm && conntrack::confirm(ctx, s, now)) {
        conntrack::touch(s, e, now);
    }
    to_backend(ctx, s, route, false)
}

/// Section 3.2: a new flow for `svc`.
#[inline(never)]
fn new_flow(ctx: &TcContext, s: &mut Scratch, svc: &ServiceValue, cfg: &Config, now: u64) -> i32 {
    let hash = lb::flow_hash(&s.key);
    let Some((backend_id, backend)) = lb::pick(svc, &s.key, hash, now) else {
        add_stats(SERVICE_STATS.get_ptr_mut(svc.slot), |st| st.no_backend += 1);
        return if svc.flags & FLAG_LOCAL_VIP != 0 {
            UNSPEC
        } else {
            SHOT
        };
    };
    let p = &s.pkt;
    let hairpin = backend.addr == p.src;
    let fullnat = svc.flags & FLAG_FULLNAT != 0;
    let snat = fullnat || hairpin;
    let nat_addr = if fullnat { svc.snat_addr } else { p.dst };
    let src = if snat { nat_addr } else { p.src };
    let route = forward::decide(ctx, &s.pkt, &src, &backend.addr, &mut s.fib);
    if let Some(action) = unforwardable(ctx, s, route) {
        return action;
    }
    new_entry(
        s,
        svc,
        backend_id,
        backend,
        if snat { Some(&nat_addr) } else { None },
        now,
    );
    // SAFETY: the context pointer is valid for the program's lifetime.
    let in_ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    forward::remember(
        in_ifindex,
        route,
        &s.fib,
        &mut s.entry.hop,
        conntrack::second(now),
    );
    match conntrack::insert(s, cfg, now, hash) {
        conntrack::INSERTED => {
            lb::remember(svc, &s.key, backend_id, now);
            to_backend(ctx, s, route, true)
        }
        conntrack::RACED => {
            let e = conntrack::lookup(s, cfg, now);
            if e.is_null() {
                count(global::CT_INSERT_FAILED);
                events::ct_insert_failed(ctx, &s.pkt);
                return SHOT;
            }
            pkt::copy_words(&mut s.entry, e);
            to_backend(ctx, s, route, false)
        }
        conntrack::EXHAUSTED => {
            events::snat_exhausted(ctx, &s.pkt, &s.entry.nat_addr);
            SHOT
        }
        _ => SHOT,
    }
}

/// Fills `s.entry` as the forward half of a new connection.
#[inline(always)]
fn new_entry(
    s: &mut Scratch,
    svc: &ServiceValue,
    backend_id: u32,
    backend: &Backend,
    nat: Option<&[u8; 16]>,
    now: u64,
) {
    let p = &s.pkt;
    s.entry = CtEntry {
        client: p.src,
        frontend: p.dst,
        backend: backend.addr,
        nat_addr: nat.copied().unwrap_or([0; 16]),
        client_port: p.sport,
        frontend_port: p.dport,
        backend_port: backend.port,
        nat_port: 0,
        backend_id,
        service_slot: svc.slot,
        last_seen_ns: now,
        proto: p.proto,
        flags: if nat.is_some() { CT_SNAT } else { 0 },
        state: 0,
        _pad: 0,
        peer_refresh_s: conntrack::second(now),
        hop: NextHop::default(),
        _pad2: 0,
    };
}

/// Translates a client's packet with the connection `s.entry` and sends it.
#[inline(never)]
fn to_backend(ctx: &TcContext, s: &mut Scratch, route: Route, new: bool) -> i32 {
    let e = &s.entry;
    let p = &s.pkt;
    if nat::rewrite(ctx, p, Side::Destination, &e.backend, e.backend_port).is_err()
        || (e.flags & CT_SNAT != 0
            && nat::rewrite(ctx, p, Side::Source, &e.nat_addr, e.nat_port).is_err())
    {
        count(global::REWRITE_ERRORS);
        events::rewrite_failed(ctx, p);
        return SHOT;
    }
    count(global::TRANSLATED);
    count_traffic(e, ctx.len() as u64, Traffic::ToBackend(new));
    count(global::REDIRECTED);
    forward::send(ctx, p, route, &s.fib)
}

/// A backend's reply (section 4).
#[inline(never)]
fn to_client(ctx: &TcContext, s: &mut Scratch, e: *mut CtEntry, now: u64) -> i32 {
    let snat = s.entry.flags & CT_SNAT != 0;
    let frontend = s.entry.frontend;
    let dst = if snat { s.entry.client } else { s.pkt.dst };
    let route = match route_known(ctx, s, e, (frontend, dst), now) {
        Ok(route) => route,
        Err(action) => return action,
    };
    // As in continue_flow; ST_SEEN_REPLY only once.
    let closing = tcp_bits(s.pkt.tcp_flags, ST_FIN_BACKEND);
    let bits = ST_SEEN_REPLY | closing;
    if closing != 0 || bits & !s.entry.state != 0 {
        conntrack::set_state(s, e, bits);
    }
    if !(s.pending != 0 && s.pkt.proto == PROTO_UDP && conntrack::confirm(ctx, s, now)) {
        conntrack::touch(s, e, now);
    }
    let e = &s.entry;
    let p = &s.pkt;
    if nat::rewrite(ctx, p, Side::Source, &e.frontend, e.frontend_port).is_err()
        || (snat && nat::rewrite(ctx, p, Side::Destination, &e.client, e.client_port).is_err())
    {
        count(global::REWRITE_ERRORS);
        events::rewrite_failed(ctx, p);
        return SHOT;
    }
    count(global::TRANSLATED);
    count_traffic(e, ctx.len() as u64, Traffic::ToClient);
    count(global::REDIRECTED);
    forward::send(ctx, p, route, &s.fib)
}

/// The forwarding decision for a packet of the known half `e` (copied in
/// `s.entry`) with `src`/`dst` as its translated addresses, through the
/// half's cached next hop, which is stored again when the FIB was asked:
/// the route when the packet can be forwarded, else the action for it.
#[inline(always)]
fn route_known(
    ctx: &TcContext,
    s: &mut Scratch,
    e: *mut CtEntry,
    (src, dst): ([u8; 16], [u8; 16]),
    now: u64,
) -> Result<Route, i32> {
    let (route, fresh) = forward::decide_cached(
        ctx,
        &s.pkt,
        (&src, &dst),
        &mut s.fib,
        &mut s.entry.hop,
        conntrack::second(now),
    );
    if let Some(action) = unforwardable(ctx, s, route) {
        return Err(action);
    }
    if fresh {
        // SAFETY: pointer from a successful lookup, valid for this program run.
        unsafe { (*e).hop = s.entry.hop };
    }
    Ok(route)
}

/// What happens to a packet `decide` would not route: an ICMP error back
/// to its sender, a drop, or the packet continuing untranslated. None when
/// it can be forwarded.
#[inline(always)]
fn unforwardable(ctx: &TcContext, s: &mut Scratch, route: Route) -> Option<i32> {
    match route {
        Route::Direct | Route::Neighbour => None,
        Route::Unroutable => {
            count(global::NOT_FORWARDED);
            Some(UNSPEC)
        }
        Route::TooBig if s.pkt.df == 0 => {
            count(global::TOO_BIG_DROPPED);
            // SAFETY: reading a union field the FIB lookup wrote.
            let mtu = unsafe { s.fib.__bindgen_anon_1.mtu_result } as u32;
            events::too_big_dropped(ctx, &s.pkt, mtu);
            Some(SHOT)
        }
        Route::TooBig | Route::TimeExceeded => {
            // SAFETY: reading a union field the FIB lookup or decide wrote.
            let mtu = unsafe { s.fib.__bindgen_anon_1.mtu_result } as u32;
            Some(icmp::reply_error(ctx, s, route, mtu))
        }
    }
}

/// State bits for a packet's TCP flags: `fin` for a FIN, ST_RST for a reset.
#[inline(always)]
fn tcp_bits(flags: u8, fin: u8) -> u8 {
    let mut bits = 0;
    if flags & TCP_FIN != 0 {
        bits |= fin;
    }
    if flags & TCP_RST != 0 {
        bits |= ST_RST;
    }
    bits
}

/// An ICMP error about a balanced flow (section 5).
#[inline(never)]
fn icmp_error(ctx: &TcContext, s: &mut Scratch, cfg: &Config) -> i32 {
    let now = conntrack::now(cfg);
    let q = &s.pkt.inner;
    // The quoted packet went the other way.
    conntrack::set_key(&mut s.key, (&q.dst, q.dport), (&q.src, q.sport), q.proto);
    let e = conntrack::find(s, cfg, now);
    if e.is_null() {
        return UNSPEC;
    }
    if !icmp::plan(&s.pkt, &s.entry, &mut s.plan) {
        return UNSPEC;
    }
    let (src, dst) = (s.plan.outer_src, s.plan.outer_dst);
    let route = forward::decide(ctx, &s.pkt, &src, &dst, &mut s.fib);
    match route {
        Route::Direct | Route::Neighbour => {}
        Route::Unroutable => {
            count(global::NOT_FORWARDED);
            return UNSPEC;
        }
        // No ICMP error about an ICMP error.
        _ => return UNSPEC,
    }
    if icmp::translate(ctx, &s.pkt, &s.plan).is_err() {
        count(global::REWRITE_ERRORS);
        events::icmp_rewrite_failed(ctx, &s.pkt);
        return SHOT;
    }
    count(global::ICMP_TRANSLATED);
    count(global::REDIRECTED);
    forward::send(ctx, &s.pkt, route, &s.fib)
}

#[inline(always)]
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
