//! Where the Docker engine is, found as the docker CLI finds it:
//! `--docker-host`, else `DOCKER_HOST`, else the local socket. A `tcp://`
//! engine is spoken to over TLS when `DOCKER_TLS_VERIFY` is set (to
//! anything but the empty string), with `ca.pem`, `cert.pem` and `key.pem`
//! from `DOCKER_CERT_PATH` (default `~/.docker`), and its port defaults to
//! 2376 with TLS, 2375 without, as the CLI's do.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use bollard::Docker;

pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Seconds a request to the engine may take.
const TIMEOUT: u64 = 30;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Engine {
    Unix(PathBuf),
    /// `host:port`, plain HTTP.
    Tcp(String),
    /// `host:port` over TLS, verified against `certs`/ca.pem and presenting
    /// `certs`/cert.pem and key.pem.
    Tls {
        addr: String,
        certs: PathBuf,
    },
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Engine::Unix(path) => write!(f, "unix://{}", path.display()),
            Engine::Tcp(addr) | Engine::Tls { addr, .. } => write!(f, "tcp://{addr}"),
        }
    }
}

/// The engine from the `--docker-host` flag, if given, and the environment
/// (`env` reads one variable; a variable set to "" counts as unset, as for
/// the docker CLI).
pub fn resolve(flag: Option<&str>, env: &dyn Fn(&str) -> Option<String>) -> Result<Engine, String> {
    let env = |name: &str| env(name).filter(|v| !v.is_empty());
    let (host, from) = match flag {
        Some(h) => (h.to_string(), "--docker-host"),
        None => match env("DOCKER_HOST") {
            Some(h) => (h, "DOCKER_HOST"),
            None => return Ok(Engine::Unix(PathBuf::from(DEFAULT_SOCKET))),
        },
    };
    let host = host.trim();
    let bad = |why: &str| format!("{from} {host:?}: {why}");
    if let Some(path) = host.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(bad("expected unix:///absolute/path"));
        }
        return Ok(Engine::Unix(PathBuf::from(path)));
    }
    if host.starts_with('/') {
        return Ok(Engine::Unix(PathBuf::from(host)));
    }
    let Some(rest) = host.strip_prefix("tcp://") else {
        return Err(bad(
            "unsupported address; expected unix:///path/to/socket or tcp://host[:port]",
        ));
    };
    let tls = env("DOCKER_TLS_VERIFY").is_some();
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (name, port) = split_host_port(rest).map_err(|why| bad(&why))?;
    let port = match port {
        Some(p) => p,
        None if tls => 2376,
        None => 2375,
    };
    let addr = if name.contains(':') {
        format!("[{name}]:{port}")
    } else {
        format!("{name}:{port}")
    };
    if !tls {
        return Ok(Engine::Tcp(addr));
    }
    let certs = match (env("DOCKER_CERT_PATH"), env("HOME")) {
        (Some(dir), _) => PathBuf::from(dir),
        (None, Some(home)) => Path::new(&home).join(".docker"),
        (None, None) => {
            return Err(
                "DOCKER_TLS_VERIFY is set but neither DOCKER_CERT_PATH nor HOME is".to_string(),
            )
        }
    };
    Ok(Engine::Tls { addr, certs })
}

/// "host", "host:port", "[v6]" or "[v6]:port"; the host must not be empty.
fn split_host_port(s: &str) -> Result<(&str, Option<u16>), String> {
    let port = |p: &str| -> Result<u16, String> {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("invalid port {p:?}"))
    };
    let (name, port) = if let Some(bracketed) = s.strip_prefix('[') {
        let (name, after) = bracketed
            .split_once(']')
            .ok_or_else(|| "unclosed [".to_string())?;
        match after {
            "" => (name, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (name, Some(port(p)?)),
                None => return Err(format!("unexpected {after:?} after ]")),
            },
        }
    } else {
        match s.split_once(':') {
            None => (s, None),
            Some((_, p)) if p.contains(':') => {
                return Err("an IPv6 address must be in brackets, as in tcp://[::1]:2375".into())
            }
            Some((name, p)) => (name, Some(port(p)?)),
        }
    };
    if name.is_empty() || name.contains('/') {
        return Err("expected tcp://host[:port]".into());
    }
    Ok((name, port))
}

impl Engine {
    /// For TLS: the files the connection needs, readable now, so that a
    /// missing one is said at start-up rather than at every reconnection.
    pub fn check_files(&self) -> Result<()> {
        if let Engine::Tls { certs, .. } = self {
            for name in ["ca.pem", "cert.pem", "key.pem"] {
                let path = certs.join(name);
                std::fs::File::open(&path)
                    .with_context(|| format!("DOCKER_TLS_VERIFY is set: {}", path.display()))?;
            }
        }
        Ok(())
    }

