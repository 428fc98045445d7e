//! The cluster port over mutual TLS: who may call what, and what is refused
//! at the handshake. In-process, one replica, real TLS on loopback.

use std::time::Duration;

use master_node::api::ClientWrite;
use master_node::client::{Client, Credentials};
use master_node::founding::Founding;
use master_node::pki;
use master_node::raft::Timing;
use master_node::server::Running;
use master_node::state::{Command, Reply, Role};
use slap_proto::cluster::raft_client::RaftClient;
use slap_proto::cluster::RaftPayload;
use slap_proto::tls::{ClientIdentity, Expect, Trust};

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

async fn cluster() -> (tempfile::TempDir, Running, Founding, String) {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let (running, founding) = Running::single_replica_cluster(dir.path(), &addr, &Timing::default())
        .await
        .unwrap();
    (dir, running, founding, addr)
}

/// Credentials for a certificate the cluster's CA signs for `role`.
fn signed_for(founding: &Founding, role: &Role) -> (Credentials, master_node::state::Certificate) {
    let issued = pki::issue(&founding.authority, role, pki::now_secs(), 1, &["localhost".into()]).unwrap();
    let creds = Credentials::identity(
        &founding.authority.cert_pem,
        &issued.certificate.cert_pem.to_text(),
        &issued.key_pem,
    )
    .unwrap();
    (creds, issued.certificate)
}

fn set_computer(id: &str) -> Command {
    Command::SetComputer {
        id: id.into(),
        address: String::new(),
        netmask: String::new(),
        capacity: Default::default(),
        categories: Default::default(),
        partitions: vec![],
    }
}

