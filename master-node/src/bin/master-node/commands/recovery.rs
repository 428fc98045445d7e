//! `restore` and `recover`: starting a cluster again from a backup file,
//! or from one surviving replica (`master_node::recovery` prepares the
//! data dir; these then serve it as `init` and `run` do).

use std::time::Duration;

use master_node::api::ClientWrite;
use master_node::recovery::{self, RecoveryError};
use master_node::server::Running;
use master_node::state::{Command, Reply, Role};

use crate::cli::{RecoverArgs, RestoreArgs};
use crate::commands::cluster::{check_empty, serve, start_serving};
use crate::fail::Fail;

/// `restore --from FILE --data-dir D --listen ADDR [--new-ca]`.
pub async fn restore(a: RestoreArgs) -> Result<(), Fail> {
    let r = &a.replica;
    check_empty(&r.data_dir)?;
    let file = std::fs::read(&a.from).map_err(|e| Fail(format!("cannot read {}: {e}", a.from.display())))?;
    let advertise = r.advertise();
    let restored = recovery::restore(file, &r.data_dir, &r.listen, &advertise, a.new_ca).map_err(|e| match e {
        RecoveryError::Backup(why) => Fail(format!(
            "{} is not a usable backup: {why}; nothing was written",
            a.from.display()
        )),
        other => Fail(format!("cannot restore {}: {other}", a.from.display())),
    })?;
    let b = &restored.backup;
    tracing::info!(
        cluster = %restored.token.cluster_id,
        from_cluster = %b.cluster_id,
        log_index = b.log_index,
        records = b.records,
        new_ca = a.new_ca,
        "backup restored into a new cluster; replica 1 is its only member"
    );
    let mut running = Running::start(&r.data_dir, &restored.identity, &r.serving.timing, false).await?;
    start_serving(&mut running, &r.serving).await?;
    running.replica.mark_joined();
    let token = &restored.token;
    println!("{token}");
    eprintln!(
        "master-node: cluster {} restored from {} (cluster {}, log index {}). Join more replicas with:\n  master-node join --peer {advertise} --token {token} --data-dir DIR --listen ADDR\n(the token is also in {}; an administrator's certificate is in {})",
        token.cluster_id,
        a.from.display(),
        b.cluster_id,
        b.log_index,
        r.data_dir.join("join-token").display(),
        restored.admin_dir.display()
    );
    if a.new_ca {
        eprintln!(
            "master-node: the cluster has a new CA: nodes, users and gateways need new certificates (`user add`, `gateway add`, `computer add` then `nodeagent register`)"
        );
    }
    serve(running).await
}

/// `recover --data-dir D --confirm-majority-lost [serving flags]`.
pub async fn recover(a: RecoverArgs) -> Result<(), Fail> {
    let dir = &a.run.data_dir;
    if !a.confirm_majority_lost {
        return Err(Fail(format!(
            "recover makes the replica of {} the only voter of its cluster. Do it only when the other voters are lost for good: \
             if they come back they form a second cluster, writes only they had are lost, and writes this replica held \
             but the cluster never acknowledged are kept. Stop this replica, then run again with --confirm-majority-lost",
            dir.display()
        )));
    }
    let recovered = recovery::recover(dir)?;
    let me = recovered.identity.node_id;
    tracing::warn!(
        replica = me,
        removed = ?recovered.removed,
        index = recovered.at.index,
        "forced a membership with this replica as the only voter"
    );
    let mut running = Running::start(dir, &recovered.identity, &a.run.serving.timing, false).await?;
    start_serving(&mut running, &a.run.serving).await?;
    // The lost replicas must never speak for the cluster again, should
    // they come back: their certificates go, as `leave` does.
    for id in &recovered.removed {
        revoke_replica(&running, *id).await;
    }
    println!(
        "replica {me} is now the only voter of cluster {}; replicas {:?} were removed and their certificates revoked. \
         Join new replicas with `master-node join` (the join token is unchanged)",
        recovered.identity.cluster_id, recovered.removed
    );
    serve(running).await
}

/// Revokes replica `id`'s certificates, retrying while the recovered
/// replica elects itself.
async fn revoke_replica(running: &Running, id: u64) {
    let write = || ClientWrite {
        request_id: None,
        command: Command::RevokeRole {
            role: Role::Replica(id),
        },
    };
    for _ in 0..30 {
        match running.replica.write(write()).await {
            Ok((Reply::Done, _)) => {
                tracing::info!(replica = id, "the lost replica's certificates are revoked");
                return;
            }
            Ok((other, _)) => {
                tracing::warn!(replica = id, "cannot revoke the lost replica's certificates: {other:?}");
                return;
            }
            Err(e) => {
                tracing::info!(
                    replica = id,
                    "waiting to revoke the lost replica's certificates: {}",
                    e.message()
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    tracing::warn!(
        replica = id,
        "the lost replica's certificates are not revoked yet: revoke them with `master-node cert revoke`"
    );
}
