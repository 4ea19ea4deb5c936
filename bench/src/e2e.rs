//! End to end: wrk in a client namespace sends HTTP requests through the
//! load-balancer namespace to three nginx backends, with our load balancer,
//! iptables DNAT, HAProxy and nginx's stream proxy in turn on the LB node
//! (the topology of the end-to-end tests). Each system gets a fresh topology,
//! so no conntrack state or TIME_WAIT socket carries over from the previous one.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use lb_tests::lbd::Lbd;
use lb_tests::topology::LB_CLIENT_IF;

use crate::report::{self, ratio, thousands, Goal, Section, Table};
use crate::web::{self, Mode, Rig, BACKEND_PORT, PAGE, VIP};
use crate::{goal_not_measured, Config};

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

type Outcome = web::Outcome<System>;

/// Softirq (machine-wide) plus the LB node's processes, per request.
fn cpu_per_request(o: &Outcome) -> Option<Duration> {
    web::per_request(o.m.softirq + o.m.lb_processes, o.m.wrk.requests)
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

/// A fresh rig with `system` on the LB node, answering through the VIP.
fn rig(system: System) -> Result<Rig> {
    let mut rig = Rig::new(&format!("be{}", system as u8))?;
    let backends = rig.backends(BACKEND_PORT);
    if system.is_proxy() {
        rig.vip_on_lb()?;
    }
    match system {
        System::Ours => {
            let quoted: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
            let config = format!(
                "[[service]]\nname = \"web\"\nfrontend = \"{VIP}:80/tcp\"\nbackends = [{}]\n",
                quoted.join(", ")
            );
            let mut ifaces = vec![LB_CLIENT_IF.to_string()];
            ifaces.extend(rig.topo.backends.iter().map(|b| b.lb_if.clone()));
            let ifaces: Vec<&str> = ifaces.iter().map(String::as_str).collect();
            rig.lbd = Some(Lbd::start(&rig.topo.lb, "be-lbd", &config, &ifaces)?);
        }
        System::Iptables => {
            let file = rig.dir.join("iptables.rules");
            std::fs::write(&file, iptables_rules(&backends))?;
            rig.topo
                .lb
                .sh(&format!("iptables-restore < {}", file.display()))?;
        }
        System::Haproxy => {
            let args = ["-db", "-f", "{conf}"].map(String::from);
            rig.start_proxy(
                "haproxy",
                Path::new("haproxy"),
                &haproxy_conf(&backends),
                &args,
            )?;
        }
        System::NginxStream => {
            let conf = nginx_stream_conf(&rig.dir, &backends);
            let args = web::nginx_args(&rig.dir, "proxy", Path::new("{conf}"));
            rig.start_proxy("proxy", Path::new("nginx"), &conf, &args)?;
        }
    }
    // One request through the system before any is timed.
    rig.topo.client.run(|| web::http_get("/", PAGE))?;
    Ok(rig)
}

fn wrk_args(config: &Config, mode: Mode) -> Vec<String> {
    let mut args = web::wrk_args(config, mode);
    args.push(format!("http://{VIP}{}", mode.path()));
    args
}

pub fn run(config: &Config, plot_dir: &Path, command: &str) -> (Section, Vec<Goal>) {
    const TITLE: &str = "End to end: HTTP through the load balancer";
    let goal_text = "end-to-end requests/s above HAProxy and nginx";
    if let Some(why) = crate::missing_programs(&["wrk", "nginx", "haproxy", "iptables-restore"]) {
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
         running nginx (one worker each) that serve a {}-byte page, and in a third run \
         (keep-alive) a {} MiB file, where bytes rather than requests count. Every system \
         gets a fresh \
         topology. Our load balancer and iptables translate in the kernel (the VIP is routed \
         through the LB node); HAProxy and nginx hold the VIP on the LB node's loopback and \
         proxy each connection, with as many threads or workers as there are cores. \
         Client, LB and backends share the machine's {} cores, so the whole chain limits the \
         rate, as it would on one Docker host.",
        web::shell_line(&wrk_args(config, Mode::KeepAlive)),
        PAGE.len(),
        web::BIG_BYTES >> 20,
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
    let outcomes = web::measure_each(
        "e2e",
        System::ALL.into_iter().filter(|s| config.wants(s.name())),
        System::name,
        rig,
        (&MODES, |mode| wrk_args(config, mode)),
        config.e2e_window,
        &mut section.not_measured,
    );
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
        let cpu = cpu_per_request(o);
        table.row(vec![
            o.system.name().into(),
            o.mode.name().into(),
            thousands(o.m.wrk.rps as u64),
            reference.map_or("–".into(), |r| ratio(o.m.wrk.rps, r.m.wrk.rps)),
            format!("{:.2} ms", o.m.wrk.p99.as_secs_f64() * 1e3),
            reference.map_or("–".into(), |r| {
                ratio(o.m.wrk.p99.as_secs_f64(), r.m.wrk.p99.as_secs_f64())
            }),
            thousands(o.m.wrk.errors),
            cpu.map_or("–".into(), |c| format!("{:.1} µs", c.as_secs_f64() * 1e6)),
            match (cpu, reference.and_then(cpu_per_request)) {
                (Some(c), Some(r)) => ratio(c.as_secs_f64(), r.as_secs_f64()),
                _ => "–".into(),
            },
        ]);
    }
    section.tables.push(table);

    let bars: Vec<(String, f64)> = outcomes
        .iter()
        .map(|o| {
            (
                format!("{}, {}", o.system.name(), o.mode.name()),
                o.m.wrk.rps,
            )
        })
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
    for mode in Mode::ALL {
        let Some(o) = ours(mode) else {
            complete = false;
            continue;
        };
        for peer in [System::Haproxy, System::NginxStream] {
            match outcomes.iter().find(|p| p.system == peer && p.mode == mode) {
                Some(p) => {
                    met &= o.m.wrk.rps > p.m.wrk.rps;
                    parts.push(format!(
                        "{:.2}x {} ({})",
                        o.m.wrk.rps / p.m.wrk.rps,
                        peer.name(),
                        mode.name()
                    ));
                }
                None => complete = false,
            }
        }
    }
    let iptables = iptables_goal(&outcomes);
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
    (section, vec![goal, iptables])
}

/// The modes each system is measured in.
const MODES: [Mode; 3] = [Mode::KeepAlive, Mode::Close, Mode::KeepAliveBig];

/// Ahead of iptables DNAT in requests/s and in CPU per request, in every mode.
fn iptables_goal(outcomes: &[web::Outcome<System>]) -> Goal {
    let text = "end-to-end requests/s and CPU per request ahead of iptables DNAT (31-byte and \
                1 MiB bodies)";
    let find = |s: System, m: Mode| outcomes.iter().find(|o| o.system == s && o.mode == m);
    let mut parts = Vec::new();
    let mut met = true;
    for mode in MODES {
        let (Some(o), Some(p)) = (find(System::Ours, mode), find(System::Iptables, mode)) else {
            return goal_not_measured(
                text,
                &format!("ours or iptables did not run ({})", mode.name()),
            );
        };
        let rps = o.m.wrk.rps / p.m.wrk.rps;
        let cpu = match (cpu_per_request(o), cpu_per_request(p)) {
            (Some(a), Some(b)) => a.as_secs_f64() / b.as_secs_f64(),
            _ => f64::NAN,
        };
        met &= rps > 1.0 && cpu < 1.0;
        parts.push(format!(
            "{rps:.2}x the requests/s at {cpu:.2}x the CPU per request ({})",
            mode.name()
        ));
    }
    Goal {
        goal: text.into(),
        measured: parts.join("; "),
        met: Some(met),
    }
}
