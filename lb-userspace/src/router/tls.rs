//! The certificates of the HTTPS listeners: loaded from the files the
//! `[http.tls]` section names, chosen by the server name a client asks
//! for (SNI), and reloaded when the files change.
//!
//! A handshake takes the certificate whose subject alternative names hold
//! the server name (exact names before wildcards); one without a server
//! name, or with a name no certificate holds, takes the first certificate.
//! A certificate is swapped for new handshakes only; connections already
//! made keep theirs. A file that cannot be used (unreadable, not PEM, a key
//! that does not match) keeps the last good certificate in service.

use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::{anyhow, bail, Context as _, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use super::config::CertSpec;

/// Modification time and size of a file (`None`: cannot be read).
type Stamp = Option<(std::time::SystemTime, u64)>;

/// A certificate in service and the names it answers for.
struct Served {
    key: Arc<CertifiedKey>,
    /// Lower case; a wildcard kept as `*.example.com`.
    names: Vec<String>,
}

/// What handshakes choose from; swapped whole when a certificate changes.
#[derive(Default)]
pub struct Certificates {
    served: RwLock<Arc<Vec<Arc<Served>>>>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates").finish_non_exhaustive()
    }
}

impl Certificates {
    fn current(&self) -> Arc<Vec<Arc<Served>>> {
        self.served
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The certificate for `server_name` (see the module's comment).
    fn choose(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let served = self.current();
        let pick = server_name.and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let holds = |n: &str| served.iter().find(|s| s.names.iter().any(|x| x == n));
            holds(&name).or_else(|| {
                // A wildcard stands for exactly one label.
                let (_, parent) = name.split_once('.')?;
                holds(&format!("*.{parent}"))
            })
        });
        pick.or_else(|| served.first()).map(|s| s.key.clone())
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(hello.server_name())
    }
}

