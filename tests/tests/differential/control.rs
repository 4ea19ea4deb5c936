//! The control plane's side: the services the test starts with, and the
//! changes it makes while packets flow (drains, failures, removals,
//! affinity, whole services), all through lbd's reconciler.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use lb_model::Rng;
use lb_userspace::model::{BackendSpec, DesiredState, Frontend, Proto, ServiceSpec};

fn backend(s: &str) -> BackendSpec {
    let a: SocketAddr = s.parse().unwrap();
    BackendSpec {
        addr: a.ip(),
        port: a.port(),
        weight: 1,
    }
}

fn service(
    name: &str,
    frontend: &str,
    proto: Proto,
    backends: &[&str],
    snat: Option<&str>,
    affinity_secs: u32,
) -> ServiceSpec {
    let fe: SocketAddr = frontend.parse().unwrap();
    ServiceSpec {
        name: name.into(),
        frontend: Frontend {
            addr: fe.ip(),
            port: fe.port(),
            proto,
        },
        backends: backends.iter().map(|b| backend(b)).collect(),
        snat: snat.map(|s| s.parse::<IpAddr>().unwrap()),
        health: None,
        affinity_secs,
        table_size: None,
        network: None,
        local_frontend: false,
        source: "differential".into(),
    }
}

/// Every service the test may run, with every backend it may have. Two
/// services share backends (so reply tuples collide without full NAT),
/// some backends sit behind a link without a neighbour entry or behind no
/// route at all, one service starts empty.
pub fn catalogue() -> Vec<ServiceSpec> {
    use Proto::*;
    let web = [
        "10.72.1.2:8080",
        "10.72.2.2:8080",
        "10.72.3.2:8080",
        "10.75.0.5:8080",
    ];
    vec![
        service("web", "10.73.0.10:80", Tcp, &web, None, 0),
        service(
            "dns",
            "10.73.0.10:53",
            Udp,
            &["10.72.1.2:5353", "10.72.2.2:5353"],
            None,
            0,
        ),
        service(
            "fullnat",
            "10.73.0.11:80",
            Tcp,
            &["10.72.1.2:8080", "10.72.2.2:8080"],
            Some("10.72.0.1"),
            0,
        ),
        service(
            "sticky",
            "10.73.0.12:443",
            Tcp,
            &["10.72.1.2:8443", "10.72.2.2:8443", "10.72.3.2:8443"],
            None,
            3,
        ),
        service(
            "sticky-udp",
            "10.73.0.13:5000",
            Udp,
            &["10.72.1.2:5000", "10.72.3.2:5000"],
            Some("10.72.0.1"),
            5,
        ),
        service("empty", "10.73.0.14:80", Tcp, &["10.72.2.2:9000"], None, 0),
        service(
            "unrouted",
            "10.73.0.15:80",
            Tcp,
            &["10.99.0.5:8080", "10.98.0.5:8080", "10.72.3.2:8080"],
            None,
            0,
        ),
        service("shared", "10.73.0.16:80", Tcp, &web[..2], None, 0),
        service(
            "web6",
            "[fd00:73::10]:80",
            Tcp,
            &[
                "[fd00:72:1::2]:8080",
                "[fd00:72:2::2]:8080",
                "[fd00:75::5]:8080",
            ],
            None,
            0,
        ),
        service(
            "dns6",
            "[fd00:73::10]:53",
            Udp,
            &["[fd00:72:1::2]:5353"],
            None,
            0,
        ),
        service(
            "fullnat6",
            "[fd00:73::11]:80",
            Tcp,
            &["[fd00:72:1::2]:8080", "[fd00:72:2::2]:8080"],
            Some("fd00:72::1"),
            3,
        ),
    ]
}

/// The desired state and its random walk.
pub struct Control {
    catalogue: Vec<ServiceSpec>,
    pub desired: DesiredState,
    pub reset: HashSet<(Frontend, SocketAddr)>,
    pub local_vips: bool,
}

impl Control {
    pub fn new() -> Control {
        let catalogue = catalogue();
        let mut desired = DesiredState {
            services: catalogue.clone(),
            ..Default::default()
        };
        // "empty" starts without backends.
        desired.services[5].backends.clear();
        Control {
            catalogue,
            desired,
            reset: HashSet::new(),
            local_vips: false,
        }
    }

    /// One change, described for the log.
    pub fn mutate(&mut self, r: &mut Rng) -> String {
        let names: Vec<String> = self.catalogue.iter().map(|s| s.name.clone()).collect();
        let name = r.pick(&names).clone();
        let spec = self
            .catalogue
            .iter()
            .find(|s| s.name == name)
            .unwrap()
            .clone();
        let at = self.desired.services.iter().position(|s| s.name == name);
        let Some(at) = at else {
            self.desired.services.push(spec);
            return format!("{name}: added back");
        };
        let svc = &mut self.desired.services[at];
        match r.below(8) {
            0 => {
                self.desired.services.remove(at);
                format!("{name}: removed")
            }
            1 | 2 => {
                // A backend of the catalogue: missing -> added; present ->
                // weight 0 (drain), 1 or 2.
                let b = *r.pick(&spec.backends);
                match svc
                    .backends
                    .iter_mut()
                    .find(|x| x.addr == b.addr && x.port == b.port)
                {
                    Some(x) => {
                        x.weight = *r.pick(&[0, 1, 2]);
                        format!("{name}: {} weight {}", b.socket_addr(), x.weight)
                    }
                    None => {
                        svc.backends.push(b);
                        format!("{name}: {} added", b.socket_addr())
                    }
                }
            }
            3 => {
                if svc.backends.is_empty() {
                    return format!("{name}: nothing to remove");
                }
                let i = r.below(svc.backends.len() as u64) as usize;
                let b = svc.backends.remove(i);
                format!("{name}: {} removed", b.socket_addr())
            }
            4 => {
                // Down with reset: flows leave the backend. The reconciler
                // writes backend states with the service, so the weight
                // changes too to make it rewrite the service.
                if svc.backends.is_empty() {
                    return format!("{name}: nothing to fail");
                }
                let i = r.below(svc.backends.len() as u64) as usize;
                let key = (svc.frontend, svc.backends[i].socket_addr());
                let down = if self.reset.contains(&key) {
                    self.reset.remove(&key);
                    false
                } else {
                    self.reset.insert(key);
                    true
                };
                svc.backends[i].weight = if svc.backends[i].weight == 1 { 2 } else { 1 };
                format!("{name}: {} down={down}", key.1)
            }
            5 => {
                svc.affinity_secs = *r.pick(&[0, 2, 3, 30]);
                format!("{name}: affinity {}s", svc.affinity_secs)
            }
            6 => {
                self.local_vips = !self.local_vips;
                // Written with the next change of each service.
                svc.backends.reverse();
                format!("local vips {}", self.local_vips)
            }
            _ => {
                *svc = spec;
                format!("{name}: restored")
            }
        }
    }
}
