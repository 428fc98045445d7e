//! Oversized and malformed calls against a real (single-replica,
//! in-process) Master, through the same HTTP app a replica serves: each
//! gets its exact status, the refusal names the limit, nothing reaches the
//! log and nothing in the state changes. Then the limits changed by an
//! administrator, per-caller rate limits, and random bodies thrown at every
//! SLAP call (a fuzz run through the real handler, not only the codecs).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use master_node::api::ClientWrite;
use master_node::raft::Timing;
use master_node::replica::Replica;
use master_node::server::Running;
use master_node::state::limits::Limits;
use master_node::state::{Command, Master, Refusal, Reply};
use openraft::rt::WatchReceiver;
use rand::{Rng, SeedableRng};
use slap_proto::marshal::{dumps, Value};
use slap_proto::rate::RateLimiter;
use tower::ServiceExt;

const SR: &str = "https://lab.example.org/sr/software.cfg";

async fn master() -> (tempfile::TempDir, Running) {
    let dir = tempfile::tempdir().unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (running, _) = Running::single_replica_cluster(dir.path(), &addr, &Timing::default())
        .await
        .unwrap();
    assert!(
        running
            .replica
            .wait_for_authority(std::time::Duration::from_secs(10))
            .await
    );
    (dir, running)
}

fn form(fields: &[(&str, &str)]) -> String {
    slap_proto::form::encode_fields(fields)
}