fn computers(running: &Running) -> Vec<String> {
    running
        .replica
        .state
        .read()
        .unwrap()
        .computers
        .keys()
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_an_administrator_or_a_replica() {
    let (_dir, running, founding, addr) = cluster().await;
    let admin = Credentials::identity(
        &founding.authority.cert_pem,
        &founding.admin_cert_pem,
        &founding.admin_key_pem,
    )
    .unwrap();
    let client = Client::new(std::slice::from_ref(&addr), &admin).unwrap();
    let (reply, _) = client.write(set_computer("COMP-ADMIN")).await.unwrap();
    assert_eq!(reply, Reply::Done);

    // No certificate: status yes, writes no.
    let anonymous = Credentials::ca(&founding.authority.cert_pem).unwrap();
    assert!(Client::status_of(&addr, &anonymous).await.is_ok());
    let mut client = Client::new(std::slice::from_ref(&addr), &anonymous).unwrap();
    client.patience = Duration::from_secs(1);
    let err = client.write(set_computer("COMP-ANON")).await.unwrap_err().to_string();
    assert!(
        err.contains("needs a replica's or an administrator's certificate"),
        "{err}"
    );

    // A user's certificate: authenticated, but not allowed.
    let (user, _) = signed_for(&founding, &Role::User("alice".into()));
    let mut client = Client::new(std::slice::from_ref(&addr), &user).unwrap();
    client.patience = Duration::from_secs(1);
    let err = client.write(set_computer("COMP-USER")).await.unwrap_err().to_string();
    assert!(err.contains("not user alice"), "{err}");

    // The join token pins the CA: it reaches the cluster, but writes nothing.
    let by_token = Credentials::token(&founding.token).unwrap();
    assert!(Client::status_of(&addr, &by_token).await.is_ok());

    assert_eq!(
        computers(&running),
        ["COMP-ADMIN"],
        "only the administrator's write landed"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_revoked_certificates_are_refused_at_the_handshake() {
    let (_dir, running, founding, addr) = cluster().await;

    // A certificate from another CA.
    let other = Founding::new(&["127.0.0.1:1"]).unwrap();
    let foreign = Credentials::identity(
        &founding.authority.cert_pem,
        &other.admin_cert_pem,
        &other.admin_key_pem,
    )
    .unwrap();
    assert!(Client::status_of(&addr, &foreign).await.is_err());

    // A client that pins another cluster's CA refuses this server.
    let wrong_pin = Credentials::token(&other.token).unwrap();
    assert!(Client::status_of(&addr, &wrong_pin).await.is_err());

    // An administrator's certificate, recorded then revoked: refused from
    // the next handshake on, and on a connection opened before.
    let (admin2, cert) = signed_for(&founding, &Role::Admin);
    running
        .replica
        .write(ClientWrite {
            request_id: None,
            command: Command::RecordCertificate {
                certificate: cert.clone(),
                registration: None,
            },
        })
        .await
        .unwrap();
    let mut early = Client::new(std::slice::from_ref(&addr), &admin2).unwrap();
    early.patience = Duration::from_secs(1);
    early.write(set_computer("COMP-BEFORE")).await.unwrap();
    running
        .replica
        .write(ClientWrite {
            request_id: None,
            command: Command::RevokeCertificate { serial: cert.serial },
        })
        .await
        .unwrap();
    assert!(
        early.write(set_computer("COMP-AFTER")).await.is_err(),
        "a revoked certificate acts no more on an open connection"
    );
    assert!(Client::status_of(&addr, &admin2).await.is_err(), "nor on a new one");
    assert_eq!(computers(&running), ["COMP-BEFORE"]);
    running.shutdown().await;
}

/// A Raft vote request from `candidate`, postcard-encoded as replicas send it.
fn vote_from(candidate: u64) -> Vec<u8> {
    // Term 0: the replica refuses the vote, so the test disturbs nothing.
    let rpc =
        openraft::raft::VoteRequest::<master_node::raft::MasterTypes>::new(openraft::Vote::new(0, candidate), None);
    postcard::to_allocvec(&rpc).unwrap()
}

async fn raft_client(founding: &Founding, role: &Role, addr: &str) -> RaftClient<tonic::transport::Channel> {
    let issued = pki::issue(&founding.authority, role, pki::now_secs(), 1, &["localhost".into()]).unwrap();
    let identity = ClientIdentity::from_pem(&issued.certificate.cert_pem.to_text(), &issued.key_pem).unwrap();
    let config = slap_proto::tls::client_config(
        &Trust::ca_pem(&founding.authority.cert_pem).unwrap(),
        Some(&identity),
        Expect::Replica(1),
    )
    .unwrap();
    RaftClient::new(slap_proto::tls::channel(addr, config).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_speaks_raft_only_for_itself() {
    let (_dir, running, founding, addr) = cluster().await;
    let mut seven = raft_client(&founding, &Role::Replica(7), &addr).await;
    let answered = seven.vote(RaftPayload { data: vote_from(7) }).await;
    assert!(answered.is_ok(), "replica 7 may ask for its own vote: {answered:?}");
    let forged = seven.vote(RaftPayload { data: vote_from(1) }).await.unwrap_err();
    assert_eq!(forged.code(), tonic::Code::PermissionDenied);
    assert!(forged.message().contains("as replica 1"), "{}", forged.message());

    let mut admin = raft_client(&founding, &Role::Admin, &addr).await;
    let denied = admin.vote(RaftPayload { data: vote_from(1) }).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    // Dialing replica 2 at replica 1's address: the client refuses the server.
    let issued = pki::issue(&founding.authority, &Role::Replica(7), pki::now_secs(), 1, &[]).unwrap();
    let identity = ClientIdentity::from_pem(&issued.certificate.cert_pem.to_text(), &issued.key_pem).unwrap();
    let config = slap_proto::tls::client_config(
        &Trust::ca_pem(&founding.authority.cert_pem).unwrap(),
        Some(&identity),
        Expect::Replica(2),
    )
    .unwrap();
    let mut wrong = RaftClient::new(slap_proto::tls::channel(&addr, config).unwrap());
    assert!(wrong.vote(RaftPayload { data: vote_from(7) }).await.is_err());
    running.shutdown().await;
}

/// Every cluster-port method against every role: who may call it without
/// the join token, and that a refusal changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cluster_method_is_checked_against_the_callers_role() {
    use slap_proto::cluster::cluster_client::ClusterClient;
    use slap_proto::cluster::*;
    let (_dir, running, founding, addr) = cluster().await;
    let roles = [
        ("user A", Role::User("alice".into())),
        ("user B", Role::User("bob".into())),
        ("computer X", Role::Computer("X".into())),
        ("partition of X", Role::Partition("X".into(), "p0".into())),
        ("gateway", Role::Gateway("gw".into())),
        ("replica 7", Role::Replica(7)),
        ("admin", Role::Admin),
    ];
    let write = postcard::to_allocvec(&ClientWrite {
        request_id: None,
        command: set_computer("COMP-MATRIX"),
    })
    .unwrap();
    let query = postcard::to_allocvec(&master_node::api::Query::StateDigest).unwrap();
    let replica_or_admin = ["replica 7", "admin"];
    for (name, role) in &roles {
        let (creds, _) = signed_for(&founding, role);
        let mut c = ClusterClient::new(creds.channel(&addr).unwrap());
        let before = computers(&running);
        let allowed = |ok: bool, method: &str, r: Result<(), tonic::Status>| match (ok, r) {
            (true, Err(s)) => assert!(
                !matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated),
                "{name} {method} refused: {s:?}"
            ),
            (false, Ok(())) => panic!("{name} {method} was allowed"),
            (false, Err(s)) => assert!(
                matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated),
                "{name} {method}: {s:?}"
            ),
            (true, Ok(())) => {}
        };
        let may_write = replica_or_admin.contains(name);
        let w = c
            .write(WriteRequest {
                proposal: write.clone(),
                token: String::new(),
            })
            .await
            .map(|_| ());
        allowed(may_write, "Write", w);
        let wb = c
            .write_batch(WriteBatchRequest {
                proposals: vec![write.clone()],
            })
            .await
            .map(|_| ());
        allowed(may_write, "WriteBatch", wb);
        let rd = c
            .read(ReadRequest {
                query: query.clone(),
                local: true,
                token: String::new(),
            })
            .await
            .map(|_| ());
        allowed(may_write, "Read", rd);
        allowed(true, "Status", c.status(StatusRequest {}).await.map(|_| ()));
        // Without the token, operator calls are an administrator's only.
        let admin_only = *name == "admin";
        let list = c
            .certificates(CertificatesRequest {
                action: "list".into(),
                ..Default::default()
            })
            .await
            .map(|_| ());
        allowed(admin_only, "Certificates list", list);
        let leave = c
            .leave(LeaveRequest {
                token: String::new(),
                node_id: 99,
            })
            .await
            .map(|_| ());
        allowed(admin_only, "Leave", leave);
        let promote = c
            .promote(PromoteRequest {
                token: String::new(),
                node_id: 99,
                addr: "127.0.0.1:1".into(),
            })
            .await
            .map(|_| ());
        allowed(admin_only, "Promote", promote);
        if !may_write {
            assert_eq!(computers(&running), before, "{name}: a refused call changed the state");
        }
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_at_the_handshake() {
    let (_dir, running, founding, addr) = cluster().await;
    // Valid from an hour ago for zero days: expired already.
    let issued = pki::issue(&founding.authority, &Role::Admin, pki::now_secs() - 7200, 0, &[]).unwrap();
    let expired = Credentials::identity(
        &founding.authority.cert_pem,
        &issued.certificate.cert_pem.to_text(),
        &issued.key_pem,
    )
    .unwrap();
    assert!(Client::status_of(&addr, &expired).await.is_err());
    running.shutdown().await;
}
