//! The Master's state machine: SlapOS semantics, pure and deterministic.
//!
//! Every replica applies the same log through [`Master::apply`] and must end
//! in the same state with the same answers, so `apply` reads nothing but the
//! state, its sequence number and the [`Proposal`]: the time comes stamped by
//! the leader, identifiers and tie-breaks derive from the sequence number of
//! the proposal (several proposals may share one log entry), and there is
//! no I/O. What changed is collected as [`Dirty`] keys that the storage layer
//! turns into records (see [`persist`]).
//!
//! The rules follow the SLAP reference (sections 3.1 to 3.7):
//! - a request is identified by (scope, title): a user's roots, or the tree of
//!   the requesting partition; an identical re-request changes nothing and
//!   bumps nothing; a re-request replaces the parameters;
//! - placement honours the SLA (see [`allocation`]); an instance that cannot
//!   be placed yet stays pending (SLAP 408) and is retried whenever capacity
//!   or software appears;
//! - destroying an instance destroys its descendants; a partition is freed
//!   only once the instances it requested are gone;
//! - timestamps (what makes a node redeploy a partition) move on any change
//!   of parameters, release, type, state or hosted shared instances, on a
//!   child's or a shared instance's publication (bumping the requester), and
//!   on bang (the whole tree); never on a partition's own publication;
//! - each write carries a request id; a retry returns the recorded answer.

pub mod allocation;
pub mod command;
pub mod ledger;
pub mod model;
pub mod persist;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

pub use command::*;
pub use model::*;

/// How long a client's last answer is kept for retries (leader time).
pub const SESSION_TTL_US: u64 = 3600 * 1_000_000;

/// A stored entity touched by a command.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dirty {
    Computer(ComputerId),
    /// Only the revision of a computer's document changed.
    Revision(ComputerId),
    Partition(ComputerId, PartitionId),
    Installation(ComputerId, SoftwareUrl),
    Instance(InstanceId),
    Session(String),
    Meta,
    Cluster,
    Authority,
    Certificate(String),
    Registration(String),
    ReplicaAddr(u64),
    Movement(u64),
    Span(InstanceId),
    Journal(String),
    Price(String, String),
}

/// The whole state of the Master.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Master {
    pub computers: BTreeMap<ComputerId, Computer>,
    pub partitions: BTreeMap<(ComputerId, PartitionId), Partition>,
    pub installations: BTreeMap<(ComputerId, SoftwareUrl), SoftwareInstallation>,
    /// Shared with the replies and session records that show them: a reply
    /// costs a reference count, and an instance is copied only when it
    /// changes while an answer still holds it.
    pub instances: BTreeMap<InstanceId, Arc<Instance>>,
    pub sessions: BTreeMap<String, Session>,
    /// Set by the first command of a cluster.
    pub cluster: Option<ClusterMeta>,
    /// The certificate authority, once installed.
    pub authority: Option<Authority>,
    /// Issued certificates by fingerprint.
    pub certificates: BTreeMap<String, Certificate>,
    /// Pending computer registrations: token sha256 -> computer.
    pub registrations: BTreeMap<String, ComputerId>,
    /// Where each replica serves SLAP and the native API, as it announced.
    pub replica_addrs: BTreeMap<u64, String>,
    /// Accounting: movements, open hosting spans, booked journals, prices.
    pub ledger: ledger::Ledger,
    /// Last timestamp handed out; timestamps only grow.
    pub clock: u64,
    /// Log index of the last applied proposal.
    pub last_index: u64,
    /// Proposals applied so far; numbers each one (ids, tie-breaks, revisions).
    pub applied: u64,
    // Indexes derived from the entities above, rebuilt at restore.
    /// Instances by scope, then title: looked up on every request, by
    /// reference (no key is built for a lookup).
    titles: HashMap<Scope, HashMap<String, InstanceId>>,
    /// The live certificate of each partition, by fingerprint.
    partition_certs: BTreeMap<(ComputerId, PartitionId), String>,
    children: BTreeMap<InstanceId, BTreeSet<InstanceId>>,
    hosted: BTreeMap<InstanceId, BTreeSet<InstanceId>>,
    /// Instances waiting for a place, by creation sequence number.
    pending: BTreeSet<(u64, InstanceId)>,
    /// Free partitions by release and load, for placement.
    placement: allocation::PlacementIndex,
    dirty: BTreeSet<Dirty>,
}

fn refused_not_found(what: String) -> Reply {
    Reply::Refused(Refusal::NotFound(what))
}

fn invalid(what: impl Into<String>) -> Reply {
    Reply::Refused(Refusal::Invalid(what.into()))
}

