//! The faults, applied to the real cluster and healed again.
//!
//! | kind | what happens |
//! |---|---|
//! | `kill-leader`, `kill-follower` | SIGKILL, restarted from its data dir after the hold |
//! | `kill-all` | SIGKILL of every replica at once, all restarted |
//! | `restart-follower` | SIGTERM, restarted |
//! | `pause-leader`, `pause-follower` | SIGSTOP, then SIGCONT |
//! | `isolate` | one replica's veth down (machine cut off, clients too) |
//! | `isolate-leader` | the leader's veth down |
//! | `split` | replica links cut between a minority and a majority |
//! | `leader-minority` | the leader and a minority cut from the majority (5 replicas) |
//! | `one-way` | the leader's messages to one follower dropped; the follower's still arrive |
//! | `delay` | 50 to 250 ms on every replica link |
//! | `loss` | connections on every replica link reset with 2 % chance per chunk |
//! | `membership` | a replica joins (a spare slot) and then leaves, under load |
//! | `wipe-and-replace` | a follower's log wiped: its restart must be refused; then the documented replacement (leave, empty dir, join) |
//! | `backup-restore` | a backup taken under load is restored into a scratch cluster, which must hold what the file holds ([`crate::restore`]) |
//! | `rolling-upgrade` | every replica restarted one at a time, followers first, from the older release it acts as to this build ([`crate::upgrade`]) |
//! | `abuse` | a user sends oversized and malformed calls to every door: each refused with its 4xx, the term unchanged ([`crate::abuse`]) |

use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::Signal;

use crate::cluster::{wait_until, Cluster};
use crate::history::now_us;

/// The fault kinds, in the order a schedule cycles through them.
pub const KINDS: &[&str] = &[
    "kill-leader",
    "partition-split",
    "pause-leader",
    "kill-follower",
    "isolate",
    "pause-follower",
    "one-way",
    "delay",
    "isolate-leader",
    "restart-follower",
    "loss",
    "kill-all",
    "leader-minority",
    "membership",
    "wipe-and-replace",
    "abuse",
    "backup-restore",
    "rolling-upgrade",
];

/// The broad class of a kind: kill, pause, partition or other.
pub fn class(kind: &str) -> &'static str {
    match kind {
        k if k.starts_with("kill") || k.starts_with("restart") => "kill",
        k if k.starts_with("pause") => "pause",
        "isolate" | "isolate-leader" | "partition-split" | "leader-minority" | "one-way" => "partition",
        "delay" | "loss" => "link",
        "abuse" => "client",
        "backup-restore" | "rolling-upgrade" => "operator",
        _ => "membership",
    }
}

/// What was done, to undo it.
pub enum Applied {
    Restart(Vec<usize>),
    Resume(usize),
    Reconnect(usize),
    ClearLinks,
    /// Nothing left to heal (membership changes complete in `apply`).
    Nothing,
    /// Nothing to heal, and what the fault itself found wrong (the abuse
    /// burst checks its own answers).
    Checked(Vec<String>),
}

fn pick(slots: &[usize], rng: &mut u64) -> Option<usize> {
    if slots.is_empty() {
        return None;
    }
    Some(slots[(crate::workload::next(rng) as usize) % slots.len()])
}

