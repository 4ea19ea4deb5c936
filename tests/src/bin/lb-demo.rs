//! The demo behind `cargo xtask demo`: a client, the load-balancer node and
//! three backends in network namespaces; lbd balances the virtual addresses
//! of a config file over the backends. With `--docker` (`cargo xtask demo
//! --docker`) it is a one-node Swarm instead, whose published port, and
//! whose service VIP called by name from another container, answer only
//! once lbd runs, because this kernel has no IPVS for Docker's own routing
//! mesh and service VIPs; then lbrouter routes `/api` and `/` to two
//! services by their labels. Everything it creates is removed on exit,
//! also on failure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use lb_tests::docker::{http_whoami, wait_service_running, Cluster, Dockerd, CLIENT_ADDR};
use lb_tests::echo::{tcp_request, udp_request};
use lb_tests::lbd::{lbctl, Lbd};
use lb_tests::netns::{command_in, run_in};
use lb_tests::process::wait_until;
use lb_tests::router::{block_on, get, router_addr, Router};
use lb_tests::swarm::{
    add_labels, calls_by_name, container_netns, create_network, create_service, run_client, IMAGE,
};
use lb_tests::topology::{echo_bin, Topology, LB_CLIENT_V4};

const TIMEOUT: Duration = Duration::from_secs(3);

struct Args {
    config: PathBuf,
    requests: Option<usize>,
    docker: bool,
}

fn args() -> Result<Args> {
    let mut args = Args {
        config: PathBuf::from("examples/demo.toml"),
        requests: None,
        docker: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--config" => args.config = it.next().context("--config needs a path")?.into(),
            "--requests" => {
                let n: usize = it.next().context("--requests needs a number")?.parse()?;
                if n == 0 || n > 10_000 {
                    bail!("--requests must be between 1 and 10000");
                }
                args.requests = Some(n);
            }
            "--docker" => args.docker = true,
            other => {
                bail!("unknown argument {other} (known: --config PATH, --requests N, --docker)")
            }
        }
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = args()?;
    if args.docker {
        return docker_demo(args.requests.unwrap_or(60));
    }
    let config = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;

    println!("== topology: client 10.71.0.2 -> LB node -> backends b1 b2 b3 (10.72.N.2)");
    let mut topo = Topology::new("demo")?;
    topo.start_servers(&echo_bin(), 8080, 5353)?;

    let web: SocketAddr = "10.73.0.10:80".parse()?;
    let before = topo
        .client
        .run(move || tcp_request(web, Duration::from_secs(1)));
    println!(
        "== without lbd, {web}: {}",
        match before {
            Ok(_) => "answered (unexpected)".to_string(),
            Err(e) => format!("no answer ({})", e.root_cause()),
        }
    );

    println!("== starting lbd with {}", args.config.display());
    let lbd = Lbd::start(&topo.lb, "demo", &config, &["lbc0", "lbb1", "lbb2", "lbb3"])?;

    let n = args.requests.unwrap_or(300);
    let targets: [(&str, SocketAddr, bool); 3] = [
        ("web  (tcp, IPv4)", web, false),
        ("dns  (udp, IPv4)", "10.73.0.10:53".parse()?, true),
        ("web6 (tcp, IPv6)", "[fd00:73::10]:80".parse()?, false),
    ];
    for (label, target, udp) in targets {
        let spread = topo
            .client
            .run(move || -> Result<BTreeMap<String, usize>> {
                let mut spread = BTreeMap::new();
                for _ in 0..n {
                    let (name, _peer) = if udp {
                        udp_request(target, TIMEOUT)?
                    } else {
                        tcp_request(target, TIMEOUT)?
                    };
                    *spread.entry(name).or_insert(0) += 1;
                }
                Ok(spread)
            })?;
        println!("\n== {label}: {n} requests to {target}, each a new flow");
        print_spread(&spread, n);
    }

    println!("\n== lbctl status");
    print!("{}", lbctl(&lbd.socket, &["status"])?);
    println!("\n== cleaning up");
    drop(lbd);
    drop(topo);
    Ok(())
}

fn print_spread(spread: &BTreeMap<String, usize>, n: usize) {
    for (name, count) in spread {
        let bar = "#".repeat(count * 50 / n);
        println!("   {name}  {count:>5}  {bar}");
    }
}

