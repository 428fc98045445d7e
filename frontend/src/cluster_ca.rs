//! Site certificates from the cluster's CA.
//!
//! Users of the cloud already trust its CA: their own certificates and the
//! Master's chain to it, and every partition gets it as `ca.crt`. So by
//! default a domain a shared instance names is served with a certificate
//! the Master signs for it (`requestSharedInstanceCertificate`), asked for
//! with the frontend partition's own certificate. The Master signs only
//! for a domain the shared instance names and whose user owns it across the
//! whole cluster, so a user cannot get a trusted certificate for another
//! user's site on another frontend either.
//!
//! Each certificate is kept in the state directory (`sites/DOMAIN.pem`,
//! certificate chain then key, mode 0600, and `sites/DOMAIN.ca` with the CAs
//! it chains to), so a restart does not ask again, and asked for anew after
//! two thirds of its lifetime. When the Master cannot be reached the route
//! is served with the certificate kept, or the frontend's own CA's until
//! the Master answers; when the Master refuses, the route is refused with
//! its reason.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use slap_proto::live::Validity;
use slap_proto::marshal::{self, Value};

/// How the frontend reaches the Master, as its partition.
#[derive(Debug, Clone)]
pub struct MasterAccess {
    /// The Master's (or a gateway's) SLAP URL.
    pub url: String,
    pub computer: String,
    pub partition: String,
    /// The partition's certificate and key, and the CAs to check the
    /// Master against (the node agent writes them; read at every ask, so a
    /// renewed partition certificate is used at once).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
}

/// A site certificate in use.
#[derive(Debug, Clone)]
pub struct SiteCertificate {
    pub key: Arc<CertifiedKey>,
    pub validity: Validity,
    /// The CAs it chains to: what the published `ca-certificate` says.
    pub ca_pem: String,
}

impl SiteCertificate {
    /// Still valid at `now` (Unix seconds).
    pub fn valid(&self, now: u64) -> bool {
        now < self.validity.not_after
    }

    /// Two thirds of its lifetime have passed: time to ask again.
    pub fn due(&self, now: u64) -> bool {
        slap_proto::live::renewal_due(&self.validity, now)
    }
}

/// Why no certificate came from the Master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AskError {
    /// The Master refused (the domain is not this user's, the shared
    /// instance is gone...): the route's error.
    Refused(String),
    /// The Master did not answer or failed: ask again later.
    Unavailable(String),
}

/// Asks the Master for site certificates and keeps them on disk.
pub struct ClusterCa {
    access: MasterAccess,
    dir: PathBuf,
}

/// Unix seconds now.
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads a certificate chain and its key from PEM texts.
fn certified(cert_pem: &str, key_pem: &str) -> Result<(Arc<CertifiedKey>, Validity), String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    let validity = chain
        .first()
        .and_then(|c| Validity::of(c.as_ref()))
        .ok_or("no readable certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("not a PEM key: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    let key =
        CertifiedKey::from_der(chain, key, &provider).map_err(|e| format!("the key is not the certificate's: {e}"))?;
    Ok((Arc::new(key), validity))
}

impl ClusterCa {
    /// Keeps certificates under `state/sites`.
    pub fn new(access: MasterAccess, state: &std::path::Path) -> ClusterCa {
        ClusterCa {
            access,
            dir: state.join("sites"),
        }
    }

    /// The certificate kept for `domain`, if it is still valid.
    pub fn kept(&self, domain: &str) -> Option<SiteCertificate> {
        let pem = std::fs::read_to_string(self.dir.join(format!("{domain}.pem"))).ok()?;
        let ca_pem = std::fs::read_to_string(self.dir.join(format!("{domain}.ca"))).ok()?;
        let (key, validity) = certified(&pem, &pem).ok()?;
        let site = SiteCertificate { key, validity, ca_pem };
        site.valid(now_secs()).then_some(site)
    }

