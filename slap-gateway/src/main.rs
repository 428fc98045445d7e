//! `slap-gateway`: the stateless front door of the Master for SLAP and the
//! native API.
//!
//! It forwards every call (any path, any method; SLAP over HTTP/1.1, the
//! native gRPC API over HTTP/2) to a replica, the leader first: it learns
//! the replicas and the leader from any replica it can reach
//! ([`discovery`]). Replicas also forward writes to the leader and hold
//! calls while a leader is being elected, so when the leader does not
//! answer in time, refuses the connection or answers 503 (gRPC: UNAVAILABLE),
//! the gateway moves to the next replica, looks for the new leader, and
//! keeps trying for up to `--hold` seconds before answering 503 itself.
//! Any number of gateways can run side by side: they share nothing.
//!
//! Retrying a call that may have reached a replica is safe: SLAP's writes
//! are idempotent (an identical re-request, report or publication changes
//! nothing), and native writes carry a request id the Master deduplicates.
//!
//! Node polls that revalidate (304) or hold a watch are answered by the
//! gateway itself while it follows the leader's revision feed ([`edge`]).
//!
//! `/healthz` answers 200 while at least one replica does; `/metrics` gives
//! the counters in the Prometheus text format.
//!
//! With `--tls-dir`, callers and replicas speak mutual TLS and the caller's
//! verified identity travels to the replica (see [`tls`]).
//!
//! Before forwarding, the gateway holds each caller (a certificate; without
//! TLS, an address) to `--rate-limit` calls per second (429 with
//! `Retry-After` beyond it) and refuses a body over `--max-body-bytes`
//! (`--max-document-bytes` for a computer's document or a usage journal)
//! with 413: an oversized call never reaches a replica. Replicas check
//! again against the cluster's own limits.

mod discovery;
mod edge;
mod renewal;
mod tls;

use slap_proto::limits::{document_etag, MIN_REVISION_HEADER};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clap::Parser;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(Parser)]
#[command(
    name = "slap-gateway",
    version,
    about = "Forwards SLAP calls to a Master replica that answers, holding them through elections"
)]
struct Args {
    /// Some replicas' SLAP addresses (host:port, their --slap-listen or
    /// --slap-advertise), comma-separated; the others and the leader are
    /// learned from them.
    #[arg(long, value_delimiter = ',', required = true)]
    replicas: Vec<String>,
    /// host:port to serve SLAP on.
    #[arg(long)]
    listen: String,
    /// Seconds to keep trying replicas before answering 503.
    #[arg(long, default_value_t = 30)]
    hold: u64,
    /// Seconds one replica has to answer one attempt.
    #[arg(long, default_value_t = 10)]
    attempt: u64,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Serve HTTPS with client certificates and reach the replicas over
    /// HTTPS, with gateway.crt, gateway.key and ca.crt from this directory
    /// (`master-node gateway add`). The certificate is read again every
    /// second (a `master-node cert renew --out` into this directory is
    /// taken without a restart) and renewed by the gateway itself at two
    /// thirds of its lifetime. Without it: plain HTTP both ways, for
    /// replicas run with --insecure-http.
    #[arg(long)]
    tls_dir: Option<std::path::PathBuf>,
    /// Largest body of a call, in bytes (413 beyond it, before forwarding).
    #[arg(long, default_value_t = slap_proto::limits::BODY_BYTES)]
    max_body_bytes: u32,
    /// Largest computer document or usage journal, in bytes.
    #[arg(long, default_value_t = slap_proto::limits::DOCUMENT_BYTES)]
    max_document_bytes: u32,
    /// Calls per second one caller (a certificate; without TLS, an address)
    /// may make; more are answered 429 with Retry-After. 0: no limit.
    #[arg(long, default_value_t = 1_000)]
    rate_limit: u32,
    /// Calls one caller may make at once before --rate-limit holds it.
    #[arg(long, default_value_t = 2_000)]
    rate_burst: u32,
    /// How stale a 304 answered by the gateway itself may be, in
    /// milliseconds: the gateway follows the leader's revision feed and
    /// answers node polls (304, held watches) only while the leader
    /// confirmed its revisions within this time. 0: forward every poll.
    #[arg(long, default_value_t = 2_000)]
    edge_staleness_ms: u64,
    /// Computer documents the gateway keeps to answer polls itself (for
    /// the revision the feed says is current), in MiB. 0: none.
    #[arg(long, default_value_t = 32)]
    edge_cache_mib: usize,
}

