//! The cluster's version, raised by the leader as replicas are upgraded.
//!
//! Each release speaks the command set up to some version
//! ([`crate::state::VERSION`]), and says so in its status. A kind of
//! command newer than the cluster's version is refused before it reaches
//! the log ([`crate::state::Command::since`]): a replica of an older
//! release could not apply it and would stop. The cluster's version is
//! replicated state, raised through the log (`SetClusterVersion`) by the
//! leader once every member (voters, and learners, which apply the log
//! too) says it speaks the new version, and never
//! lowered, as etcd's cluster version is. A joiner that speaks less than
//! the cluster's version is refused (`cluster_service`), so a rolling
//! upgrade goes one way: upgrade every replica, and the new kinds of
//! command become usable by themselves.
//!
//! Built on the replica handle; must not import the handlers and the server.

use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::rt::WatchReceiver;
use openraft::ServerState;
use tracing::{debug, info, warn};

use crate::api::ClientWrite;
use crate::replica::Replica;
use crate::state::{Command, Reply};

/// How often the leader asks the members which version they speak.
const EVERY: Duration = Duration::from_secs(2);

/// The leader's duty: raise the cluster's version to the lowest one its
/// members speak, when that is above it. Ends when the replica is dropped.
pub async fn raise_cluster_version(replica: Weak<Replica>) {
    loop {
        tokio::time::sleep(EVERY).await;
        let Some(replica) = replica.upgrade() else { return };
        let m = replica.raft.metrics().borrow_watched().clone();
        if m.state != ServerState::Leader {
            continue;
        }
        let current = replica
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .effective_version();
        // The cluster cannot go past what this replica speaks.
        if current >= crate::raft::spoken_version() {
            continue;
        }
        let Some(lowest) = lowest_spoken(&replica).await else {
            continue;
        };
        if lowest <= current {
            continue;
        }
        let raised = replica
            .write(ClientWrite {
                request_id: None,
                command: Command::SetClusterVersion { version: lowest },
            })
            .await;
        match raised {
            Ok((Reply::Done, _)) => info!(
                from = current,
                to = lowest,
                "every member speaks version {lowest}: cluster version raised"
            ),
            other => warn!("cannot raise the cluster version to {lowest}: {other:?}"),
        }
    }
}

/// The lowest version the members speak, or `None` if one does not answer
/// (it could be an older release: nothing is raised on a guess).
async fn lowest_spoken(replica: &Arc<Replica>) -> Option<u32> {
    let mut lowest = crate::raft::spoken_version();
    for member in replica.members() {
        if member.id == replica.id {
            continue;
        }
        match replica.peer_status(&member.addr).await {
            // Releases before versions do not say: they speak version 1.
            Ok(s) if s.node_id == member.id => lowest = lowest.min(s.speaks_version.max(1)),
            other => {
                debug!(replica = member.id, "no version from this member: {other:?}");
                return None;
            }
        }
    }
    Some(lowest)
}
