//! A real etcd (Debian's etcd-server, 3.4) inside a namespace of the test,
//! and a blocking client for it.
//!
//! Each [`Etcd`] is a one-member cluster listening on one address of its
//! namespace (clients on port 2379, peers on 2380), with its data under
//! `<temp dir>/lbt-<pid>-etcd-<tag>/data`, so that a later run can tell a
//! killed run's server by its `--data-dir` and remove it
//! ([`cleanup_stale`]). [`Etcd::stop`] and [`Etcd::kill`] keep the data,
//! and [`Etcd::start`] starts the same member again on it, as a restarted
//! etcd would; dropping it kills the server and removes the directory.
//!
//! [`EtcdClient`] wraps the etcd-client crate in a small tokio runtime
//! whose threads live in the server's namespace (the test's own threads are
//! in the root namespace, which has no route to it); every call is bounded.

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use etcd_client::{Client, ConnectOptions, DeleteOptions, GetOptions, PutOptions};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::netns::{owner_pid, pid_alive, unique_name, Netns};
use crate::process::ChildGuard;

/// Debian's etcd-server installs it here (`cargo xtask setup` does).
pub const ETCD_BIN: &str = "/usr/bin/etcd";
pub const CLIENT_PORT: u16 = 2379;
pub const PEER_PORT: u16 = 2380;
/// A fresh member elects itself within about a second; a restarted one
/// first waits out an election timeout.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// One probe while waiting for the server to answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Any one client call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);
/// How long a killed server may take to disappear from /proc.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Directory names start with `lbt-<pid>-` and then this.
const DIR_TAG: &str = "etcd-";

/// An etcd server in a namespace of the test.
pub struct Etcd {
    netns: PathBuf,
    addr: IpAddr,
    /// `lbt-<pid>-etcd-<tag>`: the member's name and its directory's.
    name: String,
    dir: PathBuf,
    process: Option<ChildGuard>,
    client: EtcdClient,
    /// Serving https only, to clients with a certificate of its CA.
    tls: Option<Tls>,
}

/// PEM files for mutual TLS, made with openssl under the server's
/// directory: one CA, the server's certificate (for its address) and a
/// client's.
#[derive(Clone, Debug)]
pub struct Tls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Tls {
    fn make(dir: &Path, server: IpAddr) -> Result<Tls> {
        let tls = Tls {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        };
        let ca_key = dir.join("ca-key.pem");
        let openssl = |args: &[&str]| -> Result<()> {
            let out = Command::new("openssl").args(args).output()?;
            anyhow::ensure!(
                out.status.success(),
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        let p = |p: &Path| p.display().to_string();
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=lb test CA",
            "-keyout",
            &p(&ca_key),
            "-out",
            &p(&tls.ca),
        ])?;
        for (cert, key, cn, ext) in [
            (
                &tls.server_cert,
                &tls.server_key,
                "etcd",
                format!("subjectAltName=IP:{server}"),
            ),
            (
                &tls.client_cert,
                &tls.client_key,
                "lbd",
                "extendedKeyUsage=clientAuth".to_string(),
            ),
        ] {
            let csr = dir.join(format!("{cn}.csr"));
            openssl(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &p(key),
                "-out",
                &p(&csr),
            ])?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &p(&csr),
                "-CA",
                &p(&tls.ca),
                "-CAkey",
                &p(&ca_key),
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &p(&write_ext(dir, cn, &ext)?),
                "-out",
                &p(cert),
            ])?;
        }
        Ok(tls)
    }
}

fn write_ext(dir: &Path, name: &str, ext: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.ext"));
    std::fs::write(&path, format!("{ext}\n"))?;
    Ok(path)
}

impl Etcd {
    /// Starts etcd in `ns` on `addr` (already configured there) and waits
    /// until it answers. `tag` tells apart several servers of one test.
    pub fn new(ns: &Netns, tag: &str, addr: IpAddr) -> Result<Self> {
        Self::start_new(ns, tag, addr, false)
    }

    /// [`Self::new`], serving https only and only to clients with a
    /// certificate of its own CA ([`Self::tls`]).
    pub fn new_tls(ns: &Netns, tag: &str, addr: IpAddr) -> Result<Self> {
        Self::start_new(ns, tag, addr, true)
    }

