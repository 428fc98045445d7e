//! New allocations through slap-gateway on three replicas.
//!
//! Registers `--computers` computers of `--partitions` partitions each
//! (`loadComputerConfigurationFromXML`, then `supplySupply` of one release on
//! each), through the gateway. Then, for each client count, closed-loop
//! clients (each sends its next call when the previous one is answered, on
//! its own kept-alive HTTP/1.1 connection) request new instances with no SLA
//! for `--seconds`, so the Master chooses among all computers. Reported per
//! level: allocations per second, p50/p99/max latency, failed calls, and
//! the replicas' CPU per allocation.
//!
//! With `--fill`, the clients of the largest level then go on until every
//! partition is taken: the time to place the whole fleet (1,000,000
//! partitions with `--computers 10000 --partitions 100`), and each
//! replica's resident memory at the end.
//!
//! ```text
//! cargo build -p master-node -p slap-gateway --examples
//! cargo run -p master-node --example alloc_bench -- --computers 1000 --clients 1,8,64,256 --seconds 10
//! cargo run -p master-node --example alloc_bench -- --computers 10000 --clients 256 --seconds 10 --fill
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use support::{computer_xml, cpu_seconds, form, percentile_ms, request_form, rss_mib, start_cluster_with_gateway};

#[path = "support/mod.rs"]
mod support;

#[derive(Parser)]
struct Args {
    /// Computers registered.
    #[arg(long, default_value_t = 1000)]
    computers: usize,
    /// Partitions per computer.
    #[arg(long, default_value_t = 100)]
    partitions: usize,
    /// Concurrent clients at each level.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256")]
    clients: Vec<usize>,
    /// Seconds per level.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Then allocate until every partition is taken.
    #[arg(long)]
    fill: bool,
    /// Call the leader directly instead of the gateway.
    #[arg(long)]
    leader: bool,
    /// Where the data dirs go (the disk being measured).
    #[arg(long, default_value = "/var/tmp")]
    dir: std::path::PathBuf,
    /// The master-node binary to measure (default: the one built beside this
    /// example), e.g. a copy of an earlier build for a same-run comparison.
    #[arg(long)]
    master_bin: Option<std::path::PathBuf>,
}

const SR: &str = "https://lab.example.org/software/bench/software.cfg";

type Http = Client<HttpConnector, Full<Bytes>>;

/// One SLAP POST; the status, or `None` if the call failed outright.
async fn post(http: &Http, port: u16, path: &str, body: String) -> Option<u16> {
    let req = hyper::Request::post(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(body)))
        .ok()?;
    let resp = http.request(req).await.ok()?;
    let status = resp.status().as_u16();
    // Read the whole answer, so the connection is reused.
    resp.into_body().collect().await.ok()?;
    Some(status)
}

/// Registers computers `COMP-0..n` with `partitions` each and supplies the
/// release on each, from 32 clients; seconds taken.
async fn register(http: &Http, port: u16, computers: usize, partitions: usize) -> f64 {
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (http, next) = (http.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= computers {
                        return;
                    }
                    let id = format!("COMP-{i}");
                    let xml = computer_xml(&id, partitions);
                    let loaded = post(&http, port, "/loadComputerConfigurationFromXML", form(&[("xml", &xml)])).await;
                    assert_eq!(loaded, Some(200), "registering {id}");
                    let supply = form(&[("url", SR), ("computer_id", &id), ("state", "available")]);
                    assert_eq!(
                        post(&http, port, "/supplySupply", supply).await,
                        Some(200),
                        "supplying {id}"
                    );
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed().as_secs_f64()
}

/// What one level measured.
struct Level {
    clients: usize,
    allocations: u64,
    failed: u64,
    seconds: f64,
    latencies: Vec<Duration>,
    cpu_seconds: f64,
}

impl Level {
    fn row(&mut self) -> String {
        self.latencies.sort();
        let rate = self.allocations as f64 / self.seconds;
        format!(
            "| {} | {:.0}/s | {:.2} | {:.2} | {:.2} | {} | {:.3} |",
            self.clients,
            rate,
            percentile_ms(&self.latencies, 0.5),
            percentile_ms(&self.latencies, 0.99),
            self.latencies.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0),
            self.failed,
            self.cpu_seconds * 1000.0 / self.allocations.max(1) as f64,
        )
    }
}

