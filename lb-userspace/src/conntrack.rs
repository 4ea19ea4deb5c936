//! Connection tracking from userspace: the settings the datapath runs with,
//! its clock, the garbage collector that deletes expired entries (the
//! datapath already ignores them; deleting them frees their slots before
//! the LRU has to evict anything), and the listing and flushing of
//! connections for `lbctl conntrack`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::RangeInclusive;

use lb_api::connections::{Connection, ConnectionList};
use lb_common::{
    Config, CtEntry, FlowKey, CT_REPLY, CT_SNAT, ST_CONFIRMED, ST_FIN_BACKEND, ST_FIN_CLIENT,
    ST_RST, ST_SEEN_REPLY,
};

use crate::model::ConntrackSettings;
use crate::reconciler::{addr_of, Reconciler};

const NS: u64 = 1_000_000_000;

/// The datapath's settings for `settings`, keeping `current`'s clock.
pub fn datapath_config(settings: &ConntrackSettings, current: &Config) -> Config {
    let (min, max) = settings
        .snat_ports
        .unwrap_or_else(|| default_snat_ports(&local_port_range()));
    Config {
        timeout_syn_ns: settings.syn_timeout_secs * NS,
        timeout_tcp_ns: settings.tcp_timeout_secs * NS,
        timeout_closing_ns: settings.closing_timeout_secs * NS,
        timeout_udp_ns: settings.udp_timeout_secs * NS,
        snat_port_min: min,
        snat_port_max: max,
        ..*current
    }
}

/// The node's ephemeral port range (its own outgoing connections' source
/// ports), Linux's default when it cannot be read.
pub fn local_port_range() -> RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut it = text.split_whitespace().map(|w| w.parse::<u16>().ok());
            Some(it.next()??..=it.next()??)
        })
        .unwrap_or(32768..=60999)
}

/// The largest range of unprivileged ports outside `ephemeral`, so that a
/// full-NAT source port never collides with a connection the node itself
/// opens from the same address.
pub fn default_snat_ports(ephemeral: &RangeInclusive<u16>) -> (u16, u16) {
    // As u32, so that "one past 65535" is a real, empty, range.
    let below = (1024u32, u32::from(*ephemeral.start()).saturating_sub(1));
    let above = ((u32::from(*ephemeral.end()) + 1).max(1024), 65535u32);
    let len = |(a, b): (u32, u32)| if b >= a { b - a + 1 } else { 0 };
    let ports = |(a, b): (u32, u32)| (a as u16, b as u16);
    match (len(below), len(above)) {
        (0, 0) => (1024, u16::MAX),
        (b, a) if b >= a => ports(below),
        _ => ports(above),
    }
}

/// The datapath's clock, read from userspace: the same
/// CLOCK_MONOTONIC_COARSE as bpf_ktime_get_coarse_ns, shifted or frozen as
/// CONFIG says.
pub fn now(cfg: &Config) -> u64 {
    if cfg.clock_frozen_ns != 0 {
        return cfg.clock_frozen_ns;
    }
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(|t| t.tv_sec() as u64 * NS + t.tv_nsec() as u64)
        .unwrap_or(0);
    mono.wrapping_add(cfg.clock_offset_ns)
}

/// Whether the half `e` has outlived its timeout at `now`.
pub fn expired(e: &CtEntry, cfg: &Config, now: u64) -> bool {
    now.saturating_sub(e.last_seen_ns) > cfg.timeout_ns(e.proto, e.state)
}

/// What both halves of a connection carry alike: client, frontend, proto.
type Identity = ([u8; 16], u16, [u8; 16], u16, u8);

fn identity(e: &CtEntry) -> Identity {
    (
        e.client,
        e.client_port,
        e.frontend,
        e.frontend_port,
        e.proto,
    )
}

fn socket(addr: &[u8; 16], port_be: u16) -> String {
    SocketAddr::new(addr_of(addr), u16::from_be(port_be)).to_string()
}

fn state_name(state: u8) -> &'static str {
    if state & ST_RST != 0 {
        "reset"
    } else if state & (ST_FIN_CLIENT | ST_FIN_BACKEND) != 0 {
        "closing"
    } else if state & ST_CONFIRMED != 0 {
        "established"
    } else if state & ST_SEEN_REPLY != 0 {
        "answered"
    } else {
        "new"
    }
}

/// The service slot that `service` (a name or a frontend) names, or every
/// slot for None.
fn slot_of(reconciler: &Reconciler, service: Option<&str>) -> Result<Option<u32>, String> {
    let Some(wanted) = service else {
        return Ok(None);
    };
    let applied: Vec<_> = reconciler.applied().collect();
    lb_api::select::service(applied.iter().copied(), wanted, |a| {
        (a.spec.name.clone(), a.spec.frontend.to_string())
    })
    .map(|a| Some(a.slot))
}

