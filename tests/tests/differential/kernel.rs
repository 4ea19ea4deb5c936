//! The real datapath: the program loaded by lbd's loader, services written
//! by lbd's reconciler, packets run through BPF_PROG_TEST_RUN, and handles
//! on every map the program uses.

use std::collections::HashMap as StdHashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use aya::maps::{Array, HashMap, Map, MapData, MapInfo, PerCpuArray, PerCpuHashMap};
use lb_common::{
    global, maps, AffinityEntry, AffinityKey, Backend, Config, CtEntry, FlowKey, ServiceKey,
    ServiceValue, TrafficStats,
};
use lb_model::{ModelState, Table};
use lb_tests::fixture::without_hop;
use lb_userspace::datapath::{Datapath, Limits};
use lb_userspace::reconciler::Reconciler;

/// What one run of the program gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Run {
    Ran {
        action: u32,
        packet: Vec<u8>,
    },
    /// With CHECKSUM_COMPLETE: the program ran (its map writes stand) but
    /// left skb->csum inconsistent with the packet.
    BadChecksumComplete,
    /// The kernel refused the input before running the program.
    Refused(i32),
}

/// An action no program returns: the XDP program passed a frame on to the
/// TC program, but changed.
pub const XDP_PASSED_CHANGED: u32 = 0xdead_0002;

pub struct Kernel {
    /// Owns the program `prog_fd` refers to.
    _datapath: Datapath,
    pub reconciler: Reconciler,
    prog_fd: RawFd,
    /// The XDP fast path, which runs first on a share of the packets.
    xdp_fd: RawFd,
    /// Packets the XDP program translated itself.
    pub xdp_translated: u64,
    conntrack: HashMap<MapData, FlowKey, CtEntry>,
    pending: HashMap<MapData, FlowKey, CtEntry>,
    affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    config: Array<MapData, Config>,
    global: PerCpuArray<MapData, u64>,
    service_stats: PerCpuArray<MapData, TrafficStats>,
    backend_stats: PerCpuHashMap<MapData, u32, TrafficStats>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
}

fn sum_stats(values: &[TrafficStats]) -> TrafficStats {
    values.iter().fold(TrafficStats::default(), |mut a, v| {
        a.packets += v.packets;
        a.bytes += v.bytes;
        a.new_flows += v.new_flows;
        a.reply_packets += v.reply_packets;
        a.reply_bytes += v.reply_bytes;
        a.no_backend += v.no_backend;
        a
    })
}

impl Kernel {
    /// Loads the datapath in the current network namespace.
    pub fn load(limits: Limits) -> Kernel {
        let (mut datapath, maps) = Datapath::load(None, limits).expect("load the datapath");
        let reconciler = Reconciler::new(maps).expect("reconciler");
        // Every interface here may take redirected frames, as an interface
        // lbd attached the XDP program to does.
        for i in nix::net::if_::if_nameindex().expect("interfaces").iter() {
            datapath.allow_xdp_egress(i.index()).expect("XDP_PORTS");
        }
        let xdp = datapath.xdp_program().expect("XDP program");
        let xdp_fd = xdp.fd().expect("program fd").as_fd().as_raw_fd();
        let prog = datapath.program().expect("program");
        let prog_fd = prog.fd().expect("program fd").as_fd().as_raw_fd();
        // Handles of our own on the program's maps: the reconciler owns the
        // loader's, and AFFINITY has none outside the program.
        let ids = prog
            .info()
            .expect("program info")
            .map_ids()
            .expect("map ids")
            .expect("map ids supported");
        let mut by_name: StdHashMap<String, Map> = StdHashMap::new();
        for id in ids {
            let info = MapInfo::from_id(id).expect("map info");
            let name = info.name_as_str().unwrap_or_default().to_string();
            let data = MapData::from_id(id).expect("map by id");
            by_name.insert(name, Map::from_map_data(data).expect("map type"));
        }
        let mut take = |name: &str| {
            by_name
                .remove(name)
                .unwrap_or_else(|| panic!("the program uses no map {name}"))
        };
        Kernel {
            prog_fd,
            xdp_fd,
            xdp_translated: 0,
            conntrack: take(maps::CONNTRACK).try_into().unwrap(),
            pending: take(maps::CT_PENDING).try_into().unwrap(),
            affinity: take(maps::AFFINITY).try_into().unwrap(),
            config: take(maps::CONFIG).try_into().unwrap(),
            global: take(maps::GLOBAL_STATS).try_into().unwrap(),
            service_stats: take(maps::SERVICE_STATS).try_into().unwrap(),
            backend_stats: take(maps::BACKEND_STATS).try_into().unwrap(),
            services: take(maps::SERVICES).try_into().unwrap(),
            backends: take(maps::BACKENDS).try_into().unwrap(),
            _datapath: datapath,
            reconciler,
        }
    }

    /// Runs the program on `frame` as arriving on `ifindex`.
    pub fn run(&self, frame: &[u8], ifindex: u32, csum_complete: bool) -> Run {
        let ctx = lb_tests::fixture::skb_context(ifindex, 0, 0);
        match lb_tests::fixture::test_run(self.prog_fd, frame, &ctx, csum_complete) {
            Ok((action, packet)) => Run::Ran { action, packet },
            Err(e) if e.raw_os_error() == Some(libc::EBADMSG) => Run::BadChecksumComplete,
            Err(e) => Run::Refused(e.raw_os_error().unwrap_or(0)),
        }
    }

