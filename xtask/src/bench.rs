//! `cargo xtask bench`: installs the peers the benchmarks compare with, then
//! runs lb-bench, which writes BENCHMARKS.md and docs/bench/*.svg (or, with
//! --quick, target/bench-quick/ so a quick run never replaces the committed
//! report).

use std::process::{Command, Stdio};

use anyhow::{bail, Result};

use crate::cargo::{self, Env};

/// The generator (trafgen), the systems compared with (iptables, nftables,
/// HAProxy, nginx's stream proxy), the HTTP load generator and server, and
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
    apt_packages()?;
    let mut cmd = cargo::command(cargo::workspace_root().join("target/release/lb-bench"), env);
    if quick {
        cmd.arg("--quick");
    }
    cargo::run(cmd.args(args))
}

fn apt_packages() -> Result<()> {
    let mut missing = Vec::new();
    for &package in APT_PACKAGES {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", package])
            .stderr(Stdio::null())
            .output()?;
        if out.stdout != b"install ok installed" {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if cargo::output(Command::new("id").arg("-u"))?.trim() != "0" {
        bail!(
            "apt packages missing ({}); run `cargo xtask bench` as root",
            missing.join(" ")
        );
    }
    println!("installing: {}", missing.join(" "));
    // Another apt run (a concurrent setup) holds the lock for a while at most.
    let lock = ["-o", "DPkg::Lock::Timeout=300"];
    cargo::run(Command::new("apt-get").args(lock).arg("update"))?;
    cargo::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(lock)
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
}
