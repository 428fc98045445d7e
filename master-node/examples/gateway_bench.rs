//! What the `slap-gateway` hop costs: the same SLAP calls on the same
//! 3-replica cluster, through the gateway and straight to the leader,
//! interleaved in one run so both see the same data and the same machine.
//!
//! For each call (the 100- and 3-partition polls, a conditional poll that
//! answers 304, identical re-requests, new allocations) at 1 and 8 clients,
//! it prints calls per second and p50/p99 latency for both paths and the
//! gateway's share. Calls are made on kept-alive connections (as the node
//! agent and `slapos node` make them) and, for the polls, also on a new
//! connection per call (as `slap_bench` does). Last, it holds `--watches`
//! long polls (`X-Slap-Wait`) open through the gateway and prints the
//! gateway's RSS while they are held, and whether each held poll answers
//! when its computer changes.
//!
//! ```text
//! cargo build -p master-node -p slap-gateway --examples
//! cargo run -p master-node --example gateway_bench -- --seconds 3 --watches 10000
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use support::{computer_xml, form, percentile_ms, request_form, rss_mib, start_cluster_with_gateway, Cluster};

#[path = "support/mod.rs"]
mod support;

#[derive(Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Long polls held open through the gateway at the end (0: skip).
    #[arg(long, default_value_t = 10_000)]
    watches: usize,
    /// Only the held long polls, not the table.
    #[arg(long)]
    only_watches: bool,
    /// Only the table's rows whose call contains this (and no other part).
    #[arg(long)]
    rows: Option<String>,
}

const SR: &str = "/srv/bench/software.cfg";

/// A kept-alive HTTP/1.1 connection.
struct Conn {
    port: u16,
    reader: Option<BufReader<TcpStream>>,
}

/// A response: its status and ETag.
struct Answer {
    status: u16,
    etag: Option<String>,
}

impl Conn {
    fn new(port: u16) -> Conn {
        Conn { port, reader: None }
    }

    /// One call; reconnects once if the kept connection was closed.
    fn call(&mut self, method: &str, path: &str, form: &str, headers: &[(&str, &str)]) -> Option<Answer> {
        for _ in 0..2 {
            if self.reader.is_none() {
                let s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
                s.set_nodelay(true).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
                self.reader = Some(BufReader::new(s));
            }
            match self.try_call(method, path, form, headers) {
                Some(a) => return Some(a),
                None => self.reader = None,
            }
        }
        None
    }

    fn try_call(&mut self, method: &str, path: &str, form: &str, headers: &[(&str, &str)]) -> Option<Answer> {
        let reader = self.reader.as_mut()?;
        let mut head = String::new();
        if method == "GET" {
            head.push_str(&format!("GET {path}?{form} HTTP/1.1\r\nHost: 127.0.0.1\r\n"));
        } else {
            head.push_str(&format!(
                "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
                form.len()
            ));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        if method != "GET" {
            head.push_str(form);
        }
        reader.get_mut().write_all(head.as_bytes()).ok()?;
        read_answer(reader)
    }
}

/// Reads one response (Content-Length or chunked body) off a connection.
fn read_answer(reader: &mut BufReader<TcpStream>) -> Option<Answer> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let status: u16 = line.split(' ').nth(1)?.parse().ok()?;
    let (mut length, mut chunked, mut etag) = (0usize, false, None);
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        let v = v.trim();
        match k.to_ascii_lowercase().as_str() {
            "content-length" => length = v.parse().ok()?,
            "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
            "etag" => etag = Some(v.to_string()),
            _ => {}
        }
    }
    let mut sink = vec![0u8; 64 * 1024];
    let mut skip = |mut n: usize, reader: &mut BufReader<TcpStream>| -> Option<()> {
        while n > 0 {
            let got = reader.read(&mut sink[..n.min(64 * 1024)]).ok()?;
            if got == 0 {
                return None;
            }
            n -= got;
        }
        Some(())
    };
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line).ok()?;
            let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
            skip(size + 2, reader)?;
            if size == 0 {
                break;
            }
        }
    } else if status != 304 {
        skip(length, reader)?;
    }
    Some(Answer { status, etag })
}

