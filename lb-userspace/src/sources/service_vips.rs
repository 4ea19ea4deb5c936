//! Swarm service VIPs between containers (endpoint mode `vip`, Swarm's
//! default): a container on an overlay network that connects to a
//! service's VIP, on any port, reaches one of the service's tasks on that
//! network, on the same port, over TCP or UDP. Swarm does this with IPVS in
//! every container's namespace; here the socket programs do it (lb-ebpf's
//! sock.rs), for the namespaces this node's containers on that network
//! have (`Member`s). A VIP means something on its own network only: the
//! network is named by its VXLAN id, unique in the swarm.
//!
//! Everything comes from the verbose view of each overlay network, which
//! every node with a container on the network has, workers included: the
//! services with their VIPs and tasks (local or not), and this node's
//! endpoints on it. dnsrr services have no VIP and are left to Docker's DNS,
//! as are `tasks.<service>` names.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use bollard::models::{NetworkInspect, ServiceInfo};
use bollard::query_parameters::{InspectNetworkOptions, ListNetworksOptions};
use bollard::Docker;

use crate::model::{BackendSpec, Frontend, Member, Proto, ServiceSpec};
use crate::sources::swarm::SOURCE;

/// The overlay driver's option naming the network's VXLAN id(s).
const VXLAN_IDS: &str = "com.docker.network.driver.overlay.vxlanid_list";

/// What the node's overlay networks give.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    pub services: Vec<ServiceSpec>,
    pub members: BTreeSet<Member>,
    /// Task address -> the address of the node it runs on.
    pub nodes: BTreeMap<IpAddr, String>,
}

/// `local`: this node's running tasks (see local_tasks.rs).
pub async fn view(
    docker: &Docker,
    sandboxes: &mut Sandboxes,
    local: &[super::local_tasks::LocalTask],
) -> Result<View> {
    let filters = HashMap::from([
        ("driver".to_string(), vec!["overlay".to_string()]),
        ("scope".to_string(), vec!["swarm".to_string()]),
    ]);
    let networks = docker
        .list_networks(Some(ListNetworksOptions {
            filters: Some(filters),
        }))
        .await
        .context("listing overlay networks")?;
    let mut out = View::default();
    let mut seen = BTreeSet::new();
    // The ingress network is the mesh's (swarm.rs), read there.
    let ids: Vec<&str> = networks
        .iter()
        .filter(|n| n.ingress != Some(true))
        .filter_map(|n| n.id.as_deref())
        .collect();
    // Together: a resync's time is mostly waiting for the engine.
    let inspected = futures::future::join_all(ids.iter().map(|id| {
        let options = InspectNetworkOptions {
            verbose: true,
            scope: Some("swarm".into()),
        };
        docker.inspect_network(id, Some(options))
    }))
    .await;
    for (id, inspected) in ids.iter().zip(inspected) {
        let mut net = match inspected {
            Ok(n) => n,
            // Removed since the list.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => continue,
            Err(e) => return Err(e).with_context(|| format!("inspecting network {id}")),
        };
        let Some(vni) = vxlan_id(&net) else {
            continue;
        };
        super::local_tasks::add_to(&mut net, local);
        out.services.extend(services(&net, vni));
        out.nodes.extend(task_nodes(&net));
        for container in local_containers(&net) {
            seen.insert(container.to_string());
            match sandboxes.cookie(docker, container).await {
                Ok(Some(netns_cookie)) => {
                    out.members.insert(Member {
                        netns_cookie,
                        network: vni,
                    });
                }
                Ok(None) => {}
                Err(e) => log::debug!("container {container}'s namespace: {e:#}"),
            }
        }
    }
    sandboxes.retain(&seen);
    Ok(out)
}

/// The network's VXLAN id; the ingress network is the mesh's (swarm.rs).
fn vxlan_id(net: &NetworkInspect) -> Option<u32> {
    if net.ingress == Some(true) || net.name.as_deref() == Some("ingress") {
        return None;
    }
    let ids = net.options.as_ref()?.get(VXLAN_IDS)?;
    ids.split(',').next()?.trim().parse().ok()
}

