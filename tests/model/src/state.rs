//! The maps a packet can read or write, as plain hash maps of the
//! lb-common types, and what one packet did.

use std::collections::HashMap;

use lb_common::{
    global, AffinityEntry, AffinityKey, Backend, Config, CtEntry, FlowKey, ServiceKey,
    ServiceValue, TrafficStats, MAGLEV_M_MAX,
};

use crate::fib::Fib;

pub const TC_ACT_UNSPEC: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// The two conntrack maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Conntrack,
    Pending,
}

#[derive(Clone, Debug)]
pub struct ModelState {
    pub config: Config,
    pub services: HashMap<ServiceKey, ServiceValue>,
    pub backends: HashMap<u32, Backend>,
    /// RINGS by ring number; a ring never written reads as zeros.
    pub rings: HashMap<u32, Vec<u32>>,
    /// PREFILTER's words; empty when there is none.
    pub prefilter: Vec<u32>,
    pub affinity: HashMap<AffinityKey, AffinityEntry>,
    pub conntrack: HashMap<FlowKey, CtEntry>,
    pub ct_pending: HashMap<FlowKey, CtEntry>,
    pub global: [u64; global::COUNT as usize],
    /// SERVICE_STATS by slot (an array: every slot exists).
    pub service_stats: HashMap<u32, TrafficStats>,
    /// BACKEND_STATS: only backends the reconciler created have an entry.
    pub backend_stats: HashMap<u32, TrafficStats>,
    pub fib: Fib,
}

impl ModelState {
    pub fn new(config: Config, fib: Fib) -> ModelState {
        ModelState {
            config,
            services: HashMap::new(),
            backends: HashMap::new(),
            rings: HashMap::new(),
            prefilter: Vec::new(),
            affinity: HashMap::new(),
            conntrack: HashMap::new(),
            ct_pending: HashMap::new(),
            global: [0; global::COUNT as usize],
            service_stats: HashMap::new(),
            backend_stats: HashMap::new(),
            fib,
        }
    }

    pub fn table(&self, t: Table) -> &HashMap<FlowKey, CtEntry> {
        match t {
            Table::Conntrack => &self.conntrack,
            Table::Pending => &self.ct_pending,
        }
    }

    pub fn table_mut(&mut self, t: Table) -> &mut HashMap<FlowKey, CtEntry> {
        match t {
            Table::Conntrack => &mut self.conntrack,
            Table::Pending => &mut self.ct_pending,
        }
    }

    pub fn ring_entry(&self, ring: u32, slot: u32) -> u32 {
        self.rings
            .get(&ring)
            .and_then(|r| r.get(slot as usize).copied())
            .unwrap_or(0)
    }

    pub fn set_ring(&mut self, ring: u32, ids: Vec<u32>) {
        assert!(ids.len() <= MAGLEV_M_MAX as usize);
        self.rings.insert(ring, ids);
    }

    /// Whether the prefilter may know (`addr`, `port`, as stored in a
    /// key): false only when its bit is clear in a prefilter in force.
    pub fn prefilter_holds(&self, addr: &[u8; 16], port: u16) -> bool {
        let bits = self.config.prefilter_bits;
        if !(lb_common::PREFILTER_MIN_BITS..=lb_common::PREFILTER_MAX_BITS).contains(&bits) {
            return true;
        }
        let bit = crate::hash::prefilter_bit(addr, port, bits) as usize;
        self.prefilter
            .get(bit / 32)
            .is_none_or(|w| w & (1 << (bit % 32)) != 0)
    }

    pub fn count(&mut self, index: u32) {
        self.global[index as usize] += 1;
    }
}

/// Where a packet came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ingress {
    pub ifindex: u32,
}

/// Which rule of the contract decided a packet: for reports and for
/// grouping mismatches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Path {
    NotIp,
    Malformed,
    Fragment,
    Other,
    /// TCP/UDP for no frontend and from no backend, by the prefilter.
    Prefiltered,
    /// TCP/UDP with no live entry and no service.
    NoService,
    NoBackend,
    NewFlow,
    Known,
    Reply,
    SnatExhausted,
    Collision,
    IcmpNoEntry,
    IcmpTranslated,
}

/// What the forwarding step (section 6) did with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Forwarding {
    /// Not reached (the packet was decided before section 6).
    None,
    Redirected,
    TimeExceededSent,
    TooBigSent,
    TooBigDropped,
    NotForwarded,
    /// An ICMP error that could not be forwarded passes untranslated.
    IcmpPassed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub action: u32,
    /// The frame after the program (the input itself unless changed).
    pub packet: Vec<u8>,
    pub path: Path,
    pub forwarding: Forwarding,
    /// Conntrack keys written or deleted, by table.
    pub ct_touched: Vec<(Table, FlowKey)>,
    /// Conntrack keys looked up (in both tables).
    pub ct_read: Vec<FlowKey>,
    /// Affinity entries read or written.
    pub affinity_touched: Vec<AffinityKey>,
}

impl Outcome {
    pub fn new(packet: &[u8]) -> Outcome {
        Outcome {
            action: TC_ACT_UNSPEC,
            packet: packet.to_vec(),
            path: Path::Other,
            forwarding: Forwarding::None,
            ct_touched: Vec::new(),
            ct_read: Vec::new(),
            affinity_touched: Vec::new(),
        }
    }
}

pub fn action_name(action: u32) -> &'static str {
    match action {
        TC_ACT_UNSPEC => "UNSPEC",
        0 => "OK",
        TC_ACT_SHOT => "SHOT",
        TC_ACT_REDIRECT => "REDIRECT",
        _ => "?",
    }
}
