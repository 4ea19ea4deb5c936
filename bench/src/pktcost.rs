//! Per-packet cost of the datapath's main paths, measured in the kernel with
//! BPF_PROG_TEST_RUN (the kernel times the runs; no syscall is counted),
//! side by side with a program that only passes.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use etherparse::PacketBuilder;
use lb_tests::netns::{unique_name, Netns};
use lb_userspace::datapath::{Datapath, Limits};
use lb_userspace::model::{DesiredState, Frontend, Proto, ServiceSpec};
use lb_userspace::reconciler::Reconciler;

use crate::report::{self, thousands, Goal, Section, Table};
use crate::{goal_not_measured, Config};

const CLIENT: [u8; 4] = [10, 71, 0, 2];

/// The figures of one scale.
#[derive(Clone, Debug)]
pub struct Scale {
    pub services: u32,
    pub backends: u32,
    /// How long the reconciler took to write this state into empty maps.
    pub program_time: Duration,
    /// (path, mean ns per packet); the floor comes first.
    pub rows: Vec<(String, f64)>,
}

impl Scale {
    /// Row `i`'s cost in floors: over the TC floor, or the XDP rows over
    /// their own.
    pub fn times_floor(&self, i: usize) -> f64 {
        self.rows[i].1 / self.rows[floor_of(i)].1
    }
}

pub const FLOOR: &str = "floor: a TC program that only passes";
pub const NO_SERVICE: &str = "packet for no service";
pub const NEW_FLOW: &str = "new flow (Maglev pick, both conntrack halves inserted)";
pub const ESTABLISHED: &str = "established flow, client → backend";
pub const REPLY: &str = "reply, backend → client";
/// The same two paths with one connection's packets over and over: its
/// entries stay in cache, so these show what the program's instructions
/// cost, and the distance to the rows above what its memory accesses cost.
pub const ESTABLISHED_WARM: &str = "established, one connection's packets again and again";
pub const REPLY_WARM: &str = "reply, one connection's packets again and again";
/// The XDP fast path (`lbd --xdp`), measured against a floor of its own.
pub const XDP_FLOOR: &str = "XDP floor: an XDP program that only passes";
pub const XDP_NO_SERVICE: &str = "XDP: packet for no service (passed on to TC)";
pub const XDP_ESTABLISHED: &str = "XDP: established flow, client → backend";
pub const XDP_REPLY: &str = "XDP: reply, backend → client";
pub const XDP_ESTABLISHED_WARM: &str = "XDP: established, one connection's packets again and again";
/// Every path, in the order of `Prepared::rounds`.
const PATHS: [&str; 12] = [
    FLOOR,
    NO_SERVICE,
    NEW_FLOW,
    ESTABLISHED,
    REPLY,
    ESTABLISHED_WARM,
    REPLY_WARM,
    XDP_FLOOR,
    XDP_NO_SERVICE,
    XDP_ESTABLISHED,
    XDP_REPLY,
    XDP_ESTABLISHED_WARM,
];

/// The row whose floor is row `i`'s: the XDP rows have their own.
fn floor_of(i: usize) -> usize {
    let xdp = PATHS
        .iter()
        .position(|p| *p == XDP_FLOOR)
        .unwrap_or(usize::MAX);
    if i >= xdp {
        xdp
    } else {
        0
    }
}

pub fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1, 65535)
        .write(&mut out, &[0u8; 6])
        .expect("a TCP packet always serializes");
    out
}

/// The frontend of service `i`: 10.80.x.y:80/tcp.
pub fn frontend(i: u32) -> Frontend {
    let [_, _, a, b] = i.to_be_bytes();
    Frontend {
        addr: IpAddr::V4(Ipv4Addr::new(10, 80, a, b)),
        port: 80,
        proto: Proto::Tcp,
    }
}

/// `services` services of `backends` backends each; every backend address
/// is distinct (10.9x.y.z), as it would be with one container per backend.
pub fn state(services: u32, backends: u32) -> DesiredState {
    let services = (0..services)
        .map(|i| {
            let [_, _, a, b] = i.to_be_bytes();
            let backends = (0..backends).map(|j| {
                (
                    IpAddr::V4(Ipv4Addr::new(10, 90 + (j / 256) as u8, b, j as u8)),
                    8080 + a as u16,
                )
            });
            service(&format!("s{i}"), frontend(i), backends)
        })
        .collect();
    DesiredState {
        services,
        ..Default::default()
    }
}

