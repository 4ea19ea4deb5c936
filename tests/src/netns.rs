//! Named network namespaces that clean up after themselves.
//!
//! Namespaces are created with `ip netns add`, so they are visible to
//! `ip netns list` and can be inspected by hand while a test is paused.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Every namespace this crate creates starts with this prefix, followed by the
/// pid of the creating process, so leftovers of a killed run can be told
/// apart from namespaces of runs that are still going.
const PREFIX: &str = "lbt-";

const NETNS_DIR: &str = "/run/netns";

/// A namespace name unique to this process: `lbt-<pid>-<tag>`.
pub fn unique_name(tag: &str) -> String {
    format!("{PREFIX}{}-{tag}", std::process::id())
}

/// Deletes namespaces left behind by earlier test processes that no longer
/// exist (a run killed by a timeout never gets to run its destructors).
pub fn cleanup_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid != std::process::id() && !pid_alive(pid) {
            // Processes left inside (servers, daemons) would keep the
            // namespace, and whatever they attached to it, alive.
            kill_members(&entry.path());
            let _ = run_ip(&["netns", "del", &name]);
        }
    }
}

/// SIGKILLs every process whose network namespace is the one pinned at `path`.
fn kill_members(path: &Path) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let wanted = format!("net:[{}]", meta.ino());
    for (pid, proc_dir) in crate::process::all_processes() {
        let in_ns = std::fs::read_link(proc_dir.join("ns/net"))
            .is_ok_and(|link| link.as_os_str() == wanted.as_str());
        if in_ns {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// `lbt-<pid>-...` -> pid: the test process that created it.
pub(crate) fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, _tag) = rest.split_once('-')?;
    pid.parse().ok()
}

pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // EPERM still means the process exists.
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

fn check_output(what: &str, out: Output) -> Result<Output> {
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn run_ip(args: &[&str]) -> Result<Output> {
    let what = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("spawning `{what}`"))?;
    check_output(&what, out)
}

/// A network namespace owned by the test; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` with its loopback interface up.
    pub fn new(name: &str) -> Result<Self> {
        run_ip(&["netns", "add", name])?;
        // Constructed before configuring so a failure below still deletes it.
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that pins the namespace, usable with `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// Runs `ip -n NAME <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run_ip(&full).map(drop)
    }

    /// Runs `sh -c cmd` inside the namespace; fails on a non-zero exit.
    pub fn sh(&self, cmd: &str) -> Result<Output> {
        let what = format!("ip netns exec {} sh -c {cmd:?}", self.name);
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .output()
            .with_context(|| format!("spawning `{what}`"))?;
        check_output(&what, out)
    }

    /// Sets a sysctl as seen from inside the namespace.
    ///
    /// Done in a child process so the result never depends on which
    /// namespace the calling thread happens to be in.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let what = format!("sysctl -w {key}={value} in {}", self.name);
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-q", "-w"])
            .arg(format!("{key}={value}"))
            .output()
            .with_context(|| format!("spawning `{what}`"))?;
        check_output(&what, out).map(drop)
    }

    /// Runs `f` on a fresh thread that has joined this namespace, so every
    /// socket it opens belongs to the namespace. Panics in `f` propagate.
    pub fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        run_in(&self.path(), f).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`Self::run`], for work that goes on while the test does other
    /// things (a load, long-lived connections): the thread is joined by
    /// the caller.
    pub fn spawn<F, R>(&self, f: F) -> std::thread::JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let path = self.path();
        std::thread::spawn(move || {
            let file =
                File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
            setns(&file, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns({}): {e}", path.display()));
            f()
        })
    }

    /// A command that starts inside this namespace.
    ///
    /// Unlike `ip netns exec`, only the network namespace changes: the child
    /// keeps the host's mounts, in particular the bpffs at /sys/fs/bpf.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(&self.path(), program)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run_ip(&["netns", "del", &self.name]);
    }
}

/// A command that starts inside the network namespace pinned at `netns`
/// (one of ours, or one of dockerd's). Only the network namespace changes:
/// the child keeps the host's mounts, in particular the bpffs at
/// /sys/fs/bpf and the namespaces and overlay mounts dockerd creates.
pub fn command_in(netns: &Path, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let path = CString::new(netns.as_os_str().as_bytes()).expect("namespace path contains no NUL");
    let mut cmd = Command::new(program);
    // SAFETY: the closure only makes async-signal-safe syscalls
    // (open, setns, close) on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let rc = libc::setns(fd, libc::CLONE_NEWNET);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if rc != 0 {
                return Err(err);
            }
            Ok(())
        });
    }
    cmd
}

/// Runs `f` on a thread inside the network namespace pinned at `path`.
/// Panics in `f` propagate.
pub fn run_in<F, R>(path: &Path, f: F) -> Result<R>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|scope| {
        let handle = scope.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns({})", path.display()))?;
            Ok(f())
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
