//! A certificate and key that can be replaced while the program serves.
//!
//! Certificates expire; a replica, a gateway or a node agent that had to
//! restart to take a renewed one would drop its connections (a node's held
//! poll, a replica's Raft streams) for nothing. A [`LiveIdentity`] is what
//! rustls asks for the certificate at every handshake (it is both a
//! [`ResolvesServerCert`] and a [`ResolvesClientCert`]), so replacing what it
//! holds changes what the next handshake presents, while connections already
//! open go on with the one they were opened with. That is safe because a
//! renewal does not revoke the certificate it replaces: the old one stays
//! valid until it expires.
//!
//! [`LiveIdentity::reload`] reads the certificate and key files again and
//! takes them only when they parse and the key is the certificate's, so a
//! half-written pair (the certificate renamed into place before its key) is
//! skipped until the key follows. [`renewal_due`] says when a holder should
//! ask for a new certificate: after two thirds of its lifetime, as
//! Kubernetes' kubelet and cert-manager do, which leaves a third of it for
//! retries while the Master is unreachable.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DistinguishedName, RootCertStore, SignatureScheme};

use crate::pem::TlsError;

/// A certificate (with its chain) and key, replaceable at run time.
#[derive(Debug)]
pub struct LiveIdentity {
    current: RwLock<Loaded>,
    /// Certificates sent after the holder's own (a replica sends the CA so
    /// a client that pins the CA's hash can find it).
    chain_tail: RwLock<Vec<CertificateDer<'static>>>,
    provider: Arc<CryptoProvider>,
    /// How many times the certificate was replaced: a holder that caches
    /// connections dials again when it moves, so that every connection
    /// presents the certificate held.
    generation: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Clone)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// The PEM texts it was read from: a reload that reads the same is no change.
    cert_pem: String,
    key_pem: String,
}

/// What a certificate says of itself that its holder needs for renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validity {
    /// The serial, lowercase hex, as the Master records it.
    pub serial: String,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub not_after: u64,
}

impl Validity {
    /// Reads a certificate's DER.
    pub fn of(der: &[u8]) -> Option<Validity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let v = cert.validity();
        Some(Validity {
            serial: hex::encode(cert.raw_serial()),
            not_before: u64::try_from(v.not_before.timestamp()).ok()?,
            not_after: u64::try_from(v.not_after.timestamp()).ok()?,
        })
    }

    /// Reads the first certificate of a PEM text.
    pub fn of_pem(pem: &str) -> Option<Validity> {
        let der = CertificateDer::pem_slice_iter(pem.as_bytes()).next()?.ok()?;
        Validity::of(der.as_ref())
    }

    /// Whether the certificate (DER) was issued by the CA (DER): its
    /// issuer is the CA's subject. Certificates name their issuer, and a
    /// rotated CA has a name of its own.
    pub fn issued_by(cert: &[u8], ca: &[u8]) -> bool {
        let (Ok((_, cert)), Ok((_, ca))) = (
            x509_parser::parse_x509_certificate(cert),
            x509_parser::parse_x509_certificate(ca),
        ) else {
            return false;
        };
        cert.issuer().as_raw() == ca.subject().as_raw()
    }

    /// When two thirds of the lifetime have passed.
    pub fn renew_at(&self) -> u64 {
        self.not_before + self.not_after.saturating_sub(self.not_before) / 3 * 2
    }
}

/// Whether a certificate valid over `[not_before, not_after]` should be
/// renewed at `now` (two thirds of its lifetime have passed).
pub fn renewal_due(validity: &Validity, now: u64) -> bool {
    now >= validity.renew_at()
}

fn pem_err(what: &str) -> impl Fn(String) -> TlsError + '_ {
    move |reason| TlsError::Pem {
        what: what.into(),
        reason,
    }
}