/// A one-node Swarm whose service publishes port 8080 and is called by name
/// from a container on its overlay network: both fail without lbd (no
/// IPVS), and are balanced over the tasks with it.
fn docker_demo(n: usize) -> Result<()> {
    const REPLICAS: usize = 3;

    println!("== starting dockerd in a node namespace and forming a one-node Swarm");
    let cluster = Cluster::new(1)?;
    let node = &cluster.nodes[0];
    let d = cluster.manager();
    cluster.build_image(IMAGE)?;
    println!("== docker network create --driver overlay --attachable app");
    create_network(d, "app");
    println!(
        "== docker service create --name web --replicas {REPLICAS} --publish 8080:80 \\
   \
         --network app {IMAGE}"
    );
    create_service(d, "web", REPLICAS, "8080:80", &["--network", "app"]);
    println!("== docker run --name front --network app {IMAGE}   (calls `web` by name)");
    run_client(d, "front", "app");
    let tasks = wait_service_running(d, "web", REPLICAS, Duration::from_secs(60))?;
    println!("   {REPLICAS} tasks running:");
    for t in &tasks {
        let container = t.container_id.as_deref().unwrap_or("?");
        let addr = t
            .addr_on("ingress")
            .map(|a| a.to_string())
            .unwrap_or_default();
        println!(
            "   web.{}  container {}  ingress {addr}",
            t.slot,
            &container[..container.len().min(12)]
        );
    }

    let target = SocketAddr::from((node.addr, 8080));
    let before = cluster
        .client
        .run(move || http_whoami(target, Duration::from_secs(1)));
    println!(
        "\n== without lbd, client {} -> {target}: {}",
        CLIENT_ADDR,
        match before {
            Ok(_) => "answered (unexpected: does the kernel have IPVS?)".to_string(),
            Err(e) => format!("failed ({})", e.root_cause()),
        }
    );
    let (_, failed) = calls_by_name(d, "front", "web", 1);
    println!(
        "== without lbd, front -> web (the service's VIP, by name): {}",
        match failed {
            0 => "answered (unexpected: does the kernel have IPVS?)",
            _ => "failed",
        }
    );

    println!("\n== starting lbd --docker on the node");
    let host = format!("unix://{}", d.socket().display());
    let lbd = Lbd::start_with(
        &node.ns,
        "demo",
        "",
        &["eth0"],
        &["--docker", "--docker-host", &host],
    )?;
    let served = cluster.client.run(move || {
        wait_until(
            Duration::from_secs(20),
            &format!("{target} to answer"),
            || http_whoami(target, Duration::from_secs(1)).is_ok(),
        )
    });
    if let Err(e) = served {
        bail!("{e:#}\nlbd's log:\n{}", lbd.log());
    }

    let spread = cluster
        .client
        .run(move || -> Result<BTreeMap<String, usize>> {
            let mut spread = BTreeMap::new();
            for _ in 0..n {
                let (name, _peer) = http_whoami(target, TIMEOUT)?;
                *spread.entry(name).or_insert(0) += 1;
            }
            Ok(spread)
        })?;
    println!("\n== with lbd: {n} requests to {target}, each a new flow, by task container");
    print_spread(&spread, n);

    let (spread, failed) = calls_by_name(d, "front", "web", n);
    println!(
        "\n== with lbd: {n} calls from the container front to `web` by name \
         (Docker's DNS gives the VIP), by task container; {failed} failed"
    );
    print_spread(&spread, n);
    if failed > 0 {
        bail!("{failed} calls by name failed\nlbd's log:\n{}", lbd.log());
    }

    println!("\n== lbctl status");
    print!("{}", lbctl(&lbd.socket, &["status"])?);

    path_routing(d, n)?;
    println!("\n== cleaning up");
    drop(lbd);
    drop(cluster);
    Ok(())
}

/// lbrouter beside lbd: `/api` to one service and `/` to another, each
/// routed by its docker-flow-proxy labels alone, to its tasks directly.
/// lbrouter runs in the container `front`'s namespace, on the overlay, as
/// docker-flow-proxy would (tasks' overlay addresses are reached only
/// from there).
fn path_routing(d: &Dockerd, n: usize) -> Result<()> {
    let df = |path: &str| {
        [
            "com.df.notify=true".to_string(),
            format!("com.df.servicePath={path}"),
            "com.df.port=8000".to_string(),
        ]
    };
    println!(
        "\n== docker service create --name api --replicas 2 --network app \\\n   \
         --label com.df.notify=true --label com.df.servicePath=/api --label com.df.port=8000 {IMAGE}"
    );
    let api_labels = df("/api");
    let mut extra = vec!["--network", "app"];
    for l in &api_labels {
        extra.extend(["--label", l.as_str()]);
    }
    create_service(d, "api", 2, "", &extra);
    wait_service_running(d, "api", 2, Duration::from_secs(60))?;
    println!(
        "== docker service update --label-add com.df.notify=true --label-add \
         com.df.servicePath=/ --label-add com.df.port=8000 web"
    );
    let web_labels = df("/");
    let web_labels: Vec<&str> = web_labels.iter().map(String::as_str).collect();
    add_labels(d, "web", &web_labels);

    println!("== starting lbrouter --docker in the container front (on the overlay app)");
    let at = container_netns(d, "front");
    let status = command_in(&at, "ip")
        .args(["addr", "add", &format!("{LB_CLIENT_V4}/32"), "dev", "lo"])
        .status()?;
    anyhow::ensure!(status.success(), "adding the router's address in front");
    let host = format!("unix://{}", d.socket().display());
    let router = Router::start_in(&at, "", &[], &["--docker", "--docker-host", &host])?;
    let backend = |path: &'static str| {
        run_in(&at, move || block_on(get("demo.example", path)))
            .ok()
            .and_then(|r| r.ok())
            .filter(|r| r.status == 200)
            .map(|r| r.backend().to_string())
    };
    let routed = wait_until(Duration::from_secs(30), "/api and / to be routed", || {
        backend("/api/users").is_some() && backend("/").is_some()
    });
    if let Err(e) = routed {
        bail!("{e:#}\nlbrouter's log:\n{}", router.log());
    }
    for path in ["/api/users", "/"] {
        let mut spread = BTreeMap::new();
        for _ in 0..n {
            let name = backend(path).with_context(|| format!("GET {path}"))?;
            *spread.entry(name).or_insert(0) += 1;
        }
        println!(
            "\n== lbrouter: {n} requests GET http://{}{path}, by task container",
            router_addr()
        );
        print_spread(&spread, n);
    }
    drop(router);
    Ok(())
}
