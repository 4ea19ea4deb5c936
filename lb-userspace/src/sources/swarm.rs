//! Swarm services published in ingress mode: the routing mesh, done by the
//! datapath instead of IPVS.
//!
//! Where things are reached from (see the README): a request for a
//! published port P on any node address is translated in the node's
//! namespace to the node's `ingress_sbox` on docker_gwbridge (stage 1,
//! plain DNAT, so the sbox sees the client); inside `ingress_sbox`, which
//! sits on the ingress overlay, it is translated again to one of the
//! service's tasks on the overlay, local or remote, with the sbox's overlay
//! address as the source (stage 2, full NAT, so the task answers through
//! the overlay whatever node it runs on). Both stages use the same maps;
//! lbd attaches the datapath inside `ingress_sbox` too.
//!
//! The task list comes from `GET /networks/ingress?verbose=true`: Swarm's
//! own view of the mesh, which every node attached to the ingress network
//! has, workers included (the services and tasks endpoints answer only on
//! managers). That view gives published ports without their protocol; a
//! manager reads the protocols from `GET /services`, a worker cannot and
//! takes every published port as TCP.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use bollard::models::{
    EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum, LocalNodeState,
    NetworkInspect, Service,
};
use bollard::query_parameters::{InspectNetworkOptions, ListServicesOptions};
use bollard::Docker;

use super::labels::{self, Rejected};
use crate::model::{BackendSpec, Frontend, Proto, ServiceSpec};

pub const SOURCE: &str = "docker:swarm";

/// What the node sees of Swarm.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// "manager", "worker" or "inactive".
    pub role: String,
    pub services: Vec<ServiceSpec>,
    /// The `ingress_sbox` namespace, when this node has one.
    pub sbox: Option<PathBuf>,
    /// The engine's name for this node.
    pub engine: String,
    /// Task address -> the address of the node it runs on.
    pub nodes: BTreeMap<IpAddr, String>,
    /// On a manager, the services Swarm has (`GET /services`): one the
    /// networks' views still show but this does not is being removed.
    pub live: Option<BTreeSet<String>>,
    /// On a manager, the `lb.*` settings of the services that have some.
    pub settings: BTreeMap<String, Settings>,
    /// On a manager, services whose `lb.*` labels are wrong, and why.
    pub rejected: Vec<Rejected>,
}

/// `netns_dir`: where the engine keeps its network namespaces.
/// `local`: this node's running tasks (see local_tasks.rs).
pub async fn view(
    docker: &Docker,
    netns_dir: &Path,
    local: &[super::local_tasks::LocalTask],
) -> Result<View> {
    let info = docker
        .info()
        .await
        .context("asking the engine for its Swarm state")?;
    let engine = info.name.clone().unwrap_or_default();
    let swarm = info.swarm.unwrap_or_default();
    if swarm.local_node_state != Some(LocalNodeState::ACTIVE) {
        return Ok(View {
            engine,
            role: "inactive".into(),
            ..Default::default()
        });
    }
    let role = if swarm.control_available == Some(true) {
        "manager"
    } else {
        "worker"
    };
    let verbose = |scope: Option<&str>| InspectNetworkOptions {
        verbose: true,
        scope: scope.map(String::from),
    };
    // Together: a resync's time is mostly waiting for the engine.
    let (ingress, gwbridge) = tokio::join!(
        docker.inspect_network("ingress", Some(verbose(Some("swarm")))),
        docker.inspect_network("docker_gwbridge", Some(verbose(None))),
    );
    let mut ingress = match ingress {
        Ok(n) => n,
        // A node that joined but has no ingress sandbox yet.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {
            return Ok(View {
                engine,
                role: role.into(),
                ..Default::default()
            })
        }
        Err(e) => return Err(e).context("inspecting the ingress network"),
    };
    super::local_tasks::add_to(&mut ingress, local);
    let gwbridge = gwbridge.context("inspecting docker_gwbridge")?;
    let sbox = netns_dir.join("ingress_sbox");
    let (Some(overlay), Some(gateway)) = (sbox_address(&ingress), sbox_address(&gwbridge)) else {
        return Ok(View {
            engine,
            role: role.into(),
            ..Default::default()
        });
    };
    let listed = match role {
        "manager" => Some(
            docker
                .list_services(None::<ListServicesOptions>)
                .await
                .context("listing Swarm services")?,
        ),
        _ => None,
    };
    let protocols = listed.as_deref().map(ingress_protocols);
    let (settings, rejected) = listed.as_deref().map(settings).unwrap_or_default();
    let services = services(
        &ingress,
        overlay,
        gateway,
        &node_addresses(),
        protocols.as_ref(),
    );
    Ok(View {
        role: role.into(),
        services,
        sbox: sbox.exists().then_some(sbox),
        engine,
        nodes: super::service_vips::task_nodes(&ingress),
        live: protocols.map(|p| p.into_keys().collect()),
        settings,
        rejected,
    })
}

