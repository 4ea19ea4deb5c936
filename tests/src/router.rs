//! lbrouter in the standard topology: the router in the LB namespace,
//! listening on the client link, an `lb-http` server in each backend
//! namespace, and HTTP clients (hyper, or raw bytes for malformed
//! requests) in the client namespace.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{HeaderMap, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::netns::{command_in, run_in, unique_name, Netns};
use crate::process::{wait_until, ChildGuard};
use crate::topology::{target_bin, Backend, LB_CLIENT_V4};

/// Where every backend's `lb-http` listens.
pub const BACKEND_PORT: u16 = 8000;
pub const ROUTER_PORT: u16 = 8080;
/// Where the router serves HTTPS, when a test asks for it.
pub const ROUTER_TLS_PORT: u16 = 8443;
/// The router's metrics, on the LB namespace's loopback.
pub const METRICS: &str = "127.0.0.1:9180";
const START_TIMEOUT: Duration = Duration::from_secs(10);

pub fn router_addr() -> SocketAddr {
    SocketAddr::from((LB_CLIENT_V4, ROUTER_PORT))
}

pub fn router_tls_addr() -> SocketAddr {
    SocketAddr::from((LB_CLIENT_V4, ROUTER_TLS_PORT))
}

/// `host:port` of backend `b`'s server, for configs.
pub fn backend_addr(b: &Backend) -> String {
    format!("{}:{BACKEND_PORT}", b.v4)
}

