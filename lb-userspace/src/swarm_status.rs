//! Swarm services told once (`Status::swarm`), from the frontends the
//! Docker source makes of them (sources/swarm.rs, sources/service_vips.rs).
//!
//! What each frontend is for is read from its spec, never guessed from its
//! addresses: the mesh's stage 2 is the one with full NAT (`snat`) and no
//! network; a stage 1 has a single backend, which is a stage-2 frontend of
//! the same service and protocol; a VIP belongs to a network (`network`)
//! and takes every port (port 0). A Swarm frontend of no such shape (a
//! stage 1 whose stage 2 could not be applied) is told nowhere here, and so
//! keeps its own row in the status.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use crate::model::{Proto, ServiceSpec};
use crate::sources::swarm::SOURCE;
use crate::status::{Counters, ServiceStatus, SwarmPort, SwarmService, SwarmTask, SwarmVip};

/// Groups the Swarm services among `services` (each spec with its status,
/// whose backends are in the spec's order) by name; the others are left
/// out. Sorted by name.
pub fn group<'a>(
    services: impl IntoIterator<Item = (&'a ServiceSpec, &'a ServiceStatus)>,
) -> Vec<SwarmService> {
    let swarm: Vec<(&ServiceSpec, &ServiceStatus)> = services
        .into_iter()
        .filter(|(spec, _)| spec.source == SOURCE)
        .collect();
    let stage2: BTreeSet<(&str, Proto, SocketAddr)> = swarm
        .iter()
        .filter(|(spec, _)| is_stage2(spec))
        .map(|(spec, _)| {
            let f = spec.frontend;
            (spec.name.as_str(), f.proto, SocketAddr::new(f.addr, f.port))
        })
        .collect();
    let mut groups: BTreeMap<&str, Group> = BTreeMap::new();
    for (spec, status) in swarm {
        let role = if let (Some(vni), 0) = (spec.network, spec.frontend.port) {
            Role::Vip(vni)
        } else if is_stage2(spec) {
            Role::Stage2
        } else if is_stage1(spec, &stage2) {
            Role::Stage1
        } else {
            continue;
        };
        let group = groups.entry(&spec.name).or_default();
        group.frontends.push(status.frontend.clone());
        match role {
            Role::Stage1 => {
                group.nodes.insert(spec.frontend.addr);
            }
            Role::Stage2 => {
                group.ports.push(SwarmPort {
                    port: spec.frontend.port,
                    proto: spec.frontend.proto.to_string(),
                    target: spec.backends.first().map(|b| b.port),
                    frontend: status.frontend.clone(),
                    counters: status.counters.clone(),
                });
                group.add_tasks(None, spec, status);
            }
            Role::Vip(vni) => {
                *group.vips.entry((vni, spec.frontend.addr)).or_default() += &status.counters;
                group.add_tasks(Some(vni), spec, status);
            }
        }
    }
    groups.into_iter().map(|(name, g)| g.finish(name)).collect()
}

enum Role {
    Stage1,
    Stage2,
    Vip(u32),
}

fn is_stage2(spec: &ServiceSpec) -> bool {
    spec.network.is_none() && spec.snat.is_some()
}

fn is_stage1(spec: &ServiceSpec, stage2: &BTreeSet<(&str, Proto, SocketAddr)>) -> bool {
    match spec.backends.as_slice() {
        [to] if spec.network.is_none() && spec.snat.is_none() => {
            stage2.contains(&(spec.name.as_str(), spec.frontend.proto, to.socket_addr()))
        }
        _ => false,
    }
}

#[derive(Default)]
struct Group {
    ports: Vec<SwarmPort>,
    nodes: BTreeSet<IpAddr>,
    vips: BTreeMap<(u32, IpAddr), Counters>,
    /// By network (None, the ingress overlay, first) and address.
    tasks: BTreeMap<(Option<u32>, IpAddr), Task>,
    frontends: Vec<String>,
}

#[derive(Default)]
struct Task {
    node: Option<String>,
    states: Vec<String>,
    active_flows: u64,
    counters: Counters,
}

