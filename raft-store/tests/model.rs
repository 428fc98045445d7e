//! Property test: random sequences of append / truncate / purge / save_vote /
//! restart on the real store, checked after every step against a plain
//! in-memory model of a Raft log.

use std::collections::BTreeMap;
use std::path::Path;

use openraft::alias::LogIdOf;
use proptest::prelude::*;
use raft_store::kv::{set_entry, KvEntry, KvTypes, KvVote};
use raft_store::LogStore;

#[derive(Debug, Clone)]
enum Op {
    Append {
        count: u64,
        term: u64,
    },
    /// Truncate at the entry this far into the present entries (modulo).
    Truncate(usize),
    /// Purge up to the entry this far into the present entries (modulo).
    Purge(usize),
    SaveVote {
        term: u64,
        node: u64,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..6u64, 1..4u64).prop_map(|(count, term)| Op::Append { count, term }),
        1 => any::<usize>().prop_map(Op::Truncate),
        1 => any::<usize>().prop_map(Op::Purge),
        1 => (0..10u64, 0..3u64).prop_map(|(term, node)| Op::SaveVote { term, node }),
        1 => Just(Op::Restart),
    ]
}

#[derive(Default)]
struct Model {
    entries: BTreeMap<u64, KvEntry>,
    purged: Option<LogIdOf<KvTypes>>,
    vote: Option<KvVote>,
}

impl Model {
    fn last(&self) -> Option<LogIdOf<KvTypes>> {
        self.entries.values().next_back().map(|e| e.log_id).or(self.purged)
    }
    fn nth(&self, k: usize) -> Option<LogIdOf<KvTypes>> {
        if self.entries.is_empty() {
            return None;
        }
        self.entries.values().nth(k % self.entries.len()).map(|e| e.log_id)
    }
}

fn append_and_wait(store: &LogStore<KvTypes>, entries: Vec<KvEntry>) {
    let (tx, rx) = std::sync::mpsc::channel();
    store.append_with(entries, move |r| tx.send(r).unwrap()).unwrap();
    rx.recv().unwrap().unwrap();
}

fn check(store: &LogStore<KvTypes>, model: &Model) -> Result<(), TestCaseError> {
    let state = store.log_state().unwrap();
    prop_assert_eq!(state.last_purged_log_id, model.purged);
    prop_assert_eq!(state.last_log_id, model.last());
    let stored = store.read_entries(..).unwrap();
    let expected: Vec<_> = model.entries.values().cloned().collect();
    prop_assert_eq!(stored, expected);
    prop_assert_eq!(store.vote(), model.vote);
    Ok(())
}

fn run(dir: &Path, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut store = LogStore::<KvTypes>::open(dir).unwrap();
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Append { count, term } => {
                // Terms in a log never go down.
                let term = term.max(model.last().map(|l| l.leader_id.term).unwrap_or(0));
                let first = model.last().map(|l| l.index + 1).unwrap_or(1);
                let batch: Vec<_> = (first..first + count)
                    .map(|index| {
                        set_entry(
                            term,
                            index,
                            format!("k{index}"),
                            vec![index as u8; (index % 7) as usize],
                        )
                    })
                    .collect();
                for e in &batch {
                    model.entries.insert(e.log_id.index, e.clone());
                }
                append_and_wait(&store, batch);
            }
            Op::Truncate(k) => {
                if let Some(at) = model.nth(k) {
                    store.truncate_from(at.index).unwrap();
                    model.entries.retain(|i, _| *i < at.index);
                }
            }
            Op::Purge(k) => {
                if let Some(upto) = model.nth(k) {
                    store.purge_upto(&upto).unwrap();
                    model.entries.retain(|i, _| *i > upto.index);
                    model.purged = Some(upto);
                }
            }
            Op::SaveVote { term, node } => {
                let vote = KvVote::new(term, node);
                store.write_vote(&vote).unwrap();
                model.vote = Some(vote);
            }
            Op::Restart => {
                drop(store);
                store = LogStore::<KvTypes>::open(dir).unwrap();
            }
        }
        check(&store, &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        run(dir.path(), ops)?;
    }
}
