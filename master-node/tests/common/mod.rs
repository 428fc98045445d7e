//! Shared by the multi-process tests: ports, processes, raw HTTP, and a
//! three-replica Master serving SLAP behind slap-gateway.

#![allow(dead_code)] // each test file uses its own subset

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use master_node::client::{Client, Credentials};
use slap_proto::form::encode;
use slap_proto::marshal::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_master-node");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

pub fn form(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
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

/// Three replicas serving SLAP, and slap-gateway in front of them.
pub struct SlapCluster {
    pub replicas: Vec<Proc>,
    pub raft: Vec<String>,
    /// The administrator's certificate `init` wrote.
    pub admin: Credentials,
    pub gateway_port: u16,
    _gateway: Proc,
    runtime: tokio::runtime::Runtime,
}

impl SlapCluster {
    pub fn start(dir: &Path) -> SlapCluster {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let raft: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let slap: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let data = |i: usize| dir.join(format!("r{i}")).display().to_string();
        let s = |v: &str| v.to_string();
        let mut replicas = vec![Proc::spawn(
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
            ],
        )];
        let token_file = dir.join("r0/join-token");
        wait_for("the first replica", || token_file.exists());
        let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
        let admin = Credentials::admin_of(&dir.join("r0")).unwrap();
        for i in 1..3 {
            replicas.push(Proc::spawn(
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
                ],
            ));
            let voters = |rt: &tokio::runtime::Runtime| {
                rt.block_on(Client::status_of(&raft[0], &admin))
                    .map(|s| s.members.iter().filter(|m| m.role == "voter").count())
                    .unwrap_or(0)
            };
            wait_for("the joiner to vote", || voters(&runtime) == i + 1);
        }
        let gateway_port = free_port();
        let list = slap
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let gateway = Proc::spawn(
            &gateway_bin(),
            &[
                s("--replicas"),
                list,
                s("--listen"),
                format!("127.0.0.1:{gateway_port}"),
            ],
        );
        wait_for("the gateway", || {
            http(gateway_port, "GET", "/healthz", "").is_some_and(|(st, _)| st == 200)
        });
        SlapCluster {
            replicas,
            raft,
            admin,
            gateway_port,
            _gateway: gateway,
            runtime,
        }
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
