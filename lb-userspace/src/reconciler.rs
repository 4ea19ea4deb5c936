//! The only writer of the service, backend and ring maps: it makes them
//! equal to a desired state, changing only what differs.
//!
//! Order of writes matters because the datapath reads concurrently:
//! a new ring is written to the service's idle generation before the service
//! entry flips to it; a backend is written before any ring names it and
//! removed only after no ring does.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use anyhow::{anyhow, bail, Context as _, Result};
use lb_common::{
    Backend, ServiceKey, ServiceValue, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING,
    FLAG_FULLNAT, FLAG_LOCAL_VIP, FLAG_SOCKET, RINGS_PER_SERVICE,
};

use crate::datapath::Maps;
use crate::maglev;
use crate::mapset::MapSet;
use crate::model::{
    BackendSpec, ConntrackSettings, DesiredState, Frontend, Member, Proto, ServiceSpec,
};
use crate::prefilter;

/// What the reconciler has written for one service.
#[derive(Clone, Debug)]
pub struct Applied {
    pub spec: ServiceSpec,
    pub slot: u32,
    pub generation: u32,
    /// Backend id for each backend of `spec`, in the same order.
    pub backend_ids: Vec<u32>,
    /// The state written for each backend, in the same order: with the
    /// spec, all a rollback needs to restore an entry without reading it.
    pub backend_states: Vec<u8>,
    /// The SERVICES entry as written, restored if a later step fails.
    pub entry: ServiceValue,
    /// Found in the maps at start-up and not yet named by any source.
    pub adopted: bool,
}

pub struct Reconciler<M: MapSet = Maps> {
    maps: M,
    /// Backends whose established flows must leave them (failed health
    /// checks with `on_down = "reset"`).
    reset: HashSet<(Frontend, SocketAddr)>,
    /// Frontend addresses are made local to the node (see vips.rs).
    local_vips: bool,
    services: BTreeMap<Frontend, Applied>,
    free_slots: Vec<u32>,
    next_slot: u32,
    next_backend_id: u32,
    /// Backend ids no ring names any more whose removal failed: retried at
    /// every `apply`, so that no entry is left behind.
    orphans: Vec<u32>,
    /// SOCK_MEMBERS as written.
    members: BTreeSet<Member>,
    /// Members were found in the maps at start-up and no source has
    /// reported yet: they are kept, not removed, until `release_adopted`.
    members_adopted: bool,
    /// PREFILTER as written; empty until the first write.
    prefilter: Vec<u32>,
    /// Whether the datapath uses PREFILTER (CONFIG says its size).
    prefilter_on: bool,
    /// Maglev tables an `apply` built ahead on every core, by frontend,
    /// with the backends and size each was built for.
    prebuilt: StdHashMap<Frontend, Prebuilt>,
}

/// A Maglev table built ahead: (backend keys and weights, table size,
/// the table).
type Prebuilt = (Vec<(u64, u32)>, u32, Vec<u32>);

/// An `apply` writes services in batches of this many, building the next
/// batch's Maglev tables in parallel meanwhile: enough to keep every core
/// busy, few enough that the tables waiting to be written stay small (at
/// the default size, 16 KiB each).
const PREBUILD_BATCH: usize = 256;
/// Fewer changed services than this have their tables built one by one as
/// they are written: an everyday change (a container came or went) starts
/// no thread.
const PREBUILD_MIN: usize = 16;

/// What a service's Maglev table is built from: the key and weight of
/// each backend that takes new flows, in the spec's order.
fn maglev_keys(spec: &ServiceSpec) -> Vec<(u64, u32)> {
    spec.backends
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| (maglev::backend_key(b.addr, b.port), b.weight))
        .collect()
}

/// What `maglev::build_tables` builds the tables of `specs` from, in order:
/// their backends' keys and weights, and their sizes.
fn prebuild_jobs(specs: &[&ServiceSpec], stride: u32) -> Vec<(Vec<(u64, u32)>, u32)> {
    specs
        .iter()
        .map(|spec| (maglev_keys(spec), spec.table_size.unwrap_or(stride)))
        .collect()
}

