//! SLAP over HTTP: master-node next to slapproxy (`slapos proxy start`, the
//! reference SlapOS mini-master), same data, same calls, same run.
//!
//! Both get the same HTTP requests (a new connection per call, as raw
//! HTTP/1.1): `loadComputerConfigurationFromXML` with 200 partitions (and then
//! 100), `requestComputerPartition` for 50 new instances, re-requests of an
//! existing instance, and `getFullComputerInformation` of the 100-partition
//! computer with 50 busy, at 1 and 8 concurrent clients.
//!
//! ```text
//! scripts/setup.sh   # installs the slapos client (with slapproxy)
//! cargo build -p master-node && cargo run -p master-node --example slap_bench -- --seconds 5
//! ```
//!
//! master-node is measured twice: one replica answering directly, and three
//! replicas behind slap-gateway (what the targets are about).

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

fn computer_xml(partitions: usize) -> String {
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
        ("reference", s("COMP-1")),
        ("address", s("10.0.0.1")),
        ("netmask", s("255.255.255.0")),
        ("partition_list", Value::List(parts)),
    ]))
    .unwrap()
}

fn request_form(title: &str, value: &str) -> String {
    let params = dumps(&Value::str_dict(vec![
        ("foo", Value::str(value)),
        ("bar", Value::str("a<b&c")),
    ]))
    .unwrap();
    form(&[
        ("software_release", SR),
        ("partition_reference", title),
        ("partition_parameter_xml", &params),
        ("filter_xml", "<marshal><dictionary id=\"i2\"/></marshal>"),
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

/// Three replicas serving SLAP, and slap-gateway in front of them.
fn start_cluster_with_gateway(dir: &Path) -> (Vec<Proc>, u16) {
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
        let data = dir.join(format!("cluster-{i}"));
        let mut cmd = Command::new(&bin);
        if i == 0 {
            cmd.arg("init");
        } else {
            let token = std::fs::read_to_string(dir.join("cluster-0/join-token")).unwrap();
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
            let token = dir.join("cluster-0/join-token");
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
    (procs, gw_port)
}

struct Figures {
    load_200: f64,
    allocations: f64,
    rerequest: [f64; 2],
    poll: [f64; 2],
}

fn measure(port: u16, secs: u64) -> Figures {
    // loadComputerConfigurationFromXML with 200 partitions: seconds per call.
    let t = Instant::now();
    assert_eq!(
        http(
            port,
            "POST",
            "/loadComputerConfigurationFromXML",
            &form(&[("xml", &computer_xml(200))])
        ),
        Some(200)
    );
    let load_200 = t.elapsed().as_secs_f64();
    // Back to 100 partitions for the rest.
    assert_eq!(
        http(
            port,
            "POST",
            "/loadComputerConfigurationFromXML",
            &form(&[("xml", &computer_xml(100))])
        ),
        Some(200)
    );
    assert_eq!(
        http(
            port,
            "POST",
            "/supplySupply",
            &form(&[("url", SR), ("computer_id", "COMP-1"), ("state", "available")])
        ),
        Some(200)
    );
    // 50 new allocations, one at a time.
    let t = Instant::now();
    for i in 0..50 {
        assert_eq!(
            http(
                port,
                "POST",
                "/requestComputerPartition",
                &request_form(&format!("inst{i}"), "v")
            ),
            Some(200)
        );
    }
    let allocations = 50.0 / t.elapsed().as_secs_f64();
    let mut rerequest = [0.0; 2];
    let mut poll = [0.0; 2];
    for (slot, clients) in [1usize, 8].into_iter().enumerate() {
        // Identical re-requests of an existing instance.
        rerequest[slot] = rate(clients, secs, move |n| {
            http(
                port,
                "POST",
                "/requestComputerPartition",
                &request_form(&format!("inst{}", n % 50), "v"),
            ) == Some(200)
        });
        poll[slot] = rate(clients, secs, move |_| {
            http(port, "GET", "/getFullComputerInformation", "computer_id=COMP-1") == Some(200)
        });
    }
    Figures {
        load_200,
        allocations,
        rerequest,
        poll,
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
        "SLAP benchmark: {} s per point, 100 partitions with 50 busy",
        args.seconds
    );

    // One system at a time on the machine.
    let ours = {
        let (_m, port) = start_master(dir.path());
        measure(port, args.seconds)
    };
    let cluster = {
        let (_procs, port) = start_cluster_with_gateway(dir.path());
        measure(port, args.seconds)
    };
    let theirs = {
        let (_p, port) = start_slapproxy(&args.slapos, dir.path());
        measure(port, args.seconds)
    };
    println!();
    println!("| call | clients | 1 replica, direct | 3 replicas + gateway | slapproxy | direct / slapproxy | gateway / slapproxy |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let row = |name: &str, clients: &str, a: f64, g: f64, b: f64| {
        println!(
            "| {name} | {clients} | {a:.1}/s | {g:.1}/s | {b:.1}/s | {:.1}x | {:.1}x |",
            a / b,
            g / b
        );
    };
    row(
        "getFullComputerInformation (100 partitions, 50 busy)",
        "1",
        ours.poll[0],
        cluster.poll[0],
        theirs.poll[0],
    );
    row(
        "getFullComputerInformation (100 partitions, 50 busy)",
        "8",
        ours.poll[1],
        cluster.poll[1],
        theirs.poll[1],
    );
    row(
        "requestComputerPartition, identical re-request",
        "1",
        ours.rerequest[0],
        cluster.rerequest[0],
        theirs.rerequest[0],
    );
    row(
        "requestComputerPartition, identical re-request",
        "8",
        ours.rerequest[1],
        cluster.rerequest[1],
        theirs.rerequest[1],
    );
    row(
        "requestComputerPartition, new allocation",
        "1",
        ours.allocations,
        cluster.allocations,
        theirs.allocations,
    );
    println!(
        "| loadComputerConfigurationFromXML, 200 partitions | 1 | {:.3} s | {:.3} s | {:.3} s | {:.1}x | {:.1}x |",
        ours.load_200,
        cluster.load_200,
        theirs.load_200,
        theirs.load_200 / ours.load_200,
        theirs.load_200 / cluster.load_200
    );
}
