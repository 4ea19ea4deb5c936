//! Who answers for a service that could not be applied. The reconciler
//! applies every service on its own and reports those that failed with the
//! source that asked for them; this decides whom each failure concerns: a
//! service of the config file fails that file's reload (the previous file
//! keeps serving), one from Docker is Docker's to report and never
//! rejects the file, and every failure is logged once and shown in status.

use crate::reconciler::{ApplyFailed, Changes, ServiceFailure};

/// The changes made and the services that failed, from `Reconciler::apply`.
pub fn split(result: Result<Changes, ApplyFailed>) -> (Changes, Vec<ServiceFailure>) {
    match result {
        Ok(changes) => (changes, Vec::new()),
        Err(e) => (e.changes, e.failures),
    }
}

/// Whether the service came from the config file (`config:PATH`).
pub fn from_config(f: &ServiceFailure) -> bool {
    f.from_config()
}

/// Whether the service came from Docker (`docker:labels`, `docker:swarm`).
pub fn from_docker(f: &ServiceFailure) -> bool {
    f.from_docker()
}

/// The error that rejects the config file, if one of its services failed.
pub fn config_error(failures: &[ServiceFailure]) -> Option<String> {
    let mine: Vec<String> = failures
        .iter()
        .filter(|f| from_config(f))
        .map(ToString::to_string)
        .collect();
    (!mine.is_empty()).then(|| mine.join("; "))
}

/// Docker's failed services, as its status lists them.
pub fn docker_lines(failures: &[ServiceFailure]) -> Vec<String> {
    lines(failures, from_docker)
}

pub fn etcd_lines(failures: &[ServiceFailure]) -> Vec<String> {
    lines(failures, |f| {
        f.source == crate::sources::etcd_layout::SOURCE
    })
}

fn lines(failures: &[ServiceFailure], keep: impl Fn(&ServiceFailure) -> bool) -> Vec<String> {
    failures
        .iter()
        .filter(|f| keep(f))
        .map(|f| format!("{} ({}): {}", f.name, f.frontend, f.reason))
        .collect()
}

/// Logs the failures that are new since `previous`, and the services that
/// recovered: a failure that persists is logged once, not at every change.
pub fn log_changes(previous: &[ServiceFailure], current: &[ServiceFailure]) {
    for f in current.iter().filter(|f| !previous.contains(f)) {
        log::error!("not applied, {f}");
    }
    for f in previous
        .iter()
        .filter(|p| !current.iter().any(|c| c.frontend == p.frontend))
    {
        log::info!("service {} ({}) is applied again", f.name, f.frontend);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(name: &str, source: &str) -> ServiceFailure {
        ServiceFailure {
            name: name.into(),
            frontend: "10.73.0.10:80/tcp".into(),
            source: source.into(),
            reason: "the backend map is full".into(),
        }
    }

    #[test]
    fn only_the_files_services_reject_the_file() {
        let docker = [
            failure("web", "docker:labels"),
            failure("s", "docker:swarm"),
        ];
        assert_eq!(config_error(&docker), None);
        assert_eq!(docker_lines(&docker).len(), 2);
        let mixed = [
            failure("web", "docker:labels"),
            failure("db", "config:/x.toml"),
        ];
        let err = config_error(&mixed).unwrap();
        assert!(err.contains("db") && !err.contains("web"), "{err}");
        assert_eq!(
            docker_lines(&mixed),
            ["web (10.73.0.10:80/tcp): the backend map is full"]
        );
    }
}
