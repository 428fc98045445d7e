//! `chaos fleet`: the fleet simulator. It plays N nodes of P partitions
//! each and M users against a real cluster (3 replicas in network
//! namespaces and a `slap-gateway`, mutual TLS everywhere, one certificate
//! per simulated computer) and measures what the Master costs at that size.
//!
//! Each simulated node does what `nodeagent` does, in-process and without
//! running anything: it registers with a one-time token, formats its
//! computer, holds a watch of its document open, polls the document at
//! start, when the watch says it changed, and every `--poll-every`
//! (jittered, 60 s by default as a real node), reports the software it is
//! given installed, reports each instance placed on it started and
//! publishes its connection parameters once, and posts one usage journal
//! during the run (a day of usage compressed into it). The users request
//! `--instances` instances in closed loops, then re-request some with new
//! parameters, request shared instances and destroy others while the nodes
//! keep polling.
//!
//! Then, while the fleet still polls, it kills a follower and restarts it,
//! and has a fourth replica join, timing both until they have caught up
//! ([`recovery`]). Once everything is quiet it checks that every replica
//! holds the same state and that every answer a user was given is in it
//! ([`acked`]).
//!
//! It prints, and writes to `fleet.json` in `--out`: the time of each phase,
//! allocations per second, poll latency (p50, p99, max) by document size,
//! every error (a run with any error fails), peak RSS and CPU seconds of
//! each replica and of the gateway, the size of each replica's data
//! directory and of the largest snapshot, the restart and join times, and
//! the writes found lost (a run with any fails). `--smoke` is the CI size:
//! 200 nodes of 20 partitions.
//!
//! Must not import: `run` or `nemesis` (it is its own kind of run).

mod acked;
mod recovery;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use prost::Message;
use serde::Serialize;
use slap_proto::cluster::cluster_client::ClusterClient;
use slap_proto::cluster::CertificatesRequest;
use slap_proto::master as pb;
use slap_proto::master::master_client::MasterClient;
use slap_proto::tls::{ClientIdentity, Expect};
use tokio::sync::{Notify, Semaphore};
use tonic::transport::Channel;
use tonic::Code;

use crate::cluster::{Bins, Cluster};
use acked::Acked;
use recovery::Comeback;

const RELEASE: &str = "https://fleet.invalid/software.cfg";

/// `chaos fleet` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct FleetArgs {
    /// Simulated nodes (computers).
    #[arg(long, default_value_t = 1_000)]
    pub nodes: usize,
    /// Partitions per node.
    #[arg(long, default_value_t = 100)]
    pub partitions: usize,
    /// Instances the users request in all (default: half the partitions).
    #[arg(long)]
    pub instances: Option<usize>,
    /// Simulated users, each a certificate and a closed loop of requests.
    #[arg(long, default_value_t = 32)]
    pub users: usize,
    /// Seconds between two polls of one node's document (jittered by half).
    #[arg(long, default_value_t = 60)]
    pub poll_every: u64,
    /// Seconds to keep the fleet polling and the users changing instances
    /// once every instance is requested.
    #[arg(long, default_value_t = 60)]
    pub hold: u64,
    /// Registrations, formats and requests in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// The CI size: 200 nodes x 20 partitions, 2,000 instances, 8 users,
    /// polls every 10 s, 20 s of hold.
    #[arg(long)]
    pub smoke: bool,
    /// Where results go (default: fleet-results/<time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// How a node polls and watches its document: `slap`, as the node
    /// agent does (`getFullComputerInformation` with `If-None-Match`, and
    /// the same held with `X-Slap-Wait` as its watch), which the gateway
    /// answers and holds itself; or `native`, the native API's
    /// `GetComputer` and `WatchComputer` stream, forwarded to a replica.
    #[arg(long, value_enum, default_value_t = WatchKind::Slap)]
    pub polls: WatchKind,
    /// Skip restarting a follower and joining a fourth replica at the end.
    #[arg(long)]
    pub no_recovery: bool,
}

/// How simulated nodes poll and watch their computer's document.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchKind {
    Slap,
    Native,
}

impl FleetArgs {
    fn sized(mut self) -> FleetArgs {
        if self.smoke {
            self.nodes = 200;
            self.partitions = 20;
            self.instances = Some(2_000);
            self.users = 8;
            self.poll_every = 10;
            self.hold = 20;
        }
        self
    }

    fn instances(&self) -> usize {
        self.instances.unwrap_or(self.nodes * self.partitions / 2)
    }
}

/// Latencies of one kind of call, in microseconds.
#[derive(Default)]
struct Latencies(Mutex<Vec<u64>>);

impl Latencies {
    fn push(&self, since: Instant) {
        self.0.lock().unwrap().push(since.elapsed().as_micros() as u64);
    }

