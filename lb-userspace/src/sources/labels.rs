//! Standalone containers as backends, chosen by their labels (the
//! "service discovery by labels" pattern):
//!
//! - `lb.frontend` (required): the virtual address, e.g. `10.73.0.10:80/tcp`
//! - `lb.port` (required): the port the container listens on
//! - `lb.weight` (optional, default 1; 0 drains)
//! - `lb.service` (optional): the service name, default the frontend
//! - `lb.network` (optional): which of the container's networks to reach it
//!   on, when it has several
//! - `lb.health` (optional): `tcp` or `http` active checks, tuned with
//!   `lb.health.path`, `lb.health.status` (e.g. `200-399`),
//!   `lb.health.interval_ms`, `lb.health.timeout_ms`, `lb.health.rise`,
//!   `lb.health.fall`, `lb.health.on_down` (`keep` or `reset`)
//! - `lb.affinity_secs` (optional): session affinity
//! - `lb.maglev_table_size` (optional): the service's Maglev table size, a
//!   prime (see `config::table_size`)
//!
//! A service's settings (name, checks, affinity) are those of its oldest
//! container.
//!
//! Labels are untrusted input: a bad label rejects that container alone,
//! with a reason, and never an unrelated service. A frontend must also pass
//! the operator's policy (label_frontends.rs).

use std::collections::BTreeMap;
use std::net::IpAddr;

use bollard::models::{ContainerSummary, ContainerSummaryHealthStatusEnum};

use crate::config::parse_frontend;
use crate::model::{BackendSpec, CheckKind, Frontend, HealthCheck, OnDown, Proto, ServiceSpec};
use crate::sources::registrator::Registration;

pub const FRONTEND: &str = "lb.frontend";
pub const PORT: &str = "lb.port";
pub const WEIGHT: &str = "lb.weight";
pub const SERVICE: &str = "lb.service";
pub const NETWORK: &str = "lb.network";

pub const SOURCE: &str = "docker:labels";

/// A service's settings named as labels name them without their `lb.`:
/// `health`, `health.path`, ... and `affinity_secs`. Labels and etcd keys
/// (etcd_layout.rs) both go through here, so both mean the same and are
/// checked the same. `get` reads one setting; `shown` is prepended to a
/// setting's name in errors (`lb.` for labels).
pub struct Settings {
    pub health: Option<HealthCheck>,
    pub affinity_secs: u32,
    pub table_size: Option<u32>,
}

pub fn settings(get: &dyn Fn(&str) -> Option<String>, shown: &str) -> Result<Settings, String> {
    let affinity_secs = match get("affinity_secs") {
        None => 0,
        Some(a) => a.parse().ok().filter(|s| *s <= 86_400).ok_or_else(|| {
            format!("{shown}affinity_secs must be a number of seconds from 0 to 86400")
        })?,
    };
    let table_size = match get("maglev_table_size") {
        None => None,
        Some(t) => Some(
            t.parse()
                .map_err(|_| format!("{t:?} is not a number"))
                .and_then(crate::config::table_size)
                .map_err(|e| format!("{shown}maglev_table_size: {e}"))?,
        ),
    };
    Ok(Settings {
        health: health(get, shown)?,
        affinity_secs,
        table_size,
    })
}

/// The `health*` settings as a check, if `health` is set.
fn health(
    get: &dyn Fn(&str) -> Option<String>,
    shown: &str,
) -> Result<Option<HealthCheck>, String> {
    let Some(kind) = get("health") else {
        return Ok(None);
    };
    let mut check = HealthCheck::tcp();
    let get = |name: &str| get(&format!("health.{name}"));
    let number = |name: &str, min: u64, max: u64, default: u64| -> Result<u64, String> {
        match get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| {
                    format!("{shown}health.{name} must be a number from {min} to {max}")
                }),
        }
    };
    check.interval_ms = number("interval_ms", 10, 3_600_000, check.interval_ms)?;
    check.timeout_ms = number("timeout_ms", 10, 3_600_000, check.timeout_ms)?;
    check.rise = number("rise", 1, 100, u64::from(check.rise))? as u32;
    check.fall = number("fall", 1, 100, u64::from(check.fall))? as u32;
    check.on_down = match get("on_down").as_deref() {
        None | Some("keep") => OnDown::Keep,
        Some("reset") => OnDown::Reset,
        Some(other) => {
            return Err(format!(
                "{shown}health.on_down {other:?}: expected keep or reset"
            ))
        }
    };
    check.kind = match kind.as_str() {
        "tcp" => CheckKind::Tcp,
        "http" => {
            let path = get("path").unwrap_or_else(|| "/".into());
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "{shown}health.path {path:?}: must start with / and have no spaces"
                ));
            }
            let (status_min, status_max) = match get("status") {
                None => (200, 399),
                Some(s) => crate::config::parse_status_range(&s).ok_or_else(|| {
                    format!("{shown}health.status {s:?}: expected a code or a range like 200-399")
                })?,
            };
            CheckKind::Http {
                path,
                status_min,
                status_max,
            }
        }
        other => return Err(format!("{shown}health {other:?}: expected tcp or http")),
    };
    Ok(Some(check))
}

