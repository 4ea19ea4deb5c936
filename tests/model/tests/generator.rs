//! The generator and the model together, without a kernel: every path of
//! the contract is reached, nothing panics, and every frame the model
//! sends out carries valid checksums by etherparse's own computation.

use std::collections::BTreeMap;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use lb_common::{
    Backend, Config, ServiceKey, ServiceValue, TrafficStats, BACKEND_ACTIVE, BACKEND_DOWN,
    BACKEND_DRAINING, FLAG_FULLNAT, MAGLEV_M, PROTO_TCP, PROTO_UDP,
};
use lb_model::gen::Generator;
use lb_model::scenario::{self, addr};
use lb_model::state::{Forwarding, TC_ACT_REDIRECT};
use lb_model::{step, ModelState, Path};

fn add_service(
    s: &mut ModelState,
    slot: u32,
    vip: &str,
    port: u16,
    proto: u8,
    snat: Option<&str>,
    backends: &[(&str, u16)],
) {
    let first_id = 1 + slot * 10;
    for (i, (a, p)) in backends.iter().enumerate() {
        let id = first_id + i as u32;
        s.backends.insert(
            id,
            Backend {
                addr: addr(a),
                port: p.to_be(),
                state: BACKEND_ACTIVE,
                _pad: 0,
                service_slot: slot,
            },
        );
        s.backend_stats.insert(id, TrafficStats::default());
    }
    let ring: Vec<u32> = (0..MAGLEV_M)
        .map(|i| first_id + i % backends.len().max(1) as u32)
        .collect();
    s.set_ring(slot * 2, ring);
    s.services.insert(
        ServiceKey {
            addr: addr(vip),
            port: port.to_be(),
            proto,
            _pad: 0,
        },
        ServiceValue {
            slot,
            ring: slot * 2,
            backend_count: backends.len() as u32,
            flags: if snat.is_some() { FLAG_FULLNAT } else { 0 },
            snat_addr: snat.map(addr).unwrap_or_default(),
            affinity_ns: if slot % 2 == 1 { 3_000_000_000 } else { 0 },
            network: 0,
            ring_size: MAGLEV_M,
        },
    );
}

fn checksums_valid(frame: &[u8]) -> Result<(), String> {
    let p = SlicedPacket::from_ethernet(frame).map_err(|e| e.to_string())?;
    let (src, dst, v6) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            if h.header_checksum != h.calc_header_checksum() {
                return Err("IPv4 header checksum".into());
            }
            (h.source.to_vec(), h.destination.to_vec(), false)
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header().to_header();
            (h.source.to_vec(), h.destination.to_vec(), true)
        }
        _ => return Err("not IP".into()),
    };
    let ok = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let h = t.to_header();
            let want = if v6 {
                h.calc_checksum_ipv6_raw(
                    src.clone().try_into().unwrap(),
                    dst.clone().try_into().unwrap(),
                    t.payload(),
                )
            } else {
                h.calc_checksum_ipv4_raw(
                    src.clone().try_into().unwrap(),
                    dst.clone().try_into().unwrap(),
                    t.payload(),
                )
            }
            .unwrap();
            h.checksum == want
        }
        Some(TransportSlice::Udp(u)) => {
            let h = u.to_header();
            h.checksum == 0
                || h.checksum
                    == if v6 {
                        h.calc_checksum_ipv6_raw(
                            src.clone().try_into().unwrap(),
                            dst.clone().try_into().unwrap(),
                            u.payload(),
                        )
                    } else {
                        h.calc_checksum_ipv4_raw(
                            src.clone().try_into().unwrap(),
                            dst.clone().try_into().unwrap(),
                            u.payload(),
                        )
                    }
                    .unwrap()
        }
        Some(TransportSlice::Icmpv4(i)) => {
            i.checksum() == i.header().icmp_type.calc_checksum(i.payload())
        }
        Some(TransportSlice::Icmpv6(i)) => {
            i.checksum()
                == i.header()
                    .icmp_type
                    .calc_checksum(
                        src.clone().try_into().unwrap(),
                        dst.clone().try_into().unwrap(),
                        i.payload(),
                    )
                    .unwrap()
        }
        None => return Ok(()),
    };
    if ok {
        Ok(())
    } else {
        Err("transport checksum".into())
    }
}

