//! The cluster's certificate authority and the certificates it issues.
//!
//! The CA is created at `master-node init` and kept in the replicated state,
//! so whichever replica leads can sign. Signing happens on the leader,
//! outside `apply` (keys and signatures need randomness); the result is then
//! recorded through the log ([`Command::RecordCertificate`]), so every
//! replica knows every certificate, its role and whether it is revoked.
//!
//! A certificate's subject names its role (`admin`, `user:NAME`,
//! `computer:ID`, `partition:COMPUTER/ID`, `replica:N`), but a handshake
//! trusts only the record found by the certificate's SHA-256 fingerprint: a
//! certificate the Master never recorded is refused even if the CA signed it.
//!
//! [`Command::RecordCertificate`]: crate::state::Command::RecordCertificate

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use sha2::{Digest, Sha256};

use crate::state::{Authority, Certificate, Role};

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[error("certificate: {0}")]
pub struct PkiError(String);

fn err(e: impl std::fmt::Display) -> PkiError {
    PkiError(e.to_string())
}

/// Years a CA is valid.
const CA_YEARS: u64 = 20;
/// Days a user, computer or partition certificate is valid by default.
pub const DEFAULT_DAYS: u64 = 365;

fn unix_to_offset(secs: u64) -> Result<time::OffsetDateTime, PkiError> {
    time::OffsetDateTime::from_unix_timestamp(secs as i64).map_err(err)
}

/// A new certificate authority for `cluster_id`.
pub fn new_authority(cluster_id: &str, now_secs: u64) -> Result<Authority, PkiError> {
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("slapos-rs cluster {cluster_id} CA"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = unix_to_offset(now_secs.saturating_sub(3600))?;
    params.not_after = unix_to_offset(now_secs + CA_YEARS * 365 * 86400)?;
    let cert = params.self_signed(&key).map_err(err)?;
    Ok(Authority {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The subject common name of a role.
pub fn common_name(role: &Role) -> String {
    match role {
        Role::Admin => "admin".into(),
        Role::User(u) => format!("user:{u}"),
        Role::Computer(c) => format!("computer:{c}"),
        Role::Partition(c, p) => format!("partition:{c}/{p}"),
        Role::Replica(n) => format!("replica:{n}"),
        Role::Gateway(g) => format!("gateway:{g}"),
    }
}

/// sha256 (hex) of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// A signed certificate and its private key (PEM).
pub struct Issued {
    pub certificate: Certificate,
    pub key_pem: String,
}

/// Signs a certificate for `role`, valid from an hour ago for `days` days.
/// `server_names` adds subject alternative names (replicas' TLS servers).
pub fn issue(
    ca: &Authority,
    role: &Role,
    now_secs: u64,
    days: u64,
    server_names: &[String],
) -> Result<Issued, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(err)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(err)?;
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::new(server_names.to_vec()).map_err(err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name(role));
    params.distinguished_name = dn;
    let mut serial = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut serial[..]);
    serial[0] &= 0x7f; // a positive integer
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.not_before = unix_to_offset(now_secs.saturating_sub(3600))?;
    let not_after = now_secs + days * 86400;
    params.not_after = unix_to_offset(not_after)?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if !server_names.is_empty() {
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    let cert = params.signed_by(&key, &issuer).map_err(err)?;
    let key_pem = key.serialize_pem();
    Ok(Issued {
        certificate: Certificate {
            serial: hex::encode(serial),
            fingerprint: fingerprint(cert.der()),
            role: role.clone(),
            cert_pem: cert.pem(),
            key_pem: matches!(role, Role::Partition(..)).then(|| key_pem.clone()),
            not_after,
            revoked: false,
        },
        key_pem,
    })
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes `content` to `path` with mode 0600 from its creation on.
pub fn write_private(path: &std::path::Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_distinct_certificates_signed_by_the_ca() {
        let now = now_secs();
        let ca = new_authority("c1", now).unwrap();
        let a = issue(&ca, &Role::User("alice".into()), now, 30, &[]).unwrap();
        let b = issue(&ca, &Role::Partition("COMP-1".into(), "slappart0".into()), now, 30, &[]).unwrap();
        assert_ne!(a.certificate.serial, b.certificate.serial);
        assert_ne!(a.certificate.fingerprint, b.certificate.fingerprint);
        assert!(a.certificate.key_pem.is_none(), "a user's key is not kept");
        assert!(
            b.certificate.key_pem.is_some(),
            "a partition's key is kept for its node"
        );
        assert_eq!(a.certificate.not_after, now + 30 * 86400);
        assert!(a.certificate.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    }
}
