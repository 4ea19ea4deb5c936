//! The only writer of the service, backend and ring maps: it makes them
//! equal to a desired state, changing only what differs.
//!
//! Order of writes matters because the datapath reads concurrently:
//! a new ring is written to the service's idle generation before the service
//! entry flips to it; a backend is written before any ring names it and
//! removed only after no ring does.

use std::collections::{BTreeMap, HashMap as StdHashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::PerCpuValues;
use lb_common::{
    Backend, ServiceKey, ServiceValue, TrafficStats, BACKEND_ACTIVE, BACKEND_DOWN,
    BACKEND_DRAINING, FLAG_FULLNAT, FLAG_LOCAL_VIP, MAGLEV_M, RINGS_PER_SERVICE,
};

use crate::datapath::Maps;
use crate::maglev;
use crate::model::{BackendSpec, ConntrackSettings, DesiredState, Frontend, Proto, ServiceSpec};

/// What the reconciler has written for one service.
#[derive(Clone, Debug)]
pub struct Applied {
    pub spec: ServiceSpec,
    pub slot: u32,
    pub generation: u32,
    /// Backend id for each backend of `spec`, in the same order.
    pub backend_ids: Vec<u32>,
    /// Found in the maps at start-up and not yet named by any source.
    pub adopted: bool,
}

pub struct Reconciler {
    maps: Maps,
    /// Backends whose established flows must leave them (failed health
    /// checks with `on_down = "reset"`).
    reset: HashSet<(Frontend, SocketAddr)>,
    /// Frontend addresses are made local to the node (see vips.rs).
    local_vips: bool,
    services: BTreeMap<Frontend, Applied>,
    free_slots: Vec<u32>,
    next_slot: u32,
    next_backend_id: u32,
}

/// Counts of what an `apply` changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: addr16(f.addr),
        port: f.port.to_be(),
        proto: f.proto.number(),
        _pad: 0,
    }
}

/// The frontend a SERVICES key stands for.
fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    let proto = match key.proto {
        lb_common::PROTO_TCP => Proto::Tcp,
        lb_common::PROTO_UDP => Proto::Udp,
        _ => return None,
    };
    Some(Frontend {
        addr: addr_of(&key.addr),
        port: u16::from_be(key.port),
        proto,
    })
}

/// The inverse of `addr16`.
pub fn addr_of(a: &[u8; 16]) -> IpAddr {
    if lb_common::is_v4_mapped(a) {
        IpAddr::from([a[12], a[13], a[14], a[15]])
    } else {
        IpAddr::from(*a)
    }
}

