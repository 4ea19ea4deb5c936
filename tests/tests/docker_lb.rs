//! lbd against real Docker engines: labelled standalone containers, label
//! conflicts, the engine restarting under lbd, and the ports Swarm services
//! publish, on one node and across two. Every test starts its own dockerd
//! (or Swarm) in namespaces it creates and removes them, also on failure.
//! Needs root.
//!
//! Run with `--test-threads=1` (each test runs one or two engines, and the
//! timing assertions assume an otherwise idle machine), and with
//! `--nocapture` to see the measured convergence times.
//!
//! Standalone tests use this topology; Swarm tests use [`Cluster`]'s:
//!
//! ```text
//!   client ns                      node ns (dockerd + lbd)
//!   eth0 10.75.0.2 ------------- lbc0 10.75.0.1     docker0 172.17.0.1/16
//!   10.73.0.0/16 via 10.75.0.1                        containers 172.17.0.x
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use lb_tests::docker::{
    build_test_image, cleanup_stale, container_ip, http_whoami, until_all_answer,
    wait_service_running, Cluster, Dockerd, Node,
};
use lb_tests::lbd::Lbd;
use lb_tests::load::{until_stopped, Bounds, Sample, StopOnDrop};
use lb_tests::netns::{unique_name, Netns};
use lb_tests::process::wait_until;
use lb_tests::swarm::{create_service, lbd_for_node, task_names, wait_docker_connected, IMAGE};
use serde_json::Value;

const FRONTEND: &str = "10.73.0.10:80/tcp";
const NODE_IF: &str = "lbc0";
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 75, 0, 1);
const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 75, 0, 2);
/// One request; a flow that went to a dead backend fails within this.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Servers in fresh containers need a moment after `running` to listen.
const READY: Duration = Duration::from_secs(15);
const CONVERGE: Duration = Duration::from_secs(60);
/// What lbd must take to stop sending new flows to a stopped container.
const REMOVAL_BOUND: Duration = Duration::from_secs(1);
/// Bounds of one run of requests in the background.
const HAMMER_MAX_REQUESTS: usize = 5000;
const HAMMER_MAX_TIME: Duration = Duration::from_secs(30);
const HAMMER_PAUSE: Duration = Duration::from_millis(5);
/// The ingress overlay's subnet (Swarm's default): the mesh reaches tasks
/// over it, so the source they see must be in it.
const INGRESS_PREFIX: [u8; 3] = [10, 0, 0];
/// Where the standalone tests' labels may put frontends.
const LABEL_RANGE: &str = "10.73.0.0/16";

fn vip(frontend: &str) -> SocketAddr {
    frontend
        .trim_end_matches("/tcp")
        .parse()
        .unwrap_or_else(|e| panic!("frontend {frontend}: {e}"))
}

// ---------------------------------------------------------------------------
// Standalone engine

/// A node running dockerd and lbd, and a client routed to it. Fields drop
/// in order: lbd before the engine it watches, both before their namespaces.
struct Standalone {
    lbd: Option<Lbd>,
    dockerd: Dockerd,
    client: Netns,
    node: Netns,
    tag: String,
}

impl Standalone {
    fn new(tag: &str) -> Self {
        Self::with_daemon_config(tag, "{}\n")
    }

    fn with_daemon_config(tag: &str, daemon_json: &str) -> Self {
        cleanup_stale();
        let node = Netns::new(&unique_name(&format!("{tag}-n"))).expect("node namespace");
        let client = Netns::new(&unique_name(&format!("{tag}-c"))).expect("client namespace");
        node.ip(&[
            "link",
            "add",
            NODE_IF,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            client.name(),
        ])
        .unwrap();
        node.ip(&["addr", "add", &format!("{NODE_ADDR}/24"), "dev", NODE_IF])
            .unwrap();
        node.ip(&["link", "set", NODE_IF, "up"]).unwrap();
        client
            .ip(&["addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "eth0"])
            .unwrap();
        client.ip(&["link", "set", "eth0", "up"]).unwrap();
        client
            .ip(&[
                "route",
                "add",
                "10.73.0.0/16",
                "via",
                &NODE_ADDR.to_string(),
            ])
            .unwrap();
        let dockerd = Dockerd::start_with_config(&node, tag, daemon_json).expect("dockerd");
        build_test_image(&dockerd, IMAGE).expect("test image");
        Self {
            lbd: None,
            dockerd,
            client,
            node,
            tag: tag.to_owned(),
        }
    }

    /// Starts lbd on the node, watching its engine, and waits until it has
    /// the engine's first state.
    fn start_lbd(&mut self, config: &str) {
        self.start_lbd_with(config, &["--label-frontends", LABEL_RANGE]);
    }

    /// [`Self::start_lbd`] with these arguments instead of the label range.
    fn start_lbd_with(&mut self, config: &str, extra: &[&str]) {
        let host = format!("unix://{}", self.dockerd.socket().display());
        let mut args = vec!["--docker", "--docker-host", &host];
        args.extend_from_slice(extra);
        let lbd = Lbd::start_with(&self.node, &self.tag, config, &[NODE_IF, "docker0"], &args)
            .expect("lbd");
        wait_docker_connected(&lbd, true);
        self.lbd = Some(lbd);
    }

    fn lbd(&self) -> &Lbd {
        self.lbd.as_ref().expect("lbd was started")
    }

    /// Runs the test image as `name` (also its hostname) with `labels`,
    /// waits until its server answers and returns its address.
    fn run(&self, name: &str, labels: &[(&str, &str)], extra: &[&str]) -> Ipv4Addr {
        let label_args: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args = vec!["run", "-d", "--name", name, "--hostname", name];
        for l in &label_args {
            args.extend(["--label", l.as_str()]);
        }
        args.extend_from_slice(extra);
        args.push(IMAGE);
        self.dockerd.docker(&args).expect("docker run");
        self.wait_serving(name)
    }

    /// Waits until container `name` answers on its address, from the node.
    fn wait_serving(&self, name: &str) -> Ipv4Addr {
        let ip = container_ip(&self.dockerd, name, "bridge").expect("container address");
        let (answered, _) = self
            .node
            .run(|| whoami_when_ready(SocketAddr::from((ip, 80))));
        assert_eq!(answered, name, "{ip} is not {name}");
        ip
    }
}

fn labelled<'a>(frontend: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut labels = vec![("lb.frontend", frontend), ("lb.port", "80")];
    labels.extend_from_slice(extra);
    labels
}

fn whoami_when_ready(target: SocketAddr) -> (String, SocketAddr) {
    lb_tests::docker::whoami_when_ready(target, READY, TIMEOUT)
}

// ---------------------------------------------------------------------------
// lbd's status

fn status(lbd: &Lbd) -> Value {
    lbd.status().expect("lbctl status --json")
}

fn service_for<'a>(status: &'a Value, frontend: &str) -> Option<&'a Value> {
    status["services"]
        .as_array()?
        .iter()
        .find(|s| s["frontend"] == frontend)
}