/// Headers that describe one connection, not the call (RFC 9110 7.6.1),
/// plus Host: never passed on. Passing on a caller's `Connection: close`
/// would make every forwarded call open a new connection to the replica.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    // Only the gateway says who the caller is.
    tls::CALLER_HEADER,
];

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    retries: AtomicU64,
    failures: AtomicU64,
    /// Calls refused before forwarding: over a body limit, over the rate.
    too_large: AtomicU64,
    rate_limited: AtomicU64,
    /// Reads spread over the replicas so far (whose turn is next).
    spread: AtomicU64,
}

/// The read buffer of a caller's HTTP/1.1 connection, and so the largest
/// request head.
const READ_BUFFER_BYTES: usize = 8192;
/// Idle HTTP/1.1 connections kept to each replica.
const UPSTREAM_IDLE_PER_REPLICA: usize = 256;
/// The largest read buffer of an HTTP/1.1 connection to a replica (an
/// answer larger than this streams through in pieces).
const UPSTREAM_READ_BUFFER_BYTES: usize = 64 << 10;

/// The verified caller's certificate fingerprint, on TLS connections.
#[derive(Clone)]
struct CallerFingerprint(String);

struct Gateway {
    discovery: Arc<discovery::Discovery>,
    /// "http" or "https", towards the replicas.
    scheme: &'static str,
    /// SLAP (HTTP/1.1) and the native API (HTTP/2) towards the replicas.
    http1: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    http2: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    hold: Duration,
    attempt: Duration,
    counters: Counters,
    /// Body limits: a call's, a document's.
    body_bytes: usize,
    document_bytes: usize,
    /// Each caller's rate (`None`: no limit).
    rate: Option<slap_proto::rate::RateLimiter>,
    /// Polls answered here (`None`: `--edge-staleness-ms 0`).
    edge: Option<Arc<edge::Edge>>,
}

/// How long one attempt of this call may take: `attempt`, plus the hold a
/// long poll asks for (a held poll is not a slow replica).
fn attempt_bound(attempt: Duration, headers: &HeaderMap) -> Duration {
    use slap_proto::limits::{poll_hold, POLL_HOLD_HEADER};
    attempt + poll_hold(headers.get(POLL_HOLD_HEADER).map(|v| v.as_bytes()))
}

/// A gRPC call (the native API), by its content type.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/grpc"))
}

/// A gRPC answer that says the replica cannot serve now (UNAVAILABLE, in a
/// trailers-only response): another replica, or the next leader, may.
fn grpc_unavailable(headers: &HeaderMap) -> bool {
    headers.get("grpc-status").and_then(|v| v.to_str().ok()) == Some("14")
}

impl Gateway {
    /// One attempt on one replica: the response, or why it is not usable.
    async fn try_replica(
        &self,
        replica: &str,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &Bytes,
        caller: Option<&str>,
    ) -> Result<Response, String> {
        let target = format!(
            "{}://{}{}",
            self.scheme,
            replica,
            uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
        );
        let grpc = is_grpc(headers);
        let mut req = hyper::Request::builder().method(method.clone()).uri(&target);
        for (name, value) in headers {
            if !HOP_BY_HOP.contains(&name.as_str()) {
                req = req.header(name, value);
            }
        }
        if let Some(fp) = caller {
            req = req.header(tls::CALLER_HEADER, fp);
        }
        let req = req.body(Full::new(body.clone())).map_err(|e| e.to_string())?;
        let client = if grpc { &self.http2 } else { &self.http1 };
        let resp = tokio::time::timeout(attempt_bound(self.attempt, headers), client.request(req))
            .await
            .map_err(|_| format!("{replica} did not answer in time"))?
            .map_err(|e| format!("{replica}: {e}"))?;
        if resp.status() == StatusCode::SERVICE_UNAVAILABLE || (grpc && grpc_unavailable(resp.headers())) {
            return Err(format!("{replica} cannot commit now (no leader or no quorum)"));
        }
        // Usable: stream the body through rather than buffering it (a
        // computer document can be hundreds of kilobytes).
        let (parts, body) = resp.into_parts();
        Ok(Response::from_parts(parts, Body::new(body)))
    }

