//! The harness of the packet fixtures (tests/tests/fixtures*.rs): the real
//! datapath loaded in a fresh network namespace with two routed interfaces,
//! services written by the real reconciler, the program run through
//! BPF_PROG_TEST_RUN, and packets built independently with etherparse, which
//! computes every checksum from scratch.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, RawFd};

use aya::maps::{Array, HashMap, IterableMap, Map, MapData};
use etherparse::{IpHeaders, PacketBuilder, PacketBuilderStep};
use lb_common::{global, Config, CtEntry, FlowKey, NextHop, TrafficStats};
use lb_userspace::datapath::{Datapath, Limits};
use lb_userspace::datapath_log::DatapathLog;
use lb_userspace::model::{BackendSpec, DesiredState, Frontend, Proto, ServiceSpec};
use lb_userspace::reconciler::Reconciler;

/// TC_ACT_UNSPEC: not ours, the next program or the stack decides.
pub const PASS: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
/// XDP actions.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;

pub const CLIENT4: [u8; 4] = [10, 71, 0, 2];
pub const VIP4: [u8; 4] = [10, 73, 0, 10];
pub const CLIENT6: &str = "fd00:71::2";
pub const VIP6: &str = "fd00:73::10";
pub const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
/// The neighbours' MACs in the fixture's namespace.
pub const MAC_CLIENT: [u8; 6] = [2, 0, 0, 0, 1, 2];
pub const MAC_BACKEND: [u8; 6] = [2, 0, 0, 0, 2, 2];
/// The fixture's interfaces towards the clients and towards the backends.
pub const IF_CLIENTS: &str = "lbc0";
pub const IF_BACKENDS: &str = "lbb0";

/// The full NAT service of `desired()` and its source address.
pub const FULLNAT_VIP4: [u8; 4] = [10, 73, 0, 12];
pub const SNAT4: [u8; 4] = [10, 72, 0, 1];

/// TCP flags.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

pub fn v6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>().unwrap().octets()
}

pub fn service(name: &str, frontend: &str, proto: Proto, backends: &[&str]) -> ServiceSpec {
    let fe: std::net::SocketAddr = frontend.parse().unwrap();
    ServiceSpec {
        name: name.into(),
        frontend: Frontend {
            addr: fe.ip(),
            port: fe.port(),
            proto,
        },
        backends: backends
            .iter()
            .map(|b| {
                let b: std::net::SocketAddr = b.parse().unwrap();
                BackendSpec {
                    addr: b.ip(),
                    port: b.port(),
                    weight: 1,
                }
            })
            .collect(),
        snat: None,
        health: None,
        affinity_secs: 0,
        table_size: None,
        network: None,
        local_frontend: false,
        source: "test".into(),
    }
}

pub fn desired() -> DesiredState {
    DesiredState {
        services: vec![
            service(
                "web",
                "10.73.0.10:80",
                Proto::Tcp,
                &["10.72.1.2:8080", "10.72.2.2:8080", "10.72.3.2:8080"],
            ),
            service("dns", "10.73.0.10:53", Proto::Udp, &["10.72.1.2:5353"]),
            service(
                "web6",
                "[fd00:73::10]:80",
                Proto::Tcp,
                &["[fd00:72:1::2]:8080"],
            ),
            service(
                "dns6",
                "[fd00:73::10]:53",
                Proto::Udp,
                &["[fd00:72:1::2]:5353"],
            ),
            service("empty", "10.73.0.11:80", Proto::Tcp, &[]),
            ServiceSpec {
                snat: Some(IpAddr::V4(Ipv4Addr::from(SNAT4))),
                ..service("fullnat", "10.73.0.12:80", Proto::Tcp, &["10.72.1.2:8080"])
            },
            ServiceSpec {
                affinity_secs: 300,
                table_size: None,
                network: None,
                local_frontend: false,
                ..service(
                    "sticky",
                    "10.73.0.13:80",
                    Proto::Tcp,
                    &["10.72.1.2:8080", "10.72.2.2:8080", "10.72.3.2:8080"],
                )
            },
        ],
        ..Default::default()
    }
}

