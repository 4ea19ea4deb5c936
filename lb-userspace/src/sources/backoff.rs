//! How long a source waits before reconnecting: doubling from 100 ms to
//! 5 s, and from 100 ms again once a connection has worked.

use std::time::Duration;

const MIN: Duration = Duration::from_millis(100);
const MAX: Duration = Duration::from_secs(5);

pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(MIN)
    }
}

impl Backoff {
    pub fn reset(&mut self) {
        self.0 = MIN;
    }

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(MAX);
    }
}
