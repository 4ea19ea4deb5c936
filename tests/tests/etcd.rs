//! lbd with etcd as a source (docs: the etcd interface): services written
//! under `/lb/services/` in the native layout, a config-file service whose
//! backends are a confd-style key prefix, etcd going away and coming back
//! under load, and the registrator publishing labelled containers of three
//! Docker hosts. Every test starts a real etcd (Debian's etcd-server) in a
//! namespace of its own and removes it, its data and every namespace it
//! creates, also on failure. Needs root.
//!
//! Run with `--test-threads=1` (the timing assertions assume an otherwise
//! idle machine) and `--nocapture` to see the measurements.
//!
//! The tests without Docker use this topology (backends run `lb-bulk` on
//! port 9000, named b1..b3; lbd's etcd services use full NAT, so the
//! backends see lbd's node address):
//!
//! ```text
//!   client ns                 lb ns (lbd)                       backend ns bI
//!   eth0 10.71.0.2 ---------- lbc0 10.71.0.1
//!   default via 10.71.0.1     lbbI 10.72.I.1 ------------------ eth0 10.72.I.2
//!                                                               default via 10.72.I.1
//!                             lbe0 10.74.0.1 ------------------ eth0 10.74.0.5
//!                                                               etcd ns (etcd :2379)
//! ```
//!
//! `registrator_three_hosts` uses [`Cluster::standalone`]'s (three Docker
//! hosts, no Swarm) with etcd attached to the underlay; each node runs lbd
//! and one labelled container publishing port 8080:
//!
//! ```text
//!   client ns            underlay ns (br0)      node ns i (dockerd i + lbd)
//!   eth0 10.74.0.2 ----- c  br0  n1 n2 n3 ----- eth0 10.74.0.(10+i)  docker0 172.17.0.1/16
//!   10.73.0.10 via           |                  container web-ni 172.17.0.2:80, published :8080
//!   one node at a time       etcd ------------- eth0 10.74.0.5  etcd ns (etcd :2379)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lb_tests::bulk::{self, bulk_bin, human};
use lb_tests::docker::{
    container_ip, http_whoami, node_addr, until_all_answer, whoami_when_ready, Cluster, Node,
};
use lb_tests::etcd::{self, Etcd, EtcdClient};
use lb_tests::lbd::Lbd;
use lb_tests::load::{until_stopped, Bounds, Sample, StopOnDrop};
use lb_tests::netns::{command_in, unique_name, Netns};
use lb_tests::process::{wait_until, ChildGuard};
use lb_tests::swarm::{wait_docker_connected, IMAGE};
use lb_tests::topology::{Topology, LB_IFACES};
use serde_json::Value;

const PREFIX: &str = "/lb";
const FRONTEND: &str = "10.73.0.10:80/tcp";
const VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 73, 0, 10)), 80);
/// Where frontends from etcd may be (`--label-frontends`).
const LABEL_RANGE: &str = "10.73.0.0/24";
const ETCD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 74, 0, 5);
/// The lb namespace's end of the link to etcd.
const LB_ETCD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 74, 0, 1);
const LB_ETCD_IF: &str = "lbe0";
const BULK_PORT: u16 = 9000;
/// One request; lbd's maps are local, so any answer takes milliseconds.
const TIMEOUT: Duration = Duration::from_secs(1);
/// How long lbd may take to show a state it was given.
const CONVERGE: Duration = Duration::from_secs(10);
/// Bound of one put's convergence wait in the measurement.
const STEP_BOUND: Duration = Duration::from_secs(5);
const CONVERGENCE_STEPS: usize = 50;
const CONVERGENCE_P99: Duration = Duration::from_millis(100);
const BULK_BYTES: u64 = 8 << 20;
const BULK_BOUND: Duration = Duration::from_secs(30);
/// Bounds of the background load.
const LOAD_MAX_REQUESTS: usize = 20_000;
const LOAD_MAX_TIME: Duration = Duration::from_secs(90);
const LOAD_PAUSE: Duration = Duration::from_millis(5);
/// lbd must notice a stopped etcd and, once it is back, catch up within
/// these.
const NOTICE_BOUND: Duration = Duration::from_secs(15);
const RECONNECT_BOUND: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Keys and status

fn key(service: &str, rest: &str) -> String {
    format!("{PREFIX}/services/{service}/{rest}")
}

/// Backend `i`'s bulk server.
fn backend(i: usize) -> String {
    format!("10.72.{i}.2:{BULK_PORT}")
}

fn status(lbd: &Lbd) -> Value {
    lbd.status().expect("lbctl status --json")
}

/// Every service lbd serves behind `frontend` (one, unless lbd splits it).
fn services_for<'a>(status: &'a Value, frontend: &str) -> Vec<&'a Value> {
    status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["frontend"] == frontend)
        .collect()
}

/// Backend address -> weight, over every service behind `frontend`.
fn backends_of(status: &Value, frontend: &str) -> BTreeMap<String, u64> {
    services_for(status, frontend)
        .into_iter()
        .filter_map(|s| s["backends"].as_array())
        .flatten()
        .filter_map(|b| Some((b["address"].as_str()?.to_owned(), b["weight"].as_u64()?)))
        .collect()
}

fn addresses_of(status: &Value, frontend: &str) -> BTreeSet<String> {
    backends_of(status, frontend).into_keys().collect()
}

