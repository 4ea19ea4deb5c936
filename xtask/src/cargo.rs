//! Helpers for spawning cargo and other tools from the workspace root.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{self, Command, Stdio};

use anyhow::{bail, Context, Result};

/// Environment variables every build needs, as worked out by setup.
pub type Env = Vec<(&'static str, OsString)>;

/// lb-ebpf only makes sense for the BPF target, which lb-userspace's build
/// script takes care of; a host build of it would fail or be useless.
pub const WORKSPACE: [&str; 3] = ["--workspace", "--exclude", "lb-ebpf"];

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// A command that runs in the workspace root with the setup environment.
pub fn command(program: impl AsRef<OsStr>, env: &Env) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root()).envs(env.iter().cloned());
    cmd
}

/// The cargo that runs xtask, so the same toolchain builds everything.
pub fn cargo(env: &Env) -> Command {
    command(
        std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
        env,
    )
}

/// Runs `cmd` with inherited stdio; if it fails, exits with its status so
/// callers such as CI see the real exit code.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !status.success() {
        eprintln!("xtask: {} failed ({status})", describe(cmd));
        let code = status
            .code()
            .or_else(|| status.signal().map(|sig| 128 + sig))
            .unwrap_or(1);
        process::exit(code);
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; stderr is discarded.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !out.status.success() {
        bail!("{} failed ({})", describe(cmd), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy()];
    words.extend(cmd.get_args().map(|arg| arg.to_string_lossy()));
    format!("`{}`", words.join(" "))
}
