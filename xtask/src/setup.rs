//! Makes sure the machine can build the eBPF datapath and run the tests.
//! Every check is cheap so that a run on a ready machine takes a second or so.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Result};

use crate::cargo::{self, output, Env};

/// What the build, the tests and the demo need from Debian.
const APT_PACKAGES: &[&str] = &[
    // bpf-linker 0.13 is built against LLVM 22: its development files and
    // the libraries they link with.
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // The etcd client crate (etcd-client, through tonic-prost-build)
    // generates its gRPC code from etcd's .proto files at build time: it
    // needs protoc and the well-known types those files import, before
    // lb-userspace or the tests build.
    "protobuf-compiler",
    "libprotobuf-dev",
    // The tests and the demo build namespaces, links and routes with ip,
    // and run shells in them with the static busybox (also copied into
    // the test image).
    "iproute2",
    "busybox-static",
    // The Docker tests start their own dockerd (which brings containerd,
    // runc and tini); its default firewall rules need iptables.
    "docker.io",
    "iptables",
    // The stats page test renders the page in a headless browser.
    "chromium",
    // The etcd tests start a real etcd server (/usr/bin/etcd) in a
    // namespace of their own.
    "etcd-server",
];
/// Nice to have for debugging, not worth failing setup over.
const APT_OPTIONAL: &[&str] = &["bpftool"];
/// What `cargo xtask test` needs besides [`APT_PACKAGES`], and nothing
/// else does: the test of vagrant/ validates the Vagrantfile with Vagrant
/// and its libvirt provider (which brings a Ruby stack), and checks the
/// provisioning script with ShellCheck.
pub const TEST_PACKAGES: &[&str] = &["vagrant", "vagrant-libvirt", "shellcheck"];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_SERIES: &str = "0.13.";

/// Checks and installs everything, then returns the environment later cargo
/// runs need to build lb-ebpf.
pub fn run() -> Result<Env> {
    ensure_packages(APT_PACKAGES, APT_OPTIONAL, "setup")?;
    let toolchain = ebpf_toolchain()?;
    rust_src(&toolchain)?;

    let mut env: Env = vec![("LB_EBPF_TOOLCHAIN", toolchain.clone().into())];
    // aya-build compiles core with -Z build-std, which stable only allows
    // when bootstrapping.
    if !toolchain.starts_with("nightly") {
        env.push(("RUSTC_BOOTSTRAP", "1".into()));
    }
    if let Some(dir) = bpf_linker()? {
        env.push(("PATH", prepend_path(&dir)?));
    }
    Ok(env)
}

/// Installs whichever of `required` and `optional` Debian packages are
/// missing; an optional one that cannot be installed is only a warning.
/// Does nothing (and runs no apt) when everything is installed already, so
/// every xtask command can call it first. `why` names the command that
/// needs them, for the message when not run as root.
pub fn ensure_packages(required: &[&str], optional: &[&str], why: &str) -> Result<()> {
    let missing = missing_packages(required)?;
    let missing_optional = missing_packages(optional)?;
    if missing.is_empty() && missing_optional.is_empty() {
        return Ok(());
    }
    if !is_root()? {
        let all = [missing, missing_optional].concat().join(" ");
        bail!("apt packages missing ({all}); run `cargo xtask {why}` as root to install them");
    }
    cargo::run(apt_get().arg("update"))?;
    if !missing.is_empty() {
        println!("installing: {}", missing.join(" "));
        if !apt_install(&missing).status()?.success() {
            install_beside_backports(&missing)?;
        }
    }
    if !missing_optional.is_empty() {
        println!("installing: {} (optional)", missing_optional.join(" "));
        if !apt_install(&missing_optional).status()?.success() {
            println!("warning: could not install {}", missing_optional.join(" "));
        }
    }
    Ok(())
}

/// Installs `packages` from the release's backports, when a package the
/// machine came with is a backport that the release's own versions of
/// them cannot live beside. Seen: qemu-utils from bookworm-backports,
/// which breaks bookworm's qemu-system-common (< 8.0), so qemu-system-x86
/// must come from backports too. Anything else that fails is an error.
fn install_beside_backports(packages: &[&str]) -> Result<()> {
    let installed = output(Command::new("dpkg-query").args(["-W", "-f=${Package} ${Version}\\n"]))?;
    let backports: Vec<&str> = installed
        .lines()
        .filter(|l| l.contains("~bpo"))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let release = std::fs::read_to_string("/etc/os-release")?
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_string())
        .unwrap_or_default();
    if backports.is_empty() || release.is_empty() {
        bail!("apt-get could not install {}", packages.join(" "));
    }
    let suite = format!("{release}-backports");
    println!(
        "the machine has backports ({}): installing {} from {suite}",
        backports.join(" "),
        packages.join(" ")
    );
    let list = Path::new("/etc/apt/sources.list.d/lb-backports.sources");
    if !list.exists() {
        std::fs::write(
            list,
            format!(
                "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {suite}\n\
                 Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            ),
        )?;
        cargo::run(apt_get().arg("update"))?;
    }
    cargo::run(apt_install(packages).args(["-t", &suite]))
}

