//! A rolling upgrade with version skew: a cluster of two old releases and
//! a new one (old, old, new: `--act-as-version 1`) takes writes through
//! the gateway, refuses a kind of command the old releases could not apply
//! with a sentence that says why, and is upgraded one replica at a time
//! under load with no failed call. Once every voter speaks this build's version the
//! leader raises the cluster's version by itself, the new command works,
//! and an old release can no longer join.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{free_port, wait_for, SlapCluster, BIN};
use master_node::client::Client;
use slap_proto::master as pb;

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// The serial of the administrator's certificate, from `cert list`.
fn admin_serial(peer: &str, token: &str) -> String {
    let out = cli(&["cert", "list", "--peer", peer, "--token", token]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(" valid ") && l.split_whitespace().last() == Some("admin"))
        .and_then(|l| l.split_whitespace().next())
        .expect("a valid administrator's certificate")
        .to_string()
}

#[test]
fn a_rolling_upgrade_under_load_fails_no_call_and_unlocks_the_new_commands() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = SlapCluster::start_acting(dir.path(), [Some(1), Some(1), None]);
    let token = cluster.join_token();
    let peer = cluster.raft[2].clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let admin = cluster.admin.clone();
    let raft = cluster.raft.clone();
    let status = |addr: &str| rt.block_on(Client::status_of(addr, &admin)).ok();
    let st = status(&peer).unwrap();
    assert_eq!(
        (st.cluster_version, st.speaks_version),
        (1, master_node::state::VERSION)
    );
    assert_eq!(status(&raft[0]).unwrap().speaks_version, 1);

    // A renewal is of version 2: refused while old releases vote, with the reason.
    let serial = admin_serial(&peer, &token);
    let out_dir = dir.path().join("renewed");
    let out_arg = out_dir.display().to_string();
    let renew = || {
        cli(&[
            "cert", "renew", &serial, "--out", &out_arg, "--peer", &peer, "--token", &token,
        ])
    };
    let refused = renew();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        said.contains("needs cluster version 2") && said.contains("older release"),
        "{said}"
    );
    assert!(!out_dir.exists());

    // Load through the gateway during the whole upgrade.
    let mut client = cluster.native();
    rt.block_on(client.load_computer(pb::LoadComputerRequest {
        computer_id: "COMP-B".into(),
        ..Default::default()
    }))
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let writer = {
        let (stop, done, failed, mut client) = (stop.clone(), done.clone(), failed.clone(), client.clone());
        rt.spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let call = client.supply(pb::SupplyRequest {
                    computer_id: "COMP-B".into(),
                    url: format!("https://lab.example.org/sr-{i}.cfg"),
                    ..Default::default()
                });
                match call.await {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failed.lock().unwrap().push(format!("call {i}: {e}"));
                        0
                    }
                };
            }
        })
    };

    // One replica at a time: a follower first, then the other old one.
    for i in [1, 0] {
        let before = done.load(Ordering::Relaxed);
        cluster.upgrade(i);
        wait_for(
            "the upgraded replica to speak this build's version and catch up",
            || {
                let leader = status(&peer).map(|s| s.last_log_index).unwrap_or(u64::MAX);
                status(&raft[i])
                    .is_some_and(|s| s.speaks_version == master_node::state::VERSION && s.applied + 5 >= leader)
            },
        );
        wait_for("writes to go on", || done.load(Ordering::Relaxed) > before + 20);
    }
    wait_for("the cluster version to rise to 2", || {
        (0..3).all(|i| status(&raft[i]).is_some_and(|s| s.cluster_version == master_node::state::VERSION))
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    rt.block_on(writer).unwrap();
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} failed calls: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(done.load(Ordering::Relaxed) > 40);

    // Now the renewal works: the new certificate is written under the
    // holder's names and recorded; the old one stays valid until it expires.
    let renewed = renew();
    assert!(renewed.status.success(), "{}", String::from_utf8_lossy(&renewed.stderr));
    assert!(out_dir.join("admin.crt").exists() && out_dir.join("admin.key").exists());
    let new_serial = slap_proto::live::Validity::of_pem(&std::fs::read_to_string(out_dir.join("admin.crt")).unwrap())
        .unwrap()
        .serial;
    let list = cli(&["cert", "list", "--peer", &peer, "--token", &token]);
    let listed = String::from_utf8_lossy(&list.stdout).to_string();
    let row = |serial: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(serial))
            .map(str::to_string)
            .unwrap()
    };
    assert!(row(&serial).contains(" valid "), "{}", row(&serial));
    assert!(
        row(&new_serial).contains(" valid ") && row(&new_serial).ends_with("admin"),
        "{}",
        row(&new_serial)
    );
    for (i, r) in cluster.replicas.iter_mut().enumerate() {
        assert!(!r.exited(), "replica {i} stopped");
    }

    // An old release can no longer run a replica of it, nor join it.
    cluster.replicas[1].stop();
    let out = cli(&[
        "run",
        "--act-as-version",
        "1",
        "--data-dir",
        &dir.path().join("r1").display().to_string(),
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.contains(&format!("cluster is at version {}", master_node::state::VERSION))
            && said.contains("newer master-node"),
        "{said}"
    );

    let joiner = dir.path().join("old-joiner");
    let out = cli(&[
        "join",
        "--act-as-version",
        "1",
        "--peer",
        &peer,
        "--token",
        &token,
        "--data-dir",
        &joiner.display().to_string(),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.contains(&format!("at version {}", master_node::state::VERSION)) && said.contains("newer master-node"),
        "{said}"
    );
    assert!(!Path::new(&joiner).join("replica.json").exists());
}