/// Backends `ids` of the bulk servers, each of weight 1.
fn unweighted(ids: &[usize]) -> BTreeMap<String, u64> {
    ids.iter().map(|&i| (backend(i), 1)).collect()
}

/// Waits until lbd serves exactly `want` (address -> weight) behind
/// `frontend`; returns the status that showed it.
fn wait_backends(lbd: &Lbd, frontend: &str, want: &BTreeMap<String, u64>) -> Value {
    let mut last = Value::Null;
    let done = wait_until(CONVERGE, &format!("lbd to serve {want:?}"), || {
        last = lbd.status().unwrap_or(Value::Null);
        backends_of(&last, frontend) == *want
    });
    if let Err(e) = done {
        panic!(
            "{e:#}: {frontend} has {:?}\nstatus: {last:#}",
            backends_of(&last, frontend)
        );
    }
    last
}

fn applied_revision(status: &Value) -> u64 {
    status["etcd"]["applied_revision"].as_u64().unwrap_or(0)
}

/// Waits until lbd's maps hold etcd's state at `revision` or later;
/// returns that status.
fn wait_applied(lbd: &Lbd, revision: u64, bound: Duration) -> Value {
    let mut last = Value::Null;
    let done = wait_until(bound, &format!("lbd to apply revision {revision}"), || {
        last = lbd.status().unwrap_or(Value::Null);
        applied_revision(&last) >= revision
    });
    if let Err(e) = done {
        panic!("{e:#}\netcd status: {:#}", last["etcd"]);
    }
    last
}

fn wait_etcd_connected(lbd: &Lbd, connected: bool, bound: Duration) -> Value {
    let mut last = Value::Null;
    let done = wait_until(bound, &format!("lbd's etcd connected={connected}"), || {
        last = lbd.status().unwrap_or(Value::Null);
        last["etcd"]["connected"] == connected
    });
    if let Err(e) = done {
        panic!(
            "{e:#}\netcd status: {:#}\nlog:\n{}",
            last["etcd"],
            lbd.log()
        );
    }
    last
}

fn rejected(status: &Value) -> Vec<String> {
    status["etcd"]["rejected"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str().map(String::from))
        .collect()
}

fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_micros()
        .try_into()
        .expect("fits 64 bits")
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------
// Traffic

/// One request on a new connection: a 16-byte download from whichever bulk
/// server the load balancer picks; returns its name.
fn ask(target: SocketAddr) -> anyhow::Result<String> {
    bulk::download(target, 16, TIMEOUT).map(|t| t.backend)
}

/// `n` requests, each must be answered; how many each backend answered.
fn spread(client: &Netns, target: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    client.run(|| {
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let name = ask(target).unwrap_or_else(|e| panic!("request {i} of {n}: {e:#}"));
            *seen.entry(name).or_insert(0) += 1;
        }
        seen
    })
}

fn assert_answer(client: &Netns, n: usize, want: &[&str]) -> BTreeMap<String, usize> {
    let seen = spread(client, VIP, n);
    let names: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        want.iter().copied().collect(),
        "answers of {n} requests: {seen:?}"
    );
    seen
}

/// Requests back to back until `stop` is set (or the bounds are reached).
fn load(client: &Netns, target: SocketAddr, stop: &AtomicBool) -> Vec<Sample> {
    let bounds = Bounds {
        max_requests: LOAD_MAX_REQUESTS,
        max_time: LOAD_MAX_TIME,
        pause: LOAD_PAUSE,
    };
    until_stopped(client, stop, bounds, || ask(target))
}

// ---------------------------------------------------------------------------
// The topology without Docker

/// Client, lb and three backends with bulk servers, etcd next to lb. Fields
/// drop in order: lbd first, then etcd, the servers and the namespaces.
struct Env {
    lbd: Option<Lbd>,
    etcd: Etcd,
    _servers: Vec<ChildGuard>,
    _etcd_ns: Netns,
    topo: Topology,
    tag: String,
}

impl Env {
    fn new(tag: &str) -> Self {
        Self::build(tag, false)
    }

    /// With an etcd that serves only https, to client certificates of its CA.
    fn tls(tag: &str) -> Self {
        Self::build(tag, true)
    }

    fn build(tag: &str, tls: bool) -> Self {
        let topo = Topology::new(tag).expect("topology");
        let etcd_ns = Netns::new(&unique_name(&format!("{tag}-e"))).expect("etcd namespace");
        topo.lb
            .ip(&[
                "link",
                "add",
                LB_ETCD_IF,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                etcd_ns.name(),
            ])
            .unwrap();
        topo.lb
            .ip(&[
                "addr",
                "add",
                &format!("{LB_ETCD_ADDR}/24"),
                "dev",
                LB_ETCD_IF,
            ])
            .unwrap();
        topo.lb.ip(&["link", "set", LB_ETCD_IF, "up"]).unwrap();
        etcd_ns
            .ip(&["addr", "add", &format!("{ETCD_ADDR}/24"), "dev", "eth0"])
            .unwrap();
        etcd_ns.ip(&["link", "set", "eth0", "up"]).unwrap();
        let servers = topo
            .backends
            .iter()
            .map(|b| bulk::start_server(&b.ns, &bulk_bin(), &b.name, BULK_PORT).expect("bulk"))
            .collect();
        let etcd = match tls {
            true => Etcd::new_tls(&etcd_ns, tag, IpAddr::V4(ETCD_ADDR)),
            false => Etcd::new(&etcd_ns, tag, IpAddr::V4(ETCD_ADDR)),
        }
        .expect("etcd");
        Self {
            lbd: None,
            etcd,
            _servers: servers,
            _etcd_ns: etcd_ns,
            topo,
            tag: tag.to_owned(),
        }
    }