/// One service per VIP and protocol, every port: each task on the same port.
pub(crate) fn services(net: &NetworkInspect, vni: u32) -> Vec<ServiceSpec> {
    let mut out = Vec::new();
    for (name, info) in service_infos(net) {
        let Some(vip) = info.vip.as_deref().and_then(|v| v.parse::<Ipv4Addr>().ok()) else {
            continue; // dnsrr, or the network's own load-balancer endpoint
        };
        // Sorted and deduplicated: an unchanged service compares equal.
        let tasks: BTreeSet<IpAddr> = info
            .tasks
            .iter()
            .flatten()
            .filter_map(|t| t.endpoint_ip.as_deref()?.parse().ok())
            .collect();
        for proto in [Proto::Tcp, Proto::Udp] {
            out.push(ServiceSpec {
                name: name.clone(),
                frontend: Frontend {
                    addr: vip.into(),
                    port: 0,
                    proto,
                },
                backends: tasks
                    .iter()
                    .map(|addr| BackendSpec {
                        addr: *addr,
                        port: 0,
                        weight: 1,
                    })
                    .collect(),
                snat: None,
                health: None,
                affinity_secs: 0,
                table_size: None,
                network: Some(vni),
                local_frontend: false,
                source: SOURCE.into(),
            });
        }
    }
    out
}

/// A network view's services by name, in name order: the engine sorts
/// nothing, and an unchanged service must compare equal. An entry that does
/// not parse is skipped.
pub fn service_infos(net: &NetworkInspect) -> BTreeMap<&String, ServiceInfo> {
    net.services
        .iter()
        .flatten()
        .filter_map(|(name, raw)| Some((name, serde_json::from_value(raw.clone()).ok()?)))
        .collect()
}

/// Where each task runs, from the view's "Host IP".
pub fn task_nodes(net: &NetworkInspect) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    for info in service_infos(net).values() {
        for task in info.tasks.iter().flatten() {
            let ip = task.endpoint_ip.as_deref().and_then(|ip| ip.parse().ok());
            let host = task.info.as_ref().and_then(|i| i.get("Host IP")).cloned();
            if let (Some(ip), Some(host)) = (ip, host) {
                out.insert(ip, host);
            }
        }
    }
    out
}

/// This node's containers on the network. The view lists endpoints by
/// container id; the network's own load-balancer endpoint (`lb-<name>`) and
/// Swarm's sandboxes are not containers and have no clients.
fn local_containers(net: &NetworkInspect) -> impl Iterator<Item = &str> {
    net.containers
        .iter()
        .flatten()
        .map(|(id, _)| id.as_str())
        .filter(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Containers' network namespaces, by container id, with their cookies:
/// a container's namespace is looked up (and entered) once, not at every
/// resync, and again only when its sandbox is replaced.
#[derive(Default)]
pub struct Sandboxes {
    known: HashMap<String, Sandbox>,
}

struct Sandbox {
    path: PathBuf,
    inode: u64,
    cookie: u64,
}

impl Sandboxes {
    /// The cookie of `container`'s network namespace; None if it has none
    /// (not running).
    pub async fn cookie(&mut self, docker: &Docker, container: &str) -> Result<Option<u64>> {
        if let Some(s) = self.known.get(container) {
            if std::fs::metadata(&s.path).is_ok_and(|m| m.ino() == s.inode) {
                return Ok(Some(s.cookie));
            }
            self.known.remove(container);
        }
        let inspect = docker
            .inspect_container(container, None)
            .await
            .context("inspecting the container")?;
        let Some(key) = inspect
            .network_settings
            .and_then(|n| n.sandbox_key)
            .filter(|k| !k.is_empty())
        else {
            return Ok(None);
        };
        let path = PathBuf::from(key);
        let inode = std::fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .ino();
        let cookie = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || netns_cookie(&path)).await??
        };
        self.known.insert(
            container.to_string(),
            Sandbox {
                path,
                inode,
                cookie,
            },
        );
        Ok(Some(cookie))
    }

    /// Forgets containers no longer on any network.
    fn retain(&mut self, seen: &BTreeSet<String>) {
        self.known.retain(|id, _| seen.contains(id));
    }
}

/// The cookie of the network namespace at `path` (what the socket programs
/// see as `bpf_get_netns_cookie`), read from a socket made inside it, on a
/// thread of its own that enters the namespace and then ends.
pub fn netns_cookie(path: &Path) -> Result<u64> {
    let ns = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<u64> {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering {}", path.display()))?;
                socket_netns_cookie()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    })
}

