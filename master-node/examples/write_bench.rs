//! Committed writes on a 3-replica Master next to a 3-member etcd, same run.
//!
//! Each system runs alone on the machine, one after the other in the same run.
//! For each concurrency (closed loop: every client sends its next write when
//! the previous one is answered), both get the same workload for the same
//! time: requestComputerPartition-sized writes (a re-request of one of 50
//! titles per client with new parameters, about 600 bytes encoded) on the
//! Master, puts of values of the same size on etcd. Clients spread over the
//! three members (followers forward to the leader in both systems). Reported:
//! writes per second, p50 and p99 latency, and server CPU milliseconds per
//! committed write (user + system time of the three server processes).
//!
//! Then leader failover: SIGKILL the leader, measure the time until the
//! first write succeeds (clients retry on the survivors, 300 ms per attempt),
//! restart the killed member, repeat.
//!
//! ```text
//! cargo build -p master-node && cargo run -p master-node --example write_bench -- \
//!     --clients 1,64,512 --seconds 10 --failovers 10
//! ```
//! etcd comes from Debian's `etcd-server` (`--etcd /usr/bin/etcd`); `--no-etcd` skips it.
//! etcd runs twice: in plaintext, and with mutual TLS on its client and peer
//! ports (certificates from a CA made for the run), which is what the
//! Master's cluster port always is; the ratios are given against both.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use master_node::api::ClientWrite;
use master_node::client::{Client, Credentials};
use master_node::state::{Command as MasterCommand, Params, PartitionSpec, RequestOrigin, RequestSpec, SupplyState};
use slap_proto::cluster::cluster_client::ClusterClient;
use tonic::transport::Channel;

mod etcd {
    #![allow(clippy::all)]
    tonic::include_proto!("etcdserverpb");
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "1,64,512")]
    clients: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 10)]
    failovers: usize,
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd: PathBuf,
    #[arg(long)]
    no_etcd: bool,
    /// Send every Master client to the leader (no forwarding hop), to
    /// separate the cost of forwarding from the rest.
    #[arg(long)]
    leader_only: bool,
    /// Where data dirs go (the disk being measured).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// The master-node binary to measure (default: the one built beside this
    /// example), e.g. a copy of an earlier build for a same-run comparison.
    #[arg(long)]
    master_bin: Option<PathBuf>,
}

const SR: &str = "https://lab.example.org/software/kvm/software.cfg";
const TITLES_PER_CLIENT: u64 = 50;
/// How long one write attempt may take during failover before the client
/// tries the next survivor (the same for both systems).
const ATTEMPT: Duration = Duration::from_millis(300);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// User + system CPU time of a process, in milliseconds (USER_HZ is 100).
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks * 10.0
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

struct Member {
    child: Option<Child>,
    args: Vec<String>,
    bin: PathBuf,
    addr: String,
    log: PathBuf,
}

impl Member {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(&self.bin)
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start member"),
        );
    }
    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Outcome of one load point.
struct Point {
    writes_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_ms_per_write: f64,
}

fn summarize(mut lat: Vec<Duration>, secs: f64, cpu: f64) -> Point {
    lat.sort();
    let n = lat.len().max(1) as f64;
    Point {
        writes_per_s: lat.len() as f64 / secs,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        cpu_ms_per_write: cpu / n,
    }
}

// ----- the Master ---------------------------------------------------------

struct Master {
    members: Vec<Member>,
    /// The administrator's certificate init wrote (the cluster port is mTLS).
    admin: Credentials,
}

/// A plain (no TLS) gRPC channel, as etcd's clients use here.
fn plain_channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .connect_lazy()
}

fn master_request(client: usize, n: u64) -> MasterCommand {
    let mut parameters = Params::new();
    for k in 0..8 {
        parameters.insert(
            format!("parameter-{k}"),
            format!("value {n} of client {client}, field {k}: {}", "x".repeat(30)),
        );
    }
    MasterCommand::Request(RequestSpec {
        requester: RequestOrigin::User(format!("user-{client}")),
        title: format!("instance-{}", n % TITLES_PER_CLIENT),
        software_release: SR.into(),
        software_type: "default".into(),
        parameters,
        sla: Params::new(),
        shared: false,
        state: None,
    })
}

