//! The replica handle: what every service of a replica calls to write and
//! read the replicated state.
//!
//! Any replica accepts any call. A write is proposed here if this replica
//! leads, else forwarded to the leader; while there is no leader (an
//! election), a call waits for one up to a bound instead of failing, so a
//! client sees a slow answer, not an error, across a leader change.
//! Concurrent writes are batched: into one log entry on the leader
//! ([`run_proposer`]), into one call to the leader on a follower
//! ([`run_forwarder`]); reads waiting for a leadership confirmation share
//! one round ([`run_read_barrier`]).
//!
//! Below it: Raft (`raft`), the state machine (`state`), the cluster port's
//! TLS and the call counters. Must not import what is built on it:
//! membership, the servers and their handlers (`server`, `slap`, `native`,
//! `dashboard`, `metrics`, `cluster_service`, `certificates`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use openraft::rt::WatchReceiver;
use openraft::ServerState;
use slap_proto::cluster::cluster_client::ClusterClient;
use slap_proto::cluster::{Member, StatusReply};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Status;

use crate::api::{self, Answer, ClientWrite, Query};
use crate::cluster_tls::{ClusterTlsError, ReplicaTls};
use crate::counters::Counters;
use crate::identity::{Identity, JoinToken};
use crate::raft::{LoggedBatch, MasterTypes, Raft};
use crate::state::limits::approximate_size;
use crate::state::{Master, Proposal, ProposalBatch, Refusal, Reply};

/// How long a call waits for a leader before giving up.
pub const LEADER_WAIT: Duration = Duration::from_secs(15);

/// A replica and everything it shares between its services.
pub struct Replica {
    pub id: u64,
    pub cluster_id: String,
    /// Set once this replica is known to be a member (restarted, founded,
    /// or promoted after joining): from then on, missing from a leader's
    /// membership means removed (see `watch_metrics`).
    pub joined: std::sync::atomic::AtomicBool,
    pub data_dir: PathBuf,
    pub raft: Raft,
    pub state: Arc<RwLock<Master>>,
    pub(crate) log: raft_store::LogStore<MasterTypes>,
    /// This replica's certificate and the cluster's CA.
    pub tls: ReplicaTls,
    /// The SLAP port's certificate, once it serves HTTPS.
    pub slap_identity: std::sync::OnceLock<Arc<slap_proto::live::LiveIdentity>>,
    /// How this replica calls its peers' cluster API (with its certificate).
    peer_tls: Arc<rustls::ClientConfig>,
    /// Channels to peers' cluster API, with the generation of this
    /// replica's certificate they were opened with.
    peers: Mutex<HashMap<String, (u64, ClusterClient<Channel>)>>,
    /// Membership changes are made one at a time (see `membership`).
    pub(crate) membership: tokio::sync::Mutex<()>,
    /// Call counters and latencies of the SLAP and native APIs.
    pub metrics: Counters,
    /// Writes waiting to be gathered into the next log entry.
    proposer: tokio::sync::mpsc::Sender<Pending>,
    /// Writes waiting to be forwarded, together, to the leader.
    forwarder: tokio::sync::mpsc::Sender<Forward>,
    /// Reads waiting for the leader to confirm it still leads.
    read_barrier: tokio::sync::mpsc::Sender<oneshot::Sender<Result<(), String>>>,
    /// Nodes waiting for their computer's document to change.
    pub revisions: Arc<crate::revisions::Revisions>,
}

/// A write waiting for the forwarder: decoded by a caller on this replica
/// (SLAP, the native API), or still encoded as a cluster client sent it.
/// Encoded writes go to the leader as they came and get the leader's encoded
/// reply back: a follower decodes and re-encodes neither.
pub enum Forward {
    Decoded {
        write: ClientWrite,
        done: oneshot::Sender<Result<(Reply, u64), Status>>,
    },
    Encoded {
        write: Vec<u8>,
        done: oneshot::Sender<Result<(Vec<u8>, u64), Status>>,
    },
}

