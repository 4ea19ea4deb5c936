//! The standard end-to-end topology: one client, one load balancer, N backends,
//! each in its own namespace and each wired to the LB by a veth pair.
//!
//! ```text
//!  client ns               lb ns                      backend ns bI
//!  eth0 10.71.0.2 ---- lbc0 10.71.0.1
//!       fd00:71::2          fd00:71::1
//!                          lbbI 10.72.I.1 ---------- eth0 10.72.I.2
//!                               fd00:72:I::1              fd00:72:I::2
//! ```
//!
//! Client and backends route everything via the LB, which forwards like a
//! plain router until a test attaches the load balancer to it.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::echo::tcp_request;
use crate::netns::{cleanup_stale, unique_name, Netns};
use crate::process::{wait_until, ChildGuard};

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 71, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x71, 0, 0, 0, 0, 0, 2);
pub const LB_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 71, 0, 1);
pub const LB_CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x71, 0, 0, 0, 0, 0, 1);
/// The LB's interface towards the client.
pub const LB_CLIENT_IF: &str = "lbc0";
/// Every interface of the load-balancer node: the client's and the three
/// backends' (`lbb<n>`, made by `Topology::new`), where lbd attaches.
pub const LB_IFACES: [&str; 4] = [LB_CLIENT_IF, "lbb1", "lbb2", "lbb3"];

const INITIAL_BACKENDS: usize = 3;
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Topology {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Backend>,
    tag: String,
}

pub struct Backend {
    pub ns: Netns,
    /// `b1`, `b2`, ...: also the name its echo server answers with.
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// The LB's interface towards this backend (`lbb1`, ...).
    pub lb_if: String,
    /// The LB's addresses on that link, the backend's default gateways.
    pub lb_v4: Ipv4Addr,
    pub lb_v6: Ipv6Addr,
    server: Option<ChildGuard>,
}

impl Topology {
    /// Builds client, LB and three backends. Namespace names are derived
    /// from `tag`, so concurrent tests in one process need distinct tags.
    pub fn new(tag: &str) -> Result<Self> {
        cleanup_stale();
        let client = new_ns(&format!("{tag}-c"))?;
        let lb = new_ns(&format!("{tag}-lb"))?;
        lb.sysctl("net.ipv4.ip_forward", "1")?;
        lb.sysctl("net.ipv6.conf.all.forwarding", "1")?;

        link(&lb, LB_CLIENT_IF, &client)?;
        configure_end(&lb, LB_CLIENT_IF, LB_CLIENT_V4, LB_CLIENT_V6)?;
        configure_end(&client, "eth0", CLIENT_V4, CLIENT_V6)?;
        default_routes(&client, LB_CLIENT_V4, LB_CLIENT_V6)?;

        let mut topo = Self {
            client,
            lb,
            backends: Vec::new(),
            tag: tag.to_owned(),
        };
        for _ in 0..INITIAL_BACKENDS {
            topo.add_backend()?;
        }
        Ok(topo)
    }

    /// Adds backend `b{n}` with `n = backends.len() + 1` and returns its
    /// index in `backends` (that is, `n - 1`).
    pub fn add_backend(&mut self) -> Result<usize> {
        let idx = self.backends.len();
        let n = idx + 1;
        let Some(octet) = u8::try_from(n).ok().filter(|&o| o < 255) else {
            bail!("at most 254 backends fit the 10.72.N.0/24 addressing");
        };
        let name = format!("b{n}");
        let ns = new_ns(&format!("{}-{name}", self.tag))?;
        let lb_if = format!("lbb{n}");
        let lb_v4 = Ipv4Addr::new(10, 72, octet, 1);
        let lb_v6 = Ipv6Addr::new(0xfd00, 0x72, u16::from(octet), 0, 0, 0, 0, 1);
        let v4 = Ipv4Addr::new(10, 72, octet, 2);
        let v6 = Ipv6Addr::new(0xfd00, 0x72, u16::from(octet), 0, 0, 0, 0, 2);

        link(&self.lb, &lb_if, &ns)?;
        configure_end(&self.lb, &lb_if, lb_v4, lb_v6)?;
        configure_end(&ns, "eth0", v4, v6)?;
        default_routes(&ns, lb_v4, lb_v6)?;

        self.backends.push(Backend {
            ns,
            name,
            v4,
            v6,
            lb_if,
            lb_v4,
            lb_v6,
            server: None,
        });
        Ok(idx)
    }

    /// Starts an echo server in every backend that has none yet.
    pub fn start_servers(&mut self, echo_bin: &Path, tcp_port: u16, udp_port: u16) -> Result<()> {
        for b in &mut self.backends {
            if b.server.is_none() {
                b.start_server(echo_bin, tcp_port, udp_port)?;
            }
        }
        Ok(())
    }

