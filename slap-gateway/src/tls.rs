//! The gateway's mutual TLS: callers present certificates from the cluster's
//! CA, and the gateway talks to replicas with its own (a gateway role).
//!
//! The gateway checks a caller's chain and validity, then passes the
//! certificate's SHA-256 fingerprint to the replica in `X-Slap-Caller`. A
//! replica trusts that header only on a connection authenticated as a
//! gateway, and resolves it against the replicated state on every call, so
//! a revoked certificate is refused through any gateway as soon as the
//! replica applied the revocation. A header a caller sends itself is dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use slap_proto::live::LiveIdentity;

/// The header carrying the verified caller's fingerprint to the replica.
pub const CALLER_HEADER: &str = "x-slap-caller";

/// The gateway's certificate, key and the cluster's CA. The certificate
/// and key are live: what the next handshakes present changes when they
/// are renewed ([`crate::renewal`]).
pub struct TlsFiles {
    pub ca: Vec<CertificateDer<'static>>,
    pub identity: Arc<LiveIdentity>,
    /// gateway.crt and gateway.key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TlsFiles {
    /// Reads gateway.crt, gateway.key and ca.crt from `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<TlsFiles> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f)).map_err(|e| {
                anyhow::anyhow!(
                    "{}/{f}: {e} (make them with `master-node gateway add NAME --host HOST --out {}`)",
                    dir.display(),
                    dir.display()
                )
            })
        };
        Ok(TlsFiles {
            ca: CertificateDer::pem_slice_iter(read("ca.crt")?.as_bytes()).collect::<Result<Vec<_>, _>>()?,
            identity: LiveIdentity::from_pem(&read("gateway.crt")?, &read("gateway.key")?, vec![])?,
            cert_file: dir.join("gateway.crt"),
            key_file: dir.join("gateway.key"),
        })
    }

    fn roots(&self) -> anyhow::Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        Ok(roots)
    }

    /// Callers must present a certificate chaining to the CA. HTTP/2 (the
    /// native API) and HTTP/1.1 (SLAP) are both offered.
    pub fn server_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider.clone())
                .build()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.identity.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // A resumed TLS session skips the client certificate's verification.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }

    /// For the native API's `Cluster` calls: the gateway's identity, and
    /// only a replica's certificate accepted.
    pub fn native_client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let ca = self
            .ca
            .first()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("ca.crt holds no certificate"))?;
        Ok(slap_proto::tls::client_config_live(
            &slap_proto::tls::Trust::Ca(ca),
            self.identity.clone(),
            slap_proto::tls::Expect::AnyReplica,
        )?)
    }

    /// The gateway's own identity towards replicas, which it checks against the CA.
    pub fn client_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots()?)
            .with_client_cert_resolver(self.identity.clone()))
    }
}

/// sha256 (hex) of a certificate, as the Master records it.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(der))
}