/// An encoded reply and its log index, or why there is none.
type EncodedOutcome = Result<(Vec<u8>, u64), Status>;

impl Forward {
    /// The write as the leader's `WriteBatch` takes it.
    fn encoded(&self) -> Vec<u8> {
        match self {
            Forward::Decoded { write, .. } => postcard::to_allocvec(write).expect("writes encode"),
            Forward::Encoded { write, .. } => write.clone(),
        }
    }

    /// About how many bytes it takes in a batch.
    fn size(&self) -> usize {
        match self {
            Forward::Decoded { write, .. } => approximate_size(&write.command),
            Forward::Encoded { write, .. } => write.len(),
        }
    }

    /// The write itself, to propose it here.
    fn decoded(&self) -> Result<ClientWrite, Status> {
        match self {
            Forward::Decoded { write, .. } => Ok(write.clone()),
            Forward::Encoded { write, .. } => decode_write(write),
        }
    }

    /// Hands the caller its outcome, decoded if the caller gave a decoded write.
    fn finish(self, outcome: EncodedOutcome) {
        match self {
            Forward::Decoded { done, .. } => {
                let _ = done.send(outcome.and_then(|(reply, index)| {
                    postcard::from_bytes(&reply)
                        .map(|r| (r, index))
                        .map_err(|e| Status::internal(format!("undecodable reply from the leader: {e}")))
                }));
            }
            Forward::Encoded { done, .. } => {
                let _ = done.send(outcome);
            }
        }
    }
}

/// A write as a cluster client encodes it.
pub fn decode_write(bytes: &[u8]) -> Result<ClientWrite, Status> {
    postcard::from_bytes(bytes).map_err(|e| Status::invalid_argument(format!("undecodable write: {e}")))
}

/// Sends writes to the leader in batches, at most [`BATCHES_IN_FLIGHT`] at a
/// time: a follower that forwarded each write in its own call spent more CPU
/// on gRPC than the leader spent applying them.
async fn run_forwarder(replica: std::sync::Weak<Replica>, queue: tokio::sync::mpsc::Receiver<Forward>) {
    let mut batches = Batches::new(queue);
    loop {
        let Some(budget) = replica.upgrade().map(|r| r.entry_budget()) else {
            return;
        };
        let Some((slot, batch)) = batches.next(budget, Forward::size).await else {
            return;
        };
        let Some(replica) = replica.upgrade() else { return };
        tokio::spawn(async move {
            let outcome = replica.forward_batch(&batch).await;
            drop(slot);
            match outcome {
                Ok(results) => {
                    for (result, f) in results.into_iter().zip(batch) {
                        f.finish(result);
                    }
                }
                Err(status) => {
                    for f in batch {
                        f.finish(Err(status.clone()));
                    }
                }
            }
        });
    }
}

/// What proposing a write gives: the reply and its log index, or why it
/// was not committed here.
pub type ProposeResult = Result<(Reply, u64), NotProposed>;

/// Why a proposal gave no reply.
#[derive(Debug)]
pub enum NotProposed {
    /// This replica was not (or no longer) the leader, so the write never
    /// entered its log: it comes back, to be sent to the new leader.
    NotLeader(Box<ClientWrite>),
    /// Raft failed (storage, shutdown): the caller gets this status.
    Failed(Status),
}

impl NotProposed {
    /// As a status for a caller that does not retry elsewhere.
    pub fn into_status(self) -> Status {
        match self {
            NotProposed::NotLeader(_) => Status::unavailable("leadership moved during the write; retry"),
            NotProposed::Failed(status) => status,
        }
    }
}

/// A write waiting for the proposer.
pub struct Pending {
    write: ClientWrite,
    done: oneshot::Sender<ProposeResult>,
}

/// Most proposals in one log entry.
const MAX_BATCH: usize = 512;
/// Log entries proposed and not yet applied, at most.
const BATCHES_IN_FLIGHT: usize = 2;