impl Master {
    async fn start(bin: &Path, base: &Path) -> Master {
        let mut members = Vec::new();
        let dir = |i: usize| base.join(format!("master-{i}"));
        let mut first = Member {
            child: None,
            args: vec![],
            bin: bin.into(),
            addr: format!("127.0.0.1:{}", free_port()),
            log: base.join("master-1.log"),
        };
        first.args = vec![
            "init".into(),
            "--data-dir".into(),
            dir(1).display().to_string(),
            "--listen".into(),
            first.addr.clone(),
        ];
        first.start();
        let token_file = dir(1).join("join-token");
        wait(|| token_file.exists()).await;
        let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
        let admin = Credentials::admin_of(&dir(1)).unwrap();
        let peer = first.addr.clone();
        members.push(first);
        for i in 2..=3 {
            let mut m = Member {
                child: None,
                args: vec![],
                bin: bin.into(),
                addr: format!("127.0.0.1:{}", free_port()),
                log: base.join(format!("master-{i}.log")),
            };
            m.args = vec![
                "join".into(),
                "--peer".into(),
                peer.clone(),
                "--token".into(),
                token.clone(),
                "--data-dir".into(),
                dir(i).display().to_string(),
                "--listen".into(),
                m.addr.clone(),
            ];
            m.start();
            let want = i;
            let p = peer.clone();
            wait_async(|| {
                let (p, admin) = (p.clone(), admin.clone());
                async move {
                    Client::status_of(&p, &admin)
                        .await
                        .is_ok_and(|s| s.members.iter().filter(|m| m.role == "voter").count() == want)
                }
            })
            .await;
            // Later restarts use `run`.
            m.args = vec!["run".into(), "--data-dir".into(), dir(i).display().to_string()];
            members.push(m);
        }
        members[0].args = vec!["run".into(), "--data-dir".into(), dir(1).display().to_string()];
        let master = Master { members, admin };
        let c = Client::new(&master.addrs(), &master.admin).unwrap();
        c.write(MasterCommand::SetComputer {
            id: "COMP-1".into(),
            address: "10.0.0.1".into(),
            netmask: "255.255.255.0".into(),
            capacity: Params::new(),
            categories: Params::new(),
            partitions: (0..100)
                .map(|i| PartitionSpec {
                    id: format!("slappart{i}"),
                    addresses: vec![],
                    tap: None,
                    user: None,
                    capabilities: vec![],
                })
                .collect(),
        })
        .await
        .unwrap();
        c.write(MasterCommand::Supply {
            computer: "COMP-1".into(),
            url: SR.into(),
            state: SupplyState::Available,
        })
        .await
        .unwrap();
        master
    }

    fn addrs(&self) -> Vec<String> {
        self.members.iter().map(|m| m.addr.clone()).collect()
    }