pub fn addr16(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => lb_common::v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

impl Reconciler {
    /// Takes over `maps`, adopting what an earlier lbd left in them (after
    /// a crash, a SIGKILL or an upgrade): each service keeps its slot and
    /// each backend its id, so conntrack entries stay valid and established
    /// flows keep their backends. Adopted services are re-written as soon as
    /// a desired state names them; the others keep serving until
    /// `release_adopted` (once every source has reported).
    pub fn new(maps: Maps) -> Result<Self> {
        let max_ct_backend = maps
            .conntrack
            .iter()
            .filter_map(|r| r.ok())
            .map(|(_, v)| v.backend_id)
            .max()
            .unwrap_or(0);
        let backends: Vec<(u32, Backend)> = maps.backends.iter().filter_map(|r| r.ok()).collect();
        let max_known = backends.iter().map(|(id, _)| *id).max().unwrap_or(0);
        let mut services = BTreeMap::new();
        for (key, value) in maps.services.iter().filter_map(|r| r.ok()) {
            let Some(frontend) = frontend_of(&key) else {
                continue;
            };
            let mut ids: Vec<(u32, BackendSpec)> = backends
                .iter()
                .filter(|(_, b)| b.service_slot == value.slot)
                .map(|(id, b)| {
                    let spec = BackendSpec {
                        addr: addr_of(&b.addr),
                        port: u16::from_be(b.port),
                        weight: if b.state == BACKEND_DRAINING { 0 } else { 1 },
                    };
                    (*id, spec)
                })
                .collect();
            ids.sort_by_key(|(id, _)| *id);
            let spec = ServiceSpec {
                name: format!("adopted {frontend}"),
                frontend,
                backends: ids.iter().map(|(_, b)| *b).collect(),
                snat: (value.flags & FLAG_FULLNAT != 0).then(|| addr_of(&value.snat_addr)),
                health: None,
                affinity_secs: 0,
                source: "adopted".into(),
            };
            services.insert(
                frontend,
                Applied {
                    spec,
                    slot: value.slot,
                    generation: value.ring % RINGS_PER_SERVICE,
                    backend_ids: ids.iter().map(|(id, _)| *id).collect(),
                    adopted: true,
                },
            );
        }
        let used: Vec<u32> = services.values().map(|a: &Applied| a.slot).collect();
        let next_slot = used.iter().max().map_or(0, |m| m + 1);
        let free_slots = (0..next_slot).filter(|s| !used.contains(s)).rev().collect();
        // Backends of no adopted service are leftovers: nothing can reach them.
        let mut maps = maps;
        for (id, b) in &backends {
            if !used.contains(&b.service_slot) {
                let _ = maps.backends.remove(id);
                let _ = maps.backend_stats.remove(id);
            }
        }
        if !services.is_empty() {
            log::info!("adopted {} services from the pinned maps", services.len());
        }
        Ok(Reconciler {
            maps,
            reset: HashSet::new(),
            local_vips: false,
            services,
            free_slots,
            next_slot,
            next_backend_id: max_ct_backend.max(max_known) + 1,
        })
    }

    /// Tells the datapath that frontend addresses are local, so that a
    /// packet finding no backend goes to the kernel to be answered.
    pub fn set_local_vips(&mut self, local: bool) {
        self.local_vips = local;
    }

    /// Backends to mark down at the next `apply`: their conntrack entries
    /// stop counting, so their flows move to other backends.
    pub fn set_reset(&mut self, reset: HashSet<(Frontend, SocketAddr)>) {
        self.reset = reset;
    }

    /// Removes, at the next `apply`, adopted services that no source named.
    pub fn release_adopted(&mut self) {
        for applied in self.services.values_mut() {
            applied.adopted = false;
        }
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// For flushing conntrack, and for tests that set the datapath's clock
    /// or inspect conntrack closely.
    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// Writes the datapath's conntrack settings (timeouts, SNAT ports),
    /// keeping its clock.
    pub fn set_conntrack(&mut self, settings: &ConntrackSettings) -> Result<()> {
        let current = self.maps.config.get(&0, 0)?;
        let cfg = crate::conntrack::datapath_config(settings, &current);
        if cfg != current {
            self.maps.config.set(0, cfg, 0)?;
        }
        Ok(())
    }

    /// The datapath's settings as written.
    pub fn datapath_config(&self) -> Result<lb_common::Config> {
        Ok(self.maps.config.get(&0, 0)?)
    }

    /// Deletes expired conntrack entries; returns how many.
    pub fn collect_garbage(&mut self) -> u64 {
        crate::conntrack::collect_garbage(&mut self.maps)
    }

    pub fn applied(&self) -> impl Iterator<Item = &Applied> {
        self.services.values()
    }

    /// Makes the maps equal to `desired`.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<Changes> {
        let mut changes = Changes::default();
        let wanted: StdHashMap<Frontend, &ServiceSpec> =
            desired.services.iter().map(|s| (s.frontend, s)).collect();
        if wanted.len() != desired.services.len() {
            bail!("two services share a frontend");
        }
        let gone: Vec<Frontend> = self
            .services
            .iter()
            .filter(|(f, a)| !wanted.contains_key(f) && !a.adopted)
            .map(|(f, _)| *f)
            .collect();
        for frontend in gone {
            self.remove_service(&frontend)?;
            changes.removed += 1;
        }
        for spec in &desired.services {
            match self.services.get(&spec.frontend) {
                Some(applied) if applied.spec == *spec => {}
                Some(_) => {
                    self.update_service(spec)?;
                    changes.updated += 1;
                }
                None => {
                    self.add_service(spec)?;
                    changes.added += 1;
                }
            }
        }
        Ok(changes)
    }

    fn add_service(&mut self, spec: &ServiceSpec) -> Result<()> {
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None if self.next_slot < self.maps.limits.max_services => {
                self.next_slot += 1;
                self.next_slot - 1
            }
            None => bail!(
                "service {}: all {} service slots are in use (raise --max-services)",
                spec.name,
                self.maps.limits.max_services
            ),
        };
        // A reused slot must not carry its previous owner's counters.
        let zero = PerCpuValues::try_from(vec![TrafficStats::default(); nr_cpus()?])?;
        self.maps.service_stats.set(slot, zero, 0)?;
        let mut applied = Applied {
            spec: spec.clone(),
            slot,
            generation: 0,
            backend_ids: Vec::new(),
            adopted: false,
        };
        applied.backend_ids = self.write_backends(spec, slot, &[], &[], &mut Vec::new())?;
        self.write_ring_and_service(&mut applied, true)?;
        self.services.insert(spec.frontend, applied);
        Ok(())
    }

    fn update_service(&mut self, spec: &ServiceSpec) -> Result<()> {
        let mut applied = self
            .services
            .remove(&spec.frontend)
            .ok_or_else(|| anyhow!("no such service"))?;
        let old_backends = applied.spec.backends.clone();
        let old_ids = applied.backend_ids.clone();
        // Backends that stop taking new flows keep their old state until the
        // ring no longer names them: a new flow must never meet a ring slot
        // whose backend refuses it.
        let mut later = Vec::new();
        let result = self.write_backends(spec, applied.slot, &old_backends, &old_ids, &mut later);
        let ids = match result {
            Ok(ids) => ids,
            Err(e) => {
                self.services.insert(spec.frontend, applied);
                return Err(e);
            }
        };
        applied.spec = spec.clone();
        applied.backend_ids = ids;
        applied.adopted = false;
        // Flip to a ring without the removed backends before removing them.
        let flipped = self.write_ring_and_service(&mut applied, false);
        let kept: Vec<u32> = applied.backend_ids.clone();
        self.services.insert(spec.frontend, applied);
        flipped?;
        for (id, value) in later {
            self.maps
                .backends
                .insert(id, value, 0)
                .context("the backend map is full (raise --max-backends)")?;
        }
        for id in old_ids.into_iter().filter(|id| !kept.contains(id)) {
            self.remove_backend(id);
        }
        Ok(())
    }

    fn remove_service(&mut self, frontend: &Frontend) -> Result<()> {
        let Some(applied) = self.services.remove(frontend) else {
            return Ok(());
        };
        self.maps
            .services
            .remove(&service_key(frontend))
            .with_context(|| format!("removing service {}", applied.spec.name))?;
        for id in applied.backend_ids {
            self.remove_backend(id);
        }
        self.free_slots.push(applied.slot);
        Ok(())
    }

    fn remove_backend(&mut self, id: u32) {
        let _ = self.maps.backends.remove(&id);
        let _ = self.maps.backend_stats.remove(&id);
    }

    /// Writes BACKENDS entries for `spec`, reusing the ids of backends that
    /// were already there (so their flows and counters continue). Existing
    /// backends that stop taking new flows go to `later` instead, to be
    /// written once the new ring is live.
    fn write_backends(
        &mut self,
        spec: &ServiceSpec,
        slot: u32,
        old: &[BackendSpec],
        old_ids: &[u32],
        later: &mut Vec<(u32, Backend)>,
    ) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(spec.backends.len());
        for b in &spec.backends {
            let existing = old
                .iter()
                .position(|o| o.addr == b.addr && o.port == b.port)
                .map(|i| (old_ids[i], old[i]));
            let id = match existing {
                // Written again even when unchanged: its state may differ.
                Some((id, _)) => id,
                None => {
                    let id = self.next_backend_id;
                    self.next_backend_id = self
                        .next_backend_id
                        .checked_add(1)
                        .ok_or_else(|| anyhow!("backend ids exhausted; restart lbd"))?;
                    let zero = PerCpuValues::try_from(vec![TrafficStats::default(); nr_cpus()?])?;
                    self.maps
                        .backend_stats
                        .insert(id, zero, 0)
                        .context("the backend statistics map is full (raise --max-backends)")?;
                    id
                }
            };
            let value = Backend {
                addr: addr16(b.addr),
                port: b.port.to_be(),
                state: if self.reset.contains(&(spec.frontend, b.socket_addr())) {
                    BACKEND_DOWN
                } else if b.weight == 0 {
                    BACKEND_DRAINING
                } else {
                    BACKEND_ACTIVE
                },
                _pad: 0,
                service_slot: slot,
            };
            ids.push(id);
            if existing.is_some() && value.state != BACKEND_ACTIVE {
                later.push((id, value));
                continue;
            }
            self.maps
                .backends
                .insert(id, value, 0)
                .context("the backend map is full (raise --max-backends)")?;
        }
        Ok(ids)
    }

    /// Builds the Maglev table, writes it to the idle generation and points
    /// the service entry at it.
    fn write_ring_and_service(&mut self, applied: &mut Applied, first: bool) -> Result<()> {
        let generation = if first {
            0
        } else {
            (applied.generation + 1) % RINGS_PER_SERVICE
        };
        let ring = applied.slot * RINGS_PER_SERVICE + generation;
        let active: Vec<(u64, u32, u32)> = applied
            .spec
            .backends
            .iter()
            .zip(&applied.backend_ids)
            .filter(|(b, _)| b.weight > 0)
            .map(|(b, id)| (maglev::backend_key(b.addr, b.port), b.weight, *id))
            .collect();
        let keys: Vec<(u64, u32)> = active.iter().map(|(k, w, _)| (*k, *w)).collect();
        let table = maglev::build_table(&keys, MAGLEV_M);
        if !table.is_empty() {
            let ids: Vec<u32> = table.iter().map(|i| active[*i as usize].2).collect();
            self.maps.rings.write((ring * MAGLEV_M) as usize, &ids)?;
        }
        let value = ServiceValue {
            slot: applied.slot,
            ring,
            backend_count: if table.is_empty() {
                0
            } else {
                active.len() as u32
            },
            flags: if applied.spec.snat.is_some() {
                FLAG_FULLNAT
            } else {
                0
            } | if self.local_vips { FLAG_LOCAL_VIP } else { 0 },
            snat_addr: applied.spec.snat.map(addr16).unwrap_or_default(),
            affinity_ns: u64::from(applied.spec.affinity_secs) * 1_000_000_000,
        };
        self.maps
            .services
            .insert(service_key(&applied.spec.frontend), value, 0)
            .with_context(|| format!("writing service {}", applied.spec.name))?;
        applied.generation = generation;
        Ok(())
    }
}

pub fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| anyhow!("reading the possible CPUs: {e}"))
}
