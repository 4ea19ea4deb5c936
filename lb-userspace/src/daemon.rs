//! The daemon's event loop. It owns the datapath and the reconciler and is
//! therefore the only place where maps are written; every other task sends
//! it events.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::config;
use crate::control::{self, Call, Request, Response};
use crate::datapath::{Datapath, Limits};
use crate::interfaces::{self, Links};
use crate::model::DesiredState;
use crate::reconciler::Reconciler;
use crate::status::{self, ConfigStatus, Status};

pub struct Options {
    pub config: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub interfaces: Vec<String>,
    pub keep_datapath: bool,
    pub limits: Limits,
}

/// How often the config file's modification time is checked. Polling is
/// simpler and more robust than inotify against editors that replace the
/// file, and one stat a second costs nothing.
const CONFIG_POLL: Duration = Duration::from_secs(1);

pub async fn run(opts: Options) -> Result<()> {
    // A config that does not parse at start-up is fatal: there is no earlier
    // good state to keep serving.
    let mut config_status = ConfigStatus {
        path: opts.config.as_ref().map(|p| p.display().to_string()),
        ..Default::default()
    };
    let desired = match &opts.config {
        Some(path) => config::load(path)?,
        None => DesiredState::default(),
    };

    let (mut datapath, maps) = Datapath::load(Some(&opts.pin_dir), opts.limits)?;
    let mut reconciler = Reconciler::new(maps)?;
    let changes = reconciler
        .apply(&desired)
        .context("applying the initial state")?;
    log::info!("applied {} services ({changes:?})", desired.services.len());

    let (links_tx, mut links_rx) = mpsc::channel::<Links>(4);
    let only = opts.interfaces.clone();
    tokio::spawn(async move {
        if let Err(e) = interfaces::watch(only, links_tx).await {
            log::error!("interface watcher stopped: {e:#}");
        }
    });

    let (calls_tx, mut calls_rx) = mpsc::channel::<Call>(16);
    let socket = opts.socket.clone();
    tokio::spawn(async move {
        if let Err(e) = control::serve(&socket, calls_tx).await {
            log::error!("control socket stopped: {e:#}");
        }
    });

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut poll = tokio::time::interval(CONFIG_POLL);
    let mut config_stamp = opts.config.as_ref().and_then(|p| stamp(p));

    loop {
        tokio::select! {
            Some(links) = links_rx.recv() => sync_links(&mut datapath, &links, &opts.interfaces),
            Some((request, reply)) = calls_rx.recv() => {
                let response = answer(request, &reconciler, &datapath, &config_status);
                let _ = reply.send(response);
            }
            _ = hup.recv() => reload(&opts, &mut reconciler, &mut config_status),
            _ = poll.tick() => {
                if let Some(path) = &opts.config {
                    let now = stamp(path);
                    if now != config_stamp {
                        config_stamp = now;
                        reload(&opts, &mut reconciler, &mut config_status);
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    let _ = std::fs::remove_file(&opts.socket);
    if opts.keep_datapath {
        log::info!(
            "exiting; the datapath stays attached from {}",
            opts.pin_dir.display()
        );
        datapath.keep();
    } else {
        log::info!("exiting; detaching and removing {}", opts.pin_dir.display());
        drop(reconciler);
        datapath.shutdown();
    }
    Ok(())
}

/// Modification time and size: either changing means the file changed.
fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn reload(opts: &Options, reconciler: &mut Reconciler, status: &mut ConfigStatus) {
    let Some(path) = &opts.config else { return };
    status.reloads += 1;
    let result = config::load(path)
        .map_err(anyhow::Error::from)
        .and_then(|desired| reconciler.apply(&desired));
    match result {
        Ok(changes) => {
            log::info!("reloaded {}: {changes:?}", path.display());
            status.last_error = None;
        }
        Err(e) => {
            log::error!("reload rejected, keeping the previous state: {e:#}");
            status.last_error = Some(format!("{e:#}"));
        }
    }
}

fn sync_links(datapath: &mut Datapath, links: &Links, wanted: &[String]) {
    for name in datapath.attached() {
        if !links.values().any(|n| *n == name) {
            log::info!("{name} is gone");
            datapath.forget(&name);
        }
    }
    for name in links.values() {
        if let Err(e) = datapath.attach(name) {
            // An interface listed with --iface must work; others (a veth
            // that vanished meanwhile) are logged and retried on the next
            // link event.
            if wanted.contains(name) {
                log::error!("{e:#}");
            } else {
                log::warn!("{e:#}");
            }
        } else {
            log::debug!("attached to {name}");
        }
    }
}

fn answer(
    request: Request,
    reconciler: &Reconciler,
    datapath: &Datapath,
    config: &ConfigStatus,
) -> Response {
    match request {
        Request::Status => match status::collect(reconciler) {
            Ok(services) => Response::Status(Box::new(Status {
                services,
                interfaces: datapath.attached(),
                config: config.clone(),
                datapath: status::datapath_counters(reconciler),
            })),
            Err(e) => Response::Error(format!("{e:#}")),
        },
    }
}
