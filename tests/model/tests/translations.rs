//! Hand-checked runs of the model: expected frames are built with
//! etherparse, which computes every checksum its own way.

use etherparse::{IpNumber, Ipv4Header, PacketBuilder, SlicedPacket};
use lb_common::{
    global, v4_mapped, Backend, Config, ServiceKey, ServiceValue, TrafficStats, BACKEND_ACTIVE,
    BACKEND_DOWN, BACKEND_DRAINING, CT_REPLY, CT_SNAT, FLAG_FULLNAT, MAGLEV_M, PROTO_TCP,
    PROTO_UDP, ST_CONFIRMED, ST_FIN_CLIENT, ST_SEEN_REPLY,
};
use lb_model::conntrack::flow_key;
use lb_model::state::{TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC};
use lb_model::{step, Fib, Ingress, Interface, ModelState, Path, Route, RouteKind};

const IN: Ingress = Ingress { ifindex: 2 };
const IN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 9, 9];
const BACKEND_IF_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];
const BACKEND_GW_MAC: [u8; 6] = [2, 0, 0, 0, 3, 3];
const CLIENT_IF_MAC: [u8; 6] = [2, 0, 0, 0, 0, 4];
const CLIENT_GW_MAC: [u8; 6] = [2, 0, 0, 0, 4, 4];

const CLIENT: [u8; 4] = [10, 71, 0, 2];
const VIP: [u8; 4] = [10, 73, 0, 10];
const BACKEND: [u8; 4] = [10, 72, 1, 2];
const SNAT: [u8; 4] = [10, 72, 0, 1];
const T0: u64 = 1_000_000_000_000;

fn route(prefix: [u8; 4], len: u8, ifindex: u32, neighbour: Option<[u8; 6]>) -> Route {
    Route {
        prefix: v4_mapped(prefix),
        prefix_len: 96 + len,
        kind: RouteKind::Unicast,
        ifindex,
        gateway: [0; 16],
        neighbour,
    }
}

fn iface(ifindex: u32, mac: [u8; 6], mtu: u32) -> Interface {
    Interface {
        ifindex,
        name: format!("if{ifindex}"),
        mac,
        mtu,
        forwarding_v4: true,
        forwarding_v6: true,
    }
}

/// One TCP and one UDP service on VIP, one backend each, and routes to
/// clients (MTU 1500) and backends (MTU 1400).
fn state(fullnat: bool) -> ModelState {
    let fib = Fib {
        interfaces: vec![
            iface(2, IN_MAC, 1500),
            iface(3, BACKEND_IF_MAC, 1400),
            iface(4, CLIENT_IF_MAC, 1500),
        ],
        routes: vec![
            route([10, 72, 0, 0], 16, 3, Some(BACKEND_GW_MAC)),
            route([10, 71, 0, 0], 16, 4, Some(CLIENT_GW_MAC)),
        ],
    };
    let mut s = ModelState::new(
        Config {
            clock_frozen_ns: T0,
            ..Config::default()
        },
        fib,
    );
    for (slot, (port, proto, bport)) in [(80u16, PROTO_TCP, 8080u16), (53, PROTO_UDP, 5353)]
        .into_iter()
        .enumerate()
    {
        let slot = slot as u32;
        let id = slot + 1;
        s.services.insert(
            ServiceKey {
                addr: v4_mapped(VIP),
                port: port.to_be(),
                proto,
                _pad: 0,
            },
            ServiceValue {
                slot,
                ring: slot * 2,
                backend_count: 1,
                flags: if fullnat { FLAG_FULLNAT } else { 0 },
                snat_addr: if fullnat { v4_mapped(SNAT) } else { [0; 16] },
                affinity_ns: 0,
                network: 0,
                ring_size: MAGLEV_M,
            },
        );
        s.backends.insert(
            id,
            Backend {
                addr: v4_mapped(BACKEND),
                port: bport.to_be(),
                state: BACKEND_ACTIVE,
                _pad: 0,
                service_slot: slot,
            },
        );
        s.set_ring(slot * 2, vec![id; MAGLEV_M as usize]);
        s.backend_stats.insert(id, TrafficStats::default());
    }
    s
}

