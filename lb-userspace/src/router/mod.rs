//! lbrouter: the HTTP router beside the L4 balancer.
//!
//! It routes by host and path prefix to weighted backends (table.rs,
//! balance.rs), pins clients by cookie where a route asks (sticky.rs),
//! forwards with hyper (proxy.rs), serves HTTPS with the certificates of
//! tls.rs and takes its routes from the `[http]` section of lbd's config
//! file (config.rs), reloaded, certificates included, on SIGHUP and when
//! the files change. With `--docker` it also routes to the containers
//! and Swarm services that ask by their labels (discovery.rs, labels.rs);
//! the file's routes win a clash; docker-flow-proxy's reconfigure calls
//! (api.rs) label services as their labels would. It uses none of the datapath: it is a
//! plain user-space proxy that can run with or without lbd.

pub mod api;
pub mod balance;
pub mod config;
pub mod discovery;
pub mod labels;
pub mod metrics;
pub mod preface;
pub mod proxy;
pub mod routes_page;
pub mod sticky;
pub mod table;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use self::balance::Backends;
use self::proxy::{BackendClient, Peer, Proxy, ProxyOptions};
use self::table::Table;
use crate::web::{accept_shared_slot, accept_slot};

/// How often the config file is checked for a change.
const POLL: Duration = Duration::from_secs(1);
/// Each serving thread's listen backlog, per address.
const LISTEN_BACKLOG: u32 = 1024;
/// Requests served at once by a small endpoint (metrics, the API).
const METRICS_CONNECTIONS: usize = 16;

pub struct Options {
    pub config: PathBuf,
    pub listen: Vec<SocketAddr>,
    /// HTTPS listeners, with the certificates of `[http.tls]`.
    pub listen_tls: Vec<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    /// Also bounds how long an HTTP/1 connection may sit idle between
    /// requests (hyper starts the clock when it waits for a request head),
    /// and a TLS handshake.
    pub header_read_timeout: Duration,
    pub proxy: ProxyOptions,
    /// `--docker`: the engine to discover routes from.
    pub docker: Option<crate::sources::engine::Engine>,
    /// `--api`: where to serve docker-flow-proxy's calls, and the token.
    pub api: Option<(SocketAddr, String)>,
}

