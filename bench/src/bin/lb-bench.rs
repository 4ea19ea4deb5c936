//! `lb-bench [--quick] [--only PART]... [--systems SUBSTRING] [--out FILE] [--plots DIR]
//! [--command TEXT]`
//!
//! Runs the benchmarks (pktcost, forward, e2e, http-routing, control) and writes a
//! Markdown report with SVG plots. Needs root: it creates network
//! namespaces, loads BPF programs and starts servers inside them.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use lb_bench::{Config, Output, Part};

fn main() -> Result<()> {
    let mut quick = false;
    let mut only: Vec<Part> = Vec::new();
    let mut markdown: Option<PathBuf> = None;
    let mut plot_dir: Option<PathBuf> = None;
    let mut command: Option<String> = None;
    let mut systems: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--quick" => quick = true,
            "--only" => {
                let v = value()?;
                only.push(Part::parse(&v).with_context(|| {
                    format!("unknown part {v:?} (pktcost, forward, e2e, http-routing, control)")
                })?);
            }
            "--out" => markdown = Some(value()?.into()),
            "--plots" => plot_dir = Some(value()?.into()),
            "--command" => command = Some(value()?),
            "--systems" => systems = Some(value()?),
            _ => bail!(
                "usage: lb-bench [--quick] [--only pktcost|forward|e2e|http-routing|control]... \
                 [--systems SUBSTRING] [--out FILE] [--plots DIR] [--command TEXT]"
            ),
        }
    }
    let mut config = if quick {
        Config::quick()
    } else {
        Config::full()
    };
    config.systems = systems;
    if !only.is_empty() {
        config.parts = only;
    }
    let (default_md, default_plots) = if quick {
        ("target/bench-quick/BENCHMARKS.md", "target/bench-quick")
    } else {
        ("BENCHMARKS.md", "docs/bench")
    };
    let out = Output {
        markdown: markdown.unwrap_or_else(|| default_md.into()),
        plot_dir: plot_dir.unwrap_or_else(|| default_plots.into()),
        command: command.unwrap_or_else(|| {
            if quick {
                "cargo xtask bench --quick".into()
            } else {
                "cargo xtask bench".into()
            }
        }),
    };
    let report = lb_bench::run(&config, &out)?;
    for g in &report.goals {
        let met = match g.met {
            Some(true) => "met",
            Some(false) => "not met",
            None => "not measured",
        };
        println!("{:<70} {} ({met})", g.goal, g.measured);
    }
    println!("wrote {}", out.markdown.display());
    Ok(())
}