fn tcp4(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
    ttl: u8,
    flags: &str,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src, dst, ttl)
        .tcp(ports.0, ports.1, 1000, 65535);
    for f in flags.chars() {
        b = match f {
            'S' => b.syn(),
            'A' => b.ack(2000),
            'F' => b.fin(),
            'R' => b.rst(),
            _ => b,
        };
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn udp4(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 4],
    dst: [u8; 4],
    ports: (u16, u16),
    ttl: u8,
) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src, dst, ttl)
        .udp(ports.0, ports.1)
        .write(&mut out, b"query")
        .unwrap();
    out
}

const FROM_PEER: ([u8; 6], [u8; 6]) = (PEER_MAC, IN_MAC);
const TO_BACKEND: ([u8; 6], [u8; 6]) = (BACKEND_IF_MAC, BACKEND_GW_MAC);
const TO_CLIENT: ([u8; 6], [u8; 6]) = (CLIENT_IF_MAC, CLIENT_GW_MAC);

/// etherparse takes (source, destination) MACs.
fn m(pair: ([u8; 6], [u8; 6])) -> ([u8; 6], [u8; 6]) {
    pair
}

#[test]
fn tcp_connection_through_its_states() {
    let mut s = state(false);
    let syn = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 64, "S", b"hello");
    let out = step(&mut s, &syn, IN, T0);
    assert_eq!(out.path, Path::NewFlow);
    assert_eq!(out.action, TC_ACT_REDIRECT);
    assert_eq!(
        out.packet,
        tcp4(
            m(TO_BACKEND),
            CLIENT,
            BACKEND,
            (40000, 8080),
            63,
            "S",
            b"hello"
        )
    );
    let fkey = flow_key(v4_mapped(CLIENT), v4_mapped(VIP), 40000, 80, PROTO_TCP);
    let rkey = flow_key(
        v4_mapped(BACKEND),
        v4_mapped(CLIENT),
        8080,
        40000,
        PROTO_TCP,
    );
    let fwd = s.ct_pending[&fkey];
    assert_eq!(fwd.backend, v4_mapped(BACKEND));
    assert_eq!(fwd.backend_port, 8080u16.to_be());
    assert_eq!((fwd.flags, fwd.state, fwd.last_seen_ns), (0, 0, T0));
    assert_eq!(s.ct_pending[&rkey].flags, CT_REPLY);
    assert_eq!(s.global[global::TRANSLATED as usize], 1);
    assert_eq!(s.service_stats[&0].new_flows, 1);

    // The backend answers: from the frontend to the client.
    let synack = tcp4(m(FROM_PEER), BACKEND, CLIENT, (8080, 40000), 64, "SA", b"");
    let t1 = T0 + 2_000_000_000;
    let out = step(&mut s, &synack, IN, t1);
    assert_eq!(out.path, Path::Reply);
    assert_eq!(
        out.packet,
        tcp4(m(TO_CLIENT), VIP, CLIENT, (80, 40000), 63, "SA", b"")
    );
    // Idle for more than a second: the reply refreshed the forward half.
    assert_eq!(s.ct_pending[&fkey].last_seen_ns, t1);
    assert_eq!(s.ct_pending[&fkey].state, ST_SEEN_REPLY);

    // The client's ACK confirms the connection.
    let ack = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 64, "A", b"");
    step(&mut s, &ack, IN, t1 + 1);
    assert!(s.ct_pending.is_empty());
    assert_eq!(s.conntrack[&fkey].state, ST_SEEN_REPLY | ST_CONFIRMED);
    assert_eq!(s.conntrack[&rkey].state, ST_SEEN_REPLY | ST_CONFIRMED);
    assert_eq!(s.global[global::CT_CONFIRMED as usize], 1);

    // FIN, then a SYN on the same tuple: a new connection.
    let fin = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 64, "FA", b"");
    step(&mut s, &fin, IN, t1 + 2);
    assert_eq!(s.conntrack[&rkey].state & ST_FIN_CLIENT, ST_FIN_CLIENT);
    let out = step(&mut s, &syn, IN, t1 + 3);
    assert_eq!(out.path, Path::NewFlow);
    assert_eq!(s.global[global::CT_REOPENED as usize], 1);
    assert!(s.conntrack.is_empty());
    assert_eq!(s.ct_pending.len(), 2);
}

