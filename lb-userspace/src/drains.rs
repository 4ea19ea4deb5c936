//! Backends drained with `lbctl drain`, kept in a file beside lbd's other
//! run files so that a restarted lbd keeps them drained: its sources know
//! nothing of drains and would give the backends their weight back.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// (service name, backend address), as `lbctl drain` names them.
pub type Drained = BTreeSet<(String, String)>;

#[derive(Serialize, Deserialize)]
struct Entry {
    service: String,
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
    let entries: Vec<Entry> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} (the backends drained with `lbctl drain`) is not valid; fix or remove it",
            path.display()
        )
    })?;
    Ok(entries
        .into_iter()
        .map(|e| (e.service, e.backend))
        .collect())
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
        .map(|(service, backend)| Entry {
            service: service.clone(),
            backend: backend.clone(),
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
        drained.insert(("web".into(), "10.0.0.1:80".into()));
        drained.insert(("dns \"x\"".into(), "[fd00::1]:53".into()));
        save(&pin_dir, &drained).unwrap();
        assert_eq!(load(&pin_dir).unwrap(), drained);
        std::fs::write(path(&pin_dir), "[{\"service\": 1}]").unwrap();
        let err = format!("{:#}", load(&pin_dir).unwrap_err());
        assert!(err.contains("is not valid"), "{err}");
        forget(&pin_dir);
        assert!(load(&pin_dir).unwrap().is_empty());
    }
}
