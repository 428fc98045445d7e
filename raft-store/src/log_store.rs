//! The Raft log and its metadata on RocksDB.
//!
//! Two column families in one database under `<data dir>/log`:
//! - `log`: entry index (big-endian) -> entry;
//! - `meta`: `vote`, `committed`, `last_purged` and the store's `format`.
//!
//! Durability: a vote is written with a synced WAL before `save_vote` returns.
//! An append is written to RocksDB at once (so it is readable when `append`
//! returns, as openraft requires) but is acknowledged only after a WAL sync.
//! The syncs are done by one thread that takes every acknowledgement waiting
//! at that moment and covers them with a single `fsync`: appends that arrive
//! while a sync is in flight share the next one (group commit). Truncation and
//! purge are synced too; they are rare and must not come back after a crash.
//!
//! Reads: openraft reads every entry back soon after appending it (to send
//! it to each follower, and to apply it once committed). The newest entries
//! are kept in memory (`RecentEntries`, bounded by their encoded size), so
//! those reads are clones instead of RocksDB reads and decodes; older ones
//! (a follower far behind, a restart) come from RocksDB.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use openraft::alias::{LogIdOf, VoteOf};
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use crate::codec::{self, log_key};
use crate::error::StoreError;
use crate::StoreTypes;

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_FORMAT: &[u8] = b"format";

/// Something to run once the appends written before it are durable.
type OnDurable = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Counters for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Entries appended.
    pub entries: AtomicU64,
    /// Encoded bytes of the entries appended (what the log grew by).
    pub bytes: AtomicU64,
    /// Append calls (each one a RocksDB write).
    pub appends: AtomicU64,
    /// WAL syncs done by the group-commit thread.
    pub syncs: AtomicU64,
}

/// The newest appended entries, contiguous, with their encoded sizes.
struct RecentEntries<E> {
    entries: VecDeque<(u64, E, usize)>,
    bytes: usize,
}

/// At most this many encoded bytes of recent entries are kept in memory.
const RECENT_BYTES: usize = 32 << 20;

impl<E: Clone> RecentEntries<E> {
    fn new() -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Adds an appended entry. Appends continue the log; anything else (an
    /// overwrite after a conflict, a gap) restarts the window from it.
    fn push(&mut self, index: u64, entry: E, size: usize) {
        if self.entries.back().is_some_and(|(last, _, _)| last + 1 != index) {
            self.entries.clear();
            self.bytes = 0;
        }
        self.entries.push_back((index, entry, size));
        self.bytes += size;
        while self.bytes > RECENT_BYTES && self.entries.len() > 1 {
            if let Some((_, _, s)) = self.entries.pop_front() {
                self.bytes -= s;
            }
        }
    }

    /// Forgets entries from `index` on (a truncation).
    fn truncate_from(&mut self, index: u64) {
        while self.entries.back().is_some_and(|(i, _, _)| *i >= index) {
            if let Some((_, _, s)) = self.entries.pop_back() {
                self.bytes -= s;
            }
        }
    }

    /// Forgets entries up to `index` (a purge).
    fn purge_upto(&mut self, index: u64) {
        while self.entries.front().is_some_and(|(i, _, _)| *i <= index) {
            if let Some((_, _, s)) = self.entries.pop_front() {
                self.bytes -= s;
            }
        }
    }

    /// The entries `[start, end)`, if every one of them is here.
    fn get(&self, start: u64, end: u64) -> Option<Vec<E>> {
        let first = self.entries.front()?.0;
        let last = self.entries.back()?.0;
        if start < first || end > last + 1 || start > end {
            return None;
        }
        let (from, to) = ((start - first) as usize, (end - first) as usize);
        Some(self.entries.range(from..to).map(|(_, e, _)| e.clone()).collect())
    }
}

struct LogDb<C: StoreTypes> {
    db: Arc<DB>,
    /// The newest entries, for openraft's reads right after appending.
    recent: Mutex<RecentEntries<C::Entry>>,
    /// The saved vote: openraft reads it before and after every batch of
    /// entries it replicates (to check leadership did not move meanwhile),
    /// so it is served from memory, not decoded from RocksDB each time.
    vote: Mutex<Option<VoteOf<C>>>,
    path: PathBuf,
    /// Appends waiting for the next sync; `None` once shutting down.
    sync_tx: Option<mpsc::Sender<OnDurable>>,
    syncer: Option<JoinHandle<()>>,
    stats: Arc<LogStats>,
}

impl<C: StoreTypes> Drop for LogDb<C> {
    fn drop(&mut self) {
        // Closing the channel ends the sync thread after it has served every
        // waiting append; joining it releases its handle on the database so a
        // restart in the same process can open the directory again.
        self.sync_tx.take();
        if let Some(handle) = self.syncer.take() {
            let _ = handle.join();
        }
    }
}

/// openraft's log storage (and log reader) on RocksDB. Cheap to clone: clones
/// share one database.
pub struct LogStore<C: StoreTypes> {
    inner: Arc<LogDb<C>>,
    _types: std::marker::PhantomData<C>,
}

impl<C: StoreTypes> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            _types: std::marker::PhantomData,
        }
    }
}

