//! Raft storage on RocksDB for openraft 0.10, generic over the application.
//!
//! # Why this crate exists
//!
//! A replicated control plane is only as trustworthy as its disk: a Raft node
//! that acknowledges a vote or an entry it has not yet made durable can, after
//! a crash, vote twice or forget a committed write, and the cluster silently
//! loses data. This crate is the one place where that is made right, and it
//! knows nothing of SlapOS or of the network, so it can be tested on its own
//! (openraft's conformance suite, a SIGKILL crash test, a model-based property
//! test) and reused by any application with a deterministic state machine.
//!
//! # Pieces
//!
//! - [`LogStore`]: the log and Raft metadata (`RaftLogStorage`). Votes are
//!   synced before they are acknowledged; appends are readable at once and
//!   acknowledged after a WAL sync that covers every append waiting at that
//!   moment (group commit).
//! - [`StateMachineStore`]: `RaftStateMachine` around the application's
//!   [`StateMachine`]. Applied changes are written every 100 ms, in one
//!   RocksDB batch that carries the records the application changed (once
//!   each, however often they changed) and the last applied log id. Snapshots are
//!   streamed files built from a consistent RocksDB view and installed
//!   atomically (new generation directory, fsync, rename).
//! - Every record carries a format version; a record that is corrupt or of an
//!   unknown version stops start-up with an error naming the store and key.
//!
//! Layout of a data dir: `log/` (RocksDB: log and meta), `state/` (RocksDB
//! generations of the state machine), `snapshots/`.

mod codec;
mod error;
pub mod kv;
mod log_store;
mod snapshot;
mod state_machine;

use std::path::Path;

pub use codec::FORMAT_VERSION;
pub use error::StoreError;
pub use log_store::{LogStats, LogStore};
pub use state_machine::{
    applied_membership, ApplyError, RestoreError, StateMachine, StateMachineStore, ValueBuffer, Writes,
};

/// The openraft type configurations this store serves: the standard log
/// entry and payload, a default answer for blank and membership entries,
/// and commands that can be cloned (the store keeps the newest entries in
/// memory and hands out copies; make cloning cheap, e.g. bytes). Snapshots
/// are files (`tokio::fs::File`).
pub trait StoreTypes:
    openraft::RaftTypeConfig<
    Payload = openraft::alias::EntryPayloadOf<Self>,
    Entry = openraft::Entry<openraft::alias::CommittedLeaderIdOf<Self>, openraft::alias::EntryPayloadOf<Self>>,
    R: Default,
    D: Clone,
>
{
}

impl<C> StoreTypes for C where
    C: openraft::RaftTypeConfig<
        Payload = openraft::alias::EntryPayloadOf<C>,
        Entry = openraft::Entry<openraft::alias::CommittedLeaderIdOf<C>, openraft::alias::EntryPayloadOf<C>>,
        R: Default,
        D: Clone,
    >
{
}

/// Opens (or creates) both halves of the store in `data_dir`.
pub fn open<C: StoreTypes, A: StateMachine<C>>(
    data_dir: &Path,
) -> Result<(LogStore<C>, StateMachineStore<C, A>), StoreError> {
    std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Io {
        store: data_dir.to_path_buf(),
        op: "create",
        path: data_dir.to_path_buf(),
        source: e,
    })?;
    let log = LogStore::open(&data_dir.join("log"))?;
    let state = StateMachineStore::open(data_dir)?;
    Ok((log, state))
}

/// Creates a store in `data_dir` that starts from the application's
/// `records` at `meta`, with the log purged up to `meta`'s log id and
/// `vote` saved: what a replica holds after it installed a snapshot and
/// purged its log. A backup restored into a new cluster starts this way;
/// the replica then elects itself if `meta`'s membership makes it the only
/// voter. `data_dir` must hold no store yet.
pub fn seed<C: StoreTypes, A: StateMachine<C>>(
    data_dir: &Path,
    meta: &openraft::alias::SnapshotMetaOf<C>,
    vote: &openraft::alias::VoteOf<C>,
    records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
) -> Result<(), StoreError> {
    let refused = |reason: &str| StoreError::Refused {
        store: data_dir.to_path_buf(),
        reason: reason.to_string(),
    };
    let Some(last) = meta.last_log_id.clone() else {
        return Err(refused("a seed must say which log id its records are at"));
    };
    if data_dir.join("log").exists() {
        return Err(refused("it already holds a log; only a new data dir can be seeded"));
    }
    std::fs::create_dir_all(data_dir).map_err(|e| StoreError::io(data_dir, "create", data_dir, e))?;
    StateMachineStore::<C, A>::seed(data_dir, meta, records)?;
    let log = LogStore::<C>::open(&data_dir.join("log"))?;
    log.write_vote(vote)?;
    log.purge_upto(&last)
}
