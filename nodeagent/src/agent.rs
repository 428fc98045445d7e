//! `nodeagent run`: the daemon's loops. [`run`] formats the partitions and
//! re-adopts running processes, then runs each step below as its own loop
//! (a method of `Agent`, which holds what they share):
//!
//! - **capacity**: format (idempotent) and report the computer to the Master
//!   at start and every 24 hours; retried with backoff until it lands.
//! - **watch**: a long poll of the computer's document (ETag + `X-Slap-Wait`):
//!   the Master answers as soon as the document changes, so a node reacts
//!   within a second; a new document wakes the software and instance loops.
//! - **software** (default every 5 min, and on change): install and remove.
//! - **instance** (default every 5 min, and on change): reconfigure changed
//!   partitions; partitions that failed are retried after 30 s.
//! - **promises** (default every minute): health of started partitions.
//! - **usage** (default daily): TioXML through `useComputer`.
//! - **supervisor**: reaps, restarts with backoff, rotates logs (every 500 ms).
//!
//! When the Master is unreachable every loop logs, backs off and tries again;
//! everything running keeps running, and nothing is destroyed because a poll
//! failed (only an explicit `destroyed` state from the Master destroys).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Mutex};
use tracing::{info, warn};

use crate::config::NodeConfig;
use crate::format;
use crate::instance::{Instances, Outcome};
use crate::master::{ComputerPlan, MasterClient, MasterError};
use crate::software;
use crate::supervisor::Supervisor;
use crate::usage;

/// How often each loop runs.
#[derive(Debug, Clone)]
pub struct Intervals {
    pub software: Duration,
    pub instance: Duration,
    pub promise: Duration,
    pub usage: Duration,
    pub capacity: Duration,
    /// How long the Master may hold a watch poll.
    pub watch_hold: Duration,
}

impl Default for Intervals {
    fn default() -> Self {
        Intervals {
            software: Duration::from_secs(300),
            instance: Duration::from_secs(300),
            promise: Duration::from_secs(60),
            usage: Duration::from_secs(86400),
            capacity: Duration::from_secs(86400),
            watch_hold: Duration::from_secs(8),
        }
    }
}

/// Reports the computer's capacity (`loadComputerConfigurationFromXML`).
pub async fn report_capacity(
    cfg: &NodeConfig,
    master: &MasterClient,
    resources: &[crate::config::PartitionResource],
) -> Result<(), MasterError> {
    let dict = format::computer_dict(cfg, resources);
    let xml = slap_proto::marshal::dumps(&dict).map_err(|e| MasterError::Invalid(e.to_string()))?;
    master
        .post("loadComputerConfigurationFromXML", &[("xml", &xml)])
        .await?;
    Ok(())
}

/// Posts the usage of every partition holding an instance.
pub async fn report_usage(instances: &Instances, plan: &ComputerPlan) -> Result<usize, MasterError> {
    let busy: std::collections::HashSet<&str> = plan
        .partitions
        .iter()
        .filter(|p| p.instance.is_some())
        .map(|p| p.id.as_str())
        .collect();
    let mut usages = Vec::new();
    for r in instances.resources().filter(|r| busy.contains(r.id.as_str())) {
        let pids = instances.supervisor.pids(&r.id).await;
        usages.push(usage::measure(r, &pids, instances.supervisor.cgroups()));
    }
    if usages.is_empty() {
        return Ok(0);
    }
    let now = now_utc();
    let xml = usage::journal(&instances.cfg.computer_id, &now, &usages);
    instances
        .master
        .post(
            "useComputer",
            &[
                ("computer_id", instances.cfg.computer_id.as_str()),
                ("use_string", &xml),
            ],
        )
        .await?;
    Ok(usages.len())
}

