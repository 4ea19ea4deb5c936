//! `cargo xtask package`: a Debian package of lbd, lbctl and lbrouter, made with
//! dpkg-deb from the release build (`target/package/lb_<version>_<arch>.deb`):
//! the binaries, their man pages and completions, the systemd unit, and
//! configuration files that serve nothing until edited. The service is
//! installed disabled: a load balancer starts when its operator says so.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::cargo::{self, output};

/// Files of the package, from the workspace root, and where they go.
const FILES: &[(&str, &str, u32)] = &[
    ("target/release/lbd", "usr/sbin/lbd", 0o755),
    ("target/release/lbctl", "usr/bin/lbctl", 0o755),
    ("target/release/lbrouter", "usr/sbin/lbrouter", 0o755),
    ("dist/lbd.service", "lib/systemd/system/lbd.service", 0o644),
    ("dist/lbd.toml", "etc/lbd/lbd.toml", 0o644),
    ("dist/default", "etc/default/lbd", 0o644),
    ("README.md", "usr/share/doc/lb/README.md", 0o644),
    (
        "target/release/completions/lbd.bash",
        "usr/share/bash-completion/completions/lbd",
        0o644,
    ),
    (
        "target/release/completions/lbctl.bash",
        "usr/share/bash-completion/completions/lbctl",
        0o644,
    ),
    (
        "target/release/completions/lbrouter.bash",
        "usr/share/bash-completion/completions/lbrouter",
        0o644,
    ),
    (
        "target/release/completions/_lbd",
        "usr/share/zsh/vendor-completions/_lbd",
        0o644,
    ),
    (
        "target/release/completions/_lbctl",
        "usr/share/zsh/vendor-completions/_lbctl",
        0o644,
    ),
    (
        "target/release/completions/_lbrouter",
        "usr/share/zsh/vendor-completions/_lbrouter",
        0o644,
    ),
    (
        "target/release/completions/lbd.fish",
        "usr/share/fish/vendor_completions.d/lbd.fish",
        0o644,
    ),
    (
        "target/release/completions/lbctl.fish",
        "usr/share/fish/vendor_completions.d/lbctl.fish",
        0o644,
    ),
    (
        "target/release/completions/lbrouter.fish",
        "usr/share/fish/vendor_completions.d/lbrouter.fish",
        0o644,
    ),
];

/// Edited by the operator; dpkg keeps their edits on upgrade.
const CONFFILES: &[&str] = &["/etc/lbd/lbd.toml", "/etc/default/lbd"];

/// systemd learns of the unit (or of its removal); nothing is started.
/// Not when dpkg installs into another root (DPKG_ROOT): that root's
/// systemd is not this one.
const POSTINST: &str = "#!/bin/sh\nset -e\nif [ -z \"$DPKG_ROOT\" ] && [ -d /run/systemd/system ]; then\n    systemctl daemon-reload || true\nfi\n";
const POSTRM: &str = POSTINST;

/// Where the package is written.
pub fn path(root: &Path, version: &str, arch: &str) -> PathBuf {
    root.join("target/package")
        .join(format!("lb_{version}_{arch}.deb"))
}

/// Builds the package from what `cargo xtask build` left in target/release.
pub fn run(root: &Path) -> Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let stage = root.join("target/package/stage");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    for (from, to, mode) in FILES {
        install(&root.join(from), &stage.join(to), *mode)?;
    }
    let man = root.join("target/release/man");
    let mut pages: Vec<PathBuf> = fs::read_dir(&man)
        .with_context(|| format!("reading {} (run `cargo xtask build`)", man.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "8"))
        .collect();
    pages.sort();
    for page in pages {
        let name = page.file_name().context("a man page")?;
        let to = stage.join("usr/share/man/man8").join(name);
        install(&page, &to, 0o644)?;
        // -n: no name or time in the header, so the package is reproducible.
        cargo::run(Command::new("gzip").args(["-9n", "-f"]).arg(&to))?;
    }

    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    let size_kib = du_kib(&stage)?;
    fs::write(debian.join("control"), control(version, &arch, size_kib))?;
    fs::write(debian.join("conffiles"), CONFFILES.join("\n") + "\n")?;
    for (name, text) in [("postinst", POSTINST), ("postrm", POSTRM)] {
        write_mode(&debian.join(name), text.as_bytes(), 0o755)?;
    }
    let deb = path(root, version, &arch);
    cargo::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    fs::remove_dir_all(&stage)?;
    println!("wrote {}", deb.display());
    Ok(deb)
}

fn control(version: &str, arch: &str, size_kib: u64) -> String {
    format!(
        "Package: lb\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: lb maintainers <lb@localhost>\n\
         Installed-Size: {size_kib}\n\
         Depends: libc6\n\
         Recommends: iproute2\n\
         Suggests: docker.io, etcd-client\n\
         Section: net\n\
         Priority: optional\n\
         Description: kernel-level L4 load balancer for Docker hosts\n \
         An eBPF datapath translates virtual addresses to backends by DNAT,\n \
         with Maglev, connection tracking and reverse translation. lbd keeps\n \
         it equal to the services of a TOML file, the Docker Engine (labelled\n \
         containers, Swarm services) and etcd; lbctl shows what it serves.\n"
    )
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if !from.exists() {
        bail!("{} is missing (run `cargo xtask build`)", from.display());
    }
    let bytes = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write_mode(to, &bytes, mode)
}

fn write_mode(to: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(to, bytes).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn du_kib(dir: &Path) -> Result<u64> {
    let out = output(Command::new("du").args(["-sk"]).arg(dir))?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du -sk")
}
