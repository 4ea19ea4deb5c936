//! What the machine is, and how much CPU and memory things use, read from
//! /proc and /sys.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
pub use lb_tests::process::{clock_tick, process_cpu};

/// The facts every table repeats, so a figure is never read without them.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cores: usize,
    pub kernel: String,
    pub cpu: String,
}

impl Machine {
    pub fn detect() -> Machine {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        Machine { cores, kernel, cpu }
    }

    /// "2 cores (CPU model), Linux 6.18.0"
    pub fn line(&self) -> String {
        format!("{} cores ({}), Linux {}", self.cores, self.cpu, self.kernel)
    }
}

/// Softirq time of the whole machine, summed over CPUs (/proc/stat). The
/// kernel here samples it per tick (no IRQ time accounting), which is
/// accurate enough over seconds.
pub fn softirq_time() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    // cpu user nice system idle iowait irq softirq ...
    let ticks: u64 = line
        .split_whitespace()
        .nth(7)
        .context("short cpu line in /proc/stat")?
        .parse()?;
    Ok(clock_tick() * ticks as u32)
}

/// Nanoseconds a thread has run (/proc/PID/schedstat), including softirq
/// work done on its behalf, which is what a threaded NAPI poller does.
pub fn thread_runtime(pid: u32) -> Result<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .with_context(|| format!("reading /proc/{pid}/schedstat"))?;
    let ns: u64 = s
        .split_whitespace()
        .next()
        .context("empty schedstat")?
        .parse()?;
    Ok(Duration::from_nanos(ns))
}

/// Resident and peak resident memory of a process, in KiB.
pub fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .context(format!("no {name} in /proc/{pid}/status"))?
            .parse()
            .map_err(Into::into)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Pids of every process whose network namespace is the one bound at `ns`.
pub fn processes_in(ns: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(ns) else {
        return Vec::new();
    };
    let wanted = format!("net:[{}]", meta.ino());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(e.path().join("ns/net")).ok()?;
            (link.as_os_str() == wanted.as_str()).then_some(pid)
        })
        .collect()
}

/// SIGKILLs what is left in a namespace this run created: a proxy's worker
/// whose master died first would otherwise keep the namespace alive.
pub fn kill_processes_in(ns: &Path) {
    for pid in processes_in(ns) {
        if pid != std::process::id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Total CPU time of every process in a namespace.
pub fn namespace_cpu(ns: &Path) -> Duration {
    processes_in(ns).into_iter().map(process_cpu).sum()
}

/// Kernel threads that poll `dev`'s NAPI instances in threaded mode; they
/// are named `napi/DEV-ID` (truncated to 15 characters by the kernel).
pub fn napi_threads(dev: &str) -> Vec<u32> {
    let prefix = format!("napi/{dev}-");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            comm.trim_end().starts_with(&prefix).then_some(pid)
        })
        .collect()
}

/// Pins a thread to one CPU.
pub fn pin(pid: u32, cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(pid as i32), &set)
        .with_context(|| format!("pinning thread {pid} to CPU {cpu}"))
}

/// Whether `program` is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Debian packages the forwarding and end-to-end benchmarks run.
pub const APT_PACKAGES: &[&str] = &[
    "netsniff-ng",
    "iptables",
    "nftables",
    "haproxy",
    "nginx",
    "libnginx-mod-stream",
    "wrk",
    "ethtool",
];

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.stdout == b"install ok installed")
}

/// Installs whichever of `APT_PACKAGES` is missing (as `cargo xtask bench`
/// does), so that a test run on a fresh machine measures every system too.
pub fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let quiet = |cmd: &mut Command| -> Result<()> {
        let out = cmd.env("DEBIAN_FRONTEND", "noninteractive").output()?;
        if !out.status.success() {
            bail!("{:?}: {}", cmd, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    };
    quiet(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=300", "update"]))?;
    quiet(
        Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=300", "install", "-y"])
            .arg("--no-install-recommends")
            .args(&missing),
    )
}
