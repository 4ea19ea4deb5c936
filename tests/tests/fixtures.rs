//! Packet fixtures through BPF_PROG_TEST_RUN: an input packet and the map
//! state (written by the real reconciler) give an exact action and exact
//! output bytes. Expected packets are built independently with etherparse,
//! which computes every checksum from scratch. The harness is
//! `lb_tests::fixture`; ICMP (docs/datapath.md sections 5 and 7) and the
//! MTU checks are in fixtures_icmp.rs.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::PacketBuilder;
use lb_common::global;
use lb_tests::fixture::*;
use lb_userspace::datapath_log::DatapathLog;
use lb_userspace::model::BackendSpec;

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
        assert_eq!(
            out,
            fx.to_clients(udp6(v6(VIP6), v6(CLIENT6), 53, 5000, b"a"))
        );
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
            assert_eq!(
                out,
                fx.to_backends(tcp4(snat, backend, port, 8080, b"hello"))
            );
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

// ---------------------------------------------------------------------------
// Parsing (section 1)
// ---------------------------------------------------------------------------

#[test]
fn ipv4_mapped_ipv6_addresses_never_match_ipv4_services() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let mapped = |a: [u8; 4]| lb_common::v4_mapped(a);
        let cases = [
            // To ::ffff:10.73.0.10 port 80: the IPv4 service's key.
            tcp6(v6(CLIENT6), mapped(VIP4), 40000, 80, b"x"),
            udp6(v6(CLIENT6), mapped(VIP4), 5000, 53, b"x"),
            // From a mapped source to a real IPv6 service.
            tcp6(mapped(CLIENT4), v6(VIP6), 40000, 80, b"x"),
        ];
        for input in cases {
            let (action, out) = fx.run(&input);
            assert_eq!(action, PASS, "{}", hex(&input));
            assert_frame(&out, &input, "mapped address");
        }
        assert_eq!(fx.global(global::MALFORMED), 3);
        assert_eq!(fx.global(global::TRANSLATED), 0);
        assert!(fx.pending().is_empty());
    });
}

#[test]
fn tcp_data_offset_out_of_range_is_malformed() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let v4 = tcp4(CLIENT4, VIP4, 40000, 80, b"hello");
        let v6 = tcp6(v6(CLIENT6), v6(VIP6), 40000, 80, b"hello");
        // Data offset 4 (below the minimum 5) and 15 (60 bytes, beyond
        // the 25-byte segment), at TCP byte 12.
        for (frame, off) in [(v4, 14 + 20 + 12), (v6, 14 + 40 + 12)] {
            for doff in [0x40u8, 0xf0] {
                let mut input = frame.clone();
                input[off] = doff;
                let (action, out) = fx.run(&input);
                assert_eq!(action, PASS, "data offset {doff:#x}");
                assert_frame(&out, &input, "bad data offset");
            }
        }
        assert_eq!(fx.global(global::MALFORMED), 4);
        assert_eq!(fx.global(global::TRANSLATED), 0);
    });
}

#[test]
fn udp_length_field_must_match_the_payload() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        // 5 bytes of payload: the right length is 13.
        let v4 = udp4(CLIENT4, VIP4, 5000, 53, b"query");
        let v6 = udp6(v6(CLIENT6), v6(VIP6), 5000, 53, b"query");
        let mut n = 0;
        for (frame, off) in [(v4, 14 + 20 + 4), (v6, 14 + 40 + 4)] {
            assert_eq!(frame[off..off + 2], 13u16.to_be_bytes());
            for len in [100u16, 14, 12, 8] {
                let mut input = frame.clone();
                input[off..off + 2].copy_from_slice(&len.to_be_bytes());
                let (action, out) = fx.run(&input);
                assert_eq!(action, PASS, "UDP length {len}");
                assert_frame(&out, &input, "bad UDP length");
                n += 1;
            }
        }
        assert_eq!(fx.global(global::MALFORMED), n);
        assert_eq!(fx.global(global::TRANSLATED), 0);
    });
}

#[test]
fn ethernet_padding_after_the_ip_packet_is_ignored() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        // 14 + 20 + 8 + 2 = 44 bytes, padded to Ethernet's minimum 60.
        let mut input = udp4(CLIENT4, VIP4, 5000, 53, b"q?");
        input.resize(60, 0);
        let (action, out) = fx.run(&input);
        assert_eq!(action, TC_ACT_REDIRECT);
        let mut want = fx.to_backends(udp4(CLIENT4, [10, 72, 1, 2], 5000, 5353, b"q?"));
        want.resize(60, 0);
        assert_frame(&out, &want, "padded frame");
        assert_eq!(fx.global(global::MALFORMED), 0);
    });
}

#[test]
fn vlan_tagged_frames_pass() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        // A frame for a frontend, tagged in the packet: 802.1Q, and 802.1ad
        // over 802.1Q. (`skb->vlan_present` cannot be set through
        // BPF_PROG_TEST_RUN: the kernel rejects a context with vlan fields.)
        let plain = tcp4(CLIENT4, VIP4, 40000, 80, b"hello");
        let tagged = |tags: &[[u8; 4]]| {
            let mut f = plain[..12].to_vec();
            for t in tags {
                f.extend_from_slice(t);
            }
            f.extend_from_slice(&plain[12..]);
            f
        };
        let cases = [
            tagged(&[[0x81, 0x00, 0x00, 0x64]]),
            tagged(&[[0x88, 0xa8, 0x00, 0x0a], [0x81, 0x00, 0x00, 0x64]]),
        ];
        for input in cases {
            let (action, out) = fx.run(&input);
            assert_eq!(action, PASS, "{}", hex(&input[..20]));
            assert_frame(&out, &input, "VLAN-tagged frame");
        }
        assert_eq!(fx.global(global::TRANSLATED), 0);
        assert!(fx.pending().is_empty());
    });
}

// ---------------------------------------------------------------------------
// Connection tracking (sections 2-4 and 8)
// ---------------------------------------------------------------------------

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
/// Where the frozen clock starts.
const T0: u64 = 1000 * SEC;

/// One connection as the datapath should record it.
struct Conn {
    service: &'static str,
    proto: u8,
    client: (IpAddr, u16),
    frontend: (IpAddr, u16),
    backend: (IpAddr, u16),
    /// With source translation: nat_addr and nat_port.
    nat: Option<(IpAddr, u16)>,
}

impl Conn {
    fn web(client_port: u16, backend: [u8; 4]) -> Conn {
        Conn {
            service: "web",
            proto: 6,
            client: (ip4(CLIENT4), client_port),
            frontend: (ip4(VIP4), 80),
            backend: (ip4(backend), 8080),
            nat: None,
        }
    }

