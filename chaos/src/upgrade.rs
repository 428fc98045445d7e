//! The `rolling-upgrade` fault: the replicas, started as an older release
//! (`--act-as-version 1`), are restarted one at a time as this build,
//! followers first and the leader last, while the workload runs. The first
//! time it is an upgrade with version skew (old and new releases voting
//! together, the cluster's version held at the old one until the last
//! voter is upgraded); after that, a rolling restart. The workload's
//! checkers run unchanged beside it: a skewed cluster that lost or
//! misapplied a write would show there. What this drill checks itself:
//! every replica comes back on this build and catches up, and the
//! cluster's version then rises to this build's.
//!
//! Must not import: `run` (the nemesis calls this, not the other way).

use std::time::Duration;

use master_node::state::VERSION;

use crate::cluster::{wait_until, Cluster};

/// Restarts every running member as this build, one at a time: what it did,
/// and what went wrong.
pub async fn rolling(c: &mut Cluster) -> anyhow::Result<(String, Vec<String>)> {
    let from = c.acting.unwrap_or(VERSION);
    c.acting = None;
    let leader = c.leader_slot().await;
    let mut order: Vec<usize> = c.running_slots().into_iter().filter(|s| Some(*s) != leader).collect();
    order.extend(leader);
    let mut problems = Vec::new();
    for &slot in &order {
        c.replicas[slot - 1].proc.stop(Duration::from_secs(5));
        c.restart(slot)?;
        let me = &*c;
        let back = wait_until(
            &format!("slot {slot} back on this build"),
            Duration::from_secs(30),
            || async move {
                let (Some(mine), Some(any)) = (me.status(slot).await, me.any_status().await) else {
                    return false;
                };
                mine.speaks_version == VERSION && mine.applied + 50 >= any.committed
            },
        )
        .await;
        if let Err(e) = back {
            problems.push(format!("slot {slot}: {e:#}"));
        }
    }
    let me = &*c;
    let raised = wait_until(
        "the cluster's version to rise",
        Duration::from_secs(20),
        || async move { me.any_status().await.is_some_and(|s| s.cluster_version == VERSION) },
    )
    .await;
    if let Err(e) = raised {
        problems.push(format!("{e:#}"));
    }
    Ok((
        format!("slots {order:?} restarted one at a time, from version {from} to {VERSION}"),
        problems,
    ))
}
