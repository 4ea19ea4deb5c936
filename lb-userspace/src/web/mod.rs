//! The HTTP endpoint behind `lbd --metrics ADDR`: Prometheus metrics at
//! `/metrics`, the status as JSON at `/status.json` and a stats page at `/`.
//!
//! It has no authentication and shows the whole configuration, so it only
//! ever listens on a loopback address.

mod metrics;

pub use metrics::CONTENT_TYPE as METRICS_CONTENT_TYPE;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request as HttpRequest, Response as HttpResponse, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::control::{Call, Request, Response};
use crate::status::Status;

/// The stats page. It renders the status embedded in it at once, then
/// refreshes itself from /status.json.
const PAGE: &str = include_str!("stats.html");
/// Where the page expects its initial status (a JSON value).
const PAGE_STATUS_SLOT: &str = "/*STATUS*/null";

/// How long a request waits for the daemon's loop before answering 503.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// A client that has not sent its headers by then is dropped, so idle or
/// stalled connections cannot pile up.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;

type Body = Full<Bytes>;

/// Fails unless `addr` is a loopback address.
pub fn check_addr(addr: SocketAddr) -> Result<()> {
    if !addr.ip().to_canonical().is_loopback() {
        bail!(
            "refusing to serve metrics on {addr}: the endpoint has no authentication and \
             shows the whole configuration, so it listens on loopback only \
             (e.g. 127.0.0.1:{port} or [::1]:{port})",
            port = addr.port()
        );
    }
    Ok(())
}

/// Serves `/metrics`, `/status.json` and `/` on `addr`, a loopback address,
/// answering from the daemon's status.
pub async fn serve(addr: SocketAddr, calls: mpsc::Sender<Call>) -> Result<()> {
    check_addr(addr)?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint to {addr}"))?;
    log::info!("metrics on http://{addr}/metrics, stats page on http://{addr}/");
    serve_on(listener, calls).await
}

/// The next connection once one of `slots` is free (the others wait in the
/// listen backlog); the permit is held for as long as the connection.
pub async fn accept_slot(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    what: &str,
) -> Result<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let permit = slots.clone().acquire_owned().await?;
    let (stream, peer) = accept_retrying(listener, what).await;
    Ok((permit, stream, peer))
}

/// `accept_slot` for one of several listeners that share `slots`
/// (lbrouter's serving threads have one each): the connection is accepted
/// first and then waits for a slot, so that no listener holds a slot
/// while nothing arrives on it. Each listener then holds at most one
/// accepted connection past the limit; the others wait in the backlogs.
pub async fn accept_shared_slot(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    what: &str,
) -> Result<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let (stream, peer) = accept_retrying(listener, what).await;
    let permit = slots.clone().acquire_owned().await?;
    Ok((permit, stream, peer))
}

async fn accept_retrying(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                // Out of file descriptors and the like: pause rather than
                // spin, and keep serving once it passes.
                log::warn!("{what}: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Serves on a listener that is already bound.
async fn serve_on(listener: TcpListener, calls: mpsc::Sender<Call>) -> Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (permit, stream, peer) = accept_slot(&listener, &slots, "metrics endpoint").await?;
        let calls = calls.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let calls = calls.clone();
                async move { Ok::<_, Infallible>(handle(req, &calls).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                log::debug!("metrics connection from {peer}: {e}");
            }
            drop(permit);
        });
    }
}

