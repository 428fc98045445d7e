//! `WatchRevisions`: the leader's feed of computer revisions, for gateways.
//!
//! A node's poll (`getFullComputerInformation` with `If-None-Match`) is
//! answered "304, unchanged" nine times out of ten, and a node's watch is
//! held open for minutes while nothing changes. A gateway that knows every
//! computer's current revision can answer both itself, without a replica
//! building or even looking at the document, if what it knows is fresh.
//!
//! Freshness is what this feed proves. The leader sends every computer's
//! revision, then each change as it is applied (at most every
//! [`PUSH_EVERY`], so a burst of writes is one message). Every
//! [`CONFIRM_EVERY`] it confirms with a quorum that it still leads and has
//! applied everything committed (a read-index round, shared with the
//! linearizable reads), then sends what changed with `confirmed` set: a
//! write acknowledged before the confirmation started is in that message or
//! an earlier one. A replica that loses leadership, or cannot reach a
//! quorum, sends no more confirmations, and the gateway stops answering for
//! the Master when they stop coming (`slap-gateway --edge-staleness`).
//!
//! Must not import: `slap`, `dashboard`, the servers.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openraft::rt::WatchReceiver;
use slap_proto::master as pb;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Status;

use crate::replica::Replica;

/// How often a confirmed message is sent.
pub const CONFIRM_EVERY: Duration = Duration::from_millis(500);
/// How soon a change is pushed after it is applied (changes within are
/// sent together).
pub const PUSH_EVERY: Duration = Duration::from_millis(10);

pub type FeedStream = Pin<Box<dyn Stream<Item = Result<pb::RevisionFeed, Status>> + Send>>;

/// Starts the feed for one gateway; fails unless this replica leads.
pub fn start(replica: Arc<Replica>) -> Result<FeedStream, Status> {
    if !replica.believes_it_leads() {
        return Err(Status::unavailable(
            "this replica is not the leader: the revision feed is served by the leader",
        ));
    }
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        if let Err(reason) = run(&replica, &tx).await {
            tracing::debug!(%reason, "revision feed ended");
            let _ = tx.send(Err(Status::unavailable(reason))).await;
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// Sends until the gateway goes away (`Ok`) or this replica cannot vouch
/// for its state any more (`Err`, the reason).
async fn run(replica: &Replica, tx: &mpsc::Sender<Result<pb::RevisionFeed, Status>>) -> Result<(), String> {
    let mut seen = 0;
    let mut applied = replica.raft.metrics();
    let mut confirm = tokio::time::interval(CONFIRM_EVERY);
    confirm.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let confirmed = tokio::select! {
            _ = confirm.tick() => {
                replica.confirm_leadership().await?;
                true
            }
            changed = applied.changed() => {
                changed.map_err(|_| "this replica is shutting down".to_string())?;
                // Let a burst of entries land: one message for all of them.
                tokio::time::sleep(PUSH_EVERY).await;
                false
            }
            _ = tx.closed() => return Ok(()),
        };
        let message = {
            let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
            let changed: Vec<pb::RevisedComputer> = state
                .computers_revised_after(seen)
                .map(|(revision, id)| pb::RevisedComputer {
                    computer_id: id.clone(),
                    revision: *revision,
                })
                .collect();
            if let Some(last) = changed.last() {
                seen = last.revision;
            }
            pb::RevisionFeed {
                changed,
                confirmed,
                revocations: state.poller_revocations(),
            }
        };
        if message.changed.is_empty() && !confirmed {
            continue;
        }
        if tx.send(Ok(message)).await.is_err() {
            return Ok(());
        }
    }
}
