//! Readiness and reloads told to systemd (sd_notify(3)), for units of
//! `Type=notify-reload`: READY once the first state is in the datapath and
//! the datapath is attached to the node's interfaces, RELOADING with the
//! monotonic time when a reload starts, READY again when it is done,
//! STOPPING on the way out. Without `NOTIFY_SOCKET` (not run by systemd)
//! every call does nothing.

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    // Keep NOTIFY_SOCKET: later reloads notify too.
    if let Err(e) = sd_notify::notify(false, states) {
        log::debug!("sd_notify: {e}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => log::debug!("reading the monotonic clock: {e}"),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}
