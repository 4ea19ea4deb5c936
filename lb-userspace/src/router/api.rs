//! docker-flow-proxy's reconfigure API, for the tools that drive it
//! (docker-flow-swarm-listener, deploy scripts):
//!
//! - `GET /v1/docker-flow-proxy/reconfigure?serviceName=S&servicePath=/p&port=N[&serviceDomain=D]`
//!   routes Swarm service S as its `com.df.*` labels would;
//! - `GET /v1/docker-flow-proxy/remove?serviceName=S` forgets what
//!   `reconfigure` said of S (S's own labels, if any, still route it).
//!
//! Each query parameter but `serviceName` and `token` stands for the label
//! `com.df.<parameter>` and goes through the same checks (labels.rs), so an
//! unsupported one is refused with its reason rather than half applied.
//! The service's tasks are found by `--docker` discovery, which applies
//! these labels over the service's own. The calls change routing, so the
//! API listens on loopback only and wants the token, as
//! `Authorization: Bearer TOKEN` or, for callers that can only be given a
//! URL, `token=TOKEN` in the query. What it was told lives as long as the
//! process: the listener tells it again when it restarts. On a Swarm
//! worker, whose engine cannot list services, `reconfigure` is refused
//! (503) rather than accepted and never routed.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use hyper::{Method, Request, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::discovery::{Found, ON_A_WORKER};
use super::labels::{self, Labelled, DF_NOTIFY};

/// Labels set through the API, by service name.
pub type Told = BTreeMap<String, HashMap<String, String>>;

const PATH: &str = "/v1/docker-flow-proxy/";

/// `found` is what discovery found, for whether this is a Swarm worker.
pub async fn serve(
    addr: SocketAddr,
    token: String,
    told: watch::Sender<Told>,
    found: watch::Receiver<Found>,
) -> Result<()> {
    if !addr.ip().to_canonical().is_loopback() {
        anyhow::bail!(
            "refusing to serve the reconfigure API on {addr}: it changes routing, so it \
             listens on loopback only (e.g. 127.0.0.1:{})",
            addr.port()
        );
    }
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    log::info!("serving the reconfigure API on {addr}");
    super::serve_small(listener, "api", move |req| {
        let worker = found.borrow().swarm_worker;
        let (status, body) = answer(req, &token, &told, worker);
        (status, "application/json", body)
    })
    .await
}

