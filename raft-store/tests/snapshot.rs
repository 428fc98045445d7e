//! Snapshots and start-up checks: build, stream, install atomically, survive a
//! restart; damaged files and records are refused with errors that name them.

use std::path::Path;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::RaftSnapshotBuilder;
use raft_store::kv::{set_entry, KvApp, KvEntry, KvTypes};
use raft_store::{LogStore, StateMachineStore};
use tokio::io::AsyncWriteExt;

type Sm = StateMachineStore<KvTypes, KvApp>;

fn set(index: u64, key: &str, value: &str) -> KvEntry {
    set_entry(1, index, key, value.as_bytes())
}

fn data(sm: &Sm) -> Vec<(String, Vec<u8>)> {
    let app = sm.app();
    let app = app.read().unwrap();
    app.data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn snap_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

async fn fill(sm: &mut Sm, from: u64, to: u64) {
    let entries: Vec<_> = (from..to)
        .map(|i| set(i, &format!("key{i:06}"), &format!("v{i}")))
        .collect();
    sm.apply_entries(entries).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_transfer_install_and_restart() {
    let leader_dir = tempfile::tempdir().unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    let (_, mut leader) = raft_store::open::<KvTypes, KvApp>(leader_dir.path()).unwrap();
    fill(&mut leader, 1, 20_001).await;

    let first = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
    fill(&mut leader, 20_001, 20_101).await;
    let snap = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id.unwrap().index, 20_100);
    assert_ne!(first.meta.last_log_id, snap.meta.last_log_id);
    assert_eq!(snap_files(leader_dir.path()).len(), 1, "older snapshot removed");

    // Stream the file to the follower in small chunks, as openraft does.
    let (_, mut follower) = raft_store::open::<KvTypes, KvApp>(follower_dir.path()).unwrap();
    let mut incoming = follower.receive_snapshot().await.unwrap();
    let Snapshot { meta, snapshot } = leader.get_current_snapshot().await.unwrap().unwrap();
    let mut src = snapshot.into_std().await;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = std::io::Read::read(&mut src, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        incoming.write_all(&buf[..n]).await.unwrap();
    }
    incoming.flush().await.unwrap();
    follower.install_snapshot(&meta, incoming).await.unwrap();

    assert_eq!(data(&follower), data(&leader));
    assert_eq!(
        follower.applied_state().await.unwrap(),
        leader.applied_state().await.unwrap()
    );
    assert_eq!(
        snap_files(follower_dir.path()).len(),
        1,
        "receiving file removed, one snapshot kept"
    );

    // After a restart the installed state and the snapshot are still there.
    let expected = data(&follower);
    drop(follower);
    let (_, mut reopened) = raft_store::open::<KvTypes, KvApp>(follower_dir.path()).unwrap();
    assert_eq!(data(&reopened), expected);
    assert_eq!(reopened.applied_state().await.unwrap().0.unwrap().index, 20_100);
    let current = reopened
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("snapshot kept across restart");
    assert_eq!(current.meta, meta);
    // Only the live generation is left in state/.
    let gens: Vec<_> = std::fs::read_dir(follower_dir.path().join("state")).unwrap().collect();
    assert_eq!(gens.len(), 2, "CURRENT and one generation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_snapshot_is_refused_and_state_unchanged() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (_, mut leader) = raft_store::open::<KvTypes, KvApp>(a.path()).unwrap();
    fill(&mut leader, 1, 500).await;
    let snap = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let path = a.path().join("snapshots").join(&snap_files(a.path())[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;

    let (_, mut follower) = raft_store::open::<KvTypes, KvApp>(b.path()).unwrap();
    fill(&mut follower, 1, 3).await;
    let before = data(&follower);
    let mut incoming = follower.receive_snapshot().await.unwrap();
    incoming.write_all(&bytes).await.unwrap();
    incoming.flush().await.unwrap();
    let err = follower.install_snapshot(&snap.meta, incoming).await.unwrap_err();
    let msg = format!("{err:?}");
    assert!(
        msg.contains("snapshot") && msg.contains(&b.path().display().to_string()),
        "{msg}"
    );
    assert_eq!(data(&follower), before);
    assert_eq!(follower.applied_state().await.unwrap().0.unwrap().index, 2);
    drop(follower);
    let (_, reopened) = raft_store::open::<KvTypes, KvApp>(b.path()).unwrap();
    assert_eq!(
        data(&reopened),
        before,
        "a refused install leaves nothing behind after restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_install_leftovers_are_cleaned_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut sm) = raft_store::open::<KvTypes, KvApp>(dir.path()).unwrap();
    fill(&mut sm, 1, 50).await;
    sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let expected = data(&sm);
    drop(sm);
    // What a crash in the middle of an install leaves behind.
    std::fs::create_dir_all(dir.path().join("state/tmp-2")).unwrap();
    std::fs::write(dir.path().join("snapshots/receiving-3.part"), b"partial").unwrap();
    std::fs::write(dir.path().join("snapshots/installing-4.tmp"), b"partial").unwrap();
    let (_, sm) = raft_store::open::<KvTypes, KvApp>(dir.path()).unwrap();
    assert_eq!(data(&sm), expected);
    assert!(!dir.path().join("state/tmp-2").exists());
    assert_eq!(snap_files(dir.path()).len(), 1);
}

/// Writes one raw value into a RocksDB column family of a closed store.
fn poke(db_dir: &Path, cfs: &[&str], cf: &str, key: &[u8], value: &[u8]) {
    let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), db_dir, cfs).unwrap();
    db.put_cf(db.cf_handle(cf).unwrap(), key, value).unwrap();
}

#[test]
fn corrupt_log_record_names_store_and_key() {
    let dir = tempfile::tempdir().unwrap();
    drop(raft_store::open::<KvTypes, KvApp>(dir.path()).unwrap());
    poke(
        &dir.path().join("log"),
        &["log", "meta"],
        "log",
        &7u64.to_be_bytes(),
        &[1, 0xff, 0xff],
    );
    let err = raft_store::open::<KvTypes, KvApp>(dir.path())
        .err()
        .expect("corruption refused");
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().join("log").display().to_string()), "{msg}");
    assert!(
        msg.contains("log/") && msg.contains("index 7") && msg.contains("corrupt"),
        "{msg}"
    );
}

#[test]
fn unknown_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(raft_store::open::<KvTypes, KvApp>(dir.path()).unwrap());
    poke(&dir.path().join("log"), &["log", "meta"], "meta", b"vote", &[2, 0, 0]);
    let msg = raft_store::open::<KvTypes, KvApp>(dir.path())
        .err()
        .expect("refused")
        .to_string();
    assert!(msg.contains("meta/vote") && msg.contains("format version 2"), "{msg}");
}

