//! End to end: wrk in a client namespace sends HTTP requests through the
//! load-balancer namespace to three nginx backends, with our load balancer,
//! iptables DNAT, HAProxy and nginx's stream proxy in turn on the LB node
//! (the topology of the end-to-end tests). Each system gets a fresh topology,
//! so no conntrack state or TIME_WAIT socket carries over from the previous one.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use lb_tests::lbd::Lbd;
use lb_tests::netns::{unique_name, Netns};
use lb_tests::process::{wait_until, ChildGuard};
use lb_tests::topology::{Topology, LB_CLIENT_IF};

use crate::report::{self, ratio, thousands, Goal, Section, Table};
use crate::sys::{self, namespace_cpu, softirq_time};
use crate::{goal_not_measured, Config};

const VIP: &str = "10.73.0.10";
const BACKEND_PORT: u16 = 8080;
/// The page every backend serves: small, so the figures are about
/// connections and packets, not bytes.
const PAGE: &str = "hello from a benchmark backend\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    Ours,
    Iptables,
    Haproxy,
    NginxStream,
}

impl System {
    const ALL: [System; 4] = [
        System::Ours,
        System::Iptables,
        System::Haproxy,
        System::NginxStream,
    ];

    fn name(self) -> &'static str {
        match self {
            System::Ours => "our load balancer",
            System::Iptables => "iptables DNAT (statistic random)",
            System::Haproxy => "HAProxy (TCP mode)",
            System::NginxStream => "nginx stream proxy",
        }
    }

    /// Proxies accept the connection themselves, so the VIP is local to
    /// the LB node; the kernel-path systems translate it in passing.
    fn is_proxy(self) -> bool {
        matches!(self, System::Haproxy | System::NginxStream)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    KeepAlive,
    Close,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::Close => "new connection per request",
        }
    }
}

#[derive(Clone, Debug)]
struct Outcome {
    system: System,
    mode: Mode,
    requests: u64,
    rps: f64,
    p99: Duration,
    errors: u64,
    softirq: Duration,
    lb_processes: Duration,
}

impl Outcome {
    /// Softirq (machine-wide) plus the LB node's processes, per request.
    fn cpu_per_request(&self) -> Option<Duration> {
        (self.requests > 0).then(|| (self.softirq + self.lb_processes) / self.requests as u32)
    }
}

fn nginx_backend_conf(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\npid {d}/{name}.pid;\nerror_log {d}/{name}.err warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  default_type text/plain;\n\
         client_body_temp_path {d}/tmp-{name}-body;\n  proxy_temp_path {d}/tmp-{name}-proxy;\n\
         fastcgi_temp_path {d}/tmp-{name}-fcgi;\n  uwsgi_temp_path {d}/tmp-{name}-uwsgi;\n\
         scgi_temp_path {d}/tmp-{name}-scgi;\n  keepalive_requests 100000000;\n  \
         keepalive_timeout 120s;\n\
         server {{\n    listen {BACKEND_PORT} backlog=4096;\n    location / {{ root {d}/www; }}\n  }}\n}}\n"
    )
}

fn haproxy_conf(backends: &[String]) -> String {
    let mut s = String::from(
        "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
         timeout client 120s\n  timeout server 120s\n\n",
    );
    let _ = writeln!(
        s,
        "frontend fe\n  bind {VIP}:80\n  default_backend be\n\nbackend be\n  balance roundrobin"
    );
    for (i, b) in backends.iter().enumerate() {
        let _ = writeln!(s, "  server b{} {b}", i + 1);
    }
    s
}

fn nginx_stream_conf(dir: &Path, backends: &[String]) -> String {
    let d = dir.display();
    let servers: String = backends
        .iter()
        .map(|b| format!("    server {b};\n"))
        .collect();
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\nworker_processes auto;\n\
         daemon off;\npid {d}/proxy.pid;\nerror_log {d}/proxy.err warn;\n\
         events {{ worker_connections 16384; }}\n\
         stream {{\n  upstream be {{\n{servers}  }}\n  \
         server {{\n    listen {VIP}:80 backlog=4096;\n    proxy_pass be;\n  }}\n}}\n"
    )
}

fn iptables_rules(backends: &[String]) -> String {
    let mut s = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n",
    );
    // kube-proxy's spread: rule i takes 1/(n-i) of what reaches it.
    let n = backends.len();
    for (i, b) in backends.iter().enumerate() {
        let share = if i + 1 < n {
            format!(
                "-m statistic --mode random --probability {:.8} ",
                1.0 / (n - i) as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "-A PREROUTING -d {VIP}/32 -p tcp -m tcp --dport 80 {share}-j DNAT --to-destination {b}"
        );
    }
    s.push_str("COMMIT\n");
    s
}

