//! Real Docker engines for tests: a [`Dockerd`] per network namespace, the
//! test web image, Swarm helpers and a multi-node [`Cluster`].
//!
//! # How the daemons run
//!
//! Each dockerd (Debian's docker.io 20.10, API 1.41) is started with only its
//! network namespace changed (setns before exec, as `Netns::command` does)
//! plus a UTS namespace for its hostname, which Swarm uses as the node name.
//! It keeps the host's mount namespace on purpose: `ip netns exec` would give
//! it a private one (with `/` made a slave), so the namespaces it pins under
//! `<exec-root>/netns/` and its overlay mounts would not be visible to the
//! test or to lbd at those paths. Everything else is per daemon, under
//! `/tmp/lbt-docker/lbt-<pid>-<tag>/`: `--data-root data`, `--exec-root
//! exec`, `--pidfile`, `-H unix://…/docker.sock`, `--config-file` (an empty
//! one), and `--cgroup-parent /lbt-<pid>-<tag>`, which lets a later run find
//! the containers of a killed one. No `--bridge`/`--bip` is needed: every
//! daemon has its own namespace, so each has its own `docker0`
//! (172.17.0.1/16) and `docker_gwbridge` (172.18.0.1/16), as real hosts do.
//! Default iptables rules stay on. `overlay2` works (the root is ext4); `vfs`
//! is used only on an overlayfs. `DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1`
//! stops Swarm tasks from trying a registry before using the local image
//! (without it dockerd resolves registry-1.docker.io through the host's
//! resolver, which fails only because node namespaces have no default
//! route: they must never get one).
//!
//! Shared with the machine, and harmless: `/etc/docker/key.json` (the engine
//! identity; 20.10 has no flag to move it), `/run/docker/plugins` (empty) and
//! `/run/containerd/s/` (shim sockets, removed by the shims). Startup takes
//! 1-2 s, `swarm init` 0.6 s, a 3-replica service converges in 1-2 s,
//! shutdown (containers get SIGTERM, `--shutdown-timeout 5`) 2-4 s.
//!
//! # Findings on this kernel (6.18, no `CONFIG_IP_VS`)
//!
//! 1. **Single node.** `docker swarm init --advertise-addr 10.74.0.11` and
//!    `docker service create --name web --replicas 3 --publish 8080:80
//!    --no-resolve-image lbt-web` converge: 3/3 tasks `running` within ~2 s.
//!    A request from the client namespace to 10.74.0.11:8080 is *refused at
//!    once* (TCP RST, curl exit 7 "Couldn't connect ... after 0 ms"), and so
//!    is 127.0.0.1:8080 from the node: nothing listens and no rule
//!    redirects the port. The same on every node of a 2-node cluster.
//!    dockerd logs, once per daemon when the first service binding is made:
//!    ```text
//!    level=warning msg="Running modprobe ip_vs failed with message: ``, error: exec: \"modprobe\": executable file not found in $PATH"
//!    level=error msg="Could not get ipvs family information from the kernel. It is possible that ipvs is not enabled in your kernel. Native loadbalancing will not work until this is fixed."
//!    ```
//!    then, for every sandbox it sets up, `level=error msg="error reading the
//!    kernel parameter net.ipv4.vs.expire_nodest_conn" error="open
//!    /proc/sys/net/ipv4/vs/expire_nodest_conn: no such file or directory"`
//!    (also `conn_reuse_mode`, `expire_quiescent_template`). Nothing is
//!    logged about the skipped ingress programming itself; at shutdown it
//!    tries to delete what it never added: `set up rule failed, [-t mangle
//!    -D PREROUTING -p tcp --dport 8080 -j MARK --set-mark 256]` and
//!    `Failed to delete firewall mark rule in sbox ingress (ingress)`.
//!
//! 2. **ingress_sbox** exists at `<exec-root>/netns/ingress_sbox` (for this
//!    harness `/tmp/lbt-docker/lbt-<pid>-<tag>/exec/netns/ingress_sbox`,
//!    [`Dockerd::ingress_sbox`]; `/var/run/docker/netns/ingress_sbox` with
//!    the default exec-root), next to one namespace per container sandbox
//!    (12 hex digits) and `1-<network id>` for the ingress overlay itself
//!    (bridge `br0`, `vxlan0` with vxlan id 4096, dstport 4789, whose UDP
//!    socket lives in the node's namespace). Its interfaces:
//!    ```text
//!    lo      UNKNOWN 127.0.0.1/8
//!    eth0@if9  UP    10.0.0.2/24     (ingress overlay; .7 on the second node)
//!    eth1@if12 UP    172.18.0.2/16   (docker_gwbridge)
//!    default via 172.18.0.1 dev eth1
//!    ```
//!    `net.ipv4.ip_forward` is 0 inside it. Because IPVS is missing, *no*
//!    routing-mesh rule exists anywhere: the node's namespace has no
//!    `DOCKER-INGRESS` chain in nat or filter (only the usual `DOCKER`,
//!    `DOCKER-USER`, `DOCKER-ISOLATION-STAGE-1/2`, FORWARD policy DROP, and
//!    `POSTROUTING -s 172.18.0.0/16 ! -o docker_gwbridge -j MASQUERADE`,
//!    same for 172.17.0.0/16), and ingress_sbox has no mangle table and
//!    only the embedded-DNS nat rules:
//!    ```text
//!    *nat
//!    -A OUTPUT -d 127.0.0.11/32 -j DOCKER_OUTPUT
//!    -A POSTROUTING -d 127.0.0.11/32 -j DOCKER_POSTROUTING
//!    -A DOCKER_OUTPUT -d 127.0.0.11/32 -p tcp -m tcp --dport 53 -j DNAT --to-destination 127.0.0.11:46745
//!    -A DOCKER_POSTROUTING -s 127.0.0.11/32 -p tcp -m tcp --sport 46745 -j SNAT --to-source :53
//!    (same for udp)
//!    ```
//!    (With IPVS, Docker would add to the node `DOCKER-INGRESS: -p tcp
//!    --dport 8080 -j DNAT --to-destination 172.18.0.2:8080`, and to
//!    ingress_sbox `mangle PREROUTING -p tcp --dport 8080 -j MARK
//!    --set-mark 256` plus an IPVS fwmark service; 256 is the service's
//!    `LocalLBIndex` below.)
//!
//! 3. **Task containers** have two interfaces: `eth0` on the ingress overlay
//!    (10.0.0.4-6/24 for three tasks; the service VIP is 10.0.0.3) and `eth1`
//!    on docker_gwbridge (172.18.0.3-5/16, default route via 172.18.0.1).
//!    Inside each task Docker installs:
//!    ```text
//!    *filter
//!    -A INPUT -d 10.0.0.6/32 -p tcp -m tcp --dport 80 -m conntrack --ctstate NEW,ESTABLISHED -j ACCEPT
//!    -A INPUT -d 10.0.0.6/32 -p tcp -j DROP        (also udp, sctp)
//!    -A OUTPUT -s 10.0.0.6/32 -p tcp -m tcp --sport 80 -m conntrack --ctstate ESTABLISHED -j ACCEPT
//!    -A OUTPUT -s 10.0.0.6/32 -p tcp -j DROP       (also udp, sctp)
//!    *nat
//!    -A PREROUTING -d 10.0.0.6/32 -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 80
//!    ```
//!    so on the overlay address a task accepts only its target port (80),
//!    or the published port (8080), redirected to 80. From the node's own
//!    namespace (where dockerd runs) a local task answers at its docker_gwbridge address on port
//!    80 (source seen: 172.18.0.1); the overlay addresses are not routed
//!    there at all. From ingress_sbox every task answers at its overlay
//!    address on port 80, local ones and, in a 2-node cluster, remote ones
//!    over VXLAN (source seen: the sbox's own overlay address, 10.0.0.2 or
//!    10.0.0.7). A client routed into a node towards 172.18.0.x is dropped
//!    by the FORWARD chain (policy DROP; `-o docker_gwbridge -j DOCKER` and
//!    DOCKER has no accept for it).
//!
//! 4. **Task addresses through the API.** `GET /v1.41/tasks?filters=
//!    {"service":["web"],"desired-state":["running"]}` on a manager (503 on
//!    a worker: "This node is not a swarm manager...") gives, per task:
//!    ```json
//!    "ID": "1wk4jb93gt3yp4ehwk2f7nueo", "NodeID": "wd74uom8e0w119r6td5elyp3w", "Slot": 4,
//!    "Status": {"State": "running", "ContainerStatus": {"ContainerID": "fab9e8d9…", "PID": 25055}},
//!    "NetworksAttachments": [{
//!      "Network": {"ID": "e4bwwkava20j0a7nadul3gvdd",
//!                  "Spec": {"Name": "ingress", "Ingress": true, "Scope": "swarm", …},
//!                  "DriverState": {"Name": "overlay",
//!                                  "Options": {"com.docker.network.driver.overlay.vxlanid_list": "4096"}},
//!                  "IPAMOptions": {"Configs": [{"Subnet": "10.0.0.0/24", "Gateway": "10.0.0.1"}]}},
//!      "Addresses": ["10.0.0.8/24"]}]
//!    ```
//!    `GET /v1.41/networks/ingress?verbose=true` answers on manager *and*
//!    worker with `Peers` (one per node: `{"Name": "e0b5b47c11b7", "IP":
//!    "10.74.0.11"}`) and `Services`:
//!    ```json
//!    "web": {"VIP": "10.0.0.3", "Ports": ["Target: 80, Publish: 8080"], "LocalLBIndex": 256,
//!            "Tasks": [{"Name": "web.4.1wk4jb93gt3yp4ehwk2f7nueo", "EndpointIP": "10.0.0.8",
//!                       "Info": {"Host IP": "10.74.0.12"}}, …]},
//!    "": {"VIP": "<nil>", "Tasks": [{"Name": "ingress-endpoint", "EndpointIP": "10.0.0.2",
//!                                    "Info": {"Host IP": "10.74.0.11"}}, …]}
//!    ```
//!    On a worker it lists every task of the service, remote ones included,
//!    with the node address each runs on; `Containers` there holds only the
//!    local ones. It is gossip: right after the service converges a worker
//!    may still list only its local task, and catches up within seconds.
//!
//! 5. **Standalone containers** on the default bridge answer from the node's
//!    namespace at their 172.17.0.x address (source seen: 172.17.0.1). From
//!    another namespace routed through the node (client -> node eth0 ->
//!    docker0), an unpublished container times out: FORWARD policy DROP,
//!    `-o docker0 -j DOCKER`, and DOCKER only accepts published ports
//!    (`-A DOCKER -d 172.17.0.3/32 ! -i docker0 -o docker0 -p tcp --dport 80
//!    -j ACCEPT` for `-p 8081:80`). A published container answers both at
//!    node:8081 (`DOCKER ! -i docker0 -p tcp --dport 8081 -j DNAT
//!    --to-destination 172.17.0.3:80`) and directly at 172.17.0.3:80, with
//!    the client's own address as the source.
//!
//! 6. **Other things seen.** cgroup v1 (hybrid) with the cgroupfs driver
//!    works as is. dockerd logs `enabling default vlan on bridge br0 failed
//!    open /sys/class/net/br0/bridge/default_pvid: permission denied` for
//!    each overlay, because /sys belongs to the root namespace; it is
//!    harmless (VXLAN between node namespaces works). modprobe is missing,
//!    so its attempts (ip_vs, aufs) fail, also harmless. A task's PID 1
//!    must handle SIGTERM or every stop waits for the kill timeout (the
//!    image's `start.sh` traps it). Images differ per node (each has its own
//!    store), so services need `--no-resolve-image`. A killed test run
//!    leaves dockerd, containerd, shims, containers, overlay and nsfs mounts
//!    and cgroups behind; [`cleanup_stale`] removes them.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::echo::parse_reply;
use crate::netns::{self, owner_pid, pid_alive, unique_name, Netns};
use crate::process::{wait_until, ChildGuard};

