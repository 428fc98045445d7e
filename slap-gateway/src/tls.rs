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

use slap_proto::live::{LiveClientVerifier, LiveIdentity, LiveServerVerifier, LiveTrust};

/// The header carrying the verified caller's fingerprint to the replica.
pub const CALLER_HEADER: &str = "x-slap-caller";

/// The gateway's certificate, key and the cluster's CA. The certificate
/// and key are live: what the next handshakes present changes when they
/// are renewed ([`crate::renewal`]).
pub struct TlsFiles {
    /// The CAs of ca.crt, read again with the certificate.
    pub trust: Arc<LiveTrust>,
    pub identity: Arc<LiveIdentity>,
    /// gateway.crt, gateway.key and ca.crt.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
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
            trust: LiveTrust::from_pem(&read("ca.crt")?)?,
            identity: LiveIdentity::from_pem(&read("gateway.crt")?, &read("gateway.key")?, vec![])?,
            cert_file: dir.join("gateway.crt"),
            key_file: dir.join("gateway.key"),
            ca_file: dir.join("ca.crt"),
        })
    }

    /// Callers must present a certificate chaining to a CA of ca.crt (as
    /// it stands at each handshake). HTTP/2 (the native API) and HTTP/1.1
    /// (SLAP) are both offered.
    pub fn server_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = LiveClientVerifier::new(self.trust.clone(), false)?;
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
        Ok(slap_proto::tls::client_config_live(
            &slap_proto::tls::Trust::Live(self.trust.clone()),
            self.identity.clone(),
            slap_proto::tls::Expect::AnyReplica,
        )?)
    }

    /// The gateway's own identity towards replicas, which it checks against the CAs.
    pub fn client_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(LiveServerVerifier::new(self.trust.clone()))
            .with_client_cert_resolver(self.identity.clone()))
    }
}

/// sha256 (hex) of a certificate, as the Master records it.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(der))
}