/// A service as a source would produce it. Built through serde so that
/// every field the model grows later takes its default, as in a config file.
pub fn service(
    name: &str,
    frontend: Frontend,
    backends: impl Iterator<Item = (IpAddr, u16)>,
) -> ServiceSpec {
    let backends: Vec<serde_json::Value> = backends
        .map(|(addr, port)| serde_json::json!({ "addr": addr, "port": port, "weight": 1 }))
        .collect();
    serde_json::from_value(serde_json::json!({
        "name": name,
        "frontend": frontend,
        "backends": backends,
        "source": "bench",
    }))
    .expect("a service of the model's own types deserializes")
}

/// Map capacities that hold `services` × `backends` and `flows` flows.
pub fn limits(services: u32, backends: u32, flows: u32) -> Limits {
    Limits {
        max_services: services.max(1),
        max_backends: (services * backends).max(16),
        max_flows: flows.max(1024),
        ..Default::default()
    }
}

/// TC_ACT_REDIRECT: translated and sent on.
const REDIRECT: u32 = 7;

/// Where the measured packets arrive from, and where translated ones go: a
/// link whose router the FIB resolves (see `gateway_link`).
pub fn routed_link() -> u32 {
    lb_tests::fixture::gateway_link(
        "bpc0",
        "10.70.0.1/24",
        "10.70.0.2",
        &["10.71.0.0/16", "10.80.0.0/16", "10.88.0.0/13"],
    )
}

/// A TC or an XDP program, each run with the context of its hook.
trait Runnable: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::TestRunResult> {
    fn context(ifindex: u32, packet: &[u8]) -> Vec<u8>;
    /// The action of a translated packet sent on.
    const SENT: u32;
}

impl Runnable for SchedClassifier {
    fn context(ifindex: u32, _packet: &[u8]) -> Vec<u8> {
        lb_tests::fixture::skb_context(ifindex, 0, 0).to_vec()
    }
    const SENT: u32 = REDIRECT;
}

impl Runnable for Xdp {
    fn context(ifindex: u32, packet: &[u8]) -> Vec<u8> {
        lb_tests::fixture::xdp_context(ifindex, packet.len()).to_vec()
    }
    const SENT: u32 = lb_tests::fixture::XDP_REDIRECT;
}

fn test_run<P: Runnable>(
    prog: &mut P,
    ifindex: u32,
    packet: &[u8],
    repeat: u32,
) -> Result<(u32, Duration, Vec<u8>)> {
    let mut out = vec![0u8; packet.len() + 64];
    let ctx = P::context(ifindex, packet);
    let r = prog.test_run(TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat,
        ..Default::default()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, r.duration, out))
}

/// Mean cost of running `prog` once on each packet. Every packet runs with
/// repeat = 1, because a repeated run reuses the skb that the first run
/// already translated, and would measure some other path. The kernel times
/// each run itself, so no syscall is counted; its timer's own cost is in
/// every figure alike, the floor's included.
fn per_packet<P: Runnable>(prog: &mut P, ifindex: u32, packets: &[Vec<u8>]) -> Result<f64> {
    let mut total = Duration::ZERO;
    for p in packets {
        total += test_run(prog, ifindex, p, 1)?.1;
    }
    Ok(total.as_nanos() as f64 / packets.len() as f64)
}

/// `per_packet` for packets that must all be translated and sent on, with
/// what was sent; anything else means the path measured is not the one
/// named.
fn translated<P: Runnable>(
    prog: &mut P,
    ifindex: u32,
    packets: &[Vec<u8>],
    path: &str,
) -> Result<(f64, Vec<Vec<u8>>)> {
    let mut total = Duration::ZERO;
    let mut sent = Vec::with_capacity(packets.len());
    for p in packets {
        let (action, took, out) = test_run(prog, ifindex, p, 1)?;
        if action != P::SENT {
            bail!("{path}: a packet was not translated (action {action})");
        }
        total += took;
        sent.push(out);
    }
    Ok((total.as_nanos() as f64 / packets.len() as f64, sent))
}