/// Every live connection (of `service`, if given) once, whichever of its
/// halves and tables hold it; at most `limit` of them are listed.
pub fn list(
    reconciler: &Reconciler,
    service: Option<&str>,
    limit: usize,
) -> Result<ConnectionList, String> {
    let slot = slot_of(reconciler, service)?;
    let maps = reconciler.maps();
    let cfg = maps.config.get(&0, 0).map_err(|e| e.to_string())?;
    let now = now(&cfg);
    let mut found: BTreeMap<Identity, CtEntry> = BTreeMap::new();
    let halves = maps
        .conntrack
        .iter()
        .chain(maps.ct_pending.iter())
        .filter_map(|r| r.ok())
        .map(|(_, e)| e)
        .filter(|e| slot.is_none_or(|s| e.service_slot == s) && !expired(e, &cfg, now));
    for e in halves {
        // A forward half is the better witness: its last_seen_ns is the
        // client's latest packet.
        match found.get(&identity(&e)) {
            Some(seen) if seen.flags & CT_REPLY == 0 || e.flags & CT_REPLY != 0 => {}
            _ => {
                found.insert(identity(&e), e);
            }
        }
    }
    let services: BTreeMap<u32, (String, String)> = reconciler
        .applied()
        .map(|a| (a.slot, (a.spec.name.clone(), a.spec.frontend.to_string())))
        .collect();
    let connections = found
        .values()
        .take(limit)
        .map(|e| {
            let proto = match e.proto {
                lb_common::PROTO_TCP => "tcp",
                _ => "udp",
            };
            let (service, frontend) = services.get(&e.service_slot).cloned().unwrap_or_else(|| {
                (
                    "-".into(),
                    format!("{}/{proto}", socket(&e.frontend, e.frontend_port)),
                )
            });
            let idle = now.saturating_sub(e.last_seen_ns);
            let timeout = cfg.timeout_ns(e.proto, e.state);
            Connection {
                service,
                frontend,
                client: socket(&e.client, e.client_port),
                backend: socket(&e.backend, e.backend_port),
                nat: (e.flags & CT_SNAT != 0).then(|| socket(&e.nat_addr, e.nat_port)),
                state: state_name(e.state).into(),
                confirmed: e.state & ST_CONFIRMED != 0,
                idle_secs: idle as f64 / NS as f64,
                expires_in_secs: timeout.saturating_sub(idle) as f64 / NS as f64,
            }
        })
        .collect();
    Ok(ConnectionList {
        connections,
        total: found.len() as u64,
    })
}

/// Deletes both halves of every connection (of `service`, if given) from
/// both tables; returns how many live connections that ended. Their next
/// packet is a new flow to the datapath.
pub fn flush(reconciler: &mut Reconciler, service: Option<&str>) -> Result<u64, String> {
    let slot = slot_of(reconciler, service)?;
    let maps = reconciler.maps_mut();
    let cfg = maps.config.get(&0, 0).map_err(|e| e.to_string())?;
    let now = now(&cfg);
    let mut live = BTreeSet::new();
    for map in [&mut maps.conntrack, &mut maps.ct_pending] {
        // Collected first: deleting while iterating a BPF hash map restarts
        // the walk.
        let doomed: Vec<(FlowKey, CtEntry)> = map
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, e)| slot.is_none_or(|s| e.service_slot == s))
            .collect();
        for (key, e) in doomed {
            if map.remove(&key).is_ok() && !expired(&e, &cfg, now) {
                live.insert(identity(&e));
            }
        }
    }
    Ok(live.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snat_ports_avoid_the_ephemeral_range() {
        // Linux's default 32768-60999: below is larger.
        assert_eq!(default_snat_ports(&(32768..=60999)), (1024, 32767));
        // A node that opens its range wide at the bottom.
        assert_eq!(default_snat_ports(&(1024..=49999)), (50000, 65535));
        assert_eq!(default_snat_ports(&(10000..=65535)), (1024, 9999));
        // Nothing left outside: the whole unprivileged range.
        assert_eq!(default_snat_ports(&(1024..=65535)), (1024, 65535));
    }

    #[test]
    fn settings_become_nanoseconds_and_keep_the_clock() {
        let current = Config {
            clock_offset_ns: 42,
            ..Config::default()
        };
        let settings = ConntrackSettings {
            tcp_timeout_secs: 10,
            snat_ports: Some((2000, 2999)),
            ..ConntrackSettings::default()
        };
        let cfg = datapath_config(&settings, &current);
        assert_eq!(cfg.timeout_tcp_ns, 10 * NS);
        assert_eq!((cfg.snat_port_min, cfg.snat_port_max), (2000, 2999));
        assert_eq!(cfg.clock_offset_ns, 42);
    }
}