/// Counts of what an `apply` changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

pub use lb_api::status::ServiceFailure;

/// Some services of an `apply` failed; every other one was applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyFailed {
    /// What the services that succeeded changed.
    pub changes: Changes,
    pub failures: Vec<ServiceFailure>,
}

impl fmt::Display for ApplyFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self.failures.iter().map(|x| x.to_string()).collect();
        write!(f, "{}", all.join("; "))
    }
}

impl std::error::Error for ApplyFailed {}

/// What one change wrote so far, to take it back if a later step fails.
#[derive(Default)]
struct Undo {
    /// Backend ids this change created (their counters, then their entry).
    created: Vec<u32>,
    /// Existing backend entries this change overwrote, as they were.
    overwritten: Vec<(u32, Backend)>,
    /// Set once the service entry was written: what it was before (None:
    /// there was none).
    flipped: Option<Option<ServiceValue>>,
}

pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: addr16(f.addr),
        port: f.port.to_be(),
        proto: f.proto.number(),
        _pad: 0,
    }
}

/// What PREFILTER holds for a service: its frontend and its backends.
fn entries(spec: &ServiceSpec) -> impl Iterator<Item = ([u8; 16], u16)> + '_ {
    let key = service_key(&spec.frontend);
    std::iter::once((key.addr, key.port)).chain(
        spec.backends
            .iter()
            .map(|b| (addr16(b.addr), b.port.to_be())),
    )
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

impl<M: MapSet> Reconciler<M> {
    /// Takes over `maps`, adopting what an earlier lbd left in them (after
    /// a crash, a SIGKILL or an upgrade): each service keeps its slot and
    /// each backend its id, so conntrack entries stay valid and established
    /// flows keep their backends. Adopted services are re-written as soon as
    /// a desired state names them; the others keep serving until
    /// `release_adopted` (once every source has reported).
    pub fn new(maps: M) -> Result<Self> {
        let max_ct_backend = maps.max_conntrack_backend();
        let backends = maps.backends();
        let max_known = backends.iter().map(|(id, _)| *id).max().unwrap_or(0);
        let mut services = BTreeMap::new();
        // By slot, so that adopting 10,000 services does not walk every
        // backend for each.
        let mut by_slot: StdHashMap<u32, Vec<&(u32, Backend)>> = StdHashMap::new();
        for entry in &backends {
            by_slot.entry(entry.1.service_slot).or_default().push(entry);
        }
        for (key, value) in maps.services() {
            let Some(frontend) = frontend_of(&key) else {
                continue;
            };
            let mut ids: Vec<(u32, BackendSpec, u8)> = by_slot
                .get(&value.slot)
                .into_iter()
                .flatten()
                .map(|(id, b)| {
                    let spec = BackendSpec {
                        addr: addr_of(&b.addr),
                        port: u16::from_be(b.port),
                        weight: if b.state == BACKEND_DRAINING { 0 } else { 1 },
                    };
                    (*id, spec, b.state)
                })
                .collect();
            ids.sort_by_key(|(id, _, _)| *id);
            let spec = ServiceSpec {
                name: format!("adopted {frontend}"),
                frontend,
                backends: ids.iter().map(|(_, b, _)| *b).collect(),
                snat: (value.flags & FLAG_FULLNAT != 0).then(|| addr_of(&value.snat_addr)),
                health: None,
                affinity_secs: 0,
                table_size: None,
                network: (value.flags & FLAG_SOCKET != 0).then_some(value.network),
                local_frontend: value.flags & FLAG_LOCAL_VIP != 0,
                source: "adopted".into(),
            };
            services.insert(
                frontend,
                Applied {
                    spec,
                    slot: value.slot,
                    generation: value.ring / maps.table_size() % RINGS_PER_SERVICE,
                    backend_ids: ids.iter().map(|(id, _, _)| *id).collect(),
                    backend_states: ids.iter().map(|(_, _, st)| *st).collect(),
                    entry: value,
                    adopted: true,
                },
            );
        }
        // A set: a restart over 10,000 services looks up every slot and backend.
        let used: HashSet<u32> = services.values().map(|a: &Applied| a.slot).collect();
        let next_slot = used.iter().max().map_or(0, |m| m + 1);
        let free_slots = (0..next_slot).filter(|s| !used.contains(s)).rev().collect();
        let mut reconciler = Reconciler {
            maps,
            reset: HashSet::new(),
            local_vips: false,
            services,
            free_slots,
            next_slot,
            next_backend_id: max_ct_backend.max(max_known).saturating_add(1),
            orphans: Vec::new(),
            members: BTreeSet::new(),
            members_adopted: false,
            prefilter: Vec::new(),
            prefilter_on: false,
            prebuilt: StdHashMap::new(),
        };
        reconciler.members = reconciler.maps.members().into_iter().collect();
        reconciler.members_adopted = !reconciler.members.is_empty();
        // Backends of no adopted service are leftovers: nothing can reach them.
        for (id, b) in &backends {
            if !used.contains(&b.service_slot) {
                reconciler.drop_backend(*id);
            }
        }
        if !reconciler.services.is_empty() {
            log::info!(
                "adopted {} services from the pinned maps",
                reconciler.services.len()
            );
        }
        Ok(reconciler)
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
        self.members_adopted = false;
    }

