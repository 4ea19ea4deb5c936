//! An in-memory `MapSet` for unit tests: it keeps what was written, logs
//! every write in order, and fails the writes it is told to fail.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Result};
use lb_common::{Backend, ServiceKey, ServiceValue, MAGLEV_M, RINGS_PER_SERVICE};

use crate::mapset::MapSet;
use crate::model::Member;

/// The maps a write goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Services,
    Backends,
    BackendStats,
    ServiceStats,
    Rings,
    Members,
}

/// One successful write, in the order it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Service {
        port: u16,
        /// The ring (slot * RINGS_PER_SERVICE + generation) it points at.
        ring: u32,
        count: u32,
    },
    RemoveService {
        port: u16,
    },
    Backend {
        id: u32,
        state: u8,
    },
    RemoveBackend {
        id: u32,
    },
    BackendStats {
        id: u32,
    },
    RemoveBackendStats {
        id: u32,
    },
    ServiceStats {
        slot: u32,
    },
    /// The ring (slot * RINGS_PER_SERVICE + generation) written.
    Ring {
        ring: u32,
    },
}

/// What a test sees of the maps: everything the datapath reads. The idle
/// ring generations are left out on purpose: nothing reads them, and every
/// change writes its generation whole before pointing a service at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content {
    pub services: BTreeMap<(u16, u8), ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub backend_stats: BTreeSet<u32>,
    /// The live ring of each service, by port and protocol.
    pub live_rings: BTreeMap<(u16, u8), Vec<u32>>,
}

#[derive(Default)]
pub struct FakeMaps {
    pub max_services: u32,
    /// Each table's room, as `Limits::table_size`.
    pub table_size: u32,
    pub max_backends: u32,
    services: BTreeMap<([u8; 16], u16, u8), ServiceValue>,
    backends: BTreeMap<u32, Backend>,
    backend_stats: BTreeSet<u32>,
    rings: Vec<u32>,
    /// PREFILTER, of `lb_common::PREFILTER_MIN_BITS` bits.
    pub prefilter: Vec<u32>,
    /// As written by `prefilter_enable`.
    pub prefilter_on: u32,
    pub members: BTreeSet<Member>,
    /// Backend ids named by "conntrack", for adoption.
    pub conntrack_backends: Vec<u32>,
    pub log: Vec<Write>,
    /// Write attempts so far, failed ones included.
    pub attempts: usize,
    /// Fail the write attempt with this (0-based) number.
    pub fail_attempt: Option<usize>,
    /// Fail every write to this map.
    pub fail_map: Option<MapKind>,
}

fn key_of(k: &ServiceKey) -> ([u8; 16], u16, u8) {
    (k.addr, u16::from_be(k.port), k.proto)
}

impl FakeMaps {
    pub fn new(max_services: u32, max_backends: u32) -> FakeMaps {
        FakeMaps {
            max_services,
            max_backends,
            table_size: MAGLEV_M,
            rings: vec![0; (max_services * RINGS_PER_SERVICE * MAGLEV_M) as usize],
            prefilter: vec![0; (1 << lb_common::PREFILTER_MIN_BITS) / 32],
            ..Default::default()
        }
    }

    /// Counts an attempt and fails it if told to.
    fn attempt(&mut self, map: MapKind) -> Result<()> {
        let n = self.attempts;
        self.attempts += 1;
        if self.fail_attempt == Some(n) {
            bail!("injected failure of write {n} ({map:?})");
        }
        if self.fail_map == Some(map) {
            bail!("injected failure of writes to {map:?}");
        }
        Ok(())
    }

    /// The table a service entry points at.
    pub fn table(&self, value: &ServiceValue) -> &[u32] {
        let start = value.ring as usize;
        &self.rings[start..start + value.ring_size as usize]
    }

    pub fn content(&self) -> Content {
        let by_port = |(k, _): (&([u8; 16], u16, u8), &ServiceValue)| (k.1, k.2);
        Content {
            services: self.services.iter().map(|e| (by_port(e), *e.1)).collect(),
            backends: self.backends.clone(),
            backend_stats: self.backend_stats.clone(),
            live_rings: self
                .services
                .iter()
                .map(|e| (by_port(e), self.table(e.1).to_vec()))
                .collect(),
        }
    }

    pub fn service(&self, port: u16) -> Option<ServiceValue> {
        self.services
            .iter()
            .find(|(k, _)| k.1 == port)
            .map(|(_, v)| *v)
    }

    pub fn backend(&self, id: u32) -> Option<Backend> {
        self.backends.get(&id).copied()
    }

    /// Puts entries in place as an earlier lbd would have, unlogged.
    pub fn preload_service(&mut self, key: &ServiceKey, value: ServiceValue) {
        self.services.insert(key_of(key), value);
    }

