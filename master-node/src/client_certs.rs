//! The client-certificate check of both TLS servers (the cluster port and
//! the SLAP port): the chain is verified by webpki against the cluster's
//! CA, then the certificate is looked up in the replicated state at every
//! handshake, so a revocation holds on every replica as soon as it applies.
//! The two ports differ only in their [`Policy`].
//!
//! Imports only `pki` and the state.

use std::sync::{Arc, RwLock, Weak};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::pki;
use crate::state::Master;

/// What a client certificate must be, beyond chaining to the CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The cluster port: a certificate is optional (a join token may stand
    /// in for it) and refused only when revoked.
    OptionalNotRevoked,
    /// The SLAP port: a certificate is required and must be one this
    /// Master recorded and has not revoked.
    RequiredRecorded,
}

/// webpki's chain check, then the Master's own record.
#[derive(Debug)]
pub struct StateVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    state: Weak<RwLock<Master>>,
    policy: Policy,
}

impl StateVerifier {
    pub fn new(chain: Arc<dyn ClientCertVerifier>, state: Weak<RwLock<Master>>, policy: Policy) -> Arc<Self> {
        Arc::new(StateVerifier { chain, state, policy })
    }
}

impl ClientCertVerifier for StateVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.policy == Policy::RequiredRecorded
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.chain.verify_client_cert(end_entity, intermediates, now)?;
        let Some(state) = self.state.upgrade() else {
            return match self.policy {
                Policy::OptionalNotRevoked => Ok(ClientCertVerified::assertion()),
                Policy::RequiredRecorded => Err(rustls::Error::General("the replica is stopping".into())),
            };
        };
        let state = state.read().unwrap_or_else(|e| e.into_inner());
        match (state.certificates.get(&pki::fingerprint(end_entity)), self.policy) {
            (Some(c), _) if c.revoked => Err(rustls::Error::InvalidCertificate(CertificateError::Revoked)),
            (None, Policy::RequiredRecorded) => Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)),
            _ => Ok(ClientCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}
