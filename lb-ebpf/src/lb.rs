//! Choosing a backend for a new flow (docs/datapath.md, sections 3.2, 3.3):
//! session affinity, then Maglev.

use lb_common::{AffinityEntry, AffinityKey, Backend, FlowKey, ServiceValue, BACKEND_ACTIVE};

use crate::maps::{AFFINITY, BACKENDS, RINGS};

/// A new flow's backend: the client's previous one while affinity holds,
/// else Maglev (the flow's hash selects a slot of the service's live ring).
/// Writes nothing: the flow may yet not be forwarded (`remember` records it
/// once it is).
#[inline(always)]
pub fn pick(
    svc: &ServiceValue,
    flow: &FlowKey,
    hash: u32,
    now: u64,
) -> Option<(u32, &'static Backend)> {
    if svc.backend_count == 0 {
        return None;
    }
    if svc.affinity_ns == 0 {
        return maglev(svc, hash);
    }
    let key = AffinityKey {
        service_slot: svc.slot,
        client: flow.src,
    };
    // SAFETY: plain data.
    if let Some(entry) = unsafe { AFFINITY.get(&key) } {
        if now.saturating_sub(entry.last_ns) < svc.affinity_ns {
            if let Some(b) = takes_new_flows(svc.slot, entry.backend_id) {
                return Some((entry.backend_id, b));
            }
        }
    }
    maglev(svc, hash)
}

/// Records a new flow's backend as its client's, for session affinity.
#[inline(always)]
pub fn remember(svc: &ServiceValue, flow: &FlowKey, backend_id: u32, now: u64) {
    if svc.affinity_ns == 0 {
        return;
    }
    let key = AffinityKey {
        service_slot: svc.slot,
        client: flow.src,
    };
    let entry = AffinityEntry {
        backend_id,
        _pad: 0,
        last_ns: now,
    };
    let _ = AFFINITY.insert(&key, &entry, 0);
}

/// The backend `id` if it belongs to the service in `slot` and takes new flows.
#[inline(always)]
pub fn takes_new_flows(slot: u32, id: u32) -> Option<&'static Backend> {
    // SAFETY: plain data; a concurrent update can only make us read a whole
    // old or whole new value.
    let backend = unsafe { BACKENDS.get(&id) }?;
    (backend.state == BACKEND_ACTIVE && backend.service_slot == slot).then_some(backend)
}

#[inline(always)]
pub fn maglev(svc: &ServiceValue, hash: u32) -> Option<(u32, &'static Backend)> {
    let i = svc.ring.checked_add(hash.checked_rem(svc.ring_size)?)?;
    let pair = RINGS.get(i / 2)?;
    let id = if i & 1 == 0 { pair[0] } else { pair[1] };
    Some((id, takes_new_flows(svc.slot, id)?))
}

/// A well-mixed hash of the 5-tuple (murmur3's mixing over each word and
/// its finaliser), so flows that differ only in the source port spread
/// over the ring.
#[inline(never)]
pub fn flow_hash(f: &FlowKey) -> u32 {
    let mut h: u32 = 0x9747_b28c;
    let mut i = 0;
    while i < 16 {
        h = mix(
            h,
            u32::from_le_bytes([f.src[i], f.src[i + 1], f.src[i + 2], f.src[i + 3]]),
        );
        h = mix(
            h,
            u32::from_le_bytes([f.dst[i], f.dst[i + 1], f.dst[i + 2], f.dst[i + 3]]),
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