/// A container that asked to be a backend and why it could not be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub container: String,
    pub reason: String,
}

/// One labelled container, reduced to what the load balancer needs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Member {
    service: String,
    health: Option<HealthCheck>,
    affinity_secs: u32,
    table_size: Option<u32>,
    frontend: Frontend,
    backend: BackendSpec,
    created: i64,
    container: String,
}

/// Groups running, labelled containers into services, one per frontend.
/// Whether Docker counts the container as healthy: it has no health check,
/// or its check has passed and not failed since.
pub fn healthy(c: &ContainerSummary) -> bool {
    let docker_health = c.health.as_ref().and_then(|h| h.status);
    let status = c.status.as_deref().unwrap_or("");
    // Engines older than the health field say it in the status text.
    let unhealthy = matches!(
        docker_health,
        Some(
            ContainerSummaryHealthStatusEnum::UNHEALTHY
                | ContainerSummaryHealthStatusEnum::STARTING
        )
    ) || status.contains("(unhealthy)")
        || status.contains("(health: starting)");
    !unhealthy
}

/// Containers that are unhealthy, or whose health check has not passed yet,
/// are left out until Docker says they are healthy. `allow` says whether a
/// label may take a frontend address, and why not.
pub fn services(
    containers: &[ContainerSummary],
    allow: &dyn Fn(IpAddr) -> Result<(), String>,
) -> (Vec<ServiceSpec>, Vec<Rejected>) {
    let mut rejected = Vec::new();
    let mut members = Vec::new();
    for c in containers {
        let labels = c.labels.clone().unwrap_or_default();
        if !labels.contains_key(FRONTEND) {
            continue;
        }
        match member(c, allow) {
            Ok(Some(m)) => members.push(m),
            Ok(None) => {}
            Err(reason) => rejected.push(Rejected {
                container: name(c),
                reason,
            }),
        }
    }
    // The oldest container of a frontend names its service; a younger one
    // that names another service is trying to take over a frontend it does
    // not own.
    members.sort_by(|a, b| (a.created, &a.container).cmp(&(b.created, &b.container)));
    let mut by_frontend: BTreeMap<Frontend, ServiceSpec> = BTreeMap::new();
    for m in members {
        let spec = by_frontend
            .entry(m.frontend)
            .or_insert_with(|| ServiceSpec {
                name: m.service.clone(),
                frontend: m.frontend,
                backends: Vec::new(),
                snat: None,
                health: m.health.clone(),
                affinity_secs: m.affinity_secs,
                table_size: m.table_size,
                network: None,
                local_frontend: false,
                source: SOURCE.to_string(),
            });
        if spec.name != m.service {
            rejected.push(Rejected {
                container: m.container,
                reason: format!(
                    "{} {} belongs to service {:?}, not {:?}",
                    FRONTEND, m.frontend, spec.name, m.service
                ),
            });
            continue;
        }
        if spec
            .backends
            .iter()
            .any(|b| b.addr == m.backend.addr && b.port == m.backend.port)
        {
            rejected.push(Rejected {
                container: m.container,
                reason: format!("{} is already a backend", m.backend.socket_addr()),
            });
            continue;
        }
        spec.backends.push(m.backend);
    }
    (by_frontend.into_values().collect(), rejected)
}

fn name(c: &ContainerSummary) -> String {
    c.names
        .as_ref()
        .and_then(|n| n.first())
        .map(|n| n.trim_start_matches('/').to_string())
        .or_else(|| c.id.as_ref().map(|id| id.chars().take(12).collect()))
        .unwrap_or_else(|| "?".into())
}