impl<C: StoreTypes> LogStore<C> {
    /// Opens (or creates) the log under `dir`, checks every record and that
    /// the log has no holes.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_paranoid_checks(true);
        // Entries live until the next snapshot lets them go (seconds to
        // minutes): compressing them when memtables are flushed costs CPU
        // on every write for disk space that is soon freed.
        let mut log_opts = Options::default();
        log_opts.set_compression_type(rocksdb::DBCompressionType::None);
        let cfs = [
            ColumnFamilyDescriptor::new(CF_LOG, log_opts),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| StoreError::rocks(dir, "open", e))?;
        let db = Arc::new(db);

        let (tx, rx) = mpsc::channel::<OnDurable>();
        let stats = Arc::new(LogStats::default());
        let syncer = {
            let db = db.clone();
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("raft-log-sync".into())
                .spawn(move || sync_loop(&db, &rx, &stats))
                .map_err(|e| StoreError::io(dir, "start sync thread for", dir, e))?
        };
        let store = Self {
            inner: Arc::new(LogDb {
                db,
                recent: Mutex::new(RecentEntries::new()),
                vote: Mutex::new(None),
                path: dir.to_path_buf(),
                sync_tx: Some(tx),
                syncer: Some(syncer),
                stats,
            }),
            _types: std::marker::PhantomData,
        };
        store.check_format()?;
        let vote = store.verify()?;
        *store.inner.vote.lock().unwrap_or_else(|e| e.into_inner()) = vote;
        Ok(store)
    }

    /// Append and sync counters.
    pub fn stats(&self) -> Arc<LogStats> {
        self.inner.stats.clone()
    }

    /// Writes `entries` (readable at once) and calls `on_durable` after the
    /// WAL sync that covers them. This is `append` without openraft's callback
    /// type, for tools and benchmarks that drive the store directly.
    pub fn append_with<I>(
        &self,
        entries: I,
        on_durable: impl FnOnce(io::Result<()>) + Send + 'static,
    ) -> Result<(), StoreError>
    where
        I: IntoIterator<Item = C::Entry>,
    {
        let cf = self.cf(CF_LOG);
        let mut batch = WriteBatch::default();
        let mut appended = Vec::new();
        for entry in entries {
            let index = entry.log_id.index;
            let encoded = codec::encode(&entry);
            batch.put_cf(cf, log_key(index), &encoded);
            appended.push((index, entry, encoded.len()));
        }
        let n = appended.len() as u64;
        let bytes: usize = appended.iter().map(|(_, _, size)| size).sum();
        let db = &self.inner.db;
        db.write_opt(batch, &WriteOptions::default())
            .map_err(|e| StoreError::rocks(&self.inner.path, "append", e))?;
        {
            let mut recent = self.recent();
            for (index, entry, size) in appended {
                recent.push(index, entry, size);
            }
        }
        self.inner.stats.entries.fetch_add(n, Ordering::Relaxed);
        self.inner.stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.inner.stats.appends.fetch_add(1, Ordering::Relaxed);
        match self.inner.sync_tx.as_ref() {
            Some(tx) if tx.send(Box::new(on_durable)).is_ok() => {}
            // Only possible while the store is being dropped.
            _ => {
                return Err(StoreError::io(
                    &self.inner.path,
                    "sync",
                    &self.inner.path,
                    io::Error::other("log store is closing"),
                ))
            }
        }
        Ok(())
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, RecentEntries<C::Entry>> {
        self.inner.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // Both families are created at open; their absence would be a bug here.
        self.inner.db.cf_handle(name).expect("column family created at open")
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        let raw = self
            .inner
            .db
            .get_pinned_cf(self.cf(CF_META), key)
            .map_err(|e| StoreError::rocks(&self.inner.path, "read", e))?;
        raw.map(|v| codec::decode(&self.inner.path, CF_META, key, &v))
            .transpose()
    }

    fn put_meta_synced<T: serde::Serialize>(&self, key: &[u8], value: &T) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), key, codec::encode(value));
        self.write_synced(batch)
    }

    fn write_synced(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.inner
            .db
            .write_opt(batch, &opts)
            .map_err(|e| StoreError::rocks(&self.inner.path, "write", e))
    }

    /// A new store records its format; an existing one must carry ours.
    fn check_format(&self) -> Result<(), StoreError> {
        match self.get_meta::<u32>(KEY_FORMAT)? {
            Some(_) => Ok(()), // the version byte was already checked by decode
            None => self.put_meta_synced(KEY_FORMAT, &u32::from(codec::FORMAT_VERSION)),
        }
    }

    /// Reads every record once: metadata and entries decode, entries are
    /// contiguous and lie after the purged point. Returns the saved vote.
    fn verify(&self) -> Result<Option<VoteOf<C>>, StoreError> {
        let vote: Option<VoteOf<C>> = self.get_meta(KEY_VOTE)?;
        let _committed: Option<LogIdOf<C>> = self.get_meta(KEY_COMMITTED)?;
        let purged: Option<LogIdOf<C>> = self.get_meta(KEY_LAST_PURGED)?;
        let path = &self.inner.path;
        let mut expected: Option<u64> = None;
        for item in self.inner.db.iterator_cf(self.cf(CF_LOG), IteratorMode::Start) {
            let (key, value) = item.map_err(|e| StoreError::rocks(path, "scan log", e))?;
            let index = codec::log_index(path, CF_LOG, &key)?;
            let entry: C::Entry = codec::decode(path, CF_LOG, &key, &value)?;
            if entry.log_id.index != index {
                return Err(StoreError::Corrupt {
                    store: path.clone(),
                    cf: CF_LOG,
                    key: codec::show_key(&key),
                    reason: format!("holds the entry of index {}", entry.log_id.index),
                });
            }
            if let Some(p) = &purged {
                if index <= p.index {
                    return Err(StoreError::Corrupt {
                        store: path.clone(),
                        cf: CF_LOG,
                        key: codec::show_key(&key),
                        reason: format!("entry survives the purge up to {}", p.index),
                    });
                }
            }
            match expected {
                Some(e) if e != index => {
                    return Err(StoreError::LogHole {
                        store: path.clone(),
                        expected: e,
                        found: index,
                    })
                }
                _ => expected = Some(index + 1),
            }
        }
        Ok(vote)
    }

    fn last_entry_id(&self) -> Result<Option<LogIdOf<C>>, StoreError> {
        let path = &self.inner.path;
        let mut it = self.inner.db.iterator_cf(self.cf(CF_LOG), IteratorMode::End);
        match it.next() {
            None => Ok(None),
            Some(item) => {
                let (key, value) = item.map_err(|e| StoreError::rocks(path, "read log", e))?;
                let entry: C::Entry = codec::decode(path, CF_LOG, &key, &value)?;
                Ok(Some(entry.log_id))
            }
        }
    }

    /// Entries with index in `range`, in order.
    pub fn read_entries<RB: RangeBounds<u64>>(&self, range: RB) -> Result<Vec<C::Entry>, StoreError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        if let Some(entries) = self.recent().get(start, end) {
            return Ok(entries);
        }
        let path = &self.inner.path;
        let key = log_key(start);
        let mut out = Vec::new();
        for item in self
            .inner
            .db
            .iterator_cf(self.cf(CF_LOG), IteratorMode::From(&key, Direction::Forward))
        {
            let (key, value) = item.map_err(|e| StoreError::rocks(path, "read log", e))?;
            let index = codec::log_index(path, CF_LOG, &key)?;
            if !range.contains(&index) {
                break;
            }
            out.push(codec::decode(path, CF_LOG, &key, &value)?);
        }
        Ok(out)
    }

    /// Deletes entries from `index` on, synced.
    pub fn truncate_from(&self, index: u64) -> Result<(), StoreError> {
        self.recent().truncate_from(index);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_LOG), log_key(index), log_key(u64::MAX));
        batch.delete_cf(self.cf(CF_LOG), log_key(u64::MAX));
        self.write_synced(batch)
    }

    /// Records `log_id` as purged and deletes entries up to it, in one synced batch.
    pub fn purge_upto(&self, log_id: &LogIdOf<C>) -> Result<(), StoreError> {
        self.recent().purge_upto(log_id.index);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), KEY_LAST_PURGED, codec::encode(log_id));
        batch.delete_range_cf(self.cf(CF_LOG), log_key(0), log_key(log_id.index.saturating_add(1)));
        self.write_synced(batch)
    }

    /// The last purged and last present log ids.
    pub fn log_state(&self) -> Result<LogState<C>, StoreError> {
        let last_purged_log_id: Option<LogIdOf<C>> = self.get_meta(KEY_LAST_PURGED)?;
        let last_log_id = self.last_entry_id()?.or_else(|| last_purged_log_id.clone());
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    /// Saves the vote with a synced write.
    pub fn write_vote(&self, vote: &VoteOf<C>) -> Result<(), StoreError> {
        // Held across the write, so readers never see a vote that is not
        // on disk, nor an older one after a newer was saved.
        let mut saved = self.inner.vote.lock().unwrap_or_else(|e| e.into_inner());
        self.put_meta_synced(KEY_VOTE, vote)?;
        *saved = Some(vote.clone());
        Ok(())
    }

    /// The last committed log id openraft saved (a hint; may trail the real one).
    pub fn committed(&self) -> Result<Option<LogIdOf<C>>, StoreError> {
        self.get_meta(KEY_COMMITTED)
    }

    /// The saved vote.
    pub fn vote(&self) -> Option<VoteOf<C>> {
        self.inner.vote.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Longest time a sync waits for more appends to join it.
const COMMIT_DELAY: std::time::Duration = std::time::Duration::from_micros(150);

/// The group-commit loop: wait for one pending append, take all others that
/// are pending too, sync the WAL once, acknowledge them all.
///
/// A writer that hands over its entries one at a time (a follower receiving
/// a stream of small appends, or a leader proposing each write as it comes)
/// would otherwise get one fsync per entry whenever each sync finishes
/// before the next append arrives. So, as
/// PostgreSQL's `commit_delay` does, when appends kept arriving during the
/// previous sync (the sign of concurrent writers), the next sync first waits
/// up to [`COMMIT_DELAY`] for more to join it. An idle or single writer never
/// waits.
fn sync_loop(db: &DB, rx: &mpsc::Receiver<OnDurable>, stats: &LogStats) {
    // An append that arrived during the previous sync, taken to learn that
    // writers are busy; it opens the next round.
    let mut carried: Option<OnDurable> = None;
    loop {
        let busy = carried.is_some();
        let first = match carried.take() {
            Some(f) => f,
            None => match rx.recv() {
                Ok(f) => f,
                Err(_) => return,
            },
        };
        let mut waiting = vec![first];
        if busy {
            let deadline = std::time::Instant::now() + COMMIT_DELAY;
            while let Ok(more) = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
                waiting.push(more);
            }
        }
        waiting.extend(rx.try_iter());
        let result = db.flush_wal(true);
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        // Looked at before acknowledging: an append that our own
        // acknowledgement triggers (a lone writer's next one) is not a sign
        // of concurrent writers and must not be delayed.
        carried = rx.try_recv().ok();
        for on_durable in waiting {
            on_durable(result.as_ref().map(|_| ()).map_err(|e| io::Error::other(e.to_string())));
        }
    }
}

impl<C: StoreTypes> RaftLogReader<C> for LogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, io::Error> {
        Ok(self.read_entries(range)?)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        Ok(self.vote())
    }
}