#[test]
fn expired_entries_are_deleted_and_the_flow_starts_again() {
    let mut s = state(false);
    let syn = tcp4(m(FROM_PEER), CLIENT, VIP, (40001, 80), 64, "S", b"");
    step(&mut s, &syn, IN, T0);
    let timeout = s.config.timeout_syn_ns;
    // Exactly at the timeout the entry is still live.
    let out = step(&mut s, &syn, IN, T0 + timeout);
    assert_eq!(out.path, Path::Known);
    let out = step(&mut s, &syn, IN, T0 + 2 * timeout + 1);
    assert_eq!(out.path, Path::NewFlow);
    assert_eq!(s.global[global::CT_EXPIRED as usize], 1);
}

#[test]
fn udp_reply_confirms_and_zero_checksum_stays_zero() {
    let mut s = state(false);
    let mut q = udp4(m(FROM_PEER), CLIENT, VIP, (5000, 53), 64);
    q[40..42].copy_from_slice(&[0, 0]);
    let out = step(&mut s, &q, IN, T0);
    let mut want = udp4(m(TO_BACKEND), CLIENT, BACKEND, (5000, 5353), 63);
    want[40..42].copy_from_slice(&[0, 0]);
    assert_eq!(out.packet, want);
    let a = udp4(m(FROM_PEER), BACKEND, CLIENT, (5353, 5000), 64);
    let out = step(&mut s, &a, IN, T0 + 1);
    assert_eq!(out.packet, udp4(m(TO_CLIENT), VIP, CLIENT, (53, 5000), 63));
    assert_eq!(s.conntrack.len(), 2);
    assert_eq!(s.global[global::CT_CONFIRMED as usize], 1);
}

#[test]
fn full_nat_port_from_the_flow_hash() {
    let mut s = state(true);
    s.config.snat_port_min = 30000;
    s.config.snat_port_max = 30009;
    let syn = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 64, "S", b"x");
    let fkey = flow_key(v4_mapped(CLIENT), v4_mapped(VIP), 40000, 80, PROTO_TCP);
    let h = lb_model::hash::flow_hash(&fkey);
    let port = 30000 + (h % 10) as u16;
    let out = step(&mut s, &syn, IN, T0);
    assert_eq!(
        out.packet,
        tcp4(m(TO_BACKEND), SNAT, BACKEND, (port, 8080), 63, "S", b"x")
    );
    assert_eq!(s.ct_pending[&fkey].flags, CT_SNAT);
    assert_eq!(s.ct_pending[&fkey].nat_port, port.to_be());
    let reply = tcp4(m(FROM_PEER), BACKEND, SNAT, (8080, port), 64, "SA", b"y");
    let out = step(&mut s, &reply, IN, T0 + 1);
    assert_eq!(
        out.packet,
        tcp4(m(TO_CLIENT), VIP, CLIENT, (80, 40000), 63, "SA", b"y")
    );
    // Eight attempts, 7919 apart, over a range of two ports shared by
    // more clients than that: the third client finds none.
    s.config.snat_port_min = 30000;
    s.config.snat_port_max = 30001;
    let mut exhausted = 0;
    for c in 3..40u8 {
        let syn = tcp4(m(FROM_PEER), [10, 71, 1, c], VIP, (40000, 80), 64, "S", b"");
        if step(&mut s, &syn, IN, T0 + 2).action == TC_ACT_SHOT {
            exhausted += 1;
        }
    }
    assert_eq!(exhausted as u64, s.global[global::SNAT_EXHAUSTED as usize]);
    assert!(exhausted > 30);
}