    fn start_new(ns: &Netns, tag: &str, addr: IpAddr, tls: bool) -> Result<Self> {
        cleanup_stale();
        let name = unique_name(&format!("{DIR_TAG}{tag}"));
        let dir = root().join(&name);
        if dir.exists() {
            bail!(
                "{} exists: an etcd tagged {tag:?} is already running in this process",
                dir.display()
            );
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let tls = match tls.then(|| Tls::make(&dir, addr)).transpose() {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let client = match EtcdClient::connect_with(
            &ns.path(),
            &[client_url(addr, tls.is_some())],
            tls.as_ref(),
        ) {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // Built before starting, so a failure below still removes it.
        let mut etcd = Self {
            netns: ns.path(),
            addr,
            name,
            dir,
            process: None,
            client,
            tls,
        };
        etcd.start()?;
        Ok(etcd)
    }

    /// Starts the server again on its data after [`Self::stop`] or
    /// [`Self::kill`]: the same member, keys, revisions and leases.
    pub fn start(&mut self) -> Result<()> {
        if self.process.is_some() {
            bail!("etcd {} is running", self.name);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let client_url = client_url(self.addr, self.tls.is_some());
        let peer_url = url("http", self.addr, PEER_PORT);
        let mut cmd = crate::netns::command_in(&self.netns, ETCD_BIN);
        // The machine's own etcd settings, if any, stay out of it.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD") {
                cmd.env_remove(key);
            }
        }
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            // Ignored once the data directory holds a member.
            .args(["--initial-cluster", &format!("{}={peer_url}", self.name)])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = ChildGuard::spawn(&mut cmd)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait() {
                bail!(
                    "etcd {} exited during start-up ({status})\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            let probe = self
                .client
                .call_within(PROBE_TIMEOUT, "probe", |mut c| async move {
                    c.get("/", Some(GetOptions::new().with_count_only())).await
                });
            if probe.is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd {} did not answer on {client_url} within {START_TIMEOUT:?}: {:#}\n{}",
                    self.name,
                    probe.unwrap_err(),
                    self.log_tail(30)
                );
            }
            sleep(POLL);
        }
        self.process = Some(child);
        Ok(())
    }

    /// SIGTERM (then SIGKILL after 2 s): an orderly shutdown. The data
    /// stays for [`Self::start`].
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.terminate();
        }
    }

    /// SIGKILL, as in a crash. The data stays for [`Self::start`].
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = kill(Pid::from_raw(p.pid() as i32), Signal::SIGKILL);
            p.terminate();
        }
    }

    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// `http://ADDR:2379` (https with TLS), as lbd's `--etcd` takes it.
    pub fn endpoint(&self) -> String {
        client_url(self.addr, self.tls.is_some())
    }

    /// The certificates, for a server made with [`Self::new_tls`].
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// A client that stays valid across restarts of the server.
    pub fn client(&self) -> &EtcdClient {
        &self.client
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    /// Everything the server logged, restarts included.
    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|raw| String::from_utf8_lossy(&raw).into_owned())
            .unwrap_or_default()
    }

    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- etcd {} ({}), last lines of its log:\n{}\n---",
                self.name,
                self.dir.display(),
                self.log_tail(30)
            );
        }
        self.kill();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("removing {}: {e}", self.dir.display());
        }
    }
}

fn url(scheme: &str, addr: IpAddr, port: u16) -> String {
    format!("{scheme}://{}", std::net::SocketAddr::from((addr, port)))
}

fn client_url(addr: IpAddr, tls: bool) -> String {
    url(if tls { "https" } else { "http" }, addr, CLIENT_PORT)
}

