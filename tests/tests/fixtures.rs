//! Packet fixtures through BPF_PROG_TEST_RUN: an input packet and the map
//! state (written by the real reconciler) give an exact action and exact
//! output bytes. Expected packets are built independently with etherparse,
//! which computes every checksum from scratch.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun, TestRunOptions};
use etherparse::PacketBuilder;
use lb_common::global;
use lb_userspace::datapath::{Datapath, Limits};
use lb_userspace::model::{BackendSpec, DesiredState, Frontend, Proto, ServiceSpec};
use lb_userspace::reconciler::Reconciler;

/// TC_ACT_UNSPEC: not ours, the next program or the stack decides.
const PASS: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT4: [u8; 4] = [10, 71, 0, 2];
const VIP4: [u8; 4] = [10, 73, 0, 10];
const CLIENT6: &str = "fd00:71::2";
const VIP6: &str = "fd00:73::10";
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
/// The neighbours' MACs in the fixture's namespace.
const MAC_CLIENT: [u8; 6] = [2, 0, 0, 0, 1, 2];
const MAC_BACKEND: [u8; 6] = [2, 0, 0, 0, 2, 2];
/// The fixture's interfaces towards the clients and towards the backends.
const IF_CLIENTS: &str = "lbc0";
const IF_BACKENDS: &str = "lbb0";

fn v6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>().unwrap().octets()
}

fn service(name: &str, frontend: &str, proto: Proto, backends: &[&str]) -> ServiceSpec {
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
        source: "test".into(),
    }
}

fn desired() -> DesiredState {
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
                snat: Some(IpAddr::V4(Ipv4Addr::new(10, 72, 0, 1))),
                ..service("fullnat", "10.73.0.12:80", Proto::Tcp, &["10.72.1.2:8080"])
            },
            ServiceSpec {
                affinity_secs: 300,
                ..service(
                    "sticky",
                    "10.73.0.13:80",
                    Proto::Tcp,
                    &["10.72.1.2:8080", "10.72.2.2:8080", "10.72.3.2:8080"],
                )
            },
        ],
    }
}

/// A loaded datapath with the fixture services applied, in a fresh network
/// namespace of its own with two interfaces: `lbc0` towards the clients
/// (10.71.0.0/16, fd00:71::/64) and `lbb0` towards the backends
/// (10.72.0.0/16, fd00:72::/32), with permanent neighbours, so that the FIB
/// routes every translated packet and the output bytes are exact.
struct Fixture {
    datapath: Datapath,
    reconciler: Reconciler,
    clients: Link,
    backends: Link,
}

/// One of the fixture's interfaces.
struct Link {
    ifindex: u32,
    mac: [u8; 6],
}

