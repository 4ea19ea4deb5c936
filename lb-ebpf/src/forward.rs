//! Sending a translated packet on its way.
//!
//! The FIB is asked for the next hop and the packet is redirected straight
//! to the egress device. This skips the host's netfilter FORWARD and nat
//! chains (on a Docker host, FORWARD drops by default and POSTROUTING
//! masquerades container traffic), so both directions of a balanced flow are
//! handled by the datapath alone. When the FIB cannot decide (no route,
//! forwarding disabled, packet too big, a VLAN tag) the packet goes to the
//! kernel stack instead, already translated, and the kernel does what it
//! would do for any routed packet.

use core::mem;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, bpf_redir_neigh, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_REDIRECT,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
    EbpfContext,
};
use lb_common::global;

use crate::{maps::count, parse::Packet};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// `src`/`dst` are the packet's addresses after translation.
// A separate BPF function: its stack frame is not live while the
// caller's large locals are, which keeps the program within 512 bytes.
#[inline(never)]
pub fn forward(ctx: &TcContext, p: &Packet, src: &[u8; 16], dst: &[u8; 16]) -> i32 {
    match try_redirect(ctx, p, src, dst) {
        Some(action) => {
            count(global::REDIRECTED);
            action
        }
        None => {
            count(global::PASSED_TO_STACK);
            TC_ACT_OK as i32
        }
    }
}

#[inline(always)]
fn try_redirect(ctx: &TcContext, p: &Packet, src: &[u8; 16], dst: &[u8; 16]) -> Option<i32> {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let skb = unsafe { &*ctx.skb.skb };
    if p.vlan || skb.vlan_present != 0 {
        return None;
    }
    // A packet whose hop limit runs out here must reach the stack so that it
    // answers with ICMP time exceeded.
    let ttl_off = p.l3_off + if p.v6 { 7 } else { 8 };
    let ttl: u8 = ctx.load(ttl_off).ok()?;
    if ttl <= 1 {
        return None;
    }

    // SAFETY: a plain C struct of integers and unions of integers.
    let mut fib: FibParams = unsafe { mem::zeroed() };
    fib.l4_protocol = p.proto;
    fib.sport = p.sport;
    fib.dport = p.dport;
    fib.__bindgen_anon_1.tot_len = p.tot_len;
    fib.ifindex = skb.ingress_ifindex;
    if p.v6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = words(src);
        fib.__bindgen_anon_4.ipv6_dst = words(dst);
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([src[12], src[13], src[14], src[15]]);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[12], dst[13], dst[14], dst[15]]);
    }
    // SAFETY: fib is a valid, correctly sized bpf_fib_lookup.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return None;
    }
    decrement_ttl(ctx, p, ttl).ok()?;
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&fib.dmac);
        macs[6..].copy_from_slice(&fib.smac);
        ctx.store(0, &macs, 0).ok()?;
        // SAFETY: plain helper call.
        Some(unsafe { bpf_redirect(fib.ifindex, 0) } as i32)
    } else {
        // The next hop's MAC is not known yet: let the neighbour subsystem
        // resolve it and send the packet.
        // SAFETY: a plain C struct of integers.
        let mut nh: bpf_redir_neigh = unsafe { mem::zeroed() };
        if p.v6 {
            nh.nh_family = AF_INET6 as u32;
            nh.__bindgen_anon_1.ipv6_nh = unsafe { fib.__bindgen_anon_4.ipv6_dst };
        } else {
            nh.nh_family = AF_INET as u32;
            nh.__bindgen_anon_1.ipv4_nh = unsafe { fib.__bindgen_anon_4.ipv4_dst };
        }
        let rc = unsafe {
            bpf_redirect_neigh(
                fib.ifindex,
                &mut nh,
                mem::size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        };
        if rc == TC_ACT_REDIRECT as i64 {
            Some(rc as i32)
        } else {
            None
        }
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
fn decrement_ttl(ctx: &TcContext, p: &Packet, ttl: u8) -> Result<(), ()> {
    if p.v6 {
        return ctx.store(p.l3_off + 7, &(ttl - 1), 0).map_err(|_| ());
    }
    // The checksum covers TTL and protocol as one 16-bit word.
    let old = u16::from_ne_bytes([ttl, p.proto]);
    let new = u16::from_ne_bytes([ttl - 1, p.proto]);
    ctx.store(p.l3_off + 8, &(ttl - 1), 0).map_err(|_| ())?;
    ctx.l3_csum_replace(p.l3_off + 10, old as u64, new as u64, 2)
        .map_err(|_| ())
}
