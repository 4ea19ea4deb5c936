//! A bounded background load: requests back to back from a client
//! namespace until the test says stop, each recorded with when it started
//! and what it got, so that a test can tell which failed and when.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use crate::netns::Netns;

/// Sets the flag when dropped, so that background loops end even when the
/// thread that would have stopped them panics.
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

pub struct Sample {
    /// When the request started.
    pub at: SystemTime,
    /// The answer (a backend's name), or the error.
    pub answer: Result<String, String>,
}

/// How long a load may go on even if nobody stops it.
#[derive(Clone, Copy)]
pub struct Bounds {
    pub max_requests: usize,
    pub max_time: Duration,
    /// Between two requests.
    pub pause: Duration,
}

/// Calls `ask` in `client` until `stop` is set or a bound is reached.
pub fn until_stopped(
    client: &Netns,
    stop: &AtomicBool,
    bounds: Bounds,
    ask: impl Fn() -> anyhow::Result<String> + Send + Sync,
) -> Vec<Sample> {
    client.run(|| {
        let start = Instant::now();
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed)
            && out.len() < bounds.max_requests
            && start.elapsed() < bounds.max_time
        {
            let at = SystemTime::now();
            let answer = ask().map_err(|e| format!("{e:#}"));
            out.push(Sample { at, answer });
            sleep(bounds.pause);
        }
        out
    })
}
