//! `/metrics` (Prometheus text format) and `/healthz` of a running agent,
//! served with `nodeagent run --metrics-listen ADDR`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};

use crate::master::ComputerPlan;
use crate::supervisor::Supervisor;

/// One metric family: name, help, type, and (labels, value) samples.
type Family<'a> = (&'a str, &'a str, &'a str, Vec<(String, String)>);

/// What the loops report.
#[derive(Default)]
pub struct Metrics {
    /// 1 when the last poll of the Master succeeded.
    pub master_reachable: AtomicU64,
    pub plan_updates: AtomicU64,
    pub instance_runs: AtomicU64,
    /// Duration of the last instance run, in microseconds.
    pub instance_run_us: AtomicU64,
    /// Partitions that failed in the last instance run.
    pub partitions_failed: AtomicU64,
    pub software_installed: AtomicU64,
    pub software_failed: AtomicU64,
    /// Partitions by what the Master asks of them, from the last plan.
    requested: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    /// Counts the plan's partitions by requested state (free ones as "free").
    pub fn observe_plan(&self, plan: &ComputerPlan) {
        let mut by_state = BTreeMap::new();
        for p in &plan.partitions {
            let state = p
                .instance
                .as_ref()
                .map(|i| i.requested_state.clone())
                .unwrap_or_else(|| "free".into());
            *by_state.entry(state).or_insert(0) += 1;
        }
        *self.requested.lock().unwrap_or_else(|e| e.into_inner()) = by_state;
        self.plan_updates.fetch_add(1, Ordering::Relaxed);
    }

    /// The text exposition.
    pub async fn render(&self, supervisor: &Supervisor) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let one = |v: String| vec![(String::new(), v)];
        let requested = self
            .requested
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(s, n)| (format!("{{requested=\"{s}\"}}"), n.to_string()))
            .collect();
        let processes = supervisor.status().await;
        let running = processes.iter().filter(|p| p.pid.is_some()).count();
        let restarts: u64 = processes.iter().map(|p| u64::from(p.restarts)).sum();
        let run_seconds = self.instance_run_us.load(Ordering::Relaxed) as f64 / 1e6;
        let families: Vec<Family> = vec![
            (
                "nodeagent_master_reachable",
                "1 when the last poll of the Master succeeded.",
                "gauge",
                one(get(&self.master_reachable)),
            ),
            (
                "nodeagent_plan_updates_total",
                "Computer documents received that changed.",
                "counter",
                one(get(&self.plan_updates)),
            ),
            (
                "nodeagent_partitions",
                "Partitions by the state the Master requests (free: no instance).",
                "gauge",
                requested,
            ),
            (
                "nodeagent_partitions_failed",
                "Partitions that failed in the last instance run.",
                "gauge",
                one(get(&self.partitions_failed)),
            ),
            (
                "nodeagent_instance_runs_total",
                "Instance runs.",
                "counter",
                one(get(&self.instance_runs)),
            ),
            (
                "nodeagent_instance_run_seconds",
                "Duration of the last instance run.",
                "gauge",
                one(run_seconds.to_string()),
            ),
            (
                "nodeagent_software_installed_total",
                "Software releases installed.",
                "counter",
                one(get(&self.software_installed)),
            ),
            (
                "nodeagent_software_failed_total",
                "Software release installs that failed.",
                "counter",
                one(get(&self.software_failed)),
            ),
            (
                "nodeagent_processes",
                "Supervised processes, running or waiting to restart.",
                "gauge",
                vec![
                    ("{state=\"running\"}".into(), running.to_string()),
                    ("{state=\"waiting\"}".into(), (processes.len() - running).to_string()),
                ],
            ),
            (
                "nodeagent_process_restarts_total",
                "Restarts of supervised processes since the agent started.",
                "counter",
                one(restarts.to_string()),
            ),
        ];
        let mut out = String::new();
        for (name, help, kind, lines) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in lines {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        }
        out
    }
}

/// Serves `/metrics`, `/healthz` (the agent runs) and `/readyz` (it reached
/// the Master at its last poll) on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, supervisor: Arc<Supervisor>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, supervisor) = (metrics.clone(), supervisor.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (metrics, supervisor) = (metrics.clone(), supervisor.clone());
                async move {
                    let (status, ctype, body) = match req.uri().path() {
                        "/metrics" => (200, "text/plain; version=0.0.4", metrics.render(&supervisor).await),
                        "/healthz" => (200, "text/plain", "ok\n".to_string()),
                        // Ready: the last poll of the Master succeeded, so
                        // the agent acts on a current plan.
                        "/readyz" if metrics.master_reachable.load(std::sync::atomic::Ordering::Relaxed) == 1 => {
                            (200, "text/plain", "ok\n".to_string())
                        }
                        "/readyz" => (503, "text/plain", "the Master is not reachable\n".to_string()),
                        _ => (
                            404,
                            "text/plain",
                            "not found: /metrics, /healthz or /readyz\n".to_string(),
                        ),
                    };
                    Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        });
    }
}