    /// The network memberships written.
    pub fn members(&self) -> &BTreeSet<Member> {
        &self.members
    }

    /// Makes SOCK_MEMBERS equal to `wanted`: additions first, so that a
    /// namespace moving between networks is never left without one.
    fn apply_members(&mut self, wanted: &BTreeSet<Member>) -> Result<()> {
        for m in wanted.difference(&self.members.clone()) {
            self.maps.member_insert(m)?;
            self.members.insert(*m);
        }
        if self.members_adopted {
            return Ok(());
        }
        for m in self.members.clone().difference(wanted) {
            self.maps.member_remove(m)?;
            self.members.remove(m);
        }
        Ok(())
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// For flushing conntrack, and for tests that set the datapath's clock
    /// or inspect conntrack closely.
    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    pub fn applied(&self) -> impl Iterator<Item = &Applied> {
        self.services.values()
    }

    /// Slots not in use, and the next never-used slot.
    pub fn slots(&self) -> (&[u32], u32) {
        (&self.free_slots, self.next_slot)
    }

    /// The id the next new backend gets.
    pub fn next_backend_id(&self) -> u32 {
        self.next_backend_id
    }

    /// Backend ids whose removal is still pending.
    pub fn orphans(&self) -> &[u32] {
        &self.orphans
    }

    /// Makes the maps equal to `desired`, one service at a time: a service
    /// that fails is left as it was (its previous state, or absent) and
    /// reported, and every other service is still applied.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<Changes, ApplyFailed> {
        self.retry_orphans();
        self.widen_prefilter(desired);
        let mut changes = Changes::default();
        let mut failures = Vec::new();
        let mut wanted: StdHashMap<Frontend, &ServiceSpec> = StdHashMap::new();
        for spec in &desired.services {
            match wanted.entry(spec.frontend) {
                Entry::Vacant(v) => {
                    v.insert(spec);
                }
                // Sources are merged before this, so this is a caller's bug;
                // the first claimant keeps the frontend.
                Entry::Occupied(_) => failures.push(failure(
                    spec,
                    anyhow!("another service of the same state has this frontend"),
                )),
            }
        }
        let gone: Vec<Frontend> = self
            .services
            .iter()
            .filter(|(f, a)| !wanted.contains_key(f) && !a.adopted)
            .map(|(f, _)| *f)
            .collect();
        for frontend in gone {
            match self.remove_service(&frontend) {
                Ok(()) => changes.removed += 1,
                Err(f) => failures.push(f),
            }
        }
        let changed: Vec<&ServiceSpec> = desired
            .services
            .iter()
            .filter(|spec| std::ptr::eq(wanted[&spec.frontend], *spec) && self.differs(spec))
            .collect();
        let batches: Vec<&[&ServiceSpec]> = changed.chunks(PREBUILD_BATCH).collect();
        let stride = self.maps.table_size();
        // A pipeline: the next batch's tables are built on other threads
        // while this one is written, so the writes (syscalls, one core)
        // and the tables (all cores) overlap.
        std::thread::scope(|scope| {
            let build = |batch: &[&ServiceSpec]| {
                let jobs = prebuild_jobs(batch, stride);
                scope.spawn(move || {
                    let tables = maglev::build_tables(&jobs);
                    jobs.into_iter().zip(tables).collect::<Vec<_>>()
                })
            };
            // Batch `i`'s tables, building; none for a handful.
            let ahead = |i: usize| {
                batches
                    .get(i)
                    .filter(|b| b.len() >= PREBUILD_MIN)
                    .map(|b| build(b))
            };
            let mut next = ahead(0);
            for (i, batch) in batches.iter().enumerate() {
                let built = next
                    .take()
                    .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
                next = ahead(i + 1);
                for (spec, ((keys, size), table)) in batch.iter().zip(built.into_iter().flatten()) {
                    self.prebuilt.insert(spec.frontend, (keys, size, table));
                }
                for spec in batch.iter().copied() {
                    let result = match self.services.get(&spec.frontend) {
                        Some(_) => self.update_service(spec).map(|()| changes.updated += 1),
                        None => self.add_service(spec).map(|()| changes.added += 1),
                    };
                    if let Err(e) = result {
                        failures.push(failure(spec, e));
                    }
                }
                // A service whose write failed before its table was used.
                self.prebuilt.clear();
            }
        });
        if let Err(e) = self.apply_members(&desired.members) {
            // Only Swarm's overlay networks have members.
            failures.push(ServiceFailure {
                name: "network memberships".into(),
                frontend: String::new(),
                source: crate::sources::swarm::SOURCE.into(),
                reason: format!("{e:#}"),
            });
        }
        if failures.is_empty() {
            Ok(changes)
        } else {
            Err(ApplyFailed { changes, failures })
        }
    }

