//! Raft's client side: openraft's `RaftNetwork` over gRPC with mutual TLS.
//!
//! Each peer gets a lazily connected tonic channel that presents this
//! replica's certificate and accepts only the certificate of the replica it
//! dials (see `slap_proto::tls`). A peer that cannot be reached is reported
//! as `Unreachable`, so openraft backs off instead of hammering it; any
//! other transport failure is a `Network` error and is retried at the next
//! heartbeat.
//!
//! Channels are shared: openraft asks for a new client for every
//! leadership check (each linearizable read) and every vote round, and a
//! fresh channel there meant a fresh TCP connection and TLS handshake per
//! read. A tonic channel multiplexes calls and reconnects by itself, so one
//! per peer (and address) serves replication, checks and votes alike.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use slap_proto::cluster::raft_client::RaftClient;
use slap_proto::cluster::RaftPayload;
use tonic::transport::Channel;

use super::{MasterTypes, ReplicaNode};
use crate::cluster_tls::ReplicaTls;

/// Makes a [`PeerClient`] per peer.
#[derive(Clone)]
pub struct Network {
    tls: Arc<ReplicaTls>,
    channels: Channels,
}

/// The channel to each peer, by node id and address.
type Channels = Arc<Mutex<HashMap<(u64, String), RaftClient<Channel>>>>;

impl Network {
    /// Peers are called with this replica's certificate.
    pub fn new(tls: ReplicaTls) -> Network {
        Network {
            tls: Arc::new(tls),
            channels: Arc::default(),
        }
    }
}

impl RaftNetworkFactory<MasterTypes> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &ReplicaNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            tls: self.tls.clone(),
            channels: self.channels.clone(),
        }
    }
}

/// The connection to one peer.
pub struct PeerClient {
    target: u64,
    addr: String,
    tls: Arc<ReplicaTls>,
    channels: Channels,
}

type RpcResult<T, E> = Result<T, RPCError<u64, ReplicaNode, RaftError<u64, E>>>;

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encodes openraft messages")
}

impl PeerClient {
    fn key(&self) -> (u64, String) {
        (self.target, self.addr.clone())
    }

    /// The shared channel to this peer, made on first use.
    fn client(&mut self) -> Result<RaftClient<Channel>, Unreachable> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(&self.key()) {
            return Ok(c.clone());
        }
        let config = self
            .tls
            .client_config(slap_proto::tls::Expect::Replica(self.target))
            .map_err(|e| Unreachable::new(&e))?;
        let ch = slap_proto::tls::channel(&self.addr, config).map_err(|e| Unreachable::new(&e))?;
        let client = RaftClient::new(ch).max_decoding_message_size(64 << 20);
        channels.insert(self.key(), client.clone());
        Ok(client)
    }

    /// Drops the shared channel after a refused or reset connection, so the
    /// next call dials afresh.
    fn forget_channel(&self) {
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key());
    }

    async fn call<Resp, E>(&mut self, method: Method, data: Vec<u8>, option: &RPCOption) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let mut client = self.client().map_err(RPCError::Unreachable)?;
        let req = tonic::Request::new(RaftPayload { data });
        let fut = async {
            match method {
                Method::Append => client.append_entries(req).await,
                Method::Vote => client.vote(req).await,
                Method::Snapshot => client.install_snapshot(req).await,
            }
        };
        let reply = match tokio::time::timeout(option.hard_ttl(), fut).await {
            Err(_) => {
                let e = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer from {} in time", self.addr),
                );
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
            Ok(Err(status)) => {
                // A refused or reset connection: let openraft back off.
                if status.code() == tonic::Code::Unavailable {
                    self.forget_channel();
                    return Err(RPCError::Unreachable(Unreachable::new(&status)));
                }
                return Err(RPCError::Network(NetworkError::new(&status)));
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<Resp, RaftError<u64, E>> =
            postcard::from_bytes(&reply.data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

enum Method {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<MasterTypes> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<MasterTypes>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>, openraft::error::Infallible> {
        self.call(Method::Append, encode(&rpc), &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<MasterTypes>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        self.call(Method::Snapshot, encode(&rpc), &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>, openraft::error::Infallible> {
        self.call(Method::Vote, encode(&rpc), &option).await
    }
}
