//! ICMP errors (docs/datapath.md, sections 5 and 7): translating the ones
//! about a balanced flow (RFC 5508), and sending our own when a packet
//! cannot be forwarded, quoting it as its sender sent it.
//!
//! Checksums here are computed with plain ones'-complement arithmetic
//! rather than the csum_replace helpers: the fields changed lie inside the
//! ICMP payload, where the helpers' skb->csum bookkeeping would be wrong,
//! and ICMP errors are never CHECKSUM_PARTIAL. Because every changed word
//! is compensated by a checksum inside the packet, the packet's total sum
//! does not change and skb->csum stays valid.

use aya_ebpf::{
    bindings::{BPF_F_RECOMPUTE_CSUM, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes},
    programs::TcContext,
};
use lb_common::{CtEntry, CT_REPLY, CT_SNAT, PROTO_TCP, PROTO_UDP};

use crate::{
    forward::Route,
    maps::Scratch,
    parse::{Packet, ETH_HLEN, IPPROTO_ICMP, IPPROTO_ICMPV6},
    pkt::{apply, delta, fold, sum16},
};

/// Bytes of the offending packet our own errors quote: its headers and the
/// start of its payload, as much as the receiver needs to match it.
pub const QUOTE_MAX: usize = 128;

/// Replaces an address at `off`, returning the delta of the words changed.
#[inline(always)]
fn set_addr(
    ctx: &TcContext,
    off: usize,
    old: &[u8; 16],
    new: &[u8; 16],
    v6: bool,
) -> Result<u64, ()> {
    if v6 {
        ctx.store(off, new, 0).map_err(|_| ())?;
        return Ok(delta(old, new));
    }
    let o = [old[12], old[13], old[14], old[15]];
    let n = [new[12], new[13], new[14], new[15]];
    ctx.store(off, &n, 0).map_err(|_| ())?;
    Ok(delta(&o, &n))
}

#[inline(always)]
fn set_u16(ctx: &TcContext, off: usize, old: u16, new: u16) -> Result<u64, ()> {
    ctx.store(off, &new.to_be_bytes(), 0).map_err(|_| ())?;
    Ok(delta(&old.to_be_bytes(), &new.to_be_bytes()))
}

#[inline(always)]
fn load_u16(ctx: &TcContext, off: usize) -> Result<u16, ()> {
    ctx.load::<[u8; 2]>(off)
        .map(u16::from_be_bytes)
        .map_err(|_| ())
}

/// The new addresses of an ICMP error about the connection `e` (found by
/// the quoted packet's reverse tuple), or None when the error does not fit
/// the connection.
#[inline(always)]
pub fn plan(p: &Packet, e: &CtEntry, s: &mut IcmpPlan) -> bool {
    if p.dst != p.inner.src {
        return false;
    }
    if e.flags & CT_REPLY != 0 {
        // About a packet sent to the backend; travels to the client.
        s.inner_src = e.client;
        s.inner_sport = e.client_port;
        s.inner_dst = e.frontend;
        s.inner_dport = e.frontend_port;
        s.outer_dst = e.client;
        s.outer_src = if p.src == e.backend {
            e.frontend
        } else {
            p.src
        };
    } else {
        // About a reply sent to the client; travels to the backend.
        s.inner_src = e.backend;
        s.inner_sport = e.backend_port;
        if e.flags & CT_SNAT != 0 {
            s.inner_dst = e.nat_addr;
            s.inner_dport = e.nat_port;
            s.outer_src = if p.src == e.client { e.nat_addr } else { p.src };
        } else {
            s.inner_dst = e.client;
            s.inner_dport = e.client_port;
            s.outer_src = p.src;
        }
        s.outer_dst = e.backend;
    }
    true
}

/// New addresses and ports for a translated ICMP error.
#[repr(C)]
pub struct IcmpPlan {
    pub outer_src: [u8; 16],
    pub outer_dst: [u8; 16],
    pub inner_src: [u8; 16],
    pub inner_dst: [u8; 16],
    pub inner_sport: u16,
    pub inner_dport: u16,
    pub _pad: u32,
}

