//! Packet fixtures for the XDP fast path (docs/datapath.md, section 11),
//! through BPF_PROG_TEST_RUN with the same harness, maps and expected
//! packets as the TC program's fixtures: a packet of a connection in its
//! steady state comes out of the XDP program byte for byte as the TC
//! program sends it, and every packet that would change a connection's
//! state, or that the XDP program cannot send itself, passes to TC
//! untouched.

use lb_common::{global, xdp_stat};
use lb_tests::fixture::*;

const SEC: u64 = 1_000_000_000;
/// Where the frozen clock starts: a next hop is cached for the second of
/// the datapath clock it was found in, and the XDP program uses it only
/// within that second.
const T0: u64 = 1000 * SEC;

fn fixture() -> Fixture {
    let mut fx = Fixture::new();
    fx.set_clock(T0);
    fx
}

/// A TCP handshake from CLIENT4:`port` to `vip`:80 through the TC program
/// (SYN, the backend's SYN-ACK, the client's ACK): returns the backend and
/// the port the backend sees the client on.
fn establish4(fx: &mut Fixture, vip: [u8; 4], port: u16) -> ([u8; 4], [u8; 4], u16) {
    let (action, out) = fx.run(&tcp4(CLIENT4, vip, port, 80, b""));
    assert_eq!(action, TC_ACT_REDIRECT);
    let backend = dst4(&out);
    let src = [out[26], out[27], out[28], out[29]];
    let seen_port = sport4(&out);
    let (action, _) = fx.run(&tcp4_flags(backend, src, 8080, seen_port, SYN | ACK, b""));
    assert_eq!(action, TC_ACT_REDIRECT);
    let (action, _) = fx.run(&tcp4_flags(CLIENT4, vip, port, 80, ACK, b""));
    assert_eq!(action, TC_ACT_REDIRECT);
    (backend, src, seen_port)
}

/// `input` through the XDP program: redirected, exactly as `want`, and
/// exactly as the TC program sends the same packet.
#[track_caller]
fn xdp_translates(fx: &mut Fixture, input: &[u8], want: &[u8], what: &str) {
    let (action, out) = fx.run_xdp(input);
    assert_eq!(action, XDP_REDIRECT, "{what}: {}", hex(&out));
    assert_frame(&out, want, what);
    let (action, tc) = fx.run(input);
    assert_eq!(action, TC_ACT_REDIRECT, "{what} through TC");
    assert_frame(&out, &tc, &format!("{what}: XDP against TC"));
}

/// `input` through the XDP program: passed on untouched.
#[track_caller]
fn xdp_passes(fx: &mut Fixture, input: &[u8], what: &str) {
    let (action, out) = fx.run_xdp(input);
    assert_eq!(action, XDP_PASS, "{what}");
    assert_frame(&out, input, what);
}

#[test]
fn established_tcp_v4_is_translated_both_ways() {
    in_fresh_netns(|| {
        let mut fx = fixture();
        let (b, _, _) = establish4(&mut fx, VIP4, 40000);
        let before = fx.service_stats("web");
        let big = vec![0x5a; 1400];
        for payload in [&b"data"[..], &big] {
            let input = tcp4_flags(CLIENT4, VIP4, 40000, 80, ACK | PSH, payload);
            let want = fx.to_backends(tcp4_flags(CLIENT4, b, 40000, 8080, ACK | PSH, payload));
            xdp_translates(&mut fx, &input, &want, "client to backend");
            let reply = tcp4_flags(b, CLIENT4, 8080, 40000, ACK, payload);
            let want = fx.to_clients(tcp4_flags(VIP4, CLIENT4, 80, 40000, ACK, payload));
            xdp_translates(&mut fx, &reply, &want, "backend to client");
        }
        assert_eq!(fx.xdp_counter(xdp_stat::TRANSLATED), 4);
        let after = fx.service_stats("web");
        // Each packet once through XDP and once through TC.
        assert_eq!(after.packets - before.packets, 4);
        assert_eq!(after.reply_packets - before.reply_packets, 4);
        assert_eq!(after.new_flows, before.new_flows);
    });
}

#[test]
fn established_tcp_v6_is_translated_both_ways() {
    in_fresh_netns(|| {
        let mut fx = fixture();
        let (client, vip, b) = (v6(CLIENT6), v6(VIP6), v6("fd00:72:1::2"));
        fx.run(&tcp6(client, vip, 40000, 80, b""));
        fx.run(&tcp6_flags(b, client, 8080, 40000, SYN | ACK, b""));
        fx.run(&tcp6_flags(client, vip, 40000, 80, ACK, b""));
        let input = tcp6_flags(client, vip, 40000, 80, ACK | PSH, &[7; 1200]);
        let want = fx.to_backends(tcp6_flags(client, b, 40000, 8080, ACK | PSH, &[7; 1200]));
        xdp_translates(&mut fx, &input, &want, "client to backend");
        let reply = tcp6_flags(b, client, 8080, 40000, ACK, b"back");
        let want = fx.to_clients(tcp6_flags(vip, client, 80, 40000, ACK, b"back"));
        xdp_translates(&mut fx, &reply, &want, "backend to client");
    });
}