/// The `ingress_sbox` endpoint's address on a network.
fn sbox_address(network: &NetworkInspect) -> Option<Ipv4Addr> {
    let endpoint = network.containers.as_ref()?.get("ingress-sbox")?;
    let cidr = endpoint.ipv4_address.as_deref()?;
    cidr.split('/').next()?.parse().ok()
}

/// This node's IPv4 addresses, loopback excepted: a published port answers
/// on every one of them, as with Docker's own mesh.
fn node_addresses() -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
                .filter(|ip| !ip.is_loopback())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

/// Stops new connections to services Swarm no longer has (`live`, from a
/// manager) while the networks' views still show them, that is while their
/// tasks shut down: every backend drains, so the published ports and VIPs
/// take no new connection at once and the established ones run to their
/// end. The service goes when the views drop it. A worker has no list of
/// services and learns of a removal only from the views.
pub fn drain_removed(services: &mut [ServiceSpec], live: &BTreeSet<String>) {
    for s in services
        .iter_mut()
        .filter(|s| s.source == SOURCE && !live.contains(&s.name))
    {
        for b in &mut s.backends {
            b.weight = 0;
        }
    }
}

/// A Swarm service's own settings, from its `lb.*` labels (the same names
/// and checks as a container's, labels.rs). Only a manager can read them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub affinity_secs: u32,
    pub table_size: Option<u32>,
}

fn settings(services: &[Service]) -> (BTreeMap<String, Settings>, Vec<Rejected>) {
    let mut out = BTreeMap::new();
    let mut rejected = Vec::new();
    for spec in services.iter().filter_map(|s| s.spec.as_ref()) {
        let (Some(name), Some(labels)) = (&spec.name, &spec.labels) else {
            continue;
        };
        let get = |key: &str| labels.get(&format!("lb.{key}")).cloned();
        let checked = labels::settings(&get, "lb.").and_then(|s| match s.health {
            // lbd's checks run from the node, which cannot reach tasks on
            // an overlay; Swarm's own health checks replace failing tasks.
            Some(_) => Err(
                "lb.health is not supported on a Swarm service: give the image a \
                            HEALTHCHECK, and Swarm replaces tasks that fail it"
                    .to_string(),
            ),
            None => Ok(Settings {
                affinity_secs: s.affinity_secs,
                table_size: s.table_size,
            }),
        });
        match checked {
            Ok(s) if s == Settings::default() => {}
            Ok(s) => {
                out.insert(name.clone(), s);
            }
            Err(reason) => rejected.push(Rejected {
                container: format!("service {name}"),
                reason,
            }),
        }
    }
    (out, rejected)
}

/// Gives Swarm's frontends that balance across tasks (the mesh's stage 2
/// and the VIPs, the same for every node's copy) their service's settings.
/// Stage 1 has one backend, the node's own sandbox, and keeps none.
pub fn apply_settings(services: &mut [ServiceSpec], settings: &BTreeMap<String, Settings>) {
    for s in services
        .iter_mut()
        .filter(|s| s.source == SOURCE && (s.snat.is_some() || s.network.is_some()))
    {
        if let Some(set) = settings.get(&s.name) {
            s.affinity_secs = set.affinity_secs;
            s.table_size = set.table_size;
        }
    }
}

/// Published port and target port of an ingress-mode publication.
type PortPair = (u16, u16);

/// For each service, by name: the protocols of each of its ingress-mode
/// published ports (`-p 53:53/udp -p 53:53/tcp` gives both for one pair).
/// SCTP is not balanced (the datapath does TCP and UDP) and is left out.
pub type Protocols = BTreeMap<String, BTreeMap<PortPair, Vec<Proto>>>;

