//! The routes as lbrouter holds them now, with each backend's state: a
//! plain-text page for people (`/` on the metrics listener) and JSON for
//! programs (`/routes`).

use std::fmt::Write as _;

use serde::Serialize;

use super::config::HostMatch;
use super::table::Table;

#[derive(Serialize)]
pub struct RouteView {
    pub name: String,
    /// "" for any host, `*.example.com` for a wildcard.
    pub host: String,
    pub path: String,
    pub strip_prefix: bool,
    /// The sticky-session cookie's name, if the route pins clients.
    pub sticky_cookie: Option<String>,
    pub backends: Vec<BackendView>,
}

#[derive(Serialize)]
pub struct BackendView {
    pub addr: String,
    /// 0: drained.
    pub weight: u32,
    /// Requests sent whose response is not done, over every route.
    pub in_flight: u64,
    /// Left out for a moment after a failed connect.
    pub quarantined: bool,
}

/// Every route of `table`, in lookup order.
pub fn view(table: &Table) -> Vec<RouteView> {
    table
        .routes()
        .into_iter()
        .map(|r| RouteView {
            name: r.name.clone(),
            host: match &r.host {
                HostMatch::Any => String::new(),
                h => h.to_string(),
            },
            path: r.prefix.clone(),
            strip_prefix: r.strip_prefix,
            sticky_cookie: r.sticky.as_ref().map(|s| s.cookie.clone()),
            backends: r
                .backends
                .iter()
                .map(|b| BackendView {
                    addr: b.backend.addr.to_string(),
                    weight: b.weight,
                    in_flight: b.backend.in_flight(),
                    quarantined: b.backend.quarantined(),
                })
                .collect(),
        })
        .collect()
}

pub fn json(table: &Table) -> String {
    serde_json::to_string_pretty(&view(table)).expect("plain data serializes") + "\n"
}

/// One line per backend, under a line per route.
pub fn text(table: &Table) -> String {
    let routes = view(table);
    let mut out = format!("lbrouter: {} routes\n", routes.len());
    for r in &routes {
        let host = if r.host.is_empty() {
            "any host"
        } else {
            &r.host
        };
        let _ = write!(out, "\n{} ({host}, {}", r.name, r.path);
        if r.strip_prefix {
            out.push_str(", prefix stripped");
        }
        if let Some(cookie) = &r.sticky_cookie {
            let _ = write!(out, ", sticky by cookie {cookie}");
        }
        out.push_str(")\n");
        for b in &r.backends {
            let state = match (b.quarantined, b.weight) {
                (true, _) => "left out after a failed connect",
                (false, 0) => "drained",
                (false, _) => "up",
            };
            let _ = writeln!(
                out,
                "  {:<40} weight {:<4} in flight {:<6} {state}",
                b.addr, b.weight, b.in_flight
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::balance::Backends;

    #[test]
    fn lists_every_route_with_its_backends() {
        let config = crate::config::parse(
            std::path::Path::new("t.toml"),
            "[[http.route]]\nname = \"api\"\nhost = \"*.example.com\"\npath = \"/api\"\n\
             strip_prefix = true\nbackends = [\"10.0.0.1:80\", \"10.0.0.2:80\"]\n\n\
             [[http.route]]\nname = \"web\"\nbackends = [\"10.0.0.3:80\"]\n",
        )
        .expect("a valid config");
        let mut backends = Backends::default();
        let metrics = crate::router::metrics::Metrics::default();
        let table = Table::build(&config.http, &mut backends, &metrics);
        backends.get("10.0.0.2:80".parse().unwrap()).quarantine();
        let v = view(&table);
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].name.as_str(), v[0].host.as_str()),
            ("api", "*.example.com")
        );
        assert_eq!((v[1].name.as_str(), v[1].host.as_str()), ("web", ""));
        assert!(!v[0].backends[0].quarantined && v[0].backends[1].quarantined);
        let text = text(&table);
        assert!(
            text.contains("api (*.example.com, /api, prefix stripped)"),
            "{text}"
        );
        assert!(text.contains("left out after a failed connect"), "{text}");
        let parsed: serde_json::Value = serde_json::from_str(&json(&table)).unwrap();
        assert_eq!(parsed[1]["backends"][0]["addr"], "10.0.0.3:80");
    }
}
