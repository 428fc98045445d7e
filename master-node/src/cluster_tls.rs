//! The cluster port over mutual TLS: a replica's key material on disk, the
//! server configuration, and connections that carry who the caller is.
//!
//! The cluster port serves Raft and the cluster API. Every replica has a
//! certificate from the cluster's CA naming it (`replica:N`); it serves with
//! it and presents it when it calls a peer. Clients other than replicas may
//! present an administrator's certificate, or none: calls authenticated by
//! the join token (join, leave, certificates) and `status` need none.
//!
//! A presented certificate must chain to the cluster's CA and must not be
//! revoked in this replica's state; revocation is checked at the handshake
//! and again on every call ([`Peer::live_role`]), since a Raft connection
//! lives for hours. A replica that has just joined has not applied the
//! revocations yet: until it catches up it trusts what the CA signed, which
//! is what the CA pin in its join token vouches for.
//!
//! Files, in `<data dir>/tls/`: `ca.crt`, `replica.crt`, `replica.key`
//! (mode 0600). `master-node init` also writes an administrator's
//! certificate to `<data dir>/admin/` for the operator.
//!
//! Below Raft and the replica handle: must not import either.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use slap_proto::live::{LiveClientVerifier, LiveIdentity, LiveTrust};
use slap_proto::tls::{Expect, Trust};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::client_certs::{Policy, StateVerifier};
use crate::pki;
use crate::state::{Fingerprint, Master, Role};

/// Why the cluster port's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterTlsError {
    #[error("{path}: {source} (a replica's TLS files are written by init and join; is this a replica's data dir?)")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Config(String),
}

fn config_err(e: impl std::fmt::Display) -> ClusterTlsError {
    ClusterTlsError::Config(e.to_string())
}

/// A replica's certificate, key and the cluster's CAs. Both are live: a
/// renewal replaces the certificate for the next handshakes, and a CA
/// rotation the CAs trusted, without a restart ([`LiveIdentity`],
/// [`LiveTrust`]; `renewal` keeps them in step with the state).
#[derive(Clone)]
pub struct ReplicaTls {
    pub trust: Arc<LiveTrust>,
    pub identity: Arc<LiveIdentity>,
}

/// What a replica sends after its certificate: the cross-signed CA during
/// a rotation (`chain_pem`), then every CA trusted, so a client that pins
/// either CA's hash finds it.
pub fn chain_tail(trust: &LiveTrust, chain_pem: &str) -> Vec<CertificateDer<'static>> {
    let mut tail: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .filter_map(Result::ok)
        .collect();
    tail.extend(trust.certificates());
    tail
}

impl std::fmt::Debug for ReplicaTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaTls").finish_non_exhaustive()
    }
}

impl ReplicaTls {
    /// From PEM texts (`ca_pem` may hold two CAs during a rotation); the
    /// certificate must be the key's.
    pub fn new(ca_pem: String, cert_pem: &str, key_pem: &str) -> Result<ReplicaTls, ClusterTlsError> {
        let trust = LiveTrust::from_pem(&ca_pem).map_err(config_err)?;
        // The CAs go along; `renewal` adds the cross-signed one during a rotation.
        let tail = chain_tail(&trust, "");
        let identity = LiveIdentity::from_pem(cert_pem, key_pem, tail).map_err(config_err)?;
        Ok(ReplicaTls { trust, identity })
    }

    /// The CAs trusted, as `ca.crt` holds them (the signing one first).
    pub fn ca_pem(&self) -> String {
        self.trust.pem()
    }

    /// Where the certificate and key are kept under `data_dir`.
    pub fn files(data_dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = data_dir.join("tls");
        (dir.join("replica.crt"), dir.join("replica.key"))
    }

    /// Reads `<data_dir>/tls/`.
    pub fn load(data_dir: &Path) -> Result<ReplicaTls, ClusterTlsError> {
        let dir = data_dir.join("tls");
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| ClusterTlsError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        ReplicaTls::new(read("ca.crt")?, &read("replica.crt")?, &read("replica.key")?)
    }

