//! The Docker Engine as a source: event-driven, with a periodic resync as a
//! safety net. If the engine goes away, the last state it gave keeps
//! serving; the source reconnects with backoff and resyncs.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use bollard::Docker;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::model::{Member, ServiceSpec};
use crate::sources::backoff::Backoff;
use crate::sources::engine::Engine;
use crate::sources::label_frontends::Gate;
use crate::sources::labels::{self, Rejected};
use crate::sources::local_tasks;
use crate::sources::netns_dir::NetnsDir;
use crate::sources::registrator::Registration;
use crate::sources::service_vips::{self, Sandboxes};
use crate::sources::swarm;

/// How often everything is listed again even without events.
const RESYNC: Duration = Duration::from_secs(30);
/// Events that arrive together cause one resync.
const DEBOUNCE: Duration = Duration::from_millis(5);

/// What the source knows; sent whole after every change.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Services of labelled containers and of Swarm, together.
    pub services: Vec<ServiceSpec>,
    pub swarm_role: String,
    /// The `ingress_sbox` namespace the datapath must also be attached in.
    pub sbox: Option<std::path::PathBuf>,
    /// Network namespaces of this node's containers on Swarm's overlay
    /// networks: who may use each network's service VIPs.
    pub members: BTreeSet<Member>,
    /// Backend address -> the node it runs on (containers: this engine).
    pub nodes: std::collections::BTreeMap<std::net::IpAddr, String>,
    pub rejected: Vec<Rejected>,
    /// With `lbd --register`: this node's labelled containers as etcd is
    /// to list them (registrator.rs).
    pub registrations: Vec<Registration>,
    /// The event that caused this snapshot, if one did: when it happened,
    /// and what it was ("type action name", for the log).
    pub cause: Option<(SystemTime, String)>,
}

#[derive(Clone, Debug)]
pub enum Update {
    Connected {
        version: String,
    },
    Snapshot(Snapshot),
    /// The engine is unreachable; the last snapshot stays in force.
    Disconnected {
        reason: String,
    },
}

pub use lb_api::status::DockerStatus;

/// The engine's default `--exec-root`; its network namespaces are in
/// `<exec-root>/netns`.
pub const DEFAULT_EXEC_ROOT: &str = "/var/run/docker";

/// How often the Swarm view is read again: a worker gets no event when a
/// task starts or stops on another node.
const SWARM_POLL: Duration = Duration::from_secs(1);
/// After an event whose change Swarm's view does not show yet (its view of
/// a new task lags the container's start by 60 to 140 ms here), the view is
/// read again this often, for at most FOLLOW_UP_FOR, instead of waiting for
/// the next SWARM_POLL. A change that shows later is not put down to the
/// event: an event that changed nothing (its change was already applied,
/// say a container's network membership at its "connect") must not be
/// charged with the next, unrelated one.
const FOLLOW_UP: Duration = Duration::from_millis(25);
const FOLLOW_UP_FOR: Duration = Duration::from_millis(500);

/// `exec_root`: the engine's `--exec-root` when given (`--docker-exec-root`);
/// otherwise it is found (see netns_dir.rs). `register`: this node's
/// address on the network between hosts, with `lbd --register`.
pub async fn watch(
    host: Engine,
    exec_root: Option<std::path::PathBuf>,
    register: Option<std::net::IpAddr>,
    mut gate: Gate,
    tx: mpsc::Sender<Update>,
) {
    let mut backoff = Backoff::default();
    let mut down = false;
    // Refusals already logged: each is said once, not at every resync.
    let mut logged = Vec::new();
    loop {
        let mut connected = false;
        let mut netns = NetnsDir::new(exec_root.clone(), &host.to_string());
        let Err(e) = session(
            &host,
            register,
            &mut netns,
            &mut gate,
            &mut logged,
            &tx,
            &mut connected,
        )
        .await
        else {
            return; // the daemon is stopping
        };
        if connected {
            backoff.reset();
            down = false;
        }
        // Said once per outage, not once per retry.
        if !down {
            down = true;
            log::warn!("docker engine at {host}: {e:#}; keeping the last known state, retrying");
            let reason = format!("{e:#}");
            if tx.send(Update::Disconnected { reason }).await.is_err() {
                return;
            }
        }
        backoff.wait().await;
        if tx.is_closed() {
            return;
        }
    }
}

