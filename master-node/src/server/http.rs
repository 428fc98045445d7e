//! The HTTP app of a replica's SLAP port: SLAP's classic calls and HATEOAS
//! (`slap`), the dashboard, and the native API (gRPC over HTTP/2 on the same
//! port), with around them, outermost first: the call counters, the body
//! limits (before anything reads a body), the authorization check. Served
//! over HTTPS by [`super::https`], or over plain HTTP in development.
//!
//! Part of the process assembly.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::BodyExt;

use slap_proto::rate::{retry_after_secs, RateLimiter};

use crate::authz::{effective_role, Caller};
use crate::replica::Replica;
use crate::state::limits::Limits;

/// Largest native API message: its calls carry at most a computer's
/// document, bounded by the cluster's `document_bytes` (checked again on
/// each call); this only keeps one message from being read into memory
/// whole when it is far larger.
const NATIVE_MESSAGE_LIMIT: usize = 64 << 20;

/// The body limit that applies to a call, and its name: a document (a
/// computer's format, a usage journal, a native call) `document_bytes`,
/// every other call `body_bytes`.
fn body_limit(limits: &Limits, path: &str) -> (usize, &'static str) {
    if slap_proto::limits::carries_document(path) {
        (limits.document_bytes as usize, "document_bytes")
    } else {
        (limits.body_bytes as usize, "body_bytes")
    }
}

fn too_large(what: String, limit: usize, name: &str) -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{what}; the cluster's limit is {limit} bytes ({name}; see `master-node limits`)"),
    )
        .into_response()
}

/// Refuses a body over the cluster's limit before anything reads it: at
/// once when `Content-Length` says so, else as soon as the body grows past
/// it (413, naming the limit). A SLAP body is read here, whole, once; a
/// native API stream is only capped.
async fn limit_body(State(replica): State<Arc<Replica>>, req: Request, next: Next) -> Response {
    let (limit, name) = {
        let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
        body_limit(&state.limits, req.uri().path())
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(len) = declared.filter(|len| *len > limit) {
        replica.metrics.rejected("too_large");
        let grpc = req
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if grpc {
            return tonic::Status::resource_exhausted(format!(
                "the request is {len} bytes; the cluster's limit is {limit} bytes ({name})"
            ))
            .into_http();
        }
        return too_large(format!("the request body is {len} bytes"), limit, name);
    }
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, limit);
    if parts.uri.path().starts_with("/slapos.master.v1.Master/") {
        // A native call is a gRPC stream: the cap trips while tonic reads
        // it, and tonic answers the status found in the body's error.
        let capped = limited.map_err(move |e| -> axum::BoxError {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                Box::new(tonic::Status::resource_exhausted(format!(
                    "the request is over the cluster's limit of {limit} bytes ({name}; see `master-node limits`)"
                )))
            } else {
                e
            }
        });
        return next.run(Request::from_parts(parts, Body::new(capped))).await;
    }
    match limited.collect().await {
        Ok(bytes) => next.run(Request::from_parts(parts, Body::from(bytes.to_bytes()))).await,
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            replica.metrics.rejected("too_large");
            too_large(format!("the request body is over {limit} bytes"), limit, name)
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("unreadable request body: {e}")).into_response(),
    }
}

/// Who a call counts against for rate limiting: the verified caller (the
/// one a gateway names, when it comes through one), else, without TLS,
/// the address it comes from (the first hop a proxy names).
fn caller_of(replica: &Replica, req: &Request) -> String {
    if let Some(Caller(role)) = req.extensions().get::<Caller>() {
        return effective_role(replica, role.clone(), req.headers())
            .unwrap_or_else(|_| role.clone())
            .to_string();
    }
    let forwarded = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|v| v.trim().to_string());
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    forwarded.or(peer).unwrap_or_else(|| "unknown".into())
}

/// Refuses a caller over its rate: 429 with `Retry-After`, before the body
/// is read. Every other caller is unaffected.
async fn limit_rate(
    State((replica, limiter)): State<(Arc<Replica>, Arc<RateLimiter>)>,
    req: Request,
    next: Next,
) -> Response {
    let caller = caller_of(&replica, &req);
    match limiter.take(&caller, std::time::Instant::now()) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            replica.metrics.rejected("rate_limited");
            let secs = retry_after_secs(wait);
            (
                StatusCode::TOO_MANY_REQUESTS,
                [
                    (header::RETRY_AFTER, secs.to_string()),
                    (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_string()),
                ],
                format!("too many calls from {caller}; retry in {secs} s (see --rate-limit)"),
            )
                .into_response()
        }
    }
}

/// The whole app of the SLAP port; with `rate`, each caller is held to it.
pub fn app(replica: Arc<Replica>, rate: Option<Arc<RateLimiter>>) -> Router {
    let app = Router::new()
        .merge(crate::slap::router(replica.clone()))
        .merge(crate::dashboard::router::<Arc<Replica>>().with_state(replica.clone()))
        .layer(axum::middleware::from_fn_with_state(
            replica.clone(),
            crate::authz::authorize,
        ))
        // Bodies were bounded by `limit_body` already.
        .layer(axum::extract::DefaultBodyLimit::disable())
        // The native API (HTTP/2), checked by its own handlers against the
        // same table: the SLAP middleware above is for form bodies.
        .route_service(
            "/slapos.master.v1.Master/{*method}",
            slap_proto::master::master_server::MasterServer::new(crate::native::MasterService::new(replica.clone()))
                .max_decoding_message_size(NATIVE_MESSAGE_LIMIT),
        )
        .layer(axum::middleware::from_fn_with_state(replica.clone(), limit_body));
    let app = match rate {
        Some(limiter) => app.layer(axum::middleware::from_fn_with_state(
            (replica.clone(), limiter),
            limit_rate,
        )),
        None => app,
    };
    // Outermost: every call, SLAP or native, allowed or not, is counted.
    app.layer(axum::middleware::from_fn_with_state(
        replica,
        crate::metrics::observe_slap,
    ))
}
