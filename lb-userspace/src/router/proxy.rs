//! Forwarding one request: route, choose a backend, send, retry once, and
//! stream the response back.
//!
//! Bodies are never gathered: the client's request body is handed to the
//! backend connection frame by frame and the backend's response body to
//! the client the same way, so a transfer's size does not show in memory.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{self, PathAndQuery, Scheme, Uri};
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::balance::{self, Backend, InFlight};
use super::metrics::{Metrics, NO_ROUTE};
use super::table::{backend_path, Route, RouteBackend, Table};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

#[derive(Clone, Debug)]
pub struct ProxyOptions {
    pub connect_timeout: Duration,
    /// From a request's arrival to its response headers, retries included.
    pub request_timeout: Duration,
    /// How long an unused connection to a backend is kept for reuse.
    pub backend_idle_timeout: Duration,
    pub access_log: bool,
}

/// Where a request came from: the client's address, and whether its
/// connection is TLS.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub tls: bool,
}

/// A pool of connections to the backends. Each serving thread has its
/// own (`Proxy::client`), so that a request and the backend connection
/// it goes out on are handled by the same thread.
pub type BackendClient = Client<HttpConnector, Body>;

pub struct Proxy {
    table: RwLock<Arc<Table>>,
    pub metrics: Metrics,
    opts: ProxyOptions,
}

/// Headers that describe one connection, not the message (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

impl Proxy {
    /// A proxy with no routes yet (see `swap`).
    pub fn new(opts: ProxyOptions) -> Proxy {
        Proxy {
            table: RwLock::new(Arc::new(Table::default())),
            metrics: Metrics::default(),
            opts,
        }
    }