/// One connection to the engine, until it fails. Returns Ok only when the
/// receiver is gone.
async fn session(
    host: &Engine,
    register: Option<std::net::IpAddr>,
    netns: &mut NetnsDir,
    gate: &mut Gate,
    logged: &mut Vec<Rejected>,
    tx: &mpsc::Sender<Update>,
    connected: &mut bool,
) -> Result<()> {
    let mut sandboxes = Sandboxes::default();
    let docker = host
        .connect()?
        .negotiate_version()
        .await
        .context("negotiating the API version")?;
    let version = docker
        .version()
        .await
        .context("asking the engine's version")?;
    let api = version.api_version.unwrap_or_default();
    // Subscribe before listing, so that nothing that happens in between is missed.
    let filters = HashMap::from([(
        "type".to_string(),
        vec![
            "container".to_string(),
            "service".to_string(),
            "network".to_string(),
        ],
    )]);
    let mut events = docker.events(Some(EventsOptions {
        filters: Some(filters),
        ..Default::default()
    }));
    log::info!("connected to the docker engine at {host} (API {api})");
    // Containers that died and have not started again. The engine lists a
    // container as running until its cleanup is done (network teardown
    // included), some 150 ms after its `die`; it takes no connection
    // meanwhile, so it is left out from its `die` on.
    let mut dead: HashSet<String> = HashSet::new();
    let first = sync(&docker, register, netns, &mut sandboxes, gate, &mut dead).await?;
    log_refusals(&first.rejected, logged);
    let first_in_swarm = first.swarm_role != "inactive";
    let mut last = compared(&first);
    *connected = true;
    if tx.send(Update::Connected { version: api }).await.is_err()
        || tx.send(Update::Snapshot(first)).await.is_err()
    {
        return Ok(());
    }
    let mut resync = tokio::time::interval(RESYNC);
    resync.reset();
    let mut swarm_poll = tokio::time::interval(SWARM_POLL);
    swarm_poll.reset();
    let mut in_swarm = first_in_swarm;
    // The event a change is attributed to: the latest one before it. Swarm's
    // view of a new task lags the container's event, so the change may only
    // show at a later poll; it still counts from the event.
    let mut pending: Option<(SystemTime, String)> = None;
    loop {
        let cause = tokio::select! {
            event = events.next() => match event {
                Some(Ok(e)) if relevant(&e) => {
                    note_death(&mut dead, &e);
                    origin(&e)
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e).context("the event stream failed"),
                None => anyhow::bail!("the event stream ended"),
            },
            _ = resync.tick() => None,
            _ = swarm_poll.tick(), if in_swarm => None,
            _ = tokio::time::sleep(FOLLOW_UP), if in_swarm && follow_up(pending.as_ref()) => None,
            // The operator allowed other frontends (a config reload).
            changed = gate.policy.changed() => {
                if changed.is_err() {
                    return Ok(()); // the daemon is stopping
                }
                None
            }
        };
        // Let a burst of events (a scale-up starts many containers) settle.
        let settle = tokio::time::sleep(DEBOUNCE);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => break,
                more = events.next() => match more {
                    Some(Ok(e)) => {
                        note_death(&mut dead, &e);
                        continue;
                    }
                    Some(Err(e)) => return Err(e).context("the event stream failed"),
                    None => anyhow::bail!("the event stream ended"),
                },
            }
        }
        if cause.is_some() {
            pending = cause;
        }
        if !follow_up(pending.as_ref()) {
            pending = None;
        }
        let mut snapshot = sync(&docker, register, netns, &mut sandboxes, gate, &mut dead).await?;
        log_refusals(&snapshot.rejected, logged);
        in_swarm = snapshot.swarm_role != "inactive";
        let now = compared(&snapshot);
        if now == last {
            continue;
        }
        log::debug!(
            "docker change: services {} -> {}, members {} -> {}",
            last.0.len(),
            now.0.len(),
            last.2.len(),
            now.2.len()
        );
        last = now;
        snapshot.cause = pending.take();
        if tx.send(Update::Snapshot(snapshot)).await.is_err() {
            return Ok(());
        }
    }
}

/// What a snapshot is compared by, to send only changes.
fn compared(
    s: &Snapshot,
) -> (
    Vec<ServiceSpec>,
    Vec<Rejected>,
    BTreeSet<Member>,
    Vec<Registration>,
) {
    (
        s.services.clone(),
        s.rejected.clone(),
        s.members.clone(),
        s.registrations.clone(),
    )
}

/// Records a container's `die`, and forgets it at its next `start`.
fn note_death(dead: &mut HashSet<String>, e: &bollard::models::EventMessage) {
    use bollard::models::EventMessageTypeEnum::CONTAINER;
    let Some(id) = e.actor.as_ref().and_then(|a| a.id.as_ref()) else {
        return;
    };
    match (e.typ, e.action.as_deref()) {
        (Some(CONTAINER), Some("die")) => {
            dead.insert(id.clone());
        }
        (Some(CONTAINER), Some("start")) => {
            dead.remove(id);
        }
        _ => {}
    }
}

/// Whether an event is still waiting, recently enough, for its change.
fn follow_up(pending: Option<&(SystemTime, String)>) -> bool {
    pending.is_some_and(|(t, _)| t.elapsed().unwrap_or_default() < FOLLOW_UP_FOR)
}

/// The event a change is timed from. A service's "update" (a scale, say), a
/// container's "kill" and a network's events other than "disconnect" only
/// cause a resync: the tasks they announce are balanced from their
/// container's "start" (Swarm lists a task in its view only then), and
/// timing from the earlier event would charge lbd with Swarm's scheduling
/// and the container's start-up.
fn origin(e: &bollard::models::EventMessage) -> Option<(SystemTime, String)> {
    use bollard::models::EventMessageTypeEnum::{CONTAINER, NETWORK, SERVICE};
    let early = match (e.typ, e.action.as_deref()) {
        (Some(SERVICE), Some("update")) => true,
        // The signal, not the death: that is "die".
        (Some(CONTAINER), Some("kill")) => true,
        (Some(NETWORK), action) => action != Some("disconnect"),
        _ => false,
    };
    (!early).then(|| (event_time(e), describe(e)))
}

