//! The status report: what is applied and what the datapath counted.
//! Produced by lbd, printed by lbctl (as a table or as JSON).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use lb_common::{global, TrafficStats};
use serde::{Deserialize, Serialize};

use crate::reconciler::Reconciler;
use crate::sources::docker::DockerStatus;
use crate::sources::merge::Conflict;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub no_backend: u64,
}

impl Counters {
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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub id: u32,
    pub address: String,
    pub weight: u32,
    /// "active", "draining" (weight 0, or `lbctl drain`) or "down".
    pub state: String,
    /// The node it runs on, when known (Docker backends).
    #[serde(default)]
    pub node: Option<String>,
    /// Conntrack entries for this backend that saw a packet in the last
    /// minute: what a draining backend still serves.
    pub active_flows: u64,
    pub counters: Counters,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub frontend: String,
    /// "config:PATH", "docker:labels" or "docker:swarm".
    pub source: String,
    pub counters: Counters,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigStatus {
    pub path: Option<String>,
    /// The error of the last reload, if it failed (the previous state keeps serving).
    pub last_error: Option<String>,
    pub reloads: u64,
}

/// Reconciliations: how many changed the maps, and how long they took.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reconcile {
    pub count: u64,
    pub last_ms: f64,
    pub max_ms: f64,
}

/// Time from a Docker event to the datapath change it caused.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Convergence {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub services: Vec<ServiceStatus>,
    pub interfaces: Vec<String>,
    pub config: ConfigStatus,
    /// Present when lbd watches a Docker engine.
    pub docker: Option<DockerStatus>,
    /// Services rejected because another owns their frontend.
    pub conflicts: Vec<Conflict>,
    /// Services that could not be applied (their previous state, if any,
    /// keeps serving), with the source that asked for them and why.
    #[serde(default)]
    pub failing: Vec<crate::reconciler::ServiceFailure>,
    pub convergence: Option<Convergence>,
    /// How long applying a desired state to the maps took.
    #[serde(default)]
    pub reconcile: Reconcile,
    /// Connections tracked (confirmed and pending) and the capacity for
    /// confirmed ones.
    #[serde(default)]
    pub conntrack_entries: u64,
    #[serde(default)]
    pub conntrack_capacity: u64,
    #[serde(default)]
    pub conntrack: ConntrackStatus,
    /// Datapath-wide counters by name.
    pub datapath: BTreeMap<String, u64>,
    /// lbd's background tasks (interface watcher, control socket, ...).
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskStatus>,
}

/// One task's health, as shown in `lbctl status` and the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// Running now (false while it waits to be restarted).
    pub running: bool,
    /// Times it failed and was started again.
    pub restarts: u64,
    /// Why it last failed, and when (seconds since the epoch).
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
}

/// The connection tracker: its tables and the settings it runs with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConntrackStatus {
    /// Confirmed connections (CONNTRACK) and those not confirmed yet
    /// (CT_PENDING): each counts once, though it has two entries.
    pub confirmed: u64,
    pub pending: u64,
    pub syn_timeout_secs: u64,
    pub tcp_timeout_secs: u64,
    pub closing_timeout_secs: u64,
    pub udp_timeout_secs: u64,
    /// Full NAT source ports, inclusive.
    pub snat_ports: (u16, u16),
    /// Expired entries deleted by lbd's garbage collector.
    pub gc_removed: u64,
    /// How old the counts are (they come from a census taken in the
    /// background); None until the first census.
    #[serde(default)]
    pub census_age_ms: Option<u64>,
    /// How long that census took to walk the tables.
    #[serde(default)]
    pub census_walk_ms: u64,
}

