//! A backup of the Master: the whole state at one log index, in one file.
//!
//! `master-node backup` asks the cluster for it; the leader confirms with a
//! quorum that it still leads and has applied everything committed (the
//! read-index round linearizable reads use), then writes every record of
//! its state under one read lock, so the file holds exactly the writes
//! acknowledged up to its log index. The file is:
//!
//! ```text
//! slapos-master-backup 1\n
//! {"format":1,"cluster_id":...,"log_index":...,"records":...,"body_bytes":...,"body_sha256":...}\n
//! <body: the records, postcard>
//! ```
//!
//! The header is JSON so an operator can read it with `head -2`; the body is
//! the state's own records (`state::persist`), so a backup restores with the
//! same code a replica restarts with. `verify` checks the checksum, decodes
//! every record and rebuilds the state from them.
//!
//! Part of the core: imports only the state.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::{persist, Master};

/// The first line of every backup file.
pub const MAGIC: &str = "slapos-master-backup 1";
/// The format this build writes and reads.
pub const FORMAT: u32 = 1;

/// What a backup is of, as its header says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    pub cluster_id: String,
    /// The log index of the last write the backup holds.
    pub log_index: u64,
    /// Writes applied since the cluster began (the state's counter).
    pub applied: u64,
    /// When the leader wrote it (seconds since the Unix epoch).
    pub created: u64,
    pub records: u64,
    pub body_bytes: u64,
    /// sha256 of the body, hex.
    pub body_sha256: String,
}

/// Why a file is not a usable backup.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackupError {
    #[error("not a Master backup (its first line is not `{MAGIC}`)")]
    NotABackup,
    #[error("the header is unreadable: {0}")]
    BadHeader(String),
    #[error("format {0} is not one this master-node reads (it reads format {FORMAT})")]
    UnknownFormat(u32),
    #[error("the file is truncated: the header announces {expected} bytes of records, the file has {found}")]
    Truncated { expected: u64, found: u64 },
    #[error("the file is longer than its header says ({found} bytes of records, {expected} announced)")]
    TrailingBytes { expected: u64, found: u64 },
    #[error("the checksum does not match: the records were altered or damaged")]
    Checksum,
    #[error("the records do not decode: {0}")]
    Records(String),
    #[error("the header says {expected} records, the body holds {found}")]
    RecordCount { expected: u64, found: u64 },
}

/// The backup file of `state` (taken under one read lock), as the leader
/// of `cluster_id` writes it.
pub fn write(state: &Master, cluster_id: &str, created: u64) -> Vec<u8> {
    let records = persist::all_records(state);
    let body = postcard::to_allocvec(&records).expect("records encode");
    let header = Header {
        format: FORMAT,
        cluster_id: cluster_id.to_string(),
        log_index: state.last_index,
        applied: state.applied,
        created,
        records: records.len() as u64,
        body_bytes: body.len() as u64,
        body_sha256: hex::encode(Sha256::digest(&body)),
    };
    let mut file = format!("{MAGIC}\n").into_bytes();
    file.extend_from_slice(&serde_json::to_vec(&header).expect("headers encode"));
    file.push(b'\n');
    file.extend_from_slice(&body);
    file
}

/// The header of a backup file, and where its body starts.
pub fn header(file: &[u8]) -> Result<(Header, usize), BackupError> {
    let magic_end = MAGIC.len() + 1;
    if file.len() < magic_end || &file[..magic_end - 1] != MAGIC.as_bytes() || file[magic_end - 1] != b'\n' {
        return Err(BackupError::NotABackup);
    }
    let rest = &file[magic_end..];
    let line_end = rest
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| BackupError::BadHeader("no end of line after the header".into()))?;
    let header: Header =
        serde_json::from_slice(&rest[..line_end]).map_err(|e| BackupError::BadHeader(e.to_string()))?;
    if header.format != FORMAT {
        return Err(BackupError::UnknownFormat(header.format));
    }
    Ok((header, magic_end + line_end + 1))
}

/// Checks a backup file whole: header, length, checksum, every record, and
/// the state they rebuild. Returns the header and that state.
pub fn verify(file: &[u8]) -> Result<(Header, Master), BackupError> {
    let (header, start) = header(file)?;
    let body = &file[start..];
    let found = body.len() as u64;
    if found < header.body_bytes {
        return Err(BackupError::Truncated {
            expected: header.body_bytes,
            found,
        });
    }
    if found > header.body_bytes {
        return Err(BackupError::TrailingBytes {
            expected: header.body_bytes,
            found,
        });
    }
    if hex::encode(Sha256::digest(body)) != header.body_sha256 {
        return Err(BackupError::Checksum);
    }
    let records: Vec<(Vec<u8>, Vec<u8>)> =
        postcard::from_bytes(body).map_err(|e| BackupError::Records(e.to_string()))?;
    if records.len() as u64 != header.records {
        return Err(BackupError::RecordCount {
            expected: header.records,
            found: records.len() as u64,
        });
    }
    let state = persist::restore(&mut records.into_iter())
        .map_err(|(key, e)| BackupError::Records(format!("record {}: {e}", String::from_utf8_lossy(&key))))?;
    Ok((header, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, Params, Proposal};

    fn state() -> Master {
        let mut m = Master::new();
        for i in 0..3u64 {
            m.apply(
                10 + i,
                Proposal {
                    request_id: None,
                    time_us: 1_000,
                    command: Command::SetComputer {
                        id: format!("COMP-{i}"),
                        address: "10.0.0.1".into(),
                        netmask: "255.255.255.0".into(),
                        capacity: Params::new(),
                        categories: Params::new(),
                        partitions: vec![],
                    },
                },
            );
        }
        m
    }

    #[test]
    fn a_backup_restores_the_state_it_was_taken_of() {
        let m = state();
        let file = write(&m, "cluster-1", 42);
        let (header, back) = verify(&file).unwrap();
        assert_eq!(header.cluster_id, "cluster-1");
        assert_eq!(header.log_index, m.last_index);
        assert_eq!(header.created, 42);
        assert_eq!(back.computers, m.computers);
        assert_eq!(back.last_index, m.last_index);
    }

    #[test]
    fn damaged_files_are_refused_with_the_reason() {
        let file = write(&state(), "cluster-1", 42);
        assert_eq!(verify(b"hello\n").unwrap_err(), BackupError::NotABackup);
        assert!(matches!(
            verify(&file[..file.len() - 10]).unwrap_err(),
            BackupError::Truncated { .. }
        ));
        let mut longer = file.clone();
        longer.push(0);
        assert!(matches!(
            verify(&longer).unwrap_err(),
            BackupError::TrailingBytes { .. }
        ));
        let mut flipped = file.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(verify(&flipped).unwrap_err(), BackupError::Checksum);
        let (_, start) = header(&file).unwrap();
        let other_format = String::from_utf8_lossy(&file[..start]).replace("\"format\":1", "\"format\":9");
        let mut f = other_format.into_bytes();
        f.extend_from_slice(&file[start..]);
        assert_eq!(verify(&f).unwrap_err(), BackupError::UnknownFormat(9));
        let cut_header = &file[..MAGIC.len() + 10];
        assert!(matches!(verify(cut_header).unwrap_err(), BackupError::BadHeader(_)));
    }
}