    fn forward_key(&self) -> lb_common::FlowKey {
        flow(
            self.client.0,
            self.client.1,
            self.frontend.0,
            self.frontend.1,
            self.proto,
        )
    }

    fn reply_key(&self) -> lb_common::FlowKey {
        let (dst, dport) = self.nat.unwrap_or(self.client);
        flow(self.backend.0, self.backend.1, dst, dport, self.proto)
    }

    /// The half the datapath keys by the client's flow, or with `reply`
    /// by the backend's.
    fn half(&self, fx: &Fixture, reply: bool, state: u8, last_seen: u64) -> lb_common::CtEntry {
        use lb_userspace::reconciler::addr16;
        let (nat_addr, nat_port) = match self.nat {
            Some((a, p)) => (addr16(a), p.to_be()),
            None => ([0; 16], 0),
        };
        lb_common::CtEntry {
            client: addr16(self.client.0),
            frontend: addr16(self.frontend.0),
            backend: addr16(self.backend.0),
            nat_addr,
            client_port: self.client.1.to_be(),
            frontend_port: self.frontend.1.to_be(),
            backend_port: self.backend.1.to_be(),
            nat_port,
            backend_id: fx.backend_id(self.service, self.backend.0),
            service_slot: fx.service_slot(self.service),
            last_seen_ns: last_seen,
            proto: self.proto,
            flags: if reply { lb_common::CT_REPLY } else { 0 }
                | if self.nat.is_some() {
                    lb_common::CT_SNAT
                } else {
                    0
                },
            state,
            _pad: 0,
            // Halves made or last refreshing their peer in the second of
            // their latest packet, as in every case here.
            peer_refresh_s: (last_seen / 1_000_000_000) as u32,
            // The fixture's accessors leave the next hop out.
            ..Default::default()
        }
    }
}

/// Opens a TCP connection from CLIENT4:`port` to the web service (SYN,
/// the backend's SYN-ACK, the client's ACK) and returns its backend.
fn establish(fx: &mut Fixture, port: u16) -> [u8; 4] {
    let (action, out) = fx.run(&tcp4(CLIENT4, VIP4, port, 80, b""));
    assert_eq!(action, TC_ACT_REDIRECT);
    let backend = dst4(&out);
    let (action, _) = fx.run(&tcp4_flags(backend, CLIENT4, 8080, port, SYN | ACK, b""));
    assert_eq!(action, TC_ACT_REDIRECT);
    let (action, _) = fx.run(&tcp4_flags(CLIENT4, VIP4, port, 80, ACK, b""));
    assert_eq!(action, TC_ACT_REDIRECT);
    backend
}

/// The client's packet `flags`/`payload` on CLIENT4:`port` -> the web
/// frontend: checks it reaches `backend` exactly.
#[track_caller]
fn client_reaches(fx: &mut Fixture, port: u16, flags: u8, backend: [u8; 4]) {
    let (action, out) = fx.run(&tcp4_flags(CLIENT4, VIP4, port, 80, flags, b"data"));
    assert_eq!(action, TC_ACT_REDIRECT, "{}", hex(&out));
    let want = fx.to_backends(tcp4_flags(CLIENT4, backend, port, 8080, flags, b"data"));
    assert_frame(&out, &want, "client to backend");
}

/// The backend's packet on its connection with CLIENT4:`port`: checks it
/// comes back from the web frontend exactly.
#[track_caller]
fn backend_reaches_client(fx: &mut Fixture, port: u16, flags: u8, backend: [u8; 4]) {
    let (action, out) = fx.run(&tcp4_flags(backend, CLIENT4, 8080, port, flags, b"back"));
    assert_eq!(action, TC_ACT_REDIRECT, "{}", hex(&out));
    let want = fx.to_clients(tcp4_flags(VIP4, CLIENT4, 80, port, flags, b"back"));
    assert_frame(&out, &want, "backend to client");
}

/// A client port of CLIENT4 whose new flow to the web service Maglev sends
/// to `backend`, at or after `from`.
fn port_to(fx: &mut Fixture, backend: [u8; 4], from: u16) -> u16 {
    (from..from + 500)
        .find(|p| {
            let (_, out) = fx.run(&tcp4(CLIENT4, VIP4, *p, 80, b""));
            let hit = dst4(&out) == backend;
            // Forget the probe's connection (and any other pending one).
            for (k, _) in fx.pending() {
                fx.pending_remove(&k);
            }
            hit
        })
        .expect("a port for that backend")
}

#[test]
fn tcp_handshake_moves_both_halves_from_pending_to_conntrack() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        fx.set_clock(T0);
        let (action, out) = fx.run(&tcp4(CLIENT4, VIP4, 40000, 80, b""));
        assert_eq!(action, TC_ACT_REDIRECT);
        let backend = dst4(&out);
        let c = Conn::web(40000, backend);
        let want = vec![
            (c.forward_key(), c.half(&fx, false, 0, T0)),
            (c.reply_key(), c.half(&fx, true, 0, T0)),
        ];
        let mut got = fx.pending();
        got.sort_by_key(|(_, e)| e.flags);
        assert_eq!(got, want, "after the SYN");
        assert!(fx.conntrack().is_empty());

        // The backend's SYN-ACK: seen in both halves, still pending.
        fx.set_clock(T0 + 10 * MS);
        backend_reaches_client(&mut fx, 40000, SYN | ACK, backend);
        assert_eq!(
            fx.pending_get(&c.forward_key()),
            Some(c.half(&fx, false, lb_common::ST_SEEN_REPLY, T0))
        );
        assert_eq!(
            fx.pending_get(&c.reply_key()),
            Some(c.half(&fx, true, lb_common::ST_SEEN_REPLY, T0 + 10 * MS))
        );
        assert!(fx.conntrack().is_empty());

        // The client's ACK confirms: both halves move.
        fx.set_clock(T0 + 20 * MS);
        client_reaches(&mut fx, 40000, ACK, backend);
        let confirmed = lb_common::ST_SEEN_REPLY | lb_common::ST_CONFIRMED;
        assert!(fx.pending().is_empty(), "{:?}", fx.pending());
        assert_eq!(
            fx.conntrack_get(&c.forward_key()),
            Some(c.half(&fx, false, confirmed, T0 + 20 * MS))
        );
        let reply = fx
            .conntrack_get(&c.reply_key())
            .expect("reply half confirmed");
        assert!([T0 + 10 * MS, T0 + 20 * MS].contains(&reply.last_seen_ns));
        assert_eq!(reply, c.half(&fx, true, confirmed, reply.last_seen_ns));
        assert_eq!(fx.global(global::CT_CONFIRMED), 1);

        // And the connection goes on.
        backend_reaches_client(&mut fx, 40000, ACK | PSH, backend);
        client_reaches(&mut fx, 40000, ACK | PSH, backend);
        assert_eq!(fx.conntrack().len(), 2);
    });
}

