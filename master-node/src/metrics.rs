//! `/metrics` (Prometheus text format), `/healthz` and `/readyz` of a
//! replica, served on `--http-listen` (plain HTTP, for monitoring on a
//! trusted network; nothing there changes anything).
//!
//! Counters are kept by the SLAP and native API layers as calls complete
//! (in [`crate::counters`], below the replica handle that holds them);
//! gauges (Raft's term and indexes, each follower's lag, the state's
//! computers, partitions and instances) are read when scraped.
//!
//! Must not import the servers that mount it (`server`).

use openraft::rt::WatchReceiver;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use openraft::ServerState;

use crate::counters::BUCKETS;
use crate::replica::Replica;
use crate::state::{RequestedState, SlapState};

fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The text exposition of a replica's metrics.
pub fn render(replica: &Replica) -> String {
    let mut out = String::new();
    let m = replica.raft.metrics().borrow_watched().clone();
    let is_leader = m.state == ServerState::Leader;
    let gauges: [(&str, &str, u64); 6] = [
        ("slapos_raft_term", "Current Raft term.", m.current_term),
        (
            "slapos_raft_last_log_index",
            "Last log index on this replica.",
            m.last_log_index.unwrap_or(0),
        ),
        (
            "slapos_raft_applied_index",
            "Last log index applied to the state.",
            m.last_applied.map(|l| l.index).unwrap_or(0),
        ),
        (
            "slapos_raft_leader_id",
            "The leader this replica knows (0: none).",
            m.current_leader.unwrap_or(0),
        ),
        (
            "slapos_raft_is_leader",
            "1 if this replica leads.",
            u64::from(is_leader),
        ),
        ("slapos_replica_id", "This replica's id.", replica.id),
    ];
    for (name, help, v) in gauges {
        family(&mut out, name, help, "gauge");
        let _ = writeln!(out, "{name} {v}");
    }
    let status = replica.local_status();
    family(
        &mut out,
        "slapos_raft_committed_index",
        "Last log index known committed.",
        "gauge",
    );
    let _ = writeln!(out, "slapos_raft_committed_index {}", status.committed);
    if is_leader {
        family(
            &mut out,
            "slapos_raft_follower_lag",
            "Entries each member is behind the leader's last log index.",
            "gauge",
        );
        for member in &status.members {
            if let Some(lag) = member.lag {
                let _ = writeln!(out, "slapos_raft_follower_lag{{replica=\"{}\"}} {lag}", member.id);
            }
        }
    }
    {
        let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
        family(&mut out, "slapos_computers", "Computers known.", "gauge");
        let _ = writeln!(out, "slapos_computers {}", state.computers.len());
        family(&mut out, "slapos_partitions", "Partitions by state.", "gauge");
        let busy = state.partitions.values().filter(|p| p.state == SlapState::Busy).count();
        let _ = writeln!(out, "slapos_partitions{{state=\"busy\"}} {busy}");
        let _ = writeln!(
            out,
            "slapos_partitions{{state=\"free\"}} {}",
            state.partitions.len() - busy
        );
        family(
            &mut out,
            "slapos_instances",
            "Instances by requested state (pending: not placed yet).",
            "gauge",
        );
        let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
        for i in state.instances.values() {
            let s = match (i.is_placed(), i.requested_state) {
                (false, s) if s != RequestedState::Destroyed => "pending",
                (_, s) => s.as_str(),
            };
            *by_state.entry(s).or_default() += 1;
        }
        for s in ["started", "stopped", "destroyed", "pending"] {
            let _ = writeln!(
                out,
                "slapos_instances{{state=\"{s}\"}} {}",
                by_state.get(s).copied().unwrap_or(0)
            );
        }
        family(
            &mut out,
            "slapos_certificates",
            "Certificates issued, live and revoked.",
            "gauge",
        );
        let revoked = state.certificates.values().filter(|c| c.revoked).count();
        let _ = writeln!(
            out,
            "slapos_certificates{{state=\"live\"}} {}",
            state.certificates.len() - revoked
        );
        let _ = writeln!(out, "slapos_certificates{{state=\"revoked\"}} {revoked}");
        family(
            &mut out,
            "slapos_usage_movements",
            "Accounting movements booked.",
            "gauge",
        );
        let _ = writeln!(out, "slapos_usage_movements {}", state.ledger.movements.len());
    }
    let metrics = &replica.metrics;
    family(
        &mut out,
        "slapos_polls_total",
        "Node polls of their computer document, by answer.",
        "counter",
    );
    for (label, v) in [
        ("document", &metrics.polls_document),
        ("unchanged", &metrics.polls_unchanged),
        ("held", &metrics.polls_held),
    ] {
        let _ = writeln!(
            out,
            "slapos_polls_total{{answer=\"{label}\"}} {}",
            v.load(Ordering::Relaxed)
        );
    }
    family(
        &mut out,
        "slapos_calls_total",
        "SLAP and native API calls by outcome (HTTP status or gRPC code).",
        "counter",
    );
    for ((api, outcome), n) in metrics.outcomes.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = writeln!(
            out,
            "slapos_calls_total{{api=\"{api}\",outcome=\"{}\"}} {n}",
            escape(outcome)
        );
    }
    family(
        &mut out,
        "slapos_calls_rejected_total",
        "Calls refused before any handler: over a size limit (too_large) or over the caller's rate (rate_limited).",
        "counter",
    );
    for reason in ["too_large", "rate_limited"] {
        let n = metrics
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(reason)
            .copied()
            .unwrap_or(0);
        let _ = writeln!(out, "slapos_calls_rejected_total{{reason=\"{reason}\"}} {n}");
    }
    family(
        &mut out,
        "slapos_call_duration_seconds",
        "Latency of SLAP and native API calls by operation.",
        "histogram",
    );
    for ((api, op), h) in metrics.calls.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let labels = format!("api=\"{api}\",operation=\"{}\"", escape(op));
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += h.counts[i];
            let _ = writeln!(
                out,
                "slapos_call_duration_seconds_bucket{{{labels},le=\"{b}\"}} {cumulative}"
            );
        }
        let total = cumulative + h.over;
        let _ = writeln!(
            out,
            "slapos_call_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {total}"
        );
        let _ = writeln!(
            out,
            "slapos_call_duration_seconds_sum{{{labels}}} {}",
            h.sum_us as f64 / 1e6
        );
        let _ = writeln!(out, "slapos_call_duration_seconds_count{{{labels}}} {total}");
    }
    out
}

