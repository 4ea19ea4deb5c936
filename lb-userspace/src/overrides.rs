//! What an operator changed at run time with lbctl: drained backends and
//! weights. They are applied on top of the merged sources at every
//! convergence. A weight override lasts until it is cleared or its backend
//! leaves its service (a backend that comes back starts from its source's
//! weight); a drain lasts until undrained, and wins over any weight.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use crate::model::{Frontend, ServiceSpec};

/// A backend of a service.
pub type Key = (Frontend, SocketAddr);

#[derive(Debug, Default)]
pub struct Overrides {
    drained: BTreeSet<Key>,
    weights: BTreeMap<Key, u32>,
}

impl Overrides {
    /// Starts from drains recorded by an earlier lbd (see drains.rs).
    pub fn with_drained(drained: BTreeSet<Key>) -> Overrides {
        Overrides {
            drained,
            ..Default::default()
        }
    }

    pub fn drained(&self) -> &BTreeSet<Key> {
        &self.drained
    }

    /// Drains or undrains; returns whether anything changed.
    pub fn drain(&mut self, key: Key, drain: bool) -> bool {
        if drain {
            self.drained.insert(key)
        } else {
            self.drained.remove(&key)
        }
    }

    /// Sets (or with None clears) a weight; returns the previous override.
    pub fn set_weight(&mut self, key: Key, weight: Option<u32>) -> Option<u32> {
        match weight {
            Some(w) => self.weights.insert(key, w),
            None => self.weights.remove(&key),
        }
    }

    pub fn weight(&self, key: &Key) -> Option<u32> {
        self.weights.get(key).copied()
    }

    /// Applies the overrides to `services` (the merged sources), forgetting
    /// weights whose backend is no longer there.
    pub fn apply(&mut self, services: &mut [ServiceSpec]) {
        let present: BTreeSet<Key> = services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| (s.frontend, b.socket_addr())))
            .collect();
        self.weights.retain(|k, _| present.contains(k));
        for service in services {
            for backend in &mut service.backends {
                let key = (service.frontend, backend.socket_addr());
                if let Some(w) = self.weights.get(&key) {
                    backend.weight = *w;
                }
                if self.drained.contains(&key) {
                    backend.weight = 0;
                }
            }
        }
    }
}

/// The backend that `service` and `backend` (as an operator typed them)
/// name among the applied services, with the service's name.
pub fn find<'a>(
    applied: impl IntoIterator<Item = &'a ServiceSpec>,
    service: &str,
    backend: &str,
) -> Result<(Key, String), String> {
    let services: Vec<&ServiceSpec> = applied.into_iter().collect();
    let spec = lb_api::select::service(services.iter().copied(), service, |s| {
        (s.name.clone(), s.frontend.to_string())
    })?;
    let addr = lb_api::select::parse_addr(backend)?;
    if !spec.backends.iter().any(|b| b.socket_addr() == addr) {
        return Err(format!(
            "no backend {addr} in service {} ({})",
            spec.name, spec.frontend
        ));
    }
    Ok(((spec.frontend, addr), spec.name.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendSpec, Proto};

    fn web(backends: &[(&str, u32)]) -> ServiceSpec {
        ServiceSpec {
            name: "web".into(),
            frontend: Frontend {
                addr: "10.73.0.10".parse().unwrap(),
                port: 80,
                proto: Proto::Tcp,
            },
            backends: backends
                .iter()
                .map(|(a, w)| {
                    let sa: SocketAddr = a.parse().unwrap();
                    BackendSpec {
                        addr: sa.ip(),
                        port: sa.port(),
                        weight: *w,
                    }
                })
                .collect(),
            snat: None,
            affinity_secs: 0,
            table_size: None,
            network: None,
            local_frontend: false,
            health: None,
            source: "config:test".into(),
        }
    }

    fn weights(s: &ServiceSpec) -> Vec<u32> {
        s.backends.iter().map(|b| b.weight).collect()
    }

    #[test]
    fn an_override_wins_until_cleared_and_a_drain_wins_over_it() {
        let spec = web(&[("10.72.1.2:8080", 1), ("[fd00::2]:8080", 1)]);
        let mut o = Overrides::default();
        let (key, name) = find([&spec], "10.73.0.10:80", "[fd00:0::2]:8080").unwrap();
        assert_eq!(name, "web");
        o.set_weight(key, Some(3));
        // The source changes its weight: the override still wins.
        let mut services = vec![web(&[("10.72.1.2:8080", 1), ("[fd00::2]:8080", 5)])];
        o.apply(&mut services);
        assert_eq!(weights(&services[0]), [1, 3]);
        o.drain(key, true);
        o.apply(&mut services);
        assert_eq!(weights(&services[0]), [1, 0]);
        o.drain(key, false);
        assert_eq!(o.set_weight(key, None), Some(3));
        let mut services = vec![web(&[("10.72.1.2:8080", 1), ("[fd00::2]:8080", 5)])];
        o.apply(&mut services);
        assert_eq!(weights(&services[0]), [1, 5]);
    }

    #[test]
    fn an_override_ends_when_its_backend_leaves() {
        let spec = web(&[("10.72.1.2:8080", 1), ("10.72.2.2:8080", 1)]);
        let mut o = Overrides::default();
        let (key, _) = find([&spec], "web", "10.72.2.2:8080").unwrap();
        o.set_weight(key, Some(7));
        o.apply(&mut [web(&[("10.72.1.2:8080", 1)])]);
        let mut back = vec![spec];
        o.apply(&mut back);
        assert_eq!(weights(&back[0]), [1, 1]);
        assert_eq!(o.weight(&key), None);
    }

    #[test]
    fn unknown_backends_and_services_are_errors() {
        let spec = web(&[("10.72.1.2:8080", 1)]);
        assert!(find([&spec], "web", "10.72.9.9:8080")
            .unwrap_err()
            .contains("no backend"));
        assert!(find([&spec], "api", "10.72.1.2:8080").is_err());
        assert!(find([&spec], "web", "10.72.1.2").is_err());
    }
}
