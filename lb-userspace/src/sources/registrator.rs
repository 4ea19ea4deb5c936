//! `lbd --register`: this node's labelled containers, published into etcd
//! (etcd_layout.rs) so that lbd on other hosts balances over them too.
//!
//! Backends are written under a lease that lbd keeps alive: a container
//! that stops has its key deleted at once; a node that dies has its keys
//! expire with the lease. A service's `frontend` and settings are written
//! without a lease, only when the service has none yet (a transaction), and
//! removed when the last backend anywhere is withdrawn; a service whose
//! node died keeps its frontend and refuses connections until a backend
//! comes back or an operator deletes it.
//!
//! lbd restarting keeps the same keys: the new lbd writes them again under
//! its own lease before the old one expires, and deletes what the old one
//! left for containers that have gone meanwhile.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
use tokio::sync::{mpsc, watch};

use crate::model::Frontend;
use crate::sources::backoff::Backoff;
use crate::sources::etcd::Endpoint;
use crate::sources::etcd_layout::backend_value;

/// One labelled container as this node publishes it (labels::registrations).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// Key-safe service name.
    pub service: String,
    pub frontend: Frontend,
    /// The service's settings as etcd keys name them (`health`,
    /// `health.path`, `affinity_secs`, ...).
    pub settings: BTreeMap<String, String>,
    /// Key-safe container name.
    pub container: String,
    /// Where other hosts reach it.
    pub addr: SocketAddr,
    pub weight: u32,
}

/// What the registrator tells the daemon, for `lbctl status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub lease: Option<i64>,
    pub registered: Vec<String>,
    pub last_error: Option<String>,
}

pub struct Registrator {
    pub endpoint: Endpoint,
    pub node: String,
    pub ttl: Duration,
}

impl Registrator {
    fn services_root(&self) -> String {
        format!("{}/services/", self.endpoint.prefix.trim_end_matches('/'))
    }

    fn backend_key(&self, r: &Registration) -> String {
        format!(
            "{}{}/backends/{}/{}",
            self.services_root(),
            r.service,
            self.node,
            r.container
        )
    }

    /// Publishes `wanted` until the daemon stops. `wanted` is None until
    /// the Docker source has listed the containers once: until then this
    /// node's existing keys are left as they are.
    pub async fn run(
        self,
        mut wanted: watch::Receiver<Option<Vec<Registration>>>,
        tx: mpsc::Sender<Report>,
    ) {
        let mut backoff = Backoff::default();
        loop {
            let mut report = Report::default();
            match self.session(&mut wanted, &tx, &mut report).await {
                Ok(()) => return,
                Err(e) => {
                    if report.lease.is_some() {
                        backoff.reset();
                    }
                    log::warn!("registering in etcd: {e:#}; retrying");
                    report.lease = None;
                    report.last_error = Some(format!("{e:#}"));
                    if tx.send(report).await.is_err() {
                        return;
                    }
                }
            }
            backoff.wait().await;
        }
    }

