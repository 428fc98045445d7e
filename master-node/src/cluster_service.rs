//! The gRPC `Cluster` service: membership, status, forwarded writes and
//! reads. Membership changes run on the leader; any replica forwards them.
//!
//! Who may call what (the caller is the certificate of the connection, see
//! `cluster_tls`):
//!
//! | calls | allowed |
//! |---|---|
//! | `Status` | anyone who reached the port over TLS |
//! | `Write`, `WriteBatch`, `Read` | replicas (forwarding) and administrators |
//! | `Join`, `Promote`, `Leave`, `Certificates` | the join token, or an administrator |
//! | `Certificates` action `register` | a one-time computer registration token |
//!
//! A handler: must not import the server that mounts it (`server`).

use std::sync::Arc;

use slap_proto::cluster::cluster_server::Cluster;
use slap_proto::cluster::*;
use tonic::{Request, Response, Status};

use crate::api::ClientWrite;
use crate::cluster_tls::Peer;
use crate::replica::Replica;
use crate::state::Role;

/// Serves the cluster API of one replica.
pub struct ClusterService {
    replica: Arc<Replica>,
}

impl ClusterService {
    pub fn new(replica: Arc<Replica>) -> Self {
        Self { replica }
    }

    /// Writes and reads: replicas forwarding, administrators, or an operator
    /// with the join token.
    fn replica_admin_or_token(&self, peer: &Peer, token: &str, what: &str) -> Result<(), Status> {
        if token.is_empty() {
            return peer.require_replica_or_admin(&self.replica.state, what).map(|_| ());
        }
        self.replica.check_token(token)
    }

    /// An operator's call: an administrator's certificate, or the join token.
    fn operator(&self, peer: &Peer, token: &str) -> Result<(), Status> {
        if peer.live_role(&self.replica.state) == Some(Role::Admin) {
            return Ok(());
        }
        if token.is_empty() {
            return Err(Status::unauthenticated(
                "this call needs the cluster's join token (--token or MASTER_JOIN_TOKEN) or an administrator's certificate",
            ));
        }
        self.replica.check_token(token)
    }

    /// Writes a command of the cluster's own; a refusal becomes a status.
    async fn cluster_write(&self, command: crate::state::Command) -> Result<(), Status> {
        let (reply, _) = self
            .replica
            .write(ClientWrite {
                request_id: None,
                command,
            })
            .await?;
        match reply {
            crate::state::Reply::Refused(crate::state::Refusal::NotYet(m)) => Err(Status::failed_precondition(m)),
            crate::state::Reply::Refused(r) => Err(Status::failed_precondition(r.to_string())),
            _ => Ok(()),
        }
    }

    /// Whether the caller presented the live certificate `serial`.
    fn holds(&self, peer: &Peer, serial: &str) -> bool {
        let Some(fp) = peer.fingerprint else { return false };
        let state = self.replica.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .certificates
            .get(&fp)
            .is_some_and(|c| !c.revoked && c.serial.eq_ignore_ascii_case(serial))
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let peer = Peer::of(&req);
        let req = req.into_inner();
        if req.addr.parse::<std::net::SocketAddr>().is_err() && !req.addr.contains(':') {
            return Err(Status::invalid_argument(format!(
                "{:?} is not a host:port address",
                req.addr
            )));
        }
        if req.csr_pem.is_empty() {
            return Err(Status::invalid_argument(
                "a join carries a certificate signing request for the joiner's key (an older master-node?)",
            ));
        }
        // Checked here as well as on the leader: a wrong token fails fast.
        self.operator(&peer, &req.token)?;
        // A release older than the cluster's version could not apply its log.
        let cluster_version = self
            .replica
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .effective_version();
        let speaks = req.speaks_version.max(1);
        if speaks < cluster_version {
            return Err(Status::failed_precondition(format!(
                "this cluster is at version {cluster_version} and the joiner speaks only up to version {speaks}: \
                 join with a newer master-node"
            )));
        }
        match self.replica.leader_client().await? {
            Some(mut leader) => leader.join(req).await,
            None => {
                let (node_id, certificate_pem) = self.replica.admit(&req.addr, &req.csr_pem, &req.hosts).await?;
                tracing::info!(replica = node_id, addr = %req.addr, "reserved a replica id and signed its certificate");
                Ok(Response::new(JoinReply {
                    cluster_id: self.replica.cluster_id.clone(),
                    node_id,
                    certificate_pem,
                    ca_pem: self.replica.tls.ca_pem(),
                }))
            }
        }
    }

