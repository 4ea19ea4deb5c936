//! The standard test network: interfaces, routes and address pools that
//! the differential test builds in a namespace and the model mirrors.
//!
//! Interfaces get placeholder ifindexes (1000 + position) until the test
//! has created them and calls `renumber`.

use lb_common::v4_mapped;

use crate::fib::{Fib, Interface, Route, RouteKind};
use crate::gen::{IngressPort, Pools};
use crate::state::Ingress;

pub fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

pub fn v4(s: &str) -> [u8; 16] {
    v4_mapped(s.parse::<std::net::Ipv4Addr>().unwrap().octets())
}

/// An address in either notation, in the 16-byte form.
pub fn addr(s: &str) -> [u8; 16] {
    if s.contains(':') {
        v6(s)
    } else {
        v4(s)
    }
}

pub struct Scenario {
    pub fib: Fib,
    pub pools: Pools,
}

/// Interface names (at most 15 bytes), MACs and MTUs.
pub const INGRESS: &str = "lbd-in";
/// An ingress interface with forwarding off (both families).
pub const INGRESS_NOFWD: &str = "lbd-nofwd";
/// Towards clients, MTU 1500, neighbour known.
pub const TO_CLIENTS: &str = "lbd-cli";
/// Towards backends, MTU 1400, neighbour known.
pub const TO_BACKENDS: &str = "lbd-be";
/// A link whose gateway has no neighbour entry, MTU 1450.
pub const NO_NEIGHBOUR: &str = "lbd-nn";

fn mac(n: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, n, 1]
}

fn gw_mac(n: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, n, 2]
}

fn route(prefix: &str, kind: RouteKind, dev: u32, gw: &str, neighbour: Option<[u8; 6]>) -> Route {
    let (p, len) = prefix.split_once('/').unwrap();
    let len: u8 = len.parse().unwrap();
    let v6 = p.contains(':');
    Route {
        prefix: addr(p),
        prefix_len: if v6 { len } else { 96 + len },
        kind,
        ifindex: dev,
        gateway: if gw.is_empty() { [0; 16] } else { addr(gw) },
        neighbour,
    }
}

pub fn standard() -> Scenario {
    let iface = |i: u32, name: &str, mtu: u32, fwd: bool| Interface {
        ifindex: 1000 + i,
        name: name.to_string(),
        mac: mac(i as u8 + 1),
        mtu,
        forwarding_v4: fwd,
        forwarding_v6: fwd,
    };
    let interfaces = vec![
        iface(0, INGRESS, 1500, true),
        iface(1, INGRESS_NOFWD, 1500, false),
        iface(2, TO_CLIENTS, 1500, true),
        iface(3, TO_BACKENDS, 1400, true),
        iface(4, NO_NEIGHBOUR, 1450, true),
    ];
    use RouteKind::*;
    let routes = vec![
        route("10.71.0.0/16", Unicast, 1002, "10.200.1.2", Some(gw_mac(3))),
        route(
            "fd00:71::/32",
            Unicast,
            1002,
            "fd00:200:1::2",
            Some(gw_mac(3)),
        ),
        route("10.72.0.0/16", Unicast, 1003, "10.200.2.2", Some(gw_mac(4))),
        route(
            "fd00:72::/32",
            Unicast,
            1003,
            "fd00:200:2::2",
            Some(gw_mac(4)),
        ),
        route("10.75.0.0/16", Unicast, 1004, "10.200.3.2", None),
        route("fd00:75::/32", Unicast, 1004, "fd00:200:3::2", None),
        route("10.98.0.0/16", Unreachable, 0, "", None),
        route("fd00:98::/32", Unreachable, 0, "", None),
    ];
    let list = |items: &[&str]| items.iter().map(|s| addr(s)).collect::<Vec<_>>();
    let pools = Pools {
        clients_v4: list(&[
            "10.71.0.2",
            "10.71.0.3",
            "10.71.1.9",
            "10.75.0.2",
            "10.98.0.2",
            "10.99.0.2",
        ]),
        clients_v6: list(&["fd00:71::2", "fd00:71::3", "fd00:75::2", "fd00:99::2"]),
        client_ports: vec![1024, 33000, 40000, 40001, 50000, 65535],
        strangers_v4: list(&["10.73.0.99", "10.71.0.50", "10.72.9.9"]),
        strangers_v6: list(&["fd00:73::99", "fd00:72::99"]),
        routers_v4: list(&["10.72.0.254", "10.71.0.254"]),
        routers_v6: list(&["fd00:72::fe", "fd00:71::fe"]),
        ingress: vec![
            IngressPort {
                ingress: Ingress { ifindex: 1000 },
                mac: mac(1),
                weight: 95,
            },
            IngressPort {
                ingress: Ingress { ifindex: 1001 },
                mac: mac(2),
                weight: 5,
            },
        ],
        peer_macs: vec![[0x02, 0, 0, 0, 0x99, 1], [0x02, 0, 0, 0, 0x99, 2]],
    };
    Scenario {
        fib: Fib { interfaces, routes },
        pools,
    }
}

impl Scenario {
    /// Replaces the placeholder ifindexes with the real ones, by name.
    pub fn renumber(&mut self, ifindex_of: impl Fn(&str) -> u32) {
        let map: Vec<(u32, u32)> = self
            .fib
            .interfaces
            .iter()
            .map(|i| (i.ifindex, ifindex_of(&i.name)))
            .collect();
        let real = |old: u32| map.iter().find(|(o, _)| *o == old).map_or(old, |(_, n)| *n);
        for r in &mut self.fib.routes {
            r.ifindex = real(r.ifindex);
        }
        for p in &mut self.pools.ingress {
            p.ingress.ifindex = real(p.ingress.ifindex);
        }
        for i in &mut self.fib.interfaces {
            i.ifindex = real(i.ifindex);
        }
    }

    pub fn interface(&self, name: &str) -> &Interface {
        self.fib.interfaces.iter().find(|i| i.name == name).unwrap()
    }

    /// The interface a route goes out of.
    pub fn route_dev(&self, r: &Route) -> Option<&Interface> {
        self.fib.interface(r.ifindex)
    }
}
