//! Starting again after the worst: `master-node restore` makes a new
//! cluster from a backup taken under write load, which holds exactly the
//! writes acknowledged up to the backup's index, accepts new ones and
//! takes new replicas; `master-node recover` makes the one replica left
//! after two of three are lost for good a working cluster again, that the
//! gateway keeps reaching and new replicas join.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{free_port, log_tail, wait_for_child, Proc, SlapCluster, BIN};
use master_node::client::{Client, Credentials};
use master_node::state::{Master, Role};
use slap_proto::master as pb;

type Native = pb::master_client::MasterClient<tonic::transport::Channel>;

fn s(v: &str) -> String {
    v.to_string()
}

/// A native-API client of a replica serving plain HTTP on `port`.
fn native_at(port: u16) -> Native {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_lazy();
    Native::new(channel)
}

async fn supply(client: &mut Native, url: &str) -> Result<u64, tonic::Status> {
    let done = client
        .supply(pb::SupplyRequest {
            computer_id: "COMP-B".into(),
            url: url.to_string(),
            ..Default::default()
        })
        .await?;
    Ok(done.into_inner().log_index)
}

/// Declares COMP-B, the computer the releases are supplied to.
async fn load_comp_b(client: &mut Native) {
    client
        .load_computer(pb::LoadComputerRequest {
            computer_id: "COMP-B".into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Whether `state` has release `url` supplied to COMP-B.
fn holds(state: &Master, url: &str) -> bool {
    state
        .installations
        .contains_key(&("COMP-B".to_string(), url.to_string()))
}

/// A backup of the cluster `peer` belongs to, read back: its header and state.
fn backup_of(peer: &str, token: &str, file: &Path) -> (master_node::backup::Header, Master) {
    let out = Command::new(BIN)
        .args(["backup", "--peer", peer, "--token", token, "--out"])
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    master_node::backup::verify(&std::fs::read(file).unwrap()).unwrap()
}

/// Status of `addr` once `ok` holds of it (within 60 s).
fn wait_status(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    who: &Credentials,
    what: &str,
    child: &mut Proc,
    log: &Path,
    ok: impl Fn(&slap_proto::cluster::StatusReply) -> bool,
) -> slap_proto::cluster::StatusReply {
    let mut last = None;
    wait_for_child(what, child, log, || {
        last = rt.block_on(Client::status_of(addr, who)).ok();
        last.as_ref().is_some_and(&ok)
    });
    last.unwrap()
}

fn voters(st: &slap_proto::cluster::StatusReply) -> usize {
    st.members.iter().filter(|m| m.role == "voter").count()
}

/// Starts `master-node join` of a new replica into the cluster at `peer`:
/// the process and its cluster address.
fn join(dir: &Path, name: &str, peer: &str, token: &str) -> (Proc, String) {
    let raft = format!("127.0.0.1:{}", free_port());
    let args = [
        s("join"),
        s("--peer"),
        s(peer),
        s("--token"),
        s(token),
        s("--data-dir"),
        dir.join(name).display().to_string(),
        s("--listen"),
        raft.clone(),
    ];
    (
        Proc::spawn_logged(Path::new(BIN), &args, &dir.join(format!("{name}.log"))),
        raft,
    )
}

#[test]
fn a_backup_restores_into_a_new_cluster_with_exactly_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = SlapCluster::start(dir.path());
    let token = cluster.join_token();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let mut client = cluster.native();
    rt.block_on(load_comp_b(&mut client));
    // Releases supplied one after the other, with the index each was
    // acknowledged at, while the backup is taken.
    let acknowledged: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acknowledged, stop, mut client) = (acknowledged.clone(), stop.clone(), client.clone());
        rt.spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let url = format!("https://lab.example.org/sr-{i}.cfg");
                let index = supply(&mut client, &url).await.expect("a supply");
                acknowledged.lock().unwrap().push((index, url));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let file = dir.path().join("master.backup");
    let (old, _) = backup_of(&cluster.raft[0], &token, &file);
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    rt.block_on(writer).unwrap();

    // A damaged backup is refused before anything is written.
    let bytes = std::fs::read(&file).unwrap();
    let truncated = dir.path().join("truncated.backup");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let never = dir.path().join("never");
    let out = Command::new(BIN)
        .args(["restore", "--from"])
        .arg(&truncated)
        .arg("--data-dir")
        .arg(&never)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.contains("truncated") && said.contains("nothing was written"),
        "{said}"
    );
    assert!(!never.exists(), "a refused restore created its data dir");

    // The restore: a new cluster, serving.
    let restored_dir = dir.path().join("restored");
    let raft = format!("127.0.0.1:{}", free_port());
    let slap = free_port();
    let log = dir.path().join("restored.log");
    let mut restored = Proc::spawn_logged(
        Path::new(BIN),
        &[
            s("restore"),
            s("--from"),
            file.display().to_string(),
            s("--data-dir"),
            restored_dir.display().to_string(),
            s("--listen"),
            raft.clone(),
            s("--slap-listen"),
            format!("127.0.0.1:{slap}"),
            s("--insecure-http"),
        ],
        &log,
    );
    let token_file = restored_dir.join("join-token");
    wait_for_child("the restored replica", &mut restored, &log, || token_file.exists());
    let new_token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    // The old cluster's administrator is still recognized: same CA.
    let st = wait_status(&rt, &raft, &cluster.admin, "a leader", &mut restored, &log, |st| {
        st.state == "Leader"
    });
    assert_ne!(st.cluster_id, old.cluster_id);
    assert_eq!(voters(&st), 1);
    assert!(st.last_log_index > old.log_index, "indexes go on from the backup's");

    // It takes writes, and a new replica, which can only get the state
    // from the snapshot (the log before the backup's index is not there).
    let mut direct = native_at(slap);
    let after = rt
        .block_on(supply(&mut direct, "https://lab.example.org/after-restore.cfg"))
        .unwrap();
    assert!(after > old.log_index);
    let (mut joiner, joiner_raft) = join(dir.path(), "joiner", &raft, &new_token);
    let joiner_log = dir.path().join("joiner.log");
    wait_status(
        &rt,
        &raft,
        &cluster.admin,
        "the joiner to vote",
        &mut joiner,
        &joiner_log,
        |st| voters(st) == 2,
    );
    wait_status(
        &rt,
        &joiner_raft,
        &cluster.admin,
        "the joiner to apply",
        &mut joiner,
        &joiner_log,
        |st| st.applied >= after,
    );

    // Exactly the writes acknowledged up to the backup's index, and the
    // one made since.
    let (now, state) = backup_of(&joiner_raft, &new_token, &dir.path().join("restored.backup"));
    assert_eq!(now.cluster_id, st.cluster_id);
    let acknowledged = acknowledged.lock().unwrap();
    let before = acknowledged.iter().filter(|(i, _)| *i <= old.log_index).count();
    assert!(
        before > 5 && acknowledged.len() - before > 5,
        "writes on both sides of the backup: {before} of {}",
        acknowledged.len()
    );
    for (index, url) in acknowledged.iter() {
        assert_eq!(
            holds(&state, url),
            *index <= old.log_index,
            "{url} acknowledged at {index}, backup at {}",
            old.log_index
        );
    }
    assert!(holds(&state, "https://lab.example.org/after-restore.cfg"));
    // The old cluster's replicas are no members of this one.
    let live: Vec<&Role> = state
        .certificates
        .values()
        .filter(|c| matches!(c.role, Role::Replica(_)) && !c.revoked)
        .map(|c| &c.role)
        .collect();
    assert_eq!(live.len(), 2, "the restored replica and the joiner only: {live:?}");
    assert!(!live.contains(&&Role::Replica(2)) && !live.contains(&&Role::Replica(3)));
    drop((restored, joiner));
}

