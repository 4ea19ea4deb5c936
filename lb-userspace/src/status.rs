//! The status report from the reconciler's maps: the report's types live
//! in lb-api (lbctl needs them without the datapath); computing them from
//! the maps lives here.

use std::collections::BTreeMap;

use anyhow::Result;
use lb_common::{global, TrafficStats};

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
/// `census`.
pub fn conntrack_status(
    cfg: &lb_common::Config,
    census: &Census,
    gc_removed: u64,
) -> ConntrackStatus {
    const S: u64 = 1_000_000_000;
    ConntrackStatus {
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

/// A flow counts as active while it saw a packet this recently.
const ACTIVE_FLOW_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// What one walk over CONNTRACK tells: how many entries there are, and how
/// many of them are active, per backend id.
#[derive(Default)]
pub struct Census {
    /// Connections, confirmed or not.
    pub entries: u64,
    pub confirmed: u64,
    pub active: BTreeMap<u32, u64>,
}

pub fn census(reconciler: &Reconciler) -> Census {
    let mut out = Census::default();
    let maps = reconciler.maps();
    let horizon =
        maps.config.get(&0, 0).ok().map(|cfg| {
            crate::conntrack::now(&cfg).saturating_sub(ACTIVE_FLOW_AGE.as_nanos() as u64)
        });
    let halves = maps
        .conntrack
        .iter()
        .chain(maps.ct_pending.iter())
        .filter_map(|r| r.ok());
    // One connection, two halves: count the forward ones.
    for (_, ct) in halves.filter(|(_, ct)| ct.flags & lb_common::CT_REPLY == 0) {
        out.entries += 1;
        if ct.state & lb_common::ST_CONFIRMED != 0 {
            out.confirmed += 1;
        }
        if horizon.is_some_and(|h| ct.last_seen_ns >= h) {
            *out.active.entry(ct.backend_id).or_insert(0) += 1;
        }
    }
    out
}

/// A backend's state ("active", "draining", "down (why)"), the node it
/// runs on and the weight set with `lbctl weight`, as the daemon sees them.
pub type BackendView<'a> = dyn Fn(
        &crate::model::ServiceSpec,
        &crate::model::BackendSpec,
    ) -> (String, Option<String>, Option<u32>)
    + 'a;

/// Reads the applied state and sums the per-CPU counters. `state_of` names
/// a backend's state ("active", "draining", "down") from the daemon's view.
pub fn collect(
    reconciler: &Reconciler,
    census: &Census,
    state_of: &BackendView,
) -> Result<Vec<ServiceStatus>> {
    let maps = reconciler.maps();
    let mut out = Vec::new();
    for applied in reconciler.applied() {
        let counters = maps
            .service_stats
            .get(&applied.slot, 0)
            .map(|v| sum(&v))
            .unwrap_or_default();
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
                    counters: maps
                        .backend_stats
                        .get(id, 0)
                        .map(|v| sum(&v))
                        .unwrap_or_default(),
                }
            })
            .collect();
        out.push(ServiceStatus {
            name: applied.spec.name.clone(),
            frontend: applied.spec.frontend.to_string(),
            source: applied.spec.source.clone(),
            counters,
            backends,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.frontend.cmp(&b.frontend)));
    Ok(out)
}

pub fn datapath_counters(reconciler: &Reconciler) -> BTreeMap<String, u64> {
    let maps = reconciler.maps();
    (0..global::COUNT)
        .map(|i| {
            let v = maps
                .global_stats
                .get(&i, 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
            (global::NAMES[i as usize].to_string(), v)
        })
        .collect()
}
