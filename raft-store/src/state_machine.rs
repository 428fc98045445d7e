//! The state machine side: the application's trait, and openraft's
//! `RaftStateMachine` on RocksDB around it.
//!
//! The application keeps whatever in-memory form it likes and remembers which
//! of its records changed. Every [`WRITE_EVERY`] (and before a snapshot, and
//! when the store is dropped) the store asks it for those records as they
//! stand and writes them with the last applied log id and the membership in
//! one RocksDB batch, so the records on disk always match the applied id. A
//! record changed by many commands in between (a client's session, the
//! counters, an instance re-requested again and again) is written once.
//!
//! Layout under `<data dir>`:
//! - `state/CURRENT` names the live generation; `state/<n>` is a RocksDB with
//!   the families `state` (application records) and `state_meta` (applied id,
//!   membership, format). A snapshot is installed by building generation n+1
//!   in `state/tmp-<n+1>`, syncing it, renaming it and then switching
//!   `CURRENT` (written to a temporary file, synced, renamed): a crash at any
//!   point leaves either the old or the new state, never a mix.
//! - `snapshots/<id>.snap`: the latest snapshot file; older ones are removed.
//!
//! The state is written without RocksDB's write-ahead log, and not after
//! every entry: the Raft log is the state's log. After a crash openraft
//! re-applies, from the log, the committed entries past the applied id the
//! state kept. Before a snapshot is taken (after which the log may be
//! purged) everything applied is written and the state's memtables are
//! flushed, so nothing the snapshot covers is only in memory.

use std::fs;
use std::io::{self, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use openraft::alias::{LogIdOf, SnapshotOf, StoredMembershipOf};
use openraft::storage::{ApplyResponder, EntryResponder, RaftStateMachine, Snapshot};
use openraft::{EntryPayload, RaftSnapshotBuilder, RaftTypeConfig, SnapshotMeta, StoredMembership};
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use crate::codec;
use crate::error::StoreError;
use crate::snapshot::{self, Meta, SnapshotReader, SnapshotWriter};
use crate::StoreTypes;

pub(crate) const CF_STATE: &str = "state";
const CF_STATE_META: &str = "state_meta";
const KEY_APPLIED: &[u8] = b"last_applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const KEY_FORMAT: &[u8] = b"format";
/// Records per RocksDB batch while installing a snapshot.
const INSTALL_BATCH: usize = 4096;
/// How far the restore's scan of the state reads ahead in its table files.
const RESTORE_READAHEAD: usize = 4 << 20;
/// Most committed entries applied under one lock (what the stream has ready).
const APPLY_CHUNK: usize = 1024;
/// How long applied changes may wait in memory before they are written to
/// the state DB. Longer gathers more rewrites of the same records into one;
/// what waits is re-applied from the log after a crash.
pub const WRITE_EVERY: Duration = Duration::from_millis(100);
/// While the state is written, its memtables are flushed to table files at
/// least this often: what a crash loses, and the log re-applies at the next
/// start, stays a few seconds of writes.
const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// The application's deterministic state machine.
///
/// `apply` must depend only on the current state, the log id and the command:
/// no clock, no randomness, no I/O. Every replica applies the same log and so
/// must reach the same state and give the same answers.
pub trait StateMachine<C: RaftTypeConfig>: Send + Sync + Sized + 'static {
    /// Applies one committed command, remembers which records it changed,
    /// and returns the answer for the client that proposed it. The command
    /// is handed over by value, so the application can keep what it carries
    /// instead of copying it.
    ///
    /// An error means the entry cannot be applied at all (an application
    /// that carries its commands encoded found bytes it cannot read): the
    /// store stops applying, and openraft stops the replica, rather than let
    /// it answer differently from the others. A command the application
    /// merely refuses is an answer, not an error.
    fn apply(&mut self, log_id: &LogIdOf<C>, command: C::D) -> Result<C::R, ApplyError>;

    /// Puts in `writes` every record changed since the last call, as it
    /// stands now (a value, or a deletion), and forgets them. The store
    /// calls it when it writes the state, not after every command.
    fn changed_records(&mut self, writes: &mut Writes);

    /// Builds the state from its stored records, given in key order. Called at
    /// start-up and after a snapshot is installed.
    fn restore(records: &mut dyn Iterator<Item = (Vec<u8>, Vec<u8>)>) -> Result<Self, RestoreError>;
}

