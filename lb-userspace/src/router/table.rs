//! The route table: which route a request's host and path select.
//!
//! Hosts first, most specific first: the exact name, then the wildcards
//! from the longest suffix down, then the routes without a host (the
//! default routes). Within the first of those groups that has a route for
//! the path, the longest path prefix wins, matched on segment boundaries
//! (`/api` takes `/api` and `/api/x`, not `/apix`).

use std::collections::HashMap;
use std::sync::Arc;

use super::balance::{Backend, Backends};
use super::config::{HostMatch, HttpConfig, RouteSpec};
use super::metrics::{BackendMetrics, Metrics};
use super::sticky::Sticky;

pub struct Route {
    pub name: String,
    pub host: HostMatch,
    pub prefix: String,
    pub strip_prefix: bool,
    pub max_body_bytes: Option<u64>,
    pub backends: Vec<RouteBackend>,
    pub sticky: Option<Sticky>,
}

/// A backend as one route uses it.
pub struct RouteBackend {
    /// Shared with the other routes and with the tables before and after
    /// a reload, so that in-flight counts and quarantine carry over.
    pub backend: Arc<Backend>,
    pub weight: u32,
    pub metrics: BackendMetrics,
}

#[derive(Default)]
pub struct Table {
    exact: HashMap<String, Vec<Arc<Route>>>,
    /// Longest suffix first.
    suffix: Vec<(String, Vec<Arc<Route>>)>,
    any: Vec<Arc<Route>>,
    len: usize,
}

impl Table {
    /// The routes of `config`, with the backends' state taken from
    /// `backends` (new ones are added there) and their metrics from
    /// `metrics`.
    pub fn build(config: &HttpConfig, backends: &mut Backends, metrics: &Metrics) -> Table {
        let mut table = Table {
            len: config.routes.len(),
            ..Table::default()
        };
        let mut suffix: HashMap<String, Vec<Arc<Route>>> = HashMap::new();
        for spec in &config.routes {
            let route = Arc::new(route_of(spec, backends, metrics));
            match &spec.host {
                HostMatch::Any => table.any.push(route),
                HostMatch::Exact(h) => table.exact.entry(h.clone()).or_default().push(route),
                HostMatch::Suffix(s) => suffix.entry(s.clone()).or_default().push(route),
            }
        }
        table.suffix = suffix.into_iter().collect();
        table
            .suffix
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        let by_prefix = |v: &mut Vec<Arc<Route>>| {
            v.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        };
        table.exact.values_mut().for_each(by_prefix);
        table.suffix.iter_mut().for_each(|(_, v)| by_prefix(v));
        by_prefix(&mut table.any);
        table
    }

    /// Every route, in the order a lookup tries them: exact hosts (by
    /// name), wildcards from the longest, then any host; longest path
    /// first within each.
    pub fn routes(&self) -> Vec<&Arc<Route>> {
        let mut exact: Vec<_> = self.exact.iter().collect();
        exact.sort_by(|a, b| a.0.cmp(b.0));
        exact
            .into_iter()
            .flat_map(|(_, routes)| routes)
            .chain(self.suffix.iter().flat_map(|(_, routes)| routes))
            .chain(&self.any)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The route for `host` (as sent: any case, maybe with a port) and
    /// `path`.
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        let host = host.map(normalize_host);
        let in_group = |routes: &'_ [Arc<Route>]| -> Option<usize> {
            routes.iter().position(|r| prefix_matches(&r.prefix, path))
        };
        if let Some(h) = &host {
            if let Some(routes) = self.exact.get(h.as_str()) {
                if let Some(i) = in_group(routes) {
                    return Some(&routes[i]);
                }
            }
            for (suffix, routes) in &self.suffix {
                if h.len() > suffix.len() && h.ends_with(suffix.as_str()) {
                    if let Some(i) = in_group(routes) {
                        return Some(&routes[i]);
                    }
                }
            }
        }
        in_group(&self.any).map(|i| &self.any[i])
    }
}

fn route_of(spec: &RouteSpec, backends: &mut Backends, metrics: &Metrics) -> Route {
    Route {
        name: spec.name.clone(),
        host: spec.host.clone(),
        prefix: spec.path.clone(),
        strip_prefix: spec.strip_prefix,
        max_body_bytes: spec.max_body_bytes,
        backends: spec
            .backends
            .iter()
            .map(|b| {
                let backend = backends.get(b.addr);
                RouteBackend {
                    metrics: metrics.backend(&spec.name, backend.label()),
                    backend,
                    weight: b.weight,
                }
            })
            .collect(),
        sticky: spec
            .sticky_cookie
            .as_deref()
            .map(|cookie| Sticky::new(cookie, &spec.name, spec.backends.iter().map(|b| b.addr))),
    }
}