#[test]
fn a_survivor_recovers_the_cluster_after_the_majority_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = SlapCluster::start(dir.path());
    let token = cluster.join_token();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let mut client = cluster.native();
    rt.block_on(load_comp_b(&mut client));
    let urls: Vec<String> = (0..20).map(|i| format!("https://lab.example.org/sr-{i}.cfg")).collect();
    for url in &urls {
        rt.block_on(supply(&mut client, url)).unwrap();
    }

    // Two of three replicas are lost for good; the survivor is stopped.
    let lost = cluster.kill_leader();
    let survivor = (0..3).find(|i| *i != lost).unwrap();
    let other = (0..3).find(|i| *i != lost && *i != survivor).unwrap();
    cluster.replicas[other].kill();
    cluster.replicas[survivor].kill();
    let data = dir.path().join(format!("r{survivor}"));

    // Without the confirmation: a sentence, nothing done.
    let out = Command::new(BIN)
        .args(["recover", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.contains("--confirm-majority-lost"), "{said}");

    let log = dir.path().join("recovered.log");
    let mut recovered = Proc::spawn_logged(
        Path::new(BIN),
        &[
            s("recover"),
            s("--confirm-majority-lost"),
            s("--data-dir"),
            data.display().to_string(),
            s("--slap-listen"),
            format!("127.0.0.1:{}", cluster.slap[survivor]),
            s("--insecure-http"),
        ],
        &log,
    );
    let raft = cluster.raft[survivor].clone();
    let st = wait_status(
        &rt,
        &raft,
        &cluster.admin,
        "the survivor to lead alone",
        &mut recovered,
        &log,
        |st| st.state == "Leader" && voters(st) == 1,
    );
    assert_eq!(st.members.len(), 1, "{:?}", st.members);

    // The gateway, still in front of the three SLAP ports, reaches it.
    let mut through_gateway = None;
    for _ in 0..100 {
        match rt.block_on(supply(&mut client, "https://lab.example.org/after-recovery.cfg")) {
            Ok(index) => {
                through_gateway = Some(index);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    assert!(through_gateway.is_some(), "{}", log_tail(&log));

    // New replicas join; the state holds every write, and the lost
    // replicas' certificates are revoked.
    let mut joined = Vec::new();
    for (k, name) in ["new-a", "new-b"].into_iter().enumerate() {
        let (mut p, _) = join(dir.path(), name, &raft, &token);
        let plog = dir.path().join(format!("{name}.log"));
        wait_status(
            &rt,
            &raft,
            &cluster.admin,
            "the new replica to vote",
            &mut p,
            &plog,
            |st| voters(st) == 2 + k,
        );
        joined.push(p);
    }
    let (_, state) = backup_of(&raft, &token, &dir.path().join("recovered.backup"));
    for url in urls
        .iter()
        .map(String::as_str)
        .chain(["https://lab.example.org/after-recovery.cfg"])
    {
        assert!(holds(&state, url), "{url} is missing after the recovery");
    }
    let mut live: Vec<u64> = state
        .certificates
        .values()
        .filter_map(|c| match c.role {
            Role::Replica(id) if !c.revoked => Some(id),
            _ => None,
        })
        .collect();
    live.sort();
    assert_eq!(live, [st.node_id, 4, 5], "the survivor and the two new replicas only");
    drop((recovered, joined));
}
