//! `cargo xtask bench`: installs the peers the benchmarks compare with, then
//! runs lb-bench, which writes BENCHMARKS.md and docs/bench/*.svg (or, with
//! --quick, target/bench-quick/ so a quick run never replaces the committed
//! report).

use anyhow::Result;

use crate::cargo::{self, Env};
use crate::setup::ensure_packages;

/// The generator (trafgen), the systems compared with (iptables, nftables,
/// HAProxy, nginx's stream and HTTP proxies), the HTTP load generator and server, and
/// ethtool for the veth settings the forwarding benchmark needs.
const APT_PACKAGES: &[&str] = &[
    "netsniff-ng",
    "iptables",
    "nftables",
    "haproxy",
    "nginx",
    "libnginx-mod-stream",
    "wrk",
    "ethtool",
];

pub fn run(env: &Env, quick: bool, args: &[String]) -> Result<()> {
    ensure_packages(APT_PACKAGES, &[], "bench")?;
    let mut cmd = cargo::command(cargo::workspace_root().join("target/release/lb-bench"), env);
    if quick {
        cmd.arg("--quick");
    }
    cargo::run(cmd.args(args))
}