/// The backend's answer to the client packet `client`, which the datapath
/// sent on as `sent`.
fn answer(client: &[u8], sent: &[u8]) -> Vec<u8> {
    let backend: [u8; 4] = sent[30..34].try_into().expect("an IPv4 packet");
    let bport = u16::from_be_bytes([sent[36], sent[37]]);
    let src: [u8; 4] = client[26..30].try_into().expect("an IPv4 packet");
    let sport = u16::from_be_bytes([client[34], client[35]]);
    tcp(backend, src, bport, sport)
}

/// The rounds the measurement of every scale is cut into. Scales take turns
/// round by round, so a burst of load from elsewhere on a shared machine
/// lands on all of them alike, and the median round discards it.
pub const ROUNDS: u32 = 10;

/// A private copy of the datapath (nothing pinned, nothing attached),
/// programmed with one scale, measured round by round.
pub struct Prepared {
    services: u32,
    backends: u32,
    program_time: Duration,
    dp: Datapath,
    /// Holds the maps, which the kernel frees with the last handle.
    rec: Reconciler,
    vip: [u8; 4],
    ifindex: u32,
    next_flow: u32,
    /// Mean ns per packet of each round, one entry per path.
    rounds: Vec<[f64; PATHS.len()]>,
}

impl Prepared {
    /// Loads and programs `services` × `backends` through the real reconciler,
    /// with room for `flows` new flows. Call it, and `round`, from a thread
    /// inside a network namespace with `routed_link` (its ifindex), so that
    /// every translated packet is routed and redirected, as on a node.
    pub fn new(services: u32, backends: u32, flows: u32, ifindex: u32) -> Result<Prepared> {
        if services == 0 || backends == 0 {
            bail!("services and backends must both be at least 1");
        }
        let (mut dp, maps) = Datapath::load(None, limits(services, backends, 2 * flows + 16))?;
        // The XDP program may redirect to the routed link, as to an
        // interface lbd attached it to.
        dp.allow_xdp_egress(ifindex)?;
        let mut rec = Reconciler::new(maps)?;
        let desired = state(services, backends);
        let started = Instant::now();
        rec.apply(&desired)?;
        let program_time = started.elapsed();
        drop(desired);

        // The last service: the one a lookup is least likely to find in cache.
        let [_, _, a, b] = (services - 1).to_be_bytes();
        let vip = [10, 80, a, b];
        let prog = dp.program()?;
        let (action, _, out) = test_run(prog, ifindex, &tcp(CLIENT, vip, 40000, 80), 1)?;
        if action != REDIRECT || out[30..34] == vip {
            bail!("the forward packet was not translated (action {action})");
        }
        let backend: [u8; 4] = out[30..34].try_into()?;
        let bport = u16::from_be_bytes([out[36], out[37]]);
        let reply = tcp(backend, CLIENT, bport, 40000);
        let (_, _, out) = test_run(prog, ifindex, &reply, 1)?;
        if out[26..30] != vip {
            bail!("the reply was not translated");
        }
        Ok(Prepared {
            services,
            backends,
            program_time,
            dp,
            rec,
            vip,
            ifindex,
            next_flow: 0,
            rounds: Vec::new(),
        })
    }

