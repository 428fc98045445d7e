//! Raft's server side: the gRPC `Raft` service hands peers' messages to the
//! local openraft instance and sends back its answer, errors included.

use serde::de::DeserializeOwned;
use serde::Serialize;
use slap_proto::cluster::raft_server::Raft as RaftRpc;
use slap_proto::cluster::RaftPayload;
use tonic::{Request, Response, Status};

use super::Raft;

/// Serves Raft to the other replicas.
pub struct RaftService {
    raft: Raft,
}

impl RaftService {
    pub fn new(raft: Raft) -> Self {
        Self { raft }
    }
}

fn decode<T: DeserializeOwned>(req: Request<RaftPayload>) -> Result<T, Status> {
    postcard::from_bytes(&req.into_inner().data)
        .map_err(|e| Status::invalid_argument(format!("undecodable Raft message (a replica of another version?): {e}")))
}

fn answer<T: Serialize>(result: &T) -> Result<Response<RaftPayload>, Status> {
    Ok(Response::new(RaftPayload {
        data: postcard::to_allocvec(result).map_err(|e| Status::internal(e.to_string()))?,
    }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        answer(&self.raft.append_entries(decode(req)?).await)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        answer(&self.raft.vote(decode(req)?).await)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        answer(&self.raft.install_snapshot(decode(req)?).await)
    }
}