    fn summary(&self) -> Summary {
        let mut v = self.0.lock().unwrap().clone();
        v.sort_unstable();
        let at = |q: f64| {
            v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
                .copied()
        };
        Summary {
            count: v.len(),
            p50_ms: at(0.5).unwrap_or(0) as f64 / 1000.0,
            p99_ms: at(0.99).unwrap_or(0) as f64 / 1000.0,
            max_ms: v.last().copied().unwrap_or(0) as f64 / 1000.0,
        }
    }
}

#[derive(Serialize, Debug)]
struct Summary {
    count: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// What every task adds to while the fleet runs.
#[derive(Default)]
struct Tally {
    errors: Mutex<Vec<String>>,
    error_count: AtomicU64,
    retries: AtomicU64,
    /// Poll latencies by document size (bytes, rounded down to a power of
    /// two; 0: answered 304).
    polls: Mutex<BTreeMap<usize, Arc<Latencies>>>,
    requests: Latencies,
    placed: AtomicUsize,
    reports: AtomicU64,
    publications: AtomicU64,
    usage_reports: AtomicU64,
    watch_wakeups: AtomicU64,
}

impl Tally {
    fn error(&self, what: String) {
        self.error_count.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().unwrap();
        if e.len() < 20 {
            e.push(what);
        }
    }

    fn poll(&self, bytes: usize, since: Instant) {
        let bucket = if bytes == 0 {
            0
        } else {
            1usize << (usize::BITS - 1 - bytes.leading_zeros())
        };
        let l = self.polls.lock().unwrap().entry(bucket).or_default().clone();
        l.push(since);
    }
}

/// Calls `f` until it answers, retrying what the gateway or the cluster
/// ask to retry (UNAVAILABLE: an election, or a caller over its rate);
/// anything else is an error of the run.
async fn call<T, F, Fut>(tally: &Tally, what: &str, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f().await {
            Ok(r) => return Some(r.into_inner()),
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tally.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => {
                tally.error(format!("{what}: {:?} {}", s.code(), s.message()));
                return None;
            }
        }
    }
}

