//! Raft for the Master: openraft's types for our state machine, the glue
//! between [`Master`] and raft-store, the timeouts, and the gRPC transport
//! between replicas ([`network`] is the client side, [`service`] the server).
//!
//! Must not import the replica handle or anything above it: the transport is
//! given the replica's TLS, nothing more.

pub mod network;
pub mod service;

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use openraft::alias::LogIdOf;
use raft_store::{ApplyError, LogStore, RestoreError, StateMachineStore, StoreError, Writes};
use serde::{Deserialize, Serialize};

use crate::state::{persist, Master, ProposalBatch, Reply};

openraft::declare_raft_types!(
    /// openraft types of the Master.
    pub MasterTypes:
        D = LoggedBatch,
        R = Vec<Reply>,
        NodeId = u64,
        Node = ReplicaNode,
);

/// What a log entry carries: a [`ProposalBatch`] as the leader encoded it.
///
/// An entry is written to the log, sent to every follower, written to their
/// logs and read back to be applied; kept as bytes, each of those steps is a
/// copy of bytes instead of a walk over every proposal's strings and maps
/// (which is what made encoding and decoding the largest cost of a write).
/// Each replica decodes an entry once, to apply it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct LoggedBatch(bytes::Bytes);

impl LoggedBatch {
    /// Encodes a batch for the log.
    pub fn encode(batch: &ProposalBatch) -> Self {
        LoggedBatch(postcard::to_allocvec(batch).expect("proposals encode").into())
    }

    /// The proposals, or why these bytes are not a batch.
    pub fn decode(&self) -> Result<ProposalBatch, postcard::Error> {
        postcard::from_bytes(&self.0)
    }
}

impl std::fmt::Debug for LoggedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LoggedBatch({} bytes)", self.0.len())
    }
}

/// How openraft names an entry's data in its logs.
impl std::fmt::Display for LoggedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a batch of writes ({} bytes)", self.0.len())
    }
}

impl Serialize for LoggedBatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for LoggedBatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = LoggedBatch;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an encoded batch of proposals")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<LoggedBatch, E> {
                Ok(LoggedBatch(bytes::Bytes::copy_from_slice(v)))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<LoggedBatch, E> {
                Ok(LoggedBatch(v.into()))
            }
        }
        d.deserialize_bytes(Visitor)
    }
}

/// Room reserved for a record being encoded: most (an instance with its
/// parameters, a session) fit, so encoding rarely grows the buffer.
const RECORD_HINT: usize = 1024;

/// What the cluster knows of a replica: where it serves Raft and the
/// cluster API (one gRPC address).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplicaNode {
    pub addr: String,
}

/// The state-machine storage of a replica.
pub type StateStore = StateMachineStore<MasterTypes, Master>;
/// The Raft handle of a replica.
pub type Raft = openraft::Raft<MasterTypes, StateStore>;
/// A log id of the Master's log.
pub type LogId = LogIdOf<MasterTypes>;

/// The newest command-set version this process speaks: the build's
/// ([`crate::state::VERSION`]), or lower when told to act as an older
/// release (`--act-as-version`, for upgrade tests).
static SPOKEN: AtomicU32 = AtomicU32::new(crate::state::VERSION);

/// The newest command-set version this process speaks.
pub fn spoken_version() -> u32 {
    SPOKEN.load(Ordering::Relaxed)
}

/// Makes this process act as a release that speaks versions up to `v`
/// only: it advertises `v`, and stops on a command it would not know, as
/// such a release would. Set before the replica starts.
pub fn speak_at_most(v: u32) {
    SPOKEN.store(v.clamp(1, crate::state::VERSION), Ordering::Relaxed);
}

impl raft_store::StateMachine<MasterTypes> for Master {
    fn apply(&mut self, log_id: &LogId, batch: LoggedBatch) -> Result<Vec<Reply>, ApplyError> {
        let batch = batch.decode().map_err(|e| ApplyError {
            reason: format!("its proposals do not decode ({e})"),
        })?;
        let spoken = spoken_version();
        if let Some(p) = batch.0.iter().find(|p| p.command.needs() > spoken) {
            return Err(ApplyError {
                reason: format!(
                    "it holds a {} of version {}, and this replica speaks only up to version {spoken}",
                    p.command.kind(),
                    p.command.needs()
                ),
            });
        }
        Ok(batch
            .0
            .into_iter()
            .map(|p| Master::apply(self, log_id.index, p))
            .collect())
    }

    fn changed_records(&mut self, writes: &mut Writes) {
        for dirty in self.take_dirty() {
            match persist::value_into(self, &dirty, writes.buffer(RECORD_HINT)) {
                Some(v) => writes.put_buffer(persist::key(&dirty), v),
                None => writes.delete(persist::key(&dirty)),
            }
        }
    }

    fn restore(records: &mut dyn Iterator<Item = (Vec<u8>, Vec<u8>)>) -> Result<Self, RestoreError> {
        persist::restore(records).map_err(|(key, reason)| RestoreError { key, reason })
    }
}