/// Applies fault `kind`; returns a description and how to heal it.
pub async fn apply(c: &mut Cluster, kind: &str, members: usize, rng: &mut u64) -> anyhow::Result<(String, Applied)> {
    let leader = c.leader_slot().await;
    let running = c.running_slots();
    let followers: Vec<usize> = running.iter().copied().filter(|s| Some(*s) != leader).collect();
    let need_leader = || leader.context("no leader to fault right now");
    Ok(match kind {
        "kill-leader" | "kill-follower" => {
            let slot = if kind == "kill-leader" {
                need_leader()?
            } else {
                pick(&followers, rng).context("no follower")?
            };
            c.replicas[slot - 1].proc.kill();
            (format!("SIGKILL slot {slot}"), Applied::Restart(vec![slot]))
        }
        "kill-all" => {
            for s in &running {
                c.replicas[s - 1].proc.kill();
            }
            (format!("SIGKILL slots {running:?}"), Applied::Restart(running.clone()))
        }
        "restart-follower" => {
            let slot = pick(&followers, rng).context("no follower")?;
            c.replicas[slot - 1].proc.stop(Duration::from_secs(5));
            (format!("SIGTERM slot {slot}"), Applied::Restart(vec![slot]))
        }
        "pause-leader" | "pause-follower" => {
            let slot = if kind == "pause-leader" {
                need_leader()?
            } else {
                pick(&followers, rng).context("no follower")?
            };
            c.replicas[slot - 1].proc.signal(Signal::SIGSTOP);
            c.replicas[slot - 1].proc.paused = true;
            (format!("SIGSTOP slot {slot}"), Applied::Resume(slot))
        }
        "isolate" | "isolate-leader" => {
            let slot = if kind == "isolate-leader" {
                need_leader()?
            } else {
                pick(&running, rng).context("no replica")?
            };
            c.net.isolate(slot)?;
            (format!("slot {slot} cut off"), Applied::Reconnect(slot))
        }
        "partition-split" | "leader-minority" => {
            let mut minority: Vec<usize> = Vec::new();
            let size = (members - 1) / 2;
            if kind == "leader-minority" {
                minority.push(need_leader()?);
            }
            let mut pool: Vec<usize> = running.iter().copied().filter(|s| !minority.contains(s)).collect();
            while minority.len() < size.max(1) && !pool.is_empty() {
                let i = (crate::workload::next(rng) as usize) % pool.len();
                minority.push(pool.remove(i));
            }
            let majority: Vec<usize> = running.iter().copied().filter(|s| !minority.contains(s)).collect();
            c.board.set(|f| {
                for a in &minority {
                    for b in &majority {
                        f.cut.insert((*a, *b));
                        f.cut.insert((*b, *a));
                    }
                }
            });
            (
                format!("links cut between {minority:?} and {majority:?}"),
                Applied::ClearLinks,
            )
        }
        "one-way" => {
            let from = need_leader()?;
            let to = pick(&followers, rng).context("no follower")?;
            c.board.set(|f| {
                f.cut.insert((from, to));
            });
            (
                format!("slot {to} no longer hears slot {from} (but {from} hears {to})"),
                Applied::ClearLinks,
            )
        }
        "delay" => {
            let ms = 50 + crate::workload::next(rng) % 200;
            c.board.set(|f| {
                for a in &running {
                    for b in &running {
                        if a != b {
                            f.delay.insert((*a, *b), Duration::from_millis(ms));
                        }
                    }
                }
            });
            (format!("{ms} ms on every replica link"), Applied::ClearLinks)
        }
        "loss" => {
            c.board.set(|f| {
                for a in &running {
                    for b in &running {
                        if a != b {
                            f.loss.insert((*a, *b), 0.02);
                        }
                    }
                }
            });
            ("2 % resets on every replica link".into(), Applied::ClearLinks)
        }
        "membership" => {
            let spare = c
                .replicas
                .iter()
                .find(|r| r.proc.child.is_none() && !r.dir.exists())
                .map(|r| r.slot)
                .context("no spare slot")?;
            let peer = pick(&running, rng).context("no replica")?;
            c.join(spare, peer).await.context("join under load")?;
            let id = c.replicas[spare - 1].node_id().context("the joiner's id")?;
            let out = c.master_cli(
                None,
                &[
                    "leave",
                    "--id",
                    &id.to_string(),
                    "--peer",
                    &c.replicas[peer - 1].advertise.clone(),
                    "--token",
                    &c.token.clone(),
                ],
            )?;
            if !out.status.success() {
                bail!("leave: {}", String::from_utf8_lossy(&out.stderr));
            }
            // The removed replica stops by itself; its slot becomes spare again.
            let mut stopped = false;
            for _ in 0..100 {
                if !c.replicas[spare - 1].proc.alive() {
                    stopped = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !stopped {
                let view = c.status(spare).await;
                c.dump_stacks(
                    spare,
                    &format!("replica {id} did not stop by itself after leaving; its status: {view:#?}"),
                );
            }
            c.replicas[spare - 1].proc.kill();
            if !stopped {
                bail!("replica {id} did not stop by itself after leaving");
            }
            std::fs::remove_dir_all(&c.replicas[spare - 1].dir)?;
            (
                format!("replica {id} joined in slot {spare} through slot {peer}, then left"),
                Applied::Nothing,
            )
        }
        "wipe-and-replace" => {
            let slot = pick(&followers, rng).context("no follower")?;
            let old = c.replicas[slot - 1].node_id().context("the follower's id")?;
            c.replicas[slot - 1].proc.kill();
            let dir = c.replicas[slot - 1].dir.clone();
            std::fs::remove_dir_all(dir.join("log"))?;
            // A wiped replica must not come back.
            let out = c.master_cli(Some(slot), &["run", "--data-dir", &dir.display().to_string()])?;
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.success() || !err.contains("no Raft log") {
                bail!("a replica with a wiped log was not refused: {err}");
            }
            // The documented replacement: leave, empty data dir, join.
            let peer = c
                .leader_slot()
                .await
                .or_else(|| running.iter().copied().find(|s| *s != slot));
            let peer = peer.context("no replica to ask")?;
            let out = c.master_cli(
                None,
                &[
                    "leave",
                    "--id",
                    &old.to_string(),
                    "--peer",
                    &c.replicas[peer - 1].advertise.clone(),
                    "--token",
                    &c.token.clone(),
                ],
            )?;
            if !out.status.success() {
                bail!("leave of the wiped replica: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::fs::remove_dir_all(&dir)?;
            c.join(slot, peer).await.context("rejoin after wipe")?;
            let new = c.replicas[slot - 1].node_id().unwrap_or(0);
            (
                format!("slot {slot}: replica {old} wiped, refused to run, replaced by replica {new}"),
                Applied::Nothing,
            )
        }
        "abuse" => {
            let burst = crate::abuse::burst(c).await?;
            (
                format!(
                    "{} oversized and malformed calls, {} answered wrongly",
                    burst.calls,
                    burst.problems.len()
                ),
                Applied::Checked(burst.problems),
            )
        }
        "backup-restore" => {
            let slot = pick(&running, rng).context("no replica")?;
            let peer = c.replicas[slot - 1].advertise.clone();
            let work = c.dir.join(format!("drill-{}", stamp()));
            let problems = crate::restore::drill(c, &peer, &work).await;
            (
                format!(
                    "a backup through slot {slot} restored into a scratch cluster: {}",
                    if problems.is_empty() { "same state" } else { "PROBLEMS" }
                ),
                Applied::Checked(problems),
            )
        }
        "rolling-upgrade" => {
            let (detail, problems) = crate::upgrade::rolling(c).await?;
            (detail, Applied::Checked(problems))
        }
        other => bail!("unknown fault kind {other}"),
    })
}

/// Undoes a fault.
pub async fn heal(c: &mut Cluster, applied: Applied) -> anyhow::Result<()> {
    match applied {
        Applied::Restart(slots) => {
            for s in slots {
                c.restart(s)?;
            }
        }
        Applied::Resume(slot) => {
            c.replicas[slot - 1].proc.signal(Signal::SIGCONT);
            c.replicas[slot - 1].proc.paused = false;
        }
        Applied::Reconnect(slot) => c.net.reconnect(slot)?,
        Applied::ClearLinks => c.board.set(|f| *f = Default::default()),
        Applied::Nothing | Applied::Checked(_) => {}
    }
    Ok(())
}

/// Heals everything, whatever is left: every paused replica resumed,
/// every link cleared, every veth up, every member running.
pub async fn heal_all(c: &mut Cluster) -> anyhow::Result<()> {
    c.board.set(|f| *f = Default::default());
    for slot in 1..=c.replicas.len() {
        let _ = c.net.reconnect(slot);
        let r = &mut c.replicas[slot - 1];
        if r.proc.paused {
            r.proc.signal(Signal::SIGCONT);
            r.proc.paused = false;
        }
    }
    // Restart the members that are down (not replicas that were removed).
    let members: Vec<u64> = match c.any_status().await {
        Some(s) => s.members.iter().map(|m| m.id).collect(),
        None => c.replicas.iter().filter_map(|r| r.node_id()).collect(),
    };
    for slot in 1..=c.replicas.len() {
        let r = &mut c.replicas[slot - 1];
        let member = r.node_id().is_some_and(|id| members.contains(&id)) && r.dir.join("log").exists();
        if member && !r.proc.alive() {
            r.proc.kill();
            c.restart(slot)?;
        } else if !member && r.proc.child.is_some() {
            // A removed replica that has not noticed yet: it takes no part.
            r.proc.kill();
        }
    }
    wait_until("a leader after healing", Duration::from_secs(30), || async {
        c.leader_slot().await.is_some()
    })
    .await
}

/// Microseconds now (for fault events).
pub fn stamp() -> u64 {
    now_us()
}