/// Every daemon's files live in `ROOT_DIR/lbt-<pid>-<tag>`: short enough for
/// the unix sockets dockerd and containerd create below it (108 bytes at
/// most), and named like the namespaces so leftovers of a dead run can be
/// told from those of a live one.
const ROOT_DIR: &str = "/tmp/lbt-docker";
/// The Debian engine (20.10) speaks 1.41; pinning it keeps raw API answers
/// in the shape the tests were written against.
pub const API_VERSION: &str = "v1.41";
/// Passed as `--shutdown-timeout`: how long dockerd waits for a container
/// to stop on SIGTERM before it kills it.
const SHUTDOWN_TIMEOUT_SECS: u64 = 5;
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Containerd and the shims exit shortly after dockerd does.
const LEFTOVER_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_TAG_LEN: usize = 20;
const MAX_RESPONSE: u64 = 16 << 20;
const POLL: Duration = Duration::from_millis(100);

/// The web image's build context (Dockerfile and scripts); the harness adds
/// the static busybox to a copy of it.
const IMAGE_CONTEXT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docker/web");
/// Debian's busybox-static installs it here; the dynamic `busybox` package
/// uses the same path, which is why the build checks the result.
const BUSYBOX: &str = "/bin/busybox";

/// The underlay of a [`Cluster`]: node `i` (from 1) is `10.74.0.(10 + i)`.
pub const UNDERLAY_PREFIX_LEN: u8 = 24;
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 74, 0, 2);
const SWARM_PORT: u16 = 2377;
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(60);

