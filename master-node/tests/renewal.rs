//! Certificates renewed while everything runs, over mutual TLS end to end
//! (three replicas, a gateway, a node polling through it):
//!
//! - a node's certificate renewed by the operator into the node's identity
//!   directory is taken by the running client without a restart, and no
//!   poll fails meanwhile;
//! - a replica given a short-lived certificate renews it itself at two
//!   thirds of its lifetime, again and again, and keeps replicating; once
//!   its older certificates are revoked it still works, because it dialed
//!   its peers again with the new one;
//! - a gateway given a short-lived certificate renews its own through a
//!   replica, and a node its own through the gateway, and callers keep
//!   going;
//! - a CA rotation: replicas, the gateway and the node move to the new CA
//!   by themselves, the partition's certificate is replaced from the new CA
//!   (its document names the new one, the old one stays valid until the
//!   rotation ends), holders that trust only the old CA keep working until the
//!   rotation is finished, finishing is refused while holders are left on
//!   the old CA alone, and after it the old CA's certificates and join token
//!   are refused, all while a node polls without one failed call.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{client_config, form, free_port, gateway_bin, Proc, BIN};
use master_node::client::{Client, Credentials};
use slap_proto::live::Validity;
use slap_proto::marshal::{dumps, Value};

fn cli(args: &[&str], peer: &str, token: &str) -> String {
    let out = std::process::Command::new(BIN)
        .args(args)
        .args(["--peer", peer, "--token", token])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cert list` rows of a holder (its role as listed, e.g. "replica 3"):
/// (serial, state).
fn certificates_of(holder: &str, peer: &str, token: &str) -> Vec<(String, String)> {
    cli(&["cert", "list"], peer, token)
        .lines()
        .filter(|l| l.ends_with(holder))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols[0].to_string(), cols[4].to_string())
        })
        .collect()
}

/// Renews `serial` for 24 seconds into `dir` (the holder's own): the new serial.
fn short_lived(serial: &str, dir: &Path, file: &str, peer: &str, token: &str) -> String {
    let out = dir.display().to_string();
    cli(
        &["cert", "renew", serial, "--seconds", "24", "--out", &out],
        peer,
        token,
    );
    serial_in(&dir.join(file))
}

fn serial_in(file: &Path) -> String {
    Validity::of_pem(&std::fs::read_to_string(file).unwrap())
        .unwrap()
        .serial
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn computer_xml(id: &str) -> String {
    dumps(&Value::str_dict([
        ("reference", Value::str(id)),
        (
            "partition_list",
            Value::List(vec![Value::str_dict([
                ("reference", Value::str("slappart0")),
                (
                    "address_list",
                    Value::List(vec![Value::str_dict([("addr", Value::str("10.0.0.10"))])]),
                ),
            ])]),
        ),
    ]))
    .unwrap()
}

struct Cluster {
    replicas: Vec<Proc>,
    raft: Vec<String>,
    data: Vec<PathBuf>,
    token: String,
    admin: Credentials,
}

/// Three replicas serving SLAP over HTTPS.
fn cluster(root: &Path, slap: &[u16]) -> Cluster {
    let raft: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let data: Vec<PathBuf> = (0..3).map(|i| root.join(format!("r{i}"))).collect();
    let mut replicas = vec![Proc::spawn_logged(
        Path::new(BIN),
        &[
            "init".into(),
            "--data-dir".into(),
            data[0].display().to_string(),
            "--listen".into(),
            raft[0].clone(),
            "--slap-listen".into(),
            format!("127.0.0.1:{}", slap[0]),
        ],
        &root.join("r0.log"),
    )];
    let token_file = data[0].join("join-token");
    wait_until("the first replica", Duration::from_secs(30), || token_file.exists());
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    let admin = Credentials::admin_of(&data[0]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for i in 1..3 {
        replicas.push(Proc::spawn_logged(
            Path::new(BIN),
            &[
                "join".into(),
                "--peer".into(),
                raft[0].clone(),
                "--token".into(),
                token.clone(),
                "--data-dir".into(),
                data[i].display().to_string(),
                "--listen".into(),
                raft[i].clone(),
                "--slap-listen".into(),
                format!("127.0.0.1:{}", slap[i]),
            ],
            &root.join(format!("r{i}.log")),
        ));
        wait_until("the joiner to vote", Duration::from_secs(60), || {
            rt.block_on(Client::status_of(&raft[0], &admin))
                .map(|s| s.members.iter().filter(|m| m.role == "voter").count() == i + 1)
                .unwrap_or(false)
        });
    }
    // Renewals are of version 2: the leader raises it once all three speak it.
    wait_until("cluster version 2", Duration::from_secs(30), || {
        rt.block_on(Client::status_of(&raft[0], &admin))
            .is_ok_and(|s| s.cluster_version >= 2)
    });
    Cluster {
        replicas,
        raft,
        data,
        token,
        admin,
    }
}

/// A node's calls, made until [`Poller::finish`]: polls, and every third
/// round a write (through Raft).
struct Poller {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicU64>,
    failed: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Poller {
    fn start(rt: &tokio::runtime::Runtime, node: Arc<nodeagent::master::MasterClient>, xml: String) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let (calls, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(Mutex::new(Vec::<String>::new())));
        let task = {
            let (stop, calls, failed) = (stop.clone(), calls.clone(), failed.clone());
            rt.spawn(async move {
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let result = if round.is_multiple_of(3) {
                        node.post("loadComputerConfigurationFromXML", &[("xml", &xml)])
                            .await
                            .map(|_| ())
                    } else {
                        node.computer_plan("COMP-R", None, None).await.map(|_| ())
                    };
                    calls.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = result {
                        failed.lock().unwrap().push(e.to_string());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        Poller {
            stop,
            calls,
            failed,
            task,
        }
    }

    /// Stops the calls; none may have failed, and more than `at_least` were made.
    fn finish(self, rt: &tokio::runtime::Runtime, at_least: u64) {
        self.stop.store(true, Ordering::Relaxed);
        rt.block_on(self.task).unwrap();
        let failed = self.failed.lock().unwrap();
        let calls = self.calls.load(Ordering::Relaxed);
        assert!(
            failed.is_empty(),
            "{} of {calls} calls failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        assert!(calls > at_least, "the node kept calling");
    }
}

/// Three replicas, a gateway over TLS in front of them, and a node
/// registered as COMP-R calling through the gateway.
struct Polled {
    c: Cluster,
    gw_dir: PathBuf,
    gw_port: u16,
    gateway: Proc,
    node_dir: PathBuf,
    tls: nodeagent::master::LiveTls,
    rt: tokio::runtime::Runtime,
    poller: Poller,
}

fn polled(root: &Path, slap: &[u16]) -> Polled {
    let c = cluster(root, slap);
    let (peer, token) = (c.raft[0].clone(), c.token.clone());
    let gw_dir = root.join("gateway");
    cli(
        &[
            "gateway",
            "add",
            "gw1",
            "--host",
            "127.0.0.1",
            "--out",
            &gw_dir.display().to_string(),
        ],
        &peer,
        &token,
    );
    let gw_port = free_port();
    let replicas_arg = slap
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let gateway = Proc::spawn_logged(
        &gateway_bin(),
        &[
            "--replicas".into(),
            replicas_arg,
            "--listen".into(),
            format!("127.0.0.1:{gw_port}"),
            "--tls-dir".into(),
            gw_dir.display().to_string(),
        ],
        &root.join("gateway.log"),
    );
    let registration = cli(&["computer", "add", "COMP-R"], &peer, &token).trim().to_string();
    let node_dir = root.join("node");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(nodeagent::register::register(&peer, &registration, "COMP-R", &node_dir))
        .unwrap();
    let identity = nodeagent::master::TlsIdentity::load(&node_dir).unwrap();
    let url = format!("https://127.0.0.1:{gw_port}");
    let node =
        Arc::new(nodeagent::master::MasterClient::with_identity(std::slice::from_ref(&url), Some(&identity)).unwrap());
    let tls = node.tls().unwrap().clone();
    // As `nodeagent run` does: files followed, renewed at two thirds of the lifetime.
    rt.spawn(nodeagent::master::keep_identity_current(
        tls.clone(),
        node_dir.clone(),
        url,
        Duration::from_secs(1),
    ));
    let xml = computer_xml("COMP-R");
    wait_until(
        "the gateway to take the node's first call",
        Duration::from_secs(30),
        || {
            rt.block_on(node.post("loadComputerConfigurationFromXML", &[("xml", &xml)]))
                .is_ok()
        },
    );
    let poller = Poller::start(&rt, node, xml);
    Polled {
        c,
        gw_dir,
        gw_port,
        gateway,
        node_dir,
        tls,
        rt,
        poller,
    }
}

#[test]
fn certificates_are_renewed_and_taken_without_a_restart_while_nodes_poll() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let slap: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let Polled {
        mut c,
        gw_dir,
        gw_port: _,
        mut gateway,
        node_dir,
        tls,
        rt,
        poller,
    } = polled(root, &slap);
    let (peer, token) = (c.raft[0].clone(), c.token.clone());
    let live = tls.identity.clone();

    // 1. The node's certificate, renewed into its identity directory.
    let computer = certificates_of("computer COMP-R", &peer, &token);
    assert_eq!(computer.len(), 1, "{computer:?}");
    let old_node_serial = computer[0].0.clone();
    assert_eq!(live.validity().unwrap().serial, old_node_serial);
    let said = cli(
        &[
            "cert",
            "renew",
            &old_node_serial,
            "--out",
            &node_dir.display().to_string(),
        ],
        &peer,
        &token,
    );
    let new_node_serial = serial_in(&node_dir.join("computer.crt"));
    assert_ne!(new_node_serial, old_node_serial);
    assert!(said.contains(&new_node_serial), "{said}");
    wait_until(
        "the node to take its renewed certificate",
        Duration::from_secs(10),
        || live.validity().unwrap().serial == new_node_serial,
    );
    let rows = certificates_of("computer COMP-R", &peer, &token);
    assert!(
        rows.iter().all(|(_, state)| state == "valid") && rows.len() == 2,
        "both valid: the old one until it expires: {rows:?}"
    );

    // 2. Replica 3 (data r2) given a 24-second certificate into its tls dir:
    //    it takes it, then renews it itself at two thirds of its lifetime.
    let tls3 = c.data[2].join("tls");
    let original3 = serial_in(&tls3.join("replica.crt"));
    let operator3 = short_lived(&original3, &tls3, "replica.crt", &peer, &token);
    assert_ne!(operator3, original3);
    // The gateway too, with a 24-second certificate.
    let original_gw = serial_in(&gw_dir.join("gateway.crt"));
    let operator_gw = short_lived(&original_gw, &gw_dir, "gateway.crt", &peer, &token);
    // And the node, with a 24-second certificate: it renews its own through the gateway.
    let operator_node = short_lived(&new_node_serial, &node_dir, "computer.crt", &peer, &token);
    wait_until(
        "replica 3, the gateway and the node to renew their own certificates",
        Duration::from_secs(60),
        || {
            let (r3, gw, node) = (
                serial_in(&tls3.join("replica.crt")),
                serial_in(&gw_dir.join("gateway.crt")),
                serial_in(&node_dir.join("computer.crt")),
            );
            r3 != operator3 && gw != operator_gw && node != operator_node
        },
    );
    let self_renewed = serial_in(&node_dir.join("computer.crt"));
    wait_until("the node to present its own renewal", Duration::from_secs(5), || {
        live.validity().unwrap().serial == self_renewed
    });
    assert!(
        certificates_of("computer COMP-R", &peer, &token)
            .iter()
            .any(|(s, st)| *s == self_renewed && st == "valid"),
        "the node's own renewal is recorded"
    );
    let renewed3 = serial_in(&tls3.join("replica.crt"));
    let listed3 = certificates_of("replica 3", &peer, &token);
    assert!(
        listed3.iter().any(|(s, st)| *s == renewed3 && st == "valid"),
        "the renewal is recorded: {listed3:?}"
    );
    let gw_listed = certificates_of("gateway gw1", &peer, &token);
    assert!(
        gw_listed.len() >= 3,
        "the gateway's own renewal is recorded: {gw_listed:?}"
    );
    let gw_log = std::fs::read_to_string(root.join("gateway.log")).unwrap();
    assert!(
        gw_log.contains("gateway certificate taken from") && gw_log.contains("renewed at two thirds of its lifetime"),
        "{gw_log}"
    );
    let r3_log = std::fs::read_to_string(root.join("r2.log")).unwrap();
    assert!(r3_log.contains("replica certificate taken from"), "{r3_log}");
    assert!(r3_log.contains("renewed at two thirds of its lifetime"), "{r3_log}");

    // Its older certificates revoked: replica 3 still replicates, on
    // connections dialed again with the one it holds now.
    for s in [&original3, &operator3] {
        cli(&["cert", "revoke", s], &peer, &token);
    }
    let admin = c.admin.clone();
    let applied = |i: usize| {
        rt.block_on(Client::status_of(&c.raft[i], &admin))
            .map(|s| s.applied)
            .ok()
    };
    std::thread::sleep(Duration::from_secs(3));
    let target = (0..2).filter_map(applied).max().unwrap();
    wait_until(
        "replica 3 to apply what the others did",
        Duration::from_secs(30),
        || applied(2).is_some_and(|a| a >= target),
    );

    poller.finish(&rt, 100);
    assert!(!gateway.exited(), "the gateway stopped");
    for (i, r) in c.replicas.iter_mut().enumerate() {
        assert!(!r.exited(), "replica {i} stopped");
    }
}

/// The status of a GET over a new TLS connection, or None if the
/// handshake (either side's verification) failed.
async fn tls_status(port: u16, config: Arc<rustls::ClientConfig>, path: &str) -> Option<u16> {
    tls_call(port, config, path, None).await.map(|(status, _)| status)
}

/// A GET, or with `form` a POST, over a new TLS connection: the status
/// and the whole answer, or None if the handshake failed.
async fn tls_call(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    form: Option<&str>,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.ok()?;
    let req = match form {
        None => format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        Some(body) => format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    };
    tls.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await.ok()?;
    let answer = String::from_utf8_lossy(&buf).into_owned();
    Some((answer.split_whitespace().nth(1)?.parse().ok()?, answer))
}

/// Waits until the node's document names a certificate for slappart0 of
/// COMP-R and `getComputerPartitionCertificate` gives that one, with
/// `ok(pem)` true: its serial, and the certificate and key as fetched.
fn wait_for_partition_certificate(
    rt: &tokio::runtime::Runtime,
    node: &nodeagent::master::MasterClient,
    ok: impl Fn(&str) -> bool,
) -> (String, String) {
    let query = [("computer_id", "COMP-R"), ("computer_partition_id", "slappart0")];
    let mut found = None;
    wait_until("the partition's certificate", Duration::from_secs(30), || {
        let named = rt
            .block_on(node.computer_plan("COMP-R", None, None))
            .ok()
            .and_then(|fetched| fetched.map(|(plan, _)| plan))
            .and_then(|plan| plan.partitions.into_iter().find_map(|p| p.instance?.certificate_serial));
        let fetched = match rt.block_on(node.get("getComputerPartitionCertificate", &query, None)) {
            Ok(nodeagent::master::Fetched::Body(body, _)) => String::from_utf8_lossy(&body).into_owned(),
            _ => return false,
        };
        let Some(Value::Dict(d)) = slap_proto::marshal::loads(&fetched).ok() else {
            return false;
        };
        let field = |k: &str| {
            d.iter()
                .find(|(key, _)| key.as_str() == Some(k))
                .and_then(|(_, v)| v.as_str())
                .map(String::from)
        };
        let (Some(cert), Some(key)) = (field("certificate"), field("key")) else {
            return false;
        };
        let serial = Validity::of_pem(&cert).map(|v| v.serial);
        if named.is_some() && named == serial && ok(&cert) {
            found = Some((serial.unwrap(), format!("{cert}{key}")));
        }
        found.is_some()
    });
    found.unwrap()
}

/// The CAs in a PEM bundle file.
fn cas_in(file: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    slap_proto::tls::ca_certificates(&std::fs::read_to_string(file).unwrap()).unwrap()
}

/// Whether the first certificate of `file` was issued by `ca`.
fn issued_by(file: &Path, ca: &rustls::pki_types::CertificateDer<'_>) -> bool {
    let leaf = slap_proto::tls::ca_certificates(&std::fs::read_to_string(file).unwrap()).unwrap();
    Validity::issued_by(&leaf[0], ca)
}

const SR: &str = "https://example.org/blog/software.toml";

const LIST: &str = "/hateoas/?mode=search&query=portal_type%3A%22Instance%20Tree%22%20AND%20validation_state%3Avalidated&select_list=title";

#[test]
fn a_ca_rotation_while_nodes_poll_fails_no_call() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let slap: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let Polled {
        mut c,
        gw_dir,
        gw_port,
        mut gateway,
        node_dir,
        tls,
        rt,
        poller,
    } = polled(root, &slap);
    let (peer, token) = (c.raft[0].clone(), c.token.clone());
    let old_ca = cas_in(&c.data[0].join("tls/ca.crt")).remove(0);
    // Alice's certificate and ca.crt from before the rotation: the old CA only.
    let ids = root.join("ids");
    cli(
        &["user", "add", "alice", "--out", &ids.display().to_string()],
        &peer,
        &token,
    );
    let alice = client_config(&ids, "alice");
    // Partitions' certificates are replaced in a rotation since version 4.
    wait_until("cluster version 4", Duration::from_secs(30), || {
        rt.block_on(Client::status_of(&c.raft[0], &c.admin))
            .is_ok_and(|s| s.cluster_version >= 4)
    });
    // Alice's instance on the node's partition, which gets a certificate.
    let admin = client_config(&c.data[0].join("admin"), "admin");
    let supply = form(&[("url", SR), ("computer_id", "COMP-R")]);
    let supplied = rt.block_on(tls_call(gw_port, admin, "/supplySupply", Some(&supply)));
    assert_eq!(supplied.as_ref().map(|(s, _)| *s), Some(200), "{supplied:?}");
    let request = form(&[
        ("software_release", SR),
        ("partition_reference", "blog"),
        ("partition_parameter_xml", "<marshal><dictionary id=\"i2\"/></marshal>"),
        ("filter_xml", "<marshal><dictionary id=\"i2\"/></marshal>"),
        ("software_type", "default"),
        ("state", "<marshal><string>started</string></marshal>"),
        ("shared_xml", "<marshal><bool>0</bool></marshal>"),
    ]);
    let requested = rt.block_on(tls_call(
        gw_port,
        alice.clone(),
        "/requestComputerPartition",
        Some(&request),
    ));
    assert_eq!(requested.as_ref().map(|(s, _)| *s), Some(200), "{requested:?}");
    let node = nodeagent::master::MasterClient::with_identity(
        &[format!("https://127.0.0.1:{gw_port}")],
        Some(&nodeagent::master::TlsIdentity::load(&node_dir).unwrap()),
    )
    .unwrap();
    let (old_partition, _) = wait_for_partition_certificate(&rt, &node, |pem| {
        slap_proto::tls::ca_certificates(pem).is_ok_and(|c| Validity::issued_by(&c[0], &old_ca))
    });

    // Rotate: a new CA signs, both are trusted.
    let said = cli(&["ca", "rotate"], &peer, &token);
    let new_token = said
        .lines()
        .find_map(|l| l.split_once("): ").map(|(_, t)| t.trim().to_string()))
        .filter(|t| t.starts_with("SLAP"))
        .unwrap_or_else(|| panic!("no new join token in: {said}"));
    assert_ne!(new_token, token);
    wait_until(
        "the replicas and the gateway to trust both CAs",
        Duration::from_secs(20),
        || c.data.iter().all(|d| cas_in(&d.join("tls/ca.crt")).len() == 2) && cas_in(&gw_dir.join("ca.crt")).len() == 2,
    );
    let new_ca = cas_in(&c.data[0].join("tls/ca.crt")).remove(0);
    let status = cli(&["status"], &c.raft[2], &new_token);
    assert!(status.contains("a CA rotation is under way"), "{status}");
    assert_ne!(new_ca, old_ca, "the signing CA, first, is the new one");
    wait_until(
        "the replicas and the gateway to move to the new CA",
        Duration::from_secs(30),
        || {
            c.data.iter().all(|d| {
                issued_by(&d.join("tls/replica.crt"), &new_ca) && issued_by(&d.join("tls/server.crt"), &new_ca)
            }) && issued_by(&gw_dir.join("gateway.crt"), &new_ca)
        },
    );
    // Alice, who trusts only the old CA, still reaches the gateway (its new
    // certificate carries the cross-signed CA) and is still accepted.
    assert_eq!(rt.block_on(tls_status(gw_port, alice.clone(), LIST)), Some(200));
    // Bob, issued now, holds the new CA's certificate and both CAs.
    let ids2 = root.join("ids2");
    cli(
        &["user", "add", "bob", "--out", &ids2.display().to_string()],
        &peer,
        &new_token,
    );
    assert!(issued_by(&ids2.join("bob.crt"), &new_ca));
    assert_eq!(cas_in(&ids2.join("ca.crt")).len(), 2);
    let bob = client_config(&ids2, "bob");
    assert_eq!(rt.block_on(tls_status(gw_port, bob.clone(), LIST)), Some(200));
    assert_eq!(rt.block_on(tls_status(slap[1], bob.clone(), LIST)), Some(200));

    // The node learns the new CA from the cluster, renews its certificate
    // under it by itself, and takes both.
    wait_until("the node to move to the new CA", Duration::from_secs(20), || {
        issued_by(&node_dir.join("computer.crt"), &new_ca)
            && tls.identity.validity().unwrap().serial == serial_in(&node_dir.join("computer.crt"))
            && tls.trust.certificates().len() == 2
    });
    assert_eq!(cas_in(&node_dir.join("ca.crt")).len(), 2);
    // The partition's certificate is replaced from the new CA; its
    // document names the new one, and the old one stays valid meanwhile.
    let (new_partition, partition_pem) = wait_for_partition_certificate(&rt, &node, |pem| {
        slap_proto::tls::ca_certificates(pem).is_ok_and(|c| Validity::issued_by(&c[0], &new_ca))
    });
    assert_ne!(new_partition, old_partition);
    assert!(partition_pem.contains("BEGIN PRIVATE KEY"));
    let partitions = certificates_of("partition slappart0 of COMP-R", &peer, &new_token);
    assert!(
        partitions.contains(&(old_partition.clone(), "valid".into()))
            && partitions.contains(&(new_partition.clone(), "valid".into())),
        "{partitions:?}"
    );

    // Finishing is refused while a holder is still on the old CA only
    // (Alice, the administrator of init), and says who.
    let refused = std::process::Command::new(BIN)
        .args(["ca", "finish", "--peer", &peer, "--token", &new_token])
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        why.contains("still from the old CA") && why.contains("user alice"),
        "{why}"
    );
    assert!(
        !why.contains("computer COMP-R") && !why.contains("replica") && !why.contains("partition"),
        "renewed holders are not stragglers: {why}"
    );
    cli(&["ca", "finish", "--force"], &peer, &new_token);
    wait_until(
        "the replicas and the gateway to trust the new CA alone",
        Duration::from_secs(20),
        || c.data.iter().all(|d| cas_in(&d.join("tls/ca.crt")).len() == 1) && cas_in(&gw_dir.join("ca.crt")).len() == 1,
    );
    assert_eq!(cas_in(&c.data[2].join("tls/ca.crt"))[0], new_ca);
    assert!(!cli(&["status"], &peer, &new_token).contains("CA rotation"));
    // The old CA is trusted no more: Alice is refused at the handshake,
    // the old join token no longer reaches the cluster; Bob goes on.
    assert_eq!(rt.block_on(tls_status(gw_port, alice.clone(), LIST)), None);
    assert_eq!(rt.block_on(tls_status(slap[2], alice, LIST)), None);
    let stale = std::process::Command::new(BIN)
        .args(["cert", "list", "--peer", &peer, "--token", &token])
        .output()
        .unwrap();
    assert!(!stale.status.success());
    assert_eq!(rt.block_on(tls_status(gw_port, bob.clone(), LIST)), Some(200));
    // The partition's old certificate ended with the rotation, its new one goes on.
    let partitions = certificates_of("partition slappart0 of COMP-R", &peer, &new_token);
    assert!(
        partitions.contains(&(old_partition.clone(), "revoked".into()))
            && partitions.contains(&(new_partition.clone(), "valid".into())),
        "{partitions:?}"
    );
    // A replica restarted after the rotation comes back on the new CA.
    c.replicas[1].stop();
    c.replicas[1] = Proc::spawn_logged(
        Path::new(BIN),
        &[
            "run".into(),
            "--data-dir".into(),
            c.data[1].display().to_string(),
            "--slap-listen".into(),
            format!("127.0.0.1:{}", slap[1]),
        ],
        &root.join("r1-again.log"),
    );
    wait_until("the restarted replica to serve Bob", Duration::from_secs(30), || {
        rt.block_on(tls_status(slap[1], bob.clone(), LIST)) == Some(200)
    });
    std::thread::sleep(Duration::from_secs(2));

    poller.finish(&rt, 50);
    // A client started from the node's files as they stand now works too.
    let fresh = nodeagent::master::MasterClient::with_identity(
        &[format!("https://127.0.0.1:{gw_port}")],
        Some(&nodeagent::master::TlsIdentity::load(&node_dir).unwrap()),
    )
    .unwrap();
    assert!(rt.block_on(fresh.computer_plan("COMP-R", None, None)).is_ok());
    assert!(!gateway.exited(), "the gateway stopped");
    for (i, r) in c.replicas.iter_mut().enumerate() {
        assert!(!r.exited(), "replica {i} stopped");
    }
}
