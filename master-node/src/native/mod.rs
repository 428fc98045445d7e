//! The native API (`slapos.master.v1.Master`): SLAP's operations, typed,
//! over gRPC, plus a watch of a computer's revision.
//!
//! It is served on the SLAP port (HTTP/2 next to SLAP's HTTP/1.1, same
//! TLS), so a node, a user or a gateway has one address per replica. Every
//! call is checked against the caller's certificate with the same table as
//! SLAP (`authz`); without TLS (`--insecure-http`) nothing is checked.
//!
//! Writes go through [`Replica::write`] with the caller's request id, so a
//! retry after a lost answer (a gateway moving to another replica, a client
//! timing out across an election) gets the first answer back.
//! `GetInstance` and `ListInstances` are linearizable reads.
//!
//! A handler: must not import `slap`, `dashboard`, `metrics` or the server
//! that mounts it.

mod convert;
mod feed;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use slap_proto::master as pb;
use slap_proto::master::master_server::Master as MasterApi;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::api::{Answer, ClientWrite, Query};
use crate::authz::{self, Caller, Need};
use crate::replica::Replica;
use crate::state::{
    Command, Instance, InstanceReport, Refusal, Reply, RequestOrigin, Role, Scope, SoftwareReport, SupplyState,
};

pub use convert::{computer_document, instance_message};

/// Serves the native API of one replica.
pub struct MasterService {
    replica: Arc<Replica>,
}

impl MasterService {
    pub fn new(replica: Arc<Replica>) -> Self {
        Self { replica }
    }

    /// The caller's role, checked against `need`. `Ok(None)`: no TLS
    /// (development mode), everything allowed.
    fn authorize<T>(&self, req: &Request<T>, need: &Need) -> Result<Option<Role>, Status> {
        let Some(role) = self.caller(req)? else { return Ok(None) };
        authz::allows(&role, need).map_err(|reason| {
            tracing::info!(caller = %role, ?need, %reason, "native call denied");
            Status::permission_denied(format!("forbidden: {reason}"))
        })?;
        Ok(Some(role))
    }

    /// The connection's role, or, through a gateway, the caller it names.
    fn caller<T>(&self, req: &Request<T>) -> Result<Option<Role>, Status> {
        let Some(Caller(role)) = req.extensions().get::<Caller>().cloned() else {
            return Ok(None);
        };
        let headers = req.metadata().clone().into_headers();
        authz::effective_role(&self.replica, role, &headers)
            .map(Some)
            .map_err(|reason| Status::permission_denied(format!("forbidden: {reason}")))
    }

    async fn write(&self, request_id: Option<pb::RequestId>, command: Command) -> Result<(Reply, u64), Status> {
        let request_id = convert::request_id(request_id)?;
        let (reply, index) = self.replica.write(ClientWrite { request_id, command }).await?;
        match reply {
            Reply::Refused(r) => Err(refusal(r)),
            other => Ok((other, index)),
        }
    }

    async fn done(&self, request_id: Option<pb::RequestId>, command: Command) -> Result<Response<pb::Done>, Status> {
        let (reply, log_index) = self.write(request_id, command).await?;
        Ok(Response::new(pb::Done {
            log_index,
            note: match reply {
                Reply::Note(n) => n,
                _ => String::new(),
            },
        }))
    }
}

impl MasterService {
    /// Whether `role` may set or withdraw `computer`'s offer: an
    /// administrator, the computer itself, or the user who owns it.
    fn may_sell(&self, role: &Option<Role>, computer: &str) -> Result<(), Status> {
        let state = self.replica.state.read().unwrap_or_else(|e| e.into_inner());
        if !state.computers.contains_key(computer) {
            return Err(Status::not_found(format!("computer {computer} does not exist")));
        }
        let owner = state.ledger.owners.get(computer);
        match role {
            None | Some(Role::Admin) => Ok(()),
            Some(Role::Computer(c)) if c == computer => Ok(()),
            Some(Role::User(u)) if owner == Some(u) => Ok(()),
            Some(role) => Err(Status::permission_denied(format!(
                "forbidden: computer {computer} is not yours ({role}); its offer is set by {}, the computer \
                 itself or an administrator",
                owner.map_or("its owner (it has none: an administrator names one)".to_string(), |o| {
                    format!("its owner {o}")
                })
            ))),
        }
    }
}