    fn kv(&self) -> &EtcdClient {
        self.etcd.client()
    }

    /// Starts lbd with `config` and `--etcd` plus `extra`, and waits until
    /// it is connected to etcd.
    fn start_lbd(&mut self, config: &str, extra: &[&str]) {
        let endpoint = self.etcd.endpoint();
        let mut args = vec!["--etcd", &endpoint];
        args.extend_from_slice(extra);
        let lbd =
            Lbd::start_with(&self.topo.lb, &self.tag, config, &LB_IFACES, &args).expect("lbd");
        wait_etcd_connected(&lbd, true, CONVERGE);
        self.lbd = Some(lbd);
    }

    fn lbd(&self) -> &Lbd {
        self.lbd.as_ref().expect("lbd was started")
    }

    fn client(&self) -> &Netns {
        &self.topo.client
    }

    /// Puts `web`'s frontend and backends 1 to 3.
    fn put_web(&self) -> u64 {
        self.kv().put(&key("web", "frontend"), FRONTEND).unwrap();
        let mut rev = 0;
        for i in 1..=3 {
            rev = self
                .kv()
                .put(&key("web", &format!("backends/b{i}")), &backend(i))
                .unwrap();
        }
        rev
    }
}

// ---------------------------------------------------------------------------
// The harness's own etcd

