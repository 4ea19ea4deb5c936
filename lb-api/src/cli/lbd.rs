//! lbd's command line.

use std::path::PathBuf;

use clap::Parser;

use crate::control::DEFAULT_SOCKET;

/// Where lbd looks for its configuration when --config is not given.
pub const DEFAULT_CONFIG: &str = "/etc/lbd/lbd.toml";

/// Keeps the kernel datapath's maps equal to the desired state.
///
/// Every setting can also come from the environment (`LBD_CONFIG`,
/// `LBD_PIN_DIR`, ...: shown with each option); a flag on the command line
/// wins over the environment.
#[derive(Parser, Debug)]
#[command(name = "lbd", version)]
pub struct Args {
    /// Static services (TOML). Reloaded on SIGHUP and when the file changes.
    /// Default: /etc/lbd/lbd.toml when it exists.
    #[arg(long, env = "LBD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Also take services from the Docker Engine: containers labelled
    /// `lb.frontend` (see the README).
    #[arg(long, env = "LBD_DOCKER")]
    pub docker: bool,
    /// The engine to watch with --docker: unix:///path or tcp://host[:port].
    /// Default: DOCKER_HOST, else unix:///var/run/docker.sock; tcp uses TLS
    /// when DOCKER_TLS_VERIFY is set (certificates from DOCKER_CERT_PATH).
    #[arg(long, env = "LBD_DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Let container labels take frontends in this address range
    /// (repeatable; IPv4 or IPv6 CIDR). Without any (here or in the
    /// config's [labels] section), every labelled container is refused.
    #[arg(
        long = "label-frontends",
        env = "LBD_LABEL_FRONTENDS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub label_frontends: Vec<String>,
    /// Let container labels take this node's own addresses (inside the
    /// allowed ranges).
    #[arg(long, env = "LBD_LABEL_NODE_ADDRESSES")]
    pub label_node_addresses: bool,
    /// The engine's --exec-root (where Swarm's ingress sandbox namespace
    /// is). Found by itself from the engine's containers; this overrides it.
    #[arg(long, env = "LBD_DOCKER_EXEC_ROOT")]
    pub docker_exec_root: Option<PathBuf>,
    /// The cgroup v2 directory whose processes' sockets reach Swarm service
    /// VIPs through lbd (with --docker). Default: the root of the cgroup v2
    /// hierarchy, found in /proc/self/mountinfo; only containers attached to
    /// a VIP's network are balanced, whatever the cgroup.
    #[arg(long, env = "LBD_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Also take services from etcd (comma-separated endpoint URLs, e.g.
    /// http://10.0.0.5:2379): the keys under --etcd-prefix, and the
    /// prefixes the config file names with `etcd_backends` (see the README).
    #[arg(long, env = "LBD_ETCD", value_delimiter = ',', value_name = "URL")]
    pub etcd: Vec<String>,
    /// The key prefix lbd reads services from (and registers under).
    #[arg(long, env = "LBD_ETCD_PREFIX", default_value = "/lb")]
    pub etcd_prefix: String,
    /// etcd user name, with --etcd-password-file.
    #[arg(long, env = "LBD_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// A file holding the etcd user's password (a password on the command
    /// line would show in ps).
    #[arg(long, env = "LBD_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
    /// CA certificate (PEM) that etcd's certificate must chain to
    /// (https endpoints).
    #[arg(long, env = "LBD_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd, with --etcd-key.
    #[arg(long, env = "LBD_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "LBD_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// Publish this node's labelled containers in etcd (with --docker and
    /// --etcd), under a lease kept alive by lbd: hosts running lbd then
    /// share their services through etcd, without Swarm.
    #[arg(long, env = "LBD_REGISTER", requires_all = ["docker", "etcd"])]
    pub register: bool,
    /// This node's name in its registrations. Default: the host name.
    #[arg(long, env = "LBD_NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's address on the network between hosts: registrations
    /// give it with the published port, and connections to etcd services'
    /// backends leave from it. Default: the address this node reaches the
    /// first etcd endpoint from.
    #[arg(long, env = "LBD_NODE_ADDRESS")]
    pub node_address: Option<std::net::IpAddr>,
    /// The registrations' lease, in seconds: how long after this node dies
    /// its backends leave the other nodes.
    #[arg(long, env = "LBD_REGISTER_TTL", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub register_ttl: u64,
    /// How the TC program is attached: `tcx` links (Linux 6.6 and later),
    /// `netlink` (a clsact qdisc and a cls_bpf filter, older kernels too),
    /// or `auto`: tcx where the kernel has it.
    #[arg(long, env = "LBD_TC_ATTACH", default_value = "auto", value_parser = ["auto", "tcx", "netlink"])]
    pub tc_attach: String,
    /// Where maps and links are pinned. Must be on bpffs; lbd mounts bpffs
    /// only at /sys/fs/bpf, when nothing is mounted there yet.
    #[arg(long, env = "LBD_PIN_DIR", default_value = "/sys/fs/bpf/lb")]
    pub pin_dir: PathBuf,
    /// Control socket for lbctl.
    #[arg(long, env = "LBD_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Attach only to these interfaces (repeatable). By default every
    /// interface but loopback, following interfaces as they come and go.
    #[arg(long = "iface", env = "LBD_IFACE", value_delimiter = ',')]
    pub interfaces: Vec<String>,
    /// Also attach the XDP fast path, in native mode, to these interfaces
    /// (repeatable): established connections' packets are translated there
    /// before the kernel builds an skb. Only for interfaces whose received
    /// frames carry complete checksums (NICs); a veth fed by a local stack
    /// with checksum offload does not qualify. See docs/datapath.md.
    #[arg(long = "xdp", env = "LBD_XDP", value_delimiter = ',')]
    pub xdp: Vec<String>,
    /// Send packets for a local container through its veth the slow way
    /// (transmitted on the host-side veth) instead of straight into the
    /// container's namespace (`bpf_redirect_peer`). The direct way skips
    /// the host-side veth's egress: use this flag if a qdisc or TC egress
    /// program there must see the traffic (bandwidth shaping, accounting).
    #[arg(long, env = "LBD_NO_REDIRECT_PEER")]
    pub no_redirect_peer: bool,
    /// Serve Prometheus metrics at /metrics and a stats page at / on this
    /// loopback address (other addresses are refused).
    #[arg(long, env = "LBD_METRICS")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Do not add frontend addresses to lo. Then a service without a usable
    /// backend drops its packets instead of the kernel answering with a TCP
    /// reset or an ICMP port unreachable.
    #[arg(long, env = "LBD_NO_LOCAL_VIPS")]
    pub no_local_vips: bool,
    /// On exit, leave the datapath attached and its maps pinned. This is
    /// the default; the flag is still accepted.
    #[arg(long, conflicts_with = "teardown_on_exit")]
    pub keep_datapath: bool,
    /// On SIGTERM or SIGINT, detach the datapath and remove its pins, the
    /// frontend addresses and the drains, as --cleanup does, instead of
    /// leaving the datapath running for the next lbd. Drops every
    /// connection through this node.
    #[arg(long, env = "LBD_TEARDOWN_ON_EXIT")]
    pub teardown_on_exit: bool,
    /// Remove what lbd pinned under --pin-dir (detaching the datapath), the
    /// frontend addresses it added and its record of drains, and exit.
    #[arg(long)]
    pub cleanup: bool,
    /// Check this configuration file and exit: 0 if it is valid, 1 with
    /// the file, line and reason of the first error if not (like `nginx -t`).
    #[arg(long, value_name = "FILE")]
    pub check_config: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace. RUST_LOG, when set,
    /// takes precedence and can set levels per module.
    #[arg(long, env = "LBD_LOG_LEVEL", default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub log_level: String,
    /// Fail this background task once, a second after it starts, to check
    /// that it is restarted (for tests).
    #[arg(long, hide = true, value_name = "TASK")]
    pub inject_fault: Option<String>,
    #[arg(long, env = "LBD_MAX_SERVICES", default_value_t = lb_common::DEFAULT_MAX_SERVICES)]
    pub max_services: u32,
    #[arg(long, env = "LBD_MAX_BACKENDS", default_value_t = lb_common::DEFAULT_MAX_BACKENDS)]
    pub max_backends: u32,
    /// Report the datapath's rare events (failed rewrites, SNAT port
    /// exhaustion, failed conntrack inserts, packets dropped as too big) in
    /// lbd's log, at this level and above: off, error, warn, info or debug.
    #[arg(
        long,
        env = "LBD_DATAPATH_LOG",
        value_name = "LEVEL",
        default_value = "off",
        value_parser = ["off", "error", "warn", "info", "debug"]
    )]
    pub datapath_log: String,
    /// Connection-tracking capacity, in flows.
    #[arg(long, env = "LBD_MAX_FLOWS", default_value_t = lb_common::DEFAULT_MAX_FLOWS)]
    pub max_flows: u32,
}
