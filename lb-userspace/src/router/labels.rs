//! Routes from Docker labels: `lb.http.*` on containers and Swarm
//! services, and docker-flow-proxy's `com.df.*` on Swarm services.
//!
//! Each value is checked by the same functions as `[[http.route]]` in the
//! file (config.rs). Labels are untrusted: a bad one skips its container or
//! service with a reason, and never touches another.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use super::config::{
    check_body_limit, check_cookie_name, check_route_name, normalize_prefix, parse_host, HostMatch,
    HttpBackend, RouteSpec,
};

pub const PREFIX: &str = "lb.http.";
pub const PORT: &str = "lb.http.port";
pub const NETWORK: &str = "lb.http.network";
pub const DF_NOTIFY: &str = "com.df.notify";

/// docker-flow-proxy labels that would change what is routed where: a
/// service carrying one is skipped rather than routed half as asked.
const DF_UNSUPPORTED: &[&str] = &[
    "com.df.reqPathSearchReplace",
    "com.df.reqPathSearch",
    "com.df.reqPathReplace",
    "com.df.servicePathExclude",
    "com.df.pathType",
    "com.df.srcPort",
    "com.df.reqMode",
    "com.df.httpsOnly",
    "com.df.redirectFromDomain",
    "com.df.outboundHostname",
    "com.df.serviceDomainAlgo",
    "com.df.addReqHeader",
    "com.df.setReqHeader",
    "com.df.delReqHeader",
    "com.df.users",
    "com.df.aclName",
];

/// A container or service with routing labels, reduced to what the labels
/// need.
#[derive(Clone, Debug, Default)]
pub struct Labelled {
    /// "container" or "service", for messages.
    pub kind: &'static str,
    /// Container name (without '/') or service name.
    pub name: String,
    pub labels: HashMap<String, String>,
    /// Addresses by network name: a container's on each of its networks,
    /// or a service's tasks on each of its overlays.
    pub networks: BTreeMap<String, Vec<IpAddr>>,
}

/// Why something was skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub who: String,
    pub reason: String,
}

/// Whether this has labels for the router.
pub fn wanted(labels: &HashMap<String, String>) -> bool {
    labels.keys().any(|k| k.starts_with(PREFIX)) || labels.get(DF_NOTIFY).is_some()
}

/// The routes of one labelled container or service. `lb.http.*` wins when
/// both kinds are present. An empty address list is not an error: a
/// service scaled to zero keeps no route.
pub fn routes(l: &Labelled) -> Result<Vec<RouteSpec>, String> {
    if l.labels.keys().any(|k| k.starts_with(PREFIX)) {
        return lb_http(l).map(|r| vec![r]);
    }
    if l.labels.get(DF_NOTIFY).map(String::as_str) == Some("true") {
        return df(l);
    }
    Ok(Vec::new())
}

