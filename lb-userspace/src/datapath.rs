//! Loading the eBPF object, its maps and its attachments.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::datapath_log::DatapathLog;
use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{Array, DevMapHash, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::cgroup_sock_addr::CgroupSockAddrLink;
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{
    self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType, TcHandle,
};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, Program, ProgramError, SchedClassifier, Xdp, XdpMode,
};
use aya::{Ebpf, EbpfLoader};
use lb_common::{
    maps, progs, Backend, Config, CtEntry, FlowKey, MemberKey, ServiceKey, ServiceValue,
    TrafficStats, MAGLEV_M, RINGS_PER_SERVICE, RING_IDS_PER_ENTRY,
};

/// The datapath object, built by build.rs from the lb-ebpf crate.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Capacities of the maps, fixed when the maps are created.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_services: u32,
    pub max_backends: u32,
    pub max_flows: u32,
    /// The Maglev table size of the services that set none, and the
    /// largest any may set: each table's room in RINGS.
    pub table_size: u32,
}

impl Limits {
    /// The prefilter's size, 2^bits bits: at least eight per frontend and
    /// backend these limits hold, so that few addresses share a bit.
    pub fn prefilter_bits(&self) -> u32 {
        let held = (self.max_services as u64 + self.max_backends as u64).max(1);
        let bits = 64 - (held - 1).leading_zeros() + 3;
        bits.clamp(lb_common::PREFILTER_MIN_BITS, lb_common::PREFILTER_MAX_BITS)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_services: lb_common::DEFAULT_MAX_SERVICES,
            max_backends: lb_common::DEFAULT_MAX_BACKENDS,
            max_flows: lb_common::DEFAULT_MAX_FLOWS,
            table_size: MAGLEV_M,
        }
    }
}

/// Typed handles on every map. Owned by the reconciler: it is their only writer.
pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub rings: WordArray,
    pub prefilter: WordArray,
    /// Confirmed connections, both halves of each.
    pub conntrack: HashMap<MapData, FlowKey, CtEntry>,
    /// Connections not confirmed yet, both halves of each.
    pub ct_pending: HashMap<MapData, FlowKey, CtEntry>,
    /// The datapath's settings: timeouts, SNAT ports, its clock.
    pub config: Array<MapData, Config>,
    pub service_stats: PerCpuArray<MapData, TrafficStats>,
    pub backend_stats: PerCpuHashMap<MapData, u32, TrafficStats>,
    pub global_stats: PerCpuArray<MapData, u64>,
    /// The XDP program's own counters (`lb_common::xdp_stat`).
    pub xdp_stats: PerCpuArray<MapData, u64>,
    /// Which network namespaces belong to which networks (FLAG_SOCKET).
    pub members: HashMap<MapData, MemberKey, u8>,
    pub limits: Limits,
}

/// The loaded program and where it is attached.
pub struct Datapath {
    programs: Programs,
    pin_dir: Option<PathBuf>,
    links: BTreeMap<String, Attachment<SchedClassifierLink>>,
    /// Other namespaces attached in, by tag: the namespace's inode.
    netns: BTreeMap<String, u64>,
    /// The socket programs' attachments to a cgroup, by program name.
    sockets: BTreeMap<&'static str, Attachment<CgroupSockAddrLink>>,
    tc_attach: TcAttach,
    /// The XDP fast path's attachments, by interface: the link and the
    /// interface's index. Owned: they go when lbd exits, and the TC program,
    /// which is attached to the same interfaces, carries their traffic.
    xdp: BTreeMap<String, (XdpLinkId, u32)>,
    /// XDP_PORTS: the interfaces the XDP program may redirect to.
    xdp_ports: DevMapHash<MapData>,
    /// PEER_PORTS: veths into local containers, by ifindex, and what lbd
    /// last wrote there.
    peer_ports: HashMap<MapData, u32, [u8; 6]>,
    peer_ports_written: BTreeMap<u32, [u8; 6]>,
}

/// The object's programs. The kernel verifies them on a thread of their
/// own, so that the caller can program the maps meanwhile (at 10,000
/// services each takes about half a second); the first use waits.
enum Programs {
    Verifying(Verifier),
    Loaded(Loaded),
    /// Why the kernel rejected the datapath program.
    Rejected(String),
}

struct Loaded {
    ebpf: Ebpf,
    /// Whether the kernel took the socket programs, and if not why.
    sockets: Result<(), String>,
    /// The same for the XDP program.
    xdp: Result<(), String>,
}

/// The thread loading the programs; joined when dropped, so that none
/// outlives the datapath it loads for.
struct Verifier(Option<std::thread::JoinHandle<Result<Loaded, String>>>);

impl Drop for Verifier {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            let _ = handle.join();
        }
    }
}