    /// Forwards a call to the replicas, the leader first; `spread`: start
    /// with the next replica in turn instead (a read any replica may serve).
    async fn forward(
        &self,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
        caller: Option<&str>,
        spread: bool,
    ) -> Response {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + self.hold;
        let mut delay = Duration::from_millis(20);
        let mut last_error = String::new();
        loop {
            let mut order = self.discovery.order();
            if spread && !order.is_empty() {
                let turn = self.counters.spread.fetch_add(1, Ordering::Relaxed) as usize % order.len();
                order.rotate_left(turn);
            }
            for replica in order {
                match self.try_replica(&replica, &method, &uri, &headers, &body, caller).await {
                    Ok(resp) => return resp,
                    Err(e) => {
                        tracing::debug!("{e}; trying the next replica");
                        self.counters.retries.fetch_add(1, Ordering::Relaxed);
                        self.discovery.stale.notify_one();
                        last_error = e;
                    }
                }
            }
            if Instant::now() + delay >= deadline {
                break;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%uri, "no replica answered within {:?}: {last_error}", self.hold);
        let message = format!(
            "no Master replica answered within {} s (last: {last_error})",
            self.hold.as_secs()
        );
        if is_grpc(&headers) {
            // A gRPC client reads the status from the headers, not the HTTP code.
            let mut resp = Response::new(Body::empty());
            let h = resp.headers_mut();
            h.insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from_static("14"));
            if let Ok(m) = HeaderValue::from_str(&message.replace(['\r', '\n'], " ")) {
                h.insert("grpc-message", m);
            }
            return resp;
        }
        (StatusCode::SERVICE_UNAVAILABLE, message).into_response()
    }
}

fn refuse(status: StatusCode, headers: &[(hyper::header::HeaderName, String)], message: String) -> Response {
    let mut resp = (status, message).into_response();
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            resp.headers_mut().insert(name.clone(), v);
        }
    }
    resp
}

