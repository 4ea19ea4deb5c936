//! What etcd's keys mean: the key layout, read into services.
//!
//! Under the prefix (`--etcd-prefix`, default `/lb`):
//!
//! ```text
//! <prefix>/services/<name>/frontend        10.73.0.10:80/tcp
//! <prefix>/services/<name>/backends/<id>   10.72.1.2:8080  or  10.72.1.2:8080 weight=3
//! <prefix>/services/<name>/affinity_secs   600
//! <prefix>/services/<name>/maglev_table_size   65537
//! <prefix>/services/<name>/health          tcp | http   (and health.path, health.status, ...)
//! ```
//!
//! The settings mean what the `lb.*` labels of the same names mean, and are
//! checked by the same code (labels::settings). `<id>` is any non-empty
//! string and may contain `/` (registrations use `<node>/<container>`).
//!
//! And the layout confd users have: a prefix whose keys each hold one
//! backend's `host:port`, given to a service of the config file with
//! `etcd_backends = "/app/servers"`.
//!
//! Keys are untrusted input: a malformed key is skipped and reported with
//! its reason, and never stops the rest from being served. Frontends must
//! pass the same policy as labels' (label_frontends.rs).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use crate::config::{parse_frontend, MAX_WEIGHT};
use crate::model::{BackendSpec, Frontend, ServiceSpec};
use crate::sources::labels;

pub const SOURCE: &str = "etcd";

/// etcd's keys, or the part of them lbd watches: key -> value.
pub type Kvs = BTreeMap<String, String>;

/// What the keys say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Services of the native layout.
    pub services: Vec<ServiceSpec>,
    /// Backends of each confd-style prefix that was asked for.
    pub sets: BTreeMap<String, Vec<BackendSpec>>,
    /// "KEY: reason" for each key that was skipped.
    pub rejected: Vec<String>,
}

/// A service's keys, gathered before they are checked.
#[derive(Default)]
struct Keys<'a> {
    frontend: Option<&'a str>,
    settings: HashMap<&'a str, &'a str>,
    backends: Vec<(&'a str, &'a str)>,
}

/// Reads `kvs`. `skip_node` leaves out the backends this node registered
/// itself (`<node>/...` ids), which it serves from its own containers;
/// `allow` screens frontends.
pub fn parse(
    kvs: &Kvs,
    prefix: &str,
    sets: &BTreeSet<String>,
    skip_node: Option<&str>,
    allow: &dyn Fn(IpAddr) -> Result<(), String>,
) -> Parsed {
    let mut parsed = Parsed::default();
    let services_root = format!("{}/services/", prefix.trim_end_matches('/'));
    let mut by_name: BTreeMap<&str, Keys> = BTreeMap::new();
    for (key, value) in kvs.range(services_root.clone()..) {
        let Some(rest) = key.strip_prefix(&services_root) else {
            break;
        };
        let Some((name, field)) = rest.split_once('/') else {
            parsed.rejected.push(format!(
                "{key}: not a service key (expected .../services/<name>/<field>)"
            ));
            continue;
        };
        if let Err(e) = check_name(name) {
            parsed.rejected.push(format!("{key}: {e}"));
            continue;
        }
        let keys = by_name.entry(name).or_default();
        match field {
            "frontend" => keys.frontend = Some(value),
            "affinity_secs" | "maglev_table_size" => {
                keys.settings.insert(field, value);
            }
            f if f == "health" || f.starts_with("health.") => {
                keys.settings.insert(field, value);
            }
            f => match f.strip_prefix("backends/") {
                Some(id) if !id.is_empty() => {
                    let own = skip_node.is_some_and(|n| {
                        id.strip_prefix(n).is_some_and(|r| r.starts_with('/'))
                    });
                    if !own {
                        keys.backends.push((key, value));
                    }
                }
                _ => parsed.rejected.push(format!(
                    "{key}: unknown key (expected frontend, backends/<id>, affinity_secs, maglev_table_size or health*)"
                )),
            },
        }
    }

    let mut frontends: BTreeMap<Frontend, &str> = BTreeMap::new();
    for (name, keys) in by_name {
        let frontend_key = format!("{services_root}{name}/frontend");
        let Some(text) = keys.frontend else {
            if !keys.backends.is_empty() || !keys.settings.is_empty() {
                parsed.rejected.push(format!(
                    "{frontend_key}: missing; the service's other keys are ignored"
                ));
            }
            continue;
        };
        let frontend = match parse_frontend(text).and_then(|f| allow(f.addr).map(|()| f)) {
            Ok(f) => f,
            Err(e) => {
                parsed
                    .rejected
                    .push(format!("{frontend_key}: {text:?}: {e}"));
                continue;
            }
        };
        if let Some(owner) = frontends.get(&frontend) {
            parsed.rejected.push(format!(
                "{frontend_key}: {frontend} is already the frontend of service {owner:?}"
            ));
            continue;
        }
        let settings =
            labels::settings(&|field| keys.settings.get(field).map(|v| v.to_string()), "");
        let settings = match settings {
            Ok(s) => s,
            Err(e) => {
                parsed.rejected.push(format!("{services_root}{name}/{e}"));
                continue;
            }
        };
        frontends.insert(frontend, name);
        let mut backends: Vec<BackendSpec> = Vec::new();
        for (key, value) in keys.backends {
            let backend = parse_backend(value).and_then(|b| {
                if b.addr.is_ipv4() != frontend.addr.is_ipv4() {
                    Err("the backend's address family differs from the frontend's".into())
                } else if backends.iter().any(|o| o.socket_addr() == b.socket_addr()) {
                    Err(format!(
                        "{} is already a backend of {name:?}",
                        b.socket_addr()
                    ))
                } else {
                    Ok(b)
                }
            });
            match backend {
                Ok(b) => backends.push(b),
                Err(e) => parsed.rejected.push(format!("{key}: {value:?}: {e}")),
            }
        }
        parsed.services.push(ServiceSpec {
            name: name.to_string(),
            frontend,
            backends,
            snat: None,
            health: settings.health,
            affinity_secs: settings.affinity_secs,
            table_size: settings.table_size,
            network: None,
            local_frontend: false,
            source: SOURCE.to_string(),
        });
    }

    for set in sets {
        let root = format!("{}/", set.trim_end_matches('/'));
        let mut backends: Vec<BackendSpec> = Vec::new();
        for (key, value) in kvs.range(root.clone()..) {
            if !key.starts_with(&root) {
                break;
            }
            match parse_backend(value) {
                Ok(b) if backends.iter().any(|o| o.socket_addr() == b.socket_addr()) => {
                    parsed.rejected.push(format!(
                        "{key}: {value:?}: {} is listed twice",
                        b.socket_addr()
                    ))
                }
                Ok(b) => backends.push(b),
                Err(e) => parsed.rejected.push(format!("{key}: {value:?}: {e}")),
            }
        }
        parsed.sets.insert(set.clone(), backends);
    }
    parsed
}

