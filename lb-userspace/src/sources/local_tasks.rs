//! This node's running Swarm tasks, from the engine's container list. Swarm
//! lists a new task in a network's view 60 to 140 ms after its container
//! starts; the container list has it at once. So a task of this node that
//! is running (and healthy, if it has a health check: Docker balances a task
//! only then) is added to its service where the view does not list it yet.
//! Only young containers are added: a task that Swarm is stopping keeps
//! running through its grace period, and the view, which drops it from
//! balancing at once, must then win. Remote tasks, and a task's removal,
//! still come from the view alone.

use std::collections::HashMap;
use std::net::IpAddr;

use anyhow::{Context as _, Result};
use bollard::models::{ContainerSummary, NetworkInspect};
use bollard::query_parameters::ListContainersOptions;
use bollard::Docker;

use super::labels;

const SERVICE_LABEL: &str = "com.docker.swarm.service.name";
/// A container created longer ago than this is left to the view: the view
/// lists a task well within it of its start.
const YOUNG_SECS: i64 = 10;

/// A running task container's address on one network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalTask {
    pub service: String,
    pub network_id: String,
    pub addr: IpAddr,
}

pub async fn list(docker: &Docker) -> Result<Vec<LocalTask>> {
    let filters = HashMap::from([
        ("label".to_string(), vec![SERVICE_LABEL.to_string()]),
        ("status".to_string(), vec!["running".to_string()]),
    ]);
    let containers = docker
        .list_containers(Some(ListContainersOptions {
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .context("listing Swarm task containers")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let young = |c: &&ContainerSummary| c.created.is_some_and(|t| now - t <= YOUNG_SECS);
    let mut out = Vec::new();
    for c in containers
        .iter()
        .filter(young)
        .filter(|c| labels::healthy(c))
    {
        let Some(service) = c.labels.as_ref().and_then(|l| l.get(SERVICE_LABEL)) else {
            continue;
        };
        let networks = c
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref());
        for endpoint in networks.into_iter().flat_map(|n| n.values()) {
            let addr = endpoint.ip_address.as_deref().and_then(|a| a.parse().ok());
            if let (Some(network_id), Some(addr)) = (endpoint.network_id.clone(), addr) {
                out.push(LocalTask {
                    service: service.clone(),
                    network_id,
                    addr,
                });
            }
        }
    }
    Ok(out)
}

/// Adds to `net`'s view the local tasks it does not list yet, for services
/// it already has (a service's first task waits for the view, which alone
/// says the service's VIP and ports).
pub fn add_to(net: &mut NetworkInspect, local: &[LocalTask]) {
    let Some(id) = net.id.clone() else {
        return;
    };
    let Some(services) = net.services.as_mut() else {
        return;
    };
    for task in local.iter().filter(|t| t.network_id == id) {
        let Some(tasks) = services
            .get_mut(&task.service)
            .and_then(|s| s.get_mut("Tasks"))
            .and_then(|t| t.as_array_mut())
        else {
            continue;
        };
        let addr = task.addr.to_string();
        if !tasks.iter().any(|t| t["EndpointIP"] == addr.as_str()) {
            tasks.push(serde_json::json!({ "Name": "", "EndpointIP": addr }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_task_joins_its_service_before_the_view_lists_it() {
        let mut net: NetworkInspect = serde_json::from_value(serde_json::json!({
            "Name": "app", "Id": "net1",
            "Services": {
                "api": {"VIP": "10.0.1.2", "Ports": [], "Tasks": [
                    {"Name": "api.1", "EndpointIP": "10.0.1.5", "Info": {"Host IP": "10.74.0.11"}}
                ]}
            }
        }))
        .unwrap();
        let task = |service: &str, network: &str, addr: &str| LocalTask {
            service: service.into(),
            network_id: network.into(),
            addr: addr.parse().unwrap(),
        };
        add_to(
            &mut net,
            &[
                task("api", "net1", "10.0.1.5"),    // listed already
                task("api", "net1", "10.0.1.9"),    // new
                task("api", "other", "10.0.2.9"),   // another network
                task("fresh", "net1", "10.0.1.11"), // no VIP known yet
            ],
        );
        let tasks: Vec<&str> = net.services.as_ref().unwrap()["api"]["Tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["EndpointIP"].as_str().unwrap())
            .collect();
        assert_eq!(tasks, ["10.0.1.5", "10.0.1.9"]);
        assert!(!net.services.as_ref().unwrap().contains_key("fresh"));
    }
}
