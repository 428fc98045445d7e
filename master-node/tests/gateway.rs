//! slap-gateway in front of three replicas: SLAP calls through it keep
//! working across a SIGKILL of the leader.

mod common;

use common::{form, http, SlapCluster};
use slap_proto::marshal::{dumps, loads, Value};

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

#[test]
fn calls_through_the_gateway_survive_a_leader_kill() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = SlapCluster::start(dir.path());
    let gw_port = cluster.gateway_port;
    // Ready: the gateway knows the leader.
    common::wait_for("the gateway to know the leader", || {
        http(gw_port, "GET", "/readyz", "").is_some_and(|(st, body)| st == 200 && body.starts_with("leader 127.0.0.1:"))
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
    cluster.kill_leader();
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

/// The native API through the gateway (HTTP/2, plain in this development
/// setup): writes with request ids and a linearizable read keep working
/// across a SIGKILL of the leader, and the gateway learned every replica.
#[test]
fn native_calls_through_the_gateway_survive_a_leader_kill() {
    use slap_proto::master as pb;
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = SlapCluster::start(dir.path());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = runtime.enter();
    let mut client = cluster.native();
    let rid = |seq| {
        Some(pb::RequestId {
            client: "gateway-test".into(),
            seq,
        })
    };
    runtime.block_on(async {
        client
            .load_computer(pb::LoadComputerRequest {
                request_id: rid(1),
                computer_id: "COMP-N".into(),
                partitions: (0..4)
                    .map(|i| pb::PartitionSpec {
                        id: format!("slappart{i}"),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap();
        client
            .supply(pb::SupplyRequest {
                request_id: rid(2),
                computer_id: "COMP-N".into(),
                url: "/srv/sr/software.cfg".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let view = client
            .cluster(pb::ClusterRequest { state_digest: false })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(view.replicas.len(), 3);
        assert!(view.leader_id != 0);
    });
    let request = |title: &str, seq| pb::RequestInstanceRequest {
        request_id: rid(seq),
        title: title.into(),
        software_release: "/srv/sr/software.cfg".into(),
        ..Default::default()
    };
    let before = runtime
        .block_on(client.request(request("native-before", 3)))
        .unwrap()
        .into_inner();
    assert!(before.placed);
    cluster.kill_leader();
    let after = runtime
        .block_on(client.request(request("native-after", 4)))
        .expect("a native write across the leader change")
        .into_inner();
    assert!(after.placed && after.partition_id != before.partition_id);
    let read = runtime
        .block_on(client.get_instance(pb::GetInstanceRequest {
            title: "native-before".into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(read.id, before.id, "the write acknowledged before the kill is there");
    let (_, metrics) = http(cluster.gateway_port, "GET", "/metrics", "").unwrap();
    assert!(
        metrics.contains("slap_gateway_replicas 3") && metrics.contains("slap_gateway_leader_known 1"),
        "{metrics}"
    );
}

/// A usage journal posted just before the leader is killed, and posted
/// again by the node (it could not know whether the first got in), is
/// counted exactly once.
#[test]
fn usage_posted_across_a_leader_kill_is_counted_once() {
    use slap_proto::master as pb;
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = SlapCluster::start(dir.path());
    let gw = cluster.gateway_port;
    let computer = dumps(&Value::str_dict(vec![
        ("reference", Value::str("COMP-U")),
        (
            "partition_list",
            Value::List(
                (0..2)
                    .map(|i| Value::str_dict(vec![("reference", Value::str(format!("slappart{i}")))]))
                    .collect(),
            ),
        ),
    ]))
    .unwrap();
    assert_eq!(
        http(
            gw,
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
        ("computer_id", "COMP-U"),
        ("state", "available"),
    ]);
    assert_eq!(http(gw, "POST", "/supplySupply", &supply).unwrap().0, 200);
    let (status, body) = http(gw, "POST", "/requestComputerPartition", &request("billed")).unwrap();
    assert_eq!(status, 200, "{body}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = runtime.enter();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{gw}"))
        .unwrap()
        .connect_lazy();
    let mut native = pb::master_client::MasterClient::new(channel);
    let inst = runtime
        .block_on(native.get_instance(pb::GetInstanceRequest {
            title: "billed".into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let journal = format!(
        "<?xml version=\"1.0\"?><journal><transaction type=\"Sale Packing List\"><title>Resource consumptions</title>\
         <start_date></start_date><stop_date>2026-11-25 at 15:02:03</stop_date><reference>COMP-U</reference><currency></currency>\
         <payment_mode></payment_mode><category></category><arrow type=\"Administration\"><source></source><destination></destination></arrow>\
         <movement><resource>CPU Consumption</resource><title>CPU</title><reference>{}</reference><quantity>42.5</quantity>\
         <price>0.0</price><VAT>None</VAT><category>cpu</category></movement></transaction></journal>",
        inst.partition_id
    );
    let post = form(&[("computer_id", "COMP-U"), ("use_string", &journal)]);
    // The first post races the kill; whatever it saw, the node posts again.
    let first = {
        let post = post.clone();
        std::thread::spawn(move || http(gw, "POST", "/useComputer", &post))
    };
    std::thread::sleep(std::time::Duration::from_millis(3));
    cluster.kill_leader();
    let _ = first.join();
    let (status, body) = http(gw, "POST", "/useComputer", &post).unwrap();
    assert_eq!(status, 200, "the retried post: {body}");
    let report = runtime
        .block_on(native.get_usage(pb::UsageReportRequest {
            subscriber: "user".into(),
            period: "2026-11".into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let cpu: Vec<&pb::UsageLine> = report.lines.iter().filter(|l| l.resource == "cpu").collect();
    assert_eq!(cpu.len(), 1, "{report:?}");
    assert_eq!(cpu[0].quantity, 42.5, "counted exactly once");
    assert_eq!(cpu[0].movements, 1);
}

/// Node polls answered by the gateway itself, from the leader's revision
/// feed: a 304 without a replica, a watch held at the gateway and woken by
/// a change, never a 304 for a revision the feed moved past, and every
/// poll forwarded while the feed is lost to a leader kill.
#[test]
fn polls_are_answered_at_the_edge_and_never_stale_after_a_change() {
    use common::{header, http_get, metric};
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = SlapCluster::start(dir.path());
    let gw = cluster.gateway_port;
    let computer = dumps(&Value::str_dict(vec![
        ("reference", Value::str("COMP-E")),
        (
            "partition_list",
            Value::List(vec![Value::str_dict(vec![("reference", Value::str("slappart0"))])]),
        ),
    ]))
    .unwrap();
    let load = form(&[("xml", &computer)]);
    assert_eq!(
        http(gw, "POST", "/loadComputerConfigurationFromXML", &load).unwrap().0,
        200
    );
    let gauge = |name: &str| {
        let (_, page) = http(gw, "GET", "/metrics", "").unwrap();
        metric(&page, name).unwrap_or_else(|| panic!("no {name} in {page}"))
    };
    common::wait_for("the revision feed", || gauge("slap_gateway_edge_feed_live") == 1.0);
    let poll = "/getFullComputerInformation?computer_id=COMP-E";
    // The first poll goes to a replica (which also vouches for the caller).
    let (st, head, body) = http_get(gw, poll, "").unwrap();
    assert_eq!(st, 200, "{body}");
    let etag = header(&head, "etag").expect("an ETag").to_string();
    // Polls go to the replicas in turn, with the revision the feed told
    // of: a replica that has not applied it yet waits, then answers 503.
    assert!(gauge("slap_gateway_spread_total") >= 1.0);
    let revision: u64 = etag.trim_matches('"').rsplit_once('-').unwrap().1.parse().unwrap();
    for port in cluster.slap.clone() {
        let (st, _, _) = http_get(port, poll, &format!("X-Slap-Min-Revision: {revision}\r\n")).unwrap();
        assert_eq!(st, 200, "every replica applied revision {revision}");
        let started = std::time::Instant::now();
        let ahead = format!("X-Slap-Min-Revision: {}\r\n", revision + 1_000_000);
        let (st, _, body) = http_get(port, poll, &ahead).unwrap();
        assert_eq!(st, 503, "{body}");
        assert!(body.contains("has not applied revision"), "{body}");
        assert!(
            started.elapsed() >= std::time::Duration::from_millis(500),
            "waited first"
        );
    }
    // The document as the replica answered it (twice: then it is kept),
    // now from the gateway.
    assert_eq!(http_get(gw, poll, "").unwrap().2, body);
    assert_eq!(gauge("slap_gateway_edge_documents_served_total"), 0.0);
    let (st, again, kept) = http_get(gw, poll, "").unwrap();
    assert_eq!((st, header(&again, "etag")), (200, Some(etag.as_str())));
    assert_eq!(kept, body);
    assert_eq!(gauge("slap_gateway_edge_documents_served_total"), 1.0);
    let if_none_match = format!("If-None-Match: {etag}\r\n");
    let (st, head, _) = http_get(gw, poll, &if_none_match).unwrap();
    assert_eq!((st, header(&head, "etag")), (304, Some(etag.as_str())));
    assert!(
        gauge("slap_gateway_edge_not_modified_total") >= 1.0,
        "answered at the edge"
    );

    // A watch held at the gateway wakes when the document moves.
    let watch = {
        let held = format!("{if_none_match}X-Slap-Wait: 20\r\n");
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            (http_get(gw, poll, &held).unwrap(), started.elapsed())
        })
    };
    common::wait_for("the watch held at the gateway", || {
        gauge("slap_gateway_edge_holding") == 1.0
    });
    let supply = form(&[
        ("url", "/srv/sr/software.cfg"),
        ("computer_id", "COMP-E"),
        ("state", "available"),
    ]);
    assert_eq!(http(gw, "POST", "/supplySupply", &supply).unwrap().0, 200);
    let ((st, head, body), waited) = watch.join().unwrap();
    assert_eq!(st, 200, "the changed document: {body}");
    assert!(body.contains("/srv/sr/software.cfg"), "{body}");
    assert!(
        waited < std::time::Duration::from_secs(10),
        "woken by the change, after {waited:?}"
    );
    let moved = header(&head, "etag").unwrap().to_string();
    assert_ne!(moved, etag);
    // The gateway was told: the old revision is never 304 again.
    let (st, _, body) = http_get(gw, poll, &if_none_match).unwrap();
    assert_eq!(st, 200, "a stale 304 after a change the gateway was told of");
    assert!(body.contains("/srv/sr/software.cfg"), "an old document: {body}");
    let (_, _, body) = http_get(gw, poll, "").unwrap();
    assert!(body.contains("/srv/sr/software.cfg"), "an old document: {body}");
    let answered_here = gauge("slap_gateway_edge_not_modified_total");
    let (st, _, _) = http_get(gw, poll, &format!("If-None-Match: {moved}\r\n")).unwrap();
    assert_eq!(st, 304);
    assert_eq!(gauge("slap_gateway_edge_not_modified_total"), answered_here + 1.0);

    // The leader killed: the feed is lost, polls still answer (forwarded
    // until the new leader's feed confirms), then the edge serves again.
    let losses = gauge("slap_gateway_edge_feed_losses_total");
    cluster.kill_leader();
    common::wait_for("the feed to be lost", || {
        gauge("slap_gateway_edge_feed_losses_total") > losses
    });
    let (st, _, _) = http_get(gw, poll, &format!("If-None-Match: {moved}\r\n")).unwrap();
    assert_eq!(st, 304, "forwarded while the feed is lost");
    common::wait_for("the new leader's feed", || gauge("slap_gateway_edge_feed_live") == 1.0);
    let answered_here = gauge("slap_gateway_edge_not_modified_total");
    let (st, _, _) = http_get(gw, poll, &format!("If-None-Match: {moved}\r\n")).unwrap();
    assert_eq!(st, 304);
    assert_eq!(gauge("slap_gateway_edge_not_modified_total"), answered_here + 1.0);
}

/// Two gateways in front of the same three replicas; nodes list both
/// (`nodeagent --master A,B`). One gateway is SIGKILLed while the nodes
/// poll, hold watches and write: no call fails.
#[test]
fn nodes_listing_two_gateways_see_no_failed_call_when_one_is_killed() {
    use nodeagent::master::{Fetched, MasterClient};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = SlapCluster::start(dir.path());
    let first_port = cluster.gateway_port;
    let (second, second_port) = cluster.another_gateway(dir.path(), "gateway-2");
    let urls = vec![
        format!("http://127.0.0.1:{first_port}"),
        format!("http://127.0.0.1:{second_port}"),
    ];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let nodes = 8;
    let xml = |i: usize| {
        dumps(&Value::str_dict(vec![
            ("reference", Value::str(format!("COMP-G{i}"))),
            (
                "partition_list",
                Value::List(vec![Value::str_dict(vec![("reference", Value::str("slappart0"))])]),
            ),
        ]))
        .unwrap()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let tasks: Vec<_> = (0..nodes)
        .map(|i| {
            let (client, xml) = (MasterClient::new(&urls), xml(i));
            let (stop, calls, failures) = (stop.clone(), calls.clone(), failures.clone());
            runtime.spawn(async move {
                let id = format!("COMP-G{i}");
                let mut etag = None;
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Under the gateway's rate limit per caller: every node
                    // here calls from 127.0.0.1.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    round += 1;
                    // A node's calls: its (idempotent) format, its poll, and
                    // every fourth round a watch held for a second.
                    let result = if round % 3 == 1 {
                        client
                            .post("loadComputerConfigurationFromXML", &[("xml", &xml)])
                            .await
                            .map(|_| ())
                    } else {
                        let wait = round.is_multiple_of(4).then(|| std::time::Duration::from_secs(1));
                        client
                            .get_waiting(
                                "getFullComputerInformation",
                                &[("computer_id", &id)],
                                etag.as_deref(),
                                wait,
                            )
                            .await
                            .map(|fetched| {
                                if let Fetched::Body(_, tag) = fetched {
                                    etag = tag;
                                }
                            })
                    };
                    calls.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = result {
                        failures.fetch_add(1, Ordering::Relaxed);
                        eprintln!("{id}: {e}");
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let before = calls.load(Ordering::Relaxed);
    cluster.gateway.kill();
    std::thread::sleep(std::time::Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        runtime.block_on(t).unwrap();
    }
    let after = calls.load(Ordering::Relaxed);
    assert!(before > 50, "the nodes were calling before the kill ({before} calls)");
    assert!(after > before + 50, "and after it ({} calls)", after - before);
    assert_eq!(failures.load(Ordering::Relaxed), 0, "failed calls out of {after}");
    assert!(
        http(first_port, "GET", "/healthz", "").is_none(),
        "the first gateway is gone"
    );
    drop(second);
}