/// Where the servers' directories go: memory (`/dev/shm`) where there is
/// one, so that a stall of the machine's disk in etcd's fsync of every
/// write is not counted against lbd, whose convergence the tests time.
pub fn root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Kills the etcd servers of earlier test processes that no longer exist
/// (found by their `--data-dir` below [`root`]) and removes their
/// directories.
pub fn cleanup_stale() {
    let tmp = root();
    let me = std::process::id();
    let stale_dir = |dir: &Path| -> bool {
        dir.parent() == Some(tmp.as_path())
            && dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .is_some_and(|n| {
                    owner_pid(&n).is_some_and(|pid| pid != me && !pid_alive(pid))
                        && n.split('-').nth(2) == Some(DIR_TAG.trim_end_matches('-'))
                })
    };
    let mut killed = Vec::new();
    for (pid, data_dir) in etcd_processes() {
        if data_dir.parent().is_some_and(stale_dir) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed.push(pid);
        }
    }
    // A killed process keeps its files open until it is gone.
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while killed.iter().any(|&pid| process_alive(pid)) && Instant::now() < deadline {
        sleep(POLL);
    }
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if stale_dir(&path) && entry.file_type().is_ok_and(|t| t.is_dir()) {
            if let Err(e) = std::fs::remove_dir_all(&path) {
                eprintln!("removing {}: {e}", path.display());
            }
        }
    }
}

/// Pid and `--data-dir` of every running etcd.
fn etcd_processes() -> Vec<(i32, PathBuf)> {
    let mut found = Vec::new();
    for (pid, proc_dir) in crate::process::all_processes() {
        let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_etcd = args
            .first()
            .is_some_and(|a0| a0.rsplit('/').next() == Some("etcd"));
        if !is_etcd {
            continue;
        }
        let data_dir = args.iter().enumerate().find_map(|(i, a)| {
            a.strip_prefix("--data-dir=").map(String::from).or_else(|| {
                (a == "--data-dir")
                    .then(|| args.get(i + 1).cloned())
                    .flatten()
            })
        });
        if let Some(dir) = data_dir {
            found.push((pid, PathBuf::from(dir)));
        }
    }
    found
}

/// Whether `pid` exists and is not a zombie.
fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !matches!(
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next()),
            Some("Z" | "X")
        )
    })
}

/// A put under a lease of its own, which nobody keeps alive: the key goes
/// when the lease expires.
#[derive(Debug, Clone, Copy)]
pub struct LeasedPut {
    pub revision: u64,
    pub lease: i64,
}

/// A blocking etcd client whose connections are made from a given network
/// namespace. Calls fail after 5 s at most; the client reconnects by itself
/// when the server comes back.
pub struct EtcdClient {
    client: Client,
    /// Only taken by drop.
    rt: Option<tokio::runtime::Runtime>,
}

impl EtcdClient {
    /// A client of `endpoints` (`http://ADDR:2379`) from the namespace
    /// pinned at `netns`. Connects lazily: the server need not be up yet.
    pub fn connect(netns: &Path, endpoints: &[String]) -> Result<Self> {
        Self::connect_with(netns, endpoints, None)
    }