/// The topology, its backends' web servers and whatever runs the LB, for
/// one system; all stopped and removed on drop.
struct Rig {
    topo: Topology,
    dir: PathBuf,
    servers: Vec<ChildGuard>,
    proxy: Option<ChildGuard>,
    lbd: Option<Lbd>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.lbd.take();
        self.proxy.take();
        self.servers.clear();
        for name in self.topo.namespace_names() {
            sys::kill_processes_in(&Path::new("/run/netns").join(name));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn_logged(ns: &Netns, program: &str, args: &[String], log: &Path) -> Result<ChildGuard> {
    let log = std::fs::File::create(log)?;
    let mut cmd = ns.command(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    ChildGuard::spawn(&mut cmd)
}

fn wait_listening(ns: &Netns, addr: SocketAddr, what: &str) -> Result<()> {
    wait_until(Duration::from_secs(10), what, || {
        ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
    })
}

impl Rig {
    fn new(system: System) -> Result<Rig> {
        let topo = Topology::new(&format!("be{}", system as u8))?;
        let dir = std::env::temp_dir().join(unique_name("be"));
        std::fs::create_dir_all(dir.join("www"))?;
        std::fs::write(dir.join("www/index.html"), PAGE)?;
        let mut rig = Rig {
            topo,
            dir,
            servers: Vec::new(),
            proxy: None,
            lbd: None,
        };
        for ns in [&rig.topo.client, &rig.topo.lb] {
            // A connection per request for 10 s needs more than the default
            // ephemeral ports, and reuse of those in TIME_WAIT.
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
            ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        }
        for b in &rig.topo.backends {
            let conf = rig.dir.join(format!("{}.conf", b.name));
            std::fs::write(&conf, nginx_backend_conf(&rig.dir, &b.name))?;
            let args = vec![
                "-e".into(),
                rig.dir
                    .join(format!("{}.early.err", b.name))
                    .display()
                    .to_string(),
                "-c".into(),
                conf.display().to_string(),
            ];
            let log = rig.dir.join(format!("{}.log", b.name));
            rig.servers.push(spawn_logged(&b.ns, "nginx", &args, &log)?);
        }
        for b in &rig.topo.backends {
            let addr = SocketAddr::from((b.v4, BACKEND_PORT));
            wait_listening(&rig.topo.lb, addr, &format!("nginx on {addr}"))?;
        }
        rig.install(system)?;
        Ok(rig)
    }

    fn backends(&self) -> Vec<String> {
        self.topo
            .backends
            .iter()
            .map(|b| format!("{}:{BACKEND_PORT}", b.v4))
            .collect()
    }

    fn install(&mut self, system: System) -> Result<()> {
        let lb = &self.topo.lb;
        if system.is_proxy() {
            lb.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        }
        match system {
            System::Ours => {
                let backends: Vec<String> =
                    self.backends().iter().map(|b| format!("\"{b}\"")).collect();
                let config = format!(
                    "[[service]]\nname = \"web\"\nfrontend = \"{VIP}:80/tcp\"\nbackends = [{}]\n",
                    backends.join(", ")
                );
                let mut ifaces = vec![LB_CLIENT_IF.to_string()];
                ifaces.extend(self.topo.backends.iter().map(|b| b.lb_if.clone()));
                let ifaces: Vec<&str> = ifaces.iter().map(String::as_str).collect();
                self.lbd = Some(Lbd::start(lb, "be-lbd", &config, &ifaces)?);
            }
            System::Iptables => {
                let file = self.dir.join("iptables.rules");
                std::fs::write(&file, iptables_rules(&self.backends()))?;
                lb.sh(&format!("iptables-restore < {}", file.display()))?;
            }
            System::Haproxy => {
                let conf = self.dir.join("haproxy.cfg");
                std::fs::write(&conf, haproxy_conf(&self.backends()))?;
                let args = vec!["-db".into(), "-f".into(), conf.display().to_string()];
                let log = self.dir.join("haproxy.log");
                self.proxy = Some(spawn_logged(lb, "haproxy", &args, &log)?);
            }
            System::NginxStream => {
                let conf = self.dir.join("proxy.conf");
                std::fs::write(&conf, nginx_stream_conf(&self.dir, &self.backends()))?;
                let args = vec![
                    "-e".into(),
                    self.dir.join("proxy.early.err").display().to_string(),
                    "-c".into(),
                    conf.display().to_string(),
                ];
                let log = self.dir.join("proxy.log");
                self.proxy = Some(spawn_logged(lb, "nginx", &args, &log)?);
            }
        }
        if system.is_proxy() {
            let addr: SocketAddr = format!("{VIP}:80").parse()?;
            wait_listening(lb, addr, &format!("{} on {addr}", system.name()))?;
        }
        // One request through the system before any is timed.
        self.topo.client.run(http_get)
    }
}

/// One HTTP request to the VIP; fails unless it is answered with the page.
fn http_get() -> Result<()> {
    let addr: SocketAddr = format!("{VIP}:80").parse()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {VIP}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut body = String::new();
    s.take(1 << 16).read_to_string(&mut body)?;
    ensure!(
        body.starts_with("HTTP/1.1 200") && body.ends_with(PAGE),
        "unexpected answer through {VIP}: {body:?}"
    );
    Ok(())
}

/// "2.08ms" -> 2.08 ms.
fn parse_latency(s: &str) -> Option<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    let secs = match unit {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

struct WrkResult {
    requests: u64,
    rps: f64,
    p99: Duration,
    errors: u64,
}

fn parse_wrk(out: &str) -> Result<WrkResult> {
    let mut rps = None;
    let mut p99 = None;
    let mut requests = None;
    let mut errors = 0u64;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("99%") {
            p99 = parse_latency(v.trim());
        } else if line.contains(" requests in ") {
            requests = line.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            errors += v
                .split(',')
                .filter_map(|kv| kv.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    match (rps, p99, requests) {
        (Some(rps), Some(p99), Some(requests)) => Ok(WrkResult {
            requests,
            rps,
            p99,
            errors,
        }),
        _ => bail!("could not read wrk's output:\n{out}"),
    }
}

fn wrk_args(config: &Config, mode: Mode) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-t2".into(),
        format!("-c{}", config.e2e_connections),
        format!("-d{}s", config.e2e_window.as_secs().max(1)),
        "--latency".into(),
        "--timeout".into(),
        "2s".into(),
    ];
    if mode == Mode::Close {
        args.extend(["-H".into(), "Connection: close".into()]);
    }
    args.push(format!("http://{VIP}/"));
    args
}

fn measure(rig: &Rig, config: &Config, system: System, mode: Mode) -> Result<Outcome> {
    let out_file = rig.dir.join("wrk.out");
    let mut wrk = spawn_logged(&rig.topo.client, "wrk", &wrk_args(config, mode), &out_file)?;
    let lb_path = rig.topo.lb.path();
    let (soft0, lb0) = (softirq_time()?, namespace_cpu(&lb_path));
    // wrk stops itself after -d; this bounds the run if it does not.
    let deadline = Instant::now() + config.e2e_window + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = wrk.try_wait() {
            break status;
        }
        if Instant::now() > deadline {
            wrk.terminate();
            bail!("wrk did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (soft1, lb1) = (softirq_time()?, namespace_cpu(&lb_path));
    let out = std::fs::read_to_string(&out_file)?;
    ensure!(status.success(), "wrk failed ({status}): {out}");
    let r = parse_wrk(&out)?;
    Ok(Outcome {
        system,
        mode,
        requests: r.requests,
        rps: r.rps,
        p99: r.p99,
        errors: r.errors,
        softirq: soft1.saturating_sub(soft0),
        lb_processes: lb1.saturating_sub(lb0),
    })
}

fn wrk_command(config: &Config, mode: Mode) -> String {
    wrk_args(config, mode)
        .iter()
        .map(|a| {
            if a.contains(' ') {
                format!("\"{a}\"")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn run(config: &Config, plot_dir: &Path, command: &str) -> (Section, Vec<Goal>) {
    const TITLE: &str = "End to end: HTTP through the load balancer";
    let goal_text = "end-to-end requests/s above HAProxy and nginx";
    let missing: Vec<&str> = ["wrk", "nginx", "haproxy", "iptables-restore"]
        .into_iter()
        .filter(|p| !sys::have(p))
        .collect();
    if !missing.is_empty() {
        let why = format!(
            "{} not installed (`cargo xtask bench` installs it)",
            missing.join(", ")
        );
        return (
            crate::not_measured(TITLE, command, why.clone()),
            vec![goal_not_measured(goal_text, &why)],
        );
    }
    let mut section = Section {
        title: TITLE.into(),
        command: command.into(),
        ..Default::default()
    };
    section.text.push(format!(
        "wrk in a client namespace, `wrk {}` (and the same with `-H \"Connection: close\"` for \
         a new connection per request), through the LB namespace to three backend namespaces \
         running nginx (one worker each) that serve a {}-byte page. Every system gets a fresh \
         topology. Our load balancer and iptables translate in the kernel (the VIP is routed \
         through the LB node); HAProxy and nginx hold the VIP on the LB node's loopback and \
         proxy each connection, with as many threads or workers as there are cores. \
         Client, LB and backends share the machine's {} cores, so the whole chain limits the \
         rate, as it would on one Docker host.",
        wrk_command(config, Mode::KeepAlive),
        PAGE.len(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    ));
    section.text.push(
        "*CPU per request* is the machine's softirq time (all CPUs, where the kernel's \
         network processing runs for every namespace: client, LB and backends alike) plus \
         the CPU time of the processes in the LB namespace (the proxy, or lbd), divided by \
         the requests served. Ratios are to our load balancer in the same mode; for latency \
         and CPU, lower is better."
            .into(),
    );
    let mut outcomes = Vec::new();
    for system in System::ALL.into_iter().filter(|s| config.wants(s.name())) {
        eprintln!("lb-bench: e2e: {}", system.name());
        let rig = match Rig::new(system) {
            Ok(r) => r,
            Err(e) => {
                section
                    .not_measured
                    .push(format!("{}: setting up: {e:#}", system.name()));
                continue;
            }
        };
        for mode in [Mode::KeepAlive, Mode::Close] {
            match measure(&rig, config, system, mode) {
                Ok(o) => outcomes.push(o),
                Err(e) => {
                    section
                        .not_measured
                        .push(format!("{}, {}: {e:#}", system.name(), mode.name()))
                }
            }
        }
    }
    if outcomes.is_empty() {
        return (section, vec![goal_not_measured(goal_text, "no system ran")]);
    }
    let ours = |mode: Mode| {
        outcomes
            .iter()
            .find(|o| o.system == System::Ours && o.mode == mode)
    };
    let mut table = Table::new(&[
        "system",
        "connections",
        "requests/s",
        "vs ours",
        "p99 latency",
        "vs ours",
        "errors",
        "CPU per request",
        "vs ours",
    ]);
    for o in &outcomes {
        let reference = ours(o.mode);
        let cpu = o.cpu_per_request();
        table.row(vec![
            o.system.name().into(),
            o.mode.name().into(),
            thousands(o.rps as u64),
            reference.map_or("–".into(), |r| ratio(o.rps, r.rps)),
            format!("{:.2} ms", o.p99.as_secs_f64() * 1e3),
            reference.map_or("–".into(), |r| {
                ratio(o.p99.as_secs_f64(), r.p99.as_secs_f64())
            }),
            thousands(o.errors),
            cpu.map_or("–".into(), |c| format!("{:.1} µs", c.as_secs_f64() * 1e6)),
            match (cpu, reference.and_then(Outcome::cpu_per_request)) {
                (Some(c), Some(r)) => ratio(c.as_secs_f64(), r.as_secs_f64()),
                _ => "–".into(),
            },
        ]);
    }
    section.tables.push(table);

    let bars: Vec<(String, f64)> = outcomes
        .iter()
        .map(|o| (format!("{}, {}", o.system.name(), o.mode.name()), o.rps))
        .collect();
    let plot = plot_dir.join("e2e.svg");
    match report::bar_chart(
        &plot,
        "HTTP requests per second through the LB node (wrk)",
        "requests per second",
        &bars,
        &|l| l.starts_with("our"),
    ) {
        Ok(()) => section.plots.push(plot),
        Err(e) => section.not_measured.push(format!("the plot: {e:#}")),
    }

    let mut parts = Vec::new();
    let mut met = true;
    let mut complete = true;
    for mode in [Mode::KeepAlive, Mode::Close] {
        let Some(o) = ours(mode) else {
            complete = false;
            continue;
        };
        for peer in [System::Haproxy, System::NginxStream] {
            match outcomes.iter().find(|p| p.system == peer && p.mode == mode) {
                Some(p) => {
                    met &= o.rps > p.rps;
                    parts.push(format!(
                        "{:.2}x {} ({})",
                        o.rps / p.rps,
                        peer.name(),
                        mode.name()
                    ));
                }
                None => complete = false,
            }
        }
    }
    let goal = if parts.is_empty() {
        goal_not_measured(goal_text, "ours or both proxies did not run")
    } else {
        Goal {
            goal: goal_text.into(),
            measured: format!(
                "{}{}",
                parts.join("; "),
                if complete { "" } else { " (incomplete)" }
            ),
            met: complete.then_some(met),
        }
    };
    (section, vec![goal])
}