/// The TLS side of a listener: ALPN offers HTTP/2 and HTTP/1.1, and every
/// handshake asks `certs` for its certificate.
pub fn acceptor(certs: Arc<Certificates>) -> Result<TlsAcceptor> {
    let provider = Arc::new(ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Resumption by ticket: a returning client skips the full handshake,
    // and no session state is kept here.
    config.ticketer = ring::Ticketer::new().context("TLS session tickets")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// One `[[http.tls.certificate]]` as the watcher last saw it.
struct Entry {
    spec: CertSpec,
    /// The files' stamps when last loaded (or found bad).
    stamps: (Stamp, Stamp),
    /// Stamps seen changed at the last look: loading waits until they hold
    /// still for one poll, so that a cert and a key written one after the
    /// other are read as a pair.
    pending: Option<(Stamp, Stamp)>,
    served: Option<Arc<Served>>,
}

/// What one look at the certificate files did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub loaded: usize,
    pub rejected: usize,
}

/// Keeps `Certificates` in step with the files: owned by the task that
/// polls them.
pub struct Watcher {
    entries: Vec<Entry>,
    target: Arc<Certificates>,
}

impl Watcher {
    /// Loads every certificate of `specs`; the first that cannot be used is
    /// the error, naming its file.
    pub fn start(specs: &[CertSpec]) -> Result<(Watcher, Arc<Certificates>)> {
        if specs.is_empty() {
            bail!("HTTPS needs a certificate: add [[http.tls.certificate]] to the config file");
        }
        let mut entries = Vec::with_capacity(specs.len());
        for spec in specs {
            let stamps = stamps(spec);
            let served = load(spec)?;
            log_loaded(spec, &served);
            entries.push(Entry {
                spec: spec.clone(),
                stamps,
                pending: None,
                served: Some(Arc::new(served)),
            });
        }
        let watcher = Watcher {
            entries,
            target: Arc::new(Certificates::default()),
        };
        watcher.publish();
        let target = watcher.target.clone();
        Ok((watcher, target))
    }

    /// Brings the certificates in line with `specs` and their files. A
    /// changed file is loaded once it has held still for a poll, or at once
    /// when `now` (SIGHUP); a new entry at once. A file that cannot be used
    /// is logged, once, and its entry keeps its last good certificate (a
    /// new entry stays out until its files change).
    pub fn refresh(&mut self, specs: &[CertSpec], now: bool) -> Outcome {
        let mut outcome = Outcome::default();
        let mut old = std::mem::take(&mut self.entries);
        for spec in specs {
            let current = stamps(spec);
            let same_files = |e: &Entry| e.spec.cert == spec.cert && e.spec.key == spec.key;
            let (mut entry, due) = match old.iter().position(same_files) {
                Some(i) => {
                    let mut e = old.swap_remove(i);
                    let due = if current == e.stamps {
                        e.pending = None;
                        now
                    } else if now || e.pending == Some(current) {
                        true
                    } else {
                        e.pending = Some(current);
                        false
                    };
                    (e, due)
                }
                None => {
                    let e = Entry {
                        spec: spec.clone(),
                        stamps: current,
                        pending: None,
                        served: None,
                    };
                    (e, true)
                }
            };
            entry.spec = spec.clone();
            if due {
                entry.pending = None;
                entry.stamps = current;
                match load(spec) {
                    Ok(served) => {
                        log_loaded(spec, &served);
                        entry.served = Some(Arc::new(served));
                        outcome.loaded += 1;
                    }
                    Err(e) => {
                        let keeping = if entry.served.is_some() {
                            "new handshakes keep the last good certificate"
                        } else {
                            "left out until its files change"
                        };
                        log::error!("{e:#}; {keeping}");
                        outcome.rejected += 1;
                    }
                }
            }
            self.entries.push(entry);
        }
        if self.entries.iter().all(|e| e.served.is_none()) {
            // HTTPS is never left without a certificate: those in service stay.
            if outcome.rejected > 0 || !old.is_empty() {
                log::error!("no usable certificate in the config; keeping the ones in service");
            }
            return outcome;
        }
        self.publish();
        outcome
    }

    fn publish(&self) {
        let served: Vec<Arc<Served>> = self
            .entries
            .iter()
            .filter_map(|e| e.served.clone())
            .collect();
        *self
            .target
            .served
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(served);
    }
}

fn log_loaded(spec: &CertSpec, served: &Served) {
    let names = if served.names.is_empty() {
        "no DNS names".into()
    } else {
        served.names.join(", ")
    };
    log::info!("{}: certificate loaded for {names}", spec.cert.display());
}

/// Loads each certificate once, as lbrouter would at its start.
pub fn check(specs: &[CertSpec]) -> Result<()> {
    for spec in specs {
        load(spec)?;
    }
    Ok(())
}

fn stamps(spec: &CertSpec) -> (Stamp, Stamp) {
    (
        crate::config::stamp(&spec.cert),
        crate::config::stamp(&spec.key),
    )
}

/// Reads a certificate chain and its key; errors name the file at fault.
fn load(spec: &CertSpec) -> Result<Served> {
    let read = |path: &Path| {
        std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
    };
    let cert_pem = read(&spec.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{}: not a PEM certificate chain: {e}", spec.cert.display()))?;
    if chain.is_empty() {
        bail!(
            "{}: no certificate in it (expected PEM \"CERTIFICATE\" blocks)",
            spec.cert.display()
        );
    }
    let names = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| {
            anyhow!(
                "{}: not a usable X.509 certificate: {e}",
                spec.cert.display()
            )
        })?
        .valid_dns_names()
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
        .collect();
    let key_pem = read(&spec.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| anyhow!("{}: no PEM private key in it: {e}", spec.key.display()))?;
    let provider: &CryptoProvider = &ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        anyhow!(
            "{}: not the key of {} or not a usable key: {e}",
            spec.key.display(),
            spec.cert.display()
        )
    })?;
    Ok(Served {
        key: Arc::new(key),
        names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("lbu-tls-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    /// A self-signed certificate for `names`: (cert PEM, key PEM, DER).
    fn issue(names: &[&str]) -> (String, String, Vec<u8>) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let c = rcgen::generate_simple_self_signed(names).unwrap();
        (
            c.cert.pem(),
            c.signing_key.serialize_pem(),
            c.cert.der().to_vec(),
        )
    }

    fn write(d: &Dir, name: &str, text: &str) -> CertSpec {
        let spec = CertSpec {
            cert: d.0.join(format!("{name}.pem")),
            key: d.0.join(format!("{name}.key")),
            line: 1,
        };
        let (cert, key) = text.split_once('\0').unwrap();
        std::fs::write(&spec.cert, cert).unwrap();
        std::fs::write(&spec.key, key).unwrap();
        spec
    }

    fn pair(c: &(String, String, Vec<u8>)) -> String {
        format!("{}\0{}", c.0, c.1)
    }

    /// File times advance by the kernel's clock tick (a few ms): without a
    /// pause, a rewrite of the same size could keep the same stamp.
    fn tick() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    fn served(certs: &Certificates, name: Option<&str>) -> Vec<u8> {
        certs.choose(name).unwrap().cert[0].to_vec()
    }

    #[test]
    fn server_name_picks_the_certificate() {
        let d = dir("sni");
        let first = issue(&["default.test"]);
        let api = issue(&["api.example.com", "*.example.org"]);
        let specs = [
            write(&d, "first", &pair(&first)),
            write(&d, "api", &pair(&api)),
        ];
        let (_w, certs) = Watcher::start(&specs).unwrap();
        assert_eq!(served(&certs, Some("api.example.com")), api.2);
        assert_eq!(served(&certs, Some("API.example.com.")), api.2);
        assert_eq!(served(&certs, Some("x.example.org")), api.2);
        assert_eq!(served(&certs, Some("default.test")), first.2);
        assert_eq!(served(&certs, Some("a.b.example.org")), first.2);
        assert_eq!(served(&certs, Some("example.org")), first.2);
        assert_eq!(served(&certs, None), first.2);
    }

    #[test]
    fn changes_are_loaded_once_still_and_bad_files_keep_the_last_good() {
        let d = dir("reload");
        let one = issue(&["a.test"]);
        let two = issue(&["a.test"]);
        let spec = write(&d, "a", &pair(&one));
        let specs = [spec.clone()];
        let (mut w, certs) = Watcher::start(&specs).unwrap();
        assert_eq!(w.refresh(&specs, false), Outcome::default());

        tick();
        write(&d, "a", &pair(&two));
        assert_eq!(
            w.refresh(&specs, false),
            Outcome::default(),
            "not yet still"
        );
        assert_eq!(served(&certs, None), one.2);
        let loaded = Outcome {
            loaded: 1,
            rejected: 0,
        };
        assert_eq!(w.refresh(&specs, false), loaded);
        assert_eq!(served(&certs, None), two.2);

        // A key of another certificate: refused once, the last good stays.
        tick();
        std::fs::write(&spec.key, &one.1).unwrap();
        w.refresh(&specs, false);
        let rejected = Outcome {
            loaded: 0,
            rejected: 1,
        };
        assert_eq!(w.refresh(&specs, false), rejected);
        assert_eq!(w.refresh(&specs, false), Outcome::default(), "logged once");
        assert_eq!(served(&certs, None), two.2);
        // SIGHUP reads again at once.
        tick();
        std::fs::write(&spec.key, &two.1).unwrap();
        assert_eq!(w.refresh(&specs, true), loaded);

        // A new entry whose files are missing stays out, the others serve;
        // a config with nothing usable keeps what serves.
        let missing = CertSpec {
            cert: d.0.join("none.pem"),
            key: d.0.join("none.key"),
            line: 2,
        };
        assert_eq!(w.refresh(&[missing.clone(), spec.clone()], false), rejected);
        assert_eq!(served(&certs, Some("x")), two.2);
        assert_eq!(w.refresh(&[missing], false), Outcome::default());
        assert_eq!(served(&certs, None), two.2);
        assert_eq!(w.refresh(&[], false), Outcome::default());
        assert_eq!(served(&certs, None), two.2);
    }

    #[test]
    fn start_names_the_file_at_fault() {
        let d = dir("start");
        let one = issue(&["a.test"]);
        let other = issue(&["b.test"]);
        let cases = [
            (format!("junk\0{}", one.1), "a.pem: no certificate in it"),
            (format!("{}\0junk", one.0), "a.key: no PEM private key"),
            (format!("{}\0{}", one.0, other.1), "a.key: not the key of"),
        ];
        for (files, expected) in cases {
            let spec = write(&d, "a", &files);
            let e = format!("{:#}", Watcher::start(&[spec]).err().unwrap());
            assert!(e.contains(expected), "{e}");
        }
        assert!(Watcher::start(&[]).is_err());
    }
}