/// A loaded datapath with the fixture services applied, in a fresh network
/// namespace of its own with two interfaces: `lbc0` towards the clients
/// (10.71.0.0/16, fd00:71::/64) and `lbb0` towards the backends
/// (10.72.0.0/16, fd00:72::/32), with permanent neighbours, so that the FIB
/// routes every translated packet and the output bytes are exact.
pub struct Fixture {
    pub datapath: Datapath,
    pub reconciler: Reconciler,
    pub clients: Link,
    pub backends: Link,
    /// Handles of our own on maps the reconciler owns, for writing what
    /// only lbd's other parts (configuration, garbage collection) write.
    config: Array<MapData, Config>,
    conntrack: HashMap<MapData, FlowKey, CtEntry>,
    ct_pending: HashMap<MapData, FlowKey, CtEntry>,
    /// `run_xdp` lists no egress device for the XDP program.
    no_xdp_egress: bool,
}

/// One of the fixture's interfaces.
pub struct Link {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

pub fn sh(cmd: &str) {
    let status = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .expect("sh");
    assert!(status.success(), "{cmd}");
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Link {
    /// `own_mac` is set explicitly: sysfs still shows the namespace the
    /// test started in.
    fn new(
        name: &str,
        own_mac: [u8; 6],
        (v4, v6): (&str, &str),
        neighbours: &[&str],
        mac: [u8; 6],
    ) -> Link {
        sh(&format!(
            "ip link add {name} address {} type veth peer name {name}p && \
             ip addr add {v4} dev {name} && ip -6 addr add {v6} dev {name} nodad && \
             ip link set {name} up && ip link set {name}p up",
            mac_string(own_mac)
        ));
        for n in neighbours {
            sh(&format!(
                "ip neigh replace {n} lladdr {} dev {name} nud permanent",
                mac_string(mac)
            ));
        }
        Link {
            ifindex: nix::net::if_::if_nametoindex(name).unwrap(),
            mac: own_mac,
        }
    }
}

/// A `__sk_buff` for BPF_PROG_TEST_RUN's `ctx_in`, with ingress_ifindex
/// (offset 36) and ifindex (40) set, so that the FIB lookup runs in that
/// interface's context; a non-zero gso_size (176) and gso_segs (164) make
/// the packet a GSO one.
pub fn skb_context(ingress_ifindex: u32, gso_size: u32, gso_segs: u32) -> [u8; 192] {
    let mut ctx = [0u8; 192];
    ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx[164..168].copy_from_slice(&gso_segs.to_ne_bytes());
    ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
    ctx
}

/// An `xdp_md` for BPF_PROG_TEST_RUN's `ctx_in`: the frame from 0 to
/// `len`, received on `ingress_ifindex` (queue 0).
pub fn xdp_context(ingress_ifindex: u32, len: usize) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx
}

/// One BPF_PROG_TEST_RUN of the TC program `prog_fd` on `packet`, with the
/// `__sk_buff` `ctx` (see `skb_context`), and with `checksum_complete` as a
/// CHECKSUM_COMPLETE skb (BPF_F_TEST_SKB_CHECKSUM_COMPLETE: the kernel
/// seeds skb->csum and fails the run with EBADMSG if the program leaves it
/// inconsistent). Returns the action and the output packet; the error is
/// the syscall's. Called directly rather than through aya's `TestRun`,
/// which cannot pass that flag.
pub fn test_run(
    prog_fd: RawFd,
    packet: &[u8],
    ctx: &[u8],
    checksum_complete: bool,
) -> io::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; packet.len().max(512) + 512];
    let mut attr = TestRunAttr {
        prog_fd: prog_fd as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ctx_size_in: ctx.len() as u32,
        ctx_in: ctx.as_ptr() as u64,
        flags: if checksum_complete {
            BPF_F_TEST_SKB_CHECKSUM_COMPLETE
        } else {
            0
        },
        ..Default::default()
    };
    // SAFETY: attr is a valid BPF_PROG_TEST_RUN attribute whose pointers and
    // sizes describe live buffers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, out))
}