    /// Whether `spec` is not applied as it is: a new service or a changed
    /// one, which `apply` writes and whose bits `widen_prefilter` sets.
    fn differs(&self, spec: &ServiceSpec) -> bool {
        self.services.get(&spec.frontend).map(|a| &a.spec) != Some(spec)
    }

    /// Before a change: the bits of every frontend and backend of the
    /// services in `desired` that differ from what is applied are added to
    /// PREFILTER, so that nothing is written before its bit. Bits are not
    /// cleared while lbd runs (the first write after a start rebuilds them
    /// from what is applied): a removed backend's replies already on their
    /// way must still find their connection, and its bit costs the packets
    /// that share it no more than a lookup.
    fn widen_prefilter(&mut self, desired: &DesiredState) {
        let mut new = desired
            .services
            .iter()
            .filter(|spec| self.differs(spec))
            .peekable();
        // Nothing new: the array in force already holds every bit, and a
        // copy of it (up to 8 MiB) would only be compared with itself.
        if self.prefilter_on && new.peek().is_none() {
            return;
        }
        let bits = self.maps.prefilter_bits();
        let mut words = if self.prefilter.is_empty() {
            prefilter::words(bits, self.services.values().flat_map(|a| entries(&a.spec)))
        } else {
            self.prefilter.clone()
        };
        prefilter::add(&mut words, bits, new.flat_map(entries));
        self.write_prefilter(words, bits);
    }

