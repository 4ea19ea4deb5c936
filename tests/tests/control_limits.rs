//! The control plane at its limits: a conntrack table with a million
//! entries must not slow `lbctl status` down, and a service that does not
//! fit in the maps must not take room from the services that follow.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{maps, Config, CtEntry, FlowKey, CT_REPLY, PROTO_TCP, ST_CONFIRMED, ST_SEEN_REPLY};
use lb_tests::lbd::{lbctl, Lbd};
use lb_tests::netns::{unique_name, Netns};
use lb_tests::process::wait_until;
use serde_json::Value;

/// Connections written into CONNTRACK: two entries each.
const CONNECTIONS: u32 = 500_000;
/// Room for them, and then some.
const MAX_FLOWS: &str = "600000";
/// `lbctl status` calls timed, and the bound on the slowest of them. A
/// census walk of the full table takes seconds here; a status that waited
/// for one could not meet this.
const CALLS: usize = 20;
const STATUS_BOUND: Duration = Duration::from_millis(200);
/// How long the counts may take to become right: the census period (5 s)
/// plus a walk of the whole table on this slow, shared machine.
const COUNT_BOUND: Duration = Duration::from_secs(90);

const ONE_SERVICE: &str = r#"
[[service]]
name = "web"
frontend = "10.73.0.10:80/tcp"
backends = ["10.72.1.2:8080"]
"#;

fn v4(a: Ipv4Addr) -> [u8; 16] {
    lb_common::v4_mapped(a.octets())
}

fn service<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
}

/// A handle of the test's own on a map lbd pinned.
fn pinned<T>(path: &std::path::Path) -> T
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let data = MapData::from_pin(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    T::try_from(Map::from_map_data(data).expect("map type")).expect("map handle")
}

