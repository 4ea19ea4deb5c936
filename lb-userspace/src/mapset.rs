//! The operations the reconciler performs on the datapath's maps, as a
//! trait: the real maps implement it, and so does an in-memory fake with
//! injectable failures (`fake_maps`), against which the reconciler's
//! rollback is unit-tested. The reconciler is generic over it, so the real
//! path pays no indirection per write.

use anyhow::{Context as _, Result};
use aya::maps::{MapError, PerCpuValues};
use lb_common::{Backend, MemberKey, ServiceKey, ServiceValue, TrafficStats};

use crate::datapath::Maps;
use crate::model::Member;

pub trait MapSet {
    /// Capacity of SERVICES (and so the number of slots).
    fn max_services(&self) -> u32;
    /// Each Maglev table's room in RINGS, in backend ids: the largest table
    /// a service may have, and the size of those that set none.
    fn table_size(&self) -> u32;

    fn service_insert(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()>;
    /// Removing an absent entry succeeds.
    fn service_remove(&mut self, key: &ServiceKey) -> Result<()>;

    fn backend_insert(&mut self, id: u32, value: &Backend) -> Result<()>;
    /// Removing an absent entry succeeds.
    fn backend_remove(&mut self, id: u32) -> Result<()>;

    /// Creates (or resets) a backend's counters at zero.
    fn backend_stats_zero(&mut self, id: u32) -> Result<()>;
    /// Removing an absent entry succeeds.
    fn backend_stats_remove(&mut self, id: u32) -> Result<()>;

    /// Resets a service slot's counters to zero.
    fn service_stats_zero(&mut self, slot: u32) -> Result<()>;

    /// Writes `ids` into RINGS starting at id `start`.
    fn ring_write(&mut self, start: usize, ids: &[u32]) -> Result<()>;

    /// PREFILTER's size: 2^bits bits.
    fn prefilter_bits(&self) -> u32;
    /// Writes the whole of PREFILTER.
    fn prefilter_write(&mut self, words: &[u32]) -> Result<()>;
    /// Tells the datapath PREFILTER's size (CONFIG), which turns it on; 0
    /// turns it off.
    fn prefilter_enable(&mut self, bits: u32) -> Result<()>;

    /// Everything in SERVICES, for adoption at start-up.
    fn services(&self) -> Vec<(ServiceKey, ServiceValue)>;
    /// Everything in BACKENDS, for adoption at start-up.
    fn backends(&self) -> Vec<(u32, Backend)>;
    /// The highest backend id a conntrack entry names (0 if none): new ids
    /// start above it, so an old flow never lands on a stranger.
    fn max_conntrack_backend(&self) -> u32;

    fn member_insert(&mut self, member: &Member) -> Result<()>;
    /// Removing an absent entry succeeds.
    fn member_remove(&mut self, member: &Member) -> Result<()>;
    /// Everything in SOCK_MEMBERS, for adoption at start-up.
    fn members(&self) -> Vec<Member>;
}

fn member_key(m: &Member) -> MemberKey {
    MemberKey {
        netns_cookie: m.netns_cookie,
        network: m.network,
        _pad: 0,
    }
}

/// A delete of a key that is not there is not a failure: the entry is gone
/// either way, which is what every caller wants.
fn absent_ok(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        other => other,
    }
}

fn zeroes() -> Result<PerCpuValues<TrafficStats>> {
    Ok(PerCpuValues::try_from(vec![
        TrafficStats::default();
        crate::reconciler::nr_cpus()?
    ])?)
}

impl MapSet for Maps {
    fn max_services(&self) -> u32 {
        self.limits.max_services
    }

    fn table_size(&self) -> u32 {
        self.limits.table_size
    }

    fn service_insert(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.services
            .insert(key, value, 0)
            .context("the service map is full (raise --max-services)")
    }

    fn service_remove(&mut self, key: &ServiceKey) -> Result<()> {
        Ok(absent_ok(self.services.remove(key))?)
    }

    fn backend_insert(&mut self, id: u32, value: &Backend) -> Result<()> {
        self.backends
            .insert(id, value, 0)
            .context("the backend map is full (raise --max-backends)")
    }

    fn backend_remove(&mut self, id: u32) -> Result<()> {
        Ok(absent_ok(self.backends.remove(&id))?)
    }

    fn backend_stats_zero(&mut self, id: u32) -> Result<()> {
        self.backend_stats
            .insert(id, zeroes()?, 0)
            .context("the backend statistics map is full (raise --max-backends)")
    }

    fn backend_stats_remove(&mut self, id: u32) -> Result<()> {
        Ok(absent_ok(self.backend_stats.remove(&id))?)
    }

    fn service_stats_zero(&mut self, slot: u32) -> Result<()> {
        Ok(self.service_stats.set(slot, zeroes()?, 0)?)
    }

    fn ring_write(&mut self, start: usize, ids: &[u32]) -> Result<()> {
        self.rings.write(start, ids)
    }

    fn prefilter_bits(&self) -> u32 {
        (self.prefilter.len() * 32).trailing_zeros()
    }

    fn prefilter_write(&mut self, words: &[u32]) -> Result<()> {
        self.prefilter.write(0, words)
    }

    fn prefilter_enable(&mut self, bits: u32) -> Result<()> {
        let mut cfg = self.config.get(&0, 0)?;
        if cfg.prefilter_bits != bits {
            cfg.prefilter_bits = bits;
            self.config.set(0, cfg, 0)?;
        }
        Ok(())
    }

    fn services(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.services.iter().filter_map(|r| r.ok()).collect()
    }

    fn backends(&self) -> Vec<(u32, Backend)> {
        self.backends.iter().filter_map(|r| r.ok()).collect()
    }

    fn max_conntrack_backend(&self) -> u32 {
        self.conntrack
            .iter()
            .filter_map(|r| r.ok())
            .map(|(_, v)| v.backend_id)
            .max()
            .unwrap_or(0)
    }

    fn member_insert(&mut self, member: &Member) -> Result<()> {
        self.members
            .insert(member_key(member), 1, 0)
            .context("the network membership map is full")
    }

    fn member_remove(&mut self, member: &Member) -> Result<()> {
        Ok(absent_ok(self.members.remove(&member_key(member)))?)
    }

    fn members(&self) -> Vec<Member> {
        self.members
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| Member {
                netns_cookie: k.netns_cookie,
                network: k.network,
            })
            .collect()
    }
}
