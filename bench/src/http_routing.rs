//! HTTP routing: lbrouter, HAProxy in HTTP mode and nginx's `proxy_pass`,
//! each on the LB node with the same two routes (`/api` to one pool of
//! backends, `/` to another) and keep-alive connections to the backends,
//! driven by wrk from the client namespace. Same topology and backends as
//! the end-to-end benchmark.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use lb_tests::topology::target_bin;

use crate::report::{ratio, thousands, Goal, Section, Table};
use crate::web::{self, Mode, Rig, API_PAGE, API_PORT, BACKEND_PORT, PAGE, VIP};
use crate::{goal_not_measured, Config};

const TITLE: &str = "HTTP routing: lbrouter against HAProxy and nginx";
const GOAL: &str = "lbrouter: more requests/s than HAProxy and nginx at no worse p99";

/// Idle keep-alive connections each proxy may keep per backend pool
/// (nginx's `keepalive`); more than wrk's connections, so none is closed
/// for want of room.
const POOL: u32 = 128;

/// wrk asks for `/api/` and `/` in turn, so both routes carry half the load.
const WRK_SCRIPT: &str = "local paths = { \"/api/\", \"/\" }\nlocal n = 0\n\
                          request = function()\n  n = n + 1\n  \
                          return wrk.format(nil, paths[n % 2 + 1])\nend\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    Lbrouter,
    Haproxy,
    Nginx,
}

impl System {
    const ALL: [System; 3] = [System::Lbrouter, System::Haproxy, System::Nginx];

    fn name(self) -> &'static str {
        match self {
            System::Lbrouter => "lbrouter",
            System::Haproxy => "HAProxy (HTTP mode)",
            System::Nginx => "nginx (proxy_pass)",
        }
    }
}

/// Worker threads or processes of every proxy: lbrouter starts a serving
/// thread per core, and the peers are given as many.
fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn lbrouter_conf(api: &[String], web: &[String]) -> String {
    let list = |b: &[String]| {
        b.iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[[http.route]]\nname = \"api\"\npath = \"/api\"\nbackends = [{}]\n\n\
         [[http.route]]\nname = \"web\"\nbackends = [{}]\n",
        list(api),
        list(web)
    )
}

fn haproxy_conf(api: &[String], web: &[String]) -> String {
    let mut s = format!(
        "global\n  nbthread {}\n  maxconn 8000\n\ndefaults\n  mode http\n  \
         option http-keep-alive\n  option forwardfor\n  http-reuse always\n  \
         timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n  \
         timeout http-keep-alive 120s\n\n\
         frontend fe\n  bind {VIP}:80\n  acl api path /api\n  acl api path_beg /api/\n  \
         use_backend api if api\n  default_backend web\n",
        workers()
    );
    // random(2) is power of two choices by load, as lbrouter balances.
    for (name, pool) in [("api", api), ("web", web)] {
        let _ = writeln!(s, "\nbackend {name}\n  balance random(2)");
        for (i, b) in pool.iter().enumerate() {
            let _ = writeln!(s, "  server {name}{} {b}", i + 1);
        }
    }
    s
}

fn nginx_conf(dir: &Path, api: &[String], web: &[String]) -> String {
    let mut s = web::nginx_http_preamble(dir, "proxy", &workers().to_string());
    // `random two least_conn` is power of two choices, as lbrouter balances.
    for (name, pool) in [("api", api), ("web", web)] {
        let _ = writeln!(s, "  upstream {name} {{\n    random two least_conn;");
        for b in pool {
            let _ = writeln!(s, "    server {b};");
        }
        let _ = writeln!(
            s,
            "    keepalive {POOL};\n    keepalive_requests 100000000;\n    \
             keepalive_timeout 120s;\n  }}"
        );
    }
    let _ = write!(
        s,
        "  proxy_http_version 1.1;\n  proxy_set_header Connection \"\";\n  \
         proxy_set_header Host $http_host;\n  \
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n  \
         proxy_buffering off;\n\
         \x20 server {{\n    listen {VIP}:80 backlog=4096;\n    \
         location = /api {{ proxy_pass http://api; }}\n    \
         location /api/ {{ proxy_pass http://api; }}\n    \
         location / {{ proxy_pass http://web; }}\n  }}\n}}\n"
    );
    s
}

