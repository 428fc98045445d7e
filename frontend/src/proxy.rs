//! One request through the frontend: find its route, forward it to the
//! backend with the forwarding headers set and the hop-by-hop ones dropped,
//! stream both bodies, and hand a WebSocket over to a byte pipe once both
//! sides agreed to upgrade.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioIo;

use crate::access_log::{AccessLog, Entry};
use crate::metrics::Metrics;
use crate::route::{Route, RouteTable};

/// What every response body is.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The client the frontend forwards with: pooled keep-alive connections to
/// each backend, http or https.
pub type Upstream = Client<hyper_rustls::HttpsConnector<HttpConnector>, Incoming>;

/// Makes the upstream client; `roots` are the CAs backends' certificates
/// are checked against.
pub fn upstream(roots: rustls::RootCertStore) -> Upstream {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(std::time::Duration::from_secs(10)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// What a request handler needs, shared by every connection.
pub struct Frontend {
    pub table: RwLock<Arc<RouteTable>>,
    pub upstream: Upstream,
    pub metrics: Metrics,
    pub access_log: AccessLog,
    /// The HTTPS port clients reach, for redirects of `https-only` routes.
    pub https_port: Option<u16>,
}

/// How the client reached the frontend.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, those the `Connection` header names, and
/// `Upgrade` (put back by the caller for an upgrade it forwards).
pub fn drop_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for h in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(h);
    }
    headers.remove(header::UPGRADE);
}

fn wants_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_says = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    if connection_says {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

fn text(status: StatusCode, message: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(message + "\n")).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The host a request is for, without a port.
fn requested_host(req: &Request<Incoming>) -> String {
    let raw = req
        .uri()
        .host()
        .map(str::to_string)
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    match raw.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default().to_string(),
        None => raw.split(':').next().unwrap_or_default().to_string(),
    }
}

impl Frontend {
    /// The current routes.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Serves one request; never fails (errors are responses).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        arrival: Arrival,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        // What the access log line needs, gathered only when there is one.
        let logged = self.access_log.enabled().then(|| {
            (
                req.method().clone(),
                req.uri()
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "/".into()),
                req.version(),
                header_text(req.headers(), header::REFERER),
                header_text(req.headers(), header::USER_AGENT),
            )
        });
        let table = self.routes();
        let host = requested_host(&req);
        let route = table.lookup(&host, req.uri().path()).cloned();
        let response = match &route {
            None => text(
                StatusCode::NOT_FOUND,
                format!("no route on this frontend for {host}{}", req.uri().path()),
            ),
            Some(route) => self.forward(route, req, arrival, &host).await,
        };
        let status = response.status();
        self.metrics.count_response(status);
        if let Some(r) = &route {
            r.requests.fetch_add(1, Ordering::Relaxed);
        }
        if let Some((method, target, version, referer, agent)) = logged {
            self.access_log.write(Entry {
                peer: arrival.peer,
                method: method.as_str(),
                target: &target,
                version,
                status: status.as_u16(),
                bytes: response
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
                referer: &referer,
                user_agent: &agent,
                elapsed: started.elapsed(),
                route: route.as_ref().map(|r| r.reference.as_str()),
            });
        }
        Ok(response)
    }

    async fn forward(
        &self,
        route: &Arc<Route>,
        mut req: Request<Incoming>,
        arrival: Arrival,
        host: &str,
    ) -> Response<Body> {
        if route.https_only && !arrival.tls {
            let port = match self.https_port {
                Some(443) | None => String::new(),
                Some(p) => format!(":{p}"),
            };
            let shown = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.to_string()
            };
            let target = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let mut r = text(
                StatusCode::MOVED_PERMANENTLY,
                "this route is served over HTTPS only".into(),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("https://{shown}{port}{target}")) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            return r;
        }
        let upgrade = wants_upgrade(req.headers());
        if upgrade.is_some() && !route.websocket {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "route {} does not pass upgrades (its websocket parameter is off)",
                    route.reference
                ),
            );
        }
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));

        let uri = format!(
            "{}://{}{}",
            route.backend.scheme,
            route.backend.authority,
            route.upstream_path(req.uri().path(), req.uri().query())
        );
        let uri: Uri = match uri.parse() {
            Ok(u) => u,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("cannot forward this path: {e}")),
        };
        let (mut parts, body) = req.into_parts();
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        drop_hop_by_hop(&mut parts.headers);
        let headers = &mut parts.headers;
        if let Some(h) = &original_host {
            headers.insert(header::HOST, h.clone());
            headers.insert(HeaderName::from_static("x-forwarded-host"), h.clone());
        }
        let peer_ip = arrival.peer.ip().to_canonical().to_string();
        let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(earlier) => format!("{earlier}, {peer_ip}"),
            None => peer_ip,
        };
        if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
            headers.insert(HeaderName::from_static("x-forwarded-for"), v);
        }
        headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static(if arrival.tls { "https" } else { "http" }),
        );
        if let Some(u) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, u.clone());
        }
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let upstream_req = Request::from_parts(parts, body);

        self.metrics.upstream_in_flight.fetch_add(1, Ordering::Relaxed);
        let answered = tokio::time::timeout(route.timeout, self.upstream.request(upstream_req)).await;
        self.metrics.upstream_in_flight.fetch_sub(1, Ordering::Relaxed);
        let mut resp = match answered {
            Err(_) => {
                return text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "the backend of {} did not answer within {} s",
                        route.reference,
                        route.timeout.as_secs()
                    ),
                )
            }
            Ok(Err(e)) => {
                self.metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(route = %route.reference, backend = %route.backend.authority, error = %e, "backend unreachable");
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("the backend of {} cannot be reached", route.reference),
                );
            }
            Ok(Ok(r)) => r,
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_side) = client_upgrade {
                let backend_side = hyper::upgrade::on(&mut resp);
                let reference = route.reference.clone();
                let metrics = self.metrics.clone();
                tokio::spawn(async move {
                    match (client_side.await, backend_side.await) {
                        (Ok(c), Ok(b)) => {
                            metrics.upgraded.fetch_add(1, Ordering::Relaxed);
                            let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
                            let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
                        }
                        (c, b) => {
                            tracing::warn!(route = %reference, client = ?c.err(), backend = ?b.err(), "upgrade failed")
                        }
                    }
                });
                let (parts, body) = resp.into_parts();
                return Response::from_parts(parts, body.boxed());
            }
        }
        let (mut parts, body) = resp.into_parts();
        drop_hop_by_hop(&mut parts.headers);
        // The client's connection has its own version (an HTTP/1.0
        // backend must not turn it into a closing one).
        parts.version = Version::HTTP_11;
        Response::from_parts(parts, body.boxed())
    }
}

fn header_text(headers: &HeaderMap, name: HeaderName) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        drop_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::ACCEPT));
    }

    #[test]
    fn an_upgrade_needs_both_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h).is_none());
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert_eq!(wants_upgrade(&h).unwrap(), "websocket");
    }
}