fn backends_of(status: &Value, frontend: &str) -> BTreeSet<String> {
    service_for(status, frontend)
        .and_then(|s| s["backends"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|b| b["address"].as_str().map(String::from))
        .collect()
}

fn backend_set(addrs: &[Ipv4Addr]) -> BTreeSet<String> {
    addrs.iter().map(|a| format!("{a}:80")).collect()
}

/// Waits until lbd serves exactly `want` behind `frontend`; returns when
/// it first saw it.
fn wait_backends(lbd: &Lbd, frontend: &str, want: &BTreeSet<String>) -> SystemTime {
    let mut last = BTreeSet::new();
    let mut at = SystemTime::now();
    let done = wait_until(Duration::from_secs(10), "lbd's backends", || {
        last = lbd
            .status()
            .map(|s| backends_of(&s, frontend))
            .unwrap_or_default();
        at = SystemTime::now();
        last == *want
    });
    if let Err(e) = done {
        panic!(
            "{e:#}: {frontend} has {last:?}, want {want:?}\nstatus: {:#}",
            status(lbd)
        );
    }
    at
}

/// Prints lbd's event-to-datapath times, for the report.
fn report_convergence(test: &str, lbd: &Lbd) -> Value {
    let c = status(lbd)["convergence"].clone();
    eprintln!("convergence [{test}]: {c}");
    c
}

// ---------------------------------------------------------------------------
// Traffic

/// `n` requests from `client` to `target`, each on a new connection; every
/// one must be answered. Counts the answers per hostname and collects the
/// client addresses the servers saw.
fn spread(
    client: &Netns,
    target: SocketAddr,
    n: usize,
) -> (BTreeMap<String, usize>, BTreeSet<IpAddr>) {
    client.run(|| {
        let mut seen = BTreeMap::new();
        let mut peers = BTreeSet::new();
        for i in 0..n {
            let (name, peer) = http_whoami(target, TIMEOUT)
                .unwrap_or_else(|e| panic!("request {i} of {n} to {target}: {e:#}"));
            *seen.entry(name).or_insert(0) += 1;
            peers.insert(peer.ip());
        }
        (seen, peers)
    })
}

/// Requests `target` from `client` back to back until `stop` is set.
fn hammer(client: &Netns, target: SocketAddr, stop: &AtomicBool) -> Vec<Sample> {
    let bounds = Bounds {
        max_requests: HAMMER_MAX_REQUESTS,
        max_time: HAMMER_MAX_TIME,
        pause: HAMMER_PAUSE,
    };
    until_stopped(client, stop, bounds, || {
        http_whoami(target, TIMEOUT).map(|(name, _)| name)
    })
}

/// Signed milliseconds from `origin` to `t`.
fn ms_after(t: SystemTime, origin: SystemTime) -> f64 {
    match t.duration_since(origin) {
        Ok(d) => d.as_secs_f64() * 1e3,
        Err(e) => -e.duration().as_secs_f64() * 1e3,
    }
}

fn connection_refused(target: SocketAddr) -> Result<(), String> {
    match http_whoami(target, TIMEOUT) {
        Ok((name, _)) => Err(format!("{name} answered")),
        Err(e) => match e.downcast_ref::<std::io::Error>().map(|e| e.kind()) {
            Some(ErrorKind::ConnectionRefused) => Ok(()),
            _ => Err(format!("{e:#}")),
        },
    }
}

// ---------------------------------------------------------------------------
// Standalone tests

#[test]
fn labelled_containers_are_balanced_and_followed_as_they_stop_and_start() {
    let mut env = Standalone::new("dlab");
    env.start_lbd("");
    let vip = vip(FRONTEND);
    let labels = labelled(FRONTEND, &[]);
    let mut addrs = BTreeMap::new();
    for name in ["web1", "web2", "web3"] {
        addrs.insert(name, env.run(name, &labels, &[]));
    }
    let all: Vec<Ipv4Addr> = addrs.values().copied().collect();
    wait_backends(env.lbd(), FRONTEND, &backend_set(&all));
    let s = status(env.lbd());
    let service = service_for(&s, FRONTEND).unwrap();
    assert_eq!(service["source"], "docker:labels", "{service:#}");
    assert_eq!(service["name"], FRONTEND, "{service:#}");
    assert!(
        service["backends"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["state"] == "active"),
        "{service:#}"
    );

    let (seen, peers) = spread(&env.client, vip, 60);
    let names: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
    assert_eq!(names, BTreeSet::from(["web1", "web2", "web3"]), "{seen:?}");
    assert_eq!(
        peers,
        BTreeSet::from([IpAddr::V4(CLIENT_ADDR)]),
        "containers must see the client's own address"
    );

    // Stop web2 while the client keeps opening connections.
    let gone = format!("{}:80", addrs["web2"]);
    let stop = AtomicBool::new(false);
    let before_stop = SystemTime::now();
    let (samples, removed_at) = std::thread::scope(|s| {
        let load = s.spawn(|| hammer(&env.client, vip, &stop));
        let _stop = StopOnDrop(&stop);
        sleep(Duration::from_millis(500));
        env.dockerd.docker(&["stop", "web2"]).expect("docker stop");
        let mut removed_at = None;
        let removed = wait_until(Duration::from_secs(5), "web2 to leave lbd", || {
            let s = env.lbd().status();
            let gone_now = s.is_ok_and(|s| {
                let b = backends_of(&s, FRONTEND);
                b.len() == 2 && !b.contains(&gone)
            });
            if gone_now {
                removed_at = Some(SystemTime::now());
            }
            gone_now
        });
        // Long enough past the bound to show that nothing fails after it.
        sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        let samples = load.join().expect("client thread");
        removed.expect("lbd never removed the stopped container");
        (samples, removed_at.expect("set on success"))
    });
    let died = env.dockerd.event_time("web2", "die", before_stop);
    let bound = died + REMOVAL_BOUND;
    let removed_ms = ms_after(removed_at, died);
    let last_web2 = samples
        .iter()
        .filter(|s| s.answer.as_deref() == Ok("web2"))
        .map(|s| ms_after(s.at, died))
        .fold(f64::NEG_INFINITY, f64::max);
    let failures: Vec<(f64, &str)> = samples
        .iter()
        .filter_map(|s| {
            s.answer
                .as_ref()
                .err()
                .map(|e| (ms_after(s.at, died), e.as_str()))
        })
        .collect();
    let after_bound = samples.iter().filter(|s| s.at > bound).count();
    eprintln!(
        "stop web2: {} requests; lbd removed it {removed_ms:.1} ms after the die event \
         (polled through lbctl); last answer from web2 started at {last_web2:+.1} ms; \
         {} failed, started at {:?} ms; {after_bound} requests started after die + 1 s",
        samples.len(),
        failures.len(),
        failures
            .iter()
            .map(|(t, _)| format!("{t:+.0}"))
            .collect::<Vec<_>>()
    );
    assert!(
        removed_at < bound,
        "lbd removed web2 {removed_ms:.1} ms after it died"
    );
    let late: Vec<&(f64, &str)> = failures
        .iter()
        .filter(|(t, _)| *t > REMOVAL_BOUND.as_secs_f64() * 1e3)
        .collect();
    assert!(
        late.is_empty(),
        "requests started more than 1 s after web2 died failed: {late:?}"
    );
    assert!(
        samples
            .iter()
            .filter(|s| s.at > bound)
            .all(|s| s.answer.as_deref() != Ok("web2")),
        "web2 answered after it died"
    );
    assert!(
        after_bound >= 10,
        "only {after_bound} requests after the bound"
    );

    // A new container joins.
    let before_start = SystemTime::now();
    let web4 = env.run("web4", &labels, &[]);
    let listed_at = wait_backends(
        env.lbd(),
        FRONTEND,
        &backend_set(&[addrs["web1"], addrs["web3"], web4]),
    );
    let started = env.dockerd.event_time("web4", "start", before_start);
    eprintln!(
        "start web4: listed by lbd {:.1} ms after the start event (polled through lbctl)",
        ms_after(listed_at, started)
    );
    let (seen, _) = spread(&env.client, vip, 60);
    let names: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
    assert_eq!(names, BTreeSet::from(["web1", "web3", "web4"]), "{seen:?}");

    let c = report_convergence("labels", env.lbd());
    assert!(
        c["samples"].as_u64().unwrap_or(0) >= 2,
        "convergence was not measured for the stop and the start: {c}"
    );
}

#[test]
fn a_label_cannot_take_a_frontend_the_config_owns() {
    let mut env = Standalone::new("dconf");
    let owner = env.run("owner", &[], &[]);
    let config = format!(
        "[[service]]\nname = \"web\"\nfrontend = \"{FRONTEND}\"\nbackends = [\"{owner}:80\"]\n"
    );
    env.start_lbd(&config);

    // One container claims the configured frontend, another a free one:
    // the second shows that labels are being read at all.
    let other_fe = "10.73.0.11:80/tcp";
    env.run("intruder", &labelled(FRONTEND, &[]), &[]);
    let other = env.run("other", &labelled(other_fe, &[]), &[]);
    wait_backends(env.lbd(), other_fe, &backend_set(&[other]));
    let mut s = Value::Null;
    let found = wait_until(Duration::from_secs(10), "the conflict to be listed", || {
        s = status(env.lbd());
        s["conflicts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["frontend"] == FRONTEND))
    });
    assert!(found.is_ok(), "no conflict for {FRONTEND}: {s:#}");
    let conflict = s["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["frontend"] == FRONTEND)
        .unwrap();
    let rejected = conflict["rejected"].as_str().unwrap_or_default();
    let owner_text = conflict["owner"].as_str().unwrap_or_default();
    assert!(rejected.contains("docker:labels"), "{conflict}");
    assert!(owner_text.starts_with("web (config:"), "{conflict}");

    let service = service_for(&s, FRONTEND).unwrap();
    assert_eq!(service["name"], "web", "{service:#}");
    assert!(
        service["source"]
            .as_str()
            .is_some_and(|src| src.starts_with("config:")),
        "{service:#}"
    );
    assert_eq!(backends_of(&s, FRONTEND), backend_set(&[owner]));

    let (seen, _) = spread(&env.client, vip(FRONTEND), 40);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["owner"], "{seen:?}");
    let (seen, _) = spread(&env.client, vip(other_fe), 20);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["other"], "{seen:?}");

    // Two containers name different services for one frontend: the older
    // keeps it. Names sort the other way round, so that only age decides;
    // the engine's creation times have a resolution of one second.
    let contested = "10.73.0.12:80/tcp";
    let older = env.run(
        "zz-older",
        &labelled(contested, &[("lb.service", "alpha")]),
        &[],
    );
    sleep(Duration::from_millis(1100));
    env.run(
        "aa-younger",
        &labelled(contested, &[("lb.service", "beta")]),
        &[],
    );
    let found = wait_until(Duration::from_secs(10), "aa-younger to be rejected", || {
        s = status(env.lbd());
        s["docker"]["rejected"].as_array().is_some_and(|r| {
            r.iter()
                .any(|r| r.as_str().is_some_and(|r| r.starts_with("aa-younger:")))
        })
    });
    assert!(found.is_ok(), "aa-younger not rejected: {:#}", s["docker"]);
    let service = service_for(&s, contested).expect("the contested frontend is served");
    assert_eq!(service["name"], "alpha", "{service:#}");
    assert_eq!(backends_of(&s, contested), backend_set(&[older]));
    let (seen, _) = spread(&env.client, vip(contested), 20);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["zz-older"], "{seen:?}");
}