async fn forward(
    State(gw): State<Arc<Gateway>>,
    caller: Option<axum::Extension<CallerFingerprint>>,
    req: Request,
) -> Response {
    let peer_ip = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|p| p.0.ip().to_string());
    let who = match (&caller, &peer_ip) {
        (Some(c), _) => c.0 .0.clone(),
        (None, Some(ip)) => ip.clone(),
        (None, None) => "unknown".into(),
    };
    if let Some(limiter) = &gw.rate {
        if let Err(wait) = limiter.take(&who, Instant::now()) {
            gw.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
            let secs = slap_proto::rate::retry_after_secs(wait);
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                &[(hyper::header::RETRY_AFTER, secs.to_string())],
                format!("too many calls from {who}; retry in {secs} s (the gateway's --rate-limit)"),
            );
        }
    }
    let (mut parts, body) = req.into_parts();
    let (limit, name) = if slap_proto::limits::carries_document(parts.uri.path()) {
        (gw.document_bytes, "document_bytes, the gateway's --max-document-bytes")
    } else {
        (gw.body_bytes, "body_bytes, the gateway's --max-body-bytes")
    };
    let grpc = is_grpc(&parts.headers);
    let too_large = |what: String| {
        gw.counters.too_large.fetch_add(1, Ordering::Relaxed);
        let message = format!("{what}; the limit is {limit} bytes ({name})");
        if grpc {
            // A gRPC client reads the status, not the HTTP code.
            return tonic::Status::resource_exhausted(message).into_http();
        }
        refuse(StatusCode::PAYLOAD_TOO_LARGE, &[], message)
    };
    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(len) = declared.filter(|len| *len > limit) {
        return too_large(format!("the request body is {len} bytes"));
    }
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => return too_large(format!("the request body is over {limit} bytes")),
    };
    // Without TLS, the replica keys its own rate limit by the caller's
    // address, which only the gateway sees.
    if caller.is_none() {
        if let Some(ip) = peer_ip.and_then(|ip| HeaderValue::from_str(&ip).ok()) {
            parts.headers.insert("x-forwarded-for", ip);
        }
    }
    // Only the gateway says what revision a replica must have applied.
    parts.headers.remove(MIN_REVISION_HEADER);
    let caller = caller.as_ref().map(|c| c.0 .0.as_str());
    let poll = gw.edge.as_ref().and_then(|_| computer_poll(&parts.method, &parts.uri));
    if let (Some(edge), Some(computer)) = (&gw.edge, &poll) {
        if let Some(answer) = at_the_edge(edge, caller.unwrap_or(""), computer, &mut parts.headers).await {
            return answer;
        }
    }
    // Boxed: a watch held at the edge above should not carry the room
    // forwarding needs.
    // A poll any replica may answer, if it applied what the feed told of.
    let spread = match (&gw.edge, &poll) {
        (Some(edge), Some(computer)) => match edge.current_revision(computer) {
            Some(revision) => {
                parts.headers.insert(MIN_REVISION_HEADER, HeaderValue::from(revision));
                true
            }
            None => false,
        },
        _ => false,
    };
    let resp = Box::pin(gw.forward(parts.method, parts.uri, parts.headers, body, caller, spread)).await;
    match (&gw.edge, &poll) {
        (Some(edge), Some(computer)) if matches!(resp.status(), StatusCode::OK | StatusCode::NOT_MODIFIED) => {
            edge.authorize(caller.unwrap_or(""), computer);
            keep_document(edge, computer, resp).await
        }
        _ => resp,
    }
}

/// Keeps a replica's answer to a poll (a 200 with its ETag) for the edge
/// to serve while the computer's revision stays, and passes it on.
async fn keep_document(edge: &edge::Edge, computer: &str, resp: Response) -> Response {
    let revision = resp
        .headers()
        .get(hyper::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .and_then(|etag| slap_proto::limits::parse_document_etag(etag, computer));
    let length = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let (Some(revision), Some(length)) = (revision, length) else {
        return resp;
    };
    // Buffered only when kept: a document answered once streams through.
    if resp.status() != StatusCode::OK || !edge.admit(computer, revision, length) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let body = match axum::body::to_bytes(body, length).await {
        Ok(body) => body,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("the replica's answer broke off: {e}")).into_response(),
    };
    edge.keep(
        computer,
        edge::Document {
            revision,
            content_type: parts.headers.get(hyper::header::CONTENT_TYPE).cloned(),
            body: body.clone(),
        },
    );
    Response::from_parts(parts, Body::from(body))
}

/// The computer a node's document poll (`getFullComputerInformation`) is for.
fn computer_poll(method: &Method, uri: &Uri) -> Option<String> {
    if method != Method::GET || uri.path() != "/getFullComputerInformation" {
        return None;
    }
    let fields = slap_proto::form::parse(uri.query().unwrap_or("")).ok()?;
    slap_proto::form::get(&fields, "computer_id").map(str::to_string)
}

