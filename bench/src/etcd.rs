//! etcd revision to datapath: a change is written to etcd, and lbd reports
//! in `lbctl status` the revision its maps hold and when it wrote them.
//! Each sample runs from just before the write was sent to the end of
//! lbd's map writes for that revision (the clocks are the same machine's).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use lb_tests::etcd::Etcd;
use lb_tests::lbd::Lbd;
use lb_tests::netns::{unique_name, Netns};

use crate::docker::Latency;

/// `cycles` backends added, then removed, one at a time: two changes each.
pub fn revision_to_datapath(cycles: usize) -> Result<Latency> {
    let ns = Netns::new(&unique_name("bet"))?;
    ns.ip(&["link", "set", "lo", "up"])?;
    let etcd = Etcd::new(&ns, "bet", "127.0.0.1".parse()?)?;
    let endpoint = etcd.endpoint();
    let lbd = Lbd::start_with(
        &ns,
        "bet",
        "",
        &[],
        &["--etcd", &endpoint, "--label-frontends", "10.73.0.0/24"],
    )?;
    let client = etcd.client();
    client.put("/lb/services/bench/frontend", "10.73.0.10:80/tcp")?;
    let mut samples = Vec::with_capacity(cycles * 2);
    for i in 0..cycles {
        let key = format!("/lb/services/bench/backends/b{i}");
        let value = format!("10.72.{}.{}:80", i / 250, i % 250 + 2);
        for delete in [false, true] {
            let sent = now_us();
            let revision = if delete {
                client.delete(&key)?
            } else {
                client.put(&key, &value)?
            };
            samples.push(applied_after(&lbd, revision, sent)?);
        }
    }
    drop(lbd);
    drop(etcd);
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Ok(Latency {
        samples: samples.len() as u64,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: samples[samples.len() - 1],
    })
}

/// Milliseconds from `sent` until lbd's maps held `revision`.
fn applied_after(lbd: &Lbd, revision: u64, sent: u64) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = lbd.status() {
            let etcd = &s["etcd"];
            if etcd["applied_revision"].as_u64().unwrap_or(0) >= revision {
                let at = etcd["applied_at_us"].as_u64().unwrap_or(0);
                return Ok(at.saturating_sub(sent) as f64 / 1e3);
            }
        }
        if Instant::now() > deadline {
            bail!("lbd did not apply etcd revision {revision} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