#[test]
fn labels_take_only_allowed_frontends_and_never_the_nodes_addresses() {
    let mut env = Standalone::new("dpol");
    // The node's own address is inside an allowed range, so that only its
    // being the node's refuses it.
    env.start_lbd_with(
        "",
        &[
            "--label-frontends",
            "10.73.0.0/24",
            "--label-frontends",
            "10.75.0.0/24",
        ],
    );
    let inside = "10.73.0.10:80/tcp";
    let web = env.run("web", &labelled(inside, &[]), &[]);
    wait_backends(env.lbd(), inside, &backend_set(&[web]));
    let (seen, _) = spread(&env.client, vip(inside), 10);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["web"], "{seen:?}");

    let outside = "10.74.0.10:80/tcp";
    let ssh = format!("{NODE_ADDR}:22/tcp");
    env.run("outside", &labelled(outside, &[]), &[]);
    env.run("ssh", &labelled(&ssh, &[]), &[]);
    let refused = |s: &Value| -> Vec<String> {
        s["docker"]["rejected"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(String::from))
            .collect()
    };
    let mut s = Value::Null;
    let listed = wait_until(
        Duration::from_secs(10),
        "both refusals to be listed",
        || {
            s = status(env.lbd());
            refused(&s).len() == 2
        },
    );
    assert!(listed.is_ok(), "{:#}", s["docker"]);
    // Another container of the allowed frontend, so another resync: with
    // the frontend now on lo, the allowed label must not be taken for a
    // node address, and the refusals must not be logged again.
    let web2 = env.run("web2", &labelled(inside, &[]), &[]);
    wait_backends(env.lbd(), inside, &backend_set(&[web, web2]));
    let s = status(env.lbd());
    let refused = refused(&s);
    assert_eq!(refused.len(), 2, "{refused:#?}");
    let outside_reason = refused
        .iter()
        .find(|r| r.starts_with("outside: "))
        .unwrap_or_else(|| panic!("{refused:#?}"));
    assert!(
        outside_reason.contains("outside the ranges allowed for labels")
            && outside_reason.contains("--label-frontends"),
        "{outside_reason}"
    );
    let ssh_reason = refused
        .iter()
        .find(|r| r.starts_with("ssh: "))
        .unwrap_or_else(|| panic!("{refused:#?}"));
    assert!(
        ssh_reason.contains("is an address of this node"),
        "{ssh_reason}"
    );
    assert!(service_for(&s, outside).is_none(), "{s:#}");
    assert!(service_for(&s, &ssh).is_none(), "{s:#}");

    // Only the allowed frontend was made local (lbd's routes, proto 76).
    let lo = env
        .node
        .sh("ip route show table local proto 76")
        .expect("ip route");
    let lo = String::from_utf8_lossy(&lo.stdout).into_owned();
    assert!(lo.contains("local 10.73.0.10 "), "{lo}");
    assert!(!lo.contains("10.74.0.10"), "{lo}");
    assert!(!lo.contains(&NODE_ADDR.to_string()), "{lo}");
    let log = env.lbd().log();
    for name in ["outside", "ssh"] {
        let said = log
            .lines()
            .filter(|l| l.contains(&format!("container {name} refused")))
            .count();
        assert_eq!(said, 1, "{name}'s refusal logged {said} times:\n{log}");
    }
    // The text status shows them too.
    let text = lb_tests::lbd::lbctl(&env.lbd().socket, &["status"]).expect("lbctl status");
    assert!(text.contains("docker: rejected ssh: "), "{text}");
    let (seen, _) = spread(&env.client, vip(inside), 20);
    let names: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
    assert_eq!(names, BTreeSet::from(["web", "web2"]), "{seen:?}");
}

