//! slap-gateway in front of three replicas: SLAP calls through it keep
//! working across a SIGKILL of the leader.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use master_node::client::Client;
use slap_proto::form::encode;
use slap_proto::marshal::{dumps, loads, Value};

const BIN: &str = env!("CARGO_BIN_EXE_master-node");

fn gateway_bin() -> PathBuf {
    let path = PathBuf::from(BIN).with_file_name("slap-gateway");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p slap-gateway` (scripts/run-tests does)",
        path.display()
    );
    path
}

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Option<Child>);

impl Proc {
    fn kill(&mut self) {
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

fn spawn(bin: &std::path::Path, args: &[String]) -> Proc {
    Proc(Some(
        Command::new(bin)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ))
}

/// One HTTP call on a new connection: status and body.
fn http(port: u16, method: &str, path: &str, form: &str) -> Option<(u16, String)> {
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

fn form(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn request(title: &str) -> String {
    form(&[
        ("software_release", "/srv/sr/software.cfg"),
        ("partition_reference", title),
        ("partition_parameter_xml", "<marshal><dictionary id=\"i2\"/></marshal>"),
        ("filter_xml", "<marshal><dictionary id=\"i2\"/></marshal>"),
        ("software_type", "default"),
        ("state", "<marshal><none/></marshal>"),
        ("shared_xml", "<marshal><bool>0</bool></marshal>"),
    ])
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn voters(rt: &tokio::runtime::Runtime, addr: &str) -> usize {
    rt.block_on(Client::status_of(addr))
        .map(|s| s.members.iter().filter(|m| m.role == "voter").count())
        .unwrap_or(0)
}

#[test]
fn calls_through_the_gateway_survive_a_leader_kill() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let raft: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", port())).collect();
    let slap: Vec<u16> = (0..3).map(|_| port()).collect();
    let data = |i: usize| dir.path().join(format!("r{i}")).display().to_string();
    let s = |v: &str| v.to_string();

    let mut replicas = vec![spawn(
        std::path::Path::new(BIN),
        &[
            s("init"),
            s("--data-dir"),
            data(0),
            s("--listen"),
            raft[0].clone(),
            s("--slap-listen"),
            format!("127.0.0.1:{}", slap[0]),
        ],
    )];
    let token_file = dir.path().join("r0/join-token");
    wait_for("the first replica", || token_file.exists());
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    for i in 1..3 {
        replicas.push(spawn(
            std::path::Path::new(BIN),
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
            ],
        ));
        wait_for("the joiner to vote", || voters(&rt, &raft[0]) == i + 1);
    }
    let gw_port = port();
    let list = slap
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let _gateway = spawn(
        &gateway_bin(),
        &[s("--replicas"), list, s("--listen"), format!("127.0.0.1:{gw_port}")],
    );
    wait_for("the gateway", || {
        http(gw_port, "GET", "/healthz", "").is_some_and(|(st, _)| st == 200)
    });

    // Format, supply and request through the gateway.
    let computer = dumps(&Value::str_dict(vec![
        ("reference", Value::str("COMP-1")),
        (
            "partition_list",
            Value::List(
                (0..4)
                    .map(|i| Value::str_dict(vec![("reference", Value::str(format!("slappart{i}")))]))
                    .collect(),
            ),
        ),
    ]))
    .unwrap();
    assert_eq!(
        http(
            gw_port,
            "POST",
            "/loadComputerConfigurationFromXML",
            &form(&[("xml", &computer)])
        )
        .unwrap()
        .0,
        200
    );
    let supply = form(&[
        ("url", "/srv/sr/software.cfg"),
        ("computer_id", "COMP-1"),
        ("state", "available"),
    ]);
    assert_eq!(http(gw_port, "POST", "/supplySupply", &supply).unwrap().0, 200);
    let (status, body) = http(gw_port, "POST", "/requestComputerPartition", &request("before")).unwrap();
    assert_eq!(status, 200, "{body}");

    // SIGKILL the leader; the next calls through the gateway still succeed.
    let leader = (0..3)
        .find(|i| {
            rt.block_on(Client::status_of(&raft[*i]))
                .is_ok_and(|s| s.state == "Leader")
        })
        .expect("a leader");
    replicas[leader].kill();
    let (status, body) = http(gw_port, "POST", "/requestComputerPartition", &request("after")).unwrap();
    assert_eq!(status, 200, "a request across the leader change: {body}");
    let (status, body) = http(gw_port, "GET", "/getFullComputerInformation", "computer_id=COMP-1").unwrap();
    assert_eq!(status, 200, "{body}");
    let doc = loads(&body).unwrap();
    let Value::Object(o) = doc else {
        panic!("not a Computer")
    };
    let parts = o
        .attrs
        .iter()
        .find(|(k, _)| k.as_str() == Some("_computer_partition_list"))
        .map(|(_, v)| v.clone());
    let Some(Value::List(parts)) = parts else {
        panic!("no partitions")
    };
    let busy = parts
        .iter()
        .filter(|p| matches!(p, Value::Object(o) if o.attrs.iter().any(|(k, v)| k.as_str() == Some("_requested_state") && v.as_str() == Some("started"))))
        .count();
    assert_eq!(busy, 2, "both requests hold a partition");

    let (_, metrics) = http(gw_port, "GET", "/metrics", "").unwrap();
    assert!(
        metrics.contains("slap_gateway_calls_total") && metrics.contains("slap_gateway_failures_total 0"),
        "{metrics}"
    );
}