/// A service name is one key segment.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("a service name has 1 to 128 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "service name {name:?}: only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// `10.72.1.2:8080`, `[fd00::2]:8080`, optionally followed by ` weight=N`.
pub fn parse_backend(value: &str) -> Result<BackendSpec, String> {
    let mut words = value.split_whitespace();
    let addr = words.next().ok_or("empty value (expected host:port)")?;
    let sa: SocketAddr = addr
        .parse()
        .map_err(|_| "expected an IP address and port such as 10.0.0.2:8080 or [fd00::2]:8080 (names are not resolved)".to_string())?;
    if sa.port() == 0 {
        return Err("port 0".into());
    }
    let ip = sa.ip().to_canonical();
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("{ip} cannot be a backend"));
    }
    let mut weight = 1;
    for word in words {
        let w = word
            .strip_prefix("weight=")
            .ok_or_else(|| format!("{word:?}: expected weight=N"))?;
        weight = w
            .parse()
            .ok()
            .filter(|w| *w <= MAX_WEIGHT)
            .ok_or_else(|| format!("weight {w:?}: expected a number from 0 to {MAX_WEIGHT}"))?;
    }
    Ok(BackendSpec {
        addr: ip,
        port: sa.port(),
        weight,
    })
}

/// The value a registration writes: what [`parse_backend`] reads.
pub fn backend_value(addr: SocketAddr, weight: u32) -> String {
    match weight {
        1 => addr.to_string(),
        w => format!("{addr} weight={w}"),
    }
}