#[test]
fn without_an_allowed_range_every_label_is_refused() {
    let mut env = Standalone::new("dnone");
    env.start_lbd_with("", &[]);
    env.run("web", &labelled(FRONTEND, &[]), &[]);
    let mut s = Value::Null;
    let refused = wait_until(Duration::from_secs(10), "web to be refused", || {
        s = status(env.lbd());
        s["docker"]["rejected"].as_array().is_some_and(|r| {
            r.iter().any(|r| {
                r.as_str()
                    .is_some_and(|r| r.starts_with("web: ") && r.contains("no address range"))
            })
        })
    });
    assert!(refused.is_ok(), "{:#}", s["docker"]);
    assert!(service_for(&s, FRONTEND).is_none(), "{s:#}");

    // Allowing a range in the config file takes effect on reload.
    env.lbd()
        .reload(&format!(
            "[labels]\nfrontend_ranges = [\"{LABEL_RANGE}\"]\n"
        ))
        .expect("reload");
    let web = container_ip(&env.dockerd, "web", "bridge").expect("web's address");
    wait_backends(env.lbd(), FRONTEND, &backend_set(&[web]));
    let (seen, _) = spread(&env.client, vip(FRONTEND), 10);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["web"], "{seen:?}");
}

/// What a status poller saw: whether lbd was connected to the engine and
/// which backends it served, each time it changed.
fn watch_status(lbd: &Lbd, stop: &AtomicBool) -> Vec<(SystemTime, bool, BTreeSet<String>)> {
    let mut seen: Vec<(SystemTime, bool, BTreeSet<String>)> = Vec::new();
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) && start.elapsed() < HAMMER_MAX_TIME * 2 {
        if let Ok(s) = lbd.status() {
            let connected = s["docker"]["connected"] == true;
            let backends = backends_of(&s, FRONTEND);
            if seen
                .last()
                .is_none_or(|(_, c, b)| *c != connected || *b != backends)
            {
                seen.push((SystemTime::now(), connected, backends));
            }
        }
        sleep(Duration::from_millis(20));
    }
    seen
}