fn lb_http(l: &Labelled) -> Result<RouteSpec, String> {
    let get = |k: &str| l.labels.get(&format!("{PREFIX}{k}")).map(|v| v.trim());
    let known = [
        "path",
        "host",
        "port",
        "strip_prefix",
        "weight",
        "sticky_cookie",
        "max_body_bytes",
        "route",
        "network",
    ];
    if let Some(k) = l
        .labels
        .keys()
        .filter_map(|k| k.strip_prefix(PREFIX))
        .find(|k| !known.contains(k))
    {
        return Err(format!("{PREFIX}{k}: unknown label"));
    }
    let port = port(get("port"), PORT)?;
    let name = get("route").unwrap_or(&l.name).to_string();
    check_route_name(&name).map_err(|e| format!("{PREFIX}route: {e}"))?;
    let host = match get("host") {
        None => HostMatch::Any,
        Some(h) => parse_host(h).map_err(|e| format!("{PREFIX}host {h:?}: {e}"))?,
    };
    let path =
        normalize_prefix(get("path").unwrap_or("/")).map_err(|e| format!("{PREFIX}path: {e}"))?;
    let strip_prefix = match get("strip_prefix") {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => return Err(format!("{PREFIX}strip_prefix {v:?}: use true or false")),
    };
    let weight = match get("weight") {
        None => 1,
        Some(w) => w
            .parse::<u32>()
            .ok()
            .filter(|w| *w <= 1000)
            .ok_or_else(|| format!("{PREFIX}weight {w:?}: use 0 to 1000"))?,
    };
    let sticky_cookie = match get("sticky_cookie") {
        None => None,
        Some(c) => {
            check_cookie_name(c).map_err(|e| format!("{PREFIX}sticky_cookie {c:?}: {e}"))?;
            Some(c.to_string())
        }
    };
    let max_body_bytes = match get("max_body_bytes") {
        None => None,
        Some(v) => Some(
            v.parse::<i64>()
                .map_err(|_| format!("{PREFIX}max_body_bytes {v:?} is not a number"))
                .and_then(|n| check_body_limit(n).map_err(|e| format!("{PREFIX}{e}")))?,
        ),
    };
    let addrs = addresses(l, get("network"), NETWORK)?;
    Ok(RouteSpec {
        name,
        host,
        path,
        strip_prefix,
        max_body_bytes,
        sticky_cookie,
        backends: backends(&addrs, port, weight),
        line: 0,
    })
}

/// docker-flow-proxy's meaning: each of `servicePath` on each of
/// `serviceDomain` (any host without one), to `port`.
fn df(l: &Labelled) -> Result<Vec<RouteSpec>, String> {
    if let Some(k) = DF_UNSUPPORTED.iter().find(|k| l.labels.contains_key(**k)) {
        return Err(format!("{k} is not supported by lbrouter"));
    }
    // Indexed labels (com.df.servicePath.1) are df's several-port form.
    if let Some(k) = l
        .labels
        .keys()
        .find(|k| k.starts_with("com.df.") && k.rsplit('.').next().is_some_and(is_digits))
    {
        return Err(format!("{k}: indexed com.df labels are not supported"));
    }
    let get = |k: &str| l.labels.get(&format!("com.df.{k}")).map(|v| v.trim());
    let port = port(get("port"), "com.df.port")?;
    let paths: Vec<String> = match get("servicePath") {
        None => return Err("com.df.servicePath is required".into()),
        Some(p) => list(p)
            .map(|p| normalize_prefix(p).map_err(|e| format!("com.df.servicePath {p:?}: {e}")))
            .collect::<Result<_, _>>()?,
    };
    let hosts: Vec<HostMatch> = match get("serviceDomain") {
        None => vec![HostMatch::Any],
        Some(d) => list(d)
            .map(|h| parse_host(h).map_err(|e| format!("com.df.serviceDomain {h:?}: {e}")))
            .collect::<Result<_, _>>()?,
    };
    if paths.is_empty() || hosts.is_empty() {
        return Err("com.df.servicePath and com.df.serviceDomain may not be empty".into());
    }
    check_route_name(&l.name)?;
    let addrs = addresses(l, None, "")?;
    let many = paths.len() * hosts.len() > 1;
    let mut out = Vec::new();
    for host in &hosts {
        for path in &paths {
            let name = if many {
                format!("{}.{}", l.name, out.len())
            } else {
                l.name.clone()
            };
            out.push(RouteSpec {
                name,
                host: host.clone(),
                path: path.clone(),
                strip_prefix: false,
                max_body_bytes: None,
                sticky_cookie: None,
                backends: backends(&addrs, port, 1),
                line: 0,
            });
        }
    }
    Ok(out)
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|p| !p.is_empty())
}

fn port(v: Option<&str>, label: &str) -> Result<u16, String> {
    let v = v.ok_or_else(|| format!("{label} is required"))?;
    v.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{label} {v:?}: expected a port from 1 to 65535"))
}