/// The creation sequence number in an instance id (`SOFTINST-42` -> 42).
fn creation_index(id: &str) -> u64 {
    id.rsplit('-').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

impl Master {
    /// An empty Master.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one committed proposal carried by the log entry at `index`.
    pub fn apply(&mut self, index: u64, proposal: Proposal) -> Reply {
        self.last_index = index;
        // Several proposals can share a log entry: identifiers and tie-breaks
        // use this per-proposal sequence number instead of the log index.
        self.applied += 1;
        let seq = self.applied;
        self.dirty.insert(Dirty::Meta);
        let now = proposal.time_us;
        if let Some(rid) = &proposal.request_id {
            if let Some(s) = self.sessions.get(&rid.client) {
                if rid.seq == s.seq {
                    return s.reply.clone();
                }
                if rid.seq < s.seq {
                    return Reply::Refused(Refusal::StaleRequest {
                        client: rid.client.clone(),
                        seq: rid.seq,
                        last: s.seq,
                    });
                }
            }
        }
        let Proposal {
            request_id, command, ..
        } = proposal;
        let reply = self.execute(seq, now, command);
        if let Some(rid) = request_id {
            self.dirty.insert(Dirty::Session(rid.client.clone()));
            self.sessions.insert(
                rid.client,
                Session {
                    seq: rid.seq,
                    reply: reply.clone(),
                    at: now,
                },
            );
        }
        if seq.is_multiple_of(1024) {
            self.expire_sessions(now);
        }
        reply
    }

    /// Takes the set of entities changed since the last call.
    pub fn take_dirty(&mut self) -> BTreeSet<Dirty> {
        std::mem::take(&mut self.dirty)
    }

    fn expire_sessions(&mut self, now: u64) {
        let old: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.at.saturating_add(SESSION_TTL_US) < now)
            .map(|(c, _)| c.clone())
            .collect();
        for client in old {
            self.sessions.remove(&client);
            self.dirty.insert(Dirty::Session(client));
        }
    }

    /// Runs one command. It is owned, so what a command carries (a request's
    /// parameters) moves into the state instead of being copied.
    fn execute(&mut self, seq: u64, now: u64, command: Command) -> Reply {
        match command {
            Command::SetComputer {
                id,
                address,
                netmask,
                capacity,
                categories,
                partitions,
            } => self.set_computer(seq, now, &id, &address, &netmask, &capacity, &categories, &partitions),
            Command::Supply { computer, url, state } => self.supply(seq, now, &computer, &url, state),
            Command::Request(spec) => self.request(seq, now, spec),
            Command::SetConnection {
                computer,
                partition,
                shared_reference,
                connection,
            } => self.set_connection(
                seq,
                now,
                &computer,
                &partition,
                shared_reference.as_deref(),
                &connection,
            ),
            Command::ReportInstance {
                computer,
                partition,
                shared_reference,
                report,
            } => self.report_instance(seq, now, &computer, &partition, shared_reference.as_deref(), &report),
            Command::ReportSoftware { computer, url, report } => self.report_software(seq, &computer, &url, &report),
            Command::Bang {
                computer, partition, ..
            } => self.bang(seq, now, &computer, &partition),
            Command::DestroyedPartition { computer, partition } => {
                self.destroyed_partition(seq, now, &computer, &partition)
            }
            Command::SetRelatedInstances {
                computer,
                partition,
                titles,
            } => self.set_related(seq, now, &computer, &partition, &titles),
            Command::InitCluster { id, token_sha256 } => self.init_cluster(&id, &token_sha256),
            Command::ReserveReplicaId { .. } => self.reserve_replica_id(),
            Command::BookUsage {
                computer,
                journal_sha256,
                lines,
            } => self.book_usage(seq, now, &computer, &journal_sha256, &lines),
            Command::SetPrice {
                resource,
                release,
                price,
            } => self.set_price(&resource, release.as_deref(), price.as_ref()),
            Command::AnnounceReplica { id, public_addr } => {
                if self.replica_addrs.get(&id) != Some(&public_addr) {
                    self.replica_addrs.insert(id, public_addr);
                    self.dirty.insert(Dirty::ReplicaAddr(id));
                }
                Reply::Done
            }
            Command::SetAuthority(a) => self.set_authority(&a),
            Command::AddRegistration { computer, token_sha256 } => {
                self.registrations.insert(token_sha256.clone(), computer);
                self.dirty.insert(Dirty::Registration(token_sha256));
                Reply::Done
            }
            Command::RecordCertificate {
                certificate,
                registration,
            } => self.record_certificate(&certificate, registration.as_deref()),
            Command::RevokeCertificate { serial } => self.revoke_certificate(&serial),
            Command::RevokeRole { role } => self.revoke_role(&role),
            Command::IfPartitionHolds {
                computer,
                partition,
                instance,
                then,
            } => {
                let holds = self
                    .partitions
                    .get(&(computer.clone(), partition.clone()))
                    .is_some_and(|p| p.instance.as_deref() == Some(instance.as_str()));
                if holds {
                    // The inner command is applied as this same proposal.
                    self.execute(seq, now, *then)
                } else {
                    refused_not_found(format!(
                        "partition {partition} of {computer} no longer holds {instance}"
                    ))
                }
            }
        }
    }

    // ----- cluster -----------------------------------------------------

    fn init_cluster(&mut self, id: &str, token_sha256: &str) -> Reply {
        if let Some(c) = &self.cluster {
            return invalid(format!("this state already belongs to cluster {}", c.id));
        }
        self.cluster = Some(ClusterMeta {
            id: id.to_string(),
            token_sha256: token_sha256.to_string(),
            // The founding replica is 1.
            next_replica_id: 2,
        });
        self.dirty.insert(Dirty::Cluster);
        Reply::Done
    }

    // ----- identities ----------------------------------------------------

    fn set_authority(&mut self, a: &Authority) -> Reply {
        if self.authority.is_some() {
            return invalid("the cluster already has a certificate authority");
        }
        self.authority = Some(a.clone());
        self.dirty.insert(Dirty::Authority);
        Reply::Done
    }

    fn record_certificate(&mut self, cert: &Certificate, registration: Option<&str>) -> Reply {
        if let Some(token) = registration {
            match (self.registrations.get(token), &cert.role) {
                (Some(c), Role::Computer(want)) if c == want => {
                    self.registrations.remove(token);
                    self.dirty.insert(Dirty::Registration(token.to_string()));
                }
                _ => return Reply::Refused(Refusal::Forbidden("unknown or already used registration token".into())),
            }
        }
        if self.certificates.contains_key(&cert.fingerprint) {
            return invalid("this certificate is already recorded");
        }
        // One live certificate per partition: a second one (a retried or
        // a former leader's issuance) is refused, so the partition's index
        // rebuilt at restore is the one kept while running, on every
        // replica, and freeing the partition revokes all it had.
        if let (Role::Partition(c, p), false) = (&cert.role, cert.revoked) {
            if self.partition_certs.contains_key(&(c.clone(), p.clone())) {
                return invalid(format!("partition {p} of {c} already has a live certificate"));
            }
        }
        self.index_certificate(cert);
        self.certificates.insert(cert.fingerprint.clone(), cert.clone());
        self.dirty.insert(Dirty::Certificate(cert.fingerprint.clone()));
        Reply::Done
    }

    fn index_certificate(&mut self, cert: &Certificate) {
        if let (Role::Partition(c, p), false) = (&cert.role, cert.revoked) {
            self.partition_certs
                .insert((c.clone(), p.clone()), cert.fingerprint.clone());
        }
    }

    fn revoke_certificate(&mut self, serial: &str) -> Reply {
        let serial = serial.to_ascii_lowercase();
        let Some(cert) = self.certificates.values_mut().find(|c| c.serial == serial) else {
            return refused_not_found(format!("no certificate has serial {serial}"));
        };
        if !cert.revoked {
            cert.revoked = true;
            self.dirty.insert(Dirty::Certificate(cert.fingerprint.clone()));
            if let Role::Partition(c, p) = &cert.role {
                let key = (c.clone(), p.clone());
                if self.partition_certs.get(&key) == Some(&cert.fingerprint) {
                    self.partition_certs.remove(&key);
                }
            }
        }
        Reply::Done
    }

    fn revoke_role(&mut self, role: &Role) -> Reply {
        let serials: Vec<String> = self
            .certificates
            .values()
            .filter(|c| &c.role == role && !c.revoked)
            .map(|c| c.serial.clone())
            .collect();
        for serial in serials {
            self.revoke_certificate(&serial);
        }
        Reply::Done
    }

    /// Revokes the live certificate of a partition whose instance is gone,
    /// so the old instance can no longer act for it.
    fn revoke_partition_certificates(&mut self, computer: &str, partition: &str) {
        let key = (computer.to_string(), partition.to_string());
        if let Some(fp) = self.partition_certs.remove(&key) {
            if let Some(cert) = self.certificates.get_mut(&fp) {
                cert.revoked = true;
                self.dirty.insert(Dirty::Certificate(fp));
            }
        }
    }

    /// The live certificate of a partition, if one was issued.
    pub fn partition_certificate(&self, computer: &str, partition: &str) -> Option<&Certificate> {
        let fp = self
            .partition_certs
            .get(&(computer.to_string(), partition.to_string()))?;
        self.certificates.get(fp)
    }

    fn reserve_replica_id(&mut self) -> Reply {
        let Some(c) = self.cluster.as_mut() else {
            return invalid("the cluster is not initialized");
        };
        let id = c.next_replica_id;
        c.next_replica_id += 1;
        self.dirty.insert(Dirty::Cluster);
        Reply::ReplicaId(id)
    }

    // ----- reads -------------------------------------------------------

    /// The instance known by `title` in `scope`.
    pub fn instance_by_title(&self, scope: &Scope, title: &str) -> Option<&Instance> {
        self.title_id(scope, title).and_then(|id| self.instance(id))
    }

    /// The id of the instance known by `title` in `scope`.
    fn title_id(&self, scope: &Scope, title: &str) -> Option<&InstanceId> {
        self.titles.get(scope)?.get(title)
    }

    /// The instance `id`.
    pub fn instance(&self, id: &str) -> Option<&Instance> {
        self.instances.get(id).map(|i| &**i)
    }

    /// The (non-shared) instance on a partition.
    pub fn instance_on(&self, computer: &str, partition: &str) -> Option<&Instance> {
        self.partitions
            .get(&(computer.to_string(), partition.to_string()))
            .and_then(|p| p.instance.as_ref())
            .and_then(|id| self.instance(id))
    }

    /// Shared instances hosted by `host`, in id order.
    pub fn hosted_by(&self, host: &str) -> impl Iterator<Item = &Instance> {
        self.hosted
            .get(host)
            .into_iter()
            .flatten()
            .filter_map(|id| self.instance(id))
    }

    /// Instances requested by `requester`.
    pub fn children_of(&self, requester: &str) -> impl Iterator<Item = &Instance> {
        self.children
            .get(requester)
            .into_iter()
            .flatten()
            .filter_map(|id| self.instance(id))
    }

    /// Partitions of a computer in the order the node reported them.
    pub fn partitions_of(&self, computer: &str) -> Vec<&Partition> {
        let Some(c) = self.computers.get(computer) else {
            return vec![];
        };
        c.partitions
            .iter()
            .filter_map(|p| self.partitions.get(&(computer.to_string(), p.clone())))
            .collect()
    }

    /// Software installations of a computer.
    pub fn installations_of<'a>(&'a self, computer: &'a str) -> impl Iterator<Item = &'a SoftwareInstallation> + 'a {
        self.installations
            .range((computer.to_string(), String::new())..)
            .take_while(move |((c, _), _)| c == computer)
            .map(|(_, s)| s)
    }

    /// Instances not placed yet.
    pub fn pending(&self) -> impl Iterator<Item = &Instance> {
        self.pending.iter().filter_map(|(_, id)| self.instance(id))
    }

    // ----- helpers -----------------------------------------------------

    /// A new timestamp: after every earlier one, and at least the leader's time.
    fn tick(&mut self, now: u64) -> u64 {
        self.clock = self.clock.saturating_add(1).max(now);
        self.clock
    }

    fn touch_computer(&mut self, seq: u64, computer: &str) {
        if let Some(c) = self.computers.get_mut(computer) {
            c.revision = seq;
            self.dirty.insert(Dirty::Revision(computer.to_string()));
        }
    }

    /// Makes the node redeploy `id` (and tells its computer's document).
    fn bump(&mut self, seq: u64, now: u64, id: &str) {
        let ts = self.tick(now);
        let Some(inst) = self.instances.get_mut(id).map(Arc::make_mut) else {
            return;
        };
        inst.timestamp = ts;
        self.dirty.insert(Dirty::Instance(id.to_string()));
        let (partition, host) = (inst.partition.clone(), inst.host.clone());
        let place = match (partition, host) {
            (Some((c, _)), _) => Some(c),
            (None, Some(host)) => self
                .instances
                .get(&host)
                .and_then(|h| h.partition.as_ref())
                .map(|(c, _)| c.clone()),
            _ => None,
        };
        if let Some(c) = place {
            self.touch_computer(seq, &c);
        }
    }

    fn instance_mut(&mut self, id: &str) -> &mut Instance {
        self.dirty.insert(Dirty::Instance(id.to_string()));
        Arc::make_mut(self.instances.get_mut(id).expect("instance ids in indexes exist"))
    }

    /// Checks a partition exists and returns the (non-shared) instance on it.
    fn partition_instance(&self, computer: &str, partition: &str) -> Result<InstanceId, Reply> {
        let p = self
            .partitions
            .get(&(computer.to_string(), partition.to_string()))
            .ok_or_else(|| refused_not_found(format!("computer {computer} has no partition {partition}")))?;
        p.instance
            .clone()
            .ok_or_else(|| refused_not_found(format!("partition {partition} of {computer} holds no instance")))
    }

    // ----- computers and software ---------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn set_computer(
        &mut self,
        seq: u64,
        now: u64,
        id: &str,
        address: &str,
        netmask: &str,
        capacity: &Params,
        categories: &Params,
        specs: &[PartitionSpec],
    ) -> Reply {
        if id.trim().is_empty() {
            return invalid("a computer needs a non-empty reference");
        }
        let mut seen = BTreeSet::new();
        for spec in specs {
            if spec.id.trim().is_empty() {
                return invalid(format!("computer {id}: a partition has an empty reference"));
            }
            if !seen.insert(spec.id.as_str()) {
                return invalid(format!("computer {id}: partition {} is listed twice", spec.id));
            }
        }
        let old_list = self.computers.get(id).map(|c| c.partitions.clone()).unwrap_or_default();
        let mut list: Vec<PartitionId> = specs.iter().map(|s| s.id.clone()).collect();
        for old in old_list {
            if seen.contains(old.as_str()) {
                continue;
            }
            let key = (id.to_string(), old.clone());
            match self.partitions.get(&key).map(|p| p.state) {
                // A busy partition is never dropped by a format: its instance
                // must be destroyed through the Master first.
                Some(SlapState::Busy) => list.push(old),
                _ => {
                    self.partitions.remove(&key);
                    self.dirty.insert(Dirty::Partition(key.0, key.1));
                }
            }
        }
        for spec in specs {
            let key = (id.to_string(), spec.id.clone());
            let entry = self.partitions.entry(key.clone()).or_insert_with(|| Partition {
                computer: id.to_string(),
                id: spec.id.clone(),
                state: SlapState::Free,
                addresses: vec![],
                tap: None,
                user: None,
                capabilities: vec![],
                instance: None,
            });
            entry.addresses = spec.addresses.clone();
            entry.tap = spec.tap.clone();
            entry.user = spec.user.clone();
            entry.capabilities = spec.capabilities.clone();
            self.dirty.insert(Dirty::Partition(key.0, key.1));
        }
        self.computers.insert(
            id.to_string(),
            Computer {
                id: id.to_string(),
                address: address.to_string(),
                netmask: netmask.to_string(),
                capacity: capacity.clone(),
                categories: categories.clone(),
                partitions: list,
                revision: seq,
            },
        );
        self.dirty.insert(Dirty::Computer(id.to_string()));
        self.refresh_placement(id);
        self.place_pending(seq, now);
        Reply::Done
    }

    fn supply(&mut self, seq: u64, now: u64, computer: &str, url: &str, state: SupplyState) -> Reply {
        if url.trim().is_empty() {
            return invalid("a software release URL must not be empty");
        }
        if !self.computers.contains_key(computer) {
            return refused_not_found(format!("computer {computer} does not exist"));
        }
        let key = (computer.to_string(), url.to_string());
        let changed = self.installations.get(&key).is_none_or(|s| s.requested != state);
        if changed {
            let entry = self
                .installations
                .entry(key.clone())
                .or_insert_with(|| SoftwareInstallation {
                    computer: computer.to_string(),
                    url: url.to_string(),
                    requested: state,
                    reported: None,
                });
            entry.requested = state;
            self.dirty.insert(Dirty::Installation(key.0, key.1));
            self.refresh_placement(computer);
            self.touch_computer(seq, computer);
            if state == SupplyState::Available {
                self.place_pending(seq, now);
            }
        }
        Reply::Done
    }

    fn report_software(&mut self, seq: u64, computer: &str, url: &str, report: &SoftwareReport) -> Reply {
        let key = (computer.to_string(), url.to_string());
        let Some(inst) = self.installations.get_mut(&key) else {
            return refused_not_found(format!("{url} is not supplied to computer {computer}"));
        };
        if *report == SoftwareReport::Destroyed {
            if inst.requested != SupplyState::Destroyed {
                return invalid(format!("{url} on {computer} is not requested destroyed"));
            }
            self.installations.remove(&key);
            self.refresh_placement(computer);
        } else if inst.reported.as_ref() != Some(report) {
            inst.reported = Some(report.clone());
        } else {
            return Reply::Done;
        }
        self.dirty.insert(Dirty::Installation(key.0, key.1));
        self.touch_computer(seq, computer);
        Reply::Done
    }

    // ----- requests ----------------------------------------------------

    /// Who a request comes from, in the terms the state keys it by.
    fn request_context(&self, spec: &RequestSpec) -> Result<RequestContext, Reply> {
        if spec.title.trim().is_empty() {
            return Err(invalid("an instance needs a non-empty title (partition_reference)"));
        }
        if spec.software_release.trim().is_empty() {
            return Err(invalid("a request needs a software release URL"));
        }
        let (scope, requester, root_of_requester, owner) = match &spec.requester {
            RequestOrigin::User(user) => {
                if user.is_empty() {
                    return Err(invalid("a user request needs a user name"));
                }
                (
                    Scope::User(user.clone()),
                    Requester::User(user.clone()),
                    None,
                    user.clone(),
                )
            }
            RequestOrigin::Partition { computer, partition } => {
                let parent = &self.instances[&self.partition_instance(computer, partition)?];
                (
                    Scope::Tree(parent.root.clone()),
                    Requester::Instance(parent.id.clone()),
                    Some(parent.root.clone()),
                    parent.owner.clone(),
                )
            }
        };
        // While the root is not started, children follow its state.
        let root_state = root_of_requester
            .as_ref()
            .and_then(|r| self.instances.get(r))
            .map(|r| r.requested_state);
        Ok(RequestContext {
            scope,
            requester,
            root_of_requester,
            owner,
            root_state,
        })
    }

    /// The instance an identical re-request of `spec` answers with, when
    /// applying it would change nothing at all (no field, no state, no
    /// placement attempt, no timestamp): such a request can be answered by a
    /// linearizable read instead of a log entry. `None` when it must be
    /// applied (new, changed, or refused).
    pub fn unchanged_by(&self, spec: &RequestSpec) -> Option<&Instance> {
        let ctx = self.request_context(spec).ok()?;
        let id = self.title_id(&ctx.scope, &spec.title)?;
        let current = self.instances.get(id)?;
        let state = spec.state.map(|s| ctx.effective(s));
        (current.shared == spec.shared && RequestChanges::of(current, spec, state).none()).then_some(current)
    }

    fn request(&mut self, seq: u64, now: u64, spec: RequestSpec) -> Reply {
        let ctx = match self.request_context(&spec) {
            Ok(ctx) => ctx,
            Err(reply) => return reply,
        };
        match self.title_id(&ctx.scope, &spec.title).cloned() {
            Some(id) => {
                let state = spec.state.map(|s| ctx.effective(s));
                self.rerequest(seq, now, &id, spec, state)
            }
            None => {
                if spec.state == Some(RequestedState::Destroyed) {
                    return refused_not_found(format!("no instance titled {:?} to destroy", spec.title));
                }
                let state = ctx.effective(spec.state.unwrap_or(RequestedState::Started));
                let RequestContext {
                    scope,
                    requester,
                    root_of_requester,
                    owner,
                    ..
                } = ctx;
                let id = format!("{}-{seq}", if spec.shared { "SLAVEINST" } else { "SOFTINST" });
                let root = root_of_requester.unwrap_or_else(|| id.clone());
                let timestamp = self.tick(now);
                let instance = Instance {
                    id: id.clone(),
                    title: spec.title,
                    scope: scope.clone(),
                    requester: requester.clone(),
                    root,
                    owner,
                    software_release: spec.software_release,
                    software_type: spec.software_type,
                    parameters: spec.parameters,
                    sla: spec.sla,
                    shared: spec.shared,
                    requested_state: state,
                    connection: Params::new(),
                    reported: None,
                    partition: None,
                    host: None,
                    pending_reason: None,
                    timestamp,
                    created_at: now,
                };
                self.index_instance(&instance);
                self.instances.insert(id.clone(), Arc::new(instance));
                self.dirty.insert(Dirty::Instance(id.clone()));
                self.try_place(seq, now, &id);
                Reply::Instance(self.instances[&id].clone())
            }
        }
    }

    fn index_instance(&mut self, inst: &Instance) {
        self.titles
            .entry(inst.scope.clone())
            .or_default()
            .insert(inst.title.clone(), inst.id.clone());
        if let Requester::Instance(parent) = &inst.requester {
            self.children.entry(parent.clone()).or_default().insert(inst.id.clone());
        }
        if let Some(host) = &inst.host {
            self.hosted.entry(host.clone()).or_default().insert(inst.id.clone());
        }
        if !inst.is_placed() {
            self.pending.insert((creation_index(&inst.id), inst.id.clone()));
        }
    }

    fn rerequest(&mut self, seq: u64, now: u64, id: &str, spec: RequestSpec, state: Option<RequestedState>) -> Reply {
        let current = &self.instances[id];
        if current.shared != spec.shared {
            let kind = if current.shared { "a shared" } else { "a non-shared" };
            return invalid(format!("{:?} is {kind} instance; request it the same way", spec.title));
        }
        let RequestChanges {
            changed,
            sla_changed,
            placement_changed,
        } = RequestChanges::of(current, &spec, state);
        if changed || sla_changed {
            let inst = self.instance_mut(id);
            inst.software_release = spec.software_release;
            inst.software_type = spec.software_type;
            inst.parameters = spec.parameters;
            inst.sla = spec.sla;
            if let Some(s) = state {
                inst.requested_state = s;
            }
        }
        if sla_changed && !changed {
            // Only the SLA: shown in the document (`_filter_dict`), no redeploy.
            if let Some(c) = self
                .instances
                .get(id)
                .and_then(|i| i.partition.as_ref())
                .map(|(c, _)| c.clone())
            {
                self.touch_computer(seq, &c);
            }
        }
        if changed {
            self.bump(seq, now, id);
            self.bump_host_of(seq, now, id);
            if state == Some(RequestedState::Destroyed) {
                self.destroy_descendants(seq, now, id);
                self.release_if_unplaced(seq, id);
            }
        }
        if placement_changed && self.instances.get(id).is_some_and(|i| !i.is_placed()) {
            self.try_place(seq, now, id);
        }
        match self.instances.get(id) {
            Some(inst) => Reply::Instance(inst.clone()),
            // Destroyed before it was ever placed: gone at once.
            None => Reply::Done,
        }
    }

    /// A shared instance's change is a change of its host's list.
    fn bump_host_of(&mut self, seq: u64, now: u64, id: &str) {
        if let Some(host) = self.instances.get(id).and_then(|i| i.host.clone()) {
            self.bump(seq, now, &host);
        }
    }

    /// Places a pending instance if it can be placed now; records why not otherwise.
    fn try_place(&mut self, seq: u64, now: u64, id: &str) {
        let Some(inst) = self.instances.get(id) else { return };
        if inst.is_placed() || inst.requested_state == RequestedState::Destroyed {
            return;
        }
        let placement = Filter::parse(&inst.sla, inst.shared).and_then(|f| {
            if inst.shared {
                self.choose_host(&f, &inst.software_release, &inst.software_type)
                    .map(Place::Host)
            } else {
                self.choose_partition(&f, &inst.software_release, &inst.root, seq)
                    .map(Place::Partition)
            }
        });
        let key = (creation_index(id), id.to_string());
        match placement {
            Err(reason) => {
                let inst = self.instance_mut(id);
                inst.pending_reason = Some(reason);
                self.pending.insert(key);
            }
            Ok(place) => {
                self.pending.remove(&key);
                let inst = self.instance_mut(id);
                inst.pending_reason = None;
                match place {
                    Place::Partition((c, p)) => {
                        inst.partition = Some((c.clone(), p.clone()));
                        let part = self
                            .partitions
                            .get_mut(&(c.clone(), p.clone()))
                            .expect("chosen partition exists");
                        part.state = SlapState::Busy;
                        part.instance = Some(id.to_string());
                        let capabilities = part.capabilities.clone();
                        if let Some(position) = self.position_of(&c, &p) {
                            self.placement.occupy(&c, position, &capabilities);
                        }
                        self.dirty.insert(Dirty::Partition(c.clone(), p));
                        self.bump(seq, now, id);
                        // A new instance may be the host waiting shared ones need.
                        self.place_pending_shared(seq, now);
                    }
                    Place::Host(host) => {
                        inst.host = Some(host.clone());
                        self.hosted.entry(host.clone()).or_default().insert(id.to_string());
                        self.bump(seq, now, id);
                        self.bump(seq, now, &host);
                    }
                }
            }
        }
    }

    /// Retries the pending shared instances, oldest first.
    fn place_pending_shared(&mut self, seq: u64, now: u64) {
        let waiting: Vec<InstanceId> = self
            .pending
            .iter()
            .filter(|(_, id)| self.instances.get(id).is_some_and(|i| i.shared))
            .map(|(_, id)| id.clone())
            .collect();
        for id in waiting {
            self.try_place(seq, now, &id);
        }
    }

    /// Retries every pending instance, oldest first.
    fn place_pending(&mut self, seq: u64, now: u64) {
        let waiting: Vec<InstanceId> = self.pending.iter().map(|(_, id)| id.clone()).collect();
        for id in waiting {
            self.try_place(seq, now, &id);
        }
    }

    // ----- destruction -------------------------------------------------

    /// Marks every descendant of `id` destroyed (and removes those never placed).
    fn destroy_descendants(&mut self, seq: u64, now: u64, id: &str) {
        let mut stack: Vec<InstanceId> = self.children.get(id).into_iter().flatten().cloned().collect();
        while let Some(child) = stack.pop() {
            stack.extend(self.children.get(&child).into_iter().flatten().cloned());
            if self
                .instances
                .get(&child)
                .is_some_and(|c| c.requested_state != RequestedState::Destroyed)
            {
                self.instance_mut(&child).requested_state = RequestedState::Destroyed;
                self.bump(seq, now, &child);
                self.bump_host_of(seq, now, &child);
            }
            self.release_if_unplaced(seq, &child);
        }
    }

    /// A destroyed instance that holds no partition (never placed, or
    /// shared) has nothing for a node to wipe: it goes at once.
    fn release_if_unplaced(&mut self, seq: u64, id: &str) {
        let Some(inst) = self.instances.get(id) else { return };
        if inst.requested_state != RequestedState::Destroyed || inst.partition.is_some() {
            return;
        }
        if self.children.get(id).is_some_and(|c| !c.is_empty()) {
            return;
        }
        self.remove_instance(seq, id);
    }

    /// Forgets an instance entirely, freeing its partition and detaching what
    /// it hosted (those shared instances wait for a new host).
    fn remove_instance(&mut self, seq: u64, id: &str) {
        let Some(inst) = self.instances.remove(id) else { return };
        self.dirty.insert(Dirty::Instance(id.to_string()));
        if let Some(titles) = self.titles.get_mut(&inst.scope) {
            titles.remove(&inst.title);
            if titles.is_empty() {
                self.titles.remove(&inst.scope);
            }
        }
        self.pending.remove(&(creation_index(id), id.to_string()));
        if let Requester::Instance(parent) = &inst.requester {
            if let Some(set) = self.children.get_mut(parent) {
                set.remove(id);
                if set.is_empty() {
                    self.children.remove(parent);
                }
            }
        }
        if let Some(host) = &inst.host {
            if let Some(set) = self.hosted.get_mut(host) {
                set.remove(id);
                if set.is_empty() {
                    self.hosted.remove(host);
                }
            }
            if let Some(h) = self.instances.get(host).and_then(|h| h.partition.clone()) {
                self.touch_computer(seq, &h.0);
            }
        }
        if let Some((c, p)) = &inst.partition {
            if let Some(part) = self.partitions.get_mut(&(c.clone(), p.clone())) {
                part.state = SlapState::Free;
                part.instance = None;
                let capabilities = part.capabilities.clone();
                if let Some(position) = self.position_of(c, p) {
                    self.placement.vacate(c, position, &capabilities);
                }
                self.dirty.insert(Dirty::Partition(c.clone(), p.clone()));
            }
            self.revoke_partition_certificates(c, p);
            self.touch_computer(seq, c);
        }
        for guest in self.hosted.remove(id).unwrap_or_default() {
            if let Some(g) = self.instances.get_mut(&guest).map(Arc::make_mut) {
                g.host = None;
                g.pending_reason = Some(format!("its host {id} was destroyed"));
                self.dirty.insert(Dirty::Instance(guest.clone()));
                self.pending.insert((creation_index(&guest), guest.clone()));
            }
        }
        // A destroyed parent that was waiting only for this child may go now.
        if let Requester::Instance(parent) = &inst.requester {
            self.release_if_unplaced(seq, parent);
        }
    }

    fn destroyed_partition(&mut self, seq: u64, now: u64, computer: &str, partition: &str) -> Reply {
        let key = (computer.to_string(), partition.to_string());
        let Some(part) = self.partitions.get(&key) else {
            return refused_not_found(format!("computer {computer} has no partition {partition}"));
        };
        let Some(id) = part.instance.clone() else {
            // Already free: a node repeating itself after a lost answer.
            return Reply::Done;
        };
        let inst = &self.instances[&id];
        if inst.requested_state != RequestedState::Destroyed {
            return Reply::Note(format!(
                "instance {id} on {partition} is not requested destroyed; nothing freed"
            ));
        }
        let live: Vec<String> = self.children_of(&id).map(|c| c.title.clone()).collect();
        if !live.is_empty() {
            self.destroy_descendants(seq, now, &id);
            return Reply::Note(format!(
                "Not destroying yet because this partition has child partitions: {}",
                live.join(", ")
            ));
        }
        self.close_hosting(seq, &id, now);
        self.remove_instance(seq, &id);
        // The freed partition and any detached shared instances may place waiting ones.
        self.place_pending(seq, now);
        // A parent waiting for this child to go may now be freed by its node.
        Reply::Done
    }

    fn set_related(&mut self, seq: u64, now: u64, computer: &str, partition: &str, titles: &[String]) -> Reply {
        let id = match self.partition_instance(computer, partition) {
            Ok(id) => id,
            Err(reply) => return reply,
        };
        let keep: BTreeSet<&str> = titles.iter().map(String::as_str).collect();
        let unlinked: Vec<InstanceId> = self
            .children_of(&id)
            .filter(|c| !keep.contains(c.title.as_str()) && c.requested_state != RequestedState::Destroyed)
            .map(|c| c.id.clone())
            .collect();
        for child in unlinked {
            self.instance_mut(&child).requested_state = RequestedState::Destroyed;
            self.bump(seq, now, &child);
            self.bump_host_of(seq, now, &child);
            self.destroy_descendants(seq, now, &child);
            self.release_if_unplaced(seq, &child);
        }
        Reply::Done
    }

    // ----- what nodes report -------------------------------------------

    fn set_connection(
        &mut self,
        seq: u64,
        now: u64,
        computer: &str,
        partition: &str,
        shared_reference: Option<&str>,
        connection: &Params,
    ) -> Reply {
        let target = match self.publisher(computer, partition, shared_reference) {
            Ok(id) => id,
            Err(reply) => return reply,
        };
        if self.instances[&target].connection == *connection {
            return Reply::Done;
        }
        self.instance_mut(&target).connection = connection.clone();
        // The publisher's own document shows it (a shared instance's, in its
        // host's list): its computer's document changed, without a redeploy.
        self.touch_computer(seq, computer);
        // The requester reads these: make it redeploy. The publisher itself is
        // not bumped, or it would redeploy forever.
        if let Requester::Instance(parent) = self.instances[&target].requester.clone() {
            self.bump(seq, now, &parent);
        }
        Reply::Done
    }

    /// The instance a partition publishes for: its own, or a shared one it hosts.
    fn publisher(&self, computer: &str, partition: &str, shared_reference: Option<&str>) -> Result<InstanceId, Reply> {
        let host = self.partition_instance(computer, partition)?;
        match shared_reference {
            None => Ok(host),
            Some(reference) => match self.instances.get(reference) {
                Some(s) if s.host.as_deref() == Some(host.as_str()) => Ok(reference.to_string()),
                Some(_) => Err(invalid(format!(
                    "shared instance {reference} is not hosted on {partition}"
                ))),
                None => Err(refused_not_found(format!("shared instance {reference} does not exist"))),
            },
        }
    }

    /// Whether applying `command` would change nothing and answer
    /// `Reply::Done`: a node repeating at every run what it already
    /// published or reported, an operator re-supplying what is supplied.
    /// Such a write can be answered by a linearizable read instead of a log
    /// entry. `false` when in doubt: the command is then applied.
    pub fn changes_nothing(&self, command: &Command) -> bool {
        match command {
            Command::SetConnection {
                computer,
                partition,
                shared_reference,
                connection,
            } => self
                .publisher(computer, partition, shared_reference.as_deref())
                .is_ok_and(|target| self.instances[&target].connection == *connection),
            Command::ReportInstance {
                computer,
                partition,
                shared_reference,
                report,
            } => self
                .reporter(computer, partition, shared_reference.as_deref())
                .is_ok_and(|target| {
                    let hosting_as_reported = shared_reference.is_some()
                        || match report {
                            InstanceReport::Started => self.ledger.spans.contains_key(&target),
                            InstanceReport::Stopped => !self.ledger.spans.contains_key(&target),
                            InstanceReport::Error(_) => true,
                        };
                    self.instances[&target].reported.as_ref() == Some(report) && hosting_as_reported
                }),
            Command::ReportSoftware { computer, url, report } => {
                *report != SoftwareReport::Destroyed
                    && self
                        .installations
                        .get(&(computer.clone(), url.clone()))
                        .is_some_and(|i| i.reported.as_ref() == Some(report))
            }
            Command::Supply { computer, url, state } => self
                .installations
                .get(&(computer.clone(), url.clone()))
                .is_some_and(|i| i.requested == *state && self.computers.contains_key(computer)),
            _ => false,
        }
    }

    /// The instance a partition reports for: its own, or a shared one it hosts.
    fn reporter(&self, computer: &str, partition: &str, shared_reference: Option<&str>) -> Result<InstanceId, Reply> {
        let host = self.partition_instance(computer, partition)?;
        match shared_reference {
            None => Ok(host),
            Some(r)
                if self
                    .instances
                    .get(r)
                    .is_some_and(|s| s.host.as_deref() == Some(host.as_str())) =>
            {
                Ok(r.to_string())
            }
            Some(r) => Err(refused_not_found(format!(
                "shared instance {r} is not hosted on {partition}"
            ))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn report_instance(
        &mut self,
        seq: u64,
        now: u64,
        computer: &str,
        partition: &str,
        shared_reference: Option<&str>,
        report: &InstanceReport,
    ) -> Reply {
        let target = match self.reporter(computer, partition, shared_reference) {
            Ok(id) => id,
            Err(reply) => return reply,
        };
        if self.instances[&target].reported.as_ref() != Some(report) {
            self.instance_mut(&target).reported = Some(report.clone());
            self.touch_computer(seq, computer);
        }
        // Hosting is what nodes report: started opens it, stopped closes it.
        if shared_reference.is_none() {
            match report {
                InstanceReport::Started => self.open_hosting(&target, now),
                InstanceReport::Stopped => self.close_hosting(seq, &target, now),
                InstanceReport::Error(_) => {}
            }
        }
        Reply::Done
    }

    fn bang(&mut self, seq: u64, now: u64, computer: &str, partition: &str) -> Reply {
        let id = match self.partition_instance(computer, partition) {
            Ok(id) => id,
            Err(reply) => return reply,
        };
        let root = self.instances[&id].root.clone();
        let tree: Vec<InstanceId> = self
            .instances
            .values()
            .filter(|i| i.root == root)
            .map(|i| i.id.clone())
            .collect();
        for member in tree {
            self.bump(seq, now, &member);
        }
        Reply::Done
    }

    /// Rebuilds the derived indexes from the entities (after restore).
    pub(crate) fn reindex(&mut self) {
        self.titles.clear();
        self.children.clear();
        self.hosted.clear();
        self.pending.clear();
        let all: Vec<Arc<Instance>> = self.instances.values().cloned().collect();
        for inst in &all {
            self.index_instance(inst);
        }
        self.partition_certs.clear();
        let certs: Vec<Certificate> = self.certificates.values().cloned().collect();
        for cert in &certs {
            self.index_certificate(cert);
        }
        self.placement = allocation::PlacementIndex::build(&self.computers, &self.partitions, &self.installations);
    }

    /// Re-reads a computer's partitions and supplies into the placement index.
    fn refresh_placement(&mut self, computer: &str) {
        self.placement
            .refresh(computer, &self.computers, &self.partitions, &self.installations);
    }

    /// Where a partition is in its computer's list.
    fn position_of(&self, computer: &str, partition: &str) -> Option<usize> {
        self.computers
            .get(computer)?
            .partitions
            .iter()
            .position(|p| p == partition)
    }

    /// Ids of the instances `requester` requested.
    fn children_ids(&self, requester: &str) -> impl Iterator<Item = &InstanceId> {
        self.children.get(requester).into_iter().flatten()
    }
}

enum Place {
    Partition((ComputerId, PartitionId)),
    Host(InstanceId),
}

/// A request's origin resolved against the state: the scope its title lives
/// in, who asks, and the state of the tree it belongs to.
struct RequestContext {
    scope: Scope,
    requester: Requester,
    root_of_requester: Option<InstanceId>,
    owner: String,
    root_state: Option<RequestedState>,
}

impl RequestContext {
    /// The state an instance of this tree gets when `wanted` is asked: while
    /// the root is not started, children follow its state.
    fn effective(&self, wanted: RequestedState) -> RequestedState {
        match self.root_state {
            Some(rs) if rs != RequestedState::Started && wanted < rs => rs,
            _ => wanted,
        }
    }
}

/// What a re-request changes in an existing instance.
struct RequestChanges {
    /// Release, type, parameters or requested state: a redeploy (timestamp bump).
    changed: bool,
    /// The SLA (shown in the document, no redeploy).
    sla_changed: bool,
    /// What placement depends on. Capacity events (a computer, a supply, a
    /// freed partition, a new host) already retry every pending instance,
    /// so a re-request that changes none of these has nothing to retry.
    placement_changed: bool,
}

impl RequestChanges {
    fn of(current: &Instance, spec: &RequestSpec, state: Option<RequestedState>) -> RequestChanges {
        let changed = current.software_release != spec.software_release
            || current.software_type != spec.software_type
            || current.parameters != spec.parameters
            || state.is_some_and(|s| s != current.requested_state);
        let sla_changed = current.sla != spec.sla;
        RequestChanges {
            changed,
            sla_changed,
            placement_changed: sla_changed
                || current.software_release != spec.software_release
                || current.software_type != spec.software_type,
        }
    }

    fn none(&self) -> bool {
        !self.changed && !self.sla_changed && !self.placement_changed
    }
}

use allocation::Filter;

#[cfg(test)]
mod tests;