/// Answers a poll here when the edge can (a 304, at once or after holding
/// the watch); `None` forwards it, with `headers` adjusted to what remains
/// of its hold if the feed was lost while holding.
async fn at_the_edge(edge: &edge::Edge, caller: &str, computer: &str, headers: &mut HeaderMap) -> Option<Response> {
    use slap_proto::limits::{poll_hold, POLL_HOLD_HEADER};
    let etag = headers.get(hyper::header::IF_NONE_MATCH).and_then(|v| v.to_str().ok());
    if let Some(unchanged) = etag.and_then(|etag| edge.unchanged(caller, computer, etag)) {
        let hold = poll_hold(headers.get(POLL_HOLD_HEADER).map(|v| v.as_bytes()));
        let end = if hold.is_zero() {
            edge::HoldEnd::Unchanged
        } else {
            edge.hold(&unchanged, hold).await
        };
        match end {
            edge::HoldEnd::Unchanged => {
                edge.counters.not_modified.fetch_add(1, Ordering::Relaxed);
                let mut resp = StatusCode::NOT_MODIFIED.into_response();
                if let Ok(tag) = HeaderValue::from_str(&document_etag(computer, unchanged.revision)) {
                    resp.headers_mut().insert(hyper::header::ETAG, tag);
                }
                return Some(resp);
            }
            // Served below if the new document is kept, else forwarded.
            edge::HoldEnd::Moved => {}
            edge::HoldEnd::FeedLost(left) => {
                headers.insert(POLL_HOLD_HEADER, HeaderValue::from(left.as_secs()));
                return None;
            }
        }
    }
    let document = edge.document(caller, computer)?;
    let mut resp = Response::new(Body::from(document.body));
    let h = resp.headers_mut();
    if let Some(content_type) = document.content_type {
        h.insert(hyper::header::CONTENT_TYPE, content_type);
    }
    if let Ok(tag) = HeaderValue::from_str(&document_etag(computer, document.revision)) {
        h.insert(hyper::header::ETAG, tag);
    }
    Some(resp)
}

async fn healthz(State(gw): State<Arc<Gateway>>) -> Response {
    for replica in gw.discovery.order() {
        let uri: Uri = "/getHateoasUrl".parse().expect("static URI");
        if gw
            .try_replica(&replica, &Method::GET, &uri, &HeaderMap::new(), &Bytes::new(), None)
            .await
            .is_ok()
        {
            return (StatusCode::OK, "ok\n").into_response();
        }
    }
    (StatusCode::SERVICE_UNAVAILABLE, "no replica answers\n").into_response()
}

/// Ready to forward: a leader is known (so writes go straight to it).
/// `/healthz` says a replica answers; this says the cluster has a leader.
async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    match gw.discovery.leader() {
        Some(l) => (StatusCode::OK, format!("leader {l}\n")).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no leader known\n").into_response(),
    }
}