impl LiveIdentity {
    /// From PEM texts; `chain_tail` goes after the certificate on every handshake.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        chain_tail: Vec<CertificateDer<'static>>,
    ) -> Result<Arc<LiveIdentity>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = Self::load(&provider, &chain_tail, cert_pem, key_pem)?;
        Ok(Arc::new(LiveIdentity {
            current: RwLock::new(loaded),
            chain_tail: RwLock::new(chain_tail),
            provider,
            generation: Default::default(),
        }))
    }

    fn load(
        provider: &CryptoProvider,
        chain_tail: &[CertificateDer<'static>],
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Loaded, TlsError> {
        let mut chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err("certificate")(e.to_string()))?;
        if chain.is_empty() {
            return Err(pem_err("certificate")("no certificate in it".into()));
        }
        chain.extend(chain_tail.iter().cloned());
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| pem_err("private key")(e.to_string()))?;
        let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
            TlsError::Config(format!(
                "the private key is not the certificate's ({e}); a renewal writes both"
            ))
        })?;
        Ok(Loaded {
            key: Arc::new(key),
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    fn loaded(&self) -> Loaded {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the certificate and key, if they pair; otherwise keeps the
    /// current ones and says why.
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let tail = self.chain_tail.read().unwrap_or_else(|e| e.into_inner()).clone();
        let loaded = Self::load(&self.provider, &tail, cert_pem, key_pem)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        self.generation.fetch_add(1, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Sends `tail` after the certificate from the next handshake on (a
    /// replica's CAs change during a rotation).
    pub fn set_chain_tail(&self, tail: Vec<CertificateDer<'static>>) -> Result<(), TlsError> {
        if *self.chain_tail.read().unwrap_or_else(|e| e.into_inner()) == tail {
            return Ok(());
        }
        *self.chain_tail.write().unwrap_or_else(|e| e.into_inner()) = tail;
        let held = self.loaded();
        self.replace(&held.cert_pem, &held.key_pem)
    }

    /// Moves each time the certificate is replaced (see the field's doc).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Reads `cert` and `key` again: `Ok(Some(validity))` when they changed
    /// and were taken, `Ok(None)` when they are what is held already.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<Option<Validity>, TlsError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| TlsError::Config(format!("{}: {e}", p.display())));
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let held = self.loaded();
        if held.cert_pem == cert_pem && held.key_pem == key_pem {
            return Ok(None);
        }
        self.replace(&cert_pem, &key_pem)?;
        Ok(Some(self.validity().ok_or_else(|| {
            TlsError::Config("the certificate taken cannot be read back".into())
        })?))
    }

    /// The certificate's PEM text, as read.
    pub fn cert_pem(&self) -> String {
        self.loaded().cert_pem
    }

    /// The key's PEM text, as read.
    pub fn key_pem(&self) -> String {
        self.loaded().key_pem
    }

    /// Serial and validity of the certificate held now.
    pub fn validity(&self) -> Option<Validity> {
        let loaded = self.loaded();
        Validity::of(loaded.key.end_entity_cert().ok()?.as_ref())
    }

    /// The certificate's DER.
    pub fn end_entity(&self) -> Option<CertificateDer<'static>> {
        self.loaded().key.cert.first().cloned()
    }
}

impl ResolvesServerCert for LiveIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.loaded().key)
    }
}

impl ResolvesClientCert for LiveIdentity {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.loaded().key)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The CAs a holder trusts, replaceable at run time: during a CA rotation
/// the bundle grows to two CAs, and shrinks back when it ends, without a
/// restart of anything that verifies certificates.
#[derive(Debug)]
pub struct LiveTrust {
    current: RwLock<Trusted>,
    generation: AtomicU64,
}

#[derive(Debug, Clone)]
struct Trusted {
    pem: String,
    certificates: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
}