/// Why a committed entry cannot be applied (see [`StateMachine::apply`]).
#[derive(Debug)]
pub struct ApplyError {
    /// What is wrong with the entry.
    pub reason: String,
}

/// A record the application could not read back.
#[derive(Debug)]
pub struct RestoreError {
    /// The record's key.
    pub key: Vec<u8>,
    /// What is wrong with it.
    pub reason: String,
}

/// Record changes, written together with the applied id.
#[derive(Debug, Default)]
pub struct Writes {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// A value being encoded for [`Writes::put_buffer`]: it already holds the
/// store's format byte, so the encoded value is written as it is, without
/// another copy. Encoders that take an `Extend<u8>` (postcard's
/// `to_extend`) write into it directly.
#[derive(Debug)]
pub struct ValueBuffer(Vec<u8>);

impl Extend<u8> for ValueBuffer {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        self.0.extend(bytes)
    }
}

impl<'a> Extend<&'a u8> for ValueBuffer {
    fn extend<I: IntoIterator<Item = &'a u8>>(&mut self, bytes: I) {
        self.0.extend(bytes)
    }
}

impl Writes {
    /// An empty set of changes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: &[u8]) {
        self.ops.push((key.into(), Some(codec::wrap_raw(value))));
    }

    /// A buffer to encode a value into, with room for `hint` bytes.
    pub fn buffer(&self, hint: usize) -> ValueBuffer {
        let mut bytes = Vec::with_capacity(hint + 1);
        bytes.push(codec::FORMAT_VERSION);
        ValueBuffer(bytes)
    }

    /// Sets `key` to the value encoded in `value` (from [`Writes::buffer`]).
    pub fn put_buffer(&mut self, key: impl Into<Vec<u8>>, value: ValueBuffer) {
        self.ops.push((key.into(), Some(value.0)));
    }

    /// Removes `key`.
    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), None));
    }

    /// The changes in order: a value, or `None` for a deletion.
    pub fn ops(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.ops
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_deref().map(|v| &v[1..])))
    }
}

/// What is applied, and since when part of it is only in memory.
struct Progress<C: RaftTypeConfig> {
    /// The last applied log id and membership (in memory; the state DB may
    /// hold an older pair, with the records that match it).
    applied: Applied<C>,
    /// When the first entry not yet written to the state DB was applied.
    unwritten_since: Option<Instant>,
    /// When the state's memtables were last flushed (or the store opened).
    flushed_at: Instant,
}

struct Shared<C: StoreTypes, A: StateMachine<C>> {
    /// The data dir, named in errors.
    root: PathBuf,
    state_dir: PathBuf,
    snap_dir: PathBuf,
    db: RwLock<Arc<DB>>,
    generation: Mutex<u64>,
    app: Arc<RwLock<A>>,
    /// Taken before `app` by whatever applies or writes the state, so the
    /// records written and the applied id written with them always match.
    progress: Mutex<Progress<C>>,
    current: Mutex<Option<Meta<C>>>,
    /// Makes temporary names unique within this process.
    seq: AtomicU64,
    /// Files handed to openraft to receive snapshots; removed after an install.
    receiving: Mutex<Vec<PathBuf>>,
}

/// openraft's state machine storage around the application `A`. Cheap to
/// clone; clones share everything.
pub struct StateMachineStore<C: StoreTypes, A: StateMachine<C>> {
    shared: Arc<Shared<C, A>>,
}

impl<C: StoreTypes, A: StateMachine<C>> Clone for StateMachineStore<C, A> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// Write options for the state: no write-ahead log (see
/// [`StateMachineStore::apply_entries`]).
fn unlogged() -> WriteOptions {
    let mut opts = WriteOptions::default();
    opts.disable_wal(true);
    opts
}

fn open_state_db(store: &Path, dir: &Path) -> Result<DB, StoreError> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_paranoid_checks(true);
    // Written without a WAL: both families are flushed together, so a
    // crash leaves records and applied id from the same batch.
    opts.set_atomic_flush(true);
    // What a crash loses (and the log re-applies at start) is what is not in
    // table files yet: bounded in time by FLUSH_EVERY, not by the memtable.
    let cfs = [CF_STATE, CF_STATE_META].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| StoreError::rocks(store, "open state", e))
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).expect("column family created at open")
}