/// The docker CLI of the engine's own package: another one found first on
/// PATH (a newer static client, say) would default to building through the
/// buildx plugin, which is not installed.
fn docker_cli() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

/// A dockerd running inside a network namespace of the test, with every
/// root, socket and cgroup of its own so that several can run side by side
/// and none touches a system Docker.
pub struct Dockerd {
    /// `lbt-<pid>-<tag>`: the directory's name and the cgroup parent.
    name: String,
    hostname: String,
    dir: PathBuf,
    socket: PathBuf,
    netns: PathBuf,
    child: Option<ChildGuard>,
    term_sent: bool,
}

impl Dockerd {
    /// Starts dockerd in `ns` and waits until the engine answers. `tag`
    /// (lowercase letters, digits and `-`) names the daemon's directory and
    /// becomes its hostname, which Swarm shows as the node name.
    pub fn start(ns: &Netns, tag: &str) -> Result<Self> {
        let mut d = Self::spawn(ns, tag)?;
        d.wait_ready()?;
        Ok(d)
    }

    /// [`Self::start`] with `daemon_json` as the engine's configuration
    /// file instead of an empty one (`{"live-restore": true}`, say).
    pub fn start_with_config(ns: &Netns, tag: &str, daemon_json: &str) -> Result<Self> {
        let mut d = Self::spawn_with_config(ns, tag, daemon_json)?;
        d.wait_ready()?;
        Ok(d)
    }

    /// Starts the process without waiting for it, so that a cluster's
    /// daemons can initialise in parallel.
    fn spawn(ns: &Netns, tag: &str) -> Result<Self> {
        // An explicit, empty configuration keeps /etc/docker/daemon.json
        // (a system Docker's) out of the picture.
        Self::spawn_with_config(ns, tag, "{}\n")
    }

    fn spawn_with_config(ns: &Netns, tag: &str, daemon_json: &str) -> Result<Self> {
        ensure!(
            !tag.is_empty()
                && tag.len() <= MAX_TAG_LEN
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "dockerd tag {tag:?}: want 1 to {MAX_TAG_LEN} of [a-z0-9-]"
        );
        let name = unique_name(tag);
        let dir = Path::new(ROOT_DIR).join(&name);
        ensure!(
            !dir.exists(),
            "{} exists: a dockerd with tag {tag:?} is already running in this process",
            dir.display()
        );
        std::fs::create_dir_all(dir.join("cli"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let mut d = Self {
            name,
            hostname: tag.to_owned(),
            socket: dir.join("docker.sock"),
            dir,
            netns: ns.path(),
            child: None,
            term_sent: false,
        };
        std::fs::write(d.dir.join("daemon.json"), daemon_json)?;
        d.launch()?;
        Ok(d)
    }

    fn launch(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = netns_command(&self.netns, "dockerd");
        let hostname = CString::new(self.hostname.as_bytes())?;
        // SAFETY: unshare and sethostname are plain syscalls on memory
        // allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // Each daemon is a Swarm node and Swarm names nodes by
                // hostname; a UTS namespace gives each its own name without
                // touching the machine's.
                if libc::unshare(libc::CLONE_NEWUTS) != 0
                    || libc::sethostname(hostname.as_ptr(), hostname.as_bytes().len()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let dir = &self.dir;
        cmd.arg("--config-file")
            .arg(dir.join("daemon.json"))
            .arg("--data-root")
            .arg(self.data_root())
            .arg("--exec-root")
            .arg(self.exec_root())
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--storage-driver")
            .arg(storage_driver(dir))
            // Containers go to a cgroup named like the directory, so that
            // a killed run's containers can be found and removed later.
            .arg("--cgroup-parent")
            .arg(format!("/{}", self.name))
            .arg("--shutdown-timeout")
            .arg(SHUTDOWN_TIMEOUT_SECS.to_string())
            // Without it a Swarm task first tries to pull its image from a
            // registry, which is neither reachable nor wanted here.
            .env("DOCKER_SERVICE_PREFER_OFFLINE_IMAGE", "1")
            .env("PATH", sbin_path())
            .env_remove("DOCKER_HOST")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(ChildGuard::spawn(&mut cmd)?);
        self.term_sent = false;
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait() {
                    bail!(
                        "dockerd {} exited during start-up ({status})\n{}",
                        self.hostname,
                        self.log_tail(40)
                    );
                }
            }
            if matches!(self.api_get("/_ping"), Ok((200, _))) {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "dockerd {} did not answer within {START_TIMEOUT:?}\n{}",
                    self.hostname,
                    self.log_tail(40)
                );
            }
            sleep(POLL);
        }
        self.docker(&["version", "--format", "{{.Server.Version}}"])
            .map(drop)
    }