fn describe_status_log(
    log: &[(SystemTime, bool, BTreeSet<String>)],
    origin: SystemTime,
) -> Vec<String> {
    log.iter()
        .map(|(t, c, b)| {
            format!(
                "{:+.0} ms: connected={c} backends={b:?}",
                ms_after(*t, origin)
            )
        })
        .collect()
}

#[test]
fn engine_restart_under_lbd_is_resynced() {
    let mut env = Standalone::new("drst");
    env.start_lbd("");
    let labels = labelled(FRONTEND, &[]);
    let names = ["web1", "web2", "web3"];
    let before: Vec<Ipv4Addr> = names
        .iter()
        .map(|n| env.run(n, &labels, &["--restart", "always"]))
        .collect();
    wait_backends(env.lbd(), FRONTEND, &backend_set(&before));
    let (seen, _) = spread(&env.client, vip(FRONTEND), 30);
    assert_eq!(seen.len(), 3, "{seen:?}");

    // The engine stops its containers, goes away and comes back with them.
    let stop = AtomicBool::new(false);
    let t0 = SystemTime::now();
    let (log, samples) = std::thread::scope(|s| {
        let lbd = env.lbd.as_ref().unwrap();
        let watcher = s.spawn(|| watch_status(lbd, &stop));
        let client = &env.client;
        let load = s.spawn(|| hammer(client, vip(FRONTEND), &stop));
        let _stop = StopOnDrop(&stop);
        let restarted = env.dockerd.restart();
        // Long enough for lbd to reconnect and the containers to return.
        let connected_again = wait_until(Duration::from_secs(10), "lbd to reconnect", || {
            lbd.status().is_ok_and(|s| s["docker"]["connected"] == true)
        })
        .is_ok();
        sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        let log = watcher.join().expect("status thread");
        let samples = load.join().expect("client thread");
        restarted.expect("dockerd restart");
        assert!(connected_again, "lbd did not reconnect: {}", lbd.log());
        (log, samples)
    });
    let failed = samples.iter().filter(|s| s.answer.is_err()).count();
    eprintln!(
        "engine restart: {} requests, {failed} failed; lbd's view:\n  {}",
        samples.len(),
        describe_status_log(&log, t0).join("\n  ")
    );
    let down = log.iter().position(|(_, c, _)| !c);
    assert!(
        down.is_some(),
        "lbd never reported the engine as disconnected"
    );
    assert!(
        log[down.unwrap()..].iter().any(|(_, c, _)| *c),
        "lbd did not report the engine as connected again"
    );

    // The containers came back (perhaps at other addresses): lbd serves
    // exactly them.
    let after: Vec<Ipv4Addr> = names.iter().map(|n| env.wait_serving(n)).collect();
    wait_backends(env.lbd(), FRONTEND, &backend_set(&after));
    let (seen, _) = spread(&env.client, vip(FRONTEND), 30);
    assert_eq!(seen.len(), 3, "{seen:?}");

    // And it follows the engine's events again.
    env.dockerd.docker(&["stop", "web1"]).unwrap();
    wait_backends(env.lbd(), FRONTEND, &backend_set(&after[1..]));
    let (seen, _) = spread(&env.client, vip(FRONTEND), 30);
    let names: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
    assert_eq!(names, BTreeSet::from(["web2", "web3"]), "{seen:?}");
    report_convergence("restart", env.lbd());
}

