//! The pin directory: where lbd pins its maps and links on bpffs so that the
//! datapath keeps running between two lbds. Given by the operator, so it is
//! checked before anything is mounted, created or removed: it must be on a
//! bpffs that outlives lbd, and lbd removes only what it pinned there.

use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// The only place lbd mounts bpffs, when nothing is mounted there yet (a
/// fresh host): where every bpf tool looks for it.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Links are pinned in this subdirectory as `ingress_<interface>`.
pub const LINKS_DIR: &str = "links";
pub const LINK_PREFIX: &str = "ingress_";
/// Links of the socket programs: `links/sock_<program>`.
pub const SOCKET_LINK_PREFIX: &str = "sock_";

/// Makes sure `dir` can hold lbd's pins and that they will outlive this lbd,
/// then creates it. Refuses a directory that is not on bpffs (pinning there
/// is impossible, and mounting bpffs over one of its parents would hide what
/// that parent holds).
pub fn prepare(dir: &Path) -> Result<()> {
    let dir = std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let mut existing = nearest_existing(&dir)?;
    if !is_bpffs(&existing)? {
        let root = Path::new(BPFFS_ROOT);
        if !(dir.starts_with(root) && existing == root) {
            bail!(
                "the pin directory {} is not on bpffs ({} is on another filesystem): lbd pins \
                 its maps and links only on bpffs and mounts bpffs only at {BPFFS_ROOT}; \
                 choose a directory under {BPFFS_ROOT}, or one on a bpffs you mounted",
                dir.display(),
                existing.display()
            );
        }
        // A bpffs mounted in a mount namespace of lbd's own would go, pins
        // and all, when lbd exits.
        if let Some(reference) = reference_process() {
            if !same_mount_namespace(&reference) {
                bail!(private_namespace(
                    &dir,
                    "no bpffs is mounted at /sys/fs/bpf here"
                ));
            }
        } else {
            log::warn!("cannot see pid 1's mount namespace; mounting bpffs at {BPFFS_ROOT}");
        }
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting bpffs on {BPFFS_ROOT}"))?;
        log::info!("mounted bpffs on {BPFFS_ROOT}");
        existing = root.to_path_buf();
    }
    check_outlives(&dir, &existing)?;
    std::fs::create_dir_all(dir.join(LINKS_DIR))
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(())
}

/// Refuses to clean `dir` unless it is absent or on bpffs.
pub fn check_cleanable(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
        Ok(_) if is_bpffs(dir)? => Ok(()),
        Ok(_) => bail!(
            "refusing to clean {}: it is not on bpffs, so it holds nothing lbd pinned; \
             nothing was removed",
            dir.display()
        ),
    }
}

/// Removes what lbd pins in `dir` (the maps named in `names`, the links
/// `links/ingress_*` and `links/sock_*`), then `links` and `dir` if that left them empty.
/// Anything else stays: the directory is the operator's.
pub fn remove(dir: &Path, names: &[&str]) -> Result<()> {
    check_cleanable(dir)?;
    if !dir.exists() {
        return Ok(());
    }
    for name in names {
        remove_pin(&dir.join(name))?;
    }
    let links = dir.join(LINKS_DIR);
    if is_real_dir(&links) {
        for entry in std::fs::read_dir(&links)? {
            let entry = entry?;
            let ours = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(LINK_PREFIX) || n.starts_with(SOCKET_LINK_PREFIX));
            if ours {
                remove_pin(&entry.path())?;
            }
        }
        remove_if_empty(&links)?;
    }
    remove_if_empty(dir)
}

