//! Answering node polls at the edge: 304s and held watches without a replica.
//!
//! Nearly every poll a node makes is a revalidation (`If-None-Match` with
//! the ETag `"COMPUTER-REVISION"` of the document it has) answered 304, and
//! a node's watch is such a poll held open with `X-Slap-Wait` until its
//! document changes. The gateway follows the leader's revision feed (the
//! native `WatchRevisions`): every computer's current revision, each change
//! as it is applied, and a confirmation about every half second that the
//! leader still leads and has applied everything committed. While
//! confirmations keep coming, the gateway answers such a poll itself:
//!
//! - 304 when the ETag names the revision it knows, without moving or
//!   building the document;
//! - 200 with the document when it has it for the current revision (a
//!   bounded cache, filled from replicas' answers: a document at a given
//!   revision never changes);
//! - a held poll is held here, not by a replica (no upstream connection per
//!   watch), and sent on to a replica as soon as the feed says the document
//!   moved, or when the feed is lost (with what remains of the hold).
//!
//! Staleness bound: a 304 answered here may miss a change acknowledged less
//! than `--edge-staleness-ms` before it (plus the feed's one-way delay).
//! Without a confirmation for that long, the gateway forwards every poll
//! until a new feed confirms. It never answers 304 for a revision older
//! than one the feed told it of.
//!
//! Authorization stays the replicas': the gateway answers a caller (a
//! certificate's fingerprint) for a computer only after a replica answered
//! that caller's poll of that computer, and forgets all such pairs when the
//! feed says a certificate that may read documents was revoked.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use slap_proto::master::master_client::MasterClient;
use slap_proto::master::WatchRevisionsRequest;
use tokio::sync::Notify;

use crate::discovery::Discovery;

/// Caller-computer pairs remembered at most (a fleet has one per node).
const AUTHORIZED_MAX: usize = 1 << 20;
/// Computers whose document was answered once, remembered at most.
const ANSWERED_ONCE_MAX: usize = 1 << 20;

/// What the gateway knows of the Master's computer revisions.
pub struct Edge {
    staleness: Duration,
    known: RwLock<Known>,
    /// (caller, computer) pairs a replica answered a poll for.
    authorized: Mutex<HashSet<(String, String)>>,
    /// Held watches by computer, woken when its revision moves.
    watchers: Mutex<HashMap<String, Weak<Notify>>>,
    /// Rings when the feed is lost: held watches go to a replica.
    lost: Notify,
    /// Rings when a feed confirms again after it was lost.
    regained: Notify,
    documents: Mutex<Documents>,
    pub counters: EdgeCounters,
}

/// Computer documents as replicas answered them, by computer, within a
/// budget of bytes; the oldest kept goes first. A document is kept the
/// second time a replica answers it (the same revision): one poll of a
/// computer nobody polls again (a node's first poll before its watch)
/// should not push out the documents polled over and over.
#[derive(Default)]
struct Documents {
    by_computer: HashMap<String, Document>,
    /// The revision of each computer's last document answered, not kept.
    answered_once: HashMap<String, u64>,
    order: VecDeque<(String, u64)>,
    bytes: usize,
    budget: usize,
}

/// A computer's document at one revision.
#[derive(Clone)]
pub struct Document {
    pub revision: u64,
    pub content_type: Option<axum::http::HeaderValue>,
    pub body: Bytes,
}

impl Documents {
    /// Whether a replica's answer for `computer` at `revision`, `size`
    /// bytes, is to be kept: the second one at that revision, within the
    /// budget. The first is only remembered (and streamed through).
    fn admit(&mut self, computer: &str, revision: u64, size: usize) -> bool {
        // One document may take at most a quarter of the budget.
        if size > self.budget / 4 {
            return false;
        }
        if self.by_computer.get(computer).is_some_and(|d| d.revision >= revision) {
            return false;
        }
        if self.answered_once.get(computer) != Some(&revision) {
            if self.answered_once.len() >= ANSWERED_ONCE_MAX {
                self.answered_once.clear();
            }
            self.answered_once.insert(computer.to_string(), revision);
            return false;
        }
        true
    }

