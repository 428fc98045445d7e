//! What bringing a replica back costs at the fleet's size: a follower
//! killed with SIGKILL and restarted from its data dir, and a new replica
//! joining the loaded cluster (a snapshot transfer and install, then the
//! log since). Both happen while the fleet keeps polling.
//!
//! A replica *serves again* once it answers, knows the leader and has
//! applied every entry the leader had committed when the replica was killed
//! (or, for a join, when the join began): from then on it holds all it
//! should and can answer follower reads. The join is timed to that point
//! too (openraft promotes a learner to voter only once it is close to the
//! leader's log).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::cluster::Cluster;

/// How long a restart or a join may take before the run gives up on it.
const PATIENCE: Duration = Duration::from_secs(600);

/// A replica brought back, timed from the moment its process started.
#[derive(Serialize, Debug, Clone)]
pub struct Comeback {
    /// The slot (replica) that came back.
    pub slot: usize,
    /// Until its cluster port answered a status call.
    pub seconds_answering: f64,
    /// Until it had applied the leader's committed index of the start.
    pub seconds_caught_up: f64,
    /// That index.
    pub caught_up_to: u64,
    /// Its resident memory once caught up (MiB).
    pub rss_mib: f64,
}

/// A follower of `c`, killed (SIGKILL) and restarted; the leader stays.
pub async fn restart_follower(c: &mut Cluster) -> anyhow::Result<Comeback> {
    let leader = leader(c).await?;
    let slot = c
        .replicas
        .iter()
        .find(|r| r.slot != leader && r.proc.child.is_some())
        .map(|r| r.slot)
        .context("no follower to restart")?;
    let target = committed(c, leader).await?;
    c.replicas[slot - 1].proc.kill();
    tracing::info!(slot, target, "follower killed; restarting it");
    let started = Instant::now();
    c.restart(slot)?;
    wait_serving(c, slot, target, started).await
}

/// A new replica in the spare `slot`, joining through the leader.
pub async fn join_new(c: &mut Cluster, slot: usize) -> anyhow::Result<Comeback> {
    let leader = leader(c).await?;
    let target = committed(c, leader).await?;
    tracing::info!(slot, target, "a new replica joins");
    let started = Instant::now();
    c.join_within(slot, leader, PATIENCE).await?;
    wait_serving(c, slot, target, started).await
}

/// The slot of the leader, waiting up to a minute for one: a loaded
/// cluster may be between two leaders, or its leader too busy to answer a
/// status call in time (the first 1M-partition run gave up at once).
async fn leader(c: &Cluster) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(slot) = c.leader_slot().await {
            return Ok(slot);
        }
        anyhow::ensure!(Instant::now() < deadline, "no leader answered within a minute");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The leader's committed index now.
async fn committed(c: &Cluster, leader: usize) -> anyhow::Result<u64> {
    for _ in 0..20 {
        if let Some(status) = c.status(leader).await {
            return Ok(status.committed);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("the leader (slot {leader}) did not answer a status call for 10 s")
}

async fn wait_serving(c: &Cluster, slot: usize, target: u64, started: Instant) -> anyhow::Result<Comeback> {
    let mut answering = None;
    loop {
        if let Some(s) = c.status(slot).await {
            answering.get_or_insert_with(|| started.elapsed().as_secs_f64());
            if s.leader_id.is_some() && s.applied >= target {
                let seconds_caught_up = started.elapsed().as_secs_f64();
                tracing::info!(slot, seconds_caught_up, applied = s.applied, "replica serves again");
                let pid = c.replicas[slot - 1].proc.child.as_ref().map(|p| p.id());
                let rss = pid.and_then(super::usage_of).map(|u| u.0).unwrap_or(0);
                return Ok(Comeback {
                    slot,
                    seconds_answering: answering.unwrap_or(seconds_caught_up),
                    seconds_caught_up,
                    caught_up_to: target,
                    rss_mib: rss as f64 / (1 << 20) as f64,
                });
            }
        }
        anyhow::ensure!(
            started.elapsed() < PATIENCE,
            "slot {slot} did not catch up to index {target} within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The largest snapshot file any replica holds (bytes), or 0 when none was
/// built (a log shorter than the snapshot interval).
pub fn largest_snapshot(c: &Cluster) -> u64 {
    c.replicas
        .iter()
        .map(|r| largest_file(&r.dir.join("snapshots")))
        .max()
        .unwrap_or(0)
}

fn largest_file(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => largest_file(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .max()
        .unwrap_or(0)
}

/// Waits (up to two minutes) until every running replica has applied the
/// same index, then compares their state digests: the applied index they
/// agree on, or an error naming the replicas that differ.
pub async fn converged(c: &mut Cluster) -> anyhow::Result<u64> {
    let slots = c.running_slots();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut digests = Vec::new();
        for &s in &slots {
            digests.push((s, c.state_digest(s, Duration::from_secs(60)).await?));
        }
        let indexes: std::collections::BTreeSet<Option<u64>> =
            digests.iter().map(|(_, d)| d.as_ref().map(|d| d.0)).collect();
        if indexes.len() == 1 {
            if let Some(Some(index)) = indexes.into_iter().next() {
                let shas: std::collections::BTreeSet<&String> =
                    digests.iter().filter_map(|(_, d)| d.as_ref().map(|d| &d.1)).collect();
                anyhow::ensure!(
                    shas.len() == 1,
                    "replicas applied index {index} but their states differ: {digests:?}"
                );
                return Ok(index);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the replicas did not reach one applied index within 2 minutes: {digests:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
