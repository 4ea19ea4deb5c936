//! The load balancer's datapath: a TC ingress classifier attached to every
//! interface of the node. A packet for a frontend is DNATed to a backend
//! chosen by Maglev and remembered in CONNTRACK; a backend's reply is
//! translated back to the frontend address through REVNAT. Everything else
//! passes untouched.
//!
//! Built for the BPF target by lb-userspace's build script; a host build
//! (`cargo build --workspace`) only checks that it compiles.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod forward;
mod maps;
mod nat;
mod parse;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_ktime_get_ns,
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    global, AffinityEntry, AffinityKey, Backend, CtEntry, FlowKey, RevNatEntry, ServiceKey,
    ServiceValue, TrafficStats, BACKEND_ACTIVE, BACKEND_DOWN, FLAG_FULLNAT, FLAG_LOCAL_VIP,
    MAGLEV_M,
};

/// Full NAT source ports: above the well-known range.
const SNAT_PORT_MIN: u16 = 1024;
const SNAT_PORTS: u32 = 65536 - SNAT_PORT_MIN as u32;
/// Candidate ports tried for a new flow before giving up.
const SNAT_ATTEMPTS: u32 = 8;
const TRACK_FAILED: u32 = u32::MAX;

use maps::{
    count, AFFINITY, BACKENDS, BACKEND_STATS, CONNTRACK, REVNAT, RINGS, SERVICES, SERVICE_STATS,
};
use nat::Side;
use parse::{Packet, Parsed};

#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    count(global::SEEN);
    let mut p = Packet::zeroed();
    match parse::parse(&ctx, &mut p) {
        Parsed::Candidate => handle(&ctx, &p),
        Parsed::Other => TC_ACT_OK as i32,
        Parsed::Fragment => {
            count(global::FRAGMENTS);
            TC_ACT_OK as i32
        }
        Parsed::Malformed => {
            count(global::MALFORMED);
            TC_ACT_OK as i32
        }
    }
}

/// Does nothing but pass: the floor that benchmarks compare the datapath with.
#[classifier]
pub fn lb_tc_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

#[inline(always)]
fn handle(ctx: &TcContext, p: &Packet) -> i32 {
    let key = ServiceKey {
        addr: p.dst,
        port: p.dport,
        proto: p.proto,
        _pad: 0,
    };
    // SAFETY: values are plain data; a concurrent update can only make us
    // read a whole old or whole new entry of this size-aligned value.
    if let Some(svc) = unsafe { SERVICES.get(&key) } {
        return to_backend(ctx, p, svc);
    }
    let flow = flow_key(p);
    if let Some(rev) = REVNAT.get_ptr_mut(&flow) {
        // SAFETY: pointer from a successful lookup.
        return to_client(ctx, p, unsafe { &mut *rev });
    }
    TC_ACT_OK as i32
}

#[inline(always)]
fn flow_key(p: &Packet) -> FlowKey {
    FlowKey {
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        _pad: [0; 3],
    }
}

