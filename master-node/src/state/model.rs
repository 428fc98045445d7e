//! The Master's entities, in SlapOS words. Plain data: no wire format, no
//! storage, no clock.
//!
//! Part of the state machine: imports nothing.

use serde::{Deserialize, Serialize};

/// A computer's reference, e.g. `COMP-123`.
pub type ComputerId = String;
/// A partition's reference within its computer, e.g. `slappart3`.
pub type PartitionId = String;
/// A software release URL.
pub type SoftwareUrl = String;
/// An instance's reference, e.g. `SOFTINST-42`. Shared instances share the space.
pub type InstanceId = String;
/// Certificates and keys as bytes, a digest as bytes (see `der`).
pub use super::der::{Fingerprint, Pem};
/// Parameters, connection parameters, SLA: flat string maps, as in instance XML.
pub use super::params::Params;

/// A machine split into partitions, as reported by `node format`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Computer {
    pub id: ComputerId,
    /// The node's own address and netmask.
    pub address: String,
    pub netmask: String,
    /// Capacity facts reported by the node (cpu, memory, disk, ...).
    pub capacity: Params,
    /// Allocation categories: region, cpu_type, network_guid, group, ...
    pub categories: Params,
    /// Partition ids in the order the node reported them.
    pub partitions: Vec<PartitionId>,
    /// Bumped (to the log index) whenever the document a node polls changes.
    pub revision: u64,
}

/// Whether a partition holds an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlapState {
    Free,
    Busy,
}

/// One IP address of a partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    /// Network interface (the tap name, or the node's interface).
    pub interface: String,
    pub addr: String,
    pub netmask: String,
}

/// A computer partition: a Unix user, a directory, a tap and addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub computer: ComputerId,
    pub id: PartitionId,
    pub state: SlapState,
    pub addresses: Vec<Address>,
    pub tap: Option<String>,
    pub user: Option<String>,
    /// Capabilities declared by the node; see the `capability` SLA key.
    pub capabilities: Vec<String>,
    /// The instance placed here, when busy.
    pub instance: Option<InstanceId>,
}

/// Requested state of a software installation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SupplyState {
    Available,
    Destroyed,
}

/// What the node last said about a software installation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SoftwareReport {
    Building,
    Available,
    Error(String),
    Destroyed,
}

/// A software release supplied to a computer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoftwareInstallation {
    pub computer: ComputerId,
    pub url: SoftwareUrl,
    pub requested: SupplyState,
    pub reported: Option<SoftwareReport>,
}

/// Requested state of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RequestedState {
    Started,
    Stopped,
    Destroyed,
}

impl RequestedState {
    /// The word SLAP uses.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestedState::Started => "started",
            RequestedState::Stopped => "stopped",
            RequestedState::Destroyed => "destroyed",
        }
    }

    /// Parses the SLAP word.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "started" => Some(RequestedState::Started),
            "stopped" => Some(RequestedState::Stopped),
            "destroyed" => Some(RequestedState::Destroyed),
            _ => None,
        }
    }
}

/// What the node last said about an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceReport {
    Started,
    Stopped,
    Error(String),
}

/// Who asked for an instance: a user (a root request) or an instance (a child).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Requester {
    User(String),
    Instance(InstanceId),
}

/// Where a title is unique: among a user's roots, or within one tree.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    User(String),
    /// A tree, named by its root instance.
    Tree(InstanceId),
}

/// A software instance or a shared (slave) instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: InstanceId,
    pub title: String,
    pub scope: Scope,
    pub requester: Requester,
    /// The root of the tree (itself for a root).
    pub root: InstanceId,
    /// The user owning the tree.
    pub owner: String,
    pub software_release: SoftwareUrl,
    pub software_type: String,
    pub parameters: Params,
    pub sla: Params,
    pub shared: bool,
    pub requested_state: RequestedState,
    pub connection: Params,
    pub reported: Option<InstanceReport>,
    /// Where it runs (non-shared), once allocated.
    pub partition: Option<(ComputerId, PartitionId)>,
    /// The host instance (shared instances), once attached.
    pub host: Option<InstanceId>,
    /// Why it is not placed yet, when it is not.
    pub pending_reason: Option<String>,
    /// Changes whenever the node should redeploy it (SLAP `timestamp`).
    pub timestamp: u64,
    /// Leader time of the first request, in microseconds.
    pub created_at: u64,
}

impl Instance {
    /// Placed on a partition (non-shared) or attached to a host (shared).
    pub fn is_placed(&self) -> bool {
        self.partition.is_some() || self.host.is_some()
    }
}

/// A client's last write, so a retry gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub seq: u64,
    pub reply: crate::state::Reply,
    /// Leader time of that write, to forget idle clients.
    pub at: u64,
}

/// The cluster's own facts, replicated like everything else so any leader
/// can check a join token and hand out replica ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    pub id: String,
    /// sha256 (hex) of the join token's secret.
    pub token_sha256: String,
    /// The next replica id to hand out; ids are never reused.
    pub next_replica_id: u64,
}

/// Who a certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Everything.
    Admin,
    /// A user: their own instance trees.
    User(String),
    /// A node: its own computer and partitions.
    Computer(ComputerId),
    /// One partition's instance: itself and its tree's children.
    Partition(ComputerId, PartitionId),
    /// A Master replica.
    Replica(u64),
    /// A slap-gateway: may pass on the identity of the callers it verified.
    Gateway(String),
}

impl Role {
    /// The kind of holder, as an operator counts them.
    pub fn kind(&self) -> &'static str {
        match self {
            Role::Admin => "administrator",
            Role::User(_) => "user",
            Role::Computer(_) => "computer",
            Role::Partition(..) => "partition",
            Role::Replica(_) => "replica",
            Role::Gateway(_) => "gateway",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Admin => write!(f, "admin"),
            Role::User(u) => write!(f, "user {u}"),
            Role::Computer(c) => write!(f, "computer {c}"),
            Role::Partition(c, p) => write!(f, "partition {p} of {c}"),
            Role::Replica(n) => write!(f, "replica {n}"),
            Role::Gateway(g) => write!(f, "gateway {g}"),
        }
    }
}

/// The cluster's certificate authority, replicated so any leader can sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authority {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A rotation of the certificate authority under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// The CA that signed before (PEM), trusted until the rotation ends.
    pub previous_pem: String,
    /// The current CA's certificate signed by the previous CA (PEM): sent
    /// after every certificate issued meanwhile, so a holder that trusts
    /// only the previous CA finds a path to it.
    pub cross_pem: String,
}

/// A certificate the Master issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// Hex serial number, as `master-node cert revoke` takes it.
    pub serial: String,
    /// sha256 of the DER: how a handshake finds the record.
    pub fingerprint: Fingerprint,
    pub role: Role,
    pub cert_pem: Pem,
    /// Kept only for partitions, whose node fetches it again
    /// (getComputerPartitionCertificate); users and nodes get theirs once.
    pub key_pem: Option<Pem>,
    /// Unix seconds.
    pub not_after: u64,
    pub revoked: bool,
}
