//! The gRPC `Cluster` service: membership, status, forwarded writes and
//! reads. Membership changes run on the leader; any replica forwards them.

use std::sync::Arc;

use slap_proto::cluster::cluster_server::Cluster;
use slap_proto::cluster::*;
use tonic::{Request, Response, Status};

use crate::api::ClientWrite;
use crate::replica::Replica;

/// Serves the cluster API of one replica.
pub struct ClusterService {
    replica: Arc<Replica>,
}

impl ClusterService {
    pub fn new(replica: Arc<Replica>) -> Self {
        Self { replica }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let req = req.into_inner();
        if req.addr.parse::<std::net::SocketAddr>().is_err() && !req.addr.contains(':') {
            return Err(Status::invalid_argument(format!(
                "{:?} is not a host:port address",
                req.addr
            )));
        }
        match self.replica.leader_client().await? {
            Some(mut leader) => leader.join(req).await,
            None => {
                self.replica.check_token(&req.token)?;
                let node_id = self.replica.reserve(&req.addr).await?;
                tracing::info!(replica = node_id, addr = %req.addr, "reserved a replica id for a joiner");
                Ok(Response::new(JoinReply {
                    cluster_id: self.replica.cluster_id.clone(),
                    node_id,
                }))
            }
        }
    }

    async fn promote(&self, req: Request<PromoteRequest>) -> Result<Response<PromoteReply>, Status> {
        let req = req.into_inner();
        match self.replica.leader_client().await? {
            Some(mut leader) => leader.promote(req).await,
            None => {
                self.replica.check_token(&req.token)?;
                let members = self.replica.promote(req.node_id, &req.addr).await?;
                Ok(Response::new(PromoteReply { members }))
            }
        }
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        let req = req.into_inner();
        match self.replica.leader_client().await? {
            Some(mut leader) => leader.leave(req).await,
            None => {
                self.replica.check_token(&req.token)?;
                let members = self.replica.remove(req.node_id).await?;
                Ok(Response::new(LeaveReply { members }))
            }
        }
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let _ = req;
        Ok(Response::new(self.replica.local_status()))
    }

    async fn write(&self, req: Request<WriteRequest>) -> Result<Response<WriteReply>, Status> {
        let write: ClientWrite = postcard::from_bytes(&req.into_inner().proposal)
            .map_err(|e| Status::invalid_argument(format!("undecodable write: {e}")))?;
        let (reply, log_index) = self.replica.write(write).await?;
        Ok(Response::new(WriteReply {
            reply: postcard::to_allocvec(&reply).expect("replies encode"),
            log_index,
        }))
    }

    async fn write_batch(&self, req: Request<WriteBatchRequest>) -> Result<Response<WriteBatchReply>, Status> {
        let writes = req
            .into_inner()
            .proposals
            .iter()
            .map(|p| postcard::from_bytes::<ClientWrite>(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(format!("undecodable write in a batch: {e}")))?;
        // Proposed concurrently, so the proposer gathers them into one entry.
        let results = futures::future::join_all(writes.into_iter().map(|w| self.replica.write(w))).await;
        let outcomes = results
            .into_iter()
            .map(|r| match r {
                Ok((reply, log_index)) => WriteOutcome {
                    reply: postcard::to_allocvec(&reply).expect("replies encode"),
                    log_index,
                    code: 0,
                    error: String::new(),
                },
                Err(status) => WriteOutcome {
                    reply: Vec::new(),
                    log_index: 0,
                    code: status.code() as i32,
                    error: status.message().to_string(),
                },
            })
            .collect();
        Ok(Response::new(WriteBatchReply { outcomes }))
    }

    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<ReadReply>, Status> {
        let req = req.into_inner();
        let query = postcard::from_bytes(&req.query)
            .map_err(|e| Status::invalid_argument(format!("undecodable query: {e}")))?;
        let answer = if req.local {
            self.replica.read_local(&query)
        } else {
            self.replica.read(&query).await?
        };
        Ok(Response::new(ReadReply {
            answer: postcard::to_allocvec(&answer).expect("answers encode"),
        }))
    }
}
