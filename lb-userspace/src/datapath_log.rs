//! The datapath's rare events (a failed rewrite, SNAT port exhaustion, a
//! conntrack insert that failed, a packet dropped for being too big),
//! reported through aya-log and drained into lbd's own log.
//!
//! Off by default. The level is a global of the eBPF object (aya-log's
//! `AYA_LOG_LEVEL`), set when the object is loaded: it lives in read-only
//! data that the verifier sees as a constant, so with logging off the
//! verifier drops the logging branches and the packet path carries none of
//! them. The events are only logged on those rare paths, never per packet.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context as _, Result};
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// `--datapath-log`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DatapathLog {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
}

impl DatapathLog {
    /// The value of the object's level global: aya-log's levels count from
    /// 1 (error), and a record is kept when its level is at most this.
    pub fn global(self) -> u8 {
        match self {
            DatapathLog::Off => 0,
            DatapathLog::Error => aya_log::Level::Error as u8,
            DatapathLog::Warn => aya_log::Level::Warn as u8,
            DatapathLog::Info => aya_log::Level::Info as u8,
            DatapathLog::Debug => aya_log::Level::Debug as u8,
        }
    }

    /// What lbd's logger must let through for the datapath's records.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            DatapathLog::Off => log::LevelFilter::Off,
            DatapathLog::Error => log::LevelFilter::Error,
            DatapathLog::Warn => log::LevelFilter::Warn,
            DatapathLog::Info => log::LevelFilter::Info,
            DatapathLog::Debug => log::LevelFilter::Debug,
        }
    }
}

impl FromStr for DatapathLog {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "off" => DatapathLog::Off,
            "error" => DatapathLog::Error,
            "warn" => DatapathLog::Warn,
            "info" => DatapathLog::Info,
            "debug" => DatapathLog::Debug,
            other => {
                return Err(format!(
                    "{other:?}: expected off, error, warn, info or debug"
                ))
            }
        })
    }
}

impl fmt::Display for DatapathLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DatapathLog::Off => "off",
            DatapathLog::Error => "error",
            DatapathLog::Warn => "warn",
            DatapathLog::Info => "info",
            DatapathLog::Debug => "debug",
        })
    }
}

/// The module path the datapath's records carry as their target.
pub const TARGET: &str = "lb_ebpf";

/// Forwards the datapath's records to lbd's logger whenever the ring
/// buffer has some, until the daemon stops.
pub async fn drain(logger: EbpfLogger<&'static dyn log::Log>) -> Result<()> {
    // aya-log 0.3 leaves waiting for records to the caller.
    // SAFETY: the fd is the ring buffer's, owned by the logger, which the
    // AsyncFd owns: it stays open, and the same, for the AsyncFd's life.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("watching the datapath's log buffer")?;
    loop {
        let mut ready = fd.readable_mut().await?;
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_map_to_aya_log() {
        for (text, global) in [
            ("off", 0),
            ("error", 1),
            ("warn", 2),
            ("info", 3),
            ("debug", 4),
        ] {
            let level: DatapathLog = text.parse().unwrap();
            assert_eq!(level.global(), global, "{text}");
            assert_eq!(level.to_string(), text);
        }
        assert_eq!(DatapathLog::default(), DatapathLog::Off);
        let e = "trace".parse::<DatapathLog>().unwrap_err();
        assert!(e.contains("expected off, error"), "{e}");
    }
}