fn describe(e: &bollard::models::EventMessage) -> String {
    let kind = e.typ.map(|t| t.to_string()).unwrap_or_default();
    let action = e.action.as_deref().unwrap_or("");
    let name = e
        .actor
        .as_ref()
        .and_then(|a| a.attributes.as_ref())
        .and_then(|a| a.get("name"))
        .map_or("", String::as_str);
    format!("{kind} {action} {name}")
}

/// Logs the refusals that were not in force at the last resync.
fn log_refusals(rejected: &[Rejected], logged: &mut Vec<Rejected>) {
    for r in rejected.iter().filter(|r| !logged.contains(r)) {
        log::warn!("container {} refused: {}", r.container, r.reason);
    }
    *logged = rejected.to_vec();
}

fn relevant(e: &bollard::models::EventMessage) -> bool {
    let action = e.action.as_deref().unwrap_or("");
    // health_status arrives as "health_status: healthy". A container's
    // "create" is not one: nothing of it can be balanced before its "start",
    // and counting from it would charge lbd with the engine's start-up.
    matches!(
        action,
        "start"
            | "die"
            | "stop"
            | "kill"
            | "pause"
            | "unpause"
            | "destroy"
            | "update"
            | "remove"
            | "connect"
            | "disconnect"
    ) || action.starts_with("health_status")
}

fn event_time(e: &bollard::models::EventMessage) -> SystemTime {
    match e.time_nano {
        Some(ns) if ns > 0 => SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64),
        _ => SystemTime::now(),
    }
}

/// Lists everything the load balancer cares about.
async fn sync(
    docker: &Docker,
    register: Option<std::net::IpAddr>,
    netns: &mut NetnsDir,
    sandboxes: &mut Sandboxes,
    gate: &Gate,
    dead: &mut HashSet<String>,
) -> Result<Snapshot> {
    let filters = HashMap::from([
        ("label".to_string(), vec![labels::FRONTEND.to_string()]),
        ("status".to_string(), vec!["running".to_string()]),
    ]);
    let labelled = async {
        docker
            .list_containers(Some(ListContainersOptions {
                all: false,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .context("listing containers")
    };
    // Together: a resync's time is mostly waiting for the engine.
    let (mut containers, local) = tokio::try_join!(labelled, local_tasks::list(docker))?;
    // A dead container no longer listed needs no more remembering.
    dead.retain(|id| containers.iter().any(|c| c.id.as_ref() == Some(id)));
    containers.retain(|c| c.id.as_ref().is_none_or(|id| !dead.contains(id)));
    let screen = gate.screen();
    let (mut services, mut rejected) = labels::services(&containers, &screen);
    let registrations = match register {
        Some(node) => {
            let (registrations, refused) = labels::registrations(&containers, &screen, node);
            rejected.extend(refused);
            registrations
        }
        None => Vec::new(),
    };
    let netns_dir = netns.get(docker).await;
    // The networks' views before the list of services (in swarm::view): a
    // service they show was created before the list was made, so one the
    // list lacks is really being removed.
    let vips = service_vips::view(docker, sandboxes, &local).await?;
    let swarm = swarm::view(docker, &netns_dir, &local).await?;
    let mut nodes = swarm.nodes;
    for b in services.iter().flat_map(|s| &s.backends) {
        nodes.insert(b.addr, swarm.engine.clone());
    }
    nodes.extend(vips.nodes);
    let mut swarm_services = swarm.services;
    swarm_services.extend(vips.services);
    swarm::apply_settings(&mut swarm_services, &swarm.settings);
    rejected.extend(swarm.rejected);
    if let Some(live) = &swarm.live {
        swarm::drain_removed(&mut swarm_services, live);
    }
    services.extend(swarm_services);
    Ok(Snapshot {
        members: vips.members,
        services,
        rejected,
        registrations,
        swarm_role: swarm.role,
        sbox: swarm.sbox,
        nodes,
        cause: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event as the engine sends it (API 1.41), reduced to what matters.
    fn event(kind: &str, action: &str, id: &str) -> bollard::models::EventMessage {
        serde_json::from_value(serde_json::json!({
            "Type": kind, "Action": action, "Actor": {"ID": id, "Attributes": {}},
            "timeNano": 1_700_000_000_000_000_000_i64
        }))
        .unwrap()
    }

    #[test]
    fn a_container_is_dead_from_its_die_to_its_next_start() {
        let mut dead = HashSet::new();
        note_death(&mut dead, &event("container", "die", "c1"));
        note_death(&mut dead, &event("network", "die", "n1"));
        assert_eq!(dead, HashSet::from(["c1".to_string()]));
        // A restart policy brings it back under the same id.
        note_death(&mut dead, &event("container", "start", "c1"));
        assert!(dead.is_empty());
    }
}