#[test]
fn etcd_server_keeps_its_data_across_restarts_and_leaves_nothing_behind() {
    let ns = Netns::new(&unique_name("eh")).unwrap();
    ns.ip(&["addr", "add", "10.74.0.5/32", "dev", "lo"])
        .unwrap();
    ns.ip(&["addr", "add", "10.74.0.6/32", "dev", "lo"])
        .unwrap();
    let mut server = Etcd::new(&ns, "h", IpAddr::V4(ETCD_ADDR)).unwrap();
    let data_dir = server.data_dir();
    let kv = server.client();
    let r1 = kv.put("/t/a", "1").unwrap();
    let r2 = kv.put("/t/b", "2").unwrap();
    assert!(r2 > r1, "revisions {r1} then {r2}");
    let leased = kv.lease_put("/t/l", "x", 2).unwrap();
    assert!(leased.revision > r2);
    assert!(kv.lease_alive(leased.lease).unwrap());
    assert_eq!(kv.get_prefix("/t/").unwrap().len(), 3);

    server.stop();
    let t = Instant::now();
    assert!(server.client().put("/t/c", "3").is_err(), "etcd is stopped");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    server.start().unwrap();
    let kv = server.client();
    assert_eq!(kv.get_prefix("/t/a").unwrap()["/t/a"], "1");
    assert!(kv.revision().unwrap() >= leased.revision);
    server.kill();
    server.start().unwrap();
    let kv = server.client();
    assert_eq!(kv.get_prefix("/t/b").unwrap()["/t/b"], "2");
    // Nobody keeps the lease alive (a restart renews it once).
    wait_until(Duration::from_secs(10), "the lease to expire", || {
        kv.get_prefix("/t/l").is_ok_and(|m| m.is_empty())
    })
    .unwrap();
    let deleted = kv.delete("/t/a").unwrap();
    assert!(deleted > leased.revision);
    kv.delete_prefix("/t/").unwrap();
    assert!(kv.get_prefix("/t/").unwrap().is_empty());
    drop(server);
    assert!(!data_dir.exists(), "{} is left", data_dir.display());

    // An etcd of a test process that no longer exists: found by its data
    // directory, killed, and its directory removed.
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let pid = dead.id();
    dead.wait().unwrap();
    let stale = etcd::root().join(format!("lbt-{pid}-etcd-stale"));
    std::fs::create_dir_all(&stale).unwrap();
    let mut cmd = command_in(&ns.path(), etcd::ETCD_BIN);
    cmd.arg("--name")
        .arg("stale")
        .arg("--data-dir")
        .arg(stale.join("data"))
        .args(["--listen-client-urls", "http://10.74.0.6:2379"])
        .args(["--advertise-client-urls", "http://10.74.0.6:2379"])
        .args(["--listen-peer-urls", "http://10.74.0.6:2380"])
        .args(["--initial-advertise-peer-urls", "http://10.74.0.6:2380"])
        .args(["--initial-cluster", "stale=http://10.74.0.6:2380"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut orphan = ChildGuard::spawn(&mut cmd).unwrap();
    wait_until(Duration::from_secs(10), "the stale etcd's data", || {
        stale.join("data").exists()
    })
    .unwrap();
    etcd::cleanup_stale();
    let gone = wait_until(Duration::from_secs(5), "the stale etcd to exit", || {
        orphan.try_wait().is_some()
    });
    let left = stale.exists();
    let _ = std::fs::remove_dir_all(&stale);
    gone.unwrap();
    assert!(!left, "{} is left", stale.display());
}

// ---------------------------------------------------------------------------
// The native layout

#[test]
fn native_layout_and_malformed_keys() {
    let mut env = Env::new("enat");
    // Written before lbd starts: its first sync.
    env.put_web();
    env.start_lbd("", &["--label-frontends", LABEL_RANGE]);
    let s = wait_backends(env.lbd(), FRONTEND, &unweighted(&[1, 2, 3]));
    let services = services_for(&s, FRONTEND);
    assert_eq!(services.len(), 1, "{services:#?}");
    eprintln!(
        "etcd service: name {}, source {}; etcd status: {}",
        services[0]["name"], services[0]["source"], s["etcd"]
    );
    assert_eq!(s["etcd"]["prefix"], PREFIX, "{:#}", s["etcd"]);
    assert_eq!(
        s["etcd"]["endpoints"],
        serde_json::json!([env.etcd.endpoint()]),
        "{:#}",
        s["etcd"]
    );
    let seen = assert_answer(env.client(), 90, &["b1", "b2", "b3"]);
    eprintln!("web: 90 requests, {seen:?}");

    // Bulk transfers both ways through the VIP.
    env.client().run(|| {
        for round in 0..2 {
            let down = bulk::download(VIP, BULK_BYTES, BULK_BOUND)
                .unwrap_or_else(|e| panic!("download {round}: {e:#}"));
            let up = bulk::upload(VIP, BULK_BYTES, BULK_BOUND)
                .unwrap_or_else(|e| panic!("upload {round}: {e:#}"));
            for (what, t) in [("download", &down), ("upload", &up)] {
                eprintln!(
                    "bulk {what} {round}: {} from {} in {:.0} ms (peer seen {})",
                    human(t.bytes),
                    t.backend,
                    t.elapsed.as_secs_f64() * 1e3,
                    t.peer
                );
            }
        }
    });

    // Malformed keys are skipped and listed; the rest keeps serving.
    let bad_backend = key("web", "backends/bad");
    let unknown = key("web", "colour");
    let outside = key("outside", "frontend");
    env.kv().put(&bad_backend, "10.72.9.2:99999").unwrap();
    env.kv().put(&unknown, "blue").unwrap();
    env.kv()
        .put(&key("outside", "backends/a"), &backend(1))
        .unwrap();
    let rev = env.kv().put(&outside, "10.99.0.10:80/tcp").unwrap();
    let s = wait_applied(env.lbd(), rev, CONVERGE);
    let listed = rejected(&s);
    eprintln!("rejected: {listed:#?}");
    for k in [&bad_backend, &unknown, &outside] {
        assert!(
            listed.iter().any(|r| r.starts_with(&format!("{k}: "))),
            "{k} is not in etcd.rejected: {listed:#?}"
        );
    }
    assert!(
        services_for(&s, "10.99.0.10:80/tcp").is_empty(),
        "a frontend outside {LABEL_RANGE} is served: {:#}",
        s["services"]
    );
    assert_eq!(backends_of(&s, FRONTEND), unweighted(&[1, 2, 3]));
    assert_answer(env.client(), 60, &["b1", "b2", "b3"]);

    // A deleted backend key takes its backend away.
    let rev = env.kv().delete(&key("web", "backends/b3")).unwrap();
    wait_applied(env.lbd(), rev, CONVERGE);
    wait_backends(env.lbd(), FRONTEND, &unweighted(&[1, 2]));
    assert_answer(env.client(), 60, &["b1", "b2"]);

    // Convergence: one change at a time, from just before the put to the
    // map write lbd reports for it.
    let mut want = unweighted(&[1, 2]);
    let mut latencies_ms = Vec::new();
    for step in 0..CONVERGENCE_STEPS {
        let (k, value) = if step % 2 == 0 {
            let w = 2 + (step / 2) % 3;
            want.insert(backend(1), w as u64);
            (
                key("web", "backends/b1"),
                Some(format!("{} weight={w}", backend(1))),
            )
        } else if want.remove(&backend(3)).is_some() {
            (key("web", "backends/b3"), None)
        } else {
            want.insert(backend(3), 1);
            (key("web", "backends/b3"), Some(backend(3)))
        };
        let t0 = unix_us(SystemTime::now());
        let rev = match &value {
            Some(v) => env.kv().put(&k, v),
            None => env.kv().delete(&k),
        }
        .unwrap_or_else(|e| panic!("step {step}: {e:#}"));
        let s = wait_applied(env.lbd(), rev, STEP_BOUND);
        assert_eq!(
            backends_of(&s, FRONTEND),
            want,
            "step {step} ({k} = {value:?}): lbd reports revision {} applied",
            applied_revision(&s)
        );
        let applied_at = s["etcd"]["applied_at_us"]
            .as_u64()
            .unwrap_or_else(|| panic!("no etcd.applied_at_us: {:#}", s["etcd"]));
        let latency_us = applied_at as i64 - t0 as i64;
        assert!(
            latency_us >= 0,
            "step {step}: revision {rev} applied at {applied_at} us, before the put ({t0} us)"
        );
        latencies_ms.push(latency_us as f64 / 1e3);
    }
    let mut sorted = latencies_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let (p50, p99, max) = (
        percentile(&sorted, 50.0),
        percentile(&sorted, 99.0),
        sorted[sorted.len() - 1],
    );
    eprintln!(
        "etcd: convergence p50 {p50:.1} ms p99 {p99:.1} ms max {max:.1} ms ({} samples)",
        sorted.len()
    );
    assert!(
        p99 < CONVERGENCE_P99.as_secs_f64() * 1e3,
        "p99 {p99:.1} ms; every sample (ms): {latencies_ms:.1?}"
    );
    let names: Vec<String> = want
        .keys()
        .map(|a| {
            let i = a.split('.').nth(2).unwrap();
            format!("b{i}")
        })
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_answer(env.client(), 60, &names);
}

// ---------------------------------------------------------------------------
// etcd going away

#[test]
fn etcd_down_and_restarted_under_load() {
    let mut env = Env::new("edown");
    env.put_web();
    env.start_lbd("", &["--label-frontends", LABEL_RANGE]);
    wait_backends(env.lbd(), FRONTEND, &unweighted(&[1, 2, 3]));

    let stop = AtomicBool::new(false);
    let mut marks: Vec<(&str, SystemTime)> = Vec::new();
    let samples = std::thread::scope(|scope| {
        let running = scope.spawn(|| load(&env.topo.client, VIP, &stop));
        let _stop = StopOnDrop(&stop);
        sleep(Duration::from_secs(1));

        marks.push(("etcd stopped", SystemTime::now()));
        env.etcd.stop();
        let s = wait_etcd_connected(env.lbd(), false, NOTICE_BOUND);
        marks.push(("lbd saw it", SystemTime::now()));
        let err = &s["etcd"]["last_error"];
        eprintln!("while etcd is down: {:#}", s["etcd"]);
        assert!(
            err.as_str().is_some_and(|e| !e.is_empty()),
            "no last_error while disconnected: {:#}",
            s["etcd"]
        );
        // Whatever lbd last had keeps serving.
        sleep(Duration::from_secs(2));
        let s = status(env.lbd());
        assert_eq!(s["etcd"]["connected"], false, "{:#}", s["etcd"]);
        assert_eq!(backends_of(&s, FRONTEND), unweighted(&[1, 2, 3]));

        env.etcd.start().expect("etcd restart");
        marks.push(("etcd back", SystemTime::now()));
        // Changed at once, most likely before lbd is back: lbd must pick
        // them up when it resumes or resyncs. b3 is drained (weight 0), not
        // deleted: a deleted backend's connections end with it (section 3.1
        // of docs/datapath.md), and one of the load's requests may be on it.
        env.kv()
            .put(
                &key("web", "backends/b3"),
                &format!("{} weight=0", backend(3)),
            )
            .unwrap();
        let rev = env
            .kv()
            .put(
                &key("web", "backends/b1"),
                &format!("{} weight=3", backend(1)),
            )
            .unwrap();
        wait_etcd_connected(env.lbd(), true, RECONNECT_BOUND);
        marks.push(("lbd reconnected", SystemTime::now()));
        wait_applied(env.lbd(), rev, RECONNECT_BOUND);
        marks.push(("lbd applied", SystemTime::now()));
        let want: BTreeMap<String, u64> =
            [(backend(1), 3), (backend(2), 1), (backend(3), 0)].into();
        let s = wait_backends(env.lbd(), FRONTEND, &want);
        eprintln!("after etcd came back: {:#}", s["etcd"]);
        sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        running.join().expect("load thread")
    });

    let mark = |what: &str| {
        marks
            .iter()
            .find(|(w, _)| *w == what)
            .map(|(_, t)| *t)
            .expect("marked")
    };
    let start = mark("etcd stopped");
    let ms = |t: SystemTime| t.duration_since(start).unwrap_or_default().as_secs_f64() * 1e3;
    let during = samples
        .iter()
        .filter(|s| s.at >= mark("etcd stopped") && s.at <= mark("etcd back"))
        .count();
    let failed: Vec<(f64, &str)> = samples
        .iter()
        .filter_map(|s| s.answer.as_ref().err().map(|e| (ms(s.at), e.as_str())))
        .collect();
    let after: BTreeSet<&str> = samples
        .iter()
        .filter(|s| s.at > mark("lbd applied"))
        .filter_map(|s| s.answer.as_deref().ok())
        .collect();
    eprintln!(
        "etcd down: {} requests, {during} while etcd was down, {} failed; {}",
        samples.len(),
        failed.len(),
        marks
            .iter()
            .map(|(what, t)| format!("{what} at {:+.0} ms", ms(*t)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(failed.is_empty(), "failed requests (ms, error): {failed:?}");
    assert!(during >= 50, "only {during} requests while etcd was down");
    assert_eq!(
        after,
        BTreeSet::from(["b1", "b2"]),
        "answers after the change"
    );
}

/// lbd cut off from etcd while keys change and the history is compacted:
/// resuming its watch from the last revision it saw is refused, so it reads
/// every key again, and a backend deleted meanwhile is gone, not kept.
#[test]
fn a_compacted_history_is_read_again() {
    let mut env = Env::new("ecomp");
    env.put_web();
    env.start_lbd("", &["--label-frontends", LABEL_RANGE]);
    wait_backends(env.lbd(), FRONTEND, &unweighted(&[1, 2, 3]));
    let resyncs = |s: &Value| s["etcd"]["resyncs"].as_u64().unwrap_or(0);
    assert_eq!(resyncs(&status(env.lbd())), 1);

    env.topo
        .lb
        .ip(&["link", "set", LB_ETCD_IF, "down"])
        .unwrap();
    wait_etcd_connected(env.lbd(), false, NOTICE_BOUND);
    env.kv().delete(&key("web", "backends/b2")).unwrap();
    let rev = env
        .kv()
        .put(
            &key("web", "backends/b1"),
            &format!("{} weight=2", backend(1)),
        )
        .unwrap();
    env.kv().compact(rev).unwrap();
    env.topo.lb.ip(&["link", "set", LB_ETCD_IF, "up"]).unwrap();

    wait_applied(env.lbd(), rev, RECONNECT_BOUND);
    let want: BTreeMap<String, u64> = [(backend(1), 2), (backend(3), 1)].into();
    let s = wait_backends(env.lbd(), FRONTEND, &want);
    assert_eq!(s["etcd"]["connected"], true, "{:#}", s["etcd"]);
    assert_eq!(
        resyncs(&s),
        2,
        "a full read after the compaction: {:#}",
        s["etcd"]
    );
    assert!(
        env.lbd().log().contains("compacted"),
        "lbd's log does not say why it read everything again:\n{}",
        env.lbd().log()
    );
    let answers = assert_answer(env.client(), 60, &["b1", "b3"]);
    eprintln!("after the compaction: {answers:?}");
}

/// An etcd that takes only TLS clients with a certificate of its CA: lbd
/// without one is refused and says why, keeping nothing it did not have;
/// with `--etcd-ca`, `--etcd-cert` and `--etcd-key` it is served.
#[test]
fn tls_with_a_client_certificate() {
    let mut env = Env::tls("etls");
    env.put_web();
    let endpoint = env.etcd.endpoint();
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    let tls = env.etcd.tls().expect("a TLS etcd").clone();
    let path = |p: &std::path::Path| p.display().to_string();
    let (ca, cert, client_key) = (path(&tls.ca), path(&tls.client_cert), path(&tls.client_key));
    {
        // It trusts etcd's CA but has no certificate of its own to show.
        let refused = Lbd::start_with(
            &env.topo.lb,
            "etlsno",
            "",
            &LB_IFACES,
            &[
                "--etcd",
                &endpoint,
                "--label-frontends",
                LABEL_RANGE,
                "--etcd-ca",
                &ca,
            ],
        )
        .expect("lbd");
        let deadline = Instant::now() + CONVERGE;
        let s = loop {
            let s = status(&refused);
            if s["etcd"]["last_error"].is_string() || Instant::now() > deadline {
                break s;
            }
            sleep(Duration::from_millis(50));
        };
        eprintln!("without a client certificate: {:#}", s["etcd"]);
        assert_eq!(s["etcd"]["connected"], false, "{:#}", s["etcd"]);
        assert!(s["etcd"]["last_error"].is_string(), "{:#}", s["etcd"]);
        assert!(services_for(&s, FRONTEND).is_empty(), "{s:#}");
    }
    env.start_lbd(
        "",
        &[
            "--label-frontends",
            LABEL_RANGE,
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &client_key,
        ],
    );
    wait_backends(env.lbd(), FRONTEND, &unweighted(&[1, 2, 3]));
    let rev = env.kv().delete(&key("web", "backends/b3")).unwrap();
    wait_applied(env.lbd(), rev, CONVERGE);
    assert_answer(env.client(), 60, &["b1", "b2"]);
}

// ---------------------------------------------------------------------------
// The confd layout

#[test]
fn confd_layout() {
    const APP: &str = "10.73.0.20:80/tcp";
    let app = SocketAddr::from(([10, 73, 0, 20], 80));
    let config = format!(
        "[[service]]\nname = \"app\"\nfrontend = \"{APP}\"\netcd_backends = \"/app/servers\"\n"
    );
    let mut env = Env::new("econf");
    env.kv().put("/app/servers/a", &backend(1)).unwrap();
    env.start_lbd(&config, &[]);
    wait_backends(env.lbd(), APP, &unweighted(&[1]));

    let check = |want: &[&str]| {
        let seen = spread(env.client(), app, 60);
        let names: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
        assert_eq!(names, want.iter().copied().collect(), "{seen:?}");
    };
    env.kv().put("/app/servers/b", &backend(2)).unwrap();
    wait_backends(env.lbd(), APP, &unweighted(&[1, 2]));
    check(&["b1", "b2"]);
    env.kv().put("/app/servers/c", &backend(3)).unwrap();
    wait_backends(env.lbd(), APP, &unweighted(&[1, 2, 3]));
    check(&["b1", "b2", "b3"]);
    env.kv().delete("/app/servers/a").unwrap();
    wait_backends(env.lbd(), APP, &unweighted(&[2, 3]));
    check(&["b2", "b3"]);
    let s = status(env.lbd());
    let services = services_for(&s, APP);
    assert_eq!(services.len(), 1, "{services:#?}");
    assert_eq!(services[0]["name"], "app");
    eprintln!(
        "confd: source {}, etcd status {}",
        services[0]["source"], s["etcd"]
    );
}

// ---------------------------------------------------------------------------
// The registrator on three Docker hosts

const WEB_PORT: u16 = 8080;
const REGISTER_TTL: Duration = Duration::from_secs(3);
/// How long a stopped container may stay on any node.
const REMOVAL_BOUND: Duration = Duration::from_secs(1);
const DOCKER_READY: Duration = Duration::from_secs(15);
const DOCKER_TIMEOUT: Duration = Duration::from_secs(1);

fn container_name(i: usize) -> String {
    format!("web-n{i}")
}

/// Runs the labelled test container of node `i` and waits until it
/// answers; returns its address on docker0.
fn run_web(node: &Node, i: usize) -> Ipv4Addr {
    let name = container_name(i);
    let publish = format!("{WEB_PORT}:80");
    node.dockerd
        .docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            &name,
            "-p",
            &publish,
            "--label",
            &format!("lb.frontend={FRONTEND}"),
            "--label",
            "lb.port=80",
            "--label",
            "lb.service=web",
            IMAGE,
        ])
        .expect("docker run");
    let ip = container_ip(&node.dockerd, &name, "bridge").expect("container address");
    let (answered, _) = node
        .ns
        .run(|| whoami_when_ready(SocketAddr::from((ip, 80)), DOCKER_READY, DOCKER_TIMEOUT));
    assert_eq!(answered, name);
    ip
}

fn route_via(client: &Netns, i: usize) {
    client
        .ip(&[
            "route",
            "replace",
            "10.73.0.10/32",
            "via",
            &node_addr(i).to_string(),
        ])
        .unwrap();
}

/// `n` requests that must all be answered, by names in `want` only.
fn all_answer_from(client: &Netns, n: usize, want: &BTreeSet<String>) -> BTreeMap<String, usize> {
    client.run(|| {
        let mut seen = BTreeMap::new();
        for i in 0..n {
            let (name, _) = http_whoami(VIP, DOCKER_TIMEOUT)
                .unwrap_or_else(|e| panic!("request {i} of {n}: {e:#}"));
            assert!(want.contains(&name), "{name} answered; want {want:?}");
            *seen.entry(name).or_insert(0) += 1;
        }
        seen
    })
}

fn names(ids: &[usize]) -> BTreeSet<String> {
    ids.iter().map(|&i| container_name(i)).collect()
}

#[test]
fn registrator_three_hosts() {
    let cluster = Cluster::standalone(3).expect("three Docker hosts");
    cluster.build_image(IMAGE).expect("test image");
    let etcd_ns = cluster.attach("etcd", ETCD_ADDR).expect("etcd namespace");
    let etcd = Etcd::new(&etcd_ns, "reg", IpAddr::V4(ETCD_ADDR)).expect("etcd");
    let kv = etcd.client();
    let endpoint = etcd.endpoint();

    // Nodes 1 and 2 have their container before lbd starts, node 3 after.
    let mut container_ips = BTreeMap::new();
    for i in [1, 2] {
        container_ips.insert(i, run_web(&cluster.nodes[i - 1], i));
    }
    let mut lbds: Vec<Lbd> = Vec::new();
    for (idx, node) in cluster.nodes.iter().enumerate() {
        let i = idx + 1;
        let host = format!("unix://{}", node.dockerd.socket().display());
        let node_name = format!("n{i}");
        let node_address = node.addr.to_string();
        let ttl = REGISTER_TTL.as_secs().to_string();
        let args = [
            "--docker",
            "--docker-host",
            &host,
            "--etcd",
            &endpoint,
            "--register",
            "--node-name",
            &node_name,
            "--node-address",
            &node_address,
            "--register-ttl",
            &ttl,
            "--label-frontends",
            LABEL_RANGE,
        ];
        let lbd = Lbd::start_with(
            &node.ns,
            &format!("reg{i}"),
            "",
            &["eth0", "docker0"],
            &args,
        )
        .unwrap_or_else(|e| panic!("lbd on node {i}: {e:#}"));
        wait_docker_connected(&lbd, true);
        wait_etcd_connected(&lbd, true, CONVERGE);
        lbds.push(lbd);
    }
    container_ips.insert(3, run_web(&cluster.nodes[2], 3));

    // Every container is registered under its node's name, at its node's
    // address and published port.
    let registration = |i: usize| key("web", &format!("backends/n{i}/{}", container_name(i)));
    let published = |i: usize| format!("{}:{WEB_PORT}", node_addr(i));
    let want_keys: BTreeMap<String, String> =
        (1..=3).map(|i| (registration(i), published(i))).collect();
    let mut last = BTreeMap::new();
    let registered = wait_until(CONVERGE, "three registrations", || {
        last = kv
            .get_prefix(&key("web", "backends/"))
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| {
                let addr = v.split_whitespace().next().unwrap_or_default().to_owned();
                (k, addr)
            })
            .collect();
        last == want_keys
    });
    if let Err(e) = registered {
        panic!("{e:#}: {last:#?}");
    }
    eprintln!(
        "registrations: {:#?}",
        kv.get_prefix(&key("web", "")).unwrap()
    );
    assert_eq!(
        kv.get_prefix(&key("web", "frontend")).unwrap()[&key("web", "frontend")],
        FRONTEND
    );
    for (idx, lbd) in lbds.iter().enumerate() {
        let i = idx + 1;
        let s = status(lbd);
        let listed: Vec<&str> = s["etcd"]["registered"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            listed.contains(&registration(i).as_str()),
            "node {i}: {:#}",
            s["etcd"]
        );
        assert!(s["etcd"]["lease"].is_u64(), "node {i}: {:#}", s["etcd"]);
    }

    // Through each node the client reaches all three containers.
    let all = names(&[1, 2, 3]);
    for i in 1..=3 {
        route_via(&cluster.client, i);
        until_all_answer(&cluster.client, VIP, &all, 300, DOCKER_TIMEOUT);
        let seen = all_answer_from(&cluster.client, 60, &all);
        eprintln!("via node {i}: {seen:?}");
    }

    // Stop node 2's container: it leaves every node within 1 s.
    let befores: Vec<BTreeSet<String>> = lbds
        .iter()
        .map(|l| addresses_of(&status(l), FRONTEND))
        .collect();
    let gone_addrs = |i: usize| -> BTreeSet<String> {
        let mut g = BTreeSet::from([published(2)]);
        if i == 2 {
            g.insert(format!("{}:80", container_ips[&2]));
        }
        g
    };
    for (idx, before) in befores.iter().enumerate() {
        assert!(
            !before.is_disjoint(&gone_addrs(idx + 1)),
            "node {}: web-n2 is not among {before:?}",
            idx + 1
        );
    }
    let before_stop = SystemTime::now();
    let node2 = &cluster.nodes[1].dockerd;
    let mut removed_at: Vec<Option<SystemTime>> = vec![None; 3];
    std::thread::scope(|scope| {
        let stopping = scope.spawn(|| node2.docker(&["stop", &container_name(2)]));
        let deadline = Instant::now() + CONVERGE;
        while removed_at.iter().any(Option::is_none) && Instant::now() < deadline {
            for (idx, lbd) in lbds.iter().enumerate() {
                if removed_at[idx].is_some() {
                    continue;
                }
                let now = addresses_of(&status(lbd), FRONTEND);
                let want: BTreeSet<String> = befores[idx]
                    .difference(&gone_addrs(idx + 1))
                    .cloned()
                    .collect();
                if now == want {
                    removed_at[idx] = Some(SystemTime::now());
                }
            }
            sleep(Duration::from_millis(10));
        }
        stopping.join().expect("docker stop").expect("docker stop");
    });
    let died = node2.event_time(&container_name(2), "die", before_stop);
    let after_die: Vec<String> = removed_at
        .iter()
        .enumerate()
        .map(|(idx, t)| match t {
            Some(t) => match t.duration_since(died) {
                Ok(d) => format!("node {}: {:.0} ms", idx + 1, d.as_secs_f64() * 1e3),
                Err(e) => format!(
                    "node {}: -{:.0} ms",
                    idx + 1,
                    e.duration().as_secs_f64() * 1e3
                ),
            },
            None => format!("node {}: not within {CONVERGE:?}", idx + 1),
        })
        .collect();
    eprintln!(
        "etcd: stopped container gone after its die event (polled through lbctl): {}",
        after_die.join(", ")
    );
    for (idx, t) in removed_at.iter().enumerate() {
        let t = t.unwrap_or_else(|| {
            panic!(
                "node {}: web-n2 still served: {:#}",
                idx + 1,
                status(&lbds[idx])["services"]
            )
        });
        assert!(
            t <= died + REMOVAL_BOUND,
            "node {}: {}",
            idx + 1,
            after_die[idx]
        );
    }
    assert!(
        !kv.get_prefix(&registration(2))
            .unwrap()
            .contains_key(&registration(2)),
        "the registration of the stopped container is left"
    );
    let rest = names(&[1, 3]);
    for i in 1..=3 {
        route_via(&cluster.client, i);
        let seen = all_answer_from(&cluster.client, 40, &rest);
        eprintln!("via node {i} after web-n2 stopped: {seen:?}");
    }

    // SIGKILL lbd on node 3: its registration goes with its lease, after
    // the TTL; the other lbds keep running and drop it.
    let survivors: Vec<u32> = lbds[..2]
        .iter()
        .map(|l| l.pid().expect("running"))
        .collect();
    let n3 = published(3);
    lbds[2].kill();
    let killed = Instant::now();
    for (idx, lbd) in lbds[..2].iter().enumerate() {
        assert!(
            addresses_of(&status(lbd), FRONTEND).contains(&n3),
            "node {}: node 3's backend left at once after the kill",
            idx + 1
        );
    }
    let mut left_at: Vec<Option<Duration>> = vec![None; 2];
    let bound = REGISTER_TTL + Duration::from_secs(2);
    while left_at.iter().any(Option::is_none) && killed.elapsed() < bound + CONVERGE {
        for (idx, lbd) in lbds[..2].iter().enumerate() {
            if left_at[idx].is_none() && !addresses_of(&status(lbd), FRONTEND).contains(&n3) {
                left_at[idx] = Some(killed.elapsed());
            }
        }
        sleep(Duration::from_millis(20));
    }
    eprintln!(
        "etcd: killed node's backend left the others after {left_at:?} (TTL {REGISTER_TTL:?})"
    );
    for (idx, t) in left_at.iter().enumerate() {
        let t = t.unwrap_or_else(|| panic!("node {}: node 3's backend never left", idx + 1));
        assert!(
            t <= bound,
            "node {}: node 3's backend left {t:?} after the kill, TTL {REGISTER_TTL:?}",
            idx + 1
        );
    }
    assert!(
        kv.get_prefix(&registration(3)).unwrap().is_empty(),
        "node 3's registration outlived its lease"
    );
    for (idx, lbd) in lbds[..2].iter_mut().enumerate() {
        assert_eq!(lbd.pid(), Some(survivors[idx]), "node {}", idx + 1);
        assert!(lbd.is_running(), "lbd on node {} exited", idx + 1);
    }
    let only = names(&[1]);
    for i in [1, 2] {
        route_via(&cluster.client, i);
        let seen = all_answer_from(&cluster.client, 40, &only);
        eprintln!("via node {i} after node 3's lbd was killed: {seen:?}");
    }
}
