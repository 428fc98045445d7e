//! What can be written to the Master (commands) and what a write answers
//! (replies). Commands are what the log carries: the leader wraps each one in
//! a [`Proposal`] with the time and the client's request id, so that `apply`
//! needs neither a clock nor any randomness.
//!
//! Part of the state machine: imports only the state.

use serde::{Deserialize, Serialize};

use super::model::*;

/// Identifies one write of one client, so a retry is recognized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestId {
    /// A client chooses its id once (e.g. a random UUID) and numbers its writes.
    pub client: String,
    /// Grows by one per write of that client; a retry reuses it.
    pub seq: u64,
}

/// A command as it enters the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub request_id: Option<RequestId>,
    /// The leader's wall clock when it proposed, in microseconds since 1970.
    pub time_us: u64,
    pub command: Command,
}

/// What one Raft log entry carries: proposals the leader gathered while the
/// previous entries were being proposed, applied in order. Batching pays the
/// per-entry costs (a log record, replication, an apply call) once for many
/// writes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProposalBatch(pub Vec<Proposal>);

/// A partition as `node format` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionSpec {
    pub id: PartitionId,
    pub addresses: Vec<Address>,
    pub tap: Option<String>,
    pub user: Option<String>,
    pub capabilities: Vec<String>,
}

/// Everything that changes the Master's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// `loadComputerConfigurationFromXML` / capacity report: create or update a
    /// computer and its partitions. Busy partitions missing from the list are
    /// kept (never destroyed by a format); free ones are removed.
    SetComputer {
        id: ComputerId,
        address: String,
        netmask: String,
        capacity: Params,
        categories: Params,
        partitions: Vec<PartitionSpec>,
    },
    /// `supplySupply`: install (available) or remove (destroyed) a release.
    Supply {
        computer: ComputerId,
        url: SoftwareUrl,
        state: SupplyState,
    },
    /// `requestComputerPartition`.
    Request(RequestSpec),
    /// `setComputerPartitionConnectionXml`.
    SetConnection {
        computer: ComputerId,
        partition: PartitionId,
        /// Publishing for a shared instance hosted on that partition.
        shared_reference: Option<InstanceId>,
        connection: Params,
    },
    /// `startedComputerPartition`, `stoppedComputerPartition`, `softwareInstanceError`.
    ReportInstance {
        computer: ComputerId,
        partition: PartitionId,
        shared_reference: Option<InstanceId>,
        report: InstanceReport,
    },
    /// `buildingSoftwareRelease`, `availableSoftwareRelease`, `softwareReleaseError`,
    /// `destroyedSoftwareRelease`.
    ReportSoftware {
        computer: ComputerId,
        url: SoftwareUrl,
        report: SoftwareReport,
    },
    /// `softwareInstanceBang`: redeploy the whole tree.
    Bang {
        computer: ComputerId,
        partition: PartitionId,
        message: String,
    },
    /// `destroyedComputerPartition`: the node wiped the partition.
    DestroyedPartition {
        computer: ComputerId,
        partition: PartitionId,
    },
    /// Written once by `master-node init`, right after the first membership.
    InitCluster { id: String, token_sha256: String },
    /// Installs the cluster's certificate authority (once).
    SetAuthority(Authority),
    /// Allows one `nodeagent register` for `computer` with the token whose
    /// sha256 (hex) this is.
    AddRegistration { computer: ComputerId, token_sha256: String },
    /// Records a certificate the leader signed; with `registration`, consumes
    /// that registration token (refused if it is unknown or for another computer).
    RecordCertificate {
        certificate: Certificate,
        registration: Option<String>,
    },
    /// Revokes the certificate with this serial.
    RevokeCertificate { serial: String },
    /// Revokes every certificate of this role (a replica that left).
    RevokeRole { role: Role },
    /// `useComputer`: a node's usage journal, parsed, booked once (a journal
    /// is known by its sha256).
    BookUsage {
        computer: ComputerId,
        journal_sha256: String,
        lines: Vec<super::ledger::UsageLine>,
    },
    /// Sets (or, with `None`, removes) the unit price of a resource, for one
    /// release or (`None`) for every release.
    SetPrice {
        resource: String,
        release: Option<SoftwareUrl>,
        price: Option<super::ledger::Price>,
    },
    /// Reserves the next replica id for a joining replica.
    ReserveReplicaId { addr: String },
    /// A replica says where it serves SLAP and the native API, so gateways
    /// and clients can find every replica (and the leader's) from any one.
    AnnounceReplica { id: u64, public_addr: String },
    /// Applies `then` only while the partition holds `instance`; refused
    /// (not found) otherwise. A node's late report or publication, retried
    /// after the instance was destroyed and the partition given to another,
    /// must not land on the new tenant.
    IfPartitionHolds {
        computer: ComputerId,
        partition: PartitionId,
        instance: InstanceId,
        then: Box<Command>,
    },
    /// `updateComputerPartitionRelatedInstanceList`: the children the
    /// partition's instance still requests; the others are destroyed.
    SetRelatedInstances {
        computer: ComputerId,
        partition: PartitionId,
        titles: Vec<String>,
    },
    /// Sets the cluster's limits (administrators).
    SetLimits(super::limits::Limits),
    /// Raises the cluster's version: the leader proposes it once every
    /// member says it speaks that version. Never lowers it.
    SetClusterVersion { version: u32 },
    /// Records `certificate` as the renewal of the live certificate with
    /// this serial (same holder); the old one stays valid until it
    /// expires: `master-node cert renew` and the automatic renewals of
    /// replicas and gateways. Since version 2.
    RenewCertificate {
        serial: String,
        certificate: Box<Certificate>,
    },
    /// Starts a rotation of the certificate authority: `authority` signs
    /// from now on; the one it replaces stays trusted, and `cross_pem`
    /// (the new CA's certificate signed by the old one) goes along with
    /// every certificate issued, so a holder that trusts only the old CA
    /// still accepts the new ones: `master-node ca rotate`. Since version 3.
    RotateAuthority { authority: Authority, cross_pem: String },
    /// Ends the rotation: the old CA is trusted no more: `master-node ca
    /// finish`. Since version 3.
    FinishRotation,
    /// During a CA rotation, gives a partition whose live certificate is
    /// from the previous CA a `certificate` from the new one; the old one
    /// stays valid beside it until the rotation ends, so the instance
    /// using it loses nothing while its node fetches the new one. The
    /// leader's issuer writes it. Since version 4.
    ReplacePartitionCertificate { certificate: Box<Certificate> },
    /// Publishes (or replaces) a computer's offer on the market: its
    /// owner, the computer itself or an administrator. New allocations
    /// only: running instances keep the terms they were allocated at.
    /// Since version 5.
    SetOffer(Box<super::market::Offer>),
    /// Takes a computer's offer down. Since version 5.
    WithdrawOffer { computer: ComputerId },
    /// Names (or forgets) the user who owns a computer: who sets its offer
    /// and is credited for its work (administrators). Since version 5.
    SetComputerOwner {
        computer: ComputerId,
        owner: Option<String>,
    },
}