/// The status and JSON body (docker-flow-proxy's shape) of one call.
fn answer<B>(
    req: &Request<B>,
    token: &str,
    told: &watch::Sender<Told>,
    worker: bool,
) -> (StatusCode, String) {
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let bearer = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let service = param("serviceName").unwrap_or_default().to_string();
    let reply = |status: StatusCode, message: &str| {
        let ok = if status.is_success() { "OK" } else { "NOK" };
        let body = serde_json::json!({"Status": ok, "Message": message, "ServiceName": service});
        (status, format!("{body}\n"))
    };
    if !bearer.or(param("token")).is_some_and(|t| same(t, token)) {
        return reply(StatusCode::UNAUTHORIZED, "a valid token is required");
    }
    if req.method() != Method::GET && req.method() != Method::PUT {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    let Some(call) = req.uri().path().strip_prefix(PATH) else {
        return reply(StatusCode::NOT_FOUND, "not found");
    };
    if service.is_empty() {
        return reply(StatusCode::BAD_REQUEST, "serviceName is required");
    }
    match call {
        "reconfigure" if worker => reply(StatusCode::SERVICE_UNAVAILABLE, ON_A_WORKER),
        "reconfigure" => match df_labels(&service, &query) {
            Ok(labels) => {
                told.send_modify(|t| {
                    t.insert(service.clone(), labels);
                });
                log::info!("api: reconfigure {service}");
                reply(StatusCode::OK, "")
            }
            Err(reason) => reply(StatusCode::BAD_REQUEST, &reason),
        },
        "remove" => {
            let removed = told.send_if_modified(|t| t.remove(&service).is_some());
            log::info!("api: remove {service}");
            match removed {
                true => reply(StatusCode::OK, ""),
                false => reply(StatusCode::NOT_FOUND, "not reconfigured through this API"),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "not found"),
    }
}

/// A reconfigure call's parameters as the labels they stand for, checked
/// as labels are.
fn df_labels(service: &str, query: &[(String, String)]) -> Result<HashMap<String, String>, String> {
    let mut labels = HashMap::from([(DF_NOTIFY.to_string(), "true".to_string())]);
    for (k, v) in query {
        if k != "serviceName" && k != "token" {
            labels.insert(format!("com.df.{k}"), v.clone());
        }
    }
    let item = Labelled {
        kind: "service",
        name: service.to_string(),
        labels: labels.clone(),
        networks: BTreeMap::from([("api".to_string(), vec![[127, 0, 0, 1].into()])]),
    };
    labels::routes(&item)?;
    Ok(labels)
}

/// The token: the file's first line, at least 16 characters.
pub fn read_token(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the API token from {}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    if token.len() < 16 {
        anyhow::bail!(
            "{}: the API token must be at least 16 characters on the first line",
            path.display()
        );
    }
    Ok(token)
}

/// Compares in a time that does not depend on where the strings differ,
/// so that the token cannot be guessed a byte at a time.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0, |d, (x, y)| d | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(uri: &str, auth: Option<&str>, told: &watch::Sender<Told>) -> (u16, String) {
        call_on(uri, auth, told, false)
    }

    fn call_on(
        uri: &str,
        auth: Option<&str>,
        told: &watch::Sender<Told>,
        worker: bool,
    ) -> (u16, String) {
        let mut req = Request::get(uri);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let (status, body) = answer(&req.body(()).unwrap(), "s3cret", told, worker);
        (status.as_u16(), body)
    }

    #[test]
    fn a_worker_refuses_reconfigure_as_it_cannot_route_swarm_services() {
        let (told, _rx) = watch::channel(Told::new());
        let uri = "/v1/docker-flow-proxy/reconfigure?serviceName=api&servicePath=/api&port=8000\
                   &token=s3cret";
        let (status, body) = call_on(uri, None, &told, true);
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("Swarm worker"), "{body}");
        assert!(told.borrow().is_empty());
        // Still behind the token.
        assert_eq!(
            call_on(
                "/v1/docker-flow-proxy/reconfigure?serviceName=a",
                None,
                &told,
                true
            )
            .0,
            401
        );
    }

    #[test]
    fn reconfigure_and_remove_need_the_token_and_valid_labels() {
        let (told, _rx) = watch::channel(Told::new());
        let uri = "/v1/docker-flow-proxy/reconfigure?serviceName=api&servicePath=/api&port=8000";
        assert_eq!(call(uri, None, &told).0, 401);
        assert_eq!(call(uri, Some("Bearer wrong!"), &told).0, 401);
        let (status, body) = call(uri, Some("Bearer s3cret"), &told);
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(r#""Status":"OK""#), "{body}");
        let labels = told.borrow()["api"].clone();
        assert_eq!(labels["com.df.servicePath"], "/api");
        assert_eq!(labels["com.df.port"], "8000");
        assert_eq!(labels[DF_NOTIFY], "true");

        // The token in the query, for callers given only a URL.
        let bad = "/v1/docker-flow-proxy/reconfigure?serviceName=x&servicePath=/x&port=80\
                   &reqPathSearchReplace=/a,/b&token=s3cret";
        let (status, body) = call(bad, None, &told);
        assert_eq!(status, 400);
        assert!(body.contains("reqPathSearchReplace"), "{body}");
        assert!(!told.borrow().contains_key("x"), "refused whole");
        let no_port = "/v1/docker-flow-proxy/reconfigure?serviceName=x&servicePath=/x&token=s3cret";
        assert_eq!(call(no_port, None, &told).0, 400);
        let no_name = "/v1/docker-flow-proxy/reconfigure?servicePath=/x&port=1&token=s3cret";
        assert_eq!(call(no_name, None, &told).0, 400);

        let remove = "/v1/docker-flow-proxy/remove?serviceName=api&token=s3cret";
        assert_eq!(call(remove, None, &told).0, 200);
        assert!(told.borrow().is_empty());
        assert_eq!(call(remove, None, &told).0, 404);
        assert_eq!(
            call("/v1/other?token=s3cret&serviceName=a", None, &told).0,
            404
        );
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        assert!(!same("", "a"));
    }
}