    /// Times `n` packets on each path.
    pub fn round(&mut self, n: u32) -> Result<()> {
        let vip = self.vip;
        let count = n as usize;
        let forward = tcp(CLIENT, vip, 40000, 80);
        let ifindex = self.ifindex;
        let floor = per_packet(self.dp.pass_program()?, ifindex, &vec![forward; count])?;
        let prog = self.dp.program()?;
        let other = vec![tcp(CLIENT, [10, 99, 0, 1], 40000, 80); count];
        let no_service = per_packet(prog, ifindex, &other)?;
        // Distinct flows, each seen for the first time in any round.
        let flows: Vec<Vec<u8>> = (self.next_flow..self.next_flow + n)
            .map(|i| {
                tcp(
                    [10, 71, (i / 60000) as u8 + 1, 2],
                    vip,
                    1024 + (i % 60000) as u16,
                    80,
                )
            })
            .collect();
        self.next_flow += n;
        let (new_flow, sent) = translated(prog, ifindex, &flows, NEW_FLOW)?;
        // Untimed: each backend answers and each client acknowledges, which
        // confirms the connection, as on any TCP connection past its
        // handshake.
        let answers: Vec<Vec<u8>> = flows.iter().zip(&sent).map(|(c, s)| answer(c, s)).collect();
        translated(prog, ifindex, &answers, REPLY)?;
        translated(prog, ifindex, &flows, ESTABLISHED)?;
        let established = translated(prog, ifindex, &flows, ESTABLISHED)?.0;
        let reply = translated(prog, ifindex, &answers, REPLY)?.0;
        let established_warm = translated(
            prog,
            ifindex,
            &vec![flows[0].clone(); count],
            ESTABLISHED_WARM,
        )?
        .0;
        let reply_warm = translated(prog, ifindex, &vec![answers[0].clone(); count], REPLY_WARM)?.0;

        // The XDP fast path uses a next hop only in the second of the
        // datapath clock it was found in: the clock stands still while TC
        // finds them (untimed) and XDP is timed, so that no second ends in
        // between. A frozen clock spares the XDP rows one coarse clock read.
        let frozen = freeze_clock(&mut self.rec)?;
        let xdp_floor = per_packet(
            self.dp.xdp_pass_program()?,
            ifindex,
            &vec![flows[0].clone(); count],
        )?;
        let prog = self.dp.program()?;
        translated(prog, ifindex, &flows, ESTABLISHED)?;
        translated(prog, ifindex, &answers, REPLY)?;
        let xdp = self.dp.xdp_program()?;
        let xdp_no_service = per_packet(xdp, ifindex, &other)?;
        let xdp_established = translated(xdp, ifindex, &flows, XDP_ESTABLISHED)?.0;
        let xdp_reply = translated(xdp, ifindex, &answers, XDP_REPLY)?.0;
        let xdp_established_warm = translated(
            xdp,
            ifindex,
            &vec![flows[0].clone(); count],
            XDP_ESTABLISHED_WARM,
        )?
        .0;
        frozen.thaw(&mut self.rec)?;
        self.rounds.push([
            floor,
            no_service,
            new_flow,
            established,
            reply,
            established_warm,
            reply_warm,
            xdp_floor,
            xdp_no_service,
            xdp_established,
            xdp_reply,
            xdp_established_warm,
        ]);
        Ok(())
    }

    /// The median round of every path.
    pub fn scale(&self) -> Scale {
        let rows = PATHS
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mut v: Vec<f64> = self.rounds.iter().map(|r| r[i]).collect();
                v.sort_by(f64::total_cmp);
                let median = match v.len() {
                    0 => f64::NAN,
                    n if !n.is_multiple_of(2) => v[n / 2],
                    n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
                };
                (name.to_string(), median)
            })
            .collect();
        Scale {
            services: self.services,
            backends: self.backends,
            program_time: self.program_time,
            rows,
        }
    }
}

/// One scale on its own: `runs` packets per path in `ROUNDS` rounds.
pub fn measure(services: u32, backends: u32, runs: u32) -> Result<Scale> {
    let per_round = (runs / ROUNDS).max(1);
    let mut p = Prepared::new(services, backends, per_round * ROUNDS, routed_link())?;
    for _ in 0..ROUNDS {
        p.round(per_round)?;
    }
    Ok(p.scale())
}

