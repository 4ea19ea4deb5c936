//! Where the engine keeps its network namespaces (`<exec-root>/netns`), in
//! which Swarm's `ingress_sbox` is. An engine started with another
//! `--exec-root` (or `exec-root` in daemon.json) keeps them elsewhere, and
//! the API does not say where the exec root is. In order: the engine's own
//! command line (the process at the other end of its unix socket), any
//! container's `NetworkSettings.SandboxKey` (a file in that directory), and
//! the one `ingress_sbox` mounted on this host.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions};
use bollard::Docker;

use super::docker::DEFAULT_EXEC_ROOT;

/// Finds the directory once per connection to the engine, and keeps
/// looking while all it has is a guess.
pub struct NetnsDir {
    /// `--docker-exec-root`, which wins over any discovery.
    exec_root: Option<PathBuf>,
    /// The engine's address (`unix:///var/run/docker.sock`).
    host: String,
    found: Option<PathBuf>,
}

impl NetnsDir {
    pub fn new(exec_root: Option<PathBuf>, host: &str) -> NetnsDir {
        NetnsDir {
            exec_root,
            host: host.to_string(),
            found: None,
        }
    }

    pub async fn get(&mut self, docker: &Docker) -> PathBuf {
        if let Some(root) = &self.exec_root {
            return root.join("netns");
        }
        if let Some(dir) = &self.found {
            return dir.clone();
        }
        let found = match from_engine_process(&self.host) {
            Some(dir) => Some((dir, "the engine's --exec-root")),
            None => match from_containers(docker).await {
                Ok(Some(dir)) => Some((dir, "a container's sandbox key")),
                Ok(None) => from_mounts().map(|dir| (dir, "the ingress_sbox mount")),
                Err(e) => {
                    log::debug!("looking for the engine's namespace directory: {e:#}");
                    None
                }
            },
        };
        match found {
            Some((dir, how)) => {
                log::info!(
                    "the engine keeps its network namespaces in {} ({how})",
                    dir.display()
                );
                self.found = Some(dir.clone());
                dir
            }
            None => Path::new(DEFAULT_EXEC_ROOT).join("netns"),
        }
    }
}

/// The directory of a sandbox key (`/var/run/docker/netns/1a2b3c`), if the
/// key is an absolute path to a file in a directory named `netns`.
fn sandbox_dir(key: &str) -> Option<PathBuf> {
    let path = Path::new(key);
    let dir = path.parent()?;
    (path.is_absolute() && path.file_name().is_some() && dir.file_name()? == "netns")
        .then(|| dir.to_path_buf())
}

/// `<exec-root>/netns` from the command line of the process listening on
/// the engine's unix socket, if it was started with `--exec-root`. (When
/// systemd holds the socket, that process is systemd: nothing is found.)
fn from_engine_process(host: &str) -> Option<PathBuf> {
    use std::os::fd::AsFd;
    let path = host.strip_prefix("unix://").unwrap_or(host);
    if !path.starts_with('/') {
        return None;
    }
    let stream = std::os::unix::net::UnixStream::connect(path).ok()?;
    let cred =
        nix::sys::socket::getsockopt(&stream.as_fd(), nix::sys::socket::sockopt::PeerCredentials)
            .ok()?;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", cred.pid())).ok()?;
    let root = exec_root_flag(&cmdline)?;
    // Relative to the engine's working directory, as the engine read it.
    let root = match root.is_absolute() {
        true => root,
        false => std::fs::read_link(format!("/proc/{}/cwd", cred.pid()))
            .ok()?
            .join(root),
    };
    Some(root.join("netns"))
}

/// The value of `--exec-root` in a NUL-separated command line.
fn exec_root_flag(cmdline: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.iter().enumerate().find_map(|(i, arg)| {
        let value = match arg.strip_prefix(b"--exec-root") {
            Some(b"") => *args.get(i + 1)?,
            Some(rest) => rest.strip_prefix(b"=")?,
            None => return None,
        };
        (!value.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(value)))
    })
}

