//! `cargo xtask vm-test`: the tests on a second kernel. Debian's 6.1 LTS
//! kernel (the one bookworm runs, without TCX links, with IPVS) boots in
//! qemu from an image made of Debian packages only, and runs the test
//! binaries of this build; their output and result come back over the
//! serial console, and a failure inside fails the command.
//!
//! The image (a debootstrap root with the kernel and its initramfs) is
//! cached under [`CACHE`], keyed by everything it is made from, so it is
//! rebuilt only when those change. The build's own files travel on a
//! second disk made for each run, mounted in the VM at the workspace's own
//! path, because the tests find their files by absolute path.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cargo;

/// Where images are kept, outside the workspace so that a fresh checkout
/// (CI's) finds the image an earlier one built.
const CACHE: &str = "/var/cache/lb-vm";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// What the VM has besides debootstrap's minbase: the kernel, whose
/// package brings the initramfs that loads virtio_blk, and what the tests
/// run besides their own binaries.
const VM_PACKAGES: &[&str] = &[
    "linux-image-cloud-amd64",
    "iproute2",
    "busybox-static",
    "iptables",
    "util-linux",
    "kmod",
    "procps",
    // Docker's own routing mesh for the side-by-side comparison
    // (swarm_ipvs). Docker itself comes with the provisioning script.
    "ipvsadm",
    "wrk",
];
/// The provisioning script of real nodes (vagrant/): its install phase
/// puts Docker and lbd's package into the image, and installs this build's
/// package again at every boot, offline, before the tests run.
const PROVISION: &str = include_str!("../../vagrant/provision.sh");
/// The VM's PID 1.
const INIT: &str = include_str!("vm/init.sh");
/// What the host needs to build and boot the image.
pub const HOST_PACKAGES: &[&str] = &["qemu-system-x86", "debootstrap", "e2fsprogs"];
/// The longest a whole run may take before the VM is stopped: emulated,
/// it is about ten times slower than this machine.
const RUN_LIMIT: Duration = Duration::from_secs(40 * 60);
const STATUS_LINE: &str = "LB-VM-STATUS ";
/// How much slower than this machine the emulated VM runs the tests
/// (loading the datapath took over 15 s there, against about 1 s here).
const TCG_SLOWDOWN: u32 = 10;

/// The test binaries of lb-tests that run in the VM, each with the
/// arguments it gets there (name filters), and whether a run without
/// `--only` (as `cargo xtask test` makes) includes it. Left out by default,
/// to keep `cargo xtask test` within its 45 minutes on 2 emulated cores:
/// the ICMP fixtures (105 s; the same program the other fixtures load),
/// the two-node Swarm (312 s) and the IPVS comparison, a benchmark as
/// much as a test.
struct Suite {
    name: &'static str,
    args: &'static [&'static str],
    default: bool,
}
const SUITES: &[Suite] = &[
    Suite {
        name: "fixtures",
        args: &[],
        default: true,
    },
    Suite {
        name: "fixtures_icmp",
        args: &[],
        default: false,
    },
    Suite {
        name: "fixtures_xdp",
        // By default the two that carry IPv4 and IPv6 through the XDP
        // program: whether 6.1's verifier takes it, and translates exactly.
        args: &["established_tcp_v4", "established_tcp_v6"],
        default: true,
    },
    Suite {
        name: "e2e",
        args: &[
            "tcp_is_balanced_and_backends_see_the_client",
            "udp_and_ipv6_services_work",
            "killing_and_restarting_lbd_under_load_loses_nothing",
            "the_netlink_attachment_serves_survives_a_restart_and_is_cleaned_up",
        ],
        default: true,
    },
    Suite {
        name: "docker_lb",
        args: &["two_node_swarm_reaches_tasks_through_either_node"],
        default: true,
    },
    Suite {
        name: "swarm_ipvs",
        // --nocapture: its table goes to the console, where boot() finds it.
        args: &["--ignored", "--nocapture"],
        default: false,
    },
];
/// The side-by-side table (tests/tests/swarm_ipvs.rs) comes on the console
/// as lines with this prefix; it goes into BENCHMARKS.md between these
/// markers.
const TABLE_PREFIX: &str = "SWARM-IPVS| ";
const TABLE_BEGIN: &str = "<!-- swarm-ipvs: begin -->";
const TABLE_END: &str = "<!-- swarm-ipvs: end -->";

