//! What the SLAP benchmarks share: starting the built binaries (a Master of
//! one or three replicas, slap-gateway in front), one-shot HTTP calls, and
//! process figures (CPU, RSS). Each benchmark includes this module with
//! `#[path = "support/mod.rs"] mod support;`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use slap_proto::marshal::{dumps, Value};

/// A child process, killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where the binaries built beside this example are.
pub fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// One HTTP/1.1 call on a new connection; the status.
pub fn http(port: u16, method: &str, path: &str, form: &str) -> Option<u16> {
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

/// The flags that lift per-caller rate limits (a benchmark makes thousands
/// of calls per second from one address), if `bin` knows them (an earlier
/// build compared in the same run may not).
pub fn unlimited(bin: &Path) -> Vec<&'static str> {
    let help = Command::new(bin).args(["run", "--help"]).output();
    let knows = help.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--rate-limit"));
    if knows {
        vec!["--rate-limit", "0"]
    } else {
        vec![]
    }
}

/// Waits until `port` answers SLAP.
pub fn wait_up(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while http(port, "GET", "/getHateoasUrl", "").is_none() {
        assert!(Instant::now() < deadline, "port {port} never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One replica serving SLAP over plain HTTP (data under `dir/master`): the
/// process and its SLAP port.
pub fn start_master(dir: &Path) -> (Proc, u16) {
    let port = free_port();
    let bin = bin_dir().join("master-node");
    let child = Command::new(&bin)
        .args(["init", "--data-dir"])
        .arg(dir.join("master"))
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--slap-listen",
            &format!("127.0.0.1:{port}"),
            "--insecure-http",
        ])
        .args(unlimited(&bin))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start master-node (cargo build -p master-node first)");
    wait_up(port);
    (Proc(child), port)
}

/// A three-replica cluster behind slap-gateway.
pub struct Cluster {
    /// The replicas, founder first.
    pub replicas: Vec<Proc>,
    pub gateway: Proc,
    /// The gateway's port.
    pub gateway_port: u16,
    /// The founder's SLAP port (it leads unless it is lost).
    pub leader_port: u16,
    /// Every replica's SLAP port, founder first.
    pub slap_ports: Vec<u16>,
}

/// Three replicas serving SLAP over plain HTTP (data under `dir/<name>-N`,
/// logs beside), and slap-gateway in front of them.
pub fn start_cluster_with_gateway(dir: &Path, name: &str) -> Cluster {
    start_cluster_of(&bin_dir().join("master-node"), dir, name)
}

/// [`start_cluster_with_gateway`] with the replicas run from `bin` (an
/// earlier build, to compare in the same run).
pub fn start_cluster_of(bin: &Path, dir: &Path, name: &str) -> Cluster {
    let raft: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let slap: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut replicas = Vec::new();
    for i in 0..3 {
        let data = dir.join(format!("{name}-{i}"));
        let mut cmd = Command::new(bin);
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
        cmd.args(unlimited(bin));
        let log = std::fs::File::create(dir.join(format!("{name}-{i}.log"))).unwrap();
        replicas.push(Proc(
            cmd.stdout(Stdio::null())
                .stderr(log)
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
    let (gateway, gateway_port) = start_gateway(&slap, &[]);
    Cluster {
        replicas,
        gateway,
        gateway_port,
        leader_port: slap[0],
        slap_ports: slap,
    }
}

/// slap-gateway (no rate limit) in front of the replicas serving SLAP on
/// `slap` ports, with `extra` arguments: it and its port, once it answers.
pub fn start_gateway(slap: &[u16], extra: &[&str]) -> (Proc, u16) {
    let gateway_port = free_port();
    let list = slap
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let gateway = Command::new(bin_dir().join("slap-gateway"))
        .args(["--replicas", &list, "--listen", &format!("127.0.0.1:{gateway_port}")])
        .args(["--rate-limit", "0"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start slap-gateway (cargo build --workspace)");
    let gateway = Proc(gateway);
    wait_up(gateway_port);
    (gateway, gateway_port)
}

/// User + system CPU time of a process, in seconds (USER_HZ is 100).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Resident memory of a process, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// The `p` quantile (0..=1) of sorted latencies, in milliseconds.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// A form body (`application/x-www-form-urlencoded`).
pub fn form(fields: &[(&str, &str)]) -> String {
    slap_proto::form::encode_fields(fields)
}

/// The `loadComputerConfigurationFromXML` document of a computer with
/// `partitions` partitions, as `slapos node format` sends it.
pub fn computer_xml(reference: &str, partitions: usize) -> String {
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

/// A `requestComputerPartition` form for `title` of release `sr`; with
/// `computer`, an SLA naming it (which slapproxy honours too, so each
/// allocation lands on the computer a measurement is about).
pub fn request_form(sr: &str, title: &str, value: &str, computer: Option<&str>) -> String {
    let params = dumps(&Value::str_dict(vec![
        ("foo", Value::str(value)),
        ("bar", Value::str("a<b&c")),
    ]))
    .unwrap();
    let sla = match computer {
        Some(c) => dumps(&Value::str_dict(vec![("computer_guid", Value::str(c))])).unwrap(),
        None => dumps(&Value::str_dict(vec![])).unwrap(),
    };
    form(&[
        ("software_release", sr),
        ("partition_reference", title),
        ("partition_parameter_xml", &params),
        ("filter_xml", &sla),
        ("software_type", "default"),
        ("state", "<marshal><none/></marshal>"),
        ("shared_xml", "<marshal><bool>0</bool></marshal>"),
    ])
}