    pub fn preload_backend(&mut self, id: u32, value: Backend) {
        self.backends.insert(id, value);
        self.backend_stats.insert(id);
    }

    pub fn preload_ring(&mut self, ring: u32, ids: &[u32]) {
        let start = (ring * self.table_size) as usize;
        self.rings[start..start + ids.len()].copy_from_slice(ids);
    }
}

impl MapSet for FakeMaps {
    fn max_services(&self) -> u32 {
        self.max_services
    }

    fn table_size(&self) -> u32 {
        self.table_size
    }

    fn service_insert(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.attempt(MapKind::Services)?;
        let k = key_of(key);
        if !self.services.contains_key(&k) && self.services.len() >= self.max_services as usize {
            bail!("SERVICES is full");
        }
        self.services.insert(k, *value);
        self.log.push(Write::Service {
            port: k.1,
            ring: value.ring / self.table_size,
            count: value.backend_count,
        });
        Ok(())
    }

    fn service_remove(&mut self, key: &ServiceKey) -> Result<()> {
        self.attempt(MapKind::Services)?;
        let k = key_of(key);
        self.services.remove(&k);
        self.log.push(Write::RemoveService { port: k.1 });
        Ok(())
    }

    fn backend_insert(&mut self, id: u32, value: &Backend) -> Result<()> {
        self.attempt(MapKind::Backends)?;
        if !self.backends.contains_key(&id) && self.backends.len() >= self.max_backends as usize {
            bail!("BACKENDS is full");
        }
        self.backends.insert(id, *value);
        self.log.push(Write::Backend {
            id,
            state: value.state,
        });
        Ok(())
    }

    fn backend_remove(&mut self, id: u32) -> Result<()> {
        self.attempt(MapKind::Backends)?;
        self.backends.remove(&id);
        self.log.push(Write::RemoveBackend { id });
        Ok(())
    }

    fn backend_stats_zero(&mut self, id: u32) -> Result<()> {
        self.attempt(MapKind::BackendStats)?;
        if !self.backend_stats.contains(&id)
            && self.backend_stats.len() >= self.max_backends as usize
        {
            bail!("BACKEND_STATS is full");
        }
        self.backend_stats.insert(id);
        self.log.push(Write::BackendStats { id });
        Ok(())
    }

    fn backend_stats_remove(&mut self, id: u32) -> Result<()> {
        self.attempt(MapKind::BackendStats)?;
        self.backend_stats.remove(&id);
        self.log.push(Write::RemoveBackendStats { id });
        Ok(())
    }

    fn service_stats_zero(&mut self, slot: u32) -> Result<()> {
        self.attempt(MapKind::ServiceStats)?;
        if slot >= self.max_services {
            bail!("service slot {slot} out of range");
        }
        self.log.push(Write::ServiceStats { slot });
        Ok(())
    }

    fn ring_write(&mut self, start: usize, ids: &[u32]) -> Result<()> {
        self.attempt(MapKind::Rings)?;
        let end = start + ids.len();
        if end > self.rings.len() {
            bail!("ring write past the end");
        }
        self.rings[start..end].copy_from_slice(ids);
        self.log.push(Write::Ring {
            ring: (start / self.table_size as usize) as u32,
        });
        Ok(())
    }

    // Not counted as attempts: the rollback tests number the writes of
    // services, backends and rings, which these do not change.
    fn prefilter_bits(&self) -> u32 {
        (self.prefilter.len() * 32).trailing_zeros()
    }

    fn prefilter_write(&mut self, words: &[u32]) -> Result<()> {
        if words.len() != self.prefilter.len() {
            bail!("prefilter write of the wrong size");
        }
        self.prefilter.copy_from_slice(words);
        Ok(())
    }

    fn prefilter_enable(&mut self, bits: u32) -> Result<()> {
        self.prefilter_on = bits;
        Ok(())
    }

    fn services(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.services
            .iter()
            .map(|((addr, port, proto), v)| {
                (
                    ServiceKey {
                        addr: *addr,
                        port: port.to_be(),
                        proto: *proto,
                        _pad: 0,
                    },
                    *v,
                )
            })
            .collect()
    }

    fn backends(&self) -> Vec<(u32, Backend)> {
        self.backends.iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn max_conntrack_backend(&self) -> u32 {
        self.conntrack_backends.iter().copied().max().unwrap_or(0)
    }

    fn member_insert(&mut self, member: &Member) -> Result<()> {
        self.attempt(MapKind::Members)?;
        self.members.insert(*member);
        Ok(())
    }

    fn member_remove(&mut self, member: &Member) -> Result<()> {
        self.attempt(MapKind::Members)?;
        self.members.remove(member);
        Ok(())
    }

    fn members(&self) -> Vec<Member> {
        self.members.iter().copied().collect()
    }
}
