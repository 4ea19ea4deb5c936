//! The Prometheus exposition of a `Status`.
//!
//! Every scrape builds a fresh registry from the status the daemon reports.
//! The counters live in BPF maps, not here, so keeping collectors in this
//! process would only mean copying the same numbers twice; a fresh registry
//! also drops the series of removed services and backends by itself.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{text, EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::status::{Counters, Status};

/// The content type of what `encode` returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// States a backend can be in. All of them are exported for every backend
/// (1 for the current one, 0 for the others), so that a query such as
/// `lb_backend_state{state="down"} == 1` works without knowing which
/// states exist. Why a backend is down is a label of its own metric
/// (`lb_backend_down_reason`), so that the state label keeps fixed values.
const BACKEND_STATES: [&str; 3] = ["active", "draining", "down"];

/// Status says "down (why)": the state, and the reason if there is one.
fn split_state(state: &str) -> (&str, Option<&str>) {
    match state.split_once(" (") {
        Some((kind, rest)) => (kind, Some(rest.strip_suffix(')').unwrap_or(rest))),
        None => (state, None),
    }
}

/// A label value escaped as the text format requires. prometheus-client
/// writes values verbatim, and service names can come from Docker labels,
/// which may hold quotes, backslashes or newlines.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Text(String);

impl Text {
    fn new(s: &str) -> Text {
        Text(s.to_string())
    }
}

