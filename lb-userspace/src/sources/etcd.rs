//! etcd as a source: one read of the watched prefixes, then watches that
//! resume from the last revision seen. If etcd goes away, the last state
//! keeps serving; the source reconnects with backoff and resumes where it
//! was, or reads everything again if that revision was compacted.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use tokio::sync::{mpsc, watch};

use crate::sources::backoff::Backoff;
use crate::sources::etcd_layout::{self, Kvs, Parsed};
use crate::sources::label_frontends::Gate;

/// gRPC keep-alive: a silent etcd is noticed within interval + timeout.
const KEEPALIVE: Duration = Duration::from_secs(2);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach etcd (lbd's `--etcd*` flags).
#[derive(Clone, Debug, Default)]
pub struct Endpoint {
    pub urls: Vec<String>,
    pub prefix: String,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Endpoint {
    pub async fn connect(&self) -> Result<Client> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(KEEPALIVE, KEEPALIVE)
            .with_keep_alive_while_idle(true);
        if let Some(user) = &self.user {
            let password = match &self.password_file {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
                None => String::new(),
            };
            options = options.with_user(user, password);
        }
        if self.ca.is_some() || self.cert.is_some() {
            options = options.with_tls(self.tls()?);
        }
        Client::connect(&self.urls, Some(options))
            .await
            .with_context(|| format!("connecting to {}", self.urls.join(",")))
    }

    fn tls(&self) -> Result<etcd_client::TlsOptions> {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &self.ca {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => bail!("--etcd-cert and --etcd-key go together"),
        }
        Ok(tls)
    }

    /// The local address this node uses to reach the first endpoint: a
    /// good default for the address other hosts reach it at.
    pub fn local_address(&self) -> Option<IpAddr> {
        let url = self.urls.first()?;
        let authority = url.split("://").nth(1).unwrap_or(url).split('/').next()?;
        let target = std::net::ToSocketAddrs::to_socket_addrs(authority)
            .ok()?
            .next()?;
        let probe = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        // connect() on UDP sends nothing; it only chooses the route.
        let socket = std::net::UdpSocket::bind(probe).ok()?;
        socket.connect(target).ok()?;
        let local = socket.local_addr().ok()?.ip();
        (!local.is_loopback() && !local.is_unspecified()).then_some(local)
    }
}

/// What the source sends the daemon.
#[derive(Clone, Debug)]
pub enum Update {
    Connected,
    /// The state at `revision`, read into services. `received`: when the
    /// response that made it arrived.
    State {
        parsed: Parsed,
        revision: i64,
        /// Made by reading every key, not from watch events.
        full: bool,
        received: Instant,
    },
    /// etcd is unreachable; the last state stays in force.
    Disconnected {
        reason: String,
    },
}

/// What the source reads, besides the endpoint: the confd-style prefixes
/// the config file names (they change with it), this node's name when it
/// registers (its own registrations are served from its containers), and
/// the policy frontends must pass.
pub struct Inputs {
    pub sets: watch::Receiver<BTreeSet<String>>,
    pub node: Option<String>,
    pub gate: Gate,
}

pub async fn watch(endpoint: Endpoint, mut inputs: Inputs, tx: mpsc::Sender<Update>) {
    let mut mirror = Mirror::default();
    let mut backoff = Backoff::default();
    let mut down = false;
    loop {
        let mut connected = false;
        let Err(e) = session(&endpoint, &mut inputs, &mut mirror, &tx, &mut connected).await else {
            return; // the daemon is stopping
        };
        if connected {
            backoff.reset();
            down = false;
        }
        if !down {
            down = true;
            log::warn!(
                "etcd at {}: {e:#}; keeping the last known state, retrying",
                endpoint.urls.join(",")
            );
            let reason = format!("{e:#}");
            if tx.send(Update::Disconnected { reason }).await.is_err() {
                return;
            }
        }
        backoff.wait().await;
    }
}

/// The watched keys as last seen, and the revision they are at.
#[derive(Default)]
struct Mirror {
    kvs: Kvs,
    revision: i64,
    /// The prefixes `kvs` holds.
    prefixes: BTreeSet<String>,
}

/// One connection: returns Ok when the daemon stops, Err when etcd fails.
async fn session(
    endpoint: &Endpoint,
    inputs: &mut Inputs,
    mirror: &mut Mirror,
    tx: &mpsc::Sender<Update>,
    connected: &mut bool,
) -> Result<()> {
    let mut client = endpoint.connect().await?;
    let prefixes = watched(endpoint, &inputs.sets.borrow_and_update());
    let resume = mirror.revision > 0 && mirror.prefixes == prefixes;
    if !resume {
        read_all(&mut client, &prefixes, mirror).await?;
    }
    let mut full = !resume;
    let mut stream = open_watches(&mut client, &prefixes, mirror.revision + 1).await?;
    *connected = true;
    if tx.send(Update::Connected).await.is_err() {
        return Ok(());
    }
    let send = |mirror: &Mirror, inputs: &Inputs, received: Instant, full: &mut bool| {
        let parsed = parse(endpoint, inputs, mirror);
        tx.send(Update::State {
            parsed,
            revision: mirror.revision,
            full: std::mem::take(full),
            received,
        })
    };
    if send(mirror, inputs, Instant::now(), &mut full)
        .await
        .is_err()
    {
        return Ok(());
    }
    loop {
        tokio::select! {
            message = stream.message() => {
                let received = Instant::now();
                let Some(response) = message.context("watching")? else {
                    bail!("etcd closed the watch");
                };
                if response.canceled() || response.compact_revision() > 0 {
                    // Resuming would miss what compaction dropped, deletes
                    // above all: read everything again.
                    log::warn!(
                        "etcd watch cancelled at revision {} ({}); reading everything again",
                        mirror.revision,
                        response.cancel_reason()
                    );
                    mirror.revision = 0;
                    bail!("the watch was cancelled (compacted to revision {})", response.compact_revision());
                }
                let events = response.events();
                for event in events {
                    let Some(kv) = event.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    match event.event_type() {
                        EventType::Put => {
                            mirror.kvs.insert(key, String::from_utf8_lossy(kv.value()).into_owned());
                        }
                        EventType::Delete => {
                            mirror.kvs.remove(&key);
                        }
                    }
                }
                if let Some(h) = response.header() {
                    mirror.revision = mirror.revision.max(h.revision());
                }
                if !events.is_empty() && send(mirror, inputs, received, &mut full).await.is_err() {
                    return Ok(());
                }
            }
            changed = inputs.sets.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let now = watched(endpoint, &inputs.sets.borrow_and_update());
                if now != mirror.prefixes {
                    read_all(&mut client, &now, mirror).await?;
                    stream = open_watches(&mut client, &now, mirror.revision + 1).await?;
                    full = true;
                    if send(mirror, inputs, Instant::now(), &mut full).await.is_err() {
                        return Ok(());
                    }
                }
            }
            changed = inputs.gate.policy.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                if send(mirror, inputs, Instant::now(), &mut full).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

fn watched(endpoint: &Endpoint, sets: &BTreeSet<String>) -> BTreeSet<String> {
    let mut all: BTreeSet<String> = sets.iter().map(|s| slash(s)).collect();
    all.insert(slash(&endpoint.prefix));
    all
}

/// A prefix that matches its own keys only: `/lb` must not also watch
/// `/lbx`.
fn slash(prefix: &str) -> String {
    format!("{}/", prefix.trim_end_matches('/'))
}

/// Reads every watched prefix at one revision.
async fn read_all(
    client: &mut Client,
    prefixes: &BTreeSet<String>,
    mirror: &mut Mirror,
) -> Result<()> {
    let mut kvs = Kvs::new();
    let mut revision = 0;
    for prefix in prefixes {
        let mut options = GetOptions::new().with_prefix();
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let response =
            tokio::time::timeout(CALL_TIMEOUT, client.get(prefix.as_str(), Some(options)))
                .await
                .context("reading etcd timed out")?
                .with_context(|| format!("reading {prefix}"))?;
        if revision == 0 {
            revision = response.header().map_or(0, |h| h.revision());
        }
        for kv in response.kvs() {
            kvs.insert(
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            );
        }
    }
    *mirror = Mirror {
        kvs,
        revision,
        prefixes: prefixes.clone(),
    };
    Ok(())
}

/// One watch per prefix, on one stream, from `start`.
async fn open_watches(
    client: &mut Client,
    prefixes: &BTreeSet<String>,
    start: i64,
) -> Result<etcd_client::WatchStream> {
    let options = || {
        WatchOptions::new()
            .with_prefix()
            .with_start_revision(start)
            .with_progress_notify()
    };
    let mut iter = prefixes.iter();
    let first = iter.next().context("nothing to watch")?;
    let mut stream = client
        .watch(first.as_str(), Some(options()))
        .await
        .with_context(|| format!("watching {first}"))?;
    for prefix in iter {
        stream
            .watch(prefix.as_str(), Some(options()))
            .await
            .with_context(|| format!("watching {prefix}"))?;
    }
    Ok(stream)
}

fn parse(endpoint: &Endpoint, inputs: &Inputs, mirror: &Mirror) -> Parsed {
    let sets = inputs.sets.borrow().clone();
    etcd_layout::parse(
        &mirror.kvs,
        &endpoint.prefix,
        &sets,
        inputs.node.as_deref(),
        &inputs.gate.screen(),
    )
}