fn edge_count(gw: &Gateway, read: impl Fn(&edge::Edge) -> u64) -> u64 {
    gw.edge.as_deref().map(read).unwrap_or(0)
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let c = &gw.counters;
    let body = format!(
        "# HELP slap_gateway_calls_total SLAP calls received.\n# TYPE slap_gateway_calls_total counter\nslap_gateway_calls_total {}\n\
         # HELP slap_gateway_retries_total Attempts moved to another replica.\n# TYPE slap_gateway_retries_total counter\nslap_gateway_retries_total {}\n\
         # HELP slap_gateway_failures_total Calls answered 503 after --hold.\n# TYPE slap_gateway_failures_total counter\nslap_gateway_failures_total {}\n\
         # HELP slap_gateway_rejected_total Calls refused before forwarding: over a body limit (too_large) or the caller's rate (rate_limited).\n# TYPE slap_gateway_rejected_total counter\nslap_gateway_rejected_total{{reason=\"too_large\"}} {}\nslap_gateway_rejected_total{{reason=\"rate_limited\"}} {}\n\
         # HELP slap_gateway_spread_total Polls sent to the replicas in turn (any replica that applied the revision the feed told of may answer).\n# TYPE slap_gateway_spread_total counter\nslap_gateway_spread_total {}\n\
         # HELP slap_gateway_replicas Replicas known (seeds and learned).\n# TYPE slap_gateway_replicas gauge\nslap_gateway_replicas {}\n\
         # HELP slap_gateway_leader_known Whether the leader is known.\n# TYPE slap_gateway_leader_known gauge\nslap_gateway_leader_known {}\n\
         # HELP slap_gateway_edge_not_modified_total Polls answered 304 by the gateway itself.\n# TYPE slap_gateway_edge_not_modified_total counter\nslap_gateway_edge_not_modified_total {}\n\
         # HELP slap_gateway_edge_documents_served_total Polls answered 200 by the gateway itself, from its document cache.\n# TYPE slap_gateway_edge_documents_served_total counter\nslap_gateway_edge_documents_served_total {}\n\
         # HELP slap_gateway_edge_holding Watches held by the gateway itself now.\n# TYPE slap_gateway_edge_holding gauge\nslap_gateway_edge_holding {}\n\
         # HELP slap_gateway_edge_feed_live Whether the leader's revision feed is live (polls answered here).\n# TYPE slap_gateway_edge_feed_live gauge\nslap_gateway_edge_feed_live {}\n\
         # HELP slap_gateway_edge_feed_losses_total Times the revision feed was lost.\n# TYPE slap_gateway_edge_feed_losses_total counter\nslap_gateway_edge_feed_losses_total {}\n",
        c.calls.load(Ordering::Relaxed),
        c.retries.load(Ordering::Relaxed),
        c.failures.load(Ordering::Relaxed),
        c.too_large.load(Ordering::Relaxed),
        c.rate_limited.load(Ordering::Relaxed),
        c.spread.load(Ordering::Relaxed),
        gw.discovery.order().len(),
        u8::from(gw.discovery.leader().is_some()),
        edge_count(&gw, |e| e.counters.not_modified.load(Ordering::Relaxed)),
        edge_count(&gw, |e| e.counters.documents_served.load(Ordering::Relaxed)),
        edge_count(&gw, |e| e.counters.holding.load(Ordering::Relaxed)),
        edge_count(&gw, |e| u64::from(e.live())),
        edge_count(&gw, |e| e.counters.feed_losses.load(Ordering::Relaxed)),
    );
    let mut resp = body.into_response();
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let tls = args
        .tls_dir
        .as_deref()
        .map(tls::TlsFiles::load)
        .transpose()?
        .map(Arc::new);
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_millis(500)));
    http.enforce_http(false);
    let client_tls = match &tls {
        Some(files) => files.client_config()?,
        None => rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    };
    let connector1 = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls.clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http.clone());
    let connector2 = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(client_tls)
        .https_or_http()
        .enable_http2()
        .wrap_connector(http);
    let connect: discovery::Connect = match &tls {
        Some(files) => {
            let config = files.native_client_config()?;
            Box::new(move |addr| slap_proto::tls::channel(addr, config.clone()).ok())
        }
        None => Box::new(|addr| {
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .ok()
                .map(|e| e.connect_timeout(Duration::from_millis(500)).connect_lazy())
        }),
    };
    let discovery = discovery::Discovery::new(args.replicas.clone(), connect);
    tokio::spawn(discovery.clone().run());
    if let Some(files) = &tls {
        tokio::spawn(renewal::keep_current(files.clone(), discovery.clone()));
    }
    let gw = Arc::new(Gateway {
        discovery,
        scheme: if tls.is_some() { "https" } else { "http" },
        // Idle upstream connections kept, and their read buffers, bounded:
        // a burst of polls opens one connection per poll in flight, and
        // each kept its buffer grown to a whole document (hundreds of KB).
        http1: Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(UPSTREAM_IDLE_PER_REPLICA)
            .http1_max_buf_size(UPSTREAM_READ_BUFFER_BYTES)
            .build(connector1),
        http2: Client::builder(TokioExecutor::new()).http2_only(true).build(connector2),
        hold: Duration::from_secs(args.hold),
        attempt: Duration::from_secs(args.attempt),
        counters: Counters::default(),
        body_bytes: args.max_body_bytes as usize,
        document_bytes: args.max_document_bytes as usize,
        rate: slap_proto::rate::RateLimiter::new(args.rate_limit, args.rate_burst),
        edge: (args.edge_staleness_ms > 0)
            .then(|| edge::Edge::new(Duration::from_millis(args.edge_staleness_ms), args.edge_cache_mib << 20)),
    });
    if let Some(edge) = &gw.edge {
        tokio::spawn(edge.clone().follow(gw.discovery.clone()));
    }
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(forward)
        .with_state(gw);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let acceptor = match tls {
        Some(files) => {
            tracing::info!(listen = %args.listen, replicas = ?args.replicas, "slap-gateway serving HTTPS (client certificates required)");
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(files.server_config()?)))
        }
        None => {
            tracing::warn!(listen = %args.listen, replicas = ?args.replicas,
                "slap-gateway serving plain HTTP (no --tls-dir): callers are not authenticated");
            None
        }
    };
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    // Out of file descriptors, for one: let some close.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        serve_connection(tcp, peer, acceptor.clone(), app.clone());
    }
}

