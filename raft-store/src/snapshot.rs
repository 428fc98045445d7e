//! The snapshot file: a stream of the state machine's records.
//!
//! A snapshot is written and read record by record, so neither side holds the
//! whole state in memory, and openraft ships the file to followers in chunks.
//!
//! ```text
//! magic        8 bytes  "RSSNAP\0\x01"
//! header_len   u32 LE
//! header       format byte + postcard(SnapshotMeta)
//! records      { key_len u32 LE, key, value_len u32 LE, value }*
//! end mark     u32::MAX
//! count        u64 LE   number of records
//! crc32        u32 LE   of every byte before it
//! ```

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use openraft::RaftTypeConfig;

use crate::codec;
use crate::error::StoreError;

const MAGIC: &[u8; 8] = b"RSSNAP\0\x01";
const END: u32 = u32::MAX;
/// A record larger than this is taken as corruption rather than allocated.
const MAX_FIELD: u32 = 256 << 20;

/// One record: key and value.
pub(crate) type Record = (Vec<u8>, Vec<u8>);

pub(crate) type Meta<C> = openraft::alias::SnapshotMetaOf<C>;

/// Writes a snapshot file record by record, keeping its checksum.
pub(crate) struct SnapshotWriter {
    out: BufWriter<File>,
    crc: crc32fast::Hasher,
    count: u64,
}

impl SnapshotWriter {
    pub(crate) fn create<C: RaftTypeConfig>(file: File, meta: &Meta<C>) -> io::Result<Self> {
        let mut w = Self {
            out: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            count: 0,
        };
        let header = codec::encode(meta);
        w.put(MAGIC)?;
        w.put(&(header.len() as u32).to_le_bytes())?;
        w.put(&header)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.out.write_all(bytes)
    }

    pub(crate) fn record(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.put(&(key.len() as u32).to_le_bytes())?;
        self.put(key)?;
        self.put(&(value.len() as u32).to_le_bytes())?;
        self.put(value)?;
        self.count += 1;
        Ok(())
    }

    /// Writes the trailer and syncs the file to disk.
    pub(crate) fn finish(mut self) -> io::Result<()> {
        self.put(&END.to_le_bytes())?;
        let count = self.count.to_le_bytes();
        self.put(&count)?;
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_le_bytes())?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    }
}

/// Reads a snapshot file record by record and checks it as it goes.
pub(crate) struct SnapshotReader<R> {
    input: R,
    crc: crc32fast::Hasher,
    count: u64,
    path: PathBuf,
    store: PathBuf,
}

impl<R: Read> SnapshotReader<R> {
    /// Reads the magic and header; `path` and `store` only name the file in errors.
    pub(crate) fn open<C: RaftTypeConfig>(input: R, store: &Path, path: &Path) -> Result<(Self, Meta<C>), StoreError> {
        let mut r = Self {
            input,
            crc: crc32fast::Hasher::new(),
            count: 0,
            path: path.to_path_buf(),
            store: store.to_path_buf(),
        };
        let mut magic = [0u8; 8];
        r.take(&mut magic)?;
        if &magic != MAGIC {
            return Err(r.bad("not a snapshot file of this store (bad magic)".into()));
        }
        let len = r.u32()?;
        let header = r.field(len)?;
        let meta = codec::decode(store, "snapshot", b"header", &header)?;
        Ok((r, meta))
    }

    fn bad(&self, reason: String) -> StoreError {
        StoreError::BadSnapshot {
            store: self.store.clone(),
            path: self.path.clone(),
            reason,
        }
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<(), StoreError> {
        self.input.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => self.bad("file ends early (truncated)".into()),
            _ => StoreError::io(&self.store, "read", &self.path, e),
        })?;
        self.crc.update(buf);
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn field(&mut self, len: u32) -> Result<Vec<u8>, StoreError> {
        if len > MAX_FIELD {
            return Err(self.bad(format!("a field claims {len} bytes")));
        }
        let mut buf = vec![0u8; len as usize];
        self.take(&mut buf)?;
        Ok(buf)
    }

    /// The next record, or `None` after the last one once the trailer checks out.
    pub(crate) fn next_record(&mut self) -> Result<Option<Record>, StoreError> {
        let key_len = self.u32()?;
        if key_len == END {
            self.finish()?;
            return Ok(None);
        }
        let key = self.field(key_len)?;
        let value_len = self.u32()?;
        let value = self.field(value_len)?;
        self.count += 1;
        Ok(Some((key, value)))
    }

    fn finish(&mut self) -> Result<(), StoreError> {
        let mut count = [0u8; 8];
        self.take(&mut count)?;
        let expected = self.crc.clone().finalize();
        let mut crc = [0u8; 4];
        self.input
            .read_exact(&mut crc)
            .map_err(|e| StoreError::io(&self.store, "read", &self.path, e))?;
        if u64::from_le_bytes(count) != self.count {
            return Err(self.bad(format!(
                "trailer counts {} records, file holds {}",
                u64::from_le_bytes(count),
                self.count
            )));
        }
        if u32::from_le_bytes(crc) != expected {
            return Err(self.bad("checksum mismatch".into()));
        }
        Ok(())
    }
}

/// Reads only the header of a snapshot file on disk.
pub(crate) fn read_meta<C: RaftTypeConfig>(store: &Path, path: &Path) -> Result<Meta<C>, StoreError> {
    let file = File::open(path).map_err(|e| StoreError::io(store, "open", path, e))?;
    let (_, meta) = SnapshotReader::open::<C>(BufReader::new(file), store, path)?;
    Ok(meta)
}

/// The file name of a snapshot: the log id it covers (index first, so
/// names sort by it), made only of safe characters.
pub(crate) fn file_name<C: RaftTypeConfig>(meta: &Meta<C>) -> String {
    let covers = match &meta.last_log_id {
        Some(l) => format!("{:020}-{}", l.index, l.committed_leader_id()),
        None => "empty".to_string(),
    };
    let safe: String = covers
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.snap")
}

/// fsyncs a directory so a rename inside it survives a crash.
pub(crate) fn sync_dir(store: &Path, dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(store, "sync directory", dir, e))
}
