//! What the HTTP benchmarks (end to end, HTTP routing) share: the standard
//! topology with nginx web servers in the backend namespaces, a proxy on
//! the LB node, and wrk in the client namespace.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use lb_tests::lbd::Lbd;
use lb_tests::netns::{unique_name, Netns};
use lb_tests::process::{wait_until, ChildGuard};
use lb_tests::topology::Topology;

use crate::sys::{self, namespace_cpu, softirq_time};
use crate::Config;

pub const VIP: &str = "10.73.0.10";
/// Where every backend serves `PAGE` at `/`.
pub const BACKEND_PORT: u16 = 8080;
/// Where every backend serves `API_PAGE` at `/api/` (and nothing at `/`),
/// so a request routed to the wrong pool is answered 404.
pub const API_PORT: u16 = 8081;
/// The pages the backends serve: small, so the figures are about
/// connections and requests, not bytes.
pub const PAGE: &str = "hello from a benchmark backend\n";
pub const API_PAGE: &str = "hello from a benchmark API backend\n";
/// A large body the backends serve too (`/big.bin`), where bytes count.
pub const BIG_PATH: &str = "/big.bin";
pub const BIG_BYTES: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    KeepAlive,
    Close,
    /// Keep-alive, every request for `BIG_PATH`.
    KeepAliveBig,
}

impl Mode {
    /// The small page with and without keep-alive.
    pub const ALL: [Mode; 2] = [Mode::KeepAlive, Mode::Close];

    pub fn name(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::Close => "new connection per request",
            Mode::KeepAliveBig => "keep-alive, 1 MiB bodies",
        }
    }

    /// The path requested.
    pub fn path(self) -> &'static str {
        match self {
            Mode::KeepAliveBig => BIG_PATH,
            _ => "/",
        }
    }
}

/// The start of an nginx config that runs in the foreground with every
/// file it writes under `dir`, up to the inside of its `http` block.
pub fn nginx_http_preamble(dir: &Path, name: &str, workers: &str) -> String {
    let d = dir.display();
    format!(
        "worker_processes {workers};\ndaemon off;\npid {d}/{name}.pid;\nerror_log {d}/{name}.err warn;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  default_type text/plain;\n\
         client_body_temp_path {d}/tmp-{name}-body;\n  proxy_temp_path {d}/tmp-{name}-proxy;\n\
         fastcgi_temp_path {d}/tmp-{name}-fcgi;\n  uwsgi_temp_path {d}/tmp-{name}-uwsgi;\n\
         scgi_temp_path {d}/tmp-{name}-scgi;\n  keepalive_requests 100000000;\n  \
         keepalive_timeout 120s;\n"
    )
}

/// nginx's arguments for `conf`, with its early errors (before it reads
/// `conf`) written under `dir` rather than to the system's log.
pub fn nginx_args(dir: &Path, name: &str, conf: &Path) -> Vec<String> {
    vec![
        "-e".into(),
        dir.join(format!("{name}.early.err")).display().to_string(),
        "-c".into(),
        conf.display().to_string(),
    ]
}

fn nginx_backend_conf(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "{}  server {{\n    listen {BACKEND_PORT} backlog=4096;\n    location / {{ root {d}/www; }}\n  }}\n\
         \x20 server {{\n    listen {API_PORT} backlog=4096;\n    location / {{ root {d}/www-api; }}\n  }}\n}}\n",
        nginx_http_preamble(dir, name, "1")
    )
}

