//! The HTTP app of a replica's SLAP port: SLAP's classic calls and HATEOAS
//! (`slap`), the dashboard, and the native API (gRPC over HTTP/2 on the same
//! port), with the authorization check, the body limit and the call
//! counters around them. Served over HTTPS by [`super::https`], or over
//! plain HTTP in development.
//!
//! Part of the process assembly.

use std::sync::Arc;

use axum::Router;

use crate::replica::Replica;

/// Largest request body: a node with thousands of partitions posts a large
/// computer document (the gateway accepts the same size).
const BODY_LIMIT: usize = 64 << 20;

/// The whole app of the SLAP port.
pub fn app(replica: Arc<Replica>) -> Router {
    Router::new()
        .merge(crate::slap::router(replica.clone()))
        .merge(crate::dashboard::router::<Arc<Replica>>().with_state(replica.clone()))
        .layer(axum::middleware::from_fn_with_state(
            replica.clone(),
            crate::authz::authorize,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        // The native API (HTTP/2), checked by its own handlers against the
        // same table: the SLAP middleware above is for form bodies.
        .route_service(
            "/slapos.master.v1.Master/{*method}",
            slap_proto::master::master_server::MasterServer::new(crate::native::MasterService::new(replica.clone()))
                .max_decoding_message_size(BODY_LIMIT),
        )
        // Outermost: every call, SLAP or native, allowed or not, is counted.
        .layer(axum::middleware::from_fn_with_state(
            replica,
            crate::metrics::observe_slap,
        ))
}
