//! The Debian package `cargo xtask package` makes (`cargo xtask test` makes
//! it before running the tests): what it holds, that its binaries run and
//! that dpkg installs and removes it cleanly in a root of its own.

use std::path::{Path, PathBuf};
use std::process::Command;

use lb_tests::scratch::Scratch;

fn deb() -> PathBuf {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/package"));
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "deb"))
                .collect()
        })
        .unwrap_or_default();
    match found.as_slice() {
        [one] => one.clone(),
        _ => panic!(
            "expected one package in {}, found {found:?}: run `cargo xtask package`",
            dir.display()
        ),
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_package_holds_the_daemon_the_cli_and_the_unit() {
    let deb = deb();
    let info = run(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for line in ["Package: lb", "Section: net", "Depends: libc6"] {
        assert!(info.contains(line), "{line:?} not in\n{info}");
    }
    let conffiles = run(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles, "/etc/lbd/lbd.toml\n/etc/default/lbd\n");
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for path in [
        "./usr/sbin/lbd",
        "./usr/bin/lbctl",
        "./usr/sbin/lbrouter",
        "./lib/systemd/system/lbd.service",
        "./etc/lbd/lbd.toml",
        "./etc/default/lbd",
        "./usr/share/man/man8/lbd.8.gz",
        "./usr/share/man/man8/lbctl.8.gz",
        "./usr/share/man/man8/lbrouter.8.gz",
        "./usr/share/bash-completion/completions/lbctl",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} not in the package:\n{contents}"
        );
    }
    // Everything belongs to root, whoever built it.
    for line in contents.lines() {
        assert!(line.contains(" root/root "), "{line}");
    }

    let dir = Scratch(std::env::temp_dir().join(format!("lbt-{}-deb", std::process::id())));
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir.0));
    let unit = std::fs::read_to_string(dir.0.join("lib/systemd/system/lbd.service")).unwrap();
    let ours = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/lbd.service"))
        .unwrap();
    assert_eq!(unit, ours, "the package's unit is dist/lbd.service");
    assert!(unit.contains("ExecStart=/usr/sbin/lbd "), "{unit}");
    let version = run(Command::new(dir.0.join("usr/bin/lbctl")).arg("--version"));
    assert!(version.starts_with("lbctl "), "{version}");
    run(Command::new(dir.0.join("usr/sbin/lbd")).arg("--version"));
    run(Command::new(dir.0.join("usr/sbin/lbrouter")).arg("--version"));
    // The configuration it ships is valid and serves nothing.
    let check = run(Command::new(dir.0.join("usr/sbin/lbd"))
        .arg("--check-config")
        .arg(dir.0.join("etc/lbd/lbd.toml")));
    eprintln!("lbd --check-config: {check}");
}

/// dpkg installs it into an empty root of its own (`--root`, the machine's
/// own packages untouched), keeps an edited conffile on reinstall, and
/// removes everything but the conffiles, which purge removes.
#[test]
fn dpkg_installs_and_removes_it_in_a_root_of_its_own() {
    let deb = deb();
    let root = Scratch(std::env::temp_dir().join(format!("lbt-{}-dpkgroot", std::process::id())));
    for dir in [
        "var/lib/dpkg/updates",
        "var/lib/dpkg/info",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(root.0.join(dir)).unwrap();
    }
    for file in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        std::fs::write(root.0.join(file), "").unwrap();
    }
    let dpkg = |args: &[&str]| {
        run(Command::new("dpkg")
            .arg(format!("--root={}", root.0.display()))
            .args([
                "--force-depends",
                "--force-not-root",
                "--force-script-chrootless",
            ])
            .args(["--log=/dev/null"])
            .args(args))
    };
    let deb_arg = deb.display().to_string();
    dpkg(&["--install", &deb_arg]);
    assert!(root.0.join("usr/sbin/lbd").exists());
    let config = root.0.join("etc/lbd/lbd.toml");
    std::fs::write(&config, "# edited\n").unwrap();
    dpkg(&["--force-confold", "--install", &deb_arg]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "# edited\n");
    dpkg(&["--remove", "lb"]);
    assert!(!root.0.join("usr/sbin/lbd").exists());
    assert!(config.exists(), "remove keeps the conffiles");
    dpkg(&["--purge", "lb"]);
    assert!(!config.exists(), "purge removes the conffiles");
}
