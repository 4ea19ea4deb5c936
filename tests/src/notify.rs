//! A systemd notification socket, as `Type=notify-reload` units get: give
//! its path to lbd as `NOTIFY_SOCKET`. A thread reads each message as it
//! arrives and notes when, so a start can be timed to the moment lbd said
//! READY, however late the caller asks.

use std::net::Shutdown;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

pub struct NotifySocket {
    pub path: PathBuf,
    messages: Receiver<(Instant, String)>,
    /// The reader's socket, shut down to end it.
    socket: UnixDatagram,
    reader: Option<JoinHandle<()>>,
}

impl NotifySocket {
    pub fn new(name: &str) -> Result<NotifySocket> {
        let path = std::env::temp_dir().join(format!("{name}-{}.notify", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path)
            .with_context(|| format!("binding the notify socket {}", path.display()))?;
        let read = socket.try_clone()?;
        let (tx, messages) = channel();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // sd_notify never sends an empty message: 0 bytes is the
            // shutdown in Drop.
            while let Ok(n @ 1..) = read.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                if tx.send((Instant::now(), msg)).is_err() {
                    return;
                }
            }
        });
        Ok(NotifySocket {
            path,
            messages,
            socket,
            reader: Some(reader),
        })
    }

    /// The next message with the line `what` (others are skipped), and when
    /// it arrived.
    pub fn expect_within(&self, what: &str, timeout: Duration) -> Result<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok((at, msg)) if msg.lines().any(|l| l == what) => return Ok((at, msg)),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    bail!("no {what} within {} s", timeout.as_secs_f64())
                }
                Err(RecvTimeoutError::Disconnected) => bail!("the notify socket failed"),
            }
        }
    }

    /// [`Self::expect_within`] 15 s, the message alone; panics if none came.
    pub fn expect(&self, what: &str) -> String {
        self.expect_within(what, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("waiting for {what}: {e:#}"))
            .1
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(Shutdown::Read);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
