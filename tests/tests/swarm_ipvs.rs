//! Docker's own routing mesh (IPVS) and lbd side by side on one Swarm.
//!
//! Needs a kernel with IPVS, which this machine's lacks: it runs in the
//! 6.1 VM of `cargo xtask vm-test` (`--only swarm_ipvs`), which also puts
//! the table it prints into BENCHMARKS.md. The nodes are network
//! namespaces with a dockerd each ([`Cluster`]), on the VM's one kernel.
//!
//! The same scenario runs twice on one cluster, each time with a service
//! of its own: first through Docker's mesh alone (its iptables DNAT and
//! IPVS inside `ingress_sbox`), then with lbd on every node, which
//! translates before netfilter and IPVS see the packet. Each step is
//! measured for both; lbd's side is also asserted, Docker's only where the
//! comparison would be meaningless without it (the mesh must work at all).
//!
//! Every load is bounded in requests and in time.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::thread::sleep;
use std::time::{Duration, Instant};

use lb_tests::docker::{http_whoami, until_all_answer, wait_service_running, Cluster, Node};
use lb_tests::echo::TcpSession;
use lb_tests::lbd::Lbd;
use lb_tests::load::{until_stopped, Bounds, StopOnDrop};
use lb_tests::process::{process_cpu, time_scale, wait_until};
use lb_tests::swarm::{add_labels, create_service, lbd_for_node, task_names, IMAGE};

const TIMEOUT: Duration = Duration::from_secs(2);
const CONVERGE: Duration = Duration::from_secs(120);
const REPLICAS: usize = 4;
const SCALED: usize = 6;
/// The test image's ports: busybox httpd (a new connection per request),
/// lb-http (keep-alive) and lb-echo (a line per request on one connection).
const HTTPD: u16 = 80;
const HTTP_KEEPALIVE: u16 = 8000;
const ECHO: u16 = 9000;
/// IPVS's idle timeout for established TCP, shortened from its 900 s with
/// `ipvsadm --set` so that the test can wait past it.
const IPVS_TCP_TIMEOUT_SECS: u64 = 5;
const IDLE: Duration = Duration::from_secs(3 * IPVS_TCP_TIMEOUT_SECS);
/// Session affinity: how long a client keeps its task, and how many new
/// connections from one client are made to see which tasks answer them.
const AFFINITY_SECS: u32 = 300;
const AFFINITY_TRIES: usize = 20;
/// Where the table goes in the test's output; `cargo xtask vm-test` looks
/// for lines with this prefix.
const TABLE_PREFIX: &str = "SWARM-IPVS| ";

#[derive(Clone, Copy, PartialEq)]
enum Mesh {
    Ipvs,
    Lbd,
}

impl Mesh {
    fn name(self) -> &'static str {
        match self {
            Mesh::Ipvs => "ipvs",
            Mesh::Lbd => "lbd",
        }
    }

    /// Each run has its own service and published ports.
    fn port(self, target: u16) -> u16 {
        let base = match self {
            Mesh::Ipvs => 20000,
            Mesh::Lbd => 30000,
        };
        base + target
    }
}

/// What one run measured, one value per row of the table.
#[derive(Default)]
struct Run {
    reach: Vec<String>,
    wrk_keepalive: String,
    wrk_new_conn: String,
    killed: String,
    scaled: String,
    idle: String,
    affinity: String,
    removed: String,
}

#[test]
#[ignore = "needs a kernel with IPVS: runs in `cargo xtask vm-test --only swarm_ipvs`"]
fn docker_ipvs_mesh_and_lbd_side_by_side() {
    require_ipvs();
    let _forwarding = HostForwarding::on();
    let cluster = Cluster::new(2).expect("cluster");
    cluster.build_image(IMAGE).expect("image");
    let ipvs = scenario(&cluster, Mesh::Ipvs);
    let lbds: Vec<Lbd> = cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, node)| lbd_for_node(node, &format!("ipvs{i}")))
        .collect();
    let lbd = scenario(&cluster, Mesh::Lbd);
    // For reading the table: what each node's datapath counted, and the
    // CPU time lbd itself took.
    for (node, lbd) in cluster.nodes.iter().zip(&lbds) {
        let datapath = lbd.status().map(|s| s["datapath"].to_string());
        let cpu = lbd.pid().map(process_cpu);
        println!("lbd on {}: cpu {cpu:?}, datapath {datapath:?}", node.addr);
    }
    print_table(&ipvs, &lbd);
    drop(lbds);
}