/// A queue drained in batches: what was taken from it but did not fit the
/// last batch's byte budget opens the next one.
struct Batches<T> {
    queue: tokio::sync::mpsc::Receiver<T>,
    slots: Arc<tokio::sync::Semaphore>,
    carried: Option<T>,
}

impl<T> Batches<T> {
    fn new(queue: tokio::sync::mpsc::Receiver<T>) -> Self {
        Batches {
            queue,
            slots: Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT)),
            carried: None,
        }
    }

    /// Waits for the next item and a free slot (at most
    /// [`BATCHES_IN_FLIGHT`] batches at once), then takes every item that
    /// queued meanwhile, up to [`MAX_BATCH`] items and `budget` bytes as
    /// `size` counts them (the first item goes in whatever its size). One
    /// batch and its slot; `None` once the queue is closed.
    async fn next(
        &mut self,
        budget: usize,
        size: impl Fn(&T) -> usize,
    ) -> Option<(tokio::sync::OwnedSemaphorePermit, Vec<T>)> {
        let first = match self.carried.take() {
            Some(item) => item,
            None => self.queue.recv().await?,
        };
        let slot = self.slots.clone().acquire_owned().await.ok()?;
        let mut bytes = size(&first);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            let Ok(item) = self.queue.try_recv() else { break };
            bytes += size(&item);
            if bytes > budget {
                self.carried = Some(item);
                break;
            }
            batch.push(item);
        }
        Some((slot, batch))
    }
}

/// Gathers concurrent writes into log entries (leader-side batching).
///
/// Every write that arrived while the previous entries were being proposed
/// goes into one entry: a lone client's write is proposed at once, and under
/// load one entry (one log record, one item to replicate, one apply call, one
/// answer from the state machine) carries many writes. openraft then groups
/// the entries proposed together into one append, which raft-store covers
/// with one fsync (group commit), and pipelines them to the followers.
async fn run_proposer(raft: Raft, state: Arc<RwLock<Master>>, queue: tokio::sync::mpsc::Receiver<Pending>) {
    let mut batches = Batches::new(queue);
    loop {
        let budget = entry_budget(&state);
        let Some((slot, batch)) = batches
            .next(budget, |p: &Pending| approximate_size(&p.write.command))
            .await
        else {
            return;
        };
        let raft = raft.clone();
        tokio::spawn(async move {
            let time_us = now_us();
            let (proposals, waiters): (Vec<Proposal>, Vec<oneshot::Sender<ProposeResult>>) = batch
                .into_iter()
                .map(|p| {
                    let proposal = Proposal {
                        request_id: p.write.request_id,
                        time_us,
                        command: p.write.command,
                    };
                    (proposal, p.done)
                })
                .unzip();
            let batch = ProposalBatch(proposals);
            let result = raft.client_write(LoggedBatch::encode(&batch)).await;
            drop(slot);
            match result {
                Ok(r) => {
                    let index = r.log_id.index;
                    for (reply, waiter) in r.data.into_iter().zip(waiters) {
                        let _ = waiter.send(Ok((reply, index)));
                    }
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                    // Never appended here: each write goes back to its caller.
                    for (p, waiter) in batch.0.into_iter().zip(waiters) {
                        let write = ClientWrite {
                            request_id: p.request_id,
                            command: p.command,
                        };
                        let _ = waiter.send(Err(NotProposed::NotLeader(Box::new(write))));
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for waiter in waiters {
                        let _ = waiter.send(Err(NotProposed::Failed(write_error(&message))));
                    }
                }
            }
        });
    }
}

/// Confirms leadership for the reads waiting, together.
///
/// A linearizable read on the leader needs a quorum to confirm, after the
/// read arrived, that this replica still leads (openraft's
/// `ensure_linearizable`: one heartbeat round, no disk write). Every read
/// waiting when a round starts arrived before it, so one round serves them
/// all, as one log entry serves many writes.
async fn run_read_barrier(raft: Raft, queue: tokio::sync::mpsc::Receiver<oneshot::Sender<Result<(), String>>>) {
    let mut batches = Batches::new(queue);
    while let Some((slot, waiters)) = batches.next(usize::MAX, |_| 0).await {
        let raft = raft.clone();
        tokio::spawn(async move {
            let outcome = raft
                .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string());
            drop(slot);
            for waiter in waiters {
                let _ = waiter.send(outcome.clone());
            }
        });
    }
}

