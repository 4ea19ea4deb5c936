//! TLS for lbrouter's HTTPS tests: a certificate authority made at test
//! time, certificates it signs, and a client that connects over TLS and
//! tells which certificate it was served and which protocol ALPN chose.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{self, ring, CryptoProvider};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_rustls::TlsConnector;

/// A certificate authority of the test's own.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub root: CertificateDer<'static>,
}

/// A certificate and its key, as PEM files hold them.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Ca {
    pub fn new(name: &str) -> Result<Ca> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate()?;
        let root = params.self_signed(&key)?.der().clone();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            root,
        })
    }

    /// A server certificate for `names` (`*.example.com` allowed), with a
    /// key of its own.
    pub fn issue(&self, names: &[&str]) -> Result<Issued> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        })
    }
}

/// How the client checks the server's certificate.
pub enum Trust<'a> {
    /// Signed by this authority for the name asked for.
    Ca(&'a Ca),
    /// Anything: for handshakes whose certificate the test compares itself
    /// (no server name, or a name no certificate holds).
    Any,
}

/// What the server showed in the handshake.
pub struct Served {
    pub cert: CertificateDer<'static>,
    /// The protocol ALPN chose, if any.
    pub alpn: Option<Vec<u8>>,
}

/// A TLS connection to `addr`, asking for `name` by SNI (`None`: no server
/// name, as a client that dials an address sends) and offering `alpn`.
pub async fn connect(
    addr: SocketAddr,
    name: Option<&str>,
    alpn: &[&str],
    trust: Trust<'_>,
) -> Result<(TlsStream<TcpStream>, Served)> {
    let provider = Arc::new(ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = match trust {
        Trust::Ca(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca.root.clone())?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Any => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let server_name = match name {
        Some(n) => ServerName::try_from(n.to_string())?,
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let tcp = TcpStream::connect(addr).await?;
    let stream = TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {addr} for {name:?}"))?;
    let (_, conn) = stream.get_ref();
    let served = Served {
        cert: conn
            .peer_certificates()
            .and_then(|c| c.first())
            .context("no certificate served")?
            .clone()
            .into_owned(),
        alpn: conn.alpn_protocol().map(|p| p.to_vec()),
    };
    Ok((stream, served))
}

/// Takes any certificate but still checks the handshake's signatures.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, tokio_rustls::rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
