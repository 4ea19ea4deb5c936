//! Checks the Docker harness against a real dockerd (Debian's docker.io),
//! started by each test inside a network namespace of its own, and records
//! what Swarm's routing mesh does on a kernel without IPVS. Needs root.
//!
//! Run with `--test-threads=1`: every test starts one or two daemons, and
//! the machine has two cores.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use lb_tests::docker::{
    cgroups_named, cleanup_stale, container_ip, daemon_processes, gwbridge_addresses, http_whoami,
    in_netns, mounts_below, node_addr, wait_service_running, Cluster, Dockerd, Task, CLIENT_ADDR,
};
use lb_tests::netns::{unique_name, Netns};
use lb_tests::process::wait_until;
use lb_tests::swarm::{create_service, IMAGE};

const TIMEOUT: Duration = Duration::from_secs(2);
/// Servers in fresh containers need a moment after `running` to listen.
const READY: Duration = Duration::from_secs(15);
const CONVERGE: Duration = Duration::from_secs(60);
/// Docker's default bridge: the node's address on it, as containers see it.
const DOCKER0_GW: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 1);

/// Polls `http_whoami` until it answers (or `READY` passes).
fn whoami_when_ready(target: SocketAddr) -> (String, SocketAddr) {
    lb_tests::docker::whoami_when_ready(target, READY, TIMEOUT)
}

/// The bare-hostname service on TCP port 7 of the test image.
fn tcp_hostname(target: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&target, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(b"hello\n")?;
    let mut out = String::new();
    stream.take(4096).read_to_string(&mut out)?;
    Ok(out.trim().to_owned())
}

fn netns_inode(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .ino()
}

fn ingress_addr(task: &Task) -> IpAddr {
    task.addr_on("ingress")
        .unwrap_or_else(|| panic!("task {} has no ingress address: {task:?}", task.id))
}

#[test]
fn dockerd_runs_in_its_namespace_restarts_and_leaves_nothing_behind() {
    cleanup_stale();
    let ns = Netns::new(&unique_name("dlife")).unwrap();
    let mut d = Dockerd::start(&ns, "dlife").unwrap();

    let pid = d.pid().unwrap();
    assert_eq!(
        netns_inode(&Path::new("/proc").join(pid.to_string()).join("ns/net")),
        netns_inode(&ns.path()),
        "dockerd is not in the namespace it was started in"
    );
    assert_eq!(
        d.docker(&["info", "--format", "{{.Name}}"]).unwrap().trim(),
        "dlife"
    );
    ns.ip(&["link", "show", "docker0"])
        .expect("docker0 was not created in the daemon's namespace");

    lb_tests::docker::build_test_image(&d, IMAGE).unwrap();
    d.docker(&[
        "run",
        "-d",
        "--name",
        "keep",
        "--hostname",
        "keep",
        "--restart",
        "always",
        IMAGE,
    ])
    .unwrap();
    let ip = container_ip(&d, "keep", "bridge").unwrap();
    let (name, _) = ns.run(|| whoami_when_ready(SocketAddr::from((ip, 80))));
    assert_eq!(name, "keep");

    // Something must exist for the final check to be worth anything.
    let dir = d.dir().to_path_buf();
    let cgroup = d.cgroup_parent().to_owned();
    assert!(
        !mounts_below(&dir).is_empty(),
        "no mounts below {}",
        dir.display()
    );
    assert!(!cgroups_named(&cgroup).is_empty(), "no cgroup {cgroup}");
    assert!(daemon_processes(&dir, &cgroup).len() >= 3);

    d.restart().unwrap();
    assert_ne!(d.pid().unwrap(), pid, "restart kept the old process");
    let ip = container_ip(&d, "keep", "bridge").unwrap();
    let (name, _) = ns.run(|| whoami_when_ready(SocketAddr::from((ip, 80))));
    assert_eq!(
        name, "keep",
        "the container did not come back after the restart"
    );

    let ns_path = ns.path();
    drop(d);
    drop(ns);
    assert!(
        daemon_processes(&dir, &cgroup).is_empty(),
        "left running: {:?}",
        daemon_processes(&dir, &cgroup)
    );
    assert_eq!(mounts_below(&dir), Vec::<std::path::PathBuf>::new());
    assert_eq!(cgroups_named(&cgroup), Vec::<std::path::PathBuf>::new());
    assert!(!dir.exists(), "{} is still there", dir.display());
    assert!(!ns_path.exists(), "{} is still there", ns_path.display());
}

