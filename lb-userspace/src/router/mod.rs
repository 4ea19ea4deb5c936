//! lbrouter: the HTTP router beside the L4 balancer.
//!
//! It routes by host and path prefix to weighted backends (table.rs,
//! balance.rs), forwards with hyper (proxy.rs) and takes its routes from
//! the `[http]` section of lbd's config file (config.rs), reloaded on
//! SIGHUP and when the file changes. It uses none of the datapath: it is a
//! plain user-space proxy that can run with or without lbd.

pub mod balance;
pub mod config;
pub mod metrics;
pub mod proxy;
pub mod table;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Semaphore;

use self::balance::Backends;
use self::proxy::{Proxy, ProxyOptions};
use self::table::Table;
use crate::web::accept_slot;

/// How often the config file is checked for a change.
const POLL: Duration = Duration::from_secs(1);
/// Scrapes served at once.
const METRICS_CONNECTIONS: usize = 16;

pub struct Options {
    pub config: PathBuf,
    pub listen: Vec<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    /// Also bounds how long an HTTP/1 connection may sit idle between
    /// requests: hyper starts the clock when it waits for a request head.
    pub header_read_timeout: Duration,
    pub proxy: ProxyOptions,
}

pub async fn run(opts: Options) -> Result<()> {
    let mut backends = Backends::default();
    let first = crate::config::load(&opts.config)?;
    let table = Table::build(&first.http, &mut backends);
    log::info!("{}: {} routes", opts.config.display(), table.len());
    let proxy = Arc::new(Proxy::new(table, opts.proxy.clone()));

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        // hyper answers 431 when a request head does not fit.
        .max_buf_size(opts.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(opts.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(opts.max_connections));

    let mut tasks = tokio::task::JoinSet::new();
    for addr in &opts.listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        log::info!("serving HTTP on {addr}");
        tasks.spawn(accept(
            listener,
            proxy.clone(),
            builder.clone(),
            permits.clone(),
        ));
    }
    if let Some(addr) = opts.metrics {
        crate::web::check_addr(addr)?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        log::info!("serving metrics on {addr}");
        tasks.spawn(serve_metrics(listener, proxy.clone()));
    }
    tasks.spawn(reload(opts.config.clone(), proxy.clone(), backends));
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        res = tasks.join_next() => match res {
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(e.into()),
            _ => Ok(()),
        },
        _ = term.recv() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// Serves the connections of one listener, `permits` of them at once
/// (the others wait in the listen backlog).
async fn accept(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    permits: Arc<Semaphore>,
) -> Result<()> {
    loop {
        let (permit, stream, peer) = accept_slot(&listener, &permits, "http").await?;
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            proxy.metrics.connections.inc();
            let service = service_fn(|req: Request<Incoming>| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
            });
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                log::debug!("connection from {peer}: {e}");
            }
            proxy.metrics.connections.dec();
            drop(permit);
        });
    }
}

/// Applies the config file again on SIGHUP and when it changes; a file that
/// does not parse leaves the current routes in place.
async fn reload(path: PathBuf, proxy: Arc<Proxy>, mut backends: Backends) -> Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut stamp = crate::config::stamp(&path);
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = tick.tick() => {
                let now = crate::config::stamp(&path);
                if now == stamp {
                    continue;
                }
            }
        }
        stamp = crate::config::stamp(&path);
        let result = |r: &str| metrics::ResultLabels { result: r.into() };
        match crate::config::load(&path) {
            Ok(config) => {
                let table = Table::build(&config.http, &mut backends);
                log::info!("{}: reloaded, {} routes", path.display(), table.len());
                proxy.swap(table);
                proxy.metrics.reloads.get_or_create(&result("ok")).inc();
            }
            Err(e) => {
                log::error!("{e}; keeping the routes of the last good config");
                proxy
                    .metrics
                    .reloads
                    .get_or_create(&result("rejected"))
                    .inc();
            }
        }
    }
}

async fn serve_metrics(listener: TcpListener, proxy: Arc<Proxy>) -> Result<()> {
    let slots = Arc::new(Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let (permit, stream, _) = accept_slot(&listener, &slots, "metrics").await?;
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let service = service_fn(|req: Request<Incoming>| {
                let proxy = proxy.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, proxy.metrics.encode()),
                        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
                    };
                    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(crate::web::METRICS_CONTENT_TYPE),
                    );
                    Ok::<_, Infallible>(resp)
                }
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
