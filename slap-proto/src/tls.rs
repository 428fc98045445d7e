//! Mutual TLS towards a Master replica's cluster port (Raft, the cluster
//! API and, later, the native API), client side.
//!
//! Every replica serves its cluster port with its own certificate, signed by
//! the cluster's CA and named `replica:N`, and sends the CA certificate along
//! in its chain. A client trusts a server when:
//!
//! - the chain leads to the cluster's CA, which the client either has
//!   ([`Trust::Ca`], e.g. `ca.crt` from `master-node user add`) or knows by
//!   the sha256 of its DER ([`Trust::Pinned`], the hash a join or
//!   registration token carries, as `kubeadm join` pins its CA); and
//! - the certificate is a replica's (`CN=replica:N`), and, when the client
//!   dials a known member, replica N is the one it meant ([`Expect`]).
//!
//! Host names are not checked: replicas are found by address, often through
//! proxies or NAT, and what matters is that the peer is the member it claims
//! to be, which only the CA can assert.
//!
//! A client may present its own certificate ([`ClientIdentity`]): replicas
//! present theirs to each other, operators an administrator's. Without one,
//! only the calls authenticated otherwise (a join token) are allowed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::RootCertStore;
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

pub use crate::pem::{ca_certificates, TlsError};

/// How a client recognizes the cluster's CA.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The CA certificates themselves (two during a CA rotation).
    Ca(Vec<CertificateDer<'static>>),
    /// The sha256 of the CA certificate's DER (a token's pin); the server
    /// sends the CA in its chain.
    Pinned([u8; 32]),
    /// CAs that change while the program runs (a replica's, a gateway's:
    /// read again from `ca.crt`, or from the replicated state).
    Live(Arc<crate::live::LiveTrust>),
}

impl Trust {
    /// Trust the CAs in this PEM text (every certificate in it).
    pub fn ca_pem(pem: &str) -> Result<Trust, TlsError> {
        Ok(Trust::Ca(ca_certificates(pem)?))
    }

    /// Trust the CA whose DER has this sha256 (64 hex digits).
    pub fn pinned_hex(hex_sha256: &str) -> Result<Trust, TlsError> {
        let bytes = hex::decode(hex_sha256).map_err(|e| TlsError::Config(format!("CA pin: {e}")))?;
        let pin: [u8; 32] = bytes
            .try_into()
            .map_err(|_| TlsError::Config("a CA pin is the sha256 of the CA: 64 hex digits".into()))?;
        Ok(Trust::Pinned(pin))
    }
}

/// sha256 (hex) of the first certificate's DER in a PEM text: a CA's pin.
pub fn pem_sha256(pem: &str) -> Result<String, TlsError> {
    let first = ca_certificates(pem)?.remove(0);
    Ok(hex::encode(Sha256::digest(first.as_ref())))
}

/// A certificate chain and its key, presented to the server.
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        ClientIdentity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl ClientIdentity {
    /// From PEM texts (a certificate, or a chain, and its private key).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClientIdentity, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem {
                what: "certificate".into(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::Pem {
                what: "certificate".into(),
                reason: "no certificate in it".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Pem {
            what: "private key".into(),
            reason: e.to_string(),
        })?;
        Ok(ClientIdentity { chain, key })
    }
}

/// Which server the client means to reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Any replica of the cluster (a client given some addresses).
    AnyReplica,
    /// Replica N (Raft dialing a member).
    Replica(u64),
    /// A replica or a slap-gateway of the cluster (the native API, which
    /// gateways serve too).
    ReplicaOrGateway,
}

/// The subject common name of a certificate, if it has exactly one.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = cert.subject().iter_common_name();
    let cn = names.next()?.as_str().ok()?.to_string();
    names.next().is_none().then_some(cn)
}

/// The replica number a `replica:N` certificate names.
pub fn replica_of(der: &[u8]) -> Option<u64> {
    common_name(der)?.strip_prefix("replica:")?.parse().ok()
}

#[derive(Debug)]
struct ReplicaVerifier {
    trust: Trust,
    expect: Expect,
    provider: Arc<CryptoProvider>,
}