/// Raft timing.
///
/// openraft gives a leader a lease as long as the largest election
/// timeout: a follower calls an election only after `election-max-ms` plus
/// its own random timeout in [`election-min-ms`, `election-max-ms`) without
/// hearing from the leader. The defaults (heartbeat 100 ms, 250 to 400 ms)
/// declare a leader dead after 650 to 800 ms of silence, more than six missed
/// heartbeats, which rides out a loaded 2-core machine with fsync and keeps
/// failover under a second.
#[derive(Debug, Clone, clap::Args)]
pub struct Timing {
    /// Leader heartbeat interval, in milliseconds.
    #[arg(long, env = "MASTER_HEARTBEAT_MS", default_value_t = 100)]
    pub heartbeat_ms: u64,
    /// Smallest election timeout, in milliseconds (a leader is declared dead
    /// after max + a random value in [min, max) without a heartbeat).
    #[arg(long, env = "MASTER_ELECTION_MIN_MS", default_value_t = 250)]
    pub election_min_ms: u64,
    /// Largest election timeout, in milliseconds; also the leader's lease.
    #[arg(long, env = "MASTER_ELECTION_MAX_MS", default_value_t = 400)]
    pub election_max_ms: u64,
    /// Take a snapshot (and allow purging the log) every this many entries.
    #[arg(long, default_value_t = 20_000)]
    pub snapshot_every: u64,
    /// Also take one once the log has grown by this many MiB since the
    /// last: entries carry whole batches of writes, so a bulk load can
    /// write gigabytes in fewer entries than --snapshot-every, and a
    /// joining replica would replay all of it instead of installing a
    /// snapshot. 0 turns it off.
    #[arg(long, default_value_t = 512)]
    pub snapshot_every_mib: u64,
    /// Log entries kept behind a snapshot, so a briefly absent follower can
    /// catch up from the log instead of a whole snapshot.
    #[arg(long, default_value_t = 1_000)]
    pub keep_log_after_snapshot: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_min_ms: 250,
            election_max_ms: 400,
            snapshot_every: 20_000,
            snapshot_every_mib: 512,
            keep_log_after_snapshot: 1_000,
        }
    }
}

impl Timing {
    /// openraft's configuration for these timings, validated.
    pub fn raft_config(&self, cluster_id: &str) -> Result<Arc<openraft::Config>, String> {
        if self.heartbeat_ms == 0 || self.election_min_ms <= self.heartbeat_ms * 2 {
            return Err(format!(
                "the election timeout ({} ms) must be more than twice the heartbeat ({} ms)",
                self.election_min_ms, self.heartbeat_ms
            ));
        }
        if self.election_max_ms <= self.election_min_ms {
            return Err("--election-max-ms must be larger than --election-min-ms".into());
        }
        let config = openraft::Config {
            cluster_name: cluster_id.to_string(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            // How long one snapshot chunk may take to be taken by a
            // follower (the whole transfer has no bound: it goes on while
            // chunks keep moving). openraft's 200 ms is too short on a busy
            // disk.
            install_snapshot_timeout: 10_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_log_after_snapshot,
            // Entries carry whole batches of writes (up to 512 each, about
            // 180 KB at 512 clients), and openraft gives one AppendEntries
            // a heartbeat to answer: 512 entries per call meant ~90 MB
            // that a follower catching up after heavy load could never
            // take in time, so it kept timing out and elections waited
            // for it (failovers of up to 15 s in write_bench). 32 entries
            // keep one call to a few MB.
            max_payload_entries: 32,
            // How close a learner must be before a join makes it a voter.
            // openraft's default (5000 entries) let a learner with an
            // empty log count as caught up and be promoted at once: a
            // voter that holds nothing weakens the quorum it joins.
            replication_lag_threshold: 64,
            snapshot_max_chunk_size: 1 << 20,
            // A replica cut off for a while asks whether it could win before
            // it raises its term, so coming back does not depose a healthy
            // leader (a cut link used to cost an election on return).
            enable_pre_vote: Some(true),
            ..Default::default()
        };
        config.validate().map(Arc::new).map_err(|e| e.to_string())
    }
}

/// Takes a snapshot whenever the log has grown by `every_bytes` since the
/// last one (openraft counts only entries). Runs until the Raft stops.
pub async fn snapshot_by_size(raft: Raft, stats: Arc<raft_store::LogStats>, every_bytes: u64) {
    use openraft::rt::WatchReceiver;
    use std::sync::atomic::Ordering::Relaxed;
    if every_bytes == 0 {
        return;
    }
    let metrics = raft.metrics();
    let mut last_snapshot = metrics.borrow_watched().snapshot;
    // Log bytes appended when the last snapshot was seen (or asked for).
    let mut mark = stats.bytes.load(Relaxed);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let (snapshot, stopped) = {
            let m = metrics.borrow_watched();
            (m.snapshot, m.running_state.is_err())
        };
        if stopped {
            return;
        }
        let now = stats.bytes.load(Relaxed);
        if snapshot != last_snapshot {
            last_snapshot = snapshot;
            mark = now;
        } else if now.saturating_sub(mark) >= every_bytes {
            tracing::info!(
                grown_mib = (now - mark) >> 20,
                "the log grew past --snapshot-every-mib: taking a snapshot"
            );
            mark = now;
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    }
}

/// Opens a replica's storage in `data_dir`.
pub fn open_store(data_dir: &Path) -> Result<(LogStore<MasterTypes>, StateStore), StoreError> {
    raft_store::open(data_dir)
}
