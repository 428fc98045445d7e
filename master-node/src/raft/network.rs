//! Raft's client side: openraft's `RaftNetworkV2` over gRPC with mutual TLS.
//!
//! Each peer gets a lazily connected tonic channel that presents this
//! replica's certificate and accepts only the certificate of the replica it
//! dials (see `slap_proto::tls`). A peer that cannot be reached is reported
//! as `Unreachable`, so openraft backs off instead of hammering it; any
//! other transport failure is a `Network` error and is retried at once.
//!
//! Replication is pipelined: openraft hands a stream of AppendEntries to
//! [`PeerClient::stream_append`], which sends them down one gRPC stream
//! without waiting for each answer (the follower answers them in order), so
//! a leader under load keeps several batches in flight to each follower
//! instead of one round trip per batch.
//!
//! Snapshots go whole, as one client stream: a header (the leader's vote and
//! the snapshot's metadata), then the file in chunks. Each chunk must be
//! taken within the install timeout, not the whole file, so a large snapshot
//! on a slow link keeps going, and heartbeats (their own calls on the same
//! channel) keep flowing meanwhile.
//!
//! Channels are shared: openraft asks for a new client for every
//! leadership check and every vote round, and a fresh channel there meant
//! a fresh TCP connection and TLS handshake per read. A tonic channel
//! multiplexes calls and reconnects by itself, so one per peer (and
//! address) serves replication, checks, votes and snapshots alike.
//!
//! Must not import the replica handle or anything above it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use openraft::alias::{SnapshotOf, VoteOf};
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{Fatal, NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use slap_proto::cluster::raft_client::RaftClient;
use slap_proto::cluster::RaftPayload;
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

use super::{MasterTypes, ReplicaNode};
use crate::cluster_tls::ReplicaTls;

/// Bytes of snapshot file per message.
pub const SNAPSHOT_CHUNK: usize = 1 << 20;

/// Longest wait for a follower to install a snapshot it has received
/// (rebuilding the state of a large cluster takes a while).
const INSTALL_ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest wait for the answer to one AppendEntries of a replication stream.
/// Answers follow the follower's fsync, which a loaded disk can hold for a
/// while; a stream that stays silent longer is taken as broken and reopened.
const STREAM_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the first message of a snapshot transfer carries.
#[derive(Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub vote: VoteOf<MasterTypes>,
    pub meta: openraft::alias::SnapshotMetaOf<MasterTypes>,
}

/// Makes a [`PeerClient`] per peer.
#[derive(Clone)]
pub struct Network {
    tls: Arc<ReplicaTls>,
    channels: Channels,
}

/// The channel to each peer, by node id and address.
/// One channel per peer, with the generation of this replica's certificate
/// it was opened with: after a renewal the next call dials again, so the
/// connection presents the new certificate (an operator may revoke the old).
type Channels = Arc<Mutex<HashMap<(u64, String), (u64, RaftClient<Channel>)>>>;

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

type RpcError = RPCError<MasterTypes>;

/// Encodes a Raft message for the wire (postcard: replicas of one version).
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encodes openraft messages")
}

