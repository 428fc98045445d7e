//! The process of a replica: the one place that assembles it.
//!
//! [`Running::start`] opens the store, starts Raft and the replica handle,
//! and serves the cluster port (Raft and the cluster API over mutual TLS);
//! [`Running::serve_slap`] adds the SLAP port (SLAP, the native API and the
//! dashboard: [`http::app`], over [`https`] or plain HTTP) and
//! [`Running::serve_monitoring`] the monitoring port. Background tasks
//! (the certificate issuer, the membership watch, the log store's rates)
//! are spawned here, and every server stops on one signal
//! ([`Running::shutdown`]).
//!
//! Everything else is a handler or a core piece that knows nothing of how
//! it is mounted; nothing imports this module but the binary and tests.
//!
//! It may import every module; none imports it.

pub mod http;
pub mod https;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::api::ClientWrite;
use crate::cluster_tls::{ClusterTlsError, ReplicaTls};
use crate::identity::Identity;
use crate::raft::network::Network;
use crate::raft::{open_store, Raft, Timing};
use crate::replica::Replica;
use crate::state::{Command, Reply};

pub use crate::membership::Stopped;

/// Calls per second one caller may make on the SLAP port, unless told
/// otherwise (`--rate-limit`): far above what a node or a user does.
pub const DEFAULT_RATE: u32 = 1_000;
/// Calls one caller may make at once (`--rate-burst`).
pub const DEFAULT_BURST: u32 = 2_000;

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
    #[error(
        "this master-node speaks command versions up to {speaks}, but the cluster is at version {cluster}: \
         a replica never goes back to an older release. Run a newer master-node"
    )]
    TooOld { speaks: u32, cluster: u32 },
    #[error("openraft refused to start: {0}")]
    Raft(String),
    #[error(transparent)]
    Tls(#[from] ClusterTlsError),
}

/// How long a stopping replica lets open cluster-port calls finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A started replica: its shared core and a way to stop it.
pub struct Running {
    pub replica: Arc<Replica>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    /// Fires with a reason when the replica stops by itself (fatal error,
    /// removed from the cluster).
    pub stopped: watch::Receiver<Option<Stopped>>,
    /// Each caller's rate on the SLAP port (`None`: no limit).
    rate: Option<Arc<slap_proto::rate::RateLimiter>>,
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
        let opening = std::time::Instant::now();
        let (log, sm) = open_store(data_dir)?;
        let opened = opening.elapsed();
        let state = sm.app();
        let cluster = state.read().unwrap_or_else(|e| e.into_inner()).effective_version();
        let speaks = crate::raft::spoken_version();
        if speaks < cluster {
            return Err(StartError::TooOld { speaks, cluster });
        }
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
        // Raft::new re-applies what was committed but not yet written to the
        // state before a crash: the second figure is that replay.
        info!(
            store_seconds = opened.as_secs_f64(),
            replay_seconds = (opening.elapsed() - opened).as_secs_f64(),
            "storage opened"
        );
        let listener = tokio::net::TcpListener::bind(&identity.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: identity.listen.clone(),
                source,
            })?;
        let replica = Replica::start(identity, data_dir, raft.clone(), log, state, tls, !fresh)?;
        tokio::spawn(crate::certificates::run_issuer(Arc::downgrade(&replica)));
        tokio::spawn(crate::versions::raise_cluster_version(Arc::downgrade(&replica)));
        tokio::spawn(crate::renewal::keep_current(Arc::downgrade(&replica)));
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
        tokio::spawn(crate::membership::watch(replica.clone(), stopped_tx));
        tokio::spawn(log_store_rates(replica.log.stats()));
        tokio::spawn(crate::raft::snapshot_by_size(
            raft.clone(),
            replica.log.stats(),
            timing.snapshot_every_mib << 20,
        ));
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
            rate: slap_proto::rate::RateLimiter::new(DEFAULT_RATE, DEFAULT_BURST).map(Arc::new),
        })
    }

    /// Holds each caller of the SLAP port to `per_second` calls, `burst` at
    /// once (0: no limit). Applies to what is served from then on.
    pub fn limit_rate(&mut self, per_second: u32, burst: u32) {
        self.rate = slap_proto::rate::RateLimiter::new(per_second, burst).map(Arc::new);
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
        let listener = bind(addr).await?;
        let stop = self.stop.subscribe();
        if !insecure_http {
            // A wildcard listen address names no host a client dials.
            let names: Vec<String> = crate::founding::server_names(&[addr, advertise.unwrap_or(addr)])
                .into_iter()
                .filter(|h| !matches!(h.as_str(), "0.0.0.0" | "::" | ""))
                .collect();
            let app = http::app(self.replica.clone(), self.rate.clone());
            tokio::spawn(https::serve(self.replica.clone(), app, listener, names, stop));
            return Ok(());
        }
        let app = http::app(self.replica.clone(), self.rate.clone());
        tokio::spawn(serve_plain(listener, app, stop, "SLAP server"));
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
        let listener = bind(addr).await?;
        let stop = self.stop.subscribe();
        let app = crate::metrics::router(self.replica.clone());
        tokio::spawn(serve_plain(listener, app, stop, "monitoring server"));
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
            // Its only member speaks this version: a new cluster starts at
            // it, rather than at 1 until the leader's first round raises it
            // (a `cert renew` right after `init` was refused as if an old
            // release voted). Joiners that speak less are refused.
            Command::SetClusterVersion {
                version: crate::raft::spoken_version(),
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
        self.replica.mark_joined();
        Ok(())
    }

    /// Stops serving and shuts Raft down. Open cluster-port connections
    /// get [`SHUTDOWN_GRACE`] to finish their calls: peers keep theirs open
    /// for as long as this replica lives, so waiting for them to close
    /// first kept a replica that was told to stop running (SIGTERM had no
    /// effect until SIGKILL).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let mut server = self.server;
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.is_err() {
            info!(
                grace = ?SHUTDOWN_GRACE,
                "cluster connections still open after the grace period; closing them"
            );
            server.abort();
        }
        if let Err(e) = self.replica.raft.shutdown().await {
            warn!("raft shutdown: {e}");
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

/// Binds a listening address, saying which one when it cannot.
async fn bind(addr: &str) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen {
            addr: addr.to_string(),
            source,
        })
}

/// Serves `app` over plain HTTP (callers' addresses known to it) until
/// the replica stops.
async fn serve_plain(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
    what: &'static str,
) {
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        error!("{what} stopped: {e}");
    }
}
