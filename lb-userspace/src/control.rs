//! lbd's end of the control socket: one JSON request per line, one JSON
//! response per line (the protocol itself is in lb-api). The socket is mode
//! 0600, so only root can use it.

use std::path::Path;

use anyhow::{anyhow, Context as _, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

pub use lb_api::control::{request, Request, Response, DEFAULT_SOCKET};

/// A request on its way to the daemon's main loop, with where to answer.
pub type Call = (Request, oneshot::Sender<Response>);

/// Accepts connections on `path` and forwards each request to `calls`.
pub async fn serve(path: &Path, calls: mpsc::Sender<Call>) -> Result<()> {
    if path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let calls = calls.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, calls).await {
                log::debug!("control connection: {e:#}");
            }
        });
    }
}

async fn handle(stream: UnixStream, calls: mpsc::Sender<Call>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                calls
                    .send((request, tx))
                    .await
                    .map_err(|_| anyhow!("daemon stopping"))?;
                rx.await.map_err(|_| anyhow!("daemon stopping"))?
            }
            Err(e) => Response::Error(format!("bad request: {e}")),
        };
        let mut out = serde_json::to_vec(&response)?;
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}
