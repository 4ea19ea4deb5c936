//! The daemon's event loop. It owns the datapath and the reconciler and is
//! therefore the only place where maps are written; sources, the interface
//! watcher and the control socket are tasks that send it events.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::config;
use crate::control::{self, Call, Request, Response};
use crate::datapath::{Datapath, Limits};
use crate::failures;
use crate::health::{Checkers, Transition};
use crate::interfaces::{self, Links};
use crate::model::{Frontend, OnDown, ServiceSpec};
use crate::reconciler::Reconciler;
use crate::sources::docker::{self, DockerStatus, Update};
use crate::sources::label_frontends::{Gate, LabelPolicy};
use crate::sources::merge::{merge, Conflict};
use crate::sources::registrator::{Registration, Registrator};
use crate::sources::{etcd_layout, labels};
use crate::status::{self, ConfigStatus, Convergence, Status};
use crate::supervisor::Tasks;
use crate::vips::Vips;

pub struct Options {
    pub config: Option<PathBuf>,
    /// Docker Engine to watch.
    pub docker: Option<crate::sources::engine::Engine>,
    /// What container labels may take, from the flags; the config file's
    /// `[labels]` adds to it.
    pub labels: LabelPolicy,
    /// The engine's exec root, where Swarm's ingress sandbox lives, when
    /// given; otherwise found (sources/netns_dir.rs).
    pub docker_exec_root: Option<PathBuf>,
    /// etcd to read services from.
    pub etcd: Option<crate::sources::etcd::Endpoint>,
    /// With `--register`: this node's name and lease TTL in etcd.
    pub register: Option<(String, Duration)>,
    /// This node's address between hosts (`--node-address`): the source of
    /// connections to etcd services' backends, and what registrations name.
    pub node_address: Option<IpAddr>,
    /// Where the socket programs attach (see cgroup.rs); found when None.
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub interfaces: Vec<String>,
    pub keep_datapath: bool,
    pub limits: Limits,
    /// Where to serve Prometheus metrics and the stats page.
    pub metrics: Option<std::net::SocketAddr>,
    /// Make frontend addresses local (see vips.rs).
    pub local_vips: bool,
    /// Fail this background task once, shortly after it starts, to test
    /// that it is restarted (`lbd --inject-fault`).
    pub inject_fault: Option<String>,
    /// The datapath's rare events in lbd's log (see datapath_log.rs).
    pub datapath_log: crate::datapath_log::DatapathLog,
    /// How the TC program is attached (see datapath.rs).
    pub tc_attach: crate::datapath::TcAttach,
    /// Interfaces that get the XDP fast path as well (`--xdp`).
    pub xdp: Vec<String>,
    /// Packets for local containers go straight into their namespace
    /// (PEER_PORTS is filled); off with `--no-redirect-peer`.
    pub redirect_peer: bool,
}

/// The background task that follows interfaces as they come and go.
pub const INTERFACES_TASK: &str = "interfaces";

/// How often the config file's modification time is checked. Polling is
/// simpler and more robust than inotify against editors that replace the
/// file, and one stat a second costs nothing.
const CONFIG_POLL: Duration = Duration::from_secs(1);
/// The longest lbd waits for its sources' first state (and its first look
/// at the interfaces) before telling systemd it is ready.
const READY_GRACE: Duration = Duration::from_secs(5);
/// Convergence samples kept for the percentiles in `lbctl status`.
const LATENCY_SAMPLES: usize = 1000;