impl EncodeLabelValue for Text {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: Text,
    frontend: Text,
    source: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    service: Text,
    frontend: Text,
    backend: Text,
    source: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendStateLabels {
    service: Text,
    frontend: Text,
    backend: Text,
    source: Text,
    state: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DownReasonLabels {
    service: Text,
    frontend: Text,
    backend: Text,
    source: Text,
    reason: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    service: Text,
    frontend: Text,
    source: Text,
    reason: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CounterLabels {
    counter: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    host: Text,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: Text,
}

type U64Counter = Counter<u64, AtomicU64>;
type F64Gauge = Gauge<f64, AtomicU64>;

/// One family per field of `Counters`, for services or for backends.
struct TrafficFamilies<L> {
    packets: Family<L, U64Counter>,
    bytes: Family<L, U64Counter>,
    new_flows: Family<L, U64Counter>,
    reply_packets: Family<L, U64Counter>,
    reply_bytes: Family<L, U64Counter>,
}

impl<L> TrafficFamilies<L>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    fn register(registry: &mut Registry, what: &str) -> Self {
        let families = TrafficFamilies {
            packets: Family::default(),
            bytes: Family::default(),
            new_flows: Family::default(),
            reply_packets: Family::default(),
            reply_bytes: Family::default(),
        };
        registry.register(
            format!("{what}_packets"),
            format!("Packets from clients translated for the {what}"),
            families.packets.clone(),
        );
        // With a unit, prometheus-client appends it to the name:
        // lb_{what}_bytes_total, lb_{what}_reply_bytes_total.
        registry.register_with_unit(
            what,
            format!("Bytes from clients translated for the {what}"),
            Unit::Bytes,
            families.bytes.clone(),
        );
        registry.register(
            format!("{what}_new_flows"),
            format!("New flows assigned to the {what}"),
            families.new_flows.clone(),
        );
        registry.register(
            format!("{what}_reply_packets"),
            format!("Reply packets translated back for the {what}"),
            families.reply_packets.clone(),
        );
        registry.register_with_unit(
            format!("{what}_reply"),
            format!("Reply bytes translated back for the {what}"),
            Unit::Bytes,
            families.reply_bytes.clone(),
        );
        families
    }

    fn add(&self, labels: &L, c: &Counters) {
        self.packets.get_or_create(labels).inc_by(c.packets);
        self.bytes.get_or_create(labels).inc_by(c.bytes);
        self.new_flows.get_or_create(labels).inc_by(c.new_flows);
        self.reply_packets
            .get_or_create(labels)
            .inc_by(c.reply_packets);
        self.reply_bytes.get_or_create(labels).inc_by(c.reply_bytes);
    }
}

/// The OpenMetrics text exposition of `status`.
pub fn encode(status: &Status) -> String {
    let mut registry = Registry::with_prefix("lb");

    let services = TrafficFamilies::<ServiceLabels>::register(&mut registry, "service");
    let no_backend = Family::<ServiceLabels, U64Counter>::default();
    registry.register(
        "service_no_backend_drops",
        "Packets for the service dropped because it had no usable backend",
        no_backend.clone(),
    );
    let backends = TrafficFamilies::<BackendLabels>::register(&mut registry, "backend");
    let weight = Family::<BackendLabels, Gauge>::default();
    registry.register(
        "backend_weight",
        "Configured weight of the backend (0 drains it)",
        weight.clone(),
    );
    let active = Family::<BackendLabels, Gauge>::default();
    registry.register(
        "backend_active_flows",
        "Tracked flows of the backend that saw a packet in the last minute",
        active.clone(),
    );
    let state = Family::<BackendStateLabels, Gauge>::default();
    registry.register(
        "backend_state",
        "1 for the state the backend is in, 0 for the others",
        state.clone(),
    );
    let down_reason = Family::<DownReasonLabels, Gauge>::default();
    registry.register(
        "backend_down_reason",
        "1 for a backend that is down, labelled with why (its failed health check)",
        down_reason.clone(),
    );

    for s in &status.services {
        let labels = ServiceLabels {
            service: Text::new(&s.name),
            frontend: Text::new(&s.frontend),
            source: Text::new(&s.source),
        };
        services.add(&labels, &s.counters);
        no_backend
            .get_or_create(&labels)
            .inc_by(s.counters.no_backend);
        for b in &s.backends {
            let labels = BackendLabels {
                service: Text::new(&s.name),
                frontend: Text::new(&s.frontend),
                backend: Text::new(&b.address),
                source: Text::new(&s.source),
            };
            backends.add(&labels, &b.counters);
            weight.get_or_create(&labels).set(i64::from(b.weight));
            active
                .get_or_create(&labels)
                .set(i64::try_from(b.active_flows).unwrap_or(i64::MAX));
            let (current, reason) = split_state(&b.state);
            if let Some(reason) = reason {
                let labels = DownReasonLabels {
                    service: labels.service.clone(),
                    frontend: labels.frontend.clone(),
                    backend: labels.backend.clone(),
                    source: labels.source.clone(),
                    reason: Text::new(reason),
                };
                down_reason.get_or_create(&labels).set(1);
            }
            let mut states: Vec<&str> = BACKEND_STATES.to_vec();
            if !states.contains(&current) {
                states.push(current);
            }
            for name in states {
                let labels = BackendStateLabels {
                    service: labels.service.clone(),
                    frontend: labels.frontend.clone(),
                    backend: labels.backend.clone(),
                    source: labels.source.clone(),
                    state: Text::new(name),
                };
                state.get_or_create(&labels).set(i64::from(name == current));
            }
        }
    }

    let datapath = Family::<CounterLabels, U64Counter>::default();
    registry.register(
        "datapath_events",
        "Datapath-wide counters, by what they count",
        datapath.clone(),
    );
    for (name, value) in &status.datapath {
        datapath
            .get_or_create(&CounterLabels {
                counter: Text::new(name),
            })
            .inc_by(*value);
    }

    let reloads = U64Counter::default();
    reloads.inc_by(status.config.reloads);
    registry.register("config_reloads", "Configuration reloads attempted", reloads);
    let failed = Gauge::<i64>::default();
    failed.set(i64::from(status.config.last_error.is_some()));
    registry.register(
        "config_last_reload_failed",
        "1 if the last configuration reload was rejected (the previous state keeps serving)",
        failed,
    );

    let count = |n: usize| {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(n).unwrap_or(i64::MAX));
        g
    };
    registry.register(
        "services",
        "Services applied to the datapath",
        count(status.services.len()),
    );
    registry.register(
        "conflicts",
        "Services rejected because another service owns their frontend",
        count(status.conflicts.len()),
    );
    let failing = Family::<FailureLabels, Gauge>::default();
    for f in &status.failing {
        failing
            .get_or_create(&FailureLabels {
                service: Text::new(&f.name),
                frontend: Text::new(&f.frontend),
                source: Text::new(&f.source),
                reason: Text::new(&f.reason),
            })
            .set(1);
    }
    registry.register(
        "service_apply_failed",
        "1 for a service that could not be applied to the datapath, labelled with why",
        failing,
    );
    registry.register(
        "interfaces",
        "Interfaces the datapath is attached to",
        count(status.interfaces.len()),
    );

    if let Some(docker) = &status.docker {
        let connected = Family::<HostLabels, Gauge>::default();
        connected
            .get_or_create(&HostLabels {
                host: Text::new(&docker.host),
            })
            .set(i64::from(docker.connected));
        registry.register(
            "docker_connected",
            "1 while lbd is connected to the Docker engine",
            connected,
        );
        let resyncs = U64Counter::default();
        resyncs.inc_by(docker.resyncs);
        registry.register(
            "docker_resyncs",
            "Full resynchronisations with the Docker engine",
            resyncs,
        );
    }

    if let Some(etcd) = &status.etcd {
        let gauge = |v: u64| {
            let g = Gauge::<i64>::default();
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
            g
        };
        registry.register(
            "etcd_connected",
            "1 while lbd is connected to etcd (the last state keeps serving while it is not)",
            gauge(u64::from(etcd.connected)),
        );
        registry.register(
            "etcd_revision",
            "The latest etcd revision lbd has seen",
            gauge(etcd.revision),
        );
        registry.register(
            "etcd_applied_revision",
            "The etcd revision whose keys the datapath holds",
            gauge(etcd.applied_revision),
        );
        registry.register(
            "etcd_rejected_keys",
            "etcd keys skipped as malformed or not allowed",
            gauge(etcd.rejected.len() as u64),
        );
        let resyncs = U64Counter::default();
        resyncs.inc_by(etcd.resyncs);
        registry.register(
            "etcd_resyncs",
            "Full reads of the watched etcd keys",
            resyncs,
        );
        if etcd.lease.is_some() || etcd.register_error.is_some() {
            registry.register(
                "etcd_registered",
                "Backends this node has registered in etcd under its lease",
                gauge(etcd.registered.len() as u64),
            );
        }
    }

    let ct = Gauge::<i64>::default();
    ct.set(i64::try_from(status.conntrack_entries).unwrap_or(i64::MAX));
    registry.register("conntrack_entries", "Flows in the conntrack table", ct);
    let cap = Gauge::<i64>::default();
    cap.set(i64::try_from(status.conntrack_capacity).unwrap_or(i64::MAX));
    registry.register("conntrack_capacity", "Capacity of the conntrack table", cap);
    let pending = Gauge::<i64>::default();
    pending.set(i64::try_from(status.conntrack.pending).unwrap_or(i64::MAX));
    registry.register(
        "conntrack_pending",
        "Connections not confirmed yet (handshake incomplete, or no reply)",
        pending,
    );
    let gc = U64Counter::default();
    gc.inc_by(status.conntrack.gc_removed);
    registry.register(
        "conntrack_expired_removed",
        "Expired conntrack entries deleted by lbd",
        gc,
    );
    // The conntrack counts come from a census taken in the background.
    if let Some(age_ms) = status.conntrack.census_age_ms {
        let age = F64Gauge::default();
        age.set(age_ms as f64 / 1000.0);
        registry.register_with_unit(
            "conntrack_census_age",
            "How old the conntrack counts are",
            Unit::Seconds,
            age,
        );
    }
    let reconciles = U64Counter::default();
    reconciles.inc_by(status.reconcile.count);
    registry.register(
        "reconciles",
        "Reconciliations that changed the datapath's maps",
        reconciles,
    );
    for (name, help, ms) in [
        (
            "reconcile_last",
            "Duration of the latest reconciliation",
            status.reconcile.last_ms,
        ),
        (
            "reconcile_max",
            "Longest reconciliation so far",
            status.reconcile.max_ms,
        ),
    ] {
        let gauge = F64Gauge::default();
        gauge.set(ms / 1000.0);
        registry.register_with_unit(name, help, Unit::Seconds, gauge);
    }

    if let Some(conv) = &status.convergence {
        let what = "the time from a Docker event to the datapath change it caused, \
                    over the recent samples";
        for (name, quantile, ms) in [
            ("p50", "Median of", conv.p50_ms),
            ("p99", "99th percentile of", conv.p99_ms),
        ] {
            let gauge = F64Gauge::default();
            gauge.set(ms / 1000.0);
            registry.register_with_unit(
                format!("convergence_{name}"),
                format!("{quantile} {what}"),
                Unit::Seconds,
                gauge,
            );
        }
        registry.register(
            "convergence_samples",
            "Samples behind the convergence quantiles",
            count(conv.samples),
        );
    }

    let up = Family::<TaskLabels, Gauge>::default();
    let restarts = Family::<TaskLabels, U64Counter>::default();
    for (name, task) in &status.tasks {
        let labels = TaskLabels {
            task: Text::new(name),
        };
        up.get_or_create(&labels).set(i64::from(task.running));
        restarts.get_or_create(&labels).inc_by(task.restarts);
    }
    registry.register(
        "task_up",
        "1 while lbd's background task runs (0 while it waits to be restarted)",
        up,
    );
    registry.register(
        "task_restarts",
        "Times lbd's background task failed and was started again",
        restarts,
    );

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::docker::DockerStatus;
    use crate::status::{BackendStatus, ConfigStatus, Convergence, ServiceStatus};

    fn counters(n: u64) -> Counters {
        Counters {
            packets: n * 10,
            bytes: n * 1000,
            new_flows: n,
            reply_packets: n * 9,
            reply_bytes: n * 900,
            no_backend: 0,
        }
    }

    fn sample() -> Status {
        Status {
            services: vec![ServiceStatus {
                name: "we\"b\\".into(),
                frontend: "10.73.0.10:80/tcp".into(),
                source: "config:/etc/lbd.toml".into(),
                counters: Counters {
                    no_backend: 3,
                    ..counters(50)
                },
                backends: vec![
                    BackendStatus {
                        node: None,
                        id: 1,
                        address: "10.72.1.2:8080".into(),
                        weight: 2,
                        state: "active".into(),
                        active_flows: 5,
                        weight_override: None,
                        counters: counters(30),
                    },
                    BackendStatus {
                        node: None,
                        id: 2,
                        address: "10.72.2.2:8080".into(),
                        weight: 0,
                        state: "draining".into(),
                        active_flows: 2,
                        weight_override: None,
                        counters: counters(20),
                    },
                    BackendStatus {
                        node: None,
                        id: 3,
                        address: "10.72.3.2:8080".into(),
                        weight: 1,
                        state: "down (tcp: connection refused)".into(),
                        active_flows: 0,
                        weight_override: None,
                        counters: counters(0),
                    },
                ],
            }],
            swarm: Vec::new(),
            interfaces: vec!["eth0".into()],
            tc_attach: "tcx".into(),
            xdp: vec![],
            peer_ports: 0,
            config: ConfigStatus {
                path: Some("/etc/lbd.toml".into()),
                last_error: Some("bad".into()),
                reloads: 4,
            },
            docker: Some(DockerStatus {
                host: "unix:///var/run/docker.sock".into(),
                connected: true,
                ..Default::default()
            }),
            etcd: Some(lb_api::status::EtcdStatus {
                connected: true,
                revision: 42,
                applied_revision: 41,
                rejected: vec!["/lb/services/x/colour: unknown key".into()],
                ..Default::default()
            }),
            conflicts: Vec::new(),
            failing: vec![crate::reconciler::ServiceFailure {
                name: "api".into(),
                frontend: "10.73.0.11:80/tcp".into(),
                source: "docker:labels".into(),
                reason: "the backend map is \"full\"".into(),
            }],
            convergence: Some(Convergence {
                samples: 10,
                p50_ms: 2.5,
                p99_ms: 40.0,
                max_ms: 50.0,
            }),
            reconcile: Default::default(),
            conntrack_entries: 12,
            conntrack_capacity: 1024,
            conntrack: crate::status::ConntrackStatus {
                confirmed: 10,
                pending: 2,
                census_age_ms: Some(1500),
                ..Default::default()
            },
            datapath: [("seen".to_string(), 7), ("malformed".to_string(), 1)]
                .into_iter()
                .collect(),
            tasks: [(
                "interfaces".to_string(),
                crate::status::TaskStatus {
                    running: false,
                    restarts: 2,
                    ..Default::default()
                },
            )]
            .into_iter()
            .collect(),
        }
    }

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix} in\n{text}"))
    }

    #[test]
    fn exposes_every_family_with_escaped_labels() {
        let text = encode(&sample());
        let svc = r#"service="we\"b\\",frontend="10.73.0.10:80/tcp",source="config:/etc/lbd.toml""#;
        assert_eq!(
            line(&text, &format!("lb_service_new_flows_total{{{svc}}}")),
            format!("lb_service_new_flows_total{{{svc}}} 50")
        );
        line(
            &text,
            &format!("lb_service_no_backend_drops_total{{{svc}}} 3"),
        );
        line(&text, &format!("lb_service_bytes_total{{{svc}}} 50000"));
        line(
            &text,
            &format!("lb_service_reply_bytes_total{{{svc}}} 45000"),
        );
        let b2 = r#"service="we\"b\\",frontend="10.73.0.10:80/tcp",backend="10.72.2.2:8080",source="config:/etc/lbd.toml""#;
        line(&text, &format!("lb_backend_new_flows_total{{{b2}}} 20"));
        line(&text, &format!("lb_backend_weight{{{b2}}} 0"));
        line(&text, &format!("lb_backend_active_flows{{{b2}}} 2"));
        line(
            &text,
            &format!("lb_backend_state{{{b2},state=\"draining\"}} 1"),
        );
        line(
            &text,
            &format!("lb_backend_state{{{b2},state=\"active\"}} 0"),
        );
        line(&text, &format!("lb_backend_state{{{b2},state=\"down\"}} 0"));
        // A backend that is down: the state label takes a fixed value, the
        // reason goes to its own metric.
        let b3 = r#"service="we\"b\\",frontend="10.73.0.10:80/tcp",backend="10.72.3.2:8080",source="config:/etc/lbd.toml""#;
        line(&text, &format!("lb_backend_state{{{b3},state=\"down\"}} 1"));
        line(
            &text,
            &format!("lb_backend_state{{{b3},state=\"active\"}} 0"),
        );
        assert!(
            !text.contains("state=\"down ("),
            "a reason in the state label:\n{text}"
        );
        line(
            &text,
            &format!("lb_backend_down_reason{{{b3},reason=\"tcp: connection refused\"}} 1"),
        );
        line(&text, "lb_datapath_events_total{counter=\"seen\"} 7");
        line(&text, "lb_config_reloads_total 4");
        line(&text, "lb_config_last_reload_failed 1");
        line(&text, "lb_services 1");
        line(&text, "lb_conntrack_entries 12");
        line(&text, "lb_task_up{task=\"interfaces\"} 0");
        line(&text, "lb_task_restarts_total{task=\"interfaces\"} 2");
        line(&text, "lb_conntrack_capacity 1024");
        line(&text, "lb_conntrack_pending 2");
        line(&text, "lb_conntrack_census_age_seconds 1.5");
        line(&text, "lb_conflicts 0");
        line(
            &text,
            r#"lb_service_apply_failed{service="api",frontend="10.73.0.11:80/tcp",source="docker:labels",reason="the backend map is \"full\""} 1"#,
        );
        line(
            &text,
            "lb_docker_connected{host=\"unix:///var/run/docker.sock\"} 1",
        );
        line(&text, "lb_etcd_connected 1");
        line(&text, "lb_etcd_revision 42");
        line(&text, "lb_etcd_applied_revision 41");
        line(&text, "lb_etcd_rejected_keys 1");
        assert!(!text.contains("lb_etcd_registered"), "{text}");
        line(&text, "lb_convergence_p50_seconds 0.0025");
        line(&text, "lb_convergence_p99_seconds 0.04");
        line(&text, "# TYPE lb_service_packets counter");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn optional_parts_are_left_out() {
        let text = encode(&Status::default());
        assert!(!text.contains("lb_docker"), "{text}");
        assert!(!text.contains("lb_etcd"), "{text}");
        assert!(!text.contains("lb_convergence"), "{text}");
        line(&text, "lb_services 0");
        line(&text, "lb_config_last_reload_failed 0");
    }
}
