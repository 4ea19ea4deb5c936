//! The benchmark harness behind `cargo xtask bench`: per-packet cost,
//! forwarding rate, end-to-end requests, HTTP routing and control-plane cost,
//! each measured side by side with its peers in one run and written to
//! BENCHMARKS.md with plots.
//!
//! Benchmarks are not tests: no figure ever fails a run. A part that cannot
//! run (a tool missing, an error) is reported as not measured, with why.

pub mod control;
pub mod docker;
pub mod e2e;
pub mod etcd;
pub mod forward;
pub mod http_routing;
pub mod pktcost;
pub mod report;
pub mod sys;
pub mod web;
pub mod xdp;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use report::{Goal, Report, Section};
use sys::Machine;

/// The benchmarks, in order of priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    PacketCost,
    Forwarding,
    EndToEnd,
    HttpRouting,
    ControlPlane,
}

impl Part {
    pub const ALL: [Part; 5] = [
        Part::PacketCost,
        Part::Forwarding,
        Part::EndToEnd,
        Part::HttpRouting,
        Part::ControlPlane,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Part::PacketCost => "pktcost",
            Part::Forwarding => "forward",
            Part::EndToEnd => "e2e",
            Part::HttpRouting => "http-routing",
            Part::ControlPlane => "control",
        }
    }

    pub fn parse(s: &str) -> Option<Part> {
        Part::ALL.into_iter().find(|p| p.name() == s)
    }
}

/// How much of everything to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub quick: bool,
    pub parts: Vec<Part>,
    /// Packets per path per scale.
    pub pktcost_runs: u32,
    /// (services, backends per service).
    pub pktcost_scales: Vec<(u32, u32)>,
    /// Scales whose programming is estimated to take longer than this are
    /// skipped (reported as not measured). None: never skip.
    pub pktcost_program_budget: Option<Duration>,
    /// Measured window per forwarding system, after a warm-up.
    pub fwd_window: Duration,
    pub fwd_warmup: Duration,
    /// Times every forwarding system is measured, taking turns; the table
    /// gives the mean.
    pub fwd_rounds: u32,
    /// The rate at which every forwarding system's CPU cost is measured:
    /// below what the slowest of them sustains on one core.
    pub fwd_fixed_rate: u64,
    /// The larger service count of the forwarding benchmark.
    pub fwd_services: u32,
    pub e2e_window: Duration,
    pub e2e_connections: u32,
    pub control_services: u32,
    pub control_backends: u32,
    /// How long lbd may take to serve `control_services` before its memory
    /// is reported as not measured.
    pub control_lbd_timeout: Duration,
    /// Only systems whose name contains this (forwarding and end to end).
    pub systems: Option<String>,
}

impl Config {
    pub fn full() -> Config {
        Config {
            quick: false,
            parts: Part::ALL.to_vec(),
            pktcost_runs: 100_000,
            pktcost_scales: vec![(1, 3), (1000, 10), (10_000, 100)],
            pktcost_program_budget: None,
            fwd_window: Duration::from_secs(5),
            fwd_warmup: Duration::from_secs(1),
            fwd_rounds: 2,
            fwd_fixed_rate: 100_000,
            fwd_services: 1000,
            e2e_window: Duration::from_secs(10),
            e2e_connections: 50,
            control_services: 10_000,
            control_backends: 10,
            control_lbd_timeout: Duration::from_secs(300),
            systems: None,
        }
    }

    /// Under three minutes on a 2-core machine.
    pub fn quick() -> Config {
        Config {
            quick: true,
            pktcost_runs: 20_000,
            pktcost_program_budget: Some(Duration::from_secs(20)),
            fwd_window: Duration::from_secs(2),
            fwd_warmup: Duration::from_millis(500),
            fwd_rounds: 1,
            e2e_window: Duration::from_secs(3),
            control_lbd_timeout: Duration::from_secs(30),
            ..Config::full()
        }
    }

    /// What the integration test runs: every part, each as small as still
    /// means something.
    pub fn smoke() -> Config {
        Config {
            pktcost_runs: 5_000,
            pktcost_scales: vec![(1, 3), (1000, 10)],
            fwd_window: Duration::from_secs(1),
            fwd_warmup: Duration::from_millis(300),
            e2e_window: Duration::from_secs(1),
            e2e_connections: 16,
            control_services: 1000,
            ..Config::quick()
        }
    }
}

impl Config {
    /// Whether the system called `name` is to be measured.
    pub fn wants(&self, name: &str) -> bool {
        self.systems.as_deref().is_none_or(|f| name.contains(f))
    }
}

/// Where the run writes.
#[derive(Clone, Debug)]
pub struct Output {
    pub markdown: PathBuf,
    pub plot_dir: PathBuf,
    /// The command line shown in the report.
    pub command: String,
}

/// Runs every configured part and writes the report and its plots.
pub fn run(config: &Config, out: &Output) -> Result<Report> {
    let started = Instant::now();
    lb_tests::netns::cleanup_stale();
    std::fs::create_dir_all(&out.plot_dir)
        .with_context(|| format!("creating {}", out.plot_dir.display()))?;
    let machine = Machine::detect();
    let mut sections = Vec::new();
    let mut goals = Vec::new();
    for part in &config.parts {
        eprintln!("lb-bench: {part:?}");
        let command = format!("{} -- --only {}", out.command, part.name());
        let dir = &out.plot_dir;
        let (section, mut part_goals) = match part {
            Part::PacketCost => pktcost::run(config, dir, &command),
            Part::Forwarding => forward::run(config, dir, &command),
            Part::EndToEnd => e2e::run(config, dir, &command),
            Part::HttpRouting => http_routing::run(config, &command),
            Part::ControlPlane => control::run(config, dir, &command),
        };
        sections.push(section);
        goals.append(&mut part_goals);
    }
    let report = Report {
        machine,
        command: out.command.clone(),
        quick: config.quick,
        elapsed: started.elapsed(),
        goals,
        sections,
    };
    let md_dir = out
        .markdown
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&md_dir)?;
    let kept = std::fs::read_to_string(&out.markdown)
        .map(|old| report::kept_sections(&old))
        .unwrap_or_default();
    std::fs::write(&out.markdown, report.markdown(&md_dir) + &kept)
        .with_context(|| format!("writing {}", out.markdown.display()))?;
    Ok(report)
}

/// A section that says only why nothing in it was measured.
pub fn not_measured(title: &str, command: &str, why: String) -> Section {
    Section {
        title: title.into(),
        command: command.into(),
        not_measured: vec![why],
        ..Default::default()
    }
}

/// Why a part cannot run, if any of `programs` is not on PATH.
pub fn missing_programs(programs: &[&str]) -> Option<String> {
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !sys::have(p)).collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{} not installed (`cargo xtask bench` installs it)",
            missing.join(", ")
        )
    })
}

/// A goal this run could not measure.
pub fn goal_not_measured(goal: &str, why: &str) -> Goal {
    Goal {
        goal: goal.into(),
        measured: format!("not measured: {why}"),
        met: None,
    }
}