fn sh(cmd: &str) {
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

impl Fixture {
    fn new() -> Fixture {
        sh("ip link set lo up && sysctl -qw net.ipv4.conf.all.forwarding=1 \
            net.ipv6.conf.all.forwarding=1");
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
        };
        let (datapath, maps) = Datapath::load(None, limits).expect("load the datapath");
        let mut reconciler = Reconciler::new(maps).unwrap();
        reconciler.apply(&desired()).unwrap();
        Fixture {
            datapath,
            reconciler,
            clients,
            backends,
        }
    }

    /// Runs the program on `packet` as if it arrived on the interface its
    /// source lives behind (backends: 10.72/16 and fd00:72::/32).
    fn run(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        let from_backend = match u16::from_be_bytes([packet[12], packet[13]]) {
            0x0800 => packet.len() > 28 && packet[26..28] == [10, 72],
            0x86dd => packet.len() > 26 && packet[22..26] == [0xfd, 0, 0, 0x72],
            _ => false,
        };
        let ingress = if from_backend {
            self.backends.ifindex
        } else {
            self.clients.ifindex
        };
        // A __sk_buff with ingress_ifindex (offset 36) and ifindex (40) set:
        // the FIB lookup runs in that interface's context.
        let mut ctx = [0u8; 192];
        ctx[36..40].copy_from_slice(&ingress.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ingress.to_ne_bytes());
        let mut out = vec![0u8; packet.len() + 256];
        let prog = self.datapath.program().unwrap();
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn global(&self, index: u32) -> u64 {
        lb_userspace::status::datapath_counters(&self.reconciler)[global::NAMES[index as usize]]
    }

    /// `frame` as the datapath sends it towards the backends: a router's
    /// hop, from the fixture's backend-side interface to the neighbour.
    fn to_backends(&self, frame: Vec<u8>) -> Vec<u8> {
        routed(frame, self.backends.mac, MAC_BACKEND)
    }

    /// The same towards the clients.
    fn to_clients(&self, frame: Vec<u8>) -> Vec<u8> {
        routed(frame, self.clients.mac, MAC_CLIENT)
    }
}

/// `frame` after one routed hop: new MACs, TTL or hop limit one less (and
/// the IPv4 header checksum computed again from scratch).
fn routed(mut frame: Vec<u8>, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    frame[..6].copy_from_slice(&dst_mac);
    frame[6..12].copy_from_slice(&src_mac);
    if frame[12..14] == [0x86, 0xdd] {
        frame[21] -= 1;
        return frame;
    }
    frame[22] -= 1;
    let ihl = (frame[14] & 0x0f) as usize * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let header = etherparse::Ipv4HeaderSlice::from_slice(&frame[14..14 + ihl]).unwrap();
    let sum = header.to_header().calc_header_checksum();
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
    frame
}

/// Runs `f` on a thread in a new network namespace.
fn in_fresh_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        f();
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 65535)
        .syn()
        .write(&mut out, payload)
        .unwrap();
    out
}

fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, payload)
        .unwrap();
    out
}

fn tcp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(src, dst, 64)
        .tcp(sport, dport, 1000, 65535)
        .syn()
        .write(&mut out, payload)
        .unwrap();
    out
}

fn udp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// The IPv4 destination of an Ethernet + IPv4 frame.
fn dst4(frame: &[u8]) -> [u8; 4] {
    frame[30..34].try_into().unwrap()
}

fn backends4() -> Vec<[u8; 4]> {
    vec![[10, 72, 1, 2], [10, 72, 2, 2], [10, 72, 3, 2]]
}

#[test]
fn tcp_v4_forward_and_reply() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let input = tcp4(CLIENT4, VIP4, 40000, 80, b"hello");
        let (action, out) = fx.run(&input);
        assert_eq!(action, TC_ACT_REDIRECT);
        let backend = dst4(&out);
        assert!(backends4().contains(&backend), "picked {backend:?}");
        assert_eq!(
            out,
            fx.to_backends(tcp4(CLIENT4, backend, 40000, 8080, b"hello"))
        );

        // The same flow stays on its backend.
        for _ in 0..5 {
            let (_, again) = fx.run(&input);
            assert_eq!(dst4(&again), backend);
        }

        // The backend's reply comes back from the frontend.
        let reply = tcp4(backend, CLIENT4, 8080, 40000, b"world");
        let (action, out) = fx.run(&reply);
        assert_eq!(action, TC_ACT_REDIRECT);
        assert_eq!(out, fx.to_clients(tcp4(VIP4, CLIENT4, 80, 40000, b"world")));
        assert_eq!(fx.global(global::TRANSLATED), 7);
    });
}

#[test]
fn flows_spread_over_backends() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let mut seen = std::collections::HashMap::new();
        for port in 0..300u16 {
            let (_, out) = fx.run(&tcp4(CLIENT4, VIP4, 20000 + port, 80, b""));
            *seen.entry(dst4(&out)).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        for (b, n) in &seen {
            assert!((60..=140).contains(n), "backend {b:?} got {n} of 300");
        }
    });
}

