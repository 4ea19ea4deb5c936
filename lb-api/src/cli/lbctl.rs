//! lbctl's command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::control::{DEFAULT_CONNECTION_LIMIT, DEFAULT_SOCKET, MAX_WEIGHT};

/// Asks a running lbd what it serves and tells it what to change.
///
/// A SERVICE is named by its name or its frontend (ip:port/proto, or
/// ip:port when one protocol uses it); a BACKEND by its address (ip:port or
/// [ipv6]:port), compared as an address.
#[derive(Parser, Debug)]
#[command(name = "lbctl", version)]
pub struct Args {
    /// lbd's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET, global = true)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Services, backends, their state and counters (only SERVICE's if
    /// given). A Swarm service is shown once, with its published ports, the
    /// node addresses that answer on them, its VIPs and its tasks; lbd
    /// serves it as several frontends, which `--all` lists too.
    Status {
        service: Option<String>,
        /// Print JSON instead of a table: `services` has every frontend,
        /// `swarm` each Swarm service once.
        #[arg(long)]
        json: bool,
        /// Also list each Swarm service's frontends as rows of their own:
        /// per published port, the ingress sandbox's and one per node
        /// address; per VIP, one per protocol.
        #[arg(long)]
        all: bool,
    },
    /// Send no new flows to BACKEND of SERVICE; its established flows
    /// continue until they end.
    Drain { service: String, backend: String },
    /// Undo `drain`.
    Undrain { service: String, backend: String },
    /// Set BACKEND's weight in SERVICE (its share of new flows; 0 takes
    /// none). It wins over the weight from the config file or labels until
    /// `--clear` or until the backend leaves the service; a drain still
    /// wins over it.
    Weight {
        service: String,
        backend: String,
        #[arg(
            required_unless_present = "clear",
            conflicts_with = "clear",
            value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_WEIGHT))
        )]
        weight: Option<u32>,
        /// Go back to the weight the source gives.
        #[arg(long)]
        clear: bool,
    },
    /// The connections the datapath tracks, or forget them.
    #[command(subcommand)]
    Conntrack(Conntrack),
    /// Make lbd read its config file now (as SIGHUP does) and say what
    /// changed; a rejected file leaves the previous state serving and makes
    /// lbctl exit with status 1.
    Reload,
    /// lbctl's, lbd's and the datapath layout's versions, and the kernel's.
    Version {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum Conntrack {
    /// Each connection once: client, frontend, backend, state, idle time and
    /// expiry.
    List {
        /// Only this service's connections.
        #[arg(long)]
        service: Option<String>,
        /// Show at most this many (the rest are counted).
        #[arg(long, default_value_t = DEFAULT_CONNECTION_LIMIT)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete connections (both halves of each) and say how many. Their
    /// next packet is balanced afresh: a connection whose backend still
    /// takes new flows usually lands on it again (Maglev picks by the
    /// connection's addresses), one whose backend is drained or gone lands
    /// elsewhere and is reset there.
    Flush {
        /// Only this service's connections.
        #[arg(long)]
        service: Option<String>,
    },
}
