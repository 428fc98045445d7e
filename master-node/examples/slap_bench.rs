//! SLAP over HTTP: master-node next to slapproxy (`slapos proxy start`, the
//! reference SlapOS mini-master), same data, same calls, same run.
//!
//! Both get the same HTTP requests (a new connection per call, as raw
//! HTTP/1.1): `loadComputerConfigurationFromXML` with 200 partitions (and then
//! 100), `requestComputerPartition` for 50 new instances one at a time,
//! re-requests of an existing instance, `getFullComputerInformation` of the
//! 100-partition computer with 50 busy and of a 3-partition computer with 3
//! busy, at 1 and 8 concurrent clients, and last new allocations from 8
//! clients at once (on a third computer with room for all of them).
//!
//! ```text
//! scripts/setup.sh   # installs the slapos client (with slapproxy)
//! cargo build -p master-node && cargo run -p master-node --example slap_bench -- --seconds 5
//! ```
//!
//! master-node is measured three times: one replica answering directly,
//! three replicas behind slap-gateway (what the targets are about), and a
//! fresh three-replica cluster called at its leader directly (to tell the
//! gateway's share from replication's).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use support::{computer_xml, form, free_port, http, start_cluster_with_gateway, start_master, wait_up, Proc};

#[path = "support/mod.rs"]
mod support;

#[derive(Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// The slapos client (slapproxy is `slapos proxy start`).
    #[arg(long, env = "SLAPOS_BIN", default_value = "/var/tmp/slapos-venv/bin/slapos")]
    slapos: PathBuf,
}

const SR: &str = "/srv/bench/software.cfg";