/// Client -> frontend: find or pick the backend, DNAT (and with full NAT,
/// SNAT), forward.
#[inline(never)]
fn to_backend(ctx: &TcContext, p: &Packet, svc: &ServiceValue) -> i32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let flow = flow_key(p);
    let fullnat = svc.flags & FLAG_FULLNAT != 0;
    let mut new_flow = false;
    let mut chosen: Option<(u32, &Backend)> = None;
    let mut snat_port = 0u16;
    if let Some(ct) = CONNTRACK.get_ptr_mut(&flow) {
        // SAFETY: pointer from a successful lookup.
        let ct = unsafe { &mut *ct };
        match unsafe { BACKENDS.get(&ct.backend_id) } {
            // The backend must still exist and still belong to this service
            // (the slot may have been given to another service since).
            Some(b) if b.service_slot == svc.slot && b.state != BACKEND_DOWN => {
                ct.last_seen_ns = now;
                snat_port = ct.snat_port;
                chosen = Some((ct.backend_id, b));
            }
            _ => count(global::CT_STALE),
        }
    }
    if chosen.is_none() {
        chosen = pick(svc, &flow);
        new_flow = true;
    }
    let Some((backend_id, backend)) = chosen else {
        add_stats(service_stats(svc.slot), |s| s.no_backend += 1);
        return if svc.flags & FLAG_LOCAL_VIP != 0 {
            TC_ACT_OK as i32
        } else {
            TC_ACT_SHOT as i32
        };
    };
    if new_flow {
        match track(p, svc, &flow, backend_id, backend) {
            TRACK_FAILED => return TC_ACT_SHOT as i32,
            port => snat_port = port as u16,
        }
    }
    let backend_addr = backend.addr;
    let backend_port = backend.port;
    if nat::rewrite(ctx, p, Side::Destination, &backend_addr, backend_port).is_err()
        || (fullnat && nat::rewrite(ctx, p, Side::Source, &svc.snat_addr, snat_port).is_err())
    {
        count(global::REWRITE_ERRORS);
        return TC_ACT_SHOT as i32;
    }
    count(global::TRANSLATED);
    let bytes = ctx.len() as u64;
    let update = |s: &mut TrafficStats| {
        s.packets += 1;
        s.bytes += bytes;
        if new_flow {
            s.new_flows += 1;
        }
    };
    add_stats(service_stats(svc.slot), update);
    add_stats(BACKEND_STATS.get_ptr_mut(&backend_id), update);
    let src = if fullnat { &svc.snat_addr } else { &p.src };
    forward::forward(ctx, p, src, &backend_addr)
}

/// Records a new flow in CONNTRACK and REVNAT. With full NAT it also picks
/// the source port towards the backend: one whose reply flow is not in use,
/// claimed atomically with BPF_NOEXIST. Returns that port (0 without full
/// NAT) or TRACK_FAILED. A separate BPF function, so that its entries are not
/// on the stack while the caller rewrites the packet; hence also a plain
/// integer result (a BPF call takes at most five arguments, and a Result
/// would need a sixth, hidden one).
#[inline(never)]
fn track(
    p: &Packet,
    svc: &ServiceValue,
    flow: &FlowKey,
    backend_id: u32,
    backend: &Backend,
) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let fullnat = svc.flags & FLAG_FULLNAT != 0;
    let rev = RevNatEntry {
        frontend_addr: p.dst,
        client_addr: p.src,
        frontend_port: p.dport,
        client_port: p.sport,
        service_slot: svc.slot,
        backend_id,
        flags: svc.flags & FLAG_FULLNAT,
        last_seen_ns: now,
    };
    let mut reply = FlowKey {
        src: backend.addr,
        dst: p.src,
        sport: backend.port,
        dport: p.sport,
        proto: p.proto,
        _pad: [0; 3],
    };
    let mut snat_port = 0u16;
    if fullnat {
        reply.dst = svc.snat_addr;
        let seed = flow_hash(flow);
        let mut claimed = false;
        let mut attempt = 0u32;
        while attempt < SNAT_ATTEMPTS {
            let port =
                SNAT_PORT_MIN + (seed.wrapping_add(attempt.wrapping_mul(7919)) % SNAT_PORTS) as u16;
            reply.dport = port.to_be();
            if REVNAT.insert(&reply, &rev, BPF_NOEXIST as u64).is_ok() {
                snat_port = port.to_be();
                claimed = true;
                break;
            }
            attempt += 1;
        }
        if !claimed {
            count(global::SNAT_EXHAUSTED);
            return TRACK_FAILED;
        }
    } else if REVNAT.insert(&reply, &rev, 0).is_err() {
        count(global::REWRITE_ERRORS);
        return TRACK_FAILED;
    }
    let ct = CtEntry {
        backend_id,
        service_slot: svc.slot,
        last_seen_ns: now,
        snat_port,
        _pad: [0; 6],
    };
    // An LRU map only fails here under memory pressure; the next packet retries.
    if CONNTRACK.insert(flow, &ct, 0).is_err() {
        count(global::REWRITE_ERRORS);
        return TRACK_FAILED;
    }
    snat_port as u32
}

