//! Rare events, reported through aya-log for `lbd --datapath-log`. Each is
//! called only where a packet is already being dropped or a flow could not
//! be tracked, never on the per-packet fast path, and is `inline(never)` so
//! that one copy serves every caller. With logging off (lbd's default) the
//! level global is 0, and the verifier, which sees it as a constant of
//! read-only data, removes the logging code itself.

use aya_ebpf::programs::TcContext;
use aya_log_ebpf::{error, info, warn};

use crate::parse::Packet;

/// A translation could not write the packet (e.g. its headers are not in
/// the linear part of the buffer): the packet is dropped.
#[inline(never)]
pub fn rewrite_failed(ctx: &TcContext, p: &Packet) {
    error!(
        ctx,
        "rewrite failed, packet dropped: {:i}:{} -> {:i}:{} proto {}",
        p.src,
        u16::from_be(p.sport),
        p.dst,
        u16::from_be(p.dport),
        p.proto
    );
}

/// Translating an ICMP error about a balanced flow failed.
#[inline(never)]
pub fn icmp_rewrite_failed(ctx: &TcContext, p: &Packet) {
    error!(
        ctx,
        "ICMP error translation failed, dropped: {:i} -> {:i}", p.src, p.dst
    );
}

/// Every SNAT port tried for a new flow was taken.
#[inline(never)]
pub fn snat_exhausted(ctx: &TcContext, p: &Packet, nat_addr: &[u8; 16]) {
    warn!(
        ctx,
        "no free SNAT port on {:i}, new flow dropped: {:i}:{} -> {:i}:{} proto {}",
        *nat_addr,
        p.src,
        u16::from_be(p.sport),
        p.dst,
        u16::from_be(p.dport),
        p.proto
    );
}

/// A connection could not be recorded (or confirmed) in conntrack.
#[inline(never)]
pub fn ct_insert_failed(ctx: &TcContext, p: &Packet) {
    warn!(
        ctx,
        "conntrack insert failed: {:i}:{} -> {:i}:{} proto {}",
        p.src,
        u16::from_be(p.sport),
        p.dst,
        u16::from_be(p.dport),
        p.proto
    );
}

/// An IPv4 packet without DF, bigger than the egress MTU: dropped, since
/// the datapath does not fragment.
#[inline(never)]
pub fn too_big_dropped(ctx: &TcContext, p: &Packet, mtu: u32) {
    info!(
        ctx,
        "packet over the egress MTU {} without DF, dropped: {:i} -> {:i}", mtu, p.src, p.dst
    );
}
