//! Real traffic through the load balancer: bulk transfers both ways with
//! and without checksum offloads, path MTU discovery across the balancer,
//! ICMP errors for balanced flows, hairpin flows, drained backends and a
//! client that reuses its source port, and established connections under a
//! SYN flood. Each test builds the standard topology (client, LB node,
//! backends b1..b3; see `lb_tests::topology`) and removes it afterwards.
//!
//! Every transfer has a bound that a healthy run stays far below (they take
//! milliseconds) and that a stalled flow exceeds; the failure then says how
//! far the transfer got.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lb_tests::bulk::{self, human, ConnectOptions, Transfer};
use lb_tests::echo::{parse_reply, tcp_request, TcpSession};
use lb_tests::flood::syn_flood;
use lb_tests::lbd::{lbctl, Lbd};
use lb_tests::netdev::{packet_counts, set_checksum_offload, set_gro, set_mtu, snmp_counter};
use lb_tests::netns::Netns;
use lb_tests::process::{wait_until, ChildGuard};
use lb_tests::topology::{
    echo_bin, Topology, CLIENT_V4, CLIENT_V6, LB_CLIENT_IF, LB_CLIENT_V4, LB_CLIENT_V6,
};
use serde_json::Value;

const ECHO_PORT: u16 = 8080;
const ECHO_UDP_PORT: u16 = 5353;
const BULK_PORT: u16 = 9000;
/// A UDP port no backend listens on.
const CLOSED_UDP_PORT: u16 = 5999;
const MIB: u64 = 1 << 20;
const BULK_BYTES: u64 = 4 * MIB;
/// A 4 MiB transfer over veth takes milliseconds; a stall exceeds this.
const TRANSFER_BOUND: Duration = Duration::from_secs(20);
/// Connects and single requests.
const TIMEOUT: Duration = Duration::from_secs(5);
const LB_IFS: &[&str] = &["lbc0", "lbb1", "lbb2", "lbb3"];

// ------------------------------------------------------------ addressing

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Nat {
    /// The backend sees the client's address.
    Dnat,
    /// The source is translated too, to the LB's address on the client link.
    Full,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The frontend of the DNAT service (`10.73.0.10`, `fd00:73::10`) or
    /// of the full NAT one (`.20`, `::20`).
    fn frontend(self, nat: Nat, port: u16) -> SocketAddr {
        let ip: IpAddr = match (self, nat) {
            (Family::V4, Nat::Dnat) => Ipv4Addr::new(10, 73, 0, 10).into(),
            (Family::V4, Nat::Full) => Ipv4Addr::new(10, 73, 0, 20).into(),
            (Family::V6, Nat::Dnat) => Ipv6Addr::new(0xfd00, 0x73, 0, 0, 0, 0, 0, 0x10).into(),
            (Family::V6, Nat::Full) => Ipv6Addr::new(0xfd00, 0x73, 0, 0, 0, 0, 0, 0x20).into(),
        };
        SocketAddr::new(ip, port)
    }

    fn client(self) -> IpAddr {
        match self {
            Family::V4 => CLIENT_V4.into(),
            Family::V6 => CLIENT_V6.into(),
        }
    }

    /// The full NAT source: the LB's address on the client link, which
    /// every backend reaches through its default route.
    fn snat(self) -> IpAddr {
        match self {
            Family::V4 => LB_CLIENT_V4.into(),
            Family::V6 => LB_CLIENT_V6.into(),
        }
    }

    /// Backend `b{n}`'s address.
    fn backend(self, n: u8, port: u16) -> SocketAddr {
        let ip: IpAddr = match self {
            Family::V4 => Ipv4Addr::new(10, 72, n, 2).into(),
            Family::V6 => Ipv6Addr::new(0xfd00, 0x72, u16::from(n), 0, 0, 0, 0, 2).into(),
        };
        SocketAddr::new(ip, port)
    }
}

// ------------------------------------------------------------ configuration

struct Service {
    name: &'static str,
    /// `ADDR:PORT/tcp` or `.../udp`.
    frontend: String,
    /// TOML array items: `"ADDR:PORT"` or `{ addr = ..., weight = ... }`.
    backends: Vec<String>,
    snat: Option<IpAddr>,
}

impl Service {
    fn new(name: &'static str, frontend: SocketAddr, proto: &str, backends: &[SocketAddr]) -> Self {
        Self {
            name,
            frontend: format!("{frontend}/{proto}"),
            backends: backends.iter().map(|b| format!("\"{b}\"")).collect(),
            snat: None,
        }
    }

    fn snat(mut self, nat: Nat, family: Family) -> Self {
        self.snat = (nat == Nat::Full).then(|| family.snat());
        self
    }

    /// Gives `backend` weight 0: it takes no new flows.
    fn weight_zero(mut self, backend: SocketAddr) -> Self {
        let quoted = format!("\"{backend}\"");
        for b in &mut self.backends {
            if *b == quoted {
                *b = format!("{{ addr = {quoted}, weight = 0 }}");
            }
        }
        self
    }
}

fn render(services: &[Service]) -> String {
    let mut out = String::new();
    for s in services {
        out.push_str(&format!(
            "[[service]]\nname = \"{}\"\nfrontend = \"{}\"\nbackends = [{}]\n",
            s.name,
            s.frontend,
            s.backends.join(", ")
        ));
        if let Some(snat) = s.snat {
            out.push_str(&format!("snat = \"{snat}\"\n"));
        }
        out.push('\n');
    }
    out
}

