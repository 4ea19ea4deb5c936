//! A running lbd inside a test namespace, with its own config file, pin
//! directory and control socket, all removed when it is dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::netns::{unique_name, Netns};
use crate::process::{wait_until, ChildGuard};
use crate::topology::target_bin;

/// How long a start may usually take until lbd answers.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Lbd {
    process: Option<ChildGuard>,
    /// The network namespace lbd runs in, where `lbd --cleanup` must run
    /// too: it removes the frontend addresses lbd added there.
    netns: PathBuf,
    dir: PathBuf,
    /// Given on every start, restarts included (`--docker ...`, say).
    extra_args: Vec<String>,
    /// Environment variables set on every start.
    pub env: Vec<(String, String)>,
    /// How long a start may take until lbd answers with its interfaces
    /// attached.
    pub start_timeout: Duration,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
}

impl Lbd {
    /// Starts lbd in `ns` with `config` as its configuration and waits until
    /// it answers on its socket with every interface in `interfaces` attached.
    pub fn start(ns: &Netns, tag: &str, config: &str, interfaces: &[&str]) -> Result<Lbd> {
        Self::start_with(ns, tag, config, interfaces, &[])
    }

    /// [`Self::start`] with more arguments for lbd, such as `--docker
    /// --docker-host unix://...`.
    pub fn start_with(
        ns: &Netns,
        tag: &str,
        config: &str,
        interfaces: &[&str],
        extra_args: &[&str],
    ) -> Result<Lbd> {
        Self::start_within(ns, tag, config, interfaces, extra_args, &[], START_TIMEOUT)
    }

    /// [`Self::start_with`] with environment variables for lbd, waiting up
    /// to `start_timeout` for it to answer (START_TIMEOUT usually; a start
    /// with tens of thousands of services takes longer).
    pub fn start_within(
        ns: &Netns,
        tag: &str,
        config: &str,
        interfaces: &[&str],
        extra_args: &[&str],
        env: &[(&str, &str)],
        start_timeout: Duration,
    ) -> Result<Lbd> {
        let name = unique_name(tag);
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir)?;
        let mut lbd = Lbd {
            process: None,
            netns: ns.path(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            start_timeout,
            config: dir.join("lbd.toml"),
            socket: dir.join("lbd.sock"),
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
            dir,
        };
        lbd.write_config(config)?;
        lbd.spawn(ns, interfaces)?;
        Ok(lbd)
    }

    /// Starts lbd (again) with this wrapper's config, socket and pins.
    pub fn spawn(&mut self, ns: &Netns, interfaces: &[&str]) -> Result<()> {
        let lbd = self;
        lbd.netns = ns.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(lbd.dir.join("lbd.log"))?;
        // As the systemd unit runs it: with its capabilities alone.
        let mut cmd = ns.command("setpriv");
        cmd.args([
            "--bounding-set",
            &unit_capabilities()?,
            "--inh-caps",
            "-all",
            "--",
        ])
        .arg(target_bin("lbd"))
        .arg("--config")
        .arg(&lbd.config)
        .arg("--socket")
        .arg(&lbd.socket)
        .arg("--pin-dir")
        .arg(&lbd.pin_dir)
        .args(&lbd.extra_args)
        .env_remove("RUST_LOG")
        .envs(lbd.env.iter().map(|(k, v)| (k, v)))
        .stdout(log.try_clone()?)
        .stderr(log);
        let mut child = ChildGuard::spawn(&mut cmd)?;
        let wanted: Vec<String> = interfaces.iter().map(|s| s.to_string()).collect();
        let mut exited = None;
        let ready = wait_until(lbd.start_timeout, "lbd to attach", || {
            // An lbd that refused its arguments would otherwise cost the
            // whole wait.
            exited = child.try_wait();
            exited.is_some()
                || lbd
                    .status()
                    .map(|s| {
                        let attached: Vec<String> = s["interfaces"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|v| v.as_str().map(String::from))
                                    .collect()
                            })
                            .unwrap_or_default();
                        wanted.iter().all(|w| attached.contains(w))
                    })
                    .unwrap_or(false)
        });
        if let Some(status) = exited {
            bail!(
                "lbd exited during start-up ({status})\nlbd's log:\n{}",
                lbd.log()
            );
        }
        if let Err(e) = ready {
            bail!("{e:#}\nlbd's log:\n{}", lbd.log());
        }
        lbd.process = Some(child);
        Ok(())
    }

    /// The running lbd's pid; None once stopped or killed.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ChildGuard::pid)
    }

    /// Whether lbd is still running (it has not exited by itself).
    pub fn is_running(&mut self) -> bool {
        self.process
            .as_mut()
            .is_some_and(|p| p.try_wait().is_none())
    }

    /// SIGKILL: lbd gets no chance to clean up, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = kill(Pid::from_raw(p.pid() as i32), Signal::SIGKILL);
            p.terminate();
        }
    }

    pub fn write_config(&self, text: &str) -> Result<()> {
        // Write then rename, so lbd never reads a half-written file.
        let tmp = self.dir.join("lbd.toml.new");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    /// Rewrites the config and signals a reload.
    pub fn reload(&self, text: &str) -> Result<()> {
        self.write_config(text)?;
        let pid = self.process.as_ref().context("lbd is not running")?.pid();
        kill(Pid::from_raw(pid as i32), Signal::SIGHUP)?;
        Ok(())
    }

    /// `lbctl status --json`, parsed.
    pub fn status(&self) -> Result<Value> {
        let out = lbctl(&self.socket, &["status", "--json"])?;
        Ok(serde_json::from_str(&out)?)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("lbd.log")).unwrap_or_default()
    }

    /// Stops lbd with SIGTERM and returns whether it exited cleanly. Unless
    /// started with `--teardown-on-exit`, lbd leaves its datapath attached
    /// and pinned for the next one.
    pub fn stop(&mut self) -> bool {
        self.process
            .take()
            .map(|mut p| p.terminate().success())
            .unwrap_or(false)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `lbd --cleanup` for this lbd's pins in its namespace, as an
    /// operator would after stopping it, and returns its exit status and
    /// standard error.
    pub fn cleanup(&self) -> Result<(std::process::ExitStatus, String)> {
        let err = self.dir.join("cleanup.err");
        let mut cmd = crate::netns::command_in(&self.netns, target_bin("lbd"));
        cmd.arg("--cleanup")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&err)?);
        let mut child = ChildGuard::spawn(&mut cmd)?;
        wait_until(Duration::from_secs(10), "lbd --cleanup", || {
            child.try_wait().is_some()
        })?;
        let status = child.terminate();
        Ok((status, std::fs::read_to_string(&err).unwrap_or_default()))
    }
}