pub async fn run(opts: Options) -> Result<()> {
    let mut backends = Backends::default();
    let first = crate::config::load(&opts.config)?;
    let proxy = Arc::new(Proxy::new(opts.proxy.clone()));
    let table = Table::build(&first.http, &mut backends, &proxy.metrics);
    let (told_tx, told) = tokio::sync::watch::channel(api::Told::new());
    let discovered = opts.docker.clone().map(|engine| {
        let (tx, rx) = tokio::sync::watch::channel(discovery::Found::default());
        tokio::spawn(discovery::watch(engine, tx, told));
        rx
    });
    log::info!("{}: {} routes", opts.config.display(), table.len());
    let (watcher, tls) = if opts.listen_tls.is_empty() {
        if !first.http.certificates.is_empty() {
            log::info!("[http.tls] is set but there is no --listen-tls: no HTTPS");
        }
        (None, None)
    } else {
        let (watcher, certs) = tls::Watcher::start(&first.http.certificates)
            .with_context(|| format!("{}: [http.tls]", opts.config.display()))?;
        (Some(watcher), Some(tls::acceptor(certs)?))
    };
    proxy.swap(table);

    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        // hyper answers 431 when a request head does not fit.
        .max_buf_size(opts.max_header_bytes);
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(opts.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let permits = Arc::new(Semaphore::new(opts.max_connections));

    // Every listener is bound before any serves, so that one answering
    // means all are up.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut listeners: Vec<Vec<Listener>> = (0..threads).map(|_| Vec::new()).collect();
    let plain = opts.listen.iter().map(|a| (a, None));
    let secure = opts.listen_tls.iter().map(|a| (a, tls.clone()));
    for (addr, tls) in plain.chain(secure) {
        let what = if tls.is_some() { "HTTPS" } else { "HTTP" };
        let mut bound = *addr;
        for thread in listeners.iter_mut() {
            let listener = bind_shared(bound).with_context(|| format!("listening on {addr}"))?;
            // Port 0: every thread's listener takes the port the first got.
            bound = listener.local_addr()?;
            thread.push((listener, tls.clone()));
        }
        log::info!("serving {what} on {bound} ({threads} threads)");
    }
    let (failed_tx, mut failed) = tokio::sync::mpsc::unbounded_channel();
    let serving = Serving {
        proxy: proxy.clone(),
        protocols: Arc::new(Protocols { http1, http2 }),
        permits,
        head_timeout: opts.header_read_timeout,
    };
    for (index, listeners) in listeners.into_iter().enumerate() {
        serving.spawn_thread(index, listeners, failed_tx.clone())?;
    }
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = opts.metrics {
        crate::web::check_addr(addr)?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        log::info!("serving metrics on {addr}");
        tasks.spawn(serve_metrics(listener, proxy.clone()));
    }
    if let Some((addr, token)) = opts.api.clone() {
        // Clap makes --api need --docker.
        let found = discovered
            .clone()
            .context("the reconfigure API needs --docker discovery")?;
        tasks.spawn(api::serve(addr, token, told_tx, found));
    }
    tasks.spawn(reload(
        opts.config.clone(),
        proxy.clone(),
        backends,
        watcher,
        first.http,
        discovered,
    ));
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        Some(e) = failed.recv() => Err(e),
        res = tasks.join_next() => match res {
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(e.into()),
            _ => Ok(()),
        },
        _ = term.recv() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// A serving thread's listener, HTTPS with an acceptor.
type Listener = (std::net::TcpListener, Option<TlsAcceptor>);

/// A listener on `addr` that other sockets may share (SO_REUSEPORT): each
/// serving thread has one, and the kernel spreads new connections over
/// them. Its connections start with TCP_NODELAY (Linux copies it from
/// the listener), so that a response is never held back waiting for an
/// acknowledgement, without a system call per connection.
fn bind_shared(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(LISTEN_BACKLOG)?.into_std()?)
}

/// What every serving thread shares.
#[derive(Clone)]
struct Serving {
    proxy: Arc<Proxy>,
    protocols: Arc<Protocols>,
    /// Client connections served at once, over all threads.
    permits: Arc<Semaphore>,
    /// How long a new connection has for its TLS handshake, and then for
    /// its first bytes (hyper times the rest of each request head).
    head_timeout: Duration,
}

impl Serving {
    /// Starts a thread with a runtime of its own that accepts and serves
    /// the connections of `listeners`, with a pool of backend connections
    /// of its own, as a worker process of nginx or a thread of HAProxy
    /// does: a request, the backend connection it goes out on and their
    /// wake-ups stay on one thread. A thread that stops says why on
    /// `failed`.
    fn spawn_thread(
        &self,
        index: usize,
        listeners: Vec<Listener>,
        failed: UnboundedSender<anyhow::Error>,
    ) -> Result<()> {
        let serving = self.clone();
        let run = move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let client = Arc::new(serving.proxy.client());
                let mut tasks = tokio::task::JoinSet::new();
                for (listener, tls) in listeners {
                    let listener = TcpListener::from_std(listener)?;
                    tasks.spawn(serving.clone().accept(listener, tls, client.clone()));
                }
                match tasks.join_next().await {
                    Some(Ok(result)) => result,
                    Some(Err(e)) => Err(e.into()),
                    None => Ok(()),
                }
            })
        };
        std::thread::Builder::new()
            .name(format!("serve-{index}"))
            .spawn(move || {
                if let Err(e) = run() {
                    let _ = failed.send(e.context("a serving thread"));
                }
            })
            .context("starting a serving thread")?;
        Ok(())
    }

    /// Serves the connections of one listener while `permits` has room.
    async fn accept(
        self,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        client: Arc<BackendClient>,
    ) -> Result<()> {
        loop {
            let (permit, stream, peer) =
                accept_shared_slot(&listener, &self.permits, "http").await?;
            // Boxed: the connection's future is kilobytes (hyper's and
            // TLS's state), and spawning copies a future several times on
            // its way into the task; a box is copied as a pointer.
            let conn = Box::pin(
                self.clone()
                    .connection(stream, peer, tls.clone(), client.clone()),
            );
            tokio::spawn(async move {
                conn.await;
                drop(permit);
            });
        }
    }

    /// Serves one client connection; with `tls`, after its handshake.
    async fn connection(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        tls: Option<TlsAcceptor>,
        client: Arc<BackendClient>,
    ) {
        let Serving {
            proxy,
            protocols,
            head_timeout,
            ..
        } = self;
        proxy.metrics.connections.inc();
        match tls {
            None => {
                let from = Peer {
                    addr: peer,
                    tls: false,
                };
                serve(&protocols, stream, &proxy, &client, from, head_timeout).await;
            }
            Some(acceptor) => {
                match tokio::time::timeout(head_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let from = Peer {
                            addr: peer,
                            tls: true,
                        };
                        serve(&protocols, stream, &proxy, &client, from, head_timeout).await;
                    }
                    Ok(Err(e)) => {
                        proxy.metrics.tls_handshake_failures.inc();
                        log::debug!("TLS handshake with {peer}: {e}");
                    }
                    Err(_) => {
                        proxy.metrics.tls_handshake_failures.inc();
                        log::debug!("TLS handshake with {peer}: timed out");
                    }
                }
            }
        }
        proxy.metrics.connections.dec();
    }
}

