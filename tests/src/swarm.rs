//! What the Swarm tests share: lbd on a cluster node, services of the test
//! image, and the names their tasks answer with.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use crate::docker::{Dockerd, Node, Task};
use crate::lbd::Lbd;
use crate::process::wait_until;

/// The test image (see `docker::build_test_image`).
pub const IMAGE: &str = "lbt-web";
/// The test image's port that answers any line with the hostname.
pub const WHOAMI: u16 = 7;

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

/// `docker service update --label-add` of each label (`key=value`) to a
/// service; the engine applies it without restarting the tasks.
pub fn add_labels(manager: &Dockerd, service: &str, labels: &[&str]) {
    let mut args = vec!["service", "update", "--detach"];
    for l in labels {
        args.extend(["--label-add", l]);
    }
    args.push(service);
    manager.docker(&args).expect("docker service update");
}

/// An attachable overlay network, so that plain containers can join it.
pub fn create_network(manager: &Dockerd, name: &str) {
    manager
        .docker(&[
            "network",
            "create",
            "--driver",
            "overlay",
            "--attachable",
            name,
        ])
        .expect("docker network create");
}

/// A plain container of the test image on `network`, for calling from.
pub fn run_client(d: &Dockerd, name: &str, network: &str) {
    d.docker(&[
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        network,
        IMAGE,
    ])
    .expect("docker run");
}

/// `n` calls by name from inside `container`, with the image's busybox
/// (Docker's DNS answers `name` with the VIP): the hostnames that answered,
/// and how many calls failed.
pub fn calls_by_name(
    d: &Dockerd,
    container: &str,
    name: &str,
    n: usize,
) -> (BTreeMap<String, usize>, usize) {
    let script = format!(
        "i=0; while [ $i -lt {n} ]; do echo x | nc -w 2 {name} {WHOAMI} || echo FAILED; i=$((i+1)); done"
    );
    let out = d
        .docker_timeout(
            &["exec", container, "sh", "-c", &script],
            Duration::from_secs(3 * n as u64 + 10),
        )
        .unwrap_or_else(|e| panic!("calls from {container}: {e:#}"));
    let mut seen = BTreeMap::new();
    let mut failed = 0;
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line == "FAILED" {
            failed += 1;
        } else {
            *seen.entry(line.to_owned()).or_default() += 1;
        }
    }
    (seen, failed)
}