#[test]
fn udp_flows_are_left_to_tc_until_confirmed_by_a_reply() {
    in_fresh_netns(|| {
        let mut fx = fixture();
        let backend = [10, 72, 1, 2];
        // A new flow is TC's.
        let query = udp4(CLIENT4, VIP4, 5000, 53, b"query");
        xdp_passes(&mut fx, &query, "a new UDP flow");
        fx.run(&query);
        // More of a flow not answered yet: a translation, nothing else.
        let want = fx.to_backends(udp4(CLIENT4, backend, 5000, 5353, b"query"));
        xdp_translates(&mut fx, &query, &want, "pending UDP flow");
        // The answer that confirms it is TC's; after it, both ways are XDP's.
        let answer = udp4(backend, CLIENT4, 5353, 5000, b"answer");
        xdp_passes(&mut fx, &answer, "the confirming reply");
        fx.run(&answer);
        let want = fx.to_clients(udp4(VIP4, CLIENT4, 53, 5000, b"answer"));
        xdp_translates(&mut fx, &answer, &want, "confirmed UDP reply");

        // A UDP checksum of zero ("none") stays zero.
        let mut input = udp4(CLIENT4, VIP4, 5001, 53, b"query");
        input[40..42].copy_from_slice(&[0, 0]);
        fx.run(&input);
        let mut want = udp4(CLIENT4, backend, 5001, 5353, b"query");
        want[40..42].copy_from_slice(&[0, 0]);
        let want = fx.to_backends(want);
        xdp_translates(&mut fx, &input, &want, "UDP without a checksum");

        // IPv6.
        let (client, vip, b) = (v6(CLIENT6), v6(VIP6), v6("fd00:72:1::2"));
        fx.run(&udp6(client, vip, 5000, 53, b"q"));
        fx.run(&udp6(b, client, 5353, 5000, b"a"));
        let want = fx.to_backends(udp6(client, b, 5000, 5353, b"q"));
        xdp_translates(&mut fx, &udp6(client, vip, 5000, 53, b"q"), &want, "UDP v6");
        let want = fx.to_clients(udp6(vip, client, 53, 5000, b"a"));
        xdp_translates(
            &mut fx,
            &udp6(b, client, 5353, 5000, b"a"),
            &want,
            "UDP v6 reply",
        );
    });
}

#[test]
fn full_nat_translates_both_addresses_both_ways() {
    in_fresh_netns(|| {
        let mut fx = fixture();
        let vip = FULLNAT_VIP4;
        let (b, src, port) = establish4(&mut fx, vip, 40000);
        assert_eq!(src, SNAT4);
        let input = tcp4_flags(CLIENT4, vip, 40000, 80, ACK, b"hello");
        let want = fx.to_backends(tcp4_flags(SNAT4, b, port, 8080, ACK, b"hello"));
        xdp_translates(&mut fx, &input, &want, "client to backend");
        let reply = tcp4_flags(b, SNAT4, 8080, port, ACK, b"world");
        let want = fx.to_clients(tcp4_flags(vip, CLIENT4, 80, 40000, ACK, b"world"));
        xdp_translates(&mut fx, &reply, &want, "backend to client");
    });
}

#[test]
fn changes_of_state_pass_to_tc_untouched() {
    in_fresh_netns(|| {
        let mut fx = fixture();
        let syn = tcp4(CLIENT4, VIP4, 40000, 80, b"");
        xdp_passes(&mut fx, &syn, "a SYN");
        assert!(fx.pending().is_empty(), "XDP opened a connection");
        let (_, out) = fx.run(&syn);
        let b = dst4(&out);
        xdp_passes(&mut fx, &syn, "a retransmitted SYN");
        let syn_ack = tcp4_flags(b, CLIENT4, 8080, 40000, SYN | ACK, b"");
        xdp_passes(&mut fx, &syn_ack, "the backend's SYN-ACK");
        fx.run(&syn_ack);
        let ack = tcp4_flags(CLIENT4, VIP4, 40000, 80, ACK, b"");
        xdp_passes(&mut fx, &ack, "the ACK that confirms the connection");
        fx.run(&ack);
        assert!(fx.pending().is_empty(), "confirmed by TC");
        for flags in [FIN | ACK, RST, RST | ACK] {
            xdp_passes(
                &mut fx,
                &tcp4_flags(CLIENT4, VIP4, 40000, 80, flags, b""),
                "the client's FIN or RST",
            );
            xdp_passes(
                &mut fx,
                &tcp4_flags(b, CLIENT4, 8080, 40000, flags, b""),
                "the backend's FIN or RST",
            );
        }
        assert_eq!(fx.xdp_counter(xdp_stat::TRANSLATED), 0);
        assert_eq!(fx.xdp_counter(xdp_stat::PASSED), 10);
    });
}

