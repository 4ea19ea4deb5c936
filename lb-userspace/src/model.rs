//! The desired state: what sources produce and the reconciler applies.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => lb_common::PROTO_TCP,
            Proto::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A virtual address: where clients connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.addr, self.port),
            self.proto
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BackendSpec {
    pub addr: IpAddr,
    pub port: u16,
    /// Relative share of new flows; 0 means draining (no new flows).
    pub weight: u32,
}

impl BackendSpec {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.addr, self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub frontend: Frontend,
    pub backends: Vec<BackendSpec>,
    /// Full NAT: the source address towards backends. Backends then reply
    /// to this node whatever their route to the client (which they no
    /// longer see).
    #[serde(default)]
    pub snat: Option<IpAddr>,
    /// Session affinity: a client's new flows keep going to the backend of
    /// its previous flow if that began less than this many seconds ago
    /// (and the backend can take flows). 0: off.
    #[serde(default)]
    pub affinity_secs: u32,
    /// The size of the service's Maglev table (a prime, see
    /// `config::table_size`); None: the global size.
    #[serde(default)]
    pub table_size: Option<u32>,
    /// Active health checking of the backends, if configured.
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// Where this service came from, e.g. "config:/etc/lbd.toml".
    pub source: String,
    /// A virtual address of one network (a Swarm service VIP, the network
    /// named by its VXLAN id): balanced when a socket connects or sends,
    /// for the members of that network only (`DesiredState::members`).
    /// The frontend's port is then 0, every port of the address, and a
    /// backend's port 0 keeps the port the client asked for.
    #[serde(default)]
    pub network: Option<u32>,
    /// The frontend address is one of the node's own (a port Swarm
    /// publishes): a packet that finds no backend goes on to the kernel,
    /// which refuses it as it would at a closed port, instead of being
    /// dropped.
    #[serde(default)]
    pub local_frontend: bool,
}

/// A network namespace (by its cookie) attached to a network: its sockets
/// may use that network's virtual addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Member {
    pub netns_cookie: u64,
    pub network: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    pub services: Vec<ServiceSpec>,
    #[serde(default)]
    pub members: std::collections::BTreeSet<Member>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum CheckKind {
    /// A TCP connection that opens counts as healthy.
    Tcp,
    /// An HTTP GET whose status falls in the range counts as healthy.
    Http {
        path: String,
        status_min: u16,
        status_max: u16,
    },
}

/// What happens to a failed backend's established flows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDown {
    /// They continue (like a drain): the default.
    #[default]
    Keep,
    /// They are moved off it at their next packet, which for TCP means the
    /// client sees a reset from the backend it lands on.
    Reset,
}

/// Active checks, with HAProxy's defaults: every 2 s, down after 3
/// failures, up again after 2 successes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
    pub on_down: OnDown,
}

impl HealthCheck {
    pub fn tcp() -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Tcp,
            interval_ms: 2000,
            timeout_ms: 1000,
            rise: 2,
            fall: 3,
            on_down: OnDown::Keep,
        }
    }
}

/// Connection tracking settings of the node (the config file's
/// `[conntrack]` section). Timeouts in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackSettings {
    /// TCP connections whose handshake has not completed.
    pub syn_timeout_secs: u64,
    /// Established TCP connections without a packet.
    pub tcp_timeout_secs: u64,
    /// TCP connections after a FIN or a reset.
    pub closing_timeout_secs: u64,
    pub udp_timeout_secs: u64,
    /// Full NAT source ports, inclusive; None: the largest range outside
    /// the node's `ip_local_port_range`.
    pub snat_ports: Option<(u16, u16)>,
}

impl Default for ConntrackSettings {
    fn default() -> Self {
        ConntrackSettings {
            syn_timeout_secs: lb_common::DEFAULT_TIMEOUT_SYN_SECS,
            tcp_timeout_secs: lb_common::DEFAULT_TIMEOUT_TCP_SECS,
            closing_timeout_secs: lb_common::DEFAULT_TIMEOUT_CLOSING_SECS,
            udp_timeout_secs: lb_common::DEFAULT_TIMEOUT_UDP_SECS,
            snat_ports: None,
        }
    }
}