/// Calls per second and latencies of `call` from `clients` threads, each
/// with its own connection to `port`.
fn measure(
    clients: usize,
    secs: u64,
    port: u16,
    call: impl Fn(&mut Conn, u64) -> bool + Send + Sync + 'static,
) -> (f64, f64, f64) {
    let call = Arc::new(call);
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (call, stop, latencies, counter) = (call.clone(), stop.clone(), latencies.clone(), counter.clone());
            std::thread::spawn(move || {
                let mut conn = Conn::new(port);
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    assert!(
                        call(&mut conn, counter.fetch_add(1, Ordering::Relaxed)),
                        "a call failed"
                    );
                    mine.push(t.elapsed());
                }
                latencies.lock().unwrap().extend(mine);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut l = std::mem::take(&mut *latencies.lock().unwrap());
    l.sort();
    (
        l.len() as f64 / elapsed,
        percentile_ms(&l, 0.5),
        percentile_ms(&l, 0.99),
    )
}

fn ok(a: Option<Answer>, want: u16) -> bool {
    a.is_some_and(|a| a.status == want)
}

/// Registers `reference` with `partitions` partitions.
fn register(c: &mut Conn, reference: &str, partitions: usize) {
    let xml = computer_xml(reference, partitions);
    let registered = c.call(
        "POST",
        "/loadComputerConfigurationFromXML",
        &form(&[("xml", &xml)]),
        &[],
    );
    assert!(ok(registered, 200), "registering {reference}");
}

/// Registers `reference` and supplies it with the release.
fn load(port: u16, reference: &str, partitions: usize) {
    let mut c = Conn::new(port);
    register(&mut c, reference, partitions);
    let supply = form(&[("url", SR), ("computer_id", reference), ("state", "available")]);
    assert!(ok(c.call("POST", "/supplySupply", &supply, &[]), 200));
}

type Call = Arc<dyn Fn(&mut Conn, u64) -> bool + Send + Sync>;

fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let cluster = start_cluster_with_gateway(dir.path(), "bench");
    if args.only_watches {
        hold_watches(&cluster, args.watches);
        return;
    }
    let (gw, leader) = (cluster.gateway_port, cluster.leader_port);
    load(gw, "COMP-1", 100);
    load(gw, "COMP-3", 3);
    let mut c = Conn::new(gw);
    for i in 0..50 {
        let f = request_form(SR, &format!("inst{i}"), "v", Some("COMP-1"));
        assert!(ok(c.call("POST", "/requestComputerPartition", &f, &[]), 200));
    }
    for i in 0..3 {
        let f = request_form(SR, &format!("small{i}"), "v", Some("COMP-3"));
        assert!(ok(c.call("POST", "/requestComputerPartition", &f, &[]), 200));
    }
    // Room for every new allocation both paths make.
    for i in 0..20 {
        load(gw, &format!("COMP-2-{i}"), 2_000);
    }
    let etag = c
        .call("GET", "/getFullComputerInformation", "computer_id=COMP-1", &[])
        .and_then(|a| a.etag)
        .expect("the poll has an ETag");
    println!(
        "slap-gateway vs the leader direct, 3 replicas, {} s per point, kept-alive connections unless said\n",
        args.seconds
    );
    println!("| call | clients | leader direct | p50 / p99 | gateway | p50 / p99 | gateway / direct |");
    println!("|---|---:|---:|---|---:|---|---:|");
    let poll = |id: &'static str| -> Call {
        let q = format!("computer_id={id}");
        Arc::new(move |c: &mut Conn, _| ok(c.call("GET", "/getFullComputerInformation", &q, &[]), 200))
    };
    let poll_new_connection = |id: &'static str| -> Call {
        let q = format!("computer_id={id}");
        Arc::new(move |c: &mut Conn, _| {
            let r = ok(
                c.call("GET", "/getFullComputerInformation", &q, &[("Connection", "close")]),
                200,
            );
            c.reader = None;
            r
        })
    };
    let revalidate: Call = {
        let etag = etag.clone();
        Arc::new(move |c: &mut Conn, _| {
            ok(
                c.call(
                    "GET",
                    "/getFullComputerInformation",
                    "computer_id=COMP-1",
                    &[("If-None-Match", &etag)],
                ),
                304,
            )
        })
    };
    let rerequest: Call = Arc::new(|c: &mut Conn, n| {
        let f = request_form(SR, &format!("inst{}", n % 50), "v", Some("COMP-1"));
        ok(c.call("POST", "/requestComputerPartition", &f, &[]), 200)
    });
    let allocate = |path: &'static str| -> Call {
        Arc::new(move |c: &mut Conn, n| {
            let computer = format!("COMP-2-{}", n % 20);
            let f = request_form(SR, &format!("new-{path}-{n}"), "v", Some(&computer));
            ok(c.call("POST", "/requestComputerPartition", &f, &[]), 200)
        })
    };
    let rows: Vec<(&str, Call, Call)> = vec![
        (
            "getFullComputerInformation (100 partitions, 50 busy)",
            poll("COMP-1"),
            poll("COMP-1"),
        ),
        (
            "getFullComputerInformation (3 partitions, 3 busy)",
            poll("COMP-3"),
            poll("COMP-3"),
        ),
        (
            "getFullComputerInformation (100 partitions), new connection per call",
            poll_new_connection("COMP-1"),
            poll_new_connection("COMP-1"),
        ),
        (
            "getFullComputerInformation, If-None-Match (304)",
            revalidate.clone(),
            revalidate,
        ),
        (
            "requestComputerPartition, identical re-request",
            rerequest.clone(),
            rerequest,
        ),
        (
            "requestComputerPartition, new allocation",
            allocate("direct"),
            allocate("gateway"),
        ),
    ];
    let only = args.rows.clone();
    for (name, direct_call, gateway_call) in rows {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        for clients in [1usize, 8] {
            let d = direct_call.clone();
            let direct = measure(clients, args.seconds, leader, move |c, n| d(c, n));
            let g = gateway_call.clone();
            let through = measure(clients, args.seconds, gw, move |c, n| g(c, n));
            println!(
                "| {name} | {clients} | {:.0}/s | {:.2} / {:.2} ms | {:.0}/s | {:.2} / {:.2} ms | {:.2}x |",
                direct.0,
                direct.1,
                direct.2,
                through.0,
                through.1,
                through.2,
                through.0 / direct.0
            );
        }
    }
    if only.is_some() {
        return;
    }
    followers_serving(&cluster, args.seconds, allocate("writers"));
    if args.watches > 0 {
        hold_watches(&cluster, args.watches);
    }
}