async fn handle(req: HttpRequest<Incoming>, calls: &mpsc::Sender<Call>) -> HttpResponse<Body> {
    let route = match req.uri().path() {
        "/" | "/index.html" => Route::Page,
        "/metrics" => Route::Metrics,
        "/status.json" => Route::Json,
        _ => return text(StatusCode::NOT_FOUND, "not found\n".into()),
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let status = match fetch_status(calls).await {
        Ok(status) => status,
        Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")),
    };
    match route {
        Route::Metrics => respond(metrics::CONTENT_TYPE, metrics::encode(&status)),
        Route::Json => match serde_json::to_string_pretty(&status) {
            Ok(json) => respond("application/json", json),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        Route::Page => respond("text/html; charset=utf-8", page(&status)),
    }
}

enum Route {
    Page,
    Metrics,
    Json,
}

/// Asks the daemon's loop for its status, giving up after `STATUS_TIMEOUT`.
async fn fetch_status(calls: &mpsc::Sender<Call>) -> Result<Status> {
    let ask = async {
        let (tx, rx) = oneshot::channel();
        calls
            .send((Request::Status, tx))
            .await
            .map_err(|_| anyhow!("lbd is stopping"))?;
        match rx.await.map_err(|_| anyhow!("lbd is stopping"))? {
            Response::Status(status) => Ok(*status),
            Response::Error(e) => Err(anyhow!("lbd: {e}")),
            other => Err(anyhow!("unexpected answer from lbd: {other:?}")),
        }
    };
    tokio::time::timeout(STATUS_TIMEOUT, ask)
        .await
        .map_err(|_| anyhow!("lbd did not answer within {STATUS_TIMEOUT:?}"))?
}

/// The page with `status` embedded, so that it shows data on first paint
/// without waiting for its first fetch.
fn page(status: &Status) -> String {
    let json = serde_json::to_string(status).unwrap_or_else(|_| "null".into());
    // Inside a <script> element only "</script" (or "<!--") could end it
    // early; `<` appears in JSON only within strings, where \u003c means the
    // same character.
    PAGE.replacen(PAGE_STATUS_SLOT, &json.replace('<', "\\u003c"), 1)
}

fn respond(content_type: &'static str, body: String) -> HttpResponse<Body> {
    let mut resp = HttpResponse::new(Full::new(Bytes::from(body)));
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Every answer is a snapshot of live counters.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn text(code: StatusCode, body: String) -> HttpResponse<Body> {
    let mut resp = respond("text/plain; charset=utf-8", body);
    *resp.status_mut() = code;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BackendStatus, Counters, ServiceStatus, SwarmService, SwarmVip};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn sample() -> Status {
        Status {
            services: vec![ServiceStatus {
                name: "</script><b>web".into(),
                frontend: "10.73.0.10:80/tcp".into(),
                source: "config:/etc/lbd.toml".into(),
                counters: Counters {
                    new_flows: 7,
                    ..Default::default()
                },
                backends: vec![BackendStatus {
                    node: None,
                    id: 1,
                    address: "10.72.1.2:8080".into(),
                    weight: 1,
                    state: "active".into(),
                    active_flows: 0,
                    weight_override: None,
                    counters: Counters::default(),
                }],
            }],
            swarm: vec![SwarmService {
                name: "api".into(),
                vips: vec![SwarmVip {
                    address: "10.0.1.2".into(),
                    network: 4097,
                    counters: Counters::default(),
                }],
                frontends: vec!["10.0.1.2:0/tcp".into(), "10.0.1.2:0/udp".into()],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// A stand-in for the daemon's loop: answers every call with `answer`.
    fn daemon(answer: Response) -> mpsc::Sender<Call> {
        let (tx, mut rx) = mpsc::channel::<Call>(4);
        tokio::spawn(async move {
            while let Some((_, reply)) = rx.recv().await {
                let _ = reply.send(answer.clone());
            }
        });
        tx
    }

    /// One HTTP/1.1 request over a fresh connection; returns the status code
    /// and the whole response.
    async fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        let code = out[9..12].parse().unwrap();
        (code, out)
    }

    async fn start(answer: Response) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_on(listener, daemon(answer)));
        addr
    }

    #[test]
    fn only_loopback_addresses_are_accepted() {
        for ok in [
            "127.0.0.1:9100",
            "127.3.2.1:1",
            "[::1]:9100",
            "[::ffff:127.0.0.1]:80",
        ] {
            check_addr(ok.parse().unwrap()).unwrap();
        }
        for bad in ["0.0.0.0:9100", "10.0.0.1:9100", "[::]:9100", "[fd00::1]:80"] {
            let err = check_addr(bad.parse().unwrap()).unwrap_err().to_string();
            assert!(err.contains("loopback only"), "{err}");
        }
    }

    #[tokio::test]
    async fn non_loopback_bind_is_refused() {
        let (tx, _rx) = mpsc::channel(1);
        let err = serve("0.0.0.0:0".parse().unwrap(), tx).await.unwrap_err();
        assert!(err.to_string().contains("loopback only"), "{err}");
    }

    #[tokio::test]
    async fn routes() {
        let addr = start(Response::Status(Box::new(sample()))).await;

        let (code, body) = get(addr, "GET", "/metrics").await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("application/openmetrics-text"), "{body}");
        assert!(body.contains("lb_service_new_flows_total{"), "{body}");

        let (code, body) = get(addr, "GET", "/status.json").await;
        assert_eq!(code, 200, "{body}");
        let json = &body[body.find("\r\n\r\n").unwrap() + 4..];
        let back: Status = serde_json::from_str(json).unwrap();
        assert_eq!(back, sample());

        let (code, body) = get(addr, "GET", "/").await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("text/html"), "{body}");
        assert!(!body.contains(PAGE_STATUS_SLOT), "status not embedded");
        // The service name must not be able to close the script element.
        assert_eq!(
            body.matches("</script>").count(),
            PAGE.matches("</script>").count()
        );
        assert!(body.contains("\\u003c/script>\\u003cb>web"), "{body}");

        let (code, _) = get(addr, "HEAD", "/metrics").await;
        assert_eq!(code, 200);
        let (code, _) = get(addr, "GET", "/nope").await;
        assert_eq!(code, 404);
        let (code, body) = get(addr, "POST", "/metrics").await;
        assert_eq!(code, 405);
        assert!(
            body.to_ascii_lowercase().contains("allow: get, head"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn daemon_errors_answer_503() {
        let addr = start(Response::Error("reconciler busy".into())).await;
        let (code, body) = get(addr, "GET", "/metrics").await;
        assert_eq!(code, 503);
        assert!(body.contains("reconciler busy"), "{body}");
        // The 404 does not depend on the daemon.
        assert_eq!(get(addr, "GET", "/favicon.ico").await.0, 404);
    }
}