/// Serves one caller's connection: HTTP/1.1 (SLAP) or HTTP/2 (the native
/// API), over TLS with a client certificate when `tls` is set. Plain and
/// TLS connections are separate tasks: a task's future is as large as its
/// largest state, and a plain connection (held for minutes by a node's
/// watch, ten thousand at once) should not carry a TLS session's room.
fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
) {
    let _ = tcp.set_nodelay(true);
    match tls {
        None => {
            tokio::spawn(serve_http(tcp, peer, caller_service(app, peer, None)));
        }
        Some(acceptor) => {
            tokio::spawn(async move {
                if let Some((tls, caller)) = handshake(acceptor, tcp, peer).await {
                    serve_http(tls, peer, caller_service(app, peer, Some(caller))).await;
                }
            });
        }
    }
}

async fn serve_http<I, S>(io: I, peer: std::net::SocketAddr, service: S)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<hyper::Request<hyper::body::Incoming>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // hyper's smallest read buffer (request heads up to 8 KiB, as nginx's
    // default; larger ones get 431). Its default grows a buffer of 16 KiB
    // per connection, most of a held watch's cost: 10,000 watches took
    // 221 MiB, 189 MiB with this (docs/benchmarks.md).
    builder.http1().max_buf_size(READ_BUFFER_BYTES);
    if let Err(e) = builder
        .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), service)
        .await
    {
        tracing::debug!(%peer, error = %e, "connection ended");
    }
}

/// The TLS handshake of a caller, and the certificate it presented.
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) -> Option<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    CallerFingerprint,
)> {
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake refused");
            return None;
        }
        Err(_) => return None,
    };
    let fp = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| tls::fingerprint(c))?;
    Some((tls, CallerFingerprint(fp)))
}

/// The app, with each request told who calls (the peer's address and,
/// over TLS, the certificate). Per request rather than a layered router per
/// connection: a layered router costs kilobytes, and a gateway holds tens
/// of thousands of connections.
fn caller_service(
    app: Router,
    peer: std::net::SocketAddr,
    caller: Option<CallerFingerprint>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<Response, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
        if let Some(c) = &caller {
            req.extensions_mut().insert(c.clone());
        }
        tower::ServiceExt::oneshot(app.clone(), req.map(Body::new))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_poll_may_take_its_hold_on_top_of_the_attempt() {
        let attempt = Duration::from_secs(10);
        let mut headers = HeaderMap::new();
        assert_eq!(attempt_bound(attempt, &headers), attempt);
        headers.insert("x-slap-wait", HeaderValue::from_static("20"));
        assert_eq!(attempt_bound(attempt, &headers), Duration::from_secs(30));
        headers.insert("x-slap-wait", HeaderValue::from_static("3600"));
        assert_eq!(
            attempt_bound(attempt, &headers),
            attempt + Duration::from_secs(slap_proto::limits::POLL_HOLD_SECS),
            "capped as the replica caps it"
        );
        headers.insert("x-slap-wait", HeaderValue::from_static("soon"));
        assert_eq!(attempt_bound(attempt, &headers), attempt);
    }
}