/// Everything the loop owns.
struct State {
    reconciler: Reconciler,
    datapath: Datapath,
    config_services: Vec<ServiceSpec>,
    conntrack: crate::model::ConntrackSettings,
    /// Counts connections and deletes expired ones off this loop.
    census: crate::census::Worker,
    config_status: ConfigStatus,
    docker_services: Vec<ServiceSpec>,
    /// Network namespaces on Swarm's overlay networks (service VIPs).
    docker_members: BTreeSet<crate::model::Member>,
    docker_status: Option<DockerStatus>,
    /// With `--register`, this node's labelled containers are served
    /// through etcd's services (etcd_layout::with_local), not on their own.
    local_labels: Vec<ServiceSpec>,
    etcd: crate::sources::etcd_layout::Parsed,
    etcd_status: Option<crate::status::EtcdStatus>,
    /// The registrator's input: None until Docker has listed containers.
    registrations: tokio::sync::watch::Sender<Option<Vec<Registration>>>,
    /// The confd-style prefixes the config file names, for the etcd source.
    etcd_sets: tokio::sync::watch::Sender<BTreeSet<String>>,
    etcd_backends: BTreeMap<String, String>,
    node_address: Option<IpAddr>,
    /// `--register`: this node's labelled containers go through etcd.
    register: bool,
    conflicts: Vec<Conflict>,
    /// Services the last convergence could not apply, and why.
    failing: Vec<crate::reconciler::ServiceFailure>,
    latencies: VecDeque<Duration>,
    reconcile: crate::status::Reconcile,
    /// Where Docker backends run, for `lbctl status`.
    backend_nodes: std::collections::BTreeMap<IpAddr, String>,
    /// Sources that have not delivered their first state yet. Until they
    /// have, services adopted from a previous lbd are kept: they may be
    /// theirs.
    awaiting_docker: bool,
    awaiting_etcd: bool,
    /// Drains and weights set with lbctl; drains are recorded under /run
    /// for the next lbd (see drains.rs).
    overrides: crate::overrides::Overrides,
    pin_dir: PathBuf,
    checkers: Checkers,
    /// Backends that failed their health checks, and why.
    down: HashMap<(Frontend, SocketAddr), String>,
    /// Frontend addresses that should be local (see vips.rs).
    vips_wanted: BTreeSet<IpAddr>,
    /// Health of the background tasks.
    tasks: Tasks,
    /// The label policy in force, for the Docker source.
    labels: tokio::sync::watch::Sender<LabelPolicy>,
}