/// Section 6: a connection's half keeps the FIB's answer for the second of
/// the datapath clock in which it was asked. A neighbour's new MAC and a
/// new MTU reach an established flow at the next second, not before.
#[test]
fn next_hop_is_kept_for_the_second_it_was_asked_in() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        fx.set_clock(T0);
        // Each half asks at its first packet; the reply half keeps its
        // answer when the connection is confirmed.
        let backend = establish(&mut fx, 40000);
        let c = Conn::web(40000, backend);
        let second = (T0 / SEC) as u32;
        let forward = lb_common::NextHop {
            dmac: MAC_BACKEND,
            smac: fx.backends.mac,
            ifindex: fx.backends.ifindex,
            in_ifindex: fx.clients.ifindex,
            mtu: 1500,
            second,
        };
        assert_eq!(fx.next_hop(&c.forward_key()), Some(forward));
        let reply = lb_common::NextHop {
            dmac: MAC_CLIENT,
            smac: fx.clients.mac,
            ifindex: fx.clients.ifindex,
            in_ifindex: fx.backends.ifindex,
            mtu: 1500,
            second,
        };
        assert_eq!(fx.next_hop(&c.reply_key()), Some(reply));

        let [a, b, c3, d] = backend;
        sh(&format!(
            "ip neigh replace {a}.{b}.{c3}.{d} lladdr 02:00:00:00:02:09 dev {IF_BACKENDS} \
             nud permanent && ip link set {IF_BACKENDS} mtu 1400"
        ));
        fx.set_clock(T0 + 900 * MS);
        client_reaches(&mut fx, 40000, ACK, backend);
        assert_eq!(fx.next_hop(&c.forward_key()), Some(forward));

        fx.set_clock(T0 + SEC);
        let (action, out) = fx.run(&tcp4_flags(CLIENT4, VIP4, 40000, 80, ACK, b"data"));
        assert_eq!(action, TC_ACT_REDIRECT);
        let moved = [2, 0, 0, 0, 2, 9];
        assert_eq!(out[0..6], moved, "the neighbour's new MAC");
        let now = lb_common::NextHop {
            dmac: moved,
            mtu: 1400,
            second: second + 1,
            ..forward
        };
        assert_eq!(fx.next_hop(&c.forward_key()), Some(now));
        // The reply half asks for itself, at its own next packet.
        assert_eq!(fx.next_hop(&c.reply_key()), Some(reply));
    });
}

#[test]
fn pending_connection_is_confirmed_only_after_a_reply() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        fx.set_clock(T0);
        let (_, out) = fx.run(&tcp4(CLIENT4, VIP4, 40000, 80, b""));
        let backend = dst4(&out);
        // An ACK and a retransmitted SYN before the backend answered.
        client_reaches(&mut fx, 40000, ACK, backend);
        let (action, out) = fx.run(&tcp4(CLIENT4, VIP4, 40000, 80, b""));
        assert_eq!((action, dst4(&out)), (TC_ACT_REDIRECT, backend));
        let c = Conn::web(40000, backend);
        assert_eq!(
            fx.pending_get(&c.forward_key()),
            Some(c.half(&fx, false, 0, T0))
        );
        assert!(fx.conntrack().is_empty());
        assert_eq!(fx.global(global::CT_CONFIRMED), 0);
        assert_eq!(fx.global(global::CT_REOPENED), 0);
        assert_eq!(fx.service_stats("web").new_flows, 1);
    });
}

#[test]
fn udp_reply_confirms_the_flow() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        fx.set_clock(T0);
        let backend = [10, 72, 1, 2];
        let c = Conn {
            service: "dns",
            proto: 17,
            client: (ip4(CLIENT4), 5000),
            frontend: (ip4(VIP4), 53),
            backend: (ip4(backend), 5353),
            nat: None,
        };
        fx.run(&udp4(CLIENT4, VIP4, 5000, 53, b"query"));
        assert_eq!(fx.pending().len(), 2);
        assert_eq!(
            fx.pending_get(&c.reply_key()),
            Some(c.half(&fx, true, 0, T0))
        );
        fx.set_clock(T0 + 5 * MS);
        let (action, out) = fx.run(&udp4(backend, CLIENT4, 5353, 5000, b"answer"));
        assert_eq!(action, TC_ACT_REDIRECT);
        let want = fx.to_clients(udp4(VIP4, CLIENT4, 53, 5000, b"answer"));
        assert_frame(&out, &want, "answer");
        let confirmed = lb_common::ST_SEEN_REPLY | lb_common::ST_CONFIRMED;
        assert!(fx.pending().is_empty());
        assert_eq!(
            fx.conntrack_get(&c.reply_key()),
            Some(c.half(&fx, true, confirmed, T0 + 5 * MS))
        );
        let fwd = fx.conntrack_get(&c.forward_key()).expect("forward half");
        assert_eq!(fwd.state, confirmed);
        assert_eq!(fx.global(global::CT_CONFIRMED), 1);
    });
}