/// Lower case, without port and trailing dot.
fn normalize_host(host: &str) -> String {
    let name = match host.strip_prefix('[') {
        // An IPv6 literal: keep the brackets, drop the port.
        Some(rest) => match rest.split_once(']') {
            Some((ip, _)) => return format!("[{}]", ip.to_ascii_lowercase()),
            None => host,
        },
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || (path.starts_with(prefix)
            && (path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/'))
}

/// The path the backend sees: without the route's prefix when it strips
/// it (`/api/users` -> `/users`, `/api` -> `/`).
pub fn backend_path<'a>(route: &Route, path: &'a str) -> &'a str {
    if !route.strip_prefix || route.prefix == "/" {
        return path;
    }
    match &path[route.prefix.len().min(path.len())..] {
        "" => "/",
        rest => rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn table(text: &str) -> Table {
        let config = crate::config::parse(Path::new("t.toml"), text).unwrap();
        Table::build(&config.http, &mut Backends::default(), &Metrics::default())
    }

    fn route(name: &str, host: Option<&str>, path: &str, strip: bool) -> String {
        let host = host.map_or(String::new(), |h| format!("host = \"{h}\"\n"));
        format!(
            "[[http.route]]\nname = \"{name}\"\n{host}path = \"{path}\"\nstrip_prefix = {strip}\n\
             backends = [\"10.0.0.1:80\"]\n"
        )
    }

    #[test]
    fn most_specific_host_then_longest_prefix() {
        let t = table(
            &[
                route("default", None, "/", false),
                route("any-api", None, "/api", false),
                route("exact-root", Some("www.example.com"), "/", false),
                route("exact-api", Some("www.example.com"), "/api", false),
                route("exact-api-v2", Some("www.example.com"), "/api/v2", false),
                route("wild", Some("*.example.com"), "/", false),
                route("wild-deep", Some("*.eu.example.com"), "/static", false),
            ]
            .concat(),
        );
        let name = |host: Option<&str>, path: &str| t.lookup(host, path).map(|r| r.name.clone());
        assert_eq!(
            name(Some("www.example.com"), "/"),
            Some("exact-root".into())
        );
        assert_eq!(
            name(Some("WWW.Example.COM:8080"), "/api"),
            Some("exact-api".into())
        );
        assert_eq!(
            name(Some("www.example.com"), "/api/"),
            Some("exact-api".into())
        );
        assert_eq!(
            name(Some("www.example.com"), "/api/v2/x"),
            Some("exact-api-v2".into())
        );
        assert_eq!(
            name(Some("www.example.com"), "/api/v22"),
            Some("exact-api".into())
        );
        assert_eq!(
            name(Some("www.example.com"), "/apix"),
            Some("exact-root".into())
        );
        assert_eq!(name(Some("a.example.com"), "/api"), Some("wild".into()));
        assert_eq!(name(Some("a.b.example.com"), "/"), Some("wild".into()));
        assert_eq!(
            name(Some("x.eu.example.com"), "/static/a"),
            Some("wild-deep".into())
        );
        // The more specific wildcard has no route for the path: the next one has.
        assert_eq!(
            name(Some("x.eu.example.com"), "/other"),
            Some("wild".into())
        );
        // The wildcard does not take the bare domain.
        assert_eq!(name(Some("example.com"), "/api/x"), Some("any-api".into()));
        assert_eq!(name(None, "/"), Some("default".into()));
        assert_eq!(name(Some("[::1]:80"), "/api"), Some("any-api".into()));
    }

    #[test]
    fn no_default_route_means_no_match() {
        let t = table(&route("only", Some("a.com"), "/app", false));
        assert!(t.lookup(Some("a.com"), "/").is_none());
        assert!(t.lookup(Some("b.com"), "/app").is_none());
        assert!(t.lookup(Some("a.com"), "/app/x").is_some());
    }

    #[test]
    fn strips_prefix_on_request() {
        let t = table(
            &[
                route("api", None, "/api", true),
                route("root", None, "/", true),
            ]
            .concat(),
        );
        let api = t.lookup(None, "/api/users").unwrap();
        assert_eq!(backend_path(api, "/api/users"), "/users");
        assert_eq!(backend_path(api, "/api"), "/");
        assert_eq!(backend_path(api, "/api/"), "/");
        let root = t.lookup(None, "/x").unwrap();
        assert_eq!(backend_path(root, "/x"), "/x");
    }

    #[test]
    fn backends_keep_their_state_across_builds() {
        let text = route("a", None, "/", false);
        let config = crate::config::parse(Path::new("t.toml"), &text).unwrap();
        let mut backends = Backends::default();
        let metrics = Metrics::default();
        let one = Table::build(&config.http, &mut backends, &metrics);
        let two = Table::build(&config.http, &mut backends, &metrics);
        let b = |t: &Table| t.lookup(None, "/").unwrap().backends[0].backend.clone();
        assert!(Arc::ptr_eq(&b(&one), &b(&two)));
    }
}