impl Programs {
    /// Loads the programs of `ebpf` on another thread. `held` keeps every
    /// map the instructions name open until the kernel has taken the
    /// programs: a map dropped meanwhile would free its descriptor number
    /// for another file, and a program would then name that.
    fn verify(mut ebpf: Ebpf, held: Vec<OwnedFd>) -> Result<Programs> {
        let handle = std::thread::Builder::new()
            .name("lbd-verifier".into())
            .spawn(move || {
                let started = Instant::now();
                let tc = load_tc_program(&mut ebpf);
                let sockets = load_socket_programs(&mut ebpf).map_err(|e| format!("{e:#}"));
                let xdp = program_of::<Xdp>(&mut ebpf, progs::XDP_INGRESS)
                    .and_then(|p| Ok(p.load()?))
                    .map_err(|e| format!("the kernel rejected the XDP program: {e:#}"));
                drop(held);
                log::debug!(
                    "the kernel verified the programs in {:?}",
                    started.elapsed()
                );
                tc.map_err(|e| format!("{e:#}"))?;
                Ok(Loaded { ebpf, sockets, xdp })
            })
            .context("starting the thread that loads the programs")?;
        Ok(Programs::Verifying(Verifier(Some(handle))))
    }

    fn loaded(&mut self) -> Result<&mut Loaded> {
        if let Programs::Verifying(Verifier(handle)) = self {
            *self = match handle.take().map(std::thread::JoinHandle::join) {
                Some(Ok(Ok(loaded))) => Programs::Loaded(loaded),
                Some(Ok(Err(e))) => Programs::Rejected(e),
                _ => Programs::Rejected("the thread loading the programs panicked".into()),
            };
        }
        match self {
            Programs::Loaded(loaded) => Ok(loaded),
            Programs::Rejected(e) => Err(anyhow!("{e}")),
            Programs::Verifying(_) => unreachable!("joined above"),
        }
    }
}

/// How the TC program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcAttach {
    /// A TCX link (Linux 6.6 and later): pinned in the pin directory, and
    /// replaced atomically by the next lbd through its pin.
    Tcx,
    /// A cls_bpf filter on the clsact qdisc, set by netlink (any kernel).
    /// The filter itself holds the program, so it outlives lbd without a
    /// pin; the next lbd replaces its program in place, found by the
    /// filter's priority and handle, which are lbd's own.
    Netlink,
}

/// The netlink filter's priority and handle. Fixed, so that a restarted
/// lbd or `lbd --cleanup` finds the filter without a record, and unusual,
/// so that they do not meet another program's filter ("LB").
const NETLINK_PRIORITY: u16 = 0x4c42;
const NETLINK_HANDLE: u32 = 0x4c42;

