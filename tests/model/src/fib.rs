//! The part of the kernel's FIB that `bpf_fib_lookup` consults, described
//! simply enough that a test can build the same routes in a namespace:
//! interfaces (MAC, MTU, forwarding per family) and prefix routes through a
//! gateway whose neighbour entry is known or not.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub ifindex: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// net.ipv4.conf.<if>.forwarding: the FIB refuses to route packets
    /// that came in here when off.
    pub forwarding_v4: bool,
    /// net.ipv6.conf.<if>.forwarding.
    pub forwarding_v6: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// Forwarded out of `ifindex`.
    Unicast,
    /// `ip route add unreachable ...`: the FIB answers, but not with a way out.
    Unreachable,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// In the 16-byte form (IPv4 routes as IPv4-mapped prefixes).
    pub prefix: [u8; 16],
    /// Over the 16-byte form: an IPv4 /16 is 112.
    pub prefix_len: u8,
    pub kind: RouteKind,
    pub ifindex: u32,
    /// The gateway, and the MAC of its permanent neighbour entry (None: no
    /// neighbour entry, so `bpf_fib_lookup` says "no neighbour").
    pub gateway: [u8; 16],
    pub neighbour: Option<[u8; 6]>,
}

impl Route {
    fn matches(&self, addr: &[u8; 16]) -> bool {
        let bits = usize::from(self.prefix_len);
        let (whole, rest) = (bits / 8, bits % 8);
        if addr[..whole] != self.prefix[..whole] {
            return false;
        }
        if rest == 0 {
            return true;
        }
        let mask = 0xffu8 << (8 - rest);
        addr[whole] & mask == self.prefix[whole] & mask
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fib {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
}

/// What `bpf_fib_lookup` decides, reduced to what the datapath uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FibResult {
    /// Success, or "no neighbour" (`neighbour` None): the egress interface.
    Egress {
        iface: Interface,
        neighbour: Option<[u8; 6]>,
    },
    /// No route, an unreachable route, forwarding off on the ingress
    /// interface, an unknown ingress interface.
    NotForwarded,
}

impl Fib {
    pub fn interface(&self, ifindex: u32) -> Option<&Interface> {
        self.interfaces.iter().find(|i| i.ifindex == ifindex)
    }

    /// The lookup for a packet to `dst` that came in on `ingress`.
    pub fn lookup(&self, ingress: u32, v6: bool, dst: &[u8; 16]) -> FibResult {
        let Some(inif) = self.interface(ingress) else {
            return FibResult::NotForwarded;
        };
        if !(if v6 {
            inif.forwarding_v6
        } else {
            inif.forwarding_v4
        }) {
            return FibResult::NotForwarded;
        }
        let best = self
            .routes
            .iter()
            .filter(|r| r.matches(dst))
            .max_by_key(|r| r.prefix_len);
        match best {
            Some(r) if r.kind == RouteKind::Unicast => match self.interface(r.ifindex) {
                Some(iface) => FibResult::Egress {
                    iface: iface.clone(),
                    neighbour: r.neighbour,
                },
                None => FibResult::NotForwarded,
            },
            _ => FibResult::NotForwarded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::v4_mapped;

    #[test]
    fn longest_prefix_wins() {
        let iface = |ifindex| Interface {
            ifindex,
            name: format!("if{ifindex}"),
            mac: [2, 0, 0, 0, 0, ifindex as u8],
            mtu: 1500,
            forwarding_v4: true,
            forwarding_v6: false,
        };
        let route = |prefix: [u8; 4], len: u8, ifindex| Route {
            prefix: v4_mapped(prefix),
            prefix_len: 96 + len,
            kind: RouteKind::Unicast,
            ifindex,
            gateway: [0; 16],
            neighbour: None,
        };
        let fib = Fib {
            interfaces: vec![iface(2), iface(3), iface(4)],
            routes: vec![route([10, 0, 0, 0], 8, 3), route([10, 72, 0, 0], 16, 4)],
        };
        let egress = |dst| match fib.lookup(2, false, &v4_mapped(dst)) {
            FibResult::Egress { iface, .. } => Some(iface.ifindex),
            FibResult::NotForwarded => None,
        };
        assert_eq!(egress([10, 72, 9, 9]), Some(4));
        assert_eq!(egress([10, 73, 9, 9]), Some(3));
        assert_eq!(egress([11, 0, 0, 1]), None);
        // Forwarding is off for IPv6 on the ingress interface.
        assert_eq!(
            fib.lookup(2, true, &v4_mapped([10, 72, 0, 1])),
            FibResult::NotForwarded
        );
    }
}
