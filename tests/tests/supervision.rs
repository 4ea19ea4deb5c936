//! lbd as a service: its background tasks are supervised, and it tells
//! systemd when it is ready, reloading and stopping.

use std::time::Duration;

use lb_tests::echo::tcp_request;
use lb_tests::lbd::Lbd;
use lb_tests::notify::NotifySocket;
use lb_tests::process::wait_until;
use lb_tests::topology::{echo_bin, Topology};
use serde_json::Value;

const CONFIG: &str = r#"
[[service]]
name = "web"
frontend = "10.73.0.10:80/tcp"
backends = ["10.72.1.2:8080", "10.72.2.2:8080"]
"#;

fn interfaces(status: &Value) -> Vec<String> {
    status["interfaces"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The interface watcher fails (here by an injected fault, in production
/// when its netlink socket breaks): it is restarted, the failure shows in
/// status and metrics, and an interface created afterwards is attached.
#[test]
fn a_failed_interface_watcher_is_restarted_and_attaches_new_interfaces() {
    let mut topo = Topology::new("superv").expect("topology");
    topo.start_servers(&echo_bin(), 8080, 5353)
        .expect("servers");
    let lbd = Lbd::start_with(
        &topo.lb,
        "superv",
        CONFIG,
        &["lbc0", "lbb1", "lbb2", "lbb3"],
        &["--inject-fault", "interfaces"],
    )
    .expect("lbd");

    wait_until(
        Duration::from_secs(10),
        "the watcher to be restarted",
        || {
            lbd.status().is_ok_and(|s| {
                let t = &s["tasks"]["interfaces"];
                t["restarts"].as_u64() >= Some(1) && t["running"] == true
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lbd.log()));
    let status = lbd.status().unwrap();
    assert!(
        status["tasks"]["interfaces"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("injected")),
        "{status:#}"
    );
    assert!(lbd.log().contains("interfaces failed"), "{}", lbd.log());

    // A backend added after the failure: its veth on the LB node must be
    // attached by the restarted watcher.
    let idx = topo.add_backend().expect("a fourth backend");
    let new_if = topo.backends[idx].lb_if.clone();
    wait_until(Duration::from_secs(10), "the new interface", || {
        lbd.status().is_ok_and(|s| interfaces(&s).contains(&new_if))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", lbd.log()));
    // And the datapath still serves.
    topo.client
        .run(|| tcp_request("10.73.0.10:80".parse().unwrap(), Duration::from_secs(3)))
        .expect("a request through the balancer");
    let status = lbd.status().unwrap();
    assert_eq!(status["tasks"]["interfaces"]["restarts"], 1, "{status:#}");
    assert_eq!(status["tasks"]["control"]["restarts"], 0, "{status:#}");
    drop(lbd);
}

/// READY once the state is applied, RELOADING (with the monotonic time,
/// which systemd 253+ requires) then READY again on SIGHUP, STOPPING on the
/// way out; `--log-level warn` keeps informational lines out of the log.
#[test]
fn lbd_tells_systemd_when_it_is_ready_reloading_and_stopping() {
    let topo = Topology::new("notify").expect("topology");
    let notify = NotifySocket::new("lbd-notify").expect("notify socket");
    let path = notify.path.to_str().unwrap().to_string();
    let mut lbd = Lbd::start_within(
        &topo.lb,
        "notify",
        CONFIG,
        &["lbc0"],
        &["--log-level", "warn"],
        &[("NOTIFY_SOCKET", &path)],
        lb_tests::lbd::START_TIMEOUT,
    )
    .expect("lbd");
    let ready = notify.expect("READY=1");
    assert!(ready.contains("STATUS=1 services"), "{ready:?}");

    lbd.reload(CONFIG).unwrap();
    let reloading = notify.expect("RELOADING=1");
    assert!(
        reloading.lines().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok())),
        "{reloading:?}"
    );
    notify.expect("READY=1");

    assert!(lbd.stop(), "lbd exits cleanly");
    notify.expect("STOPPING=1");
    let log = lbd.log();
    assert!(
        !log.contains(" INFO "),
        "info lines at --log-level warn:\n{log}"
    );
}
