//! A test HTTP backend for lbrouter's tests.
//!
//! `lb-http --name NAME --listen ADDR...` answers every request with what
//! it saw (its name, the path, the number of its connection, every header)
//! and headers `x-backend` and `x-conn`. The query steers it:
//! `download=N` streams N bytes, `sleep_ms=N` waits first, `die=1` drops
//! the connection without answering, `cut=N` sends N bytes of a body
//! announced twice as long and drops the connection. A request body is read as it comes and
//! answered with `received=N`. An `Upgrade` request is agreed to, and
//! what follows on the connection is echoed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

const CHUNK: usize = 64 * 1024;

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?
        .parse()
        .ok()
}

/// `n` bytes in chunks, then an error if `fail` (a cut connection).
fn stream(n: u64, fail: bool) -> Body {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(2);
    tokio::spawn(async move {
        let mut left = n;
        while left > 0 {
            let len = left.min(CHUNK as u64) as usize;
            if tx.send(Ok(Frame::data(chunk.slice(..len)))).await.is_err() {
                return;
            }
            left -= len as u64;
        }
        if fail {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(Err("cut".into())).await;
        }
    });
    let mut rx = rx;
    StreamBody::new(futures::stream::poll_fn(move |cx| rx.poll_recv(cx))).boxed()
}

async fn answer(
    name: Arc<String>,
    conn: u64,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, BoxError> {
    if let Some(protocol) = req.headers().get("upgrade").cloned() {
        return Ok(echo_upgrade(&name, protocol, &mut req));
    }
    if let Some(ms) = query(&req, "sleep_ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if query(&req, "die") == Some(1) {
        return Err("told to die".into());
    }
    // Every header as `name: value`, for the tests to look for.
    let mut text = format!(
        "backend={name}\npath={}\nconn={conn}\n",
        req.uri().path_and_query().map_or("", |p| p.as_str()),
    );
    for (k, v) in req.headers() {
        text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    let download = query(&req, "download");
    let cut = query(&req, "cut");
    let mut body = req.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            received += d.len() as u64;
        }
    }
    text.push_str(&format!("received={received}\n"));
    let body = match (download, cut) {
        (_, Some(n)) => stream(n, true),
        (Some(n), None) => stream(n, false),
        (None, None) => http_body_util::Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    };
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        "x-backend",
        name.as_str().parse().expect("a name is a header value"),
    );
    resp.headers_mut().insert("x-conn", conn.into());
    // A cut body promises twice what it sends.
    if let Some(n) = download.or(cut.map(|n| 2 * n)) {
        resp.headers_mut().insert("content-length", n.into());
    }
    Ok(resp)
}

/// Agrees to the upgrade and echoes whatever comes on the connection
/// after it; `x-key` returns the request's `Sec-WebSocket-Key`.
fn echo_upgrade(
    name: &str,
    protocol: hyper::header::HeaderValue,
    req: &mut Request<Incoming>,
) -> Response<Body> {
    let key = req.headers().get("sec-websocket-key").cloned();
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on.await {
            let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let empty = http_body_util::Empty::new().map_err(|never| match never {});
    let mut resp = Response::new(empty.boxed());
    *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert("upgrade", protocol);
    h.insert("connection", "upgrade".parse().expect("a header value"));
    h.insert("x-backend", name.parse().expect("a name is a header value"));
    if let Some(k) = key {
        h.insert("x-key", k);
    }
    resp
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut name = String::from("http");
    let mut listen: Vec<SocketAddr> = Vec::new();
    while let Some(a) = args.next() {
        let value = args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--name" => name = value,
            "--listen" => listen.push(value.parse().expect("--listen ADDR:PORT")),
            other => panic!("unknown argument {other}"),
        }
    }
    let name = Arc::new(name);
    let conns = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for addr in listen {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let (name, conns) = (name.clone(), conns.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let conn = conns.fetch_add(1, Ordering::Relaxed) + 1;
                let name = name.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let name = name.clone();
                        // A concrete error type: hyper closes the connection.
                        async move {
                            answer(name, conn, req)
                                .await
                                .map_err(|e| std::io::Error::other(e.to_string()))
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}