/// A connection to `addr` from inside the namespace at `ns` succeeds.
fn answers(ns: &Path, addr: SocketAddr) -> bool {
    run_in(ns, || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
    .unwrap_or(false)
}

/// Starts `lb-http` in backend `b`'s namespace and waits for it.
pub fn start_backend(b: &Backend) -> Result<ChildGuard> {
    let mut cmd = b.ns.command(target_bin("lb-http"));
    cmd.args(["--name", &b.name])
        .args(["--listen", &format!("0.0.0.0:{BACKEND_PORT}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut child = ChildGuard::spawn(&mut cmd)?;
    let probe = SocketAddr::from((Ipv4Addr::LOCALHOST, BACKEND_PORT));
    wait_until(START_TIMEOUT, &format!("lb-http of {}", b.name), || {
        child.try_wait().is_some() || answers(&b.ns.path(), probe)
    })?;
    if let Some(status) = child.try_wait() {
        bail!("lb-http of {} exited: {status}", b.name);
    }
    Ok(child)
}

/// A running lbrouter with its config file and log in a directory of its
/// own, removed on drop.
pub struct Router {
    child: ChildGuard,
    dir: PathBuf,
}

impl Router {
    /// Starts lbrouter in `lb` with `config` and extra `args`, listening on
    /// the client link, and waits until it accepts connections.
    pub fn start(lb: &Netns, config: &str, args: &[&str]) -> Result<Router> {
        Router::start_with_files(lb, config, &[], args)
    }

    /// As `start`, with `files` (name relative to the config file's
    /// directory, contents) written beside the config first.
    pub fn start_with_files(
        lb: &Netns,
        config: &str,
        files: &[(&str, &str)],
        args: &[&str],
    ) -> Result<Router> {
        Router::start_in(&lb.path(), config, files, args)
    }

    /// As `start_with_files`, in the namespace at `netns` (a container's:
    /// `router_addr()` must be one of its addresses).
    pub fn start_in(
        netns: &Path,
        config: &str,
        files: &[(&str, &str)],
        args: &[&str],
    ) -> Result<Router> {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(unique_name(&format!("lbrouter{seq}")));
        std::fs::create_dir_all(&dir)?;
        let guard = DirGuard(dir.clone());
        std::fs::write(dir.join("lbd.toml"), config)?;
        for (name, contents) in files {
            write_atomically(&dir.join(name), contents)?;
        }
        let log = std::fs::File::create(dir.join("log"))?;
        let mut cmd = command_in(netns, target_bin("lbrouter"));
        cmd.arg("--config")
            .arg(dir.join("lbd.toml"))
            .args(["--listen", &router_addr().to_string()])
            .args(["--metrics", METRICS])
            .args(["--log-level", "debug"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = ChildGuard::spawn(&mut cmd)?;
        wait_until(START_TIMEOUT, "lbrouter to accept connections", || {
            child.try_wait().is_some() || answers(netns, router_addr())
        })?;
        if let Some(status) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            bail!("lbrouter exited: {status}\n{log}");
        }
        std::mem::forget(guard);
        Ok(Router { child, dir })
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("lbd.toml")
    }

    /// Replaces the config file in one step (as editors and config
    /// managers do), so the router never reads half a file.
    pub fn write_config(&self, text: &str) -> Result<()> {
        write_atomically(&self.config_path(), text)
    }

    /// Replaces file `name` beside the config, in one step.
    pub fn write_file(&self, name: &str, contents: &str) -> Result<()> {
        write_atomically(&self.dir.join(name), contents)
    }

    /// Path of file `name` beside the config.
    pub fn file_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn sighup(&self) -> Result<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .context("SIGHUP to lbrouter")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// The Prometheus exposition, fetched from inside `lb`.
    pub fn metrics(&self, lb: &Netns) -> Result<String> {
        self.page(lb, "/metrics")
    }

    /// `path` on the metrics listener (the answer with its head), fetched
    /// from inside `lb`.
    pub fn page(&self, lb: &Netns, path: &str) -> Result<String> {
        lb.run(|| {
            let mut s = TcpStream::connect(METRICS)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
    }

    /// The sum of the samples of `name` whose line contains every one of
    /// `parts`.
    pub fn metric(&self, lb: &Netns, name: &str, parts: &[&str]) -> Result<f64> {
        let text = self.metrics(lb)?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Peak resident memory, from /proc.
    pub fn peak_rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmHWM in /proc/PID/status")
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.child.terminate();
        if std::thread::panicking() {
            eprintln!("lbrouter's log:\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_atomically(path: &std::path::Path, contents: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `f` to completion on a runtime of its own (in the calling
/// thread's network namespace).
pub fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(f)
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The value of `key=` or `key: ` in an `lb-http` answer.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.body.lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|r| r.strip_prefix('=').or_else(|| r.strip_prefix(": ")))
        })
    }

    pub fn backend(&self) -> &str {
        self.field("backend").unwrap_or("")
    }
}

/// One HTTP/1.1 client connection, reused for every request sent on it.
pub struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl H1 {
    pub async fn connect(addr: SocketAddr) -> Result<H1> {
        H1::over(tokio::net::TcpStream::connect(addr).await?).await
    }

    /// HTTP/1.1 on a connection already made (a TLS stream).
    pub async fn over<I>(io: I) -> Result<H1>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn);
        Ok(H1 { sender })
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Reply> {
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        reply(resp).await
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Result<Reply> {
        self.send(request("GET", host, path, Bytes::new())).await
    }
}

pub fn request(method: &str, host: &str, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(body))
        .expect("a valid request")
}

async fn reply(resp: hyper::Response<hyper::body::Incoming>) -> Result<Reply> {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One GET on a connection of its own.
pub async fn get(host: &str, path: &str) -> Result<Reply> {
    H1::connect(router_addr()).await?.get(host, path).await
}

/// An HTTP/2 connection with prior knowledge (h2c).
pub async fn h2_connect(addr: SocketAddr) -> Result<H2> {
    h2_over(tokio::net::TcpStream::connect(addr).await?).await
}

pub type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// HTTP/2 on a connection already made (a TLS stream whose ALPN chose h2).
pub async fn h2_over<I>(io: I) -> Result<H2>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends `req` on an HTTP/2 connection and reads the whole answer.
pub async fn h2_send(sender: &mut H2, req: Request<Full<Bytes>>) -> Result<Reply> {
    sender.ready().await?;
    reply(sender.send_request(req).await?).await
}

pub async fn h2_get(sender: &mut H2, authority: &str, path: &str) -> Result<Reply> {
    let req = Request::builder()
        .uri(format!("http://{authority}{path}"))
        .body(Full::new(Bytes::new()))?;
    h2_send(sender, req).await
}

/// Sends `raw` on a new connection and reads until the router closes it
/// or `timeout` passes; returns what came back and whether it closed.
pub fn raw_exchange(raw: &[u8], timeout: Duration) -> Result<(String, bool)> {
    let mut s = TcpStream::connect_timeout(&router_addr(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(raw)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    Ok((String::from_utf8_lossy(&out).into_owned(), closed))
}

/// The status of the first response in raw bytes.
pub fn raw_status(text: &str) -> Option<u16> {
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// A `[[http.route]]` table for configs.
pub fn route(
    name: &str,
    host: Option<&str>,
    path: &str,
    strip: bool,
    backends: &[String],
) -> String {
    let host = host.map_or(String::new(), |h| format!("host = \"{h}\"\n"));
    let list: Vec<String> = backends.iter().map(|b| format!("{b:?}")).collect();
    format!(
        "[[http.route]]\nname = \"{name}\"\n{host}path = \"{path}\"\nstrip_prefix = {strip}\n\
         backends = [{}]\n\n",
        list.join(", ")
    )
}