#[test]
fn fin_and_rst_set_state_in_both_halves() {
    in_fresh_netns(|| {
        use lb_common::{ST_CONFIRMED, ST_FIN_BACKEND, ST_FIN_CLIENT, ST_RST, ST_SEEN_REPLY};
        let mut fx = Fixture::new();
        fx.set_clock(T0);
        let states = |fx: &Fixture, c: &Conn| {
            let get = |k| {
                fx.conntrack_get(&k)
                    .or_else(|| fx.pending_get(&k))
                    .map(|e| e.state)
            };
            (get(c.forward_key()), get(c.reply_key()))
        };
        let open = ST_SEEN_REPLY | ST_CONFIRMED;

        let b = establish(&mut fx, 40000);
        let c = Conn::web(40000, b);
        client_reaches(&mut fx, 40000, FIN | ACK, b);
        let s = Some(open | ST_FIN_CLIENT);
        assert_eq!(states(&fx, &c), (s, s), "client's FIN");
        backend_reaches_client(&mut fx, 40000, FIN | ACK, b);
        let s = Some(open | ST_FIN_CLIENT | ST_FIN_BACKEND);
        assert_eq!(states(&fx, &c), (s, s), "backend's FIN");

        let b = establish(&mut fx, 40001);
        let c = Conn::web(40001, b);
        client_reaches(&mut fx, 40001, RST, b);
        let s = Some(open | ST_RST);
        assert_eq!(states(&fx, &c), (s, s), "client's RST");

        let b = establish(&mut fx, 40002);
        let c = Conn::web(40002, b);
        backend_reaches_client(&mut fx, 40002, RST | ACK, b);
        assert_eq!(states(&fx, &c), (s, s), "backend's RST");

        // A backend refusing the SYN: the pending connection is reset.
        let (_, out) = fx.run(&tcp4(CLIENT4, VIP4, 40003, 80, b""));
        let b = dst4(&out);
        let c = Conn::web(40003, b);
        backend_reaches_client(&mut fx, 40003, RST | ACK, b);
        let s = Some(ST_SEEN_REPLY | ST_RST);
        assert_eq!(states(&fx, &c), (s, s), "refused SYN");
        assert!(fx.pending_get(&c.forward_key()).is_some());
    });
}

#[test]
fn syn_on_a_closed_connection_is_balanced_afresh() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        fx.set_clock(T0);
        for (port, close) in [(40000u16, "fin"), (40001, "rst")] {
            let b = establish(&mut fx, port);
            let c = Conn::web(port, b);
            if close == "fin" {
                client_reaches(&mut fx, port, FIN | ACK, b);
                backend_reaches_client(&mut fx, port, FIN | ACK, b);
                client_reaches(&mut fx, port, ACK, b);
            } else {
                backend_reaches_client(&mut fx, port, RST, b);
            }
            fx.set_clock(T0 + SEC);
            let (action, out) = fx.run(&tcp4(CLIENT4, VIP4, port, 80, b""));
            assert_eq!(action, TC_ACT_REDIRECT);
            let b2 = dst4(&out);
            let c2 = Conn::web(port, b2);
            assert_eq!(fx.conntrack_get(&c.forward_key()), None, "{close}");
            assert_eq!(fx.conntrack_get(&c.reply_key()), None, "{close}");
            assert_eq!(
                fx.pending_get(&c2.forward_key()),
                Some(c2.half(&fx, false, 0, T0 + SEC)),
                "{close}"
            );
            assert_eq!(
                fx.pending_get(&c2.reply_key()),
                Some(c2.half(&fx, true, 0, T0 + SEC)),
                "{close}"
            );
            fx.set_clock(T0);
        }
        assert_eq!(fx.global(global::CT_REOPENED), 2);
        assert_eq!(fx.service_stats("web").new_flows, 4);
    });
}

#[test]
fn draining_backend_keeps_established_connections_only() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        fx.set_clock(T0);
        let x = [10, 72, 1, 2];
        let p1 = port_to(&mut fx, x, 20000);
        let p2 = port_to(&mut fx, x, p1 + 1);
        assert_eq!(establish(&mut fx, p1), x);
        assert_eq!(establish(&mut fx, p2), x);
        let mut state = desired();
        state.services[0].backends[0].weight = 0;
        fx.reconciler.apply(&state).unwrap();

        // Established connections keep their backend, both ways.
        client_reaches(&mut fx, p1, ACK | PSH, x);
        backend_reaches_client(&mut fx, p1, ACK | PSH, x);

        // A SYN on a live connection whose backend drains: a new connection.
        let (action, out) = fx.run(&tcp4(CLIENT4, VIP4, p1, 80, b""));
        assert_eq!(action, TC_ACT_REDIRECT);
        assert_ne!(dst4(&out), x, "SYN while draining stayed on the backend");
        assert_eq!(fx.global(global::CT_REOPENED), 1);

        // A SYN on the same tuple after the connection closed.
        client_reaches(&mut fx, p2, FIN | ACK, x);
        backend_reaches_client(&mut fx, p2, FIN | ACK, x);
        let (action, out) = fx.run(&tcp4(CLIENT4, VIP4, p2, 80, b""));
        assert_eq!(action, TC_ACT_REDIRECT);
        assert_ne!(
            dst4(&out),
            x,
            "SYN after close went to the draining backend"
        );
        assert_eq!(fx.global(global::CT_REOPENED), 2);

        // No new flow reaches it.
        for port in 30000..30100u16 {
            let (_, out) = fx.run(&tcp4(CLIENT4, VIP4, port, 80, b""));
            assert_ne!(dst4(&out), x);
        }
    });
}

#[test]
fn connection_of_a_removed_backend_is_balanced_afresh() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        fx.set_clock(T0);
        let x = [10, 72, 1, 2];
        let port = port_to(&mut fx, x, 20000);
        assert_eq!(establish(&mut fx, port), x);
        let mut state = desired();
        state.services[0].backends.remove(0);
        fx.reconciler.apply(&state).unwrap();
        let (action, out) = fx.run(&tcp4_flags(CLIENT4, VIP4, port, 80, ACK, b"data"));
        assert_eq!(action, TC_ACT_REDIRECT);
        let b = dst4(&out);
        assert_ne!(b, x);
        let want = fx.to_backends(tcp4_flags(CLIENT4, b, port, 8080, ACK, b"data"));
        assert_frame(&out, &want, "moved connection");
        assert_eq!(fx.global(global::CT_STALE), 1);
        // The old connection is gone, the new one pending.
        assert_eq!(fx.conntrack_get(&Conn::web(port, x).reply_key()), None);
        assert!(fx.pending_get(&Conn::web(port, b).reply_key()).is_some());
    });
}

