//! `lbd --metrics`: the Prometheus exposition counts the traffic that went
//! through the load balancer, and the stats page, rendered by a real browser,
//! shows the services and backends that lbd serves.
//!
//! The browser is Debian's `chromium`, run headless inside the load
//! balancer's namespace, where the endpoint listens on that namespace's own
//! loopback. Set `LB_STATS_PAGE_PNG=path` to keep the screenshot.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lb_tests::echo::{tcp_request, udp_request};
use lb_tests::etcd::Etcd;
use lb_tests::lbd::{lbctl, Lbd};
use lb_tests::netns::Netns;
use lb_tests::process::{wait_until, ChildGuard};
use lb_tests::scratch::Scratch;
use lb_tests::topology::{echo_bin, Topology, LB_IFACES};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
const TIMEOUT: Duration = Duration::from_secs(3);
/// Inside the LB's namespace, so it cannot clash with anything on the host.
const METRICS: &str = "127.0.0.1:9107";
/// Where Debian installs the browser.
const CHROMIUM: &str = "/usr/bin/chromium";
/// A browser run that takes longer than this has hung.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

const WEB_REQUESTS: usize = 50;
const DNS_REQUESTS: usize = 20;
const WEB6_REQUESTS: usize = 20;
const ADMIN_REQUESTS: usize = 10;

/// Backends of a service no traffic goes to: with them lbd holds more
/// backends than a status reads one by one, so the counters checked here
/// come from its batched read of the counter maps.
const WIDE_BACKENDS: usize = 300;

fn config() -> String {
    let wide: Vec<String> = (0..WIDE_BACKENDS)
        .map(|i| format!("\"10.72.9.{}:{}\"", i % 250 + 1, 1000 + i / 250))
        .collect();
    format!(
        r#"
[[service]]
name = "web"
frontend = "10.73.0.10:80/tcp"
backends = ["10.72.1.2:{t}", "10.72.2.2:{t}", {{ addr = "10.72.3.2:{t}", weight = 2 }}]

[[service]]
name = "dns"
frontend = "10.73.0.10:53/udp"
backends = ["10.72.1.2:{u}", "10.72.2.2:{u}", "10.72.3.2:{u}"]

[[service]]
name = "web6"
frontend = "[fd00:73::10]:80/tcp"
backends = ["[fd00:72:1::2]:{t}", "[fd00:72:2::2]:{t}", "[fd00:72:3::2]:{t}"]

[[service]]
name = "admin"
frontend = "10.73.0.30:443/tcp"
backends = ["10.72.1.2:{t}", {{ addr = "10.72.2.2:{t}", weight = 0 }}]

[[service]]
name = "wide"
frontend = "10.73.0.40:80/tcp"
backends = [{wide}]
"#,
        t = TCP_PORT,
        u = UDP_PORT,
        wide = wide.join(", "),
    )
}

/// lbd is declared first so that it stops before the namespaces go.
/// Fields drop in order: lbd, then etcd, then the namespaces.
struct Env {
    lbd: Lbd,
    _etcd: Etcd,
    topo: Topology,
}

/// An etcd key lbd must refuse, to be shown on the page.
const BAD_KEY: &str = "/lb/services/bad/frontend";

fn setup(tag: &str) -> Env {
    let mut topo = Topology::new(tag).expect("topology");
    topo.start_servers(&echo_bin(), TCP_PORT, UDP_PORT)
        .expect("servers");
    // etcd on the LB namespace's own loopback, with one malformed key.
    let etcd = Etcd::new(&topo.lb, tag, "127.0.0.1".parse().unwrap()).expect("etcd");
    etcd.client().put(BAD_KEY, "not a frontend").expect("put");
    let endpoint = etcd.endpoint();
    let lbd = Lbd::start_with(
        &topo.lb,
        tag,
        &config(),
        &LB_IFACES,
        &["--metrics", METRICS, "--etcd", &endpoint],
    )
    .expect("lbd");
    // The endpoint answers once its listener is up.
    let ready = wait_until(Duration::from_secs(15), "lbd's metrics endpoint", || {
        topo.lb
            .run(|| get("/status.json"))
            .is_ok_and(|r| r.code == 200)
    });
    if let Err(e) = ready {
        panic!("{e:#}\nlbd's log:\n{}", lbd.log());
    }
    Env {
        lbd,
        _etcd: etcd,
        topo,
    }
}

struct HttpResponse {
    code: u16,
    headers: String,
    body: String,
}

/// One HTTP/1.1 GET to the endpoint; call it from inside the LB's namespace.
fn get(path: &str) -> std::io::Result<HttpResponse> {
    let addr: SocketAddr = METRICS.parse().unwrap();
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {METRICS}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let bad = |what: &str| std::io::Error::other(format!("{what} in {raw:?}"));
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let code = head
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    Ok(HttpResponse {
        code,
        headers: head.to_ascii_lowercase(),
        body: body.to_string(),
    })
}