/// `b1..=bN` on `port`.
fn backends(family: Family, port: u16, n: u8) -> Vec<SocketAddr> {
    (1..=n).map(|i| family.backend(i, port)).collect()
}

// ------------------------------------------------------------ environment

/// Dropped in declaration order: lbd first (it detaches and unpins), then
/// the bulk servers, then the namespaces.
struct Env {
    lbd: Lbd,
    _bulk: Vec<ChildGuard>,
    topo: Topology,
}

/// Starts a bulk server on [`BULK_PORT`] in each of `backends` (indices).
fn start_bulk(topo: &Topology, backends: &[usize]) -> Vec<ChildGuard> {
    let bin = bulk::bulk_bin();
    backends
        .iter()
        .map(|&i| {
            let b = &topo.backends[i];
            bulk::start_server(&b.ns, &bin, &b.name, BULK_PORT)
                .unwrap_or_else(|e| panic!("bulk server of {}: {e:#}", b.name))
        })
        .collect()
}

fn service_status<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no service {name} in {status:#}"))
}

fn backend_state(lbd: &Lbd, service: &str, address: &str) -> Option<String> {
    let status = lbd.status().ok()?;
    service_status(&status, service)["backends"]
        .as_array()?
        .iter()
        .find(|b| b["address"] == address)
        .and_then(|b| b["state"].as_str().map(str::to_owned))
}

/// Runs `f` on its own thread inside `ns` (joined by the caller), with its
/// error rendered as text.
fn spawn_in<F>(ns: &Netns, f: F) -> std::thread::JoinHandle<Result<Transfer, String>>
where
    F: FnOnce() -> anyhow::Result<Transfer> + Send + 'static,
{
    ns.spawn(move || f().map_err(|e| format!("{e:#}")))
}

fn describe(what: &str, t: &Transfer) -> String {
    let secs = t.elapsed.as_secs_f64().max(1e-6);
    format!(
        "{what} of {} served by {} in {:.0} ms ({:.0} MiB/s)",
        human(t.bytes),
        t.backend,
        secs * 1000.0,
        t.bytes as f64 / MIB as f64 / secs
    )
}

// ------------------------------------------------------------ 1. bulk transfers

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Offload {
    On,
    Off,
    /// Off, and lbd runs the XDP fast path on every interface of the LB
    /// node: senders that checksum in software are what makes a veth
    /// qualify, as a NIC does (docs/datapath.md, section 8).
    OffWithXdp,
    /// On, and lbd runs with `--no-redirect-peer`: translated packets are
    /// transmitted on the LB node's veths instead of handed to the peer.
    OnThroughVeth,
}

/// The interfaces every packet of a balanced flow crosses, by namespace.
fn every_link(topo: &Topology) -> Vec<(&Netns, String)> {
    let mut out = vec![
        (&topo.client, "eth0".to_owned()),
        (&topo.lb, LB_CLIENT_IF.to_owned()),
    ];
    for b in &topo.backends {
        out.push((&topo.lb, b.lb_if.clone()));
        out.push((&b.ns, "eth0".to_owned()));
    }
    out
}