/// Runs [`SUITES`] in the VM, or those named in `only`: `SUITE` runs the
/// suite's usual tests, `SUITE:FILTER` only those whose names hold FILTER
/// (one test to try on the second kernel without a whole suite's wait).
pub fn run(env: &cargo::Env, only: &[String]) -> Result<()> {
    crate::setup::ensure_packages(HOST_PACKAGES, &[], "vm-test")?;
    let mut suites: Vec<(&str, Vec<String>)> = Vec::new();
    for o in only {
        let (name, filter) = match o.split_once(':') {
            Some((name, filter)) => (name, Some(filter)),
            None => (o.as_str(), None),
        };
        let Some(Suite {
            name: suite, args, ..
        }) = SUITES.iter().find(|s| s.name == name)
        else {
            bail!("no VM suite {name:?} (suites: {})", suite_names());
        };
        let args = match filter {
            // The suite's flags stay; the filter takes its names' place.
            Some(f) => args
                .iter()
                .filter(|a| a.starts_with('-'))
                .map(|a| a.to_string())
                .chain([f.to_string()])
                .collect(),
            None => args.iter().map(|a| a.to_string()).collect(),
        };
        suites.push((suite, args));
    }
    if only.is_empty() {
        suites = SUITES
            .iter()
            .filter(|s| s.default)
            .map(|s| (s.name, s.args.iter().map(|a| a.to_string()).collect()))
            .collect();
    }
    let built = build(env)?;
    crate::man::run(&cargo::workspace_root().join("target/release"))?;
    let deb = crate::package::run(&cargo::workspace_root())?;
    let image = image(&deb)?;
    let kvm = kvm_works();
    if !kvm {
        println!("vm: KVM does not work here; emulating (TCG)");
    }
    let payload = payload(&built, &suites, &deb, kvm)?;
    // The comparison's table goes into BENCHMARKS.md when it was asked for
    // by name, as a benchmark is; a test run only shows it.
    let record = only.iter().any(|o| o == "swarm_ipvs");
    boot(&image, &payload, kvm, record)
}

fn suite_names() -> String {
    SUITES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

/// The cached image: its directory holds `base.img`, `vmlinuz` and
/// `initrd.img`. Built when missing, with the provisioning script's install
/// phase run on `deb` (the package of the build at hand; each boot installs
/// the current one, so it is not an input of the cache).
fn image(deb: &Path) -> Result<PathBuf> {
    let mut hasher = DefaultHasher::new();
    (SUITE, MIRROR, VM_PACKAGES, INIT, PROVISION).hash(&mut hasher);
    let dir = Path::new(CACHE).join(format!("bookworm-{:016x}", hasher.finish()));
    if dir.join("ready").exists() {
        println!("vm: image {}", dir.display());
        return Ok(dir);
    }
    // Earlier images are of other inputs: nothing will use them again.
    let _ = std::fs::remove_dir_all(CACHE);
    let root = dir.join("root");
    std::fs::create_dir_all(&root)?;
    println!("vm: building the image in {} (debootstrap)", dir.display());
    let started = Instant::now();
    cargo::run(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", VM_PACKAGES.join(",")))
            .args([SUITE, &root.to_string_lossy(), MIRROR]),
    )?;
    provision(&root, deb)?;
    let init = root.join("sbin/lb-vm-init");
    std::fs::write(&init, INIT)?;
    cargo::run(Command::new("chmod").arg("755").arg(&init))?;
    for (prefix, name) in [("vmlinuz-", "vmlinuz"), ("initrd.img-", "initrd.img")] {
        let found = std::fs::read_dir(root.join("boot"))?
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .with_context(|| format!("no /boot/{prefix}* in the image"))?;
        std::fs::copy(found.path(), dir.join(name))?;
    }
    mkfs(&root, "lbroot", 3072, &dir.join("base.img"))?;
    std::fs::remove_dir_all(&root)?;
    std::fs::write(dir.join("ready"), "")?;
    println!("vm: image built in {:.0?}", started.elapsed());
    Ok(dir)
}

/// `provision.sh install` in the image's root, as on a node just made: it
/// fetches Docker from the Debian mirror, so the root gets the host's
/// resolver and /proc for the time being.
fn provision(root: &Path, deb: &Path) -> Result<()> {
    std::fs::write(root.join("tmp/provision.sh"), PROVISION)?;
    std::fs::copy(deb, root.join("tmp/lb.deb"))?;
    std::fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf"))?;
    let proc = root.join("proc");
    cargo::run(
        Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(&proc),
    )?;
    let status = Command::new("chroot")
        .arg(root)
        .args(["/bin/sh", "/tmp/provision.sh", "install", "/tmp/lb.deb"])
        .status();
    let _ = Command::new("umount").arg("-l").arg(&proc).status();
    for f in ["tmp/provision.sh", "tmp/lb.deb", "etc/resolv.conf"] {
        let _ = std::fs::remove_file(root.join(f));
    }
    let status = status.context("chroot")?;
    if !status.success() {
        bail!("provision.sh install in the image failed ({status})");
    }
    Ok(())
}

/// An ext4 file system image of `dir`'s contents, made without mounting
/// anything.
fn mkfs(dir: &Path, label: &str, size_mib: u64, out: &Path) -> Result<()> {
    let _ = std::fs::remove_file(out);
    cargo::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", label, "-d"])
            .arg(dir)
            .arg(out)
            .arg(format!("{size_mib}M")),
    )
}