/// A fresh rig with `system` routing on the LB node, both routes checked.
fn rig(system: System) -> Result<Rig> {
    let mut rig = Rig::new(&format!("hr{}", system as u8))?;
    rig.vip_on_lb()?;
    let (api, web) = (rig.backends(API_PORT), rig.backends(BACKEND_PORT));
    match system {
        System::Lbrouter => {
            let args = ["--config", "{conf}", "--listen", &format!("{VIP}:80")].map(String::from);
            let conf = lbrouter_conf(&api, &web);
            rig.start_proxy("lbrouter", &target_bin("lbrouter"), &conf, &args)?;
        }
        System::Haproxy => {
            let args = ["-db", "-f", "{conf}"].map(String::from);
            rig.start_proxy(
                "haproxy",
                Path::new("haproxy"),
                &haproxy_conf(&api, &web),
                &args,
            )?;
        }
        System::Nginx => {
            let conf = nginx_conf(&rig.dir, &api, &web);
            let args = web::nginx_args(&rig.dir, "proxy", Path::new("{conf}"));
            rig.start_proxy("proxy", Path::new("nginx"), &conf, &args)?;
        }
    }
    rig.topo.client.run(|| -> Result<()> {
        web::http_get("/api/", API_PAGE)?;
        web::http_get("/", PAGE)
    })?;
    Ok(rig)
}

fn wrk_args(config: &Config, mode: Mode, script: &Path) -> Vec<String> {
    let mut args = web::wrk_args(config, mode);
    args.extend(["-s".into(), script.display().to_string()]);
    args.push(format!("http://{VIP}/"));
    args
}

type Outcome = web::Outcome<System>;