/// `YYYY-MM-DD at HH:MM:SS` in UTC, as slapgrid formats `stop_date`.
fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} at {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The accounting cgroups the agent uses: only as root (privileged mode).
pub fn cgroups_for(cfg: &NodeConfig) -> crate::cgroups::Cgroups {
    if cfg.mode() == crate::config::Mode::Privileged {
        let root = cfg.instance_root.to_string_lossy();
        crate::cgroups::Cgroups::detect(&format!("nodeagent-{}", &crate::config::software_key(&root)[..8]))
    } else {
        crate::cgroups::Cgroups::None
    }
}

/// What the agent's steps share.
struct Agent {
    cfg: NodeConfig,
    master: Arc<MasterClient>,
    intervals: Intervals,
    metrics: Arc<crate::metrics::Metrics>,
    supervisor: Arc<Supervisor>,
    instances: Arc<Mutex<Instances>>,
    /// The computer's latest document, shared, not copied (a 300-partition
    /// plan is a few megabytes); `None` until the first poll answers.
    plans: watch::Receiver<Option<Arc<ComputerPlan>>>,
}

/// Runs the daemon until `shutdown` resolves: formats the partitions,
/// re-adopts running processes, then runs each step of the module's list as
/// its own loop.
pub async fn run(
    cfg: NodeConfig,
    master: Arc<MasterClient>,
    intervals: Intervals,
    stop_on_exit: bool,
    metrics_listen: Option<String>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (report, resources) = format::format(&cfg)?;
    info!(partitions = resources.len(), changed = ?report, "partitions formatted");
    let supervisor = Arc::new(Supervisor::new(cfg.agent_dir().join("run")).with_cgroups(cgroups_for(&cfg)));
    let adopted = supervisor.adopt(&resources).await;
    if adopted > 0 {
        info!(adopted, "processes from a previous agent re-adopted");
    }
    let instances = Arc::new(Mutex::new(Instances::new(
        cfg.clone(),
        master.clone(),
        supervisor.clone(),
        resources.clone(),
    )));
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let (plan_tx, plans) = watch::channel::<Option<Arc<ComputerPlan>>>(None);
    let agent = Arc::new(Agent {
        cfg,
        master,
        intervals,
        metrics,
        supervisor: supervisor.clone(),
        instances: instances.clone(),
        plans,
    });
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = metrics_listen {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for metrics: {e}"))?;
        info!(%addr, "serving /metrics and /healthz");
        let serve = crate::metrics::serve(listener, agent.metrics.clone(), supervisor.clone());
        tasks.spawn(async move {
            serve.await;
            "metrics"
        });
    }
    tasks.spawn(named("capacity", agent.clone().capacity(resources)));
    tasks.spawn(named("watch", agent.clone().watch(plan_tx)));
    tasks.spawn(named("software", agent.clone().software()));
    tasks.spawn(named("instances", agent.clone().instances()));
    tasks.spawn(named("promises", agent.clone().promises()));
    tasks.spawn(named("usage", agent.clone().usage()));
    tasks.spawn(named("supervisor", agent.clone().supervise()));

    tokio::select! {
        _ = shutdown => info!("shutting down"),
        Some(res) = tasks.join_next() => match res {
            Ok(step) => warn!(step, "a loop ended unexpectedly"),
            Err(e) => warn!(error = %e, "a loop ended unexpectedly"),
        }
    }
    // Wait for an in-flight partition to finish before leaving.
    let mut instances = instances.lock().await;
    tasks.abort_all();
    if stop_on_exit {
        info!("stopping every partition's processes (--stop-on-exit)");
        supervisor.stop_all().await;
        // Nothing runs any more: the next agent must deploy everything again.
        instances.forget_all();
    } else {
        info!("partition processes keep running; the next agent re-adopts them");
    }
    Ok(())
}

/// A step that names itself when it ends (its loop never should).
async fn named(name: &'static str, step: impl std::future::Future<Output = ()>) -> &'static str {
    step.await;
    name
}

impl Agent {
    /// Capacity: reported now and every day, retried with backoff.
    async fn capacity(self: Arc<Self>, resources: Vec<crate::config::PartitionResource>) {
        loop {
            let mut backoff = Duration::from_secs(1);
            loop {
                match report_capacity(&self.cfg, &self.master, &resources).await {
                    Ok(()) => {
                        info!(computer = %self.cfg.computer_id, "capacity reported to the master");
                        break;
                    }
                    Err(e) => {
                        warn!(error = %e, retry_in = ?backoff, "cannot report capacity");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                    }
                }
            }
            tokio::time::sleep(self.intervals.capacity).await;
        }
    }

    /// Watch: long polls of the computer's document; a new one wakes the
    /// software and instance steps.
    async fn watch(self: Arc<Self>, plan_tx: watch::Sender<Option<Arc<ComputerPlan>>>) {
        let mut etag: Option<String> = None;
        let mut backoff = Duration::from_millis(500);
        let computer = &self.cfg.computer_id;
        loop {
            let started = std::time::Instant::now();
            match self
                .master
                .computer_plan(computer, etag.as_deref(), Some(self.intervals.watch_hold))
                .await
            {
                Ok(Some((plan, tag))) => {
                    backoff = Duration::from_millis(500);
                    etag = tag;
                    self.metrics.master_reachable.store(1, Ordering::Relaxed);
                    self.metrics.observe_plan(&plan);
                    plan_tx.send_replace(Some(Arc::new(plan)));
                }
                Ok(None) => {
                    backoff = Duration::from_millis(500);
                    self.metrics.master_reachable.store(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.metrics.master_reachable.store(0, Ordering::Relaxed);
                    warn!(error = %e, retry_in = ?backoff, "cannot read this computer's plan");
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    tokio::time::sleep(backoff).await;
                }
            }
            // A Master that does not hold polls answers at once: poll
            // every second at most rather than spin.
            if started.elapsed() < Duration::from_secs(1) {
                tokio::time::sleep(Duration::from_secs(1) - started.elapsed()).await;
            }
        }
    }

    /// Software: install and remove releases, on every new document and at
    /// least every interval.
    async fn software(self: Arc<Self>) {
        let mut plans = self.plans.clone();
        loop {
            let plan = plans.borrow_and_update().clone();
            if let Some(plan) = plan {
                let run = software::process(&self.cfg, &self.master, &plan).await;
                let m = &self.metrics;
                m.software_installed
                    .fetch_add(run.installed.len() as u64, Ordering::Relaxed);
                m.software_failed.fetch_add(run.failed.len() as u64, Ordering::Relaxed);
                if !run.installed.is_empty() || !run.failed.is_empty() || !run.removed.is_empty() {
                    info!(installed = ?run.installed, failed = run.failed.len(), removed = ?run.removed, "software run");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.intervals.software) => {}
                _ = plans.changed() => {}
            }
        }
    }

    /// Instances: reconfigure the partitions whose timestamp moved, on every
    /// new document and at least every interval; failed ones after 30 s.
    async fn instances(self: Arc<Self>) {
        let mut plans = self.plans.clone();
        let every = self.intervals.instance;
        loop {
            let plan = plans.borrow_and_update().clone();
            let mut retry = false;
            if let Some(plan) = plan {
                let started = std::time::Instant::now();
                let outcomes = self.instances.lock().await.process(&plan.partitions, false).await;
                let failed = outcomes.iter().filter(|(_, o)| matches!(o, Outcome::Failed(_))).count();
                let m = &self.metrics;
                m.instance_runs.fetch_add(1, Ordering::Relaxed);
                m.instance_run_us
                    .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                m.partitions_failed.store(failed as u64, Ordering::Relaxed);
                retry = failed > 0;
                let done: Vec<_> = outcomes
                    .iter()
                    .filter(|(_, o)| !matches!(o, Outcome::Free | Outcome::Unchanged))
                    .collect();
                if !done.is_empty() {
                    info!(partitions = ?done, "instance run");
                }
            }
            let wait = if retry {
                every.min(Duration::from_secs(30))
            } else {
                every
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = plans.changed() => {}
            }
        }
    }

    /// Promises: the health of started partitions, every interval.
    async fn promises(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.intervals.promise).await;
            let plan = self.plans.borrow().clone();
            if let Some(plan) = plan {
                for (partition, result) in self.instances.lock().await.check_promises(&plan.partitions).await {
                    if let Err(e) = result {
                        warn!(%partition, error = %e, "promise failing");
                    }
                }
            }
        }
    }

    /// Usage: TioXML through `useComputer`, every interval.
    async fn usage(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.intervals.usage).await;
            let plan = self.plans.borrow().clone();
            if let Some(plan) = plan {
                match report_usage(&*self.instances.lock().await, &plan).await {
                    Ok(n) => info!(partitions = n, "usage reported"),
                    Err(e) => warn!(error = %e, "cannot report usage"),
                }
            }
        }
    }

    /// Supervisor: reaps, restarts with backoff, rotates logs.
    async fn supervise(self: Arc<Self>) {
        loop {
            self.supervisor.tick().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stop_date_format() {
        let s = super::now_utc();
        assert_eq!(s.len(), "2026-11-25 at 15:02:03".len());
        assert_eq!(&s[10..14], " at ");
        assert!(s.starts_with("20"));
    }
}
