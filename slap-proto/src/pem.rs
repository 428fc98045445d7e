//! Certificates read from PEM text, and the error every TLS setting of
//! this crate returns. Below both [`crate::tls`] and [`crate::live`].

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Why a TLS setting could not be made or a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {reason}")]
    Pem { what: String, reason: String },
    #[error("TLS: {0}")]
    Config(String),
    #[error("bad address {0:?}: {1}")]
    Address(String, String),
}

/// The certificates of a CA bundle (PEM): at least one.
pub fn ca_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Pem {
        what: "CA certificate".into(),
        reason,
    };
    let ders = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if ders.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(ders)
}