#[test]
fn expired_entries_are_ignored_and_flows_balanced_afresh() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let cfg = fx.config();
        assert_eq!(cfg.timeout_syn_ns, 60 * SEC);
        assert_eq!(cfg.timeout_udp_ns, 120 * SEC);
        assert_eq!(cfg.timeout_closing_ns, 30 * SEC);

        // A SYN-only connection: live at its timeout exactly, not after.
        fx.set_clock(T0);
        let (_, out) = fx.run(&tcp4(CLIENT4, VIP4, 40000, 80, b""));
        let b = dst4(&out);
        fx.set_clock(T0 + 60 * SEC);
        client_reaches(&mut fx, 40000, ACK, b);
        assert_eq!(fx.global(global::CT_EXPIRED), 0);
        assert_eq!(fx.service_stats("web").new_flows, 1);
        let later = T0 + 120 * SEC + 1;
        fx.set_clock(later);
        let (action, out) = fx.run(&tcp4(CLIENT4, VIP4, 40000, 80, b""));
        assert_eq!(action, TC_ACT_REDIRECT);
        assert_eq!(fx.global(global::CT_EXPIRED), 1);
        assert_eq!(fx.service_stats("web").new_flows, 2);
        let c = Conn::web(40000, dst4(&out));
        assert_eq!(
            fx.pending_get(&c.forward_key()),
            Some(c.half(&fx, false, 0, later))
        );
        assert_eq!(fx.global(global::CT_REOPENED), 0);

        // A UDP flow past its timeout: the backend's answer is no longer
        // translated, and the client's next datagram is a new flow.
        fx.set_clock(T0);
        fx.run(&udp4(CLIENT4, VIP4, 5000, 53, b"query"));
        fx.set_clock(T0 + 120 * SEC + 1);
        let answer = udp4([10, 72, 1, 2], CLIENT4, 5353, 5000, b"answer");
        let (action, out) = fx.run(&answer);
        assert_eq!(action, PASS);
        assert_frame(&out, &answer, "expired answer");
        assert_eq!(fx.global(global::CT_EXPIRED), 2);
        let (action, _) = fx.run(&udp4(CLIENT4, VIP4, 5000, 53, b"query"));
        assert_eq!(action, TC_ACT_REDIRECT);
        assert_eq!(fx.service_stats("dns").new_flows, 2);

        // A closing connection lives 30 s.
        fx.set_clock(T0);
        let b = establish(&mut fx, 40001);
        client_reaches(&mut fx, 40001, FIN | ACK, b);
        fx.set_clock(T0 + 31 * SEC);
        let before = fx.service_stats("web").new_flows;
        let (action, _) = fx.run(&tcp4_flags(CLIENT4, VIP4, 40001, 80, ACK, b""));
        assert_eq!(action, TC_ACT_REDIRECT);
        assert_eq!(fx.global(global::CT_EXPIRED), 3);
        assert_eq!(fx.service_stats("web").new_flows, before + 1);
    });
}

#[test]
fn idle_established_connection_survives_an_hour() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        fx.set_clock(T0);
        let b = establish(&mut fx, 40000);
        assert_eq!(fx.config().timeout_tcp_ns, 6 * 3600 * SEC);
        fx.set_clock(T0 + 3600 * SEC);
        client_reaches(&mut fx, 40000, ACK | PSH, b);
        backend_reaches_client(&mut fx, 40000, ACK | PSH, b);
        assert_eq!(fx.global(global::CT_EXPIRED), 0);
        assert_eq!(fx.service_stats("web").new_flows, 1);
        assert_eq!(fx.conntrack().len(), 2);

        // Six hours of silence after that: gone.
        fx.set_clock(T0 + 3600 * SEC + 6 * 3600 * SEC + 1);
        let (action, _) = fx.run(&tcp4_flags(CLIENT4, VIP4, 40000, 80, ACK, b""));
        assert_eq!(action, TC_ACT_REDIRECT);
        assert_eq!(fx.global(global::CT_EXPIRED), 1);
        assert_eq!(fx.service_stats("web").new_flows, 2);
    });
}

#[test]
fn snat_port_range_exhaustion_drops_and_expiry_releases_ports() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        fx.set_clock(T0);
        fx.set_config(|c| {
            c.snat_port_min = 40000;
            c.snat_port_max = 40001;
        });
        let mut ports = Vec::new();
        for client_port in [1000u16, 1001] {
            let (action, out) = fx.run(&tcp4(CLIENT4, FULLNAT_VIP4, client_port, 80, b""));
            assert_eq!(action, TC_ACT_REDIRECT);
            let port = sport4(&out);
            let want = fx.to_backends(tcp4(SNAT4, [10, 72, 1, 2], port, 8080, b""));
            assert_frame(&out, &want, "full NAT SYN");
            ports.push(port);
        }
        ports.sort();
        assert_eq!(ports, [40000, 40001]);
        let third = tcp4(CLIENT4, FULLNAT_VIP4, 1002, 80, b"");
        let (action, _) = fx.run(&third);
        assert_eq!(action, TC_ACT_SHOT);
        assert_eq!(fx.global(global::SNAT_EXHAUSTED), 1);
        assert_eq!(fx.pending().len(), 4);

        // Once the first two connections have expired, their ports are free.
        fx.set_clock(T0 + 61 * SEC);
        let (action, out) = fx.run(&third);
        assert_eq!(action, TC_ACT_REDIRECT);
        assert!([40000, 40001].contains(&sport4(&out)));
        assert_eq!(fx.global(global::SNAT_EXHAUSTED), 1);
    });
}

#[test]
fn missing_half_is_restored_after_the_peer_refresh_interval() {
    in_fresh_netns(|| {
        use lb_common::{ST_CONFIRMED, ST_SEEN_REPLY};
        let mut fx = Fixture::new();
        fx.set_clock(T0);
        let b = establish(&mut fx, 40000);
        let c = Conn::web(40000, b);
        let open = ST_SEEN_REPLY | ST_CONFIRMED;
        fx.conntrack_remove(&c.reply_key());

        // Within the refresh interval nothing restores it: the backend's
        // packets are not recognised.
        fx.set_clock(T0 + 500 * MS);
        let answer = tcp4_flags(b, CLIENT4, 8080, 40000, ACK, b"back");
        let (action, out) = fx.run(&answer);
        assert_eq!(action, PASS);
        assert_frame(&out, &answer, "answer without its half");
        client_reaches(&mut fx, 40000, ACK, b);
        assert_eq!(fx.conntrack_get(&c.reply_key()), None);

        // After it, the client's packet restores it.
        fx.set_clock(T0 + 2 * SEC);
        client_reaches(&mut fx, 40000, ACK, b);
        assert_eq!(fx.global(global::CT_RESTORED), 1);
        assert_eq!(
            fx.conntrack_get(&c.reply_key()),
            Some(c.half(&fx, true, open, T0 + 2 * SEC))
        );
        backend_reaches_client(&mut fx, 40000, ACK, b);

        // The same the other way: the forward half restored by a reply.
        fx.conntrack_remove(&c.forward_key());
        fx.set_clock(T0 + 4 * SEC);
        backend_reaches_client(&mut fx, 40000, ACK, b);
        assert_eq!(fx.global(global::CT_RESTORED), 2);
        assert_eq!(
            fx.conntrack_get(&c.forward_key()),
            Some(c.half(&fx, false, open, T0 + 4 * SEC))
        );
        client_reaches(&mut fx, 40000, ACK, b);
        assert_eq!(fx.service_stats("web").new_flows, 1);
    });
}

