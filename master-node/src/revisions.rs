//! Waiting for a computer's document to change.
//!
//! Every node holds a watch of its computer (the native `WatchComputer`
//! stream, or SLAP's held poll with `X-Slap-Wait`). When each watcher was
//! its own task woken by every applied entry, ten thousand nodes meant ten
//! thousand wake-ups and state lookups per entry: the largest cost of the
//! leader in the fleet simulator (a third of its CPU in notify, scheduling
//! and key comparisons). Here one task follows the applied entries, asks
//! the state which documents changed since it last looked (the state keeps
//! computers by revision), and wakes the watchers of those computers only.
//!
//! Must not import: `replica` or anything above it (the replica owns this).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};

use openraft::rt::WatchReceiver;
use tokio::sync::Notify;

use crate::raft::Raft;
use crate::state::Master;

/// Who waits for which computer.
#[derive(Default)]
pub struct Revisions {
    waiting: Mutex<HashMap<String, Weak<Notify>>>,
}

impl Revisions {
    /// Starts the task that wakes watchers as entries are applied.
    pub fn start(raft: &Raft, state: Arc<RwLock<Master>>) -> Arc<Revisions> {
        let revisions = Arc::new(Revisions::default());
        let mut applied = raft.metrics();
        let weak = Arc::downgrade(&revisions);
        tokio::spawn(async move {
            let mut seen = state.read().unwrap_or_else(|e| e.into_inner()).applied;
            while applied.changed().await.is_ok() {
                let Some(revisions) = weak.upgrade() else { return };
                let changed: Vec<String> = {
                    let state = state.read().unwrap_or_else(|e| e.into_inner());
                    let changed = state
                        .computers_revised_after(seen)
                        .map(|(rev, id)| {
                            seen = seen.max(*rev);
                            id.clone()
                        })
                        .collect();
                    changed
                };
                if !changed.is_empty() {
                    revisions.wake(&changed);
                }
            }
        });
        revisions
    }

    /// What wakes when `computer`'s document changes: create the
    /// `notified()` future (and `enable` it) before reading the revision,
    /// so a change between the two is not missed. Keep it while waiting.
    pub fn subscribe(&self, computer: &str) -> Arc<Notify> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = waiting.get(computer).and_then(Weak::upgrade) {
            return n;
        }
        // Forget computers nobody waits for any more, now and then.
        if waiting.len() > 64 && waiting.len().is_power_of_two() {
            waiting.retain(|_, n| n.strong_count() > 0);
        }
        let n = Arc::new(Notify::new());
        waiting.insert(computer.to_string(), Arc::downgrade(&n));
        n
    }

    fn wake(&self, computers: &[String]) {
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        for c in computers {
            if let Some(n) = waiting.get(c).and_then(Weak::upgrade) {
                n.notify_waiters();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_changed_computers_watchers_wake() {
        let revisions = Revisions::default();
        let (one, two) = (revisions.subscribe("COMP-1"), revisions.subscribe("COMP-2"));
        assert!(
            Arc::ptr_eq(&one, &revisions.subscribe("COMP-1")),
            "watchers of a computer share one"
        );
        let (woken_one, woken_two) = (one.notified(), two.notified());
        tokio::pin!(woken_one, woken_two);
        woken_one.as_mut().enable();
        woken_two.as_mut().enable();
        revisions.wake(&["COMP-1".to_string()]);
        let timeout = std::time::Duration::from_millis(50);
        assert!(tokio::time::timeout(timeout, woken_one).await.is_ok());
        assert!(
            tokio::time::timeout(timeout, woken_two).await.is_err(),
            "COMP-2 did not change"
        );
    }
}