    async fn load(&self, clients: usize, secs: u64, leader_only: bool) -> Point {
        let addrs = if leader_only {
            vec![self.members[self.leader().await].addr.clone()]
        } else {
            self.addrs()
        };
        let channels: Vec<ClusterClient<Channel>> = addrs
            .iter()
            .map(|a| ClusterClient::new(self.admin.channel(a).unwrap()))
            .collect();
        let cpu0: f64 = self.members.iter().map(|m| cpu_ms(m.pid())).sum();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for c in 0..clients {
            let mut ch = channels[c % channels.len()].clone();
            tasks.push(tokio::spawn(async move {
                let client_id = format!("bench-{c}-{}", rand_suffix());
                let mut lat = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let write = ClientWrite {
                        request_id: Some(master_node::state::RequestId {
                            client: client_id.clone(),
                            seq: n,
                        }),
                        command: master_request(c, n),
                    };
                    let bytes = postcard::to_allocvec(&write).unwrap();
                    let t = Instant::now();
                    if ch
                        .write(slap_proto::cluster::WriteRequest {
                            proposal: bytes,
                            token: String::new(),
                        })
                        .await
                        .is_ok()
                    {
                        lat.push(t.elapsed());
                    }
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        let elapsed = start.elapsed().as_secs_f64();
        let cpu1: f64 = self.members.iter().map(|m| cpu_ms(m.pid())).sum();
        summarize(lat, elapsed, cpu1 - cpu0)
    }

    async fn leader(&self) -> usize {
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_some() {
                    if let Ok(s) = Client::status_of(&m.addr, &self.admin).await {
                        if s.state == "Leader" {
                            return i;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn failover(&mut self) -> Duration {
        let leader = self.leader().await;
        let survivors: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != leader)
            .map(|(_, m)| m.addr.clone())
            .collect();
        let chans: Vec<ClusterClient<Channel>> = survivors
            .iter()
            .map(|a| ClusterClient::new(self.admin.channel(a).unwrap()))
            .collect();
        let client_id = format!("failover-{}", rand_suffix());
        self.members[leader].kill();
        let t0 = Instant::now();
        let mut i = 0usize;
        loop {
            i += 1;
            let write = ClientWrite {
                request_id: Some(master_node::state::RequestId {
                    client: client_id.clone(),
                    seq: i as u64,
                }),
                command: master_request(9999, i as u64),
            };
            let mut ch = chans[i % chans.len()].clone();
            let req = slap_proto::cluster::WriteRequest {
                proposal: postcard::to_allocvec(&write).unwrap(),
                token: String::new(),
            };
            if let Ok(Ok(_)) = tokio::time::timeout(ATTEMPT, ch.write(req)).await {
                break;
            }
        }
        let took = t0.elapsed();
        self.members[leader].start();
        let addr = self.members[leader].addr.clone();
        wait_async(|| {
            let (a, admin) = (addr.clone(), self.admin.clone());
            async move { Client::status_of(&a, &admin).await.is_ok_and(|s| s.leader_id.is_some()) }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        took
    }
}

// ----- etcd -----------------------------------------------------------------

struct Etcd {
    members: Vec<Member>,
    /// How clients reach it over TLS, when it serves TLS.
    tls: Option<tonic::transport::ClientTlsConfig>,
}

/// Certificates for an etcd cluster with mutual TLS: a CA made for the run,
/// one certificate (server and client) for every member and for the clients.
struct EtcdTls {
    files: Vec<String>,
    client: tonic::transport::ClientTlsConfig,
}

impl EtcdTls {
    fn make(dir: &Path) -> EtcdTls {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(vec![]).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).unwrap();
        let path = |name: &str| dir.join(name).display().to_string();
        std::fs::write(path("etcd-ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(path("etcd.pem"), cert.pem()).unwrap();
        std::fs::write(path("etcd.key"), key.serialize_pem()).unwrap();
        let files = [
            ("--cert-file", "etcd.pem"),
            ("--key-file", "etcd.key"),
            ("--trusted-ca-file", "etcd-ca.pem"),
            ("--peer-cert-file", "etcd.pem"),
            ("--peer-key-file", "etcd.key"),
            ("--peer-trusted-ca-file", "etcd-ca.pem"),
        ]
        .iter()
        .flat_map(|(flag, file)| [flag.to_string(), path(file)])
        .chain(["--client-cert-auth".to_string(), "--peer-client-cert-auth".to_string()])
        .collect();
        let client = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca_cert.pem()))
            .identity(tonic::transport::Identity::from_pem(cert.pem(), key.serialize_pem()))
            .domain_name("localhost");
        EtcdTls { files, client }
    }
}

impl Etcd {
    async fn start(bin: &Path, base: &Path, tls: Option<&EtcdTls>) -> Etcd {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let peers: Vec<(String, u16, u16)> = (1..=3).map(|i| (format!("e{i}"), free_port(), free_port())).collect();
        let cluster = peers
            .iter()
            .map(|(n, _, p)| format!("{n}={scheme}://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        let run = if tls.is_some() { "etcd-tls" } else { "etcd" };
        for (name, client, peer) in &peers {
            let mut args: Vec<String> = vec![
                "--name".into(),
                name.clone(),
                "--data-dir".into(),
                base.join(format!("{run}-{name}")).display().to_string(),
                "--listen-client-urls".into(),
                format!("{scheme}://127.0.0.1:{client}"),
                "--advertise-client-urls".into(),
                format!("{scheme}://127.0.0.1:{client}"),
                "--listen-peer-urls".into(),
                format!("{scheme}://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls".into(),
                format!("{scheme}://127.0.0.1:{peer}"),
                "--initial-cluster".into(),
                cluster.clone(),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                "bench".into(),
                "--log-level".into(),
                "error".into(),
            ];
            args.extend(tls.iter().flat_map(|t| t.files.clone()));
            let mut m = Member {
                child: None,
                args,
                bin: bin.into(),
                addr: format!("127.0.0.1:{client}"),
                log: base.join(format!("{run}-{name}.log")),
            };
            m.start();
            members.push(m);
        }
        let etcd = Etcd {
            members,
            tls: tls.map(|t| t.client.clone()),
        };
        let ch = etcd.channel(&etcd.members[0].addr);
        wait_async(|| {
            let ch = ch.clone();
            async move { etcd_status(ch).await.is_some_and(|s| s.leader != 0) }
        })
        .await;
        etcd
    }

    /// A channel to one member, with TLS when etcd serves it.
    fn channel(&self, addr: &str) -> Channel {
        match &self.tls {
            None => plain_channel(addr),
            Some(tls) => tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(tls.clone())
                .unwrap()
                .connect_timeout(Duration::from_millis(500))
                .tcp_nodelay(true)
                .connect_lazy(),
        }
    }

    async fn load(&self, clients: usize, secs: u64, value_len: usize) -> Point {
        let channels: Vec<etcd::kv_client::KvClient<Channel>> = self
            .members
            .iter()
            .map(|m| etcd::kv_client::KvClient::new(self.channel(&m.addr)))
            .collect();
        let cpu0: f64 = self.members.iter().map(|m| cpu_ms(m.pid())).sum();
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for c in 0..clients {
            let mut ch = channels[c % channels.len()].clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let req = etcd::PutRequest {
                        key: format!("user-{c}/instance-{}", n % TITLES_PER_CLIENT).into_bytes(),
                        value: vec![b'v'; value_len],
                        ..Default::default()
                    };
                    let t = Instant::now();
                    if ch.put(req).await.is_ok() {
                        lat.push(t.elapsed());
                    }
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        let elapsed = start.elapsed().as_secs_f64();
        let cpu1: f64 = self.members.iter().map(|m| cpu_ms(m.pid())).sum();
        summarize(lat, elapsed, cpu1 - cpu0)
    }

    async fn failover(&mut self) -> Duration {
        let leader = loop {
            let mut found = None;
            for (i, m) in self.members.iter().enumerate() {
                if let Some(s) = etcd_status(self.channel(&m.addr)).await {
                    if s.leader != 0 && s.header.as_ref().is_some_and(|h| h.member_id == s.leader) {
                        found = Some(i);
                    }
                }
            }
            if let Some(i) = found {
                break i;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let chans: Vec<etcd::kv_client::KvClient<Channel>> = self
            .members
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != leader)
            .map(|(_, m)| etcd::kv_client::KvClient::new(self.channel(&m.addr)))
            .collect();
        self.members[leader].kill();
        let t0 = Instant::now();
        let mut i = 0usize;
        loop {
            i += 1;
            let mut ch = chans[i % chans.len()].clone();
            let req = etcd::PutRequest {
                key: b"failover".to_vec(),
                value: vec![b'v'; 16],
                ..Default::default()
            };
            if let Ok(Ok(_)) = tokio::time::timeout(ATTEMPT, ch.put(req)).await {
                break;
            }
        }
        let took = t0.elapsed();
        self.members[leader].start();
        let ch = self.channel(&self.members[leader].addr);
        wait_async(|| {
            let ch = ch.clone();
            async move { etcd_status(ch).await.is_some_and(|s| s.leader != 0) }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        took
    }
}

async fn etcd_status(channel: Channel) -> Option<etcd::StatusResponse> {
    let mut c = etcd::maintenance_client::MaintenanceClient::new(channel);
    tokio::time::timeout(Duration::from_secs(1), c.status(etcd::StatusRequest {}))
        .await
        .ok()?
        .ok()
        .map(|r| r.into_inner())
}

// ----- helpers ---------------------------------------------------------------

fn rand_suffix() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

async fn wait(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_async<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn median_max(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let med = if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2].as_secs_f64()
    };
    (med, v.last().map(|d| d.as_secs_f64()).unwrap_or(0.0))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let bin = args.master_bin.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("master-node")
    });
    assert!(
        bin.exists(),
        "build the binary first: cargo build -p master-node ({} missing)",
        bin.display()
    );
    let mut base = tempfile::tempdir_in(&args.dir).unwrap();
    if std::env::var_os("BENCH_KEEP").is_some() {
        base.disable_cleanup(true);
    }
    let base = Arc::new(base);
    let value_len = postcard::to_allocvec(&ClientWrite {
        request_id: Some(master_node::state::RequestId {
            client: "bench-0-0".into(),
            seq: 1,
        }),
        command: master_request(0, 1),
    })
    .unwrap()
    .len();
    println!(
        "write benchmark: {} s per point, {value_len}-byte writes, data under {}",
        args.seconds,
        base.path().display()
    );

    // Each system runs alone on the machine (the other is stopped), one
    // after the other in this run, with the same workload.
    let mut master = Master::start(&bin, base.path()).await;
    let mut ours = Vec::new();
    for &clients in &args.clients {
        ours.push(master.load(clients, args.seconds, args.leader_only).await);
    }
    let mut our_failovers = Vec::new();
    for _ in 0..args.failovers {
        our_failovers.push(master.failover().await);
    }
    drop(master);

    // etcd in plaintext, then with mutual TLS on client and peer ports.
    let mut etcds: Vec<(&str, Vec<Point>, Vec<Duration>)> = Vec::new();
    if !args.no_etcd {
        let tls = EtcdTls::make(base.path());
        for (name, tls) in [("etcd 3.4", None), ("etcd 3.4, TLS", Some(&tls))] {
            let mut etcd = Etcd::start(&args.etcd, base.path(), tls).await;
            let mut points = Vec::new();
            for &clients in &args.clients {
                points.push(etcd.load(clients, args.seconds, value_len).await);
            }
            let mut failovers = Vec::new();
            for _ in 0..args.failovers {
                failovers.push(etcd.failover().await);
            }
            etcds.push((name, points, failovers));
        }
    }

    println!();
    println!("| clients | system | writes/s | p50 ms | p99 ms | CPU ms/write |");
    println!("|---:|---|---:|---:|---:|---:|");
    for (i, &clients) in args.clients.iter().enumerate() {
        let o = &ours[i];
        println!(
            "| {clients} | master-node | {:.0} | {:.2} | {:.2} | {:.3} |",
            o.writes_per_s, o.p50_ms, o.p99_ms, o.cpu_ms_per_write
        );
        for (name, points, _) in &etcds {
            let t = &points[i];
            println!(
                "| {clients} | {name} | {:.0} | {:.2} | {:.2} | {:.3} |",
                t.writes_per_s, t.p50_ms, t.p99_ms, t.cpu_ms_per_write
            );
        }
    }
    if !etcds.is_empty() {
        println!();
        println!("| clients | against | master-node / etcd writes/s | master-node / etcd CPU per write |");
        println!("|---:|---|---:|---:|");
        for (i, &clients) in args.clients.iter().enumerate() {
            for (name, points, _) in &etcds {
                let (o, t) = (&ours[i], &points[i]);
                println!(
                    "| {clients} | {name} | {:.2}x | {:.2}x |",
                    o.writes_per_s / t.writes_per_s,
                    o.cpu_ms_per_write / t.cpu_ms_per_write
                );
            }
        }
    }
    if args.failovers > 0 {
        println!();
        println!("| leader failover ({} SIGKILLs) | median s | max s |", args.failovers);
        println!("|---|---:|---:|");
        let (med, max) = median_max(our_failovers);
        println!("| master-node | {med:.2} | {max:.2} |");
        for (name, _, failovers) in etcds {
            let (med, max) = median_max(failovers);
            println!("| {name} | {med:.2} | {max:.2} |");
        }
    }
}