impl TcAttach {
    /// `choice` is lbd's `--tc-attach`: `tcx`, `netlink`, or `auto`, which
    /// takes TCX where the running kernel has it.
    pub fn choose(choice: &str) -> Result<TcAttach> {
        match choice {
            "tcx" => Ok(TcAttach::Tcx),
            "netlink" => Ok(TcAttach::Netlink),
            "auto" => {
                use aya::util::KernelVersion;
                let kernel = KernelVersion::current()
                    .map_err(|e| anyhow!("reading the kernel version: {e}"))?;
                // TCX links arrived in Linux 6.6.
                Ok(if kernel >= KernelVersion::new(6, 6, 0) {
                    TcAttach::Tcx
                } else {
                    TcAttach::Netlink
                })
            }
            other => bail!("unknown TC attach mode {other:?}: auto, tcx or netlink"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TcAttach::Tcx => "tcx",
            TcAttach::Netlink => "netlink",
        }
    }
}

/// Removes lbd's netlink filter from every interface of the calling
/// thread's network namespace (`lbd --cleanup`: TCX links go with their
/// pins, netlink filters must be taken off). Returns the interfaces it was
/// on.
pub fn remove_netlink_filters() -> Vec<String> {
    let Ok(interfaces) = nix::net::if_::if_nameindex() else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for name in interfaces.iter().filter_map(|i| i.name().to_str().ok()) {
        if let Ok(link) = netlink_link(name) {
            // Detaching a filter that is not there fails: nothing to do.
            if aya::programs::Link::detach(link).is_ok() {
                removed.push(name.to_string());
            }
        }
    }
    removed
}

/// [`remove_netlink_filters`] inside the network namespace at `path`.
pub fn remove_netlink_filters_in(path: &Path) -> Result<Vec<String>> {
    let target =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    in_netns(&target, path, remove_netlink_filters)
}

/// Runs `f` with the calling thread in the network namespace `target`
/// (opened from `path`), and brings the thread back whatever `f` did.
fn in_netns<T>(target: &std::fs::File, path: &Path, f: impl FnOnce() -> T) -> Result<T> {
    let own = std::fs::File::open("/proc/thread-self/ns/net")?;
    nix::sched::setns(target, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering {}", path.display()))?;
    let result = f();
    nix::sched::setns(&own, nix::sched::CloneFlags::CLONE_NEWNET)
        .context("returning to lbd's network namespace")?;
    Ok(result)
}

/// lbd's netlink filter on `ifname`, whether or not it is there.
fn netlink_link(ifname: &str) -> std::io::Result<SchedClassifierLink> {
    SchedClassifierLink::attached(
        ifname,
        TcAttachType::Ingress,
        NETLINK_PRIORITY,
        TcHandle::from(NETLINK_HANDLE),
        None,
    )
}

/// The socket programs (FLAG_SOCKET services), see lb-ebpf's sock.rs.
pub const SOCKET_PROGRAMS: [&str; 8] = [
    progs::SOCK_CONNECT4,
    progs::SOCK_SENDMSG4,
    progs::SOCK_RECVMSG4,
    progs::SOCK_GETPEERNAME4,
    progs::SOCK_CONNECT6,
    progs::SOCK_SENDMSG6,
    progs::SOCK_RECVMSG6,
    progs::SOCK_GETPEERNAME6,
];

/// A program's attachment: pinned when lbd has a pin directory, so that it
/// outlives lbd; otherwise owned, and gone with lbd.
enum Attachment<L> {
    Owned(L),
    Pinned(PinnedLink),
    /// Held by the kernel itself (a netlink TC filter): stays when lbd
    /// exits, unless detached.
    Kernel(L),
}

impl<L: TryInto<FdLink, Error = LinkError>> Attachment<L> {
    /// Keeps `link`, pinned at `pin` if there is one. What an earlier lbd
    /// pinned there is unpinned first, which drops its last reference and
    /// so detaches it. `linkless` says why a kernel may refuse the pin.
    fn keep(link: L, pin: Option<PathBuf>, linkless: &'static str) -> Result<Self> {
        let Some(path) = pin else {
            return Ok(Attachment::Owned(link));
        };
        let _ = std::fs::remove_file(&path);
        let fd: FdLink = link.try_into().context(linkless)?;
        Ok(Attachment::Pinned(fd.pin(&path)?))
    }
}

impl<L> Attachment<L> {
    /// Detaches: unpinning drops the last reference; an owned link goes
    /// when dropped.
    fn detach(self, name: &str) {
        if let Attachment::Pinned(p) = self {
            if let Err(e) = p.unpin() {
                log::warn!("unpinning the link of {name}: {e}");
            }
        }
    }

    /// Leaves the attachment in place when lbd exits: a pinned link stays
    /// through its pin, a kernel-held one by itself; an owned one goes.
    fn stay(self) {
        if let Attachment::Kernel(link) = self {
            // A netlink link is only the filter's address (no descriptor):
            // forgetting it skips the detach its drop would do, nothing else.
            std::mem::forget(link);
        }
    }
}

/// The maps lbd pins, by name.
pub const MAP_NAMES: [&str; 13] = [
    maps::AFFINITY,
    maps::SOCK_MEMBERS,
    maps::SOCK_REVNAT,
    maps::PREFILTER,
    maps::SERVICES,
    maps::BACKENDS,
    maps::RINGS,
    maps::CONNTRACK,
    maps::CT_PENDING,
    maps::CONFIG,
    maps::SERVICE_STATS,
    maps::BACKEND_STATS,
    maps::GLOBAL_STATS,
];

/// Every name lbd pins directly in its pin directory.
pub fn pinned_names() -> Vec<&'static str> {
    let mut names = MAP_NAMES.to_vec();
    names.push(maps::LAYOUT);
    names
}

/// The maps' sizes under `limits` (those not listed keep the object's).
fn max_entries(limits: Limits) -> Result<Vec<(&'static str, u32)>> {
    let ring_entries = limits
        .max_services
        .checked_mul(RINGS_PER_SERVICE)
        .and_then(|r| r.checked_mul(limits.table_size))
        .ok_or_else(|| anyhow!("too many services for the ring map"))?
        .div_ceil(RING_IDS_PER_ENTRY);
    let flows2 = limits
        .max_flows
        .checked_mul(2)
        .ok_or_else(|| anyhow!("--max-flows too large"))?;
    Ok(vec![
        (maps::SERVICES, limits.max_services),
        (maps::SERVICE_STATS, limits.max_services),
        (maps::RINGS, ring_entries),
        (maps::BACKENDS, limits.max_backends),
        (maps::BACKEND_STATS, limits.max_backends),
        (maps::CONNTRACK, flows2),
        (maps::CT_PENDING, limits.max_flows),
        (maps::AFFINITY, limits.max_flows),
        (maps::SOCK_REVNAT, limits.max_flows),
        (maps::PREFILTER, (1 << limits.prefilter_bits()) / 64),
    ])
}

impl Datapath {
    /// Loads the object. With a pin directory, every map is pinned there by
    /// name, and maps already pinned there (from an earlier lbd) are reused,
    /// so conntrack survives a restart.
    pub fn load(pin_dir: Option<&Path>, limits: Limits) -> Result<(Datapath, Maps)> {
        Self::load_with_log(pin_dir, limits, DatapathLog::Off)
    }