/// In the calling thread's network namespace: a veth `name` with address
/// `addr` (a prefix) and forwarding on, whose other end stands for a router
/// at `gateway` (a permanent neighbour) towards `routes`. The FIB then
/// resolves every address in them to that next hop, as it would on a real
/// node. Returns `name`'s ifindex; a second call finds the link made by the
/// first.
pub fn gateway_link(name: &str, addr: &str, gateway: &str, routes: &[&str]) -> u32 {
    if let Ok(ifindex) = nix::net::if_::if_nametoindex(name) {
        return ifindex;
    }
    sh(&format!(
        "ip link set lo up && sysctl -qw net.ipv4.conf.all.forwarding=1 && \
         ip link add {name} type veth peer name {name}p && ip addr add {addr} dev {name} && \
         ip link set {name} up && ip link set {name}p up && \
         ip neigh replace {gateway} lladdr {} dev {name} nud permanent",
        mac_string(MAC_BACKEND)
    ));
    for r in routes {
        sh(&format!("ip route add {r} via {gateway} dev {name}"));
    }
    nix::net::if_::if_nametoindex(name).expect("the interface just made")
}

/// Extra settings of one BPF_PROG_TEST_RUN.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// `__sk_buff.gso_size` and `gso_segs`: a GSO packet.
    pub gso_size: u32,
    pub gso_segs: u32,
    /// BPF_F_TEST_SKB_CHECKSUM_COMPLETE: the kernel seeds skb->csum and
    /// fails the run with EBADMSG when the program leaves it inconsistent.
    pub checksum_complete: bool,
}

/// BPF_PROG_TEST_RUN's part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// A second handle on the map behind `map` (by its id), which we may write.
fn own_handle<T>(map: &MapData) -> T
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let id = map.info().expect("map info").id();
    let data = MapData::from_id(id).expect("map by id");
    T::try_from(Map::from_map_data(data).expect("map type")).expect("map handle")
}

impl Fixture {
    pub fn new() -> Fixture {
        Self::with_datapath_log(DatapathLog::Off)
    }

    /// [`Self::new`], with the datapath reporting its rare events at `log`.
    pub fn with_datapath_log(log: DatapathLog) -> Fixture {
        sh(
            "ip link set lo up && sysctl -qw net.ipv4.conf.all.forwarding=1 \
            net.ipv6.conf.all.forwarding=1",
        );
        let clients = Link::new(
            IF_CLIENTS,
            [2, 0, 0, 0, 1, 1],
            ("10.71.0.1/16", "fd00:71::1/64"),
            &["10.71.0.2", "10.71.0.3", "fd00:71::2"],
            MAC_CLIENT,
        );
        let backends = Link::new(
            IF_BACKENDS,
            [2, 0, 0, 0, 2, 1],
            ("10.72.0.1/16", "fd00:72::1/32"),
            &[
                "10.72.1.2",
                "10.72.2.2",
                "10.72.3.2",
                "10.72.4.2",
                "fd00:72:1::2",
            ],
            MAC_BACKEND,
        );
        let limits = Limits {
            max_services: 16,
            max_backends: 64,
            max_flows: 1024,
            ..Default::default()
        };
        let (datapath, maps) =
            Datapath::load_with_log(None, limits, log).expect("load the datapath");
        let mut reconciler = Reconciler::new(maps).unwrap();
        reconciler.apply(&desired()).unwrap();
        let maps = reconciler.maps();
        let config = own_handle(maps.config.map());
        let conntrack = own_handle(maps.conntrack.map());
        let ct_pending = own_handle(maps.ct_pending.map());
        Fixture {
            datapath,
            reconciler,
            clients,
            backends,
            config,
            conntrack,
            ct_pending,
            no_xdp_egress: false,
        }
    }