#[test]
fn hairpin_client_gets_the_frontend_as_its_source() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let mut state = desired();
        state.services.push(service(
            "hairpin",
            "10.73.0.14:80",
            lb_userspace::model::Proto::Tcp,
            &["10.72.1.2:8080"],
        ));
        state.services.push(service(
            "hairpin6",
            "[fd00:73::14]:80",
            lb_userspace::model::Proto::Tcp,
            &["[fd00:72:1::2]:8080"],
        ));
        fx.reconciler.apply(&state).unwrap();
        fx.set_clock(T0);
        let cfg = fx.config();
        let range = cfg.snat_port_min..=cfg.snat_port_max;

        let (vip, me) = ([10, 73, 0, 14], [10, 72, 1, 2]);
        let (action, out) = fx.run(&tcp4(me, vip, 40000, 80, b"hello"));
        assert_eq!(action, TC_ACT_REDIRECT);
        let port = sport4(&out);
        assert!(range.contains(&port), "port {port}");
        let want = fx.to_backends(tcp4(vip, me, port, 8080, b"hello"));
        assert_frame(&out, &want, "hairpin request");
        let c = Conn {
            service: "hairpin",
            proto: 6,
            client: (ip4(me), 40000),
            frontend: (ip4(vip), 80),
            backend: (ip4(me), 8080),
            nat: Some((ip4(vip), port)),
        };
        assert_eq!(
            fx.pending_get(&c.reply_key()),
            Some(c.half(&fx, true, 0, T0))
        );
        let (action, out) = fx.run(&tcp4_flags(me, vip, 8080, port, SYN | ACK, b""));
        assert_eq!(action, TC_ACT_REDIRECT);
        let want = fx.to_backends(tcp4_flags(vip, me, 80, 40000, SYN | ACK, b""));
        assert_frame(&out, &want, "hairpin reply");

        let (vip, me) = (v6("fd00:73::14"), v6("fd00:72:1::2"));
        let (action, out) = fx.run(&tcp6(me, vip, 40000, 80, b"hello"));
        assert_eq!(action, TC_ACT_REDIRECT);
        let port = u16::from_be_bytes([out[54], out[55]]);
        assert!(range.contains(&port), "port {port}");
        let want = fx.to_backends(tcp6(vip, me, port, 8080, b"hello"));
        assert_frame(&out, &want, "v6 hairpin request");
        let (action, out) = fx.run(&tcp6_flags(me, vip, 8080, port, SYN | ACK, b""));
        assert_eq!(action, TC_ACT_REDIRECT);
        let want = fx.to_backends(tcp6_flags(vip, me, 80, 40000, SYN | ACK, b""));
        assert_frame(&out, &want, "v6 hairpin reply");
    });
}

#[test]
fn reply_tuple_of_another_connection_is_a_collision() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let mut state = desired();
        state.services.push(service(
            "dns2",
            "10.73.0.15:53",
            lb_userspace::model::Proto::Udp,
            &["10.72.1.2:5353"],
        ));
        fx.reconciler.apply(&state).unwrap();
        fx.set_clock(T0);
        let (action, _) = fx.run(&udp4(CLIENT4, VIP4, 5000, 53, b"query"));
        assert_eq!(action, TC_ACT_REDIRECT);
        // Same client port, same backend, other frontend: the backend's
        // answers could not be told apart.
        let (action, _) = fx.run(&udp4(CLIENT4, [10, 73, 0, 15], 5000, 53, b"query"));
        assert_eq!(action, TC_ACT_SHOT);
        assert_eq!(fx.global(global::CT_COLLISIONS), 1);
        let (action, out) = fx.run(&udp4([10, 72, 1, 2], CLIENT4, 5353, 5000, b"answer"));
        assert_eq!(action, TC_ACT_REDIRECT);
        let want = fx.to_clients(udp4(VIP4, CLIENT4, 53, 5000, b"answer"));
        assert_frame(&out, &want, "first connection's answer");
    });
}

#[test]
fn local_frontend_without_backends_passes_to_the_stack() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        fx.reconciler.set_local_vips(true);
        let mut state = desired();
        // A changed service is written again, now with the local flag.
        state.services[4].name = "empty-local".into();
        fx.reconciler.apply(&state).unwrap();
        let input = tcp4(CLIENT4, [10, 73, 0, 11], 40000, 80, b"");
        let (action, out) = fx.run(&input);
        assert_eq!(action, PASS);
        assert_frame(&out, &input, "no backend, local frontend");
        assert_eq!(fx.service_stats("empty-local").no_backend, 1);
    });
}

// ---------------------------------------------------------------------------
// Capacity (section 2): CT_PENDING full of new flows
// ---------------------------------------------------------------------------

#[test]
fn syn_flood_beyond_pending_capacity_leaves_confirmed_connections_working() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        fx.set_clock(T0);
        let b = establish(&mut fx, 40000);
        let mut redirected = 0;
        for i in 0..10_000u32 {
            let src = [10, 71, 10 + (i / 256) as u8, (i % 256) as u8];
            let (action, _) = fx.run(&tcp4(src, VIP4, 1234, 80, b""));
            redirected += (action == TC_ACT_REDIRECT) as u32;
        }
        assert!(fx.pending().len() <= 1024, "{}", fx.pending().len());
        client_reaches(&mut fx, 40000, ACK | PSH, b);
        backend_reaches_client(&mut fx, 40000, ACK | PSH, b);
        assert_eq!(fx.conntrack().len(), 2);
        assert!(redirected > 0);
    });
}

// ---------------------------------------------------------------------------
// CHECKSUM_COMPLETE: skb->csum kept in step with every rewrite
// ---------------------------------------------------------------------------

/// Runs `input` with BPF_F_TEST_SKB_CHECKSUM_COMPLETE: the kernel seeds
/// skb->csum from the input and fails the run with EBADMSG when the program
/// leaves it inconsistent with the output. `want` gives the expected output
/// from the actual one (for what the datapath picks: backend, port).
fn checksum_complete_case(
    fx: &mut Fixture,
    what: &str,
    input: &[u8],
    want: impl FnOnce(&[u8]) -> Vec<u8>,
) -> Result<(), String> {
    let opts = RunOptions {
        checksum_complete: true,
        ..Default::default()
    };
    match fx.try_run(input, opts) {
        Err(e) => Err(format!("{what}: {e}\n  in: {}", hex(input))),
        Ok((action, out)) => {
            let expected = want(&out);
            if action != TC_ACT_REDIRECT || out != expected {
                Err(format!(
                    "{what}: action {action}\n got: {}\nwant: {}",
                    hex(&out),
                    hex(&expected)
                ))
            } else {
                Ok(())
            }
        }
    }
}

