//! `lbrouter --docker`: routes from the labels of running containers and of
//! Swarm services (labels.rs), sent whole after every change. Swarm
//! services are routed to their tasks directly, found in their overlay
//! networks' views as lbd finds them (sources/service_vips.rs,
//! sources/local_tasks.rs), so balancing and stickiness are the router's,
//! not the VIP's. If the engine goes away, the last routes keep serving;
//! the watch reconnects with lbd's backoff and lists everything again.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context as _, Result};
use bollard::models::LocalNodeState;
use bollard::query_parameters::{
    EventsOptions, InspectNetworkOptions, ListContainersOptions, ListServicesOptions,
};
use bollard::Docker;
use futures::StreamExt;
use tokio::sync::watch;

use super::api::Told;
use super::config::RouteSpec;
use super::labels::{self, Labelled, Skipped};
use crate::sources::backoff::Backoff;
use crate::sources::engine::Engine;
use crate::sources::{local_tasks, service_vips};

/// How often everything is listed again without an event: a task shows in
/// its network's view a little after its container's start.
const POLL: Duration = Duration::from_secs(1);
/// Events that arrive together cause one listing.
const DEBOUNCE: Duration = Duration::from_millis(5);

/// What discovery found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    pub routes: Vec<RouteSpec>,
    pub skipped: Vec<Skipped>,
    /// The engine is a Swarm worker's, which cannot list services: no
    /// Swarm service is routed here, by labels or through the API.
    pub swarm_worker: bool,
}

/// Why a worker routes no Swarm service.
pub const ON_A_WORKER: &str = "this node is a Swarm worker, whose engine does not list \
                               services: Swarm services are routed by an lbrouter on a manager";

/// Watches `engine` until `tx` has no receiver left. `told` holds labels
/// set through the API (api.rs), laid over the services' own.
pub async fn watch(engine: Engine, tx: watch::Sender<Found>, mut told: watch::Receiver<Told>) {
    let mut backoff = Backoff::default();
    let mut down = false;
    loop {
        let mut connected = false;
        let e = match session(&engine, &tx, &mut told, &mut connected).await {
            Ok(()) => return,
            Err(e) => e,
        };
        if connected {
            backoff.reset();
            down = false;
        }
        if !down {
            down = true;
            log::warn!("docker engine at {engine}: {e:#}; keeping the discovered routes, retrying");
        }
        backoff.wait().await;
        if tx.is_closed() {
            return;
        }
    }
}

/// One connection to the engine, until it fails; Ok when nobody listens.
async fn session(
    engine: &Engine,
    tx: &watch::Sender<Found>,
    told: &mut watch::Receiver<Told>,
    connected: &mut bool,
) -> Result<()> {
    let docker = engine
        .connect()?
        .negotiate_version()
        .await
        .context("negotiating the API version")?;
    // Subscribe before listing, so that nothing in between is missed.
    let filters = HashMap::from([(
        "type".to_string(),
        vec!["container".to_string(), "service".to_string()],
    )]);
    let mut events = docker.events(Some(EventsOptions {
        filters: Some(filters),
        ..Default::default()
    }));
    let mut logged = Vec::new();
    let labels = told.borrow_and_update().clone();
    let found = list(&docker, &labels).await?;
    log::info!(
        "connected to the docker engine at {engine}: {} routes discovered",
        found.routes.len()
    );
    *connected = true;
    log_skipped(&found.skipped, &mut logged);
    tx.send_replace(found);
    let mut poll = tokio::time::interval(POLL);
    poll.reset();
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("the event stream failed"),
                None => anyhow::bail!("the event stream ended"),
            },
            _ = poll.tick() => {}
            Ok(()) = told.changed() => {}
            _ = tx.closed() => return Ok(()),
        }
        tokio::time::sleep(DEBOUNCE).await;
        let labels = told.borrow_and_update().clone();
        let found = list(&docker, &labels).await?;
        log_skipped(&found.skipped, &mut logged);
        tx.send_if_modified(|now| {
            if *now == found {
                return false;
            }
            log::info!("docker: {} routes discovered", found.routes.len());
            *now = found;
            true
        });
    }
}