#[test]
fn udp_v4_forward_reply_and_zero_checksum() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let (action, out) = fx.run(&udp4(CLIENT4, VIP4, 5000, 53, b"query"));
        assert_eq!(action, TC_ACT_REDIRECT);
        let mut expected = udp4(CLIENT4, [10, 72, 1, 2], 5000, 5353, b"query");
        assert_eq!(out, fx.to_backends(expected));

        let (_, out) = fx.run(&udp4([10, 72, 1, 2], CLIENT4, 5353, 5000, b"answer"));
        assert_eq!(out, fx.to_clients(udp4(VIP4, CLIENT4, 53, 5000, b"answer")));

        // A UDP checksum of zero ("none") must stay zero.
        let mut input = udp4(CLIENT4, VIP4, 5001, 53, b"query");
        input[40] = 0;
        input[41] = 0;
        let (_, out) = fx.run(&input);
        expected = udp4(CLIENT4, [10, 72, 1, 2], 5001, 5353, b"query");
        expected[40] = 0;
        expected[41] = 0;
        assert_eq!(out, fx.to_backends(expected));
    });
}

#[test]
fn tcp_and_udp_v6() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let backend = v6("fd00:72:1::2");
        let (action, out) = fx.run(&tcp6(v6(CLIENT6), v6(VIP6), 40000, 80, b"hello"));
        assert_eq!(action, TC_ACT_REDIRECT);
        assert_eq!(
            out,
            fx.to_backends(tcp6(v6(CLIENT6), backend, 40000, 8080, b"hello"))
        );
        let (_, out) = fx.run(&tcp6(backend, v6(CLIENT6), 8080, 40000, b"world"));
        assert_eq!(
            out,
            fx.to_clients(tcp6(v6(VIP6), v6(CLIENT6), 80, 40000, b"world"))
        );

        let (_, out) = fx.run(&udp6(v6(CLIENT6), v6(VIP6), 5000, 53, b"q"));
        assert_eq!(
            out,
            fx.to_backends(udp6(v6(CLIENT6), backend, 5000, 5353, b"q"))
        );
        let (_, out) = fx.run(&udp6(backend, v6(CLIENT6), 5353, 5000, b"a"));
        assert_eq!(out, fx.to_clients(udp6(v6(VIP6), v6(CLIENT6), 53, 5000, b"a")));
    });
}

#[test]
fn packets_not_for_a_service_pass_untouched() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let cases = [
            // Frontend address, other port.
            tcp4(CLIENT4, VIP4, 40000, 81, b"x"),
            // Frontend port, other address.
            tcp4(CLIENT4, [10, 73, 0, 99], 40000, 80, b"x"),
            // Frontend address and port, other protocol.
            udp4(CLIENT4, VIP4, 40000, 80, b"x"),
            // A backend talking to the client outside any tracked flow.
            tcp4([10, 72, 1, 2], CLIENT4, 8080, 41234, b"x"),
        ];
        for input in cases {
            let (action, out) = fx.run(&input);
            assert_eq!(action, PASS);
            assert_eq!(out, input);
        }
        // ARP is not IP at all.
        let mut arp = vec![0xffu8; 6];
        arp.extend_from_slice(&MAC_A);
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0u8; 28]);
        let (action, out) = fx.run(&arp);
        assert_eq!((action, out), (PASS, arp));
        assert_eq!(fx.global(global::TRANSLATED), 0);
    });
}

#[test]
fn truncated_and_malformed_headers_pass_untouched() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let full = tcp4(CLIENT4, VIP4, 40000, 80, b"");
        // Cut at the end of the IPv4 header and inside the TCP header
        // (BPF_PROG_TEST_RUN itself refuses an IPv4 frame without a whole
        // IPv4 header).
        for len in [34, 36, 40, 50] {
            let mut cut = full[..len].to_vec();
            if len >= 34 {
                // Keep the IPv4 total length consistent with what is left,
                // so only the L4 header is short.
                let tot = (len - 14) as u16;
                cut[16..18].copy_from_slice(&tot.to_be_bytes());
            }
            let (action, out) = fx.run(&cut);
            assert_eq!(action, PASS, "len {len}");
            assert_eq!(out, cut, "len {len}");
        }
        // Total length claims more than arrived.
        let mut lying = full.clone();
        lying[16..18].copy_from_slice(&1000u16.to_be_bytes());
        let (action, out) = fx.run(&lying);
        assert_eq!((action, out), (PASS, lying));
        // IHL below 5.
        let mut bad_ihl = full.clone();
        bad_ihl[14] = 0x44;
        let (action, out) = fx.run(&bad_ihl);
        assert_eq!((action, out), (PASS, bad_ihl));
        assert!(fx.global(global::MALFORMED) >= 5);
        assert_eq!(fx.global(global::TRANSLATED), 0);
    });
}

