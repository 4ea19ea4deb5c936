//! Which frontends container labels may take.
//!
//! Labels are untrusted: an image carries them, and whoever can start a
//! container chooses them. A frontend is also put on `lo` (vips.rs), so a
//! label naming the node's own address would take one of its ports (SSH,
//! say), and a label naming an outside address would cut the node off from
//! that address. So, as with MetalLB's address pools, labels may only take
//! addresses inside ranges the operator allows (none unless configured), and
//! never an address of this node unless the operator says so as well.
//!
//! Swarm's published ports (they are meant to answer on the node's
//! addresses) and the config file's services are the operator's own and are
//! not screened here.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use ipnet::IpNet;
use tokio::sync::watch;

/// The operator's rules for label frontends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelPolicy {
    pub frontend_ranges: Vec<IpNet>,
    pub allow_node_addresses: bool,
}

impl LabelPolicy {
    /// What the flags and the config file allow together.
    pub fn union(&self, other: &LabelPolicy) -> LabelPolicy {
        let mut frontend_ranges = self.frontend_ranges.clone();
        for r in &other.frontend_ranges {
            if !frontend_ranges.contains(r) {
                frontend_ranges.push(*r);
            }
        }
        LabelPolicy {
            frontend_ranges,
            allow_node_addresses: self.allow_node_addresses || other.allow_node_addresses,
        }
    }

    /// Whether a label may take `addr`, given this node's addresses (or why
    /// they could not be read).
    pub fn check(
        &self,
        addr: IpAddr,
        node: &Result<BTreeSet<IpAddr>, String>,
    ) -> Result<(), String> {
        if self.frontend_ranges.is_empty() {
            return Err(format!(
                "{addr}: no address range is allowed for labels; allow one with \
                 lbd --label-frontends CIDR or frontend_ranges in the config's [labels] section"
            ));
        }
        if !self.frontend_ranges.iter().any(|r| r.contains(&addr)) {
            let ranges: Vec<String> = self.frontend_ranges.iter().map(|r| r.to_string()).collect();
            return Err(format!(
                "{addr} is outside the ranges allowed for labels ({}); add a range with \
                 lbd --label-frontends CIDR or frontend_ranges in the config's [labels] section",
                ranges.join(", ")
            ));
        }
        if self.allow_node_addresses {
            return Ok(());
        }
        match node {
            Ok(node) if node.contains(&addr) => Err(format!(
                "{addr} is an address of this node; labels may take node addresses only with \
                 allow_node_addresses = true in the config's [labels] section \
                 (or lbd --label-node-addresses)"
            )),
            Ok(_) => Ok(()),
            // Fail closed: an address that cannot be checked is not given away.
            Err(e) => Err(format!(
                "{addr}: cannot check it against this node's addresses: {e}"
            )),
        }
    }
}

/// The frontend addresses lbd itself put on `lo`, shared between vips.rs,
/// which keeps it, and the Docker source, which must not take a frontend it
/// was given for one of the node's own addresses at its next resync.
#[derive(Clone, Debug, Default)]
pub struct AddedVips(Arc<RwLock<BTreeSet<IpAddr>>>);

impl AddedVips {
    pub fn get(&self) -> BTreeSet<IpAddr> {
        self.0.read().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn insert(&self, addr: IpAddr) {
        if let Ok(mut s) = self.0.write() {
            s.insert(addr);
        }
    }

    pub fn remove(&self, addr: IpAddr) {
        if let Ok(mut s) = self.0.write() {
            s.remove(&addr);
        }
    }
}

/// Every address on every interface of this network namespace, read now,
/// except the frontends lbd added to `lo` itself.
pub fn node_addresses(added: &BTreeSet<IpAddr>) -> Result<BTreeSet<IpAddr>, String> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("reading interfaces: {e}"))?;
    let mut out = BTreeSet::new();
    for a in addrs {
        let Some(sa) = a.address else { continue };
        let ip = if let Some(v4) = sa.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            IpAddr::V6(v6.ip()).to_canonical()
        } else {
            continue;
        };
        if a.interface_name == "lo" && added.contains(&ip) {
            continue;
        }
        out.insert(ip);
    }
    Ok(out)
}

/// What the Docker source screens labels with: the policy, which a config
/// reload may change, and lbd's own frontend addresses.
#[derive(Clone, Debug)]
pub struct Gate {
    pub policy: watch::Receiver<LabelPolicy>,
    pub added: AddedVips,
}

