//! Starting again from what is left: a backup restored into a new cluster
//! (`master-node restore`), and a survivor made a cluster of its own when
//! the majority is lost for good (`master-node recover`).
//!
//! Both prepare a data dir offline, before the replica starts, and leave it
//! as Raft would have: nothing here runs a consensus step by hand.
//!
//! - **Restore** writes the backup's state as if this replica had installed
//!   a snapshot at the backup's log index, in a cluster whose only voter is
//!   itself: the log is purged up to that index, the state holds the
//!   records, and the snapshot file is there for replicas that join later.
//!   At start the replica elects itself and goes on from the next index,
//!   so log indexes (and what nodes and watches remember of them) only grow.
//!   The new cluster gets a new id and join token. It keeps the backup's CA
//!   unless asked for a new one, so nodes, users and gateways keep their
//!   certificates; the old replicas' certificates are revoked, since those
//!   replicas may still run as the old cluster.
//! - **Recover** is etcd's `--force-new-cluster`: it appends to the
//!   survivor's log, under a vote for itself in a new term, a membership
//!   entry in which it is the only voter. openraft takes the newest
//!   membership in the log as the cluster's, so at start the replica elects
//!   itself alone, and its first entry commits everything its log holds.
//!   Writes that only the lost replicas had are gone, and writes the
//!   survivor held but the cluster never acknowledged are kept: the
//!   operator guide says so before anyone runs it.
//!
//! Must not import the replica handle or anything above it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use openraft::impls::leader_id_adv::LeaderId;
use openraft::{Entry, EntryPayload, LogId, Membership, SnapshotMeta, StoredMembership, Vote};
use raft_store::{LogStore, StoreError};

use crate::backup::{self, BackupError, Header};
use crate::founding::Founding;
use crate::identity::{Identity, IdentityError, JoinToken};
use crate::pki::{self, PkiError};
use crate::raft::{MasterTypes, ReplicaNode};
use crate::state::{persist, Master};

/// The replica id of a restored cluster's first replica.
pub const RESTORED_REPLICA: u64 = 1;

/// Why a restore or a recovery did not happen. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("not a usable backup: {0}")]
    Backup(#[from] BackupError),
    #[error(
        "the backup holds no certificate authority (it was taken before the cluster finished its creation); \
         restore it with --new-ca"
    )]
    NoAuthority,
    #[error("{0} already holds something; restore into an empty or new directory")]
    NotEmpty(PathBuf),
    #[error("{0} holds no replica: recover runs on the data dir of a surviving replica")]
    NoReplica(PathBuf),
    #[error("replica {0} left its cluster; it has nothing to recover")]
    Left(u64),
    #[error("{0} has no Raft log: there is nothing to recover from")]
    NoLog(PathBuf),
    #[error(
        "replica {node} is not a voter of its cluster (the members are {members:?}); \
         recover the data dir of a replica that was a voter"
    )]
    NotAVoter { node: u64, members: Vec<u64> },
    #[error("replica {0} is already its cluster's only voter: nothing to recover; start it with `master-node run`")]
    AlreadyAlone(u64),
    #[error("the state cannot become a new cluster: {0}")]
    State(String),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] crate::cluster_tls::ClusterTlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A cluster restored from a backup, ready to start.
pub struct Restored {
    /// What the backup was.
    pub backup: Header,
    /// The new cluster's id and join token.
    pub token: JoinToken,
    pub identity: Identity,
    /// Where the administrator's certificate, key and the CA were written.
    pub admin_dir: PathBuf,
}

/// Creates in `data_dir` (empty or absent) replica 1 of a new cluster whose
/// state is the backup `file`, serving on `listen` and reached at
/// `advertise`; with `new_ca`, the cluster gets a new CA (every certificate
/// the backup recorded then stops working). The backup is checked whole
/// before anything is written, and on any failure `data_dir` is left as it
/// was found.
pub fn restore(
    file: Vec<u8>,
    data_dir: &Path,
    listen: &str,
    advertise: &str,
    new_ca: bool,
) -> Result<Restored, RecoveryError> {
    let (header, mut state) = backup::verify(&file)?;
    // At 1M partitions the file, the state and its records are each a
    // gigabyte or more: each goes as soon as it is used.
    drop(file);
    let token = JoinToken::generate("");
    let authority = if new_ca {
        pki::new_authority(&token.cluster_id, pki::now_secs())?
    } else {
        state.authority.clone().ok_or(RecoveryError::NoAuthority)?
    };
    let founding = Founding::with_authority(token, authority.clone(), &[listen, advertise])?;
    let token = founding.token.clone();
    state
        .rebase(&token.cluster_id, &token.secret_sha256(), authority, &founding.records)
        .map_err(RecoveryError::State)?;
    let identity = Identity {
        format: 1,
        cluster_id: token.cluster_id.clone(),
        node_id: RESTORED_REPLICA,
        listen: listen.to_string(),
        advertise: advertise.to_string(),
        left: false,
    };
    let admin_dir = data_dir.join("admin");
    in_new_dir(data_dir, || {
        founding.replica_tls.save(data_dir)?;
        seed(data_dir, state, advertise)?;
        founding.save_admin(&admin_dir).map_err(|source| RecoveryError::Io {
            path: admin_dir.clone(),
            source,
        })?;
        token.save(data_dir)?;
        // Last: a data dir with an identity is a replica.
        identity.save(data_dir)?;
        Ok(())
    })?;
    Ok(Restored {
        backup: header,
        token,
        identity,
        admin_dir,
    })
}