/// The newest version of the command set this build speaks. A command kind
/// of a higher version than the cluster's ([`Command::since`]) is refused
/// before it reaches the log, so a replica of an older release, which could
/// not apply it, never meets it.
pub const VERSION: u32 = 5;

impl Command {
    /// The version of the command set that introduced this kind of command.
    pub fn since(&self) -> u32 {
        match self {
            Command::RenewCertificate { .. } => 2,
            Command::RotateAuthority { .. } | Command::FinishRotation => 3,
            Command::ReplacePartitionCertificate { .. } => 4,
            Command::SetOffer(_) | Command::WithdrawOffer { .. } | Command::SetComputerOwner { .. } => 5,
            Command::IfPartitionHolds { then, .. } => then.since(),
            _ => 1,
        }
    }

    /// The version a replica must speak to apply this command: the one that
    /// introduced its kind or, for a version change, the new version (a
    /// replica that cannot speak it must stop rather than go on in a
    /// cluster it no longer understands).
    pub fn needs(&self) -> u32 {
        match self {
            Command::SetClusterVersion { version } => (*version).max(self.since()),
            _ => self.since(),
        }
    }

    /// The command's kind, as an operator reads it in an error.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::RenewCertificate { .. } => "certificate renewal",
            Command::RotateAuthority { .. } | Command::FinishRotation => "CA rotation",
            Command::ReplacePartitionCertificate { .. } => "partition certificate replacement",
            Command::SetClusterVersion { .. } => "cluster version change",
            Command::SetOffer(_) | Command::WithdrawOffer { .. } => "market offer",
            Command::SetComputerOwner { .. } => "computer owner change",
            _ => "command",
        }
    }
}

/// `requestComputerPartition`'s arguments, in domain terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSpec {
    pub requester: RequestOrigin,
    pub title: String,
    pub software_release: SoftwareUrl,
    pub software_type: String,
    pub parameters: Params,
    pub sla: Params,
    pub shared: bool,
    /// `None` keeps the current state (a new instance starts `started`).
    pub state: Option<RequestedState>,
}

/// Who sends a request, as the caller identifies itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOrigin {
    User(String),
    Partition {
        computer: ComputerId,
        partition: PartitionId,
    },
}

/// The answer to a write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Done,
    /// The requested instance as it stands after the request. Shared, so
    /// the client's session can keep the same answer for a retry without a
    /// copy.
    Instance(std::sync::Arc<Instance>),
    /// The write was refused; nothing changed.
    Refused(Refusal),
    /// Something was noted, with a message for the caller (e.g. a root not
    /// freed yet because children remain).
    Note(String),
    /// A replica id reserved for a joiner.
    ReplicaId(u64),
}

impl Default for Reply {
    /// The answer to log entries that carry no command (blank, membership).
    fn default() -> Self {
        Reply::Done
    }
}

/// Why a write was refused; each maps to one SLAP status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// Names something that does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// Malformed or contradictory input (400).
    #[error("{0}")]
    Invalid(String),
    /// The caller may not do this (403).
    #[error("{0}")]
    Forbidden(String),
    /// Larger than one of the cluster's limits, which the message names (413).
    #[error("{0}")]
    TooLarge(String),
    /// A kind of write the cluster does not take yet: a replica runs a
    /// release that could not apply it (409).
    #[error("{0}")]
    NotYet(String),
    /// A retry of a write older than this client's last one (409).
    #[error("request {seq} of client {client} is older than its last write {last}; its answer is gone")]
    StaleRequest { client: String, seq: u64, last: u64 },
}
