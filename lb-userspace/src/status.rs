//! The status report from the reconciler's maps: the report's types live
//! in lb-api (lbctl needs them without the datapath); computing them from
//! the maps lives here.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use aya::maps::{IterableMap as _, PerCpuValues};
use lb_common::{global, xdp_stat, TrafficStats};

pub use lb_api::status::*;

use crate::reconciler::Reconciler;

/// The per-CPU counters of one service or backend, summed.
fn sum(values: &[TrafficStats]) -> Counters {
    values.iter().fold(Counters::default(), |mut c, v| {
        c.packets += v.packets;
        c.bytes += v.bytes;
        c.new_flows += v.new_flows;
        c.reply_packets += v.reply_packets;
        c.reply_bytes += v.reply_bytes;
        c.no_backend += v.no_backend;
        c
    })
}

/// The conntrack section: settings from the datapath's CONFIG, counts from
/// the latest census (taken in the background, see census.rs).
pub fn conntrack_status(
    cfg: &lb_common::Config,
    snapshot: Option<&crate::census::Snapshot>,
    gc_removed: u64,
) -> ConntrackStatus {
    const S: u64 = 1_000_000_000;
    let empty = Census::default();
    let census = snapshot.map_or(&empty, |s| &s.census);
    ConntrackStatus {
        census_age_ms: snapshot.map(|s| s.taken.elapsed().as_millis() as u64),
        census_walk_ms: snapshot.map_or(0, |s| s.walk.as_millis() as u64),
        confirmed: census.confirmed,
        pending: census.entries - census.confirmed,
        syn_timeout_secs: cfg.timeout_syn_ns / S,
        tcp_timeout_secs: cfg.timeout_tcp_ns / S,
        closing_timeout_secs: cfg.timeout_closing_ns / S,
        udp_timeout_secs: cfg.timeout_udp_ns / S,
        snat_ports: (cfg.snat_port_min, cfg.snat_port_max),
        gc_removed,
    }
}

/// What one walk over CONNTRACK tells: how many entries there are, and how
/// many of them are active, per backend id. Taken by `census::Worker`.
#[derive(Default)]
pub struct Census {
    /// Connections, confirmed or not.
    pub entries: u64,
    pub confirmed: u64,
    pub active: BTreeMap<u32, u64>,
}

/// A backend's state ("active", "draining", "down (why)"), the node it
/// runs on and the weight set with `lbctl weight`, as the daemon sees them.
pub type BackendView<'a> = dyn Fn(
        &crate::model::ServiceSpec,
        &crate::model::BackendSpec,
    ) -> (String, Option<String>, Option<u32>)
    + 'a;

/// With more backends than this, a status reads the counter maps whole, a
/// batch of entries per syscall, rather than one lookup per service and
/// backend (at 100,000 backends, 0.3 s of lookups).
const BATCH_FROM: usize = 256;

/// The summed counters of a per-CPU counter map by key: from one read of
/// the whole map when `whole` (and the kernel takes batches), else from
/// `lookup`, one key at a time.
fn counters<'a, E>(
    whole: bool,
    map: &aya::maps::MapData,
    lookup: impl Fn(&u32) -> Result<PerCpuValues<TrafficStats>, E> + 'a,
) -> impl Fn(&u32) -> Counters + 'a {
    let all = whole.then(|| read_all(map)).flatten();
    move |key| match &all {
        Some(all) => all.get(key).cloned().unwrap_or_default(),
        None => lookup(key).map(|v| sum(&v)).unwrap_or_default(),
    }
}

/// Every entry of a per-CPU counter map, summed; `None` when the kernel
/// refuses batches.
fn read_all(map: &aya::maps::MapData) -> Option<HashMap<u32, Counters>> {
    let mut all = HashMap::new();
    let walked = crate::map_batch::for_each_per_cpu(map, &AtomicBool::new(false), |k, v| {
        all.insert(*k, sum(v));
    });
    match walked {
        Ok(_) => Some(all),
        Err(e) => {
            log::debug!("batch lookup of counters refused ({e}); looking them up one by one");
            None
        }
    }
}

/// The services as `Status` tells them.
pub struct Collected {
    /// Every frontend.
    pub services: Vec<ServiceStatus>,
    /// Swarm services, each once (swarm_status.rs).
    pub swarm: Vec<SwarmService>,
}

/// Reads the applied state and sums the per-CPU counters. `state_of` names
/// a backend's state ("active", "draining", "down") from the daemon's view.
pub fn collect(
    reconciler: &Reconciler,
    census: &Census,
    state_of: &BackendView,
) -> Result<Collected> {
    let maps = reconciler.maps();
    let backend_count: usize = reconciler.applied().map(|a| a.backend_ids.len()).sum();
    let many = backend_count > BATCH_FROM;
    let service_counters = counters(many, maps.service_stats.map(), |slot| {
        maps.service_stats.get(slot, 0)
    });
    let backend_counters = counters(many, maps.backend_stats.map(), |id| {
        maps.backend_stats.get(id, 0)
    });
    let mut seen = Vec::new();
    for applied in reconciler.applied() {
        let counters = service_counters(&applied.slot);
        let backends = applied
            .spec
            .backends
            .iter()
            .zip(&applied.backend_ids)
            .map(|(b, id)| {
                let (state, node, weight_override) = state_of(&applied.spec, b);
                BackendStatus {
                    id: *id,
                    address: b.socket_addr().to_string(),
                    weight: b.weight,
                    state,
                    node,
                    active_flows: census.active.get(id).copied().unwrap_or(0),
                    weight_override,
                    counters: backend_counters(id),
                }
            })
            .collect();
        let status = ServiceStatus {
            name: applied.spec.name.clone(),
            frontend: applied.spec.frontend.to_string(),
            source: applied.spec.source.clone(),
            counters,
            backends,
        };
        seen.push((&applied.spec, status));
    }
    // From the specs: a status does not say what each frontend is for.
    let swarm = crate::swarm_status::group(seen.iter().map(|(spec, s)| (*spec, s)));
    let mut services: Vec<ServiceStatus> = seen.into_iter().map(|(_, s)| s).collect();
    services.sort_by(|a, b| a.name.cmp(&b.name).then(a.frontend.cmp(&b.frontend)));
    Ok(Collected { services, swarm })
}

/// The datapath-wide counters (`global`), and the XDP program's.
pub fn datapath_counters(reconciler: &Reconciler) -> BTreeMap<String, u64> {
    let maps = reconciler.maps();
    let sum = |map: &aya::maps::PerCpuArray<aya::maps::MapData, u64>, i: u32| {
        map.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0)
    };
    let global =
        (0..global::COUNT).map(|i| (global::NAMES[i as usize], sum(&maps.global_stats, i)));
    let xdp = (0..xdp_stat::COUNT).map(|i| (xdp_stat::NAMES[i as usize], sum(&maps.xdp_stats, i)));
    global
        .chain(xdp)
        .map(|(name, v)| (name.to_string(), v))
        .collect()
}