    /// Keeps a document [`admit`](Self::admit) let in.
    fn keep(&mut self, computer: &str, document: Document) {
        let size = document.body.len();
        if size > self.budget / 4
            || self
                .by_computer
                .get(computer)
                .is_some_and(|d| d.revision >= document.revision)
        {
            return;
        }
        self.answered_once.remove(computer);
        while self.bytes + size > self.budget {
            let Some((c, revision)) = self.order.pop_front() else {
                break;
            };
            if self.by_computer.get(&c).is_some_and(|d| d.revision == revision) {
                self.bytes -= self.by_computer.remove(&c).map_or(0, |d| d.body.len());
            }
        }
        self.order.push_back((computer.to_string(), document.revision));
        if let Some(old) = self.by_computer.insert(computer.to_string(), document) {
            self.bytes -= old.body.len();
        }
        self.bytes += size;
        // Entries replaced by a newer revision leave stale keys behind.
        if self.order.len() > 2 * self.by_computer.len() + 64 {
            let by_computer = &self.by_computer;
            self.order
                .retain(|(c, r)| by_computer.get(c).is_some_and(|d| d.revision == *r));
        }
    }
}

#[derive(Default)]
struct Known {
    revisions: HashMap<String, u64>,
    /// Until when the last confirmation vouches for `revisions`.
    live_until: Option<Instant>,
    revocations: u64,
}

impl Known {
    fn live(&self) -> bool {
        self.live_until.is_some_and(|until| Instant::now() < until)
    }
}

#[derive(Default)]
pub struct EdgeCounters {
    /// Polls answered 304 here.
    pub not_modified: AtomicU64,
    /// Watches held here right now.
    pub holding: AtomicU64,
    /// Times the feed was lost (ended, or confirmations stopped).
    pub feed_losses: AtomicU64,
    /// Polls answered 200 here, from the document cache.
    pub documents_served: AtomicU64,
}

/// A poll this gateway may answer itself.
pub struct Unchanged {
    pub computer: String,
    pub revision: u64,
}

/// How a watch held here ended.
pub enum HoldEnd {
    /// The hold ran out with the document unchanged: answer 304.
    Unchanged,
    /// The document moved: forward the poll (a replica answers 200).
    Moved,
    /// The feed was lost: forward the poll with what remains of the hold.
    FeedLost(Duration),
}

impl Edge {
    /// `staleness`: how old the last confirmation may be; `cache_bytes`:
    /// the documents kept (0: none).
    pub fn new(staleness: Duration, cache_bytes: usize) -> Arc<Edge> {
        Arc::new(Edge {
            staleness,
            known: RwLock::default(),
            authorized: Mutex::default(),
            watchers: Mutex::default(),
            lost: Notify::new(),
            regained: Notify::new(),
            documents: Mutex::new(Documents {
                budget: cache_bytes,
                ..Documents::default()
            }),
            counters: EdgeCounters::default(),
        })
    }

    /// The revision of `computer` the live feed vouches for.
    pub fn current_revision(&self, computer: &str) -> Option<u64> {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        known.live().then(|| known.revisions.get(computer).copied()).flatten()
    }