impl<C: StoreTypes> RaftLogStorage<C> for LogStore<C> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        Ok(self.log_state()?)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        Ok(self.write_vote(vote)?)
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        // Not synced: openraft treats the committed index as a hint that saves
        // re-applying; the next append's sync makes it durable anyway.
        let cf = self.cf(CF_META);
        let result = match committed {
            Some(c) => self.inner.db.put_cf(cf, KEY_COMMITTED, codec::encode(&c)),
            None => self.inner.db.delete_cf(cf, KEY_COMMITTED),
        };
        Ok(result.map_err(|e| StoreError::rocks(&self.inner.path, "save committed", e))?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        Ok(self.committed()?)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = C::Entry> + Send,
        I::IntoIter: Send,
    {
        Ok(self.append_with(entries, move |result| callback.io_completed(result))?)
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        Ok(self.truncate_from(from)?)
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        Ok(self.purge_upto(&log_id)?)
    }
}

#[cfg(test)]
mod tests {
    use super::RecentEntries;

    fn window(indexes: impl IntoIterator<Item = u64>) -> RecentEntries<u64> {
        let mut w = RecentEntries::new();
        for i in indexes {
            w.push(i, i * 10, 1);
        }
        w
    }

    #[test]
    fn serves_only_ranges_it_holds_whole() {
        let w = window(5..10);
        assert_eq!(w.get(5, 10), Some(vec![50, 60, 70, 80, 90]));
        assert_eq!(w.get(7, 8), Some(vec![70]));
        assert_eq!(w.get(4, 6), None, "entry 4 is not in memory");
        assert_eq!(w.get(9, 11), None, "entry 10 does not exist");
        assert_eq!(RecentEntries::<u64>::new().get(0, 1), None);
    }

    #[test]
    fn a_gap_or_overwrite_restarts_the_window() {
        let mut w = window(1..4);
        w.push(7, 70, 1);
        assert_eq!(w.get(1, 2), None);
        assert_eq!(w.get(7, 8), Some(vec![70]));
    }

    #[test]
    fn truncate_and_purge_forget_entries() {
        let mut w = window(1..10);
        w.truncate_from(6);
        assert_eq!(w.get(5, 7), None, "6 was truncated");
        w.push(6, 600, 1);
        assert_eq!(w.get(5, 7), Some(vec![50, 600]), "the new 6, not the old one");
        w.purge_upto(3);
        assert_eq!(w.get(3, 5), None);
        assert_eq!(w.get(4, 7), Some(vec![40, 50, 600]));
    }

    #[test]
    fn stays_within_its_byte_bound() {
        let mut w = RecentEntries::new();
        let big = super::RECENT_BYTES / 4 + 1;
        for i in 0..8u64 {
            w.push(i, i, big);
        }
        assert!(w.bytes <= super::RECENT_BYTES);
        assert_eq!(w.get(7, 8), Some(vec![7]));
        assert_eq!(w.get(0, 1), None, "the oldest were dropped");
    }
}
