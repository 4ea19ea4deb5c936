//! Forwarding rate: a generator namespace sends UDP through the
//! load-balancer namespace to a sink namespace whose XDP program counts and
//! drops, with the same generator for every system.
//!
//! ```text
//!  gen ns                   lb ns                         sink ns
//!  eth0 10.74.0.2 ---- bx-in 10.74.0.1
//!   trafgen (CPU 0)        bx-out 10.75.0.1 ---------- eth0 10.75.0.2
//!                          (threaded NAPI, CPU 1)        XDP: count, drop
//! ```
//!
//! trafgen sends real skbs, so every system (XDP, TC, netfilter) sees the
//! same packets. The LB's ingress veth polls in a NAPI kernel thread pinned
//! to the other CPU, so the forwarder does not share a core with the
//! generator, and that thread's run time is the forwarding work plus the
//! delivery into the sink, the same for every system.

use std::fmt::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use lb_tests::lbd::Lbd;
use lb_tests::netns::{unique_name, Netns};
use lb_tests::process::{wait_until, ChildGuard};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::report::{self, human, ratio, thousands, Goal, Section, Table};
use crate::sys::{self, napi_threads, pin, thread_runtime};
use crate::xdp::{Forwarder, Sink};
use crate::{goal_not_measured, Config};

