//! `step`: one packet through the contract, sections 1 to 7.

use lb_common::{
    global, AffinityEntry, AffinityKey, CtEntry, FlowKey, ServiceKey, TrafficStats, BACKEND_ACTIVE,
    BACKEND_DOWN, CT_REPLY, CT_SNAT, FLAG_FULLNAT, FLAG_LOCAL_VIP, FLAG_SOCKET, ST_CLOSING,
    ST_FIN_BACKEND, ST_FIN_CLIENT, ST_RST, ST_SEEN_REPLY,
};

use crate::conntrack::{self, flow_key, Claim};
use crate::forward::{self, Decision, Nat};
use crate::hash::{flow_hash, maglev_slot};
use crate::icmp;
use crate::packet::{self, Parsed, Transport, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::state::{
    Forwarding, Ingress, ModelState, Outcome, Path, Table, TC_ACT_REDIRECT, TC_ACT_SHOT,
    TC_ACT_UNSPEC,
};

/// Runs one packet through the model at datapath time `now`.
pub fn step(state: &mut ModelState, pkt: &[u8], ingress: Ingress, now: u64) -> Outcome {
    let mut out = Outcome::new(pkt);
    state.count(global::SEEN);
    match packet::parse(pkt) {
        Parsed::NotIp => out.path = Path::NotIp,
        Parsed::Other => out.path = Path::Other,
        Parsed::Malformed => {
            out.path = Path::Malformed;
            state.count(global::MALFORMED);
        }
        Parsed::Fragment => {
            out.path = Path::Fragment;
            state.count(global::FRAGMENTS);
        }
        Parsed::IcmpError(e) => icmp::handle(state, pkt, &e, ingress, now, &mut out),
        Parsed::Transport(t) => transport(state, pkt, &t, ingress, now, &mut out),
    }
    out
}

/// Section 2: the lookup order for a TCP or UDP packet.
fn transport(
    state: &mut ModelState,
    pkt: &[u8],
    t: &Transport,
    ingress: Ingress,
    now: u64,
    out: &mut Outcome,
) {
    if !state.prefilter_holds(&t.ip.dst, t.dport.to_be())
        && !state.prefilter_holds(&t.ip.src, t.sport.to_be())
    {
        state.count(global::PREFILTERED);
        out.path = Path::Prefiltered;
        out.action = TC_ACT_UNSPEC;
        return;
    }
    let key = flow_key(t.ip.src, t.ip.dst, t.sport, t.dport, t.ip.proto);
    match conntrack::lookup(state, &key, now, out) {
        Some((table, e)) if e.flags & CT_REPLY != 0 => {
            reply(state, pkt, t, &key, table, &e, ingress, now, out)
        }
        Some((table, e)) => known(state, pkt, t, &key, table, &e, ingress, now, out),
        None => new_flow(state, pkt, t, &key, ingress, now, out),
    }
}

/// Whether backend `id` still serves a connection of service `slot`, and
/// whether it takes new flows.
fn backend_status(state: &ModelState, id: u32, slot: u32) -> (bool, bool) {
    match state.backends.get(&id) {
        Some(b) if b.service_slot == slot && b.state != BACKEND_DOWN => {
            (true, b.state == BACKEND_ACTIVE)
        }
        _ => (false, false),
    }
}

/// Section 3.1: a packet of a known connection, client to frontend.
#[allow(clippy::too_many_arguments)]
fn known(
    state: &mut ModelState,
    pkt: &[u8],
    t: &Transport,
    key: &FlowKey,
    table: Table,
    e: &CtEntry,
    ingress: Ingress,
    now: u64,
    out: &mut Outcome,
) {
    let (serves, takes_new) = backend_status(state, e.backend_id, e.service_slot);
    let bare_syn = t.has(TCP_SYN) && !t.has(TCP_ACK);
    if bare_syn && (e.state & ST_CLOSING != 0 || !takes_new) {
        conntrack::delete_pair(state, table, key, e, out);
        state.count(global::CT_REOPENED);
        return new_flow(state, pkt, t, key, ingress, now, out);
    }
    if !serves {
        conntrack::delete_pair(state, table, key, e, out);
        state.count(global::CT_STALE);
        return new_flow(state, pkt, t, key, ingress, now, out);
    }
    out.path = Path::Known;
    let snat = e.flags & CT_SNAT != 0;
    let nat = Nat {
        src: if snat { e.nat_addr } else { t.ip.src },
        sport: if snat {
            u16::from_be(e.nat_port)
        } else {
            t.sport
        },
        dst: e.backend,
        dport: u16::from_be(e.backend_port),
    };
    // A packet that is not forwarded changes no state (section 6.2 says so
    // of new flows; the same reading for known ones, see the report).
    let Some(d) = decide_or_refuse(state, pkt, t, &nat, ingress, out) else {
        return;
    };
    let mut bits = 0;
    if t.has(TCP_FIN) {
        bits |= ST_FIN_CLIENT;
    }
    if t.has(TCP_RST) {
        bits |= ST_RST;
    }
    let confirm =
        t.is_tcp() && !t.has(TCP_SYN) && table == Table::Pending && e.state & ST_SEEN_REPLY != 0;
    conntrack::update(state, table, key, e, bits, confirm, now, out);
    redirect(state, pkt, t, &nat, &d, out);
    add_stats(state, e.service_slot, e.backend_id, pkt.len(), false, false);
}

/// Section 4: a backend's packet to its client.
#[allow(clippy::too_many_arguments)]
fn reply(
    state: &mut ModelState,
    pkt: &[u8],
    t: &Transport,
    key: &FlowKey,
    table: Table,
    e: &CtEntry,
    ingress: Ingress,
    now: u64,
    out: &mut Outcome,
) {
    out.path = Path::Reply;
    let snat = e.flags & CT_SNAT != 0;
    let nat = Nat {
        src: e.frontend,
        sport: u16::from_be(e.frontend_port),
        dst: if snat { e.client } else { t.ip.dst },
        dport: if snat {
            u16::from_be(e.client_port)
        } else {
            t.dport
        },
    };
    let Some(d) = decide_or_refuse(state, pkt, t, &nat, ingress, out) else {
        return;
    };
    let mut bits = ST_SEEN_REPLY;
    if t.has(TCP_FIN) {
        bits |= ST_FIN_BACKEND;
    }
    if t.has(TCP_RST) {
        bits |= ST_RST;
    }
    let confirm = !t.is_tcp() && table == Table::Pending;
    conntrack::update(state, table, key, e, bits, confirm, now, out);
    redirect(state, pkt, t, &nat, &d, out);
    add_stats(state, e.service_slot, e.backend_id, pkt.len(), true, false);
}

/// Section 6, steps 1-3: the decision, carried out at once when it is not
/// to forward (ICMP error sent, drop, or untranslated).
fn decide_or_refuse(
    state: &mut ModelState,
    pkt: &[u8],
    t: &Transport,
    nat: &Nat,
    ingress: Ingress,
    out: &mut Outcome,
) -> Option<Decision> {
    let d = forward::decide(state, pkt.len(), &t.ip, &nat.dst, ingress);
    (!forward::refuse(state, pkt, &t.ip, &d, out)).then_some(d)
}

/// Section 6, step 4: translate and redirect.
fn redirect(
    state: &mut ModelState,
    pkt: &[u8],
    t: &Transport,
    nat: &Nat,
    d: &Decision,
    out: &mut Outcome,
) {
    out.packet = forward::translate_transport(pkt, &t.ip, nat, d);
    out.action = TC_ACT_REDIRECT;
    out.forwarding = Forwarding::Redirected;
    state.count(global::TRANSLATED);
    state.count(global::REDIRECTED);
}

fn add_stats(
    state: &mut ModelState,
    slot: u32,
    backend: u32,
    bytes: usize,
    reply: bool,
    new: bool,
) {
    let bump = |s: &mut TrafficStats| {
        if reply {
            s.reply_packets += 1;
            s.reply_bytes += bytes as u64;
        } else {
            s.packets += 1;
            s.bytes += bytes as u64;
        }
        if new {
            s.new_flows += 1;
        }
    };
    bump(state.service_stats.entry(slot).or_default());
    if let Some(s) = state.backend_stats.get_mut(&backend) {
        bump(s);
    }
}

/// Section 3.2: a new flow to a service (or not, when there is none).
fn new_flow(
    state: &mut ModelState,
    pkt: &[u8],
    t: &Transport,
    key: &FlowKey,
    ingress: Ingress,
    now: u64,
    out: &mut Outcome,
) {
    let skey = ServiceKey {
        addr: t.ip.dst,
        port: t.dport.to_be(),
        proto: t.ip.proto,
        _pad: 0,
    };
    // Socket-balanced addresses are the socket programs' alone.
    let packet_service = state.services.get(&skey).copied();
    let Some(svc) = packet_service.filter(|s| s.flags & FLAG_SOCKET == 0) else {
        out.path = Path::NoService;
        out.action = TC_ACT_UNSPEC;
        return;
    };
    let hash = flow_hash(key);
    let akey = AffinityKey {
        service_slot: svc.slot,
        client: t.ip.src,
    };
    if svc.affinity_ns != 0 {
        // Read here, written below if the flow is created.
        out.affinity_touched.push(akey);
    }
    let sticky = (svc.affinity_ns != 0)
        .then(|| state.affinity.get(&akey).copied())
        .flatten()
        .filter(|a| {
            now.wrapping_sub(a.last_ns) < svc.affinity_ns
                && backend_status(state, a.backend_id, svc.slot).1
        })
        .map(|a| a.backend_id);
    let chosen = sticky.or_else(|| {
        let id = maglev_slot(hash, svc.ring_size).map_or(0, |s| state.ring_entry(svc.ring, s));
        backend_status(state, id, svc.slot).1.then_some(id)
    });
    let Some(backend_id) = chosen else {
        out.path = Path::NoBackend;
        state.service_stats.entry(svc.slot).or_default().no_backend += 1;
        out.action = if svc.flags & FLAG_LOCAL_VIP != 0 {
            TC_ACT_UNSPEC
        } else {
            TC_ACT_SHOT
        };
        return;
    };
    let b = state.backends[&backend_id];
    let hairpin = b.addr == t.ip.src;
    let fullnat = svc.flags & FLAG_FULLNAT != 0;
    let snat = fullnat || hairpin;
    let nat_addr = if fullnat {
        svc.snat_addr
    } else if hairpin {
        t.ip.dst
    } else {
        [0; 16]
    };
    out.path = Path::NewFlow;
    // Nothing is written before the forwarding decision.
    let d = forward::decide(state, pkt.len(), &t.ip, &b.addr, ingress);
    if forward::refuse(state, pkt, &t.ip, &d, out) {
        return;
    }
    let nat_port = if snat {
        let (min, max) = (
            u64::from(state.config.snat_port_min),
            u64::from(state.config.snat_port_max),
        );
        let free = (0..8u64)
            .map(|i| (min + (u64::from(hash) + i * 7919) % (max - min + 1)) as u16)
            .find(|port| {
                let r = flow_key(b.addr, nat_addr, u16::from_be(b.port), *port, t.ip.proto);
                conntrack::claim(state, &r, key, now, out) != Claim::Taken
            });
        match free {
            Some(p) => p,
            None => {
                out.path = Path::SnatExhausted;
                out.action = TC_ACT_SHOT;
                state.count(global::SNAT_EXHAUSTED);
                return;
            }
        }
    } else {
        let r = flow_key(b.addr, t.ip.src, u16::from_be(b.port), t.sport, t.ip.proto);
        if conntrack::claim(state, &r, key, now, out) == Claim::Taken {
            out.path = Path::Collision;
            out.action = TC_ACT_SHOT;
            state.count(global::CT_COLLISIONS);
            return;
        }
        0
    };
    let fwd = CtEntry {
        client: t.ip.src,
        frontend: t.ip.dst,
        backend: b.addr,
        nat_addr,
        client_port: t.sport.to_be(),
        frontend_port: t.dport.to_be(),
        backend_port: b.port,
        nat_port: nat_port.to_be(),
        backend_id,
        service_slot: svc.slot,
        last_seen_ns: now,
        proto: t.ip.proto,
        flags: if snat { CT_SNAT } else { 0 },
        state: 0,
        _pad: 0,
        peer_refresh_s: (now / 1_000_000_000) as u32,
        // The next hop is the FIB's answer, which the model does not have;
        // comparisons leave the kernel's out (see `without_hop`).
        ..Default::default()
    };
    let rev = CtEntry {
        flags: fwd.flags | CT_REPLY,
        ..fwd
    };
    let rkey = conntrack::reply_key(&fwd);
    state.ct_pending.insert(rkey, rev);
    out.ct_touched.push((Table::Pending, rkey));
    state.ct_pending.insert(*key, fwd);
    out.ct_touched.push((Table::Pending, *key));
    if svc.affinity_ns != 0 {
        state.affinity.insert(
            akey,
            AffinityEntry {
                backend_id,
                _pad: 0,
                last_ns: now,
            },
        );
    }
    let nat = Nat {
        src: if snat { nat_addr } else { t.ip.src },
        sport: if snat { nat_port } else { t.sport },
        dst: b.addr,
        dport: u16::from_be(b.port),
    };
    redirect(state, pkt, t, &nat, &d, out);
    add_stats(state, svc.slot, backend_id, pkt.len(), false, true);
}
