//! Docker event to datapath: lbd itself times every change from the Docker
//! event that caused it (the event's own timestamp) to the end of the map
//! writes, and reports the quantiles in `lbctl status`. This part makes
//! labelled containers start and stop and reads them.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use lb_tests::docker::{build_test_image, Dockerd};
use lb_tests::lbd::Lbd;
use lb_tests::netns::{unique_name, Netns};

const IMAGE: &str = "lbt-web";

pub struct Latency {
    pub samples: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// `cycles` containers started, then stopped, one at a time: two changes each.
pub fn event_to_datapath(cycles: usize) -> Result<Latency> {
    let ns = Netns::new(&unique_name("bdk"))?;
    let dockerd = Dockerd::start(&ns, "bdk")?;
    build_test_image(&dockerd, IMAGE)?;
    let host = format!("unix://{}", dockerd.socket().display());
    // The containers' frontend, 10.73.0.10, must be in a range labels may take.
    let lbd = Lbd::start_with(
        &ns,
        "bdk",
        "",
        &[],
        &[
            "--docker",
            "--docker-host",
            &host,
            "--label-frontends",
            "10.73.0.0/24",
        ],
    )?;
    let backends = |lbd: &Lbd| -> usize {
        lbd.status()
            .ok()
            .and_then(|s| {
                s["services"]
                    .as_array()?
                    .iter()
                    .find(|svc| svc["source"] == "docker:labels")
                    .and_then(|svc| svc["backends"].as_array().map(|b| b.len()))
            })
            .unwrap_or(0)
    };
    let wait = |lbd: &Lbd, want: usize| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while backends(lbd) != want {
            if Instant::now() > deadline {
                bail!("lbd did not reach {want} backends");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    for i in 0..cycles {
        let name = format!("bench{i}");
        dockerd.docker(&[
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            "lb.frontend=10.73.0.10:80/tcp",
            "--label",
            "lb.port=80",
            IMAGE,
        ])?;
        wait(&lbd, 1)?;
        dockerd.docker(&["rm", "-f", &name])?;
        wait(&lbd, 0)?;
    }
    let status = lbd.status()?;
    let c = &status["convergence"];
    let num = |k: &str| c[k].as_f64().with_context(|| format!("no {k} in {c}"));
    let latency = Latency {
        samples: c["samples"].as_u64().context("no convergence samples")?,
        p50_ms: num("p50_ms")?,
        p99_ms: num("p99_ms")?,
        max_ms: num("max_ms")?,
    };
    drop(lbd);
    drop(dockerd);
    Ok(latency)
}
