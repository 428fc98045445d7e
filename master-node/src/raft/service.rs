//! Raft's server side: the gRPC `Raft` service hands peers' messages to the
//! local openraft instance and sends back its answer, errors included.
//!
//! Only replicas speak Raft, and each only for itself: a message is taken
//! only from a connection whose live (unrevoked) certificate names the
//! replica the message says it comes from (the candidate of a vote, the
//! leader of an append or a snapshot). In a stream, every message is
//! checked, not only the first.
//!
//! Must not import the replica handle or anything above it.

use std::pin::Pin;
use std::sync::{Arc, RwLock};

use futures::{Stream, StreamExt};
use openraft::Snapshot;
use serde::de::DeserializeOwned;
use serde::Serialize;
use slap_proto::cluster::raft_server::Raft as RaftRpc;
use slap_proto::cluster::RaftPayload;
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use super::network::SnapshotHeader;
use super::{MasterTypes, Raft, StateStore};
use crate::cluster_tls::Peer;
use crate::state::{Master, Role};

type AppendRequest = openraft::raft::AppendEntriesRequest<MasterTypes>;
type VoteRequest = openraft::raft::VoteRequest<MasterTypes>;

/// Serves Raft to the other replicas.
pub struct RaftService {
    raft: Raft,
    state: Arc<RwLock<Master>>,
    /// Where received snapshots are written before openraft installs them.
    store: StateStore,
}

impl RaftService {
    pub fn new(raft: Raft, state: Arc<RwLock<Master>>, store: StateStore) -> Self {
        Self { raft, state, store }
    }
}

/// Who may send Raft messages on one connection: the replica its live
/// certificate names, checked against what each message claims.
struct Sender {
    peer: Peer,
    state: Arc<RwLock<Master>>,
}

impl Sender {
    fn of<T>(req: &Request<T>, state: &Arc<RwLock<Master>>) -> Self {
        Sender {
            peer: Peer::of(req),
            state: state.clone(),
        }
    }

    /// Decodes a message and checks that its sender is the caller.
    fn accept<T: DeserializeOwned>(&self, data: &[u8], sender: impl Fn(&T) -> u64) -> Result<T, Status> {
        let message: T = postcard::from_bytes(data).map_err(|e| {
            Status::invalid_argument(format!("undecodable Raft message (a replica of another version?): {e}"))
        })?;
        self.check(sender(&message))?;
        Ok(message)
    }

    fn check(&self, claimed: u64) -> Result<(), Status> {
        match self.peer.live_role(&self.state) {
            Some(Role::Replica(n)) if n == claimed => Ok(()),
            Some(Role::Replica(n)) => Err(Status::permission_denied(format!(
                "replica {n} sent a Raft message as replica {claimed}"
            ))),
            Some(other) => Err(Status::permission_denied(format!("{other} may not speak Raft"))),
            None => Err(Status::unauthenticated(
                "Raft needs a replica's certificate (none presented, or revoked)",
            )),
        }
    }
}

fn payload<T: Serialize>(result: &T) -> Result<RaftPayload, Status> {
    Ok(RaftPayload {
        data: postcard::to_allocvec(result).map_err(|e| Status::internal(e.to_string()))?,
    })
}

fn answer<T: Serialize>(result: &T) -> Result<Response<RaftPayload>, Status> {
    payload(result).map(Response::new)
}

fn leader_of_append(m: &AppendRequest) -> u64 {
    m.vote.leader_id.node_id
}

fn candidate(m: &VoteRequest) -> u64 {
    m.vote.leader_id.node_id
}

type AnswerStream = Pin<Box<dyn Stream<Item = Result<RaftPayload, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let sender = Sender::of(&req, &self.state);
        let rpc = sender.accept(&req.into_inner().data, leader_of_append)?;
        answer(&self.raft.append_entries(rpc).await)
    }

    type StreamAppendStream = AnswerStream;

    /// Pipelined replication: requests are handed to openraft as they
    /// arrive; its answers go back in order. A message that fails the
    /// sender check ends the stream with that error.
    async fn stream_append(
        &self,
        req: Request<Streaming<RaftPayload>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        let sender = Sender::of(&req, &self.state);
        let (refused_tx, refused_rx) = tokio::sync::oneshot::channel::<Status>();
        let mut refused_tx = Some(refused_tx);
        let requests = tokio_stream::StreamExt::map_while(req.into_inner(), move |item| {
            let checked = item.and_then(|p| sender.accept(&p.data, leader_of_append));
            match checked {
                Ok(rpc) => Some(rpc),
                Err(status) => {
                    if let Some(tx) = refused_tx.take() {
                        let _ = tx.send(status);
                    }
                    None
                }
            }
        });
        let answers = self.raft.stream_append(requests).map(|result| payload(&result));
        // After openraft's answers, the reason the input stopped early, if
        // it did (a refused or undecodable message, a broken connection).
        let refusal = futures::stream::once(refused_rx).filter_map(|r| async move { r.ok().map(Err) });
        Ok(Response::new(Box::pin(answers.chain(refusal))))
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let sender = Sender::of(&req, &self.state);
        let rpc = sender.accept(&req.into_inner().data, candidate)?;
        answer(&self.raft.vote(rpc).await)
    }

    async fn pre_vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let sender = Sender::of(&req, &self.state);
        let rpc = sender.accept(&req.into_inner().data, candidate)?;
        answer(&self.raft.pre_vote(rpc).await)
    }

    /// Receives a whole snapshot into a file of the store, then has
    /// openraft install it.
    async fn install_snapshot(&self, req: Request<Streaming<RaftPayload>>) -> Result<Response<RaftPayload>, Status> {
        let sender = Sender::of(&req, &self.state);
        let mut messages = req.into_inner();
        let first = messages
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("a snapshot transfer needs a header"))?;
        let header: SnapshotHeader = sender.accept(&first.data, |h: &SnapshotHeader| h.vote.leader_id.node_id)?;
        let mut file = self
            .store
            .receive_snapshot()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        while let Some(chunk) = messages.message().await? {
            file.write_all(&chunk.data)
                .await
                .map_err(|e| Status::internal(format!("cannot write the received snapshot: {e}")))?;
        }
        file.flush()
            .await
            .map_err(|e| Status::internal(format!("cannot write the received snapshot: {e}")))?;
        let snapshot = Snapshot {
            meta: header.meta,
            snapshot: file,
        };
        answer(&self.raft.install_full_snapshot(header.vote, snapshot).await)
    }
}
