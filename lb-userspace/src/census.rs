//! Counting tracked connections and deleting expired ones, on a thread of
//! its own.
//!
//! A walk over CONNTRACK with a full table of a million flows takes
//! seconds (aya's iterator, two syscalls per entry), or a good fraction of
//! one read in batches (`map_batch`). Done on the daemon's
//! event loop, as it was, every `lbctl status`, metrics scrape and stats
//! page refresh stopped the control plane that long. Here one worker,
//! with handles of its own on the maps (opened again by id, so it works
//! with or without pins), walks both tables at most once per
//! `MIN_INTERVAL` and at least once per `PERIOD`, deleting expired entries
//! on the way (the garbage collection that ran on the loop too), and
//! publishes a snapshot. A request takes the latest snapshot, never waits,
//! shows its age, and asks for a fresher one; however many requests come,
//! the work stays one walk per `MIN_INTERVAL`, and the worker rests at
//! least `REST_FACTOR` times as long as its last walk took, so that it
//! never takes more than a fifth of a core on a full table.
//!
//! Not chosen: a walk per request on a blocking task (the work grows with
//! the request rate), and counters kept by the datapath (LRU evictions are
//! silent, so a count of live entries would drift).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use aya::maps::{Array, HashMap, IterableMap, Map, MapData};
use lb_common::{Config, CtEntry, FlowKey};

use crate::conntrack;
use crate::datapath::Maps;
use crate::status::Census;

/// The longest a census gets old while nobody asks; also how often
/// expired entries are deleted (they are ignored by the datapath anyway;
/// deleting them only frees their slots).
pub const PERIOD: Duration = Duration::from_secs(5);
/// The shortest time between two walks, however often status is asked.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// A flow counts as active while it saw a packet this recently.
const ACTIVE_FLOW_AGE: Duration = Duration::from_secs(60);
/// Rest between walks, relative to the last walk's duration.
const REST_FACTOR: u32 = 4;
/// How many entries a walk reads between checks for lbd stopping.
const STOP_CHECK_EVERY: u64 = 4096;

/// One census and when it was taken.
pub struct Snapshot {
    pub census: Census,
    pub taken: Instant,
    /// How long the walk took.
    pub walk: Duration,
}

#[derive(Default)]
struct Wake {
    asked: bool,
    stop: bool,
}

struct Shared {
    latest: Mutex<Option<Arc<Snapshot>>>,
    wake: Mutex<Wake>,
    cond: Condvar,
    stopping: AtomicBool,
    gc_removed: AtomicU64,
}

pub struct Worker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The worker's own handles on the maps it walks.
struct Tables {
    conntrack: HashMap<MapData, FlowKey, CtEntry>,
    pending: HashMap<MapData, FlowKey, CtEntry>,
    config: Array<MapData, Config>,
}

/// A second handle on the map behind `map`, by its id.
fn reopen<T>(map: &MapData) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let id = map.info()?.id();
    let data = MapData::from_id(id).with_context(|| format!("opening map {id} again"))?;
    Ok(T::try_from(Map::from_map_data(data)?)?)
}

impl Worker {
    /// Starts the worker on `maps`' conntrack tables; it takes its first
    /// census at once.
    pub fn start(maps: &Maps) -> Result<Worker> {
        let tables = Tables {
            conntrack: reopen(maps.conntrack.map())?,
            pending: reopen(maps.ct_pending.map())?,
            config: reopen(maps.config.map())?,
        };
        let shared = Arc::new(Shared {
            latest: Mutex::new(None),
            wake: Mutex::new(Wake::default()),
            cond: Condvar::new(),
            stopping: AtomicBool::new(false),
            gc_removed: AtomicU64::new(0),
        });
        let thread = std::thread::Builder::new()
            .name("conntrack-census".into())
            .spawn({
                let shared = shared.clone();
                let mut tables = tables;
                move || run(&shared, &mut tables)
            })
            .map_err(|e| anyhow!("starting the conntrack census: {e}"))?;
        Ok(Worker {
            shared,
            thread: Some(thread),
        })
    }

    /// The latest census, if one was taken yet. Never waits for a walk.
    pub fn latest(&self) -> Option<Arc<Snapshot>> {
        self.shared.latest.lock().ok()?.clone()
    }