    /// Runs `frame` as a node with the XDP fast path does: through the XDP
    /// program, and through the TC program when XDP passes it on. The
    /// result is in the TC program's terms (an XDP redirect is a TC
    /// redirect), which the model's must equal. A frame the XDP harness
    /// refuses (too big for one page) goes to TC alone.
    pub fn run_xdp_first(&mut self, frame: &[u8], ifindex: u32) -> Run {
        use lb_tests::fixture::{TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, XDP_REDIRECT};
        let ctx = lb_tests::fixture::xdp_context(ifindex, frame.len());
        match lb_tests::fixture::test_run(self.xdp_fd, frame, &ctx, false) {
            Ok((XDP_REDIRECT, packet)) => {
                self.xdp_translated += 1;
                Run::Ran {
                    action: TC_ACT_REDIRECT,
                    packet,
                }
            }
            Ok((XDP_DROP, packet)) => Run::Ran {
                action: TC_ACT_SHOT,
                packet,
            },
            Ok((XDP_PASS, packet)) if packet != frame => Run::Ran {
                action: XDP_PASSED_CHANGED,
                packet,
            },
            Ok((XDP_PASS, _)) | Err(_) => self.run(frame, ifindex, false),
            Ok((action, packet)) => Run::Ran { action, packet },
        }
    }

    pub fn config(&self) -> Config {
        self.config.get(&0, 0).expect("read CONFIG")
    }

    pub fn set_config(&mut self, c: &Config) {
        self.config.set(0, *c, 0).expect("write CONFIG");
    }

    fn table(&self, t: Table) -> &HashMap<MapData, FlowKey, CtEntry> {
        match t {
            Table::Conntrack => &self.conntrack,
            Table::Pending => &self.pending,
        }
    }

    /// Entries are read without their next hop (see `without_hop`).
    pub fn ct(&self, t: Table, key: &FlowKey) -> Option<CtEntry> {
        self.table(t).get(key, 0).ok().map(without_hop)
    }

    pub fn ct_dump(&self, t: Table) -> StdHashMap<FlowKey, CtEntry> {
        self.table(t)
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, e)| (k, without_hop(e)))
            .collect()
    }

    /// Deletes a conntrack entry, as lbd's garbage collector or an LRU
    /// eviction would.
    pub fn ct_remove(&mut self, t: Table, key: &FlowKey) {
        let map = match t {
            Table::Conntrack => &mut self.conntrack,
            Table::Pending => &mut self.pending,
        };
        let _ = map.remove(key);
    }

    pub fn affinity(&self, key: &AffinityKey) -> Option<AffinityEntry> {
        self.affinity.get(key, 0).ok()
    }

    pub fn affinity_dump(&self) -> StdHashMap<AffinityKey, AffinityEntry> {
        self.affinity.iter().filter_map(|r| r.ok()).collect()
    }

    pub fn globals(&self) -> [u64; global::COUNT as usize] {
        let mut g = [0u64; global::COUNT as usize];
        for (i, v) in g.iter_mut().enumerate() {
            *v = self
                .global
                .get(&(i as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
        }
        g
    }

    /// Per-service counters of the slots in use, summed over CPUs.
    pub fn service_stats(&self, slots: impl Iterator<Item = u32>) -> StdHashMap<u32, TrafficStats> {
        slots
            .filter_map(|s| {
                let v = self.service_stats.get(&s, 0).ok()?;
                Some((s, sum_stats(&v)))
            })
            .collect()
    }

    pub fn backend_stats(&self) -> StdHashMap<u32, TrafficStats> {
        self.backend_stats
            .iter()
            .filter_map(|r| r.ok())
            .map(|(id, v)| (id, sum_stats(&v)))
            .collect()
    }

    /// Copies what the control plane wrote (services, backends, the rings
    /// they use) into the model: the model takes the maps as its input.
    pub fn mirror_control_plane(&self, model: &mut ModelState) {
        model.services = self.services.iter().filter_map(|r| r.ok()).collect();
        model.backends = self.backends.iter().filter_map(|r| r.ok()).collect();
        model.rings.clear();
        let rings: Vec<(u32, u32)> = model
            .services
            .values()
            .map(|v| (v.ring, v.ring_size))
            .collect();
        let memory = &self.reconciler.maps().rings;
        for (start, size) in rings {
            let ids = memory
                .read(start as usize, size as usize)
                .unwrap_or_else(|_| vec![0; size as usize]);
            model.set_ring(start, ids);
        }
        let prefilter = &self.reconciler.maps().prefilter;
        model.prefilter = prefilter.read(0, prefilter.len()).expect("read PREFILTER");
        // Every frontend and backend must pass (the model's own reading of
        // the hash): a bit missing would make a service unreachable.
        for key in model.services.keys() {
            assert!(
                model.prefilter_holds(&key.addr, key.port),
                "PREFILTER lacks frontend {key:?}"
            );
        }
        for (id, b) in &model.backends {
            assert!(
                model.prefilter_holds(&b.addr, b.port),
                "PREFILTER lacks backend {id} {b:?}"
            );
        }
    }
}