#[test]
fn ipv4_options_are_skipped() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let build = |src: [u8; 4], dst: [u8; 4], dport: u16| {
            let mut ip =
                etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::TCP, src, dst).unwrap();
            // Four NOP options: IHL 6.
            ip.options = [1u8, 1, 1, 1][..].try_into().unwrap();
            let mut out = Vec::new();
            PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
                .tcp(40000, dport, 1000, 65535)
                .syn()
                .write(&mut out, b"opt")
                .unwrap();
            out
        };
        let input = build(CLIENT4, VIP4, 80);
        assert_eq!(input[14], 0x46);
        let (action, out) = fx.run(&input);
        assert_eq!(action, TC_ACT_REDIRECT);
        let backend = dst4(&out);
        assert!(backends4().contains(&backend));
        assert_eq!(out, fx.to_backends(build(CLIENT4, backend, 8080)));
    });
}

#[test]
fn ipv6_extension_header_is_skipped() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        // A hop-by-hop header (8 bytes, PadN) between IPv6 and TCP. The TCP
        // checksum does not cover it, so inserting it keeps the packet valid.
        let with_hbh = |mut frame: Vec<u8>| {
            let hbh = [6u8, 0, 1, 4, 0, 0, 0, 0];
            let plen = u16::from_be_bytes([frame[18], frame[19]]) + 8;
            frame[18..20].copy_from_slice(&plen.to_be_bytes());
            frame[20] = 0;
            frame.splice(54..54, hbh);
            frame
        };
        let backend = v6("fd00:72:1::2");
        let input = with_hbh(tcp6(v6(CLIENT6), v6(VIP6), 40000, 80, b"ext"));
        let (action, out) = fx.run(&input);
        assert_eq!(action, TC_ACT_REDIRECT);
        assert_eq!(
            out,
            fx.to_backends(with_hbh(tcp6(v6(CLIENT6), backend, 40000, 8080, b"ext")))
        );
    });
}

#[test]
fn fragments_are_never_translated() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        // First fragment (MF set) and a later fragment (offset 8).
        for flags in [[0x20u8, 0x00], [0x00, 0x01]] {
            let mut frag = udp4(CLIENT4, VIP4, 5000, 53, b"fragment");
            frag[20..22].copy_from_slice(&flags);
            let (action, out) = fx.run(&frag);
            assert_eq!((action, out), (PASS, frag));
        }
        // An IPv6 fragment header.
        let mut frame = udp6(v6(CLIENT6), v6(VIP6), 5000, 53, b"fragment");
        let plen = u16::from_be_bytes([frame[18], frame[19]]) + 8;
        frame[18..20].copy_from_slice(&plen.to_be_bytes());
        frame[20] = 44;
        frame.splice(54..54, [17u8, 0, 0, 1, 0, 0, 0, 1]);
        let (action, out) = fx.run(&frame);
        assert_eq!((action, out), (PASS, frame));
        assert_eq!(fx.global(global::FRAGMENTS), 3);
        assert_eq!(fx.global(global::TRANSLATED), 0);
    });
}

#[test]
fn service_without_backends_drops() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let (action, _) = fx.run(&tcp4(CLIENT4, [10, 73, 0, 11], 40000, 80, b""));
        assert_eq!(action, TC_ACT_SHOT);
    });
}

