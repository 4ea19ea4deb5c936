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

impl std::ops::AddAssign<&Counters> for Counters {
    fn add_assign(&mut self, other: &Counters) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
        self.reply_packets += other.reply_packets;
        self.reply_bytes += other.reply_bytes;
        self.no_backend += other.no_backend;
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

/// A Swarm service told once, as Swarm shows it, though lbd serves it as
/// several frontends (in `Status::services`, each of them): per published
/// port and protocol, the ingress sandbox's (the mesh's stage 2, to the
/// tasks) and one per node address (stage 1, to the sandbox); per VIP, one
/// for TCP and one for UDP, on every port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwarmService {
    pub name: String,
    /// Published through the routing mesh, by port then protocol; empty for
    /// a service that publishes none.
    pub ports: Vec<SwarmPort>,
    /// This node's addresses that answer on the published ports.
    pub node_addresses: Vec<String>,
    /// By network, then address.
    pub vips: Vec<SwarmVip>,
    /// Each task once per network it is reached on (the mesh's ingress
    /// overlay, a VIP's overlay): a task's address differs per network, and
    /// nothing but its address names it. By network (ingress first), then
    /// address.
    pub tasks: Vec<SwarmTask>,
    /// The frontends of `Status::services` told here, sorted.
    pub frontends: Vec<String>,
}

/// A port published through the routing mesh.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwarmPort {
    pub port: u16,
    /// "tcp" or "udp".
    pub proto: String,
    /// The port the tasks listen on; None while the service has no task.
    pub target: Option<u16>,
    /// The ingress sandbox's frontend (stage 2), `ip:port/proto`.
    pub frontend: String,
    /// What reached the tasks through this node's mesh on this port: the
    /// counters of the sandbox's frontend.
    pub counters: Counters,
}

/// A service VIP: every port of one address of one overlay network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwarmVip {
    pub address: String,
    /// The overlay network's VXLAN id, which is what names it in lbd.
    pub network: u32,
    /// TCP and UDP together. The socket programs count connections made
    /// (`new_flows`) and those that found no task (`no_backend`), not
    /// packets.
    pub counters: Counters,
}

/// One task on one network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwarmTask {
    /// Its address on `network`.
    pub address: String,
    /// The VXLAN id of the VIP network the address is on; None for the
    /// ingress overlay (the routing mesh).
    pub network: Option<u32>,
    /// The node it runs on, as Swarm names it (its address).
    pub node: Option<String>,
    /// As for a backend ("active", "draining", "down (why)"); the states of
    /// its frontends joined with ", " when they differ (a drain is per
    /// frontend).
    pub state: String,
    /// Tracked connections through the mesh; connections to a VIP are not
    /// tracked (0).
    pub active_flows: u64,
    /// Summed over its frontends: through the mesh, every counter; through
    /// a VIP, only `new_flows` (the socket programs see no packets).
    pub counters: Counters,
}