    /// Writes PREFILTER and turns it on. Should the write fail, the
    /// datapath is told to look every packet up instead.
    fn write_prefilter(&mut self, words: Vec<u32>, bits: u32) {
        if self.prefilter_on && words == self.prefilter {
            return;
        }
        if let Err(e) = self.maps.prefilter_write(&words) {
            log::error!(
                "writing the prefilter: {e:#}; every packet is looked up until it is written"
            );
            self.prefilter.clear();
            match self.maps.prefilter_enable(0) {
                Ok(()) => self.prefilter_on = false,
                Err(e) => log::error!("turning the prefilter off: {e:#}"),
            }
            return;
        }
        self.prefilter = words;
        if !self.prefilter_on {
            match self.maps.prefilter_enable(bits) {
                Ok(()) => self.prefilter_on = true,
                Err(e) => log::warn!("turning the prefilter on: {e:#}"),
            }
        }
    }

    fn take_slot(&mut self, spec: &ServiceSpec) -> Result<(u32, bool)> {
        match self.free_slots.pop() {
            Some(s) => Ok((s, true)),
            None if self.next_slot < self.maps.max_services() => {
                self.next_slot += 1;
                Ok((self.next_slot - 1, false))
            }
            None => bail!(
                "service {}: all {} service slots are in use (raise --max-services)",
                spec.name,
                self.maps.max_services()
            ),
        }
    }

    /// Gives back a slot `take_slot` just took, leaving the free list as
    /// it was before.
    fn return_slot(&mut self, slot: u32, reused: bool) {
        if reused {
            self.free_slots.push(slot);
        } else {
            self.next_slot -= 1;
        }
    }

    fn add_service(&mut self, spec: &ServiceSpec) -> Result<()> {
        let (slot, reused) = self.take_slot(spec)?;
        let first_id = self.next_backend_id;
        let mut undo = Undo::default();
        let mut applied = Applied {
            spec: spec.clone(),
            slot,
            generation: 0,
            backend_ids: Vec::new(),
            backend_states: Vec::new(),
            entry: ServiceValue::default(),
            adopted: false,
        };
        match self.add_steps(&mut applied, &mut undo) {
            Ok(()) => {
                self.services.insert(spec.frontend, applied);
                Ok(())
            }
            Err(e) => {
                self.roll_back(&spec.frontend, undo, first_id);
                self.return_slot(slot, reused);
                Err(e)
            }
        }
    }

    fn add_steps(&mut self, applied: &mut Applied, undo: &mut Undo) -> Result<()> {
        // A reused slot must not carry its previous owner's counters.
        self.maps.service_stats_zero(applied.slot)?;
        let (ids, states) =
            self.write_backends(&applied.spec, applied.slot, None, &mut Vec::new(), undo)?;
        applied.backend_ids = ids;
        applied.backend_states = states;
        self.write_ring_and_service(applied, true, None, undo)
    }

    fn update_service(&mut self, spec: &ServiceSpec) -> Result<()> {
        let old = self
            .services
            .get(&spec.frontend)
            .cloned()
            .ok_or_else(|| anyhow!("no such service"))?;
        let first_id = self.next_backend_id;
        let mut undo = Undo::default();
        let mut applied = Applied {
            spec: spec.clone(),
            adopted: false,
            ..old.clone()
        };
        if let Err(e) = self.update_steps(&old, &mut applied, &mut undo) {
            self.roll_back(&spec.frontend, undo, first_id);
            return Err(e);
        }
        let kept = applied.backend_ids.clone();
        self.services.insert(spec.frontend, applied);
        for id in old.backend_ids.into_iter().filter(|id| !kept.contains(id)) {
            self.drop_backend(id);
        }
        Ok(())
    }

    fn update_steps(
        &mut self,
        old: &Applied,
        applied: &mut Applied,
        undo: &mut Undo,
    ) -> Result<()> {
        // Backends that stop taking new flows keep their old state until the
        // ring no longer names them: a new flow must never meet a ring slot
        // whose backend refuses it.
        let mut later = Vec::new();
        let (ids, states) =
            self.write_backends(&applied.spec, applied.slot, Some(old), &mut later, undo)?;
        applied.backend_ids = ids;
        applied.backend_states = states;
        // Flip to a ring without the removed backends before removing them.
        self.write_ring_and_service(applied, false, Some(old.entry), undo)?;
        for (id, value) in later {
            let before = old_entry(old, id);
            self.maps.backend_insert(id, &value)?;
            if let Some(before) = before {
                undo.overwritten.push((id, before));
            }
        }
        Ok(())
    }