fn meta_get<T: serde::de::DeserializeOwned>(store: &Path, db: &DB, key: &[u8]) -> Result<Option<T>, StoreError> {
    let raw = db
        .get_pinned_cf(cf(db, CF_STATE_META), key)
        .map_err(|e| StoreError::rocks(store, "read state", e))?;
    raw.map(|v| codec::decode(store, CF_STATE_META, key, &v)).transpose()
}

type Applied<C> = (Option<LogIdOf<C>>, StoredMembershipOf<C>);

fn read_applied<C: RaftTypeConfig>(store: &Path, db: &DB) -> Result<Applied<C>, StoreError> {
    let applied = meta_get(store, db, KEY_APPLIED)?.flatten();
    let membership = meta_get(store, db, KEY_MEMBERSHIP)?.unwrap_or_default();
    Ok((applied, membership))
}

/// Builds the application from every record of `db`. A store error met while
/// scanning ends the scan and is returned in place of the application's.
fn restore_app<C: RaftTypeConfig, A: StateMachine<C>>(store: &Path, db: &DB) -> Result<A, StoreError> {
    // One pass over every table file: read ahead, and keep the blocks out of
    // the cache that serves the replica afterwards. The raw iterator lends
    // each record, copied once into what the application takes.
    let mut read = rocksdb::ReadOptions::default();
    read.fill_cache(false);
    read.set_readahead_size(RESTORE_READAHEAD);
    let mut scan = db.raw_iterator_cf_opt(cf(db, CF_STATE), read);
    scan.seek_to_first();
    let mut failure: Option<StoreError> = None;
    let mut records = std::iter::from_fn(|| {
        let record = match (scan.key(), scan.value()) {
            (Some(k), Some(v)) => codec::unwrap_raw(store, CF_STATE, k, v).map(|v| (k.to_vec(), v.to_vec())),
            _ => match scan.status() {
                Ok(()) => return None,
                Err(e) => Err(StoreError::rocks(store, "scan state", e)),
            },
        };
        match record {
            Ok(kv) => {
                scan.next();
                Some(kv)
            }
            Err(e) => {
                failure = Some(e);
                None
            }
        }
    });
    let app = A::restore(&mut records);
    if let Some(e) = failure {
        return Err(e);
    }
    app.map_err(|e| StoreError::Corrupt {
        store: store.to_path_buf(),
        cf: CF_STATE,
        key: codec::show_key(&e.key),
        reason: e.reason,
    })
}

fn io_err(store: &Path, op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let (store, path) = (store.to_path_buf(), path.to_path_buf());
    move |e| StoreError::io(&store, op, &path, e)
}

/// The live generation `state/CURRENT` names, if there is one yet.
fn read_current(store: &Path, state_dir: &Path) -> Result<Option<u64>, StoreError> {
    let current_file = state_dir.join("CURRENT");
    match fs::read_to_string(&current_file) {
        Ok(text) => text.trim().parse::<u64>().map(Some).map_err(|_| StoreError::Corrupt {
            store: store.to_path_buf(),
            cf: "state",
            key: "CURRENT".into(),
            reason: format!("{text:?} is not a generation number"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(store, "read", &current_file, e)),
    }
}

/// The membership the state under `root` last applied, read without
/// restoring the application (for tools working on a stopped replica).
pub fn applied_membership<C: RaftTypeConfig>(root: &Path) -> Result<StoredMembershipOf<C>, StoreError> {
    let state_dir = root.join("state");
    let Some(generation) = read_current(root, &state_dir)? else {
        return Ok(StoredMembership::default());
    };
    let db = DB::open_cf_for_read_only(
        &Options::default(),
        state_dir.join(generation.to_string()),
        [CF_STATE, CF_STATE_META],
        false,
    )
    .map_err(|e| StoreError::rocks(root, "open state", e))?;
    Ok(read_applied::<C>(root, &db)?.1)
}

/// Writes `state/CURRENT` atomically.
fn write_current(store: &Path, state_dir: &Path, generation: u64) -> Result<(), StoreError> {
    let tmp = state_dir.join("CURRENT.tmp");
    let current = state_dir.join("CURRENT");
    fs::write(&tmp, format!("{generation}\n")).map_err(io_err(store, "write", &tmp))?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(store, "sync", &tmp))?;
    fs::rename(&tmp, &current).map_err(io_err(store, "rename", &tmp))?;
    snapshot::sync_dir(store, state_dir)
}

fn remove_path(store: &Path, path: &Path) -> Result<(), StoreError> {
    let result = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::io(store, "remove", path, e)),
        _ => Ok(()),
    }
}