/// Rewrites the ICMP error `p` according to `s`, every checksum included.
#[inline(never)]
pub fn translate(ctx: &TcContext, p: &Packet, s: &IcmpPlan) -> Result<(), ()> {
    let v6 = p.is_v6();
    let q = &p.inner;
    let ql3 = q.l3_off as usize;
    let ql4 = q.l4_off as usize;
    let (src_off, dst_off) = if v6 { (8, 24) } else { (12, 16) };
    let icmp_csum_off = p.l4_off as usize + 2;
    // The quoted packet's own checksums: its IPv4 header's, and its L4
    // checksum, which covers its addresses (pseudo-header) and ports.
    let mut l4_delta = set_addr(ctx, ql3 + src_off, &q.src, &s.inner_src, v6)?;
    l4_delta += set_addr(ctx, ql3 + dst_off, &q.dst, &s.inner_dst, v6)?;
    let mut icmp_delta = l4_delta;
    if !v6 {
        let old = load_u16(ctx, ql3 + 10)?;
        icmp_delta += set_u16(ctx, ql3 + 10, old, apply(old, l4_delta))?;
    }
    let ports = set_u16(ctx, ql4, u16::from_be(q.sport), u16::from_be(s.inner_sport))?
        + set_u16(
            ctx,
            ql4 + 2,
            u16::from_be(q.dport),
            u16::from_be(s.inner_dport),
        )?;
    icmp_delta += ports;
    if q.has_l4_csum != 0 {
        let off = ql4 + if q.proto == PROTO_TCP { 16 } else { 6 };
        let old = load_u16(ctx, off)?;
        // A UDP checksum of 0 means none (IPv4) and stays so.
        if !(q.proto == PROTO_UDP && old == 0) {
            let mut new = apply(old, l4_delta + ports);
            if q.proto == PROTO_UDP && new == 0 {
                new = 0xffff;
            }
            icmp_delta += set_u16(ctx, off, old, new)?;
        }
    }
    // The outer header: ICMPv6's checksum covers it (pseudo-header), the
    // IPv4 header checksum covers IPv4's.
    let l3 = p.l3_off as usize;
    let outer = set_addr(ctx, l3 + src_off, &p.src, &s.outer_src, v6)?
        + set_addr(ctx, l3 + dst_off, &p.dst, &s.outer_dst, v6)?;
    if v6 {
        icmp_delta += outer;
    } else {
        let old = load_u16(ctx, l3 + 10)?;
        set_u16(ctx, l3 + 10, old, apply(old, outer))?;
    }
    let old = load_u16(ctx, icmp_csum_off)?;
    set_u16(ctx, icmp_csum_off, old, apply(old, icmp_delta))?;
    Ok(())
}

/// Answers `p` (unchanged so far) with an ICMP error: time exceeded, or
/// fragmentation needed / packet too big with the egress MTU. The packet
/// becomes the error and goes back out of the interface it came in on.
#[inline(never)]
pub fn reply_error(ctx: &TcContext, s: &mut Scratch, route: Route, mtu: u32) -> i32 {
    match try_reply_error(ctx, s, route, mtu) {
        Ok(action) => {
            crate::maps::count(lb_common::global::ICMP_SENT);
            action
        }
        Err(()) => TC_ACT_SHOT as i32,
    }
}

