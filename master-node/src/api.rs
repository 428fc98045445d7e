//! What travels in the cluster API's `Write` and `Read` calls (postcard):
//! a write before the leader stamps it, and the linearizable queries.
//!
//! Imports only the state: no transport, no Raft.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::ledger::{self, Report, ReportFor};
use crate::state::{persist, Command, Instance, Master, RequestId, Scope};

/// A write as a client sends it; the leader adds the time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientWrite {
    pub request_id: Option<RequestId>,
    pub command: Command,
}

/// A read that must reflect every write acknowledged before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// An instance by its scope and title.
    Instance { scope: Scope, title: String },
    /// A digest of the whole state, to compare replicas.
    StateDigest,
    /// Every instance of a user's trees, or everyone's (`None`), by id.
    Instances { owner: Option<String> },
    /// A usage report for a month (`[start, end)` in microseconds).
    Usage {
        who: ReportFor,
        period_start_us: u64,
        period_end_us: u64,
    },
    /// The cluster's limits.
    Limits,
    /// The market's offers (of one computer, or all).
    Offers { computer: Option<String> },
}

/// The answer to a [`Query`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    Instance(Option<Box<Instance>>),
    StateDigest {
        last_index: u64,
        sha256: String,
        instances: usize,
    },
    Instances(Vec<Instance>),
    Usage(Report),
    Limits(crate::state::limits::Limits),
    Offers(Vec<crate::state::market::OfferView>),
}

/// Answers `query` from `state`.
pub fn answer(state: &Master, query: &Query) -> Answer {
    match query {
        Query::Instance { scope, title } => {
            Answer::Instance(state.instance_by_title(scope, title).cloned().map(Box::new))
        }
        Query::Instances { owner } => Answer::Instances(
            state
                .instances
                .values()
                .filter(|i| owner.as_ref().is_none_or(|o| &i.owner == o))
                .map(|i| Instance::clone(i))
                .collect(),
        ),
        Query::Usage {
            who,
            period_start_us,
            period_end_us,
        } => {
            let period = ledger::Period {
                start_us: *period_start_us,
                end_us: *period_end_us,
            };
            // Open hosting counts up to the Master's own clock, which is the
            // same on every replica at one log position.
            Answer::Usage(ledger::report(&state.ledger, who, &period, state.clock))
        }
        Query::Limits => Answer::Limits(state.limits.clone()),
        Query::Offers { computer } => Answer::Offers(state.offer_views(computer.as_deref())),
        Query::StateDigest => Answer::StateDigest {
            last_index: state.last_index,
            sha256: digest(state),
            instances: state.instances.len(),
        },
    }
}

/// sha256 over every record of the state, in key order: equal on replicas
/// that applied the same log.
pub fn digest(state: &Master) -> String {
    let mut records = persist::all_records(state);
    records.sort();
    let mut h = Sha256::new();
    for (k, v) in records {
        h.update((k.len() as u64).to_le_bytes());
        h.update(&k);
        h.update((v.len() as u64).to_le_bytes());
        h.update(&v);
    }
    hex::encode(h.finalize())
}
