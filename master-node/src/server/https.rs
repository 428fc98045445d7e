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

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
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

/// Streams one HTTP/2 connection's caller may reset before the replica
/// took them up. h2's default, 20, guards against rapid-reset floods, but a
/// gateway resets every forwarded call its own caller abandoned, over its
/// one connection, and under load more than 20 wait to be taken up: the
/// replica then ended the connection (GOAWAY ENHANCE_YOUR_CALM) and every
/// call on it failed (765 `ResourceExhausted` in a 1M-partition fleet run,
/// docs/benchmarks.md). Callers are authenticated and rate-limited; the
/// bound stays, scaled to the streams a connection carries.
const PENDING_RESETS_PER_CONNECTION: usize = 4096;

/// Why HTTPS could not start.
#[derive(Debug, thiserror::Error)]
#[error("SLAP over TLS: {0}")]
pub struct TlsError(String);

fn tls_err(e: impl std::fmt::Display) -> TlsError {
    TlsError(e.to_string())
}

/// The replica's server certificate, issued on first use and kept on disk;
/// issued again when the CA that signs or the host names it must carry
/// change (a CA rotation, a new `--slap-advertise`), or when two thirds of
/// its ten years have passed. `Ok(None)`: what is on disk is still good.
fn server_identity(replica: &Replica, ca: &Authority, names: &[String]) -> Result<Option<(String, String)>, TlsError> {
    let dir = replica.data_dir.join("tls");
    let (crt, key, names_file) = (dir.join("server.crt"), dir.join("server.key"), dir.join("server.names"));
    let mut names: Vec<String> = names.to_vec();
    if !names.iter().any(|n| n == "localhost") {
        names.insert(0, "localhost".to_string());
    }
    let wanted = names.join("\n");
    // Certificates kept before names were recorded carried only the listen host.
    let names_now = std::fs::read_to_string(&names_file).ok();
    if let (Ok(c), Ok(_)) = (std::fs::read_to_string(&crt), std::fs::read_to_string(&key)) {
        let leaf = CertificateDer::pem_slice_iter(c.as_bytes()).next().and_then(Result::ok);
        let signer = CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes())
            .next()
            .and_then(Result::ok);
        let by_signer = matches!((&leaf, &signer), (Some(l), Some(s)) if slap_proto::live::Validity::issued_by(l, s));
        let due =
            slap_proto::live::Validity::of_pem(&c).is_none_or(|v| slap_proto::live::renewal_due(&v, pki::now_secs()));
        if by_signer && names_now.as_deref() == Some(wanted.as_str()) && !due {
            return Ok(None);
        }
    }
    std::fs::create_dir_all(&dir).map_err(tls_err)?;
    let issued = pki::issue(ca, &Role::Replica(replica.id), pki::now_secs(), 3650, &names).map_err(tls_err)?;
    let cert_pem = issued.certificate.cert_pem.to_text();
    slap_proto::live::install(&crt, &cert_pem, &key, &issued.key_pem).map_err(tls_err)?;
    std::fs::write(&names_file, &wanted).map_err(tls_err)?;
    Ok(Some((cert_pem, issued.key_pem)))
}

/// The SLAP port's certificate as kept on disk, issued or issued again
/// first if needed (see [`server_identity`]).
fn current_identity(replica: &Replica, ca: &Authority, names: &[String]) -> Result<(String, String), TlsError> {
    if let Some(fresh) = server_identity(replica, ca, names)? {
        return Ok(fresh);
    }
    let dir = replica.data_dir.join("tls");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).map_err(tls_err);
    Ok((read("server.crt")?, read("server.key")?))
}

/// Issues the SLAP port's certificate again if its CA, names or age call
/// for it, and serves the new one from the next handshake (called every
/// second while the port serves). `Ok(true)` if it changed.
pub fn refresh(replica: &Replica) -> Result<bool, TlsError> {
    let Some(live) = replica.slap_identity.get() else {
        return Ok(false);
    };
    let (ca, chain) = {
        let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
        let Some(ca) = state.authority.clone() else {
            return Ok(false);
        };
        (ca, state.chain_pem().to_string())
    };
    live.set_chain_tail(cross_signed(&chain)).map_err(tls_err)?;
    // Decided from the certificate held, so the files are read only when
    // it must change (this runs every second).
    let signer = CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes())
        .next()
        .and_then(Result::ok);
    let held_good = match (live.end_entity(), signer, live.validity()) {
        (Some(leaf), Some(signer), Some(v)) => {
            slap_proto::live::Validity::issued_by(&leaf, &signer) && !slap_proto::live::renewal_due(&v, pki::now_secs())
        }
        _ => false,
    };
    if held_good {
        return Ok(false);
    }
    let names_file = replica.data_dir.join("tls").join("server.names");
    let names: Vec<String> = std::fs::read_to_string(names_file)
        .map_err(tls_err)?
        .lines()
        .map(str::to_string)
        .collect();
    match server_identity(replica, &ca, &names)? {
        Some((cert, key)) => {
            live.replace(&cert, &key).map_err(tls_err)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Keeps the SLAP port's certificate current (see [`refresh`]) until the
/// replica is dropped.
async fn keep_current(replica: std::sync::Weak<Replica>) {
    let mut last_error = String::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(replica) = replica.upgrade() else { return };
        match refresh(&replica) {
            Ok(true) => info!("SLAP port certificate issued again (CA rotation, new names, or two thirds of its life)"),
            Ok(false) => last_error.clear(),
            Err(e) if e.to_string() != last_error => {
                warn!(error = %e, "the SLAP port's certificate could not be issued again; keeping the one in use");
                last_error = e.to_string();
            }
            Err(_) => {}
        }
    }
}

/// What the SLAP port sends after its certificate: the cross-signed CA
/// during a rotation, for clients that trust only the old CA. Unlike the
/// cluster port it sends no CA: its clients hold `ca.crt` and pin nothing,
/// and every extra certificate costs each handshake.
fn cross_signed(chain_pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

/// The server configuration: mutual TLS against the CAs the replica
/// trusts at each handshake, presenting its live SLAP certificate.
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
    let chain = slap_proto::live::LiveClientVerifier::new(replica.tls.trust.clone(), false).map_err(tls_err)?;
    let verifier = StateVerifier::new(chain, Arc::downgrade(&replica.state), Policy::RequiredRecorded);
    let (cert_pem, key_pem) = current_identity(replica, &ca, names)?;
    let chain_pem = replica
        .state
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .chain_pem()
        .to_string();
    let tail = cross_signed(&chain_pem);
    let live = slap_proto::live::LiveIdentity::from_pem(&cert_pem, &key_pem, tail).map_err(tls_err)?;
    let live = replica.slap_identity.get_or_init(|| live).clone();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(live);
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
    tokio::spawn(keep_current(Arc::downgrade(&replica)));
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
            builder
                .http2()
                .max_concurrent_streams(STREAMS_PER_CONNECTION)
                .max_pending_accept_reset_streams(PENDING_RESETS_PER_CONNECTION);
            if let Err(e) = builder.serve_connection(io, service).await {
                debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}