/// Whether the certificate `identity` presents was issued by another CA
/// than the first of `trust` (the signing one): after a CA rotation, a
/// holder renews it at once. False while either is empty.
pub fn from_another_ca(identity: &LiveIdentity, trust: &LiveTrust) -> bool {
    match (trust.certificates().first(), identity.end_entity()) {
        (Some(signer), Some(leaf)) => !Validity::issued_by(&leaf, signer),
        _ => false,
    }
}

impl LiveTrust {
    /// From a PEM bundle (one CA or more).
    pub fn from_pem(pem: &str) -> Result<Arc<LiveTrust>, TlsError> {
        Ok(Arc::new(LiveTrust {
            current: RwLock::new(Self::load(pem)?),
            generation: AtomicU64::new(0),
        }))
    }

    fn load(pem: &str) -> Result<Trusted, TlsError> {
        let certificates = crate::pem::ca_certificates(pem)?;
        let mut roots = RootCertStore::empty();
        for c in &certificates {
            roots
                .add(c.clone())
                .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
        }
        Ok(Trusted {
            pem: pem.to_string(),
            certificates,
            roots: Arc::new(roots),
        })
    }

    fn trusted(&self) -> Trusted {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Trusts the CAs of `pem` instead; `Ok(true)` if they changed.
    pub fn replace(&self, pem: &str) -> Result<bool, TlsError> {
        if self.trusted().pem == pem {
            return Ok(false);
        }
        let loaded = Self::load(pem)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        self.generation.fetch_add(1, Ordering::Release);
        Ok(true)
    }

    /// Reads the bundle at `path` again; `Ok(true)` if it changed.
    pub fn reload(&self, path: &Path) -> Result<bool, TlsError> {
        let pem = std::fs::read_to_string(path).map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
        self.replace(&pem)
    }

    /// The bundle, as read.
    pub fn pem(&self) -> String {
        self.trusted().pem
    }

    /// The CAs trusted now, the signing one first.
    pub fn certificates(&self) -> Vec<CertificateDer<'static>> {
        self.trusted().certificates
    }

    /// The CAs trusted now, as roots.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.trusted().roots
    }

    /// Moves each time the CAs change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Verifies a server against the CAs trusted at each handshake, and its
/// name, as rustls' own web PKI verifier does.
#[derive(Debug)]
pub struct LiveServerVerifier {
    trust: Arc<LiveTrust>,
    provider: Arc<CryptoProvider>,
}

impl LiveServerVerifier {
    pub fn new(trust: Arc<LiveTrust>) -> Arc<LiveServerVerifier> {
        Arc::new(LiveServerVerifier {
            trust,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }
}

impl ServerCertVerifier for LiveServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.trust.roots(),
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        rustls::client::verify_server_name(&parsed, server_name)?;
        Ok(ServerCertVerified::assertion())
    }

    crate::signatures::provider_signature_checks!();
}

/// Verifies a client's certificate against the CAs trusted at each
/// handshake (rustls' web PKI client verifier, built again when they change).
#[derive(Debug)]
pub struct LiveClientVerifier {
    trust: Arc<LiveTrust>,
    provider: Arc<CryptoProvider>,
    /// Whether a client may present no certificate at all.
    optional: bool,
    built: RwLock<(u64, Arc<dyn ClientCertVerifier>)>,
}

impl LiveClientVerifier {
    /// `optional`: a client may present no certificate (calls that
    /// authenticate otherwise).
    pub fn new(trust: Arc<LiveTrust>, optional: bool) -> Result<Arc<LiveClientVerifier>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let built = Self::build(&trust, &provider, optional)?;
        Ok(Arc::new(LiveClientVerifier {
            built: RwLock::new((trust.generation(), built)),
            trust,
            provider,
            optional,
        }))
    }

    fn build(
        trust: &LiveTrust,
        provider: &Arc<CryptoProvider>,
        optional: bool,
    ) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        let builder = WebPkiClientVerifier::builder_with_provider(trust.roots(), provider.clone());
        let builder = if optional {
            builder.allow_unauthenticated()
        } else {
            builder
        };
        builder.build().map_err(|e| TlsError::Config(e.to_string()))
    }

    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        let generation = self.trust.generation();
        {
            let built = self.built.read().unwrap_or_else(|e| e.into_inner());
            if built.0 == generation {
                return built.1.clone();
            }
        }
        match Self::build(&self.trust, &self.provider, self.optional) {
            Ok(v) => {
                *self.built.write().unwrap_or_else(|e| e.into_inner()) = (generation, v.clone());
                v
            }
            // The bundle was checked when it was taken; keep the last good one.
            Err(_) => self.built.read().unwrap_or_else(|e| e.into_inner()).1.clone(),
        }
    }
}

