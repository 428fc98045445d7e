//! The handshake signature checks every certificate verifier of this crate
//! makes the same way: rustls' own checks, with the algorithms of the
//! verifier's crypto provider (ring). What differs between the verifiers is
//! which certificates they accept, not how a signature is checked.

/// Writes `verify_tls12_signature`, `verify_tls13_signature` and
/// `supported_verify_schemes` into a `ServerCertVerifier` or
/// `ClientCertVerifier` impl whose type has a
/// `provider: Arc<rustls::crypto::CryptoProvider>` field.
macro_rules! provider_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            ::rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            ::rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<::rustls::SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

pub(crate) use provider_signature_checks;
