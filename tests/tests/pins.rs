//! The pin directory: lbd pins only where the pins outlive it, removes only
//! what it pinned, and adopts only maps that fit it. Each test runs lbd in a
//! network namespace of its own holding only `lo`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lb_tests::lbd::{lbctl, remove_run_files, Lbd};
use lb_tests::netns::{unique_name, Netns};
use lb_tests::process::ChildGuard;
use lb_tests::topology::target_bin;

const CONFIG: &str = r#"
[[service]]
name = "web"
frontend = "10.74.0.10:80/tcp"
backends = ["10.74.1.2:8080", "10.74.1.3:8080"]
"#;

/// Removes a directory the test made, whatever happens to the test.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        remove_run_files(&self.0);
    }
}

/// Runs `cmd` until it exits (at most 10 s; then it is killed and the
/// status is None) and returns its status and standard error.
fn run(mut cmd: Command, stderr: &Path) -> (Option<ExitStatus>, String) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap());
    let mut child = ChildGuard::spawn(&mut cmd).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() > deadline {
            child.terminate();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, std::fs::read_to_string(stderr).unwrap_or_default())
}

/// lbd in `ns` with `args`.
fn lbd(ns: &Netns, args: &[&OsStr], stderr: &Path) -> (Option<ExitStatus>, String) {
    let mut cmd = ns.command(target_bin("lbd"));
    cmd.args(args);
    run(cmd, stderr)
}

fn refused(what: &str, (status, stderr): &(Option<ExitStatus>, String)) {
    assert!(
        status.is_some_and(|s| !s.success()),
        "{what}: not refused ({status:?}): {stderr}"
    );
}

/// Mount points of this (the host's) mount namespace under `path`.
fn mounts_under(path: &Path) -> Vec<String> {
    let path = path.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&path)))
        .map(String::from)
        .collect()
}

#[test]
fn a_pin_directory_not_on_bpffs_is_refused_and_nothing_is_removed_or_mounted() {
    let ns = Netns::new(&unique_name("pinfs")).unwrap();
    let tmp = Scratch(std::env::temp_dir().join(unique_name("pinfs")));
    std::fs::create_dir_all(&tmp.0).unwrap();
    let precious = tmp.0.join("precious");
    std::fs::write(&precious, "keep me").unwrap();
    let config = tmp.0.join("lbd.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let err = tmp.0.join("lbd.err");

    // --cleanup of a directory that holds no pins removes nothing.
    let out = lbd(
        &ns,
        &[
            "--cleanup".as_ref(),
            "--pin-dir".as_ref(),
            tmp.0.as_os_str(),
        ],
        &err,
    );
    refused("--cleanup of a plain directory", &out);
    assert!(out.1.contains("not on bpffs"), "{}", out.1);
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");

    // Neither that directory nor a new one under it is a pin directory,
    // and bpffs is mounted over neither.
    for pin_dir in [tmp.0.clone(), tmp.0.join("x")] {
        let out = lbd(
            &ns,
            &[
                "--config".as_ref(),
                config.as_os_str(),
                "--socket".as_ref(),
                tmp.0.join("lbd.sock").as_os_str(),
                "--pin-dir".as_ref(),
                pin_dir.as_os_str(),
            ],
            &err,
        );
        remove_run_files(&pin_dir);
        refused(&format!("--pin-dir {}", pin_dir.display()), &out);
        assert!(
            out.1.contains("is not on bpffs") && out.1.contains("/sys/fs/bpf"),
            "{}",
            out.1
        );
        assert_eq!(mounts_under(&tmp.0), Vec::<String>::new());
        assert!(
            !tmp.0.join("x").exists(),
            "lbd created the refused directory"
        );
        assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
    }
}

#[test]
fn cleanup_removes_what_lbd_pinned_and_nothing_else() {
    let ns = Netns::new(&unique_name("pinown")).unwrap();
    let mut lbd = Lbd::start(&ns, "pinown", CONFIG, &[]).unwrap();
    let _pins = Scratch(lbd.pin_dir.clone());
    lbctl(&lbd.socket, &["drain", "web", "10.74.1.2:8080"]).unwrap();
    let drains = lb_userspace::instance::run_file(&lbd.pin_dir, "drains");
    assert!(drains.exists());
    lbd.kill();
    // Someone else's pinned map, and a directory, beside lbd's pins.
    let foreign = lbd.pin_dir.join("FOREIGN");
    std::fs::rename(lbd.pin_dir.join("BACKEND_STATS"), &foreign).unwrap();
    std::fs::create_dir(lbd.pin_dir.join("foreign-dir")).unwrap();

    let (status, err) = lbd.cleanup().unwrap();
    assert!(status.success(), "{err}");
    for name in ["SERVICES", "CONNTRACK", "LAYOUT", "links"] {
        assert!(!lbd.pin_dir.join(name).exists(), "{name} left behind");
    }
    assert!(foreign.exists(), "a pin lbd did not make was removed");
    assert!(lbd.pin_dir.join("foreign-dir").is_dir());
    assert!(!drains.exists(), "--cleanup kept the drains");
}

#[test]
fn pins_of_other_limits_or_of_the_wrong_type_are_refused() {
    let ns = Netns::new(&unique_name("pinmap")).unwrap();
    let mut lbd = Lbd::start_with(&ns, "pinmap", CONFIG, &[], &["--max-flows", "1000"]).unwrap();
    lbd.kill();
    let err = lbd.dir().join("second.err");
    let args = |flows: &'static str| -> Vec<std::ffi::OsString> {
        vec![
            "--config".into(),
            lbd.config.clone().into(),
            "--socket".into(),
            lbd.socket.clone().into(),
            "--pin-dir".into(),
            lbd.pin_dir.clone().into(),
            "--max-flows".into(),
            flows.into(),
        ]
    };
    let (other, same) = (args("2000"), args("1000"));

    let out = lbd_owned(&ns, &other, &err);
    refused("other --max-flows", &out);
    assert!(
        out.1.contains("CONNTRACK: max_entries 2000, expected 4000")
            && out.1.contains("--max-flows 1000")
            && out.1.contains("lbd --cleanup"),
        "{}",
        out.1
    );
    // Refused without touching the pins: the same limits adopt them.
    lbd.spawn(&ns, &[]).expect("lbd with the pins' limits");
    assert!(lbd.log().contains("adopted 1 services"), "{}", lbd.log());
    lbd.kill();

    // A map of another type under one of lbd's names.
    std::fs::remove_file(lbd.pin_dir.join("CONFIG")).unwrap();
    std::fs::rename(lbd.pin_dir.join("BACKENDS"), lbd.pin_dir.join("CONFIG")).unwrap();
    let out = lbd_owned(&ns, &same, &err);
    refused("a hash map pinned as CONFIG", &out);
    assert!(
        out.1.contains("CONFIG: type Hash, expected Array"),
        "{}",
        out.1
    );
}

