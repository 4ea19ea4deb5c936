//! The connection tracker (docs/datapath.md, sections 2-4): two halves per
//! connection, kept coherent; confirmed connections in CONNTRACK, the
//! others in CT_PENDING; per-state timeouts enforced at lookup.

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns, maps::LruHashMap, programs::TcContext,
};
use lb_common::{global, Config, CtEntry, FlowKey, NextHop, CT_REPLY, CT_SNAT, ST_CONFIRMED};

use crate::maps::{count, Scratch, CONNTRACK, CT_PENDING};

/// The datapath's clock: CLOCK_MONOTONIC as of the last tick. Timeouts
/// are seconds long, and the coarse clock costs no clock-source read.
#[inline(always)]
pub fn now(cfg: &Config) -> u64 {
    if cfg.clock_frozen_ns != 0 {
        return cfg.clock_frozen_ns;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }.wrapping_add(cfg.clock_offset_ns)
}

/// The second of the datapath clock `now` is in.
#[inline(always)]
pub fn second(now: u64) -> u32 {
    (now / 1_000_000_000) as u32
}

/// Runs `f` with `s.entry` turned into the other half of its connection:
/// the direction flag flipped, and the other direction's next hop, `hop`
/// (none when not known).
#[inline(always)]
fn as_peer<R>(s: &mut Scratch, hop: NextHop, f: impl FnOnce(&mut Scratch) -> R) -> R {
    let own = s.entry.hop;
    s.entry.hop = hop;
    s.entry.flags ^= CT_REPLY;
    let r = f(s);
    s.entry.flags ^= CT_REPLY;
    s.entry.hop = own;
    r
}

#[inline(always)]
fn table(pending: bool) -> &'static LruHashMap<FlowKey, CtEntry> {
    if pending {
        &CT_PENDING
    } else {
        &CONNTRACK
    }
}

#[inline(always)]
pub fn live(e: &CtEntry, cfg: &Config, now: u64) -> bool {
    now.saturating_sub(e.last_seen_ns) <= cfg.timeout_ns(e.proto, e.state)
}

/// The key of the other half of the connection `e` belongs to.
#[inline(always)]
pub fn peer_key(e: &CtEntry, out: &mut FlowKey) {
    out.proto = e.proto;
    out._pad = [0; 3];
    if e.flags & CT_REPLY != 0 {
        out.src = e.client;
        out.dst = e.frontend;
        out.sport = e.client_port;
        out.dport = e.frontend_port;
    } else {
        out.src = e.backend;
        out.sport = e.backend_port;
        if e.flags & CT_SNAT != 0 {
            out.dst = e.nat_addr;
            out.dport = e.nat_port;
        } else {
            out.dst = e.client;
            out.dport = e.client_port;
        }
    }
}

/// The conntrack key of a packet from `src` to `dst`.
#[inline(always)]
pub fn set_key(
    key: &mut FlowKey,
    (src, sport): (&[u8; 16], u16),
    (dst, dport): (&[u8; 16], u16),
    proto: u8,
) {
    key.src = *src;
    key.dst = *dst;
    key.sport = sport;
    key.dport = dport;
    key.proto = proto;
    key._pad = [0; 3];
}

/// `lookup`, with the entry found copied into `s.entry`.
#[inline(always)]
pub fn find(s: &mut Scratch, cfg: &Config, now: u64) -> *mut CtEntry {
    let e = lookup(s, cfg, now);
    if !e.is_null() {
        crate::pkt::copy_words(&mut s.entry, e);
    }
    e
}

/// Finds a live entry for `s.key`, in CONNTRACK first, then CT_PENDING
/// (`s.pending` says which). An expired entry is deleted with its other
/// half and the search goes on. Null when there is none.
#[inline(never)]
pub fn lookup(s: &mut Scratch, cfg: &Config, now: u64) -> *mut CtEntry {
    for pending in [false, true] {
        let map = table(pending);
        let Some(e) = map.get_ptr_mut(&s.key) else {
            continue;
        };
        // SAFETY: pointer from a successful lookup.
        if live(unsafe { &*e }, cfg, now) {
            s.pending = pending as u32;
            return e;
        }
        count(global::CT_EXPIRED);
        // SAFETY: as above; the entry is read before it is deleted.
        peer_key(unsafe { &*e }, &mut s.peer_key);
        let _ = map.remove(&s.key);
        let _ = map.remove(&s.peer_key);
    }
    core::ptr::null_mut()
}