    /// Asks for a fresher census (taken once `MIN_INTERVAL` has passed
    /// since the last one).
    pub fn ask(&self) {
        if let Ok(mut w) = self.shared.wake.lock() {
            w.asked = true;
            self.shared.cond.notify_one();
        }
    }

    /// Expired entries deleted so far.
    pub fn gc_removed(&self) -> u64 {
        self.shared.gc_removed.load(Ordering::Relaxed)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        if let Ok(mut w) = self.shared.wake.lock() {
            w.stop = true;
            self.shared.cond.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, tables: &mut Tables) {
    let mut last: Option<Instant> = None;
    let mut rest = Duration::ZERO;
    loop {
        {
            let Ok(mut wake) = shared.wake.lock() else {
                return;
            };
            // Until stopped, asked (and MIN_INTERVAL passed) or PERIOD over.
            loop {
                if wake.stop {
                    return;
                }
                let Some(at) = last else { break };
                let age = at.elapsed();
                let (period, min) = (PERIOD.max(rest), MIN_INTERVAL.max(rest));
                if age >= period || (wake.asked && age >= min) {
                    break;
                }
                let wait = if wake.asked { min - age } else { period - age };
                wake = match shared.cond.wait_timeout(wake, wait) {
                    Ok((w, _)) => w,
                    Err(_) => return,
                };
            }
            wake.asked = false;
        }
        let started = Instant::now();
        // A walk that panics (a bug) must not end the census for good: the
        // thread is not supervised like the async tasks, so it carries on
        // after a pause, and the census age in status shows the gap.
        let walked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            walk(tables, &shared.stopping)
        }));
        let Ok(walked) = walked else {
            log::error!("the conntrack census failed; retrying in a second");
            std::thread::sleep(Duration::from_secs(1));
            continue;
        };
        let Some((census, removed)) = walked else {
            return;
        };
        shared.gc_removed.fetch_add(removed, Ordering::Relaxed);
        let snapshot = Arc::new(Snapshot {
            census,
            taken: Instant::now(),
            walk: started.elapsed(),
        });
        rest = snapshot.walk * REST_FACTOR;
        if let Ok(mut latest) = shared.latest.lock() {
            *latest = Some(snapshot);
        }
        last = Some(Instant::now());
    }
}

/// Counts both tables and deletes their expired entries; None if lbd
/// began to stop meanwhile.
fn walk(tables: &mut Tables, stopping: &AtomicBool) -> Option<(Census, u64)> {
    let mut out = Census::default();
    let cfg = tables.config.get(&0, 0).ok();
    let now = cfg.as_ref().map(conntrack::now);
    let horizon = now.map(|n| n.saturating_sub(ACTIVE_FLOW_AGE.as_nanos() as u64));
    let mut removed = 0;
    for map in [&mut tables.conntrack, &mut tables.pending] {
        // Collected first: deleting while walking a BPF hash map restarts
        // the walk.
        let mut dead = Vec::new();
        let mut visit = |key: &FlowKey, ct: &CtEntry| {
            if let (Some(cfg), Some(now)) = (&cfg, now) {
                if conntrack::expired(ct, cfg, now) {
                    dead.push(*key);
                    return;
                }
            }
            // One connection, two halves: count the forward ones.
            if ct.flags & lb_common::CT_REPLY != 0 {
                return;
            }
            out.entries += 1;
            if ct.state & lb_common::ST_CONFIRMED != 0 {
                out.confirmed += 1;
            }
            if horizon.is_some_and(|h| ct.last_seen_ns >= h) {
                *out.active.entry(ct.backend_id).or_insert(0) += 1;
            }
        };
        match crate::map_batch::for_each(map.map(), stopping, &mut visit) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                log::debug!("batch lookup refused ({e}); walking entry by entry");
                for (seen, (key, ct)) in map.iter().filter_map(|r| r.ok()).enumerate() {
                    if (seen as u64).is_multiple_of(STOP_CHECK_EVERY)
                        && stopping.load(Ordering::Relaxed)
                    {
                        return None;
                    }
                    visit(&key, &ct);
                }
            }
        }
        removed += dead.iter().filter(|k| map.remove(k).is_ok()).count() as u64;
    }
    Some((out, removed))
}