/// Full-document polls forwarded by a gateway (no document cache): to the
/// leader only (`--edge-staleness-ms 0`: no feed, so no follower may
/// serve) vs spread over all replicas (the feed's revision as the floor),
/// idle and while 4 clients allocate new instances through the main
/// gateway.
fn followers_serving(cluster: &Cluster, secs: u64, write: Call) {
    let (_leader_only, leader_only) = support::start_gateway(&cluster.slap_ports, &["--edge-staleness-ms", "0"]);
    let (_spread, spread) = support::start_gateway(&cluster.slap_ports, &["--edge-cache-mib", "0"]);
    // The spreading gateway's feed confirms within a second.
    std::thread::sleep(Duration::from_secs(2));
    println!("\nFull-document polls (100 partitions) forwarded, no document cache, 8 clients:\n");
    println!("| load | leader only | p50 / p99 | any replica | p50 / p99 | any / leader only |");
    println!("|---|---:|---|---:|---|---:|");
    let poll = |c: &mut Conn, _| {
        ok(
            c.call("GET", "/getFullComputerInformation", "computer_id=COMP-1", &[]),
            200,
        )
    };
    for writing in [false, true] {
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..if writing { 4 } else { 0 })
            .map(|_| {
                let (write, stop, gw) = (write.clone(), stop.clone(), cluster.gateway_port);
                std::thread::spawn(move || {
                    let mut conn = Conn::new(gw);
                    let mut n = 1_000_000u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        assert!(write(&mut conn, n), "a write failed");
                    }
                })
            })
            .collect();
        let only = measure(8, secs, leader_only, poll);
        let any = measure(8, secs, spread, poll);
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        println!(
            "| {} | {:.0}/s | {:.2} / {:.2} ms | {:.0}/s | {:.2} / {:.2} ms | {:.2}x |",
            if writing { "4 clients allocating" } else { "idle" },
            only.0,
            only.1,
            only.2,
            any.0,
            any.1,
            any.2,
            any.0 / only.0
        );
    }
    println!("  any-replica gateway: {}", spread_line(spread));
}

