//! The node agent against a Master that requires client certificates: it
//! registers with a one-time token and then speaks SLAP over mutual TLS.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nodeagent::master::{MasterClient, TlsIdentity};

fn identity(dir: &std::path::Path, name: &str) -> TlsIdentity {
    let read = |f: String| std::fs::read_to_string(dir.join(f)).unwrap();
    TlsIdentity {
        ca_pem: read("ca.crt".into()),
        cert_pem: read(format!("{name}.crt")),
        key_pem: read(format!("{name}.key")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_agent_deploys_over_mutual_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let master = Master::init_secure(tmp.path());
    let ids = tmp.path().join("ids");
    let ids_s = ids.to_str().unwrap().to_string();
    let start = Instant::now();
    // The CA appears a moment after the cluster does.
    while master
        .admin(&["user", "add", "ops", "--admin-role", "--out", &ids_s])
        .is_err()
    {
        assert!(start.elapsed() < Duration::from_secs(20), "no CA");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    master.admin(&["user", "add", "alice", "--out", &ids_s]).unwrap();
    let token = master.admin(&["computer", "add", "COMP-TLS"]).unwrap();
    let node_id = tmp.path().join("node-identity");
    let out = std::process::Command::new(workspace_bin("nodeagent"))
        .args([
            "register",
            "--master",
            &master.listen,
            "--token",
            token.trim(),
            "--computer-id",
            "COMP-TLS",
        ])
        .arg("--out")
        .arg(&node_id)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Without a certificate, an https master is refused with a sentence.
    let no_id = std::process::Command::new(workspace_bin("nodeagent"))
        .args([
            "instance",
            "--master",
            &master.https_url(),
            "--identity-dir",
            "/nonexistent",
        ])
        .output()
        .unwrap();
    assert!(!no_id.status.success());
    assert!(String::from_utf8_lossy(&no_id.stderr).contains("nodeagent register"));

    let url = master.https_url();
    let port_base = common::free_port_base(2);
    let args = [
        "run",
        "--master",
        &url,
        "--identity-dir",
        node_id.to_str().unwrap(),
        "--computer-id",
        "COMP-TLS",
        "--mode",
        "unprivileged",
        "--instance-root",
        tmp.path().join("srv").to_str().unwrap(),
        "--software-root",
        tmp.path().join("opt").to_str().unwrap(),
        "--partitions",
        "2",
        "--port-base",
        &port_base.to_string(),
        "--stop-on-exit",
    ]
    .map(String::from);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = tmp.path().join("agent.log");
    let mut agent = Proc::spawn(&workspace_bin("nodeagent"), &refs, &log);

    let ops = MasterClient::with_identity(std::slice::from_ref(&url), Some(&identity(&ids, "ops"))).unwrap();
    let alice = MasterClient::with_identity(std::slice::from_ref(&url), Some(&identity(&ids, "alice"))).unwrap();
    let start = Instant::now();
    while ops.computer_plan("COMP-TLS", None, None).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the agent never reported its capacity over TLS:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A user may not read a node's plan.
    assert!(alice.computer_plan("COMP-TLS", None, None).await.is_err());
    let sr = example_release("hello-http");
    supply(&ops, "COMP-TLS", &sr).await;
    request(
        &alice,
        &sr,
        "hello",
        "default",
        &[("greeting", "over TLS")],
        "started",
        false,
    )
    .await;
    let service = wait_connection(
        &alice,
        &sr,
        "hello",
        "default",
        &[("greeting", "over TLS")],
        false,
        "url",
    )
    .await;
    let (status, body) = wait_http(&service).await;
    assert_eq!(status, 200);
    assert!(body.contains("over TLS"), "{body}");
    agent.terminate();
}