    /// [`Self::load`], with the datapath reporting its rare events at `log`
    /// and above (see datapath_log.rs; drain them with [`Self::logger`]).
    pub fn load_with_log(
        pin_dir: Option<&Path>,
        limits: Limits,
        log: DatapathLog,
    ) -> Result<(Datapath, Maps)> {
        let level = log.global();
        let sizes = max_entries(limits)?;
        let mut loader = EbpfLoader::new();
        loader.override_global(aya_log::LEVEL, &level, true);
        for (name, entries) in &sizes {
            loader.map_max_entries(name, *entries);
        }
        if let Some(dir) = pin_dir {
            crate::pins::prepare(dir)?;
            let shapes = crate::layout::expected(EBPF_OBJECT, &MAP_NAMES, &sizes)?;
            crate::layout::check_or_record(dir, &shapes, limits)?;
            for name in MAP_NAMES {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let started = Instant::now();
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        log::debug!("created the maps in {:?}", started.elapsed());
        let held = hold_maps(&ebpf)?;
        let maps = Maps {
            services: take(&mut ebpf, maps::SERVICES)?,
            backends: take(&mut ebpf, maps::BACKENDS)?,
            rings: WordArray::map(&mut ebpf, maps::RINGS, RING_IDS_PER_ENTRY as usize)?,
            prefilter: WordArray::map(&mut ebpf, maps::PREFILTER, 2)?,
            conntrack: take(&mut ebpf, maps::CONNTRACK)?,
            ct_pending: take(&mut ebpf, maps::CT_PENDING)?,
            config: take(&mut ebpf, maps::CONFIG)?,
            service_stats: take(&mut ebpf, maps::SERVICE_STATS)?,
            backend_stats: take(&mut ebpf, maps::BACKEND_STATS)?,
            global_stats: take(&mut ebpf, maps::GLOBAL_STATS)?,
            xdp_stats: take(&mut ebpf, maps::XDP_STATS)?,
            members: take(&mut ebpf, maps::SOCK_MEMBERS)?,
            limits,
        };
        let mut maps = maps;
        // A fresh CONFIG is all zeroes, under which every connection would
        // expire at once; one adopted from pins keeps what lbd last wrote.
        if maps.config.get(&0, 0).map(|c| c.timeout_tcp_ns == 0)? {
            maps.config.set(0, Config::default(), 0)?;
        }
        let xdp_ports = take(&mut ebpf, maps::XDP_PORTS)?;
        let peer_ports = take(&mut ebpf, maps::PEER_PORTS)?;
        let datapath = Datapath {
            programs: Programs::verify(ebpf, held)?,
            xdp: BTreeMap::new(),
            xdp_ports,
            peer_ports,
            peer_ports_written: BTreeMap::new(),
            pin_dir: pin_dir.map(Path::to_path_buf),
            links: BTreeMap::new(),
            netns: BTreeMap::new(),
            sockets: BTreeMap::new(),
            tc_attach: TcAttach::choose("auto")?,
        };
        Ok((datapath, maps))
    }

    /// Waits until the kernel has verified the programs; an error if it
    /// rejected the datapath program. Every use of a program waits too.
    pub fn loaded(&mut self) -> Result<()> {
        self.programs.loaded().map(|_| ())
    }

    /// Takes the datapath's log buffer, to drain it into lbd's log.
    pub fn logger(&mut self) -> Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        let ebpf = &mut self.programs.loaded()?.ebpf;
        aya_log::EbpfLogger::init(ebpf).context("the datapath's log buffer")
    }

    /// How later attachments are made (see [`TcAttach`]).
    pub fn set_tc_attach(&mut self, mode: TcAttach) {
        self.tc_attach = mode;
    }

    pub fn tc_attach(&self) -> TcAttach {
        self.tc_attach
    }

    /// The trivial pass-only program of the same object, loaded on demand
    /// (benchmarks use it as the floor).
    pub fn pass_program(&mut self) -> Result<&mut SchedClassifier> {
        on_demand(
            &mut self.programs.loaded()?.ebpf,
            progs::TC_PASS,
            SchedClassifier::load,
        )
    }

    pub fn program(&mut self) -> Result<&mut SchedClassifier> {
        program_of(&mut self.programs.loaded()?.ebpf, progs::TC_INGRESS)
    }

    /// Attaches to `ifname`'s ingress. A link pinned for this interface by an
    /// earlier lbd is taken over atomically (the new program replaces the old
    /// one in place), so there is no moment without a datapath.
    pub fn attach(&mut self, ifname: &str) -> Result<()> {
        self.attach_as(ifname, ifname)
    }

    /// Attaches to every interface but `lo` of the network namespace at
    /// `path` (Swarm's `ingress_sbox`), under names `<tag>:<ifname>`, and
    /// turns forwarding on there: the FIB lookup that sends translated
    /// packets on refuses to route where forwarding is off. Attachments of
    /// an earlier namespace with the same tag (dockerd restarted and made a
    /// new one) are dropped first.
    pub fn attach_netns(&mut self, tag: &str, path: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let target =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let inode = target.metadata()?.ino();
        if self.netns.get(tag) == Some(&inode) {
            return Ok(());
        }
        self.forget_netns(tag);
        in_netns(&target, path, || self.attach_all_here(tag))??;
        self.netns.insert(tag.to_string(), inode);
        log::info!("attached inside {}", path.display());
        Ok(())
    }

    fn attach_all_here(&mut self, tag: &str) -> Result<()> {
        std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1")
            .context("enabling forwarding")?;
        let names: Vec<String> = nix::net::if_::if_nameindex()?
            .iter()
            .filter_map(|i| i.name().to_str().ok().map(String::from))
            .filter(|n| is_ethernet(n))
            .collect();
        for name in names {
            self.attach_as(&format!("{tag}:{name}"), &name)?;
        }
        Ok(())
    }

    /// Drops the attachments made by `attach_netns` under `tag`.
    pub fn forget_netns(&mut self, tag: &str) {
        let prefix = format!("{tag}:");
        let keys: Vec<String> = self
            .links
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        for key in keys {
            self.detach(&key);
        }
        self.netns.remove(tag);
    }

    /// Attaches to `ifname` of the current namespace, known as `key`.
    fn attach_as(&mut self, key: &str, ifname: &str) -> Result<()> {
        if self.links.contains_key(key) {
            return Ok(());
        }
        let pin = self.link_pin(format!(
            "{}{}",
            crate::pins::LINK_PREFIX,
            key.replace(':', "-")
        ));
        let mode = self.tc_attach;
        let keep_past_exit = pin.is_some();
        let prog = self.program()?;
        let attachment = match mode {
            TcAttach::Tcx => {
                let id = attach_tcx(prog, ifname, pin.as_deref())?;
                Attachment::keep(
                    prog.take_link(id)?,
                    pin,
                    "TCX links cannot be pinned on this kernel; use --tc-attach netlink",
                )?
            }
            TcAttach::Netlink => {
                let id = attach_netlink(prog, ifname)?;
                let link = prog.take_link(id)?;
                if keep_past_exit {
                    Attachment::Kernel(link)
                } else {
                    Attachment::Owned(link)
                }
            }
        };
        self.links.insert(key.to_string(), attachment);
        Ok(())
    }

    /// Attaches the socket programs to the cgroup v2 directory `cgroup`, so
    /// that the sockets of every process below it reach FLAG_SOCKET
    /// addresses (whose namespace is a member of their network). Links an
    /// earlier lbd pinned are replaced only once the new ones are in place:
    /// both run meanwhile, and the second finds nothing left to translate,
    /// so no connection goes unbalanced during a restart.
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<()> {
        let loaded = self.programs.loaded()?;
        loaded.sockets.clone().map_err(|e| anyhow!(e))?;
        let dir = std::fs::File::open(cgroup)
            .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
        for name in SOCKET_PROGRAMS {
            if self.sockets.contains_key(name) {
                continue;
            }
            let prog = program_of::<CgroupSockAddr>(&mut self.programs.loaded()?.ebpf, name)?;
            let id = prog
                // No flags: a link attachment always coexists with others
                // (BPF_F_ALLOW_MULTI is for the older, link-less attach).
                .attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            let link = prog.take_link(id)?;
            let pin = self.link_pin(format!("{}{name}", crate::pins::SOCKET_LINK_PREFIX));
            let attachment = Attachment::keep(
                link,
                pin,
                "this kernel attaches cgroup programs without links",
            )?;
            self.sockets.insert(name, attachment);
        }
        log::info!("socket programs attached to {}", cgroup.display());
        Ok(())
    }

    /// Detaches from `ifname` (its pin, if any, is removed).
    pub fn detach(&mut self, ifname: &str) {
        if let Some(attachment) = self.links.remove(ifname) {
            attachment.detach(ifname);
        }
    }

    /// Attaches the XDP fast path to `ifname` of lbd's namespace, in native
    /// mode, and lets it redirect frames there. Only for interfaces whose
    /// received frames carry complete checksums (a NIC): see lb-ebpf's
    /// xdp.rs. The TC program must be attached there too, as it handles
    /// every packet the XDP program passes. Generic (skb) mode is never
    /// used: its skbs may carry partial checksums.
    pub fn attach_xdp(&mut self, ifname: &str) -> Result<()> {
        if self.xdp.contains_key(ifname) {
            return Ok(());
        }
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .with_context(|| format!("XDP on {ifname}: no such interface"))?;
        let loaded = self.programs.loaded()?;
        loaded.xdp.clone().map_err(|e| anyhow!(e))?;
        let prog = program_of::<Xdp>(&mut loaded.ebpf, progs::XDP_INGRESS)?;
        // Listed first: the program redirects only to listed devices, so
        // its first frames on this one may already leave through it.
        self.xdp_ports
            .insert(ifindex, ifindex, None, 0)
            .with_context(|| format!("XDP on {ifname}: listing it as an egress device"))?;
        match prog.attach_to_if_index(ifindex, XdpMode::Driver) {
            Ok(id) => {
                self.xdp.insert(ifname.to_string(), (id, ifindex));
                log::info!("XDP fast path attached to {ifname} (native mode)");
                Ok(())
            }
            Err(e) => {
                let _ = self.xdp_ports.remove(ifindex);
                Err(anyhow!(e)).with_context(|| {
                    format!(
                        "attaching the XDP program to {ifname} in native mode (its driver must \
                         support XDP, and its MTU fit a page); the TC program carries its traffic"
                    )
                })
            }
        }
    }

    /// Takes the XDP fast path off `ifname` (or forgets it, when the
    /// interface is gone and its link with it).
    pub fn detach_xdp(&mut self, ifname: &str) {
        let Some((id, ifindex)) = self.xdp.remove(ifname) else {
            return;
        };
        let _ = self.xdp_ports.remove(ifindex);
        if let Ok(loaded) = self.programs.loaded() {
            if let Ok(prog) = program_of::<Xdp>(&mut loaded.ebpf, progs::XDP_INGRESS) {
                let _ = prog.detach(id);
            }
        }
    }

    /// Interfaces with the XDP fast path.
    pub fn xdp_attached(&self) -> Vec<String> {
        self.xdp.keys().cloned().collect()
    }

    /// The XDP program, for benchmarks and fixtures (BPF_PROG_TEST_RUN).
    pub fn xdp_program(&mut self) -> Result<&mut Xdp> {
        let loaded = self.programs.loaded()?;
        loaded.xdp.clone().map_err(|e| anyhow!(e))?;
        program_of(&mut loaded.ebpf, progs::XDP_INGRESS)
    }

    /// The XDP pass-only program, loaded on demand (the XDP floor).
    pub fn xdp_pass_program(&mut self) -> Result<&mut Xdp> {
        on_demand(
            &mut self.programs.loaded()?.ebpf,
            progs::XDP_PASS,
            Xdp::load,
        )
    }

    /// Lists `ifindex` as a device the XDP program may redirect to, as
    /// `attach_xdp` does for the interfaces it attaches to.
    pub fn allow_xdp_egress(&mut self, ifindex: u32) -> Result<()> {
        Ok(self.xdp_ports.insert(ifindex, ifindex, None, 0)?)
    }

    /// Makes PEER_PORTS list exactly `ports` (ifindex -> the veth's MAC):
    /// the veths whose peer is a local container's interface.
    pub fn set_peer_ports(&mut self, ports: &BTreeMap<u32, [u8; 6]>) -> Result<()> {
        if ports.len() > lb_common::MAX_PEER_PORTS as usize {
            log::warn!(
                "{} veths into local containers, PEER_PORTS holds {}: the others are \
                 reached through their veth",
                ports.len(),
                lb_common::MAX_PEER_PORTS
            );
        }
        let stale: Vec<u32> = self
            .peer_ports_written
            .keys()
            .filter(|i| !ports.contains_key(i))
            .copied()
            .collect();
        for ifindex in stale {
            match self.peer_ports.remove(&ifindex) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("PEER_PORTS"),
            }
            self.peer_ports_written.remove(&ifindex);
        }
        for (&ifindex, mac) in ports.iter().take(lb_common::MAX_PEER_PORTS as usize) {
            if self.peer_ports_written.get(&ifindex) != Some(mac) {
                self.peer_ports
                    .insert(ifindex, mac, 0)
                    .context("PEER_PORTS")?;
                self.peer_ports_written.insert(ifindex, *mac);
            }
        }
        Ok(())
    }

