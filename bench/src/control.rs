//! Control plane: how long the reconciler takes to program many services,
//! and how much memory lbd holds while serving them.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use lb_tests::lbd::Lbd;
use lb_tests::netns::{unique_name, Netns};
use lb_tests::notify::NotifySocket;
use lb_userspace::datapath::Datapath;
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
    /// What the kernel charges for lbd's maps (their `memlock`).
    maps_kib: u64,
}

/// The kernel memory of the maps pinned in `pin_dir`, from each map's
/// fdinfo.
fn maps_kib(pin_dir: &Path) -> Result<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let mut bytes = 0;
    for name in lb_userspace::datapath::MAP_NAMES {
        let map = aya::maps::MapData::from_pin(pin_dir.join(name))
            .with_context(|| format!("opening the pinned map {name}"))?;
        let fd = map.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        bytes += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .with_context(|| format!("no memlock in the fdinfo of {name}"))?;
    }
    Ok(bytes / 1024)
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

/// Starts lbd with the one test launcher (it removes lbd's pins, files and
/// routes however this ends), times it to the READY it tells systemd (once
/// its state is in the datapath and the datapath attached), and checks that
/// it then lists every service.
fn footprint(services: u32, backends: u32, timeout: Duration) -> Result<Footprint> {
    let ns = Netns::new(&unique_name("bcp"))?;
    let notify = NotifySocket::new(&unique_name("bcp-notify"))?;
    let notify_path = notify.path.to_string_lossy().to_string();
    let max_services = services.max(16).to_string();
    let max_backends = (services * backends).max(1024).to_string();
    let args = [
        "--max-services",
        max_services.as_str(),
        "--max-backends",
        max_backends.as_str(),
    ];
    let config = lbd_config(&state(services, backends));
    let env = [("NOTIFY_SOCKET", notify_path.as_str())];
    let started = Instant::now();
    let mut lbd = Lbd::start_within(&ns, "bcp-lbd", &config, &[], &args, &env, timeout)?;
    let (at, _) = notify
        .expect_within("READY=1", timeout.saturating_sub(started.elapsed()))
        .with_context(|| format!("lbd's log:\n{}", lbd.log()))?;
    let ready = at - started;
    let status = lbd.status()?;
    let served = status["services"].as_array().map_or(0, Vec::len);
    if served != services as usize {
        bail!("lbd was ready with {served} of {services} services");
    }
    let (rss_kib, peak_kib) = memory_kib(lbd.pid().context("lbd is not running")?)?;
    let maps_kib = maps_kib(&lbd.pin_dir)?;
    lbd.stop();
    Ok(Footprint {
        services,
        ready,
        rss_kib,
        peak_kib,
        maps_kib,
    })
}

fn maglev_table() -> Table {
    use lb_userspace::maglev::imbalance;
    let mut t = Table::new(&[
        "table size",
        "100 backends: max/mean, max/min",
        "1,000 backends: max/mean, max/min",
        "ring memory per service slot",
    ]);
    for m in [1021, lb_common::MAGLEV_M, 16381, 65537] {
        let cell = |n| {
            let (mean, min) = imbalance(n, m);
            format!("{mean:.3}, {min:.3}")
        };
        t.row(vec![
            if m == lb_common::MAGLEV_M {
                format!("{m} (default)")
            } else {
                m.to_string()
            },
            cell(100),
            cell(1000),
            format!(
                "{:.0} KiB",
                f64::from(lb_common::RINGS_PER_SERVICE * m * 4) / 1024.0
            ),
        ]);
    }
    t
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
         many services; *ready* is the time from its start until it tells systemd READY \
         (`sd_notify`, as a `Type=notify-reload` unit waits for it: the file read and \
         checked, the maps created, the program verified, every service programmed and \
         the program attached; `lbctl status` is then checked to list them all), then \
         its resident memory (VmRSS) and its peak (VmHWM). The maps themselves are \
         kernel memory, not in these figures (lbd maps only the part of the ring map it \
         is writing, while it writes): *maps (kernel)* is what the kernel charges for \
         them (`memlock` in their fdinfo), most of it the ring map, sized by \
         `--max-services` and the Maglev table size. Ratios are to the smaller scale."
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

    let mut mem = Table::new(&[
        "lbd serving",
        "ready after",
        "VmRSS",
        "VmHWM",
        "RSS ratio",
        "maps (kernel)",
    ]);
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
            format!("{:.1} MiB", f.maps_kib as f64 / 1024.0),
        ]);
    }
    if !prints.is_empty() {
        section.tables.push(mem);
    }
    let mut goals = Vec::new();
    if let Some(f) = prints.iter().find(|f| f.services == big) {
        goals.push(Goal {
            goal: format!("lbd with {} ready in under 3 s", scale_name(big, b)),
            measured: format!("{:.2} s", f.ready.as_secs_f64()),
            met: Some(f.ready < Duration::from_secs(3)),
        });
    }
    section.tables.push(maglev_table());
    section.text.push(
        "*Maglev table*: how evenly a table spreads backends of equal weight (the busiest \
         backend's share of the entries over the mean share, and over the smallest), and \
         the ring memory each service slot costs (two tables of 4-byte ids), by table size \
         (`[maglev] table_size`, default 4093). Computed, not timed."
            .into(),
    );
    let cycles = if config.quick { 5 } else { 25 };
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