fn network_error(e: &(impl std::error::Error + 'static)) -> RpcError {
    RPCError::Network(NetworkError::new(e))
}

fn timed_out(addr: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer from {addr} in time"))
}

impl PeerClient {
    fn key(&self) -> (u64, String) {
        (self.target, self.addr.clone())
    }

    /// The shared channel to this peer, made on first use.
    fn client(&self) -> Result<RaftClient<Channel>, Unreachable<MasterTypes>> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.tls.identity.generation();
        if let Some((opened, c)) = channels.get(&self.key()) {
            if *opened == generation {
                return Ok(c.clone());
            }
        }
        let config = self
            .tls
            .client_config(slap_proto::tls::Expect::Replica(self.target))
            .map_err(|e| Unreachable::new(&e))?;
        let ch = slap_proto::tls::channel(&self.addr, config).map_err(|e| Unreachable::new(&e))?;
        let client = RaftClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        channels.insert(self.key(), (generation, client.clone()));
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

    /// A failed call as openraft wants it: a refused or reset connection is
    /// `Unreachable` (back off, dial again), anything else a network error.
    fn call_error(&self, status: tonic::Status) -> RpcError {
        if status.code() == tonic::Code::Unavailable {
            self.forget_channel();
            return RPCError::Unreachable(Unreachable::new(&status));
        }
        network_error(&status)
    }

    async fn call<Resp: DeserializeOwned>(
        &self,
        method: Method,
        data: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RpcError> {
        let mut client = self.client().map_err(RPCError::Unreachable)?;
        let req = tonic::Request::new(RaftPayload { data });
        let fut = async {
            match method {
                Method::Append => client.append_entries(req).await,
                Method::Vote => client.vote(req).await,
                Method::PreVote => client.pre_vote(req).await,
            }
        };
        let reply = match tokio::time::timeout(option.hard_ttl(), fut).await {
            Err(_) => return Err(network_error(&timed_out(&self.addr))),
            Ok(Err(status)) => return Err(self.call_error(status)),
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<Resp, RaftError<MasterTypes>> =
            postcard::from_bytes(&reply.data).map_err(|e| network_error(&e))?;
        // The peer's Raft has stopped (shutting down, or failed): it cannot
        // take anything until it is back.
        result.map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))
    }
}

enum Method {
    Append,
    Vote,
    PreVote,
}

impl RaftNetworkV2<MasterTypes> for PeerClient {
    type SnapshotData = tokio::fs::File;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<MasterTypes>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<MasterTypes>, RpcError> {
        self.call(Method::Append, encode(&rpc), &option).await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        _option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<MasterTypes>, RpcError>>, RpcError>>
    where
        S: Stream<Item = AppendEntriesRequest<MasterTypes>> + Send + Unpin + 'static,
    {
        Box::pin(async move {
            let mut client = self.client().map_err(RPCError::Unreachable)?;
            let requests = input.map(|rpc| RaftPayload { data: encode(&rpc) });
            let answers = client
                .stream_append(requests)
                .await
                .map_err(|status| self.call_error(status))?
                .into_inner();
            let addr = self.addr.clone();
            let answers = tokio_stream::StreamExt::timeout(answers, STREAM_ANSWER_TIMEOUT).map(move |item| {
                let payload = item
                    .map_err(|_| network_error(&timed_out(&addr)))?
                    .map_err(|status| network_error(&status))?;
                let answer: Result<StreamAppendResult<MasterTypes>, Fatal<MasterTypes>> =
                    postcard::from_bytes(&payload.data).map_err(|e| network_error(&e))?;
                answer.map_err(|fatal| RPCError::Unreachable(Unreachable::new(&fatal)))
            });
            Ok(Box::pin(answers) as BoxStream<'s, _>)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<MasterTypes>,
        option: RPCOption,
    ) -> Result<VoteResponse<MasterTypes>, RpcError> {
        self.call(Method::Vote, encode(&rpc), &option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<MasterTypes>,
        option: RPCOption,
    ) -> Result<VoteResponse<MasterTypes>, RpcError> {
        self.call(Method::PreVote, encode(&rpc), &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<MasterTypes>,
        snapshot: SnapshotOf<MasterTypes, tokio::fs::File>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<MasterTypes>, StreamingError<MasterTypes>> {
        let mut client = self.client()?;
        let step = option.hard_ttl();
        let header = SnapshotHeader {
            vote,
            meta: snapshot.meta,
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<RaftPayload>(4);
        let call = tokio::spawn(async move {
            client
                .install_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let send = async {
            let stalled = || StreamingError::Network(NetworkError::new(&timed_out(&self.addr)));
            let closed = || {
                StreamingError::Network(NetworkError::new(&std::io::Error::other(format!(
                    "{} closed the snapshot transfer",
                    self.addr
                ))))
            };
            let mut file = snapshot.snapshot;
            let mut next = Some(RaftPayload { data: encode(&header) });
            while let Some(message) = next.take() {
                match tokio::time::timeout(step, tx.send(message)).await {
                    Err(_) => return Err(stalled()),
                    Ok(Err(_)) => return Err(closed()),
                    Ok(Ok(())) => {}
                }
                let mut chunk = vec![0u8; SNAPSHOT_CHUNK];
                let n = read_full(&mut file, &mut chunk)
                    .await
                    .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
                if n > 0 {
                    chunk.truncate(n);
                    next = Some(RaftPayload { data: chunk });
                }
            }
            Ok(())
        };
        tokio::select! {
            sent = send => sent?,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        }
        drop(tx);
        // The follower answers once it has installed the snapshot.
        let reply = match tokio::time::timeout(INSTALL_ANSWER_TIMEOUT.max(step), call).await {
            Err(_) => return Err(StreamingError::Network(NetworkError::new(&timed_out(&self.addr)))),
            Ok(Err(join)) => return Err(StreamingError::Network(NetworkError::new(&join))),
            Ok(Ok(Err(status))) => {
                return Err(match self.call_error(status) {
                    RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                    other => StreamingError::Network(NetworkError::new(&other)),
                })
            }
            Ok(Ok(Ok(r))) => r.into_inner(),
        };
        let result: Result<SnapshotResponse<MasterTypes>, Fatal<MasterTypes>> =
            postcard::from_bytes(&reply.data).map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        result.map_err(|fatal| StreamingError::Unreachable(Unreachable::new(&fatal)))
    }
}

/// Fills `buf` from `file` as far as the file goes; the count read.
async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}