    /// How many veths PEER_PORTS lists.
    pub fn peer_ports(&self) -> usize {
        self.peer_ports_written.len()
    }

    /// Forgets an interface that no longer exists (its link went with it).
    pub fn forget(&mut self, ifname: &str) {
        self.detach_xdp(ifname);
        match self.links.remove(ifname) {
            Some(Attachment::Pinned(p)) => {
                let _ = p.unpin();
            }
            // Nothing left to detach.
            Some(kernel @ Attachment::Kernel(_)) => kernel.stay(),
            _ => {}
        }
    }

    /// Every attachment, those in other namespaces as `<tag>:<ifname>`.
    pub fn attached(&self) -> Vec<String> {
        self.links.keys().cloned().collect()
    }

    /// Attachments in lbd's own namespace.
    pub fn attached_here(&self) -> Vec<String> {
        self.links
            .keys()
            .filter(|k| !k.contains(':'))
            .cloned()
            .collect()
    }

    /// Detaches everywhere and removes every pin.
    pub fn shutdown(mut self) {
        for name in self.xdp_attached() {
            self.detach_xdp(&name);
        }
        let names: Vec<String> = self.links.keys().cloned().collect();
        for name in names {
            self.detach(&name);
        }
        for (name, attachment) in std::mem::take(&mut self.sockets) {
            attachment.detach(name);
        }
        if let Some(dir) = &self.pin_dir {
            remove_pins(dir);
        }
    }