#[test]
fn backends_that_drain_or_go_down() {
    let mut s = state(false);
    let syn = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 64, "S", b"");
    let ack = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 64, "A", b"");
    step(&mut s, &syn, IN, T0);
    s.backends.get_mut(&1).unwrap().state = BACKEND_DRAINING;
    // Established packets continue; a new SYN finds no backend.
    assert_eq!(step(&mut s, &ack, IN, T0 + 1).path, Path::Known);
    let out = step(&mut s, &syn, IN, T0 + 2);
    assert_eq!((out.path, out.action), (Path::NoBackend, TC_ACT_SHOT));
    assert_eq!(s.global[global::CT_REOPENED as usize], 1);
    assert_eq!(s.service_stats[&0].no_backend, 1);
    // Down: the connection's entries stop counting.
    s.backends.get_mut(&1).unwrap().state = BACKEND_ACTIVE;
    step(&mut s, &syn, IN, T0 + 3);
    s.backends.get_mut(&1).unwrap().state = BACKEND_DOWN;
    let out = step(&mut s, &ack, IN, T0 + 4);
    assert_eq!(out.path, Path::NoBackend);
    assert_eq!(s.global[global::CT_STALE as usize], 1);
}

#[test]
fn ttl_one_gets_time_exceeded_quoting_the_packet() {
    let mut s = state(false);
    let syn = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 1, "S", &[7u8; 200]);
    let out = step(&mut s, &syn, IN, T0);
    assert_eq!(out.action, TC_ACT_REDIRECT);
    assert!(
        s.ct_pending.is_empty(),
        "no state for a packet not forwarded"
    );
    let p = SlicedPacket::from_ethernet(&out.packet).unwrap();
    let eth = p
        .link
        .clone()
        .unwrap()
        .to_header()
        .unwrap()
        .ethernet2()
        .unwrap();
    assert_eq!(eth.destination, PEER_MAC);
    assert_eq!(eth.source, IN_MAC);
    let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
        panic!("not IPv4")
    };
    let h = ip.header().to_header();
    assert_eq!((h.source, h.destination, h.time_to_live), (VIP, CLIENT, 64));
    assert_eq!(h.header_checksum, h.calc_header_checksum());
    let Some(etherparse::TransportSlice::Icmpv4(icmp)) = p.transport else {
        panic!("not ICMP")
    };
    assert_eq!((icmp.type_u8(), icmp.code_u8()), (11, 0));
    let quote = &syn[14..14 + 128];
    assert_eq!(icmp.payload(), quote);
    assert_eq!(
        icmp.checksum(),
        icmp.header().icmp_type.calc_checksum(icmp.payload())
    );
    assert_eq!(s.global[global::ICMP_SENT as usize], 1);
}

#[test]
fn too_big_for_the_backend_link() {
    let mut s = state(false);
    // 1400-byte MTU towards backends: 1387 bytes of IP fit, 1401 do not.
    let fits = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 64, "S", &[0; 1360]);
    assert_eq!(fits.len(), 14 + 1400);
    assert_eq!(step(&mut s, &fits, IN, T0).action, TC_ACT_REDIRECT);
    let big = tcp4(m(FROM_PEER), CLIENT, VIP, (40001, 80), 64, "S", &[0; 1361]);
    let out = step(&mut s, &big, IN, T0);
    assert_eq!(out.action, TC_ACT_REDIRECT);
    assert_eq!(&out.packet[34..38], &[3, 4, out.packet[36], out.packet[37]]);
    assert_eq!(&out.packet[40..42], &1400u16.to_be_bytes());
    // Without DF: dropped.
    let mut no_df = big.clone();
    no_df[20] = 0;
    lb_model::gen::build::refresh_ipv4_checksum(&mut no_df);
    let out = step(&mut s, &no_df, IN, T0);
    assert_eq!(out.action, TC_ACT_SHOT);
    assert_eq!(s.global[global::TOO_BIG_DROPPED as usize], 1);
}