/// A certificate from the cluster port, as the operator (join token).
async fn issue(
    c: &Cluster,
    cluster: &mut ClusterClient<Channel>,
    action: &str,
    name: &str,
) -> anyhow::Result<ClientIdentity> {
    let reply = cluster
        .certificates(CertificatesRequest {
            token: c.token.clone(),
            action: action.into(),
            name: name.into(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("{action} {name}"))?
        .into_inner();
    Ok(ClientIdentity::from_pem(&reply.certificate_pem, &reply.key_pem)?)
}

fn journal(computer: &str, busy: &[String]) -> String {
    let movements: String = busy
        .iter()
        .map(|p| {
            format!(
                "<movement><resource>CPU Consumption</resource><title>CPU</title><reference>{p}</reference>\
                 <quantity>86.4</quantity><price>0.0</price><VAT>None</VAT><category>cpu</category></movement>"
            )
        })
        .collect();
    format!(
        "<?xml version=\"1.0\"?><journal><transaction type=\"Sale Packing List\"><title>Resource consumptions</title>\
         <start_date></start_date><stop_date>2026-12-01 at 00:00:00</stop_date><reference>{computer}</reference>\
         <currency></currency><payment_mode></payment_mode><category></category><arrow type=\"Administration\">\
         <source></source><destination></destination></arrow>{movements}</transaction></journal>"
    )
}

/// One simulated node, from format to the end of the run.
struct Node {
    id: String,
    client: MasterClient<Channel>,
    /// The node's SLAP client (the agent's), for SLAP polls and watch.
    slap: Option<Arc<nodeagent::master::MasterClient>>,
    tally: Arc<Tally>,
    poll_every: Duration,
    /// When, after every instance is requested, this node posts its usage.
    usage_at: Duration,
    /// Set when every instance is requested (the hold begins).
    hold_started: Arc<std::sync::OnceLock<Instant>>,
}

impl Node {
    async fn format(&mut self, partitions: usize) -> bool {
        let req = pb::LoadComputerRequest {
            computer_id: self.id.clone(),
            address: "10.0.0.1".into(),
            netmask: "255.255.0.0".into(),
            partitions: (0..partitions)
                .map(|i| pb::PartitionSpec {
                    id: format!("slappart{i}"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let client = self.client.clone();
        call(&self.tally, "format", || {
            let (mut c, r) = (client.clone(), req.clone());
            async move { c.load_computer(r).await }
        })
        .await
        .is_some()
    }

    /// Polls until `stop`, on the watch's wake-ups and on its own timer.
    async fn run(mut self, stop: Arc<tokio::sync::watch::Receiver<bool>>) {
        let wake = Arc::new(Notify::new());
        let watcher = match &self.slap {
            Some(slap) => tokio::spawn(hold_slap_watch(
                slap.clone(),
                self.id.clone(),
                wake.clone(),
                self.tally.clone(),
            )),
            None => tokio::spawn(hold_watch(
                self.client.clone(),
                self.id.clone(),
                wake.clone(),
                self.tally.clone(),
            )),
        };
        let mut reported: std::collections::HashSet<String> = Default::default();
        let mut installed: std::collections::HashSet<String> = Default::default();
        // Instances this node reported destroyed and the Master confirmed:
        // a poll may be up to the documented staleness bound old (served by
        // a follower or the gateway's edge) and still show one, which a real
        // node, having emptied the partition, does not free twice.
        let mut freed: std::collections::HashSet<String> = Default::default();
        let mut used = false;
        let mut stop = (*stop).clone();
        let mut rng = fastrand(&self.id);
        let mut etag: Option<String> = None;
        // The document last received (a 304 leaves it as it was).
        let mut last: Option<Seen> = None;
        loop {
            let since = Instant::now();
            if let Some(seen) = self.poll(since, &mut etag).await {
                self.act(&seen, &mut reported, &mut installed, &mut freed).await;
                last = Some(seen);
            }
            if let Some(seen) = &last {
                let due = self.hold_started.get().is_some_and(|t| t.elapsed() >= self.usage_at);
                // A node with nothing running has no usage to post.
                if !used && due && !seen.busy.is_empty() {
                    used = true;
                    let req = pb::UseComputerRequest {
                        request_id: None,
                        computer_id: self.id.clone(),
                        tioxml: journal(&self.id, &seen.busy),
                    };
                    if call(&self.tally, "usage", || {
                        let (mut c, r) = (self.client.clone(), req.clone());
                        async move { c.use_computer(r).await }
                    })
                    .await
                    .is_some()
                    {
                        self.tally.usage_reports.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            let jitter = 0.5 + (next(&mut rng) % 1000) as f64 / 1000.0;
            tokio::select! {
                _ = tokio::time::sleep(self.poll_every.mul_f64(jitter)) => {}
                _ = wake.notified() => {}
                _ = stop.changed() => break,
            }
        }
        watcher.abort();
    }

    /// Polls the node's document: `None` when unchanged (a SLAP 304) or on
    /// an error (counted).
    async fn poll(&self, since: Instant, etag: &mut Option<String>) -> Option<Seen> {
        let Some(slap) = &self.slap else {
            let (client, id) = (self.client.clone(), self.id.clone());
            let doc = call(&self.tally, "poll", || {
                let (mut c, r) = (
                    client.clone(),
                    pb::GetComputerRequest {
                        computer_id: id.clone(),
                    },
                );
                async move { c.get_computer(r).await }
            })
            .await?;
            self.tally.poll(doc.encoded_len(), since);
            return Some(Seen::of_document(&doc));
        };
        use nodeagent::master::Fetched;
        let query = [("computer_id", self.id.as_str())];
        match slap
            .get_waiting("getFullComputerInformation", &query, etag.as_deref(), None)
            .await
        {
            Ok(Fetched::NotModified) => {
                self.tally.poll(0, since);
                None
            }
            Ok(Fetched::Body(body, tag)) => {
                self.tally.poll(body.len(), since);
                *etag = tag;
                let plan = std::str::from_utf8(&body)
                    .map_err(|e| e.to_string())
                    .and_then(|text| slap_proto::marshal::loads(text).map_err(|e| e.to_string()))
                    .and_then(|v| nodeagent::master::ComputerPlan::from_value(&v).map_err(|e| e.to_string()));
                match plan {
                    Ok(plan) => Some(Seen::of_plan(&plan)),
                    Err(e) => {
                        self.tally.error(format!("poll: an unreadable document: {e}"));
                        None
                    }
                }
            }
            Err(e) => {
                self.tally.error(format!("poll: {e}"));
                None
            }
        }
    }

    /// What a node does with its document: software installed, instances
    /// started, connection parameters published, destroyed ones freed.
    async fn act(
        &mut self,
        seen: &Seen,
        reported: &mut std::collections::HashSet<String>,
        installed: &mut std::collections::HashSet<String>,
        freed: &mut std::collections::HashSet<String>,
    ) {
        for (url, requested) in &seen.software {
            if requested == "available" && installed.insert(url.clone()) {
                let req = pb::ReportSoftwareRequest {
                    computer_id: self.id.clone(),
                    url: url.clone(),
                    state: "available".into(),
                    ..Default::default()
                };
                call(&self.tally, "software report", || {
                    let (mut c, r) = (self.client.clone(), req.clone());
                    async move { c.report_software(r).await }
                })
                .await;
            }
        }
        for (partition_id, instance_id, requested) in &seen.instances {
            let partition = Some(pb::PartitionRef {
                computer_id: self.id.clone(),
                partition_id: partition_id.clone(),
            });
            if requested == "destroyed" {
                if freed.contains(instance_id) {
                    continue;
                }
                let req = pb::ReportInstanceRequest {
                    partition,
                    state: "destroyed".into(),
                    instance_id: instance_id.clone(),
                    ..Default::default()
                };
                if call(&self.tally, "destroyed report", || {
                    let (mut c, r) = (self.client.clone(), req.clone());
                    async move { c.report_instance(r).await }
                })
                .await
                .is_some()
                {
                    self.tally.reports.fetch_add(1, Ordering::Relaxed);
                    freed.insert(instance_id.clone());
                }
                reported.remove(instance_id);
                continue;
            }
            if !reported.insert(instance_id.clone()) {
                continue;
            }
            let req = pb::ReportInstanceRequest {
                partition: partition.clone(),
                state: "started".into(),
                instance_id: instance_id.clone(),
                ..Default::default()
            };
            if call(&self.tally, "started report", || {
                let (mut c, r) = (self.client.clone(), req.clone());
                async move { c.report_instance(r).await }
            })
            .await
            .is_some()
            {
                self.tally.reports.fetch_add(1, Ordering::Relaxed);
            }
            let req = pb::PublishConnectionRequest {
                partition,
                connection: [("url".to_string(), format!("https://[fd00::1]/{partition_id}"))]
                    .into_iter()
                    .collect(),
                instance_id: instance_id.clone(),
                ..Default::default()
            };
            if call(&self.tally, "publication", || {
                let (mut c, r) = (self.client.clone(), req.clone());
                async move { c.publish_connection(r).await }
            })
            .await
            .is_some()
            {
                self.tally.publications.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What a node acts on in its document, however it polled it.
struct Seen {
    /// (url, requested state).
    software: Vec<(String, String)>,
    /// (partition, instance id, requested state) of each busy partition.
    instances: Vec<(String, String, String)>,
    /// The busy partitions.
    busy: Vec<String>,
}

impl Seen {
    fn new(software: Vec<(String, String)>, instances: Vec<(String, String, String)>) -> Seen {
        let busy = instances.iter().map(|(p, _, _)| p.clone()).collect();
        Seen {
            software,
            instances,
            busy,
        }
    }

    fn of_document(doc: &pb::ComputerDocument) -> Seen {
        Seen::new(
            doc.software
                .iter()
                .map(|s| (s.url.clone(), s.requested_state.clone()))
                .collect(),
            doc.partitions
                .iter()
                .filter_map(|p| {
                    let i = p.instance.as_ref()?;
                    Some((p.id.clone(), i.id.clone(), i.requested_state.clone()))
                })
                .collect(),
        )
    }

    fn of_plan(plan: &nodeagent::master::ComputerPlan) -> Seen {
        Seen::new(
            plan.software.clone(),
            plan.partitions
                .iter()
                .filter_map(|p| {
                    let i = p.instance.as_ref()?;
                    Some((p.id.clone(), i.guid.clone(), i.requested_state.clone()))
                })
                .collect(),
        )
    }
}

/// Holds the node's watch open (reopened if it ends) and wakes the poller
/// on every new revision.
async fn hold_watch(mut client: MasterClient<Channel>, id: String, wake: Arc<Notify>, tally: Arc<Tally>) {
    let mut known = 0;
    loop {
        let req = pb::WatchComputerRequest {
            computer_id: id.clone(),
            known_revision: known,
        };
        if let Ok(stream) = client.watch_computer(req).await {
            let mut stream = stream.into_inner();
            while let Ok(Some(rev)) = stream.message().await {
                known = rev.revision;
                tally.watch_wakeups.fetch_add(1, Ordering::Relaxed);
                wake.notify_one();
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The node agent's watch: a SLAP poll of the document held until it
/// changes (`If-None-Match` with the ETag it has, `X-Slap-Wait`), again and
/// again; wakes the poller on every new document.
async fn hold_slap_watch(slap: Arc<nodeagent::master::MasterClient>, id: String, wake: Arc<Notify>, tally: Arc<Tally>) {
    use nodeagent::master::Fetched;
    let mut etag: Option<String> = None;
    let hold = Duration::from_secs(slap_proto::limits::POLL_HOLD_SECS);
    loop {
        let query = [("computer_id", id.as_str())];
        match slap
            .get_waiting("getFullComputerInformation", &query, etag.as_deref(), Some(hold))
            .await
        {
            Ok(Fetched::Body(_, tag)) => {
                if etag.is_some() {
                    tally.watch_wakeups.fetch_add(1, Ordering::Relaxed);
                    wake.notify_one();
                }
                etag = tag;
            }
            Ok(Fetched::NotModified) => {}
            Err(e) => {
                tracing::debug!(computer = %id, error = %e, "SLAP watch failed; again in 500 ms");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

fn fastrand(seed: &str) -> u64 {
    seed.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// RSS (bytes) and CPU seconds (user + system) of a process.
pub(crate) fn usage_of(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): utime is the 14th field.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // Ticks of USER_HZ, which Linux fixes at 100 for /proc whatever the kernel's HZ.
    Some((rss_kib * 1024, ticks / 100.0))
}

fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[derive(Serialize)]
struct ProcessFigures {
    name: String,
    peak_rss_mib: f64,
    cpu_seconds: f64,
    data_dir_mib: Option<f64>,
}

#[derive(Serialize)]
struct FleetResult {
    nodes: usize,
    partitions_per_node: usize,
    partitions: usize,
    instances_requested: usize,
    instances_placed: usize,
    users: usize,
    poll_every_s: u64,
    /// How the nodes polled and watched their documents.
    polls: WatchKind,
    seconds_cluster_start: f64,
    seconds_registration: f64,
    seconds_format: f64,
    seconds_requests: f64,
    seconds_total_load: f64,
    allocations_per_second: f64,
    requests: Summary,
    polls_by_document_bytes: BTreeMap<usize, Summary>,
    reports: u64,
    publications: u64,
    usage_reports: u64,
    watch_wakeups: u64,
    retries: u64,
    errors: u64,
    first_errors: Vec<String>,
    processes: Vec<ProcessFigures>,
    /// A follower killed (SIGKILL) and restarted while the fleet polled.
    restart: Option<Comeback>,
    /// A fourth replica joining while the fleet polled.
    join: Option<Comeback>,
    /// The largest snapshot file any replica held at the end (MiB).
    snapshot_mib: f64,
    /// Titles whose last answer was checked against the final state.
    acknowledged_titles: usize,
    /// The applied index every replica agreed on, with one state digest.
    converged_at_index: u64,
    /// Acknowledged answers the final state contradicts (the first 20).
    lost_writes: Vec<String>,
}

/// Peak RSS of each watched process, sampled every half second.
fn sample_peaks(pids: Vec<(String, u32)>, peaks: Arc<Mutex<BTreeMap<String, u64>>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for (name, pid) in &pids {
                if let Some((rss, _)) = usage_of(*pid) {
                    let mut p = peaks.lock().unwrap();
                    let e = p.entry(name.clone()).or_default();
                    *e = (*e).max(rss);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// One fleet run; exits non-zero (an error) when any call failed.
pub async fn run(args: FleetArgs) -> anyhow::Result<()> {
    let args = args.sized();
    let instances = args.instances();
    anyhow::ensure!(
        instances <= args.nodes * args.partitions,
        "{instances} instances do not fit on {} partitions",
        args.nodes * args.partitions
    );
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "fleet-results/{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
        ))
    });
    std::fs::create_dir_all(&out)?;
    let t0 = Instant::now();
    // A fourth slot, spare, for the replica that joins at the end.
    let mut c = Cluster::start(Bins::beside_me()?, &out, 4, 3, 1, 1, None, None).await?;
    let seconds_cluster_start = t0.elapsed().as_secs_f64();
    let gateway = c.gateways[0].0.clone();
    let trust = c.trust()?;
    let cluster_config = slap_proto::tls::client_config(&trust, None, Expect::AnyReplica)?;
    let mut cluster = ClusterClient::new(slap_proto::tls::channel(&c.replicas[0].advertise, cluster_config)?);
    let admin = c.native(&gateway, "admin")?;

    let mut pids: Vec<(String, u32)> = Vec::new();
    for r in &c.replicas {
        if let Some(child) = &r.proc.child {
            pids.push((format!("replica-{}", r.slot), child.id()));
        }
    }
    if let Some(child) = &c.gateways[0].1.child {
        pids.push(("gateway".into(), child.id()));
    }
    let cpu_before: BTreeMap<String, f64> = pids
        .iter()
        .filter_map(|(n, p)| usage_of(*p).map(|u| (n.clone(), u.1)))
        .collect();
    let peaks = Arc::new(Mutex::new(BTreeMap::new()));
    let sampler = sample_peaks(pids.clone(), peaks.clone());
    let tally = Arc::new(Tally::default());

    // Registration: a certificate per computer, as nodes get theirs.
    let load_start = Instant::now();
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..args.nodes {
        let (gate, mut cluster, id, token) = (gate.clone(), cluster.clone(), format!("COMP-{k}"), c.token.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let identity = register(&mut cluster, &token, &id).await;
            (id, identity)
        });
    }
    let mut identities: Vec<(String, Registered)> = Vec::with_capacity(args.nodes);
    while let Some(done) = tasks.join_next().await {
        let (id, identity) = done?;
        identities.push((id, identity.with_context(|| "registering a computer")?));
    }
    identities.sort_by(|a, b| a.0.cmp(&b.0));
    let seconds_registration = load_start.elapsed().as_secs_f64();
    tracing::info!(
        nodes = args.nodes,
        seconds = seconds_registration,
        "computers registered"
    );

    // Format and supply, concurrently across nodes.
    let format_start = Instant::now();
    let mut nodes = Vec::with_capacity(args.nodes);
    let mut formats = tokio::task::JoinSet::new();
    let run_seconds = (args.hold as f64).max(1.0);
    let hold_started = Arc::new(std::sync::OnceLock::new());
    for (i, (id, registered)) in identities.into_iter().enumerate() {
        let config = slap_proto::tls::client_config(&trust, Some(&registered.identity), Expect::ReplicaOrGateway)?;
        let client = MasterClient::new(slap_proto::tls::channel(&gateway, config)?);
        let slap = match args.polls {
            WatchKind::Native => None,
            WatchKind::Slap => {
                let identity = nodeagent::master::TlsIdentity {
                    ca_pem: c.ca_pem.clone(),
                    cert_pem: registered.cert_pem,
                    key_pem: registered.key_pem,
                };
                let urls = [format!("https://{gateway}")];
                Some(Arc::new(
                    nodeagent::master::MasterClient::with_identity(&urls, Some(&identity))
                        .map_err(|e| anyhow::anyhow!("the node's SLAP client: {e}"))?,
                ))
            }
        };
        let mut node = Node {
            id: id.clone(),
            client,
            slap,
            tally: tally.clone(),
            poll_every: Duration::from_secs(args.poll_every),
            usage_at: Duration::from_secs_f64(run_seconds / 2.0 * (i as f64 / args.nodes as f64)),
            hold_started: hold_started.clone(),
        };
        let (gate, partitions, admin, tally) = (gate.clone(), args.partitions, admin.clone(), tally.clone());
        formats.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let ok = node.format(partitions).await;
            let supply = pb::SupplyRequest {
                request_id: None,
                computer_id: id,
                url: RELEASE.into(),
                state: "available".into(),
            };
            let supplied = call(&tally, "supply", || {
                let (mut a, s) = (admin.clone(), supply.clone());
                async move { a.supply(s).await }
            })
            .await
            .is_some();
            (node, ok && supplied)
        });
    }
    while let Some(done) = formats.join_next().await {
        let (node, ok) = done?;
        anyhow::ensure!(
            ok,
            "a node could not format or be supplied: {:?}",
            tally.errors.lock().unwrap()
        );
        nodes.push(node);
    }
    let seconds_format = format_start.elapsed().as_secs_f64();
    tracing::info!(seconds = seconds_format, "computers formatted and supplied");

    // The fleet polls from now on.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_rx = Arc::new(stop_rx);
    let mut fleet = tokio::task::JoinSet::new();
    for node in nodes {
        fleet.spawn(node.run(stop_rx.clone()));
    }

    // Users request every instance, in closed loops.
    let request_start = Instant::now();
    let mut users = tokio::task::JoinSet::new();
    let per_user = instances.div_ceil(args.users);
    for u in 0..args.users {
        let name = format!("user{u}");
        let identity = issue(&c, &mut cluster, "user", &name).await?;
        let config = slap_proto::tls::client_config(&trust, Some(&identity), Expect::ReplicaOrGateway)?;
        let client = MasterClient::new(slap_proto::tls::channel(&gateway, config)?);
        let count = per_user.min(instances.saturating_sub(u * per_user));
        let (tally, lanes) = (tally.clone(), (args.concurrency / args.users).max(1));
        let acked = Arc::new(Acked::default());
        users.spawn(async move {
            let next_title = Arc::new(AtomicUsize::new(0));
            let mut lanes_set = tokio::task::JoinSet::new();
            for _ in 0..lanes {
                let (client, tally, next_title, acked) =
                    (client.clone(), tally.clone(), next_title.clone(), acked.clone());
                lanes_set.spawn(async move {
                    loop {
                        let i = next_title.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        let req = pb::RequestInstanceRequest {
                            title: format!("i{i}"),
                            software_release: RELEASE.into(),
                            software_type: "default".into(),
                            parameters: [("n".to_string(), i.to_string())].into_iter().collect(),
                            ..Default::default()
                        };
                        let since = Instant::now();
                        let answer = call(&tally, "request", || {
                            let (mut c, r) = (client.clone(), req.clone());
                            async move { c.request(r).await }
                        })
                        .await;
                        tally.requests.push(since);
                        match answer {
                            Some(a) => {
                                acked.record(&req.title, &a);
                                if a.placed {
                                    tally.placed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            None => acked.unanswered(&req),
                        }
                    }
                });
            }
            while lanes_set.join_next().await.is_some() {}
            (name, client, count, acked)
        });
    }
    let progress = {
        let tally = tally.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let placed = tally.placed.load(Ordering::Relaxed);
                tracing::info!(placed, per_second = (placed - last) / 10, "requests under way");
                last = placed;
            }
        })
    };
    let mut user_clients = Vec::new();
    while let Some(done) = users.join_next().await {
        user_clients.push(done?);
    }
    progress.abort();
    let seconds_requests = request_start.elapsed().as_secs_f64();
    let seconds_total_load = load_start.elapsed().as_secs_f64();
    let allocations_per_second = tally.placed.load(Ordering::Relaxed) as f64 / seconds_requests.max(1e-9);
    tracing::info!(
        seconds = seconds_requests,
        placed = tally.placed.load(Ordering::Relaxed),
        "instances requested"
    );

    // The hold: the fleet keeps polling; users change parameters of some
    // instances and destroy others.
    let _ = hold_started.set(Instant::now());
    let hold_until = Instant::now() + Duration::from_secs(args.hold);
    let mut changers = tokio::task::JoinSet::new();
    for (_, client, count, acked) in &user_clients {
        let (tally, client, count, acked) = (tally.clone(), client.clone(), *count, acked.clone());
        changers.spawn(async move {
            let mut i = 0usize;
            while Instant::now() < hold_until && count > 0 {
                // Every third call a shared instance (hosted by one of the
                // user's instances); else a change or, one in five, a destroy.
                let shared = i % 3 == 2;
                let title = if shared {
                    format!("s{i}")
                } else {
                    format!("i{}", (i * 7919) % count)
                };
                let destroy = !shared && i % 5 == 4;
                let req = pb::RequestInstanceRequest {
                    title,
                    software_release: RELEASE.into(),
                    software_type: "default".into(),
                    parameters: [("n".to_string(), format!("changed-{i}"))].into_iter().collect(),
                    state: if destroy { "destroyed".into() } else { String::new() },
                    shared,
                    ..Default::default()
                };
                match call(&tally, "re-request", || {
                    let (mut c, r) = (client.clone(), req.clone());
                    async move { c.request(r).await }
                })
                .await
                {
                    Some(a) => acked.record(&req.title, &a),
                    None => acked.unanswered(&req),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    while changers.join_next().await.is_some() {}
    sampler.abort();

    let peaks = peaks.lock().unwrap().clone();
    let processes: Vec<ProcessFigures> = pids
        .iter()
        .map(|(name, pid)| ProcessFigures {
            name: name.clone(),
            peak_rss_mib: peaks.get(name).copied().unwrap_or(0) as f64 / (1 << 20) as f64,
            cpu_seconds: usage_of(*pid).map(|u| u.1).unwrap_or(0.0) - cpu_before.get(name).copied().unwrap_or(0.0),
            data_dir_mib: name
                .strip_prefix("replica-")
                .and_then(|s| s.parse::<usize>().ok())
                .map(|slot| dir_bytes(&c.replicas[slot - 1].dir) as f64 / (1 << 20) as f64),
        })
        .collect();

    // A replica brought back by a restart and another by a join, while the
    // fleet keeps polling.
    let (mut restart, mut join) = (None, None);
    if !args.no_recovery {
        match recovery::restart_follower(&mut c).await {
            Ok(r) => restart = Some(r),
            Err(e) => {
                let why = format!("restarting a follower: {e:#}");
                tracing::warn!("{why}");
                tally.error(why);
            }
        }
        match recovery::join_new(&mut c, 4).await {
            Ok(j) => join = Some(j),
            Err(e) => {
                let why = format!("joining a fourth replica: {e:#}");
                tracing::warn!("{why}");
                tally.error(why);
            }
        }
    }
    let _ = stop_tx.send(true);
    while fleet.join_next().await.is_some() {}

    // Quiet now: every replica holds one state, and every answer a user was
    // given is in it.
    let converged_at_index = match recovery::converged(&mut c).await {
        Ok(index) => index,
        Err(e) => {
            tally.error(format!("{e:#}"));
            0
        }
    };
    let mut lost_writes = Vec::new();
    let mut acknowledged_titles = 0;
    let lister = c.native(&gateway, "admin")?.max_decoding_message_size(1 << 30);
    for (name, _, _, acked) in &user_clients {
        acknowledged_titles += acked.titles();
        let listed = call(&tally, "final instance list", || {
            let mut l = lister.clone();
            let user = name.clone();
            async move { l.list_instances(pb::ListInstancesRequest { user }).await }
        })
        .await;
        if let Some(listed) = listed {
            lost_writes.extend(acked.lost(name, &listed.instances));
        }
    }
    let lost_count = lost_writes.len();
    lost_writes.truncate(20);

    let result = FleetResult {
        nodes: args.nodes,
        partitions_per_node: args.partitions,
        partitions: args.nodes * args.partitions,
        instances_requested: instances,
        instances_placed: tally.placed.load(Ordering::Relaxed),
        users: args.users,
        poll_every_s: args.poll_every,
        polls: args.polls,
        seconds_cluster_start,
        seconds_registration,
        seconds_format,
        seconds_requests,
        seconds_total_load,
        allocations_per_second,
        requests: tally.requests.summary(),
        polls_by_document_bytes: tally
            .polls
            .lock()
            .unwrap()
            .iter()
            .map(|(b, l)| (*b, l.summary()))
            .collect(),
        reports: tally.reports.load(Ordering::Relaxed),
        publications: tally.publications.load(Ordering::Relaxed),
        usage_reports: tally.usage_reports.load(Ordering::Relaxed),
        watch_wakeups: tally.watch_wakeups.load(Ordering::Relaxed),
        retries: tally.retries.load(Ordering::Relaxed),
        errors: tally.error_count.load(Ordering::Relaxed),
        first_errors: tally.errors.lock().unwrap().clone(),
        processes,
        restart,
        join,
        snapshot_mib: recovery::largest_snapshot(&c) as f64 / (1 << 20) as f64,
        acknowledged_titles,
        converged_at_index,
        lost_writes,
    };
    c.shutdown();
    std::fs::write(out.join("fleet.json"), serde_json::to_string_pretty(&result)?)?;
    print(&result);
    println!("results in {}", out.display());
    anyhow::ensure!(
        result.errors == 0,
        "{} calls failed: {:?}",
        result.errors,
        result.first_errors
    );
    anyhow::ensure!(
        result.instances_placed == instances,
        "{} of {instances} instances placed",
        result.instances_placed
    );
    anyhow::ensure!(
        lost_count == 0,
        "{lost_count} acknowledged writes are not in the final state: {:?}",
        result.lost_writes
    );
    Ok(())
}

/// A computer's certificate the way a node gets it: a one-time token from
/// the operator, then `register` with it.
async fn register(cluster: &mut ClusterClient<Channel>, token: &str, id: &str) -> anyhow::Result<Registered> {
    let registration = cluster
        .certificates(CertificatesRequest {
            token: token.into(),
            action: "computer-token".into(),
            name: id.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .registration;
    let reply = cluster
        .certificates(CertificatesRequest {
            action: "register".into(),
            name: id.into(),
            registration,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(Registered {
        identity: ClientIdentity::from_pem(&reply.certificate_pem, &reply.key_pem)?,
        cert_pem: reply.certificate_pem,
        key_pem: reply.key_pem,
    })
}

/// A registered computer's certificate, as a native-API identity and as
/// the PEM files the node agent keeps.
struct Registered {
    identity: ClientIdentity,
    cert_pem: String,
    key_pem: String,
}

fn print(r: &FleetResult) {
    println!(
        "fleet: {} nodes x {} partitions = {} partitions, {} instances requested by {} users ({} placed)",
        r.nodes, r.partitions_per_node, r.partitions, r.instances_requested, r.users, r.instances_placed
    );
    println!(
        "load: registration {:.1} s, format+supply {:.1} s, requests {:.1} s; total {:.1} s (cluster start {:.1} s apart)",
        r.seconds_registration, r.seconds_format, r.seconds_requests, r.seconds_total_load, r.seconds_cluster_start
    );
    println!(
        "allocations: {:.0}/s; request latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        r.allocations_per_second, r.requests.p50_ms, r.requests.p99_ms, r.requests.max_ms
    );
    for (bytes, s) in &r.polls_by_document_bytes {
        let what = match bytes {
            0 => "polls answered 304 (unchanged)".to_string(),
            b => format!("polls of {b}-{} byte documents", b * 2),
        };
        println!(
            "{what}: {} polls, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            s.count, s.p50_ms, s.p99_ms, s.max_ms
        );
    }
    println!(
        "node calls: {} instance reports, {} publications, {} usage journals, {} watch wake-ups; {} retries (UNAVAILABLE)",
        r.reports, r.publications, r.usage_reports, r.watch_wakeups, r.retries
    );
    for p in &r.processes {
        println!(
            "{}: peak RSS {:.0} MiB, CPU {:.1} s{}",
            p.name,
            p.peak_rss_mib,
            p.cpu_seconds,
            p.data_dir_mib
                .map(|d| format!(", data dir {d:.0} MiB"))
                .unwrap_or_default()
        );
    }
    for (what, back) in [("restart", &r.restart), ("join", &r.join)] {
        if let Some(b) = back {
            println!(
                "{what} (slot {}): answering after {:.1} s, caught up to index {} after {:.1} s, RSS then {:.0} MiB",
                b.slot, b.seconds_answering, b.caught_up_to, b.seconds_caught_up, b.rss_mib
            );
        }
    }
    println!(
        "largest snapshot {:.1} MiB; replicas agree at index {}; {} acknowledged titles checked, {} lost",
        r.snapshot_mib,
        r.converged_at_index,
        r.acknowledged_titles,
        r.lost_writes.len()
    );
    for l in &r.lost_writes {
        println!("  lost: {l}");
    }
    println!("errors: {}", r.errors);
    for e in &r.first_errors {
        println!("  {e}");
    }
}