/// One call through the replica's app: status and body.
async fn send(
    app: axum::Router,
    method: &str,
    path: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut req = Request::builder().method(method).uri(path);
    if method == "POST" {
        req = req.header("content-type", "application/x-www-form-urlencoded");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = app.oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn post(r: &Arc<Replica>, path: &str, fields: &[(&str, &str)]) -> (StatusCode, String) {
    send(
        master_node::server::http::app(r.clone(), None),
        "POST",
        path,
        form(fields).into_bytes(),
        &[],
    )
    .await
}

fn last_log_index(r: &Replica) -> u64 {
    r.raft.metrics().borrow_watched().last_log_index.unwrap_or(0)
}

/// The state as a domain, without the counters every applied entry moves.
fn domain(r: &Replica) -> Master {
    let mut m = r.state.read().unwrap().clone();
    m.last_index = 0;
    m.applied = 0;
    m
}

fn computer_xml(reference: &str, partitions: usize) -> String {
    let s = |v: &str| Value::str(v);
    let parts = (0..partitions)
        .map(|i| {
            Value::str_dict(vec![
                ("reference", s(&format!("slappart{i}"))),
                (
                    "address_list",
                    Value::List(vec![Value::str_dict(vec![
                        ("addr", s(&format!("10.0.{}.{}", i / 250, i % 250 + 1))),
                        ("netmask", s("255.255.255.255")),
                    ])]),
                ),
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

fn request_fields<'a>(title: &'a str, params: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("software_release", SR),
        ("partition_reference", title),
        ("partition_parameter_xml", params),
        ("filter_xml", "<marshal><dictionary id=\"i2\"/></marshal>"),
        ("software_type", "default"),
        ("state", "<marshal><none/></marshal>"),
        ("shared_xml", "<marshal><bool>0</bool></marshal>"),
    ]
}

async fn format_one(r: &Arc<Replica>) {
    let (status, body) = post(
        r,
        "/loadComputerConfigurationFromXML",
        &[("xml", &computer_xml("COMP-1", 2))],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let supply = [("url", SR), ("computer_id", "COMP-1"), ("state", "available")];
    assert_eq!(post(r, "/supplySupply", &supply).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_calls_are_refused_before_the_log_and_name_the_limit() {
    let (_dir, running) = master().await;
    let r = &running.replica;
    format_one(r).await;
    let long_url = format!("https://example.org/{}", "x".repeat(60_000));
    let big_params = dumps(&Value::str_dict((0..300).map(|i| {
        (
            Box::leak(format!("k{i}").into_boxed_str()) as &str,
            Value::str("v".repeat(1000)),
        )
    })))
    .unwrap();
    let huge_computer = computer_xml("COMP-BIG", 2_001);
    let index = last_log_index(r);
    let before = domain(r);
    // (path, form fields, the limit the refusal must name)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "/supplySupply",
            vec![("url", &long_url), ("computer_id", "COMP-1"), ("state", "available")],
            "field_bytes",
        ),
        (
            "/requestComputerPartition",
            request_fields("big", &big_params),
            "parameters_bytes",
        ),
        (
            "/loadComputerConfigurationFromXML",
            vec![("xml", &huge_computer)],
            "partitions_per_computer",
        ),
    ];
    for (path, fields, limit) in cases {
        let (status, body) = post(r, path, &fields).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}: {body}");
        assert!(body.contains(limit), "{path}: the refusal names {limit}: {body}");
    }
    // A body over body_bytes is refused before it is read, by its length...
    let three_mib = vec![b'a'; 3 << 20];
    let app = master_node::server::http::app(r.clone(), None);
    let (status, body) = send(
        app,
        "POST",
        "/supplySupply",
        three_mib.clone(),
        &[("content-length", &(3 << 20).to_string())],
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body.contains("body_bytes") && body.contains(&(2 << 20).to_string()),
        "{body}"
    );
    // ... and one that does not say its length, as soon as it grows past it.
    let app = master_node::server::http::app(r.clone(), None);
    let chunks =
        futures::stream::iter((0..48).map(|_| Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![b'a'; 64 << 10]))));
    let req = Request::builder()
        .method("POST")
        .uri("/requestComputerPartition")
        .body(Body::from_stream(chunks))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(last_log_index(r), index, "nothing reached the log");
    assert_eq!(domain(r), before, "nothing changed");
    // The native API refuses the same write with the same sentence.
    let refused = r
        .write(ClientWrite {
            request_id: None,
            command: Command::Supply {
                computer: "COMP-1".into(),
                url: long_url.clone(),
                state: master_node::state::SupplyState::Available,
            },
        })
        .await
        .unwrap();
    assert!(
        matches!(&refused.0, Reply::Refused(Refusal::TooLarge(m)) if m.contains("field_bytes")),
        "{refused:?}"
    );
    assert_eq!(last_log_index(r), index);
    // The refusals were counted.
    let metrics = master_node::metrics::render(r);
    assert!(
        metrics.contains("slapos_calls_rejected_total{reason=\"too_large\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_each_get_their_status_and_change_nothing() {
    let (_dir, running) = master().await;
    let r = &running.replica;
    format_one(r).await;
    let before = domain(r);
    let nested = format!(
        "<marshal>{}<none/>{}</marshal>",
        "<list id=\"i1\">".repeat(10_000),
        "</list>".repeat(10_000)
    );
    let entities = r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]><marshal><string>&lol2;</string></marshal>"#;
    let post_raw = |path: &'static str, body: Vec<u8>| {
        let app = master_node::server::http::app(r.clone(), None);
        async move { send(app, "POST", path, body, &[]).await }
    };
    let cases: Vec<(&str, (StatusCode, String))> = vec![
        (
            "deeply nested marshal",
            post(r, "/requestComputerPartition", &request_fields("n", &nested)).await,
        ),
        (
            "XML entities",
            post(r, "/requestComputerPartition", &request_fields("e", entities)).await,
        ),
        (
            "invalid UTF-8",
            post_raw("/supplySupply", vec![b'u', b'r', b'l', b'=', 0xff, 0xfe]).await,
        ),
        (
            "broken form encoding",
            post_raw("/supplySupply", b"url=%ZZ&computer_id=COMP-1".to_vec()).await,
        ),
        (
            "unknown computer",
            post(
                r,
                "/supplySupply",
                &[("url", SR), ("computer_id", "NOPE"), ("state", "available")],
            )
            .await,
        ),
        (
            "unknown partition",
            post(
                r,
                "/setComputerPartitionConnectionXml",
                &[
                    ("computer_id", "COMP-1"),
                    ("computer_partition_id", "slappart99"),
                    ("connection_xml", "<marshal><dictionary id=\"i2\"/></marshal>"),
                ],
            )
            .await,
        ),
    ];
    let want = [
        StatusCode::BAD_REQUEST,
        StatusCode::BAD_REQUEST,
        StatusCode::BAD_REQUEST,
        StatusCode::BAD_REQUEST,
        StatusCode::NOT_FOUND,
        StatusCode::NOT_FOUND,
    ];
    for ((what, (status, body)), want) in cases.into_iter().zip(want) {
        assert_eq!(status, want, "{what}: {body}");
        assert!(!body.is_empty(), "{what}: a refusal says why");
    }
    let app = master_node::server::http::app(r.clone(), None);
    let (status, _) = send(app, "GET", "/getFullComputerInformation?computer_id=NOPE", vec![], &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a poll for an unknown computer");
    assert_eq!(domain(r), before, "nothing changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limits_are_the_clusters_and_an_administrator_changes_them() {
    let (_dir, running) = master().await;
    let r = &running.replica;
    format_one(r).await;
    let admin = |command: Command| {
        let r = r.clone();
        async move {
            r.write(ClientWrite {
                request_id: None,
                command,
            })
            .await
            .unwrap()
            .0
        }
    };
    let tighter = Limits {
        partitions_per_computer: 2,
        ..Limits::default()
    };
    assert_eq!(admin(Command::SetLimits(tighter.clone())).await, Reply::Done);
    assert_eq!(r.state.read().unwrap().limits, tighter);
    let (status, body) = post(
        r,
        "/loadComputerConfigurationFromXML",
        &[("xml", &computer_xml("COMP-2", 3))],
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body.contains("3 partitions") && body.contains("is 2"), "{body}");
    // Below a floor: refused, the limits stay.
    let absurd = Limits {
        body_bytes: 10,
        ..tighter.clone()
    };
    assert!(
        matches!(admin(Command::SetLimits(absurd)).await, Reply::Refused(Refusal::TooLarge(m)) if m.contains("body_bytes"))
    );
    assert_eq!(r.state.read().unwrap().limits, tighter);
    // They survive a restart of the state (a record of their own).
    let records = master_node::state::persist::all_records(&r.state.read().unwrap());
    let restored = master_node::state::persist::restore(&mut records.into_iter()).unwrap();
    assert_eq!(restored.limits, tighter);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_rate_gets_429_and_the_others_do_not() {
    let (_dir, running) = master().await;
    let r = &running.replica;
    let limiter = Arc::new(RateLimiter::new(5, 5).unwrap());
    let poll = |from: &'static str| {
        let app = master_node::server::http::app(r.clone(), Some(limiter.clone()));
        async move { send(app, "GET", "/getHateoasUrl", vec![], &[("x-forwarded-for", from)]).await }
    };
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(poll("10.1.1.1").await.0);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::NOT_FOUND).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count(),
        3
    );
    let app = master_node::server::http::app(r.clone(), Some(limiter.clone()));
    let req = Request::get("/getHateoasUrl")
        .header("x-forwarded-for", "10.1.1.1")
        .body(Body::empty())
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().get("retry-after").is_some(), "says when to come back");
    assert_eq!(
        poll("10.2.2.2").await.0,
        StatusCode::NOT_FOUND,
        "another caller is not held back"
    );
    let metrics = master_node::metrics::render(r);
    assert!(
        metrics.contains("slapos_calls_rejected_total{reason=\"rate_limited\"} 4"),
        "{metrics}"
    );
}

/// Random bodies and query strings on every SLAP call: the Master answers
/// each with a 4xx or a success, never a 5xx, never a crash, and it still
/// serves a normal call afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_input_through_the_real_handler_never_fails_the_master() {
    let (_dir, running) = master().await;
    let r = &running.replica;
    format_one(r).await;
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (FUZZ_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let paths = [
        "/requestComputerPartition",
        "/supplySupply",
        "/loadComputerConfigurationFromXML",
        "/setComputerPartitionConnectionXml",
        "/startedComputerPartition",
        "/softwareInstanceError",
        "/buildingSoftwareRelease",
        "/useComputer",
        "/softwareInstanceBang",
        "/updateComputerPartitionRelatedInstanceList",
        "/getFullComputerInformation",
        "/registerComputerPartition",
        "/getComputerPartitionCertificate",
    ];
    let pieces = [
        "computer_id=COMP-1",
        "computer_partition_id=slappart0",
        "partition_reference=x",
        "software_release=https%3A%2F%2Fa",
        "xml=%3Cmarshal%3E",
        "state=started",
        "url=u",
        "%",
        "&&",
        "=",
        "xml=%3Cmarshal%3E%3Cdictionary%20id%3D%22i2%22%3E%3Cstring%3Ea%3C%2Fstring%3E",
        "partition_parameter_xml=%3Cmarshal%3E%3Clist%20id%3D%22i1%22%3E",
        "connection_xml=%3C%3Fxml%3F%3E",
        "%FF%FE",
    ];
    for _ in 0..600 {
        let path = paths[rng.random_range(0..paths.len())];
        let mut body: Vec<u8> = Vec::new();
        for _ in 0..rng.random_range(0..6) {
            if rng.random_bool(0.7) {
                body.extend_from_slice(pieces[rng.random_range(0..pieces.len())].as_bytes());
            } else {
                body.extend((0..rng.random_range(0..40)).map(|_| rng.random::<u8>()));
            }
            body.push(b'&');
        }
        let app = master_node::server::http::app(r.clone(), None);
        let (status, text) = if path.starts_with("/get") || path == "/registerComputerPartition" {
            // Escaped for the URI, but '%' kept as it is: broken escapes
            // reach the form parser.
            let query: String = body
                .iter()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"&=-_.~%".contains(b) {
                        (*b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            send(app, "GET", &format!("{path}?{query}"), vec![], &[]).await
        } else {
            send(app, "POST", path, body, &[]).await
        };
        assert!(!status.is_server_error(), "{path}: {status} {text}");
    }
    let (status, body) = post(
        r,
        "/supplySupply",
        &[("url", SR), ("computer_id", "COMP-1"), ("state", "available")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "still serving: {body}");
}