/// IPv4 forwarding in the root namespace, on while it lives. A namespace
/// takes its IPv4 settings from the root namespace's when it is made
/// (`net.core.devconf_inherit_init_net=0`). On a Docker host dockerd runs
/// in the root namespace and turns forwarding on there, so `ingress_sbox`
/// forwards, which IPVS's NAT mode needs for the tasks' replies; here each
/// dockerd runs in a node namespace, so the root namespace must stand in
/// for it. (lbd turns forwarding on in `ingress_sbox` itself.)
struct HostForwarding(String);

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl HostForwarding {
    fn on() -> Self {
        let old = std::fs::read_to_string(IP_FORWARD).expect("ip_forward");
        std::fs::write(IP_FORWARD, "1").expect("turning forwarding on");
        Self(old.trim().to_string())
    }
}

impl Drop for HostForwarding {
    fn drop(&mut self) {
        let _ = std::fs::write(IP_FORWARD, &self.0);
    }
}

fn require_ipvs() {
    let _ = Command::new("modprobe").arg("ip_vs").status();
    assert!(
        std::path::Path::new("/proc/net/ip_vs").exists(),
        "this kernel has no IPVS (no /proc/net/ip_vs after modprobe ip_vs): the comparison \
         runs in the 6.1 VM, `cargo xtask vm-test --only swarm_ipvs`"
    );
    for tool in ["ipvsadm", "wrk", "nsenter"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is missing"
        );
    }
}

