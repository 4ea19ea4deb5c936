//! Backends drained with `lbctl drain`, kept in a file beside lbd's other
//! run files so that a restarted lbd keeps them drained: its sources know
//! nothing of drains and would give the backends their weight back.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use serde::{Deserialize, Serialize};

/// (frontend, backend address): a service's backend however `lbctl drain`
/// named them.
pub type Drained = BTreeSet<crate::overrides::Key>;

#[derive(Serialize, Deserialize)]
struct Entry {
    /// `10.73.0.10:80/tcp`
    frontend: String,
    /// `10.72.1.2:8080`, `[fd00::2]:8080`
    backend: String,
}

pub fn path(pin_dir: &Path) -> PathBuf {
    crate::instance::run_file(pin_dir, "drains")
}

/// The drains recorded for `pin_dir`; none when there is no record. A record
/// that does not parse is an error: starting without it would silently
/// undrain backends.
pub fn load(pin_dir: &Path) -> Result<Drained> {
    let path = path(pin_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Drained::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let invalid = || {
        format!(
            "{} (the backends drained with `lbctl drain`) is not valid; fix or remove it",
            path.display()
        )
    };
    let entries: Vec<Entry> = serde_json::from_str(&text).with_context(invalid)?;
    entries
        .into_iter()
        .map(|e| {
            let frontend = crate::config::parse_frontend(&e.frontend)
                .map_err(|why| anyhow!("frontend {:?}: {why}", e.frontend))?;
            let backend = e
                .backend
                .parse()
                .map_err(|why| anyhow!("backend {:?}: {why}", e.backend))?;
            Ok((frontend, backend))
        })
        .collect::<Result<Drained>>()
        .with_context(invalid)
}

/// Records `drained`, atomically: written beside and renamed over, so a
/// crash leaves the old record or the new one, never half of one.
pub fn save(pin_dir: &Path, drained: &Drained) -> Result<()> {
    let path = path(pin_dir);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let entries: Vec<Entry> = drained
        .iter()
        .map(|(frontend, backend)| Entry {
            frontend: frontend.to_string(),
            backend: backend.to_string(),
        })
        .collect();
    let mut tmp = path.clone().into_os_string();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, serde_json::to_vec_pretty(&entries)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))
}

/// Forgets every drain (`lbd --cleanup`, or a teardown on exit).
pub fn forget(pin_dir: &Path) {
    let path = path(pin_dir);
    if let Err(e) = std::fs::remove_file(&path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("removing {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_round_trip_and_a_bad_record_is_refused() {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/lb-drains-test-{}", std::process::id()));
        let mut drained = Drained::new();
        let key = |f: &str, b: &str| {
            (
                crate::config::parse_frontend(f).unwrap(),
                b.parse().unwrap(),
            )
        };
        drained.insert(key("10.73.0.10:80/tcp", "10.0.0.1:80"));
        drained.insert(key("[fd00:73::10]:53/udp", "[fd00::1]:53"));
        save(&pin_dir, &drained).unwrap();
        assert_eq!(load(&pin_dir).unwrap(), drained);
        for bad in [
            "[{\"service\": 1}]",
            "[{\"frontend\": \"10.73.0.10:80\", \"backend\": \"10.0.0.1:80\"}]",
            "[{\"frontend\": \"10.73.0.10:80/tcp\", \"backend\": \"10.0.0.1\"}]",
        ] {
            std::fs::write(path(&pin_dir), bad).unwrap();
            let err = format!("{:#}", load(&pin_dir).unwrap_err());
            assert!(err.contains("is not valid"), "{bad}: {err}");
        }
        forget(&pin_dir);
        assert!(load(&pin_dir).unwrap().is_empty());
    }
}