/// Three downloads and three uploads of 4 MiB at once through one frontend
/// balanced over three backends: every byte checked, each transfer within
/// [`TRANSFER_BOUND`], each backend seeing the expected client address.
fn bulk_transfers(tag: &str, family: Family, nat: Nat, offload: Offload) {
    let topo = Topology::new(tag).expect("topology");
    if !matches!(offload, Offload::On | Offload::OnThroughVeth) {
        for (ns, dev) in every_link(&topo) {
            set_checksum_offload(ns, &dev, false)
                .unwrap_or_else(|e| panic!("turning offloads off: {e:#}"));
        }
    }
    let xdp = offload == Offload::OffWithXdp;
    if xdp {
        // The XDP program redirects into the LB node's veths, whose peers
        // must then poll for frames themselves.
        for (ns, dev) in every_link(&topo)
            .into_iter()
            .filter(|(ns, _)| ns.name() != topo.lb.name())
        {
            set_gro(ns, &dev, true).unwrap_or_else(|e| panic!("turning GRO on: {e:#}"));
        }
    }
    let bulk = start_bulk(&topo, &[0, 1, 2]);
    let frontend = family.frontend(nat, 80);
    let veths_before = veth_counts(&topo);
    let config = render(&[
        Service::new("bulk", frontend, "tcp", &backends(family, BULK_PORT, 3)).snat(nat, family),
    ]);
    let xdp_args = ["--xdp", &LB_IFS.join(",")];
    let extra: &[&str] = match offload {
        Offload::OffWithXdp => &xdp_args,
        Offload::OnThroughVeth => &["--no-redirect-peer"],
        Offload::On | Offload::Off => &[],
    };
    let lbd = Lbd::start_with(&topo.lb, tag, &config, LB_IFS, extra).expect("lbd");
    let env = Env {
        lbd,
        _bulk: bulk,
        topo,
    };
    if xdp {
        let status = env.lbd.status().expect("status");
        let mut on: Vec<&str> = status["xdp"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        on.sort();
        let mut want = LB_IFS.to_vec();
        want.sort();
        assert_eq!(
            on,
            want,
            "interfaces with the XDP fast path:\n{}",
            env.lbd.log()
        );
    }
    let what = format!(
        "{} {} with checksum offloads {}",
        family.name(),
        match nat {
            Nat::Dnat => "DNAT",
            Nat::Full => "full NAT",
        },
        match offload {
            Offload::On => "on",
            Offload::Off => "off",
            Offload::OffWithXdp => "off, XDP fast path on",
            Offload::OnThroughVeth => "on, without redirect_peer",
        }
    );

    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push((
            "download",
            spawn_in(&env.topo.client, move || {
                bulk::download(frontend, BULK_BYTES, TRANSFER_BOUND)
            }),
        ));
        handles.push((
            "upload",
            spawn_in(&env.topo.client, move || {
                bulk::upload(frontend, BULK_BYTES, TRANSFER_BOUND)
            }),
        ));
    }
    let expected_peer = match nat {
        Nat::Dnat => family.client(),
        Nat::Full => family.snat(),
    };
    let mut failures = Vec::new();
    let mut served = std::collections::BTreeSet::new();
    for (kind, h) in handles {
        match h.join().expect("transfer thread panicked") {
            Ok(t) => {
                eprintln!("{what}: {}", describe(kind, &t));
                served.insert(t.backend.clone());
                if t.peer.ip() != expected_peer {
                    failures.push(format!(
                        "{kind} via {frontend}: {} saw the client as {}, expected {expected_peer}",
                        t.backend, t.peer
                    ));
                }
            }
            Err(e) => failures.push(e),
        }
    }
    eprintln!("{what}: served by {served:?}");
    assert!(
        failures.is_empty(),
        "{} of 6 concurrent transfers ({what}) failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    if xdp {
        // 24 MiB moved, in segments of at most one MTU each way plus the
        // ACKs: tens of thousands of packets, all but a connection's first
        // few and one a second through XDP.
        let counters = &env.lbd.status().expect("status")["datapath"];
        let by_xdp = counters["xdp_translated"].as_u64().unwrap_or(0);
        let by_tc = counters["translated"].as_u64().unwrap_or(0) - by_xdp;
        eprintln!("{what}: {by_xdp} packets translated by XDP, {by_tc} by TC");
        assert!(
            by_xdp > 10_000 && by_xdp > 10 * by_tc,
            "the XDP fast path carried {by_xdp} packets, TC {by_tc}"
        );
    } else {
        // Every node beyond the LB's veths is a namespace of its own, as a
        // local container is: the TC program hands the translated packets
        // to the far end directly, and the LB's end never transmits them.
        let (peers_rx, lb_tx) = veth_counts(&env.topo);
        let (peers_rx, lb_tx) = (peers_rx - veths_before.0, lb_tx - veths_before.1);
        eprintln!(
            "{what}: the far ends of the LB's veths received {peers_rx} packets, the LB's \
             ends transmitted {lb_tx}"
        );
        // 24 MiB in segments of up to 64 KiB with offloads on, of one MTU
        // without.
        assert!(
            peers_rx > 300,
            "only {peers_rx} packets crossed the LB's veths"
        );
        let listed = env.lbd.status().expect("status")["peer_ports"].as_u64();
        let want = if offload == Offload::OnThroughVeth {
            0
        } else {
            LB_IFS.len() as u64
        };
        assert_eq!(
            listed,
            Some(want),
            "veths lbd lists as into other namespaces"
        );
        if offload == Offload::OnThroughVeth {
            assert!(
                lb_tx >= peers_rx,
                "without redirect_peer, the LB's veths transmitted only {lb_tx} of {peers_rx}"
            );
        } else {
            assert!(
                lb_tx * 10 < peers_rx,
                "the LB's veths transmitted {lb_tx} of {peers_rx} packets: bpf_redirect_peer \
                 was not used"
            );
        }
    }
}

/// Packets received by the far ends of the LB node's veths, and packets
/// transmitted by the LB's ends, summed.
fn veth_counts(topo: &Topology) -> (u64, u64) {
    let mut sums = (0, 0);
    for (ns, dev) in every_link(topo) {
        let (rx, tx) = packet_counts(ns, &dev).expect("counters");
        if ns.name() == topo.lb.name() {
            sums.1 += tx;
        } else {
            sums.0 += rx;
        }
    }
    sums
}

#[test]
fn bulk_ipv4_dnat_offload_on() {
    bulk_transfers("bk4d", Family::V4, Nat::Dnat, Offload::On);
}

#[test]
fn bulk_ipv4_dnat_offload_off() {
    bulk_transfers("bk4dx", Family::V4, Nat::Dnat, Offload::Off);
}

#[test]
fn bulk_ipv4_dnat_through_the_veth() {
    bulk_transfers("bk4dv", Family::V4, Nat::Dnat, Offload::OnThroughVeth);
}

#[test]
fn bulk_ipv4_dnat_xdp() {
    bulk_transfers("bk4dp", Family::V4, Nat::Dnat, Offload::OffWithXdp);
}

#[test]
fn bulk_ipv4_full_nat_xdp() {
    bulk_transfers("bk4fp", Family::V4, Nat::Full, Offload::OffWithXdp);
}

#[test]
fn bulk_ipv6_dnat_xdp() {
    bulk_transfers("bk6dp", Family::V6, Nat::Dnat, Offload::OffWithXdp);
}

#[test]
fn bulk_ipv6_full_nat_xdp() {
    bulk_transfers("bk6fp", Family::V6, Nat::Full, Offload::OffWithXdp);
}

#[test]
fn bulk_ipv4_full_nat_offload_on() {
    bulk_transfers("bk4f", Family::V4, Nat::Full, Offload::On);
}

