//! The native API (`slapos.master.v1.Master`): every method checked against
//! every role, request ids, the watch, and the whole flow over HTTP/2 with
//! mutual TLS on the SLAP port.

use std::time::{Duration, Instant};

use master_node::authz::Caller;
use master_node::native::MasterService;
use master_node::raft::Timing;
use master_node::server::Running;
use master_node::state::{Master, Role};
use slap_proto::master as pb;
use slap_proto::master::master_server::Master as _;
use tonic::Code;

const SR: &str = "https://lab.example.org/sr/software.cfg";

async fn master() -> (tempfile::TempDir, Running, master_node::founding::Founding) {
    let dir = tempfile::tempdir().unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (running, founding) = Running::single_replica_cluster(dir.path(), &addr, &Timing::default())
        .await
        .unwrap();
    (dir, running, founding)
}

fn as_role<T>(msg: T, role: &Role) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.extensions_mut().insert(Caller(role.clone()));
    req
}

fn rid(client: &str, seq: u64) -> Option<pb::RequestId> {
    Some(pb::RequestId {
        client: client.into(),
        seq,
    })
}

fn part(c: &str, p: &str) -> Option<pb::PartitionRef> {
    Some(pb::PartitionRef {
        computer_id: c.into(),
        partition_id: p.into(),
    })
}