#[test]
fn what_xdp_cannot_send_itself_passes_to_tc() {
    in_fresh_netns(|| {
        let mut fx = fixture();
        let (b, _, _) = establish4(&mut fx, VIP4, 40000);
        let data = tcp4_flags(CLIENT4, VIP4, 40000, 80, ACK, b"data");

        // The hop limit runs out here: TC answers with time exceeded.
        xdp_passes(&mut fx, &with_ttl(data.clone(), 1), "TTL 1");
        // Too big for the egress link: TC sends "fragmentation needed".
        let big = tcp4_flags(CLIENT4, VIP4, 40000, 80, ACK, &[1; 1600]);
        xdp_passes(&mut fx, &big, "too big for the egress MTU");
        // The next hop was found in another second: XDP asks the FIB again
        // and keeps the answer in the half, as TC does.
        fx.set_clock(T0 + SEC);
        let want = fx.to_backends(tcp4_flags(CLIENT4, b, 40000, 8080, ACK, b"data"));
        xdp_translates(&mut fx, &data, &want, "a next hop of the second before");
        let key = lb_common::FlowKey {
            src: lb_common::v4_mapped(CLIENT4),
            dst: lb_common::v4_mapped(VIP4),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        };
        let hop = fx.next_hop(&key).expect("the half");
        assert_eq!(hop.second as u64, (T0 + SEC) / SEC, "refreshed: {hop:?}");

        // Not for a service, ICMP, IPv4 fragments, malformed: all TC's.
        for (input, what) in [
            (tcp4(CLIENT4, [10, 73, 0, 99], 40000, 80, b""), "no service"),
            (udp4(CLIENT4, VIP4, 5000, 54, b"q"), "no such port"),
            (
                icmp4(
                    b,
                    CLIENT4,
                    3,
                    3,
                    [0; 4],
                    &ip_part(&tcp4(CLIENT4, b, 40000, 8080, b"")),
                ),
                "ICMP error",
            ),
        ] {
            xdp_passes(&mut fx, &input, what);
        }
        let mut truncated = data.clone();
        truncated.truncate(40);
        xdp_passes(&mut fx, &truncated, "truncated");
        let mut fragment = data.clone();
        fragment[20] = 0x20;
        fix_ipv4_checksum(&mut fragment);
        xdp_passes(&mut fx, &fragment, "first fragment");

        // A backend that left: TC balances the connection afresh.
        let mut state = desired();
        state.services[0].backends.retain(|s| s.addr != ip(b));
        fx.reconciler.apply(&state).unwrap();
        xdp_passes(&mut fx, &data, "the backend left");
        assert_eq!(fx.global(global::CT_STALE), 0);
    });
}

#[test]
fn a_next_hop_not_resolved_is_left_to_tc() {
    in_fresh_netns(|| {
        let mut fx = fixture();
        // 10.72.5.2 is on the backends' link, but has no neighbour entry.
        let mut state = desired();
        state.services.push(service(
            "far",
            "10.73.0.14:80",
            lb_userspace::model::Proto::Tcp,
            &["10.72.5.2:8080"],
        ));
        fx.reconciler.apply(&state).unwrap();
        let vip = [10, 73, 0, 14];
        let (b, _, _) = establish4(&mut fx, vip, 40000);
        assert_eq!(b, [10, 72, 5, 2]);
        let data = tcp4_flags(CLIENT4, vip, 40000, 80, ACK, b"data");
        xdp_passes(&mut fx, &data, "neighbour not resolved");
    });
}

#[test]
fn egress_devices_not_listed_are_left_to_tc() {
    in_fresh_netns(|| {
        let mut fx = fixture();
        fx.no_xdp_egress();
        establish4(&mut fx, VIP4, 40000);
        let data = tcp4_flags(CLIENT4, VIP4, 40000, 80, ACK, b"data");
        xdp_passes(&mut fx, &data, "egress without XDP");
    });
}

fn ip(a: [u8; 4]) -> std::net::IpAddr {
    std::net::IpAddr::from(a)
}