async fn from_containers(docker: &Docker) -> Result<Option<PathBuf>> {
    let running = docker
        .list_containers(Some(ListContainersOptions {
            limit: Some(5),
            ..Default::default()
        }))
        .await
        .context("listing containers")?;
    for id in running.iter().filter_map(|c| c.id.as_deref()) {
        let inspect = docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .with_context(|| format!("inspecting container {id}"))?;
        let key = inspect.network_settings.and_then(|n| n.sandbox_key);
        if let Some(dir) = key.as_deref().and_then(sandbox_dir) {
            return Ok(Some(dir));
        }
    }
    Ok(None)
}

/// The directory of the one nsfs mount named `ingress_sbox` on this host;
/// none when there are several (several engines) or none.
fn from_mounts() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut dirs = sbox_mounts(&mountinfo);
    dirs.dedup();
    match dirs.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// Every `ingress_sbox` namespace mounted on this host (one per engine).
pub fn ingress_sboxes() -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut dirs = sbox_mounts(&mountinfo);
    dirs.dedup();
    dirs.into_iter().map(|d| d.join("ingress_sbox")).collect()
}

/// Directories holding an nsfs mount named `ingress_sbox`, from
/// /proc/self/mountinfo (proc(5): field 5 is the mount point, with spaces
/// escaped as octal; the file system type follows the " - " separator).
fn sbox_mounts(mountinfo: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            if rest.split_whitespace().next()? != "nsfs" {
                return None;
            }
            let point = fields.split_whitespace().nth(4)?;
            let point = point.replace("\\040", " ");
            let path = Path::new(&point);
            (path.file_name()? == "ingress_sbox")
                .then(|| sandbox_dir(&point))
                .flatten()
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_keys_name_their_directory() {
        assert_eq!(
            sandbox_dir("/var/run/docker/netns/1a2b3c4d5e6f"),
            Some(PathBuf::from("/var/run/docker/netns"))
        );
        assert_eq!(
            sandbox_dir("/tmp/lbt-docker/x/exec/netns/default"),
            Some(PathBuf::from("/tmp/lbt-docker/x/exec/netns"))
        );
        // Not a sandbox key: empty, relative, or not in a netns directory.
        for key in ["", "netns/abc", "/var/run/docker/abc", "/"] {
            assert_eq!(sandbox_dir(key), None, "{key:?}");
        }
    }

    #[test]
    fn exec_root_from_the_engine_command_line() {
        let line = |args: &[&str]| args.join("\0").into_bytes();
        assert_eq!(
            exec_root_flag(&line(&[
                "dockerd",
                "--exec-root",
                "/tmp/x/exec",
                "-H",
                "unix:///s"
            ])),
            Some(PathBuf::from("/tmp/x/exec"))
        );
        assert_eq!(
            exec_root_flag(&line(&["dockerd", "--exec-root=/run/d2", ""])),
            Some(PathBuf::from("/run/d2"))
        );
        for args in [
            &["dockerd", "-H", "fd://"][..],
            &["dockerd", "--exec-root"],
            &["dockerd", "--exec-rootx=/a"],
            &["/sbin/init"],
        ] {
            assert_eq!(exec_root_flag(&line(args)), None, "{args:?}");
        }
    }

    #[test]
    fn ingress_sbox_mounts_are_found_in_mountinfo() {
        let one = "\
24 1 0:22 / /run rw,nosuid shared:5 - tmpfs tmpfs rw
610 24 0:4 net:[4026532710] /run/docker/netns/ingress_sbox rw shared:300 - nsfs nsfs rw
611 24 0:4 net:[4026532777] /run/docker/netns/5f2d9c0b3a1e rw shared:301 - nsfs nsfs rw
612 24 0:50 / /run/docker/netns/ingress_sbox_copy rw - tmpfs tmpfs rw
";
        assert_eq!(sbox_mounts(one), [PathBuf::from("/run/docker/netns")]);
        let two = format!(
            "{one}700 24 0:4 net:[4026532999] /tmp/my\\040engine/netns/ingress_sbox rw - nsfs nsfs rw\n"
        );
        assert_eq!(
            sbox_mounts(&two),
            [
                PathBuf::from("/run/docker/netns"),
                PathBuf::from("/tmp/my engine/netns")
            ]
        );
        assert!(sbox_mounts("garbage\n").is_empty());
    }
}