#[test]
fn icmp_error_from_the_backend_side_goes_back_to_the_client() {
    let mut s = state(false);
    let syn = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 64, "S", b"data");
    let sent = step(&mut s, &syn, IN, T0).packet;
    // A router near the backend says the backend is unreachable, quoting
    // all of the packet it got (client -> backend).
    let router = [10, 72, 0, 254];
    let mut err = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, IN_MAC)
        .ipv4(router, CLIENT, 60)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Host,
        ))
        .write(&mut err, &sent[14..])
        .unwrap();
    let out = step(&mut s, &err, IN, T0 + 1);
    assert_eq!(out.path, Path::IcmpTranslated);
    assert_eq!(out.action, TC_ACT_REDIRECT);
    // What the client must see: the error about its own packet to the VIP.
    let quoted = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 63, "S", b"data");
    let mut want = Vec::new();
    PacketBuilder::ethernet2(CLIENT_IF_MAC, CLIENT_GW_MAC)
        .ipv4(router, CLIENT, 59)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Host,
        ))
        .write(&mut want, &quoted[14..])
        .unwrap();
    assert_eq!(out.packet, want);
    assert_eq!(s.global[global::ICMP_TRANSLATED as usize], 1);
}

#[test]
fn truncated_quote_keeps_the_checksum_consistent() {
    let mut s = state(true);
    let syn = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 64, "S", b"payload!");
    let sent = step(&mut s, &syn, IN, T0).packet;
    let (nat_port, bport) = (
        u16::from_be_bytes([sent[34], sent[35]]),
        u16::from_be_bytes([sent[36], sent[37]]),
    );
    assert_eq!(bport, 8080);
    // The backend itself answers "port unreachable", quoting 28 bytes of
    // TCP (checksum included, payload cut).
    let mut err = Vec::new();
    PacketBuilder::ethernet2(PEER_MAC, IN_MAC)
        .ipv4(BACKEND, SNAT, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ))
        .write(&mut err, &sent[14..14 + 20 + 20])
        .unwrap();
    let out = step(&mut s, &err, IN, T0 + 1);
    assert_eq!(out.path, Path::IcmpTranslated);
    let p = &out.packet;
    // Outer: from the VIP (it was the backend) to the client.
    assert_eq!(&p[26..30], &VIP);
    assert_eq!(&p[30..34], &CLIENT);
    let q = 14 + 20 + 8;
    assert_eq!(&p[q + 12..q + 16], &CLIENT);
    assert_eq!(&p[q + 16..q + 20], &VIP);
    assert_eq!(&p[q + 20..q + 24], &[0x9c, 0x40, 0, 80]);
    let qh = Ipv4Header::from_slice(&p[q..]).unwrap().0;
    assert_eq!(qh.header_checksum, qh.calc_header_checksum());
    // The quoted TCP checksum is the one of the original segment as the
    // client sent it (with the TTL the backend saw).
    let orig = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 63, "S", b"payload!");
    assert_eq!(&p[q + 36..q + 38], &orig[50..52]);
    let _ = nat_port;
    let icmp_sum = etherparse::checksum::Sum16BitWords::new()
        .add_slice(&p[34..])
        .ones_complement();
    assert_eq!(icmp_sum, 0, "ICMP checksum");
}

