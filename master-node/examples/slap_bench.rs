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

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use slap_proto::form::encode;
use slap_proto::marshal::{dumps, Value};

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

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 call on a new connection; the status.
fn http(port: u16, method: &str, path: &str, form: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_nodelay(true).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    if method == "GET" {
        write!(
            s,
            "GET {path}?{form} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
    } else {
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        )
        .ok()?;
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let head = String::from_utf8_lossy(&raw[..raw.len().min(32)]).to_string();
    head.split(' ').nth(1)?.parse().ok()
}

fn form(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn computer_xml(reference: &str, partitions: usize) -> String {
    let s = |v: &str| Value::str(v);
    let parts = (0..partitions)
        .map(|i| {
            Value::str_dict(vec![
                ("reference", s(&format!("slappart{i}"))),
                ("path", s(&format!("/srv/slapgrid/slappart{i}"))),
                (
                    "address_list",
                    Value::List(vec![
                        Value::str_dict(vec![
                            ("addr", s(&format!("10.0.{}.{}", i / 250, i % 250 + 1))),
                            ("netmask", s("255.255.255.255")),
                        ]),
                        Value::str_dict(vec![
                            ("addr", s(&format!("fd00::{i:x}"))),
                            ("netmask", s("ffff:ffff:ffff:ffff::")),
                        ]),
                    ]),
                ),
                ("tap", Value::str_dict(vec![("name", s(&format!("slaptap{i}")))])),
                ("user", Value::str_dict(vec![("name", s(&format!("slapuser{i}")))])),
            ])
        })
        .collect();
    dumps(&Value::str_dict(vec![
        ("reference", s(reference)),
        ("address", s("10.0.0.1")),
        ("netmask", s("255.255.255.0")),
        ("partition_list", Value::List(parts)),
    ]))
    .unwrap()
}

/// A request of `title` on `computer` (an SLA both systems honour, so each
/// allocation lands on the computer the measurement is about).
fn request_form(title: &str, value: &str, computer: &str) -> String {
    let params = dumps(&Value::str_dict(vec![
        ("foo", Value::str(value)),
        ("bar", Value::str("a<b&c")),
    ]))
    .unwrap();
    form(&[
        ("software_release", SR),
        ("partition_reference", title),
        ("partition_parameter_xml", &params),
        (
            "filter_xml",
            &dumps(&Value::str_dict(vec![("computer_guid", Value::str(computer))])).unwrap(),
        ),
        ("software_type", "default"),
        ("state", "<marshal><none/></marshal>"),
        ("shared_xml", "<marshal><bool>0</bool></marshal>"),
    ])
}

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

fn wait_up(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while http(port, "GET", "/getHateoasUrl", "").is_none() {
        assert!(Instant::now() < deadline, "port {port} never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
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

fn start_master(dir: &Path) -> (Proc, u16) {
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("master-node");
    let port = free_port();
    let child = Command::new(bin)
        .args(["init", "--data-dir"])
        .arg(dir.join("master"))
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--slap-listen",
            &format!("127.0.0.1:{port}"),
            "--insecure-http",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start master-node (cargo build -p master-node first)");
    wait_up(port);
    (Proc(child), port)
}

/// Three replicas serving SLAP (data under `dir/<name>-N`), and
/// slap-gateway in front of them: the processes, the gateway's port and the
/// first replica's SLAP port (the founder, which leads unless it is lost).
fn start_cluster_with_gateway(dir: &Path, name: &str) -> (Vec<Proc>, u16, u16) {
    let bin_dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let bin = bin_dir.join("master-node");
    let raft: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let slap: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut procs = Vec::new();
    for i in 0..3 {
        let data = dir.join(format!("{name}-{i}"));
        let mut cmd = Command::new(&bin);
        if i == 0 {
            cmd.arg("init");
        } else {
            let token = std::fs::read_to_string(dir.join(format!("{name}-0/join-token"))).unwrap();
            cmd.args(["join", "--peer", &raft[0], "--token", token.trim()]);
        }
        cmd.arg("--data-dir").arg(&data);
        cmd.args([
            "--listen",
            &raft[i],
            "--slap-listen",
            &format!("127.0.0.1:{}", slap[i]),
            "--insecure-http",
        ]);
        procs.push(Proc(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start master-node"),
        ));
        // Each replica is up (and, for joiners, promoted) before the next.
        wait_up(slap[i]);
        if i == 0 {
            let token = dir.join(format!("{name}-0/join-token"));
            let deadline = Instant::now() + Duration::from_secs(30);
            while !token.exists() {
                assert!(Instant::now() < deadline, "no join token");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let gw_port = free_port();
    let list = slap
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let gateway = Command::new(bin_dir.join("slap-gateway"))
        .args(["--replicas", &list, "--listen", &format!("127.0.0.1:{gw_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start slap-gateway (cargo build --workspace)");
    procs.push(Proc(gateway));
    wait_up(gw_port);
    (procs, gw_port, slap[0])
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
            &request_form(title, "v", computer)
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
                &request_form(&format!("inst{}", n % 50), "v", "COMP-1"),
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
        let (_procs, port, _) = start_cluster_with_gateway(dir.path(), "cluster");
        measure(port, args.seconds)
    };
    // Where the gateway's figures go: the same calls on a fresh 3-replica
    // cluster, straight to its leader.
    let leader = {
        let (_procs, _, leader) = start_cluster_with_gateway(dir.path(), "leader");
        measure(leader, args.seconds)
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
