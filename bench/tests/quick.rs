//! Runs every benchmark once, as small as still means something, and checks
//! that each produced its tables and plots. It asserts nothing about the
//! figures themselves: benchmarks never fail on a timing.

use std::path::PathBuf;

use lb_bench::{Config, Output};

#[test]
fn quick_harness_produces_a_report() {
    // A machine set up for the tests only still measures every system.
    if let Err(e) = lb_bench::sys::ensure_packages() {
        eprintln!("could not install the benchmark's packages: {e:#}");
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-smoke");
    let _ = std::fs::remove_dir_all(&dir);
    let out = Output {
        markdown: dir.join("BENCHMARKS.md"),
        plot_dir: dir.clone(),
        command: "cargo test -p lb-bench --test quick".into(),
    };
    let config = Config::smoke();
    let report = lb_bench::run(&config, &out).expect("the harness runs");

    let text = std::fs::read_to_string(&out.markdown).expect("BENCHMARKS.md written");
    assert!(text.contains("## Goals"), "{text}");
    // One section per part, every part run.
    assert_eq!(report.sections.len(), config.parts.len(), "{text}");
    assert_eq!(config.parts.len(), lb_bench::Part::ALL.len());
    for section in &report.sections {
        assert!(
            !section.tables.is_empty(),
            "{}: no table\n{text}",
            section.title
        );
        for table in &section.tables {
            assert!(
                !table.rows.is_empty(),
                "{}: empty table\n{text}",
                section.title
            );
            let cells = table.header.len();
            assert!(table.rows.iter().all(|r| r.len() == cells), "{text}");
        }
        for plot in &section.plots {
            let svg = std::fs::read_to_string(plot).expect("plot written");
            assert!(svg.contains("<svg"), "{} is not an SVG", plot.display());
            assert!(
                text.contains(&*plot.file_name().unwrap().to_string_lossy()),
                "{} not referenced\n{text}",
                plot.display()
            );
        }
    }
    for name in ["pktcost.svg", "forwarding.svg", "e2e.svg"] {
        assert!(dir.join(name).is_file(), "{name} missing\n{text}");
    }
    assert!(!report.goals.is_empty());
    let leftovers: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("lbt-{}-", std::process::id())))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "namespaces left behind: {leftovers:?}"
    );
}
