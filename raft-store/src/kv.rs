//! A minimal key-value application on this store.
//!
//! It exists so the store can be exercised end to end without any real
//! application: openraft's conformance suite, the crash test, the property
//! test and the benchmarks all run on it. It is also the shortest example of
//! implementing [`StateMachine`].

use std::collections::{BTreeMap, BTreeSet};

use openraft::alias::LogIdOf;
use openraft::BasicNode;
use serde::{Deserialize, Serialize};

use crate::{ApplyError, RestoreError, StateMachine, Writes};

openraft::declare_raft_types!(
    /// openraft types of the key-value application.
    pub KvTypes:
        D = KvCommand,
        R = KvReply,
        NodeId = u64,
        Node = BasicNode,
);

/// A log entry of the key-value application.
pub type KvEntry = openraft::alias::EntryOf<KvTypes>;
/// A vote in the key-value application's cluster.
pub type KvVote = openraft::alias::VoteOf<KvTypes>;

/// The id of the entry at `index` written by leader `node` in `term` (for
/// tests and tools that write the log themselves).
pub fn log_id(term: u64, node: u64, index: u64) -> LogIdOf<KvTypes> {
    openraft::LogId::new(openraft::impls::leader_id_adv::LeaderId { term, node_id: node }, index)
}

/// An entry setting `key` to `value`, at `index` of `term` (leader 0).
pub fn set_entry(term: u64, index: u64, key: impl Into<String>, value: impl Into<Vec<u8>>) -> KvEntry {
    openraft::Entry {
        log_id: log_id(term, 0, index),
        payload: openraft::EntryPayload::Normal(KvCommand::Set {
            key: key.into(),
            value: value.into(),
        }),
    }
}

/// A write to the key-value map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Sets `key` to `value`.
    Set { key: String, value: Vec<u8> },
    /// Removes `key`.
    Delete { key: String },
}

impl std::fmt::Display for KvCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvCommand::Set { key, value } => write!(f, "set {key} ({} bytes)", value.len()),
            KvCommand::Delete { key } => write!(f, "delete {key}"),
        }
    }
}

/// The answer to a command: what the key held before.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvReply {
    pub previous: Option<Vec<u8>>,
}

/// The map itself.
#[derive(Debug, Default)]
pub struct KvApp {
    pub data: BTreeMap<String, Vec<u8>>,
    /// Keys changed since the store last asked ([`StateMachine::changed_records`]).
    changed: BTreeSet<String>,
}

impl StateMachine<KvTypes> for KvApp {
    fn apply(&mut self, _log_id: &LogIdOf<KvTypes>, command: KvCommand) -> Result<KvReply, ApplyError> {
        Ok(match command {
            KvCommand::Set { key, value } => {
                self.changed.insert(key.clone());
                KvReply {
                    previous: self.data.insert(key, value),
                }
            }
            KvCommand::Delete { key } => {
                let previous = self.data.remove(&key);
                self.changed.insert(key);
                KvReply { previous }
            }
        })
    }

    fn changed_records(&mut self, writes: &mut Writes) {
        for key in std::mem::take(&mut self.changed) {
            match self.data.get(&key) {
                Some(value) => writes.put(key.as_bytes(), value),
                None => writes.delete(key.as_bytes()),
            }
        }
    }

    fn restore(records: &mut dyn Iterator<Item = (Vec<u8>, Vec<u8>)>) -> Result<Self, RestoreError> {
        let mut data = BTreeMap::new();
        for (key, value) in records {
            let key = String::from_utf8(key).map_err(|e| RestoreError {
                key: e.as_bytes().to_vec(),
                reason: "key is not UTF-8".into(),
            })?;
            data.insert(key, value);
        }
        Ok(Self {
            data,
            changed: BTreeSet::new(),
        })
    }
}