#[test]
fn malformed_fragments_and_others_pass_and_count() {
    let mut s = state(false);
    let good = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 64, "S", b"");
    let mut bad_doff = good.clone();
    bad_doff[46] = 0x40;
    let mut frag = good.clone();
    frag[20] = 0x20;
    lb_model::gen::build::refresh_ipv4_checksum(&mut frag);
    let mut gre = good.clone();
    gre[23] = 47;
    lb_model::gen::build::refresh_ipv4_checksum(&mut gre);
    for (p, path) in [
        (&bad_doff, Path::Malformed),
        (&frag, Path::Fragment),
        (&gre, Path::Other),
    ] {
        let out = step(&mut s, p, IN, T0);
        assert_eq!((out.path, out.action), (path, TC_ACT_UNSPEC));
        assert_eq!(&out.packet, p);
    }
    assert_eq!(s.global[global::MALFORMED as usize], 1);
    assert_eq!(s.global[global::FRAGMENTS as usize], 1);
    assert_eq!(s.global[global::SEEN as usize], 3);
    let _ = IpNumber::TCP;
}

#[test]
fn a_reply_half_of_the_same_connection_is_no_collision() {
    let mut s = state(false);
    let syn = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 64, "S", b"");
    step(&mut s, &syn, IN, T0);
    let fkey = flow_key(v4_mapped(CLIENT), v4_mapped(VIP), 40000, 80, PROTO_TCP);
    let rkey = flow_key(
        v4_mapped(BACKEND),
        v4_mapped(CLIENT),
        8080,
        40000,
        PROTO_TCP,
    );
    // The forward half is evicted; the reply half stays.
    s.ct_pending.remove(&fkey);
    let held = s.ct_pending[&rkey];
    let out = step(&mut s, &syn, IN, T0 + 1);
    assert_eq!((out.path, out.action), (Path::NewFlow, TC_ACT_REDIRECT));
    assert_eq!(s.global[global::CT_COLLISIONS as usize], 0);
    // The old reply half is replaced by the new connection's.
    assert_ne!(s.ct_pending[&rkey], held);
    assert_eq!(s.ct_pending[&rkey].last_seen_ns, T0 + 1);
    assert_eq!(s.ct_pending[&fkey].last_seen_ns, T0 + 1);
    // Another client tuple to another frontend mapping to the same reply
    // tuple is a collision.
    s.services.insert(
        ServiceKey {
            addr: v4_mapped([10, 73, 0, 16]),
            port: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: 0,
        },
        s.services[&ServiceKey {
            addr: v4_mapped(VIP),
            port: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: 0,
        }],
    );
    let other = tcp4(
        m(FROM_PEER),
        CLIENT,
        [10, 73, 0, 16],
        (40000, 80),
        64,
        "S",
        b"",
    );
    let out = step(&mut s, &other, IN, T0 + 2);
    assert_eq!((out.path, out.action), (Path::Collision, TC_ACT_SHOT));
}

#[test]
fn affinity_is_written_only_for_flows_created() {
    let mut s = state(false);
    let key = ServiceKey {
        addr: v4_mapped(VIP),
        port: 80u16.to_be(),
        proto: PROTO_TCP,
        _pad: 0,
    };
    s.services.get_mut(&key).unwrap().affinity_ns = 10 * 1_000_000_000;
    // TTL 1: answered with time exceeded, nothing written.
    let dying = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 1, "S", b"");
    step(&mut s, &dying, IN, T0);
    assert!(s.affinity.is_empty());
    let syn = tcp4(m(FROM_PEER), CLIENT, VIP, (40000, 80), 64, "S", b"");
    step(&mut s, &syn, IN, T0 + 1);
    let a = s.affinity.values().next().copied().unwrap();
    assert_eq!((a.backend_id, a.last_ns), (1, T0 + 1));
    // The next new flow of the client refreshes it.
    let syn2 = tcp4(m(FROM_PEER), CLIENT, VIP, (40001, 80), 64, "S", b"");
    step(&mut s, &syn2, IN, T0 + 5);
    assert_eq!(s.affinity.values().next().unwrap().last_ns, T0 + 5);
}
