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
//!
//! The state machine imports nothing else of this crate: no Raft, no network,
//! no clock.

pub mod allocation;
mod authority;
pub mod command;
mod computers;
mod der;
mod instances;
pub mod ledger;
pub mod limits;
pub mod market;
pub mod model;
mod params;
pub mod persist;
mod reports;
mod sites;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

pub use command::*;
pub use model::*;
pub use params::Params;
pub use sites::SiteRefusal;

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
    Certificate(Fingerprint),
    Registration(String),
    ReplicaAddr(u64),
    Movement(u64),
    Span(InstanceId),
    Journal(String),
    Price(String, String),
    Limits,
    Version,
    Rotation,
    Offer(ComputerId),
    Owner(ComputerId),
    Agreement(InstanceId),
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
    /// A rotation of the authority under way: the CA it replaced, still
    /// trusted until `ca finish`.
    pub rotation: Option<Rotation>,
    /// Issued certificates by fingerprint.
    pub certificates: BTreeMap<Fingerprint, Certificate>,
    /// Pending computer registrations: token sha256 -> computer.
    pub registrations: BTreeMap<String, ComputerId>,
    /// Where each replica serves SLAP and the native API, as it announced.
    pub replica_addrs: BTreeMap<u64, String>,
    /// Accounting: movements, open hosting spans, booked journals, prices.
    pub ledger: ledger::Ledger,
    /// Computers' offers on the market.
    pub market: market::Market,
    /// What one call may carry (set by administrators).
    pub limits: limits::Limits,
    /// The version of the command set every voter speaks, as the leader
    /// last raised it (0 until then: version 1).
    pub cluster_version: u32,
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
    partition_certs: BTreeMap<(ComputerId, PartitionId), Fingerprint>,
    /// Busy partitions without a live certificate: the leader's issuer
    /// takes its work from here rather than scanning every partition.
    uncertified: BTreeSet<(ComputerId, PartitionId)>,
    /// During a CA rotation, partitions whose live certificate is not from
    /// the CA that signs now: the leader's issuer replaces them.
    stale_partition_certs: BTreeSet<(ComputerId, PartitionId)>,
    /// During a CA rotation, a partition's certificate from the previous CA
    /// kept valid beside its replacement until the node has taken the new
    /// one (`ca finish` revokes them).
    superseded_certs: BTreeMap<(ComputerId, PartitionId), Fingerprint>,
    /// Computers whose partitions' live certificates changed in the command
    /// being applied: their documents show the serials (version 4), so
    /// their revisions move once the command is done.
    certs_moved: BTreeSet<ComputerId>,
    children: BTreeMap<InstanceId, BTreeSet<InstanceId>>,
    hosted: BTreeMap<InstanceId, BTreeSet<InstanceId>>,
    /// Instances waiting for a place, by creation sequence number.
    pending: BTreeSet<(u64, InstanceId)>,
    /// Free partitions by release and load, for placement.
    placement: allocation::PlacementIndex,
    /// Computers by the revision of their document: which documents changed
    /// after a given revision (nodes' watches wake on it).
    revised: BTreeSet<(u64, ComputerId)>,
    /// Revoked certificates that could read a computer's document (a
    /// computer's, an administrator's): a gateway that remembers who may
    /// poll what forgets it all when this moves.
    poller_revocations: u64,
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
        // A document shows its partitions' certificate serials since
        // version 4 (see `documents::computer_partition`).
        for computer in std::mem::take(&mut self.certs_moved) {
            if self.effective_version() >= 4 {
                self.touch_computer(seq, &computer);
            }
        }
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
        // Checked before the log too (the replica a call arrives on, the
        // leader): this refuses only what an older replica let through.
        if let Err(reason) = self.limits.check(&command) {
            return Reply::Refused(Refusal::TooLarge(reason));
        }
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
            Command::SetLimits(limits) => self.set_limits(limits),
            Command::SetClusterVersion { version } => self.set_cluster_version(seq, now, version),
            Command::RenewCertificate { serial, certificate } => self.renew_certificate(&serial, &certificate),
            Command::SetPrice {
                resource,
                release,
                price,
            } => self.set_price(seq, now, &resource, release.as_deref(), price.as_ref()),
            Command::SetOffer(offer) => self.set_offer(seq, now, *offer),
            Command::WithdrawOffer { computer } => self.withdraw_offer(seq, now, &computer),
            Command::SetComputerOwner { computer, owner } => self.set_owner(seq, now, &computer, owner.as_deref()),
            Command::AnnounceReplica { id, public_addr } => {
                if self.replica_addrs.get(&id) != Some(&public_addr) {
                    self.replica_addrs.insert(id, public_addr);
                    self.dirty.insert(Dirty::ReplicaAddr(id));
                }
                Reply::Done
            }
            Command::SetAuthority(a) => self.set_authority(&a),
            Command::RotateAuthority { authority, cross_pem } => self.rotate_authority(authority, cross_pem),
            Command::FinishRotation => self.finish_rotation(),
            Command::ReplacePartitionCertificate { certificate } => self.replace_partition_certificate(&certificate),
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
            let old = std::mem::replace(&mut c.revision, seq);
            self.index_revision(computer, Some(old), seq);
            self.dirty.insert(Dirty::Revision(computer.to_string()));
        }
    }

    /// Moves `computer` in the index by revision.
    fn index_revision(&mut self, computer: &str, old: Option<u64>, new: u64) {
        if let Some(old) = old {
            self.revised.remove(&(old, computer.to_string()));
        }
        self.revised.insert((new, computer.to_string()));
    }

    /// How many certificates that could read a computer's document were
    /// revoked (see the `poller_revocations` field).
    pub fn poller_revocations(&self) -> u64 {
        self.poller_revocations
    }

    /// Computers whose document changed after `revision`, with their
    /// current revision, oldest change first.
    pub fn computers_revised_after(&self, revision: u64) -> impl Iterator<Item = &(u64, ComputerId)> {
        self.revised.range((revision.saturating_add(1), String::new())..)
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

    /// The instance a partition acts for (publishes, reports): its own, or
    /// a shared one it hosts.
    fn instance_for(
        &self,
        computer: &str,
        partition: &str,
        shared_reference: Option<&str>,
    ) -> Result<InstanceId, Reply> {
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
                "partition {partition} of {computer} hosts no shared instance {r}"
            ))),
        }
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
        self.reindex_certificates();
        self.uncertified = self
            .partitions
            .iter()
            .filter(|(key, p)| p.state == SlapState::Busy && !self.partition_certs.contains_key(*key))
            .map(|(key, _)| key.clone())
            .collect();
        let (terms, catalog) = self.placement_terms();
        self.placement =
            allocation::PlacementIndex::build(&self.computers, &self.partitions, &self.installations, terms, catalog);
        self.revised = self.computers.values().map(|c| (c.revision, c.id.clone())).collect();
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

#[cfg(test)]
mod tests;