/// The addresses on `network` when named (`label` names the setting),
/// otherwise on the first network, by name, that has any.
fn addresses(l: &Labelled, network: Option<&str>, label: &str) -> Result<Vec<IpAddr>, String> {
    match network {
        Some(n) => l
            .networks
            .get(n)
            .cloned()
            .ok_or_else(|| format!("{label}: not on network {n:?}")),
        None => Ok(l
            .networks
            .values()
            .find(|a| !a.is_empty())
            .cloned()
            .unwrap_or_default()),
    }
}

fn backends(addrs: &[IpAddr], port: u16, weight: u32) -> Vec<HttpBackend> {
    let mut out: Vec<HttpBackend> = addrs
        .iter()
        .map(|a| HttpBackend {
            addr: SocketAddr::new(*a, port),
            weight,
        })
        .collect();
    out.sort_by_key(|b| b.addr);
    out.dedup_by_key(|b| b.addr);
    out
}

/// The routes of everything labelled, containers of one `lb.http.route`
/// joined into one route (its settings must agree), with what was skipped.
pub fn all(items: &[Labelled]) -> (Vec<RouteSpec>, Vec<Skipped>) {
    let mut by_name: BTreeMap<String, RouteSpec> = BTreeMap::new();
    let mut skipped = Vec::new();
    for item in items {
        let routes = match routes(item) {
            Ok(r) => r,
            Err(reason) => {
                skipped.push(Skipped {
                    who: format!("{} {}", item.kind, item.name),
                    reason,
                });
                continue;
            }
        };
        for r in routes {
            match by_name.get_mut(&r.name) {
                None => {
                    by_name.insert(r.name.clone(), r);
                }
                Some(have) => {
                    if settings(have) == settings(&r) {
                        have.backends.extend(r.backends);
                        have.backends.sort_by_key(|b| b.addr);
                        have.backends.dedup_by_key(|b| b.addr);
                    } else {
                        skipped.push(Skipped {
                            who: format!("{} {}", item.kind, item.name),
                            reason: format!(
                                "route {:?} is already defined with other settings",
                                r.name
                            ),
                        });
                    }
                }
            }
        }
    }
    (by_name.into_values().collect(), skipped)
}

type Settings<'a> = (&'a HostMatch, &'a str, bool, Option<u64>, Option<&'a str>);

