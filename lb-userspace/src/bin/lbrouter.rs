//! lbrouter: the HTTP router beside lbd (see the README).

use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use lb_api::cli::lbrouter::Args;
use lb_userspace::router::{self, proxy::ProxyOptions, Options};

// Clients are served on threads of their own (router::run); this runtime
// has the control tasks: reloads, discovery, the API and metrics.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    lb_userspace::logging::init(&args.log_level, log::LevelFilter::Off);
    if let Some(path) = &args.check_config {
        let file = lb_userspace::config::load(path).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1);
        });
        if let Err(e) = router::tls::check(&file.http.certificates) {
            eprintln!("{}: [http.tls]: {e:#}", path.display());
            std::process::exit(1);
        }
        println!(
            "{}: ok ({} routes, {} certificates)",
            path.display(),
            file.http.routes.len(),
            file.http.certificates.len()
        );
        return Ok(());
    }
    let docker = if args.docker {
        let env = |name: &str| std::env::var(name).ok();
        let engine = lb_userspace::sources::engine::resolve(args.docker_host.as_deref(), &env)
            .map_err(anyhow::Error::msg)?;
        engine.check_files()?;
        Some(engine)
    } else {
        None
    };
    let api = match (args.api, &args.api_token_file) {
        (Some(addr), Some(path)) => Some((addr, router::api::read_token(path)?)),
        _ => None,
    };
    let ms = Duration::from_millis;
    router::run(Options {
        config: args.config,
        listen: args.listen,
        listen_tls: args.listen_tls,
        metrics: args.metrics,
        max_connections: args.max_connections as usize,
        max_header_bytes: args.max_header_bytes as usize,
        header_read_timeout: ms(args.header_read_timeout_ms),
        proxy: ProxyOptions {
            connect_timeout: ms(args.connect_timeout_ms),
            request_timeout: ms(args.request_timeout_ms),
            backend_idle_timeout: ms(args.backend_idle_timeout_ms),
            access_log: args.access_log,
        },
        docker,
        api,
    })
    .await
}