    /// Runs the program on `packet` as if it arrived on the interface its
    /// source lives behind (backends: 10.72/16 and fd00:72::/32).
    pub fn run(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(packet, RunOptions::default())
            .expect("BPF_PROG_TEST_RUN")
    }

    /// `run` with extra settings; the error is the syscall's.
    pub fn try_run(&mut self, packet: &[u8], opts: RunOptions) -> io::Result<(u32, Vec<u8>)> {
        let ingress = if from_backend_side(packet) {
            self.backends.ifindex
        } else {
            self.clients.ifindex
        };
        let ctx = skb_context(ingress, opts.gso_size, opts.gso_segs);
        let prog = self.datapath.program().unwrap();
        let fd = prog.fd().expect("program loaded").as_fd().as_raw_fd();
        test_run(fd, packet, &ctx, opts.checksum_complete)
    }

    /// Runs the XDP program on `packet` as `run` runs the TC program. Both
    /// interfaces are listed as devices it may redirect to, as lbd lists
    /// those it attaches the program to, unless `no_egress` was called.
    pub fn run_xdp(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        let ingress = if from_backend_side(packet) {
            self.backends.ifindex
        } else {
            self.clients.ifindex
        };
        if !self.no_xdp_egress {
            for ifindex in [self.clients.ifindex, self.backends.ifindex] {
                self.datapath.allow_xdp_egress(ifindex).unwrap();
            }
        }
        let ctx = xdp_context(ingress, packet.len());
        let prog = self.datapath.xdp_program().unwrap();
        let fd = prog.fd().expect("program loaded").as_fd().as_raw_fd();
        test_run(fd, packet, &ctx, false).expect("BPF_PROG_TEST_RUN")
    }

    /// From now on the XDP program may redirect to no device.
    pub fn no_xdp_egress(&mut self) {
        self.no_xdp_egress = true;
    }

    /// An XDP counter (`lb_common::xdp_stat`).
    pub fn xdp_counter(&self, index: u32) -> u64 {
        let name = lb_common::xdp_stat::NAMES[index as usize];
        lb_userspace::status::datapath_counters(&self.reconciler)[name]
    }

    pub fn global(&self, index: u32) -> u64 {
        lb_userspace::status::datapath_counters(&self.reconciler)[global::NAMES[index as usize]]
    }

    /// `frame` as the datapath sends it towards the backends: a router's
    /// hop, from the fixture's backend-side interface to the neighbour.
    pub fn to_backends(&self, frame: Vec<u8>) -> Vec<u8> {
        routed(frame, self.backends.mac, MAC_BACKEND)
    }

    /// The same towards the clients.
    pub fn to_clients(&self, frame: Vec<u8>) -> Vec<u8> {
        routed(frame, self.clients.mac, MAC_CLIENT)
    }

    pub fn config(&self) -> Config {
        self.config.get(&0, 0).unwrap()
    }

    pub fn set_config(&mut self, change: impl FnOnce(&mut Config)) {
        let mut config = self.config();
        change(&mut config);
        self.config.set(0, config, 0).unwrap();
    }

    /// Freezes the datapath's clock at `ns`.
    pub fn set_clock(&mut self, ns: u64) {
        self.set_config(|c| c.clock_frozen_ns = ns);
    }

    /// Every entry of CONNTRACK. Like every accessor of the conntrack
    /// tables here but `next_hop`, without the next hop (`without_hop`).
    pub fn conntrack(&self) -> Vec<(FlowKey, CtEntry)> {
        sorted(self.conntrack.iter().map(|r| r.unwrap()))
    }