/// With `live-restore` the containers outlive the engine: lbd must keep
/// serving them from its last state while the engine is away.
#[test]
fn requests_keep_being_answered_while_the_engine_is_away() {
    let mut env = Standalone::with_daemon_config("dlive", "{\"live-restore\": true}\n");
    env.start_lbd("");
    let labels = labelled(FRONTEND, &[]);
    let names = ["web1", "web2", "web3"];
    let addrs: Vec<Ipv4Addr> = names.iter().map(|n| env.run(n, &labels, &[])).collect();
    let all = backend_set(&addrs);
    wait_backends(env.lbd(), FRONTEND, &all);
    let resyncs_before = status(env.lbd())["docker"]["resyncs"].as_u64().unwrap_or(0);

    let stop = AtomicBool::new(false);
    let t0 = SystemTime::now();
    let (log, samples) = std::thread::scope(|s| {
        let lbd = env.lbd.as_ref().unwrap();
        let watcher = s.spawn(|| watch_status(lbd, &stop));
        let client = &env.client;
        let load = s.spawn(|| hammer(client, vip(FRONTEND), &stop));
        let _stop = StopOnDrop(&stop);
        sleep(Duration::from_millis(300));
        let restarted = env.dockerd.restart_live();
        let connected_again = wait_until(Duration::from_secs(10), "lbd to reconnect", || {
            lbd.status().is_ok_and(|s| s["docker"]["connected"] == true)
        })
        .is_ok();
        sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let log = watcher.join().expect("status thread");
        let samples = load.join().expect("client thread");
        restarted.expect("dockerd restart");
        assert!(connected_again, "lbd did not reconnect: {}", lbd.log());
        (log, samples)
    });
    let failures: Vec<(f64, &str)> = samples
        .iter()
        .filter_map(|s| {
            s.answer
                .as_ref()
                .err()
                .map(|e| (ms_after(s.at, t0), e.as_str()))
        })
        .collect();
    let answered: BTreeSet<&str> = samples
        .iter()
        .filter_map(|s| s.answer.as_deref().ok())
        .collect();
    eprintln!(
        "live-restore restart: {} requests, {} failed; lbd's view:\n  {}",
        samples.len(),
        failures.len(),
        describe_status_log(&log, t0).join("\n  ")
    );
    let down: Vec<&BTreeSet<String>> = log
        .iter()
        .filter(|(_, c, _)| !c)
        .map(|(_, _, b)| b)
        .collect();
    assert!(
        !down.is_empty(),
        "lbd never reported the engine as disconnected"
    );
    assert!(
        down.iter().all(|b| **b == all),
        "lbd changed its backends while the engine was away: {down:?}"
    );
    assert!(failures.is_empty(), "requests failed: {failures:?}");
    assert_eq!(
        answered,
        BTreeSet::from(names),
        "not every container answered during the restart"
    );

    wait_docker_connected(env.lbd(), true);
    let resyncs = status(env.lbd())["docker"]["resyncs"].as_u64().unwrap_or(0);
    assert!(resyncs > resyncs_before, "no resync after reconnecting");
    env.dockerd.docker(&["stop", "web1"]).unwrap();
    wait_backends(env.lbd(), FRONTEND, &backend_set(&addrs[1..]));
    let (seen, _) = spread(&env.client, vip(FRONTEND), 30);
    let names: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
    assert_eq!(names, BTreeSet::from(["web2", "web3"]), "{seen:?}");
    // Live-restored containers would outlive the engine's shutdown.
    env.dockerd
        .docker(&["rm", "-f", "web1", "web2", "web3"])
        .unwrap();
}

// ---------------------------------------------------------------------------
// Swarm

/// The node's own address on the ingress network (its `ingress_sbox`),
/// which tasks see as the client of every request through the mesh.
fn sbox_ingress_addr(d: &Dockerd) -> IpAddr {
    let net = d.api_json("/networks/ingress").expect("ingress network");
    let cidr = net["Containers"]["ingress-sbox"]["IPv4Address"]
        .as_str()
        .unwrap_or_else(|| panic!("no ingress-sbox on the ingress network: {net:#}"));
    cidr.split('/').next().unwrap().parse().unwrap()
}

fn swarm_services(status: &Value) -> Vec<&Value> {
    status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["source"] == "docker:swarm")
        .collect()
}

/// Waits (bounded) until `target` answers at all through the mesh.
fn wait_mesh_answers(client: &Netns, target: SocketAddr, lbd: &[&Lbd]) {
    let mut last = String::new();
    let answered = client.run(|| {
        wait_until(
            Duration::from_secs(20),
            &format!("{target} to answer"),
            || match http_whoami(target, TIMEOUT) {
                Ok(_) => true,
                Err(e) => {
                    last = format!("{e:#}");
                    sleep(Duration::from_millis(100));
                    false
                }
            },
        )
    });
    if let Err(e) = answered {
        let views: Vec<String> = lbd
            .iter()
            .map(|l| format!("status: {:#}\nlog:\n{}", status(l), l.log()))
            .collect();
        panic!("{e:#}; last error: {last}\n{}", views.join("\n"));
    }
}

