//! Where the socket programs attach: a cgroup v2 directory. Programs
//! attached to a cgroup run for every process below it, so the root of the
//! hierarchy covers every container whatever the engine's cgroup driver
//! (and on a host with v1 controllers, the v2 hierarchy still exists,
//! mounted as `.../unified`). Who is balanced is decided by network
//! membership in the maps, not by the cgroup.

use std::path::PathBuf;

use anyhow::{anyhow, Context as _, Result};

/// The mount point of the cgroup v2 hierarchy, from /proc/self/mountinfo.
pub fn v2_root() -> Result<PathBuf> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    find_v2(&info).ok_or_else(|| {
        anyhow!(
            "no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified, \
             or name one with --cgroup)"
        )
    })
}

/// mountinfo lines: `id parent major:minor root mount-point options
/// [optional fields] - fstype source super-options`.
fn find_v2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        let mount_point = before.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v2_mount_among_v1_controllers() {
        let info = "\
25 24 0:22 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
35 25 0:32 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
";
        assert_eq!(find_v2(info), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(
            find_v2("30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            find_v2("25 24 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"),
            None
        );
        assert_eq!(
            find_v2("30 1 0:26 / /mnt/a\\040b rw - cgroup2 cgroup2 rw\n"),
            Some(PathBuf::from("/mnt/a b"))
        );
    }
}