    /// Every entry of CT_PENDING.
    pub fn pending(&self) -> Vec<(FlowKey, CtEntry)> {
        sorted(self.ct_pending.iter().map(|r| r.unwrap()))
    }

    pub fn conntrack_get(&self, key: &FlowKey) -> Option<CtEntry> {
        self.conntrack.get(key, 0).ok().map(without_hop)
    }

    pub fn pending_get(&self, key: &FlowKey) -> Option<CtEntry> {
        self.ct_pending.get(key, 0).ok().map(without_hop)
    }

    /// The next hop cached in the half under `key`, in either table.
    pub fn next_hop(&self, key: &FlowKey) -> Option<NextHop> {
        let e = self
            .conntrack
            .get(key, 0)
            .or_else(|_| self.ct_pending.get(key, 0));
        e.ok().map(|e| e.hop)
    }

    pub fn conntrack_remove(&mut self, key: &FlowKey) {
        self.conntrack.remove(key).unwrap();
    }

    pub fn pending_remove(&mut self, key: &FlowKey) {
        self.ct_pending.remove(key).unwrap();
    }

    /// The service `name`'s counters, summed over CPUs.
    pub fn service_stats(&self, name: &str) -> TrafficStats {
        let slot = self.applied(name).slot;
        let per_cpu = self.reconciler.maps().service_stats.get(&slot, 0).unwrap();
        per_cpu
            .iter()
            .fold(TrafficStats::default(), |a, s| TrafficStats {
                packets: a.packets + s.packets,
                bytes: a.bytes + s.bytes,
                new_flows: a.new_flows + s.new_flows,
                reply_packets: a.reply_packets + s.reply_packets,
                reply_bytes: a.reply_bytes + s.reply_bytes,
                no_backend: a.no_backend + s.no_backend,
            })
    }

    fn applied(&self, name: &str) -> lb_userspace::reconciler::Applied {
        self.reconciler
            .applied()
            .find(|a| a.spec.name == name)
            .unwrap_or_else(|| panic!("no service {name}"))
            .clone()
    }

    /// The service slot of `name`.
    pub fn service_slot(&self, name: &str) -> u32 {
        self.applied(name).slot
    }

    /// The backend id of `addr` in the service `name`.
    pub fn backend_id(&self, name: &str, addr: IpAddr) -> u32 {
        let a = self.applied(name);
        let i = a
            .spec
            .backends
            .iter()
            .position(|b| b.addr == addr)
            .unwrap_or_else(|| panic!("{addr} is no backend of {name}"));
        a.backend_ids[i]
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture::new()
    }
}

/// Whether `packet` comes from behind `lbb0`: its IP source is in
/// 10.72.0.0/16 or fd00:72::/32 (anything else comes from the clients' side).
fn from_backend_side(packet: &[u8]) -> bool {
    match u16::from_be_bytes([packet[12], packet[13]]) {
        0x0800 => packet.len() > 28 && packet[26..28] == [10, 72],
        0x86dd => packet.len() > 26 && packet[22..26] == [0xfd, 0, 0, 0x72],
        _ => false,
    }
}

/// `frame` after one routed hop: new MACs, TTL or hop limit one less (and
/// the IPv4 header checksum computed again from scratch).
pub fn routed(mut frame: Vec<u8>, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    frame[..6].copy_from_slice(&dst_mac);
    frame[6..12].copy_from_slice(&src_mac);
    if frame[12..14] == [0x86, 0xdd] {
        frame[21] -= 1;
        return frame;
    }
    let ttl = frame[22] - 1;
    with_ttl(frame, ttl)
}

/// An Ethernet + IPv4/IPv6 frame with its TTL (hop limit) set to `ttl`,
/// the IPv4 header checksum computed again from scratch.
pub fn with_ttl(mut frame: Vec<u8>, ttl: u8) -> Vec<u8> {
    if frame[12..14] == [0x86, 0xdd] {
        frame[21] = ttl;
        return frame;
    }
    frame[22] = ttl;
    fix_ipv4_checksum(&mut frame);
    frame
}