/// All of `packages` that dpkg does not list as installed, in one query.
fn missing_packages<'a>(packages: &[&'a str]) -> Result<Vec<&'a str>> {
    if packages.is_empty() {
        return Ok(Vec::new());
    }
    // One line per package it knows; unknown ones only go to stderr.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(packages)
        .stderr(Stdio::null())
        .output()?;
    let listed = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.strip_suffix(" install ok installed"))
        .map(|name| name.split(':').next().unwrap_or(name))
        .collect();
    let mut missing = Vec::new();
    for &package in packages {
        if installed.contains(&package) {
            println!("ok: {package}");
        } else {
            missing.push(package);
        }
    }
    Ok(missing)
}

/// apt-get that waits for another apt run (a concurrent setup, unattended
/// upgrades) to release the dpkg lock instead of failing at once.
fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-o", "DPkg::Lock::Timeout=300"]);
    cmd
}

fn apt_install(packages: &[&str]) -> Command {
    let mut cmd = apt_get();
    cmd.args(["install", "-y", "--no-install-recommends"])
        .args(packages);
    cmd
}

fn is_root() -> Result<bool> {
    Ok(output(Command::new("id").arg("-u"))?.trim() == "0")
}

/// A nightly is preferred because it needs no RUSTC_BOOTSTRAP; an explicit
/// LB_EBPF_TOOLCHAIN wins over both.
fn ebpf_toolchain() -> Result<String> {
    if let Ok(toolchain) = env::var("LB_EBPF_TOOLCHAIN") {
        println!("ok: eBPF toolchain {toolchain} (from LB_EBPF_TOOLCHAIN)");
        return Ok(toolchain);
    }
    let list = output(Command::new("rustup").args(["toolchain", "list"]))?;
    let toolchain = list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .find(|name| name.starts_with("nightly"))
        .unwrap_or("stable")
        .to_string();
    println!("ok: eBPF toolchain {toolchain}");
    Ok(toolchain)
}

fn rust_src(toolchain: &str) -> Result<()> {
    let installed = output(
        Command::new("rustup")
            .args("component list --installed --toolchain".split(' '))
            .arg(toolchain),
    )?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        println!("ok: rust-src ({toolchain})");
        return Ok(());
    }
    println!("installing: rust-src ({toolchain})");
    cargo::run(
        Command::new("rustup")
            .args("component add rust-src --toolchain".split(' '))
            .arg(toolchain),
    )
}

/// Returns a directory to put first on PATH when the right bpf-linker is not
/// the one PATH finds already.
fn bpf_linker() -> Result<Option<PathBuf>> {
    if let Some(version) = bpf_linker_version(Path::new("bpf-linker")) {
        if version.starts_with(BPF_LINKER_SERIES) {
            println!("ok: bpf-linker {version}");
            return Ok(None);
        }
        println!("found: bpf-linker {version} on PATH, need {BPF_LINKER_SERIES}x");
    }
    let bin_dir = cargo_home()?.join("bin");
    let installed = bin_dir.join("bpf-linker");
    if let Some(version) = bpf_linker_version(&installed) {
        if version.starts_with(BPF_LINKER_SERIES) {
            println!("ok: bpf-linker {version} ({})", installed.display());
            return Ok(Some(bin_dir));
        }
    }

    println!("installing: bpf-linker {BPF_LINKER_SERIES}x (takes a minute or two)");
    let args = "install bpf-linker --version ^0.13 --locked --force --no-default-features --features llvm-22";
    cargo::run(
        cargo::cargo(&Env::new())
            .args(args.split(' '))
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", prepend_path(&Path::new(LLVM_PREFIX).join("bin"))?),
    )?;
    match bpf_linker_version(&installed) {
        Some(version) if version.starts_with(BPF_LINKER_SERIES) => {
            println!("ok: bpf-linker {version} ({})", installed.display());
            Ok(Some(bin_dir))
        }
        _ => bail!(
            "{} is not bpf-linker {BPF_LINKER_SERIES}x after installing it",
            installed.display()
        ),
    }
}

/// `bpf-linker --version` prints e.g. "bpf-linker 0.13.0".
fn bpf_linker_version(program: &Path) -> Option<String> {
    let out = output(Command::new(program).arg("--version")).ok()?;
    out.split_whitespace().nth(1).map(str::to_string)
}

fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(home.into());
    }
    match env::var_os("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cargo")),
        None => bail!("neither CARGO_HOME nor HOME is set"),
    }
}

fn prepend_path(dir: &Path) -> Result<OsString> {
    let rest = env::var_os("PATH").unwrap_or_default();
    Ok(env::join_paths(
        std::iter::once(dir.to_path_buf()).chain(env::split_paths(&rest)),
    )?)
}