fn scenario(cluster: &Cluster, mesh: Mesh) -> Run {
    let manager = cluster.manager();
    let service = format!("web-{}", mesh.name());
    let publish: Vec<String> = [HTTPD, HTTP_KEEPALIVE, ECHO]
        .iter()
        .map(|p| format!("{}:{p}", mesh.port(*p)))
        .collect();
    let extra: Vec<&str> = publish[1..]
        .iter()
        .flat_map(|p| ["--publish", p.as_str()])
        .collect();
    create_service(manager, &service, REPLICAS, &publish[0], &extra);
    let tasks = wait_service_running(manager, &service, REPLICAS, CONVERGE).expect("service");
    let names = task_names(&tasks);
    let at = |node: &Node, port: u16| SocketAddr::from((node.addr, mesh.port(port)));
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut run = Run::default();

    // Reached through every node, by every task.
    for (node, role) in [(n1, "manager"), (n2, "worker")] {
        let t0 = Instant::now();
        let target = at(node, HTTPD);
        let first = wait_until(
            Duration::from_secs(30),
            &format!("an answer from {target}"),
            || cluster.client.run(|| http_whoami(target, TIMEOUT).is_ok()),
        );
        if let Err(e) = first {
            panic!("{}: {e:#}\n{}", mesh.name(), mesh_state(cluster));
        }
        until_all_answer(&cluster.client, target, &names, 400, TIMEOUT);
        run.reach.push(format!(
            "all {REPLICAS} tasks through the {role} within {}",
            ms(t0.elapsed())
        ));
    }

    // Requests per second through the worker (its tasks and the manager's).
    run.wrk_keepalive = wrk(cluster, at(n2, HTTP_KEEPALIVE));
    run.wrk_new_conn = wrk(cluster, at(n2, HTTPD));

    // A task killed under load: what the clients see until Swarm has
    // replaced it and the mesh knows.
    let victim = tasks
        .iter()
        .find(|t| t.node_id == node_id(n1))
        .or(tasks.first())
        .expect("a task");
    let container = victim
        .container_id
        .clone()
        .expect("a running task's container");
    let stop = AtomicBool::new(false);
    let target = at(n2, HTTPD);
    let scale = time_scale();
    let samples = std::thread::scope(|s| {
        let load = s.spawn(|| {
            until_stopped(
                &cluster.client,
                &stop,
                Bounds {
                    max_requests: 20_000,
                    max_time: Duration::from_secs(120) * scale,
                    pause: Duration::from_millis(10),
                },
                || http_whoami(target, TIMEOUT).map(|(name, _)| name),
            )
        });
        let _stop = StopOnDrop(&stop);
        sleep(Duration::from_secs(2) * scale);
        let host = cluster
            .nodes
            .iter()
            .find(|n| node_id(n) == victim.node_id)
            .expect("the victim's node");
        host.dockerd
            .docker(&["kill", &container])
            .expect("docker kill");
        wait_until(CONVERGE, "the killed task replaced", || {
            wait_service_running(manager, &service, REPLICAS, Duration::from_secs(1)).is_ok()
        })
        .expect("replacement");
        sleep(Duration::from_secs(3) * scale);
        drop(_stop);
        load.join().expect("load")
    });
    let failed = samples.iter().filter(|s| s.answer.is_err()).count();
    run.killed = format!("{failed} of {} failed", samples.len());
    if mesh == Mesh::Lbd {
        // The requests in flight to the task as it dies may fail; nothing
        // after lbd learns of it should.
        assert!(
            failed * 100 <= samples.len(),
            "{failed} of {} requests failed around a task's death",
            samples.len()
        );
    }

    // Scaling: every new task answers through the worker, which learns of
    // tasks only through Swarm's gossip.
    let t0 = Instant::now();
    manager
        .docker(&[
            "service",
            "scale",
            "--detach",
            &format!("{service}={SCALED}"),
        ])
        .expect("scale");
    let tasks = wait_service_running(manager, &service, SCALED, CONVERGE).expect("scaled");
    until_all_answer(
        &cluster.client,
        at(n2, HTTPD),
        &task_names(&tasks),
        600,
        TIMEOUT,
    );
    run.scaled = format!(
        "all {SCALED} answer through the worker {} after `service scale`",
        ms(t0.elapsed())
    );

    // A connection idle for longer than IPVS's (shortened) timeout.
    if mesh == Mesh::Ipvs {
        for node in &cluster.nodes {
            let t = IPVS_TCP_TIMEOUT_SECS.to_string();
            let out = Command::new("nsenter")
                .arg(format!("--net={}", node.dockerd.ingress_sbox().display()))
                .args(["ipvsadm", "--set", &t, &t, &t])
                .output()
                .expect("nsenter ipvsadm");
            assert!(out.status.success(), "ipvsadm --set: {out:?}");
        }
    }
    let idle_target = at(n1, ECHO);
    let kept = cluster.client.run(|| -> anyhow::Result<String> {
        let mut conn = TcpSession::connect(idle_target, TIMEOUT)?;
        let (first, _) = conn.request()?;
        sleep(IDLE);
        let (again, _) = conn.request()?;
        anyhow::ensure!(again == first, "answered by {again}, not {first}");
        Ok(first)
    });
    run.idle = match &kept {
        Ok(_) => "kept".to_string(),
        Err(e) => format!("broken ({})", short(&format!("{e:#}"))),
    };
    if mesh == Mesh::Lbd {
        assert!(kept.is_ok(), "idle connection: {kept:?}");
    }

    // Session affinity, turned on now so that it changes none of the steps
    // above. Docker has no setting for it: on the IPVS side it is set by
    // hand on each sandbox's virtual services.
    let t0 = Instant::now();
    match mesh {
        Mesh::Ipvs => {
            for node in &cluster.nodes {
                ipvs_persistence(node, AFFINITY_SECS);
            }
        }
        Mesh::Lbd => {
            let label = format!("lb.affinity_secs={AFFINITY_SECS}");
            add_labels(manager, &service, &[&label]);
        }
    }
    let through_manager = wait_until(CONVERGE, "one task for every connection", || {
        tasks_answering(cluster, at(n1, HTTPD)) == 1
    });
    let settled = ms(t0.elapsed());
    let via_worker = tasks_answering(cluster, at(n2, HTTPD));
    run.affinity = match through_manager {
        Ok(()) => {
            format!("1 task through the manager (after {settled}); {via_worker} through the worker")
        }
        Err(_) => format!(
            "{} tasks through the manager; {via_worker} through the worker",
            tasks_answering(cluster, at(n1, HTTPD))
        ),
    };
    if mesh == Mesh::Lbd {
        assert!(through_manager.is_ok(), "affinity: {}", run.affinity);
    }

    // Removal: the published port refuses through every node.
    let t0 = Instant::now();
    manager.docker(&["service", "rm", &service]).expect("rm");
    for node in [n1, n2] {
        let port = at(node, HTTPD);
        let gone = wait_until(CONVERGE, &format!("{port} refusing"), || {
            cluster.client.run(|| http_whoami(port, TIMEOUT).is_err())
        });
        assert!(gone.is_ok(), "{}: {gone:?}", mesh.name());
    }
    run.removed = format!(
        "refused through both nodes {} after `service rm`",
        ms(t0.elapsed())
    );
    run
}

/// What the mesh looks like on every node, for a failure's message: the
/// node's NAT rules, and the sandbox's rules and IPVS table.
fn mesh_state(cluster: &Cluster) -> String {
    let mut out = String::new();
    let run = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_else(|e| format!("{args:?}: {e}"))
    };
    let _ = writeln!(
        out,
        "lsmod: {}",
        run(&["sh", "-c", "lsmod | grep -E 'ip_vs|br_netfilter|vxlan'"])
    );
    for node in &cluster.nodes {
        let ns = node.ns.path();
        let sbox = node.dockerd.ingress_sbox();
        let in_ns = |path: &std::path::Path, cmd: &str| {
            run(&[
                "nsenter",
                &format!("--net={}", path.display()),
                "sh",
                "-c",
                cmd,
            ])
        };
        let _ = writeln!(
            out,
            "== {} node: {}\n== sandbox: {}\n== dockerd: {}",
            node.addr,
            in_ns(&ns, "iptables-save -t nat; iptables-save -t filter | grep -v '^#'; ip -br addr; ip route"),
            in_ns(&sbox, "ipvsadm -Ln; iptables-save -t mangle; iptables-save -t nat; ip -br addr; sysctl net.ipv4.ip_forward net.ipv4.vs.conntrack"),
            node.dockerd.log_tail(15)
        );
    }
    out
}