/// Runs `write` on `dir`, which must be empty or absent; if it fails,
/// removes what it wrote.
fn in_new_dir(dir: &Path, write: impl FnOnce() -> Result<(), RecoveryError>) -> Result<(), RecoveryError> {
    let io = |source| RecoveryError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let existed = dir.exists();
    if existed && std::fs::read_dir(dir).map_err(io)?.next().is_some() {
        return Err(RecoveryError::NotEmpty(dir.to_path_buf()));
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    let result = write();
    if result.is_err() {
        let cleaned = if existed {
            std::fs::read_dir(dir).and_then(|entries| {
                entries.into_iter().try_for_each(|e| {
                    let path = e?.path();
                    if path.is_dir() {
                        std::fs::remove_dir_all(path)
                    } else {
                        std::fs::remove_file(path)
                    }
                })
            })
        } else {
            std::fs::remove_dir_all(dir)
        };
        if let Err(e) = cleaned {
            tracing::error!(dir = %dir.display(), error = %e, "cannot remove what the failed restore wrote");
        }
    }
    result
}

/// The state's stores, as a replica that installed it as a snapshot at the
/// state's log index, in a cluster of itself alone.
fn seed(data_dir: &Path, state: Master, advertise: &str) -> Result<(), RecoveryError> {
    let at = LogId::new(
        LeaderId {
            term: 1,
            node_id: RESTORED_REPLICA,
        },
        state.last_index,
    );
    let nodes = BTreeMap::from([(
        RESTORED_REPLICA,
        ReplicaNode {
            addr: advertise.to_string(),
        },
    )]);
    let membership = Membership::new(vec![BTreeSet::from([RESTORED_REPLICA])], nodes)
        .map_err(|e| RecoveryError::State(e.to_string()))?;
    let meta = SnapshotMeta {
        last_log_id: Some(at),
        last_membership: StoredMembership::new(Some(at), membership),
    };
    // Not committed: the replica starts as a follower and wins a real
    // election (term 2), whose first entry comes after the backup's index.
    let vote = Vote::new(1, RESTORED_REPLICA);
    let records = persist::all_records(&state);
    drop(state);
    raft_store::seed::<MasterTypes, Master>(data_dir, &meta, &vote, records)?;
    Ok(())
}

/// What `recover` did.
#[derive(Debug)]
pub struct Recovered {
    pub identity: Identity,
    /// The voters the cluster had, and lost.
    pub removed: Vec<u64>,
    /// Where the forced membership was written in the log.
    pub at: LogId<LeaderId<u64, u64>>,
}

/// Makes the replica of `data_dir` the only voter of its cluster (see the
/// module's notes): a vote for itself in a term above any it has seen,
/// then a membership entry after the last one of its log, both synced. The
/// replica must not be running.
pub fn recover(data_dir: &Path) -> Result<Recovered, RecoveryError> {
    let identity = Identity::load(data_dir)?.ok_or_else(|| RecoveryError::NoReplica(data_dir.to_path_buf()))?;
    if identity.left {
        return Err(RecoveryError::Left(identity.node_id));
    }
    let me = identity.node_id;
    let log_dir = data_dir.join("log");
    if !log_dir.exists() {
        return Err(RecoveryError::NoLog(data_dir.to_path_buf()));
    }
    let log = LogStore::<MasterTypes>::open(&log_dir)?;
    let Some(last) = log.log_state()?.last_log_id else {
        return Err(RecoveryError::NoLog(data_dir.to_path_buf()));
    };
    let members = current_membership(data_dir, &log)?;
    let voters: Vec<u64> = members.voter_ids().collect();
    if !voters.contains(&me) {
        return Err(RecoveryError::NotAVoter {
            node: me,
            members: voters,
        });
    }
    if voters == [me] && members.get_joint_config().len() == 1 {
        return Err(RecoveryError::AlreadyAlone(me));
    }
    let term = last
        .committed_leader_id()
        .term
        .max(log.vote().map_or(0, |v| v.leader_id.term))
        + 1;
    let node = members.get_node(&me).cloned().unwrap_or(ReplicaNode {
        addr: identity.advertise.clone(),
    });
    let alone = Membership::new(vec![BTreeSet::from([me])], BTreeMap::from([(me, node)]))
        .map_err(|e| RecoveryError::State(e.to_string()))?;
    let at = LogId::new(LeaderId { term, node_id: me }, last.index + 1);
    // The vote first: a crash between the two leaves a vote with no entry
    // of its term, as a candidate has. Not committed: at start the replica
    // wins a real election, whose first entry commits the membership.
    log.write_vote(&Vote::new(term, me))?;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    log.append_with(
        [Entry {
            log_id: at,
            payload: EntryPayload::Membership(alone),
        }],
        move |synced| {
            let _ = done_tx.send(synced);
        },
    )?;
    done_rx
        .recv()
        .map_err(|_| std::io::Error::other("the log closed before the entry was synced"))
        .and_then(|r| r)
        .map_err(|source| RecoveryError::Io {
            path: log_dir.clone(),
            source,
        })?;
    Ok(Recovered {
        removed: voters.into_iter().filter(|v| *v != me).collect(),
        identity,
        at,
    })
}

/// The membership the replica would start with: the newest in its log, or
/// else the one its state applied last.
fn current_membership(
    data_dir: &Path,
    log: &LogStore<MasterTypes>,
) -> Result<Membership<u64, ReplicaNode>, RecoveryError> {
    let state = log.log_state()?;
    let from = state.last_purged_log_id.map_or(0, |l| l.index + 1);
    let newest_in_log = log.read_entries(from..).map(|entries| {
        entries.into_iter().rev().find_map(|e| match e.payload {
            EntryPayload::Membership(m) => Some(m),
            _ => None,
        })
    })?;
    if let Some(m) = newest_in_log {
        return Ok(m);
    }
    let applied = raft_store::applied_membership::<MasterTypes>(data_dir)?;
    Ok(applied.membership().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Certificate, Command, Params, Proposal, Role};

    fn apply(m: &mut Master, command: Command) {
        let index = m.last_index + 1;
        m.apply(
            index,
            Proposal {
                request_id: None,
                time_us: 1_000,
                command,
            },
        );
    }

    /// A founded cluster's state (CA, replicas 1 and 2, an administrator)
    /// with a computer, as a backup file.
    fn backup_file() -> (Vec<u8>, Master) {
        let founding = Founding::new(&["127.0.0.1:1"]).unwrap();
        let mut m = Master::new();
        apply(
            &mut m,
            Command::InitCluster {
                id: founding.token.cluster_id.clone(),
                token_sha256: founding.token.secret_sha256(),
            },
        );
        apply(&mut m, Command::SetAuthority(founding.authority.clone()));
        for certificate in founding.records {
            apply(
                &mut m,
                Command::RecordCertificate {
                    certificate,
                    registration: None,
                },
            );
        }
        apply(
            &mut m,
            Command::ReserveReplicaId {
                addr: "127.0.0.1:2".into(),
            },
        );
        let second = pki::issue(
            m.authority.as_ref().unwrap(),
            &Role::Replica(2),
            pki::now_secs(),
            30,
            &[],
        )
        .unwrap();
        apply(
            &mut m,
            Command::RecordCertificate {
                certificate: second.certificate,
                registration: None,
            },
        );
        apply(
            &mut m,
            Command::SetComputer {
                id: "COMP-1".into(),
                address: "10.0.0.1".into(),
                netmask: "255.255.255.0".into(),
                capacity: Params::new(),
                categories: Params::new(),
                partitions: vec![],
            },
        );
        (backup::write(&m, "old-cluster", 7), m)
    }

    fn live_replicas(m: &Master) -> Vec<&Certificate> {
        m.certificates
            .values()
            .filter(|c| matches!(c.role, Role::Replica(_)) && !c.revoked)
            .collect()
    }

    #[test]
    fn a_restored_backup_is_a_new_one_replica_cluster_at_the_backup_index() {
        let (file, old) = backup_file();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("restored");
        let r = restore(file.clone(), &data, "127.0.0.1:9", "10.1.1.1:9", false).unwrap();
        assert_ne!(r.token.cluster_id, old.cluster.as_ref().unwrap().id);
        assert_eq!(r.backup.log_index, old.last_index);
        assert_eq!(Identity::load(&data).unwrap().unwrap(), r.identity);
        assert_eq!(JoinToken::load(&data).unwrap(), r.token);
        assert!(r.admin_dir.join("admin.key").exists());

        let (log, sm) = raft_store::open::<MasterTypes, Master>(&data).unwrap();
        let state = log.log_state().unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(old.last_index));
        assert_eq!(state.last_log_id, state.last_purged_log_id);
        let app = sm.app();
        let new = app.read().unwrap();
        assert_eq!(new.computers, old.computers);
        assert_eq!(new.last_index, old.last_index);
        // The backup's CA, pinned by the new token; only the new replica 1
        // is a live replica; ids go on after the old cluster's.
        assert_eq!(new.authority, old.authority);
        assert_eq!(
            r.token.ca_sha256,
            slap_proto::tls::pem_sha256(&old.authority.as_ref().unwrap().cert_pem).unwrap()
        );
        let live = live_replicas(&new);
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].role, Role::Replica(RESTORED_REPLICA));
        assert!(!old.certificates.contains_key(&live[0].fingerprint));
        let cluster = new.cluster.as_ref().unwrap();
        assert_eq!(cluster.id, r.token.cluster_id);
        assert_eq!(cluster.token_sha256, r.token.secret_sha256());
        assert_eq!(cluster.next_replica_id, 3);
        assert!(new.replica_addrs.is_empty());
    }

    #[test]
    fn a_new_ca_replaces_the_backups() {
        let (file, old) = backup_file();
        let dir = tempfile::tempdir().unwrap();
        let r = restore(file.clone(), dir.path(), "127.0.0.1:9", "127.0.0.1:9", true).unwrap();
        let (_, sm) = raft_store::open::<MasterTypes, Master>(dir.path()).unwrap();
        let app = sm.app();
        let new = app.read().unwrap();
        assert_ne!(new.authority, old.authority);
        assert_eq!(
            r.token.ca_sha256,
            slap_proto::tls::pem_sha256(&new.authority.as_ref().unwrap().cert_pem).unwrap()
        );
    }

    #[test]
    fn a_damaged_backup_or_a_used_dir_writes_nothing() {
        let (file, _) = backup_file();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d");
        let truncated = restore(
            file[..file.len() - 1].to_vec(),
            &data,
            "127.0.0.1:9",
            "127.0.0.1:9",
            false,
        );
        assert!(
            matches!(truncated, Err(RecoveryError::Backup(BackupError::Truncated { .. }))),
            "{:?}",
            truncated.err()
        );
        assert!(!data.exists(), "a refused restore created the data dir");

        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("keep"), "mine").unwrap();
        let used = restore(file.clone(), &data, "127.0.0.1:9", "127.0.0.1:9", false);
        assert!(matches!(used, Err(RecoveryError::NotEmpty(_))), "{:?}", used.err());
        assert_eq!(std::fs::read_to_string(data.join("keep")).unwrap(), "mine");
    }

    #[test]
    fn recover_appends_a_membership_of_the_survivor_alone() {
        let (file, _) = backup_file();
        let dir = tempfile::tempdir().unwrap();
        // A restored replica is alone already: nothing to recover.
        restore(file.clone(), dir.path(), "127.0.0.1:9", "127.0.0.1:9", false).unwrap();
        assert!(matches!(recover(dir.path()), Err(RecoveryError::AlreadyAlone(1))));

        // Make it one of three voters, as if replicas 2 and 3 had joined.
        let log = LogStore::<MasterTypes>::open(&dir.path().join("log")).unwrap();
        let last = log.log_state().unwrap().last_log_id.unwrap();
        let three = Membership::new(
            vec![BTreeSet::from([1, 2, 3])],
            (1..=3)
                .map(|i| {
                    (
                        i,
                        ReplicaNode {
                            addr: format!("127.0.0.1:{i}"),
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
        )
        .unwrap();
        let joined = LogId::new(LeaderId { term: 4, node_id: 2 }, last.index + 1);
        let (tx, rx) = std::sync::mpsc::channel();
        log.write_vote(&Vote::new_committed(4, 2)).unwrap();
        log.append_with(
            [Entry {
                log_id: joined,
                payload: EntryPayload::Membership(three),
            }],
            move |r| tx.send(r).unwrap(),
        )
        .unwrap();
        rx.recv().unwrap().unwrap();
        drop(log);

        let recovered = recover(dir.path()).unwrap();
        assert_eq!(recovered.removed, [2, 3]);
        assert_eq!(recovered.at.index, joined.index + 1);
        assert_eq!(recovered.at.committed_leader_id().term, 5);
        let log = LogStore::<MasterTypes>::open(&dir.path().join("log")).unwrap();
        assert_eq!(log.vote(), Some(Vote::new(5, 1)));
        let entries = log.read_entries(recovered.at.index..).unwrap();
        let EntryPayload::Membership(m) = &entries[0].payload else {
            panic!("not a membership entry: {:?}", entries[0]);
        };
        assert_eq!(m.voter_ids().collect::<Vec<_>>(), [1]);
        assert_eq!(m.get_node(&1).unwrap().addr, "127.0.0.1:1");
    }

    #[test]
    fn recover_needs_a_replica_with_a_log() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(recover(dir.path()), Err(RecoveryError::NoReplica(_))));
    }
}