/// Deletes both halves of the connection whose half `s.entry` (a copy) was
/// found under `s.key`.
#[inline(never)]
pub fn delete(s: &mut Scratch) {
    peer_key(&s.entry, &mut s.peer_key);
    let map = table(s.pending != 0);
    let _ = map.remove(&s.key);
    let _ = map.remove(&s.peer_key);
}

/// Whether two halves describe the same connection.
#[inline(always)]
fn same_connection(a: &CtEntry, b: &CtEntry) -> bool {
    a.client == b.client
        && a.client_port == b.client_port
        && a.frontend == b.frontend
        && a.frontend_port == b.frontend_port
        && a.proto == b.proto
}

/// Records `bits` in both halves' state. `e` is the half found under
/// `s.key`, `s.entry` a copy of it.
#[inline(never)]
pub fn set_state(s: &mut Scratch, e: *mut CtEntry, bits: u8) {
    // SAFETY: pointer from a successful lookup, valid for this program run.
    unsafe { (*e).state |= bits };
    s.entry.state |= bits;
    peer_key(&s.entry, &mut s.peer_key);
    if let Some(peer) = table(s.pending != 0).get_ptr_mut(&s.peer_key) {
        // SAFETY: as above.
        unsafe { (*peer).state |= bits };
    }
}

/// Moves both halves from CT_PENDING to CONNTRACK, confirmed. False when
/// CONNTRACK holds the reply tuple for another connection: the connection
/// then stays pending.
#[inline(never)]
pub fn confirm(ctx: &TcContext, s: &mut Scratch, now: u64) -> bool {
    s.entry.state |= ST_CONFIRMED;
    s.entry.last_seen_ns = now;
    peer_key(&s.entry, &mut s.peer_key);
    if CONNTRACK.insert(&s.key, &s.entry, 0).is_err() {
        count(global::CT_INSERT_FAILED);
        crate::events::ct_insert_failed(ctx, &s.pkt);
        return false;
    }
    // The other half keeps the next hop it found while pending.
    let hop = match CT_PENDING.get_ptr(&s.peer_key) {
        // SAFETY: pointer from a successful lookup.
        Some(peer) if same_connection(unsafe { &*peer }, &s.entry) => unsafe { (*peer).hop },
        _ => NextHop::default(),
    };
    // The other half only where no other connection's half lies: its
    // tuple was free when it was claimed, but CT_PENDING may have evicted
    // the claim since.
    let ok = as_peer(s, hop, |s| {
        if CONNTRACK
            .insert(&s.peer_key, &s.entry, BPF_NOEXIST as u64)
            .is_ok()
        {
            return true;
        }
        let Some(other) = CONNTRACK.get_ptr_mut(&s.peer_key) else {
            return false;
        };
        // SAFETY: pointer from a successful lookup.
        let other = unsafe { &mut *other };
        if !same_connection(other, &s.entry) {
            count(global::CT_COLLISIONS);
            return false;
        }
        *other = s.entry;
        true
    });
    if !ok {
        count(global::CT_INSERT_FAILED);
        crate::events::ct_insert_failed(ctx, &s.pkt);
        let _ = CONNTRACK.remove(&s.key);
        s.entry.state &= !ST_CONFIRMED;
        return false;
    }
    let _ = CT_PENDING.remove(&s.key);
    let _ = CT_PENDING.remove(&s.peer_key);
    s.pending = 0;
    count(global::CT_CONFIRMED);
    true
}

/// Marks the half `e` (copied in `s.entry`) as seen now, and, once per
/// second of the datapath clock, the other half too, recreating it if it
/// was evicted.
#[inline(never)]
pub fn touch(s: &mut Scratch, e: *mut CtEntry, now: u64) {
    let second = second(now);
    // SAFETY: pointer from a successful lookup, valid for this program run.
    unsafe { (*e).last_seen_ns = now };
    s.entry.last_seen_ns = now;
    if s.entry.peer_refresh_s == second {
        return;
    }
    // SAFETY: as above.
    unsafe { (*e).peer_refresh_s = second };
    s.entry.peer_refresh_s = second;
    peer_key(&s.entry, &mut s.peer_key);
    let map = table(s.pending != 0);
    if let Some(peer) = map.get_ptr_mut(&s.peer_key) {
        // SAFETY: as above.
        unsafe { (*peer).last_seen_ns = now };
        return;
    }
    if as_peer(s, NextHop::default(), |s| {
        map.insert(&s.peer_key, &s.entry, BPF_NOEXIST as u64)
            .is_ok()
    }) {
        count(global::CT_RESTORED);
    }
}