/// SO_NETNS_COOKIE of a fresh socket in the calling thread's namespace.
fn socket_netns_cookie() -> Result<u64> {
    use std::os::fd::AsRawFd;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").context("making a socket")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and an 8-byte buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_NETNS_COOKIE (Linux 5.14+)");
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `GET /networks/<id>?verbose=true&scope=swarm` for an overlay `app`
    /// with `api` (2 tasks, one on another node), `dns` in dnsrr mode, a
    /// container of this node and the network's load-balancer endpoint.
    const APP: &str = r#"{
        "Name": "app", "Id": "q1w2e3", "Scope": "swarm", "Driver": "overlay", "Ingress": false,
        "Options": {"com.docker.network.driver.overlay.vxlanid_list": "4097"},
        "Containers": {
            "3f0c6c2d6a1b4e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f": {
                "Name": "api.1.x", "EndpointID": "e1", "MacAddress": "02:42:0a:00:01:05",
                "IPv4Address": "10.0.1.5/24", "IPv6Address": ""},
            "lb-app": {"Name": "app-endpoint", "EndpointID": "e9", "MacAddress": "02:42:0a:00:01:04",
                "IPv4Address": "10.0.1.4/24", "IPv6Address": ""}
        },
        "Services": {
            "api": {"VIP": "10.0.1.2", "Ports": [], "LocalLBIndex": 257,
                "Tasks": [
                    {"Name": "api.2.y", "EndpointID": "e2", "EndpointIP": "10.0.1.7", "Info": {"Host IP": "10.74.0.12"}},
                    {"Name": "api.1.x", "EndpointID": "e1", "EndpointIP": "10.0.1.5", "Info": {"Host IP": "10.74.0.11"}}
                ]},
            "dns": {"VIP": "", "Ports": [], "LocalLBIndex": 0,
                "Tasks": [{"Name": "dns.1.z", "EndpointID": "e3", "EndpointIP": "10.0.1.9", "Info": {"Host IP": "10.74.0.11"}}]}
        }
    }"#;

    #[test]
    fn each_vip_takes_every_port_of_both_protocols_on_its_network() {
        let net: NetworkInspect = serde_json::from_str(APP).unwrap();
        let vni = vxlan_id(&net).unwrap();
        assert_eq!(vni, 4097);
        let specs = services(&net, vni);
        let shown: Vec<String> = specs
            .iter()
            .map(|s| {
                let tasks: Vec<String> = s.backends.iter().map(|b| b.addr.to_string()).collect();
                format!(
                    "{} {} {:?} {}",
                    s.name,
                    s.frontend,
                    s.network,
                    tasks.join(",")
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                "api 10.0.1.2:0/tcp Some(4097) 10.0.1.5,10.0.1.7",
                "api 10.0.1.2:0/udp Some(4097) 10.0.1.5,10.0.1.7",
            ],
            "dnsrr services have no VIP"
        );
        assert!(specs.iter().flat_map(|s| &s.backends).all(|b| b.port == 0));
        assert!(specs.iter().all(|s| s.source == SOURCE && s.snat.is_none()));
        let containers: Vec<&str> = local_containers(&net).collect();
        assert_eq!(containers.len(), 1, "lb-app is not a container");
        assert_eq!(
            task_nodes(&net)[&"10.0.1.7".parse::<IpAddr>().unwrap()],
            "10.74.0.12"
        );
    }

    #[test]
    fn the_ingress_network_and_networks_without_a_vxlan_id_are_not_service_networks() {
        let mut net: NetworkInspect = serde_json::from_str(APP).unwrap();
        net.ingress = Some(true);
        assert_eq!(vxlan_id(&net), None);
        let mut net: NetworkInspect = serde_json::from_str(APP).unwrap();
        net.options = None;
        assert_eq!(vxlan_id(&net), None);
    }

    #[test]
    fn the_cookie_of_our_own_namespace_is_that_of_our_sockets() {
        let here = socket_netns_cookie().unwrap();
        assert_ne!(here, 0);
        assert_eq!(netns_cookie(Path::new("/proc/self/ns/net")).unwrap(), here);
    }
}
