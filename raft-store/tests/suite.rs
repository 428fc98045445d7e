//! openraft's storage conformance suite against the real RocksDB store.

use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;
use raft_store::kv::{KvApp, KvTypes};
use raft_store::{LogStore, StateMachineStore};
use tempfile::TempDir;

struct RocksBuilder;

impl StoreBuilder<KvTypes, LogStore<KvTypes>, StateMachineStore<KvTypes, KvApp>, TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore<KvTypes>, StateMachineStore<KvTypes, KvApp>), StorageError<KvTypes>> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (log, sm) = raft_store::open(dir.path()).expect("open a fresh store");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() {
    Suite::test_all(RocksBuilder).await.expect("openraft storage suite");
}
