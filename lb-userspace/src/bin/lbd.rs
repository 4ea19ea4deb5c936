//! lbd: the load balancer daemon.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use lb_userspace::daemon::{self, Options};
use lb_userspace::datapath::{pinned_names, Limits};
use lb_userspace::datapath_log::DatapathLog;

/// Where lbd looks for its configuration when --config is not given.
const DEFAULT_CONFIG: &str = "/etc/lbd/lbd.toml";

/// Keeps the kernel datapath's maps equal to the desired state.
///
/// Every setting can also come from the environment (`LBD_CONFIG`,
/// `LBD_PIN_DIR`, ...: shown with each option); a flag on the command line
/// wins over the environment.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Static services (TOML). Reloaded on SIGHUP and when the file changes.
    /// Default: /etc/lbd/lbd.toml when it exists.
    #[arg(long, env = "LBD_CONFIG")]
    config: Option<PathBuf>,
    /// Also take services from the Docker Engine: containers labelled
    /// `lb.frontend` (see the README).
    #[arg(long, env = "LBD_DOCKER")]
    docker: bool,
    /// The engine to watch with --docker: unix:///path or tcp://host[:port].
    /// Default: DOCKER_HOST, else unix:///var/run/docker.sock; tcp uses TLS
    /// when DOCKER_TLS_VERIFY is set (certificates from DOCKER_CERT_PATH).
    #[arg(long, env = "LBD_DOCKER_HOST")]
    docker_host: Option<String>,
    /// Let container labels take frontends in this address range
    /// (repeatable; IPv4 or IPv6 CIDR). Without any (here or in the
    /// config's [labels] section), every labelled container is refused.
    #[arg(
        long = "label-frontends",
        env = "LBD_LABEL_FRONTENDS",
        value_delimiter = ',',
        value_name = "CIDR",
        value_parser = lb_userspace::config::parse_cidr
    )]
    label_frontends: Vec<ipnet::IpNet>,
    /// Let container labels take this node's own addresses (inside the
    /// allowed ranges).
    #[arg(long, env = "LBD_LABEL_NODE_ADDRESSES")]
    label_node_addresses: bool,
    /// The engine's --exec-root (where Swarm's ingress sandbox namespace
    /// is). Found by itself from the engine's containers; this overrides it.
    #[arg(long, env = "LBD_DOCKER_EXEC_ROOT")]
    docker_exec_root: Option<PathBuf>,
    /// Where maps and links are pinned. Must be on bpffs; lbd mounts bpffs
    /// only at /sys/fs/bpf, when nothing is mounted there yet.
    #[arg(long, env = "LBD_PIN_DIR", default_value = "/sys/fs/bpf/lb")]
    pin_dir: PathBuf,
    /// Control socket for lbctl.
    #[arg(long, env = "LBD_SOCKET", default_value = lb_userspace::control::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Attach only to these interfaces (repeatable). By default every
    /// interface but loopback, following interfaces as they come and go.
    #[arg(long = "iface", env = "LBD_IFACE", value_delimiter = ',')]
    interfaces: Vec<String>,
    /// Serve Prometheus metrics at /metrics and a stats page at / on this
    /// loopback address (other addresses are refused).
    #[arg(long, env = "LBD_METRICS")]
    metrics: Option<std::net::SocketAddr>,
    /// Do not add frontend addresses to lo. Then a service without a usable
    /// backend drops its packets instead of the kernel answering with a TCP
    /// reset or an ICMP port unreachable.
    #[arg(long, env = "LBD_NO_LOCAL_VIPS")]
    no_local_vips: bool,
    /// On exit, leave the datapath attached and its maps pinned. This is
    /// the default; the flag is still accepted.
    #[arg(long, conflicts_with = "teardown_on_exit")]
    keep_datapath: bool,
    /// On SIGTERM or SIGINT, detach the datapath and remove its pins, the
    /// frontend addresses and the drains, as --cleanup does, instead of
    /// leaving the datapath running for the next lbd. Drops every
    /// connection through this node.
    #[arg(long, env = "LBD_TEARDOWN_ON_EXIT")]
    teardown_on_exit: bool,
    /// Remove what lbd pinned under --pin-dir (detaching the datapath), the
    /// frontend addresses it added and its record of drains, and exit.
    #[arg(long)]
    cleanup: bool,
    /// Check this configuration file and exit: 0 if it is valid, 1 with
    /// the file, line and reason of the first error if not (like `nginx -t`).
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace. RUST_LOG, when set,
    /// takes precedence and can set levels per module.
    #[arg(long, env = "LBD_LOG_LEVEL", default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    log_level: String,
    /// Fail this background task once, a second after it starts, to check
    /// that it is restarted (for tests).
    #[arg(long, hide = true, value_name = "TASK")]
    inject_fault: Option<String>,
    #[arg(long, env = "LBD_MAX_SERVICES", default_value_t = lb_common::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    #[arg(long, env = "LBD_MAX_BACKENDS", default_value_t = lb_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Report the datapath's rare events (failed rewrites, SNAT port
    /// exhaustion, failed conntrack inserts, packets dropped as too big) in
    /// lbd's log, at this level and above: off, error, warn, info or debug.
    #[arg(long, env = "LBD_DATAPATH_LOG", value_name = "LEVEL", default_value_t = DatapathLog::Off)]
    datapath_log: DatapathLog,
    /// Connection-tracking capacity, in flows.
    #[arg(long, env = "LBD_MAX_FLOWS", default_value_t = lb_common::DEFAULT_MAX_FLOWS)]
    max_flows: u32,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    lb_userspace::logging::init(&args.log_level, args.datapath_log.filter());
    if let Some(path) = &args.check_config {
        return match lb_userspace::config::load(path) {
            Ok(file) => {
                println!("{}: ok ({} services)", path.display(), file.services.len());
                Ok(())
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        };
    }
    if args.cleanup {
        lb_userspace::pins::check_cleanable(&args.pin_dir)?;
        // Not from under a running lbd.
        let _instance = lb_userspace::instance::Instance::claim(&args.pin_dir, None)?;
        lb_userspace::pins::remove(&args.pin_dir, &pinned_names())?;
        lb_userspace::drains::forget(&args.pin_dir);
        let record = daemon::vips_record(&args.pin_dir);
        lb_userspace::vips::Vips::new(record.clone())
            .await?
            .clear()
            .await?;
        let _ = std::fs::remove_file(record);
        return Ok(());
    }
    let config = args
        .config
        .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()));
    if config.is_none() && !args.docker {
        eprintln!(
            "lbd: no source of services: give --config FILE (the default, {DEFAULT_CONFIG}, \
             does not exist) and/or --docker"
        );
        std::process::exit(2);
    }
    let docker = match args.docker {
        false => None,
        true => {
            let engine =
                lb_userspace::sources::engine::resolve(args.docker_host.as_deref(), &|name| {
                    std::env::var(name).ok()
                })
                .and_then(|e| e.check_files().map(|()| e).map_err(|e| format!("{e:#}")));
            match engine {
                Ok(e) => Some(e),
                Err(e) => {
                    eprintln!("lbd: {e}");
                    std::process::exit(2);
                }
            }
        }
    };
    daemon::run(Options {
        config,
        docker,
        labels: lb_userspace::sources::label_frontends::LabelPolicy {
            frontend_ranges: args.label_frontends,
            allow_node_addresses: args.label_node_addresses,
        },
        docker_exec_root: args.docker_exec_root,
        pin_dir: args.pin_dir,
        socket: args.socket,
        interfaces: args.interfaces,
        keep_datapath: !args.teardown_on_exit,
        metrics: args.metrics,
        local_vips: !args.no_local_vips,
        inject_fault: args.inject_fault,
        datapath_log: args.datapath_log,
        limits: Limits {
            max_services: args.max_services,
            max_backends: args.max_backends,
            max_flows: args.max_flows,
        },
    })
    .await
}
