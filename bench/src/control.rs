//! Control plane: how long the reconciler takes to program many services,
//! and how much memory lbd holds while serving them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use lb_tests::lbd::lbctl;
use lb_tests::netns::{unique_name, Netns};
use lb_tests::process::ChildGuard;
use lb_tests::topology::target_bin;
use lb_userspace::datapath::{remove_pins, Datapath};
use lb_userspace::model::DesiredState;
use lb_userspace::reconciler::Reconciler;

use crate::pktcost::{limits, scale_name, state};
use crate::report::{thousands, Goal, Section, Table};
use crate::sys::memory_kib;
use crate::Config;

/// Reconciler timings at one scale.
struct Programming {
    full: Duration,
    add_backend: Duration,
    remove_service: Duration,
}

fn programming(services: u32, backends: u32) -> Result<Programming> {
    let (_dp, maps) = Datapath::load(None, limits(services, backends + 1, 1024))?;
    let mut rec = Reconciler::new(maps)?;
    let mut desired = state(services, backends);
    let t = Instant::now();
    rec.apply(&desired)?;
    let full = t.elapsed();

    // One more backend for one service: a new Maglev table for it alone.
    let mut added = desired.services[0].backends[0];
    added.port = added.port.wrapping_add(1000);
    desired.services[0].backends.push(added);
    let t = Instant::now();
    rec.apply(&desired)?;
    let add_backend = t.elapsed();

    desired.services.pop();
    let t = Instant::now();
    rec.apply(&desired)?;
    let remove_service = t.elapsed();
    Ok(Programming {
        full,
        add_backend,
        remove_service,
    })
}

/// lbd's memory once it serves a configuration.
struct Footprint {
    services: u32,
    ready: Duration,
    rss_kib: u64,
    peak_kib: u64,
}

fn lbd_config(desired: &DesiredState) -> String {
    let mut s = String::new();
    for svc in &desired.services {
        let backends: Vec<String> = svc
            .backends
            .iter()
            .map(|b| format!("\"{}\"", b.socket_addr()))
            .collect();
        let _ = writeln!(
            s,
            "[[service]]\nname = \"{}\"\nfrontend = \"{}\"\nbackends = [{}]\n",
            svc.name,
            svc.frontend,
            backends.join(", ")
        );
    }
    s
}