#[test]
fn standalone_container_answers_with_its_hostname() {
    cleanup_stale();
    let ns = Netns::new(&unique_name("dsolo")).unwrap();
    let d = Dockerd::start(&ns, "dsolo").unwrap();
    lb_tests::docker::build_test_image(&d, IMAGE).unwrap();
    d.docker(&[
        "run",
        "-d",
        "--name",
        "web1",
        "--hostname",
        "web-one",
        IMAGE,
    ])
    .unwrap();
    let ip = container_ip(&d, "web1", "bridge").unwrap();

    let (name, peer) = ns.run(|| whoami_when_ready(SocketAddr::from((ip, 80))));
    assert_eq!(name, "web-one");
    assert_eq!(peer.ip(), IpAddr::V4(DOCKER0_GW));
    let name = ns
        .run(|| tcp_hostname(SocketAddr::from((ip, 7))))
        .expect("tcp port 7");
    assert_eq!(name, "web-one");
}

/// Traffic routed into a node towards a container meets Docker's FORWARD
/// chain (policy DROP): only published ports get through.
#[test]
fn forward_chain_admits_only_published_containers() {
    let cluster = Cluster::new(1).unwrap();
    let node = &cluster.nodes[0];
    let d = &node.dockerd;
    lb_tests::docker::build_test_image(d, IMAGE).unwrap();
    d.docker(&[
        "run",
        "-d",
        "--name",
        "hidden",
        "--hostname",
        "hidden",
        IMAGE,
    ])
    .unwrap();
    d.docker(&[
        "run",
        "-d",
        "--name",
        "shown",
        "--hostname",
        "shown",
        "-p",
        "8081:80",
        IMAGE,
    ])
    .unwrap();
    let hidden = container_ip(d, "hidden", "bridge").unwrap();
    let shown = container_ip(d, "shown", "bridge").unwrap();
    let via = node.addr.to_string();
    cluster
        .client
        .ip(&["route", "add", "172.16.0.0/12", "via", &via])
        .unwrap();

    // Both answer from the node itself, so what follows is the FORWARD chain.
    node.ns.run(|| {
        whoami_when_ready(SocketAddr::from((hidden, 80)));
        whoami_when_ready(SocketAddr::from((shown, 80)));
    });
    cluster.client.run(|| {
        let err = http_whoami(SocketAddr::from((hidden, 80)), TIMEOUT)
            .expect_err("routed traffic to an unpublished container got through");
        let kind = err.downcast_ref::<std::io::Error>().map(|e| e.kind());
        assert_eq!(kind, Some(ErrorKind::TimedOut), "{err:#}");

        let (name, peer) = http_whoami(SocketAddr::from((shown, 80)), TIMEOUT).unwrap();
        assert_eq!(
            (name.as_str(), peer.ip()),
            ("shown", IpAddr::V4(CLIENT_ADDR))
        );
        let (name, peer) = http_whoami(SocketAddr::from((node.addr, 8081)), TIMEOUT).unwrap();
        assert_eq!(
            (name.as_str(), peer.ip()),
            ("shown", IpAddr::V4(CLIENT_ADDR))
        );
    });
}

#[test]
fn single_node_swarm_service_with_three_replicas_converges() {
    let cluster = Cluster::new(1).unwrap();
    let node = &cluster.nodes[0];
    let d = cluster.manager();
    cluster.build_image(IMAGE).unwrap();
    create_service(d, "web", 3, "8080:80", &[]);
    let tasks = wait_service_running(d, "web", 3, CONVERGE).unwrap();

    let addrs: BTreeSet<IpAddr> = tasks.iter().map(ingress_addr).collect();
    assert_eq!(addrs.len(), 3, "{tasks:?}");
    for a in &addrs {
        let IpAddr::V4(v4) = a else {
            panic!("{a} is not IPv4")
        };
        assert_eq!(
            v4.octets()[..3],
            [10, 0, 0],
            "{a} is not on the ingress network"
        );
    }

    // From the node's namespace a local task is reachable on docker_gwbridge.
    let gw = gwbridge_addresses(d).unwrap();
    let mut seen = BTreeSet::new();
    for task in &tasks {
        let id = task
            .container_id
            .clone()
            .expect("a running task has a container");
        let addr = gw[&id];
        let (name, _) = node
            .ns
            .run(|| whoami_when_ready(SocketAddr::from((addr, 80))));
        assert!(id.starts_with(&name), "{name} answered for container {id}");
        seen.insert(name);
    }
    assert_eq!(seen.len(), 3);

    // From ingress_sbox every task is reachable on its overlay address.
    let sbox = d.ingress_sbox();
    for a in &addrs {
        let target = SocketAddr::new(*a, 80);
        let (_, peer) = in_netns(&sbox, || whoami_when_ready(target)).unwrap();
        assert_eq!(
            peer.ip().to_string(),
            "10.0.0.2",
            "ingress_sbox's ingress address"
        );
    }
}