fn get_in(ns: &Netns, path: &str) -> HttpResponse {
    ns.run(|| get(path))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// One sample of the exposition: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition strictly enough to catch a malformed line:
/// every line is a comment or `name{label="value",...} value`.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"# EOF"),
        "the exposition must end with # EOF"
    );
    let mut samples = Vec::new();
    for line in lines {
        if line.starts_with('#') {
            assert!(
                ["# HELP ", "# TYPE ", "# UNIT ", "# EOF"]
                    .iter()
                    .any(|p| line.starts_with(p)),
                "unexpected comment: {line}"
            );
            continue;
        }
        samples.push(parse_sample(line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}")));
    }
    samples
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("bad metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            let (start, c) = chars.next().ok_or("unterminated labels")?;
            if c == '}' {
                rest = &inner[start + 1..];
                break;
            }
            let eq = inner[start..].find("=\"").ok_or("label without =\"")? + start;
            let key = &inner[start..eq];
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("bad label name {key:?}"));
            }
            while chars.peek().is_some_and(|(i, _)| *i <= eq + 1) {
                chars.next();
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")?.1 {
                    '"' => break,
                    '\\' => match chars.next().ok_or("dangling escape")?.1 {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    '\n' => return Err("raw newline in a label value".into()),
                    c => value.push(c),
                }
            }
            labels.insert(key.to_string(), value);
            if chars.peek().is_some_and(|(_, c)| *c == ',') {
                chars.next();
            }
        }
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value: f64 = value.parse().map_err(|e| format!("value {value:?}: {e}"))?;
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = find(samples, name, labels);
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    found[0].value
}

/// Fails with what to install when the browser is missing.
fn chromium() -> &'static Path {
    let path = Path::new(CHROMIUM);
    assert!(
        path.exists(),
        "{CHROMIUM} not found: the stats page test needs Debian's headless browser; \
         install it with `apt-get install -y chromium`"
    );
    path
}