    /// The engine's API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The hostname the daemon runs with (its Swarm node name).
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The directory holding every file of this daemon.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cgroup (in every hierarchy) under which its containers run.
    pub fn cgroup_parent(&self) -> &str {
        &self.name
    }

    pub fn data_root(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn exec_root(&self) -> PathBuf {
        self.dir.join("exec")
    }

    /// Where libnetwork pins the namespaces it creates: one per container
    /// (named by sandbox id), one per overlay network (`1-<network id>`),
    /// and `ingress_sbox` once the node is in a Swarm.
    pub fn netns_dir(&self) -> PathBuf {
        self.exec_root().join("netns")
    }

    /// The namespace of Swarm's routing mesh on this node.
    pub fn ingress_sbox(&self) -> PathBuf {
        self.netns_dir().join("ingress_sbox")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("dockerd.log")
    }

    /// Everything dockerd logged, restarts included.
    pub fn log(&self) -> String {
        // Lossy: a container's output can put anything in the log.
        std::fs::read(self.log_path())
            .map(|raw| String::from_utf8_lossy(&raw).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of the log, without gRPC's connection chatter.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains("module=grpc")).collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The pid of the running dockerd.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::pid)
    }

    /// Runs the docker CLI against this daemon and returns its stdout.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        self.docker_timeout(args, CLI_TIMEOUT)
    }

    /// [`Self::docker`] with a bound other than the default 60 s.
    /// Stretched by the time scale, like every wait of the tests.
    pub fn docker_timeout(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let timeout = timeout * crate::process::time_scale();
        let what = format!("docker {}", args.join(" "));
        let out = Command::new("timeout")
            .args(["-k", "5", &timeout.as_secs().max(1).to_string()])
            .arg(docker_cli())
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            // Keeps the CLI away from ~/.docker and from whatever context
            // or daemon the environment points at.
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env("DOCKER_BUILDKIT", "0")
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("spawning `{what}`"))?;
        if out.status.code() == Some(124) {
            bail!("`{what}` timed out after {timeout:?}");
        }
        if !out.status.success() {
            bail!(
                "`{what}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `GET /v1.41<path>` on the engine's socket: the status and the body.
    pub fn api_get(&self, path: &str) -> Result<(u16, String)> {
        let mut stream = UnixStream::connect(&self.socket)
            .with_context(|| format!("connecting to {}", self.socket.display()))?;
        stream.set_read_timeout(Some(API_TIMEOUT))?;
        stream.set_write_timeout(Some(API_TIMEOUT))?;
        // HTTP/1.0 makes the engine close the connection after the answer
        // and send the body unchunked, so reading to the end is parsing.
        write!(
            stream,
            "GET /{API_VERSION}{path} HTTP/1.0\r\nHost: docker\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .with_context(|| format!("reading the answer to GET {path}"))?;
        parse_http(&raw).with_context(|| format!("GET {path}"))
    }

    /// [`Self::api_get`] for a JSON answer that must be 200.
    pub fn api_json(&self, path: &str) -> Result<Value> {
        let (status, body) = self.api_get(path)?;
        ensure!(status == 200, "GET {path}: {status} {}", body.trim());
        serde_json::from_str(&body).with_context(|| format!("GET {path}: parsing JSON"))
    }

    /// When the engine reported `event` (`die`, `start`, ...) for
    /// `container` since `since`, from its own event log: the clock lbd
    /// measures convergence from.
    pub fn event_time(&self, container: &str, event: &str, since: SystemTime) -> SystemTime {
        let out = self
            .docker(&[
                "events",
                "--since",
                &unix_time(since),
                "--until",
                &unix_time(SystemTime::now()),
                "--filter",
                &format!("container={container}"),
                "--filter",
                &format!("event={event}"),
                "--format",
                "{{.TimeNano}}",
            ])
            .expect("docker events");
        let nanos: u64 = out
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {event} event for {container}: {out:?}"));
        UNIX_EPOCH + Duration::from_nanos(nanos)
    }

    /// Sends SIGTERM without waiting, so several daemons can shut down at
    /// the same time; [`Self::stop`] then waits.
    fn signal_stop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if !self.term_sent && child.try_wait().is_none() {
                let _ = kill(Pid::from_raw(child.pid() as i32), Signal::SIGTERM);
                self.term_sent = true;
            }
        }
    }

    /// Stops dockerd the way an init system would (SIGTERM, then wait), which
    /// also stops its containers, containerd and the shims. Fails if it has
    /// to be killed or if any of them outlives it.
    pub fn stop(&mut self) -> Result<()> {
        if self.child.is_none() {
            return Ok(());
        }
        self.signal_stop();
        let mut child = self.child.take().expect("checked above");
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut graceful = false;
        while Instant::now() < deadline {
            if child.try_wait().is_some() {
                graceful = true;
                break;
            }
            sleep(POLL);
        }
        if !graceful {
            child.terminate();
        }
        let leftovers = wait_leftovers(&self.dir, &self.name, LEFTOVER_TIMEOUT);
        if !leftovers.is_empty() {
            kill_all(&leftovers);
        }
        ensure!(
            graceful,
            "dockerd {} ignored SIGTERM for {STOP_TIMEOUT:?} and was killed\n{}",
            self.hostname,
            self.log_tail(40)
        );
        ensure!(
            leftovers.is_empty(),
            "processes of dockerd {} outlived it and were killed: {}",
            self.hostname,
            describe(&leftovers)
        );
        Ok(())
    }

    /// Stops dockerd and starts it again with the same roots, as a package
    /// upgrade or `systemctl restart docker` would.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.launch()?;
        self.wait_ready()
    }

    /// Stops dockerd alone (SIGTERM, then wait) and starts it again. With
    /// `"live-restore": true` its containers keep running meanwhile, which
    /// [`Self::stop`] would count as processes outliving the daemon.
    pub fn restart_live(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.pid() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while child.try_wait().is_none() {
                if Instant::now() >= deadline {
                    child.terminate();
                    bail!(
                        "dockerd {} ignored SIGTERM for {STOP_TIMEOUT:?} and was killed\n{}",
                        self.hostname,
                        self.log_tail(40)
                    );
                }
                sleep(POLL);
            }
        }
        self.launch()?;
        self.wait_ready()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- dockerd {} ({}), last lines of its log:\n{}\n---",
                self.hostname,
                self.dir.display(),
                self.log_tail(40)
            );
        }
        if let Err(e) = self.stop() {
            eprintln!("{e:#}");
        }
        purge(&self.dir, &self.name);
    }
}