    async fn promote(&self, req: Request<PromoteRequest>) -> Result<Response<PromoteReply>, Status> {
        let peer = Peer::of(&req);
        let req = req.into_inner();
        self.operator(&peer, &req.token)?;
        match self.replica.leader_client().await? {
            Some(mut leader) => leader.promote(req).await,
            None => {
                let members = self.replica.promote(req.node_id, &req.addr).await?;
                Ok(Response::new(PromoteReply { members }))
            }
        }
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        let peer = Peer::of(&req);
        let req = req.into_inner();
        self.operator(&peer, &req.token)?;
        match self.replica.leader_client().await? {
            Some(mut leader) => leader.leave(req).await,
            None => {
                let members = self.replica.remove(req.node_id).await?;
                Ok(Response::new(LeaveReply { members }))
            }
        }
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let _ = req;
        let mut status = self.replica.local_status();
        status.expiring = self.replica.expiring_certificates();
        Ok(Response::new(status))
    }

    async fn write(&self, req: Request<WriteRequest>) -> Result<Response<WriteReply>, Status> {
        self.replica_admin_or_token(&Peer::of(&req), &req.get_ref().token, "Write")?;
        // A follower passes the bytes to the leader and its answer back.
        let (reply, log_index) = self.replica.write_encoded(req.into_inner().proposal).await?;
        Ok(Response::new(WriteReply { reply, log_index }))
    }

    async fn write_batch(&self, req: Request<WriteBatchRequest>) -> Result<Response<WriteBatchReply>, Status> {
        Peer::of(&req).require_replica_or_admin(&self.replica.state, "WriteBatch")?;
        // Decoded one by one: a follower passes its clients' bytes through,
        // so one undecodable write is that client's error, not the batch's.
        // Proposed concurrently, so the proposer gathers them into one entry.
        let results = futures::future::join_all(req.into_inner().proposals.iter().map(|p| async move {
            let write = crate::replica::decode_write(p)?;
            self.replica.write(write).await
        }))
        .await;
        let outcomes = results
            .into_iter()
            .map(|r| match r {
                Ok((reply, log_index)) => WriteOutcome {
                    reply: postcard::to_allocvec(&reply).expect("replies encode"),
                    log_index,
                    code: 0,
                    error: String::new(),
                },
                Err(status) => WriteOutcome {
                    reply: Vec::new(),
                    log_index: 0,
                    code: status.code() as i32,
                    error: status.message().to_string(),
                },
            })
            .collect();
        Ok(Response::new(WriteBatchReply { outcomes }))
    }

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<ReadReply>, Status> {
        self.replica_admin_or_token(&Peer::of(&req), &req.get_ref().token, "Read")?;
        let req = req.into_inner();
        let query = postcard::from_bytes(&req.query)
            .map_err(|e| Status::invalid_argument(format!("undecodable query: {e}")))?;
        let answer = if req.local {
            self.replica.read_local(&query)
        } else {
            self.replica.read(&query).await?
        };
        Ok(Response::new(ReadReply {
            answer: postcard::to_allocvec(&answer).expect("answers encode"),
        }))
    }

    type BackupStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<BackupChunk, Status>> + Send>>;