impl Gate {
    /// A check for one resync: the node's addresses are read once.
    pub fn screen(&self) -> impl Fn(IpAddr) -> Result<(), String> {
        let policy = self.policy.borrow().clone();
        let node = node_addresses(&self.added.get());
        move |addr| {
            // Loopback is the node's, all of it, not just 127.0.0.1.
            if addr.is_loopback() && !policy.allow_node_addresses {
                return Err(format!("{addr} is a loopback address of this node"));
            }
            policy.check(addr, &node)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ranges: &[&str], allow_node_addresses: bool) -> LabelPolicy {
        LabelPolicy {
            frontend_ranges: ranges.iter().map(|r| r.parse().unwrap()).collect(),
            allow_node_addresses,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn node(addrs: &[&str]) -> Result<BTreeSet<IpAddr>, String> {
        Ok(addrs.iter().map(|a| ip(a)).collect())
    }

    #[test]
    fn nothing_is_allowed_until_a_range_is() {
        let e = LabelPolicy::default()
            .check(ip("10.73.0.10"), &node(&[]))
            .unwrap_err();
        assert!(e.contains("--label-frontends"), "{e}");
        assert!(e.contains("frontend_ranges"), "{e}");
    }

    #[test]
    fn only_addresses_inside_the_ranges() {
        let p = policy(&["10.73.0.0/24", "fd00:73::/64"], false);
        let n = node(&["10.75.0.1", "127.0.0.1"]);
        assert_eq!(p.check(ip("10.73.0.10"), &n), Ok(()));
        assert_eq!(p.check(ip("fd00:73::10"), &n), Ok(()));
        let e = p.check(ip("10.73.1.10"), &n).unwrap_err();
        assert!(
            e.contains("outside") && e.contains("10.73.0.0/24, fd00:73::/64"),
            "{e}"
        );
        assert!(p.check(ip("fd00:74::10"), &n).is_err());
        assert!(p.check(ip("8.8.8.8"), &n).is_err());
    }

    #[test]
    fn node_addresses_are_refused_even_inside_a_range() {
        let n = node(&["10.73.0.1", "fd00:73::1"]);
        let p = policy(&["10.73.0.0/24", "fd00:73::/64"], false);
        let e = p.check(ip("10.73.0.1"), &n).unwrap_err();
        assert!(e.contains("address of this node"), "{e}");
        assert!(e.contains("allow_node_addresses"), "{e}");
        assert!(p.check(ip("fd00:73::1"), &n).is_err());
        let allowed = policy(&["10.73.0.0/24", "fd00:73::/64"], true);
        assert_eq!(allowed.check(ip("10.73.0.1"), &n), Ok(()));
        // Still only inside the ranges.
        assert!(allowed
            .check(ip("10.75.0.1"), &node(&["10.75.0.1"]))
            .is_err());
    }

    #[test]
    fn unreadable_node_addresses_refuse() {
        let p = policy(&["10.73.0.0/24"], false);
        let e = p.check(ip("10.73.0.10"), &Err("boom".into())).unwrap_err();
        assert!(e.contains("boom"), "{e}");
        let p = policy(&["10.73.0.0/24"], true);
        assert_eq!(p.check(ip("10.73.0.10"), &Err("boom".into())), Ok(()));
    }

    #[test]
    fn union_of_flags_and_file() {
        let flags = policy(&["10.73.0.0/24"], false);
        let file = policy(&["10.73.0.0/24", "fd00:73::/64"], true);
        assert_eq!(flags.union(&file), file);
        assert_eq!(flags.union(&LabelPolicy::default()), flags);
    }

    #[test]
    fn this_namespace_has_its_loopback_and_not_what_lbd_added() {
        let all = node_addresses(&BTreeSet::new()).unwrap();
        assert!(all.contains(&ip("127.0.0.1")), "{all:?}");
        // An address lbd added to lo is a frontend, not the node's.
        let without = node_addresses(&BTreeSet::from([ip("127.0.0.1")])).unwrap();
        assert!(!without.contains(&ip("127.0.0.1")), "{without:?}");
    }

    #[test]
    fn the_gate_refuses_loopback_and_reads_the_current_policy() {
        let (tx, rx) = watch::channel(LabelPolicy::default());
        let gate = Gate {
            policy: rx,
            added: AddedVips::default(),
        };
        assert!(gate.screen()(ip("10.73.0.10")).is_err());
        tx.send(policy(&["10.73.0.0/24", "127.0.0.0/8"], false))
            .unwrap();
        assert_eq!(gate.screen()(ip("10.73.0.10")), Ok(()));
        assert!(gate.screen()(ip("127.0.0.2"))
            .unwrap_err()
            .contains("loopback"));
    }
}
