//! Per-packet cost of the datapath's main paths, measured in the kernel with
//! BPF_PROG_TEST_RUN, side by side with a program that only passes. Runs in
//! a network namespace of its own so that the FIB lookup behaves the same
//! everywhere. `cargo xtask bench` runs the same measurement and writes it
//! into BENCHMARKS.md.
//!
//! `lb-pktcost [--runs N] [--scale SERVICES BACKENDS]...`

use anyhow::{bail, Context as _, Result};
use lb_bench::pktcost::measure;

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
        scales = vec![(1, 3), (1000, 10), (10_000, 100)];
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
    println!("ns per packet: mean over {runs} runs, each timed by the kernel");
    for (s, b) in scales {
        let scale = measure(s, b, runs)?;
        println!(
            "\n{s} services x {b} backends (programmed in {:.2} s)",
            scale.program_time.as_secs_f64()
        );
        for (i, (name, ns)) in scale.rows.iter().enumerate() {
            let floors = scale.times_floor(i);
            println!("  {name:<58} {ns:>8.1} ns  ({floors:.2}x floor)");
        }
    }
    Ok(())
}