/// Runs every configured scale, each in a namespace of its own.
pub fn run(config: &Config, plot_dir: &Path, command: &str) -> (Section, Vec<Goal>) {
    const TITLE: &str = "Per-packet cost of the datapath";
    let mut section = Section {
        title: TITLE.into(),
        command: command.into(),
        text: vec![format!(
            "Each figure is the mean of `BPF_PROG_TEST_RUN` over {} packets, one packet \
             per run (repeat = 1: a repeated run would reuse the skb that the first run \
             already translated); the packets are cut into {ROUNDS} rounds in which the \
             scales take turns, and the table gives the median round, so that load from \
             elsewhere on the machine falls on every scale alike. The kernel times every run itself, so no syscall \
             is counted; the timer's own cost is in every row alike, the floor's \
             included. The maps are written by the real reconciler; packets go to the \
             last service. The datapath runs in a namespace whose FIB routes every \
             translated packet to a resolved next hop, so each figure includes the \
             forwarding decision (FIB lookup, MTU check) and the redirect, as on a node; \
             the transmission itself is in the forwarding benchmark. Every new flow is a \
             connection of its own; after its first packet, untimed, its backend answers \
             and its client acknowledges, which confirms it, as on any TCP connection past \
             its handshake, so the established and reply rows measure confirmed \
             connections, each packet on a different one, whose conntrack entries the \
             runs between have mostly pushed out of the CPU's caches. The two rows \
             \"again and again\" send one connection's packet every time instead: its \
             entries stay cached, so they show what the instructions cost, and their \
             distance to the rows above what the memory accesses cost. The rows marked \
             XDP run the XDP fast path (`lbd --xdp`) on the same packets, right after TC \
             has cached their next hops, with the datapath clock held still so that no \
             second ends in between, each against a floor of its own: an XDP program that \
             only passes. The same figures come from `target/release/lb-pktcost --runs {} --scale S B ...`.",
            thousands((config.pktcost_runs / ROUNDS).max(1) as u64 * ROUNDS as u64),
            config.pktcost_runs,
        )],
        ..Default::default()
    };
    let ns = match Netns::new(&unique_name("bpc")) {
        Ok(ns) => ns,
        Err(e) => {
            section.not_measured.push(format!("a namespace: {e:#}"));
            return (section, Vec::new());
        }
    };
    let per_round = (config.pktcost_runs / ROUNDS).max(1);
    let mut prepared: Vec<Prepared> = Vec::new();
    for &(s, b) in &config.pktcost_scales {
        if let (Some(budget), Some(known)) = (config.pktcost_program_budget, prepared.last()) {
            // Programming is dominated by the Maglev tables, one per service.
            let per_service = known.program_time.as_secs_f64() / known.services as f64;
            let estimate = Duration::from_secs_f64(per_service * s as f64);
            if estimate > budget {
                section.not_measured.push(format!(
                    "{} in quick mode: programming it is estimated at {:.0} s here \
                     (the full run measures it)",
                    scale_name(s, b),
                    estimate.as_secs_f64()
                ));
                continue;
            }
        }
        eprintln!("lb-bench: pktcost: programming {s} x {b}");
        match ns.run(|| Prepared::new(s, b, per_round * ROUNDS, routed_link())) {
            Ok(p) => prepared.push(p),
            Err(e) => section
                .not_measured
                .push(format!("{}: {e:#}", scale_name(s, b))),
        }
    }
    eprintln!("lb-bench: pktcost: {ROUNDS} rounds");
    let mut failed = Vec::new();
    for _ in 0..ROUNDS {
        for (i, p) in prepared.iter_mut().enumerate() {
            if failed.contains(&i) {
                continue;
            }
            if let Err(e) = ns.run(|| p.round(per_round)) {
                section
                    .not_measured
                    .push(format!("{}: {e:#}", scale_name(p.services, p.backends)));
                failed.push(i);
            }
        }
    }
    let scales: Vec<Scale> = prepared
        .iter()
        .enumerate()
        .filter(|(i, _)| !failed.contains(i))
        .map(|(_, p)| p.scale())
        .collect();
    drop(prepared);
    let goal = "per-packet cost at 10,000 services within 1.2x of that at 1 service";
    if scales.is_empty() {
        return (section, vec![goal_not_measured(goal, "no scale ran")]);
    }

    let mut header = vec!["path".to_string()];
    for sc in &scales {
        header.push(format!(
            "{} service{} × {}",
            thousands(sc.services as u64),
            if sc.services == 1 { "" } else { "s" },
            sc.backends
        ));
        header.push("× floor".into());
    }
    let mut table = report::Table {
        header,
        rows: Vec::new(),
    };
    for (i, (path, _)) in scales[0].rows.iter().enumerate() {
        let mut row = vec![path.clone()];
        for sc in &scales {
            let ns = sc.rows[i].1;
            row.push(format!("{ns:.0} ns"));
            row.push(format!("{:.1}", sc.times_floor(i)));
        }
        table.row(row);
    }
    section.tables.push(table);

    let mut program = Table::new(&["scale", "reconciler: program into empty maps"]);
    for sc in &scales {
        program.row(vec![
            scale_name(sc.services, sc.backends),
            format!("{:.2} s", sc.program_time.as_secs_f64()),
        ]);
    }
    section.tables.push(program);

    let plot = plot_dir.join("pktcost.svg");
    let series: Vec<(String, Vec<(f64, f64)>)> = scales[0]
        .rows
        .iter()
        .enumerate()
        .map(|(i, (path, _))| {
            let points = scales
                .iter()
                .map(|sc| (sc.services as f64, sc.rows[i].1))
                .collect();
            (path.clone(), points)
        })
        .collect();
    match report::line_chart(
        &plot,
        "Per-packet cost vs number of services (BPF_PROG_TEST_RUN)",
        &format!(
            "services (backends per service: {})",
            scales
                .iter()
                .map(|s| s.backends.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        "ns per packet",
        &series,
    ) {
        Ok(()) => section.plots.push(plot),
        Err(e) => section.not_measured.push(format!("the plot: {e:#}")),
    }

    let one = scales.iter().find(|s| s.services == 1);
    let big = scales.iter().find(|s| s.services == 10_000);
    let goals = match (one, big) {
        (Some(one), Some(big)) => {
            let worst = [NEW_FLOW, ESTABLISHED, REPLY]
                .iter()
                .map(|p| {
                    let get =
                        |sc: &Scale| sc.rows.iter().find(|r| r.0 == *p).map_or(f64::NAN, |r| r.1);
                    (*p, get(big) / get(one))
                })
                .fold(("", 0.0f64), |a, b| if b.1 > a.1 { b } else { a });
            let mut goals = vec![Goal {
                goal: goal.into(),
                measured: format!(
                    "{:.2}x on the worst translated path ({}; 10,000 × {} vs 1 × {})",
                    worst.1, worst.0, big.backends, one.backends
                ),
                met: Some(worst.1 <= 1.2),
            }];
            goals.extend(floor_goals(one, big));
            goals
        }
        _ => vec![goal_not_measured(
            goal,
            "the 10,000-service scale did not run",
        )],
    };
    (section, goals)
}

/// The goals on each path's cost in floors, at 1 and at 10,000 services:
/// met when one of the programs that carry the path (TC, or XDP where it
/// has a fast path) stays within the bound at both scales.
fn floor_goals(one: &Scale, big: &Scale) -> Vec<Goal> {
    let floors = |sc: &Scale, path: &str| -> Option<f64> {
        let i = sc.rows.iter().position(|r| r.0 == path)?;
        Some(sc.times_floor(i))
    };
    [
        ("established flow", ESTABLISHED, Some(XDP_ESTABLISHED), 3.0),
        ("reply", REPLY, Some(XDP_REPLY), 3.0),
        ("new flow", NEW_FLOW, None, 8.0),
        (
            "packet for no service",
            NO_SERVICE,
            Some(XDP_NO_SERVICE),
            1.5,
        ),
    ]
    .into_iter()
    .map(|(what, tc, xdp, bound)| {
        let goal =
            format!("{what} <= {bound}x the floor in BPF_PROG_TEST_RUN, at 1 and 10,000 services");
        let mut parts = Vec::new();
        let mut best = f64::INFINITY;
        for (program, path) in [("TC", Some(tc)), ("XDP", xdp)] {
            let Some(path) = path else { continue };
            if let (Some(a), Some(b)) = (floors(one, path), floors(big, path)) {
                parts.push(format!("{program} {a:.1}x and {b:.1}x"));
                best = best.min(a.max(b));
            }
        }
        if parts.is_empty() {
            return goal_not_measured(&goal, "the path did not run");
        }
        Goal {
            goal,
            measured: format!("{} (1 and 10,000 services)", parts.join("; ")),
            met: Some(best <= bound),
        }
    })
    .collect()
}

/// "1,000 services × 10 backends"
pub fn scale_name(services: u32, backends: u32) -> String {
    format!(
        "{} service{} × {backends} backend{}",
        thousands(services as u64),
        if services == 1 { "" } else { "s" },
        if backends == 1 { "" } else { "s" }
    )
}

/// The datapath clock held at its present value (see `Frozen::thaw`).
struct Frozen;

fn freeze_clock(rec: &mut Reconciler) -> Result<Frozen> {
    let config = &mut rec.maps_mut().config;
    let mut c = config.get(&0, 0)?;
    c.clock_frozen_ns = lb_userspace::conntrack::now(&c);
    config.set(0, c, 0)?;
    Ok(Frozen)
}

impl Frozen {
    /// Lets the clock run again, from where the real one is.
    fn thaw(self, rec: &mut Reconciler) -> Result<()> {
        let config = &mut rec.maps_mut().config;
        let mut c = config.get(&0, 0)?;
        c.clock_frozen_ns = 0;
        config.set(0, c, 0)?;
        Ok(())
    }
}
