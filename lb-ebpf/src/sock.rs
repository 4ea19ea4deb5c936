//! Socket-level balancing of network-scoped addresses (Swarm service VIPs,
//! FLAG_SOCKET): cgroup hooks, for IPv4 and dual-stack IPv6 sockets, that
//! rewrite the address a socket connects or sends to, before the kernel
//! routes anything. A connection to a VIP then
//! is a plain connection to a task: no per-packet work, no conntrack, and
//! no need for the VIP to answer ARP on the overlay (nothing owns it).
//!
//! Only sockets of network namespaces that are members of the address's
//! network (SOCK_MEMBERS, keyed by the namespace's cookie) are balanced:
//! a VIP means something on its own network only. The reverse map makes
//! `getpeername` and a datagram's source show the VIP again.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use lb_common::{
    global, v4_mapped, MemberKey, ServiceKey, SockRevKey, SockRevValue, FLAG_SOCKET, PROTO_TCP,
    PROTO_UDP,
};

use crate::lb;
use crate::maps::{
    add_stats, count, BACKEND_STATS, SERVICES, SERVICE_STATS, SOCK_MEMBERS, SOCK_REVNAT,
};

/// Let the call proceed (with whatever the program rewrote).
const PROCEED: i32 = 1;
/// Fail the call with EPERM.
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn lb_sock_connect4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, Family::V4)
}

/// Unconnected UDP: each datagram sent to the VIP.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, Family::V4)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    from_backend(&ctx, Family::V4);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    from_backend(&ctx, Family::V4);
    PROCEED
}

/// The same for dual-stack sockets (AF_INET6, as Java and others open
/// them) reaching a VIP as `::ffff:a.b.c.d`.
#[cgroup_sock_addr(connect6)]
pub fn lb_sock_connect6(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, Family::V4MappedV6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx, Family::V4MappedV6)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    from_backend(&ctx, Family::V4MappedV6);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    from_backend(&ctx, Family::V4MappedV6);
    PROCEED
}

/// Where the IPv4 address is in the context.
#[derive(Clone, Copy)]
enum Family {
    /// `user_ip4`.
    V4,
    /// The last word of `user_ip6`, when the first three are `::ffff:`.
    V4MappedV6,
}

/// `::ffff:0:0/96`'s first three words, as they lie in memory.
const MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

/// The IPv4 address a socket names, if it names one.
#[inline(always)]
fn ipv4_of(sa: &bpf_sock_addr, family: Family) -> Option<u32> {
    match family {
        Family::V4 => Some(sa.user_ip4),
        Family::V4MappedV6 => {
            // Word by word: the context allows only 4-byte accesses here.
            let ip6 = &sa.user_ip6;
            (ip6[0] == MAPPED_PREFIX[0] && ip6[1] == MAPPED_PREFIX[1] && ip6[2] == MAPPED_PREFIX[2])
                .then_some(ip6[3])
        }
    }
}

#[inline(always)]
fn set_ipv4(sa: &mut bpf_sock_addr, family: Family, addr: u32) {
    match family {
        Family::V4 => sa.user_ip4 = addr,
        Family::V4MappedV6 => sa.user_ip6[3] = addr,
    }
}

#[inline(always)]
fn to_backend(ctx: &SockAddrContext, family: Family) -> i32 {
    // SAFETY: the context the kernel passed; these fields are readable and
    // writable in connect and sendmsg programs.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol;
    if proto != u32::from(PROTO_TCP) && proto != u32::from(PROTO_UDP) {
        return PROCEED;
    }
    let Some(vip) = ipv4_of(sa, family) else {
        return PROCEED;
    };
    let port = sa.user_port as u16;
    let key = ServiceKey {
        addr: v4_mapped(vip.to_ne_bytes()),
        port: 0,
        proto: proto as u8,
        _pad: 0,
    };
    // SAFETY: plain data, written whole by the reconciler.
    let Some(svc) = (unsafe { SERVICES.get(&key) }) else {
        return PROCEED;
    };
    if svc.flags & FLAG_SOCKET == 0 {
        return PROCEED;
    }
    let member = MemberKey {
        // SAFETY: a helper the sock_addr program type may call.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        network: svc.network,
        _pad: 0,
    };
    // SAFETY: plain data.
    if unsafe { SOCK_MEMBERS.get(&member) }.is_none() {
        return PROCEED;
    }
    // SAFETY: as above.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // One backend per socket, whatever it sends: an unconnected UDP socket
    // keeps talking to the task that answered it while the ring holds.
    let hash = mix64(socket_cookie);
    let Some((id, backend)) = lb::maglev(svc, hash) else {
        add_stats(SERVICE_STATS.get_ptr_mut(svc.slot), |st| st.no_backend += 1);
        count(global::SOCK_REFUSED);
        return REFUSE;
    };
    let addr = u32::from_ne_bytes([
        backend.addr[12],
        backend.addr[13],
        backend.addr[14],
        backend.addr[15],
    ]);
    let backend_port = if backend.port == 0 {
        port
    } else {
        backend.port
    };
    set_ipv4(sa, family, addr);
    sa.user_port = u32::from(backend_port);
    let rev_key = SockRevKey {
        socket_cookie,
        backend_addr: addr,
        backend_port,
        proto: proto as u8,
        _pad: 0,
    };
    let rev = SockRevValue { vip, port, _pad: 0 };
    // A datagram socket sends many times to one place: write (and count)
    // only what is new.
    // SAFETY: plain data.
    if unsafe { SOCK_REVNAT.get(&rev_key) } != Some(&rev) {
        let _ = SOCK_REVNAT.insert(&rev_key, &rev, 0);
        add_stats(SERVICE_STATS.get_ptr_mut(svc.slot), |st| st.new_flows += 1);
        add_stats(BACKEND_STATS.get_ptr_mut(&id), |st| st.new_flows += 1);
    }
    count(global::SOCK_TRANSLATED);
    PROCEED
}

/// Shows the VIP where the kernel would show the backend.
#[inline(always)]
fn from_backend(ctx: &SockAddrContext, family: Family) {
    // SAFETY: the context the kernel passed; writable in recvmsg and
    // getpeername programs.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol;
    if proto != u32::from(PROTO_TCP) && proto != u32::from(PROTO_UDP) {
        return;
    }
    let Some(backend_addr) = ipv4_of(sa, family) else {
        return;
    };
    let key = SockRevKey {
        // SAFETY: a helper the sock_addr program type may call.
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend_addr,
        backend_port: sa.user_port as u16,
        proto: proto as u8,
        _pad: 0,
    };
    // SAFETY: plain data.
    if let Some(rev) = unsafe { SOCK_REVNAT.get(&key) } {
        set_ipv4(sa, family, rev.vip);
        sa.user_port = u32::from(rev.port);
    }
}

/// MurmurHash3's 64-bit finaliser: cookies are consecutive numbers (and
/// every socket in between takes one), which must still spread evenly over
/// the ring.
#[inline(always)]
fn mix64(mut h: u64) -> u32 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h as u32
}
