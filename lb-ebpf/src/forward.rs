//! Sending a packet on its way (docs/datapath.md, section 6).
//!
//! Where a translated packet goes is decided before it is changed: the FIB
//! is asked for the next hop with the translated addresses, and the egress
//! MTU is checked segment by segment (a GSO packet is a burst of segments
//! that the kernel cuts up on the way out). Only then is the packet
//! translated and redirected straight to the egress device. That skips the
//! host's netfilter FORWARD and nat chains (on a Docker host FORWARD drops
//! by default and POSTROUTING masquerades container traffic), so both
//! directions of a balanced flow are handled by the datapath alone, and a
//! translated packet never reaches the stack, which would drop it as a
//! martian when its new source is one of the node's own addresses.

use core::mem;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, bpf_redir_neigh, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_REDIRECT,
    },
    helpers::{bpf_check_mtu, bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
    EbpfContext,
};

use lb_common::NextHop;

use crate::{
    maps,
    parse::Packet,
    pkt::{self, delta, fix_csum, write},
};

/// bpf_check_mtu: check each GSO segment rather than the whole burst.
const BPF_MTU_CHK_SEGS: u64 = 1;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The outcome of `decide`.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Route {
    /// Next hop known: `fib` holds the egress interface and both MACs.
    Direct,
    /// Egress interface known, the neighbour not resolved yet.
    Neighbour,
    /// The hop limit runs out here.
    TimeExceeded,
    /// Too big for the egress link; `fib.__bindgen_anon_1.mtu_result` holds its MTU.
    TooBig,
    /// No route, forwarding disabled, or anything else the FIB refuses.
    Unroutable,
}

/// Where the packet `p` would go with `src`/`dst` as its addresses.
// A separate BPF function: its stack frame is not live while the caller's
// locals are.
#[inline(never)]
pub fn decide(
    ctx: &TcContext,
    p: &Packet,
    src: &[u8; 16],
    dst: &[u8; 16],
    fib: &mut FibParams,
) -> Route {
    if p.ttl <= 1 {
        return Route::TimeExceeded;
    }
    // SAFETY: the context pointer is valid for the program's lifetime.
    let rc = fib_lookup(ctx, fib, p, (src, dst), unsafe {
        (*ctx.skb.skb).ingress_ifindex
    });
    let route = if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        Route::Direct
    } else if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        Route::Neighbour
    } else if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // SAFETY: the kernel wrote the egress MTU with this verdict.
        let mtu = unsafe { fib.__bindgen_anon_1.mtu_result };
        let min_mtu = if p.is_v6() { 1280 } else { 68 };
        return if mtu >= min_mtu {
            Route::TooBig
        } else {
            Route::Unroutable
        };
    } else {
        return Route::Unroutable;
    };
    check_mtu(ctx, p, fib, route)
}

/// Asks the FIB where the packet `p` would go with `src`/`dst` as its
/// addresses, arriving on `ifindex`; the helper's answer, with `fib`
/// filled in. No length is given: with one the kernel checks it against
/// the route's MTU and reports every GSO packet as too big, so callers
/// check the MTU themselves.
#[inline(always)]
pub fn fib_lookup<C: EbpfContext>(
    ctx: &C,
    fib: &mut FibParams,
    p: &Packet,
    (src, dst): (&[u8; 16], &[u8; 16]),
    ifindex: u32,
) -> i64 {
    pkt::zero_words(fib);
    fib.l4_protocol = p.proto;
    fib.sport = p.sport;
    fib.dport = p.dport;
    fib.__bindgen_anon_1.tot_len = 0;
    fib.ifindex = ifindex;
    if p.is_v6() {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = words(src);
        fib.__bindgen_anon_4.ipv6_dst = words(dst);
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([src[12], src[13], src[14], src[15]]);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[12], dst[13], dst[14], dst[15]]);
    }
    // SAFETY: fib is a valid, correctly sized bpf_fib_lookup.
    unsafe { bpf_fib_lookup(ctx.as_ptr(), fib, mem::size_of::<FibParams>() as i32, 0) }
}

/// `decide` for a packet of a known connection's half, whose next hop
/// `hop` caches: while the packet arrives on the device that asked, in the
/// same second of the datapath clock, the FIB is not asked again and only
/// the hop limit and the MTU are checked. Returns the route and whether
/// `hop` was rewritten (and should be stored with the half).
#[inline(always)]
pub fn decide_cached(
    ctx: &TcContext,
    p: &Packet,
    (src, dst): (&[u8; 16], &[u8; 16]),
    fib: &mut FibParams,
    hop: &mut NextHop,
    second: u32,
) -> (Route, bool) {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let in_ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if hop.ifindex != 0 && hop.second == second && hop.in_ifindex == in_ifindex && p.ttl > 1 {
        fib.ifindex = hop.ifindex;
        fib.dmac = hop.dmac;
        fib.smac = hop.smac;
        // What bpf_check_mtu finds for a packet within the MTU, without
        // the call; a bigger one (a GSO burst, or too big) gets the helper.
        if ctx.len().saturating_sub(p.l3_off as u32) <= hop.mtu {
            return (Route::Direct, false);
        }
        return (check_mtu(ctx, p, fib, Route::Direct), false);
    }
    let route = decide(ctx, p, src, dst, fib);
    // What is cached otherwise stays: it is for another second or device,
    // and is not used for this one.
    // SAFETY: the context pointer is valid for the program's lifetime.
    let in_ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    (route, remember(in_ifindex, route, fib, hop, second))
}

