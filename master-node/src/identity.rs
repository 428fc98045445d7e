//! A replica's identity on disk (`<data dir>/replica.json`) and join tokens.
//!
//! The identity file says which cluster the data dir belongs to and which
//! replica id it holds, so a data dir is never mixed into another cluster and
//! an id is never taken twice. A join token is
//! `SLAPJOIN2.<cluster id>.<secret>.<CA sha256>`: the cluster keeps only the
//! secret's sha256, so any leader can check it, and the joiner pins the
//! cluster's CA by the hash (as `kubeadm join` does), so it never talks to a
//! Master that is not the one the token is for.
//!
//! Imports nothing else of this crate.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const IDENTITY_FILE: &str = "replica.json";
const TOKEN_FILE: &str = "join-token";
const TOKEN_PREFIX: &str = "SLAPJOIN2";

/// Errors about a data dir or a token, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged ({reason}); restore the data dir from a backup or replace this replica")]
    Damaged { path: PathBuf, reason: String },
    #[error(
        "the join token is malformed: expected SLAPJOIN2.<cluster id>.<secret>.<CA sha256>, as printed by `master-node init`"
    )]
    BadToken,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `replica.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format: u32,
    pub cluster_id: String,
    pub node_id: u64,
    /// Where this replica listens, and the address the others use.
    pub listen: String,
    pub advertise: String,
    /// Set once the replica has been removed from the cluster.
    #[serde(default)]
    pub left: bool,
}

impl Identity {
    /// Reads the identity of `data_dir`, or `None` if it has none yet.
    pub fn load(data_dir: &Path) -> Result<Option<Identity>, IdentityError> {
        let path = data_dir.join(IDENTITY_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| IdentityError::Damaged {
                    path: path.clone(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Writes the identity atomically (temporary file, fsync, rename).
    pub fn save(&self, data_dir: &Path) -> Result<(), IdentityError> {
        fs::create_dir_all(data_dir).map_err(io(data_dir))?;
        let path = data_dir.join(IDENTITY_FILE);
        let tmp = data_dir.join(format!("{IDENTITY_FILE}.tmp"));
        let body = serde_json::to_vec_pretty(self).expect("identity serializes");
        write_private(&tmp, &body)?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        fs::File::open(data_dir)
            .and_then(|d| d.sync_all())
            .map_err(io(data_dir))
    }
}

/// Writes a file readable by its owner only, synced.
pub fn write_private(path: &Path, body: &[u8]) -> Result<(), IdentityError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(body).and_then(|_| f.sync_all()).map_err(io(path))
}

/// A parsed join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub cluster_id: String,
    pub secret: String,
    /// sha256 (hex) of the cluster CA's DER.
    pub ca_sha256: String,
}

impl JoinToken {
    /// A fresh token for a new cluster whose CA has this sha256 (hex), with
    /// a random cluster id and secret.
    pub fn generate(ca_sha256: &str) -> JoinToken {
        let mut rng = rand::rng();
        let mut id = [0u8; 8];
        let mut secret = [0u8; 24];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut secret);
        JoinToken {
            cluster_id: hex::encode(id),
            secret: hex::encode(secret),
            ca_sha256: ca_sha256.to_string(),
        }
    }

    pub fn parse(text: &str) -> Result<JoinToken, IdentityError> {
        let mut parts = text.trim().split('.');
        match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(TOKEN_PREFIX), Some(id), Some(secret), Some(ca), None)
                if !id.is_empty()
                    && secret.len() >= 16
                    && ca.len() == 64
                    && ca.chars().all(|c| c.is_ascii_hexdigit()) =>
            {
                Ok(JoinToken {
                    cluster_id: id.to_string(),
                    secret: secret.to_string(),
                    ca_sha256: ca.to_ascii_lowercase(),
                })
            }
            _ => Err(IdentityError::BadToken),
        }
    }

    /// What the cluster stores: the secret's sha256 in hex.
    pub fn secret_sha256(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }

    /// Saves the token in `data_dir/join-token` (mode 0600), so the replica
    /// can later ask to leave on its own.
    pub fn save(&self, data_dir: &Path) -> Result<(), IdentityError> {
        write_private(&data_dir.join(TOKEN_FILE), format!("{self}\n").as_bytes())
    }

    /// The token saved in `data_dir`.
    pub fn load(data_dir: &Path) -> Result<JoinToken, IdentityError> {
        let path = data_dir.join(TOKEN_FILE);
        let text = fs::read_to_string(&path).map_err(io(&path))?;
        JoinToken::parse(&text)
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{TOKEN_PREFIX}.{}.{}.{}",
            self.cluster_id, self.secret, self.ca_sha256
        )
    }
}

/// sha256 of a string, in hex (how secrets are kept in the replicated state).
pub fn sha256_hex(s: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn token_round_trip_and_rejects_garbage() {
        let pin = "ab".repeat(32);
        let t = JoinToken::generate(&pin);
        assert_eq!(JoinToken::parse(&t.to_string()).unwrap(), t);
        let no_pin = "SLAPJOIN2.abc.0123456789abcdef0123".to_string();
        let short_pin = format!("SLAPJOIN2.abc.0123456789abcdef0123.{}", "ab".repeat(31));
        let bad_pin = format!("SLAPJOIN2.abc.0123456789abcdef0123.{}", "zz".repeat(32));
        let old = format!("SLAPJOIN1.abc.0123456789abcdef0123.{pin}");
        for bad in [
            "",
            "SLAPJOIN2",
            "SLAPJOIN2.abc",
            "OTHER.abc.0123456789abcdef0123",
            "SLAPJOIN2.a.short",
            no_pin.as_str(),
            short_pin.as_str(),
            bad_pin.as_str(),
            old.as_str(),
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn identity_and_token_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity {
            format: 1,
            cluster_id: "c".into(),
            node_id: 3,
            listen: "127.0.0.1:1".into(),
            advertise: "127.0.0.1:1".into(),
            left: false,
        };
        id.save(dir.path()).unwrap();
        assert_eq!(Identity::load(dir.path()).unwrap(), Some(id));
        let t = JoinToken::generate(&"00".repeat(32));
        t.save(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(TOKEN_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(JoinToken::load(dir.path()).unwrap(), t);
    }
}