/// The spreading gateway's counters of polls sent in turn and retried.
fn spread_line(port: u16) -> String {
    metrics_page(port)
        .lines()
        .filter(|l| l.starts_with("slap_gateway_spread_total") || l.starts_with("slap_gateway_retries_total"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Holds `n` long polls open through the gateway (one connection each, on
/// `n` computers), prints the gateway's RSS while they are held, then
/// changes every watched computer and counts the polls that answered.
fn hold_watches(cluster: &Cluster, n: usize) {
    let gw = cluster.gateway_port;
    println!();
    let before = rss_mib(cluster.gateway.pid());
    // One computer per watch, each with one partition: a node's watch.
    let t = Instant::now();
    let mut etags = Vec::with_capacity(n);
    let mut c = Conn::new(gw);
    for i in 0..n {
        let id = format!("WATCH-{i}");
        register(&mut c, &id, 1);
        let a = c
            .call("GET", "/getFullComputerInformation", &format!("computer_id={id}"), &[])
            .expect("poll");
        etags.push(a.etag.expect("an ETag"));
    }
    let registered = t.elapsed();
    // Open every watch: the request goes out, the answer is read later.
    let mut held = Vec::with_capacity(n);
    for (i, etag) in etags.iter().enumerate() {
        let s = TcpStream::connect(("127.0.0.1", gw)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut w = &s;
        write!(
            w,
            "GET /getFullComputerInformation?computer_id=WATCH-{i} HTTP/1.1\r\nHost: 127.0.0.1\r\nIf-None-Match: {etag}\r\nX-Slap-Wait: 25\r\n\r\n"
        )
        .unwrap();
        held.push(BufReader::new(s));
    }
    std::thread::sleep(Duration::from_secs(3));
    let rss = rss_mib(cluster.gateway.pid());
    println!(
        "{n} long polls held through the gateway: gateway RSS {rss:.0} MiB (before: {before:.0} MiB; {:.1} KiB per watch); computers registered in {:.1} s",
        (rss - before) * 1024.0 / n as f64,
        registered.as_secs_f64()
    );
    // Change the first 100 watched computers: their polls must answer 200.
    let changed = n.min(100);
    for i in 0..changed {
        let f = form(&[
            ("computer_id", &format!("WATCH-{i}")),
            ("url", SR),
            ("state", "available"),
        ]);
        assert!(ok(c.call("POST", "/supplySupply", &f, &[]), 200));
    }
    let t = Instant::now();
    let answered = held[..changed]
        .iter_mut()
        .map(|r| read_answer(r).is_some_and(|a| a.status == 200))
        .filter(|answered| *answered)
        .count();
    println!(
        "{answered} of {changed} changed computers' held polls answered 200 within {:.2} s",
        t.elapsed().as_secs_f64()
    );
    // Who answered: the gateway itself (its revision feed) or a replica.
    for line in metrics_page(gw).lines().filter(|l| l.starts_with("slap_gateway_edge_")) {
        println!("  {line}");
    }
}

/// The gateway's /metrics page.
fn metrics_page(port: u16) -> String {
    let mut page = String::new();
    if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
        let _ = write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        );
        let _ = s.read_to_string(&mut page);
    }
    page
}