/// Removes a pinned object; a directory or symlink under that name is not
/// lbd's and stays.
fn remove_pin(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_file() => std::fs::remove_file(path)
            .or_else(|e| match e.kind() {
                ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .with_context(|| format!("removing {}", path.display())),
        Ok(_) => {
            log::warn!("{} is not a pin; left in place", path.display());
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn remove_if_empty(dir: &Path) -> Result<()> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == ErrorKind::DirectoryNotEmpty => {
            log::warn!(
                "{} holds entries lbd did not pin; left in place",
                dir.display()
            );
            Ok(())
        }
        // A mount point (`--pin-dir /sys/fs/bpf`) cannot go, and need not.
        Err(e) if e.kind() == ErrorKind::ResourceBusy => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// `dir` itself or its closest ancestor that exists, symlinks resolved.
fn nearest_existing(dir: &Path) -> Result<PathBuf> {
    let mut at = dir;
    loop {
        match std::fs::canonicalize(at) {
            Ok(path) => return Ok(path),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("resolving {}", at.display())),
        }
        at = at
            .parent()
            .with_context(|| format!("no part of {} exists", dir.display()))?;
    }
}

pub fn is_bpffs(path: &Path) -> Result<bool> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let st =
        nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(st.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// A process whose mounts outlive lbd: pid 1 when lbd may look at it, else
/// lbd's oldest ancestor that it may look at (which `ip netns exec` or
/// `unshare -m` leave in the mount namespace they were started from, even
/// when lbd's parent is a shell inside). None when none is visible.
fn reference_process() -> Option<PathBuf> {
    let visible = |pid: i32| {
        let path = PathBuf::from(format!("/proc/{pid}"));
        std::fs::read_link(path.join("ns/mnt"))
            .is_ok()
            .then_some(path)
    };
    if let Some(init) = visible(1) {
        return Some(init);
    }
    let mut oldest = None;
    let mut pid = nix::unistd::getppid().as_raw();
    // Bounded, should the tree change under the walk (a pid reused).
    for _ in 0..64 {
        if pid <= 1 {
            break;
        }
        if let Some(path) = visible(pid) {
            oldest = Some(path);
        }
        match parent_of(pid) {
            Some(parent) => pid = parent,
            None => break,
        }
    }
    oldest
}

/// The parent pid from /proc/PID/stat (the fourth field; the second, the
/// command name in parentheses, may itself hold spaces and parentheses).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn same_mount_namespace(reference: &Path) -> bool {
    let ours = std::fs::read_link("/proc/self/ns/mnt").ok();
    ours.is_some() && ours == std::fs::read_link(reference.join("ns/mnt")).ok()
}

/// Fails when the bpffs holding `existing` (the part of the pin directory
/// that exists) is not the one the reference process sees at that path.
/// Compared by device and inode: a bpffs mounted privately (inside `ip netns
/// exec`) is another instance with another device, while one shared into a
/// container or a systemd sandbox is the same.
fn check_outlives(dir: &Path, existing: &Path) -> Result<()> {
    let Some(reference) = reference_process() else {
        log::warn!(
            "cannot see pid 1's mounts: not checking that {} outlives lbd",
            dir.display()
        );
        return Ok(());
    };
    if same_mount_namespace(&reference) {
        return Ok(());
    }
    let ours =
        std::fs::metadata(existing).with_context(|| format!("reading {}", existing.display()))?;
    let seen = reference
        .join("root")
        .join(existing.strip_prefix("/").unwrap_or(existing));
    let shared = std::fs::metadata(&seen)
        .is_ok_and(|theirs| theirs.dev() == ours.dev() && theirs.ino() == ours.ino());
    if !shared {
        bail!(private_namespace(
            dir,
            "the bpffs under it is private to lbd's mount namespace"
        ));
    }
    Ok(())
}

fn private_namespace(dir: &Path, why: &str) -> String {
    format!(
        "the pin directory {} would not outlive lbd: lbd runs in a mount namespace of its own \
         (as under `ip netns exec`, which remounts /sys) and {why}, so the pins, and every \
         connection with them, would vanish when lbd exits. Change only the network \
         namespace instead: `nsenter --net=/run/netns/NAME lbd ...`",
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_of_reads_the_parent_pid_whatever_the_command_name() {
        let me = std::process::id() as i32;
        assert_eq!(parent_of(me), Some(nix::unistd::getppid().as_raw()));
        assert_eq!(parent_of(-1), None);
    }
}