/// The main translations, each of which must succeed under
/// CHECKSUM_COMPLETE with exactly the bytes expected.
#[test]
fn checksum_complete_is_kept_valid_by_every_rewrite() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let be4 = [10, 72, 1, 2];
        let be6 = v6("fd00:72:1::2");
        let (c6, vip6) = (v6(CLIENT6), v6(VIP6));
        let (to_b, to_c) = (fx.backends.mac, fx.clients.mac);
        let tb = move |f: Vec<u8>| routed(f, to_b, MAC_BACKEND);
        let tc = move |f: Vec<u8>| routed(f, to_c, MAC_CLIENT);
        let (vip6_nat, snat6) = (v6("fd00:73::12"), v6("fd00:72::1"));
        let mut state = desired();
        state.services.push(service(
            "hairpin",
            "10.73.0.14:80",
            lb_userspace::model::Proto::Tcp,
            &["10.72.1.2:8080"],
        ));
        state.services.push(lb_userspace::model::ServiceSpec {
            snat: Some(ip6(snat6)),
            ..service(
                "fullnat6",
                "[fd00:73::12]:80",
                lb_userspace::model::Proto::Tcp,
                &["[fd00:72:1::2]:8080"],
            )
        });
        fx.reconciler.apply(&state).unwrap();
        let mut results = Vec::new();
        let fx = &mut fx;

        let syn = tcp4(CLIENT4, VIP4, 40000, 80, b"hello");
        let mut web_backend = [0; 4];
        results.push(checksum_complete_case(fx, "TCP v4 forward", &syn, |out| {
            web_backend = dst4(out);
            tb(tcp4(CLIENT4, web_backend, 40000, 8080, b"hello"))
        }));
        let input = tcp4_flags(web_backend, CLIENT4, 8080, 40000, SYN | ACK, b"world");
        results.push(checksum_complete_case(fx, "TCP v4 reply", &input, |_| {
            tc(tcp4_flags(VIP4, CLIENT4, 80, 40000, SYN | ACK, b"world"))
        }));
        let input = udp4(CLIENT4, VIP4, 5000, 53, b"query");
        results.push(checksum_complete_case(fx, "UDP v4 forward", &input, |_| {
            tb(udp4(CLIENT4, be4, 5000, 5353, b"query"))
        }));
        let input = udp4(be4, CLIENT4, 5353, 5000, b"answer");
        results.push(checksum_complete_case(fx, "UDP v4 reply", &input, |_| {
            tc(udp4(VIP4, CLIENT4, 53, 5000, b"answer"))
        }));
        let input = tcp6(c6, vip6, 40000, 80, b"hello");
        results.push(checksum_complete_case(fx, "TCP v6 forward", &input, |_| {
            tb(tcp6(c6, be6, 40000, 8080, b"hello"))
        }));
        let input = tcp6_flags(be6, c6, 8080, 40000, ACK, b"w");
        results.push(checksum_complete_case(fx, "TCP v6 reply", &input, |_| {
            tc(tcp6_flags(vip6, c6, 80, 40000, ACK, b"w"))
        }));
        let input = udp6(c6, vip6, 5000, 53, b"query");
        results.push(checksum_complete_case(fx, "UDP v6 forward", &input, |_| {
            tb(udp6(c6, be6, 5000, 5353, b"query"))
        }));
        let input = udp6(be6, c6, 5353, 5000, b"answer");
        results.push(checksum_complete_case(fx, "UDP v6 reply", &input, |_| {
            tc(udp6(vip6, c6, 53, 5000, b"answer"))
        }));
        let input = tcp4(CLIENT4, FULLNAT_VIP4, 40000, 80, b"hello");
        let mut snat_port = 0;
        results.push(checksum_complete_case(
            fx,
            "full NAT forward",
            &input,
            |out| {
                snat_port = sport4(out);
                tb(tcp4(SNAT4, be4, snat_port, 8080, b"hello"))
            },
        ));
        let input = tcp4_flags(be4, SNAT4, 8080, snat_port, SYN | ACK, b"world");
        results.push(checksum_complete_case(fx, "full NAT reply", &input, |_| {
            tc(tcp4_flags(
                FULLNAT_VIP4,
                CLIENT4,
                80,
                40000,
                SYN | ACK,
                b"world",
            ))
        }));
        let input = tcp6(c6, vip6_nat, 40000, 80, b"hello");
        let mut snat6_port = 0;
        results.push(checksum_complete_case(
            fx,
            "v6 full NAT forward",
            &input,
            |out| {
                snat6_port = u16::from_be_bytes([out[54], out[55]]);
                tb(tcp6(snat6, be6, snat6_port, 8080, b"hello"))
            },
        ));
        let input = tcp6_flags(be6, snat6, 8080, snat6_port, SYN | ACK, b"world");
        results.push(checksum_complete_case(
            fx,
            "v6 full NAT reply",
            &input,
            |_| tc(tcp6_flags(vip6_nat, c6, 80, 40000, SYN | ACK, b"world")),
        ));
        let hairpin = [10, 73, 0, 14];
        let input = tcp4(be4, hairpin, 41000, 80, b"hairpin");
        let mut hairpin_port = 0;
        results.push(checksum_complete_case(
            fx,
            "hairpin forward",
            &input,
            |out| {
                hairpin_port = sport4(out);
                tb(tcp4(hairpin, be4, hairpin_port, 8080, b"hairpin"))
            },
        ));
        let input = tcp4_flags(be4, hairpin, 8080, hairpin_port, SYN | ACK, b"back");
        results.push(checksum_complete_case(fx, "hairpin reply", &input, |_| {
            tb(tcp4_flags(hairpin, be4, 80, 41000, SYN | ACK, b"back"))
        }));

        // ICMP errors translated, both ways, both families.
        let sent = ip_part(&tb(udp4(CLIENT4, be4, 5000, 5353, b"query")));
        let quote = ip_part(&with_ttl(udp4(CLIENT4, VIP4, 5000, 53, b"query"), 63));
        let input = icmp4(be4, CLIENT4, 3, 3, [0; 4], &sent);
        results.push(checksum_complete_case(
            fx,
            "ICMP v4 to the client",
            &input,
            |_| tc(icmp4(VIP4, CLIENT4, 3, 3, [0; 4], &quote)),
        ));
        let got = ip_part(&tc(udp4(VIP4, CLIENT4, 53, 5000, b"answer")));
        let quote = ip_part(&with_ttl(udp4(be4, CLIENT4, 5353, 5000, b"answer"), 63));
        let input = icmp4(CLIENT4, VIP4, 3, 3, [0; 4], &got);
        results.push(checksum_complete_case(
            fx,
            "ICMP v4 to the backend",
            &input,
            |_| tb(icmp4(CLIENT4, be4, 3, 3, [0; 4], &quote)),
        ));
        let sent = ip_part(&tb(udp6(c6, be6, 5000, 5353, b"query")));
        let quote = ip_part(&with_ttl(udp6(c6, vip6, 5000, 53, b"query"), 63));
        let input = icmp6(be6, c6, 1, 4, [0; 4], &sent);
        results.push(checksum_complete_case(
            fx,
            "ICMPv6 to the client",
            &input,
            |_| tc(icmp6(vip6, c6, 1, 4, [0; 4], &quote)),
        ));
        let got = ip_part(&tc(udp6(vip6, c6, 53, 5000, b"answer")));
        let quote = ip_part(&with_ttl(udp6(be6, c6, 5353, 5000, b"answer"), 63));
        let input = icmp6(c6, vip6, 1, 4, [0; 4], &got);
        results.push(checksum_complete_case(
            fx,
            "ICMPv6 to the backend",
            &input,
            |_| tb(icmp6(c6, be6, 1, 4, [0; 4], &quote)),
        ));

        // The datapath's own errors, from packets sized so that the error
        // is exactly as long (IPv4: 156 bytes of IP, IPv6: 176): resizing
        // the packet (bpf_skb_change_tail) turns CHECKSUM_COMPLETE into
        // CHECKSUM_NONE, which the kernel's test does not take into account.
        let expiring = with_ttl(tcp4(CLIENT4, VIP4, 41000, 80, &[7; 156 - 40]), 1);
        let want = datapath_error(&expiring, 11, 0, [0; 4]);
        assert_eq!(want.len(), expiring.len());
        results.push(checksum_complete_case(
            fx,
            "time exceeded v4",
            &expiring,
            |_| want,
        ));
        let expiring = with_ttl(tcp6(c6, vip6, 41000, 80, &[7; 176 - 60]), 1);
        let want = datapath_error(&expiring, 3, 0, [0; 4]);
        assert_eq!(want.len(), expiring.len());
        results.push(checksum_complete_case(
            fx,
            "time exceeded v6",
            &expiring,
            |_| want,
        ));

        let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}

