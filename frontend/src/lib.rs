//! The frontend release's reverse proxy.
//!
//! In SlapOS, partitions have IPv6 addresses, and the world reaches a
//! service through a frontend on IPv4: the user requests a *shared
//! instance* of the frontend release with the backend's URL, the frontend
//! adds a route and publishes the public URL. This crate is that frontend.
//!
//! - [`route`]: what a shared instance asks, checked on its own and against
//!   the others (a domain belongs to its first owner); pure.
//! - [`certs`]: the server certificate per domain (SNI): the user's own,
//!   checked, one from the cluster's CA ([`cluster_ca`]), or, without a
//!   Master to ask, one signed by the frontend's own CA.
//! - [`proxy`]: one request, forwarded with `X-Forwarded-*` set and
//!   hop-by-hop headers dropped, bodies streamed, WebSockets passed.
//! - [`reload`]: the route files the node agent writes, watched and served
//!   without a restart; one result per shared instance.
//! - [`server`]: the HTTP, HTTPS and admin listeners, graceful shutdown.
//! - [`metrics`], [`access_log`]: what it did.
//!
//! Built on hyper and rustls rather than pingora: see docs/frontend.md for
//! why.

pub mod access_log;
pub mod certs;
pub mod cluster_ca;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod server;
