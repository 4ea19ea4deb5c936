//! vagrant/: the three-node Swarm cluster's Vagrantfile and its
//! provisioning script, checked without starting a machine. Vagrant
//! runs in a network namespace of its own with nothing but loopback, so it
//! reaches nothing outside (no box download, no version check), and keeps
//! its state in a scratch directory, so it leaves nothing behind.
//! `cargo xtask test` installs Vagrant, vagrant-libvirt and ShellCheck.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use lb_tests::scratch::Scratch;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../vagrant");
const NODES: [&str; 3] = ["node1", "node2", "node3"];
/// Vagrant takes two seconds or so here to load.
const LIMIT: Duration = Duration::from_secs(120);

fn script() -> PathBuf {
    Path::new(DIR).join("provision.sh")
}

fn tool(name: &str) -> &str {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{name} is not installed: `cargo xtask test` installs it (xtask/src/setup.rs, TEST_PACKAGES)"
    );
    name
}

/// Runs `program` to its end; `timeout` kills it past [`LIMIT`].
fn run(program: impl AsRef<OsStr>, build: impl FnOnce(&mut Command) -> &mut Command) -> Output {
    // By its path: some commands run with an empty PATH.
    let mut cmd = Command::new("/usr/bin/timeout");
    cmd.args(["--kill-after=5", &LIMIT.as_secs().to_string()])
        .arg(program)
        .stdin(Stdio::null());
    build(&mut cmd);
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert_ne!(
        out.status.code(),
        Some(124),
        "{cmd:?} still running after {LIMIT:?}"
    );
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `vagrant ARGS` in vagrant/, in a namespace with loopback alone, with its
/// home and its machines' state in `scratch`, libvirt as the provider and
/// `deb` as the package.
fn vagrant(scratch: &Scratch, deb: &Path, args: &[&str]) -> Output {
    run("unshare", |cmd| {
        cmd.args(["--net", tool("vagrant")])
            .args(args)
            .current_dir(DIR)
            .env("VAGRANT_HOME", scratch.0.join("home"))
            .env("VAGRANT_DOTFILE_PATH", scratch.0.join("dot"))
            .env("VAGRANT_DEFAULT_PROVIDER", "libvirt")
            .env("VAGRANT_CHECKPOINT_DISABLE", "1")
            .env("LB_DEB", deb)
    })
}

#[test]
fn the_vagrantfile_validates_with_the_libvirt_provider() {
    let scratch = Scratch::new("vagrant-validate");
    // Vagrant checks that the package exists, not what it holds.
    let deb = scratch.0.join("lb_0_amd64.deb");
    std::fs::write(&deb, "").unwrap();
    let out = vagrant(&scratch, &deb, &["validate"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    eprintln!("vagrant validate:\n{stdout}{stderr}");
    assert!(out.status.success(), "vagrant validate: {}", out.status);
    assert!(
        stdout.contains("Vagrantfile validated successfully."),
        "{stdout}"
    );
    for node in NODES {
        assert!(
            scratch.0.join("dot/machines").join(node).is_dir(),
            "{node} was not validated"
        );
    }
    // The key the workers fetch the join token with, made on the host.
    for key in ["lb-swarm-key", "lb-swarm-key.pub"] {
        assert!(scratch.0.join("dot").join(key).is_file(), "no {key}");
    }
}

#[test]
fn vagrant_up_without_the_package_stops_before_creating_anything() {
    let scratch = Scratch::new("vagrant-nodeb");
    let missing = scratch.0.join("missing.deb");
    let out = vagrant(&scratch, &missing, &["up"]);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "vagrant up without a package succeeded"
    );
    assert!(stderr.contains("run `cargo xtask package`"), "{stderr}");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(
        !scratch.0.join("dot/machines").exists(),
        "a machine was created"
    );
}

#[test]
fn provision_sh_is_posix_sh_and_passes_shellcheck() {
    for shell in ["sh", "bash"] {
        let out = run(shell, |cmd| cmd.arg("-n").arg(script()));
        assert!(out.status.success(), "{shell} -n: {}", text(&out.stderr));
    }
    // --shell=sh: it runs as `/bin/sh provision.sh` (dash) in a chroot too,
    // so no bashisms; every severity, style included.
    let out = run(tool("shellcheck"), |cmd| {
        cmd.args(["--shell=sh", "--severity=style"]).arg(script())
    });
    assert!(
        out.status.success(),
        "shellcheck:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Wrong arguments are refused before the script runs anything: with an
/// empty PATH, a script that went on would fail at its first command
/// instead of changing this machine.
#[test]
fn provision_sh_refuses_wrong_arguments_before_running_anything() {
    let scratch = Scratch::new("vagrant-args");
    let empty = scratch.0.join("bin");
    std::fs::create_dir(&empty).unwrap();
    let missing = scratch.0.join("missing");
    let missing = missing.to_str().unwrap();
    let manager = "192.168.56.11";
    let cases: &[(&[&str], i32, &str)] = &[
        (&[], 2, "usage:"),
        (&["bogus"], 2, "usage:"),
        (&["install"], 2, "usage:"),
        (&["swarm", "boss", manager, missing], 2, "usage:"),
        (&["swarm", "worker", manager], 2, "usage:"),
        (&["deploy", missing], 2, "usage:"),
        (&["install", missing], 1, "no package at"),
        (&["swarm", "worker", manager, missing], 1, "no key at"),
        (&["deploy", missing, manager], 1, "no stack file at"),
    ];
    for (args, code, says) in cases {
        let out = run("/bin/sh", |cmd| {
            cmd.arg(script())
                .args(*args)
                .env_clear()
                .env("PATH", &empty)
        });
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
