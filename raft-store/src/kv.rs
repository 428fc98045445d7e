//! A minimal key-value application on this store.
//!
//! It exists so the store can be exercised end to end without any real
//! application: openraft's conformance suite, the crash test, the property
//! test and the benchmarks all run on it. It is also the shortest example of
//! implementing [`StateMachine`].

use std::collections::{BTreeMap, BTreeSet};

use openraft::{BasicNode, LogId, TokioRuntime};
use serde::{Deserialize, Serialize};

use crate::{ApplyError, RestoreError, StateMachine, Writes};

openraft::declare_raft_types!(
    /// openraft types of the key-value application.
    pub KvTypes:
        D = KvCommand,
        R = KvReply,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<KvTypes>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = TokioRuntime,
);

/// A write to the key-value map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Sets `key` to `value`.
    Set { key: String, value: Vec<u8> },
    /// Removes `key`.
    Delete { key: String },
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
    fn apply(&mut self, _log_id: &LogId<u64>, command: KvCommand) -> Result<KvReply, ApplyError> {
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