impl Group {
    /// A frontend's backends are tasks on `network` (the same task for
    /// each published port, or for TCP and UDP of a VIP).
    fn add_tasks(&mut self, network: Option<u32>, spec: &ServiceSpec, status: &ServiceStatus) {
        for (b, seen) in spec.backends.iter().zip(&status.backends) {
            let task = self.tasks.entry((network, b.addr)).or_default();
            if task.node.is_none() {
                task.node = seen.node.clone();
            }
            if !task.states.contains(&seen.state) {
                task.states.push(seen.state.clone());
            }
            task.active_flows += seen.active_flows;
            task.counters += &seen.counters;
        }
    }

    fn finish(mut self, name: &str) -> SwarmService {
        self.ports
            .sort_by(|a, b| (a.port, &a.proto).cmp(&(b.port, &b.proto)));
        self.frontends.sort();
        SwarmService {
            name: name.to_string(),
            ports: self.ports,
            node_addresses: self.nodes.iter().map(IpAddr::to_string).collect(),
            vips: self
                .vips
                .into_iter()
                .map(|((network, addr), counters)| SwarmVip {
                    address: addr.to_string(),
                    network,
                    counters,
                })
                .collect(),
            tasks: self
                .tasks
                .into_iter()
                .map(|((network, addr), t)| SwarmTask {
                    address: addr.to_string(),
                    network,
                    node: t.node,
                    state: t.states.join(", "),
                    active_flows: t.active_flows,
                    counters: t.counters,
                })
                .collect(),
            frontends: self.frontends,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use bollard::models::NetworkInspect;

    use super::*;
    use crate::model::{BackendSpec, Frontend};
    use crate::status::BackendStatus;

    const GATEWAY: &str = "172.18.0.2";
    const OVERLAY: &str = "10.0.0.2";
    const NODES: [&str; 2] = ["10.74.0.11", "172.17.0.1"];

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn spec(name: &str, frontend: &str, backends: &[&str]) -> ServiceSpec {
        let (addr, proto) = frontend.rsplit_once('/').unwrap();
        let addr: SocketAddr = addr.parse().unwrap();
        ServiceSpec {
            name: name.into(),
            frontend: Frontend {
                addr: addr.ip(),
                port: addr.port(),
                proto: match proto {
                    "udp" => Proto::Udp,
                    _ => Proto::Tcp,
                },
            },
            backends: backends
                .iter()
                .map(|b| {
                    let b: SocketAddr = b.parse().unwrap();
                    BackendSpec {
                        addr: b.ip(),
                        port: b.port(),
                        weight: 1,
                    }
                })
                .collect(),
            snat: None,
            affinity_secs: 0,
            table_size: None,
            health: None,
            source: SOURCE.into(),
            network: None,
            local_frontend: true,
        }
    }

    /// What swarm.rs makes of one published port: the sandbox's frontend
    /// to the tasks, then one per node address to the sandbox.
    fn published(
        name: &str,
        port: u16,
        proto: &str,
        target: u16,
        tasks: &[&str],
    ) -> Vec<ServiceSpec> {
        let tasks: Vec<String> = tasks.iter().map(|t| format!("{t}:{target}")).collect();
        let tasks: Vec<&str> = tasks.iter().map(String::as_str).collect();
        let mut stage2 = spec(name, &format!("{GATEWAY}:{port}/{proto}"), &tasks);
        stage2.snat = Some(ip(OVERLAY));
        let sbox = format!("{GATEWAY}:{port}");
        let mut out = vec![stage2];
        for node in NODES {
            out.push(spec(name, &format!("{node}:{port}/{proto}"), &[&sbox]));
        }
        out
    }

    /// What service_vips.rs makes of one VIP: TCP and UDP, every port.
    fn vip(name: &str, vip: &str, vni: u32, tasks: &[&str]) -> Vec<ServiceSpec> {
        let tasks: Vec<String> = tasks.iter().map(|t| format!("{t}:0")).collect();
        let tasks: Vec<&str> = tasks.iter().map(String::as_str).collect();
        ["tcp", "udp"]
            .map(|proto| ServiceSpec {
                network: Some(vni),
                ..spec(name, &format!("{vip}:0/{proto}"), &tasks)
            })
            .into()
    }

    /// The status lbd would collect: each backend's node from `nodes`, and
    /// as counters 10 new flows per backend (1 on a VIP) plus the packets
    /// and bytes of a mesh.
    fn statuses(specs: &[ServiceSpec], nodes: &[(&str, &str)]) -> Vec<ServiceStatus> {
        specs
            .iter()
            .map(|s| {
                let counters = |n: u64| match s.network {
                    Some(_) => Counters {
                        new_flows: n,
                        ..Default::default()
                    },
                    None => Counters {
                        new_flows: 10 * n,
                        packets: 100 * n,
                        bytes: 1000 * n,
                        reply_packets: 90 * n,
                        reply_bytes: 9000 * n,
                        no_backend: 0,
                    },
                };
                let backends: Vec<BackendStatus> = s
                    .backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| BackendStatus {
                        id: i as u32,
                        address: b.socket_addr().to_string(),
                        weight: b.weight,
                        state: "active".into(),
                        node: nodes
                            .iter()
                            .find(|(task, _)| ip(task) == b.addr)
                            .map(|(_, node)| node.to_string()),
                        active_flows: if s.network.is_some() { 0 } else { 2 },
                        weight_override: None,
                        counters: counters(1),
                    })
                    .collect();
                ServiceStatus {
                    name: s.name.clone(),
                    frontend: s.frontend.to_string(),
                    source: s.source.clone(),
                    counters: counters(backends.len() as u64),
                    backends,
                }
            })
            .collect()
    }

    fn grouped(specs: &[ServiceSpec], nodes: &[(&str, &str)]) -> Vec<SwarmService> {
        let statuses = statuses(specs, nodes);
        group(specs.iter().zip(&statuses))
    }

    /// Task address, network, node, state, active flows, new flows, packets.
    type TaskRow = (String, Option<u32>, Option<String>, String, u64, u64, u64);

    fn tasks(s: &SwarmService) -> Vec<TaskRow> {
        s.tasks
            .iter()
            .map(|t| {
                (
                    t.address.clone(),
                    t.network,
                    t.node.clone(),
                    t.state.clone(),
                    t.active_flows,
                    t.counters.new_flows,
                    t.counters.packets,
                )
            })
            .collect()
    }

    fn task(
        addr: &str,
        network: Option<u32>,
        node: &str,
        (active, flows, packets): (u64, u64, u64),
    ) -> TaskRow {
        let node = Some(node.to_string());
        (
            addr.into(),
            network,
            node,
            "active".into(),
            active,
            flows,
            packets,
        )
    }

    const TASK_NODES: [(&str, &str); 4] = [
        ("10.0.0.5", "10.74.0.11"),
        ("10.0.0.8", "10.74.0.12"),
        ("10.0.1.5", "10.74.0.11"),
        ("10.0.1.7", "10.74.0.12"),
    ];

    #[test]
    fn published_ports_and_a_vip_are_one_service() {
        let ingress = ["10.0.0.5", "10.0.0.8"];
        let mut specs = published("web", 8080, "tcp", 80, &ingress);
        specs.extend(published("web", 53, "udp", 5353, &ingress));
        specs.extend(vip("web", "10.0.1.2", 4097, &["10.0.1.5", "10.0.1.7"]));
        assert_eq!(specs.len(), 2 * 3 + 2);
        let out = grouped(&specs, &TASK_NODES);
        assert_eq!(out.len(), 1, "{out:#?}");
        let web = &out[0];
        assert_eq!(web.name, "web");
        let ports: Vec<(u16, &str, Option<u16>, &str, u64)> = web
            .ports
            .iter()
            .map(|p| {
                let (port, proto, target) = (p.port, p.proto.as_str(), p.target);
                (
                    port,
                    proto,
                    target,
                    p.frontend.as_str(),
                    p.counters.new_flows,
                )
            })
            .collect();
        assert_eq!(
            ports,
            [
                (53, "udp", Some(5353), "172.18.0.2:53/udp", 20),
                (8080, "tcp", Some(80), "172.18.0.2:8080/tcp", 20),
            ]
        );
        assert_eq!(web.node_addresses, NODES, "the sandbox is no node address");
        let vips: Vec<(&str, u32, u64)> = web
            .vips
            .iter()
            .map(|v| (v.address.as_str(), v.network, v.counters.new_flows))
            .collect();
        assert_eq!(vips, [("10.0.1.2", 4097, 4)], "TCP and UDP together");
        // Mesh tasks: both ports' backends summed; VIP tasks: TCP and UDP.
        assert_eq!(
            tasks(web),
            [
                task("10.0.0.5", None, "10.74.0.11", (4, 20, 200)),
                task("10.0.0.8", None, "10.74.0.12", (4, 20, 200)),
                task("10.0.1.5", Some(4097), "10.74.0.11", (0, 2, 0)),
                task("10.0.1.7", Some(4097), "10.74.0.12", (0, 2, 0)),
            ]
        );
        let mut frontends: Vec<String> = specs.iter().map(|s| s.frontend.to_string()).collect();
        frontends.sort();
        assert_eq!(web.frontends, frontends, "every frontend is told here");
    }

    #[test]
    fn a_service_with_only_a_vip() {
        let mut specs = vip("api", "10.0.1.2", 4097, &["10.0.1.5"]);
        specs.extend(vip("api", "10.0.2.9", 4098, &["10.0.2.4"]));
        let out = grouped(&specs, &TASK_NODES);
        assert_eq!(out.len(), 1);
        let api = &out[0];
        assert!(api.ports.is_empty() && api.node_addresses.is_empty());
        let vips: Vec<(&str, u32)> = api
            .vips
            .iter()
            .map(|v| (v.address.as_str(), v.network))
            .collect();
        assert_eq!(vips, [("10.0.1.2", 4097), ("10.0.2.9", 4098)]);
        let addresses: Vec<(&str, Option<u32>, Option<&str>)> = api
            .tasks
            .iter()
            .map(|t| (t.address.as_str(), t.network, t.node.as_deref()))
            .collect();
        assert_eq!(
            addresses,
            [
                ("10.0.1.5", Some(4097), Some("10.74.0.11")),
                ("10.0.2.4", Some(4098), None),
            ],
            "a task per network, its node when known"
        );
    }

    #[test]
    fn a_service_with_published_ports_only() {
        let specs = published("web", 8080, "tcp", 80, &["10.0.0.5"]);
        let out = grouped(&specs, &TASK_NODES);
        assert_eq!(out.len(), 1);
        assert!(out[0].vips.is_empty());
        assert_eq!(out[0].ports.len(), 1);
        assert_eq!(out[0].node_addresses, NODES);
        assert_eq!(
            tasks(&out[0]),
            [task("10.0.0.5", None, "10.74.0.11", (2, 10, 100))]
        );

        // Without tasks: the port is still published, to nobody.
        let specs = published("idle", 9000, "tcp", 80, &[]);
        let out = grouped(&specs, &TASK_NODES);
        assert_eq!((out[0].ports[0].target, out[0].tasks.len()), (None, 0));
        assert_eq!(out[0].node_addresses, NODES);
    }

    #[test]
    fn a_task_state_tells_each_state_of_its_frontends() {
        let ingress = ["10.0.0.5"];
        let mut specs = published("web", 8080, "tcp", 80, &ingress);
        specs.extend(published("web", 8443, "tcp", 443, &ingress));
        let mut statuses = statuses(&specs, &TASK_NODES);
        let drained = statuses
            .iter_mut()
            .find(|s| s.frontend == "172.18.0.2:8443/tcp")
            .unwrap();
        drained.backends[0].state = "draining".into();
        let out = group(specs.iter().zip(&statuses));
        assert_eq!(out[0].tasks[0].state, "active, draining");
    }

    #[test]
    fn other_sources_and_frontends_of_no_known_shape_are_not_grouped() {
        let mut specs = published("web", 8080, "tcp", 80, &["10.0.0.5"]);
        // A stage 1 whose stage 2 is not applied: left as its own row.
        let mut orphan = published("db", 5432, "tcp", 5432, &["10.0.0.9"]);
        orphan.remove(0);
        specs.extend(orphan);
        // A stage 1 that points at another protocol's sandbox frontend.
        specs.push(spec("web", "10.74.0.11:8080/udp", &["172.18.0.2:8080"]));
        // The same shapes from the config file and from labels.
        let mut config = published("web", 80, "tcp", 80, &["10.72.1.2"]);
        for s in &mut config {
            s.source = "config:/etc/lbd.toml".into();
        }
        specs.extend(config);
        let mut labels = vip("cache", "10.73.0.20", 7, &["10.72.1.3"]);
        for s in &mut labels {
            s.source = "docker:labels".into();
        }
        specs.extend(labels);
        let out = grouped(&specs, &TASK_NODES);
        let names: Vec<&str> = out.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web"]);
        assert_eq!(
            out[0].frontends,
            [
                "10.74.0.11:8080/tcp",
                "172.17.0.1:8080/tcp",
                "172.18.0.2:8080/tcp"
            ]
        );
    }

    /// The specs the Docker source really makes, from the engine's views of
    /// the ingress network and of an overlay (as in their own tests).
    #[test]
    fn the_docker_source_specs_group_into_one_service_each() {
        let ingress: NetworkInspect = serde_json::from_str(
            r#"{"Name": "ingress", "Ingress": true,
                "Services": {
                  "web": {"VIP": "10.0.0.3", "Ports": ["Target: 80, Publish: 8080"],
                          "Tasks": [{"Name": "web.1.a", "EndpointIP": "10.0.0.5", "Info": {"Host IP": "10.74.0.11"}},
                                    {"Name": "web.2.b", "EndpointIP": "10.0.0.8", "Info": {"Host IP": "10.74.0.12"}}]}}}"#,
        )
        .unwrap();
        let app: NetworkInspect = serde_json::from_str(
            r#"{"Name": "app",
                "Services": {
                  "web": {"VIP": "10.0.1.3", "Ports": [],
                          "Tasks": [{"Name": "web.1.a", "EndpointIP": "10.0.1.6", "Info": {"Host IP": "10.74.0.11"}}]},
                  "api": {"VIP": "10.0.1.2", "Ports": [],
                          "Tasks": [{"Name": "api.1.x", "EndpointIP": "10.0.1.5", "Info": {"Host IP": "10.74.0.11"}}]}}}"#,
        )
        .unwrap();
        let nodes: Vec<Ipv4Addr> = NODES.iter().map(|n| n.parse().unwrap()).collect();
        let mut specs = crate::sources::swarm::services(
            &ingress,
            OVERLAY.parse().unwrap(),
            GATEWAY.parse().unwrap(),
            &nodes,
            None,
        );
        specs.extend(crate::sources::service_vips::services(&app, 4097));
        let mut task_nodes = crate::sources::service_vips::task_nodes(&ingress);
        task_nodes.extend(crate::sources::service_vips::task_nodes(&app));
        let task_nodes: Vec<(String, String)> = task_nodes
            .into_iter()
            .map(|(task, node)| (task.to_string(), node))
            .collect();
        let task_nodes: Vec<(&str, &str)> = task_nodes
            .iter()
            .map(|(t, n)| (t.as_str(), n.as_str()))
            .collect();
        let out = grouped(&specs, &task_nodes);
        let shown: Vec<String> = out
            .iter()
            .map(|s| {
                let ports: Vec<String> = s
                    .ports
                    .iter()
                    .map(|p| format!("{}/{}", p.port, p.proto))
                    .collect();
                let vips: Vec<String> = s
                    .vips
                    .iter()
                    .map(|v| format!("{} ({})", v.address, v.network))
                    .collect();
                let tasks: Vec<String> = s
                    .tasks
                    .iter()
                    .map(|t| format!("{}@{}", t.address, t.node.as_deref().unwrap_or("?")))
                    .collect();
                format!(
                    "{} ports [{}] on [{}] vips [{}] tasks [{}]",
                    s.name,
                    ports.join(" "),
                    s.node_addresses.join(" "),
                    vips.join(" "),
                    tasks.join(" ")
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                "api ports [] on [] vips [10.0.1.2 (4097)] tasks [10.0.1.5@10.74.0.11]",
                "web ports [8080/tcp] on [10.74.0.11 172.17.0.1] vips [10.0.1.3 (4097)] \
                 tasks [10.0.0.5@10.74.0.11 10.0.0.8@10.74.0.12 10.0.1.6@10.74.0.11]",
            ]
        );
        let told: usize = out.iter().map(|s| s.frontends.len()).sum();
        assert_eq!(told, specs.len(), "every frontend is told once");
    }
}