    async fn backup(&self, req: Request<BackupRequest>) -> Result<Response<Self::BackupStream>, Status> {
        self.replica_admin_or_token(&Peer::of(&req), &req.get_ref().token, "Backup")?;
        let file = self.replica.backup(&req.get_ref().token).await?;
        tracing::info!(bytes = file.len(), "backup taken");
        // Pieces of 1 MiB: well under any gRPC message limit.
        let chunks: Vec<Result<BackupChunk, Status>> = file
            .chunks(1 << 20)
            .map(|data| Ok(BackupChunk { data: data.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn certificates(&self, req: Request<CertificatesRequest>) -> Result<Response<CertificatesReply>, Status> {
        use crate::certificates::{issue, IssueError};
        use crate::state::{Command, Reply};
        let peer = Peer::of(&req);
        let req = req.into_inner();
        let days = if req.days == 0 {
            crate::pki::DEFAULT_DAYS
        } else {
            req.days
        };
        let to_status = |e: IssueError| match e {
            IssueError::NoAuthority => Status::unavailable(e.to_string()),
            IssueError::Refused(m) => Status::permission_denied(m),
            other => Status::internal(other.to_string()),
        };
        let name_ok = |n: &str| {
            !n.is_empty() && n.len() <= 128 && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        };
        let issued_reply = |h: crate::certificates::Handover| CertificatesReply {
            certificate_pem: h.cert_pem,
            key_pem: h.issued.key_pem,
            ca_pem: h.ca_pem,
            ..Default::default()
        };
        if req.action == "register" {
            // Authenticated by the one-time registration token, not the join token.
            if !name_ok(&req.name) {
                return Err(Status::invalid_argument("register needs the computer id"));
            }
            let sha = crate::identity::sha256_hex(&req.registration);
            let reply = issue(&self.replica, Role::Computer(req.name.clone()), days, Some(sha))
                .await
                .map_err(to_status)?;
            return Ok(Response::new(issued_reply(reply)));
        }
        // As long as the old one, unless asked otherwise.
        let lifetime = if req.seconds > 0 { req.seconds } else { req.days * 86400 };
        if req.action == "renew" && self.holds(&peer, &req.serial) {
            // A holder renews its own certificate, authenticated by it.
            let renewed = crate::certificates::renew(&self.replica, &req.serial, lifetime).await?;
            return Ok(Response::new(issued_reply(renewed)));
        }
        self.operator(&peer, &req.token)?;
        match req.action.as_str() {
            "user" | "admin" => {
                let role = if req.action == "admin" {
                    Role::Admin
                } else {
                    if !name_ok(&req.name) {
                        return Err(Status::invalid_argument(
                            "a user name is 1 to 128 letters, digits, '-', '_', '.' or '@'",
                        ));
                    }
                    Role::User(req.name.clone())
                };
                let reply = issue(&self.replica, role, days, None).await.map_err(to_status)?;
                Ok(Response::new(issued_reply(reply)))
            }
            "gateway" => {
                if !name_ok(&req.name) {
                    return Err(Status::invalid_argument("a gateway needs a name"));
                }
                let mut hosts = vec!["localhost".to_string()];
                hosts.extend(req.hosts.iter().filter(|h| !h.is_empty() && *h != "localhost").cloned());
                let reply = crate::certificates::issue_for_hosts(
                    &self.replica,
                    Role::Gateway(req.name.clone()),
                    days,
                    None,
                    &hosts,
                )
                .await
                .map_err(to_status)?;
                Ok(Response::new(issued_reply(reply)))
            }
            "computer-token" => {
                if !name_ok(&req.name) {
                    return Err(Status::invalid_argument("computer-token needs the computer id"));
                }
                // The token pins the CA, so the node can trust this port at registration.
                let ca_pin = slap_proto::tls::pem_sha256(&self.replica.tls.ca_pem())
                    .map_err(|e| Status::internal(e.to_string()))?;
                let token = format!("SLAPREG2.{}.{ca_pin}", hex::encode(rand::random::<[u8; 20]>()));
                self.replica
                    .write(ClientWrite {
                        request_id: None,
                        command: Command::AddRegistration {
                            computer: req.name.clone(),
                            token_sha256: crate::identity::sha256_hex(&token),
                        },
                    })
                    .await?;
                Ok(Response::new(CertificatesReply {
                    registration: token,
                    ..Default::default()
                }))
            }
            "revoke" => {
                let (reply, _) = self
                    .replica
                    .write(ClientWrite {
                        request_id: None,
                        command: Command::RevokeCertificate {
                            serial: req.serial.clone(),
                        },
                    })
                    .await?;
                match reply {
                    Reply::Refused(r) => Err(Status::not_found(r.to_string())),
                    _ => Ok(Response::new(CertificatesReply::default())),
                }
            }
            "renew" => {
                let renewed = crate::certificates::renew(&self.replica, &req.serial, lifetime).await?;
                Ok(Response::new(issued_reply(renewed)))
            }
            "ca-rotate" => {
                let (ca, cluster_id) = {
                    let state = self.replica.state.read().unwrap_or_else(|e| e.into_inner());
                    if state.rotation.is_some() {
                        return Err(Status::failed_precondition(
                            "a CA rotation is already under way: finish it first (`master-node ca finish`)",
                        ));
                    }
                    (state.authority.clone(), self.replica.cluster_id.clone())
                };
                let ca = ca.ok_or_else(|| Status::unavailable(IssueError::NoAuthority.to_string()))?;
                let (authority, cross_pem) = crate::pki::successor(&ca, &cluster_id, crate::pki::now_secs())
                    .map_err(|e| Status::internal(e.to_string()))?;
                let trust = format!("{}{}", authority.cert_pem, ca.cert_pem);
                self.cluster_write(Command::RotateAuthority { authority, cross_pem })
                    .await?;
                tracing::info!("CA rotation started: a new CA signs from now on");
                Ok(Response::new(CertificatesReply {
                    ca_pem: trust,
                    ..Default::default()
                }))
            }
            "ca-finish" => {
                let stragglers = self.replica.certificates_from_previous_ca()?;
                if !stragglers.is_empty() && !req.force {
                    let mut by_kind = std::collections::BTreeMap::<&str, usize>::new();
                    for (role, _) in &stragglers {
                        *by_kind.entry(role.kind()).or_default() += 1;
                    }
                    let some: Vec<String> = stragglers.iter().take(5).map(|(r, s)| format!("{s} ({r})")).collect();
                    let partitions = if by_kind.contains_key("partition") {
                        "; partitions' certificates are replaced by the leader itself, try again in a moment"
                    } else {
                        ""
                    };
                    return Err(Status::failed_precondition(format!(
                        "{} live certificates are still from the old CA ({by_kind:?}; e.g. {}): renew them \
                         (`cert renew SERIAL --out DIR`) or revoke them, or finish with --force and their holders \
                         are refused from then on{partitions}",
                        stragglers.len(),
                        some.join(", ")
                    )));
                }
                self.cluster_write(Command::FinishRotation).await?;
                tracing::info!(
                    cut = stragglers.len(),
                    "CA rotation finished: the old CA is trusted no more"
                );
                Ok(Response::new(CertificatesReply::default()))
            }
            "list" => {
                let state = self.replica.state.read().unwrap_or_else(|e| e.into_inner());
                let mut certificates: Vec<CertificateInfo> = state
                    .certificates
                    .values()
                    .map(|c| CertificateInfo {
                        serial: c.serial.clone(),
                        role: c.role.to_string(),
                        not_after: c.not_after,
                        revoked: c.revoked,
                    })
                    .collect();
                certificates.sort_by(|a, b| a.role.cmp(&b.role).then(a.serial.cmp(&b.serial)));
                Ok(Response::new(CertificatesReply {
                    certificates,
                    ca_pem: state.authority.as_ref().map(|a| a.cert_pem.clone()).unwrap_or_default(),
                    ..Default::default()
                }))
            }
            other => Err(Status::invalid_argument(format!(
                "unknown action {other:?}: user, admin, gateway, computer-token, register, revoke, renew or list"
            ))),
        }
    }
}