    /// [`Self::connect`], with the client certificate of `tls` if given.
    pub fn connect_with(netns: &Path, endpoints: &[String], tls: Option<&Tls>) -> Result<Self> {
        let ns =
            Arc::new(File::open(netns).with_context(|| format!("opening {}", netns.display()))?);
        let thread_ns = Arc::clone(&ns);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .enable_all()
            .thread_name("etcd-client")
            // Every socket of the client is opened on these threads.
            .on_thread_start(move || {
                if let Err(e) = setns(&*thread_ns, CloneFlags::CLONE_NEWNET) {
                    // Connections from the wrong namespace would only fail
                    // in confusing ways later.
                    eprintln!("etcd client thread: setns: {e}");
                    std::process::abort();
                }
            })
            .build()
            .context("building the etcd client's runtime")?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(PROBE_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1));
        if let Some(tls) = tls {
            let read =
                |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            options = options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?))
                    .identity(etcd_client::Identity::from_pem(
                        read(&tls.client_cert)?,
                        read(&tls.client_key)?,
                    )),
            );
        }
        let eps = endpoints.to_vec();
        let handle = rt.spawn(async move { Client::connect(eps, Some(options)).await });
        let client = rt
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, handle).await })
            .context("connecting to etcd: timed out")?
            .context("connecting to etcd: the task failed")?
            .with_context(|| format!("connecting to etcd at {endpoints:?}"))?;
        Ok(Self {
            client,
            rt: Some(rt),
        })
    }

    /// Runs one call of the crate's client on the runtime, bounded by
    /// `timeout`.
    fn call_within<T, F, Fut>(&self, timeout: Duration, what: &str, f: F) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
        T: Send + 'static,
    {
        let rt = self.rt.as_ref().expect("taken only by drop");
        let handle = rt.spawn(f(self.client.clone()));
        let abort = handle.abort_handle();
        match rt.block_on(async { tokio::time::timeout(timeout, handle).await }) {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(e).with_context(|| format!("etcd {what}")),
            Ok(Err(e)) => bail!("etcd {what}: {e}"),
            Err(_) => {
                abort.abort();
                bail!("etcd {what}: no answer within {timeout:?}")
            }
        }
    }

    fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
        T: Send + 'static,
    {
        self.call_within(CALL_TIMEOUT, what, f)
    }

    /// Puts `key` = `value`; returns the revision of the put.
    pub fn put(&self, key: &str, value: &str) -> Result<u64> {
        let (k, v) = (key.to_owned(), value.to_owned());
        let resp = self.call(&format!("put {key}"), |mut c| async move {
            c.put(k, v, None).await
        })?;
        header_revision(resp.header(), key)
    }

    /// Puts `key` = `value` under a new lease of `ttl_secs`, never kept
    /// alive.
    pub fn lease_put(&self, key: &str, value: &str, ttl_secs: i64) -> Result<LeasedPut> {
        let grant = self.call(&format!("lease grant ({ttl_secs} s)"), |mut c| async move {
            c.lease_grant(ttl_secs, None).await
        })?;
        let lease = grant.id();
        let (k, v) = (key.to_owned(), value.to_owned());
        let resp = self.call(
            &format!("put {key} (lease {lease:x})"),
            |mut c| async move { c.put(k, v, Some(PutOptions::new().with_lease(lease))).await },
        )?;
        Ok(LeasedPut {
            revision: header_revision(resp.header(), key)?,
            lease,
        })
    }

    /// Deletes `key`; returns the revision after it (unchanged when the
    /// key did not exist).
    pub fn delete(&self, key: &str) -> Result<u64> {
        let k = key.to_owned();
        let resp = self.call(&format!("delete {key}"), |mut c| async move {
            c.delete(k, None).await
        })?;
        header_revision(resp.header(), key)
    }

    /// Compacts the history up to `revision`: a watch from before it is
    /// cancelled by etcd.
    pub fn compact(&self, revision: u64) -> Result<()> {
        let rev = i64::try_from(revision)?;
        self.call(&format!("compact {revision}"), |mut c| async move {
            c.compact(rev, None).await
        })?;
        Ok(())
    }

    /// Deletes every key starting with `prefix`; returns the revision after.
    pub fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let k = prefix.to_owned();
        let resp = self.call(&format!("delete prefix {prefix}"), |mut c| async move {
            c.delete(k, Some(DeleteOptions::new().with_prefix())).await
        })?;
        header_revision(resp.header(), prefix)
    }

    /// Every key starting with `prefix`, with its value.
    pub fn get_prefix(&self, prefix: &str) -> Result<BTreeMap<String, String>> {
        let k = prefix.to_owned();
        let resp = self.call(&format!("get prefix {prefix}"), |mut c| async move {
            c.get(k, Some(GetOptions::new().with_prefix())).await
        })?;
        resp.kvs()
            .iter()
            .map(|kv| {
                Ok((
                    kv.key_str().context("a key that is not UTF-8")?.to_owned(),
                    kv.value_str()
                        .context("a value that is not UTF-8")?
                        .to_owned(),
                ))
            })
            .collect()
    }

    /// The store's current revision.
    pub fn revision(&self) -> Result<u64> {
        let resp = self.call("get revision", |mut c| async move {
            c.get("/", Some(GetOptions::new().with_count_only())).await
        })?;
        header_revision(resp.header(), "/")
    }

    /// Whether the lease still exists (it has not expired nor been revoked).
    pub fn lease_alive(&self, lease: i64) -> Result<bool> {
        let resp = self.call(
            &format!("lease {lease:x} time to live"),
            |mut c| async move { c.lease_time_to_live(lease, None).await },
        )?;
        Ok(resp.ttl() > 0)
    }
}

impl Drop for EtcdClient {
    fn drop(&mut self) {
        // Waiting for the tasks still running would only delay the test.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>, key: &str) -> Result<u64> {
    let rev = header
        .with_context(|| format!("etcd answer for {key} without a header"))?
        .revision();
    u64::try_from(rev).with_context(|| format!("etcd answer for {key}: revision {rev}"))
}