/// Runs headless Chromium on the stats page inside `ns` with `extra`
/// arguments and returns its standard output. `run` names its files in
/// `work`; each run gets a fresh profile.
fn browse(ns: &Netns, work: &Path, run: &str, extra: &[&str]) -> String {
    let profile = work.join(format!("{run}-profile"));
    std::fs::create_dir_all(&profile).unwrap();
    let out_path = work.join(format!("{run}.out"));
    let err_path = work.join(format!("{run}.err"));
    let mut cmd = ns.command(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1280,900",
        // Lets the page's script run its first refresh before the capture.
        "--virtual-time-budget=3000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(format!("http://{METRICS}/"))
    .env("HOME", &profile)
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(&out_path).unwrap())
    .stderr(std::fs::File::create(&err_path).unwrap())
    // Its own process group, so that a hung browser goes with all of its
    // helper processes.
    .process_group(0);
    let mut child = ChildGuard::spawn(&mut cmd).expect("starting chromium");
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = kill(Pid::from_raw(-(child.pid() as i32)), Signal::SIGKILL);
            panic!(
                "chromium did not finish within {BROWSER_TIMEOUT:?}:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(status.success(), "chromium failed ({status}):\n{stderr}");
    std::fs::read_to_string(&out_path).unwrap()
}

#[test]
fn metrics_and_stats_page_show_the_traffic() {
    // Checked first: without a browser the rest cannot be judged.
    chromium();
    let env = setup("stats");
    let web: SocketAddr = "10.73.0.10:80".parse().unwrap();
    let dns: SocketAddr = "10.73.0.10:53".parse().unwrap();
    let web6: SocketAddr = "[fd00:73::10]:80".parse().unwrap();
    let admin: SocketAddr = "10.73.0.30:443".parse().unwrap();
    env.topo.client.run(|| {
        for (target, n) in [
            (web, WEB_REQUESTS),
            (web6, WEB6_REQUESTS),
            (admin, ADMIN_REQUESTS),
        ] {
            for _ in 0..n {
                tcp_request(target, TIMEOUT).expect("tcp request");
            }
        }
        for _ in 0..DNS_REQUESTS {
            udp_request(dns, TIMEOUT).expect("udp request");
        }
    });

    // 1. The exposition parses and counts what was sent.
    let resp = get_in(&env.topo.lb, "/metrics");
    assert_eq!(resp.code, 200, "{}", resp.body);
    assert!(
        resp.headers
            .contains("content-type: application/openmetrics-text"),
        "{}",
        resp.headers
    );
    let samples = parse_exposition(&resp.body);
    let web_labels = [("service", "web"), ("frontend", "10.73.0.10:80/tcp")];
    assert_eq!(
        value(&samples, "lb_service_new_flows_total", &web_labels),
        WEB_REQUESTS as f64
    );
    let per_backend: f64 = find(&samples, "lb_backend_new_flows_total", &web_labels)
        .iter()
        .map(|s| s.value)
        .sum();
    assert_eq!(per_backend, WEB_REQUESTS as f64);
    assert_eq!(
        value(
            &samples,
            "lb_service_new_flows_total",
            &[("service", "admin")]
        ),
        ADMIN_REQUESTS as f64
    );
    let drained = [("service", "admin"), ("backend", "10.72.2.2:8080")];
    assert_eq!(value(&samples, "lb_backend_weight", &drained), 0.0);
    let state = |s: &str| {
        let mut labels = drained.to_vec();
        labels.push(("state", s));
        value(&samples, "lb_backend_state", &labels)
    };
    assert_eq!((state("draining"), state("active")), (1.0, 0.0));
    assert!(value(&samples, "lb_service_bytes_total", &web_labels) > 0.0);
    assert_eq!(value(&samples, "lb_etcd_connected", &[]), 1.0);
    assert_eq!(value(&samples, "lb_etcd_rejected_keys", &[]), 1.0);
    assert!(value(&samples, "lb_service_reply_packets_total", &web_labels) >= WEB_REQUESTS as f64);
    assert_eq!(value(&samples, "lb_services", &[]), 5.0);
    assert_eq!(value(&samples, "lb_conflicts", &[]), 0.0);
    assert_eq!(value(&samples, "lb_config_last_reload_failed", &[]), 0.0);
    assert!(
        value(
            &samples,
            "lb_datapath_events_total",
            &[("counter", "translated")]
        ) > 0.0
    );

    // /status.json is the status lbctl shows. Only the services are
    // compared: stray packets (neighbour discovery) may move the
    // datapath-wide counters between the two reads.
    let resp = get_in(&env.topo.lb, "/status.json");
    assert_eq!(resp.code, 200);
    let status: Value = serde_json::from_str(&resp.body).expect("status.json parses");
    assert_eq!(status["services"].as_array().unwrap().len(), 5);
    let lbctl = lbctl(&env.lbd.socket, &["status", "--json"]).expect("lbctl");
    let lbctl: Value = serde_json::from_str(&lbctl).unwrap();
    assert_eq!(status["services"], lbctl["services"]);
    assert_eq!(get_in(&env.topo.lb, "/nope").code, 404);

    // 2. The page, rendered by a browser, shows the data, not just a shell.
    let scratch = Scratch::new("stats-browser");
    let work = scratch.0.clone();
    let png = work.join("stats-page.png");
    let screenshot = format!("--screenshot={}", png.display());
    browse(&env.topo.lb, &work, "screenshot", &[&screenshot]);
    let shot = std::fs::read(&png).expect("chromium wrote no screenshot");
    assert!(shot.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // A blank 1280x900 page compresses to a few kilobytes.
    assert!(shot.len() > 30_000, "screenshot of {} bytes", shot.len());
    if let Ok(keep) = std::env::var("LB_STATS_PAGE_PNG") {
        std::fs::copy(&png, &keep).unwrap();
    }

    let dom = browse(&env.topo.lb, &work, "dom", &["--dump-dom"]);
    for name in ["web", "dns", "web6", "admin"] {
        assert!(
            dom.contains(&format!("<h2>{name}</h2>")),
            "no service {name} in\n{dom}"
        );
    }
    for addr in [
        "10.72.1.2:8080",
        "10.72.3.2:8080",
        "10.72.2.2:5353",
        "[fd00:72:1::2]:8080",
    ] {
        assert!(dom.contains(addr), "no backend {addr} in\n{dom}");
    }
    assert!(
        dom.contains(">draining<"),
        "the drained backend is not shown"
    );
    assert!(
        dom.contains(&format!("<b>{WEB_REQUESTS}</b> flows")),
        "web's {WEB_REQUESTS} flows are not shown"
    );
    assert!(dom.contains("lbc0"), "interfaces are not shown");
    assert!(
        dom.contains("<b>etcd keys rejected</b>") && dom.contains(BAD_KEY),
        "the refused etcd key is not shown"
    );
    // Looked for as rendered markup: the page's script holds the same words.
    let failed_banner = "<div class=\"alert bad\"><b>Configuration reload failed";
    assert!(!dom.contains(failed_banner), "a reload failure is shown");

    // 3. A rejected reload shows prominently and in the metrics.
    env.lbd
        .reload("[[service]]\nname = \"web\"\nfrontend = \"10.73.0.10:80\"\n")
        .expect("signalling a reload");
    wait_until(Duration::from_secs(10), "the reload to fail", || {
        env.topo
            .lb
            .run(|| get("/status.json"))
            .ok()
            .and_then(|r| serde_json::from_str::<Value>(&r.body).ok())
            .is_some_and(|s| s["config"]["last_error"].is_string())
    })
    .unwrap();
    let samples = parse_exposition(&get_in(&env.topo.lb, "/metrics").body);
    assert_eq!(value(&samples, "lb_config_last_reload_failed", &[]), 1.0);
    assert!(value(&samples, "lb_config_reloads_total", &[]) >= 1.0);
    assert_eq!(
        value(&samples, "lb_services", &[]),
        5.0,
        "the old state keeps serving"
    );
    let dom = browse(&env.topo.lb, &work, "dom-failed", &["--dump-dom"]);
    assert!(
        dom.contains(failed_banner),
        "no failed reload banner in\n{dom}"
    );
    assert!(
        dom.contains("missing protocol suffix"),
        "no reason in\n{dom}"
    );
}
