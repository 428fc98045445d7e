//! The `backup-restore` fault: an operator's disaster drill, in the middle
//! of the run.
//!
//! A backup is taken from the live cluster under the workload (`master-node
//! backup`), restored into a scratch one-replica cluster on loopback
//! (`master-node restore`), and that cluster is backed up in turn once it
//! leads. The drill holds when the restored cluster is a new one (another
//! id, its log going on past the backup's index) holding the same
//! computers, instances and installations as the file it came from. The
//! live cluster is never stopped: the workload and its checkers run on
//! unchanged beside the drill, so a backup that disturbed the cluster
//! would show there.
//!
//! Must not import: `run` (the nemesis calls this, not the other way).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use master_node::backup::{self, Header};
use master_node::state::Master;

use crate::cluster::{die_with_parent, free_port, wait_until, Cluster, Proc};

/// One drill in `work` (removed afterwards if all went well, kept for
/// inspection otherwise), backing up through the replica at `peer`: what
/// went wrong, if anything. A step that fails is a problem too.
pub async fn drill(c: &Cluster, peer: &str, work: &Path) -> Vec<String> {
    match run_drill(c, peer, work).await {
        Ok(problems) => problems,
        Err(e) => vec![format!("the drill failed (see {}): {e:#}", work.display())],
    }
}

async fn run_drill(c: &Cluster, peer: &str, work: &Path) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(work)?;
    let taken_file = work.join("taken.backup");
    let (taken, state) = take_backup(c, peer, &c.token, &taken_file)?;

    let data = work.join("restored");
    let listen = format!("127.0.0.1:{}", free_port()?);
    let log = std::fs::File::create(work.join("restore.log"))?;
    let mut cmd = Command::new(&c.bins.master_node);
    cmd.arg("restore")
        .arg("--from")
        .arg(&taken_file)
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", &listen])
        .args(&c.timing)
        .stdout(Stdio::null())
        .stderr(log);
    let mut restored = Proc::running(
        die_with_parent(&mut cmd)
            .spawn()
            .context("starting master-node restore")?,
    );
    let token_file = data.join("join-token");
    wait_until("the restored replica's join token", Duration::from_secs(30), || async {
        token_file.exists()
    })
    .await?;
    let token = std::fs::read_to_string(&token_file)?.trim().to_string();
    let status = || {
        let out = c.master_cli(None, &["status", "--peer", &listen, "--token", &token, "--json"]);
        out.ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .filter(|v| v["state"] == "Leader")
    };
    wait_until("the restored replica to lead", Duration::from_secs(30), || async {
        status().is_some()
    })
    .await?;
    let last_log_index = status().and_then(|v| v["last_log_index"].as_u64()).unwrap_or(0);
    let (again, restored_state) = take_backup(c, &listen, &token, &work.join("restored.backup"))?;
    restored.kill();

    let mut problems = compare(&taken, &state, &again, &restored_state);
    // Its first entry (the new leader's) comes after the backup's last.
    if last_log_index <= taken.log_index {
        problems.push(format!(
            "the restored cluster's log ends at {last_log_index}, not past the backup's index {}",
            taken.log_index
        ));
    }
    if problems.is_empty() {
        std::fs::remove_dir_all(work)?;
    }
    Ok(problems)
}

/// `master-node backup` of the cluster at `peer`, read back.
fn take_backup(c: &Cluster, peer: &str, token: &str, file: &Path) -> anyhow::Result<(Header, Master)> {
    let out = c.master_cli(
        None,
        &[
            "backup",
            "--peer",
            peer,
            "--token",
            token,
            "--out",
            &file.display().to_string(),
        ],
    )?;
    if !out.status.success() {
        bail!("backup through {peer}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let bytes = std::fs::read(file)?;
    backup::verify(&bytes).with_context(|| format!("{} does not verify", file.display()))
}

/// What differs between a backup and the backup of the cluster restored
/// from it, beyond what a restore changes (cluster id, certificates).
fn compare(taken: &Header, state: &Master, again: &Header, restored: &Master) -> Vec<String> {
    let mut problems = Vec::new();
    if again.cluster_id == taken.cluster_id {
        problems.push(format!("the restored cluster kept the old id {}", taken.cluster_id));
    }
    if again.log_index < taken.log_index {
        problems.push(format!(
            "the restored cluster's state is at log index {}, before the backup's {}",
            again.log_index, taken.log_index
        ));
    }
    let differ = |what: &str, a: usize, b: usize, same: bool| {
        (!same).then(|| format!("{what} differ after the restore: {a} in the backup, {b} restored"))
    };
    problems.extend(differ(
        "computers",
        state.computers.len(),
        restored.computers.len(),
        state.computers == restored.computers,
    ));
    problems.extend(differ(
        "instances",
        state.instances.len(),
        restored.instances.len(),
        state.instances == restored.instances,
    ));
    problems.extend(differ(
        "installations",
        state.installations.len(),
        restored.installations.len(),
        state.installations == restored.installations,
    ));
    problems
}
