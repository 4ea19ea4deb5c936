//! Swarm service VIPs between containers, through lbd's socket programs,
//! on a kernel without IPVS: a container on an overlay network calls a
//! service by name (Docker's DNS answers with the VIP) and reaches its
//! tasks, over TCP and UDP, on one node and across two. Every test starts
//! its own Swarm in namespaces it creates and removes. Needs root; run with
//! `--test-threads=1 --nocapture` to see the measurements.

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use lb_tests::docker::{wait_service_running, Cluster, Dockerd, Node};
use lb_tests::lbd::Lbd;
use lb_tests::netns::run_in;
use lb_tests::process::wait_until;
use lb_tests::swarm::{
    calls_by_name, container_netns, create_network, create_service, lbd_for_node, run_client,
    task_names, IMAGE, WHOAMI,
};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(60);
const TIMEOUT: Duration = Duration::from_secs(2);
/// The test image's UDP echo.
const UDP_ECHO: u16 = 5353;

/// The VIP of `service` on `network`, from the service's endpoint.
fn service_vip(manager: &Dockerd, service: &str, network: &str) -> Ipv4Addr {
    let net_id = manager
        .docker(&["network", "inspect", "--format", "{{.Id}}", network])
        .unwrap();
    let vips: Value = serde_json::from_str(
        &manager
            .docker(&[
                "service",
                "inspect",
                "--format",
                "{{json .Endpoint.VirtualIPs}}",
                service,
            ])
            .unwrap(),
    )
    .unwrap();
    let addr = vips
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["NetworkID"] == net_id.trim())
        .and_then(|v| v["Addr"].as_str())
        .unwrap_or_else(|| panic!("{service} has no VIP on {network}: {vips}"));
    addr.split('/').next().unwrap().parse().unwrap()
}

/// One call to `target` on the whoami port: the hostname, and the peer
/// address the socket reports (the VIP, not the task, when balanced).
fn whoami(target: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    whoami_within(target, TIMEOUT)
}

fn whoami_within(target: SocketAddr, timeout: Duration) -> std::io::Result<(String, SocketAddr)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&target, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let peer = s.peer_addr()?;
    s.write_all(b"x\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok((out.trim().to_owned(), peer))
}

/// Calls `target` from inside the namespace at `netns` until every name in
/// `want` has answered (bounded by `max` calls).
fn until_all_answer(
    netns: &Path,
    target: SocketAddr,
    want: &BTreeSet<String>,
    max: usize,
) -> BTreeMap<String, usize> {
    run_in(netns, || {
        let mut seen = BTreeMap::new();
        for _ in 0..max {
            if let Ok((name, _)) = whoami(target) {
                *seen.entry(name).or_insert(0) += 1;
            }
            if want.iter().all(|w| seen.contains_key(w)) {
                break;
            }
        }
        seen
    })
    .unwrap()
}

fn vip_services(lbd: &Lbd, vip: Ipv4Addr) -> Vec<Value> {
    let s = lbd.status().expect("status");
    s["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|svc| {
            svc["frontend"]
                .as_str()
                .is_some_and(|f| f.starts_with(&format!("{vip}:0/")))
        })
        .cloned()
        .collect()
}

/// The task addresses lbd balances `vip` over (TCP).
fn vip_backends(lbd: &Lbd, vip: Ipv4Addr) -> BTreeSet<String> {
    vip_services(lbd, vip)
        .iter()
        .filter(|s| s["frontend"] == format!("{vip}:0/tcp"))
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["address"].as_str().map(String::from))
        .collect()
}

fn wait_vip_backends(lbd: &Lbd, vip: Ipv4Addr, n: usize) {
    let done = wait_until(
        CONVERGE,
        &format!("lbd to balance {vip} over {n} tasks"),
        || vip_backends(lbd, vip).len() == n,
    );
    if let Err(e) = done {
        panic!(
            "{e:#}\nstatus: {:#}\nlog:\n{}",
            lbd.status().unwrap_or_default(),
            lbd.log()
        );
    }
}

/// The cost of one connection through the socket programs: `n` refused
/// connects (no listener on the port, so the task's kernel answers with a
/// reset at once) to the VIP and to a task directly, interleaved in
/// batches so that both see the same machine. Returns µs per connect.
fn connect_cost(netns: &Path, vip: Ipv4Addr, task: Ipv4Addr, n: usize) -> (f64, f64) {
    const CLOSED: u16 = 9;
    run_in(netns, || {
        let one = |addr: Ipv4Addr| {
            let t = Instant::now();
            match TcpStream::connect_timeout(&SocketAddr::from((addr, CLOSED)), TIMEOUT) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                other => panic!("connect to {addr}:{CLOSED}: {other:?} (expected refused)"),
            }
            t.elapsed()
        };
        let (mut via_vip, mut direct) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..n / 100 {
            for _ in 0..100 {
                via_vip += one(vip);
            }
            for _ in 0..100 {
                direct += one(task);
            }
        }
        let per = |d: Duration| d.as_secs_f64() * 1e6 / (n / 100 * 100) as f64;
        (per(via_vip), per(direct))
    })
    .unwrap()
}