/// The disk of this build's files: the workspace's files the tests read,
/// the release binaries, the test binaries of [`SUITES`] and the script
/// that runs them, laid out as in the workspace.
fn payload(
    built: &[PathBuf],
    suites: &[(&str, Vec<String>)],
    deb: &Path,
    kvm: bool,
) -> Result<PathBuf> {
    let root = cargo::workspace_root();
    let vm = root.join("target/vm");
    let stage = vm.join("payload");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(stage.join("target/release/deps"))?;
    std::fs::create_dir_all(stage.join(".lb-vm"))?;
    for dir in ["dist", "tests", "vagrant"] {
        cargo::run(
            Command::new("cp")
                .arg("-a")
                .arg(root.join(dir))
                .arg(stage.join(dir)),
        )?;
    }
    // Every binary of the build (lbd, lbctl, the tests' servers).
    for entry in std::fs::read_dir(root.join("target/release"))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        use std::os::unix::fs::PermissionsExt;
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            std::fs::copy(
                entry.path(),
                stage.join("target/release").join(entry.file_name()),
            )?;
        }
    }
    // Waits for readiness stretch by this much (tests/src/process.rs).
    let scale = if kvm { 2 } else { TCG_SLOWDOWN };
    let mut script = format!("status=0\nexport LB_TEST_TIME_SCALE={scale}\n");
    // This build's package, installed by the provisioning script as on a
    // node (offline: what it needs is in the image), then checked.
    let name = deb.file_name().context("the package's name")?;
    std::fs::create_dir_all(stage.join("target/package"))?;
    std::fs::copy(deb, stage.join("target/package").join(name))?;
    script += &format!(
        "echo \"== provision.sh install\"\n\
         if sh vagrant/provision.sh install target/package/{name} \\\n\
            && [ \"$(/usr/sbin/lbd --version)\" = \"$(target/release/lbd --version)\" ] \\\n\
            && [ -e /etc/systemd/system/multi-user.target.wants/lbd.service ] \\\n\
            && [ -e /etc/systemd/system/multi-user.target.wants/docker.service ]; then\n\
             echo \"provision: ok, $(/usr/sbin/lbd --version) installed and enabled\"\n\
         else\n\
             echo \"provision: FAILED\"; status=1\n\
         fi\n",
        name = name.to_string_lossy()
    );
    for (suite, args) in suites {
        let exe = test_executable(built, suite)?;
        let name = exe.file_name().context("test binary without a name")?;
        std::fs::copy(&exe, stage.join("target/release/deps").join(name))?;
        let exe = Path::new("target/release/deps").join(name);
        script += &format!(
            "echo \"== {suite}\"\n\
             ./{} --test-threads=1 {} || status=1\n",
            exe.display(),
            args.join(" ")
        );
    }
    script += "exit $status\n";
    std::fs::write(stage.join(".lb-vm/run"), script)?;
    let used = cargo::output(Command::new("du").args(["-sm"]).arg(&stage))?;
    let used: u64 = used
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du's output")?;
    let disk = vm.join("payload.img");
    mkfs(&stage, "lbpayload", used + used / 4 + 64, &disk)?;
    Ok(disk)
}

/// Builds the release binaries and test binaries (as `cargo xtask test`
/// does) and returns the test binaries' paths, from cargo's own report of
/// what it built.
fn build(env: &cargo::Env) -> Result<Vec<PathBuf>> {
    let out = cargo::cargo(env)
        .args(["build", "--release"])
        .args(cargo::WORKSPACE)
        .args(["--bins", "--tests", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        bail!("cargo build failed ({})", out.status);
    }
    // One JSON object per line; a test target's carries "executable".
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = start + l[start..].find('"')?;
            Some(PathBuf::from(&l[start..end]))
        })
        .collect())
}

/// The test binary `name` among `built` (cargo names it `<name>-<hash>`).
fn test_executable(built: &[PathBuf], name: &str) -> Result<PathBuf> {
    built
        .iter()
        .find(|p| {
            p.parent().is_some_and(|d| d.ends_with("deps"))
                && p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with(&format!("{name}-")))
        })
        .cloned()
        .with_context(|| format!("no test binary {name} in the build"))
}