/// How many tasks answer [`AFFINITY_TRIES`] new connections from the
/// client (an error counts as no task).
fn tasks_answering(cluster: &Cluster, target: SocketAddr) -> usize {
    let names: std::collections::BTreeSet<String> = (0..AFFINITY_TRIES)
        .filter_map(|_| {
            cluster
                .client
                .run(|| http_whoami(target, TIMEOUT).ok())
                .map(|(name, _)| name)
        })
        .collect();
    names.len()
}

/// Persistence on every virtual service (`FWM n`) of a node's sandbox.
fn ipvs_persistence(node: &Node, secs: u32) {
    let sbox = format!("--net={}", node.dockerd.ingress_sbox().display());
    let ipvsadm = |args: &[&str]| {
        let out = Command::new("nsenter")
            .arg(&sbox)
            .arg("ipvsadm")
            .args(args)
            .output()
            .expect("nsenter ipvsadm");
        assert!(out.status.success(), "ipvsadm {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = ipvsadm(&["-Ln"]);
    let marks: Vec<&str> = table
        .lines()
        .filter_map(|l| l.strip_prefix("FWM "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(!marks.is_empty(), "no virtual service in\n{table}");
    for mark in marks {
        ipvsadm(&["-E", "-f", mark, "-s", "rr", "-p", &secs.to_string()]);
    }
}

fn node_id(node: &Node) -> String {
    node.dockerd
        .docker(&["info", "--format", "{{.Swarm.NodeID}}"])
        .expect("docker info")
        .trim()
        .to_owned()
}

/// `wrk` from the client for a few seconds: requests/s and the 99th
/// percentile of latency, or what went wrong.
fn wrk(cluster: &Cluster, target: SocketAddr) -> String {
    let out = cluster
        .client
        .command("wrk")
        .args(["-t2", "-c16", "-d8s", "--timeout", "2s", "--latency"])
        .arg(format!("http://{target}/"))
        .output()
        .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
    };
    let errors = text
        .lines()
        .find(|l| l.trim().starts_with("Socket errors") || l.contains("Non-2xx"))
        .map(|l| format!(", {}", l.trim()))
        .unwrap_or_default();
    match (field("Requests/sec:"), field("99%")) {
        (Some(rps), Some(p99)) => format!("{rps} req/s, p99 {p99}{errors}"),
        _ => format!("wrk failed: {}", short(&text)),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn short(s: &str) -> String {
    s.chars().take(80).collect::<String>().replace('|', "/")
}

fn print_table(ipvs: &Run, lbd: &Run) {
    let mut t = String::new();
    let idle_row = format!(
        "a connection idle {} s (IPVS timeout set to {IPVS_TCP_TIMEOUT_SECS} s; lbd at its \
         default 21600 s)",
        IDLE.as_secs()
    );
    let affinity_row = format!(
        "session affinity {AFFINITY_SECS} s (IPVS: `ipvsadm -E -p` by hand in each sandbox; \
         lbd: `service update --label-add lb.affinity_secs`): tasks answering \
         {AFFINITY_TRIES} new connections from one client"
    );
    let rows: [(&str, String, String); 8] = [
        (
            "published port reached through every node",
            ipvs.reach.join("; "),
            lbd.reach.join("; "),
        ),
        (
            "wrk through the worker, keep-alive (lb-http)",
            ipvs.wrk_keepalive.clone(),
            lbd.wrk_keepalive.clone(),
        ),
        (
            "wrk through the worker, a connection per request (busybox httpd)",
            ipvs.wrk_new_conn.clone(),
            lbd.wrk_new_conn.clone(),
        ),
        (
            "a task killed under load (requests through the worker, 10 ms apart)",
            ipvs.killed.clone(),
            lbd.killed.clone(),
        ),
        (
            &format!("scaling {REPLICAS} → {SCALED}"),
            ipvs.scaled.clone(),
            lbd.scaled.clone(),
        ),
        (&idle_row, ipvs.idle.clone(), lbd.idle.clone()),
        (&affinity_row, ipvs.affinity.clone(), lbd.affinity.clone()),
        ("`service rm`", ipvs.removed.clone(), lbd.removed.clone()),
    ];
    let _ = writeln!(t, "| | Docker's IPVS mesh | lbd |");
    let _ = writeln!(t, "| --- | --- | --- |");
    for (what, a, b) in rows {
        let _ = writeln!(t, "| {what} | {a} | {b} |");
    }
    for line in t.lines() {
        println!("{TABLE_PREFIX}{line}");
    }
}