    /// Leaves the program attached through its pinned links and the maps
    /// pinned, for the next lbd to adopt.
    pub fn keep(mut self) {
        for (_, attachment) in std::mem::take(&mut self.links) {
            attachment.stay();
        }
    }

    /// Where a link is pinned: `links/<file>` in the pin directory.
    fn link_pin(&self, file: String) -> Option<PathBuf> {
        self.pin_dir
            .as_ref()
            .map(|d| d.join(crate::pins::LINKS_DIR).join(file))
    }
}

/// Attaches by a TCX link. A link pinned at `pin` by an earlier lbd is
/// taken over atomically (the new program replaces the old one in place).
fn attach_tcx(
    prog: &mut SchedClassifier,
    ifname: &str,
    pin: Option<&Path>,
) -> Result<tc::SchedClassifierLinkId> {
    if let Some(Ok(old)) = pin.map(PinnedLink::from_pin) {
        let link: SchedClassifierLink = FdLink::from(old).try_into()?;
        // Fails when the link went with an interface of the same name that
        // was since re-created: then attach afresh.
        match prog.attach_to_link(link) {
            Ok(id) => return Ok(id),
            Err(e) => log::info!("{ifname}: pinned link not reusable ({e}); attaching anew"),
        }
    }
    prog.attach_with_options(
        ifname,
        TcAttachType::Ingress,
        TcAttachOptions::TcxOrder(Default::default()),
    )
    .with_context(|| format!("attaching to {ifname} by TCX"))
}

/// Attaches as lbd's cls_bpf filter on the clsact qdisc (added if
/// missing). A filter an earlier lbd left gets the new program in place:
/// netlink replaces it atomically, so no packet sees no program.
fn attach_netlink(prog: &mut SchedClassifier, ifname: &str) -> Result<tc::SchedClassifierLinkId> {
    if let Err(e) = tc::qdisc_add_clsact(ifname) {
        // Usually: it is there already.
        log::debug!("clsact on {ifname}: {e}");
    }
    let existing = netlink_link(ifname).with_context(|| format!("no interface {ifname}"))?;
    if let Ok(id) = prog.attach_to_link(existing) {
        return Ok(id);
    }
    prog.attach_with_options(
        ifname,
        TcAttachType::Ingress,
        TcAttachOptions::Netlink(NlOptions {
            priority: NETLINK_PRIORITY,
            handle: TcHandle::from(NETLINK_HANDLE),
            classid: None,
        }),
    )
    .with_context(|| format!("attaching to {ifname} by netlink"))
}

/// The program `name` of the object, as the kind `P` it must be.
fn program_of<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?
        .try_into()?)
}