    /// The current revision of `computer`, when this gateway may answer
    /// `caller`'s poll of it: the feed is live and a replica answered this
    /// caller for this computer before.
    fn answerable(&self, caller: &str, computer: &str) -> Option<u64> {
        let revision = {
            let known = self.known.read().unwrap_or_else(|e| e.into_inner());
            if !known.live() {
                return None;
            }
            *known.revisions.get(computer)?
        };
        let pair = (caller.to_string(), computer.to_string());
        self.authorized
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&pair)
            .then_some(revision)
    }

    /// The document of `computer` at its current revision, if kept and
    /// `caller` may be answered here.
    pub fn document(&self, caller: &str, computer: &str) -> Option<Document> {
        let current = self.answerable(caller, computer)?;
        let documents = self.documents.lock().unwrap_or_else(|e| e.into_inner());
        let document = documents.by_computer.get(computer).filter(|d| d.revision == current)?;
        self.counters.documents_served.fetch_add(1, Ordering::Relaxed);
        Some(document.clone())
    }

    /// Whether to keep the document a replica is answering for `computer`
    /// at `revision` (its ETag's), of `bytes`: only then is it buffered.
    pub fn admit(&self, computer: &str, revision: u64, bytes: usize) -> bool {
        self.documents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(computer, revision, bytes)
    }

    /// Keeps a document a replica answered, once [`admit`](Self::admit)ted.
    pub fn keep(&self, computer: &str, document: Document) {
        self.documents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keep(computer, document);
    }

    /// Whether the last confirmation is recent enough to answer from.
    pub fn live(&self) -> bool {
        self.known.read().unwrap_or_else(|e| e.into_inner()).live()
    }

    /// `Some` when `caller`'s poll of `computer` with `if_none_match` may be
    /// answered here: the feed is live, a replica answered this caller for
    /// this computer before, and the ETag names the current revision.
    pub fn unchanged(&self, caller: &str, computer: &str, if_none_match: &str) -> Option<Unchanged> {
        let revision = slap_proto::limits::parse_document_etag(if_none_match, computer)?;
        (self.answerable(caller, computer)? == revision).then(|| Unchanged {
            computer: computer.to_string(),
            revision,
        })
    }

    /// Remembers that a replica answered `caller`'s poll of `computer`.
    pub fn authorize(&self, caller: &str, computer: &str) {
        let mut authorized = self.authorized.lock().unwrap_or_else(|e| e.into_inner());
        if authorized.len() >= AUTHORIZED_MAX {
            authorized.clear();
        }
        authorized.insert((caller.to_string(), computer.to_string()));
    }

    /// Holds a watch of `poll.computer` for up to `hold`.
    pub async fn hold(&self, poll: &Unchanged, hold: Duration) -> HoldEnd {
        let deadline = tokio::time::Instant::now() + hold;
        let moved = self.subscribe(&poll.computer);
        self.counters.holding.fetch_add(1, Ordering::Relaxed);
        // Since when the feed has been lost, while holding.
        let mut lost_since: Option<tokio::time::Instant> = None;
        let end = loop {
            let (changed, lost, regained) = (moved.notified(), self.lost.notified(), self.regained.notified());
            tokio::pin!(changed, lost, regained);
            changed.as_mut().enable();
            lost.as_mut().enable();
            regained.as_mut().enable();
            // Looked at after enabling all three, so no wake-up is missed.
            let (live, current) = {
                let known = self.known.read().unwrap_or_else(|e| e.into_inner());
                (known.live(), known.revisions.get(&poll.computer).copied())
            };
            let now = tokio::time::Instant::now();
            let wait_until = if live {
                lost_since = None;
                if current != Some(poll.revision) {
                    break HoldEnd::Moved;
                }
                deadline
            } else {
                // A leader change loses the feed for about a second: wait
                // for the next leader's (what a 304 may miss stays within
                // the staleness bound) rather than send every held watch
                // to the replicas at once; then forward.
                let since = *lost_since.get_or_insert(now);
                let give_up = (since + self.staleness).min(deadline);
                if now >= give_up {
                    break HoldEnd::FeedLost(deadline.saturating_duration_since(now));
                }
                give_up
            };
            tokio::select! {
                _ = changed => {}
                _ = lost => {}
                _ = regained => {}
                _ = tokio::time::sleep_until(wait_until) => if live { break HoldEnd::Unchanged },
            }
        };
        self.counters.holding.fetch_sub(1, Ordering::Relaxed);
        end
    }

    fn subscribe(&self, computer: &str) -> Arc<Notify> {
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = watchers.get(computer).and_then(Weak::upgrade) {
            return n;
        }
        // Forget computers nobody watches any more, now and then.
        if watchers.len() > 64 && watchers.len().is_power_of_two() {
            watchers.retain(|_, n| n.strong_count() > 0);
        }
        let n = Arc::new(Notify::new());
        watchers.insert(computer.to_string(), Arc::downgrade(&n));
        n
    }

    /// Takes in one message of the feed (`first`: the whole list).
    fn take(&self, feed: slap_proto::master::RevisionFeed, first: bool, received: Instant) {
        let mut moved = Vec::new();
        let mut regained = false;
        {
            let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
            if first {
                known.revisions.clear();
            }
            for c in feed.changed {
                let old = known.revisions.insert(c.computer_id.clone(), c.revision);
                if old.is_some_and(|old| old != c.revision) {
                    moved.push(c.computer_id);
                }
            }
            if known.revocations != feed.revocations {
                known.revocations = feed.revocations;
                self.authorized.lock().unwrap_or_else(|e| e.into_inner()).clear();
            }
            if feed.confirmed {
                regained = !known.live();
                known.live_until = Some(received + self.staleness);
            }
        }
        if regained {
            self.regained.notify_waiters();
        }
        if !moved.is_empty() {
            let watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
            for c in &moved {
                if let Some(n) = watchers.get(c).and_then(Weak::upgrade) {
                    n.notify_waiters();
                }
            }
        }
    }

    /// Stops answering here until a new feed confirms.
    fn lose(&self, reason: &str) {
        let was_live = {
            let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
            known.live_until.take().is_some()
        };
        if was_live {
            self.counters.feed_losses.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%reason, "revision feed lost: forwarding every poll until it is back");
        }
        self.lost.notify_waiters();
    }

    /// Follows the leader's feed until the process ends.
    pub async fn follow(self: Arc<Self>, discovery: Arc<Discovery>) {
        let mut pause = Duration::from_millis(100);
        loop {
            let reason = match discovery.leader() {
                None => "no leader known".to_string(),
                Some(leader) => match self.follow_one(&discovery, &leader).await {
                    Ok(()) => {
                        pause = Duration::from_millis(100);
                        format!("the feed from {leader} ended")
                    }
                    Err(e) => format!("{leader}: {e}"),
                },
            };
            self.lose(&reason);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    /// Reads one leader's feed; `Ok` once it delivered and then ended.
    async fn follow_one(&self, discovery: &Discovery, leader: &str) -> Result<(), String> {
        let channel = discovery
            .channel(leader)
            .ok_or_else(|| "cannot make a channel".to_string())?;
        let mut client = MasterClient::new(channel);
        let mut feed = tokio::time::timeout(self.staleness, client.watch_revisions(WatchRevisionsRequest {}))
            .await
            .map_err(|_| "the feed did not start in time".to_string())?
            .map_err(|e| e.message().to_string())?
            .into_inner();
        let mut first = true;
        // A confirmation must come within the staleness bound, or the feed
        // is as good as lost (a leader cut off from its quorum keeps its
        // connections open but confirms nothing).
        let mut confirm_by = tokio::time::Instant::now() + self.staleness;
        loop {
            let message = tokio::time::timeout_at(confirm_by, feed.message())
                .await
                .map_err(|_| "no confirmation within the staleness bound".to_string())?
                .map_err(|e| e.message().to_string())?;
            let Some(message) = message else {
                return if first {
                    Err("the feed ended at once".into())
                } else {
                    Ok(())
                };
            };
            let received = Instant::now();
            if message.confirmed {
                confirm_by = tokio::time::Instant::now() + self.staleness;
            }
            self.take(message, first, received);
            first = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slap_proto::master::{RevisedComputer, RevisionFeed};

    fn document(revision: u64, body: &str) -> Document {
        Document {
            revision,
            content_type: None,
            body: Bytes::from(body.to_string()),
        }
    }

    /// A replica answered `document` (kept if admitted).
    fn answered(edge: &Edge, computer: &str, document: Document) {
        if edge.admit(computer, document.revision, document.body.len()) {
            edge.keep(computer, document);
        }
    }

    /// A replica answered the same document twice: kept.
    fn keep_twice(edge: &Edge, computer: &str, document: Document) {
        answered(edge, computer, document.clone());
        answered(edge, computer, document);
    }

    #[test]
    fn documents_are_served_for_the_current_revision_only_within_the_budget() {
        let edge = Edge::new(Duration::from_secs(2), 40);
        edge.take(feed(&[("COMP-1", 5), ("COMP-2", 7)], true, 0), true, Instant::now());
        answered(&edge, "COMP-1", document(5, "doc 1 at 5"));
        edge.authorize("", "COMP-1");
        assert!(edge.document("", "COMP-1").is_none(), "answered once: not kept yet");
        answered(&edge, "COMP-1", document(5, "doc 1 at 5"));
        assert!(
            edge.document("bob", "COMP-1").is_none(),
            "the caller was never answered by a replica"
        );
        edge.authorize("", "COMP-2");
        assert_eq!(
            edge.document("", "COMP-1").map(|d| d.body),
            Some(Bytes::from("doc 1 at 5"))
        );
        keep_twice(&edge, "COMP-1", document(4, "doc 1 at 4"));
        assert_eq!(
            edge.document("", "COMP-1").map(|d| d.revision),
            Some(5),
            "never an older one"
        );
        // The feed moves COMP-1 on: the kept document is not served.
        edge.take(feed(&[("COMP-1", 6)], false, 0), false, Instant::now());
        assert!(edge.document("", "COMP-1").is_none());
        keep_twice(&edge, "COMP-1", document(6, "doc 1 at 6"));
        keep_twice(&edge, "COMP-2", document(7, "doc 2 at 7"));
        assert!(edge.document("", "COMP-1").is_some() && edge.document("", "COMP-2").is_some());
        // Over the budget (40 bytes), the oldest kept goes first.
        for c in ["COMP-3", "COMP-4", "COMP-5"] {
            edge.take(feed(&[(c, 1)], false, 0), false, Instant::now());
            edge.authorize("", c);
            keep_twice(&edge, c, document(1, "0123456789"));
        }
        assert!(edge.document("", "COMP-1").is_none(), "evicted");
        for c in ["COMP-2", "COMP-3", "COMP-4", "COMP-5"] {
            assert!(edge.document("", c).is_some(), "{c} kept");
        }
        keep_twice(&edge, "COMP-2", document(8, &"x".repeat(11)));
        assert_eq!(
            edge.document("", "COMP-2").map(|d| d.revision),
            Some(7),
            "over a quarter of the budget"
        );
        let documents = edge.documents.lock().unwrap();
        assert_eq!(
            documents.bytes,
            documents.by_computer.values().map(|d| d.body.len()).sum::<usize>()
        );
    }

    fn feed(changed: &[(&str, u64)], confirmed: bool, revocations: u64) -> RevisionFeed {
        RevisionFeed {
            changed: changed
                .iter()
                .map(|(c, r)| RevisedComputer {
                    computer_id: c.to_string(),
                    revision: *r,
                })
                .collect(),
            confirmed,
            revocations,
        }
    }

    #[test]
    fn answers_only_what_a_live_confirmed_feed_vouches_for_to_authorized_callers() {
        let edge = Edge::new(Duration::from_secs(2), 0);
        let now = Instant::now();
        edge.take(feed(&[("COMP-1", 5), ("COMP-2", 7)], false, 0), true, now);
        edge.authorize("alice", "COMP-1");
        assert!(
            edge.unchanged("alice", "COMP-1", "\"COMP-1-5\"").is_none(),
            "not confirmed yet"
        );
        edge.take(feed(&[], true, 0), false, now);
        assert_eq!(
            edge.unchanged("alice", "COMP-1", "\"COMP-1-5\"").map(|u| u.revision),
            Some(5)
        );
        assert!(
            edge.unchanged("alice", "COMP-1", "\"COMP-1-4\"").is_none(),
            "an older revision"
        );
        assert!(
            edge.unchanged("bob", "COMP-1", "\"COMP-1-5\"").is_none(),
            "never answered by a replica"
        );
        assert!(
            edge.unchanged("alice", "COMP-2", "\"COMP-2-7\"").is_none(),
            "another computer"
        );
        // A change the feed told of: never a 304 for the old revision.
        edge.take(feed(&[("COMP-1", 9)], false, 0), false, now);
        assert!(edge.unchanged("alice", "COMP-1", "\"COMP-1-5\"").is_none());
        assert!(edge.unchanged("alice", "COMP-1", "\"COMP-1-9\"").is_some());
        // A revoked poller: every remembered pair is forgotten.
        edge.take(feed(&[], true, 1), false, now);
        assert!(edge.unchanged("alice", "COMP-1", "\"COMP-1-9\"").is_none());
    }

    #[test]
    fn a_feed_that_stops_confirming_or_is_lost_answers_nothing() {
        let edge = Edge::new(Duration::from_millis(50), 0);
        edge.take(feed(&[("COMP-1", 5)], true, 0), true, Instant::now());
        edge.authorize("", "COMP-1");
        assert!(edge.unchanged("", "COMP-1", "\"COMP-1-5\"").is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(edge.unchanged("", "COMP-1", "\"COMP-1-5\"").is_none(), "stale");
        edge.take(feed(&[], true, 0), false, Instant::now());
        assert!(edge.unchanged("", "COMP-1", "\"COMP-1-5\"").is_some());
        edge.lose("test");
        assert!(edge.unchanged("", "COMP-1", "\"COMP-1-5\"").is_none(), "lost");
    }

    #[tokio::test]
    async fn a_held_watch_ends_when_its_document_moves_or_the_feed_is_lost() {
        let edge = Edge::new(Duration::from_secs(5), 0);
        edge.take(feed(&[("COMP-1", 5), ("COMP-2", 3)], true, 0), true, Instant::now());
        edge.authorize("", "COMP-1");
        let poll = edge.unchanged("", "COMP-1", "\"COMP-1-5\"").expect("answerable");
        // Unchanged: the hold runs out.
        let started = Instant::now();
        assert!(matches!(
            edge.hold(&poll, Duration::from_millis(50)).await,
            HoldEnd::Unchanged
        ));
        assert!(started.elapsed() >= Duration::from_millis(50));
        // Another computer moving does not end it; this one moving does.
        let held = edge.hold(&poll, Duration::from_secs(5));
        let moves = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            edge.take(feed(&[("COMP-2", 4)], false, 0), false, Instant::now());
            tokio::time::sleep(Duration::from_millis(20)).await;
            edge.take(feed(&[("COMP-1", 6)], false, 0), false, Instant::now());
        };
        let (end, ()) = tokio::join!(held, moves);
        assert!(matches!(end, HoldEnd::Moved));
        assert_eq!(edge.counters.holding.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_held_watch_waits_out_a_short_feed_loss_and_is_forwarded_after_a_long_one() {
        let edge = Edge::new(Duration::from_millis(300), 0);
        edge.take(feed(&[("COMP-1", 6)], true, 0), true, Instant::now());
        edge.authorize("", "COMP-1");
        let poll = edge.unchanged("", "COMP-1", "\"COMP-1-6\"").expect("answerable");
        // Lost, and back within the staleness bound (a leader change): held.
        let held = edge.hold(&poll, Duration::from_millis(200));
        let blip = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            edge.lose("test");
            tokio::time::sleep(Duration::from_millis(50)).await;
            edge.take(feed(&[], true, 0), false, Instant::now());
        };
        let (end, ()) = tokio::join!(held, blip);
        assert!(matches!(end, HoldEnd::Unchanged), "held through a short loss");
        // Lost for longer than the bound: forwarded with what remains.
        edge.take(feed(&[], true, 0), false, Instant::now());
        let started = Instant::now();
        let held = edge.hold(&poll, Duration::from_secs(5));
        let loses = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            edge.lose("test");
        };
        let (end, ()) = tokio::join!(held, loses);
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "waited for the feed first"
        );
        match end {
            HoldEnd::FeedLost(left) => {
                assert!(
                    left > Duration::from_millis(4_500) && left < Duration::from_secs(5),
                    "{left:?}"
                )
            }
            _ => panic!("the feed was lost"),
        }
    }
}