/// Writes `CONNECTIONS` confirmed connections to `backend_id`, both halves
/// of each, seen just now by the datapath's clock.
fn fill_conntrack(pin_dir: &std::path::Path, backend_id: u32) -> Duration {
    let config: Array<MapData, Config> = pinned(&pin_dir.join(maps::CONFIG));
    let cfg = config.get(&0, 0).expect("the datapath's config");
    let now = lb_userspace::conntrack::now(&cfg);
    let mut ct: HashMap<MapData, FlowKey, CtEntry> = pinned(&pin_dir.join(maps::CONNTRACK));
    let frontend = v4(Ipv4Addr::new(10, 73, 0, 10));
    let backend = v4(Ipv4Addr::new(10, 72, 1, 2));
    let started = Instant::now();
    for i in 0..CONNECTIONS {
        let client = v4(Ipv4Addr::new(10, 99, (i >> 16) as u8, 1));
        let client_port = ((i & 0xffff) as u16).to_be();
        let entry = CtEntry {
            client,
            frontend,
            backend,
            client_port,
            frontend_port: 80u16.to_be(),
            backend_port: 8080u16.to_be(),
            backend_id,
            last_seen_ns: now,
            proto: PROTO_TCP,
            state: ST_CONFIRMED | ST_SEEN_REPLY,
            ..Default::default()
        };
        let forward = FlowKey {
            src: client,
            dst: frontend,
            sport: client_port,
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        let reply = FlowKey {
            src: backend,
            dst: client,
            sport: 8080u16.to_be(),
            dport: client_port,
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        ct.insert(forward, entry, 0).expect("a forward half");
        let entry = CtEntry {
            flags: CT_REPLY,
            ..entry
        };
        ct.insert(reply, entry, 0).expect("a reply half");
    }
    started.elapsed()
}

#[test]
fn status_answers_at_once_while_a_million_entries_are_counted() {
    let ns = Netns::new(&unique_name("ctfull")).expect("namespace");
    let lbd =
        Lbd::start_with(&ns, "ctfull", ONE_SERVICE, &[], &["--max-flows", MAX_FLOWS]).expect("lbd");
    let status = lbd.status().unwrap();
    let backend_id = service(&status, "web").expect("web")["backends"][0]["id"]
        .as_u64()
        .unwrap() as u32;
    let filled = fill_conntrack(&lbd.pin_dir, backend_id);

    // Each call asks for a fresher census, so walks run in the background
    // while these are answered.
    let mut times = Vec::new();
    for _ in 0..CALLS {
        let t = Instant::now();
        lbctl(&lbd.socket, &["status", "--json"]).expect("status");
        times.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    times.sort();
    let p50 = times[CALLS / 2];
    let p99 = times[CALLS - 1];

    let mut last = Value::Null;
    let counted = wait_until(COUNT_BOUND, "the census to count every entry", || {
        last = lbd.status().unwrap();
        let web = service(&last, "web").unwrap();
        last["conntrack"]["confirmed"] == u64::from(CONNECTIONS)
            && last["conntrack_entries"] == u64::from(CONNECTIONS)
            && web["backends"][0]["active_flows"] == u64::from(CONNECTIONS)
    });
    let ct = &last["conntrack"];
    eprintln!(
        "{} entries written in {filled:?}; lbctl status over {CALLS} calls: p50 {p50:?}, \
         max {p99:?} (bound {STATUS_BOUND:?}); census walk {} ms, age {} ms",
        2 * CONNECTIONS,
        ct["census_walk_ms"],
        ct["census_age_ms"],
    );
    counted.unwrap_or_else(|e| panic!("{e:#}: last status {last:#}"));
    assert!(
        p99 < STATUS_BOUND,
        "lbctl status took up to {p99:?} with a full table: {times:?}"
    );
    assert!(ct["census_age_ms"].is_u64(), "no census age: {ct}");
    let table = lbctl(&lbd.socket, &["status"]).unwrap();
    assert!(table.contains("s ago in"), "{table}");
    drop(lbd);
}

fn two_services(second: &str, frontend: &str, backends: usize) -> String {
    let list: Vec<String> = (1..=backends)
        .map(|i| format!("\"10.72.{i}.3:8080\""))
        .collect();
    format!(
        "{ONE_SERVICE}\n[[service]]\nname = \"{second}\"\nfrontend = \"{frontend}\"\nbackends = [{}]\n",
        list.join(", ")
    )
}

#[test]
fn a_service_that_does_not_fit_fails_the_reload_and_leaks_nothing() {
    let ns = Netns::new(&unique_name("nofit")).expect("namespace");
    // Room for four backends: web takes one.
    let lbd =
        Lbd::start_with(&ns, "nofit", ONE_SERVICE, &[], &["--max-backends", "4"]).expect("lbd");

    // "big" needs four more: the first three fit, the fourth does not.
    lbd.reload(&two_services("big", "10.73.0.11:80/tcp", 4))
        .unwrap();
    let mut error = String::new();
    wait_until(Duration::from_secs(10), "the reload to fail", || {
        let status = lbd.status().unwrap();
        status["config"]["last_error"]
            .as_str()
            .map(|e| error = e.to_string())
            .is_some()
    })
    .unwrap();
    assert!(error.contains("big") && error.contains("full"), "{error}");
    let status = lbd.status().unwrap();
    assert!(service(&status, "big").is_none(), "{status:#}");
    assert!(service(&status, "web").is_some(), "{status:#}");
    assert_eq!(status["failing"], serde_json::json!([]), "{status:#}");

    // Exactly the room left by web: three backends. Had "big" left its
    // first three behind, there would be none.
    lbd.reload(&two_services("other", "10.73.0.12:80/tcp", 3))
        .unwrap();
    let mut last = Value::Null;
    let applied = wait_until(Duration::from_secs(10), "the second reload", || {
        last = lbd.status().unwrap();
        service(&last, "other").is_some() && last["config"]["last_error"].is_null()
    });
    applied.unwrap_or_else(|e| panic!("{e:#}: {last:#}\nlbd's log:\n{}", lbd.log()));
    let other = service(&last, "other").unwrap();
    assert_eq!(other["backends"].as_array().unwrap().len(), 3);
    drop(lbd);
}
