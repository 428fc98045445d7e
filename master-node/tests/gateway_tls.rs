//! slap-gateway with mutual TLS: callers authenticate to the gateway, the
//! gateway to the replica, and the caller's identity (not the gateway's)
//! is what the replica authorizes, revocation included.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{client_config as client, free_port, gateway_bin, wait_for, Proc, BIN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn admin(args: &[&str], peer: &str, token: &str) -> String {
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

/// One GET over TLS: Some((status, body)), or None if the handshake failed.
async fn get(port: u16, cfg: Arc<rustls::ClientConfig>, path: &str, extra: &str) -> Option<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        status,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

/// One call over TLS (`request`: the request line, headers and body):
/// status, the response's head and its body.
async fn call(port: u16, cfg: Arc<rustls::ClientConfig>, request: &str) -> (u16, String, String) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap();
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

const LIST: &str = "/hateoas/?mode=search&query=portal_type%3A%22Instance%20Tree%22%20AND%20validation_state%3Avalidated&select_list=title";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_passes_on_the_verified_caller_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let raft = format!("127.0.0.1:{}", free_port());
    let slap = free_port();
    let data = root.join("replica");
    let _replica = Proc::spawn(
        Path::new(BIN),
        &[
            "init".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen".into(),
            raft.clone(),
            "--slap-listen".into(),
            format!("127.0.0.1:{slap}"),
        ],
    );
    let token_file = data.join("join-token");
    wait_for("the replica", || token_file.exists());
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    let ids = root.join("ids");
    let ids_s = ids.display().to_string();
    // The CA appears a moment after the cluster.
    let start = std::time::Instant::now();
    loop {
        let out = std::process::Command::new(BIN)
            .args([
                "user", "add", "alice", "--out", &ids_s, "--peer", &raft, "--token", &token,
            ])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    admin(&["user", "add", "bob", "--out", &ids_s], &raft, &token);
    admin(&["user", "add", "ops", "--admin-role", "--out", &ids_s], &raft, &token);
    let gw_dir = root.join("gateway");
    admin(
        &[
            "gateway",
            "add",
            "gw1",
            "--host",
            "127.0.0.1",
            "--out",
            &gw_dir.display().to_string(),
        ],
        &raft,
        &token,
    );
    std::fs::copy(gw_dir.join("gateway.crt"), ids.join("gateway.crt")).unwrap();
    std::fs::copy(gw_dir.join("gateway.key"), ids.join("gateway.key")).unwrap();
    let gw_port = free_port();
    let _gateway = Proc::spawn(
        &gateway_bin(),
        &[
            "--replicas".into(),
            format!("127.0.0.1:{slap}"),
            "--listen".into(),
            format!("127.0.0.1:{gw_port}"),
            "--tls-dir".into(),
            gw_dir.display().to_string(),
        ],
    );
    let (alice, bob, ops) = (client(&ids, "alice"), client(&ids, "bob"), client(&ids, "ops"));
    let start = std::time::Instant::now();
    while get(gw_port, alice.clone(), "/hateoas/", "").await.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the gateway never answered over TLS"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Alice's request through the gateway is Alice's: her tree, not Bob's.
    let request = |title: &str| {
        let body = format!(
            "software_release=https%3A%2F%2Flab.example.org%2Fsr.cfg&partition_reference={title}&software_type=default\
             &partition_parameter_xml=%3Cmarshal%3E%3Cdictionary+id%3D%22i2%22%2F%3E%3C%2Fmarshal%3E\
             &filter_xml=%3Cmarshal%3E%3Cdictionary+id%3D%22i2%22%2F%3E%3C%2Fmarshal%3E\
             &state=%3Cmarshal%3E%3Cnone%2F%3E%3C%2Fmarshal%3E&shared_xml=%3Cmarshal%3E%3Cbool%3E0%3C%2Fbool%3E%3C%2Fmarshal%3E"
        );
        format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let post = |cfg: Arc<rustls::ClientConfig>, title: &'static str| async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw_port)).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap();
        let head = format!(
            "POST /requestComputerPartition HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{}",
            request(title)
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let _ = tls.read_to_end(&mut buf).await;
        String::from_utf8_lossy(&buf)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u16>()
            .unwrap()
    };
    assert_eq!(
        post(alice.clone(), "alice-tree").await,
        408,
        "accepted, not placed (no computer)"
    );
    assert_eq!(post(bob.clone(), "bob-tree").await, 408);
    let (st, body) = get(gw_port, alice.clone(), LIST, "").await.unwrap();
    assert_eq!(st, 200);
    assert!(body.contains("alice-tree") && !body.contains("bob-tree"), "{body}");
    // A caller cannot pass as someone else by sending the gateway's header.
    let ops_fp = {
        let pem = std::fs::read(ids.join("ops.crt")).unwrap();
        use rustls::pki_types::pem::PemObject;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
        master_node::pki::fingerprint(&der)
    };
    let forged = format!("X-Slap-Caller: {ops_fp}\r\n");
    let (st, _) = get(gw_port, bob.clone(), "/supplySupply", &forged).await.unwrap();
    assert_eq!(st, 403, "bob passed as the administrator through the gateway");
    let (st, _) = get(slap, bob.clone(), "/supplySupply", &forged).await.unwrap();
    assert_eq!(st, 403, "bob passed as the administrator straight to the replica");
    // The gateway's own certificate grants nothing beyond its health check.
    let gw_cert = client(&ids, "gateway");
    let (st, _) = get(slap, gw_cert.clone(), LIST, "").await.unwrap();
    assert_eq!(st, 403, "a gateway certificate alone listed instances");
    let _ = ops;

    // The native API through the gateway is Alice's too, and a forged
    // caller header is dropped by the gateway, ignored by the replica.
    {
        use slap_proto::master as pb;
        let native = |name: &str| {
            let read = |f: String| std::fs::read_to_string(ids.join(f)).unwrap();
            let identity =
                slap_proto::tls::ClientIdentity::from_pem(&read(format!("{name}.crt")), &read(format!("{name}.key")))
                    .unwrap();
            let config = slap_proto::tls::client_config(
                &slap_proto::tls::Trust::ca_pem(&read("ca.crt".into())).unwrap(),
                Some(&identity),
                slap_proto::tls::Expect::ReplicaOrGateway,
            )
            .unwrap();
            pb::master_client::MasterClient::new(
                slap_proto::tls::channel(&format!("127.0.0.1:{gw_port}"), config).unwrap(),
            )
        };
        let mut alice_native = native("alice");
        let inst = alice_native
            .request(pb::RequestInstanceRequest {
                title: "alice-native".into(),
                software_release: "https://lab.example.org/sr.cfg".into(),
                ..Default::default()
            })
            .await
            .expect("a native request through the TLS gateway")
            .into_inner();
        assert_eq!(inst.owner, "alice");
        let mut bob_native = native("bob");
        let mut supply = tonic::Request::new(pb::SupplyRequest {
            computer_id: "COMP-1".into(),
            url: "https://lab.example.org/sr.cfg".into(),
            ..Default::default()
        });
        supply
            .metadata_mut()
            .insert("x-slap-caller", ops_fp.to_string().parse().unwrap());
        let denied = bob_native.supply(supply).await.unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
        let listed = bob_native
            .list_instances(pb::ListInstancesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(listed.instances.iter().all(|i| i.owner == "bob"), "{listed:?}");
    }

    // Revoking Alice shuts her out through the gateway too.
    let list = admin(&["cert", "list"], &raft, &token);
    let serial = list
        .lines()
        .find(|l| l.ends_with("user alice"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    admin(&["cert", "revoke", &serial], &raft, &token);
    let (st, body) = get(gw_port, alice.clone(), LIST, "").await.unwrap();
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("revoked"), "{body}");
    let (st, _) = get(gw_port, bob.clone(), LIST, "").await.unwrap();
    assert_eq!(st, 200);

    // Polls answered by the gateway itself (its revision feed) are answered
    // only to callers a replica vouched for, and a revocation ends that.
    let computer = slap_proto::marshal::dumps(&slap_proto::marshal::Value::str_dict(vec![
        ("reference", slap_proto::marshal::Value::str("COMP-T")),
        ("partition_list", slap_proto::marshal::Value::List(vec![])),
    ]))
    .unwrap();
    let load = common::form(&[("xml", &computer)]);
    let (st, _, body) = call(
        gw_port,
        ops.clone(),
        &format!(
            "POST /loadComputerConfigurationFromXML HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{load}",
            load.len()
        ),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let poll = |extra: &str| {
        format!("GET /getFullComputerInformation?computer_id=COMP-T HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n")
    };
    let (st, head, body) = call(gw_port, ops.clone(), &poll("")).await;
    assert_eq!(st, 200, "{body}");
    let etag = common::header(&head, "etag").unwrap().to_string();
    let revalidate = poll(&format!("If-None-Match: {etag}\r\n"));
    let edge_answers = || async {
        let (_, _, page) = call(
            gw_port,
            ops.clone(),
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        (
            common::metric(&page, "slap_gateway_edge_feed_live"),
            common::metric(&page, "slap_gateway_edge_not_modified_total").unwrap_or(0.0),
        )
    };
    let start = std::time::Instant::now();
    while edge_answers().await.0 != Some(1.0) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the gateway never followed the feed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, before) = edge_answers().await;
    let (st, _, _) = call(gw_port, ops.clone(), &revalidate).await;
    assert_eq!(st, 304);
    assert_eq!(
        edge_answers().await.1,
        before + 1.0,
        "the administrator's 304 came from the gateway"
    );
    let (st, _, body) = call(gw_port, bob.clone(), &revalidate).await;
    assert_eq!(st, 403, "bob is not COMP-T, whatever ETag he knows: {body}");
    let serial = {
        use rustls::pki_types::pem::PemObject;
        let pem = std::fs::read(ids.join("ops.crt")).unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        hex::encode(cert.raw_serial())
    };
    admin(&["cert", "revoke", &serial], &raft, &token);
    // Within the edge's staleness bound (2 s by default).
    let start = std::time::Instant::now();
    loop {
        let (st, _, _) = call(gw_port, ops.clone(), &revalidate).await;
        if st == 403 {
            break;
        }
        assert_eq!(st, 304);
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "a revoked administrator still answered at the edge"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