    /// A new, empty pool of backend connections, whose connections are
    /// driven by the runtime it is first used on.
    pub fn client(&self) -> BackendClient {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(self.opts.connect_timeout));
        connector.set_nodelay(true);
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.opts.backend_idle_timeout)
            .pool_timer(TokioTimer::new())
            .build(connector)
    }

    /// Requests that arrive from now on use `table`; those under way keep
    /// the one they started with.
    pub fn swap(&self, table: Table) {
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }

    pub fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Answers `req`, sending it on through `client`.
    pub async fn handle(
        &self,
        client: &BackendClient,
        mut req: Request<Incoming>,
        from: Peer,
    ) -> Response<Body> {
        let start = Instant::now();
        let peer = from.addr;
        let table = self.table();
        // An HTTP/1.1 upgrade (WebSocket): once the backend agrees, both
        // connections are joined into a tunnel.
        let upgrade = upgrade_protocol(&req);
        let mut client_side = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let head = Request::from_parts(parts, ());
        let host = request_host(&head);
        let Some(route) = table.lookup(host, head.uri().path()) else {
            return self.local(&head, peer, NO_ROUTE, StatusCode::NOT_FOUND, "no route");
        };
        if let (Some(limit), Some(length)) = (route.max_body_bytes, body.size_hint().exact()) {
            if length > limit {
                return self.local(
                    &head,
                    peer,
                    &route.name,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large",
                );
            }
        }
        let held = Arc::new(HeldBody {
            slot: Mutex::new(Some(body)),
            touched: AtomicBool::new(false),
            over_limit: AtomicBool::new(false),
        });
        let deadline = tokio::time::Instant::from_std(start + self.opts.request_timeout);
        let cookie = route.sticky.as_ref().and_then(|s| s.pinned(head.headers()));
        let mut failed: Option<(&RouteBackend, StatusCode)> = None;
        for _attempt in 0..2 {
            let pinned = match (failed, cookie) {
                (None, Some(addr)) => balance::pinned(route, addr),
                _ => None,
            };
            let Some(chosen) =
                pinned.or_else(|| balance::pick(route, failed.map(|(b, _)| b.backend.addr)))
            else {
                break;
            };
            if let Some((previous, _)) = failed {
                previous.metrics.retries.inc();
            }
            let body = RequestBody {
                held: held.clone(),
                body: None,
                limit: route.max_body_bytes,
                seen: 0,
                bytes: chosen.metrics.request_bytes.clone(),
            };
            let Some(out) = backend_request(
                &head,
                body,
                route,
                &chosen.backend,
                host,
                from,
                upgrade.as_ref(),
            ) else {
                return self.local(
                    &head,
                    peer,
                    &route.name,
                    StatusCode::BAD_REQUEST,
                    "request target cannot be forwarded",
                );
            };
            let sent = Sent::new(chosen.backend.clone(), chosen.metrics.in_flight.clone());
            match tokio::time::timeout_at(deadline, client.request(out)).await {
                Err(_) => {
                    return self.local(
                        &head,
                        peer,
                        &route.name,
                        StatusCode::GATEWAY_TIMEOUT,
                        "backend timed out",
                    );
                }
                Ok(Ok(mut resp)) => {
                    // A new client, or one whose backend is gone: pin it
                    // to the one that answered.
                    let addr = chosen.backend.addr;
                    if let Some(sticky) = &route.sticky {
                        if cookie != Some(addr) {
                            if let Some(v) = sticky.set_cookie(addr, from.tls) {
                                resp.headers_mut().append(header::SET_COOKIE, v);
                            }
                        }
                    }
                    chosen
                        .metrics
                        .latency
                        .observe(start.elapsed().as_secs_f64());
                    return self.respond(
                        &head,
                        peer,
                        route,
                        chosen,
                        sent,
                        resp,
                        client_side.take(),
                    );
                }
                Ok(Err(e)) => {
                    if held.over_limit.load(Ordering::Relaxed) {
                        return self.local(
                            &head,
                            peer,
                            &route.name,
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "request body too large",
                        );
                    }
                    let status = if is_timeout(&e) {
                        StatusCode::GATEWAY_TIMEOUT
                    } else {
                        StatusCode::BAD_GATEWAY
                    };
                    log::debug!(
                        "{} {}: backend {}: {e:?}",
                        route.name,
                        head.uri(),
                        chosen.backend.addr
                    );
                    let connect = e.is_connect();
                    if connect {
                        chosen.backend.quarantine();
                    }
                    // Not sent at all, or sent without a body and safe to repeat.
                    let again = connect
                        || (is_idempotent(head.method()) && !held.touched.load(Ordering::Relaxed));
                    failed = Some((chosen, status));
                    if !again {
                        break;
                    }
                }
            }
        }
        match failed {
            Some((_, status)) => {
                let why = if status == StatusCode::GATEWAY_TIMEOUT {
                    "backend timed out"
                } else {
                    "backend failed"
                };
                self.local(&head, peer, &route.name, status, why)
            }
            None => self.local(
                &head,
                peer,
                &route.name,
                StatusCode::SERVICE_UNAVAILABLE,
                "no backend available",
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn respond(
        &self,
        head: &Request<()>,
        peer: SocketAddr,
        route: &Route,
        chosen: &RouteBackend,
        sent: Sent,
        mut resp: Response<Incoming>,
        client_side: Option<OnUpgrade>,
    ) -> Response<Body> {
        let status = resp.status();
        self.count(head, peer, &route.name, Some(chosen), status);
        if let (StatusCode::SWITCHING_PROTOCOLS, Some(client_side)) = (status, client_side) {
            let backend_side = hyper::upgrade::on(&mut resp);
            let protocol = resp.headers().get(header::UPGRADE).cloned();
            let (mut parts, _) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            if let Some(p) = protocol {
                parts.headers.insert(header::UPGRADE, p);
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            }
            let counters = (
                chosen.metrics.request_bytes.clone(),
                chosen.metrics.response_bytes.clone(),
            );
            tokio::spawn(tunnel(client_side, backend_side, sent, counters));
            let empty = Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed_unsync();
            return Response::from_parts(parts, empty);
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = ResponseBody {
            inner: body,
            bytes: chosen.metrics.response_bytes.clone(),
            _sent: sent,
        };
        Response::from_parts(parts, body.boxed_unsync())
    }

    /// An answer of the router's own, with a one-line body.
    fn local<T>(
        &self,
        req: &Request<T>,
        peer: SocketAddr,
        route: &str,
        status: StatusCode,
        why: &str,
    ) -> Response<Body> {
        self.count(req, peer, route, None, status);
        let body = Full::new(Bytes::from(format!("{} {why}\n", status.as_u16())))
            .map_err(|never| match never {})
            .boxed_unsync();
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }

    fn count<T>(
        &self,
        req: &Request<T>,
        peer: SocketAddr,
        route: &str,
        backend: Option<&RouteBackend>,
        status: StatusCode,
    ) {
        match backend {
            Some(b) => b.metrics.count(status.as_u16()),
            None => self.metrics.count_local(route, status.as_u16()),
        }
        if self.opts.access_log {
            let backend = backend.map_or("-", |b| b.backend.label());
            log::info!(
                target: "access",
                "{} {} {} {:?} route={} backend={} status={}",
                peer.ip().to_canonical(),
                req.method(),
                req.uri(),
                req.version(),
                if route.is_empty() { "-" } else { route },
                backend,
                status.as_u16()
            );
        }
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Upgrade`, with
/// `upgrade` among its `Connection` options).
fn upgrade_protocol<T>(req: &Request<T>) -> Option<HeaderValue> {
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|o| o.trim().eq_ignore_ascii_case("upgrade"));
    (asks && req.version() == Version::HTTP_11)
        .then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten()
}

/// Copies both ways between the client's and the backend's upgraded
/// connections until either side closes; the request counts as in flight
/// on its backend until then.
async fn tunnel(
    client_side: OnUpgrade,
    backend_side: OnUpgrade,
    _sent: Sent,
    (up, down): (Counter, Counter),
) {
    let (client, backend) = match tokio::try_join!(client_side, backend_side) {
        Ok(both) => both,
        Err(e) => {
            log::debug!("upgrade: {e}");
            return;
        }
    };
    let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
    match tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        Ok((to_backend, to_client)) => {
            up.inc_by(to_backend);
            down.inc_by(to_client);
        }
        Err(e) => log::debug!("upgraded connection: {e}"),
    }
}

/// The request's host: the absolute URI's (HTTP/2's `:authority`), else
/// the Host header.
fn request_host<T>(req: &Request<T>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The request as the backend gets it: its path (maybe without the
/// route's prefix), HTTP/1.1, no hop-by-hop headers, and where it came from;
/// `None` for a request target that is not a path (`OPTIONS *`).
fn backend_request(
    head: &Request<()>,
    body: RequestBody,
    route: &Route,
    backend: &Backend,
    host: Option<&str>,
    from: Peer,
    upgrade: Option<&HeaderValue>,
) -> Option<Request<Body>> {
    let uri = backend_uri(head.uri(), route, backend)?;
    let mut headers = head.headers().clone();
    strip_hop_by_hop(&mut headers);
    if let Some(protocol) = upgrade {
        headers.insert(header::UPGRADE, protocol.clone());
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let client = from.addr.ip().to_canonical();
    let proto = if from.tls { "https" } else { "http" };
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {client}"),
        None => client.to_string(),
    };
    let node = match client {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("\"[{ip}]\""),
    };
    let mut forwarded = format!("for={node};proto={proto}");
    if let Some(h) = host {
        let quoted = h.replace('\\', "\\\\").replace('"', "\\\"");
        forwarded.push_str(&format!(";host=\"{quoted}\""));
        if let Ok(v) = HeaderValue::from_str(h) {
            headers.insert("x-forwarded-host", v.clone());
            // HTTP/2 requests carry it in :authority only.
            headers.entry(header::HOST).or_insert(v);
        }
    }
    if let Some(earlier) = headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        forwarded = format!("{earlier}, {forwarded}");
    }
    let set = |headers: &mut HeaderMap, name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    set(&mut headers, "x-forwarded-for", xff);
    set(&mut headers, "x-forwarded-proto", proto.into());
    set(&mut headers, "forwarded", forwarded);
    let mut out = Request::new(body.boxed_unsync());
    *out.method_mut() = head.method().clone();
    *out.uri_mut() = uri;
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = headers;
    Some(out)
}

/// `http://` the backend, then the request's path (maybe without the
/// route's prefix) and query; the path and query are shared with the
/// request, not copied, when the route keeps the path.
fn backend_uri(from: &Uri, route: &Route, backend: &Backend) -> Option<Uri> {
    let path = backend_path(route, from.path());
    let path_and_query = match from.path_and_query() {
        Some(pq) if pq.path() == path => pq.clone(),
        _ => {
            let joined = match from.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            };
            PathAndQuery::try_from(joined).ok()?
        }
    };
    if !path_and_query.path().starts_with('/') {
        return None;
    }
    let mut parts = uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(backend.authority.clone());
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).ok()
}

/// The client's request body, kept aside until a backend connection first
/// reads it: a request whose body was never read can be sent again.
struct HeldBody {
    slot: Mutex<Option<Incoming>>,
    touched: AtomicBool,
    over_limit: AtomicBool,
}

impl HeldBody {
    fn peek<R>(&self, f: impl FnOnce(Option<&Incoming>) -> R) -> R {
        f(self.slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref())
    }
}

struct RequestBody {
    held: Arc<HeldBody>,
    body: Option<Incoming>,
    limit: Option<u64>,
    seen: u64,
    bytes: Counter,
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.body.is_none() {
            this.held.touched.store(true, Ordering::Relaxed);
            this.body = this
                .held
                .slot
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
        }
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match ready!(Pin::new(body).poll_frame(cx)) {
            None => return Poll::Ready(None),
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            Some(Ok(frame)) => frame,
        };
        if let Some(data) = frame.data_ref() {
            this.seen += data.len() as u64;
            this.bytes.inc_by(data.len() as u64);
            if this.limit.is_some_and(|limit| this.seen > limit) {
                this.held.over_limit.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err("request body over the route's limit".into())));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Some(b) => b.is_end_stream(),
            None => self.held.peek(|b| b.is_none_or(|b| b.is_end_stream())),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Some(b) => b.size_hint(),
            None => self
                .held
                .peek(|b| b.map_or(SizeHint::with_exact(0), |b| b.size_hint())),
        }
    }
}

/// A request sent to a backend, counted until its response is done.
struct Sent {
    _in_flight: InFlight,
    gauge: Gauge,
}

impl Sent {
    fn new(backend: Arc<Backend>, gauge: Gauge) -> Sent {
        gauge.inc();
        Sent {
            _in_flight: InFlight::new(backend),
            gauge,
        }
    }
}

impl Drop for Sent {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

struct ResponseBody {
    inner: Incoming,
    bytes: Counter,
    _sent: Sent,
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame {
            if let Some(data) = f.data_ref() {
                this.bytes.inc_by(data.len() as u64);
            }
        }
        Poll::Ready(frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_with_those_connection_names() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn backend_uri_keeps_or_strips_the_path_and_keeps_the_query() {
        let table = |strip: bool| {
            let text = format!(
                "[[http.route]]\nname = \"api\"\npath = \"/api\"\nstrip_prefix = {strip}\n\
                 backends = [\"10.0.0.1:8080\"]\n"
            );
            let config = crate::config::parse(std::path::Path::new("t.toml"), &text).unwrap();
            let mut backends = balance::Backends::default();
            Table::build(&config.http, &mut backends, &Metrics::default())
        };
        let uri = |strip: bool, target: &str| {
            let t = table(strip);
            let route = t.lookup(None, "/api").unwrap();
            let from: Uri = target.parse().unwrap();
            backend_uri(&from, route, &route.backends[0].backend).map(|u| u.to_string())
        };
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            uri(false, "/api/x?a=1&b"),
            some("http://10.0.0.1:8080/api/x?a=1&b")
        );
        assert_eq!(
            uri(true, "/api/x?a=1&b"),
            some("http://10.0.0.1:8080/x?a=1&b")
        );
        assert_eq!(uri(true, "/api"), some("http://10.0.0.1:8080/"));
        assert_eq!(uri(true, "/api?q"), some("http://10.0.0.1:8080/?q"));
        // An absolute target (a proxy request, or HTTP/2) keeps only its path.
        assert_eq!(
            uri(false, "http://example.com/api?q"),
            some("http://10.0.0.1:8080/api?q")
        );
        assert_eq!(uri(false, "*"), None);
    }
}
