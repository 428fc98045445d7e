//! Raft's server side: the gRPC `Raft` service hands peers' messages to the
//! local openraft instance and sends back its answer, errors included.
//!
//! Only replicas speak Raft, and each only for itself: a message is taken
//! only from a connection whose live (unrevoked) certificate names the
//! replica the message says it comes from (the candidate of a vote, the
//! leader of an append or a snapshot).

use std::sync::{Arc, RwLock};

use serde::de::DeserializeOwned;
use serde::Serialize;
use slap_proto::cluster::raft_server::Raft as RaftRpc;
use slap_proto::cluster::RaftPayload;
use tonic::{Request, Response, Status};

use super::Raft;
use crate::cluster_tls::Peer;
use crate::state::{Master, Role};

/// Serves Raft to the other replicas.
pub struct RaftService {
    raft: Raft,
    state: Arc<RwLock<Master>>,
}

impl RaftService {
    pub fn new(raft: Raft, state: Arc<RwLock<Master>>) -> Self {
        Self { raft, state }
    }

    /// Decodes a message and checks that its sender is the caller.
    fn accept<T: DeserializeOwned>(&self, req: Request<RaftPayload>, sender: impl Fn(&T) -> u64) -> Result<T, Status> {
        let peer = Peer::of(&req);
        let message: T = postcard::from_bytes(&req.into_inner().data).map_err(|e| {
            Status::invalid_argument(format!("undecodable Raft message (a replica of another version?): {e}"))
        })?;
        let claimed = sender(&message);
        match peer.live_role(&self.state) {
            Some(Role::Replica(n)) if n == claimed => Ok(message),
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

fn answer<T: Serialize>(result: &T) -> Result<Response<RaftPayload>, Status> {
    Ok(Response::new(RaftPayload {
        data: postcard::to_allocvec(result).map_err(|e| Status::internal(e.to_string()))?,
    }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = self.accept(req, |m: &openraft::raft::AppendEntriesRequest<super::MasterTypes>| {
            m.vote.leader_id().node_id
        })?;
        answer(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = self.accept(req, |m: &openraft::raft::VoteRequest<u64>| m.vote.leader_id().node_id)?;
        answer(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = self.accept(req, |m: &openraft::raft::InstallSnapshotRequest<super::MasterTypes>| {
            m.vote.leader_id().node_id
        })?;
        answer(&self.raft.install_snapshot(rpc).await)
    }
}
