//! The frontend's counters, served as Prometheus text on the admin
//! listener (`/metrics`).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hyper::StatusCode;

use crate::route::RouteTable;

/// Counters shared by every connection; cheap to clone.
#[derive(Clone, Default)]
pub struct Metrics(Arc<Inner>);

#[derive(Default)]
pub struct Inner {
    /// Responses by status class (1xx … 5xx).
    responses: [AtomicU64; 5],
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    pub upstream_in_flight: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub upgraded: AtomicU64,
    pub reloads: AtomicU64,
    pub routes_served: AtomicU64,
    pub routes_refused: AtomicU64,
}

impl std::ops::Deref for Metrics {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Metrics {
    pub fn count_response(&self, status: StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Everything, in the Prometheus text format, with the request count
    /// of every route of `routes`.
    pub fn render(&self, routes: &RouteTable) -> String {
        let mut out = String::new();
        let g = |o: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let _ = writeln!(
            out,
            "# HELP frontend_responses_total Responses sent, by status class.\n# TYPE frontend_responses_total counter"
        );
        for (i, n) in self.responses.iter().enumerate() {
            let _ = writeln!(
                out,
                "frontend_responses_total{{class=\"{}xx\"}} {}",
                i + 1,
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP frontend_route_requests_total Requests matched to each route.\n# TYPE frontend_route_requests_total counter");
        for (r, n) in routes.counters() {
            let _ = writeln!(
                out,
                "frontend_route_requests_total{{route=\"{r}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        g(
            &mut out,
            "frontend_connections_open",
            "gauge",
            "Client connections open.",
            l(&self.connections_open),
        );
        g(
            &mut out,
            "frontend_connections_total",
            "counter",
            "Client connections accepted.",
            l(&self.connections_total),
        );
        g(
            &mut out,
            "frontend_tls_handshake_failures_total",
            "counter",
            "TLS handshakes that failed.",
            l(&self.tls_handshake_failures),
        );
        g(
            &mut out,
            "frontend_upstream_in_flight",
            "gauge",
            "Requests waiting for a backend.",
            l(&self.upstream_in_flight),
        );
        g(
            &mut out,
            "frontend_upstream_errors_total",
            "counter",
            "Requests whose backend could not be reached.",
            l(&self.upstream_errors),
        );
        g(
            &mut out,
            "frontend_upgrades_total",
            "counter",
            "Connections upgraded (WebSocket).",
            l(&self.upgraded),
        );
        g(
            &mut out,
            "frontend_reloads_total",
            "counter",
            "Route reloads.",
            l(&self.reloads),
        );
        g(
            &mut out,
            "frontend_routes",
            "gauge",
            "Shared instances served.",
            l(&self.routes_served),
        );
        g(
            &mut out,
            "frontend_routes_refused",
            "gauge",
            "Shared instances refused (see their published error).",
            l(&self.routes_refused),
        );
        out
    }
}
