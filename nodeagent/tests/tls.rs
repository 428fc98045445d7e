//! The node agent against a Master that requires client certificates: it
//! registers with a one-time token and then speaks SLAP over mutual TLS;
//! through a CA rotation it moves to the new CA by itself, and its
//! partition's certificate is replaced without redeploying the instance.

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
        "--ca-check-interval",
        "1s",
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

    // A CA rotation while the instance runs.
    let agent_dir = tmp.path().join("srv/.nodeagent");
    let certs = agent_dir.join("certs");
    let partition = wait_until("the partition's certificate", || {
        std::fs::read_dir(&certs).ok()?.flatten().find_map(|e| {
            e.path()
                .join("partition.crt")
                .exists()
                .then(|| e.file_name().into_string().unwrap())
        })
    })
    .await;
    let partition_crt = certs.join(&partition).join("partition.crt");
    let web_record = agent_dir.join("run").join(&partition).join("web.json");
    let web_before = std::fs::read_to_string(&web_record).unwrap();
    let old_ca = first_certificate(&node_id.join("ca.crt"));
    let old_partition = std::fs::read_to_string(&partition_crt).unwrap();
    master.admin(&["ca", "rotate"]).unwrap();
    let new_ca = wait_until("the new CA", || {
        let ca = first_certificate(&master.data_dir.join("tls/ca.crt"));
        (ca != old_ca).then_some(ca)
    })
    .await;
    // Bob is issued during the rotation: his certificate is from the new CA.
    master.admin(&["user", "add", "bob", "--out", &ids_s]).unwrap();
    wait_until("the node and its partition to move to the new CA", || {
        let node_moved = issued_by(&node_id.join("computer.crt"), &new_ca)
            && slap_proto::tls::ca_certificates(&std::fs::read_to_string(node_id.join("ca.crt")).unwrap())
                .unwrap()
                .len()
                == 2;
        (node_moved && issued_by(&partition_crt, &new_ca)).then_some(())
    })
    .await;
    assert_ne!(std::fs::read_to_string(&partition_crt).unwrap(), old_partition);
    assert_eq!(
        std::fs::read_to_string(&web_record).unwrap(),
        web_before,
        "the instance was not redeployed for its new certificate"
    );
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("renewed under the cluster's new CA"), "{said}");
    assert!(
        said.contains("partition certificate replaced without a redeployment"),
        "{said}"
    );

    // The rotation ends (forced: alice and ops are still on the old CA).
    master.admin(&["ca", "finish", "--force"]).unwrap();
    wait_until("the node to trust the new CA alone", || {
        let cas = slap_proto::tls::ca_certificates(&std::fs::read_to_string(node_id.join("ca.crt")).unwrap()).unwrap();
        (cas == [new_ca.clone()]).then_some(())
    })
    .await;
    // The node still works: Bob's change reaches the instance.
    let bob = MasterClient::with_identity(std::slice::from_ref(&url), Some(&identity(&ids, "bob"))).unwrap();
    request(
        &bob,
        &sr,
        "bob-hello",
        "default",
        &[("greeting", "after the rotation")],
        "started",
        false,
    )
    .await;
    let service = wait_connection(
        &bob,
        &sr,
        "bob-hello",
        "default",
        &[("greeting", "after the rotation")],
        false,
        "url",
    )
    .await;
    let (status, body) = wait_http(&service).await;
    assert_eq!(status, 200);
    assert!(body.contains("after the rotation"), "{body}");
    agent.terminate();
}

/// The first certificate of a PEM file.
fn first_certificate(file: &std::path::Path) -> rustls::pki_types::CertificateDer<'static> {
    slap_proto::tls::ca_certificates(&std::fs::read_to_string(file).unwrap())
        .unwrap()
        .remove(0)
}

fn issued_by(file: &std::path::Path, ca: &rustls::pki_types::CertificateDer<'_>) -> bool {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|pem| slap_proto::tls::ca_certificates(&pem).ok())
        .and_then(|certs| certs.into_iter().next())
        .is_some_and(|leaf| slap_proto::live::Validity::issued_by(&leaf, ca))
}

/// Polls `what` for up to 60 s.
async fn wait_until<T>(what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = ready() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