/// `Ok(None)`: a valid container that is not (yet) serving.
fn member(
    c: &ContainerSummary,
    allow: &dyn Fn(IpAddr) -> Result<(), String>,
) -> Result<Option<Member>, String> {
    let labels = c.labels.clone().unwrap_or_default();
    let frontend = parse_frontend(&labels[FRONTEND]).map_err(|e| format!("{FRONTEND}: {e}"))?;
    allow(frontend.addr).map_err(|e| format!("{FRONTEND} {frontend}: {e}"))?;
    let port: u16 = labels
        .get(PORT)
        .ok_or_else(|| format!("{PORT} is missing"))?
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{PORT} must be a port number (1-65535)"))?;
    let weight: u32 = match labels.get(WEIGHT) {
        None => 1,
        Some(w) => w
            .parse()
            .ok()
            .filter(|w| *w <= crate::config::MAX_WEIGHT)
            .ok_or_else(|| {
                format!(
                    "{WEIGHT} must be a number from 0 to {}",
                    crate::config::MAX_WEIGHT
                )
            })?,
    };
    let service = labels
        .get(SERVICE)
        .cloned()
        .unwrap_or_else(|| frontend.to_string());
    if !healthy(c) {
        return Ok(None);
    }
    let Settings {
        health,
        affinity_secs,
        table_size,
    } = settings(&|name| labels.get(&format!("lb.{name}")).cloned(), "lb.")?;
    let addr = address(
        c,
        labels.get(NETWORK).map(String::as_str),
        frontend.addr.is_ipv6(),
    )?;
    Ok(Some(Member {
        service,
        frontend,
        backend: BackendSpec { addr, port, weight },
        health,
        affinity_secs,
        table_size,
        created: c.created.unwrap_or(0),
        container: name(c),
    }))
}