impl Drop for Lbd {
    fn drop(&mut self) {
        self.stop();
        // SIGTERM leaves the datapath pinned: tear it down as an operator
        // would. Only inside lbd's own namespace, which must still exist
        // (elsewhere --cleanup would remove addresses from the wrong lo).
        if self.netns.exists() {
            match self.cleanup() {
                Ok((status, _)) if status.success() => {}
                Ok((status, err)) => eprintln!("lbd --cleanup failed ({status}): {err}"),
                Err(e) => eprintln!("lbd --cleanup: {e:#}"),
            }
        }
        // Covers a cleanup that could not run.
        lb_userspace::datapath::remove_pins(&self.pin_dir);
        remove_run_files(&self.pin_dir);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("lbd's log:\n{}", self.log());
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes what lbd keeps under /run for `pin_dir` (its instance lock, its
/// record of frontend addresses and its record of drains): lbd leaves them
/// for the next lbd of the same pins, and a test's pins are its own.
pub fn remove_run_files(pin_dir: &Path) {
    for ext in ["lock", "vips", "drains"] {
        let _ = std::fs::remove_file(lb_userspace::instance::run_file(pin_dir, ext));
    }
}

/// `setpriv --bounding-set` for the capabilities dist/lbd.service leaves
/// lbd (`CapabilityBoundingSet=`), e.g. `-all,+sys_admin,+net_admin`.
pub fn unit_capabilities() -> Result<String> {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/lbd.service");
    let text = std::fs::read_to_string(unit).with_context(|| format!("reading {unit}"))?;
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("CapabilityBoundingSet="))
        .with_context(|| format!("{unit} has no CapabilityBoundingSet="))?;
    let mut set = String::from("-all");
    for cap in line.split_whitespace() {
        let name = cap
            .strip_prefix("CAP_")
            .with_context(|| format!("{unit}: {cap:?} is not a capability"))?;
        set.push_str(&format!(",+{}", name.to_lowercase()));
    }
    Ok(set)
}

/// Runs lbctl against `socket` and returns its standard output.
pub fn lbctl(socket: &Path, args: &[&str]) -> Result<String> {
    let out = lbctl_output(socket, args)?;
    if !out.status.success() {
        bail!("lbctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Runs lbctl against `socket`, whatever its exit status.
pub fn lbctl_output(socket: &Path, args: &[&str]) -> Result<std::process::Output> {
    Ok(std::process::Command::new(target_bin("lbctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()?)
}