    /// Takes back what `undo` says a failed change wrote, newest first:
    /// the service entry (so no ring names the new backends), then the
    /// backends it overwrote, then those it created. `first_id` is the
    /// next backend id before the change; ids go back to it only if no
    /// ring ever named them (a conntrack entry could otherwise meet a new
    /// backend under an old flow's id).
    fn roll_back(&mut self, frontend: &Frontend, undo: Undo, first_id: u32) {
        let key = service_key(frontend);
        let mut clean = true;
        if let Some(previous) = undo.flipped {
            let restored = match previous {
                Some(value) => self.maps.service_insert(&key, &value),
                None => self.maps.service_remove(&key),
            };
            if let Err(e) = restored {
                log::error!("restoring the service entry of {frontend}: {e:#}");
                clean = false;
            }
        }
        for (id, value) in undo.overwritten.iter().rev() {
            if let Err(e) = self.maps.backend_insert(*id, value) {
                log::error!("restoring backend {id} of {frontend}: {e:#}");
                clean = false;
            }
        }
        for id in undo.created.iter().rev() {
            clean &= self.drop_backend(*id);
        }
        if clean && undo.flipped.is_none() {
            self.next_backend_id = first_id;
        }
    }

    fn remove_service(&mut self, frontend: &Frontend) -> Result<(), ServiceFailure> {
        let Some(applied) = self.services.get(frontend) else {
            return Ok(());
        };
        if let Err(e) = self.maps.service_remove(&service_key(frontend)) {
            return Err(failure(
                &applied.spec,
                e.context("removing the service entry"),
            ));
        }
        let Some(applied) = self.services.remove(frontend) else {
            return Ok(());
        };
        for id in applied.backend_ids {
            self.drop_backend(id);
        }
        self.free_slots.push(applied.slot);
        Ok(())
    }

    /// Removes a backend no ring names any more, and its counters. On
    /// failure it is kept as an orphan, removed again at the next `apply`.
    fn drop_backend(&mut self, id: u32) -> bool {
        let removed = self
            .maps
            .backend_remove(id)
            .and_then(|()| self.maps.backend_stats_remove(id));
        if let Err(e) = removed {
            log::warn!("removing backend {id} (will retry): {e:#}");
            if !self.orphans.contains(&id) {
                self.orphans.push(id);
            }
            return false;
        }
        true
    }

    fn retry_orphans(&mut self) {
        for id in std::mem::take(&mut self.orphans) {
            self.drop_backend(id);
        }
    }

    /// Writes BACKENDS entries for `spec`, reusing the ids of backends that
    /// were already there (so their flows and counters continue). Existing
    /// backends that stop taking new flows go to `later` instead, to be
    /// written once the new ring is live. Returns ids and states.
    fn write_backends(
        &mut self,
        spec: &ServiceSpec,
        slot: u32,
        old: Option<&Applied>,
        later: &mut Vec<(u32, Backend)>,
        undo: &mut Undo,
    ) -> Result<(Vec<u32>, Vec<u8>)> {
        let mut ids = Vec::with_capacity(spec.backends.len());
        let mut states = Vec::with_capacity(spec.backends.len());
        for b in &spec.backends {
            let existing = old.and_then(|old| {
                old.spec
                    .backends
                    .iter()
                    .position(|o| o.addr == b.addr && o.port == b.port)
                    .map(|i| old.backend_ids[i])
            });
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
            let id = match existing {
                // Written again even when unchanged: its state may differ.
                Some(id) => id,
                None => {
                    let id = self.next_backend_id;
                    self.next_backend_id = self
                        .next_backend_id
                        .checked_add(1)
                        .ok_or_else(|| anyhow!("backend ids exhausted; restart lbd"))?;
                    self.maps.backend_stats_zero(id)?;
                    undo.created.push(id);
                    id
                }
            };
            ids.push(id);
            states.push(value.state);
            if existing.is_some() && value.state != BACKEND_ACTIVE {
                later.push((id, value));
                continue;
            }
            self.maps.backend_insert(id, &value)?;
            if let Some(before) = old.and_then(|old| old_entry(old, id)) {
                undo.overwritten.push((id, before));
            }
        }
        Ok((ids, states))
    }