impl ClientCertVerifier for LiveClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.optional
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: every client of ours has one certificate to send.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner().verify_client_cert(end_entity, intermediates, now)
    }

    crate::signatures::provider_signature_checks!();
}

/// Writes a renewed certificate and key over `cert` and `key` so that a
/// reader never sees half a file: each is written beside and renamed into
/// place, the key first (mode 0600 from its creation), then the
/// certificate; [`LiveIdentity::reload`] skips the moment between the two.
pub fn install(cert: &Path, cert_pem: &str, key: &Path, key_pem: &str) -> std::io::Result<()> {
    write_then_rename(key, key_pem, 0o600)?;
    write_then_rename(cert, cert_pem, 0o644)
}

/// Writes `content` over `path` (a CA bundle, say) as [`install`] does:
/// beside it, synced, then renamed into place.
pub fn write_then_rename(path: &Path, content: &str, mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} is not a file path", path.display())))?;
    let tmp = path.with_file_name(format!(".{}.new", name.to_string_lossy()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(cn: &str, days: i64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(days);
        params.not_after = now + time::Duration::days(days * 2);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_reload_takes_a_new_pair_and_skips_a_half_written_one() {
        let dir = tempfile::tempdir().unwrap();
        let (crt, key) = (dir.path().join("x.crt"), dir.path().join("x.key"));
        let (c1, k1) = pair("one", 3);
        install(&crt, &c1, &key, &k1).unwrap();
        let live = LiveIdentity::from_pem(&c1, &k1, vec![]).unwrap();
        assert_eq!(live.reload(&crt, &key).unwrap(), None, "nothing changed");
        let first = live.validity().unwrap();

        // The new certificate without its key yet: refused, the old one kept.
        let (c2, k2) = pair("two", 3);
        std::fs::write(&crt, &c2).unwrap();
        let err = live.reload(&crt, &key).unwrap_err().to_string();
        assert!(err.contains("not the certificate's"), "{err}");
        assert_eq!(live.validity().unwrap(), first);

        // Its key follows: taken, and what a handshake presents changes.
        install(&crt, &c2, &key, &k2).unwrap();
        let before = live.generation();
        let second = live.reload(&crt, &key).unwrap().expect("changed");
        assert_eq!(live.generation(), before + 1);
        assert_ne!(second.serial, first.serial);
        let presented = ResolvesClientCert::resolve(&*live, &[], &[]).unwrap();
        assert_eq!(Validity::of(presented.cert[0].as_ref()).unwrap(), second);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn renewal_is_due_after_two_thirds_of_the_lifetime() {
        let v = Validity {
            serial: "01".into(),
            not_before: 1_000,
            not_after: 1_300,
        };
        assert_eq!(v.renew_at(), 1_200);
        assert!(!renewal_due(&v, 1_199));
        assert!(renewal_due(&v, 1_200));
        let (c, _) = pair("x", 3);
        let der = CertificateDer::from_pem_slice(c.as_bytes()).unwrap();
        let read = Validity::of(der.as_ref()).unwrap();
        assert_eq!(read.not_after - read.not_before, 9 * 86_400);
        let now = read.not_before + 3 * 86_400;
        assert!(!renewal_due(&read, now), "a third of the way in");
    }
}
