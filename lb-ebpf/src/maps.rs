//! Every map of the datapath, with its key, its value and its writer.
//! Userspace (the reconciler in lbd) is the only writer of SERVICES,
//! BACKENDS, RINGS and CONFIG; the datapath writes the conntrack tables,
//! AFFINITY and the statistics, and lbd's garbage collector deletes expired
//! conntrack entries. Sizes here are defaults: lbd sets the real ones at
//! load time.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_F_MMAPABLE},
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use lb_common::{
    global, AffinityEntry, AffinityKey, Backend, Config, CtEntry, FlowKey, MemberKey, ServiceKey,
    ServiceValue, SockRevKey, SockRevValue, TrafficStats, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_FLOWS,
    DEFAULT_MAX_SERVICES, MAGLEV_M, MAX_MEMBERS, RINGS_PER_SERVICE, RING_IDS_PER_ENTRY,
};
use lb_common::{prefilter_bit, PREFILTER_MAX_BITS, PREFILTER_MIN_BITS};

use crate::parse::Packet;

/// Frontend (address, port, protocol) -> service slot, live ring, backend
/// count, flags. Written by the reconciler.
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Backend id -> address, port, state and owning service slot. Written by
/// the reconciler. Ids are never reused while the maps live, so a conntrack
/// entry cannot outlive its backend and silently point at a different one.
#[map]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Maglev lookup tables, flattened: backend ids, two to an element (see
/// RING_IDS_PER_ENTRY); a service's table is the `ring_size` ids from its
/// `ring`. Written by the reconciler, which maps the array
/// into its memory (BPF_F_MMAPABLE) to write whole tables without a syscall
/// per entry.
#[map]
pub static RINGS: Array<[u32; RING_IDS_PER_ENTRY as usize]> = Array::with_max_entries(
    (DEFAULT_MAX_SERVICES * RINGS_PER_SERVICE * MAGLEV_M).div_ceil(RING_IDS_PER_ENTRY),
    BPF_F_MMAPABLE,
);

/// Confirmed connections: both halves of each (see `CtEntry`), keyed by
/// the tuple each direction arrives with. Written by the datapath; expired
/// entries are deleted by lbd. Separate from CT_PENDING so that a flood of
/// connections that never complete (spoofed SYNs) can only evict each
/// other, never an established connection.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(2 * DEFAULT_MAX_FLOWS, 0);

/// Connections not confirmed yet (TCP before the client's first ACK after
/// the backend answered; UDP before the backend answered), both halves.
/// Written by the datapath.
#[map]
pub static CT_PENDING: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// (service slot, client address) -> the backend of the client's latest
/// new flow, for services with session affinity. Written by the datapath.
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// (network namespace cookie, network) -> 1: which namespaces may use the
/// socket-balanced addresses of which network (see FLAG_SOCKET). Written
/// by the reconciler.
#[map]
pub static SOCK_MEMBERS: HashMap<MemberKey, u8> = HashMap::with_max_entries(MAX_MEMBERS, 0);

/// (socket cookie, backend address and port, protocol) -> the virtual
/// address and port the socket asked for, so that `getpeername` and the
/// source of a received datagram show the address the application used.
/// Written by the socket programs; the LRU forgets closed sockets.
#[map]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// A bit per (address, port) hash (`lb_common::prefilter_bit`), set for
/// every frontend and every backend: the packets whose destination and
/// source both miss it are for no service and from no backend, and pass
/// without a lookup. Written by the reconciler through a shared mapping;
/// its size is `Config::prefilter_bits`. Two 32-bit words to an element,
/// bit b in word b / 32: the kernel lays array elements out 8 bytes apart,
/// so the shared mapping reads as one flat run of words.
#[map]
pub static PREFILTER: Array<[u32; 2]> =
    Array::with_max_entries((1 << lb_common::PREFILTER_MIN_BITS) / 64, BPF_F_MMAPABLE);

/// One entry: timeouts, the SNAT port range and the clock. Written by lbd.
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Per-CPU counters per service slot. The datapath counts; the reconciler
/// zeroes a slot when it gives it to a new service.
#[map]
pub static SERVICE_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Per-CPU counters per backend id (entries created by the reconciler).
#[map]
pub static BACKEND_STATS: PerCpuHashMap<u32, TrafficStats> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Per-CPU datapath-wide counters, indexed by `lb_common::global`.
#[map]
pub static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(global::COUNT, 0);