    fn client(&self) -> Result<Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>, AskError> {
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| AskError::Unavailable(format!("reading {}: {e}", p.display())));
        let (cert, key, ca) = (
            read(&self.access.cert_file)?,
            read(&self.access.key_file)?,
            read(&self.access.ca_file)?,
        );
        let unusable = |what: &str, e: String| AskError::Unavailable(format!("the partition's {what}: {e}"));
        let chain = CertificateDer::pem_slice_iter(&cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unusable("certificate", e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| unusable("key", e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(&ca) {
            roots
                .add(der.map_err(|e| unusable("CA file", e.to_string()))?)
                .map_err(|e| unusable("CA file", e.to_string()))?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| unusable("TLS settings", e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| unusable("certificate", e.to_string()))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector))
    }

    /// Asks the Master for a certificate for `domain`, named by shared
    /// instance `reference`, and keeps it.
    pub async fn ask(&self, domain: &str, reference: &str) -> Result<SiteCertificate, AskError> {
        let client = self.client()?;
        let body = slap_proto::form::encode_fields(&[
            ("computer_id", &self.access.computer),
            ("computer_partition_id", &self.access.partition),
            ("slave_reference", reference),
            ("domain", domain),
        ]);
        let url = format!(
            "{}/requestSharedInstanceCertificate",
            self.access.url.trim_end_matches('/')
        );
        let request = hyper::Request::post(&url)
            .header(hyper::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| AskError::Unavailable(format!("{url}: {e}")))?;
        let unavailable = |e: String| AskError::Unavailable(format!("the Master at {url}: {e}"));
        let response = tokio::time::timeout(Duration::from_secs(15), client.request(request))
            .await
            .map_err(|_| unavailable("no answer within 15 s".into()))?
            .map_err(|e| unavailable(format!("{e:?}")))?;
        let status = response.status();
        let body = tokio::time::timeout(Duration::from_secs(15), response.into_body().collect())
            .await
            .map_err(|_| unavailable("no answer within 15 s".into()))?
            .map_err(|e| unavailable(e.to_string()))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).trim().to_string();
        if status.is_client_error() && status != hyper::StatusCode::TOO_MANY_REQUESTS {
            return Err(AskError::Refused(format!(
                "the cluster's CA will not certify {domain}: {text}"
            )));
        }
        if !status.is_success() {
            return Err(unavailable(format!("{status}: {text}")));
        }
        let doc = marshal::loads(&text).map_err(|e| unavailable(format!("unreadable answer: {e}")))?;
        let field = |name: &str| -> Result<String, AskError> {
            match &doc {
                Value::Dict(d) => d
                    .iter()
                    .find(|(k, _)| k.as_str() == Some(name))
                    .and_then(|(_, v)| v.as_str())
                    .map(String::from)
                    .ok_or_else(|| unavailable(format!("the answer has no {name}"))),
                _ => Err(unavailable("the answer is not a dictionary".into())),
            }
        };
        let (cert_pem, key_pem, ca_pem) = (field("certificate")?, field("key")?, field("ca_certificate")?);
        let (key, validity) =
            certified(&cert_pem, &key_pem).map_err(|e| unavailable(format!("the certificate sent: {e}")))?;
        self.keep(domain, &format!("{cert_pem}{key_pem}"), &ca_pem);
        tracing::info!(%domain, serial = %validity.serial, "site certificate from the cluster's CA");
        Ok(SiteCertificate { key, validity, ca_pem })
    }

    fn keep(&self, domain: &str, pem: &str, ca_pem: &str) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.dir)?;
            let tmp = self.dir.join(format!("{domain}.pem.tmp"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(pem.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.dir.join(format!("{domain}.pem")))?;
            crate::reload::write_atomically(&self.dir.join(format!("{domain}.ca")), ca_pem)
        };
        if let Err(e) = write() {
            tracing::warn!(%domain, error = %e, "cannot keep the site certificate; it will be asked for again after a restart");
        }
    }

    /// Forgets the certificates of domains no longer served.
    pub fn forget_others(&self, served: &std::collections::BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let domain = name.trim_end_matches(".pem").trim_end_matches(".ca");
            if domain != name && !served.contains(domain) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Master on a port nothing listens on, with partition files missing.
    fn unreachable_master(state: &std::path::Path) -> ClusterCa {
        let access = MasterAccess {
            url: "https://[::1]:1".into(),
            computer: "COMP-1".into(),
            partition: "slappart0".into(),
            cert_file: state.join("missing.crt"),
            key_file: state.join("missing.key"),
            ca_file: state.join("missing.ca"),
        };
        ClusterCa::new(access, state)
    }

    #[test]
    fn a_kept_certificate_is_read_back_and_others_are_forgotten() {
        let state = tempfile::tempdir().unwrap();
        let ca = unreachable_master(state.path());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["shop.example.com".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(ca.kept("shop.example.com").is_none());
        ca.keep(
            "shop.example.com",
            &format!("{}{}", cert.pem(), key.serialize_pem()),
            "CA",
        );
        let kept = ca.kept("shop.example.com").expect("kept");
        assert_eq!(kept.ca_pem, "CA");
        assert!(kept.valid(now_secs()) && !kept.due(now_secs()));
        ca.forget_others(&["other.example.com".to_string()].into());
        assert!(ca.kept("shop.example.com").is_none());
    }

    #[tokio::test]
    async fn an_unreachable_master_is_unavailable_not_a_refusal() {
        let state = tempfile::tempdir().unwrap();
        let ca = unreachable_master(state.path());
        assert!(matches!(
            ca.ask("shop.example.com", "SOFTINST-1").await,
            Err(AskError::Unavailable(_))
        ));
    }
}