/// `claim`'s answers.
const FREE: u32 = 0;
/// A live half of this very connection (its forward half was lost): it is
/// replaced.
const OURS: u32 = 1;
const TAKEN: u32 = 2;

/// Who holds the reply tuple `s.peer_key` for the new connection
/// `s.entry`, in either table. Expired holders are deleted with their other
/// halves on the way; a live half of this same connection is deleted too,
/// to be replaced.
#[inline(never)]
fn claim(s: &mut Scratch, cfg: &Config, now: u64) -> u32 {
    for pending in [false, true] {
        let map = table(pending);
        if let Some(e) = map.get_ptr_mut(&s.peer_key) {
            // SAFETY: pointer from a successful lookup.
            let e = unsafe { &*e };
            if live(e, cfg, now) {
                if !same_connection(e, &s.entry) {
                    return TAKEN;
                }
                let _ = map.remove(&s.peer_key);
                return OURS;
            }
            let mut other = FlowKey::default();
            peer_key(e, &mut other);
            let _ = map.remove(&s.peer_key);
            let _ = map.remove(&other);
        }
    }
    FREE
}

/// Outcomes of `insert`.
pub const INSERTED: u32 = 0;
/// Another CPU inserted the same connection first; use its entry.
pub const RACED: u32 = 1;
pub const FAILED: u32 = 2;
/// With CT_SNAT: every port tried was taken.
pub const EXHAUSTED: u32 = 3;

/// Inserts the new connection `s.entry` (built as its forward half) into
/// CT_PENDING under `s.key`, its reply half under `s.peer_key` first. With
/// CT_SNAT the reply half claims the source port: attempt by attempt over
/// the configured range, a port whose reply tuple no live entry holds.
#[inline(never)]
pub fn insert(s: &mut Scratch, cfg: &Config, now: u64, hash: u32) -> u32 {
    peer_key(&s.entry, &mut s.peer_key);
    let claimed = as_peer(s, NextHop::default(), |s| insert_reply(s, cfg, now, hash));
    if claimed != INSERTED {
        return claimed;
    }
    if CT_PENDING
        .insert(&s.key, &s.entry, BPF_NOEXIST as u64)
        .is_err()
    {
        // Release the claim: the winner's reply half is its own.
        let _ = CT_PENDING.remove(&s.peer_key);
        return RACED;
    }
    s.pending = 1;
    INSERTED
}

/// `insert`'s first step: the reply half `s.entry` into CT_PENDING under
/// `s.peer_key`, its port claimed with CT_SNAT. INSERTED, FAILED or
/// EXHAUSTED.
#[inline(always)]
fn insert_reply(s: &mut Scratch, cfg: &Config, now: u64, hash: u32) -> u32 {
    if s.entry.flags & CT_SNAT != 0 {
        let min = cfg.snat_port_min as u32;
        let span = (cfg.snat_port_max as u32).saturating_sub(min) + 1;
        let mut claimed = false;
        let mut attempt = 0u32;
        while attempt < 8 {
            let port = (min + hash.wrapping_add(attempt.wrapping_mul(7919)) % span) as u16;
            s.peer_key.dport = port.to_be();
            s.entry.nat_port = port.to_be();
            attempt += 1;
            if claim(s, cfg, now) == TAKEN {
                continue;
            }
            if CT_PENDING
                .insert(&s.peer_key, &s.entry, BPF_NOEXIST as u64)
                .is_ok()
            {
                claimed = true;
                break;
            }
        }
        if !claimed {
            count(global::SNAT_EXHAUSTED);
            return EXHAUSTED;
        }
    } else {
        if claim(s, cfg, now) == TAKEN {
            count(global::CT_COLLISIONS);
            return FAILED;
        }
        if CT_PENDING
            .insert(&s.peer_key, &s.entry, BPF_NOEXIST as u64)
            .is_err()
        {
            count(global::CT_COLLISIONS);
            return FAILED;
        }
    }
    INSERTED
}