/// Bytes one log entry (or one forwarded batch) may take, as the cluster's
/// limits say.
fn entry_budget(state: &RwLock<Master>) -> usize {
    state.read().unwrap_or_else(|e| e.into_inner()).limits.entry_bytes as usize
}

/// `status` warns of certificates that end within this many days.
pub const EXPIRY_WARNING_DAYS: u64 = 30;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn shutting_down() -> Status {
    Status::unavailable("this replica is shutting down")
}

fn write_error<E: std::fmt::Display>(e: E) -> Status {
    Status::unavailable(format!("write not committed: {e}"))
}

impl Replica {
    /// The handle of a replica whose Raft runs: starts the tasks that batch
    /// writes on the leader, forward them from a follower, and confirm
    /// leadership for reads. `member` is false for a joiner not yet
    /// promoted (it is not missed by the cluster until it is).
    pub fn start(
        identity: &Identity,
        data_dir: &Path,
        raft: Raft,
        log: raft_store::LogStore<MasterTypes>,
        state: Arc<RwLock<Master>>,
        tls: ReplicaTls,
        member: bool,
    ) -> Result<Arc<Replica>, ClusterTlsError> {
        let peer_tls = tls.client_config(slap_proto::tls::Expect::AnyReplica)?;
        let (proposer, queue) = tokio::sync::mpsc::channel(4096);
        tokio::spawn(run_proposer(raft.clone(), state.clone(), queue));
        let (forwarder, forward_queue) = tokio::sync::mpsc::channel(4096);
        let (read_barrier, read_queue) = tokio::sync::mpsc::channel(4096);
        tokio::spawn(run_read_barrier(raft.clone(), read_queue));
        let revisions = crate::revisions::Revisions::start(&raft, state.clone());
        let replica = Arc::new(Replica {
            id: identity.node_id,
            cluster_id: identity.cluster_id.clone(),
            joined: std::sync::atomic::AtomicBool::new(member),
            data_dir: data_dir.to_path_buf(),
            raft,
            state,
            log,
            tls,
            slap_identity: std::sync::OnceLock::new(),
            peer_tls,
            peers: Mutex::new(HashMap::new()),
            membership: tokio::sync::Mutex::new(()),
            metrics: Counters::default(),
            proposer,
            forwarder,
            read_barrier,
            revisions,
        });
        tokio::spawn(run_forwarder(Arc::downgrade(&replica), forward_queue));
        Ok(replica)
    }

