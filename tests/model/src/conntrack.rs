//! Conntrack as section 2 and 3.1 describe it: two halves per connection,
//! each keyed by one direction's tuple as it arrives, in CT_PENDING until
//! confirmed and in CONNTRACK after.

use lb_common::{global, CtEntry, FlowKey, CT_REPLY, CT_SNAT, ST_CONFIRMED};

use crate::state::{ModelState, Outcome, Table};

pub fn flow_key(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src,
        dst,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// Whether an entry is live at `now`.
pub fn live(state: &ModelState, e: &CtEntry, now: u64) -> bool {
    now.wrapping_sub(e.last_seen_ns) <= state.config.timeout_ns(e.proto, e.state)
}

/// The key of a half's other half.
pub fn other_key(e: &CtEntry) -> FlowKey {
    if e.flags & CT_REPLY != 0 {
        forward_key(e)
    } else {
        reply_key(e)
    }
}

/// The client's flow as it arrives: client -> frontend.
pub fn forward_key(e: &CtEntry) -> FlowKey {
    FlowKey {
        src: e.client,
        dst: e.frontend,
        sport: e.client_port,
        dport: e.frontend_port,
        proto: e.proto,
        _pad: [0; 3],
    }
}

/// The backend's answer as it arrives: backend -> client, or -> nat_addr
/// with `CT_SNAT`.
pub fn reply_key(e: &CtEntry) -> FlowKey {
    let snat = e.flags & CT_SNAT != 0;
    FlowKey {
        src: e.backend,
        dst: if snat { e.nat_addr } else { e.client },
        sport: e.backend_port,
        dport: if snat { e.nat_port } else { e.client_port },
        proto: e.proto,
        _pad: [0; 3],
    }
}

/// Section 2, step 1: CONNTRACK then CT_PENDING; an entry past its timeout
/// is deleted with its other half (`ct_expired`) and treated as absent.
pub fn lookup(
    state: &mut ModelState,
    key: &FlowKey,
    now: u64,
    out: &mut Outcome,
) -> Option<(Table, CtEntry)> {
    out.ct_read.push(*key);
    for table in [Table::Conntrack, Table::Pending] {
        let Some(e) = state.table(table).get(key).copied() else {
            continue;
        };
        if live(state, &e, now) {
            return Some((table, e));
        }
        delete_pair(state, table, key, &e, out);
        state.count(global::CT_EXPIRED);
    }
    None
}

/// Deletes the half under `key` and its other half, from `table`.
pub fn delete_pair(
    state: &mut ModelState,
    table: Table,
    key: &FlowKey,
    e: &CtEntry,
    out: &mut Outcome,
) {
    let other = other_key(e);
    state.table_mut(table).remove(key);
    state.table_mut(table).remove(&other);
    out.ct_touched.push((table, *key));
    out.ct_touched.push((table, other));
}

/// A packet of a live connection (3.1 and 4), once it is known to be
/// forwarded: sets `bits` in both halves, sets this half's `last_seen_ns`,
/// and once per second of the clock (when `now / 10^9` differs from this
/// half's `peer_refresh_s`) refreshes the other half, recreating it from
/// this one if it is missing (`ct_restored`). With
/// `confirm`, both halves move from CT_PENDING to CONNTRACK with
/// ST_CONFIRMED (`ct_confirmed`), both seen now.
#[allow(clippy::too_many_arguments)]
pub fn update(
    state: &mut ModelState,
    table: Table,
    key: &FlowKey,
    e: &CtEntry,
    bits: u8,
    confirm: bool,
    now: u64,
    out: &mut Outcome,
) {
    let okey = other_key(e);
    let mut this = *e;
    this.state |= bits;
    this.last_seen_ns = now;
    // CONNTRACK may hold the reply tuple for another connection (its claim
    // in CT_PENDING lost): then the connection stays pending.
    let blocked = confirm
        && state
            .conntrack
            .get(&okey)
            .is_some_and(|o| forward_key(o) != forward_key(e));
    if blocked {
        state.count(global::CT_COLLISIONS);
        state.count(global::CT_INSERT_FAILED);
    }
    if confirm && !blocked {
        // Both halves are written as seen now.
        this.state |= ST_CONFIRMED;
        let mut other = this;
        other.flags ^= CT_REPLY;
        let pending = state.table_mut(Table::Pending);
        pending.remove(key);
        pending.remove(&okey);
        out.ct_touched.push((Table::Pending, *key));
        out.ct_touched.push((Table::Pending, okey));
        state.conntrack.insert(*key, this);
        state.conntrack.insert(okey, other);
        out.ct_touched.push((Table::Conntrack, *key));
        out.ct_touched.push((Table::Conntrack, okey));
        state.count(global::CT_CONFIRMED);
        return;
    }
    let second = (now / 1_000_000_000) as u32;
    let refresh = this.peer_refresh_s != second;
    this.peer_refresh_s = second;
    let other = match state.table(table).get(&okey).copied() {
        Some(mut o) => {
            o.state |= bits;
            if refresh {
                o.last_seen_ns = now;
            }
            Some(o)
        }
        None if refresh => {
            let mut o = this;
            o.flags ^= CT_REPLY;
            state.count(global::CT_RESTORED);
            Some(o)
        }
        None => None,
    };
    state.table_mut(table).insert(*key, this);
    out.ct_touched.push((table, *key));
    if let Some(o) = other {
        state.table_mut(table).insert(okey, o);
        out.ct_touched.push((table, okey));
    }
}

/// Who holds a new connection's reply tuple (3.2).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Free,
    /// A live half of this very connection, whose forward half was lost:
    /// deleted, to be replaced by the new one.
    Ours,
    /// A live half of another connection.
    Taken,
}

/// `claimed`, telling this connection's own half (`fwd`: its forward key)
/// from another's.
pub fn claim(
    state: &mut ModelState,
    key: &FlowKey,
    fwd: &FlowKey,
    now: u64,
    out: &mut Outcome,
) -> Claim {
    for table in [Table::Conntrack, Table::Pending] {
        let Some(e) = state.table(table).get(key).copied() else {
            continue;
        };
        if !live(state, &e, now) {
            delete_pair(state, table, key, &e, out);
            continue;
        }
        if forward_key(&e) != *fwd {
            return Claim::Taken;
        }
        state.table_mut(table).remove(key);
        out.ct_touched.push((table, *key));
        return Claim::Ours;
    }
    Claim::Free
}