/// This node's view with `--register`: the services in etcd with, for each
/// frontend, this node's own labelled containers served directly (they
/// are skipped in etcd, see [`parse`]), and frontends only this node has
/// so far (their registration is on its way) served as they are. `snat`,
/// this node's address, is the source of connections to other hosts, so
/// that their replies come back here.
pub fn with_local(
    etcd: &[ServiceSpec],
    local: &[ServiceSpec],
    snat: Option<IpAddr>,
) -> Vec<ServiceSpec> {
    let mut out: BTreeMap<Frontend, ServiceSpec> =
        etcd.iter().map(|s| (s.frontend, s.clone())).collect();
    for l in local {
        let spec = out.entry(l.frontend).or_insert_with(|| ServiceSpec {
            backends: Vec::new(),
            source: SOURCE.to_string(),
            ..l.clone()
        });
        for b in &l.backends {
            if !spec
                .backends
                .iter()
                .any(|o| o.socket_addr() == b.socket_addr())
            {
                spec.backends.push(*b);
            }
        }
    }
    out.into_values()
        .map(|mut s| {
            s.snat = snat.filter(|a| a.is_ipv4() == s.frontend.addr.is_ipv4());
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvs(pairs: &[(&str, &str)]) -> Kvs {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn allow_73(addr: IpAddr) -> Result<(), String> {
        match addr {
            IpAddr::V4(a) if a.octets()[..2] == [10, 73] => Ok(()),
            _ => Err(format!("{addr} is outside the ranges allowed for labels")),
        }
    }

    fn parse_all(kvs: &Kvs) -> Parsed {
        parse(kvs, "/lb", &BTreeSet::new(), None, &allow_73)
    }

    /// The keys `etcdctl get --prefix /lb` shows for a registered service
    /// and one written by hand.
    #[test]
    fn the_native_layout() {
        let p = parse_all(&kvs(&[
            ("/lb/services/web/frontend", "10.73.0.10:80/tcp"),
            ("/lb/services/web/backends/n1/web-1", "10.74.0.11:8080"),
            (
                "/lb/services/web/backends/n2/web-1",
                "10.74.0.12:8080 weight=3",
            ),
            ("/lb/services/web/affinity_secs", "600"),
            ("/lb/services/web/health", "http"),
            ("/lb/services/web/health.path", "/healthz"),
            ("/lb/services/dns/frontend", "10.73.0.53:53/udp"),
            ("/lb/services/dns/backends/a", "10.74.0.20:53"),
            ("/lb/other/key", "ignored: outside services/"),
        ]));
        assert_eq!(p.rejected, Vec::<String>::new());
        assert_eq!(p.services.len(), 2);
        let dns = &p.services[0];
        assert_eq!(dns.name, "dns");
        assert_eq!(dns.frontend.to_string(), "10.73.0.53:53/udp");
        let web = &p.services[1];
        assert_eq!(web.name, "web");
        assert_eq!(web.affinity_secs, 600);
        assert!(web.health.is_some());
        let backends: Vec<(String, u32)> = web
            .backends
            .iter()
            .map(|b| (b.socket_addr().to_string(), b.weight))
            .collect();
        assert_eq!(
            backends,
            [("10.74.0.11:8080".into(), 1), ("10.74.0.12:8080".into(), 3)]
        );
        assert_eq!(web.source, SOURCE);
    }

    /// `etcdctl get --prefix ... -w json` as a real etcd answered it, with
    /// keys written as a registrator writes them (two under a lease) and
    /// by hand.
    fn recorded(json: &str) -> Kvs {
        use base64::Engine as _;
        let b64 = |v: &serde_json::Value| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap())
                .unwrap();
            String::from_utf8(bytes).unwrap()
        };
        let answer: serde_json::Value = serde_json::from_str(json).unwrap();
        answer["kvs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| (b64(&kv["key"]), b64(&kv["value"])))
            .collect()
    }

    #[test]
    fn recorded_answers_of_a_real_etcd() {
        let mut kvs = recorded(include_str!("../../testdata/etcd-get-lb-services.json"));
        kvs.extend(recorded(include_str!(
            "../../testdata/etcd-get-app-servers.json"
        )));
        let sets = ["/app/servers".to_string()].into();
        let p = parse(&kvs, "/lb", &sets, Some("n1"), &allow_73);
        assert_eq!(p.services.len(), 1);
        let web = &p.services[0];
        assert_eq!(web.frontend.to_string(), "10.73.0.10:80/tcp");
        // n1's own registration is left to n1's containers.
        let backends: Vec<(String, u32)> = web
            .backends
            .iter()
            .map(|b| (b.socket_addr().to_string(), b.weight))
            .collect();
        assert_eq!(backends, [("10.74.0.12:8080".into(), 3)]);
        assert!(matches!(
            web.health.as_ref().map(|h| &h.kind),
            Some(crate::model::CheckKind::Http { path, .. }) if path == "/healthz"
        ));
        assert_eq!(
            p.rejected,
            [
                "/lb/services/web/backends/bad: \"web-3.internal:8080\": expected an IP address \
              and port such as 10.0.0.2:8080 or [fd00::2]:8080 (names are not resolved)"
            ]
        );
        let app: Vec<String> = p.sets["/app/servers"]
            .iter()
            .map(|b| b.socket_addr().to_string())
            .collect();
        assert_eq!(app, ["10.74.0.21:3000"]);
    }

    #[test]
    fn malformed_keys_are_skipped_with_their_reason() {
        let p = parse_all(&kvs(&[
            ("/lb/services/web/frontend", "10.73.0.10:80/tcp"),
            ("/lb/services/web/backends/good", "10.74.0.11:8080"),
            ("/lb/services/web/backends/name", "backend.example:8080"),
            ("/lb/services/web/backends/v6", "[fd00::1]:8080"),
            (
                "/lb/services/web/backends/heavy",
                "10.74.0.12:80 weight=100000",
            ),
            ("/lb/services/web/backends/twice", "10.74.0.11:8080"),
            ("/lb/services/web/colour", "blue"),
            ("/lb/services/evil/frontend", "10.75.0.1:22/tcp"),
            ("/lb/services/evil/backends/x", "10.74.0.66:22"),
            ("/lb/services/bad name/frontend", "10.73.0.11:80/tcp"),
            ("/lb/services/nofront/backends/a", "10.74.0.11:80"),
            ("/lb/services/zcopy/frontend", "10.73.0.10:80/tcp"),
            ("/lb/services/sick/frontend", "10.73.0.12:80/tcp"),
            ("/lb/services/sick/health", "icmp"),
        ]));
        assert_eq!(p.services.len(), 1, "{:?}", p.services);
        assert_eq!(p.services[0].name, "web");
        assert_eq!(p.services[0].backends.len(), 1);
        let reasons = p.rejected.join("\n");
        for expected in [
            "/lb/services/web/backends/name: \"backend.example:8080\": expected an IP address",
            "/lb/services/web/backends/v6: \"[fd00::1]:8080\": the backend's address family",
            "/lb/services/web/backends/heavy: \"10.74.0.12:80 weight=100000\": weight",
            "/lb/services/web/backends/twice: \"10.74.0.11:8080\": 10.74.0.11:8080 is already",
            "/lb/services/web/colour: unknown key",
            "/lb/services/evil/frontend: \"10.75.0.1:22/tcp\": 10.75.0.1 is outside",
            "/lb/services/bad name/frontend: service name \"bad name\"",
            "/lb/services/nofront/frontend: missing",
            "/lb/services/zcopy/frontend: 10.73.0.10:80/tcp is already the frontend of service \"web\"",
            "/lb/services/sick/health \"icmp\": expected tcp or http",
        ] {
            assert!(reasons.contains(expected), "{expected:?} not in\n{reasons}");
        }
    }

    #[test]
    fn this_nodes_registrations_are_left_to_its_containers() {
        let keys = kvs(&[
            ("/lb/services/web/frontend", "10.73.0.10:80/tcp"),
            ("/lb/services/web/backends/n1/web-1", "10.74.0.11:8080"),
            ("/lb/services/web/backends/n10/web-1", "10.74.0.20:8080"),
            ("/lb/services/web/backends/n2/web-1", "10.74.0.12:8080"),
        ]);
        let p = parse(&keys, "/lb/", &BTreeSet::new(), Some("n1"), &allow_73);
        let got: Vec<String> = p.services[0]
            .backends
            .iter()
            .map(|b| b.socket_addr().to_string())
            .collect();
        assert_eq!(got, ["10.74.0.20:8080", "10.74.0.12:8080"]);

        let local = ServiceSpec {
            backends: vec![parse_backend("172.17.0.2:80").unwrap()],
            source: labels::SOURCE.into(),
            ..p.services[0].clone()
        };
        let node = "10.74.0.11".parse().ok();
        let served = with_local(&p.services, &[local], node);
        assert_eq!(served.len(), 1);
        assert_eq!(served[0].backends.len(), 3);
        assert_eq!(served[0].snat, node);
        assert_eq!(served[0].source, SOURCE);
    }

    #[test]
    fn confd_prefixes_hold_one_backend_per_key() {
        let keys = kvs(&[
            ("/app/servers/a", "10.74.0.11:8080"),
            ("/app/servers/b", "10.74.0.12:8080"),
            ("/app/servers/c", "not an address"),
            ("/app/serversX/d", "10.74.0.13:8080"),
        ]);
        let sets = ["/app/servers".to_string(), "/empty/".to_string()].into();
        let p = parse(&keys, "/lb", &sets, None, &allow_73);
        assert_eq!(p.sets["/app/servers"].len(), 2);
        assert!(p.sets["/empty/"].is_empty());
        assert_eq!(p.rejected.len(), 1);
        assert!(
            p.rejected[0].starts_with("/app/servers/c: "),
            "{:?}",
            p.rejected
        );
    }

    #[test]
    fn registration_values_read_back() {
        let sa: SocketAddr = "10.74.0.11:32768".parse().unwrap();
        for w in [0, 1, 7] {
            let b = parse_backend(&backend_value(sa, w)).unwrap();
            assert_eq!((b.socket_addr(), b.weight), (sa, w));
        }
        assert!(parse_backend("10.74.0.11:80 weight").is_err());
        assert!(parse_backend("10.74.0.11:0").is_err());
        assert!(parse_backend("0.0.0.0:80").is_err());
        assert!(parse_backend("").is_err());
    }
}