fn ingress_protocols(services: &[Service]) -> Protocols {
    let mut out = Protocols::new();
    for s in services {
        let Some(name) = s.spec.as_ref().and_then(|spec| spec.name.clone()) else {
            continue;
        };
        let ports = out.entry(name).or_default();
        for p in s.endpoint.iter().flat_map(|e| e.ports.iter().flatten()) {
            if p.publish_mode == Some(EndpointPortConfigPublishModeEnum::HOST) {
                continue;
            }
            let pair = (p.published_port, p.target_port);
            let (Some(publish), Some(target)) = (
                pair.0.and_then(|n| u16::try_from(n).ok()),
                pair.1.and_then(|n| u16::try_from(n).ok()),
            ) else {
                continue;
            };
            let proto = match p.protocol {
                Some(EndpointPortConfigProtocolEnum::UDP) => Proto::Udp,
                Some(EndpointPortConfigProtocolEnum::SCTP) => continue,
                _ => Proto::Tcp,
            };
            let protos = ports.entry((publish, target)).or_default();
            if !protos.contains(&proto) {
                protos.push(proto);
            }
        }
    }
    out
}

/// "Target: 80, Publish: 8080" -> (8080, 80). The verbose network view does
/// not say the protocol (see `ingress_protocols`).
fn parse_port(s: &str) -> Option<(u16, u16)> {
    let mut target = None;
    let mut publish = None;
    for part in s.split(',') {
        let (k, v) = part.split_once(':')?;
        match k.trim() {
            "Target" => target = v.trim().parse().ok(),
            "Publish" => publish = v.trim().parse().ok(),
            _ => {}
        }
    }
    Some((publish?, target?))
}