/// `SECONDS.NANOSECONDS` since the epoch, as `docker events` takes it.
fn unix_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).expect("after 1970");
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

/// overlay2 cannot stack on an overlayfs (a machine whose / is a container's
/// root, say); vfs works anywhere, only slower.
fn storage_driver(dir: &Path) -> &'static str {
    use nix::sys::statfs::{statfs, OVERLAYFS_SUPER_MAGIC};
    match statfs(dir) {
        Ok(fs) if fs.filesystem_type() == OVERLAYFS_SUPER_MAGIC => "vfs",
        _ => "overlay2",
    }
}

/// dockerd runs iptables, and the shims runc, by name.
fn sbin_path() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut dirs: Vec<&str> = path.split(':').filter(|d| !d.is_empty()).collect();
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs.join(":")
}

/// Commands and threads inside one of dockerd's namespaces, known by path.
pub use crate::netns::{command_in as netns_command, run_in as in_netns};

fn parse_http(raw: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of headers in the answer")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {:?}", head.lines().next()))?;
    Ok((status, body.to_owned()))
}

/// `GET /` on the test image's web server: the container's hostname and the
/// client address it saw.
pub fn http_whoami(target: SocketAddr, timeout: Duration) -> Result<(String, SocketAddr)> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("http connect to {target}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: lb-test\r\n\r\n")?;
    let mut raw = Vec::new();
    stream
        .take(64 << 10)
        .read_to_end(&mut raw)
        .with_context(|| format!("http read from {target}"))?;
    let (status, body) = parse_http(&raw).with_context(|| format!("http answer from {target}"))?;
    ensure!(status == 200, "http {target}: status {status}: {body:?}");
    parse_reply(body.trim())
}

/// Polls [`http_whoami`] (each call bounded by `timeout`) until `target`
/// answers, for at most `ready`: a fresh container's server needs a moment
/// after `running` to listen. Panics with the last error when it does not.
pub fn whoami_when_ready(
    target: SocketAddr,
    ready: Duration,
    timeout: Duration,
) -> (String, SocketAddr) {
    let mut answer = None;
    let done = wait_until(ready, &format!("http answer from {target}"), || {
        answer = http_whoami(target, timeout).ok();
        answer.is_some()
    });
    if let Err(e) = done {
        panic!(
            "{e:#}: last error: {:#}",
            http_whoami(target, timeout).unwrap_err()
        );
    }
    answer.expect("set when ready")
}

