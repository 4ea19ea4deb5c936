//! Combining sources into one desired state. A frontend has one owner:
//! the static config first, then Swarm services, then labelled containers.
//! A later claimant of an owned frontend is rejected and reported, and the
//! owner keeps serving: a container's labels cannot hijack a virtual address.

use std::collections::BTreeMap;

use crate::model::{DesiredState, Frontend, ServiceSpec};

pub use lb_api::status::Conflict;

/// `sources` in priority order.
pub fn merge(sources: &[&[ServiceSpec]]) -> (DesiredState, Vec<Conflict>) {
    let mut owned: BTreeMap<Frontend, ServiceSpec> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for source in sources {
        for spec in source.iter() {
            match owned.get(&spec.frontend) {
                Some(owner) => conflicts.push(Conflict {
                    frontend: spec.frontend.to_string(),
                    rejected: format!("{} ({})", spec.name, spec.source),
                    owner: format!("{} ({})", owner.name, owner.source),
                }),
                None => {
                    owned.insert(spec.frontend, spec.clone());
                }
            }
        }
    }
    (
        DesiredState {
            services: owned.into_values().collect(),
            ..Default::default()
        },
        conflicts,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendSpec, Proto};

    fn spec(name: &str, source: &str, port: u16) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            frontend: Frontend {
                addr: "10.73.0.10".parse().unwrap(),
                port,
                proto: Proto::Tcp,
            },
            backends: vec![BackendSpec {
                addr: "10.0.0.1".parse().unwrap(),
                port: 80,
                weight: 1,
            }],
            snat: None,
            health: None,
            affinity_secs: 0,
            table_size: None,
            network: None,
            local_frontend: false,
            source: source.into(),
        }
    }

    #[test]
    fn the_first_source_keeps_a_contested_frontend() {
        let config = [spec("web", "config", 80)];
        let labels = [
            spec("evil", "docker:labels", 80),
            spec("other", "docker:labels", 81),
        ];
        let (state, conflicts) = merge(&[&config, &labels]);
        assert_eq!(state.services.len(), 2);
        assert_eq!(state.services[0].name, "web");
        assert_eq!(state.services[1].name, "other");
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].owner, "web (config)");
        assert_eq!(conflicts[0].rejected, "evil (docker:labels)");
    }
}
