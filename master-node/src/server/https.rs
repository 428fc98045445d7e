//! The HTTPS listener of a replica's SLAP port (SLAP, the native API, the
//! dashboard), with mutual TLS (rustls, ring).
//!
//! Every client presents a certificate. A handshake succeeds only when the
//! certificate chains to the cluster's CA, is within its validity, and is a
//! certificate this Master recorded and has not revoked; the last check reads
//! the replicated state at each handshake, so a revocation takes effect on
//! every replica as soon as it applies. The verified certificate's role
//! becomes the connection's [`Caller`], which the authorization middleware
//! checks on every call.
//!
//! The replica's own server certificate is signed with the same CA and kept
//! in `<data_dir>/tls/` (key mode 0600). The `slapos` client does not check
//! it (reference section 1.1); our own clients can, with `ca.crt`.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::authz::Caller;
use crate::client_certs::{Policy, StateVerifier};
use crate::pki;
use crate::replica::Replica;
use crate::state::{Authority, Role};

/// Streams one HTTP/2 connection may carry at once. A gateway multiplexes
/// every node's held watch over its one connection to a replica, so
/// hyper's default of 200 made the 201st node's polls wait for a watch to
/// end (10 s polls in the fleet simulator at 200 nodes).
const STREAMS_PER_CONNECTION: u32 = 1 << 16;

/// Why HTTPS could not start.
#[derive(Debug, thiserror::Error)]
#[error("SLAP over TLS: {0}")]
pub struct TlsError(String);

fn tls_err(e: impl std::fmt::Display) -> TlsError {
    TlsError(e.to_string())
}

fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(tls_err)
}

/// The replica's server certificate, issued on first use and kept on disk;
/// issued again when the CA or the host names it must carry change (a new
/// `--slap-advertise`), or when two thirds of its ten years have passed.
fn server_identity(replica: &Replica, ca: &Authority, names: &[String]) -> Result<(String, String), TlsError> {
    let dir = replica.data_dir.join("tls");
    let (crt, key, names_file) = (dir.join("server.crt"), dir.join("server.key"), dir.join("server.names"));
    let mut names: Vec<String> = names.to_vec();
    if !names.iter().any(|n| n == "localhost") {
        names.insert(0, "localhost".to_string());
    }
    let wanted = names.join("\n");
    let ca_now = std::fs::read_to_string(dir.join("ca.crt")).ok();
    // Certificates kept before names were recorded carried only the listen host.
    let names_now = std::fs::read_to_string(&names_file).ok();
    if let (Ok(c), Ok(k), Some(ca_pem)) = (std::fs::read_to_string(&crt), std::fs::read_to_string(&key), ca_now) {
        let current = slap_proto::live::Validity::of_pem(&c);
        let due = current.is_none_or(|v| slap_proto::live::renewal_due(&v, pki::now_secs()));
        if ca_pem == ca.cert_pem && names_now.as_deref() == Some(wanted.as_str()) && !due {
            return Ok((c, k));
        }
    }
    std::fs::create_dir_all(&dir).map_err(tls_err)?;
    let issued = pki::issue(ca, &Role::Replica(replica.id), pki::now_secs(), 3650, &names).map_err(tls_err)?;
    pki::write_private(&key, &issued.key_pem).map_err(tls_err)?;
    std::fs::write(&crt, issued.certificate.cert_pem.to_text()).map_err(tls_err)?;
    std::fs::write(dir.join("ca.crt"), &ca.cert_pem).map_err(tls_err)?;
    std::fs::write(&names_file, &wanted).map_err(tls_err)?;
    Ok((issued.certificate.cert_pem.to_text(), issued.key_pem))
}

/// The server configuration: mutual TLS against the cluster's CA.
pub fn server_config(replica: &Arc<Replica>, names: &[String]) -> Result<Option<rustls::ServerConfig>, TlsError> {
    let Some(ca) = replica
        .state
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .authority
        .clone()
    else {
        return Ok(None);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(&ca.cert_pem)? {
        roots.add(c).map_err(tls_err)?;
    }
    let chain = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(tls_err)?;
    let verifier = StateVerifier::new(chain, Arc::downgrade(&replica.state), Policy::RequiredRecorded);
    let (cert_pem, key_pem) = server_identity(replica, &ca, names)?;
    let key = {
        use rustls::pki_types::pem::PemObject;
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(tls_err)?
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pem_certs(&cert_pem)?, key)
        .map_err(tls_err)?;
    // HTTP/2 for the native API (gRPC), HTTP/1.1 for SLAP's clients.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // A resumed session would skip the revocation check.
    crate::cluster_tls::no_resumption(&mut config);
    Ok(Some(config))
}

/// Resolves once the replica stops (the guard `wait_for` returns is not `Send`).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves `app` over HTTPS on `listener` until `stop` turns true. Waits for
/// the cluster's CA first (a new cluster creates it within a second).
pub async fn serve(
    replica: Arc<Replica>,
    app: axum::Router,
    listener: TcpListener,
    names: Vec<String>,
    mut stop: watch::Receiver<bool>,
) {
    let config = loop {
        match server_config(&replica, &names) {
            Ok(Some(c)) => break Arc::new(c),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "cannot set up TLS yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stopped(&mut stop) => return,
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let router = app;
    info!(addr = ?listener.local_addr().ok(), "serving SLAP over HTTPS (client certificates required)");
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => return,
        };
        let (acceptor, router, replica) = (acceptor.clone(), router.clone(), replica.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let role = {
                let certs = tls.get_ref().1.peer_certificates();
                let fp = certs.and_then(|c| c.first()).map(|c| pki::fingerprint(c));
                let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
                fp.and_then(|fp| state.certificates.get(&fp).map(|c| c.role.clone()))
            };
            let Some(role) = role else { return };
            let app = router
                .layer(axum::Extension(Caller(role)))
                .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
            let service = hyper_util::service::TowerToHyperService::new(app);
            let io = hyper_util::rt::TokioIo::new(tls);
            let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder.http2().max_concurrent_streams(STREAMS_PER_CONNECTION);
            if let Err(e) = builder.serve_connection(io, service).await {
                debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}
