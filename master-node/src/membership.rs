//! Cluster membership: admitting a joiner (an id and a certificate),
//! promoting it once it has caught up, removing a replica, and noticing
//! that this replica was removed.
//!
//! These are methods of [`Replica`] defined here, above it: the replica
//! handle knows nothing of joins, and this module uses only the handle
//! (its Raft, its state, its one-at-a-time membership lock) and the client
//! to ask peers. Membership changes run on the leader; followers forward
//! the cluster API calls that ask for them.
//!
//! Must not import: the servers (`server`, `slap`, `native`,
//! `cluster_service`) or anything else above the replica handle.

use std::sync::Arc;
use std::time::Duration;

use openraft::rt::WatchReceiver;
use openraft::{ChangeMembers, ServerState};
use slap_proto::cluster::Member;
use tokio::sync::watch;
use tonic::Status;
use tracing::{error, info, warn};

use crate::api::ClientWrite;
use crate::identity::Identity;
use crate::raft::ReplicaNode;
use crate::replica::{NotProposed, Replica};
use crate::state::{Command, Reply, Role};

/// Why a replica stopped by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// The cluster removed it: a normal end.
    Removed(String),
    /// Raft stopped on an error (storage, a bad entry): a failure.
    Failed(String),
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
pub async fn watch(replica: Arc<Replica>, stopped: watch::Sender<Option<Stopped>>) {
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

/// Asks the peers whether a leader of this cluster has dropped `replica`.
async fn removed_by_leader(replica: &Replica, peers: &[String]) -> bool {
    for addr in peers {
        match replica.peer_status(addr).await {
            Ok(status) if status.cluster_id == replica.cluster_id && status.state == "Leader" => {
                let listed = status.members.iter().any(|m| m.id == replica.id);
                tracing::debug!(%addr, listed, "asked the leader whether this replica is a member");
                return !listed;
            }
            Ok(status) => tracing::debug!(%addr, state = %status.state, "asked a peer: not the leader"),
            Err(e) => tracing::debug!(%addr, error = %e, "asked a peer: no status"),
        }
    }
    false
}

impl Replica {
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
        let pem = certificate.cert_pem.to_text();
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