    pub fn connect(&self) -> Result<Docker> {
        let version = bollard::API_DEFAULT_VERSION;
        let docker = match self {
            Engine::Unix(path) => {
                Docker::connect_with_socket(&format!("unix://{}", path.display()), TIMEOUT, version)
            }
            Engine::Tcp(addr) => Docker::connect_with_http(addr, TIMEOUT, version),
            Engine::Tls { addr, certs } => Docker::connect_with_ssl(
                addr,
                &certs.join("key.pem"),
                &certs.join("cert.pem"),
                &certs.join("ca.pem"),
                TIMEOUT,
                version,
            ),
        };
        docker.with_context(|| format!("connecting to {self}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_with(flag: Option<&str>, vars: &[(&str, &str)]) -> Result<Engine, String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve(flag, &|name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn the_local_socket_by_default() {
        assert_eq!(
            resolve_with(None, &[]),
            Ok(Engine::Unix(PathBuf::from("/var/run/docker.sock")))
        );
        // Empty counts as unset.
        assert_eq!(
            resolve_with(None, &[("DOCKER_HOST", "")]),
            Ok(Engine::Unix(PathBuf::from("/var/run/docker.sock")))
        );
    }

    #[test]
    fn docker_host_and_the_flag_before_it() {
        let env = [("DOCKER_HOST", "unix:///run/other.sock")];
        assert_eq!(
            resolve_with(None, &env),
            Ok(Engine::Unix(PathBuf::from("/run/other.sock")))
        );
        assert_eq!(
            resolve_with(Some("tcp://10.0.0.5:2375"), &env),
            Ok(Engine::Tcp("10.0.0.5:2375".into()))
        );
        assert_eq!(
            resolve_with(Some("/run/x.sock"), &env),
            Ok(Engine::Unix(PathBuf::from("/run/x.sock")))
        );
    }

    #[test]
    fn tcp_ports_default_as_the_cli_does() {
        assert_eq!(
            resolve_with(None, &[("DOCKER_HOST", "tcp://docker.example")]),
            Ok(Engine::Tcp("docker.example:2375".into()))
        );
        assert_eq!(
            resolve_with(None, &[("DOCKER_HOST", "tcp://[fd00::5]/")]),
            Ok(Engine::Tcp("[fd00::5]:2375".into()))
        );
        assert_eq!(
            resolve_with(None, &[("DOCKER_HOST", "tcp://[fd00::5]:4243")]),
            Ok(Engine::Tcp("[fd00::5]:4243".into()))
        );
        let tls = resolve_with(
            None,
            &[
                ("DOCKER_HOST", "tcp://docker.example"),
                ("DOCKER_TLS_VERIFY", "1"),
                ("DOCKER_CERT_PATH", "/etc/lbd/docker"),
            ],
        );
        assert_eq!(
            tls,
            Ok(Engine::Tls {
                addr: "docker.example:2376".into(),
                certs: PathBuf::from("/etc/lbd/docker")
            })
        );
        assert_eq!(tls.unwrap().to_string(), "tcp://docker.example:2376");
    }

    #[test]
    fn tls_settings_apply_to_the_flag_too_and_certs_default_to_home() {
        let env = [("DOCKER_TLS_VERIFY", "1"), ("HOME", "/root")];
        assert_eq!(
            resolve_with(Some("tcp://10.0.0.5:2376"), &env),
            Ok(Engine::Tls {
                addr: "10.0.0.5:2376".into(),
                certs: PathBuf::from("/root/.docker")
            })
        );
        // TLS is about tcp; a socket stays a socket.
        assert_eq!(
            resolve_with(Some("unix:///run/d.sock"), &env),
            Ok(Engine::Unix(PathBuf::from("/run/d.sock")))
        );
        // Set but empty is off, as for the CLI.
        assert_eq!(
            resolve_with(
                Some("tcp://10.0.0.5"),
                &[("DOCKER_TLS_VERIFY", ""), ("HOME", "/root")]
            ),
            Ok(Engine::Tcp("10.0.0.5:2375".into()))
        );
        let e = resolve_with(Some("tcp://10.0.0.5"), &[("DOCKER_TLS_VERIFY", "1")]).unwrap_err();
        assert!(e.contains("DOCKER_CERT_PATH"), "{e}");
    }

    #[test]
    fn bad_addresses_say_which_setting_and_why() {
        let cases = [
            (Some("ssh://me@host"), "", "--docker-host", "unsupported"),
            (
                None,
                "npipe:////./pipe/docker",
                "DOCKER_HOST",
                "unsupported",
            ),
            (None, "docker.example:2375", "DOCKER_HOST", "unsupported"),
            (None, "tcp://", "DOCKER_HOST", "tcp://host"),
            (None, "tcp://host:0", "DOCKER_HOST", "invalid port"),
            (None, "tcp://host:http", "DOCKER_HOST", "invalid port"),
            (None, "tcp://fd00::5:2375", "DOCKER_HOST", "brackets"),
            (None, "tcp://host:2375/v1", "DOCKER_HOST", "invalid port"),
            (None, "unix://relative.sock", "DOCKER_HOST", "absolute"),
        ];
        for (flag, env, from, why) in cases {
            let e = resolve_with(flag, &[("DOCKER_HOST", env)]).unwrap_err();
            assert!(
                e.starts_with(from) && e.contains(why),
                "{flag:?} {env:?}: {e}"
            );
        }
    }

    #[test]
    fn missing_certificates_are_named() {
        let engine = Engine::Tls {
            addr: "10.0.0.5:2376".into(),
            certs: PathBuf::from("/nonexistent/lbd-certs"),
        };
        let e = format!("{:#}", engine.check_files().unwrap_err());
        assert!(e.contains("/nonexistent/lbd-certs/ca.pem"), "{e}");
        assert!(Engine::Tcp("10.0.0.5:2375".into()).check_files().is_ok());
    }
}