#[test]
fn bulk_ipv4_full_nat_offload_off() {
    bulk_transfers("bk4fx", Family::V4, Nat::Full, Offload::Off);
}

#[test]
fn bulk_ipv6_dnat_offload_on() {
    bulk_transfers("bk6d", Family::V6, Nat::Dnat, Offload::On);
}

#[test]
fn bulk_ipv6_dnat_offload_off() {
    bulk_transfers("bk6dx", Family::V6, Nat::Dnat, Offload::Off);
}

#[test]
fn bulk_ipv6_full_nat_offload_on() {
    bulk_transfers("bk6f", Family::V6, Nat::Full, Offload::On);
}

#[test]
fn bulk_ipv6_full_nat_offload_off() {
    bulk_transfers("bk6fx", Family::V6, Nat::Full, Offload::Off);
}

// ------------------------------------------------------------ 2. path MTU

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// Client to backend: the backend's link is the narrow one.
    Upload,
    /// Backend to client: the client's link is the narrow one.
    Download,
}

/// A 4 MiB transfer whose receiver sits behind a link with a smaller MTU
/// than the sender's. The receiver advertises an MSS for a 1500-byte path
/// (`advmss` on its default route, as a host one hop further away would),
/// so full-size segments reach the balancer, which must answer them with
/// ICMP "fragmentation needed" / "packet too big" that the sender's socket
/// accepts. MTU probing is off: only those ICMP errors can shrink the
/// segments.
fn path_mtu(tag: &str, family: Family, direction: Direction) {
    let mtu: u32 = match family {
        Family::V4 => 1200,
        Family::V6 => 1280,
    };
    let topo = Topology::new(tag).expect("topology");
    let b1 = &topo.backends[0];
    let (narrow, receiver, receiver_gw) = match direction {
        Direction::Upload => (
            [(&topo.lb, b1.lb_if.as_str()), (&b1.ns, "eth0")],
            &b1.ns,
            (b1.lb_v4, b1.lb_v6),
        ),
        Direction::Download => (
            [(&topo.lb, LB_CLIENT_IF), (&topo.client, "eth0")],
            &topo.client,
            (LB_CLIENT_V4, LB_CLIENT_V6),
        ),
    };
    for (ns, dev) in narrow {
        set_mtu(ns, dev, mtu).expect("setting the MTU");
    }
    // (An MTU below 1280 also takes IPv6 off the link: only the family
    // under test gets the route.)
    let route = match family {
        Family::V4 => ["-4", &receiver_gw.0.to_string(), "1460"].map(str::to_owned),
        Family::V6 => ["-6", &receiver_gw.1.to_string(), "1440"].map(str::to_owned),
    };
    receiver
        .ip(&[
            &route[0], "route", "replace", "default", "via", &route[1], "dev", "eth0", "advmss",
            &route[2],
        ])
        .expect("advmss on the default route");
    for ns in [&topo.client, &b1.ns] {
        ns.sysctl("net.ipv4.tcp_mtu_probing", "0")
            .expect("MTU probing off");
    }
    let bulk = start_bulk(&topo, &[0]);
    let frontend = family.frontend(Nat::Dnat, 80);
    let config = render(&[Service::new(
        "bulk",
        frontend,
        "tcp",
        &[family.backend(1, BULK_PORT)],
    )]);
    let lbd = Lbd::start(&topo.lb, tag, &config, LB_IFS).expect("lbd");
    let env = Env {
        lbd,
        _bulk: bulk,
        topo,
    };

    let setup = match direction {
        Direction::Upload => format!(
            "{} upload, client link 1500, b1's link {mtu}",
            family.name()
        ),
        Direction::Download => format!(
            "{} download, b1's link 1500, client link {mtu}",
            family.name()
        ),
    };
    // "Fragmentation needed" is a destination unreachable (code 4).
    let (group, out_name, in_name, kind) = match family {
        Family::V4 => (
            "Icmp",
            "OutDestUnreachs",
            "InDestUnreachs",
            "destination unreachable",
        ),
        Family::V6 => ("Icmp6", "OutPktTooBigs", "InPktTooBigs", "packet too big"),
    };
    let sender = match direction {
        Direction::Upload => &env.topo.client,
        Direction::Download => &env.topo.backends[0].ns,
    };
    let icmp = || {
        (
            snmp_counter(&env.topo.lb, group, out_name).unwrap_or(0),
            snmp_counter(sender, group, in_name).unwrap_or(0),
        )
    };
    let before = icmp();
    let result = env.topo.client.run(move || match direction {
        Direction::Upload => bulk::upload(frontend, BULK_BYTES, TRANSFER_BOUND),
        Direction::Download => bulk::download(frontend, BULK_BYTES, TRANSFER_BOUND),
    });
    let after = icmp();
    let icmp = format!(
        "the LB node's stack sent {} ICMP {kind}, the sender received {}",
        after.0 - before.0,
        after.1 - before.1
    );
    let transfer = result.unwrap_or_else(|e| {
        let status = env.lbd.status().map(|s| s["datapath"].clone());
        panic!(
            "path MTU discovery through the balancer ({setup}): {e:#}\n{icmp}; datapath counters: {}",
            status.map(|s| s.to_string()).unwrap_or_default()
        )
    });
    eprintln!("{setup}: {icmp}");
    eprintln!("{setup}: {}", describe("transfer", &transfer));
    if direction == Direction::Upload {
        // The sender learnt the path MTU; nothing fragmented for it.
        let pmtu = transfer.info.map(|i| i.pmtu).unwrap_or(0);
        assert!(
            pmtu <= mtu,
            "{setup}: the transfer completed but the client's path MTU is {pmtu}, not at most {mtu}"
        );
    }
}