/// Files and pins of one lbd run, removed on drop.
struct Scratch {
    dir: PathBuf,
    pin_dir: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        remove_pins(&self.pin_dir);
        lb_tests::lbd::remove_run_files(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn footprint(services: u32, backends: u32, timeout: Duration) -> Result<Footprint> {
    let ns = Netns::new(&unique_name("bcp"))?;
    let name = unique_name("bcp-lbd");
    let scratch = Scratch {
        dir: std::env::temp_dir().join(&name),
        pin_dir: PathBuf::from("/sys/fs/bpf").join(&name),
    };
    std::fs::create_dir_all(&scratch.dir)?;
    let config = scratch.dir.join("lbd.toml");
    let socket = scratch.dir.join("lbd.sock");
    std::fs::write(&config, lbd_config(&state(services, backends)))?;
    let log = std::fs::File::create(scratch.dir.join("lbd.log"))?;
    let mut cmd = ns.command(target_bin("lbd"));
    cmd.arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .arg("--pin-dir")
        .arg(&scratch.pin_dir)
        .args(["--max-services", &services.max(16).to_string()])
        .args([
            "--max-backends",
            &(services * backends).max(1024).to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let started = Instant::now();
    let mut lbd = ChildGuard::spawn(&mut cmd)?;
    let deadline = started + timeout;
    let ready = loop {
        let served = lbctl(&socket, &["status", "--json"])
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["services"].as_array().map(|a| a.len()));
        if served == Some(services as usize) {
            break started.elapsed();
        }
        if let Some(status) = lbd.try_wait() {
            let log = std::fs::read_to_string(scratch.dir.join("lbd.log")).unwrap_or_default();
            bail!("lbd exited ({status}): {log}");
        }
        if Instant::now() > deadline {
            bail!(
                "lbd did not list {services} services in `lbctl status` within {} s",
                timeout.as_secs()
            );
        }
        // A status of many services is large; polling harder would slow lbd.
        std::thread::sleep(Duration::from_millis(250));
    };
    let (rss_kib, peak_kib) = memory_kib(lbd.pid())?;
    lbd.terminate();
    drop(scratch);
    Ok(Footprint {
        services,
        ready,
        rss_kib,
        peak_kib,
    })
}

pub fn run(config: &Config, _plot_dir: &Path, command: &str) -> (Section, Vec<Goal>) {
    let (big, b) = (config.control_services, config.control_backends);
    let small = (big / 10).max(1);
    let mut section = Section {
        title: "Control plane".into(),
        command: command.into(),
        ..Default::default()
    };
    section.text.push(format!(
        "*Programming*: the real reconciler writes services of {b} backends each into \
         freshly created, empty maps (`Reconciler::apply`, in process, as lbd does it), then \
         one service gains a backend (one new Maglev table), then one service goes. \
         *lbd*: lbd started in a namespace of its own with a configuration file of that \
         many services; *ready* is the time from its start until `lbctl status` lists them \
         all (reading and checking the file, creating the maps, programming, answering), \
         then its resident memory (VmRSS) and its peak (VmHWM). The maps themselves are \
         kernel memory and are not in these figures. Ratios are to the smaller scale."
    ));

    let mut prog = Table::new(&[
        "operation",
        &format!("{} services × {b}", thousands(small as u64)),
        &format!("{} services × {b}", thousands(big as u64)),
        "ratio",
    ]);
    let mut results = Vec::new();
    for s in [small, big] {
        eprintln!("lb-bench: control: programming {s} x {b}");
        match programming(s, b) {
            Ok(p) => results.push(p),
            Err(e) => section
                .not_measured
                .push(format!("programming {s} services: {e:#}")),
        }
    }
    if let [p1, p2] = &results[..] {
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        for (what, a, c) in [
            ("program every service into empty maps", p1.full, p2.full),
            (
                "add one backend to one service",
                p1.add_backend,
                p2.add_backend,
            ),
            ("remove one service", p1.remove_service, p2.remove_service),
        ] {
            prog.row(vec![
                what.into(),
                ms(a),
                ms(c),
                format!("{:.1}x", c.as_secs_f64() / a.as_secs_f64().max(1e-9)),
            ]);
        }
        section.tables.push(prog);
    }

    let mut mem = Table::new(&["lbd serving", "ready after", "VmRSS", "VmHWM", "RSS ratio"]);
    let mut prints = Vec::new();
    for s in [1, small, big] {
        eprintln!("lb-bench: control: lbd with {s} services");
        match footprint(s, b, config.control_lbd_timeout) {
            Ok(f) => prints.push(f),
            Err(e) => section
                .not_measured
                .push(format!("lbd with {s} services: {e:#}")),
        }
    }
    let base = prints.first().map(|f| f.rss_kib as f64);
    for f in &prints {
        mem.row(vec![
            scale_name(f.services, b),
            format!("{:.2} s", f.ready.as_secs_f64()),
            format!("{:.1} MiB", f.rss_kib as f64 / 1024.0),
            format!("{:.1} MiB", f.peak_kib as f64 / 1024.0),
            base.map_or("–".into(), |b| format!("{:.1}x", f.rss_kib as f64 / b)),
        ]);
    }
    if !prints.is_empty() {
        section.tables.push(mem);
    }
    let cycles = if config.quick { 5 } else { 25 };
    let mut goals = Vec::new();
    let mut t = Table::new(&["change", "changes", "p50", "p99", "max"]);
    eprintln!("lb-bench: control: docker event to datapath, {cycles} containers");
    let docker = crate::docker::event_to_datapath(cycles);
    eprintln!("lb-bench: control: etcd revision to datapath, {cycles} backends");
    let etcd = crate::etcd::revision_to_datapath(cycles);
    for (what, result) in [
        ("Docker event to datapath", docker),
        ("etcd revision to datapath", etcd),
    ] {
        let goal = format!("{what} p99 under 100 ms");
        match result {
            Ok(l) => {
                t.row(vec![
                    what.to_string(),
                    l.samples.to_string(),
                    format!("{:.1} ms", l.p50_ms),
                    format!("{:.1} ms", l.p99_ms),
                    format!("{:.1} ms", l.max_ms),
                ]);
                goals.push(Goal {
                    goal,
                    measured: format!(
                        "p99 {:.1} ms, p50 {:.1} ms over {} changes",
                        l.p99_ms, l.p50_ms, l.samples
                    ),
                    met: Some(l.p99_ms < 100.0),
                });
            }
            Err(e) => {
                section.not_measured.push(format!("{what} latency: {e:#}"));
                goals.push(Goal {
                    goal,
                    measured: format!("not measured: {e:#}"),
                    met: None,
                });
            }
        }
    }
    section.text.push(format!(
        "*Docker event to datapath*: a dockerd of its own in a namespace, lbd with \
         `--docker` beside it; {cycles} containers labelled for one frontend are \
         started and removed one at a time, each change awaited in `lbctl status`. \
         lbd times each change itself, from the timestamp of the Docker event that \
         caused it to the end of the map writes. *etcd revision to datapath*: an etcd \
         of its own in a namespace, lbd with `--etcd` beside it; {cycles} backends of \
         one service are put and deleted one at a time; each sample runs from just \
         before the write is sent to the end of lbd's map writes for its revision \
         (`applied_at_us` in `lbctl status`)."
    ));
    if !t.rows.is_empty() {
        section.tables.push(t);
    }
    (section, goals)
}