/// Backend -> client: restore the frontend as the source (and with full NAT
/// the client as the destination), forward.
#[inline(never)]
fn to_client(ctx: &TcContext, p: &Packet, rev: &mut RevNatEntry) -> i32 {
    rev.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    let fullnat = rev.flags & FLAG_FULLNAT != 0;
    let frontend_addr = rev.frontend_addr;
    let client_addr = rev.client_addr;
    if nat::rewrite(ctx, p, Side::Source, &frontend_addr, rev.frontend_port).is_err()
        || (fullnat
            && nat::rewrite(ctx, p, Side::Destination, &client_addr, rev.client_port).is_err())
    {
        count(global::REWRITE_ERRORS);
        return TC_ACT_SHOT as i32;
    }
    count(global::TRANSLATED);
    let bytes = ctx.len() as u64;
    let update = |s: &mut TrafficStats| {
        s.reply_packets += 1;
        s.reply_bytes += bytes;
    };
    add_stats(service_stats(rev.service_slot), update);
    add_stats(BACKEND_STATS.get_ptr_mut(&rev.backend_id), update);
    let dst = if fullnat { &client_addr } else { &p.dst };
    forward::forward(ctx, p, &frontend_addr, dst)
}

/// A new flow's backend: the client's previous one while affinity holds,
/// else Maglev (the flow's hash selects a slot of the service's live ring).
#[inline(always)]
fn pick(svc: &ServiceValue, flow: &FlowKey) -> Option<(u32, &'static Backend)> {
    if svc.backend_count == 0 {
        return None;
    }
    if svc.affinity_ns == 0 {
        return maglev(svc, flow);
    }
    let key = AffinityKey {
        service_slot: svc.slot,
        client: flow.src,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(entry) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: pointer from a successful lookup.
        let entry = unsafe { &mut *entry };
        if now.saturating_sub(entry.last_ns) < svc.affinity_ns {
            if let Some(b) = usable(svc, entry.backend_id) {
                entry.last_ns = now;
                return Some((entry.backend_id, b));
            }
        }
    }
    let chosen = maglev(svc, flow)?;
    let entry = AffinityEntry {
        backend_id: chosen.0,
        _pad: 0,
        last_ns: now,
    };
    let _ = AFFINITY.insert(&key, &entry, 0);
    Some(chosen)
}

#[inline(always)]
fn usable(svc: &ServiceValue, id: u32) -> Option<&'static Backend> {
    // SAFETY: plain data, see `handle`.
    let backend = unsafe { BACKENDS.get(&id) }?;
    (backend.state == BACKEND_ACTIVE && backend.service_slot == svc.slot).then_some(backend)
}

#[inline(always)]
fn maglev(svc: &ServiceValue, flow: &FlowKey) -> Option<(u32, &'static Backend)> {
    let slot = flow_hash(flow) % MAGLEV_M;
    let id = *RINGS.get(svc.ring.checked_mul(MAGLEV_M)?.checked_add(slot)?)?;
    Some((id, usable(svc, id)?))
}

/// A well-mixed hash of the 5-tuple (murmur3's finaliser over each word),
/// so flows that differ only in the source port spread over the ring.
#[inline(never)]
fn flow_hash(f: &FlowKey) -> u32 {
    let mut h: u32 = 0x9747_b28c;
    let mut i = 0;
    while i < 16 {
        h = mix(
            h,
            u32::from_ne_bytes([f.src[i], f.src[i + 1], f.src[i + 2], f.src[i + 3]]),
        );
        h = mix(
            h,
            u32::from_ne_bytes([f.dst[i], f.dst[i + 1], f.dst[i + 2], f.dst[i + 3]]),
        );
        i += 4;
    }
    h = mix(h, (f.sport as u32) << 16 | f.dport as u32);
    h = mix(h, f.proto as u32);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn service_stats(slot: u32) -> Option<*mut TrafficStats> {
    SERVICE_STATS.get_ptr_mut(slot)
}

#[inline(always)]
fn add_stats(stats: Option<*mut TrafficStats>, f: impl FnOnce(&mut TrafficStats)) {
    if let Some(s) = stats {
        // SAFETY: per-CPU value from a successful lookup.
        f(unsafe { &mut *s });
    }
}

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
