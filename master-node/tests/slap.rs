//! SLAP over HTTP against a real (single-replica, in-process) Master: the
//! calls `slapos node format`, `slapos supply`, `slapos request`, slapgrid and
//! buildout publishing make, with the bodies the real client sends.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{attrs, get};
use http_body_util::BodyExt;
use master_node::raft::Timing;
use master_node::replica::Replica;
use master_node::server::Running;
use slap_proto::form::encode;
use slap_proto::marshal::{dumps, loads, Value};
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
    // The leader creates the cluster's CA in the background: wait for it, so
    // tests comparing states before and after a call see only that call.
    assert!(
        running
            .replica
            .wait_for_authority(std::time::Duration::from_secs(10))
            .await,
        "no CA was created"
    );
    (dir, running)
}

struct Answer {
    status: StatusCode,
    etag: Option<String>,
    body: String,
}

async fn call(
    replica: &Arc<Replica>,
    method: &str,
    path: &str,
    fields: &[(&str, &str)],
    auth: Option<(&str, &str)>,
) -> Answer {
    let form: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect();
    let form = form.join("&");
    let mut req = Request::builder().method(method);
    req = if method == "GET" {
        req.uri(format!("{path}?{form}"))
    } else {
        req.uri(path)
            .header("content-type", "application/x-www-form-urlencoded")
    };
    if let Some((c, p)) = auth {
        req = req.header(
            "authorization",
            format!("X-SlapPartition computer_id={c}, computer_partition_id={p}"),
        );
    }
    let body = if method == "GET" {
        Body::empty()
    } else {
        Body::from(form)
    };
    let resp = master_node::server::http::app(replica.clone(), None)
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let etag = resp.headers().get("etag").map(|v| v.to_str().unwrap().to_string());
    let body = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    Answer { status, etag, body }
}

fn s(v: &str) -> Value {
    Value::str(v)
}

fn d(pairs: Vec<(&str, Value)>) -> Value {
    Value::str_dict(pairs)
}

/// The dict `slapos node format` posts (reference 4.3), two partitions.
fn computer_xml() -> String {
    let partition = |i: u32| {
        d(vec![
            ("reference", s(&format!("slappart{i}"))),
            (
                "address_list",
                Value::List(vec![d(vec![
                    ("addr", s(&format!("10.0.0.{}", 10 + i))),
                    ("netmask", s("255.255.255.255")),
                ])]),
            ),
            ("tap", d(vec![("name", s(&format!("slaptap{i}")))])),
            ("user", d(vec![("name", s(&format!("slapuser{i}")))])),
        ])
    };
    dumps(&d(vec![
        ("reference", s("COMP-1")),
        ("address", s("10.0.0.1")),
        ("netmask", s("255.255.255.0")),
        ("partition_list", Value::List(vec![partition(0), partition(1)])),
    ]))
    .unwrap()
}

fn dict(v: &Value) -> &Vec<(Value, Value)> {
    match v {
        Value::Dict(e) => e,
        other => panic!("not a dict: {other:?}"),
    }
}

fn request_fields<'a>(title: &'a str, params: &'a str, state: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("software_release", SR),
        ("partition_reference", title),
        ("partition_parameter_xml", params),
        ("filter_xml", "<marshal><dictionary id=\"i2\"/></marshal>"),
        ("software_type", "default"),
        ("state", state),
        ("shared_xml", "<marshal><bool>0</bool></marshal>"),
    ]
}