fn computer(id: &str) -> pb::LoadComputerRequest {
    pb::LoadComputerRequest {
        computer_id: id.into(),
        partitions: (0..3)
            .map(|i| pb::PartitionSpec {
                id: format!("slappart{i}"),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn request(title: &str, sla: &[(&str, &str)]) -> pb::RequestInstanceRequest {
    pb::RequestInstanceRequest {
        title: title.into(),
        software_release: SR.into(),
        sla: sla.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

fn offer_of(computer: &str, price: &str, currency: &str) -> pb::Offer {
    pb::Offer {
        computer_id: computer.into(),
        price_per_hour: price.into(),
        currency: currency.into(),
        partitions: 2,
        region: "eu".into(),
        ..Default::default()
    }
}

/// Computers X and Y, formatted and with SR supplied, by an administrator.
async fn two_computers(svc: &MasterService) {
    for c in ["X", "Y"] {
        svc.load_computer(as_role(computer(c), &Role::Admin)).await.unwrap();
        svc.supply(as_role(
            pb::SupplyRequest {
                computer_id: c.into(),
                url: SR.into(),
                ..Default::default()
            },
            &Role::Admin,
        ))
        .await
        .unwrap();
    }
}

/// The state without what moves on its own (counters, certificates issued
/// in the background).
fn domain(m: &Master) -> Master {
    let mut m = m.clone();
    m.last_index = 0;
    m.applied = 0;
    m.clock = 0;
    m.certificates.clear();
    m.authority = None;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_is_checked_against_the_callers_role() {
    let (_dir, running, _f) = master().await;
    let svc = MasterService::new(running.replica.clone());
    let admin = Role::Admin;
    two_computers(&svc).await;
    let alice = Role::User("alice".into());
    let bob = Role::User("bob".into());
    let a1 = svc
        .request(as_role(request("a1", &[("computer_guid", "X")]), &alice))
        .await
        .unwrap()
        .into_inner();
    let b1 = svc
        .request(as_role(request("b1", &[("computer_guid", "Y")]), &bob))
        .await
        .unwrap()
        .into_inner();
    let (ax, ap) = (a1.computer_id.clone(), a1.partition_id.clone());
    assert_eq!(ax, "X");
    let (x, y) = (Role::Computer("X".into()), Role::Computer("Y".into()));
    let px = Role::Partition(ax.clone(), ap.clone());
    let py = Role::Partition(b1.computer_id.clone(), b1.partition_id.clone());
    let gateway = Role::Gateway("gw".into());
    let roles = [
        ("user A", &alice),
        ("user B", &bob),
        ("computer X", &x),
        ("computer Y", &y),
        ("partition of X", &px),
        ("partition of Y", &py),
        ("gateway", &gateway),
        ("admin", &admin),
    ];
    let everyone = vec![
        "user A",
        "user B",
        "computer X",
        "computer Y",
        "partition of X",
        "partition of Y",
        "gateway",
        "admin",
    ];
    let node_of_x = vec!["computer X", "admin"];
    let partition_of_x = vec!["computer X", "partition of X", "admin"];
    let users = vec!["user A", "user B", "admin"];

    type Call<'a> = Box<dyn Fn(Role) -> futures::future::BoxFuture<'a, Result<(), tonic::Status>> + 'a>;
    let svc_ref = &svc;
    macro_rules! case {
        ($method:ident, $msg:expr) => {{
            let msg = $msg;
            Box::new(move |role: Role| {
                let msg = msg.clone();
                Box::pin(async move { svc_ref.$method(as_role(msg, &role)).await.map(|_| ()) })
                    as futures::future::BoxFuture<'_, Result<(), tonic::Status>>
            }) as Call
        }};
    }
    let cases: Vec<(&str, Call, Vec<&str>)> = vec![
        ("LoadComputer", case!(load_computer, computer("X")), node_of_x.clone()),
        (
            "GetComputer",
            case!(
                get_computer,
                pb::GetComputerRequest {
                    computer_id: "X".into()
                }
            ),
            node_of_x.clone(),
        ),
        (
            "WatchComputer",
            case!(
                watch_computer,
                pb::WatchComputerRequest {
                    computer_id: "X".into(),
                    known_revision: 0
                }
            ),
            node_of_x.clone(),
        ),
        (
            "ReportSoftware",
            case!(
                report_software,
                pb::ReportSoftwareRequest {
                    computer_id: "X".into(),
                    url: SR.into(),
                    state: "available".into(),
                    ..Default::default()
                }
            ),
            node_of_x.clone(),
        ),
        (
            "ReportInstance started",
            case!(
                report_instance,
                pb::ReportInstanceRequest {
                    partition: part(&ax, &ap),
                    state: "started".into(),
                    ..Default::default()
                }
            ),
            partition_of_x.clone(),
        ),
        (
            "ReportInstance destroyed",
            case!(
                report_instance,
                pb::ReportInstanceRequest {
                    partition: part(&ax, &ap),
                    state: "destroyed".into(),
                    ..Default::default()
                }
            ),
            node_of_x.clone(),
        ),
        (
            "PublishConnection",
            case!(
                publish_connection,
                pb::PublishConnectionRequest {
                    partition: part(&ax, &ap),
                    connection: [("url".to_string(), "http://x/".to_string())].into_iter().collect(),
                    ..Default::default()
                }
            ),
            partition_of_x.clone(),
        ),
        (
            "SetRelatedInstances",
            case!(
                set_related_instances,
                pb::SetRelatedInstancesRequest {
                    partition: part(&ax, &ap),
                    ..Default::default()
                }
            ),
            partition_of_x.clone(),
        ),
        (
            "Bang",
            case!(
                bang,
                pb::BangRequest {
                    partition: part(&ax, &ap),
                    message: "m".into(),
                    ..Default::default()
                }
            ),
            partition_of_x.clone(),
        ),
        (
            "GetPartitionCertificate",
            case!(
                get_partition_certificate,
                pb::PartitionRef {
                    computer_id: ax.clone(),
                    partition_id: ap.clone()
                }
            ),
            node_of_x.clone(),
        ),
        (
            "UseComputer",
            case!(
                use_computer,
                pb::UseComputerRequest {
                    computer_id: "X".into(),
                    tioxml: "<journal/>".into(),
                    ..Default::default()
                }
            ),
            node_of_x.clone(),
        ),
        (
            "Supply",
            case!(
                supply,
                pb::SupplyRequest {
                    computer_id: "X".into(),
                    url: SR.into(),
                    ..Default::default()
                }
            ),
            vec!["admin"],
        ),
        (
            "Request (root)",
            case!(request, request("new-tree", &[])),
            users.clone(),
        ),
        (
            "Request (child)",
            case!(
                request,
                pb::RequestInstanceRequest {
                    requester: part(&ax, &ap),
                    ..request("child", &[])
                }
            ),
            partition_of_x.clone(),
        ),
        (
            "GetInstance",
            case!(
                get_instance,
                pb::GetInstanceRequest {
                    title: "a1".into(),
                    ..Default::default()
                }
            ),
            everyone.clone(),
        ),
        (
            "ListInstances",
            case!(list_instances, pb::ListInstancesRequest::default()),
            users.clone(),
        ),
        (
            "Cluster",
            case!(cluster, pb::ClusterRequest { state_digest: false }),
            everyone.clone(),
        ),
        (
            "GetUsage (subscriber)",
            case!(
                get_usage,
                pb::UsageReportRequest {
                    period: "2026-11".into(),
                    ..Default::default()
                }
            ),
            users.clone(),
        ),
        (
            "GetUsage (computer)",
            case!(
                get_usage,
                pb::UsageReportRequest {
                    computer_id: "X".into(),
                    period: "2026-11".into(),
                    ..Default::default()
                }
            ),
            node_of_x.clone(),
        ),
        (
            "SetPrice",
            case!(
                set_price,
                pb::SetPriceRequest {
                    resource: "cpu".into(),
                    unit_price: "0.01".into(),
                    currency: "EUR".into(),
                    ..Default::default()
                }
            ),
            vec!["admin"],
        ),
        (
            "GetUsage (provider)",
            case!(
                get_usage,
                pb::UsageReportRequest {
                    provider: "alice".into(),
                    period: "2026-11".into(),
                    ..Default::default()
                }
            ),
            vec!["user A", "admin"],
        ),
        (
            "ListOffers",
            case!(list_offers, pb::ListOffersRequest::default()),
            everyone.clone(),
        ),
        (
            "SetOffer",
            case!(
                set_offer,
                pb::SetOfferRequest {
                    offer: Some(offer_of("X", "0.05", "EUR")),
                    ..Default::default()
                }
            ),
            node_of_x.clone(),
        ),
        (
            "WithdrawOffer",
            case!(
                withdraw_offer,
                pb::WithdrawOfferRequest {
                    computer_id: "X".into(),
                    ..Default::default()
                }
            ),
            node_of_x.clone(),
        ),
        (
            "SetComputerOwner",
            case!(
                set_computer_owner,
                pb::SetComputerOwnerRequest {
                    computer_id: "Y".into(),
                    ..Default::default()
                }
            ),
            vec!["admin"],
        ),
    ];
    let state = running.replica.state.clone();
    for (method, call, allowed) in &cases {
        for (name, role) in roles {
            let before = domain(&state.read().unwrap());
            let result = call(role.clone()).await;
            if allowed.contains(&name) {
                if let Err(s) = &result {
                    assert_ne!(
                        s.code(),
                        Code::PermissionDenied,
                        "{name} {method} refused: {}",
                        s.message()
                    );
                }
            } else {
                let s = result.expect_err(&format!("{name} {method} was allowed"));
                assert_eq!(s.code(), Code::PermissionDenied, "{name} {method}: {s:?}");
                assert!(s.message().starts_with("forbidden"), "{}", s.message());
                assert!(
                    domain(&state.read().unwrap()) == before,
                    "{name} {method}: a denied call changed the state"
                );
            }
        }
    }

    // A user sees its own instances only, and not another user's by title.
    let list = |role: &Role| {
        let svc = &svc;
        let role = role.clone();
        async move {
            svc.list_instances(as_role(pb::ListInstancesRequest::default(), &role))
                .await
                .unwrap()
                .into_inner()
                .instances
                .into_iter()
                .map(|i| i.title)
                .collect::<Vec<_>>()
        }
    };
    let mine = list(&alice).await;
    assert!(
        mine.contains(&"a1".to_string()) && !mine.contains(&"b1".to_string()),
        "{mine:?}"
    );
    let theirs = svc
        .get_instance(as_role(
            pb::GetInstanceRequest {
                title: "b1".into(),
                tree: b1.root.clone(),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        theirs.code(),
        Code::NotFound,
        "another user's instance does not exist for alice"
    );
    let for_bob = svc
        .get_instance(as_role(
            pb::GetInstanceRequest {
                title: "a1".into(),
                user: "alice".into(),
                ..Default::default()
            },
            &bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(for_bob.code(), Code::PermissionDenied);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_a_request_id_apply_once_and_bad_input_is_refused() {
    let (_dir, running, _f) = master().await;
    let svc = MasterService::new(running.replica.clone());
    let admin = Role::Admin;
    let alice = Role::User("alice".into());
    svc.load_computer(as_role(computer("X"), &admin)).await.unwrap();
    svc.supply(as_role(
        pb::SupplyRequest {
            computer_id: "X".into(),
            url: SR.into(),
            ..Default::default()
        },
        &admin,
    ))
    .await
    .unwrap();
    let first = svc
        .request(as_role(
            pb::RequestInstanceRequest {
                request_id: rid("alice-1", 1),
                ..request("one", &[])
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    // The same request id again (a retry after a lost answer), even with
    // other content, returns the first answer and allocates nothing more.
    let retry = svc
        .request(as_role(
            pb::RequestInstanceRequest {
                request_id: rid("alice-1", 1),
                ..request("two", &[])
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry.id, first.id);
    assert_eq!(running.replica.state.read().unwrap().instances.len(), 1);
    // An older sequence number is refused.
    svc.request(as_role(
        pb::RequestInstanceRequest {
            request_id: rid("alice-1", 2),
            ..request("two", &[])
        },
        &alice,
    ))
    .await
    .unwrap();
    let stale = svc
        .request(as_role(
            pb::RequestInstanceRequest {
                request_id: rid("alice-1", 1),
                ..request("three", &[])
            },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);

    // Not placeable: answered, with the reason, not an error.
    let pending = svc
        .request(as_role(request("nowhere", &[("computer_guid", "NOPE")]), &alice))
        .await
        .unwrap()
        .into_inner();
    assert!(!pending.placed && !pending.pending_reason.is_empty(), "{pending:?}");

    let before = domain(&running.replica.state.read().unwrap());
    for (what, err) in [
        (
            "empty title",
            svc.request(as_role(request("", &[]), &alice)).await.unwrap_err(),
        ),
        (
            "bad state",
            svc.request(as_role(
                pb::RequestInstanceRequest {
                    state: "asleep".into(),
                    ..request("x", &[])
                },
                &alice,
            ))
            .await
            .unwrap_err(),
        ),
        (
            "bad request id",
            svc.request(as_role(
                pb::RequestInstanceRequest {
                    request_id: rid("", 1),
                    ..request("x", &[])
                },
                &alice,
            ))
            .await
            .unwrap_err(),
        ),
        (
            "duplicate partition",
            svc.load_computer(as_role(
                pb::LoadComputerRequest {
                    partitions: vec![
                        pb::PartitionSpec {
                            id: "p".into(),
                            ..Default::default()
                        },
                        pb::PartitionSpec {
                            id: "p".into(),
                            ..Default::default()
                        },
                    ],
                    ..computer("X")
                },
                &admin,
            ))
            .await
            .unwrap_err(),
        ),
        (
            "bad journal",
            svc.use_computer(as_role(
                pb::UseComputerRequest {
                    computer_id: "X".into(),
                    tioxml: "<not".into(),
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .unwrap_err(),
        ),
    ] {
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }
    let missing = svc
        .get_computer(as_role(
            pb::GetComputerRequest {
                computer_id: "NONE".into(),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    // A report guarded by an instance the partition does not hold is refused.
    let (c, p) = (first.computer_id.clone(), first.partition_id.clone());
    let late = svc
        .report_instance(as_role(
            pb::ReportInstanceRequest {
                partition: part(&c, &p),
                state: "started".into(),
                instance_id: "SOFTINST-999".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::NotFound);
    assert!(
        domain(&running.replica.state.read().unwrap()) == before,
        "refusals changed nothing"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_and_a_node_over_http2_with_mutual_tls_and_a_watch() {
    let (dir, running, founding) = master().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    running.serve_slap(&addr, false).await.unwrap();
    let r = running.replica.clone();
    let issue = |role: Role| {
        let r = r.clone();
        async move {
            master_node::certificates::issue(&r, role, 1, None)
                .await
                .unwrap()
                .issued
        }
    };
    let node_cert = issue(Role::Computer("X".into())).await;
    let user_cert = issue(Role::User("alice".into())).await;
    let client = |cert: &master_node::pki::Issued| {
        let identity =
            slap_proto::tls::ClientIdentity::from_pem(&cert.certificate.cert_pem.to_text(), &cert.key_pem).unwrap();
        let config = slap_proto::tls::client_config(
            &slap_proto::tls::Trust::ca_pem(&founding.authority.cert_pem).unwrap(),
            Some(&identity),
            slap_proto::tls::Expect::AnyReplica,
        )
        .unwrap();
        pb::master_client::MasterClient::new(slap_proto::tls::channel(&addr, config).unwrap())
    };
    let admin_id =
        slap_proto::tls::ClientIdentity::from_pem(&founding.admin_cert_pem, &founding.admin_key_pem).unwrap();
    let admin_config = slap_proto::tls::client_config(
        &slap_proto::tls::Trust::ca_pem(&founding.authority.cert_pem).unwrap(),
        Some(&admin_id),
        slap_proto::tls::Expect::AnyReplica,
    )
    .unwrap();
    let mut admin = pb::master_client::MasterClient::new(slap_proto::tls::channel(&addr, admin_config).unwrap());
    let (mut node, mut user) = (client(&node_cert), client(&user_cert));

    // The SLAP server needs a moment to load its TLS identity.
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.load_computer(computer("X")).await.is_err() {
        assert!(Instant::now() < deadline, "the native API did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    admin
        .supply(pb::SupplyRequest {
            computer_id: "X".into(),
            url: SR.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let doc = node
        .get_computer(pb::GetComputerRequest {
            computer_id: "X".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(doc.software.len(), 1);
    let mut watch = node
        .watch_computer(pb::WatchComputerRequest {
            computer_id: "X".into(),
            known_revision: doc.revision,
        })
        .await
        .unwrap()
        .into_inner();

    // A request wakes the node's watch within a second.
    let asked = Instant::now();
    let inst = user
        .request(pb::RequestInstanceRequest {
            request_id: rid("alice", 1),
            parameters: [("greeting".to_string(), "<&\"é>".to_string())].into_iter().collect(),
            ..request("blog", &[])
        })
        .await
        .unwrap()
        .into_inner();
    let woke = tokio::time::timeout(Duration::from_secs(1), watch.message())
        .await
        .expect("woken within a second")
        .unwrap()
        .unwrap();
    assert!(woke.revision > doc.revision);
    assert!(asked.elapsed() < Duration::from_secs(1));
    let doc = node
        .get_computer(pb::GetComputerRequest {
            computer_id: "X".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mine = doc
        .partitions
        .iter()
        .find_map(|p| p.instance.clone().filter(|i| i.id == inst.id))
        .expect("the node sees the instance");
    assert_eq!(mine.parameters["greeting"], "<&\"é>");

    // The node publishes, the user reads it back.
    node.publish_connection(pb::PublishConnectionRequest {
        request_id: rid("node-x", 1),
        partition: part(&mine.computer_id, &mine.partition_id),
        connection: [("url".to_string(), "https://blog/".to_string())].into_iter().collect(),
        instance_id: inst.id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let read = user
        .get_instance(pb::GetInstanceRequest {
            title: "blog".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.connection["url"], "https://blog/");
    // The node cannot act as the user, nor the user as the node.
    assert_eq!(
        node.request(request("x", &[])).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        user.get_computer(pb::GetComputerRequest {
            computer_id: "X".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::PermissionDenied
    );
    running.shutdown().await;
    drop(dir);
}

/// Offers: who may set one, what is refused (and leaves the state as it
/// was), what the market lists, and the terms an allocation shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_are_the_owners_and_bad_ones_store_nothing() {
    let (_dir, running, _f) = master().await;
    let svc = MasterService::new(running.replica.clone());
    let admin = Role::Admin;
    two_computers(&svc).await;
    svc.set_computer_owner(as_role(
        pb::SetComputerOwnerRequest {
            computer_id: "X".into(),
            owner: "carol".into(),
            ..Default::default()
        },
        &admin,
    ))
    .await
    .unwrap();
    // Y, the operator's, sells at the catalog.
    svc.set_price(as_role(
        pb::SetPriceRequest {
            resource: "hosting".into(),
            unit_price: "0.03".into(),
            currency: "EUR".into(),
            ..Default::default()
        },
        &admin,
    ))
    .await
    .unwrap();
    let carol = Role::User("carol".into());
    let bob = Role::User("bob".into());
    let set = |o: pb::Offer, role: &Role| {
        let (svc, role) = (&svc, role.clone());
        async move {
            svc.set_offer(as_role(
                pb::SetOfferRequest {
                    offer: Some(o),
                    ..Default::default()
                },
                &role,
            ))
            .await
        }
    };
    let state = running.replica.state.clone();
    let before = domain(&state.read().unwrap());
    let mut unknown_resource = offer_of("X", "0.05", "EUR");
    unknown_resource.resource_prices.insert("gold".into(), "1".into());
    let mut too_many = offer_of("X", "0.05", "EUR");
    too_many.partitions = 9;
    let refusals = [
        (
            offer_of("X", "-0.05", "EUR"),
            &carol,
            Code::InvalidArgument,
            "not negative",
        ),
        (
            offer_of("X", "cheap", "EUR"),
            &carol,
            Code::InvalidArgument,
            "not an amount",
        ),
        (offer_of("X", "0.05", "XYZ"), &carol, Code::InvalidArgument, "ISO 4217"),
        (offer_of("X", "0.05", ""), &carol, Code::InvalidArgument, "ISO 4217"),
        (unknown_resource, &carol, Code::InvalidArgument, "gold"),
        (too_many, &carol, Code::InvalidArgument, "has 3 partitions"),
        (offer_of("X", "0.05", "EUR"), &bob, Code::PermissionDenied, "not yours"),
        (
            offer_of("Y", "0.05", "EUR"),
            &carol,
            Code::PermissionDenied,
            "not yours",
        ),
        (offer_of("Z", "0.05", "EUR"), &admin, Code::NotFound, "does not exist"),
    ];
    for (o, role, code, says) in refusals {
        let what = format!("{o:?} by {role}");
        let s = set(o, role).await.expect_err(&what);
        assert_eq!(s.code(), code, "{what}: {s:?}");
        assert!(
            s.message().contains(says),
            "{what}: {} should say {says:?}",
            s.message()
        );
        assert!(
            domain(&state.read().unwrap()) == before,
            "{what}: a refused offer changed the state"
        );
    }
    // The owner's offer, listed with its provider.
    set(offer_of("X", "0.05", "EUR"), &carol).await.unwrap();
    let listed = svc
        .list_offers(as_role(pb::ListOffersRequest::default(), &bob))
        .await
        .unwrap()
        .into_inner()
        .offers;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].computer_id.as_str(),
            listed[0].provider.as_str(),
            listed[0].price_per_hour.as_str()
        ),
        ("X", "carol", "0.050000")
    );
    // A request within its conditions takes it, and shows its terms; one
    // that no offer meets waits with its reason.
    let alice = Role::User("alice".into());
    let got = svc
        .request(as_role(
            request("a", &[("max_price", "0.06 EUR"), ("region", "eu")]),
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.computer_id, "X");
    let terms = got.agreement.expect("terms");
    assert_eq!(
        (terms.provider.as_str(), terms.price_per_hour_micros),
        ("carol", 50_000)
    );
    let waits = svc
        .request(as_role(request("b", &[("max_price", "0.01 EUR")]), &alice))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !waits.placed && waits.pending_reason.contains("max_price"),
        "neither X at 0.05 nor Y at the catalog's 0.03: {waits:?}"
    );
    let bad = svc
        .request(as_role(request("c", &[("max_price", "0.01")]), &alice))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("needs a currency"), "{}", bad.message());
    // The statement is the provider's.
    let statement = |role: &Role| {
        let (svc, role) = (&svc, role.clone());
        async move {
            svc.get_usage(as_role(
                pb::UsageReportRequest {
                    provider: "carol".into(),
                    period: "2026-11".into(),
                    ..Default::default()
                },
                &role,
            ))
            .await
        }
    };
    statement(&carol).await.unwrap();
    assert_eq!(statement(&bob).await.unwrap_err().code(), Code::PermissionDenied);
    // Withdrawn, an owner's computer sells nothing more.
    svc.withdraw_offer(as_role(
        pb::WithdrawOfferRequest {
            computer_id: "X".into(),
            ..Default::default()
        },
        &carol,
    ))
    .await
    .unwrap();
    let after = svc
        .request(as_role(request("d", &[("computer_guid", "X")]), &alice))
        .await
        .unwrap()
        .into_inner();
    assert!(!after.placed, "{after:?}");
    running.shutdown().await;
}
