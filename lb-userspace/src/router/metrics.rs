//! lbrouter's Prometheus metrics, per route and backend.
//!
//! Unlike lbd's (rebuilt from the datapath's counters at each scrape),
//! these counters live here: the proxy is where requests are seen.

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Route names are checked by the config parser (letters, digits, `-_.`)
/// and backends are socket addresses, so no label value needs escaping.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub route: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub backend: String,
    /// "2xx", "4xx", ...
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// The route label of requests no route took.
pub const NO_ROUTE: &str = "";
/// The backend label of answers the router gave itself.
pub const NO_BACKEND: &str = "";

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<BackendLabels, Histogram>,
    pub request_bytes: Family<BackendLabels, Counter>,
    pub response_bytes: Family<BackendLabels, Counter>,
    pub in_flight: Family<BackendLabels, Gauge>,
    pub retries: Family<BackendLabels, Counter>,
    pub connections: Gauge,
    pub reloads: Family<ResultLabels, Counter>,
    pub tls_handshake_failures: Counter,
    pub certificate_reloads: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lbrouter");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by route, backend and status class (empty route: no route matched; \
             empty backend: answered by the router)",
            requests.clone(),
        );
        let latency = Family::<BackendLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "response_header_seconds",
            "Time from a request's arrival to its backend's response headers",
            latency.clone(),
        );
        let request_bytes = Family::<BackendLabels, Counter>::default();
        registry.register(
            "request_body_bytes",
            "Request body bytes sent to backends",
            request_bytes.clone(),
        );
        let response_bytes = Family::<BackendLabels, Counter>::default();
        registry.register(
            "response_body_bytes",
            "Response body bytes sent to clients",
            response_bytes.clone(),
        );
        let in_flight = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "backend_in_flight",
            "Requests sent to the backend whose response is not done",
            in_flight.clone(),
        );
        let retries = Family::<BackendLabels, Counter>::default();
        registry.register(
            "retries",
            "Requests sent again to another backend after this one failed",
            retries.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "client_connections",
            "Client connections open",
            connections.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads by result (ok, rejected)",
            reloads.clone(),
        );
        let tls_handshake_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            tls_handshake_failures.clone(),
        );
        let certificate_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tls_certificate_reloads",
            "Certificates loaded again after their files changed, by result (ok, rejected)",
            certificate_reloads.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            request_bytes,
            response_bytes,
            in_flight,
            retries,
            connections,
            reloads,
            tls_handshake_failures,
            certificate_reloads,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The handles of `route`'s metrics for `backend`, taken once when a
    /// table is built: a request then counts without building labels,
    /// hashing them or taking a family's lock.
    pub fn backend(&self, route: &str, backend: &str) -> BackendMetrics {
        let labels = BackendLabels {
            route: route.to_string(),
            backend: backend.to_string(),
        };
        BackendMetrics {
            latency: self.latency.get_or_create(&labels).clone(),
            request_bytes: self.request_bytes.get_or_create(&labels).clone(),
            response_bytes: self.response_bytes.get_or_create(&labels).clone(),
            in_flight: self.in_flight.get_or_create(&labels).clone(),
            retries: self.retries.get_or_create(&labels).clone(),
            requests: Arc::new(ByClass {
                family: self.requests.clone(),
                labels,
                classes: Default::default(),
            }),
        }
    }

    /// Counts an answer the router gave itself (no backend).
    pub fn count_local(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                backend: NO_BACKEND.to_string(),
                class: status_class(status),
            })
            .inc();
    }
}

/// One route and backend's metrics.
#[derive(Clone)]
pub struct BackendMetrics {
    pub latency: Histogram,
    pub request_bytes: Counter,
    pub response_bytes: Counter,
    pub in_flight: Gauge,
    pub retries: Counter,
    requests: Arc<ByClass>,
}

/// Requests by status class, each series made on its first request so
/// that only the classes seen are exported.
struct ByClass {
    family: Family<RequestLabels, Counter>,
    labels: BackendLabels,
    /// 1xx to 5xx.
    classes: [OnceLock<Counter>; 5],
}

impl BackendMetrics {
    pub fn count(&self, status: u16) {
        let by = &*self.requests;
        let series = || {
            by.family
                .get_or_create(&RequestLabels {
                    route: by.labels.route.clone(),
                    backend: by.labels.backend.clone(),
                    class: status_class(status),
                })
                .clone()
        };
        match by.classes.get(usize::from(status / 100).wrapping_sub(1)) {
            Some(slot) => slot.get_or_init(series).inc(),
            None => series().inc(),
        };
    }
}

fn status_class(status: u16) -> String {
    format!("{}xx", status / 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_handles_count_into_the_exported_families() {
        let m = Metrics::default();
        let b = m.backend("api", "10.0.0.1:80");
        b.count(200);
        b.count(204);
        b.count(503);
        b.response_bytes.inc_by(7);
        m.count_local("api", 404);
        // A table built again gets the same series.
        m.backend("api", "10.0.0.1:80").count(200);
        let text = m.encode();
        let line = |l: &str| text.lines().any(|x| x == l);
        assert!(
            line("lbrouter_requests_total{route=\"api\",backend=\"10.0.0.1:80\",class=\"2xx\"} 3"),
            "{text}"
        );
        assert!(
            line("lbrouter_requests_total{route=\"api\",backend=\"10.0.0.1:80\",class=\"5xx\"} 1"),
            "{text}"
        );
        assert!(
            line("lbrouter_requests_total{route=\"api\",backend=\"\",class=\"4xx\"} 1"),
            "{text}"
        );
        assert!(!text.contains("class=\"1xx\""), "{text}");
        assert!(
            line("lbrouter_response_body_bytes_total{route=\"api\",backend=\"10.0.0.1:80\"} 7"),
            "{text}"
        );
    }
}