pub(crate) fn services(
    ingress: &NetworkInspect,
    overlay: Ipv4Addr,
    gateway: Ipv4Addr,
    node_addresses: &[Ipv4Addr],
    protocols: Option<&Protocols>,
) -> Vec<ServiceSpec> {
    let mut out = Vec::new();
    for (name, info) in super::service_vips::service_infos(ingress) {
        // Sorted: the engine lists tasks in no fixed order, and an unchanged
        // service must compare equal to skip rewriting its ring.
        let mut tasks: Vec<IpAddr> = info
            .tasks
            .iter()
            .flatten()
            .filter_map(|t| t.endpoint_ip.as_deref()?.parse().ok())
            .collect();
        tasks.sort();
        tasks.dedup();
        let mut pairs: Vec<PortPair> = info
            .ports
            .iter()
            .flatten()
            .filter_map(|p| parse_port(p))
            .collect();
        // `-p 53:53/tcp -p 53:53/udp` lists the pair twice.
        pairs.sort();
        pairs.dedup();
        let with_protocols = pairs.into_iter().flat_map(|pair| {
            // A manager knows. A service it no longer lists is being
            // removed (see `drain_removed`); its ports stay TCP.
            let protos = protocols
                .and_then(|p| p.get(name.as_str()))
                .and_then(|ports| ports.get(&pair))
                .filter(|protos| !protos.is_empty())
                .cloned()
                .unwrap_or_else(|| vec![Proto::Tcp]);
            protos.into_iter().map(move |proto| (pair, proto))
        });
        for ((publish, target), proto) in with_protocols {
            let spec = |frontend: Ipv4Addr, backends: Vec<BackendSpec>, snat: Option<IpAddr>| {
                ServiceSpec {
                    name: name.clone(),
                    frontend: Frontend {
                        addr: frontend.into(),
                        port: publish,
                        proto,
                    },
                    backends,
                    snat,
                    health: None,
                    affinity_secs: 0,
                    table_size: None,
                    network: None,
                    // Node addresses, and the sandbox's own address.
                    local_frontend: true,
                    source: SOURCE.into(),
                }
            };
            // Stage 2, inside ingress_sbox: full NAT to the tasks.
            let task_backends = tasks
                .iter()
                .map(|ip| BackendSpec {
                    addr: *ip,
                    port: target,
                    weight: 1,
                })
                .collect();
            out.push(spec(gateway, task_backends, Some(overlay.into())));
            // Stage 1, in the node's namespace: every node address to the sbox.
            let to_sbox = BackendSpec {
                addr: gateway.into(),
                port: publish,
                weight: 1,
            };
            for addr in node_addresses.iter().filter(|a| **a != gateway) {
                out.push(spec(*addr, vec![to_sbox], None));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `GET /networks/ingress?verbose=true` as a 20.10 worker answers it.
    const INGRESS: &str = r#"{
        "Name": "ingress", "Id": "e4bwwkava20j0a7nadul3gvdd", "Scope": "swarm", "Driver": "overlay",
        "Ingress": true,
        "Containers": {
            "ingress-sbox": {"Name": "ingress-endpoint", "EndpointID": "x", "MacAddress": "02:42:0a:00:00:02",
                             "IPv4Address": "10.0.0.2/24", "IPv6Address": ""}
        },
        "Services": {
            "web": {"VIP": "10.0.0.3", "Ports": ["Target: 80, Publish: 8080"], "LocalLBIndex": 256,
                    "Tasks": [
                        {"Name": "web.1.a", "EndpointID": "e1", "EndpointIP": "10.0.0.5", "Info": {"Host IP": "10.74.0.11"}},
                        {"Name": "web.2.b", "EndpointID": "e2", "EndpointIP": "10.0.0.8", "Info": {"Host IP": "10.74.0.12"}}
                    ]},
            "ingress-endpoint": {"VIP": "", "Ports": [], "LocalLBIndex": 0, "Tasks": []}
        }
    }"#;

    #[test]
    fn published_ports_become_two_stages() {
        let ingress: NetworkInspect = serde_json::from_str(INGRESS).unwrap();
        let overlay = sbox_address(&ingress).unwrap();
        assert_eq!(overlay, Ipv4Addr::new(10, 0, 0, 2));
        let gateway = Ipv4Addr::new(172, 18, 0, 2);
        let nodes = [Ipv4Addr::new(10, 74, 0, 11), Ipv4Addr::new(172, 17, 0, 1)];
        let specs = services(&ingress, overlay, gateway, &nodes, None);
        assert_eq!(specs.len(), 3);
        let sbox = &specs[0];
        assert_eq!(sbox.frontend.to_string(), "172.18.0.2:8080/tcp");
        assert_eq!(sbox.snat, Some(IpAddr::from(overlay)));
        let tasks: Vec<String> = sbox
            .backends
            .iter()
            .map(|b| b.socket_addr().to_string())
            .collect();
        assert_eq!(tasks, ["10.0.0.5:80", "10.0.0.8:80"]);
        // The engine's order does not matter.
        let mut shuffled = ingress.clone();
        if let Some(web) = shuffled.services.as_mut().and_then(|s| s.get_mut("web")) {
            web["Tasks"].as_array_mut().unwrap().reverse();
        }
        assert_eq!(services(&shuffled, overlay, gateway, &nodes, None), specs);
        for (spec, node) in specs[1..].iter().zip(nodes) {
            assert_eq!(spec.frontend.to_string(), format!("{node}:8080/tcp"));
            assert_eq!(
                spec.backends[0].socket_addr().to_string(),
                "172.18.0.2:8080"
            );
            assert_eq!(spec.snat, None);
            assert_eq!(spec.source, SOURCE);
        }
    }

    /// `GET /services` on a manager: `web` publishes 8080 over TCP, `dns`
    /// publishes 53 over both TCP and UDP and 5353 in host mode only.
    const SERVICES: &str = r#"[
        {"ID": "s1", "Spec": {"Name": "web"},
         "Endpoint": {"Ports": [{"Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080, "PublishMode": "ingress"}]}},
        {"ID": "s2", "Spec": {"Name": "dns"},
         "Endpoint": {"Ports": [
            {"Protocol": "udp", "TargetPort": 53, "PublishedPort": 53, "PublishMode": "ingress"},
            {"Protocol": "tcp", "TargetPort": 53, "PublishedPort": 53, "PublishMode": "ingress"},
            {"Protocol": "udp", "TargetPort": 5353, "PublishedPort": 5353, "PublishMode": "host"},
            {"Protocol": "sctp", "TargetPort": 9, "PublishedPort": 9, "PublishMode": "ingress"}]}},
        {"ID": "s3", "Spec": {"Name": "internal"}, "Endpoint": {}}
    ]"#;

    #[test]
    fn a_manager_knows_the_protocol_of_each_published_port() {
        let list: Vec<Service> = serde_json::from_str(SERVICES).unwrap();
        let protocols = ingress_protocols(&list);
        assert_eq!(protocols["web"][&(8080, 80)], [Proto::Tcp]);
        assert_eq!(protocols["dns"][&(53, 53)], [Proto::Udp, Proto::Tcp]);
        assert!(!protocols["dns"].contains_key(&(5353, 5353)), "host mode");
        assert!(!protocols["dns"].contains_key(&(9, 9)), "sctp");
        assert!(protocols["internal"].is_empty());

        let mut ingress: NetworkInspect = serde_json::from_str(INGRESS).unwrap();
        let services_json = ingress.services.as_mut().unwrap();
        let mut dns = services_json["web"].clone();
        dns["Ports"] = serde_json::json!(["Target: 53, Publish: 53", "Target: 53, Publish: 53"]);
        services_json.insert("dns".into(), dns);
        let overlay = sbox_address(&ingress).unwrap();
        let gateway = Ipv4Addr::new(172, 18, 0, 2);
        let nodes = [Ipv4Addr::new(10, 74, 0, 11)];
        let frontends = |p: Option<&Protocols>| -> Vec<String> {
            services(&ingress, overlay, gateway, &nodes, p)
                .iter()
                .map(|s| format!("{} {}", s.name, s.frontend))
                .collect()
        };
        assert_eq!(
            frontends(Some(&protocols)),
            [
                "dns 172.18.0.2:53/udp",
                "dns 10.74.0.11:53/udp",
                "dns 172.18.0.2:53/tcp",
                "dns 10.74.0.11:53/tcp",
                "web 172.18.0.2:8080/tcp",
                "web 10.74.0.11:8080/tcp",
            ]
        );
        // A worker cannot know: TCP, once per pair.
        assert_eq!(
            frontends(None),
            [
                "dns 172.18.0.2:53/tcp",
                "dns 10.74.0.11:53/tcp",
                "web 172.18.0.2:8080/tcp",
                "web 10.74.0.11:8080/tcp",
            ]
        );
        // A service the manager no longer lists (being removed) keeps TCP.
        let mut without_dns = protocols.clone();
        without_dns.remove("dns");
        assert_eq!(frontends(Some(&without_dns)), frontends(None));
    }

    #[test]
    fn services_a_manager_no_longer_has_drain() {
        let ingress: NetworkInspect = serde_json::from_str(INGRESS).unwrap();
        let overlay = sbox_address(&ingress).unwrap();
        let gateway = Ipv4Addr::new(172, 18, 0, 2);
        let nodes = [Ipv4Addr::new(10, 74, 0, 11)];
        let mut specs = services(&ingress, overlay, gateway, &nodes, None);
        let mut other = specs[0].clone();
        other.source = "docker:labels".into();
        specs.push(other);
        drain_removed(&mut specs, &BTreeSet::from(["web".to_string()]));
        assert!(specs
            .iter()
            .flat_map(|s| &s.backends)
            .all(|b| b.weight == 1));
        drain_removed(&mut specs, &BTreeSet::new());
        let (swarm, labels) = specs.split_at(specs.len() - 1);
        assert!(swarm
            .iter()
            .flat_map(|s| &s.backends)
            .all(|b| b.weight == 0));
        assert!(
            labels[0].backends.iter().all(|b| b.weight == 1),
            "not Swarm's"
        );
    }

    #[test]
    fn a_services_labels_set_affinity_for_its_tasks_not_its_node_stage() {
        let list: Vec<Service> = serde_json::from_value(serde_json::json!([
            {"Spec": {"Name": "web", "Labels": {"lb.affinity_secs": "300", "other": "x"}}},
            {"Spec": {"Name": "plain", "Labels": {"com.example": "1"}}},
            {"Spec": {"Name": "bad", "Labels": {"lb.affinity_secs": "forever"}}},
            {"Spec": {"Name": "checked", "Labels": {"lb.health": "tcp"}}}
        ]))
        .unwrap();
        let (settings, rejected) = settings(&list);
        assert_eq!(
            settings,
            BTreeMap::from([(
                "web".to_string(),
                Settings {
                    affinity_secs: 300,
                    table_size: None
                }
            )])
        );
        let reasons: Vec<String> = rejected
            .iter()
            .map(|r| format!("{}: {}", r.container, r.reason))
            .collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].starts_with("service bad: lb.affinity_secs"));
        assert!(reasons[1].starts_with("service checked: lb.health"));

        let ingress: NetworkInspect = serde_json::from_str(INGRESS).unwrap();
        let overlay = sbox_address(&ingress).unwrap();
        let nodes = [Ipv4Addr::new(10, 74, 0, 11)];
        let mut specs = services(
            &ingress,
            overlay,
            Ipv4Addr::new(172, 18, 0, 2),
            &nodes,
            None,
        );
        apply_settings(&mut specs, &settings);
        let affinity: Vec<(String, u32)> = specs
            .iter()
            .map(|s| (s.frontend.to_string(), s.affinity_secs))
            .collect();
        assert_eq!(
            affinity,
            [
                ("172.18.0.2:8080/tcp".to_string(), 300),
                ("10.74.0.11:8080/tcp".to_string(), 0)
            ]
        );
    }

    #[test]
    fn port_strings() {
        assert_eq!(parse_port("Target: 80, Publish: 8080"), Some((8080, 80)));
        assert_eq!(parse_port("Target: 80"), None);
        assert_eq!(parse_port("garbage"), None);
    }
}