/// The program `name`, loaded into the kernel by `load` on its first use.
fn on_demand<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &str,
    load: fn(&mut P) -> Result<(), ProgramError>,
) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let prog = program_of::<P>(ebpf, name)?;
    match load(prog) {
        Ok(()) | Err(ProgramError::AlreadyLoaded) => Ok(prog),
        Err(e) => Err(e).with_context(|| format!("the kernel rejected {name}")),
    }
}

fn load_tc_program(ebpf: &mut Ebpf) -> Result<()> {
    program_of::<SchedClassifier>(ebpf, progs::TC_INGRESS)?
        .load()
        .context("the kernel rejected the datapath program")
}

/// Duplicates of the descriptors of every map in `ebpf`, to keep them open
/// (see [`Programs::verify`]). Written out because aya gives no map's
/// descriptor but through its variant.
fn hold_maps(ebpf: &Ebpf) -> Result<Vec<OwnedFd>> {
    ebpf.maps()
        .map(|(name, map)| {
            let data = match map {
                Map::Array(d)
                | Map::ArrayOfMaps(d)
                | Map::BloomFilter(d)
                | Map::CgroupArray(d)
                | Map::CgroupStorage(d)
                | Map::CgrpStorage(d)
                | Map::CpuMap(d)
                | Map::DevMap(d)
                | Map::DevMapHash(d)
                | Map::HashMap(d)
                | Map::HashOfMaps(d)
                | Map::InodeStorage(d)
                | Map::LpmTrie(d)
                | Map::LruHashMap(d)
                | Map::PerCpuArray(d)
                | Map::PerCpuCgroupStorage(d)
                | Map::PerCpuHashMap(d)
                | Map::PerCpuLruHashMap(d)
                | Map::PerfEventArray(d)
                | Map::ProgramArray(d)
                | Map::Queue(d)
                | Map::ReusePortSockArray(d)
                | Map::RingBuf(d)
                | Map::SockHash(d)
                | Map::SockMap(d)
                | Map::SkStorage(d)
                | Map::Stack(d)
                | Map::StackTraceMap(d)
                | Map::Unsupported(d)
                | Map::XskMap(d) => d,
            };
            data.fd()
                .as_fd()
                .try_clone_to_owned()
                .with_context(|| format!("duplicating the descriptor of map {name}"))
        })
        .collect()
}

