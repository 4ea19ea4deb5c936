//! Active health checks. One task per (service, backend, check) probes the
//! backend from lbd's network namespace and reports transitions only: down
//! after `fall` failures in a row, up again after `rise` successes. The
//! daemon turns a down backend into "no new flows".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::model::{CheckKind, Frontend, HealthCheck, ServiceSpec};

#[derive(Clone, Debug)]
pub struct Transition {
    pub frontend: Frontend,
    pub backend: SocketAddr,
    pub up: bool,
    /// Why the last probe failed, or "ok".
    pub detail: String,
}

type Key = (Frontend, SocketAddr, HealthCheck);

/// The running checkers, kept equal to the services' check settings.
pub struct Checkers {
    tasks: HashMap<Key, JoinHandle<()>>,
    tx: mpsc::Sender<Transition>,
}

impl Checkers {
    pub fn new(tx: mpsc::Sender<Transition>) -> Checkers {
        Checkers {
            tasks: HashMap::new(),
            tx,
        }
    }

    /// Starts checkers for new (service, backend) pairs and stops those of
    /// pairs that are gone or whose settings changed.
    pub fn sync(&mut self, services: &[ServiceSpec]) {
        let mut wanted: Vec<Key> = Vec::new();
        for s in services {
            if let Some(check) = &s.health {
                for b in &s.backends {
                    wanted.push((s.frontend, b.socket_addr(), check.clone()));
                }
            }
        }
        self.tasks.retain(|key, task| {
            let keep = wanted.contains(key);
            if !keep {
                task.abort();
            }
            keep
        });
        for key in wanted {
            if !self.tasks.contains_key(&key) {
                let task = tokio::spawn(run(key.0, key.1, key.2.clone(), self.tx.clone()));
                self.tasks.insert(key, task);
            }
        }
    }

    /// Whether (frontend, backend) is checked at all.
    pub fn checks(&self, frontend: &Frontend, backend: &SocketAddr) -> bool {
        self.tasks
            .keys()
            .any(|(f, b, _)| f == frontend && b == backend)
    }
}

impl Drop for Checkers {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

async fn run(
    frontend: Frontend,
    backend: SocketAddr,
    check: HealthCheck,
    tx: mpsc::Sender<Transition>,
) {
    // A backend starts up, as in HAProxy: a new backend takes traffic at
    // once, and `fall` failures take it out.
    let mut up = true;
    let mut streak = 0u32;
    let mut interval = tokio::time::interval(Duration::from_millis(check.interval_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let result = probe(backend, &check).await;
        let changed = match (&result, up) {
            (Ok(()), true) | (Err(_), false) => {
                streak = 0;
                false
            }
            (Err(_), true) => {
                streak += 1;
                streak >= check.fall
            }
            (Ok(()), false) => {
                streak += 1;
                streak >= check.rise
            }
        };
        if changed {
            up = !up;
            streak = 0;
            let detail = match result {
                Ok(()) => "ok".to_string(),
                Err(e) => e,
            };
            let t = Transition {
                frontend,
                backend,
                up,
                detail,
            };
            if tx.send(t).await.is_err() {
                return;
            }
        }
    }
}

async fn probe(backend: SocketAddr, check: &HealthCheck) -> Result<(), String> {
    let timeout = Duration::from_millis(check.timeout_ms);
    let attempt = async {
        let mut stream = TcpStream::connect(backend)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        match &check.kind {
            CheckKind::Tcp => Ok(()),
            CheckKind::Http {
                path,
                status_min,
                status_max,
            } => {
                let status = http_status(&mut stream, backend, path).await?;
                if (*status_min..=*status_max).contains(&status) {
                    Ok(())
                } else {
                    Err(format!("HTTP status {status}"))
                }
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// One HTTP/1.0 GET, reading only the status line. Written by hand because
/// a probe needs nothing of a full client: no body, no keep-alive, no
/// redirects; the server closes the connection after its answer.
async fn http_status(
    stream: &mut TcpStream,
    backend: SocketAddr,
    path: &str,
) -> Result<u16, String> {
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {backend}\r\nUser-Agent: lbd-health\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < head.len() && !head[..len].contains(&b'\n') {
        let n = stream
            .read(&mut head[len..])
            .await
            .map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let line = String::from_utf8_lossy(&head[..len]);
    let mut words = line.split_whitespace();
    match (
        words.next(),
        words.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok(code),
        _ => Err(format!(
            "not an HTTP answer: {:?}",
            line.lines().next().unwrap_or("")
        )),
    }
}
