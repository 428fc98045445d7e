//! Shared by the multi-process tests: ports, processes, raw HTTP, and a
//! three-replica Master serving SLAP behind slap-gateway.

#![allow(dead_code)] // each test file uses its own subset

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use master_node::client::{Client, Credentials};
use slap_proto::marshal::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_master-node");

/// A port nothing listens on, for a process the test starts next.
///
/// Taken below Linux's ephemeral range (32768 and up): a port the kernel
/// handed out with `bind(0)` and released can be picked again as the source
/// port of any outgoing connection before the child binds it, and the child
/// then fails to start. Outgoing connections never use ports below the
/// range, and a counter spread by pid keeps parallel tests apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 15_000;
    const SPAN: u32 = 17_000;
    let start = std::process::id().wrapping_mul(97) % SPAN;
    loop {
        let port = (LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc(pub Option<Child>);

impl Proc {
    pub fn spawn(bin: &Path, args: &[String]) -> Proc {
        Proc(Some(
            Command::new(bin)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ))
    }

    /// Spawns with stdout and stderr appended to `log`, so a failure can
    /// say what the process printed.
    pub fn spawn_logged(bin: &Path, args: &[String], log: &Path) -> Proc {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        Proc(Some(
            Command::new(bin)
                .args(args)
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap(),
        ))
    }

    /// Whether the process has exited (and so will never become ready).
    pub fn exited(&mut self) -> bool {
        self.0.as_mut().is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// SIGTERM, then waits for the exit (SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(c) = &self.0 {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.exited() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP/1.1 call on a new connection: status and body.
pub fn http(port: u16, method: &str, path: &str, form: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    if method == "GET" {
        write!(s, "GET {path}?{form} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    } else {
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        )
        .ok()?;
    }
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split(' ').nth(1)?.parse().ok()?;
    Some((status, raw.split_once("\r\n\r\n")?.1.to_string()))
}

/// One GET with extra header lines (each ending in CRLF) on a new
/// connection: status, the response's head and its body.
pub fn http_get(port: u16, path_and_query: &str, extra: &str) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    Some((status, head.to_string(), body.to_string()))
}

/// A header's value in a response head (name in lower case).
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// A counter or gauge in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub fn form(fields: &[(&str, &str)]) -> String {
    slap_proto::form::encode_fields(fields)
}

pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits like [`wait_for`] for a process to become ready, but fails at once
/// with the end of its log when it exits first.
pub fn wait_for_child(what: &str, child: &mut Proc, log: &Path, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        if child.exited() {
            panic!("{what} exited before it was ready; its log:\n{}", log_tail(log));
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; its log:\n{}",
            log_tail(log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last lines of a process log, for failure messages.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A client configuration from `dir`'s NAME.crt, NAME.key and ca.crt
/// (every CA in it trusted), as a user's tools build it.
pub fn client_config(dir: &Path, name: &str) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |f: String| std::fs::read(dir.join(f)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read("ca.crt".into())) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_slice_iter(&read(format!("{name}.crt")))
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_slice(&read(format!("{name}.key"))).unwrap();
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

pub fn gateway_bin() -> PathBuf {
    let path = PathBuf::from(BIN).with_file_name("slap-gateway");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p slap-gateway` (scripts/run-tests does)",
        path.display()
    );
    path
}

/// A slap-gateway in front of replicas serving SLAP on `slap` ports, ready
/// (a replica answers through it): it and its port.
fn start_gateway(dir: &Path, name: &str, slap: &[u16]) -> (Proc, u16) {
    let port = free_port();
    let list = slap
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let log = dir.join(format!("{name}.log"));
    let args = [
        "--replicas".to_string(),
        list,
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ];
    let mut gateway = Proc::spawn_logged(&gateway_bin(), &args, &log);
    wait_for_child("the gateway", &mut gateway, &log, || {
        http(port, "GET", "/healthz", "").is_some_and(|(st, _)| st == 200)
    });
    (gateway, port)
}

/// Three replicas serving SLAP, and slap-gateway in front of them.
pub struct SlapCluster {
    pub replicas: Vec<Proc>,
    pub raft: Vec<String>,
    /// The replicas' SLAP ports.
    pub slap: Vec<u16>,
    /// Where the replicas' data dirs are.
    dir: PathBuf,
    /// The administrator's certificate `init` wrote.
    pub admin: Credentials,
    pub gateway_port: u16,
    pub gateway: Proc,
    runtime: tokio::runtime::Runtime,
}

impl SlapCluster {
    pub fn start(dir: &Path) -> SlapCluster {
        Self::start_acting(dir, [None; 3])
    }

    /// As [`SlapCluster::start`], with replica `i` acting as a release that
    /// speaks command versions up to `versions[i]` (`--act-as-version`).
    pub fn start_acting(dir: &Path, versions: [Option<u32>; 3]) -> SlapCluster {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let acting = |i: usize| -> Vec<String> {
            versions[i]
                .map(|v| vec!["--act-as-version".to_string(), v.to_string()])
                .unwrap_or_default()
        };
        let raft: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let slap: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let data = |i: usize| dir.join(format!("r{i}")).display().to_string();
        let s = |v: &str| v.to_string();
        let log = |i: usize| dir.join(format!("r{i}.log"));
        let mut replicas = vec![Proc::spawn_logged(
            Path::new(BIN),
            &[
                s("init"),
                s("--data-dir"),
                data(0),
                s("--listen"),
                raft[0].clone(),
                s("--slap-listen"),
                format!("127.0.0.1:{}", slap[0]),
                s("--insecure-http"),
            ]
            .into_iter()
            .chain(acting(0))
            .collect::<Vec<_>>(),
            &log(0),
        )];
        let token_file = dir.join("r0/join-token");
        wait_for_child("the first replica", &mut replicas[0], &log(0), || token_file.exists());
        let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
        let admin = Credentials::admin_of(&dir.join("r0")).unwrap();
        for i in 1..3 {
            replicas.push(Proc::spawn_logged(
                Path::new(BIN),
                &[
                    s("join"),
                    s("--peer"),
                    raft[0].clone(),
                    s("--token"),
                    token.clone(),
                    s("--data-dir"),
                    data(i),
                    s("--listen"),
                    raft[i].clone(),
                    s("--slap-listen"),
                    format!("127.0.0.1:{}", slap[i]),
                    s("--insecure-http"),
                ]
                .into_iter()
                .chain(acting(i))
                .collect::<Vec<_>>(),
                &log(i),
            ));
            let voters = |rt: &tokio::runtime::Runtime| {
                rt.block_on(Client::status_of(&raft[0], &admin))
                    .map(|s| s.members.iter().filter(|m| m.role == "voter").count())
                    .unwrap_or(0)
            };
            wait_for_child("the joiner to vote", &mut replicas[i], &log(i), || {
                voters(&runtime) == i + 1
            });
        }
        let (gateway, gateway_port) = start_gateway(dir, "gateway", &slap);
        SlapCluster {
            replicas,
            raft,
            slap,
            dir: dir.to_path_buf(),
            admin,
            gateway_port,
            gateway,
            runtime,
        }
    }

    /// The cluster's join token, as `init` wrote it.
    pub fn join_token(&self) -> String {
        std::fs::read_to_string(self.dir.join("r0/join-token"))
            .expect("the join token")
            .trim()
            .to_string()
    }

    /// A native-API client through the gateway (plain HTTP/2); call it
    /// inside a tokio runtime.
    pub fn native(&self) -> slap_proto::master::master_client::MasterClient<tonic::transport::Channel> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", self.gateway_port))
            .expect("the gateway's URL")
            .connect_lazy();
        slap_proto::master::master_client::MasterClient::new(channel)
    }

    /// Another slap-gateway in front of the same replicas: it and its port.
    pub fn another_gateway(&self, dir: &Path, name: &str) -> (Proc, u16) {
        start_gateway(dir, name, &self.slap)
    }

    /// Restarts replica `i` from its data dir as this build (`run`),
    /// after a SIGTERM: one step of a rolling upgrade.
    pub fn upgrade(&mut self, i: usize) {
        self.replicas[i].stop();
        let log = self.dir.join(format!("r{i}.log"));
        self.replicas[i] = Proc::spawn_logged(
            Path::new(BIN),
            &[
                "run".to_string(),
                "--data-dir".to_string(),
                self.dir.join(format!("r{i}")).display().to_string(),
                "--slap-listen".to_string(),
                format!("127.0.0.1:{}", self.slap[i]),
                "--insecure-http".to_string(),
            ],
            &log,
        );
    }

    /// SIGKILLs the current leader; returns its index.
    pub fn kill_leader(&mut self) -> usize {
        let leader = (0..3)
            .find(|i| {
                self.runtime
                    .block_on(Client::status_of(&self.raft[*i], &self.admin))
                    .is_ok_and(|s| s.state == "Leader")
            })
            .expect("a leader");
        self.replicas[leader].kill();
        leader
    }
}

/// The attributes of a marshalled object.
pub fn attrs(v: &Value) -> &Vec<(Value, Value)> {
    match v {
        Value::Object(o) => &o.attrs,
        other => panic!("not an object: {other:?}"),
    }
}

/// The value under a string key of a marshalled dict or attribute list.
pub fn get<'a>(entries: &'a [(Value, Value)], key: &str) -> &'a Value {
    &entries
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .unwrap_or_else(|| panic!("no {key}"))
        .1
}