/// How client connections are served, by the protocol they speak.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

/// Serves one client connection, HTTP/1.1 or HTTP/2 (by its preface, so
/// also whatever ALPN chose), until it closes. Its first bytes have as long
/// as a request head to arrive.
async fn serve<I>(
    protocols: &Protocols,
    io: I,
    proxy: &Arc<Proxy>,
    client: &Arc<BackendClient>,
    from: Peer,
    first_bytes_timeout: Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(|req: Request<Incoming>| {
        let proxy = proxy.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(proxy.handle(&client, req, from).await) }
    });
    let (protocol, io) = match tokio::time::timeout(first_bytes_timeout, preface::detect(io)).await
    {
        Ok(Ok(detected)) => detected,
        Ok(Err(e)) => return log::debug!("connection from {}: {e}", from.addr),
        Err(_) => {
            return log::debug!(
                "connection from {}: too little sent in time to tell its protocol",
                from.addr
            )
        }
    };
    let io = TokioIo::new(io);
    let served = match protocol {
        preface::Protocol::Http1 => {
            protocols
                .http1
                .serve_connection(io, service)
                .with_upgrades()
                .await
        }
        preface::Protocol::Http2 => protocols.http2.serve_connection(io, service).await,
    };
    if let Err(e) = served {
        log::debug!("connection from {}: {e}", from.addr);
    }
}