/// Says each reason once, not at every listing.
fn log_skipped(skipped: &[Skipped], logged: &mut Vec<Skipped>) {
    for s in skipped.iter().filter(|s| !logged.contains(s)) {
        log::warn!("{} skipped: {}", s.who, s.reason);
    }
    *logged = skipped.to_vec();
}

/// Lists the labelled containers and services and makes their routes.
async fn list(docker: &Docker, told: &Told) -> Result<Found> {
    let filters = HashMap::from([("status".to_string(), vec!["running".to_string()])]);
    let containers = docker
        .list_containers(Some(ListContainersOptions {
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .context("listing containers")?;
    let mut items = Vec::new();
    for c in &containers {
        let labels = c.labels.clone().unwrap_or_default();
        if !labels::wanted(&labels) {
            continue;
        }
        let name = c
            .names
            .iter()
            .flatten()
            .next()
            .map(|n| n.trim_start_matches('/').to_string())
            .or_else(|| c.id.clone())
            .unwrap_or_default();
        let networks = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|(net, s)| {
                let ip: IpAddr = s.ip_address.as_deref()?.parse().ok()?;
                Some((net.clone(), vec![ip]))
            })
            .collect();
        items.push(Labelled {
            kind: "container",
            name,
            labels,
            networks,
        });
    }
    let (services, swarm_worker) = services(docker, told).await?;
    items.extend(services);
    let (routes, mut skipped) = labels::all(&items);
    if swarm_worker {
        skipped.push(Skipped {
            who: "Swarm services".into(),
            reason: ON_A_WORKER.into(),
        });
    }
    Ok(Found {
        routes,
        skipped,
        swarm_worker,
    })
}

/// The labelled Swarm services, with their tasks' addresses on each of
/// their networks but ingress, and the labels `told` gives them over their
/// own; and whether the engine is a Swarm worker's (only a manager lists
/// services).
async fn services(docker: &Docker, told: &Told) -> Result<(Vec<Labelled>, bool)> {
    let info = docker.info().await.context("asking the Swarm state")?;
    let swarm = info.swarm.unwrap_or_default();
    if swarm.local_node_state != Some(LocalNodeState::ACTIVE) {
        return Ok((Vec::new(), false));
    }
    if swarm.control_available != Some(true) {
        return Ok((Vec::new(), true));
    }
    let services = docker
        .list_services(None::<ListServicesOptions>)
        .await
        .context("listing Swarm services")?;
    let local = local_tasks::list(docker).await?;
    let mut views: HashMap<String, Option<bollard::models::NetworkInspect>> = HashMap::new();
    let mut out = Vec::new();
    for s in services {
        let Some(spec) = s.spec else { continue };
        let Some(name) = spec.name.clone() else {
            continue;
        };
        let mut labels = spec.labels.clone().unwrap_or_default();
        if let Some(set) = told.get(&name) {
            labels.extend(set.clone());
        }
        if !labels::wanted(&labels) {
            continue;
        }
        let targets: Vec<String> = spec
            .task_template
            .as_ref()
            .and_then(|t| t.networks.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|n| n.target.clone())
            .collect();
        let mut networks = BTreeMap::new();
        for target in targets {
            if !views.contains_key(&target) {
                let opts = InspectNetworkOptions {
                    verbose: true,
                    scope: Some("swarm".into()),
                };
                let view = match docker.inspect_network(&target, Some(opts)).await {
                    Ok(mut net) => {
                        local_tasks::add_to(&mut net, &local);
                        Some(net)
                    }
                    Err(e) => {
                        log::debug!("network {target} of service {name}: {e}");
                        None
                    }
                };
                views.insert(target.clone(), view);
            }
            let Some(Some(net)) = views.get(&target) else {
                continue;
            };
            if net.ingress == Some(true) {
                continue;
            }
            let mut addrs: Vec<IpAddr> = service_vips::service_infos(net)
                .get(&name)
                .and_then(|i| i.tasks.clone())
                .into_iter()
                .flatten()
                .filter_map(|t| t.endpoint_ip?.parse().ok())
                .collect();
            addrs.sort();
            addrs.dedup();
            let net_name = net.name.clone().unwrap_or(target);
            networks.insert(net_name, addrs);
        }
        out.push(Labelled {
            kind: "service",
            name,
            labels,
            networks,
        });
    }
    Ok((out, false))
}