#[test]
fn containers_reach_a_service_by_its_vip_on_one_node() {
    let cluster = Cluster::new(1).expect("cluster");
    let node = &cluster.nodes[0];
    let d = cluster.manager();
    cluster.build_image(IMAGE).expect("image");
    create_network(d, "app");
    create_service(d, "api", 2, "", &["--network", "app"]);
    create_service(
        d,
        "rr",
        1,
        "",
        &["--network", "app", "--endpoint-mode", "dnsrr"],
    );
    let tasks = wait_service_running(d, "api", 2, CONVERGE).expect("api");
    wait_service_running(d, "rr", 1, CONVERGE).expect("rr");
    run_client(d, "front", "app");
    let vip = service_vip(d, "api", "app");
    let front = container_netns(d, "front");

    // Without lbd the VIP does not answer: no IPVS here.
    let (_, failed) = calls_by_name(d, "front", "api", 1);
    assert_eq!(
        failed, 1,
        "the VIP answered without lbd: does this kernel have IPVS?"
    );

    let lbd = lbd_for_node(node, "vip1");
    let t0 = Instant::now();
    wait_vip_backends(&lbd, vip, 2);
    eprintln!(
        "vip: lbd balances {vip} over 2 tasks {:.0} ms after it connected",
        t0.elapsed().as_secs_f64() * 1e3
    );

    // By name, as an application calls: every call answered, by both tasks.
    let want = task_names(&tasks);
    let (seen, failed) = calls_by_name(d, "front", "api", 40);
    eprintln!("vip: 40 calls to `api` from front: {seen:?}, {failed} failed");
    assert_eq!(failed, 0, "{seen:?}");
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), want);

    // The socket shows the VIP as its peer, any port is balanced to the
    // same port of a task, and UDP datagrams (sent unconnected) come back
    // from the VIP.
    let (name, peer) = run_in(&front, || whoami(SocketAddr::from((vip, WHOAMI))))
        .unwrap()
        .expect("whoami by VIP");
    assert!(want.contains(&name), "{name}");
    assert_eq!(
        peer,
        SocketAddr::from((vip, WHOAMI)),
        "getpeername shows the VIP"
    );
    let http = run_in(&front, || {
        lb_tests::docker::http_whoami(SocketAddr::from((vip, 80)), TIMEOUT)
    })
    .unwrap()
    .expect("HTTP by VIP");
    assert!(want.contains(&http.0), "{http:?}");
    let udp_target = SocketAddr::from((vip, UDP_ECHO));
    let udp: BTreeSet<String> = run_in(&front, || {
        (0..40)
            .map(|_| {
                // A new socket each time: sockets are what is balanced.
                lb_tests::echo::udp_request(udp_target, TIMEOUT)
                    .unwrap_or_else(|e| panic!("UDP by VIP: {e:#}"))
                    .0
            })
            .collect()
    })
    .unwrap();
    assert_eq!(udp, want, "UDP by VIP");

    // Dual-stack sockets (AF_INET6, as Java opens them) reach the VIP as
    // ::ffff:a.b.c.d, and see it as their peer the same way.
    let mapped = IpAddr::V6(vip.to_ipv6_mapped());
    let (name, peer) = run_in(&front, || whoami(SocketAddr::new(mapped, WHOAMI)))
        .unwrap()
        .expect("whoami by VIP from an AF_INET6 socket");
    assert!(want.contains(&name), "{name}");
    assert_eq!(peer, SocketAddr::new(mapped, WHOAMI));
    let udp6 = run_in(&front, || {
        lb_tests::echo::udp_request(SocketAddr::new(mapped, UDP_ECHO), TIMEOUT)
    })
    .unwrap()
    .expect("UDP by VIP from an AF_INET6 socket");
    assert!(want.contains(&udp6.0), "{udp6:?}");

    // A task calls its own service; tasks.api and dnsrr keep working.
    let own = tasks[0].container_id.clone().unwrap();
    let (seen, failed) = calls_by_name(d, &own, "api", 10);
    assert_eq!(failed, 0, "a task calling its own service: {seen:?}");
    let (seen, failed) = calls_by_name(d, "front", "tasks.api", 10);
    assert_eq!(failed, 0, "tasks.api: {seen:?}");
    let (seen, failed) = calls_by_name(d, "front", "rr", 5);
    assert_eq!(failed, 0, "a dnsrr service: {seen:?}");

    // A service on two networks has a VIP on each, each balanced for its
    // own network's containers only.
    create_network(d, "other");
    create_service(
        d,
        "multi",
        2,
        "",
        &["--network", "app", "--network", "other"],
    );
    let multi = wait_service_running(d, "multi", 2, CONVERGE).expect("multi");
    run_client(d, "side", "other");
    let (on_app, on_other) = (
        service_vip(d, "multi", "app"),
        service_vip(d, "multi", "other"),
    );
    assert_ne!(on_app, on_other);
    wait_vip_backends(&lbd, on_app, 2);
    wait_vip_backends(&lbd, on_other, 2);
    let want_multi = task_names(&multi);
    for (client, vip) in [("front", on_app), ("side", on_other)] {
        let (seen, failed) = calls_by_name(d, client, "multi", 20);
        assert_eq!(failed, 0, "{client} -> multi ({vip}): {seen:?}");
        assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), want_multi);
    }
    let side = container_netns(d, "side");
    let across = run_in(&side, || whoami(SocketAddr::from((vip, WHOAMI)))).unwrap();
    assert!(
        across.is_err(),
        "api's VIP on app answered on other: {across:?}"
    );

    // A task whose health check has not passed takes no connection: Swarm
    // does not list it, and lbd does not take it from the container list.
    create_service(
        d,
        "sick",
        1,
        "",
        &[
            "--network",
            "app",
            "--health-cmd",
            "false",
            "--health-interval",
            "1s",
            "--health-retries",
            "30",
        ],
    );
    let sick_vip = service_vip(d, "sick", "app");
    let started = wait_until(CONVERGE, "a sick task to start", || {
        d.docker(&["ps", "--filter", "name=sick", "--format", "{{.Status}}"])
            .is_ok_and(|s| s.contains("health: starting"))
    });
    started.expect("sick task");
    sleep(Duration::from_millis(500));
    assert!(
        vip_backends(&lbd, sick_vip).is_empty(),
        "an unhealthy task is balanced: {:?}",
        vip_backends(&lbd, sick_vip)
    );
    let (seen, failed) = calls_by_name(d, "front", "sick", 1);
    assert_eq!(failed, 1, "an unhealthy task answered: {seen:?}");

    // A process not on the network is not balanced: the host's namespace
    // (lbd's) connecting to the VIP goes nowhere.
    let not_member = node.ns.run(|| whoami(SocketAddr::from((vip, WHOAMI))));
    assert!(not_member.is_err(), "the VIP answered outside its network");

    // Scale out: the new task takes calls.
    let t0 = Instant::now();
    d.docker(&["service", "scale", "--detach", "api=3"])
        .unwrap();
    let tasks = wait_service_running(d, "api", 3, CONVERGE).expect("api=3");
    let want = task_names(&tasks);
    let seen = until_all_answer(&front, SocketAddr::from((vip, WHOAMI)), &want, 300);
    eprintln!(
        "vip: scale 2 -> 3, all 3 answered {:.0} ms after the scale: {seen:?}",
        t0.elapsed().as_secs_f64() * 1e3
    );
    assert!(
        want.iter().all(|w| seen.contains_key(w)),
        "{seen:?} want {want:?}"
    );

    // A task killed under load: once lbd has dropped it, no call fails.
    let victim = tasks[1].clone();
    let victim_addr = victim.addr_on("app").expect("task address on app");
    let stop = AtomicBool::new(false);
    let target = SocketAddr::from((vip, WHOAMI));
    let (samples, dropped_at) = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            run_in(&front, || {
                let mut out = Vec::new();
                let t = Instant::now();
                // Bounded in count and time.
                while !stop.load(Ordering::Relaxed)
                    && out.len() < 5000
                    && t.elapsed() < Duration::from_secs(60)
                {
                    let started = Instant::now();
                    let ok = whoami_within(target, Duration::from_millis(500)).is_ok();
                    out.push((started, ok));
                    sleep(Duration::from_millis(5));
                }
                out
            })
            .unwrap()
        });
        sleep(Duration::from_millis(300));
        let killed = Instant::now();
        d.docker(&["kill", victim.container_id.as_deref().unwrap()])
            .unwrap();
        let gone = wait_until(
            Duration::from_secs(10),
            "lbd to drop the killed task",
            || !vip_backends(&lbd, vip).contains(&format!("{victim_addr}:0")),
        );
        let dropped_at = Instant::now();
        eprintln!(
            "vip: lbd dropped the killed task {:.0} ms after `docker kill` began",
            (dropped_at - killed).as_secs_f64() * 1e3
        );
        // Longer than a call to the dead task can take.
        sleep(Duration::from_millis(3000));
        stop.store(true, Ordering::Relaxed);
        gone.expect("killed task dropped");
        (load.join().unwrap(), dropped_at)
    });
    let after: Vec<_> = samples.iter().filter(|(t, _)| *t > dropped_at).collect();
    let failed_after = after.iter().filter(|(_, ok)| !ok).count();
    let failed_before = samples
        .iter()
        .filter(|(t, ok)| *t <= dropped_at && !ok)
        .count();
    eprintln!(
        "vip: task killed under load: {} calls, {failed_before} failed before lbd dropped it, \
         {failed_after} of {} after",
        samples.len(),
        after.len()
    );
    assert!(!after.is_empty());
    assert_eq!(
        failed_after, 0,
        "calls failed after lbd dropped the killed task"
    );

    // What a connection through the VIP costs, against one to a task.
    let task_addr = match tasks[0].addr_on("app") {
        Some(IpAddr::V4(a)) => a,
        other => panic!("task address {other:?}"),
    };
    let (via_vip, direct) = connect_cost(&front, vip, task_addr, 2000);
    eprintln!(
        "vip: connect cost: {via_vip:.1} µs through the VIP, {direct:.1} µs to a task directly \
         (ratio {:.2})",
        via_vip / direct
    );
    let s = lbd.status().unwrap();
    eprintln!("convergence [vip]: {}", s["convergence"]);

    // Removed: the VIP takes no new connection within a second, though
    // Swarm's view keeps the tasks while they stop.
    d.docker(&["service", "rm", "api"]).unwrap();
    let removed = Instant::now();
    let refused = run_in(&front, || {
        wait_until(Duration::from_secs(1), "the VIP to refuse", || {
            whoami_within(target, Duration::from_millis(200)).is_err()
        })
    })
    .unwrap();
    refused.unwrap_or_else(|e| panic!("{e:#}\nstatus: {:#}", lbd.status().unwrap_or_default()));
    eprintln!(
        "vip: service rm: the VIP refused new connections {:.0} ms after it returned",
        removed.elapsed().as_secs_f64() * 1e3
    );
}