/// Requests `target` (the test image's whoami) from `client` until every
/// name in `want` has answered, and only those, at most `max` requests
/// paced to span a few seconds: a container that just started may not
/// listen yet, and a worker learns of a task only through Swarm's gossip,
/// which its lbd reads once a second. Panics with what answered otherwise.
pub fn until_all_answer(
    client: &Netns,
    target: SocketAddr,
    want: &BTreeSet<String>,
    max: usize,
    timeout: Duration,
) -> BTreeMap<String, usize> {
    client.run(|| {
        let mut seen = BTreeMap::new();
        let mut errors = Vec::new();
        for _ in 0..max {
            match http_whoami(target, timeout) {
                Ok((name, _)) => *seen.entry(name).or_insert(0) += 1,
                Err(e) => {
                    errors.push(format!("{e:#}"));
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            if seen.keys().cloned().collect::<BTreeSet<_>>() == *want {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let names: BTreeSet<String> = seen.keys().cloned().collect();
        assert_eq!(
            &names,
            want,
            "answers from {target} after up to {max} requests: {seen:?}; {} errors, last: {:?}",
            errors.len(),
            errors.last()
        );
        seen
    })
}

/// Builds the test web image as `tag` on `d`: `FROM scratch` plus busybox,
/// serving `HOSTNAME ADDR:PORT` over HTTP on port 80 (the client address as
/// the container saw it) and the bare hostname on TCP port 7 for any line;
/// lb-echo on UDP 5353 and TCP 9000, lb-http on 8000 (see its Dockerfile).
pub fn build_test_image(d: &Dockerd, tag: &str) -> Result<()> {
    let ctx = d
        .dir()
        .join(format!("build-{}", tag.replace([':', '/'], "_")));
    if ctx.exists() {
        std::fs::remove_dir_all(&ctx)?;
    }
    std::fs::create_dir_all(ctx.join("cgi-bin"))?;
    let src = Path::new(IMAGE_CONTEXT);
    for (file, mode) in [
        ("Dockerfile", 0o644),
        ("start.sh", 0o755),
        ("whoami.sh", 0o755),
        ("cgi-bin/index.cgi", 0o755),
    ] {
        let to = ctx.join(file);
        std::fs::copy(src.join(file), &to)
            .with_context(|| format!("copying {}", src.join(file).display()))?;
        // Git may not have kept the executable bit, and httpd only runs
        // executable CGI scripts.
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
    }
    std::fs::copy(BUSYBOX, ctx.join("busybox"))
        .with_context(|| format!("copying {BUSYBOX} (package busybox-static)"))?;
    copy_with_libraries(&crate::topology::echo_bin(), &ctx.join("root"))?;
    copy_with_libraries(&crate::topology::target_bin("lb-http"), &ctx.join("root"))?;
    let ctx_str = ctx.to_string_lossy().into_owned();
    d.docker_timeout(
        &["build", "-q", "-t", tag, &ctx_str],
        Duration::from_secs(120),
    )
    .with_context(|| {
        format!("building {tag} (is {BUSYBOX} the static one from busybox-static?)")
    })?;
    std::fs::remove_dir_all(&ctx)?;
    Ok(())
}

/// Copies `binary` into `root/bin/` and the shared libraries it loads
/// (as `ldd` lists them) to their own paths under `root`, so that it runs
/// in an image without a libc of its own.
fn copy_with_libraries(binary: &Path, root: &Path) -> Result<()> {
    let out = std::process::Command::new("ldd").arg(binary).output()?;
    ensure!(out.status.success(), "ldd {}", binary.display());
    let libraries: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    let name = binary.file_name().context("a binary's name")?;
    for (from, to) in libraries
        .iter()
        .map(|lib| (lib.clone(), root.join(lib.strip_prefix("/").unwrap_or(lib))))
        .chain([(binary.to_path_buf(), root.join("bin").join(name))])
    {
        std::fs::create_dir_all(to.parent().context("a directory")?)?;
        std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
    }
    Ok(())
}

/// The address of container `name` on network `network` (`bridge` for the
/// default one).
pub fn container_ip(d: &Dockerd, name: &str, network: &str) -> Result<Ipv4Addr> {
    let format = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    let out = d.docker(&["inspect", "--format", &format, name])?;
    out.trim()
        .parse()
        .with_context(|| format!("container {name} has no address on {network}: {out:?}"))
}

/// Container id -> address on `docker_gwbridge`, where a node reaches its
/// own Swarm tasks (and `ingress-sbox`) from its root namespace.
pub fn gwbridge_addresses(d: &Dockerd) -> Result<BTreeMap<String, Ipv4Addr>> {
    let net = d.api_json("/networks/docker_gwbridge")?;
    let mut out = BTreeMap::new();
    if let Some(containers) = net["Containers"].as_object() {
        for (id, c) in containers {
            let cidr = c["IPv4Address"].as_str().unwrap_or_default();
            let addr = cidr.split('/').next().unwrap_or_default();
            if let Ok(addr) = addr.parse() {
                out.insert(id.clone(), addr);
            }
        }
    }
    Ok(out)
}

/// `docker swarm init` with the given address as the node's.
pub fn swarm_init(d: &Dockerd, advertise_addr: Ipv4Addr) -> Result<()> {
    let addr = advertise_addr.to_string();
    d.docker(&["swarm", "init", "--advertise-addr", &addr])
        .map(drop)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwarmRole {
    Worker,
    Manager,
}

/// The token a node needs to join `manager`'s Swarm in `role`.
pub fn join_token(manager: &Dockerd, role: SwarmRole) -> Result<String> {
    let role = match role {
        SwarmRole::Worker => "worker",
        SwarmRole::Manager => "manager",
    };
    let token = manager.docker(&["swarm", "join-token", "-q", role])?;
    Ok(token.trim().to_owned())
}

/// `docker swarm join`; the node advertises the address it reaches the
/// manager from.
pub fn swarm_join(d: &Dockerd, manager_addr: Ipv4Addr, token: &str) -> Result<()> {
    let manager = SocketAddr::from((manager_addr, SWARM_PORT)).to_string();
    d.docker(&["swarm", "join", "--token", token, &manager])
        .map(drop)
}

/// A Swarm task, as `GET /tasks` on a manager describes it.
#[derive(Debug, Clone)]
pub struct Task {
    pub id: String,
    pub service_id: String,
    pub node_id: String,
    pub slot: u64,
    /// `running`, `starting`, `failed`, ...
    pub state: String,
    pub container_id: Option<String>,
    /// The task's addresses on overlay networks (the `ingress` network for
    /// a published port), from `NetworksAttachments`.
    pub addresses: Vec<TaskAddress>,
}

#[derive(Debug, Clone)]
pub struct TaskAddress {
    pub network: String,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl Task {
    /// The task's address on `network` (say `ingress`).
    pub fn addr_on(&self, network: &str) -> Option<IpAddr> {
        self.addresses
            .iter()
            .find(|a| a.network == network)
            .map(|a| a.addr)
    }

    fn from_json(t: &Value) -> Result<Self> {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let mut addresses = Vec::new();
        for att in t["NetworksAttachments"].as_array().into_iter().flatten() {
            let network = text(&att["Network"]["Spec"]["Name"]);
            for cidr in att["Addresses"].as_array().into_iter().flatten() {
                let cidr = cidr.as_str().unwrap_or_default();
                let (addr, len) = cidr
                    .split_once('/')
                    .with_context(|| format!("task address {cidr:?}"))?;
                addresses.push(TaskAddress {
                    network: network.clone(),
                    addr: addr
                        .parse()
                        .with_context(|| format!("task address {cidr:?}"))?,
                    prefix_len: len
                        .parse()
                        .with_context(|| format!("task address {cidr:?}"))?,
                });
            }
        }
        let container = &t["Status"]["ContainerStatus"]["ContainerID"];
        Ok(Self {
            id: text(&t["ID"]),
            service_id: text(&t["ServiceID"]),
            node_id: text(&t["NodeID"]),
            slot: t["Slot"].as_u64().unwrap_or(0),
            state: text(&t["Status"]["State"]),
            container_id: container
                .as_str()
                .filter(|s| !s.is_empty())
                .map(String::from),
            addresses,
        })
    }
}

/// Percent-encodes a query value (a JSON filter) for the engine's API.
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The tasks of `service` that Swarm wants running, whatever their current
/// state. Managers only: a worker answers 503.
pub fn service_tasks(manager: &Dockerd, service: &str) -> Result<Vec<Task>> {
    let filter = serde_json::json!({ "service": [service], "desired-state": ["running"] });
    let tasks = manager.api_json(&format!(
        "/tasks?filters={}",
        query_escape(&filter.to_string())
    ))?;
    tasks
        .as_array()
        .context("GET /tasks: not a list")?
        .iter()
        .map(Task::from_json)
        .collect()
}

/// Waits until `service` has exactly `replicas` tasks, all running, and
/// returns them.
pub fn wait_service_running(
    manager: &Dockerd,
    service: &str,
    replicas: usize,
    timeout: Duration,
) -> Result<Vec<Task>> {
    let mut last = Vec::new();
    let ready = wait_until(
        timeout,
        &format!("{replicas} running tasks of {service}"),
        || match service_tasks(manager, service) {
            Ok(tasks) => {
                let done = tasks.len() == replicas && tasks.iter().all(|t| t.state == "running");
                last = tasks;
                done
            }
            Err(_) => false,
        },
    );
    if let Err(e) = ready {
        let states: Vec<String> = last
            .iter()
            .map(|t| format!("{}={}", t.id, t.state))
            .collect();
        bail!(
            "{e:#}; tasks: [{}]\n{}",
            states.join(", "),
            manager.log_tail(20)
        );
    }
    Ok(last)
}

static CLUSTER_SEQ: AtomicUsize = AtomicUsize::new(0);

/// `n` Docker hosts on one machine, a Swarm ([`Cluster::new`]) or
/// independent engines ([`Cluster::standalone`]).
///
/// ```text
///   client ns            underlay ns (bridge br0)          node ns i (dockerd i)
///   eth0 10.74.0.2 ----- c   br0   n1 ... ni ------------- eth0 10.74.0.(10+i)
///                                  <tag> ----------------- eth0 (Cluster::attach)
/// ```
///
/// In a Swarm node 1 is the manager, the others join as workers. The
/// client has no route beyond the underlay; tests add what they need.
pub struct Cluster {
    // Declared first so that the daemons stop before their namespaces go.
    pub nodes: Vec<Node>,
    pub client: Netns,
    pub underlay: Netns,
    /// Names this cluster's namespaces and daemons (`s0`, `s1`, ...).
    tag: String,
}

pub struct Node {
    pub dockerd: Dockerd,
    pub ns: Netns,
    pub addr: Ipv4Addr,
}

/// The underlay address of node `i` (counted from 1).
pub fn node_addr(i: usize) -> Ipv4Addr {
    let last = u8::try_from(10 + i).expect("at most 245 nodes");
    Ipv4Addr::new(10, 74, 0, last)
}

impl Cluster {
    /// Builds the namespaces, starts every dockerd (in parallel) and forms
    /// the Swarm; returns once every node is `Ready`.
    pub fn new(n: usize) -> Result<Self> {
        let cluster = Self::standalone(n)?;
        swarm_init(cluster.manager(), node_addr(1))?;
        if n > 1 {
            let token = join_token(cluster.manager(), SwarmRole::Worker)?;
            for node in &cluster.nodes[1..] {
                swarm_join(&node.dockerd, node_addr(1), &token)?;
            }
        }
        let manager = cluster.manager();
        wait_until(CLUSTER_TIMEOUT, &format!("{n} ready Swarm nodes"), || {
            manager
                .docker(&["node", "ls", "--format", "{{.Status}}"])
                .map(|out| out.lines().filter(|l| l.trim() == "Ready").count() == n)
                .unwrap_or(false)
        })?;
        Ok(cluster)
    }

    /// Builds the namespaces and starts every dockerd (in parallel), each
    /// engine on its own, in no Swarm; returns once every engine answers.
    pub fn standalone(n: usize) -> Result<Self> {
        ensure!((1..=20).contains(&n), "a cluster has 1 to 20 nodes");
        cleanup_stale();
        let tag = format!("s{}", CLUSTER_SEQ.fetch_add(1, Ordering::Relaxed));
        let underlay = Netns::new(&unique_name(&format!("{tag}-ul")))?;
        underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        underlay.ip(&["link", "set", "br0", "up"])?;
        let client = Netns::new(&unique_name(&format!("{tag}-c")))?;
        attach(&underlay, "c", &client, CLIENT_ADDR)?;

        let mut cluster = Self {
            nodes: Vec::new(),
            client,
            underlay,
            tag,
        };
        for i in 1..=n {
            let ns = Netns::new(&unique_name(&format!("{}-n{i}", cluster.tag)))?;
            let addr = node_addr(i);
            attach(&cluster.underlay, &format!("n{i}"), &ns, addr)?;
            let dockerd = Dockerd::spawn(&ns, &format!("{}-n{i}", cluster.tag))?;
            cluster.nodes.push(Node { dockerd, ns, addr });
        }
        for node in &mut cluster.nodes {
            node.dockerd.wait_ready()?;
        }
        Ok(cluster)
    }

    /// A new namespace on the underlay at `addr` (its `eth0`), for another
    /// host of the test (an etcd server, say). `tag` (at most 10 of
    /// `[a-z0-9]`, not `c` nor `n<i>`) names it and its port on the bridge.
    /// The caller owns it; the link goes with it.
    pub fn attach(&self, tag: &str, addr: Ipv4Addr) -> Result<Netns> {
        ensure!(
            !tag.is_empty()
                && tag.len() <= 10
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "namespace tag {tag:?}: want 1 to 10 of [a-z0-9]"
        );
        let ns = Netns::new(&unique_name(&format!("{}-{tag}", self.tag)))?;
        attach(&self.underlay, tag, &ns, addr)?;
        Ok(ns)
    }

    /// Node 1's daemon, the Swarm manager.
    pub fn manager(&self) -> &Dockerd {
        &self.nodes[0].dockerd
    }

    /// Builds the test image on every node (each has its own image store;
    /// Swarm runs a task from the image of the node it lands on).
    pub fn build_image(&self, tag: &str) -> Result<()> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .nodes
                .iter()
                .map(|node| scope.spawn(|| build_test_image(&node.dockerd, tag)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect::<Result<Vec<()>>>()
                .map(drop)
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Shutting down takes a few seconds per daemon; in parallel the
        // whole cluster takes as long as one.
        for node in &mut self.nodes {
            node.dockerd.signal_stop();
        }
    }
}

/// Links `ns` to the underlay's bridge with a veth pair (`eth0` in `ns`,
/// `port` in the underlay) and gives it `addr`.
fn attach(underlay: &Netns, port: &str, ns: &Netns, addr: Ipv4Addr) -> Result<()> {
    // Created directly in the two namespaces, so the names cannot clash
    // with interfaces of concurrent tests in the root namespace.
    underlay.ip(&[
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])?;
    underlay.ip(&["link", "set", port, "master", "br0", "up"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{addr}/{UNDERLAY_PREFIX_LEN}"),
        "dev",
        "eth0",
    ])?;
    ns.ip(&["link", "set", "eth0", "up"])
}

/// Removes what earlier test processes, killed before their destructors
/// ran, left behind: their dockerd, containerd, shims and containers,
/// mounts, cgroups and files, then their namespaces.
pub fn cleanup_stale() {
    let me = std::process::id();
    let stale = |name: &str| owner_pid(name).is_some_and(|pid| pid != me && !pid_alive(pid));
    let mut names = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir(ROOT_DIR) {
        for entry in entries.flatten() {
            names.insert(entry.file_name().to_string_lossy().into_owned());
        }
    }
    for root in cgroup_roots() {
        if let Ok(entries) = std::fs::read_dir(root) {
            for entry in entries.flatten() {
                names.insert(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    for name in names.iter().filter(|n| stale(n)) {
        purge(&Path::new(ROOT_DIR).join(name), name);
    }
    netns::cleanup_stale();
}

/// Kills whatever still belongs to the daemon in `dir` / cgroup `name`,
/// unmounts everything below `dir`, removes the cgroups and the files.
fn purge(dir: &Path, name: &str) {
    let procs = daemon_processes(dir, name);
    if !procs.is_empty() {
        kill_all(&procs);
    }
    unmount_below(dir);
    remove_cgroups(name);
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            eprintln!("removing {}: {e}", dir.display());
        }
    }
}

/// Pid -> command line of every live process of the daemon whose files are
/// in `dir` and whose containers are in cgroup `name`: those naming the
/// directory (dockerd, containerd, shims), those in the containers'
/// cgroups, and their children (docker-proxy).
pub fn daemon_processes(dir: &Path, name: &str) -> BTreeMap<i32, String> {
    let dir_arg = format!("{}/", dir.display());
    let cgroup_parent = format!(":/{name}/");
    let mut found = BTreeMap::new();
    let mut parents: BTreeMap<i32, i32> = BTreeMap::new();
    let me = std::process::id() as i32;
    for (pid, proc_dir) in crate::process::all_processes() {
        if pid == me {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state, ppid, ...
        let mut after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace())
            .into_iter()
            .flatten();
        let state = after.next().unwrap_or("Z");
        if state == "Z" || state == "X" {
            continue;
        }
        let ppid = after.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        parents.insert(pid, ppid);
        let cmdline = std::fs::read(proc_dir.join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let in_cgroup = std::fs::read_to_string(proc_dir.join("cgroup"))
            .is_ok_and(|c| c.lines().any(|l| format!("{l}/").contains(&cgroup_parent)));
        if (cmdline.contains(&dir_arg) && is_engine_program(&cmdline)) || in_cgroup {
            found.insert(pid, cmdline);
        }
    }
    loop {
        let children: Vec<i32> = parents
            .iter()
            .filter(|(pid, ppid)| found.contains_key(ppid) && !found.contains_key(pid))
            .map(|(pid, _)| *pid)
            .collect();
        if children.is_empty() {
            break;
        }
        for pid in children {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            found.insert(pid, cmdline);
        }
    }
    found
}

/// Whether a command line belonging to the daemon's directory is the engine's
/// own (dockerd, containerd, a shim, docker-proxy, runc) rather than a client
/// of it, such as the docker CLI or lbd given `--docker-host` below that
/// directory, which stopping the daemon must leave alone.
fn is_engine_program(cmdline: &str) -> bool {
    let argv0 = cmdline.split(' ').next().unwrap_or_default();
    let name = argv0.rsplit('/').next().unwrap_or_default();
    ["dockerd", "containerd", "docker-proxy", "runc"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Waits up to `timeout` for the daemon's processes to exit by themselves
/// and returns those that did not.
fn wait_leftovers(dir: &Path, name: &str, timeout: Duration) -> BTreeMap<i32, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let procs = daemon_processes(dir, name);
        if procs.is_empty() || Instant::now() >= deadline {
            return procs;
        }
        sleep(POLL);
    }
}

fn kill_all(procs: &BTreeMap<i32, String>) {
    for pid in procs.keys() {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + LEFTOVER_TIMEOUT;
    while Instant::now() < deadline {
        let alive = procs.keys().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                !matches!(
                    s.rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().next()),
                    Some("Z" | "X")
                )
            })
        });
        if !alive {
            return;
        }
        sleep(POLL);
    }
}

fn describe(procs: &BTreeMap<i32, String>) -> String {
    procs
        .iter()
        .map(|(pid, cmd)| format!("{pid} {}", cmd.trim()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let prefix = format!("{}/", dir.display());
    let whole = dir.to_string_lossy().into_owned();
    let mut found: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == whole || m.starts_with(&prefix))
        .map(PathBuf::from)
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Detaches every mount below `dir`: overlay2 layers, the pinned network
/// namespaces of containers and overlays, and dockerd's bind mount of its
/// own data root.
fn unmount_below(dir: &Path) {
    // Mounts can be stacked on one point, so a few rounds may be needed.
    for _ in 0..5 {
        let mounts = mounts_below(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// Every cgroup hierarchy: the v1 controllers under /sys/fs/cgroup, or the
/// unified hierarchy itself.
fn cgroup_roots() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    let mut roots = vec![base.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(base) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                roots.push(entry.path());
            }
        }
    }
    roots
}

/// Cgroup directories named `name` in any hierarchy (the parent of a
/// daemon's containers).
pub fn cgroups_named(name: &str) -> Vec<PathBuf> {
    cgroup_roots()
        .into_iter()
        .map(|r| r.join(name))
        .filter(|p| p.is_dir())
        .collect()
}

fn remove_cgroups(name: &str) {
    for top in cgroups_named(name) {
        // A cgroup can only be removed once its children are gone, and only
        // its directories (never its control files) can be removed.
        let mut dirs = Vec::new();
        let mut todo = vec![top];
        while let Some(d) = todo.pop() {
            if let Ok(entries) = std::fs::read_dir(&d) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        todo.push(entry.path());
                    }
                }
            }
            dirs.push(d);
        }
        for d in dirs.iter().rev() {
            // Processes leave a cgroup as they exit, which may lag a kill.
            let deadline = Instant::now() + LEFTOVER_TIMEOUT;
            while std::fs::remove_dir(d).is_err() && d.exists() && Instant::now() < deadline {
                sleep(POLL);
            }
        }
    }
}