/// Computes the IPv4 header checksum of an Ethernet + IPv4 frame afresh.
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = (frame[14] & 0x0f) as usize * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let header = etherparse::Ipv4HeaderSlice::from_slice(&frame[14..14 + ihl]).unwrap();
    let sum = header.to_header().calc_header_checksum();
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
}

/// Runs `f` on a thread in a new network namespace.
pub fn in_fresh_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        f();
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

/// A TCP segment with `flags` (FIN, SYN, RST, PSH, ACK) from a builder's IP step.
fn tcp_with(
    ip: PacketBuilderStep<IpHeaders>,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = ip.tcp(sport, dport, 1000, 65535);
    if flags & FIN != 0 {
        b = b.fin();
    }
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & RST != 0 {
        b = b.rst();
    }
    if flags & PSH != 0 {
        b = b.psh();
    }
    if flags & ACK != 0 {
        b = b.ack(2000);
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

pub fn tcp4_flags(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let ip = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src, dst, 64);
    tcp_with(ip, sport, dport, flags, payload)
}

pub fn tcp6_flags(
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let ip = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(src, dst, 64);
    tcp_with(ip, sport, dport, flags, payload)
}

/// A TCP SYN over IPv4.
pub fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    tcp4_flags(src, dst, sport, dport, SYN, payload)
}

pub fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// A TCP SYN over IPv6.
pub fn tcp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    tcp6_flags(src, dst, sport, dport, SYN, payload)
}

pub fn udp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// An ICMPv4 message with the given type, code and bytes 5-8, the rest
/// being `body` (for an error, the quoted packet).
pub fn icmp4(
    src: [u8; 4],
    dst: [u8; 4],
    kind: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .icmpv4_raw(kind, code, rest)
        .write(&mut out, body)
        .unwrap();
    out
}

/// The same for ICMPv6 (its checksum covers the pseudo-header).
pub fn icmp6(
    src: [u8; 16],
    dst: [u8; 16],
    kind: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(src, dst, 64)
        .icmpv6_raw(kind, code, rest)
        .write(&mut out, body)
        .unwrap();
    out
}

/// The IP packet of an Ethernet frame (what an ICMP error quotes).
pub fn ip_part(frame: &[u8]) -> Vec<u8> {
    frame[14..].to_vec()
}

/// The IPv4 destination of an Ethernet + IPv4 frame.
pub fn dst4(frame: &[u8]) -> [u8; 4] {
    frame[30..34].try_into().unwrap()
}

