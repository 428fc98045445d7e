//! openraft's storage conformance suite against the real RocksDB store.

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use raft_store::kv::{KvApp, KvTypes};
use raft_store::{LogStore, StateMachineStore};
use tempfile::TempDir;

struct RocksBuilder;

impl StoreBuilder<KvTypes, LogStore<KvTypes>, StateMachineStore<KvTypes, KvApp>, TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore<KvTypes>, StateMachineStore<KvTypes, KvApp>), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (log, sm) = raft_store::open(dir.path()).expect("open a fresh store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(RocksBuilder).expect("openraft storage suite");
}
