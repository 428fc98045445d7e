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
//!
//! Imports only the state's identity types.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use sha2::{Digest, Sha256};

use crate::state::{Authority, Certificate, Fingerprint, Pem, Role};

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[error("certificate: {0}")]
pub struct PkiError(String);

impl PkiError {
    pub fn new(msg: impl Into<String>) -> PkiError {
        PkiError(msg.into())
    }
}

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
    let params = ca_params(format!("slapos-rs cluster {cluster_id} CA"), now_secs)?;
    let cert = params.self_signed(&key).map_err(err)?;
    Ok(Authority {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn ca_params(common_name: String, now_secs: u64) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = unix_to_offset(now_secs.saturating_sub(3600))?;
    params.not_after = unix_to_offset(now_secs + CA_YEARS * 365 * 86400)?;
    Ok(params)
}

/// The CA that replaces `current` in a rotation, and its certificate
/// cross-signed by `current` (PEM): a new key and a name of its own (a
/// certificate names its issuer, so the two CAs must not share one).
pub fn successor(current: &Authority, cluster_id: &str, now_secs: u64) -> Result<(Authority, String), PkiError> {
    let key = KeyPair::generate().map_err(err)?;
    let name = format!("slapos-rs cluster {cluster_id} CA from {now_secs}");
    let cert = ca_params(name.clone(), now_secs)?.self_signed(&key).map_err(err)?;
    let old_key = KeyPair::from_pem(&current.key_pem).map_err(err)?;
    let old = Issuer::from_ca_cert_pem(&current.cert_pem, old_key).map_err(err)?;
    let cross = ca_params(name, now_secs)?.signed_by(&key, &old).map_err(err)?;
    Ok((
        Authority {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
        cross.pem(),
    ))
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

/// sha256 of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> Fingerprint {
    Fingerprint(Sha256::digest(der).into())
}

/// A signed certificate and its private key (PEM).
pub struct Issued {
    pub certificate: Certificate,
    pub key_pem: String,
}

/// How far back a certificate's validity starts, for clocks slightly
/// behind the signer's: an hour, or a tenth of a short lifetime (a
/// certificate renewed at two thirds of its lifetime must not be due at
/// once).
pub fn backdate(lifetime_secs: u64) -> u64 {
    (lifetime_secs / 10).min(3600)
}

/// The lifetime a certificate was issued for, from its validity span (the
/// inverse of [`backdate`]): a renewal lasts as long as what it renews.
pub fn lifetime_of(not_before: u64, not_after: u64) -> u64 {
    let span = not_after.saturating_sub(not_before);
    if span >= 36_000 + 3600 {
        span - 3600
    } else {
        span * 10 / 11
    }
}

/// Signs a certificate for `role`, valid from an hour ago for `days` days,
/// with a new key. `server_names` adds subject alternative names (servers).
pub fn issue(
    ca: &Authority,
    role: &Role,
    now_secs: u64,
    days: u64,
    server_names: &[String],
) -> Result<Issued, PkiError> {
    issue_for(ca, role, now_secs, days * 86400, server_names)
}

/// As [`issue`], valid for `lifetime_secs` seconds.
pub fn issue_for(
    ca: &Authority,
    role: &Role,
    now_secs: u64,
    lifetime_secs: u64,
    server_names: &[String],
) -> Result<Issued, PkiError> {
    let key = KeyPair::generate().map_err(err)?;
    let certificate = sign(ca, role, now_secs, lifetime_secs, server_names, &key)?;
    let key_pem = key.serialize_pem();
    Ok(Issued {
        certificate: Certificate {
            key_pem: matches!(role, Role::Partition(..)).then(|| Pem::from_text(&key_pem)),
            ..certificate
        },
        key_pem,
    })
}

/// A new key and a certificate signing request for it (a joining replica
/// keeps its key to itself and sends the request).
pub fn signing_request() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(err)?;
    let csr = CertificateParams::default().serialize_request(&key).map_err(err)?;
    Ok((csr.pem().map_err(err)?, key.serialize_pem()))
}

/// Signs a certificate for `role` over the key of a signing request (PEM);
/// only the request's key is used, never the names it asks for.
pub fn issue_for_request(
    ca: &Authority,
    role: &Role,
    now_secs: u64,
    days: u64,
    server_names: &[String],
    request_pem: &str,
) -> Result<Certificate, PkiError> {
    let request = rcgen::CertificateSigningRequestParams::from_pem(request_pem)
        .map_err(|e| PkiError(format!("the certificate signing request is invalid: {e}")))?;
    sign(ca, role, now_secs, days * 86400, server_names, &request.public_key)
}

fn sign(
    ca: &Authority,
    role: &Role,
    now_secs: u64,
    lifetime_secs: u64,
    server_names: &[String],
    public_key: &impl rcgen::PublicKeyData,
) -> Result<Certificate, PkiError> {
    let signed = sign_subject(
        ca,
        &common_name(role),
        true,
        now_secs,
        lifetime_secs,
        server_names,
        public_key,
    )?;
    Ok(Certificate {
        serial: signed.serial,
        fingerprint: fingerprint(signed.cert.der()),
        role: role.clone(),
        cert_pem: Pem::from_text(&signed.cert.pem()),
        key_pem: None,
        not_after: signed.not_after,
        revoked: false,
    })
}

struct Signed {
    cert: rcgen::Certificate,
    serial: String,
    not_after: u64,
}

/// Signs a certificate naming `subject_cn`, for client authentication
/// (`client_auth`) and, with `server_names`, for servers.
fn sign_subject(
    ca: &Authority,
    subject_cn: &str,
    client_auth: bool,
    now_secs: u64,
    lifetime_secs: u64,
    server_names: &[String],
    public_key: &impl rcgen::PublicKeyData,
) -> Result<Signed, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(err)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(err)?;
    let mut params = CertificateParams::new(server_names.to_vec()).map_err(err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, subject_cn);
    params.distinguished_name = dn;
    let mut serial = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut serial[..]);
    // A positive integer whose first byte is not zero: DER drops leading
    // zero bytes, and the serial kept here must be the one the certificate
    // shows (`cert revoke` takes it from there; 1 in 128 did not match).
    serial[0] = 0x40 | (serial[0] & 0x3f);
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.not_before = unix_to_offset(now_secs.saturating_sub(backdate(lifetime_secs)))?;
    let not_after = now_secs + lifetime_secs;
    params.not_after = unix_to_offset(not_after)?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = Vec::new();
    if client_auth {
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    if !server_names.is_empty() {
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    let cert = params.signed_by(public_key, &issuer).map_err(err)?;
    Ok(Signed {
        cert,
        serial: hex::encode(serial),
        not_after,
    })
}

/// A server certificate for a site a frontend serves (see
/// [`issue_site`]).
pub struct SiteCertificate {
    pub serial: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: u64,
}

/// Signs a server certificate for `domain` alone, with a new key. It names
/// no role (`site:DOMAIN`, which [`role_of`] does not read) and is not for
/// client authentication, so it opens nothing on the cluster's ports: it
/// only lets browsers that trust the cluster's CA trust the site.
pub fn issue_site(
    ca: &Authority,
    domain: &str,
    now_secs: u64,
    lifetime_secs: u64,
) -> Result<SiteCertificate, PkiError> {
    let key = KeyPair::generate().map_err(err)?;
    let signed = sign_subject(
        ca,
        &format!("site:{domain}"),
        false,
        now_secs,
        lifetime_secs,
        &[domain.to_string()],
        &key,
    )?;
    Ok(SiteCertificate {
        serial: signed.serial,
        cert_pem: signed.cert.pem(),
        key_pem: key.serialize_pem(),
        not_after: signed.not_after,
    })
}

/// The role a certificate's subject names (the inverse of [`common_name`]).
/// Trust it only for a certificate whose chain to the CA was verified.
pub fn role_of(der: &[u8]) -> Option<Role> {
    role_of_common_name(&slap_proto::tls::common_name(der)?)
}

/// Parses a subject common name written by [`common_name`].
pub fn role_of_common_name(cn: &str) -> Option<Role> {
    if cn == "admin" {
        return Some(Role::Admin);
    }
    let (kind, rest) = cn.split_once(':')?;
    if rest.is_empty() {
        return None;
    }
    Some(match kind {
        "user" => Role::User(rest.into()),
        "computer" => Role::Computer(rest.into()),
        "partition" => {
            let (c, p) = rest.rsplit_once('/')?;
            Role::Partition(c.into(), p.into())
        }
        "replica" => Role::Replica(rest.parse().ok()?),
        "gateway" => Role::Gateway(rest.into()),
        _ => return None,
    })
}

/// The DNS names and IP addresses a certificate (PEM) is for, so a
/// renewal serves the same hosts.
pub fn server_names_of(cert_pem: &str) -> Vec<String> {
    let Some(Ok(der)) = rustls::pki_types::pem::PemObject::pem_slice_iter(cert_pem.as_bytes()).next() else {
        return Vec::new();
    };
    let der: rustls::pki_types::CertificateDer<'static> = der;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string()),
                16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes a public file (a certificate) with mode 0644, synced.
pub fn write_public(path: &std::path::Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()
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
        // The serial kept is the certificate's own, whatever the random bytes.
        for _ in 0..512 {
            let c = issue(&ca, &Role::User("carol".into()), now, 30, &[]).unwrap();
            use rustls::pki_types::pem::PemObject;
            let text = c.certificate.cert_pem.to_text();
            let der = rustls::pki_types::CertificateDer::from_pem_slice(text.as_bytes()).unwrap();
            let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
            assert_eq!(hex::encode(x509.raw_serial()), c.certificate.serial);
        }
        assert_ne!(a.certificate.fingerprint, b.certificate.fingerprint);
        assert!(a.certificate.key_pem.is_none(), "a user's key is not kept");
        assert!(
            b.certificate.key_pem.is_some(),
            "a partition's key is kept for its node"
        );
        assert_eq!(a.certificate.not_after, now + 30 * 86400);
        assert!(a
            .certificate
            .cert_pem
            .to_text()
            .starts_with("-----BEGIN CERTIFICATE-----"));
        // What the Master keeps of the half million partitions' pairs at
        // fleet size: the compact form.
        assert!(b.certificate.cert_pem.is_der() && b.certificate.key_pem.as_ref().is_some_and(Pem::is_der));
    }

    /// Whether `leaf` (DER) chains to `root` (PEM) with `intermediates` (PEM).
    fn chains(leaf: &str, intermediates: &str, root: &str) -> bool {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, UnixTime};
        let der = |pem: &str| {
            CertificateDer::pem_slice_iter(pem.as_bytes())
                .map(|c| c.unwrap())
                .collect::<Vec<_>>()
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(root).remove(0)).unwrap();
        let leaf = der(leaf).remove(0);
        let parsed = rustls::server::ParsedCertificate::try_from(&leaf).unwrap();
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &der(intermediates),
            UnixTime::now(),
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
        )
        .is_ok()
    }

    #[test]
    fn a_successor_ca_is_trusted_through_its_cross_signed_certificate() {
        let now = now_secs();
        let old = new_authority("c1", now).unwrap();
        let (new, cross) = successor(&old, "c1", now).unwrap();
        assert_ne!(new.cert_pem, old.cert_pem);
        let leaf = issue(&new, &Role::Computer("COMP-1".into()), now, 1, &["localhost".into()]).unwrap();
        let leaf = leaf.certificate.cert_pem.to_text();
        assert!(chains(&leaf, "", &new.cert_pem), "the new CA alone");
        assert!(
            chains(&leaf, &cross, &old.cert_pem),
            "the old CA, through the cross-signed one"
        );
        assert!(!chains(&leaf, "", &old.cert_pem), "not the old CA without it");
        let before = issue(&old, &Role::Admin, now, 1, &["localhost".into()]).unwrap();
        assert!(
            !chains(&before.certificate.cert_pem.to_text(), &cross, &new.cert_pem),
            "the old CA's leaves need the old CA"
        );
    }

    #[test]
    fn a_site_certificate_is_for_its_domain_and_no_identity() {
        use rustls::pki_types::pem::PemObject;
        let now = now_secs();
        let ca = new_authority("c1", now).unwrap();
        let site = issue_site(&ca, "shop.example.com", now, 86_400).unwrap();
        assert!(chains(&site.cert_pem, "", &ca.cert_pem));
        assert_eq!(server_names_of(&site.cert_pem), vec!["shop.example.com".to_string()]);
        let der = rustls::pki_types::CertificateDer::pem_slice_iter(site.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(role_of(&der), None, "a site certificate names no role");
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth, "a server certificate only");
        // The key is the certificate's.
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(site.key_pem.as_bytes()).unwrap();
        rustls::sign::CertifiedKey::from_der(vec![der], key, &rustls::crypto::ring::default_provider()).unwrap();
    }

    #[test]
    fn a_lifetime_is_read_back_from_the_validity_it_gave() {
        for lifetime in [30, 600, 35_999, 36_000, 36_001, 86_400, 3650 * 86_400] {
            let now = 1_800_000_000;
            let (nb, na) = (now - backdate(lifetime), now + lifetime);
            let back = lifetime_of(nb, na);
            assert!(back.abs_diff(lifetime) <= 1, "{lifetime} read back as {back}");
        }
        assert_eq!(backdate(365 * 86_400), 3600);
        assert_eq!(backdate(30), 3);
    }

    #[test]
    fn roles_round_trip_through_the_subject() {
        let now = now_secs();
        let ca = new_authority("c1", now).unwrap();
        for role in [
            Role::Admin,
            Role::User("alice@example".into()),
            Role::Computer("COMP-1".into()),
            Role::Partition("COMP-1".into(), "slappart3".into()),
            Role::Replica(7),
            Role::Gateway("gw-1".into()),
        ] {
            let issued = issue(&ca, &role, now, 1, &[]).unwrap();
            let der = rustls::pki_types::CertificateDer::from(
                rustls::pki_types::pem::PemObject::from_pem_slice(issued.certificate.cert_pem.to_text().as_bytes())
                    .map(|d: rustls::pki_types::CertificateDer<'static>| d.to_vec())
                    .unwrap(),
            );
            assert_eq!(role_of(&der), Some(role));
        }
        for bad in ["", "admin:", "user:", "replica:x", "partition:nopartition", "root"] {
            assert_eq!(role_of_common_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_signing_request_gets_the_role_the_ca_gives_not_the_one_asked() {
        let now = now_secs();
        let ca = new_authority("c1", now).unwrap();
        let (csr, key_pem) = signing_request().unwrap();
        let cert = issue_for_request(&ca, &Role::Replica(4), now, 1, &["10.0.0.4".into()], &csr).unwrap();
        assert_eq!(cert.role, Role::Replica(4));
        assert!(cert.key_pem.is_none());
        // The certificate is over the requester's key: it pairs with the key kept.
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(cert.cert_pem.to_text().as_bytes())
            .map(|d: rustls::pki_types::CertificateDer<'static>| d.to_vec())
            .unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let kept = KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(
            parsed.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&kept).as_slice()
        );
        assert!(issue_for_request(&ca, &Role::Replica(4), now, 1, &[], "garbage").is_err());
    }
}
