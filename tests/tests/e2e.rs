//! End to end: a client, the load-balancer node running lbd, and backends
//! running real TCP/UDP servers, each in a network namespace of its own.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use lb_tests::echo::{tcp_request, udp_request, TcpSession};
use lb_tests::lbd::Lbd;
use lb_tests::process::wait_until;
use lb_tests::topology::{echo_bin, Topology, CLIENT_V4, CLIENT_V6, LB_IFACES};
use serde_json::Value;

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
const TIMEOUT: Duration = Duration::from_secs(3);

fn config(backends: usize) -> String {
    let list = |port: u16, v6: bool| {
        (1..=backends)
            .map(|i| {
                if v6 {
                    format!("\"[fd00:72:{i}::2]:{port}\"")
                } else {
                    format!("\"10.72.{i}.2:{port}\"")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"
[[service]]
name = "web"
frontend = "10.73.0.10:80/tcp"
backends = [{web}]

[[service]]
name = "dns"
frontend = "10.73.0.10:53/udp"
backends = [{dns}]

[[service]]
name = "web6"
frontend = "[fd00:73::10]:80/tcp"
backends = [{web6}]

[[service]]
name = "sticky"
frontend = "10.73.0.30:80/tcp"
backends = [{web}]
affinity_secs = 60

[[service]]
name = "fullnat"
frontend = "10.73.0.20:80/tcp"
backends = [{web}]
snat = "10.71.0.1"
"#,
        web = list(TCP_PORT, false),
        dns = list(UDP_PORT, false),
        web6 = list(TCP_PORT, true),
    )
}

fn web() -> SocketAddr {
    "10.73.0.10:80".parse().unwrap()
}
fn dns() -> SocketAddr {
    "10.73.0.10:53".parse().unwrap()
}
fn web6() -> SocketAddr {
    "[fd00:73::10]:80".parse().unwrap()
}

/// lbd is declared first so that it stops before the namespaces go.
struct Env {
    lbd: Lbd,
    topo: Topology,
}

fn setup(tag: &str) -> Env {
    setup_with(tag, &[])
}

/// [`setup`], with more arguments for lbd.
fn setup_with(tag: &str, lbd_args: &[&str]) -> Env {
    let mut topo = Topology::new(tag).expect("topology");
    topo.start_servers(&echo_bin(), TCP_PORT, UDP_PORT)
        .expect("servers");
    let lbd = Lbd::start_with(&topo.lb, tag, &config(3), &LB_IFACES, lbd_args).expect("lbd");
    Env { lbd, topo }
}

fn service<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in {status:#}"))
}

fn counter(v: &Value, name: &str) -> u64 {
    v["counters"][name].as_u64().unwrap()
}

/// Sends `n` TCP requests, each on a new connection, from the client.
fn tcp_spread(env: &Env, target: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    env.topo.client.run(move || {
        let mut seen = BTreeMap::new();
        let client: IpAddr = if target.is_ipv4() {
            CLIENT_V4.into()
        } else {
            CLIENT_V6.into()
        };
        for _ in 0..n {
            let (name, peer) = tcp_request(target, TIMEOUT).expect("tcp request");
            assert_eq!(
                peer.ip(),
                client,
                "the backend must see the client's address"
            );
            *seen.entry(name).or_insert(0) += 1;
        }
        seen
    })
}

/// Long-lived TCP connections from the client to `web()`, held by a thread
/// inside the client's namespace for as long as the test needs them.
struct Sessions {
    requests: Option<std::sync::mpsc::Sender<()>>,
    replies: std::sync::mpsc::Receiver<Vec<Result<String, String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sessions {
    fn open(env: &Env, count: usize) -> Sessions {
        let (to_client, requests) = std::sync::mpsc::channel::<()>();
        let (replies, from_client) = std::sync::mpsc::channel();
        let thread = env.topo.client.spawn(move || {
            let mut sessions: Vec<TcpSession> = (0..count)
                .map(|_| TcpSession::connect(web(), TIMEOUT).expect("connect"))
                .collect();
            while requests.recv().is_ok() {
                let answer = sessions
                    .iter_mut()
                    .map(|s| {
                        s.request()
                            .map(|(name, _)| name)
                            .map_err(|e| format!("{e:#}"))
                    })
                    .collect();
                if replies.send(answer).is_err() {
                    return;
                }
            }
        });
        Sessions {
            requests: Some(to_client),
            replies: from_client,
            thread: Some(thread),
        }
    }

    /// One request on every connection: the backend that answered each.
    fn ask(&self) -> Vec<String> {
        self.ask_each()
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("a request on a long-lived connection")
    }

    /// One request on every connection: who answered it, or why not.
    fn ask_each(&self) -> Vec<Result<String, String>> {
        self.requests.as_ref().unwrap().send(()).unwrap();
        self.replies
            .recv_timeout(Duration::from_secs(10))
            .expect("the long-lived connections answer")
    }
}

impl Drop for Sessions {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn tcp_is_balanced_and_backends_see_the_client() {
    let mut env = setup("bal");
    let seen = tcp_spread(&env, web(), 300);
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (name, n) in &seen {
        // A fair share is 100; Maglev over random source ports stays well
        // within this.
        assert!((60..=140).contains(n), "{name} got {n} of 300: {seen:?}");
    }
    // Counters match the traffic: one new flow per connection, each backend
    // credited with the connections it answered.
    let status = env.lbd.status().unwrap();
    let web = service(&status, "web");
    assert_eq!(counter(web, "new_flows"), 300);
    for backend in web["backends"].as_array().unwrap() {
        let addr = backend["address"].as_str().unwrap();
        let name = format!("b{}", &addr["10.72.".len()..addr.find(".2:").unwrap()]);
        assert_eq!(
            counter(backend, "new_flows"),
            seen[&name] as u64,
            "{backend:#}"
        );
        assert!(counter(backend, "reply_packets") >= seen[&name] as u64);
    }
    // Every connection is a conntrack entry (counted in the background, so
    // a census that saw them may take a moment), and the reload-free start
    // counts as one reconciliation.
    let mut entries = 0;
    let counted = wait_until(Duration::from_secs(10), "a census of 300 flows", || {
        entries = env.lbd.status().unwrap()["conntrack_entries"]
            .as_u64()
            .unwrap();
        entries >= 300
    });
    assert!(counted.is_ok(), "{entries} conntrack entries");
    assert!(status["reconcile"]["count"].as_u64().unwrap() >= 1);
    // SIGTERM leaves the datapath pinned for the next lbd; `lbd --cleanup`
    // removes every pin.
    assert!(env.lbd.stop(), "lbd did not exit cleanly");
    assert!(env.lbd.pin_dir.join("links").exists(), "pins removed");
    let (status, err) = env.lbd.cleanup().unwrap();
    assert!(status.success(), "{err}");
    assert!(!env.lbd.pin_dir.exists(), "pins left behind");
}

#[test]
fn udp_and_ipv6_services_work() {
    let env = setup("udp6");
    let n = 30;
    let names = env.topo.client.run(move || {
        let mut names = BTreeMap::new();
        for _ in 0..n {
            // udp_request fails unless the reply comes from the virtual address.
            let (name, peer) = udp_request(dns(), TIMEOUT).expect("udp request");
            assert_eq!(peer.ip(), IpAddr::from(CLIENT_V4));
            *names.entry(name).or_insert(0usize) += 1;
        }
        names
    });
    assert!(names.len() >= 2, "30 UDP flows all went to {names:?}");
    let status = env.lbd.status().unwrap();
    let dns = service(&status, "dns");
    assert_eq!(counter(dns, "packets"), n as u64);
    assert_eq!(counter(dns, "reply_packets"), n as u64);
    // The client's kernel may reuse an ephemeral port, and a reused 5-tuple
    // is the same flow.
    let flows = counter(dns, "new_flows");
    assert!(
        flows <= n as u64 && flows >= n as u64 - 3,
        "{flows} new flows"
    );

    let seen = tcp_spread(&env, web6(), 60);
    assert_eq!(seen.values().sum::<usize>(), 60);
    assert!(seen.len() >= 2, "{seen:?}");
    let status = env.lbd.status().unwrap();
    assert_eq!(counter(service(&status, "web6"), "new_flows"), 60);
}

#[test]
fn long_lived_connection_survives_a_reload_that_adds_a_backend() {
    let mut env = setup("grow");
    let session = Sessions::open(&env, 1);
    let ask = || session.ask().remove(0);
    let first = ask();

    let idx = env.topo.add_backend().unwrap();
    env.topo
        .start_server(idx, &echo_bin(), TCP_PORT, UDP_PORT)
        .unwrap();
    // lbd follows the new interface by itself.
    wait_until(Duration::from_secs(5), "lbd to attach to lbb4", || {
        env.lbd
            .status()
            .map(|s| {
                s["interfaces"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|i| i == "lbb4")
            })
            .unwrap_or(false)
    })
    .unwrap();
    env.lbd.reload(&config(4)).unwrap();
    wait_until(Duration::from_secs(5), "the reload", || {
        env.lbd
            .status()
            .map(|s| service(&s, "web")["backends"].as_array().unwrap().len() == 4)
            .unwrap_or(false)
    })
    .unwrap();

    for _ in 0..10 {
        assert_eq!(ask(), first, "the established connection moved");
    }
    drop(session);

    let seen = tcp_spread(&env, web(), 200);
    assert!(
        seen.contains_key("b4"),
        "new flows never reached b4: {seen:?}"
    );
    assert_eq!(seen.len(), 4);
}

#[test]
fn a_bad_config_is_rejected_and_the_old_state_keeps_serving() {
    let env = setup("bad");
    let before = tcp_spread(&env, web(), 30);
    env.lbd
        .reload("[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80\"\nbackends = []\n")
        .unwrap();
    let mut error = String::new();
    wait_until(Duration::from_secs(5), "the reload to fail", || {
        let status = env.lbd.status().unwrap();
        match status["config"]["last_error"].as_str() {
            Some(e) => {
                error = e.to_string();
                true
            }
            None => false,
        }
    })
    .unwrap();
    let path = env.lbd.config.display().to_string();
    assert!(error.starts_with(&format!("{path}:3:")), "{error}");
    assert!(error.contains("protocol"), "{error}");

    let status = env.lbd.status().unwrap();
    assert_eq!(status["services"].as_array().unwrap().len(), 5);
    let after = tcp_spread(&env, web(), 30);
    assert_eq!(
        before.values().sum::<usize>(),
        after.values().sum::<usize>()
    );

    // The table shows the failure too.
    let table = lb_tests::lbd::lbctl(&env.lbd.socket, &["status"]).unwrap();
    assert!(table.contains("last reload FAILED"), "{table}");
}

#[test]
fn traffic_not_for_a_service_is_left_alone() {
    let env = setup("other");
    let translated = |env: &Env| {
        env.lbd.status().unwrap()["datapath"]["translated"]
            .as_u64()
            .unwrap()
    };
    let before = translated(&env);
    let (name, peer) = env
        .topo
        .client
        .run(|| tcp_request("10.72.1.2:8080".parse().unwrap(), TIMEOUT))
        .expect("a backend reached directly");
    assert_eq!(name, "b1");
    assert_eq!(peer.ip(), IpAddr::from(CLIENT_V4));
    // The frontend address on a port that is no service: nothing answers.
    let refused = env
        .topo
        .client
        .run(|| tcp_request("10.73.0.10:81".parse().unwrap(), Duration::from_secs(1)));
    assert!(refused.is_err());
    assert_eq!(translated(&env), before);
}

#[test]
fn full_nat_hides_the_client_and_still_answers_from_the_frontend() {
    let env = setup("fnat");
    let target: SocketAddr = "10.73.0.20:80".parse().unwrap();
    let peers = env.topo.client.run(move || {
        (0..30)
            .map(|_| tcp_request(target, TIMEOUT).expect("request through full NAT"))
            .collect::<Vec<_>>()
    });
    let names: std::collections::BTreeSet<&str> = peers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.len() >= 2, "{names:?}");
    for (_, peer) in &peers {
        // The backend sees the translated source, not the client.
        assert_eq!(peer.ip(), "10.71.0.1".parse::<IpAddr>().unwrap());
    }
    let status = env.lbd.status().unwrap();
    assert_eq!(counter(service(&status, "fullnat"), "new_flows"), 30);
}

/// New connections to `web()` from the client, one after another, while
/// lbd is restarted; bounded in count (20,000) and time (20 s).
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    failed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl Load {
    fn start(env: &Env) -> Load {
        use std::sync::atomic::Ordering::Relaxed;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let thread = {
            let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
            env.topo.client.spawn(move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                while !stop.load(Relaxed)
                    && std::time::Instant::now() < deadline
                    && sent.load(Relaxed) < 20_000
                {
                    sent.fetch_add(1, Relaxed);
                    if let Err(e) = tcp_request(web(), TIMEOUT) {
                        eprintln!("request failed: {e:#}");
                        failed.fetch_add(1, Relaxed);
                    }
                }
            })
        };
        Load {
            stop,
            sent,
            failed,
            thread,
        }
    }

    /// Stops the load and checks that it ran and that no request failed.
    fn finish_without_failures(self, what: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stop.store(true, Relaxed);
        self.thread.join().unwrap();
        let (sent, failed) = (self.sent.load(Relaxed), self.failed.load(Relaxed));
        eprintln!("{what}: {sent} requests, {failed} failed");
        assert!(sent > 50, "the load barely ran: {sent} requests");
        assert_eq!(failed, 0, "{failed} of {sent} requests failed");
    }
}

/// lbd is SIGKILLed and started again while a load of new connections runs
/// and long-lived connections stay open: the datapath keeps running from
/// its pinned maps and links, and the new lbd adopts them.
#[test]
fn killing_and_restarting_lbd_under_load_loses_nothing() {
    let mut env = setup("restart");
    let load = Load::start(&env);
    let sessions = Sessions::open(&env, 5);
    let ask = || sessions.ask();
    let before = ask();
    std::thread::sleep(Duration::from_millis(300));

    env.lbd.kill();
    // The datapath runs without lbd.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        ask(),
        before,
        "long-lived connections moved while lbd was away"
    );
    assert!(env.lbd.pin_dir.exists());

    env.lbd
        .spawn(&env.topo.lb, &LB_IFACES)
        .expect("lbd starts again and adopts the datapath");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        ask(),
        before,
        "long-lived connections moved after the restart"
    );

    load.finish_without_failures("restart under load");
    drop(sessions);
    // The new lbd serves the same services, adopted rather than re-created.
    let status = env.lbd.status().unwrap();
    assert_eq!(
        service(&status, "web")["backends"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert!(
        env.lbd.log().contains("adopted 5 services"),
        "{}",
        env.lbd.log()
    );
}

/// lbd's netlink filters on each interface of the load balancer's
/// namespace (`tc filter show ... ingress`), by interface.
fn netlink_filters(env: &Env) -> BTreeMap<String, usize> {
    LB_IFACES
        .into_iter()
        .map(|dev| {
            let out = env
                .topo
                .lb
                .command("tc")
                .args(["filter", "show", "dev", dev, "ingress"])
                .output()
                .expect("tc filter show");
            let text = String::from_utf8_lossy(&out.stdout);
            // One line per filter carries its program: "... bpf ... direct-action".
            let ours = text
                .lines()
                .filter(|l| l.contains("pref 19522") && l.contains("direct-action"))
                .count();
            (dev.to_string(), ours)
        })
        .collect()
}

/// The attachment kernels before 6.6 get (a cls_bpf filter set by
/// netlink), forced here: it carries traffic, `lbctl status` names it, a
/// killed and restarted lbd replaces the program in place under load with
/// nothing lost and no second filter, and `lbd --cleanup` takes it off.
#[test]
fn the_netlink_attachment_serves_survives_a_restart_and_is_cleaned_up() {
    let mut env = setup_with("nlattach", &["--tc-attach", "netlink"]);
    let status = env.lbd.status().unwrap();
    assert_eq!(status["tc_attach"], "netlink");
    assert!(
        lbctl(&env, &["status"]).contains("(attached by netlink)"),
        "{}",
        lbctl(&env, &["status"])
    );
    let one_each: BTreeMap<String, usize> =
        LB_IFACES.into_iter().map(|d| (d.to_string(), 1)).collect();
    assert_eq!(netlink_filters(&env), one_each);
    let seen = tcp_spread(&env, web(), 60);
    assert_eq!(seen.len(), 3, "not balanced over the 3 backends: {seen:?}");

    let load = Load::start(&env);
    let sessions = Sessions::open(&env, 5);
    let before = sessions.ask();
    std::thread::sleep(Duration::from_millis(300));
    env.lbd.kill();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        sessions.ask(),
        before,
        "connections moved while lbd was away"
    );
    env.lbd
        .spawn(&env.topo.lb, &LB_IFACES)
        .expect("lbd starts again and takes over its filters");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        sessions.ask(),
        before,
        "connections moved after the restart"
    );
    load.finish_without_failures("netlink attachment, restart under load");
    drop(sessions);
    assert_eq!(netlink_filters(&env), one_each, "a restart added filters");

    assert!(env.lbd.stop(), "lbd did not exit cleanly on SIGTERM");
    assert_eq!(
        netlink_filters(&env),
        one_each,
        "SIGTERM took the datapath off"
    );
    let (status, err) = env.lbd.cleanup().unwrap();
    assert!(status.success(), "lbd --cleanup failed: {err}");
    let none: BTreeMap<String, usize> = one_each.keys().map(|d| (d.clone(), 0)).collect();
    assert_eq!(netlink_filters(&env), none, "lbd --cleanup left filters");
    assert!(!env.lbd.pin_dir.exists());
}

#[test]
fn a_drained_backend_keeps_its_flows_and_gets_no_new_ones() {
    let env = setup("drain");
    let session = Sessions::open(&env, 1);
    let ask = || session.ask().remove(0);
    let pinned = ask();
    let idx: usize = pinned[1..].parse().unwrap();
    let address = format!("10.72.{idx}.2:{TCP_PORT}");

    let out = lb_tests::lbd::lbctl(&env.lbd.socket, &["drain", "web", &address]).unwrap();
    assert!(out.contains("draining"), "{out}");
    let seen = tcp_spread(&env, web(), 100);
    assert!(
        !seen.contains_key(&pinned),
        "a drained backend got new flows: {seen:?}"
    );
    assert_eq!(ask(), pinned, "the established connection moved");

    // Active flows come from a census taken in the background.
    let mut backend = Value::Null;
    let counted = wait_until(Duration::from_secs(10), "a census of its flow", || {
        let status = env.lbd.status().unwrap();
        backend = service(&status, "web")["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == address.as_str())
            .unwrap()
            .clone();
        backend["active_flows"].as_u64().unwrap() >= 1
    });
    assert_eq!(backend["state"], "draining");
    assert!(counted.is_ok(), "{backend:#}");

    lb_tests::lbd::lbctl(&env.lbd.socket, &["undrain", "web", &address]).unwrap();
    let seen = tcp_spread(&env, web(), 100);
    assert!(
        seen.contains_key(&pinned),
        "undrained backend gets no flows: {seen:?}"
    );
    // An unknown backend is an error, not a silent success.
    assert!(lb_tests::lbd::lbctl(&env.lbd.socket, &["drain", "web", "10.9.9.9:1"]).is_err());
}

const HEALTH_INTERVAL_MS: u64 = 200;
const HEALTH_FALL: u64 = 2;

fn health_config() -> String {
    format!(
        r#"
[[service]]
name = "web"
frontend = "10.73.0.10:80/tcp"
backends = ["10.72.1.2:{TCP_PORT}", "10.72.2.2:{TCP_PORT}", "10.72.3.2:{TCP_PORT}"]
[service.health]
check = "tcp"
interval_ms = {HEALTH_INTERVAL_MS}
timeout_ms = 200
rise = 2
fall = {HEALTH_FALL}
"#
    )
}

fn backend_state(env: &Env, address: &str) -> String {
    let status = env.lbd.status().unwrap();
    service(&status, "web")["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == address)
        .map(|b| b["state"].as_str().unwrap().to_string())
        .unwrap()
}

/// A backend killed under load stops getting flows within interval × fall
/// (plus one interval); it comes back after `rise` good checks; with every
/// backend down the client gets a reset at once rather than a timeout.
#[test]
fn a_failed_backend_leaves_and_returns_and_no_backend_means_a_reset() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    let mut topo = Topology::new("health").expect("topology");
    topo.start_servers(&echo_bin(), TCP_PORT, UDP_PORT)
        .expect("servers");
    let lbd = Lbd::start(&topo.lb, "health", &health_config(), &LB_IFACES).expect("lbd");
    let mut env = Env { lbd, topo };

    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let load = {
        let (stop, log) = (stop.clone(), log.clone());
        env.topo.client.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && n < 50_000 {
                n += 1;
                let ok = tcp_request(web(), Duration::from_secs(1)).is_ok();
                log.lock().unwrap().push((Instant::now(), ok));
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let killed_at = Instant::now();
    env.topo.backends[1].stop_server();
    wait_until(Duration::from_secs(5), "b2 to be marked down", || {
        backend_state(&env, "10.72.2.2:8080").starts_with("down")
    })
    .unwrap();
    let down_after = killed_at.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let bound = Duration::from_millis(HEALTH_INTERVAL_MS * (HEALTH_FALL + 1) + 300);
    {
        let log = log.lock().unwrap();
        let failures: Vec<Duration> = log
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(t, _)| t.saturating_duration_since(killed_at))
            .collect();
        let total = log.len();
        let last = failures.iter().max().copied().unwrap_or_default();
        eprintln!(
            "failover: b2 marked down {down_after:?} after it died; {} of {total} requests failed, the last {last:?} after",
            failures.len()
        );
        assert!(
            log.iter()
                .filter(|(t, _)| *t < killed_at)
                .all(|(_, ok)| *ok),
            "requests failed before the backend died"
        );
        assert!(
            last <= bound,
            "a request failed {last:?} after the kill (bound {bound:?})"
        );
    }

    // Back after `rise` good checks, and new flows reach it again.
    env.topo.backends[1]
        .start_server(&echo_bin(), TCP_PORT, UDP_PORT)
        .unwrap();
    wait_until(Duration::from_secs(5), "b2 to be up again", || {
        backend_state(&env, "10.72.2.2:8080") == "active"
    })
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let seen = tcp_spread(&env, web(), 100);
    assert!(seen.contains_key("b2"), "{seen:?}");

    // Every backend down: the client is refused at once.
    for b in &mut env.topo.backends {
        b.stop_server();
    }
    wait_until(Duration::from_secs(5), "every backend to be down", || {
        ["10.72.1.2:8080", "10.72.2.2:8080", "10.72.3.2:8080"]
            .iter()
            .all(|a| backend_state(&env, a).starts_with("down"))
    })
    .unwrap();
    let started = Instant::now();
    let err = env
        .topo
        .client
        .run(|| tcp_request(web(), Duration::from_secs(3)))
        .expect_err("no backend, yet an answer");
    assert!(
        format!("{err:#}").contains("refused"),
        "expected a reset (connection refused), got: {err:#}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    let table = lb_tests::lbd::lbctl(&env.lbd.socket, &["status"]).unwrap();
    assert!(table.contains("down (connect:"), "{table}");
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend() {
    let env = setup("sticky");
    let seen = tcp_spread(&env, "10.73.0.30:80".parse().unwrap(), 40);
    assert_eq!(
        seen.len(),
        1,
        "one client, 40 connections, several backends: {seen:?}"
    );
}

#[test]
fn a_second_lbd_on_the_same_pins_or_socket_is_refused() {
    let env = setup("twice");
    let run = |pin_dir: &std::path::Path, socket: &std::path::Path, cleanup: bool| {
        let mut cmd = env.topo.lb.command(lb_tests::topology::target_bin("lbd"));
        cmd.arg("--config")
            .arg(&env.lbd.config)
            .arg("--pin-dir")
            .arg(pin_dir)
            .arg("--socket")
            .arg(socket);
        if cleanup {
            cmd.arg("--cleanup");
        }
        let stderr = env.lbd.dir().join("second.err");
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let mut child = cmd.spawn().expect("running lbd");
        // A second lbd that is not refused keeps running: give it a few
        // seconds, then stop it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, std::fs::read_to_string(&stderr).unwrap_or_default())
    };
    let other_socket = env.lbd.dir().join("other.sock");
    let other_pins = std::path::PathBuf::from(format!("{}-other", env.lbd.pin_dir.display()));
    for (what, pins, socket, cleanup) in [
        (
            "same pins and socket",
            &env.lbd.pin_dir,
            &env.lbd.socket,
            false,
        ),
        ("same pins", &env.lbd.pin_dir, &other_socket, false),
        ("same socket", &other_pins, &env.lbd.socket, false),
        (
            "--cleanup of its pins",
            &env.lbd.pin_dir,
            &other_socket,
            true,
        ),
    ] {
        let (status, stderr) = run(pins, socket, cleanup);
        assert!(
            status.is_some_and(|s| !s.success()),
            "{what}: a second lbd ran ({status:?}): {stderr}"
        );
        assert!(
            stderr.contains("another lbd is already running"),
            "{what}: {stderr}"
        );
    }
    // The first one never noticed.
    assert_eq!(
        env.topo
            .client
            .run(|| tcp_request("10.73.0.10:80".parse().unwrap(), TIMEOUT))
            .map(|(name, _)| name.starts_with('b'))
            .ok(),
        Some(true)
    );
    assert!(env.lbd.status().is_ok());
    assert!(!other_pins.exists(), "the refused lbd made its pins");
    lb_tests::lbd::remove_run_files(&other_pins);
}

/// What `systemctl restart` does, under load and with long-lived
/// connections open: SIGTERM, then a new lbd. Nothing fails, no connection
/// moves, and a backend drained before the restart stays drained after it.
#[test]
fn stopping_and_starting_lbd_under_load_loses_nothing_and_keeps_drains() {
    let mut env = setup("sigterm");
    let sessions = Sessions::open(&env, 5);
    let ask = || sessions.ask();
    let before = ask();
    let drained = format!("10.72.1.2:{TCP_PORT}");
    lb_tests::lbd::lbctl(&env.lbd.socket, &["drain", "web", &drained]).unwrap();
    let load = Load::start(&env);
    std::thread::sleep(Duration::from_millis(300));

    assert!(env.lbd.stop(), "lbd did not exit cleanly on SIGTERM");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        ask(),
        before,
        "long-lived connections moved while lbd was away"
    );
    assert!(
        env.lbd.pin_dir.join("links").exists(),
        "SIGTERM removed the pins"
    );

    env.lbd
        .spawn(&env.topo.lb, &LB_IFACES)
        .expect("lbd starts again and adopts the datapath");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        ask(),
        before,
        "long-lived connections moved after the restart"
    );

    load.finish_without_failures("SIGTERM and start under load");
    drop(sessions);
    assert!(
        env.lbd.log().contains("adopted 5 services"),
        "{}",
        env.lbd.log()
    );

    // The drain outlived the lbd that was told.
    assert_eq!(backend_state(&env, &drained), "draining");
    let seen = tcp_spread(&env, web(), 100);
    assert!(
        !seen.contains_key("b1"),
        "the drained backend got new flows after the restart: {seen:?}"
    );
}

fn lbctl(env: &Env, args: &[&str]) -> String {
    lb_tests::lbd::lbctl(&env.lbd.socket, args).unwrap_or_else(|e| panic!("{e:#}"))
}

fn lbctl_json(env: &Env, args: &[&str]) -> Value {
    serde_json::from_str(&lbctl(env, args)).unwrap()
}

/// lbctl's error output, asserting that it failed.
fn lbctl_fails(env: &Env, args: &[&str]) -> String {
    let out = lb_tests::lbd::lbctl_output(&env.lbd.socket, args).unwrap();
    assert!(!out.status.success(), "lbctl {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The echo server's name for a backend address 10.72.N.2:port.
fn backend_name(address: &str) -> String {
    format!(
        "b{}",
        &address["10.72.".len()..address.find(".2:").unwrap()]
    )
}

#[test]
fn lbctl_version_and_the_status_of_one_service() {
    let env = setup("lbctl-ver");
    let version = lbctl(&env, &["version"]);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let release = env!("CARGO_PKG_VERSION");
    for line in [
        format!("lbctl {release}"),
        format!("lbd {release}"),
        format!("datapath layout {}", lb_common::LAYOUT_VERSION),
        format!("kernel {}", kernel.trim()),
    ] {
        assert!(version.lines().any(|l| l == line), "{line:?} in {version}");
    }
    let json = lbctl_json(&env, &["version", "--json"]);
    assert_eq!(json["lbd"]["layout_version"], lb_common::LAYOUT_VERSION);

    // By name: that service's rows and no other's.
    let table = lbctl(&env, &["status", "web"]);
    let services: Vec<&str> = table
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| !w.starts_with("10.72."))
        .collect();
    assert_eq!(services, ["web"], "{table}");
    // By frontend, with or without the protocol, IPv6 written another way.
    for (wanted, name) in [
        ("10.73.0.10:53", "dns"),
        ("10.73.0.10:80/tcp", "web"),
        ("[fd00:73:0::10]:80", "web6"),
        ("sticky", "sticky"),
    ] {
        let status = lbctl_json(&env, &["status", wanted, "--json"]);
        let list = status["services"].as_array().unwrap();
        assert_eq!(list.len(), 1, "{wanted}: {status:#}");
        assert_eq!(list[0]["name"], name, "{wanted}");
    }
    let err = lbctl_fails(&env, &["status", "nothing"]);
    assert!(err.contains("no service"), "{err}");
    assert!(lbctl_fails(&env, &["status", "10.73.0.10:81"]).contains("no service"));
}

/// `lbctl reload` reads the file even when its size and modification time
/// did not change (lbd's own poll would not notice), so what it reports is
/// its own doing.
#[test]
fn lbctl_reload_says_what_changed_and_a_rejected_file_keeps_the_old_state() {
    const LEN: usize = 2000;
    // Every version of the file has the same length.
    let pad = |text: String| {
        assert!(text.len() + 2 <= LEN);
        format!("{text}\n#{}", " ".repeat(LEN - text.len() - 2))
    };
    let api = |frontend: &str| {
        format!(
            "{}\n[[service]]\nname = \"api\"\nfrontend = \"{frontend}\"\nbackends = [\"10.72.1.2:{TCP_PORT}\"]\n",
            config(3)
        )
    };
    let mut topo = Topology::new("lbctl-rl").expect("topology");
    topo.start_servers(&echo_bin(), TCP_PORT, UDP_PORT)
        .expect("servers");
    let lbd = Lbd::start(&topo.lb, "lbctl-rl", &pad(config(3)), &LB_IFACES).expect("lbd");
    let env = Env { lbd, topo };
    let path = env.lbd.config.clone();
    let rewrite = |text: String| {
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        env.lbd.write_config(&text).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    };

    rewrite(pad(api("10.73.0.40:80/tcp")));
    let out = lbctl(&env, &["reload"]);
    assert_eq!(
        out.trim(),
        format!("reloaded {}: added api (10.73.0.40:80/tcp)", path.display())
    );
    let status = env.lbd.status().unwrap();
    assert_eq!(
        service(&status, "api")["backends"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (name, _) = env
        .topo
        .client
        .run(|| tcp_request("10.73.0.40:80".parse().unwrap(), TIMEOUT))
        .expect("the added service answers");
    assert_eq!(name, "b1");

    // A frontend without its protocol: rejected with the file and line,
    // exit status 1.
    rewrite(pad(api("10.73.0.41:80")));
    let err = lbctl_fails(&env, &["reload"]);
    let line = api("10.73.0.41:80")
        .lines()
        .position(|l| l.contains("10.73.0.41"))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("{}:{line}:", path.display())),
        "{err}"
    );
    assert!(err.contains("previous state keeps serving"), "{err}");
    let status = env.lbd.status().unwrap();
    assert!(status["config"]["last_error"].is_string());
    service(&status, "api");
    assert!(env
        .topo
        .client
        .run(|| tcp_request("10.73.0.40:80".parse().unwrap(), TIMEOUT))
        .is_ok());

    rewrite(pad(config(3)));
    let out = lbctl(&env, &["reload"]);
    assert!(
        out.ends_with(": removed api (10.73.0.40:80/tcp)\n"),
        "{out}"
    );
    assert!(env.lbd.status().unwrap()["config"]["last_error"].is_null());
}

#[test]
fn lbctl_weight_changes_the_spread_of_new_flows() {
    let env = setup("lbctl-wt");
    let b1 = format!("10.72.1.2:{TCP_PORT}");
    let out = lbctl(&env, &["weight", "10.73.0.10:80/tcp", &b1, "3"]);
    assert!(out.contains("set to 3"), "{out}");
    let status = env.lbd.status().unwrap();
    let backend = service(&status, "web")["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == b1.as_str())
        .unwrap()
        .clone();
    assert_eq!(backend["weight"], 3, "{backend:#}");
    assert_eq!(backend["weight_override"], 3, "{backend:#}");
    assert!(lbctl(&env, &["status", "web"]).contains("3*"));

    // 3:1:1 is 60 % / 20 % / 20 % of 300 new connections.
    let seen = tcp_spread(&env, web(), 300);
    eprintln!("weights 3:1:1 over 300 connections: {seen:?}");
    assert!((140..=220).contains(&seen["b1"]), "{seen:?}");
    for other in ["b2", "b3"] {
        assert!((30..=95).contains(&seen[other]), "{seen:?}");
    }

    // Weight 0, the backend named in IPv4-mapped form: no new flows.
    lbctl(&env, &["weight", "web", "[::ffff:10.72.2.2]:8080", "0"]);
    let seen = tcp_spread(&env, web(), 100);
    assert!(!seen.contains_key("b2"), "{seen:?}");
    // IPv6 backends written in other ways name the same backend, for a
    // drain as for a weight.
    lbctl(&env, &["drain", "web6", "[fd00:72:1:0::2]:8080"]);
    let seen = tcp_spread(&env, web6(), 60);
    assert!(!seen.contains_key("b1"), "{seen:?}");
    lbctl(
        &env,
        &["undrain", "[fd00:73::10]:80", "[fd00:0072:1::2]:8080"],
    );
    lbctl(&env, &["weight", "web6", "[fd00:72:2:0::2]:8080", "0"]);
    let seen = tcp_spread(&env, web6(), 60);
    assert!(
        !seen.contains_key("b2") && seen.contains_key("b1"),
        "{seen:?}"
    );

    // Cleared: back to the config file's weight.
    lbctl(&env, &["weight", "web", &b1, "--clear"]);
    lbctl(&env, &["weight", "web", "10.72.2.2:8080", "--clear"]);
    let status = env.lbd.status().unwrap();
    for b in service(&status, "web")["backends"].as_array().unwrap() {
        assert_eq!(b["weight"], 1, "{b:#}");
        assert!(b["weight_override"].is_null(), "{b:#}");
    }
    let seen = tcp_spread(&env, web(), 150);
    assert_eq!(seen.len(), 3, "{seen:?}");

    // Errors, and nothing changes.
    assert!(lbctl_fails(&env, &["weight", "web", &b1, "70000"]).contains("70000"));
    assert!(lbctl_fails(&env, &["weight", "web", "10.72.9.2:8080", "2"]).contains("no backend"));
    assert!(lbctl_fails(&env, &["weight", "web", &b1]).contains("<WEIGHT>"));
}

#[test]
fn lbctl_conntrack_lists_connections_and_flush_moves_them() {
    let env = setup("lbctl-ct");
    let sessions = Sessions::open(&env, 3);
    let names = sessions.ask();

    let list = lbctl_json(&env, &["conntrack", "list", "--service", "web", "--json"]);
    assert_eq!(list["total"], 3, "{list:#}");
    let mut backends: Vec<String> = list["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["frontend"], "10.73.0.10:80/tcp", "{c:#}");
            assert_eq!(c["service"], "web");
            assert!(
                c["client"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{CLIENT_V4}:")),
                "{c:#}"
            );
            assert_eq!(c["state"], "established", "{c:#}");
            assert!(c["nat"].is_null());
            assert!(c["expires_in_secs"].as_f64().unwrap() > 3600.0, "{c:#}");
            backend_name(c["backend"].as_str().unwrap())
        })
        .collect();
    backends.sort();
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(backends, expected, "{list:#}");
    // The whole table, and a bounded one.
    assert_eq!(
        lbctl_json(&env, &["conntrack", "list", "--json"])["total"],
        3
    );
    let table = lbctl(&env, &["conntrack", "list", "--limit", "1"]);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.contains("2 more"), "{table}");
    assert_eq!(
        lbctl_json(&env, &["conntrack", "list", "--service", "dns", "--json"])["total"],
        0
    );

    // Flushed while every backend takes new flows: each connection's next
    // packet is balanced again by its addresses and lands where it was.
    let out = lbctl(&env, &["conntrack", "flush", "--service", "10.73.0.10:80"]);
    assert!(out.contains("flushed 3 connections"), "{out}");
    assert_eq!(
        lbctl_json(&env, &["conntrack", "list", "--json"])["total"],
        0
    );
    assert_eq!(sessions.ask(), names);
    assert_eq!(
        lbctl_json(&env, &["conntrack", "list", "--json"])["total"],
        3
    );

    // Drained, a backend keeps its connections; flushed, they land on
    // another backend, which resets them.
    let pinned = names[0].clone();
    let address = format!("10.72.{}.2:{TCP_PORT}", &pinned[1..]);
    lbctl(&env, &["drain", "web", &address]);
    assert_eq!(sessions.ask(), names, "a drain moved connections");
    let out = lbctl(&env, &["conntrack", "flush"]);
    assert!(out.contains("flushed 3 connections"), "{out}");
    let answers = sessions.ask_each();
    for (was, now) in names.iter().zip(&answers) {
        if *was == pinned {
            let err = now
                .as_ref()
                .expect_err("a flushed connection of a drained backend");
            assert!(err.contains("reset"), "{err}");
        }
    }
    drop(sessions);
}

/// lbd's routes in the local table of the load balancer's namespace, as
/// `ip route` prints them, IPv4 and IPv6.
fn local_routes(topo: &Topology, only_lbd: bool) -> String {
    let proto = if only_lbd { " proto 76" } else { "" };
    let out = topo
        .lb
        .sh(&format!(
            "ip route show table local type local{proto}; ip -6 route show table local type local{proto}"
        ))
        .expect("ip route");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Frontends are made local by routes in the local table, not addresses:
/// a frontend without backends answers a reset, over IPv4 and IPv6; the
/// routes outlive a crash of lbd, a frontend that leaves takes its route
/// along, and a teardown removes lbd's routes and no one else's.
#[test]
fn frontends_are_local_routes_that_only_lbd_removes() {
    let topo = Topology::new("lroute").expect("topology");
    // Someone else's local route for a frontend lbd will serve, and a route
    // of lbd's protocol that this lbd did not add (another lbd's).
    topo.lb
        .ip(&[
            "route",
            "add",
            "local",
            "10.73.0.41/32",
            "dev",
            "lo",
            "table",
            "local",
        ])
        .unwrap();
    topo.lb
        .ip(&[
            "route",
            "add",
            "local",
            "10.73.0.99/32",
            "dev",
            "lo",
            "table",
            "local",
            "proto",
            "76",
        ])
        .unwrap();
    let config = |more: &str| {
        format!(
            "[[service]]\nname = \"empty\"\nfrontend = \"10.73.0.40:80/tcp\"\n\n\
             [[service]]\nname = \"theirs\"\nfrontend = \"10.73.0.41:80/tcp\"\n\n\
             [[service]]\nname = \"empty6\"\nfrontend = \"[fd00:73::40]:80/tcp\"\n{more}"
        )
    };
    let leaving = "\n[[service]]\nname = \"leaving\"\nfrontend = \"10.73.0.42:80/tcp\"\n";
    let mut lbd = Lbd::start(&topo.lb, "lroute", &config(leaving), &["lbc0"]).expect("lbd");
    let ours = [
        "local 10.73.0.40 ",
        "local 10.73.0.42 ",
        "local fd00:73::40 ",
    ];
    wait_until(Duration::from_secs(5), "the frontends' routes", || {
        let routes = local_routes(&topo, true);
        ours.iter().all(|r| routes.contains(r))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", local_routes(&topo, false)));
    let lo = topo.lb.sh("ip -o addr show dev lo").unwrap();
    let lo = String::from_utf8_lossy(&lo.stdout).into_owned();
    assert!(
        !lo.contains("10.73.0.4") && !lo.contains("fd00:73::"),
        "{lo}"
    );
    for frontend in ["10.73.0.40:80", "[fd00:73::40]:80"] {
        let err = topo
            .client
            .run(|| tcp_request(frontend.parse().unwrap(), TIMEOUT))
            .expect_err("no backend, yet an answer");
        assert!(
            format!("{err:#}").contains("refused"),
            "{frontend}: {err:#}"
        );
    }

    // A crash leaves the routes; the next lbd knows them as its own.
    lbd.kill();
    let routes = local_routes(&topo, true);
    assert!(ours.iter().all(|r| routes.contains(r)), "{routes}");
    lbd.spawn(&topo.lb, &["lbc0"]).expect("lbd again");
    lbd.reload(&config("")).unwrap();
    wait_until(
        Duration::from_secs(5),
        "the route of a removed frontend to go",
        || !local_routes(&topo, true).contains("local 10.73.0.42 "),
    )
    .unwrap();

    assert!(lbd.stop());
    let (status, err) = lbd.cleanup().unwrap();
    assert!(status.success(), "{err}");
    let routes = local_routes(&topo, false);
    assert!(
        !routes.contains("local 10.73.0.40 ") && !routes.contains("local fd00:73::40 "),
        "{routes}"
    );
    assert!(routes.contains("local 10.73.0.41 "), "{routes}");
    assert!(routes.contains("local 10.73.0.99 "), "{routes}");
}