    /// Starts the echo server of `backends[idx]`.
    pub fn start_server(
        &mut self,
        idx: usize,
        echo_bin: &Path,
        tcp_port: u16,
        udp_port: u16,
    ) -> Result<()> {
        let Some(b) = self.backends.get_mut(idx) else {
            bail!("no backend with index {idx}");
        };
        b.start_server(echo_bin, tcp_port, udp_port)
    }

    /// Every namespace of the topology, for checks and debugging output.
    pub fn namespace_names(&self) -> Vec<String> {
        let mut names = vec![self.client.name().to_owned(), self.lb.name().to_owned()];
        names.extend(self.backends.iter().map(|b| b.ns.name().to_owned()));
        names
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Servers go first: a live process would keep its namespace alive
        // after `ip netns del`.
        for b in &mut self.backends {
            b.stop_server();
        }
    }
}

impl Backend {
    /// Starts (or restarts) this backend's echo server on both address
    /// families, returning once it answers.
    pub fn start_server(&mut self, echo_bin: &Path, tcp_port: u16, udp_port: u16) -> Result<()> {
        self.stop_server();
        let mut cmd = self.ns.command(echo_bin);
        cmd.arg("--name")
            .arg(&self.name)
            .args(["--tcp", &format!("0.0.0.0:{tcp_port}")])
            .args(["--tcp", &format!("[::]:{tcp_port}")])
            .args(["--udp", &format!("0.0.0.0:{udp_port}")])
            .args(["--udp", &format!("[::]:{udp_port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mut child = ChildGuard::spawn(&mut cmd)?;

        let probe = SocketAddr::from((Ipv4Addr::LOCALHOST, tcp_port));
        let what = format!("echo server of {} to answer on {probe}", self.name);
        let mut exited = None;
        wait_until(SERVER_START_TIMEOUT, &what, || {
            exited = child.try_wait();
            exited.is_some()
                || self
                    .ns
                    .run(|| tcp_request(probe, Duration::from_millis(200)))
                    .is_ok_and(|(name, _)| name == self.name)
        })?;
        if let Some(status) = exited {
            bail!(
                "echo server of {} exited during startup: {status}",
                self.name
            );
        }
        self.server = Some(child);
        Ok(())
    }

    /// Stops the echo server, returning how it exited (None if none ran).
    pub fn stop_server(&mut self) -> Option<ExitStatus> {
        self.server.take().map(|mut s| s.terminate())
    }

    pub fn server_pid(&self) -> Option<u32> {
        self.server.as_ref().map(ChildGuard::pid)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop_server();
    }
}

/// A namespace whose IPv6 addresses, link-local ones included, are usable
/// the moment they are added.
///
/// `nodad` only covers the addresses added by hand. A router forwarding to a
/// neighbour it has not resolved yet solicits it from its link-local
/// address, and sends no solicitation at all while that address is still in
/// duplicate address detection (a second or more), losing the packet.
fn new_ns(tag: &str) -> Result<Netns> {
    let ns = Netns::new(&unique_name(tag))?;
    ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
    ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
    Ok(ns)
}

/// Creates a veth pair with `lb_if` in the LB namespace and `eth0` in `peer`.
fn link(lb: &Netns, lb_if: &str, peer: &Netns) -> Result<()> {
    // Created in one step so the peer never needs a temporary name that
    // could clash inside the LB namespace.
    lb.ip(&[
        "link",
        "add",
        lb_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        peer.name(),
    ])
}

/// Gives one end of a link its /24 and /64 addresses and brings it up.
fn configure_end(ns: &Netns, dev: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<()> {
    ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
    ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
    ns.ip(&["link", "set", dev, "up"])
}

fn default_routes(ns: &Netns, via4: Ipv4Addr, via6: Ipv6Addr) -> Result<()> {
    ns.ip(&["route", "add", "default", "via", &via4.to_string()])?;
    ns.ip(&["-6", "route", "add", "default", "via", &via6.to_string()])
}

/// The `lb-echo` binary of the current build profile.
pub fn echo_bin() -> PathBuf {
    target_bin("lb-echo")
}

/// A binary of this workspace, built with the profile of the running test
/// (test executables live in `target/<profile>/deps/`, binaries one level up).
///
/// Panics with instructions if it has not been built.
pub fn target_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable has a path");
    let mut dir = exe
        .parent()
        .expect("an executable lives in a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo xtask build` first (with the same profile as the tests)",
        path.display()
    );
    path
}
