//! lbd: the load balancer daemon.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use lb_api::cli::lbd::{Args, DEFAULT_CONFIG};
use lb_userspace::daemon::{self, Options};
use lb_userspace::datapath::{pinned_names, Limits};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    lb_userspace::logging::init(&args.log_level);
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
    daemon::run(Options {
        config,
        docker: args.docker.then_some(args.docker_host),
        docker_exec_root: args.docker_exec_root,
        pin_dir: args.pin_dir,
        socket: args.socket,
        interfaces: args.interfaces,
        keep_datapath: !args.teardown_on_exit,
        metrics: args.metrics,
        local_vips: !args.no_local_vips,
        inject_fault: args.inject_fault,
        limits: Limits {
            max_services: args.max_services,
            max_backends: args.max_backends,
            max_flows: args.max_flows,
        },
    })
    .await
}
