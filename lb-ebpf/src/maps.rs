//! Every map of the datapath. Userspace (the reconciler in lbd) is the only
//! writer of SERVICES, BACKENDS and RINGS; the datapath writes CONNTRACK,
//! REVNAT and the statistics. Sizes here are defaults: lbd sets the real
//! ones at load time.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use lb_common::{
    global, AffinityEntry, AffinityKey, Backend, CtEntry, FlowKey, RevNatEntry, ServiceKey,
    ServiceValue, TrafficStats, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_SERVICES,
    MAGLEV_M, RINGS_PER_SERVICE,
};

/// Frontend (address, port, protocol) -> service slot, live ring, backend count.
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Backend id -> address, port, state and owning service slot. Ids are never
/// reused while the maps live, so a conntrack entry cannot outlive its backend
/// and silently point at a different one.
#[map]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Maglev lookup tables, flattened: ring r occupies [r * MAGLEV_M, (r + 1) * MAGLEV_M),
/// each entry a backend id. Built in userspace, which maps the array into its
/// memory (BPF_F_MMAPABLE) to write whole tables without a syscall per entry.
#[map]
pub static RINGS: Array<u32> = Array::with_max_entries(
    DEFAULT_MAX_SERVICES * RINGS_PER_SERVICE * MAGLEV_M,
    BPF_F_MMAPABLE,
);

/// Client flow (client -> frontend) -> chosen backend. LRU: under pressure the
/// oldest flows are forgotten first (they then re-pick the same backend through
/// Maglev unless the backend set changed).
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, CtEntry> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// Reply flow (backend -> client) -> the frontend address the client expects.
#[map]
pub static REVNAT: LruHashMap<FlowKey, RevNatEntry> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// (service slot, client address) -> the backend of the client's latest
/// new flow, for services with session affinity.
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityEntry> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// Per-CPU counters per service slot.
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

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and the program is not preempted on its CPU.
        unsafe { *c += 1 };
    }
}
