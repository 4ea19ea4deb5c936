//! lbd's log: plain lines with a timestamp on a terminal or in a file, and
//! under systemd lines that journald understands: a `<N>` syslog priority
//! prefix (sd-daemon(3)) and no timestamp of our own, journald adds one.

use std::io::Write as _;

/// Default filter; `netlink_packet_route` warns about every attribute it
/// does not know, which is noise for lbd's operators.
const QUIET: &str = "netlink_packet_route=error";

/// Sets up logging at `level` (error, warn, info, debug, trace). `RUST_LOG`,
/// when set, takes precedence and may name modules
/// (`RUST_LOG=info,lb_userspace::health=debug`). `datapath` is the level of
/// the datapath's own records (`--datapath-log`, see datapath_log.rs).
pub fn init(level: &str, datapath: log::LevelFilter) {
    let default = format!("{level},{QUIET}");
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default));
    if datapath != log::LevelFilter::Off {
        // Asked for explicitly, so it holds whatever RUST_LOG says.
        builder.filter_module(crate::datapath_log::TARGET, datapath);
    }
    if stderr_is_journal() {
        builder.format(|buf, record| {
            writeln!(
                buf,
                "<{}>{}: {}",
                priority(record.level()),
                record.target(),
                record.args()
            )
        });
    }
    builder.init();
}

/// The syslog priority journald files a line under.
fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Whether standard error is the stream systemd connected to journald:
/// `JOURNAL_STREAM` holds its `device:inode`, and a redirection of stderr
/// (to a file, say) must not be mistaken for it.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(wanted) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::File::open("/proc/self/fd/2").and_then(|f| f.metadata()) else {
        return false;
    };
    wanted == format!("{}:{}", meta.dev(), meta.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(priority(log::Level::Error), 3);
        assert_eq!(priority(log::Level::Warn), 4);
        assert_eq!(priority(log::Level::Info), 6);
        assert_eq!(priority(log::Level::Debug), 7);
    }
}