/// Caches in `hop` the next hop `decide` found for a packet that arrived
/// on `in_ifindex`, when it found one (Direct).
#[inline(always)]
pub fn remember(
    in_ifindex: u32,
    route: Route,
    fib: &FibParams,
    hop: &mut NextHop,
    second: u32,
) -> bool {
    if route != Route::Direct {
        return false;
    }
    hop.dmac = fib.dmac;
    hop.smac = fib.smac;
    hop.ifindex = fib.ifindex;
    hop.in_ifindex = in_ifindex;
    // SAFETY: on success without a length the kernel writes the egress
    // device's MTU here.
    hop.mtu = unsafe { fib.__bindgen_anon_1.mtu_result } as u32;
    hop.second = second;
    true
}

/// The MTU check of `decide` (step 3): `route` unless the packet, or one
/// of its GSO segments, is too big for the egress device `fib.ifindex`.
#[inline(always)]
fn check_mtu(ctx: &TcContext, p: &Packet, fib: &mut FibParams, route: Route) -> Route {
    let mut mtu: u32 = 0;
    // SAFETY: plain helper call; `mtu` is a valid u32 (0: measure the skb).
    let rc = unsafe { bpf_check_mtu(ctx.as_ptr(), fib.ifindex, &mut mtu, 0, BPF_MTU_CHK_SEGS) };
    // A positive answer is a verdict; a negative one means the helper could
    // not tell (a GSO skb whose headers it cannot measure), and the packet
    // goes on as the kernel's own forwarding would send it. An MTU no link
    // may have is never advertised.
    let min_mtu = if p.is_v6() { 1280 } else { 68 };
    if rc > 0 && mtu >= min_mtu {
        fib.__bindgen_anon_1.mtu_result = mtu as u16;
        return Route::TooBig;
    }
    route
}

/// Decrements the TTL, sets the MACs and redirects: the last step for a
/// packet that `decide` routed (Direct or Neighbour) and that has been
/// translated since.
#[inline(never)]
pub fn send(ctx: &TcContext, p: &Packet, route: Route, fib: &FibParams) -> i32 {
    if decrement_ttl(ctx, p).is_err() {
        return aya_ebpf::bindings::TC_ACT_SHOT as i32;
    }
    if route == Route::Direct {
        if write(ctx, 0, &fib.dmac).is_err() || write(ctx, 6, &fib.smac).is_err() {
            return aya_ebpf::bindings::TC_ACT_SHOT as i32;
        }
        // Into a local container: its ingress directly, skipping the
        // veth's transmit and the backlog queue on the far side.
        if maps::peer_port(fib.ifindex, &fib.smac) {
            // SAFETY: plain helper call; this program runs at TC ingress,
            // the only hook where the kernel honours it.
            return unsafe { bpf_redirect_peer(fib.ifindex, 0) } as i32;
        }
        // SAFETY: plain helper call.
        return unsafe { bpf_redirect(fib.ifindex, 0) } as i32;
    }
    // The next hop's MAC is not known yet: the neighbour subsystem resolves
    // it and sends the packet.
    // SAFETY: a plain C struct of integers.
    let mut nh: bpf_redir_neigh = unsafe { mem::zeroed() };
    if p.is_v6() {
        nh.nh_family = AF_INET6 as u32;
        nh.__bindgen_anon_1.ipv6_nh = unsafe { fib.__bindgen_anon_4.ipv6_dst };
    } else {
        nh.nh_family = AF_INET as u32;
        nh.__bindgen_anon_1.ipv4_nh = unsafe { fib.__bindgen_anon_4.ipv4_dst };
    }
    // SAFETY: nh is a valid bpf_redir_neigh of the size passed.
    let rc = unsafe {
        bpf_redirect_neigh(
            fib.ifindex,
            &mut nh,
            mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    };
    if rc == TC_ACT_REDIRECT as i64 {
        rc as i32
    } else {
        aya_ebpf::bindings::TC_ACT_SHOT as i32
    }
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

#[inline(always)]
fn decrement_ttl(ctx: &TcContext, p: &Packet) -> Result<(), ()> {
    let ttl = p.ttl;
    let l3 = p.l3_off as usize;
    if p.is_v6() {
        // No header checksum: let the kernel keep skb->csum in step.
        return ctx
            .store(
                l3 + 7,
                &(ttl - 1),
                aya_ebpf::bindings::BPF_F_RECOMPUTE_CSUM as u64,
            )
            .map_err(|_| ());
    }
    // The checksum covers TTL and protocol as one 16-bit word; the change
    // and the checksum's cancel out in skb->csum. The protocol is the
    // outer header's, which no translation changes.
    write(ctx, l3 + 8, &(ttl - 1))?;
    fix_csum(ctx, l3 + 10, delta(&[ttl, p.proto], &[ttl - 1, p.proto]))
}