const IN_DEV: &str = "bx-in";
const OUT_DEV: &str = "bx-out";
const GEN_MAC: [u8; 6] = [2, 0, 0, 0x74, 0, 2];
const IN_MAC: [u8; 6] = [2, 0, 0, 0x74, 0, 1];
const OUT_MAC: [u8; 6] = [2, 0, 0, 0x75, 0, 1];
const SINK_MAC: [u8; 6] = [2, 0, 0, 0x75, 0, 2];
const SINK_V4: &str = "10.75.0.2";
/// Flows: 16 source addresses × 4,096 source ports, drawn at random per packet.
const FLOWS: u32 = 16 * 4096;
/// A rate above anything trafgen reaches here: the unthrottled run. Also
/// what bounds the packet count of a run, should the timer that stops it fail.
const MAX_PPS: u64 = 5_000_000;

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The frontend of service `i` (1-based): 10.76.x.y.
fn vip(i: u32) -> String {
    let [_, _, a, b] = i.to_be_bytes();
    format!("10.76.{a}.{b}")
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum System {
    XdpBare,
    KernelForward,
    Ours(u32),
    Iptables(u32),
    Nftables(u32),
    /// Ours with the XDP fast path on both of the LB's interfaces
    /// (`lbd --xdp`): trafgen's frames carry complete checksums, as a
    /// NIC's do, and the sink's veth has an XDP program, so it takes
    /// redirected frames.
    OursXdp(u32),
    /// Ours with `--no-redirect-peer`: translated packets are transmitted
    /// on the LB's veth to the sink instead of handed to the sink's
    /// interface directly (`bpf_redirect_peer`), which is what the other
    /// rows of ours do, the sink being a namespace of its own at the far
    /// end of a veth, as a local container is.
    OursVeth(u32),
    /// The same three with a new flow in every packet, where rules are
    /// walked (iptables) and conntrack entries made (all three), and ours
    /// with XDP, whose new flows all pass to TC.
    OursNew(u32),
    IptablesNew(u32),
    NftablesNew(u32),
    OursXdpNew(u32),
}

impl System {
    fn name(self) -> String {
        let svc = |n: u32| {
            if n == 1 {
                "1 service".to_string()
            } else {
                format!("{} services", thousands(n as u64))
            }
        };
        match self {
            System::XdpBare => "bare XDP redirect (no lookup, no NAT)".into(),
            System::KernelForward => "kernel forwarding, no NAT".into(),
            System::Ours(n) => format!("our load balancer, {}", svc(n)),
            System::Iptables(n) => format!("iptables DNAT, {}", svc(n)),
            System::Nftables(n) => format!("nftables DNAT map, {}", svc(n)),
            System::OursXdp(n) => format!("our load balancer with XDP, {}", svc(n)),
            System::OursVeth(n) => format!(
                "our load balancer, {}, transmitting on the veth (--no-redirect-peer)",
                svc(n)
            ),
            other => format!("{}, a new flow per packet", other.base().name()),
        }
    }

    /// The system that carries the traffic.
    fn base(self) -> System {
        match self {
            System::OursNew(n) => System::Ours(n),
            System::IptablesNew(n) => System::Iptables(n),
            System::NftablesNew(n) => System::Nftables(n),
            System::OursXdpNew(n) => System::OursXdp(n),
            other => other,
        }
    }

    fn new_flows(self) -> bool {
        self != self.base()
    }

    /// Our load balancer carrying the same traffic: what a row is compared with.
    fn reference(self) -> System {
        match self {
            System::XdpBare | System::KernelForward => System::Ours(1),
            System::Ours(n)
            | System::Iptables(n)
            | System::Nftables(n)
            | System::OursXdp(n)
            | System::OursVeth(n) => System::Ours(n),
            System::OursNew(n)
            | System::IptablesNew(n)
            | System::NftablesNew(n)
            | System::OursXdpNew(n) => System::OursNew(n),
        }
    }

    /// Where the generator sends: the sink itself, or the last service.
    fn destination(self) -> String {
        match self {
            System::XdpBare | System::KernelForward => SINK_V4.into(),
            System::Ours(n)
            | System::Iptables(n)
            | System::Nftables(n)
            | System::OursXdp(n)
            | System::OursVeth(n) => vip(n),
            other => other.base().destination(),
        }
    }
}

/// One system's figures.
#[derive(Clone, Debug)]
struct Rate {
    system: System,
    /// What the generator put on the wire, per second.
    offered: f64,
    /// What reached the sink, per second.
    delivered: f64,
    /// What reached the sink per second at the fixed rate.
    fixed_delivered: f64,
    /// Run time of the LB's NAPI thread per delivered packet, at the fixed rate.
    cpu_per_packet: Option<Duration>,
}

impl Rate {
    /// Packets per second the forwarder would carry with its core to itself.
    fn capacity(&self) -> Option<f64> {
        self.cpu_per_packet
            .filter(|d| !d.is_zero())
            .map(|d| 1.0 / d.as_secs_f64())
    }
}

/// Three namespaces wired gen -> lb -> sink; removed on drop.
struct Chain {
    generator: Netns,
    lb: Netns,
    sink: Netns,
    /// Declared after the namespaces would make them drop first; the XDP
    /// program must go before its namespace, so it is an Option taken in Drop.
    counter: Option<Sink>,
    dir: PathBuf,
}

impl Drop for Chain {
    fn drop(&mut self) {
        self.counter.take();
        for ns in [&self.generator, &self.lb, &self.sink] {
            sys::kill_processes_in(&ns.path());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Chain {
    fn new() -> Result<Chain> {
        let generator = Netns::new(&unique_name("bf-g"))?;
        let lb = Netns::new(&unique_name("bf-lb"))?;
        let sink = Netns::new(&unique_name("bf-s"))?;
        let dir = std::env::temp_dir().join(unique_name("bf"));
        std::fs::create_dir_all(&dir)?;
        let mut chain = Chain {
            generator,
            lb,
            sink,
            counter: None,
            dir,
        };
        chain.wire()?;
        Ok(chain)
    }

    fn wire(&mut self) -> Result<()> {
        let (g, lb, s) = (&self.generator, &self.lb, &self.sink);
        for (dev, dev_mac, peer, peer_mac) in [
            (IN_DEV, IN_MAC, g, GEN_MAC),
            (OUT_DEV, OUT_MAC, s, SINK_MAC),
        ] {
            lb.ip(&[
                "link",
                "add",
                "name",
                dev,
                "address",
                &mac(dev_mac),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "address",
                &mac(peer_mac),
                "netns",
                peer.name(),
            ])?;
        }
        g.ip(&["addr", "add", "10.74.0.2/24", "dev", "eth0"])?;
        lb.ip(&["addr", "add", "10.74.0.1/24", "dev", IN_DEV])?;
        lb.ip(&["addr", "add", "10.75.0.1/24", "dev", OUT_DEV])?;
        s.ip(&["addr", "add", "10.75.0.2/24", "dev", "eth0"])?;
        for (ns, dev) in [(g, "eth0"), (lb, IN_DEV), (lb, OUT_DEV), (s, "eth0")] {
            ns.ip(&["link", "set", dev, "up"])?;
        }
        // veth hands a packet to the peer's NAPI poll (rather than to the
        // sending CPU's backlog) only if the sender does no TSO.
        g.sh("ethtool -K eth0 tso off")?;
        lb.sysctl("net.ipv4.ip_forward", "1")?;
        // The generator's source addresses exist nowhere; only the
        // reverse-path filter would care.
        lb.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        lb.sysctl(&format!("net.ipv4.conf.{IN_DEV}.rp_filter"), "0")?;
        // No ARP in the measured path, for any system.
        lb.ip(&[
            "neigh",
            "replace",
            SINK_V4,
            "lladdr",
            &mac(SINK_MAC),
            "dev",
            OUT_DEV,
            "nud",
            "permanent",
        ])?;
        let counter = Sink::attach(s, "eth0")?;
        self.counter = Some(counter);
        Ok(())
    }

    fn sink(&self) -> &Sink {
        self.counter.as_ref().expect("attached in new()")
    }
}

/// Turns on NAPI (GRO) and threaded polling for `dev` in `ns` and returns the
/// polling threads, all pinned to `cpu`.
fn threaded_napi(ns: &Netns, dev: &str, cpu: usize) -> Result<Vec<u32>> {
    // veth polls (NAPI) only with XDP attached or GRO on; without it the
    // packet would be processed on the sender's CPU.
    ns.sh(&format!("ethtool -K {dev} gro on"))?;
    ns.sh(&format!("echo 1 > /sys/class/net/{dev}/threaded"))?;
    let mut threads: Vec<u32> = Vec::new();
    wait_until(Duration::from_secs(2), "NAPI threads", || {
        threads = napi_threads(dev);
        !threads.is_empty()
    })
    .with_context(|| format!("no threaded NAPI for {dev} in {}", ns.name()))?;
    for &t in &threads {
        pin(t, cpu)?;
    }
    Ok(threads)
}

fn read_counter(ns: &Netns, dev: &str, name: &str) -> Result<u64> {
    let out = ns.sh(&format!("cat /sys/class/net/{dev}/statistics/{name}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// lbd's configuration: `n` UDP services, each to the sink.
fn lbd_config(n: u32) -> String {
    let mut s = String::new();
    for i in 1..=n {
        let _ = writeln!(
            s,
            "[[service]]\nname = \"s{i}\"\nfrontend = \"{}:80/udp\"\nbackends = [\"{SINK_V4}:80\"]\n",
            vip(i)
        );
    }
    s
}

/// kube-proxy's shape: a chain with one rule per service, the one the traffic
/// hits last.
fn iptables_rules(n: u32) -> String {
    let mut s = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n:BENCH-SERVICES - [0:0]\n-A PREROUTING -j BENCH-SERVICES\n",
    );
    for i in 1..=n {
        let _ = writeln!(
            s,
            "-A BENCH-SERVICES -d {}/32 -p udp -m udp --dport 80 -j DNAT --to-destination {SINK_V4}:80",
            vip(i)
        );
    }
    s.push_str("COMMIT\n");
    s
}

/// One map lookup, whatever the number of services.
fn nft_rules(n: u32) -> String {
    let elements: Vec<String> = (1..=n)
        .map(|i| format!("{} . 80 : {SINK_V4} . 80", vip(i)))
        .collect();
    format!(
        "table ip bench {{\n  map services {{\n    type ipv4_addr . inet_service : ipv4_addr . inet_service\n    \
         elements = {{ {} }}\n  }}\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
         meta l4proto udp dnat ip to ip daddr . udp dport map @services\n  }}\n}}\n",
        elements.join(",\n      ")
    )
}

/// What keeps a system in place while it is measured; dropping it removes
/// the system (rules go with the namespace).
#[derive(Default)]
struct Installed {
    _xdp: Option<Forwarder>,
    _lbd: Option<Lbd>,
}

fn install(chain: &Chain, system: System) -> Result<Installed> {
    let lb = &chain.lb;
    Ok(match system.base() {
        System::XdpBare => Installed {
            _xdp: Some(Forwarder::attach(lb, IN_DEV, OUT_DEV, SINK_MAC, OUT_MAC)?),
            ..Default::default()
        },
        System::KernelForward => Installed::default(),
        System::Ours(n) | System::OursXdp(n) | System::OursVeth(n) => {
            let xdp = format!("{IN_DEV},{OUT_DEV}");
            let extra: &[&str] = match system.base() {
                System::OursXdp(_) => &["--xdp", &xdp],
                System::OursVeth(_) => &["--no-redirect-peer"],
                _ => &[],
            };
            let lbd = Lbd::start_with(lb, "bf-lbd", &lbd_config(n), &[IN_DEV, OUT_DEV], extra)?;
            let xdp_on = lbd.status()?["xdp"].as_array().map_or(0, Vec::len);
            if system.base() == System::OursXdp(n) && xdp_on != 2 {
                anyhow::bail!("lbd did not attach XDP to both interfaces:\n{}", lbd.log());
            }
            wait_until(
                Duration::from_secs(30),
                "lbd to apply every service",
                || {
                    lbd.status()
                        .ok()
                        .and_then(|s| s["services"].as_array().map(|a| a.len()))
                        == Some(n as usize)
                },
            )?;
            Installed {
                _lbd: Some(lbd),
                ..Default::default()
            }
        }
        System::Iptables(n) => {
            let file = chain.dir.join("iptables.rules");
            std::fs::write(&file, iptables_rules(n))?;
            lb.sh(&format!("iptables-restore < {}", file.display()))?;
            Installed::default()
        }
        System::Nftables(n) => {
            let file = chain.dir.join("nft.rules");
            std::fs::write(&file, nft_rules(n))?;
            lb.sh(&format!("nft -f {}", file.display()))?;
            Installed::default()
        }
        other => unreachable!("{other:?} is a base system"),
    })
}

fn trafgen_config(dst: &str, new_flows: bool) -> String {
    // 16 × 4,096 flows, or a flow space (16 × 256 addresses × 64,512 ports)
    // that a run never comes close to exhausting.
    let (addr, sport) = if new_flows {
        ("sa[2]=drnd(), sa[3]=drnd(10, 25)", "dinc(1024, 65535)")
    } else {
        ("sa[3]=drnd(10, 25)", "drnd(1024, 5119)")
    };
    format!(
        "{{\n  eth(da={}, sa={}, type=0x0800),\n  \
         ipv4(sa=10.74.0.10, da={dst}, ttl=64, {addr}),\n  \
         udp(sp={sport}, dp=80),\n  fill(0x00, 18)\n}}\n",
        mac(IN_MAC),
        mac(GEN_MAC)
    )
}

fn cpus() -> (usize, usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // trafgen -P 1 runs on CPU 0; the forwarder gets the last one.
    (0, cores - 1)
}

/// What one trafgen run through a chain gave.
struct Sample {
    offered: f64,
    delivered: f64,
    cpu: Duration,
    delivered_packets: u64,
}

/// Stops trafgen and the sender it forked: SIGINT (its own way to stop),
/// then SIGKILL for whatever is left of the group.
fn stop_group(gen: &mut ChildGuard) {
    let group = Pid::from_raw(gen.pid() as i32);
    let _ = killpg(group, Signal::SIGINT);
    let _ = wait_until(Duration::from_secs(3), "trafgen to stop", || {
        gen.try_wait().is_some()
    });
    let _ = killpg(group, Signal::SIGKILL);
    gen.terminate();
}

/// Sends at `rate` packets per second for a warm-up and a measured window.
fn blast(
    chain: &Chain,
    config: &Config,
    system: System,
    rate: u64,
    lb_threads: &[u32],
) -> Result<Sample> {
    let cfg = chain.dir.join("trafgen.cfg");
    std::fs::write(
        &cfg,
        trafgen_config(&system.destination(), system.new_flows()),
    )?;
    let total = config.fwd_warmup + config.fwd_window;
    let max_packets = rate * (total.as_secs() + 2);
    let log_path = chain.dir.join("trafgen.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = chain.generator.command("trafgen");
    cmd.args(["--dev", "eth0", "--conf"])
        .arg(&cfg)
        .args(["--cpus", "1", "--num", &max_packets.to_string()])
        // A rate makes trafgen send with blocking writes, so a forwarder
        // slower than the generator slows it down instead of failing its
        // non-blocking ring flush.
        .args(["--rate", &format!("{rate}pps")])
        // Leave the machine's IRQ affinities and socket memory alone.
        .args(["--notouch-irq", "--no-sock-mem"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // trafgen sends from a forked child: a group of their own lets both
        // be stopped together.
        .process_group(0);
    let mut gen = ChildGuard::spawn(&mut cmd)?;

    std::thread::sleep(config.fwd_warmup);
    let sink = chain.sink();
    let cpu =
        |threads: &[u32]| -> Result<Duration> { threads.iter().map(|&t| thread_runtime(t)).sum() };
    let tx0 = read_counter(&chain.generator, "eth0", "tx_packets")?;
    let (s0, c0, t0) = (sink.packets()?, cpu(lb_threads)?, Instant::now());
    std::thread::sleep(config.fwd_window);
    let (s1, c1, t1) = (sink.packets()?, cpu(lb_threads)?, Instant::now());
    let tx1 = read_counter(&chain.generator, "eth0", "tx_packets")?;
    let still_running = gen.try_wait().is_none();
    stop_group(&mut gen);
    if !still_running {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        bail!("trafgen stopped before the window ended: {}", log.trim());
    }
    let secs = (t1 - t0).as_secs_f64();
    let delivered = s1.saturating_sub(s0);
    if delivered == 0 {
        let stats = chain
            .lb
            .sh(&format!("ethtool -S {IN_DEV}; ethtool -S {OUT_DEV}"))
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        bail!("no packet reached the sink; the LB's veth counters:\n{stats}");
    }
    Ok(Sample {
        offered: tx1.saturating_sub(tx0) as f64 / secs,
        delivered: delivered as f64 / secs,
        cpu: c1.saturating_sub(c0),
        delivered_packets: delivered,
    })
}

/// Two runs on one chain: as fast as the generator goes (what reaches the
/// sink), then at a fixed rate every system sustains (what each packet costs
/// the forwarder, compared at the same load, so the same batching).
fn measure(config: &Config, system: System) -> Result<Rate> {
    let chain = Chain::new()?;
    let (_, fwd_cpu) = cpus();
    // The sink polls in softirq, which the forwarder's thread raises and
    // runs itself: so its run time covers the whole delivery, and the sink
    // never waits for a CPU (a sink thread of its own, on the forwarder's
    // CPU, waited for scheduler slices and its veth ring overflowed).
    let installed = install(&chain, system)?;
    let lb_threads = threaded_napi(&chain.lb, IN_DEV, fwd_cpu)?;
    let full = blast(&chain, config, system, MAX_PPS, &lb_threads)?;
    let fixed = blast(&chain, config, system, config.fwd_fixed_rate, &lb_threads)?;
    drop(installed);
    Ok(Rate {
        system,
        offered: full.offered,
        delivered: full.delivered,
        fixed_delivered: fixed.delivered,
        cpu_per_packet: Some(fixed.cpu / fixed.delivered_packets.max(1) as u32),
    })
}

/// The mean of one system's rounds.
fn mean(rounds: &[Rate]) -> Option<Rate> {
    let first = rounds.first()?;
    let n = rounds.len() as f64;
    let cpu: Vec<Duration> = rounds.iter().filter_map(|r| r.cpu_per_packet).collect();
    Some(Rate {
        system: first.system,
        offered: rounds.iter().map(|r| r.offered).sum::<f64>() / n,
        delivered: rounds.iter().map(|r| r.delivered).sum::<f64>() / n,
        fixed_delivered: rounds.iter().map(|r| r.fixed_delivered).sum::<f64>() / n,
        cpu_per_packet: (!cpu.is_empty()).then(|| cpu.iter().sum::<Duration>() / cpu.len() as u32),
    })
}

pub fn run(config: &Config, plot_dir: &Path, command: &str) -> (Section, Vec<Goal>) {
    const TITLE: &str = "Forwarding rate";
    let goals_wanted = [
        "forwarding rate >= 80% of bare XDP",
        ">= 1.2x iptables DNAT with 1 service (established flows)",
        ">= 1.2x iptables DNAT with 1,000 services (established flows)",
        ">= 10x iptables DNAT with 1,000 services (a new flow per packet)",
    ];
    if let Some(why) = crate::missing_programs(&["trafgen", "ethtool", "iptables-restore", "nft"]) {
        return (
            crate::not_measured(TITLE, command, why.clone()),
            goals_wanted
                .iter()
                .map(|g| goal_not_measured(g, &why))
                .collect(),
        );
    }
    let n = config.fwd_services;
    let systems = [
        System::XdpBare,
        System::KernelForward,
        System::Ours(1),
        System::OursVeth(1),
        System::OursXdp(1),
        System::Iptables(1),
        System::Nftables(1),
        System::Ours(n),
        System::OursXdp(n),
        System::Iptables(n),
        System::Nftables(n),
        System::OursNew(n),
        System::OursXdpNew(n),
        System::IptablesNew(n),
        System::NftablesNew(n),
    ];
    let mut section = Section {
        title: TITLE.into(),
        command: command.into(),
        ..Default::default()
    };
    let systems: Vec<System> = systems
        .into_iter()
        .filter(|s| config.wants(&s.name()))
        .collect();
    let mut runs: Vec<Vec<Rate>> = vec![Vec::new(); systems.len()];
    for round in 1..=config.fwd_rounds {
        for (i, &system) in systems.iter().enumerate() {
            eprintln!("lb-bench: forward: {} (round {round})", system.name());
            match measure(config, system) {
                Ok(r) => runs[i].push(r),
                Err(e) => section
                    .not_measured
                    .push(format!("{} (round {round}): {e:#}", system.name())),
            }
        }
    }
    let rates: Vec<Rate> = runs.iter().filter_map(|r| mean(r)).collect();
    let iptables_version = Netns::new(&unique_name("bf-v"))
        .and_then(|ns| ns.sh("iptables -V"))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "iptables".into());
    section.text.push(format!(
        "Generator: `trafgen --cpus 1` (netsniff-ng) on CPU 0, 60-byte UDP frames over \
         {} flows (16 source addresses × 4,096 source ports, drawn at random per packet). \
         Each system gets a fresh gen → LB → sink chain of veth pairs. The LB's ingress \
         veth polls in threaded NAPI, pinned to CPU {}; the sink's veth polls in the softirq \
         that thread raises, and the sink's XDP program counts and drops (its TC program \
         counts what our load balancer hands to the sink's interface directly). Each system runs \
         {:.1} s after a {:.1} s warm-up, {} time(s) in turn with the others; the table gives \
         the mean. Systems with services get 1 or {} of them and the traffic goes to the \
         last one. iptables is `{}`, one DNAT rule per service in a chain jumped to from \
         PREROUTING (kube-proxy's layout); nftables uses one `dnat ... map` lookup; both \
         translate only a flow's first packet and conntrack the rest, so the \
         rows marked *a new flow per packet* (every source address and port fresh) are \
         where the number of rules shows.",
        thousands(FLOWS as u64),
        cpus().1,
        config.fwd_window.as_secs_f64(),
        config.fwd_warmup.as_secs_f64(),
        config.fwd_rounds,
        thousands(n as u64),
        iptables_version,
    ));
    section.text.push(format!(
        "Each system is run twice on its chain. First trafgen sends as fast as it can \
         (*offered*), and *delivered* is what reached the sink per second. That figure is \
         bounded by the one generator core, and how fast trafgen goes also depends on when \
         the forwarding path releases its packets (the kernel path at IP input, TC and XDP \
         only at the sink, which throttles trafgen through its socket buffer), so for the \
         fast systems it measures the generator more than the forwarder; a system that \
         delivers less than was offered saturated its core. Then trafgen sends a fixed {} \
         packets/s, the same load for every system: *LB CPU / packet* is the run time of \
         the LB's NAPI thread per delivered packet (all the LB node did with the packet, \
         plus its delivery into the sink), and *capacity* is the rate that cost allows on \
         one whole core. The other systems transmit on the LB's veth to the sink, whose \
         XDP program takes the packet from the veth's ring; ours, from its TC program, \
         hands the packet to the sink's interface directly (`bpf_redirect_peer`), as it \
         does for a local container, and the sink drops it at TC ingress; the row \
         *transmitting on the veth* is ours delivering as the others do. Capacity is \
         what the goals use. The bare XDP forwarder pays for veth's conversion of each skb \
         into an XDP frame (a copy: trafgen's skbs lack XDP headroom); on a NIC it would be \
         cheaper. Ratios are to our load balancer (its TC program alone) with the same \
         number of services. *With XDP* is lbd with `--xdp` on both of the LB's \
         interfaces: a flow's packets after its first go through the XDP fast path \
         (trafgen's one-way UDP flows are never confirmed, and a pending UDP flow's packets \
         from the client change nothing but its timestamps), and the goals on established \
         flows are taken with it; a new flow per packet is the TC program's work either \
         way, so that goal is taken without it.",
        thousands(config.fwd_fixed_rate)
    ));
    if rates.is_empty() {
        let why = "no system could be measured";
        return (
            section,
            goals_wanted
                .iter()
                .map(|g| goal_not_measured(g, why))
                .collect(),
        );
    }
    let find = |s: System| rates.iter().find(|r| r.system == s);
    let fixed = format!("delivered at {}", human(config.fwd_fixed_rate as f64));
    let mut table = Table::new(&[
        "system",
        "offered pps",
        "delivered pps",
        "delivered vs ours",
        &fixed,
        "LB CPU / packet",
        "capacity pps",
        "capacity vs ours",
    ]);
    for r in &rates {
        let reference = find(r.system.reference());
        let cap = r.capacity();
        table.row(vec![
            r.system.name(),
            thousands(r.offered as u64),
            thousands(r.delivered as u64),
            reference.map_or("–".into(), |o| ratio(r.delivered, o.delivered)),
            thousands(r.fixed_delivered as u64),
            r.cpu_per_packet
                .map_or("–".into(), |d| format!("{} ns", d.as_nanos())),
            cap.map_or("–".into(), |c| thousands(c as u64)),
            match (cap, reference.and_then(Rate::capacity)) {
                (Some(c), Some(o)) => ratio(c, o),
                _ => "–".into(),
            },
        ]);
    }
    section.tables.push(table);

    let bars: Vec<(String, f64)> = rates
        .iter()
        .map(|r| (r.system.name(), r.capacity().unwrap_or(0.0)))
        .collect();
    let plot = plot_dir.join("forwarding.svg");
    match report::bar_chart(
        &plot,
        "Forwarding capacity on one core (packets/s the LB's CPU cost allows)",
        "packets per second",
        &bars,
        &|l| l.starts_with("our"),
    ) {
        Ok(()) => section.plots.push(plot),
        Err(e) => section.not_measured.push(format!("the plot: {e:#}")),
    }
    let delivered_bars: Vec<(String, f64)> = rates
        .iter()
        .map(|r| (r.system.name(), r.delivered))
        .collect();
    let plot = plot_dir.join("forwarding-delivered.svg");
    match report::bar_chart(
        &plot,
        "Delivered to the sink (one trafgen core as generator)",
        "packets per second",
        &delivered_bars,
        &|l| l.starts_with("our"),
    ) {
        Ok(()) => section.plots.push(plot),
        Err(e) => section.not_measured.push(format!("the plot: {e:#}")),
    }

    let goal =
        |text: &str, ours: Option<&Rate>, other: Option<&Rate>, want: f64| match (ours, other) {
            (Some(o), Some(p)) => {
                let cap = |r: &Rate| r.capacity().unwrap_or(f64::NAN);
                let (by_cap, by_rate) = (cap(o) / cap(p), o.delivered / p.delivered);
                Goal {
                    goal: text.into(),
                    measured: format!(
                        "{by_cap:.2}x by capacity (LB CPU per packet); {by_rate:.2}x by delivered \
                         rate ({} vs {} pps); {}",
                        human(o.delivered),
                        human(p.delivered),
                        o.system.name()
                    ),
                    met: Some(by_cap >= want),
                }
            }
            _ => goal_not_measured(text, "a system of this comparison did not run"),
        };
    let goals = vec![
        goal(
            goals_wanted[0],
            find(System::OursXdp(1)),
            find(System::XdpBare),
            0.8,
        ),
        goal(
            goals_wanted[1],
            find(System::OursXdp(1)),
            find(System::Iptables(1)),
            1.2,
        ),
        goal(
            &format!(
                ">= 1.2x iptables DNAT with {} services (established flows)",
                thousands(n as u64)
            ),
            find(System::OursXdp(n)),
            find(System::Iptables(n)),
            1.2,
        ),
        goal(
            &format!(
                ">= 10x iptables DNAT with {} services (a new flow per packet)",
                thousands(n as u64)
            ),
            find(System::OursNew(n)),
            find(System::IptablesNew(n)),
            10.0,
        ),
    ];
    (section, goals)
}