impl ConntrackStatus {
    /// Settings from the datapath's CONFIG, counts from the latest census.
    pub fn new(
        cfg: &lb_common::Config,
        snapshot: Option<&crate::census::Snapshot>,
        gc_removed: u64,
    ) -> Self {
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

/// A backend's state ("active", "draining", "down (why)") and the node it
/// runs on, as the daemon sees them.
pub type BackendView<'a> =
    dyn Fn(&crate::model::ServiceSpec, &crate::model::BackendSpec) -> (String, Option<String>) + 'a;

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
            .map(|v| Counters::sum(&v))
            .unwrap_or_default();
        let backends = applied
            .spec
            .backends
            .iter()
            .zip(&applied.backend_ids)
            .map(|(b, id)| {
                let (state, node) = state_of(&applied.spec, b);
                BackendStatus {
                    id: *id,
                    address: b.socket_addr().to_string(),
                    weight: b.weight,
                    state,
                    node,
                    active_flows: census.active.get(id).copied().unwrap_or(0),
                    counters: maps
                        .backend_stats
                        .get(id, 0)
                        .map(|v| Counters::sum(&v))
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

/// The table `lbctl status` prints.
pub fn render_table(status: &Status) -> String {
    let mut out = String::new();
    let mut rows = vec![[
        "SERVICE", "FRONTEND", "BACKEND", "NODE", "STATE", "WEIGHT", "ACTIVE", "FLOWS", "PACKETS",
        "BYTES", "REPLIES",
    ]
    .map(String::from)];
    for s in &status.services {
        let c = &s.counters;
        rows.push([
            s.name.clone(),
            s.frontend.clone(),
            format!("({} backends)", s.backends.len()),
            String::new(),
            String::new(),
            String::new(),
            s.backends
                .iter()
                .map(|b| b.active_flows)
                .sum::<u64>()
                .to_string(),
            c.new_flows.to_string(),
            c.packets.to_string(),
            c.bytes.to_string(),
            c.reply_packets.to_string(),
        ]);
        for b in &s.backends {
            let c = &b.counters;
            rows.push([
                String::new(),
                String::new(),
                b.address.clone(),
                b.node.clone().unwrap_or_else(|| "-".into()),
                b.state.clone(),
                b.weight.to_string(),
                b.active_flows.to_string(),
                c.new_flows.to_string(),
                c.packets.to_string(),
                c.bytes.to_string(),
                c.reply_packets.to_string(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    if status.services.is_empty() {
        let _ = writeln!(out, "(no services)");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "interfaces: {}", status.interfaces.join(", "));
    if let Some(path) = &status.config.path {
        let _ = writeln!(out, "config: {path} (reloads: {})", status.config.reloads);
    }
    if let Some(err) = &status.config.last_error {
        let _ = writeln!(
            out,
            "last reload FAILED, previous state still serving: {err}"
        );
    }
    if let Some(d) = &status.docker {
        let state = if d.connected {
            format!(
                "connected (API {})",
                d.api_version.as_deref().unwrap_or("?")
            )
        } else {
            format!(
                "NOT connected, serving the last known state: {}",
                d.last_error.as_deref().unwrap_or("not reached yet")
            )
        };
        let swarm = d.swarm.as_deref().unwrap_or("unknown");
        let _ = writeln!(out, "docker: {} {state}; swarm: {swarm}", d.host);
        for r in &d.rejected {
            let _ = writeln!(out, "docker: rejected {r}");
        }
        for f in &d.failed {
            let _ = writeln!(out, "docker: NOT applied {f}");
        }
    }
    for c in &status.conflicts {
        let _ = writeln!(
            out,
            "CONFLICT on {}: {} rejected, {} keeps it",
            c.frontend, c.rejected, c.owner
        );
    }
    // Docker's own are listed with Docker above.
    for f in status
        .failing
        .iter()
        .filter(|f| !crate::failures::from_docker(f))
    {
        let _ = writeln!(out, "FAILED to apply {f}");
    }
    if let Some(c) = &status.convergence {
        let _ = writeln!(
            out,
            "docker event -> datapath: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} changes",
            c.p50_ms, c.p99_ms, c.max_ms, c.samples
        );
    }
    let counters: Vec<String> = status
        .datapath
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(out, "datapath: {}", counters.join(" "));
    let ct = &status.conntrack;
    let counted = match ct.census_age_ms {
        Some(age) => format!(
            "counted {:.1} s ago in {} ms",
            age as f64 / 1e3,
            ct.census_walk_ms
        ),
        None => "not counted yet".into(),
    };
    let _ = writeln!(
        out,
        "conntrack: {} confirmed of {}, {} pending ({counted}); timeouts: syn {}s, tcp {}s, \
         closing {}s, udp {}s; snat ports {}-{}; {} expired removed",
        ct.confirmed,
        status.conntrack_capacity,
        ct.pending,
        ct.syn_timeout_secs,
        ct.tcp_timeout_secs,
        ct.closing_timeout_secs,
        ct.udp_timeout_secs,
        ct.snat_ports.0,
        ct.snat_ports.1,
        ct.gc_removed
    );
    let _ = writeln!(
        out,
        "reconcile: {} changes, last {:.2} ms, max {:.2} ms",
        status.reconcile.count, status.reconcile.last_ms, status.reconcile.max_ms
    );
    let tasks: Vec<String> = status
        .tasks
        .iter()
        .map(|(name, t)| {
            let state = if t.running { "up" } else { "DOWN" };
            match (&t.last_error, t.restarts) {
                (_, 0) => format!("{name} {state}"),
                (Some(e), n) => format!("{name} {state} ({n} restarts, last: {e})"),
                (None, n) => format!("{name} {state} ({n} restarts)"),
            }
        })
        .collect();
    if !tasks.is_empty() {
        let _ = writeln!(out, "tasks: {}", tasks.join("; "));
    }
    out
}