pub async fn run(opts: Options) -> Result<()> {
    let _instance = crate::instance::Instance::claim(&opts.pin_dir, Some(&opts.socket))?;
    if let Some(addr) = opts.metrics {
        crate::web::check_addr(addr)?;
    }
    // A config that does not parse at start-up is fatal: there is no earlier
    // good state to keep serving.
    let file = match &opts.config {
        Some(path) => config::load(path)?,
        None => config::FileConfig::default(),
    };
    let drained = crate::drains::load(&opts.pin_dir)?;
    let limits = Limits {
        table_size: file.table_size.unwrap_or(opts.limits.table_size),
        ..opts.limits
    };
    let (mut datapath, maps) =
        Datapath::load_with_log(Some(&opts.pin_dir), limits, opts.datapath_log)?;
    datapath.set_tc_attach(opts.tc_attach);
    log::info!("TC attach mode: {}", opts.tc_attach.name());
    if opts.datapath_log != crate::datapath_log::DatapathLog::Off {
        let logger = datapath.logger()?;
        tokio::spawn(async move {
            if let Err(e) = crate::datapath_log::drain(logger).await {
                log::error!("the datapath's log stopped: {e:#}");
            }
        });
    }
    let (health_tx, mut health_rx) = mpsc::channel::<Transition>(64);
    let census = crate::census::Worker::start(&maps)?;
    let (labels_tx, labels_rx) = tokio::sync::watch::channel(opts.labels.union(&file.labels));
    let (etcd_sets, etcd_sets_rx) = tokio::sync::watch::channel(sets_of(&file.etcd_backends));
    let (registrations, registrations_rx) = tokio::sync::watch::channel(None);
    let mut state = State {
        reconciler: Reconciler::new(maps)?,
        datapath,
        config_services: file.services,
        conntrack: file.conntrack,
        census,
        config_status: ConfigStatus {
            path: opts.config.as_ref().map(|p| p.display().to_string()),
            ..Default::default()
        },
        docker_services: Vec::new(),
        docker_members: BTreeSet::new(),
        local_labels: Vec::new(),
        etcd: Default::default(),
        etcd_status: opts.etcd.as_ref().map(|e| crate::status::EtcdStatus {
            endpoints: e.urls.clone(),
            prefix: e.prefix.clone(),
            ..Default::default()
        }),
        registrations,
        etcd_sets,
        etcd_backends: file.etcd_backends,
        node_address: opts.node_address,
        register: opts.register.is_some(),
        docker_status: opts.docker.as_ref().map(|host| DockerStatus {
            host: host.to_string(),
            ..Default::default()
        }),
        conflicts: Vec::new(),
        failing: Vec::new(),
        latencies: VecDeque::new(),
        reconcile: Default::default(),
        backend_nodes: Default::default(),
        awaiting_docker: opts.docker.is_some(),
        awaiting_etcd: opts.etcd.is_some(),
        overrides: crate::overrides::Overrides::with_drained(drained),
        pin_dir: opts.pin_dir.clone(),
        checkers: Checkers::new(health_tx),
        down: HashMap::new(),
        vips_wanted: BTreeSet::new(),
        tasks: Tasks::default(),
        labels: labels_tx,
    };
    let mut vips = match opts.local_vips {
        true => Some(Vips::new(vips_record(&opts.pin_dir)).await?),
        false => None,
    };
    state.reconciler.set_local_vips(opts.local_vips);
    state
        .reconciler
        .set_conntrack(&state.conntrack)
        .context("writing the conntrack settings")?;
    if !state.awaiting() {
        state.reconciler.release_adopted();
    }
    // The kernel verifies the programs meanwhile (see Datapath::loaded); a
    // program it rejected ends the start after this.
    if let Some(e) = failures::config_error(&state.converge()) {
        anyhow::bail!("applying the initial state: {e}");
    }
    state.datapath.loaded()?;
    if opts.docker.is_some() {
        let cgroup = opts.cgroup.clone().map_or_else(crate::cgroup::v2_root, Ok);
        if let Err(e) = cgroup.and_then(|c| state.datapath.attach_sockets(&c)) {
            log::error!("Swarm service VIPs cannot be balanced: {e:#}");
        }
    }
    sync_vips(&mut vips, &state.vips_wanted).await;

    let tasks = &state.tasks;
    let fault = |name: &str| opts.inject_fault.as_deref() == Some(name);
    let (links_tx, mut links_rx) = mpsc::channel::<Links>(4);
    let only = opts.interfaces.clone();
    tasks.spawn(INTERFACES_TASK, fault(INTERFACES_TASK), move || {
        interfaces::watch(only.clone(), links_tx.clone())
    });

    let (calls_tx, mut calls_rx) = mpsc::channel::<Call>(16);
    if let Some(addr) = opts.metrics {
        let calls = calls_tx.clone();
        tasks.spawn("metrics", fault("metrics"), move || {
            crate::web::serve(addr, calls.clone())
        });
    }
    let socket = opts.socket.clone();
    tasks.spawn("control", fault("control"), move || {
        let (socket, calls) = (socket.clone(), calls_tx.clone());
        async move { control::serve(&socket, calls).await }
    });

    let gate = Gate {
        policy: labels_rx,
        added: vips.as_ref().map(|v| v.added()).unwrap_or_default(),
    };
    let (etcd_tx, mut etcd_rx) = mpsc::channel::<crate::sources::etcd::Update>(16);
    let (register_tx, mut register_rx) = mpsc::channel::<crate::sources::registrator::Report>(16);
    if let Some(endpoint) = opts.etcd.clone() {
        let node = opts.register.as_ref().map(|(name, _)| name.clone());
        let gate = gate.clone();
        let watched = endpoint.clone();
        tasks.spawn("etcd", fault("etcd"), move || {
            let inputs = crate::sources::etcd::Inputs {
                sets: etcd_sets_rx.clone(),
                node: node.clone(),
                gate: gate.clone(),
            };
            let watch = crate::sources::etcd::watch(watched.clone(), inputs, etcd_tx.clone());
            async move {
                watch.await;
                Ok(())
            }
        });
        if let Some((node, ttl)) = opts.register.clone() {
            tasks.spawn("registrator", fault("registrator"), move || {
                let registrator = Registrator {
                    endpoint: endpoint.clone(),
                    node: node.clone(),
                    ttl,
                };
                let run = registrator.run(registrations_rx.clone(), register_tx.clone());
                async move {
                    run.await;
                    Ok(())
                }
            });
        }
    }
    let (docker_tx, mut docker_rx) = mpsc::channel::<Update>(16);
    if let Some(host) = opts.docker.clone() {
        let exec_root = opts.docker_exec_root.clone();
        let register_at = opts.register.as_ref().and(opts.node_address);
        let gate = gate.clone();
        // It reconnects by itself; supervision covers a panic.
        tasks.spawn("docker", fault("docker"), move || {
            let watch = docker::watch(
                host.clone(),
                exec_root.clone(),
                register_at,
                gate.clone(),
                docker_tx.clone(),
            );
            async move {
                watch.await;
                Ok(())
            }
        });
    } else {
        drop(docker_tx);
    }

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut poll = tokio::time::interval(CONFIG_POLL);
    let mut config_stamp = opts.config.as_ref().and_then(|p| crate::config::stamp(p));
    let started = std::time::Instant::now();
    let mut ready = false;
    let mut attached = false;

    loop {
        // Ready once the datapath is attached to the interfaces there are
        // and every source has delivered its first state, or after a grace
        // period: an engine that is down must not keep systemd waiting
        // while lbd serves what it has.
        if !ready && ((attached && !state.awaiting()) || started.elapsed() >= READY_GRACE) {
            ready = true;
            crate::notify::ready(&state.summary());
        }
        tokio::select! {
            Some(t) = health_rx.recv() => state.health(t),
            Some(links) = links_rx.recv() => {
                state.sync_links(&links, &opts);
                attached = true;
            }
            Some(update) = docker_rx.recv() => state.docker_update(update),
            Some(update) = etcd_rx.recv() => state.etcd_update(update),
            Some(report) = register_rx.recv() => state.registered(report),
            Some((request, reply)) = calls_rx.recv() => {
                if matches!(request, Request::Reload) {
                    // Read now: the poll need not read it again.
                    config_stamp = opts.config.as_ref().and_then(|p| crate::config::stamp(p));
                }
                let _ = reply.send(state.answer(request, &opts));
            }
            _ = hup.recv() => {
                crate::notify::reloading();
                let _ = state.reload(&opts);
                crate::notify::ready(&state.summary());
            }
            _ = poll.tick() => {
                if let Some(path) = &opts.config {
                    let now = crate::config::stamp(path);
                    if now != config_stamp {
                        config_stamp = now;
                        let _ = state.reload(&opts);
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        sync_vips(&mut vips, &state.vips_wanted).await;
    }

    crate::notify::stopping();
    let _ = std::fs::remove_file(&opts.socket);
    let State {
        reconciler,
        datapath,
        ..
    } = state;
    drop(reconciler);
    if opts.keep_datapath {
        log::info!(
            "exiting; the datapath stays attached from {}",
            opts.pin_dir.display()
        );
        datapath.keep();
    } else {
        if let Some(v) = vips.as_mut() {
            if let Err(e) = v.clear().await {
                log::warn!("removing frontend addresses: {e:#}");
            }
        }
        log::info!("exiting; detaching and removing {}", opts.pin_dir.display());
        datapath.shutdown();
        crate::drains::forget(&opts.pin_dir);
    }
    Ok(())
}

/// Where the frontend addresses lbd added are listed. /run is right: those
/// addresses do not outlive a reboot either.
pub fn vips_record(pin_dir: &std::path::Path) -> PathBuf {
    crate::instance::run_file(pin_dir, "vips")
}

async fn sync_vips(vips: &mut Option<Vips>, wanted: &BTreeSet<IpAddr>) {
    if let Some(v) = vips.as_mut() {
        if let Err(e) = v.sync(wanted).await {
            log::warn!("frontend addresses: {e:#}");
        }
    }
}

/// The etcd prefixes the config file's services take backends from.
fn sets_of(etcd_backends: &BTreeMap<String, String>) -> BTreeSet<String> {
    etcd_backends.values().cloned().collect()
}

impl State {
    /// One line for systemd's status: what is served, and the last problem.
    fn summary(&self) -> String {
        let services = self.reconciler.applied().count();
        match &self.config_status.last_error {
            Some(e) => format!("{services} services; last reload rejected: {e}"),
            None => format!("{services} services"),
        }
    }

    /// Merges the sources and makes the maps equal to the result, service
    /// by service; returns the services that could not be applied.
    fn converge(&mut self) -> Vec<crate::reconciler::ServiceFailure> {
        let etcd =
            etcd_layout::with_local(&self.etcd.services, &self.local_labels, self.node_address);
        let config = self.config_with_etcd_backends();
        let (mut desired, conflicts) = merge(&[&config, &self.docker_services, &etcd]);
        desired.members = self.docker_members.clone();
        self.checkers.sync(&desired.services);
        let checkers = &self.checkers;
        self.down.retain(|(f, b), _| checkers.checks(f, b));
        self.overrides.apply(&mut desired.services);
        let mut reset = HashSet::new();
        for service in &mut desired.services {
            let on_down = service.health.as_ref().map(|h| h.on_down);
            for backend in &mut service.backends {
                if self
                    .down
                    .contains_key(&(service.frontend, backend.socket_addr()))
                {
                    backend.weight = 0;
                    if on_down == Some(OnDown::Reset) {
                        reset.insert((service.frontend, backend.socket_addr()));
                    }
                }
            }
        }
        // Swarm frontends are node addresses and the ingress sandbox's
        // address, all local where they are used already.
        self.vips_wanted = desired
            .services
            .iter()
            .filter(|s| s.source != crate::sources::swarm::SOURCE)
            .map(|s| s.frontend.addr)
            .collect();
        self.reconciler.set_reset(reset);
        for c in conflicts.iter().filter(|c| !self.conflicts.contains(c)) {
            log::error!(
                "frontend {} is owned by {}; rejected {}",
                c.frontend,
                c.owner,
                c.rejected
            );
        }
        self.conflicts = conflicts;
        let started = std::time::Instant::now();
        let (changes, failing) = failures::split(self.reconciler.apply(&desired));
        failures::log_changes(&self.failing, &failing);
        if let Some(d) = self.docker_status.as_mut() {
            d.failed = failures::docker_lines(&failing);
        }
        if let Some(e) = self.etcd_status.as_mut() {
            e.failed = failures::etcd_lines(&failing);
        }
        self.failing = failing.clone();
        if changes != Default::default() {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            self.reconcile.count += 1;
            self.reconcile.last_ms = ms;
            self.reconcile.max_ms = self.reconcile.max_ms.max(ms);
            log::info!(
                "applied {} services in {ms:.1} ms ({changes:?})",
                desired.services.len()
            );
        }
        failing
    }

    /// Reads the config file again: what changed, or why the file was
    /// rejected (the previous state then keeps serving).
    fn reload(&mut self, opts: &Options) -> Result<String, String> {
        let Some(path) = &opts.config else {
            return Err("lbd was started without a config file".into());
        };
        self.config_status.reloads += 1;
        let previous = std::mem::take(&mut self.config_services);
        let previous_sets = self.etcd_backends.clone();
        let mut summary = String::new();
        let result = config::load(path)
            .map_err(anyhow::Error::from)
            .and_then(|file| {
                let made = self.reconciler.maps().limits.table_size;
                let wanted = file.table_size.unwrap_or(lb_common::MAGLEV_M);
                if wanted != made {
                    anyhow::bail!(
                        "maglev.table_size {wanted} differs from the {made} the maps were made \
                         with: it sizes the ring map, so it changes only when lbd starts on new \
                         maps (stop lbd, `lbd --cleanup`, start it)"
                    );
                }
                self.config_services = file.services;
                self.etcd_backends = file.etcd_backends;
                self.etcd_sets.send_if_modified(|sets| {
                    let now = sets_of(&self.etcd_backends);
                    std::mem::replace(sets, now.clone()) != now
                });
                if let Some(e) = failures::config_error(&self.converge()) {
                    anyhow::bail!(e);
                }
                self.reconciler.set_conntrack(&file.conntrack)?;
                let conntrack_changed = self.conntrack != file.conntrack;
                self.conntrack = file.conntrack;
                summary =
                    crate::reload::summary(&previous, &self.config_services, conntrack_changed);
                self.labels.send_if_modified(|policy| {
                    let now = opts.labels.union(&file.labels);
                    std::mem::replace(policy, now.clone()) != now
                });
                Ok(())
            });
        match result {
            Ok(()) => {
                log::info!("reloaded {}: {summary}", path.display());
                self.config_status.last_error = None;
                Ok(format!("reloaded {}: {summary}", path.display()))
            }
            Err(e) => {
                log::error!("reload rejected, keeping the previous state: {e:#}");
                self.config_status.last_error = Some(format!("{e:#}"));
                self.config_services = previous;
                self.etcd_backends = previous_sets;
                self.etcd_sets.send_if_modified(|sets| {
                    let now = sets_of(&self.etcd_backends);
                    std::mem::replace(sets, now.clone()) != now
                });
                if let Some(e) = failures::config_error(&self.converge()) {
                    log::error!("restoring the previous state: {e}");
                }
                Err(format!(
                    "reload rejected, the previous state keeps serving: {e:#}"
                ))
            }
        }
    }

    fn docker_update(&mut self, update: Update) {
        let registering = self.registering();
        let Some(status) = self.docker_status.as_mut() else {
            return;
        };
        match update {
            Update::Connected { version } => {
                status.connected = true;
                status.api_version = Some(version);
                status.last_error = None;
            }
            Update::Disconnected { reason } => {
                status.connected = false;
                status.last_error = Some(reason);
            }
            Update::Snapshot(snapshot) => {
                status.resyncs += 1;
                status.swarm = Some(snapshot.swarm_role.clone());
                match &snapshot.sbox {
                    Some(path) => {
                        if let Err(e) = self.datapath.attach_netns("ingress_sbox", path) {
                            log::error!("attaching in {}: {e:#}", path.display());
                        }
                    }
                    None => self.datapath.forget_netns("ingress_sbox"),
                }
                status.rejected = snapshot
                    .rejected
                    .iter()
                    .map(|r| format!("{}: {}", r.container, r.reason))
                    .collect();
                self.backend_nodes = snapshot.nodes;
                let (local_labels, services): (Vec<_>, Vec<_>) = snapshot
                    .services
                    .into_iter()
                    .partition(|s| registering && s.source == labels::SOURCE);
                let mut changed = self.docker_services != services
                    || self.docker_members != snapshot.members
                    || self.local_labels != local_labels;
                self.docker_services = services;
                self.local_labels = local_labels;
                self.docker_members = snapshot.members;
                if registering {
                    let now = Some(snapshot.registrations);
                    self.registrations
                        .send_if_modified(|r| std::mem::replace(r, now.clone()) != now);
                }
                if std::mem::take(&mut self.awaiting_docker) && !self.awaiting() {
                    self.reconciler.release_adopted();
                    changed = true;
                }
                if !changed {
                    return;
                }
                // Failures are logged and listed in Docker's status.
                if self.converge().iter().any(failures::from_docker) {
                    return;
                }
                if let Some((t, what)) = &snapshot.cause {
                    if let Ok(latency) = SystemTime::now().duration_since(*t) {
                        if self.latencies.len() == LATENCY_SAMPLES {
                            self.latencies.pop_front();
                        }
                        self.latencies.push_back(latency);
                        log::debug!(
                            "docker change applied {:.1} ms after its event ({})",
                            latency.as_secs_f64() * 1e3,
                            what
                        );
                    }
                }
            }
        }
    }

    /// Whether a source has yet to deliver its first state.
    fn awaiting(&self) -> bool {
        self.awaiting_docker || self.awaiting_etcd
    }

    fn registering(&self) -> bool {
        self.register
    }

    fn etcd_update(&mut self, update: crate::sources::etcd::Update) {
        use crate::sources::etcd::Update as U;
        let Some(status) = self.etcd_status.as_mut() else {
            return;
        };
        match update {
            U::Connected => {
                status.connected = true;
                status.last_error = None;
            }
            U::Disconnected { reason } => {
                status.connected = false;
                status.last_error = Some(reason);
            }
            U::State {
                parsed,
                revision,
                full,
                received,
            } => {
                let revision = u64::try_from(revision).unwrap_or(0);
                status.revision = revision;
                status.resyncs += u64::from(full);
                for r in parsed
                    .rejected
                    .iter()
                    .filter(|r| !status.rejected.contains(r))
                {
                    log::warn!("etcd key refused: {r}");
                }
                status.rejected = parsed.rejected.clone();
                let mut changed = self.etcd != parsed;
                self.etcd = parsed;
                if std::mem::take(&mut self.awaiting_etcd) && !self.awaiting() {
                    self.reconciler.release_adopted();
                    changed = true;
                }
                if changed
                    && self
                        .converge()
                        .iter()
                        .any(|f| f.source == etcd_layout::SOURCE)
                {
                    return;
                }
                let latency = received.elapsed();
                if let Some(status) = self.etcd_status.as_mut() {
                    status.applied_revision = revision;
                    status.applied_at_us = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_micros() as u64);
                }
                if changed {
                    log::debug!(
                        "etcd revision {revision} applied {:.1} ms after its watch response",
                        latency.as_secs_f64() * 1e3
                    );
                }
            }
        }
    }

    fn registered(&mut self, report: crate::sources::registrator::Report) {
        if let Some(status) = self.etcd_status.as_mut() {
            status.lease = report.lease.map(|l| l as u64);
            status.registered = report.registered;
            status.register_error = report.last_error;
        }
    }

    /// The config file's services, those with `etcd_backends` given the
    /// backends etcd holds under their prefix (of their address family).
    fn config_with_etcd_backends(&self) -> Vec<ServiceSpec> {
        let mut services = self.config_services.clone();
        for s in &mut services {
            let Some(prefix) = self.etcd_backends.get(&s.name) else {
                continue;
            };
            let from_etcd = self
                .etcd
                .sets
                .get(prefix)
                .map(Vec::as_slice)
                .unwrap_or_default();
            s.backends = from_etcd
                .iter()
                .filter(|b| b.addr.is_ipv4() == s.frontend.addr.is_ipv4())
                .copied()
                .collect();
        }
        services
    }

    fn sync_links(&mut self, links: &Links, opts: &Options) {
        let (wanted, xdp) = (&opts.interfaces, &opts.xdp);
        let eligible = &links.eligible;
        for name in self.datapath.attached_here() {
            if !eligible.values().any(|n| *n == name) {
                log::info!("{name} is gone");
                self.datapath.forget(&name);
            }
        }
        for name in eligible.values() {
            match self.datapath.attach(name) {
                Ok(()) => {}
                // An interface listed with --iface must work; others (a veth
                // that vanished meanwhile) are retried on the next link event.
                Err(e) if wanted.contains(name) => log::error!("{e:#}"),
                Err(e) => log::warn!("{e:#}"),
            }
        }
        let attached = self.datapath.attached_here();
        for name in xdp {
            if !eligible.values().any(|n| n == name) {
                continue;
            }
            if !attached.contains(name) {
                log::error!("XDP on {name}: the TC program is not attached there (see --iface)");
            } else if let Err(e) = self.datapath.attach_xdp(name) {
                log::error!("{e:#}");
            }
        }
        if opts.redirect_peer {
            if let Err(e) = self.datapath.set_peer_ports(&links.peer_ports) {
                log::error!("listing the veths of local containers: {e:#}");
            }
        }
    }

    fn convergence(&self) -> Option<Convergence> {
        if self.latencies.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = self
            .latencies
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
        Some(Convergence {
            samples: ms.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: ms[ms.len() - 1],
        })
    }

    fn health(&mut self, t: Transition) {
        let key = (t.frontend, t.backend);
        if t.up {
            log::info!("backend {} of {} is up again", t.backend, t.frontend);
            self.down.remove(&key);
        } else {
            log::warn!(
                "backend {} of {} is down: {}",
                t.backend,
                t.frontend,
                t.detail
            );
            self.down.insert(key, t.detail);
        }
        // Failures are logged and shown in status.
        self.converge();
    }

    /// `lbctl drain` / `undrain`: checks that the backend exists, records
    /// the override and converges.
    fn drain(&mut self, service: &str, backend: &str, drain: bool) -> Response {
        let applied = self.reconciler.applied().map(|a| &a.spec);
        let (key, name) = match crate::overrides::find(applied, service, backend) {
            Ok(found) => found,
            Err(e) => return Response::Error(e),
        };
        let changed = self.overrides.drain(key, drain);
        if changed {
            if let Err(e) = crate::drains::save(&self.pin_dir, self.overrides.drained()) {
                // Unrecorded, a drain would not survive a restart: undo it.
                self.overrides.drain(key, !drain);
                return Response::Error(format!("recording the drain: {e:#}"));
            }
        }
        let verb = if drain { "draining" } else { "undrained" };
        let note = if changed { "" } else { " (no change)" };
        self.done(format!("{verb} {} of {name}{note}", key.1))
    }

    /// `lbctl weight`: records the override (None clears it) and converges.
    fn weight(&mut self, service: &str, backend: &str, weight: Option<u32>) -> Response {
        if weight.is_some_and(|w| w > config::MAX_WEIGHT) {
            return Response::Error(format!("weights go from 0 to {}", config::MAX_WEIGHT));
        }
        let applied = self.reconciler.applied().map(|a| &a.spec);
        let (key, name) = match crate::overrides::find(applied, service, backend) {
            Ok(found) => found,
            Err(e) => return Response::Error(e),
        };
        self.overrides.set_weight(key, weight);
        self.done(match weight {
            Some(w) => format!("weight of {} in {name} set to {w}", key.1),
            None => format!("weight of {} in {name} back to its source's", key.1),
        })
    }

    /// Converges after an lbctl change and answers with `what` or the error.
    fn done(&mut self, what: String) -> Response {
        let failures = self.converge();
        if !failures.is_empty() {
            let all: Vec<String> = failures.iter().map(|f| f.to_string()).collect();
            return Response::Error(all.join("; "));
        }
        log::info!("{what}");
        Response::Done(what)
    }

    fn answer(&mut self, request: Request, opts: &Options) -> Response {
        match request {
            Request::Drain { service, backend } => self.drain(&service, &backend, true),
            Request::Undrain { service, backend } => self.drain(&service, &backend, false),
            Request::Weight {
                service,
                backend,
                weight,
            } => self.weight(&service, &backend, weight),
            Request::Status => self.status(),
            Request::Version => Response::Version(crate::version::info()),
            Request::Reload => match self.reload(opts) {
                Ok(summary) => Response::Done(summary),
                Err(e) => Response::Error(e),
            },
            Request::ConntrackList { service, limit } => {
                match crate::conntrack::list(&self.reconciler, service.as_deref(), limit) {
                    Ok(list) => Response::Connections(list),
                    Err(e) => Response::Error(e),
                }
            }
            Request::ConntrackFlush { service: which } => {
                match crate::conntrack::flush(&mut self.reconciler, which.as_deref()) {
                    Ok(n) => Response::Done(format!(
                        "flushed {n} connections{}",
                        which.map(|s| format!(" of {s}")).unwrap_or_default()
                    )),
                    Err(e) => Response::Error(e),
                }
            }
        }
    }

    fn status(&self) -> Response {
        // The latest census, however old: a walk is never waited for.
        let snapshot = self.census.latest();
        self.census.ask();
        let empty = status::Census::default();
        let census = snapshot.as_ref().map_or(&empty, |s| &s.census);
        match status::collect(&self.reconciler, census, &|s, b| {
            let key = (s.frontend, b.socket_addr());
            let state = if let Some(why) = self.down.get(&key) {
                format!("down ({why})")
            } else if b.weight == 0 {
                "draining".to_string()
            } else {
                "active".to_string()
            };
            let node = self.backend_nodes.get(&b.addr).cloned();
            (state, node, self.overrides.weight(&key))
        }) {
            Ok(collected) => Response::Status(Box::new(Status {
                services: collected.services,
                swarm: collected.swarm,
                interfaces: self.datapath.attached(),
                tc_attach: self.datapath.tc_attach().name().to_string(),
                xdp: self.datapath.xdp_attached(),
                peer_ports: self.datapath.peer_ports(),
                config: self.config_status.clone(),
                docker: self.docker_status.clone(),
                etcd: self.etcd_status.clone(),
                conflicts: self.conflicts.clone(),
                failing: self.failing.clone(),
                convergence: self.convergence(),
                reconcile: self.reconcile.clone(),
                conntrack_entries: census.entries,
                conntrack_capacity: u64::from(self.reconciler.maps().limits.max_flows),
                conntrack: self
                    .reconciler
                    .datapath_config()
                    .map(|cfg| {
                        status::conntrack_status(
                            &cfg,
                            snapshot.as_deref(),
                            self.census.gc_removed(),
                        )
                    })
                    .unwrap_or_default(),
                datapath: status::datapath_counters(&self.reconciler),
                tasks: self.tasks.snapshot(),
            })),
            Err(e) => Response::Error(format!("{e:#}")),
        }
    }
}