/// Closed-loop allocations from `clients` clients until `deadline` or until
/// `limit` allocations are made in all.
async fn allocate(
    http: &Http,
    port: u16,
    clients: usize,
    label: &str,
    until: Option<Instant>,
    limit: u64,
    pids: &[u32],
) -> Level {
    let cpu_before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let start = Instant::now();
    let made = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (http, made, failed, stop, latencies) = (
                http.clone(),
                made.clone(),
                failed.clone(),
                stop.clone(),
                latencies.clone(),
            );
            let label = label.to_string();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                for n in 0u64.. {
                    if stop.load(Ordering::Relaxed) || until.is_some_and(|u| Instant::now() >= u) {
                        break;
                    }
                    let title = format!("{label}-{c}-{n}");
                    let t = Instant::now();
                    let status = post(
                        &http,
                        port,
                        "/requestComputerPartition",
                        request_form(SR, &title, "v", None),
                    )
                    .await;
                    mine.push(t.elapsed());
                    match status {
                        Some(200) => {
                            if made.fetch_add(1, Ordering::Relaxed) + 1 >= limit {
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                        // 408: accepted, not placed: the fleet is full.
                        Some(408) => {
                            stop.store(true, Ordering::Relaxed);
                            break;
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                latencies.lock().unwrap().extend(mine);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu_after: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let latencies = std::mem::take(&mut *latencies.lock().unwrap());
    Level {
        clients,
        allocations: made.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        seconds,
        latencies,
        cpu_seconds: cpu_after - cpu_before,
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir_in(&args.dir).unwrap();
    let cluster = match &args.master_bin {
        Some(bin) => support::start_cluster_of(bin, dir.path(), "alloc"),
        None => start_cluster_with_gateway(dir.path(), "alloc"),
    };
    let port = if args.leader {
        cluster.leader_port
    } else {
        cluster.gateway_port
    };
    let pids: Vec<u32> = cluster.replicas.iter().map(|r| r.pid()).collect();
    let http: Http = Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http();
    let total = (args.computers * args.partitions) as u64;
    println!(
        "allocation benchmark: 3 replicas, {}, {} computers x {} partitions ({total} partitions)",
        if args.leader {
            "leader direct"
        } else {
            "through slap-gateway"
        },
        args.computers,
        args.partitions
    );
    let took = register(&http, port, args.computers, args.partitions).await;
    println!(
        "registered and supplied {} computers in {took:.1} s ({:.0} computers/s)",
        args.computers,
        args.computers as f64 / took
    );
    println!();
    println!("| clients | allocations | p50 ms | p99 ms | max ms | failed | replicas' CPU ms / allocation |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut placed = 0;
    for (i, &clients) in args.clients.iter().enumerate() {
        let until = Instant::now() + Duration::from_secs(args.seconds);
        let mut level = allocate(
            &http,
            port,
            clients,
            &format!("l{i}"),
            Some(until),
            total - placed,
            &pids,
        )
        .await;
        placed += level.allocations;
        println!("{}", level.row());
        if placed >= total {
            println!("(the fleet is full)");
            break;
        }
    }
    if args.fill && placed < total {
        let clients = args.clients.iter().copied().max().unwrap_or(64);
        let mut level = allocate(&http, port, clients, "fill", None, total - placed, &pids).await;
        placed += level.allocations;
        println!("{}", level.row());
        println!();
        println!(
            "fill: {} more allocations in {:.1} s ({:.0}/s); {placed} of {total} partitions taken",
            level.allocations,
            level.seconds,
            level.allocations as f64 / level.seconds
        );
    }
    let rss: Vec<String> = pids.iter().map(|p| format!("{:.0} MiB", rss_mib(*p))).collect();
    println!(
        "replicas' RSS at the end: {}; gateway {:.0} MiB",
        rss.join(", "),
        rss_mib(cluster.gateway.pid())
    );
}