    async fn session(
        &self,
        wanted: &mut watch::Receiver<Option<Vec<Registration>>>,
        tx: &mpsc::Sender<Report>,
        report: &mut Report,
    ) -> Result<()> {
        let mut client = self.endpoint.connect().await?;
        let ttl = i64::try_from(self.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = client
            .lease_grant(ttl, None)
            .await
            .context("granting a lease")?
            .id();
        report.lease = Some(lease);
        let (mut keeper, mut acks) = client
            .lease_keep_alive(lease)
            .await
            .context("keeping the lease alive")?;
        // Three tries per TTL: one lost keep-alive does not expire it.
        let mut tick = tokio::time::interval(self.ttl / 3);
        // Keys written under this lease, with their values.
        let mut published: BTreeMap<String, String> = BTreeMap::new();
        let mut swept = false;
        loop {
            let current = wanted.borrow_and_update().clone();
            if let Some(current) = current {
                if !swept {
                    self.sweep(&mut client, &current).await?;
                    swept = true;
                }
                if self
                    .publish(&mut client, lease, &current, &mut published)
                    .await?
                {
                    report.registered = published.keys().cloned().collect();
                    report.last_error = None;
                    if tx.send(report.clone()).await.is_err() {
                        return Ok(());
                    }
                }
            }
            tokio::select! {
                changed = wanted.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
                _ = tick.tick() => {
                    keeper.keep_alive().await.context("keeping the lease alive")?;
                }
                ack = acks.message() => {
                    match ack.context("keeping the lease alive")? {
                        Some(a) if a.ttl() > 0 => {}
                        // A lease that expired took its keys: a new
                        // session registers them again.
                        _ => bail!("the lease {lease:x} expired"),
                    }
                }
            }
        }
    }

    /// Deletes this node's registrations that are not wanted: those a
    /// previous lbd left for containers that have gone since.
    async fn sweep(&self, client: &mut Client, current: &[Registration]) -> Result<()> {
        let root = self.services_root();
        let response = client
            .get(
                root.as_str(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .context("listing registrations")?;
        let wanted: Vec<String> = current.iter().map(|r| self.backend_key(r)).collect();
        let mine = format!("/backends/{}/", self.node);
        for kv in response.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if key.contains(&mine) && !wanted.contains(&key) {
                let service = key[root.len()..]
                    .split('/')
                    .next()
                    .unwrap_or("")
                    .to_string();
                self.withdraw(client, &service, &key).await?;
            }
        }
        Ok(())
    }

    /// Makes etcd hold `current`; true if anything was written.
    async fn publish(
        &self,
        client: &mut Client,
        lease: i64,
        current: &[Registration],
        published: &mut BTreeMap<String, String>,
    ) -> Result<bool> {
        let wanted: BTreeMap<String, (&Registration, String)> = current
            .iter()
            .map(|r| (self.backend_key(r), (r, backend_value(r.addr, r.weight))))
            .collect();
        let mut changed = false;
        let gone: Vec<String> = published
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            let service = key[self.services_root().len()..]
                .split('/')
                .next()
                .unwrap_or("")
                .to_string();
            self.withdraw(client, &service, &key).await?;
            published.remove(&key);
            changed = true;
        }
        for (key, (r, value)) in &wanted {
            if published.get(key) == Some(value) {
                continue;
            }
            self.register(client, lease, key, r, value).await?;
            published.insert(key.clone(), value.clone());
            changed = true;
        }
        Ok(changed)
    }

    /// Writes one backend, and its service's frontend and settings if the
    /// service has no frontend yet.
    async fn register(
        &self,
        client: &mut Client,
        lease: i64,
        key: &str,
        r: &Registration,
        value: &str,
    ) -> Result<()> {
        let service = format!("{}{}/", self.services_root(), r.service);
        let frontend_key = format!("{service}frontend");
        let backend = TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)));
        let mut create = vec![TxnOp::put(
            frontend_key.as_str(),
            r.frontend.to_string(),
            None,
        )];
        for (name, v) in &r.settings {
            create.push(TxnOp::put(format!("{service}{name}"), v.as_str(), None));
        }
        create.push(backend.clone());
        let txn = Txn::new()
            .when([Compare::create_revision(
                frontend_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(create)
            .or_else([backend, TxnOp::get(frontend_key.as_str(), None)]);
        let response = client
            .txn(txn)
            .await
            .with_context(|| format!("registering {key}"))?;
        if response.succeeded() {
            log::info!(
                "registered {key} = {value}, with the service's frontend {}",
                r.frontend
            );
            return Ok(());
        }
        log::info!("registered {key} = {value}");
        for op in response.op_responses() {
            if let etcd_client::TxnOpResponse::Get(get) = op {
                if let Some(kv) = get.kvs().first() {
                    let there = String::from_utf8_lossy(kv.value());
                    if there != r.frontend.to_string() {
                        log::warn!(
                            "{frontend_key} is {there:?} in etcd, but this node's containers \
                             say {}: etcd's is served",
                            r.frontend
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes one backend, and the service's keys if it was the last.
    async fn withdraw(&self, client: &mut Client, service: &str, key: &str) -> Result<()> {
        client
            .delete(key, None)
            .await
            .with_context(|| format!("deleting {key}"))?;
        log::info!("withdrew {key}");
        let service_root = format!("{}{service}/", self.services_root());
        let backends = format!("{service_root}backends/");
        // No backend key left under the service: etcd compares an empty
        // range as one key whose create revision is 0.
        let txn = Txn::new()
            .when([Compare::create_revision(backends.as_str(), CompareOp::Equal, 0).with_prefix()])
            .and_then([TxnOp::delete(
                service_root.as_str(),
                Some(DeleteOptions::new().with_prefix()),
            )]);
        let response = client
            .txn(txn)
            .await
            .with_context(|| format!("removing {service_root}"))?;
        if response.succeeded() {
            log::info!("removed {service_root}: its last backend is gone");
        }
        Ok(())
    }
}