fn lbd_owned(
    ns: &Netns,
    args: &[std::ffi::OsString],
    stderr: &Path,
) -> (Option<ExitStatus>, String) {
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    lbd(ns, &args, stderr)
}

/// `ip netns exec` gives lbd a mount namespace of its own with a fresh
/// /sys: pins made there would die with lbd.
#[test]
fn lbd_under_ip_netns_exec_is_refused_and_leaves_nothing() {
    let ns = Netns::new(&unique_name("pinexec")).unwrap();
    let name = unique_name("pinexec");
    let tmp = Scratch(std::env::temp_dir().join(&name));
    std::fs::create_dir_all(&tmp.0).unwrap();
    let pins = Scratch(PathBuf::from("/sys/fs/bpf").join(&name));
    let config = tmp.0.join("lbd.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let mounts_before = mounts_under(Path::new("/sys/fs/bpf"));
    let lbd_args = [
        "--config".into(),
        config.clone().into_os_string(),
        "--socket".into(),
        tmp.0.join("lbd.sock").into_os_string(),
        "--pin-dir".into(),
        pins.0.clone().into_os_string(),
    ];
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()])
        .arg(target_bin("lbd"))
        .args(&lbd_args);
    let out = run(cmd, &tmp.0.join("lbd.err"));
    refused("lbd under ip netns exec", &out);
    assert!(
        out.1.contains("would not outlive lbd") && out.1.contains("nsenter --net="),
        "{}",
        out.1
    );
    assert!(!pins.0.exists(), "pins left behind");
    assert_eq!(mounts_under(&pins.0), Vec::<String>::new());
    assert_eq!(mounts_under(&tmp.0), Vec::<String>::new());

    // Nor on a bpffs mounted inside, by a shell that then starts lbd.
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name(), "sh", "-c"])
        .arg(r#"mount -t bpf bpf /sys/fs/bpf && "$0" "$@""#)
        .arg(target_bin("lbd"))
        .args(&lbd_args);
    let out = run(cmd, &tmp.0.join("lbd.err"));
    refused("lbd on a bpffs private to ip netns exec", &out);
    assert!(
        out.1.contains("private to lbd's mount namespace") && out.1.contains("nsenter --net="),
        "{}",
        out.1
    );
    assert!(!pins.0.exists(), "pins left behind");
    assert_eq!(mounts_under(Path::new("/sys/fs/bpf")), mounts_before);
    remove_run_files(&pins.0);
}

#[test]
fn teardown_on_exit_removes_the_pins_and_the_drains() {
    let ns = Netns::new(&unique_name("pintear")).unwrap();
    let mut lbd = Lbd::start_with(&ns, "pintear", CONFIG, &[], &["--teardown-on-exit"]).unwrap();
    let _pins = Scratch(lbd.pin_dir.clone());
    lbctl(&lbd.socket, &["drain", "web", "10.74.1.3:8080"]).unwrap();
    let drains = lb_userspace::instance::run_file(&lbd.pin_dir, "drains");
    assert!(drains.exists());
    assert!(lbd.stop(), "lbd did not exit cleanly");
    assert!(!lbd.pin_dir.exists(), "pins left behind");
    assert!(!drains.exists(), "drains left behind");
}