/// CPU time of the proxy's processes (the LB namespace runs nothing
/// else), per request.
fn cpu_per_request(o: &Outcome) -> Option<Duration> {
    web::per_request(o.m.lb_processes, o.m.wrk.requests)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub fn run(config: &Config, command: &str) -> (Section, Vec<Goal>) {
    if let Some(why) = crate::missing_programs(&["wrk", "nginx", "haproxy"]) {
        return (
            crate::not_measured(TITLE, command, why.clone()),
            vec![goal_not_measured(GOAL, &why)],
        );
    }
    let mut section = Section {
        title: TITLE.into(),
        command: command.into(),
        ..Default::default()
    };
    let script = std::env::temp_dir().join(lb_tests::netns::unique_name("hr-wrk.lua"));
    if let Err(e) = std::fs::write(&script, WRK_SCRIPT) {
        let why = format!("writing {}: {e}", script.display());
        return (
            crate::not_measured(TITLE, command, why.clone()),
            vec![goal_not_measured(GOAL, &why)],
        );
    }
    section.text.push(format!(
        "wrk in a client namespace, `wrk {}` (and the same with `-H \"Connection: close\"` \
         for a new connection per request), asking for `/api/` and `/` in turn. Each proxy \
         listens on the LB node and has the same two routes: `/api` to the three backends' \
         API server and `/` to their web server (nginx, one worker per backend namespace, \
         serving a page of {} or {} bytes; a request routed to the wrong pool is answered \
         404 and counted as an error). Every proxy keeps HTTP/1.1 connections to the \
         backends open and reuses them (HAProxy `mode http` with `http-reuse always`; \
         nginx `upstream {{ keepalive {POOL}; }}` with `proxy_http_version 1.1` and an \
         empty `Connection` header), balances by power of two choices (HAProxy \
         `balance random(2)`, nginx `random two least_conn`), adds `X-Forwarded-For`, and \
         runs {} worker threads or processes: lbrouter has a serving thread per core, \
         HAProxy gets `nbthread {}` and nginx `worker_processes {}`. Every system gets a \
         fresh topology; client, proxy and backends share the machine's cores.",
        web::shell_line(&wrk_args(config, Mode::KeepAlive, Path::new("routes.lua"))),
        PAGE.len(),
        API_PAGE.len(),
        workers(),
        workers(),
        workers(),
    ));
    section.text.push(
        "*CPU per request* is the user and system CPU time of the proxy's processes (all \
         threads and workers, from /proc/PID/stat), divided by the requests served. Ratios \
         are to lbrouter in the same mode; for latency and CPU, lower is better."
            .into(),
    );
    let outcomes = web::measure_each(
        "http-routing",
        System::ALL.into_iter().filter(|s| config.wants(s.name())),
        System::name,
        rig,
        (&Mode::ALL, |mode| wrk_args(config, mode, &script)),
        config.e2e_window,
        &mut section.not_measured,
    );
    let _ = std::fs::remove_file(&script);
    let ours = |mode: Mode| {
        outcomes
            .iter()
            .find(|o| o.system == System::Lbrouter && o.mode == mode)
    };
    let mut table = Table::new(&[
        "system",
        "connections",
        "requests/s",
        "vs lbrouter",
        "p50 latency",
        "vs lbrouter",
        "p99 latency",
        "vs lbrouter",
        "errors",
        "CPU per request",
        "vs lbrouter",
    ]);
    let secs = |d: Duration| d.as_secs_f64();
    for o in &outcomes {
        let reference = ours(o.mode);
        let vs =
            |f: &dyn Fn(&Outcome) -> f64| reference.map_or("–".into(), |r| ratio(f(o), f(r)));
        let cpu = cpu_per_request(o);
        table.row(vec![
            o.system.name().into(),
            o.mode.name().into(),
            thousands(o.m.wrk.rps as u64),
            vs(&|x| x.m.wrk.rps),
            ms(o.m.wrk.p50),
            vs(&|x| secs(x.m.wrk.p50)),
            ms(o.m.wrk.p99),
            vs(&|x| secs(x.m.wrk.p99)),
            thousands(o.m.wrk.errors),
            cpu.map_or("–".into(), |c| format!("{:.1} µs", c.as_secs_f64() * 1e6)),
            match (cpu, reference.and_then(cpu_per_request)) {
                (Some(c), Some(r)) => ratio(secs(c), secs(r)),
                _ => "–".into(),
            },
        ]);
    }
    if !outcomes.is_empty() {
        section.tables.push(table);
    }
    (section, vec![goal(&outcomes)])
}

/// Met when, in both client modes, lbrouter served more requests/s than
/// each peer with a p99 no higher than the peer's.
fn goal(outcomes: &[Outcome]) -> Goal {
    let mut parts = Vec::new();
    let mut met = true;
    let mut complete = true;
    for mode in Mode::ALL {
        let Some(o) = outcomes
            .iter()
            .find(|o| o.system == System::Lbrouter && o.mode == mode)
        else {
            complete = false;
            continue;
        };
        for peer in [System::Haproxy, System::Nginx] {
            let Some(p) = outcomes.iter().find(|p| p.system == peer && p.mode == mode) else {
                complete = false;
                continue;
            };
            met &= o.m.wrk.rps > p.m.wrk.rps && o.m.wrk.p99 <= p.m.wrk.p99;
            parts.push(format!(
                "{:.2}x the requests/s of {}, p99 {} vs {} ({})",
                o.m.wrk.rps / p.m.wrk.rps,
                peer.name(),
                ms(o.m.wrk.p99),
                ms(p.m.wrk.p99),
                mode.name()
            ));
        }
    }
    if parts.is_empty() {
        return goal_not_measured(GOAL, "lbrouter or both peers did not run");
    }
    Goal {
        goal: GOAL.into(),
        measured: format!(
            "{}{}",
            parts.join("; "),
            if complete { "" } else { " (incomplete)" }
        ),
        met: complete.then_some(met),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_proxy_routes_api_and_the_rest_to_their_pools() {
        let api = vec!["10.0.0.1:8081".to_string()];
        let web = vec!["10.0.0.1:8080".to_string()];
        let lbr = lbrouter_conf(&api, &web);
        assert!(lbr.contains("path = \"/api\"\nbackends = [\"10.0.0.1:8081\"]"));
        let ha = haproxy_conf(&api, &web);
        assert!(ha.contains("use_backend api if api") && ha.contains("server api1 10.0.0.1:8081"));
        assert!(ha.contains("http-reuse always") && ha.contains("mode http"));
        let ng = nginx_conf(Path::new("/tmp/x"), &api, &web);
        assert!(ng.contains("location /api/ { proxy_pass http://api; }"));
        assert!(ng.contains("keepalive 128;") && ng.contains("proxy_set_header Connection \"\";"));
        assert_eq!(ng.matches('{').count(), ng.matches('}').count());
    }
}