async fn metrics(State(replica): State<Arc<Replica>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], render(&replica)).into_response()
}

/// 200 while Raft runs on this replica.
async fn healthz(State(replica): State<Arc<Replica>>) -> Response {
    match &replica.raft.metrics().borrow_watched().running_state {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("raft stopped: {e}\n")).into_response(),
    }
}

/// 200 when this replica can serve: it knows a leader and has applied
/// what it knows to be committed (within a few entries).
async fn readyz(State(replica): State<Arc<Replica>>) -> Response {
    let status = replica.local_status();
    if status.leader_id.is_none() {
        return (StatusCode::SERVICE_UNAVAILABLE, "no leader known\n").into_response();
    }
    if status.committed > status.applied + 100 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "catching up: applied {}, committed {}\n",
                status.applied, status.committed
            ),
        )
            .into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

/// The monitoring routes.
pub fn router(replica: Arc<Replica>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(replica)
}

/// Records each SLAP call's path, status and latency.
pub async fn observe_slap(
    State(replica): State<Arc<Replica>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path().to_string();
    let operation = if path.starts_with("/hateoas") {
        "hateoas".to_string()
    } else if path.starts_with("/slapos.master.v1.Master/") {
        return observe_native(replica, req, next).await;
    } else {
        path.trim_start_matches('/').to_string()
    };
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = resp.status();
    if operation == "getFullComputerInformation" || operation == "getComputerInformation" {
        let counter = match status {
            StatusCode::NOT_MODIFIED => &replica.metrics.polls_unchanged,
            _ => &replica.metrics.polls_document,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    replica
        .metrics
        .call("slap", &operation, status.as_str(), start.elapsed());
    resp
}

async fn observe_native(replica: Arc<Replica>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let operation = req
        .uri()
        .path()
        .trim_start_matches("/slapos.master.v1.Master/")
        .to_string();
    let start = std::time::Instant::now();
    let resp = next.run(req).await;
    // A trailers-only answer (an error) has the code in its headers; a
    // streamed or full answer ends with it in trailers, which the metrics
    // do not wait for: those count as OK.
    let code = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(|c| format!("{:?}", tonic::Code::from(c)))
        .unwrap_or_else(|| "Ok".into());
    replica.metrics.call("native", &operation, &code, start.elapsed());
    resp
}
