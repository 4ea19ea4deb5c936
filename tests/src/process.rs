//! Child processes that never outlive the test, and bounded polling.

use std::process::{Child, Command, ExitStatus};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const GRACE: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(20);

/// Owns a child process; stops and reaps it on drop so a failing test leaves
/// no server running (and nothing holding its namespace alive).
#[derive(Debug)]
pub struct ChildGuard(Child);

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self(child)
    }

    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
        Ok(Self(child))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.0
    }

    /// The exit status if the process has already ended, without blocking.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.0.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL if the process is still there after 2 s.
    /// Calling it again returns the same status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.stop()
            .unwrap_or_else(|e| panic!("reaping child {}: {e}", self.pid()))
    }

    fn stop(&mut self) -> std::io::Result<ExitStatus> {
        // Once reaped, the pid may belong to someone else: never signal it.
        if let Some(status) = self.0.try_wait()? {
            return Ok(status);
        }
        let pid = Pid::from_raw(self.0.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.0.try_wait()? {
                return Ok(status);
            }
            sleep(POLL);
        }
        self.0.kill()?;
        self.0.wait()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // A panic here could abort a test that is already unwinding.
        let _ = self.stop();
    }
}

/// Polls `f` every 20 ms until it returns true, failing after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let timeout = timeout * time_scale();
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        sleep(POLL);
    }
}

/// How many times slower than this machine the tests run: 1, or
/// `LB_TEST_TIME_SCALE` where it is set (an emulated VM, see xtask's
/// vm.rs). Every wait for something to be ready stretches by it; figures
/// the tests measure do not.
pub fn time_scale() -> u32 {
    std::env::var("LB_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// Every process now running: its pid and its `/proc/<pid>` directory.
/// Empty if /proc cannot be read (then there is nothing to clean up either).
pub fn all_processes() -> Vec<(i32, std::path::PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            Some((pid, entry.path()))
        })
        .collect()
}

/// The length of one clock tick, the unit of /proc's CPU times.
pub fn clock_tick() -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Duration::from_secs(1) / (hz.max(1) as u32)
}

/// User + system time of a process (all its threads), or zero if it is gone.
pub fn process_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The command name may contain spaces; fields are counted after its ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let get = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    match (get(14), get(15)) {
        (Some(u), Some(s)) => clock_tick() * (u + s) as u32,
        _ => Duration::ZERO,
    }
}