impl<C: StoreTypes, A: StateMachine<C>> StateMachineStore<C, A> {
    /// Opens (or creates) the state under `root`, cleans up what an
    /// interrupted snapshot install left, and restores the application.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let state_dir = root.join("state");
        let snap_dir = root.join("snapshots");
        for d in [&state_dir, &snap_dir] {
            fs::create_dir_all(d).map_err(io_err(root, "create", d))?;
        }
        let generation = match read_current(root, &state_dir)? {
            Some(g) => g,
            None => {
                open_state_db(root, &state_dir.join("1"))?;
                write_current(root, &state_dir, 1)?;
                1
            }
        };
        // Anything but CURRENT and the live generation is left over from an
        // install that did not finish or an old generation not yet removed.
        for entry in fs::read_dir(&state_dir).map_err(io_err(root, "list", &state_dir))? {
            let entry = entry.map_err(io_err(root, "list", &state_dir))?;
            let name = entry.file_name();
            if name != "CURRENT" && name.to_string_lossy() != generation.to_string() {
                remove_path(root, &entry.path())?;
            }
        }
        let db = open_state_db(root, &state_dir.join(generation.to_string()))?;
        match meta_get::<u32>(root, &db, KEY_FORMAT)? {
            Some(_) => {}
            None => db
                .put_cf(
                    cf(&db, CF_STATE_META),
                    KEY_FORMAT,
                    codec::encode(&u32::from(codec::FORMAT_VERSION)),
                )
                .map_err(|e| StoreError::rocks(root, "write state", e))?,
        }
        let (applied, membership) = read_applied::<C>(root, &db)?;
        let restoring = Instant::now();
        let app = restore_app::<C, A>(root, &db)?;
        tracing::info!(
            store = %root.display(),
            applied = applied.as_ref().map(|id| id.index()),
            seconds = restoring.elapsed().as_secs_f64(),
            "state restored from disk"
        );
        let current = Self::pick_snapshot(root, &snap_dir, applied.clone())?;
        Ok(Self {
            shared: Arc::new(Shared {
                root: root.to_path_buf(),
                state_dir,
                snap_dir,
                db: RwLock::new(Arc::new(db)),
                generation: Mutex::new(generation),
                app: Arc::new(RwLock::new(app)),
                progress: Mutex::new(Progress {
                    applied: (applied, membership),
                    unwritten_since: None,
                    flushed_at: Instant::now(),
                }),
                current: Mutex::new(current),
                seq: AtomicU64::new(0),
                receiving: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Creates the state of a new store under `root` from the application's
    /// `records` (as [`StateMachine::restore`] takes them), as if a snapshot
    /// at `meta` had been installed: the records with the applied id and
    /// membership, and the snapshot file a leader sends to replicas that
    /// join later. The application is not built here: the replica builds it
    /// from these records when it opens the store. `root` must hold no
    /// state yet.
    pub fn seed(
        root: &Path,
        meta: &Meta<C>,
        records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        if root.join("state").join("CURRENT").exists() {
            return Err(StoreError::Refused {
                store: root.to_path_buf(),
                reason: "it already holds a state; only a new data dir can be seeded".into(),
            });
        }
        let store = Self::open(root)?;
        let mut records = records.into_iter();
        // The empty first generation stays behind: the next open removes it.
        let (_, tmp_snap) = store.write_generation(meta, || {
            Ok(records.next().map(|(k, v)| {
                let v = codec::wrap_raw(&v);
                (k, v)
            }))
        })?;
        store.publish_snapshot(&tmp_snap, meta)
    }

    /// Keeps the newest snapshot not ahead of the applied state; removes the
    /// rest (partial files and snapshots whose install never switched over).
    fn pick_snapshot(root: &Path, snap_dir: &Path, applied: Option<LogIdOf<C>>) -> Result<Option<Meta<C>>, StoreError> {
        let mut best: Option<(Meta<C>, PathBuf)> = None;
        for entry in fs::read_dir(snap_dir).map_err(io_err(root, "list", snap_dir))? {
            let path = entry.map_err(io_err(root, "list", snap_dir))?.path();
            let usable = path.extension().is_some_and(|e| e == "snap");
            let meta = if usable {
                snapshot::read_meta::<C>(root, &path).ok()
            } else {
                None
            };
            match meta {
                Some(m) if m.last_log_id <= applied => {
                    if best.as_ref().is_none_or(|(b, _)| m.last_log_id > b.last_log_id) {
                        if let Some((_, old)) = best.replace((m, path)) {
                            remove_path(root, &old)?;
                        }
                    } else {
                        remove_path(root, &path)?;
                    }
                }
                _ => remove_path(root, &path)?,
            }
        }
        Ok(best.map(|(m, _)| m))
    }

    /// The application state, for reads. Writers are only the store itself.
    pub fn app(&self) -> Arc<RwLock<A>> {
        self.shared.app.clone()
    }

    fn db(&self) -> Arc<DB> {
        self.shared.db.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn snap_path(&self, meta: &Meta<C>) -> PathBuf {
        self.shared.snap_dir.join(snapshot::file_name::<C>(meta))
    }

    /// A new file to receive a snapshot sent by the leader into; hand it,
    /// written and with its metadata, to openraft
    /// (`Raft::install_full_snapshot`). Files received are removed once a
    /// snapshot is installed, and at the next start if none was.
    pub async fn receive_snapshot(&self) -> Result<tokio::fs::File, StoreError> {
        let seq = self.shared.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.shared.snap_dir.join(format!("receiving-{seq}.part"));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(|e| StoreError::io(&self.shared.root, "create", &path, e))?;
        self.shared
            .receiving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path);
        Ok(file)
    }

    /// Applies entries; writes what changed when the oldest unwritten change
    /// is [`WRITE_EVERY`] old or the membership changed. Returns the answers.
    ///
    /// The state is written without RocksDB's write-ahead log: the Raft log
    /// already holds every applied entry, and after a crash openraft
    /// re-applies the committed entries past the applied id found on disk.
    /// Atomic flush keeps the records and the applied id of one batch
    /// together on disk, so that applied id always matches the records.
    pub fn apply_entries(&self, entries: impl IntoIterator<Item = C::Entry>) -> Result<Vec<C::R>, StoreError> {
        let answered = self.apply_tagged(entries.into_iter().map(|e| (e, ())))?;
        Ok(answered.into_iter().map(|((), reply)| reply).collect())
    }

    /// [`Self::apply_entries`] for entries that each carry a tag (who waits
    /// for the answer); returns every tag with its entry's answer, to be
    /// handed out once the state's locks are released.
    fn apply_tagged<T>(&self, entries: impl IntoIterator<Item = (C::Entry, T)>) -> Result<Vec<(T, C::R)>, StoreError> {
        let root = &self.shared.root;
        let mut progress = self.shared.progress.lock().unwrap_or_else(|e| e.into_inner());
        let mut answered = Vec::new();
        let mut membership_changed = false;
        {
            let mut app = self.shared.app.write().unwrap_or_else(|e| e.into_inner());
            for (entry, tag) in entries {
                let log_id = entry.log_id;
                match entry.payload {
                    EntryPayload::Blank => answered.push((tag, C::R::default())),
                    EntryPayload::Normal(command) => {
                        let reply = app.apply(&log_id, command).map_err(|e| StoreError::Unapplicable {
                            store: root.clone(),
                            index: log_id.index,
                            reason: e.reason,
                        })?;
                        answered.push((tag, reply));
                    }
                    EntryPayload::Membership(m) => {
                        progress.applied.1 = StoredMembership::new(Some(log_id.clone()), m);
                        membership_changed = true;
                        answered.push((tag, C::R::default()));
                    }
                }
                progress.applied.0 = Some(log_id);
                progress.unwritten_since.get_or_insert_with(Instant::now);
            }
        }
        let due = progress.unwritten_since.is_some_and(|t| t.elapsed() >= WRITE_EVERY);
        if due || membership_changed {
            self.write_unwritten(&mut progress)?;
        }
        Ok(answered)
    }

    /// Writes every applied change not yet in the state DB, with the applied
    /// id and membership, in one batch. The caller holds `progress`.
    fn write_unwritten(&self, progress: &mut Progress<C>) -> Result<(), StoreError> {
        if progress.unwritten_since.is_none() {
            return Ok(());
        }
        let db = self.db();
        write_changes(&db, &self.shared.app, &progress.applied)
            .map_err(|e| StoreError::rocks(&self.shared.root, "apply", e))?;
        progress.unwritten_since = None;
        if progress.flushed_at.elapsed() >= FLUSH_EVERY {
            // In the background: applying goes on meanwhile.
            let mut opts = rocksdb::FlushOptions::default();
            opts.set_wait(false);
            db.flush_cfs_opt(&[cf(&db, CF_STATE), cf(&db, CF_STATE_META)], &opts)
                .map_err(|e| StoreError::rocks(&self.shared.root, "flush state", e))?;
            progress.flushed_at = Instant::now();
        }
        Ok(())
    }

    /// Writes the state's memtables to table files and waits: what was
    /// applied so far is then on disk (the state has no write-ahead log).
    fn flush_state(&self, db: &DB) -> Result<(), StoreError> {
        let mut opts = rocksdb::FlushOptions::default();
        opts.set_wait(true);
        db.flush_cfs_opt(&[cf(db, CF_STATE), cf(db, CF_STATE_META)], &opts)
            .map_err(|e| StoreError::rocks(&self.shared.root, "flush state", e))
    }

    /// Writes a snapshot of the current state to a file (blocking).
    fn build_snapshot_file(&self) -> Result<Meta<C>, StoreError> {
        let root = &self.shared.root;
        // The log may be purged up to this snapshot: what it covers must be
        // on disk. Held until the view is taken, so nothing newer and
        // unflushed gets into it.
        let mut progress = self.shared.progress.lock().unwrap_or_else(|e| e.into_inner());
        self.write_unwritten(&mut progress)?;
        let db = self.db();
        self.flush_state(&db)?;
        let view = db.snapshot();
        drop(progress);
        let read_meta = |key: &[u8]| -> Result<Option<Vec<u8>>, StoreError> {
            view.get_cf(cf(&db, CF_STATE_META), key)
                .map_err(|e| StoreError::rocks(root, "read state", e))
        };
        let applied: Option<LogIdOf<C>> = match read_meta(KEY_APPLIED)? {
            Some(v) => codec::decode(root, CF_STATE_META, KEY_APPLIED, &v)?,
            None => None,
        };
        let membership = match read_meta(KEY_MEMBERSHIP)? {
            Some(v) => codec::decode(root, CF_STATE_META, KEY_MEMBERSHIP, &v)?,
            None => StoredMembership::default(),
        };
        let seq = self.shared.seq.fetch_add(1, Ordering::Relaxed);
        // openraft 0.10 names a snapshot by what it covers: two snapshots up
        // to the same log id hold the same state.
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
        };
        let tmp = self.shared.snap_dir.join(format!("building-{seq}.tmp"));
        let file = fs::File::create(&tmp).map_err(io_err(root, "create", &tmp))?;
        let mut w = SnapshotWriter::create::<C>(file, &meta).map_err(io_err(root, "write", &tmp))?;
        for item in view.iterator_cf(cf(&db, CF_STATE), IteratorMode::Start) {
            let (k, v) = item.map_err(|e| StoreError::rocks(root, "scan state", e))?;
            w.record(&k, &v).map_err(io_err(root, "write", &tmp))?;
        }
        w.finish().map_err(io_err(root, "write", &tmp))?;
        self.publish_snapshot(&tmp, &meta)?;
        Ok(meta)
    }

    /// Renames a finished snapshot file into place, makes it current and
    /// removes the older ones.
    fn publish_snapshot(&self, tmp: &Path, meta: &Meta<C>) -> Result<(), StoreError> {
        let root = &self.shared.root;
        let path = self.snap_path(meta);
        fs::rename(tmp, &path).map_err(io_err(root, "rename", tmp))?;
        snapshot::sync_dir(root, &self.shared.snap_dir)?;
        let mut current = self.shared.current.lock().unwrap_or_else(|e| e.into_inner());
        let newer = current.as_ref().is_none_or(|c| c.last_log_id <= meta.last_log_id);
        if !newer {
            // A concurrent install already moved past this snapshot.
            return remove_path(root, &path);
        }
        if let Some(old) = current.replace(meta.clone()) {
            let old_path = self.snap_path(&old);
            if old_path != path {
                remove_path(root, &old_path)?;
            }
        }
        Ok(())
    }

    /// Installs the snapshot read from `input` as the new state (blocking).
    fn install_snapshot_file(&self, meta: &Meta<C>, mut input: fs::File) -> Result<(), StoreError> {
        let root = &self.shared.root;
        let seq = self.shared.seq.fetch_add(1, Ordering::Relaxed);
        let incoming = self.shared.snap_dir.join(format!("incoming-{seq}"));
        input
            .seek(SeekFrom::Start(0))
            .map_err(io_err(root, "seek", &incoming))?;
        let (mut reader, header) =
            SnapshotReader::open::<C>(BufReader::with_capacity(1 << 20, input), root, &incoming)?;
        if header != *meta {
            return Err(StoreError::BadSnapshot {
                store: root.clone(),
                path: incoming,
                reason: format!("holds the snapshot {header}, but {meta} was announced"),
            });
        }
        let (new_dir, tmp_snap) = self.write_generation(meta, || reader.next_record())?;

        let db = open_state_db(root, &new_dir)?;
        {
            // What was applied before is replaced, written or not.
            let mut progress = self.shared.progress.lock().unwrap_or_else(|e| e.into_inner());
            let mut app = self.shared.app.write().unwrap_or_else(|e| e.into_inner());
            *app = restore_app::<C, A>(root, &db)?;
            *self.shared.db.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(db);
            *progress = Progress {
                applied: (meta.last_log_id.clone(), meta.last_membership.clone()),
                unwritten_since: None,
                flushed_at: Instant::now(),
            };
        }
        self.retire_generation(&new_dir)?;
        self.publish_snapshot(&tmp_snap, meta)
    }

    /// Writes the records `next` yields (values with their format byte)
    /// into a new state generation and a snapshot file at once, syncs both
    /// and makes the generation the one a restart opens. Returns the
    /// generation's directory and the snapshot file, still to publish. The
    /// store keeps serving its current state meanwhile.
    fn write_generation(
        &self,
        meta: &Meta<C>,
        mut next: impl FnMut() -> Result<Option<snapshot::Record>, StoreError>,
    ) -> Result<(PathBuf, PathBuf), StoreError> {
        let root = &self.shared.root;
        let seq = self.shared.seq.fetch_add(1, Ordering::Relaxed);
        let tmp_snap = self.shared.snap_dir.join(format!("installing-{seq}.tmp"));
        let file = fs::File::create(&tmp_snap).map_err(io_err(root, "create", &tmp_snap))?;
        let mut copy = SnapshotWriter::create::<C>(file, meta).map_err(io_err(root, "write", &tmp_snap))?;
        let next_gen = *self.shared.generation.lock().unwrap_or_else(|e| e.into_inner()) + 1;
        let tmp_gen = self.shared.state_dir.join(format!("tmp-{next_gen}"));
        remove_path(root, &tmp_gen)?;
        {
            let db = open_state_db(root, &tmp_gen)?;
            let state = cf(&db, CF_STATE);
            let mut batch = WriteBatch::default();
            while let Some((k, v)) = next()? {
                copy.record(&k, &v).map_err(io_err(root, "write", &tmp_snap))?;
                batch.put_cf(state, k, v);
                if batch.len() >= INSTALL_BATCH {
                    db.write(std::mem::take(&mut batch))
                        .map_err(|e| StoreError::rocks(root, "install", e))?;
                }
            }
            let m = cf(&db, CF_STATE_META);
            batch.put_cf(m, KEY_APPLIED, codec::encode(&meta.last_log_id));
            batch.put_cf(m, KEY_MEMBERSHIP, codec::encode(&meta.last_membership));
            batch.put_cf(m, KEY_FORMAT, codec::encode(&u32::from(codec::FORMAT_VERSION)));
            db.write(batch).map_err(|e| StoreError::rocks(root, "install", e))?;
            // Flushing writes the records into synced table files.
            db.flush_cfs_opt(&[state, m], &rocksdb::FlushOptions::default())
                .map_err(|e| StoreError::rocks(root, "flush", e))?;
            db.flush_wal(true).map_err(|e| StoreError::rocks(root, "flush", e))?;
        }
        copy.finish().map_err(io_err(root, "write", &tmp_snap))?;

        let new_dir = self.shared.state_dir.join(next_gen.to_string());
        fs::rename(&tmp_gen, &new_dir).map_err(io_err(root, "rename", &tmp_gen))?;
        snapshot::sync_dir(root, &self.shared.state_dir)?;
        // The switch: from here on a restart opens the new generation.
        write_current(root, &self.shared.state_dir, next_gen)?;
        Ok((new_dir, tmp_snap))
    }

    /// Makes the generation in `new_dir` the store's and removes the one it
    /// replaces.
    fn retire_generation(&self, new_dir: &Path) -> Result<(), StoreError> {
        let next_gen: u64 = new_dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .expect("generation directories are named by their number");
        let old_gen = std::mem::replace(
            &mut *self.shared.generation.lock().unwrap_or_else(|e| e.into_inner()),
            next_gen,
        );
        remove_path(&self.shared.root, &self.shared.state_dir.join(old_gen.to_string()))
    }
}

/// Writes the records `app` changed, with the applied id and membership,
/// in one batch.
fn write_changes<C: StoreTypes, A: StateMachine<C>>(
    db: &DB,
    app: &RwLock<A>,
    applied: &Applied<C>,
) -> Result<(), rocksdb::Error> {
    let mut writes = Writes::new();
    app.write()
        .unwrap_or_else(|e| e.into_inner())
        .changed_records(&mut writes);
    let mut batch = WriteBatch::default();
    let state = cf(db, CF_STATE);
    for (key, value) in writes.ops {
        match value {
            Some(v) => batch.put_cf(state, key, v),
            None => batch.delete_cf(state, key),
        }
    }
    let meta = cf(db, CF_STATE_META);
    batch.put_cf(meta, KEY_APPLIED, codec::encode(&applied.0));
    batch.put_cf(meta, KEY_MEMBERSHIP, codec::encode(&applied.1));
    db.write_opt(batch, &unlogged())
}

impl<C: StoreTypes, A: StateMachine<C>> Drop for Shared<C, A> {
    /// A store closed cleanly keeps everything applied: nothing to re-apply
    /// at the next start.
    fn drop(&mut self) {
        let progress = self.progress.get_mut().unwrap_or_else(|e| e.into_inner());
        if progress.unwritten_since.is_none() {
            return;
        }
        let db = self.db.get_mut().unwrap_or_else(|e| e.into_inner()).clone();
        if let Err(e) = write_changes(&db, &self.app, &progress.applied) {
            // Not lost: re-applied from the log at the next start.
            tracing::warn!(store = %self.root.display(), "state not written at close: {e}");
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(StoreError::io(
            Path::new("?"),
            "run blocking task",
            Path::new("?"),
            std::io::Error::other(e),
        ))
    })
}

impl<C: StoreTypes, A: StateMachine<C>> StateMachineStore<C, A> {
    /// The current snapshot file, opened for reading.
    async fn open_snapshot(&self, meta: Meta<C>) -> Result<SnapshotOf<C, tokio::fs::File>, io::Error> {
        let path = self.snap_path(&meta);
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| StoreError::io(&self.shared.root, "open", &path, e))?;
        Ok(Snapshot { meta, snapshot: file })
    }
}

impl<C: StoreTypes, A: StateMachine<C>> RaftSnapshotBuilder<C> for StateMachineStore<C, A> {
    type SnapshotData = tokio::fs::File;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, tokio::fs::File>, io::Error> {
        let this = self.clone();
        let meta = blocking(move || this.build_snapshot_file()).await?;
        self.open_snapshot(meta).await
    }
}

impl<C: StoreTypes, A: StateMachine<C>> RaftStateMachine<C> for StateMachineStore<C, A> {
    type SnapshotData = tokio::fs::File;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<Applied<C>, io::Error> {
        Ok(self
            .shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .applied
            .clone())
    }

    /// Applies what is ready of the stream in one go (one lock, at most one
    /// state write), then answers each entry's waiter directly.
    async fn apply<Strm>(&mut self, entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + Send,
    {
        let mut ready = entries.ready_chunks(APPLY_CHUNK);
        while let Some(chunk) = ready.next().await {
            let chunk: Vec<(C::Entry, Option<ApplyResponder<C>>)> = chunk.into_iter().collect::<Result<_, _>>()?;
            for (responder, reply) in self.apply_tagged(chunk)? {
                if let Some(responder) = responder {
                    responder.send(reply);
                }
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &Meta<C>, snapshot: tokio::fs::File) -> Result<(), io::Error> {
        let file = snapshot.into_std().await;
        let this = self.clone();
        let m = meta.clone();
        blocking(move || this.install_snapshot_file(&m, file)).await?;
        // The received data now lives in our own snapshot file.
        let received = std::mem::take(&mut *self.shared.receiving.lock().unwrap_or_else(|e| e.into_inner()));
        for path in received {
            remove_path(&self.shared.root, &path)?;
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<C, tokio::fs::File>>, io::Error> {
        let meta = self.shared.current.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match meta {
            Some(meta) => self.open_snapshot(meta).await.map(Some),
            None => Ok(None),
        }
    }
}