#[test]
fn generated_traffic_reaches_every_path() {
    let mut sc = scenario::standard();
    sc.renumber(|name| match name {
        scenario::INGRESS => 2,
        scenario::INGRESS_NOFWD => 3,
        scenario::TO_CLIENTS => 4,
        scenario::TO_BACKENDS => 5,
        _ => 6,
    });
    let config = Config {
        timeout_syn_ns: 10_000_000_000,
        timeout_tcp_ns: 60_000_000_000,
        timeout_closing_ns: 5_000_000_000,
        timeout_udp_ns: 15_000_000_000,
        snat_port_min: 40000,
        snat_port_max: 40003,
        clock_frozen_ns: 1,
        ..Config::default()
    };
    let mut s = ModelState::new(config, sc.fib.clone());
    let web = [
        ("10.72.1.2", 8080),
        ("10.72.2.2", 8080),
        ("10.75.0.5", 8080),
    ];
    add_service(&mut s, 0, "10.73.0.10", 80, PROTO_TCP, None, &web);
    add_service(
        &mut s,
        1,
        "10.73.0.10",
        53,
        PROTO_UDP,
        None,
        &[("10.72.1.2", 5353)],
    );
    add_service(
        &mut s,
        2,
        "10.73.0.11",
        80,
        PROTO_TCP,
        Some("10.72.0.1"),
        &web,
    );
    add_service(
        &mut s,
        3,
        "fd00:73::10",
        80,
        PROTO_TCP,
        None,
        &[("fd00:72:1::2", 8080)],
    );
    add_service(
        &mut s,
        4,
        "fd00:73::11",
        53,
        PROTO_UDP,
        Some("fd00:72::1"),
        &[("fd00:72:1::2", 5353)],
    );
    add_service(&mut s, 5, "10.73.0.16", 80, PROTO_TCP, None, &web);
    add_service(&mut s, 6, "10.73.0.14", 80, PROTO_TCP, None, &[]);
    let mut g = Generator::new(42, sc.pools.clone());
    g.sync(&s);
    let mut now = 1_000_000_000_000u64;
    let mut paths: BTreeMap<(Path, Forwarding), u64> = BTreeMap::new();
    for i in 0..200_000 {
        if i == 100_000 {
            // The second half runs behind a prefilter of every frontend and
            // backend, as the reconciler writes it.
            let bits = lb_common::PREFILTER_MIN_BITS;
            s.config.prefilter_bits = bits;
            s.prefilter = vec![0; (1 << bits) / 32];
            let entries: Vec<([u8; 16], u16)> = s
                .services
                .keys()
                .map(|k| (k.addr, k.port))
                .chain(s.backends.values().map(|b| (b.addr, b.port)))
                .collect();
            for (a, p) in entries {
                let bit = lb_model::hash::prefilter_bit(&a, p, bits) as usize;
                s.prefilter[bit / 32] |= 1 << (bit % 32);
            }
        }
        if i % 10_000 == 9_999 {
            // The control plane drains, fails, removes and restores backends.
            let id = [1u32, 2, 3, 21, 22, 51][(i / 10_000) % 6];
            match (i / 10_000) % 4 {
                0 => s.backends.get_mut(&id).map(|b| b.state = BACKEND_DRAINING),
                1 => s.backends.get_mut(&id).map(|b| b.state = BACKEND_DOWN),
                2 => s.backends.remove(&id).map(|_| ()),
                _ => s.backends.get_mut(&id).map(|b| b.state = BACKEND_ACTIVE),
            };
            g.sync(&s);
        }
        if i % 500 == 499 {
            // An eviction: one half goes, its peer restores it.
            let mut keys: Vec<_> = s
                .conntrack
                .keys()
                .chain(s.ct_pending.keys())
                .copied()
                .collect();
            keys.sort_by_key(|k| (k.src, k.dst, k.sport, k.dport, k.proto));
            if let Some(k) = keys.get(i / 500 % keys.len().max(1)) {
                s.conntrack.remove(k);
                s.ct_pending.remove(k);
            }
        }
        now += g.clock_step();
        let p = g.next(&s);
        let out = step(&mut s, &p.frame, p.ingress, now);
        *paths.entry((out.path, out.forwarding)).or_default() += 1;
        if out.action == TC_ACT_REDIRECT {
            if let Err(e) = checksums_valid(&out.packet) {
                panic!(
                    "packet {i} ({:?}, {:?}): {e}\nin  {:02x?}\nout {:02x?}",
                    p.kind, out.path, p.frame, out.packet
                );
            }
        }
    }
    for (k, n) in &paths {
        println!("{k:?}: {n}");
    }
    let seen = |p: Path| paths.keys().any(|(q, _)| *q == p);
    for p in [
        Path::NotIp,
        Path::Malformed,
        Path::Fragment,
        Path::Other,
        Path::Prefiltered,
        Path::NoService,
        Path::NoBackend,
        Path::NewFlow,
        Path::Known,
        Path::Reply,
        Path::SnatExhausted,
        Path::Collision,
        Path::IcmpNoEntry,
        Path::IcmpTranslated,
    ] {
        assert!(seen(p), "{p:?} never reached");
    }
    let forwarded = |f: Forwarding| paths.keys().any(|(_, g)| *g == f);
    for f in [
        Forwarding::Redirected,
        Forwarding::TimeExceededSent,
        Forwarding::TooBigSent,
        Forwarding::TooBigDropped,
        Forwarding::NotForwarded,
        Forwarding::IcmpPassed,
    ] {
        assert!(forwarded(f), "{f:?} never reached");
    }
    println!("globals: {:?}", s.global);
    for (name, v) in lb_common::global::NAMES.iter().zip(s.global) {
        // The sock_* counters belong to the socket programs, not to the
        // packet datapath this model is.
        if !matches!(
            *name,
            "rewrite_errors" | "ct_insert_failed" | "sock_translated" | "sock_refused"
        ) {
            assert!(v > 0, "counter {name} never moved");
        }
    }
}
