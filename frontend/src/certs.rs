//! Server certificates, chosen per domain by the name the client sends
//! (SNI).
//!
//! A shared instance may bring its own certificate and key (`ssl-crt`,
//! `ssl-key`); [`user_certificate`] checks that they belong together before
//! the route is served, so a mismatch is that shared instance's error and
//! never a broken handshake for the others. Every other domain gets a
//! certificate from the frontend's signing CA ([`SigningAuthority`]), made
//! when the domain first appears and kept in memory. Clients trust that CA
//! the way they trust the cluster's: its certificate is published with
//! every shared instance (`ca-certificate`) and written to the frontend's
//! state directory.
//!
//! [`SiteCertificates`] is what rustls asks during a handshake; the reloader
//! swaps its map whole, so a handshake sees the old set or the new one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Checks a user's certificate and key and makes them usable: PEM that
/// parses, a key rustls can sign with, and a key that is the certificate's.
pub fn user_certificate(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("ssl-crt is not a PEM certificate: {e}"))?;
    if chain.is_empty() {
        return Err("ssl-crt holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("ssl-key is not a PEM private key: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider)
        .map(Arc::new)
        .map_err(|e| format!("ssl-key does not match ssl-crt ({e})"))
}

/// The CA that signs the certificates of domains without their own.
pub struct SigningAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// Its certificate, what clients are told to trust.
    pub cert_pem: String,
}

impl SigningAuthority {
    /// Loads `ca.crt` and `ca.key` from `dir`, making them the first time.
    pub fn load_or_create(dir: &Path) -> Result<SigningAuthority, String> {
        let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        if !crt.exists() {
            let key_pair = KeyPair::generate().map_err(|e| e.to_string())?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "slapos frontend sites CA");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
            let cert = params.self_signed(&key_pair).map_err(|e| e.to_string())?;
            write_private(&key, &key_pair.serialize_pem())?;
            std::fs::write(&crt, cert.pem()).map_err(|e| format!("{}: {e}", crt.display()))?;
        }
        let cert_pem = std::fs::read_to_string(&crt).map_err(|e| format!("{}: {e}", crt.display()))?;
        let key_pem = std::fs::read_to_string(&key).map_err(|e| format!("{}: {e}", key.display()))?;
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| format!("{}: {e}", key.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair).map_err(|e| format!("{}: {e}", crt.display()))?;
        Ok(SigningAuthority { issuer, cert_pem })
    }

    /// A certificate for `names` (host names or IP addresses).
    pub fn issue(&self, names: &[String]) -> Result<Arc<CertifiedKey>, String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        params.distinguished_name = dn;
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| e.to_string())?;
        let chain = vec![cert.der().clone()];
        let key_der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| e.to_string())?;
        let provider = rustls::crypto::ring::default_provider();
        CertifiedKey::from_der(chain, key_der, &provider)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The certificates served, by domain, and the one for clients that name
/// no known domain (or none: an IP address).
#[derive(Debug)]
pub struct SiteCertificates {
    by_domain: RwLock<Arc<BTreeMap<String, Arc<CertifiedKey>>>>,
    fallback: Arc<CertifiedKey>,
}

impl SiteCertificates {
    pub fn new(fallback: Arc<CertifiedKey>) -> SiteCertificates {
        SiteCertificates {
            by_domain: RwLock::new(Arc::new(BTreeMap::new())),
            fallback,
        }
    }

    /// Replaces the whole set.
    pub fn replace(&self, by_domain: BTreeMap<String, Arc<CertifiedKey>>) {
        *self.by_domain.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(by_domain);
    }

    /// The current set.
    pub fn current(&self) -> Arc<BTreeMap<String, Arc<CertifiedKey>>> {
        self.by_domain.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl ResolvesServerCert for SiteCertificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let found = hello
            .server_name()
            .and_then(|name| self.current().get(&name.to_ascii_lowercase()).cloned());
        Some(found.unwrap_or_else(|| self.fallback.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = SigningAuthority::load_or_create(dir.path()).unwrap();
        let a = KeyPair::generate().unwrap();
        let b = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["a.example".to_string()]).unwrap();
        let cert = params.signed_by(&a, &ca.issuer).unwrap();
        assert!(user_certificate(&cert.pem(), &a.serialize_pem()).is_ok());
        let e = user_certificate(&cert.pem(), &b.serialize_pem()).unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        assert!(user_certificate("junk", &a.serialize_pem()).is_err());
        // The CA is kept: loading again gives the same one.
        let again = SigningAuthority::load_or_create(dir.path()).unwrap();
        assert_eq!(again.cert_pem, ca.cert_pem);
    }
}
