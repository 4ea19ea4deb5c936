//! The control socket between lbd and lbctl: one JSON request per line, one
//! JSON response per line. The socket is mode 0600, so only root can use it.

use std::path::Path;

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::connections::ConnectionList;
use crate::status::Status;

pub const DEFAULT_SOCKET: &str = "/run/lbd.sock";

/// Largest backend weight, in the config file, in labels and with `lbctl
/// weight`. Keeps weight arithmetic far from overflow.
pub const MAX_WEIGHT: u32 = 65535;

/// Connections `lbctl conntrack list` shows unless told otherwise.
pub const DEFAULT_CONNECTION_LIMIT: usize = 1000;

/// A service is named by its name or its frontend (`ip:port/proto`, or
/// `ip:port` when only one protocol uses it); a backend by its address
/// (`ip:port`), compared as an address, not as text.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// No new flows for this backend; its established flows continue.
    Drain {
        service: String,
        backend: String,
    },
    Undrain {
        service: String,
        backend: String,
    },
    /// The versions of lbd, its datapath layout and the kernel.
    Version,
    /// Read the config file again now, as on SIGHUP.
    Reload,
    /// Overrides a backend's weight (None: back to the weight its source
    /// gives).
    Weight {
        service: String,
        backend: String,
        weight: Option<u32>,
    },
    /// The datapath's connections, at most `limit` of them.
    ConntrackList {
        service: Option<String>,
        limit: usize,
    },
    /// Forgets the datapath's connections (both halves of each).
    ConntrackFlush {
        service: Option<String>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    Done(String),
    Error(String),
    Version(VersionInfo),
    Connections(ConnectionList),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// lbd's version.
    pub version: String,
    /// The layout of the pinned maps lbd writes (lb-common's LAYOUT_VERSION).
    pub layout_version: u32,
    /// The running kernel's release (`uname -r`).
    pub kernel: String,
}

/// One request from a client (lbctl), blocking.
pub fn request(path: &Path, request: &Request) -> Result<Response> {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("connecting to lbd at {} (is lbd running?)", path.display()))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = std::io::BufReader::new(stream);
    let mut answer = String::new();
    reader.read_line(&mut answer)?;
    serde_json::from_str(&answer).context("reading lbd's answer")
}