    /// Whether a write stays within the cluster's limits and its version;
    /// else its refusal (not in the log: index 0).
    fn within_limits(&self, write: &ClientWrite) -> Result<(), (Reply, u64)> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .limits
            .check(&write.command)
            .map_err(|reason| (Reply::Refused(Refusal::TooLarge(reason)), 0))?;
        // A kind of command some member's release could not apply stays out
        // of the log until the cluster's version says every member speaks it.
        let (needs, cluster) = (write.command.since(), state.effective_version());
        if needs > cluster {
            return Err((
                Reply::Refused(Refusal::NotYet(format!(
                    "a {} needs cluster version {needs}, and the cluster is at version {cluster}: \
                     a replica runs an older release. Upgrade every replica; the version rises by itself \
                     once every one speaks it (`master-node status` shows it)",
                    write.command.kind()
                ))),
                0,
            ));
        }
        Ok(())
    }

    /// Bytes one forwarded batch may take.
    fn entry_budget(&self) -> usize {
        entry_budget(&self.state)
    }

    /// Says this replica is now a member (a joiner, once promoted).
    pub fn mark_joined(&self) {
        self.joined.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits until the cluster's CA exists (the leader creates it shortly
    /// after the cluster); false after `limit`.
    pub async fn wait_for_authority(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.state.read().unwrap_or_else(|e| e.into_inner()).authority.is_none() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    fn peer(&self, addr: &str) -> Result<ClusterClient<Channel>, Status> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        // Dialed again after a renewal of this replica's certificate.
        let generation = self.tls.identity.generation();
        if let Some((opened, c)) = peers.get(addr) {
            if *opened == generation {
                return Ok(c.clone());
            }
        }
        let ch = slap_proto::tls::channel(addr, self.peer_tls.clone())
            .map_err(|e| Status::unavailable(format!("cannot reach {addr}: {e}")))?;
        let client = ClusterClient::new(ch).max_decoding_message_size(64 << 20);
        peers.insert(addr.to_string(), (generation, client.clone()));
        Ok(client)
    }

    /// The leader right now: `Ok(None)` if it is this replica, `Ok(Some(addr))`
    /// for another one, after waiting (up to [`LEADER_WAIT`]) while there is none.
    pub async fn leader(&self) -> Result<Option<String>, Status> {
        let deadline = Instant::now() + LEADER_WAIT;
        let mut rx = self.raft.metrics();
        loop {
            {
                let m = rx.borrow_and_update();
                if let Some(leader) = m.current_leader {
                    if leader == self.id && m.state == ServerState::Leader {
                        return Ok(None);
                    }
                    if leader != self.id {
                        if let Some(node) = m.membership_config.membership().get_node(&leader) {
                            return Ok(Some(node.addr.clone()));
                        }
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
                return Err(Status::unavailable(format!(
                    "no leader elected within {} s (is a majority of the replicas up and connected?)",
                    LEADER_WAIT.as_secs()
                )));
            }
        }
    }

    /// A peer's `status`, asked without this replica's certificate (a
    /// removed replica's is revoked, and status needs none), answered
    /// within a second or an error that says why not.
    pub async fn peer_status(&self, addr: &str) -> Result<slap_proto::cluster::StatusReply, String> {
        let config = self.tls.anonymous_client_config().map_err(|e| e.to_string())?;
        let credentials = crate::client::Credentials::from_config(config);
        match tokio::time::timeout(
            Duration::from_secs(1),
            crate::client::Client::status_of(addr, &credentials),
        )
        .await
        {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 1 s".into()),
        }
    }

    /// The peer client of the current leader, or `None` if this is the leader.
    pub async fn leader_client(&self) -> Result<Option<ClusterClient<Channel>>, Status> {
        match self.leader().await? {
            None => Ok(None),
            Some(addr) => self.peer(&addr).map(Some),
        }
    }

    /// Proposes a write on this replica, which must be the leader. Returns
    /// the reply and its log index, or the write itself when leadership was
    /// lost before it entered the log (safe to send to the new leader).
    pub async fn propose(&self, write: ClientWrite) -> ProposeResult {
        if let Err(refused) = self.within_limits(&write) {
            return Ok(refused);
        }
        let (done, answer) = oneshot::channel();
        let closing = || NotProposed::Failed(Status::unavailable("this replica is shutting down"));
        self.proposer
            .send(Pending { write, done })
            .await
            .map_err(|_| closing())?;
        answer.await.unwrap_or_else(|_| Err(closing()))
    }

    /// A write from any replica: proposed here if leader, else forwarded
    /// (gathered with other writes) to the leader.
    pub async fn write(&self, mut write: ClientWrite) -> Result<(Reply, u64), Status> {
        // An over-limit write is answered here, before it is proposed or
        // forwarded: it never reaches the log.
        if let Err(refused) = self.within_limits(&write) {
            return Ok(refused);
        }
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            if self.leader().await?.is_none() {
                match self.propose(write).await {
                    Ok(done) => return Ok(done),
                    Err(NotProposed::Failed(status)) => return Err(status),
                    Err(NotProposed::NotLeader(back)) => write = *back,
                }
            } else {
                return self.forward(|done| Forward::Decoded { write, done }).await;
            }
            if Instant::now() > deadline {
                return Err(Status::unavailable("leadership kept moving; write not proposed"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A write as a cluster client encodes it, answered encoded: a follower
    /// forwards the bytes to the leader and passes its reply back as it came.
    pub async fn write_encoded(&self, write: Vec<u8>) -> EncodedOutcome {
        if self.leader().await?.is_some() {
            return self.forward(|done| Forward::Encoded { write, done }).await;
        }
        let (reply, index) = self.write(decode_write(&write)?).await?;
        Ok((postcard::to_allocvec(&reply).expect("replies encode"), index))
    }

    /// Queues a write for the forwarder and waits for its outcome.
    async fn forward<T>(
        &self,
        forward: impl FnOnce(oneshot::Sender<Result<T, Status>>) -> Forward,
    ) -> Result<T, Status> {
        let (done, answer) = oneshot::channel();
        self.forwarder.send(forward(done)).await.map_err(|_| shutting_down())?;
        answer.await.unwrap_or_else(|_| Err(shutting_down()))
    }

    /// Sends a batch of writes to the leader (or proposes them here if this
    /// replica has become the leader meanwhile); one result per write.
    async fn forward_batch(&self, writes: &[Forward]) -> Result<Vec<EncodedOutcome>, Status> {
        let Some(mut leader) = self.leader_client().await? else {
            // Rare (leadership moved here meanwhile): copies are fine.
            let local = writes.iter().map(|w| async move {
                let (reply, index) = self.propose(w.decoded()?).await.map_err(NotProposed::into_status)?;
                Ok((postcard::to_allocvec(&reply).expect("replies encode"), index))
            });
            return Ok(futures::future::join_all(local).await);
        };
        let proposals = writes.iter().map(Forward::encoded).collect();
        let reply = leader
            .write_batch(slap_proto::cluster::WriteBatchRequest { proposals })
            .await?
            .into_inner();
        if reply.outcomes.len() != writes.len() {
            return Err(Status::internal(
                "the leader answered a batch with the wrong number of outcomes",
            ));
        }
        Ok(reply
            .outcomes
            .into_iter()
            .map(|o| {
                if o.code != 0 {
                    return Err(Status::new(tonic::Code::from(o.code), o.error));
                }
                Ok((o.reply, o.log_index))
            })
            .collect())
    }

    /// A linearizable read: the leader confirms it still leads (a quorum
    /// answers), waits until it has applied everything committed, then reads.
    pub async fn read(&self, query: &Query) -> Result<Answer, Status> {
        match self.leader_client().await? {
            None => {
                self.raft
                    .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
                    .await
                    .map_err(|e| Status::unavailable(format!("cannot confirm leadership for a read: {e}")))?;
                let state = self.state.read().unwrap_or_else(|e| e.into_inner());
                Ok(api::answer(&state, query))
            }
            Some(mut leader) => {
                let bytes = postcard::to_allocvec(query).expect("queries encode");
                let reply = leader
                    .read(slap_proto::cluster::ReadRequest {
                        query: bytes,
                        local: false,
                        token: String::new(),
                    })
                    .await?
                    .into_inner();
                postcard::from_bytes(&reply.answer).map_err(|e| Status::internal(format!("undecodable answer: {e}")))
            }
        }
    }

    /// Whether this replica leads, as far as it knows (not confirmed).
    pub fn believes_it_leads(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.current_leader == Some(self.id) && m.state == ServerState::Leader
    }

    /// Confirms with a quorum that this replica still leads and waits until
    /// it applied everything committed before the call: after `Ok`, the
    /// local state holds every write acknowledged before the call. Rounds
    /// are shared with the reads waiting at the same time.
    pub async fn confirm_leadership(&self) -> Result<(), String> {
        if !self.believes_it_leads() {
            return Err("this replica is not the leader".into());
        }
        let (done, confirmed) = oneshot::channel();
        self.read_barrier
            .send(done)
            .await
            .map_err(|_| "this replica is shutting down".to_string())?;
        confirmed
            .await
            .map_err(|_| "this replica is shutting down".to_string())?
    }

    /// The backup file of the whole state at a point that holds every write
    /// acknowledged before the call (`crate::backup`): taken here when this
    /// replica leads and confirms it, relayed from the leader otherwise.
    /// `token`: the operator's, passed on to the leader.
    pub async fn backup(&self, token: &str) -> Result<Vec<u8>, Status> {
        match self.leader_client().await? {
            None => {
                self.confirm_leadership()
                    .await
                    .map_err(|e| Status::unavailable(format!("cannot confirm leadership for a backup: {e}")))?;
                let state = self.state.read().unwrap_or_else(|e| e.into_inner());
                Ok(crate::backup::write(&state, &self.cluster_id, now_us() / 1_000_000))
            }
            Some(mut leader) => {
                let mut chunks = leader
                    .backup(slap_proto::cluster::BackupRequest {
                        token: token.to_string(),
                    })
                    .await?
                    .into_inner();
                let mut file = Vec::new();
                while let Some(chunk) = chunks.message().await? {
                    file.extend_from_slice(&chunk.data);
                }
                Ok(file)
            }
        }
    }

    /// Answers a write that would change nothing (an identical re-request,
    /// which `slapos node` sends for every child at every run, or a
    /// partition publishing what it already published) with a linearizable
    /// read instead of a log entry. `unchanged` says whether the write would
    /// change nothing in the state; it is asked again once leadership is
    /// confirmed, and `answer` then reads the answer under the same lock.
    /// `None` when the write must be made: it changes something, it is
    /// refused, or this replica is not the leader (a follower's state may lag
    /// the leader's, so it writes, and the leader answers).
    pub async fn read_if_unchanged<T>(
        &self,
        unchanged: impl Fn(&Master) -> bool,
        answer: impl FnOnce(&Master) -> T,
    ) -> Option<T> {
        // The local check first, so a write that changes something costs no
        // confirmation round before it is proposed.
        if !self.believes_it_leads() || !unchanged(&self.state.read().unwrap_or_else(|e| e.into_inner())) {
            return None;
        }
        // Not confirmed (leadership lost meanwhile): the write path waits for
        // the new leader and answers.
        self.confirm_leadership().await.ok()?;
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        unchanged(&state).then(|| answer(&state))
    }

    /// A read of this replica's own state, whatever the leader knows.
    pub fn read_local(&self, query: &Query) -> Answer {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        api::answer(&state, query)
    }

    /// Checks a join token against the cluster's.
    pub fn check_token(&self, token: &str) -> Result<(), Status> {
        let token = JoinToken::parse(token).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let Some(cluster) = &state.cluster else {
            return Err(Status::unavailable(
                "this replica has not applied the cluster's creation yet; try again",
            ));
        };
        if token.cluster_id != cluster.id {
            return Err(Status::permission_denied(format!(
                "the token is for cluster {}, this is cluster {}",
                token.cluster_id, cluster.id
            )));
        }
        if token.secret_sha256() != cluster.token_sha256 {
            return Err(Status::permission_denied(format!(
                "the join token is not valid for cluster {}",
                cluster.id
            )));
        }
        Ok(())
    }

    /// Members with their addresses and roles.
    pub fn members(&self) -> Vec<Member> {
        let m = self.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let replication: BTreeMap<u64, Option<u64>> = m
            .replication
            .as_ref()
            .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
            .unwrap_or_default();
        let last = m.last_log_index.unwrap_or(0);
        membership
            .nodes()
            .map(|(id, node)| {
                let matched = if m.state == ServerState::Leader {
                    replication.get(id).copied().flatten()
                } else {
                    None
                };
                Member {
                    id: *id,
                    addr: node.addr.clone(),
                    role: if voters.contains(id) { "voter" } else { "learner" }.into(),
                    matched,
                    lag: matched.map(|x| last.saturating_sub(x)).or(
                        if *id == self.id && m.state == ServerState::Leader {
                            Some(0)
                        } else {
                            None
                        },
                    ),
                }
            })
            .collect()
    }

    /// This replica's own view of the cluster.
    pub fn local_status(&self) -> StatusReply {
        let m = self.raft.metrics().borrow_watched().clone();
        let leader_addr = m
            .current_leader
            .and_then(|l| m.membership_config.membership().get_node(&l).map(|n| n.addr.clone()))
            .unwrap_or_default();
        let committed = self
            .log_committed()
            .unwrap_or_else(|| m.last_applied.map(|l| l.index).unwrap_or(0));
        StatusReply {
            cluster_id: self.cluster_id.clone(),
            node_id: self.id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            leader_id: m.current_leader,
            leader_addr,
            last_log_index: m.last_log_index.unwrap_or(0),
            committed,
            applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            members: self.members(),
            leader_view: m.state == ServerState::Leader,
            expiring: Vec::new(),
            speaks_version: crate::raft::spoken_version(),
            cluster_version: self.state.read().unwrap_or_else(|e| e.into_inner()).effective_version(),
            ca_rotation: self.state.read().unwrap_or_else(|e| e.into_inner()).rotation.is_some(),
        }
    }

    /// Holders still on the CA being rotated out: live certificates (not
    /// revoked, not expired) it issued whose holder has no live certificate
    /// from the new CA (a renewed one is superseded, not a straggler).
    /// Role and serial. Reads every certificate's issuer: for `ca finish`,
    /// not a hot path.
    pub fn certificates_from_previous_ca(&self) -> Result<Vec<(crate::state::Role, String)>, Status> {
        use rustls::pki_types::pem::PemObject;
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let Some(rotation) = &state.rotation else {
            return Err(Status::failed_precondition(
                "no CA rotation is under way (`master-node ca rotate` starts one)",
            ));
        };
        let previous = rustls::pki_types::CertificateDer::from_pem_slice(rotation.previous_pem.as_bytes())
            .map_err(|e| Status::internal(format!("the previous CA: {e}")))?;
        let now = crate::pki::now_secs();
        let (old, new): (Vec<_>, Vec<_>) = state
            .certificates
            .values()
            .filter(|c| !c.revoked && c.not_after > now)
            .partition(|c| {
                rustls::pki_types::CertificateDer::from_pem_slice(c.cert_pem.to_text().as_bytes())
                    .is_ok_and(|der| slap_proto::live::Validity::issued_by(&der, &previous))
            });
        let moved: std::collections::HashSet<&crate::state::Role> = new.iter().map(|c| &c.role).collect();
        Ok(old
            .into_iter()
            .filter(|c| !moved.contains(&c.role))
            .map(|c| (c.role.clone(), c.serial.clone()))
            .collect())
    }

    /// Live certificates that end within [`EXPIRY_WARNING_DAYS`], by kind
    /// of holder, for `status` (a scan of every certificate: not for the
    /// health and metrics endpoints that also read [`local_status`]).
    pub fn expiring_certificates(&self) -> Vec<slap_proto::cluster::ExpiringCertificates> {
        let soon = now_us() / 1_000_000 + EXPIRY_WARNING_DAYS * 86_400;
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .certificates_expiring(soon)
            .into_iter()
            .map(|(kind, (count, earliest))| slap_proto::cluster::ExpiringCertificates {
                kind: kind.to_string(),
                count,
                earliest_not_after: earliest,
            })
            .collect()
    }

    fn log_committed(&self) -> Option<u64> {
        self.log.committed().ok().flatten().map(|c| c.index)
    }
}
