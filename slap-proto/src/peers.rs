//! Mutual TLS between two partitions (the tunnels of the node agent): both
//! ends present their partition certificate from the cluster CA, and each
//! end checks that the other is the partition it expects.
//!
//! Partition certificates name their partition in the subject
//! (`partition:COMPUTER/PARTITION`) and are client certificates by their
//! extended key usage, with no server name. So both ends check the peer's
//! chain as a client certificate (rustls' `WebPkiClientVerifier`) and then
//! its partition: the server end against its allow list, during the
//! handshake, so a partition not on it never gets a byte through; the
//! client end against the one partition it means to reach.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DistinguishedName, RootCertStore};

use crate::pem::TlsError;
use crate::tls::{common_name, ClientIdentity};

/// `COMPUTER/PARTITION` of a partition certificate.
pub fn partition_of(der: &[u8]) -> Option<String> {
    common_name(der)?.strip_prefix("partition:").map(str::to_string)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn chain_checker(roots: RootCertStore) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Config(format!("the cluster CA is unusable: {e}")))
}

/// The server end's check of a connecting partition.
#[derive(Debug)]
pub struct AllowedPartitions {
    chain: Arc<dyn ClientCertVerifier>,
    allow: Vec<String>,
    /// Handshakes refused because the peer is not allowed (or not a
    /// partition of the cluster).
    pub refused: AtomicU64,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AllowedPartitions {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let refuse = |why: String| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            rustls::Error::General(why)
        };
        if let Err(e) = self.chain.verify_client_cert(end_entity, intermediates, now) {
            return Err(refuse(format!(
                "the peer's certificate is not from the cluster CA: {e}"
            )));
        }
        match partition_of(end_entity) {
            Some(p) if self.allow.contains(&p) => Ok(ClientCertVerified::assertion()),
            Some(p) => Err(refuse(format!("partition {p} is not allowed through this tunnel"))),
            None => Err(refuse("the peer's certificate is not a partition's".into())),
        }
    }

    crate::signatures::provider_signature_checks!();
}

/// The client end's check of the server it reached.
#[derive(Debug)]
struct ExpectedPartition {
    chain: Arc<dyn ClientCertVerifier>,
    expect: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ExpectedPartition {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| rustls::Error::General(format!("the tunnel's server is not from the cluster CA: {e}")))?;
        match partition_of(end_entity) {
            Some(p) if p == self.expect => Ok(ServerCertVerified::assertion()),
            other => Err(rustls::Error::General(format!(
                "the tunnel's server is {} instead of partition {}",
                other.unwrap_or_else(|| "not a partition".into()),
                self.expect
            ))),
        }
    }

    crate::signatures::provider_signature_checks!();
}

/// The TLS settings of a tunnel's server end: `identity` shown, only the
/// partitions in `allow` (`COMPUTER/PARTITION`) let in.
pub fn server_config(
    identity: ClientIdentity,
    roots: RootCertStore,
    allow: Vec<String>,
) -> Result<(Arc<rustls::ServerConfig>, Arc<AllowedPartitions>), TlsError> {
    let verifier = Arc::new(AllowedPartitions {
        chain: chain_checker(roots)?,
        allow,
        refused: AtomicU64::new(0),
        provider: provider(),
    });
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| TlsError::Config(format!("the partition's certificate: {e}")))?;
    Ok((Arc::new(config), verifier))
}

/// The TLS settings of a tunnel's client end: `identity` shown, the server
/// must be partition `expect` (`COMPUTER/PARTITION`).
pub fn client_config(
    identity: ClientIdentity,
    roots: RootCertStore,
    expect: String,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let verifier = Arc::new(ExpectedPartition {
        chain: chain_checker(roots)?,
        expect,
        provider: provider(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain, identity.key)
        .map_err(|e| TlsError::Config(format!("the partition's certificate: {e}")))?;
    Ok(Arc::new(config))
}
