//! What the Swarm tests share: lbd on a cluster node, services of the test
//! image, and the names their tasks answer with.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use crate::docker::{Dockerd, Node, Task};
use crate::lbd::Lbd;
use crate::process::wait_until;

/// The test image (see `docker::build_test_image`).
pub const IMAGE: &str = "lbt-web";

/// lbd on `node`, watching its engine, once it is connected.
pub fn lbd_for_node(node: &Node, tag: &str) -> Lbd {
    let host = format!("unix://{}", node.dockerd.socket().display());
    let lbd = Lbd::start_with(
        &node.ns,
        tag,
        "",
        &["eth0"],
        &["--docker", "--docker-host", &host],
    )
    .unwrap_or_else(|e| panic!("lbd on {}: {e:#}", node.dockerd.hostname()));
    wait_docker_connected(&lbd, true);
    lbd
}

pub fn wait_docker_connected(lbd: &Lbd, connected: bool) {
    let done = wait_until(Duration::from_secs(15), "lbd's docker connection", || {
        lbd.status()
            .is_ok_and(|s| s["docker"]["connected"] == connected)
    });
    if let Err(e) = done {
        let status = lbd.status().map(|s| format!("{s:#}")).unwrap_or_default();
        panic!("{e:#}\nstatus: {status}\nlog:\n{}", lbd.log());
    }
}

/// `docker service create` of the test image; `publish` empty publishes
/// nothing.
pub fn create_service(
    manager: &Dockerd,
    name: &str,
    replicas: usize,
    publish: &str,
    extra: &[&str],
) {
    let replicas = replicas.to_string();
    let mut args = vec![
        "service",
        "create",
        "--detach",
        "--name",
        name,
        "--replicas",
        &replicas,
        "--no-resolve-image",
    ];
    if !publish.is_empty() {
        args.extend(["--publish", publish]);
    }
    args.extend_from_slice(extra);
    args.push(IMAGE);
    manager.docker(&args).expect("docker service create");
}

/// The hostnames the tasks answer with: Swarm names a task's container
/// after the first 12 digits of its id.
pub fn task_names(tasks: &[Task]) -> BTreeSet<String> {
    tasks
        .iter()
        .map(|t| {
            let id = t
                .container_id
                .as_deref()
                .expect("a running task has a container");
            id[..12].to_owned()
        })
        .collect()
}

/// A container's network namespace, as a path the tests can enter.
pub fn container_netns(d: &Dockerd, container: &str) -> PathBuf {
    let pid = d
        .docker(&["inspect", "--format", "{{.State.Pid}}", container])
        .unwrap_or_else(|e| panic!("inspecting {container}: {e:#}"));
    PathBuf::from(format!("/proc/{}/ns/net", pid.trim()))
}