/// `slapos node format` for COMP-1 (two partitions), then `slapos supply` of SR.
async fn format_and_supply(r: &Arc<Replica>) {
    let a = call(
        r,
        "POST",
        "/loadComputerConfigurationFromXML",
        &[("xml", &computer_xml())],
        None,
    )
    .await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "done"));
    let a = call(
        r,
        "POST",
        "/supplySupply",
        &[("url", SR), ("computer_id", "COMP-1"), ("state", "available")],
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_supply_request_poll_publish_destroy() {
    let (_dir, running) = master().await;
    let r = &running.replica;

    format_and_supply(r).await;

    // A user request with parameters that need escaping (the client's own encoding).
    let params = dumps(&d(vec![("baz", s("a<b&c \"q\" é")), ("foo", s("bar"))])).unwrap();
    let none = "<marshal><none/></marshal>";
    let a = call(
        r,
        "POST",
        "/requestComputerPartition",
        &request_fields("myinst", &params, none),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let inst = loads(&a.body).unwrap();
    let at = attrs(&inst);
    assert_eq!(get(at, "slap_computer_id"), &s("COMP-1"));
    assert_eq!(get(at, "_requested_state"), &s("started"));
    let partition = get(at, "slap_computer_partition_id").as_str().unwrap().to_string();
    assert_eq!(get(dict(get(at, "_parameter_dict")), "baz"), &s("a<b&c \"q\" é"));

    // The node's poll: the partition is busy, with its parameters and addresses.
    let a = call(
        r,
        "GET",
        "/getFullComputerInformation",
        &[("computer_id", "COMP-1")],
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let etag1 = a.etag.clone().expect("an ETag");
    let doc = loads(&a.body).unwrap();
    let parts = match get(attrs(&doc), "_computer_partition_list") {
        Value::List(p) => p.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(parts.len(), 2);
    let busy = parts
        .iter()
        .find(|p| get(attrs(p), "_partition_id") == &s(&partition))
        .unwrap();
    let pd = dict(get(attrs(busy), "_parameter_dict"));
    assert_eq!(get(pd, "foo"), &s("bar"));
    assert!(matches!(get(pd, "ip_list"), Value::List(l) if !l.is_empty()));
    let ts = get(pd, "timestamp").clone();
    let free = parts
        .iter()
        .find(|p| get(attrs(p), "_partition_id") != &s(&partition))
        .unwrap();
    assert_eq!(get(attrs(free), "_requested_state"), &s("destroyed"));
    assert_eq!(get(attrs(free), "_software_release_document"), &Value::None);
    // An unchanged poll gives the same ETag; an unknown computer is a 404.
    assert_eq!(
        call(
            r,
            "GET",
            "/getFullComputerInformation",
            &[("computer_id", "COMP-1")],
            None
        )
        .await
        .etag,
        Some(etag1.clone())
    );
    assert_eq!(
        call(
            r,
            "GET",
            "/getFullComputerInformation",
            &[("computer_id", "NOPE")],
            None
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );

    // The instance's buildout requests a child, as a partition.
    let child_params = "<marshal><dictionary id=\"i2\"/></marshal>";
    let a = call(
        r,
        "POST",
        "/requestComputerPartition",
        &request_fields("db", child_params, none),
        Some(("COMP-1", &partition)),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let child = loads(&a.body).unwrap();
    let child_partition = get(attrs(&child), "slap_computer_partition_id")
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(child_partition, partition);

    // No room for a third: accepted, not placed yet (408).
    let a = call(
        r,
        "POST",
        "/requestComputerPartition",
        &request_fields("third", child_params, none),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::REQUEST_TIMEOUT, "{}", a.body);

    // The child publishes; the parent sees it on its next request, and its
    // timestamp moved (it must redeploy to read it).
    let conn = dumps(&d(vec![("url", s("http://[fd00::1]:8080/"))])).unwrap();
    let a = call(
        r,
        "POST",
        "/setComputerPartitionConnectionXml",
        &[
            ("computer_id", "COMP-1"),
            ("computer_partition_id", &child_partition),
            ("connection_xml", &conn),
            ("slave_reference", "None"),
        ],
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let a = call(
        r,
        "POST",
        "/requestComputerPartition",
        &request_fields("db", child_params, none),
        Some(("COMP-1", &partition)),
    )
    .await;
    let child = loads(&a.body).unwrap();
    assert_eq!(
        get(dict(get(attrs(&child), "_connection_dict")), "url"),
        &s("http://[fd00::1]:8080/")
    );
    let doc = loads(
        &call(
            r,
            "GET",
            "/getFullComputerInformation",
            &[("computer_id", "COMP-1")],
            None,
        )
        .await
        .body,
    )
    .unwrap();
    let parts = match get(attrs(&doc), "_computer_partition_list") {
        Value::List(p) => p.clone(),
        _ => unreachable!(),
    };
    let busy = parts
        .iter()
        .find(|p| get(attrs(p), "_partition_id") == &s(&partition))
        .unwrap();
    assert_ne!(
        get(dict(get(attrs(busy), "_parameter_dict")), "timestamp"),
        &ts,
        "the requester is bumped"
    );

    // Firewall recipes ask for every address of the tree: parent and child.
    let a = call(
        r,
        "GET",
        "/getHostingSubscriptionIpList",
        &[("computer_id", "COMP-1"), ("computer_partition_id", &child_partition)],
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    match loads(&a.body).unwrap() {
        Value::List(pairs) => assert_eq!(pairs.len(), 2, "one address per partition of the tree: {pairs:?}"),
        other => panic!("{other:?}"),
    }
    let a = call(
        r,
        "POST",
        "/computerBang",
        &[("computer_id", "COMP-1"), ("message", "reboot")],
        None,
    )
    .await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (StatusCode::OK, "<marshal><string></string></marshal>")
    );
    assert_eq!(
        call(r, "POST", "/computerBang", &[("computer_id", "NOPE")], None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    // Reports: started shows in _access_status.
    let a = call(
        r,
        "POST",
        "/startedComputerPartition",
        &[("computer_id", "COMP-1"), ("computer_partition_id", &partition)],
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let a = call(
        r,
        "GET",
        "/registerComputerPartition",
        &[
            ("computer_reference", "COMP-1"),
            ("computer_partition_reference", &partition),
        ],
        None,
    )
    .await;
    assert_eq!(
        get(attrs(&loads(&a.body).unwrap()), "_access_status"),
        &s("#access Instance correctly started")
    );

    // Destroy the tree: children first, then the root; every partition free.
    let destroyed = "<marshal><string>destroyed</string></marshal>";
    let a = call(
        r,
        "POST",
        "/requestComputerPartition",
        &request_fields("myinst", &params, destroyed),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let a = call(
        r,
        "POST",
        "/destroyedComputerPartition",
        &[("computer_id", "COMP-1"), ("computer_partition_id", &partition)],
        None,
    )
    .await;
    assert!(a.body.contains("child"), "the root waits for its child: {}", a.body);
    for p in [&child_partition, &partition] {
        let a = call(
            r,
            "POST",
            "/destroyedComputerPartition",
            &[("computer_id", "COMP-1"), ("computer_partition_id", p)],
            None,
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    }
    // The pending "third" takes a freed partition at once.
    let state = r.state.read().unwrap();
    assert_eq!(state.instances.len(), 1, "only the pending request remains, now placed");
    assert!(state.instances.values().all(|i| i.partition.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_calls_get_4xx_and_change_nothing() {
    let (_dir, running) = master().await;
    let r = &running.replica;
    call(
        r,
        "POST",
        "/loadComputerConfigurationFromXML",
        &[("xml", &computer_xml())],
        None,
    )
    .await;
    // Refused writes still pass through the log (moving the log position
    // and the count of applied proposals); everything else must stay.
    let domain = |r: &Arc<Replica>| {
        let mut m = r.state.read().unwrap().clone();
        m.last_index = 0;
        m.applied = 0;
        m
    };
    let before = domain(r);
    let none = "<marshal><none/></marshal>";
    for (path, fields, want) in [
        (
            "/requestComputerPartition",
            request_fields("x", "<marshal><dictionary", none),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/requestComputerPartition",
            vec![("partition_reference", "x")],
            StatusCode::BAD_REQUEST,
        ),
        (
            "/requestComputerPartition",
            request_fields("x", "<marshal><list id=\"i2\"/></marshal>", none),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/requestComputerPartition",
            request_fields(
                "x",
                "<marshal><dictionary id=\"i2\"/></marshal>",
                "<marshal><string>sleeping</string></marshal>",
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/supplySupply",
            vec![("url", SR), ("computer_id", "NOPE")],
            StatusCode::NOT_FOUND,
        ),
        (
            "/supplySupply",
            vec![("url", SR), ("computer_id", "COMP-1"), ("state", "maybe")],
            StatusCode::BAD_REQUEST,
        ),
        (
            "/startedComputerPartition",
            vec![("computer_id", "COMP-1"), ("computer_partition_id", "slappart9")],
            StatusCode::NOT_FOUND,
        ),
        (
            "/setComputerPartitionConnectionXml",
            vec![
                ("computer_id", "COMP-1"),
                ("computer_partition_id", "slappart0"),
                ("connection_xml", "junk"),
            ],
            StatusCode::BAD_REQUEST,
        ),
        (
            "/loadComputerConfigurationFromXML",
            vec![("xml", "<marshal><list id=\"i2\"/></marshal>")],
            StatusCode::BAD_REQUEST,
        ),
        (
            "/buildingSoftwareRelease",
            vec![("url", SR), ("computer_id", "COMP-1")],
            StatusCode::NOT_FOUND,
        ),
    ] {
        let a = call(r, "POST", path, &fields, None).await;
        assert_eq!(a.status, want, "{path} {fields:?}: {}", a.body);
        assert!(!a.body.is_empty(), "{path}: a refusal says why");
    }
    assert!(domain(r) == before, "refused calls changed the state");
}

async fn poll(replica: &Arc<Replica>, etag: Option<&str>, wait: Option<u64>) -> (StatusCode, Option<String>) {
    let mut req = Request::builder().uri("/getFullComputerInformation?computer_id=COMP-1");
    if let Some(tag) = etag {
        req = req.header("if-none-match", tag);
    }
    if let Some(secs) = wait {
        req = req.header("x-slap-wait", secs.to_string());
    }
    let resp = master_node::server::http::app(replica.clone(), None)
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let etag = resp.headers().get("etag").map(|v| v.to_str().unwrap().to_string());
    (resp.status(), etag)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_are_conditional_and_can_wait_for_a_change() {
    let (_dir, running) = master().await;
    let r = running.replica.clone();
    call(
        &r,
        "POST",
        "/loadComputerConfigurationFromXML",
        &[("xml", &computer_xml())],
        None,
    )
    .await;
    let (status, etag) = poll(&r, None, None).await;
    assert_eq!(status, StatusCode::OK);
    let etag = etag.expect("an ETag");
    // Unchanged: 304 at once, or after the hold when asked to wait.
    assert_eq!(poll(&r, Some(&etag), None).await.0, StatusCode::NOT_MODIFIED);
    let start = std::time::Instant::now();
    assert_eq!(poll(&r, Some(&etag), Some(1)).await.0, StatusCode::NOT_MODIFIED);
    assert!(
        start.elapsed() >= std::time::Duration::from_millis(900),
        "the poll was not held"
    );
    // A change while held: answered within a second with the new document.
    let waiter = {
        let (r, etag) = (r.clone(), etag.clone());
        tokio::spawn(async move {
            let start = std::time::Instant::now();
            let answer = poll(&r, Some(&etag), Some(20)).await;
            (answer, start.elapsed())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let supplied = std::time::Instant::now();
    call(
        &r,
        "POST",
        "/supplySupply",
        &[("url", SR), ("computer_id", "COMP-1"), ("state", "available")],
        None,
    )
    .await;
    let ((status, new_etag), _) = waiter.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_ne!(new_etag.as_deref(), Some(etag.as_str()));
    assert!(
        supplied.elapsed() < std::time::Duration::from_secs(1),
        "the held poll woke late"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_categories_and_usage_journals() {
    let (_dir, running) = master().await;
    let r = running.replica.clone();
    let with_extras = dumps(&d(vec![
        ("reference", s("COMP-2")),
        (
            "partition_list",
            Value::List(vec![d(vec![("reference", s("slappart0"))])]),
        ),
        ("capacity", d(vec![("cpu_count", s("2")), ("mode", s("privileged"))])),
        ("categories", d(vec![("region", s("eu-west"))])),
    ]))
    .unwrap();
    let a = call(
        &r,
        "POST",
        "/loadComputerConfigurationFromXML",
        &[("xml", &with_extras)],
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    {
        let state = r.state.read().unwrap();
        let c = &state.computers["COMP-2"];
        assert_eq!(c.categories.get("region").map(String::as_str), Some("eu-west"));
        assert_eq!(c.capacity.get("cpu_count").map(String::as_str), Some("2"));
    }
    let journal = nodeagent_like_journal("42.5");
    let ok = call(
        &r,
        "POST",
        "/useComputer",
        &[("computer_id", "COMP-2"), ("use_string", &journal)],
        None,
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    let bad = nodeagent_like_journal("a lot");
    let refused = call(
        &r,
        "POST",
        "/useComputer",
        &[("computer_id", "COMP-2"), ("use_string", &bad)],
        None,
    )
    .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.body.contains("quantity"), "{}", refused.body);

    // Refused with the reason, and nothing booked: bad XML, a wrong type, an
    // unknown computer, a partition the computer does not have, a journal
    // of another computer.
    let booked = || r.state.read().unwrap().ledger.clone();
    let before = booked();
    assert_eq!(before.movements.len(), 1, "the good journal was booked");
    for (computer, journal, status, why) in [
        (
            "COMP-2",
            "<journal><transaction".to_string(),
            StatusCode::BAD_REQUEST,
            "XML",
        ),
        (
            "COMP-2",
            nodeagent_like_journal("1e400"),
            StatusCode::BAD_REQUEST,
            "finite",
        ),
        (
            "COMP-9",
            nodeagent_like_journal("1").replace("COMP-2", "COMP-9"),
            StatusCode::NOT_FOUND,
            "COMP-9",
        ),
        (
            "COMP-2",
            nodeagent_like_journal("1").replace("slappart0", "slappart7"),
            StatusCode::BAD_REQUEST,
            "not a partition of computer COMP-2",
        ),
        (
            "COMP-1",
            nodeagent_like_journal("1"),
            StatusCode::BAD_REQUEST,
            "is for computer COMP-2",
        ),
    ] {
        let res = call(
            &r,
            "POST",
            "/useComputer",
            &[("computer_id", computer), ("use_string", &journal)],
            None,
        )
        .await;
        assert_eq!(res.status, status, "{why}: {}", res.body);
        assert!(res.body.contains(why), "{why}: {}", res.body);
    }
    assert_eq!(booked(), before, "a refused journal books nothing");
    // Sent again, the good journal counts once.
    let again = call(
        &r,
        "POST",
        "/useComputer",
        &[("computer_id", "COMP-2"), ("use_string", &journal)],
        None,
    )
    .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(booked(), before);
}

fn nodeagent_like_journal(quantity: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?><journal><transaction type=\"Sale Packing List\"><title>Resource consumptions</title>\
         <start_date></start_date><stop_date>2026-11-25 at 15:02:03</stop_date><reference>COMP-2</reference>\
         <currency></currency><payment_mode></payment_mode><category></category><arrow type=\"Administration\">\
         <source></source><destination></destination></arrow><movement><resource>CPU Consumption</resource>\
         <reference>slappart0</reference><quantity>{quantity}</quantity><price>0.0</price><VAT>None</VAT>\
         </movement></transaction></journal>"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_polls_and_show_raft_and_the_state() {
    let (_dir, running) = master().await;
    let r = running.replica.clone();
    let computer = dumps(&d(vec![
        ("reference", s("COMP-M")),
        (
            "partition_list",
            Value::List(vec![d(vec![("reference", s("slappart0"))])]),
        ),
    ]))
    .unwrap();
    call(
        &r,
        "POST",
        "/loadComputerConfigurationFromXML",
        &[("xml", &computer)],
        None,
    )
    .await;
    let first = call(
        &r,
        "GET",
        "/getFullComputerInformation",
        &[("computer_id", "COMP-M")],
        None,
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);
    call(
        &r,
        "GET",
        "/getFullComputerInformation",
        &[("computer_id", "NONE")],
        None,
    )
    .await;
    let text = master_node::metrics::render(&r);
    for expected in [
        "slapos_raft_is_leader 1",
        "slapos_computers 1",
        "slapos_partitions{state=\"free\"} 1",
        "slapos_polls_total{answer=\"document\"} 2",
        "slapos_calls_total{api=\"slap\",outcome=\"200\"} 2",
        "slapos_calls_total{api=\"slap\",outcome=\"404\"} 1",
        "slapos_call_duration_seconds_count{api=\"slap\",operation=\"getFullComputerInformation\"} 2",
        "# TYPE slapos_call_duration_seconds histogram",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    let app = master_node::metrics::router(r.clone());
    for (path, status) in [
        ("/metrics", StatusCode::OK),
        ("/healthz", StatusCode::OK),
        ("/readyz", StatusCode::OK),
    ] {
        let resp = app
            .clone()
            .oneshot(Request::builder().uri(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{path}");
    }
}

/// The index of this replica's last log entry.
fn last_log_index(r: &Arc<Replica>) -> Option<u64> {
    openraft::rt::WatchReceiver::borrow_watched(&r.raft.metrics()).last_log_index
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_rerequests_are_answered_without_a_log_entry() {
    let (_dir, running) = master().await;
    let r = &running.replica;
    format_and_supply(r).await;
    let params = dumps(&d(vec![("foo", s("bar"))])).unwrap();
    let none = "<marshal><none/></marshal>";
    let first = call(
        r,
        "POST",
        "/requestComputerPartition",
        &request_fields("web", &params, none),
        None,
    )
    .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let at = last_log_index(r);

    // slapos node re-requests every child at every run: same answer, no entry.
    for _ in 0..3 {
        let again = call(
            r,
            "POST",
            "/requestComputerPartition",
            &request_fields("web", &params, none),
            None,
        )
        .await;
        assert_eq!((again.status, &again.body), (StatusCode::OK, &first.body));
    }
    let started = "<marshal><string>started</string></marshal>";
    let again = call(
        r,
        "POST",
        "/requestComputerPartition",
        &request_fields("web", &params, started),
        None,
    )
    .await;
    assert_eq!(
        (again.status, &again.body),
        (StatusCode::OK, &first.body),
        "the state it already has"
    );
    assert_eq!(last_log_index(r), at, "identical re-requests wrote to the log");

    // Buildout publishes at every run: the same connection parameters are no entry.
    let partition = get(attrs(&loads(&first.body).unwrap()), "slap_computer_partition_id")
        .as_str()
        .unwrap()
        .to_string();
    let publish = |url: &str| {
        let xml = dumps(&d(vec![("url", s(url))])).unwrap();
        let partition = partition.clone();
        async move {
            let fields = [
                ("computer_id", "COMP-1"),
                ("computer_partition_id", partition.as_str()),
                ("connection_xml", xml.as_str()),
            ];
            call(r, "POST", "/setComputerPartitionConnectionXml", &fields, None).await
        }
    };
    let a = publish("http://[::1]:8080").await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "done"));
    let at = last_log_index(r);
    let a = publish("http://[::1]:8080").await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "done"));
    assert_eq!(last_log_index(r), at, "an identical publication wrote to the log");
    let a = publish("http://[::1]:8081").await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "done"));
    assert!(last_log_index(r) > at, "a changed publication was not written");
    // So are repeated reports: the partition started, the release available.
    let fields = [("computer_id", "COMP-1"), ("computer_partition_id", partition.as_str())];
    let a = call(r, "POST", "/startedComputerPartition", &fields, None).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "done"));
    let sr = [("computer_id", "COMP-1"), ("url", SR)];
    let a = call(r, "POST", "/availableSoftwareRelease", &sr, None).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "done"));
    let at = last_log_index(r);
    for _ in 0..2 {
        let a = call(r, "POST", "/startedComputerPartition", &fields, None).await;
        assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "done"));
        let a = call(r, "POST", "/availableSoftwareRelease", &sr, None).await;
        assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "done"));
    }
    assert_eq!(last_log_index(r), at, "repeated reports wrote to the log");
    // A re-request answered by a read shows the state as it is now.
    let again = call(
        r,
        "POST",
        "/requestComputerPartition",
        &request_fields("web", &params, none),
        None,
    )
    .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    let connection = get(attrs(&loads(&again.body).unwrap()), "_connection_dict").clone();
    assert_eq!(get(dict(&connection), "url"), &s("http://[::1]:8081"));
    assert_eq!(last_log_index(r), at);

    // A change is a write, and the answer shows it.
    let changed = dumps(&d(vec![("foo", s("baz"))])).unwrap();
    let a = call(
        r,
        "POST",
        "/requestComputerPartition",
        &request_fields("web", &changed, none),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        get(dict(get(attrs(&loads(&a.body).unwrap()), "_parameter_dict")), "foo"),
        &s("baz")
    );
    assert!(last_log_index(r) > at, "a changed request was not written");

    // Two partitions: the third instance waits (408), also when re-requested.
    let a = call(
        r,
        "POST",
        "/requestComputerPartition",
        &request_fields("db", &params, none),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let a = call(
        r,
        "POST",
        "/requestComputerPartition",
        &request_fields("cache", &params, none),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::REQUEST_TIMEOUT, "{}", a.body);
    let at = last_log_index(r);
    let again = call(
        r,
        "POST",
        "/requestComputerPartition",
        &request_fields("cache", &params, none),
        None,
    )
    .await;
    assert_eq!((again.status, &again.body), (StatusCode::REQUEST_TIMEOUT, &a.body));
    assert_eq!(last_log_index(r), at);
}