#[test]
fn pmtu_ipv4_upload_to_a_backend_behind_a_smaller_mtu() {
    path_mtu("pm4u", Family::V4, Direction::Upload);
}

#[test]
fn pmtu_ipv4_download_to_a_client_behind_a_smaller_mtu() {
    path_mtu("pm4d", Family::V4, Direction::Download);
}

#[test]
fn pmtu_ipv6_upload_to_a_backend_behind_a_smaller_mtu() {
    path_mtu("pm6u", Family::V6, Direction::Upload);
}

#[test]
fn pmtu_ipv6_download_to_a_client_behind_a_smaller_mtu() {
    path_mtu("pm6d", Family::V6, Direction::Download);
}

// ------------------------------------------------------------ 3. ICMP errors

const REFUSED_ATTEMPTS: usize = 5;
const REFUSED_WAIT: Duration = Duration::from_secs(1);

/// What a connected UDP socket saw.
enum UdpOutcome {
    Refused { after: Duration, sent: usize },
    Nothing { sent: usize },
    Answered(String),
    Failed(String),
}

/// Sends a datagram at a time on a socket connected to `target`, until
/// a receive fails with ECONNREFUSED (bounded attempts, 1 s each).
fn udp_until_refused(target: SocketAddr) -> UdpOutcome {
    let any: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let start = Instant::now();
    let sock = match UdpSocket::bind(any).and_then(|s| s.connect(target).map(|()| s)) {
        Ok(s) => s,
        Err(e) => return UdpOutcome::Failed(format!("udp socket to {target}: {e}")),
    };
    if let Err(e) = sock.set_read_timeout(Some(REFUSED_WAIT)) {
        return UdpOutcome::Failed(e.to_string());
    }
    let mut buf = [0u8; 2048];
    for sent in 1..=REFUSED_ATTEMPTS {
        match sock.send(b"ping\n") {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                return UdpOutcome::Refused {
                    after: start.elapsed(),
                    sent: sent - 1,
                }
            }
            Err(e) => return UdpOutcome::Failed(format!("udp send to {target}: {e}")),
        }
        match sock.recv(&mut buf) {
            Ok(n) => return UdpOutcome::Answered(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                return UdpOutcome::Refused {
                    after: start.elapsed(),
                    sent,
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return UdpOutcome::Failed(format!("udp receive from {target}: {e}")),
        }
    }
    UdpOutcome::Nothing {
        sent: REFUSED_ATTEMPTS,
    }
}

/// A UDP service whose only backend has no listener: the backend's port
/// unreachable must reach the client as an error about client -> frontend,
/// which Linux reports on the connected socket as ECONNREFUSED (it does so
/// only when the quoted header matches the socket).
fn icmp_port_unreachable(tag: &str, family: Family, nat: Nat) {
    let topo = Topology::new(tag).expect("topology");
    let frontend = family.frontend(nat, 53);
    let backend = family.backend(1, CLOSED_UDP_PORT);
    let config = render(&[Service::new("udp", frontend, "udp", &[backend]).snat(nat, family)]);
    let lbd = Lbd::start(&topo.lb, tag, &config, LB_IFS).expect("lbd");
    let env = Env {
        lbd,
        _bulk: Vec::new(),
        topo,
    };
    let (group, sent_name, recv_name) = match family {
        Family::V4 => ("Icmp", "OutDestUnreachs", "InDestUnreachs"),
        Family::V6 => ("Icmp6", "OutDestUnreachs", "InDestUnreachs"),
    };
    let b1 = &env.topo.backends[0].ns;
    let counters = || {
        (
            snmp_counter(b1, group, sent_name).unwrap_or(0),
            snmp_counter(&env.topo.client, group, recv_name).unwrap_or(0),
        )
    };
    let before = counters();
    let outcome = env.topo.client.run(move || udp_until_refused(frontend));
    let after = counters();
    let icmp = format!(
        "b1 sent {} destination unreachable, the client received {}",
        after.0 - before.0,
        after.1 - before.1
    );
    let what = format!(
        "{} {} UDP to {frontend} (only backend {backend}, nothing listening)",
        family.name(),
        match nat {
            Nat::Dnat => "DNAT",
            Nat::Full => "full NAT",
        }
    );
    match outcome {
        UdpOutcome::Refused { after, sent } => {
            eprintln!("{what}: ECONNREFUSED after {sent} datagrams, {after:?} ({icmp})");
        }
        UdpOutcome::Nothing { sent } => panic!(
            "{what}: no ECONNREFUSED on the connected socket within {:?} ({sent} datagrams; {icmp}): \
             the port unreachable did not reach the client as an error about client -> frontend",
            REFUSED_WAIT * REFUSED_ATTEMPTS as u32
        ),
        UdpOutcome::Answered(text) => panic!("{what}: unexpected answer {text:?}"),
        UdpOutcome::Failed(e) => panic!("{what}: {e}"),
    }
}

#[test]
fn icmp_port_unreachable_reaches_an_ipv4_client_from_the_frontend() {
    icmp_port_unreachable("ic4d", Family::V4, Nat::Dnat);
}

#[test]
fn icmp_port_unreachable_reaches_an_ipv6_client_from_the_frontend() {
    icmp_port_unreachable("ic6d", Family::V6, Nat::Dnat);
}

#[test]
fn icmp_port_unreachable_reaches_an_ipv4_client_through_full_nat() {
    icmp_port_unreachable("ic4f", Family::V4, Nat::Full);
}

#[test]
fn icmp_port_unreachable_reaches_an_ipv6_client_through_full_nat() {
    icmp_port_unreachable("ic6f", Family::V6, Nat::Full);
}

// ------------------------------------------------------------ 4. hairpin

/// b1 is the only backend of its service and connects to the frontend
/// itself: the flow must come back to b1 through the balancer.
fn hairpin(tag: &str, family: Family) {
    let mut topo = Topology::new(tag).expect("topology");
    topo.start_server(0, &echo_bin(), ECHO_PORT, ECHO_UDP_PORT)
        .expect("echo server");
    let bulk = start_bulk(&topo, &[0]);
    let web = family.frontend(Nat::Dnat, 80);
    let bulk_frontend = family.frontend(Nat::Dnat, 81);
    let config = render(&[
        Service::new("web", web, "tcp", &[family.backend(1, ECHO_PORT)]),
        Service::new(
            "bulk",
            bulk_frontend,
            "tcp",
            &[family.backend(1, BULK_PORT)],
        ),
    ]);
    let lbd = Lbd::start(&topo.lb, tag, &config, LB_IFS).expect("lbd");
    let env = Env {
        lbd,
        _bulk: bulk,
        topo,
    };
    let b1 = &env.topo.backends[0].ns;
    let what = format!("{} hairpin from b1", family.name());

    let (name, peer) = b1
        .run(move || tcp_request(web, TIMEOUT))
        .unwrap_or_else(|e| panic!("{what}: request to its own service's frontend: {e:#}"));
    assert_eq!(name, "b1", "{what}: answered by {name}");
    eprintln!("{what}: answered by b1, which saw the client as {peer}");

    let bytes = MIB;
    let down = b1.run(move || bulk::download(bulk_frontend, bytes, TRANSFER_BOUND));
    let up = b1.run(move || bulk::upload(bulk_frontend, bytes, TRANSFER_BOUND));
    let mut failures = Vec::new();
    for (kind, r) in [("download", down), ("upload", up)] {
        match r {
            Ok(t) => eprintln!("{what}: {}", describe(kind, &t)),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: 1 MiB transfers through the frontend failed:\n  {}",
        failures.join("\n  ")
    );
}

#[test]
fn hairpin_ipv4_backend_reaches_its_own_service() {
    hairpin("hp4", Family::V4);
}

#[test]
fn hairpin_ipv6_backend_reaches_its_own_service() {
    hairpin("hp6", Family::V6);
}

// ------------------------------------------------------------ 5. drain, reused port

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    /// The client closes with SO_LINGER 0: a reset, no TIME_WAIT anywhere.
    ClientResets,
    /// The server closes first (FIN); the client closes after it, so the
    /// client keeps no TIME_WAIT (the backend does).
    ServerFirst,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Removal {
    /// `lbctl drain SERVICE ADDR`.
    Lbctl,
    /// A configuration reload that gives the backend weight 0.
    WeightZero,
}

const REUSED_PORT: u16 = 41234;
const RECONNECTS: usize = 10;

/// One connection from `local` to `target`: the name of the backend that
/// answered. The connection is closed as `close` says.
fn exchange(local: SocketAddr, target: SocketAddr, close: Close) -> anyhow::Result<String> {
    let opts = ConnectOptions {
        local: Some(local),
        reset_on_close: close == Close::ClientResets,
    };
    match close {
        Close::ClientResets => {
            let stream = bulk::connect(target, opts, TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            (&stream).write_all(b"hello\n")?;
            let mut line = Vec::new();
            BufReader::new(&stream)
                .take(4096)
                .read_until(b'\n', &mut line)?;
            anyhow::ensure!(
                line.ends_with(b"\n"),
                "no answer from {target} (got {:?})",
                String::from_utf8_lossy(&line)
            );
            Ok(parse_reply(&String::from_utf8_lossy(&line))?.0)
            // Dropped here: SO_LINGER 0 sends a reset.
        }
        // Reads the name and then the server's FIN before closing.
        Close::ServerFirst => Ok(bulk::download_with(target, 0, TIMEOUT, opts)?.backend),
    }
}

/// A client that always connects from the same port learns its backend,
/// closes, the backend stops taking new flows, and the client reconnects
/// from that port ten times: no reconnection may reach that backend (the
/// previous connection's state on the balancer must not pin the new one).
fn drain_with_reused_port(tag: &str, close: Close, removal: Removal) {
    let mut topo = Topology::new(tag).expect("topology");
    topo.start_servers(&echo_bin(), ECHO_PORT, ECHO_UDP_PORT)
        .expect("echo servers");
    let bulk = start_bulk(&topo, &[0, 1, 2]);
    let family = Family::V4;
    let web = family.frontend(Nat::Dnat, 80);
    let bulk_frontend = family.frontend(Nat::Dnat, 81);
    let services = |zero: Option<(&str, SocketAddr)>| {
        let web_svc = Service::new("web", web, "tcp", &backends(family, ECHO_PORT, 3));
        let bulk_svc = Service::new(
            "bulk",
            bulk_frontend,
            "tcp",
            &backends(family, BULK_PORT, 3),
        );
        match zero {
            Some(("web", b)) => vec![web_svc.weight_zero(b), bulk_svc],
            Some((_, b)) => vec![web_svc, bulk_svc.weight_zero(b)],
            None => vec![web_svc, bulk_svc],
        }
    };
    let lbd = Lbd::start(&topo.lb, tag, &render(&services(None)), LB_IFS).expect("lbd");
    let env = Env {
        lbd,
        _bulk: bulk,
        topo,
    };
    let (service, target, port) = match close {
        Close::ClientResets => ("web", web, ECHO_PORT),
        Close::ServerFirst => ("bulk", bulk_frontend, BULK_PORT),
    };
    let local = SocketAddr::new(family.client(), REUSED_PORT);

    let first = env
        .topo
        .client
        .run(move || exchange(local, target, close))
        .unwrap_or_else(|e| panic!("first connection from {local} to {target}: {e:#}"));
    let n: u8 = first[1..].parse().expect("backend names are bN");
    let drained = family.backend(n, port);
    let address = drained.to_string();
    match removal {
        Removal::Lbctl => {
            let out = lbctl(&env.lbd.socket, &["drain", service, &address]).expect("lbctl drain");
            assert!(out.contains("draining"), "lbctl drain said: {out}");
        }
        Removal::WeightZero => {
            env.lbd
                .reload(&render(&services(Some((service, drained)))))
                .expect("reload");
        }
    }
    wait_until(Duration::from_secs(5), "the backend to be draining", || {
        backend_state(&env.lbd, service, &address).as_deref() == Some("draining")
    })
    .expect("drain applied");

    let results = env.topo.client.run(move || {
        (0..RECONNECTS)
            .map(|_| exchange(local, target, close).map_err(|e| format!("{e:#}")))
            .collect::<Vec<_>>()
    });
    let how = match removal {
        Removal::Lbctl => "`lbctl drain`",
        Removal::WeightZero => "weight 0",
    };
    let mut problems = Vec::new();
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(name) if *name == first => problems.push(format!(
                "reconnection {} reached the drained backend {first}",
                i + 1
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("reconnection {} failed: {e}", i + 1)),
        }
    }
    eprintln!("{service}: first {first}, then {results:?}");
    assert!(
        problems.is_empty(),
        "{service} via {target} from the reused port {local} ({close:?}), after {first} ({address}) \
         was drained by {how}: {} of {RECONNECTS} reconnections went wrong:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

#[test]
fn drain_reused_port_client_resets() {
    drain_with_reused_port("drcr", Close::ClientResets, Removal::Lbctl);
}

#[test]
fn drain_reused_port_server_closes_first() {
    drain_with_reused_port("drsf", Close::ServerFirst, Removal::Lbctl);
}

#[test]
fn weight_zero_reused_port_client_resets() {
    drain_with_reused_port("w0cr", Close::ClientResets, Removal::WeightZero);
}

#[test]
fn weight_zero_reused_port_server_closes_first() {
    drain_with_reused_port("w0sf", Close::ServerFirst, Removal::WeightZero);
}

// ------------------------------------------------------------ 6. SYN flood

const MAX_FLOWS: usize = 1024;
const SESSIONS: usize = 5;
/// Spoofed sources: a range no namespace routes, blackholed on the LB so
/// the backends' SYN-ACKs end there.
const SPOOFED_NET: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 0);
const SPOOFED_PREFIX: u8 = 16;

/// Long-lived connections held by a thread inside the client namespace.
struct Sessions {
    requests: Option<mpsc::Sender<()>>,
    replies: mpsc::Receiver<Vec<Result<String, String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sessions {
    fn open(ns: &Netns, target: SocketAddr, count: usize) -> Result<Sessions, String> {
        let (to_client, requests) = mpsc::channel::<()>();
        let (replies, from_client) = mpsc::channel();
        let (opened_tx, opened) = mpsc::channel();
        let thread = ns.spawn(move || {
            let sessions: Result<Vec<TcpSession>, String> = (0..count)
                .map(|_| TcpSession::connect(target, TIMEOUT).map_err(|e| format!("{e:#}")))
                .collect();
            let mut sessions = match sessions {
                Ok(s) => {
                    let _ = opened_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = opened_tx.send(Err(e));
                    return;
                }
            };
            while requests.recv().is_ok() {
                let answer = sessions
                    .iter_mut()
                    .map(|s| {
                        s.request().map(|(name, _)| name).map_err(|e| {
                            let timed_out = e
                                .root_cause()
                                .downcast_ref::<std::io::Error>()
                                .is_some_and(|io| {
                                    matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
                                });
                            if timed_out {
                                format!("no answer within {TIMEOUT:?}")
                            } else {
                                format!("{e:#}")
                            }
                        })
                    })
                    .collect();
                if replies.send(answer).is_err() {
                    return;
                }
            }
        });
        let mut sessions = Sessions {
            requests: Some(to_client),
            replies: from_client,
            thread: Some(thread),
        };
        match opened.recv_timeout(TIMEOUT * count as u32) {
            Ok(Ok(())) => Ok(sessions),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                sessions.requests.take();
                Err("opening the long-lived connections timed out".into())
            }
        }
    }

    /// One request on every connection: the backend that answered each.
    fn ask(&self) -> Vec<Result<String, String>> {
        self.requests
            .as_ref()
            .expect("sessions open")
            .send(())
            .expect("the sessions thread is running");
        self.replies
            .recv_timeout(TIMEOUT * 2 * SESSIONS as u32)
            .expect("the long-lived connections answer within their timeouts")
    }
}

impl Drop for Sessions {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// lbd with `--max-flows 1024`; five established connections; ten times
/// that many SYNs from spoofed sources. The established connections must
/// keep their state: to make a lost conntrack entry visible (a flow that
/// lost it would just be re-balanced by the same hash to the same
/// backend), every backend holding one of them is drained before they are
/// used again, so a connection that lost its entry moves and is reset.
#[test]
fn syn_flood_does_not_displace_established_connections() {
    let tag = "flood";
    let mut topo = Topology::new(tag).expect("topology");
    topo.start_servers(&echo_bin(), ECHO_PORT, ECHO_UDP_PORT)
        .expect("echo servers");
    topo.lb
        .ip(&[
            "route",
            "add",
            "blackhole",
            &format!("{SPOOFED_NET}/{SPOOFED_PREFIX}"),
        ])
        .expect("blackhole route for the spoofed sources");
    let family = Family::V4;
    let web = family.frontend(Nat::Dnat, 80);
    let config = render(&[Service::new(
        "web",
        web,
        "tcp",
        &backends(family, ECHO_PORT, 3),
    )]);
    let max_flows = MAX_FLOWS.to_string();
    let lbd =
        Lbd::start_with(&topo.lb, tag, &config, LB_IFS, &["--max-flows", &max_flows]).expect("lbd");
    let env = Env {
        lbd,
        _bulk: Vec::new(),
        topo,
    };

    let sessions = Sessions::open(&env.topo.client, web, SESSIONS)
        .unwrap_or_else(|e| panic!("opening {SESSIONS} connections to {web}: {e}"));
    let before: Vec<String> = sessions
        .ask()
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("a long-lived connection before the flood: {e}")))
        .collect();
    eprintln!("long-lived connections on {before:?}");
    let web_counter = |lbd: &Lbd, name: &str| {
        lbd.status()
            .map(|s| service_status(&s, "web")["counters"][name].as_u64())
            .ok()
            .flatten()
            .unwrap_or(0)
    };
    let flows_before = web_counter(&env.lbd, "new_flows");

    let count = 10 * MAX_FLOWS;
    let target = match web {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!("the flood is IPv4"),
    };
    let started = Instant::now();
    let sent = env
        .topo
        .client
        .run(move || {
            syn_flood(
                SocketAddrV4::new(*target.ip(), target.port()),
                SPOOFED_NET,
                SPOOFED_PREFIX,
                count,
                Duration::from_secs(10),
            )
        })
        .expect("SYN flood");
    std::thread::sleep(Duration::from_millis(300));
    let flooded = web_counter(&env.lbd, "new_flows").saturating_sub(flows_before);
    let status = env.lbd.status().expect("status");
    eprintln!(
        "{sent} spoofed SYNs in {:?}: {flooded} new flows; conntrack {} of {}; datapath {}",
        started.elapsed(),
        status["conntrack_entries"],
        status["conntrack_capacity"],
        status["datapath"]
    );
    // Otherwise the test would prove nothing.
    assert!(
        flooded >= 2 * MAX_FLOWS as u64,
        "the flood did not reach the datapath: {flooded} new flows from {sent} SYNs"
    );

    let mut held: Vec<String> = before
        .iter()
        .map(|name| {
            let n: u8 = name[1..].parse().expect("backend names are bN");
            family.backend(n, ECHO_PORT).to_string()
        })
        .collect();
    held.sort();
    held.dedup();
    for address in &held {
        lbctl(&env.lbd.socket, &["drain", "web", address]).expect("lbctl drain");
    }

    let counters = |lbd: &Lbd| {
        (
            web_counter(lbd, "new_flows"),
            web_counter(lbd, "no_backend"),
        )
    };
    let (flows, no_backend) = counters(&env.lbd);
    let after = sessions.ask();
    let (flows_then, no_backend_then) = counters(&env.lbd);
    // With every backend of theirs drained, packets of these connections
    // that the balancer no longer knows count as new flows or, with no
    // backend left, as `no_backend`.
    let lost = format!(
        "while the connections were used again the service counted {} new flows and {} \
         packets without a backend",
        flows_then - flows,
        no_backend_then - no_backend
    );
    eprintln!("{lost}");
    let mut problems = Vec::new();
    for (i, (old, new)) in before.iter().zip(&after).enumerate() {
        match new {
            Ok(name) if name == old => {}
            Ok(name) => problems.push(format!("connection {} moved from {old} to {name}", i + 1)),
            Err(e) => problems.push(format!("connection {} (on {old}) failed: {e}", i + 1)),
        }
    }
    drop(sessions);
    for address in &held {
        lbctl(&env.lbd.socket, &["undrain", "web", address]).expect("lbctl undrain");
    }
    let fresh = env.topo.client.run(move || tcp_request(web, TIMEOUT));
    if let Err(e) = &fresh {
        problems.push(format!("a fresh connection after the flood failed: {e:#}"));
    }
    assert!(
        problems.is_empty(),
        "after {sent} SYNs from spoofed sources (--max-flows {MAX_FLOWS}), with the backends \
         of the established connections ({held:?}) then drained so that a connection that lost \
         its conntrack entry would move ({lost}):\n  {}",
        problems.join("\n  ")
    );
}
