//! Identities: the cluster CA, certificates for users, nodes and
//! partitions, mutual TLS on the SLAP port, and authorization per role.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use master_node::api::ClientWrite;
use master_node::authz::Caller;
use master_node::certificates::issue;
use master_node::pki;
use master_node::raft::Timing;
use master_node::replica::Replica;
use master_node::server::Running;
use master_node::state::{Command, Master, Role};
use slap_proto::form::encode;
use slap_proto::marshal::{dumps, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

const SR: &str = "https://lab.example.org/sr/software.cfg";

async fn master() -> (tempfile::TempDir, Running) {
    let dir = tempfile::tempdir().unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (running, _token) = Running::single_replica_cluster(dir.path(), &addr, &Timing::default())
        .await
        .unwrap();
    // The leader creates the CA on its own.
    assert!(
        running.replica.wait_for_authority(Duration::from_secs(10)).await,
        "no CA was created"
    );
    (dir, running)
}

fn s(v: &str) -> Value {
    Value::str(v)
}

fn computer_xml(id: &str, partitions: u32) -> String {
    let list = (0..partitions)
        .map(|i| {
            Value::str_dict([
                ("reference", s(&format!("slappart{i}"))),
                (
                    "address_list",
                    Value::List(vec![Value::str_dict([("addr", s(&format!("10.0.0.{}", 10 + i)))])]),
                ),
            ])
        })
        .collect();
    dumps(&Value::str_dict([
        ("reference", s(id)),
        ("partition_list", Value::List(list)),
    ]))
    .unwrap()
}

fn request_fields(title: &str) -> Vec<(String, String)> {
    [
        ("software_release", SR),
        ("partition_reference", title),
        ("partition_parameter_xml", "<marshal><dictionary id=\"i2\"/></marshal>"),
        ("filter_xml", "<marshal><dictionary id=\"i2\"/></marshal>"),
        ("software_type", "default"),
        ("state", "<marshal><string>started</string></marshal>"),
        ("shared_xml", "<marshal><bool>0</bool></marshal>"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// One SLAP call through the router as `caller` (None: no TLS).
async fn call(
    replica: &Arc<Replica>,
    caller: Option<&Role>,
    method: &str,
    path: &str,
    fields: &[(String, String)],
) -> (StatusCode, String) {
    let form = fields
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let req = if method == "GET" {
        Request::builder().uri(format!("{path}?{form}")).body(Body::empty())
    } else {
        Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(form))
    }
    .unwrap();
    let mut router = master_node::server::http::app(replica.clone(), None);
    if let Some(role) = caller {
        router = router.layer(axum::Extension(Caller(role.clone())));
    }
    let resp = router.oneshot(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Live certificates of the parties of the seed's example (users, nodes,
/// partitions); the Master's own (its replicas', the administrator's that
/// `init` issues) are not among them.
fn live_certificates(m: &Master) -> usize {
    m.certificates
        .values()
        .filter(|c| !c.revoked && matches!(c.role, Role::User(_) | Role::Computer(_) | Role::Partition(..)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_one_user_ten_partitions_make_twelve_certificates() {
    let (_dir, running) = master().await;
    let r = running.replica.clone();
    issue(&r, Role::User("alice".into()), 30, None).await.unwrap();
    // The node registers with a one-time token.
    let token = "SLAPREG1.test";
    r.write(ClientWrite {
        request_id: None,
        command: Command::AddRegistration {
            computer: "COMP-1".into(),
            token_sha256: master_node::identity::sha256_hex(token),
        },
    })
    .await
    .unwrap();
    let sha = || Some(master_node::identity::sha256_hex(token));
    issue(&r, Role::Computer("COMP-1".into()), 30, sha()).await.unwrap();
    assert!(
        issue(&r, Role::Computer("COMP-1".into()), 30, sha()).await.is_err(),
        "a registration token works once"
    );
    let alice = Role::User("alice".into());
    let node = Role::Computer("COMP-1".into());
    let (st, body) = call(
        &r,
        Some(&node),
        "POST",
        "/loadComputerConfigurationFromXML",
        &[("xml".into(), computer_xml("COMP-1", 10))],
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, _) = call(
        &r,
        None,
        "POST",
        "/supplySupply",
        &[("url".into(), SR.into()), ("computer_id".into(), "COMP-1".into())],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    for i in 0..10 {
        let (st, body) = call(
            &r,
            Some(&alice),
            "POST",
            "/requestComputerPartition",
            &request_fields(&format!("inst-{i}")),
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{body}");
    }
    let start = Instant::now();
    while live_certificates(&r.state.read().unwrap()) < 12 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "partition certificates were not issued"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        live_certificates(&r.state.read().unwrap()),
        12,
        "exactly twelve, no duplicates"
    );

    // The node fetches a partition's certificate; destroying the instance revokes it.
    let (st, body) = call(
        &r,
        Some(&node),
        "GET",
        "/getComputerPartitionCertificate",
        &[
            ("computer_id".into(), "COMP-1".into()),
            ("computer_partition_id".into(), "slappart0".into()),
        ],
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        body.contains("BEGIN CERTIFICATE") && body.contains("PRIVATE KEY"),
        "{body}"
    );
    let (st, _) = call(
        &r,
        Some(&alice),
        "GET",
        "/getComputerPartitionCertificate",
        &[
            ("computer_id".into(), "COMP-1".into()),
            ("computer_partition_id".into(), "slappart0".into()),
        ],
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "a user may not read a partition's key");
    let holder = {
        let m = r.state.read().unwrap();
        m.partitions[&("COMP-1".to_string(), "slappart0".to_string())]
            .instance
            .clone()
            .unwrap()
    };
    let title = r.state.read().unwrap().instances[&holder].title.clone();
    let mut destroy = request_fields(&title);
    destroy[5].1 = "<marshal><string>destroyed</string></marshal>".into();
    call(&r, Some(&alice), "POST", "/requestComputerPartition", &destroy).await;
    let part = |p: &str| {
        vec![
            ("computer_id".to_string(), "COMP-1".to_string()),
            ("computer_partition_id".to_string(), p.to_string()),
        ]
    };
    let (st, body) = call(
        &r,
        Some(&node),
        "POST",
        "/destroyedComputerPartition",
        &part("slappart0"),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(
        r.state
            .read()
            .unwrap()
            .partition_certificate("COMP-1", "slappart0")
            .is_none(),
        "the freed partition's certificate is still live"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_checked_against_the_callers_role() {
    let (_dir, running) = master().await;
    let r = running.replica.clone();
    let admin = Role::Admin;
    for c in ["X", "Y"] {
        let (st, _) = call(
            &r,
            Some(&admin),
            "POST",
            "/loadComputerConfigurationFromXML",
            &[("xml".into(), computer_xml(c, 3))],
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        call(
            &r,
            Some(&admin),
            "POST",
            "/supplySupply",
            &[("url".into(), SR.into()), ("computer_id".into(), c.into())],
        )
        .await;
    }
    let alice = Role::User("alice".into());
    let bob = Role::User("bob".into());
    // Alice's instance on X, Bob's on Y (SLA computer_guid).
    for (user, title, comp) in [(&alice, "a1", "X"), (&bob, "b1", "Y")] {
        let mut f = request_fields(title);
        f[3].1 = dumps(&Value::str_dict([("computer_guid", s(comp))])).unwrap();
        let (st, body) = call(&r, Some(user), "POST", "/requestComputerPartition", &f).await;
        assert_eq!(st, StatusCode::OK, "{body}");
    }
    let (x, y) = (Role::Computer("X".into()), Role::Computer("Y".into()));
    let where_is = |title: &str| {
        let m = r.state.read().unwrap();
        m.instances
            .values()
            .find(|i| i.title == title)
            .unwrap()
            .partition
            .clone()
            .unwrap()
    };
    let (ax, ap) = where_is("a1");
    assert_eq!(ax, "X");
    let (by, bp) = where_is("b1");
    let px = Role::Partition(ax.clone(), ap.clone());
    let py = Role::Partition(by.clone(), bp.clone());
    let roles = [
        ("user A", &alice),
        ("user B", &bob),
        ("computer X", &x),
        ("computer Y", &y),
        ("partition of X", &px),
        ("partition of Y", &py),
        ("admin", &admin),
    ];

    let pf = |c: &str, p: &str, extra: &[(&str, &str)]| {
        let mut v = vec![
            ("computer_id".to_string(), c.to_string()),
            ("computer_partition_id".to_string(), p.to_string()),
        ];
        v.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        v
    };
    let conn = dumps(&Value::str_dict([("url", s("http://x/"))])).unwrap();
    let child = {
        let mut f = request_fields("child");
        f.push(("computer_id".into(), ax.clone()));
        f.push(("computer_partition_id".into(), ap.clone()));
        f
    };
    // (method, path, fields, roles allowed). Every other role must get 403.
    type Case<'a> = (&'a str, &'a str, Vec<(String, String)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "GET",
            "/getFullComputerInformation",
            vec![("computer_id".into(), "X".into())],
            vec!["computer X", "admin"],
        ),
        (
            "POST",
            "/loadComputerConfigurationFromXML",
            vec![("xml".into(), computer_xml("X", 3))],
            vec!["computer X", "admin"],
        ),
        (
            "POST",
            "/availableSoftwareRelease",
            vec![("url".into(), SR.into()), ("computer_id".into(), "X".into())],
            vec!["computer X", "admin"],
        ),
        (
            "POST",
            "/useComputer",
            vec![
                ("computer_id".into(), "X".into()),
                ("use_string".into(), "<journal/>".into()),
            ],
            vec!["computer X", "admin"],
        ),
        (
            "GET",
            "/registerComputerPartition",
            vec![
                ("computer_reference".into(), ax.clone()),
                ("computer_partition_reference".into(), ap.clone()),
            ],
            vec!["computer X", "partition of X", "admin"],
        ),
        (
            "POST",
            "/setComputerPartitionConnectionXml",
            pf(&ax, &ap, &[("connection_xml", &conn)]),
            vec!["computer X", "partition of X", "admin"],
        ),
        (
            "POST",
            "/startedComputerPartition",
            pf(&ax, &ap, &[]),
            vec!["computer X", "partition of X", "admin"],
        ),
        (
            "POST",
            "/softwareInstanceBang",
            pf(&ax, &ap, &[("message", "m")]),
            vec!["computer X", "partition of X", "admin"],
        ),
        (
            "GET",
            "/getHostingSubscriptionIpList",
            pf(&ax, &ap, &[]),
            vec!["computer X", "partition of X", "admin"],
        ),
        (
            "POST",
            "/requestComputerPartition",
            child,
            vec!["computer X", "partition of X", "admin"],
        ),
        (
            "GET",
            "/getComputerPartitionCertificate",
            pf(&ax, &ap, &[]),
            vec!["computer X", "admin"],
        ),
        (
            "POST",
            "/requestComputerPartition",
            request_fields("new-tree"),
            vec!["user A", "user B", "admin"],
        ),
        (
            "POST",
            "/supplySupply",
            vec![("url".into(), SR.into()), ("computer_id".into(), "X".into())],
            vec!["admin"],
        ),
        ("GET", "/hateoas/", vec![], vec!["user A", "user B", "admin"]),
        (
            "GET",
            "/hateoas/partitions/a1",
            vec![],
            vec!["user A", "user B", "admin"],
        ),
        ("GET", "/hateoas/computers/X", vec![], vec!["user A", "user B", "admin"]),
        (
            "GET",
            "/getHateoasUrl",
            vec![],
            vec![
                "user A",
                "user B",
                "computer X",
                "computer Y",
                "partition of X",
                "partition of Y",
                "admin",
            ],
        ),
        (
            "GET",
            "/getComputerInformation",
            vec![("computer_id".into(), "X".into())],
            vec!["computer X", "admin"],
        ),
        (
            "POST",
            "/buildingSoftwareRelease",
            vec![("url".into(), SR.into()), ("computer_id".into(), "X".into())],
            vec!["computer X", "admin"],
        ),
        (
            "POST",
            "/softwareReleaseError",
            vec![
                ("url".into(), SR.into()),
                ("computer_id".into(), "X".into()),
                ("error_log".into(), "e".into()),
            ],
            vec!["computer X", "admin"],
        ),
        (
            "POST",
            "/destroyedSoftwareRelease",
            vec![
                ("url".into(), "https://other/sr".into()),
                ("computer_id".into(), "X".into()),
            ],
            vec!["computer X", "admin"],
        ),
        (
            "POST",
            "/computerBang",
            vec![("computer_id".into(), "X".into()), ("message".into(), "m".into())],
            vec!["computer X", "admin"],
        ),
        (
            "POST",
            "/stoppedComputerPartition",
            pf(&ax, &ap, &[]),
            vec!["computer X", "partition of X", "admin"],
        ),
        (
            "POST",
            "/softwareInstanceError",
            pf(&ax, &ap, &[("error_log", "boom")]),
            vec!["computer X", "partition of X", "admin"],
        ),
        (
            "POST",
            "/softwareInstanceRename",
            pf(&ax, &ap, &[("new_name", "a1")]),
            vec!["computer X", "partition of X", "admin"],
        ),
        (
            "POST",
            "/updateComputerPartitionRelatedInstanceList",
            pf(
                &ax,
                &ap,
                &[("instance_reference_xml", "<marshal><list id=\"i2\"/></marshal>")],
            ),
            vec!["computer X", "partition of X", "admin"],
        ),
        (
            "POST",
            "/destroyedComputerPartition",
            pf(&ax, &ap, &[]),
            vec!["computer X", "admin"],
        ),
    ];
    let domain = |r: &Arc<Replica>| {
        let mut m = r.state.read().unwrap().clone();
        m.last_index = 0;
        m.applied = 0;
        m.clock = 0;
        // Issued in the background as partitions are allocated.
        m.certificates.clear();
        m.authority = None;
        m
    };
    for (method, path, fields, allowed) in &cases {
        for (name, role) in roles {
            let before = domain(&r);
            let (st, body) = call(&r, Some(role), method, path, fields).await;
            if allowed.contains(&name) {
                assert_ne!(st, StatusCode::FORBIDDEN, "{name} {method} {path} refused: {body}");
            } else {
                assert_eq!(
                    st,
                    StatusCode::FORBIDDEN,
                    "{name} {method} {path} allowed ({st}): {body}"
                );
                assert!(body.contains("forbidden"), "{body}");
                assert!(domain(&r) == before, "{name} {path}: a denied call changed the state");
            }
        }
    }

    // Users see only their own trees.
    let list = |role: &Role| {
        let role = role.clone();
        let r = r.clone();
        async move {
            let q = vec![
                ("mode".to_string(), "search".to_string()),
                (
                    "query".to_string(),
                    "portal_type:\"Instance Tree\" AND validation_state:validated".to_string(),
                ),
                ("select_list".to_string(), "title".to_string()),
            ];
            call(&r, Some(&role), "GET", "/hateoas/", &q).await.1
        }
    };
    let a = list(&alice).await;
    assert!(a.contains("\"a1\"") && !a.contains("\"b1\""), "{a}");
    let b = list(&bob).await;
    assert!(b.contains("\"b1\"") && !b.contains("\"a1\""), "{b}");
}

// ----- the TLS handshake --------------------------------------------------------

fn client_config(ca_pem: &str, identity: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => b
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    Arc::new(config)
}

/// GET /hateoas/ over TLS: Some(status) or None when the handshake failed.
async fn tls_get(port: u16, config: Arc<rustls::ClientConfig>) -> Option<u16> {
    tls_get_as(port, "localhost", config).await
}

/// As [`tls_get`], dialing the replica by `server_name`.
async fn tls_get_as(port: u16, server_name: &str, config: Arc<rustls::ClientConfig>) -> Option<u16> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let mut tls = connector.connect(name, tcp).await.ok()?;
    tls.write_all(b"GET /hateoas/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    // TLS 1.3 reports a refused client certificate at the first read.
    tls.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_refuse_revoked_expired_foreign_and_missing_certificates() {
    let (_dir, running) = master().await;
    let r = running.replica.clone();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    running.serve_slap(&format!("127.0.0.1:{port}"), false).await.unwrap();
    let ca = r.state.read().unwrap().authority.clone().unwrap();
    let alice = issue(&r, Role::User("alice".into()), 30, None).await.unwrap().issued;
    let mallory = issue(&r, Role::User("mallory".into()), 30, None).await.unwrap().issued;
    // Expired: issued ten days ago for one day, and recorded.
    let expired = pki::issue(&ca, &Role::User("old".into()), pki::now_secs() - 10 * 86400, 1, &[]).unwrap();
    r.write(ClientWrite {
        request_id: None,
        command: Command::RecordCertificate {
            certificate: expired.certificate.clone(),
            registration: None,
        },
    })
    .await
    .unwrap();
    // Signed by our CA but never recorded.
    let unrecorded = pki::issue(&ca, &Role::Admin, pki::now_secs(), 1, &[]).unwrap();
    // Another cluster's CA.
    let foreign_ca = pki::new_authority("other", pki::now_secs()).unwrap();
    let foreign = pki::issue(&foreign_ca, &Role::Admin, pki::now_secs(), 1, &[]).unwrap();

    let with = |i: &pki::Issued| client_config(&ca.cert_pem, Some((&i.certificate.cert_pem.to_text(), &i.key_pem)));
    let start = Instant::now();
    while tls_get(port, with(&alice)).await.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "HTTPS never answered a valid certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(tls_get(port, with(&alice)).await, Some(200));
    assert_eq!(tls_get(port, with(&mallory)).await, Some(200));
    assert_eq!(tls_get(port, with(&expired)).await, None, "expired accepted");
    assert_eq!(tls_get(port, with(&unrecorded)).await, None, "unrecorded accepted");
    assert_eq!(tls_get(port, with(&foreign)).await, None, "foreign CA accepted");
    assert_eq!(
        tls_get(port, client_config(&ca.cert_pem, None)).await,
        None,
        "no certificate accepted"
    );

    // Revocation takes effect at the next handshake.
    r.write(ClientWrite {
        request_id: None,
        command: Command::RevokeCertificate {
            serial: mallory.certificate.serial.clone(),
        },
    })
    .await
    .unwrap();
    assert_eq!(tls_get(port, with(&mallory)).await, None, "revoked accepted");
    assert_eq!(tls_get(port, with(&alice)).await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slap_certificate_names_the_advertised_host() {
    let (_dir, running) = master().await;
    let r = running.replica.clone();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // As in a container: listening on every address, reached by a name.
    running
        .serve_slap_advertised(
            &format!("0.0.0.0:{port}"),
            Some(&format!("master-1.example.org:{port}")),
            false,
        )
        .await
        .unwrap();
    let ca = r.state.read().unwrap().authority.clone().unwrap();
    let alice = issue(&r, Role::User("alice".into()), 30, None).await.unwrap().issued;
    let config = client_config(
        &ca.cert_pem,
        Some((&alice.certificate.cert_pem.to_text(), &alice.key_pem)),
    );
    let start = Instant::now();
    while tls_get_as(port, "master-1.example.org", config.clone()).await.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the advertised name does not verify"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(tls_get_as(port, "localhost", config.clone()).await, Some(200));
    // The client checks names: one the certificate does not carry fails.
    assert_eq!(tls_get_as(port, "master-2.example.org", config).await, None);
}

/// `status` names the certificates that end within 30 days, by kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_warns_of_certificates_ending_within_thirty_days() {
    let (_dir, running) = master().await;
    let r = running.replica.clone();
    issue(&r, Role::User("alice".into()), 365, None).await.unwrap();
    assert!(
        r.expiring_certificates().iter().all(|e| e.kind != "user"),
        "a year is not soon"
    );
    issue(&r, Role::User("bob".into()), 10, None).await.unwrap();
    issue(&r, Role::User("carol".into()), 20, None).await.unwrap();
    let expiring = r.expiring_certificates();
    let users = expiring.iter().find(|e| e.kind == "user").expect("a warning for users");
    assert_eq!(users.count, 2, "{expiring:?}");
    let days_left = (users.earliest_not_after - pki::now_secs()).div_ceil(86_400);
    assert!((9..=11).contains(&days_left), "bob's ends first: {days_left} days");
}
