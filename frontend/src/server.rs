//! Listeners: plain HTTP and HTTPS on every address given, HTTP/1.1 and
//! HTTP/2 on both (ALPN on HTTPS), and the admin listener (`/metrics`,
//! `/healthz`). On shutdown the listeners close and every open connection
//! finishes the requests it has (graceful shutdown) before the process ends.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::certs::SiteCertificates;
use crate::proxy::{Arrival, Frontend};

/// The TLS settings of the HTTPS listeners: the certificate by SNI, ALPN
/// for h2 and http/1.1.
pub fn tls_acceptor(certificates: Arc<SiteCertificates>) -> TlsAcceptor {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TlsAcceptor::from(Arc::new(config))
}

/// Accepts connections on `listener` until `shutdown` says so.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    frontend: Arc<Frontend>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let frontend = frontend.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            frontend.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
            frontend.metrics.connections_open.fetch_add(1, Ordering::Relaxed);
            match tls {
                None => connection(TokioIo::new(stream), peer, false, frontend.clone(), shutdown).await,
                Some(acceptor) => {
                    match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream)).await {
                        Ok(Ok(s)) => connection(TokioIo::new(s), peer, true, frontend.clone(), shutdown).await,
                        _ => {
                            frontend.metrics.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            frontend.metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn connection<I>(io: I, peer: SocketAddr, tls: bool, frontend: Arc<Frontend>, mut shutdown: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let arrival = Arrival { peer, tls };
    let service = service_fn(move |req| frontend.clone().handle(req, arrival));
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// The admin listener: `/metrics` and `/healthz`.
pub async fn serve_admin(listener: TcpListener, frontend: Arc<Frontend>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
            _ = shutdown.changed() => return,
        };
        let frontend = frontend.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let frontend = frontend.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, frontend.metrics.render(&frontend.routes())),
                        "/healthz" => (StatusCode::OK, format!("ok, {} routes\n", frontend.routes().len())),
                        _ => (StatusCode::NOT_FOUND, "/metrics or /healthz\n".to_string()),
                    };
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
