//! The demo behind `cargo xtask demo`: a client, the load-balancer node and
//! three backends in network namespaces; lbd balances the virtual addresses
//! of a config file over the backends. Everything it creates is removed on
//! exit, also on failure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use lb_tests::echo::{tcp_request, udp_request};
use lb_tests::lbd::{lbctl, Lbd};
use lb_tests::topology::{echo_bin, Topology};

const TIMEOUT: Duration = Duration::from_secs(3);

struct Args {
    config: PathBuf,
    requests: usize,
}

fn args() -> Result<Args> {
    let mut args = Args {
        config: PathBuf::from("examples/demo.toml"),
        requests: 300,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--config" => args.config = it.next().context("--config needs a path")?.into(),
            "--requests" => {
                args.requests = it.next().context("--requests needs a number")?.parse()?;
                if args.requests == 0 || args.requests > 10_000 {
                    bail!("--requests must be between 1 and 10000");
                }
            }
            other => bail!("unknown argument {other} (known: --config PATH, --requests N)"),
        }
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = args()?;
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

    let n = args.requests;
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
        for (name, count) in &spread {
            let bar = "#".repeat(count * 50 / n);
            println!("   {name}  {count:>5}  {bar}");
        }
    }

    println!("\n== lbctl status");
    print!("{}", lbctl(&lbd.socket, &["status"])?);
    println!("\n== cleaning up");
    drop(lbd);
    drop(topo);
    Ok(())
}
