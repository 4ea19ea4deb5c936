//! The status report: what is applied and what the datapath counted.
//! Produced by lbd, printed by lbctl (as a table or as JSON).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub no_backend: u64,
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
    /// The weight set with `lbctl weight`, which wins over the source's
    /// until cleared or until the backend leaves its service.
    #[serde(default)]
    pub weight_override: Option<u32>,
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
    pub failing: Vec<ServiceFailure>,
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

/// A service the last reconciliation could not add, update or remove. Its
/// previous state (or nothing, for a new one) keeps serving.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceFailure {
    pub name: String,
    pub frontend: String,
    /// The service's source: who asked for it (`config:PATH`,
    /// `docker:labels`, `docker:swarm`).
    pub source: String,
    pub reason: String,
}

impl ServiceFailure {
    /// Whether the service came from the config file.
    pub fn from_config(&self) -> bool {
        self.source.starts_with("config:")
    }

    /// Whether the service came from Docker (labels or Swarm).
    pub fn from_docker(&self) -> bool {
        self.source.starts_with("docker:")
    }
}

impl std::fmt::Display for ServiceFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "service {} ({}, from {}): {}",
            self.name, self.frontend, self.source, self.reason
        )
    }
}

/// lbd's view of the Docker engine it watches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerStatus {
    pub host: String,
    pub connected: bool,
    pub api_version: Option<String>,
    pub last_error: Option<String>,
    pub resyncs: u64,
    pub rejected: Vec<String>,
    /// Docker's services that could not be applied to the datapath, and why.
    #[serde(default)]
    pub failed: Vec<String>,
    /// "manager", "worker" or "inactive" (not in a Swarm).
    pub swarm: Option<String>,
}

/// A service rejected because another owns its frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub frontend: String,
    /// The service that was rejected, and where it came from.
    pub rejected: String,
    /// The service that keeps the frontend.
    pub owner: String,
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
                match b.weight_override {
                    // The weight in force may still be 0 from a drain.
                    Some(_) => format!("{}*", b.weight),
                    None => b.weight.to_string(),
                },
                b.active_flows.to_string(),
                c.new_flows.to_string(),
                c.packets.to_string(),
                c.bytes.to_string(),
                c.reply_packets.to_string(),
            ]);
        }
    }
    write_columns(&mut out, &rows);
    if status.services.is_empty() {
        let _ = writeln!(out, "(no services)");
    }
    let overridden = status
        .services
        .iter()
        .flat_map(|s| &s.backends)
        .any(|b| b.weight_override.is_some());
    if overridden {
        let _ = writeln!(out, "* weight set with `lbctl weight`");
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
    for f in status.failing.iter().filter(|f| !f.from_docker()) {
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

/// Writes `rows` as left-aligned columns two spaces apart, each as wide as
/// its widest cell (the tables of `lbctl status` and `lbctl conntrack list`).
pub(crate) fn write_columns<R: AsRef<[String]>>(out: &mut String, rows: &[R]) {
    let columns = rows.first().map_or(0, |r| r.as_ref().len());
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r.as_ref()[i].len()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
}