/// A UDP datagram without a checksum (0 over IPv4): its checksum stays 0,
/// so nothing compensates the rewritten port in the packet's sum, and
/// skb->csum must be adjusted for it.
#[test]
fn checksum_complete_udp_without_checksum() {
    in_fresh_netns(|| {
        let mut fx = Fixture::new();
        let mut input = udp4(CLIENT4, VIP4, 5001, 53, b"query");
        input[40..42].copy_from_slice(&[0, 0]);
        let mut want = fx.to_backends(udp4(CLIENT4, [10, 72, 1, 2], 5001, 5353, b"query"));
        want[40..42].copy_from_slice(&[0, 0]);
        let answer = udp4([10, 72, 1, 2], CLIENT4, 5353, 5001, b"answer");
        let mut answer0 = answer.clone();
        answer0[40..42].copy_from_slice(&[0, 0]);
        let mut want_answer = fx.to_clients(udp4(VIP4, CLIENT4, 53, 5001, b"answer"));
        want_answer[40..42].copy_from_slice(&[0, 0]);
        let results = [
            checksum_complete_case(&mut fx, "UDP v4 forward, checksum 0", &input, |_| want),
            checksum_complete_case(&mut fx, "UDP v4 reply, checksum 0", &answer0, |_| {
                want_answer
            }),
        ];
        let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}

/// The datapath's log records, as lbd's logger would get them.
#[derive(Clone, Default)]
struct Records(std::sync::Arc<std::sync::Mutex<Vec<(log::Level, String)>>>);

impl log::Log for Records {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        if let Ok(mut r) = self.0.lock() {
            r.push((record.level(), record.args().to_string()));
        }
    }

    fn flush(&self) {}
}

/// Exhausts a two-port SNAT range with `fx` and returns what the datapath
/// logged meanwhile.
fn log_of_snat_exhaustion(fx: &mut Fixture) -> Vec<(log::Level, String)> {
    let id = fx
        .datapath
        .program()
        .and_then(|p| Ok(p.info()?.id()))
        .expect("program id");
    let records = Records::default();
    let mut logger =
        aya_log::EbpfLogger::init_from_id_with_logger(id, records.clone()).expect("log buffer");
    fx.set_clock(T0);
    fx.set_config(|c| {
        c.snat_port_min = 40000;
        c.snat_port_max = 40001;
    });
    for client_port in [1000u16, 1001] {
        let (action, _) = fx.run(&tcp4(CLIENT4, FULLNAT_VIP4, client_port, 80, b""));
        assert_eq!(action, TC_ACT_REDIRECT);
    }
    let (action, _) = fx.run(&tcp4(CLIENT4, FULLNAT_VIP4, 1002, 80, b""));
    assert_eq!(action, TC_ACT_SHOT);
    assert_eq!(fx.global(global::SNAT_EXHAUSTED), 1);
    logger.flush();
    let out = records.0.lock().unwrap().clone();
    out
}

#[test]
fn snat_exhaustion_is_logged_by_the_datapath_only_when_asked() {
    in_fresh_netns(|| {
        let mut fx = Fixture::with_datapath_log(DatapathLog::Warn);
        let logged = log_of_snat_exhaustion(&mut fx);
        assert_eq!(
            logged,
            [(
                log::Level::Warn,
                "no free SNAT port on ::ffff:10.72.0.1, new flow dropped: \
                 ::ffff:10.71.0.2:1002 -> ::ffff:10.73.0.12:80 proto 6"
                    .to_string()
            )]
        );
    });
    // Below the event's level, and off (the default), nothing is written.
    for level in [DatapathLog::Error, DatapathLog::Off] {
        in_fresh_netns(move || {
            let mut fx = Fixture::with_datapath_log(level);
            assert_eq!(log_of_snat_exhaustion(&mut fx), [], "{level}");
        });
    }
    in_fresh_netns(|| {
        assert_eq!(log_of_snat_exhaustion(&mut Fixture::new()), []);
    });
}