#[test]
fn containers_reach_tasks_on_another_node_by_vip() {
    let cluster = Cluster::new(2).expect("cluster");
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let manager = cluster.manager();
    cluster.build_image(IMAGE).expect("image");
    create_network(manager, "app");
    let on = |node: &Node| format!("node.hostname=={}", node.dockerd.hostname());
    // Both tasks on the worker: every call from the manager's container
    // crosses the overlay.
    create_service(
        manager,
        "api",
        2,
        "",
        &["--network", "app", "--constraint", &on(n2)],
    );
    let tasks = wait_service_running(manager, "api", 2, CONVERGE).expect("api");
    run_client(&n1.dockerd, "front", "app");
    let vip = service_vip(manager, "api", "app");
    let lbd1 = lbd_for_node(n1, "vip2a");
    let lbd2 = lbd_for_node(n2, "vip2b");
    wait_vip_backends(&lbd1, vip, 2);

    let want = task_names(&tasks);
    let (seen, failed) = calls_by_name(&n1.dockerd, "front", "api", 30);
    eprintln!("vip, 2 nodes: 30 calls from the manager to tasks on the worker: {seen:?}");
    assert_eq!(failed, 0, "{seen:?}");
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), want);

    // And back: a task on the worker calls a service on the manager.
    create_service(
        manager,
        "back",
        1,
        "",
        &["--network", "app", "--constraint", &on(n1)],
    );
    let back = wait_service_running(manager, "back", 1, CONVERGE).expect("back");
    let back_vip = service_vip(manager, "back", "app");
    wait_vip_backends(&lbd2, back_vip, 1);
    let caller = tasks[0].container_id.clone().unwrap();
    let (seen, failed) = calls_by_name(&n2.dockerd, &caller, "back", 10);
    assert_eq!(failed, 0, "worker -> manager: {seen:?}");
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        task_names(&back)
    );
    let front = container_netns(&n1.dockerd, "front");
    let udp = run_in(&front, || {
        lb_tests::echo::udp_request(SocketAddr::from((vip, UDP_ECHO)), TIMEOUT)
    })
    .unwrap()
    .expect("UDP by VIP across nodes");
    assert!(want.contains(&udp.0), "{udp:?}");
}