impl SwarmService {
    /// Whether `service` is one of the frontends told here.
    pub fn covers(&self, service: &ServiceStatus) -> bool {
        service.name == self.name && self.frontends.contains(&service.frontend)
    }
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
    /// Every frontend lbd serves, Swarm's included.
    pub services: Vec<ServiceStatus>,
    /// Swarm services, each once (their frontends are in `services` too).
    #[serde(default)]
    pub swarm: Vec<SwarmService>,
    pub interfaces: Vec<String>,
    /// How the TC program is attached to them: `tcx` or `netlink`.
    #[serde(default)]
    pub tc_attach: String,
    /// Those that have the XDP fast path too (`lbd --xdp`).
    #[serde(default)]
    pub xdp: Vec<String>,
    /// Veths into local containers, to which translated packets are handed
    /// directly (`bpf_redirect_peer`); 0 with `lbd --no-redirect-peer`.
    #[serde(default)]
    pub peer_ports: usize,
    pub config: ConfigStatus,
    /// Present when lbd watches a Docker engine.
    pub docker: Option<DockerStatus>,
    /// Present when lbd reads etcd.
    #[serde(default)]
    pub etcd: Option<EtcdStatus>,
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

/// lbd's view of etcd, and of its registrations in it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdStatus {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub connected: bool,
    pub last_error: Option<String>,
    /// The latest revision seen.
    pub revision: u64,
    /// The revision whose keys the datapath holds, and when (Unix time in
    /// microseconds) it was written.
    pub applied_revision: u64,
    pub applied_at_us: u64,
    /// Full reads of the watched keys (the first, and one after a watch
    /// was compacted away).
    pub resyncs: u64,
    /// "KEY: reason" for each key that was skipped.
    pub rejected: Vec<String>,
    /// etcd's services that could not be applied to the datapath, and why.
    pub failed: Vec<String>,
    /// With `lbd --register`: this node's lease and the keys written under it.
    pub lease: Option<u64>,
    pub registered: Vec<String>,
    pub register_error: Option<String>,
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

/// Keeps only what `wanted` names (`lbctl status SERVICE`): a service by
/// its frontend or its name (see `select::service`), or a Swarm service by
/// its name, whole, with its frontends.
pub fn retain_service(status: &mut Status, wanted: &str) -> Result<(), String> {
    let by_name = crate::select::FrontendPattern::parse(wanted).is_none();
    let group = status.swarm.iter().find(|g| by_name && g.name == wanted);
    // Another source's service of the same name makes the name ambiguous:
    // `select::service` below then says so.
    if let Some(group) = group.filter(|g| {
        !status
            .services
            .iter()
            .any(|s| s.name == wanted && !g.covers(s))
    }) {
        let group = group.clone();
        status.services.retain(|s| group.covers(s));
        status.swarm = vec![group];
        return Ok(());
    }
    let one = crate::select::service(&status.services, wanted, |s| {
        (s.name.clone(), s.frontend.clone())
    })?
    .clone();
    status.services = vec![one];
    // A frontend asked for is shown as such, even a Swarm service's.
    status.swarm.clear();
    Ok(())
}

/// The table `lbctl status` prints. A Swarm service is told once, in a
/// table of its own, and its tasks in another (as `docker service ls` and
/// `docker service ps` do); with `swarm_frontends`, its frontends are
/// listed among the others too.
pub fn render_table(status: &Status, swarm_frontends: bool) -> String {
    let mut out = String::new();
    let shown: Vec<&ServiceStatus> = status
        .services
        .iter()
        .filter(|s| swarm_frontends || !status.swarm.iter().any(|g| g.covers(s)))
        .collect();
    if !shown.is_empty() || status.swarm.is_empty() {
        write_services(&mut out, &shown);
    }
    if !status.swarm.is_empty() {
        if !shown.is_empty() {
            let _ = writeln!(out);
        }
        write_swarm(&mut out, &status.swarm);
    }
    if status.services.is_empty() {
        let _ = writeln!(out, "(no services)");
    }
    if shown
        .iter()
        .flat_map(|s| &s.backends)
        .any(|b| b.weight_override.is_some())
    {
        let _ = writeln!(out, "* weight set with `lbctl weight`");
    }
    let _ = writeln!(out);
    let _ = write!(out, "interfaces: {}", status.interfaces.join(", "));
    if !status.tc_attach.is_empty() {
        let _ = write!(out, " (attached by {})", status.tc_attach);
    }
    if !status.xdp.is_empty() {
        let _ = write!(out, "; XDP fast path on {}", status.xdp.join(", "));
    }
    if status.peer_ports > 0 {
        let _ = write!(
            out,
            "; {} veth{} into local containers reached directly",
            status.peer_ports,
            if status.peer_ports == 1 { "" } else { "s" }
        );
    }
    let _ = writeln!(out);
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
    if let Some(e) = &status.etcd {
        let state = if e.connected {
            format!("connected, revision {}", e.revision)
        } else {
            format!(
                "NOT connected, serving the last known state: {}",
                e.last_error.as_deref().unwrap_or("not reached yet")
            )
        };
        let _ = writeln!(out, "etcd: {} {} {state}", e.endpoints.join(","), e.prefix);
        for r in &e.rejected {
            let _ = writeln!(out, "etcd: rejected {r}");
        }
        for f in &e.failed {
            let _ = writeln!(out, "etcd: NOT applied {f}");
        }
        if let Some(lease) = e.lease {
            let _ = writeln!(
                out,
                "etcd: registered {} backends under lease {lease:x}",
                e.registered.len()
            );
        }
        if let Some(err) = &e.register_error {
            let _ = writeln!(out, "etcd: NOT registering: {err}");
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

/// One row per frontend, then one per backend.
fn write_services(out: &mut String, services: &[&ServiceStatus]) {
    let mut rows = vec![[
        "SERVICE", "FRONTEND", "BACKEND", "NODE", "STATE", "WEIGHT", "ACTIVE", "FLOWS", "PACKETS",
        "BYTES", "REPLIES",
    ]
    .map(String::from)];
    for s in services {
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
    write_columns(out, &rows);
}

/// The Swarm services, then their tasks.
fn write_swarm(out: &mut String, services: &[SwarmService]) {
    let list = |items: Vec<String>| match items.is_empty() {
        true => "-".to_string(),
        false => items.join(", "),
    };
    let mut rows = vec![[
        "SWARM SERVICE",
        "PUBLISHED",
        "VIPS",
        "MESH FLOWS",
        "VIP FLOWS",
        "NODE ADDRESSES",
    ]
    .map(String::from)];
    let flows = |counters: Vec<&Counters>| match counters.is_empty() {
        true => "-".to_string(),
        false => counters
            .iter()
            .map(|c| c.new_flows)
            .sum::<u64>()
            .to_string(),
    };
    for s in services {
        rows.push([
            s.name.clone(),
            list(
                s.ports
                    .iter()
                    .map(|p| format!("{}/{}", p.port, p.proto))
                    .collect(),
            ),
            list(
                s.vips
                    .iter()
                    .map(|v| format!("{} (vxlan {})", v.address, v.network))
                    .collect(),
            ),
            flows(s.ports.iter().map(|p| &p.counters).collect()),
            flows(s.vips.iter().map(|v| &v.counters).collect()),
            list(s.node_addresses.clone()),
        ]);
    }
    write_columns(out, &rows);
    let _ = writeln!(out);
    let mut rows = vec![[
        "SWARM SERVICE",
        "TASK",
        "NETWORK",
        "NODE",
        "STATE",
        "ACTIVE",
        "FLOWS",
        "PACKETS",
        "BYTES",
        "REPLIES",
    ]
    .map(String::from)];
    for s in services {
        for t in &s.tasks {
            let c = &t.counters;
            // The socket programs behind a VIP count connections only.
            let mesh = |n: u64| match t.network {
                None => n.to_string(),
                Some(_) => "-".to_string(),
            };
            rows.push([
                s.name.clone(),
                t.address.clone(),
                match t.network {
                    None => "ingress".to_string(),
                    Some(vni) => format!("vxlan {vni}"),
                },
                t.node.clone().unwrap_or_else(|| "-".into()),
                t.state.clone(),
                mesh(t.active_flows),
                c.new_flows.to_string(),
                mesh(c.packets),
                mesh(c.bytes),
                mesh(c.reply_packets),
            ]);
        }
    }
    write_columns(out, &rows);
    if services.iter().all(|s| s.tasks.is_empty()) {
        let _ = writeln!(out, "(no tasks)");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(address: &str, node: Option<&str>, new_flows: u64) -> BackendStatus {
        BackendStatus {
            id: 1,
            address: address.into(),
            weight: 1,
            state: "active".into(),
            node: node.map(String::from),
            active_flows: 0,
            weight_override: None,
            counters: Counters {
                new_flows,
                ..Default::default()
            },
        }
    }

    fn service(
        name: &str,
        frontend: &str,
        source: &str,
        backends: Vec<BackendStatus>,
    ) -> ServiceStatus {
        ServiceStatus {
            name: name.into(),
            frontend: frontend.into(),
            source: source.into(),
            counters: Counters {
                new_flows: backends.iter().map(|b| b.counters.new_flows).sum(),
                ..Default::default()
            },
            backends,
        }
    }

    /// A config service and a Swarm service `api` publishing 8080/tcp on
    /// one node address, with a VIP, as lbd reports them.
    fn sample() -> Status {
        let swarm = "docker:swarm";
        let services = vec![
            service(
                "api",
                "10.0.1.2:0/tcp",
                swarm,
                vec![backend("10.0.1.5:0", Some("10.74.0.11"), 3)],
            ),
            service(
                "api",
                "10.0.1.2:0/udp",
                swarm,
                vec![backend("10.0.1.5:0", Some("10.74.0.11"), 1)],
            ),
            service(
                "api",
                "10.74.0.11:8080/tcp",
                swarm,
                vec![backend("172.18.0.2:8080", None, 12)],
            ),
            service(
                "api",
                "172.18.0.2:8080/tcp",
                swarm,
                vec![backend("10.0.0.5:80", Some("10.74.0.11"), 12)],
            ),
            service(
                "web",
                "10.73.0.10:80/tcp",
                "config:/etc/lbd.toml",
                vec![backend("10.72.1.2:8080", None, 7)],
            ),
        ];
        let api = SwarmService {
            name: "api".into(),
            ports: vec![SwarmPort {
                port: 8080,
                proto: "tcp".into(),
                target: Some(80),
                frontend: "172.18.0.2:8080/tcp".into(),
                counters: services[3].counters.clone(),
            }],
            node_addresses: vec!["10.74.0.11".into()],
            vips: vec![SwarmVip {
                address: "10.0.1.2".into(),
                network: 4097,
                counters: Counters {
                    new_flows: 4,
                    ..Default::default()
                },
            }],
            tasks: vec![
                SwarmTask {
                    address: "10.0.0.5".into(),
                    network: None,
                    node: Some("10.74.0.11".into()),
                    state: "active".into(),
                    active_flows: 1,
                    counters: Counters {
                        new_flows: 12,
                        packets: 40,
                        bytes: 4000,
                        reply_packets: 38,
                        ..Default::default()
                    },
                },
                SwarmTask {
                    address: "10.0.1.5".into(),
                    network: Some(4097),
                    node: Some("10.74.0.11".into()),
                    state: "active".into(),
                    active_flows: 0,
                    counters: Counters {
                        new_flows: 4,
                        ..Default::default()
                    },
                },
            ],
            frontends: services[..4].iter().map(|s| s.frontend.clone()).collect(),
        };
        Status {
            services,
            swarm: vec![api],
            ..Default::default()
        }
    }

    /// The table's lines up to the first after the tables.
    fn tables(text: &str) -> Vec<&str> {
        let end = text.find("\ninterfaces:").unwrap();
        text[..end].lines().collect()
    }

    #[test]
    fn a_swarm_service_is_one_row_and_its_tasks_follow() {
        let text = render_table(&sample(), false);
        assert_eq!(
            tables(&text),
            [
                "SERVICE  FRONTEND           BACKEND         NODE  STATE   WEIGHT  ACTIVE  FLOWS  PACKETS  BYTES  REPLIES",
                "web      10.73.0.10:80/tcp  (1 backends)                          0       7      0        0      0",
                "                            10.72.1.2:8080  -     active  1       0       7      0        0      0",
                "",
                "SWARM SERVICE  PUBLISHED  VIPS                   MESH FLOWS  VIP FLOWS  NODE ADDRESSES",
                "api            8080/tcp   10.0.1.2 (vxlan 4097)  12          4          10.74.0.11",
                "",
                "SWARM SERVICE  TASK      NETWORK     NODE        STATE   ACTIVE  FLOWS  PACKETS  BYTES  REPLIES",
                "api            10.0.0.5  ingress     10.74.0.11  active  1       12     40       4000   38",
                "api            10.0.1.5  vxlan 4097  10.74.0.11  active  -       4      -        -      -",
            ]
        );
    }

    #[test]
    fn all_lists_the_swarm_frontends_too() {
        let text = render_table(&sample(), true);
        let lines = tables(&text);
        let names: Vec<String> = lines
            .iter()
            .take_while(|l| !l.is_empty())
            .filter(|l| !l.starts_with(' '))
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            names,
            [
                "SERVICE FRONTEND",
                "api 10.0.1.2:0/tcp",
                "api 10.0.1.2:0/udp",
                "api 10.74.0.11:8080/tcp",
                "api 172.18.0.2:8080/tcp",
                "web 10.73.0.10:80/tcp",
            ]
        );
        assert!(lines.contains(&"SWARM SERVICE  PUBLISHED  VIPS                   MESH FLOWS  VIP FLOWS  NODE ADDRESSES"));
    }

    #[test]
    fn swarm_services_alone_and_none_at_all() {
        let mut status = sample();
        status.services.retain(|s| s.name == "api");
        let text = render_table(&status, false);
        assert!(
            tables(&text)[0].starts_with("SWARM SERVICE  PUBLISHED"),
            "{text}"
        );
        assert!(!text.contains("(no services)"), "{text}");

        let mut quiet = sample();
        quiet.swarm[0].ports.clear();
        quiet.swarm[0].node_addresses.clear();
        quiet.swarm[0].tasks.clear();
        let text = render_table(&quiet, false);
        assert!(
            text.contains(
                "\napi            -          10.0.1.2 (vxlan 4097)  -           4          -\n"
            ),
            "{text}"
        );
        assert!(text.contains("\n(no tasks)\n"), "{text}");

        let text = render_table(&Status::default(), false);
        assert!(text.starts_with("SERVICE  FRONTEND"), "{text}");
        assert!(text.contains("\n(no services)\n"), "{text}");
    }

    #[test]
    fn a_swarm_service_by_name_is_kept_whole() {
        let mut status = sample();
        retain_service(&mut status, "api").unwrap();
        assert_eq!(status.swarm.len(), 1);
        assert_eq!(status.services.len(), 4, "its frontends stay in the JSON");
        let text = render_table(&status, false);
        assert!(!text.contains("\nSERVICE "), "{text}");

        // A frontend is shown as such.
        let mut status = sample();
        retain_service(&mut status, "10.74.0.11:8080/tcp").unwrap();
        assert!(status.swarm.is_empty());
        assert_eq!(status.services.len(), 1);
        assert!(render_table(&status, false).contains("\napi      10.74.0.11:8080/tcp"));

        let mut status = sample();
        retain_service(&mut status, "web").unwrap();
        assert_eq!((status.services.len(), status.swarm.len()), (1, 0));

        // Another source's `api` makes the name ambiguous.
        let mut status = sample();
        let mut other = status.services[4].clone();
        other.name = "api".into();
        status.services.push(other);
        let err = retain_service(&mut status, "api").unwrap_err();
        assert!(err.contains("several services"), "{err}");
        assert!(retain_service(&mut sample(), "nothing").is_err());
    }
}