#[test]
fn corrupt_state_record_names_key() {
    let dir = tempfile::tempdir().unwrap();
    drop(raft_store::open::<KvTypes, KvApp>(dir.path()).unwrap());
    poke(
        &dir.path().join("state/1"),
        &["state", "state_meta"],
        "state",
        &[0xc3, 0x28],
        &[1, 1],
    );
    let msg = raft_store::open::<KvTypes, KvApp>(dir.path())
        .err()
        .expect("refused")
        .to_string();
    assert!(msg.contains("state/0xc328") && msg.contains("UTF-8"), "{msg}");
}

#[test]
fn log_hole_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = raft_store::open::<KvTypes, KvApp>(dir.path()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        log.append_with((1..=5).map(|i| set(i, "k", "v")), move |r| tx.send(r).unwrap())
            .unwrap();
        rx.recv().unwrap().unwrap();
    }
    let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), dir.path().join("log"), ["log", "meta"]).unwrap();
    db.delete_cf(db.cf_handle("log").unwrap(), 3u64.to_be_bytes()).unwrap();
    drop(db);
    let msg = LogStore::<KvTypes>::open(&dir.path().join("log"))
        .err()
        .expect("hole refused")
        .to_string();
    assert!(msg.contains("hole") && msg.contains("entry 3 is missing"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_changes_not_yet_written_are_reported_and_kept_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let (_, mut sm) = raft_store::open::<KvTypes, KvApp>(dir.path()).unwrap();
    // The same key rewritten many times, well within one write interval.
    let entries: Vec<_> = (1..=1000).map(|i| set(i, "hot", &format!("v{i}"))).collect();
    sm.apply_entries(entries).unwrap();
    assert_eq!(sm.applied_state().await.unwrap().0.unwrap().index, 1000);
    assert_eq!(data(&sm), vec![("hot".to_string(), b"v1000".to_vec())]);
    drop(sm);
    let (_, mut reopened) = raft_store::open::<KvTypes, KvApp>(dir.path()).unwrap();
    assert_eq!(data(&reopened), vec![("hot".to_string(), b"v1000".to_vec())]);
    assert_eq!(reopened.applied_state().await.unwrap().0.unwrap().index, 1000);
}

/// A seeded store opens as a replica that installed a snapshot at the
/// seed's log id: the records, applied id and membership are there, the
/// log is purged up to that id, the vote saved, and the snapshot ready to
/// send. Seeding a data dir that already holds a store is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_store_starts_at_its_log_id() {
    let dir = tempfile::tempdir().unwrap();
    let at = raft_store::kv::log_id(3, 1, 5_000);
    let membership = openraft::Membership::new_with_defaults(vec![[1u64].into()], []);
    let meta = openraft::SnapshotMeta {
        last_log_id: Some(at),
        last_membership: openraft::StoredMembership::new(Some(at), membership),
    };
    let vote = raft_store::kv::KvVote::new_committed(3, 1);
    let records: Vec<(Vec<u8>, Vec<u8>)> = (0..1_000)
        .map(|i| (format!("key{i:04}").into_bytes(), format!("v{i}").into_bytes()))
        .collect();
    raft_store::seed::<KvTypes, KvApp>(dir.path(), &meta, &vote, records.clone()).unwrap();

    let (mut log, mut sm) = raft_store::open::<KvTypes, KvApp>(dir.path()).unwrap();
    let held: Vec<(Vec<u8>, Vec<u8>)> = data(&sm).into_iter().map(|(k, v)| (k.into_bytes(), v)).collect();
    assert_eq!(held, records);
    let (applied, stored) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(at));
    assert_eq!(stored, meta.last_membership);
    let state = log.log_state().unwrap();
    assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(at), Some(at)));
    assert_eq!(log.vote(), Some(vote));
    use openraft::storage::RaftLogStorage;
    assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(at));
    let current = sm.get_current_snapshot().await.unwrap().expect("the seed's snapshot");
    assert_eq!(current.meta, meta);
    drop((log, sm));

    let again = raft_store::seed::<KvTypes, KvApp>(dir.path(), &meta, &vote, records);
    assert!(
        matches!(&again, Err(raft_store::StoreError::Refused { .. })),
        "{again:?}"
    );
}