fn refuse(msg: impl Into<String>) -> rustls::Error {
    rustls::Error::General(msg.into())
}

fn roots_of(cas: impl IntoIterator<Item = CertificateDer<'static>>) -> Result<RootCertStore, rustls::Error> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| refuse(format!("the cluster CA is unusable: {e}")))?;
    }
    Ok(roots)
}

impl ServerCertVerifier for ReplicaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = match &self.trust {
            Trust::Ca(ders) => Arc::new(roots_of(ders.iter().cloned())?),
            Trust::Pinned(pin) => {
                let ca = intermediates
                    .iter()
                    .find(|c| Sha256::digest(c.as_ref()).as_slice() == pin)
                    .map(|c| c.clone().into_owned())
                    .ok_or_else(|| {
                        refuse(
                            "the server's CA is not the one the token pins: this is not the cluster the token is \
                             for (after a CA rotation, use the join token `master-node ca rotate` printed)",
                        )
                    })?;
                Arc::new(roots_of([ca])?)
            }
            Trust::Live(live) => live.roots(),
        };
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if self.expect == Expect::ReplicaOrGateway
            && common_name(end_entity).is_some_and(|cn| cn.starts_with("gateway:"))
        {
            return Ok(ServerCertVerified::assertion());
        }
        let Some(n) = replica_of(end_entity) else {
            return Err(refuse("the server's certificate is not a Master replica's"));
        };
        match self.expect {
            Expect::Replica(want) if want != n => Err(refuse(format!(
                "dialed replica {want} but replica {n} answered (stale address?)"
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    crate::signatures::provider_signature_checks!();
}

/// A rustls client configuration for the cluster port.
pub fn client_config(
    trust: &Trust,
    identity: Option<&ClientIdentity>,
    expect: Expect,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = verifying(trust, expect)?;
    let config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    Ok(with_h2(config))
}

/// As [`client_config`], presenting whatever `identity` holds at each
/// handshake (a renewed certificate is used from the next connection on).
pub fn client_config_live(
    trust: &Trust,
    identity: Arc<crate::live::LiveIdentity>,
    expect: Expect,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    Ok(with_h2(verifying(trust, expect)?.with_client_cert_resolver(identity)))
}

fn verifying(
    trust: &Trust,
    expect: Expect,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(ReplicaVerifier {
        trust: trust.clone(),
        expect,
        provider: provider.clone(),
    });
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier))
}

fn with_h2(mut config: rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

type Connecting = Pin<Box<dyn Future<Output = std::io::Result<hyper_util::rt::TokioIo<TlsTcp>>> + Send>>;
type TlsTcp = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Opens TCP (no Nagle: Raft's messages are small) and TLS for a tonic channel.
#[derive(Clone)]
struct Connector {
    addr: String,
    tls: tokio_rustls::TlsConnector,
}

impl tower::Service<Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<TlsTcp>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let (addr, tls) = (self.addr.clone(), self.tls.clone());
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let host = addr
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']))
                .unwrap_or(&addr);
            // Any name will do: the verifier checks the replica, not the name.
            let name = ServerName::try_from(host.to_string())
                .unwrap_or_else(|_| ServerName::try_from("replica").expect("a valid DNS name"));
            let stream = tls.connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// A lazily connected gRPC channel to the cluster port at `addr` (host:port).
pub fn channel(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<Channel, TlsError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| TlsError::Address(addr.to_string(), e.to_string()))?
        .connect_timeout(Duration::from_millis(1500))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let connector = Connector {
        addr: addr.to_string(),
        tls: tokio_rustls::TlsConnector::from(config),
    };
    Ok(endpoint.connect_with_connector_lazy(connector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_and_refuse_garbage() {
        assert!(Trust::pinned_hex(&"ab".repeat(32)).is_ok());
        assert!(Trust::pinned_hex("abc").is_err());
        assert!(Trust::pinned_hex(&"zz".repeat(32)).is_err());
        assert!(Trust::ca_pem("not a certificate").is_err());
    }
}
