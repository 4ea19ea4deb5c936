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
    /// "active" or "draining".
    pub state: String,
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
    pub convergence: Option<Convergence>,
    /// Datapath-wide counters by name.
    pub datapath: BTreeMap<String, u64>,
}

/// Reads the applied state and sums the per-CPU counters.
pub fn collect(reconciler: &Reconciler) -> Result<Vec<ServiceStatus>> {
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
            .map(|(b, id)| BackendStatus {
                id: *id,
                address: b.socket_addr().to_string(),
                weight: b.weight,
                state: if b.weight == 0 { "draining" } else { "active" }.to_string(),
                counters: maps
                    .backend_stats
                    .get(id, 0)
                    .map(|v| Counters::sum(&v))
                    .unwrap_or_default(),
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
        "SERVICE", "FRONTEND", "BACKEND", "STATE", "WEIGHT", "FLOWS", "PACKETS", "BYTES", "REPLIES",
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
                b.state.clone(),
                b.weight.to_string(),
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
    let counters: Vec<String> = status
        .datapath
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(out, "datapath: {}", counters.join(" "));
    out
}
