//! Keeps lbd's background tasks (the interface watcher, the control socket,
//! the metrics endpoint) running. A task that ends with an error is logged
//! and started again after a backoff; its health is shared with the daemon
//! for `lbctl status` and the metrics, so a task that keeps failing is seen
//! rather than silently missing (a dead interface watcher means new
//! container veths are never attached).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;

pub use crate::status::TaskStatus;

/// First wait before a restart; doubled after each failure up to
/// `BACKOFF_MAX`.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run that lasted this long counts as healthy: the next failure starts
/// the backoff afresh.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// The health of every supervised task, by name.
#[derive(Clone, Default)]
pub struct Tasks(Arc<Mutex<BTreeMap<String, TaskStatus>>>);

impl Tasks {
    pub fn snapshot(&self) -> BTreeMap<String, TaskStatus> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut TaskStatus)) {
        if let Ok(mut m) = self.0.lock() {
            f(m.entry(name.to_string()).or_default());
        }
    }

    /// Runs `task` (made afresh by `make` for every run) until it returns
    /// `Ok` (it is done, e.g. because the daemon is stopping), restarting
    /// it with a backoff whenever it fails. `fault`: fail the first run
    /// once it has run for a moment, for tests of this very supervision
    /// (`lbd --inject-fault TASK`).
    pub fn spawn<F, Fut>(&self, name: &'static str, fault: bool, mut make: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        let tasks = self.clone();
        tasks.update(name, |s| s.running = true);
        tokio::spawn(async move {
            let mut backoff = BACKOFF_MIN;
            let mut fault = fault;
            loop {
                tasks.update(name, |s| s.running = true);
                let started = Instant::now();
                // A task of its own, so that a panic is a failure like any
                // other instead of the end of supervision.
                let mut run = tokio::spawn(make());
                let inject = std::mem::take(&mut fault);
                let result = tokio::select! {
                    r = &mut run => r.unwrap_or_else(|e| Err(anyhow::anyhow!("{e}"))),
                    _ = tokio::time::sleep(Duration::from_secs(1)), if inject => {
                        run.abort();
                        Err(anyhow::anyhow!("fault injected by --inject-fault"))
                    }
                };
                let e = match result {
                    Ok(()) => {
                        tasks.update(name, |s| s.running = false);
                        return;
                    }
                    Err(e) => e,
                };
                if started.elapsed() >= HEALTHY_RUN {
                    backoff = BACKOFF_MIN;
                }
                log::error!("{name} failed: {e:#}; restarting in {backoff:?}");
                let at = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .ok();
                tasks.update(name, |s| {
                    s.running = false;
                    s.restarts += 1;
                    s.last_error = Some(format!("{e:#}"));
                    s.last_error_at = at;
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_failing_task_is_restarted_with_backoff_and_its_health_recorded() {
        let tasks = Tasks::default();
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        tasks.spawn("flaky", false, move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    anyhow::bail!("run {n} broke")
                }
                // The fourth run stays up.
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        // 100 + 200 + 400 ms of backoff, in paused time.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        let s = &tasks.snapshot()["flaky"];
        assert!(s.running);
        assert_eq!(s.restarts, 3);
        assert_eq!(s.last_error.as_deref(), Some("run 2 broke"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_injected_fault_ends_the_first_run_only() {
        let tasks = Tasks::default();
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        tasks.spawn("watcher", true, move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async {
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        let s = &tasks.snapshot()["watcher"];
        assert!(s.running);
        assert_eq!(s.restarts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_is_a_failure_too() {
        let tasks = Tasks::default();
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        tasks.spawn("panicky", false, move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                assert!(n > 0, "first run panics");
                std::future::pending::<()>().await;
                Ok(())
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(tasks.snapshot()["panicky"].restarts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_finishes_is_not_restarted() {
        let tasks = Tasks::default();
        tasks.spawn("done", false, || async { Ok(()) });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = &tasks.snapshot()["done"];
        assert!(!s.running);
        assert_eq!(s.restarts, 0);
    }
}