/// Calls per second of `call` from `clients` threads for `secs` seconds.
fn rate(clients: usize, secs: u64, call: impl Fn(u64) -> bool + Send + Sync + 'static) -> f64 {
    let call = Arc::new(call);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (call, stop, done, counter) = (call.clone(), stop.clone(), done.clone(), counter.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if call(counter.fetch_add(1, Ordering::Relaxed)) {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn start_slapproxy(slapos: &Path, dir: &Path) -> (Proc, u16) {
    let port = free_port();
    let cfg = dir.join("proxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "[slapos]\ncomputer_id = COMP-1\ninstance_root = {d}/srv\nsoftware_root = {d}/opt\n[slapproxy]\nhost = 127.0.0.1\nport = {port}\ndatabase_uri = {d}/proxy.db\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(slapos)
        .args(["proxy", "start", "--cfg"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start slapproxy");
    wait_up(port);
    (Proc(child), port)
}

struct Figures {
    load_200: f64,
    /// New allocations per second: one client, then 8 at once.
    allocations: [f64; 2],
    rerequest: [f64; 2],
    /// The 100-partition computer (50 busy), at 1 and 8 clients.
    poll: [f64; 2],
    /// The 3-partition computer (3 busy), at 1 and 8 clients.
    poll_small: [f64; 2],
}

impl Figures {
    /// The table's rows: call, clients, calls per second (the load as its
    /// inverse, so every ratio is ours over theirs).
    fn rows(&self) -> [(&'static str, &'static str, f64); 9] {
        const POLL_100: &str = "getFullComputerInformation (100 partitions, 50 busy)";
        const POLL_3: &str = "getFullComputerInformation (3 partitions, 3 busy)";
        const REREQUEST: &str = "requestComputerPartition, identical re-request";
        const ALLOCATION: &str = "requestComputerPartition, new allocation";
        [
            (POLL_100, "1", self.poll[0]),
            (POLL_100, "8", self.poll[1]),
            (POLL_3, "1", self.poll_small[0]),
            (POLL_3, "8", self.poll_small[1]),
            (REREQUEST, "1", self.rerequest[0]),
            (REREQUEST, "8", self.rerequest[1]),
            (ALLOCATION, "1", self.allocations[0]),
            (ALLOCATION, "8", self.allocations[1]),
            (
                "loadComputerConfigurationFromXML, 200 partitions",
                "1",
                1.0 / self.load_200,
            ),
        ]
    }
}

/// Allocations made from 8 clients at once, 8 x this many.
const PARALLEL_ALLOCATIONS_PER_CLIENT: usize = 40;

fn load(port: u16, reference: &str, partitions: usize) {
    let xml = computer_xml(reference, partitions);
    assert_eq!(
        http(
            port,
            "POST",
            "/loadComputerConfigurationFromXML",
            &form(&[("xml", &xml)])
        ),
        Some(200)
    );
    assert_eq!(
        http(
            port,
            "POST",
            "/supplySupply",
            &form(&[("url", SR), ("computer_id", reference), ("state", "available")])
        ),
        Some(200)
    );
}

fn allocate(port: u16, title: &str, computer: &str) {
    assert_eq!(
        http(
            port,
            "POST",
            "/requestComputerPartition",
            &support::request_form(SR, title, "v", Some(computer))
        ),
        Some(200),
        "allocation of {title} on {computer}"
    );
}

fn measure(port: u16, secs: u64) -> Figures {
    // loadComputerConfigurationFromXML with 200 partitions: seconds per call.
    let t = Instant::now();
    assert_eq!(
        http(
            port,
            "POST",
            "/loadComputerConfigurationFromXML",
            &form(&[("xml", &computer_xml("COMP-1", 200))])
        ),
        Some(200)
    );
    let load_200 = t.elapsed().as_secs_f64();
    // Back to 100 partitions for the rest, and a 3-partition computer, full.
    load(port, "COMP-1", 100);
    load(port, "COMP-3", 3);
    for i in 0..3 {
        allocate(port, &format!("small{i}"), "COMP-3");
    }
    // 50 new allocations, one at a time.
    let t = Instant::now();
    for i in 0..50 {
        allocate(port, &format!("inst{i}"), "COMP-1");
    }
    let one_client_allocations = 50.0 / t.elapsed().as_secs_f64();
    let mut rerequest = [0.0; 2];
    let mut poll = [0.0; 2];
    let mut poll_small = [0.0; 2];
    for (slot, clients) in [1usize, 8].into_iter().enumerate() {
        // Identical re-requests of an existing instance.
        rerequest[slot] = rate(clients, secs, move |n| {
            http(
                port,
                "POST",
                "/requestComputerPartition",
                &support::request_form(SR, &format!("inst{}", n % 50), "v", Some("COMP-1")),
            ) == Some(200)
        });
        poll[slot] = rate(clients, secs, move |_| {
            http(port, "GET", "/getFullComputerInformation", "computer_id=COMP-1") == Some(200)
        });
        poll_small[slot] = rate(clients, secs, move |_| {
            http(port, "GET", "/getFullComputerInformation", "computer_id=COMP-3") == Some(200)
        });
    }
    // New allocations from 8 clients at once, on a computer with room for all.
    let clients = 8;
    load(port, "COMP-2", clients * PARALLEL_ALLOCATIONS_PER_CLIENT + 10);
    let t = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            std::thread::spawn(move || {
                for i in 0..PARALLEL_ALLOCATIONS_PER_CLIENT {
                    allocate(port, &format!("parallel-{c}-{i}"), "COMP-2");
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let parallel_allocations = (clients * PARALLEL_ALLOCATIONS_PER_CLIENT) as f64 / t.elapsed().as_secs_f64();
    Figures {
        load_200,
        allocations: [one_client_allocations, parallel_allocations],
        rerequest,
        poll,
        poll_small,
    }
}

fn main() {
    let args = Args::parse();
    assert!(
        args.slapos.exists(),
        "no slapos client at {} (run scripts/setup.sh)",
        args.slapos.display()
    );
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    println!(
        "SLAP benchmark: {} s per point, 100 partitions with 50 busy, 3 with 3 busy",
        args.seconds
    );

    // One system at a time on the machine.
    let ours = {
        let (_m, port) = start_master(dir.path());
        measure(port, args.seconds)
    };
    let cluster = {
        let cluster = start_cluster_with_gateway(dir.path(), "cluster");
        measure(cluster.gateway_port, args.seconds)
    };
    // Where the gateway's figures go: the same calls on a fresh 3-replica
    // cluster, straight to its leader.
    let leader = {
        let cluster = start_cluster_with_gateway(dir.path(), "leader");
        measure(cluster.leader_port, args.seconds)
    };
    let theirs = {
        let (_p, port) = start_slapproxy(&args.slapos, dir.path());
        measure(port, args.seconds)
    };
    println!();
    println!(
        "| call | clients | 1 replica, direct | 3 replicas, leader direct | 3 replicas + gateway | slapproxy | \
         direct / slapproxy | gateway / slapproxy |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let (a, l, g, b) = (ours.rows(), leader.rows(), cluster.rows(), theirs.rows());
    for (i, &(name, clients, _)) in a.iter().enumerate() {
        let cell = |rate: f64| {
            if name.starts_with("load") {
                format!("{:.3} s", 1.0 / rate)
            } else {
                format!("{rate:.1}/s")
            }
        };
        let (a, l, g, b) = (a[i].2, l[i].2, g[i].2, b[i].2);
        println!(
            "| {name} | {clients} | {} | {} | {} | {} | {:.1}x | {:.1}x |",
            cell(a),
            cell(l),
            cell(g),
            cell(b),
            a / b,
            g / b
        );
    }
}