/// Starts `program` in `ns` with its output in `log`.
pub fn spawn_logged(ns: &Netns, program: &Path, args: &[String], log: &Path) -> Result<ChildGuard> {
    let log = std::fs::File::create(log)?;
    let mut cmd = ns.command(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    ChildGuard::spawn(&mut cmd)
}

pub fn wait_listening(ns: &Netns, addr: SocketAddr, what: &str) -> Result<()> {
    wait_until(Duration::from_secs(10), what, || {
        ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
    })
}

/// The topology, its backends' web servers and whatever runs the LB, for
/// one system; all stopped and removed on drop. A fresh one per system, so
/// no conntrack state or TIME_WAIT socket carries over from the previous one.
pub struct Rig {
    pub topo: Topology,
    pub dir: PathBuf,
    servers: Vec<ChildGuard>,
    pub proxy: Option<ChildGuard>,
    pub lbd: Option<Lbd>,
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

impl Rig {
    /// The topology (`tag` names its namespaces) with nginx serving `PAGE`
    /// and `API_PAGE` in every backend namespace.
    pub fn new(tag: &str) -> Result<Rig> {
        let topo = Topology::new(tag)?;
        let dir = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(dir.join("www"))?;
        std::fs::create_dir_all(dir.join("www-api/api"))?;
        std::fs::write(dir.join("www/index.html"), PAGE)?;
        let big: Vec<u8> = (0..BIG_BYTES).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join(format!("www{BIG_PATH}")), big)?;
        std::fs::write(dir.join("www-api/api/index.html"), API_PAGE)?;
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
            let log = rig.dir.join(format!("{}.log", b.name));
            let server = rig.nginx(&b.ns, &b.name, &conf, &log)?;
            rig.servers.push(server);
        }
        for b in &rig.topo.backends {
            for port in [BACKEND_PORT, API_PORT] {
                let addr = SocketAddr::from((b.v4, port));
                wait_listening(&rig.topo.lb, addr, &format!("nginx on {addr}"))?;
            }
        }
        Ok(rig)
    }

    /// nginx in the foreground with `conf`, its early errors (before it
    /// reads `conf`) beside it.
    fn nginx(&self, ns: &Netns, name: &str, conf: &Path, log: &Path) -> Result<ChildGuard> {
        let args = nginx_args(&self.dir, name, conf);
        spawn_logged(ns, Path::new("nginx"), &args, log)
    }

    /// `host:port` of every backend's server on `port`.
    pub fn backends(&self, port: u16) -> Vec<String> {
        self.topo
            .backends
            .iter()
            .map(|b| format!("{}:{port}", b.v4))
            .collect()
    }

    /// Puts the VIP on the LB node's loopback, for a proxy to listen on.
    pub fn vip_on_lb(&self) -> Result<()> {
        self.topo
            .lb
            .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])
    }

    /// Starts the proxy `name` on the LB node: `program` with `args`,
    /// where `{conf}` stands for the path of a file holding `conf`; waits
    /// until it accepts connections on the VIP.
    pub fn start_proxy(
        &mut self,
        name: &str,
        program: &Path,
        conf: &str,
        args: &[String],
    ) -> Result<()> {
        let conf_file = self.dir.join(format!("{name}.conf"));
        std::fs::write(&conf_file, conf)?;
        let path = conf_file.display().to_string();
        let args: Vec<String> = args.iter().map(|a| a.replace("{conf}", &path)).collect();
        let log = self.dir.join(format!("{name}.log"));
        self.proxy = Some(spawn_logged(&self.topo.lb, program, &args, &log)?);
        let addr: SocketAddr = format!("{VIP}:80").parse()?;
        wait_listening(&self.topo.lb, addr, &format!("{name} on {addr}"))
    }

    /// Runs wrk with `args` in the client namespace, bounded in time, and
    /// measures the CPU spent meanwhile.
    pub fn wrk(&self, args: &[String], window: Duration) -> Result<Measured> {
        let out_file = self.dir.join("wrk.out");
        let mut wrk = spawn_logged(&self.topo.client, Path::new("wrk"), args, &out_file)?;
        let lb_path = self.topo.lb.path();
        let (soft0, lb0) = (softirq_time()?, namespace_cpu(&lb_path));
        // wrk stops itself after -d; this bounds the run if it does not.
        let deadline = Instant::now() + window + Duration::from_secs(15);
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
        Ok(Measured {
            wrk: parse_wrk(&out)?,
            softirq: soft1.saturating_sub(soft0),
            lb_processes: lb1.saturating_sub(lb0),
        })
    }
}

