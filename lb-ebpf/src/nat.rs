//! Address and port rewriting with checksum fix-ups for TCP and UDP.
//!
//! The kernel's l4_csum_replace helper is used for the L4 checksum rather
//! than our own arithmetic because it knows the skb's checksum state: a
//! CHECKSUM_PARTIAL skb (locally generated, e.g. from a container over a
//! veth) must have only its pseudo-header part adjusted, and a
//! CHECKSUM_COMPLETE one needs skb->csum kept in step. The IPv4 header
//! checksum is never partial, and a change it compensates leaves skb->csum
//! as it was, so it is adjusted in place.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    helpers::{bpf_csum_diff, bpf_csum_update},
    programs::TcContext,
};
use lb_common::PROTO_UDP;

use crate::{
    parse::Packet,
    pkt::{delta, fix_csum, read, write},
};

/// Which side of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum Side {
    Source,
    Destination,
}

#[inline(always)]
fn l4_flags(p: &Packet) -> u64 {
    // A UDP checksum of 0 means "none" over IPv4: leave it at 0, and never
    // produce 0 from a real sum.
    if p.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

/// Rewrites one address and port of `p` to `addr`/`port` (port in network
/// byte order), keeping the IP and L4 checksums valid.
// A separate BPF function: its stack frame is not live while the
// caller's large locals are, which keeps the program within 512 bytes.
#[inline(never)]
pub fn rewrite(
    ctx: &TcContext,
    p: &Packet,
    side: Side,
    addr: &[u8; 16],
    port: u16,
) -> Result<(), ()> {
    let (old_addr, old_port) = match side {
        Side::Source => (&p.src, p.sport),
        Side::Destination => (&p.dst, p.dport),
    };
    let csum_off = p.csum_off();
    let flags = l4_flags(p);
    let l3 = p.l3_off as usize;
    if p.is_v6() {
        let addr_off = l3 + if matches!(side, Side::Source) { 8 } else { 24 };
        let mut from = *old_addr;
        let mut to = *addr;
        // SAFETY: both buffers are 16 bytes on the stack, the sizes passed.
        let diff =
            unsafe { bpf_csum_diff(from.as_mut_ptr().cast(), 16, to.as_mut_ptr().cast(), 16, 0) };
        if diff < 0 {
            return Err(());
        }
        write(ctx, addr_off, addr)?;
        ctx.l4_csum_replace(csum_off, 0, diff as u64, flags | BPF_F_PSEUDO_HDR as u64)
            .map_err(|_| ())?;
        // IPv6 has no header checksum, so the address change and the L4
        // checksum change cancel out in skb->csum (CHECKSUM_COMPLETE); the
        // helper above subtracted the difference from it as it would for
        // IPv4. Add it back (a no-op in any other checksum state). Kernels
        // from 6.16 offer BPF_F_IPV6 instead; this works on older ones too.
        // SAFETY: plain helper call on the program's own skb.
        unsafe { bpf_csum_update(ctx.skb.skb, diff as u32) };
    } else {
        let addr_off = l3 + if matches!(side, Side::Source) { 12 } else { 16 };
        let old4 = [old_addr[12], old_addr[13], old_addr[14], old_addr[15]];
        let new4 = [addr[12], addr[13], addr[14], addr[15]];
        write(ctx, addr_off, &new4)?;
        // The header checksum is always complete: plain arithmetic, no helper.
        fix_csum(ctx, l3 + 10, delta(&old4, &new4))?;
        let from = u32::from_ne_bytes(old4);
        let to = u32::from_ne_bytes(new4);
        ctx.l4_csum_replace(
            csum_off,
            from as u64,
            to as u64,
            flags | BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .map_err(|_| ())?;
    }
    if old_port != port {
        let port_off = p.l4_off as usize + if matches!(side, Side::Source) { 0 } else { 2 };
        // An IPv4 UDP datagram without a checksum (0): no checksum field
        // compensates the new port, so the kernel must fold it into
        // skb->csum itself (CHECKSUM_COMPLETE).
        let no_csum = p.proto == PROTO_UDP && !p.is_v6() && read::<u16, _>(ctx, csum_off) == Ok(0);
        if no_csum {
            return ctx
                .store(port_off, &port, BPF_F_RECOMPUTE_CSUM as u64)
                .map_err(|_| ());
        }
        write(ctx, port_off, &port)?;
        ctx.l4_csum_replace(csum_off, old_port as u64, port as u64, flags | 2)
            .map_err(|_| ())?;
    }
    Ok(())
}
