//! `master-node backup` against a running cluster under write load: the
//! file holds every write acknowledged up to its log index and none after,
//! whichever replica is asked; `backup verify` refuses damaged files.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{SlapCluster, BIN};
use master_node::client::Client;

#[test]
fn a_backup_under_write_load_holds_exactly_the_writes_up_to_its_index() {
    use slap_proto::master as pb;
    let dir = tempfile::tempdir().unwrap();
    let cluster = SlapCluster::start(dir.path());
    let token = cluster.join_token();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = runtime.enter();
    let mut client = cluster.native();
    runtime
        .block_on(client.load_computer(pb::LoadComputerRequest {
            computer_id: "COMP-B".into(),
            ..Default::default()
        }))
        .unwrap();
    // A writer: supplies one release after the other, recording the log
    // index each was acknowledged at.
    let acknowledged: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acknowledged, stop, mut client) = (acknowledged.clone(), stop.clone(), client.clone());
        runtime.spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let url = format!("https://lab.example.org/sr-{i}.cfg");
                let done = client
                    .supply(pb::SupplyRequest {
                        computer_id: "COMP-B".into(),
                        url: url.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("a supply")
                    .into_inner();
                acknowledged.lock().unwrap().push((done.log_index, url));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    // Asked of a follower: it relays the leader's backup.
    let follower = (0..3)
        .find(|i| {
            runtime
                .block_on(Client::status_of(&cluster.raft[*i], &cluster.admin))
                .is_ok_and(|s| s.state != "Leader")
        })
        .expect("a follower");
    let file = dir.path().join("master.backup");
    let out = Command::new(BIN)
        .args(["backup", "--peer", &cluster.raft[follower], "--token", &token, "--out"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(writer).unwrap();

    let bytes = std::fs::read(&file).unwrap();
    let (header, state) = master_node::backup::verify(&bytes).unwrap();
    let acknowledged = acknowledged.lock().unwrap();
    let before = acknowledged
        .iter()
        .filter(|(index, _)| *index <= header.log_index)
        .count();
    let after = acknowledged.len() - before;
    assert!(
        before > 10 && after > 10,
        "writes on both sides of the backup: {before} before, {after} after"
    );
    for (index, url) in acknowledged.iter() {
        let held = state.installations.contains_key(&("COMP-B".to_string(), url.clone()));
        assert_eq!(
            held,
            *index <= header.log_index,
            "{url}, acknowledged at {index}, backup at {}",
            header.log_index
        );
    }

    // `backup verify` says what the file holds, and refuses a damaged one.
    let verify = |path: &std::path::Path| Command::new(BIN).args(["backup", "verify"]).arg(path).output().unwrap();
    let ok = verify(&file);
    let printed = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success() && printed.contains(&format!("log index {}", header.log_index)),
        "{printed}"
    );
    let truncated = dir.path().join("truncated.backup");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let refused = verify(&truncated);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("truncated"),
        "{refused:?}"
    );
    // A wrong token: refused, and no file written.
    let elsewhere = dir.path().join("never.backup");
    let wrong = token.replace(|c: char| c.is_ascii_digit(), "7");
    let out = Command::new(BIN)
        .args(["backup", "--peer", &cluster.raft[0], "--token", &wrong, "--out"])
        .arg(&elsewhere)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!elsewhere.exists(), "a refused backup wrote a file");
}

/// `backup --every 1s --keep 2`: a backup each second, the oldest removed,
/// every file kept usable.
#[test]
fn scheduled_backups_keep_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = SlapCluster::start(dir.path());
    let token = cluster.join_token();
    let out = dir.path().join("backups");
    let mut scheduled = common::Proc::spawn_logged(
        std::path::Path::new(BIN),
        &[
            "backup".into(),
            "--peer".into(),
            cluster.raft[0].clone(),
            "--token".into(),
            token,
            "--out".into(),
            out.display().to_string(),
            "--every".into(),
            "1s".into(),
            "--keep".into(),
            "2".into(),
        ],
        &dir.path().join("backup.log"),
    );
    let backups = || -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(&out)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|e| e == "backup") && !p.ends_with("next.backup"));
        files.sort();
        files
    };
    // Four turns: the first two files are gone by then.
    std::thread::sleep(Duration::from_millis(4_500));
    scheduled.kill();
    let kept = backups();
    assert_eq!(
        kept.len(),
        2,
        "{kept:?}\n{}",
        common::log_tail(&dir.path().join("backup.log"))
    );
    for file in &kept {
        let (header, _) = master_node::backup::verify(&std::fs::read(file).unwrap()).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(&format!("master-{}-", header.cluster_id))
                && name.ends_with(&format!("-{}.backup", header.log_index)),
            "{name}"
        );
    }
}