/// One HTTP request to `path` on the VIP, from inside the current
/// namespace; fails unless it is answered with `page`.
pub fn http_get(path: &str, page: &str) -> Result<()> {
    let addr: SocketAddr = format!("{VIP}:80").parse()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {VIP}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut body = String::new();
    s.take(1 << 16).read_to_string(&mut body)?;
    ensure!(
        body.starts_with("HTTP/1.1 200") && body.ends_with(page),
        "unexpected answer for {path} through {VIP}: {body:?}"
    );
    Ok(())
}

/// What one wrk run measured.
#[derive(Clone, Debug)]
pub struct WrkResult {
    pub requests: u64,
    pub rps: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// Socket errors and non-2xx/3xx answers.
    pub errors: u64,
}

/// A wrk run and the CPU time spent while it ran.
#[derive(Clone, Debug)]
pub struct Measured {
    pub wrk: WrkResult,
    /// Softirq time of the whole machine.
    pub softirq: Duration,
    /// CPU time of the processes in the LB namespace.
    pub lb_processes: Duration,
}

/// One system measured in one client mode.
#[derive(Clone, Debug)]
pub struct Outcome<S> {
    pub system: S,
    pub mode: Mode,
    pub m: Measured,
}

/// Sets up a rig for each of `systems` in turn (`rig`) and runs wrk on it
/// in each of `modes`, with `wrk_args` for the mode; what fails is noted
/// in `not_measured` and the rest measured.
pub fn measure_each<S: Copy>(
    part: &str,
    systems: impl IntoIterator<Item = S>,
    name: impl Fn(S) -> &'static str,
    rig: impl Fn(S) -> Result<Rig>,
    (modes, wrk_args): (&[Mode], impl Fn(Mode) -> Vec<String>),
    window: Duration,
    not_measured: &mut Vec<String>,
) -> Vec<Outcome<S>> {
    let mut outcomes = Vec::new();
    for system in systems {
        eprintln!("lb-bench: {part}: {}", name(system));
        let rig = match rig(system) {
            Ok(r) => r,
            Err(e) => {
                not_measured.push(format!("{}: setting up: {e:#}", name(system)));
                continue;
            }
        };
        for &mode in modes {
            match rig.wrk(&wrk_args(mode), window) {
                Ok(m) => outcomes.push(Outcome { system, mode, m }),
                Err(e) => not_measured.push(format!("{}, {}: {e:#}", name(system), mode.name())),
            }
        }
    }
    outcomes
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

pub fn parse_wrk(out: &str) -> Result<WrkResult> {
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut requests = None;
    let mut errors = 0u64;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("50%") {
            p50 = parse_latency(v.trim());
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
    match (rps, p50, p99, requests) {
        (Some(rps), Some(p50), Some(p99), Some(requests)) => Ok(WrkResult {
            requests,
            rps,
            p50,
            p99,
            errors,
        }),
        _ => bail!("could not read wrk's output:\n{out}"),
    }
}

/// wrk's arguments for `mode`, before the URL (and any `-s` script).
pub fn wrk_args(config: &Config, mode: Mode) -> Vec<String> {
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
    args
}

/// `args` as a shell would take them.
pub fn shell_line(args: &[String]) -> String {
    args.iter()
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

/// Per request: `cpu` divided by the requests served, if any were.
pub fn per_request(cpu: Duration, requests: u64) -> Option<Duration> {
    (requests > 0).then(|| cpu / requests.min(u32::MAX as u64) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_latency_distribution_and_errors() {
        let out = "Running 3s test @ http://10.73.0.10/\n  2 threads and 50 connections\n\
                   Latency Distribution\n     50%    1.52ms\n     75%    2.00ms\n     \
                   90%    3.10ms\n     99%   12.40ms\n  45000 requests in 3.00s, 9.00MB read\n  \
                   Socket errors: connect 0, read 2, write 0, timeout 1\n  \
                   Non-2xx or 3xx responses: 4\nRequests/sec:  15000.50\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.requests, 45000);
        assert_eq!((r.p50.as_secs_f64() * 1e6).round(), 1520.0);
        assert_eq!((r.p99.as_secs_f64() * 1e6).round(), 12400.0);
        assert_eq!(r.errors, 7);
        assert!((r.rps - 15000.5).abs() < 1e-6);
        assert!(parse_wrk("nothing").is_err());
    }
}