/// The gap the load balancer fills: Swarm accepts the published port and
/// runs the tasks, but nothing answers on it, because the routing mesh
/// needs IPVS and this kernel has none. If this test fails, the kernel (or
/// Docker) changed and the premise of the Swarm tests is to be checked.
#[test]
fn published_port_fails_without_the_load_balancer() {
    let cluster = Cluster::new(1).unwrap();
    let d = cluster.manager();
    cluster.build_image(IMAGE).unwrap();
    create_service(d, "web", 3, "8080:80", &[]);
    let tasks = wait_service_running(d, "web", 3, CONVERGE).unwrap();
    // The tasks themselves serve, so what fails below is the mesh.
    let first = ingress_addr(&tasks[0]);
    in_netns(&d.ingress_sbox(), || {
        whoami_when_ready(SocketAddr::new(first, 80))
    })
    .unwrap();

    let target = SocketAddr::from((node_addr(1), 8080));
    cluster.client.run(|| {
        for _ in 0..3 {
            let err = http_whoami(target, TIMEOUT)
                .expect_err("the published port answered: is IPVS available now?");
            let kind = err.downcast_ref::<std::io::Error>().map(|e| e.kind());
            assert_eq!(kind, Some(ErrorKind::ConnectionRefused), "{err:#}");
        }
    });

    let log = d.log();
    assert!(
        log.contains("Could not get ipvs family information from the kernel"),
        "dockerd did not report the missing IPVS"
    );
    // No ingress rules were programmed at all: the port is simply closed.
    let nat = cluster.nodes[0]
        .ns
        .sh("iptables-save -t nat")
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap();
    assert!(!nat.contains("DOCKER-INGRESS"), "{nat}");
}

#[test]
fn two_node_swarm_reaches_remote_tasks_over_the_overlay() {
    let cluster = Cluster::new(2).unwrap();
    let manager = cluster.manager();
    let worker = &cluster.nodes[1].dockerd;
    cluster.build_image(IMAGE).unwrap();
    create_service(
        manager,
        "web",
        2,
        "8080:80",
        &["--replicas-max-per-node", "1"],
    );
    let tasks = wait_service_running(manager, "web", 2, CONVERGE).unwrap();
    let nodes: BTreeSet<&str> = tasks.iter().map(|t| t.node_id.as_str()).collect();
    assert_eq!(nodes.len(), 2, "both tasks on one node: {tasks:?}");

    // Each node's ingress_sbox reaches both tasks, one of them remote.
    for node in &cluster.nodes {
        for task in &tasks {
            let target = SocketAddr::new(ingress_addr(task), 80);
            let (name, _) =
                in_netns(&node.dockerd.ingress_sbox(), || whoami_when_ready(target)).unwrap();
            let id = task.container_id.as_deref().unwrap();
            assert!(id.starts_with(&name), "{name} answered for container {id}");
        }
    }

    // A worker cannot list tasks, but its view of the ingress network comes
    // to list every task of the service, with the node each runs on. That
    // view is gossip: it may lag the manager's by a moment.
    let (status, _) = worker.api_get("/tasks").unwrap();
    assert_eq!(status, 503);
    let task_ips: BTreeSet<String> = tasks.iter().map(|t| ingress_addr(t).to_string()).collect();
    let manager_id = node_id(manager);
    let expected: BTreeSet<(String, String)> = tasks
        .iter()
        .map(|t| {
            let node = if t.node_id == manager_id { 1 } else { 2 };
            (ingress_addr(t).to_string(), node_addr(node).to_string())
        })
        .collect();
    assert_eq!(expected.len(), task_ips.len());
    let mut listed = BTreeSet::new();
    let mut web = serde_json::Value::Null;
    let converged = wait_until(Duration::from_secs(20), "the worker's view of web", || {
        let Ok(net) = worker.api_json("/networks/ingress?verbose=true") else {
            return false;
        };
        web = net["Services"]["web"].clone();
        listed = web["Tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let field = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
                (field(&t["EndpointIP"]), field(&t["Info"]["Host IP"]))
            })
            .collect();
        listed == expected
    });
    assert!(
        converged.is_ok(),
        "worker lists {listed:?}, want {expected:?}: {web}"
    );
    assert_eq!(web["Ports"][0], "Target: 80, Publish: 8080", "{web}");
}

/// The Swarm node id of the daemon (`docker info`).
fn node_id(d: &Dockerd) -> String {
    d.docker(&["info", "--format", "{{.Swarm.NodeID}}"])
        .unwrap()
        .trim()
        .to_owned()
}
