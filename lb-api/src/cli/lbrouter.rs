//! lbrouter's command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// Routes HTTP by host and path prefix to the backends of the `[http]`
/// routes in lbd's config file.
///
/// Every setting can also come from the environment (`LBROUTER_CONFIG`,
/// ...: shown with each option); a flag on the command line wins.
#[derive(Parser, Debug)]
#[command(name = "lbrouter", version)]
pub struct Args {
    /// The config file (lbd's format; lbrouter reads its [http] section).
    /// Reloaded on SIGHUP and when the file changes; a file with an error
    /// is refused and the last good routes stay.
    #[arg(long, env = "LBROUTER_CONFIG", default_value = super::lbd::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Address to serve HTTP/1.1 and HTTP/2 (h2c) on (repeatable).
    #[arg(
        long,
        env = "LBROUTER_LISTEN",
        value_delimiter = ',',
        default_value = "0.0.0.0:8080"
    )]
    pub listen: Vec<SocketAddr>,
    /// Address to serve HTTPS on (repeatable): HTTP/1.1 and HTTP/2 chosen
    /// by ALPN, with the certificates of the config file's [http.tls]
    /// section, reloaded when their files change.
    #[arg(long, env = "LBROUTER_LISTEN_TLS", value_delimiter = ',')]
    pub listen_tls: Vec<SocketAddr>,
    /// Serve Prometheus metrics at /metrics on this loopback address.
    #[arg(long, env = "LBROUTER_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// Log one line per request (target `access`, at info level).
    #[arg(long, env = "LBROUTER_ACCESS_LOG")]
    pub access_log: bool,
    /// Client connections served at once; more wait in the listen backlog.
    #[arg(long, env = "LBROUTER_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// Largest request head (request line and headers), in bytes; a larger
    /// one gets 431.
    #[arg(long, env = "LBROUTER_MAX_HEADER_BYTES", default_value_t = 16_384,
          value_parser = clap::value_parser!(u32).range(8192..=1_048_576))]
    pub max_header_bytes: u32,
    /// How long a client has to send a request head, in milliseconds; also
    /// how long an HTTP/1 connection may stay idle between requests, and
    /// how long a TLS handshake may take.
    #[arg(long, env = "LBROUTER_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_ms: u64,
    /// How long connecting to a backend may take, in milliseconds.
    #[arg(long, env = "LBROUTER_CONNECT_TIMEOUT_MS", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout_ms: u64,
    /// From a request's arrival to its backend's response headers, retry
    /// included, in milliseconds; past it the client gets 504.
    #[arg(long, env = "LBROUTER_REQUEST_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_ms: u64,
    /// How long an unused connection to a backend is kept for reuse, in
    /// milliseconds.
    #[arg(long, env = "LBROUTER_BACKEND_IDLE_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub backend_idle_timeout_ms: u64,
    /// Also route to the running containers and Swarm services that ask by
    /// their labels (lb.http.*, or docker-flow-proxy's com.df.* on
    /// services; see the README), following the engine's events. The
    /// file's routes win a clash.
    #[arg(long, env = "LBROUTER_DOCKER")]
    pub docker: bool,
    /// The engine for --docker: unix:///path or tcp://host[:port]; default
    /// DOCKER_HOST, else /var/run/docker.sock.
    #[arg(long, env = "LBROUTER_DOCKER_HOST", requires = "docker")]
    pub docker_host: Option<String>,
    /// Serve docker-flow-proxy's reconfigure and remove calls on this
    /// loopback address (see the README); needs --docker, which finds the
    /// services' tasks, and --api-token-file.
    #[arg(long, env = "LBROUTER_API", requires_all = ["docker", "api_token_file"])]
    pub api: Option<SocketAddr>,
    /// A file whose first line is the token the API's callers must give.
    #[arg(long, env = "LBROUTER_API_TOKEN_FILE", requires = "api")]
    pub api_token_file: Option<PathBuf>,
    /// Check this configuration file and exit: 0 if it is valid, 1 with
    /// the file, line and reason of the first error if not. The file is
    /// checked as lbd checks it; then the certificates [http.tls] names
    /// are loaded.
    #[arg(long, value_name = "FILE")]
    pub check_config: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace. RUST_LOG, when set,
    /// takes precedence.
    #[arg(long, env = "LBROUTER_LOG_LEVEL", default_value = "info",
          value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub log_level: String,
}
