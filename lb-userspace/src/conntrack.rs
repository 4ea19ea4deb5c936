//! Connection tracking from userspace: the settings the datapath runs with,
//! its clock, and the garbage collector that deletes expired entries (the
//! datapath already ignores them; deleting them frees their slots before
//! the LRU has to evict anything).

use std::ops::RangeInclusive;

use aya::maps::{HashMap, MapData};
use lb_common::{Config, CtEntry, FlowKey};

use crate::datapath::Maps;
use crate::model::ConntrackSettings;

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

/// The datapath's clock, read from userspace: the same CLOCK_MONOTONIC as
/// bpf_ktime_get_ns, shifted or frozen as CONFIG says.
pub fn now(cfg: &Config) -> u64 {
    if cfg.clock_frozen_ns != 0 {
        return cfg.clock_frozen_ns;
    }
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * NS + t.tv_nsec() as u64)
        .unwrap_or(0);
    mono.wrapping_add(cfg.clock_offset_ns)
}

/// Whether the half `e` has outlived its timeout at `now`.
pub fn expired(e: &CtEntry, cfg: &Config, now: u64) -> bool {
    now.saturating_sub(e.last_seen_ns) > cfg.timeout_ns(e.proto, e.state)
}

/// Deletes every expired half from both conntrack tables; returns how many.
pub fn collect_garbage(maps: &mut Maps) -> u64 {
    let Ok(cfg) = maps.config.get(&0, 0) else {
        return 0;
    };
    let now = now(&cfg);
    sweep(&mut maps.conntrack, &cfg, now) + sweep(&mut maps.ct_pending, &cfg, now)
}

fn sweep(map: &mut HashMap<MapData, FlowKey, CtEntry>, cfg: &Config, now: u64) -> u64 {
    // Collected first: deleting while iterating a BPF hash map restarts
    // the walk.
    let dead: Vec<FlowKey> = map
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(_, e)| expired(e, cfg, now))
        .map(|(k, _)| k)
        .collect();
    dead.iter().filter(|k| map.remove(k).is_ok()).count() as u64
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
