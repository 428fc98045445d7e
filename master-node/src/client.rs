//! A client of the cluster API, for the command line and tests.
//!
//! It knows several replica addresses and moves to the next one when a
//! replica does not answer. Every write carries a request id (a random client
//! id and a sequence number), and a retry reuses it, so a write whose answer
//! was lost is never applied twice.
//!
//! The cluster port speaks mutual TLS ([`Credentials`]): the client checks
//! that it talks to a replica of the cluster (by its CA, or by the CA's hash
//! in a join token) and may present a certificate of its own. Writes and
//! reads need an administrator's (or a replica's) certificate; membership and
//! certificate calls can be made with the join token instead.
//!
//! Must not import the replica handle or anything above it: the CLI links it
//! without running a replica.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use slap_proto::cluster::cluster_client::ClusterClient;
use slap_proto::cluster::{StatusReply, StatusRequest};
use slap_proto::tls::{ClientIdentity, Expect, Trust};
use tonic::transport::Channel;

use crate::api::{Answer, ClientWrite, Query};
use crate::identity::JoinToken;
use crate::state::{Command, Reply, RequestId};

/// How a client recognizes the cluster and, optionally, proves who it is.
#[derive(Clone)]
pub struct Credentials {
    config: Arc<rustls::ClientConfig>,
}

impl Credentials {
    fn make(trust: Trust, identity: Option<ClientIdentity>) -> Result<Credentials, ClientError> {
        let config = slap_proto::tls::client_config(&trust, identity.as_ref(), Expect::AnyReplica)
            .map_err(|e| ClientError::Credentials(e.to_string()))?;
        Ok(Credentials { config })
    }

    /// No certificate; the cluster recognized by the CA hash the join token
    /// carries (calls authenticated by the token, and `status`).
    pub fn token(token: &JoinToken) -> Result<Credentials, ClientError> {
        let trust = Trust::pinned_hex(&token.ca_sha256).map_err(|e| ClientError::Credentials(e.to_string()))?;
        Self::make(trust, None)
    }

    /// No certificate; the cluster recognized by its CA (PEM).
    pub fn ca(ca_pem: &str) -> Result<Credentials, ClientError> {
        Self::make(
            Trust::ca_pem(ca_pem).map_err(|e| ClientError::Credentials(e.to_string()))?,
            None,
        )
    }

    /// A certificate and key (PEM) and the cluster's CA (PEM).
    pub fn identity(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Credentials, ClientError> {
        let fail = |e: slap_proto::tls::TlsError| ClientError::Credentials(e.to_string());
        Self::make(
            Trust::ca_pem(ca_pem).map_err(fail)?,
            Some(ClientIdentity::from_pem(cert_pem, key_pem).map_err(fail)?),
        )
    }

    /// `NAME.crt`, `NAME.key` and `ca.crt` from `dir`, as `master-node user
    /// add` writes them (and init, as `admin`, in `<data dir>/admin/`).
    pub fn from_dir(dir: &Path, name: &str) -> Result<Credentials, ClientError> {
        let read = |file: String| {
            let path = dir.join(&file);
            std::fs::read_to_string(&path).map_err(|e| ClientError::Credentials(format!("{}: {e}", path.display())))
        };
        Self::identity(
            &read("ca.crt".into())?,
            &read(format!("{name}.crt"))?,
            &read(format!("{name}.key"))?,
        )
    }

    /// The administrator's certificate `master-node init` left in a data dir.
    pub fn admin_of(data_dir: &Path) -> Result<Credentials, ClientError> {
        Self::from_dir(&data_dir.join("admin"), "admin")
    }

    /// A ready rustls configuration (a replica's own).
    pub fn from_config(config: Arc<rustls::ClientConfig>) -> Credentials {
        Credentials { config }
    }

    /// A lazily connected channel to the cluster port at `addr` with these credentials.
    pub fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        slap_proto::tls::channel(addr, self.config.clone())
            .map_err(|e| ClientError::BadAddress(addr.into(), e.to_string()))
    }
}

/// Client-side failures, with what to do about them.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no replica answered within {0:?} (tried {1}); check the addresses and that a majority is up")]
    Unreachable(Duration, String),
    #[error("{0}")]
    Refused(String),
    #[error("bad address {0:?}: {1}")]
    BadAddress(String, String),
    #[error("credentials: {0}")]
    Credentials(String),
}

/// A cluster API client over a list of replicas.
pub struct Client {
    addrs: Vec<String>,
    clients: Vec<ClusterClient<Channel>>,
    current: Mutex<usize>,
    client_id: String,
    seq: AtomicU64,
    /// How long a call keeps trying.
    pub patience: Duration,
    /// The join token, sent with writes and reads (an operator without an
    /// administrator's certificate); empty otherwise.
    pub token: String,
}

fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

impl Client {
    /// A client of the replicas at `addrs` (host:port).
    pub fn new(addrs: &[String], credentials: &Credentials) -> Result<Client, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::BadAddress(
                String::new(),
                "give at least one replica address".into(),
            ));
        }
        let clients = addrs
            .iter()
            .map(|a| {
                credentials
                    .channel(a)
                    .map(|c| ClusterClient::new(c).max_decoding_message_size(64 << 20))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut id = [0u8; 8];
        rand::rng().fill_bytes(&mut id);
        Ok(Client {
            addrs: addrs.to_vec(),
            clients,
            current: Mutex::new(0),
            client_id: format!("cli-{}", hex::encode(id)),
            seq: AtomicU64::new(0),
            patience: Duration::from_secs(30),
            token: String::new(),
        })
    }

    /// Runs `call` against one replica after another until one answers.
    async fn with_retry<T, F, Fut>(&self, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(ClusterClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + self.patience;
        let mut delay = Duration::from_millis(50);
        loop {
            let i = *self.current.lock().unwrap_or_else(|e| e.into_inner());
            match call(self.clients[i].clone()).await {
                Ok(v) => return Ok(v),
                Err(status) if retryable(&status) => {
                    tracing::debug!(replica = %self.addrs[i], "retrying elsewhere: {}", status.message());
                    *self.current.lock().unwrap_or_else(|e| e.into_inner()) = (i + 1) % self.clients.len();
                }
                Err(status) => return Err(ClientError::Refused(status.message().to_string())),
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Unreachable(self.patience, self.addrs.join(", ")));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Sends a write with a fresh request id; retries reuse it.
    pub async fn write(&self, command: Command) -> Result<(Reply, u64), ClientError> {
        let write = ClientWrite {
            request_id: Some(RequestId {
                client: self.client_id.clone(),
                seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            }),
            command,
        };
        let bytes = postcard::to_allocvec(&write).expect("writes encode");
        let reply = self
            .with_retry(|mut c| {
                let proposal = bytes.clone();
                let token = self.token.clone();
                async move { c.write(slap_proto::cluster::WriteRequest { proposal, token }).await }
            })
            .await?
            .into_inner();
        let decoded =
            postcard::from_bytes(&reply.reply).map_err(|e| ClientError::Refused(format!("undecodable reply: {e}")))?;
        Ok((decoded, reply.log_index))
    }

    /// A linearizable read.
    pub async fn read(&self, query: &Query) -> Result<Answer, ClientError> {
        let bytes = postcard::to_allocvec(query).expect("queries encode");
        let reply = self
            .with_retry(|mut c| {
                let query = bytes.clone();
                let token = self.token.clone();
                async move {
                    c.read(slap_proto::cluster::ReadRequest {
                        query,
                        local: false,
                        token,
                    })
                    .await
                }
            })
            .await?
            .into_inner();
        postcard::from_bytes(&reply.answer).map_err(|e| ClientError::Refused(format!("undecodable answer: {e}")))
    }

    /// A read of one replica's own state (not linearizable; no retry elsewhere).
    pub async fn read_local(addr: &str, query: &Query, credentials: &Credentials) -> Result<Answer, ClientError> {
        let ch = credentials.channel(addr)?;
        let mut c = ClusterClient::new(ch).max_decoding_message_size(64 << 20);
        let req = slap_proto::cluster::ReadRequest {
            query: postcard::to_allocvec(query).expect("queries encode"),
            local: true,
            token: String::new(),
        };
        let reply = match tokio::time::timeout(Duration::from_secs(5), c.read(req)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return Err(ClientError::Refused(format!("{addr}: {}", s.message()))),
            Err(_) => return Err(ClientError::Unreachable(Duration::from_secs(5), addr.into())),
        };
        postcard::from_bytes(&reply.answer).map_err(|e| ClientError::Refused(format!("undecodable answer: {e}")))
    }

    /// The status as one replica sees it (no retry elsewhere).
    pub async fn status_of(addr: &str, credentials: &Credentials) -> Result<StatusReply, ClientError> {
        let ch = credentials.channel(addr)?;
        let mut c = ClusterClient::new(ch);
        match tokio::time::timeout(Duration::from_secs(5), c.status(StatusRequest {})).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(ClientError::Refused(format!("{addr}: {}", s.message()))),
            Err(_) => Err(ClientError::Unreachable(Duration::from_secs(5), addr.into())),
        }
    }

    /// A raw client of the replicas (membership calls).
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: FnMut(ClusterClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        self.with_retry(call).await
    }
}
