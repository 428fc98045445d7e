//! What clients saw: every call as an operation with its invocation and
//! completion times and its outcome.
//!
//! An operation is `ok` (the Master answered and it took effect), `fail`
//! (a definite refusal: it did not take effect) or `unknown` (no answer by
//! the end: it may or may not have taken effect, at any time after its
//! invocation). Times are microseconds since the run's origin, taken from
//! the wall clock, so the histories of several processes on one machine
//! merge into one.

use serde::{Deserialize, Serialize};

/// An instance as the workload keys it: the owning user and its title.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    pub user: String,
    pub title: String,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.user, self.title)
    }
}

/// What an operation asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    /// A user requests the instance with parameter `v`.
    Request { v: u64 },
    /// A user requests it destroyed.
    Destroy,
    /// A node publishes connection parameter `c` for instance `id`.
    Publish { id: String, c: String },
    /// A node reports instance `id` destroyed (its partition wiped).
    Freed { id: String },
    /// A linearizable read.
    Read,
    /// Anything not on an instance key (supply, a probe write); not
    /// checked for linearizability.
    Other { what: String },
}

/// An instance as a read or a request answer shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub id: String,
    /// The parameter `v`, if set.
    pub v: Option<u64>,
    /// The connection parameter `c`, if published.
    pub c: Option<String>,
    pub destroyed: bool,
    /// Where it runs, once placed.
    pub partition: Option<(String, String)>,
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Took effect. `seen` is the instance in the answer (requests, reads;
    /// `None` for a read that found nothing), `freed` whether a node's
    /// destroyed report freed the partition.
    Ok {
        seen: Option<Seen>,
        #[serde(default)]
        no_effect: bool,
    },
    /// Definitely refused (not found, invalid, ...).
    Fail { error: String },
    /// No answer: it may have taken effect.
    Unknown { error: String },
}

/// One call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Who called (a client or node name).
    pub process: String,
    /// The instance key, for calls on one.
    pub key: Option<Key>,
    pub call: Call,
    /// Microseconds since the run's origin.
    pub invoked: u64,
    /// When the answer came (`None`: never, for unknown outcomes).
    pub completed: Option<u64>,
    pub outcome: Outcome,
    /// Through which door (a gateway, a replica).
    #[serde(default)]
    pub via: String,
}

impl Op {
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok { .. })
    }

    pub fn is_unknown(&self) -> bool {
        matches!(self.outcome, Outcome::Unknown { .. })
    }

    /// Latency in microseconds, for completed calls.
    pub fn latency(&self) -> Option<u64> {
        self.completed.map(|c| c.saturating_sub(self.invoked))
    }
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A fault as the nemesis applied it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultEvent {
    /// kill, pause, partition, ... (see `nemesis`).
    pub kind: String,
    /// What exactly, for people.
    pub detail: String,
    /// When it began and when it was healed (microseconds since the origin).
    pub start: u64,
    pub healed: Option<u64>,
    /// Time from healing to the first write that succeeded after it.
    pub recovered_after_us: Option<u64>,
    /// What the fault itself saw go wrong (the abuse burst's answers).
    #[serde(default)]
    pub problems: Vec<String>,
}