fn load_socket_programs(ebpf: &mut Ebpf) -> Result<()> {
    for name in SOCKET_PROGRAMS {
        program_of::<CgroupSockAddr>(ebpf, name)?
            .load()
            .with_context(|| format!("the kernel rejected {name}"))?;
    }
    Ok(())
}

/// Whether `name`, in the calling thread's network namespace, carries
/// Ethernet frames (the datapath parses nothing else). Read with
/// SIOCGIFHWADDR because sysfs may show another namespace's interfaces.
fn is_ethernet(name: &str) -> bool {
    // SAFETY: a zeroed ifreq with a NUL-terminated name that fits, and a
    // socket closed on every path.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        if name.len() >= req.ifr_name.len() {
            return false;
        }
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return false;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req);
        libc::close(fd);
        rc == 0 && req.ifr_ifru.ifru_hwaddr.sa_family == libc::ARPHRD_ETHER
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// Removes what lbd pinned under a pin directory (maps, links, the layout
/// record) and the directory if nothing else is left in it; logs failures.
pub fn remove_pins(dir: &Path) {
    if let Err(e) = crate::pins::remove(dir, &pinned_names()) {
        log::warn!("removing the pins in {}: {e:#}", dir.display());
    }
}

/// An mmapable array of 4-byte words (RINGS, PREFILTER), written through a
/// shared mapping of the part being written: a 4093-entry Maglev table is a
/// copy instead of 4093 syscalls, which is what makes programming
/// thousands of services fast. Only that part is mapped, and only while it
/// is written: a mapping of the whole array would put all of it in lbd's
/// resident memory (the kernel maps every page of it at once), hundreds of
/// MiB of RINGS at 10,000 services, though the memory is the kernel's.
///
/// Elements of both hold two words (RINGS: RING_IDS_PER_ENTRY backend ids),
/// because the kernel lays array elements out 8 bytes apart: with two
/// words to an element either array reads as one flat run of words.
pub struct WordArray {
    name: &'static str,
    map: MapData,
    /// Words the array holds.
    ids: usize,
    page: usize,
}

impl WordArray {
    /// The array `name`, of `per` words to an element.
    fn map(ebpf: &mut Ebpf, name: &'static str, per: usize) -> Result<WordArray> {
        let map = ebpf
            .take_map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
        let Map::Array(data) = map else {
            return Err(anyhow!("map {name} is not an array"));
        };
        let info = data.info()?;
        if info.value_size() as usize != 4 * per {
            return Err(anyhow!(
                "{name} holds {}-byte values, expected {} (maps pinned by an older build? run \
                 `lbd --cleanup`)",
                info.value_size(),
                4 * per
            ));
        }
        let page =
            nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)?.unwrap_or(4096) as usize;
        Ok(WordArray {
            name,
            ids: info.max_entries() as usize * per,
            map: data,
            page,
        })
    }

    /// How many words the array holds.
    pub fn len(&self) -> usize {
        self.ids
    }

    pub fn is_empty(&self) -> bool {
        self.ids == 0
    }

    /// Maps the pages holding words [start, start + len) and gives `f` those words.
    fn with_ids<T>(&self, start: usize, len: usize, f: impl FnOnce(&mut [u32]) -> T) -> Result<T> {
        use std::os::fd::AsRawFd;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= self.ids)
            .ok_or_else(|| anyhow!("access past the end of {}", self.name))?;
        let first = start * 4 / self.page * self.page;
        let mapped = (end * 4).div_ceil(self.page) * self.page - first;
        // SAFETY: a shared mapping of whole pages of an mmapable BPF array,
        // all within it (`end` is checked against its size, which the
        // kernel rounds up to whole pages).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.map.fd().as_fd().as_raw_fd(),
                first as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(anyhow!(
                "mapping {}: {}",
                self.name,
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: ids [start, end) lie within the mapping, which stays
        // until the munmap below; u32s are 4-aligned in page-aligned memory.
        let ids = unsafe {
            std::slice::from_raw_parts_mut(ptr.cast::<u8>().add(start * 4 - first).cast(), len)
        };
        let out = f(ids);
        // SAFETY: unmapping exactly what was mapped above; `ids` is gone.
        unsafe { libc::munmap(ptr, mapped) };
        Ok(out)
    }

    /// Writes `values` starting at id `start`.
    pub fn write(&mut self, start: usize, values: &[u32]) -> Result<()> {
        self.with_ids(start, values.len(), |ids| ids.copy_from_slice(values))
    }

    /// The `len` ids from id `start`.
    pub fn read(&self, start: usize, len: usize) -> Result<Vec<u32>> {
        self.with_ids(start, len, |ids| ids.to_vec())
    }
}