/// The container's address of the frontend's family on the chosen network.
fn address(c: &ContainerSummary, network: Option<&str>, v6: bool) -> Result<IpAddr, String> {
    let networks = c
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.clone())
        .unwrap_or_default();
    let pick = |settings: &bollard::models::EndpointSettings| -> Option<IpAddr> {
        let text = if v6 {
            settings.global_ipv6_address.as_deref()
        } else {
            settings.ip_address.as_deref()
        };
        text.filter(|t| !t.is_empty()).and_then(|t| t.parse().ok())
    };
    match network {
        Some(name) => networks
            .get(name)
            .ok_or_else(|| format!("{NETWORK}: the container is not on network {name:?}"))
            .and_then(|s| pick(s).ok_or_else(|| format!("no address on network {name:?}"))),
        None => {
            let found: BTreeMap<&String, IpAddr> = networks
                .iter()
                .filter_map(|(n, s)| pick(s).map(|a| (n, a)))
                .collect();
            match found.len() {
                0 => Err(format!(
                    "no {} address on any network",
                    if v6 { "IPv6" } else { "IPv4" }
                )),
                1 => Ok(*found.values().next().unwrap_or(&IpAddr::from([0, 0, 0, 0]))),
                _ => Err(format!(
                    "on several networks ({}): set {NETWORK}",
                    found
                        .keys()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            }
        }
    }
}

/// `lb.routable=true`: the container's own address is reachable from other
/// hosts (macvlan, ipvlan, a routed network), so it is registered in etcd
/// instead of a published port.
pub const ROUTABLE: &str = "lb.routable";

/// What `lbd --register` publishes for this node's labelled containers
/// (registrator.rs): each serving member with the address other hosts reach
/// it at, the port Docker publishes for `lb.port` on `node`, or with
/// `lb.routable=true` the container's own. A member with neither is left
/// out, with the reason.
pub fn registrations(
    containers: &[ContainerSummary],
    allow: &dyn Fn(IpAddr) -> Result<(), String>,
    node: IpAddr,
) -> (Vec<Registration>, Vec<Rejected>) {
    let mut out = Vec::new();
    let mut rejected = Vec::new();
    for c in containers {
        let labels = c.labels.clone().unwrap_or_default();
        if !labels.contains_key(FRONTEND) {
            continue;
        }
        let Ok(Some(m)) = member(c, allow) else {
            continue; // services() reports why
        };
        let addr = if labels.get(ROUTABLE).map(String::as_str) == Some("true") {
            Some(m.backend.socket_addr())
        } else {
            published(c, m.backend.port, m.frontend.proto, node)
                .map(|port| std::net::SocketAddr::new(node, port))
        };
        let Some(addr) = addr else {
            rejected.push(Rejected {
                container: m.container,
                reason: format!(
                    "not registered: Docker publishes no port for {PORT} {} on {node}; \
                     publish it (-p) or set {ROUTABLE}=true",
                    m.backend.port
                ),
            });
            continue;
        };
        let settings = labels
            .iter()
            .filter(|(k, _)| {
                k.starts_with("lb.health")
                    || *k == "lb.affinity_secs"
                    || *k == "lb.maglev_table_size"
            })
            .map(|(k, v)| (k["lb.".len()..].to_string(), v.clone()))
            .collect();
        out.push(Registration {
            service: key_safe(&m.service),
            frontend: m.frontend,
            settings,
            container: key_safe(&m.container),
            addr,
            weight: m.backend.weight,
        });
    }
    out.sort_by(|a, b| (&a.service, &a.container).cmp(&(&b.service, &b.container)));
    (out, rejected)
}

/// The host port Docker publishes for the container's `port`, on all of
/// the node's addresses or on `node`.
fn published(c: &ContainerSummary, port: u16, proto: Proto, node: IpAddr) -> Option<u16> {
    use bollard::models::PortSummaryTypeEnum as T;
    let wanted = match proto {
        Proto::Tcp => T::TCP,
        Proto::Udp => T::UDP,
    };
    c.ports.as_ref()?.iter().find_map(|p| {
        let on_node = match p.ip.as_deref() {
            None | Some("") | Some("0.0.0.0") | Some("::") => true,
            Some(ip) => ip.parse::<IpAddr>().ok() == Some(node),
        };
        (p.private_port == port && p.typ == Some(wanted) && on_node)
            .then_some(p.public_port)
            .flatten()
    })
}

/// A name as one segment of an etcd key: what is not a letter, digit, `.`,
/// `_` or `-` becomes `-` (a service named by its frontend, `10.73.0.10:80/tcp`,
/// is `10.73.0.10-80-tcp`).
pub fn key_safe(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-' => c,
            _ => '-',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape `GET /containers/json` has on the engine (API 1.41).
    fn container(
        name: &str,
        created: i64,
        labels: &[(&str, &str)],
        ip: &str,
        status: &str,
    ) -> ContainerSummary {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        serde_json::from_value(serde_json::json!({
            "Id": format!("{name}0123456789abcdef"),
            "Names": [format!("/{name}")],
            "Image": "lb-test",
            "Created": created,
            "Labels": labels,
            "State": "running",
            "Status": status,
            "NetworkSettings": {"Networks": {"bridge": {
                "NetworkID": "n1", "EndpointID": "e1", "Gateway": "172.17.0.1",
                "IPAddress": ip, "IPPrefixLen": 16, "IPv6Gateway": "",
                "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0, "MacAddress": "02:42:ac:11:00:02"
            }}}
        }))
        .unwrap()
    }

    const FE: (&str, &str) = ("lb.frontend", "10.73.0.10:80/tcp");

    /// `Ports` as `GET /containers/json` lists them for `-p 32768:8080`.
    fn with_ports(mut c: ContainerSummary, ports: serde_json::Value) -> ContainerSummary {
        c.ports = serde_json::from_value(ports).unwrap();
        c
    }

    #[test]
    fn registrations_name_the_published_port_on_the_node() {
        let node: IpAddr = "10.74.0.11".parse().unwrap();
        let published = serde_json::json!([
            {"IP": "0.0.0.0", "PrivatePort": 8080, "PublicPort": 32768, "Type": "tcp"},
            {"IP": "::", "PrivatePort": 8080, "PublicPort": 32768, "Type": "tcp"},
            {"PrivatePort": 9000, "Type": "tcp"}
        ]);
        let cs = [
            with_ports(
                container(
                    "web-1",
                    1,
                    &[FE, PORT8080, ("lb.health", "tcp"), ("lb.service", "web")],
                    "172.17.0.2",
                    "Up",
                ),
                published.clone(),
            ),
            // Published for UDP only: nothing to register for a TCP frontend.
            with_ports(
                container(
                    "web-2",
                    2,
                    &[FE, PORT8080, ("lb.service", "web")],
                    "172.17.0.3",
                    "Up",
                ),
                serde_json::json!([{"IP": "0.0.0.0", "PrivatePort": 8080, "PublicPort": 40000, "Type": "udp"}]),
            ),
            container(
                "web-3",
                3,
                &[
                    FE,
                    PORT8080,
                    ("lb.service", "web"),
                    (ROUTABLE, "true"),
                    ("lb.weight", "3"),
                ],
                "10.80.0.3",
                "Up",
            ),
            container("unlabelled", 4, &[], "172.17.0.9", "Up"),
        ];
        let (regs, rejected) = registrations(&cs, &any, node);
        let got: Vec<(String, String, String, u32)> = regs
            .iter()
            .map(|r| {
                (
                    r.service.clone(),
                    r.container.clone(),
                    r.addr.to_string(),
                    r.weight,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("web".into(), "web-1".into(), "10.74.0.11:32768".into(), 1),
                ("web".into(), "web-3".into(), "10.80.0.3:8080".into(), 3),
            ]
        );
        assert_eq!(
            regs[0].settings.get("health").map(String::as_str),
            Some("tcp")
        );
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].container, "web-2");
        assert!(rejected[0].reason.contains("-p"), "{}", rejected[0].reason);
    }

    #[test]
    fn unnamed_services_get_a_key_safe_name() {
        let cs = [with_ports(
            container("a", 1, &[FE, PORT8080], "172.17.0.2", "Up"),
            serde_json::json!([{"IP": "10.74.0.11", "PrivatePort": 8080, "PublicPort": 8080, "Type": "tcp"}]),
        )];
        let (regs, _) = registrations(&cs, &any, "10.74.0.11".parse().unwrap());
        assert_eq!(regs[0].service, "10.73.0.10-80-tcp");
        // Published on another address of the node only: not reachable at
        // the one registered.
        let (regs, rejected) = registrations(&cs, &any, "10.74.0.12".parse().unwrap());
        assert!(regs.is_empty());
        assert_eq!(rejected.len(), 1);
    }

    fn any(_: IpAddr) -> Result<(), String> {
        Ok(())
    }
    const PORT8080: (&str, &str) = ("lb.port", "8080");

    #[test]
    fn containers_with_one_frontend_form_one_service() {
        let cs = [
            container("a", 1, &[FE, PORT8080], "172.17.0.2", "Up 1 second"),
            container(
                "b",
                2,
                &[FE, PORT8080, ("lb.weight", "3")],
                "172.17.0.3",
                "Up 1 second",
            ),
            container("plain", 3, &[], "172.17.0.4", "Up 1 second"),
        ];
        let (services, rejected) = services(&cs, &any);
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(services.len(), 1);
        let s = &services[0];
        assert_eq!(s.name, "10.73.0.10:80/tcp");
        assert_eq!(s.source, SOURCE);
        let backends: Vec<(String, u32)> = s
            .backends
            .iter()
            .map(|b| (b.socket_addr().to_string(), b.weight))
            .collect();
        assert_eq!(
            backends,
            [
                ("172.17.0.2:8080".to_string(), 1),
                ("172.17.0.3:8080".to_string(), 3)
            ]
        );
    }

    #[test]
    fn bad_labels_reject_only_that_container() {
        let cs = [
            container("good", 1, &[FE, PORT8080], "172.17.0.2", "Up"),
            container("noport", 2, &[FE], "172.17.0.3", "Up"),
            container(
                "badfe",
                3,
                &[("lb.frontend", "10.73.0.10:80"), PORT8080],
                "172.17.0.4",
                "Up",
            ),
            container(
                "badw",
                4,
                &[FE, PORT8080, ("lb.weight", "-1")],
                "172.17.0.5",
                "Up",
            ),
            container("noip", 5, &[FE, PORT8080], "", "Up"),
        ];
        let (services, rejected) = services(&cs, &any);
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].backends.len(), 1);
        let names: Vec<&str> = rejected.iter().map(|r| r.container.as_str()).collect();
        assert_eq!(names, ["noport", "badfe", "badw", "noip"]);
        assert!(rejected[0].reason.contains("lb.port"));
        assert!(rejected[1].reason.contains("protocol"));
    }

    #[test]
    fn a_younger_container_cannot_rename_a_frontend() {
        let cs = [
            container(
                "owner",
                1,
                &[FE, PORT8080, ("lb.service", "web")],
                "172.17.0.2",
                "Up",
            ),
            container(
                "intruder",
                2,
                &[FE, PORT8080, ("lb.service", "evil")],
                "172.17.0.3",
                "Up",
            ),
        ];
        let (services, rejected) = services(&cs, &any);
        assert_eq!(services[0].name, "web");
        assert_eq!(services[0].backends.len(), 1);
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].container, "intruder");
    }

    #[test]
    fn maglev_table_size_label_is_checked_as_in_the_file() {
        let with = |v: &'static str| move |k: &str| (k == "maglev_table_size").then(|| v.into());
        assert_eq!(settings(&with("251"), "lb.").unwrap().table_size, Some(251));
        assert_eq!(settings(&|_| None, "lb.").unwrap().table_size, None);
        let e = settings(&with("250"), "lb.").err().unwrap();
        assert!(
            e.starts_with("lb.maglev_table_size: 250 is not a prime"),
            "{e}"
        );
        let e = settings(&with("big"), "lb.").err().unwrap();
        assert_eq!(e, "lb.maglev_table_size: \"big\" is not a number");
    }

    #[test]
    fn health_and_affinity_labels() {
        let cs = [container(
            "a",
            1,
            &[
                FE,
                PORT8080,
                ("lb.health", "http"),
                ("lb.health.path", "/ready"),
                ("lb.health.fall", "2"),
                ("lb.affinity_secs", "30"),
            ],
            "172.17.0.2",
            "Up",
        )];
        let (services, rejected) = services(&cs, &any);
        assert!(rejected.is_empty(), "{rejected:?}");
        let h = services[0].health.clone().unwrap();
        assert_eq!(
            h.kind,
            CheckKind::Http {
                path: "/ready".into(),
                status_min: 200,
                status_max: 399
            }
        );
        assert_eq!((h.fall, h.rise), (2, 2));
        assert_eq!(services[0].affinity_secs, 30);
        let bad = [container(
            "b",
            1,
            &[FE, PORT8080, ("lb.health", "ping")],
            "172.17.0.3",
            "Up",
        )];
        let (_, rejected) = super::services(&bad, &any);
        assert!(rejected[0].reason.contains("tcp or http"), "{rejected:?}");
    }

    #[test]
    fn unhealthy_and_starting_containers_wait() {
        let cs = [
            container(
                "ok",
                1,
                &[FE, PORT8080],
                "172.17.0.2",
                "Up 5 seconds (healthy)",
            ),
            container(
                "sick",
                2,
                &[FE, PORT8080],
                "172.17.0.3",
                "Up 5 seconds (unhealthy)",
            ),
            container(
                "new",
                3,
                &[FE, PORT8080],
                "172.17.0.4",
                "Up 1 second (health: starting)",
            ),
        ];
        let (services, rejected) = services(&cs, &any);
        assert!(rejected.is_empty());
        assert_eq!(services[0].backends.len(), 1);
        assert_eq!(services[0].backends[0].addr.to_string(), "172.17.0.2");
    }

    #[test]
    fn a_frontend_the_policy_refuses_rejects_its_container_with_the_reason() {
        let cs = [
            container("ok", 1, &[FE, PORT8080], "172.17.0.2", "Up"),
            container(
                "ssh",
                2,
                &[("lb.frontend", "10.75.0.1:22/tcp"), PORT8080],
                "172.17.0.3",
                "Up",
            ),
            // Refused before its health is looked at, so that the reason
            // shows while it starts.
            container(
                "starting",
                3,
                &[("lb.frontend", "10.75.0.1:23/tcp"), PORT8080],
                "172.17.0.4",
                "Up 1 second (health: starting)",
            ),
        ];
        let only_73 = |addr: IpAddr| -> Result<(), String> {
            match addr {
                IpAddr::V4(v4) if v4.octets()[..3] == [10, 73, 0] => Ok(()),
                _ => Err(format!("{addr} is not allowed")),
            }
        };
        let (services, rejected) = services(&cs, &only_73);
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].frontend.to_string(), "10.73.0.10:80/tcp");
        assert_eq!(
            rejected,
            [
                Rejected {
                    container: "ssh".into(),
                    reason: "lb.frontend 10.75.0.1:22/tcp: 10.75.0.1 is not allowed".into()
                },
                Rejected {
                    container: "starting".into(),
                    reason: "lb.frontend 10.75.0.1:23/tcp: 10.75.0.1 is not allowed".into()
                },
            ]
        );
    }
}