#[inline(always)]
fn try_reply_error(ctx: &TcContext, s: &mut Scratch, route: Route, mtu: u32) -> Result<i32, ()> {
    let p = &s.pkt;
    let v6 = p.is_v6();
    let l3 = p.l3_off as usize;
    let ip_len = p.ip_end as usize - l3;
    let quote_len = if ip_len < QUOTE_MAX {
        ip_len
    } else {
        QUOTE_MAX
    };
    // The same value, in a form the verifier sees is within 1..=QUOTE_MAX
    // (a power of two); an IP packet is never empty.
    let quote_len = (quote_len.wrapping_sub(1) & (QUOTE_MAX - 1)) + 1;
    s.quote = [0; QUOTE_MAX];
    // The raw helper: aya's load_bytes would shorten the length to what
    // the packet holds, which the verifier cannot bound below.
    // SAFETY: the buffer holds QUOTE_MAX bytes and quote_len is at most that.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            l3 as u32,
            s.quote.as_mut_ptr().cast(),
            quote_len as u32,
        )
    };
    if rc != 0 {
        return Err(());
    }
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let mut eth = [0u8; 12];
    eth[..6].copy_from_slice(&macs[6..12]);
    eth[6..].copy_from_slice(&macs[..6]);
    // SAFETY: the context pointer is valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };

    let ip_hlen = if v6 { 40 } else { 20 };
    let icmp_len = 8 + quote_len;
    let new_len = ETH_HLEN + ip_hlen + icmp_len;
    // SAFETY: plain helper call on the program's own skb. It also drops
    // GSO state: the result is one small packet.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, new_len as u32, 0) } != 0 {
        return Err(());
    }
    let mut icmp = [0u8; 8];
    let too_big = route == Route::TooBig;
    icmp[0] = match (v6, too_big) {
        (false, true) => 3,   // destination unreachable...
        (false, false) => 11, // time exceeded
        (true, true) => 2,    // packet too big
        (true, false) => 3,   // time exceeded
    };
    icmp[1] = if !v6 && too_big { 4 } else { 0 }; // ...fragmentation needed
    if too_big {
        if v6 {
            icmp[4..8].copy_from_slice(&mtu.to_be_bytes());
        } else {
            icmp[6..8].copy_from_slice(&(mtu as u16).to_be_bytes());
        }
    }
    let mut quote_sum = 0u64;
    let mut i = 0;
    while i < QUOTE_MAX {
        quote_sum += u16::from_be_bytes([s.quote[i], s.quote[i + 1]]) as u64;
        i += 2;
    }
    let p = &s.pkt;
    // skb->csum (CHECKSUM_COMPLETE) covers the packet from the network
    // header on: the kernel keeps it in step for what is written there,
    // and the Ethernet header is outside it.
    let flags = BPF_F_RECOMPUTE_CSUM as u64;
    ctx.store(0, &eth, 0).map_err(|_| ())?;
    let csum = if v6 {
        let mut hdr = [0u8; 40];
        hdr[0] = 0x60;
        hdr[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
        hdr[6] = IPPROTO_ICMPV6;
        hdr[7] = 64;
        hdr[8..24].copy_from_slice(&p.dst);
        hdr[24..40].copy_from_slice(&p.src);
        ctx.store(ETH_HLEN, &hdr, flags).map_err(|_| ())?;
        // Pseudo-header: both addresses, the length and the next header.
        let mut pseudo = [0u8; 8];
        pseudo[2..4].copy_from_slice(&(icmp_len as u16).to_be_bytes());
        pseudo[7] = IPPROTO_ICMPV6;
        !fold(sum16(&p.dst) + sum16(&p.src) + sum16(&pseudo) + sum16(&icmp) + quote_sum)
    } else {
        let mut hdr = [0u8; 20];
        hdr[0] = 0x45;
        hdr[1] = 0xc0;
        hdr[2..4].copy_from_slice(&((20 + icmp_len) as u16).to_be_bytes());
        hdr[8] = 64;
        hdr[9] = IPPROTO_ICMP;
        hdr[12..16].copy_from_slice(&p.dst[12..16]);
        hdr[16..20].copy_from_slice(&p.src[12..16]);
        let ip_csum = !fold(sum16(&hdr));
        hdr[10..12].copy_from_slice(&ip_csum.to_be_bytes());
        ctx.store(ETH_HLEN, &hdr, flags).map_err(|_| ())?;
        !fold(sum16(&icmp) + quote_sum)
    };
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    let icmp_off = ETH_HLEN + ip_hlen;
    ctx.store(icmp_off, &icmp, flags).map_err(|_| ())?;
    // SAFETY: the buffer holds QUOTE_MAX bytes and quote_len is at most that.
    let rc = unsafe {
        bpf_skb_store_bytes(
            ctx.skb.skb.cast(),
            (icmp_off + 8) as u32,
            s.quote.as_ptr().cast(),
            quote_len as u32,
            flags,
        )
    };
    if rc != 0 {
        return Err(());
    }
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
}
