//! Per-packet cost of the datapath's main paths, measured in the kernel with
//! BPF_PROG_TEST_RUN (the kernel times the runs; no syscall is counted),
//! side by side with a program that only passes. Runs in a network
//! namespace of its own so that the FIB lookup behaves the same everywhere.
//!
//! `lb-pktcost [--runs N] [--scale SERVICES BACKENDS]...`

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use etherparse::PacketBuilder;
use lb_userspace::datapath::{Datapath, Limits};
use lb_userspace::model::{BackendSpec, DesiredState, Frontend, Proto, ServiceSpec};
use lb_userspace::reconciler::Reconciler;

const CLIENT: [u8; 4] = [10, 71, 0, 2];

fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1, 65535)
        .write(&mut out, &[0u8; 6])
        .expect("packet");
    out
}

/// Service i has frontend 10.80.x.y:80 and `backends` backends 10.90.x.y.z.
fn state(services: u32, backends: u32) -> DesiredState {
    let services = (0..services)
        .map(|i| {
            let [_, _, a, b] = i.to_be_bytes();
            ServiceSpec {
                name: format!("s{i}"),
                frontend: Frontend {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 80, a, b)),
                    port: 80,
                    proto: Proto::Tcp,
                },
                backends: (0..backends)
                    .map(|j| BackendSpec {
                        addr: IpAddr::V4(Ipv4Addr::new(10, 90 + (j / 256) as u8, b, j as u8)),
                        port: 8080 + a as u16,
                        weight: 1,
                    })
                    .collect(),
                snat: None,
                health: None,
                affinity_secs: 0,
                source: "bench".into(),
            }
        })
        .collect();
    DesiredState { services }
}

fn run(prog: &mut SchedClassifier, packet: &[u8], repeat: u32) -> Result<(u32, Duration, Vec<u8>)> {
    let mut out = vec![0u8; packet.len() + 64];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
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
fn per_packet(prog: &mut SchedClassifier, packets: &[Vec<u8>]) -> Result<f64> {
    let mut total = Duration::ZERO;
    for p in packets {
        total += run(prog, p, 1)?.1;
    }
    Ok(total.as_nanos() as f64 / packets.len() as f64)
}

fn measure(services: u32, backends: u32, runs: u32) -> Result<Vec<(String, f64)>> {
    let limits = Limits {
        max_services: services.max(1),
        max_backends: (services * backends).max(16),
        max_flows: (2 * runs).max(1024),
    };
    let (mut dp, maps) = Datapath::load(None, limits)?;
    let mut rec = Reconciler::new(maps)?;
    rec.apply(&state(services, backends))?;
    // The last service: the one a lookup is least likely to find in cache.
    let [_, _, a, b] = (services - 1).to_be_bytes();
    let vip = [10, 80, a, b];
    let n = runs as usize;
    let mut rows = Vec::new();

    let forward = tcp(CLIENT, vip, 40000, 80);
    let same = vec![forward.clone(); n];
    let floor = per_packet(dp.pass_program()?, &same)?;
    rows.push(("floor: a program that only passes".to_string(), floor));

    let prog = dp.program()?;
    let other = vec![tcp(CLIENT, [10, 99, 0, 1], 40000, 80); n];
    rows.push(("packet for no service".into(), per_packet(prog, &other)?));

    // Distinct flows, each seen for the first time.
    let flows: Vec<Vec<u8>> = (0..runs)
        .map(|i| {
            tcp(
                [10, 71, (i / 60000) as u8 + 1, 2],
                vip,
                1024 + (i % 60000) as u16,
                80,
            )
        })
        .collect();
    rows.push((
        "new flow: Maglev pick + conntrack insert".into(),
        per_packet(prog, &flows)?,
    ));

    // The same flows again: now established.
    rows.push((
        "established flow, client -> backend".into(),
        per_packet(prog, &flows)?,
    ));

    let (action, _, out) = run(prog, &forward, 1)?;
    if action != 0 || out[30..34] == vip {
        bail!("the forward packet was not translated (action {action})");
    }
    let backend: [u8; 4] = out[30..34].try_into()?;
    let bport = u16::from_be_bytes([out[36], out[37]]);
    let reply = tcp(backend, CLIENT, bport, 40000);
    let (_, _, out) = run(prog, &reply, 1)?;
    if out[26..30] != vip {
        bail!("the reply was not translated");
    }
    rows.push((
        "reply, backend -> client".into(),
        per_packet(prog, &vec![reply; n])?,
    ));
    Ok(rows)
}

fn main() -> Result<()> {
    let mut runs = 100_000u32;
    let mut scales: Vec<(u32, u32)> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num =
            || -> Result<u32> { Ok(args.next().context("a number is missing")?.parse()?) };
        match a.as_str() {
            "--runs" => runs = num()?,
            "--scale" => {
                let s = num()?;
                let b = num()?;
                scales.push((s, b));
            }
            _ => bail!("usage: lb-pktcost [--runs N] [--scale SERVICES BACKENDS]..."),
        }
    }
    if scales.is_empty() {
        scales = vec![(1, 3), (1000, 10)];
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
    println!("ns per packet: mean over {runs} runs, each timed by the kernel");
    for (s, b) in scales {
        println!("\n{s} services x {b} backends");
        let rows = measure(s, b, runs)?;
        let floor = rows[0].1;
        for (name, ns) in rows {
            println!("  {name:<45} {ns:>8.1} ns  ({:.2}x floor)", ns / floor);
        }
    }
    Ok(())
}