/// The IPv4 source port (or any L4 source port of an option-less IPv4 frame).
pub fn sport4(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

pub fn backends4() -> Vec<[u8; 4]> {
    vec![[10, 72, 1, 2], [10, 72, 2, 2], [10, 72, 3, 2]]
}

/// A FlowKey as the datapath keys conntrack: addresses in 16-byte form,
/// ports in network byte order.
pub fn flow(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: lb_userspace::reconciler::addr16(src),
        dst: lb_userspace::reconciler::addr16(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

pub fn ip4(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

pub fn ip6(a: [u8; 16]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(a))
}

/// The Internet checksum's ones'-complement sum of `data` (an odd last
/// byte padded with zero), not yet folded or inverted.
pub fn ones_sum(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Whether data that includes its own checksum sums to all ones.
fn sums_to_ones(sum: u32) -> bool {
    fold(sum) == 0xffff
}

/// An IPv4 or IPv6 pseudo-header's sum.
fn pseudo_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    ones_sum(src) + ones_sum(dst) + proto as u32 + (len as u32 >> 16) + (len as u32 & 0xffff)
}

/// Checks, from scratch, every checksum of the IP packet `ip` (starting
/// at its IP header): the IPv4 header checksum, then the TCP, UDP, ICMP or
/// ICMPv6 checksum. For an ICMP error, the quoted packet's checksums too:
/// its IPv4 header, and its TCP/UDP checksum when the whole of the quoted
/// segment is there. Returns what was checked; panics on a bad checksum.
pub fn verify_checksums(ip: &[u8]) -> Vec<&'static str> {
    let mut checked = Vec::new();
    verify_ip(ip, false, &mut checked);
    checked
}

fn verify_ip(ip: &[u8], quoted: bool, checked: &mut Vec<&'static str>) {
    let v6 = ip[0] >> 4 == 6;
    let (hlen, total, proto, src, dst) = if v6 {
        let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        (40, 40 + plen, ip[6], &ip[8..24], &ip[24..40])
    } else {
        let ihl = (ip[0] & 0x0f) as usize * 4;
        assert!(
            sums_to_ones(ones_sum(&ip[..ihl])),
            "{} IPv4 header checksum wrong: {}",
            if quoted { "quoted" } else { "outer" },
            hex(&ip[..ihl])
        );
        checked.push(if quoted { "quoted ipv4" } else { "ipv4" });
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        (ihl, total, ip[9], &ip[12..16], &ip[16..20])
    };
    if total > ip.len() {
        // A quote that stops before the end of the quoted packet: its L4
        // checksum cannot be verified from what is there.
        assert!(quoted, "IP packet shorter than its length field");
        return;
    }
    let l4 = &ip[hlen..total];
    match proto {
        6 | 17 => {
            if proto == 17 && !v6 && l4[6..8] == [0, 0] {
                checked.push("udp none");
                return;
            }
            let sum = pseudo_sum(src, dst, proto, l4.len()) + ones_sum(l4);
            assert!(
                sums_to_ones(sum),
                "{} {} checksum wrong over {}",
                if quoted { "quoted" } else { "outer" },
                if proto == 6 { "TCP" } else { "UDP" },
                hex(ip)
            );
            checked.push(match (quoted, proto) {
                (true, 6) => "quoted tcp",
                (true, _) => "quoted udp",
                (false, 6) => "tcp",
                (false, _) => "udp",
            });
        }
        1 if !v6 => {
            assert!(
                sums_to_ones(ones_sum(l4)),
                "ICMP checksum wrong: {}",
                hex(ip)
            );
            checked.push("icmp");
            if !quoted && matches!(l4[0], 3 | 11 | 12) {
                verify_ip(&l4[8..], true, checked);
            }
        }
        58 if v6 => {
            let sum = pseudo_sum(src, dst, 58, l4.len()) + ones_sum(l4);
            assert!(sums_to_ones(sum), "ICMPv6 checksum wrong: {}", hex(ip));
            checked.push("icmpv6");
            if !quoted && (1..=4).contains(&l4[0]) {
                verify_ip(&l4[8..], true, checked);
            }
        }
        _ => {}
    }
}

/// Bytes as hex, for failure messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts that `got` equals `want`, printing both in hex when not.
#[track_caller]
pub fn assert_frame(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: output differs from the expectation at byte {first} \
             (lengths {} and {})\n got: {}\nwant: {}",
            got.len(),
            want.len(),
            hex(got),
            hex(want)
        );
    }
}

