//! lbd: the load balancer daemon.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use lb_api::cli::lbd::{Args, DEFAULT_CONFIG};
use lb_userspace::daemon::{self, Options};
use lb_userspace::datapath::{pinned_names, Limits, TcAttach};
use lb_userspace::datapath_log::DatapathLog;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    // Checked by clap against the same list of values.
    let datapath_log: DatapathLog = args.datapath_log.parse().unwrap_or(DatapathLog::Off);
    lb_userspace::logging::init(&args.log_level, datapath_log.filter());
    let label_frontends = args
        .label_frontends
        .iter()
        .map(|cidr| lb_userspace::config::parse_cidr(cidr))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| {
            eprintln!("lbd: --label-frontends: {e}");
            std::process::exit(2);
        });
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
        remove_netlink_filters();
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
    if config.is_none() && !args.docker && args.etcd.is_empty() {
        eprintln!(
            "lbd: no source of services: give --config FILE (the default, {DEFAULT_CONFIG}, \
             does not exist), --docker and/or --etcd"
        );
        std::process::exit(2);
    }
    let etcd = (!args.etcd.is_empty()).then(|| lb_userspace::sources::etcd::Endpoint {
        urls: args.etcd.clone(),
        prefix: args.etcd_prefix.clone(),
        user: args.etcd_user.clone(),
        password_file: args.etcd_password_file.clone(),
        ca: args.etcd_ca.clone(),
        cert: args.etcd_cert.clone(),
        key: args.etcd_key.clone(),
    });
    if !args.etcd_prefix.starts_with('/') {
        eprintln!(
            "lbd: --etcd-prefix {:?}: must start with /",
            args.etcd_prefix
        );
        std::process::exit(2);
    }
    let node_address = args
        .node_address
        .or_else(|| etcd.as_ref().and_then(|e| e.local_address()));
    let register = match args.register {
        false => None,
        true => {
            if node_address.is_none() {
                eprintln!(
                    "lbd: --register needs this node's address between hosts: give \
                     --node-address (the route to etcd leaves from no usable address)"
                );
                std::process::exit(2);
            }
            let name = args.node_name.clone().unwrap_or_else(|| {
                nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "node".into())
            });
            let name = lb_userspace::sources::labels::key_safe(&name);
            Some((name, std::time::Duration::from_secs(args.register_ttl)))
        }
    };
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
            frontend_ranges: label_frontends,
            allow_node_addresses: args.label_node_addresses,
        },
        docker_exec_root: args.docker_exec_root,
        etcd,
        register,
        node_address,
        cgroup: args.cgroup,
        pin_dir: args.pin_dir,
        socket: args.socket,
        interfaces: args.interfaces,
        keep_datapath: !args.teardown_on_exit,
        metrics: args.metrics,
        local_vips: !args.no_local_vips,
        inject_fault: args.inject_fault,
        datapath_log,
        tc_attach: TcAttach::choose(&args.tc_attach)?,
        xdp: args.xdp,
        redirect_peer: !args.no_redirect_peer,
        limits: Limits {
            max_services: args.max_services,
            max_backends: args.max_backends,
            max_flows: args.max_flows,
            // The config file's `[maglev] table_size`, once it is read.
            table_size: lb_common::MAGLEV_M,
        },
    })
    .await
}

/// Takes lbd's netlink TC filters off (TCX links went with their pins), in
/// lbd's namespace and in Swarm's ingress namespaces, where lbd attaches too.
fn remove_netlink_filters() {
    use lb_userspace::datapath;
    for ifname in datapath::remove_netlink_filters() {
        println!("detached from {ifname}");
    }
    for sbox in lb_userspace::sources::netns_dir::ingress_sboxes() {
        match datapath::remove_netlink_filters_in(&sbox) {
            Ok(names) => {
                for ifname in names {
                    println!("detached from {ifname} in {}", sbox.display());
                }
            }
            Err(e) => eprintln!("{}: {e:#}", sbox.display()),
        }
    }
}
