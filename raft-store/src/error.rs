//! Errors of the store, written so an operator can act on them: each one names
//! the store (its directory) and, for a bad record, the column family and key.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong opening or using a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB refused an operation (open, read, write, flush).
    #[error("store {store}: RocksDB {op} failed: {source}")]
    Rocks {
        store: PathBuf,
        op: &'static str,
        #[source]
        source: rocksdb::Error,
    },

    /// A file system operation on the store's directories failed.
    #[error("store {store}: {op} {path} failed: {source}")]
    Io {
        store: PathBuf,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A record was written by a newer (or unknown) version of this software.
    #[error(
        "store {store}: record {cf}/{key} has format version {found}, this binary reads version {expected}; \
         run the version that wrote it, or restore the data dir from a backup"
    )]
    UnknownFormat {
        store: PathBuf,
        cf: &'static str,
        key: String,
        found: u8,
        expected: u8,
    },

    /// A record could not be decoded: the data dir is damaged.
    #[error("store {store}: record {cf}/{key} is corrupt: {reason}")]
    Corrupt {
        store: PathBuf,
        cf: &'static str,
        key: String,
        reason: String,
    },

    /// The log is missing an entry between two present ones.
    #[error("store {store}: the log has a hole: entry {expected} is missing (next present entry is {found})")]
    LogHole { store: PathBuf, expected: u64, found: u64 },

    /// A committed entry the application cannot apply (it cannot read it).
    #[error(
        "store {store}: the log entry at index {index} cannot be applied: {reason}; \
         the replica stops rather than diverge from the others (was it written by a newer version?)"
    )]
    Unapplicable { store: PathBuf, index: u64, reason: String },

    /// A store was to be seeded or forced where it cannot be.
    #[error("store {store}: {reason}")]
    Refused { store: PathBuf, reason: String },

    /// A snapshot file is damaged or does not match what was announced.
    #[error("store {store}: snapshot {path} is invalid: {reason}")]
    BadSnapshot {
        store: PathBuf,
        path: PathBuf,
        reason: String,
    },
}

impl StoreError {
    pub(crate) fn rocks(store: &std::path::Path, op: &'static str, source: rocksdb::Error) -> Self {
        StoreError::Rocks {
            store: store.to_path_buf(),
            op,
            source,
        }
    }

    pub(crate) fn io(store: &std::path::Path, op: &'static str, path: &std::path::Path, source: io::Error) -> Self {
        StoreError::Io {
            store: store.to_path_buf(),
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// openraft 0.10's storage traits speak `io::Error`: the whole message,
/// store and key included, travels as its source.
impl From<StoreError> for io::Error {
    fn from(e: StoreError) -> io::Error {
        match e {
            // Keep the kind of a plain I/O failure (disk full, permission).
            StoreError::Io { ref source, .. } => io::Error::new(source.kind(), e),
            other => io::Error::other(other),
        }
    }
}