/// A refused write as a gRPC status.
fn refusal(r: Refusal) -> Status {
    match r {
        Refusal::NotFound(m) => Status::not_found(m),
        Refusal::Invalid(m) => Status::invalid_argument(m),
        // gRPC has no 413: the message names the limit.
        Refusal::TooLarge(m) => Status::invalid_argument(m),
        Refusal::NotYet(m) => Status::failed_precondition(m),
        Refusal::Forbidden(m) => Status::permission_denied(m),
        r @ Refusal::StaleRequest { .. } => Status::failed_precondition(r.to_string()),
    }
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("missing field {field}")))
    } else {
        Ok(value)
    }
}

fn partition_ref(p: &Option<pb::PartitionRef>) -> Result<(String, String), Status> {
    let p = p
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("missing field partition"))?;
    Ok((
        required(&p.computer_id, "partition.computer_id")?.to_string(),
        required(&p.partition_id, "partition.partition_id")?.to_string(),
    ))
}

fn optional(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// Wraps a node's command so it applies only while the partition still
/// holds `instance_id` (when given).
fn guarded(computer: &str, partition: &str, instance_id: &str, command: Command) -> Command {
    match optional(instance_id) {
        None => command,
        Some(instance) => Command::IfPartitionHolds {
            computer: computer.to_string(),
            partition: partition.to_string(),
            instance,
            then: Box::new(command),
        },
    }
}

/// Whether `role` may see `inst` (None: no TLS).
fn may_see(role: &Option<Role>, inst: &Instance, state: &crate::state::Master) -> bool {
    match role {
        None | Some(Role::Admin) => true,
        Some(Role::User(u)) => &inst.owner == u,
        Some(Role::Partition(c, p)) => state.instance_on(c, p).is_some_and(|mine| mine.root == inst.root),
        Some(_) => false,
    }
}

/// The user a root request or a read acts for.
fn user_for(role: &Option<Role>, named: &str) -> Result<String, Status> {
    match role {
        Some(Role::User(u)) if named.is_empty() || named == u => Ok(u.clone()),
        Some(Role::User(u)) => Err(Status::permission_denied(format!(
            "forbidden: user {u} may not act for user {named}"
        ))),
        Some(Role::Admin) | None if !named.is_empty() => Ok(named.to_string()),
        _ => Ok(crate::authz::DEFAULT_USER.to_string()),
    }
}

type RevisionStream = Pin<Box<dyn Stream<Item = Result<pb::ComputerRevision, Status>> + Send>>;

#[tonic::async_trait]
impl MasterApi for MasterService {
    async fn load_computer(&self, req: Request<pb::LoadComputerRequest>) -> Result<Response<pb::Done>, Status> {
        let computer = required(&req.get_ref().computer_id, "computer_id")?.to_string();
        self.authorize(&req, &Need::Computer(computer))?;
        let r = req.into_inner();
        let command = convert::set_computer(&r)?;
        self.done(r.request_id, command).await
    }

    async fn get_computer(
        &self,
        req: Request<pb::GetComputerRequest>,
    ) -> Result<Response<pb::ComputerDocument>, Status> {
        let computer = required(&req.get_ref().computer_id, "computer_id")?.to_string();
        self.authorize(&req, &Need::Computer(computer.clone()))?;
        let state = self.replica.state.read().unwrap_or_else(|e| e.into_inner());
        convert::computer_document(&state, &computer)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("computer {computer} does not exist")))
    }

    type WatchComputerStream = RevisionStream;

    async fn watch_computer(
        &self,
        req: Request<pb::WatchComputerRequest>,
    ) -> Result<Response<Self::WatchComputerStream>, Status> {
        let computer = required(&req.get_ref().computer_id, "computer_id")?.to_string();
        self.authorize(&req, &Need::Computer(computer.clone()))?;
        let revision_of = {
            let replica = self.replica.clone();
            let computer = computer.clone();
            move || {
                replica
                    .state
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .computers
                    .get(&computer)
                    .map(|c| c.revision)
            }
        };
        if revision_of().is_none() {
            return Err(Status::not_found(format!("computer {computer} does not exist")));
        }
        let mut known = req.into_inner().known_revision;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // Woken when this computer's document changes, not on every entry.
        let notify = self.replica.revisions.subscribe(&computer);
        tokio::spawn(async move {
            loop {
                let changed = notify.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                match revision_of() {
                    None => {
                        let _ = tx
                            .send(Err(Status::not_found(format!("computer {computer} was removed"))))
                            .await;
                        return;
                    }
                    Some(r) if r != known => {
                        known = r;
                        if tx.send(Ok(pb::ComputerRevision { revision: r })).await.is_err() {
                            return;
                        }
                    }
                    Some(_) => {}
                }
                tokio::select! {
                    _ = changed => {}
                    _ = tx.closed() => return,
                    // A keep-alive look, should a change slip between reads.
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn report_software(&self, req: Request<pb::ReportSoftwareRequest>) -> Result<Response<pb::Done>, Status> {
        let computer = required(&req.get_ref().computer_id, "computer_id")?.to_string();
        self.authorize(&req, &Need::Computer(computer.clone()))?;
        let r = req.into_inner();
        let report = match r.state.as_str() {
            "building" => SoftwareReport::Building,
            "available" => SoftwareReport::Available,
            "destroyed" => SoftwareReport::Destroyed,
            "error" => SoftwareReport::Error(r.error_log.clone()),
            other => {
                return Err(Status::invalid_argument(format!(
                    "state must be building, available, error or destroyed, not {other:?}"
                )))
            }
        };
        let command = Command::ReportSoftware {
            computer,
            url: required(&r.url, "url")?.to_string(),
            report,
        };
        self.done(r.request_id, command).await
    }

    async fn report_instance(&self, req: Request<pb::ReportInstanceRequest>) -> Result<Response<pb::Done>, Status> {
        let (computer, partition) = partition_ref(&req.get_ref().partition)?;
        let need = if req.get_ref().state == "destroyed" {
            // Only the node wipes a partition (as SLAP's destroyedComputerPartition).
            Need::Computer(computer.clone())
        } else {
            Need::Partition(computer.clone(), partition.clone())
        };
        self.authorize(&req, &need)?;
        let r = req.into_inner();
        let report = |report| Command::ReportInstance {
            computer: computer.clone(),
            partition: partition.clone(),
            shared_reference: optional(&r.shared_reference),
            report,
        };
        let command = match r.state.as_str() {
            "started" => report(InstanceReport::Started),
            "stopped" => report(InstanceReport::Stopped),
            "error" => report(InstanceReport::Error(r.error_log.clone())),
            "destroyed" => Command::DestroyedPartition {
                computer: computer.clone(),
                partition: partition.clone(),
            },
            other => {
                return Err(Status::invalid_argument(format!(
                    "state must be started, stopped, error or destroyed, not {other:?}"
                )))
            }
        };
        let command = guarded(&computer, &partition, &r.instance_id, command);
        self.done(r.request_id, command).await
    }

    async fn publish_connection(
        &self,
        req: Request<pb::PublishConnectionRequest>,
    ) -> Result<Response<pb::Done>, Status> {
        let (computer, partition) = partition_ref(&req.get_ref().partition)?;
        self.authorize(&req, &Need::Partition(computer.clone(), partition.clone()))?;
        let r = req.into_inner();
        let command = Command::SetConnection {
            computer: computer.clone(),
            partition: partition.clone(),
            shared_reference: optional(&r.shared_reference),
            connection: r.connection.into_iter().collect(),
        };
        let command = guarded(&computer, &partition, &r.instance_id, command);
        self.done(r.request_id, command).await
    }

    async fn set_related_instances(
        &self,
        req: Request<pb::SetRelatedInstancesRequest>,
    ) -> Result<Response<pb::Done>, Status> {
        let (computer, partition) = partition_ref(&req.get_ref().partition)?;
        self.authorize(&req, &Need::Partition(computer.clone(), partition.clone()))?;
        let r = req.into_inner();
        let command = Command::SetRelatedInstances {
            computer,
            partition,
            titles: r.titles,
        };
        self.done(r.request_id, command).await
    }

    async fn bang(&self, req: Request<pb::BangRequest>) -> Result<Response<pb::Done>, Status> {
        let (computer, partition) = partition_ref(&req.get_ref().partition)?;
        self.authorize(&req, &Need::Partition(computer.clone(), partition.clone()))?;
        let r = req.into_inner();
        let command = Command::Bang {
            computer,
            partition,
            message: r.message,
        };
        self.done(r.request_id, command).await
    }

    async fn get_partition_certificate(
        &self,
        req: Request<pb::PartitionRef>,
    ) -> Result<Response<pb::PartitionCertificate>, Status> {
        let (computer, partition) = partition_ref(&Some(req.get_ref().clone()))?;
        self.authorize(&req, &Need::Computer(computer.clone()))?;
        let state = self.replica.state.read().unwrap_or_else(|e| e.into_inner());
        let part = state
            .partitions
            .get(&(computer.clone(), partition.clone()))
            .ok_or_else(|| Status::not_found(format!("computer {computer} has no partition {partition}")))?;
        if part.instance.is_none() {
            return Err(Status::not_found(format!(
                "partition {partition} of {computer} is free"
            )));
        }
        let cert = state.partition_certificate(&computer, &partition).ok_or_else(|| {
            Status::not_found(format!(
                "the certificate of partition {partition} of {computer} is not issued yet; try again"
            ))
        })?;
        Ok(Response::new(pb::PartitionCertificate {
            certificate_pem: cert.cert_pem.to_text(),
            key_pem: cert
                .key_pem
                .as_ref()
                .map(crate::state::Pem::to_text)
                .unwrap_or_default(),
        }))
    }

    async fn use_computer(&self, req: Request<pb::UseComputerRequest>) -> Result<Response<pb::Done>, Status> {
        let computer = required(&req.get_ref().computer_id, "computer_id")?.to_string();
        self.authorize(&req, &Need::Computer(computer.clone()))?;
        let r = req.into_inner();
        let command = crate::accounting::book_command(&computer, &r.tioxml)
            .map_err(|e| Status::invalid_argument(format!("tioxml: {e}")))?;
        self.done(r.request_id, command).await
    }

    async fn supply(&self, req: Request<pb::SupplyRequest>) -> Result<Response<pb::Done>, Status> {
        self.authorize(&req, &Need::Admin)?;
        let r = req.into_inner();
        let state = match r.state.as_str() {
            "" | "available" => SupplyState::Available,
            "destroyed" => SupplyState::Destroyed,
            other => {
                return Err(Status::invalid_argument(format!(
                    "state must be available or destroyed, not {other:?}"
                )))
            }
        };
        let command = Command::Supply {
            computer: required(&r.computer_id, "computer_id")?.to_string(),
            url: required(&r.url, "url")?.to_string(),
            state,
        };
        self.done(r.request_id, command).await
    }

    async fn request(&self, req: Request<pb::RequestInstanceRequest>) -> Result<Response<pb::Instance>, Status> {
        let need = match &req.get_ref().requester {
            Some(p) => Need::Partition(p.computer_id.clone(), p.partition_id.clone()),
            None => Need::User,
        };
        let role = self.authorize(&req, &need)?;
        let r = req.into_inner();
        let requester = match &r.requester {
            Some(_) => {
                let (computer, partition) = partition_ref(&r.requester)?;
                RequestOrigin::Partition { computer, partition }
            }
            None => RequestOrigin::User(user_for(&role, &r.user)?),
        };
        let spec = convert::request_spec(&r, requester)?;
        let (reply, _) = self.write(r.request_id, Command::Request(spec)).await?;
        match reply {
            // The instance as the write left it (placement included), not
            // as it is by the time the answer is sent: later writes (a
            // node's publication) are not this request's to show.
            Reply::Instance(inst) => {
                let state = self.replica.state.read().unwrap_or_else(|e| e.into_inner());
                Ok(Response::new(convert::instance_with_terms(&state, &inst)))
            }
            _ => Err(Status::not_found(
                "the instance is gone (destroyed before it was placed)",
            )),
        }
    }

    async fn get_instance(&self, req: Request<pb::GetInstanceRequest>) -> Result<Response<pb::Instance>, Status> {
        let role = self.authorize(&req, &Need::Anyone)?;
        let r = req.into_inner();
        let title = required(&r.title, "title")?.to_string();
        let scope = if r.tree.is_empty() {
            Scope::User(user_for(&role, &r.user)?)
        } else {
            Scope::Tree(r.tree.clone())
        };
        let answer = self
            .replica
            .read(&Query::Instance {
                scope,
                title: title.clone(),
            })
            .await?;
        let not_found = || Status::not_found(format!("no instance titled {title:?}"));
        let Answer::Instance(Some(inst)) = answer else {
            return Err(not_found());
        };
        let state = self.replica.state.read().unwrap_or_else(|e| e.into_inner());
        if !may_see(&role, &inst, &state) {
            // Not "forbidden": whether another user's instance exists is theirs to know.
            return Err(not_found());
        }
        Ok(Response::new(convert::instance_with_terms(&state, &inst)))
    }

    async fn list_instances(
        &self,
        req: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::InstanceList>, Status> {
        let role = self.authorize(&req, &Need::User)?;
        let named = req.into_inner().user;
        let owner = match (&role, named.is_empty()) {
            (None | Some(Role::Admin), true) => None,
            _ => Some(user_for(&role, &named)?),
        };
        let Answer::Instances(instances) = self.replica.read(&Query::Instances { owner }).await? else {
            return Err(Status::internal("unexpected answer to an instance list"));
        };
        let state = self.replica.state.read().unwrap_or_else(|e| e.into_inner());
        Ok(Response::new(pb::InstanceList {
            instances: instances
                .iter()
                .map(|i| convert::instance_with_terms(&state, i))
                .collect(),
        }))
    }

    async fn get_usage(&self, req: Request<pb::UsageReportRequest>) -> Result<Response<pb::UsageReport>, Status> {
        let r = req.get_ref();
        let period = crate::state::ledger::Period::parse(&r.period).map_err(Status::invalid_argument)?;
        let who = if !r.computer_id.is_empty() {
            self.authorize(&req, &Need::Computer(r.computer_id.clone()))?;
            crate::state::ledger::ReportFor::Computer(r.computer_id.clone())
        } else if !r.provider.is_empty() {
            match self.authorize(&req, &Need::Anyone)? {
                None | Some(Role::Admin) => {}
                Some(Role::User(u)) if u == r.provider => {}
                Some(role) => {
                    return Err(Status::permission_denied(format!(
                        "forbidden: {role} may not read provider {}'s statement (the provider or an administrator)",
                        r.provider
                    )))
                }
            }
            crate::state::ledger::ReportFor::Provider(r.provider.clone())
        } else {
            let role = self.authorize(&req, &Need::User)?;
            crate::state::ledger::ReportFor::Subscriber(user_for(&role, &r.subscriber)?)
        };
        let query = Query::Usage {
            who,
            period_start_us: period.start_us,
            period_end_us: period.end_us,
        };
        let Answer::Usage(report) = self.replica.read(&query).await? else {
            return Err(Status::internal("unexpected answer to a usage report"));
        };
        Ok(Response::new(convert::usage_report(&report)))
    }

    async fn set_price(&self, req: Request<pb::SetPriceRequest>) -> Result<Response<pb::Done>, Status> {
        self.authorize(&req, &Need::Admin)?;
        let r = req.into_inner();
        let price = if r.remove {
            None
        } else {
            Some(crate::state::ledger::Price {
                unit_price: crate::state::ledger::parse_money(&r.unit_price).map_err(Status::invalid_argument)?,
                currency: r.currency.trim().to_string(),
            })
        };
        let command = Command::SetPrice {
            resource: r.resource.trim().to_string(),
            release: optional(&r.software_release),
            price,
        };
        self.done(r.request_id, command).await
    }

    async fn set_offer(&self, req: Request<pb::SetOfferRequest>) -> Result<Response<pb::Done>, Status> {
        let role = self.authorize(&req, &Need::Anyone)?;
        let r = req.into_inner();
        let offer = convert::offer(
            r.offer
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("missing field offer"))?,
        )?;
        self.may_sell(&role, &offer.computer)?;
        self.done(r.request_id, Command::SetOffer(Box::new(offer))).await
    }

    async fn withdraw_offer(&self, req: Request<pb::WithdrawOfferRequest>) -> Result<Response<pb::Done>, Status> {
        let role = self.authorize(&req, &Need::Anyone)?;
        let r = req.into_inner();
        let computer = required(r.computer_id.trim(), "computer_id")?.to_string();
        self.may_sell(&role, &computer)?;
        self.done(r.request_id, Command::WithdrawOffer { computer }).await
    }

    async fn list_offers(&self, req: Request<pb::ListOffersRequest>) -> Result<Response<pb::OfferList>, Status> {
        self.authorize(&req, &Need::Anyone)?;
        let computer = optional(req.get_ref().computer_id.trim());
        let Answer::Offers(offers) = self.replica.read(&Query::Offers { computer }).await? else {
            return Err(Status::internal("unexpected answer to an offer list"));
        };
        Ok(Response::new(pb::OfferList {
            offers: offers.iter().map(convert::offer_message).collect(),
        }))
    }

    async fn set_computer_owner(
        &self,
        req: Request<pb::SetComputerOwnerRequest>,
    ) -> Result<Response<pb::Done>, Status> {
        self.authorize(&req, &Need::Admin)?;
        let r = req.into_inner();
        let computer = required(r.computer_id.trim(), "computer_id")?.to_string();
        let command = Command::SetComputerOwner {
            computer,
            owner: optional(r.owner.trim()),
        };
        self.done(r.request_id, command).await
    }

    type WatchRevisionsStream = feed::FeedStream;

    async fn watch_revisions(
        &self,
        req: Request<pb::WatchRevisionsRequest>,
    ) -> Result<Response<Self::WatchRevisionsStream>, Status> {
        self.authorize(&req, &Need::Gateway)?;
        Ok(Response::new(feed::start(self.replica.clone())?))
    }

    async fn cluster(&self, req: Request<pb::ClusterRequest>) -> Result<Response<pb::ClusterView>, Status> {
        self.authorize(&req, &Need::Anyone)?;
        let with_digest = req.get_ref().state_digest;
        Ok(Response::new(convert::cluster_view(&self.replica, with_digest)))
    }

    async fn renew_certificate(
        &self,
        req: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewedCertificate>, Status> {
        let Some(caller) = self.caller(&req)? else {
            return Err(Status::unauthenticated(
                "renewing a certificate needs that certificate (this port serves without TLS)",
            ));
        };
        let serial = req.get_ref().serial.to_ascii_lowercase();
        let holder = {
            let state = self.replica.state.read().unwrap_or_else(|e| e.into_inner());
            let found = state.certificates.values().find(|c| c.serial == serial);
            found.map(|c| c.role.clone())
        };
        match holder {
            None => return Err(Status::not_found(format!("no certificate has serial {serial}"))),
            Some(role) if role != caller => {
                return Err(Status::permission_denied(format!(
                    "certificate {serial} is {role}'s, not yours ({caller}): a holder renews only its own"
                )))
            }
            Some(_) => {}
        }
        let h = crate::certificates::renew(&self.replica, &serial, req.get_ref().seconds).await?;
        Ok(Response::new(pb::RenewedCertificate {
            certificate_pem: h.cert_pem,
            key_pem: h.issued.key_pem,
            ca_pem: h.ca_pem,
        }))
    }
}