/// Applies the config file again on SIGHUP and when it changes; a file that
/// does not parse leaves its routes in place. With `--docker`, also applies
/// each change of the discovered routes. With HTTPS, also follows the
/// certificate files (`watcher`).
async fn reload(
    path: PathBuf,
    proxy: Arc<Proxy>,
    mut backends: Backends,
    mut watcher: Option<tls::Watcher>,
    mut file: config::HttpConfig,
    mut discovered: Option<tokio::sync::watch::Receiver<discovery::Found>>,
) -> Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut stamp = crate::config::stamp(&path);
    let mut tick = tokio::time::interval(POLL);
    let result = |r: &str| metrics::ResultLabels { result: r.into() };
    let mut clashes = Vec::new();
    loop {
        let (forced, found) = tokio::select! {
            _ = hup.recv() => (true, false),
            _ = tick.tick() => (false, false),
            changed = async { discovered.as_mut()?.changed().await.ok() }, if discovered.is_some() => {
                if changed.is_none() {
                    discovered = None;
                }
                (false, changed.is_some())
            }
        };
        let now = crate::config::stamp(&path);
        let mut apply = found;
        if forced || now != stamp {
            stamp = now;
            if let Some(config) = reload_config(&path, &proxy) {
                file = config.http;
                apply = true;
            }
        }
        if apply {
            let found = discovered
                .as_ref()
                .map(|d| d.borrow().routes.clone())
                .unwrap_or_default();
            let merged = merge(&file, found, &mut clashes);
            let table = Table::build(&merged, &mut backends, &proxy.metrics);
            log::info!("{} routes in force", table.len());
            proxy.swap(table);
        }
        if let Some(w) = &mut watcher {
            let outcome = w.refresh(&file.certificates, forced);
            let count = |r: &str, n: usize| {
                proxy
                    .metrics
                    .certificate_reloads
                    .get_or_create(&result(r))
                    .inc_by(n as u64)
            };
            count("ok", outcome.loaded);
            count("rejected", outcome.rejected);
        }
    }
}

/// The file's routes, then the discovered ones that clash with none (by the
/// file's rules: name, host and path, cookie). Each clash is logged once
/// (`logged` holds those in force).
fn merge(
    file: &config::HttpConfig,
    found: Vec<config::RouteSpec>,
    logged: &mut Vec<String>,
) -> config::HttpConfig {
    let mut taken = config::Taken::default();
    let mut out = file.clone();
    for r in &file.routes {
        // The file was checked whole; its routes cannot clash.
        let _ = taken.admit(r, format!("line {} of the config file", r.line));
    }
    let mut clashes = Vec::new();
    for r in found {
        match taken.admit(&r, "docker".into()) {
            Ok(()) => out.routes.push(r),
            Err((_, reason)) => clashes.push(format!("discovered {reason}; left out")),
        }
    }
    for c in clashes.iter().filter(|c| !logged.contains(c)) {
        log::warn!("{c}");
    }
    *logged = clashes;
    out
}

/// Loads the config file again; `None` when it is refused.
fn reload_config(path: &Path, proxy: &Proxy) -> Option<crate::config::FileConfig> {
    let result = |r: &str| metrics::ResultLabels { result: r.into() };
    match crate::config::load(path) {
        Ok(config) => {
            log::info!(
                "{}: reloaded, {} routes",
                path.display(),
                config.http.routes.len()
            );
            proxy.metrics.reloads.get_or_create(&result("ok")).inc();
            Some(config)
        }
        Err(e) => {
            log::error!("{e}; keeping the routes of the last good config");
            proxy
                .metrics
                .reloads
                .get_or_create(&result("rejected"))
                .inc();
            None
        }
    }
}

async fn serve_metrics(listener: TcpListener, proxy: Arc<Proxy>) -> Result<()> {
    serve_small(listener, "metrics", move |req| match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            crate::web::METRICS_CONTENT_TYPE,
            proxy.metrics.encode(),
        ),
        "/" => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            routes_page::text(&proxy.table()),
        ),
        "/routes" => (
            StatusCode::OK,
            "application/json",
            routes_page::json(&proxy.table()),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    })
    .await
}

/// A small HTTP/1 endpoint (metrics, the API) that answers each request
/// whole from `answer`: its status, content type and body. At most
/// METRICS_CONNECTIONS are served at once.
async fn serve_small<F>(listener: TcpListener, what: &'static str, answer: F) -> Result<()>
where
    F: Fn(&Request<Incoming>) -> (StatusCode, &'static str, String) + Send + Sync + 'static,
{
    let slots = Arc::new(Semaphore::new(METRICS_CONNECTIONS));
    let answer = Arc::new(answer);
    loop {
        let (permit, stream, _) = accept_slot(&listener, &slots, what).await?;
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = service_fn(|req: Request<Incoming>| {
                let (status, content_type, body) = answer(&req);
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                resp.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(content_type),
                );
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nodelay_from_the_listener() {
        let listener = bind_shared("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