    /// Builds the Maglev table, writes it to the idle generation and points
    /// the service entry at it. `previous` is the entry it replaces.
    fn write_ring_and_service(
        &mut self,
        applied: &mut Applied,
        first: bool,
        previous: Option<ServiceValue>,
        undo: &mut Undo,
    ) -> Result<()> {
        let generation = if first {
            0
        } else {
            (applied.generation + 1) % RINGS_PER_SERVICE
        };
        let stride = self.maps.table_size();
        let size = applied.spec.table_size.unwrap_or(stride);
        if size > stride {
            bail!(
                "its Maglev table size {size} is larger than the maps' {stride} (the global \
                 maglev.table_size when the maps were made; a larger one takes effect when lbd \
                 starts after `lbd --cleanup`)"
            );
        }
        let ring = (applied.slot * RINGS_PER_SERVICE + generation) * stride;
        // The ids of the backends `maglev_keys` lists, in its order.
        let active: Vec<u32> = applied
            .spec
            .backends
            .iter()
            .zip(&applied.backend_ids)
            .filter(|(b, _)| b.weight > 0)
            .map(|(_, id)| *id)
            .collect();
        let keys = maglev_keys(&applied.spec);
        let table = match self.prebuilt.remove(&applied.spec.frontend) {
            Some((built_for, built_size, table)) if built_for == keys && built_size == size => {
                table
            }
            _ => maglev::build_table(&keys, size),
        };
        if !table.is_empty() {
            let ids: Vec<u32> = table.iter().map(|i| active[*i as usize]).collect();
            self.maps.ring_write(ring as usize, &ids)?;
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
            } | if self.local_vips || applied.spec.local_frontend {
                FLAG_LOCAL_VIP
            } else {
                0
            } | if applied.spec.network.is_some() {
                FLAG_SOCKET
            } else {
                0
            },
            snat_addr: applied.spec.snat.map(addr16).unwrap_or_default(),
            affinity_ns: u64::from(applied.spec.affinity_secs) * 1_000_000_000,
            network: applied.spec.network.unwrap_or(0),
            ring_size: size,
        };
        self.maps
            .service_insert(&service_key(&applied.spec.frontend), &value)
            .with_context(|| format!("writing service {}", applied.spec.name))?;
        undo.flipped = Some(previous);
        applied.generation = generation;
        applied.entry = value;
        Ok(())
    }
}

/// The entry backend `id` of `old` has in the maps: only an existing
/// backend has one to restore.
fn old_entry(old: &Applied, id: u32) -> Option<Backend> {
    let i = old.backend_ids.iter().position(|x| *x == id)?;
    let b = old.spec.backends.get(i)?;
    Some(Backend {
        addr: addr16(b.addr),
        port: b.port.to_be(),
        state: *old.backend_states.get(i)?,
        _pad: 0,
        service_slot: old.slot,
    })
}

fn failure(spec: &ServiceSpec, reason: anyhow::Error) -> ServiceFailure {
    ServiceFailure {
        name: spec.name.clone(),
        frontend: spec.frontend.to_string(),
        source: spec.source.clone(),
        reason: format!("{reason:#}"),
    }
}

impl Reconciler<Maps> {
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
}

pub fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| anyhow!("reading the possible CPUs: {e}"))
}

#[cfg(test)]
#[path = "reconciler_tests.rs"]
mod tests;