/// Egress interfaces the XDP program may redirect frames to, by ifindex
/// (the value names the same device). Written by lbd: the interfaces it
/// attached the XDP program to. Not pinned: it describes one lbd's
/// attachments and is filled before the program is attached.
#[map]
pub static XDP_PORTS: DevMapHash = DevMapHash::with_max_entries(lb_common::MAX_XDP_PORTS, 0);

/// Veths of lbd's namespace whose peer is in another namespace (a local
/// container's): ifindex -> the veth's own MAC. A packet routed out of one
/// is handed straight to the peer's ingress (`bpf_redirect_peer`) instead
/// of being transmitted on the veth. The MAC must match the FIB's source
/// MAC too, because the program also runs in namespaces lbd attached to
/// (Swarm's ingress_sbox), where the same ifindex may name another device.
/// Written by lbd from rtnetlink link events. Not pinned: it describes
/// the devices one lbd saw, and a new lbd fills it before its first packet.
#[map]
pub static PEER_PORTS: HashMap<u32, [u8; 6]> =
    HashMap::with_max_entries(lb_common::MAX_PEER_PORTS, 0);

/// Per-CPU counters of the XDP program, indexed by `lb_common::xdp_stat`.
/// Not pinned: they count for the program of one lbd.
#[map]
pub static XDP_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(lb_common::xdp_stat::COUNT, 0);

/// Per-CPU working memory for one packet: the program's stack is 512 bytes
/// for the whole call chain, less than these take together.
#[repr(C)]
pub struct Scratch {
    pub pkt: Packet,
    /// The conntrack key being looked up or inserted.
    pub key: FlowKey,
    /// The other half's key.
    pub peer_key: FlowKey,
    /// An entry being built (a new connection, or a half being restored).
    pub entry: CtEntry,
    pub fib: bpf_fib_lookup,
    pub plan: crate::icmp::IcmpPlan,
    /// Whether the entry `conntrack::lookup` found is in CT_PENDING.
    pub pending: u32,
    /// The bytes an ICMP error quotes.
    pub quote: [u8; crate::icmp::QUOTE_MAX],
}

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and the program is not preempted on its CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn count_xdp(index: u32) {
    if let Some(c) = XDP_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and the program is not preempted on its CPU.
        unsafe { *c += 1 };
    }
}

/// Adds to a per-CPU counter set found by a lookup.
#[inline(always)]
pub fn add_stats(stats: Option<*mut TrafficStats>, f: impl FnOnce(&mut TrafficStats)) {
    if let Some(st) = stats {
        // SAFETY: per-CPU value from a successful lookup.
        f(unsafe { &mut *st });
    }
}

/// Which way a translated packet went, for its connection's counters.
#[derive(Clone, Copy)]
pub enum Traffic {
    /// The client's packet; `true` when it started the connection.
    ToBackend(bool),
    /// The backend's reply.
    ToClient,
}

/// Counts a translated packet of `bytes` in the per-CPU counters of its
/// connection's service and backend. Both programs count here, so a
/// connection's counters do not depend on which one carried a packet.
#[inline(always)]
pub fn count_traffic(e: &CtEntry, bytes: u64, traffic: Traffic) {
    let update = |st: &mut TrafficStats| match traffic {
        Traffic::ToBackend(new) => {
            st.packets += 1;
            st.bytes += bytes;
            st.new_flows += new as u64;
        }
        Traffic::ToClient => {
            st.reply_packets += 1;
            st.reply_bytes += bytes;
        }
    };
    add_stats(SERVICE_STATS.get_ptr_mut(e.service_slot), update);
    add_stats(BACKEND_STATS.get_ptr_mut(&e.backend_id), update);
}

/// Whether `ifindex`, with `mac` as its address, is a veth to a local
/// container (PEER_PORTS).
#[inline(always)]
pub fn peer_port(ifindex: u32, mac: &[u8; 6]) -> bool {
    // SAFETY: plain data, written whole by lbd.
    matches!(unsafe { PEER_PORTS.get(&ifindex) }, Some(m) if m == mac)
}

/// Whether PREFILTER may know (`addr`, `port`): false only when its bit is
/// clear in a prefilter the reconciler has written.
#[inline(always)]
pub fn prefilter(addr: &[u8; 16], port: u16, cfg: &Config) -> bool {
    let bits = cfg.prefilter_bits;
    if !(PREFILTER_MIN_BITS..=PREFILTER_MAX_BITS).contains(&bits) {
        return true;
    }
    let bit = prefilter_bit(addr, port, bits);
    match PREFILTER.get(bit / 64) {
        Some(words) => words[(bit / 32 % 2) as usize] & (1 << (bit % 32)) != 0,
        None => true,
    }
}