#[test]
fn established_flow_keeps_its_backend_when_backends_change() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let flows: Vec<Vec<u8>> = (0..50u16)
            .map(|p| tcp4(CLIENT4, VIP4, 30000 + p, 80, b""))
            .collect();
        let before: Vec<[u8; 4]> = flows.iter().map(|f| dst4(&fx.run(f).1)).collect();
        let mut state = desired();
        state.services[0].backends.push(BackendSpec {
            addr: IpAddr::V4(Ipv4Addr::new(10, 72, 4, 2)),
            port: 8080,
            weight: 1,
        });
        fx.reconciler.apply(&state).unwrap();
        let after: Vec<[u8; 4]> = flows.iter().map(|f| dst4(&fx.run(f).1)).collect();
        assert_eq!(before, after);
        // New flows do reach the new backend.
        let reached = (0..200u16)
            .map(|p| dst4(&fx.run(&tcp4(CLIENT4, VIP4, 50000 + p, 80, b"")).1))
            .any(|d| d == [10, 72, 4, 2]);
        assert!(reached);
    });
}

#[test]
fn full_nat_translates_both_addresses_and_back() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let vip = [10, 73, 0, 12];
        let snat = [10, 72, 0, 1];
        let backend = [10, 72, 1, 2];
        let mut ports = Vec::new();
        // Two clients that happen to use the same source port must get
        // different source ports towards the backend.
        for client in [CLIENT4, [10, 71, 0, 3]] {
            let (action, out) = fx.run(&tcp4(client, vip, 40000, 80, b"hello"));
            assert_eq!(action, TC_ACT_REDIRECT);
            let port = u16::from_be_bytes([out[34], out[35]]);
            assert!(port >= 1024);
            assert_eq!(out, fx.to_backends(tcp4(snat, backend, port, 8080, b"hello")));
            // The flow keeps its port.
            let (_, again) = fx.run(&tcp4(client, vip, 40000, 80, b"hello"));
            assert_eq!(again, out);
            let (action, reply) = fx.run(&tcp4(backend, snat, 8080, port, b"world"));
            assert_eq!(action, TC_ACT_REDIRECT);
            assert_eq!(reply, fx.to_clients(tcp4(vip, client, 80, 40000, b"world")));
            ports.push(port);
        }
        assert_ne!(ports[0], ports[1]);
    });
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let vip = [10, 73, 0, 13];
        for client in 1..=20u8 {
            let src = [10, 71, 1, client];
            let first = dst4(&fx.run(&tcp4(src, vip, 10000, 80, b"")).1);
            for port in 1..20u16 {
                let d = dst4(&fx.run(&tcp4(src, vip, 10000 + port, 80, b"")).1);
                assert_eq!(d, first, "client {src:?} moved on its flow {port}");
            }
        }
        // Different clients still spread over the backends.
        let spread: std::collections::HashSet<[u8; 4]> = (1..=60u8)
            .map(|c| dst4(&fx.run(&tcp4([10, 71, 2, c], vip, 10000, 80, b"")).1))
            .collect();
        assert_eq!(spread.len(), 3, "{spread:?}");
    });
}

#[test]
fn weights_set_the_share_of_new_flows() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let mut state = desired();
        for (b, w) in state.services[0].backends.iter_mut().zip([1, 2, 3]) {
            b.weight = w;
        }
        fx.reconciler.apply(&state).unwrap();
        let n = 6000u32;
        let mut seen = std::collections::HashMap::new();
        for i in 0..n {
            let src = [10, 71, (i / 250) as u8, (i % 250) as u8 + 1];
            let (_, out) = fx.run(&tcp4(src, VIP4, 20000 + (i % 7) as u16, 80, b""));
            *seen.entry(dst4(&out)).or_insert(0u32) += 1;
        }
        for (backend, weight) in backends4().into_iter().zip([1u32, 2, 3]) {
            let share = seen[&backend] as f64 / n as f64;
            let want = weight as f64 / 6.0;
            assert!(
                (share - want).abs() < 0.03,
                "{backend:?}: {share:.3}, want {want:.3}: {seen:?}"
            );
        }
    });
}