    /// Writes `<data_dir>/tls/` (the key with mode 0600), synced; each file
    /// is renamed into place, so a reader never sees half of one.
    pub fn save(&self, data_dir: &Path) -> Result<(), ClusterTlsError> {
        let dir = data_dir.join("tls");
        let fail = |path: &Path| {
            let path = path.display().to_string();
            move |source| ClusterTlsError::Write { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(fail(&dir))?;
        let (crt, key) = Self::files(data_dir);
        slap_proto::live::install(&crt, &self.identity.cert_pem(), &key, &self.identity.key_pem())
            .map_err(fail(&crt))?;
        pki::write_public(&dir.join("ca.crt"), &self.trust.pem()).map_err(fail(&dir.join("ca.crt")))?;
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(fail(&dir))
    }

    /// How this replica trusts its peers: the CAs trusted at each handshake.
    pub fn trust(&self) -> Result<Trust, ClusterTlsError> {
        Ok(Trust::Live(self.trust.clone()))
    }

    /// Presenting this replica's certificate (the one held at each
    /// handshake), towards `expect`.
    pub fn client_config(&self, expect: Expect) -> Result<Arc<rustls::ClientConfig>, ClusterTlsError> {
        slap_proto::tls::client_config_live(&self.trust()?, self.identity.clone(), expect).map_err(config_err)
    }

    /// Presenting no certificate (asking whether this replica was removed:
    /// its own certificate is revoked by then).
    pub fn anonymous_client_config(&self) -> Result<Arc<rustls::ClientConfig>, ClusterTlsError> {
        slap_proto::tls::client_config(&self.trust()?, None, Expect::AnyReplica).map_err(config_err)
    }

    /// The server configuration of the cluster port.
    pub fn server_config(&self, state: Weak<RwLock<Master>>) -> Result<rustls::ServerConfig, ClusterTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = LiveClientVerifier::new(self.trust.clone(), true).map_err(config_err)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_client_cert_verifier(StateVerifier::new(chain, state, Policy::OptionalNotRevoked))
            .with_cert_resolver(self.identity.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        no_resumption(&mut config);
        Ok(config)
    }
}

/// Turns TLS session resumption off: a resumed session skips the client
/// certificate's verification, so a revoked certificate would keep working
/// for as long as its session could be resumed. Every connection gets a
/// full handshake and the revocation check.
pub fn no_resumption(config: &mut rustls::ServerConfig) {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
}

/// Who is on the other end of a cluster-port connection.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub remote: Option<SocketAddr>,
    /// The role the verified certificate names, if one was presented.
    pub role: Option<Role>,
    /// sha256 of that certificate.
    pub fingerprint: Option<Fingerprint>,
}

impl Peer {
    /// The caller of a gRPC request (no certificate if the connection was
    /// not one of ours, as in in-process tests).
    pub fn of<T>(req: &tonic::Request<T>) -> Peer {
        req.extensions().get::<Peer>().cloned().unwrap_or_default()
    }

    /// The role, unless its certificate was revoked since the handshake.
    pub fn live_role(&self, state: &RwLock<Master>) -> Option<Role> {
        let fp = self.fingerprint?;
        let revoked = state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .certificates
            .get(&fp)
            .is_some_and(|c| c.revoked);
        if revoked {
            None
        } else {
            self.role.clone()
        }
    }

    /// Requires an administrator's or a replica's certificate.
    pub fn require_replica_or_admin(&self, state: &RwLock<Master>, what: &str) -> Result<Role, tonic::Status> {
        match self.live_role(state) {
            Some(r @ (Role::Admin | Role::Replica(_))) => Ok(r),
            Some(other) => Err(tonic::Status::permission_denied(format!(
                "{what} is for replicas and administrators, not {other}"
            ))),
            None => Err(tonic::Status::unauthenticated(format!(
                "{what} needs a replica's or an administrator's certificate (none presented, or revoked)"
            ))),
        }
    }
}

/// A TLS connection and the peer it authenticated.
pub struct Authenticated {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    peer: Peer,
}

impl tonic::transport::server::Connected for Authenticated {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Authenticated {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Authenticated {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts connections on `listener` and hands over those whose TLS
/// handshake succeeded. Handshakes run side by side (a slow or silent
/// client holds only its own), each bounded to 10 s; failures are logged
/// and dropped, never passed to the server.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Authenticated>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let io = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(io)) => io,
                    Ok(Err(e)) => {
                        debug!(%remote, error = %e, "cluster port: TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        debug!(%remote, "cluster port: TLS handshake timed out");
                        return;
                    }
                };
                let cert = io.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
                let peer = Peer {
                    remote: Some(remote),
                    role: cert.as_ref().and_then(|c| pki::role_of(c)),
                    fingerprint: cert.as_ref().map(|c| pki::fingerprint(c)),
                };
                let _ = tx.send(Ok(Authenticated { io, peer })).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
