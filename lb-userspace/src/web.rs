//! The HTTP endpoint behind `lbd --metrics ADDR`: Prometheus metrics and a
//! stats page.

use std::net::SocketAddr;

use anyhow::Result;
use tokio::sync::mpsc;

use crate::control::Call;

/// Serves `/metrics` and `/` on `addr`, answering from the daemon's status.
pub async fn serve(addr: SocketAddr, calls: mpsc::Sender<Call>) -> Result<()> {
    let _ = (addr, calls);
    anyhow::bail!("the metrics endpoint is not supported yet")
}