#[test]
fn single_node_swarm_publishes_ports_through_lbd() {
    let cluster = Cluster::new(1).expect("cluster");
    let node = &cluster.nodes[0];
    let d = cluster.manager();
    cluster.build_image(IMAGE).expect("image");
    // SIGUSR1, which the image's init ignores: a stopping task keeps
    // serving until the grace period ends, as a real server finishing its
    // requests would, so removal can be seen to spare established flows.
    create_service(
        d,
        "web",
        3,
        "8080:80",
        &["--stop-signal", "SIGUSR1", "--stop-grace-period", "5s"],
    );
    let tasks = wait_service_running(d, "web", 3, CONVERGE).expect("3 tasks");
    let target = SocketAddr::from((node.addr, 8080));

    // Without lbd the published port is closed: no IPVS, no mesh.
    cluster.client.run(|| {
        for _ in 0..3 {
            if let Err(e) = connection_refused(target) {
                panic!("without lbd, {target}: {e} (expected a refused connection)");
            }
        }
    });

    let lbd = lbd_for_node(node, "sw1");
    let t0 = Instant::now();
    wait_mesh_answers(&cluster.client, target, &[&lbd]);
    let first_answer = t0.elapsed();
    let want = task_names(&tasks);
    let seen = until_all_answer(&cluster.client, target, &want, 60, TIMEOUT);
    let (spread60, peers) = spread(&cluster.client, target, 60);
    eprintln!(
        "swarm: first answer {:.0} ms after lbd was up; 60 requests: {spread60:?}",
        first_answer.as_secs_f64() * 1e3
    );
    assert_eq!(
        spread60.keys().cloned().collect::<BTreeSet<_>>(),
        want,
        "{seen:?}"
    );
    assert_eq!(
        peers,
        BTreeSet::from([sbox_ingress_addr(d)]),
        "tasks must see the node's ingress_sbox address"
    );

    // Scale out: the new tasks get flows too.
    let t0 = Instant::now();
    d.docker(&["service", "scale", "--detach", "web=5"])
        .unwrap();
    let tasks = wait_service_running(d, "web", 5, CONVERGE).expect("5 tasks");
    let running = t0.elapsed();
    let want = task_names(&tasks);
    let tasks_before_rm = want.clone();
    let seen = until_all_answer(&cluster.client, target, &want, 200, TIMEOUT);
    eprintln!(
        "swarm scale 3 -> 5: tasks running after {:.0} ms, all 5 answered after {:.0} ms: {seen:?}",
        running.as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64() * 1e3
    );

    // A port published over UDP is balanced over UDP (a manager reads the
    // protocol from the service; the mesh's own view does not say it).
    create_service(d, "dns", 2, "published=5353,target=5353,protocol=udp", &[]);
    let dns_tasks = wait_service_running(d, "dns", 2, CONVERGE).expect("2 dns tasks");
    let want = task_names(&dns_tasks);
    let udp_target = SocketAddr::from((node.addr, 5353));
    let mut answered = BTreeSet::new();
    let mut last = String::new();
    cluster.client.run(|| {
        // Bounded: 300 datagrams, 300 ms each at most.
        for _ in 0..300 {
            match lb_tests::echo::udp_request(udp_target, Duration::from_millis(300)) {
                Ok((reply, _)) => {
                    answered.insert(reply.split_whitespace().next().unwrap_or("").to_owned());
                }
                Err(e) => last = format!("{e:#}"),
            }
            if answered == want {
                break;
            }
        }
    });
    assert_eq!(
        answered,
        want,
        "UDP through {udp_target}; last error: {last}\nstatus: {:#}",
        status(&lbd)
    );
    let s = status(&lbd);
    assert!(
        swarm_services(&s)
            .iter()
            .any(|svc| svc["frontend"] == format!("{}:5353/udp", node.addr)),
        "{s:#}"
    );
    d.docker(&["service", "rm", "dns"]).unwrap();

    let s = status(&lbd);
    assert_eq!(s["docker"]["swarm"], "manager", "{:#}", s["docker"]);
    assert!(
        !swarm_services(&s).is_empty(),
        "no docker:swarm service: {s:#}"
    );
    report_convergence("swarm", &lbd);

    // Removed: the port takes no new connection within a second, while a
    // connection made before (to a task that is still stopping) goes on;
    // lbd lets go of the service once the tasks are gone.
    let mut established = cluster
        .client
        .run(|| std::net::TcpStream::connect_timeout(&target, TIMEOUT))
        .expect("a connection before the removal");
    d.docker(&["service", "rm", "web"]).unwrap();
    let removed = Instant::now();
    let closed = cluster.client.run(|| {
        wait_until(REMOVAL_BOUND, "the published port to refuse", || {
            connection_refused(target).is_ok()
        })
    });
    let closed_after = removed.elapsed();
    closed.unwrap_or_else(|e| panic!("{e:#}\nstatus: {:#}", status(&lbd)));
    eprintln!(
        "swarm service rm: new connections refused {:.0} ms after `docker service rm` returned",
        closed_after.as_secs_f64() * 1e3
    );
    {
        use std::io::{Read, Write};
        established.set_read_timeout(Some(TIMEOUT)).unwrap();
        established
            .write_all(b"GET / HTTP/1.0\r\nHost: lb-test\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        established
            .read_to_string(&mut answer)
            .expect("the established connection after the removal");
        assert!(
            tasks_before_rm.iter().any(|t| answer.contains(t.as_str())),
            "{answer:?} from {tasks_before_rm:?}"
        );
    }
    let t0 = Instant::now();
    let mut s = Value::Null;
    let mut trace: Vec<String> = Vec::new();
    let dropped = wait_until(Duration::from_secs(20), "lbd to drop web", || {
        s = status(&lbd);
        let now: Vec<String> = swarm_services(&s)
            .iter()
            .map(|svc| {
                let n = svc["backends"].as_array().map_or(0, Vec::len);
                format!("{}x{n}", svc["frontend"].as_str().unwrap_or("?"))
            })
            .collect();
        let line = now.join(" ");
        if trace.last().is_none_or(|l| !l.ends_with(&line)) {
            trace.push(format!(
                "+{:.0} ms: {line}",
                t0.elapsed().as_secs_f64() * 1e3
            ));
        }
        now.is_empty()
    });
    assert!(
        dropped.is_ok(),
        "swarm services left 20 s after service rm: {s:#}"
    );
    eprintln!(
        "swarm service rm: lbd dropped it after {:.0} ms; lbd's services (frontend x backends):\n  {}",
        t0.elapsed().as_secs_f64() * 1e3,
        trace.join("\n  ")
    );
    cluster.client.run(|| {
        for _ in 0..3 {
            if let Err(e) = connection_refused(target) {
                panic!("{target} after service rm: {e} (expected a refused connection)");
            }
        }
    });
}

#[test]
fn two_node_swarm_reaches_tasks_through_either_node() {
    let cluster = Cluster::new(2).expect("cluster");
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let manager = cluster.manager();
    cluster.build_image(IMAGE).expect("image");
    let on = |node: &Node| format!("node.hostname=={}", node.dockerd.hostname());
    create_service(manager, "on2", 2, "8081:80", &["--constraint", &on(n2)]);
    create_service(manager, "on1", 2, "8082:80", &["--constraint", &on(n1)]);
    let on2 = wait_service_running(manager, "on2", 2, CONVERGE).expect("on2");
    let on1 = wait_service_running(manager, "on1", 2, CONVERGE).expect("on1");
    let id = |d: &Dockerd| {
        d.docker(&["info", "--format", "{{.Swarm.NodeID}}"])
            .unwrap()
            .trim()
            .to_owned()
    };
    assert!(on2.iter().all(|t| t.node_id == id(&n2.dockerd)), "{on2:?}");
    assert!(on1.iter().all(|t| t.node_id == id(&n1.dockerd)), "{on1:?}");

    let lbd1 = lbd_for_node(n1, "sw2a");
    let lbd2 = lbd_for_node(n2, "sw2b");
    let both = [&lbd1, &lbd2];

    for (entry, port, tasks, what) in [
        (n1, 8081, &on2, "remote tasks through the manager"),
        (n2, 8082, &on1, "remote tasks through the worker"),
        (n1, 8082, &on1, "local tasks on the manager"),
        (n2, 8081, &on2, "local tasks on the worker"),
    ] {
        let target = SocketAddr::from((entry.addr, port));
        let t0 = Instant::now();
        wait_mesh_answers(&cluster.client, target, &both);
        let want = task_names(tasks);
        let seen = until_all_answer(&cluster.client, target, &want, 60, TIMEOUT);
        let (_, peers) = spread(&cluster.client, target, 10);
        eprintln!(
            "swarm 2 nodes, {what}: {target} answered by all tasks after {:.0} ms: {seen:?}",
            t0.elapsed().as_secs_f64() * 1e3
        );
        assert_eq!(
            peers,
            BTreeSet::from([sbox_ingress_addr(&entry.dockerd)]),
            "{what}: tasks must see the entry node's ingress_sbox address"
        );
        assert!(
            peers.iter().all(|p| match p {
                IpAddr::V4(v4) => v4.octets()[..3] == INGRESS_PREFIX,
                IpAddr::V6(_) => false,
            }),
            "{peers:?}"
        );
    }
    // A task added on the manager reaches the worker's lbd only through
    // Swarm's gossip: the worker gets no event for it.
    let t0 = Instant::now();
    manager
        .docker(&["service", "scale", "--detach", "on1=3"])
        .unwrap();
    let on1 = wait_service_running(manager, "on1", 3, CONVERGE).expect("on1 scaled");
    let running = t0.elapsed();
    let target = SocketAddr::from((n2.addr, 8082));
    let seen = until_all_answer(&cluster.client, target, &task_names(&on1), 300, TIMEOUT);
    eprintln!(
        "swarm 2 nodes, scale on1 2 -> 3: running after {:.0} ms, all 3 answered through the \
         worker after {:.0} ms: {seen:?}",
        running.as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64() * 1e3
    );

    let s1 = status(&lbd1);
    let s2 = status(&lbd2);
    assert_eq!(s1["docker"]["swarm"], "manager", "{:#}", s1["docker"]);
    assert_eq!(s2["docker"]["swarm"], "worker", "{:#}", s2["docker"]);
    report_convergence("swarm-2-manager", &lbd1);
    report_convergence("swarm-2-worker", &lbd2);
}