/// What the containers of one route must agree on.
fn settings(r: &RouteSpec) -> Settings<'_> {
    (
        &r.host,
        &r.path,
        r.strip_prefix,
        r.max_body_bytes,
        r.sticky_cookie.as_deref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str, labels: &[(&str, &str)], addrs: &[(&str, &str)]) -> Labelled {
        let mut networks: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for (n, a) in addrs {
            networks
                .entry(n.to_string())
                .or_default()
                .push(a.parse().unwrap());
        }
        Labelled {
            kind: "container",
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            networks,
        }
    }

    #[test]
    fn lb_http_labels_make_one_route() {
        let c = item(
            "web1",
            &[
                ("lb.http.port", "80"),
                ("lb.http.path", "/api/"),
                ("lb.http.host", "*.Example.com"),
                ("lb.http.strip_prefix", "true"),
                ("lb.http.weight", "3"),
                ("lb.http.sticky_cookie", "s"),
                ("lb.http.max_body_bytes", "100"),
            ],
            &[("b", "10.0.0.2"), ("a", "10.0.1.2")],
        );
        let r = &routes(&c).unwrap()[0];
        assert_eq!(r.name, "web1");
        assert_eq!(r.path, "/api");
        assert_eq!(r.host, HostMatch::Suffix(".example.com".into()));
        assert!(r.strip_prefix);
        assert_eq!(r.max_body_bytes, Some(100));
        assert_eq!(r.sticky_cookie.as_deref(), Some("s"));
        // The first network by name.
        assert_eq!(r.backends[0].addr, "10.0.1.2:80".parse().unwrap());
        assert_eq!(r.backends[0].weight, 3);
        let on_b = item(
            "web1",
            &[("lb.http.port", "80"), ("lb.http.network", "b")],
            &[("b", "10.0.0.2"), ("a", "10.0.1.2")],
        );
        assert_eq!(
            routes(&on_b).unwrap()[0].backends[0].addr,
            "10.0.0.2:80".parse().unwrap()
        );
    }

    #[test]
    fn bad_labels_skip_only_their_owner() {
        let good = item("good", &[("lb.http.port", "80")], &[("n", "10.0.0.2")]);
        let cases = [
            (vec![("lb.http.port", "0")], "lb.http.port"),
            (vec![("lb.http.path", "/x")], "lb.http.port is required"),
            (
                vec![("lb.http.port", "80"), ("lb.http.path", "x")],
                "must start with /",
            ),
            (
                vec![("lb.http.port", "80"), ("lb.http.host", "a b")],
                "host name",
            ),
            (
                vec![("lb.http.port", "80"), ("lb.http.max_body_bytes", "-1")],
                "out of range",
            ),
            (
                vec![("lb.http.port", "80"), ("lb.http.sticky_cookie", "a;b")],
                "sticky_cookie",
            ),
            (
                vec![("lb.http.port", "80"), ("lb.http.route", "a/b")],
                "route name",
            ),
            (
                vec![("lb.http.port", "80"), ("lb.http.bogus", "1")],
                "unknown",
            ),
            (
                vec![("lb.http.port", "80"), ("lb.http.network", "x")],
                "not on network",
            ),
        ];
        for (labels, needle) in cases {
            let bad = item("bad", &labels, &[("n", "10.0.0.3")]);
            let (routes, skipped) = all(&[good.clone(), bad]);
            assert_eq!(routes.len(), 1, "{labels:?}");
            assert_eq!(skipped[0].who, "container bad");
            assert!(skipped[0].reason.contains(needle), "{:?}", skipped[0]);
        }
    }

    #[test]
    fn containers_of_one_route_share_it() {
        let c = |n: &str, a: &str, path: &str| {
            item(
                n,
                &[
                    ("lb.http.port", "80"),
                    ("lb.http.route", "web"),
                    ("lb.http.path", path),
                ],
                &[("n", a)],
            )
        };
        let (routes, skipped) = all(&[
            c("w1", "10.0.0.2", "/"),
            c("w2", "10.0.0.3", "/"),
            c("w3", "10.0.0.4", "/other"),
        ]);
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].backends.len(), 2);
        assert_eq!(skipped[0].who, "container w3");
    }

    #[test]
    fn docker_flow_proxy_labels() {
        let s = item(
            "api",
            &[
                ("com.df.notify", "true"),
                ("com.df.servicePath", "/api,/v2/"),
                ("com.df.port", "8080"),
                ("com.df.serviceDomain", "a.com"),
                ("com.df.distribute", "true"),
            ],
            &[("net", "10.0.1.5"), ("net", "10.0.1.6")],
        );
        let r = routes(&s).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].name.as_str(), r[0].path.as_str()), ("api.0", "/api"));
        assert_eq!((r[1].name.as_str(), r[1].path.as_str()), ("api.1", "/v2"));
        assert_eq!(r[0].host, HostMatch::Exact("a.com".into()));
        assert_eq!(r[0].backends.len(), 2);
        assert_eq!(r[0].backends[1].addr, "10.0.1.6:8080".parse().unwrap());
        // Not opted in: nothing.
        let quiet = item("q", &[("com.df.servicePath", "/q")], &[]);
        assert!(routes(&quiet).unwrap().is_empty());
        let refuse = |extra: (&str, &str), needle: &str| {
            let s = item(
                "api",
                &[
                    ("com.df.notify", "true"),
                    ("com.df.servicePath", "/api"),
                    ("com.df.port", "80"),
                    extra,
                ],
                &[],
            );
            let e = routes(&s).unwrap_err();
            assert!(e.contains(needle), "{e}");
        };
        refuse(
            ("com.df.reqPathSearchReplace", "/a,/b"),
            "com.df.reqPathSearchReplace is not supported",
        );
        refuse(("com.df.servicePath.1", "/x"), "indexed");
        refuse(("com.df.serviceDomain", "a b"), "serviceDomain");
    }
}