/// The ICMP error the datapath itself answers `input` with (section 7),
/// built independently: back to the sender's MAC from the MAC it was sent
/// to, from the packet's destination to its source, TTL (hop limit) 64,
/// quoting the first min(IP length, 128) bytes of the packet as sent.
///
/// The contract leaves the IPv4 header's TOS, identification and DF open;
/// the expectation uses Linux's choice for its own ICMP errors: TOS 0xc0
/// (precedence "internetwork control"), identification 0, DF clear.
pub fn datapath_error(input: &[u8], kind: u8, code: u8, rest: [u8; 4]) -> Vec<u8> {
    let dst_mac: [u8; 6] = input[6..12].try_into().unwrap();
    let src_mac: [u8; 6] = input[0..6].try_into().unwrap();
    let ip = &input[14..];
    let mut out = Vec::new();
    if input[12..14] == [0x86, 0xdd] {
        let len = 40 + u16::from_be_bytes([ip[4], ip[5]]) as usize;
        let quote = &ip[..len.min(128)];
        let src: [u8; 16] = ip[24..40].try_into().unwrap();
        let dst: [u8; 16] = ip[8..24].try_into().unwrap();
        PacketBuilder::ethernet2(src_mac, dst_mac)
            .ipv6(src, dst, 64)
            .icmpv6_raw(kind, code, rest)
            .write(&mut out, quote)
            .unwrap();
    } else {
        let len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        let quote = &ip[..len.min(128)];
        let src: [u8; 4] = ip[16..20].try_into().unwrap();
        let dst: [u8; 4] = ip[12..16].try_into().unwrap();
        let mut header =
            etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::ICMP, src, dst).unwrap();
        header.dscp = etherparse::Ipv4Dscp::try_new(0x30).unwrap();
        header.dont_fragment = false;
        PacketBuilder::ethernet2(src_mac, dst_mac)
            .ip(IpHeaders::Ipv4(header, Default::default()))
            .icmpv4_raw(kind, code, rest)
            .write(&mut out, quote)
            .unwrap();
    }
    out
}

/// An Ethernet + IPv4 frame with DF cleared (etherparse sets it), its
/// header checksum computed afresh.
pub fn without_df(mut frame: Vec<u8>) -> Vec<u8> {
    frame[20] &= !0x40;
    fix_ipv4_checksum(&mut frame);
    frame
}

/// A conntrack entry without its next hop: the FIB's answer, cached for a
/// second, which expectations written by hand and the reference model do
/// not have.
pub fn without_hop(e: CtEntry) -> CtEntry {
    CtEntry {
        hop: NextHop::default(),
        ..e
    }
}

fn sorted(entries: impl Iterator<Item = (FlowKey, CtEntry)>) -> Vec<(FlowKey, CtEntry)> {
    let mut v: Vec<_> = entries.map(|(k, e)| (k, without_hop(e))).collect();
    v.sort_by_key(|(k, _)| (k.src, k.dst, k.sport, k.dport));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verifier accepts what etherparse builds and rejects any
    /// corrupted byte in each checksummed part.
    #[test]
    fn verify_checksums_catches_corruption() {
        let quoted = udp4(CLIENT4, VIP4, 5000, 53, b"query");
        let v4 = icmp4(VIP4, CLIENT4, 3, 3, [0; 4], &ip_part(&quoted));
        assert_eq!(
            verify_checksums(&v4[14..]),
            ["ipv4", "icmp", "quoted ipv4", "quoted udp"]
        );
        let quoted6 = tcp6(v6(CLIENT6), v6(VIP6), 1, 2, b"x");
        let v6 = icmp6(v6(VIP6), v6(CLIENT6), 1, 4, [0; 4], &ip_part(&quoted6));
        assert_eq!(verify_checksums(&v6[14..]), ["icmpv6", "quoted tcp"]);
        // Outer IPv4 header, ICMP header, quoted IPv4 header, quoted UDP
        // payload; outer IPv6 address, quoted TCP payload.
        for (frame, at) in [
            (&v4, 26),
            (&v4, 36),
            (&v4, 56),
            (&v4, 73),
            (&v6, 30),
            (&v6, 122),
        ] {
            let mut bad = frame.clone();
            bad[at] ^= 0x10;
            let quiet = std::panic::take_hook();
            std::panic::set_hook(Box::new(|_| {}));
            let result = std::panic::catch_unwind(|| verify_checksums(&bad[14..]));
            std::panic::set_hook(quiet);
            assert!(result.is_err(), "corruption at {at} not detected");
        }
    }
}
