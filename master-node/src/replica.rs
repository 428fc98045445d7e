//! A running replica: its Raft, its state, its gRPC server, and the cluster
//! operations that need the leader (join, promote, leave, writes, reads).
//!
//! Any replica accepts any call. What needs the leader is forwarded to it;
//! while there is no leader (an election), a call waits for one up to a bound
//! instead of failing, so a client sees a slow answer, not an error, across a
//! leader change.

use openraft::rt::WatchReceiver;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use slap_proto::cluster::cluster_client::ClusterClient;
use slap_proto::cluster::{Member, StatusReply};
use tokio::sync::{oneshot, watch};
use tonic::transport::Channel;
use tonic::Status;
use tracing::{error, info, warn};

use crate::api::{self, Answer, ClientWrite, Query};
use crate::cluster_tls::{ClusterTlsError, ReplicaTls};
use crate::identity::{Identity, JoinToken};
use crate::raft::network::Network;
use crate::raft::{open_store, LoggedBatch, MasterTypes, Raft, ReplicaNode, Timing};
use crate::state::{Command, Master, Proposal, ProposalBatch, Reply, Role};

/// How long a call waits for a leader before giving up.
pub const LEADER_WAIT: Duration = Duration::from_secs(15);

/// Why a replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] raft_store::StoreError),
    #[error("invalid Raft timing: {0}")]
    Timing(String),
    #[error("cannot listen on {addr}: {source} (is another replica or program using it?)")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0} has a replica identity but no Raft log: the data was wiped or lost. \
         A replica must never come back with an empty log (it could undo committed writes). \
         Replace it: `master-node leave --id N --peer ANY --token T`, then join again with an empty data dir"
    )]
    WipedLog(PathBuf),
    #[error("openraft refused to start: {0}")]
    Raft(String),
    #[error(transparent)]
    Tls(#[from] ClusterTlsError),
}

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
    log: raft_store::LogStore<MasterTypes>,
    /// This replica's certificate and the cluster's CA.
    pub tls: ReplicaTls,
    /// How this replica calls its peers' cluster API (with its certificate).
    peer_tls: Arc<rustls::ClientConfig>,
    peers: Mutex<HashMap<String, ClusterClient<Channel>>>,
    /// Membership changes are made one at a time.
    membership: tokio::sync::Mutex<()>,
    /// Call counters and latencies of the SLAP and native APIs.
    pub metrics: crate::metrics::Metrics,
    /// Writes waiting to be gathered into the next log entry.
    proposer: tokio::sync::mpsc::Sender<Pending>,
    /// Writes waiting to be forwarded, together, to the leader.
    forwarder: tokio::sync::mpsc::Sender<Forward>,
    /// Reads waiting for the leader to confirm it still leads.
    read_barrier: tokio::sync::mpsc::Sender<oneshot::Sender<Result<(), String>>>,
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
async fn run_forwarder(replica: std::sync::Weak<Replica>, mut queue: tokio::sync::mpsc::Receiver<Forward>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some((slot, batch)) = next_batch(&mut queue, &slots).await {
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

/// Waits for the next queued item and a free slot, then takes every item
/// that queued meanwhile (up to [`MAX_BATCH`]): one batch and its slot.
/// `None` once the queue is closed.
async fn next_batch<T>(
    queue: &mut tokio::sync::mpsc::Receiver<T>,
    slots: &Arc<tokio::sync::Semaphore>,
) -> Option<(tokio::sync::OwnedSemaphorePermit, Vec<T>)> {
    let first = queue.recv().await?;
    let slot = slots.clone().acquire_owned().await.ok()?;
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match queue.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some((slot, batch))
}

/// Gathers concurrent writes into log entries (leader-side batching).
///
/// Every write that arrived while the previous entries were being proposed
/// goes into one entry: a lone client's write is proposed at once, and under
/// load one entry (one log record, one item to replicate, one apply call, one
/// answer from the state machine) carries many writes. openraft then groups
/// the entries proposed together into one append, which raft-store covers
/// with one fsync (group commit), and pipelines them to the followers.
async fn run_proposer(raft: Raft, mut queue: tokio::sync::mpsc::Receiver<Pending>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some((slot, batch)) = next_batch(&mut queue, &slots).await {
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
async fn run_read_barrier(raft: Raft, mut queue: tokio::sync::mpsc::Receiver<oneshot::Sender<Result<(), String>>>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some((slot, waiters)) = next_batch(&mut queue, &slots).await {
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

/// Why a replica stopped by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// The cluster removed it: a normal end.
    Removed(String),
    /// Raft stopped on an error (storage, a bad entry): a failure.
    Failed(String),
}

/// A started replica: its shared core and a way to stop it.
pub struct Running {
    pub replica: Arc<Replica>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// Fires with a reason when the replica stops by itself (fatal error,
    /// removed from the cluster).
    pub stopped: watch::Receiver<Option<Stopped>>,
}

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

impl Running {
    /// Opens the store, starts Raft and serves gRPC over mutual TLS on
    /// `identity.listen`, with the certificate in `<data_dir>/tls/`.
    /// `fresh` is true when the replica is being created (init, join); a
    /// replica restarted with `run` must find its log.
    pub async fn start(
        data_dir: &Path,
        identity: &Identity,
        timing: &Timing,
        fresh: bool,
    ) -> Result<Running, StartError> {
        if identity.left {
            return Err(StartError::Raft(format!(
                "replica {} left cluster {}; use an empty data dir to join again",
                identity.node_id, identity.cluster_id
            )));
        }
        if !fresh && !data_dir.join("log").exists() {
            return Err(StartError::WipedLog(data_dir.to_path_buf()));
        }
        let config = timing.raft_config(&identity.cluster_id).map_err(StartError::Timing)?;
        let tls = ReplicaTls::load(data_dir)?;
        let peer_tls = tls.client_config(slap_proto::tls::Expect::AnyReplica)?;
        let (log, sm) = open_store(data_dir)?;
        let state = sm.app();
        let server_tls = Arc::new(tls.server_config(Arc::downgrade(&state))?);
        let raft = Raft::new(
            identity.node_id,
            config,
            Network::new(tls.clone()),
            log.clone(),
            sm.clone(),
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind(&identity.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: identity.listen.clone(),
                source,
            })?;
        let (proposer, queue) = tokio::sync::mpsc::channel(4096);
        tokio::spawn(run_proposer(raft.clone(), queue));
        let (forwarder, forward_queue) = tokio::sync::mpsc::channel(4096);
        let (read_barrier, read_queue) = tokio::sync::mpsc::channel(4096);
        tokio::spawn(run_read_barrier(raft.clone(), read_queue));
        let replica = Arc::new(Replica {
            id: identity.node_id,
            cluster_id: identity.cluster_id.clone(),
            joined: std::sync::atomic::AtomicBool::new(!fresh),
            data_dir: data_dir.to_path_buf(),
            raft: raft.clone(),
            state,
            log,
            tls,
            peer_tls,
            peers: Mutex::new(HashMap::new()),
            membership: tokio::sync::Mutex::new(()),
            metrics: crate::metrics::Metrics::default(),
            proposer,
            forwarder,
            read_barrier,
        });
        tokio::spawn(run_forwarder(Arc::downgrade(&replica), forward_queue));
        tokio::spawn(crate::certificates::run_issuer(Arc::downgrade(&replica)));
        let (stop, mut stop_rx) = watch::channel(false);
        // Accepted connections have Nagle's algorithm off (cluster_tls): Raft
        // and its callers exchange small messages, which Nagle plus delayed
        // ACKs hold back ~40 ms. HTTP/2 pings find dead peers.
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(
                slap_proto::cluster::raft_server::RaftServer::new(crate::raft::service::RaftService::new(
                    raft.clone(),
                    replica.state.clone(),
                    sm,
                ))
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            )
            .add_service(slap_proto::cluster::cluster_server::ClusterServer::new(
                crate::cluster_service::ClusterService::new(replica.clone()),
            ))
            .serve_with_incoming_shutdown(crate::cluster_tls::incoming(listener, server_tls), async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            });
        let server = tokio::spawn(server);
        let (stopped_tx, stopped) = watch::channel(None);
        tokio::spawn(watch_metrics(replica.clone(), stopped_tx));
        tokio::spawn(log_store_rates(replica.log.stats()));
        info!(
            replica = identity.node_id,
            cluster = %identity.cluster_id,
            listen = %identity.listen,
            "replica started"
        );
        Ok(Running {
            replica,
            stop,
            server,
            stopped,
        })
    }

    /// Serves SLAP on `addr` until the replica stops: over HTTPS with client
    /// certificates, or, with `insecure_http`, over plain HTTP where every
    /// caller may do everything (development only; said at every start).
    pub async fn serve_slap(&self, addr: &str, insecure_http: bool) -> Result<(), StartError> {
        self.serve_slap_advertised(addr, None, insecure_http).await
    }

    /// As [`Running::serve_slap`], for clients that reach it as `advertise`
    /// (host:port): its server certificate names that host too, so a
    /// gateway or client dialing `master-1:8443` verifies it.
    pub async fn serve_slap_advertised(
        &self,
        addr: &str,
        advertise: Option<&str>,
        insecure_http: bool,
    ) -> Result<(), StartError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        let mut stop = self.stop.subscribe();
        if !insecure_http {
            // A wildcard listen address names no host a client dials.
            let names: Vec<String> = crate::founding::server_names(&[addr, advertise.unwrap_or(addr)])
                .into_iter()
                .filter(|h| !matches!(h.as_str(), "0.0.0.0" | "::" | ""))
                .collect();
            tokio::spawn(crate::slap::tls::serve(self.replica.clone(), listener, names, stop));
            return Ok(());
        }
        let app = crate::slap::router(self.replica.clone());
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                error!("SLAP server stopped: {e}");
            }
        });
        tracing::warn!(
            %addr,
            "serving SLAP over plain HTTP (--insecure-http): no client certificates, every caller may do \
             everything; for development only"
        );
        Ok(())
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` over plain HTTP on
    /// `addr` until the replica stops.
    pub async fn serve_monitoring(&self, addr: &str) -> Result<(), StartError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        let mut stop = self.stop.subscribe();
        let app = crate::metrics::router(self.replica.clone());
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                error!("monitoring server stopped: {e}");
            }
        });
        info!(%addr, "serving /metrics, /healthz and /readyz");
        Ok(())
    }

    /// Records, through the log, that this replica serves SLAP and the
    /// native API at `public_addr` (host:port), so that gateways and
    /// clients find every replica from any one. Retried in the background
    /// until it lands (the cluster may be electing).
    pub fn announce(&self, public_addr: &str) {
        let replica = Arc::downgrade(&self.replica);
        let public_addr = public_addr.to_string();
        tokio::spawn(async move {
            loop {
                let Some(r) = replica.upgrade() else { return };
                let known = r
                    .state
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .replica_addrs
                    .get(&r.id)
                    .cloned();
                if known.as_deref() == Some(public_addr.as_str()) {
                    return;
                }
                let write = ClientWrite {
                    request_id: None,
                    command: Command::AnnounceReplica {
                        id: r.id,
                        public_addr: public_addr.clone(),
                    },
                };
                match r.write(write).await {
                    Ok(_) => {
                        info!(replica = r.id, %public_addr, "announced the public address");
                        return;
                    }
                    Err(e) => {
                        drop(r);
                        warn!("cannot announce the public address yet: {}", e.message());
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    /// A new one-replica cluster in `data_dir`, serving its cluster API on
    /// `listen` (in-process: tests and benchmarks). Returns it with the
    /// cluster's founding secrets (join token, administrator's certificate);
    /// nothing is written to `data_dir` but the stores and `tls/`.
    pub async fn single_replica_cluster(
        data_dir: &Path,
        listen: &str,
        timing: &Timing,
    ) -> Result<(Running, crate::founding::Founding), String> {
        let founding = crate::founding::Founding::new(&[listen]).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
        founding.replica_tls.save(data_dir).map_err(|e| e.to_string())?;
        let identity = Identity {
            format: 1,
            cluster_id: founding.token.cluster_id.clone(),
            node_id: 1,
            listen: listen.to_string(),
            advertise: listen.to_string(),
            left: false,
        };
        let running = Running::start(data_dir, &identity, timing, true)
            .await
            .map_err(|e| e.to_string())?;
        running.found_cluster(listen, &founding).await?;
        Ok((running, founding))
    }

    /// Makes this replica the first and only member of a new cluster and
    /// records the cluster, its CA and the founding certificates
    /// (`master-node init`; tests and benchmarks).
    pub async fn found_cluster(&self, advertise: &str, founding: &crate::founding::Founding) -> Result<(), String> {
        let members: std::collections::BTreeMap<u64, crate::raft::ReplicaNode> = [(
            self.replica.id,
            crate::raft::ReplicaNode {
                addr: advertise.to_string(),
            },
        )]
        .into_iter()
        .collect();
        self.replica
            .raft
            .initialize(members)
            .await
            .map_err(|e| format!("cannot initialize the cluster: {e}"))?;
        let token = &founding.token;
        let mut commands = vec![
            Command::InitCluster {
                id: token.cluster_id.clone(),
                token_sha256: token.secret_sha256(),
            },
            Command::SetAuthority(founding.authority.clone()),
        ];
        commands.extend(founding.records.iter().map(|c| Command::RecordCertificate {
            certificate: c.clone(),
            registration: None,
        }));
        for command in commands {
            let (reply, _) = self
                .replica
                .write(ClientWrite {
                    request_id: None,
                    command,
                })
                .await
                .map_err(|e| format!("cannot record the new cluster: {}", e.message()))?;
            if let Reply::Refused(r) = reply {
                return Err(format!("cannot record the new cluster: {r}"));
            }
        }
        self.mark_joined();
        Ok(())
    }

    /// Says this replica is now a member (a joiner, once promoted).
    pub fn mark_joined(&self) {
        self.replica.joined.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits until the cluster's CA exists (the leader creates it shortly
    /// after the cluster); false after `limit`.
    pub async fn wait_for_authority(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self
            .replica
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .authority
            .is_none()
        {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops serving and shuts Raft down.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.server.await;
        if let Err(e) = self.replica.raft.shutdown().await {
            warn!("raft shutdown: {e}");
        }
    }
}

/// Logs leadership changes; notices a fatal Raft error or this replica's
/// removal from the cluster and reports it through `stopped`.
///
/// Removal is decided by a leader, not by this replica's own view: a
/// removed replica may never receive the configuration that leaves it out
/// (the leader stops replicating to it once that configuration commits),
/// and a joiner's own configuration lags behind its promotion while it
/// catches up (an older configuration, without it, is not a removal). So
/// once the replica is a member ([`Replica::joined`]), it asks its peers
/// every few seconds; when a leader of its own cluster no longer lists it,
/// it has been removed.
async fn watch_metrics(replica: Arc<Replica>, stopped: watch::Sender<Option<Stopped>>) {
    let mut rx = replica.raft.metrics();
    let mut last_leader = None;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut ticked = false;
    loop {
        let m = rx.borrow_and_update().clone();
        match &m.running_state {
            // Our own shutdown: nothing went wrong.
            Err(openraft::error::Fatal::Stopped) => return,
            Err(fatal) => {
                let reason = format!("Raft stopped: {fatal}");
                error!(replica = replica.id, "{reason}");
                let _ = stopped.send(Some(Stopped::Failed(reason)));
                return;
            }
            Ok(()) => {}
        }
        if m.current_leader != last_leader {
            info!(replica = replica.id, term = m.current_term, leader = ?m.current_leader, "leader changed");
            last_leader = m.current_leader;
        }
        let member = replica.joined.load(std::sync::atomic::Ordering::Relaxed);
        tracing::trace!(member, state = ?m.state, ticked, "membership watch");
        let removed = if member && m.state != ServerState::Leader && std::mem::take(&mut ticked) {
            let peers: Vec<String> = m
                .membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != replica.id)
                .map(|(_, n)| n.addr.clone())
                .collect();
            removed_by_leader(&replica, &peers).await
        } else {
            false
        };
        if removed {
            let reason = format!("replica {} was removed from cluster {}", replica.id, replica.cluster_id);
            info!("{reason}");
            if let Ok(Some(mut identity)) = Identity::load(&replica.data_dir) {
                identity.left = true;
                if let Err(e) = identity.save(&replica.data_dir) {
                    warn!("cannot record the removal in the identity file: {e}");
                }
            }
            let _ = stopped.send(Some(Stopped::Removed(reason)));
            return;
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = tick.tick() => ticked = true,
        }
    }
}

/// Logs (at debug level) how many entries, append calls and WAL syncs the
/// log store does per second: how well writes are batched.
async fn log_store_rates(stats: Arc<raft_store::LogStats>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut last = (0, 0, 0);
    loop {
        tick.tick().await;
        let now = (
            stats.entries.load(Relaxed),
            stats.appends.load(Relaxed),
            stats.syncs.load(Relaxed),
        );
        if now != last {
            tracing::debug!(
                entries_per_s = (now.0 - last.0) / 5,
                appends_per_s = (now.1 - last.1) / 5,
                syncs_per_s = (now.2 - last.2) / 5,
                "log store"
            );
        }
        last = now;
    }
}

/// Asks the peers whether a leader of this cluster has dropped `replica`.
async fn removed_by_leader(replica: &Replica, peers: &[String]) -> bool {
    // Without its certificate: once removed, it is revoked and refused.
    let config = match replica.tls.anonymous_client_config() {
        Ok(c) => c,
        Err(e) => {
            warn!("cannot ask the peers whether this replica is still a member: {e}");
            return false;
        }
    };
    let credentials = crate::client::Credentials::from_config(config);
    for addr in peers {
        let status = tokio::time::timeout(
            Duration::from_secs(1),
            crate::client::Client::status_of(addr, &credentials),
        )
        .await;
        match status {
            Ok(Ok(status)) if status.cluster_id == replica.cluster_id && status.state == "Leader" => {
                let listed = status.members.iter().any(|m| m.id == replica.id);
                tracing::debug!(%addr, listed, "asked the leader whether this replica is a member");
                return !listed;
            }
            Ok(Ok(status)) => tracing::debug!(%addr, state = %status.state, "asked a peer: not the leader"),
            Ok(Err(e)) => tracing::debug!(%addr, error = %e, "asked a peer: no status"),
            Err(_) => tracing::debug!(%addr, "asked a peer: no answer within 1 s"),
        }
    }
    false
}

impl Replica {
    fn peer(&self, addr: &str) -> Result<ClusterClient<Channel>, Status> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = peers.get(addr) {
            return Ok(c.clone());
        }
        let ch = slap_proto::tls::channel(addr, self.peer_tls.clone())
            .map_err(|e| Status::unavailable(format!("cannot reach {addr}: {e}")))?;
        let client = ClusterClient::new(ch).max_decoding_message_size(64 << 20);
        peers.insert(addr.to_string(), client.clone());
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
        let leading = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            m.current_leader == Some(self.id) && m.state == ServerState::Leader
        };
        // The local check first, so a write that changes something costs no
        // confirmation round before it is proposed.
        if !leading || !unchanged(&self.state.read().unwrap_or_else(|e| e.into_inner())) {
            return None;
        }
        let (done, confirmed) = oneshot::channel();
        self.read_barrier.send(done).await.ok()?;
        // Not confirmed (leadership lost meanwhile): the write path waits for
        // the new leader and answers.
        confirmed.await.ok()?.ok()?;
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
        }
    }

    fn log_committed(&self) -> Option<u64> {
        self.log.committed().ok().flatten().map(|c| c.index)
    }

    // ----- membership (leader only) --------------------------------------

    /// Admits a joiner at `addr`: reserves its replica id, signs its
    /// certificate (`replica:N`, over the key of `csr_pem`) and records it.
    /// Returns the id and the certificate (PEM).
    pub async fn admit(&self, addr: &str, csr_pem: &str, hosts: &[String]) -> Result<(u64, String), Status> {
        let _one_at_a_time = self.membership.lock().await;
        let ca = self
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .authority
            .clone()
            .ok_or_else(|| Status::unavailable("the cluster's CA is not applied here yet; retry"))?;
        // Refuse a bad request before an id is reserved for it.
        let now = crate::pki::now_secs();
        crate::pki::issue_for_request(&ca, &Role::Replica(0), now, 1, &[], csr_pem)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(member) = self.members().into_iter().find(|m| m.addr == addr) {
            return Err(Status::already_exists(format!(
                "address {addr} is already used by replica {}; if that replica is gone, remove it first \
                 (`master-node leave --id {} --peer ... --token ...`)",
                member.id, member.id
            )));
        }
        let (reply, _) = self
            .propose(ClientWrite {
                request_id: None,
                command: Command::ReserveReplicaId { addr: addr.to_string() },
            })
            .await
            .map_err(|e| match e {
                NotProposed::NotLeader(_) => Status::unavailable("leadership lost; retry the join"),
                NotProposed::Failed(status) => status,
            })?;
        let id = match reply {
            Reply::ReplicaId(id) => id,
            other => {
                return Err(Status::failed_precondition(format!(
                    "cannot reserve a replica id: {other:?}"
                )))
            }
        };
        let mut names: Vec<&str> = hosts.iter().map(String::as_str).collect();
        names.push(addr);
        let certificate = crate::pki::issue_for_request(
            &ca,
            &Role::Replica(id),
            now,
            crate::founding::REPLICA_DAYS,
            &crate::founding::server_names(&names),
            csr_pem,
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let pem = certificate.cert_pem.clone();
        let (reply, _) = self
            .propose(ClientWrite {
                request_id: None,
                command: Command::RecordCertificate {
                    certificate,
                    registration: None,
                },
            })
            .await
            .map_err(|e| match e {
                NotProposed::NotLeader(_) => Status::unavailable("leadership lost; retry the join"),
                NotProposed::Failed(status) => status,
            })?;
        if let Reply::Refused(r) = reply {
            return Err(Status::failed_precondition(format!(
                "cannot record replica {id}'s certificate: {r}"
            )));
        }
        Ok((id, pem))
    }

    /// Adds a reserved replica as a learner, waits for it to catch up, then
    /// makes it a voter.
    pub async fn promote(&self, id: u64, addr: &str) -> Result<Vec<Member>, Status> {
        let _one_at_a_time = self.membership.lock().await;
        let next = self
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .cluster
            .as_ref()
            .map(|c| c.next_replica_id);
        if next.is_none_or(|n| id >= n) || id == 0 {
            return Err(Status::not_found(format!(
                "replica id {id} was never reserved by a join"
            )));
        }
        let members = self.members();
        if let Some(other) = members.iter().find(|m| m.addr == addr && m.id != id) {
            return Err(Status::already_exists(format!(
                "address {addr} is already used by replica {}",
                other.id
            )));
        }
        if members.iter().any(|m| m.id == id && m.role == "voter") {
            return Ok(members);
        }
        info!(replica = id, %addr, "adding learner");
        let add = self.raft.add_learner(id, ReplicaNode { addr: addr.to_string() }, true);
        match tokio::time::timeout(Duration::from_secs(120), add).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "replica {id} did not catch up within 120 s"
                )))
            }
            Ok(Err(e)) => {
                return Err(Status::unavailable(format!(
                    "cannot add replica {id} as a learner: {e}"
                )))
            }
            Ok(Ok(_)) => {}
        }
        info!(replica = id, "learner caught up; promoting to voter");
        self.raft
            .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
            .await
            .map_err(|e| Status::unavailable(format!("cannot make replica {id} a voter: {e}")))?;
        Ok(self.members())
    }

    /// Removes a replica (voter or learner) from the cluster.
    pub async fn remove(&self, id: u64) -> Result<Vec<Member>, Status> {
        let _one_at_a_time = self.membership.lock().await;
        let members = self.members();
        let Some(member) = members.iter().find(|m| m.id == id) else {
            return Err(Status::not_found(format!(
                "replica {id} is not a member of cluster {}",
                self.cluster_id
            )));
        };
        let change = if member.role == "voter" {
            if members.iter().filter(|m| m.role == "voter").count() == 1 {
                return Err(Status::failed_precondition(format!(
                    "replica {id} is the last voter; a cluster cannot remove its last voter"
                )));
            }
            ChangeMembers::RemoveVoters([id].into())
        } else {
            ChangeMembers::RemoveNodes([id].into())
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(|e| Status::unavailable(format!("cannot remove replica {id}: {e}")))?;
        info!(replica = id, "removed from the cluster");
        // Its certificate goes too: a removed replica can no longer speak
        // Raft, forward writes or read, on any replica.
        let revoked = self
            .propose(ClientWrite {
                request_id: None,
                command: Command::RevokeRole {
                    role: Role::Replica(id),
                },
            })
            .await;
        if !matches!(revoked, Ok((Reply::Done, _))) {
            warn!(
                replica = id,
                "removed, but its certificate could not be revoked: {revoked:?}"
            );
        }
        Ok(self.members())
    }
}