/// Boots the image with the payload, shows the console, and fails unless
/// the VM reports that every suite passed.
fn boot(image: &Path, payload: &Path, kvm: bool, record: bool) -> Result<()> {
    let workspace = cargo::workspace_root();
    let started = Instant::now();
    let accel: &[&str] = if kvm {
        &["-accel", "kvm", "-cpu", "host"]
    } else {
        &["-accel", "tcg", "-cpu", "max"]
    };
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(accel)
        .args(["-machine", "q35", "-smp", "2", "-m", "3072"])
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.join("initrd.img"))
        .arg("-append")
        .arg(format!(
            "root=LABEL=lbroot rw console=ttyS0 init=/sbin/lb-vm-init panic=-1 quiet \
             lb.workspace={}",
            workspace.display()
        ))
        // snapshot=on: the VM's writes go to a temporary file, so the
        // cached image stays as built.
        .arg("-drive")
        .arg(drive(&image.join("base.img")))
        .arg("-drive")
        .arg(drive(payload))
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = qemu.stdout.take().context("qemu's output")?;
    let pid = qemu.id();
    // The console is read on this thread; this one stops a VM that hangs.
    std::thread::spawn(move || {
        std::thread::sleep(RUN_LIMIT);
        eprintln!("vm: no result after {RUN_LIMIT:?}; stopping the VM");
        let _ = Command::new("kill").arg(pid.to_string()).status();
    });
    let mut status = None;
    let mut table = Vec::new();
    let mut kernel = String::new();
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).into_owned();
        let line = line.trim_end_matches('\r');
        writeln!(out, "{line}")?;
        if let Some(code) = line.strip_prefix(STATUS_LINE) {
            status = code.trim().parse::<i32>().ok();
        }
        if let Some(row) = line.strip_prefix(TABLE_PREFIX) {
            table.push(row.to_string());
        }
        // The first console line starts with the terminal's reset codes.
        if let Some((_, rest)) = line.split_once("lb-vm: kernel ") {
            kernel = rest.split(',').next().unwrap_or_default().to_string();
        }
    }
    let _ = qemu.wait();
    println!("vm: {:.0?} from boot to power-off", started.elapsed());
    if record && !table.is_empty() {
        let how = if kvm { "KVM" } else { "TCG, emulated" };
        record_table(&table, &format!("kernel {kernel}, {how}"))?;
    }
    match status {
        Some(0) => Ok(()),
        Some(code) => bail!("the tests in the VM failed (status {code})"),
        None => bail!("the VM stopped without a result"),
    }
}

/// Puts the side-by-side table into BENCHMARKS.md, replacing the one there.
/// How to read the table, under it.
const NOTE: &str = "Under emulation, requests/s and latencies are those of one emulated CPU pair \
shared by both nodes, their engines, the client and lbd's own control plane (a Swarm \
resync every second on each node, which IPVS does not need); compare the two columns \
of one run, not these figures with the other sections.";

fn record_table(rows: &[String], machine: &str) -> Result<()> {
    let path = cargo::workspace_root().join("BENCHMARKS.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_default();
    let section = format!(
        "{TABLE_BEGIN}\n\
         ## Swarm's routing mesh: Docker's IPVS and lbd side by side\n\n\
         Command: `cargo xtask vm-test --only swarm_ipvs`  \n\
         Measured {} ({machine}; a 2-node Swarm of network namespaces with a dockerd \
         each, inside one VM; `cargo xtask bench` keeps this section).\n\n{}\n\n{NOTE}\n{TABLE_END}",
        date()?,
        rows.join("\n")
    );
    let doc = match (doc.find(TABLE_BEGIN), doc.find(TABLE_END)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{section}{}", &doc[..a], &doc[b + TABLE_END.len()..])
        }
        _ => format!("{}\n\n{section}\n", doc.trim_end()),
    };
    std::fs::write(&path, doc)?;
    println!("vm: the side-by-side table is in {}", path.display());
    Ok(())
}

fn date() -> Result<String> {
    Ok(cargo::output(Command::new("date").arg("+%Y-%m-%d"))?
        .trim()
        .to_string())
}

/// Whether a KVM guest starts here: where /dev/kvm exists but cannot run
/// a guest (nested virtualisation without the MSRs qemu sets, say), qemu
/// aborts at once, which `-accel kvm -accel tcg` does not catch. A VM that
/// is still up, stopped at its first instruction, after a second works.
fn kvm_works() -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let probe = Command::new("timeout")
        .args(["1", "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host"])
        .args(["-m", "64", "-S", "-nodefaults", "-display", "none"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    // timeout(1) says 124 when it had to stop the command.
    probe.is_ok_and(|s| s.code() == Some(124))
}

fn drive(path: &Path) -> String {
    format!("file={},if=virtio,format=raw,snapshot=on", path.display())
}
